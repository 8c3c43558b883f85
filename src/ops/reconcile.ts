// Shared moves of every command: check the environment, find out what is real, and repair it.

import { fail, PortflipError } from '../core/errors.js';
import { invariantProblem, move } from '../core/lifecycle.js';
import type { Emit, StepName } from '../core/events.js';
import { drainAndStop, drainModeOf, killNow } from './instance.js';
import { markPort, marksHere, type MarkHandle } from '../drain/drainmark.js';
import type { MarkStats } from '../drain/httpmark.js';
import {
  appChain,
  appRules,
  appText,
  checkApp,
  detectBackend,
  foreignJumps,
  markText,
  removeAppText,
  type AppSpec,
  type Family,
  type FirewallSpec,
  type Iptables,
  type RulesView,
  type Table,
} from '../os/iptables.js';
import { guardScript, NftGuard, type DenyChain } from '../os/nftguard.js';
import { hasNetAdmin, isAlive, pidsListeningOn, readStat } from '../os/proc.js';
import {
  ensureDirs,
  listApps,
  readState,
  takeLock,
  writeState,
  type AppState,
  type Instance,
  type Paths,
} from '../core/state.js';
import { selfArgv } from '../os/self.js';
import { which, type Sys } from '../os/sys.js';

export interface Ctx {
  sys: Sys;
  paths: Paths;
  emit: Emit;
  env: NodeJS.ProcessEnv;
  abort: AbortSignal;
}

export async function requireNetAdmin(sys: Sys): Promise<void> {
  const status = (await sys.readText('/proc/self/status')) ?? '';
  if (!hasNetAdmin(status))
    fail('notPrivileged', 'portflip changes iptables rules and needs root (or CAP_NET_ADMIN); run it with sudo');
}

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

/** After a command's steps: finish what an earlier run left draining, then close the ports of the gone. */
export async function finishLeftovers(ctx: Ctx, ipt: Iptables, st: AppState): Promise<void> {
  for (const i of st.instances.filter((i) => i.state === 'draining')) await retire(ctx, st, i, ipt);
  await settle(ctx, ipt, st, undefined, true);
}

export async function openIptables(ctx: Ctx, recorded?: string): Promise<Iptables> {
  await requireNetAdmin(ctx.sys);
  return detectBackend(ctx.sys, ctx.env.PORTFLIP_IPTABLES || recorded);
}

/** The app's firewall settings as rule builders take them; null: portflip keeps out of the filter table. */
export function firewallOf(st: Pick<AppState, 'firewall'>): FirewallSpec | null {
  const fw = st.firewall;
  if (fw?.mode === 'off') return null;
  return { exposePorts: fw?.exposePorts ?? false, allowFrom: fw?.allowFrom ?? [] };
}

/**
 * What one family's rules should say according to the state file: the redirect at the active
 * instance (if the family is the app's), and the way open to every instance that is not a candidate,
 * draining ones included, since their open connections still pass the filter.
 */
export function wantedSpec(st: AppState, family: Family): AppSpec {
  const active = st.instances.find((i) => i.state === 'active');
  const target = active && st.families.includes(family) ? active.port : null;
  // with no redirect in this family there is nothing redirected to accept
  const open = target === null ? [] : st.instances.filter((i) => i.state !== 'candidate').map((i) => i.port);
  // a hold covers the families the app's redirect is in (hold.ts)
  const hold = st.hold && st.families.includes(family) ? st.hold.queue : null;
  const spec: AppSpec = { app: st.app, listen: st.listen, target, open, firewall: firewallOf(st), hold };
  // a draining instance's packets pass its marking queue in the families its connections came in on
  const mark = st.families.includes(family) ? st.instances.filter((i) => i.marking) : [];
  if (mark.length) spec.mark = mark.map((i) => ({ port: i.port, queue: i.marking!.queue }));
  // a live canary takes its share, in the families it listens on
  const canary = st.instances.find((i) => i.state === 'canary');
  const c = st.canary;
  if (target !== null && canary && c?.families.includes(family))
    spec.canary = { port: canary.port, percent: c.percent, by: c.by, rnd: c.rnd };
  return spec;
}

/**
 * A hold stands while its holder lives, its time is not up, and (for a deploy's hold) the deploy that
 * made it still runs: a command that took the lock knows that deploy is gone.
 */
export async function holdStands(sys: Sys, st: AppState, underLock: boolean): Promise<boolean> {
  const h = st.hold;
  if (!h) return true;
  if (h.untilMs <= sys.wallNow() || (underLock && h.reason === 'deploy')) return false;
  return isAlive(sys, h.pid, h.startTime);
}

/** Ends a hold that no longer stands: the holder (if alive) releases and exits; the rule goes with settle. */
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

/** Makes one family say what the spec says, in one commit; returns what was missing (empty: nothing to do). */
export async function applySpec(
  ipt: Iptables,
  family: Family,
  spec: AppSpec,
  view?: RulesView,
  only?: Table,
): Promise<string[]> {
  const v = view ?? (await ipt.save(family));
  const text = appText(v, spec, family, only);
  if (text) await ipt.restore(family, text);
  return text ? checkApp(v, spec, family).missing : [];
}

/** Points every family's rules where the state says, side by side: each family's commit is atomic on its own. */
export async function pointAll(ipt: Iptables, st: AppState, views?: Map<Family, RulesView>): Promise<void> {
  await Promise.all(ipt.families.map((f) => applySpec(ipt, f, wantedSpec(st, f), views?.get(f))));
}

/** Removes the app's rules from one family; returns the foreign rules that kept its chains from going. */
export async function removeApp(ipt: Iptables, family: Family, app: string): Promise<string[]> {
  const view = await ipt.save(family);
  const text = removeAppText(view, app);
  if (text) await ipt.restore(family, text);
  return (['nat', 'filter', 'mangle'] as const).flatMap((t) => foreignJumps(view[t], appChain(app)));
}

/** How full the connection-tracking table is; null where conntrack is not loaded (no rule needs it yet). */
export async function conntrackFill(sys: Sys): Promise<{ count: number; max: number; percent: number } | null> {
  const [count, max] = await Promise.all(
    ['count', 'max'].map((k) => sys.readText(`/proc/sys/net/netfilter/nf_conntrack_${k}`)),
  );
  if (count === null || max === null || !Number(max)) return null;
  const c = Number(count.trim());
  const m = Number(max.trim());
  return { count: c, max: m, percent: Math.round((c / m) * 1000) / 10 };
}

/** Past this share a full table is close: new SYNs are dropped once it is full, and clients time out. */
export const CONNTRACK_WARN_PERCENT = 75;

export function conntrackWarning(fill: { count: number; max: number; percent: number }): string {
  return (
    `the connection-tracking table is ${fill.percent}% full (${fill.count} of ${fill.max}); ` +
    'when it is full new connections are dropped. ' +
    'Raise net.netfilter.nf_conntrack_max (and net.netfilter.nf_conntrack_buckets), ' +
    'or shorten net.netfilter.nf_conntrack_tcp_timeout_time_wait; see README "Firewalls"'
  );
}

// looked up once per Sys: a deploy asks several times, and each lookup walks PATH
const nftPaths = new WeakMap<Sys, Promise<string | null>>();
export async function openGuard(sys: Sys): Promise<NftGuard> {
  if (!nftPaths.has(sys)) {
    const lookup = which(sys, 'nft');
    nftPaths.set(sys, lookup);
    lookup.catch(() => nftPaths.delete(sys)); // a lookup that failed is asked again, not remembered
  }
  return new NftGuard(sys, await nftPaths.get(sys)!);
}

/** The app's nftables accept as its state wants it: present while a live instance may be redirected to. */
export function guardWanted(st: AppState, mode: 'auto' | 'present' | 'absent') {
  const fw = firewallOf(st);
  const live = mode === 'present' || (mode === 'auto' && st.instances.some((i) => i.state !== 'candidate'));
  return mode !== 'absent' && fw && live ? { listen: st.listen, fw } : null;
}

/**
 * Makes native nftables input chains that drop by default accept the app's redirected connections
 * (or forget them). Returns what it changed, for the repair event.
 */
export async function syncGuard(
  ctx: Ctx,
  st: AppState,
  mode: 'auto' | 'present' | 'absent' = 'auto',
): Promise<string[]> {
  return (await guardSync(ctx, st, mode)).changed;
}

/** syncGuard, also returning the chains it read when it left them as they were (null when it changed them). */
async function guardSync(
  ctx: Ctx,
  st: AppState,
  mode: 'auto' | 'present' | 'absent',
  read?: Promise<DenyChain[]>,
): Promise<{ changed: string[]; chains: DenyChain[] | null }> {
  const guard = await openGuard(ctx.sys);
  const want = guardWanted(st, mode);
  const chains = await (read ?? guard.chains());
  const script = guardScript(chains, st.app, want);
  if (!script) return { changed: [], chains };
  const err = await guard.apply(script);
  if (err) {
    ctx.emit({
      kind: 'notice',
      app: st.app,
      message: `could not update portflip's accept rule in nftables (${err}); redirected traffic may be dropped there`,
    });
    return { changed: [], chains: null };
  }
  const changed = chains.map((c) => `nft: ${want ? 'accept in' : 'remove from'} ${c.family} ${c.table} ${c.chain}`);
  return { changed, chains: null };
}

/** What syncGuard would change, without changing it: null when nothing. */
export async function syncGuardCheck(ctx: Ctx, st: AppState): Promise<string | null> {
  return guardScript(await (await openGuard(ctx.sys)).chains(), st.app, guardWanted(st, 'auto'));
}

/**
 * Brings every family's rules and the nftables guard in line with the state file. Each change is a
 * repair event saying what was missing, unless `quiet`: closing the port of an instance that just
 * drained is part of the drain, not a repair. `guardRead`: the nftables chains, read already.
 */
export async function settle(
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
  const { changed, chains } = await guardSync(ctx, st, 'auto', guardRead);
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

/** How people read an instance in messages: "port 8002 (pid 9203)". */
export const instanceLabel = (i: Instance) => `port ${i.port}${i.pid ? ` (pid ${i.pid})` : ''}`;

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
  guardRead.catch(() => {}); // awaited by settle, unless something fails before it
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
  settleCanary(ctx, st);

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
  const chains = await settle(ctx, ipt, st, views, false, guardRead);
  if (JSON.stringify(st) !== before) await writeState(ctx.sys, ctx.paths, st);
  return { views, chains };
}

/**
 * The canary split follows the canary instance: gone with it (it died, or became the active one), and a
 * canary state without its split settings (a hand-edited file) drains rather than guess a share.
 */
function settleCanary(ctx: Ctx, st: AppState): void {
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
      lock = await takeLock(ctx.sys, ctx.paths, MARK_LOCK, 'marking rules', (m) => ctx.emit({ kind: 'notice', message: m }));
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
    return without(`no packet queue: ${(err as Error).message}`), null;
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
    return without((err as Error).message), null;
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
    await syncMarks(ctx, m.ipt ?? (await openIptables(ctx, st.backend)), st);
    await writeState(ctx.sys, ctx.paths, st);
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

/** Live rules against the state file, for `portflip run` and `portflip watch`; repairs under the app's lock. */
export class Healer {
  private ipts = new Map<string, Promise<Iptables>>();
  constructor(private ctx: Ctx) {}

  private iptables(st: AppState): Promise<Iptables> {
    // detecting the backend costs several processes: once per backend, not once a second
    let ipt = this.ipts.get(st.backend);
    if (!ipt) this.ipts.set(st.backend, (ipt = openIptables(this.ctx, st.backend)));
    ipt.catch(() => this.ipts.delete(st.backend));
    return ipt;
  }

  /** What differs from the state file (empty: nothing), read without the lock. */
  async check(st: AppState): Promise<string[]> {
    const ipt = await this.iptables(st);
    const missing: string[] = [];
    for (const f of ipt.families) {
      const view = await ipt.save(f);
      missing.push(...checkApp(view, wantedSpec(st, f), f).missing);
      if (markText(view, wantedSpec(st, f))) missing.push(`mangle: ${f} marking rules`);
    }
    if (await syncGuardCheck(this.ctx, st)) missing.push('nft: portflip accept in a default-deny input chain');
    if (!(await holdStands(this.ctx.sys, st, false))) missing.push('mangle: a hold whose holder is gone or timed out');
    for (const i of st.instances.filter((i) => i.marking)) {
      if (!(await isAlive(this.ctx.sys, i.marking!.pid, i.marking!.startTime)))
        missing.push(`mangle: marking of port ${i.port}, whose run is gone`);
    }
    return missing;
  }

  /**
   * Repairs the app if its rules differ: reconcile under the lock, which emits one repair event per
   * family with what was missing. A held lock means a deploy is running; it leaves the rules right.
   */
  async heal(app: string): Promise<'ok' | 'repaired' | 'busy' | 'gone'> {
    const st = await readState(this.ctx.sys, this.ctx.paths, app).catch(() => null);
    if (!st) return 'gone';
    const missing = await this.check(st);
    if (!missing.length) return 'ok';
    let lock;
    try {
      lock = await takeLock(this.ctx.sys, this.ctx.paths, app, `heal ${app}`, (m) =>
        this.ctx.emit({ kind: 'notice', app, message: m }),
      );
    } catch (err) {
      if (err instanceof PortflipError && err.kind === 'lockHeld') return 'busy';
      throw err;
    }
    try {
      const fresh = await readState(this.ctx.sys, this.ctx.paths, app);
      if (!fresh) return 'gone';
      this.ctx.emit({
        kind: 'notice',
        app,
        message: `rules changed behind portflip's back (${missing.join('; ')}); repairing`,
      });
      await reconcile(this.ctx, await this.iptables(fresh), fresh);
      return 'repaired';
    } finally {
      await lock.release();
    }
  }
}

/** `portflip watch`: heals every app's rules after a firewall reload, for apps deployed with the plain CLI. */
export async function watch(ctx: Ctx, everyMs: number): Promise<void> {
  const healer = new Healer(ctx);
  ctx.emit({ kind: 'notice', message: `watching the rules of every app in ${ctx.paths.stateDir} every ${everyMs}ms` });
  while (!ctx.abort.aborted) {
    for (const app of await listApps(ctx.sys, ctx.paths)) {
      await healer
        .heal(app)
        .catch((err) => ctx.emit({ kind: 'notice', app, message: `could not repair: ${(err as Error).message}` }));
    }
    await ctx.sys.sleep(everyMs, ctx.abort);
  }
}
