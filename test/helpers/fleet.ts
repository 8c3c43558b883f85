// A fleet in namespaces: three app hosts with their own sshd, HAProxy in a balancer namespace, a client; one bridge.
//
//   client 10.233.0.20 ─┐
//   h1 10.233.0.1 ──────┤ br0 in the balancer namespace (10.233.0.10: HAProxy on :80, ansible-playbook runs here)
//   h2 10.233.0.2 ──────┤
//   h3 10.233.0.3 ──────┘
// Every host shares the filesystem, so each gets its own state and run dirs, sshd config, host key and pid file.

import { type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { hideNodeScript, type NoNodeFiles } from './executable.js';
import {
  createNetns,
  repoRoot,
  tmpDirs,
  waitFor,
  waitForPort,
  type ExecResult,
  type Netns,
  type TmpDirs,
} from './netns.js';

export const MAIN = path.join(repoRoot, 'dist', 'src', 'main.cjs');
export const LB_ADDR = '10.233.0.10';
export const CLIENT_ADDR = '10.233.0.20';
export const AGENT_PORT = 9777;
const SSHD = '/usr/sbin/sshd'; // by absolute path: sshd refuses to re-exec itself otherwise

export interface Host {
  name: string;
  addr: string;
  ns: Netns;
  dirs: TmpDirs;
  env: Record<string, string>; // PORTFLIP_STATE_DIR and PORTFLIP_RUN_DIR of this host
  sshd?: ChildProcess;
  agent?: ChildProcess;
  pf(args: string[], timeoutMs?: number): Promise<ExecResult>;
}

export interface Fleet {
  base: string; // the temp dir holding every config, key and socket
  hosts: Host[];
  lb: Netns;
  client: Netns;
  haproxySocket: string;
  key: string; // the throwaway ssh private key
  haproxy(cmd: string): Promise<string>;
  /** As the reload in docs/install.md does: save the servers' runtime state (unless save is false), then reload. */
  reloadHaproxy(opts?: { save?: boolean }): Promise<void>;
  serverStats(): Promise<Record<string, Record<string, string>>>;
  destroy(): Promise<void>;
}

async function must(ns: Netns, cmd: string, args: string[], input?: string): Promise<ExecResult> {
  const r = await ns.exec(cmd, args, { input });
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.code}): ${r.stderr.trim()}`);
  return r;
}

function sshdConfig(h: { addr: string; dir: string }, authorizedKeys: string): string {
  return [
    `ListenAddress ${h.addr}:22`,
    `HostKey ${h.dir}/host_ed25519_key`,
    `PidFile ${h.dir}/sshd.pid`,
    `AuthorizedKeysFile ${authorizedKeys}`,
    'PermitRootLogin prohibit-password',
    'PasswordAuthentication no',
    'KbdInteractiveAuthentication no',
    'UsePAM no',
    'StrictModes no', // the keys live in a temp dir that sshd would otherwise find too open
    'PrintMotd no',
    'Subsystem sftp internal-sftp',
    '',
  ].join('\n');
}

export function haproxyConfig(base: string, hosts: { name: string; addr: string }[]): string {
  return [
    'global',
    `  stats socket ${base}/haproxy.sock mode 600 level admin`,
    // a reload keeps drain and maint set through the runtime API (docs/install.md, "HAProxy reloads");
    // reloadHaproxy saves the file
    `  server-state-file ${base}/haproxy.state`,
    'defaults',
    '  mode http',
    '  load-server-state-from-file global',
    '  timeout connect 2s',
    '  timeout client 10s',
    '  timeout server 10s',
    '  option http-server-close',
    'frontend fe',
    `  bind ${LB_ADDR}:80`,
    '  default_backend web',
    'backend web',
    '  balance roundrobin',
    '  option httpchk GET /health',
    `  default-server inter 300ms fall 2 rise 1 agent-check agent-port ${AGENT_PORT} agent-inter 300ms`,
    ...hosts.map((h) => `  server ${h.name} ${h.addr}:80 check`),
    '',
  ].join('\n');
}

/** Builds the whole fleet; on any failure it tears down what it made and rethrows. */
export async function createFleet(n = 3, opts: { noNode?: NoNodeFiles } = {}): Promise<Fleet> {
  const base = mkdtempSync(path.join(tmpdir(), 'portflip-fleet-'));
  const made: Netns[] = [];
  const hosts: Host[] = [];
  let haproxy: ChildProcess | undefined;
  let madeRunSshd = false;

  // Killed by the runner (SIGTERM), the harness exits at once: put /run/sshd back and drop the temp dir even then.
  // (sshd, HAProxy, the agents and the app instances are killed by netns.ts's own exit handler.)
  // The path is fleetlib's control_path_dir: ansible-playbook runs there.
  const onExit = () => {
    killLeftoverSsh(path.join(base, 'ansible', 'cp')); // ControlPersist masters leave the process group
    if (madeRunSshd) rmSync('/run/sshd', { recursive: true, force: true });
    rmSync(base, { recursive: true, force: true });
  };
  process.once('exit', onExit);

  const destroy = async () => {
    process.removeListener('exit', onExit);
    for (const h of hosts) {
      for (const child of [h.agent, h.sshd]) if (child?.pid) kill(-child.pid);
      await h.pf(['cleanup', '--stop-instances']).catch(() => {});
      h.dirs.cleanup();
    }
    if (haproxy?.pid) kill(-haproxy.pid);
    for (const ns of made) await ns.destroy();
    if (madeRunSshd) rmSync('/run/sshd', { recursive: true, force: true });
    rmSync(base, { recursive: true, force: true });
  };

  try {
    // sshd wants its privilege-separation directory; put it back as it was afterwards.
    if (!existsSync('/run/sshd')) {
      mkdirSync('/run/sshd', { mode: 0o755 });
      madeRunSshd = true;
    }
    const lb = await createNetns();
    made.push(lb);
    const client = await createNetns();
    made.push(client);
    await must(
      lb,
      'ip',
      ['-batch', '-'],
      [`link add br0 type bridge`, `addr add ${LB_ADDR}/24 dev br0`, 'link set br0 up', ''].join('\n'),
    );

    const key = path.join(base, 'id_ed25519');
    await must(lb, 'ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', 'portflip-fleet-test', '-f', key]);
    const authorized = path.join(base, 'authorized_keys');
    writeFileSync(authorized, readFileSync(`${key}.pub`), { mode: 0o600 });

    const join = async (ns: Netns, name: string, addr: string) => {
      await must(
        lb,
        'ip',
        ['-batch', '-'],
        [
          `link add ${name} type veth peer name eth0 netns ${ns.pid}`,
          `link set ${name} master br0`,
          `link set ${name} up`,
          '',
        ].join('\n'),
      );
      await must(ns, 'ip', ['-batch', '-'], [`addr add ${addr}/24 dev eth0`, 'link set eth0 up', ''].join('\n'));
    };
    await join(client, 'v-client', CLIENT_ADDR);

    for (let i = 1; i <= n; i++) {
      const name = `h${i}`;
      const addr = `10.233.0.${i}`;
      const ns = await createNetns();
      made.push(ns);
      await join(ns, `v-${name}`, addr);
      const dirs = tmpDirs();
      // the drain module's dir too: the executable writes it there, not to the machine's /var/lib/portflip-node
      const env = {
        PORTFLIP_STATE_DIR: dirs.stateDir,
        PORTFLIP_RUN_DIR: dirs.runDir,
        PORTFLIP_PRELOAD_DIR: dirs.preloadDir,
        PORTFLIP_TEXTFILE_DIR: '', // the machine's node_exporter directory is not the tests' to write
      };
      const dir = path.join(base, name);
      mkdirSync(dir);
      await must(ns, 'ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', `${dir}/host_ed25519_key`]);
      writeFileSync(`${dir}/sshd_config`, sshdConfig({ addr, dir }, authorized));
      const h: Host = {
        name,
        addr,
        ns,
        dirs,
        env,
        pf: (args, timeoutMs = 60_000) => ns.exec(process.execPath, [MAIN, ...args], { env, timeoutMs }),
      };
      hosts.push(h);
      const sshd = [SSHD, '-D', '-e', '-f', `${dir}/sshd_config`];
      // noNode: sshd, and so everything ansible runs on the host, sees no node or npm (executable.ts)
      h.sshd = opts.noNode
        ? ns.spawn('unshare', ['-m', 'sh', '-c', hideNodeScript(), 'sh', ...sshd], {
            stdio: ['ignore', 'ignore', 'pipe'],
            env: { PF_APP_NODE: opts.noNode.appNode, PF_EMPTY: opts.noNode.empty },
          })
        : ns.spawn(sshd[0], sshd.slice(1), { stdio: ['ignore', 'ignore', 'pipe'] });
      let sshdErr = '';
      h.sshd.stderr!.on('data', (d) => (sshdErr = (sshdErr + d).slice(-4000)));
      await waitForPort(ns, 22, { host: addr, timeoutMs: 10_000 }).catch((err) => {
        throw new Error(`sshd on ${name}: ${(err as Error).message}; ${sshdErr}`);
      });
    }

    writeFileSync(path.join(base, 'haproxy.cfg'), haproxyConfig(base, hosts));
    const haproxySocket = path.join(base, 'haproxy.sock');
    // -db: in the foreground, so the harness holds its pid and kills it; no pid file in /run.
    // master-worker (-W): SIGUSR2 reloads, as systemctl reload haproxy does
    haproxy = lb.spawn('haproxy', ['-W', '-db', '-f', path.join(base, 'haproxy.cfg')], {
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    let haproxyErr = '';
    haproxy.stderr!.on('data', (d) => (haproxyErr = (haproxyErr + d).slice(-4000)));
    await waitFor(() => existsSync(haproxySocket), 10_000, `HAProxy's socket (${haproxyErr})`);

    const haproxyCmd = (cmd: string) =>
      new Promise<string>((resolve, reject) => {
        let out = '';
        const s = connect(haproxySocket, () => s.end(`${cmd}\n`));
        s.setEncoding('utf8');
        s.on('data', (d) => (out += d));
        s.on('error', reject);
        s.on('close', () => resolve(out));
      });
    const serverStats = async () => {
      const csv = (await haproxyCmd('show stat')).replace(/^# /, '').trim().split('\n');
      const cols = csv[0].split(',');
      const out: Record<string, Record<string, string>> = {};
      for (const line of csv.slice(1)) {
        const row = Object.fromEntries(line.split(',').map((v, i) => [cols[i], v]));
        if (row.pxname === 'web' && row.svname !== 'BACKEND') out[row.svname] = row;
      }
      return out;
    };
    const workerPid = async () => /^Pid: (\d+)$/m.exec(await haproxyCmd('show info').catch(() => ''))?.[1];
    const reloadHaproxy = async ({ save = true } = {}) => {
      if (save) writeFileSync(path.join(base, 'haproxy.state'), await haproxyCmd('show servers state'));
      const before = await workerPid();
      process.kill(haproxy!.pid!, 'SIGUSR2');
      await waitFor(
        async () => {
          const now = await workerPid();
          return !!now && now !== before;
        },
        10_000,
        `a new HAProxy worker after the reload: ${haproxyErr}`,
      );
    };
    return { base, hosts, lb, client, haproxySocket, key, haproxy: haproxyCmd, reloadHaproxy, serverStats, destroy };
  } catch (err) {
    await destroy();
    throw err;
  }
}

function kill(pid: number): void {
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    // already gone
  }
}

/** ssh processes whose command line names `marker` (a ControlPersist master names its control path): killed by pid. */
export function killLeftoverSsh(marker: string): number[] {
  const killed: number[] = [];
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    let cmdline = '';
    try {
      cmdline = readFileSync(`/proc/${name}/cmdline`, 'utf8');
    } catch {
      continue;
    }
    let comm = '';
    try {
      comm = readFileSync(`/proc/${name}/comm`, 'utf8').trim();
    } catch {
      continue;
    }
    if (comm === 'ssh' && cmdline.includes(marker)) {
      kill(Number(name));
      killed.push(Number(name));
    }
  }
  return killed;
}
