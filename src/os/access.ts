// Whether the app's user can reach a path: execute on every directory on the way, and read or execute the file.
//
// An instance runs with the user's uid and primary gid and no supplementary groups (instance.ts), so the
// classic owner / group / other bits decide, checked the way the kernel does: the owner class alone
// applies to the owner, the group class to the group, and root passes.

import { isAbsolute, join, resolve } from 'node:path';
import { fail } from '../core/errors.js';
import type { Sys } from './sys.js';

export type Access = 'read' | 'execute';
const BIT: Record<Access, number> = { read: 4, execute: 1 };

/**
 * The directories the kernel searches to reach `path`, symlinks followed (a command linked into /usr/local/bin
 * from /root/.nvm is reached through /root), and where it ends. Relative paths start at portflip's directory.
 */
async function lookup(sys: Sys, path: string): Promise<{ dirs: string[]; end: string }> {
  const dirs = ['/'];
  let rest = resolve(path).split('/').filter(Boolean);
  let at = '/';
  for (let links = 0; rest.length;) {
    const next = join(at, rest.shift()!);
    const target = links < 40 ? await sys.fs.readlink(next).catch(() => null) : null; // 40: the kernel's own limit
    if (target !== null) {
      links++;
      rest = [...target.split('/').filter(Boolean), ...rest];
      if (isAbsolute(target)) at = '/';
      continue;
    }
    at = next;
    if (rest.length) dirs.push(at);
  }
  return { dirs, end: at };
}

/** What keeps uid:gid from the path: the first directory on the way, or the path itself; null when reachable. */
export async function whatBlocks(
  sys: Sys,
  path: string,
  uid: number,
  gid: number,
  want: Access,
): Promise<{ path: string; mode: number; uid: number; need: Access } | { path: string; missing: true } | null> {
  if (uid === 0) return null;
  const allowed = (s: { mode: number; uid: number; gid: number }, w: Access) =>
    (uid === s.uid ? (s.mode >> 6) & BIT[w] : gid === s.gid ? (s.mode >> 3) & BIT[w] : s.mode & BIT[w]) !== 0;
  const { dirs, end } = await lookup(sys, path);
  // from the root down, as the kernel walks it: the outermost closed directory is the one to name
  for (const [p, need] of [...dirs.map((d) => [d, 'execute'] as const), [end, want] as const]) {
    const s = await sys.fs.stat(p).catch(() => null);
    if (!s) return { path: p, missing: true };
    if (!allowed(s, need)) return { path: p, mode: s.mode & 0o7777, uid: s.uid, need };
  }
  return null;
}

/**
 * deploy --user: fails before anything starts when the user cannot reach the working directory, the
 * command or its script (a first argument that is an existing file, like `node app.js`), naming the
 * directory on the way that blocks it. Otherwise the instance would die at start with only its log to say why.
 */
export async function checkUserReach(
  sys: Sys,
  user: { name: string; uid: number; gid: number },
  o: { cwd: string; command: string[] },
  executable: string,
): Promise<void> {
  const script = o.command[1]?.replaceAll('{port}', '0');
  const scriptPath = script && !script.startsWith('-') ? (isAbsolute(script) ? script : resolve(o.cwd, script)) : null;
  const isScript =
    scriptPath &&
    (await sys.fs.stat(scriptPath).then(
      (s) => s.isFile,
      () => false,
    ));
  const targets: [string, string, Access][] = [
    ['--cwd', resolve(o.cwd), 'execute'],
    ['the command', resolve(executable), 'execute'],
    ...(isScript ? [['its script', scriptPath, 'read'] as [string, string, Access]] : []),
  ];
  for (const [what, path, want] of targets) {
    const b = await whatBlocks(sys, path, user.uid, user.gid, want);
    if (!b) continue;
    const on = b.path === path ? '' : `: ${b.path} is in the way`;
    if ('missing' in b) fail('config', `--user ${user.name} cannot reach ${what} ${path}${on} (cannot stat it)`);
    else
      fail(
        'config',
        `--user ${user.name} cannot reach ${what} ${path}${on} (mode ${b.mode.toString(8).padStart(4, '0')}, ` +
          `owner uid ${b.uid}; ${user.name} needs ${b.need} permission on it); ` +
          `move it where ${user.name} can reach it, or grant that permission`,
      );
  }
}
