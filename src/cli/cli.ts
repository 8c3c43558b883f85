// Turns argv into typed options, calls the core, and maps errors to exit codes. Nothing else does either.

import { resolve } from 'node:path';
import yargs, { type Argv } from 'yargs';
import type { DeployOptions } from '../commands/deploy.js';
import { parseDuration } from '../core/duration.js';
import { HOOKS, appFromFile, readConfig, writeStarter, type AppConfig } from './config.js';
import { ExitCode, PortflipError, fail, fromSystemError } from '../core/errors.js';
import { canonicalCidr } from '../os/iptables.js';
import { formatHuman, makeEmitter, type Event } from '../core/events.js';
import type { Ctx } from '../ops/context.js';
import { isExecutable, versionText } from '../os/self.js';
import { paths } from '../core/state.js';
import { realSys } from '../os/sys.js';
export { yieldCpu } from '../os/sys.js'; // main.cts calls it once the CLI is loaded, before any work
import type { DrainMode } from '../core/state.js';

// Each command loads only the modules it uses: a status or a deploy should not pay for the others.
const lazy = {
  agent: () => import('../commands/agent.js'),
  canary: () => import('../commands/canary.js'),
  deploy: () => import('../commands/deploy.js'),
  hold: () => import('../commands/hold.js'),
  supervisor: () => import('../commands/supervisor.js'),
  systemd: () => import('../os/systemd.js'),
  watch: () => import('../commands/watch.js'),
  status: () => import('../commands/status.js'),
  logs: () => import('../commands/logs.js'),
  rollback: () => import('../commands/rollback.js'),
  stop: () => import('../commands/stop.js'),
  restore: () => import('../commands/restore.js'),
  cleanup: () => import('../commands/cleanup.js'),
  reap: () => import('../commands/reap.js'),
  context: () => import('../ops/context.js'),
  conntrack: () => import('../ops/conntrack.js'),
};

const STOP_SIGNALS = ['SIGTERM', 'SIGINT', 'SIGQUIT', 'SIGHUP', 'SIGUSR1', 'SIGUSR2', 'SIGWINCH', 'SIGKILL'];

function port(v: unknown, flag: string): number {
  const n = Number(v);
  if (!/^\d+$/.test(String(v)) || n < 1 || n > 65535)
    fail('usage', `${flag} ${v}: a port is a whole number from 1 to 65535`);
  return n;
}

/** Flags win over the config file, which wins over the defaults. */
export function toDeployOptions(flags: Record<string, any>, cfg: AppConfig, file: string | null): DeployOptions {
  const from = (flag: string, key: keyof AppConfig, fallback?: unknown) => flags[flag] ?? cfg[key] ?? fallback;
  const dur = (v: unknown, flag: string) => (typeof v === 'number' ? v * 1000 : parseDuration(String(v), flag));
  const a = {
    app: flags.app,
    listen: from('listen', 'listen'),
    ports: flags.ports ?? cfg.ports?.join(','),
    cwd: from('cwd', 'cwd'),
    user: from('user', 'user'),
    ready: flags.ready ?? (flags.readyCmd ? undefined : cfg.ready),
    readyCmd: flags.readyCmd ?? (flags.ready ? undefined : cfg.ready_cmd),
    readyTimeout: from('readyTimeout', 'ready_timeout', '60s'),
    drain: from('drain', 'drain', 'auto'),
    drainTimeout: from('drainTimeout', 'drain_timeout', '30s'),
    stopSignal: from('stopSignal', 'stop_signal', 'SIGTERM'),
    killAfter: from('killAfter', 'kill_after', '10s'),
    keepOld: from('keepOld', 'keep_old'),
    verify: from('verify', 'verify'),
    ipv6: from('ipv6', 'ipv6', 'auto'),
    firewall: from('firewall', 'firewall', 'auto'),
    exposePorts: from('exposePorts', 'expose_ports', false),
    allowFrom: flags.allowFrom ?? cfg.allow_from ?? [],
    nodeDrain: from('nodeDrain', 'node_drain', 'on'),
    markClose: from('markClose', 'mark_close', 'on'),
    dryRun: flags.dryRun,
    env: flags.env,
  };
  const where = file ? ` or set it in ${file}` : '';
  if (a.listen === undefined)
    fail('usage', `give --listen PORT${where || ` (or write a config file: portflip init ${a.app})`}`);
  const command = (flags['--'] as unknown[] | undefined)?.length
    ? (flags['--'] as unknown[]).map(String)
    : (cfg.command ?? []);
  if (!command.length) {
    const orConfig = where ? `, or set command in ${file}` : '';
    fail(
      'usage',
      `no command: write it after "--", like: portflip deploy web --listen 80 -- node server.js${orConfig}`,
    );
  }
  const ready = String(a.ready ?? 'tcp');
  if (a.readyCmd && a.ready && a.ready !== 'tcp') fail('usage', 'give --ready or --ready-cmd, not both');
  if (ready !== 'tcp' && !/^https?:\/\/[^/]/.test(ready))
    fail('usage', `--ready ${ready}: use tcp or an http(s):// URL such as http://127.0.0.1:{port}/health`);
  const signal = String(a.stopSignal)
    .toUpperCase()
    .replace(/^(?!SIG)/, 'SIG');
  if (!STOP_SIGNALS.includes(signal))
    fail('usage', `--stop-signal ${a.stopSignal}: use one of ${STOP_SIGNALS.join(', ')}`);
  if (!['auto', 'signal', 'idle'].includes(a.drain)) fail('usage', `--drain ${a.drain}: use auto, signal or idle`);
  if (!['auto', 'on', 'off'].includes(a.ipv6)) fail('usage', `--ipv6 ${a.ipv6}: use auto, on or off`);
  if (!['auto', 'off'].includes(a.firewall)) fail('usage', `--firewall ${a.firewall}: use auto or off`);
  const allowFrom = [a.allowFrom]
    .flat()
    .flatMap((v) => String(v).split(','))
    .map((v) => v.trim())
    .filter(Boolean)
    .map((v) => {
      return (
        canonicalCidr(v) ??
        fail('usage', `--allow-from ${v}: not an address or network; write it like 192.0.2.0/24 or 2001:db8::/32`)
      );
    });
  if (allowFrom.length && a.firewall === 'off')
    fail('usage', "--allow-from needs portflip's filter chain; drop --firewall off");
  if (!['on', 'off'].includes(a.nodeDrain)) fail('usage', `--node-drain ${a.nodeDrain}: use on or off`);
  if (!['on', 'off'].includes(a.markClose)) fail('usage', `--mark-close ${a.markClose}: use on or off`);
  const env: Record<string, string> = { ...cfg.env };
  for (const kv of [a.env ?? []].flat().map(String)) {
    const i = kv.indexOf('=');
    if (i < 1) fail('usage', `--env ${kv}: write it as NAME=value`);
    env[kv.slice(0, i)] = kv.slice(i + 1);
  }
  const ports =
    a.ports === undefined
      ? undefined
      : String(a.ports)
          .split(',')
          .map((p) => port(p.trim(), '--ports'));
  // one port is allowed: an in-place restart (README "Hold")
  return {
    app: String(a.app),
    listen: port(a.listen, '--listen'),
    command,
    ports,
    cwd: String(a.cwd ?? process.cwd()),
    user: a.user,
    env,
    ready: a.readyCmd
      ? { kind: 'cmd', command: String(a.readyCmd), cwd: String(a.cwd ?? process.cwd()) }
      : ready === 'tcp'
        ? { kind: 'tcp' }
        : { kind: 'http', url: ready },
    readyTimeoutMs: dur(a.readyTimeout, '--ready-timeout'),
    stop: {
      drain: a.drain as DrainMode,
      drainTimeoutMs: dur(a.drainTimeout, '--drain-timeout'),
      stopSignal: signal as NodeJS.Signals,
      killAfterMs: dur(a.killAfter, '--kill-after'),
      ...(a.markClose === 'off' ? { markClose: false } : {}),
    },
    keepOldMs: a.keepOld === undefined ? undefined : dur(a.keepOld, '--keep-old'),
    verifyMs: a.verify === undefined ? undefined : dur(a.verify, '--verify'),
    ipv6: a.ipv6,
    firewall: { mode: a.firewall, exposePorts: !!a.exposePorts, allowFrom: [...new Set(allowFrom)] },
    nodeDrain: a.nodeDrain === 'on',
    dryRun: !!a.dryRun,
    hooks: Object.fromEntries(HOOKS.filter((h) => cfg[h]).map((h) => [h, cfg[h]!])),
  };
}

const appArg = (y: Argv) => y.positional('app', { type: 'string', describe: 'the app name (1-25 of a-z 0-9 - _)' });

/** The deploy flags, shared by deploy and run. */
const deployFlags = (y: Argv) =>
  y
    .option('listen', { type: 'string', describe: 'the public port' })
    .option('ports', { type: 'string', describe: 'instance ports to alternate between, e.g. 8001,8002' })
    .option('cwd', { type: 'string', describe: 'working directory of the app' })
    .option('user', { type: 'string', describe: 'run the app as this user' })
    .option('env', { type: 'string', array: true, describe: 'K=V, repeatable' })
    .option('ready', { type: 'string', describe: 'tcp (default), or http://127.0.0.1:{port}/PATH (2xx/3xx)' })
    .option('ready-cmd', { type: 'string', describe: 'a shell command that exits 0 when ready ($PORT set)' })
    .option('ready-timeout', { type: 'string', describe: 'default 60s' })
    .option('drain', {
      type: 'string',
      describe:
        'auto (default): signal for Node.js instances with the drain module; for others wait until every ' +
        'connection is closed or quiet; signal: stop signal right after the switch; idle: wait for no open connections',
    })
    .option('drain-timeout', { type: 'string', describe: 'default 30s' })
    .option('stop-signal', { type: 'string', describe: 'default SIGTERM' })
    .option('kill-after', { type: 'string', describe: 'default 10s' })
    .option('keep-old', { type: 'string', describe: 'keep the previous instance this long for an instant rollback' })
    .option('verify', {
      type: 'string',
      describe: 'after the switch, watch the new instance this long; switch back if it dies or fails its check',
    })
    .option('ipv6', {
      type: 'string',
      describe: 'auto: redirect IPv6 when the host has it and the app listens on ::; on; off',
    })
    .option('firewall', {
      type: 'string',
      describe: 'auto (default): accept redirected traffic in the filter table; off: never touch it',
    })
    .option('expose-ports', {
      type: 'boolean',
      describe: 'let other hosts reach instance ports directly (private by default)',
    })
    .option('allow-from', {
      type: 'string',
      array: true,
      describe: 'accept redirected traffic only from these networks (CIDR, repeatable or comma-separated)',
    })
    .option('node-drain', {
      type: 'string',
      describe: 'on (default): load the drain module into Node.js instances (NODE_OPTIONS); off',
    })
    .option('mark-close', {
      type: 'string',
      describe:
        'on (default): while an instance idle-drains, mark one HTTP/1.x answer per keep-alive connection ' +
        'Connection: close, so its client reconnects to the new instance; off',
    })
    .option('dry-run', { type: 'boolean', describe: 'print the steps and rules, change nothing' });

/** deploy only: a canary is one deploy's choice, so `portflip run` and config files do not take it (README). */
const canaryFlags = (y: Argv) =>
  y
    .option('canary', {
      type: 'string',
      describe: 'send this share of new connections (e.g. 10%) to the new instance; then promote or abort',
    })
    .option('canary-by', {
      type: 'string',
      describe: 'conn (default): decide per new connection; ip: per client address (a hash, sticky)',
    })
    .option('canary-for', {
      type: 'string',
      describe: 'promote on its own after this long of passing checks; abort if it dies or fails two in a row',
    });

/** The part of yargs' internals that main() reaches to skip its help-text cache (as in yargs 18). */
interface YargsInternals {
  getInternalMethods?(): { getUsageInstance?(): { cacheHelpMessage: () => void } } | undefined;
}

/** The app named on the command line, or the one a -c file stands for (web.toml -> web). */
function appName(a: Record<string, unknown>): string {
  if (a.app) return String(a.app);
  if (a.config) return appFromFile(String(a.config));
  return fail('usage', 'name the app, like: portflip deploy web (or give -c FILE)');
}

export async function main(argv: string[]): Promise<number> {
  const abort = new AbortController();
  let interrupts = 0;
  const onSignal = (sig: NodeJS.Signals) => {
    // the first signal asks the core to stop and undo; a second one leaves at once
    if (++interrupts > 1) process.exit(130);
    process.stderr.write(`portflip: ${sig} received; finishing up, undoing what is not done (again to quit now)\n`);
    abort.abort();
  };
  const own = argv.includes('--') ? argv.slice(0, argv.indexOf('--')) : argv; // the app's own flags are not ours
  const json = own.includes('--json');
  const ctx: Ctx = { sys: realSys, paths: paths(), emit: makeEmitter(json), env: process.env, abort: abort.signal };
  let command: Promise<void> = Promise.resolve();
  const run = (fn: () => Promise<void>) => {
    command = fn();
  };

  const parser = yargs(argv)
    .scriptName('portflip')
    .usage('$0 <command> [app] [options]')
    .parserConfiguration({ 'populate--': true })
    .option('json', { type: 'boolean', describe: 'one JSON object per line on stdout' })
    .option('config', { alias: 'c', type: 'string', describe: 'config file (default /etc/portflip/APP.toml)' })
    .command(
      'deploy [app]',
      'start a new instance and flip the public port to it',
      (y) => canaryFlags(deployFlags(appArg(y))).usage('$0 deploy <app> --listen PORT [options] -- COMMAND [ARGS...]'),
      (a) =>
        run(async () => {
          const app = appName(a);
          const { path, config } = await readConfig(ctx.sys, app, a.config as string | undefined);
          const [{ deploy }, { canaryOptions }] = await Promise.all([lazy.deploy(), lazy.canary()]);
          const o = toDeployOptions({ ...a, app }, config, path);
          const canary = canaryOptions(a);
          await deploy(canary ? { ...o, canary, keepOldMs: undefined, verifyMs: undefined } : o, ctx);
        }),
    )
    .command(
      'init [app]',
      'write a commented starting config file (/etc/portflip/APP.toml or -c FILE)',
      (y) => appArg(y),
      (a) =>
        run(async () => {
          const path = await writeStarter(ctx.sys, appName(a), a.config as string | undefined);
          process.stderr.write(`wrote ${path}; edit it, then: portflip deploy ${appName(a)}\n`);
        }),
    )
    .command(
      'run [app]',
      'deploy the app and keep it up in the foreground (for systemd): restart it when it crashes, ' +
        'deploy again on SIGHUP or `portflip reload`',
      (y) => deployFlags(appArg(y)).usage('$0 run <app> [-c FILE] [deploy options] [-- COMMAND [ARGS...]]'),
      (a) =>
        run(async () => {
          const app = appName(a);
          if (a.dryRun)
            fail('usage', 'run keeps an app up; --dry-run belongs to deploy (portflip deploy --dry-run ...)');
          // a long-lived supervisor queues its own signals (supervisor.ts); the one-shot Ctrl-C handling in main() does not apply
          for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.removeAllListeners(sig);
          const load = async () => {
            const { path, config } = await readConfig(ctx.sys, app, a.config as string | undefined);
            return toDeployOptions({ ...a, app }, config, path);
          };
          const { supervise } = await lazy.supervisor();
          await supervise({ app, load }, ctx);
        }),
    )
    .command(
      'reload [app]',
      'ask the running `portflip run APP` for a zero-downtime deploy (config file re-read); waits for the result',
      (y) => appArg(y),
      (a) => run(async () => (await lazy.supervisor()).requestReload(ctx, appName(a))),
    )
    .command(
      'systemd [app]',
      'print a systemd unit for `portflip run APP`; with --restore, a unit that restores the rules at boot; ' +
        'with --watch, one that heals them',
      (y) =>
        appArg(y)
          .option('restore', { type: 'boolean', describe: 'print the boot-time `portflip restore` unit instead' })
          .option('watch', {
            type: 'boolean',
            describe: 'print the `portflip watch` unit instead (heals rules after a firewall reload)',
          }),
      (a) =>
        run(async () => {
          const { appUnit, execPrefix, restoreUnit, watchUnit } = await lazy.systemd();
          // the single executable is started by itself; the npm build by node and its script
          const exec = isExecutable() ? [process.execPath] : execPrefix(resolve(process.argv[1]), process.execPath);
          const config = a.config ? resolve(String(a.config)) : undefined;
          process.stdout.write(
            a.restore ? restoreUnit(exec) : a.watch ? watchUnit(exec) : appUnit({ app: appName(a), exec, config }),
          );
        }),
    )
    .command(
      'watch',
      "keep every app's rules in line with its state file: repair them within a second after a firewall reload",
      (y) => y.option('interval', { type: 'string', describe: 'how often to compare (default 500ms)' }),
      (a) =>
        run(async () => {
          const [{ requireNetAdmin }, { watch }] = await Promise.all([lazy.context(), lazy.watch()]);
          await requireNetAdmin(ctx.sys);
          await watch(ctx, a.interval === undefined ? 500 : parseDuration(String(a.interval), '--interval'));
        }),
    )
    .command(
      'status [app]',
      'show apps, instances and whether the live rules agree',
      (y) =>
        appArg(y).option('watch', {
          alias: 'w',
          type: 'string',
          describe: 'refresh every N seconds (default 2) until Ctrl-C',
        }),
      (a) =>
        run(async () => {
          const tty = !!process.stdout.isTTY;
          const colour = tty && !process.env.NO_COLOR;
          const every = a.watch === undefined ? 0 : a.watch === '' ? 2000 : parseDuration(String(a.watch), '--watch');
          do {
            const [{ status, formatStatus }, { conntrackFill }] = await Promise.all([lazy.status(), lazy.conntrack()]);
            const [apps, conntrack] = await Promise.all([
              status(ctx, a.app || a.config ? appName(a) : undefined),
              conntrackFill(ctx.sys),
            ]);
            if (json) process.stdout.write(JSON.stringify({ apps, conntrack }) + '\n');
            else
              process.stdout.write(
                (every && tty ? '\x1b[H\x1b[2J' : '') +
                  formatStatus(apps, colour, conntrack) +
                  '\n' +
                  (every ? '\n' : ''),
              );
            if (every) await ctx.sys.sleep(every, abort.signal);
          } while (every && !abort.signal.aborted);
        }),
    )
    .command(
      'logs [app]',
      "show the active instance's log",
      (y) =>
        appArg(y)
          .option('follow', {
            alias: 'f',
            type: 'boolean',
            describe: 'keep printing new lines, across deploys, until Ctrl-C',
          })
          .option('lines', { alias: 'n', type: 'number', default: 50, describe: 'how many lines to show first' }),
      (a) =>
        run(async () =>
          (await lazy.logs()).logs(ctx, appName(a), { follow: !!a.follow, lines: Number(a.lines) }, (s) =>
            process.stdout.write(s),
          ),
        ),
    )
    .command(
      'rollback [app]',
      'point the public port back at the kept previous instance',
      (y) => appArg(y),
      (a) => run(async () => (await lazy.rollback()).rollback(ctx, appName(a))),
    )
    .command(
      'pause [app]',
      'hold new connections to the public port until resume (open ones keep flowing)',
      (y) =>
        appArg(y)
          .option('timeout', { type: 'string', default: '60s', describe: 'release on its own after this long' })
          .option('queue-len', { type: 'number', describe: 'how many SYNs the queue keeps (default 8192)' })
          .option('dry-run', { type: 'boolean', describe: 'print the steps, change nothing' }),
      (a) =>
        run(async () => {
          const { pause, DEFAULT_QUEUE_LEN } = await lazy.hold();
          const timeoutMs = parseDuration(String(a.timeout), '--timeout');
          const queueLen = a.queueLen === undefined ? DEFAULT_QUEUE_LEN : Number(a.queueLen);
          await pause(ctx, appName(a), { timeoutMs, queueLen, dryRun: !!a.dryRun });
        }),
    )
    .command(
      'resume [app]',
      'let every held new connection in at once and stop holding',
      (y) => appArg(y),
      (a) => run(async () => (await lazy.hold()).resume(ctx, appName(a))),
    )
    .command(
      'promote [app]',
      'make the live canary the only instance (its old one drains); with --canary P%, only set its share',
      (y) =>
        appArg(y)
          .option('canary', { type: 'string', describe: 'set the share to this (e.g. 50%) instead of promoting' })
          .option('dry-run', { type: 'boolean', describe: 'print the steps and rules, change nothing' }),
      (a) =>
        run(async () => {
          const { parseShare, promote } = await lazy.canary();
          const percent = a.canary === undefined ? undefined : parseShare(a.canary, '--canary');
          await promote(ctx, appName(a), { percent, dryRun: !!a.dryRun });
        }),
    )
    .command(
      'abort [app]',
      'send every new connection back to the active instance; the canary drains and stops',
      (y) => appArg(y).option('dry-run', { type: 'boolean', describe: 'print the steps and rules, change nothing' }),
      (a) => run(async () => (await lazy.canary()).abort(ctx, appName(a), { dryRun: !!a.dryRun })),
    )
    .command(
      'stop [app]',
      "remove the app's rules and stop all its instances",
      (y) => appArg(y),
      (a) => run(async () => (await lazy.stop()).stop(ctx, appName(a))),
    )
    .command(
      'restore',
      "re-create every app's rules from the state files",
      (y) => y,
      () => run(async () => (await lazy.restore()).restore(ctx)),
    )
    .command(
      'cleanup',
      'remove every chain and rule portflip owns',
      (y) => y.option('stop-instances', { type: 'boolean', describe: 'also stop every instance and forget the apps' }),
      (a) => run(async () => (await lazy.cleanup()).cleanup(ctx, !!a.stopInstances)),
    )
    .command(
      'agent [app]',
      "answer HAProxy's agent-check for APP from portflip's state (drain/maint/ready, up/down, weight)",
      (y) =>
        appArg(y)
          .option('port', { type: 'string', describe: 'TCP port to answer on (default 9777)' })
          .option('address', { type: 'string', describe: 'address to listen on (default: all)' })
          .option('set', {
            type: 'string',
            describe: 'drain, maint, ready or clear: what this host tells HAProxy from now on',
          })
          .option('once', { type: 'boolean', describe: 'print the answer HAProxy would get now, and exit' }),
      (a) =>
        run(async () => {
          const app = appName(a);
          const { DEFAULT_AGENT_PORT, agentAnswer, readView, serveAgent, setMode } = await lazy.agent();
          if (a.set !== undefined) {
            const file = await setMode(ctx.sys, ctx.paths, app, String(a.set));
            process.stderr.write(`${app}: agent mode ${a.set} (${file})\n`);
          } else if (a.once) process.stdout.write(agentAnswer(await readView(ctx.sys, ctx.paths, app)) + '\n');
          else {
            const listen = a.port === undefined ? DEFAULT_AGENT_PORT : port(a.port, '--port');
            const address = a.address as string | undefined;
            await serveAgent(ctx.sys, ctx.paths, { app, port: listen, address }, ctx.emit, abort.signal);
          }
        }),
    )
    .command(
      '_reap <app>',
      false,
      (y) => appArg(y),
      (a) => run(async () => (await lazy.reap()).reap(ctx, String(a.app))),
    )
    .demandCommand(
      1,
      'name a command: deploy, promote, abort, status, logs, rollback, pause, resume, stop, restore, cleanup, init, ' +
        'run, reload, watch, systemd or agent',
    )
    .strict()
    .help()
    .version(versionText())
    .completion('completion', false) // hidden: the .deb installs its output as bash completion
    .wrap(Math.min(110, process.stdout.columns || 100))
    .exitProcess(false)
    .fail((msg, err) => {
      throw err instanceof PortflipError ? err : new PortflipError('usage', msg || String(err?.message));
    });

  // yargs lays out the command's whole help text each time it starts a command's handler, in case the
  // handler prints it (5-13 ms of a deploy's start); portflip's handlers never do, and --help is not cached
  const usage = (parser as unknown as YargsInternals).getInternalMethods?.()?.getUsageInstance?.();
  if (usage) usage.cacheHelpMessage = () => {}; // a yargs without these internals runs as before

  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  process.on('SIGHUP', onSignal);
  try {
    await parser.parseAsync();
    await command;
    return ExitCode.ok;
  } catch (caught) {
    const err = fromSystemError(caught) ?? caught;
    if (err instanceof PortflipError) {
      const failed: Event = { kind: 'error', error: err.kind, exitCode: err.exitCode, message: err.message };
      // scripts read it as the last JSON line; people read it on stderr in either mode
      if (json) ctx.emit(failed);
      process.stderr.write(formatHuman(failed) + '\n');
      return err.exitCode;
    }
    process.stderr.write(`portflip: internal error: ${(err as Error)?.stack ?? err}\n`);
    return ExitCode.internal;
  }
}
