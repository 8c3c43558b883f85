// `portflip cleanup`: every portflip chain and rule removed, in every backend a state file names; instances optional.

import { listApps, readState, removeState, takeLock } from '../core/state.js';
import { cleanupText, detectBackend, type Backend } from '../os/iptables.js';
import { GUARD_PREFIX, guardScript } from '../os/nftguard.js';
import { requireNetAdmin, type Ctx } from '../ops/context.js';
import { openGuard } from '../ops/guard.js';
import { drainAndStop } from '../ops/instance.js';
import { endHolder } from './hold.js';

export async function cleanup(ctx: Ctx, stopInstances: boolean): Promise<void> {
  await requireNetAdmin(ctx.sys);
  const started = ctx.sys.now();
  const apps = await listApps(ctx.sys, ctx.paths);
  const locks = [];
  try {
    for (const app of apps)
      locks.push(
        await takeLock(ctx.sys, ctx.paths, app, 'cleanup', (m) => ctx.emit({ kind: 'notice', app, message: m })),
      );
    // the backend in use, and any other one a state file says rules were made with
    const detected = await detectBackend(ctx.sys, ctx.env.PORTFLIP_IPTABLES);
    const backends = new Set<Backend>([detected.backend]);
    for (const app of apps) {
      const b = (await readState(ctx.sys, ctx.paths, app).catch(() => null))?.backend;
      if (b) backends.add(b);
    }
    const guard = await openGuard(ctx.sys);
    const chains = await guard.chains();
    const guarded = new Set(
      chains.flatMap((c) => c.ours.map((r) => r.comment.slice(GUARD_PREFIX.length).split(' ')[0])),
    );
    for (const app of guarded) {
      const script = guardScript(chains, app, null);
      if (script) await guard.apply(script);
    }
    for (const b of backends) {
      const ipt = b === detected.backend ? detected : await detectBackend(ctx.sys, b).catch(() => null);
      for (const f of ipt?.families ?? []) {
        const text = cleanupText(await ipt!.save(f));
        if (text) await ipt!.restore(f, text);
      }
    }
    let stopped = 0;
    if (stopInstances) {
      for (const app of apps) {
        const st = await readState(ctx.sys, ctx.paths, app).catch(() => null);
        if (!st) continue;
        await Promise.all([
          ...st.instances.map((i) =>
            drainAndStop(ctx.sys, app, i, { ...st.stop, drain: 'signal' }, ctx.emit, async () => {}),
          ),
          ...(st.hold ? [endHolder(ctx.sys, st.hold)] : []),
        ]);
        stopped += st.instances.length;
        await removeState(ctx.sys, ctx.paths, app);
      }
    }
    ctx.emit({
      kind: 'step',
      step: 'cleanup',
      app: '*',
      status: 'ok',
      durationMs: ctx.sys.now() - started,
      detail:
        'removed every portflip chain and rule' +
        (stopInstances
          ? `; stopped ${stopped} instance(s)`
          : '; instances left running (restore brings the rules back)'),
    });
  } finally {
    for (const l of locks) await l.release();
  }
}
