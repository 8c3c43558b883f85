// Fleets for real: ansible/rolling-deploy.yml over ssh to three namespace hosts behind HAProxy, under load through HAProxy.

import { suite } from 'uvu';
import * as assert from 'uvu/assert';
import type { Fleet } from '../helpers/fleet.js';
import { byHost, fleetSkip, playbook, served, startFleet, underLoad } from '../helpers/fleet-play.js';
import { testUnless } from '../helpers/skip.js';

const test = suite('fleet: rolling deploy');
let fleet: Fleet;

test.before(async () => {
  if (!fleetSkip) fleet = await startFleet();
});
test.after(async () => {
  await fleet?.destroy();
});

testUnless(
  fleetSkip,
  'rolling deploy v1 -> v2 (with --verify) over three hosts through HAProxy: 0 failed requests, a summary from the JSON events',
  async () => {
    const {
      value: { r, summary, out },
      load,
    } = await underLoad(fleet, () => playbook(fleet, { app_version: 'v2', portflip_verify: '1s' }));
    assert.is(r.code, 0, out);
    assert.is(load.failed, 0, JSON.stringify(load));
    assert.ok(load.ok > 50, `load ran: ${JSON.stringify(load)}`);
    assert.ok(load.versions.includes('v1') && load.versions.includes('v2'), `both versions answered: ${load.versions}`);
    const res = byHost(summary);
    for (const h of fleet.hosts) {
      assert.is(await served(h), 'v2', h.name);
      assert.is(res[h.name].version_before, 'v1');
      assert.is(res[h.name].version_after, 'v2');
      assert.is(Number(res[h.name].exit), 0);
      for (const step of ['preflight', 'start', 'ready', 'switch', 'verify', 'drain', 'done']) {
        assert.type(res[h.name].steps[step], 'number', `${h.name} ${step}`);
      }
      assert.ok(res[h.name].steps.verify >= 1000, '--verify 1s was passed on');
    }
    assert.equal(summary.untouched, []);
    assert.match(r.stdout, /h1: ok, v1 -> v2, exit 0, preflight [\d.]+s/);
    // serial [1, 50%] over three hosts: three batches of one host, each with its own PLAY header
    assert.is(r.stdout.match(/^PLAY \[portflip rolling deploy\] \*/gm)?.length, 3, out);
  },
  test,
);

testUnless(
  fleetSkip,
  'a host whose new version never gets ready keeps the old one, and the play goes on to the next host',
  async () => {
    const {
      value: { r, summary, out },
      load,
    } = await underLoad(fleet, () =>
      playbook(fleet, { app_version: 'v3', bad_hosts: ['h2'], portflip_max_fail_percentage: 33 }),
    );
    assert.is.not(r.code, 0, `the play reports the failed host\n${out}`);
    assert.is(load.failed, 0, JSON.stringify(load));
    const res = byHost(summary);
    assert.is(await served(fleet.hosts[0]), 'v3');
    assert.is(await served(fleet.hosts[1]), 'v2', 'h2 keeps serving its old version');
    assert.is(await served(fleet.hosts[2]), 'v3', 'the play went on after h2 failed');
    assert.is(res.h2.failed, true);
    assert.is(Number(res.h2.exit), 1);
    assert.is(res.h2.version_before, 'v2');
    assert.is(res.h2.version_after, 'v2');
    assert.match(res.h2.error, /ready|never|timed out|deadline/i);
    assert.is(res.h3.version_after, 'v3');
    assert.match(r.stdout, /h2: FAILED, v2 -> v2, exit 1/);
  },
  test,
);

test.run();
