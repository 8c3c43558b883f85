// Marks the next answer on each keep-alive connection of a draining instance `Connection: close`, packet by packet.
//
// Pure logic: packets in, a rewritten packet (or nothing to change) out. drainmark.ts feeds it from an
// NFQUEUE that sees both directions of the draining instance's port.
//
// Why it is safe:
// - Where an answer starts is known, never guessed: a client that does not pipeline has received
//   everything before it sends a request, so the ACK number of its request is the sequence number
//   where the answer begins. Only a server packet with exactly that sequence number, beginning with
//   a complete HTTP/1.x head, is touched. Body bytes that merely look like a head are never at that
//   number.
// - The rewrite keeps every length, so no sequence number moves; the TCP checksum is computed anew
//   (the kernel sends a packet changed in a queue as written).
// - Requests are read only far enough to see where they end: a request whose end is not known
//   (chunked upload, a head over HEAD_MAX), a second request before the first is answered
//   (pipelining), TLS, HTTP/2 and anything else that is not HTTP/1.x are left alone.
// - A marked answer is marked again when TCP resends it: the sender's queue keeps the original bytes.

import { compressV6 } from '../os/proc.js';

/** A connection counts as quiet after this long with no packet either way and no request waiting. */
export const QUIET_MS = 1000;
const HEAD_MAX = 8192; // request head bytes kept per connection, while its end is not seen
const MAX_CONNS = 100_000; // connections tracked at once; more are let through untracked (idle wait)
const HEADS_MAX = 16 << 20; // request head bytes kept across all connections
// Marked clients reconnect to the new instance at once; a burst of them can outrun a server that accepts
// only when a worker is free (puma), so marks are paced: PACE_BURST at once, then PACE_PER_S a second.
// An answer passed over for want of one is not lost: the connection's next answer is marked.
const PACE_BURST = 8;
const PACE_PER_S = 50;

/** Why a connection is never marked. */
export type Untouched = 'tls' | 'http2' | 'not-http' | 'pipelined' | 'upgraded' | 'untracked';

/** The three same-length rewrites, in the order they are tried. */
export type Rewrite = 'connection' | 'date' | 'version';

export interface Segment {
  v6: boolean;
  src: string;
  dst: string;
  sport: number;
  dport: number;
  seq: number;
  ack: number;
  flags: number;
  tcp: number; // offset of the TCP header
  data: number; // offset of the payload
  end: number; // end of the IP packet (the buffer may hold less: truncated)
}

const FIN = 0x01;
const SYN = 0x02;
const RST = 0x04;

const v4text = (p: Buffer, at: number) => `${p[at]}.${p[at + 1]}.${p[at + 2]}.${p[at + 3]}`;
function v6text(p: Buffer, at: number): string {
  const groups = Array.from({ length: 8 }, (_, i) => p.readUInt16BE(at + 2 * i));
  // an IPv4 client of a dual-stack socket: keyed as IPv4, the way its packets come
  if (groups.slice(0, 5).every((g) => g === 0) && groups[5] === 0xffff)
    return `${groups[6] >> 8}.${groups[6] & 255}.${groups[7] >> 8}.${groups[7] & 255}`;
  return compressV6(groups);
}

/** An IPv4 or IPv6 TCP segment; null for anything else (fragments, extension headers, other protocols). */
export function parseSegment(p: Buffer): Segment | null {
  if (p.length < 20) return null;
  const version = p[0] >> 4;
  let tcp: number;
  let end: number;
  let v6 = false;
  let src: string;
  let dst: string;
  if (version === 4) {
    tcp = (p[0] & 15) * 4;
    end = p.readUInt16BE(2);
    const frag = p.readUInt16BE(6) & 0x3fff; // more-fragments flag and offset
    if (p[9] !== 6 || frag || tcp < 20) return null;
    [src, dst] = [v4text(p, 12), v4text(p, 16)];
  } else if (version === 6) {
    if (p.length < 60 || p[6] !== 6) return null;
    v6 = true;
    tcp = 40;
    end = 40 + p.readUInt16BE(4);
    [src, dst] = [v6text(p, 8), v6text(p, 24)];
  } else return null;
  if (p.length < tcp + 20) return null;
  const data = tcp + (p[tcp + 12] >> 4) * 4;
  if (data > end || data > p.length) return null;
  return {
    v6,
    src,
    dst,
    sport: p.readUInt16BE(tcp),
    dport: p.readUInt16BE(tcp + 2),
    seq: p.readUInt32BE(tcp + 4),
    ack: p.readUInt32BE(tcp + 8),
    flags: p[tcp + 13],
    tcp,
    data,
    end,
  };
}

/** The TCP checksum over the pseudo header and the segment, written into the packet. */
export function fixTcpChecksum(p: Buffer, s: Segment): void {
  const len = s.end - s.tcp;
  let sum = 0;
  const add16 = (from: number, to: number) => {
    let i = from;
    for (; i + 1 < to; i += 2) sum += p.readUInt16BE(i);
    if (i < to) sum += p[i] << 8;
  };
  if (s.v6) add16(8, 40);
  else add16(12, 20);
  sum += 6 + (len >>> 16) + (len & 0xffff); // protocol and TCP length
  p.writeUInt16BE(0, s.tcp + 16);
  add16(s.tcp, s.end);
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16);
  p.writeUInt16BE(~sum & 0xffff, s.tcp + 16);
}

// sequence numbers wrap at 2^32
const seqDiff = (a: number, b: number) => (a - b) | 0;
const seqAdd = (a: number, n: number) => (a + n) >>> 0;

const HEAD_END = Buffer.from('\r\n\r\n');

interface HeadLine {
  name: string; // lower case
  value: string;
  at: number; // offset of the line in the head
  len: number; // without its CRLF
}

/** Splits a head (latin1, up to and without its blank line) into its first line and header lines. */
function headLines(head: string): { first: string; headers: HeadLine[] } {
  const lines = head.split('\r\n');
  const headers: HeadLine[] = [];
  let at = lines[0].length + 2;
  for (const line of lines.slice(1)) {
    const colon = line.indexOf(':');
    if (colon > 0)
      headers.push({
        name: line.slice(0, colon).toLowerCase(),
        value: line.slice(colon + 1).trim(),
        at,
        len: line.length,
      });
    at += line.length + 2;
  }
  return { first: lines[0], headers };
}

const CLOSE = 'close';
/** "Connection:" then spaces then "close", as long as the line it replaces (leading OWS: every parser skips it). */
const closeLine = (len: number) => `Connection:${' '.repeat(len - 'Connection:'.length - CLOSE.length)}${CLOSE}`;
const MIN_LINE = 'Connection: close'.length;

/**
 * The same-length edit that makes an answer's head say the connection closes after it, or why there is none.
 * `head` is latin1 text from the status line up to (without) the blank line.
 */
export function closeEdit(
  head: string,
): { at: number; text: string; how: Rewrite } | { none: 'closing' | 'no-rewrite' } {
  const { first, headers } = headLines(head);
  const conn = headers.filter((h) => h.name === 'connection');
  const tokens = conn.flatMap((h) =>
    h.value
      .toLowerCase()
      .split(',')
      .map((t) => t.trim()),
  );
  if (tokens.includes('close')) return { none: 'closing' };
  const ka = conn.length === 1 && tokens.length === 1 && tokens[0] === 'keep-alive' ? conn[0] : null;
  if (ka && ka.len >= MIN_LINE) return { at: ka.at, text: closeLine(ka.len), how: 'connection' };
  if (conn.length) return { none: 'no-rewrite' };
  const date = headers.find((h) => h.name === 'date');
  if (date && date.len >= MIN_LINE) return { at: date.at, text: closeLine(date.len), how: 'date' };
  // an HTTP/1.0 answer without keep-alive ends its connection; 1.0 has no chunked framing
  if (first.startsWith('HTTP/1.1 ') && !headers.some((h) => h.name === 'transfer-encoding'))
    return { at: 0, text: 'HTTP/1.0', how: 'version' };
  return { none: 'no-rewrite' };
}

const REQUEST_LINE = /^[A-Z][A-Z0-9_-]{0,31} \S+ HTTP\/1\.[01]$/;
const STATUS_LINE = /^HTTP\/1\.[01] (\d{3})( |$)/;

/** The request being read on a connection: from its first byte to the end of its body. */
interface Request {
  next: number; // the client sequence number expected next
  anchor: number; // the server sequence number where its answer begins
  head: Buffer[]; // while its head is not complete
  headBytes: number;
  bodyLeft: number | null; // body bytes still to come once the head is read; null while it is not
  method: string;
  unknown: boolean; // its end cannot be known (chunked upload, head too long, a gap): its answer is left alone
}

interface Conn {
  stats: MarkStats; // its instance port's
  lastAt: number;
  closed: boolean;
  marked: boolean;
  untouched?: Untouched;
  req: Request | null;
  answered: boolean; // the answer to `req` has begun
  answerEnd: number | null; // where that answer ends, when its head says (Content-Length)
  srvNext: number | null; // the highest server sequence number sent, plus one
  edit?: { seq: number; bytes: Buffer }; // the marking, applied again to resent copies
}

export interface MarkStats {
  seen: number; // connections seen
  marked: number; // answers rewritten (or already saying close)
  closed: number; // connections that ended while marking ran
  rewrites: Record<Rewrite, number>;
  untouched: Partial<Record<Untouched, number>>;
}

/** One direction's verdict: the packet to send instead, or null to let it pass as it is. */
export type Verdict = Buffer | null;

/** Tracks the connections of some instance ports and rewrites one answer on each. */
export class Marker {
  private conns = new Map<string, Conn>();
  private ports = new Map<number, number>(); // instance port -> when marking it began (ms)
  private headBytes = 0; // kept in all requests' `head`
  private pace = { tokens: PACE_BURST, at: 0 };
  private counts = new Map<number, MarkStats>();

  addPort(port: number, now: number): void {
    this.ports.set(port, now);
    this.counts.set(port, {
      seen: 0,
      marked: 0,
      closed: 0,
      rewrites: { connection: 0, date: 0, version: 0 },
      untouched: {},
    });
  }

  /** What marking did on one port so far. */
  stats(port: number): MarkStats | undefined {
    return this.counts.get(port);
  }

  removePort(port: number): void {
    this.ports.delete(port);
    this.counts.delete(port);
    for (const [key, c] of this.conns) {
      if (!key.endsWith(`|${port}`)) continue;
      if (c.req) this.dropHead(c.req);
      this.conns.delete(key);
    }
  }

  get portCount(): number {
    return this.ports.size;
  }

  /** One queued packet: a client's (to an instance port) or the instance's (from it). */
  packet(p: Buffer, now: number): Verdict {
    const s = parseSegment(p);
    if (!s) return null;
    if (this.ports.has(s.dport)) return this.fromClient(p, s, now);
    if (this.ports.has(s.sport)) return this.fromServer(p, s, now);
    return null;
  }

  private conn(remote: string, rport: number, port: number, now: number, create: boolean): Conn | null {
    const key = `${remote}|${rport}|${port}`;
    let c = this.conns.get(key);
    if (!c && create) {
      const stats = this.counts.get(port)!;
      if (this.conns.size >= MAX_CONNS) {
        stats.untouched.untracked = (stats.untouched.untracked ?? 0) + 1; // counts packets, not connections
        return null;
      }
      stats.seen++;
      c = {
        stats,
        lastAt: now,
        closed: false,
        marked: false,
        req: null,
        answered: false,
        answerEnd: null,
        srvNext: null,
      };
      this.conns.set(key, c);
    }
    return c ?? null;
  }

  private untouch(c: Conn, why: Untouched): void {
    if (c.untouched) return;
    c.untouched = why;
    if (c.req) this.dropHead(c.req);
    c.stats.untouched[why] = (c.stats.untouched[why] ?? 0) + 1;
  }

  /**
   * Data, or a connection opening or closing, is activity; a bare ACK is not: TCP keep-alive probes and
   * their answers come every second from some clients (Node's agent) on connections nobody uses.
   */
  private active(c: Conn, s: Segment, len: number, now: number): void {
    if (len > 1 || s.flags & (SYN | FIN | RST)) c.lastAt = now; // a probe may carry one byte it sent before
    if (s.flags & (FIN | RST) && !c.closed) {
      c.closed = true;
      c.stats.closed++;
    }
  }

  private fromClient(p: Buffer, s: Segment, now: number): Verdict {
    const c = this.conn(s.src, s.sport, s.dport, now, true);
    if (!c) return null;
    const len = Math.min(s.end, p.length) - s.data;
    this.active(c, s, len, now);
    if (len <= 0 || c.marked || c.untouched || s.flags & SYN) return null;
    let r = c.req;
    if (!r || c.answered) {
      // a new request: a client that does not pipeline has every byte of the last answer by now
      const early =
        (c.srvNext !== null && seqDiff(s.ack, c.srvNext) < 0) ||
        (c.answered && c.answerEnd !== null && seqDiff(s.ack, c.answerEnd) < 0);
      if (early) return (this.untouch(c, 'pipelined'), null);
      if (c.req) this.dropHead(c.req);
      r = c.req = { next: s.seq, anchor: s.ack, head: [], headBytes: 0, bodyLeft: null, method: '', unknown: false };
      [c.answered, c.answerEnd] = [false, null];
    }
    const behind = seqDiff(s.seq, r.next);
    if (behind < 0) {
      // a resent copy of what was read already, or an overlap: the request's end is no longer known
      if (behind + len > 0) r.unknown = true;
      return null;
    }
    if (behind > 0 || s.ack !== r.anchor) r.unknown = true; // a gap, or the server said something before answering
    r.next = seqAdd(s.seq, len);
    if (r.unknown) return null;
    this.readRequest(c, r, p.subarray(s.data, s.data + len));
    return null;
  }

  /** Follows a request's bytes to its end; what comes after the end is a pipelined request. */
  private readRequest(c: Conn, r: Request, bytes: Buffer): void {
    if (r.bodyLeft !== null) {
      if (bytes.length > r.bodyLeft) return this.untouch(c, 'pipelined');
      r.bodyLeft -= bytes.length;
      return;
    }
    if (!r.head.length) {
      // a TLS record: handshake, alert, change cipher spec or (mid-connection) application data
      if (bytes[0] >= 0x14 && bytes[0] <= 0x17 && bytes[1] === 0x03) return this.untouch(c, 'tls');
      if (bytes.subarray(0, 14).toString('latin1') === 'PRI * HTTP/2.0') return this.untouch(c, 'http2');
      if (!/^[A-Z]/.test(bytes.subarray(0, 1).toString('latin1'))) return this.untouch(c, 'not-http');
    }
    const all = r.head.length ? Buffer.concat([r.head[0], bytes]) : bytes;
    const end = all.indexOf(HEAD_END);
    if (end < 0) {
      // kept (copied: the packet's buffer is reused) until the head is complete, within both bounds
      this.dropHead(r);
      if (all.length > HEAD_MAX || this.headBytes + all.length > HEADS_MAX) r.unknown = true;
      else [r.head, r.headBytes, this.headBytes] = [[Buffer.from(all)], all.length, this.headBytes + all.length];
      return;
    }
    this.dropHead(r);
    const { first, headers } = headLines(all.subarray(0, end).toString('latin1'));
    if (!REQUEST_LINE.test(first)) return this.untouch(c, 'not-http');
    r.method = first.slice(0, first.indexOf(' '));
    const value = (name: string) => headers.find((h) => h.name === name)?.value;
    if (value('transfer-encoding') !== undefined) r.unknown = true;
    const length = Number(value('content-length') ?? 0);
    if (!Number.isSafeInteger(length) || length < 0) r.unknown = true;
    const extra = all.length - end - HEAD_END.length;
    if (extra > length) return this.untouch(c, 'pipelined');
    r.bodyLeft = length - extra;
  }

  private fromServer(p: Buffer, s: Segment, now: number): Verdict {
    const c = this.conn(s.dst, s.dport, s.sport, now, true);
    if (!c) return null;
    const len = Math.min(s.end, p.length) - s.data;
    this.active(c, s, len, now);
    if (len <= 0) return null;
    const truncated = p.length < s.end;
    const endSeq = seqAdd(s.seq, len);
    if (c.srvNext === null || seqDiff(endSeq, c.srvNext) > 0) c.srvNext = endSeq;
    if (c.edit) return truncated ? null : this.again(p, s, c.edit);
    const r = c.req;
    if (c.marked || c.untouched || !r || c.answered) return null;
    const at = seqDiff(r.anchor, s.seq);
    if (at < 0 || at >= len) {
      // data past the anchor without its start seen, or before it: this answer is not the one to mark
      if (at < 0) c.answered = true;
      return null;
    }
    if (at > 0 || r.unknown || r.bodyLeft !== 0) return ((c.answered = true), null);
    return this.answer(p, s, c, r, truncated, now);
  }

  private dropHead(r: Request): void {
    this.headBytes -= r.headBytes;
    [r.head, r.headBytes] = [[], 0];
  }

  /** Forgets connections that ended a while ago: resent copies of their last packets have passed by then. */
  prune(now: number): void {
    for (const [key, c] of this.conns) {
      if (!c.closed || now - c.lastAt < 10 * QUIET_MS) continue;
      if (c.req) this.dropHead(c.req);
      this.conns.delete(key);
    }
  }

  /** The server packet that begins the answer to `r`: rewrite its head when it allows it. */
  private answer(p: Buffer, s: Segment, c: Conn, r: Request, truncated: boolean, now: number): Verdict {
    let off = s.data;
    const stop = Math.min(s.end, p.length);
    for (;;) {
      const end = p.subarray(off, stop).indexOf(HEAD_END);
      const head = end < 0 ? '' : p.subarray(off, off + end).toString('latin1');
      const status = STATUS_LINE.exec(head);
      if (!status) {
        // no complete HTTP/1.x head in this packet: the next answer may do better
        c.answered = true;
        if (end >= 0 || !p.subarray(off, stop).toString('latin1').startsWith('HTTP/1.')) this.untouch(c, 'not-http');
        return null;
      }
      const code = Number(status[1]);
      const headLen = end + HEAD_END.length;
      if (code === 101) return (this.untouch(c, 'upgraded'), null);
      if (code >= 100 && code < 200) {
        // an interim answer (100 Continue): the final one follows it
        r.anchor = seqAdd(r.anchor, headLen);
        off += headLen;
        if (off >= stop) return null;
        continue;
      }
      c.answered = true;
      const { headers } = headLines(head);
      const length = headers.find((h) => h.name === 'content-length')?.value;
      const bodyless = r.method === 'HEAD' || code === 204 || code === 304;
      if (bodyless || (length !== undefined && /^\d+$/.test(length)))
        c.answerEnd = seqAdd(r.anchor, headLen + (bodyless ? 0 : Number(length)));
      const edit = closeEdit(head);
      if ('none' in edit) {
        if (edit.none === 'closing') this.markDone(c);
        return null;
      }
      if (truncated) return null; // the kernel gave only part of it: a rewrite would cut the rest off
      if (!this.paced(now)) return null;
      const bytes = Buffer.from(edit.text, 'latin1');
      c.edit = { seq: seqAdd(s.seq, off - s.data + edit.at), bytes };
      this.markDone(c);
      c.stats.rewrites[edit.how]++;
      const out = Buffer.from(p);
      bytes.copy(out, off + edit.at);
      fixTcpChecksum(out, s);
      return out;
    }
  }

  /** One mark's worth of the pace, if there is one now. */
  private paced(now: number): boolean {
    const p = this.pace;
    p.tokens = Math.min(PACE_BURST, p.tokens + ((now - p.at) * PACE_PER_S) / 1000);
    p.at = now;
    if (p.tokens < 1) return false;
    p.tokens--;
    return true;
  }

  private markDone(c: Conn): void {
    c.marked = true;
    c.stats.marked++;
  }

  /** A resent copy of a marked answer gets the same bytes; packets around it pass. */
  private again(p: Buffer, s: Segment, edit: { seq: number; bytes: Buffer }): Verdict {
    const len = s.end - s.data;
    const from = Math.max(0, seqDiff(s.seq, edit.seq)); // first edit byte inside the packet
    const to = Math.min(edit.bytes.length, seqDiff(seqAdd(s.seq, len), edit.seq));
    if (to <= from) return null;
    const at = s.data + seqDiff(edit.seq, s.seq) + from;
    if (p.subarray(at, at + to - from).equals(edit.bytes.subarray(from, to))) return null;
    const out = Buffer.from(p);
    edit.bytes.copy(out, at, from, to);
    fixTcpChecksum(out, s);
    return out;
  }

  /**
   * Are these connections (remote address, remote port) to `port` all quiet: no packet either way for
   * QUIET_MS, and none waiting for an answer? One never seen has been quiet since marking began.
   */
  quiet(port: number, remotes: { addr: string; port: number }[], now: number): boolean {
    const since = this.ports.get(port);
    if (since === undefined) return false;
    return remotes.every(({ addr, port: rport }) => {
      const c = this.conns.get(`${unmap(addr)}|${rport}|${port}`);
      if (!c) return now - since >= QUIET_MS;
      const waiting = c.req !== null && !c.answered && !c.untouched && !c.marked;
      return !waiting && now - c.lastAt >= QUIET_MS;
    });
  }
}

/** "::ffff:10.0.0.2" -> "10.0.0.2": procfs shows IPv4 clients of dual-stack sockets mapped. */
export function unmap(addr: string): string {
  const m = /^::ffff:([0-9a-f]{1,4}):([0-9a-f]{1,4})$/i.exec(addr);
  if (!m) return addr.replace(/^::ffff:(\d+\.\d+\.\d+\.\d+)$/i, '$1');
  const [hi, lo] = [parseInt(m[1], 16), parseInt(m[2], 16)];
  return `${hi >> 8}.${hi & 255}.${lo >> 8}.${lo & 255}`;
}
