// Hosts with a firewall: redirected traffic passes default-deny rulesets, instance ports stay private, and a
// firewall reload is healed within a second or two.

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fixture, freePorts, startLoad, waitFor, type LoadHandle } from '../helpers/netns.js';
import { inWorld, deployArgs, show, get, type World } from '../helpers/world.js';
import { events } from '../helpers/events.js';
import { needsRoot, testUnless } from '../helpers/skip.js';

/** What `ufw default deny incoming; ufw allow 80/tcp; ufw enable` leaves, reduced to its effect. */
const UFW_STYLE = (family: 'ipv4' | 'ipv6') =>
  [
    '*filter',
    ':INPUT DROP [0:0]',
    ':FORWARD DROP [0:0]',
    ':OUTPUT ACCEPT [0:0]',
    '-A INPUT -i lo -j ACCEPT',
    '-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT',
    ...(family === 'ipv6' ? ['-A INPUT -p ipv6-icmp -j ACCEPT'] : ['-A INPUT -p icmp -j ACCEPT']),
    '-A INPUT -p tcp -m tcp --dport 80 -j ACCEPT',
    'COMMIT',
    '',
  ].join('\n');

/** A hand-written /etc/nftables.conf that opens only port 80. */
const NFT_DROP = `flush ruleset
table inet filter {
  chain input {
    type filter hook input priority 0; policy drop;
    iif "lo" accept
    ct state established,related accept
    meta l4proto { icmp, ipv6-icmp } accept
    tcp dport 80 accept
  }
}
`;

const loadUp = async (w: World, url: string): Promise<LoadHandle[]> =>
  Promise.all([
    startLoad(w.ns, 'client', { url, mode: 'new', concurrency: 4, durationMs: 60_000, maxRequests: 100_000 }),
    startLoad(w.ns, 'client', { url, mode: 'keepalive', concurrency: 4, durationMs: 60_000, maxRequests: 100_000 }),
  ]);

/** A direct connection from the client namespace: what other hosts get on an instance port. */
const direct = (w: World, port: number) => get(w.ns, `http://${w.ns.serverAddr}:${port}/`, 'client');

/** The filter tables of both families without portflip's lines: what the host's own firewall says. */
const hostFilter = (save: string) =>
  save
    .split(/(?=^\*)/m)
    .filter((t) => t.startsWith('*filter'))
    .join('')
    .split('\n')
    .filter((l) => !/PORTFLIP|PF-/.test(l))
    .join('\n');

async function threeDeploysUnderLoad(w: World, ports: number[], extra: string[] = []): Promise<void> {
  const url = `http://${w.ns.serverAddr}:80/`;
  const first = await w.pf(deployArgs(ports, extra, ['--version', 'v1']));
  assert.is(first.code, 0, show(first));
  assert.is(await get(w.ns, url, 'client'), 'v1', 'a client on another host reaches the app through the firewall');
  const loads = await loadUp(w, url);
  for (const v of ['v2', 'v3']) {
    const r = await w.pf(deployArgs(ports, extra, ['--version', v]));
    assert.is(r.code, 0, show(r));
  }
  for (const res of await Promise.all(loads.map((l) => l.stop()))) {
    assert.is(res.failed, 0, JSON.stringify(res));
    assert.ok(res.ok > 50, `enough requests ran (${res.ok})`);
    assert.is(res.versions.at(-1), 'v3');
  }
}

test('ufw-style default deny: three deploys under load from another host, 0 failed; instance ports private', async () => {
  await inWorld(
    async (w) => {
      for (const [tool, family] of [
        ['iptables-restore', 'ipv4'],
        ['ip6tables-restore', 'ipv6'],
      ] as const) {
        assert.is((await w.ns.exec(tool, [], { input: UFW_STYLE(family) })).code, 0);
      }
      const before = hostFilter(await w.save());
      const ports = await freePorts(2);
      await threeDeploysUnderLoad(w, ports);
      assert.is(hostFilter(await w.save()), before, 'the host firewall is byte for byte what it was');
      const st = JSON.parse((await w.pf(['status', '--json'])).stdout);
      assert.is(st.apps[0].firewall, 'ok');
      assert.type(st.conntrack.max, 'number');
      const active = st.apps[0].active.port as number;
      // other hosts cannot reach instance ports directly; this host can
      for (const p of ports) assert.match(await direct(w, p), /^ERR /, `direct ${p} from another host`);
      assert.is(await get(w.ns, `http://127.0.0.1:${active}/`), 'v3', 'loopback to the instance port');
      assert.is(await get(w.ns, `http://[${w.ns.serverAddr6}]:80/`, 'client'), 'v3', 'IPv6 from another host');
      // the drained port left the filter chain; only the active one is accepted
      assert.match(await w.save(), new RegExp(`--ctreplsrcport ${active} -j ACCEPT`));
      assert.not.match(await w.save(), new RegExp(`--ctreplsrcport ${ports.find((p) => p !== active)} `));
      const stop = await w.pf(['stop', 'web']);
      assert.is(stop.code, 0, show(stop));
      assert.not.match(await w.save(), /PORTFLIP|PF-/, 'stop removes the filter chain too');
      assert.is(hostFilter(await w.save()), before);
    },
    { peer: true },
  );
});

testUnless(
  needsRoot('ufw writes /etc/ufw') || (!existsSync('/usr/sbin/ufw') && 'needs ufw; CI installs it'),
  'real ufw (default deny incoming, allow 80/tcp): deploys under load from another host, 0 failed',
  async () => {
    // ufw writes /etc/ufw even when it runs in a namespace: keep a copy and put it back whatever happens
    const backup = mkdtempSync(join(tmpdir(), 'pf-ufw-'));
    const putBack = () => execFileSync('sh', ['-c', `rm -rf /etc/ufw && cp -a ${backup}/ufw /etc/ufw`]);
    execFileSync('cp', ['-a', '/etc/ufw', backup]);
    process.once('exit', putBack);
    try {
      await inWorld(
        async (w) => {
          const on = await w.sh(
            'ufw --force reset && ufw default deny incoming && ufw allow 80/tcp && ufw --force enable',
          );
          assert.is(on.code, 0, show(on));
          const before = hostFilter(await w.save());
          assert.match(before, /:INPUT DROP/);
          const ports = await freePorts(2);
          await threeDeploysUnderLoad(w, ports);
          for (const p of ports) assert.match(await direct(w, p), /^ERR /, `direct ${p} from another host`);
          assert.is(hostFilter(await w.save()), before, "ufw's rules are byte for byte what they were");
          const reload = await w.sh('ufw reload');
          assert.is(reload.code, 0, show(reload));
          assert.is(
            await get(w.ns, `http://${w.ns.serverAddr}:80/`, 'client'),
            'v3',
            'ufw reload leaves portflip in place',
          );
        },
        { peer: true },
      );
    } finally {
      putBack();
      process.off('exit', putBack);
      rmSync(backup, { recursive: true, force: true });
    }
  },
);

test('--expose-ports lets other hosts reach instance ports; --allow-from limits who gets through the public port', async () => {
  await inWorld(
    async (w) => {
      const ports = await freePorts(2);
      const url = `http://${w.ns.serverAddr}:80/`;
      const activePort = async () =>
        JSON.parse((await w.pf(['status', '--json'])).stdout).apps[0].active.port as number;
      let r = await w.pf(deployArgs(ports, [], ['--version', 'v0']));
      assert.is(r.code, 0, show(r));
      assert.is(
        await direct(w, await activePort()),
        'ERR ECONNREFUSED',
        'private by default, even with no host firewall',
      );
      r = await w.pf(deployArgs(ports, ['--expose-ports'], ['--version', 'v1']));
      assert.is(r.code, 0, show(r));
      assert.is(await direct(w, await activePort()), 'v1', 'exposed');
      assert.is((await w.ns.exec('iptables-restore', [], { input: UFW_STYLE('ipv4') })).code, 0);
      r = await w.pf(deployArgs(ports, ['--allow-from', '192.0.2.0/24'], ['--version', 'v2']));
      assert.is(r.code, 0, show(r));
      assert.match(await get(w.ns, url, 'client'), /^ERR /, 'a client outside the allowed network');
      assert.is(await get(w.ns, 'http://127.0.0.1:80/'), 'v2', 'this host always passes');
      r = await w.pf(deployArgs(ports, ['--allow-from', `${w.ns.clientAddr}/32`], ['--version', 'v3']));
      assert.is(r.code, 0, show(r));
      assert.is(await get(w.ns, url, 'client'), 'v3', 'a client inside the allowed network');
      const bad = await w.pf(deployArgs(ports, ['--allow-from', '10.0.0.300/8'], ['--version', 'v4']));
      assert.is(bad.code, 2, show(bad));
      assert.match(bad.stderr, /--allow-from 10\.0\.0\.300\/8: not an address/);
    },
    { peer: true },
  );
});

test('an nftables policy-drop ruleset that opens only tcp 80: deploys under load from another host, 0 failed', async () => {
  await inWorld(
    async (w) => {
      assert.is((await w.ns.exec('nft', ['-f', '-'], { input: NFT_DROP })).code, 0);
      const theirs = async () =>
        (await w.ns.exec('nft', ['list', 'table', 'inet', 'filter'])).stdout
          .split('\n')
          .filter((l) => !l.includes('portflip'));
      const before = await theirs();
      const ports = await freePorts(2);
      await threeDeploysUnderLoad(w, ports);
      assert.match(
        (await w.ns.exec('nft', ['list', 'chain', 'inet', 'filter', 'input'])).stdout,
        /ct status dnat ct original proto-dst 80 accept comment "portflip:web/,
      );
      assert.equal(await theirs(), before, 'their rules are untouched');
      assert.is(JSON.parse((await w.pf(['status', '--json'])).stdout).apps[0].firewall, 'ok');
      assert.is((await w.pf(['stop', 'web'])).code, 0);
      assert.not.match(
        (await w.ns.exec('nft', ['list', 'ruleset'])).stdout,
        /portflip|PF-/,
        'stop takes the accept away',
      );
    },
    { peer: true },
  );
});

test('--firewall off: nothing in filter, and preflight warns with the command that would fix it', async () => {
  await inWorld(
    async (w) => {
      assert.is((await w.ns.exec('iptables-restore', [], { input: UFW_STYLE('ipv4') })).code, 0);
      const ports = await freePorts(2);
      const r = await w.pf(deployArgs(ports, ['--firewall', 'off', '--ipv6', 'off'], ['--version', 'v1']));
      assert.is(r.code, 0, show(r));
      assert.match(
        r.stderr,
        /--firewall off: iptables's INPUT drops .* Fix: iptables -I INPUT -p tcp -m conntrack --ctstate DNAT --ctorigdstport 80 -j ACCEPT/,
      );
      const filter = (await w.ns.exec('iptables-save', ['-t', 'filter'])).stdout;
      assert.not.match(filter, /PORTFLIP|PF-/);
      assert.is(JSON.parse((await w.pf(['status', '--json'])).stdout).apps[0].firewall, 'off');
      // and the warning was right: other hosts get nothing
      assert.match(await get(w.ns, `http://${w.ns.serverAddr}:80/`, 'client'), /^ERR /);
    },
    { peer: true },
  );
});

/** Runs `portflip run` and a load from the client while `wipe` runs; returns how long the public port was dead. */
async function deadTimeAfter(w: World, wipe: string): Promise<number> {
  const ports = await freePorts(2);
  const sup = w.pfSpawn([
    'run',
    'web',
    '--json',
    '--listen',
    '80',
    '--ports',
    ports.join(','),
    '--',
    process.execPath,
    fixture('app.mjs'),
    '--port',
    '{port}',
    '--version',
    'v1',
  ]);
  let out = '';
  sup.stdout!.on('data', (d) => (out += d));
  try {
    await waitFor(() => out.includes('"step":"done"'), 20_000, `the first deploy\n${out}`);
    const url = `http://${w.ns.serverAddr}:80/`;
    assert.is(await get(w.ns, url, 'client'), 'v1');
    // a probe every 20 ms from the other host; dead time is the span with no answer
    const probe = w.ns.spawnClient(process.execPath, [
      '-e',
      `
      const http = require('node:http');
      let lastOk = Date.now(), worst = 0, n = 0;
      const tick = () => {
        const req = http.get(${JSON.stringify(url)}, { agent: false, timeout: 300 }, (r) => { r.resume(); r.on('end', () => {
          worst = Math.max(worst, Date.now() - lastOk); lastOk = Date.now(); next(); }); });
        req.on('timeout', () => req.destroy(new Error('timeout')));
        req.on('error', () => next());
      };
      const next = () => (++n < 400 ? setTimeout(tick, 20) : (console.log(Math.max(worst, Date.now() - lastOk)), process.exit(0)));
      tick();
      process.stdin.on('data', () => { console.log(Math.max(worst, Date.now() - lastOk)); process.exit(0); });
    `,
    ]);
    let probeOut = '';
    probe.stdout!.on('data', (d) => (probeOut += d));
    await new Promise((r) => setTimeout(r, 500));
    const wiped = await w.sh(wipe);
    assert.is(wiped.code, 0, show(wiped));
    await waitFor(() => /"step":"repair"/.test(out), 5000, `a repair event\n${out}`);
    await new Promise((r) => setTimeout(r, 1000));
    probe.stdin!.write('stop\n');
    await waitFor(() => probeOut.trim() !== '', 10_000, 'the probe result');
    const repairs = events(
      out
        .split('\n')
        .filter((l) => l.includes('"repair"'))
        .join('\n'),
    );
    assert.ok(
      repairs.some((e) => e.missing?.length),
      `the repair says what was missing: ${JSON.stringify(repairs)}`,
    );
    assert.is(await get(w.ns, url, 'client'), 'v1');
    return Number(probeOut.trim());
  } finally {
    sup.kill('SIGKILL');
  }
}

test('under portflip run, `nft flush ruleset` is healed: the public port is back within 2 s', async () => {
  await inWorld(
    async (w) => {
      const dead = await deadTimeAfter(w, 'nft flush ruleset');
      console.log(`  public port dead for ${dead} ms after nft flush ruleset`);
      assert.ok(dead < 2000, `dead for ${dead} ms`);
    },
    { peer: true },
  );
});

test('under portflip run, iptables-restore of a saved ruleset without portflip is healed within 2 s', async () => {
  await inWorld(
    async (w) => {
      const saved =
        UFW_STYLE('ipv4') +
        '*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n';
      assert.is((await w.ns.exec('iptables-restore', [], { input: UFW_STYLE('ipv4') })).code, 0);
      const dead = await deadTimeAfter(w, `printf '%s' '${saved}' | iptables-restore`);
      console.log(`  public port dead for ${dead} ms after iptables-restore of a saved ruleset`);
      assert.ok(dead < 2000, `dead for ${dead} ms`);
    },
    { peer: true },
  );
});

test('portflip watch heals apps deployed with the plain CLI', async () => {
  await inWorld(async (w) => {
    const ports = await freePorts(2);
    assert.is((await w.pf(deployArgs(ports, [], ['--version', 'v1']))).code, 0);
    const watcher = w.pfSpawn(['watch', '--json']);
    let out = '';
    watcher.stdout!.on('data', (d) => (out += d));
    try {
      await new Promise((r) => setTimeout(r, 300));
      await w.sh('iptables -t nat -F PF-web; iptables -F PF-web');
      await waitFor(async () => (await get(w.ns, 'http://127.0.0.1:80/')) === 'v1', 3000, 'the redirect back');
      await waitFor(() => /"step":"repair"/.test(out), 3000, `a repair event\n${out}`);
      const ev = events(
        out
          .split('\n')
          .filter((l) => l.includes('"repair"'))
          .join('\n'),
      );
      assert.ok(
        ev.some((e) => e.missing.some((m: string) => m.startsWith('nat: redirect'))),
        JSON.stringify(ev),
      );
      assert.is(JSON.parse((await w.pf(['status', '--json'])).stdout).apps[0].firewall, 'ok');
    } finally {
      watcher.kill('SIGKILL');
    }
  });
});

test('SIGKILLed right after the switch behind a default-deny firewall: nothing dropped, the next run closes the old port', async () => {
  await inWorld(
    async (w) => {
      assert.is((await w.ns.exec('iptables-restore', [], { input: UFW_STYLE('ipv4') })).code, 0);
      const ports = await freePorts(2);
      const url = `http://${w.ns.serverAddr}:80/`;
      assert.is((await w.pf(deployArgs(ports, ['--ipv6', 'off', '--kill-after', '3s'], ['--version', 'v1']))).code, 0);
      const loads = await loadUp(w, url);
      // a deploy that keeps the old instance waiting for its connections, killed once it has switched
      const child = w.pfSpawn(
        deployArgs(ports, ['--ipv6', 'off', '--json', '--drain', 'idle', '--drain-timeout', '3s'], ['--version', 'v2']),
      );
      let out = '';
      child.stdout!.on('data', (d) => (out += d));
      await waitFor(() => out.includes('"step":"switch","app":"web","status":"ok"'), 30_000, `the switch\n${out}`);
      child.kill('SIGKILL');
      const moved = Number(/"step":"switch","app":"web","status":"ok","port":(\d+)/.exec(out)![1]);
      const old = ports.find((p) => p !== moved)!;
      await new Promise((r) => setTimeout(r, 500));
      const rules = (await w.ns.exec('iptables-save', ['-t', 'filter'])).stdout;
      assert.match(rules, new RegExp(`--ctreplsrcport ${old} -j ACCEPT`), 'the draining port is still accepted');
      assert.match(rules, new RegExp(`--ctreplsrcport ${moved} -j ACCEPT`));
      const r = await w.pf(['restore']);
      assert.is(r.code, 0, show(r));
      for (const res of await Promise.all(loads.map((l) => l.stop()))) assert.is(res.failed, 0, JSON.stringify(res));
      const after = (await w.ns.exec('iptables-save', ['-t', 'filter'])).stdout;
      assert.not.match(
        after,
        new RegExp(`--ctreplsrcport ${old} `),
        'the next run closed the old port once its instance was gone',
      );
      assert.is(await get(w.ns, url, 'client'), 'v2');
    },
    { peer: true },
  );
});

test('a foreign rule that still jumps to the app chain: stop says what to do and exits 0', async () => {
  await inWorld(async (w) => {
    const ports = await freePorts(2);
    assert.is((await w.pf(deployArgs(ports, [], ['--version', 'v1']))).code, 0);
    assert.is((await w.sh('iptables -t nat -A OUTPUT -p udp -j PF-web')).code, 0);
    const r = await w.pf(['stop', 'web']);
    assert.is(r.code, 0, show(r));
    assert.match(r.stderr, /rules outside portflip still jump to PF-web \(-A OUTPUT -p udp -j PF-web\)/);
    assert.match(await w.save(), /-A OUTPUT -p udp -j PF-web/, 'the foreign rule is left alone');
  });
});

test.run();
