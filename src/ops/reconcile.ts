// Finds out what is real after any earlier run and repairs it: the rules and instances back in line with the state.

import { invariantProblem, move } from '../core/lifecycle.js';
import type { StepName } from '../core/events.js';
import { instanceLabel, writeState, type AppState, type Instance } from '../core/state.js';
import { marksHere } from '../drain/drainmark.js';
import { appRules, markText, type Family, type Iptables, type RulesView } from '../os/iptables.js';
import type { DenyChain } from '../os/nftguard.js';
import { isAlive, pidsListeningOn, readStat } from '../os/proc.js';
import type { Sys } from '../os/sys.js';
import type { Ctx } from './context.js';
import { openGuard, syncGuard } from './guard.js';
import { killNow } from './instance.js';
import { retire, syncMarks } from './retire.js';
import { applySpec, wantedSpec } from './rules.js';

/** After a command's steps: finish what an earlier run left draining, then close the ports of the gone. */
export async function finishLeftovers(ctx: Ctx, ipt: Iptables, st: AppState): Promise<void> {
  for (const i of st.instances.filter((i) => i.state === 'draining')) await retire(ctx, st, i, ipt);
  await applyState(ctx, ipt, st, undefined, true);
}

/**
 * A hold stands while its holder lives, its time is not up, and (for a deploy's hold) the deploy that
 * made it still runs: a command that took the lock knows that deploy is gone.
 */
export async function holdStands(sys: Sys, st: AppState, lockHeld: boolean): Promise<boolean> {
  const h = st.hold;
  if (!h) return true;
  if (h.untilMs <= sys.wallNow() || (lockHeld && h.reason === 'deploy')) return false;
  return isAlive(sys, h.pid, h.startTime);
}

/** Ends a hold that no longer stands: the holder (if alive) releases and exits; the rule goes with applyState. */
async function dropStaleHold(ctx: Ctx, st: AppState): Promise<void> {
  const h = st.hold!;
  const alive = await isAlive(ctx.sys, h.pid, h.startTime);
  // SIGTERM makes the holder accept everything it holds before it exits
  if (alive) ctx.sys.kill(h.pid, 'SIGTERM');
  ctx.emit({
    kind: 'notice',
    app: st.app,
    message: `removing the ${h.reason === 'pause' ? 'pause' : 'in-place deploy'} hold on port ${st.listen}: ${
      !alive
        ? `its holder (pid ${h.pid}) is gone`
        : h.untilMs <= ctx.sys.wallNow()
          ? 'its time is up'
          : 'its deploy is gone'
    }`,
  });
  delete st.hold;
}

/**
 * Brings every family's rules and the nftables guard in line with the state file. Each change is a
 * repair event saying what was missing, unless `quiet`: closing the port of an instance that just
 * drained is part of the drain, not a repair. `guardRead`: the nftables chains, read already.
 */
export async function applyState(
  ctx: Ctx,
  ipt: Iptables,
  st: AppState,
  views?: Map<Family, RulesView>,
  quiet = false,
  guardRead?: Promise<DenyChain[]>,
): Promise<DenyChain[] | null> {
  const step: StepName = 'repair';
  // the families commit side by side, each atomic on its own; their events follow in order
  const started = ctx.sys.now();
  const done = await Promise.all(
    ipt.families.map(async (f) => {
      const spec = wantedSpec(st, f);
      const missing = await applySpec(ipt, f, spec, views?.get(f));
      if (missing.length && !quiet) views?.set(f, await ipt.save(f));
      return { f, spec, missing, ms: ctx.sys.now() - started };
    }),
  );
  for (const { f, spec, missing, ms } of done) {
    if (!missing.length || quiet) continue;
    const active = st.instances.find((i) => i.state === 'active');
    ctx.emit({
      kind: 'step',
      step,
      app: st.app,
      status: 'ok',
      port: spec.target ?? undefined,
      pid: active?.pid,
      durationMs: ms,
      missing,
      detail:
        spec.target !== null
          ? `${f} rules were out of line (${missing.join('; ')}); port ${st.listen} points at ${spec.target}`
          : `${f} rules pointed at no live instance; removed them`,
    });
  }
  const guardStarted = ctx.sys.now();
  const { changed, chains } = await syncGuard(ctx, st, 'auto', guardRead);
  if (changed.length && !quiet) {
    ctx.emit({
      kind: 'step',
      step,
      app: st.app,
      status: 'ok',
      durationMs: ctx.sys.now() - guardStarted,
      missing: changed,
      detail: changed.join('; '),
    });
  }
  return chains;
}

/**
 * Finds out what is real after any earlier run, killed or not, and repairs it: the live redirect
 * decides which instance is active; dead instances are dropped; a candidate nobody switched to is
 * an orphan of an interrupted deploy and is stopped; rules that point nowhere live are fixed or
 * removed. Returns the views it read so callers can switch without reading again, and the nftables
 * chains when it left them as read (null when it changed them).
 */
export async function reconcile(
  ctx: Ctx,
  ipt: Iptables,
  st: AppState,
): Promise<{ views: Map<Family, RulesView>; chains: DenyChain[] | null }> {
  const { sys, emit } = ctx;
  const app = st.app;
  const views = new Map<Family, RulesView>();
  const before = JSON.stringify(st);
  // one read per family and the nftables ruleset, side by side (a deploy's own time is mostly waiting
  // on these tools); the repairs below change only iptables' own tables, which the guard leaves out
  const guardRead = openGuard(sys).then((g) => g.chains());
  guardRead.catch(() => {}); // awaited by applyState, unless something fails before it
  const saved = await Promise.all(ipt.families.map((f) => ipt.save(f)));
  ipt.families.forEach((f, k) => views.set(f, saved[k]));

  for (const inst of st.instances) {
    if (inst.pid === null) {
      // killed between "about to spawn" and recording the pid: find it by its port
      const [pid] = await pidsListeningOn(sys, inst.port);
      if (pid) [inst.pid, inst.startTime] = [pid, (await readStat(sys, pid))?.startTime ?? null];
    }
  }
  const alive: Instance[] = [];
  for (const inst of st.instances) {
    if (await isAlive(sys, inst.pid, inst.startTime)) alive.push(inst);
    else if (inst.state !== 'candidate' || inst.pid)
      emit({ kind: 'notice', app, message: `${inst.state} instance on ${instanceLabel(inst)} is gone` });
  }
  st.instances = alive;

  const v4 = appRules(views.get('ipv4')!, app);
  let active = v4.jumps.includes(st.listen) ? alive.find((i) => i.port === v4.target) : undefined;
  if (active && active.state !== 'active') {
    emit({
      kind: 'notice',
      app,
      message: `an earlier run switched to ${instanceLabel(active)} and was interrupted; it is the active instance`,
    });
    for (const other of alive) if (other !== active && other.state === 'active') move(other, 'draining');
    move(active, 'active');
    // the switch committed but its state write did not: the families it switched are the app's now,
    // or the repair below would take the live redirect away from the instance it just adopted
    for (const [f, view] of views) {
      if (appRules(view, app).target === active.port && !st.families.includes(f)) st.families.push(f);
    }
  }
  if (!active) active = alive.find((i) => i.state === 'active') ?? alive.find((i) => i.state === 'kept');
  // a canary outlives the instance it was split with: it passed its check and takes all the traffic
  if (!active) active = alive.find((i) => i.state === 'canary');
  if (active) move(active, 'active');
  splitFollowsCanary(ctx, st);

  for (const orphan of alive.filter((i) => i.state === 'candidate')) {
    emit({
      kind: 'notice',
      app,
      message: `stopping the candidate on ${instanceLabel(orphan)} left by an interrupted deploy`,
    });
    await killNow(sys, orphan);
    st.instances = st.instances.filter((i) => i !== orphan);
  }
  const now = sys.wallNow();
  for (const kept of st.instances.filter((i) => i.state === 'kept' && (i.keepUntil ?? 0) <= now))
    move(kept, 'draining');
  // a state file written before the invariant was kept can hold more instances than it allows:
  // the oldest ones that are not active go at once, before anything is written
  while (invariantProblem(st.instances)) {
    const extra = st.instances.find((i) => i.state !== 'active' && i.state !== 'candidate');
    if (!extra) break;
    emit({
      kind: 'notice',
      app,
      message: `stopping the ${extra.state} instance on ${instanceLabel(extra)}: more instances than an app may have`,
    });
    await killNow(sys, extra);
    st.instances = st.instances.filter((i) => i !== extra);
  }

  if (st.hold && !(await holdStands(sys, st, true))) await dropStaleHold(ctx, st);
  // under the lock only this process can be marking: any other's marking is an interrupted run's
  for (const inst of st.instances.filter((i) => i.marking && !(i.marking.pid === sys.pid && marksHere(i.port)))) {
    emit({
      kind: 'notice',
      app,
      message: `removing the marking of ${instanceLabel(inst)}: the run that drained it (pid ${inst.marking!.pid}) is gone`,
    });
    delete inst.marking;
  }
  if (ipt.families.some((f) => markText(views.get(f)!, wantedSpec(st, f)))) await syncMarks(ctx, ipt, st);
  const chains = await applyState(ctx, ipt, st, views, false, guardRead);
  if (JSON.stringify(st) !== before) await writeState(ctx.sys, ctx.paths, st);
  return { views, chains };
}

/**
 * The canary split follows the canary instance: gone with it (it died, or became the active one), and a
 * canary state without its split settings (a hand-edited file) drains rather than guess a share.
 */
function splitFollowsCanary(ctx: Ctx, st: AppState): void {
  const canary = st.instances.find((i) => i.state === 'canary');
  if (canary && !st.canary) {
    ctx.emit({
      kind: 'notice',
      app: st.app,
      message: `the canary on ${instanceLabel(canary)} has no split; draining it`,
    });
    move(canary, 'draining');
  }
  if (!st.instances.some((i) => i.state === 'canary')) delete st.canary;
}
