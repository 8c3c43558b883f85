// The CLI's code cache (src/load-cli.ts): written after a command that succeeded, used while it
// matches the bundle, replaced when it does not, and never left by a run that failed.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawnSync } from 'node:child_process';
import {
  copyFileSync,
  existsSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  statSync,
  utimesSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const dist = fileURLToPath(new URL('../../src/', import.meta.url));

/** A copy of the built CLI in a directory of its own, so its caches are the test's alone. */
function install(): string {
  const dir = mkdtempSync(join(tmpdir(), 'pf-loadcli-'));
  for (const f of ['main.cjs', 'main.js', 'load-cli.cjs', 'cli.cjs', 'node-drain.cjs'])
    copyFileSync(join(dist, f), join(dir, f));
  writeFileSync(join(dir, 'package.json'), '{"type":"module"}');
  return dir;
}

const run = (dir: string, args: string[], entry = 'main.cjs') => {
  const env = { ...process.env, PORTFLIP_STATE_DIR: join(dir, 'state'), PORTFLIP_RUN_DIR: join(dir, 'run') };
  return spawnSync(process.execPath, [join(dir, entry), ...args], { env, encoding: 'utf8', timeout: 30_000 });
};

test('a command that succeeds leaves its cache; --version and a failed command leave none', () => {
  if (!existsSync(join(dist, 'cli.cjs'))) return assert.unreachable('dist/src/cli.cjs is missing: run npm run build');
  const dir = install();
  try {
    assert.is(run(dir, ['--version']).status, 0);
    assert.is(run(dir, ['deploy', 'web', '--listen', '0', '--', 'true']).status, 2, 'bad input: usage error');
    assert.not.ok(existsSync(join(dir, 'cli.cjs.deploy.cache')), 'a failed run wrote a cache');
    assert.not.ok(existsSync(join(dir, 'cli.cjs.other.cache')), '--version wrote a cache');
    const r = run(dir, ['systemd', 'web']);
    assert.is(r.status, 0, r.stderr);
    const cache = join(dir, 'cli.cjs.systemd.cache');
    const head = readFileSync(cache, 'latin1').split('\n')[0];
    assert.match(
      head,
      new RegExp(`^portflip-cache ${statSync(join(dir, 'cli.cjs')).size} [\\d.]+ ${process.version} `),
    );
    assert.ok(statSync(cache).size > 10_000, 'the cache holds compiled code');
    // main.js, the entry earlier versions' systemd units and links name, runs the same CLI
    assert.is(run(dir, ['systemd', 'web'], 'main.js').stdout.replaceAll('/main.js', '/main.cjs'), r.stdout);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a cache that matches is used as it is; a damaged one or one from another bundle is replaced', () => {
  const dir = install();
  try {
    const cache = join(dir, 'cli.cjs.systemd.cache');
    const out = run(dir, ['systemd', 'web']).stdout;
    const first = readFileSync(cache);
    // used, not rewritten: a marker in a copy it would overwrite stays
    utimesSync(cache, 1, 1);
    assert.is(run(dir, ['systemd', 'web']).stdout, out);
    assert.is(statSync(cache).mtimeMs, 1000, 'a matching cache was written again');
    // the same stamp over bytes V8 rejects: the command still works and the cache is made again
    const stamp = first.subarray(0, first.indexOf(10) + 1);
    writeFileSync(cache, Buffer.concat([stamp, Buffer.alloc(first.length - stamp.length, 7)]));
    assert.is(run(dir, ['systemd', 'web']).stdout, out);
    assert.equal(readFileSync(cache).subarray(0, stamp.length), stamp);
    assert.not.ok(
      readFileSync(cache)
        .subarray(stamp.length)
        .every((b) => b === 7),
      'the damaged cache stayed',
    );
    // a rebuilt bundle (another time on it): the old cache is not trusted, whatever V8 would say
    utimesSync(join(dir, 'cli.cjs'), new Date(), new Date(Date.now() + 5000));
    assert.is(run(dir, ['systemd', 'web']).stdout, out);
    assert.not.equal(readFileSync(cache).subarray(0, stamp.length), stamp, 'the stamp names the new bundle');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test.run();
