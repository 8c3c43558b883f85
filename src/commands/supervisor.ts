// `portflip run`: a foreground supervisor for one app (for systemd), and the `portflip reload` client.
//
// Invariant: at most one deploy of the app runs at a time, and only this loop starts one. Signal
// handlers and control-socket clients only queue a request: "stop", or one pending reload that
// every request arriving before it starts shares (a storm is one reload, not many). The loop takes
// them in order: stop, then reload, then a crash restart. A crash restart waits 1s, 2s, 4s ... at
// most 30s; the streak starts over once an instance has stayed up 60s.

// The control socket is a server, not a call: it stays on node:net, and its file (chmod, unlink) with it.
import { createConnection, createServer, type Server, type Socket } from 'node:net';
import { chmod, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import { stop } from './stop.js';
import { deploy, type DeployOptions } from './deploy.js';
import { ExitCode, fail, PortflipError, type ExitCodeName } from '../core/errors.js';
import type { Emit, Event, SupervisorAction } from '../core/events.js';
import { Healer } from '../ops/healer.js';
import { recorded, type RecordAs } from '../ops/record.js';
import { type Ctx } from '../ops/context.js';
import { isAlive } from '../os/proc.js';
import { ensureDirs, readState, takeLock, writeState, type Paths } from '../core/state.js';
import type { Sys } from '../os/sys.js';

export interface SuperviseOptions {
  app: string;
  load: () => Promise<DeployOptions>; // flags plus the config file, read afresh: a reload picks up edits
}

export const POLL_MS = 250;
/** How often the live rules are compared with the state file: a firewall reload is healed within a second. */
export const HEAL_MS = 500;
export const BACKOFF = { firstMs: 1000, maxMs: 30_000, resetAfterMs: 60_000 };
/** How long run's stop and its restart count wait for the app's lock held by another portflip (a heal: ~0.1 s). */
export const LOCK_WAIT_MS = 5000;
export const backoffMs = (streak: number) => Math.min(BACKOFF.maxMs, BACKOFF.firstMs * 2 ** streak);
export const socketPath = (p: Paths, app: string) => join(p.runDir, `${app}.sock`);

/** Control-socket protocol, one JSON object per line: the client sends {cmd}, the server streams {event} then one {done}. */
type Reply =
  { event: Event } | { done: true; ok: true } | { done: true; ok: false; error: ExitCodeName; message: string };
const send = (s: Socket, r: Reply) => void (s.writable && s.write(JSON.stringify(r) + '\n'));

/** What the loop has been asked to do; filled by signal handlers and socket clients, emptied only by the loop. */
class Inbox {
  stop = false;
  reload: Socket[] | null = null; // null: no reload pending; else the clients waiting for it (none for SIGHUP)
  onStop = () => {};
  private wake = () => {};
  constructor(private sys: Sys) {}
  push(req: 'stop' | 'reload', client?: Socket): void {
    if (req === 'stop') {
      this.stop = true;
      this.onStop();
    } else (this.reload ??= []).push(...(client ? [client] : []));
    this.wake();
  }
  takeReload(): Socket[] | null {
    const r = this.reload;
    this.reload = null;
    return r;
  }
  /** Sleeps on the Sys clock until `ms` pass or a request arrives. */
  async wait(ms: number): Promise<void> {
    const woken = new AbortController();
    this.wake = () => woken.abort();
    await this.sys.sleep(Math.max(0, ms), woken.signal);
    this.wake = () => {};
  }
}

interface Watched {
  port: number;
  pid: number | null;
  startTime: string | null;
  since: number; // monotonic ms when this loop started watching it
}

export async function supervise(o: SuperviseOptions, ctx: Ctx): Promise<void> {
  const { app } = o;
  const { sys } = ctx;
  const inbox = new Inbox(sys);
  let clients: Socket[] = []; // the waiters of the reload in flight see its events too
  const emit: Emit = (e) => {
    ctx.emit(e);
    for (const c of clients) send(c, { event: e });
  };
  const say = (action: SupervisorAction, extra: { pid?: number | null; port?: number; detail?: string } = {}) =>
    emit({ kind: 'supervisor', app, action, ...extra });
  const control = await listenControl(sys, ctx.paths, app, inbox);
  const onSignal = (sig: NodeJS.Signals) => inbox.push(sig === 'SIGHUP' ? 'reload' : 'stop');
  for (const s of HANDLED_SIGNALS) process.on(s, onSignal);

  // one deploy, cancelled (and undone by deploy itself) if a stop arrives while it waits for readiness
  // each recorded in the app's history as what started it: the first deploy, a reload, a crash restart
  const deployNow = async (opts: DeployOptions, as: RecordAs) => {
    const abort = new AbortController();
    inbox.onStop = () => abort.abort();
    if (inbox.stop) abort.abort();
    try {
      await recorded({ ...ctx, emit, abort: abort.signal }, app, as, (c) => deploy(opts, c));
      return await watchActive();
    } finally {
      inbox.onStop = () => {};
    }
  };
  const watchActive = async (): Promise<Watched | null> => {
    const a = (await readState(ctx.sys, ctx.paths, app))?.instances.find((i) => i.state === 'active');
    return a ? { port: a.port, pid: a.pid, startTime: a.startTime, since: sys.now() } : null;
  };

  try {
    say('started', {
      pid: process.pid,
      detail: `control socket ${socketPath(ctx.paths, app)}; SIGHUP or \`portflip reload ${app}\` deploys again`,
    });
    let current = await o.load();
    let watched: Watched | null = null;
    try {
      // a first deploy that fails ends run with its exit code
      watched = await deployNow(current, { action: 'deploy', by: 'run' });
    } catch (err) {
      if (!inbox.stop) throw err;
    }
    let streak = 0; // crashes in a row, for the backoff
    let restartAt: number | null = null; // set while the app is down and a restart is due
    const healer = new Healer({ ...ctx, emit }, 'run');
    let healAt = sys.now() + HEAL_MS;

    for (;;) {
      if (inbox.stop) return await stopApp(ctx, app, say, emit);

      const waiting = inbox.takeReload();
      if (waiting) {
        clients = waiting;
        say('reload', { detail: waiting.length ? `asked by ${waiting.length} client(s)` : 'SIGHUP' });
        try {
          const next = await o.load(); // re-read the config file: edits take effect now
          watched = await deployNow(next, { action: 'reload', by: 'reload' });
          current = next;
          restartAt = null;
          say('reloaded', { port: watched?.port, pid: watched?.pid });
          for (const c of waiting) send(c, { done: true, ok: true });
        } catch (err) {
          const e = asPortflipError(err);
          say('reload-failed', {
            detail: `${e.message}; ${restartAt === null ? 'the running instance stays' : 'a crash restart is still due'}`,
          });
          for (const c of waiting) send(c, { done: true, ok: false, error: e.kind, message: e.message });
        } finally {
          for (const c of waiting) c.end();
          clients = [];
        }
        continue;
      }

      if (restartAt === null && !(await isAlive(sys, watched?.pid, watched?.startTime))) {
        const st = await readState(ctx.sys, ctx.paths, app);
        if (!st) {
          say('exit', { detail: `the state file is gone (someone ran \`portflip stop ${app}\`); nothing to keep up` });
          return;
        }
        const other = st.instances.find((i) => i.state === 'active');
        if (other && other.pid !== watched?.pid && (await isAlive(sys, other.pid, other.startTime))) {
          watched = { port: other.port, pid: other.pid, startTime: other.startTime, since: sys.now() };
          say('adopted', { port: other.port, pid: other.pid, detail: 'another portflip switched to it' });
          continue;
        }
        const upMs = watched ? sys.now() - watched.since : 0;
        if (upMs >= BACKOFF.resetAfterMs) streak = 0;
        const wait = backoffMs(streak++);
        emit({ kind: 'crash', app, port: watched?.port ?? 0, pid: watched?.pid ?? null, upMs, restartInMs: wait });
        restartAt = sys.now() + wait;
      }

      if (restartAt !== null && sys.now() >= restartAt) {
        say('restart', { detail: `attempt ${streak}` });
        try {
          // the last options that deployed: unreloaded edits wait for a reload
          watched = await deployNow(current, { action: 'restart', by: 'run' });
          restartAt = null;
          say('restarted', {
            port: watched?.port,
            pid: watched?.pid,
            detail: `${await countRestart(ctx, app)} restart(s) so far`,
          });
        } catch (err) {
          const wait = backoffMs(streak++);
          restartAt = sys.now() + wait;
          say('restart-failed', { detail: `${asPortflipError(err).message}; next try in ${Math.round(wait / 1000)}s` });
        }
        continue;
      }

      if (sys.now() >= healAt) {
        // a firewall reload (nft flush ruleset, iptables-restore of a saved file) took the rules away
        await healer.heal(app).catch((err) => say('heal-failed', { detail: asPortflipError(err).message }));
        healAt = sys.now() + HEAL_MS;
      }

      const next = Math.min(POLL_MS, healAt - sys.now(), restartAt === null ? POLL_MS : restartAt - sys.now());
      await inbox.wait(next);
    }
  } finally {
    for (const s of HANDLED_SIGNALS) process.off(s, onSignal);
    for (const c of inbox.takeReload() ?? []) {
      send(c, {
        done: true,
        ok: false,
        error: 'deployFailed',
        message: `the supervisor of "${app}" stopped before the reload ran`,
      });
      c.end();
    }
    await closeControl(control, socketPath(ctx.paths, app));
  }
}

const HANDLED_SIGNALS = ['SIGHUP', 'SIGTERM', 'SIGINT'] as const;

/** What `systemctl stop` asks for: the same as `portflip stop APP`, then run exits 0. */
async function stopApp(
  ctx: Ctx,
  app: string,
  say: (a: SupervisorAction, x?: { detail?: string }) => void,
  emit: Emit,
): Promise<void> {
  say('stopping', { detail: 'removing the rules, then stopping the instances with their stop signal' });
  try {
    await recorded({ ...ctx, emit }, app, { action: 'stop', by: 'run' }, (c) =>
      whenUnlocked(c.sys, () => stop(c, app)),
    );
  } catch (err) {
    if (!(err instanceof PortflipError && err.kind === 'nothingToDo')) throw err; // nothing was deployed
  }
  say('exit', { detail: 'stopped' });
}

/** Adds one to the app's restart count, under its lock so a concurrent deploy's write is not lost. */
async function countRestart(ctx: Ctx, app: string): Promise<number> {
  const lock = await whenUnlocked(ctx.sys, () =>
    takeLock(ctx.sys, ctx.paths, app, `run ${app} (count a restart)`, (m) =>
      ctx.emit({ kind: 'notice', app, message: m }),
    ),
  );
  try {
    const st = await readState(ctx.sys, ctx.paths, app);
    if (!st) return 0;
    st.restarts = (st.restarts ?? 0) + 1;
    await writeState(ctx.sys, ctx.paths, st);
    return st.restarts;
  } finally {
    await lock.release();
  }
}

/**
 * Runs `fn` again while another portflip holds the app's lock, for up to LOCK_WAIT_MS: `portflip watch` healing the
 * app must not make a systemd stop fail (leaving the app up) or a restart that worked count as failed (and run again).
 */
async function whenUnlocked<T>(sys: Sys, fn: () => Promise<T>): Promise<T> {
  const until = sys.now() + LOCK_WAIT_MS;
  for (;;) {
    try {
      return await fn();
    } catch (err) {
      if (!(err instanceof PortflipError && err.kind === 'lockHeld') || sys.now() >= until) throw err;
      await sys.sleep(50);
    }
  }
}

const asPortflipError = (err: unknown) =>
  err instanceof PortflipError ? err : new PortflipError('internal', String((err as Error)?.message ?? err));

// ---- the control socket ------------------------------------------------------------------------

/** APP.sock under the run dir (0700), mode 0600. One that answers means another supervisor runs. */
async function listenControl(sys: Sys, p: Paths, app: string, inbox: Inbox): Promise<Server> {
  await ensureDirs(sys, p);
  const path = socketPath(p, app);
  if (await answers(path))
    fail(
      'lockHeld',
      `a supervisor for "${app}" is already running (it answers on ${path}); to deploy again use: portflip reload ${app}`,
    );
  await unlink(path).catch(() => {}); // left by a supervisor that died
  const server = createServer((sock) => {
    let buf = '';
    let heard = false; // one request per connection
    sock.setEncoding('utf8');
    sock.on('error', () => {}); // a client that leaves early is not the supervisor's problem
    sock.on('data', (d) => {
      if (heard) return;
      buf += d;
      const nl = buf.indexOf('\n');
      if (nl < 0) return;
      heard = true;
      const req = parseLine(buf.slice(0, nl));
      if (req?.cmd === 'reload') inbox.push('reload', sock);
      else {
        send(sock, {
          done: true,
          ok: false,
          error: 'usage',
          message: `unknown request ${JSON.stringify(req)}; this supervisor answers {"cmd":"reload"}`,
        });
        sock.end();
      }
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(path, () => resolve());
  });
  await chmod(path, 0o600);
  return server;
}

async function closeControl(server: Server, path: string): Promise<void> {
  await new Promise<void>((resolve) => server.close(() => resolve()));
  await unlink(path).catch(() => {});
}

function answers(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = createConnection(path);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

function parseLine(line: string): Record<string, any> | null {
  try {
    return JSON.parse(line);
  } catch {
    return null;
  }
}

/** `portflip reload APP`: asks the supervisor for a deploy, shows its events, and fails with the deploy's exit code. */
export async function requestReload(ctx: Ctx, app: string): Promise<void> {
  const path = socketPath(ctx.paths, app);
  const sock = await new Promise<Socket>((resolve, reject) => {
    const s = createConnection(path);
    s.once('connect', () => resolve(s));
    s.once('error', reject);
  }).catch((err: NodeJS.ErrnoException): never => {
    if (err.code === 'ENOENT' || err.code === 'ECONNREFUSED') {
      fail(
        'nothingToDo',
        `no supervisor is running for "${app}" (nothing answers on ${path}); ` +
          `start one with: portflip run ${app} (or systemctl start portflip-${app})`,
      );
    }
    if (err.code === 'EACCES') fail('notPrivileged', `cannot open ${path}: permission denied; run it with sudo`);
    throw err;
  });
  sock.setEncoding('utf8');
  sock.write(JSON.stringify({ cmd: 'reload' }) + '\n');
  let buf = '';
  let done: Reply | null = null;
  const leave = () => sock.destroy();
  ctx.abort.addEventListener('abort', leave, { once: true });
  try {
    await new Promise<void>((resolve, reject) => {
      sock.on('data', (d) => {
        buf += d;
        let nl: number;
        while ((nl = buf.indexOf('\n')) >= 0) {
          const r = parseLine(buf.slice(0, nl)) as Reply | null;
          buf = buf.slice(nl + 1);
          if (r && 'event' in r) ctx.emit(r.event);
          else if (r && 'done' in r) done = r;
        }
      });
      sock.once('close', () => resolve());
      sock.once('error', reject);
    });
  } finally {
    ctx.abort.removeEventListener('abort', leave);
  }
  const r = done as Reply | null;
  if (ctx.abort.aborted && !r)
    fail('deployFailed', `interrupted; the supervisor of "${app}" goes on with the reload (see its log)`);
  if (!r || !('done' in r))
    return fail(
      'deployFailed',
      `the supervisor of "${app}" closed the connection before the result; see its log (journalctl -u portflip-${app})`,
    );
  if (!r.ok) throw new PortflipError(r.error in ExitCode ? r.error : 'internal', r.message);
}
