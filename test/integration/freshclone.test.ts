// The README's "Try it" commands, run exactly as written in a fresh `git clone` of this repo in a clean temp dir.

import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { repoRoot } from '../helpers/netns.js';
import { testUnless } from '../helpers/skip.js';

// The inner `npm test` runs with this set, so it runs the unit tests only and never this file again.
const INNER = { PORTFLIP_TEST_ONLY: 'unit' };
const isRoot = process.getuid?.() === 0;

/** The commands of the README's "Try it" section, comments dropped. */
function tryItCommands(readme: string): string[] {
  const section = readme.split(/^## /m).find((s) => s.startsWith('Try it'));
  assert.ok(section, 'README has a "## Try it" section');
  const block = section!.match(/```\w*\n([\s\S]*?)```/);
  assert.ok(block, '"Try it" has a code block');
  return block![1]
    .split('\n')
    .map((l) => l.replace(/\s+#.*$/, '').trim())
    .filter(Boolean);
}

interface Run {
  code: number;
  out: string;
  ms: number;
}

// Runs one command line in its own process group, output kept (and echoed on failure), killed by group at the deadline.
function run(line: string, cwd: string, timeoutMs: number): Promise<Run> {
  const t0 = performance.now();
  return new Promise((resolve) => {
    const child = spawn('bash', ['-c', line], {
      cwd,
      env: { ...process.env, ...INNER, npm_config_prefer_offline: 'true', npm_config_update_notifier: 'false' },
      stdio: ['ignore', 'pipe', 'pipe'],
      detached: true,
    });
    let out = '';
    child.stdout!.on('data', (d) => (out += d));
    child.stderr!.on('data', (d) => (out += d));
    const timer = setTimeout(() => {
      out += `\n[killed after ${timeoutMs} ms]\n`;
      try {
        process.kill(-child.pid!, 'SIGTERM');
        setTimeout(() => {
          try {
            process.kill(-child.pid!, 'SIGKILL');
          } catch {}
        }, 5000).unref();
      } catch {}
    }, timeoutMs);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code: code ?? 128 + (signal ? 15 : 0), out, ms: performance.now() - t0 });
    });
  });
}

const whyNot =
  (process.env.PORTFLIP_TEST_ONLY && 'already inside a fresh-clone test run') ||
  (!isRoot &&
    spawnSync('sudo', ['-n', 'true']).status !== 0 &&
    '`sudo npm run demo` needs root, and sudo here asks for a password');

testUnless(whyNot, "the README's two commands work from a fresh clone: the demo, then the tests", async () => {
  const dirty = spawnSync('git', ['-C', repoRoot, 'status', '--porcelain'], { encoding: 'utf8' }).stdout.trim();
  if (dirty)
    console.log(
      `  note: the clone sees only committed files; uncommitted here:\n${dirty
        .split('\n')
        .map((l) => `    ${l}`)
        .join('\n')}`,
    );

  const commands = tryItCommands(readFileSync(path.join(repoRoot, 'README.md'), 'utf8'));
  assert.equal(
    commands.map((c) => c.replace(/^sudo /, '')),
    ['npm run demo', 'npm test'],
    `Try it: ${commands.join(' | ')}`,
  );

  const tmp = mkdtempSync(path.join(tmpdir(), 'portflip-clone-'));
  try {
    const dir = path.join(tmp, 'portflip');
    const clone = spawnSync('git', ['clone', '--quiet', repoRoot, dir], { encoding: 'utf8', timeout: 60_000 });
    assert.is(clone.status, 0, `git clone: ${clone.stderr}`);

    const [demoLine, testLine] = commands;
    // Root needs no sudo, as the README says; elsewhere only a sudo that asks no password can run here.
    const asHere = (line: string) => (isRoot ? line.replace(/^sudo /, '') : line.replace(/^sudo /, 'sudo -n '));

    const demo = await run(asHere(demoLine), dir, 180_000);
    console.log(`  ${demoLine}: exit ${demo.code} in ${(demo.ms / 1000).toFixed(1)} s`);
    assert.is(demo.code, 0, `${demoLine}:\n${demo.out}`);
    assert.match(demo.out, /^total\s+\d+\s+0\s*$/m, `the demo's table says 0 failed:\n${demo.out}`);
    assert.match(demo.out, /v1 -> v2 -> v3/, 'the demo saw v1, v2 and v3 in order');
    assert.match(demo.out, /\d+ requests, 0 failed/);

    const tests = await run(asHere(testLine), dir, 180_000);
    console.log(
      `  ${testLine} (unit tests only, PORTFLIP_TEST_ONLY=unit): exit ${tests.code} in ${(tests.ms / 1000).toFixed(1)} s`,
    );
    assert.is(tests.code, 0, `${testLine}:\n${tests.out}`);
    const tally = [...tests.out.matchAll(/^(\d+) passed, (\d+) failed/gm)].at(-1);
    assert.ok(tally, `a tally line:\n${tests.out}`);
    assert.ok(Number(tally![1]) > 0, `some tests ran: ${tally![0]}`);
    assert.is(Number(tally![2]), 0, tally![0]);
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
});

test.run();
