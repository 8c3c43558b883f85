// Holding new connections for real: pause/resume, in-place deploys, a dead holder, IPv6, under load
// from a client that counts connect time (a held SYN shows as a slow connect, not as a failure).

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fixture, freePorts, startLoad, waitFor, type Netns, type Where } from '../helpers/netns.js';
import { inWorld, deployArgs, show, get, alive, type World } from '../helpers/world.js';
import { events } from '../helpers/events.js';

interface HoldLoad {
  total: number;
  ok: number;
  failed: number;
  errors: Record<string, number>;
  versions: string[];
  slow: { start: number; end: number; ms: number; ok: boolean }[];
  maxMs: number;
}

/** The hold client in a namespace; stop() ends it and returns its summary. */
async function holdLoad(
  ns: Netns,
  where: Where,
  host: string,
  opts: { concurrency?: number; durationMs?: number } = {},
) {
  const args = [
    fixture('hold-client.mjs'),
    '--host',
    host,
    '--port',
    '80',
    '--concurrency',
    String(opts.concurrency ?? 4),
    '--duration',
    String(opts.durationMs ?? 40_000),
  ];
  const child = where === 'client' ? ns.spawnClient(process.execPath, args) : ns.spawn(process.execPath, args);
  let out = '';
  let err = '';
  child.stdout!.on('data', (d) => (out += d));
  child.stderr!.on('data', (d) => (err += d));
  child.stdin!.on('error', () => {});
  const exited = new Promise<void>((res) => child.once('exit', () => res()));
  await waitFor(() => err.includes('ready') || child.exitCode !== null, 10_000, 'the hold client running');
  return {
    async stop(): Promise<HoldLoad> {
      child.stdin!.end('stop\n');
      const t = setTimeout(() => child.kill('SIGKILL'), 30_000);
      await exited;
      clearTimeout(t);
      return JSON.parse(out.trim().split('\n').pop()!);
    },
  };
}

const state = (w: World, app = 'web') => JSON.parse(readFileSync(join(w.dirs.stateDir, `${app}.json`), 'utf8'));
const holderPid = (w: World): number | undefined => state(w).hold?.pid;
/** portflip in the background: its exit and output once it ends. */
function pfBackground(w: World, args: string[]) {
  const child = w.pfSpawn(args);
  let out = '';
  child.stdout?.on('data', (d) => (out += d));
  child.stderr?.on('data', (d) => (out += d));
  const done = new Promise<{ code: number | null; stdout: string; stderr: string }>((res) =>
    child.once('exit', (code) => res({ code, stdout: '', stderr: out })),
  );
  return { kill: (sig: NodeJS.Signals) => child.kill(sig), done };
}

/** How long one TCP connect to port 80 takes to succeed or fail, measured in the connecting process. */
async function connectMs(w: World): Promise<{ ms: number; error?: string }> {
  const script =
    "const t=performance.now();const s=require('net').connect(80,'127.0.0.1');const ms=()=>Math.round(performance.now()-t);" +
    "s.on('connect',()=>{console.log(JSON.stringify({ms:ms()}));s.destroy()});" +
    "s.on('error',e=>console.log(JSON.stringify({ms:ms(),error:e.code})))";
  const r = await w.ns.exec(process.execPath, ['-e', script]);
  return JSON.parse(r.stdout.trim());
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Requests that waited for a hold: those slower than `ms`, which must all end close together. */
function heldSpread(res: HoldLoad, ms: number): { n: number; spread: number } {
  const held = res.slow.filter((s) => s.ms >= ms);
  if (!held.length) return { n: 0, spread: 0 };
  const ends = held.map((s) => s.end);
  return { n: held.length, spread: Math.max(...ends) - Math.min(...ends) };
}

test('pause holds new connections under load, resume lets them all in at once; 0 failed', async () => {
  await inWorld(async (w) => {
    const ports = await freePorts(2);
    const first = await w.pf(deployArgs(ports, [], ['--version', 'v1']));
    assert.is(first.code, 0, show(first));
    const load = await holdLoad(w.ns, 'server', '127.0.0.1');
    // open connections keep flowing during a pause: keep-alive requests on them are not held
    const kept = await startLoad(w.ns, 'server', {
      url: 'http://127.0.0.1:80/',
      mode: 'keepalive',
      concurrency: 2,
      durationMs: 40_000,
    });
    await sleep(500);
    const p = await w.pf(['pause', 'web', '--timeout', '30s']);
    assert.is(p.code, 0, show(p));
    const saved = await w.save();
    assert.match(
      saved,
      /-A PF-web -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -m conntrack --ctstate NEW -j NFQUEUE --queue-num 3\d{4} --queue-bypass/,
    );
    await sleep(2500);
    const s = await w.pf(['status', '--json']);
    assert.is(s.code, 0, show(s));
    const hold = JSON.parse(s.stdout).apps[0].hold;
    assert.is(hold.reason, 'pause');
    assert.ok(hold.alive, JSON.stringify(hold));
    assert.ok(
      hold.waiting >= 1 && hold.waiting <= 64,
      `the 4 clients wait (with their SYN retransmits): ${hold.waiting}`,
    );
    const human = await w.pf(['status']);
    assert.match(human.stderr + human.stdout, /web: paused, \d+ new connections? waiting/);
    const holder = holderPid(w)!;
    const r = await w.pf(['resume', 'web']);
    assert.is(r.code, 0, show(r));
    assert.match(r.stderr, /release.*\d+ connections? released/);
    await waitFor(() => !alive(holder), 5000, 'the holder exits after resume');
    assert.not.match(await w.save(), /NFQUEUE/);
    assert.not.ok(state(w).hold);
    await sleep(500);
    const res = await load.stop();
    assert.is(res.failed, 0, JSON.stringify(res));
    const { n, spread } = heldSpread(res, 1000);
    assert.ok(n >= 4, `every client waited for the pause: ${JSON.stringify(res.slow)}`);
    assert.ok(spread < 400, `held requests answered together (spread ${spread} ms): ${JSON.stringify(res.slow)}`);
    assert.ok(res.ok > n, 'requests flowed before and after the pause');
    const ka = await kept.stop();
    assert.is(ka.failed, 0, JSON.stringify(ka));
    assert.ok(ka.max < 1500, `keep-alive requests were not held by a pause of over 2.5 s (max ${ka.max} ms)`);
  });
});

test('pause --timeout: the holder releases on its own, and the next command removes the rule', async () => {
  await inWorld(async (w) => {
    const ports = await freePorts(2);
    assert.is((await w.pf(deployArgs(ports, [], ['--version', 'v1']))).code, 0);
    const p = await w.pf(['pause', 'web', '--timeout', '3s']);
    assert.is(p.code, 0, show(p));
    const t0 = Date.now();
    const body = await get(w.ns, 'http://127.0.0.1:80/');
    const waited = Date.now() - t0;
    assert.is(body, 'v1');
    assert.ok(waited >= 1000, `the request waited for the timeout (${waited} ms)`);
    const again = await w.pf(['pause', 'web', '--timeout', '1s', '--dry-run']);
    assert.is(again.code, 0, show(again));
    await sleep(1000);
    const st = await w.pf(['resume', 'web']);
    assert.is(st.code, 0, show(st));
    assert.match(st.stderr, /its time is up|not paused/);
    assert.not.match(await w.save(), /NFQUEUE/);
    // stop during a pause ends the holder too, rather than leaving it to its own timeout
    assert.is((await w.pf(['pause', 'web', '--timeout', '10m'])).code, 0);
    const holder = holderPid(w)!;
    assert.ok(holder && alive(holder), 'a holder holds');
    const s = await w.pf(['stop', 'web']);
    assert.is(s.code, 0, show(s));
    await waitFor(() => !alive(holder), 5000, 'the holder exits with stop');
    assert.not.match(await w.save(), /NFQUEUE/);
  });
});

test('a SIGKILLed holder black-holes nothing: SYNs pass (--queue-bypass), the next command removes the rule', async () => {
  await inWorld(async (w) => {
    const ports = await freePorts(2);
    assert.is((await w.pf(deployArgs(ports, [], ['--version', 'v1']))).code, 0);
    const load = await holdLoad(w.ns, 'server', '127.0.0.1');
    assert.is((await w.pf(['pause', 'web', '--timeout', '60s'])).code, 0);
    const pid = holderPid(w)!;
    await sleep(800);
    process.kill(pid, 'SIGKILL');
    await waitFor(() => !alive(pid), 5000, 'holder gone');
    // timed inside the client from connect() to connected: a retransmitted SYN would take 1 s or more
    const c = await connectMs(w);
    assert.ok(!c.error && c.ms < 900, `no SYN retransmit wait once the holder is gone: ${JSON.stringify(c)}`);
    assert.is(await get(w.ns, 'http://127.0.0.1:80/'), 'v1');
    assert.match(await w.save(), /NFQUEUE/, 'the rule is still there until a command runs');
    const s = await w.pf(['status', '--json']);
    assert.not.ok(JSON.parse(s.stdout).apps[0].hold.alive);
    const r = await w.pf(['resume', 'web']);
    assert.is(r.code, 0, show(r));
    assert.match(r.stderr, /holder \(pid \d+\) is gone/);
    assert.not.match(await w.save(), /NFQUEUE/);
    const res = await load.stop();
    // requests held when the holder died wait for their SYN retransmit; none fails
    assert.is(res.failed, 0, JSON.stringify(res));
  });
});

const IN_PLACE_STEPS = [
  'preflight',
  'hold',
  'stop-old',
  'start',
  'ready',
  'bind-check',
  'open',
  'switch',
  'release',
  'done',
];

for (const where of ['server', 'client'] as const) {
  const path = where === 'server' ? 'loopback clients (OUTPUT)' : 'clients over veth (PREROUTING)';
  test(`in-place deploy (one port) under load, 0 failed, held requests answered together: ${path}`, async () => {
    await inWorld(
      async (w) => {
        const [port] = await freePorts(1);
        const host = where === 'server' ? '127.0.0.1' : w.ns.serverAddr!;
        const first = await w.pf(deployArgs([port], [], ['--version', 'v1']));
        assert.is(first.code, 0, show(first));
        const load = await holdLoad(w.ns, where, host);
        const kept = await startLoad(w.ns, where, {
          url: `http://${host}:80/`,
          mode: 'keepalive',
          concurrency: 2,
          durationMs: 40_000,
        });
        await sleep(500);
        const r = await w.pf(deployArgs([port], ['--json'], ['--version', 'v2', '--start-delay', '1000']));
        assert.is(r.code, 0, show(r));
        const steps = events(r.stdout).filter((e) => e.kind === 'step');
        assert.equal(
          steps.map((e) => e.step),
          IN_PLACE_STEPS,
        );
        assert.ok(
          steps.every((e) => e.step === 'preflight' || e.step === 'hold' || e.port === port),
          'one port throughout',
        );
        await sleep(500);
        const res = await load.stop();
        assert.is(res.failed, 0, JSON.stringify(res));
        assert.equal(res.versions, ['v1', 'v2']);
        const { n, spread } = heldSpread(res, 900);
        assert.ok(n >= 1, `some requests waited for the restart: ${JSON.stringify(res.slow)}`);
        assert.ok(spread < 400, `held requests answered together (spread ${spread} ms): ${JSON.stringify(res.slow)}`);
        assert.ok(res.maxMs < 6000, `no request waited for a late SYN retransmit: max ${res.maxMs} ms`);
        const ka = await kept.stop();
        assert.is(ka.failed, 0, `keep-alive: ${JSON.stringify(ka)}`);
        assert.equal([...new Set(ka.versions)], ['v1', 'v2'], 'keep-alive clients moved to the new version');
        assert.not.match(await w.save(), /NFQUEUE/);
        const st = state(w);
        assert.not.ok(st.hold);
        assert.equal(
          st.instances.map((i: any) => [i.port, i.state]),
          [[port, 'active']],
        );
      },
      { peer: where === 'client' },
    );
  });
}

test('in-place deploy whose new version never gets ready: the previous command comes back, 0 failed, exit 1', async () => {
  await inWorld(async (w) => {
    const [port] = await freePorts(1);
    assert.is((await w.pf(deployArgs([port], [], ['--version', 'v1']))).code, 0);
    const oldPid = state(w).instances[0].pid;
    const load = await holdLoad(w.ns, 'server', '127.0.0.1');
    await sleep(300);
    const r = await w.pf(deployArgs([port], ['--ready-timeout', '2s'], ['--version', 'v2', '--never-listen']));
    assert.is(r.code, 1, show(r));
    assert.match(r.stderr, /undo: previous command running again on port \d+/);
    assert.match(r.stderr, /undo: held connections released/);
    await sleep(500);
    const res = await load.stop();
    assert.is(res.failed, 0, JSON.stringify(res));
    assert.equal(res.versions, ['v1']);
    const st = state(w);
    assert.not.ok(st.hold);
    assert.is(st.instances.length, 1);
    assert.is(st.instances[0].state, 'active');
    assert.is(st.instances[0].port, port);
    assert.is.not(st.instances[0].pid, oldPid, 'a fresh process of the previous command');
    assert.is(await get(w.ns, 'http://127.0.0.1:80/'), 'v1');
    assert.not.match(await w.save(), /NFQUEUE/);
  });
});

test('in-place deploy over IPv6 from another namespace: 0 failed, the hold rule in ip6tables too', async () => {
  await inWorld(
    async (w) => {
      const [port] = await freePorts(1);
      const first = await w.pf(deployArgs([port], ['--ipv6', 'on'], ['--version', 'v1']));
      assert.is(first.code, 0, show(first));
      const load = await holdLoad(w.ns, 'client', w.ns.serverAddr6!);
      await sleep(300);
      const dep = pfBackground(w, deployArgs([port], ['--ipv6', 'on'], ['--version', 'v2', '--start-delay', '1500']));
      // the hold rule goes into both families, ip6tables too
      const six = async () => (await w.ns.exec('ip6tables-save', ['-t', 'mangle'])).stdout;
      await waitFor(
        async () => /-j NFQUEUE --queue-num 3\d{4} --queue-bypass/.test(await six()),
        10_000,
        'the IPv6 hold',
      );
      const done = await dep.done;
      assert.is(done.code, 0, done.stderr);
      await sleep(500);
      const res = await load.stop();
      assert.is(res.failed, 0, JSON.stringify(res));
      assert.equal(res.versions, ['v1', 'v2']);
      const { n, spread } = heldSpread(res, 1200);
      assert.ok(n >= 1 && spread < 400, `held and answered together: ${JSON.stringify(res.slow)}`);
    },
    { peer: true },
  );
});

test('portflip SIGKILLed mid-hold: the holder lets go at once, the next command removes the rule and deploys', async () => {
  await inWorld(async (w) => {
    const [port] = await freePorts(1);
    assert.is((await w.pf(deployArgs([port], [], ['--version', 'v1']))).code, 0);
    const dep = pfBackground(w, deployArgs([port], [], ['--version', 'v2', '--start-delay', '30000']));
    await waitFor(() => state(w).instances.some((i: any) => i.state === 'candidate' && i.pid), 15_000, 'the candidate');
    const holder = holderPid(w)!;
    assert.ok(holder && alive(holder), 'a holder holds');
    dep.kill('SIGKILL');
    await dep.done.catch(() => {});
    // the holder watches its deploy: it releases at once and exits later
    // released at once: nothing listens on the port yet (the old instance stopped, the new one starts in 30 s),
    // so the connect is refused at once rather than held for the holder's timeout (minutes)
    const c = await connectMs(w);
    assert.ok(c.ms < 2500, `not held until the holder's timeout: ${JSON.stringify(c)}`);
    const r = await w.pf(deployArgs([port], [], ['--version', 'v3']));
    assert.is(r.code, 0, show(r));
    assert.match(r.stderr, /removing the in-place deploy hold/);
    assert.not.match(await w.save(), /NFQUEUE/);
    assert.is(await get(w.ns, 'http://127.0.0.1:80/'), 'v3');
    await waitFor(() => !alive(holder), 15_000, 'the old holder exits');
  });
});

test('portflip watch puts a flushed hold rule back while paused, and removes it once the holder is gone', async () => {
  await inWorld(async (w) => {
    const ports = await freePorts(2);
    assert.is((await w.pf(deployArgs(ports, [], ['--version', 'v1']))).code, 0);
    assert.is((await w.pf(['pause', 'web', '--timeout', '60s'])).code, 0);
    const watcher = w.pfSpawn(['watch', '--json']);
    let out = '';
    watcher.stdout!.on('data', (d) => (out += d));
    const queued = async () => /NFQUEUE/.test((await w.ns.exec('iptables-save', ['-t', 'mangle'])).stdout);
    try {
      await sleep(300);
      await w.sh('iptables -t mangle -F PF-web');
      // the watcher may put it back before we look: its repair event says it did
      await waitFor(
        async () => /"step":"repair"/.test(out) && (await queued()),
        5000,
        `the hold rule back
${out}`,
      );
      assert.match(out, /mangle: hold new connections in queue 3\d{4}/);
      process.kill(holderPid(w)!, 'SIGKILL');
      await waitFor(async () => !(await queued()), 5000, `the stale hold rule removed\n${out}`);
      assert.match(out, /holder \(pid \d+\) is gone/);
      await waitFor(() => !state(w).hold, 3000, 'the hold out of the state file');
      assert.is(await get(w.ns, 'http://127.0.0.1:80/'), 'v1');
    } finally {
      watcher.kill('SIGKILL');
    }
  });
});

test("an in-place deploy leaves another app's pause alone, and the mangle hooks single", async () => {
  await inWorld(async (w) => {
    const [port, a1, a2] = await freePorts(3);
    assert.is((await w.pf(deployArgs([port], [], ['--version', 'v1']))).code, 0);
    assert.is((await w.pf(deployArgs([a1, a2], [], ['--version', 'a1'], 'api', 81))).code, 0);
    assert.is((await w.pf(['pause', 'api', '--timeout', '60s'])).code, 0);
    const r = await w.pf(deployArgs([port], [], ['--version', 'v2']));
    assert.is(r.code, 0, show(r));
    const mangle = (await w.ns.exec('iptables-save', ['-t', 'mangle'])).stdout;
    assert.match(mangle, /-A PF-api .* -j NFQUEUE --queue-num 3\d{4} --queue-bypass/, mangle);
    assert.match(mangle, /-A PORTFLIP -p tcp -m tcp --dport 81 -j PF-api/, mangle);
    assert.not.match(mangle, /PF-web/, mangle);
    for (const hook of ['PREROUTING', 'OUTPUT'])
      assert.is(
        mangle.split('\n').filter((l) => l === `-A ${hook} -m addrtype --dst-type LOCAL -j PORTFLIP`).length,
        1,
        mangle,
      );
    assert.is(await get(w.ns, 'http://127.0.0.1:80/'), 'v2');
    assert.is((await w.pf(['resume', 'api'])).code, 0);
    assert.not.match((await w.ns.exec('iptables-save', ['-t', 'mangle'])).stdout, /PORTFLIP/);
  });
});

test.run();
