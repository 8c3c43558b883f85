// Holding new connections: `portflip pause`/`resume`, and the hold around an in-place deploy's restart.
//
// A hold is a detached holder process (holder.ts) reading an NFQUEUE, plus a mangle rule sending the
// public port's new-connection SYNs to that queue (iptables.ts holdRule). The state file records the
// hold before the rule goes in, so a portflip killed mid-hold is repaired by the next command
// (ops/reconcile.ts). Fail-safe: the rule carries --queue-bypass, so when the holder is gone SYNs
// pass as if there were no rule; the holder releases on its own when its time is up.

import { join } from 'node:path';
import { fail, PortflipError } from '../core/errors.js';
import { formatMs } from '../core/duration.js';
import { logTail } from '../ops/instance.js';
import type { Iptables } from '../os/iptables.js';
import { parseQueueStats } from '../os/nfqueue.js';
import { applySpec, wantedSpec } from '../ops/rules.js';
import { holdStands } from '../ops/reconcile.js';
import { instanceLabel } from '../core/state.js';
import { underLock } from '../ops/lock.js';
import { type Ctx } from '../ops/context.js';
import { isAlive, readStat } from '../os/proc.js';
import { holderArgv } from '../os/self.js';
import { listApps, readState, writeState, type AppState, type HoldState } from '../core/state.js';
import { causeOf, planSteps, runSteps, type Step } from '../core/steps.js';
import type { Sys } from '../os/sys.js';

/**
 * Queue length: how many SYNs the kernel keeps before it drops new ones (the client then retries
 * on its SYN retransmit, about 1 s later). Each held client also queues its own retransmits
 * (1 s, 3 s, 7 s ... into the hold), so this covers ~8000 clients for a restart of a few seconds.
 */
export const DEFAULT_QUEUE_LEN = 8192;
export const DEFAULT_PAUSE_MS = 60_000;
const QUEUE_BASE = 30000; // queue numbers portflip derives fall in 30000-39999
const HOLDER_START_MS = 5000;

/** The app's queue number: a hash of its name, moved on past numbers other apps or programs use. */
export function queueFor(app: string, taken: Set<number>): number {
  let h = 2166136261;
  for (const ch of app) h = Math.imul(h ^ ch.charCodeAt(0), 16777619) >>> 0;
  for (let i = 0; i < 10000; i++) {
    const q = QUEUE_BASE + ((h + i) % 10000);
    if (!taken.has(q)) return q;
  }
  return fail('noFreeQueue', 'no free NFQUEUE number in 30000-39999');
}

/** Queue numbers in use: other apps' holds, and queues some other program reads. */
async function takenQueues(ctx: Ctx, app: string): Promise<Set<number>> {
  const taken = new Set<number>();
  for (const other of await listApps(ctx.sys, ctx.paths)) {
    if (other === app) continue;
    const q = (await readState(ctx.sys, ctx.paths, other).catch(() => null))?.hold?.queue;
    if (q !== undefined) taken.add(q);
  }
  const proc = await ctx.sys.readText('/proc/net/netfilter/nfnetlink_queue');
  for (const s of parseQueueStats(proc ?? '')) taken.add(s.queue);
  return taken;
}

/** Says whether the kernel can queue packets at all, with the fix. */
export async function requireNfqueue(sys: Sys): Promise<void> {
  const modules = await sys.readText('/proc/net/netfilter/nfnetlink_queue');
  if (modules !== null) return;
  // the module loads on first use on most hosts; try once, then say what to do
  await sys.run('modprobe', ['nfnetlink_queue'], { output: 'ignore' }).catch(() => null);
  if ((await sys.readText('/proc/net/netfilter/nfnetlink_queue')) === null)
    fail(
      'noNfqueue',
      'holding connections needs the kernel module nfnetlink_queue (NFQUEUE), which is not available: ' +
        'run "modprobe nfnetlink_queue" (package linux-modules on minimal kernels), or deploy with two --ports',
    );
}

// ---- talking to the holder -------------------------------------------------------------------

export interface HolderAnswer {
  waiting: number;
  held: number;
  released: boolean;
  full: number;
  maxlen: number;
  untilMs: number;
}

/** One command to the holder's control socket; null when it does not answer. */
export async function askHolder(
  sys: Sys,
  socket: string,
  cmd: 'status' | 'release' | 'exit',
  timeoutMs = 2000,
): Promise<HolderAnswer | null> {
  const line = await sys.ask(socket, cmd, timeoutMs);
  try {
    return line ? (JSON.parse(line) as HolderAnswer) : null;
  } catch {
    return null;
  }
}

/** Starts the holder and waits until it reads its queue; the state records it before any rule is added. */
export async function startHolder(
  ctx: Ctx,
  st: AppState,
  reason: HoldState['reason'],
  timeoutMs: number,
  maxlen: number,
): Promise<HoldState> {
  await requireNfqueue(ctx.sys);
  const queue = queueFor(st.app, await takenQueues(ctx, st.app));
  const socket = join(ctx.paths.runDir, `${st.app}.hold.sock`);
  const log = join(ctx.paths.logDir, `${st.app}-holder.log`);
  const owner = reason === 'deploy' ? String(ctx.sys.pid) : '0';
  const [cmd, ...holder] = holderArgv();
  const args = [...holder, String(queue), String(maxlen), String(timeoutMs), socket, owner];
  const child = await ctx.sys.spawn(cmd, args, {
    env: ctx.env,
    log,
  });
  let exited = false;
  void child.exited.then(() => (exited = true));
  const hold: HoldState = {
    queue,
    pid: child.pid,
    startTime: (await readStat(ctx.sys, child.pid))?.startTime ?? null,
    socket,
    untilMs: ctx.sys.wallNow() + timeoutMs,
    maxlen,
    reason,
  };
  const until = ctx.sys.now() + HOLDER_START_MS;
  while (!(await askHolder(ctx.sys, socket, 'status', 500))) {
    if (exited || ctx.sys.now() > until) {
      ctx.sys.kill(child.pid, 'SIGKILL');
      const tail = (await logTail(ctx.sys, log, 5)).join(' | ');
      throw new PortflipError(
        'rules',
        `the holder for queue ${queue} did not start (${tail || 'no output'}); see ${log}`,
      );
    }
    await ctx.sys.sleep(20);
  }
  return hold;
}

/** Puts the hold rule in (both of the app's families) once the state names its holder. */
export async function applyHold(ctx: Ctx, ipt: Iptables, st: AppState, hold: HoldState | undefined): Promise<void> {
  if (hold) st.hold = hold;
  else delete st.hold;
  await writeState(ctx.sys, ctx.paths, st);
  for (const f of ipt.families) await applySpec(ipt, f, wantedSpec(st, f));
}

/**
 * Lets every held connection go: the holder accepts them all in one batch verdict and accepts every
 * later SYN at once, the rule goes, then the holder exits. Returns how many were waiting.
 */
export async function releaseHold(ctx: Ctx, ipt: Iptables, st: AppState): Promise<number> {
  const h = st.hold;
  if (!h) return 0;
  const answer = await askHolder(ctx.sys, h.socket, 'release');
  await applyHold(ctx, ipt, st, undefined);
  await askHolder(ctx.sys, h.socket, 'exit');
  // a holder that does not answer is told by signal (it releases on SIGTERM too)
  if (!answer && (await isAlive(ctx.sys, h.pid, h.startTime))) ctx.sys.kill(h.pid, 'SIGTERM');
  return answer?.waiting ?? 0;
}

/**
 * Ends a hold's holder once its rule is gone (stop, cleanup --stop-instances): what it held is let go
 * to a port that now refuses, and it exits rather than wait for its own timeout.
 */
export async function endHolder(sys: Sys, h: HoldState): Promise<void> {
  const answer = await askHolder(sys, h.socket, 'release');
  await askHolder(sys, h.socket, 'exit');
  if (!answer && (await isAlive(sys, h.pid, h.startTime))) sys.kill(h.pid, 'SIGTERM');
}

/** What status shows of a hold: why, how many wait, whether the queue overflowed. */
export interface HoldStatus {
  reason: HoldState['reason'];
  queue: number;
  pid: number;
  alive: boolean;
  waiting: number | null;
  full: number; // SYNs the kernel dropped because the queue was full (those clients retry)
  until: string;
}

export async function holdStatus(sys: Sys, st: AppState): Promise<HoldStatus | null> {
  const h = st.hold;
  if (!h) return null;
  const alive = await holdStands(sys, st, false);
  const answer = alive ? await askHolder(sys, h.socket, 'status', 1000) : null;
  return {
    reason: h.reason,
    queue: h.queue,
    pid: h.pid,
    alive,
    waiting: answer?.waiting ?? null,
    full: answer?.full ?? 0,
    until: new Date(h.untilMs).toISOString(),
  };
}

export const formatHold = (app: string, h: HoldStatus) =>
  `${app}: ${h.reason === 'pause' ? 'paused' : 'held for an in-place deploy'}` +
  (h.alive
    ? `, ${h.waiting ?? '?'} new connection${h.waiting === 1 ? '' : 's'} waiting (queue ${h.queue}, holder pid ${h.pid}), ` +
      `released at ${h.until} at the latest`
    : `, but its holder (pid ${h.pid}) is gone or timed out: SYNs pass; the next portflip command removes the rule`) +
  (h.full ? `; WARNING: the queue was full ${h.full} times (those clients retried after ~1 s)` : '');

// ---- pause and resume --------------------------------------------------------------------------

interface HoldRun {
  ctx: Ctx;
  st: AppState;
  ipt: Iptables;
  timeoutMs: number;
  maxlen: number;
  released: number;
}

const PAUSE: Step<HoldRun>[] = [
  {
    name: 'hold',
    does: (r) =>
      `start a holder and queue new connections to port ${r.st.listen} (mangle NFQUEUE, --queue-bypass), ` +
      `up to ${r.maxlen} SYNs, released after ${formatMs(r.timeoutMs)} at the latest`,
    undo: 'release what it holds, remove the rule, stop the holder',
    run: async (r, run) => {
      const hold = await startHolder(r.ctx, r.st, 'pause', r.timeoutMs, r.maxlen);
      run.undo('hold released', async () => {
        r.st.hold ??= hold;
        await releaseHold(r.ctx, r.ipt, r.st);
      });
      await applyHold(r.ctx, r.ipt, r.st, hold);
    },
    where: (r) => ({ port: r.st.listen, pid: r.st.hold?.pid }),
    detail: (r) => `queue ${r.st.hold?.queue}, until ${new Date(r.st.hold!.untilMs).toISOString()}`,
  },
];

const RESUME: Step<HoldRun>[] = [
  {
    name: 'release',
    does: (r) => `accept every held connection to port ${r.st.listen} at once, remove the hold rule, stop the holder`,
    undo: '',
    run: async (r) => void (r.released = await releaseHold(r.ctx, r.ipt, r.st)),
    where: (r) => ({ port: r.st.listen }),
    detail: (r) => `${r.released} connection${r.released === 1 ? '' : 's'} released`,
  },
];

export interface PauseOptions {
  timeoutMs: number;
  queueLen: number;
  dryRun: boolean;
}

const withHold = (ctx: Ctx, app: string, what: 'pause' | 'resume', fn: (r: HoldRun) => Promise<void>) =>
  underLock(ctx, app, what, (st, ipt) => fn({ ctx, st, ipt, timeoutMs: 0, maxlen: 0, released: 0 }));

const run = (steps: Step<HoldRun>[], r: HoldRun) =>
  runSteps(steps, r, { app: r.st.app, sys: r.ctx.sys, emit: r.ctx.emit }).catch((err) => {
    throw causeOf(err);
  });

export async function pause(ctx: Ctx, app: string, o: PauseOptions): Promise<void> {
  if (!(o.timeoutMs > 0)) fail('usage', '--timeout: give a duration above zero, like 30s');
  if (!Number.isInteger(o.queueLen) || o.queueLen < 1 || o.queueLen > 1_000_000)
    fail('usage', `--queue-len ${o.queueLen}: give a whole number of SYNs from 1 to 1000000`);
  if (o.dryRun) {
    const st = await readState(ctx.sys, ctx.paths, app);
    if (!st) return fail('nothingToDo', `no app named "${app}" here; deploy it first`);
    const r = { ctx, st, ipt: null as unknown as Iptables, timeoutMs: o.timeoutMs, maxlen: o.queueLen, released: 0 };
    return ctx.emit({ kind: 'plan', app, steps: planSteps(PAUSE, r), rules: [] });
  }
  await withHold(ctx, app, 'pause', async (r) => {
    if (r.st.hold?.reason === 'pause')
      fail(
        'nothingToDo',
        `"${app}" is already paused (until ${new Date(r.st.hold.untilMs).toISOString()}); resume it first`,
      );
    if (!r.st.instances.some((i) => i.state === 'active'))
      fail('nothingToDo', `"${app}" has no active instance: there is nothing to pause`);
    await run(PAUSE, { ...r, timeoutMs: o.timeoutMs, maxlen: o.queueLen });
    const active = r.st.instances.find((i) => i.state === 'active')!;
    ctx.emit({
      kind: 'notice',
      app,
      message:
        `new connections to port ${r.st.listen} wait (open ones to ${instanceLabel(active)} keep flowing); ` +
        `"portflip resume ${app}" lets them in`,
    });
  });
}

export async function resume(ctx: Ctx, app: string): Promise<void> {
  await withHold(ctx, app, 'resume', async (r) => {
    // idempotent, so a script's resume after a pause that timed out does not fail
    if (!r.st.hold) return ctx.emit({ kind: 'notice', app, message: `"${app}" is not paused; nothing to release` });
    await run(RESUME, r);
  });
}
