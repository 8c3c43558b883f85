// What every command runs with (the OS seam, paths, events, Ctrl-C) and its first checks: privileges, iptables.

import { fail } from '../core/errors.js';
import type { Emit } from '../core/events.js';
import type { Paths } from '../core/state.js';
import { detectBackend, type Iptables } from '../os/iptables.js';
import { hasNetAdmin } from '../os/proc.js';
import type { Sys } from '../os/sys.js';

export interface Ctx {
  sys: Sys;
  paths: Paths;
  emit: Emit;
  env: NodeJS.ProcessEnv;
  abort: AbortSignal;
}

export async function requireNetAdmin(sys: Sys): Promise<void> {
  const status = (await sys.readText('/proc/self/status')) ?? '';
  if (!hasNetAdmin(status))
    fail('notPrivileged', 'portflip changes iptables rules and needs root (or CAP_NET_ADMIN); run it with sudo');
}

export async function openIptables(ctx: Ctx, recorded?: string): Promise<Iptables> {
  await requireNetAdmin(ctx.sys);
  return detectBackend(ctx.sys, ctx.env.PORTFLIP_IPTABLES || recorded);
}
