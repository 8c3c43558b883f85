// Test harness: throwaway network namespaces, the fixture app, bounded load and the built CLI, cleaned up by pid.
import { spawn as spawnProcess, type ChildProcess, type StdioOptions } from 'node:child_process';
import { chmodSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { constants, tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { $ } from 'zx';

export const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');

export function fixture(name: string): string {
  return path.join(repoRoot, 'test', 'fixtures', name);
}

// Root gets a plain network namespace; anyone else needs a user namespace around it to hold CAP_NET_ADMIN.
const userns = process.getuid?.() !== 0;
const HOLDER = ['sleep', '3600']; // bounded even if every cleanup below fails
const EXEC_TIMEOUT_MS = 30_000;

export const SERVER_ADDR = '10.231.0.1';
export const SERVER_ADDR6 = 'fd31::1';
export const CLIENT_ADDR = '10.231.0.2';
export const CLIENT_ADDR6 = 'fd31::2';

export interface ExecOptions {
  env?: NodeJS.ProcessEnv;
  input?: string;
  timeoutMs?: number;
  signal?: AbortSignal;
}

export interface ExecResult {
  code: number; // 128 + signal number when killed, as a shell reports it
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  timedOut: boolean;
}

export interface SpawnOptions {
  env?: NodeJS.ProcessEnv;
  stdio?: StdioOptions;
}

export interface Netns {
  pid: number;
  clientPid?: number;
  userns: boolean;
  serverAddr?: string;
  serverAddr6?: string;
  clientAddr?: string;
  clientAddr6?: string;
  exec(cmd: string, args: string[], opts?: ExecOptions): Promise<ExecResult>;
  spawn(cmd: string, args: string[], opts?: SpawnOptions): ChildProcess;
  execClient(cmd: string, args: string[], opts?: ExecOptions): Promise<ExecResult>;
  spawnClient(cmd: string, args: string[], opts?: SpawnOptions): ChildProcess;
  destroy(): Promise<void>;
}

export type Where = 'server' | 'client';

// Everything started here, so that a test killed by the runner (SIGTERM) or exiting early leaves nothing behind.
const live = { groups: new Set<number>(), holders: new Set<number>(), stateDirs: new Set<string>() };

function killQuietly(pid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(pid, signal);
  } catch (err) {
    // ESRCH: already gone. EPERM: the pid now belongs to someone else, so it is not ours to kill.
    const code = (err as NodeJS.ErrnoException).code;
    if (code !== 'ESRCH' && code !== 'EPERM') throw err;
  }
}

function cleanupEverything(): void {
  for (const dir of live.stateDirs) killAppInstancesSync(dir);
  for (const pid of live.groups) killQuietly(-pid, 'SIGKILL');
  for (const pid of live.holders) killQuietly(pid, 'SIGKILL');
}
process.on('exit', cleanupEverything);
for (const sig of ['SIGTERM', 'SIGINT'] as const) {
  process.on(sig, () => {
    cleanupEverything();
    process.exit(sig === 'SIGTERM' ? 143 : 130);
  });
}

function nsenterArgs(pid: number): string[] {
  return ['-t', String(pid), ...(userns ? ['-U', '--preserve-credentials'] : []), '-n', '--'];
}

// nsenter execs the program without forking (no -p), so the child's pid is the program's pid.
function spawnIn(nsPid: number, cmd: string, args: string[], opts: SpawnOptions = {}): ChildProcess {
  const child = spawnProcess('nsenter', [...nsenterArgs(nsPid), cmd, ...args], {
    env: { ...process.env, ...opts.env },
    stdio: opts.stdio ?? 'pipe',
    detached: true, // own process group, so a whole tree can be signalled
  });
  const pid = child.pid;
  if (pid !== undefined) {
    live.groups.add(pid);
    child.once('exit', () => live.groups.delete(pid));
  }
  return child;
}

// zx runs it (argv quoted element by element) and owns the timeout and the kill; the shell it starts leads
// its own process group, so a timeout takes the whole tree. nothrow: the caller reads the exit code.
async function execIn(nsPid: number, cmd: string, args: string[], opts: ExecOptions = {}): Promise<ExecResult> {
  const timeoutMs = opts.timeoutMs ?? EXEC_TIMEOUT_MS;
  const started = performance.now();
  const p = $({
    env: { ...process.env, ...opts.env },
    input: opts.input ?? '',
    signal: opts.signal,
    detached: true,
    timeout: timeoutMs,
    timeoutSignal: 'SIGKILL',
    nothrow: true,
    quiet: true,
  })`exec nsenter ${nsenterArgs(nsPid)} ${cmd} ${args}`;
  const pid = p.pid;
  if (pid !== undefined) live.groups.add(pid);
  const out = await p;
  if (pid !== undefined) live.groups.delete(pid);
  const signal = (out.signal ?? null) as NodeJS.Signals | null;
  const timedOut = signal === 'SIGKILL' && performance.now() - started >= timeoutMs;
  const code = out.exitCode ?? 128 + (signal ? constants.signals[signal] : 0);
  return { code, signal, stdout: out.stdout, stderr: out.stderr, timedOut };
}

function readComm(pid: number): string {
  try {
    return readFileSync(`/proc/${pid}/comm`, 'utf8').trim();
  } catch {
    return '';
  }
}

// The holder is ready once unshare has made the namespace and exec'd sleep.
async function startHolder(argv: string[]): Promise<number> {
  const child = spawnProcess(argv[0], argv.slice(1), { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (d) => (stderr += d));
  const pid = child.pid;
  if (pid === undefined) throw new Error(`could not start ${argv.join(' ')}`);
  live.holders.add(pid);
  let exited: string | undefined;
  child.once('exit', (code, signal) => {
    live.holders.delete(pid);
    exited = `${argv.join(' ')} exited (${signal ?? code}): ${stderr.trim()}`;
  });
  await waitFor(
    () => {
      if (exited) throw new Error(exited);
      return readComm(pid) === 'sleep';
    },
    5000,
    `namespace holder ${argv.join(' ')}`,
  );
  child.stderr!.destroy();
  child.unref(); // a forgotten destroy() must not keep the test process alive for an hour
  return pid;
}

async function mustExec(nsPid: number, cmd: string, args: string[], input?: string): Promise<void> {
  const r = await execIn(nsPid, cmd, args, { input });
  if (r.code !== 0)
    throw new Error(`${cmd} ${args.join(' ')} in netns ${nsPid} failed (${r.code}): ${r.stderr.trim()}`);
}

async function waitGone(pid: number, timeoutMs: number): Promise<void> {
  await waitFor(() => readComm(pid) === '' || procState(pid) === 'Z', timeoutMs, `pid ${pid} to exit`);
}

function procState(pid: number): string {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[0];
  } catch {
    return '';
  }
}

export async function createNetns(opts: { peer?: boolean } = {}): Promise<Netns> {
  const holders: number[] = [];
  let destroyed: Promise<void> | undefined;
  const destroy = () =>
    (destroyed ??= (async () => {
      for (const pid of holders) killQuietly(pid, 'SIGKILL');
      for (const pid of holders) await waitGone(pid, 5000).catch(() => {});
      for (const pid of holders) live.holders.delete(pid);
    })());
  try {
    const pid = await startHolder([...(userns ? ['unshare', '-rn'] : ['unshare', '-n']), ...HOLDER]);
    holders.push(pid);
    await mustExec(pid, 'ip', ['link', 'set', 'lo', 'up']);
    const ns: Netns = {
      pid,
      userns,
      exec: (cmd, args, o) => execIn(pid, cmd, args, o),
      spawn: (cmd, args, o) => spawnIn(pid, cmd, args, o),
      execClient: () => Promise.reject(new Error('no client namespace: createNetns({ peer: true })')),
      spawnClient: () => {
        throw new Error('no client namespace: createNetns({ peer: true })');
      },
      destroy,
    };
    if (!opts.peer) return ns;

    // Unprivileged, the client namespace must belong to the server's user namespace, or veth can't join them.
    const clientPid = await startHolder([
      ...(userns ? ['nsenter', '-t', String(pid), '-U', '--preserve-credentials'] : []),
      'unshare',
      '-n',
      ...HOLDER,
    ]);
    holders.push(clientPid);
    await mustExec(
      pid,
      'ip',
      ['-batch', '-'],
      [
        `link add pf-s type veth peer name pf-c netns ${clientPid}`,
        `addr add ${SERVER_ADDR}/24 dev pf-s`,
        `addr add ${SERVER_ADDR6}/64 dev pf-s nodad`,
        'link set pf-s up',
        '',
      ].join('\n'),
    );
    await mustExec(
      clientPid,
      'ip',
      ['-batch', '-'],
      [
        'link set lo up',
        `addr add ${CLIENT_ADDR}/24 dev pf-c`,
        `addr add ${CLIENT_ADDR6}/64 dev pf-c nodad`,
        'link set pf-c up',
        '',
      ].join('\n'),
    );
    return Object.assign(ns, {
      clientPid,
      serverAddr: SERVER_ADDR,
      serverAddr6: SERVER_ADDR6,
      clientAddr: CLIENT_ADDR,
      clientAddr6: CLIENT_ADDR6,
      execClient: (cmd: string, args: string[], o?: ExecOptions) => execIn(clientPid, cmd, args, o),
      spawnClient: (cmd: string, args: string[], o?: SpawnOptions) => spawnIn(clientPid, cmd, args, o),
    });
  } catch (err) {
    await destroy();
    throw err;
  }
}

export async function waitFor(fn: () => Promise<boolean> | boolean, timeoutMs: number, what: string): Promise<void> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    if (await fn()) return;
    if (performance.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

function childExit(child: ChildProcess): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
  if (child.exitCode !== null || child.signalCode !== null) {
    return Promise.resolve({ code: child.exitCode, signal: child.signalCode });
  }
  return new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
}

function spawnWhere(ns: Netns, where: Where, cmd: string, args: string[], opts?: SpawnOptions): ChildProcess {
  return where === 'client' ? ns.spawnClient(cmd, args, opts) : ns.spawn(cmd, args, opts);
}

function execWhere(ns: Netns, where: Where, cmd: string, args: string[], opts?: ExecOptions): Promise<ExecResult> {
  return where === 'client' ? ns.execClient(cmd, args, opts) : ns.exec(cmd, args, opts);
}

export interface LoadArgs {
  url: string;
  mode?: 'new' | 'keepalive';
  concurrency?: number;
  durationMs?: number;
  maxRequests?: number;
  timeoutMs?: number;
  method?: 'GET' | 'POST'; // POST sends a small body
  pauseMs?: number; // each worker waits this long between requests (spares the CPU in long runs)
}

export interface LoadResult {
  total: number;
  ok: number;
  failed: number;
  errors: Record<string, number>;
  versions: string[];
  firstErrors: string[];
  p50: number;
  p99: number;
  max: number;
}

export interface LoadHandle {
  pid: number;
  stop(): Promise<LoadResult>; // asks it to stop, then waits for in-flight requests and the summary
  done(): Promise<LoadResult>; // waits for it to stop on its own (duration or max requests)
}

export async function startLoad(ns: Netns, where: Where, args: LoadArgs): Promise<LoadHandle> {
  const a = { mode: 'new', concurrency: 4, durationMs: 10_000, maxRequests: 100_000, timeoutMs: 5000, ...args };
  const child = spawnWhere(ns, where, process.execPath, [
    fixture('load.mjs'),
    '--url',
    a.url,
    '--mode',
    a.mode,
    '--concurrency',
    String(a.concurrency),
    '--duration',
    String(a.durationMs),
    '--max-requests',
    String(a.maxRequests),
    '--timeout',
    String(a.timeoutMs),
    ...(a.method ? ['--method', a.method] : []),
    ...(a.pauseMs ? ['--pause', String(a.pauseMs)] : []),
  ]);
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (d) => (stdout += d));
  child.stderr!.on('data', (d) => (stderr += d));
  child.stdin!.on('error', () => {});
  const exited = childExit(child);
  const pid = child.pid!;

  const parse = async (): Promise<LoadResult> => {
    const { code, signal } = await exited;
    const line = stdout.trim().split('\n').pop() ?? '';
    try {
      return JSON.parse(line) as LoadResult;
    } catch {
      throw new Error(`load pid ${pid} ended (${signal ?? code}) without a summary; stderr: ${stderr.trim()}`);
    }
  };
  // Stop politely, then escalate: in-flight requests are bounded by the per-request timeout.
  const stop = async (): Promise<LoadResult> => {
    if (child.exitCode === null && child.signalCode === null) {
      child.stdin!.end('stop\n');
      const grace = a.timeoutMs + 5000;
      const t1 = setTimeout(() => killQuietly(pid, 'SIGTERM'), grace);
      const t2 = setTimeout(() => killQuietly(-pid, 'SIGKILL'), grace + 3000);
      await exited;
      clearTimeout(t1);
      clearTimeout(t2);
    }
    return parse();
  };
  const done = async (): Promise<LoadResult> => {
    const t = setTimeout(() => killQuietly(-pid, 'SIGKILL'), a.durationMs + a.timeoutMs + 10_000);
    await exited;
    clearTimeout(t);
    return parse();
  };

  try {
    await waitFor(
      () => {
        if (stderr.split('\n').includes('ready')) return true;
        if (child.exitCode !== null || child.signalCode !== null) {
          throw new Error(`load exited before its first good answer: ${stdout.trim()} ${stderr.trim()}`);
        }
        return false;
      },
      10_000,
      `first good answer from ${a.url}`,
    );
  } catch (err) {
    const last = await stop().catch(() => undefined);
    throw new Error(`${(err as Error).message}${last ? `; summary: ${JSON.stringify(last)}` : ''}`);
  }
  return { pid, stop, done };
}

export interface AppHandle {
  pid: number;
  child: ChildProcess;
  output(): string; // stdout and stderr so far, interleaved
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  // Sends the signal (SIGTERM by default), waits, then SIGKILLs the group; resolves with how it ended.
  stop(opts?: {
    signal?: NodeJS.Signals;
    timeoutMs?: number;
  }): Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

export async function startApp(
  ns: Netns,
  port: number,
  args: string[],
  opts: { where?: Where; host?: string; timeoutMs?: number } = {},
): Promise<AppHandle> {
  const where = opts.where ?? 'server';
  const child = spawnWhere(ns, where, process.execPath, [fixture('app.mjs'), '--port', String(port), ...args]);
  let out = '';
  child.stdout!.on('data', (d) => (out += d));
  child.stderr!.on('data', (d) => (out += d));
  const pid = child.pid!;
  const exited = childExit(child);
  const stop: AppHandle['stop'] = async ({ signal = 'SIGTERM', timeoutMs = 5000 } = {}) => {
    if (child.exitCode === null && child.signalCode === null) {
      killQuietly(pid, signal);
      const t = setTimeout(() => killQuietly(-pid, 'SIGKILL'), timeoutMs);
      await exited;
      clearTimeout(t);
    }
    return exited;
  };
  const app: AppHandle = { pid, child, output: () => out, exited, stop };

  const abort = new AbortController();
  const timeoutMs = opts.timeoutMs ?? 10_000;
  const probe = waitForPort(ns, port, { where, host: opts.host, timeoutMs, signal: abort.signal });
  const died = exited.then(({ code, signal }) => {
    throw new Error(`app pid ${pid} exited (${signal ?? code}) before listening on ${port}: ${out.trim()}`);
  });
  try {
    await Promise.race([probe, died]);
  } catch (err) {
    abort.abort();
    await stop({ signal: 'SIGKILL' });
    throw err;
  } finally {
    died.catch(() => {});
  }
  return app;
}

const PROBE = `
const net = require('node:net');
const [host, port, ms] = process.argv.slice(1);
const deadline = Date.now() + Number(ms);
const attempt = () => {
  const s = net.connect(Number(port), host, () => { s.destroy(); process.exit(0); });
  s.on('error', () => Date.now() > deadline ? process.exit(1) : setTimeout(attempt, 25));
};
attempt();
`;

// Resolves once something inside the namespace accepts TCP connections on host:port.
export async function waitForPort(
  ns: Netns,
  port: number,
  opts: { where?: Where; host?: string; timeoutMs?: number; signal?: AbortSignal } = {},
): Promise<void> {
  const host = opts.host ?? '127.0.0.1';
  const timeoutMs = opts.timeoutMs ?? 10_000;
  const r = await execWhere(
    ns,
    opts.where ?? 'server',
    process.execPath,
    ['-e', PROBE, host, String(port), String(timeoutMs)],
    {
      timeoutMs: timeoutMs + 5000,
      signal: opts.signal,
    },
  );
  if (r.code !== 0)
    throw new Error(`nothing accepted TCP on ${host}:${port} within ${timeoutMs} ms ${r.stderr.trim()}`);
}

export interface TcpCounts {
  listening: boolean;
  acceptQueue: number; // handshakes done, not yet accept()ed: closing the listener now resets them
  synRecv: number; // handshakes in progress: same fate
  established: number;
}

// TCP sockets on a local port inside the namespace, from /proc/PID/net (which shows the netns of PID).
export function tcpCounts(ns: Netns, port: number, where: Where = 'server'): TcpCounts {
  const pid = where === 'client' ? ns.clientPid! : ns.pid;
  const hexPort = `:${port.toString(16).toUpperCase().padStart(4, '0')}`;
  const c: TcpCounts = { listening: false, acceptQueue: 0, synRecv: 0, established: 0 };
  for (const file of ['tcp', 'tcp6']) {
    const lines = readFileSync(`/proc/${pid}/net/${file}`, 'utf8').trim().split('\n').slice(1);
    for (const line of lines) {
      const [, local, , state, queues] = line.trim().split(/\s+/);
      if (!local.endsWith(hexPort)) continue;
      if (state === '0A') {
        c.listening = true;
        c.acceptQueue += parseInt(queues.split(':')[1], 16); // rx_queue of a listener is its accept backlog
      } else if (state === '03') c.synRecv++;
      else if (state === '01') c.established++;
    }
  }
  return c;
}

export interface TmpDirs {
  stateDir: string;
  runDir: string;
  preloadDir: string; // where portflip copies the Node drain preload when the repo is not readable by --user
  cleanup(): void; // kills instances recorded in stateDir, then removes both
}

export function tmpDirs(): TmpDirs {
  const base = mkdtempSync(path.join(tmpdir(), 'portflip-test-'));
  const stateDir = path.join(base, 'state');
  const runDir = path.join(base, 'run');
  const preloadDir = path.join(base, 'preload');
  mkdirSync(stateDir, { mode: 0o700 });
  mkdirSync(runDir, { mode: 0o700 });
  chmodSync(base, 0o711); // an app's --user must reach preloadDir; the state and run dirs stay 0700
  live.stateDirs.add(stateDir);
  return {
    stateDir,
    runDir,
    preloadDir,
    cleanup() {
      killAppInstancesSync(stateDir);
      live.stateDirs.delete(stateDir);
      rmSync(base, { recursive: true, force: true });
    },
  };
}

// Field 22 of /proc/PID/stat, the same identity the state file records.
function startTimeOf(pid: number): string | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19];
  } catch {
    return undefined;
  }
}

function killAppInstancesSync(stateDir: string): number[] {
  let files: string[];
  try {
    files = readdirSync(stateDir).filter((f) => f.endsWith('.json'));
  } catch {
    return [];
  }
  const killed: number[] = [];
  for (const file of files) {
    let state: { instances?: { pid?: unknown; startTime?: unknown }[] };
    try {
      state = JSON.parse(readFileSync(path.join(stateDir, file), 'utf8'));
    } catch {
      continue; // a half-written or foreign file is not ours to act on
    }
    for (const inst of state.instances ?? []) {
      const pid = inst.pid;
      if (typeof pid !== 'number' || !Number.isInteger(pid) || pid <= 1) continue;
      // A recorded start time that no longer matches means the pid was reused by someone else.
      if (inst.startTime !== undefined && startTimeOf(pid) !== String(inst.startTime)) continue;
      killQuietly(-pid, 'SIGKILL');
      killQuietly(pid, 'SIGKILL');
      killed.push(pid);
    }
  }
  return killed;
}

// SIGKILLs every instance (and its process group) recorded in the state files; returns the pids signalled.
export async function killAppInstances(stateDir: string): Promise<number[]> {
  const killed = killAppInstancesSync(stateDir);
  await Promise.all(killed.map((pid) => waitGone(pid, 5000).catch(() => {})));
  return killed;
}

// Random, distinct, and only ever used inside a fresh namespace, so they can't collide with anything else.
export async function freePorts(n: number): Promise<number[]> {
  const ports = new Set<number>();
  while (ports.size < n) ports.add(20000 + Math.floor(Math.random() * 10000));
  return [...ports];
}

const MAIN = path.join(repoRoot, 'dist', 'src', 'main.cjs');

function portflipEnv(
  dirs: { stateDir: string; runDir: string; preloadDir?: string },
  env?: NodeJS.ProcessEnv,
): NodeJS.ProcessEnv {
  const preload = dirs.preloadDir ? { PORTFLIP_PRELOAD_DIR: dirs.preloadDir } : {};
  // no textfile unless a test asks for one: the machine's node_exporter directory is not the tests' to write
  const textfile = { PORTFLIP_TEXTFILE_DIR: '' };
  return { ...preload, ...textfile, ...env, PORTFLIP_STATE_DIR: dirs.stateDir, PORTFLIP_RUN_DIR: dirs.runDir };
}

// Runs the built CLI inside the server namespace.
export function portflip(
  ns: Netns,
  args: string[],
  dirs: { stateDir: string; runDir: string; preloadDir?: string },
  opts: { env?: NodeJS.ProcessEnv; input?: string; timeoutMs?: number } = {},
): Promise<ExecResult> {
  return ns.exec(process.execPath, [MAIN, ...args], {
    env: portflipEnv(dirs, opts.env),
    input: opts.input,
    timeoutMs: opts.timeoutMs ?? 60_000,
  });
}

export function portflipSpawn(
  ns: Netns,
  args: string[],
  dirs: { stateDir: string; runDir: string; preloadDir?: string },
  opts: { env?: NodeJS.ProcessEnv; stdio?: StdioOptions } = {},
): ChildProcess {
  return ns.spawn(process.execPath, [MAIN, ...args], { env: portflipEnv(dirs, opts.env), stdio: opts.stdio });
}
