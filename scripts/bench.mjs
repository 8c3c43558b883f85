// npm run bench: restarts under open-loop load, portflip side by side with the alternatives, all inside throwaway netns.
//
// Phases: (1) per load mode (new connection per request, keep-alive) and per contender (baseline, portflip, plain
// restart, SYN-drop restart, pm2 reload), a fresh server/client namespace pair, the same fixed-rate load from the
// client namespace over the veth, and the same number of restarts; (2) the redirect's steady-state cost, public port
// versus instance port, alternated; (3) the switch commit time with 1, 100 and 1000 apps' chains present; (4) the app
// dimension: keep-alive load at 200 and 1000 req/s, every contender restarting the fixture, a plain Node server.close()
// app and nginx, each run 3 times (`--apps-only` runs just this phase); (5) portflip's own cost beside
// `node -e 0` (`--own-only` runs just this, into bench/results/OWN-COST.md); (6) marking Connection: close on
// draining instances: the servers people run with it on and off, and what the queue costs (`--marking-only`, into
// bench/results/MARKING.md; scripts/bench/marking.mjs).
// Writes bench/results/latest.json (gitignored), bench/results/SUMMARY.md and one SVG chart per mode, and for phase 4
// bench/results/APPS.md (medians and spread) and apps.json (gitignored).
// Nothing here touches the root namespace's rules: every iptables call and every app runs inside our namespaces.
import { $ } from 'zx';
import { mkdirSync, readlinkSync, readdirSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import * as h from '../dist/test/helpers/netns.js';
import { APPS, CLEAN_ENV, contenders, portflipDeploy, PUBLIC_PORT, removeAppDirs, START_DELAY_MS, sleep } from './bench/contenders.mjs';
import { ownCostMarkdown, runOwnCost } from './bench/own-cost.mjs';
import { markingMarkdown, runMarkingPhase } from './bench/marking.mjs';
import { chartSvg, fmtMs, fmtRatio, inWindows, median, modeTable, percentile, series, summarize, windowsOf, WINDOW_AFTER_MS } from './bench/report.mjs';

const { values: opt } = parseArgs({
  options: {
    quick: { type: 'boolean', default: false },
    only: { type: 'string' }, // comma-separated contenders, for debugging; the summary then says it is partial
    modes: { type: 'string' },
    'skip-cost': { type: 'boolean', default: false },
    'skip-scale': { type: 'boolean', default: false },
    // phase 4, the app dimension: keep-alive load, each contender x app x rate run --reps times
    apps: { type: 'string', default: 'fixture,node,nginx' },
    'app-rates': { type: 'string', default: '200,1000' },
    reps: { type: 'string', default: '3' },
    'skip-apps': { type: 'boolean', default: false },
    'skip-own': { type: 'boolean', default: false }, // portflip's own cost (status, deploy overhead, switch) beside node -e 0
    'apps-only': { type: 'boolean', default: false }, // only phase 4; writes bench/results/APPS.md
    'own-only': { type: 'boolean', default: false }, // only portflip's own cost; writes bench/results/OWN-COST.md
    'marking-only': { type: 'boolean', default: false }, // only phase 6; writes bench/results/MARKING.md
    'skip-marking': { type: 'boolean', default: false },
  },
});

const CFG = opt.quick
  ? { rate: 100, restarts: 2, leadMs: 1000, tailMs: 1500, spacingMs: 3000, gapAfterMs: WINDOW_AFTER_MS, baselineMs: 6000,
      costRounds: 1, costMs: 1000, costConcurrency: 8, scaleSizes: [1, 100, 1000], scaleDeploys: 1, commitReps: 3 }
  : { rate: 200, restarts: 5, leadMs: 1500, tailMs: 2000, spacingMs: 3000, gapAfterMs: WINDOW_AFTER_MS, baselineMs: 12000,
      costRounds: 3, costMs: 1500, costConcurrency: 8, scaleSizes: [1, 100, 1000], scaleDeploys: 3, commitReps: 5 };
const TIMEOUT_MS = 5000; // per request, counted from its scheduled time
const RUN_HARD_LIMIT_MS = 120_000; // the load generator stops by itself after this, whatever happens here
const MODES = { new: 'new connection per request', keepalive: 'keep-alive connections' };
const modes = opt.modes ? opt.modes.split(',') : Object.keys(MODES);
const names = opt.only ? opt.only.split(',') : Object.keys(contenders);
const LOAD = path.join(h.repoRoot, 'scripts', 'bench', 'load.mjs');
// Only a full default run replaces the committed summary and charts; a --quick or partial run writes to a temp dir.
const PARTIAL = opt.quick || Boolean(opt.only || opt.modes || opt['skip-cost'] || opt['skip-scale'] || opt['skip-own'] || opt['apps-only'] || opt['own-only'] || opt['marking-only'] || opt['skip-marking']);
// The app phase has its own summary (APPS.md): a default --apps-only run replaces the committed one.
const APPS_PARTIAL = opt.quick || Boolean(opt.only || opt.apps !== 'fixture,node,nginx' || opt['app-rates'] !== '200,1000' || opt.reps !== '3');
const APPS_OUT = APPS_PARTIAL ? path.join(os.tmpdir(), 'portflip-bench-quick') : path.join(h.repoRoot, 'bench', 'results');
const APP_CFG = { restarts: 3, baselineMs: 8000 };
const OUT = PARTIAL ? path.join(os.tmpdir(), 'portflip-bench-quick') : path.join(h.repoRoot, 'bench', 'results');

const began = performance.now();
const log = (msg) => process.stderr.write(`[bench ${((performance.now() - began) / 1000).toFixed(1)}s] ${msg}\n`);

// ---------- namespaces, cleaned up by pid on any exit (netns.js kills its own groups and holders on SIGINT/SIGTERM) ----------
const nsLinks = new Set(); // /proc/PID/ns/net of every namespace we made: any process in one of them is ours
function killOurNamespaces() {
  if (nsLinks.size === 0) return 0;
  let n = 0;
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry) || Number(entry) === process.pid) continue;
    try {
      if (!nsLinks.has(readlinkSync(`/proc/${entry}/ns/net`))) continue;
      process.kill(Number(entry), 'SIGKILL');
      n++;
    } catch {}
  }
  return n;
}
process.on('exit', killOurNamespaces);

async function withNetns(fn) {
  const ns = await h.createNetns({ peer: true });
  const links = [ns.pid, ns.clientPid].map((p) => readlinkSync(`/proc/${p}/ns/net`));
  links.forEach((l) => nsLinks.add(l));
  try {
    return await fn(ns);
  } finally {
    killOurNamespaces();
    await ns.destroy();
    links.forEach((l) => nsLinks.delete(l));
  }
}

// ---------- the load generator, in the client namespace ----------
async function startLoad(ns, args) {
  const child = ns.spawnClient(process.execPath, [LOAD, ...args, '--timeout', String(TIMEOUT_MS), '--duration', String(RUN_HARD_LIMIT_MS)]);
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d) => (stdout += d));
  child.stderr.on('data', (d) => (stderr += d));
  child.stdin.on('error', () => {});
  const exited = new Promise((r) => child.once('exit', r));
  await h.waitFor(() => {
    if (child.exitCode !== null) throw new Error(`load exited early: ${stderr}`);
    return /^start \d+/m.test(stderr);
  }, 10_000, 'the load generator to start');
  const finish = async () => {
    child.stdin.end('stop\n');
    const t = setTimeout(() => {
      try {
        process.kill(-child.pid, 'SIGKILL');
      } catch {}
    }, TIMEOUT_MS + 8000);
    await exited;
    clearTimeout(t);
    try {
      return JSON.parse(stdout.trim().split('\n').pop());
    } catch {
      throw new Error(`load gave no result: ${stderr.slice(-500)}`);
    }
  };
  return { finish };
}

// ---------- phase 1: one contender under one load mode ----------
async function runContender(mode, name, o = {}) {
  const c = contenders[name];
  const rate = o.rate ?? CFG.rate;
  const nRestarts = o.restarts ?? CFG.restarts;
  const baselineMs = o.baselineMs ?? CFG.baselineMs;
  return withNetns(async (ns) => {
    const ctx = { ns, app: o.app ? APPS[o.app] : undefined };
    let url;
    try {
      url = await c.setup(ctx);
    } catch (err) {
      await c.teardown(ctx).catch(() => {});
      if (name === 'pm2') return { title: c.title, skipped: `pm2 could not run here: ${err.message}` };
      throw err;
    }
    const restarts = [];
    let load;
    try {
      load = await startLoad(ns, ['--url', url, '--mode', mode, '--rate', String(rate)]);
      const t0 = Date.now();
      await sleep(CFG.leadMs);
      if (c.restarts) {
        for (let i = 1; i <= nRestarts; i++) {
          const start = Date.now();
          let detail;
          let error;
          try {
            detail = await c.restart(ctx, i);
          } catch (err) {
            error = err.message;
            log(`  ${name} restart ${i} failed: ${error}`);
          }
          const end = Date.now();
          restarts.push({ start, end, durationMs: end - start, ...(detail ?? {}), ...(error ? { error } : {}) });
          if (error) break; // the app may be down; the rest of the run would not be a restart benchmark
          if (i < nRestarts) await sleep(Math.max(start + CFG.spacingMs, end + CFG.gapAfterMs) - Date.now());
        }
        await sleep(Math.max(CFG.tailMs, CFG.gapAfterMs));
      } else {
        await sleep(Math.max(0, t0 + baselineMs - Date.now()));
      }
    } finally {
      const result = load ? await load.finish() : undefined;
      await c.teardown(ctx).catch((err) => log(`  teardown ${name}: ${err.message}`));
      ctx.result = result;
    }
    const { t0, records, firstErrors } = ctx.result;
    const rel = restarts.map((r) => ({ ...r, startMs: r.start - t0, endMs: r.end - t0 }));
    const windows = windowsOf(rel);
    const durationMs = records.length ? records[records.length - 1][0] + 1 : 0;
    return {
      title: c.title,
      url,
      durationMs,
      restarts: rel,
      restartWindows: windows,
      overall: summarize(records),
      windows: summarize(inWindows(records, windows)),
      firstErrors,
      series: series(records, durationMs),
    };
  });
}

// ---------- phase 2: the redirect's steady-state cost ----------
async function runCost() {
  return withNetns(async (ns) => {
    const dirs = h.tmpDirs();
    try {
      // instance ports are private by default; the direct side of this comparison needs them reachable
      const d = await portflipDeploy(ns, dirs, 'v0', undefined, { ...APPS.fixture, portflipFlags: [...APPS.fixture.portflipFlags, '--expose-ports'] });
      const targets = { public: `http://${h.SERVER_ADDR}:${PUBLIC_PORT}/`, direct: `http://${h.SERVER_ADDR}:${d.port}/` };
      const out = {};
      for (const mode of modes) {
        const acc = { public: { ok: 0, ms: 0, lat: [], rounds: [] }, direct: { ok: 0, ms: 0, lat: [], rounds: [] } };
        for (let round = 0; round < CFG.costRounds; round++) {
          // ABBA order, so drift over time (a warming JIT, a busy neighbour) does not favour one side.
          for (const target of round % 2 ? ['direct', 'public'] : ['public', 'direct']) {
            const load = await startLoad(ns, ['--url', targets[target], '--mode', mode, '--closed', String(CFG.costConcurrency)]);
            await sleep(CFG.costMs);
            const r = await load.finish();
            const ok = r.records.filter((x) => x[2] === 'ok');
            const lastSched = r.records.length ? r.records[r.records.length - 1][0] : CFG.costMs;
            const span = Math.max(lastSched, 1);
            acc[target].ok += ok.length;
            acc[target].ms += span;
            for (const x of r.records) acc[target].lat.push(x[1]);
            acc[target].rounds.push({ reqPerS: Math.round((ok.length / span) * 1000), failed: r.records.length - ok.length });
          }
        }
        const res = {};
        for (const t of ['public', 'direct']) {
          const a = acc[t];
          a.lat.sort((x, y) => x - y);
          res[t] = { reqPerS: Math.round((a.ok / a.ms) * 1000), p50: percentile(a.lat, 50), p99: percentile(a.lat, 99), rounds: a.rounds };
        }
        res.throughputRatio = res.public.reqPerS / res.direct.reqPerS;
        res.p99Ratio = res.public.p99 / res.direct.p99;
        out[mode] = res;
        log(`  cost ${mode}: public ${res.public.reqPerS} req/s p99 ${fmtMs(res.public.p99)} ms, direct ${res.direct.reqPerS} req/s p99 ${fmtMs(res.direct.p99)} ms`);
      }
      // every connection through the redirect is a conntrack entry that outlives it (TIME_WAIT): how many the run left
      const ct = await ns.exec('cat', ['/proc/sys/net/netfilter/nf_conntrack_count', '/proc/sys/net/netfilter/nf_conntrack_max']);
      const [conntrackCount, conntrackMax] = ct.stdout.trim().split('\n').map(Number);
      await h.portflip(ns, ['stop', 'web', '--json'], dirs, { timeoutMs: 20_000, env: CLEAN_ENV }).catch(() => {});
      return { concurrency: CFG.costConcurrency, roundMs: CFG.costMs, rounds: CFG.costRounds, instancePort: d.port, modes: out, conntrackCount, conntrackMax };
    } finally {
      dirs.cleanup();
    }
  });
}

// ---------- phase 3: switch commit time with many apps' chains present ----------
async function runScale() {
  return withNetns(async (ns) => {
    const dirs = h.tmpDirs();
    try {
      let d = await portflipDeploy(ns, dirs, 'v0');
      let fakes = 0;
      const rows = [];
      let version = 1;
      for (const size of CFG.scaleSizes) {
        // Other apps as portflip would lay them out: a PF- chain with its redirect, and a jump from PORTFLIP.
        const lines = ['*nat'];
        for (let k = fakes + 1; k <= size - 1; k++) lines.push(`:PF-fake${k} - [0:0]`);
        for (let k = fakes + 1; k <= size - 1; k++) {
          lines.push(`-A PF-fake${k} -p tcp -j REDIRECT --to-ports ${40000 + k}`);
          lines.push(`-A PORTFLIP -p tcp -m tcp --dport ${30000 + k} -j PF-fake${k}`);
        }
        lines.push('COMMIT', '');
        if (size - 1 > fakes) {
          const r = await ns.exec('iptables-restore', ['--noflush'], { input: lines.join('\n'), timeoutMs: 60_000 });
          if (r.code !== 0) throw new Error(`adding fake chains failed: ${r.stderr}`);
          fakes = size - 1;
        }
        const save = await ns.exec('iptables-save', ['-t', 'nat']);
        const chains = save.stdout.split('\n').filter((l) => l.startsWith(':PF-')).length;
        const switches = [];
        for (let i = 0; i < CFG.scaleDeploys; i++) {
          d = await portflipDeploy(ns, dirs, `v${version++}`, 0); // no traffic here: skip the 1 s start-up
          switches.push(d.steps.switchMs);
        }
        // The commit alone, as the process sees it: the same text a switch commits, to the port already active.
        const text = `*nat\n:PF-web - [0:0]\n-A PF-web -p tcp -j REDIRECT --to-ports ${d.port}\nCOMMIT\n`;
        const commits = [];
        for (let i = 0; i < CFG.commitReps; i++) {
          const t = performance.now();
          const r = await ns.exec('iptables-restore', ['--noflush'], { input: text });
          commits.push(performance.now() - t);
          if (r.code !== 0) throw new Error(`iptables-restore of the switch text failed: ${r.stderr}`);
        }
        rows.push({ apps: size, pfChains: chains, switchMs: switches, switchMedianMs: median(switches), commitMs: commits, commitMedianMs: median(commits) });
        log(`  scale ${size} apps (${chains} PF- chains): switch step median ${fmtMs(median(switches))} ms, bare iptables-restore ${fmtMs(median(commits))} ms`);
      }
      await h.portflip(ns, ['stop', 'web', '--json'], dirs, { timeoutMs: 20_000, env: CLEAN_ENV }).catch(() => {});
      const base = rows[0];
      for (const r of rows) {
        r.switchRatio = r.switchMedianMs / base.switchMedianMs;
        r.commitRatio = r.commitMedianMs / base.commitMedianMs;
      }
      return rows;
    } finally {
      dirs.cleanup();
    }
  });
}

// ---------- the summary ----------
function verdictFor(results) {
  const lines = [];
  let pass = true;
  for (const mode of modes) {
    const run = results.runs[mode];
    const p = run?.contenders.portflip;
    const b = run?.contenders.baseline;
    if (!p || !b || p.skipped) {
      pass = false;
      lines.push(`- ${MODES[mode]}: not measured in this run.`);
      continue;
    }
    const restartErrors = p.restarts.filter((r) => r.error);
    const failedOk = p.overall.failed === 0;
    const ratio = p.windows.p99 / b.overall.p99;
    const latOk = ratio <= 1.5;
    const doneOk = restartErrors.length === 0 && p.restarts.length === CFG.restarts;
    pass &&= failedOk && latOk && doneOk;
    lines.push(`- ${MODES[mode]}: ${p.overall.failed} failed of ${p.overall.requests} (${failedOk ? 'met' : '**missed**'}); p99 in restart windows ${fmtMs(p.windows.p99)} ms = ${ratio.toFixed(2)}x baseline p99 ${fmtMs(b.overall.p99)} ms (${latOk ? 'met' : '**missed**'}, mark 1.5x)${doneOk ? '' : `; **${restartErrors.length ? `restart failed: ${restartErrors[0].error}` : `only ${p.restarts.length} of ${CFG.restarts} restarts`}**`}.`);
  }
  return { pass, lines };
}

function markdown(results) {
  const v = verdictFor(results);
  const md = [];
  md.push('# Benchmark: restarts under load');
  md.push('');
  md.push(`Generated by \`npm run bench${opt.quick ? ' -- --quick' : ''}\` on ${results.date} (${results.host.cpus} CPUs, ${results.host.cpuModel}, Node ${process.version}, ${results.host.iptables}). Took ${Math.round(results.elapsedS)} s. Load average (1/5/15 min) at start ${results.host.loadavgAtStart.map((x) => x.toFixed(2)).join('/')}, at end ${results.host.loadavgAtEnd.map((x) => x.toFixed(2)).join('/')}: anything above 0 besides this benchmark is a neighbour competing for the same CPUs.`);
  if (PARTIAL) md.push(`\n**Quick or partial run**: not the full benchmark.`);
  md.push('');
  md.push(`Setup: a server and a client network namespace joined by a veth pair; the client sends ${CFG.rate} req/s **open loop** (each request is scheduled at a fixed time whatever happened to earlier ones, and its latency counts from that scheduled time, so a stall shows as latency) to \`GET /\` of the fixture app (\`test/fixtures/app.mjs\`, ${START_DELAY_MS} ms start-up, graceful SIGTERM drain). Per-request timeout ${TIMEOUT_MS} ms from the scheduled time. Each contender gets a fresh namespace pair and ${CFG.restarts} restarts, spaced at least ${CFG.spacingMs / 1000} s apart and ${CFG.gapAfterMs / 1000} s after the previous one finished. Latency percentiles include failed requests.`);
  md.push('');
  md.push(`**Restart window**: from the moment a restart starts until ${WINDOW_AFTER_MS / 1000} s after it has finished. This contains the issue's "2 s after each restart starts" and also covers what happens later in a slow restart (portflip's switch and drain come after its 1 s start-up; pm2's reload takes as long).`);
  md.push('');
  md.push('Contenders: **portflip** deploys through an iptables REDIRECT from port 80 (`--ready` HTTP, default `--drain auto`, which is `signal` for the fixture: a Node app with the drain module); **plain restart** sends SIGTERM, waits for the exit, starts the new instance on the same port; **SYN-drop restart** does the same between `iptables -I INPUT -p tcp --dport 8080 --syn -j DROP` and its deletion; **pm2 reload** runs the app in cluster mode (1 instance, `listen_timeout` and `kill_timeout` 10 s, `PM2_KILL_SIGNAL=SIGTERM` so the app drains); the **baseline** never restarts; **portflip in place (hold)** deploys with one instance port (`--ports 20001`): it holds new SYNs in an NFQUEUE, stops the old instance, starts the new one on the same port and releases the held SYNs once it is ready (docs/hold.md). All but the two portflip rows are reached on the instance port directly.');
  md.push('');
  md.push('## Verdict for portflip');
  md.push('');
  md.push(`Mark: 0 failed requests in both modes, and p99 inside the restart windows within 1.5x the baseline p99. **${v.pass ? 'portflip met its mark in this run.' : 'portflip MISSED its mark in this run.'}**`);
  md.push('');
  md.push(...v.lines);
  for (const mode of modes) {
    const run = results.runs[mode];
    if (!run) continue;
    md.push('');
    md.push(`## ${MODES[mode]}`);
    md.push('');
    md.push(modeTable(run));
    md.push('');
    const gaps = (run.contenders.inplace?.restarts ?? []).map((r) => r.steps?.holdGapMs).filter((g) => g !== undefined);
    if (gaps.length) {
      md.push(`portflip in place: measured restart gaps (hold to release, the most a held client waits): ${gaps.map(fmtMs).join(', ')} ms.`);
      md.push('');
    }
    md.push(`![${MODES[mode]}](${run.svg})`);
    const errs = Object.values(run.contenders).filter((c) => c.firstErrors?.length);
    if (errs.length) {
      md.push('');
      md.push('First errors seen:');
      for (const c of errs) md.push(`- ${c.title}: ${[...new Set(c.firstErrors)].slice(0, 3).map((e) => `\`${e}\``).join(', ')}`);
    }
    const restartErrs = Object.values(run.contenders).flatMap((c) => (c.restarts ?? []).filter((r) => r.error).map((r) => `${c.title}: ${r.error}`));
    if (restartErrs.length) md.push('', 'Restarts that failed:', ...restartErrs.map((e) => `- ${e.slice(0, 400)}`));
  }
  md.push('');
  md.push('## portflip step timings (median over its restarts, from `--json` step events)');
  md.push('');
  md.push('| mode | restarts | start-to-ready ms | switch commit ms | drain ms | total (done event) ms | whole command ms |');
  md.push('|---|---:|---:|---:|---:|---:|---:|');
  for (const mode of modes) {
    const p = results.runs[mode]?.contenders.portflip;
    if (!p?.restarts) continue;
    const s = p.restarts.filter((r) => r.steps).map((r) => r.steps);
    md.push(`| ${MODES[mode]} | ${s.length} | ${fmtMs(median(s.map((x) => x.startToReadyMs)))} | ${fmtMs(median(s.map((x) => x.switchMs)))} | ${fmtMs(median(s.map((x) => x.drainMs)))} | ${fmtMs(median(s.map((x) => x.totalMs)))} | ${fmtMs(median(p.restarts.map((r) => r.durationMs)))} |`);
  }
  md.push('');
  md.push('start-to-ready is the `start` plus `ready` steps (the app takes 1 s to start); "switch commit" is the `switch` step, which includes running `iptables-restore`; "whole command" includes Node start-up and preflight.');
  if (results.cost) {
    md.push('');
    md.push('## Steady-state cost of the redirect');
    md.push('');
    md.push(`Closed loop, ${results.cost.concurrency} concurrent requests, ${results.cost.rounds} rounds of ${results.cost.roundMs / 1000} s per side, alternated (public port ${PUBLIC_PORT} through the REDIRECT, then instance port ${results.cost.instancePort} directly, ABBA order), in the same namespace pair. Client and server share the same CPUs, so throughput is bounded by both.`);
    md.push('');
    md.push('| mode | public req/s | direct req/s | throughput ratio (public/direct) | public p99 ms | direct p99 ms | p99 ratio (public/direct) |');
    md.push('|---|---:|---:|---:|---:|---:|---:|');
    for (const [mode, r] of Object.entries(results.cost.modes)) {
      md.push(`| ${MODES[mode]} | ${r.public.reqPerS} | ${r.direct.reqPerS} | ${r.throughputRatio.toFixed(3)} | ${fmtMs(r.public.p99)} | ${fmtMs(r.direct.p99)} | ${r.p99Ratio.toFixed(3)} |`);
    }
    const fresh = results.cost.modes.new;
    if (fresh) {
      md.push('');
      md.push(`**New connections per second** (the row above with a new connection per request): the redirect sustained ${fresh.public.reqPerS}/s beside ${fresh.direct.reqPerS}/s direct (${fresh.throughputRatio.toFixed(2)}x), the highest rate this closed loop reaches on this machine. Each one is a conntrack entry kept 120 s after it closes: the run left ${results.cost.conntrackCount ?? '?'} entries (table max ${results.cost.conntrackMax ?? '?'}), and ${fresh.public.reqPerS}/s sustained would need about ${fresh.public.reqPerS * 120} (docs/firewalls.md, "The connection-tracking table").`);
    }
  }
  if (results.ownCost) md.push('', ownCostMarkdown(results.ownCost));
  if (results.scale) {
    md.push('');
    md.push('## Scale: switch commit time with many apps present');
    md.push('');
    md.push(`Other apps are simulated with \`PF-fakeN\` chains (a REDIRECT each, and a jump from \`PORTFLIP\`) added with iptables-restore inside the namespace. "switch step" is the median \`switch\` durationMs of ${CFG.scaleDeploys} real deploy(s); "bare commit" is the median wall time of ${CFG.commitReps} runs of \`iptables-restore --noflush\` with the switch text (process start-up included).`);
    md.push('');
    md.push('| apps | PF- chains | switch step ms | ratio to 1 app | bare commit ms | ratio to 1 app |');
    md.push('|---:|---:|---:|---:|---:|---:|');
    for (const r of results.scale) md.push(`| ${r.apps} | ${r.pfChains} | ${fmtMs(r.switchMedianMs)} | ${r.switchRatio.toFixed(2)}x | ${fmtMs(r.commitMedianMs)} | ${r.commitRatio.toFixed(2)}x |`);
  }
  if (results.phaseErrors.length) {
    md.push('', '## Phases that failed', '', ...results.phaseErrors.map((e) => `- ${e}`));
  }
  md.push('');
  md.push('Raw results: `bench/results/latest.json` (not committed). Numbers are measured, never tuned; a neighbour on the same CPUs during the run shows up in every column.');
  md.push('');
  return md.join('\n');
}

// ---------- phase 4: the app dimension (keep-alive), each contender x app x rate, --reps times ----------
async function runApps() {
  const out = { reps: Number(opt.reps), rates: opt['app-rates'].split(',').map(Number), apps: opt.apps.split(','), rows: [] };
  for (const app of out.apps) {
    for (const rate of out.rates) {
      for (const name of names) {
        const runs = [];
        for (let rep = 1; rep <= out.reps; rep++) {
          log(`apps: ${APPS[app].title}, ${rate} req/s, ${contenders[name].title}, run ${rep}/${out.reps}`);
          try {
            const r = await runContender('keepalive', name, { app, rate, restarts: APP_CFG.restarts, baselineMs: APP_CFG.baselineMs });
            if (r.skipped) {
              runs.push({ skipped: r.skipped });
              log(`  skipped: ${r.skipped}`);
              break;
            }
            runs.push({ requests: r.overall.requests, failed: r.overall.failed, errors: r.overall.errors, p99: r.overall.p99, windowP99: r.windows.p99,
              restartErrors: r.restarts.filter((x) => x.error).map((x) => x.error), firstErrors: r.firstErrors?.slice(0, 3) });
            log(`  ${r.overall.failed} failed of ${r.overall.requests}, p99 ${fmtMs(r.overall.p99)} ms, in windows ${fmtMs(r.windows.p99)} ms`);
          } catch (err) {
            runs.push({ error: err.message });
            log(`  FAILED: ${err.message}`);
          }
        }
        out.rows.push({ app, rate, contender: name, runs });
      }
    }
  }
  return out;
}

const spread = (xs, f = (x) => x) => {
  const v = xs.filter((x) => typeof x === 'number');
  if (!v.length) return '-';
  const m = median(v);
  return v.length > 1 ? `${f(m)} (${f(Math.min(...v))}-${f(Math.max(...v))})` : f(m);
};

function appsMarkdown(a, meta) {
  const md = ['# Benchmark: restarts of the apps people run, under keep-alive load', ''];
  md.push(`Generated by \`npm run bench -- --apps-only\` (or a full \`npm run bench\`) on ${meta.date} (${meta.cpus} CPUs, Node ${process.version}). Took ${Math.round(meta.elapsedS)} s. Load average at start ${meta.loadStart.map((x) => x.toFixed(2)).join('/')}, at end ${meta.loadEnd.map((x) => x.toFixed(2)).join('/')}.`);
  if (APPS_PARTIAL) md.push('', '**Quick or partial run**: not the full app benchmark.');
  md.push('');
  md.push(`Setup as in SUMMARY.md (open-loop load from a second namespace over veth, per-request timeout ${TIMEOUT_MS} ms, keep-alive connections: a request on a reused connection that fails is counted, never retried), with ${APP_CFG.restarts} restarts per run and each contender x app x rate run ${a.reps} times, each in fresh namespaces. Cells: the median over the runs, and in brackets the lowest and highest. Apps: ${a.apps.map((x) => `**${APPS[x].title}**`).join(', ')} (\`test/fixtures/app.mjs\`, \`plain-app.mjs\`, \`nginx-app.sh\`). portflip runs with its defaults (\`--drain auto\`, the Node drain module on) and the app's stop signal; the other contenders send the same stop signal themselves; pm2 runs the Node apps in cluster mode (reload) and nginx in fork mode (where reload is a restart).`);
  for (const rate of a.rates) {
    md.push('', `## ${rate} req/s`, '');
    md.push('| app | contender | failed | requests | p99 ms | p99 in restart windows ms |');
    md.push('|---|---|---:|---:|---:|---:|');
    for (const app of a.apps) {
      for (const row of a.rows.filter((r) => r.app === app && r.rate === rate)) {
        const ok = row.runs.filter((r) => typeof r.failed === 'number');
        const bad = row.runs.find((r) => r.skipped || r.error);
        const title = contenders[row.contender].title;
        if (!ok.length) {
          md.push(`| ${APPS[app].title} | ${title} | ${String(bad?.skipped ?? bad?.error ?? 'no run').replace(/\|/g, '/').slice(0, 120)} ||||`);
          continue;
        }
        const restartErrs = ok.flatMap((r) => r.restartErrors);
        md.push(`| ${APPS[app].title} | ${title} | **${spread(ok.map((r) => r.failed), String)}** | ${spread(ok.map((r) => r.requests), String)} | ${spread(ok.map((r) => r.p99), fmtMs)} | ${row.contender === 'baseline' ? '-' : spread(ok.map((r) => r.windowP99), fmtMs)}${restartErrs.length ? ` (restart failed: ${restartErrs[0].slice(0, 80)})` : ''}${ok.length < a.reps ? ` (${ok.length} of ${a.reps} runs)` : ''} |`);
      }
    }
  }
  md.push('', 'Raw results: `bench/results/apps.json` (not committed).', '');
  return md.join('\n');
}

// ---------- main ----------
async function main() {
  mkdirSync(OUT, { recursive: true });
  const ipt = (await $({ nothrow: true, quiet: true })`iptables --version`).stdout.trim() || 'iptables ?';
  const results = {
    date: new Date().toISOString(),
    quick: opt.quick,
    config: CFG,
    host: { cpus: os.cpus().length, cpuModel: os.cpus()[0]?.model ?? '?', node: process.version, iptables: ipt, loadavgAtStart: os.loadavg() },
    runs: {},
    phaseErrors: [],
  };
  if (opt['apps-only']) return runAppsPhase(results);
  if (opt['own-only']) return runOwnOnly(results);
  if (opt['marking-only']) return runMarkingOnly();
  for (const mode of modes) {
    const run = { mode, modeTitle: MODES[mode], rate: CFG.rate, contenders: {} };
    for (const name of names) {
      log(`${MODES[mode]}: ${contenders[name].title}`);
      try {
        const r = await runContender(mode, name);
        run.contenders[name] = r;
        if (r.skipped) log(`  skipped: ${r.skipped}`);
        else log(`  ${r.overall.requests} requests, ${r.overall.failed} failed ${JSON.stringify(r.overall.errors)}, p99 ${fmtMs(r.overall.p99)} ms, in windows ${fmtMs(r.windows.p99)} ms, max ${fmtMs(r.overall.max)} ms`);
      } catch (err) {
        results.phaseErrors.push(`${MODES[mode]} / ${contenders[name].title}: ${err.message}`);
        log(`  FAILED: ${err.stack}`);
        run.contenders[name] = { title: contenders[name].title, skipped: `run failed: ${err.message}` };
      }
    }
    const file = `${mode === 'new' ? 'new-connection' : 'keep-alive'}.svg`;
    writeFileSync(path.join(OUT, file), chartSvg(run));
    run.svg = file;
    results.runs[mode] = run;
  }
  if (!opt['skip-cost']) {
    log('steady-state cost of the redirect');
    try {
      results.cost = await runCost();
    } catch (err) {
      results.phaseErrors.push(`steady-state cost: ${err.message}`);
      log(`  FAILED: ${err.stack}`);
    }
  }
  if (!opt['skip-scale']) {
    log('switch commit time with many apps');
    try {
      results.scale = await runScale();
    } catch (err) {
      results.phaseErrors.push(`scale: ${err.message}`);
      log(`  FAILED: ${err.stack}`);
    }
  }
  if (!opt['skip-own']) {
    log("portflip's own cost beside node -e 0");
    try {
      results.ownCost = await runOwnCost({ withNetns: (fn) => withNetns(fn), h, log });
    } catch (err) {
      results.phaseErrors.push(`own cost: ${err.message}`);
      log(`  FAILED: ${err.stack}`);
    }
  }
  if (!opt['skip-apps']) await runAppsPhase(results);
  if (!opt['skip-marking']) await runMarkingOnly();
  results.elapsedS = (performance.now() - began) / 1000;
  results.host.loadavgAtEnd = os.loadavg();
  writeFileSync(path.join(OUT, 'latest.json'), `${JSON.stringify(results, null, 1)}\n`);
  const md = markdown(results);
  writeFileSync(path.join(OUT, 'SUMMARY.md'), md);
  process.stdout.write(`${md}\n`);
  log(`wrote ${OUT}/SUMMARY.md, latest.json and the SVGs${PARTIAL ? ' (a quick or partial run: bench/results/ left alone)' : ''}`);
  const v = verdictFor(results);
  if (!v.pass) log('portflip missed its mark in this run (see the verdict above)');
  process.exitCode = v.pass && results.phaseErrors.length === 0 ? 0 : 1;
}

/** Phase 6 (`--marking-only`): marking on the servers people run, and the queue's cost; bench/results/MARKING.md. */
async function runMarkingOnly() {
  const t0 = performance.now();
  const reps = opt.quick ? 1 : Number(opt.reps);
  const out = await runMarkingPhase({ withNetns, log, reps });
  const meta = { date: new Date().toISOString(), cpus: os.cpus().length, elapsedS: (performance.now() - t0) / 1000 };
  const dir = opt.quick || opt.reps !== '3' ? path.join(os.tmpdir(), 'portflip-bench-quick') : path.join(h.repoRoot, 'bench', 'results');
  mkdirSync(dir, { recursive: true });
  writeFileSync(path.join(dir, 'MARKING.md'), markingMarkdown(out, meta));
  writeFileSync(path.join(dir, 'marking.json'), JSON.stringify(out, null, 1));
  log(`wrote ${path.join(dir, 'MARKING.md')}`);
}

/** `--own-only`: status, a deploy's overhead and the switch beside node -e 0, a minute's run for the budgets. */
async function runOwnOnly(results) {
  log("portflip's own cost beside node -e 0");
  const own = await runOwnCost({ withNetns: (fn) => withNetns(fn), h, log });
  const out = opt.quick ? path.join(os.tmpdir(), 'portflip-bench-quick') : path.join(h.repoRoot, 'bench', 'results');
  mkdirSync(out, { recursive: true });
  const load = (xs) => xs.map((x) => x.toFixed(2)).join('/');
  const md = [
    ownCostMarkdown(own),
    '',
    `Generated by \`npm run bench -- --own-only\` (or a full \`npm run bench\`) on ${results.date} ` +
      `(${results.host.cpus} CPUs, Node ${process.version}, ${results.host.iptables}). ` +
      `Load average at start ${load(results.host.loadavgAtStart)}, at end ${load(os.loadavg())}.`,
    '',
  ].join('\n');
  writeFileSync(path.join(out, 'OWN-COST.md'), md);
  process.stdout.write(`${md}\n`);
  log(`wrote ${out}/OWN-COST.md`);
}

async function runAppsPhase(results) {
  log('the app dimension: keep-alive, every contender x app x rate');
  const t = performance.now();
  const loadStart = os.loadavg();
  try {
    results.apps = await runApps();
  } catch (err) {
    results.phaseErrors.push(`apps: ${err.message}`);
    log(`  FAILED: ${err.stack}`);
    return;
  } finally {
    removeAppDirs();
  }
  mkdirSync(APPS_OUT, { recursive: true });
  const meta = { date: new Date().toISOString(), cpus: os.cpus().length, elapsedS: (performance.now() - t) / 1000, loadStart, loadEnd: os.loadavg() };
  writeFileSync(path.join(APPS_OUT, 'apps.json'), `${JSON.stringify({ ...meta, ...results.apps }, null, 1)}\n`);
  const md = appsMarkdown(results.apps, meta);
  writeFileSync(path.join(APPS_OUT, 'APPS.md'), md);
  if (opt['apps-only']) process.stdout.write(`${md}\n`);
  log(`wrote ${APPS_OUT}/APPS.md and apps.json`);
}

await main();
