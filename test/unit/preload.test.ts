// The Node drain preload's plumbing: NODE_OPTIONS composition, readability for --user, and the world-readable copy.

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { chmod, mkdtemp, mkdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { placePreload, preloadEnv, readableBy, withPreload, PRELOAD_SOURCE } from '../../src/drain/preload.js';
import { realSys } from '../../src/os/sys.js';
import { toDeployOptions } from '../../src/cli/options.js';

test("NODE_OPTIONS: the preload is appended to the user's own options, once, quoted when needed", () => {
  assert.is(withPreload(undefined, '/opt/pf/node-drain.cjs'), '--require /opt/pf/node-drain.cjs');
  assert.is(
    withPreload(' --max-old-space-size=512 ', '/opt/pf/node-drain.cjs'),
    '--max-old-space-size=512 --require /opt/pf/node-drain.cjs',
  );
  assert.is(
    withPreload('--require /opt/pf/node-drain.cjs', '/opt/pf/node-drain.cjs'),
    '--require /opt/pf/node-drain.cjs',
  );
  assert.is(withPreload('', '/my dir/a"b.cjs'), '--require "/my dir/a\\"b.cjs"');
  const env = preloadEnv({ NODE_OPTIONS: '--trace-warnings' }, '/x.cjs', 10_000);
  assert.equal(env, { NODE_OPTIONS: '--trace-warnings --require /x.cjs', PORTFLIP_NODE_DRAIN_MAX_IDLE_MS: '8000' });
  assert.is(preloadEnv({}, '/x.cjs', 1000).PORTFLIP_NODE_DRAIN_MAX_IDLE_MS, '1000');
});

test('the built preload exists next to the CLI', async () => {
  assert.ok((await stat(PRELOAD_SOURCE)).isFile(), PRELOAD_SOURCE);
  assert.match(PRELOAD_SOURCE, /dist\/src\/node-drain\.cjs$/);
});

test('readableBy follows every directory on the way; a file in a 0700 dir is copied to a 0755 place by content', async () => {
  const base = await mkdtemp(join(tmpdir(), 'portflip-preload-'));
  try {
    await chmod(base, 0o755);
    const open = join(base, 'open');
    const closed = join(base, 'closed');
    await mkdir(open, { mode: 0o755 });
    await mkdir(closed, { mode: 0o700 });
    await chmod(open, 0o755);
    for (const d of [open, closed]) await writeFile(join(d, 'node-drain.cjs'), '// preload\n', { mode: 0o644 });
    await chmod(join(open, 'node-drain.cjs'), 0o644);
    const nobody = { name: 'nobody', uid: 65534, gid: 65534 };
    assert.ok(await readableBy(realSys, join(open, 'node-drain.cjs'), nobody.uid, nobody.gid));
    assert.not.ok(await readableBy(realSys, join(closed, 'node-drain.cjs'), nobody.uid, nobody.gid));
    assert.ok(await readableBy(realSys, join(closed, 'node-drain.cjs'), 0, 0), 'root reads everything');

    const env = { PORTFLIP_PRELOAD_DIR: join(base, 'copies') };
    assert.equal(await placePreload(realSys, env, nobody, join(open, 'node-drain.cjs')), {
      path: join(open, 'node-drain.cjs'),
      copied: false,
    });
    const placed = await placePreload(realSys, env, nobody, join(closed, 'node-drain.cjs'));
    assert.ok(placed.path && 'copied' in placed && placed.copied, JSON.stringify(placed));
    assert.match(placed.path!, /copies\/node-drain-[0-9a-f]{12}\.cjs$/);
    assert.is(await readFile(placed.path!, 'utf8'), '// preload\n');
    assert.is((await stat(join(base, 'copies'))).mode & 0o777, 0o755);
    assert.is((await stat(placed.path!)).mode & 0o777, 0o644);
    assert.equal(
      await placePreload(realSys, env, nobody, join(closed, 'node-drain.cjs')),
      placed,
      'the same content lands on the same file',
    );
  } finally {
    await rm(base, { recursive: true, force: true });
  }
});

test('--node-drain: on by default, off by flag or config key; anything else is a usage error', () => {
  const flags = { app: 'web', listen: '80', '--': ['node', 'app.js'] };
  assert.is(toDeployOptions(flags, {}, null).nodeDrain, true);
  assert.is(toDeployOptions({ ...flags, nodeDrain: 'off' }, {}, null).nodeDrain, false);
  assert.is(toDeployOptions(flags, { node_drain: 'off' }, '/etc/portflip/web.toml').nodeDrain, false);
  assert.is(
    toDeployOptions({ ...flags, nodeDrain: 'on' }, { node_drain: 'off' }, '/etc/portflip/web.toml').nodeDrain,
    true,
  );
  assert.throws(() => toDeployOptions({ ...flags, nodeDrain: 'yes' }, {}, null), /--node-drain yes: use on or off/);
});

test('--drain: auto by default; an unknown mode names the three', () => {
  const flags = { app: 'web', listen: '80', '--': ['node', 'app.js'] };
  assert.is(toDeployOptions(flags, {}, null).stop.drain, 'auto');
  assert.is(toDeployOptions(flags, { drain: 'signal' }, '/etc/portflip/web.toml').stop.drain, 'signal');
  assert.throws(
    () => toDeployOptions({ ...flags, drain: 'later' }, {}, null),
    /--drain later: use auto, signal or idle/,
  );
});

test.run();
