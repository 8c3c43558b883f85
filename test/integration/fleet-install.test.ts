// The role's install paths for real, on namespace hosts that reach no registry: the executable copied from the
// controller (the default) to a host where node and npm do not run, and the source built there by provision.sh.

import { existsSync, mkdtempSync, readdirSync, readFileSync, realpathSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { suite } from 'uvu';
import * as assert from 'uvu/assert';
import { builtExecutable, noNodeFiles } from '../helpers/executable.js';
import { createFleet, type Fleet } from '../helpers/fleet.js';
import { fixture } from '../helpers/netns.js';
import { byHost, fleetSkip, playbook, served } from '../helpers/fleet-play.js';
import { testUnless } from '../helpers/skip.js';

const test = suite('fleet: install');
let fleet: Fleet | undefined;
const prefix = mkdtempSync(path.join(tmpdir(), 'portflip-role-install-'));

test.after(async () => {
  await fleet?.destroy();
  rmSync(prefix, { recursive: true, force: true });
});

testUnless(
  fleetSkip,
  'portflip_install (default): the executable built on the controller is copied to a host with no node, npm or registry, and deploys',
  async () => {
    const built = await builtExecutable();
    const files = noNodeFiles();
    try {
      fleet = await createFleet(1, { noNode: files });
      const host = fleet.hosts[0];
      const registry = await host.ns.exec(process.execPath, [
        '-e',
        "fetch('https://registry.npmjs.org/', { signal: AbortSignal.timeout(3000) }).then(() => process.exit(0), () => process.exit(1))",
      ]);
      assert.is(registry.code, 1, 'the host reaches no registry');
      const bin = path.join(prefix, 'exe', 'portflip');
      const { r, summary, out } = await playbook(fleet, {
        app_version: 'v1',
        portflip_install: true,
        portflip_install_apt: false, // .ci/run installs iptables and iproute2; the host reaches no mirror
        portflip_artifact: built.exe,
        portflip_bin: bin,
        portflip_command: [files.appNode, fixture('app.mjs'), '--port', '{port}', '--version', 'v1'],
      });
      assert.is(r.code, 0, out);
      assert.ok(readFileSync(bin).equals(readFileSync(built.exe)), 'the executable as built');
      assert.not.ok(existsSync(path.join(prefix, 'opt/portflip')), 'nothing built on the host');
      const h1 = byHost(summary).h1;
      assert.is(Number(h1.exit), 0, out);
      assert.is(h1.version_after, 'v1');
      assert.is(await served(host), 'v1');
      // the executable (not the npm build) ran the deploy: it wrote its drain module for the Node app
      assert.equal(readdirSync(host.dirs.preloadDir).filter((f) => f.startsWith('node-drain-')).length, 1);
    } finally {
      await fleet?.destroy();
      fleet = undefined;
      rmSync(files.base, { recursive: true, force: true });
    }
  },
  test,
);

testUnless(
  fleetSkip,
  'portflip_install_method: source: the role installs portflip with provision.sh --no-sample, and the installed binary does a first deploy',
  async () => {
    fleet = await createFleet(1);
    const bin = path.join(prefix, 'usr/local/bin/portflip');
    const { r, summary, out } = await playbook(fleet, {
      app_version: 'v1',
      portflip_install: true,
      portflip_install_method: 'source',
      portflip_install_apt: false, // .ci/run installs what the host needs; the role must not reach for apt here
      portflip_install_environment: { npm_config_prefer_offline: 'true' },
      portflip_prefix: prefix,
      portflip_src_dir: path.join(prefix, 'src'),
      portflip_pack: path.join(prefix, 'portflip-src.tar.gz'),
      portflip_bin: bin,
    });
    assert.is(r.code, 0, out);
    assert.is(realpathSync(bin), path.join(prefix, 'opt/portflip/dist/src/main.cjs'));
    assert.ok(existsSync(path.join(prefix, 'opt/portflip/node_modules/yargs')), 'runtime dependencies installed');
    assert.not.ok(existsSync(path.join(prefix, 'srv/portflip-sample')), '--no-sample: no sample app');
    assert.not.ok(existsSync(path.join(prefix, 'etc/systemd/system/portflip-sample.service')), '--no-sample: no unit');
    const h1 = byHost(summary).h1;
    assert.is(Number(h1.exit), 0);
    assert.is(h1.version_before, 'unreachable', 'a first deploy: nothing answered before');
    assert.is(h1.version_after, 'v1');
    assert.is(await served(fleet.hosts[0]), 'v1');
  },
  test,
);

test.run();
