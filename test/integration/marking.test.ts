// Marking a draining instance's answers Connection: close: bodies never change, pipelining and TLS are left
// alone, and a portflip killed mid-drain leaves nothing that blocks traffic or sticks.

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { execFileSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fixture, freePorts, startLoad, waitFor, type Netns } from '../helpers/netns.js';
import { goBuild, serverFlags } from '../helpers/servers.js';
import { inWorld, show, type World } from '../helpers/world.js';
import { events } from '../helpers/events.js';

const node = process.execPath;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** body-client.mjs in the client namespace; stop() ends it and returns its summary. */
function bodyClient(ns: Netns, mode: 'keepalive' | 'pipeline', concurrency: number) {
  const child = ns.spawnClient(node, [
    fixture('body-client.mjs'),
    '--host',
    ns.serverAddr!,
    '--port',
    '80',
    '--mode',
    mode,
    '--concurrency',
    String(concurrency),
    '--duration',
    '90000',
  ]);
  let out = '';
  let err = '';
  child.stdout!.on('data', (d) => (out += d));
  child.stderr!.on('data', (d) => (err += d));
  const exited = new Promise((r) => child.once('exit', r));
  return {
    /** Resolves once the first answer came: a client that starts slowly must not miss the first version. */
    ready: () => waitFor(() => err.includes('ready'), 20_000, `the ${mode} body client's first answer`),
    async stop(): Promise<Record<string, any>> {
      child.stdin!.end('stop\n');
      await Promise.race([exited, sleep(15_000)]);
      return JSON.parse(out.trim().split('\n').pop() ?? '{}');
    },
  };
}

const mangle = async (w: World) =>
  (await w.sh('iptables-save -t mangle; ip6tables-save -t mangle')).stdout
    .split('\n')
    .filter((l) => !l.startsWith('#'))
    .map((l) => l.replace(/\[\d+:\d+\]$/, '[0:0]'))
    .join('\n');

test('bodies whose every segment begins with a response head reach their clients unchanged; pipelined answers are never marked', async () => {
  await inWorld(
    async (w) => {
      const ports = await freePorts(2);
      // a Node app: --node-drain off, so its drain is the marking one (auto = idle for it)
      const deploy = (v: string) =>
        w.pf([
          'deploy',
          'web',
          '--listen',
          '80',
          '--ports',
          ports.join(','),
          '--node-drain',
          'off',
          '--drain-timeout',
          '3s',
          '--json',
          '--',
          node,
          fixture('segments-app.mjs'),
          v,
        ]);
      assert.is((await deploy('v1')).code, 0);
      const keep = bodyClient(w.ns, 'keepalive', 8);
      const pipe = bodyClient(w.ns, 'pipeline', 2);
      await Promise.all([keep.ready(), pipe.ready()]);
      const marks: Record<string, any>[] = [];
      try {
        for (const v of ['v2', 'v3', 'v4']) {
          await sleep(800);
          const r = await deploy(v);
          assert.is(r.code, 0, show(r));
          marks.push(events(r.stdout).find((e) => e.kind === 'marking')!);
        }
        await sleep(300);
      } finally {
        var [k, p] = await Promise.all([keep.stop(), pipe.stop()]); // eslint-disable-line no-var
      }
      assert.ok(k.ok > 200, JSON.stringify(k));
      assert.is(k.mismatched, 0, `no body changed: ${JSON.stringify(k)}`);
      assert.is(k.failed, 0, JSON.stringify(k));
      // connections move one by one, so versions alternate while they do: their order of first sight is the check
      assert.equal([...new Set(k.versions)], ['v1', 'v2', 'v3', 'v4'], k.versions.join(','));
      assert.ok(p.ok > 50, JSON.stringify(p));
      assert.is(p.mismatched, 0, JSON.stringify(p));
      assert.is(p.touched, 0, `no pipelined answer was marked: ${JSON.stringify(p)}`);
      for (const m of marks) {
        assert.ok(m.marked >= 1, JSON.stringify(m));
        assert.ok(
          m.untouched.pipelined >= 1,
          `the pipelining connections were seen and left alone: ${JSON.stringify(m)}`,
        );
      }
    },
    { peer: true },
  );
});

test('TLS falls back to the idle wait and says so: nothing is marked, no record is broken', async () => {
  const dir = mkdtempSync(path.join(tmpdir(), 'portflip-tls-'));
  try {
    const [cert, key] = [path.join(dir, 'cert.pem'), path.join(dir, 'key.pem')];
    execFileSync(
      'openssl',
      [
        'req',
        '-x509',
        '-newkey',
        'rsa:2048',
        '-nodes',
        '-subj',
        '/CN=localhost',
        '-days',
        '1',
        '-keyout',
        key,
        '-out',
        cert,
      ],
      { stdio: 'pipe' },
    );
    const bin = goBuild('go-tls');
    await inWorld(
      async (w) => {
        const ports = await freePorts(2);
        const deploy = (v: string) =>
          w.pf([
            'deploy',
            'web',
            '--listen',
            '80',
            '--ports',
            ports.join(','),
            '--drain-timeout',
            '2s',
            '--env',
            `APP_VERSION=${v}`,
            '--env',
            `CERT=${cert}`,
            '--env',
            `KEY=${key}`,
            '--json',
            '--',
            bin,
          ]);
        assert.is((await deploy('v1')).code, 0);
        // an https client with keep-alive: its connections stay busy, so the drain waits its timeout
        const script = `const https=require('https');const a=new https.Agent({keepAlive:true,maxSockets:4,rejectUnauthorized:false});
        let stop=false,ok=0,errs={};process.stdin.on('data',()=>stop=true);
        const one=()=>new Promise(r=>{const q=https.get({host:'${w.ns.serverAddr}',port:80,agent:a},s=>{s.resume();s.on('end',()=>{ok++;r()})});q.on('error',e=>{errs[e.code||e.message]=(errs[e.code||e.message]||0)+1;r()})});
        Promise.all([0,1,2,3].map(async()=>{while(!stop)await one()})).then(()=>{console.log(JSON.stringify({ok,errs}));process.exit(0)});`;
        const client: ChildProcess = w.ns.spawnClient(node, ['-e', script]);
        let out = '';
        client.stdout!.on('data', (d) => (out += d));
        await sleep(800);
        const r = await deploy('v2');
        client.stdin!.end('stop\n');
        await new Promise((res) => client.once('exit', res));
        assert.is(r.code, 0, show(r));
        const ev = events(r.stdout);
        const m = ev.find((e) => e.kind === 'marking')!;
        assert.is(m.marked, 0, JSON.stringify(m));
        assert.ok((m.untouched.tls ?? 0) >= 1, JSON.stringify(m));
        assert.match(ev.find((e) => e.step === 'drain')!.detail, /left alone: \d+ TLS/);
        assert.is(ev.find((e) => e.kind === 'signal')!.reason, 'drain timeout');
        const res = JSON.parse(out.trim());
        assert.ok(res.ok > 50, out);
        // a changed byte inside TLS would fail its record check: none did
        assert.not.ok(
          Object.keys(res.errs).some((k) => /SSL|DECRYPT|BAD_RECORD/i.test(k)),
          out,
        );
      },
      { peer: true },
    );
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('portflip SIGKILLed while marking: packets pass (queue bypass), and the next run removes the rules; foreign mangle rules stay', async () => {
  await inWorld(
    async (w) => {
      const foreign =
        'iptables -t mangle -A INPUT -p tcp --dport 22 -j MARK --set-mark 7; iptables -t mangle -A OUTPUT -p udp -j RETURN';
      assert.is((await w.sh(foreign)).code, 0);
      const before = await mangle(w);
      const ports = await freePorts(2);
      const args = (v: string) => [
        'deploy',
        'web',
        '--listen',
        '80',
        '--ports',
        ports.join(','),
        '--node-drain',
        'off',
        '--drain-timeout',
        '20s',
        '--json',
        '--',
        node,
        fixture('segments-app.mjs'),
        v,
      ];
      assert.is((await w.pf(args('v1'))).code, 0);
      const keep = bodyClient(w.ns, 'keepalive', 4);
      const pipe = bodyClient(w.ns, 'pipeline', 1); // never quiet: the drain lasts until portflip is killed
      try {
        await sleep(500);
        const child = w.pfSpawn(args('v2'));
        let out = '';
        child.stdout!.on('data', (d) => (out += d));
        const t0 = Date.now();
        while (!(await mangle(w)).includes('PF-MARK-IN') && Date.now() - t0 < 15_000) await sleep(100);
        await sleep(500);
        child.kill('SIGKILL');
        await new Promise((r) => child.once('exit', r));
        assert.match(await mangle(w), /--queue-bypass/, 'the rules outlive the killed run');
        await sleep(1500); // nobody reads the queue: every packet passes
        const next = await w.pf([
          'deploy',
          'web',
          '--listen',
          '80',
          '--ports',
          ports.join(','),
          '--node-drain',
          'off',
          '--drain-timeout',
          '2s',
          '--json',
          '--',
          node,
          fixture('segments-app.mjs'),
          'v3',
        ]);
        assert.is(next.code, 0, show(next));
        const notes = events(next.stdout)
          .filter((e) => e.kind === 'notice')
          .map((e) => e.message)
          .join('\n');
        assert.match(notes, /removing the marking of port \d+ .*: the run that drained it \(pid \d+\) is gone/);
      } finally {
        var [k, p] = await Promise.all([keep.stop(), pipe.stop()]); // eslint-disable-line no-var
      }
      assert.is(k.failed, 0, JSON.stringify(k));
      assert.is(k.mismatched + p.mismatched, 0);
      assert.ok(k.versions.includes('v3'), JSON.stringify(k));
      assert.is(await mangle(w), before, 'no rule of portflip left in mangle; the foreign ones byte for byte');
    },
    { peer: true },
  );
});

test('an in-place restart (one port) and a rollback drain through marking too: keep-alive clients of a Go server, 0 failed', async () => {
  const go = goBuild('go-shutdown');
  await inWorld(
    async (w) => {
      const [one, two] = await freePorts(2);
      const deploy = (v: string, ports: string, extra: string[] = []) =>
        w.pf(['deploy', 'web', '--listen', '80', '--ports', ports, ...serverFlags(v), '--json', ...extra, '--', go]);
      const busy = () =>
        startLoad(w.ns, 'client', {
          url: `http://${w.ns.serverAddr}:80/`,
          mode: 'keepalive',
          concurrency: 16,
          durationMs: 60_000,
          maxRequests: 5_000_000,
        });
      const marked = (ev: Record<string, any>[]) => {
        const m = ev.find((e) => e.kind === 'marking');
        assert.ok(m && m.marked >= 1, JSON.stringify(ev.filter((e) => e.kind !== 'connections')));
      };
      assert.is((await deploy('v1', String(one))).code, 0);
      // in place: the old instance drains on the port the new one takes next, its new connections held meanwhile
      const first = await busy();
      await sleep(800);
      const inPlace = await deploy('v2', String(one));
      await sleep(500);
      const res1 = await first.stop();
      assert.is(inPlace.code, 0, show(inPlace));
      marked(events(inPlace.stdout));
      assert.is(res1.failed, 0, JSON.stringify(res1));
      assert.equal([...new Set(res1.versions)], ['v1', 'v2'], res1.versions.join(','));
      // a kept instance is not drained: v2 stays for rollback; clients that connect now are on v3
      const kept = await deploy('v3', `${one},${two}`, ['--keep-old', '60s']);
      assert.is(kept.code, 0, show(kept));
      const second = await busy();
      await sleep(800);
      const back = await w.pf(['rollback', 'web', '--json']); // v3 drains, v2 takes every new connection again
      await sleep(500);
      const res2 = await second.stop();
      assert.is(back.code, 0, show(back));
      marked(events(back.stdout));
      assert.is(res2.failed, 0, JSON.stringify(res2));
      assert.equal([...new Set(res2.versions)], ['v3', 'v2'], res2.versions.join(','));
    },
    { peer: true },
  );
});

test.run();
