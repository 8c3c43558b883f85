// Metrics for real, in a namespace: `watch --metrics` and `run --metrics` scraped (connections under a short load,
// a pause's held client, a canary's share, counters after publish), the textfile rewritten by watch, and Debian's
// prometheus-node-exporter serving it.

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, rmSync } from 'node:fs';
import path from 'node:path';
import { fixture, freePorts, startLoad, waitFor, waitForPort } from '../helpers/netns.js';
import { app, deployArgs, inWorld, show, type World } from '../helpers/world.js';
import { testUnless } from '../helpers/skip.js';

const NODE_EXPORTER = '/usr/bin/prometheus-node-exporter';

/** GET inside the namespace: the status and the body. */
async function scrape(w: World, url: string): Promise<{ status: number; body: string }> {
  const script =
    `fetch(${JSON.stringify(url)}).then(async r=>process.stdout.write(JSON.stringify({status:r.status,body:await r.text()})),` +
    `e=>process.stdout.write(JSON.stringify({status:0,body:String(e.cause?.code??e)})))`;
  const r = await w.ns.exec(process.execPath, ['-e', script], { timeoutMs: 10_000 });
  return JSON.parse(r.stdout || '{"status":0,"body":""}');
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

const promtool = spawnSync('promtool', ['--version']).status === 0;

testUnless(
  !existsSync(NODE_EXPORTER) && `needs ${NODE_EXPORTER} (Debian package prometheus-node-exporter); CI installs it`,
  'watch --metrics and run --metrics serve the series; node_exporter serves the textfile publish() wrote',
  async () => {
    await inWorld(async (w) => {
      const textDir = path.join(path.dirname(w.dirs.stateDir), 'textfile');
      mkdirSync(textDir, { mode: 0o755 });
      const env = { PORTFLIP_TEXTFILE_DIR: textDir };
      const textfile = path.join(textDir, 'portflip.prom');
      const [p1, p2, p3, p4, metricsPort, runMetricsPort, exporterPort] = await freePorts(7);
      const d = await w.pf(deployArgs([p1, p2], [], ['--version', 'v1']), env);
      assert.is(d.code, 0, show(d));
      // once the history recorder calls publish() from every command, the deploy has published already
      const OK = 'portflip_deploys_total{app="web",result="ok"}';
      const READY = 'portflip_step_duration_seconds_count{app="web",step="ready"}';
      const published = existsSync(textfile) ? readFileSync(textfile, 'utf8') : '';
      const [okBefore, readyBefore] = [value(published, OK) ?? 0, value(published, READY) ?? 0];

      // what the history recorder hands to publish() after that deploy (it wires the call into the CLI)
      const record = {
        v: 1,
        app: 'web',
        action: 'deploy',
        by: 'cli',
        startedAt: new Date().toISOString(),
        durationMs: 900,
        result: 'ok',
        exitCode: 0,
        steps: [
          { step: 'start', status: 'ok', durationMs: 30 },
          { step: 'ready', status: 'ok', durationMs: 250 },
        ],
      };
      const pub = await w.ns.exec(process.execPath, [fixture('publish.mjs')], {
        input: JSON.stringify(record),
        env: { PORTFLIP_STATE_DIR: w.dirs.stateDir, PORTFLIP_RUN_DIR: w.dirs.runDir, ...env },
      });
      assert.is(pub.code, 0, show(pub));
      assert.is(value(readFileSync(textfile, 'utf8'), OK), okBefore + 1);
      assert.equal(
        spawnSync('ls', [textDir], { encoding: 'utf8' }).stdout.trim().split('\n'),
        ['portflip.prom'],
        'no temp file left beside it',
      );

      // watch serves /metrics, and rewrites the textfile as it starts (and every 15 s)
      rmSync(textfile);
      const watch = w.pfSpawn(['watch', '--metrics', `127.0.0.1:${metricsPort}`], env);
      let watchErr = '';
      watch.stderr!.on('data', (c) => (watchErr += c));
      try {
        await waitForPort(w.ns, metricsPort, { timeoutMs: 10_000 });
        const url = `http://127.0.0.1:${metricsPort}/metrics`;
        const first = await scrape(w, url);
        assert.is(first.status, 200, first.body);
        assert.is(value(first.body, OK), okBefore + 1);
        assert.is(value(first.body, 'portflip_deploys_total{app="web",result="failed"}'), 0);
        assert.is(value(first.body, READY), readyBefore + 1);
        assert.is(value(first.body, 'portflip_active_up{app="web"}'), 1);
        assert.ok(value(first.body, 'portflip_active_memory_bytes{app="web"}')! > 1_000_000, 'a Node app has MBs');
        assert.ok(value(first.body, 'portflip_active_cpu_seconds_total{app="web"}')! >= 0);
        assert.ok(value(first.body, 'portflip_conntrack_entries_limit')! > 0, 'conntrack is loaded with the nat rules');
        assert.is(
          value(first.body, 'portflip_app_info{app="web",listen="80",backend="nft"}') ??
            value(first.body, 'portflip_app_info{app="web",listen="80",backend="legacy"}'),
          1,
        );
        if (promtool) {
          const check = spawnSync('promtool', ['check', 'metrics'], { input: first.body, encoding: 'utf8' });
          assert.is(check.status, 0, check.stdout + check.stderr);
        }
        assert.is((await scrape(w, `http://127.0.0.1:${metricsPort}/`)).status, 404);
        await waitFor(() => existsSync(textfile), 5000, 'watch to write the textfile');

        // keep-alive clients hold their connections to the active instance while the load runs (bounded: 8 s)
        const load = await startLoad(w.ns, 'server', {
          url: 'http://127.0.0.1:80/',
          mode: 'keepalive',
          concurrency: 4,
          durationMs: 8000,
          pauseMs: 20,
        });
        let seen = 0;
        try {
          await waitFor(
            async () => {
              seen = value((await scrape(w, url)).body, 'portflip_active_connections{app="web"}') ?? -1;
              return seen >= 4;
            },
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
              const body = (await scrape(w, url)).body;
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
        assert.is(value((await scrape(w, url)).body, 'portflip_hold_active{app="web"}'), 0);

        // a canary's share, and back to 0 once it is aborted
        const canary = await w.pf(deployArgs([p1, p2], ['--canary', '10%'], ['--version', 'v2']), env);
        assert.is(canary.code, 0, show(canary));
        const split = (await scrape(w, url)).body;
        assert.is(value(split, 'portflip_canary_share_ratio{app="web"}'), 0.1);
        assert.is(value(split, 'portflip_instances{app="web",state="canary"}'), 1);
        const aborted = await w.pf(['abort', 'web'], env);
        assert.is(aborted.code, 0, show(aborted));
        assert.is(value((await scrape(w, url)).body, 'portflip_canary_share_ratio{app="web"}'), 0);

        // a second server on the same address: its own exit code; a bad address: usage
        const taken = await w.pf(['watch', '--metrics', `127.0.0.1:${metricsPort}`], env);
        assert.is(taken.code, 6, show(taken));
        assert.match(taken.stderr, /metrics address 127\.0\.0\.1:\d+ is already in use; pick another with --metrics/);
        const bad = await w.pf(['watch', '--metrics', 'nowhere'], env);
        assert.is(bad.code, 2, show(bad));
        assert.match(bad.stderr, /--metrics nowhere: give ADDRESS:PORT/);

        // run --metrics: a second app, supervised, on the same host's series
        const run = w.pfSpawn(
          [
            'run',
            'api',
            '--listen',
            '81',
            '--ports',
            `${p3},${p4}`,
            '--metrics',
            `127.0.0.1:${runMetricsPort}`,
            ...app(),
          ],
          env,
        );
        try {
          await waitForPort(w.ns, runMetricsPort, { timeoutMs: 10_000 });
          await waitFor(
            async () =>
              value(
                (await scrape(w, `http://127.0.0.1:${runMetricsPort}/metrics`)).body,
                'portflip_active_up{app="api"}',
              ) === 1,
            15_000,
            'run to deploy api',
          );
          const both = (await scrape(w, `http://127.0.0.1:${runMetricsPort}/metrics`)).body;
          assert.ok(value(both, OK)! >= okBefore + 1, 'every app on the host');
        } finally {
          assert.is(await end(run, 'SIGTERM'), 0, 'run stops its app and exits 0');
        }
        assert.is((await scrape(w, `http://127.0.0.1:${runMetricsPort}/metrics`)).status, 0, 'its endpoint closed');
      } finally {
        assert.is(await end(watch), 0, watchErr);
      }
      assert.is((await scrape(w, `http://127.0.0.1:${metricsPort}/metrics`)).status, 0, 'watch closed its endpoint');

      // Debian's node_exporter, textfile collector only, serves portflip's series as the file has them
      const file = readFileSync(textfile, 'utf8');
      assert.ok(value(file, OK)! >= okBefore + 1, file);
      const exporter = w.ns.spawn(NODE_EXPORTER, [
        '--collector.disable-defaults',
        '--collector.textfile',
        `--collector.textfile.directory=${textDir}`,
        `--web.listen-address=127.0.0.1:${exporterPort}`,
      ]);
      let exporterLog = '';
      exporter.stderr!.on('data', (c) => (exporterLog += c));
      try {
        await waitForPort(w.ns, exporterPort, { timeoutMs: 10_000 });
        const scraped = await scrape(w, `http://127.0.0.1:${exporterPort}/metrics`);
        assert.is(scraped.status, 200, scraped.body);
        for (const series of [
          OK,
          'portflip_active_up{app="web"}',
          'portflip_deploy_duration_seconds_bucket{app="web",le="1"}',
          'portflip_deploy_duration_seconds_count{app="web"}',
          'portflip_step_duration_seconds_bucket{app="web",step="ready",le="0.25"}',
        ]) {
          assert.ok(value(file, series) !== undefined, `${series} in the textfile`);
          assert.is(value(scraped.body, series), value(file, series), `${series}\n${exporterLog}`);
        }
        assert.is(value(scraped.body, 'portflip_active_up{app="web"}'), 1);
        assert.is(value(scraped.body, 'node_textfile_scrape_error'), 0, exporterLog);
        assert.match(scraped.body, /^node_textfile_mtime_seconds\{file="[^"]*portflip\.prom"\} \S+$/m);
        assert.not.match(exporterLog, /level=error/, exporterLog);
      } finally {
        await end(exporter, 'SIGTERM');
      }
    });
  },
);

test.run();
