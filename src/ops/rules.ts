// What the state file wants the rules to say, family by family, and the commits that make them say it.

import type { AppState } from '../core/state.js';
import {
  appChain,
  appText,
  checkApp,
  foreignJumps,
  removeAppText,
  type AppSpec,
  type Family,
  type FirewallSpec,
  type Iptables,
  type RulesView,
  type Table,
} from '../os/iptables.js';

/** The app's firewall settings as rule builders take them; null: portflip keeps out of the filter table. */
export function firewallOf(st: Pick<AppState, 'firewall'>): FirewallSpec | null {
  const fw = st.firewall;
  if (fw?.mode === 'off') return null;
  return { exposePorts: fw?.exposePorts ?? false, allowFrom: fw?.allowFrom ?? [] };
}

/**
 * What one family's rules should say according to the state file: the redirect at the active
 * instance (if the family is the app's), and the way open to every instance that is not a candidate,
 * draining ones included, since their open connections still pass the filter.
 */
export function wantedSpec(st: AppState, family: Family): AppSpec {
  const active = st.instances.find((i) => i.state === 'active');
  const target = active && st.families.includes(family) ? active.port : null;
  // with no redirect in this family there is nothing redirected to accept
  const open = target === null ? [] : st.instances.filter((i) => i.state !== 'candidate').map((i) => i.port);
  // a hold covers the families the app's redirect is in (hold.ts)
  const hold = st.hold && st.families.includes(family) ? st.hold.queue : null;
  const spec: AppSpec = { app: st.app, listen: st.listen, target, open, firewall: firewallOf(st), hold };
  // a draining instance's packets pass its marking queue in the families its connections came in on
  const mark = st.families.includes(family) ? st.instances.filter((i) => i.marking) : [];
  if (mark.length) spec.mark = mark.map((i) => ({ port: i.port, queue: i.marking!.queue }));
  // a live canary takes its share, in the families it listens on
  const canary = st.instances.find((i) => i.state === 'canary');
  const c = st.canary;
  if (target !== null && canary && c?.families.includes(family))
    spec.canary = { port: canary.port, percent: c.percent, by: c.by, rnd: c.rnd };
  return spec;
}

/** Makes one family say what the spec says, in one commit; returns what was missing (empty: nothing to do). */
export async function applySpec(
  ipt: Iptables,
  family: Family,
  spec: AppSpec,
  view?: RulesView,
  only?: Table,
): Promise<string[]> {
  const v = view ?? (await ipt.save(family));
  const text = appText(v, spec, family, only);
  if (text) await ipt.restore(family, text);
  return text ? checkApp(v, spec, family).missing : [];
}

/** Points every family's rules where the state says, side by side: each family's commit is atomic on its own. */
export async function pointAll(ipt: Iptables, st: AppState, views?: Map<Family, RulesView>): Promise<void> {
  await Promise.all(ipt.families.map((f) => applySpec(ipt, f, wantedSpec(st, f), views?.get(f))));
}

/** Removes the app's rules from one family; returns the foreign rules that kept its chains from going. */
export async function removeApp(ipt: Iptables, family: Family, app: string): Promise<string[]> {
  const view = await ipt.save(family);
  const text = removeAppText(view, app);
  if (text) await ipt.restore(family, text);
  return (['nat', 'filter', 'mangle'] as const).flatMap((t) => foreignJumps(view[t], appChain(app)));
}
