// Measures which drain mode fails fewest requests, per kind of app and load: the numbers behind the drain table in docs/drain.md.
//
// For each app x load x drain mode: a fresh server/client namespace pair joined by veth, the app deployed under
// portflip, a closed-loop load from the client namespace (16 connections, each sending its next request as soon as
// the last answer arrived), N deploys in a row, and every failed request counted. Needs root (namespaces, iptables)
// and a build (npm run build). Nothing touches the root namespace: every process runs inside our namespaces.
//   node scripts/drain-matrix.mjs [--apps fixture,node,node-off,nginx,go,gunicorn,uvicorn,...] [--loads keepalive,new]
// The Debian servers of test/helpers/servers.ts, unchanged, are apps too: go-shutdown, go-plain, gunicorn-gthread,
// uvicorn-plain, aiohttp, puma, caddy (not in the default list: --apps names them).
//                                 [--drains auto,signal,idle] [--deploys 3] [--concurrency 16] [--gap MS] [--out FILE]
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import * as h from '../dist/test/helpers/netns.js';
import { SERVERS, serverFlags } from '../dist/test/helpers/servers.js';

const { values: opt } = parseArgs({
  options: {
    apps: { type: 'string', default: 'fixture,node,node-off,nginx,go,gunicorn,uvicorn' },
    loads: { type: 'string', default: 'keepalive,new' },
    drains: { type: 'string', default: 'auto,signal,idle' },
    deploys: { type: 'string', default: '3' },
    concurrency: { type: 'string', default: '16' },
    'drain-timeout': { type: 'string', default: '10s' }, // bounds idle mode's wait under busy keep-alive clients
    gap: { type: 'string', default: '2000' }, // ms of steady load before each deploy
    out: { type: 'string' },
  },
});

const node = process.execPath;
const fx = (f) => h.fixture(f);
const examples = path.join(h.repoRoot, 'examples');
const work = mkdtempSync(path.join(tmpdir(), 'portflip-matrix-'));
const py = ['--cwd', path.join(examples, 'python')];
// What each kind of app is: its command for a version, and the flags a user of that app would give.
const APPS = {
  fixture: { title: "the repo's fixture (written to the contract)", cmd: (v) => [node, fx('app.mjs'), '--port', '{port}', '--version', v], flags: () => ['--ready', 'http://127.0.0.1:{port}/health'] },
  node: { title: 'plain Node app, server.close() on SIGTERM (drain module on)', cmd: (v) => [node, fx('plain-app.mjs'), v], flags: () => [] },
  'node-off': { title: 'the same app with --node-drain off', cmd: (v) => [node, fx('plain-app.mjs'), v], flags: () => ['--node-drain', 'off'] },
  nginx: { title: 'nginx, SIGQUIT (graceful stop)', cmd: (v) => [fx('nginx-app.sh'), v], flags: () => ['--stop-signal', 'SIGQUIT'] },
  go: { title: 'Go recipe (examples/go)', cmd: (v) => [path.join(work, 'go-server'), v], flags: () => [] },
  gunicorn: { title: 'gunicorn recipe (examples/python/wsgi.py, sync workers)', cmd: () => ['/usr/bin/gunicorn', '--bind', '0.0.0.0:{port}', '--workers', '2', '--timeout', '6', 'wsgi:app'], flags: (v) => [...py, '--env', `APP_VERSION=${v}`] },
  uvicorn: { title: 'uvicorn recipe (examples/python/asgi.py, SIGUSR1)', cmd: () => ['/usr/bin/python3', '-m', 'uvicorn', 'asgi:app', '--host', '0.0.0.0', '--port', '{port}'], flags: (v) => [...py, '--env', `APP_VERSION=${v}`, '--stop-signal', 'SIGUSR1'] },
};
// the servers people run, each started the way its docs show (test/fixtures/servers/), with no recipe
const SERVER_KEYS = ['go-shutdown', 'go-plain', 'gunicorn-gthread', 'uvicorn-plain', 'aiohttp', 'puma', 'caddy'];
SERVERS.forEach((s, k) => (APPS[SERVER_KEYS[k]] = { title: `${s.name} (unchanged)`, cmd: () => s.cmd(), flags: (v) => serverFlags(v) }));
if (opt.apps.split(',').includes('go')) {
  const b = spawnSync('go', ['build', '-o', path.join(work, 'go-server'), '.'], { cwd: path.join(examples, 'go'), env: { ...process.env, GOCACHE: path.join(tmpdir(), 'portflip-go-cache'), GOFLAGS: '-mod=mod' }, encoding: 'utf8' });
  if (b.status !== 0) throw new Error(`go build: ${b.stderr}`);
}
const LOADS = { keepalive: 'keep-alive', new: 'new connection per request' };

const deploys = Number(opt.deploys);
const results = [];
const began = performance.now();
const say = (m) => process.stderr.write(`[drain-matrix ${((performance.now() - began) / 1000).toFixed(0)}s] ${m}\n`);

async function measure(appName, load, drain) {
  const app = APPS[appName];
  const ns = await h.createNetns({ peer: true });
  const dirs = h.tmpDirs();
  const nginxBase = mkdtempSync(path.join(tmpdir(), 'portflip-matrix-'));
  const ports = await h.freePorts(2);
  const deploy = (v) =>
    h.portflip(ns, ['deploy', 'web', '--listen', '80', '--ports', ports.join(','), '--drain', drain, '--drain-timeout', opt['drain-timeout'],
      '--env', `NGINX_BASE=${nginxBase}`, '--json', ...app.flags(v), '--', ...app.cmd(v)], dirs, { timeoutMs: 90_000 });
  try {
    const first = await deploy('v1');
    if (first.code !== 0) throw new Error(`first deploy failed: ${first.stderr}`);
    const l = await h.startLoad(ns, 'client', { url: `http://${ns.serverAddr}:80/`, mode: load, concurrency: Number(opt.concurrency), durationMs: 300_000, maxRequests: 10_000_000 });
    const times = [];
    for (let i = 2; i <= deploys + 1; i++) {
      await new Promise((r) => setTimeout(r, Number(opt.gap)));
      const t0 = performance.now();
      const r = await deploy(`v${i}`);
      if (r.code !== 0) throw new Error(`deploy v${i} failed: ${r.stderr}`);
      times.push(performance.now() - t0);
    }
    const res = await l.stop();
    return { app: appName, load, drain, failed: res.failed, total: res.total, errors: res.errors, deployMs: times.map(Math.round) };
  } finally {
    await h.portflip(ns, ['cleanup', '--stop-instances'], dirs).catch(() => {});
    dirs.cleanup();
    await ns.destroy();
    rmSync(nginxBase, { recursive: true, force: true });
  }
}

for (const appName of opt.apps.split(',')) {
  for (const load of opt.loads.split(',')) {
    for (const drain of opt.drains.split(',')) {
      const r = await measure(appName, load, drain).catch((err) => ({ app: appName, load, drain, error: String(err.message ?? err).slice(0, 300) }));
      results.push(r);
      say(JSON.stringify(r));
    }
  }
}

const drains = opt.drains.split(',');
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const cell = (r) => (!r ? '' : r.error ? 'error' : `${r.failed} of ${r.total} (${(median(r.deployMs) / 1000).toFixed(1)} s)`);
const lines = [
  `| app | load | ${drains.map((d) => `\`--drain ${d}\`: failed (deploy)`).join(' | ')} |`,
  `|---|---|${drains.map(() => '---:').join('|')}|`,
];
for (const appName of opt.apps.split(',')) {
  for (const load of opt.loads.split(',')) {
    const row = drains.map((d) => cell(results.find((r) => r.app === appName && r.load === load && r.drain === d)));
    lines.push(`| ${APPS[appName].title} | ${LOADS[load]} | ${row.join(' | ')} |`);
  }
}
const table = lines.join('\n');
process.stdout.write(`${table}\n`);
if (opt.out) writeFileSync(opt.out, JSON.stringify({ deploys, concurrency: Number(opt.concurrency), results, table }, null, 2) + '\n');
rmSync(work, { recursive: true, force: true });
process.exit(0);
