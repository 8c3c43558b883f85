// Bundles the CLI that `portflip` runs (dist/src/main.js) in place, after tsc: one file per lazily
// loaded command group instead of ~80 modules resolved one by one, and without string-width's
// import-time cost (src/text-width.ts says why). Unit tests keep importing tsc's per-module output.
import { build } from 'esbuild';
import { chmodSync, readdirSync, rmSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const dist = path.join(root, 'dist', 'src');

// chunks of an earlier build have other hashes
for (const f of readdirSync(dist)) if (/^cli-\w+\.js$/.test(f)) rmSync(path.join(dist, f));

await build({
  entryPoints: [path.join(dist, 'main.js')],
  outdir: dist,
  allowOverwrite: true,
  bundle: true,
  splitting: true, // commands stay lazily loaded: `status` never parses the deploy code
  chunkNames: 'cli-[hash]', // beside main.js, so import.meta.url-relative paths (node-drain.cjs) still resolve
  format: 'esm',
  platform: 'node',
  target: 'node20',
  alias: { 'string-width': path.join(dist, 'text-width.js') },
  // bundled CommonJS dependencies (pidusage) call require() for Node's own modules
  banner: { js: "import { createRequire as __pfRequire } from 'node:module'; const require = __pfRequire(import.meta.url);" },
  legalComments: 'none',
  logLevel: 'warning',
});
chmodSync(path.join(dist, 'main.js'), 0o755);
