// The deploy: start a candidate, wait until it is ready, flip the redirect in one commit, drain the old.
//
// Invariant: at every instant the public port redirects to a live instance that passed its
// readiness check, or to nothing portflip created. Each step below says what it does and how it
// is undone; a failure or Ctrl-C undoes the completed steps in reverse, once.

import { join } from 'node:path';
import { HOOKS, type HookName } from '../cli/config.js';
import { move } from '../core/lifecycle.js';
import { fail, PortflipError } from '../core/errors.js';
import {
  checkOnce,
  killNow,
  logTail,
  resolveCommand,
  spawnInstance,
  waitReady,
  lookupUser,
  type ReadyCheck,
  type User,
} from '../ops/instance.js';
import {
  appChain,
  appRules,
  appText,
  parseSave,
  wouldDrop,
  type AppSpec,
  type Family,
  type Table,
  type Iptables,
  type RulesView,
} from '../os/iptables.js';
import { applySpec, firewallOf } from '../ops/rules.js';
import { conntrackFill, conntrackWarning, CONNTRACK_WARN_PERCENT } from '../ops/conntrack.js';
import { instanceLabel } from '../core/state.js';
import { openGuard, syncGuard } from '../ops/guard.js';
import { openIptables, type Ctx } from '../ops/context.js';
import { applyState, reconcile } from '../ops/reconcile.js';
import { retire, spawnReaper } from '../ops/retire.js';
import { markingWords } from '../core/events.js';
import { bindProblem, isAlive, listenersOn, readStat, tcpListeners } from '../os/proc.js';
import {
  ensureDirs,
  listApps,
  readState,
  removeState,
  takeLock,
  writeState,
  type AppState,
  type FirewallSettings,
  type Instance,
  type StopPolicy,
} from '../core/state.js';
import { inspectPreload, placePreload, preloadEnv } from '../drain/preload.js';
import { guardScript, type DenyChain } from '../os/nftguard.js';
import { inPlacePreflight, inPlaceSteps } from './inplace.js';
import { finishCanary, refuseDeploy, splitTo } from './canary.js';
import { causeOf, planSteps, runSteps, StepFailed, type Step, type StepRun } from '../core/steps.js';
import type { Sys } from '../os/sys.js';
import type { DeployOptions, DeployRun, Preflight } from './deploy-run.js';

// the deploy's options are its callers' (cli.ts, supervisor.ts); the run is its steps' (inplace.ts)
export type { DeployOptions, DeployRun } from './deploy-run.js';

/** Watches the new instance for --verify: alive, and its readiness check passing, the whole time. */
async function verify(
  ctx: Ctx,
  o: DeployOptions,
  check: ReadyCheck,
  cand: Instance,
  exited: Promise<unknown>,
  env: NodeJS.ProcessEnv,
): Promise<void> {
  let gone = false;
  void exited.then(() => (gone = true));
  const until = ctx.sys.now() + o.verifyMs!;
  let failures = 0;
  while (ctx.sys.now() < until) {
    if (gone || !(await isAlive(ctx.sys, cand.pid, cand.startTime))) {
      throw new PortflipError(
        'deployFailed',
        `the new instance (pid ${cand.pid}) exited during --verify; switched back`,
      );
    }
    // one failed check can be a blip; two in a row is a failing instance
    const ok = await checkOnce(ctx.sys, check, cand.port, 2000, { ...env, PORT: String(cand.port) });
    failures = ok ? 0 : failures + 1;
    if (failures >= 2)
      throw new PortflipError(
        'deployFailed',
        `the new instance on port ${cand.port} failed its readiness check during --verify; switched back`,
      );
    if (ctx.abort.aborted) throw new PortflipError('deployFailed', 'interrupted during --verify; switched back');
    await ctx.sys.sleep(250, ctx.abort);
  }
}

/** Ports chosen when --ports is not given: below the kernel's ephemeral range, so clients never hold them. */
export const DEFAULT_PORT_RANGE = [20000, 29999] as const;

const hookStep = (name: HookName, when: 'before' | 'after', soft = false): Step<DeployRun> => ({
  name,
  does: (r) => `run the ${name} hook: ${r.o.hooks?.[name]}`,
  undo: '',
  skip: (r) => !r.o.hooks?.[name] || (name === 'after_drain' && !r.retiring.length),
  run: (r) => runHook(r.ctx.sys, name, r.o.hooks![name]!, hookContext(r, name)),
  where: (r) => ({ port: r.cand.port }),
  soft: soft || when === 'after',
});

/**
 * The deploy, step by step. Each step's undo is registered before it acts; a failure or Ctrl-C
 * undoes the completed steps in reverse, once. --dry-run prints this same list.
 */
const DEPLOY: Step<DeployRun>[] = [
  {
    name: 'retire',
    does: (r) =>
      `drain and stop ${r.stale.map((i) => `the ${i.state} instance on ${instanceLabel(i)}`).join(', ')} (left by an earlier run)`,
    undo: '',
    skip: (r) => !r.stale.length,
    run: async (r) => void (await Promise.all(r.stale.map((i) => retire(r.ctx, r.st, i, r.pre.ipt)))),
    where: (r) => ({ port: r.stale[0].port, pid: r.stale[0].pid }),
    detail: (r) => `${r.stale.length} earlier instance${r.stale.length > 1 ? 's' : ''} stopped`,
  },
  ...inPlaceSteps.before,
  hookStep('before_start', 'before'),
  {
    name: 'start',
    does: (r) =>
      `run ${JSON.stringify(r.cand.command)} in ${r.o.cwd}${r.o.user ? ` as ${r.o.user}` : ''} with PORT=${r.cand.port}` +
      `${r.o.nodeDrain ? ' and the Node drain preload in NODE_OPTIONS' : ''}, log to ${r.cand.log}`,
    undo: 'SIGKILL its process group, forget it',
    run: async (r, run) => {
      const { ctx, st, cand, o } = r;
      // recorded before it exists, so a run killed right after the spawn still finds it by its port
      st.instances.push(cand);
      run.undo(`stopped the candidate on ${instanceLabel(cand)}`, async () => {
        await killNow(ctx.sys, cand);
        st.instances = st.instances.filter((i) => i !== cand);
        await writeState(ctx.sys, ctx.paths, st);
      });
      await writeState(ctx.sys, ctx.paths, st);
      // Node apps get the drain preload; other programs ignore NODE_OPTIONS (README: "The Node drain module")
      r.preload = o.nodeDrain ? await placePreload(ctx.sys, ctx.env, r.pre.user) : null;
      if (r.preload && r.preload.path === null)
        ctx.emit({ kind: 'notice', app: o.app, message: `node-drain off for this instance: ${r.preload.why}` });
      const extraEnv = r.preload?.path ? preloadEnv(r.pre.env, r.preload.path, o.stop.killAfterMs) : {};
      const env = { ...r.pre.env, ...extraEnv, PORT: String(cand.port) };
      const spec = { command: cand.command, port: cand.port, cwd: o.cwd, env, user: r.pre.user, log: cand.log };
      r.spawned = await spawnInstance(ctx.sys, spec);
      cand.pid = r.spawned.pid;
      cand.startTime = (await readStat(ctx.sys, cand.pid))?.startTime ?? null;
      await writeState(ctx.sys, ctx.paths, st);
    },
    where: (r) => ({ port: r.cand.port, pid: r.cand.pid }),
    detail: (r) =>
      r.preload?.path
        ? `node-drain preload in NODE_OPTIONS${r.preload.copied ? ` (${r.preload.path})` : ''}`
        : undefined,
  },
  {
    name: 'ready',
    does: (r) =>
      `wait up to ${r.o.readyTimeoutMs}ms for ${
        r.o.ready.kind === 'tcp'
          ? `a TCP connect to port ${r.cand.port}`
          : r.o.ready.kind === 'http'
            ? r.o.ready.url.replaceAll('{port}', String(r.cand.port))
            : `"${r.o.ready.command}" to exit 0`
      }`,
    undo: "start's undo",
    run: async (r) => {
      const { ctx, cand, spawned } = r;
      const env = { ...r.pre.env, PORT: String(cand.port) };
      const res = await waitReady(
        ctx.sys,
        r.check,
        { pid: spawned!.pid, port: cand.port, exited: spawned!.exited },
        r.o.readyTimeoutMs,
        env,
        ctx.abort,
      );
      if (!res.ready) throw new PortflipError('deployFailed', res.reason);
      if (r.preload?.path) {
        const seen = await inspectPreload(ctx.sys, spawned!.pid, cand.port, r.preload.path);
        [r.loadedIn, cand.nodeDrain] = [seen.loadedIn, seen.listeners];
      }
    },
    where: (r) => ({ port: r.cand.port, pid: r.cand.pid }),
    detail: (r) =>
      r.preload?.path
        ? r.loadedIn.length
          ? `node-drain loaded in ${r.loadedIn.join(', ')}`
          : 'node-drain not loaded: no Node.js process'
        : undefined,
  },
  {
    name: 'bind-check',
    does: (r) => `check the candidate listens on all addresses (0.0.0.0 or ::) on port ${r.cand.port}`,
    undo: "start's undo",
    run: async (r) => void (r.families = await bindCheck(r.o, r.ctx, r.pre.ipt, r.cand.port)),
    where: (r) => ({ port: r.cand.port, pid: r.cand.pid }),
  },
  hookStep('after_ready', 'before'),
  {
    // the way to the new port opens before anything points at it: the filter chain accepts what will be
    // redirected there, and native nftables chains that drop by default learn the public port. The
    // switch itself is then the nat commit alone.
    name: 'open',
    does: (r) =>
      `accept connections redirected to port ${r.cand.port} (filter, one commit per family)` +
      (r.pre.denyChains.length ? `, and from port ${r.o.listen} in ${r.pre.denyChains.map(chainName).join(', ')}` : ''),
    undo: 'close it again',
    skip: (r) => r.o.firewall.mode === 'off',
    run: async (r, run) => {
      const { ctx, st, pre } = r;
      const wantGuard = { listen: r.o.listen, fw: firewallOf({ firewall: r.o.firewall })! };
      if (guardScript(pre.denyChains, r.o.app, wantGuard)) {
        if (!r.prev) run.undo('nftables accept removed', async () => void (await syncGuard(ctx, st, 'absent')));
        await syncGuard(ctx, { ...st, firewall: r.o.firewall }, 'present');
      }
      const target = (f: Family) => (pre.views.get(f) ? appRules(pre.views.get(f)!, r.o.app).target : null);
      for (const f of r.families) {
        const was = switchSpec(r, f, target(f), st.firewall);
        const before = { ...was, open: was.target === null ? [] : was.open.filter((p) => p !== r.cand.port) };
        run.undo(`${f}: port ${r.cand.port} closed again`, async () => void (await applySpec(pre.ipt, f, before)));
      }
      // side by side, each family one commit. Their nat tables are as read, so the switch commits nat
      // from these views without reading again; the canary step commits both tables, from a new read.
      await Promise.all(
        r.families.map(async (f) => {
          await applySpec(pre.ipt, f, switchSpec(r, f, target(f), r.o.firewall), pre.views.get(f));
          if (r.o.canary) pre.views.set(f, await pre.ipt.save(f));
          else r.opened.add(f);
        }),
      );
    },
    where: (r) => ({ port: r.cand.port, pid: r.cand.pid }),
  },
  {
    name: 'switch',
    skip: (r) => !!r.o.canary,
    does: (r) =>
      `${r.o.firewall.mode === 'off' ? '' : `accept connections redirected to ${r.cand.port} (filter), then `}` +
      `redirect port ${r.o.listen} to ${r.cand.port} (nat): one iptables-restore --noflush commit per family` +
      (r.prev ? ` (from ${r.prev.port})` : ''),
    undo: 'the same commit pointing back at the previous instance (or removing the rules on a first deploy); the state as it was',
    run: (r, run) => switchTo(r, run),
    where: (r) => ({ port: r.cand.port, pid: r.cand.pid }),
    detail: (r) => (r.inPlace ? 'in place' : r.prev ? `from port ${r.prev.port}` : 'first instance'),
  },
  ...inPlaceSteps.after,
  {
    name: 'canary',
    skip: (r) => !r.o.canary,
    does: (r) =>
      `send ${r.o.canary!.percent}% of ${r.o.canary!.by === 'ip' ? 'client addresses' : 'new connections'} on port ` +
      `${r.o.listen} to ${r.cand.port}, the rest to ${r.prev?.port}: one iptables-restore --noflush commit per family`,
    undo: 'the same commit without the split; the state as it was',
    run: (r, run) =>
      splitTo(r.ctx, r.pre.ipt, r.st, r.cand, { ...r.o, canary: r.o.canary!, families: r.families }, run, r.pre.views),
    where: (r) => ({ port: r.cand.port, pid: r.cand.pid }),
    detail: (r) => `${r.o.canary!.percent}% by ${r.o.canary!.by}; the rest to port ${r.prev?.port}`,
  },
  {
    name: 'verify',
    does: (r) => `watch port ${r.cand.port} for ${r.o.verifyMs}ms: alive, and its check passing`,
    undo: "switch's undo, then start's",
    skip: (r) => !r.o.verifyMs || !!r.o.canary,
    run: (r) => verify(r.ctx, r.o, r.check, r.cand, r.spawned!.exited, r.pre.env),
    where: (r) => ({ port: r.cand.port, pid: r.cand.pid }),
  },
  // past the switch (and --verify) the new instance serves: nothing before this point is undone
  { ...hookStep('after_switch', 'after'), settles: true },
  {
    name: 'canary-for',
    does: (r) =>
      `watch the canary on port ${r.cand.port} for ${r.o.canary?.forMs}ms (alive, its check once a second); ` +
      'then promote it, or abort if it dies or fails two checks in a row',
    undo: '',
    skip: (r) => !r.o.canary?.forMs,
    run: async (r) => {
      const env = { ...r.pre.env };
      await finishCanary(r.ctx, r.pre.ipt, r.st, r.cand, r.check, env, r.o.canary!.forMs!, r.spawned?.exited);
    },
    where: (r) => ({ port: r.cand.port, pid: r.cand.pid }),
    detail: () => 'promoted',
  },
  {
    name: 'drain',
    does: (r) =>
      r.prev
        ? `${r.o.keepOldMs ? `keep port ${r.prev.port} for ${r.o.keepOldMs}ms, then ` : ''}${drainWords(r.o.stop, r.prev)}; ` +
          `then close port ${r.prev.port} in the filter chain`
        : 'nothing to drain (first instance)',
    undo: '',
    skip: (r) => !r.retiring.length,
    run: async (r) => {
      // their ports leave the filter chain only once they are gone: open connections pass until then
      r.marks = await Promise.all(r.retiring.map((i) => retire(r.ctx, r.st, i, r.pre.ipt)));
      await applyState(r.ctx, r.pre.ipt, r.st, undefined, true);
    },
    where: (r) => ({ port: r.prev?.port, pid: r.prev?.pid }),
    detail: (r) =>
      `${r.retiring.length} instance${r.retiring.length > 1 ? 's' : ''} stopped` +
      r.marks.flatMap((m) => (m ? [`; ${markingWords(m)}`] : [])).join(''),
  },
  hookStep('after_drain', 'after'),
];

/** An nftables chain as nft names it: family, table, chain. */
const chainName = (c: DenyChain) => `${c.family} ${c.table} ${c.chain}`;

const drainWords = (stop: StopPolicy, old: Instance) => {
  const unlessNode = stop.drain === 'auto' ? 'unless the Node drain module listens on it, ' : '';
  const drain =
    stop.drain === 'signal'
      ? ''
      : `${unlessNode}wait until port ${old.port} has no open connections (at most ${stop.drainTimeoutMs}ms), then `;
  return `${drain}send ${stop.stopSignal} to pid ${old.pid}'s group; SIGKILL after ${stop.killAfterMs}ms`;
};

/** The switch: per family, the accept before the redirect in one commit; then the state, each undo first. */
async function switchTo(r: DeployRun, run: StepRun): Promise<void> {
  const { o, ctx, st, cand, pre } = r;
  const old = r.prev;
  const families = pre.ipt.families.filter(
    (f) => r.families.includes(f) || st.families.includes(f) || !!pre.views.get(f)?.nat.chains.has(appChain(o.app)),
  );
  // every way back is registered first; then the families commit side by side (each one atomic on its own)
  for (const f of families) {
    const back = old && st.families.includes(f);
    const previous = st.firewall;
    run.undo(`${f} redirect ${back ? `back on port ${old!.port}` : 'removed'}`, async () => {
      await applySpec(pre.ipt, f, switchSpec(r, f, back ? old!.port : null, previous));
    });
  }
  await Promise.all(
    families.map(async (f) => {
      try {
        await applySpec(
          pre.ipt,
          f,
          switchSpec(r, f, r.families.includes(f) ? cand.port : null, o.firewall),
          pre.views.get(f),
          r.opened.has(f) ? 'nat' : undefined,
        );
      } catch (err) {
        throw new PortflipError('deployFailed', `the ${f} switch failed: ${(err as Error).message.split('\n')[0]}`);
      }
    }),
  );
  const before = { families: st.families, oldState: old?.state, firewall: st.firewall };
  run.undo(`state back on ${old ? `port ${old.port}` : 'no instance'}`, async () => {
    Object.assign(st, { families: before.families, firewall: before.firewall });
    move(cand, 'candidate');
    if (old) [move(old, before.oldState!).keepUntil] = [undefined];
    await writeState(ctx.sys, ctx.paths, st);
  });
  Object.assign(st, { families: r.families, firewall: o.firewall, stop: o.stop });
  move(cand, 'active');
  if (old) {
    move(old, o.keepOldMs ? 'kept' : 'draining');
    if (o.keepOldMs) old.keepUntil = ctx.sys.wallNow() + o.keepOldMs;
  }
  r.retiring = st.instances.filter((i) => i.state === 'draining');
  await writeState(ctx.sys, ctx.paths, st);
}

/** What one family's rules say after the switch: the redirect at `target`, every live port open. */
function switchSpec(
  r: DeployRun,
  family: Family,
  target: number | null,
  firewall: FirewallSettings | undefined,
): AppSpec {
  const open = [
    ...r.st.instances.filter((i) => i.state !== 'candidate' && i !== r.cand).map((i) => i.port),
    r.cand.port,
  ];
  // a hold in force stays until the release step
  const hold = r.st.hold && target !== null ? r.st.hold.queue : null;
  return { app: r.o.app, listen: r.o.listen, target, open, firewall: firewallOf({ firewall }), hold };
}

/** Hooks run as the app's user, in its directory, told which step they stand in. */
function hookContext(r: DeployRun, name: HookName, failedStep?: string) {
  const env = {
    ...r.pre.env,
    PORTFLIP_APP: r.o.app,
    PORTFLIP_PORT: String(r.cand.port),
    PORTFLIP_PREVIOUS_PORT: r.prev ? String(r.prev.port) : '',
    PORTFLIP_STEP: failedStep ?? name,
  };
  return { cwd: r.o.cwd, env, user: r.pre.user };
}

export async function deploy(o: DeployOptions, ctx: Ctx): Promise<void> {
  const { sys, emit, paths } = ctx;
  appChain(o.app); // refuses a bad name before anything else
  if (o.ports?.length === 1 && (o.verifyMs || o.keepOldMs || o.canary))
    fail(
      'usage',
      `--ports ${o.ports[0]} is an in-place restart (one instance port): --verify, --keep-old and --canary need two ports`,
    );
  const t0 = sys.now();
  // preflight: every check, no side effect but the lock and repairs of earlier runs; bad input
  // fails here with one line and no event: nothing was started or changed
  const pre = await preflight(o, ctx);
  emit({ kind: 'step', step: 'preflight', app: o.app, status: 'ok', durationMs: sys.now() - t0 });
  const st = pre.state;
  const r: DeployRun = {
    o,
    ctx,
    pre,
    st,
    prev: st.instances.find((i) => i.state === 'active'),
    stale: st.instances.filter((i) => i.state === 'kept' || i.state === 'draining'),
    cand: {
      port: pre.port,
      pid: null,
      startTime: null,
      state: 'candidate',
      startedAt: new Date(sys.wallNow()).toISOString(),
      command: o.command.map((a) => a.replaceAll('{port}', String(pre.port))),
      log: join(paths.logDir, `${o.app}-${pre.port}.log`),
    },
    check: o.ready.kind === 'cmd' ? { ...o.ready, user: pre.user } : o.ready,
    preload: null,
    loadedIn: [],
    families: [],
    retiring: [],
    inPlace: false,
    opened: new Set(),
    marks: [],
  };
  r.inPlace = !!r.prev && o.ports?.length === 1 && o.ports[0] === r.prev.port;
  if (o.dryRun) return plan(r);
  try {
    if (r.inPlace) await inPlacePreflight(r);
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
    const at = failed instanceof StepFailed ? failed.step : 'preflight';
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

async function preflight(o: DeployOptions, ctx: Ctx): Promise<Preflight> {
  const { sys, paths } = ctx;
  if (o.listen < 1 || o.listen > 65535) fail('usage', `--listen ${o.listen}: a port is 1-65535`);
  for (const p of o.ports ?? []) {
    if (!Number.isInteger(p) || p < 1 || p > 65535) fail('usage', `--ports: ${p} is not a port (1-65535)`);
    if (p === o.listen) fail('usage', `--ports: ${p} is the public port; instance ports must differ from --listen`);
  }
  if (o.ports && new Set(o.ports).size !== o.ports.length)
    fail('usage', `--ports: give distinct ports, like 8001,8002`);
  if (!o.command.length)
    fail('usage', 'no command: write it after "--", like: portflip deploy web --listen 80 -- node server.js');
  const cwdOk = await sys.fs.stat(o.cwd).then(
    (s) => s.isDirectory,
    () => false,
  );
  if (!cwdOk) fail('config', `--cwd ${o.cwd}: no such directory`);
  const user = o.user ? await lookupUser(sys, o.user) : undefined;
  const env: NodeJS.ProcessEnv = { ...ctx.env, ...o.env, PORTFLIP_APP: o.app };
  for (const k of ['PORTFLIP_STATE_DIR', 'PORTFLIP_RUN_DIR', 'PORTFLIP_IPTABLES', 'PORTFLIP_PRELOAD_DIR'])
    delete env[k];
  if (user) Object.assign(env, { HOME: user.home, USER: user.name, LOGNAME: user.name });
  await resolveCommand(sys, o.command[0].replaceAll('{port}', '0'), o.cwd, env.PATH);

  if (o.dryRun) {
    // no lock and no change: the live rules are read where that is allowed, to show the exact commit
    const state = (await readState(sys, paths, o.app).catch(() => null)) ?? freshState(o, 'nft', []);
    const port =
      o.ports?.find((p) => !state.instances.some((i) => i.state === 'active' && i.port === p)) ??
      (o.ports ?? [DEFAULT_PORT_RANGE[0]])[0];
    const ipt = await openIptables(ctx, state.backend).catch(() => null);
    const views = new Map<Family, RulesView>();
    for (const f of ipt?.families ?? []) views.set(f, await ipt!.save(f));
    Object.assign(state, { listen: o.listen });
    refuseDeploy(state, o.canary, true);
    const denyChains = ipt ? await (await openGuard(ctx.sys)).chains() : [];
    return {
      ipt: ipt as Iptables,
      lock: { release: async () => {} },
      user,
      env,
      state,
      port,
      views,
      fresh: false,
      denyChains,
    };
  }

  const recorded = await readState(sys, paths, o.app);
  const ipt = await openIptables(ctx, recorded?.backend);
  if (o.ipv6 === 'on' && !ipt.families.includes('ipv6'))
    fail('noIptables', '--ipv6 on: ip6tables nat does not work on this host; use --ipv6 auto or off');
  await ensureDirs(sys, paths);
  const lock = await takeLock(sys, paths, o.app, `deploy ${o.app}`, (m) =>
    ctx.emit({ kind: 'notice', app: o.app, message: m }),
  );
  try {
    const existing = await readState(sys, paths, o.app);
    const state = existing ?? freshState(o, ipt.backend, []);
    if (state.listen !== o.listen && state.instances.length) {
      ctx.emit({ kind: 'notice', app: o.app, message: `public port changes from ${state.listen} to ${o.listen}` });
    }
    const { views, chains } = await reconcile(ctx, ipt, state);
    refuseDeploy(state, o.canary);
    state.listen = o.listen;
    state.backend = ipt.backend;
    // read again only when the repair changed the nftables accept
    const [port, denyChains] = await Promise.all([
      pickPort(o, ctx, state),
      chains ?? openGuard(ctx.sys).then((g) => g.chains()),
    ]);
    await warnFirewall(o, ctx, views, port, denyChains);
    return { ipt, lock, user, env, state, port, views, fresh: !existing, denyChains };
  } catch (err) {
    await lock.release();
    throw err;
  }
}

/** Warnings that change nothing: a filling conntrack table, and with --firewall off, a filter that would drop. */
async function warnFirewall(
  o: DeployOptions,
  ctx: Ctx,
  views: Map<Family, RulesView>,
  port: number,
  denyChains: DenyChain[],
): Promise<void> {
  const note = (message: string) => ctx.emit({ kind: 'notice', app: o.app, message });
  const fill = await conntrackFill(ctx.sys);
  if (fill && fill.percent >= CONNTRACK_WARN_PERCENT) note(conntrackWarning(fill));
  if (o.firewall.mode !== 'off') return;
  for (const [f, view] of views) {
    if (!wouldDrop(view.filter, port)) continue;
    const tool = f === 'ipv4' ? 'iptables' : 'ip6tables';
    note(
      `--firewall off: ${tool}'s INPUT drops what it does not accept, ` +
        `and nothing accepts connections redirected to port ${port}, so clients on other hosts will get no answer. ` +
        `Fix: ${tool} -I INPUT -p tcp -m conntrack --ctstate DNAT --ctorigdstport ${o.listen} -j ACCEPT, ` +
        'or deploy with --firewall auto',
    );
  }
  for (const c of denyChains) {
    const chain = chainName(c);
    note(
      `--firewall off: nftables chain "${chain}" drops by default ` +
        `and will drop connections redirected to port ${port}. ` +
        `Fix: nft insert rule ${chain} ct status dnat ct original proto-dst ${o.listen} accept, ` +
        'or deploy with --firewall auto',
    );
  }
}

const freshState = (o: DeployOptions, backend: AppState['backend'], families: Family[]): AppState => ({
  schema: 1,
  app: o.app,
  listen: o.listen,
  backend,
  families,
  stop: o.stop,
  instances: [],
  updatedAt: '',
});

async function pickPort(o: DeployOptions, ctx: Ctx, st: AppState): Promise<number> {
  const socks = await tcpListeners(ctx.sys);
  const taken = new Set<number>();
  for (const other of await listApps(ctx.sys, ctx.paths)) {
    if (other === o.app) continue;
    for (const i of (await readState(ctx.sys, ctx.paths, other).catch(() => null))?.instances ?? []) taken.add(i.port);
  }
  const ours = (p: number) => st.instances.find((i) => i.port === p);
  const free = (p: number) => !taken.has(p) && p !== o.listen && !listenersOn(socks, p).length;
  // one instance port and the active instance on it: an in-place restart (hold.ts)
  if (o.ports?.length === 1 && ours(o.ports[0])?.state === 'active') return o.ports[0];
  if (o.ports) {
    const usable = o.ports.filter((p) => ours(p)?.state !== 'active');
    const pick = usable.find((p) => !ours(p) && free(p)) ?? usable.find((p) => ours(p)); // our kept one is retired first
    if (pick === undefined) {
      const user = (p: number) => `${p}: ${ours(p) ? `our ${ours(p)!.state} instance` : 'another process'}`;
      const users = o.ports.map(user).join(', ');
      fail('portInUse', `--ports ${o.ports.join(',')}: every port is in use (${users}); free one or give another`);
    }
    if (!ours(pick!) && !free(pick!)) {
      const other = taken.has(pick!) ? ' (another portflip app)' : '';
      fail('portInUse', `port ${pick} is already in use by another process${other}; stop it or pick other --ports`);
    }
    return pick!;
  }
  for (let p = DEFAULT_PORT_RANGE[0]; p <= DEFAULT_PORT_RANGE[1]; p++) if (!ours(p) && free(p)) return p;
  return fail('portInUse', `no free port in ${DEFAULT_PORT_RANGE.join('-')}; give --ports`);
}

async function bindCheck(o: DeployOptions, ctx: Ctx, ipt: Iptables, port: number): Promise<Family[]> {
  const listeners = listenersOn(await tcpListeners(ctx.sys), port);
  const v6only = ((await ctx.sys.readText('/proc/sys/net/ipv6/bindv6only')) ?? '0').trim() === '1';
  const hostV6 = ipt.families.includes('ipv6');
  const listensV6 = listeners.some((s) => s.family === 'ipv6' && s.localAddr === '::');
  const wantV6 = hostV6 && (o.ipv6 === 'on' || (o.ipv6 === 'auto' && listensV6));
  const problem = bindProblem(listeners, wantV6, v6only);
  if (problem) throw new PortflipError('deployFailed', `the candidate on port ${port} ${problem}`);
  return wantV6 ? ['ipv4', 'ipv6'] : ['ipv4'];
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
    steps: [
      {
        step: 'preflight',
        does: 'check root, iptables, config, command, free port; take the lock; repair what an earlier run left',
        undo: 'release the lock',
      },
      ...planSteps(DEPLOY, r),
    ],
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

/** Runs one lifecycle hook; its output goes to portflip's stderr so --json stdout stays clean. */
type HookPlace = { cwd: string; env: NodeJS.ProcessEnv; user?: User };
async function runHook(sys: Sys, name: HookName, command: string, o: HookPlace): Promise<void> {
  const r = await sys.run('sh', ['-c', command], {
    cwd: o.cwd,
    env: o.env,
    uid: o.user?.uid,
    gid: o.user?.gid,
    output: 'stderr',
    timeoutMs: HOOK_TIMEOUT_MS,
  });
  if (r.error) throw new PortflipError('deployFailed', `${name} hook could not start: ${r.error}`);
  if (r.code !== 0) {
    const how = r.signal ? `killed by ${r.signal}` : `exit ${r.code}`;
    throw new PortflipError('deployFailed', `${name} hook failed (${how}): ${command}`);
  }
}

/** A hook that hangs must not hold the deploy (and its lock) forever. */
export const HOOK_TIMEOUT_MS = 300_000;
