// Parsing of procfs: process stat lines, /proc/net/tcp{,6}, capabilities, and the bind check.

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { bindProblem, hasNetAdmin, listenersOn, openConnections, parseNetTcp, parseStat, pendingAccepts } from '../../src/os/proc.js';

test('parseStat survives spaces and parens in the command name', () => {
  const st = parseStat(
    '4242 (my (odd) app) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 100 18446744073709551615',
  )!;
  assert.equal(
    { pid: st.pid, state: st.state, ppid: st.ppid, pgid: st.pgid, startTime: st.startTime },
    { pid: 4242, state: 'S', ppid: 1, pgid: 4242, startTime: '987654' },
  );
});

const tcp = `  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F41 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1111 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F42 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2222 1 0000000000000000 100 0 0 10 0
   2: 0100007F:1F41 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 3333 1 0000000000000000 20 4 30 10 -1
   3: 0100007F:1F41 0100007F:D432 06 00000000:00000000 00:00000000 00000000     0        0 0 1 0000000000000000 20 4 30 10 -1
`;
const tcp6 = `  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1F43 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4444 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000001000000:1F44 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5555 1 0000000000000000 100 0 0 10 0
   2: 0000000000000000FFFF00000100007F:1F43 0000000000000000FFFF00000100007F:D433 01 00000000:00000000 00:00000000 00000000     0        0 6666 1 0000000000000000 20 4 30 10 -1
`;

test('parseNetTcp decodes addresses, ports and states', () => {
  const v4 = parseNetTcp(tcp, 'ipv4');
  assert.is(v4.length, 4);
  assert.equal([v4[0].localAddr, v4[0].localPort, v4[0].state, v4[0].inode], ['0.0.0.0', 8001, '0A', 1111]);
  assert.equal([v4[1].localAddr, v4[1].localPort], ['127.0.0.1', 8002]);
  assert.equal([v4[2].remoteAddr, v4[2].remotePort], ['127.0.0.1', 54321]);
  const v6 = parseNetTcp(tcp6, 'ipv6');
  assert.equal(
    v6.map((s) => s.localAddr),
    ['::', '::1', '::ffff:7f00:1'],
  );
});

test('open connections count established ones on the port, not listeners or TIME_WAIT', () => {
  const socks = [...parseNetTcp(tcp, 'ipv4'), ...parseNetTcp(tcp6, 'ipv6')];
  assert.is(openConnections(socks, 8001), 1);
  assert.is(openConnections(socks, 8003), 1);
  assert.is(openConnections(socks, 8002), 0);
  assert.is(listenersOn(socks, 8001).length, 1);
});

test('pending accepts: the accept queue of the listener plus handshakes in progress', () => {
  const text =
    tcp.replace(' 0A 00000000:00000000', ' 0A 00000000:00000003') +
    '   4: 0100007F:1F41 0100007F:D439 03 00000000:00000000 00:00000000 00000000     0        0 0 1 0000000000000000 20 4 30 10 -1\n';
  const socks = parseNetTcp(text, 'ipv4');
  assert.is(pendingAccepts(socks, 8001), 4);
  assert.is(pendingAccepts(socks, 8002), 0);
});

test('bind check: wildcard passes, loopback-only is refused with a fix', () => {
  const socks = [...parseNetTcp(tcp, 'ipv4'), ...parseNetTcp(tcp6, 'ipv6')];
  assert.is(bindProblem(listenersOn(socks, 8001), false, false), null);
  assert.match(bindProblem(listenersOn(socks, 8001), true, false)!, /bind to ::/);
  assert.match(bindProblem(listenersOn(socks, 8002), false, false)!, /127\.0\.0\.1 only.*bind to 0\.0\.0\.0/);
  assert.is(bindProblem(listenersOn(socks, 8003), true, false), null); // :: dual stack covers both
  assert.ok(bindProblem(listenersOn(socks, 8003), false, true)); // ... unless bindv6only
  assert.match(bindProblem(listenersOn(socks, 8004), false, false)!, /\[::1\] only/);
  assert.match(bindProblem([], false, false)!, /nowhere/);
});

test('CAP_NET_ADMIN is bit 12 of CapEff', () => {
  assert.ok(hasNetAdmin('Name:\tx\nCapEff:\t000001ffffffffff\n'));
  assert.ok(hasNetAdmin('CapEff:\t0000000000001000\n'));
  assert.not.ok(hasNetAdmin('CapEff:\t0000000000000000\n'));
  assert.not.ok(hasNetAdmin('CapEff:\t0000000000000fff\n'));
});

test.run();
