// The one door to the operating system: commands, signals, files and the clock, so step logic can be faked.

import { readFile } from 'node:fs/promises';
import { $ } from 'zx';

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
  kill(pid: number, signal: NodeJS.Signals | 0): boolean;
  now(): number; // monotonic milliseconds
  sleep(ms: number, signal?: AbortSignal): Promise<void>;
}

/**
 * zx runs each command through bash with a socket on stdin. Bash takes that for a remote shell and,
 * when SHLVL is unset (sudo, systemd, npm scripts), sources ~/.bashrc first: slow at best, and its
 * output would mix with iptables-save's. SHLVL >= 1 and no BASH_ENV keep every call clean.
 */
function quietShellEnv(env: NodeJS.ProcessEnv): NodeJS.ProcessEnv {
  const out: NodeJS.ProcessEnv = { ...env, SHLVL: String(Math.max(1, Number(env.SHLVL) || 0)) };
  delete out.BASH_ENV;
  return out;
}

export const realSys: Sys = {
  async run(cmd, args, opts = {}) {
    const p = $({
      input: opts.input,
      env: quietShellEnv(opts.env ?? process.env),
      cwd: opts.cwd,
      nothrow: true,
      quiet: true,
      timeout: opts.timeoutMs,
    })`${cmd} ${args}`;
    try {
      const out = await p;
      return { code: out.exitCode ?? 1, stdout: out.stdout, stderr: out.stderr };
    } catch (err) {
      // zx rejects only when the command cannot be spawned at all
      return { code: 127, stdout: '', stderr: String((err as Error).message ?? err) };
    }
  },
  async readText(path) {
    try {
      return await readFile(path, 'utf8');
    } catch {
      return null;
    }
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
