// Deploys under load, for real: zero failed requests and versions moving forward, on both paths.

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { startLoad, freePorts, type LoadResult } from '../helpers/netns.js';
import { inWorld, deployArgs, show, get } from '../helpers/world.js';
import { events } from '../helpers/events.js';

const firstSeen = (r: LoadResult) => [...new Set(r.versions)];

for (const where of ['server', 'client'] as const) {
  const path = where === 'server' ? 'loopback clients (OUTPUT)' : 'clients in another namespace over veth (PREROUTING)';
  test(`three deploys under load, zero failed requests: ${path}`, async () => {
    await inWorld(
      async (w) => {
        const ports = await freePorts(2);
        const first = await w.pf(
          deployArgs(
            ports,
            ['--ready', 'http://127.0.0.1:{port}/health'],
            ['--version', 'v1', '--start-delay', '1000'],
          ),
        );
        assert.is(first.code, 0, show(first));
        const url = where === 'server' ? 'http://127.0.0.1:80/' : `http://${w.ns.serverAddr}:80/`;
        assert.is(await get(w.ns, url, where), 'v1');

        const loads = await Promise.all([
          startLoad(w.ns, where, { url, mode: 'new', concurrency: 4, durationMs: 60_000, maxRequests: 200_000 }),
          startLoad(w.ns, where, { url, mode: 'keepalive', concurrency: 4, durationMs: 60_000, maxRequests: 200_000 }),
        ]);
        for (const v of ['v2', 'v3']) {
          const r = await w.pf([
            ...deployArgs(
              ports,
              ['--ready', 'http://127.0.0.1:{port}/health', '--json'],
              ['--version', v, '--start-delay', '1000'],
            ),
          ]);
          assert.is(r.code, 0, show(r));
          const steps = events(r.stdout).filter((e) => e.kind === 'step');
          assert.equal(
            steps.map((e) => e.step),
            ['preflight', 'start', 'ready', 'bind-check', 'open', 'switch', 'drain', 'done'],
          );
          for (const e of steps) {
            assert.is(e.app, 'web');
            assert.type(e.durationMs, 'number');
            if (e.step !== 'preflight') assert.ok(ports.includes(e.port!), `${e.step} names the port`);
          }
          assert.ok(steps.find((e) => e.step === 'start')!.pid! > 0);
        }
        const [fresh, kept] = await Promise.all(loads.map((l) => l.stop()));
        for (const [mode, res] of [
          ['new connection per request', fresh],
          ['keep-alive', kept],
        ] as const) {
          assert.is(res.failed, 0, `${mode}: ${JSON.stringify(res)}`);
          assert.ok(res.ok > 50, `${mode}: enough requests ran (${res.ok})`);
          assert.equal(firstSeen(res), ['v1', 'v2', 'v3'], `${mode}: ${res.versions}`);
          assert.is(res.versions.at(-1), 'v3');
        }
        assert.is(await get(w.ns, url, where), 'v3');
      },
      { peer: where === 'client' },
    );
  });
}

test('people see every step with its duration on stderr', async () => {
  await inWorld(async (w) => {
    const ports = await freePorts(2);
    const r = await w.pf(deployArgs(ports, [], ['--version', 'v1']));
    assert.is(r.code, 0, show(r));
    assert.is(r.stdout, '');
    for (const step of ['preflight', 'start', 'ready', 'bind-check', 'open', 'switch', 'done']) {
      assert.match(r.stderr, new RegExp(`web: ok\\s+${step}\\b.*\\d+(ms|\\.\\d+s)`), step);
    }
    const status = await w.pf(['status', '--json']);
    const s = JSON.parse(status.stdout);
    assert.is(s.apps[0].app, 'web');
    assert.is(s.apps[0].listen, 80);
    assert.is(s.apps[0].rules, 'ok');
    assert.ok(ports.includes(s.apps[0].active.port));
    assert.ok(s.apps[0].active.pid > 0);
    assert.type(s.apps[0].active.memory, 'number');
    const table = await w.pf(['status']);
    assert.match(table.stdout, /web\s+80\s+\d+\s+\d+\s+active/);
  });
});

test.run();
