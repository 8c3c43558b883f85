// The only module that speaks iptables: pure rule builders and a parser, plus one small executor.
//
// Layout (iptables and ip6tables alike; nothing else is ever touched):
//   nat    -A PREROUTING -m addrtype --dst-type LOCAL -j PORTFLIP     traffic from other hosts
//          -A OUTPUT     -m addrtype --dst-type LOCAL -j PORTFLIP     clients on this host
//          -A PORTFLIP -p tcp -m tcp --dport LISTEN -j PF-APP         one jump per app
//          -A PF-APP -p tcp -j REDIRECT --to-ports PORT               the rule a switch replaces
//   canary: before it, in the same chain (canaryRules): a statistic rule (a share of new connections), or
//          an HMARK of the source address then mark-range rules (--canary-by ip), each REDIRECTing to the canary
//   filter -A INPUT -j PORTFLIP                                       first in INPUT, so default-deny sees
//          -A PORTFLIP -p tcp -j PF-APP                               nothing of ours
//          -A PF-APP -p tcp -m conntrack --ctstate DNAT --ctorigdstport LISTEN --ctreplsrcport PORT -j ACCEPT
//          -A PF-APP ! -i lo -p tcp -m tcp --dport PORT -j REJECT --reject-with tcp-reset   (private ports)
//
//   mangle (only while new connections are held: pause, or an in-place deploy)
//          -A PREROUTING/OUTPUT -m addrtype --dst-type LOCAL -j PORTFLIP  as in nat
//          -A PORTFLIP -p tcp -m tcp --dport LISTEN -j PF-APP
//          -A PF-APP -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -m conntrack --ctstate NEW
//             -j NFQUEUE --queue-num Q --queue-bypass
//
//   mangle (only while a draining instance's answers are marked Connection: close: drainmark.ts)
//          -I INPUT 1 -j PF-MARK-IN        client packets, after the redirect: to the instance port
//          -I OUTPUT 1 -j PF-MARK-OUT      the instance's packets, before the way back is rewritten
//          -A PF-MARK-IN -p tcp -m tcp --dport PORT -m comment --comment PF-APP -j NFQUEUE --queue-num Q --queue-bypass
//          -A PF-MARK-OUT -p tcp -m tcp --sport PORT -m comment --comment PF-APP -j NFQUEUE --queue-num Q --queue-bypass
//   Two chains shared by every app (a packet must be queued once: a local client's packets pass OUTPUT
//   and INPUT both), each rule tagged with its app's chain name; app names are lower case, so the
//   upper-case names cannot meet an app's chain.
//
// The filter chain exists because INPUT sees a redirected packet with the instance port, not the public
// one: a firewall that opens only the public port would drop every redirected connection. The mangle
// chain runs before nat PREROUTING/OUTPUT, so a SYN released after a switch follows the new redirect;
// --queue-bypass lets SYNs pass when no holder reads the queue (it died), so nothing is black-holed.

import { fail, PortflipError } from '../core/errors.js';
import { compressV6 } from './proc.js';
import { which, type Sys } from './sys.js';

export type Family = 'ipv4' | 'ipv6';
export type Backend = 'nft' | 'legacy' | 'default';
export type Table = 'nat' | 'filter' | 'mangle';

export const ROOT_CHAIN = 'PORTFLIP';
export const APP_PREFIX = 'PF-';
const NAT_HOOKS = ['PREROUTING', 'OUTPUT'] as const;
const MAX_CHAIN = 28; // iptables' limit on chain names

/** App names map one to one onto chain names; anything that would not is refused, never truncated. */
export function appChain(app: string): string {
  const max = MAX_CHAIN - APP_PREFIX.length;
  if (!new RegExp(`^[a-z0-9][a-z0-9_-]{0,${max - 1}}$`).test(app)) {
    fail(
      'usage',
      `app name "${app}" cannot name an iptables chain: use 1-${max} characters of a-z, 0-9, "-" or "_", starting with a letter or digit`,
    );
  }
  return APP_PREFIX + app;
}

export const hookRule = (hook: string) => `-A ${hook} -m addrtype --dst-type LOCAL -j ${ROOT_CHAIN}`;
export const jumpRule = (app: string, listen: number) =>
  `-A ${ROOT_CHAIN} -p tcp -m tcp --dport ${listen} -j ${appChain(app)}`;
export const redirectRule = (app: string, port: number) => `-A ${appChain(app)} -p tcp -j REDIRECT --to-ports ${port}`;
export const FILTER_HOOK = `-A INPUT -j ${ROOT_CHAIN}`;
export const filterJumpRule = (app: string) => `-A ${ROOT_CHAIN} -p tcp -j ${appChain(app)}`;
/** New connections only (a SYN conntrack has not seen): open connections keep flowing during a hold. */
export const holdRule = (app: string, queue: number) =>
  `-A ${appChain(app)} -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -m conntrack --ctstate NEW ` +
  `-j NFQUEUE --queue-num ${queue} --queue-bypass`;

export const MARK_IN = 'PF-MARK-IN';
export const MARK_OUT = 'PF-MARK-OUT';
const MARK_HOOKS = [`-A INPUT -j ${MARK_IN}`, `-A OUTPUT -j ${MARK_OUT}`];

/** A draining instance port whose packets go through a queue for marking. */
export interface MarkSpec {
  port: number;
  queue: number;
}

/** Both directions of one draining instance port, to the queue that marks its answers. */
export function markRules(app: string, m: MarkSpec): string[] {
  const tail = `-m comment --comment ${appChain(app)} -j NFQUEUE --queue-num ${m.queue} --queue-bypass`;
  return [
    `-A ${MARK_IN} -p tcp -m tcp --dport ${m.port} ${tail}`,
    `-A ${MARK_OUT} -p tcp -m tcp --sport ${m.port} ${tail}`,
  ];
}

const isMark = (r: string) => r.startsWith(`-A ${MARK_IN} `) || r.startsWith(`-A ${MARK_OUT} `);
const markOf = (app: string) => (r: string) => isMark(r) && r.includes(` --comment ${appChain(app)} `);

/** What portflip's filter chain for an app should say; null means portflip keeps out of the filter table. */
export interface FirewallSpec {
  exposePorts: boolean; // instance ports reachable straight from other hosts
  allowFrom: string[]; // canonical CIDRs; empty: redirected traffic from anywhere
}

/** Everything an app's rules depend on: what a switch, a repair or a removal renders. */
export interface AppSpec {
  app: string;
  listen: number;
  target: number | null; // the redirect's port; null: no redirect (no nat rules)
  open: number[]; // instance ports whose redirected connections the filter chain accepts; none: no filter rules
  firewall: FirewallSpec | null;
  hold?: number | null; // NFQUEUE number holding new connections; absent or null: no mangle rules
  mark?: MarkSpec[]; // draining ports being marked; absent or empty: none of the app's rules in PF-MARK-*
  canary?: CanarySpec | null; // a share of new connections goes here instead of to target
}

/** A canary split: `percent` of new connections (by: conn) or of client addresses (by: ip) go to `port`. */
export interface CanarySpec {
  port: number;
  percent: number; // whole percent, 1-99
  by: 'conn' | 'ip';
  rnd: number; // HMARK's hash seed (by: ip); kept for the canary's life so a client stays on its side
}

/**
 * The probability as iptables-save prints it: the kernel keeps it as a 31-bit fraction
 * (libxt_statistic: lround(p * 2^31)), printed with 11 decimals.
 */
export const probabilityText = (percent: number) => (Math.round((percent / 100) * 0x80000000) / 0x80000000).toFixed(11);

/**
 * [1, n] as value/mask blocks, the way a CIDR list covers an address range: `-m mark` matches value/mask
 * only, and HMARK marks 1-100, so "mark <= n" becomes at most a dozen rules. Mark 0 (unmarked) never matches.
 */
export function markBlocks(n: number): string[] {
  const out: string[] = [];
  let lo = 1;
  while (lo <= n) {
    let size = 1;
    while (lo % (size * 2) === 0 && lo + size * 2 - 1 <= n) size *= 2;
    const mask = (0xffffffff ^ (size - 1)) >>> 0;
    out.push(size === 1 ? `0x${lo.toString(16)}` : `0x${lo.toString(16)}/0x${mask.toString(16)}`);
    lo += size;
  }
  return out;
}

/**
 * The canary rules, before the app's REDIRECT, as iptables-save prints them. nat sees only the first
 * packet of a connection, so each decides once per connection. by ip: HMARK hashes the source
 * address alone (destination, ports and protocol masked out) into marks 1-100 (offset 1: mark 0 is
 * also what an unmarked packet has); marks 1..percent go to the canary. The mark is set on that
 * first packet only, in nat, so no later packet of the flow carries it.
 */
export function canaryRules(app: string, c: CanarySpec, family: Family): string[] {
  const chain = appChain(app);
  const to = `-j REDIRECT --to-ports ${c.port}`;
  if (c.by === 'conn')
    return [`-A ${chain} -p tcp -m statistic --mode random --probability ${probabilityText(c.percent)} ${to}`];
  const hmark =
    `-A ${chain} -p tcp -j HMARK --hmark-src-prefix ${family === 'ipv4' ? 32 : 128} --hmark-dst-prefix 0 ` +
    `--hmark-sport-mask 0x0000 --hmark-dport-mask 0x0000 --hmark-proto-mask 0x00 ` +
    `--hmark-rnd 0x${(c.rnd >>> 0).toString(16).padStart(8, '0')} --hmark-mod 100 --hmark-offset 1`;
  return [hmark, ...markBlocks(c.percent).map((m) => `-A ${chain} -p tcp -m mark --mark ${m} ${to}`)];
}

/** Rule lines of the app's nat chain for one family: the canary split, if any, then the redirect. */
export function natRules(spec: AppSpec, family: Family): string[] {
  if (spec.target === null) return [];
  return [...(spec.canary ? canaryRules(spec.app, spec.canary, family) : []), redirectRule(spec.app, spec.target)];
}

/** Rule lines (as iptables-save prints them) of the app's filter chain for one family. */
export function filterRules(spec: AppSpec, family: Family): string[] {
  if (!spec.firewall) return [];
  const chain = appChain(spec.app);
  const redirected = (port: number) =>
    `-p tcp -m conntrack --ctstate DNAT --ctorigdstport ${spec.listen} --ctreplsrcport ${port}`;
  const ports = [...new Set(spec.open)].sort((a, b) => a - b);
  const lines: string[] = [];
  const sources = spec.firewall.allowFrom.filter((c) => cidrFamily(c) === family);
  if (!spec.firewall.allowFrom.length) {
    for (const p of ports) lines.push(`-A ${chain} ${redirected(p)} -j ACCEPT`);
  } else {
    // clients on this host always pass; other sources only from the allowed networks
    for (const p of ports) lines.push(`-A ${chain} -i lo ${redirected(p)} -j ACCEPT`);
    for (const src of sources) for (const p of ports) lines.push(`-A ${chain} -s ${src} ${redirected(p)} -j ACCEPT`);
    lines.push(`-A ${chain} -p tcp -m conntrack --ctstate DNAT --ctorigdstport ${spec.listen} -j DROP`);
  }
  if (!spec.firewall.exposePorts) {
    for (const p of ports)
      lines.push(`-A ${chain} ! -i lo -p tcp -m tcp --dport ${p} -j REJECT --reject-with tcp-reset`);
  }
  return lines;
}

// ---- CIDRs, in the form iptables-save prints them -------------------------------------------

export const cidrFamily = (cidr: string): Family => (cidr.includes(':') ? 'ipv6' : 'ipv4');

/** "10.1.2.3/8" -> "10.0.0.0/8", "fd00::1" -> "fd00::1/128"; null when it is not an address or network. */
export function canonicalCidr(text: string): string | null {
  const m = /^([^/]+)(?:\/(\d{1,3}))?$/.exec(text.trim());
  if (!m) return null;
  if (m[1].includes(':')) {
    const groups = parseV6(m[1]);
    const bits = m[2] === undefined ? 128 : Number(m[2]);
    if (!groups || bits > 128) return null;
    const masked = groups.map((g, i) => g & maskBits(bits - i * 16, 16));
    return `${compressV6(masked)}/${bits}`;
  }
  const parts = m[1].split('.');
  if (parts.length !== 4 || parts.some((p) => !/^\d{1,3}$/.test(p) || Number(p) > 255)) return null;
  const bits = m[2] === undefined ? 32 : Number(m[2]);
  if (bits > 32) return null;
  return `${parts.map((p, i) => Number(p) & maskBits(bits - i * 8, 8)).join('.')}/${bits}`;
}

const maskBits = (bits: number, width: number) =>
  bits >= width ? (1 << width) - 1 : bits <= 0 ? 0 : ((1 << width) - 1) ^ ((1 << (width - bits)) - 1);

function parseV6(text: string): number[] | null {
  const halves = text.split('::');
  if (halves.length > 2) return null;
  const part = (s: string) => (s ? s.split(':') : []);
  const [head, tail] = [part(halves[0]), part(halves[1] ?? '')];
  const fill = halves.length === 2 ? 8 - head.length - tail.length : 0;
  if (fill < 0 || (halves.length === 1 && head.length !== 8)) return null;
  const all = [...head, ...Array(fill).fill('0'), ...tail];
  if (all.length !== 8 || all.some((g) => !/^[0-9a-fA-F]{1,4}$/.test(g))) return null;
  return all.map((g) => parseInt(g, 16));
}

// ---- reading what is live -------------------------------------------------------------------

export interface TableView {
  chains: Set<string>;
  policies: Map<string, string>; // built-in chain -> ACCEPT/DROP
  rules: string[]; // every "-A" line, as printed
}

/** What iptables-save says of the nat and filter tables, reduced to what portflip needs. */
export interface RulesView {
  nat: TableView;
  filter: TableView;
  mangle: TableView;
}

const emptyTable = (): TableView => ({ chains: new Set(), policies: new Map(), rules: [] });

export function parseSave(text: string): RulesView {
  const view: RulesView = { nat: emptyTable(), filter: emptyTable(), mangle: emptyTable() };
  const tables: Record<string, TableView> = { '*nat': view.nat, '*filter': view.filter, '*mangle': view.mangle };
  let table: TableView | null = null;
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (line.startsWith('*')) table = tables[line] ?? null;
    else if (!table) continue;
    else if (line.startsWith(':')) {
      const [name, policy] = line.slice(1).split(/\s+/);
      table.chains.add(name);
      if (policy && policy !== '-') table.policies.set(name, policy);
    } else if (line.startsWith('-A ')) table.rules.push(line.replace(/\s+/g, ' '));
  }
  return view;
}

const rulesIn = (t: TableView, chain: string) => t.rules.filter((r) => r.startsWith(`-A ${chain} `));
const asDelete = (rule: string) => rule.replace(/^-A /, '-D ');

export interface AppRules {
  jumps: number[]; // listen ports that jump to the app chain
  target: number | null; // where the rest goes: a first plain redirect, or the last one after a canary split
  shadowed: number; // rules below a first plain redirect, never reached: a switch's, until the next commit tidies them
  canary?: number; // the port a canary rule before the redirect sends a share to
  hooked: boolean; // both hooks jump to the root chain
}

export function appRules(view: RulesView, app: string): AppRules {
  const chain = appChain(app);
  const jumps = rulesIn(view.nat, ROOT_CHAIN)
    .filter((r) => r.endsWith(` -j ${chain}`))
    .map((r) => Number(/--dport (\d+)/.exec(r)?.[1] ?? NaN));
  const rules = rulesIn(view.nat, chain);
  const plain = /^-A \S+ -p tcp -j REDIRECT --to-ports (\d+)$/;
  const hooked = NAT_HOOKS.every((h) => view.nat.rules.includes(hookRule(h)));
  // a plain redirect first takes every connection: anything below it is a switch's leftover
  const first = plain.exec(rules[0] ?? '');
  if (first) return { jumps, target: Number(first[1]), shadowed: rules.length - 1, hooked };
  // a canary split: its rules, then the one unconditional redirect, last
  const last = plain.exec(rules.at(-1) ?? '');
  const target = last && rules.filter((r) => plain.test(r)).length === 1 ? Number(last[1]) : null;
  const split = rules
    .slice(0, -1)
    .map((r) => /--to-ports (\d+)/.exec(r)?.[1])
    .find(Boolean);
  return { jumps, target, shadowed: 0, ...(target !== null && split ? { canary: Number(split) } : {}), hooked };
}

/** Rules outside portflip's own chains and hooks that jump to one of its chains: they keep it from being deleted. */
export function foreignJumps(t: TableView, chain: string): string[] {
  return t.rules.filter(
    (r) => r.endsWith(` -j ${chain}`) && !r.startsWith(`-A ${ROOT_CHAIN} `) && !MARK_HOOKS.includes(r),
  );
}

export type Verdict = 'ok' | 'missing' | 'mismatch';

export interface AppCheck {
  nat: Verdict;
  filter: Verdict;
  mangle: Verdict; // the hold (the marking has its own commits: markText)
  missing: string[]; // what differs, for people: "filter: PF-web rules (accept 8002)"
  tidy: boolean; // the redirect is right, with shadowed rules below it to remove in the next commit
}

/** Do the live rules of one family say what the spec says? */
export function checkApp(view: RulesView, spec: AppSpec, family: Family): AppCheck {
  const chain = appChain(spec.app);
  const missing: string[] = [];
  const live = appRules(view, spec.app);
  let nat: Verdict = 'ok';
  if (spec.target === null) {
    if (view.nat.chains.has(chain) || live.jumps.length)
      [nat] = ['mismatch', missing.push(`nat: ${chain} should be gone`)];
  } else {
    if (!live.hooked) missing.push('nat: PREROUTING/OUTPUT hooks');
    if (!view.nat.chains.has(chain)) missing.push(`nat: chain ${chain}`);
    if (!live.jumps.length) missing.push(`nat: jump for port ${spec.listen}`);
    if (missing.length) nat = 'missing';
    else if (
      live.target !== spec.target ||
      live.jumps.join() !== String(spec.listen) ||
      // a split is exactly its rules; a plain redirect is right when it comes first (shadowed rules below it are tidied)
      (spec.canary
        ? rulesIn(view.nat, chain).join('\n') !== natRules(spec, family).join('\n')
        : rulesIn(view.nat, chain)[0] !== redirectRule(spec.app, spec.target))
    ) {
      nat = 'mismatch';
      const c = spec.canary;
      if (live.target !== spec.target)
        missing.push(`nat: redirect to ${spec.target} (it is ${live.target ?? 'absent'})`);
      else if (live.jumps.join() !== String(spec.listen))
        missing.push(`nat: public port ${spec.listen} (it is ${live.jumps.join(',')})`);
      else if (c) missing.push(`nat: canary ${c.percent}% by ${c.by} to ${c.port}`);
      else missing.push(`nat: ${chain} should only redirect to ${spec.target}`);
    }
  }
  let filter: Verdict = 'ok';
  const want = filterRules(spec, family);
  const has = view.filter.chains.has(chain);
  if (!spec.firewall || !spec.open.length) {
    if (has || rulesIn(view.filter, ROOT_CHAIN).includes(filterJumpRule(spec.app))) {
      filter = 'mismatch';
      missing.push(`filter: ${chain} should be gone`);
    }
  } else {
    const lacks = [
      ...(view.filter.rules.includes(FILTER_HOOK) ? [] : ['filter: INPUT hook']),
      ...(has ? [] : [`filter: chain ${chain}`]),
      ...(view.filter.rules.includes(filterJumpRule(spec.app)) ? [] : [`filter: jump to ${chain}`]),
    ];
    missing.push(...lacks);
    if (lacks.length) filter = 'missing';
    else if (rulesIn(view.filter, chain).join('\n') !== want.join('\n')) {
      filter = 'mismatch';
      missing.push(`filter: ${chain} should accept ${spec.open.join(',') || 'nothing'}`);
    }
  }
  const mangle = checkHold(view.mangle, spec, missing);
  return {
    nat,
    filter,
    mangle,
    missing,
    tidy: nat === 'ok' && spec.target !== null && !spec.canary && live.shadowed > 0,
  };
}

/** The mangle chain: the hold rule while new connections are held, nothing otherwise. */
function checkHold(t: TableView, spec: AppSpec, missing: string[]): Verdict {
  const chain = appChain(spec.app);
  const jumps = rulesIn(t, ROOT_CHAIN).filter((r) => r.endsWith(` -j ${chain}`));
  if (spec.hold === undefined || spec.hold === null) {
    if (!t.chains.has(chain) && !jumps.length) return 'ok';
    missing.push(`mangle: hold in ${chain} should be gone`);
    return 'mismatch';
  }
  const lacks = [
    ...(NAT_HOOKS.every((h) => t.rules.includes(hookRule(h))) ? [] : ['mangle: PREROUTING/OUTPUT hooks']),
    ...(t.chains.has(chain) ? [] : [`mangle: chain ${chain}`]),
    ...(jumps.join('\n') === jumpRule(spec.app, spec.listen) ? [] : [`mangle: jump for port ${spec.listen}`]),
  ];
  missing.push(...lacks);
  if (lacks.length) return 'missing';
  if (rulesIn(t, chain).join('\n') === holdRule(spec.app, spec.hold)) return 'ok';
  missing.push(`mangle: hold new connections in queue ${spec.hold}`);
  return 'mismatch';
}

/**
 * Would the filter table drop a connection redirected to `port`? INPUT drops what it does not accept
 * (policy DROP, or a final rule that drops or rejects everything) and no rule accepts DNATed traffic,
 * the instance port, or everything. A heuristic for a warning: it reads rules, it does not run them.
 */
export function wouldDrop(t: TableView, port: number): boolean {
  const input = rulesIn(t, 'INPUT');
  const denies = t.policies.get('INPUT') === 'DROP' || input.some((r) => /^-A INPUT -j (DROP|REJECT)( |$)/.test(r));
  if (!denies) return false;
  const accepts = (r: string) => / -j ACCEPT$/.test(r);
  const opens = t.rules.some(
    (r) =>
      accepts(r) &&
      (/ctstate \S*DNAT/.test(r) ||
        new RegExp(`--dports? (\\S*,)?${port}(,|:| |$)`).test(r) ||
        r === '-A INPUT -j ACCEPT'),
  );
  return !opens;
}

// ---- writing --------------------------------------------------------------------------------

/**
 * One iptables-restore --noflush text that makes one family say what the spec says, touching only
 * what differs. Declaring an existing chain in --noflush mode empties it, so the shared root chains
 * are declared only when missing. The filter table comes first when the app gains a port (the way
 * is open before the redirect points at it) and last when the app goes. `only`: one table, the other
 * left as it is (a hold still follows nat and filter commits). 'mangle' is the marking alone, which no other
 * commit touches: its chains are shared by every app, so their changes go one at a time (ops/retire.ts syncMarks).
 * Null: nothing to do.
 */
export function appText(view: RulesView, spec: AppSpec, family: Family, only?: Table): string | null {
  if (only === 'mangle') return markText(view, spec);
  const check = checkApp(view, spec, family);
  const nat =
    check.nat === 'ok' || only === 'filter'
      ? check.tidy && only !== 'filter'
        ? natEnsure(view, spec, family)
        : []
      : spec.target === null
        ? natRemoval(view, spec.app)
        : (natSwitch(view, spec) ?? natEnsure(view, spec, family));
  const filter =
    check.filter === 'ok' || only === 'nat'
      ? []
      : spec.firewall && spec.open.length
        ? (check.filter === 'mismatch' && filterOpen(view, spec, family)) || filterEnsure(view, spec, family)
        : filterRemoval(view, spec.app);
  const held = spec.hold !== undefined && spec.hold !== null;
  const mangle = check.mangle === 'ok' ? [] : held ? holdEnsure(view.mangle, spec) : removal(view.mangle, spec.app);
  const section = (table: Table, lines: string[]) => (lines.length ? [`*${table}`, ...lines, 'COMMIT'] : []);
  // a hold starts before anything else changes and ends after it (releasing is the holder's, not ours)
  const parts =
    spec.target === null
      ? [...section('nat', nat), ...section('filter', filter)]
      : [...section('filter', filter), ...section('nat', nat)];
  if (held) parts.unshift(...section('mangle', mangle));
  else parts.push(...section('mangle', mangle));
  return parts.length ? [...parts, ''].join('\n') : null;
}

/**
 * The switch proper, when only the target changes: the new redirect goes on top and the old one stays
 * below it, unreached, until the next commit for the app tidies it. Adding is the whole commit: a
 * commit that also deletes a rule waits for the kernel's RCU grace period when iptables closes its
 * netlink socket (measured: 10-14 ms), after the rules are already live.
 */
function natSwitch(view: RulesView, spec: AppSpec): string[] | null {
  const live = appRules(view, spec.app);
  const onlyTarget = live.hooked && live.jumps.join() === String(spec.listen) && live.target !== null;
  if (!onlyTarget || live.shadowed || live.canary !== undefined || spec.canary) return null;
  return [`-I ${appChain(spec.app)} 1 -p tcp -j REDIRECT --to-ports ${spec.target}`];
}

function natEnsure(view: RulesView, spec: AppSpec, family: Family): string[] {
  const chain = appChain(spec.app);
  const lines: string[] = [];
  if (!view.nat.chains.has(ROOT_CHAIN)) lines.push(`:${ROOT_CHAIN} - [0:0]`);
  lines.push(`:${chain} - [0:0]`);
  for (const h of NAT_HOOKS) if (!view.nat.rules.includes(hookRule(h))) lines.push(hookRule(h));
  const want = jumpRule(spec.app, spec.listen);
  for (const r of rulesIn(view.nat, ROOT_CHAIN)) if (r.endsWith(` -j ${chain}`) && r !== want) lines.push(asDelete(r));
  if (!view.nat.rules.includes(want)) lines.push(want);
  lines.push(...natRules(spec, family));
  return lines;
}

/** The commit that makes the app's marking rules say what the spec says; null: they do already. */
export function markText(view: RulesView, spec: AppSpec): string | null {
  const lines = markLines(view.mangle, spec);
  return lines.length ? ['*mangle', ...lines, 'COMMIT', ''].join('\n') : null;
}

/**
 * The app's marking rules as the spec wants them, touching only its own (other apps share the chains):
 * missing ones added, others deleted, and the chains with their hooks gone once no app marks.
 */
function markLines(t: TableView, spec: AppSpec): string[] {
  const want = (spec.mark ?? []).flatMap((m) => markRules(spec.app, m));
  const live = t.rules.filter(markOf(spec.app));
  const chains = [MARK_IN, MARK_OUT];
  const lines: string[] = [];
  if (want.length) {
    for (const c of chains) if (!t.chains.has(c)) lines.push(`:${c} - [0:0]`);
    // first in INPUT and OUTPUT: a foreign rule that ends the table's walk must not hide packets from the queue
    for (const h of MARK_HOOKS) if (!t.rules.includes(h)) lines.push(h.replace(/^-A (\w+) /, '-I $1 1 '));
  }
  lines.push(...live.filter((r) => !want.includes(r)).map(asDelete), ...want.filter((r) => !live.includes(r)));
  const others = t.rules.filter((r) => isMark(r) && !markOf(spec.app)(r));
  if (!want.length && !others.length && (live.length || chains.some((c) => t.chains.has(c)))) {
    lines.push(...MARK_HOOKS.filter((h) => t.rules.includes(h)).map(asDelete));
    for (const c of chains) if (t.chains.has(c) && !foreignJumps(t, c).length) lines.push(`-X ${c}`);
  }
  return lines;
}

function holdEnsure(t: TableView, spec: AppSpec): string[] {
  const chain = appChain(spec.app);
  const lines: string[] = [];
  if (!t.chains.has(ROOT_CHAIN)) lines.push(`:${ROOT_CHAIN} - [0:0]`);
  lines.push(`:${chain} - [0:0]`);
  for (const h of NAT_HOOKS) if (!t.rules.includes(hookRule(h))) lines.push(hookRule(h));
  const want = jumpRule(spec.app, spec.listen);
  for (const r of rulesIn(t, ROOT_CHAIN)) if (r.endsWith(` -j ${chain}`) && r !== want) lines.push(asDelete(r));
  if (!t.rules.includes(want)) lines.push(want);
  lines.push(holdRule(spec.app, spec.hold!));
  return lines;
}

/**
 * Opening a port, when the app's filter chain holds some of the wanted rules and nothing else, in the
 * wanted order: the missing ones go in where they belong and nothing is deleted (a delete makes the
 * commit wait for the kernel's RCU grace period, like the switch's). Null: the chain needs rewriting.
 */
function filterOpen(view: RulesView, spec: AppSpec, family: Family): string[] | null {
  const chain = appChain(spec.app);
  const live = rulesIn(view.filter, chain);
  const lines: string[] = [];
  let kept = 0; // live rules met so far, in the wanted order
  filterRules(spec, family).forEach((rule, k) => {
    if (live[kept] === rule) kept++;
    else if (kept === live.length)
      lines.push(rule); // after the last live rule: appended
    else lines.push(rule.replace(`-A ${chain} `, `-I ${chain} ${k + 1} `)); // rules 1..k are in place by now
  });
  return kept === live.length && lines.length ? lines : null;
}

function filterEnsure(view: RulesView, spec: AppSpec, family: Family): string[] {
  const chain = appChain(spec.app);
  const lines: string[] = [];
  if (!view.filter.chains.has(ROOT_CHAIN)) lines.push(`:${ROOT_CHAIN} - [0:0]`);
  lines.push(`:${chain} - [0:0]`);
  // first in INPUT: a default-deny rule before it would drop what portflip redirected
  if (!view.filter.rules.includes(FILTER_HOOK)) lines.push(`-I INPUT 1 -j ${ROOT_CHAIN}`);
  if (!view.filter.rules.includes(filterJumpRule(spec.app))) lines.push(filterJumpRule(spec.app));
  lines.push(...filterRules(spec, family));
  return lines;
}

/** Removes one app from a table; takes the root chain and hooks away too when no other app is left. */
function removal(t: TableView, app: string): string[] {
  const chain = appChain(app);
  const jumps = rulesIn(t, ROOT_CHAIN).filter((r) => r.endsWith(` -j ${chain}`));
  if (!t.chains.has(chain) && !jumps.length) return [];
  const others = rulesIn(t, ROOT_CHAIN).filter((r) => !r.endsWith(` -j ${chain}`));
  const lines: string[] = [];
  if (t.chains.has(chain)) lines.push(`:${chain} - [0:0]`);
  lines.push(...jumps.map(asDelete));
  // a foreign rule that still jumps here would make the delete fail: leave the chain empty instead
  if (t.chains.has(chain) && !foreignJumps(t, chain).length) lines.push(`-X ${chain}`);
  if (!others.length) lines.push(...rootRemoval(t));
  return lines;
}

const natRemoval = (view: RulesView, app: string) => removal(view.nat, app);
const filterRemoval = (view: RulesView, app: string) => removal(view.filter, app);

/** Removes one app's rules in both tables of one family (nat first: nothing is pointed at a closed port). */
export function removeAppText(view: RulesView, app: string): string | null {
  return appText(view, { app, listen: 0, target: null, open: [], firewall: null }, 'ipv4');
}

function rootRemoval(t: TableView): string[] {
  const lines = t.rules.filter((r) => / -j PORTFLIP$/.test(r) && !r.startsWith(`-A ${ROOT_CHAIN} `)).map(asDelete);
  if (t.chains.has(ROOT_CHAIN)) (lines.unshift(`:${ROOT_CHAIN} - [0:0]`), lines.push(`-X ${ROOT_CHAIN}`));
  return lines;
}

/** Every chain and rule portflip owns, gone, nat first; other rules stay as they are. */
export function cleanupText(view: RulesView): string | null {
  const sections: string[] = [];
  for (const table of ['nat', 'filter', 'mangle'] as const) {
    const t = view[table];
    const ours = [...t.chains].filter((c) => c.startsWith(APP_PREFIX));
    if (!ours.length && !t.chains.has(ROOT_CHAIN) && !t.rules.some((r) => r.endsWith(' -j PORTFLIP'))) continue;
    const kept = ours.filter((c) => foreignJumps(t, c).length);
    const lines = [`*${table}`, ...ours.map((c) => `:${c} - [0:0]`)];
    const root = rootRemoval(t);
    root.push(...MARK_HOOKS.filter((h) => t.rules.includes(h)).map(asDelete));
    // declarations first, then deletes
    lines.push(...root.filter((l) => l.startsWith(':')), ...root.filter((l) => l.startsWith('-D')));
    lines.push(
      ...ours.filter((c) => !kept.includes(c)).map((c) => `-X ${c}`),
      ...root.filter((l) => l.startsWith('-X')),
      'COMMIT',
    );
    sections.push(...lines);
  }
  return sections.length ? [...sections, ''].join('\n') : null;
}

// ---- the executor -------------------------------------------------------------------------

const tool = (family: Family, backend: Backend, what: 'save' | 'restore' | '') => {
  const base = family === 'ipv4' ? 'iptables' : 'ip6tables';
  const parts = [base, backend === 'default' ? '' : backend, what].filter(Boolean);
  return parts.join('-');
};

export class Iptables {
  constructor(
    private sys: Sys,
    readonly backend: Backend,
    readonly families: Family[],
  ) {}

  /** One read of both tables: one process per family, whatever else the host holds. */
  async save(family: Family): Promise<RulesView> {
    const cmd = tool(family, this.backend, 'save');
    const r = await this.sys.run(cmd, []);
    if (r.code !== 0) fail('noIptables', `${cmd} failed: ${firstLine(r.stderr)}`);
    return parseSave(r.stdout);
  }

  async restore(family: Family, text: string): Promise<void> {
    const cmd = tool(family, this.backend, 'restore');
    // -w: legacy iptables serialises writers with a lock; wait for it rather than fail (nft ignores it)
    const r = await this.sys.run(cmd, ['--noflush', '-w', '5'], { input: text });
    if (r.code !== 0) {
      const what = text
        .trim()
        .split('\n')
        .filter((l) => !l.startsWith('*') && l !== 'COMMIT')
        .slice(0, 3)
        .join('; ');
      throw new PortflipError(
        'rules',
        `${cmd} refused portflip's rules (${firstLine(r.stderr)}) while applying: ${what}`,
      );
    }
  }
}

const firstLine = (s: string) => s.trim().split('\n')[0] || 'no output';

const countRules = (text: string) => text.split('\n').filter((l) => l.startsWith('-A ')).length;

/**
 * The backend a state file recorded, without probing it: for reads that must be cheap (status). Where
 * it does not work the first save fails, and the caller says "unknown".
 */
export async function recordedBackend(sys: Sys, backend: Backend): Promise<Iptables> {
  const v6 = (await sys.readText('/proc/net/if_inet6')) !== null;
  return new Iptables(sys, backend, v6 ? ['ipv4', 'ipv6'] : ['ipv4']);
}

/**
 * Picks the backend the host already uses, as Kubernetes' wrapper does: the one holding portflip's
 * chain, else the one with rules in it, else nft. PORTFLIP_IPTABLES=nft|legacy forces it.
 */
export async function detectBackend(sys: Sys, forced?: string): Promise<Iptables> {
  const [hasNft, hasLegacy] = await Promise.all([
    which(sys, 'iptables-nft-restore'),
    which(sys, 'iptables-legacy-restore'),
  ]);
  let backend: Backend;
  if (forced === 'default') forced = undefined; // recorded for a host with one plain iptables
  if (forced) {
    if (forced !== 'nft' && forced !== 'legacy') fail('usage', `PORTFLIP_IPTABLES="${forced}": use nft or legacy`);
    if (!(forced === 'nft' ? hasNft : hasLegacy))
      fail('noIptables', `iptables-${forced}-restore not found; install iptables (apt-get install -y iptables)`);
    backend = forced as Backend;
  } else if (hasNft && hasLegacy) {
    const [nft, legacy] = await Promise.all([sys.run('iptables-nft-save', []), sys.run('iptables-legacy-save', [])]);
    const mine = (t: string) => t.includes(`:${ROOT_CHAIN} `);
    if (mine(legacy.stdout) && !mine(nft.stdout)) backend = 'legacy';
    else if (mine(nft.stdout)) backend = 'nft';
    else backend = countRules(legacy.stdout) > countRules(nft.stdout) ? 'legacy' : 'nft';
  } else if (hasNft || hasLegacy) {
    backend = hasNft ? 'nft' : 'legacy';
  } else if (await which(sys, 'iptables-restore')) {
    backend = 'default';
  } else {
    return fail('noIptables', 'iptables is not installed; install it (apt-get install -y iptables) and run again');
  }
  // Legacy iptables loads a table's module when it is named, so saving "-t nat" proves nat works for
  // that family. The nft backend has nothing to load: the probe would only show that the tool starts,
  // which the first real read shows too (a failure there is the same exit code), one process fewer.
  const probe = (f: Family) =>
    backend === 'nft' ? Promise.resolve({ code: 0, stderr: '' }) : sys.run(tool(f, backend, 'save'), ['-t', 'nat']);
  const probeV6 = async () =>
    (await sys.readText('/proc/net/if_inet6')) !== null &&
    (await which(sys, tool('ipv6', backend, 'restore'))) !== null &&
    (await probe('ipv6')).code === 0;
  const [v4, v6] = await Promise.all([probe('ipv4'), probeV6()]);
  if (v4.code !== 0)
    fail('noIptables', `iptables does not work here (${tool('ipv4', backend, 'save')}: ${firstLine(v4.stderr)})`);
  return new Iptables(sys, backend, v6 ? ['ipv4', 'ipv6'] : ['ipv4']);
}
