// What a command that changed an app did, one record per run, kept per app in the state directory.
// The shape is read by `portflip history`, the SVG timeline and the metrics (ops/metrics.ts).

import { join } from 'node:path';
import type { ExitCodeName } from './errors.js';
import type { StepName } from './events.js';
import { takeLock, type Paths } from './state.js';
import type { Sys } from '../os/sys.js';

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

/** The actions that run a deploy's steps: `deploy`, and `portflip run`'s reloads and crash restarts. */
export const DEPLOY_ACTIONS: readonly HistoryAction[] = ['deploy', 'reload', 'restart'];

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
  port?: number; // the instance the step worked on, as its event said
  pid?: number | null;
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

// ---- the file ---------------------------------------------------------------------------------
//
// One file per app, one JSON line per record, each appended with a single O_APPEND write: a SIGKILL
// leaves every earlier line whole and at worst a torn last one, which read skips, and the next append
// starts on a fresh line. Past HISTORY_MAX_BYTES the file is renamed to APP.jsonl.1 (one older file
// kept, so an app's history takes at most about twice that), under a lock so two runs cannot both
// rename. No fsync: a killed process loses nothing the kernel already has; a power cut may lose the
// last records, and a deploy does not wait on the disk for its history.

export const HISTORY_MAX_BYTES = 1 << 20;

export const historyDir = (p: Paths) => join(p.stateDir, 'history');
export const historyFile = (p: Paths, app: string) => join(historyDir(p), `${app}.jsonl`);

const missing = (err: unknown) => (err as NodeJS.ErrnoException)?.code === 'ENOENT';

/** Appends one record to its app's history, rotating first when the file has reached `maxBytes`. */
export async function appendHistory(
  sys: Sys,
  p: Paths,
  record: HistoryRecord,
  maxBytes = HISTORY_MAX_BYTES,
): Promise<void> {
  const file = historyFile(p, record.app);
  await sys.fs.mkdir(historyDir(p), 0o700);
  let size = await sizeOf(sys, file);
  if (size >= maxBytes && (await rotate(sys, p, record.app, maxBytes))) size = await sizeOf(sys, file);
  let line = JSON.stringify(record) + '\n';
  // a run killed mid-write left a torn last line: this record starts a line of its own
  if (size > 0 && !(await sys.fs.readFrom(file, size - 1)).text.startsWith('\n')) line = '\n' + line;
  await sys.fs.append(file, line, 0o600);
}

async function sizeOf(sys: Sys, file: string): Promise<number> {
  try {
    return (await sys.fs.stat(file)).size;
  } catch (err) {
    if (missing(err)) return 0;
    throw err;
  }
}

/** APP.jsonl becomes APP.jsonl.1 (replacing the older one), unless another run is rotating it right now. */
async function rotate(sys: Sys, p: Paths, app: string, maxBytes: number): Promise<boolean> {
  await sys.fs.mkdir(p.runDir, 0o700);
  let lock;
  try {
    lock = await takeLock(sys, p, `${app}.history`, `rotate the history of ${app}`, () => {});
  } catch {
    return false; // another run rotates it; this record goes to whichever file is there
  }
  try {
    const file = historyFile(p, app);
    if ((await sizeOf(sys, file)) < maxBytes) return false; // rotated by the run that held the lock
    await sys.fs.rename(file, `${file}.1`);
    return true;
  } finally {
    await lock.release();
  }
}

/** What a history file held: its records, oldest first, and how many lines were not records (torn by a kill). */
export interface HistoryRead {
  records: HistoryRecord[];
  skipped: number;
}

/** The app's records, the rotated file's first, oldest first. */
export async function readHistory(sys: Sys, p: Paths, app: string): Promise<HistoryRead> {
  const out: HistoryRead = { records: [], skipped: 0 };
  for (const file of [`${historyFile(p, app)}.1`, historyFile(p, app)]) {
    let text: string;
    try {
      text = await sys.fs.read(file);
    } catch (err) {
      if (missing(err)) continue;
      throw err;
    }
    const read = parseHistory(text);
    out.records.push(...read.records);
    out.skipped += read.skipped;
  }
  return out;
}

/** JSON lines to records: a line that is not a whole record (a torn write) is counted and skipped. */
export function parseHistory(text: string): HistoryRead {
  const out: HistoryRead = { records: [], skipped: 0 };
  for (const line of text.split('\n')) {
    if (!line.trim()) continue;
    try {
      const r = JSON.parse(line);
      if (r && r.v === 1 && typeof r.app === 'string' && typeof r.action === 'string' && Array.isArray(r.steps))
        out.records.push(r);
      else out.skipped++;
    } catch {
      out.skipped++;
    }
  }
  return out;
}

/** Every app with a history file, rotated or not. */
export async function historyApps(sys: Sys, p: Paths): Promise<string[]> {
  const names = await sys.fs.readdir(historyDir(p)).catch((err) => (missing(err) ? [] : Promise.reject(err)));
  const apps = names.map((n) => /^(.+)\.jsonl(?:\.1)?$/.exec(n)?.[1]).filter((a): a is string => !!a);
  return [...new Set(apps)].sort();
}
