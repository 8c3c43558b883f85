// Keep-alive clients and the servers people run: a plain Node app (server.close()), nginx, and nginx in front, 0 failed.

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fixture, freePorts, startLoad, waitForPort, type LoadResult } from '../helpers/netns.js';
import { inWorld, get, show, type World } from '../helpers/world.js';
import { events } from '../helpers/events.js';
import { PRELOAD_SOURCE } from '../../src/drain/preload.js';

const node = process.execPath;
const PLAIN = fixture('plain-app.mjs');
const NGINX = fixture('nginx-app.sh');
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const LOAD_PER_DEPLOY_MS = 1500; // steady load before each deploy; the deploy itself runs under load too

/** The probe's observations of server.close() on a server with keepAliveTimeout 1.5 s, over raw sockets. */
async function probe(w: World, kind: 'http' | 'https', preload: boolean, tls: string[]) {
  const env = preload ? { NODE_OPTIONS: `--require ${PRELOAD_SOURCE}` } : { NODE_OPTIONS: '' };
  const r = await w.ns.exec(node, [fixture('drain-probe.mjs'), kind, ...tls], { env });
  assert.is(r.code, 0, `probe: ${r.stderr}`);
  return JSON.parse(r.stdout) as Record<string, any>;
}

function certificate(dir: string): Promise<string[]> {
  const cert = path.join(dir, 'cert.pem');
  const key = path.join(dir, 'key.pem');
  return new Promise((resolve, reject) => {
    import('node:child_process').then(({ execFile }) =>
      execFile(
        'openssl',
        [
          'req',
          '-x509',
          '-newkey',
          'rsa:2048',
          '-nodes',
          '-subj',
          '/CN=localhost',
          '-days',
          '1',
          '-keyout',
          key,
          '-out',
          cert,
        ],
        (err) => (err ? reject(err) : resolve([cert, key])),
      ),
    );
  });
}

for (const kind of ['http', 'https'] as const) {
  test(`node-drain: after ${kind} server.close() a keep-alive request gets Connection: close, an idle one lives keepAliveTimeout`, async () => {
    const dir = mkdtempSync(path.join(tmpdir(), 'portflip-probe-'));
    try {
      const tls = kind === 'https' ? await certificate(dir) : [];
      await inWorld(async (w) => {
        const [plain, drained] = await Promise.all([probe(w, kind, false, tls), probe(w, kind, true, tls)]);
        // without the module: Node closes both keep-alive connections the instant close() is called (the race)
        assert.is(plain.busyAfterClose, null, JSON.stringify(plain));
        assert.ok(plain.idleClosedAt - plain.closeCalledAt < 200, JSON.stringify(plain));
        // with it: nothing changes before close()...
        assert.equal(drained.before, plain.before);
        assert.equal(drained.before.idle, { status: 200, connection: 'keep-alive' });
        // ...then no new connections, the next request is answered and closes, the idle one waits 1.5 s idle
        assert.ok(drained.refused, 'the listener is closed');
        assert.equal(drained.busyAfterClose, { status: 200, connection: 'close' }, JSON.stringify(drained));
        assert.ok(drained.busyClosedAt !== null, 'the answered connection was closed');
        assert.ok(drained.idleOpenAfter300ms, 'the idle connection was not closed at once');
        assert.ok(drained.idleClosedAt - drained.closeCalledAt >= 1500, JSON.stringify(drained));
        assert.ok(
          drained.closedCallbackAt !== null && drained.closedCallbackAt >= drained.idleClosedAt - 50,
          "close()'s callback ran last",
        );
      });
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
}

test('node-drain is harmless where no server closes: node -e, npm, and a child node process', async () => {
  await inWorld(async (w) => {
    const env = { NODE_OPTIONS: `--require ${PRELOAD_SOURCE}` };
    const script =
      "require('child_process').execFileSync(process.execPath, ['-e', 'console.log(2)'], { stdio: 'inherit' }); console.log(1)";
    const r = await w.ns.exec(node, ['-e', script], { env, timeoutMs: 10_000 });
    assert.is(r.code, 0, r.stderr);
    assert.is(r.stdout, '2\n1\n');
    const npm = await w.ns.exec('npm', ['--version'], { env, timeoutMs: 20_000 });
    assert.is(npm.code, 0, npm.stderr);
    assert.match(npm.stdout, /^\d+\.\d+\.\d+/);
  });
});

/** Deploys `cmds` in turn (the first before the load) under keep-alive load from the client namespace. */
async function deploysUnderLoad(
  w: World,
  o: { ports: number[]; flags: string[]; cmds: string[][]; url?: string; method?: 'GET' | 'POST' },
) {
  const deploy = (cmd: string[]) =>
    w.pf(['deploy', 'web', '--listen', '80', '--ports', o.ports.join(','), '--json', ...o.flags, '--', ...cmd]);
  const first = await deploy(o.cmds[0]);
  assert.is(first.code, 0, show(first));
  const load = await startLoad(w.ns, 'client', {
    url: o.url ?? `http://${w.ns.serverAddr}:80/`,
    mode: 'keepalive',
    concurrency: 16,
    durationMs: 60_000,
    maxRequests: 5_000_000,
    method: o.method,
  });
  const runs = [first];
  let res: LoadResult | undefined;
  try {
    for (const cmd of o.cmds.slice(1)) {
      await sleep(LOAD_PER_DEPLOY_MS);
      const r = await deploy(cmd);
      assert.is(r.code, 0, show(r));
      runs.push(r);
    }
    await sleep(500);
  } finally {
    res = await load.stop();
  }
  return { res, runs: runs.map((r) => events(r.stdout)) };
}

const okLoad = (res: LoadResult, versions?: string[]) => {
  assert.is(res.failed, 0, JSON.stringify(res));
  assert.ok(res.ok > 500, `enough requests ran: ${res.ok}`);
  if (versions) assert.equal([...new Set(res.versions)], versions, res.versions.join(','));
};

test('a plain Node app whose SIGTERM handler is server.close(): 3 deploys under keep-alive load over veth, 0 failed (node, npm start, sh)', async () => {
  const dir = mkdtempSync(path.join(tmpdir(), 'portflip-npm-'));
  try {
    writeFileSync(
      path.join(dir, 'package.json'),
      JSON.stringify({ name: 'plain', private: true, scripts: { start: `node ${PLAIN}` } }),
    );
    await inWorld(
      async (w) => {
        const ports = await freePorts(2);
        const { res, runs } = await deploysUnderLoad(w, {
          ports,
          flags: [
            '--cwd',
            dir,
            '--env',
            `npm_config_cache=${dir}/npm-cache`,
            '--env',
            'npm_config_update_notifier=false',
          ],
          cmds: [
            [node, PLAIN, 'v1'],
            ['npm', 'start', '--', 'v2'],
            ['sh', '-c', `echo wrapper; node ${PLAIN} v3; echo wrapper done`],
            [node, PLAIN, 'v4'],
          ],
        });
        okLoad(res, ['v1', 'v2', 'v3', 'v4']);
        for (const ev of runs) {
          const start = ev.find((e) => e.step === 'start')!;
          const ready = ev.find((e) => e.step === 'ready')!;
          assert.is(start.detail, 'node-drain preload in NODE_OPTIONS');
          assert.match(ready.detail, /^node-drain loaded in (pid \d+ \([^)]*\), )*pid \d+ \(node\)/, ready.detail);
        }
        for (const ev of runs.slice(1)) {
          const sig = ev.find((e) => e.kind === 'signal')!;
          assert.is(sig.reason, 'stop; the Node drain module handles keep-alive', '--drain auto signals at once');
        }
        const npmReady = runs[1].find((e) => e.step === 'ready')!.detail;
        assert.match(npmReady, /\(npm start/, `npm itself carries it too, harmlessly: ${npmReady}`);
        const environ = readFileSync(`/proc/${runs[3].find((e) => e.step === 'start')!.pid}/environ`, 'utf8').split(
          '\0',
        );
        assert.ok(environ.includes(`NODE_OPTIONS=--require ${PRELOAD_SOURCE}`), 'appended to an empty NODE_OPTIONS');
      },
      { peer: true },
    );
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('express, fastify and koa apps that close their server on SIGTERM: 3 deploys under keep-alive load over veth, 0 failed', async () => {
  const app = fixture('framework-app.mjs');
  await inWorld(
    async (w) => {
      const ports = await freePorts(2);
      // each deploy drains the instance of the framework before it: express, then fastify, then koa
      const { res, runs } = await deploysUnderLoad(w, {
        ports,
        flags: [],
        cmds: [
          [node, app, 'express', 'v1'],
          [node, app, 'fastify', 'v2'],
          [node, app, 'koa', 'v3'],
          [node, app, 'express', 'v4'],
        ],
      });
      okLoad(res, ['v1', 'v2', 'v3', 'v4']);
      for (const ev of runs.slice(1)) {
        assert.is(ev.find((e) => e.kind === 'signal')!.reason, 'stop; the Node drain module handles keep-alive');
      }
    },
    { peer: true },
  );
});

test("--node-drain off leaves NODE_OPTIONS as the user's, and the deploy output says nothing of it", async () => {
  await inWorld(async (w) => {
    const ports = await freePorts(2);
    const r = await w.pf([
      'deploy',
      'web',
      '--listen',
      '80',
      '--ports',
      ports.join(','),
      '--node-drain',
      'off',
      '--env',
      'NODE_OPTIONS=--no-warnings',
      '--json',
      '--',
      node,
      PLAIN,
    ]);
    assert.is(r.code, 0, show(r));
    const ev = events(r.stdout);
    const start = ev.find((e) => e.step === 'start')!;
    assert.is(start.detail, undefined);
    assert.is(ev.find((e) => e.step === 'ready')!.detail, undefined);
    const environ = readFileSync(`/proc/${start.pid}/environ`, 'utf8').split('\0');
    assert.ok(environ.includes('NODE_OPTIONS=--no-warnings'), environ.filter((e) => e.startsWith('NODE')).join(' '));
  });
});

test('nginx stopped with SIGQUIT: 3 deploys under keep-alive load over veth, 0 failed', async () => {
  const base = mkdtempSync(path.join(tmpdir(), 'portflip-nginx-'));
  try {
    await inWorld(
      async (w) => {
        const ports = await freePorts(2);
        const { res, runs } = await deploysUnderLoad(w, {
          ports,
          flags: ['--stop-signal', 'SIGQUIT', '--env', `NGINX_BASE=${base}`],
          cmds: ['v1', 'v2', 'v3', 'v4'].map((v) => [NGINX, v]),
        });
        // the old nginx keeps answering on its open connections while they rotate, so versions alternate for a
        // while (and the load's bounded version list may fill up): check the end state instead of the order
        okLoad(res);
        assert.is(await get(w.ns, `http://${w.ns.serverAddr}:80/`, 'client'), 'v4');
        assert.is(runs[1].find((e) => e.step === 'ready')!.detail, 'node-drain not loaded: no Node.js process');
        for (const ev of runs.slice(1)) {
          const sig = ev.find((e) => e.kind === 'signal')!;
          assert.is(sig.signal, 'SIGQUIT');
          // --drain auto waits (idle) for the open connections, which marked answers make their clients close
          assert.match(sig.reason, /^drained/);
          assert.ok(ev.some((e) => e.kind === 'connections'), 'it counted the open connections');
          const marking = ev.find((e) => e.kind === 'marking')!;
          assert.ok(marking.rewrites.connection >= 1, 'nginx says keep-alive: that line was marked');
        }
      },
      { peer: true },
    );
  } finally {
    rmSync(base, { recursive: true, force: true });
  }
});

test('nginx in front (upstream keepalive pool to the public port on 127.0.0.1), plain Node app behind: 3 deploys under POST load, 0 failed', async () => {
  const base = mkdtempSync(path.join(tmpdir(), 'portflip-nginx-'));
  try {
    await inWorld(
      async (w) => {
        const ports = await freePorts(3);
        const front = w.ns.spawn(NGINX, ['--front', '80'], { env: { PORT: String(ports[2]), NGINX_BASE: base } });
        let out = '';
        front.stderr!.on('data', (d) => (out += d));
        try {
          await waitForPort(w.ns, ports[2]);
          const { res } = await deploysUnderLoad(w, {
            ports: ports.slice(0, 2),
            flags: [],
            cmds: ['v1', 'v2', 'v3', 'v4'].map((v) => [node, PLAIN, v]),
            url: `http://${w.ns.serverAddr}:${ports[2]}/`,
            method: 'POST',
          });
          okLoad(res, ['v1', 'v2', 'v3', 'v4']);
          assert.not.match(out, /upstream prematurely closed|Connection reset/, out);
        } finally {
          try {
            process.kill(-front.pid!, 'SIGKILL');
          } catch {}
        }
      },
      { peer: true },
    );
  } finally {
    rmSync(base, { recursive: true, force: true });
  }
});

test.run();
