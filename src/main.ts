#!/usr/bin/env node
// The portflip executable: yields the CPU to the apps it manages, then runs the CLI and exits with its code.

import { readFileSync } from 'node:fs';
import { yieldCpu } from './sys.js';

const uidMap = (() => {
  try {
    return readFileSync('/proc/self/uid_map', 'utf8');
  } catch {
    return null;
  }
})();
yieldCpu(uidMap);

// loaded after the priority is lowered: loading the CLI is most of a deploy's own CPU time
const { main } = await import('./cli.js');
process.exitCode = await main(process.argv.slice(2));
