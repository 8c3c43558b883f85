// `portflip watch`: one loop that heals every app's rules, for hosts that run apps without `portflip run`.

import { listApps } from '../core/state.js';
import type { Ctx } from '../ops/context.js';
import { Healer } from '../ops/healer.js';

/** `portflip watch`: heals every app's rules after a firewall reload, for apps deployed with the plain CLI. */
export async function watch(ctx: Ctx, everyMs: number): Promise<void> {
  const healer = new Healer(ctx, 'watch');
  ctx.emit({ kind: 'notice', message: `watching the rules of every app in ${ctx.paths.stateDir} every ${everyMs}ms` });
  while (!ctx.abort.aborted) {
    for (const app of await listApps(ctx.sys, ctx.paths)) {
      await healer
        .heal(app)
        .catch((err) => ctx.emit({ kind: 'notice', app, message: `could not repair: ${(err as Error).message}` }));
    }
    await ctx.sys.sleep(everyMs, ctx.abort);
  }
}
