// The packet-level marking of a draining instance's answers: where it touches, where it never does, and checksums.

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { closeEdit, Marker, parseSegment, QUIET_MS, unmap } from '../../src/drain/httpmark.js';

const PORT = 8001;
const CLIENT = { addr: '10.0.0.2', port: 40000 };

/** A TCP segment in an IPv4 or IPv6 packet, with a correct checksum. */
function packet(o: {
  v6?: boolean;
  from: 'client' | 'server';
  seq: number;
  ack: number;
  data?: string | Buffer;
  flags?: number;
  cport?: number;
}): Buffer {
  const data = typeof o.data === 'string' ? Buffer.from(o.data, 'latin1') : (o.data ?? Buffer.alloc(0));
  const tcp = Buffer.alloc(20);
  const [sport, dport] = o.from === 'client' ? [o.cport ?? CLIENT.port, PORT] : [PORT, o.cport ?? CLIENT.port];
  tcp.writeUInt16BE(sport, 0);
  tcp.writeUInt16BE(dport, 2);
  tcp.writeUInt32BE(o.seq >>> 0, 4);
  tcp.writeUInt32BE(o.ack >>> 0, 8);
  tcp[12] = 5 << 4;
  tcp[13] = o.flags ?? 0x18; // PSH, ACK
  const seg = Buffer.concat([tcp, data]);
  let ip: Buffer;
  const [c, s] = o.v6
    ? [
        [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
        [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
      ]
    : [
        [10, 0, 0, 2],
        [10, 0, 0, 1],
      ];
  const [src, dst] = o.from === 'client' ? [c, s] : [s, c];
  if (o.v6) {
    ip = Buffer.alloc(40);
    ip[0] = 0x60;
    ip.writeUInt16BE(seg.length, 4);
    ip[6] = 6;
    ip[7] = 64;
    Buffer.from(src).copy(ip, 8);
    Buffer.from(dst).copy(ip, 24);
  } else {
    ip = Buffer.alloc(20);
    ip[0] = 0x45;
    ip.writeUInt16BE(20 + seg.length, 2);
    ip[8] = 64;
    ip[9] = 6;
    Buffer.from(src).copy(ip, 12);
    Buffer.from(dst).copy(ip, 16);
  }
  const p = Buffer.concat([ip, seg]);
  p.writeUInt16BE(checksum(p), ip.length + 16);
  return p;
}

/** RFC 793's checksum computed over an explicit pseudo header, independently of the code under test. */
function checksum(p: Buffer): number {
  const v6 = p[0] >> 4 === 6;
  const ipLen = v6 ? 40 : 20;
  const seg = Buffer.from(p.subarray(ipLen));
  seg.writeUInt16BE(0, 16);
  const pseudo = v6
    ? Buffer.concat([p.subarray(8, 40), Buffer.from([0, 0, seg.length >> 8, seg.length & 255, 0, 0, 0, 6])])
    : Buffer.concat([p.subarray(12, 20), Buffer.from([0, 6, seg.length >> 8, seg.length & 255])]);
  const all = Buffer.concat([pseudo, seg, Buffer.alloc(seg.length % 2)]);
  let sum = 0;
  for (let i = 0; i < all.length; i += 2) sum += all.readUInt16BE(i);
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16);
  return ~sum & 0xffff;
}

const checksumOk = (p: Buffer) => p.readUInt16BE((p[0] >> 4 === 6 ? 40 : 20) + 16) === checksum(p);
const payload = (p: Buffer) => p.subarray((p[0] >> 4 === 6 ? 40 : 20) + 20).toString('latin1');

const REQ = 'GET / HTTP/1.1\r\nHost: example\r\n\r\n';
const DATE = 'Date: Thu, 03 Dec 2026 08:19:27 GMT';
const answer = (body: string, extra = DATE) =>
  `HTTP/1.1 200 OK\r\n${extra}\r\nContent-Length: ${body.length}\r\n\r\n${body}`;

/** A marker on PORT that has seen the client's request (seq 1000, acking the server's 5000). */
function requested(m = new Marker(), v6 = false, req = REQ) {
  m.addPort(PORT, 0);
  assert.is(
    m.packet(packet({ v6, from: 'client', seq: 1000, ack: 5000, data: req }), 1),
    null,
    'a request passes as it is',
  );
  return m;
}

test('closeEdit: keep-alive becomes close, else the Date line, else HTTP/1.0; always the same length', () => {
  const cases: [string, string | null][] = [
    ['HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2', 'connection'],
    ['HTTP/1.1 200 OK\r\nconnection:Keep-Alive\r\nContent-Length: 2', 'connection'],
    [`HTTP/1.1 200 OK\r\n${DATE}\r\nContent-Length: 2`, 'date'],
    ['HTTP/1.1 200 OK\r\nContent-Length: 2', 'version'],
    ['HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked', null],
    ['HTTP/1.1 200 OK\r\nConnection: close', null],
    ['HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket', null],
  ];
  for (const [head, how] of cases) {
    const e = closeEdit(head);
    if (how === null) {
      assert.ok('none' in e, head);
      continue;
    }
    assert.ok(!('none' in e), head);
    if ('none' in e) continue;
    assert.is(e.how, how, head);
    const out = head.slice(0, e.at) + e.text + head.slice(e.at + e.text.length);
    assert.is(out.length, head.length);
    if (how === 'version') assert.ok(out.startsWith('HTTP/1.0 200 OK'), out);
    else assert.match(out, /\r\nConnection: +close\r\n/i);
  }
  assert.equal(closeEdit('HTTP/1.1 200 OK\r\nConnection: close'), { none: 'closing' });
});

for (const v6 of [false, true]) {
  test(`the answer to a request is marked at its ACK number, bytes and length kept, checksum right (IPv${v6 ? 6 : 4})`, () => {
    const m = requested(new Marker(), v6);
    const p = packet({ v6, from: 'server', seq: 5000, ack: 1000 + REQ.length, data: answer('v1') });
    const out = m.packet(p, 2);
    assert.ok(out, 'rewritten');
    assert.is(out!.length, p.length);
    assert.is(payload(out!), answer('v1', `Connection:${' '.repeat(DATE.length - 16)}close`));
    assert.ok(checksumOk(out!), 'the TCP checksum matches the new bytes');
    assert.is(m.stats(PORT)!.marked, 1);
    assert.is(m.stats(PORT)!.rewrites.date, 1);
    // a resent copy gets the same bytes; the next answer on the connection passes (the client closes after this one)
    const again = m.packet(p, 3);
    assert.ok(again && again.equals(out!), 'a retransmission is marked alike');
    assert.is(
      m.packet(packet({ v6, from: 'client', seq: 1000 + REQ.length, ack: 5000 + answer('v1').length, data: REQ }), 4),
      null,
    );
    assert.is(
      m.packet(packet({ v6, from: 'server', seq: 5000 + answer('v1').length, ack: 2000, data: answer('v1') }), 5),
      null,
    );
  });
}

test('a body whose segments begin with a head-like text is never touched: only the ACK-anchored start is', () => {
  const fake = answer('xx');
  const body = fake.repeat(3);
  const m = requested();
  const head = answer(body).slice(0, -body.length);
  const first = packet({ from: 'server', seq: 5000, ack: 1000 + REQ.length, data: head });
  assert.ok(m.packet(first, 2), 'the real head is marked');
  let seq = 5000 + head.length;
  for (let i = 0; i < 3; i++, seq += fake.length) {
    assert.is(
      m.packet(packet({ from: 'server', seq, ack: 1000 + REQ.length, data: fake }), 3),
      null,
      `segment ${i} passes`,
    );
  }
  // without a request to anchor on, nothing is touched at all
  const cold = new Marker();
  cold.addPort(PORT, 0);
  assert.is(cold.packet(packet({ from: 'server', seq: 5000, ack: 1000, data: answer('v1') }), 1), null);
});

test('pipelining is never touched: two requests in one packet, or a second one before the first is answered', () => {
  const two = requested(new Marker(), false, REQ + REQ);
  assert.is(two.packet(packet({ from: 'server', seq: 5000, ack: 1000 + 2 * REQ.length, data: answer('v1') }), 2), null);
  assert.is(two.stats(PORT)!.untouched.pipelined, 1);
  const m = requested();
  m.packet(packet({ from: 'client', seq: 1000 + REQ.length, ack: 5000, data: REQ }), 2);
  assert.is(m.packet(packet({ from: 'server', seq: 5000, ack: 1000 + 2 * REQ.length, data: answer('v1') }), 3), null);
  assert.is(m.stats(PORT)!.untouched.pipelined, 1);
});

test('a request body is followed to its end; a POST split over packets still anchors its answer', () => {
  const body = 'a'.repeat(30);
  const post = `POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: ${body.length}\r\n\r\n`;
  const m = new Marker();
  m.addPort(PORT, 0);
  m.packet(packet({ from: 'client', seq: 1000, ack: 5000, data: post }), 1);
  // the answer cannot start before the body is complete: an early one (an error) is left alone
  m.packet(packet({ from: 'client', seq: 1000 + post.length, ack: 5000, data: body }), 2);
  const out = m.packet(
    packet({ from: 'server', seq: 5000, ack: 1000 + post.length + body.length, data: answer('ok') }),
    3,
  );
  assert.ok(out, 'marked after the whole body');
  const chunked = new Marker();
  chunked.addPort(PORT, 0);
  chunked.packet(
    packet({
      from: 'client',
      seq: 1000,
      ack: 5000,
      data: 'POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n',
    }),
    1,
  );
  assert.is(
    chunked.packet(packet({ from: 'server', seq: 5000, ack: 2000, data: answer('ok') }), 2),
    null,
    'its end is not known',
  );
});

test('TLS, HTTP/2 and other protocols are left alone, and said so', () => {
  const cases: [string | Buffer, string][] = [
    [Buffer.from([0x16, 0x03, 0x01, 0x00, 0x50, 1, 2, 3]), 'tls'],
    [Buffer.from([0x17, 0x03, 0x03, 0x00, 0x50, 1, 2, 3]), 'tls'],
    ['PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n', 'http2'],
    ['\x00\x01binary', 'not-http'],
  ];
  for (const [data, why] of cases) {
    const m = new Marker();
    m.addPort(PORT, 0);
    m.packet(packet({ from: 'client', seq: 1000, ack: 5000, data }), 1);
    assert.is(m.packet(packet({ from: 'server', seq: 5000, ack: 2000, data: answer('v1') }), 2), null);
    assert.is(m.stats(PORT)!.untouched[why as 'tls'], 1, why);
  }
});

test('100 Continue: the final answer after it is the one marked', () => {
  const m = requested();
  const cont = 'HTTP/1.1 100 Continue\r\n\r\n';
  assert.is(m.packet(packet({ from: 'server', seq: 5000, ack: 1000 + REQ.length, data: cont }), 2), null);
  const out = m.packet(
    packet({ from: 'server', seq: 5000 + cont.length, ack: 1000 + REQ.length, data: answer('v1') }),
    3,
  );
  assert.ok(out && /Connection: +close/.test(payload(out)));
});

test('a packet the queue gave in part (truncated) is never rewritten', () => {
  const m = requested();
  const p = packet({ from: 'server', seq: 5000, ack: 1000 + REQ.length, data: answer('x'.repeat(500)) });
  assert.is(m.packet(p.subarray(0, 200), 2), null);
});

test('marks are paced: a burst of 8, then 50 a second; an answer passed over leaves its connection for the next', () => {
  const m = new Marker();
  m.addPort(PORT, 0);
  const marked = (cport: number, now: number, round = 0) => {
    const [cseq, sseq] = [1000 + round * 100, 5000 + round * 1000];
    m.packet(packet({ from: 'client', seq: cseq, ack: sseq, data: REQ, cport }), now);
    return m.packet(packet({ from: 'server', seq: sseq, ack: cseq + REQ.length, data: answer('v1'), cport }), now) !== null;
  };
  const first = Array.from({ length: 20 }, (_, k) => marked(41000 + k, 1000));
  assert.is(first.filter(Boolean).length, 8);
  // 100 ms later, 5 more tokens: the connections passed over are marked on their next answer
  const next = Array.from({ length: 20 }, (_, k) => k).filter((k) => !first[k]).map((k) => marked(41000 + k, 1100, 1));
  assert.is(next.filter(Boolean).length, 5);
  assert.is(m.stats(PORT)!.marked, 13);
});

test('quiet: a connection waiting for its answer is not; bare ACKs (TCP keep-alive probes) are no activity', () => {
  const m = requested();
  const remotes = [CLIENT];
  assert.not.ok(m.quiet(PORT, remotes, 1 + QUIET_MS * 3), 'a request waits for its answer');
  m.packet(packet({ from: 'server', seq: 5000, ack: 1000 + REQ.length, data: answer('v1') }), 10);
  assert.not.ok(m.quiet(PORT, remotes, 10 + QUIET_MS - 1));
  m.packet(
    packet({ from: 'client', seq: 1000 + REQ.length - 1, ack: 5000 + answer('v1').length, flags: 0x10 }),
    10 + QUIET_MS - 1,
  );
  assert.ok(m.quiet(PORT, remotes, 10 + QUIET_MS), 'the probe did not count');
  // a connection never seen has been quiet since marking began
  assert.not.ok(m.quiet(PORT, [{ addr: '::ffff:10.0.0.9', port: 1 }], QUIET_MS - 1));
  assert.ok(m.quiet(PORT, [{ addr: '::ffff:10.0.0.9', port: 1 }], QUIET_MS));
});

test('unmap: IPv4 clients of dual-stack sockets as procfs shows them', () => {
  assert.is(unmap('::ffff:ae7:2'), '10.231.0.2');
  assert.is(unmap('::ffff:10.231.0.2'), '10.231.0.2');
  assert.is(unmap('fd31::2'), 'fd31::2');
  assert.is(parseSegment(packet({ v6: true, from: 'client', seq: 1, ack: 1 }))!.src, 'fd00::2');
});

test.run();
