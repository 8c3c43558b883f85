// What a command that changed an app did, one record per run, kept per app in the state directory.
// The shape is read by `portflip history`, the SVG timeline and the metrics (ops/metrics.ts).

import type { ExitCodeName } from './errors.js';
import type { StepName } from './events.js';

/** What changed the app. */
export type HistoryAction =
  | 'deploy'
  | 'rollback'
  | 'promote'
  | 'abort'
  | 'pause'
  | 'resume'
  | 'stop'
  | 'restore'
  | 'cleanup'
  | 'restart' // `portflip run` brought a crashed app back
  | 'reload' // `portflip run` deployed again on SIGHUP or `portflip reload`
  | 'repair'; // the healer (`watch`, `run`) put rules back after they changed behind portflip's back

/** Who started it. */
export type HistoryOrigin = 'cli' | 'run' | 'reload' | 'watch';

/** One side of a change: the instance that served before, or the one that serves after. */
export interface HistorySide {
  port: number;
  pid: number | null;
  command: string[];
  label?: string; // a version label, when the deploy was given one
  configHash?: string; // sha256 of the config file the deploy read, when it read one
}

export interface HistoryStep {
  step: StepName;
  status: 'ok' | 'failed';
  durationMs: number;
  detail?: string;
}

export interface HistoryRecord {
  v: 1;
  app: string;
  action: HistoryAction;
  by: HistoryOrigin;
  startedAt: string; // ISO wall clock
  durationMs: number;
  result: 'ok' | 'failed';
  exitCode: number;
  error?: { kind: ExitCodeName; message: string; step?: StepName }; // when it failed: why, and in which step
  from?: HistorySide; // absent when nothing served before
  to?: HistorySide; // absent when nothing serves after (stop, a failed first deploy)
  steps: HistoryStep[];
  repaired?: string[]; // a repair: what was missing
}
