// The real Sys's own logic: reading a log from an offset, commands that cannot start or are killed, which().

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { realSys, which } from '../../src/os/sys.js';

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
  // looked up side by side, the first entry that has it still wins
  const dir = await mkdtemp(join(tmpdir(), 'pf-which-'));
  try {
    for (const d of ['a', 'b']) {
      await mkdir(join(dir, d));
      await writeFile(join(dir, d, 'tool'), '#!/bin/sh\n', { mode: 0o755 });
    }
    await writeFile(join(dir, 'tool'), 'not executable\n', { mode: 0o644 });
    assert.is(await which(realSys, 'tool', `${dir}:${dir}/b:${dir}/a`), join(dir, 'b', 'tool'));
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('readLinesWhile stops at the first line it is not asked for, across chunks and multi-byte characters', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'pf-lines-'));
  try {
    const file = join(dir, 'f');
    // past the 64 KiB chunk, with a two-byte character across the boundary
    const long = 'x'.repeat(65_535) + 'é' + 'y';
    await writeFile(file, ['a', '', long, 'b', 'stop', 'c'].join('\n'));
    assert.equal(await realSys.readLinesWhile(file, (l) => l !== 'stop'), ['a', '', long, 'b']);
    assert.equal(
      await realSys.readLinesWhile(file, () => true),
      ['a', '', long, 'b', 'stop', 'c'],
      'the last line has no newline',
    );
    await writeFile(file, 'one\ntwo\n');
    assert.equal(
      await realSys.readLinesWhile(file, () => true),
      ['one', 'two'],
      'the newline that ends the file starts no line',
    );
    assert.equal(await realSys.readLinesWhile(file, (_, i) => i < 1), ['one']);
    await writeFile(file, '');
    assert.equal(await realSys.readLinesWhile(file, () => true), []);
    assert.is(await realSys.readLinesWhile(join(dir, 'missing'), () => true), null);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test.run();
