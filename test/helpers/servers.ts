// The HTTP servers people run, as Debian ships them, each started the way its own docs show (test/fixtures/servers/).
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fixture } from './netns.js';

/** Where the servers' files are: each deploy runs with this as its --cwd. */
export const SERVERS_DIR = fixture('servers');
/** A private HOME for the servers (Go's build cache, caddy's data). */
export const serversHome = mkdtempSync(path.join(tmpdir(), 'portflip-servers-'));
process.on('exit', () => rmSync(serversHome, { recursive: true, force: true }));

/** Builds one Go file of the fixtures once per process; returns the binary. */
export function goBuild(name: string): string {
  const bin = path.join(serversHome, name);
  if (!existsSync(bin)) {
    execFileSync('go', ['build', '-o', bin, `${name}.go`], {
      cwd: SERVERS_DIR,
      stdio: 'pipe',
      env: {
        ...process.env,
        GOCACHE: path.join(tmpdir(), 'portflip-go-cache'),
        GOTOOLCHAIN: 'local',
        GO111MODULE: 'off',
      },
    });
  }
  return bin;
}

export interface Server {
  name: string;
  cmd: () => string[]; // {port} is the instance port; APP_VERSION says what it answers
}

export const SERVERS: Server[] = [
  { name: 'Go net/http, Shutdown(ctx) on SIGTERM', cmd: () => [goBuild('go-shutdown')] },
  { name: 'Go net/http, no signal handling', cmd: () => [goBuild('go-plain')] },
  {
    name: 'gunicorn, gthread workers, --keep-alive 5',
    cmd: () => [
      '/usr/bin/gunicorn',
      '--worker-class',
      'gthread',
      '--threads',
      '4',
      '--keep-alive',
      '5',
      '--bind',
      '0.0.0.0:{port}',
      'wsgi_hello:app',
    ],
  },
  {
    name: 'uvicorn',
    cmd: () => ['/usr/bin/python3', '-m', 'uvicorn', 'asgi_hello:app', '--host', '0.0.0.0', '--port', '{port}'],
  },
  { name: 'aiohttp, web.run_app', cmd: () => ['/usr/bin/python3', 'aiohttp_hello.py'] },
  { name: 'puma (Rack)', cmd: () => ['/usr/bin/puma', '--bind', 'tcp://0.0.0.0:{port}', 'config.ru'] },
  { name: 'caddy respond', cmd: () => ['/usr/bin/caddy', 'run', '--config', 'Caddyfile', '--adapter', 'caddyfile'] },
];

/** The flags a deploy of one of them needs besides its command: its directory, version and HOME. */
export const serverFlags = (version: string) => [
  '--cwd',
  SERVERS_DIR,
  '--env',
  `APP_VERSION=${version}`,
  '--env',
  `HOME=${serversHome}`,
];
