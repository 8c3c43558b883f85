// npm's prepare step: builds dist/ (npm runs it after `npm install` or `npm ci` in a clone, before `npm pack`, and
// when `npm install -g` installs from a git URL). That last one runs it without the devDependencies the build
// needs: the global install's settings reach the clone's own install (npm/cli#8440, open), so it installs the
// clone globally instead of its dependencies into it. Then this installs them first, from the lock file.
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const npm = (args, env = process.env) => execFileSync('npm', args, { cwd: root, env, stdio: 'inherit' });

if (!existsSync(path.join(root, 'node_modules', 'typescript', 'bin', 'tsc'))) {
  const env = { ...process.env };
  for (const k of Object.keys(env)) if (/^npm_config_(global|location|prefix)$/i.test(k)) delete env[k];
  process.stderr.write('prepare: no devDependencies here (npm install -g from a git URL): npm ci for the build\n');
  // --ignore-scripts: nothing of theirs is needed to build, and this prepare must not run again inside
  npm(['ci', '--include=dev', '--ignore-scripts', '--no-audit', '--no-fund', '--global=false'], env);
}
npm(['run', 'build']);
