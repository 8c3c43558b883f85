// portflip's own cost, beside `node -e 0` in the same run: status, a deploy's overhead, the switch commit; the same
// for the single executable (npm run package), built for this machine's arch by the tests' helper when needed.
//
// A deploy's overhead is its wall time minus its ready and drain steps (the app's start and the old
// instance's exit are the app's, not portflip's). Everything runs in a namespace made for it, with no
// load, REPS times each, and the summary quotes medians with the spread (min-max).
import { $ } from 'zx';
import { readdirSync, rmSync } from 'node:fs';
import path from 'node:path';
import { median } from './report.mjs';

const REPS = 11;
// the issue's budgets, in ms: status at most this much slower than `node -e 0`, and so on
export const BUDGETS = { statusOverNodeMs: 150, deployOverheadMs: 250, switchMs: 15 };

/** Runs `argv` in the namespace REPS times; returns the wall times in ms. */
async function timeIt(ns, argv, env, reps = REPS) {
  const times = [];
  for (let i = 0; i < reps; i++) {
    const t0 = performance.now();
    const out = await $({ env: { ...process.env, ...env }, nothrow: true, quiet: true, timeout: '60s' })`nsenter -t ${ns.pid} -n -- ${argv}`;
    times.push(performance.now() - t0);
    if (out.exitCode !== 0) throw new Error(`${argv.join(' ')} exited ${out.exitCode}: ${out.stderr.trim().slice(-400)}`);
  }
  return times;
}

const spread = (xs) => ({ median: median(xs), min: Math.min(...xs), max: Math.max(...xs), n: xs.length });

export async function runOwnCost({ withNetns, h, log }) {
  return withNetns(async (ns) => {
    const dirs = h.tmpDirs();
    // a deploy on a host with node_exporter writes its textfile: measured, into a directory of the run's own
    const env = { PORTFLIP_STATE_DIR: dirs.stateDir, PORTFLIP_RUN_DIR: dirs.runDir, PORTFLIP_TEXTFILE_DIR: dirs.stateDir };
    const main = path.join(h.repoRoot, 'dist', 'src', 'main.cjs');
    const app = [process.execPath, h.fixture('app.mjs'), '--port', '{port}', '--version'];
    const deployArgv = (v) => [process.execPath, main, 'deploy', 'web', '--listen', '80', '--ports', '20001,20002', '--json', '--', ...app, v];
    try {
      log('  own cost: node -e 0');
      const node = await timeIt(ns, [process.execPath, '-e', '0'], env);
      // context, where it applies: Node.js reads the extra CA file at every start (about 80 ms here)
      const nodeNoCa = process.env.NODE_EXTRA_CA_CERTS
        ? await timeIt(ns, ['env', '-u', 'NODE_EXTRA_CA_CERTS', process.execPath, '-e', '0'], env)
        : null;
      await timeIt(ns, deployArgv('v0'), env, 1);
      log('  own cost: status');
      const status = await timeIt(ns, [process.execPath, main, 'status'], env);
      log('  own cost: deploys');
      const overhead = [];
      const uncached = [];
      const switches = [];
      const dist = path.dirname(main);
      for (let i = 0; i < 2 * REPS; i++) {
        // every other deploy runs as the first one after a build does: without its code cache (src/load-cli.cts)
        const cold = i % 2 === 1;
        if (cold) for (const f of readdirSync(dist)) if (/^cli\.cjs\.deploy\.cache/.test(f)) rmSync(path.join(dist, f));
        const t0 = performance.now();
        const out = await $({ env: { ...process.env, ...env }, quiet: true, timeout: '60s' })`nsenter -t ${ns.pid} -n -- ${deployArgv(`v${i + 1}`)}`;
        const wall = performance.now() - t0;
        const steps = out.stdout.split('\n').filter(Boolean).map((l) => JSON.parse(l)).filter((e) => e.kind === 'step');
        const ms = (name) => steps.find((e) => e.step === name)?.durationMs ?? 0;
        (cold ? uncached : overhead).push(wall - ms('ready') - ms('drain'));
        if (!cold) switches.push(ms('switch'));
      }
      // the single executable: its own Node.js and the bundle's code cache from its build, nothing written beside it
      log('  own cost: the single executable (building it if needed)');
      const { builtExecutable } = await import(path.join(h.repoRoot, 'dist', 'test', 'helpers', 'executable.js'));
      const { exe } = await builtExecutable();
      const exeDeploy = (v) => [exe, ...deployArgv(v).slice(2)];
      await timeIt(ns, exeDeploy('x0'), env, 1);
      const exeStatus = await timeIt(ns, [exe, 'status'], env);
      const exeOverhead = [];
      for (let i = 0; i < REPS; i++) {
        const t0 = performance.now();
        const out = await $({ env: { ...process.env, ...env }, quiet: true, timeout: '60s' })`nsenter -t ${ns.pid} -n -- ${exeDeploy(`x${i + 1}`)}`;
        const wall = performance.now() - t0;
        const steps = out.stdout.split('\n').filter(Boolean).map((l) => JSON.parse(l)).filter((e) => e.kind === 'step');
        const ms = (name) => steps.find((e) => e.step === name)?.durationMs ?? 0;
        exeOverhead.push(wall - ms('ready') - ms('drain'));
      }
      const res = {
        exeStatus: spread(exeStatus),
        exeDeployOverhead: spread(exeOverhead),
        node: spread(node),
        nodeNoCa: nodeNoCa && spread(nodeNoCa),
        status: spread(status),
        deployOverhead: spread(overhead),
        deployUncached: spread(uncached),
        switch: spread(switches),
      };
      res.statusOverNode = res.status.median - res.node.median;
      res.pass = {
        status: res.statusOverNode <= BUDGETS.statusOverNodeMs,
        deploy: res.deployOverhead.median <= BUDGETS.deployOverheadMs,
        switch: res.switch.median <= BUDGETS.switchMs,
      };
      return res;
    } finally {
      await $({ env: { ...process.env, ...env }, nothrow: true, quiet: true })`nsenter -t ${ns.pid} -n -- ${process.execPath} ${main} cleanup --stop-instances`;
      dirs.cleanup();
    }
  });
}

const f = (x) => `${Math.round(x)}`;
const row = (name, s, budget) => `| ${name} | ${f(s.median)} | ${f(s.min)}-${f(s.max)} | ${budget} |`;

export function ownCostMarkdown(r) {
  const ok = (b) => (b ? 'met' : '**missed**');
  return [
    '## portflip\'s own cost',
    '',
    `Wall time in ms, median of ${r.node.n} runs (spread min-max), in a namespace with no load, beside \`node -e 0\` in the same run.`,
    '',
    '| what | median | spread | budget |',
    '|---|---:|---:|---|',
    row('`node -e 0`', r.node, ''),
    ...(r.nodeNoCa ? [row('`node -e 0` without `NODE_EXTRA_CA_CERTS` (set here; context only)', r.nodeNoCa, '')] : []),
    row('`portflip status` (one app)', r.status, `node + ${BUDGETS.statusOverNodeMs}: ${ok(r.pass.status)} (+${f(r.statusOverNode)})`),
    row('deploy overhead (wall - ready - drain)', r.deployOverhead, `${BUDGETS.deployOverheadMs}: ${ok(r.pass.deploy)}`),
    ...(r.deployUncached ? [row('the same, first run after a build (no code cache yet; context only)', r.deployUncached, '')] : []),
    row('switch step (one nat commit per family, side by side; it only adds)', r.switch, `${BUDGETS.switchMs}: ${ok(r.pass.switch)}`),
    ...(r.exeStatus
      ? [
          row('the single executable: `portflip status` (one app)', r.exeStatus, `npm build: ${f(r.status.median)}`),
          row('the single executable: deploy overhead', r.exeDeployOverhead, `npm build: ${f(r.deployOverhead.median)}`),
        ]
      : []),
    '',
  ].join('\n');
}
