// nfnetlink_queue spoken from TypeScript: pure message builders and parsers, and a socket through koffi.
//
// Messages (linux/netfilter/nfnetlink_queue.h): a 16-byte nlmsghdr, a 4-byte nfgenmsg whose res_id is
// the queue number (big-endian), then attributes (u16 len, u16 type, value padded to 4 bytes). The
// nfqueue attribute values are big-endian. A hold binds a queue, copies no payload, reads packet ids
// and accepts them all with one batch verdict; a drain's marking (drainmark.ts) copies whole packets
// and gives a changed one back with its own verdict.

import { loadKoffi } from './self.js';

export const NETLINK_NETFILTER = 12;
const AF_NETLINK = 16;
const SOCK_RAW = 3;
const NFNL_SUBSYS_QUEUE = 3;
export const MSG = { packet: 0, verdict: 1, config: 2, verdictBatch: 3 } as const;
const NLMSG_ERROR = 2;
const NLM_F_REQUEST = 1;
const NLM_F_ACK = 4;
const CFG = { cmd: 1, params: 2, maxlen: 3, mask: 4, flags: 5 } as const;
export const CMD = { bind: 1, unbind: 2 } as const;
const COPY_META = 1;
const COPY_PACKET = 2;
/** The most payload one message carries (NFQNL_MAX_COPY_RANGE): a longer packet comes truncated. */
export const MAX_COPY = 0xffff - 4;
export const CFG_F_FAIL_OPEN = 1; // a full queue lets packets pass instead of dropping them
const NFQA_PACKET_HDR = 1;
const NFQA_VERDICT_HDR = 2;
const NFQA_PAYLOAD = 10;
export const NF_DROP = 0;
export const NF_ACCEPT = 1;
const MSG_DONTWAIT = 0x40;
const EAGAIN = 11;

const align4 = (n: number) => (n + 3) & ~3;

function attr(type: number, value: Buffer): Buffer {
  const out = Buffer.alloc(align4(4 + value.length));
  out.writeUInt16LE(4 + value.length, 0);
  out.writeUInt16LE(type, 2);
  value.copy(out, 4);
  return out;
}

const be32 = (n: number) => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n >>> 0, 0);
  return b;
};

/** One nfnetlink message for the queue subsystem: header, nfgenmsg, attributes. */
export function message(type: number, queue: number, seq: number, attrs: Buffer[], ack = true): Buffer {
  const body = Buffer.concat(attrs);
  const out = Buffer.alloc(16 + 4 + body.length);
  out.writeUInt32LE(out.length, 0);
  out.writeUInt16LE((NFNL_SUBSYS_QUEUE << 8) | type, 4);
  out.writeUInt16LE(NLM_F_REQUEST | (ack ? NLM_F_ACK : 0), 6);
  out.writeUInt32LE(seq >>> 0, 8);
  out.writeUInt32LE(0, 12);
  out.writeUInt8(0, 16); // AF_UNSPEC: the queue serves both families
  out.writeUInt8(0, 17); // NFNETLINK_V0
  out.writeUInt16BE(queue, 18);
  body.copy(out, 20);
  return out;
}

export const bindMessage = (queue: number, seq: number) =>
  message(MSG.config, queue, seq, [attr(CFG.cmd, Buffer.from([CMD.bind, 0, 0, 0]))]);
export const unbindMessage = (queue: number, seq: number) =>
  message(MSG.config, queue, seq, [attr(CFG.cmd, Buffer.from([CMD.unbind, 0, 0, 0]))]);

/**
 * What to copy (metadata only, or `copyRange` bytes of each packet), and how many packets the kernel
 * keeps waiting before it drops (or, with CFG_F_FAIL_OPEN, lets them pass).
 */
export function paramsMessage(queue: number, seq: number, maxlen: number, flags = 0, copyRange = 0): Buffer {
  const params = Buffer.alloc(5);
  params.writeUInt32BE(copyRange, 0);
  params.writeUInt8(copyRange ? COPY_PACKET : COPY_META, 4);
  const attrs = [attr(CFG.params, params), attr(CFG.maxlen, be32(maxlen))];
  // flags need a mask saying which bits are meant
  if (flags) attrs.push(attr(CFG.flags, be32(flags)), attr(CFG.mask, be32(flags)));
  return message(MSG.config, queue, seq, attrs);
}

/** One verdict for every queued packet whose id is at most `id` (NFQNL_MSG_VERDICT_BATCH). */
export function batchVerdictMessage(queue: number, seq: number, id: number, verdict = NF_ACCEPT): Buffer {
  const hdr = Buffer.alloc(8);
  hdr.writeUInt32BE(verdict, 0);
  hdr.writeUInt32BE(id >>> 0, 4);
  return message(MSG.verdictBatch, queue, seq, [attr(NFQA_VERDICT_HDR, hdr)], false);
}

/** One packet's verdict, with the packet to send instead of it (same length: see httpmark.ts). */
export function verdictMessage(queue: number, seq: number, id: number, payload?: Buffer, verdict = NF_ACCEPT): Buffer {
  const hdr = Buffer.alloc(8);
  hdr.writeUInt32BE(verdict, 0);
  hdr.writeUInt32BE(id >>> 0, 4);
  const attrs = [attr(NFQA_VERDICT_HDR, hdr)];
  if (payload) attrs.push(attr(NFQA_PAYLOAD, payload));
  return message(MSG.verdict, queue, seq, attrs, false);
}

export type Parsed =
  | { kind: 'packet'; queue: number; id: number; payload?: Buffer }
  | { kind: 'error'; seq: number; errno: number } // errno 0 is an ack
  | { kind: 'other'; type: number };

/** Splits what one recv() returned into messages; packet messages yield their id. */
export function parseMessages(buf: Buffer): Parsed[] {
  const out: Parsed[] = [];
  let off = 0;
  while (off + 16 <= buf.length) {
    const len = buf.readUInt32LE(off);
    if (len < 16 || off + len > buf.length) break;
    const type = buf.readUInt16LE(off + 4);
    if (type === NLMSG_ERROR) {
      const err = buf.readInt32LE(off + 16);
      out.push({ kind: 'error', seq: buf.readUInt32LE(off + 16 + 4 + 8), errno: -err });
    } else if (type === ((NFNL_SUBSYS_QUEUE << 8) | MSG.packet) && len >= 20) {
      const queue = buf.readUInt16BE(off + 18);
      let a = off + 20;
      let id: number | null = null;
      let payload: Buffer | undefined;
      while (a + 4 <= off + len) {
        const alen = buf.readUInt16LE(a);
        const atype = buf.readUInt16LE(a + 2) & 0x3fff; // without the nested/byte-order bits
        if (alen < 4) break;
        if (atype === NFQA_PACKET_HDR && alen >= 8) id = buf.readUInt32BE(a + 4);
        else if (atype === NFQA_PAYLOAD) payload = buf.subarray(a + 4, Math.min(a + alen, off + len));
        a += align4(alen);
      }
      if (id !== null) out.push({ kind: 'packet', queue, id, ...(payload ? { payload } : {}) });
    } else out.push({ kind: 'other', type });
    off += align4(len);
  }
  return out;
}

/** A row of /proc/net/netfilter/nfnetlink_queue: what the kernel holds and has dropped for one queue. */
export interface QueueStats {
  queue: number;
  portid: number;
  waiting: number;
  dropped: number; // the queue was full
  userDropped: number; // the reader's socket buffer was full
}

export function parseQueueStats(text: string): QueueStats[] {
  return text
    .split('\n')
    .map((l) => l.trim().split(/\s+/).map(Number))
    .filter((f) => f.length >= 7 && f.every((n) => Number.isFinite(n)))
    .map((f) => ({ queue: f[0], portid: f[1], waiting: f[2], dropped: f[5], userDropped: f[6] }));
}

// ---- the socket ------------------------------------------------------------------------------

type Fn = ((...args: unknown[]) => number) & { async: (...args: unknown[]) => void };

interface Libc {
  socket: Fn;
  bind: Fn;
  send: Fn;
  recv: Fn;
  poll: Fn;
  close: Fn;
  setsockopt: Fn;
  errno: () => number;
}

let libc: Libc | null = null;

/** libc through koffi (prebuilt binaries: nothing to compile on the host). */
function loadLibc(): Libc {
  if (libc) return libc;
  const koffi = loadKoffi();
  const lib = koffi.load('libc.so.6');
  libc = {
    socket: lib.func('int socket(int domain, int type, int protocol)'),
    bind: lib.func('int bind(int fd, const void *addr, uint32_t len)'),
    send: lib.func('intptr_t send(int fd, const void *buf, size_t len, int flags)'),
    recv: lib.func('intptr_t recv(int fd, _Out_ void *buf, size_t len, int flags)'),
    poll: lib.func('int poll(_Inout_ void *fds, unsigned long nfds, int timeout)'),
    close: lib.func('int close(int fd)'),
    setsockopt: lib.func('int setsockopt(int fd, int level, int name, const void *val, uint32_t len)'),
    errno: () => koffi.errno(),
  };
  return libc;
}

/** One bound queue. recv never blocks the event loop: poll() waits in koffi's worker thread. */
export class NfQueue {
  private fd = -1;
  private seq = 1;
  private buf: Buffer;

  /** `copyRange`: bytes of each packet to copy (0: none, ids only). */
  constructor(
    readonly queue: number,
    private copyRange = 0,
  ) {
    this.buf = Buffer.alloc(copyRange ? 1 << 17 : 1 << 16);
  }

  open(maxlen: number, flags = 0): void {
    const c = loadLibc();
    this.fd = c.socket(AF_NETLINK, SOCK_RAW, NETLINK_NETFILTER);
    if (this.fd < 0) throw new Error(`netlink socket: errno ${c.errno()}`);
    const addr = Buffer.alloc(12);
    addr.writeUInt16LE(AF_NETLINK, 0);
    if (c.bind(this.fd, addr, 12) < 0) throw new Error(`netlink bind: errno ${c.errno()}`);
    const int = (n: number) => {
      const b = Buffer.alloc(4);
      b.writeInt32LE(n, 0);
      return b;
    };
    // a burst of SYNs must not overflow the socket: 8 MiB (SO_RCVBUFFORCE, root), and no ENOBUFS errors
    c.setsockopt(this.fd, 1, 33, int(8 << 20), 4);
    c.setsockopt(this.fd, 270, 5, int(1), 4);
    try {
      this.request(bindMessage(this.queue, this.seq++), 'bind');
    } catch (err) {
      c.close(this.fd);
      this.fd = -1;
      throw err;
    }
    try {
      this.request(paramsMessage(this.queue, this.seq++, maxlen, flags, this.copyRange), 'configure');
    } catch (err) {
      c.close(this.fd);
      this.fd = -1;
      throw err;
    }
  }

  /** Sends a config message and waits for its ack (config is rare: a blocking wait is fine). */
  private request(msg: Buffer, what: string): void {
    const c = loadLibc();
    const seq = msg.readUInt32LE(8);
    if (c.send(this.fd, msg, msg.length, 0) < 0)
      throw new Error(`queue ${this.queue} ${what}: send errno ${c.errno()}`);
    for (let i = 0; i < 100; i++) {
      const n = c.recv(this.fd, this.buf, this.buf.length, 0);
      if (n < 0) throw new Error(`queue ${this.queue} ${what}: recv errno ${c.errno()}`);
      for (const m of parseMessages(this.buf.subarray(0, n))) {
        if (m.kind === 'packet') this.pending.push(m.id);
        if (m.kind === 'error' && m.seq === seq) {
          if (m.errno) throw new Error(`queue ${this.queue} ${what}: ${errnoName(m.errno)}`);
          return;
        }
      }
    }
    throw new Error(`queue ${this.queue} ${what}: no answer from the kernel`);
  }

  /** Packet ids read during a config request, handed out by the next read(). */
  private pending: number[] = [];

  /** Waits up to `ms` for packets in a worker thread, then reads every message waiting; returns packet ids. */
  async read(ms: number): Promise<number[]> {
    const c = loadLibc();
    const ids = this.pending.splice(0);
    const pfd = Buffer.alloc(8);
    pfd.writeInt32LE(this.fd, 0);
    pfd.writeInt16LE(1, 4); // POLLIN
    await new Promise<void>((res) => c.poll.async(pfd, 1, ms, () => res()));
    for (;;) {
      const n = c.recv(this.fd, this.buf, this.buf.length, MSG_DONTWAIT);
      if (n < 0) {
        const e = c.errno();
        if (e === EAGAIN) break;
        if (e === 105) continue; // ENOBUFS: some messages were lost; the batch verdict still covers them
        throw new Error(`queue ${this.queue} recv: ${errnoName(e)}`);
      }
      for (const m of parseMessages(this.buf.subarray(0, n))) if (m.kind === 'packet') ids.push(m.id);
    }
    return ids;
  }

  /**
   * Waits up to `ms` for packets, then hands each waiting one to `fn` before reading the next (the
   * payload lives in a reused buffer). What `fn` returns goes out instead of the packet; every other
   * packet read is accepted with one batch verdict. Returns how many packets were read.
   */
  async serve(ms: number, fn: (payload: Buffer) => Buffer | null): Promise<number> {
    const c = loadLibc();
    const pfd = Buffer.alloc(8);
    pfd.writeInt32LE(this.fd, 0);
    pfd.writeInt16LE(1, 4); // POLLIN
    await new Promise<void>((res) => c.poll.async(pfd, 1, ms, () => res()));
    let maxId = -1;
    let count = 0;
    for (;;) {
      const n = c.recv(this.fd, this.buf, this.buf.length, MSG_DONTWAIT);
      if (n < 0) {
        const e = c.errno();
        if (e === EAGAIN) break;
        if (e === 105) continue; // ENOBUFS: some messages were lost; the batch verdict still covers them
        throw new Error(`queue ${this.queue} recv: ${errnoName(e)}`);
      }
      for (const m of parseMessages(this.buf.subarray(0, n))) {
        if (m.kind !== 'packet') continue;
        count++;
        if (m.id > maxId) maxId = m.id;
        if (!m.payload) continue;
        // a truncated copy is handed over as it is: its IP length says what is missing (httpmark.ts)
        const out = fn(m.payload);
        if (!out) continue;
        const msg = verdictMessage(this.queue, this.seq++, m.id, out);
        if (c.send(this.fd, msg, msg.length, 0) < 0) throw new Error(`queue ${this.queue} verdict: errno ${c.errno()}`);
      }
    }
    if (maxId >= 0) this.acceptUpTo(maxId);
    return count;
  }

  /** Accepts every packet with an id up to `id` in one message. */
  acceptUpTo(id: number): void {
    const c = loadLibc();
    const msg = batchVerdictMessage(this.queue, this.seq++, id);
    if (c.send(this.fd, msg, msg.length, 0) < 0) throw new Error(`queue ${this.queue} verdict: errno ${c.errno()}`);
  }

  close(): void {
    if (this.fd < 0) return;
    const c = loadLibc();
    try {
      this.request(unbindMessage(this.queue, this.seq++), 'unbind');
    } catch {
      // closing the socket unbinds too
    }
    c.close(this.fd);
    this.fd = -1;
  }
}

const ERRNO: Record<number, string> = {
  1: 'EPERM (needs root or CAP_NET_ADMIN)',
  2: 'ENOENT',
  16: 'EBUSY (another process reads this queue)',
  22: 'EINVAL',
  95: 'EOPNOTSUPP (nfnetlink_queue missing: modprobe nfnetlink_queue)',
  93: 'EPROTONOSUPPORT (nfnetlink_queue missing: modprobe nfnetlink_queue)',
};
const errnoName = (e: number) => ERRNO[e] ?? `errno ${e}`;
