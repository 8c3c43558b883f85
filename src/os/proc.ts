// Reads procfs: process identity (pid + start time), process groups, and TCP sockets by port.

import type { Sys } from './sys.js';

export interface ProcStat {
  pid: number;
  state: string;
  ppid: number;
  pgid: number;
  startTime: string; // clock ticks since boot, field 22 of /proc/PID/stat
}

export function parseStat(text: string): ProcStat | null {
  const open = text.indexOf('(');
  const close = text.lastIndexOf(')');
  if (open < 0 || close < 0) return null;
  const f = text
    .slice(close + 2)
    .trim()
    .split(/\s+/);
  if (f.length < 20) return null;
  return {
    pid: Number(text.slice(0, open).trim()),
    state: f[0],
    ppid: Number(f[1]),
    pgid: Number(f[2]),
    startTime: f[19],
  };
}

/**
 * CPU time of a process and of its children it has waited for, in clock ticks (fields 14-17 of /proc/PID/stat:
 * utime, stime, cutime, cstime). Summed over a process group, a worker that exits moves from its own fields
 * into its parent's, so the sum does not fall back.
 */
export function cpuTicks(text: string): number {
  const f = text
    .slice(text.lastIndexOf(')') + 2)
    .trim()
    .split(/\s+/);
  return [11, 12, 13, 14].reduce((n, i) => n + (Number(f[i]) || 0), 0);
}

/**
 * Clock ticks per second as /proc/PID/stat counts them: USER_HZ, which the kernel fixes at 100 for
 * userspace on every architecture Debian ships (asking `getconf CLK_TCK` would cost a process).
 */
export const CLOCK_TICKS = 100;

/** Resident memory in bytes from /proc/PID/status (VmRSS, in kB: no page size to know); 0 without the line. */
export function rssBytes(status: string): number {
  const m = /^VmRSS:\s*(\d+)\s*kB/m.exec(status);
  return m ? Number(m[1]) * 1024 : 0;
}

export async function readStat(sys: Sys, pid: number): Promise<ProcStat | null> {
  const text = await sys.readText(`/proc/${pid}/stat`);
  return text ? parseStat(text) : null;
}

/** A process is "ours" only if its start time still matches: pids are reused. */
export async function isAlive(sys: Sys, pid: number | null | undefined, startTime: string | null | undefined) {
  if (!pid) return false;
  const st = await readStat(sys, pid);
  if (!st || st.state === 'Z' || st.state === 'X') return false;
  return !startTime || st.startTime === startTime;
}

export async function allPids(sys: Sys): Promise<number[]> {
  const names = await sys.fs.readdir('/proc').catch(() => [] as string[]);
  return names.filter((n) => /^\d+$/.test(n)).map(Number);
}

/** Live (non-zombie) members of a process group. */
export async function groupMembers(sys: Sys, pgid: number): Promise<number[]> {
  const out: number[] = [];
  for (const pid of await allPids(sys)) {
    const st = await readStat(sys, pid);
    if (st && st.pgid === pgid && st.state !== 'Z' && st.state !== 'X') out.push(pid);
  }
  return out;
}

export const TcpState = { ESTABLISHED: '01', SYN_RECV: '03', CLOSE_WAIT: '08', LISTEN: '0A' } as const;

export interface TcpSocket {
  family: 'ipv4' | 'ipv6';
  localAddr: string;
  localPort: number;
  remoteAddr: string;
  remotePort: number;
  state: string; // hex code as in procfs
  rxQueue: number; // for a listener: connections waiting in its accept queue
  inode: number;
}

function hexToIp(hex: string, family: 'ipv4' | 'ipv6'): string {
  if (family === 'ipv4') {
    const n = parseInt(hex, 16);
    return [n & 255, (n >> 8) & 255, (n >> 16) & 255, (n >>> 24) & 255].join('.');
  }
  // four little-endian 32-bit words
  const groups: number[] = [];
  for (let i = 0; i < 32; i += 8) {
    const be = hex
      .slice(i, i + 8)
      .match(/../g)!
      .reverse()
      .join('');
    groups.push(parseInt(be.slice(0, 4), 16), parseInt(be.slice(4, 8), 16));
  }
  return compressV6(groups);
}

export function compressV6(groups: number[]): string {
  let best = -1;
  let bestLen = 1;
  for (let i = 0; i < 8;) {
    let j = i;
    while (j < 8 && groups[j] === 0) j++;
    if (j - i > bestLen) [best, bestLen] = [i, j - i];
    i = j === i ? i + 1 : j;
  }
  const hexes = groups.map((g) => g.toString(16));
  if (best < 0) return hexes.join(':');
  return `${hexes.slice(0, best).join(':')}::${hexes.slice(best + bestLen).join(':')}`;
}

export function parseNetTcp(text: string, family: 'ipv4' | 'ipv6'): TcpSocket[] {
  const out: TcpSocket[] = [];
  for (const line of text.split('\n').slice(1)) {
    const f = line.trim().split(/\s+/);
    if (f.length < 10) continue;
    const [la, lp] = f[1].split(':');
    const [ra, rp] = f[2].split(':');
    out.push({
      family,
      localAddr: hexToIp(la, family),
      localPort: parseInt(lp, 16),
      remoteAddr: hexToIp(ra, family),
      remotePort: parseInt(rp, 16),
      state: f[3],
      rxQueue: parseInt(f[4].split(':')[1] ?? '0', 16),
      inode: Number(f[9]),
    });
  }
  return out;
}

export async function tcpSockets(sys: Sys): Promise<TcpSocket[]> {
  const v4 = (await sys.readText('/proc/net/tcp')) ?? '';
  const v6 = (await sys.readText('/proc/net/tcp6')) ?? '';
  return [...parseNetTcp(v4, 'ipv4'), ...parseNetTcp(v6, 'ipv6')];
}

/**
 * Listening sockets only. The kernel lists listeners before every other socket, so reading stops at
 * the first line that is not LISTEN: under a load of short connections the TIME_WAIT entries after
 * them make the whole file tens of thousands of lines, and reading it all costs a deploy seconds.
 */
export async function tcpListeners(sys: Sys): Promise<TcpSocket[]> {
  const listening = (line: string, i: number) => i === 0 || line.trim().split(/\s+/)[3] === TcpState.LISTEN;
  const [v4, v6] = await Promise.all(['/proc/net/tcp', '/proc/net/tcp6'].map((p) => sys.readLinesWhile(p, listening)));
  return [...parseNetTcp((v4 ?? []).join('\n'), 'ipv4'), ...parseNetTcp((v6 ?? []).join('\n'), 'ipv6')];
}

export const listenersOn = (socks: TcpSocket[], port: number) =>
  socks.filter((s) => s.localPort === port && s.state === TcpState.LISTEN);

/** Connections a client still holds open to this port (what a drain waits for). */
export const openSockets = (socks: TcpSocket[], port: number) =>
  socks.filter(
    (s) =>
      s.localPort === port &&
      (s.state === TcpState.ESTABLISHED || s.state === TcpState.SYN_RECV || s.state === TcpState.CLOSE_WAIT),
  );
export const openConnections = (socks: TcpSocket[], port: number) => openSockets(socks, port).length;

/**
 * Handshakes redirected to this port before the switch that the app has not accept()ed yet: closing
 * the listener now would reset them, so the stop signal waits until there are none.
 */
export const pendingAccepts = (socks: TcpSocket[], port: number) =>
  socks
    .filter((s) => s.localPort === port)
    .reduce((n, s) => n + (s.state === TcpState.LISTEN ? s.rxQueue : s.state === TcpState.SYN_RECV ? 1 : 0), 0);

const wildcard = (s: TcpSocket) => s.localAddr === '0.0.0.0' || s.localAddr === '::';

/**
 * Where must the instance listen for redirected traffic to reach it? REDIRECT rewrites the
 * destination to the arriving interface's primary address (127.0.0.1 / ::1 for local clients),
 * so only a wildcard listener is reachable from every path.
 */
export function bindProblem(listeners: TcpSocket[], wantV6: boolean, bindV6Only: boolean): string | null {
  const v4 = listeners.some(
    (s) => (s.family === 'ipv4' && wildcard(s)) || (s.family === 'ipv6' && s.localAddr === '::' && !bindV6Only),
  );
  const v6 = listeners.some((s) => s.family === 'ipv6' && s.localAddr === '::');
  const where = listeners.map((s) => (s.family === 'ipv6' ? `[${s.localAddr}]` : s.localAddr)).join(', ') || 'nowhere';
  if (!v4)
    return `listens on ${where} only, so traffic redirected from other hosts cannot reach it; bind to 0.0.0.0 or :: (all addresses)`;
  if (wantV6 && !v6)
    return `listens on ${where} only, but the IPv6 redirect is installed; bind to :: (all addresses, dual stack) or deploy with --ipv6 off`;
  return null;
}

/** Pids of processes holding a listening socket on the port (for a candidate whose pid was never recorded). */
export async function pidsListeningOn(sys: Sys, port: number): Promise<number[]> {
  const inodes = new Set(listenersOn(await tcpListeners(sys), port).map((s) => s.inode));
  if (!inodes.size) return [];
  const found: number[] = [];
  for (const pid of await allPids(sys)) {
    const fds = await sys.fs.readdir(`/proc/${pid}/fd`).catch(() => [] as string[]);
    for (const fd of fds) {
      const target = await sys.fs.readlink(`/proc/${pid}/fd/${fd}`).catch(() => '');
      const m = /^socket:\[(\d+)\]$/.exec(target);
      if (m && inodes.has(Number(m[1]))) {
        found.push(pid);
        break;
      }
    }
  }
  return found;
}

/** CAP_NET_ADMIN (bit 12) in the effective set: root in a namespace has it too. */
export function hasNetAdmin(status: string): boolean {
  const m = /^CapEff:\s*([0-9a-f]+)/m.exec(status);
  return !!m && (BigInt('0x' + m[1]) & (1n << 12n)) !== 0n;
}
