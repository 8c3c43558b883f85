// --keep-old keeps the previous instance for an instant rollback; a reaper retires it when its time is up.

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { freePorts, startLoad, waitFor, fixture } from '../helpers/netns.js';
import { inWorld, deployArgs, show, get, alive } from '../helpers/world.js';
import { events } from '../helpers/events.js';

test('rollback under load points back at the kept instance with zero failed requests', async () => {
  await inWorld(async (w) => {
    const ports = await freePorts(2);
    assert.is((await w.pf(deployArgs(ports, [], ['--version', 'v1']))).code, 0);
    const load = await startLoad(w.ns, 'server', { url: 'http://127.0.0.1:80/', mode: 'new', durationMs: 60_000 });
    const second = await w.pf(deployArgs(ports, ['--keep-old', '60s', '--json'], ['--version', 'v2']));
    assert.is(second.code, 0, show(second));
    assert.not.ok(
      events(second.stdout).some((e) => e.kind === 'signal'),
      'the kept instance got no signal',
    );
    const st = JSON.parse((await w.pf(['status', '--json'])).stdout).apps[0];
    assert.is(st.others.length, 1);
    assert.is(st.others[0].state, 'kept');
    assert.ok(st.others[0].keepUntil);
    assert.is(await get(w.ns, 'http://127.0.0.1:80/'), 'v2');

    const r = await w.pf(['rollback', 'web', '--json']);
    assert.is(r.code, 0, show(r));
    const rb = events(r.stdout).find((e) => e.step === 'rollback')!;
    // how fast the flip is belongs to the benchmark (the switch row of docs/benchmark.md), not to a pass/fail here
    assert.is(rb.status, 'ok', show(r));
    assert.equal(
      [rb.port, rb.pid],
      [st.others[0].port, st.others[0].pid],
      'the redirect went back to the kept instance',
    );
    assert.is(await get(w.ns, 'http://127.0.0.1:80/'), 'v1');
    const res = await load.stop();
    assert.is(res.failed, 0, JSON.stringify(res));
    assert.equal([...new Set(res.versions)], ['v1', 'v2']);
    assert.is(res.versions.at(-1), 'v1');
    const after = JSON.parse((await w.pf(['status', '--json'])).stdout).apps[0];
    assert.is(after.others.length, 0, 'the rolled-back instance was stopped');
    assert.is(after.rules, 'ok');

    const none = await w.pf(['rollback', 'web']);
    assert.is(none.code, 9, show(none));
    assert.match(none.stderr, /no kept previous instance.*--keep-old/);
  });
});

test('the detached reaper stops the kept instance when --keep-old runs out', async () => {
  await inWorld(async (w) => {
    const ports = await freePorts(2);
    const first = await w.pf(deployArgs(ports, ['--json'], ['--version', 'v1']));
    const oldPid = events(first.stdout).find((e) => e.step === 'start')!.pid as number;
    const r = await w.pf(deployArgs(ports, ['--keep-old', '2s'], ['--version', 'v2']));
    assert.is(r.code, 0, show(r));
    assert.match(r.stderr, /detached reaper \(pid \d+\)/);
    assert.ok(alive(oldPid), 'kept alive for now');
    await waitFor(() => !alive(oldPid), 10_000, 'the reaper to stop the kept instance');
    await waitFor(
      async () => JSON.parse((await w.pf(['status', '--json'])).stdout).apps[0].others.length === 0,
      5000,
      'the state to forget it',
    );
    assert.is(await get(w.ns, 'http://127.0.0.1:80/'), 'v2');
  });
});

test('--verify switches back to the old instance when the new one dies right after the switch', async () => {
  await inWorld(async (w) => {
    const ports = await freePorts(2);
    assert.is((await w.pf(deployArgs(ports, [], ['--version', 'v1']))).code, 0);
    const before = await w.save();
    const load = await startLoad(w.ns, 'server', { url: 'http://127.0.0.1:80/', mode: 'new', durationMs: 30_000 });
    // passes its checks, then dies 3 s later (time enough to be switched to on a busy machine)
    const dying = [
      '--',
      'sh',
      '-c',
      `${process.execPath} ${fixture('app.mjs')} --port $PORT --version v2 & p=$!; sleep 3; kill -9 $p`,
    ];
    const r = await w.pf([
      'deploy',
      'web',
      '--listen',
      '80',
      '--ports',
      ports.join(','),
      '--verify',
      '6s',
      '--json',
      ...dying,
    ]);
    assert.is(r.code, 1, show(r));
    assert.match(r.stderr, /during --verify; switched back/);
    const steps = events(r.stdout)
      .filter((e) => e.kind === 'step')
      .map((e) => `${e.step}:${e.status}`);
    assert.ok(steps.includes('switch:ok') && steps.includes('verify:failed'), steps.join());
    assert.is(await w.save(), before, 'the redirect is back on the old instance');
    assert.is(await get(w.ns, 'http://127.0.0.1:80/'), 'v1');
    const res = await load.stop();
    assert.ok(res.versions.includes('v2'), 'the new instance served for a while');
    assert.equal(res.versions.at(-1), 'v1');
    const st = JSON.parse((await w.pf(['status', '--json'])).stdout).apps[0];
    assert.is(st.active.state, 'active');
    assert.is(st.others.length, 0);
    // a healthy instance passes --verify and the old one is drained as usual
    const ok = await w.pf(deployArgs(ports, ['--verify', '1s'], ['--version', 'v3']));
    assert.is(ok.code, 0, show(ok));
    assert.is(await get(w.ns, 'http://127.0.0.1:80/'), 'v3');
  });
});

test('--dry-run prints the steps and exact rules and changes nothing', async () => {
  await inWorld(async (w) => {
    const before = await w.save();
    const r = await w.pf(deployArgs([8001, 8002], ['--dry-run'], ['--version', 'v1']));
    assert.is(r.code, 0, show(r));
    assert.match(r.stderr, /dry run, nothing is changed/);
    assert.match(r.stderr, /-A PF-web -p tcp -j REDIRECT --to-ports 8001/);
    assert.match(r.stderr, /-A PORTFLIP -p tcp -m tcp --dport 80 -j PF-web/);
    assert.match(
      r.stderr,
      /ipv4 rules[^]*--ctreplsrcport 8001 -j ACCEPT[^]*ipv6 rules/,
      'the filter accept, for both families',
    );
    // commit by commit, as the runner makes them: the open step's filter text, then the switch's nat text
    assert.match(
      r.stderr,
      /ipv4 rules, open step[^]*\*filter[^]*ipv4 rules, switch step[^]*\*nat[^]*REDIRECT --to-ports 8001/,
    );
    assert.is(await w.save(), before);
    assert.equal(JSON.parse((await w.pf(['status', '--json'])).stdout).apps, []);
  });
});

test.run();
