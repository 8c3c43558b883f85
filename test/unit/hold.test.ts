// Hold pieces as pure functions: the mangle rule text, and nfnetlink_queue messages byte by byte.

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { appText, checkApp, cleanupText, holdRule, parseSave, removeAppText, type AppSpec } from '../../src/os/iptables.js';
import {
  batchVerdictMessage,
  bindMessage,
  paramsMessage,
  parseMessages,
  parseQueueStats,
  unbindMessage,
} from '../../src/os/nfqueue.js';
import { queueFor } from '../../src/commands/hold.js';

const spec = (o: Partial<AppSpec> = {}): AppSpec => ({
  app: 'web',
  listen: 80,
  target: 8001,
  open: [8001],
  firewall: null,
  ...o,
});
const NAT = [
  '*nat',
  ':PREROUTING ACCEPT [0:0]',
  ':OUTPUT ACCEPT [0:0]',
  ':PORTFLIP - [0:0]',
  ':PF-web - [0:0]',
  '-A PREROUTING -m addrtype --dst-type LOCAL -j PORTFLIP',
  '-A OUTPUT -m addrtype --dst-type LOCAL -j PORTFLIP',
  '-A PORTFLIP -p tcp -m tcp --dport 80 -j PF-web',
  '-A PF-web -p tcp -j REDIRECT --to-ports 8001',
  'COMMIT',
];
const FOREIGN_MANGLE = [
  '*mangle',
  ':PREROUTING ACCEPT [0:0]',
  ':OUTPUT ACCEPT [0:0]',
  '-A PREROUTING -p udp -j MARK --set-xmark 0x1/0xffffffff',
];
const held = (extra: string[] = []) =>
  parseSave(
    [
      ...NAT,
      ...FOREIGN_MANGLE,
      ':PORTFLIP - [0:0]',
      ':PF-web - [0:0]',
      '-A PREROUTING -m addrtype --dst-type LOCAL -j PORTFLIP',
      '-A OUTPUT -m addrtype --dst-type LOCAL -j PORTFLIP',
      '-A PORTFLIP -p tcp -m tcp --dport 80 -j PF-web',
      holdRule('web', 31234),
      ...extra,
      'COMMIT',
    ].join('\n'),
  );

test('the hold rule queues new-connection SYNs only, and lets them pass when no one reads the queue', () => {
  assert.is(
    holdRule('web', 31234),
    '-A PF-web -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -m conntrack --ctstate NEW -j NFQUEUE --queue-num 31234 --queue-bypass',
  );
});

test('starting a hold adds the mangle chain only, and leaves foreign mangle rules alone', () => {
  const view = parseSave([...NAT, ...FOREIGN_MANGLE, 'COMMIT'].join('\n'));
  const text = appText(view, spec({ hold: 31234 }), 'ipv4');
  assert.is(
    text,
    [
      '*mangle',
      ':PORTFLIP - [0:0]',
      ':PF-web - [0:0]',
      '-A PREROUTING -m addrtype --dst-type LOCAL -j PORTFLIP',
      '-A OUTPUT -m addrtype --dst-type LOCAL -j PORTFLIP',
      '-A PORTFLIP -p tcp -m tcp --dport 80 -j PF-web',
      holdRule('web', 31234),
      'COMMIT',
      '',
    ].join('\n'),
  );
  assert.not.match(text!, /MARK/);
  assert.is(checkApp(view, spec({ hold: 31234 }), 'ipv4').mangle, 'missing');
});

test('a hold that is in place is left alone; one that should not be is removed, foreign rules kept', () => {
  assert.is(appText(held(), spec({ hold: 31234 }), 'ipv4'), null);
  assert.is(checkApp(held(), spec({ hold: 31234 }), 'ipv4').mangle, 'ok');
  const check = checkApp(held(), spec(), 'ipv4');
  assert.is(check.mangle, 'mismatch');
  assert.ok(check.missing.includes('mangle: hold in PF-web should be gone'));
  const text = appText(held(), spec({ hold: null }), 'ipv4')!;
  assert.is(
    text,
    [
      '*mangle',
      ':PF-web - [0:0]',
      '-D PORTFLIP -p tcp -m tcp --dport 80 -j PF-web',
      '-X PF-web',
      ':PORTFLIP - [0:0]',
      '-D PREROUTING -m addrtype --dst-type LOCAL -j PORTFLIP',
      '-D OUTPUT -m addrtype --dst-type LOCAL -j PORTFLIP',
      '-X PORTFLIP',
      'COMMIT',
      '',
    ].join('\n'),
  );
  assert.not.match(text, /nat|MARK/);
});

test('a changed queue number rewrites the app chain; stop and cleanup take the hold away too', () => {
  assert.match(
    appText(held(), spec({ hold: 31235 }), 'ipv4')!,
    /:PF-web - \[0:0\]\n-A PF-web .*--queue-num 31235 --queue-bypass\nCOMMIT/,
  );
  assert.is(checkApp(held(), spec({ hold: 31235 }), 'ipv4').mangle, 'mismatch');
  assert.match(removeAppText(held(), 'web')!, /\*mangle\n:PF-web - \[0:0\]\n-D PORTFLIP .*\n-X PF-web/);
  const clean = cleanupText(held())!;
  assert.match(clean, /\*mangle\n:PF-web - \[0:0\]/);
  assert.not.match(clean, /MARK/);
});

test('nfnetlink_queue config messages, byte by byte', () => {
  // nlmsghdr: len 28, type (3 << 8) | 2 = 0x0302, flags REQUEST|ACK, seq 7, pid 0; nfgenmsg: AF_UNSPEC, v0, queue BE
  assert.is(
    bindMessage(0x7a12, 7).toString('hex'),
    '1c000000' + '0203' + '0500' + '07000000' + '00000000' + '0000' + '7a12' + '0800' + '0100' + '01000000',
  );
  assert.is(unbindMessage(1, 1).subarray(24).toString('hex'), '02000000');
  const params = paramsMessage(5, 2, 8192);
  // params attr: len 9 (padded to 12), type 2, copy_range 0 (BE), mode META; then maxlen attr: len 8, type 3, 8192 BE
  assert.is(
    params.subarray(20).toString('hex'),
    '0900' + '0200' + '00000000' + '01' + '000000' + '0800' + '0300' + '00002000',
  );
  assert.is(params.readUInt32LE(0), params.length);
});

test('one batch verdict accepts every packet up to an id, without an ack', () => {
  const m = batchVerdictMessage(5, 9, 0x01020304);
  assert.is(m.readUInt16LE(4), 0x0303);
  assert.is(m.readUInt16LE(6), 1, 'NLM_F_REQUEST only');
  assert.is(m.subarray(20).toString('hex'), '0c00' + '0200' + '00000001' + '01020304');
});

test('packets, acks and errors are read out of one recv buffer', () => {
  const packet = Buffer.alloc(16 + 4 + 12 + 8);
  packet.writeUInt32LE(packet.length, 0);
  packet.writeUInt16LE(0x0300, 4); // NFQNL_MSG_PACKET
  packet.writeUInt16BE(31234, 18);
  packet.writeUInt16LE(11, 20); // NFQA_PACKET_HDR: id, hw protocol, hook (padded)
  packet.writeUInt16LE(1, 22);
  packet.writeUInt32BE(42, 24);
  packet.writeUInt16LE(8, 32); // NFQA_MARK
  packet.writeUInt16LE(3, 34);
  const ack = Buffer.alloc(36);
  ack.writeUInt32LE(36, 0);
  ack.writeUInt16LE(2, 4); // NLMSG_ERROR
  ack.writeInt32LE(-16, 16); // EBUSY
  ack.writeUInt32LE(77, 28); // the original header's seq
  assert.equal(parseMessages(Buffer.concat([packet, ack])), [
    { kind: 'packet', queue: 31234, id: 42 },
    { kind: 'error', seq: 77, errno: 16 },
  ]);
  assert.equal(parseMessages(Buffer.alloc(3)), []);
});

test('queue stats from /proc/net/netfilter/nfnetlink_queue', () => {
  const text = '31234  20628     3 1     0     5     2        9  1\n    7  1 0 2 65531 0 0 0 1\n';
  assert.equal(parseQueueStats(text), [
    { queue: 31234, portid: 20628, waiting: 3, dropped: 5, userDropped: 2 },
    { queue: 7, portid: 1, waiting: 0, dropped: 0, userDropped: 0 },
  ]);
});

test('queue numbers: stable per app, in 30000-39999, moved past taken ones', () => {
  const q = queueFor('web', new Set());
  assert.ok(q >= 30000 && q <= 39999);
  assert.is(queueFor('web', new Set()), q);
  assert.is.not(queueFor('api', new Set()), q);
  assert.is(queueFor('web', new Set([q])), q === 39999 ? 30000 : q + 1);
});

test.run();
