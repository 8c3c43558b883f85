// How portflip runs itself and finds its own files, whether it is the npm build (node + dist/src) or the
// single executable (scripts/package.mjs), which carries its files inside and writes them to disk on first use.
// Node built-ins only: the holder imports it.

import {
  closeSync,
  fsyncSync,
  mkdirSync,
  openSync,
  readFileSync,
  renameSync,
  statSync,
  unlinkSync,
  writeSync,
} from 'node:fs';
import { createRequire } from 'node:module';
import { homedir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

/** What the single executable carries: set by its entry (sea-main.ts) before anything else runs. */
export interface Embedded {
  asset(name: string): Buffer; // node:sea getAsset, copied
  files: Record<string, { sha256: string; size: number }>; // written by scripts/package.mjs at build time
  koffiVersion: string;
}

let embedded: Embedded | null = null;
export function setEmbedded(e: Embedded): void {
  embedded = e;
}
export const isExecutable = () => embedded !== null;

// Set by scripts/bundle.mjs to the bundle's own folder; tsc's output of this module sits one folder below it.
declare const __PORTFLIP_DIST_SRC__: string | undefined;

/** dist/src, where the bundle and the files Node starts sit (main.cjs, holder.js, node-drain.cjs). */
export function distSrc(): string {
  return typeof __PORTFLIP_DIST_SRC__ === 'string'
    ? __PORTFLIP_DIST_SRC__
    : fileURLToPath(new URL('..', import.meta.url));
}

// Both are replaced by the bundlers (scripts/bundle.mjs, scripts/package.mjs); tsc's per-module output reads package.json.
declare const __PORTFLIP_VERSION__: string | undefined;
declare const __PORTFLIP_COMMIT__: string | undefined;

/** `portflip --version`: the version and the git commit the build came from. */
export function versionText(): string {
  if (typeof __PORTFLIP_VERSION__ === 'string') return `${__PORTFLIP_VERSION__} (commit ${__PORTFLIP_COMMIT__})`;
  try {
    const pkg = JSON.parse(readFileSync(join(distSrc(), '..', '..', 'package.json'), 'utf8'));
    return `${pkg.version} (commit unknown: not bundled)`;
  } catch {
    return 'unknown';
  }
}

/** argv that starts this same portflip again (the reaper, systemd units). */
export function selfArgv(): string[] {
  return embedded ? [process.execPath] : [process.execPath, resolve(process.argv[1])];
}

/** argv that starts the holder (holder.ts): its own script under node, or a hidden word of the executable. */
export function holderArgv(): string[] {
  return embedded ? [process.execPath, '_holder'] : [process.execPath, join(distSrc(), 'holder.js')];
}

/**
 * Where the executable writes koffi's native module: root's under the state dir (0700), anyone else's in
 * their cache. A directory per content hash, written once and never rewritten, so a process that has the
 * library mapped never sees it change; a newer portflip writes its own beside it.
 */
export function libDir(env: NodeJS.ProcessEnv = process.env): string {
  if (env.PORTFLIP_LIB_DIR) return env.PORTFLIP_LIB_DIR;
  // state.ts's default state dir; not imported, so that the holder loads no more than nfqueue.ts
  if (process.geteuid?.() === 0) return join(env.PORTFLIP_STATE_DIR || '/var/lib/portflip', 'lib');
  return join(env.XDG_CACHE_HOME || join(homedir(), '.cache'), 'portflip', 'lib');
}

/** The embedded file `name` on disk at `path` (created with `mode`), written only when it is not there yet. */
function extract(name: string, path: string, mode: number, dirMode: number): string {
  const e = embedded!;
  const want = e.files[name];
  if (!want) throw new Error(`this portflip executable does not carry ${name}`);
  const mine = (p: string) => {
    const st = statSync(p);
    // a file someone else could have put or changed there is not loaded
    if (st.uid !== process.geteuid?.() || st.mode & 0o022)
      throw new Error(`${p} is not owned by this user or is writable by others`);
    return st;
  };
  try {
    if (mine(path).size === want.size) return path;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
  }
  mkdirSync(dirname(path), { recursive: true, mode: dirMode });
  mine(dirname(path));
  const data = e.asset(name);
  const tmp = `${path}.${process.pid}.tmp`;
  const fd = openSync(tmp, 'w', mode);
  try {
    writeSync(fd, data);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  try {
    renameSync(tmp, path); // another process may have won the race: its file has the same content
  } catch (err) {
    unlinkSync(tmp);
    throw err;
  }
  return path;
}

/** The Node drain module for NODE_OPTIONS: beside this module in the npm build; from the executable, written once. */
export function drainModulePath(preloadDir: string, packaged: string): string {
  if (!embedded) return packaged;
  const hash = embedded.files['node-drain.cjs'].sha256;
  // the name placePreload gives its copies: one file per content, world-readable, for apps run as any user
  return extract('node-drain.cjs', join(preloadDir, `node-drain-${hash.slice(0, 12)}.cjs`), 0o644, 0o755);
}

/** koffi (libc calls for the NFQUEUE socket): from node_modules, or the executable's copy of its native module. */
export function loadKoffi(): any {
  if (!embedded) return createRequire(import.meta.url)('koffi');
  const hash = embedded.files['koffi.node'].sha256;
  const file = extract('koffi.node', join(libDir(), hash, 'koffi.node'), 0o644, 0o755);
  const mod = { exports: {} as any };
  process.dlopen(mod, file);
  if (mod.exports.version !== embedded.koffiVersion)
    throw new Error(`${file} is koffi ${mod.exports.version}, this portflip was built with ${embedded.koffiVersion}`);
  return mod.exports;
}
