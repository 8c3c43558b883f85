// The deploy: start a candidate, wait until it is ready, flip the redirect in one commit, drain the old.
//
// Invariant: at every instant the public port redirects to a live instance that passed its
// readiness check, or to nothing portflip created. DEPLOY below lists the steps in order; each says what
// it does and how it is undone, and a failure or Ctrl-C undoes the completed steps in reverse, once.

import { HOOKS, type HookName } from '../cli/config.js';
import { PortflipError } from '../core/errors.js';
import { logTail } from '../ops/instance.js';
import { appChain, appText, parseSave, type AppSpec, type Family, type Table } from '../os/iptables.js';
import { instanceLabel, removeState } from '../core/state.js';
import type { Ctx } from '../ops/context.js';
import { applyState } from '../ops/reconcile.js';
import { spawnReaper } from '../ops/retire.js';
import { causeOf, planSteps, runSteps, StepFailed, type Step } from '../core/steps.js';
import { checkOptions, newRun, type DeployOptions, type DeployRun } from './deploy-run.js';
import { PREFLIGHT, preflight } from './deploy-preflight.js';
import * as inPlace from './inplace.js';
import {
  afterDrain,
  afterReady,
  afterSwitch,
  beforeStart,
  bindCheck,
  canaryFor,
  canarySplit,
  drain,
  hookContext,
  open,
  ready,
  retireStale,
  runHook,
  start,
  switchRedirect,
  switchSpec,
  verify,
} from './deploy-steps.js';

// the deploy's options are its callers' (cli.ts, supervisor.ts); the run is its steps' (inplace.ts)
export type { DeployOptions, DeployRun } from './deploy-run.js';

/**
 * The deploy, in order. PREFLIGHT (deploy-preflight.ts) checks everything and takes the lock before the
 * run exists; then each step (deploy-steps.ts, the in-place ones inplace.ts) registers its undo before it
 * acts, and a failure or Ctrl-C undoes the completed steps in reverse, once. Steps that do not apply to a
 * run skip themselves (in place, canary, verify, hooks). --dry-run prints this same list.
 */
const DEPLOY: Step<DeployRun>[] = [
  retireStale, // drain and stop what an earlier run left kept or draining
  inPlace.hold, // in place: queue new connections to the public port
  inPlace.stopOld, // in place: drain and stop the active instance, which holds the port
  beforeStart,
  start, // the candidate, on its port
  ready, // its readiness check passes, or the deploy fails
  bindCheck, // it listens on all addresses, in the families it will get
  afterReady,
  open, // the filter (and nftables) accept connections redirected to it
  switchRedirect, // the redirect points at it: one commit per family
  inPlace.release, // in place: the held connections go to it
  canarySplit, // or, with --canary: a share of new connections goes to it
  verify, // with --verify: it stays alive and ready, or the switch is undone
  afterSwitch, // from here on the new instance stands
  canaryFor, // with --canary-for: promote or abort the canary
  drain, // the old instances drain and stop
  afterDrain,
];

export async function deploy(o: DeployOptions, ctx: Ctx): Promise<void> {
  const { sys, emit, paths } = ctx;
  appChain(o.app); // refuses a bad name before anything else
  checkOptions(o);
  const t0 = sys.now();
  // preflight: every check, no side effect but the lock and repairs of earlier runs; bad input
  // fails here with one line and no event: nothing was started or changed
  const pre = await preflight(o, ctx);
  emit({ kind: 'step', step: PREFLIGHT.name, app: o.app, status: 'ok', durationMs: sys.now() - t0 });
  const st = pre.state;
  const r = newRun(o, ctx, pre);
  if (o.dryRun) return plan(r);
  try {
    if (r.inPlace) await inPlace.inPlacePreflight(r);
    await runSteps(DEPLOY, r, { app: o.app, sys, emit });
    if (o.keepOldMs && r.prev) {
      const pid = await spawnReaper(ctx, o.app);
      emit({
        kind: 'notice',
        app: o.app,
        message:
          `keeping ${instanceLabel(r.prev)} for instant rollback until ${new Date(r.prev.keepUntil!).toISOString()}; ` +
          `a detached reaper (pid ${pid}) stops it then, or the next portflip run`,
      });
    }
    emit({
      kind: 'step',
      step: 'done',
      app: o.app,
      status: 'ok',
      port: r.cand.port,
      pid: r.cand.pid,
      durationMs: sys.now() - t0,
      detail:
        r.cand.state === 'canary'
          ? `port ${o.listen}: ${o.canary!.percent}% -> ${r.cand.port}, the rest -> ${r.prev?.port}; ` +
            `portflip promote ${o.app} or portflip abort ${o.app}`
          : `port ${o.listen} -> ${r.cand.port}`,
    });
  } catch (failed) {
    const err = causeOf(failed);
    const at = failed instanceof StepFailed ? failed.step : PREFLIGHT.name;
    // the candidate is gone: its port leaves the filter chain, and a first deploy leaves no state
    if (st.instances.some((i) => i === r.cand) || r.cand.pid) await applyState(ctx, pre.ipt, st).catch(() => {});
    if (pre.fresh && !st.instances.length) await removeState(sys, paths, o.app);
    if (r.cand.pid && err instanceof PortflipError && err.kind === 'deployFailed' && !HOOKS.includes(at as HookName)) {
      emit({ kind: 'log-tail', app: o.app, port: r.cand.port, log: r.cand.log, lines: await logTail(sys, r.cand.log) });
    }
    const onFailure = o.hooks?.on_failure;
    if (onFailure) {
      await runHook(sys, 'on_failure', onFailure, hookContext(r, 'on_failure', at)).catch((e) =>
        emit({ kind: 'notice', app: o.app, message: `${(e as Error).message}; the deploy goes on` }),
      );
    }
    throw err;
  } finally {
    await pre.lock.release();
  }
}

/** --dry-run: the deploy's own step list, and the exact rules its switch would commit against the live ones. */
function plan(r: DeployRun): void {
  const { o, ctx, pre } = r;
  const note = pre.views.size
    ? ''
    : ' (the live rules could not be read, so these are as on a host without portflip rules)';
  r.families = ['ipv4', ...(pre.ipt?.families.includes('ipv6') || !pre.views.size ? ['ipv6' as const] : [])];
  ctx.emit({
    kind: 'plan',
    app: o.app,
    steps: planSteps([PREFLIGHT, ...DEPLOY], r),
    rules: r.families.flatMap((family) => {
      const view = pre.views.get(family) ?? parseSave('');
      const text = (only?: Table) => appText(view, planSpec(r, family), family, only) ?? '(nothing to change)\n';
      // as the runner commits them: the open step's filter, then the switch's nat; a canary split is one commit
      if (o.firewall.mode === 'off' || o.canary) return [{ family: `${family} rules${note}`, text: text() }];
      return [
        { family: `${family} rules, open step${note}`, text: text('filter') },
        { family: `${family} rules, switch step${note}`, text: text('nat') },
      ];
    }),
  });
}

/** The rules --dry-run shows: the switch's, or with --canary the split's (its hash seed is drawn at the split). */
function planSpec(r: DeployRun, family: Family): AppSpec {
  const c = r.o.canary;
  if (!c || !r.prev) return switchSpec(r, family, r.cand.port, r.o.firewall);
  const spec = switchSpec(r, family, r.prev.port, r.o.firewall);
  return { ...spec, canary: { port: r.cand.port, percent: c.percent, by: c.by, rnd: 0 } };
}
