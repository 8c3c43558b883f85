// Metrics for real, in a namespace, through the commands that publish them: a deploy and a failed one, rule repairs by
// `watch` and `run`, a crash restart by `run`, each counted in the textfile and at `--metrics`; live gauges (connections
// under a short load, a pause's held client, a canary's share); `agent --metrics` beside its agent-check; and Debian's
// prometheus-node-exporter serving the textfile.

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import path from 'node:path';
import { startLoad, freePorts, waitFor } from '../helpers/netns.js';
import { alive, app, deployArgs, get, inWorld, show, type World } from '../helpers/world.js';
import { testUnless } from '../helpers/skip.js';
import type { AppState } from '../../src/core/state.js';

const NODE_EXPORTER = '/usr/bin/prometheus-node-exporter';

// One Node process in the namespace answers every probe (a GET, or an agent-check's line), one JSON line each:
// a scrape then costs milliseconds, not a Node start, and the waits below poll often without loading the CPU.
const PROBER = `
const net = require('node:net');
const out = (id, r) => process.stdout.write(JSON.stringify({ id, ...r }) + '\\n');
require('node:readline').createInterface({ input: process.stdin }).on('line', (line) => {
  const { id, url, tcp } = JSON.parse(line);
  if (url)
    fetch(url, { signal: AbortSignal.timeout(5000) }).then(
      async (r) => out(id, { status: r.status, body: await r.text() }),
      (e) => out(id, { status: 0, body: String(e.cause?.code ?? e) }),
    );
  else {
    const s = net.connect(tcp, '127.0.0.1');
    let d = '';
    s.setTimeout(5000, () => s.destroy(new Error('timeout')));
    s.on('data', (c) => (d += c));
    s.on('end', () => out(id, { status: 1, body: d }));
    s.on('error', (e) => out(id, { status: 0, body: 'ERR ' + (e.code ?? e.message) }));
  }
});`;

interface Answer {
  status: number; // HTTP status; 0 when nothing answered (the body says why); 1 for an agent line
  body: string;
}

function startProber(w: World) {
  const child = w.ns.spawn(process.execPath, ['-e', PROBER]);
  const waiting = new Map<number, { resolve: (a: Answer) => void; reject: (e: Error) => void }>();
  let next = 0;
  let buf = '';
  let err = '';
  child.stderr!.on('data', (d) => (err += d));
  child.stdout!.on('data', (d) => {
    buf += d;
    for (let nl; (nl = buf.indexOf('\n')) >= 0; buf = buf.slice(nl + 1)) {
      const a = JSON.parse(buf.slice(0, nl)) as Answer & { id: number };
      waiting.get(a.id)?.resolve(a);
      waiting.delete(a.id);
    }
  });
  child.once('exit', () => {
    for (const p of waiting.values()) p.reject(new Error(`the prober exited: ${err}`));
  });
  const ask = (q: { url?: string; tcp?: number }) =>
    new Promise<Answer>((resolve, reject) => {
      const id = next++;
      waiting.set(id, { resolve, reject });
      child.stdin!.write(JSON.stringify({ id, ...q }) + '\n');
    });
  return {
    scrape: (url: string) => ask({ url }),
    agentLine: async (port: number) => (await ask({ tcp: port })).body,
    close: () => end(child, 'SIGTERM'),
  };
}

/** The value of one series (name and labels exactly as rendered), or undefined. */
function value(text: string, series: string): number | undefined {
  const line = text.split('\n').find((l) => l.startsWith(series + ' '));
  return line === undefined ? undefined : Number(line.slice(series.length + 1));
}

const exitOf = (child: ChildProcess) =>
  new Promise<number | null>((r) =>
    child.exitCode !== null || child.signalCode !== null ? r(child.exitCode) : child.once('exit', (c) => r(c)),
  );

/** Ends a process this test started, by its pid: the signal, then SIGKILL after a few seconds. */
async function end(child: ChildProcess, signal: NodeJS.Signals = 'SIGINT'): Promise<number | null> {
  const exited = exitOf(child);
  child.kill(signal);
  const t = setTimeout(() => child.kill('SIGKILL'), 5000);
  const code = await exited;
  clearTimeout(t);
  return code;
}

/** A portflip started in the background, with its stderr kept for messages. */
function background(w: World, args: string[], env: NodeJS.ProcessEnv) {
  const child = w.pfSpawn(args, env);
  const p = { child, stderr: '' };
  child.stderr!.on('data', (c) => (p.stderr += c));
  return p;
}

const stateOf = (w: World, name: string) =>
  JSON.parse(readFileSync(path.join(w.dirs.stateDir, `${name}.json`), 'utf8')) as AppState;
const activePid = (w: World, name: string) => stateOf(w, name).instances.find((i) => i.state === 'active')!.pid!;

const promtool = spawnSync('promtool', ['--version']).status === 0;

const series = (name: string, labels: string) => `${name}{${labels}}`;
const OK = series('portflip_deploys_total', 'app="web",result="ok"');
const FAILED = series('portflip_deploys_total', 'app="web",result="failed"');
const LAST_OK = series('portflip_last_deploy_success', 'app="web"');
const SWITCH = series('portflip_step_duration_seconds_count', 'app="web",step="switch"');
const READY = series('portflip_step_duration_seconds_count', 'app="web",step="ready"');
const REPAIRS = series('portflip_rule_repairs_total', 'app="web"');
const API_REPAIRS = series('portflip_rule_repairs_total', 'app="api"');
const RESTARTS = series('portflip_restarts_total', 'app="api"');

testUnless(
  !existsSync(NODE_EXPORTER) && `needs ${NODE_EXPORTER} (Debian package prometheus-node-exporter); CI installs it`,
  'deploys, a failed deploy, repairs and a crash restart are counted in the textfile and at --metrics of watch, ' +
    'run and agent; node_exporter serves the textfile',
  async () => {
    await inWorld(async (w) => {
      const base = path.dirname(w.dirs.stateDir);
      const textDir = path.join(base, 'textfile');
      const agentTextDir = path.join(base, 'agent-textfile'); // the agent's own, to see it never writes one
      mkdirSync(textDir, { mode: 0o755 });
      mkdirSync(agentTextDir, { mode: 0o755 });
      const env = { PORTFLIP_TEXTFILE_DIR: textDir };
      const textfile = path.join(textDir, 'portflip.prom');
      const text = () => readFileSync(textfile, 'utf8');
      const [p1, p2, p3, p4, metricsPort, runMetricsPort, exporterPort, ...agentPorts] = await freePorts(11);
      const [agentPort1, agentPort2, agentMetrics1, agentMetrics2] = agentPorts;
      const probe = startProber(w);
      try {
        const scrape = probe.scrape;
        const url = `http://127.0.0.1:${metricsPort}/metrics`;
        const runUrl = `http://127.0.0.1:${runMetricsPort}/metrics`;
        const up = (u: string) => waitFor(async () => (await scrape(u)).status === 200, 10_000, `${u} to answer`);

        // a real deploy publishes: the counters file, then the textfile, with no temp file left beside it
        const d = await w.pf(deployArgs([p1, p2], [], ['--version', 'v1']), env);
        assert.is(d.code, 0, show(d));
        assert.ok(existsSync(textfile), 'the deploy wrote the textfile');
        assert.equal(readdirSync(textDir), ['portflip.prom'], 'no temp file left beside it');
        assert.ok(existsSync(path.join(w.dirs.stateDir, 'metrics', 'counters.json')));
        const deployed = text();
        assert.is(value(deployed, OK), 1);
        assert.is(value(deployed, FAILED), 0, 'there from 0, so a first failure is an increase');
        assert.equal([value(deployed, SWITCH), value(deployed, READY), value(deployed, LAST_OK)], [1, 1, 1]);
        assert.is(value(deployed, series('portflip_deploy_duration_seconds_count', 'app="web"')), 1);

        // a second app under `portflip run`, starting while the failed deploy below waits
        const runArgs = ['run', 'api', '--listen', '81', '--ports', `${p3},${p4}`];
        const run = background(w, [...runArgs, '--metrics', `127.0.0.1:${runMetricsPort}`, ...app()], env);
        let watch: ReturnType<typeof background> | null = null;
        try {
          // a deploy that never gets ready: failed, counted, and v1 serves on
          const badArgs = deployArgs([p1, p2], ['--ready-timeout', '500ms'], ['--version', 'v2', '--never-listen']);
          const bad = await w.pf(badArgs, env);
          assert.is(bad.code, 1, show(bad));
          const failed = text();
          assert.equal([value(failed, OK), value(failed, FAILED), value(failed, LAST_OK)], [1, 1, 0]);
          assert.is(value(failed, series('portflip_changes_total', 'app="web",action="deploy",result="failed"')), 1);
          assert.is(value(failed, READY), 2);
          assert.is(value(failed, SWITCH), 1, 'the failed deploy never switched');
          assert.is(value(failed, 'portflip_active_up{app="web"}'), 1);
          assert.is(await get(w.ns, 'http://127.0.0.1:80/'), 'v1', 'the active instance still serves');

          // watch serves /metrics, and rewrites the textfile as it starts (and every 15 s)
          rmSync(textfile);
          watch = background(w, ['watch', '--interval', '200ms', '--metrics', `127.0.0.1:${metricsPort}`], env);
          await up(url);
          const first = await scrape(url);
          assert.equal([value(first.body, OK), value(first.body, FAILED), value(first.body, LAST_OK)], [1, 1, 0]);
          assert.is(value(first.body, REPAIRS), 0);
          assert.is(value(first.body, 'portflip_active_up{app="web"}'), 1);
          assert.ok(value(first.body, 'portflip_active_memory_bytes{app="web"}')! > 1_000_000, 'a Node app has MBs');
          assert.ok(value(first.body, 'portflip_active_cpu_seconds_total{app="web"}')! >= 0);
          assert.ok(
            value(first.body, 'portflip_conntrack_entries_limit')! > 0,
            'conntrack is loaded with the nat rules',
          );
          const backend = stateOf(w, 'web').backend;
          assert.is(value(first.body, `portflip_app_info{app="web",listen="80",backend="${backend}"}`), 1);
          if (promtool) {
            const check = spawnSync('promtool', ['check', 'metrics'], { input: first.body, encoding: 'utf8' });
            assert.is(check.status, 0, check.stdout + check.stderr);
          }
          assert.is((await scrape(`http://127.0.0.1:${metricsPort}/`)).status, 404);
          await waitFor(() => existsSync(textfile), 5000, 'watch to write the textfile');
          await up(runUrl);
          await waitFor(
            async () => value((await scrape(runUrl)).body, 'portflip_active_up{app="api"}') === 1,
            15_000,
            `run to deploy api: ${run.stderr}`,
          );

          // every nat rule flushed behind portflip's back (in the namespace only): watch repairs web; api is repaired
          // by run or by watch, whichever takes its lock first, and counted once
          const flushed = await w.sh(`iptables-${backend === 'nft' ? 'nft' : 'legacy'} -t nat -F`);
          assert.is(flushed.code, 0, show(flushed));
          await waitFor(
            async () => {
              const body = (await scrape(url)).body;
              return value(body, REPAIRS) === 1 && value(body, API_REPAIRS) === 1;
            },
            5000,
            'a repair of each app',
          );
          await waitFor(
            () => value(text(), REPAIRS) === 1 && value(text(), API_REPAIRS) === 1,
            2000,
            'the repairs in the textfile',
          );
          assert.is(value(text(), series('portflip_changes_total', 'app="web",action="repair",result="ok"')), 1);
          assert.is(await get(w.ns, 'http://127.0.0.1:80/'), 'v1', 'the public port answers again');
          assert.match(watch.stderr, /rules changed behind portflip's back/);

          // keep-alive clients hold their connections to the active instance while the load runs (bounded: 8 s)
          const load = await startLoad(w.ns, 'server', {
            url: 'http://127.0.0.1:80/',
            mode: 'keepalive',
            concurrency: 4,
            durationMs: 8000,
            pauseMs: 20,
          });
          try {
            await waitFor(
              async () => value((await scrape(url)).body, 'portflip_active_connections{app="web"}')! >= 4,
              6000,
              'four open connections in portflip_active_connections',
            );
          } finally {
            const r = await load.stop();
            assert.is(r.failed, 0, JSON.stringify(r));
          }

          // a pause: the hold and a client held in it, asked of the holder's control socket at each scrape
          const paused = await w.pf(['pause', 'web', '--timeout', '20s'], env);
          assert.is(paused.code, 0, show(paused));
          const held = w.ns.spawn(process.execPath, [
            '-e',
            "fetch('http://127.0.0.1:80/').then(r=>r.text()).then(()=>process.exit(0),()=>process.exit(1))",
          ]);
          try {
            await waitFor(
              async () => {
                const body = (await scrape(url)).body;
                return (
                  value(body, 'portflip_hold_active{app="web"}') === 1 &&
                  value(body, 'portflip_held_connections{app="web"}')! >= 1
                );
              },
              6000,
              'the hold and its waiting client in the series',
            );
            const resumed = await w.pf(['resume', 'web'], env);
            assert.is(resumed.code, 0, show(resumed));
            assert.is(await exitOf(held), 0, 'the held client got its answer after resume');
          } finally {
            if (held.exitCode === null) await end(held, 'SIGKILL');
          }
          assert.is(value((await scrape(url)).body, 'portflip_hold_active{app="web"}'), 0);

          // a canary's share, and back to 0 once it is aborted; a canary deploy is a deploy that succeeded
          const canary = await w.pf(deployArgs([p1, p2], ['--canary', '10%'], ['--version', 'v3']), env);
          assert.is(canary.code, 0, show(canary));
          const split = (await scrape(url)).body;
          assert.is(value(split, 'portflip_canary_share_ratio{app="web"}'), 0.1);
          assert.is(value(split, 'portflip_instances{app="web",state="canary"}'), 1);
          assert.equal([value(split, OK), value(split, LAST_OK)], [2, 1]);
          const aborted = await w.pf(['abort', 'web'], env);
          assert.is(aborted.code, 0, show(aborted));
          assert.is(value((await scrape(url)).body, 'portflip_canary_share_ratio{app="web"}'), 0);

          // a second server on the same address: its own exit code; a bad address: usage
          const taken = await w.pf(['watch', '--metrics', `127.0.0.1:${metricsPort}`], env);
          assert.is(taken.code, 6, show(taken));
          assert.match(taken.stderr, /metrics address 127\.0\.0\.1:\d+ is already in use; pick another with --metrics/);
          const badAddr = await w.pf(['watch', '--metrics', 'nowhere'], env);
          assert.is(badAddr.code, 2, show(badAddr));
          assert.match(badAddr.stderr, /--metrics nowhere: give ADDRESS:PORT/);

          // agent --metrics: the same series on its endpoint, the agent-check still on its own port; two agents, one
          // ended by SIGTERM (systemd) and one by SIGINT (Ctrl-C), each closing both ports and exiting 0
          const agentEnv = { PORTFLIP_TEXTFILE_DIR: agentTextDir };
          const agents = (
            [
              [agentPort1, agentMetrics1, 'SIGTERM'],
              [agentPort2, agentMetrics2, 'SIGINT'],
            ] as const
          ).map(([port, metrics, signal]) => ({
            port,
            url: `http://127.0.0.1:${metrics}/metrics`,
            signal,
            p: background(w, ['agent', 'web', '--port', String(port), '--metrics', `127.0.0.1:${metrics}`], agentEnv),
          }));
          try {
            for (const a of agents) {
              await up(a.url);
              const body = (await scrape(a.url)).body;
              assert.equal([value(body, OK), value(body, FAILED), value(body, REPAIRS)], [2, 1, 1], body);
              assert.is(value(body, 'portflip_active_up{app="web"}'), 1);
              assert.is(value(body, 'portflip_active_up{app="api"}'), 1, 'every app on the host');
              assert.is(await probe.agentLine(a.port), 'up 100%\n', 'the agent-check on its own port');
              assert.is((await scrape(a.url.replace('/metrics', '/'))).status, 404);
            }
          } finally {
            for (const a of agents) assert.is(await end(a.p.child, a.signal), 0, `${a.signal}: ${a.p.stderr}`);
          }
          for (const a of agents) {
            assert.is((await scrape(a.url)).status, 0, `${a.signal}: the endpoint closed`);
            assert.match(await probe.agentLine(a.port), /^ERR ECONNREFUSED/, `${a.signal}: the agent port closed`);
          }
          assert.equal(readdirSync(agentTextDir), [], 'agent --metrics is read-only: no textfile');

          // run: its instance killed, it deploys it again (after a 1 s backoff) and counts a restart
          const runFirst = (await scrape(runUrl)).body;
          assert.is(value(runFirst, OK), 2, 'every app on the host');
          assert.is(value(runFirst, RESTARTS), 0);
          const crashed = activePid(w, 'api');
          process.kill(crashed, 'SIGKILL'); // the instance our run started
          await waitFor(async () => value((await scrape(runUrl)).body, RESTARTS) === 1, 10_000, 'a restart');
          const after = (await scrape(runUrl)).body;
          assert.is(value(after, series('portflip_changes_total', 'app="api",action="restart",result="ok"')), 1);
          assert.is(value(after, series('portflip_deploys_total', 'app="api",result="ok"')), 2, 'deploy + restart');
          assert.is(value(after, series('portflip_last_deploy_success', 'app="api"')), 1);
          assert.is(value(after, 'portflip_active_up{app="api"}'), 1);
          assert.ok(activePid(w, 'api') !== crashed && alive(activePid(w, 'api')), 'a new instance serves');
          await waitFor(() => value(text(), RESTARTS) === 1, 2000, 'the restart in the textfile');
        } finally {
          // both ended before either is judged: a failed assertion must not leave one running
          const ran = await end(run.child, 'SIGTERM');
          const watched = watch && (await end(watch.child));
          assert.is(ran, 0, `run stops its app and exits 0: ${run.stderr}`);
          if (watch) assert.is(watched, 0, watch.stderr);
        }
        assert.is((await scrape(runUrl)).status, 0, "run's endpoint closed");
        assert.is((await scrape(url)).status, 0, "watch's endpoint closed");

        // Debian's node_exporter, textfile collector only, serves portflip's series as the file has them
        const file = text();
        assert.equal(
          [value(file, OK), value(file, REPAIRS), value(file, API_REPAIRS), value(file, RESTARTS)],
          [2, 1, 1, 1],
        );
        const exporter = w.ns.spawn(NODE_EXPORTER, [
          '--collector.disable-defaults',
          '--collector.textfile',
          `--collector.textfile.directory=${textDir}`,
          `--web.listen-address=127.0.0.1:${exporterPort}`,
        ]);
        let exporterLog = '';
        exporter.stderr!.on('data', (c) => (exporterLog += c));
        try {
          const exporterUrl = `http://127.0.0.1:${exporterPort}/metrics`;
          await up(exporterUrl);
          const scraped = await scrape(exporterUrl);
          for (const s of [
            OK,
            FAILED,
            REPAIRS,
            RESTARTS,
            'portflip_active_up{app="web"}',
            'portflip_deploy_duration_seconds_bucket{app="web",le="1"}',
            'portflip_deploy_duration_seconds_count{app="web"}',
            'portflip_step_duration_seconds_bucket{app="web",step="switch",le="0.25"}',
          ]) {
            assert.ok(value(file, s) !== undefined, `${s} in the textfile`);
            assert.is(value(scraped.body, s), value(file, s), `${s}\n${exporterLog}`);
          }
          assert.is(value(scraped.body, 'portflip_active_up{app="web"}'), 1);
          assert.is(value(scraped.body, 'node_textfile_scrape_error'), 0, exporterLog);
          assert.match(scraped.body, /^node_textfile_mtime_seconds\{file="[^"]*portflip\.prom"\} \S+$/m);
          assert.not.match(exporterLog, /level=error/, exporterLog);
        } finally {
          await end(exporter, 'SIGTERM');
        }
      } finally {
        await probe.close();
      }
    });
  },
);

test.run();
