// The .deb installed for real with dpkg -i, in a throwaway root: a mount namespace with an overlay over /usr, /etc
// and /var, so dpkg's database, the files and its triggers land in a temp upper dir that goes with the namespace.
// The installed /usr/bin/portflip deploys in a network namespace; dpkg -r removes it. The host's own dpkg
// database and /usr are checked untouched before and after.

import { suite } from 'uvu';
import * as assert from 'uvu/assert';
import { createHash } from 'node:crypto';
import { execFileSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { builtExecutable } from '../helpers/executable.js';
import { fixture, freePorts, waitFor, type ExecResult } from '../helpers/netns.js';
import { inWorld, get, show, type World } from '../helpers/world.js';
import { needsRoot, testUnless } from '../helpers/skip.js';

const test = suite('deb');
const OVERLAID = ['/usr', '/etc', '/var'];

/** What must not change on the host: dpkg's database, and no portflip in /usr. */
function hostView() {
  const status = createHash('sha256').update(readFileSync('/var/lib/dpkg/status')).digest('hex');
  let known = true;
  try {
    execFileSync('dpkg', ['-s', 'portflip'], { stdio: 'ignore' });
  } catch {
    known = false;
  }
  const files = ['/usr/bin/portflip', '/usr/share/man/man1/portflip.1.gz', '/usr/lib/systemd/system/portflip@.service'];
  return { status, known, present: files.filter((f) => existsSync(f)) };
}

/** Holds a mount namespace (in the world's network namespace) whose /usr, /etc and /var are overlays on `base`. */
async function throwawayRoot(w: World, base: string): Promise<ChildProcess> {
  const mounts = OVERLAID.map((d) => {
    const up = path.join(base, 'up', d);
    const work = path.join(base, 'work', d);
    return `mkdir -p ${up} ${work} && mount -t overlay overlay -o lowerdir=${d},upperdir=${up},workdir=${work} ${d}`;
  });
  // unshare makes every mount private: nothing here propagates to the host's mount namespace
  const holder = w.ns.spawn('unshare', [
    '-m',
    'sh',
    '-c',
    ['set -e', ...mounts, 'echo ready', 'exec sleep 600'].join('\n'),
  ]);
  let out = '';
  let err = '';
  holder.stdout!.on('data', (d) => (out += d));
  holder.stderr!.on('data', (d) => (err += d));
  await waitFor(
    () => {
      if (holder.exitCode !== null) throw new Error(`the overlay namespace failed: ${err}`);
      return out.includes('ready');
    },
    10_000,
    'the overlays',
  );
  return holder;
}

testUnless(
  needsRoot('overlay mounts for a throwaway root'),
  'dpkg -i in a throwaway root: /usr/bin/portflip, man page, completion, units, Depends without nodejs; a real deploy; dpkg -r',
  async () => {
    const built = await builtExecutable();
    const before = hostView();
    assert.equal([before.known, before.present], [false, []], 'no portflip installed on this host to begin with');
    // no maintainer scripts: nothing runs at install or removal beyond dpkg's own file handling and triggers
    const control = execFileSync('sh', ['-c', `dpkg-deb --ctrl-tarfile ${built.deb} | tar -t`], { encoding: 'utf8' });
    assert.equal(
      control.split('\n').filter((l) => l && l !== './'),
      ['./control'],
      control,
    );
    const base = mkdtempSync(path.join(tmpdir(), 'portflip-deb-root-'));
    try {
      await inWorld(async (w) => {
        const root = await throwawayRoot(w, base);
        const inRoot = (cmd: string, args: string[], env: NodeJS.ProcessEnv = {}): Promise<ExecResult> =>
          w.ns.exec('nsenter', ['-t', String(root.pid), '-m', '--', cmd, ...args], {
            env: {
              PORTFLIP_STATE_DIR: w.dirs.stateDir,
              PORTFLIP_RUN_DIR: w.dirs.runDir,
              PORTFLIP_PRELOAD_DIR: w.dirs.preloadDir,
              ...env,
            },
            timeoutMs: 120_000,
          });
        try {
          // --path-include: a slim image's dpkg.cfg.d may leave out /usr/share/man; this checks what the .deb holds
          const inst = await inRoot('dpkg', ['--path-include=*', '-i', built.deb], {
            DEBIAN_FRONTEND: 'noninteractive',
          });
          assert.is(inst.code, 0, show(inst));
          const v = await inRoot('/usr/bin/portflip', ['--version']);
          assert.is(v.code, 0, show(v));
          assert.match(
            v.stdout,
            new RegExp(`^${built.version.replaceAll('.', '\\.')} \\(commit [0-9a-f]{12}(-dirty)?\\)\\n$`),
          );
          const man = await inRoot('man', ['-w', 'portflip']);
          assert.is(man.stdout.trim(), '/usr/share/man/man1/portflip.1.gz', show(man));
          const listed = await inRoot('dpkg', ['-L', 'portflip']);
          for (const f of [
            '/usr/share/bash-completion/completions/portflip',
            '/usr/lib/systemd/system/portflip@.service',
            '/usr/lib/systemd/system/portflip-restore.service',
            '/usr/lib/systemd/system/portflip-watch.service',
          ]) {
            assert.ok(listed.stdout.split('\n').includes(f), `${f} is the package's: ${listed.stdout}`);
            assert.is((await inRoot('test', ['-s', f])).code, 0, `${f} installed`);
          }
          const s = await inRoot('dpkg', ['-s', 'portflip']);
          assert.match(s.stdout, /^Status: install ok installed$/m, show(s));
          assert.match(s.stdout, /^Depends: iptables, iproute2$/m);
          assert.not.match(s.stdout, /nodejs/);
          // no unit enabled and no conffile: the install wrote nothing under /etc
          const etc = execFileSync('find', [path.join(base, 'up', 'etc'), '-mindepth', '1'], { encoding: 'utf8' });
          assert.is(etc, '', `written under /etc: ${etc}`);

          // the installed program deploys for real, a first instance and a switch
          const ports = await freePorts(2);
          for (const v of ['v1', 'v2']) {
            const d = await inRoot('/usr/bin/portflip', [
              'deploy',
              'web',
              '--listen',
              '80',
              '--ports',
              ports.join(','),
              '--',
              process.execPath,
              fixture('plain-app.mjs'),
              v,
            ]);
            assert.is(d.code, 0, show(d));
            assert.is(await get(w.ns, 'http://127.0.0.1:80/'), v);
          }
          const stop = await inRoot('/usr/bin/portflip', ['stop', 'web']);
          assert.is(stop.code, 0, show(stop));

          const rm = await inRoot('dpkg', ['-r', 'portflip']);
          assert.is(rm.code, 0, show(rm));
          for (const f of [
            '/usr/bin/portflip',
            '/usr/share/man/man1/portflip.1.gz',
            '/usr/lib/systemd/system/portflip@.service',
          ])
            assert.is.not((await inRoot('test', ['-e', f])).code, 0, `${f} removed`);
          assert.is.not((await inRoot('dpkg', ['-s', 'portflip'])).code, 0, 'dpkg forgot it');
        } finally {
          root.kill('SIGKILL');
          await new Promise((r) =>
            root.exitCode !== null || root.signalCode !== null ? r(null) : root.once('exit', r),
          );
        }
      });
    } finally {
      rmSync(base, { recursive: true, force: true });
    }
    assert.equal(hostView(), before, "the host's dpkg database and /usr are as they were");
    assert.ok(
      readdirSync(tmpdir()).every((f) => !f.startsWith(path.basename(base))),
      'the throwaway root is gone',
    );
  },
  test,
);

test.run();
