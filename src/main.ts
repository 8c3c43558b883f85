#!/usr/bin/env node
// The portflip executable: yields the CPU to the apps it manages, then runs the CLI and exits with its code.

import { readFileSync } from 'node:fs';
import { loadCli } from './load-cli.js';

const uidMap = (() => {
  try {
    return readFileSync('/proc/self/uid_map', 'utf8');
  } catch {
    return null;
  }
})();
// from its code cache, loading the CLI takes a few ms of CPU; the work after it yields to the apps
const argv = process.argv.slice(2);
const cli = await loadCli(argv);
cli.yieldCpu(uidMap);
process.exitCode = await cli.main(argv);
// only a run that did its command's work, and did it well, leaves a cache (and nothing else) behind
const own = argv.includes('--') ? argv.slice(0, argv.indexOf('--')) : argv;
if (process.exitCode === 0 && !own.some((a) => ['--help', '-h', '--version', '--dry-run'].includes(a))) cli.keep();
