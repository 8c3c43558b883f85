// `portflip history --svg FILE`: records as a timeline of their steps, one row per run, failed steps in red.
//
// A pure function of the records, drawn in the benchmark's style (bench/results/*.svg). Step widths are on
// a log scale, log10(1 + ms): a 6 ms switch and a 30 s drain both show, and the legend says so.

import { formatMs } from '../core/duration.js';
import type { HistoryRecord, HistoryStep } from '../core/history.js';
import { drainMs, localTime, recordNote, sideText, switchMs } from './history.js';

const W = 1240;
const BARS_X = 520; // where each row's first step starts
const BARS_END = 1040; // the widest row ends here; totals to its right
/** The columns left of the steps: when, app, action (by), from -> to; x and how many characters fit. */
const COLUMNS = [
  { x: 20, chars: 19 },
  { x: 148, chars: 14 },
  { x: 240, chars: 17 },
  { x: 350, chars: 28 },
];
const ROW = 24;
const BAR = 14;
const NOTE = 14; // the extra line under a failed run: its step and message
const MAX_DECADE_PX = 60;
const RULER = [1, 10, 100, 1000, 10_000, 60_000];

/** Light fills so the step name reads in dark text; the failed step is red whatever it was. */
const COLOUR: Record<string, string> = {
  preflight: '#c7c7c7',
  repair: '#c5b0d5',
  retire: '#dadaeb',
  hold: '#fdd0a2',
  'stop-old': '#bdbdbd',
  start: '#9ecae1',
  ready: '#6baed6',
  'bind-check': '#c6dbef',
  open: '#a1d99b',
  switch: '#fd8d3c',
  release: '#fd8d3c',
  canary: '#fdae6b',
  rollback: '#fd8d3c',
  promote: '#fd8d3c',
  abort: '#fdae6b',
  verify: '#bcbddc',
  'canary-for': '#bcbddc',
  drain: '#74c476',
  stop: '#bdbdbd',
  restore: '#c5b0d5',
  cleanup: '#bdbdbd',
};
const HOOK_COLOUR = '#e7e7e7';
const FAILED = '#d62728';

/** Text as XML character data or an attribute value. */
export const esc = (s: string) =>
  s.replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]!);

const cut = (s: string, n: number) => (s.length > n ? `${s.slice(0, n - 1)}…` : s);
const fix = (n: number) => n.toFixed(1);

/** The steps a row draws: all but `done`, which is the whole run (the number at the row's end). */
const drawn = (r: HistoryRecord) => r.steps.filter((s) => s.step !== 'done');
const decades = (ms: number) => Math.log10(1 + Math.max(0, ms));

/**
 * Records (newest first, as `portflip history` lists them) to an SVG document: one row per record,
 * newest at the top, each step a bar as wide as log10(1 + its ms), the failed step red with its message
 * under the row; a ruler at the bottom shows how wide 1 ms ... 1 min are.
 */
export function historySvg(records: HistoryRecord[], title = 'portflip history'): string {
  const widest = Math.max(1, ...records.map((r) => drawn(r).reduce((sum, s) => sum + decades(s.durationMs) + 0.05, 0)));
  const pxPerDecade = Math.min(MAX_DECADE_PX, (BARS_END - BARS_X) / widest);
  const width = (ms: number) => Math.max(2, pxPerDecade * decades(ms));
  const steps = [...new Set(records.flatMap((r) => drawn(r).map((s) => s.step)))];
  const top = 92;
  const heights = records.map((r) => ROW + (r.result === 'failed' ? NOTE : 0));
  const rulerY = top + heights.reduce((a, b) => a + b, 0) + 24;
  const H = rulerY + 44;
  const out: string[] = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" ` +
      `font-family="sans-serif" font-size="11">`,
    `<rect x="0" y="0" width="${W}" height="${H}" fill="#ffffff"/>`,
    `<text x="20" y="22" font-size="15" font-weight="bold">${esc(title)}</text>`,
    `<text x="20" y="40" fill="#444">one row per run, newest at the top; each step a bar, its width on a log scale ` +
      `(log10(1 + ms): see the ruler); red: the step that failed; right: the whole run, its switch and drain</text>`,
  ];
  // legend: the steps drawn, and the failed mark
  let lx = 20;
  for (const s of [...steps, 'failed']) {
    const fill = s === 'failed' ? FAILED : (COLOUR[s] ?? HOOK_COLOUR);
    out.push(`<rect x="${lx}" y="52" width="12" height="12" fill="${fill}" stroke="#999"/>`);
    out.push(`<text x="${lx + 16}" y="62" fill="#444">${esc(s)}</text>`);
    lx += 16 + s.length * 6.5 + 14;
  }
  out.push(
    ...['when', 'app', 'action (by)', 'from -> to (port label)'].map(
      (h, c) => `<text x="${COLUMNS[c].x}" y="${top - 8}" fill="#555" font-weight="bold">${esc(h)}</text>`,
    ),
    `<text x="${BARS_X}" y="${top - 8}" fill="#555" font-weight="bold">steps</text>`,
    `<text x="${W - 10}" y="${top - 8}" text-anchor="end" fill="#555" font-weight="bold">run / switch / drain</text>`,
  );
  let y = top;
  records.forEach((r, k) => {
    const failed = r.result === 'failed';
    out.push(
      `<rect x="10" y="${y}" width="${W - 20}" height="${heights[k]}" fill="${k % 2 ? '#ffffff' : '#fafafa'}"/>`,
      ...rowTitle(r).map(
        (t, c) =>
          `<text x="${COLUMNS[c].x}" y="${y + 16}" fill="${failed ? FAILED : '#000'}">` +
          `${esc(cut(t, COLUMNS[c].chars))}</text>`,
      ),
    );
    let x = BARS_X;
    for (const s of drawn(r)) {
      const w = width(s.durationMs);
      out.push(bar(s, x, y + (ROW - BAR) / 2, w));
      x += w + pxPerDecade * 0.05;
    }
    const times = [
      formatMs(r.durationMs),
      ...[switchMs(r), drainMs(r)].map((v) => (v === undefined ? '-' : formatMs(v))),
    ];
    out.push(
      `<text x="${W - 10}" y="${y + 16}" text-anchor="end" fill="${failed ? FAILED : '#070'}">${esc(
        `${failed ? `FAIL ${r.exitCode}  ` : ''}${times.join(' / ')}`,
      )}</text>`,
    );
    if (failed)
      out.push(`<text x="${BARS_X}" y="${y + ROW + 8}" fill="${FAILED}">${esc(cut(recordNote(r), 110))}</text>`);
    y += heights[k];
  });
  if (!records.length) out.push(`<text x="20" y="${top + 16}" fill="#777">nothing recorded</text>`);
  // the ruler: how wide a bar of 1 ms ... 1 min is, from where the steps start
  out.push(
    `<line x1="${BARS_X}" x2="${fix(BARS_X + width(RULER.at(-1)!))}" y1="${rulerY}" y2="${rulerY}" stroke="#999"/>`,
    `<text x="${BARS_X - 6}" y="${rulerY + 4}" text-anchor="end" fill="#555">a step as wide as this mark took:</text>`,
  );
  for (const ms of RULER) {
    const x = fix(BARS_X + width(ms));
    out.push(
      `<line x1="${x}" x2="${x}" y1="${rulerY - 4}" y2="${rulerY + 4}" stroke="#999"/>`,
      `<text x="${x}" y="${rulerY + 18}" text-anchor="middle" fill="#555">${formatMs(ms)}</text>`,
    );
  }
  out.push('</svg>');
  return out.join('\n') + '\n';
}

/** When, app, action (by), from -> to: each cut to its column, so the row's steps keep their place. */
function rowTitle(r: HistoryRecord): string[] {
  const side = (x: HistoryRecord['from']) => cut(sideText(x), 13);
  return [localTime(r.startedAt), r.app, `${r.action} (${r.by})`, `${side(r.from)} -> ${side(r.to)}`];
}

function bar(s: HistoryStep, x: number, y: number, w: number): string {
  const failed = s.status === 'failed';
  const fill = failed ? FAILED : (COLOUR[s.step] ?? HOOK_COLOUR);
  const tip = `${s.step} ${s.status} ${formatMs(s.durationMs)}${s.detail ? `: ${s.detail}` : ''}`;
  const label = s.step.length * 6 + 6 <= w ? s.step : '';
  return (
    `<rect x="${fix(x)}" y="${y}" width="${fix(w)}" height="${BAR}" fill="${fill}"` +
    `${failed ? ' stroke="#8b0000" stroke-width="1.5"' : ''}><title>${esc(tip)}</title></rect>` +
    (label
      ? `<text x="${fix(x + 3)}" y="${y + 11}" font-size="10" fill="${failed ? '#fff' : '#222'}">${esc(label)}</text>`
      : '')
  );
}
