// Retiring an instance: drain and stop it, marking its answers Connection: close meanwhile; or later, by the reaper.

import { PortflipError } from '../core/errors.js';
import { move } from '../core/lifecycle.js';
import { instanceLabel, takeLock, writeState, type AppState, type Instance } from '../core/state.js';
import { markPort, type MarkHandle } from '../drain/drainmark.js';
import type { MarkStats } from '../drain/httpmark.js';
import type { Iptables } from '../os/iptables.js';
import { isAlive, readStat } from '../os/proc.js';
import { selfArgv } from '../os/self.js';
import { openIptables, type Ctx } from './context.js';
import { drainAndStop, drainModeOf } from './instance.js';
import { applySpec, wantedSpec } from './rules.js';

/**
 * Drains and stops one instance under the app's stop policy, keeping the state file true as it goes.
 * An idle drain marks the instance's answers Connection: close meanwhile (drainmark.ts, httpmark.ts).
 */
export async function retire(ctx: Ctx, st: AppState, inst: Instance, ipt?: Iptables): Promise<MarkReport | null> {
  move(inst, 'draining');
  await writeState(ctx.sys, ctx.paths, st);
  const marking = await startMarking(ctx, st, inst, ipt);
  let [stats, openAtSignal]: [MarkStats | null, number | null] = [null, null];
  const watch = marking && { ...marking.handle.watch, signalled: (open: number) => void (openAtSignal = open) };
  try {
    const written = () => writeState(ctx.sys, ctx.paths, st);
    await drainAndStop(ctx.sys, st.app, inst, st.stop, ctx.emit, written, watch ?? undefined);
  } finally {
    if (marking) stats = await endMarking(ctx, st, inst, marking);
  }
  st.instances = st.instances.filter((i) => i !== inst);
  await writeState(ctx.sys, ctx.paths, st);
  if (!stats) return null;
  const report: MarkReport = { ...(stats as MarkStats), openAtSignal };
  ctx.emit({ kind: 'marking', app: st.app, port: inst.port, pid: inst.pid, ...report });
  return report;
}

/** What marking did while one instance drained, with how many connections were open at its stop signal. */
export type MarkReport = MarkStats & { openAtSignal: number | null };

const MARK_LOCK_MS = 5000;

/**
 * Makes the app's marking rules say what its state says, one portflip at a time: the PF-MARK chains are
 * shared by every app, and two commits from views read side by side could declare a chain twice (which
 * empties it) or take it away under another app's new rule. The host-wide lock is held for one read and
 * one commit per family.
 */
export async function syncMarks(ctx: Ctx, ipt: Iptables, st: AppState): Promise<void> {
  const until = ctx.sys.now() + MARK_LOCK_MS;
  let lock;
  for (;;) {
    try {
      lock = await takeLock(ctx.sys, ctx.paths, MARK_LOCK, 'marking rules', (m) =>
        ctx.emit({ kind: 'notice', message: m }),
      );
      break;
    } catch (err) {
      if (!(err instanceof PortflipError && err.kind === 'lockHeld') || ctx.sys.now() > until) throw err;
      await ctx.sys.sleep(10);
    }
  }
  try {
    for (const f of ipt.families) await applySpec(ipt, f, wantedSpec(st, f), undefined, 'mangle');
  } finally {
    await lock.release();
  }
}

/** The lock file's name in the run directory: a dot, so it never names an app. */
const MARK_LOCK = '.marking';

/** Marks the instance's answers while it idle-drains: queue first, then the state entry, then the rules. */
async function startMarking(
  ctx: Ctx,
  st: AppState,
  inst: Instance,
  given?: Iptables,
): Promise<{ handle: MarkHandle; ipt: Iptables } | null> {
  const wanted = st.stop.markClose !== false && drainModeOf(st.stop, inst) === 'idle' && !inst.signalledAt;
  if (!wanted || !(await isAlive(ctx.sys, inst.pid, inst.startTime))) return null;
  const without = (why: string) =>
    ctx.emit({
      kind: 'notice',
      app: st.app,
      message:
        `${instanceLabel(inst)} drains without marking answers Connection: close (${why}); ` +
        'its keep-alive connections are waited for until they close, at most --drain-timeout',
    });
  let handle: MarkHandle;
  try {
    handle = await markPort(ctx.sys, inst.port);
  } catch (err) {
    return (without(`no packet queue: ${(err as Error).message}`), null);
  }
  try {
    const ipt = given ?? (await openIptables(ctx, st.backend));
    const self = await readStat(ctx.sys, ctx.sys.pid);
    inst.marking = { queue: handle.queue, pid: ctx.sys.pid, startTime: self?.startTime ?? null };
    // recorded before the rules go in: a run killed between the two leaves nothing the next one does not know
    await writeState(ctx.sys, ctx.paths, st);
    await syncMarks(ctx, ipt, st);
    return { handle, ipt };
  } catch (err) {
    await endMarking(ctx, st, inst, { handle, ipt: given }).catch(() => {});
    return (without((err as Error).message), null);
  }
}

/** Rules out first, then the state entry, then the queue: packets never meet a rule whose reader is gone. */
async function endMarking(
  ctx: Ctx,
  st: AppState,
  inst: Instance,
  m: { handle: MarkHandle; ipt?: Iptables },
): Promise<MarkStats> {
  const stats = structuredClone(m.handle.stats());
  if (inst.marking) {
    delete inst.marking;
    try {
      await syncMarks(ctx, m.ipt ?? (await openIptables(ctx, st.backend)), st);
      await writeState(ctx.sys, ctx.paths, st);
    } catch (err) {
      // the drain itself is over: rules left behind pass every packet (--queue-bypass) once this process is
      // gone, and the state file still names them, so the next run that takes the lock removes them
      const why = (err as Error).message;
      ctx.emit({
        kind: 'notice',
        app: st.app,
        message: `${instanceLabel(inst)}: marking rules left for the next run (${why})`,
      });
    }
  }
  await m.handle.end();
  return stats;
}

/** A detached helper that retires kept instances when their time is up, after this CLI has returned. */
export async function spawnReaper(ctx: Ctx, app: string): Promise<number | undefined> {
  // no reaper is no harm: the next portflip run retires what is due
  const [cmd, ...self] = selfArgv();
  const reaper = ctx.sys.spawn(cmd, [...self, '_reap', app], { env: ctx.env });
  return (await reaper.catch(() => null))?.pid;
}
