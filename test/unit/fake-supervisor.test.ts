// `portflip run` against the fake Sys: crash restarts back off 1s, 2s, 4s ... 30s, and start over after 60s up.
//
// The loop, its deploys, its health checks and its clock are the real ones on the fake; only the control
// socket is real (a unix socket in a temp dir: it is a server, not an OS call behind Sys).

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Event } from '../../src/core/events.js';
import { readState, takeLock } from '../../src/core/state.js';
import { readHistory } from '../../src/core/history.js';
import { supervise } from '../../src/commands/supervisor.js';
import { FAKE_PATHS, FakeSys, fakeCtx, fakeDeploy } from '../helpers/fakesys.js';

test('crash restarts back off 1s, 2s, 4s ... at most 30s, and the streak starts over after 60s up', async () => {
  const runDir = await mkdtemp(join(tmpdir(), 'pf-fake-run-'));
  const sys = new FakeSys();
  let spawned = 0;
  sys.behave = () => {
    spawned++;
    // eight instances crash a second after they start, the ninth after 61s, the tenth stays up
    const exitAfterMs = spawned <= 8 ? 1000 : spawned === 9 ? 61_000 : undefined;
    return { listenAfterMs: 100, termExitMs: 100, exitAfterMs };
  };
  const { ctx, events } = fakeCtx(sys);
  const paths = { ...FAKE_PATHS, runDir };
  const timed: { at: number; e: Event }[] = [];
  const emit = (e: Event) => {
    events.push(e);
    timed.push({ at: sys.now(), e });
    const restarted = events.filter((x) => x.kind === 'supervisor' && x.action === 'restarted').length;
    // after the tenth instance is up, ask the supervisor to stop, as systemctl stop would
    const tenthUp = e.kind === 'supervisor' && e.action === 'restarted' && restarted === 9;
    if (tenthUp) setImmediate(() => process.emit('SIGTERM', 'SIGTERM'));
  };
  try {
    await supervise({ app: 'web', load: async () => fakeDeploy() }, { ...ctx, paths, emit });
  } finally {
    await rm(runDir, { recursive: true, force: true });
  }
  const crashes = timed.filter((t) => t.e.kind === 'crash') as { at: number; e: Extract<Event, { kind: 'crash' }> }[];
  assert.equal(
    crashes.map((c) => c.e.restartInMs),
    [1000, 2000, 4000, 8000, 16_000, 30_000, 30_000, 30_000, 1000],
  );
  assert.ok(crashes[8].e.upMs >= 60_000, `the ninth was up ${crashes[8].e.upMs}ms`);
  // each restart waits its backoff on the clock, no less
  const restarts = timed.filter((t) => t.e.kind === 'supervisor' && t.e.action === 'restart');
  assert.is(restarts.length, 9);
  restarts.forEach((r, i) => {
    const waited = r.at - crashes[i].at;
    const due = crashes[i].e.restartInMs;
    assert.ok(waited >= due && waited < due + 500, `restart ${i + 1} after ${waited}ms, due after ${due}ms`);
  });
  const actions = events.filter((e) => e.kind === 'supervisor').map((e) => (e as { action: string }).action);
  assert.equal(actions.slice(-2), ['stopping', 'exit']);
  assert.equal(sys.apps(), [], 'stop stopped the last instance');
  assert.is(await readState(sys, paths, 'web'), null, 'and removed the state');
  assert.is(sys.redirectTarget('web'), null);
});

test("a stop that finds the app's lock held (watch healing it) waits for it, then stops the app", async () => {
  const runDir = await mkdtemp(join(tmpdir(), 'pf-fake-run-'));
  const sys = new FakeSys();
  sys.behave = () => ({ listenAfterMs: 100, termExitMs: 100 });
  const { ctx, events } = fakeCtx(sys);
  const paths = { ...FAKE_PATHS, runDir };
  let held = false;
  const emit = (e: Event) => {
    events.push(e);
    if (e.kind === 'step' && e.step === 'done' && !held) {
      held = true;
      // another portflip takes the lock for a moment, and systemctl stop arrives meanwhile
      setImmediate(async () => {
        const lock = await takeLock(sys, paths, 'web', 'heal web', () => {});
        process.emit('SIGTERM', 'SIGTERM');
        await sys.sleep(300);
        await lock.release();
      });
    }
  };
  try {
    await supervise({ app: 'web', load: async () => fakeDeploy() }, { ...ctx, paths, emit });
  } finally {
    await rm(runDir, { recursive: true, force: true });
  }
  assert.ok(held);
  assert.equal(sys.apps(), [], 'stop stopped the instance');
  assert.is(await readState(sys, paths, 'web'), null);
  const { records } = await readHistory(sys, paths, 'web');
  assert.equal(
    records.map((r) => `${r.action}:${r.result}`),
    ['deploy:ok', 'stop:ok'],
    'one stop, recorded once',
  );
});

test.run();
