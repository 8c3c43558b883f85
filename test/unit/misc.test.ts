// Durations, event formatting, and the state file and lock on a real (temporary) filesystem.

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { mkdtemp, readdir, readFile, rm, writeFile, mkdir } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { spawn } from 'node:child_process';
import { parseDuration, formatMs } from '../../src/core/duration.js';
import { PortflipError } from '../../src/core/errors.js';
import { formatHuman } from '../../src/core/events.js';
import { ensureDirs, readState, takeLock, writeState, type AppState } from '../../src/core/state.js';
import { realSys } from '../../src/os/sys.js';

test('durations', () => {
  assert.is(parseDuration('500ms', 'x'), 500);
  assert.is(parseDuration('30s', 'x'), 30_000);
  assert.is(parseDuration('2m', 'x'), 120_000);
  assert.is(parseDuration('1m30s', 'x'), 90_000);
  assert.is(parseDuration('1.5s', 'x'), 1500);
  assert.is(parseDuration('10', 'x'), 10_000);
  for (const bad of ['', 'abc', '10 s', '5x', '-1s', 's']) {
    assert.throws(
      () => parseDuration(bad, '--kill-after'),
      (e: unknown) => e instanceof PortflipError && e.kind === 'usage' && /--kill-after/.test(e.message),
      bad,
    );
  }
  assert.is(formatMs(12), '12ms');
  assert.is(formatMs(1500), '1.50s');
});

test('step events render with their duration', () => {
  const line = formatHuman({
    kind: 'step',
    step: 'switch',
    app: 'web',
    status: 'ok',
    port: 8002,
    pid: 42,
    durationMs: 7,
  });
  assert.match(line, /web: ok\s+switch\s+port 8002 pid 42\s+7ms/);
});

const sample = (app: string): AppState => ({
  schema: 1,
  app,
  listen: 80,
  backend: 'nft',
  families: ['ipv4'],
  instances: [],
  updatedAt: '',
  stop: { drain: 'signal', drainTimeoutMs: 1, stopSignal: 'SIGTERM', killAfterMs: 1 },
});

test('the error event keeps the JSON shape the Ansible role parses, and reads as one line for people', () => {
  const err = new PortflipError('lockHeld', 'app "web" is locked by pid 1 (deploy web)');
  const e = { kind: 'error', error: err.kind, exitCode: err.exitCode, message: err.message } as const;
  assert.is(
    JSON.stringify(e),
    '{"kind":"error","error":"lockHeld","exitCode":3,"message":"app \\"web\\" is locked by pid 1 (deploy web)"}',
  );
  assert.is(formatHuman(e), 'portflip: app "web" is locked by pid 1 (deploy web)');
});

test('state files are written whole and read back; no temp files remain', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'pf-unit-'));
  try {
    const p = { stateDir: join(dir, 's'), runDir: join(dir, 'r'), logDir: join(dir, 's', 'logs') };
    await ensureDirs(realSys, p);
    await writeState(realSys, p, sample('web'));
    assert.is((await readState(realSys, p, 'web'))!.listen, 80);
    assert.equal((await readdir(p.stateDir)).sort(), ['logs', 'web.json']);
    assert.is(await readState(realSys, p, 'none'), null);
    await writeFile(join(p.stateDir, 'bad.json'), '{"schema": 99}');
    const err = await readState(realSys, p, 'bad').then(() => null, (e) => e);
    assert.ok(err instanceof PortflipError && err.kind === 'badState', 'a foreign schema is refused');
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('the lock: held by a live process fails naming its pid; a dead holder is taken over', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'pf-unit-'));
  try {
    const p = { stateDir: join(dir, 's'), runDir: join(dir, 'r'), logDir: join(dir, 's', 'logs') };
    await mkdir(p.runDir, { recursive: true });
    const notices: string[] = [];
    const lock = await takeLock(realSys, p, 'web', 'test', (m) => notices.push(m));
    // a second taker (this same live process) is refused
    try {
      await takeLock(realSys, p, 'web', 'test', () => {});
      assert.unreachable('second lock taken');
    } catch (e) {
      assert.instance(e, PortflipError);
      assert.is((e as PortflipError).kind, 'lockHeld');
      assert.match((e as Error).message, new RegExp(`pid ${process.pid}`));
    }
    await lock.release();
    // a lock left by a process that has exited is stale
    const child = spawn('true');
    const pid = await new Promise<number>((res) => child.once('exit', () => res(child.pid!)));
    await writeFile(join(p.runDir, 'web.lock'), JSON.stringify({ pid, startTime: '1', command: 'deploy web' }));
    const again = await takeLock(realSys, p, 'web', 'test', (m) => notices.push(m));
    assert.ok(
      notices.some((n) => n.includes(`pid ${pid}`)),
      notices.join(),
    );
    assert.is(JSON.parse(await readFile(join(p.runDir, 'web.lock'), 'utf8')).pid, process.pid);
    await again.release();
    assert.equal(await readdir(p.runDir), []);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('commands run clean even where bash would source ~/.bashrc (socket stdin, SHLVL unset)', async () => {
  const home = await mkdtemp(join(tmpdir(), 'pf-home-'));
  try {
    await writeFile(join(home, '.bashrc'), 'echo FROM-BASHRC; echo FROM-BASHRC >&2\n');
    const env: NodeJS.ProcessEnv = { ...process.env, HOME: home };
    delete env.SHLVL;
    const r = await realSys.run('cat', [], { input: 'rules\n', env });
    assert.equal(r, { code: 0, stdout: 'rules\n', stderr: '' });
  } finally {
    await rm(home, { recursive: true, force: true });
  }
});

test.run();
