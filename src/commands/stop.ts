// `portflip stop`: the app's rules go first, so its public port refuses; then every instance stops at once.

import { removeState } from '../core/state.js';
import type { Step } from '../core/steps.js';
import { appChain } from '../os/iptables.js';
import type { Ctx } from '../ops/context.js';
import { syncGuard } from '../ops/guard.js';
import { drainAndStop } from '../ops/instance.js';
import { withApp, type AppRun } from '../ops/lock.js';
import { removeApp } from '../ops/rules.js';
import { endHolder } from './hold.js';

/** stop: the rules go first, so the public port refuses; then every instance stops at once. */
const STOP: Step<AppRun>[] = [
  {
    name: 'stop',
    does: (r) => `remove ${r.st.app}'s rules: nat, then filter, then its nftables accept`,
    undo: '',
    run: async (r) => {
      for (const f of r.ipt.families) for (const rule of await removeApp(r.ipt, f, r.st.app)) r.foreign.add(rule);
      await syncGuard(r.ctx, r.st, 'absent');
      if (r.foreign.size) {
        r.ctx.emit({
          kind: 'notice',
          app: r.st.app,
          message:
            `rules outside portflip still jump to ${appChain(r.st.app)} (${[...r.foreign].join('; ')}); ` +
            'its chain was emptied but left in place: delete those rules, then run portflip cleanup',
        });
      }
    },
    detail: () => 'rules removed',
  },
  {
    name: 'drain',
    does: () =>
      'send the stop signal to every instance at once (no idle wait: the port already refuses); SIGKILL after ' +
      '--kill-after; a pause holder lets go and exits',
    undo: '',
    run: async (r) => {
      const policy = { ...r.st.stop, drain: 'signal' as const };
      await Promise.all([
        ...r.st.instances.map((i) => drainAndStop(r.ctx.sys, r.st.app, i, policy, r.ctx.emit, async () => {})),
        ...(r.st.hold ? [endHolder(r.ctx.sys, r.st.hold)] : []),
      ]);
      delete r.st.hold; // or the closing applyState would put the hold rule back for a stopped app
      r.stopped = r.st.instances.length;
      r.st.instances = [];
      await removeState(r.ctx.sys, r.ctx.paths, r.st.app);
    },
    detail: (r) => `${r.stopped} instance(s) stopped, state removed`,
  },
];

export async function stop(ctx: Ctx, app: string): Promise<void> {
  await withApp(ctx, app, 'stop', STOP);
}
