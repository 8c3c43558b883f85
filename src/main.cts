#!/usr/bin/env node
// The portflip executable: loads the CLI, yields the CPU to the apps it manages, runs the command and
// exits with its code. CommonJS because it is the file Node.js starts: an ES module there would start
// Node's ES module loader first, some 10 ms of every run.

import { readFileSync } from 'node:fs';
import { loadCli } from './load-cli.cjs';

const uidMap = (() => {
  try {
    return readFileSync('/proc/self/uid_map', 'utf8');
  } catch {
    return null;
  }
})();
const argv = process.argv.slice(2);
// the own flags end at "--": what follows is the app's command
const own = argv.includes('--') ? argv.slice(0, argv.indexOf('--')) : argv;

void (async () => {
  // from its code cache, loading the CLI takes a few ms of CPU; the work after it yields to the apps
  const cli = await loadCli(argv);
  cli.yieldCpu(uidMap);
  process.exitCode = await cli.main(argv);
  // only a run that did its command's work, and did it well, leaves a cache (and nothing else) behind
  if (process.exitCode === 0 && !own.some((a) => ['--help', '-h', '--version', '--dry-run'].includes(a))) cli.keep();
  // the command is over (its output is written: stdout and stderr are synchronous on Linux); leaving
  // now skips tearing down V8's heap page by page, some 5-10 ms of every run
  process.exit();
})();
