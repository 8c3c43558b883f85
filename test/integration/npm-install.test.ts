// `npm install -g` of a packed tarball: npm pack runs the prepare step (the build), and the installed portflip
// runs from any directory, says its version and commit, and prints its help. No namespace: nothing here
// touches the network stack; the install reads its dependencies from the npm registry (or npm's cache).
// And from a git URL (a bare clone of this checkout's HEAD): npm pack of the URL (the prepare step builds it in
// npm's clone), then npm install -g of that tarball, and the installed portflip deploys in a network namespace.
// Not `npm install -g git+URL` in one go: npm 10 and 11 give the clone's own install the -g setting (npm/cli#8440),
// so it installs the clone globally instead of its devDependencies, and does so again while the real install
// writes the same folder (ENOTEMPTY, ENOENT): docs/install.md says so.

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { execFile } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fixture, freePorts, repoRoot } from '../helpers/netns.js';
import { inWorld, get, show } from '../helpers/world.js';

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

test('npm pack of the built tree, npm install -g --prefix: portflip --version and --help work from /', async () => {
  const pkg = JSON.parse(readFileSync(path.join(repoRoot, 'package.json'), 'utf8'));
  assert.is(pkg.scripts.prepare, 'npm run build', 'a git URL install builds through prepare too');
  const tmp = mkdtempSync(path.join(tmpdir(), 'portflip-npm-install-'));
  try {
    // --ignore-scripts: prepare would rebuild dist/ under the tests that run beside this one (scripts/test.mjs's
    // lanes); npm test built it already, and the git URL test below runs prepare in a clone of its own
    const packed = await run('npm', ['pack', '--ignore-scripts', '--pack-destination', tmp, '--json', '--no-fund'], {
      cwd: repoRoot,
    });
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

test('a git+file:// URL of HEAD: npm pack builds it through prepare, npm install -g of that; it deploys', async () => {
  const tmp = mkdtempSync(path.join(tmpdir(), 'portflip-npm-git-'));
  try {
    const head = (await run('git', ['-C', repoRoot, 'rev-parse', '--short=12', 'HEAD'])).stdout.trim();
    const repo = path.join(tmp, 'portflip.git');
    const clone = await run('git', ['clone', '--quiet', '--bare', '--no-hardlinks', repoRoot, repo]);
    assert.is(clone.code, 0, clone.stderr);
    const started = Date.now();
    const packed = await run(
      'npm',
      ['pack', '--json', '--prefer-offline', '--pack-destination', tmp, `git+file://${repo}`],
      { timeoutMs: 180_000 },
    );
    assert.is(packed.code, 0, packed.stderr);
    const [{ filename }] = JSON.parse(packed.stdout.slice(packed.stdout.indexOf('[')));
    const prefix = path.join(tmp, 'prefix');
    const inst = await run(
      'npm',
      ['install', '-g', '--prefix', prefix, '--prefer-offline', '--no-audit', '--no-fund', path.join(tmp, filename)],
      { timeoutMs: 120_000 },
    );
    assert.is(inst.code, 0, inst.stderr);
    console.log(`  npm pack of the git URL and npm install -g: ${((Date.now() - started) / 1000).toFixed(1)} s`);
    const bin = path.join(prefix, 'bin', 'portflip');
    const v = await run(bin, ['--version']);
    assert.is(v.code, 0, v.stderr);
    const { version } = JSON.parse(readFileSync(path.join(repoRoot, 'package.json'), 'utf8'));
    assert.is(v.stdout, `${version} (commit ${head})\n`, 'built from the clone of HEAD');
    await inWorld(async (w) => {
      const ports = await freePorts(2);
      const env = {
        PORTFLIP_STATE_DIR: w.dirs.stateDir,
        PORTFLIP_RUN_DIR: w.dirs.runDir,
        PORTFLIP_PRELOAD_DIR: w.dirs.preloadDir,
      };
      const app = ['--', process.execPath, fixture('plain-app.mjs'), 'v1'];
      const d = await w.ns.exec(bin, ['deploy', 'web', '--listen', '80', '--ports', ports.join(','), ...app], { env });
      assert.is(d.code, 0, show(d));
      assert.is(await get(w.ns, 'http://127.0.0.1:80/'), 'v1');
    });
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
});

test.run();
