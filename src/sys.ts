// The one door to the operating system: commands, signals, files and the clock, so step logic can be faked.

import { spawn } from 'node:child_process';
import { createReadStream } from 'node:fs';
import { access, constants, readFile } from 'node:fs/promises';
import { createInterface } from 'node:readline';
import { delimiter, join } from 'node:path';

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

export interface RunOptions {
  input?: string;
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  timeoutMs?: number;
}

export interface Sys {
  run(cmd: string, args: string[], opts?: RunOptions): Promise<RunResult>;
  readText(path: string): Promise<string | null>;
  /** The first lines of a file, up to (not including) the first for which `more` is false. */
  readLinesWhile(path: string, more: (line: string, index: number) => boolean): Promise<string[] | null>;
  kill(pid: number, signal: NodeJS.Signals | 0): boolean;
  now(): number; // monotonic milliseconds
  sleep(ms: number, signal?: AbortSignal): Promise<void>;
}

export const realSys: Sys = {
  // argv straight to execve, no shell: nothing to quote, no ~/.bashrc, and a few ms per iptables call
  run(cmd, args, opts = {}) {
    return new Promise((resolve) => {
      const child = spawn(cmd, args, { env: opts.env ?? process.env, cwd: opts.cwd, stdio: ['pipe', 'pipe', 'pipe'], timeout: opts.timeoutMs });
      let stdout = '';
      let stderr = '';
      child.stdout.setEncoding('utf8').on('data', (d) => (stdout += d));
      child.stderr.setEncoding('utf8').on('data', (d) => (stderr += d));
      child.stdin.on('error', () => {}); // a command may exit without reading its input
      child.stdin.end(opts.input ?? '');
      child.once('error', (err) => resolve({ code: 127, stdout, stderr: stderr + err.message }));
      child.once('close', (code, signal) => resolve({ code: code ?? (signal ? 128 : 1), stdout, stderr }));
    });
  },
  async readText(path) {
    try {
      return await readFile(path, 'utf8');
    } catch {
      return null;
    }
  },
  readLinesWhile(path, more) {
    return new Promise((resolve) => {
      const stream = createReadStream(path, { encoding: 'utf8' });
      const lines: string[] = [];
      let settled = false;
      const done = (v: string[] | null) => {
        if (settled) return;
        settled = true;
        rl.close();
        stream.destroy();
        resolve(v);
      };
      const rl = createInterface({ input: stream });
      rl.on('line', (line) => (more(line, lines.length) ? lines.push(line) : done(lines)));
      rl.on('close', () => done(lines));
      stream.on('error', () => done(null));
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
  now: () => performance.now(),
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
export async function which(cmd: string, pathVar = process.env.PATH ?? ''): Promise<string | null> {
  for (const dir of pathVar.split(delimiter).filter(Boolean)) {
    const full = join(dir, cmd);
    if (await access(full, constants.X_OK).then(() => true, () => false)) return full;
  }
  return null;
}
