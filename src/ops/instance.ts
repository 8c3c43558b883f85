// Instances as processes: spawn detached in their own group, wait until ready, drain and stop.

import { delimiter, isAbsolute, join, resolve } from 'node:path';
import { fail } from '../core/errors.js';
import { groupMembers, isAlive, openConnections, openSockets, pendingAccepts, tcpSockets } from '../os/proc.js';
import type { Emit } from '../core/events.js';
import type { Instance, StopPolicy } from '../core/state.js';
import type { Child, Exit, Sys } from '../os/sys.js';

export interface User {
  name: string;
  uid: number;
  gid: number;
  home: string;
}

export async function lookupUser(sys: Sys, name: string): Promise<User> {
  const r = await sys.run('getent', ['passwd', name]);
  let line = r.code === 0 ? r.stdout.trim().split('\n')[0] : '';
  if (!line) line = ((await sys.readText('/etc/passwd')) ?? '').split('\n').find((l) => l.split(':')[0] === name) ?? '';
  const f = line.split(':');
  if (f.length < 7) return fail('config', `--user ${name}: no such user on this host; create it or pick another`);
  return { name: f[0], uid: Number(f[2]), gid: Number(f[3]), home: f[5] };
}

/** Finds the executable the way execvp would, so "command not found" is caught before anything starts. */
export async function resolveCommand(sys: Sys, cmd: string, cwd: string, pathVar: string | undefined): Promise<string> {
  const candidates = cmd.includes('/')
    ? [isAbsolute(cmd) ? cmd : resolve(cwd, cmd)]
    : (pathVar ?? '/usr/local/bin:/usr/bin:/bin')
        .split(delimiter)
        .filter(Boolean)
        .map((d) => join(d, cmd));
  for (const c of candidates) {
    const st = await sys.fs.stat(c).catch(() => null);
    if (st?.isFile && (await sys.fs.canExec(c))) return c;
  }
  return fail(
    'commandNotFound',
    `command not found: "${cmd}"${cmd.includes('/') ? '' : ' in PATH'}; give a full path or fix PATH with --env PATH=...`,
  );
}

export interface SpawnSpec {
  command: string[];
  port: number;
  cwd: string;
  env: NodeJS.ProcessEnv;
  user?: User;
  log: string;
}

export type Spawned = Child;

/** Detached in its own group, with a fresh log (so a failure's tail is its own) and portflip's first priority. */
export async function spawnInstance(sys: Sys, spec: SpawnSpec): Promise<Spawned> {
  const [cmd, ...args] = spec.command;
  const { cwd, env, user, log } = spec;
  const child = await sys.spawn(cmd, args, { cwd, env, uid: user?.uid, gid: user?.gid, log });
  if (sys.getPriority() !== sys.startPriority) sys.setPriority(child.pid, sys.startPriority);
  return child;
}

export type ReadyCheck =
  { kind: 'tcp' } | { kind: 'http'; url: string } | { kind: 'cmd'; command: string; cwd: string; user?: User };

export async function checkOnce(sys: Sys, check: ReadyCheck, port: number, timeoutMs: number, env: NodeJS.ProcessEnv) {
  switch (check.kind) {
    case 'tcp':
      return (await sys.connect('127.0.0.1', port, timeoutMs)) || sys.connect('::1', port, timeoutMs);
    case 'http':
      return sys.httpOk(check.url.replaceAll('{port}', String(port)), timeoutMs);
    case 'cmd': {
      const r = await sys.run('sh', ['-c', check.command.replaceAll('{port}', String(port))], {
        env: { ...env, PORT: String(port) },
        cwd: check.cwd,
        uid: check.user?.uid,
        gid: check.user?.gid,
        output: 'ignore',
        timeoutMs,
      });
      return r.code === 0;
    }
  }
}

export type ReadyOutcome = { ready: true } | { ready: false; reason: string };

/** Readiness races the check, the candidate's exit and the deadline; a deadline is a failure. */
export async function waitReady(
  sys: Sys,
  check: ReadyCheck,
  inst: { pid: number; port: number; exited: Promise<Exit> },
  timeoutMs: number,
  env: NodeJS.ProcessEnv,
  abort: AbortSignal,
): Promise<ReadyOutcome> {
  const deadline = sys.now() + timeoutMs;
  let exit: Exit | null = null;
  void inst.exited.then((e) => (exit = e));
  for (;;) {
    if (exit) {
      const e = exit as Exit;
      return {
        ready: false,
        reason: `candidate pid ${inst.pid} exited (${e.signal ? `signal ${e.signal}` : `code ${e.code}`}) before it was ready`,
      };
    }
    if (abort.aborted)
      return {
        ready: false,
        reason: `interrupted while waiting for the candidate (pid ${inst.pid}) to be ready; nothing was switched`,
      };
    const left = deadline - sys.now();
    if (left <= 0)
      return {
        ready: false,
        reason: `candidate pid ${inst.pid} was not ready on port ${inst.port} after ${Math.round(timeoutMs / 1000)}s (--ready-timeout)`,
      };
    if (await checkOnce(sys, check, inst.port, Math.min(left, 2000), env)) {
      if (!exit) return { ready: true };
    }
    await sys.sleep(Math.min(100, Math.max(0, deadline - sys.now())), abort);
  }
}

export async function logTail(sys: Sys, path: string, lines = 20): Promise<string[]> {
  const text = (await sys.fs.read(path).catch(() => '')).trimEnd();
  return text ? text.split('\n').slice(-lines) : [];
}

/** Signals the instance's process group (falling back to the pid if it left its group). */
function signalGroup(sys: Sys, pid: number, signal: NodeJS.Signals): boolean {
  return sys.kill(-pid, signal) || sys.kill(pid, signal);
}

async function groupGone(sys: Sys, inst: Instance): Promise<boolean> {
  if (!inst.pid) return true;
  if (await isAlive(sys, inst.pid, inst.startTime)) return false;
  return (await groupMembers(sys, inst.pid)).length === 0;
}

async function waitGone(sys: Sys, inst: Instance, ms: number): Promise<boolean> {
  const until = sys.now() + ms;
  while (sys.now() < until) {
    if (await groupGone(sys, inst)) return true;
    await sys.sleep(50);
  }
  return groupGone(sys, inst);
}

/** Waits (briefly, bounded) until no redirected handshake is left waiting in the old listener's queue. */
async function acceptQueueEmpty(sys: Sys, port: number): Promise<void> {
  const until = sys.now() + 2000;
  let quiet = 0;
  while (quiet < 2 && sys.now() < until) {
    quiet = pendingAccepts(await tcpSockets(sys), port) === 0 ? quiet + 1 : 0;
    if (quiet < 2) await sys.sleep(10);
  }
}

export const killNow = async (sys: Sys, inst: Instance) => {
  if (!inst.pid || (await groupGone(sys, inst))) return;
  signalGroup(sys, inst.pid, 'SIGKILL');
  await waitGone(sys, inst, 5000);
};

/**
 * Drain on a monotonic clock: in idle mode (and auto, for an instance without the Node drain module) wait for
 * open connections to reach zero (bounded by the drain timeout), then the stop signal, then SIGKILL for the whole
 * group after kill-after.
 * `onSignalled` lets the caller record that the signal went out before it waits.
 */
/** What marking (drainmark.ts) tells a drain about the open connections of the instance it marks. */
export interface DrainWatch {
  /** No packet either way on any of these connections for a second, and none waits for an answer. */
  quiet(remotes: { addr: string; port: number }[]): boolean;
  /** Told how many connections were open when the stop signal went. */
  signalled?(open: number): void;
}

/** The drain mode in force for an instance: auto is signal where the Node drain module listens, else idle. */
export const drainModeOf = (policy: StopPolicy, inst: Instance) =>
  policy.drain === 'auto' ? (inst.nodeDrain ? 'signal' : 'idle') : policy.drain;

export async function drainAndStop(
  sys: Sys,
  app: string,
  inst: Instance,
  policy: StopPolicy,
  emit: Emit,
  onSignalled: () => Promise<void>,
  watch?: DrainWatch,
): Promise<'exited' | 'killed' | 'gone'> {
  if (!inst.pid || (await groupGone(sys, inst))) return 'gone';
  const pid = inst.pid;
  // auto: an instance whose listener has the Node drain module drains keep-alive connections itself (signal);
  // any other waits for its connections to close on their own first (idle): marked answers make busy
  // keep-alive clients close theirs, and under auto the signal goes once the rest are all quiet
  const mode = drainModeOf(policy, inst);
  let reason = policy.drain === 'auto' && mode === 'signal' ? 'stop; the Node drain module handles keep-alive' : 'stop';
  if (!inst.signalledAt && mode === 'idle') {
    const until = sys.now() + policy.drainTimeoutMs;
    let last = -1;
    for (;;) {
      const socks = openSockets(await tcpSockets(sys), inst.port);
      const open = socks.length;
      if (open !== last) emit({ kind: 'connections', app, port: inst.port, pid, open });
      last = open;
      if (open === 0 || (await groupGone(sys, inst))) {
        reason = 'drained';
        break;
      }
      if (
        watch &&
        policy.drain === 'auto' &&
        watch.quiet(socks.map((s) => ({ addr: s.remoteAddr, port: s.remotePort })))
      ) {
        reason = `drained; the ${open} connection${open === 1 ? '' : 's'} left ${open === 1 ? 'is' : 'are'} quiet`;
        break;
      }
      if (sys.now() >= until) {
        emit({
          kind: 'notice',
          app,
          message: `port ${inst.port} still has ${open} open connection(s) after --drain-timeout; stopping anyway`,
        });
        reason = 'drain timeout';
        break;
      }
      await sys.sleep(200);
    }
  }
  if (await groupGone(sys, inst)) return 'exited';
  if (!inst.signalledAt) {
    await acceptQueueEmpty(sys, inst.port);
    watch?.signalled?.(openConnections(await tcpSockets(sys), inst.port));
    emit({ kind: 'signal', app, port: inst.port, pid, signal: policy.stopSignal, reason });
    signalGroup(sys, pid, policy.stopSignal);
    inst.signalledAt = new Date(sys.wallNow()).toISOString();
    await onSignalled();
  }
  // report the connections as they fall while the app finishes its in-flight requests
  const until = sys.now() + policy.killAfterMs;
  let last = -1;
  while (sys.now() < until) {
    if (await groupGone(sys, inst)) return 'exited';
    const open = openConnections(await tcpSockets(sys), inst.port);
    if (open !== last) emit({ kind: 'connections', app, port: inst.port, pid, open });
    last = open;
    await sys.sleep(100);
  }
  if (await groupGone(sys, inst)) return 'exited';
  emit({
    kind: 'signal',
    app,
    port: inst.port,
    pid,
    signal: 'SIGKILL',
    reason: `still running ${Math.round(policy.killAfterMs / 1000)}s after ${policy.stopSignal} (--kill-after)`,
  });
  signalGroup(sys, pid, 'SIGKILL');
  await waitGone(sys, inst, 5000);
  return 'killed';
}
