// Shared moves of every command: check the environment, find out what is real, and repair it.

import { spawn } from 'node:child_process';
import { fail } from './errors.js';
import type { Emit } from './events.js';
import { killNow } from './instance.js';
import { appChain, appRules, detectBackend, ensureText, removeAppText, switchText, type Family, type Iptables, type NatView } from './iptables.js';
import { hasNetAdmin, isAlive, pidsListeningOn, readStat } from './proc.js';
import { writeState, type AppState, type Instance, type Paths } from './state.js';
import type { Sys } from './sys.js';

export interface Ctx {
  sys: Sys;
  paths: Paths;
  emit: Emit;
  env: NodeJS.ProcessEnv;
  abort: AbortSignal;
}

export async function requireNetAdmin(sys: Sys): Promise<void> {
  const status = (await sys.readText('/proc/self/status')) ?? '';
  if (!hasNetAdmin(status)) fail('notPrivileged', 'portflip changes iptables rules and needs root (or CAP_NET_ADMIN); run it with sudo');
}

export async function openIptables(ctx: Ctx, recorded?: string): Promise<Iptables> {
  await requireNetAdmin(ctx.sys);
  return detectBackend(ctx.sys, ctx.env.PORTFLIP_IPTABLES || recorded);
}

/** Is the app's chain wired from both hooks and its listen port, with exactly one redirect? */
export function rulesState(view: NatView, app: string, listen: number, port: number | null): 'ok' | 'missing' | 'mismatch' {
  const chain = appChain(app);
  const live = appRules(view, app);
  if (!view.chains.has(chain) && !live.jumps.length) return port === null ? 'ok' : 'missing';
  if (!live.hooked || !view.chains.has(chain) || !live.jumps.length) return 'missing';
  if (port === null || live.target !== port || live.jumps.length !== 1 || live.jumps[0] !== listen) return 'mismatch';
  return 'ok';
}

/** Points the app at `port` in one commit: the bare switch when the wiring is intact, else the full set. */
export async function pointAt(ipt: Iptables, family: Family, app: string, listen: number, port: number, view?: NatView): Promise<void> {
  const v = view ?? (await ipt.save(family));
  const state = rulesState(v, app, listen, port);
  const wired = state === 'ok' || (state === 'mismatch' && appRules(v, app).jumps.join() === String(listen) && appRules(v, app).hooked);
  await ipt.restore(family, wired ? switchText(app, port) : ensureText(v, app, listen, port));
}

export async function removeApp(ipt: Iptables, family: Family, app: string): Promise<void> {
  const text = removeAppText(await ipt.save(family), app);
  if (text) await ipt.restore(family, text);
}

export const describe = (i: Instance) => `port ${i.port}${i.pid ? ` (pid ${i.pid})` : ''}`;

/**
 * Finds out what is real after any earlier run, killed or not, and repairs it: the live redirect
 * decides which instance is active; dead instances are dropped; a candidate nobody switched to is
 * an orphan of an interrupted deploy and is stopped; rules that point nowhere live are fixed or
 * removed. Returns the views it read so callers can switch without reading again.
 */
export async function reconcile(ctx: Ctx, ipt: Iptables, st: AppState): Promise<Map<Family, NatView>> {
  const { sys, emit } = ctx;
  const app = st.app;
  const views = new Map<Family, NatView>();
  const before = JSON.stringify(st);
  for (const f of ipt.families) views.set(f, await ipt.save(f));

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
    else if (inst.state !== 'candidate' || inst.pid) emit({ kind: 'notice', app, message: `${inst.state} instance on ${describe(inst)} is gone` });
  }
  st.instances = alive;

  const v4 = appRules(views.get('ipv4')!, app);
  let active = v4.jumps.includes(st.listen) ? alive.find((i) => i.port === v4.target) : undefined;
  if (active && active.state !== 'active') {
    emit({ kind: 'notice', app, message: `an earlier run switched to ${describe(active)} and was interrupted; it is the active instance` });
    for (const other of alive) if (other !== active && other.state === 'active') other.state = 'draining';
    active.state = 'active';
  }
  if (!active) active = alive.find((i) => i.state === 'active') ?? alive.find((i) => i.state === 'kept');
  if (active) active.state = 'active';

  for (const orphan of alive.filter((i) => i.state === 'candidate')) {
    emit({ kind: 'notice', app, message: `stopping the candidate on ${describe(orphan)} left by an interrupted deploy` });
    await killNow(sys, orphan);
    st.instances = st.instances.filter((i) => i !== orphan);
  }
  const now = Date.now();
  for (const kept of st.instances.filter((i) => i.state === 'kept' && (i.keepUntil ?? 0) <= now)) kept.state = 'draining';

  for (const f of ipt.families) {
    const view = views.get(f)!;
    const want = active && st.families.includes(f) ? active.port : null;
    const now = rulesState(view, app, st.listen, want);
    if (now === 'ok') continue;
    const started = sys.now();
    if (want !== null) await pointAt(ipt, f, app, st.listen, want, view);
    else await removeApp(ipt, f, app);
    views.set(f, await ipt.save(f));
    emit({
      kind: 'step', step: 'repair', app, status: 'ok', port: want ?? undefined, pid: active?.pid, durationMs: sys.now() - started,
      detail: want !== null ? `${f} rules were ${now}; the redirect points at port ${want} again` : `${f} rules pointed at no live instance; removed them`,
    });
  }
  if (JSON.stringify(st) !== before) await writeState(ctx.paths, st);
  return views;
}

/** A detached helper that retires kept instances when their time is up, after this CLI has returned. */
export function spawnReaper(ctx: Ctx, app: string): number | undefined {
  const child = spawn(process.execPath, [process.argv[1], '_reap', app], {
    detached: true,
    stdio: 'ignore',
    env: ctx.env,
  });
  child.unref();
  return child.pid;
}
