// In-place deploys against the fake Sys: what happens when the hold cannot start (no root, no kernel needed).

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { deploy } from '../../src/commands/deploy.js';
import { PortflipError } from '../../src/core/errors.js';
import type { Event } from '../../src/core/events.js';
import { readState } from '../../src/core/state.js';
import { FAKE_PATHS, FakeSys, fakeCtx, fakeDeploy } from '../helpers/fakesys.js';

type StepEvent = Extract<Event, { kind: 'step' }>;
const steps = (events: Event[]) =>
  (events.filter((e) => e.kind === 'step') as StepEvent[]).map((e) => `${e.step}:${e.status}`);
const ONE_PORT = { ports: [20001] };

test('one port with --keep-old or --verify is refused before preflight', async () => {
  const sys = new FakeSys();
  for (const over of [{ keepOldMs: 5000 }, { verifyMs: 2000 }]) {
    const err = await deploy(fakeDeploy({ ...ONE_PORT, ...over }), fakeCtx(sys).ctx).then(
      () => null,
      (e) => e,
    );
    assert.ok(err instanceof PortflipError && err.kind === 'usage', String(err));
    assert.match(err.message, /in-place restart/);
  }
  assert.is(await readState(sys, FAKE_PATHS, 'web'), null, 'nothing written');
});

test('an in-place deploy on a kernel without nfnetlink_queue changes nothing and says what to load', async () => {
  const sys = new FakeSys();
  await deploy(fakeDeploy(ONE_PORT), fakeCtx(sys).ctx);
  const [v1] = sys.apps();
  assert.is(v1.port, 20001, 'the first deploy with one port is an ordinary first deploy');
  for (let i = 0; i < 2; i++) {
    const { ctx, events } = fakeCtx(sys);
    const err = await deploy(fakeDeploy(ONE_PORT), ctx).then(() => null, (e) => e);
    assert.ok(err instanceof PortflipError && err.kind === 'noNfqueue', String(err));
    assert.match(err.message, /nfnetlink_queue/);
    assert.equal(steps(events), ['preflight:ok'], 'and the lock was released: the second try fails the same way');
  }
  assert.equal(
    sys.apps().map((p) => p.pid),
    [v1.pid],
  );
  assert.equal(v1.signals, [], 'the old instance was not touched');
  assert.is(sys.redirectTarget('web'), 20001);
});

test('a holder that never answers fails the hold step: the old instance keeps serving, no hold is left', async () => {
  const sys = new FakeSys();
  await deploy(fakeDeploy(ONE_PORT), fakeCtx(sys).ctx);
  const [v1] = sys.apps();
  // the kernel can queue: the proc file exists (with no queue bound)
  await sys.fs.mkdir('/proc/net/netfilter', 0o755);
  await sys.fs.write('/proc/net/netfilter/nfnetlink_queue', '', 0o444);
  const { ctx, events } = fakeCtx(sys);
  const err = await deploy(fakeDeploy(ONE_PORT), ctx).then(
    () => null,
    (e) => e,
  );
  assert.ok(err instanceof PortflipError, String(err));
  assert.match(err.message, /holder for queue 3\d{4} did not start/);
  assert.equal(steps(events), ['preflight:ok', 'hold:failed']);
  assert.equal(
    sys.apps().map((p) => p.pid),
    [v1.pid],
    'the holder was killed; the old instance runs',
  );
  assert.equal(v1.signals, []);
  const st = (await readState(sys, FAKE_PATHS, 'web'))!;
  assert.not.ok(st.hold);
  assert.equal(
    st.instances.map((i) => [i.port, i.state]),
    [[20001, 'active']],
  );
  assert.is(sys.redirectTarget('web'), 20001);
});

test.run();
