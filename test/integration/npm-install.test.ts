// `npm install -g` of a packed tarball: npm pack runs the prepare step (the build), and the installed portflip
// runs from any directory, says its version and commit, and prints its help. No namespace: nothing here
// touches the network stack; the install reads its dependencies from the npm registry (or npm's cache).

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { execFile } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { repoRoot } from '../helpers/netns.js';

function run(cmd: string, args: string[], opts: { cwd?: string; timeoutMs?: number } = {}) {
  return new Promise<{ code: number; stdout: string; stderr: string }>((resolve) =>
    execFile(
      cmd,
      args,
      { cwd: opts.cwd ?? '/', timeout: opts.timeoutMs ?? 120_000, maxBuffer: 1 << 24 },
      (err, stdout, stderr) =>
        resolve({ code: err ? Number((err as NodeJS.ErrnoException).code) || 1 : 0, stdout, stderr }),
    ),
  );
}

test('npm pack (prepare builds it), npm install -g --prefix: portflip --version and --help work from /', async () => {
  const pkg = JSON.parse(readFileSync(path.join(repoRoot, 'package.json'), 'utf8'));
  assert.is(pkg.scripts.prepare, 'npm run build', 'a git URL install builds through prepare too');
  const tmp = mkdtempSync(path.join(tmpdir(), 'portflip-npm-install-'));
  try {
    const packed = await run('npm', ['pack', '--pack-destination', tmp, '--json', '--no-fund'], { cwd: repoRoot });
    assert.is(packed.code, 0, packed.stderr);
    const [{ filename, files }] = JSON.parse(packed.stdout.slice(packed.stdout.indexOf('[')));
    const names = (files as { path: string }[]).map((f) => f.path);
    for (const f of ['dist/src/main.cjs', 'dist/src/cli.cjs', 'dist/src/holder.js', 'dist/src/node-drain.cjs'])
      assert.ok(names.includes(f), `${f} in the tarball`);
    assert.not.ok(
      names.some((f) => f.endsWith('.cache')),
      'no code cache of a local run in the tarball',
    );
    const prefix = path.join(tmp, 'prefix');
    const inst = await run(
      'npm',
      ['install', '-g', '--prefix', prefix, '--prefer-offline', '--no-audit', '--no-fund', path.join(tmp, filename)],
      { timeoutMs: 180_000 },
    );
    assert.is(inst.code, 0, inst.stderr);
    const bin = path.join(prefix, 'bin', 'portflip');
    assert.ok(existsSync(bin));
    const v = await run(bin, ['--version']);
    assert.is(v.code, 0, v.stderr);
    assert.match(v.stdout, new RegExp(`^${pkg.version.replaceAll('.', '\\.')} \\(commit [0-9a-f]{12}(-dirty)?\\)\\n$`));
    const help = await run(bin, ['--help']);
    assert.is(help.code, 0, help.stderr);
    assert.match(help.stdout, /portflip deploy \[app\]/);
    const koffi = await run(process.execPath, ['-e', "require('koffi').load('libc.so.6')"], {
      cwd: path.join(prefix, 'lib', 'node_modules', 'portflip'),
    });
    assert.is(koffi.code, 0, `koffi loads in the installed package: ${koffi.stderr}`);
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
});

test.run();
