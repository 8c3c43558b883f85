// What one deploy works on: its options, what preflight found, and the run its steps share (deploy.ts, inplace.ts).

import { join } from 'node:path';
import { fail } from '../core/errors.js';
import type { HookName } from '../cli/config.js';
import type { AppState, FirewallSettings, Instance, StopPolicy } from '../core/state.js';
import type { placePreload } from '../drain/preload.js';
import type { DenyChain } from '../os/nftguard.js';
import type { Family, Iptables, RulesView } from '../os/iptables.js';
import type { Ctx } from '../ops/context.js';
import type { ReadyCheck, Spawned, User } from '../ops/instance.js';
import type { MarkReport } from '../ops/retire.js';
import type { CanaryOptions } from './canary.js';

export interface DeployOptions {
  app: string;
  listen: number;
  command: string[];
  ports?: number[];
  cwd: string;
  user?: string;
  env: Record<string, string>;
  ready: ReadyCheck;
  readyTimeoutMs: number;
  stop: StopPolicy;
  keepOldMs?: number;
  ipv6: 'auto' | 'on' | 'off';
  dryRun: boolean;
  hooks?: Partial<Record<HookName, string>>;
  verifyMs?: number;
  firewall: FirewallSettings;
  nodeDrain: boolean; // load the Node drain preload (node-drain.cjs) through NODE_OPTIONS
  canary?: CanaryOptions; // --canary: a share of new connections instead of the switch (canary.ts)
  label?: string; // --label: a version name, kept on the instance (status, history)
  configHash?: string; // sha256 of the config file read, kept on the instance (history)
}

/** Everything one deploy works on: preflight fills the first fields, the steps the rest, in order. */
export interface DeployRun {
  o: DeployOptions;
  ctx: Ctx;
  pre: Preflight;
  st: AppState;
  prev?: Instance; // active when the deploy began: PORTFLIP_PREVIOUS_PORT, the switch's undo
  stale: Instance[]; // kept or draining instances an earlier run left
  cand: Instance; // recorded by start; until then only its port and command
  check: ReadyCheck;
  spawned?: Spawned;
  preload: Awaited<ReturnType<typeof placePreload>> | null;
  loadedIn: string[];
  families: Family[]; // what the candidate listens on, from bind-check
  retiring: Instance[]; // what drain stops, set by the switch
  released?: number; // in place: how many held connections the release let in
  inPlace: boolean; // one instance port, the active instance on it: hold, stop, start on the same port (hold.ts)
  opened: Set<Family>; // families whose filter the open step committed: the switch then commits nat alone
  marks: (MarkReport | null)[]; // what marking did in the drain, one per retired instance
}

export interface Preflight {
  denyChains: DenyChain[]; // native nftables input chains that drop by default (nftguard.ts)
  ipt: Iptables;
  lock: { release(): Promise<void> };
  user?: User;
  env: NodeJS.ProcessEnv;
  state: AppState;
  port: number;
  views: Map<Family, RulesView>;
  fresh: boolean; // no state file before this deploy
}

/** The run a deploy's steps share, as preflight leaves it: the candidate is only its port and command yet. */
export function newRun(o: DeployOptions, ctx: Ctx, pre: Preflight): DeployRun {
  const st = pre.state;
  const r: DeployRun = {
    o,
    ctx,
    pre,
    st,
    prev: st.instances.find((i) => i.state === 'active'),
    stale: st.instances.filter((i) => i.state === 'kept' || i.state === 'draining'),
    cand: {
      port: pre.port,
      pid: null,
      startTime: null,
      state: 'candidate',
      startedAt: new Date(ctx.sys.wallNow()).toISOString(),
      command: o.command.map((a) => a.replaceAll('{port}', String(pre.port))),
      log: join(ctx.paths.logDir, `${o.app}-${pre.port}.log`),
      ...(o.label ? { label: o.label } : {}),
      ...(o.configHash ? { configHash: o.configHash } : {}),
    },
    check: o.ready.kind === 'cmd' ? { ...o.ready, user: pre.user } : o.ready,
    preload: null,
    loadedIn: [],
    families: [],
    retiring: [],
    inPlace: false,
    opened: new Set(),
    marks: [],
  };
  r.inPlace = !!r.prev && o.ports?.length === 1 && o.ports[0] === r.prev.port;
  return r;
}

/** What a deploy's options must say together, whoever built them (each flag's own value: cli/options.ts). */
export function checkOptions(o: DeployOptions): void {
  // the CLI says the same with where a config file could set it; this stands for every other caller
  if (!o.command.length)
    fail('usage', 'no command: write it after "--", like: portflip deploy web --listen 80 -- node server.js');
  if (o.ports?.length === 1 && (o.verifyMs || o.keepOldMs || o.canary))
    fail(
      'usage',
      `--ports ${o.ports[0]} is an in-place restart (one instance port): ` +
        '--verify, --keep-old and --canary need two ports',
    );
  for (const p of o.ports ?? [])
    if (p === o.listen) fail('usage', `--ports: ${p} is the public port; instance ports must differ from --listen`);
  if (o.ports && new Set(o.ports).size !== o.ports.length)
    fail('usage', `--ports: give distinct ports, like 8001,8002`);
}
