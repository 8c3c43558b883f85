// The history for real: deploys, a failed deploy, rollback, pause/resume and stop each leave one record with
// the pids, labels and step durations the commands reported; a portflip SIGKILLed mid-deploy leaves it readable.

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { freePorts } from '../helpers/netns.js';
import { inWorld, deployArgs, show } from '../helpers/world.js';
import { events, waitEvent, type JsonEvent } from '../helpers/events.js';
import type { HistoryRecord } from '../../src/core/history.js';

/** The pid the deploy switched to, from its own events. */
const donePid = (stdout: string) => events(stdout).find((e: JsonEvent) => e.step === 'done')?.pid as number;

test('every command that changed the app left one record; a kill mid-deploy leaves the history readable', async () => {
  await inWorld(async (w) => {
    const ports = await freePorts(2);
    const run = async (args: string[], code = 0) => {
      const r = await w.pf(args);
      assert.is(r.code, code, `${args.join(' ')}: ${show(r)}`);
      return r;
    };
    const v1 = donePid((await run(deployArgs(ports, ['--label', 'v1', '--json'], ['--version', 'v1']))).stdout);
    const v2 = donePid(
      (await run(deployArgs(ports, ['--label', 'v2', '--keep-old', '60s', '--json'], ['--version', 'v2']))).stdout,
    );
    await run(['rollback', 'web']);
    const bad = ['--label', 'v3', '--ready-timeout', '1s', '--json'];
    await run(deployArgs(ports, bad, ['--version', 'v3', '--never-listen']), 1);
    await run(['pause', 'web', '--timeout', '30s']);
    await run(['resume', 'web']);
    await run(['deploy', 'web', '--dry-run', '--listen', '80', '--', 'true']); // a dry run records nothing
    await run(['stop', 'web']);

    const records = (await run(['history', 'web', '--json'])).stdout
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as HistoryRecord)
      .reverse(); // oldest first, to read along
    assert.equal(
      records.map((r) => `${r.action}:${r.by}:${r.result}:${r.exitCode}`),
      ['deploy:cli:ok:0', 'deploy:cli:ok:0', 'rollback:cli:ok:0', 'deploy:cli:failed:1'].concat([
        'pause:cli:ok:0',
        'resume:cli:ok:0',
        'stop:cli:ok:0',
      ]),
    );
    const [first, second, back, failed, pause, resume, stopped] = records;
    assert.equal([first.from, first.to?.pid, first.to?.label], [undefined, v1, 'v1']);
    assert.equal([second.from?.pid, second.to?.pid, second.to?.label], [v1, v2, 'v2']);
    assert.equal([back.from?.pid, back.to?.pid], [v2, v1]);
    for (const r of [first, second]) {
      const ms = (step: string) => r.steps.find((s) => s.step === step)?.durationMs ?? -1;
      assert.ok(ms('switch') >= 0 && ms('switch') < 5000, `switch ${ms('switch')}ms`);
      assert.ok(ms('ready') > 0, `ready ${ms('ready')}ms`);
      assert.ok(r.durationMs >= ms('ready'));
    }
    assert.not.ok(
      second.steps.some((s) => s.step === 'drain'),
      '--keep-old kept the first',
    );
    const drained = back.steps.find((s) => s.step === 'drain');
    assert.ok(drained && drained.pid === v2 && drained.durationMs >= 0, 'the rollback drained v2');
    assert.equal([failed.error?.kind, failed.error?.step], ['deployFailed', 'ready']);
    assert.match(failed.error!.message, /not ready on port \d+ after 1s/);
    assert.equal([failed.from?.pid, failed.to?.pid], [v1, v1], 'v1 kept serving');
    assert.ok(failed.steps.some((s) => s.step === 'ready' && s.status === 'failed' && s.durationMs >= 900));
    assert.equal([pause.to?.pid, resume.to?.pid, stopped.from?.pid, stopped.to], [v1, v1, v1, undefined]);

    // SIGKILL mid-deploy: the history stays readable, and the next command appends to it
    const child = w.pfSpawn(deployArgs(ports, ['--json'], ['--version', 'v4', '--start-delay', '500']));
    await waitEvent(child, (e) => e.step === 'start');
    child.kill('SIGKILL');
    await new Promise((r) => child.once('exit', r));
    const v5 = donePid((await run(deployArgs(ports, ['--label', 'v5', '--json'], ['--version', 'v5']))).stdout);
    const all = await run(['history', '--json', '-n', '100']); // every app, newest first
    const latest = JSON.parse(all.stdout.split('\n')[0]) as HistoryRecord;
    assert.equal([latest.action, latest.result, latest.to?.pid, latest.to?.label], ['deploy', 'ok', v5, 'v5']);
    assert.is(all.stdout.trim().split('\n').length, 8, 'the killed deploy left no record and no torn line');
    assert.not.match(all.stderr, /torn/);
    const file = readFileSync(join(w.dirs.stateDir, 'history', 'web.jsonl'), 'utf8');
    assert.ok(file.endsWith('\n') && file.split('\n').length === 9, 'one line per record');

    const table = await run(['history', 'web', '-n', '3']);
    assert.match(table.stdout, /^WHEN +APP +ACTION/);
    assert.match(table.stdout, /deploy +cli +ok +- -> \d+ v5/);
    assert.is(table.stdout.trim().split('\n').length, 4);
    const svgFile = join(w.dirs.stateDir, 'web.svg');
    await run(['history', 'web', '--svg', svgFile]);
    const svg = readFileSync(svgFile, 'utf8');
    assert.ok(svg.startsWith('<svg') && svg.trimEnd().endsWith('</svg>'));
    assert.match(svg, /#d62728/, 'the failed deploy is marked');
    const status = await run(['status', 'web', '--json']);
    assert.is(JSON.parse(status.stdout).apps[0].active.label, 'v5', 'status shows the label');
    assert.match((await run(['status', 'web'])).stdout, /LABEL\n(.*\n)*web .* v5$/m);
    const unknown = await run(['history', 'nosuch'], 9);
    assert.match(unknown.stderr, /no app named "nosuch"/);
  });
});

test.run();
