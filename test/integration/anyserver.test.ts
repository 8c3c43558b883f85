// The servers people run, unchanged, with default flags: keep-alive clients lose nothing across 3 deploys.
//
// Each server is a Debian package started the way its own docs show (test/fixtures/servers/). Busy keep-alive
// clients send their next request as soon as an answer arrives; idle ones, like a browser's spare
// connections, ask once every few seconds. The drain marks one answer per busy connection Connection: close
// (src/drain/httpmark.ts), and stops the old instance once the idle ones are quiet.

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { freePorts, startLoad, type LoadResult } from '../helpers/netns.js';
import { SERVERS, serverFlags } from '../helpers/servers.js';
import { events, inWorld, show, type World } from './lib.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

const IDLE_PAUSE_MS = 7000; // idle connections ask once in this long: most deploys find them quiet

/**
 * Deploys v1, then v2-v4 while busy and idle keep-alive clients run both over veth (from the client namespace,
 * through PREROUTING) and through loopback (OUTPUT); returns every load's result and the deploys' events.
 */
export async function threeDeploys(w: World, cmd: string[], extra: string[] = []) {
  const ports = await freePorts(2);
  const deploy = (v: string) =>
    w.pf(['deploy', 'web', '--listen', '80', '--ports', ports.join(','), ...serverFlags(v), '--json', ...extra, '--', ...cmd]);
  const first = await deploy('v1');
  assert.is(first.code, 0, show(first));
  const loads = await Promise.all(
    ([['client', w.ns.serverAddr, 16, 100], ['server', '127.0.0.1', 8, 25]] as const).flatMap(([where, host, busy, idle]) => [
      startLoad(w.ns, where, { url: `http://${host}:80/`, mode: 'keepalive', concurrency: busy, durationMs: 90_000, maxRequests: 5_000_000 }),
      startLoad(w.ns, where, { url: `http://${host}:80/`, mode: 'keepalive', concurrency: idle, durationMs: 90_000, maxRequests: 100_000, pauseMs: IDLE_PAUSE_MS }),
    ]),
  );
  const runs: Record<string, any>[][] = [];
  const took: number[] = [];
  let results: LoadResult[] = [];
  try {
    for (const v of ['v2', 'v3', 'v4']) {
      await sleep(1000);
      const t0 = Date.now();
      const r = await deploy(v);
      took.push(Date.now() - t0);
      assert.is(r.code, 0, show(r));
      runs.push(events(r.stdout));
    }
    await sleep(500);
  } finally {
    results = await Promise.all(loads.map((l) => l.stop()));
  }
  const [busyVeth, idleVeth, busyLo, idleLo] = results;
  return { loads: { busyVeth, idleVeth, busyLo, idleLo }, runs, took };
}

for (const s of SERVERS.filter((s) => !process.env.PF_SERVER || s.name.startsWith(process.env.PF_SERVER))) {
  test(`${s.name}: 3 deploys with default flags, busy and idle keep-alive clients over veth and loopback, 0 failed`, async () => {
    await inWorld(async (w) => {
      const { loads, runs } = await threeDeploys(w, s.cmd());
      for (const [name, res] of Object.entries(loads)) {
        assert.is(res.failed, 0, `${name}: ${JSON.stringify(res)}`);
        if (name.startsWith('busy')) {
          assert.ok(res.ok > 200, `${name}: enough requests ran: ${res.ok}`);
          assert.equal([...new Set(res.versions)], ['v1', 'v2', 'v3', 'v4'], `${name}: ${res.versions.join(',')}`);
        }
      }
      for (const [k, ev] of runs.entries()) {
        const marking = ev.find((e) => e.kind === 'marking');
        assert.ok(marking, `deploy ${k + 2} reports its marking: ${JSON.stringify(ev)}`);
        assert.ok(marking.marked >= 1, `busy connections were marked: ${JSON.stringify(marking)}`);
        assert.match(ev.find((e) => e.step === 'drain')!.detail, /answers? marked Connection: close/);
        // the drain ends on its own, never by --drain-timeout (how long deploys take is the benchmark's: npm run bench)
        const signal = ev.find((e) => e.kind === 'signal')!;
        assert.match(signal.reason, /^drained/, JSON.stringify(ev.filter((e) => e.kind !== 'connections')));
      }
    }, { peer: true });
  });
}

test.run();
