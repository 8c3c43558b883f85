// Live rules checked against the state file and repaired under the app's lock: `portflip run` and `watch`.

import { PortflipError } from '../core/errors.js';
import type { HistoryOrigin } from '../core/history.js';
import { readState, takeLock, type AppState } from '../core/state.js';
import { checkApp, markText, type Iptables } from '../os/iptables.js';
import { isAlive } from '../os/proc.js';
import { openIptables, type Ctx } from './context.js';
import { pendingGuardScript } from './guard.js';
import { holdStands, reconcile } from './reconcile.js';
import { recorded } from './record.js';
import { wantedSpec } from './rules.js';

/** Live rules against the state file, for `portflip run` and `portflip watch`; repairs under the app's lock. */
export class Healer {
  private ipts = new Map<string, Promise<Iptables>>();
  /** `by`: who heals, for the history (`watch`, or `run` for its own app). */
  constructor(
    private ctx: Ctx,
    private by: HistoryOrigin = 'watch',
  ) {}

  private iptables(st: AppState): Promise<Iptables> {
    // detecting the backend costs several processes: once per backend, not once a second
    let ipt = this.ipts.get(st.backend);
    if (!ipt) this.ipts.set(st.backend, (ipt = openIptables(this.ctx, st.backend)));
    ipt.catch(() => this.ipts.delete(st.backend));
    return ipt;
  }

  /** What differs from the state file (empty: nothing), read without the lock. */
  async check(st: AppState): Promise<string[]> {
    const ipt = await this.iptables(st);
    const missing: string[] = [];
    for (const f of ipt.families) {
      const view = await ipt.save(f);
      missing.push(...checkApp(view, wantedSpec(st, f), f).missing);
      if (markText(view, wantedSpec(st, f))) missing.push(`mangle: ${f} marking rules`);
    }
    if (await pendingGuardScript(this.ctx, st)) missing.push('nft: portflip accept in a default-deny input chain');
    if (!(await holdStands(this.ctx.sys, st, false))) missing.push('mangle: a hold whose holder is gone or timed out');
    for (const i of st.instances.filter((i) => i.marking)) {
      if (!(await isAlive(this.ctx.sys, i.marking!.pid, i.marking!.startTime)))
        missing.push(`mangle: marking of port ${i.port}, whose run is gone`);
    }
    return missing;
  }

  /**
   * Repairs the app if its rules differ: reconcile under the lock, which emits one repair event per
   * family with what was missing, and a `repair` record in the app's history. A held lock means a
   * deploy is running; it leaves the rules right.
   */
  async heal(app: string): Promise<'ok' | 'repaired' | 'busy' | 'gone'> {
    const st = await readState(this.ctx.sys, this.ctx.paths, app).catch(() => null);
    if (!st) return 'gone';
    const missing = await this.check(st);
    if (!missing.length) return 'ok';
    let lock;
    try {
      lock = await takeLock(this.ctx.sys, this.ctx.paths, app, `heal ${app}`, (m) =>
        this.ctx.emit({ kind: 'notice', app, message: m }),
      );
    } catch (err) {
      if (err instanceof PortflipError && err.kind === 'lockHeld') return 'busy';
      throw err;
    }
    try {
      const fresh = await readState(this.ctx.sys, this.ctx.paths, app);
      if (!fresh) return 'gone';
      // again under the lock: a deploy that just ended, or another healer (run's beside watch's), may have put
      // the rules right since the check, and a repair of nothing would be recorded and counted as one
      const still = await this.check(fresh);
      if (!still.length) return 'ok';
      this.ctx.emit({
        kind: 'notice',
        app,
        message: `rules changed behind portflip's back (${still.join('; ')}); repairing`,
      });
      const ipt = await this.iptables(fresh);
      await recorded(this.ctx, app, { action: 'repair', by: this.by, repaired: still }, async (ctx) => {
        await reconcile(ctx, ipt, fresh);
      });
      return 'repaired';
    } finally {
      await lock.release();
    }
  }
}
