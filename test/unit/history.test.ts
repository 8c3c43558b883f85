// The history: append, read, torn lines, rotation, the table, the SVG, and records made through real commands
// on the fake Sys (deploy, a failed deploy, rollback, stop, the healer's repair, `portflip run`, a kill mid-deploy).

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { deploy } from '../../src/commands/deploy.js';
import { historySvg } from '../../src/commands/history-svg.js';
import { formatHistory, history, newestFirst } from '../../src/commands/history.js';
import { rollback } from '../../src/commands/rollback.js';
import { stop } from '../../src/commands/stop.js';
import { supervise } from '../../src/commands/supervisor.js';
import { PortflipError } from '../../src/core/errors.js';
import type { Event } from '../../src/core/events.js';
import {
  appendHistory,
  historyApps,
  historyFile,
  parseHistory,
  readHistory,
  type HistoryRecord,
} from '../../src/core/history.js';
import { Healer } from '../../src/ops/healer.js';
import { recorded, recordedEvery } from '../../src/ops/record.js';
import { restore } from '../../src/commands/restore.js';
import { abort, promote } from '../../src/commands/canary.js';
import { cleanup } from '../../src/commands/cleanup.js';
import { createHash } from 'node:crypto';
import { readConfig } from '../../src/cli/config.js';
import { count, toDeployOptions } from '../../src/cli/options.js';
import { FAKE_PATHS, FakeSys, fakeCtx, fakeDeploy } from '../helpers/fakesys.js';

process.env.TZ = 'UTC'; // the table shows local time

const rec = (over: Partial<HistoryRecord> = {}): HistoryRecord => ({
  v: 1,
  app: 'web',
  action: 'deploy',
  by: 'cli',
  startedAt: '2026-12-03T11:40:24.000Z',
  durationMs: 1610,
  result: 'ok',
  exitCode: 0,
  from: { port: 8001, pid: 9082, command: ['node', 'server.mjs'], label: 'v1' },
  to: { port: 8002, pid: 9203, command: ['node', 'server.mjs'], label: 'v2' },
  steps: [
    { step: 'preflight', status: 'ok', durationMs: 705 },
    { step: 'start', status: 'ok', durationMs: 70, port: 8002, pid: 9203 },
    { step: 'ready', status: 'ok', durationMs: 350 },
    { step: 'switch', status: 'ok', durationMs: 6 },
    { step: 'drain', status: 'ok', durationMs: 30_000 },
    { step: 'done', status: 'ok', durationMs: 31_610 },
  ],
  ...over,
});

const failedRec = (over: Partial<HistoryRecord> = {}) =>
  rec({
    result: 'failed',
    exitCode: 1,
    error: { kind: 'deployFailed', message: 'was not ready on port 8002 after 3s', step: 'ready' },
    to: rec().from,
    steps: [
      { step: 'preflight', status: 'ok', durationMs: 500 },
      { step: 'start', status: 'ok', durationMs: 30 },
      { step: 'ready', status: 'failed', durationMs: 3000, detail: 'was not ready' },
    ],
    ...over,
  });

// ---- the file ---------------------------------------------------------------------------------

test('records append as one JSON line each and read back oldest first', async () => {
  const sys = new FakeSys();
  await appendHistory(sys, FAKE_PATHS, rec({ startedAt: '2026-12-03T10:00:00.000Z' }));
  await appendHistory(sys, FAKE_PATHS, failedRec({ startedAt: '2026-12-03T11:00:00.000Z' }));
  const text = await sys.fs.read(historyFile(FAKE_PATHS, 'web'));
  assert.is(text.split('\n').length, 3, 'two lines, each ending in a newline');
  assert.ok(sys.effectLog.filter((e) => e.startsWith('append ')).length === 2, 'one append per record');
  const { records, skipped } = await readHistory(sys, FAKE_PATHS, 'web');
  assert.is(skipped, 0);
  assert.equal(
    records.map((r) => r.result),
    ['ok', 'failed'],
  );
  assert.equal(await historyApps(sys, FAKE_PATHS), ['web']);
});

test('a line torn by a kill mid-write is skipped, and the next record starts on a fresh line', async () => {
  const sys = new FakeSys();
  await appendHistory(sys, FAKE_PATHS, rec());
  const file = historyFile(FAKE_PATHS, 'web');
  const whole = JSON.stringify(rec({ action: 'rollback' }));
  await sys.fs.write(file, (await sys.fs.read(file)) + whole.slice(0, 57), 0o600); // the kill came mid-line
  let read = await readHistory(sys, FAKE_PATHS, 'web');
  assert.is(read.records.length, 1);
  assert.is(read.skipped, 1);
  await appendHistory(sys, FAKE_PATHS, rec({ action: 'stop' }));
  read = await readHistory(sys, FAKE_PATHS, 'web');
  assert.equal(
    read.records.map((r) => r.action),
    ['deploy', 'stop'],
  );
  assert.is(read.skipped, 1, 'only the torn line is lost');
  // a file cut anywhere reads: every prefix of two records gives the whole ones before the cut
  const two = JSON.stringify(rec()) + '\n' + JSON.stringify(rec({ action: 'stop' })) + '\n';
  for (let cut = 0; cut <= two.length; cut++) {
    const r = parseHistory(two.slice(0, cut));
    const whole = two.slice(0, cut).split('\n').length - 1;
    assert.ok(r.records.length >= whole && r.records.length + r.skipped <= whole + 1, `cut at ${cut}`);
  }
  assert.equal(parseHistory('{"v":2}\nnot json\n\n[1]\n').records, []);
});

test('past the size bound the file rotates to .1: one older file kept, the size stays bounded', async () => {
  const sys = new FakeSys();
  const one = JSON.stringify(rec()).length + 1;
  const bound = one * 3 + 10; // three records fit, the fourth append rotates
  for (let i = 0; i < 20; i++)
    await appendHistory(
      sys,
      FAKE_PATHS,
      rec({ startedAt: `2026-12-03T11:00:${String(i).padStart(2, '0')}.000Z` }),
      bound,
    );
  const file = historyFile(FAKE_PATHS, 'web');
  const size = async (f: string) => (await sys.fs.stat(f)).size;
  assert.ok((await size(file)) <= bound + one, `current ${await size(file)} bytes`);
  assert.ok((await size(`${file}.1`)) <= bound + one, `rotated ${await size(`${file}.1`)} bytes`);
  assert.equal((await sys.fs.readdir(join(FAKE_PATHS.stateDir, 'history'))).sort(), ['web.jsonl', 'web.jsonl.1']);
  const { records } = await readHistory(sys, FAKE_PATHS, 'web');
  assert.ok(records.length >= 4 && records.length <= 8, `${records.length} records kept`);
  assert.is(records.at(-1)!.startedAt, '2026-12-03T11:00:19.000Z', 'the newest is kept');
  const times = records.map((r) => r.startedAt);
  assert.equal(times, [...times].sort(), 'the rotated file reads first');
});

// ---- the table and the SVG -------------------------------------------------------------------

test('the table: local time, from -> to with labels, took, switch, drain, and the failed step', () => {
  const text = formatHistory(newestFirst([rec(), failedRec({ startedAt: '2026-12-03T12:00:00.000Z' })]));
  const [head, first, second] = text.split('\n');
  assert.match(head, /^WHEN\s+APP\s+ACTION\s+BY\s+RESULT\s+FROM -> TO\s+TOOK\s+SWITCH\s+DRAIN\s+DETAIL$/);
  assert.match(
    first,
    /^2026-12-03 12:00:00\s+web\s+deploy\s+cli\s+FAIL 1\s+8001 v1 -> 8001 v1\s+1\.61s\s+-\s+-\s+ready: was not ready/,
  );
  assert.match(second, /^2026-12-03 11:40:24\s+web\s+deploy\s+cli\s+ok\s+8001 v1 -> 8002 v2\s+1\.61s\s+6ms\s+30\.0s$/);
});

/** Well-formed XML, checked by hand (no parser among the dependencies): tags balance, text and attributes escaped. */
function wellFormed(svg: string): string | null {
  const stack: string[] = [];
  const re = /<(\/?)([a-zA-Z][\w-]*)((?:\s+[\w:-]+="[^"<]*")*)\s*(\/?)>|([^<]+)|(<)/g;
  for (const m of svg.matchAll(re)) {
    if (m[6]) return `a stray < at ${m.index}`;
    const text = m[5] ?? m[3] ?? '';
    if (/&(?!(amp|lt|gt|quot|#39);)/.test(text)) return `a raw & at ${m.index}`;
    if (m[5] !== undefined) continue;
    if (m[4]) continue;
    if (!m[1]) stack.push(m[2]);
    else if (stack.pop() !== m[2]) return `</${m[2]}> closes nothing at ${m.index}`;
  }
  return stack.length ? `unclosed ${stack.join(', ')}` : null;
}

test('the SVG: well-formed, one row per record, the failed step red with its message, names escaped', () => {
  const svg = historySvg([
    failedRec({
      app: 'a<b>&c',
      error: { kind: 'deployFailed', message: 'bad "quote" & <script>', step: 'ready' },
      steps: [{ step: 'ready', status: 'failed', durationMs: 3000, detail: '</svg>' }],
    }),
    rec(),
  ]);
  assert.is(wellFormed(svg), null, wellFormed(svg) ?? '');
  assert.ok(wellFormed('<svg><text>a & b</text></svg>') !== null, 'the checker catches a raw &');
  assert.ok(svg.startsWith('<svg xmlns="http://www.w3.org/2000/svg"'));
  assert.match(svg, /fill="#d62728" stroke="#8b0000"/, 'the failed step is red');
  assert.match(svg, /ready: bad &quot;quote&quot; &amp; &lt;script&gt;/, 'its message, escaped');
  assert.match(svg, /a&lt;b&gt;&amp;c/);
  assert.not.match(svg, /<script>|a<b>/);
  assert.match(svg, /log10\(1 \+ ms\)/, 'the legend names the scale');
  for (const mark of ['1ms', '10ms', '100ms', '1.00s', '10.0s', '1m']) assert.ok(svg.includes(`>${mark}</text>`), mark);
  // a 6 ms switch and a 30 s drain both show, the drain wider
  const w = (step: string) => Number(new RegExp(`width="([\\d.]+)"[^>]*><title>${step} `).exec(svg)![1]);
  assert.ok(w('switch') >= 10 && w('drain') > w('switch') * 2, `switch ${w('switch')}px, drain ${w('drain')}px`);
  assert.is(wellFormed(historySvg([])), null);
});

test('--label and the config key label; the config file read is hashed; -n is a count', async () => {
  const flags = { app: 'web', listen: 80, '--': ['node', 'x.js'] };
  assert.is(toDeployOptions({ ...flags, label: 'v1.4' }, {}, null).label, 'v1.4');
  assert.is(toDeployOptions(flags, { label: 'from-file' }, '/etc/portflip/web.toml').label, 'from-file');
  assert.is(toDeployOptions({ ...flags, label: 'flag' }, { label: 'file' }, null).label, 'flag', 'the flag wins');
  assert.is(toDeployOptions(flags, {}, null).label, undefined);
  for (const bad of ['', 'x'.repeat(65), 'a\nb'])
    assert.throws(() => toDeployOptions({ ...flags, label: bad }, {}, null), /--label/);
  const sys = new FakeSys();
  await sys.fs.mkdir('/etc/portflip', 0o755);
  const text = 'listen = 80\nlabel = "v2"\ncommand = ["node", "x.js"]\n';
  await sys.fs.write('/etc/portflip/web.toml', text, 0o644);
  const read = await readConfig(sys, 'web', undefined, { PORTFLIP_CONFIG_DIR: '/etc/portflip' });
  assert.is(read.hash, createHash('sha256').update(text).digest('hex'));
  assert.is(read.config.label, 'v2');
  assert.is((await readConfig(sys, 'api', undefined, { PORTFLIP_CONFIG_DIR: '/etc/portflip' })).hash, undefined);
  assert.is(count('3', '-n'), 3);
  for (const bad of ['0', '-1', '1.5', 'many']) assert.throws(() => count(bad, '-n'), /-n/);
});

// ---- records through the commands ----------------------------------------------------------

const cli = { by: 'cli' as const };
const stepsOf = (r: HistoryRecord) => r.steps.map((s) => `${s.step}:${s.status}`);

test('deploy, a failed deploy, rollback and stop each leave one record with from, to, steps and result', async () => {
  const sys = new FakeSys();
  const { ctx } = fakeCtx(sys);
  await recorded(ctx, 'web', { action: 'deploy', ...cli }, (c) => deploy(fakeDeploy({ label: 'v1' }), c));
  const v1 = sys.apps()[0];
  await recorded(ctx, 'web', { action: 'deploy', ...cli }, (c) =>
    deploy(fakeDeploy({ label: 'v2', keepOldMs: 600_000, configHash: 'ab'.repeat(32) }), c),
  );
  const v2 = sys.apps().find((p) => p.pid !== v1.pid)!;
  await recorded(ctx, 'web', { action: 'rollback', ...cli }, (c) => rollback(c, 'web'));
  sys.behave = () => ({ listenAfterMs: null, termExitMs: 100 });
  const err = await recorded(ctx, 'web', { action: 'deploy', ...cli }, (c) =>
    deploy(fakeDeploy({ label: 'v3', readyTimeoutMs: 3000 }), c),
  ).catch((e) => e);
  assert.ok(err instanceof PortflipError && err.kind === 'deployFailed', String(err));
  await recorded(ctx, 'web', { action: 'stop', ...cli }, (c) => stop(c, 'web'));
  // a typo names no app: nothing is recorded for it
  await recorded(ctx, 'wbe', { action: 'stop', ...cli }, (c) => stop(c, 'wbe')).catch(() => {});

  const { records } = await readHistory(sys, FAKE_PATHS, 'web');
  assert.equal(
    records.map((r) => `${r.action}:${r.result}:${r.exitCode}`),
    ['deploy:ok:0', 'deploy:ok:0', 'rollback:ok:0', 'deploy:failed:1', 'stop:ok:0'],
  );
  const [first, second, back, failed, stopped] = records;
  assert.is(first.from, undefined, 'nothing served before the first deploy');
  assert.equal([first.to?.port, first.to?.pid, first.to?.label], [v1.port, v1.pid, 'v1']);
  assert.equal(stepsOf(first), [
    'preflight:ok',
    'start:ok',
    'ready:ok',
    'bind-check:ok',
    'open:ok',
    'switch:ok',
    'done:ok',
  ]);
  assert.equal([second.from?.pid, second.to?.pid, second.to?.label], [v1.pid, v2.pid, 'v2']);
  assert.is(second.to?.configHash, 'ab'.repeat(32));
  assert.equal(second.to?.command, ['fakeapp']);
  assert.ok(second.steps.every((s) => s.durationMs >= 0));
  assert.ok(second.steps.find((s) => s.step === 'ready')!.durationMs >= 200, 'the fake app listens after 200ms');
  assert.equal(failed.error, { kind: 'deployFailed', message: err.message, step: 'ready' });
  assert.equal([failed.from?.pid, failed.to?.pid], [v1.pid, v1.pid], 'the old instance still serves');
  assert.ok(failed.steps.some((s) => s.step === 'ready' && s.status === 'failed' && s.port && s.pid));
  assert.ok(failed.durationMs >= 3000);
  assert.equal([back.from?.pid, back.to?.pid, back.to?.label], [v2.pid, v1.pid, 'v1']);
  assert.equal([stopped.from?.pid, stopped.to], [v1.pid, undefined]);
  assert.equal(await historyApps(sys, FAKE_PATHS), ['web']);
  assert.equal(await sys.fs.readdir(join(FAKE_PATHS.stateDir, 'history')), ['web.jsonl']);

  const shown = await history(ctx, 'web', 2);
  assert.equal(
    shown.records.map((r) => r.action),
    ['stop', 'deploy'],
    'newest first, -n of them',
  );
  const unknown = await history(ctx, 'nosuch', 5).catch((e) => e);
  assert.ok(unknown instanceof PortflipError && unknown.kind === 'nothingToDo', String(unknown));
  const bad = await history(ctx, '../etc', 5).catch((e) => e);
  assert.ok(bad instanceof PortflipError && bad.kind === 'usage', String(bad));
});

test('the healer records a repair with what was missing; restore records only the apps it changed', async () => {
  const sys = new FakeSys();
  const { ctx } = fakeCtx(sys);
  await deploy(fakeDeploy(), ctx);
  await deploy(fakeDeploy({ app: 'api', listen: 81 }), ctx);
  sys.flushRules();
  assert.is(await new Healer(ctx, 'watch').heal('web'), 'repaired');
  const [repair] = (await readHistory(sys, FAKE_PATHS, 'web')).records;
  assert.equal([repair.action, repair.by, repair.result], ['repair', 'watch', 'ok']);
  assert.ok(repair.repaired!.includes('nat: chain PF-web'), repair.repaired!.join('; '));
  assert.ok(repair.steps.some((s) => s.step === 'repair'));
  await recordedEvery(ctx, { action: 'restore', ...cli }, (c) => restore(c));
  assert.is((await readHistory(sys, FAKE_PATHS, 'web')).records.length, 1, 'web was in line: no restore record');
  const [api] = (await readHistory(sys, FAKE_PATHS, 'api')).records;
  assert.equal([api.action, api.result, api.to?.port], ['restore', 'ok', sys.redirectTarget('api')]);
});

test('a run refused for want of root leaves no record (nor a failed deploy to count); one that failed later does', async () => {
  const sys = new FakeSys();
  const { ctx } = fakeCtx(sys);
  await recorded(ctx, 'web', { action: 'deploy', ...cli }, (c) => deploy(fakeDeploy(), c));
  const noRoot = new PortflipError('notPrivileged', 'needs root (or CAP_NET_ADMIN); run it with sudo');
  const refused = await recorded(ctx, 'web', { action: 'deploy', ...cli }, async () => {
    throw noRoot;
  }).catch((e) => e);
  assert.is(refused, noRoot, "the command's own error stands");
  assert.is((await readHistory(sys, FAKE_PATHS, 'web')).records.length, 1, 'no record of the refusal');
  // the same class of error after a step ran: something was tried, so it is recorded
  await recorded(ctx, 'web', { action: 'rollback', ...cli }, async (c) => {
    c.emit({ kind: 'step', app: 'web', step: 'switch', status: 'failed', durationMs: 3 });
    throw noRoot;
  }).catch(() => {});
  const { records } = await readHistory(sys, FAKE_PATHS, 'web');
  assert.equal(
    records.map((r) => `${r.action}:${r.result}:${r.exitCode}`),
    ['deploy:ok:0', 'rollback:failed:4'],
  );
});

test('a repair someone else made between the check and the lock is not recorded again', async () => {
  const sys = new FakeSys();
  const { ctx } = fakeCtx(sys);
  await deploy(fakeDeploy(), ctx);
  sys.flushRules();
  // watch's healer sees the rules broken; before it takes the lock, run's healer (same app) repairs them
  const watcher = new Healer(ctx, 'watch');
  const runs = new Healer(ctx, 'run');
  const check = watcher.check.bind(watcher);
  let checks = 0;
  watcher.check = async (st) => {
    const missing = await check(st);
    if (checks++ === 0) {
      assert.ok(missing.length, 'broken when watch looked');
      assert.is(await runs.heal('web'), 'repaired');
    }
    return missing;
  };
  assert.is(await watcher.heal('web'), 'ok');
  const { records } = await readHistory(sys, FAKE_PATHS, 'web');
  assert.equal(
    records.filter((r) => r.action === 'repair').map((r) => r.by),
    ['run'],
    'one repair, one record (and one count in portflip_rule_repairs_total)',
  );
});

test('a canary deploy records the canary as "to"; promote moves from the old to it; abort from the canary back', async () => {
  const sys = new FakeSys();
  const { ctx } = fakeCtx(sys);
  const canary = { percent: 10, by: 'conn' as const };
  await deploy(fakeDeploy({ label: 'v1' }), ctx);
  await recorded(ctx, 'web', { action: 'deploy', ...cli }, (c) => deploy(fakeDeploy({ label: 'v2', canary }), c));
  await recorded(ctx, 'web', { action: 'promote', ...cli }, (c) => promote(c, 'web'));
  await recorded(ctx, 'web', { action: 'deploy', ...cli }, (c) => deploy(fakeDeploy({ label: 'v3', canary }), c));
  await recorded(ctx, 'web', { action: 'abort', ...cli }, (c) => abort(c, 'web'));
  await recordedEvery(ctx, { action: 'cleanup', ...cli }, (c) => cleanup(c, true));
  const { records } = await readHistory(sys, FAKE_PATHS, 'web');
  const labels = records.map((r) => `${r.action}:${r.from?.label ?? '-'}->${r.to?.label ?? '-'}:${r.result}`);
  assert.equal(labels, [
    'deploy:v1->v2:ok',
    'promote:v1->v2:ok',
    'deploy:v2->v3:ok',
    'abort:v3->v2:ok',
    'cleanup:v2->-:ok',
  ]);
  assert.ok(records[0].steps.some((s) => s.step === 'canary'));
  assert.ok(
    records[4].steps.some((s) => s.step === 'cleanup'),
    "cleanup's one step is in every app's record",
  );
});

test('a history that cannot be written is a notice; the command succeeds', async () => {
  const sys = new FakeSys();
  const { ctx, events } = fakeCtx(sys);
  await sys.fs.mkdir(FAKE_PATHS.stateDir, 0o700);
  await sys.fs.write(join(FAKE_PATHS.stateDir, 'history'), 'not a directory', 0o600);
  await recorded(ctx, 'web', { action: 'deploy', ...cli }, (c) => deploy(fakeDeploy(), c));
  assert.ok(sys.redirectTarget('web'));
  assert.ok(
    events.some((e) => e.kind === 'notice' && /could not write its history record/.test(e.message)),
    JSON.stringify(events.filter((e) => e.kind === 'notice')),
  );
});

test('a portflip killed mid-deploy leaves a readable history, and the next deploy appends to it', async () => {
  const sys = new FakeSys();
  await recorded(fakeCtx(sys).ctx, 'web', { action: 'deploy', ...cli }, (c) => deploy(fakeDeploy(), c));
  sys.killAt = sys.effects + 12; // somewhere past the start of the next deploy
  const killed = await recorded(fakeCtx(sys).ctx, 'web', { action: 'deploy', ...cli }, (c) =>
    deploy(fakeDeploy(), c),
  ).catch((e) => e);
  assert.match(String(killed), /portflip was killed/);
  sys.revive();
  await recorded(fakeCtx(sys).ctx, 'web', { action: 'deploy', ...cli }, (c) => deploy(fakeDeploy(), c));
  const { records, skipped } = await readHistory(sys, FAKE_PATHS, 'web');
  assert.is(skipped, 0);
  assert.equal(
    records.map((r) => `${r.action}:${r.result}`),
    ['deploy:ok', 'deploy:ok'],
    'the killed run left no record, and no torn line',
  );
  assert.is(records[1].to?.pid, sys.apps().find((p) => p.port === sys.redirectTarget('web'))?.pid);
});

test('`portflip run` records its first deploy, each crash restart and its stop, by run', async () => {
  const runDir = await mkdtemp(join(tmpdir(), 'pf-history-run-'));
  const sys = new FakeSys();
  let spawned = 0;
  sys.behave = () => ({ listenAfterMs: 100, termExitMs: 100, exitAfterMs: ++spawned <= 2 ? 1000 : undefined });
  const { ctx, events } = fakeCtx(sys);
  const paths = { ...FAKE_PATHS, runDir };
  const emit = (e: Event) => {
    events.push(e);
    const restarted = events.filter((x) => x.kind === 'supervisor' && x.action === 'restarted').length;
    if (e.kind === 'supervisor' && e.action === 'restarted' && restarted === 2)
      setImmediate(() => process.emit('SIGTERM', 'SIGTERM'));
  };
  try {
    await supervise({ app: 'web', load: async () => fakeDeploy() }, { ...ctx, paths, emit });
  } finally {
    await rm(runDir, { recursive: true, force: true });
  }
  const { records } = await readHistory(sys, paths, 'web');
  assert.equal(
    records.map((r) => `${r.action}:${r.by}:${r.result}`),
    ['deploy:run:ok', 'restart:run:ok', 'restart:run:ok', 'stop:run:ok'],
  );
  // a restart replaces the instance that crashed: the state still named it
  assert.is(records[1].from?.pid, records[0].to?.pid);
  assert.is(records[2].from?.pid, records[1].to?.pid);
  assert.ok(records[2].to?.pid && records[2].to.pid !== records[1].to?.pid);
});

test.run();
