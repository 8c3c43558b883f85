// `portflip restore` (at boot): every app's rules back from its state file, pointing at its live active instance.

import { listApps } from '../core/state.js';
import type { Step } from '../core/steps.js';
import { requireNetAdmin, type Ctx } from '../ops/context.js';
import { withApp, type AppRun } from '../ops/lock.js';
import { reconcile } from '../ops/reconcile.js';

/** restore: what every run does first, as the whole run: find out what is real and repair it. */
const RESTORE: Step<AppRun>[] = [
  {
    name: 'restore',
    does: (r) =>
      `repair ${r.st.app}'s rules from its state file, pointing port ${r.st.listen} at its live active instance`,
    undo: '',
    run: async (r) => void (await reconcile(r.ctx, r.ipt, r.st)),
    where: (r) => ({
      port: r.st.instances.find((i) => i.state === 'active')?.port,
      pid: r.st.instances.find((i) => i.state === 'active')?.pid,
    }),
    detail: (r) => {
      const active = r.st.instances.find((i) => i.state === 'active');
      return active
        ? `port ${r.st.listen} -> ${active.port}`
        : `no live instance; port ${r.st.listen} is left alone (deploy it again)`;
    },
  },
];

export async function restore(ctx: Ctx): Promise<void> {
  const apps = await listApps(ctx.sys, ctx.paths);
  await requireNetAdmin(ctx.sys);
  for (const app of apps) await withApp(ctx, app, 'restore', RESTORE, undefined, false);
  if (!apps.length) ctx.emit({ kind: 'notice', message: `no apps in ${ctx.paths.stateDir}; nothing to restore` });
}
