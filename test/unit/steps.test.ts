// The step runner: undo registered before the action, run in reverse exactly once, failures of undo reported.

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import type { Event } from '../../src/core/events.js';
import { planSteps, runSteps, StepFailed, type Step } from '../../src/core/steps.js';
import type { Sys } from '../../src/os/sys.js';

const clock = { now: () => 0 } as unknown as Sys;

function harness() {
  const events: Event[] = [];
  const log: string[] = [];
  return { events, log, io: { app: 'web', sys: clock, emit: (e: Event) => events.push(e) } };
}

const step = (name: string, opts: Partial<Step<string[]>> = {}): Step<string[]> => ({
  name: name as Step<string[]>['name'],
  does: () => `does ${name}`,
  undo: `undo ${name}`,
  run: async (log, r) => {
    r.undo(`took back ${name}`, async () => void log.push(`undo ${name}`));
    log.push(name);
  },
  ...opts,
});

test('a failing step undoes what came before, newest first, once, and names the step', async () => {
  const h = harness();
  const steps = [
    step('start'),
    step('ready'),
    step('switch', {
      run: async (log, r) => {
        r.undo('half a switch', async () => void log.push('undo half'));
        throw new Error('boom');
      },
    }),
  ];
  const err = await runSteps(steps, h.log, h.io).catch((e) => e);
  assert.ok(err instanceof StepFailed);
  assert.is(err.step, 'switch');
  assert.equal(h.log, ['start', 'ready', 'undo half', 'undo ready', 'undo start']);
  const kinds = h.events.map((e) =>
    e.kind === 'step' ? `${e.step}:${e.status}` : e.kind === 'notice' ? e.message : e.kind,
  );
  assert.equal(kinds, [
    'start:ok',
    'ready:ok',
    'switch:failed',
    'undo: half a switch',
    'undo: took back ready',
    'undo: took back start',
  ]);
});

test('an undo that fails is reported and the rest still run', async () => {
  const h = harness();
  const steps = [
    step('start'),
    step('ready', {
      run: async (_l, r) =>
        r.undo('bad undo', async () => {
          throw new Error('nope');
        }),
    }),
    step('switch', {
      run: async () => {
        throw new Error('boom');
      },
    }),
  ];
  await runSteps(steps, h.log, h.io).catch(() => {});
  const notices = h.events.filter((e) => e.kind === 'notice').map((e) => (e as { message: string }).message);
  assert.equal(notices, ['undo FAILED: bad undo: nope; run portflip restore web', 'undo: took back start']);
});

test('a settling step ends the undo; soft steps fail as notices; skipped steps neither run nor plan', async () => {
  const h = harness();
  const steps = [
    step('switch'),
    step('after_switch', { settles: true, skip: () => true }),
    step('after_drain', {
      soft: true,
      run: async () => {
        throw new Error('hook broke');
      },
    }),
    step('drain', {
      run: async () => {
        throw new Error('late');
      },
    }),
  ];
  await runSteps(steps, h.log, h.io).catch(() => {});
  assert.equal(h.log, ['switch'], 'nothing undone past the settling step');
  assert.ok(
    h.events.some(
      (e) => e.kind === 'notice' && /hook broke; the after_drain step failed, the run goes on/.test(e.message),
    ),
  );
  assert.equal(
    planSteps(steps, []).map((p) => p.step),
    ['switch', 'after_drain', 'drain'],
  );
});

test.run();
