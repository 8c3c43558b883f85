// `portflip status`: apps, their instances and whether the live rules agree with the state file.

import { fail } from '../core/errors.js';
import { listApps, readState, type AppState } from '../core/state.js';
import {
  checkApp,
  recordedBackend,
  type Backend,
  type Family,
  type Iptables,
  type RulesView,
  type Verdict,
} from '../os/iptables.js';
import { guardScript, type DenyChain } from '../os/nftguard.js';
import { isAlive, openConnections, tcpSockets } from '../os/proc.js';
import { conntrackFill, conntrackWarning, CONNTRACK_WARN_PERCENT } from '../ops/conntrack.js';
import { requireNetAdmin, type Ctx } from '../ops/context.js';
import { openGuard, guardWanted } from '../ops/guard.js';
import { wantedSpec } from '../ops/rules.js';
import { formatHold, holdStatus, type HoldStatus } from './hold.js';

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
  label?: string; // the deploy's --label
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
        ...(i.label ? { label: i.label } : {}),
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
  // a LABEL column only once some deploy had a --label: other hosts' tables stay as they were
  const labelled = apps.some((a) => [a.active, ...a.others].some((i) => i?.label));
  const rows = [['APP', 'LISTEN', 'PORT', 'PID', 'STATE', 'UPTIME', 'CPU%', 'MEM', 'CONNS', 'FIREWALL', 'RULES']];
  if (labelled) rows[0].push('LABEL');
  for (const a of apps) {
    const list = [a.active, ...a.others].filter(Boolean) as InstanceStatus[];
    if (!list.length) {
      const none = [a.app, String(a.listen), '-', '-', 'none', '-', '-', '-', '-', a.firewall, a.rules];
      rows.push(labelled ? [...none, '-'] : none);
    }
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
        ...(labelled ? [i.label ?? '-'] : []),
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

const fmtUptime = (s: number) =>
  s < 60
    ? `${s}s`
    : s < 3600
      ? `${Math.floor(s / 60)}m${s % 60}s`
      : `${Math.floor(s / 3600)}h${Math.floor((s % 3600) / 60)}m`;
