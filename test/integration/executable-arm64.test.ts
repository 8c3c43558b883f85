// The other arch's executable (arm64 when the tests run on x64) run for real through qemu-user, on that arch's
// libc from Debian (helpers/executable.ts foreignSysroot): it says its version, deploys in a network namespace,
// and loads its own koffi module. Under emulation a command is some 3-6 s, so this is kept to four of them.

import { suite } from 'uvu';
import * as assert from 'uvu/assert';
import { existsSync, readdirSync } from 'node:fs';
import { execFileSync } from 'node:child_process';
import path from 'node:path';
import { builtExecutable, foreignArch, foreignSysroot } from '../helpers/executable.js';
import { fixture, freePorts } from '../helpers/netns.js';
import { inWorld, get, show } from '../helpers/world.js';
import { testUnless } from '../helpers/skip.js';

const test = suite('foreign arch');
const qemu = ['/usr/bin', '/usr/local/bin'].map((d) => path.join(d, foreignArch.qemu)).find((f) => existsSync(f));

testUnless(
  !qemu && `no ${foreignArch.qemu}: apt-get install qemu-user (.ci/run does)`,
  `the ${foreignArch.deb} executable under ${foreignArch.qemu}: --version, a first deploy and a switch, koffi's module loaded`,
  async () => {
    const built = await builtExecutable();
    const sysroot = foreignSysroot();
    const file = execFileSync('file', ['-b', built.foreignExe], { encoding: 'utf8' });
    assert.match(file, foreignArch.deb === 'arm64' ? /ARM aarch64/ : /x86-64/, file);
    const run = (args: string[]) => [qemu!, '-L', sysroot, built.foreignExe, ...args];
    const v = execFileSync(run(['--version'])[0], run(['--version']).slice(1), { encoding: 'utf8', timeout: 60_000 });
    assert.match(v, new RegExp(`^${built.version.replaceAll('.', '\\.')} \\(commit [0-9a-f]{12}(-dirty)?\\)\\n$`));

    await inWorld(async (w) => {
      const env = {
        PORTFLIP_STATE_DIR: w.dirs.stateDir,
        PORTFLIP_RUN_DIR: w.dirs.runDir,
        PORTFLIP_PRELOAD_DIR: w.dirs.preloadDir,
      };
      const pf = (args: string[]) => {
        const [cmd, ...rest] = run(args);
        return w.ns.exec(cmd, rest, { env, timeoutMs: 90_000 });
      };
      // iptables, ip and the app are the host's own programs: the emulated portflip starts them natively
      const ports = await freePorts(2);
      for (const version of ['v1', 'v2']) {
        const d = await pf([
          'deploy',
          'web',
          '--listen',
          '80',
          '--ports',
          ports.join(','),
          '--',
          process.execPath,
          fixture('plain-app.mjs'),
          version,
        ]);
        assert.is(d.code, 0, show(d));
        assert.is(await get(w.ns, 'http://127.0.0.1:80/'), version);
      }
      // The holder loads koffi (written out of the executable, then dlopened: an arm64 .so in an arm64 process).
      // qemu-user translates only a few netlink families, not netfilter's, so its NFQUEUE socket then fails with
      // EPROTONOSUPPORT (errno 93): that error, after the load, is the proof the module loaded and ran.
      const h = await pf(['_holder', '9', '64', '1000', path.join(w.dirs.runDir, 'h.sock')]);
      assert.match(h.stderr, /netlink socket: errno 93\b/, show(h));
      const lib = path.join(w.dirs.stateDir, 'lib');
      const [hash] = readdirSync(lib);
      const so = path.join(lib, hash, 'koffi.node');
      assert.match(
        execFileSync('file', ['-b', so], { encoding: 'utf8' }),
        foreignArch.deb === 'arm64' ? /ARM aarch64/ : /x86-64/,
      );
      assert.is(execFileSync('sha256sum', [so], { encoding: 'utf8' }).split(' ')[0], hash);
    });
  },
  test,
);

test.run();
