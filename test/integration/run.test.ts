// `portflip run` for real: reload on SIGHUP and over the socket under load, crash restarts, reload with no supervisor, stop on SIGTERM.

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { ChildProcess } from 'node:child_process';
import { fixture, freePorts, startLoad, waitFor } from '../helpers/netns.js';
import { inWorld, app, show, get, alive, type World } from '../helpers/world.js';
import { events, follow, type Followed, type JsonEvent } from '../helpers/events.js';

type Supervisor = Followed & { child: ChildProcess };

/** Starts `portflip run` with --json; every test kills it by pid in its finally, so a failure leaves no keeper behind. */
function startRun(w: World, args: string[]): Supervisor {
  const child = w.pfSpawn(['run', 'web', '--json', ...args]);
  return { child, ...follow(child) };
}

const killRun = async (s: Supervisor) => {
  if (s.child.exitCode === null && s.child.signalCode === null) {
    s.child.kill('SIGKILL');
    await s.exited;
  }
};

const sup = (action: string) => (e: JsonEvent) => e.kind === 'supervisor' && e.action === action;
const count = (s: Supervisor, action: string) => s.events.filter(sup(action)).length;
const statusOf = async (w: World) => JSON.parse((await w.pf(['status', 'web', '--json'])).stdout).apps[0];

test('reload on SIGHUP and on `portflip reload` under load: zero failed requests, the config file re-read each time', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'pf-run-'));
  const file = join(dir, 'web.toml');
  const config = (ports: number[], v: string) =>
    `listen = 80\nports = [${ports.join(', ')}]\nready = "http://127.0.0.1:{port}/health"\n` +
    `command = ${JSON.stringify([process.execPath, fixture('app.mjs'), '--port', '{port}', '--version', v, '--start-delay', '200'])}\n`;
  try {
    await inWorld(async (w) => {
      const ports = await freePorts(2);
      writeFileSync(file, config(ports, 'v1'));
      const s = startRun(w, ['-c', file]);
      try {
        await s.wait((e) => e.step === 'done', 'the first deploy');
        const url = 'http://127.0.0.1:80/';
        assert.is(await get(w.ns, url), 'v1');
        const loads = await Promise.all([
          startLoad(w.ns, 'server', { url, mode: 'new', concurrency: 4, durationMs: 40_000 }),
          startLoad(w.ns, 'server', { url, mode: 'keepalive', concurrency: 4, durationMs: 40_000 }),
        ]);

        writeFileSync(file, config(ports, 'v2'));
        s.child.kill('SIGHUP');
        await s.wait(sup('reloaded'), 'the SIGHUP reload');
        assert.is(await get(w.ns, url), 'v2');

        writeFileSync(file, config(ports, 'v3'));
        const r = await w.pf(['reload', 'web', '--json']);
        assert.is(r.code, 0, show(r));
        // the client shows the deploy the supervisor ran for it
        assert.ok(
          events(r.stdout).some((e) => e.step === 'done'),
          r.stdout,
        );
        assert.is(await get(w.ns, url), 'v3');

        // a storm of SIGHUPs during a reload is queued once: one more reload, not one per signal
        s.child.kill('SIGHUP');
        await waitFor(() => count(s, 'reload') === 3, 5000, 'the third reload to start');
        for (let i = 0; i < 3; i++) s.child.kill('SIGHUP');
        await waitFor(() => count(s, 'reloaded') === 4, 20_000, `the queued reload\n${s.output()}`);
        await new Promise((r) => setTimeout(r, 1000));
        assert.is(count(s, 'reload'), 4, 'two reloads for four SIGHUPs');

        // a reload that fails (here: a bad config file) exits with the deploy's code and leaves v3 serving
        writeFileSync(file, 'listen = "80"\n');
        const bad = await w.pf(['reload', 'web']);
        assert.is(bad.code, 8, show(bad));
        assert.match(bad.stderr, /web\.toml: key "listen"/);
        assert.is(await get(w.ns, url), 'v3');

        const results = await Promise.all(loads.map((l) => l.stop()));
        for (const res of results) {
          assert.is(res.failed, 0, JSON.stringify(res));
          assert.ok(res.ok > 50, `enough requests ran (${res.ok})`);
          assert.equal([...new Set(res.versions)], ['v1', 'v2', 'v3'], String(res.versions));
        }
        const st = await statusOf(w);
        assert.is(st.others.length, 0, JSON.stringify(st));
        assert.is(st.restarts, 0);
      } finally {
        await killRun(s);
      }
    });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a crash of the active instance is restarted and counted; a reload with flags only deploys the same app again', async () => {
  await inWorld(async (w) => {
    const ports = await freePorts(2);
    const s = startRun(w, [
      '--listen',
      '80',
      '--ports',
      ports.join(','),
      '--ready',
      'http://127.0.0.1:{port}/health',
      ...app('--version', 'v1'),
    ]);
    try {
      await s.wait((e) => e.step === 'done', 'the first deploy');
      const before = (await statusOf(w)).active;
      process.kill(before.pid, 'SIGKILL');
      const crash = await s.wait((e) => e.kind === 'crash', 'the crash to be seen');
      assert.is(crash.pid, before.pid);
      assert.is(crash.restartInMs, 1000);
      const restarted = await s.wait(sup('restarted'), 'the restart');
      assert.ok(restarted.pid !== before.pid && alive(restarted.pid));
      assert.is(await get(w.ns, 'http://127.0.0.1:80/'), 'v1');
      const st = await statusOf(w);
      assert.ok(st.restarts >= 1, JSON.stringify(st));
      assert.is(st.active.pid, restarted.pid);
      assert.is(st.rules, 'ok');

      // run was started with flags only: the reload deploys the same command again, with no downtime
      const r = await w.pf(['reload', 'web']);
      assert.is(r.code, 0, show(r));
      assert.ok((await statusOf(w)).active.pid !== restarted.pid);
      assert.is(count(s, 'restart'), 1, 'one restart for one crash');
    } finally {
      await killRun(s);
    }
  });
});

test('`portflip reload` with no supervisor running exits 9 and says how to start one', async () => {
  await inWorld(async (w) => {
    const r = await w.pf(['reload', 'web']);
    assert.is(r.code, 9, show(r));
    assert.match(r.stderr, /no supervisor is running for "web".*portflip run web/);
  });
});

test('SIGTERM to run stops the instances, removes the rules and the socket, and run exits 0; a second run is refused meanwhile', async () => {
  await inWorld(async (w) => {
    const ports = await freePorts(2);
    const s = startRun(w, ['--listen', '80', '--ports', ports.join(','), ...app('--version', 'v1')]);
    try {
      await s.wait((e) => e.step === 'done', 'the first deploy');
      const pid = (await statusOf(w)).active.pid;
      assert.ok(existsSync(join(w.dirs.runDir, 'web.sock')));
      const second = await w.pf([
        'run',
        'web',
        '--listen',
        '80',
        '--ports',
        ports.join(','),
        ...app('--version', 'v2'),
      ]);
      assert.is(second.code, 3, show(second));
      assert.match(second.stderr, /already running/);

      s.child.kill('SIGTERM');
      assert.is(await s.exited, 0, s.output());
      assert.not.ok(alive(pid), 'the instance was stopped');
      assert.not.match(await w.save(), /PORTFLIP|PF-/, 'no portflip rules left');
      assert.not.ok(existsSync(join(w.dirs.runDir, 'web.sock')), 'the socket is gone');
      assert.not.ok(existsSync(join(w.dirs.stateDir, 'web.json')), 'the state file is gone');
      assert.ok(
        s.events.some((e) => e.step === 'stop'),
        s.output(),
      );
    } finally {
      await killRun(s);
    }
  });
});

test.run();
