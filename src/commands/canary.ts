// Canary deploys: a share of new connections to the new instance, then promote (it takes all) or abort.
//
// The split is part of the app's nat chain (iptables.ts canaryRules), so every move here is one
// iptables-restore commit per family, like a switch. Crash safety comes from the order of the state
// write and the commit, chosen so that reconcile (ops/reconcile.ts) finishes or reverses a run killed between them:
//   split (deploy --canary)  state first: a recorded canary whose split is missing gets it (it was ready)
//   share (promote --canary) state first: the recorded share is the one the rules get
//   promote                  commit first: the live redirect at the canary makes reconcile adopt it
//   abort                    state first: a canary recorded as draining gets no split and is retired
// Invariant (lifecycle.ts): a canary comes with exactly one active instance and nothing else settled.

import { fail, PortflipError } from '../core/errors.js';
import { checkOnce, type ReadyCheck } from '../ops/instance.js';
import { appText, parseSave, type Family, type Iptables, type RulesView } from '../os/iptables.js';
import { move } from '../core/lifecycle.js';
import { finishLeftovers } from '../ops/reconcile.js';
import { instanceLabel } from '../core/state.js';
import { openIptables, type Ctx } from '../ops/context.js';
import { pointAll, wantedSpec } from '../ops/rules.js';
import { retire } from '../ops/retire.js';
import { underLock } from '../ops/lock.js';
import { isAlive } from '../os/proc.js';
import { readState, writeState, type AppState, type Instance } from '../core/state.js';
import { causeOf, planSteps, runSteps, type Step, type StepRun } from '../core/steps.js';

export interface CanaryOptions {
  percent: number; // whole percent, 1-99
  by: 'conn' | 'ip';
  forMs?: number; // --canary-for: watch this long, then promote; abort on death or two failed checks
}

const splitWords = (c: { percent: number; by: 'conn' | 'ip' }) =>
  `${c.percent}% of ${c.by === 'ip' ? 'client addresses' : 'new connections'}`;

/**
 * Refuses a deploy while a canary is live (the state after reconcile says so), and a canary deploy with
 * nothing to split with. Nothing is changed when it refuses.
 */
export function refuseDeploy(st: AppState, canary: CanaryOptions | undefined, dryRun = false): void {
  const live = st.instances.find((i) => i.state === 'canary');
  if (live)
    fail(
      'canaryLive',
      `${st.app} has a live canary on ${instanceLabel(live)}${st.canary ? ` (${splitWords(st.canary)})` : ''}; ` +
        `finish it first: portflip promote ${st.app}, or portflip abort ${st.app}`,
    );
  if (canary && !dryRun && !st.instances.some((i) => i.state === 'active'))
    fail('nothingToDo', `--canary needs a live active instance to split with; deploy ${st.app} without --canary first`);
}

/**
 * The deploy's canary step: the candidate becomes the canary and gets its share. The state is written
 * first (see the top of this file); the undo takes the share back and the candidate goes back to
 * being one, for start's undo to stop.
 */
export async function splitTo(
  ctx: Ctx,
  ipt: Iptables,
  st: AppState,
  cand: Instance,
  o: { canary: CanaryOptions; families: Family[]; firewall: AppState['firewall']; stop: AppState['stop'] },
  run: StepRun,
  views?: Map<Family, RulesView>,
): Promise<void> {
  const before = { firewall: st.firewall, stop: st.stop };
  const { randomBytes } = await import('node:crypto'); // loaded for a canary only, not by every deploy
  run.undo(`split removed: every new connection goes to the active instance`, async () => {
    move(cand, 'candidate');
    delete st.canary;
    Object.assign(st, before);
    await writeState(ctx.sys, ctx.paths, st);
    await pointAll(ipt, st);
  });
  st.canary = {
    percent: o.canary.percent,
    by: o.canary.by,
    rnd: randomBytes(4).readUInt32BE(0),
    families: o.families,
    since: new Date(ctx.sys.wallNow()).toISOString(),
  };
  Object.assign(st, { firewall: o.firewall, stop: o.stop });
  move(cand, 'canary');
  await writeState(ctx.sys, ctx.paths, st);
  await pointAll(ipt, st, views);
}

/** What promote, abort and a share change work on: the app's state under its lock, its canary and active. */
export interface CanaryRun {
  ctx: Ctx;
  ipt: Iptables;
  st: AppState;
  canary: Instance;
  active: Instance;
  percent?: number; // promote --canary: the new share
}

const PROMOTE: Step<CanaryRun>[] = [
  {
    name: 'promote',
    does: (r) =>
      `point port ${r.st.listen} at the canary on ${instanceLabel(r.canary)} only (one commit per family); ` +
      `${instanceLabel(r.active)} gets no new connection`,
    undo: 'the split as it was',
    run: async (r, run) => {
      const { st, canary, active } = r;
      const split = st.canary!;
      const families = st.families;
      run.undo(`split back: ${splitWords(split)} to ${instanceLabel(canary)}`, async () => {
        move(active, 'active');
        move(canary, 'canary');
        Object.assign(st, { canary: split, families });
        await pointAll(r.ipt, st);
        await writeState(r.ctx.sys, r.ctx.paths, st);
      });
      // commit first: a run killed before the state write leaves the live redirect at the canary,
      // and reconcile adopts it as the active instance
      move(active, 'draining');
      move(canary, 'active');
      delete st.canary;
      st.families = split.families;
      await pointAll(r.ipt, st);
      await writeState(r.ctx.sys, r.ctx.paths, st);
    },
    where: (r) => ({ port: r.canary.port, pid: r.canary.pid }),
    detail: (r) => `port ${r.st.listen} -> ${r.canary.port}; ${r.active.port} drains`,
  },
  {
    name: 'drain',
    does: (r) => `drain and stop the instance on ${instanceLabel(r.active)} under the deploy's drain settings`,
    undo: '',
    settles: true,
    run: async (r) => void (await retire(r.ctx, r.st, r.active, r.ipt)),
    where: (r) => ({ port: r.active.port, pid: r.active.pid }),
  },
];

const SHARE: Step<CanaryRun>[] = [
  {
    name: 'canary',
    does: (r) =>
      `send ${splitWords({ ...r.st.canary!, percent: r.percent! })} to the canary on ${instanceLabel(r.canary)} ` +
      `(now ${r.st.canary!.percent}%), one commit per family`,
    undo: 'the share as it was',
    run: async (r, run) => {
      const c = r.st.canary!;
      const was = c.percent;
      run.undo(`share back at ${was}%`, async () => {
        c.percent = was;
        await writeState(r.ctx.sys, r.ctx.paths, r.st);
        await pointAll(r.ipt, r.st);
      });
      c.percent = r.percent!;
      await writeState(r.ctx.sys, r.ctx.paths, r.st);
      await pointAll(r.ipt, r.st);
    },
    where: (r) => ({ port: r.canary.port, pid: r.canary.pid }),
    detail: (r) => `${splitWords(r.st.canary!)} -> port ${r.canary.port}`,
  },
];

const ABORT: Step<CanaryRun>[] = [
  {
    name: 'abort',
    does: (r) =>
      `send every new connection to ${instanceLabel(r.active)} again (one commit per family); ` +
      `the canary on ${instanceLabel(r.canary)} drains`,
    undo: 'the split as it was',
    run: async (r, run) => {
      const { st, canary } = r;
      const split = st.canary!;
      run.undo(`split back: ${splitWords(split)} to ${instanceLabel(canary)}`, async () => {
        move(canary, 'canary');
        st.canary = split;
        await writeState(r.ctx.sys, r.ctx.paths, st);
        await pointAll(r.ipt, st);
      });
      // state first: a run killed before the commit leaves a draining canary, and reconcile drops the split
      move(canary, 'draining');
      delete st.canary;
      await writeState(r.ctx.sys, r.ctx.paths, st);
      await pointAll(r.ipt, st);
    },
    where: (r) => ({ port: r.active.port, pid: r.active.pid }),
    detail: (r) => `port ${r.st.listen} -> ${r.active.port} only`,
  },
  {
    name: 'drain',
    does: (r) => `drain and stop the canary on ${instanceLabel(r.canary)} under the deploy's drain settings`,
    undo: '',
    settles: true,
    run: async (r) => void (await retire(r.ctx, r.st, r.canary, r.ipt)),
    where: (r) => ({ port: r.canary.port, pid: r.canary.pid }),
  },
];

/** The canary and active instance of a state, or a one-line refusal. */
function sides(st: AppState, what: string): { canary: Instance; active: Instance } {
  const canary = st.instances.find((i) => i.state === 'canary');
  const active = st.instances.find((i) => i.state === 'active');
  if (!canary || !active || !st.canary)
    return fail(
      'nothingToDo',
      `${st.app} has no live canary to ${what}; start one with portflip deploy ${st.app} --canary 10% ...`,
    );
  return { canary, active };
}

/** promote / abort / a share change: the steps on the app's state under its lock, after reconcile. */
async function withCanary(
  ctx: Ctx,
  app: string,
  what: 'promote' | 'abort',
  steps: Step<CanaryRun>[],
  opts: { percent?: number; dryRun?: boolean },
): Promise<void> {
  if (opts.dryRun) return dryRun(ctx, app, what, steps, await readState(ctx.sys, ctx.paths, app), opts.percent);
  await underLock(ctx, app, what, async (st, ipt) => {
    const r: CanaryRun = { ctx, ipt, st, ...sides(st, what), percent: opts.percent };
    await runSteps(steps, r, { app, sys: ctx.sys, emit: ctx.emit }).catch((err) => {
      throw causeOf(err);
    });
    await finishLeftovers(ctx, ipt, st);
  });
}

/** --dry-run of promote or abort: the steps and the exact commit against the live rules, nothing changed. */
async function dryRun(
  ctx: Ctx,
  app: string,
  what: 'promote' | 'abort',
  steps: Step<CanaryRun>[],
  st: AppState | null,
  percent?: number,
): Promise<void> {
  if (!st)
    return fail('nothingToDo', `no app named "${app}" here (no state in ${ctx.paths.stateDir}); deploy it first`);
  const ipt = await openIptables(ctx, st.backend).catch(() => null);
  const r: CanaryRun = { ctx, ipt: ipt!, st, ...sides(st, what), percent };
  const plan = planSteps(steps, r);
  // what the state will say after the first step, on a copy: its rules are what the commit writes
  const after: AppState = JSON.parse(JSON.stringify(st));
  const c = after.instances.find((i) => i.state === 'canary')!;
  const a = after.instances.find((i) => i.state === 'active')!;
  if (steps === SHARE) after.canary!.percent = percent!;
  else if (steps === PROMOTE) {
    move(a, 'draining');
    move(c, 'active');
    after.families = after.canary!.families;
  } else move(c, 'draining');
  if (steps !== SHARE) delete after.canary;
  const families: Family[] = ipt?.families ?? ['ipv4'];
  const rules = [];
  for (const f of families) {
    const view = await ipt?.save(f).catch(() => null);
    rules.push({
      family: `${f} rules`,
      text: appText(view ?? parseSave(''), wantedSpec(after, f), f) ?? '(nothing to change)\n',
    });
  }
  ctx.emit({ kind: 'plan', app, steps: plan, rules });
}

export async function promote(ctx: Ctx, app: string, opts: { percent?: number; dryRun?: boolean } = {}): Promise<void> {
  await withCanary(ctx, app, 'promote', opts.percent === undefined ? PROMOTE : SHARE, opts);
}

export async function abort(ctx: Ctx, app: string, opts: { dryRun?: boolean } = {}): Promise<void> {
  await withCanary(ctx, app, 'abort', ABORT, opts);
}

/**
 * --canary-for: the canary must stay alive and pass its readiness check, once a second, for the whole
 * time. Returns null when it did, or why not (one failed check can be a blip; two in a row is a
 * failing instance, as --verify has it).
 */
export async function watchCanary(
  ctx: Ctx,
  cand: Instance,
  check: ReadyCheck,
  env: NodeJS.ProcessEnv,
  forMs: number,
  exited?: Promise<unknown>,
): Promise<string | null> {
  let gone = false;
  void exited?.then(() => (gone = true));
  const until = ctx.sys.now() + forMs;
  let failures = 0;
  for (;;) {
    if (ctx.abort.aborted) return 'interrupted during --canary-for';
    if (gone || !(await isAlive(ctx.sys, cand.pid, cand.startTime)))
      return `the canary (pid ${cand.pid}) exited during --canary-for`;
    const ok = await checkOnce(ctx.sys, check, cand.port, 2000, { ...env, PORT: String(cand.port) });
    failures = ok ? 0 : failures + 1;
    if (failures >= 2) return `the canary on port ${cand.port} failed its readiness check twice in a row`;
    if (ctx.sys.now() >= until) return null;
    await ctx.sys.sleep(Math.min(1000, until - ctx.sys.now()), ctx.abort);
  }
}

/** The deploy's --canary-for step: watch, then promote or abort through the same steps as the commands. */
export async function finishCanary(
  ctx: Ctx,
  ipt: Iptables,
  st: AppState,
  cand: Instance,
  check: ReadyCheck,
  env: NodeJS.ProcessEnv,
  forMs: number,
  exited?: Promise<unknown>,
): Promise<void> {
  const why = await watchCanary(ctx, cand, check, env, forMs, exited);
  const r: CanaryRun = { ctx, ipt, st, canary: cand, active: st.instances.find((i) => i.state === 'active')! };
  const io = { app: st.app, sys: ctx.sys, emit: ctx.emit };
  const run = (steps: Step<CanaryRun>[]) =>
    runSteps(steps, r, io).catch((err) => {
      throw causeOf(err);
    });
  if (why === null) return void (await run(PROMOTE));
  if (
    !(await isAlive(ctx.sys, r.active.pid, r.active.startTime)) &&
    (await isAlive(ctx.sys, cand.pid, cand.startTime))
  ) {
    // going back to a dead instance would serve nothing: the canary, alive, is the better of the two
    await run(PROMOTE);
    throw new PortflipError('deployFailed', `${why}, but ${instanceLabel(r.active)} is gone: the canary was promoted`);
  }
  await run(ABORT);
  throw new PortflipError('deployFailed', `${why}; aborted: every new connection goes to ${instanceLabel(r.active)}`);
}
