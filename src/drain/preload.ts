// The Node drain preload (node-drain.cjs): where it is read from, how it joins NODE_OPTIONS, and proof it loaded.

import { basename, join } from 'node:path';
import { whatBlocks } from '../os/access.js';
import { groupMembers, listenersOn, tcpListeners } from '../os/proc.js';
import { distSrc, drainModulePath } from '../os/self.js';
import type { Sys } from '../os/sys.js';

/** The preload as built, in dist/src beside the bundle (the executable writes its own: os/self.ts). */
export const PRELOAD_SOURCE = join(distSrc(), 'node-drain.cjs');

/**
 * Where a copy goes when the package is not readable by the app's user (a clone in /root, say). Not the
 * state dir, which is 0700 root; not /run, which a reboot empties while a Node process that inherited
 * NODE_OPTIONS may still start a child that needs the file. Copies are named by content and never rewritten.
 */
export const preloadDir = (env: NodeJS.ProcessEnv) => env.PORTFLIP_PRELOAD_DIR || '/var/lib/portflip-node';

/** True when uid:gid can traverse every directory up to `path` and read it (supplementary groups ignored). */
export async function readableBy(sys: Sys, path: string, uid: number, gid: number): Promise<boolean> {
  return (await whatBlocks(sys, path, uid, gid, 'read')) === null;
}

export type PreloadPlace = { path: string; copied: boolean } | { path: null; why: string };

/** The preload's path, readable by the app's user: the package's own file, or a world-readable copy. */
export async function placePreload(
  sys: Sys,
  env: NodeJS.ProcessEnv,
  user?: { name: string; uid: number; gid: number },
  source?: string,
): Promise<PreloadPlace> {
  if (source === undefined) {
    try {
      source = drainModulePath(preloadDir(env), PRELOAD_SOURCE);
    } catch (err) {
      return { path: null, why: `cannot write the drain module from the executable: ${(err as Error).message}` };
    }
  }
  const uid = user?.uid ?? 0;
  const gid = user?.gid ?? 0;
  if (await readableBy(sys, source, uid, gid)) return { path: source, copied: false };
  const text = await sys.fs.read(source);
  const dir = preloadDir(env);
  const { createHash } = await import('node:crypto'); // loaded here only: most deploys never copy
  const dest = join(dir, `node-drain-${createHash('sha256').update(text).digest('hex').slice(0, 12)}.cjs`);
  try {
    await sys.fs.mkdir(dir, 0o755);
    await sys.fs.chmod(dir, 0o755);
    if (
      !(await sys.fs.stat(dest).then(
        (s) => s.isFile,
        () => false,
      ))
    ) {
      const tmp = `${dest}.${sys.pid}.tmp`;
      await sys.fs.write(tmp, text, 0o644);
      await sys.fs.chmod(tmp, 0o644); // the umask may have taken bits away
      await sys.fs.rename(tmp, dest);
    }
  } catch (err) {
    return { path: null, why: `cannot write ${dest} (${(err as NodeJS.ErrnoException).code ?? err})` };
  }
  if (await readableBy(sys, dest, uid, gid)) return { path: dest, copied: true };
  return { path: null, why: `neither ${source} nor ${dest} is readable by user ${user?.name}` };
}

/** NODE_OPTIONS with `--require PRELOAD` appended to the user's own options (once). */
export function withPreload(nodeOptions: string | undefined, path: string): string {
  const own = (nodeOptions ?? '').trim();
  const quoted = /[\s"'\\]/.test(path) ? `"${path.replace(/(["\\])/g, '\\$1')}"` : path;
  if (own.includes(path)) return own;
  return `${own ? `${own} ` : ''}--require ${quoted}`;
}

/** The environment additions for an instance with the drain module; the idle wait ends before --kill-after. */
export const preloadEnv = (env: NodeJS.ProcessEnv, path: string, killAfterMs: number): Record<string, string> => ({
  NODE_OPTIONS: withPreload(env.NODE_OPTIONS, path),
  PORTFLIP_NODE_DRAIN_MAX_IDLE_MS: String(Math.max(1000, killAfterMs - 2000)),
});

/** Whether pid is a Node.js process that started with the preload in NODE_OPTIONS (Node loads it or refuses to start). */
async function hasPreload(sys: Sys, pid: number, path: string): Promise<boolean> {
  const exe = await sys.fs.readlink(`/proc/${pid}/exe`).catch(() => '');
  if (!/^node(js)?[\d.]*$/.test(basename(exe))) return false;
  const environ = (await sys.readText(`/proc/${pid}/environ`)) ?? '';
  return !!environ
    .split('\0')
    .find((kv) => kv.startsWith('NODE_OPTIONS='))
    ?.includes(path);
}

/**
 * What the preload reached in the instance's group, in one pass over its members: the Node processes that carry
 * it ("pid 9203 (node)", "pid 9199 (npm start)"), and whether every member holding a listening socket on the
 * port carries it (then `--drain auto` can signal at once).
 */
export async function inspectPreload(
  sys: Sys,
  pgid: number,
  port: number,
  path: string,
): Promise<{ loadedIn: string[]; listeners: boolean }> {
  const inodes = new Set(listenersOn(await tcpListeners(sys), port).map((s) => s.inode));
  const loadedIn: string[] = [];
  let listening = 0;
  let listeningWithPreload = 0;
  for (const pid of await groupMembers(sys, pgid)) {
    const has = await hasPreload(sys, pid, path);
    if (has) {
      const comm = ((await sys.readText(`/proc/${pid}/comm`)) ?? '').trim();
      loadedIn.push(`pid ${pid}${comm ? ` (${comm})` : ''}`);
    }
    if (await holdsSocket(sys, pid, inodes)) {
      listening++;
      if (has) listeningWithPreload++;
    }
  }
  return { loadedIn, listeners: listening > 0 && listening === listeningWithPreload };
}

async function holdsSocket(sys: Sys, pid: number, inodes: Set<number>): Promise<boolean> {
  if (!inodes.size) return false;
  for (const fd of await sys.fs.readdir(`/proc/${pid}/fd`).catch(() => [] as string[])) {
    const m = /^socket:\[(\d+)\]$/.exec(await sys.fs.readlink(`/proc/${pid}/fd/${fd}`).catch(() => ''));
    if (m && inodes.has(Number(m[1]))) return true;
  }
  return false;
}
