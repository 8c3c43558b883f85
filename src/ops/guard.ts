// The app's accept rule in native nftables input chains that drop by default, kept as its state wants it.

import type { AppState } from '../core/state.js';
import { guardScript, NftGuard, type DenyChain } from '../os/nftguard.js';
import { which, type Sys } from '../os/sys.js';
import type { Ctx } from './context.js';
import { firewallOf } from './rules.js';

// looked up once per Sys: a deploy asks several times, and each lookup walks PATH
const nftPaths = new WeakMap<Sys, Promise<string | null>>();
export async function openGuard(sys: Sys): Promise<NftGuard> {
  if (!nftPaths.has(sys)) {
    const lookup = which(sys, 'nft');
    nftPaths.set(sys, lookup);
    lookup.catch(() => nftPaths.delete(sys)); // a lookup that failed is asked again, not remembered
  }
  return new NftGuard(sys, await nftPaths.get(sys)!);
}

/** The app's nftables accept as its state wants it: present while a live instance may be redirected to. */
export function guardWanted(st: AppState, mode: 'auto' | 'present' | 'absent') {
  const fw = firewallOf(st);
  const live = mode === 'present' || (mode === 'auto' && st.instances.some((i) => i.state !== 'candidate'));
  return mode !== 'absent' && fw && live ? { listen: st.listen, fw } : null;
}

/**
 * Makes native nftables input chains that drop by default accept the app's redirected connections
 * (or forget them). Returns what it changed, for the repair event, and the chains it read when it left
 * them as they were (null when it changed them). `read`: the chains, read already.
 */
export async function syncGuard(
  ctx: Ctx,
  st: AppState,
  mode: 'auto' | 'present' | 'absent' = 'auto',
  read?: Promise<DenyChain[]>,
): Promise<{ changed: string[]; chains: DenyChain[] | null }> {
  const guard = await openGuard(ctx.sys);
  const want = guardWanted(st, mode);
  const chains = await (read ?? guard.chains());
  const script = guardScript(chains, st.app, want);
  if (!script) return { changed: [], chains };
  const err = await guard.apply(script);
  if (err) {
    ctx.emit({
      kind: 'notice',
      app: st.app,
      message: `could not update portflip's accept rule in nftables (${err}); redirected traffic may be dropped there`,
    });
    return { changed: [], chains: null };
  }
  const changed = chains.map((c) => `nft: ${want ? 'accept in' : 'remove from'} ${c.family} ${c.table} ${c.chain}`);
  return { changed, chains: null };
}

/** The nft script syncGuard would apply, without applying it: null when nothing would change. */
export async function pendingGuardScript(ctx: Ctx, st: AppState): Promise<string | null> {
  return guardScript(await (await openGuard(ctx.sys)).chains(), st.app, guardWanted(st, 'auto'));
}
