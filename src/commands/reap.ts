// The hidden `_reap` command: a detached process that retires kept instances when their time is up.

import { PortflipError } from '../core/errors.js';
import { readState } from '../core/state.js';
import type { Ctx } from '../ops/context.js';
import { withApp } from '../ops/lock.js';

/** Detached: waits until kept instances are due, then retires them under the lock. */
export async function reap(ctx: Ctx, app: string): Promise<void> {
  for (;;) {
    const st = await readState(ctx.sys, ctx.paths, app).catch(() => null);
    const kept = st?.instances.filter((i) => i.state === 'kept') ?? [];
    if (!kept.length) return;
    const due = Math.min(...kept.map((i) => i.keepUntil ?? 0));
    await ctx.sys.sleep(Math.max(0, due - ctx.sys.wallNow()) + 50, ctx.abort);
    if (ctx.abort.aborted) return;
    for (let tries = 0; ; tries++) {
      try {
        await withApp(ctx, app, 'reap', []); // withApp retires what is due
        break;
      } catch (err) {
        // a deploy holding the lock retires due instances itself; wait for it and look again
        if (!(err instanceof PortflipError && err.kind === 'lockHeld') || tries > 600) return;
        await ctx.sys.sleep(1000);
      }
    }
  }
}
