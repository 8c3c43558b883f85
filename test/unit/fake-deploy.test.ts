// The deploy, drain and repair against the fake Sys: no root, no processes, virtual time.

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { restore } from '../../src/commands/restore.js';
import { rollback } from '../../src/commands/rollback.js';
import { stop } from '../../src/commands/stop.js';
import { deploy } from '../../src/commands/deploy.js';
import { PortflipError } from '../../src/core/errors.js';
import type { Event } from '../../src/core/events.js';
import { readState } from '../../src/core/state.js';
import { FAKE_PATHS, FakeSys, fakeCtx, fakeDeploy } from '../helpers/fakesys.js';

type StepEvent = Extract<Event, { kind: 'step' }>;
const steps = (events: Event[]) =>
  (events.filter((e) => e.kind === 'step') as StepEvent[]).map((e) => `${e.step}:${e.status}`);
const noticed = (events: Event[], re: RegExp) => events.some((e) => e.kind === 'notice' && re.test(e.message));
const DONE = ['preflight:ok', 'start:ok', 'ready:ok', 'bind-check:ok', 'open:ok', 'switch:ok'];
const signals = (events: Event[]) => events.filter((e) => e.kind === 'signal') as Extract<Event, { kind: 'signal' }>[];

test('a deploy starts the candidate, switches the redirect to it, and signals the old instance', async () => {
  const sys = new FakeSys();
  const first = fakeCtx(sys);
  await deploy(fakeDeploy(), first.ctx);
  assert.equal(steps(first.events), [...DONE, 'done:ok']);
  const v1 = sys.apps()[0];
  assert.is(sys.redirectTarget('web'), v1.port, 'port 80 points at the first instance');
  const accepts = sys.iptables.ipv4.filter.get('PF-web')!.rules;
  assert.ok(
    accepts.some((r) => r.includes(`--ctreplsrcport ${v1.port} -j ACCEPT`)),
    accepts.join('\n'),
  );

  const second = fakeCtx(sys);
  await deploy(fakeDeploy(), second.ctx);
  assert.equal(steps(second.events), [...DONE, 'drain:ok', 'done:ok']);
  const [v2] = sys.apps();
  assert.is.not(v2.port, v1.port);
  assert.is(sys.redirectTarget('web'), v2.port, 'the redirect points at the new port');
  assert.equal(
    v1.signals.map((s) => s.signal),
    ['SIGTERM'],
    'the old instance got its stop signal, once',
  );
  assert.is(sys.apps().length, 1, 'the old instance is gone');
  assert.equal(
    signals(second.events).map((s) => [s.pid, s.signal]),
    [[v1.pid, 'SIGTERM']],
  );
  const st = (await readState(sys, FAKE_PATHS, 'web'))!;
  assert.equal(
    st.instances.map((i) => [i.port, i.pid, i.state]),
    [[v2.port, v2.pid, 'active']],
  );
  const filter = sys.iptables.ipv4.filter.get('PF-web')!.rules.join('\n');
  assert.not.match(filter, new RegExp(`ctreplsrcport ${v1.port} `), 'the old port left the filter chain');
});

test('a candidate that is never ready fails at the deadline; it is killed and the rules stay', async () => {
  const sys = new FakeSys();
  await deploy(fakeDeploy(), fakeCtx(sys).ctx);
  const v1 = sys.apps()[0];
  sys.behave = () => ({ listenAfterMs: null, termExitMs: 100 });
  const { ctx, events } = fakeCtx(sys);
  const started = sys.now();
  const err = await deploy(fakeDeploy({ readyTimeoutMs: 3000 }), ctx).then(
    () => null,
    (e) => e,
  );
  assert.ok(err instanceof PortflipError && err.kind === 'deployFailed', String(err));
  assert.match(err.message, /was not ready on port \d+ after 3s \(--ready-timeout\)/);
  assert.ok(sys.now() - started >= 3000, 'the deadline is on the clock, not a count of tries');
  assert.equal(steps(events), ['preflight:ok', 'start:ok', 'ready:failed']);
  assert.ok(noticed(events, /^undo: stopped the candidate/));
  assert.equal(
    sys.apps().map((p) => p.pid),
    [v1.pid],
    'only the old instance runs',
  );
  assert.is(sys.redirectTarget('web'), v1.port, 'the redirect is untouched');
  assert.equal(v1.signals, [], 'the old instance was not signalled');
  const st = (await readState(sys, FAKE_PATHS, 'web'))!;
  assert.equal(
    st.instances.map((i) => [i.pid, i.state]),
    [[v1.pid, 'active']],
  );
});

test('drain escalates: SIGTERM, then SIGKILL for the group after --kill-after on the monotonic clock', async () => {
  const sys = new FakeSys();
  sys.behave = () => ({ listenAfterMs: 100, termExitMs: null }); // the first instance ignores SIGTERM
  await deploy(fakeDeploy(), fakeCtx(sys).ctx);
  const v1 = sys.apps()[0];
  sys.behave = () => ({ listenAfterMs: 100, termExitMs: 100 });
  const { ctx, events } = fakeCtx(sys);
  await deploy(fakeDeploy({ stop: { ...fakeDeploy().stop, killAfterMs: 4000 } }), ctx);
  assert.equal(
    v1.signals.map((s) => s.signal),
    ['SIGTERM', 'SIGKILL'],
  );
  const waited = v1.signals[1].at - v1.signals[0].at;
  assert.ok(waited >= 4000 && waited < 4500, `SIGKILL ${waited}ms after SIGTERM`);
  const sent = signals(events);
  assert.equal(
    sent.map((s) => s.signal),
    ['SIGTERM', 'SIGKILL'],
  );
  assert.match(sent[1].reason, /still running 4s after SIGTERM \(--kill-after\)/);
  assert.is(sys.apps().length, 1);
});

test('idle drain waits for open connections to close before the stop signal, bounded by --drain-timeout', async () => {
  const sys = new FakeSys();
  await deploy(fakeDeploy(), fakeCtx(sys).ctx);
  const v1 = sys.apps()[0];
  v1.connections = 2; // clients that never hang up
  const { ctx, events } = fakeCtx(sys);
  const before = sys.now();
  await deploy(fakeDeploy({ stop: { ...fakeDeploy().stop, drain: 'idle', drainTimeoutMs: 3000 } }), ctx);
  assert.ok(v1.signals[0].at - before >= 3000, 'the stop signal waited for the drain timeout');
  assert.ok(noticed(events, /still has 2 open connection\(s\) after --drain-timeout/));
  assert.equal(
    v1.signals.map((s) => s.signal),
    ['SIGTERM'],
  );
});

test('the next run repairs rules a firewall reload flushed, and says what was missing', async () => {
  const sys = new FakeSys();
  await deploy(fakeDeploy(), fakeCtx(sys).ctx);
  const v1 = sys.apps()[0];
  sys.flushRules();
  assert.is(sys.redirectTarget('web'), null);
  const { ctx, events } = fakeCtx(sys);
  await restore(ctx);
  assert.is(sys.redirectTarget('web'), v1.port, 'the redirect is back on the live instance');
  const repair = events.find((e) => e.kind === 'step' && e.step === 'repair') as StepEvent;
  assert.ok(repair, JSON.stringify(events));
  assert.ok(
    repair.missing!.some((m) => /nat: chain PF-web/.test(m)),
    repair.missing!.join('; '),
  );
  assert.is(
    sys.iptables.ipv4.filter.get('INPUT')!.rules[0],
    '-A INPUT -j PORTFLIP',
    'the filter hook is first in INPUT',
  );
  assert.equal(v1.signals, []);
});

test('the next run drops an instance that died and removes a redirect that points at nothing live', async () => {
  const sys = new FakeSys();
  await deploy(fakeDeploy(), fakeCtx(sys).ctx);
  const v1 = sys.apps()[0];
  v1.exit({ code: 1, signal: null });
  const { ctx, events } = fakeCtx(sys);
  await restore(ctx);
  assert.is(sys.redirectTarget('web'), null);
  assert.not.ok(sys.iptables.ipv4.nat.has('PF-web'), 'the app chain is gone');
  assert.ok(noticed(events, /active instance on port \d+ \(pid \d+\) is gone/));
  assert.equal((await readState(sys, FAKE_PATHS, 'web'))!.instances, []);
});

test('rollback points back at the kept instance in one commit and drains the one it leaves', async () => {
  const sys = new FakeSys();
  await deploy(fakeDeploy(), fakeCtx(sys).ctx);
  const [v1] = sys.apps();
  await deploy(fakeDeploy({ keepOldMs: 60_000 }), fakeCtx(sys).ctx);
  const v2 = sys.apps().find((p) => p !== v1)!;
  assert.equal(v1.signals, [], 'the kept instance was not signalled');
  assert.is(sys.redirectTarget('web'), v2.port);
  const { ctx, events } = fakeCtx(sys);
  await rollback(ctx, 'web');
  assert.equal(steps(events), ['rollback:ok', 'drain:ok']);
  assert.is(sys.redirectTarget('web'), v1.port);
  assert.equal(
    v2.signals.map((x) => x.signal),
    ['SIGTERM'],
  );
  assert.equal(
    sys.apps().map((p) => p.pid),
    [v1.pid],
  );
  const st = (await readState(sys, FAKE_PATHS, 'web'))!;
  assert.equal(
    st.instances.map((i) => [i.pid, i.state, i.keepUntil]),
    [[v1.pid, 'active', undefined]],
  );
});

test('stop with a foreign rule jumping to the app chain empties the chain, says so, and stops the instance', async () => {
  const sys = new FakeSys();
  await deploy(fakeDeploy(), fakeCtx(sys).ctx);
  const [v1] = sys.apps();
  sys.iptables.ipv4.nat.get('PREROUTING')!.rules.push('-A PREROUTING -p tcp -j PF-web');
  const { ctx, events } = fakeCtx(sys);
  await stop(ctx, 'web');
  assert.ok(noticed(events, /rules outside portflip still jump to PF-web \(-A PREROUTING -p tcp -j PF-web\)/));
  assert.equal(sys.iptables.ipv4.nat.get('PF-web')?.rules, [], 'left in place, empty');
  assert.not.ok(sys.iptables.ipv4.nat.has('PORTFLIP'), 'the root chain went');
  assert.equal(
    v1.signals.map((x) => x.signal),
    ['SIGTERM'],
  );
  assert.equal(sys.apps(), []);
  assert.is(await readState(sys, FAKE_PATHS, 'web'), null);
});

test.run();

test('status reads every app through the Sys seam: instances, their usage, and whether the rules agree', async () => {
  const { status } = await import('../../src/commands/status.js');
  const sys = new FakeSys();
  await deploy(fakeDeploy(), fakeCtx(sys).ctx);
  await deploy(fakeDeploy({ app: 'api', listen: 81 }), fakeCtx(sys).ctx);
  const pidOf = async (app: string) => (await readState(sys, FAKE_PATHS, app))!.instances[0].pid!;
  const [apiPid, webPid] = [await pidOf('api'), await pidOf('web')];
  let apps = await status(fakeCtx(sys).ctx);
  assert.equal(
    apps.map((a) => [a.app, a.active?.pid, a.active?.memory, a.rules]),
    [
      ['api', apiPid, 10 << 20, 'ok'],
      ['web', webPid, 10 << 20, 'ok'],
    ],
  );
  sys.flushRules();
  apps = await status(fakeCtx(sys).ctx, 'web');
  assert.is(apps[0].rules, 'missing', 'a flushed table is seen');
  sys.kill(webPid, 'SIGKILL');
  apps = await status(fakeCtx(sys).ctx, 'web');
  assert.is(apps[0].active, null);
  assert.equal(
    apps[0].others.map((i) => [i.state, i.cpu]),
    [['gone', null]],
    'a dead instance has no usage',
  );
});
