// Draining: in-flight requests finish on the old instance in both modes; a stubborn one is SIGKILLed, tree and all.

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { readFileSync } from 'node:fs';
import { freePorts, fixture, waitFor } from '../helpers/netns.js';
import { inWorld, alive, deployArgs, show, type World } from '../helpers/world.js';
import { events } from '../helpers/events.js';

/** A request that takes `ms` on the server, started now; resolves with "STATUS BODY". */
function slowRequest(w: World, ms: number): Promise<string> {
  const script = `fetch('http://127.0.0.1:80/slow?ms=${ms}').then(async r=>process.stdout.write(r.status+' '+(await r.text()).trim()),e=>process.stdout.write('ERR '+(e.cause?.code||e.message)))`;
  return w.ns.exec(process.execPath, ['-e', script]).then((r) => r.stdout.trim());
}

for (const [mode, onTerm] of [
  ['signal', 'graceful'],
  ['idle', 'graceful'],
  ['idle', 'exit'],
] as const) {
  test(`a 3 s request started before the switch completes with 200 on the old instance (--drain ${mode}, app ${onTerm} on SIGTERM)`, async () => {
    await inWorld(async (w) => {
      const ports = await freePorts(2);
      assert.is((await w.pf(deployArgs(ports, [], ['--version', 'v1', '--on-term', onTerm]))).code, 0);
      const slow = slowRequest(w, 3000);
      await new Promise((r) => setTimeout(r, 500));
      const started = Date.now();
      const r = await w.pf(deployArgs(ports, ['--drain', mode, '--json'], ['--version', 'v2', '--on-term', onTerm]));
      assert.is(r.code, 0, show(r));
      assert.is(await slow, '200 v1');
      const ev = events(r.stdout);
      const sig = ev.find((e) => e.kind === 'signal' && e.signal === 'SIGTERM');
      assert.ok(sig, 'the old instance got SIGTERM');
      if (mode === 'idle') {
        // the signal waited for the open connection to finish
        const counts = ev.filter((e) => e.kind === 'connections').map((e) => e.open);
        assert.ok(counts[0] >= 1 && counts.includes(0), `connection counts reported: ${counts}`);
        assert.ok(Date.now() - started >= 2000, 'deploy waited for the drain');
      }
      assert.not.ok(alive(sig.pid), 'the old instance exited');
    });
  });
}

test('an old instance that ignores SIGTERM is SIGKILLed after --kill-after, process group and all', async () => {
  await inWorld(async (w) => {
    const ports = await freePorts(2);
    // a tree: sh (exec'd into node) plus a background sleep that ignores SIGTERM too
    const cmd = (v: string) => [
      '--',
      'sh',
      '-c',
      `trap "" TERM; sleep 120 & echo child $! ; exec ${process.execPath} ${fixture('app.mjs')} --port $PORT --version ${v} --on-term ignore`,
    ];
    const first = await w.pf(['deploy', 'web', '--listen', '80', '--ports', ports.join(','), '--json', ...cmd('v1')]);
    assert.is(first.code, 0, show(first));
    const oldPid = events(first.stdout).find((e) => e.step === 'start')!.pid as number;
    const log = JSON.parse((await w.pf(['status', '--json'])).stdout).apps[0].active.log;
    await waitFor(() => /child \d+/.test(readFileSync(log, 'utf8')), 5000, 'the child to start');
    const childPid = Number(/child (\d+)/.exec(readFileSync(log, 'utf8'))![1]);
    assert.ok(alive(childPid));
    const started = Date.now();
    const r = await w.pf([
      'deploy',
      'web',
      '--listen',
      '80',
      '--ports',
      ports.join(','),
      '--kill-after',
      '1500ms',
      '--json',
      ...cmd('v2'),
    ]);
    assert.is(r.code, 0, show(r));
    const signals = events(r.stdout)
      .filter((e) => e.kind === 'signal')
      .map((e) => e.signal);
    assert.equal(signals, ['SIGTERM', 'SIGKILL']);
    assert.ok(Date.now() - started >= 1500, 'waited --kill-after before SIGKILL');
    assert.not.ok(alive(oldPid), 'old instance gone');
    assert.not.ok(alive(childPid), 'its child in the same group is gone too');
  });
});

test.run();
