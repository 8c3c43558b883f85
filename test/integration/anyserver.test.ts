// The servers people run, unchanged, with default flags: keep-alive clients lose nothing across 3 deploys.
//
// Each server is a Debian package started the way its own docs show (test/fixtures/servers/). Busy keep-alive
// clients send their next request as soon as an answer arrives; idle ones, like a browser's spare
// connections, ask once every few seconds. The drain marks one answer per busy connection Connection: close
// (src/httpmark.ts), and stops the old instance once the idle ones are quiet.

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fixture, freePorts, startLoad, type LoadResult } from '../helpers/netns.js';
import { events, inWorld, show, type World } from './lib.js';

const servers = fixture('servers');
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const goDir = mkdtempSync(path.join(tmpdir(), 'portflip-servers-'));
process.on('exit', () => rmSync(goDir, { recursive: true, force: true }));

function goBuild(name: string): string {
  const bin = path.join(goDir, name);
  if (!existsSync(bin)) {
    execFileSync('go', ['build', '-o', bin, `${name}.go`], {
      cwd: servers,
      stdio: 'pipe',
      env: { ...process.env, GOCACHE: path.join(tmpdir(), 'portflip-go-cache'), GOTOOLCHAIN: 'local', GO111MODULE: 'off' },
    });
  }
  return bin;
}

interface Server {
  name: string;
  cmd: () => string[];
}

export const SERVERS: Server[] = [
  { name: 'Go net/http, Shutdown(ctx) on SIGTERM', cmd: () => [goBuild('go-shutdown')] },
  { name: 'Go net/http, no signal handling', cmd: () => [goBuild('go-plain')] },
  {
    name: 'gunicorn, gthread workers, --keep-alive 5',
    cmd: () => ['/usr/bin/gunicorn', '--worker-class', 'gthread', '--threads', '4', '--keep-alive', '5', '--bind', '0.0.0.0:{port}', 'wsgi_hello:app'],
  },
  { name: 'uvicorn', cmd: () => ['/usr/bin/python3', '-m', 'uvicorn', 'asgi_hello:app', '--host', '0.0.0.0', '--port', '{port}'] },
  { name: 'aiohttp, web.run_app', cmd: () => ['/usr/bin/python3', 'aiohttp_hello.py'] },
  { name: 'puma (Rack)', cmd: () => ['/usr/bin/puma', '--bind', 'tcp://0.0.0.0:{port}', 'config.ru'] },
  { name: 'caddy respond', cmd: () => ['/usr/bin/caddy', 'run', '--config', 'Caddyfile', '--adapter', 'caddyfile'] },
];

const IDLE_PAUSE_MS = 7000; // idle connections ask once in this long: most deploys find them quiet

/** Deploys v1, then v2-v4 under busy and idle keep-alive load; returns both loads' results and the deploys' events. */
export async function threeDeploys(w: World, cmd: string[], where: 'client' | 'server', extra: string[] = []) {
  const ports = await freePorts(2);
  const deploy = (v: string) =>
    w.pf(['deploy', 'web', '--listen', '80', '--ports', ports.join(','), '--cwd', servers, '--env', `APP_VERSION=${v}`,
      '--env', `HOME=${goDir}`, '--json', ...extra, '--', ...cmd]);
  const first = await deploy('v1');
  assert.is(first.code, 0, show(first));
  const url = `http://${where === 'client' ? w.ns.serverAddr : '127.0.0.1'}:80/`;
  const busy = await startLoad(w.ns, where, { url, mode: 'keepalive', concurrency: 16, durationMs: 90_000, maxRequests: 5_000_000 });
  const idle = await startLoad(w.ns, where, { url, mode: 'keepalive', concurrency: 100, durationMs: 90_000, maxRequests: 100_000, pauseMs: IDLE_PAUSE_MS });
  const runs: Record<string, any>[][] = [];
  const took: number[] = [];
  let res: LoadResult | undefined;
  let idleRes: LoadResult | undefined;
  try {
    for (const v of ['v2', 'v3', 'v4']) {
      await sleep(1000);
      const t0 = Date.now();
      const r = await deploy(v);
      took.push(Date.now() - t0);
      assert.is(r.code, 0, show(r));
      runs.push(events(r.stdout));
    }
    await sleep(500);
  } finally {
    [res, idleRes] = await Promise.all([busy.stop(), idle.stop()]);
  }
  return { res: res!, idle: idleRes!, runs, took };
}

for (const s of SERVERS.filter((s) => !process.env.PF_SERVER || s.name.startsWith(process.env.PF_SERVER))) {
  for (const where of ['client', 'server'] as const) {
    const path_ = where === 'client' ? 'over veth' : 'through loopback';
    test(`${s.name}: 3 deploys with default flags under busy and 100 idle keep-alive clients ${path_}, 0 failed`, async () => {
      await inWorld(async (w) => {
        const { res, idle, runs } = await threeDeploys(w, s.cmd(), where);
        assert.is(res.failed, 0, `busy: ${JSON.stringify(res)}`);
        assert.is(idle.failed, 0, `idle: ${JSON.stringify(idle)}`);
        assert.ok(res.ok > 300, `enough requests ran: ${res.ok}`);
        assert.equal([...new Set(res.versions)], ['v1', 'v2', 'v3', 'v4'], res.versions.join(','));
        for (const [k, ev] of runs.entries()) {
          const marking = ev.find((e) => e.kind === 'marking');
          assert.ok(marking, `deploy ${k + 2} reports its marking: ${JSON.stringify(ev)}`);
          assert.ok(marking.marked >= 1, `busy connections were marked: ${JSON.stringify(marking)}`);
          assert.match(ev.find((e) => e.step === 'drain')!.detail, /answers? marked Connection: close/);
          // the drain ends on its own, never by --drain-timeout (how long deploys take is the benchmark's: npm run bench)
          const signal = ev.find((e) => e.kind === 'signal')!;
          assert.match(signal.reason, /^drained/, JSON.stringify(ev.filter((e) => e.kind !== 'connections')));
        }
      }, { peer: where === 'client' });
    });
  }
}

test.run();
