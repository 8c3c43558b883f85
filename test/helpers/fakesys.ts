// An in-memory Sys for unit tests: files, processes in groups, procfs text, iptables and a manual clock.
//
// The step logic runs against it without root, in milliseconds. Time is virtual: sleep() parks the caller,
// and once every runnable coroutine is parked the clock jumps to the earliest wake-up (a discrete-event
// scheduler), so a 30 s drain takes no real time. `killAt` makes portflip "die" just before its Nth effect
// (a file change, a spawn, a signal, a command that changes something): from then on every call throws
// Killed and nothing more changes, while the instances it started live on, as they would after a SIGKILL.

import { posix } from 'node:path';
import type { DeployOptions } from '../../src/commands/deploy.js';
import type { Event } from '../../src/core/events.js';
import type { Ctx } from '../../src/ops/context.js';
import type { Child, Exit, FileStat, RunOptions, RunResult, SpawnOptions, Sys, SysFs } from '../../src/os/sys.js';

/** Thrown by every call once portflip has "died". */
export class Killed extends Error {
  constructor(readonly at: string) {
    super(`portflip was killed before: ${at}`);
  }
}

/** How a spawned app behaves; the test decides per spawn. */
export interface Behaviour {
  listenAfterMs: number | null; // null: never listens (never ready)
  termExitMs: number | null; // exit this long after SIGTERM/SIGINT/...; null: ignores it (only SIGKILL ends it)
  exitAfterMs?: number; // crashes by itself this long after it started
}

export interface FakeProc {
  pid: number;
  pgid: number;
  startTime: string;
  command: string[];
  env: NodeJS.ProcessEnv;
  port: number | null;
  listening: boolean;
  inode: number;
  connections: number; // open client connections to its port (ESTABLISHED in /proc/net/tcp)
  signals: { signal: string; at: number }[];
  behaviour?: Behaviour;
  exited: Promise<Exit>;
  exit(e: Exit): void;
}

type Owner = { mode: number; uid: number; gid: number };
type Node = ({ kind: 'file'; data: string } & Owner) | ({ kind: 'dir' } & Owner);

/** A chain: its policy (built-in chains) and its rules as iptables-save prints them ("-A CHAIN ..."). */
interface Chain {
  policy: string | null;
  rules: string[];
}
type Table = Map<string, Chain>;
type Tables = Record<'nat' | 'filter', Table>;

const BUILTIN: Record<'nat' | 'filter', string[]> = {
  nat: ['PREROUTING', 'INPUT', 'OUTPUT', 'POSTROUTING'],
  filter: ['INPUT', 'FORWARD', 'OUTPUT'],
};
const TARGETS = new Set([
  'ACCEPT',
  'DROP',
  'REJECT',
  'REDIRECT',
  'RETURN',
  'DNAT',
  'SNAT',
  'MASQUERADE',
  'LOG',
  'HMARK',
]);
const TOOLS = ['iptables-nft-save', 'iptables-nft-restore', 'ip6tables-nft-save', 'ip6tables-nft-restore', 'nft', 'sh'];
const SYSTEM_PATH = ['/usr/local/sbin', '/usr/local/bin', '/usr/sbin', '/usr/bin', '/sbin', '/bin'];
const exe = (): Node => ({ kind: 'file', data: '', mode: 0o755, uid: 0, gid: 0 });

function emptyTables(): Tables {
  const t = (names: string[]): Table => new Map(names.map((n) => [n, { policy: 'ACCEPT', rules: [] }]));
  return { nat: t(BUILTIN.nat), filter: t(BUILTIN.filter) };
}

const errno = (code: string, syscall: string, path: string) =>
  Object.assign(new Error(`${code}: ${syscall} '${path}'`), { code, syscall, path });

export class FakeSys implements Sys {
  readonly startPriority = 0;
  /** Set to N: portflip dies just before its Nth effect from now on counted in `effects`. */
  killAt: number | null = null;
  effects = 0;
  effectLog: string[] = [];
  dead = false;
  procs = new Map<number, FakeProc>();
  iptables: Record<'ipv4' | 'ipv6', Tables> = { ipv4: emptyTables(), ipv6: emptyTables() };
  /** Shell commands (hooks, --ready-cmd) as run, and what they exit with. */
  shell: (command: string) => number = () => 0;
  behave: (command: string[], env: NodeJS.ProcessEnv) => Behaviour = () => ({ listenAfterMs: 200, termExitMs: 100 });
  private files = new Map<string, Node>();
  private t = 0;
  private nextPid = 1000;
  private nextInode = 50_000;
  private self!: FakeProc;
  private timers: { at: number; seq: number; fn: () => void }[] = [];
  private sleepers: { until: number; seq: number; wake: () => void; fail: (e: Error) => void }[] = [];
  private seq = 0;
  private ticking = false;

  constructor() {
    this.files.set('/', { kind: 'dir', mode: 0o755, uid: 0, gid: 0 });
    for (const d of ['/proc', '/var/lib', '/run', '/srv/app', '/tmp']) this.mkdirp(d, 0o755);
    // iptables is looked up in portflip's own PATH (which()), so the tools are wherever that points
    for (const d of new Set([...SYSTEM_PATH, ...(process.env.PATH ?? '').split(':')])) {
      if (!d.startsWith('/')) continue;
      this.mkdirp(d, 0o755);
      for (const tool of TOOLS) this.files.set(posix.join(d, tool), exe());
    }
    this.files.set('/usr/bin/fakeapp', exe());
    this.revive();
  }

  // ---- the test's controls ---------------------------------------------------------------------

  /** A new portflip process after the last one died (or at the start): a fresh pid, calls work again. */
  revive(): void {
    this.dead = false;
    this.killAt = null;
    if (this.self) this.procs.delete(this.self.pid);
    this.self = this.newProc(['portflip'], {}, null);
  }

  /** Lets virtual time pass (instances start listening, exit, ...) with nobody of portflip's running. */
  async advance(ms: number): Promise<void> {
    this.runTimers(this.t + ms);
  }

  /** The live process listening on a port, if any. */
  listener(port: number): FakeProc | undefined {
    return [...this.procs.values()].find((p) => p.port === port && p.listening);
  }

  /** Live app processes (those started with a PORT), portflip and its helpers aside. */
  apps(): FakeProc[] {
    return [...this.procs.values()].filter((p) => p.port !== null);
  }

  /** The port the app's redirect points at in the nat table, or null when there is no redirect. */
  redirectTarget(app: string, family: 'ipv4' | 'ipv6' = 'ipv4'): number | null {
    const chain = this.iptables[family].nat.get(`PF-${app}`);
    const m = chain?.rules.map((r) => /REDIRECT --to-ports (\d+)/.exec(r)).find(Boolean);
    return m ? Number(m[1]) : null;
  }

  /** What a firewall reload that knows nothing of portflip leaves: empty tables. */
  flushRules(): void {
    this.iptables = { ipv4: emptyTables(), ipv6: emptyTables() };
  }

  // ---- Sys ---------------------------------------------------------------------------------------

  get pid(): number {
    return this.self.pid;
  }

  now = () => this.t;
  wallNow = () => 1_800_000_000_000 + this.t;
  getPriority = () => 0;
  setPriority(): void {}

  async run(cmd: string, args: string[], opts: RunOptions = {}): Promise<RunResult> {
    const name = posix.basename(cmd);
    const ipt = /^(ip6?)tables(?:-(nft|legacy))?-(save|restore)$/.exec(name);
    const reads = (ipt && ipt[3] === 'save') || (name === 'nft' && args[0] === '-j') || name === 'getent';
    if (reads) this.alive(`${name} ${args.join(' ')}`);
    else this.effect(`${name} ${args.join(' ')}`);
    await this.yieldNow();
    if (ipt) {
      const family = ipt[1] === 'ip' ? 'ipv4' : 'ipv6';
      if (ipt[3] === 'save') {
        const only = args.includes('-t') ? args[args.indexOf('-t') + 1] : null;
        return { code: 0, stdout: this.save(family, only), stderr: '' };
      }
      const err = this.restore(family, opts.input ?? '', args.includes('--noflush'));
      return err ? { code: 1, stdout: '', stderr: `${name}: ${err}` } : { code: 0, stdout: '', stderr: '' };
    }
    // an empty ruleset: no native chain drops by default, so the guard has nothing to do
    if (name === 'nft')
      return { code: 0, stdout: args[0] === '-j' ? '{"nftables":[{"metainfo":{}}]}' : '', stderr: '' };
    if (name === 'getent') return { code: 2, stdout: '', stderr: '' };
    if (name === 'sh' && args[0] === '-c') return { code: this.shell(args[1]), stdout: '', stderr: '' };
    return { code: 127, stdout: '', stderr: `${cmd}: not found`, error: `spawn ${cmd} ENOENT` };
  }

  async spawn(cmd: string, args: string[], opts: SpawnOptions): Promise<Child> {
    this.effect(`spawn ${cmd}`);
    // execvp: a bare name is looked up in the child's PATH
    const dirs = cmd.includes('/') ? [''] : (opts.env.PATH ?? '').split(':');
    const found = dirs.some((d) => this.files.get(posix.join(d, cmd))?.mode! & 0o111);
    if (!found && cmd !== process.execPath) throw errno('ENOENT', `spawn ${cmd}`, cmd);
    if (opts.log) {
      this.files.set(opts.log, {
        kind: 'file',
        data: `${cmd} started\n`,
        mode: 0o640,
        uid: opts.uid ?? 0,
        gid: opts.gid ?? 0,
      });
    }
    const port = opts.env.PORT ? Number(opts.env.PORT) : null;
    const p = this.newProc([cmd, ...args], opts.env, port);
    if (port !== null) {
      const b = (p.behaviour = this.behave(p.command, p.env));
      if (b.listenAfterMs !== null) this.at(b.listenAfterMs, () => this.procs.has(p.pid) && (p.listening = true));
      if (b.exitAfterMs !== undefined) this.at(b.exitAfterMs, () => p.exit({ code: 1, signal: null }));
    }
    return { pid: p.pid, exited: p.exited };
  }

  kill(pid: number, signal: NodeJS.Signals | 0): boolean {
    if (signal !== 0) this.effect(`kill ${pid} ${signal}`);
    else this.alive(`kill ${pid} 0`);
    const all = [...this.procs.values()];
    const targets = all.filter((p) => (pid < 0 ? p.pgid === -pid : p.pid === pid));
    if (signal === 0) return targets.length > 0;
    for (const p of targets) {
      p.signals.push({ signal, at: this.t });
      const b = p.behaviour;
      if (signal === 'SIGKILL') p.exit({ code: null, signal: 'SIGKILL' });
      else if (b && b.termExitMs !== null) this.at(b.termExitMs, () => p.exit({ code: 0, signal: null }));
    }
    return targets.length > 0;
  }

  async readText(path: string): Promise<string | null> {
    this.alive(`read ${path}`);
    await this.yieldNow();
    const n = this.files.get(path);
    return this.procText(path) ?? (n?.kind === 'file' ? n.data : null);
  }

  async readLinesWhile(path: string, more: (line: string, index: number) => boolean): Promise<string[] | null> {
    const text = await this.readText(path);
    if (text === null) return null;
    const out: string[] = [];
    for (const line of text.split('\n').filter((l, i, all) => l || i < all.length - 1)) {
      if (!more(line, out.length)) break;
      out.push(line);
    }
    return out;
  }

  async usage(pids: number[]): Promise<Map<number, { cpu: number; memory: number; elapsed: number }>> {
    await this.yieldNow();
    const live = pids.filter((pid) => this.procs.has(pid));
    return new Map(live.map((pid) => [pid, { cpu: 0, memory: 10 << 20, elapsed: 1000 }]));
  }

  async connect(host: string, port: number): Promise<boolean> {
    this.alive(`connect ${host}:${port}`);
    await this.yieldNow();
    return host !== '::1' && !!this.listener(port);
  }

  async ask(socket: string, line: string): Promise<string | null> {
    this.alive(`ask ${socket}: ${line}`);
    await this.yieldNow();
    return null; // no holder runs under the fake
  }

  async openQueue(queue: number): Promise<never> {
    this.alive(`bind queue ${queue}`);
    await this.yieldNow();
    throw new Error('no nfnetlink_queue under the fake');
  }

  async httpOk(url: string): Promise<boolean> {
    this.alive(`GET ${url}`);
    await this.yieldNow();
    const port = Number(new URL(url).port);
    return !!this.listener(port);
  }

  sleep(ms: number, signal?: AbortSignal): Promise<void> {
    if (this.dead) return Promise.reject(new Killed('sleep'));
    if (signal?.aborted) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const s = { until: this.t + Math.max(0, ms), seq: this.seq++, wake: () => {}, fail: reject };
      const onAbort = () => {
        this.sleepers = this.sleepers.filter((x) => x !== s);
        resolve();
      };
      s.wake = () => {
        signal?.removeEventListener('abort', onAbort);
        resolve();
      };
      signal?.addEventListener('abort', onAbort, { once: true });
      this.sleepers.push(s);
      this.schedule();
    });
  }

  fs: SysFs = {
    read: async (path) => {
      this.alive(`read ${path}`);
      await this.yieldNow();
      const text = this.procText(path);
      if (text !== null) return text;
      return this.file(path, 'open').data;
    },
    readFrom: async (path, offset) => {
      const data = await this.fs.read(path);
      const bytes = Buffer.from(data);
      const start = bytes.length < offset ? 0 : offset;
      return { size: bytes.length, text: bytes.subarray(start).toString('utf8') };
    },
    write: async (path, text, mode, exclusive) => {
      this.effect(`write ${path}`);
      this.parentDir(path, 'open');
      if (exclusive && this.files.has(path)) throw errno('EEXIST', 'open', path);
      const old = this.files.get(path);
      if (old?.kind === 'file')
        old.data = text; // the same inode: a hard link sees it
      else this.files.set(path, { kind: 'file', data: text, mode, uid: 0, gid: 0 });
    },
    append: async (path, text, mode) => {
      this.effect(`append ${path}`);
      this.parentDir(path, 'open');
      const old = this.files.get(path);
      if (old?.kind === 'file') old.data += text;
      else if (old) throw errno('EISDIR', 'open', path);
      else this.files.set(path, { kind: 'file', data: text, mode, uid: 0, gid: 0 });
    },
    writeAtomic: async (path, text, mode) => {
      this.effect(`write ${path} (atomic)`);
      this.parentDir(path, 'open');
      this.files.set(path, { kind: 'file', data: text, mode, uid: 0, gid: 0 }); // a new inode, as rename makes
    },
    mkdir: async (path, mode) => {
      this.effect(`mkdir ${path}`);
      this.mkdirp(path, mode);
    },
    chmod: async (path, mode) => {
      this.effect(`chmod ${path}`);
      this.node(path, 'chmod').mode = mode;
    },
    chown: async (path, uid, gid) => {
      this.effect(`chown ${path}`);
      Object.assign(this.node(path, 'chown'), { uid, gid });
    },
    link: async (existing, path) => {
      this.effect(`link ${path}`);
      const n = this.file(existing, 'link');
      this.parentDir(path, 'link');
      if (this.files.has(path)) throw Object.assign(errno('EEXIST', 'link', existing), { dest: path });
      this.files.set(path, n);
    },
    rename: async (from, to) => {
      this.effect(`rename ${from}`);
      const n = this.node(from, 'rename');
      this.parentDir(to, 'rename');
      this.files.delete(from);
      this.files.set(to, n);
    },
    unlink: async (path) => {
      this.effect(`unlink ${path}`);
      this.file(path, 'unlink');
      this.files.delete(path);
    },
    readdir: async (path) => {
      this.alive(`readdir ${path}`);
      await this.yieldNow();
      if (path === '/proc') return [...this.procs.keys()].map(String);
      const fd = /^\/proc\/(\d+)\/fd$/.exec(path);
      if (fd) return this.procs.get(Number(fd[1]))?.listening ? ['0', '1', '2', '3'] : ['0', '1', '2'];
      if (this.node(path, 'scandir').kind !== 'dir') throw errno('ENOTDIR', 'scandir', path);
      const prefix = path.endsWith('/') ? path : `${path}/`;
      const names = [...this.files.keys()].filter((k) => k.startsWith(prefix)).map((k) => k.slice(prefix.length));
      return names.filter((k) => k && !k.includes('/'));
    },
    readlink: async (path) => {
      this.alive(`readlink ${path}`);
      await this.yieldNow();
      const m = /^\/proc\/(\d+)\/(exe|fd\/(\d+))$/.exec(path);
      const p = m && this.procs.get(Number(m[1]));
      if (p && m![2] === 'exe') return `/usr/bin/${posix.basename(p.command[0])}`;
      if (p && m![3] === '3' && p.listening) return `socket:[${p.inode}]`;
      if (p && m![3]) return '/dev/null';
      throw errno(p ? 'EINVAL' : 'ENOENT', 'readlink', path);
    },
    stat: async (path): Promise<FileStat> => {
      this.alive(`stat ${path}`);
      await this.yieldNow();
      const n = this.node(path, 'stat');
      const size = n.kind === 'file' ? Buffer.byteLength(n.data) : 4096;
      return {
        isFile: n.kind === 'file',
        isDirectory: n.kind === 'dir',
        mode: n.mode,
        uid: n.uid,
        gid: n.gid,
        size,
        mtimeMs: this.wallNow(),
      };
    },
    canExec: async (path) => {
      this.alive(`access ${path}`);
      const n = this.files.get(path);
      return n?.kind === 'file' && (n.mode & 0o111) !== 0;
    },
  };

  // ---- inside: effects, the clock, files, procfs, iptables ----------------------------------------

  /** A call that changes the world: the kill point is counted here. */
  private effect(what: string): void {
    this.alive(what);
    this.effects++;
    this.effectLog.push(what);
    if (this.killAt !== null && this.effects >= this.killAt) this.die(what);
  }

  private alive(what: string): void {
    if (this.dead) throw new Killed(what);
  }

  private die(what: string): never {
    this.dead = true;
    this.procs.delete(this.self.pid);
    // whatever portflip was waiting for ends with it
    for (const s of this.sleepers.splice(0)) s.fail(new Killed(what));
    throw new Killed(what);
  }

  /** Lets other coroutines run, as real I/O would (a microtask: virtual time only moves in sleep). */
  private yieldNow(): Promise<void> {
    return Promise.resolve();
  }

  private at(ms: number, fn: () => void): void {
    this.timers.push({ at: this.t + ms, seq: this.seq++, fn });
  }

  private runTimers(until: number): void {
    for (;;) {
      this.timers.sort((a, b) => a.at - b.at || a.seq - b.seq);
      const next = this.timers[0];
      if (!next || next.at > until) break;
      this.timers.shift();
      this.t = Math.max(this.t, next.at);
      next.fn();
    }
    this.t = Math.max(this.t, until);
  }

  /** Once nothing runnable is left (setImmediate comes after all promise jobs), wake the earliest sleeper. */
  private schedule(): void {
    if (this.ticking) return;
    this.ticking = true;
    setImmediate(() => {
      this.ticking = false;
      if (!this.sleepers.length) return;
      this.sleepers.sort((a, b) => a.until - b.until || a.seq - b.seq);
      const s = this.sleepers.shift()!;
      this.runTimers(s.until);
      s.wake();
      if (this.sleepers.length) this.schedule();
    });
  }

  private newProc(command: string[], env: NodeJS.ProcessEnv, port: number | null): FakeProc {
    const pid = this.nextPid++;
    let exit!: (e: Exit) => void;
    const exited = new Promise<Exit>((r) => (exit = r));
    const p: FakeProc = {
      pid,
      pgid: pid,
      startTime: String(10_000 + pid),
      command,
      env,
      port,
      listening: false,
      inode: this.nextInode++,
      connections: 0,
      signals: [],
      exited,
      exit: (e) => {
        if (!this.procs.has(pid)) return;
        this.procs.delete(pid);
        p.listening = false;
        exit(e);
      },
    };
    this.procs.set(pid, p);
    return p;
  }

  private mkdirp(path: string, mode: number): void {
    const parts = posix.normalize(path).split('/').filter(Boolean);
    for (let i = 1; i <= parts.length; i++) {
      const d = '/' + parts.slice(0, i).join('/');
      const n = this.files.get(d);
      if (n && n.kind !== 'dir') throw errno('EEXIST', 'mkdir', d);
      if (!n) this.files.set(d, { kind: 'dir', mode, uid: 0, gid: 0 });
    }
  }

  private node(path: string, syscall: string): Node {
    const n = this.files.get(posix.normalize(path).replace(/(.)\/$/, '$1'));
    if (!n) throw errno('ENOENT', syscall, path);
    return n;
  }

  private file(path: string, syscall: string): { data: string } & Node {
    const n = this.node(path, syscall);
    if (n.kind !== 'file') throw errno('EISDIR', syscall, path);
    return n;
  }

  private parentDir(path: string, syscall: string): void {
    if (this.files.get(posix.dirname(path))?.kind !== 'dir') throw errno('ENOENT', syscall, path);
  }

  /** procfs, generated from the process table. */
  private procText(path: string): string | null {
    if (path === '/proc/self/status') return 'Name:\tportflip\nCapEff:\t000001ffffffffff\n';
    if (path === '/proc/uptime') return `${(100_000 + this.t / 1000).toFixed(2)} 0.00\n`;
    if (path === '/proc/sys/net/ipv6/bindv6only') return '0\n';
    if (path === '/proc/net/tcp') return this.netTcp();
    if (path === '/proc/net/tcp6') return '  sl  local_address remote_address st\n'; // instances listen on 0.0.0.0
    const m = /^\/proc\/(\d+)\/(stat|environ|comm)$/.exec(path);
    if (!m) return null;
    const p = this.procs.get(Number(m[1]));
    if (!p) return null;
    const comm = posix.basename(p.command[0]).slice(0, 15);
    if (m[2] === 'comm') return `${comm}\n`;
    if (m[2] === 'environ')
      return Object.entries(p.env)
        .map(([k, v]) => `${k}=${v}\0`)
        .join('');
    // fields after the name: state ppid pgrp session ... with starttime the 20th of them
    const fields = ['S', '1', String(p.pgid), String(p.pgid), ...Array(15).fill('0'), p.startTime, '0', '0'];
    return `${p.pid} (${comm}) ${fields.join(' ')}\n`;
  }

  private netTcp(): string {
    const hex = (n: number, w: number) => n.toString(16).toUpperCase().padStart(w, '0');
    const addr = (remotePort: number) => (remotePort ? '0100007F' : '00000000'); // a listener on 0.0.0.0, clients on lo
    const line = (i: number, port: number, remotePort: number, st: string, inode: number) =>
      `${String(i).padStart(4)}: ${addr(remotePort)}:${hex(port, 4)} ${addr(remotePort)}:${hex(remotePort, 4)} ` +
      `${st} 00000000:00000000 00:00000000 00000000     0        0 ${inode} 1 0000000000000000 100 0 0 10 0`;
    const lines = ['  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode'];
    const procs = [...this.procs.values()].filter((p) => p.port !== null);
    // listeners first, as the kernel lists them (tcpListeners stops at the first other line)
    for (const p of procs) if (p.listening) lines.push(line(lines.length - 1, p.port!, 0, '0A', p.inode));
    for (const p of procs) {
      for (let c = 0; c < p.connections; c++) lines.push(line(lines.length - 1, p.port!, 40_000 + c, '01', 0));
    }
    return lines.join('\n') + '\n';
  }

  private save(family: 'ipv4' | 'ipv6', only: string | null): string {
    const out: string[] = [];
    for (const name of ['nat', 'filter'] as const) {
      if (only && only !== name) continue;
      const t = this.iptables[family][name];
      out.push(`*${name}`);
      for (const [c, chain] of t) out.push(`:${c} ${chain.policy ?? '-'} [0:0]`);
      for (const chain of t.values()) out.push(...chain.rules);
      out.push('COMMIT');
    }
    return out.join('\n') + '\n';
  }

  /** iptables-restore: each table's section applies whole at its COMMIT, or not at all. Returns an error or null. */
  private restore(family: 'ipv4' | 'ipv6', text: string, noflush: boolean): string | null {
    if (!noflush) return 'portflip always restores with --noflush';
    let name: 'nat' | 'filter' | null = null;
    let work: Table | null = null;
    const lines = text.split('\n');
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i].trim();
      const bad = (why: string) => `line ${i + 1} failed (${why}): ${line}`;
      if (!line || line.startsWith('#')) continue;
      if (line.startsWith('*')) {
        name = line.slice(1) as 'nat' | 'filter';
        if (name !== 'nat' && name !== 'filter') return bad('unknown table');
        const live = [...this.iptables[family][name]];
        work = new Map(live.map(([k, c]) => [k, { policy: c.policy, rules: [...c.rules] }]));
        continue;
      }
      if (!work || !name) return bad('no table');
      if (line === 'COMMIT') {
        this.iptables[family][name] = work;
        work = null;
        continue;
      }
      const words = line.split(/\s+/);
      if (line.startsWith(':')) {
        const chain = words[0].slice(1);
        const c = work.get(chain);
        if (c)
          c.rules = []; // declaring an existing chain in --noflush mode empties it
        else work.set(chain, { policy: BUILTIN[name].includes(chain) ? words[1] : null, rules: [] });
        continue;
      }
      const [op, chain] = words;
      const c = work.get(chain);
      if (!c) return bad(`no chain ${chain}`);
      if (op === '-X') {
        if (c.policy !== null) return bad('built-in chain');
        if (c.rules.length) return bad('chain not empty');
        if ([...work.values()].some((o) => o.rules.some((r) => r.endsWith(` -j ${chain}`)))) return bad('chain in use');
        work.delete(chain);
        continue;
      }
      const insertAt = op === '-I' && /^\d+$/.test(words[2]) ? Number(words[2]) : null;
      const rule = `-A ${chain} ${words.slice(insertAt === null ? 2 : 3).join(' ')}`;
      const target = / -j (\S+)/.exec(rule)?.[1];
      if (op === '-D') {
        const at = c.rules.indexOf(rule);
        if (at < 0) return bad('no such rule');
        c.rules.splice(at, 1);
      } else if (op === '-A' || op === '-I') {
        if (target && !TARGETS.has(target) && !work.has(target)) return bad(`no chain/target ${target}`);
        c.rules.splice(op === '-A' ? c.rules.length : Math.max(0, (insertAt ?? 1) - 1), 0, rule);
      } else return bad('unknown command');
    }
    return work ? 'no COMMIT' : null;
  }
}

/** Paths inside the fake file system. */
export const FAKE_PATHS = { stateDir: '/var/lib/portflip', runDir: '/run/portflip', logDir: '/var/lib/portflip/logs' };

/** A Ctx on the fake, with the events it emits collected. */
export function fakeCtx(sys: FakeSys, abort = new AbortController().signal): { ctx: Ctx; events: Event[] } {
  const events: Event[] = [];
  const ctx: Ctx = { sys, paths: FAKE_PATHS, emit: (e) => void events.push(e), env: { PATH: '/usr/bin:/bin' }, abort };
  return { ctx, events };
}

/** Deploy options for the fake app: `fakeapp` on port 80, tcp readiness, a plain stop signal. */
export function fakeDeploy(over: Partial<DeployOptions> = {}): DeployOptions {
  return {
    app: 'web',
    listen: 80,
    command: ['fakeapp'],
    cwd: '/srv/app',
    env: {},
    ready: { kind: 'tcp' },
    readyTimeoutMs: 5000,
    stop: { drain: 'signal', drainTimeoutMs: 3000, stopSignal: 'SIGTERM', killAfterMs: 2000 },
    ipv6: 'auto',
    dryRun: false,
    firewall: { mode: 'auto', exposePorts: false, allowFrom: [] },
    nodeDrain: false,
    ...over,
  };
}
