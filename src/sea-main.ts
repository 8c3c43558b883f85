// The single executable's entry (scripts/package.mjs bundles it): the hidden `_holder` word runs the holder,
// anything else the CLI, as main.cts does for the npm build. It first tells self.ts what the executable carries.

import { setEmbedded, type Embedded } from './os/self.js';

// written by scripts/package.mjs: the sha256 and size of each embedded file, koffi's version
declare const __PORTFLIP_EMBEDDED__: Omit<Embedded, 'asset'>;

// node:sea exists only in Node >= 20.12 and only means something here; required, not imported, so tsc's
// per-module output of this file (never run: the bundle is) does not need it
// eslint-disable-next-line @typescript-eslint/no-require-imports
const sea = require('node:sea') as { getAsset(key: string): ArrayBuffer };
setEmbedded({ ...__PORTFLIP_EMBEDDED__, asset: (name) => Buffer.from(sea.getAsset(name)) });

const argv = process.argv.slice(2);

void (async () => {
  if (argv[0] === '_holder') {
    // holder.ts reads its arguments from process.argv.slice(2) and runs on import
    process.argv.splice(2, 1);
    await import('./holder.js');
    return;
  }
  const uidMap = (() => {
    try {
      return (require('node:fs') as typeof import('node:fs')).readFileSync('/proc/self/uid_map', 'utf8');
    } catch {
      return null;
    }
  })();
  const cli = await import('./cli/cli.js');
  cli.yieldCpu(uidMap);
  process.exitCode = await cli.main(argv);
  // as main.cts: the command is over and its output written; skip tearing down V8's heap
  process.exit();
})();
