// A deploy's preflight: every check before anything is started, the lock, and repairs of what earlier runs left.

import { fail } from '../core/errors.js';
import { checkUserReach } from '../os/access.js';
import { resolveCommand, lookupUser } from '../ops/instance.js';
import { wouldDrop, type Family, type Iptables, type RulesView } from '../os/iptables.js';
import { conntrackFill, conntrackWarning, CONNTRACK_WARN_PERCENT } from '../ops/conntrack.js';
import { openGuard } from '../ops/guard.js';
import { openIptables, type Ctx } from '../ops/context.js';
import { reconcile } from '../ops/reconcile.js';
import { listenersOn, tcpListeners } from '../os/proc.js';
import { ensureDirs, listApps, readState, takeLock, type AppState } from '../core/state.js';
import { type DenyChain } from '../os/nftguard.js';
import { refuseDeploy } from './canary.js';
import type { DeployOptions, DeployRun, Preflight } from './deploy-run.js';
import { chainName } from './deploy-steps.js';
import type { StepPlan } from '../core/steps.js';

/** preflight as events and --dry-run name it; deploy() runs it before the steps, since it finds what they work on. */
export const PREFLIGHT: StepPlan<DeployRun> = {
  name: 'preflight',
  does: () => 'check root, iptables, config, command, free port; take the lock; repair what an earlier run left',
  undo: 'release the lock',
};

/** Ports chosen when --ports is not given: below the kernel's ephemeral range, so clients never hold them. */
export const DEFAULT_PORT_RANGE = [20000, 29999] as const;

export async function preflight(o: DeployOptions, ctx: Ctx): Promise<Preflight> {
  const { sys, paths } = ctx;
  const cwdOk = await sys.fs.stat(o.cwd).then(
    (s) => s.isDirectory,
    () => false,
  );
  if (!cwdOk) fail('config', `--cwd ${o.cwd}: no such directory`);
  const user = o.user ? await lookupUser(sys, o.user) : undefined;
  const env: NodeJS.ProcessEnv = { ...ctx.env, ...o.env, PORTFLIP_APP: o.app };
  // portflip's own settings are not the app's (nor its hooks')
  for (const k of [
    'PORTFLIP_STATE_DIR',
    'PORTFLIP_RUN_DIR',
    'PORTFLIP_IPTABLES',
    'PORTFLIP_PRELOAD_DIR',
    'PORTFLIP_TEXTFILE_DIR',
    'PORTFLIP_LIB_DIR',
    'PORTFLIP_CONFIG_DIR',
  ])
    delete env[k];
  if (user) Object.assign(env, { HOME: user.home, USER: user.name, LOGNAME: user.name });
  const executable = await resolveCommand(sys, o.command[0].replaceAll('{port}', '0'), o.cwd, env.PATH);
  if (user) await checkUserReach(sys, user, o, executable); // else the instance dies at start, its log the only word

  if (o.dryRun) {
    // no lock and no change: the live rules are read where that is allowed, to show the exact commit
    const state = (await readState(sys, paths, o.app).catch(() => null)) ?? freshState(o, 'nft', []);
    const port =
      o.ports?.find((p) => !state.instances.some((i) => i.state === 'active' && i.port === p)) ??
      (o.ports ?? [DEFAULT_PORT_RANGE[0]])[0];
    const ipt = await openIptables(ctx, state.backend).catch(() => null);
    const views = new Map<Family, RulesView>();
    for (const f of ipt?.families ?? []) views.set(f, await ipt!.save(f));
    Object.assign(state, { listen: o.listen });
    refuseDeploy(state, o.canary, true);
    const denyChains = ipt ? await (await openGuard(ctx.sys)).chains() : [];
    return {
      ipt: ipt as Iptables,
      lock: { release: async () => {} },
      user,
      env,
      state,
      port,
      views,
      fresh: false,
      denyChains,
    };
  }

  const recorded = await readState(sys, paths, o.app);
  const ipt = await openIptables(ctx, recorded?.backend);
  if (o.ipv6 === 'on' && !ipt.families.includes('ipv6'))
    fail('noIptables', '--ipv6 on: ip6tables nat does not work on this host; use --ipv6 auto or off');
  await ensureDirs(sys, paths);
  const lock = await takeLock(sys, paths, o.app, `deploy ${o.app}`, (m) =>
    ctx.emit({ kind: 'notice', app: o.app, message: m }),
  );
  try {
    const existing = await readState(sys, paths, o.app);
    const state = existing ?? freshState(o, ipt.backend, []);
    if (state.listen !== o.listen && state.instances.length) {
      ctx.emit({ kind: 'notice', app: o.app, message: `public port changes from ${state.listen} to ${o.listen}` });
    }
    const { views, chains } = await reconcile(ctx, ipt, state);
    refuseDeploy(state, o.canary);
    state.listen = o.listen;
    state.backend = ipt.backend;
    // read again only when the repair changed the nftables accept
    const [port, denyChains] = await Promise.all([
      pickPort(o, ctx, state),
      chains ?? openGuard(ctx.sys).then((g) => g.chains()),
    ]);
    await warnFirewall(o, ctx, views, port, denyChains);
    return { ipt, lock, user, env, state, port, views, fresh: !existing, denyChains };
  } catch (err) {
    await lock.release();
    throw err;
  }
}

/** Warnings that change nothing: a filling conntrack table, and with --firewall off, a filter that would drop. */
async function warnFirewall(
  o: DeployOptions,
  ctx: Ctx,
  views: Map<Family, RulesView>,
  port: number,
  denyChains: DenyChain[],
): Promise<void> {
  const note = (message: string) => ctx.emit({ kind: 'notice', app: o.app, message });
  const fill = await conntrackFill(ctx.sys);
  if (fill && fill.percent >= CONNTRACK_WARN_PERCENT) note(conntrackWarning(fill));
  if (o.firewall.mode !== 'off') return;
  for (const [f, view] of views) {
    if (!wouldDrop(view.filter, port)) continue;
    const tool = f === 'ipv4' ? 'iptables' : 'ip6tables';
    note(
      `--firewall off: ${tool}'s INPUT drops what it does not accept, ` +
        `and nothing accepts connections redirected to port ${port}, so clients on other hosts will get no answer. ` +
        `Fix: ${tool} -I INPUT -p tcp -m conntrack --ctstate DNAT --ctorigdstport ${o.listen} -j ACCEPT, ` +
        'or deploy with --firewall auto',
    );
  }
  for (const c of denyChains) {
    const chain = chainName(c);
    note(
      `--firewall off: nftables chain "${chain}" drops by default ` +
        `and will drop connections redirected to port ${port}. ` +
        `Fix: nft insert rule ${chain} ct status dnat ct original proto-dst ${o.listen} accept, ` +
        'or deploy with --firewall auto',
    );
  }
}

const freshState = (o: DeployOptions, backend: AppState['backend'], families: Family[]): AppState => ({
  schema: 1,
  app: o.app,
  listen: o.listen,
  backend,
  families,
  stop: o.stop,
  instances: [],
  updatedAt: '',
});

async function pickPort(o: DeployOptions, ctx: Ctx, st: AppState): Promise<number> {
  const socks = await tcpListeners(ctx.sys);
  const taken = new Set<number>();
  for (const other of await listApps(ctx.sys, ctx.paths)) {
    if (other === o.app) continue;
    for (const i of (await readState(ctx.sys, ctx.paths, other).catch(() => null))?.instances ?? []) taken.add(i.port);
  }
  const ours = (p: number) => st.instances.find((i) => i.port === p);
  const free = (p: number) => !taken.has(p) && p !== o.listen && !listenersOn(socks, p).length;
  // one instance port and the active instance on it: an in-place restart (hold.ts)
  if (o.ports?.length === 1 && ours(o.ports[0])?.state === 'active') return o.ports[0];
  if (o.ports) {
    const usable = o.ports.filter((p) => ours(p)?.state !== 'active');
    const pick = usable.find((p) => !ours(p) && free(p)) ?? usable.find((p) => ours(p)); // our kept one is retired first
    if (pick === undefined) {
      const user = (p: number) => `${p}: ${ours(p) ? `our ${ours(p)!.state} instance` : 'another process'}`;
      const users = o.ports.map(user).join(', ');
      fail('portInUse', `--ports ${o.ports.join(',')}: every port is in use (${users}); free one or give another`);
    }
    if (!ours(pick!) && !free(pick!)) {
      const other = taken.has(pick!) ? ' (another portflip app)' : '';
      fail('portInUse', `port ${pick} is already in use by another process${other}; stop it or pick other --ports`);
    }
    return pick!;
  }
  for (let p = DEFAULT_PORT_RANGE[0]; p <= DEFAULT_PORT_RANGE[1]; p++) if (!ours(p) && free(p)) return p;
  return fail('portInUse', `no free port in ${DEFAULT_PORT_RANGE.join('-')}; give --ports`);
}
