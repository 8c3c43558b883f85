// Proves the test harness itself: namespaces, veth, REDIRECT inside them, the fixture app's contract, and the load generator.
import { spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  createNetns,
  fixture,
  freePorts,
  killAppInstances,
  startApp,
  startLoad,
  tcpCounts,
  tmpDirs,
  waitFor,
  type AppHandle,
  type Netns,
} from './helpers/netns.js';

// Runs body with fresh namespaces and apps, and tears all of it down even when an assertion fails.
async function withNetns(
  opts: { peer?: boolean },
  body: (ns: Netns, apps: AppHandle[]) => Promise<void>,
): Promise<void> {
  const ns = await createNetns(opts);
  const apps: AppHandle[] = [];
  try {
    await body(ns, apps);
  } finally {
    await Promise.all(apps.map((a) => a.stop({ signal: 'SIGKILL' })));
    await ns.destroy();
  }
}

async function mustExec(ns: Netns, cmd: string, args: string[]): Promise<string> {
  const r = await ns.exec(cmd, args);
  assert.is(r.code, 0, `${cmd} ${args.join(' ')}: ${r.stderr}`);
  return r.stdout;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

test('netns: loopback is up and iptables nat works inside, without touching the host', async () => {
  const [port] = await freePorts(1);
  const hostBefore = process.getuid?.() === 0 ? readHostNat() : '';
  await withNetns({}, async (ns) => {
    assert.match(await mustExec(ns, 'ip', ['-br', 'link', 'show', 'lo']), /UP|UNKNOWN/);
    await mustExec(ns, 'iptables', [
      '-t',
      'nat',
      '-A',
      'OUTPUT',
      '-p',
      'tcp',
      '--dport',
      '80',
      '-j',
      'REDIRECT',
      '--to-ports',
      String(port),
    ]);
    assert.match(await mustExec(ns, 'iptables', ['-t', 'nat', '-S', 'OUTPUT']), `--to-ports ${port}`);
    // Local clients reach a redirected port through OUTPUT.
    const app = await startApp(ns, port, ['--version', 'v1']);
    try {
      const load = await startLoad(ns, 'server', {
        url: 'http://127.0.0.1:80/',
        mode: 'new',
        durationMs: 3000,
        maxRequests: 20,
      });
      const r = await load.done();
      assert.is(r.total, 20);
      assert.is(r.failed, 0, JSON.stringify(r));
    } finally {
      await app.stop({ signal: 'SIGKILL' });
    }
  });
  if (process.getuid?.() === 0) assert.is(readHostNat(), hostBefore, 'host nat table changed');
});

// Read-only look at the host's nat rules, comments (which carry a timestamp) dropped.
function readHostNat(): string {
  return ['iptables-save', 'ip6tables-save']
    .map((cmd) => spawnSync(cmd, ['-t', 'nat'], { encoding: 'utf8' }).stdout ?? '')
    .join('')
    .split('\n')
    .filter((l) => !l.startsWith('#'))
    .join('\n');
}

test('load: new and keepalive over loopback, zero failures, one version', async () => {
  await withNetns({}, async (ns, apps) => {
    const [port] = await freePorts(1);
    apps.push(await startApp(ns, port, ['--version', 'v1']));
    const url = `http://127.0.0.1:${port}/`;
    const loads = await Promise.all([
      startLoad(ns, 'server', { url, mode: 'new', durationMs: 5000 }),
      startLoad(ns, 'server', { url, mode: 'keepalive', durationMs: 5000 }),
    ]);
    await sleep(1000);
    for (const r of await Promise.all(loads.map((l) => l.stop()))) {
      assert.is(r.failed, 0, JSON.stringify(r));
      assert.ok(r.total > 50, `only ${r.total} requests`);
      assert.equal(r.versions, ['v1']);
    }
  });
});

test('load: from the client namespace over veth through a PREROUTING REDIRECT, IPv4 and IPv6', async () => {
  await withNetns({ peer: true }, async (ns, apps) => {
    const [port] = await freePorts(1);
    apps.push(await startApp(ns, port, ['--version', 'v1']));
    for (const ipt of ['iptables', 'ip6tables']) {
      await mustExec(ns, ipt, [
        '-t',
        'nat',
        '-A',
        'PREROUTING',
        '-p',
        'tcp',
        '--dport',
        '80',
        '-j',
        'REDIRECT',
        '--to-ports',
        String(port),
      ]);
    }
    for (const url of [`http://${ns.serverAddr}:80/`, `http://[${ns.serverAddr6}]:80/`]) {
      const loads = await Promise.all([
        startLoad(ns, 'client', { url, mode: 'new', durationMs: 5000 }),
        startLoad(ns, 'client', { url, mode: 'keepalive', durationMs: 5000 }),
      ]);
      await sleep(700);
      for (const r of await Promise.all(loads.map((l) => l.stop()))) {
        assert.is(r.failed, 0, `${url} ${JSON.stringify(r)}`);
        assert.equal(r.versions, ['v1']);
      }
    }
  });
});

test('contract: switch the redirect under load, let the old listener settle, SIGTERM it; no request fails', async () => {
  await withNetns({ peer: true }, async (ns, apps) => {
    const [p1, p2] = await freePorts(2);
    const v1 = await startApp(ns, p1, ['--version', 'v1']);
    const v2 = await startApp(ns, p2, ['--version', 'v2']);
    apps.push(v1, v2);
    await mustExec(ns, 'iptables', [
      '-t',
      'nat',
      '-A',
      'PREROUTING',
      '-p',
      'tcp',
      '--dport',
      '80',
      '-j',
      'REDIRECT',
      '--to-ports',
      String(p1),
    ]);
    const url = `http://${ns.serverAddr}:80/`;
    const loads = await Promise.all([
      startLoad(ns, 'client', { url, mode: 'new', durationMs: 15_000, concurrency: 8 }),
      startLoad(ns, 'client', { url, mode: 'keepalive', durationMs: 15_000, concurrency: 8 }),
      startLoad(ns, 'client', { url, mode: 'new', durationMs: 15_000, concurrency: 1 }),
    ]);
    await sleep(500);
    await mustExec(ns, 'iptables', [
      '-t',
      'nat',
      '-R',
      'PREROUTING',
      '1',
      '-p',
      'tcp',
      '--dport',
      '80',
      '-j',
      'REDIRECT',
      '--to-ports',
      String(p2),
    ]);
    // Handshakes NAT'd to p1 just before the switch still sit in its queues; closing the listener would reset them.
    await waitFor(
      () => {
        const c = tcpCounts(ns, p1);
        return c.acceptQueue === 0 && c.synRecv === 0;
      },
      2000,
      `old listener ${p1} to accept its last connections`,
    );
    const t0 = performance.now();
    const exit = await v1.stop({ signal: 'SIGTERM', timeoutMs: 10_000 });
    const drainMs = performance.now() - t0;
    await sleep(500);
    const [fresh, kept, serial] = await Promise.all(loads.map((l) => l.stop()));
    assert.equal(exit, { code: 0, signal: null }, v1.output());
    assert.ok(drainMs < 5000, `old app took ${drainMs} ms to drain`);
    for (const r of [fresh, kept, serial]) {
      assert.is(r.failed, 0, JSON.stringify(r));
      assert.is(r.versions[0], 'v1');
      assert.is(r.versions[r.versions.length - 1], 'v2');
    }
    // Only one request at a time: every connection opened after a v2 answer must land on v2 too.
    assert.equal(serial.versions, ['v1', 'v2']);
  });
});

// Raw sockets, so the test controls exactly when each request is sent on which connection.
const KEEPALIVE_CLIENT = `
const net = require('node:net');
const [port, appPid] = process.argv.slice(1).map(Number);
const conn = () => new Promise((res) => { const s = net.connect(port, '127.0.0.1', () => res(s)); });
const ask = (s) => new Promise((res, rej) => {
  let buf = '';
  const onData = (d) => {
    buf += d;
    const end = buf.indexOf('\\r\\n\\r\\n');
    if (end < 0) return;
    const len = Number(/content-length: (\\d+)/i.exec(buf)[1]);
    if (buf.length < end + 4 + len) return;
    s.off('data', onData);
    res({ at: Date.now(), status: Number(buf.split(' ')[1]), connection: (/^connection: (.*)$/im.exec(buf) || [])[1]?.trim(), body: buf.slice(end + 4) });
  };
  s.on('data', onData);
  s.once('error', rej);
  s.write('GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n');
});
const closed = (s) => new Promise((res) => s.once('close', () => res(Date.now())));
(async () => {
  const a = await conn(), b = await conn();
  const aClosed = closed(a), bClosed = closed(b);
  await ask(a);
  const lastB = await ask(b);
  process.kill(appPid, 'SIGTERM');
  await new Promise((r) => setTimeout(r, 300));
  const second = await ask(a);
  const out = { second, aClosedAfterMs: (await aClosed) - second.at, bIdleClosedAfterMs: (await bClosed) - lastB.at };
  console.log(JSON.stringify(out));
})().catch((e) => { console.error(e); process.exit(1); });
`;

test('contract: on SIGTERM the next keep-alive request gets Connection: close, an idle one is closed only after ~1 s', async () => {
  await withNetns({}, async (ns, apps) => {
    const [port] = await freePorts(1);
    const app = await startApp(ns, port, ['--version', 'v1']);
    apps.push(app);
    const r = await ns.exec(process.execPath, ['-e', KEEPALIVE_CLIENT, String(port), String(app.pid)], {
      timeoutMs: 10_000,
    });
    assert.is(r.code, 0, r.stderr);
    const out = JSON.parse(r.stdout);
    assert.is(out.second.status, 200);
    assert.is(out.second.connection, 'close');
    assert.is(out.second.body, 'v1');
    assert.ok(out.aClosedAfterMs < 500, `connection after Connection: close stayed open ${out.aClosedAfterMs} ms`);
    assert.ok(out.bIdleClosedAfterMs >= 1000, `idle connection closed too early: ${out.bIdleClosedAfterMs} ms`);
    assert.ok(out.bIdleClosedAfterMs < 2500, `idle connection closed too late: ${out.bIdleClosedAfterMs} ms`);
    assert.equal(await app.stop({ signal: 'SIGTERM', timeoutMs: 3000 }), { code: 0, signal: null }, app.output());
  });
});

const SLOW_CLIENT = `
const http = require('node:http');
http.get('http://127.0.0.1:' + process.argv[1] + '/slow?ms=1500', { agent: new http.Agent({ keepAlive: true }) }, (res) => {
  let body = '';
  res.on('data', (d) => (body += d));
  res.on('end', () => { console.log(JSON.stringify({ status: res.statusCode, connection: res.headers.connection, body })); process.exit(0); });
}).on('error', (e) => { console.error(e.message); process.exit(1); });
`;

test('contract: SIGTERM during a slow request; it completes 200 and the app exits 0', async () => {
  await withNetns({}, async (ns, apps) => {
    const [port] = await freePorts(1);
    const app = await startApp(ns, port, ['--version', 'v1']);
    apps.push(app);
    const client = ns.exec(process.execPath, ['-e', SLOW_CLIENT, String(port)], { timeoutMs: 10_000 });
    await waitFor(() => tcpCounts(ns, port).established > 0, 3000, 'the slow request to connect');
    await sleep(200);
    const t0 = performance.now();
    process.kill(app.pid, 'SIGTERM');
    const r = await client;
    assert.is(r.code, 0, r.stderr);
    assert.equal(JSON.parse(r.stdout), { status: 200, connection: 'close', body: 'v1' });
    assert.equal(await app.exited, { code: 0, signal: null }, app.output());
    assert.ok(performance.now() - t0 < 4000, 'app took too long to exit');
    assert.match(app.output(), /SIGTERM: draining/);
  });
});

test('fixture app: --on-term ignore survives SIGTERM, --on-term exit exits at once', async () => {
  await withNetns({}, async (ns, apps) => {
    const [p1, p2] = await freePorts(2);
    const stubborn = await startApp(ns, p1, ['--on-term', 'ignore']);
    const quick = await startApp(ns, p2, ['--on-term', 'exit']);
    apps.push(stubborn, quick);
    process.kill(stubborn.pid, 'SIGTERM');
    process.kill(quick.pid, 'SIGTERM');
    assert.equal(await quick.exited, { code: 0, signal: null });
    await sleep(700);
    assert.is(stubborn.child.exitCode, null, 'ignoring app exited');
    const load = await startLoad(ns, 'server', {
      url: `http://127.0.0.1:${p1}/health`,
      durationMs: 2000,
      maxRequests: 10,
    });
    assert.is((await load.done()).ok, 10);
    assert.match(stubborn.output(), /SIGTERM: ignored/);
  });
});

test('fixture app: --exit-at-once, --never-listen and --start-delay', async () => {
  await withNetns({}, async (ns) => {
    const [p1, p2, p3] = await freePorts(3);
    const err = await startApp(ns, p1, ['--exit-at-once']).then(
      () => undefined,
      (e: Error) => e,
    );
    assert.ok(err, 'startApp should reject');
    assert.match(err!.message, /exited \(3\)/);
    const direct = await ns.exec(process.execPath, [fixture('app.mjs'), '--port', String(p1), '--exit-at-once']);
    assert.is(direct.code, 3);
    assert.match(direct.stderr, /exiting at once/);

    const never = await startApp(ns, p2, ['--never-listen'], { timeoutMs: 700 }).then(
      () => undefined,
      (e: Error) => e,
    );
    assert.match(never?.message ?? '', /nothing accepted TCP/);

    const t0 = performance.now();
    const late = await startApp(ns, p3, ['--start-delay', '600', '--version', 'v9']);
    try {
      assert.ok(performance.now() - t0 >= 600, 'listened before its start delay');
      assert.match(late.output(), new RegExp(`listening on ${p3} version v9 pid ${late.pid}`));
    } finally {
      await late.stop({ signal: 'SIGKILL' });
    }
  });
});

test('load: bounded by --max-requests; counts refused connections; startLoad rejects if nothing answers', async () => {
  await withNetns({}, async (ns, apps) => {
    const [port, closed] = await freePorts(2);
    apps.push(await startApp(ns, port, ['--version', 'v1']));
    const r = await (await startLoad(ns, 'server', { url: `http://127.0.0.1:${port}/`, maxRequests: 37 })).done();
    assert.is(r.total, 37);
    assert.is(r.ok, 37);
    const err = await startLoad(ns, 'server', { url: `http://127.0.0.1:${closed}/`, durationMs: 500 }).then(
      () => undefined,
      (e: Error) => e,
    );
    assert.match(err?.message ?? '', /ECONNREFUSED/);
  });
});

test('killAppInstances: kills recorded instances by process group, skips a pid whose start time changed', async () => {
  const dirs = tmpDirs();
  await withNetns({}, async (ns) => {
    const child = ns.spawn('sh', ['-c', 'sleep 60 & sleep 60; wait'], { stdio: 'ignore' });
    const innocent = ns.spawn('sleep', ['60'], { stdio: 'ignore' });
    try {
      await waitFor(() => readFileSync(`/proc/${child.pid}/comm`, 'utf8').trim() === 'sh', 3000, 'sh to start');
      const startTime = readFileSync(`/proc/${child.pid}/stat`, 'utf8').split(') ')[1].split(' ')[19];
      const state = {
        schema: 1,
        app: 'web',
        listen: 80,
        instances: [
          { port: 8001, pid: child.pid, startTime, state: 'active' },
          { port: 8002, pid: innocent.pid, startTime: '1', state: 'draining' },
        ],
      };
      writeFileSync(path.join(dirs.stateDir, 'web.json'), JSON.stringify(state));
      const killed = await killAppInstances(dirs.stateDir);
      assert.equal(killed, [child.pid]);
      await waitFor(() => child.exitCode !== null || child.signalCode !== null, 3000, 'sh to die');
      assert.is(innocent.exitCode, null, 'a pid with another start time was killed');
    } finally {
      process.kill(-innocent.pid!, 'SIGKILL');
      try {
        process.kill(-child.pid!, 'SIGKILL');
      } catch {}
    }
  }).finally(() => dirs.cleanup());
});

test.run();
