// Prometheus metrics: counters folded from history records into a file that only grows, gauges read live, one text.
//
// Counters and histogram buckets must only ever go up across runs, so they cannot be recomputed from a history
// that rotates: publish() folds each record into STATE_DIR/metrics/counters.json (under a lock, atomically) as it
// is made. Gauges (connections, CPU, memory, holds, the canary share, conntrack) are read at render time from the
// state files and procfs. render() is pure; the text goes to node_exporter's textfile collector (writeTextfile)
// and to `--metrics ADDR` (metrics-http.ts).

import { join } from 'node:path';
import { PortflipError } from '../core/errors.js';
import { DEPLOY_ACTIONS, type HistoryRecord } from '../core/history.js';
import { listApps, readState, takeLock, type AppState, type InstanceState, type Lock } from '../core/state.js';
import {
  allPids,
  CLOCK_TICKS,
  cpuTicks,
  isAlive,
  openConnections,
  parseStat,
  rssBytes,
  tcpSockets,
} from '../os/proc.js';
import type { Sys } from '../os/sys.js';
import { conntrackFill } from './conntrack.js';
import type { Ctx } from './context.js';

// ---- the counters file -------------------------------------------------------------------------

/** Observations by upper bound (`le`, cumulative as Prometheus counts them), their sum and count. */
export interface Histogram {
  buckets: Record<string, number>; // keyed by the bound as rendered, so a changed list of bounds never shifts counts
  sum: number;
  count: number;
}

export interface AppCounters {
  changes: Record<string, number>; // "action result" -> records
  deployDuration: Histogram;
  steps: Record<string, Histogram>; // step name -> its durations, from every record's steps
  lastDeploy?: { endedAt: number; ok: boolean }; // epoch seconds
}

export interface Counters {
  v: 1;
  apps: Record<string, AppCounters>;
}

/** Seconds. A deploy is a readiness wait plus a drain (a second to a few minutes); its steps are ms to a minute. */
export const DEPLOY_BOUNDS = [0.5, 1, 2.5, 5, 10, 30, 60, 120, 300];
export const STEP_BOUNDS = [0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60];

export const emptyCounters = (): Counters => ({ v: 1, apps: {} });
const emptyHistogram = (): Histogram => ({ buckets: {}, sum: 0, count: 0 });

function observe(h: Histogram, bounds: number[], seconds: number): void {
  for (const le of bounds) if (seconds <= le) h.buckets[String(le)] = (h.buckets[String(le)] ?? 0) + 1;
  h.sum += seconds;
  h.count += 1;
}

/** Adds one record to the counters (in place, and returned). Only ever adds: counters stay monotonic. */
export function fold(c: Counters, r: HistoryRecord): Counters {
  const a = (c.apps[r.app] ??= { changes: {}, deployDuration: emptyHistogram(), steps: {} });
  const key = `${r.action} ${r.result}`;
  a.changes[key] = (a.changes[key] ?? 0) + 1;
  for (const s of r.steps) observe((a.steps[s.step] ??= emptyHistogram()), STEP_BOUNDS, s.durationMs / 1000);
  if (DEPLOY_ACTIONS.includes(r.action)) {
    observe(a.deployDuration, DEPLOY_BOUNDS, r.durationMs / 1000);
    const endedAt = (Date.parse(r.startedAt) + r.durationMs) / 1000;
    // records come in order; a clock stepped back must not make an older deploy the last one
    if (Number.isFinite(endedAt) && endedAt >= (a.lastDeploy?.endedAt ?? -Infinity))
      a.lastDeploy = { endedAt, ok: r.result === 'ok' };
  }
  return c;
}

export const countersFile = (ctx: Pick<Ctx, 'paths'>) => join(ctx.paths.stateDir, 'metrics', 'counters.json');

/** The counters so far; empty when there is no file yet, or when it cannot be read as counters (`bad` says so). */
export async function readCounters(sys: Sys, file: string): Promise<{ counters: Counters; bad: boolean }> {
  let text: string;
  try {
    text = await sys.fs.read(file);
  } catch {
    return { counters: emptyCounters(), bad: false };
  }
  try {
    const c = JSON.parse(text) as Counters;
    if (c?.v === 1 && c.apps && typeof c.apps === 'object') return { counters: c, bad: false };
  } catch {
    // not JSON: handled below
  }
  return { counters: emptyCounters(), bad: true };
}

/** A lock of its own (not an app's: a deploy holds that one while it publishes), waited for up to ~2 s. */
async function lockCounters(ctx: Ctx): Promise<Lock> {
  for (let attempt = 0; ; attempt++) {
    try {
      return await takeLock(ctx.sys, ctx.paths, 'metrics.counters', 'publish metrics', () => {});
    } catch (err) {
      if (!(err instanceof PortflipError && err.kind === 'lockHeld') || attempt >= 80) throw err;
      await ctx.sys.sleep(25);
    }
  }
}

/**
 * Called with each history record as it is appended (by every command that changed an app, `run`'s
 * restarts and reloads, the healer's repairs): folds it into the counters file, then rewrites the textfile.
 */
export async function publish(ctx: Ctx, record: HistoryRecord): Promise<void> {
  const file = countersFile(ctx);
  await ctx.sys.fs.mkdir(join(ctx.paths.stateDir, 'metrics'), 0o700);
  await underCountersLock(ctx, async () => {
    const { counters, bad } = await readCounters(ctx.sys, file);
    if (bad) {
      // kept for a person to look at; the counters start over, which Prometheus reads as a counter reset
      await ctx.sys.fs.rename(file, `${file}.bad`).catch(() => {});
      ctx.emit({ kind: 'notice', message: `metrics: ${file} was not a counters file; moved to ${file}.bad` });
    }
    await ctx.sys.fs.writeAtomic(file, JSON.stringify(fold(counters, record)) + '\n', 0o600);
    // under the lock: see writeTextfile. Only what the state files say: the live gauges are watch's and run's
    // (gather says why), and gather(false) is cheap enough to hold the lock through
    await writeView(ctx, await gather(ctx, false));
  });
}

/**
 * Runs `fn` one at a time in this process, then under the counters' lock across processes: the lock's temp file
 * (takeLock) and writeAtomic's are named by pid, so two at once in one process (run's refresh and a publish after
 * its restart) would share them.
 */
function underCountersLock<T>(ctx: Ctx, fn: () => Promise<T>): Promise<T> {
  const next = localTurn.then(async () => {
    await ctx.sys.fs.mkdir(ctx.paths.runDir, 0o700);
    const lock = await lockCounters(ctx);
    try {
      return await fn();
    } finally {
      await lock.release();
    }
  });
  localTurn = next.catch(() => null);
  return next;
}

let localTurn: Promise<unknown> = Promise.resolve();

// ---- what is true right now --------------------------------------------------------------------

export interface LiveApp {
  app: string;
  listen: number;
  backend: string;
  instances: Partial<Record<InstanceState, number>>; // live instances by state
  active: {
    up: boolean; // its pid and start time still match
    // null where not read: the end of a command (publish) leaves them to watch, run and /metrics
    connections: number | null;
    cpuSeconds: number | null; // its process group's, since the instance started
    memoryBytes: number | null; // its process group's resident memory
    startedAt: number; // epoch seconds
  } | null;
  hold: { waiting: number | null } | null; // a hold in force whose holder is alive; waiting: SYNs it queues now
  canaryShare: number; // 0-1 of new connections (or client addresses) a live canary gets
}

export interface MetricsView {
  counters: Counters;
  apps: LiveApp[];
  conntrack: { count: number; max: number } | null;
}

/** How long a scrape waits for a holder's answer: a stuck holder must not stall the scrape. */
const HOLDER_ASK_MS = 500;

/** Everything render() shows, read now: the counters file, every app's state file, procfs. Changes nothing. */
/**
 * `processes` false skips what costs a deploy time and is stale by the next scrape: the socket table (tens of
 * thousands of lines under load), a pass over /proc, and the holder's answer. publish() runs at the end of every
 * command; the live gauges come from watch and run, whose textfile refresh and /metrics read them fresh.
 */
export async function gather(ctx: Ctx, processes = true): Promise<MetricsView> {
  const { sys } = ctx;
  const [{ counters }, names, conntrack] = await Promise.all([
    readCounters(sys, countersFile(ctx)),
    listApps(sys, ctx.paths),
    conntrackFill(sys),
  ]);
  // a state file of another schema is status's and the next command's to report; metrics show the others
  const states = (await Promise.all(names.map((a) => readState(sys, ctx.paths, a).catch(() => null)))).filter(
    (s): s is AppState => s !== null,
  );
  const socks = processes && states.some((s) => s.instances.length) ? await tcpSockets(sys) : [];
  const apps = await Promise.all(
    states.map(async (st): Promise<LiveApp> => {
      const alive = await Promise.all(st.instances.map((i) => isAlive(sys, i.pid, i.startTime)));
      const instances: LiveApp['instances'] = {};
      st.instances.forEach((i, k) => alive[k] && (instances[i.state] = (instances[i.state] ?? 0) + 1));
      const at = st.instances.findIndex((i) => i.state === 'active');
      const a = st.instances[at];
      let active: LiveApp['active'] = null;
      if (a) {
        const use = !processes
          ? { cpuSeconds: null, memoryBytes: null }
          : alive[at]
            ? await groupUsage(sys, a.pid!)
            : { cpuSeconds: 0, memoryBytes: 0 };
        const connections = !processes ? null : alive[at] ? openConnections(socks, a.port) : 0;
        active = { up: alive[at], connections, ...use, startedAt: Date.parse(a.startedAt) / 1000 };
      }
      const canaryLive = st.canary && instances.canary;
      return {
        app: st.app,
        listen: st.listen,
        backend: st.backend,
        instances,
        active,
        hold: await liveHold(sys, st, processes),
        canaryShare: canaryLive ? st.canary!.percent / 100 : 0,
      };
    }),
  );
  return { counters, apps, conntrack: conntrack && { count: conntrack.count, max: conntrack.max } };
}

async function liveHold(sys: Sys, st: AppState, ask: boolean): Promise<LiveApp['hold']> {
  // as reconcile's holdStands, without loading reconcile (and the drain code) into every command's end
  if (!st.hold || st.hold.untilMs <= sys.wallNow() || !(await isAlive(sys, st.hold.pid, st.hold.startTime)))
    return null;
  if (!ask) return { waiting: null };
  const line = await sys.ask(st.hold.socket, 'status', HOLDER_ASK_MS);
  let waiting = 0;
  try {
    waiting = Number((JSON.parse(line ?? '{}') as { waiting?: unknown }).waiting) || 0;
  } catch {
    waiting = 0; // no answer in time: the hold still stands
  }
  return { waiting };
}

/**
 * CPU and resident memory of an instance's whole process group (it is started as its own group): a server
 * with workers (gunicorn, nginx) spends them in its children. One pass over /proc, a few files at a time.
 */
async function groupUsage(sys: Sys, pgid: number): Promise<{ cpuSeconds: number; memoryBytes: number }> {
  const pids = await allPids(sys);
  let ticks = 0;
  let memoryBytes = 0;
  for (let i = 0; i < pids.length; i += 64) {
    await Promise.all(
      pids.slice(i, i + 64).map(async (pid) => {
        const text = await sys.readText(`/proc/${pid}/stat`);
        const st = text ? parseStat(text) : null;
        if (!st || st.pgid !== pgid || st.state === 'Z' || st.state === 'X') return;
        ticks += cpuTicks(text!);
        memoryBytes += rssBytes((await sys.readText(`/proc/${pid}/status`)) ?? '');
      }),
    );
  }
  return { cpuSeconds: ticks / CLOCK_TICKS, memoryBytes };
}

// ---- the text ----------------------------------------------------------------------------------

/** The exposition format's content type (text format 0.0.4), for the endpoint. */
export const CONTENT_TYPE = 'text/plain; version=0.0.4; charset=utf-8';

type Labels = Record<string, string>;
type Sample = { labels: Labels; value: number; suffix?: string };
interface Family {
  name: string;
  type: 'counter' | 'gauge' | 'histogram';
  help: string;
  samples: Sample[];
}

const escapeLabel = (v: string) => v.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/\n/g, '\\n');
const escapeHelp = (v: string) => v.replace(/\\/g, '\\\\').replace(/\n/g, '\\n');
const num = (n: number) => (n === Infinity ? '+Inf' : n === -Infinity ? '-Inf' : String(n));

function labelText(labels: Labels): string {
  const parts = Object.entries(labels).map(([k, v]) => `${k}="${escapeLabel(v)}"`);
  return parts.length ? `{${parts.join(',')}}` : '';
}

function histogramSamples(labels: Labels, h: Histogram, bounds: number[]): Sample[] {
  return [
    ...bounds.map((le) => ({
      labels: { ...labels, le: String(le) },
      value: h.buckets[String(le)] ?? 0,
      suffix: '_bucket',
    })),
    { labels: { ...labels, le: '+Inf' }, value: h.count, suffix: '_bucket' },
    { labels, value: h.sum, suffix: '_sum' },
    { labels, value: h.count, suffix: '_count' },
  ];
}

const RESULTS = ['ok', 'failed'] as const;

/** The exposition text (HELP and TYPE for every family, label values escaped). Pure. */
export function render(v: MetricsView): string {
  const live = new Map(v.apps.map((a) => [a.app, a]));
  // every app that has counters or a state file gets its counters, at 0 when nothing happened yet, so that a
  // first failed deploy is an increase() from 0 and not a series that appears at 1
  const names = [...new Set([...Object.keys(v.counters.apps), ...live.keys()])].sort();
  const counters = (app: string): AppCounters =>
    v.counters.apps[app] ?? { changes: {}, deployDuration: emptyHistogram(), steps: {} };
  const count = (app: string, action: string, result: string) => counters(app).changes[`${action} ${result}`] ?? 0;
  const deploys = (app: string, result: string) => DEPLOY_ACTIONS.reduce((n, a) => n + count(app, a, result), 0);
  const both = (app: string, action: string) => RESULTS.reduce((n, r) => n + count(app, action, r), 0);
  const actions = (app: string) =>
    [...new Set(['deploy', ...Object.keys(counters(app).changes).map((k) => k.split(' ')[0])])].sort();
  const apps = [...live.values()].sort((a, b) => a.app.localeCompare(b.app));
  const actives = apps.filter((a) => a.active?.up); // a gone instance has no connections, CPU or memory to show
  const gauge = (name: string, help: string, samples: Sample[]): Family => ({ name, type: 'gauge', help, samples });

  const families: Family[] = [
    {
      name: 'portflip_deploys_total',
      type: 'counter',
      help: "Deploys, by result: portflip deploy, and portflip run's reloads and crash restarts.",
      samples: names.flatMap((app) =>
        RESULTS.map((result) => ({ labels: { app, result }, value: deploys(app, result) })),
      ),
    },
    {
      name: 'portflip_changes_total',
      type: 'counter',
      help:
        'Commands that changed an app, by action (deploy, rollback, promote, abort, pause, resume, stop, ' +
        'restore, cleanup, restart, reload, repair) and result.',
      samples: names.flatMap((app) =>
        actions(app).flatMap((action) =>
          RESULTS.map((result) => ({ labels: { app, action, result }, value: count(app, action, result) })),
        ),
      ),
    },
    {
      name: 'portflip_restarts_total',
      type: 'counter',
      help: 'Times portflip run deployed a crashed app again (failed attempts included).',
      samples: names.map((app) => ({ labels: { app }, value: both(app, 'restart') })),
    },
    {
      name: 'portflip_rule_repairs_total',
      type: 'counter',
      help: "Times portflip watch or run found an app's rules changed behind its back and repaired them.",
      samples: names.map((app) => ({ labels: { app }, value: both(app, 'repair') })),
    },
    {
      name: 'portflip_deploy_duration_seconds',
      type: 'histogram',
      help: 'How long deploys took, from preflight to done (failed ones included).',
      samples: names.flatMap((app) => histogramSamples({ app }, counters(app).deployDuration, DEPLOY_BOUNDS)),
    },
    {
      name: 'portflip_step_duration_seconds',
      type: 'histogram',
      help: 'How long each step took (start, ready, switch, drain, ...), in every command that reports steps.',
      samples: names.flatMap((app) =>
        Object.keys(counters(app).steps)
          .sort()
          .flatMap((step) => histogramSamples({ app, step }, counters(app).steps[step], STEP_BOUNDS)),
      ),
    },
    gauge(
      'portflip_last_deploy_timestamp_seconds',
      'When the last deploy ended (Unix time), whatever its result.',
      names.flatMap((app) => {
        const last = counters(app).lastDeploy;
        return last ? [{ labels: { app }, value: last.endedAt }] : [];
      }),
    ),
    gauge(
      'portflip_last_deploy_success',
      '1 when the last deploy succeeded, 0 when it failed.',
      names.flatMap((app) => {
        const last = counters(app).lastDeploy;
        return last ? [{ labels: { app }, value: last.ok ? 1 : 0 }] : [];
      }),
    ),
    gauge(
      'portflip_app_info',
      'An app portflip manages on this host (it has a state file): its public port and iptables backend.',
      apps.map((a) => ({ labels: { app: a.app, listen: String(a.listen), backend: a.backend }, value: 1 })),
    ),
    gauge(
      'portflip_instances',
      "The app's live instances by state (active, canary, kept, draining, candidate).",
      apps.flatMap((a) =>
        Object.entries(a.instances)
          .sort()
          .map(([state, n]) => ({ labels: { app: a.app, state }, value: n ?? 0 })),
      ),
    ),
    gauge(
      'portflip_active_up',
      '1 when the instance the public port points at is alive, 0 when it is gone.',
      apps.map((a) => ({ labels: { app: a.app }, value: a.active?.up ? 1 : 0 })),
    ),
    gauge(
      'portflip_active_connections',
      "Open TCP connections to the active instance's port (established, being set up, or closing).",
      actives.flatMap((a) =>
        a.active!.connections === null ? [] : [{ labels: { app: a.app }, value: a.active!.connections }],
      ),
    ),
    {
      name: 'portflip_active_cpu_seconds_total',
      type: 'counter',
      help: "CPU time (user and system) of the active instance's process group; starts over with each deploy.",
      samples: actives.flatMap((a) =>
        a.active!.cpuSeconds === null ? [] : [{ labels: { app: a.app }, value: a.active!.cpuSeconds }],
      ),
    },
    gauge(
      'portflip_active_memory_bytes',
      "Resident memory of the active instance's process group.",
      actives.flatMap((a) =>
        a.active!.memoryBytes === null ? [] : [{ labels: { app: a.app }, value: a.active!.memoryBytes }],
      ),
    ),
    gauge(
      'portflip_active_start_time_seconds',
      'When the active instance was started (Unix time).',
      actives.map((a) => ({ labels: { app: a.app }, value: a.active!.startedAt })),
    ),
    gauge(
      'portflip_hold_active',
      '1 while new connections to the public port are held (pause, or an in-place deploy).',
      apps.map((a) => ({ labels: { app: a.app }, value: a.hold ? 1 : 0 })),
    ),
    gauge(
      'portflip_held_connections',
      'New connections (SYNs) waiting in the hold right now.',
      apps.flatMap((a) =>
        a.hold && a.hold.waiting === null ? [] : [{ labels: { app: a.app }, value: a.hold?.waiting ?? 0 }],
      ),
    ),
    gauge(
      'portflip_canary_share_ratio',
      'Share (0-1) of new connections, or of client addresses, that a live canary gets; 0 without one.',
      apps.map((a) => ({ labels: { app: a.app }, value: a.canaryShare })),
    ),
    gauge(
      'portflip_conntrack_entries',
      "Entries in the kernel's connection-tracking table (portflip's redirects live there).",
      v.conntrack ? [{ labels: {}, value: v.conntrack.count }] : [],
    ),
    gauge(
      'portflip_conntrack_entries_limit',
      'Size of the connection-tracking table (net.netfilter.nf_conntrack_max); new connections drop when full.',
      v.conntrack ? [{ labels: {}, value: v.conntrack.max }] : [],
    ),
  ];
  const lines: string[] = [];
  for (const f of families) {
    lines.push(`# HELP ${f.name} ${escapeHelp(f.help)}`, `# TYPE ${f.name} ${f.type}`);
    for (const s of f.samples) lines.push(`${f.name}${s.suffix ?? ''}${labelText(s.labels)} ${num(s.value)}`);
  }
  return lines.join('\n') + '\n';
}

// ---- the textfile ------------------------------------------------------------------------------

/** Debian's prometheus-node-exporter reads its textfile collector's files here. */
export const DEBIAN_TEXTFILE_DIR = '/var/lib/prometheus/node-exporter';
export const TEXTFILE = 'portflip.prom';

/** PORTFLIP_TEXTFILE_DIR (empty: off); unset, Debian's directory when it exists; otherwise none. */
export async function textfileDir(ctx: Pick<Ctx, 'sys' | 'env'>): Promise<string | null> {
  if (ctx.env.PORTFLIP_TEXTFILE_DIR !== undefined) return ctx.env.PORTFLIP_TEXTFILE_DIR || null;
  const st = await ctx.sys.fs.stat(DEBIAN_TEXTFILE_DIR).catch(() => null);
  return st?.isDirectory ? DEBIAN_TEXTFILE_DIR : null;
}

/**
 * Writes portflip.prom into the textfile directory, atomically: node_exporter reads only files ending in
 * .prom, and the temp file beside it (Sys.fs.writeAtomic) does not. Returns the path, or null when off.
 *
 * Under the counters' lock, as publish() writes it: two processes (a deploy's publish, run's or watch's refresh)
 * each read the counters and then write the file, and without the lock the one that read older counters could
 * write last, so the file's counters would go down until the next write (a reset, to Prometheus).
 */
export async function writeTextfile(ctx: Ctx, processes = true): Promise<string | null> {
  if (!(await textfileDir(ctx))) return null;
  // the live part is read before the lock (the socket table can be long under load, and a deploy's publish waits
  // for this lock); the counters are read again under it, so the file never has older ones than the last write
  const view = await gather(ctx, processes);
  return underCountersLock(ctx, async () =>
    writeView(ctx, { ...view, counters: (await readCounters(ctx.sys, countersFile(ctx))).counters }),
  );
}

/** The textfile from a view whose counters were read under the counters' lock; called under that lock only. */
async function writeView(ctx: Ctx, view: MetricsView): Promise<string | null> {
  const dir = await textfileDir(ctx);
  if (!dir) return null;
  const path = join(dir, TEXTFILE);
  // 0644: node_exporter runs as its own user (prometheus on Debian)
  await ctx.sys.fs.writeAtomic(path, render(view), 0o644);
  return path;
}
