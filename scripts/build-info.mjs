// The version and git commit that the bundles carry for `portflip --version` (scripts/bundle.mjs, scripts/package.mjs).
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import path from 'node:path';

/** { version, commit }: commit is the short hash, "-dirty" when tracked files differ from it, or "unknown" outside git. */
export function buildInfo(root) {
  const { version } = JSON.parse(readFileSync(path.join(root, 'package.json'), 'utf8'));
  const git = (...args) => execFileSync('git', ['-C', root, ...args], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim();
  let commit = process.env.PORTFLIP_COMMIT || 'unknown'; // a build from a tarball of the source can say where it came from
  try {
    // only a checkout of portflip itself: an unpacked tarball inside some other repo must not take that repo's commit
    if (path.resolve(git('rev-parse', '--show-toplevel')) === path.resolve(root)) {
      commit = git('rev-parse', '--short=12', 'HEAD');
      try {
        git('diff', '--quiet', 'HEAD', '--');
      } catch {
        commit += '-dirty';
      }
    }
  } catch {
    // no git, or not a checkout
  }
  return { version, commit };
}

/** esbuild `define` entries for src/os/self.ts. */
export const buildDefines = ({ version, commit }) => ({
  __PORTFLIP_VERSION__: JSON.stringify(version),
  __PORTFLIP_COMMIT__: JSON.stringify(commit),
});
