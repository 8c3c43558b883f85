// portflip killed at any step: traffic keeps flowing, and the next run finds what is real and repairs it.

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { ChildProcess } from 'node:child_process';
import { startLoad, freePorts } from '../helpers/netns.js';
import { inWorld, deployArgs, show, get, alive } from '../helpers/world.js';
import { events, waitEvent, type JsonEvent } from '../helpers/events.js';

const killPoints: [string, string[], (e: JsonEvent) => boolean][] = [
  ['right after start', [], (e) => e.step === 'start'],
  ['right after the switch', [], (e) => e.step === 'switch'],
  ['during the drain', ['--drain', 'idle', '--drain-timeout', '2s'], (e) => e.kind === 'connections'],
];

for (const [when, flags, match] of killPoints) {
  test(`deploy SIGKILLed ${when}: zero failed requests, and the next deploy repairs and succeeds`, async () => {
    await inWorld(async (w) => {
      const ports = await freePorts(2);
      assert.is((await w.pf(deployArgs(ports, [], ['--version', 'v1']))).code, 0);
      const loads = await Promise.all([
        startLoad(w.ns, 'server', { url: 'http://127.0.0.1:80/', mode: 'new', durationMs: 60_000 }),
        startLoad(w.ns, 'server', { url: 'http://127.0.0.1:80/', mode: 'keepalive', durationMs: 60_000 }),
      ]);
      const child = w.pfSpawn(deployArgs(ports, [...flags, '--json'], ['--version', 'v2', '--start-delay', '500']));
      const started = waitEvent(child, (e) => e.step === 'start');
      await waitEvent(child, match);
      child.kill('SIGKILL');
      const candidate = (await started).pid as number;
      await new Promise((r) => setTimeout(r, 1500)); // traffic keeps flowing with nobody in charge
      const served = await get(w.ns, 'http://127.0.0.1:80/');
      assert.ok(['v1', 'v2'].includes(served), served);

      const next = await w.pf(deployArgs(ports, ['--json'], ['--version', 'v3']));
      assert.is(next.code, 0, show(next));
      const notes = events(next.stdout)
        .filter((e) => e.kind === 'notice')
        .map((e) => e.message)
        .join('\n');
      if (when === 'right after start') {
        assert.match(notes, /stopping the candidate/);
        assert.not.ok(alive(candidate), 'the orphan candidate was stopped');
      }
      const results = await Promise.all(loads.map((l) => l.stop()));
      for (const res of results) assert.is(res.failed, 0, JSON.stringify(res));
      assert.is(await get(w.ns, 'http://127.0.0.1:80/'), 'v3');
      const st = JSON.parse((await w.pf(['status', '--json'])).stdout).apps[0];
      assert.is(st.rules, 'ok');
      assert.is(st.others.length, 0, `one instance left: ${JSON.stringify(st)}`);
    });
  });
}

test('restore after a deploy killed right after the switch finishes the job', async () => {
  await inWorld(async (w) => {
    const ports = await freePorts(2);
    assert.is((await w.pf(deployArgs(ports, [], ['--version', 'v1']))).code, 0);
    const child = w.pfSpawn(deployArgs(ports, ['--json'], ['--version', 'v2']));
    await waitEvent(child, (e) => e.step === 'switch');
    child.kill('SIGKILL');
    const r = await w.pf(['restore']);
    assert.is(r.code, 0, show(r));
    assert.is(await get(w.ns, 'http://127.0.0.1:80/'), 'v2');
    assert.is(JSON.parse((await w.pf(['status', '--json'])).stdout).apps[0].rules, 'ok');
  });
});

test('Ctrl-C during a deploy undoes it: the candidate is stopped and the redirect stays', async () => {
  await inWorld(async (w) => {
    const ports = await freePorts(2);
    assert.is((await w.pf(deployArgs(ports, [], ['--version', 'v1']))).code, 0);
    const before = await w.save();
    const child = w.pfSpawn(deployArgs(ports, ['--json'], ['--version', 'v2', '--start-delay', '3000']));
    const exited = new Promise<number>((r) => child.once('exit', (c) => r(c ?? -1)));
    const started = await waitEvent(child, (e) => e.step === 'start');
    child.kill('SIGINT');
    assert.is(await exited, 1);
    assert.not.ok(alive(started.pid), 'the candidate was stopped');
    assert.is(await w.save(), before, 'the redirect did not move');
    assert.is(await get(w.ns, 'http://127.0.0.1:80/'), 'v1');
    assert.is(JSON.parse((await w.pf(['status', '--json'])).stdout).apps[0].others.length, 0);
  });
});

test('a concurrent deploy fails at once naming the holder; a stale lock is taken over', async () => {
  await inWorld(async (w) => {
    const ports = await freePorts(2);
    const slow = w.pfSpawn(deployArgs(ports, ['--json'], ['--version', 'v1', '--start-delay', '1500']));
    const exited = new Promise<number>((r) => slow.once('exit', (c) => r(c ?? -1)));
    await waitEvent(slow, (e) => e.step === 'start');
    const t = Date.now();
    const second = await w.pf(deployArgs(ports, [], ['--version', 'v2']));
    assert.is(second.code, 3, show(second));
    assert.match(second.stderr, new RegExp(`locked by pid ${slow.pid}`));
    assert.ok(Date.now() - t < 5000, 'fails at once');
    assert.is(await exited, 0);

    writeFileSync(
      join(w.dirs.runDir, 'web.lock'),
      JSON.stringify({ pid: 999999, startTime: '1', command: 'deploy web' }),
    );
    const third = await w.pf(deployArgs(ports, [], ['--version', 'v3']));
    assert.is(third.code, 0, show(third));
    assert.match(third.stderr, /took over a stale lock.*pid 999999/);
    assert.is(await get(w.ns, 'http://127.0.0.1:80/'), 'v3');
  });
});

test.run();
