// How full the kernel's connection-tracking table is, and what to tell people before it fills.

import type { Sys } from '../os/sys.js';

/** How full the connection-tracking table is; null where conntrack is not loaded (no rule needs it yet). */
export async function conntrackFill(sys: Sys): Promise<{ count: number; max: number; percent: number } | null> {
  const [count, max] = await Promise.all(
    ['count', 'max'].map((k) => sys.readText(`/proc/sys/net/netfilter/nf_conntrack_${k}`)),
  );
  if (count === null || max === null || !Number(max)) return null;
  const c = Number(count.trim());
  const m = Number(max.trim());
  return { count: c, max: m, percent: Math.round((c / m) * 1000) / 10 };
}

/** Past this share a full table is close: new SYNs are dropped once it is full, and clients time out. */
export const CONNTRACK_WARN_PERCENT = 75;

export function conntrackWarning(fill: { count: number; max: number; percent: number }): string {
  return (
    `the connection-tracking table is ${fill.percent}% full (${fill.count} of ${fill.max}); ` +
    'when it is full new connections are dropped. ' +
    'Raise net.netfilter.nf_conntrack_max (and net.netfilter.nf_conntrack_buckets), ' +
    'or shorten net.netfilter.nf_conntrack_tcp_timeout_time_wait; see docs/firewalls.md'
  );
}
