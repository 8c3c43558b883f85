// Per-app state files (atomic, versioned) and the per-app lock.
//
// Every write checks the instance invariant of lifecycle.ts: a state file that breaks it is a bug,
// and is refused rather than written.

import { join } from 'node:path';
import { fail, PortflipError } from './errors.js';
import { invariantProblem, type InstanceState } from './lifecycle.js';
import { isAlive, readStat } from '../os/proc.js';
export type { InstanceState } from './lifecycle.js';
import type { Backend, Family } from '../os/iptables.js';
import type { Sys } from '../os/sys.js';

export const SCHEMA = 1;

export interface Instance {
  port: number;
  pid: number | null; // null between "about to spawn" and "spawned"
  startTime: string | null;
  state: InstanceState;
  startedAt: string; // ISO wall clock, for people
  command: string[];
  log: string;
  keepUntil?: number; // epoch ms; a kept instance is retired after this
  signalledAt?: string; // when the stop signal went out
  nodeDrain?: boolean; // every process listening on its port is Node.js with the drain module loaded
  label?: string; // the deploy's --label: a version name for people and the history
  configHash?: string; // sha256 of the config file the deploy read
  marking?: Marking; // while it drains: its answers are marked Connection: close (drainmark.ts)
}

/** How people read an instance in messages: "port 8002 (pid 9203)". */
export const instanceLabel = (i: Instance) => `port ${i.port}${i.pid ? ` (pid ${i.pid})` : ''}`;

/** Who marks a draining instance's answers: the queue its packets go to, read by that portflip process. */
export interface Marking {
  queue: number;
  pid: number;
  startTime: string | null;
}

export type DrainMode = 'auto' | 'signal' | 'idle';

export interface StopPolicy {
  drain: DrainMode;
  drainTimeoutMs: number;
  stopSignal: NodeJS.Signals;
  killAfterMs: number;
  markClose?: boolean; // mark one answer per keep-alive connection Connection: close while idle-draining; absent: on
}

/** How portflip treats the host's filter table for an app (--firewall, --expose-ports, --allow-from). */
export interface FirewallSettings {
  mode: 'auto' | 'off';
  exposePorts: boolean;
  allowFrom: string[]; // canonical CIDRs
}

export interface AppState {
  schema: typeof SCHEMA;
  app: string;
  listen: number;
  backend: Backend;
  families: Family[];
  stop: StopPolicy;
  instances: Instance[];
  updatedAt: string;
  restarts?: number; // times `portflip run` brought the app back after its active instance died
  firewall?: FirewallSettings; // absent in state files older than the filter chain: auto
  hold?: HoldState; // new connections are held (pause, or an in-place deploy): hold.ts
  canary?: CanarySettings; // the split while an instance is in the canary state (canary.ts)
}

/** How a live canary splits new connections; the canary instance is the one in the canary state. */
export interface CanarySettings {
  percent: number; // whole percent of new connections (by conn) or of client addresses (by ip)
  by: 'conn' | 'ip';
  rnd: number; // HMARK seed for by ip, kept for the canary's life so clients stay on their side
  families: Family[]; // what the canary listens on: the split exists only there
  since: string; // ISO wall clock, for people
}

/** A hold in force: the holder process that reads the queue, and why it holds. */
export interface HoldState {
  queue: number; // NFQUEUE number, derived from the app name (hold.ts queueFor)
  pid: number;
  startTime: string | null;
  socket: string; // the holder's control socket
  untilMs: number; // epoch ms: the holder releases on its own then
  maxlen: number;
  reason: 'pause' | 'deploy';
}

export interface Paths {
  stateDir: string;
  runDir: string;
  logDir: string;
}

export function paths(env: NodeJS.ProcessEnv = process.env): Paths {
  const stateDir = env.PORTFLIP_STATE_DIR || '/var/lib/portflip';
  return { stateDir, runDir: env.PORTFLIP_RUN_DIR || '/run/portflip', logDir: join(stateDir, 'logs') };
}

const stateFile = (p: Paths, app: string) => join(p.stateDir, `${app}.json`);

export async function ensureDirs(sys: Sys, p: Paths): Promise<void> {
  for (const dir of [p.stateDir, p.runDir]) {
    await sys.fs.mkdir(dir, 0o700);
  }
  // app users must be able to reach their own log files
  await sys.fs.mkdir(p.logDir, 0o755);
  await sys.fs.chmod(p.logDir, 0o755);
}

export async function readState(sys: Sys, p: Paths, app: string): Promise<AppState | null> {
  let text: string;
  try {
    text = await sys.fs.read(stateFile(p, app));
  } catch {
    return null;
  }
  let data: AppState;
  try {
    data = JSON.parse(text);
  } catch {
    return fail('badState', `state file ${stateFile(p, app)} is not valid JSON; move it away and run "portflip restore"`);
  }
  if (data.schema !== SCHEMA)
    fail('badState', `state file ${stateFile(p, app)} has schema ${data.schema}, this portflip reads ${SCHEMA}`);
  return data;
}

export async function listApps(sys: Sys, p: Paths): Promise<string[]> {
  const names = await sys.fs.readdir(p.stateDir).catch(() => [] as string[]);
  return names
    .filter((n) => n.endsWith('.json'))
    .map((n) => n.slice(0, -5))
    .sort();
}

let writes: Promise<void> = Promise.resolve();

/**
 * Written atomically (Sys.fs.writeAtomic: a crash leaves the old or the new file, never half).
 * Writes are queued so parallel drains of one app cannot interleave.
 */
export function writeState(sys: Sys, p: Paths, state: AppState): Promise<void> {
  const problem = invariantProblem(state.instances);
  if (problem)
    return Promise.reject(new PortflipError('internal', `refused to write the state of "${state.app}": ${problem}`));
  const next = writes.then(() => writeNow(sys, p, state));
  writes = next.catch(() => {});
  return next;
}

async function writeNow(sys: Sys, p: Paths, state: AppState): Promise<void> {
  state.updatedAt = new Date(sys.wallNow()).toISOString();
  await sys.fs.writeAtomic(stateFile(p, state.app), JSON.stringify(state, null, 2) + '\n', 0o600);
}

export async function removeState(sys: Sys, p: Paths, app: string): Promise<void> {
  await sys.fs.unlink(stateFile(p, app)).catch(() => {});
}

// ---- the lock -----------------------------------------------------------------------------

export interface Lock {
  release(): Promise<void>;
}

interface LockInfo {
  pid: number;
  startTime: string;
  command: string;
}

/**
 * One lock file per app under the run dir, created with link() so exactly one taker wins. A lock
 * whose holder is gone (pid dead, or reused by another process) is stale and taken over.
 */
export async function takeLock(
  sys: Sys,
  p: Paths,
  app: string,
  command: string,
  notice: (m: string) => void,
): Promise<Lock> {
  const path = join(p.runDir, `${app}.lock`);
  const me = await readStat(sys, sys.pid);
  const info: LockInfo = { pid: sys.pid, startTime: me?.startTime ?? '', command };
  const tmp = `${path}.${sys.pid}`;
  await sys.fs.write(tmp, JSON.stringify(info), 0o600);
  try {
    for (let attempt = 0; attempt < 5; attempt++) {
      try {
        await sys.fs.link(tmp, path);
        return { release: async () => void (await sys.fs.unlink(path).catch(() => {})) };
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      }
      let holder: LockInfo | null = null;
      try {
        holder = JSON.parse(await sys.fs.read(path));
      } catch {
        holder = null; // half-written or vanished: treat as stale
      }
      if (holder && (await isAlive(sys, holder.pid, holder.startTime))) {
        fail(
          'lockHeld',
          `app "${app}" is locked by pid ${holder.pid} (${holder.command}); wait for it to finish, or kill it and run again`,
        );
      }
      // move the stale file aside first, so two takers cannot both delete a fresh lock
      const aside = `${path}.stale.${sys.pid}`;
      try {
        await sys.fs.rename(path, aside);
        await sys.fs.unlink(aside);
        notice(`took over a stale lock for "${app}"${holder ? ` left by pid ${holder.pid}, which is gone` : ''}`);
      } catch {
        // someone else moved it first; try again
      }
    }
    return fail('lockHeld', `could not take the lock for "${app}" at ${path}; another portflip is starting right now`);
  } finally {
    await sys.fs.unlink(tmp).catch(() => {});
  }
}
