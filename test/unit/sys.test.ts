// The real Sys's own logic: reading a log from an offset, commands that cannot start or are killed, which().

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { realSys, which } from '../../src/sys.js';

test('readFrom reads on from an offset, and from the start again once the file got shorter', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'pf-sys-'));
  try {
    const log = join(dir, 'app.log');
    await writeFile(log, 'one\ntwo\n');
    assert.equal(await realSys.fs.readFrom(log, 4), { size: 8, text: 'two\n' });
    assert.equal(await realSys.fs.readFrom(log, 8), { size: 8, text: '' });
    await writeFile(log, 'new\n'); // a new instance on the same port truncated it
    assert.equal(await realSys.fs.readFrom(log, 8), { size: 4, text: 'new\n' });
    await realSys.fs.writeAtomic(join(dir, 's.json'), '{}\n', 0o600);
    assert.is(await realSys.fs.read(join(dir, 's.json')), '{}\n');
    assert.equal((await realSys.fs.readdir(dir)).sort(), ['app.log', 's.json'], 'no temp file is left');
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('run: a command that cannot start says so; a timeout ends it with a signal; ignored output still ends', async () => {
  const missing = await realSys.run('/nonexistent/portflip-test-cmd', []);
  assert.is(missing.code, 127);
  assert.match(missing.error ?? '', /ENOENT/);
  const slow = await realSys.run('sleep', ['5'], { timeoutMs: 100, output: 'ignore' });
  assert.is(slow.signal, 'SIGTERM');
  assert.is.not(slow.code, 0);
  const ok = await realSys.run('sh', ['-c', 'exit 3'], { output: 'ignore' });
  assert.equal([ok.code, ok.signal ?? null], [3, null]);
});

test('which finds an executable in PATH through Sys.fs, and nothing where there is none', async () => {
  assert.match((await which(realSys, 'sh', '/nonexistent:/bin:/usr/bin')) ?? '', /\/sh$/);
  assert.is(await which(realSys, 'portflip-no-such-tool', '/bin:/usr/bin'), null);
});

test.run();
