// `portflip rollback`: back to the kept previous instance in one commit per family; the one it leaves drains.

import { fail } from '../core/errors.js';
import { move } from '../core/lifecycle.js';
import { instanceLabel, writeState } from '../core/state.js';
import type { Step } from '../core/steps.js';
import type { Ctx } from '../ops/context.js';
import { withApp, type AppRun } from '../ops/lock.js';
import { retire } from '../ops/retire.js';
import { pointAll } from '../ops/rules.js';

/** Rules first, then the state: a run killed between them is finished by reconcile, which adopts the redirect. */
const repoint = async (r: AppRun) => {
  await pointAll(r.ipt, r.st);
  await writeState(r.ctx.sys, r.ctx.paths, r.st);
};

/** rollback: back to the kept instance in one commit per family, then the instance it leaves drains. */
const ROLLBACK: Step<AppRun>[] = [
  {
    name: 'rollback',
    does: (r) => `point port ${r.st.listen} at the kept instance on ${instanceLabel(r.kept!)}, one commit per family`,
    undo: 'point it back at the instance that was active',
    run: async (r, run) => {
      const { kept, bad } = r;
      run.undo(`redirect back on ${bad ? instanceLabel(bad) : 'nothing'}`, async () => {
        move(kept!, 'kept');
        if (bad) move(bad, 'active');
        await repoint(r);
      });
      move(kept!, 'active');
      delete kept!.keepUntil;
      if (bad) move(bad, 'draining');
      await repoint(r);
    },
    where: (r) => ({ port: r.kept!.port, pid: r.kept!.pid }),
    detail: (r) => (r.bad ? `from port ${r.bad.port}` : undefined),
  },
  {
    name: 'drain',
    does: (r) =>
      `drain and stop the instance on ${r.bad ? instanceLabel(r.bad) : '-'} under the last deploy's drain settings`,
    undo: '',
    settles: true,
    skip: (r) => !r.bad,
    run: async (r) => void (await retire(r.ctx, r.st, r.bad!)),
    where: (r) => ({ port: r.bad?.port, pid: r.bad?.pid }),
  },
];

export async function rollback(ctx: Ctx, app: string): Promise<void> {
  await withApp(ctx, app, 'rollback', ROLLBACK, (r) => {
    r.kept = r.st.instances
      .filter((i) => i.state === 'kept')
      .sort((a, b) => (b.keepUntil ?? 0) - (a.keepUntil ?? 0))[0];
    if (!r.kept)
      fail(
        'nothingToDo',
        `"${app}" has no kept previous instance alive to roll back to; deploy with --keep-old DURATION to keep one`,
      );
    r.bad = r.st.instances.find((i) => i.state === 'active');
  });
}
