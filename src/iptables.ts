// The only module that speaks iptables: pure rule builders and a parser, plus one small executor.
//
// Layout (nat table, iptables and ip6tables alike; nothing else is ever touched):
//   -A PREROUTING -m addrtype --dst-type LOCAL -j PORTFLIP     traffic from other hosts
//   -A OUTPUT     -m addrtype --dst-type LOCAL -j PORTFLIP     clients on this host
//   -A PORTFLIP -p tcp -m tcp --dport LISTEN -j PF-APP         one jump per app
//   -A PF-APP -p tcp -j REDIRECT --to-ports PORT               the one rule a switch rewrites

import { fail } from './errors.js';
import { which, type Sys } from './sys.js';

export type Family = 'ipv4' | 'ipv6';
export type Backend = 'nft' | 'legacy' | 'default';

export const ROOT_CHAIN = 'PORTFLIP';
export const APP_PREFIX = 'PF-';
const HOOKS = ['PREROUTING', 'OUTPUT'] as const;
const MAX_CHAIN = 28; // iptables' limit on chain names

/** App names map one to one onto chain names; anything that would not is refused, never truncated. */
export function appChain(app: string): string {
  const max = MAX_CHAIN - APP_PREFIX.length;
  if (!new RegExp(`^[a-z0-9][a-z0-9_-]{0,${max - 1}}$`).test(app)) {
    fail('usage', `app name "${app}" cannot name an iptables chain: use 1-${max} characters of a-z, 0-9, "-" or "_", starting with a letter or digit`);
  }
  return APP_PREFIX + app;
}

export const hookRule = (hook: string) => `-A ${hook} -m addrtype --dst-type LOCAL -j ${ROOT_CHAIN}`;
export const jumpRule = (app: string, listen: number) => `-A ${ROOT_CHAIN} -p tcp -m tcp --dport ${listen} -j ${appChain(app)}`;
export const redirectRule = (app: string, port: number) => `-A ${appChain(app)} -p tcp -j REDIRECT --to-ports ${port}`;

/** What iptables-save says of the nat table, reduced to what portflip needs. */
export interface NatView {
  chains: Set<string>;
  rules: string[]; // every "-A" line, as printed
}

export function parseSave(text: string): NatView {
  const chains = new Set<string>();
  const rules: string[] = [];
  let inNat = false;
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (line.startsWith('*')) inNat = line === '*nat';
    else if (!inNat) continue;
    else if (line.startsWith(':')) chains.add(line.slice(1).split(/\s+/)[0]);
    else if (line.startsWith('-A ')) rules.push(line.replace(/\s+/g, ' '));
  }
  return { chains, rules };
}

const rulesIn = (view: NatView, chain: string) => view.rules.filter((r) => r.startsWith(`-A ${chain} `));
const asDelete = (rule: string) => rule.replace(/^-A /, '-D ');

export interface AppRules {
  jumps: number[]; // listen ports that jump to the app chain
  target: number | null; // the port the app chain redirects to
  hooked: boolean; // both hooks jump to the root chain
}

export function appRules(view: NatView, app: string): AppRules {
  const chain = appChain(app);
  const jumps = rulesIn(view, ROOT_CHAIN)
    .filter((r) => r.endsWith(` -j ${chain}`))
    .map((r) => Number(/--dport (\d+)/.exec(r)?.[1] ?? NaN));
  const redirects = rulesIn(view, chain).map((r) => /--to-ports (\d+)/.exec(r)?.[1]);
  const target = redirects.length === 1 && redirects[0] ? Number(redirects[0]) : null;
  const hooked = HOOKS.every((h) => view.rules.includes(hookRule(h)));
  return { jumps, target, hooked };
}

/** The switch: one transaction that redeclares (so empties) the app chain and adds its one rule. */
export function switchText(app: string, port: number): string {
  return ['*nat', `:${appChain(app)} - [0:0]`, redirectRule(app, port), 'COMMIT', ''].join('\n');
}

/**
 * Everything the app needs, added to what is live without disturbing it: declaring an existing
 * chain in --noflush mode empties it, so the shared root chain is declared only when missing.
 */
export function ensureText(view: NatView, app: string, listen: number, port: number): string {
  const chain = appChain(app);
  const lines = ['*nat'];
  if (!view.chains.has(ROOT_CHAIN)) lines.push(`:${ROOT_CHAIN} - [0:0]`);
  lines.push(`:${chain} - [0:0]`);
  for (const h of HOOKS) if (!view.rules.includes(hookRule(h))) lines.push(hookRule(h));
  const want = jumpRule(app, listen);
  for (const r of rulesIn(view, ROOT_CHAIN)) if (r.endsWith(` -j ${chain}`) && r !== want) lines.push(asDelete(r));
  if (!view.rules.includes(want)) lines.push(want);
  lines.push(redirectRule(app, port), 'COMMIT', '');
  return lines.join('\n');
}

/** Removes one app; takes the root chain and hooks away too when no other app is left. */
export function removeAppText(view: NatView, app: string): string | null {
  const chain = appChain(app);
  const jumps = rulesIn(view, ROOT_CHAIN).filter((r) => r.endsWith(` -j ${chain}`));
  if (!view.chains.has(chain) && !jumps.length) return null;
  const others = rulesIn(view, ROOT_CHAIN).filter((r) => !r.endsWith(` -j ${chain}`));
  const lines = ['*nat'];
  if (view.chains.has(chain)) lines.push(`:${chain} - [0:0]`);
  lines.push(...jumps.map(asDelete));
  if (view.chains.has(chain)) lines.push(`-X ${chain}`);
  if (!others.length) lines.push(...rootRemoval(view));
  lines.push('COMMIT', '');
  return lines.join('\n');
}

function rootRemoval(view: NatView): string[] {
  const lines = view.rules.filter((r) => / -j PORTFLIP$/.test(r) && !r.startsWith(`-A ${ROOT_CHAIN} `)).map(asDelete);
  if (view.chains.has(ROOT_CHAIN)) lines.unshift(`:${ROOT_CHAIN} - [0:0]`), lines.push(`-X ${ROOT_CHAIN}`);
  return lines;
}

/** Every chain and rule portflip owns, gone; other rules stay as they are. */
export function cleanupText(view: NatView): string | null {
  const ours = [...view.chains].filter((c) => c.startsWith(APP_PREFIX));
  if (!ours.length && !view.chains.has(ROOT_CHAIN) && !view.rules.some((r) => r.endsWith(' -j PORTFLIP'))) return null;
  const lines = ['*nat', ...ours.map((c) => `:${c} - [0:0]`)];
  const root = rootRemoval(view);
  // declarations first, then deletes
  lines.push(...root.filter((l) => l.startsWith(':')), ...root.filter((l) => l.startsWith('-D')));
  lines.push(...ours.map((c) => `-X ${c}`), ...root.filter((l) => l.startsWith('-X')), 'COMMIT', '');
  return lines.join('\n');
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

  async save(family: Family): Promise<NatView> {
    const cmd = tool(family, this.backend, 'save');
    const r = await this.sys.run(cmd, ['-t', 'nat']);
    if (r.code !== 0) fail('noIptables', `${cmd} -t nat failed: ${firstLine(r.stderr)}`);
    return parseSave(r.stdout);
  }

  async restore(family: Family, text: string): Promise<void> {
    const cmd = tool(family, this.backend, 'restore');
    // -w: legacy iptables serialises writers with a lock; wait for it rather than fail (nft ignores it)
    const r = await this.sys.run(cmd, ['--noflush', '-w', '5'], { input: text });
    if (r.code !== 0) throw new Error(`${cmd} --noflush failed: ${firstLine(r.stderr)}\n${text}`);
  }

  describe(): string {
    return `${tool('ipv4', this.backend, '')}${this.families.includes('ipv6') ? ` + ${tool('ipv6', this.backend, '')}` : ''}`;
  }
}

const firstLine = (s: string) => s.trim().split('\n')[0] || 'no output';


const countRules = (text: string) => text.split('\n').filter((l) => l.startsWith('-A ')).length;

/**
 * Picks the backend the host already uses, as Kubernetes' wrapper does: the one holding portflip's
 * chain, else the one with rules in it, else nft. PORTFLIP_IPTABLES=nft|legacy forces it.
 */
export async function detectBackend(sys: Sys, forced?: string): Promise<Iptables> {
  const hasNft = await which('iptables-nft-restore');
  const hasLegacy = await which('iptables-legacy-restore');
  let backend: Backend;
  if (forced === 'default') forced = undefined; // recorded for a host with one plain iptables
  if (forced) {
    if (forced !== 'nft' && forced !== 'legacy') fail('usage', `PORTFLIP_IPTABLES="${forced}": use nft or legacy`);
    if (!(forced === 'nft' ? hasNft : hasLegacy)) fail('noIptables', `iptables-${forced}-restore not found; install iptables (apt-get install -y iptables)`);
    backend = forced as Backend;
  } else if (hasNft && hasLegacy) {
    const [nft, legacy] = await Promise.all([
      sys.run('iptables-nft-save', []),
      sys.run('iptables-legacy-save', []),
    ]);
    const mine = (t: string) => t.includes(`:${ROOT_CHAIN} `);
    if (mine(legacy.stdout) && !mine(nft.stdout)) backend = 'legacy';
    else if (mine(nft.stdout)) backend = 'nft';
    else backend = countRules(legacy.stdout) > countRules(nft.stdout) ? 'legacy' : 'nft';
  } else if (hasNft || hasLegacy) {
    backend = hasNft ? 'nft' : 'legacy';
  } else if (await which('iptables-restore')) {
    backend = 'default';
  } else {
    return fail('noIptables', 'iptables is not installed; install it (apt-get install -y iptables) and run again');
  }
  const probe = await sys.run(tool('ipv4', backend, 'save'), ['-t', 'nat']);
  if (probe.code !== 0) fail('noIptables', `iptables does not work here (${tool('ipv4', backend, 'save')}: ${firstLine(probe.stderr)})`);
  const families: Family[] = ['ipv4'];
  const v6 = (await sys.readText('/proc/net/if_inet6')) !== null && (await which(tool('ipv6', backend, 'restore'))) !== null;
  if (v6 && (await sys.run(tool('ipv6', backend, 'save'), ['-t', 'nat'])).code === 0) families.push('ipv6');
  return new Iptables(sys, backend, families);
}
