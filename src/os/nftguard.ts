// The only module that speaks nft: portflip's accept rule at the top of native nftables input chains that drop.
//
// A packet passes the input hook only if every base chain there accepts it, so the accept in
// portflip's own iptables filter chain cannot help against a hand-written `policy drop` ruleset
// (/etc/nftables.conf) that opens only the public port: after the REDIRECT it sees the instance
// port. portflip inserts one rule per app (more with --allow-from) at the top of each such chain,
// marked by its comment, and removes only rules that carry that comment. The rule does not change
// on a switch: it matches the connections portflip redirected from the public port.

import type { Sys } from './sys.js';
import { cidrFamily, type FirewallSpec } from './iptables.js';

/** A native base chain on the input hook that drops what it does not accept. */
export interface DenyChain {
  family: string; // nft family: inet, ip or ip6
  table: string;
  chain: string;
  ours: { handle: number; comment: string }[]; // portflip's rules in it, any app
}

export const GUARD_PREFIX = 'portflip:';

/** The comment that names an app's guard and everything it depends on, so a stale one is seen as such. */
export function guardComment(app: string, listen: number, fw: FirewallSpec): string {
  return `${GUARD_PREFIX}${app} ${listen} ${fw.allowFrom.join(',') || 'any'}`;
}

const commentApp = (comment: string) => comment.slice(GUARD_PREFIX.length).split(' ')[0];

// iptables-nft keeps its rules in tables of these names with upper-case built-in chains; portflip's
// own filter chain already covers those
const IPTABLES_TABLES = new Set(['filter', 'nat', 'mangle', 'raw', 'security']);

/** Reads `nft -j list ruleset`: the default-deny input chains iptables does not manage. */
export function parseRuleset(json: string): DenyChain[] {
  let items: Record<string, any>[];
  try {
    items = JSON.parse(json).nftables ?? [];
  } catch {
    return [];
  }
  const key = (o: { family: string; table: string; name?: string; chain?: string }) =>
    `${o.family} ${o.table} ${o.name ?? o.chain}`;
  const chains = new Map<string, DenyChain & { deny: boolean }>();
  for (const { chain: c } of items.filter((i) => i.chain)) {
    if (c.hook !== 'input' || c.type !== 'filter' || !['inet', 'ip', 'ip6'].includes(c.family)) continue;
    if (c.family !== 'inet' && IPTABLES_TABLES.has(c.table) && c.name === c.name.toUpperCase()) continue;
    chains.set(key(c), { family: c.family, table: c.table, chain: c.name, ours: [], deny: c.policy === 'drop' });
  }
  for (const { rule: r } of items.filter((i) => i.rule)) {
    const c = chains.get(key(r));
    if (!c) continue;
    if (typeof r.comment === 'string' && r.comment.startsWith(GUARD_PREFIX))
      c.ours.push({ handle: r.handle, comment: r.comment });
    // a final unconditional drop or reject makes a chain default-deny even with policy accept
    const expr = (r.expr ?? []) as Record<string, unknown>[];
    if (!expr.some((e) => 'match' in e) && expr.some((e) => 'drop' in e || 'reject' in e)) c.deny = true;
  }
  return [...chains.values()].filter((c) => c.deny || c.ours.length).map(({ deny: _, ...c }) => c);
}

/** The rules an app's guard consists of in one chain, as `nft` statements after the chain name. */
export function guardRules(chain: DenyChain, listen: number, fw: FirewallSpec): string[] {
  const redirected = `meta l4proto tcp ct status dnat ct original proto-dst ${listen}`;
  if (!fw.allowFrom.length) return [`${redirected} accept`];
  const rules = [`iif "lo" ${redirected} accept`];
  for (const [family, word] of [
    ['ipv4', 'ip'],
    ['ipv6', 'ip6'],
  ] as const) {
    const nets = fw.allowFrom.filter((c) => cidrFamily(c) === family);
    const fits = chain.family === 'inet' || chain.family === word;
    if (nets.length && fits) rules.push(`${word} saddr { ${nets.join(', ')} } ${redirected} accept`);
  }
  return rules;
}

/**
 * The `nft -f` script that makes every deny chain hold exactly the app's wanted guard (none when
 * `want` is null), or null when they already do. Stale rules of the app go by handle.
 */
export function guardScript(
  chains: DenyChain[],
  app: string,
  want: { listen: number; fw: FirewallSpec } | null,
): string | null {
  const lines: string[] = [];
  for (const c of chains) {
    const mine = c.ours.filter((r) => commentApp(r.comment) === app);
    const rules = want ? guardRules(c, want.listen, want.fw) : [];
    const comment = want ? guardComment(app, want.listen, want.fw) : '';
    const current = mine.length === rules.length && mine.every((r) => r.comment === comment);
    if (current) continue;
    for (const r of mine) lines.push(`delete rule ${c.family} ${c.table} ${c.chain} handle ${r.handle}`);
    // insert puts each at the top, so insert in reverse to keep their order
    for (const r of [...rules].reverse())
      lines.push(`insert rule ${c.family} ${c.table} ${c.chain} ${r} comment "${comment}"`);
  }
  return lines.length ? lines.join('\n') + '\n' : null;
}

/** The executor: nft where it is installed; where it is not, there are no native chains to guard. */
export class NftGuard {
  constructor(
    private sys: Sys,
    private nft: string | null,
  ) {}

  async chains(): Promise<DenyChain[]> {
    if (!this.nft) return [];
    const r = await this.sys.run(this.nft, ['-j', 'list', 'ruleset']);
    return r.code === 0 ? parseRuleset(r.stdout) : [];
  }

  async apply(script: string): Promise<string | null> {
    const r = await this.sys.run(this.nft!, ['-f', '-'], { input: script });
    return r.code === 0 ? null : r.stderr.trim().split('\n')[0] || `nft exited ${r.code}`;
  }
}
