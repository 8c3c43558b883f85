// Test runner for `npm test`: runs each built dist/test/**/*.test.js in its own process and sums uvu's summaries.
// Usage: node scripts/test.mjs [substring ...]   (runs only files whose path contains one of the substrings)
// PORTFLIP_TEST_ONLY=a,b filters the same way, on top of argv: the fresh-clone test runs `npm test` with it set to unit.
// Files run in two lanes (SIDE_LANE below); PORTFLIP_TEST_LANES=1 runs them one at a time.
// A test skips through test/helpers/skip.ts, which prints a line this runner counts and lists with why. The last line
// is `N passed, N failed`, or `N passed, N failed, N skipped` when something skipped (.ci/run fails on that).
import { spawn } from 'node:child_process';
import { readdirSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const testDir = path.join(root, 'dist', 'test');
const FILE_TIMEOUT_MS = Number(process.env.PORTFLIP_TEST_FILE_TIMEOUT_MS ?? 240_000);
const KILL_GRACE_MS = 3000; // lets the harness's SIGTERM handler tear down namespaces and apps first

function findTests(dir) {
  let entries;
  try {
    entries = readdirSync(dir, { withFileTypes: true });
  } catch {
    return [];
  }
  return entries.flatMap((e) => {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) return findTests(p);
    return e.isFile() && e.name.endsWith('.test.js') ? [p] : [];
  });
}

// Node reads NODE_EXTRA_CA_CERTS at every start (about 80 ms where it names the system bundle), and the suite starts
// thousands of node processes (portflip, apps, load clients) that talk only to loopback and namespaces. Only npm
// reaches out, to the registry: it gets the same file as its own cafile.
const testEnv = { ...process.env };
if (testEnv.NODE_EXTRA_CA_CERTS) {
  testEnv.npm_config_cafile ??= testEnv.NODE_EXTRA_CA_CERTS;
  delete testEnv.NODE_EXTRA_CA_CERTS;
}
// every portflip a test starts inherits this: no test writes the machine's node_exporter textfile directory
testEnv.PORTFLIP_TEXTFILE_DIR ??= '';

const SKIP_LINE = 'portflip-test-skip '; // test/helpers/skip.ts writes it, then JSON: { name, why }

// uvu prints "Total: N", "Passed: N", "Skipped: N" once per process; colours are stripped first.
function parseSummary(text) {
  const plain = text.replace(/\x1b\[[0-9;]*m/g, '');
  const grab = (label) => [...plain.matchAll(new RegExp(`^\\s*${label}:\\s+(\\d+)`, 'gm'))].reduce((n, m) => n + Number(m[1]), 0);
  const found = /^\s*Total:\s+\d+/m.test(plain);
  const failures = [...plain.matchAll(/^\s*FAIL\s+(?:"(.*)"|(.*))$/gm)].map((m) => m[1] ?? m[2]);
  const skips = plain
    .split('\n')
    .filter((l) => l.startsWith(SKIP_LINE))
    .map((l) => JSON.parse(l.slice(SKIP_LINE.length)));
  return { found, total: grab('Total'), passed: grab('Passed'), skipped: grab('Skipped'), failures, skips };
}

/** Runs one file; its output is kept and printed whole when it ends, so two lanes never interleave lines. */
function runFile(file, { stream }) {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [file], { cwd: root, env: testEnv, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
    let stdout = '';
    let output = '';
    const out = (d, to) => (stream ? to.write(d) : (output += d));
    child.stdout.on('data', (d) => {
      stdout += d;
      out(d, process.stdout);
    });
    child.stderr.on('data', (d) => out(d, process.stderr));
    let timedOut = false;
    const signalGroup = (sig) => {
      try {
        process.kill(-child.pid, sig);
      } catch {}
    };
    const timer = setTimeout(() => {
      timedOut = true;
      out(`\n${path.relative(root, file)}: timed out after ${FILE_TIMEOUT_MS} ms, killing it\n`, process.stderr);
      signalGroup('SIGTERM');
      setTimeout(() => signalGroup('SIGKILL'), KILL_GRACE_MS).unref();
    }, FILE_TIMEOUT_MS);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, timedOut, output, summary: parseSummary(stdout) });
    });
  });
}

const argvFilters = process.argv.slice(2);
const envFilters = (process.env.PORTFLIP_TEST_ONLY ?? '').split(',').map((s) => s.trim()).filter(Boolean);
const filters = [...argvFilters, ...envFilters];
const matches = (list, f) => list.length === 0 || list.some((s) => path.relative(root, f).includes(s));
const files = findTests(testDir)
  .filter((f) => matches(argvFilters, f) && matches(envFilters, f))
  .sort();

const seconds = (ms) => `${(ms / 1000).toFixed(1)} s`;
let passed = 0;
let failed = 0;
let skipped = 0;
const broken = [];
const skips = [];
const startedAll = performance.now();

function tally(rel, r) {
  const s = r.summary;
  let fileFailed = s.total - s.passed;
  // A crash, a timeout or a non-zero exit is a failure even when uvu's own count says otherwise.
  if (r.code !== 0 || r.timedOut || !s.found) {
    fileFailed = Math.max(fileFailed, 1);
    broken.push(`${rel}: ${r.timedOut ? 'timed out' : `exited ${r.signal ?? r.code}`}${s.found ? '' : ', no uvu summary'}`);
  }
  for (const name of s.failures) broken.push(`${rel}: FAIL "${name}"`);
  passed += s.passed;
  failed += fileFailed;
  // uvu's own test.skip has no name to show; ours (skip.ts) come with one and a reason
  skipped += s.skipped + s.skips.length;
  for (const k of s.skips) skips.push(`${rel}: "${k.name}": ${k.why}`);
  if (s.skipped) skips.push(`${rel}: ${s.skipped} test.skip without a reason`);
}

// Two lanes on a machine of two cores: the files that put clients under load and count failed requests run one
// at a time; beside them, the files that run no load and time nothing that a busy core could tip over (unit tests,
// input checks, rule layouts, installs). The fleet files stay in one lane: while a fleet runs its sshds need
// /run/sshd, which the fleet that made it removes when it ends. PORTFLIP_TEST_LANES=1 runs everything in one lane.
const SIDE_LANE = [
  'test/unit/',
  'integration/input.test',
  'integration/status.test',
  'integration/user.test',
  'integration/config.test',
  'integration/rules.test',
  'integration/drain.test',
  'integration/history.test',
  'integration/executable-commands.test',
  'integration/executable-deb.test',
  'integration/executable-arm64.test',
  'integration/npm-install.test',
  'integration/freshclone.test',
];
const lanes = process.env.PORTFLIP_TEST_LANES === '1' ? 1 : 2;
const inSide = (f) => lanes > 1 && SIDE_LANE.some((s) => path.relative(root, f).includes(s));
const stream = lanes === 1;

async function lane(list) {
  for (const file of list) {
    const rel = path.relative(root, file);
    if (stream) process.stdout.write(`\n# ${rel}\n`);
    const started = performance.now();
    const r = await runFile(file, { stream });
    if (!stream) process.stdout.write(`\n# ${rel}\n${r.output}`);
    process.stdout.write(`# ${rel}: ${seconds(performance.now() - started)}\n`);
    tally(rel, r);
  }
}
await Promise.all([lane(files.filter((f) => !inSide(f))), lane(files.filter(inSide))]);

if (files.length === 0) process.stdout.write(`no test files under ${path.relative(root, testDir)}${filters.length ? ` matching ${filters.join(', ')}` : ''}\n`);
if (files.length) process.stdout.write(`\n${files.length} files in ${seconds(performance.now() - startedAll)}\n`);
if (skips.length) process.stdout.write(`\nskipped:\n${skips.map((l) => `  ${l}`).join('\n')}\n`);
// the names of what failed, last, where a CI log shows them without scrolling
if (broken.length) process.stdout.write(`\nfailed:\n${broken.map((l) => `  ${l}`).join('\n')}\n`);
const ran = passed + failed;
process.stdout.write(`${passed} passed, ${failed} failed${skipped ? `, ${skipped} skipped` : ''}\n`);
process.exitCode = failed > 0 || ran + skipped === 0 ? 1 : 0; // skips alone are no failure here; .ci/run fails on them
