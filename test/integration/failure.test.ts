// A candidate that fails (exits, never ready, wrong bind address) is killed; the redirect never moves.

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { startLoad, freePorts } from '../helpers/netns.js';
import { inWorld, alive, deployArgs, show, get, type World } from '../helpers/world.js';
import { events } from '../helpers/events.js';

const redirectTarget = async (w: World) => /-A PF-web -p tcp -j REDIRECT --to-ports (\d+)/.exec(await w.save())?.[1];

const cases: [string, string[], string[], RegExp][] = [
  ['exits at once', [], ['--exit-at-once'], /exited \(code 3\) before it was ready/],
  [
    'is never ready before --ready-timeout',
    ['--ready-timeout', '2s'],
    ['--never-listen'],
    /not ready on port \d+ after 2s/,
  ],
  [
    'answers the readiness URL with 404',
    ['--ready', 'http://127.0.0.1:{port}/missing', '--ready-timeout', '2s'],
    [],
    /not ready/,
  ],
  ['listens on 127.0.0.1 only', [], ['--host', '127.0.0.1'], /listens on 127\.0\.0\.1 only.*bind to 0\.0\.0\.0/],
];

for (const [what, flags, appArgs, message] of cases) {
  test(`a candidate that ${what} is killed, the redirect stays, clients see nothing`, async () => {
    await inWorld(async (w) => {
      const ports = await freePorts(2);
      assert.is((await w.pf(deployArgs(ports, [], ['--version', 'v1']))).code, 0);
      const before = await redirectTarget(w);
      const load = await startLoad(w.ns, 'server', { url: 'http://127.0.0.1:80/', mode: 'new', durationMs: 30_000 });
      const r = await w.pf(deployArgs(ports, [...flags, '--json'], ['--version', 'v2', ...appArgs]));
      const res = await load.stop();
      assert.is(r.code, 1, show(r));
      assert.match(r.stderr, message);
      const ev = events(r.stdout);
      const pid = ev.find((e) => e.step === 'start')!.pid as number;
      assert.not.ok(alive(pid), `candidate pid ${pid} is gone`);
      const tail = ev.find((e) => e.kind === 'log-tail');
      assert.ok(tail, 'the log tail is printed');
      if (what === 'exits at once')
        assert.ok(
          tail!.lines.some((l: string) => l.includes('exiting at once')),
          tail!.lines.join('\n'),
        );
      assert.is(await redirectTarget(w), before, 'the redirect did not move');
      assert.is(res.failed, 0, JSON.stringify(res));
      assert.equal([...new Set(res.versions)], ['v1']);
      assert.is(await get(w.ns, 'http://127.0.0.1:80/'), 'v1');
      const st = JSON.parse((await w.pf(['status', '--json'])).stdout).apps[0];
      assert.is(st.others.length, 0, 'no candidate left in the state');
      assert.is(st.rules, 'ok');
    });
  });
}

test('the first deploy that fails leaves no rule at all', async () => {
  await inWorld(async (w) => {
    const before = await w.save();
    const r = await w.pf(deployArgs(await freePorts(2), ['--ready-timeout', '1s'], ['--never-listen']));
    assert.is(r.code, 1, show(r));
    assert.is(await w.save(), before);
    assert.equal(
      JSON.parse((await w.pf(['status', '--json'])).stdout).apps,
      [],
      'no state is left for an app that never ran',
    );
  });
});

test.run();
