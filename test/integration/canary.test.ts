// Canary deploys for real: measured shares over veth, sticky client addresses, promote/abort under load, --canary-for, IPv6.

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import type { ChildProcess } from 'node:child_process';
import { natRules, parseSave, type AppSpec, type Family } from '../../src/os/iptables.js';
import { SERVER_ADDR, SERVER_ADDR6, fixture, freePorts, startLoad, waitFor, type Netns } from '../helpers/netns.js';
import { inWorld, deployArgs, show, get, alive, type World } from '../helpers/world.js';
import { events, waitEvent } from '../helpers/events.js';

type Counts = { byFrom: Record<string, Record<string, number>>; failed: number; firstErrors: string[]; done: number };

/** `count` new connections from the client namespace (from each of `from`, if given), counted by answer. */
async function count(ns: Netns, url: string, n: number, from: string[] = []): Promise<Counts> {
  const args = [
    fixture('count.mjs'),
    '--url',
    url,
    '--count',
    String(n),
    ...(from.length ? ['--from', from.join(',')] : []),
  ];
  const r = await ns.execClient(process.execPath, args);
  return JSON.parse(r.stdout.trim().split('\n').pop()!) as Counts;
}

const share = (c: Record<string, number>, v: string) =>
  (100 * (c[v] ?? 0)) / Object.values(c).reduce((a, b) => a + b, 0);
const status = async (w: World) => JSON.parse((await w.pf(['status', '--json'])).stdout).apps[0];

test('iptables-save prints every split exactly as portflip writes it (1-99%, by conn and ip, both families)', async () => {
  await inWorld(async (w) => {
    const bad: string[] = [];
    for (const family of ['ipv4', 'ipv6'] as Family[]) {
      const tool = family === 'ipv4' ? 'iptables' : 'ip6tables';
      for (const by of ['conn', 'ip'] as const) {
        // one app chain per share (PF-s1 ... PF-s99), all in one restore and one save
        const specs: AppSpec[] = Array.from({ length: 99 }, (_, i) => ({
          app: `s${i + 1}`,
          listen: 80,
          target: 20000,
          open: [],
          firewall: null,
          canary: { port: 20001, percent: i + 1, by, rnd: 0x9e3779b9 },
        }));
        const text = [
          '*nat',
          ...specs.map((x) => `:PF-${x.app} - [0:0]`),
          ...specs.flatMap((x) => natRules(x, family)),
          'COMMIT',
          '',
        ];
        const r = await w.ns.exec(`${tool}-restore`, ['--noflush'], { input: text.join('\n') });
        assert.is(r.code, 0, r.stderr);
        const live = parseSave((await w.ns.exec(`${tool}-save`, ['-t', 'nat'])).stdout);
        for (const x of specs) {
          const got = live.nat.rules.filter((l) => l.startsWith(`-A PF-${x.app} `));
          if (got.join('\n') !== natRules(x, family).join('\n'))
            bad.push(`${family} ${by} ${x.canary!.percent}: ${got.join(' | ')}`);
        }
        await w.ns.exec(`${tool}-restore`, [], { input: '*nat\nCOMMIT\n' }); // empty the table for the next round
      }
    }
    assert.equal(bad.slice(0, 3), [], `${bad.length} splits print otherwise`);
  });
});

test('--canary 10% then 50%: measured shares over 2000 new connections each; promote under load, 0 failed', async () => {
  await inWorld(
    async (w) => {
      const ports = await freePorts(3);
      assert.is((await w.pf(deployArgs(ports, [], ['--version', 'v1']))).code, 0);
      const r = await w.pf(deployArgs(ports, ['--canary', '10%', '--json'], ['--version', 'v2']));
      assert.is(r.code, 0, show(r));
      const canaryPid = events(r.stdout).find((e) => e.step === 'start')!.pid as number;
      assert.ok(events(r.stdout).some((e) => e.step === 'canary' && e.status === 'ok'));

      // refused while the canary is live: one line, its own exit code, nothing changed
      const rulesBefore = await w.save();
      const refused = await w.pf(deployArgs(ports, [], ['--version', 'v3']));
      assert.is(refused.code, 12, show(refused));
      assert.match(
        refused.stderr.trim(),
        /^portflip: web has a live canary on port \d+ \(pid \d+\) \(10% of new connections\); finish it first: portflip promote web, or portflip abort web$/,
      );
      assert.is(await w.save(), rulesBefore);

      const url = `http://${SERVER_ADDR}:80/`;
      const ten = await count(w.ns, url, 2000);
      assert.is(ten.failed, 0, JSON.stringify(ten));
      const s10 = share(ten.byFrom.any, 'v2');
      assert.ok(Math.abs(s10 - 10) <= 5, `10%: measured ${s10.toFixed(1)}% (${JSON.stringify(ten.byFrom)})`);

      // status: the share and each side's open connections (held open by a keep-alive load)
      const hold = await startLoad(w.ns, 'client', {
        url,
        mode: 'keepalive',
        concurrency: 20,
        durationMs: 30_000,
        pauseMs: 20,
      });
      const st = await status(w);
      assert.equal([st.canary.percent, st.canary.by], [10, 'conn']);
      assert.is(st.others.find((i: { state: string }) => i.state === 'canary').pid, canaryPid);
      assert.ok(st.canary.connections.active + st.canary.connections.canary >= 20, JSON.stringify(st.canary));
      assert.is(st.rules, 'ok');
      const human = await w.pf(['status']);
      assert.match(human.stdout, /web: canary on port \d+ gets 10% of new connections \(\d+ open; \d+ on the active\)/);
      assert.is((await hold.stop()).failed, 0);

      const raised = await w.pf(['promote', 'web', '--canary', '50%']);
      assert.is(raised.code, 0, show(raised));
      assert.ok(alive(canaryPid));
      const fifty = await count(w.ns, url, 2000);
      assert.is(fifty.failed, 0, JSON.stringify(fifty));
      const s50 = share(fifty.byFrom.any, 'v2');
      assert.ok(Math.abs(s50 - 50) <= 5, `50%: measured ${s50.toFixed(1)}%`);

      // promote under keep-alive and new-connection load
      const ka = await startLoad(w.ns, 'client', { url, mode: 'keepalive', concurrency: 4, durationMs: 30_000 });
      const nc = await startLoad(w.ns, 'client', { url, mode: 'new', concurrency: 4, durationMs: 30_000 });
      const p = await w.pf(['promote', 'web', '--json']);
      assert.is(p.code, 0, show(p));
      assert.equal(
        events(p.stdout)
          .filter((e) => e.kind === 'step')
          .map((e) => e.step),
        ['promote', 'drain'],
      );
      await new Promise((res) => setTimeout(res, 1000));
      const [kr, nr] = [await ka.stop(), await nc.stop()];
      assert.is(kr.failed + nr.failed, 0, JSON.stringify({ kr, nr }));
      // (the loads' version lists flap at 50% and are capped, so the end state is counted apart)
      assert.equal((await count(w.ns, url, 100)).byFrom.any, { v2: 100 });
      const after = await status(w);
      assert.equal([after.active.pid, after.others.length, after.canary, after.rules], [canaryPid, 0, undefined, 'ok']);
      const next = await w.pf(deployArgs(ports, [], ['--version', 'v3']));
      assert.is(next.code, 0, show(next));
    },
    { peer: true },
  );
});

test('--canary-by ip: 40 client addresses each see one version on every request, some on each side; abort under load, 0 failed', async () => {
  await inWorld(
    async (w) => {
      const ports = await freePorts(3);
      const addrs = Array.from({ length: 40 }, (_, i) => `10.231.0.${100 + i}`);
      const add = await w.ns.execClient('ip', ['-batch', '-'], {
        input: addrs.map((a) => `addr add ${a}/24 dev pf-c`).join('\n') + '\n',
      });
      assert.is(add.code, 0, add.stderr);
      assert.is((await w.pf(deployArgs(ports, [], ['--version', 'v1']))).code, 0);
      const r = await w.pf(deployArgs(ports, ['--canary', '30%', '--canary-by', 'ip', '--json'], ['--version', 'v2']));
      assert.is(r.code, 0, show(r));
      const canaryPid = events(r.stdout).find((e) => e.step === 'start')!.pid as number;
      const url = `http://${SERVER_ADDR}:80/`;
      const c = await count(w.ns, url, 12, addrs);
      assert.is(c.failed, 0, JSON.stringify(c));
      const mixed = addrs.filter((a) => Object.keys(c.byFrom[a] ?? {}).length !== 1);
      assert.equal(
        mixed,
        [],
        `addresses that saw both versions: ${mixed.map((a) => `${a} ${JSON.stringify(c.byFrom[a])}`)}`,
      );
      const onCanary = addrs.filter((a) => c.byFrom[a]?.v2).length;
      assert.ok(onCanary >= 1 && onCanary <= 39, `${onCanary} of 40 addresses on the canary`);
      assert.is((await status(w)).canary.by, 'ip');

      // the same addresses keep their side when the share grows (the hash seed stays)
      assert.is((await w.pf(['promote', 'web', '--canary', '60%'])).code, 0);
      const c2 = await count(w.ns, url, 4, addrs);
      const moved = addrs.filter((a) => c.byFrom[a]?.v2 && !c2.byFrom[a]?.v2);
      assert.equal(moved, [], 'a client on the canary at 30% stays there at 60%');

      // abort under keep-alive and new-connection load
      const ka = await startLoad(w.ns, 'client', { url, mode: 'keepalive', concurrency: 4, durationMs: 30_000 });
      const nc = await startLoad(w.ns, 'client', { url, mode: 'new', concurrency: 4, durationMs: 30_000 });
      const a = await w.pf(['abort', 'web', '--json']);
      assert.is(a.code, 0, show(a));
      await new Promise((res) => setTimeout(res, 1000));
      const [kr, nr] = [await ka.stop(), await nc.stop()];
      assert.is(kr.failed + nr.failed, 0, JSON.stringify({ kr, nr }));
      assert.equal((await count(w.ns, url, 100)).byFrom.any, { v1: 100 });
      await waitFor(() => !alive(canaryPid), 15_000, 'the canary to stop');
      const st = await status(w);
      assert.equal([st.others.length, st.canary, st.rules], [0, undefined, 'ok']);
      const none = await w.pf(['abort', 'web']);
      assert.is(none.code, 9, show(none));
      assert.match(none.stderr, /no live canary to abort/);
      assert.not.match(await w.save(), /HMARK|statistic/, 'no split left');
    },
    { peer: true },
  );
});

test('--canary-for promotes on its own after passing checks, and aborts on its own when the canary is killed', async () => {
  await inWorld(
    async (w) => {
      const ports = await freePorts(3);
      assert.is((await w.pf(deployArgs(ports, [], ['--version', 'v1']))).code, 0);
      const ok = await w.pf(
        deployArgs(ports, ['--canary', '50%', '--canary-for', '2s', '--json'], ['--version', 'v2']),
      );
      assert.is(ok.code, 0, show(ok));
      const steps = events(ok.stdout)
        .filter((e) => e.kind === 'step')
        .map((e) => e.step);
      assert.equal(steps.slice(-5), ['canary', 'promote', 'drain', 'canary-for', 'done']);
      assert.is(await get(w.ns, `http://${SERVER_ADDR}:80/`, 'client'), 'v2');
      assert.is((await status(w)).others.length, 0);

      const child = w.pfSpawn(deployArgs(ports, ['--canary', '50%', '--canary-for', '60s'], ['--version', 'v3']));
      let stderr = '';
      child.stderr!.on('data', (d) => (stderr += d));
      const exited = new Promise<number | null>((res) => child.on('exit', (code) => res(code)));
      let canaryPid = 0;
      await waitFor(
        async () => {
          const st = await status(w).catch(() => null);
          canaryPid = st?.canary ? st.others.find((i: { state: string }) => i.state === 'canary').pid : 0;
          return !!canaryPid;
        },
        20_000,
        'the canary to get its share',
      );
      process.kill(canaryPid, 'SIGKILL');
      const code = await exited;
      assert.is(code, 1, stderr);
      assert.match(stderr, /exited during --canary-for; aborted: every new connection goes to port \d+/);
      assert.is(await get(w.ns, `http://${SERVER_ADDR}:80/`, 'client'), 'v2');
      const st = await status(w);
      assert.equal([st.active.state, st.others.length, st.rules, st.canary], ['active', 0, 'ok', undefined]);
    },
    { peer: true },
  );
});

test('SIGKILL during a canary deploy and during promote: 0 failed under load, the next runs repair', async () => {
  await inWorld(
    async (w) => {
      const ports = await freePorts(3);
      const first = await w.pf(deployArgs(ports, ['--json'], ['--version', 'v1']));
      const v1 = events(first.stdout).find((e) => e.step === 'start')!.pid as number;
      const url = `http://${SERVER_ADDR}:80/`;
      const loads = await Promise.all([
        startLoad(w.ns, 'client', { url, mode: 'new', durationMs: 60_000 }),
        startLoad(w.ns, 'client', { url, mode: 'keepalive', durationMs: 60_000 }),
      ]);
      const dep = w.pfSpawn(
        deployArgs(ports, ['--canary', '50%', '--canary-for', '60s', '--json'], ['--version', 'v2']),
      );
      const v2 = (await waitEvent(dep, (e) => e.step === 'canary' && e.status === 'ok')).pid as number;
      dep.kill('SIGKILL');
      const st = await status(w);
      assert.equal([st.canary?.percent, st.rules], [50, 'ok'], JSON.stringify(st));
      const rs = await w.pf(['restore']);
      assert.is(rs.code, 0, show(rs));
      assert.match(rs.stderr, /took over a stale lock/);
      assert.match(await w.save(), /-m statistic --mode random --probability 0\.50000000000 -j REDIRECT/);

      const pro = w.pfSpawn(['promote', 'web', '--json']);
      await waitEvent(pro, (e) => e.step === 'promote' && e.status === 'ok');
      pro.kill('SIGKILL');
      const again = await w.pf(['abort', 'web']);
      assert.is(again.code, 9, `the promote stands: ${show(again)}`);
      const fin = await w.pf(['restore']); // a draining instance left by a killed run is finished by the next run
      assert.is(fin.code, 0, show(fin));
      await waitFor(() => !alive(v1), 15_000, 'the old instance to be drained and stopped');
      const after = await status(w);
      assert.equal([after.active.pid, after.others.length, after.canary, after.rules], [v2, 0, undefined, 'ok']);
      await new Promise((res) => setTimeout(res, 500));
      const [nr, kr] = await Promise.all(loads.map((l) => l.stop()));
      assert.is(nr.failed + kr.failed, 0, JSON.stringify({ nr, kr }));
      assert.equal((await count(w.ns, url, 50)).byFrom.any, { v2: 50 });
    },
    { peer: true },
  );
});

test('IPv6: the split works the same way over [fd31::1], by connection and by client address; restore recreates it', async () => {
  await inWorld(
    async (w) => {
      const ports = await freePorts(3);
      assert.is((await w.pf(deployArgs(ports, ['--ipv6', 'on'], ['--version', 'v1']))).code, 0);
      const r = await w.pf(deployArgs(ports, ['--ipv6', 'on', '--canary', '50%'], ['--version', 'v2']));
      assert.is(r.code, 0, show(r));
      const c = await count(w.ns, `http://[${SERVER_ADDR6}]:80/`, 1000);
      assert.is(c.failed, 0, JSON.stringify(c));
      const s = share(c.byFrom.any, 'v2');
      assert.ok(Math.abs(s - 50) <= 5, `IPv6 50%: measured ${s.toFixed(1)}%`);
      const before = await w.save();
      assert.is(
        before.match(/-m statistic --mode random --probability 0\.50000000000 -j REDIRECT/g)?.length,
        2,
        'the split in both families',
      );
      await w.sh('iptables -t nat -F PF-web; ip6tables -t nat -F PF-web');
      const rs = await w.pf(['restore']);
      assert.is(rs.code, 0, show(rs));
      assert.is(await w.save(), before, 'restore wrote the same split back, in both families');

      // by client address over IPv6: 16 addresses on the client end, each on one side every time
      assert.is((await w.pf(['abort', 'web'])).code, 0);
      const addrs = Array.from({ length: 16 }, (_, i) => `fd31::${(0x100 + i).toString(16)}`);
      const add = await w.ns.execClient('ip', ['-batch', '-'], {
        input: addrs.map((a) => `addr add ${a}/64 dev pf-c nodad`).join('\n') + '\n',
      });
      assert.is(add.code, 0, add.stderr);
      const ip = await w.pf(
        deployArgs(ports, ['--ipv6', 'on', '--canary', '50%', '--canary-by', 'ip'], ['--version', 'v3']),
      );
      assert.is(ip.code, 0, show(ip));
      assert.match(await w.save(), /HMARK --hmark-src-prefix 128 /);
      const c6 = await count(w.ns, `http://[${SERVER_ADDR6}]:80/`, 6, addrs);
      assert.is(c6.failed, 0, JSON.stringify(c6));
      const mixed = addrs.filter((a) => Object.keys(c6.byFrom[a] ?? {}).length !== 1);
      assert.equal(mixed, [], `IPv6 addresses that saw both versions: ${JSON.stringify(c6.byFrom)}`);
      const onCanary = addrs.filter((a) => c6.byFrom[a]?.v3).length;
      assert.ok(onCanary >= 1 && onCanary <= 15, `${onCanary} of 16 IPv6 addresses on the canary`);
    },
    { peer: true },
  );
});

test.run();
