// Bundles the CLI that `portflip` runs, after tsc: dist/src/cli.cjs, one CommonJS file that
// dist/src/main.cjs loads with V8's code cache (src/load-cli.cts says why), without string-width's
// and node:assert's import-time cost (src/cli/text-width.ts and src/cli/assert-lite.ts say why). Unit tests
// keep importing tsc's per-module output.
import { build } from 'esbuild';
import { chmodSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { buildDefines, buildInfo } from './build-info.mjs';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const dist = path.join(root, 'dist', 'src');

// chunks of the ESM bundles before this one, and code caches of an earlier bundle
for (const f of readdirSync(dist)) if (/^cli-\w+\.js$|^cli\.cjs\./.test(f)) rmSync(path.join(dist, f));

await build({
  entryPoints: [path.join(dist, 'cli', 'cli.js')],
  outfile: path.join(dist, 'cli.cjs'), // beside main.cjs, so paths relative to it (node-drain.cjs, holder.js) resolve
  bundle: true,
  format: 'cjs',
  platform: 'node',
  target: 'node20',
  // a script run from the code cache has no ES module loader behind it: import() becomes require()
  supported: { 'dynamic-import': false },
  external: ['koffi'], // a native addon, found in node_modules at run time
  // lighter stand-ins for what yargs imports: src/cli/text-width.ts and src/cli/assert-lite.ts say why
  alias: { 'string-width': path.join(dist, 'cli', 'text-width.js'), assert: path.join(dist, 'cli', 'assert-lite.js') },
  // src/os/self.ts: --version, and dist/src (where holder.js and node-drain.cjs sit) is the bundle's own folder
  define: { 'import.meta.url': '__pfModuleUrl', __PORTFLIP_DIST_SRC__: '__dirname', ...buildDefines(buildInfo(root)) },
  banner: { js: "var __pfModuleUrl = require('node:url').pathToFileURL(__filename).href;" },
  minifyWhitespace: true, // a smaller file to read each run; names stay, for the rare stack trace
  legalComments: 'none',
  logLevel: 'warning',
});
// the loader reads the bundle as Latin-1, which is only exact for ASCII (esbuild escapes the rest)
const bundle = readFileSync(path.join(dist, 'cli.cjs'));
const at = bundle.findIndex((b) => b > 0x7f);
if (at >= 0) throw new Error(`dist/src/cli.cjs has a byte that is not ASCII at offset ${at}; src/load-cli.cts reads it as Latin-1`);
for (const entry of ['main.cjs', 'main.js']) chmodSync(path.join(dist, entry), 0o755);
