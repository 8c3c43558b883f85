// The role's install path for real: ansible-playbook packs this checkout, provision.sh builds it on a namespace host, then deploys.

import { existsSync, mkdtempSync, realpathSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { suite } from 'uvu';
import * as assert from 'uvu/assert';
import { createFleet, type Fleet } from '../helpers/fleet.js';
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
  'portflip_install: the role installs portflip with provision.sh --no-sample, and the installed binary does a first deploy',
  async () => {
    fleet = await createFleet(1);
    const bin = path.join(prefix, 'usr/local/bin/portflip');
    const { r, summary, out } = await playbook(fleet, {
      app_version: 'v1',
      portflip_install: true,
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
