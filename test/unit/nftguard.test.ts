// nftables guard: which native chains drop by default, and the nft script that keeps portflip's accept in them.

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { guardComment, guardRules, guardScript, parseRuleset } from '../../src/os/nftguard.js';

// `nft -j list ruleset` of: inet filter input (policy drop, with portflip's rule), ip fw inp (policy accept,
// ending in a bare drop), and iptables-nft's own ip filter INPUT (policy drop), which the filter chain covers
const RULESET =
  '{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"table": {"family": "inet", "name": "filter", "handle": 1}}, {"chain": {"family": "inet", "table": "filter", "name": "input", "handle": 1, "type": "filter", "hook": "input", "prio": 0, "policy": "drop"}}, {"chain": {"family": "inet", "table": "filter", "name": "output", "handle": 2, "type": "filter", "hook": "output", "prio": 0, "policy": "accept"}}, {"rule": {"family": "inet", "table": "filter", "chain": "input", "handle": 5, "comment": "portflip:web 80 any", "expr": [{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}}, {"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}}, {"match": {"op": "==", "left": {"ct": {"key": "proto-dst", "dir": "original"}}, "right": 80}}, {"accept": null}]}}, {"rule": {"family": "inet", "table": "filter", "chain": "input", "handle": 3, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iif"}}, "right": "lo"}}, {"accept": null}]}}, {"rule": {"family": "inet", "table": "filter", "chain": "input", "handle": 4, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 80}}, {"accept": null}]}}, {"table": {"family": "ip", "name": "fw", "handle": 2}}, {"chain": {"family": "ip", "table": "fw", "name": "inp", "handle": 1, "type": "filter", "hook": "input", "prio": 0, "policy": "accept"}}, {"rule": {"family": "ip", "table": "fw", "chain": "inp", "handle": 2, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 22}}, {"accept": null}]}}, {"rule": {"family": "ip", "table": "fw", "chain": "inp", "handle": 3, "expr": [{"drop": null}]}}, {"table": {"family": "ip", "name": "filter", "handle": 3}}, {"chain": {"family": "ip", "table": "filter", "name": "INPUT", "handle": 1, "type": "filter", "hook": "input", "prio": 0, "policy": "drop"}}]}';

const any = { exposePorts: false, allowFrom: [] as string[] };

test('default-deny input chains are found, iptables-nft tables and accepting chains are not', () => {
  const chains = parseRuleset(RULESET);
  assert.equal(
    chains.map((c) => `${c.family} ${c.table} ${c.chain}`),
    ['inet filter input', 'ip fw inp'],
  );
  assert.equal(chains[0].ours, [{ handle: 5, comment: 'portflip:web 80 any' }]);
  assert.equal(parseRuleset('not json'), []);
});

test('the guard script inserts what is missing, removes what is stale, and nothing when all is right', () => {
  const chains = parseRuleset(RULESET);
  assert.is(guardComment('web', 80, any), 'portflip:web 80 any');
  const script = guardScript(chains, 'web', { listen: 80, fw: any })!;
  assert.is(
    script,
    'insert rule ip fw inp meta l4proto tcp ct status dnat ct original proto-dst 80 accept comment "portflip:web 80 any"\n',
  );
  const moved = guardScript(chains, 'web', { listen: 8080, fw: any })!;
  assert.ok(moved.includes('delete rule inet filter input handle 5'));
  assert.ok(moved.includes('proto-dst 8080 accept comment "portflip:web 8080 any"'));
  const gone = guardScript(chains, 'web', null)!;
  assert.is(gone, 'delete rule inet filter input handle 5\n');
  assert.is(guardScript(chains, 'api', null), null, 'another app has nothing here');
});

test('--allow-from: this host, then one rule per source family the table can hold', () => {
  const fw = { exposePorts: false, allowFrom: ['192.0.2.0/24', '2001:db8::/32'] };
  const [inet, ip] = parseRuleset(RULESET);
  assert.equal(guardRules(inet, 80, fw), [
    'iif "lo" meta l4proto tcp ct status dnat ct original proto-dst 80 accept',
    'ip saddr { 192.0.2.0/24 } meta l4proto tcp ct status dnat ct original proto-dst 80 accept',
    'ip6 saddr { 2001:db8::/32 } meta l4proto tcp ct status dnat ct original proto-dst 80 accept',
  ]);
  assert.is(guardRules(ip, 80, fw).length, 2, 'an ip table takes no IPv6 source');
});

test.run();
