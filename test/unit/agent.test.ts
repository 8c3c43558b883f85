// The agent's answers to HAProxy: the pure answer logic, the flag file rules, and --set / --once on a temp state dir.

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawnSync } from 'node:child_process';
import { mkdtemp, readFile, rm, utimes, writeFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { READY_FOR_MS, agentAnswer, canaryWeightOf, modeFromFlag, readView, setMode, type AgentView } from '../../src/commands/agent.js';
import { PortflipError } from '../../src/core/errors.js';
import { paths, writeState, type AppState } from '../../src/core/state.js';
import { realSys } from '../../src/os/sys.js';
import { repoRoot } from '../helpers/netns.js';

const view = (v: Partial<AgentView>): AgentView => ({ app: 'web', mode: null, known: true, alive: true, ...v });

test('answers: up with a weight when alive, down with a reason otherwise; admin words only when set', () => {
  assert.is(agentAnswer(view({})), 'up 100%');
  assert.is(agentAnswer(view({ alive: false })), 'down #no live active instance of web');
  assert.is(agentAnswer(view({ known: false, alive: false })), 'down #no portflip app web on this host');
  assert.is(agentAnswer(view({ mode: 'ready' })), 'ready up 100%');
  assert.is(agentAnswer(view({ mode: 'ready', alive: false })), 'ready down #no live active instance of web');
  assert.is(agentAnswer(view({ mode: 'drain' })), 'drain up');
  assert.is(agentAnswer(view({ mode: 'drain', alive: false })), 'drain down #no live active instance of web');
  assert.is(agentAnswer(view({ mode: 'maint' })), 'maint');
  assert.is(agentAnswer(view({ mode: 'maint', alive: false, known: false })), 'maint');
});

test('a canary weight is said as a percentage, clamped; a drain keeps the weight as it is', () => {
  assert.is(agentAnswer(view({ canaryWeight: 10 })), 'up 10%');
  assert.is(agentAnswer(view({ canaryWeight: 12.6 })), 'up 13%');
  assert.is(agentAnswer(view({ canaryWeight: 250 })), 'up 100%');
  assert.is(agentAnswer(view({ canaryWeight: -5 })), 'up 0%');
  assert.is(agentAnswer(view({ canaryWeight: 10, mode: 'drain' })), 'drain up');
  assert.is(canaryWeightOf(null), undefined);
  assert.is(canaryWeightOf({ canary: { weight: 25 } } as unknown as AppState), 25);
  assert.is(canaryWeightOf({ canary: { weight: 'x' } } as unknown as AppState), undefined);
});

test('flag file: drain and maint hold until changed, ready only for a while, anything else is no flag', () => {
  assert.is(modeFromFlag('drain\n', 10 * READY_FOR_MS), 'drain');
  assert.is(modeFromFlag('maint', 0), 'maint');
  assert.is(modeFromFlag('ready\n', 1000), 'ready');
  assert.is(modeFromFlag('ready\n', READY_FOR_MS + 1), null);
  assert.is(modeFromFlag('bogus', 0), null);
  assert.is(modeFromFlag(null, 0), null);
});

test('--set writes and clears the flag file, refuses bad input; readView sees the flag, the state and liveness', async () => {
  const dir = await mkdtemp(path.join(tmpdir(), 'portflip-agent-'));
  try {
    const p = paths({ PORTFLIP_STATE_DIR: dir, PORTFLIP_RUN_DIR: path.join(dir, 'run') });
    assert.equal(await readView(realSys, p, 'web'), {
      app: 'web',
      mode: null,
      known: false,
      alive: false,
      canaryWeight: undefined,
    });
    const file = await setMode(realSys, p, 'web', 'drain');
    assert.is(await readFile(file, 'utf8'), 'drain\n');
    const st: AppState = {
      schema: 1,
      app: 'web',
      listen: 80,
      backend: 'nft',
      families: ['ipv4'],
      updatedAt: '',
      stop: { drain: 'signal', drainTimeoutMs: 1, stopSignal: 'SIGTERM', killAfterMs: 1 },
      instances: [
        { port: 8001, pid: process.pid, startTime: null, state: 'active', startedAt: '', command: [], log: '' },
      ],
    };
    await writeState(realSys, p, st);
    assert.is(agentAnswer(await readView(realSys, p, 'web')), 'drain up');
    st.instances[0].pid = 2 ** 22 + 1; // above pid_max's ceiling: never a live process
    await writeState(realSys, p, st);
    assert.is(agentAnswer(await readView(realSys, p, 'web')), 'drain down #no live active instance of web');

    await setMode(realSys, p, 'web', 'ready');
    const old = new Date(Date.now() - READY_FOR_MS - 5000);
    await utimes(file, old, old);
    assert.is((await readView(realSys, p, 'web')).mode, null, 'an old ready is no longer said');
    await setMode(realSys, p, 'web', 'clear');
    assert.not.ok(existsSync(file));
    await setMode(realSys, p, 'web', 'clear'); // clearing twice is fine

    const bad = async (fn: () => Promise<unknown>, kind: string, re: RegExp) => {
      try {
        await fn();
        assert.unreachable('should have thrown');
      } catch (err) {
        assert.instance(err, PortflipError);
        assert.is((err as PortflipError).kind, kind);
        assert.match((err as Error).message, re);
      }
    };
    await bad(() => setMode(realSys, p, 'web', 'up'), 'usage', /--set up: use one of ready, drain, maint, clear/);
    await bad(() => setMode(realSys, p, 'Web!', 'drain'), 'usage', /app name "Web!"/);
    await bad(
      () => setMode(realSys, paths({ PORTFLIP_STATE_DIR: path.join(dir, 'nope') }), 'web', 'drain'),
      'config',
      /does not exist/,
    );
    await writeFile(path.join(dir, 'web.agent'), 'maint\n');
    assert.is(agentAnswer(await readView(realSys, p, 'web')), 'maint');
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('the CLI: --once prints the answer, --set reports the file, a bad mode exits 2 and changes nothing', async () => {
  const dir = await mkdtemp(path.join(tmpdir(), 'portflip-agent-'));
  try {
    const main = path.join(repoRoot, 'dist', 'src', 'main.cjs');
    const env = { ...process.env, PORTFLIP_STATE_DIR: dir, PORTFLIP_RUN_DIR: path.join(dir, 'run') };
    const run = (...args: string[]) => spawnSync(process.execPath, [main, 'agent', ...args], { env, encoding: 'utf8' });
    const once = run('web', '--once');
    assert.is(once.status, 0, once.stderr);
    assert.is(once.stdout, 'down #no portflip app web on this host\n');
    const set = run('web', '--set', 'maint');
    assert.is(set.status, 0, set.stderr);
    assert.match(set.stderr, /web: agent mode maint/);
    assert.is(run('web', '--once').stdout, 'maint\n');
    const bad = run('web', '--set', 'sideways');
    assert.is(bad.status, 2);
    assert.match(bad.stderr, /--set sideways: use one of/);
    assert.is(run('web', '--once').stdout, 'maint\n');
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test.run();
