// In-place restarts (one instance port): hold new connections, stop the old instance, start the new one
// on the same port, and release the held connections to it once it is ready.
//
// The steps slot into deploy.ts's DEPLOY list and are skipped unless the run is in place. The old and
// the new instance share the port one after the other, never together, so the state file holds at most
// one instance on it at any write (lifecycle.ts invariantProblem). If the new instance fails, the
// undo of stop-old starts the previous command again on the port, and the hold's undo releases to it.

import { join } from 'node:path';
import type { DeployRun } from './deploy-run.js';
import { fail, PortflipError } from '../core/errors.js';
import { applyHold, DEFAULT_QUEUE_LEN, releaseHold, requireNfqueue, startHolder } from './hold.js';
import { killNow, spawnInstance, waitReady } from '../ops/instance.js';
import { move } from '../core/lifecycle.js';
import { instanceLabel } from '../core/state.js';
import { retire } from '../ops/retire.js';
import { readStat } from '../os/proc.js';
import { writeState, type Instance } from '../core/state.js';
import type { Step } from '../core/steps.js';

/** How long a deploy's holder may hold at most: the drain, the kill, a start, and a restart of the previous. */
const holdBound = (r: DeployRun) => r.o.stop.drainTimeoutMs + r.o.stop.killAfterMs + 2 * r.o.readyTimeoutMs + 30_000;

/** Starts the previous instance's command again on its port, waits until it is ready, and makes it active. */
async function restartPrevious(r: DeployRun, prev: Instance): Promise<void> {
  const { ctx, st, o } = r;
  const again: Instance = {
    ...prev,
    pid: null,
    startTime: null,
    state: 'candidate',
    startedAt: new Date(ctx.sys.wallNow()).toISOString(),
    log: join(ctx.paths.logDir, `${o.app}-${prev.port}.previous.log`),
    signalledAt: undefined,
    nodeDrain: undefined,
  };
  st.instances.push(again);
  await writeState(ctx.sys, ctx.paths, st);
  const env = { ...r.pre.env, PORT: String(prev.port) };
  const spawned = await spawnInstance(ctx.sys, {
    command: prev.command,
    port: prev.port,
    cwd: o.cwd,
    env,
    user: r.pre.user,
    log: again.log,
  });
  again.pid = spawned.pid;
  again.startTime = (await readStat(ctx.sys, spawned.pid))?.startTime ?? null;
  await writeState(ctx.sys, ctx.paths, st);
  // not interruptible: a second Ctrl-C must not leave the port with nothing on it
  const res = await waitReady(
    ctx.sys,
    r.check,
    { pid: spawned.pid, port: prev.port, exited: spawned.exited },
    o.readyTimeoutMs,
    env,
    new AbortController().signal,
  );
  if (!res.ready) {
    await killNow(ctx.sys, again);
    st.instances = st.instances.filter((i) => i !== again);
    await writeState(ctx.sys, ctx.paths, st);
    throw new PortflipError('deployFailed', `the previous command did not get ready again either: ${res.reason}`);
  }
  move(again, 'active'); // the redirect never left its port
  await writeState(ctx.sys, ctx.paths, st);
}

/** In place: new connections to the public port wait in a queue while the port changes hands. */
export const hold: Step<DeployRun> = {
  name: 'hold',
  does: (r) =>
    `start a holder and queue new connections to port ${r.o.listen} (mangle NFQUEUE, --queue-bypass; up to ` +
    `${DEFAULT_QUEUE_LEN} SYNs, at most ${Math.round(holdBound(r) / 1000)}s)`,
  undo: 'release every held connection, remove the rule',
  skip: (r) => !r.inPlace,
  run: async (r, run) => {
    const hold = await startHolder(r.ctx, r.st, 'deploy', holdBound(r), DEFAULT_QUEUE_LEN);
    run.undo('held connections released', async () => {
      r.st.hold ??= hold;
      await releaseHold(r.ctx, r.pre.ipt, r.st);
    });
    await applyHold(r.ctx, r.pre.ipt, r.st, hold);
    // the later steps commit from these views: they must see the mangle chain the hold just added
    await Promise.all(r.pre.ipt.families.map(async (f) => r.pre.views.set(f, await r.pre.ipt.save(f))));
  },
  where: (r) => ({ port: r.o.listen, pid: r.st.hold?.pid }),
  detail: (r) => `queue ${r.st.hold?.queue}`,
};

/** In place: the active instance holds the port the new one needs, so it drains and stops first. */
export const stopOld: Step<DeployRun> = {
  name: 'stop-old',
  does: (r) =>
    `drain and stop the active instance on ${instanceLabel(r.prev!)}, which holds the port the new one needs`,
  undo: 'start the previous command again on its port and wait until it is ready',
  skip: (r) => !r.inPlace,
  run: async (r, run) => {
    const prev = r.prev!;
    run.undo(`previous command running again on port ${prev.port}`, () => restartPrevious(r, prev));
    await retire(r.ctx, r.st, prev, r.pre.ipt);
  },
  where: (r) => ({ port: r.prev?.port, pid: r.prev?.pid }),
};

/** In place: once the new instance is ready, every held connection goes to it at once. */
export const release: Step<DeployRun> = {
  name: 'release',
  does: (r) => `let every held connection in at once, to port ${r.cand.port}, and remove the hold rule`,
  undo: '',
  skip: (r) => !r.inPlace,
  run: async (r) => void (r.released = await releaseHold(r.ctx, r.pre.ipt, r.st)),
  where: (r) => ({ port: r.cand.port, pid: r.cand.pid }),
  detail: (r) => `${r.released ?? 0} held connection${r.released === 1 ? '' : 's'} released`,
};

/** What must hold before an in-place deploy changes anything: the kernel can queue, and no pause runs. */
export async function inPlacePreflight(r: DeployRun): Promise<void> {
  if (r.st.hold?.reason === 'pause')
    fail('nothingToDo', `"${r.o.app}" is paused; resume it first, or deploy with two --ports (the pause then stays)`);
  await requireNfqueue(r.ctx.sys);
}
