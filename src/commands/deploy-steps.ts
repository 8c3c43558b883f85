// The deploy's steps, each a named definition: what it does, how it is undone, and its run. deploy.ts lists
// them in order; --dry-run prints the same definitions.

import type { HookName } from '../cli/config.js';
import { move } from '../core/lifecycle.js';
import { PortflipError } from '../core/errors.js';
import { checkOnce, killNow, spawnInstance, waitReady, type ReadyCheck, type User } from '../ops/instance.js';
import { appChain, appRules, type AppSpec, type Family, type Iptables } from '../os/iptables.js';
import { applySpec, firewallOf } from '../ops/rules.js';
import { syncGuard } from '../ops/guard.js';
import type { Ctx } from '../ops/context.js';
import { applyState } from '../ops/reconcile.js';
import { retire } from '../ops/retire.js';
import { markingWords } from '../core/events.js';
import { bindProblem, isAlive, listenersOn, readStat, tcpListeners } from '../os/proc.js';
import { instanceLabel, writeState, type FirewallSettings, type Instance, type StopPolicy } from '../core/state.js';
import { inspectPreload, placePreload, preloadEnv } from '../drain/preload.js';
import { guardScript, type DenyChain } from '../os/nftguard.js';
import { finishCanary, splitTo } from './canary.js';
import type { Step, StepRun } from '../core/steps.js';
import type { Sys } from '../os/sys.js';
import type { DeployOptions, DeployRun } from './deploy-run.js';

/** A lifecycle hook as a step: skipped unless configured; a hook after the switch fails softly. */
const hookStep = (name: HookName, when: 'before' | 'after', soft = false): Step<DeployRun> => ({
  name,
  does: (r) => `run the ${name} hook: ${r.o.hooks?.[name]}`,
  undo: '',
  skip: (r) => !r.o.hooks?.[name] || (name === 'after_drain' && !r.retiring.length),
  run: (r) => runHook(r.ctx.sys, name, r.o.hooks![name]!, hookContext(r, name)),
  where: (r) => ({ port: r.cand.port }),
  soft: soft || when === 'after',
});

export const beforeStart = hookStep('before_start', 'before');
export const afterReady = hookStep('after_ready', 'before');
/** Past the switch (and --verify) the new instance serves: nothing before this point is undone. */
export const afterSwitch: Step<DeployRun> = { ...hookStep('after_switch', 'after'), settles: true };
export const afterDrain = hookStep('after_drain', 'after');

/** What an earlier run left kept or draining goes first: an app has at most two instances. */
export const retireStale: Step<DeployRun> = {
  name: 'retire',
  does: (r) =>
    `drain and stop ${r.stale.map((i) => `the ${i.state} instance on ${instanceLabel(i)}`).join(', ')} ` +
    '(left by an earlier run)',
  undo: '',
  skip: (r) => !r.stale.length,
  run: async (r) => void (await Promise.all(r.stale.map((i) => retire(r.ctx, r.st, i, r.pre.ipt)))),
  where: (r) => ({ port: r.stale[0].port, pid: r.stale[0].pid }),
  detail: (r) => `${r.stale.length} earlier instance${r.stale.length > 1 ? 's' : ''} stopped`,
};

/** The candidate, detached in its own process group, recorded in the state before it exists. */
export const start: Step<DeployRun> = {
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
    // Node apps get the drain preload; other programs ignore NODE_OPTIONS (docs/drain.md: "The Node drain module")
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
    r.preload?.path ? `node-drain preload in NODE_OPTIONS${r.preload.copied ? ` (${r.preload.path})` : ''}` : undefined,
};

/** Its readiness check races its exit and the deadline: a timeout is a failure, never a success. */
export const ready: Step<DeployRun> = {
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
};

/** A candidate bound to 127.0.0.1 only would be unreachable through REDIRECT from other hosts. */
export const bindCheck: Step<DeployRun> = {
  name: 'bind-check',
  does: (r) => `check the candidate listens on all addresses (0.0.0.0 or ::) on port ${r.cand.port}`,
  undo: "start's undo",
  run: async (r) => void (r.families = await listeningFamilies(r.o, r.ctx, r.pre.ipt, r.cand.port)),
  where: (r) => ({ port: r.cand.port, pid: r.cand.pid }),
};

/**
 * The way to the new port opens before anything points at it: the filter chain accepts what will be
 * redirected there, and native nftables chains that drop by default learn the public port. The switch
 * itself is then the nat commit alone.
 */
export const open: Step<DeployRun> = {
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
};

/** The switch: one iptables-restore commit per family points the public port at the candidate. */
export const switchRedirect: Step<DeployRun> = {
  name: 'switch',
  skip: (r) => !!r.o.canary,
  does: (r) =>
    `${r.o.firewall.mode === 'off' ? '' : `accept connections redirected to ${r.cand.port} (filter), then `}` +
    `redirect port ${r.o.listen} to ${r.cand.port} (nat): one iptables-restore --noflush commit per family` +
    (r.prev ? ` (from ${r.prev.port})` : ''),
  undo:
    'the same commit pointing back at the previous instance (or removing the rules on a first deploy); ' +
    'the state as it was',
  run: (r, run) => switchTo(r, run),
  where: (r) => ({ port: r.cand.port, pid: r.cand.pid }),
  detail: (r) => (r.inPlace ? 'in place' : r.prev ? `from port ${r.prev.port}` : 'first instance'),
};

/** With --canary, a share of new connections instead of the switch (canary.ts). */
export const canarySplit: Step<DeployRun> = {
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
};

/** With --verify, the new instance is watched while the previous one can still take over. */
export const verify: Step<DeployRun> = {
  name: 'verify',
  does: (r) => `watch port ${r.cand.port} for ${r.o.verifyMs}ms: alive, and its check passing`,
  undo: "switch's undo, then start's",
  skip: (r) => !r.o.verifyMs || !!r.o.canary,
  run: (r) => watchNewInstance(r.ctx, r.o, r.check, r.cand, r.spawned!.exited, r.pre.env),
  where: (r) => ({ port: r.cand.port, pid: r.cand.pid }),
};

/** With --canary-for, the canary is watched, then promoted or aborted. */
export const canaryFor: Step<DeployRun> = {
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
};

/** The instances the switch left draining are drained and stopped under the stop policy. */
export const drain: Step<DeployRun> = {
  name: 'drain',
  does: (r) =>
    r.prev
      ? `${r.o.keepOldMs ? `keep port ${r.prev.port} for ${r.o.keepOldMs}ms, then ` : ''}` +
        `${drainWords(r.o.stop, r.prev)}; ` +
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
};

/** Watches the new instance for --verify: alive, and its readiness check passing, the whole time. */
async function watchNewInstance(
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

/** An nftables chain as nft names it: family, table, chain. */
export const chainName = (c: DenyChain) => `${c.family} ${c.table} ${c.chain}`;

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
export function switchSpec(
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
export function hookContext(r: DeployRun, name: HookName, failedStep?: string) {
  const env = {
    ...r.pre.env,
    PORTFLIP_APP: r.o.app,
    PORTFLIP_PORT: String(r.cand.port),
    PORTFLIP_PREVIOUS_PORT: r.prev ? String(r.prev.port) : '',
    PORTFLIP_STEP: failedStep ?? name,
  };
  return { cwd: r.o.cwd, env, user: r.pre.user };
}

async function listeningFamilies(o: DeployOptions, ctx: Ctx, ipt: Iptables, port: number): Promise<Family[]> {
  const listeners = listenersOn(await tcpListeners(ctx.sys), port);
  const v6only = ((await ctx.sys.readText('/proc/sys/net/ipv6/bindv6only')) ?? '0').trim() === '1';
  const hostV6 = ipt.families.includes('ipv6');
  const listensV6 = listeners.some((s) => s.family === 'ipv6' && s.localAddr === '::');
  const wantV6 = hostV6 && (o.ipv6 === 'on' || (o.ipv6 === 'auto' && listensV6));
  const problem = bindProblem(listeners, wantV6, v6only);
  if (problem) throw new PortflipError('deployFailed', `the candidate on port ${port} ${problem}`);
  return wantV6 ? ['ipv4', 'ipv6'] : ['ipv4'];
}

/** Runs one lifecycle hook; its output goes to portflip's stderr so --json stdout stays clean. */
type HookPlace = { cwd: string; env: NodeJS.ProcessEnv; user?: User };
export async function runHook(sys: Sys, name: HookName, command: string, o: HookPlace): Promise<void> {
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
