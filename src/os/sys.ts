// The one door to the operating system: commands, processes, files, procfs, probes, signals and the clock.
//
// Step logic reaches the OS only through a Sys, so tests run it against a fake (test/helpers/fakesys.ts)
// without root. The real one below is thin on purpose: it calls Node and does nothing else.

import { spawn as spawnChild } from 'node:child_process';
import * as fsp from 'node:fs/promises';
import { connect as netConnect } from 'node:net';
import os from 'node:os';
import { delimiter, dirname, join } from 'node:path';

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
  signal?: NodeJS.Signals | null; // what ended it, when a signal did (a timeout sends SIGTERM)
  error?: string; // it could not start at all (code is then 127)
}

export interface RunOptions {
  input?: string;
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  timeoutMs?: number;
  uid?: number;
  gid?: number;
  /** capture (default): stdout and stderr come back; stderr: both go to portflip's stderr; ignore: dropped. */
  output?: 'capture' | 'stderr' | 'ignore';
}

export interface SpawnOptions {
  cwd?: string;
  env: NodeJS.ProcessEnv;
  uid?: number;
  gid?: number;
  /** A fresh file (0640, owned by uid:gid) for stdout and stderr; none: both are dropped. */
  log?: string;
}

export type Exit = { code: number | null; signal: NodeJS.Signals | null };

/** A process started in its own process group, left running when portflip exits. */
export interface Child {
  pid: number;
  exited: Promise<Exit>;
}

export interface FileStat {
  isFile: boolean;
  isDirectory: boolean;
  mode: number;
  uid: number;
  gid: number;
  size: number;
  mtimeMs: number; // wall clock, as wallNow()
}

/** Files. Failures throw Node's errno errors (code, syscall, path), which the CLI turns into one line. */
export interface SysFs {
  read(path: string): Promise<string>;
  /** From byte `offset` to the end (from 0 when the file is now shorter: truncated), and the size read up to. */
  readFrom(path: string, offset: number): Promise<{ size: number; text: string }>;
  /** A plain write (truncates); `exclusive` fails with EEXIST when the file is there. */
  write(path: string, text: string, mode: number, exclusive?: boolean): Promise<void>;
  /** One O_APPEND write of the whole text (created with `mode` when absent): lines of other appenders stay whole. */
  append(path: string, text: string, mode: number): Promise<void>;
  /** Temp file, fsync, rename, fsync the directory: a crash leaves the old or the new file, never half. */
  writeAtomic(path: string, text: string, mode: number): Promise<void>;
  mkdir(path: string, mode: number): Promise<void>; // with parents; no error when it exists
  chmod(path: string, mode: number): Promise<void>;
  chown(path: string, uid: number, gid: number): Promise<void>;
  link(existing: string, path: string): Promise<void>;
  rename(from: string, to: string): Promise<void>;
  unlink(path: string): Promise<void>;
  readdir(path: string): Promise<string[]>;
  readlink(path: string): Promise<string>;
  stat(path: string): Promise<FileStat>;
  canExec(path: string): Promise<boolean>; // access(X_OK)
}

export interface ProcessUsage {
  cpu: number;
  memory: number;
  elapsed: number;
}

/** An NFQUEUE this process reads, copying whole packets (nfqueue.ts); drainmark.ts marks through it. */
export interface PacketQueue {
  readonly queue: number;
  /** Waits up to `ms`, then hands every waiting packet to `fn`; what it returns goes out instead (null: as is). */
  serve(ms: number, fn: (packet: Buffer) => Buffer | null): Promise<number>;
  close(): void;
}

export interface Sys {
  /** portflip's own pid (the lock names it). */
  readonly pid: number;
  run(cmd: string, args: string[], opts?: RunOptions): Promise<RunResult>;
  /** Detached: its own process group, so it outlives this CLI and can be signalled as a tree. */
  spawn(cmd: string, args: string[], opts: SpawnOptions): Promise<Child>;
  fs: SysFs;
  /** A whole file as text (procfs included), or null when it cannot be read. */
  readText(path: string): Promise<string | null>;
  /** The first lines of a file, up to (not including) the first for which `more` is false. */
  readLinesWhile(path: string, more: (line: string, index: number) => boolean): Promise<string[] | null>;
  /** Readiness probes: a TCP connect, and an HTTP(S) GET answering 2xx/3xx. */
  connect(host: string, port: number, timeoutMs: number): Promise<boolean>;
  httpOk(url: string, timeoutMs: number): Promise<boolean>;
  /** One line to a unix socket (a holder's control socket), the first line back; null when none comes. */
  ask(socket: string, line: string, timeoutMs: number): Promise<string | null>;
  kill(pid: number, signal: NodeJS.Signals | 0): boolean;
  /** Binds NFQUEUE `queue` in this process; throws when it cannot (taken, no nfnetlink_queue, no privilege). */
  openQueue(queue: number, maxlen: number): Promise<PacketQueue>;
  /** CPU (percent of one core since start), resident memory (bytes) and age (ms) of live processes. */
  usage(pids: number[]): Promise<Map<number, ProcessUsage>>;
  /** The priority portflip started with, before main.cts lowered its own (yieldCpu). */
  readonly startPriority: number;
  getPriority(): number;
  setPriority(pid: number, priority: number): void; // best effort
  now(): number; // monotonic milliseconds
  wallNow(): number; // epoch milliseconds, for what people and other runs read (keepUntil, timestamps)
  sleep(ms: number, signal?: AbortSignal): Promise<void>;
}

/** Read once at load, before yieldCpu lowers portflip's own priority. */
const startPriority = os.getPriority();

const realFs: SysFs = {
  read: (path) => fsp.readFile(path, 'utf8'),
  async readFrom(path, offset) {
    const fh = await fsp.open(path, 'r');
    try {
      const { size } = await fh.stat();
      const start = size < offset ? 0 : offset;
      const buf = Buffer.alloc(size - start);
      if (buf.length) await fh.read(buf, 0, buf.length, start);
      return { size, text: buf.toString('utf8') };
    } finally {
      await fh.close();
    }
  },
  write: (path, text, mode, exclusive) => fsp.writeFile(path, text, { mode, flag: exclusive ? 'wx' : 'w' }),
  async append(path, text, mode) {
    const fh = await fsp.open(path, 'a', mode);
    try {
      await fh.write(text); // one write(2): a kill leaves at most this line torn
    } finally {
      await fh.close();
    }
  },
  async writeAtomic(path, text, mode) {
    const tmp = `${path}.${process.pid}.tmp`;
    const fh = await fsp.open(tmp, 'w', mode);
    try {
      await fh.writeFile(text);
      await fh.sync();
    } finally {
      await fh.close();
    }
    await fsp.rename(tmp, path);
    const dir = await fsp.open(dirname(path), 'r');
    await dir.sync().catch(() => {});
    await dir.close();
  },
  mkdir: async (path, mode) => void (await fsp.mkdir(path, { recursive: true, mode })),
  chmod: (path, mode) => fsp.chmod(path, mode),
  chown: (path, uid, gid) => fsp.chown(path, uid, gid),
  link: (existing, path) => fsp.link(existing, path),
  rename: (from, to) => fsp.rename(from, to),
  unlink: (path) => fsp.unlink(path),
  readdir: (path) => fsp.readdir(path),
  readlink: (path) => fsp.readlink(path),
  async stat(path) {
    const s = await fsp.stat(path);
    return {
      isFile: s.isFile(),
      isDirectory: s.isDirectory(),
      mode: s.mode,
      uid: s.uid,
      gid: s.gid,
      size: s.size,
      mtimeMs: s.mtimeMs,
    };
  },
  canExec: (path) =>
    fsp.access(path, fsp.constants.X_OK).then(
      () => true,
      () => false,
    ),
};

export const realSys: Sys = {
  pid: process.pid,
  // argv straight to execve, no shell: nothing to quote, no ~/.bashrc, and a few ms per iptables call
  run(cmd, args, opts = {}) {
    const output = opts.output ?? 'capture';
    const stdio = output === 'capture' ? 'pipe' : output === 'stderr' ? 2 : 'ignore';
    return new Promise((resolve) => {
      const child = spawnChild(cmd, args, {
        env: opts.env ?? process.env,
        cwd: opts.cwd,
        uid: opts.uid,
        gid: opts.gid,
        timeout: opts.timeoutMs,
        stdio: [output === 'capture' ? 'pipe' : 'ignore', stdio, stdio],
      });
      let stdout = '';
      let stderr = '';
      child.stdout?.setEncoding('utf8').on('data', (d) => (stdout += d));
      child.stderr?.setEncoding('utf8').on('data', (d) => (stderr += d));
      child.stdin?.on('error', () => {}); // a command may exit without reading its input
      child.stdin?.end(opts.input ?? '');
      child.once('error', (err) => resolve({ code: 127, stdout, stderr: stderr + err.message, error: err.message }));
      // with captured output, wait until the pipes are drained; otherwise the exit is the end
      child.once(output === 'capture' ? 'close' : 'exit', (code: number | null, signal: NodeJS.Signals | null) =>
        resolve({ code: code ?? (signal ? 128 : 1), stdout, stderr, ...(signal ? { signal } : {}) }),
      );
    });
  },
  async spawn(cmd, args, opts) {
    const fh = opts.log ? await fsp.open(opts.log, 'w', 0o640) : null; // a fresh log per instance
    if (fh && opts.uid !== undefined) await fsp.chown(opts.log!, opts.uid, opts.gid ?? opts.uid).catch(() => {});
    try {
      const out = fh ? fh.fd : 'ignore';
      const child = spawnChild(cmd, args, {
        cwd: opts.cwd,
        env: opts.env,
        detached: true,
        stdio: ['ignore', out, out],
        uid: opts.uid,
        gid: opts.gid,
      });
      const exited = new Promise<Exit>((res) => child.once('exit', (code, signal) => res({ code, signal })));
      await new Promise<void>((res, rej) => {
        child.once('spawn', res);
        child.once('error', rej);
      });
      child.unref();
      return { pid: child.pid!, exited };
    } finally {
      await fh?.close();
    }
  },
  fs: realFs,
  async readText(path) {
    try {
      return await fsp.readFile(path, 'utf8');
    } catch {
      return null;
    }
  },
  async readLinesWhile(path, more) {
    // chunk by chunk, without streams or readline (loading those was most of the cost): a busy host's
    // /proc/net/tcp is long, and the listeners it is read for come first
    const fh = await fsp.open(path, 'r').catch(() => null);
    if (!fh) return null;
    try {
      const lines: string[] = [];
      const decoder = new TextDecoder();
      const buf = Buffer.alloc(64 * 1024);
      let rest = '';
      for (;;) {
        const { bytesRead } = await fh.read(buf, 0, buf.length, null);
        const parts = (rest + decoder.decode(buf.subarray(0, bytesRead), { stream: bytesRead > 0 })).split('\n');
        rest = bytesRead ? parts.pop()! : '';
        for (const line of parts) {
          if (!bytesRead && line === '') continue; // the newline that ends the file starts no line
          if (!more(line, lines.length)) return lines;
          lines.push(line);
        }
        if (!bytesRead) return lines;
      }
    } catch {
      return null;
    } finally {
      await fh.close();
    }
  },
  connect(host, port, timeoutMs) {
    return new Promise((res) => {
      const s = netConnect({ host, port });
      const done = (ok: boolean) => {
        s.destroy();
        res(ok);
      };
      s.setTimeout(timeoutMs, () => done(false));
      s.once('connect', () => done(true));
      s.once('error', () => done(false));
    });
  },
  ask(socket, line, timeoutMs) {
    return new Promise((res) => {
      const s = netConnect(socket);
      let buf = '';
      const done = (v: string | null) => {
        s.destroy();
        res(v);
      };
      s.setTimeout(timeoutMs, () => done(null));
      s.once('error', () => done(null));
      s.once('connect', () => s.write(line + '\n'));
      s.on('data', (d) => {
        buf += d.toString();
        if (buf.includes('\n')) done(buf.slice(0, buf.indexOf('\n')));
      });
      s.once('end', () => done(null));
    });
  },
  async httpOk(url, timeoutMs) {
    // loaded on first use: most deploys check readiness over plain TCP, and https pulls in TLS
    const { request } = url.startsWith('https:') ? await import('node:https') : await import('node:http');
    return new Promise((res) => {
      // a health check on this host often sits behind a self-signed certificate: readiness, not trust, is asked
      const req = request(url, { method: 'GET', timeout: timeoutMs, agent: false, rejectUnauthorized: false }, (r) => {
        r.resume();
        res((r.statusCode ?? 0) >= 200 && (r.statusCode ?? 0) < 400);
      });
      req.once('timeout', () => req.destroy());
      req.once('error', () => res(false));
      req.end();
    });
  },
  kill(pid, signal) {
    try {
      process.kill(pid, signal);
      return true;
    } catch {
      return false;
    }
  },
  async openQueue(queue, maxlen) {
    const { NfQueue, MAX_COPY, CFG_F_FAIL_OPEN } = await import('./nfqueue.js'); // koffi loads only where used
    const q = new NfQueue(queue, MAX_COPY);
    q.open(maxlen, CFG_F_FAIL_OPEN);
    return q;
  },
  async usage(pids) {
    if (!pids.length) return new Map();
    const { default: pidusage } = await import('pidusage'); // loaded only where it is used (status)
    try {
      const all = await pidusage(pids).catch(async () => {
        // one process gone since the caller looked fails the batch: ask one by one
        const each = await Promise.all(pids.map((p) => pidusage(p).catch(() => null)));
        return Object.fromEntries(pids.flatMap((p, i) => (each[i] ? [[p, each[i]]] : [])));
      });
      return new Map(Object.entries(all).map(([pid, u]) => [Number(pid), u]));
    } finally {
      pidusage.clear();
    }
  },
  startPriority,
  getPriority: () => os.getPriority(),
  setPriority(pid, priority) {
    try {
      os.setPriority(pid, priority);
    } catch {
      // not allowed here: the process keeps the priority it has
    }
  },
  now: () => performance.now(),
  wallNow: () => Date.now(),
  sleep: (ms, signal) =>
    new Promise((resolve) => {
      if (signal?.aborted) return resolve();
      const t = setTimeout(done, ms);
      function done() {
        clearTimeout(t);
        signal?.removeEventListener('abort', done);
        resolve();
      }
      signal?.addEventListener('abort', done, { once: true });
    }),
};

/** Finds a command in PATH the way execvp does, without starting a shell. */
export async function which(sys: Sys, cmd: string, pathVar = process.env.PATH ?? ''): Promise<string | null> {
  // every PATH entry at once (a deploy looks up several commands, and PATH often has ten entries);
  // the first that has it wins, as in a shell
  const dirs = [...new Set(pathVar.split(delimiter).filter(Boolean))];
  const found = await Promise.all(dirs.map((dir) => sys.fs.canExec(join(dir, cmd))));
  const at = found.indexOf(true);
  return at < 0 ? null : join(dirs[at], cmd);
}

/**
 * portflip's own CPU time competes with the requests the old instance is serving, so it runs
 * niced; instances get the priority portflip started with back (Sys.startPriority). Only where
 * that is allowed (real root: in a user namespace a niced process cannot be raised again).
 */
export function yieldCpu(uidMap: string | null): void {
  const realRoot = process.getuid?.() === 0 && /^\s*0\s+0\s+4294967295\s*$/.test(uidMap ?? '');
  if (!realRoot) return;
  try {
    os.setPriority(Math.min(19, startPriority + 10));
  } catch {
    // not allowed here: run at the normal priority
  }
}
