// `portflip history`: what changed each app (deploys, rollbacks, repairs ...), newest first, as a table or JSON lines.

import { formatMs } from '../core/duration.js';
import { fail } from '../core/errors.js';
import { historyApps, historyDir, readHistory, type HistoryRecord, type HistorySide } from '../core/history.js';
import { readState } from '../core/state.js';
import type { Ctx } from '../ops/context.js';
import { appChain } from '../os/iptables.js';

/** The last `limit` records of one app, or of every app, newest first; `skipped`: torn lines left out. */
export async function history(
  ctx: Ctx,
  app: string | undefined,
  limit: number,
): Promise<{ records: HistoryRecord[]; skipped: number }> {
  if (app !== undefined) appChain(app); // refuses a name no app can have, before it becomes a file name
  const apps = app === undefined ? await historyApps(ctx.sys, ctx.paths) : [app];
  const all: HistoryRecord[] = [];
  let skipped = 0;
  for (const a of apps) {
    const read = await readHistory(ctx.sys, ctx.paths, a);
    all.push(...read.records);
    skipped += read.skipped;
  }
  if (app !== undefined && !all.length && !(await readState(ctx.sys, ctx.paths, app).catch(() => null)))
    fail('nothingToDo', `no app named "${app}" here (no history in ${historyDir(ctx.paths)} and no state file)`);
  return { records: newestFirst(all).slice(0, limit), skipped };
}

/** Newest first; records of one instant keep the reverse of their order in the file. */
export function newestFirst(records: HistoryRecord[]): HistoryRecord[] {
  return records
    .map((r, i) => ({ r, i }))
    .sort((a, b) => (a.r.startedAt < b.r.startedAt ? 1 : a.r.startedAt > b.r.startedAt ? -1 : b.i - a.i))
    .map((x) => x.r);
}

/** The steps that move new connections, by action: the "switch" of the table. */
const SWITCH_STEPS = ['switch', 'release', 'canary', 'rollback', 'promote', 'abort'];

export const switchMs = (r: HistoryRecord) => r.steps.find((s) => SWITCH_STEPS.includes(s.step))?.durationMs;
export const drainMs = (r: HistoryRecord) => r.steps.find((s) => s.step === 'drain')?.durationMs;

/** "8001 v1.4" */
export const sideText = (s: HistorySide | undefined) => (s ? `${s.port}${s.label ? ` ${s.label}` : ''}` : '-');

/** Local time, to the second: "2026-12-03 11:40:24". */
export function localTime(iso: string): string {
  const d = new Date(iso);
  const two = (n: number) => String(n).padStart(2, '0');
  return (
    `${d.getFullYear()}-${two(d.getMonth() + 1)}-${two(d.getDate())} ` +
    `${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}`
  );
}

/** What went wrong, or what a repair put back: one line. */
export function recordNote(r: HistoryRecord): string {
  if (r.error) return `${r.error.step ? `${r.error.step}: ` : ''}${r.error.message}`.replace(/\s*\n\s*/g, ' ');
  if (r.repaired?.length) return `repaired: ${r.repaired.join('; ')}`;
  return '';
}

/** The table people read: one line per record, newest first. */
export function formatHistory(records: HistoryRecord[]): string {
  const ms = (v: number | undefined) => (v === undefined ? '-' : formatMs(v));
  const rows = [['WHEN', 'APP', 'ACTION', 'BY', 'RESULT', 'FROM -> TO', 'TOOK', 'SWITCH', 'DRAIN', 'DETAIL']];
  for (const r of records) {
    rows.push([
      localTime(r.startedAt),
      r.app,
      r.action,
      r.by,
      r.result === 'ok' ? 'ok' : `FAIL ${r.exitCode}`,
      `${sideText(r.from)} -> ${sideText(r.to)}`,
      ms(r.durationMs),
      ms(switchMs(r)),
      ms(drainMs(r)),
      recordNote(r),
    ]);
  }
  const widths = rows[0].map((_, c) => Math.max(...rows.map((row) => row[c].length)));
  return rows
    .map((row) =>
      row
        .map((cell, c) => (c === row.length - 1 ? cell : cell.padEnd(widths[c])))
        .join('  ')
        .trimEnd(),
    )
    .join('\n');
}
