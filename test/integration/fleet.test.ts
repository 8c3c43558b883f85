// Fleets for real: ansible-playbook (ansible/rolling-deploy.yml) over ssh to three namespace hosts behind HAProxy, under load.

import { spawnSync } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { suite } from 'uvu';
import * as assert from 'uvu/assert';
import { AGENT_PORT, LB_ADDR, MAIN, createFleet, killLeftoverSsh, type Fleet, type Host } from '../helpers/fleet.js';
import { fixture, repoRoot, startLoad, waitFor, type ExecResult, type LoadResult } from '../helpers/netns.js';
import { get } from './lib.js';

const test = suite('fleet');
const has = (cmd: string) => spawnSync('sh', ['-c', `command -v ${cmd}`]).status === 0;
const missing = ['ansible-playbook', 'haproxy', 'ssh', 'ssh-keygen'].filter((c) => !has(c)).concat(has('/usr/sbin/sshd') ? [] : ['/usr/sbin/sshd']);
// sshd, a bridge and HAProxy's admin socket need real root; .ci/run installs the tools and runs as root.
const skip = process.getuid?.() !== 0 ? 'needs real root' : missing.length ? `missing ${missing.join(', ')}` : '';

let fleet: Fleet;
let runs = 0;

const PLAYBOOK = path.join(repoRoot, 'ansible', 'rolling-deploy.yml');

function writeAnsibleFiles(f: Fleet): { cfg: string; home: string } {
  const dir = path.join(f.base, 'ansible');
  const home = path.join(dir, 'home');
  mkdirSync(home, { recursive: true });
  const cfg = path.join(dir, 'ansible.cfg');
  writeFileSync(cfg, [
    '[defaults]',
    `inventory = ${dir}/inventory.json`,
    'host_key_checking = False',
    `local_tmp = ${dir}/local-tmp`,
    `remote_tmp = ${dir}/remote-tmp`,
    'interpreter_python = /usr/bin/python3',
    'retry_files_enabled = False',
    'forks = 5',
    'timeout = 20',
    '[ssh_connection]',
    // ControlPersist saves a handshake per task; its master processes are killed by pid after each run.
    // -F /dev/null: root's own ~/.ssh/config and /etc/ssh/ssh_config play no part.
    `ssh_args = -F /dev/null -o ControlMaster=auto -o ControlPersist=60s -o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=no -o IdentitiesOnly=yes`,
    `control_path_dir = ${dir}/cp`,
    'pipelining = True',
    '',
  ].join('\n'));
  const hostVars = (h: Host) => ({ ansible_host: h.addr, portflip_environment: h.env });
  const inventory = {
    all: {
      vars: {
        ansible_user: 'root',
        ansible_ssh_private_key_file: f.key,
        portflip_install: false,
        portflip_bin: MAIN,
        portflip_app: 'web',
        portflip_listen: 80,
        portflip_ports: '8001,8002',
        portflip_ready: 'http://127.0.0.1:{port}/health',
        portflip_ready_timeout: '3s',
        portflip_version_url: 'http://{{ ansible_host }}:80/',
        // a host listed in bad_hosts gets a build that never listens, so it never gets ready
        portflip_command: `{{ ['${process.execPath}', '${fixture('app.mjs')}', '--port', '{port}', '--version', app_version]
          + (['--never-listen'] if inventory_hostname in (bad_hosts | default([])) else []) }}`,
        portflip_haproxy_socket: f.haproxySocket,
        portflip_haproxy_backend: 'web',
        portflip_health_url: 'http://{{ ansible_host }}:80/health',
      },
      children: {
        portflip: { hosts: Object.fromEntries(f.hosts.map((h) => [h.name, hostVars(h)])) },
        balancer: { hosts: { lb: { ansible_connection: 'local', ansible_python_interpreter: '/usr/bin/python3' } } },
      },
    },
  };
  writeFileSync(path.join(dir, 'inventory.json'), JSON.stringify(inventory, null, 2));
  return { cfg, home };
}

interface Summary {
  results: { host: string; failed: boolean; exit: number | string | null; version_before: string; version_after: string; steps: Record<string, number>; error: string }[];
  untouched: string[];
}

/** Runs the playbook from the balancer namespace, as an operator on the balancer would; returns its result and summary. */
async function playbook(extra: Record<string, unknown>): Promise<{ r: ExecResult; summary: Summary; out: string }> {
  const { cfg, home } = writeAnsibleFiles(fleet);
  const summaryFile = path.join(fleet.base, `summary-${++runs}.json`);
  const t0 = performance.now();
  const r = await fleet.lb.exec('ansible-playbook', [PLAYBOOK, '-e', JSON.stringify({ ...extra, portflip_summary_file: summaryFile })], {
    env: {
      ANSIBLE_CONFIG: cfg, HOME: home, ANSIBLE_NOCOLOR: '1', ANSIBLE_FORCE_COLOR: '0', PYTHONUNBUFFERED: '1',
      ...(process.env.PORTFLIP_FLEET_DEBUG ? { ANSIBLE_CALLBACKS_ENABLED: 'ansible.posix.profile_tasks' } : {}),
    },
    timeoutMs: 180_000,
  });
  console.log(`  ansible-playbook ${JSON.stringify(extra)}: exit ${r.code} after ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  if (process.env.PORTFLIP_FLEET_DEBUG) console.log(r.stdout, r.stderr);
  // The ControlPersist masters (one per host) outlive ansible-playbook by design: end them, by pid.
  const masters = killLeftoverSsh(path.join(fleet.base, 'ansible', 'cp'));
  assert.ok(masters.length > 0 && masters.length <= fleet.hosts.length, `ControlPersist masters: ${masters}`);
  const out = `exit ${r.code}${r.timedOut ? ' (timed out)' : ''}\n${r.stdout}\n${r.stderr}`;
  let summary: Summary;
  try {
    summary = JSON.parse(readFileSync(summaryFile, 'utf8'));
  } catch {
    throw new Error(`no summary file; ansible-playbook said:\n${out}`);
  }
  return { r, summary, out };
}

const served = (h: Host) => get(h.ns, 'http://127.0.0.1:80/');
const byHost = (s: Summary) => Object.fromEntries(s.results.map((x) => [x.host, x]));

async function underLoad<T>(fn: () => Promise<T>): Promise<{ value: T; load: LoadResult }> {
  const load = await startLoad(fleet.client, 'server', {
    url: `http://${LB_ADDR}:80/`, mode: 'keepalive', concurrency: 3, durationMs: 170_000, timeoutMs: 5000,
  });
  const value = await fn().finally(() => load.stop());
  return { value, load: await load.stop() };
}

test.before(async () => {
  if (skip) return;
  await setUp().catch((err) => {
    console.error(`fleet setup failed: ${(err as Error).stack}`); // uvu would only say the suite failed
    throw err;
  });
});

async function setUp(): Promise<void> {
  fleet = await createFleet(3);
  // v1 everywhere, deployed directly, and an agent on each host answering HAProxy.
  await Promise.all(fleet.hosts.map(async (h) => {
    const r = await h.pf(['deploy', 'web', '--listen', '80', '--ports', '8001,8002', '--json', '--ready', 'http://127.0.0.1:{port}/health',
      '--', process.execPath, fixture('app.mjs'), '--port', '{port}', '--version', 'v1']);
    if (r.code !== 0) throw new Error(`v1 on ${h.name}: ${r.stderr}`);
    h.agent = h.ns.spawn(process.execPath, [MAIN, 'agent', 'web', '--port', String(AGENT_PORT)], { env: h.env, stdio: 'ignore' });
  }));
  let seen = '';
  await waitFor(async () => {
    const stats = Object.values(await fleet.serverStats());
    seen = stats.map((s) => `${s.svname} ${s.status} check "${s.check_status} ${s.last_chk}" agent "${s.agent_status} ${s.last_agt} ${s.agent_desc}"`).join('; ');
    return stats.every((s) => s.status === 'UP' && s.agent_status === 'L7OK');
  }, 20_000, 'HAProxy to see every host UP, with the agent answering').catch((err) => {
    throw new Error(`${(err as Error).message}: ${seen}`);
  });
}

test.after(async () => {
  await fleet?.destroy();
});

test('rolling deploy v1 -> v2 over three hosts through HAProxy: 0 failed requests, a summary from the JSON events', async () => {
  if (skip) return console.log(`  skipped: ${skip}`);
  const { value: { r, summary, out }, load } = await underLoad(() => playbook({ app_version: 'v2' }));
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
    for (const step of ['preflight', 'start', 'ready', 'switch', 'drain', 'done']) assert.type(res[h.name].steps[step], 'number', `${h.name} ${step}`);
  }
  assert.equal(summary.untouched, []);
  assert.match(r.stdout, /h1: ok, v1 -> v2, exit 0, preflight [\d.]+s/);
  // serial [1, 50%] over three hosts: three batches of one host, each with its own PLAY header
  assert.is(r.stdout.match(/^PLAY \[portflip rolling deploy\] \*/gm)?.length, 3, out);
});

test('a host whose new version never gets ready keeps the old one, and the play goes on to the next host', async () => {
  if (skip) return console.log(`  skipped: ${skip}`);
  const { value: { r, summary, out }, load } = await underLoad(() => playbook({ app_version: 'v3', bad_hosts: ['h2'] }));
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
});

test('with two of three hosts failing, the play stops before touching the third', async () => {
  if (skip) return console.log(`  skipped: ${skip}`);
  const { value: { r, summary, out }, load } = await underLoad(() => playbook({ app_version: 'v4', bad_hosts: ['h1', 'h2'] }));
  assert.is.not(r.code, 0, out);
  assert.is(load.failed, 0, JSON.stringify(load));
  const res = byHost(summary);
  assert.is(res.h1.failed, true);
  assert.is(res.h2.failed, true);
  assert.equal(summary.untouched, ['h3'], out);
  assert.is(await served(fleet.hosts[0]), 'v3');
  assert.is(await served(fleet.hosts[1]), 'v2');
  assert.is(await served(fleet.hosts[2]), 'v3', 'h3 was not touched');
  const st = JSON.parse((await fleet.hosts[2].pf(['status', 'web', '--json'])).stdout);
  assert.is(st.apps[0].active.port, 8001, 'h3 still runs the instance of the last good deploy');
  assert.match(r.stdout, /h3: not deployed \(the rollout stopped first\)/);
});

test('load-balancer mode: each host is drained, gets no new connection while its work runs, and comes back; 0 failed', async () => {
  if (skip) return console.log(`  skipped: ${skip}`);
  const log = path.join(fleet.base, 'work.log');
  // The work counts new connections reaching the host: the nat REDIRECT rule's packet counter sees one per connection.
  const count = `iptables-nft -t nat -nvxL PF-web | awk '/REDIRECT/ {print $1}'`;
  const work = `a=$(${count}); sleep 2; b=$(${count}); echo "{{ inventory_hostname }} $a $b" >> ${log}`;
  const { value: { r, summary, out }, load } = await underLoad(() =>
    playbook({ app_version: 'v5', portflip_lb: true, portflip_work: work, portflip_serial: 1 }),
  );
  assert.is(r.code, 0, out);
  assert.is(load.failed, 0, JSON.stringify(load));
  const lines = readFileSync(log, 'utf8').trim().split('\n').map((l) => l.split(' '));
  assert.equal(lines.map((l) => l[0]), ['h1', 'h2', 'h3'], 'one host at a time');
  for (const [host, before, after] of lines) {
    assert.ok(Number(before) > 0, `${host} had connections before it was drained`);
    assert.is(after, before, `${host}: no new connection while its work ran`);
  }
  for (const h of fleet.hosts) assert.is(await served(h), 'v5');
  assert.equal(summary.results.map((x) => [x.host, x.version_before, x.version_after]), [['h1', 'v3', 'v5'], ['h2', 'v2', 'v5'], ['h3', 'v3', 'v5']]);
  const stats = await fleet.serverStats();
  for (const h of fleet.hosts) assert.is(stats[h.name].status, 'UP', `${h.name} is back in rotation`);
});

test('portflip agent drives HAProxy: drain, maint, ready from the host, and down when the app is gone', async () => {
  if (skip) return console.log(`  skipped: ${skip}`);
  const h3 = fleet.hosts[2];
  const agent = (...args: string[]) => h3.pf(['agent', 'web', ...args]);
  const status = async () => (await fleet.serverStats()).h3;
  const until = (what: string, fn: (s: Record<string, string>) => boolean) => waitFor(async () => fn(await status()), 10_000, what);

  const load = await startLoad(fleet.client, 'server', { url: `http://${LB_ADDR}:80/`, mode: 'keepalive', concurrency: 3, durationMs: 60_000 });
  const steps = async () => {
    assert.is((await agent('--set', 'drain')).code, 0);
    await until('h3 DRAIN', (s) => s.status === 'DRAIN' && s.last_agt === 'drain up');
    const t0 = Number((await status()).stot);
    await new Promise((r) => setTimeout(r, 1500));
    assert.is(Number((await status()).stot), t0, 'no new session reaches a host its agent drains');

    assert.is((await agent('--set', 'maint')).code, 0);
    await until('h3 MAINT', (s) => s.status === 'MAINT');
    assert.is((await agent('--set', 'ready')).code, 0);
    await until('h3 UP again', (s) => s.status === 'UP' && s.last_agt === 'ready up 100%');
    assert.is((await agent('--set', 'clear')).code, 0);
    await until('h3 agent quiet on admin state', (s) => s.last_agt === 'up 100%');
  };
  await steps().finally(() => load.stop());
  const res = await load.stop();
  assert.is(res.failed, 0, JSON.stringify(res));
  assert.ok(res.versions.length > 0);

  // The app goes away on h3: its agent says down, with the reason, and HAProxy takes it out.
  assert.is((await h3.pf(['stop', 'web'])).code, 0);
  await until('h3 DOWN by its agent', (s) => s.status.startsWith('DOWN') && /no portflip app web|no live active instance/.test(s.last_agt));
});

test.run();
