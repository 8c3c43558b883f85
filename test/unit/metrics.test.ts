// Metrics: records folded into counters that only grow, the text render (checked by promtool when it is here),
// the textfile written atomically on the fake Sys and on disk, the --metrics address check, and the endpoint.

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawnSync } from 'node:child_process';
import { mkdtemp, readdir, readFile, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { metricsAddress } from '../../src/cli/options.js';
import { deploy } from '../../src/commands/deploy.js';
import { PortflipError } from '../../src/core/errors.js';
import type { HistoryRecord } from '../../src/core/history.js';
import {
  DEPLOY_BOUNDS,
  emptyCounters,
  fold,
  gather,
  publish,
  render,
  textfileDir,
  writeTextfile,
  type Counters,
  type LiveApp,
  type MetricsView,
} from '../../src/ops/metrics.js';
import { serveMetrics } from '../../src/ops/metrics-http.js';
import { cpuTicks, rssBytes } from '../../src/os/proc.js';
import { realSys } from '../../src/os/sys.js';
import { FakeSys, fakeCtx, fakeDeploy } from '../helpers/fakesys.js';
import { testUnless } from '../helpers/skip.js';

const repoRoot = path.resolve(path.dirname(new URL(import.meta.url).pathname), '../../..');

const record = (over: Partial<HistoryRecord> = {}): HistoryRecord => ({
  v: 1,
  app: 'web',
  action: 'deploy',
  by: 'cli',
  startedAt: '2026-12-03T10:00:00.000Z',
  durationMs: 1500,
  result: 'ok',
  exitCode: 0,
  steps: [
    { step: 'start', status: 'ok', durationMs: 30 },
    { step: 'ready', status: 'ok', durationMs: 700 },
    { step: 'switch', status: 'ok', durationMs: 40 },
  ],
  ...over,
});

const liveApp = (over: Partial<LiveApp> = {}): LiveApp => ({
  app: 'web',
  listen: 80,
  backend: 'nft',
  instances: { active: 1 },
  active: { up: true, connections: 3, cpuSeconds: 1.25, memoryBytes: 5_000_000, startedAt: 1_764_756_000 },
  hold: null,
  canaryShare: 0,
  ...over,
});

/** Every sample as name{labels} -> value: a small reader of the text format, enough to look values up. */
function samples(text: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const at = line.lastIndexOf(' ');
    out.set(line.slice(0, at), Number(line.slice(at + 1)));
  }
  return out;
}

/** Every number in the counters, flattened with its path, to compare two foldings. */
function flat(c: Counters): Map<string, number> {
  const out = new Map<string, number>();
  const walk = (v: unknown, at: string) => {
    if (typeof v === 'number') out.set(at, v);
    else if (v && typeof v === 'object') for (const [k, x] of Object.entries(v)) walk(x, `${at}.${k}`);
  };
  walk(c.apps, '');
  return out;
}

test('fold: deploys, changes, repairs and restarts counted; histogram buckets cumulative; the last deploy kept', () => {
  const c = emptyCounters();
  fold(c, record());
  fold(c, record({ result: 'failed', exitCode: 1, durationMs: 61_000, startedAt: '2026-12-03T11:00:00.000Z' }));
  fold(
    c,
    record({
      action: 'repair',
      by: 'watch',
      durationMs: 12,
      steps: [{ step: 'repair', status: 'ok', durationMs: 12 }],
    }),
  );
  fold(c, record({ action: 'restart', by: 'run', durationMs: 800 }));
  const web = c.apps.web;
  assert.equal(web.changes, { 'deploy ok': 1, 'deploy failed': 1, 'repair ok': 1, 'restart ok': 1 });
  // deploy and restart durations (1.5 s, 61 s, 0.8 s); the repair is no deploy
  assert.is(web.deployDuration.count, 3);
  assert.is(web.deployDuration.sum, 63.3);
  assert.equal(web.deployDuration.buckets, { '1': 1, '2.5': 2, '5': 2, '10': 2, '30': 2, '120': 3, '300': 3, '60': 2 });
  assert.is(web.steps.ready.count, 3);
  assert.is(web.steps.ready.buckets['1'], 3);
  assert.is(web.steps.ready.buckets['0.5'], undefined, 'no observation at or below 0.5 s');
  assert.is(web.steps.repair.count, 1);
  // the restart ended last (10:00:00.8 is before 11:01:01): the failed deploy stays the last deploy
  assert.equal(web.lastDeploy, { endedAt: Date.parse('2026-12-03T11:01:01.000Z') / 1000, ok: false });
});

test('fold only ever adds: every number after one more record is at least what it was (monotonic)', () => {
  const before = fold(emptyCounters(), record());
  fold(before, record({ action: 'rollback', steps: [{ step: 'rollback', status: 'ok', durationMs: 20 }] }));
  const after = fold(structuredClone(before), record({ result: 'failed', durationMs: 400_000 }));
  for (const [at, n] of flat(before)) {
    if (at.endsWith('endedAt')) continue; // a timestamp, not a counter
    assert.ok((flat(after).get(at) ?? -1) >= n, `${at} went from ${n} to ${flat(after).get(at)}`);
  }
  assert.is(after.apps.web.deployDuration.count, 2);
  assert.is(after.apps.web.deployDuration.buckets['300'], 1, 'a 400 s deploy lands only in +Inf');
});

test('render: HELP and TYPE per family, counters at 0 for a live app, +Inf equals the count, labels escaped', () => {
  const c = fold(emptyCounters(), record());
  fold(c, record({ app: 'we"b\\x\ny', action: 'repair', steps: [] }));
  const view: MetricsView = {
    counters: c,
    apps: [liveApp(), liveApp({ app: 'api', active: null, instances: {}, hold: { waiting: 4 }, canaryShare: 0.1 })],
    conntrack: { count: 12, max: 262144 },
  };
  const text = render(view);
  const s = samples(text);
  assert.is(s.get('portflip_deploys_total{app="web",result="ok"}'), 1);
  assert.is(s.get('portflip_deploys_total{app="web",result="failed"}'), 0, 'a failed deploy can be an increase from 0');
  assert.is(
    s.get('portflip_deploys_total{app="api",result="failed"}'),
    0,
    'a live app without records has its counters',
  );
  assert.is(s.get('portflip_rule_repairs_total{app="we\\"b\\\\x\\ny"}'), 1, 'quote, backslash and newline escaped');
  assert.is(s.get('portflip_deploy_duration_seconds_bucket{app="web",le="1"}'), 0);
  assert.is(s.get('portflip_deploy_duration_seconds_bucket{app="web",le="2.5"}'), 1);
  assert.is(s.get('portflip_deploy_duration_seconds_bucket{app="web",le="+Inf"}'), 1);
  assert.is(s.get('portflip_deploy_duration_seconds_count{app="web"}'), 1);
  assert.is(s.get('portflip_deploy_duration_seconds_sum{app="web"}'), 1.5);
  assert.is(s.get('portflip_step_duration_seconds_bucket{app="web",step="ready",le="1"}'), 1);
  assert.is(s.get('portflip_last_deploy_timestamp_seconds{app="web"}'), Date.parse('2026-12-03T10:00:01.500Z') / 1000);
  assert.is(s.get('portflip_last_deploy_success{app="web"}'), 1);
  assert.is(s.get('portflip_active_connections{app="web"}'), 3);
  assert.is(s.get('portflip_active_cpu_seconds_total{app="web"}'), 1.25);
  assert.is(s.get('portflip_active_memory_bytes{app="web"}'), 5_000_000);
  assert.is(s.get('portflip_active_up{app="api"}'), 0);
  assert.is(s.get('portflip_active_connections{app="api"}'), undefined, 'no active instance, no series');
  assert.is(s.get('portflip_hold_active{app="api"}'), 1);
  assert.is(s.get('portflip_held_connections{app="api"}'), 4);
  assert.is(s.get('portflip_canary_share_ratio{app="api"}'), 0.1);
  assert.is(s.get('portflip_app_info{app="web",listen="80",backend="nft"}'), 1);
  assert.is(s.get('portflip_conntrack_entries'), 12);
  assert.is(s.get('portflip_conntrack_entries_limit'), 262144);

  // the format: every sample belongs to the family declared just above it, whose name says its unit
  const lines = text.trimEnd().split('\n');
  let family = '';
  let type = '';
  for (const line of lines) {
    const help = /^# HELP (\S+) \S/.exec(line);
    const decl = /^# TYPE (\S+) (counter|gauge|histogram)$/.exec(line);
    if (help) family = help[1];
    else if (decl) {
      assert.is(decl[1], family, `TYPE after its HELP: ${line}`);
      type = decl[2];
      assert.match(family, /^portflip_[a-z_]+$/);
      if (type === 'counter') assert.match(family, /_total$/, `${family} is a counter`);
      else assert.not.match(family, /_total$/, `${family} is no counter`);
    } else {
      assert.match(line, /^[a-z_]+(\{[^\n]*\})? -?[\d.e+-]+$/, line);
      const name = /^[a-z_]+/.exec(line)![0];
      const want = type === 'histogram' ? [`${family}_bucket`, `${family}_sum`, `${family}_count`] : [family];
      assert.ok(want.includes(name), `${line} under ${family}`);
    }
  }
  assert.ok(text.endsWith('\n'));
});

const promtool = spawnSync('promtool', ['--version']).status === 0;
const noPromtool = promtool ? '' : 'needs promtool (Debian package prometheus); CI installs it';

testUnless(noPromtool, 'promtool check metrics accepts the text: it parses, and its linter finds nothing', () => {
  const c = fold(emptyCounters(), record());
  fold(c, record({ app: 'we"b\\x', action: 'repair' }));
  const text = render({ counters: c, apps: [liveApp()], conntrack: { count: 1, max: 10 } });
  const r = spawnSync('promtool', ['check', 'metrics'], { input: text, encoding: 'utf8' });
  assert.is(r.status, 0, r.stdout + r.stderr);
  assert.is((r.stdout + r.stderr).trim(), '');
  // and it does find problems: the check is not a no-op
  const bad = spawnSync('promtool', ['check', 'metrics'], { input: 'x{a="b} 1\n', encoding: 'utf8' });
  assert.is.not(bad.status, 0);
});

testUnless(noPromtool, 'promtool check rules accepts the example alerting rules (examples/prometheus)', () => {
  const file = path.join(repoRoot, 'examples/prometheus/portflip-alerts.yml');
  const r = spawnSync('promtool', ['check', 'rules', file], { encoding: 'utf8' });
  assert.is(r.status, 0, r.stdout + r.stderr);
  assert.match(r.stdout, /SUCCESS: 3 rules found/);
});

test('the example rules in docs/metrics.md are the file in examples/prometheus', async () => {
  const file = await readFile(path.join(repoRoot, 'examples/prometheus/portflip-alerts.yml'), 'utf8');
  const doc = await readFile(path.join(repoRoot, 'docs/metrics.md'), 'utf8');
  assert.ok(doc.includes('```yaml\n' + file + '```'), 'docs/metrics.md quotes the rules file whole');
  // and names every metric the code renders
  const names = [
    ...render({
      counters: fold(emptyCounters(), record()),
      apps: [liveApp()],
      conntrack: { count: 1, max: 2 },
    }).matchAll(/^# TYPE (\S+)/gm),
  ].map((m) => m[1]);
  assert.ok(names.length >= 19);
  for (const n of names) assert.ok(doc.includes(`\`${n}\``), `docs/metrics.md names ${n}`);
});

test('publish on the fake Sys: counters in the state dir, the textfile written atomically in PORTFLIP_TEXTFILE_DIR', async () => {
  const sys = new FakeSys();
  await sys.fs.mkdir('/srv/textfile', 0o755);
  const { ctx } = fakeCtx(sys);
  ctx.env = { ...ctx.env, PORTFLIP_TEXTFILE_DIR: '/srv/textfile' };
  await deploy(fakeDeploy(), ctx);
  sys.listener(sys.apps()[0].port!)!.connections = 2;
  sys.effectLog = [];
  await publish(ctx, record());
  await publish(ctx, record({ result: 'failed', exitCode: 1 }));
  const counters = JSON.parse(await sys.fs.read('/var/lib/portflip/metrics/counters.json')) as Counters;
  assert.equal(counters.apps.web.changes, { 'deploy ok': 1, 'deploy failed': 1 });
  assert.is((await sys.fs.stat('/var/lib/portflip/metrics/counters.json')).mode, 0o600);
  const writes = sys.effectLog.filter((e) => e.startsWith('write '));
  assert.ok(writes.includes('write /srv/textfile/portflip.prom (atomic)'), writes.join('\n'));
  assert.ok(!writes.some((e) => e.includes('portflip.prom') && !e.endsWith('(atomic)')), 'only atomic writes');
  assert.ok(
    !writes.some((e) => e.startsWith('write /var/lib/portflip/metrics/counters.json') && !e.endsWith('(atomic)')),
  );
  assert.equal(await sys.fs.readdir('/srv/textfile'), ['portflip.prom']);
  assert.is((await sys.fs.stat('/srv/textfile/portflip.prom')).mode, 0o644, 'node_exporter runs as its own user');
  const s = samples(await sys.fs.read('/srv/textfile/portflip.prom'));
  assert.is(s.get('portflip_deploys_total{app="web",result="ok"}'), 1);
  assert.is(s.get('portflip_deploys_total{app="web",result="failed"}'), 1);
  assert.is(s.get('portflip_active_up{app="web"}'), 1);
  assert.is(s.get('portflip_instances{app="web",state="active"}'), 1);
  assert.is(s.get('portflip_last_deploy_success{app="web"}'), 0);
  // the end of a command reads no sockets and no /proc: those gauges are watch's and run's, read fresh
  assert.is(s.get('portflip_active_connections{app="web"}'), undefined);
  assert.is(s.get('portflip_active_memory_bytes{app="web"}'), undefined);
  await writeTextfile(ctx);
  assert.is(samples(await sys.fs.read('/srv/textfile/portflip.prom')).get('portflip_active_connections{app="web"}'), 2);
});

test("the textfile directory: PORTFLIP_TEXTFILE_DIR, empty turns it off, else Debian's when it exists", async () => {
  const sys = new FakeSys();
  const { ctx } = fakeCtx(sys);
  assert.is(await textfileDir({ sys, env: {} }), null, 'no node-exporter directory: no textfile');
  assert.is(await writeTextfile(ctx), null);
  await sys.fs.mkdir('/var/lib/prometheus/node-exporter', 0o755);
  assert.is(await textfileDir({ sys, env: {} }), '/var/lib/prometheus/node-exporter');
  assert.is(await textfileDir({ sys, env: { PORTFLIP_TEXTFILE_DIR: '' } }), null, 'empty: off');
  assert.is(await textfileDir({ sys, env: { PORTFLIP_TEXTFILE_DIR: '/x' } }), '/x');
  await publish(ctx, record({ action: 'stop', steps: [] }));
  assert.match(
    await sys.fs.read('/var/lib/prometheus/node-exporter/portflip.prom'),
    /changes_total\{app="web",action="stop",result="ok"\} 1/,
  );
});

test('a counters file that is not one is moved aside with a notice, and counting starts over', async () => {
  const sys = new FakeSys();
  const { ctx, events } = fakeCtx(sys);
  await sys.fs.mkdir('/var/lib/portflip/metrics', 0o700);
  await sys.fs.write('/var/lib/portflip/metrics/counters.json', '{"v":1,"apps":', 0o600);
  await publish(ctx, record());
  assert.is(await sys.fs.read('/var/lib/portflip/metrics/counters.json.bad'), '{"v":1,"apps":');
  assert.ok(events.some((e) => e.kind === 'notice' && /not a counters file/.test(e.message)));
  const counters = JSON.parse(await sys.fs.read('/var/lib/portflip/metrics/counters.json')) as Counters;
  assert.equal(counters.apps.web.changes, { 'deploy ok': 1 });
});

test('gather on the fake: a stopped active instance is down, and its app keeps its counters', async () => {
  const sys = new FakeSys();
  const { ctx } = fakeCtx(sys);
  await deploy(fakeDeploy(), ctx);
  await publish(ctx, record());
  const port = sys.apps()[0].port!;
  sys.kill(sys.listener(port)!.pid, 'SIGKILL');
  const view = await gather(ctx);
  assert.is(view.apps[0].active?.up, false);
  assert.equal(view.apps[0].instances, {});
  const s = samples(render(view));
  assert.is(s.get('portflip_active_up{app="web"}'), 0);
  assert.is(s.get('portflip_active_connections{app="web"}'), undefined);
  assert.is(s.get('portflip_deploys_total{app="web",result="ok"}'), 1);
});

test('writeTextfile on disk: only portflip.prom is left in the directory (the temp file was renamed)', async () => {
  const dir = await mkdtemp(path.join(tmpdir(), 'portflip-textfile-'));
  try {
    const state = path.join(dir, 'state');
    const ctx = {
      ...fakeCtx(new FakeSys()).ctx,
      sys: realSys,
      paths: { stateDir: state, runDir: path.join(dir, 'run'), logDir: path.join(state, 'logs') },
      env: { PORTFLIP_TEXTFILE_DIR: dir },
    };
    await publish(ctx, record());
    await publish(ctx, record());
    // several at once in one process (run's refresh beside a publish): each whole, none failing
    const texts = await Promise.all([1, 2, 3, 4].map(() => writeTextfile(ctx)));
    assert.equal(texts, Array(4).fill(path.join(dir, 'portflip.prom')));
    assert.equal((await readdir(dir)).sort(), ['portflip.prom', 'run', 'state']);
    assert.equal(await readdir(path.join(state, 'metrics')), ['counters.json']);
    assert.is((await stat(path.join(dir, 'portflip.prom'))).mode & 0o777, 0o644);
    assert.is(
      samples(await readFile(path.join(dir, 'portflip.prom'), 'utf8')).get(
        'portflip_deploys_total{app="web",result="ok"}',
      ),
      2,
    );
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('--metrics ADDR: address and port, or :PORT for every address; anything else is one line, exit 2', () => {
  assert.equal(metricsAddress('127.0.0.1:9778'), { host: '127.0.0.1', port: 9778, text: '127.0.0.1:9778' });
  assert.equal(metricsAddress(':9778'), { host: undefined, port: 9778, text: ':9778' });
  assert.equal(metricsAddress('[::1]:9778'), { host: '::1', port: 9778, text: '[::1]:9778' });
  assert.equal(metricsAddress('localhost:9100').host, 'localhost');
  for (const bad of [
    '9778',
    '127.0.0.1',
    '127.0.0.1:',
    '127.0.0.1:0',
    ':99999',
    '::1:9778',
    '[nope]:1',
    'a b:1',
    'h:1:2',
  ]) {
    try {
      metricsAddress(bad);
      assert.unreachable(`${bad} was accepted`);
    } catch (err) {
      assert.instance(err, PortflipError, bad);
      assert.is((err as PortflipError).kind, 'usage', bad);
      assert.not.match((err as PortflipError).message, /\n/);
    }
  }
});

test('the endpoint on loopback: /metrics in the text format, 404 elsewhere, 405 for POST; a taken port is exit 6', async () => {
  const sys = new FakeSys();
  const { ctx, events } = fakeCtx(sys);
  await publish(ctx, record());
  const server = await serveMetrics(ctx, { host: '127.0.0.1', port: 0, text: '127.0.0.1:0' });
  try {
    assert.ok(events.some((e) => e.kind === 'notice' && e.message === `serving metrics on ${server.url}`));
    const ok = await fetch(server.url);
    assert.is(ok.status, 200);
    assert.is(ok.headers.get('content-type'), 'text/plain; version=0.0.4; charset=utf-8');
    assert.is(samples(await ok.text()).get('portflip_deploys_total{app="web",result="ok"}'), 1);
    const other = await fetch(server.url.replace('/metrics', '/'));
    assert.is(other.status, 404);
    await other.text();
    const post = await fetch(server.url, { method: 'POST' });
    assert.is(post.status, 405);
    await post.text();
    const port = Number(new URL(server.url).port);
    try {
      await serveMetrics(ctx, { host: '127.0.0.1', port, text: `127.0.0.1:${port}` });
      assert.unreachable('a second server on the same port');
    } catch (err) {
      assert.is((err as PortflipError).kind, 'portInUse');
      assert.match(
        (err as Error).message,
        /metrics address 127\.0\.0\.1:\d+ is already in use; pick another with --metrics/,
      );
    }
  } finally {
    await server.close();
  }
});

test('procfs: CPU ticks from /proc/PID/stat, resident memory from /proc/PID/status', () => {
  const stat = '42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 1 0 12345 1000 50';
  assert.is(cpuTicks(stat), 325, 'utime 250 + stime 75 + cutime 0 + cstime 0');
  assert.is(cpuTicks(stat.replace(' 250 75 0 0 ', ' 250 75 30 5 ')), 360, 'waited-for children count');
  assert.is(rssBytes('Name:\tx\nVmRSS:\t   2048 kB\n'), 2048 * 1024);
  assert.is(rssBytes('Name:\tkthread\n'), 0);
  assert.ok(
    DEPLOY_BOUNDS.every((b, i) => i === 0 || b > DEPLOY_BOUNDS[i - 1]),
    'bounds ascend',
  );
});

test.run();
