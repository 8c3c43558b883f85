// Bad input and a bad environment: one clear line, its own exit code, and nothing changed.

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { execFileSync } from 'node:child_process';
import { freePorts, startApp, fixture, repoRoot } from '../helpers/netns.js';
import { inWorld, app, show, type World } from '../helpers/world.js';

/** Where a refused command would put portflip.prom if it published metrics (it must not). */
const textfileDir = (w: World) => join(dirname(w.dirs.stateDir), 'textfile');

/**
 * Every file under the state and run dirs (state, lock, log, history, metrics counters) and in the textfile
 * directory: a refused command must leave none.
 */
const leftovers = (w: World) =>
  [w.dirs.stateDir, w.dirs.runDir, textfileDir(w)]
    .flatMap((d) => (existsSync(d) ? readdirSync(d, { recursive: true }).map(String) : []))
    .filter((f) => f !== 'logs');

async function refused(
  w: World,
  args: string[],
  code: number,
  message: RegExp,
  wrap: string[] = [],
  env?: NodeJS.ProcessEnv,
) {
  const before = await w.save();
  mkdirSync(textfileDir(w), { recursive: true });
  const textfile = { PORTFLIP_TEXTFILE_DIR: textfileDir(w) };
  const r = wrap.length
    ? await w.ns.exec(
        wrap[0],
        [...wrap.slice(1), process.execPath, join(repoRoot, 'dist', 'src', 'main.cjs'), ...args],
        {
          env: { PORTFLIP_STATE_DIR: w.dirs.stateDir, PORTFLIP_RUN_DIR: w.dirs.runDir, ...textfile, ...env },
        },
      )
    : await w.pf(args, { ...textfile, ...env });
  assert.is(r.code, code, `${args.join(' ')}\n${show(r)}`);
  const lines = r.stderr.trim().split('\n');
  assert.is(lines.length, 1, `one line: ${r.stderr}`);
  assert.match(lines[0], message);
  assert.is(r.stdout, '');
  assert.is(await w.save(), before, 'no rule changed');
  assert.equal(leftovers(w), [], 'no state, lock, log, history, counters or textfile');
}

test('bad input: each error has its own exit code and message, and changes nothing', async () => {
  await inWorld(async (w) => {
    const [a, b] = await freePorts(2);
    const deploy = (extra: string[], cmd = app('--version', 'v1')) => [
      'deploy',
      'web',
      '--listen',
      '80',
      '--ports',
      `${a},${b}`,
      ...extra,
      ...cmd,
    ];
    await refused(
      w,
      ['deploy', 'web', '--listen', '70000', ...app()],
      2,
      /--listen 70000: a port is a whole number from 1 to 65535/,
    );
    await refused(
      w,
      ['deploy', 'web', '--listen', '80', '--ports', `80,${b}`, ...app()],
      2,
      /instance ports must differ from --listen/,
    );
    await refused(
      w,
      ['deploy', 'web', '--listen', '80', '--ports', `${a}`, '--keep-old', '5s', ...app()],
      2,
      /is an in-place restart/,
    );
    await refused(w, deploy(['--ready-timeout', '5x']), 2, /--ready-timeout: "5x" is not a duration/);
    await refused(w, deploy(['--kill-after', 'soon']), 2, /--kill-after: "soon" is not a duration/);
    await refused(w, deploy(['--drain', 'later']), 2, /--drain later: use auto, signal or idle/);
    await refused(w, deploy(['--bogus']), 2, /Unknown argument: bogus/);
    await refused(w, ['deploy', 'web', '--listen', '80'], 2, /no command/);
    for (const name of ['Web', 'a'.repeat(26), 'we b', 'a/b', 'ü']) {
      await refused(w, ['deploy', name, '--listen', '80', ...app()], 2, /cannot name an iptables chain/);
    }
    await refused(w, deploy([], ['--', 'no-such-command-xyz']), 7, /command not found: "no-such-command-xyz"/);
    await refused(w, deploy([], ['--', './missing.sh']), 7, /command not found/);
    await refused(w, deploy(['--user', 'no-such-user-xyz']), 8, /--user no-such-user-xyz: no such user/);
    await refused(w, deploy(['--cwd', '/no/such/dir']), 8, /--cwd \/no\/such\/dir: no such directory/);
    await refused(w, ['rollback', 'web'], 9, /no app named "web"/);
    await refused(w, ['stop', 'web'], 9, /no app named "web"/);
    // the OS refuses: a state dir that cannot be made is one line and exit 11, not a stack trace
    await refused(
      w,
      deploy([]),
      11,
      /^portflip: mkdir \/dev\/null\/state: a part of the path is not a directory \(ENOTDIR\)$/,
      ['env', 'PORTFLIP_STATE_DIR=/dev/null/state'],
    );
  });
});

test('instance ports in use by another process: exit 6, nothing started', async () => {
  await inWorld(async (w) => {
    const [a, b] = await freePorts(2);
    const squatters = [
      await startApp(w.ns, a, ['--version', 'other']),
      await startApp(w.ns, b, ['--version', 'other']),
    ];
    try {
      await refused(
        w,
        ['deploy', 'web', '--listen', '80', '--ports', `${a},${b}`, ...app()],
        6,
        /every port is in use/,
      );
      await squatters[1].stop();
      // one free port is enough: the deploy uses it
      const r = await w.pf(['deploy', 'web', '--listen', '80', '--ports', `${a},${b}`, ...app()]);
      assert.is(r.code, 0, show(r));
    } finally {
      await Promise.all(squatters.map((s) => s.stop()));
    }
  });
});

test('not root (no CAP_NET_ADMIN): exit 4; no iptables: exit 5', async () => {
  await inWorld(async (w) => {
    const [a, b] = await freePorts(2);
    const head = ['deploy', 'web', '--listen', '80', '--ports', `${a},${b}`];
    const args = [...head, ...app()];
    await refused(w, args, 4, /needs root \(or CAP_NET_ADMIN\); run it with sudo/, [
      'setpriv',
      '--bounding-set=-all',
      '--inh-caps=-all',
      '--',
    ]);
    // a PATH with everything but iptables
    const bin = mkdtempSync(join(tmpdir(), 'pf-noipt-'));
    try {
      for (const tool of ['sh', 'bash', 'getent', 'cat', 'env']) {
        const real = execFileSync('sh', ['-c', `command -v ${tool}`])
          .toString()
          .trim();
        symlinkSync(real, join(bin, tool));
      }
      symlinkSync(process.execPath, join(bin, 'node'));
      await refused(
        w,
        [...head, '--', 'node', fixture('app.mjs'), '--port', '{port}'],
        5,
        /iptables is not installed; install it/,
        ['env', `PATH=${bin}`],
      );
    } finally {
      rmSync(bin, { recursive: true, force: true });
    }
  });
});

test('refused on an app that exists: its history, counters and textfile stay as they were', async () => {
  await inWorld(async (w) => {
    const [a, b] = await freePorts(2);
    const env = { PORTFLIP_TEXTFILE_DIR: textfileDir(w) };
    mkdirSync(textfileDir(w));
    const head = ['deploy', 'web', '--listen', '80', '--ports', `${a},${b}`];
    const d = await w.pf([...head, ...app()], env);
    assert.is(d.code, 0, show(d));
    const files = [
      join(w.dirs.stateDir, 'history', 'web.jsonl'),
      join(w.dirs.stateDir, 'metrics', 'counters.json'),
      join(textfileDir(w), 'portflip.prom'),
    ];
    const snapshot = () => files.map((f) => (existsSync(f) ? readFileSync(f, 'utf8') : `${f} missing`));
    const was = snapshot();
    const main = join(repoRoot, 'dist', 'src', 'main.cjs');
    const dirs = { PORTFLIP_STATE_DIR: w.dirs.stateDir, PORTFLIP_RUN_DIR: w.dirs.runDir, ...env };
    for (const [args, code, wrap] of [
      [[...head, '--bogus', ...app()], 2, []],
      [[...head, '--ready-timeout', '5x', ...app()], 2, []],
      [['pause', 'web', '--timeout', 'soon'], 2, []],
      [['rollback', 'web', '--bogus'], 2, []],
      [[...head, ...app()], 4, ['setpriv', '--bounding-set=-all', '--inh-caps=-all', '--']],
      [['pause', 'web'], 4, ['setpriv', '--bounding-set=-all', '--inh-caps=-all', '--']],
    ] as const) {
      const r = wrap.length
        ? await w.ns.exec(wrap[0], [...wrap.slice(1), process.execPath, main, ...args], { env: dirs })
        : await w.pf([...args], env);
      assert.is(r.code, code, `${args.join(' ')}\n${show(r)}`);
      const changed = files.filter((f, i) => snapshot()[i] !== was[i]);
      assert.equal(changed, [], `${args.join(' ')}: no record, no count, no textfile write`);
    }
  });
});

test.run();
