// portflip killed before every effect of a deploy, then the next run's repair: the invariant holds after each.
//
// Invariant (deploy.ts): the public port redirects to a live instance that passed its readiness
// check, or to nothing portflip created. After the repair no orphan runs: every live app process is
// the active instance. A further deploy then works, so nothing (a lock, a half state) is left stuck.

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { restore } from '../../src/commands/restore.js';
import { deploy } from '../../src/commands/deploy.js';
import type { StepName } from '../../src/core/events.js';
import type { DeployOptions } from '../../src/commands/deploy.js';
import { readState } from '../../src/core/state.js';
import { FAKE_PATHS, FakeSys, fakeCtx, fakeDeploy } from '../helpers/fakesys.js';

async function invariant(sys: FakeSys, where: string): Promise<void> {
  const target = sys.redirectTarget('web');
  const st = await readState(sys, FAKE_PATHS, 'web');
  const live = sys
    .apps()
    .map((p) => p.pid)
    .sort();
  const recorded = (st?.instances ?? []).map((i) => i.pid).sort();
  assert.equal(live, recorded, `${where}: live instances ${live} are not the recorded ones ${recorded} (orphans)`);
  const states = (st?.instances ?? []).map((i) => i.state);
  const settled = states.every((s) => s === 'active' || s === 'kept');
  assert.ok(settled, `${where}: left ${states} (a candidate or draining one)`);
  if (target !== null) {
    const p = sys.listener(target);
    assert.ok(p, `${where}: the redirect points at port ${target}, where nothing listens`);
    const active = st?.instances.find((i) => i.state === 'active');
    assert.is(active?.pid, p!.pid, `${where}: the state's active instance is the one the redirect reaches`);
  } else {
    assert.not.ok(sys.iptables.ipv4.nat.has('PF-web'), `${where}: an app chain without a redirect`);
    assert.not.ok(states.includes('active'), `${where}: an active instance nothing points at`);
  }
}

/** Runs `setup`, then the deploy dying before effect n, then restore and another deploy. Returns the steps reached. */
type Setup = (sys: FakeSys) => Promise<void>;

type Outcome = { died: boolean; reached: StepName[]; at: string };

/** The run after the death: `restore`, or straight away another deploy (whose preflight repairs first). */
type Next = 'restore' | 'deploy';

async function killedAt(n: number, setup: Setup, opts: Partial<DeployOptions>, next: Next): Promise<Outcome> {
  const sys = new FakeSys();
  await setup(sys);
  sys.killAt = sys.effects + n;
  const { ctx, events } = fakeCtx(sys);
  const err = await deploy(fakeDeploy(opts), ctx).then(
    () => null,
    (e) => e,
  );
  const reached = events.flatMap((e) => (e.kind === 'step' && e.status === 'ok' ? [e.step] : []));
  const died = sys.dead;
  const at = died ? sys.effectLog[sys.effectLog.length - 1] : 'completed';
  // a death at an effect whose failure is ignored (the lock's release) lets the deploy end "ok": dead all the same
  if (!died) assert.is(err, null, `kill ${n} beyond the last effect: the deploy should complete (${err})`);
  else
    assert.ok(
      err === null || /portflip was killed before/.test(err.message),
      `kill ${n}: failed with ${err}, not its death`,
    );
  sys.revive();
  await sys.advance(1000); // the restart takes a while: the candidate, if any, is listening by now
  if (next === 'restore') {
    await restore(fakeCtx(sys).ctx);
    await invariant(sys, `killed before effect ${n} (${at}), after restore`);
  }
  await deploy(fakeDeploy(), fakeCtx(sys).ctx);
  await invariant(sys, `killed before effect ${n} (${at}), after the next deploy`);
  assert.ok(sys.redirectTarget('web') !== null, 'the next deploy serves');
  return { died, reached, at };
}

/** Kills before effect 1, 2, ... until a deploy completes; every deploy step must have been cut short once. */
async function everyKillPoint(
  setup: Setup,
  want: StepName[],
  opts: Partial<DeployOptions> = {},
  next: Next = 'restore',
) {
  const reachedBeforeDeath = new Set<StepName>();
  let n = 1;
  for (; n < 500; n++) {
    const r = await killedAt(n, setup, opts, next);
    if (!r.died) break;
    // the step that was running when it died is the first not reached
    for (const s of want)
      if (!r.reached.includes(s)) {
        reachedBeforeDeath.add(s);
        break;
      }
  }
  assert.ok(n > 5 && n < 500, `${n} kill points`);
  assert.equal([...reachedBeforeDeath].sort(), [...want].sort(), 'a kill landed inside every step');
}

test('a first deploy killed before any of its effects leaves nothing, or one serving instance', async () => {
  await everyKillPoint(async () => {}, ['preflight', 'start', 'switch']);
});

const deployed: Setup = async (sys) => void (await deploy(fakeDeploy(), fakeCtx(sys).ctx));

test('a second deploy killed before any of its effects leaves one serving instance after repair', async () => {
  await everyKillPoint(deployed, ['preflight', 'start', 'switch', 'drain']);
});

test('a second deploy killed before any of its effects is repaired by the next deploy itself', async () => {
  await everyKillPoint(deployed, ['preflight', 'start', 'switch', 'drain'], {}, 'deploy');
});

test('a deploy with every hook, killed before each effect (hooks included), is repaired the same way', async () => {
  const hooks = { before_start: 'true', after_ready: 'true', after_switch: 'true', after_drain: 'true' };
  const all: StepName[] = [
    'preflight',
    'before_start',
    'start',
    'after_ready',
    'switch',
    'after_switch',
    'drain',
    'after_drain',
  ];
  await everyKillPoint(deployed, all, { hooks });
});

test('a deploy that first retires a kept instance, killed before each effect, is repaired the same way', async () => {
  const keptOne: Setup = async (sys) => {
    await deployed(sys);
    await deploy(fakeDeploy({ keepOldMs: 600_000 }), fakeCtx(sys).ctx);
  };
  await everyKillPoint(keptOne, ['preflight', 'retire', 'start', 'switch', 'drain']);
});

test.run();
