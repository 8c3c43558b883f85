// A command's hold on one deployed app: its lock, with what an earlier run left repaired first.

import { fail } from '../core/errors.js';
import { ensureDirs, readState, takeLock, type AppState, type Instance } from '../core/state.js';
import { causeOf, runSteps, type Step } from '../core/steps.js';
import type { Iptables } from '../os/iptables.js';
import { openIptables, type Ctx } from './context.js';
import { finishLeftovers, reconcile } from './reconcile.js';

/**
 * What every command on one deployed app does around its own work: the app must exist, its lock is
 * held, and (unless told not to: restore does it as its step) an earlier run's leftovers are repaired
 * first. `fn` gets the state as read under the lock.
 */
export async function underLock(
  ctx: Ctx,
  app: string,
  what: string,
  fn: (st: AppState, ipt: Iptables) => Promise<void>,
  reconcileFirst = true,
): Promise<void> {
  const recorded = await readState(ctx.sys, ctx.paths, app);
  const ipt = await openIptables(ctx, recorded?.backend);
  if (!recorded) fail('nothingToDo', `no app named "${app}" here (no state in ${ctx.paths.stateDir}); deploy it first`);
  await ensureDirs(ctx.sys, ctx.paths);
  const lock = await takeLock(ctx.sys, ctx.paths, app, `${what} ${app}`, (m) =>
    ctx.emit({ kind: 'notice', app, message: m }),
  );
  try {
    const st = (await readState(ctx.sys, ctx.paths, app))!;
    if (reconcileFirst) await reconcile(ctx, ipt, st);
    await fn(st, ipt);
  } finally {
    await lock.release();
  }
}

/** What rollback, stop and restore work on: the app's state under its lock, and its rules. */
export interface AppRun {
  ctx: Ctx;
  st: AppState;
  ipt: Iptables;
  kept?: Instance; // rollback: the instance it goes back to
  bad?: Instance; // rollback: the instance it leaves
  stopped: number;
  foreign: Set<string>; // stop: rules outside portflip that still jump to the app's chain
}

/** Runs steps on the app's state under its lock, after finding out what is real (unless the steps do that). */
export async function withApp(
  ctx: Ctx,
  app: string,
  what: string,
  steps: Step<AppRun>[],
  prepare?: (r: AppRun) => void,
  reconcileFirst = true,
): Promise<void> {
  await underLock(
    ctx,
    app,
    what,
    async (st, ipt) => {
      const r: AppRun = { ctx, st, ipt, stopped: 0, foreign: new Set() };
      prepare?.(r);
      await runSteps(steps, r, { app, sys: ctx.sys, emit: ctx.emit }).catch((err) => {
        throw causeOf(err);
      });
      await finishLeftovers(ctx, ipt, st);
    },
    reconcileFirst,
  );
}
