// Shared by the fleet tests: the fleet with v1 everywhere, the ansible.cfg and inventory, and ansible-playbook runs.

import { spawnSync } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import * as assert from 'uvu/assert';
import { AGENT_PORT, LB_ADDR, MAIN, createFleet, killLeftoverSsh, type Fleet, type Host } from './fleet.js';
import { fixture, repoRoot, startLoad, waitFor, type ExecResult, type LoadResult } from './netns.js';
import { get } from './world.js';

const has = (cmd: string) => spawnSync('sh', ['-c', `command -v ${cmd}`]).status === 0;
const missing = ['ansible-playbook', 'haproxy', 'ssh', 'ssh-keygen']
  .filter((c) => !has(c))
  .concat(has('/usr/sbin/sshd') ? [] : ['/usr/sbin/sshd']);
// sshd, a bridge and HAProxy's admin socket need real root; .ci/run installs the tools and runs as root.
export const fleetSkip =
  process.getuid?.() !== 0 ? 'needs real root' : missing.length ? `missing ${missing.join(', ')}` : '';

let runs = 0;

const PLAYBOOK = path.join(repoRoot, 'ansible', 'rolling-deploy.yml');

function writeAnsibleFiles(f: Fleet): { cfg: string; home: string } {
  const dir = path.join(f.base, 'ansible');
  const home = path.join(dir, 'home');
  mkdirSync(home, { recursive: true });
  const cfg = path.join(dir, 'ansible.cfg');
  writeFileSync(
    cfg,
    [
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
    ].join('\n'),
  );
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

export interface Summary {
  results: {
    host: string;
    failed: boolean;
    exit: number | string | null;
    version_before: string;
    version_after: string;
    steps: Record<string, number>;
    error: string;
  }[];
  untouched: string[];
}

/** Runs the playbook from the balancer namespace, as an operator on the balancer would; returns its result and summary. */
export async function playbook(
  fleet: Fleet,
  extra: Record<string, unknown>,
): Promise<{ r: ExecResult; summary: Summary; out: string }> {
  const { cfg, home } = writeAnsibleFiles(fleet);
  const summaryFile = path.join(fleet.base, `summary-${++runs}.json`);
  const t0 = performance.now();
  const r = await fleet.lb.exec(
    'ansible-playbook',
    [PLAYBOOK, '-e', JSON.stringify({ ...extra, portflip_summary_file: summaryFile })],
    {
      env: {
        ANSIBLE_CONFIG: cfg,
        HOME: home,
        ANSIBLE_NOCOLOR: '1',
        ANSIBLE_FORCE_COLOR: '0',
        PYTHONUNBUFFERED: '1',
        ...(process.env.PORTFLIP_FLEET_DEBUG ? { ANSIBLE_CALLBACKS_ENABLED: 'ansible.posix.profile_tasks' } : {}),
      },
      timeoutMs: 180_000,
    },
  );
  const what = JSON.stringify(extra);
  const secs = ((performance.now() - t0) / 1000).toFixed(1);
  console.log(
    `  ansible-playbook ${what.length > 100 ? `${what.slice(0, 100)}...` : what}: exit ${r.code} after ${secs} s`,
  );
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

export const served = (h: Host) => get(h.ns, 'http://127.0.0.1:80/');
export const byHost = (s: Summary) => Object.fromEntries(s.results.map((x) => [x.host, x]));

export async function underLoad<T>(fleet: Fleet, fn: () => Promise<T>): Promise<{ value: T; load: LoadResult }> {
  const load = await startLoad(fleet.client, 'server', {
    // paced: a few hundred requests a second at most, so the load does not starve ansible-playbook of CPU
    url: `http://${LB_ADDR}:80/`,
    mode: 'keepalive',
    concurrency: 3,
    durationMs: 170_000,
    timeoutMs: 5000,
    pauseMs: 10,
  });
  const value = await fn().finally(() => load.stop());
  return { value, load: await load.stop() };
}

/** The fleet, v1 deployed on every host (directly), an agent on each, and HAProxy seeing them all UP. */
export async function startFleet(): Promise<Fleet> {
  const fleet = await createFleet(3);
  try {
    // v1 everywhere, deployed directly, and an agent on each host answering HAProxy.
    await Promise.all(
      fleet.hosts.map(async (h) => {
        const r = await h.pf([
          'deploy',
          'web',
          '--listen',
          '80',
          '--ports',
          '8001,8002',
          '--json',
          '--ready',
          'http://127.0.0.1:{port}/health',
          '--',
          process.execPath,
          fixture('app.mjs'),
          '--port',
          '{port}',
          '--version',
          'v1',
        ]);
        if (r.code !== 0) throw new Error(`v1 on ${h.name}: ${r.stderr}`);
        h.agent = h.ns.spawn(process.execPath, [MAIN, 'agent', 'web', '--port', String(AGENT_PORT)], {
          env: h.env,
          stdio: 'ignore',
        });
      }),
    );
    let seen = '';
    await waitFor(
      async () => {
        const stats = Object.values(await fleet.serverStats());
        seen = stats
          .map(
            (s) =>
              `${s.svname} ${s.status} check "${s.check_status} ${s.last_chk}" agent "${s.agent_status} ${s.last_agt} ${s.agent_desc}"`,
          )
          .join('; ');
        return stats.every((s) => s.status === 'UP' && s.agent_status === 'L7OK');
      },
      20_000,
      'HAProxy to see every host UP, with the agent answering',
    ).catch((err) => {
      throw new Error(`${(err as Error).message}: ${seen}`);
    });
  } catch (err) {
    await fleet.destroy();
    console.error(`fleet setup failed: ${(err as Error).stack}`); // uvu would only say the suite failed
    throw err;
  }
  return fleet;
}
