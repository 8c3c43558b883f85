// The Vagrant demo's files: the Vagrantfile validates, provision.sh parses, and its install steps work for real in a temp prefix.

import { spawn, spawnSync } from 'node:child_process';
import { cpSync, existsSync, mkdtempSync, readFileSync, realpathSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { repoRoot, startLoad } from '../helpers/netns.js';
import { inWorld, get, show } from '../helpers/world.js';
import { events } from '../helpers/events.js';

const VAGRANT_DIR = path.join(repoRoot, 'vagrant');
const PROVISION = path.join(VAGRANT_DIR, 'provision.sh');

// Async twin of runSync, so that vagrant validate (slow to start) overlaps the provision run.
const runAsync = (
  cmd: string,
  args: string[],
  opts: { cwd?: string; env?: NodeJS.ProcessEnv; timeoutMs?: number } = {},
) =>
  new Promise<{ code: number; stdout: string; stderr: string }>((resolve) => {
    const child = spawn(cmd, args, {
      cwd: opts.cwd,
      env: { ...process.env, ...opts.env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    const timer = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs ?? 60_000);
    child.on('error', (err) => (stderr += err.message));
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code: code ?? 128, stdout, stderr });
    });
  });

const has = (cmd: string) => spawnSync('sh', ['-c', `command -v ${cmd}`]).status === 0;
const runSync = (
  cmd: string,
  args: string[],
  opts: { cwd?: string; env?: NodeJS.ProcessEnv; timeoutMs?: number } = {},
) => {
  const r = spawnSync(cmd, args, {
    cwd: opts.cwd,
    env: { ...process.env, ...opts.env },
    encoding: 'utf8',
    timeout: opts.timeoutMs ?? 60_000,
    killSignal: 'SIGKILL',
  });
  return {
    code: r.status ?? 128,
    stdout: r.stdout ?? '',
    stderr: `${r.stderr ?? ''}${r.error ? r.error.message : ''}`,
  };
};

// provision.sh starts at once and runs while the first test checks the files; the second test awaits it.
const prefix = mkdtempSync(path.join(tmpdir(), 'portflip-provision-'));
// No systemd and a prefix: nothing outside it is written. apt-get runs only if something is missing.
const provisioned = runAsync('bash', [PROVISION, '--prefix', prefix, '--no-systemd', '--build'], {
  env: { npm_config_prefer_offline: 'true' },
  timeoutMs: 150_000,
});

test('the Vagrantfile validates (vagrant validate, or ruby -c without vagrant) and provision.sh parses (bash -n)', async () => {
  const vagrantfile = readFileSync(path.join(VAGRANT_DIR, 'Vagrantfile'), 'utf8');
  assert.match(vagrantfile, /config\.vm\.box = "debian\/trixie64"/);
  assert.match(vagrantfile, /forwarded_port", guest: 80, host: 8080/);
  assert.match(vagrantfile, /provision "shell", path: "provision.sh"/);

  if (has('vagrant')) {
    // A copy, so that the .vagrant/ folder and VAGRANT_HOME that vagrant writes stay out of the repo and $HOME.
    const tmp = mkdtempSync(path.join(tmpdir(), 'portflip-vagrant-'));
    try {
      cpSync(VAGRANT_DIR, path.join(tmp, 'vagrant'), { recursive: true });
      const r = await runAsync('vagrant', ['validate'], {
        cwd: path.join(tmp, 'vagrant'),
        env: { VAGRANT_HOME: path.join(tmp, 'home'), VAGRANT_CHECKPOINT_DISABLE: '1' },
      });
      assert.is(r.code, 0, `vagrant validate: ${r.stdout}${r.stderr}`);
      assert.match(r.stdout, /validated successfully/);
      console.log('  checked the Vagrantfile with vagrant validate');
    } finally {
      rmSync(tmp, { recursive: true, force: true });
    }
  } else if (has('ruby')) {
    const r = runSync('ruby', ['-c', path.join(VAGRANT_DIR, 'Vagrantfile')]);
    assert.is(r.code, 0, `ruby -c: ${r.stdout}${r.stderr}`);
    console.log("  vagrant is not installed: checked only the Vagrantfile's Ruby syntax with ruby -c");
  } else {
    console.log('  neither vagrant nor ruby is installed: the Vagrantfile was not checked');
  }

  const n = runSync('bash', ['-n', PROVISION]);
  assert.is(n.code, 0, `bash -n provision.sh: ${n.stderr}`);
  const help = runSync('bash', [PROVISION, '--help']);
  assert.is(help.code, 0, help.stderr);
  for (const flag of ['--prefix', '--no-systemd', '--source', '--executable', '--build'])
    assert.ok(help.stdout.includes(flag), `--help names ${flag}`);
});

test('the fleet demo: vagrant/fleet/Vagrantfile (a balancer, two app VMs) validates, its HAProxy config checks, the playbook parses', async () => {
  const fleetDir = path.join(VAGRANT_DIR, 'fleet');
  const vagrantfile = readFileSync(path.join(fleetDir, 'Vagrantfile'), 'utf8');
  assert.match(vagrantfile, /config\.vm\.define "lb"/);
  assert.match(vagrantfile, /"app1" => "192\.168\.56\.11", "app2" => "192\.168\.56\.12"/);
  assert.match(vagrantfile, /provision "shell", path: "\.\.\/provision\.sh"/);
  for (const script of ['balancer.sh', 'app-agent.sh']) {
    const n = runSync('bash', ['-n', path.join(fleetDir, script)]);
    assert.is(n.code, 0, `bash -n ${script}: ${n.stderr}`);
  }
  if (has('vagrant')) {
    const tmp = mkdtempSync(path.join(tmpdir(), 'portflip-vagrant-'));
    try {
      cpSync(VAGRANT_DIR, path.join(tmp, 'vagrant'), { recursive: true });
      const r = await runAsync('vagrant', ['validate'], {
        cwd: path.join(tmp, 'vagrant', 'fleet'),
        env: { VAGRANT_HOME: path.join(tmp, 'home'), VAGRANT_CHECKPOINT_DISABLE: '1' },
      });
      assert.is(r.code, 0, `vagrant validate: ${r.stdout}${r.stderr}`);
      assert.match(r.stdout, /validated successfully/);
    } finally {
      rmSync(tmp, { recursive: true, force: true });
    }
  } else {
    console.log('  vagrant is not installed: vagrant/fleet/Vagrantfile was not validated');
  }
  if (has('haproxy')) {
    const c = runSync('haproxy', ['-c', '-f', path.join(fleetDir, 'haproxy.cfg')]);
    assert.is(c.code, 0, `haproxy -c: ${c.stdout}${c.stderr}`);
  }
  if (has('ansible-playbook')) {
    const home = mkdtempSync(path.join(tmpdir(), 'portflip-ansible-'));
    try {
      const env = { ANSIBLE_CONFIG: path.join(fleetDir, 'ansible.cfg'), ANSIBLE_HOME: home, HOME: home };
      const syn = runSync(
        'ansible-playbook',
        ['--syntax-check', path.join(repoRoot, 'ansible', 'rolling-deploy.yml')],
        { cwd: fleetDir, env },
      );
      assert.is(syn.code, 0, `ansible-playbook --syntax-check: ${syn.stdout}${syn.stderr}`);
      const inv = runSync('ansible-inventory', ['--host', 'app1'], { cwd: fleetDir, env });
      assert.is(inv.code, 0, inv.stderr);
      const vars = JSON.parse(inv.stdout);
      assert.equal(vars.portflip_command, ['/usr/bin/node', 'server.js']);
      assert.is(vars.portflip_ports, '8001,8002');
    } finally {
      rmSync(home, { recursive: true, force: true });
    }
  }
});

test('provision.sh installs portflip into a prefix for real; the installed binary deploys the sample app under load', async () => {
  try {
    const r = await provisioned;
    assert.is(r.code, 0, `provision.sh: ${r.stdout}\n${r.stderr}`);
    const bin = path.join(prefix, 'usr/local/bin/portflip');
    const opt = path.join(prefix, 'opt/portflip');
    assert.is(realpathSync(bin), path.join(opt, 'dist/src/main.cjs'));
    assert.ok(existsSync(path.join(opt, 'node_modules/yargs')), 'runtime dependencies installed');
    assert.not.ok(existsSync(path.join(opt, 'node_modules/typescript')), 'dev dependencies pruned');
    assert.not.ok(existsSync(path.join(opt, '.git')), 'a clean copy, not the working repo');
    assert.ok(existsSync(path.join(prefix, 'srv/portflip-sample/server.js')));

    const help = runSync(bin, ['--help']);
    assert.is(help.code, 0, help.stderr);
    assert.match(`${help.stdout}${help.stderr}`, /deploy/);

    // The unit's own commands, run as they are written, inside a throwaway namespace with test state dirs.
    const unit = readFileSync(path.join(prefix, 'etc/systemd/system/portflip-sample.service'), 'utf8');
    const line = (key: string) => unit.match(new RegExp(`^${key}=(.*)$`, 'm'))![1].split(/\s+/);
    const start = line('ExecStart');
    assert.is(start[0], bin);
    assert.equal(line('ExecReload'), start);
    assert.equal(line('ExecStop'), [bin, 'stop', 'sample']);
    assert.match(unit, /Type=oneshot/);
    assert.match(unit, /RemainAfterExit=yes/);
    assert.match(unit, /WantedBy=multi-user.target/);
    if (has('systemd-analyze')) {
      // Its commands point into the prefix, where they exist, so verify checks the unit for real.
      const v = runSync(
        'systemd-analyze',
        ['verify', path.join(prefix, 'etc/systemd/system/portflip-sample.service')],
        { env: { SYSTEMD_LOG_LEVEL: 'warning' } },
      );
      assert.is(v.code, 0, `systemd-analyze verify: ${v.stdout}${v.stderr}`);
    }

    await inWorld(async (w) => {
      const env = {
        PORTFLIP_STATE_DIR: w.dirs.stateDir,
        PORTFLIP_RUN_DIR: w.dirs.runDir,
        PORTFLIP_PRELOAD_DIR: w.dirs.preloadDir,
      };
      const pf = (argv: string[], json = true) =>
        w.ns.exec(argv[0], [...argv.slice(1), ...(json ? ['--json'] : [])], { env, timeoutMs: 60_000 });
      // --json goes before `--`, which ends portflip's own flags.
      const withJson = (argv: string[]) => {
        const i = argv.indexOf('--');
        return [...argv.slice(0, i), '--json', ...argv.slice(i)];
      };
      const first = await pf(withJson(start), false);
      assert.is(first.code, 0, show(first));
      assert.match(await get(w.ns, 'http://127.0.0.1:80/'), /^hello from portflip-sample v1, pid \d+, port 800[12]/);

      const load = await startLoad(w.ns, 'server', {
        url: 'http://127.0.0.1:80/',
        mode: 'keepalive',
        concurrency: 2,
        durationMs: 30_000,
      });
      const again = await pf(withJson(line('ExecReload')), false);
      const res = await load.stop();
      assert.is(again.code, 0, show(again));
      const steps = events(again.stdout)
        .filter((e) => e.kind === 'step')
        .map((e) => e.step);
      assert.equal(steps, ['preflight', 'start', 'ready', 'bind-check', 'open', 'switch', 'drain', 'done']);
      assert.is(res.failed, 0, JSON.stringify(res));
      assert.ok(res.ok > 0);

      const stop = await pf(line('ExecStop'));
      assert.is(stop.code, 0, show(stop));
      assert.match(await get(w.ns, 'http://127.0.0.1:80/'), /^ERR/);
    });
  } finally {
    rmSync(prefix, { recursive: true, force: true });
  }
});

test.run();
