// Loads the CLI from its bundle (dist/src/cli.cjs, made by scripts/bundle.mjs) with V8's code cache:
// compiling the bundle's code again on every run took 20-35 ms of every deploy (measured A/B).
// Node 20 has no compile cache of its own (module.enableCompileCache is Node 22), so this is one: the
// bytecode a command compiled is kept beside the bundle, one file per command, written at the end of
// the first run that succeeds. Like main.cts this runs before the CLI and its Sys seam exist.
import { closeSync, openSync, readFileSync, renameSync, statSync, unlinkSync, writeSync } from 'node:fs';
import Module, { createRequire } from 'node:module';
import { join } from 'node:path';
import { Script } from 'node:vm';

type Cli = typeof import('./cli/cli.js', { with: { 'resolution-mode': 'import' } });

/** The CLI and, after its command succeeded, a way to keep what it compiled for the next run. */
export interface LoadedCli {
  main: Cli['main'];
  yieldCpu: Cli['yieldCpu'];
  keep: () => void;
}

const BUNDLE = join(__dirname, 'cli.cjs');

export async function loadCli(argv: string[]): Promise<LoadedCli> {
  let source: string;
  let stamp: string;
  try {
    source = readFileSync(BUNDLE, 'latin1'); // the bundle is ASCII (scripts/bundle.mjs checks): no UTF-8 decoding
    const st = statSync(BUNDLE);
    // V8 checks a cache against the source's length only: a rebuilt bundle of the same length would
    // run the old bytecode. The bundle's size and time, and the Node build, make sure it is this one.
    stamp = `portflip-cache ${st.size} ${st.mtimeMs} ${process.version} ${process.arch}\n`;
  } catch {
    // not bundled (tsc's output alone, as the unit tests use it)
    const cli: Cli = await import('./cli/cli.js');
    return { main: cli.main, yieldCpu: cli.yieldCpu, keep: () => {} };
  }
  const word = argv.find((a) => !a.startsWith('-')) ?? '';
  const cacheFile = `${BUNDLE}.${/^[a-z_]{1,20}$/.test(word) ? word : 'other'}.cache`;
  const cached = readCache(cacheFile, stamp);
  const script = new Script(Module.wrap(source), { filename: BUNDLE, cachedData: cached });
  const module = { exports: {} as Cli };
  script.runInThisContext()(module.exports, createRequire(BUNDLE), module, BUNDLE, __dirname);
  const keep = () => {
    if (cached && !script.cachedDataRejected) return;
    writeCache(cacheFile, stamp, script.createCachedData());
  };
  return { main: module.exports.main, yieldCpu: module.exports.yieldCpu, keep };
}

function readCache(file: string, stamp: string): Buffer | undefined {
  try {
    const data = readFileSync(file);
    const head = Buffer.from(stamp);
    return data.subarray(0, head.length).equals(head) ? data.subarray(head.length) : undefined;
  } catch {
    return undefined;
  }
}

/** Written whole under another name, then renamed: runs side by side never read half a cache. */
function writeCache(file: string, stamp: string, data: Buffer): void {
  const tmp = `${file}.${process.pid}`;
  try {
    const fd = openSync(tmp, 'w', 0o644);
    try {
      writeSync(fd, stamp);
      writeSync(fd, data);
    } finally {
      closeSync(fd);
    }
    renameSync(tmp, file);
  } catch {
    // a read-only install runs without the cache, only slower
    try {
      unlinkSync(tmp);
    } catch {}
  }
}
