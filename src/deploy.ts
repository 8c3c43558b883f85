// The deploy: start a candidate, wait until it is ready, flip the redirect in one commit, drain the old.
//
// Invariant: at every instant the public port redirects to a live instance that passed its
// readiness check, or to nothing portflip created. Each step below says what it does and how it
// is undone; a failure or Ctrl-C undoes the completed steps in reverse, once.

import { spawn } from 'node:child_process';
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import { HOOKS, type HookName } from './config.js';
import { fail, PortflipError } from './errors.js';
import type { StepName } from './events.js';
import { checkOnce, drainAndStop, killNow, logTail, resolveCommand, spawnInstance, waitReady, lookupUser, type ReadyCheck, type User } from './instance.js';
import { appChain, ensureText, parseSave, switchText, type Family, type Iptables, type NatView } from './iptables.js';
import { describe, openIptables, pointAt, reconcile, removeApp, spawnReaper, type Ctx } from './ops.js';
import { bindProblem, isAlive, listenersOn, readStat, tcpSockets } from './proc.js';
import { inspectPreload, placePreload, preloadEnv } from './preload.js';
import { ensureDirs, listApps, readState, removeState, takeLock, writeState, type AppState, type Instance, type StopPolicy } from './state.js';

export interface DeployOptions {
  app: string;
  listen: number;
  command: string[];
  ports?: number[];
  cwd: string;
  user?: string;
  env: Record<string, string>;
  ready: ReadyCheck;
  readyTimeoutMs: number;
  stop: StopPolicy;
  keepOldMs?: number;
  ipv6: 'auto' | 'on' | 'off';
  dryRun: boolean;
  hooks?: Partial<Record<HookName, string>>;
  verifyMs?: number;
  nodeDrain: boolean; // load the Node drain preload (node-drain.cjs) through NODE_OPTIONS
}

/** Watches the new instance for --verify: alive, and its readiness check passing, the whole time. */
async function verify(ctx: Ctx, o: DeployOptions, check: ReadyCheck, cand: Instance, exited: Promise<unknown>, env: NodeJS.ProcessEnv): Promise<void> {
  let gone = false;
  void exited.then(() => (gone = true));
  const until = ctx.sys.now() + o.verifyMs!;
  let failures = 0;
  while (ctx.sys.now() < until) {
    if (gone || !(await isAlive(ctx.sys, cand.pid, cand.startTime))) {
      throw new PortflipError('deployFailed', `the new instance (pid ${cand.pid}) exited during --verify; switched back`);
    }
    // one failed check can be a blip; two in a row is a failing instance
    failures = (await checkOnce(check, cand.port, 2000, { ...env, PORT: String(cand.port) })) ? 0 : failures + 1;
    if (failures >= 2) throw new PortflipError('deployFailed', `the new instance on port ${cand.port} failed its readiness check during --verify; switched back`);
    if (ctx.abort.aborted) throw new PortflipError('deployFailed', 'interrupted during --verify; switched back');
    await ctx.sys.sleep(250, ctx.abort);
  }
}

/** Ports chosen when --ports is not given: below the kernel's ephemeral range, so clients never hold them. */
export const DEFAULT_PORT_RANGE = [20000, 29999] as const;

export async function deploy(o: DeployOptions, ctx: Ctx): Promise<void> {
  const { sys, emit, paths } = ctx;
  appChain(o.app); // refuses a bad name before anything else
  const t0 = sys.now();
  let current: StepName = 'preflight';
  const step = async <T>(name: StepName, fn: () => Promise<T>, port?: number, pid?: () => number | null | undefined, detail?: () => string | undefined): Promise<T> => {
    const started = sys.now();
    current = name;
    try {
      const out = await fn();
      emit({ kind: 'step', step: name, app: o.app, status: 'ok', port, pid: pid?.(), durationMs: sys.now() - started, detail: detail?.() });
      return out;
    } catch (err) {
      emit({ kind: 'step', step: name, app: o.app, status: 'failed', port, pid: pid?.(), durationMs: sys.now() - started, detail: (err as Error).message });
      throw err;
    }
  };

  // 1. preflight: every check, no side effect but the lock and repairs of earlier runs
  // bad input fails here with one line and no event: nothing was started or changed
  const pre = await preflight(o, ctx);
  emit({ kind: 'step', step: 'preflight', app: o.app, status: 'ok', durationMs: sys.now() - t0 });
  if (o.dryRun) return plan(o, ctx, pre);
  const { ipt, lock, user, env } = pre;
  const st = pre.state;
  const undo: { title: string; run: () => Promise<void> }[] = [];
  const prev = st.instances.find((i) => i.state === 'active');
  let candidateLog: string | null = null;
  // hooks run as the app's user, in its directory; only the ones before the switch can stop a deploy
  const hook = async (name: HookName, port: number, must: boolean) => {
    const command = o.hooks?.[name];
    if (!command) return;
    const hookEnv = { ...env, PORTFLIP_APP: o.app, PORTFLIP_PORT: String(port), PORTFLIP_PREVIOUS_PORT: prev ? String(prev.port) : '', PORTFLIP_STEP: name === 'on_failure' ? current : name };
    const run = () => runHook(name, command, { cwd: o.cwd, env: hookEnv, user });
    if (must) return step(name, run, port);
    await run().catch((err) => emit({ kind: 'notice', app: o.app, message: `${(err as Error).message}; the deploy goes on` }));
  };
  try {
    // 2. retire: the chosen port is still held by our own kept or draining instance
    const holder = st.instances.find((i) => i.port === pre.port && i.state !== 'active');
    if (holder) await step('retire', () => retire(ctx, st, holder), holder.port, () => holder.pid);

    await hook('before_start', pre.port, true);

    // 3. start: record the intent, spawn, record the pid. Undo: kill the candidate's group.
    const cand: Instance = {
      port: pre.port, pid: null, startTime: null, state: 'candidate', startedAt: new Date().toISOString(),
      command: o.command.map((a) => a.replaceAll('{port}', String(pre.port))), log: join(paths.logDir, `${o.app}-${pre.port}.log`),
    };
    st.instances.push(cand);
    candidateLog = cand.log;
    await writeState(paths, st);
    // Node apps get the drain preload; other programs ignore NODE_OPTIONS (README: "The Node drain module")
    const preload = o.nodeDrain ? await placePreload(ctx.env, user) : null;
    if (preload && preload.path === null) emit({ kind: 'notice', app: o.app, message: `node-drain off for this instance: ${preload.why}` });
    const extraEnv = preload?.path ? preloadEnv(env, preload.path, o.stop.killAfterMs) : {};
    const spawned = await step('start', async () => {
      const s = await spawnInstance({ command: cand.command, port: cand.port, cwd: o.cwd, env: { ...env, ...extraEnv, PORT: String(cand.port) }, user, log: cand.log });
      cand.pid = s.pid;
      cand.startTime = (await readStat(sys, s.pid))?.startTime ?? null;
      await writeState(paths, st);
      return s;
    }, cand.port, () => cand.pid, () => (preload?.path ? `node-drain preload in NODE_OPTIONS${preload.copied ? ` (${preload.path})` : ''}` : undefined));
    undo.push({ title: `stopped the candidate on ${describe(cand)}`, run: async () => {
      await killNow(sys, cand);
      st.instances = st.instances.filter((i) => i !== cand);
      await writeState(paths, st);
    } });

    // 4. ready: the check passes before the deadline and before the candidate exits
    const check = o.ready.kind === 'cmd' ? { ...o.ready, user } : o.ready;
    let loadedIn: string[] = [];
    await step('ready', async () => {
      const r = await waitReady(sys, check, { pid: spawned.pid, port: cand.port, exited: spawned.exited }, o.readyTimeoutMs, { ...env, PORT: String(cand.port) }, ctx.abort);
      if (!r.ready) throw new PortflipError('deployFailed', r.reason);
      if (preload?.path) {
        const seen = await inspectPreload(sys, spawned.pid, cand.port, preload.path);
        [loadedIn, cand.nodeDrain] = [seen.loadedIn, seen.listeners];
      }
    }, cand.port, () => cand.pid, () => (preload?.path ? (loadedIn.length ? `node-drain loaded in ${loadedIn.join(', ')}` : 'node-drain not loaded: no Node.js process') : undefined));

    // 5. bind-check: redirected traffic arrives at the interface address; the candidate must listen there
    const families = await step('bind-check', () => bindCheck(o, ctx, ipt, cand.port), cand.port, () => cand.pid);

    await hook('after_ready', cand.port, true);

    // 6. switch: one commit per family. Undo: point back at the old instance, which still accepts.
    const old = st.instances.find((i) => i.state === 'active');
    await step('switch', async () => {
      for (const f of ipt.families) {
        const had = st.families.includes(f) || !!pre.views.get(f)?.chains.has(appChain(o.app));
        if (!families.includes(f) && !had) continue;
        undo.push({ title: `${f} redirect ${old && had ? `back on port ${old.port}` : 'removed'}`, run: async () => {
          if (old && had && st.families.includes(f)) await pointAt(ipt, f, o.app, o.listen, old.port);
          else await removeApp(ipt, f, o.app);
        } });
        try {
          if (families.includes(f)) await pointAt(ipt, f, o.app, o.listen, cand.port, pre.views.get(f));
          else await removeApp(ipt, f, o.app);
        } catch (err) {
          throw new PortflipError('deployFailed', `the ${f} switch failed: ${(err as Error).message.split('\n')[0]}`);
        }
      }
      const before = { families: st.families, oldState: old?.state };
      undo.push({ title: `state back on ${old ? `port ${old.port}` : 'no instance'}`, run: async () => {
        st.families = before.families;
        cand.state = 'candidate';
        if (old) [old.state, old.keepUntil] = [before.oldState!, undefined];
        await writeState(paths, st);
      } });
      st.families = families;
      cand.state = 'active';
      if (old) {
        old.state = o.keepOldMs ? 'kept' : 'draining';
        if (o.keepOldMs) old.keepUntil = Date.now() + o.keepOldMs;
      }
      st.stop = o.stop;
      await writeState(paths, st);
    }, cand.port, () => cand.pid, () => (old ? `from port ${old.port}` : 'first instance'));

    // 7. verify (--verify): the new instance must stay alive and ready; the old one still accepts,
    // so a failure here switches back in one commit per family
    if (o.verifyMs) {
      await step('verify', () => verify(ctx, o, check, cand, spawned.exited, env), cand.port, () => cand.pid);
    }
    undo.length = 0; // past this point the new instance serves; nothing is switched back
    await hook('after_switch', cand.port, false);

    // 8. drain: the replaced instance (unless kept) and any older ones, in parallel
    const retiring = st.instances.filter((i) => i.state === 'draining' || (i.state === 'kept' && i !== old));
    if (retiring.length) {
      await step('drain', () => Promise.all(retiring.map((i) => retire(ctx, st, i))).then(() => undefined), old?.port, () => old?.pid,
        () => `${retiring.length} instance${retiring.length > 1 ? 's' : ''} stopped`);
    }
    if (retiring.length) await hook('after_drain', cand.port, false);
    if (o.keepOldMs && old) {
      const pid = spawnReaper(ctx, o.app);
      emit({ kind: 'notice', app: o.app, message: `keeping ${describe(old)} for instant rollback until ${new Date(old.keepUntil!).toISOString()}; a detached reaper (pid ${pid}) stops it then, or the next portflip run` });
    }
    emit({ kind: 'step', step: 'done', app: o.app, status: 'ok', port: cand.port, pid: cand.pid, durationMs: sys.now() - t0, detail: `port ${o.listen} -> ${cand.port}` });
  } catch (err) {
    for (const u of undo.reverse()) {
      await u.run().catch(() => {});
      emit({ kind: 'notice', app: o.app, message: `undo: ${u.title}` });
    }
    if (pre.fresh && !st.instances.length) await removeState(paths, o.app);
    if (candidateLog && err instanceof PortflipError && err.kind === 'deployFailed' && !HOOKS.includes(current as HookName)) {
      emit({ kind: 'log-tail', app: o.app, port: pre.port, log: candidateLog, lines: await logTail(candidateLog) });
    }
    await hook('on_failure', pre.port, false);
    throw err;
  } finally {
    await lock.release();
  }
}

/** Drains and stops one instance under the app's stop policy, keeping the state file true as it goes. */
export async function retire(ctx: Ctx, st: AppState, inst: Instance): Promise<void> {
  inst.state = 'draining';
  await writeState(ctx.paths, st);
  await drainAndStop(ctx.sys, st.app, inst, st.stop, ctx.emit, () => writeState(ctx.paths, st));
  st.instances = st.instances.filter((i) => i !== inst);
  await writeState(ctx.paths, st);
}

interface Preflight {
  ipt: Iptables;
  lock: { release(): Promise<void> };
  user?: User;
  env: NodeJS.ProcessEnv;
  state: AppState;
  port: number;
  views: Map<Family, NatView>;
  fresh: boolean; // no state file before this deploy
}

async function preflight(o: DeployOptions, ctx: Ctx): Promise<Preflight> {
  const { sys, paths } = ctx;
  if (o.listen < 1 || o.listen > 65535) fail('usage', `--listen ${o.listen}: a port is 1-65535`);
  for (const p of o.ports ?? []) {
    if (!Number.isInteger(p) || p < 1 || p > 65535) fail('usage', `--ports: ${p} is not a port (1-65535)`);
    if (p === o.listen) fail('usage', `--ports: ${p} is the public port; instance ports must differ from --listen`);
  }
  if (o.ports && new Set(o.ports).size !== o.ports.length) fail('usage', `--ports: give distinct ports, like 8001,8002`);
  if (!o.command.length) fail('usage', 'no command: write it after "--", like: portflip deploy web --listen 80 -- node server.js');
  const cwdOk = await stat(o.cwd).then((s) => s.isDirectory(), () => false);
  if (!cwdOk) fail('config', `--cwd ${o.cwd}: no such directory`);
  const user = o.user ? await lookupUser(sys, o.user) : undefined;
  const env: NodeJS.ProcessEnv = { ...ctx.env, ...o.env, PORTFLIP_APP: o.app };
  for (const k of ['PORTFLIP_STATE_DIR', 'PORTFLIP_RUN_DIR', 'PORTFLIP_IPTABLES', 'PORTFLIP_PRELOAD_DIR']) delete env[k];
  if (user) Object.assign(env, { HOME: user.home, USER: user.name, LOGNAME: user.name });
  await resolveCommand(o.command[0].replaceAll('{port}', '0'), o.cwd, env.PATH);

  if (o.dryRun) {
    const state = (await readState(paths, o.app).catch(() => null)) ?? freshState(o, 'nft', []);
    const port = o.ports?.find((p) => !state.instances.some((i) => i.state === 'active' && i.port === p)) ?? (o.ports ?? [DEFAULT_PORT_RANGE[0]])[0];
    return { ipt: null as unknown as Iptables, lock: { release: async () => {} }, user, env, state, port, views: new Map(), fresh: false };
  }

  const recorded = await readState(paths, o.app);
  const ipt = await openIptables(ctx, recorded?.backend);
  if (o.ipv6 === 'on' && !ipt.families.includes('ipv6')) fail('noIptables', '--ipv6 on: ip6tables nat does not work on this host; use --ipv6 auto or off');
  await ensureDirs(paths);
  const lock = await takeLock(sys, paths, o.app, `deploy ${o.app}`, (m) => ctx.emit({ kind: 'notice', app: o.app, message: m }));
  try {
    const existing = await readState(paths, o.app);
    const state = existing ?? freshState(o, ipt.backend, []);
    if (state.listen !== o.listen && state.instances.length) {
      ctx.emit({ kind: 'notice', app: o.app, message: `public port changes from ${state.listen} to ${o.listen}` });
    }
    const views = await reconcile(ctx, ipt, state);
    state.listen = o.listen;
    state.backend = ipt.backend;
    const port = await pickPort(o, ctx, state);
    return { ipt, lock, user, env, state, port, views, fresh: !existing };
  } catch (err) {
    await lock.release();
    throw err;
  }
}

const freshState = (o: DeployOptions, backend: AppState['backend'], families: Family[]): AppState => ({
  schema: 1, app: o.app, listen: o.listen, backend, families, stop: o.stop, instances: [], updatedAt: '',
});

async function pickPort(o: DeployOptions, ctx: Ctx, st: AppState): Promise<number> {
  const socks = await tcpSockets(ctx.sys);
  const taken = new Set<number>();
  for (const other of await listApps(ctx.paths)) {
    if (other === o.app) continue;
    for (const i of (await readState(ctx.paths, other).catch(() => null))?.instances ?? []) taken.add(i.port);
  }
  const ours = (p: number) => st.instances.find((i) => i.port === p);
  const free = (p: number) => !taken.has(p) && p !== o.listen && !listenersOn(socks, p).length;
  if (o.ports) {
    const usable = o.ports.filter((p) => ours(p)?.state !== 'active');
    const pick = usable.find((p) => !ours(p) && free(p)) ?? usable.find((p) => ours(p)); // our kept one is retired first
    if (pick === undefined) fail('portInUse', `--ports ${o.ports.join(',')}: every port is in use (${o.ports.map((p) => `${p}: ${ours(p) ? `our ${ours(p)!.state} instance` : 'another process'}`).join(', ')}); free one or give another`);
    if (!ours(pick!) && !free(pick!)) {
      fail('portInUse', `port ${pick} is already in use by another process${taken.has(pick!) ? ' (another portflip app)' : ''}; stop it or pick other --ports`);
    }
    return pick!;
  }
  for (let p = DEFAULT_PORT_RANGE[0]; p <= DEFAULT_PORT_RANGE[1]; p++) if (!ours(p) && free(p)) return p;
  return fail('portInUse', `no free port in ${DEFAULT_PORT_RANGE.join('-')}; give --ports`);
}

async function bindCheck(o: DeployOptions, ctx: Ctx, ipt: Iptables, port: number): Promise<Family[]> {
  const listeners = listenersOn(await tcpSockets(ctx.sys), port);
  const v6only = ((await ctx.sys.readText('/proc/sys/net/ipv6/bindv6only')) ?? '0').trim() === '1';
  const hostV6 = ipt.families.includes('ipv6');
  const listensV6 = listeners.some((s) => s.family === 'ipv6' && s.localAddr === '::');
  const wantV6 = hostV6 && (o.ipv6 === 'on' || (o.ipv6 === 'auto' && listensV6));
  const problem = bindProblem(listeners, wantV6, v6only);
  if (problem) throw new PortflipError('deployFailed', `the candidate on port ${port} ${problem}`);
  return wantV6 ? ['ipv4', 'ipv6'] : ['ipv4'];
}

function plan(o: DeployOptions, ctx: Ctx, pre: Preflight): void {
  const port = pre.port;
  const old = pre.state.instances.find((i) => i.state === 'active');
  const cmd = o.command.map((a) => a.replaceAll('{port}', String(port)));
  const view = parseSave('');
  ctx.emit({
    kind: 'plan', app: o.app,
    steps: [
      { step: 'preflight', does: 'check root, iptables, config, command, free port; take the lock; repair what an earlier run left', undo: 'release the lock' },
      { step: 'start', does: `run ${JSON.stringify(cmd)} in ${o.cwd}${o.user ? ` as ${o.user}` : ''} with PORT=${port}${o.nodeDrain ? ' and the Node drain preload in NODE_OPTIONS' : ''}, log to ${join(ctx.paths.logDir, `${o.app}-${port}.log`)}`, undo: 'kill its process group' },
      { step: 'ready', does: `wait up to ${o.readyTimeoutMs}ms for ${o.ready.kind === 'tcp' ? `a TCP connect to port ${port}` : o.ready.kind === 'http' ? o.ready.url.replaceAll('{port}', String(port)) : `"${o.ready.command}" to exit 0`}`, undo: 'kill the candidate' },
      { step: 'bind-check', does: `check the candidate listens on all addresses (0.0.0.0 or ::) on port ${port}`, undo: 'kill the candidate' },
      { step: 'switch', does: `redirect port ${o.listen} to ${port} in one iptables-restore --noflush commit${old ? ` (from ${old.port})` : ''}`, undo: old ? `redirect back to ${old.port}` : 'remove the rules' },
      { step: 'drain', does: old ? `${o.keepOldMs ? `keep port ${old.port} for ${o.keepOldMs}ms, then ` : ''}${o.stop.drain !== 'signal' ? `${o.stop.drain === 'auto' ? 'unless the Node drain module listens on it, ' : ''}wait until port ${old.port} has no open connections (at most ${o.stop.drainTimeoutMs}ms), then ` : ''}send ${o.stop.stopSignal} to pid ${old.pid}'s group; SIGKILL after ${o.stop.killAfterMs}ms` : 'nothing to drain (first instance)', undo: '' },
    ],
    rules: [{ family: 'ipv4', text: old ? switchText(o.app, port) : ensureText(view, o.app, o.listen, port) }],
  });
}

/** Runs one lifecycle hook; its output goes to portflip's stderr so --json stdout stays clean. */
function runHook(name: HookName, command: string, o: { cwd: string; env: NodeJS.ProcessEnv; user?: User }): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = spawn('sh', ['-c', command], { cwd: o.cwd, env: o.env, uid: o.user?.uid, gid: o.user?.gid, stdio: ['ignore', 2, 2], timeout: HOOK_TIMEOUT_MS });
    child.once('error', (err) => reject(new PortflipError('deployFailed', `${name} hook could not start: ${err.message}`)));
    child.once('exit', (code, signal) =>
      code === 0 ? resolve() : reject(new PortflipError('deployFailed', `${name} hook failed (${signal ? `killed by ${signal}` : `exit ${code}`}): ${command}`)),
    );
  });
}

/** A hook that hangs must not hold the deploy (and its lock) forever. */
export const HOOK_TIMEOUT_MS = 300_000;
