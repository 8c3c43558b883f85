// Fleets for real: the rolling deploy stops once two of three hosts failed, before touching the third (own file: time).

import { suite } from 'uvu';
import * as assert from 'uvu/assert';
import type { Fleet } from '../helpers/fleet.js';
import { byHost, fleetSkip, playbook, served, startFleet, underLoad } from '../helpers/fleet-play.js';
import { testUnless } from '../helpers/skip.js';

const test = suite('fleet: stop');
let fleet: Fleet;

test.before(async () => {
  if (!fleetSkip) fleet = await startFleet();
});
test.after(async () => {
  await fleet?.destroy();
});

testUnless(
  fleetSkip,
  'with two of three hosts failing, the play stops before touching the third',
  async () => {
    const {
      value: { r, summary, out },
      load,
    } = await underLoad(fleet, () => playbook(fleet, { app_version: 'v2', bad_hosts: ['h1', 'h2'] }));
    assert.is.not(r.code, 0, out);
    assert.is(load.failed, 0, JSON.stringify(load));
    const res = byHost(summary);
    assert.is(res.h1.failed, true);
    assert.is(res.h2.failed, true);
    assert.equal(summary.untouched, ['h3'], out);
    for (const h of fleet.hosts) assert.is(await served(h), 'v1', `${h.name} still serves v1`);
    assert.equal([res.h1.version_after, res.h2.version_after], ['v1', 'v1']);
    const st = JSON.parse((await fleet.hosts[2].pf(['status', 'web', '--json'])).stdout);
    assert.is(st.apps[0].active.port, 8001, 'h3 still runs its first instance');
    assert.match(r.stdout, /h3: not deployed \(the rollout stopped first\)/);
  },
  test,
);

test.run();
