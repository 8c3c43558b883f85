// The release artifacts (npm run package): the .deb's contents, and the single executable doing deploys under
// load on a "host" with no Node.js, a mount namespace where node, npm, npx and corepack do not run.
// The app behind it is a Node app all the same (plain-app.mjs, whose SIGTERM is server.close(), so keep-alive
// clients fail unless the drain module is in it), started by an absolute path that is bound to the real node
// before the hiding: what portflip needs from the host is tested, not what the app needs.

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import {
  builtExecutable,
  hideNodeScript,
  noNodeExec,
  noNodeFiles,
  type Built,
  type NoNodeFiles,
} from '../helpers/executable.js';
import { fixture, freePorts, startLoad, type ExecResult } from '../helpers/netns.js';
import { inWorld, show, type World } from '../helpers/world.js';
import { events } from '../helpers/events.js';

const PLAIN = fixture('plain-app.mjs');
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
let built: Built;

test.before(async () => {
  built = await builtExecutable();
});

test('package: the executable says its version and commit from any directory; SHA256SUMS checks; the .deb', async () => {
  const commit = execFileSync('git', ['rev-parse', '--short=12', 'HEAD'], { encoding: 'utf8' }).trim();
  const v = execFileSync(built.exe, ['--version'], {
    cwd: '/',
    encoding: 'utf8',
    env: { ...process.env, PATH: '/usr/bin:/bin' },
  });
  assert.match(v, new RegExp(`^${built.version.replaceAll('.', '\\.')} \\(commit ${commit}(-dirty)?\\)\\n$`));
  execFileSync('sha256sum', ['--quiet', '-c', 'SHA256SUMS'], { cwd: built.dir });

  const field = (name: string) => execFileSync('dpkg-deb', ['-f', built.deb, name], { encoding: 'utf8' }).trim();
  assert.is(field('Package'), 'portflip');
  assert.is(field('Version'), built.version);
  assert.is(field('Depends'), 'iptables, iproute2');
  assert.is(field('Recommends'), 'conntrack');
  const files = execFileSync('dpkg-deb', ['-c', built.deb], { encoding: 'utf8' });
  for (const f of [
    './usr/bin/portflip',
    './usr/lib/systemd/system/portflip@.service',
    './usr/lib/systemd/system/portflip-restore.service',
    './usr/lib/systemd/system/portflip-watch.service',
    './usr/share/bash-completion/completions/portflip',
    './usr/share/man/man1/portflip.1.gz',
  ])
    assert.ok(files.includes(` ${f}\n`), `${f} in the .deb:\n${files}`);
  const x = mkdtempSync(path.join(tmpdir(), 'portflip-deb-'));
  try {
    execFileSync('dpkg-deb', ['-x', built.deb, x]);
    assert.ok(
      readFileSync(path.join(x, 'usr/bin/portflip')).equals(readFileSync(built.exe)),
      'the .deb carries the same executable',
    );
    const unit = readFileSync(path.join(x, 'usr/lib/systemd/system/portflip@.service'), 'utf8');
    assert.match(unit, /^ExecStart=\/usr\/bin\/portflip run %i$/m);
    assert.match(
      readFileSync(path.join(x, 'usr/share/bash-completion/completions/portflip'), 'utf8'),
      /portflip --get-yargs-completions/,
    );
    const man = execFileSync('sh', ['-c', `gzip -dc ${x}/usr/share/man/man1/portflip.1.gz`], { encoding: 'utf8' });
    assert.match(man, /^\.TH PORTFLIP 1 /);
    for (const cmd of ['deploy', 'pause', 'agent', 'systemd'])
      assert.match(man, new RegExp(`^\\.SS ${cmd}$`, 'm'), `${cmd} in the man page`);
    assert.match(man, /--drain-timeout/, "deploy's options are in it");
  } finally {
    rmSync(x, { recursive: true, force: true });
  }
});

const exePf = (w: World, files: NoNodeFiles, args: string[]): Promise<ExecResult> => noNodeExec(w, built, files, args);

test('no Node.js on the host: the executable runs 3 deploys under keep-alive load over veth, 0 failed; the Node app gets the drain module', async () => {
  const files = noNodeFiles();
  try {
    await inWorld(
      async (w) => {
        const hidden = await exePf(w, files, ['status']);
        assert.is(hidden.code, 0, show(hidden));
        const nodeThere = await w.ns.exec(
          'unshare',
          ['-m', 'sh', '-c', hideNodeScript(), 'sh', 'sh', '-c', 'node -e 0'],
          {
            env: { PF_APP_NODE: files.appNode, PF_EMPTY: files.empty },
          },
        );
        assert.is.not(nodeThere.code, 0, 'node does not run in the namespace the executable runs in');
        const ports = await freePorts(2);
        const deploy = (v: string) =>
          exePf(w, files, [
            'deploy',
            'web',
            '--listen',
            '80',
            '--ports',
            ports.join(','),
            '--json',
            '--',
            files.appNode,
            PLAIN,
            v,
          ]);
        const first = await deploy('v1');
        assert.is(first.code, 0, show(first));
        const load = await startLoad(w.ns, 'client', {
          url: `http://${w.ns.serverAddr}:80/`,
          mode: 'keepalive',
          concurrency: 4,
          durationMs: 30_000,
        });
        for (const v of ['v2', 'v3']) {
          await sleep(1500);
          const r = await deploy(v);
          assert.is(r.code, 0, show(r));
          const ev = events(r.stdout);
          const ready = ev.find((e) => e.kind === 'step' && e.step === 'ready')!;
          assert.match(ready.detail, /^node-drain loaded in pid \d+ \(node\)$/, ready.detail);
          const sig = ev.find((e) => e.kind === 'signal')!;
          assert.is(sig.reason, 'stop; the Node drain module handles keep-alive');
        }
        await sleep(1000);
        const res = await load.stop();
        assert.is(res.failed, 0, JSON.stringify(res));
        assert.ok(res.ok > 300, `enough requests ran: ${res.ok}`);
        assert.equal([...new Set(res.versions)], ['v1', 'v2', 'v3']);
        // the drain module came out of the executable, content-named, readable by any app user
        const drain = readdirSync(w.dirs.preloadDir).filter((f) => /^node-drain-[0-9a-f]{12}\.cjs$/.test(f));
        assert.is(drain.length, 1, readdirSync(w.dirs.preloadDir).join(' '));
        const st = await exePf(w, files, ['status', 'web']);
        assert.is(st.code, 0, show(st));
        assert.match(st.stdout + st.stderr, /v3|active/);
      },
      { peer: true },
    );
  } finally {
    rmSync(files.base, { recursive: true, force: true });
  }
});

test('no Node.js on the host: an in-place deploy holds new connections with the holder and koffi from the executable, 0 failed', async () => {
  const files = noNodeFiles();
  try {
    await inWorld(
      async (w) => {
        const [port] = await freePorts(1);
        const deploy = (v: string, extra: string[] = []) =>
          exePf(w, files, [
            'deploy',
            'web',
            '--listen',
            '80',
            '--ports',
            String(port),
            '--json',
            ...extra,
            '--',
            files.appNode,
            PLAIN,
            v,
          ]);
        const first = await deploy('v1');
        assert.is(first.code, 0, show(first));
        const load = await startLoad(w.ns, 'client', {
          url: `http://${w.ns.serverAddr}:80/`,
          mode: 'new',
          concurrency: 4,
          durationMs: 30_000,
        });
        await sleep(500);
        const r = await deploy('v2');
        assert.is(r.code, 0, show(r));
        const steps = events(r.stdout)
          .filter((e) => e.kind === 'step')
          .map((e) => e.step);
        assert.ok(steps.includes('hold') && steps.includes('release'), steps.join(' '));
        await sleep(500);
        const res = await load.stop();
        assert.is(res.failed, 0, JSON.stringify(res));
        assert.equal([...new Set(res.versions)], ['v1', 'v2']);
        // koffi's module was written once, by content, under the state dir, and it is the one the executable carries
        const lib = path.join(w.dirs.stateDir, 'lib');
        const [hash, ...more] = readdirSync(lib);
        assert.is(more.length, 0);
        const so = path.join(lib, hash, 'koffi.node');
        assert.ok(existsSync(so));
        const sum = execFileSync('sha256sum', [so], { encoding: 'utf8' }).split(' ')[0];
        assert.is(sum, hash);
        // pause and resume: the holder again, as `portflip pause` starts it
        const p = await exePf(w, files, ['pause', 'web', '--timeout', '20s']);
        assert.is(p.code, 0, show(p));
        const rs = await exePf(w, files, ['resume', 'web']);
        assert.is(rs.code, 0, show(rs));
      },
      { peer: true },
    );
  } finally {
    rmSync(files.base, { recursive: true, force: true });
  }
});

test('the executable writes systemd units that start it alone, not node and a script', async () => {
  const unit = execFileSync(built.exe, ['systemd', 'web'], { encoding: 'utf8' });
  assert.match(unit, new RegExp(`^ExecStart=${built.exe.replaceAll('.', '\\.')} run web$`, 'm'));
});

test.run();
