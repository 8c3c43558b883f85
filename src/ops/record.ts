// The one recorder of app history: runs a command's work, watches its step events and the state file
// before and after, and appends one record per app it changed (core/history.ts), then hands it to metrics.
//
// Recording never fails the command: a record that cannot be written is a notice, and the command's own
// result and error stand. The CLI wraps the commands that change an app; `portflip run` wraps its deploys,
// reloads, restarts and stop; the healer wraps its repairs.

import { fromSystemError, PortflipError } from '../core/errors.js';
import type { Event } from '../core/events.js';
import {
  appendHistory,
  DEPLOY_ACTIONS,
  type HistoryAction,
  type HistoryOrigin,
  type HistoryRecord,
  type HistorySide,
  type HistoryStep,
} from '../core/history.js';
import { appChain } from '../os/iptables.js';
import { listApps, readState, type AppState, type Instance } from '../core/state.js';
import type { Ctx } from './context.js';
import { publish } from './metrics.js';

export interface RecordAs {
  action: HistoryAction;
  by: HistoryOrigin;
  repaired?: string[]; // a repair: what was missing
}

type StepEvent = Extract<Event, { kind: 'step' }>;

/** Runs `fn` on one app with a ctx whose events are also collected; appends its record when it ends, ok or not. */
export async function recorded<T>(ctx: Ctx, app: string, as: RecordAs, fn: (ctx: Ctx) => Promise<T>): Promise<T> {
  if (!validName(app)) return fn(ctx); // the command refuses it; a bad name must not become a file name
  const started = { mono: ctx.sys.now(), wall: ctx.sys.wallNow() };
  const before = await stateOf(ctx, app);
  return watchingSteps(
    ctx,
    (e) => e.app === app,
    fn,
    async (seen, err) => {
      const after = await stateOf(ctx, app);
      // an app portflip never knew (a typo), a refused command line and a run refused for want of root leave no
      // history (nor a failed deploy in the metrics, which would page someone for a missing sudo)
      if ((before || after || seen.length) && !refused(err, seen, before, after))
        await keep(ctx, makeRecord(ctx, { app, as, started, before, after, steps: seen, err }));
    },
  );
}

/** For restore and cleanup, which work on every app: one record for each app the run changed. */
export async function recordedEvery<T>(ctx: Ctx, as: RecordAs, fn: (ctx: Ctx) => Promise<T>): Promise<T> {
  const started = { mono: ctx.sys.now(), wall: ctx.sys.wallNow() };
  const apps = await listApps(ctx.sys, ctx.paths).catch(() => [] as string[]);
  const before = new Map(await Promise.all(apps.map(async (a) => [a, await stateOf(ctx, a)] as const)));
  return watchingSteps(
    ctx,
    () => true,
    fn,
    async (seen, err) => {
      const now = await listApps(ctx.sys, ctx.paths).catch(() => [] as string[]);
      for (const app of [...new Set([...apps, ...now])].sort()) {
        const steps = seen.filter((e) => e.app === app || e.app === '*'); // cleanup's one step stands for every app
        const was = before.get(app) ?? null;
        const after = await stateOf(ctx, app);
        const changed =
          as.action === 'cleanup'
            ? steps.length > 0 // emitted once every rule is gone
            : steps.some((s) => s.step === 'repair' || s.status === 'failed') || differs(was, after);
        if (changed) await keep(ctx, makeRecord(ctx, { app, as, started, before: was, after, steps, err }));
      }
    },
  );
}

/** Runs `fn` with a ctx whose step events (those `mine` keeps) are also collected; `then` gets them and the error. */
async function watchingSteps<T>(
  ctx: Ctx,
  mine: (e: StepEvent) => boolean,
  fn: (ctx: Ctx) => Promise<T>,
  then: (seen: StepEvent[], err: unknown) => Promise<void>,
): Promise<T> {
  const seen: StepEvent[] = [];
  const watched: Ctx = { ...ctx, emit: (e) => (e.kind === 'step' && mine(e) && seen.push(e), ctx.emit(e)) };
  let err: unknown = null;
  try {
    return await fn(watched);
  } catch (caught) {
    err = caught;
    throw caught;
  } finally {
    await then(seen, err);
  }
}

interface Run {
  app: string;
  as: RecordAs;
  started: { mono: number; wall: number };
  before: AppState | null;
  after: AppState | null;
  steps: StepEvent[];
  err: unknown;
}

/** The record of one run on one app, from what it emitted and the state it left. */
export function makeRecord(ctx: Ctx, run: Run): HistoryRecord {
  const { app, as, before, after, err } = run;
  const error = err === null ? null : asPortflipError(err);
  const failedStep = [...run.steps].reverse().find((s) => s.status === 'failed')?.step;
  // a deploy that fails with no failed step failed its preflight, which reports only success as a step
  const step = failedStep ?? (DEPLOY_ACTIONS.includes(as.action) ? 'preflight' : undefined);
  const from = side(as.action === 'abort' ? canaryOf(before) : activeOf(before));
  const to = side(newCanary(before, after) ?? activeOf(after));
  return {
    v: 1,
    app,
    action: as.action,
    by: as.by,
    startedAt: new Date(run.started.wall).toISOString(),
    durationMs: Math.round(ctx.sys.now() - run.started.mono),
    result: error ? 'failed' : 'ok',
    exitCode: error ? error.exitCode : 0,
    ...(error ? { error: { kind: error.kind, message: error.message, ...(step ? { step } : {}) } } : {}),
    ...(from ? { from } : {}),
    ...(to ? { to } : {}),
    steps: run.steps.map(toStep),
    ...(as.repaired ? { repaired: as.repaired } : {}),
  };
}

/** Appends and publishes; neither may fail the command it records. */
async function keep(ctx: Ctx, record: HistoryRecord): Promise<void> {
  try {
    await appendHistory(ctx.sys, ctx.paths, record);
  } catch (err) {
    const why = fromSystemError(err)?.message ?? (err as Error)?.message ?? String(err);
    ctx.emit({ kind: 'notice', app: record.app, message: `could not write its history record: ${why}` });
    return;
  }
  try {
    await publish(ctx, record);
  } catch (err) {
    ctx.emit({ kind: 'notice', app: record.app, message: `could not publish metrics: ${(err as Error)?.message}` });
  }
}

/** The state file, or null when there is none or it cannot be read (a bad one is the command's to report). */
const stateOf = (ctx: Ctx, app: string) => readState(ctx.sys, ctx.paths, app).catch(() => null);

const activeOf = (st: AppState | null) => st?.instances.find((i) => i.state === 'active');
const canaryOf = (st: AppState | null) => st?.instances.find((i) => i.state === 'canary');

/** A canary the run started: a canary deploy's "to" is the canary, not the instance that still serves most. */
function newCanary(before: AppState | null, after: AppState | null): Instance | undefined {
  const c = canaryOf(after);
  return c && c.pid !== canaryOf(before)?.pid ? c : undefined;
}

function side(i: Instance | undefined): HistorySide | undefined {
  if (!i) return undefined;
  return {
    port: i.port,
    pid: i.pid,
    command: i.command,
    ...(i.label ? { label: i.label } : {}),
    ...(i.configHash ? { configHash: i.configHash } : {}),
  };
}

function toStep(e: StepEvent): HistoryStep {
  return {
    step: e.step,
    status: e.status,
    durationMs: Math.round(e.durationMs),
    ...(e.detail ? { detail: e.detail } : {}),
    ...(e.port ? { port: e.port } : {}),
    ...(e.pid ? { pid: e.pid } : {}),
  };
}

/** Two states alike but for when they were written. */
const differs = (a: AppState | null, b: AppState | null) =>
  JSON.stringify(a && { ...a, updatedAt: '' }) !== JSON.stringify(b && { ...b, updatedAt: '' });

function validName(app: string): boolean {
  try {
    appChain(app);
    return true;
  } catch {
    return false;
  }
}

/** Nothing was tried: a bad command line, or no root (checked before the first step, so nothing changed). */
const refused = (err: unknown, steps: StepEvent[], before: AppState | null, after: AppState | null) =>
  err instanceof PortflipError &&
  (err.kind === 'usage' || (err.kind === 'notPrivileged' && !steps.length && !differs(before, after)));

function asPortflipError(err: unknown): PortflipError {
  if (err instanceof PortflipError) return err;
  return fromSystemError(err) ?? new PortflipError('internal', String((err as Error)?.message ?? err));
}
