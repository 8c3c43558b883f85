// The single executable for tests: built by scripts/package.mjs for this machine's arch, once per set of inputs.
import { execFile, execFileSync, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import {
  chmodSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  readdirSync,
  renameSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { repoRoot, type ExecResult } from './netns.js';
import type { World } from './world.js';

export interface Built {
  dir: string; // holds both executables, both .debs and SHA256SUMS
  exe: string; // this machine's arch
  deb: string;
  version: string;
  foreignExe: string; // the other arch's executable (arm64 on x64), run through qemu-user
}

/**
 * What the artifacts are made from: the built dist/src, the packaging scripts, package.json and the lock. The same
 * inputs give the same artifacts, so a later test file reuses them instead of building again (some 30 s).
 */
function inputsHash(): string {
  const h = createHash('sha256').update(`arch=${process.arch}\n`);
  const dist = path.join(repoRoot, 'dist', 'src');
  const files = [
    ...readdirSync(dist)
      .filter((f) => /\.(c?js)$/.test(f))
      .sort()
      .map((f) => path.join(dist, f)),
    ...['package.mjs', 'manpage.mjs', 'build-info.mjs'].map((f) => path.join(repoRoot, 'scripts', f)),
    path.join(repoRoot, 'package.json'),
    path.join(repoRoot, 'package-lock.json'),
  ];
  for (const f of files) h.update(f).update(readFileSync(f));
  return h.digest('hex').slice(0, 16);
}

/** Builds (or finds built) what `npm run package` makes: both arches' executables and .debs, as a release has them. */
export async function builtExecutable(): Promise<Built> {
  const { version } = JSON.parse(readFileSync(path.join(repoRoot, 'package.json'), 'utf8'));
  const base = path.join(repoRoot, 'dist', 'test-package');
  const dir = path.join(base, inputsHash());
  const exe = path.join(dir, `portflip-${version}-linux-${process.arch}`);
  const debArch = process.arch === 'x64' ? 'amd64' : process.arch;
  const other = process.arch === 'x64' ? 'arm64' : 'x64';
  const built: Built = {
    dir,
    exe,
    version,
    deb: path.join(dir, `portflip_${version}_${debArch}.deb`),
    foreignExe: path.join(dir, `portflip-${version}-linux-${other}`),
  };
  if (existsSync(path.join(dir, 'SHA256SUMS'))) return built;
  // test files of both lanes (scripts/test.mjs) may ask at once: one builds, the other waits and reuses it
  const release = await buildLock(`${base}.lock`);
  try {
    if (existsSync(path.join(dir, 'SHA256SUMS'))) return built;
    // older builds of other inputs go: each is some 100 MB
    rmSync(base, { recursive: true, force: true });
    mkdirSync(base, { recursive: true });
    const tmp = `${dir}.${process.pid}`;
    const args = [path.join(repoRoot, 'scripts', 'package.mjs'), '--arch', `${process.arch},${other}`, '--out', tmp];
    await new Promise<void>((resolve, reject) =>
      execFile(process.execPath, args, { cwd: repoRoot, timeout: 240_000, maxBuffer: 1 << 24 }, (err, _out, stderr) =>
        err ? reject(new Error(`scripts/package.mjs failed: ${err.message}\n${stderr}`)) : resolve(),
      ),
    );
    renameSync(tmp, dir);
    return built;
  } finally {
    release();
  }
}

/** A directory made by mkdir (one taker wins) holding its taker's pid; one whose taker is gone is taken over. */
async function buildLock(lock: string): Promise<() => void> {
  for (const deadline = Date.now() + 300_000; Date.now() < deadline; await new Promise((r) => setTimeout(r, 500))) {
    try {
      mkdirSync(lock);
      writeFileSync(path.join(lock, 'pid'), String(process.pid));
      return () => rmSync(lock, { recursive: true, force: true });
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
    let holder = 0;
    try {
      holder = Number(readFileSync(path.join(lock, 'pid'), 'utf8'));
    } catch {
      continue; // being made or removed right now
    }
    if (holder && !existsSync(`/proc/${holder}`)) rmSync(lock, { recursive: true, force: true });
  }
  throw new Error(`${lock}: another test file has been building the executable for 5 minutes`);
}

/**
 * Every path on this machine that runs node, npm, npx or corepack: what a mount namespace hides to play a host
 * with no Node.js. Symlinks are hidden by their targets (a bind mount follows them).
 */
export function nodePaths(): { files: string[]; dirs: string[] } {
  const files = new Set<string>([process.execPath]);
  for (const dir of (process.env.PATH ?? '').split(':').filter(Boolean))
    for (const name of ['node', 'nodejs', 'npm', 'npx', 'corepack'])
      if (existsSync(path.join(dir, name))) files.add(path.join(dir, name));
  const dirs = ['/usr/lib/node_modules', '/usr/local/lib/node_modules'].filter((d) => existsSync(d));
  return { files: [...files], dirs };
}

/**
 * `sh -c` text for `unshare -m sh -c TEXT sh CMD ARGS...`: binds $PF_APP_NODE (an empty file) to node first, so a
 * Node app can still be started by that absolute path, then hides every node and npm, checks that none runs,
 * and execs CMD. Exit 97 when the hiding did not work (the test must fail, not pass with node there).
 */
export function hideNodeScript(): string {
  const { files, dirs } = nodePaths();
  const q = (s: string) => `'${s.replaceAll("'", "'\\''")}'`;
  return [
    'set -e',
    `mount --bind ${q(process.execPath)} "$PF_APP_NODE"`,
    ...files.map((f) => `mount --bind "$PF_EMPTY" ${q(f)}`),
    ...dirs.map((d) => `mount -t tmpfs none ${q(d)}`),
    'for c in node nodejs npm npx corepack; do if "$c" --version >/dev/null 2>&1; then echo "$c still runs" >&2; exit 97; fi; done',
    'exec "$@"',
  ].join('\n');
}

export interface NoNodeFiles {
  base: string; // remove when done
  appNode: string; // an empty file named node that hideNodeScript binds the real node to, for the app
  empty: string; // what hides each node and npm
}

export function noNodeFiles(): NoNodeFiles {
  const base = mkdtempSync(path.join(tmpdir(), 'portflip-nonode-'));
  chmodSync(base, 0o755);
  mkdirSync(path.join(base, 'bin'));
  const appNode = path.join(base, 'bin', 'node'); // named node: portflip recognises a Node process by that name
  const empty = path.join(base, 'empty');
  writeFileSync(appNode, '', { mode: 0o755 });
  writeFileSync(empty, '', { mode: 0o644 });
  return { base, appNode, empty };
}

/** The env of a no-Node run: the world's state dirs, and the two files hideNodeScript binds. */
function noNodeEnv(w: World, files: NoNodeFiles): NodeJS.ProcessEnv {
  return {
    PORTFLIP_STATE_DIR: w.dirs.stateDir,
    PORTFLIP_RUN_DIR: w.dirs.runDir,
    PORTFLIP_PRELOAD_DIR: w.dirs.preloadDir,
    PF_APP_NODE: files.appNode,
    PF_EMPTY: files.empty,
  };
}

/** Runs the executable in a fresh mount namespace of the world's server namespace, where node and npm do not run. */
export function noNodeExec(w: World, built: Built, files: NoNodeFiles, args: string[]): Promise<ExecResult> {
  return w.ns.exec('unshare', ['-m', 'sh', '-c', hideNodeScript(), 'sh', built.exe, ...args], {
    env: noNodeEnv(w, files),
    timeoutMs: 60_000,
  });
}

/**
 * Starts the executable as noNodeExec does, for commands that keep running (run, watch, agent). nsenter, unshare
 * and sh each exec the next, so the child's pid is portflip's own: the caller kills it by that pid.
 */
export function noNodeSpawn(w: World, built: Built, files: NoNodeFiles, args: string[]): ChildProcess {
  return w.ns.spawn('unshare', ['-m', 'sh', '-c', hideNodeScript(), 'sh', built.exe, ...args], {
    env: noNodeEnv(w, files),
  });
}

/** The other arch as Debian and qemu-user name it: what runs the foreign executable. */
export const foreignArch =
  process.arch === 'x64' ? { deb: 'arm64', qemu: 'qemu-aarch64' } : { deb: 'amd64', qemu: 'qemu-x86_64' };

/** The host's Debian archive entries (deb822 or one-line) for an apt of the foreign arch; other archives left out. */
function debianSources(): string {
  const dir = '/etc/apt/sources.list.d';
  const files = [
    '/etc/apt/sources.list',
    ...(existsSync(dir) ? readdirSync(dir).map((f) => path.join(dir, f)) : []),
  ].filter((f) => /\.(list|sources)$/.test(f) && existsSync(f));
  const debian = (uri: string) => /\/debian(-security)?\/?$/.test(uri);
  const out: string[] = [];
  for (const f of files) {
    const text = readFileSync(f, 'utf8');
    if (f.endsWith('.sources'))
      for (const stanza of text.split(/\n\s*\n/)) {
        const uris = /^URIs:\s*(.+)$/m.exec(stanza)?.[1].split(/\s+/) ?? [];
        if (/^Types:.*\bdeb\b/m.test(stanza) && uris.some(debian))
          out.push(
            stanza
              .split('\n')
              .filter((l) => !/^(Architectures|Enabled):/.test(l))
              .join('\n'),
          );
      }
    else
      for (const line of text.split('\n'))
        if (/^deb\s/.test(line) && line.split(/\s+/).some(debian))
          out.push(`${line.replace(/\[[^\]]*arch=[^\]]*\]/, '')}\n`);
  }
  return out.join('\n\n') + '\n';
}

/**
 * A sysroot with the foreign arch's libc6, libstdc++6 and libgcc-s1 (what Node needs) for `qemu -L`: fetched by an
 * apt of that arch whose lists, cache and sources are all its own (the machine's dpkg gets no foreign arch, its
 * apt lists stay as they are), checked against the archive's signatures as any apt download is, cached.
 */
export function foreignSysroot(): string {
  const base = path.join(repoRoot, 'node_modules', '.cache', `portflip-sysroot-${foreignArch.deb}`);
  const root = path.join(base, 'root');
  if (existsSync(path.join(root, '.done'))) return root;
  rmSync(base, { recursive: true, force: true });
  for (const d of ['lists/partial', 'archives/partial', 'sources.list.d', 'debs'])
    mkdirSync(path.join(base, d), { recursive: true });
  writeFileSync(path.join(base, 'sources.list.d', 'debian.sources'), debianSources());
  writeFileSync(path.join(base, 'none.list'), '');
  const apt = [
    `Dir::Etc::SourceList=${path.join(base, 'none.list')}`,
    `Dir::Etc::SourceParts=${path.join(base, 'sources.list.d')}`,
    `Dir::State::Lists=${path.join(base, 'lists')}`,
    `Dir::Cache=${base}`,
    `Dir::Cache::archives=${path.join(base, 'archives')}`,
    `APT::Architecture=${foreignArch.deb}`,
    `APT::Architectures::=${foreignArch.deb}`,
    'APT::Sandbox::User=root', // the cache is root's; _apt could not write it
    'Debug::NoLocking=1', // its own lists: the machine's apt lock is not needed
  ].flatMap((o) => ['-o', o]);
  execFileSync('apt-get', [...apt, '-qq', 'update'], { stdio: ['ignore', 'ignore', 'pipe'], timeout: 120_000 });
  const pkgs = ['libc6', 'libstdc++6', 'libgcc-s1'].map((p) => `${p}:${foreignArch.deb}`);
  execFileSync('apt-get', [...apt, '-qq', 'download', ...pkgs], {
    cwd: path.join(base, 'debs'),
    stdio: ['ignore', 'ignore', 'pipe'],
    timeout: 120_000,
  });
  for (const deb of readdirSync(path.join(base, 'debs')))
    execFileSync('dpkg-deb', ['-x', path.join(base, 'debs', deb), root]);
  writeFileSync(path.join(root, '.done'), '');
  return root;
}
