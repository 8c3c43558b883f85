// The restart methods the benchmark compares: each sets up one app in the server namespace, restarts it, tears down.
import { mkdirSync, mkdtempSync, readdirSync, readlinkSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import * as h from '../../dist/test/helpers/netns.js';

export const APP = h.fixture('app.mjs');
const PLAIN = h.fixture('plain-app.mjs');
const NGINX = h.fixture('nginx-app.sh');
const NGINX_BASE = path.join(tmpdir(), 'portflip-bench-nginx'); // nginx-app.sh makes one dir per instance in it
export const START_DELAY_MS = 1000; // the "configurable time to start (default 1 s)"
export const PUBLIC_PORT = 80; // portflip's public port
export const DIRECT_PORT = 8080; // the port the in-place contenders bind
const PM2 = path.join(h.repoRoot, 'node_modules', '.bin', 'pm2');

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// The environment every command the bench starts in the namespaces adds to the bench's own.
export const CLEAN_ENV = {};

// Every process inside our own namespaces is one we started (directly or via portflip/pm2): kill them by pid.
export function killNamespaceProcs(ns) {
  const targets = new Set();
  for (const holder of [ns.pid, ns.clientPid]) {
    if (!holder) continue;
    try {
      targets.add(readlinkSync(`/proc/${holder}/ns/net`));
    } catch {}
  }
  if (targets.size === 0) return 0;
  let n = 0;
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    const pid = Number(entry);
    if (pid === process.pid || pid === ns.pid || pid === ns.clientPid) continue;
    let link;
    try {
      link = readlinkSync(`/proc/${pid}/ns/net`);
    } catch {
      continue;
    }
    if (!targets.has(link)) continue;
    try {
      process.kill(pid, 'SIGKILL');
      n++;
    } catch {}
  }
  return n;
}

async function waitListening(ns, port, timeoutMs, child) {
  // Read /proc rather than connect: under the SYN-drop rule a loopback connect would hang too.
  await h.waitFor(() => {
    if (child && (child.exitCode !== null || child.signalCode !== null)) throw new Error(`app on ${port} exited (${child.exitCode ?? child.signalCode})`);
    return h.tcpCounts(ns, port).listening;
  }, timeoutMs, `a listener on port ${port}`);
}

// The kinds of app every contender restarts: the fixture (written to portflip's contract), a plain Node app whose
// SIGTERM handler is server.close(), and nginx (graceful stop on SIGQUIT). Each knows its command for a port.
export const APPS = {
  fixture: {
    title: "fixture (portflip's contract)",
    stopSignal: 'SIGTERM',
    command: (port, version, startDelayMs = START_DELAY_MS) => [process.execPath, APP, '--port', String(port), '--version', version, '--start-delay', String(startDelayMs)],
    env: {},
    portflipFlags: ['--ready', 'http://127.0.0.1:{port}/health'],
  },
  node: {
    title: 'plain Node app, server.close()',
    stopSignal: 'SIGTERM',
    command: (port, version) => [process.execPath, PLAIN, version],
    env: {},
    portflipFlags: [],
  },
  nginx: {
    title: 'nginx (SIGQUIT)',
    stopSignal: 'SIGQUIT',
    command: (port, version) => [NGINX, version],
    env: { NGINX_BASE },
    portflipFlags: ['--stop-signal', 'SIGQUIT', '--env', `NGINX_BASE=${NGINX_BASE}`],
  },
};

/** nginx-app.sh leaves one small dir per instance under NGINX_BASE: remove them once the apps are done. */
export const removeAppDirs = () => rmSync(NGINX_BASE, { recursive: true, force: true });

// One app instance bound to DIRECT_PORT, started in the server namespace, stopped by pid.
async function startInstance(ns, version, app = APPS.fixture) {
  mkdirSync(NGINX_BASE, { recursive: true });
  const [cmd, ...args] = app.command(DIRECT_PORT, version);
  const child = ns.spawn(cmd, args, { stdio: 'ignore', env: { ...CLEAN_ENV, ...app.env, PORT: String(DIRECT_PORT) } });
  child.stopSignal = app.stopSignal;
  await waitListening(ns, DIRECT_PORT, 15_000, child);
  return child;
}

async function stopInstance(child, killAfterMs = 10_000) {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((r) => child.once('exit', r));
  process.kill(child.pid, child.stopSignal ?? 'SIGTERM');
  const t = setTimeout(() => {
    try {
      process.kill(-child.pid, 'SIGKILL');
    } catch {}
  }, killAfterMs);
  await exited;
  clearTimeout(t);
}

function parseEvents(stdout) {
  return stdout.split('\n').filter(Boolean).flatMap((l) => {
    try {
      return [JSON.parse(l)];
    } catch {
      return [];
    }
  });
}

export function portflipDeployArgs(version, startDelayMs = START_DELAY_MS, app = APPS.fixture, ports = '20001,20002') {
  return ['deploy', 'web', '--listen', String(PUBLIC_PORT), '--ports', ports, ...app.portflipFlags, '--json',
    '--', ...app.command('{port}', version, startDelayMs)];
}

export async function portflipDeploy(ns, dirs, version, startDelayMs = START_DELAY_MS, app = APPS.fixture, ports = undefined) {
  mkdirSync(NGINX_BASE, { recursive: true });
  const args = portflipDeployArgs(version, startDelayMs, app, ports);
  const r = await h.portflip(ns, args, dirs, { timeoutMs: 90_000, env: CLEAN_ENV });
  const events = parseEvents(r.stdout);
  if (r.code !== 0) throw new Error(`portflip deploy exited ${r.code}: ${r.stderr.trim().slice(-800)} ${r.stdout.trim().slice(-800)}`);
  const step = (name) => events.find((e) => e.kind === 'step' && e.step === name);
  return {
    events,
    port: step('switch')?.port,
    steps: {
      startToReadyMs: (step('start')?.durationMs ?? 0) + (step('ready')?.durationMs ?? 0),
      switchMs: step('switch')?.durationMs,
      drainMs: step('drain')?.durationMs,
      totalMs: step('done')?.durationMs,
      preflightMs: step('preflight')?.durationMs,
    },
  };
}

export const contenders = {
  baseline: {
    title: 'no restart (baseline)',
    restarts: false,
    async setup(ctx) {
      ctx.child = await startInstance(ctx.ns, 'v0', ctx.app);
      return `http://${h.SERVER_ADDR}:${DIRECT_PORT}/`;
    },
    async restart() {},
    async teardown(ctx) {
      if (ctx.child) await stopInstance(ctx.child);
    },
  },

  portflip: {
    title: 'portflip',
    restarts: true,
    async setup(ctx) {
      ctx.dirs = h.tmpDirs();
      await portflipDeploy(ctx.ns, ctx.dirs, 'v0', START_DELAY_MS, ctx.app);
      return `http://${h.SERVER_ADDR}:${PUBLIC_PORT}/`;
    },
    async restart(ctx, i) {
      const d = await portflipDeploy(ctx.ns, ctx.dirs, `v${i}`, START_DELAY_MS, ctx.app);
      return { steps: d.steps };
    },
    async teardown(ctx) {
      if (!ctx.dirs) return;
      await h.portflip(ctx.ns, ['stop', 'web', '--json'], ctx.dirs, { timeoutMs: 20_000, env: CLEAN_ENV }).catch(() => {});
      ctx.dirs.cleanup();
    },
  },

  // one instance port: hold new SYNs in an NFQUEUE, stop the old, start the new on the same port, release
  inplace: {
    title: 'portflip in place (hold)',
    restarts: true,
    async setup(ctx) {
      ctx.dirs = h.tmpDirs();
      await portflipDeploy(ctx.ns, ctx.dirs, 'v0', START_DELAY_MS, ctx.app, '20001');
      return `http://${h.SERVER_ADDR}:${PUBLIC_PORT}/`;
    },
    async restart(ctx, i) {
      const d = await portflipDeploy(ctx.ns, ctx.dirs, `v${i}`, START_DELAY_MS, ctx.app, '20001');
      const step = (name) => d.events.find((e) => e.kind === 'step' && e.step === name)?.durationMs ?? 0;
      // the restart gap: from the hold to the release, what a held client waits at most
      const gapMs = ['stop-old', 'start', 'ready', 'bind-check', 'open', 'switch', 'release'].reduce((a, s) => a + step(s), 0);
      return { steps: { ...d.steps, holdGapMs: gapMs } };
    },
    async teardown(ctx) {
      if (!ctx.dirs) return;
      await h.portflip(ctx.ns, ['stop', 'web', '--json'], ctx.dirs, { timeoutMs: 20_000, env: CLEAN_ENV }).catch(() => {});
      ctx.dirs.cleanup();
    },
  },

  plain: {
    title: 'plain restart',
    restarts: true,
    async setup(ctx) {
      ctx.child = await startInstance(ctx.ns, 'v0', ctx.app);
      return `http://${h.SERVER_ADDR}:${DIRECT_PORT}/`;
    },
    // Stop the old (SIGTERM, the app drains gracefully and exits), then start the new on the same port.
    async restart(ctx, i) {
      await stopInstance(ctx.child);
      ctx.child = await startInstance(ctx.ns, `v${i}`, ctx.app);
    },
    async teardown(ctx) {
      if (ctx.child) await stopInstance(ctx.child);
    },
  },

  syndrop: {
    title: 'SYN-drop restart',
    restarts: true,
    async setup(ctx) {
      ctx.child = await startInstance(ctx.ns, 'v0', ctx.app);
      return `http://${h.SERVER_ADDR}:${DIRECT_PORT}/`;
    },
    // The classic recipe, in the server namespace only: drop new SYNs, restart in place, delete the rule.
    async restart(ctx, i) {
      const rule = ['INPUT', '-p', 'tcp', '--dport', String(DIRECT_PORT), '--syn', '-j', 'DROP'];
      const add = await ctx.ns.exec('iptables', ['-I', ...rule]);
      if (add.code !== 0) throw new Error(`iptables -I failed: ${add.stderr}`);
      try {
        await stopInstance(ctx.child);
        ctx.child = await startInstance(ctx.ns, `v${i}`, ctx.app);
      } finally {
        const del = await ctx.ns.exec('iptables', ['-D', ...rule]);
        if (del.code !== 0) throw new Error(`iptables -D failed: ${del.stderr}`);
      }
    },
    async teardown(ctx) {
      if (ctx.child) await stopInstance(ctx.child);
    },
  },

  pm2: {
    title: 'pm2 reload (cluster)',
    restarts: true,
    async setup(ctx) {
      ctx.pm2Home = mkdtempSync(path.join(tmpdir(), 'portflip-bench-pm2-'));
      // pm2's documented graceful options: listen_timeout (a worker counts as up when it listens or this passes),
      // kill_timeout (stop signal to SIGKILL). PM2_KILL_SIGNAL makes the stop signal SIGTERM, which the app drains on.
      const eco = path.join(ctx.pm2Home, 'ecosystem.config.cjs');
      const app = ctx.app ?? APPS.fixture;
      const [script, ...args] = app.command(DIRECT_PORT, 'pm2').slice(app === APPS.nginx ? 0 : 1);
      // Node apps in cluster mode (pm2's zero-downtime reload); nginx is no Node app: fork mode, where reload restarts
      const mode = app === APPS.nginx ? { exec_mode: 'fork', interpreter: 'none' } : { exec_mode: 'cluster', instances: 1 };
      mkdirSync(NGINX_BASE, { recursive: true });
      writeFileSync(eco, `module.exports = ${JSON.stringify({
        apps: [{
          name: 'web', script, args, ...mode, env: { PORT: String(DIRECT_PORT), ...app.env },
          listen_timeout: 10000, kill_timeout: 10000, autorestart: true,
        }],
      }, null, 2)};\n`);
      ctx.pm2Env = { ...CLEAN_ENV, PM2_HOME: ctx.pm2Home, PM2_KILL_SIGNAL: app.stopSignal };
      const r = await ctx.ns.exec(PM2, ['start', eco], { env: ctx.pm2Env, timeoutMs: 30_000 });
      if (r.code !== 0) throw new Error(`pm2 start failed (${r.code}): ${(r.stderr || r.stdout).trim().slice(-600)}`);
      await waitListening(ctx.ns, DIRECT_PORT, 15_000);
      return `http://${h.SERVER_ADDR}:${DIRECT_PORT}/`;
    },
    async restart(ctx) {
      const r = await ctx.ns.exec(PM2, ['reload', 'web'], { env: ctx.pm2Env, timeoutMs: 30_000 });
      if (r.code !== 0) throw new Error(`pm2 reload failed (${r.code}): ${(r.stderr || r.stdout).trim().slice(-600)}`);
    },
    async teardown(ctx) {
      if (!ctx.pm2Home) return;
      await ctx.ns.exec(PM2, ['kill'], { env: ctx.pm2Env, timeoutMs: 15_000 }).catch(() => {});
      // The daemon detached from our process group: the caller kills whatever is left in the namespace, by pid.
      rmSync(ctx.pm2Home, { recursive: true, force: true });
    },
  },
};

export { sleep };
