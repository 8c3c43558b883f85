// One runner for every command that changes things: ordered steps, each undo registered before it acts.
//
// A step says what it does and how it is undone, for people and for --dry-run, which prints the
// same list. Its run() registers an undo *before* the action it undoes, so a failure halfway
// through a step is undone too. When a step fails or the run is interrupted, the runner undoes
// what was registered, newest first, exactly once; it reports each undo, and an undo that fails,
// then rethrows. A step that calls settled() ends the undo: from there on the change stands.

import type { Emit, StepName } from './events.js';
import type { Sys } from '../os/sys.js';

export interface StepRun {
  /** Registers how to take back what the step is about to do. */
  undo(title: string, fn: () => Promise<void>): void;
  /** Past this point nothing is undone: the new state stands (the new instance serves). */
  settled(): void;
}

export interface Step<C> {
  name: StepName;
  does(c: C): string;
  undo: string; // how the runner undoes it, or '' when it is not undone
  skip?(c: C): boolean;
  run(c: C, r: StepRun): Promise<void>;
  where?(c: C): { port?: number; pid?: number | null };
  detail?(c: C): string | undefined;
  /** A failure is a notice and the run goes on (hooks after the switch). */
  soft?: boolean;
  /** Reaching this step, run or skipped, ends the undo: what came before stands. */
  settles?: boolean;
}

/** What --dry-run shows of a step: a step done outside the runner (a deploy's preflight) is one of these. */
export type StepPlan<C> = Pick<Step<C>, 'name' | 'does' | 'undo' | 'skip'>;

export interface Runner {
  app: string;
  sys: Sys;
  emit: Emit;
}

/** What a failed run tells its caller besides the error: which step failed. */
export class StepFailed extends Error {
  constructor(
    readonly step: StepName,
    readonly cause: unknown,
  ) {
    super((cause as Error)?.message ?? String(cause));
  }
}

export async function runSteps<C>(steps: Step<C>[], c: C, io: Runner): Promise<void> {
  const undos: { title: string; fn: () => Promise<void> }[] = [];
  const handle: StepRun = {
    undo: (title, fn) => void undos.push({ title, fn }),
    settled: () => void (undos.length = 0),
  };
  for (const s of steps) {
    if (s.settles) handle.settled();
    if (s.skip?.(c)) continue;
    const started = io.sys.now();
    const event = (status: 'ok' | 'failed', detail?: string) =>
      io.emit({
        kind: 'step',
        step: s.name,
        app: io.app,
        status,
        ...s.where?.(c),
        durationMs: io.sys.now() - started,
        detail,
      });
    try {
      await s.run(c, handle);
      event('ok', s.detail?.(c));
    } catch (err) {
      if (s.soft) {
        io.emit({
          kind: 'notice',
          app: io.app,
          message: `${(err as Error).message}; the ${s.name} step failed, the run goes on`,
        });
        continue;
      }
      event('failed', (err as Error).message);
      await undoAll(undos, io);
      throw new StepFailed(s.name, err);
    }
  }
}

async function undoAll(undos: { title: string; fn: () => Promise<void> }[], io: Runner): Promise<void> {
  for (const u of undos.splice(0).reverse()) {
    try {
      await u.fn();
      io.emit({ kind: 'notice', app: io.app, message: `undo: ${u.title}` });
    } catch (err) {
      io.emit({
        kind: 'notice',
        app: io.app,
        message: `undo FAILED: ${u.title}: ${(err as Error).message}; run portflip restore ${io.app}`,
      });
    }
  }
}

/** The same list, for --dry-run: what each step would do and how it would be undone. */
export function planSteps<C>(steps: StepPlan<C>[], c: C): { step: string; does: string; undo: string }[] {
  return steps.filter((s) => !s.skip?.(c)).map((s) => ({ step: s.name, does: s.does(c), undo: s.undo }));
}

/** The error a failed run ends with: the step's own. */
export const causeOf = (err: unknown) => (err instanceof StepFailed ? err.cause : err);
