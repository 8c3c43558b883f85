// Benchmark phase 6: marking Connection: close on draining instances (docs/marking.md), measured two ways.
//
// (a) The servers people run (test/helpers/servers.ts), each with portflip's defaults and with --mark-close off:
//     3 deploys under busy (16) and idle (100) keep-alive clients over veth, --reps runs each; failed requests
//     and each deploy's own time (its `done` step), medians and ranges.
// (b) What the queue costs the draining instance: a Go server's throughput and p99 under closed-loop load
//     straight at its port, with its packets going through the marking queue (mark-port.mjs) and without,
//     alternated --reps times: new connections (every packet queued, nothing rewritten) and keep-alive (each
//     connection's first answer marked, so the client reconnects, as it does in a real drain).
import path from 'node:path';
import * as h from '../../dist/test/helpers/netns.js';
import { SERVERS, serverFlags, goBuild } from '../../dist/test/helpers/servers.js';
import { median } from './report.mjs';

const LOAD = h.fixture('load.mjs'); // closed loop: each worker sends its next request when the last is answered
const MARK_PORT = path.join(h.repoRoot, 'scripts', 'bench', 'mark-port.mjs');
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function load(ns, args) {
  const child = ns.spawnClient(process.execPath, [LOAD, ...args]);
  let out = '';
  child.stdout.on('data', (d) => (out += d));
  child.stderr.on('data', () => {});
  const exited = new Promise((r) => child.once('exit', r));
  return {
    async stop() {
      child.stdin.end('stop\n');
      await exited;
      return JSON.parse(out.trim().split('\n').pop());
    },
    async done() {
      await exited;
      return JSON.parse(out.trim().split('\n').pop());
    },
  };
}

/** One run: deploy v1, then v2-v4 under busy and idle keep-alive clients; failed requests and each deploy's time. */
async function serverRun(withNetns, server, markClose) {
  return withNetns(async (ns) => {
    const dirs = h.tmpDirs();
    try {
      const ports = await h.freePorts(2);
      const deploy = async (v) => {
        const r = await h.portflip(ns, ['deploy', 'web', '--listen', '80', '--ports', ports.join(','), ...serverFlags(v),
          '--mark-close', markClose, '--json', '--', ...server.cmd()], dirs, { timeoutMs: 120_000 });
        if (r.code !== 0) throw new Error(`deploy ${v} failed: ${r.stderr.slice(-400)}`);
        const done = r.stdout.trim().split('\n').map((l) => JSON.parse(l)).find((e) => e.step === 'done');
        return done.durationMs;
      };
      await deploy('v1');
      const url = `http://${ns.serverAddr}:80/`;
      const busy = load(ns, ['--url', url, '--mode', 'keepalive', '--concurrency', '16', '--duration', '300000', '--max-requests', '50000000']);
      const idle = load(ns, ['--url', url, '--mode', 'keepalive', '--concurrency', '100', '--duration', '300000', '--pause', '7000']);
      const times = [];
      try {
        for (const v of ['v2', 'v3', 'v4']) {
          await sleep(1000);
          times.push(await deploy(v));
        }
      } finally {
        var [b, i] = await Promise.all([busy.stop(), idle.stop()]); // eslint-disable-line no-var
      }
      return { failed: b.failed + i.failed, requests: b.total + i.total, times };
    } finally {
      await h.portflip(ns, ['cleanup', '--stop-instances'], dirs).catch(() => {});
      dirs.cleanup();
    }
  });
}

/** The queue's cost: load straight at a Go server's port, its packets through the marking queue or not. */
async function queueCost(withNetns, reps, log) {
  const bin = goBuild('go-shutdown');
  return withNetns(async (ns) => {
    const port = 8001;
    const server = ns.spawn(bin, [], { env: { PORT: String(port), APP_VERSION: 'v1' } });
    await h.waitFor(() => h.tcpCounts(ns, port).listening, 10_000, 'the Go server');
    const rows = { new: { off: [], on: [] }, keepalive: { off: [], on: [] } };
    try {
      for (let k = 0; k < reps; k++) {
        for (const mode of ['new', 'keepalive']) {
          for (const queued of k % 2 ? ['on', 'off'] : ['off', 'on']) {
            let marker;
            if (queued === 'on') {
              marker = ns.spawn(process.execPath, [MARK_PORT, String(port)]);
              let said = '';
              marker.stdout.on('data', (d) => (said += d));
              await h.waitFor(() => said.includes('ready'), 10_000, 'the marking queue');
            }
            const r = await load(ns, ['--url', `http://${ns.serverAddr}:${port}/`, '--mode', mode, '--concurrency', '16',
              '--duration', '3000', '--max-requests', '50000000']).done();
            if (marker) {
              marker.stdin.end();
              await new Promise((res) => marker.once('exit', res));
            }
            rows[mode][queued].push({ rps: r.total / 3, p99: r.p99, failed: r.failed });
            log(`marking cost ${mode} queue ${queued}: ${(r.total / 3).toFixed(0)} req/s, p99 ${r.p99} ms, ${r.failed} failed`);
          }
        }
      }
    } finally {
      try {
        process.kill(-server.pid, 'SIGKILL');
      } catch {}
    }
    return rows;
  });
}

export async function runMarkingPhase({ withNetns, log, reps }) {
  const out = { reps, servers: [], cost: null };
  for (const server of SERVERS) {
    for (const markClose of ['on', 'off']) {
      const runs = [];
      for (let k = 0; k < reps; k++) {
        const r = await serverRun(withNetns, server, markClose);
        log(`marking ${server.name} mark-close ${markClose} run ${k + 1}: ${r.failed} failed, deploys ${r.times.map((t) => (t / 1000).toFixed(1)).join(', ')} s`);
        runs.push(r);
      }
      out.servers.push({ name: server.name, markClose, runs });
    }
  }
  out.cost = await queueCost(withNetns, reps, log);
  return out;
}

const range = (xs, f) => `${f(median(xs))} (${f(Math.min(...xs))}-${f(Math.max(...xs))})`;
const s1 = (ms) => (ms / 1000).toFixed(1);

export function markingMarkdown(out, meta) {
  const md = ['# Benchmark: marking Connection: close on draining instances', ''];
  md.push(`Generated by \`npm run bench -- --marking-only\` on ${meta.date} (${meta.cpus} CPUs, Node ${process.version}). Took ${Math.round(meta.elapsedS)} s.`);
  md.push('', `Each server as Debian ships it, started the way its docs show (\`test/fixtures/servers/\`), deployed 3 times per run under 16 busy keep-alive clients (closed loop: the next request as soon as the answer arrives) and 100 idle ones (a request every 7 s), all over veth from a second namespace; ${out.reps} runs each, in fresh namespaces. portflip's defaults (\`--drain auto\`, \`--drain-timeout 30s\`), with marking on (the default) and off. Cells: median over the runs (lowest-highest); deploy time is each deploy's own \`done\` step.`);
  md.push('', '| server | --mark-close | failed requests, 3 deploys | each deploy s |', '|---|---|---:|---:|');
  for (const s of out.servers) {
    const failed = s.runs.map((r) => r.failed);
    const times = s.runs.flatMap((r) => r.times);
    md.push(`| ${s.name} | ${s.markClose} | **${range(failed, (x) => String(x))}** | ${range(times, s1)} |`);
  }
  md.push('', '## What the queue costs the draining instance', '');
  md.push(`A Go server (net/http), 16 closed-loop clients straight at its port for 3 s, with its packets through the marking queue and without, alternated, ${out.reps} times. "new": one request per connection (every packet queued, no answer rewritten: the client asked to close). "keep-alive": each connection's first answer is marked, so its client reconnects, as in a real drain.`);
  md.push('', '| load | queue | req/s | p99 ms | failed | req/s with / without |', '|---|---|---:|---:|---:|---:|');
  for (const mode of ['new', 'keepalive']) {
    const rps = { off: out.cost[mode].off.map((r) => r.rps), on: out.cost[mode].on.map((r) => r.rps) };
    for (const q of ['off', 'on']) {
      const rows = out.cost[mode][q];
      const ratio = q === 'on' ? (median(rps.on) / median(rps.off)).toFixed(2) + 'x' : '';
      md.push(`| ${mode === 'new' ? 'new connections' : 'keep-alive'} | ${q === 'on' ? 'through the queue' : 'none'} | ${range(rows.map((r) => r.rps), (x) => x.toFixed(0))} | ${range(rows.map((r) => r.p99), (x) => x.toFixed(1))} | ${rows.reduce((n, r) => n + r.failed, 0)} | ${ratio} |`);
    }
  }
  return md.join('\n') + '\n';
}
