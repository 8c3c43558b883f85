// The commands around a deploy: status, rollback, stop, restore, cleanup, and the kept-instance reaper.

import { fail, PortflipError } from '../core/errors.js';
import { drainAndStop } from '../ops/instance.js';
import { move } from '../core/lifecycle.js';
import { retire } from './deploy.js';
import {
  appChain,
  checkApp,
  cleanupText,
  detectBackend,
  recordedBackend,
  type Backend,
  type Family,
  type Iptables,
  type RulesView,
  type Verdict,
} from '../os/iptables.js';
import { causeOf, runSteps, type Step } from '../core/steps.js';
import { GUARD_PREFIX, guardScript, type DenyChain } from '../os/nftguard.js';
import {
  instanceLabel,
  conntrackFill,
  conntrackWarning,
  CONNTRACK_WARN_PERCENT,
  openGuard,
  reconcile,
  removeApp,
  requireNetAdmin,
  syncGuard,
  guardWanted,
  underLock,
  finishLeftovers,
  pointAll,
  wantedSpec,
  type Ctx,
} from '../ops/reconcile.js';
import { endHolder, formatHold, holdStatus, type HoldStatus } from './hold.js';
import { isAlive, openConnections, tcpSockets } from '../os/proc.js';
import { listApps, readState, removeState, takeLock, writeState, type AppState, type Instance } from '../core/state.js';

/** What rollback, stop and restore work on: the app's state under its lock, and its rules. */
interface AppRun {
  ctx: Ctx;
  st: AppState;
  ipt: Iptables;
  kept?: Instance; // rollback: the instance it goes back to
  bad?: Instance; // rollback: the instance it leaves
  stopped: number;
  foreign: Set<string>; // stop: rules outside portflip that still jump to the app's chain
}

/** Runs steps on the app's state under its lock, after finding out what is real (unless the steps do that). */
async function withApp(
  ctx: Ctx,
  app: string,
  what: string,
  steps: Step<AppRun>[],
  prepare?: (r: AppRun) => void,
  reconcileFirst = true,
): Promise<void> {
  await underLock(
    ctx,
    app,
    what,
    async (st, ipt) => {
      const r: AppRun = { ctx, st, ipt, stopped: 0, foreign: new Set() };
      prepare?.(r);
      await runSteps(steps, r, { app, sys: ctx.sys, emit: ctx.emit }).catch((err) => {
        throw causeOf(err);
      });
      await finishLeftovers(ctx, ipt, st);
    },
    reconcileFirst,
  );
}

/** Rules first, then the state: a run killed between them is finished by reconcile, which adopts the redirect. */
const repoint = async (r: AppRun) => {
  await pointAll(r.ipt, r.st);
  await writeState(r.ctx.sys, r.ctx.paths, r.st);
};

/** rollback: back to the kept instance in one commit per family, then the instance it leaves drains. */
const ROLLBACK: Step<AppRun>[] = [
  {
    name: 'rollback',
    does: (r) => `point port ${r.st.listen} at the kept instance on ${instanceLabel(r.kept!)}, one commit per family`,
    undo: 'point it back at the instance that was active',
    run: async (r, run) => {
      const { kept, bad } = r;
      run.undo(`redirect back on ${bad ? instanceLabel(bad) : 'nothing'}`, async () => {
        move(kept!, 'kept');
        if (bad) move(bad, 'active');
        await repoint(r);
      });
      move(kept!, 'active');
      delete kept!.keepUntil;
      if (bad) move(bad, 'draining');
      await repoint(r);
    },
    where: (r) => ({ port: r.kept!.port, pid: r.kept!.pid }),
    detail: (r) => (r.bad ? `from port ${r.bad.port}` : undefined),
  },
  {
    name: 'drain',
    does: (r) =>
      `drain and stop the instance on ${r.bad ? instanceLabel(r.bad) : '-'} under the last deploy's drain settings`,
    undo: '',
    settles: true,
    skip: (r) => !r.bad,
    run: async (r) => void (await retire(r.ctx, r.st, r.bad!)),
    where: (r) => ({ port: r.bad?.port, pid: r.bad?.pid }),
  },
];

export async function rollback(ctx: Ctx, app: string): Promise<void> {
  await withApp(ctx, app, 'rollback', ROLLBACK, (r) => {
    r.kept = r.st.instances
      .filter((i) => i.state === 'kept')
      .sort((a, b) => (b.keepUntil ?? 0) - (a.keepUntil ?? 0))[0];
    if (!r.kept)
      fail(
        'nothingToDo',
        `"${app}" has no kept previous instance alive to roll back to; deploy with --keep-old DURATION to keep one`,
      );
    r.bad = r.st.instances.find((i) => i.state === 'active');
  });
}

/** stop: the rules go first, so the public port refuses; then every instance stops at once. */
const STOP: Step<AppRun>[] = [
  {
    name: 'stop',
    does: (r) => `remove ${r.st.app}'s rules: nat, then filter, then its nftables accept`,
    undo: '',
    run: async (r) => {
      for (const f of r.ipt.families) for (const rule of await removeApp(r.ipt, f, r.st.app)) r.foreign.add(rule);
      await syncGuard(r.ctx, r.st, 'absent');
      if (r.foreign.size) {
        r.ctx.emit({
          kind: 'notice',
          app: r.st.app,
          message:
            `rules outside portflip still jump to ${appChain(r.st.app)} (${[...r.foreign].join('; ')}); ` +
            'its chain was emptied but left in place: delete those rules, then run portflip cleanup',
        });
      }
    },
    detail: () => 'rules removed',
  },
  {
    name: 'drain',
    does: () =>
      'send the stop signal to every instance at once (no idle wait: the port already refuses); SIGKILL after ' +
      '--kill-after; a pause holder lets go and exits',
    undo: '',
    run: async (r) => {
      const policy = { ...r.st.stop, drain: 'signal' as const };
      await Promise.all([
        ...r.st.instances.map((i) => drainAndStop(r.ctx.sys, r.st.app, i, policy, r.ctx.emit, async () => {})),
        ...(r.st.hold ? [endHolder(r.ctx.sys, r.st.hold)] : []),
      ]);
      delete r.st.hold; // or the closing settle would put the hold rule back for a stopped app
      r.stopped = r.st.instances.length;
      r.st.instances = [];
      await removeState(r.ctx.sys, r.ctx.paths, r.st.app);
    },
    detail: (r) => `${r.stopped} instance(s) stopped, state removed`,
  },
];

export async function stop(ctx: Ctx, app: string): Promise<void> {
  await withApp(ctx, app, 'stop', STOP);
}

/** restore: what every run does first, as the whole run: find out what is real and repair it. */
const RESTORE: Step<AppRun>[] = [
  {
    name: 'restore',
    does: (r) =>
      `repair ${r.st.app}'s rules from its state file, pointing port ${r.st.listen} at its live active instance`,
    undo: '',
    run: async (r) => void (await reconcile(r.ctx, r.ipt, r.st)),
    where: (r) => ({
      port: r.st.instances.find((i) => i.state === 'active')?.port,
      pid: r.st.instances.find((i) => i.state === 'active')?.pid,
    }),
    detail: (r) => {
      const active = r.st.instances.find((i) => i.state === 'active');
      return active
        ? `port ${r.st.listen} -> ${active.port}`
        : `no live instance; port ${r.st.listen} is left alone (deploy it again)`;
    },
  },
];

export async function restore(ctx: Ctx): Promise<void> {
  const apps = await listApps(ctx.sys, ctx.paths);
  await requireNetAdmin(ctx.sys);
  for (const app of apps) await withApp(ctx, app, 'restore', RESTORE, undefined, false);
  if (!apps.length) ctx.emit({ kind: 'notice', message: `no apps in ${ctx.paths.stateDir}; nothing to restore` });
}

export async function cleanup(ctx: Ctx, stopInstances: boolean): Promise<void> {
  await requireNetAdmin(ctx.sys);
  const started = ctx.sys.now();
  const apps = await listApps(ctx.sys, ctx.paths);
  const locks = [];
  try {
    for (const app of apps)
      locks.push(
        await takeLock(ctx.sys, ctx.paths, app, 'cleanup', (m) => ctx.emit({ kind: 'notice', app, message: m })),
      );
    // the backend in use, and any other one a state file says rules were made with
    const detected = await detectBackend(ctx.sys, ctx.env.PORTFLIP_IPTABLES);
    const backends = new Set<Backend>([detected.backend]);
    for (const app of apps) {
      const b = (await readState(ctx.sys, ctx.paths, app).catch(() => null))?.backend;
      if (b) backends.add(b);
    }
    const guard = await openGuard(ctx.sys);
    const chains = await guard.chains();
    const guarded = new Set(
      chains.flatMap((c) => c.ours.map((r) => r.comment.slice(GUARD_PREFIX.length).split(' ')[0])),
    );
    for (const app of guarded) {
      const script = guardScript(chains, app, null);
      if (script) await guard.apply(script);
    }
    for (const b of backends) {
      const ipt = b === detected.backend ? detected : await detectBackend(ctx.sys, b).catch(() => null);
      for (const f of ipt?.families ?? []) {
        const text = cleanupText(await ipt!.save(f));
        if (text) await ipt!.restore(f, text);
      }
    }
    let stopped = 0;
    if (stopInstances) {
      for (const app of apps) {
        const st = await readState(ctx.sys, ctx.paths, app).catch(() => null);
        if (!st) continue;
        await Promise.all([
          ...st.instances.map((i) =>
            drainAndStop(ctx.sys, app, i, { ...st.stop, drain: 'signal' }, ctx.emit, async () => {}),
          ),
          ...(st.hold ? [endHolder(ctx.sys, st.hold)] : []),
        ]);
        stopped += st.instances.length;
        await removeState(ctx.sys, ctx.paths, app);
      }
    }
    ctx.emit({
      kind: 'step',
      step: 'cleanup',
      app: '*',
      status: 'ok',
      durationMs: ctx.sys.now() - started,
      detail:
        'removed every portflip chain and rule' +
        (stopInstances
          ? `; stopped ${stopped} instance(s)`
          : '; instances left running (restore brings the rules back)'),
    });
  } finally {
    for (const l of locks) await l.release();
  }
}

/** Detached: waits until kept instances are due, then retires them under the lock. */
export async function reap(ctx: Ctx, app: string): Promise<void> {
  for (;;) {
    const st = await readState(ctx.sys, ctx.paths, app).catch(() => null);
    const kept = st?.instances.filter((i) => i.state === 'kept') ?? [];
    if (!kept.length) return;
    const due = Math.min(...kept.map((i) => i.keepUntil ?? 0));
    await ctx.sys.sleep(Math.max(0, due - ctx.sys.wallNow()) + 50, ctx.abort);
    if (ctx.abort.aborted) return;
    for (let tries = 0; ; tries++) {
      try {
        await withApp(ctx, app, 'reap', []); // withApp retires what is due
        break;
      } catch (err) {
        // a deploy holding the lock retires due instances itself; wait for it and look again
        if (!(err instanceof PortflipError && err.kind === 'lockHeld') || tries > 600) return;
        await ctx.sys.sleep(1000);
      }
    }
  }
}

export interface InstanceStatus {
  port: number;
  pid: number | null;
  state: string;
  alive: boolean;
  uptimeSeconds: number | null;
  cpu: number | null;
  memory: number | null;
  connections: number;
  keepUntil?: string;
  log: string;
}

export interface AppStatus {
  app: string;
  listen: number;
  backend: Backend;
  families: Family[];
  active: InstanceStatus | null;
  others: InstanceStatus[];
  rules: Verdict | 'unknown'; // the nat redirect
  firewall: Verdict | 'off' | 'unknown'; // the filter chain and the nftables accept
  restarts: number; // crash restarts by `portflip run`
  hold: HoldStatus | null; // new connections held: paused, or an in-place deploy
  canary?: CanaryStatus;
}

/** A live canary: its share and each side's open connections (canary.ts). */
export interface CanaryStatus {
  port: number;
  percent: number;
  by: 'conn' | 'ip';
  since: string;
  connections: { canary: number; active: number };
}

export async function status(ctx: Ctx, only?: string): Promise<AppStatus[]> {
  // the slowest read (nftables) starts before the state files are read
  const guardChains = openGuard(ctx.sys).then((g) => g.chains());
  guardChains.catch(() => {});
  const names = only ? [only] : await listApps(ctx.sys, ctx.paths);
  const states = (await Promise.all(names.map((a) => readState(ctx.sys, ctx.paths, a)))).filter((s) => s !== null);
  if (only && !states.length) fail('nothingToDo', `no app named "${only}" here (no state in ${ctx.paths.stateDir})`);
  const alive = await Promise.all(
    states.map((st) => Promise.all(st.instances.map((i) => isAlive(ctx.sys, i.pid, i.startTime)))),
  );
  // what the state file wants, counting only instances that are still alive
  const lives = states.map((st, k) => ({ ...st, instances: st.instances.filter((_, j) => alive[k][j]) }));
  // every read runs side by side: status is run by hand and in loops, and most of its time is waiting
  const [socks, usage, rules, holds] = await Promise.all([
    tcpSockets(ctx.sys),
    ctx.sys.usage(lives.flatMap((st) => st.instances.map((i) => i.pid!))),
    ruleChecks(ctx, lives, guardChains),
    Promise.all(states.map((st) => holdStatus(ctx.sys, st))),
  ]);
  return states.map((st, k) => {
    const insts: InstanceStatus[] = [];
    for (const [j, i] of st.instances.entries()) {
      const u = alive[k][j] ? usage.get(i.pid!) : undefined;
      insts.push({
        port: i.port,
        pid: i.pid,
        state: alive[k][j] ? i.state : 'gone',
        alive: alive[k][j],
        uptimeSeconds: u ? Math.round(u.elapsed / 1000) : null,
        cpu: u ? Math.round(u.cpu * 10) / 10 : null,
        memory: u?.memory ?? null,
        connections: openConnections(socks, i.port),
        keepUntil: i.keepUntil ? new Date(i.keepUntil).toISOString() : undefined,
        log: i.log,
      });
    }
    const active = insts.find((i) => i.state === 'active') ?? null;
    return {
      app: st.app,
      listen: st.listen,
      backend: st.backend,
      families: st.families,
      active,
      others: insts.filter((i) => i !== active),
      ...rules[k],
      restarts: st.restarts ?? 0,
      hold: holds[k],
      ...canaryStatus(st, insts),
    };
  });
}

/**
 * Whether the live rules agree with each state, for the RULES and FIREWALL columns: one iptables-save
 * per backend and family and one nftables read, whatever the number of apps.
 */
async function ruleChecks(
  ctx: Ctx,
  lives: AppState[],
  guardChains: Promise<DenyChain[]>,
): Promise<Pick<AppStatus, 'rules' | 'firewall'>[]> {
  const unknown = lives.map((st) => ({
    rules: 'unknown' as const,
    firewall: st.firewall?.mode === 'off' ? ('off' as const) : ('unknown' as const),
  }));
  if (!lives.length) return unknown;
  try {
    await requireNetAdmin(ctx.sys);
  } catch {
    return unknown; // not root: the state is still worth showing
  }
  const saves = new Map<string, Promise<RulesView | null>>();
  const save = (ipt: Iptables, f: Family) => {
    const key = `${ipt.backend} ${f}`;
    // an IPv6 table that cannot be read (no ip6tables nat here) is not the app's
    if (!saves.has(key))
      saves.set(
        key,
        ipt.save(f).catch((err) => (f === 'ipv4' ? Promise.reject(err) : null)),
      );
    return saves.get(key)!;
  };
  const worst = (vs: Verdict[]) => (vs.includes('missing') ? 'missing' : vs.includes('mismatch') ? 'mismatch' : 'ok');
  return Promise.all(
    lives.map(async (st, k) => {
      try {
        const ipt = await recordedBackend(ctx.sys, (ctx.env.PORTFLIP_IPTABLES as Backend) || st.backend);
        const views = await Promise.all(ipt.families.map(async (f) => [f, await save(ipt, f)] as const));
        const checks = views.flatMap(([f, v]) => (v ? [checkApp(v, wantedSpec(st, f), f)] : []));
        const rules = worst(checks.map((c) => c.nat));
        if (unknown[k].firewall === 'off') return { rules, firewall: 'off' as const };
        const guardMissing = guardScript(await guardChains.catch(() => []), st.app, guardWanted(st, 'auto')) !== null;
        return { rules, firewall: worst([...checks.map((c) => c.filter), guardMissing ? 'missing' : 'ok']) };
      } catch {
        return unknown[k];
      }
    }),
  );
}

function canaryStatus(st: AppState, insts: InstanceStatus[]): { canary?: CanaryStatus } {
  const canary = insts.find((i) => i.state === 'canary');
  if (!canary || !st.canary) return {};
  const active = insts.find((i) => i.state === 'active');
  const { percent, by, since } = st.canary;
  const connections = { canary: canary.connections, active: active?.connections ?? 0 };
  return { canary: { port: canary.port, percent, by, since, connections } };
}

const paint = (on: boolean, code: number, s: string) => (on ? `\x1b[${code}m${s}\x1b[0m` : s);
const STATE_COLOUR: Record<string, number> = {
  canary: 34,
  active: 32,
  kept: 36,
  draining: 33,
  candidate: 35,
  gone: 31,
};

export type ConntrackFill = Awaited<ReturnType<typeof conntrackFill>>;

/** The status table, then one line on the connection-tracking table when it is loaded. */
export function formatStatus(apps: AppStatus[], colour = false, conntrack: ConntrackFill = null): string {
  const canaries = apps
    .filter((a) => a.canary)
    .map(({ app, canary: c }) => {
      const share = `${c!.percent}% of ${c!.by === 'ip' ? 'client addresses' : 'new connections'}`;
      const open = `${c!.connections.canary} open; ${c!.connections.active} on the active`;
      return `${app}: canary on port ${c!.port} gets ${share} (${open}); portflip promote ${app} or portflip abort ${app}`;
    });
  const holds = apps.filter((a) => a.hold).map((a) => formatHold(a.app, a.hold!));
  const table = [formatApps(apps, colour), ...canaries, ...holds].join('\n');
  if (!conntrack) return table;
  const warn = conntrack.percent >= CONNTRACK_WARN_PERCENT;
  const fill = `conntrack: ${conntrack.count} of ${conntrack.max} entries (${conntrack.percent}%)`;
  const line = warn ? `${fill} WARNING: ${conntrackWarning(conntrack)}` : fill;
  return `${table}\n${paint(colour && warn, 31, line)}`;
}

function formatApps(apps: AppStatus[], colour: boolean): string {
  if (!apps.length) return 'no apps';
  const rows = [['APP', 'LISTEN', 'PORT', 'PID', 'STATE', 'UPTIME', 'CPU%', 'MEM', 'CONNS', 'FIREWALL', 'RULES']];
  for (const a of apps) {
    const list = [a.active, ...a.others].filter(Boolean) as InstanceStatus[];
    if (!list.length) rows.push([a.app, String(a.listen), '-', '-', 'none', '-', '-', '-', '-', a.firewall, a.rules]);
    for (const i of list) {
      rows.push([
        a.app,
        String(a.listen),
        String(i.port),
        String(i.pid ?? '-'),
        i.state,
        i.uptimeSeconds === null ? '-' : fmtUptime(i.uptimeSeconds),
        i.cpu === null ? '-' : i.cpu.toFixed(1),
        i.memory === null ? '-' : `${(i.memory / 1048576).toFixed(1)}M`,
        String(i.connections),
        i === list[0] ? a.firewall : '',
        i === list[0] ? `${a.rules} (${a.backend} ${a.families.join('+')})` : '',
      ]);
    }
  }
  const widths = rows[0].map((_, c) => Math.max(...rows.map((r) => r[c].length)));
  // pad first, colour after, so escape codes never skew the columns
  return rows
    .map((r, i) =>
      r
        .map((v, c) => {
          const cell = v.padEnd(widths[c]);
          if (i === 0) return paint(colour, 1, cell);
          if (c === 4) return paint(colour, STATE_COLOUR[v] ?? 0, cell);
          if ((c === 9 || c === 10) && v && v !== 'off') return paint(colour, v.startsWith('ok') ? 32 : 31, cell);
          return cell;
        })
        .join('  ')
        .trimEnd(),
    )
    .join('\n');
}

/** The active instance's log: the last lines, then (with follow) new lines as they come, across deploys. */
export async function logs(
  ctx: Ctx,
  app: string,
  opts: { follow: boolean; lines: number },
  write: (s: string) => void,
): Promise<void> {
  const activeLog = async () => {
    const st = await readState(ctx.sys, ctx.paths, app);
    if (!st) return fail('nothingToDo', `no app named "${app}" here (no state in ${ctx.paths.stateDir})`);
    const a = st.instances.find((i) => i.state === 'active');
    return a?.log ?? null;
  };
  let path = await activeLog();
  if (!path) fail('nothingToDo', `"${app}" has no active instance; deploy it first`);
  const text = await ctx.sys.fs.read(path!).catch(() => '');
  const tail = text.split('\n');
  if (tail.at(-1) === '') tail.pop();
  write(
    tail
      .slice(-opts.lines)
      .map((l) => l + '\n')
      .join(''),
  );
  let offset = Buffer.byteLength(text);
  while (opts.follow && !ctx.abort.aborted) {
    await ctx.sys.sleep(250, ctx.abort);
    const now = await activeLog().catch(() => null);
    if (now && now !== path) {
      // a deploy moved the port: carry on with the new instance's log from its start
      write(`--- portflip: now following ${now}\n`);
      path = now;
      offset = 0;
    }
    // from the start again when the file got shorter: truncated, a new instance on the same port
    const chunk = await ctx.sys.fs.readFrom(path!, offset).catch(() => null);
    if (!chunk) continue;
    offset = chunk.size;
    if (chunk.text) write(chunk.text);
  }
}

const fmtUptime = (s: number) =>
  s < 60
    ? `${s}s`
    : s < 3600
      ? `${Math.floor(s / 60)}m${s % 60}s`
      : `${Math.floor(s / 3600)}h${Math.floor((s % 3600) / 60)}m`;
