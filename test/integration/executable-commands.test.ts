// The single executable's long-running and canary commands on a "host" with no Node.js (the mount namespace of
// executable.test.ts): run (a crash restart, `portflip reload`, SIGTERM), watch (repairs flushed rules), agent
// (--once and over TCP), and a canary promoted and one aborted. One world, each part short: the deploys under load
// are executable.test.ts's; here each command is shown to work from the executable at all.

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import type { ChildProcess } from 'node:child_process';
import { rmSync } from 'node:fs';
import {
  builtExecutable,
  noNodeExec,
  noNodeFiles,
  noNodeSpawn,
  type Built,
  type NoNodeFiles,
} from '../helpers/executable.js';
import { fixture, freePorts, waitFor } from '../helpers/netns.js';
import { inWorld, get, show, alive, type World } from '../helpers/world.js';
import { events, follow } from '../helpers/events.js';

const PLAIN = fixture('plain-app.mjs');
const URL = 'http://127.0.0.1:80/';
let built: Built;

test.before(async () => {
  built = await builtExecutable();
});

const killed = async (child: ChildProcess) => {
  if (child.exitCode === null && child.signalCode === null) {
    child.kill('SIGKILL');
    await new Promise((r) => child.once('exit', r));
  }
};

/** Versions answered over `n` new connections from the server namespace (loopback passes OUTPUT). */
async function versions(w: World, n: number): Promise<Record<string, number>> {
  const r = await w.ns.exec(process.execPath, [fixture('count.mjs'), '--url', URL, '--count', String(n)]);
  const c = JSON.parse(r.stdout.trim().split('\n').pop()!);
  assert.is(c.failed, 0, r.stdout);
  return c.byFrom.any;
}

test('no Node.js on the host: run (crash restart, reload, SIGTERM), watch, agent, canary promote and abort', async () => {
  const files: NoNodeFiles = noNodeFiles();
  const pf = (w: World, args: string[]) => noNodeExec(w, built, files, args);
  try {
    await inWorld(async (w) => {
      const ports = await freePorts(4);
      const [agentPort, ...appPorts] = ports;
      const appArgs = (v: string) => ['--listen', '80', '--ports', appPorts.join(','), '--', files.appNode, PLAIN, v];
      const active = async () => JSON.parse((await pf(w, ['status', 'web', '--json'])).stdout).apps[0].active;

      // run: the supervisor deploys, restarts a crashed instance, deploys again on `portflip reload`, stops on SIGTERM
      const run = noNodeSpawn(w, built, files, ['run', 'web', '--json', ...appArgs('v1')]);
      const sup = follow(run);
      try {
        await sup.wait((e) => e.step === 'done', 'the first deploy');
        assert.is(await get(w.ns, URL), 'v1');
        const first = await active();
        process.kill(first.pid, 'SIGKILL');
        await sup.wait((e) => e.kind === 'crash' && e.pid === first.pid, 'the crash to be seen');
        const restarted = await sup.wait((e) => e.kind === 'supervisor' && e.action === 'restarted', 'the restart');
        assert.ok(restarted.pid !== first.pid && alive(restarted.pid), JSON.stringify(restarted));
        assert.is(await get(w.ns, URL), 'v1');
        const r = await pf(w, ['reload', 'web', '--json']);
        assert.is(r.code, 0, show(r));
        assert.ok(
          events(r.stdout).some((e) => e.step === 'switch' && e.status === 'ok'),
          r.stdout,
        );
        const reloaded = await active();
        assert.ok(reloaded.pid !== restarted.pid, 'the reload started a new instance');
        assert.is(await get(w.ns, URL), 'v1');
        run.kill('SIGTERM');
        assert.is(await sup.exited, 0, sup.output());
        assert.not.ok(alive(reloaded.pid), 'run stopped its instance');
        assert.match(await get(w.ns, URL), /^ERR /, 'and removed its redirect');
      } finally {
        await killed(run);
      }

      const d1 = await pf(w, ['deploy', 'web', ...appArgs('v1')]);
      assert.is(d1.code, 0, show(d1));

      // watch: the app's chains flushed behind its back are put back
      const watch = noNodeSpawn(w, built, files, ['watch', '--json']);
      const watched = follow(watch);
      try {
        await sleep(500); // its first look finds everything in place
        assert.is((await w.sh('iptables -t nat -F PF-web; iptables -F PF-web')).code, 0);
        await watched.wait((e) => e.step === 'repair', 'a repair', 5000);
        await waitFor(async () => (await get(w.ns, URL)) === 'v1', 3000, 'the redirect back');
      } finally {
        await killed(watch);
      }

      // agent: the line HAProxy reads, printed once and served over TCP
      const once = await pf(w, ['agent', 'web', '--once']);
      assert.is(once.code, 0, show(once));
      assert.is(once.stdout, 'up 100%\n');
      const agent = noNodeSpawn(w, built, files, [
        'agent',
        'web',
        '--port',
        String(agentPort),
        '--address',
        '127.0.0.1',
      ]);
      const served = follow(agent);
      try {
        const read =
          `require('node:net').connect(${agentPort}, '127.0.0.1')` + '.on("data", (d) => process.stdout.write(d))';
        let line = '';
        await waitFor(
          async () => {
            if (agent.exitCode !== null) throw new Error(`agent exited: ${served.output()}`);
            line = (await w.ns.exec(process.execPath, ['-e', read], { timeoutMs: 5000 })).stdout;
            return line !== '';
          },
          10_000,
          'the agent to answer',
        );
        assert.is(line, 'up 100%\n');
      } finally {
        await killed(agent);
      }

      // canary: half the new connections, then promote; another, then abort
      const c2 = await pf(w, ['deploy', 'web', '--canary', '50%', ...appArgs('v2')]);
      assert.is(c2.code, 0, show(c2));
      const split = await versions(w, 60);
      assert.ok(split.v1 > 0 && split.v2 > 0, `both sides answer at 50%: ${JSON.stringify(split)}`);
      const p = await pf(w, ['promote', 'web']);
      assert.is(p.code, 0, show(p));
      assert.equal(await versions(w, 20), { v2: 20 });
      const c3 = await pf(w, ['deploy', 'web', '--canary', '50%', '--json', ...appArgs('v3')]);
      assert.is(c3.code, 0, show(c3));
      const canaryPid = events(c3.stdout).find((e) => e.step === 'start')!.pid as number;
      const a = await pf(w, ['abort', 'web']);
      assert.is(a.code, 0, show(a));
      assert.equal(await versions(w, 20), { v2: 20 });
      await waitFor(() => !alive(canaryPid), 15_000, 'the aborted canary to stop');
      const st = JSON.parse((await pf(w, ['status', 'web', '--json'])).stdout).apps[0];
      assert.equal([st.others.length, st.canary, st.rules], [0, undefined, 'ok']);
    });
  } finally {
    rmSync(files.base, { recursive: true, force: true });
  }
});

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

test.run();
