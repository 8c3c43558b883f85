// Benchmark analysis and output: percentiles, restart windows, per-bin series, the markdown summary and the SVG charts.

export const ERROR_KINDS = ['refused', 'reset', 'timeout', 'non2xx', 'other'];
export const WINDOW_AFTER_MS = 2000; // a restart window runs from the restart's start to 2 s after it finished
export const BIN_MS = 250; // time bins for the per-window percentiles and the charts

export function percentile(sorted, p) {
  if (sorted.length === 0) return null;
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))];
}

const kindGroup = (k) => (ERROR_KINDS.includes(k) ? k : 'other');

// records: [[scheduledMs, latencyMs, kind]]; latency counts every request, failed ones included.
export function summarize(records) {
  const lat = records.map((r) => r[1]).sort((a, b) => a - b);
  const errors = Object.fromEntries(ERROR_KINDS.map((k) => [k, 0]));
  let failed = 0;
  for (const [, , k] of records) {
    if (k === 'ok') continue;
    failed++;
    errors[kindGroup(k)]++;
  }
  return { requests: records.length, failed, errors, p50: percentile(lat, 50), p99: percentile(lat, 99), max: lat.length ? lat[lat.length - 1] : null };
}

// Restarts are [{startMs, endMs}] relative to the load's t0.
export function windowsOf(restarts) {
  return restarts.map((r) => [r.startMs, r.endMs + WINDOW_AFTER_MS]);
}

export function inWindows(records, windows) {
  return records.filter(([t]) => windows.some(([a, b]) => t >= a && t < b));
}

export function series(records, endMs) {
  const bins = Math.max(1, Math.ceil(endMs / BIN_MS));
  const lat = Array.from({ length: bins }, () => []);
  const err = Array.from({ length: bins }, () => Object.fromEntries(ERROR_KINDS.map((k) => [k, 0])));
  for (const [t, l, k] of records) {
    const i = Math.min(bins - 1, Math.max(0, Math.floor(t / BIN_MS)));
    lat[i].push(l);
    if (k !== 'ok') err[i][kindGroup(k)]++;
  }
  return lat.map((l, i) => {
    l.sort((a, b) => a - b);
    return { t: i * BIN_MS, n: l.length, p50: percentile(l, 50), p99: percentile(l, 99), max: l.length ? l[l.length - 1] : null, errors: err[i] };
  });
}

export const median = (xs) => {
  const s = xs.filter((x) => typeof x === 'number').sort((a, b) => a - b);
  if (s.length === 0) return null;
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};

const ms = (v) => (v === null || v === undefined ? '-' : v >= 100 ? `${Math.round(v)}` : v >= 10 ? v.toFixed(1) : v.toFixed(2));
const ratio = (a, b) => (a === null || b === null || a === undefined || b === undefined || b === 0 ? '-' : `${(a / b).toFixed(2)}x`);

export function modeTable(run) {
  const base = run.contenders.baseline?.overall;
  const lines = [
    '| contender | requests | failed | refused | reset | timeout | non-2xx | other | p50 ms | p99 ms | max ms | in restart windows: requests | failed | p50 ms | p99 ms | max ms | p99 / baseline p99 (overall, in windows) |',
    '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|',
  ];
  for (const [name, c] of Object.entries(run.contenders)) {
    if (c.skipped) {
      lines.push(`| ${c.title} | skipped: ${c.skipped.replace(/\|/g, '/').replace(/\n/g, ' ').slice(0, 200)} |||||||||||||||`);
      continue;
    }
    const o = c.overall;
    const w = c.windows;
    const e = o.errors;
    const win = name === 'baseline' ? ['-', '-', '-', '-', '-'] : [w.requests, w.failed, ms(w.p50), ms(w.p99), ms(w.max)];
    const r = name === 'baseline' ? '1.00x' : `${ratio(o.p99, base?.p99)}, ${ratio(w.p99, base?.p99)}`;
    lines.push(`| ${c.title} | ${o.requests} | **${o.failed}** | ${e.refused} | ${e.reset} | ${e.timeout} | ${e.non2xx} | ${e.other} | ${ms(o.p50)} | ${ms(o.p99)} | ${ms(o.max)} | ${win.join(' | ')} | ${r} |`);
  }
  return lines.join('\n');
}

// ---------- SVG: one chart per mode, one panel per contender, hand-written ----------
const esc = (s) => String(s).replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');

export function chartSvg(run) {
  const names = Object.keys(run.contenders).filter((n) => !run.contenders[n].skipped);
  const W = 1000;
  const left = 70;
  const right = 150;
  const panelH = 150;
  const gap = 34;
  const top = 58;
  const H = top + names.length * (panelH + gap) + 30;
  const plotW = W - left - right;
  const endMs = Math.max(...names.map((n) => run.contenders[n].durationMs), 1000);
  const x = (t) => left + (t / endMs) * plotW;
  // Latency on a log axis, 0.5 ms to 10 s: a SYN retransmit stall (1 s, 3 s) and a 2 ms answer fit on one chart.
  const LMIN = 0.5;
  const LMAX = 10_000;
  const y = (v, y0) => {
    const c = Math.min(LMAX, Math.max(LMIN, v));
    const f = (Math.log10(c) - Math.log10(LMIN)) / (Math.log10(LMAX) - Math.log10(LMIN));
    return y0 + panelH - f * panelH;
  };
  const out = [];
  out.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="sans-serif" font-size="11">`);
  out.push(`<rect x="0" y="0" width="${W}" height="${H}" fill="#ffffff"/>`);
  out.push(`<text x="${left}" y="22" font-size="15" font-weight="bold">${esc(`Restarts under load: ${run.modeTitle}, ${run.rate} req/s open loop`)}</text>`);
  out.push(`<text x="${left}" y="40" fill="#444">${esc(`median (dark blue) and max (light blue) latency per ${BIN_MS} ms, from each request's scheduled time, log scale; red bars: failed requests per bin; orange dashes: restart starts; grey: restart windows`)}</text>`);
  names.forEach((name, i) => {
    const c = run.contenders[name];
    const y0 = top + i * (panelH + gap) + 14;
    out.push(`<text x="${left}" y="${y0 - 4}" font-size="13" font-weight="bold">${esc(c.title)}</text>`);
    out.push(`<text x="${left + plotW}" y="${y0 - 4}" text-anchor="end" fill="${c.overall.failed ? '#c00' : '#070'}">${esc(`${c.overall.failed} failed of ${c.overall.requests}; p99 ${ms(c.overall.p99)} ms, in windows ${ms(c.windows.p99)} ms`)}</text>`);
    out.push(`<rect x="${left}" y="${y0}" width="${plotW}" height="${panelH}" fill="#fafafa" stroke="#999"/>`);
    for (const [a, b] of c.restartWindows) {
      out.push(`<rect x="${x(a).toFixed(1)}" y="${y0}" width="${Math.max(1, x(Math.min(b, endMs)) - x(a)).toFixed(1)}" height="${panelH}" fill="#000" fill-opacity="0.07"/>`);
    }
    for (const v of [1, 10, 100, 1000, 10000]) {
      const yy = y(v, y0).toFixed(1);
      out.push(`<line x1="${left}" x2="${left + plotW}" y1="${yy}" y2="${yy}" stroke="#ddd"/>`);
      out.push(`<text x="${left - 5}" y="${(+yy + 4).toFixed(1)}" text-anchor="end" fill="#555">${v >= 1000 ? `${v / 1000} s` : `${v} ms`}</text>`);
    }
    // Failed requests per bin, scaled to the panel's worst bin, drawn from the bottom.
    const maxErr = Math.max(1, ...c.series.map((s) => Object.values(s.errors).reduce((a, b) => a + b, 0)));
    const bw = Math.max(1, (BIN_MS / endMs) * plotW - 0.5);
    for (const s of c.series) {
      const n = Object.values(s.errors).reduce((a, b) => a + b, 0);
      if (!n) continue;
      const hgt = (n / maxErr) * panelH * 0.9;
      out.push(`<rect x="${x(s.t).toFixed(1)}" y="${(y0 + panelH - hgt).toFixed(1)}" width="${bw.toFixed(1)}" height="${hgt.toFixed(1)}" fill="#d00" fill-opacity="0.75"><title>${esc(`${n} failed at ${(s.t / 1000).toFixed(2)} s: ${JSON.stringify(s.errors)}`)}</title></rect>`);
    }
    if (maxErr > 1 || c.overall.failed) out.push(`<text x="${left + plotW + 6}" y="${(y0 + panelH * 0.1 + 4).toFixed(1)}" fill="#d00">${maxErr} failed/bin</text>`);
    const line = (key, color, width) => {
      const pts = c.series.filter((s) => s[key] !== null).map((s) => `${x(s.t + BIN_MS / 2).toFixed(1)},${y(s[key], y0).toFixed(1)}`);
      if (pts.length) out.push(`<polyline points="${pts.join(' ')}" fill="none" stroke="${color}" stroke-width="${width}"/>`);
    };
    // Per bin, median and max: a bin holds about rate/4 requests, too few for its p99 to differ from its max.
    line('max', '#8fbbe8', 1.2);
    line('p50', '#1f4f98', 1.6);
    for (const r of c.restarts) {
      const xx = x(r.startMs).toFixed(1);
      out.push(`<line x1="${xx}" x2="${xx}" y1="${y0}" y2="${y0 + panelH}" stroke="#e08000" stroke-width="1.5" stroke-dasharray="4,3"/>`);
    }
    // Legend of error kinds on the right.
    let ly = y0 + 30;
    for (const k of ERROR_KINDS) {
      const n = c.overall.errors[k];
      out.push(`<text x="${left + plotW + 6}" y="${ly}" fill="${n ? '#c00' : '#777'}">${esc(`${k}: ${n}`)}</text>`);
      ly += 14;
    }
    for (let t = 0; t <= endMs; t += 5000) {
      out.push(`<text x="${x(t).toFixed(1)}" y="${y0 + panelH + 13}" text-anchor="middle" fill="#555">${t / 1000} s</text>`);
    }
  });
  out.push('</svg>');
  return `${out.join('\n')}\n`;
}

export { ms as fmtMs, ratio as fmtRatio };
