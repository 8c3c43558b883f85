// Turns argv into typed options, calls the command's module, and maps errors to exit codes. Nothing else does either.
// COMMANDS is the whole command line: each entry names its flags (options.ts checks them) and the module that does
// the work, loaded only when that command runs, so a status or a deploy does not pay for the others.

import { resolve } from 'node:path';
import yargs, { type Argv } from 'yargs';
import { parseDuration } from '../core/duration.js';
import { ExitCode, PortflipError, fail, fromSystemError } from '../core/errors.js';
import { formatHuman, makeEmitter, type Event } from '../core/events.js';
import { paths } from '../core/state.js';
import type { HistoryAction } from '../core/history.js';
import type { Ctx } from '../ops/context.js';
import type { MetricsAddress } from '../ops/metrics-http.js';
import { isExecutable, versionText } from '../os/self.js';
import { realSys } from '../os/sys.js';
import { readConfig, writeStarter } from './config.js';
import {
  appArg,
  appName,
  canaryFlags,
  count,
  deployFlags,
  metricsAddress,
  metricsFlag,
  parseShare,
  port,
  toDeployOptions,
} from './options.js';
export { yieldCpu } from '../os/sys.js'; // main.cts calls it once the CLI is loaded, before any work

/** What a command runs with: the core's context, --json, and the abort signal of the first Ctrl-C. */
interface Io {
  ctx: Ctx;
  json: boolean;
  abort: AbortSignal;
}

interface Command {
  usage: string; // yargs' command string: the name and its positionals
  describe: string | false; // false: hidden
  flags?: (y: Argv) => Argv;
  run(a: Record<string, any>, io: Io): Promise<void>;
  /** What a run does to its app, for the app's history (ops/record.ts); absent: it changes no app. */
  records?: HistoryAction;
  every?: true; // it works on every app (restore, cleanup): one record per app it changed
}

/** A long-lived command with its metrics: `--metrics ADDR` served, and with `refreshTextfile` the textfile kept fresh. */
async function withMetrics(
  listen: MetricsAddress | undefined,
  ctx: Ctx,
  refreshTextfile: boolean,
  fn: () => Promise<void>,
): Promise<void> {
  if (!listen && !refreshTextfile) return fn(); // nothing to load
  await (await import('../ops/metrics-http.js')).withMetrics(ctx, { listen, refreshTextfile }, fn);
}

const metricsOf = (a: Record<string, any>) => (a.metrics === undefined ? undefined : metricsAddress(a.metrics));

const dryRunFlag = (y: Argv) =>
  y.option('dry-run', { type: 'boolean', describe: 'print the steps and rules, change nothing' });

/** The flags, and a config file when the app has one, as deploy options (options.ts checks them all). */
async function deployOptions(a: Record<string, any>, ctx: Ctx) {
  const app = appName(a);
  const { path, config, hash } = await readConfig(ctx.sys, app, a.config as string | undefined);
  const o = toDeployOptions({ ...a, app }, config, path);
  return hash ? { ...o, configHash: hash } : o;
}

const COMMANDS: Command[] = [
  {
    usage: 'deploy [app]',
    records: 'deploy',
    describe: 'start a new instance and flip the public port to it',
    flags: (y) =>
      canaryFlags(deployFlags(appArg(y))).usage('$0 deploy <app> --listen PORT [options] -- COMMAND [ARGS...]'),
    run: async (a, { ctx }) => {
      const o = await deployOptions(a, ctx);
      await (await import('../commands/deploy.js')).deploy(o, ctx);
    },
  },
  {
    usage: 'init [app]',
    describe: 'write a commented starting config file (/etc/portflip/APP.toml or -c FILE)',
    flags: appArg,
    run: async (a, { ctx }) => {
      const path = await writeStarter(ctx.sys, appName(a), a.config as string | undefined);
      process.stderr.write(`wrote ${path}; edit it, then: portflip deploy ${appName(a)}\n`);
    },
  },
  {
    usage: 'run [app]',
    describe:
      'deploy the app and keep it up in the foreground (for systemd): restart it when it crashes, ' +
      'deploy again on SIGHUP or `portflip reload`',
    flags: (y) =>
      metricsFlag(deployFlags(appArg(y))).usage('$0 run <app> [-c FILE] [deploy options] [-- COMMAND [ARGS...]]'),
    run: async (a, { ctx }) => {
      const app = appName(a);
      if (a.dryRun) fail('usage', 'run keeps an app up; --dry-run belongs to deploy (portflip deploy --dry-run ...)');
      const listen = metricsOf(a); // a bad ADDR fails before any work
      // a long-lived supervisor queues its own signals (supervisor.ts), not main()'s one-shot Ctrl-C handling
      for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.removeAllListeners(sig);
      const { supervise } = await import('../commands/supervisor.js');
      await withMetrics(listen, ctx, true, () =>
        supervise({ app, load: () => deployOptions({ ...a, app }, ctx) }, ctx),
      );
    },
  },
  {
    usage: 'reload [app]',
    describe:
      'ask the running `portflip run APP` for a zero-downtime deploy (config file re-read); waits for the result',
    flags: appArg,
    run: async (a, { ctx }) => (await import('../commands/supervisor.js')).requestReload(ctx, appName(a)),
  },
  {
    usage: 'systemd [app]',
    describe:
      'print a systemd unit for `portflip run APP`; with --restore, a unit that restores the rules at boot; ' +
      'with --watch, one that heals them',
    flags: (y) =>
      appArg(y)
        .option('restore', { type: 'boolean', describe: 'print the boot-time `portflip restore` unit instead' })
        .option('watch', {
          type: 'boolean',
          describe: 'print the `portflip watch` unit instead (heals rules after a firewall reload)',
        }),
    run: async (a) => {
      const { appUnit, execPrefix, restoreUnit, watchUnit } = await import('../os/systemd.js');
      // the single executable is started by itself; the npm build by node and its script
      const exec = isExecutable() ? [process.execPath] : execPrefix(resolve(process.argv[1]), process.execPath);
      const config = a.config ? resolve(String(a.config)) : undefined;
      process.stdout.write(
        a.restore ? restoreUnit(exec) : a.watch ? watchUnit(exec) : appUnit({ app: appName(a), exec, config }),
      );
    },
  },
  {
    usage: 'watch',
    describe: "keep every app's rules in line with its state file: repair them within a second after a firewall reload",
    flags: (y) =>
      metricsFlag(y.option('interval', { type: 'string', describe: 'how often to compare (default 500ms)' })),
    run: async (a, { ctx }) => {
      const [{ requireNetAdmin }, { watch }] = await Promise.all([
        import('../ops/context.js'),
        import('../commands/watch.js'),
      ]);
      const every = a.interval === undefined ? 500 : parseDuration(String(a.interval), '--interval');
      const listen = metricsOf(a);
      await requireNetAdmin(ctx.sys);
      await withMetrics(listen, ctx, true, () => watch(ctx, every));
    },
  },
  {
    usage: 'status [app]',
    describe: 'show apps, instances and whether the live rules agree',
    flags: (y) =>
      appArg(y).option('watch', {
        alias: 'w',
        type: 'string',
        describe: 'refresh every N seconds (default 2) until Ctrl-C',
      }),
    run: async (a, { ctx, json, abort }) => {
      const tty = !!process.stdout.isTTY;
      const colour = tty && !process.env.NO_COLOR;
      const every = a.watch === undefined ? 0 : a.watch === '' ? 2000 : parseDuration(String(a.watch), '--watch');
      do {
        const [{ status, formatStatus }, { conntrackFill }] = await Promise.all([
          import('../commands/status.js'),
          import('../ops/conntrack.js'),
        ]);
        const [apps, conntrack] = await Promise.all([
          status(ctx, a.app || a.config ? appName(a) : undefined),
          conntrackFill(ctx.sys),
        ]);
        if (json) process.stdout.write(JSON.stringify({ apps, conntrack }) + '\n');
        else
          process.stdout.write(
            (every && tty ? '\x1b[H\x1b[2J' : '') + formatStatus(apps, colour, conntrack) + '\n' + (every ? '\n' : ''),
          );
        if (every) await ctx.sys.sleep(every, abort);
      } while (every && !abort.aborted);
    },
  },
  {
    usage: 'logs [app]',
    describe: "show the active instance's log",
    flags: (y) =>
      appArg(y)
        .option('follow', {
          alias: 'f',
          type: 'boolean',
          describe: 'keep printing new lines, across deploys, until Ctrl-C',
        })
        .option('lines', { alias: 'n', type: 'number', default: 50, describe: 'how many lines to show first' }),
    run: async (a, { ctx }) =>
      (await import('../commands/logs.js')).logs(
        ctx,
        appName(a),
        { follow: !!a.follow, lines: Number(a.lines) },
        (s) => void process.stdout.write(s),
      ),
  },
  {
    usage: 'history [app]',
    describe: 'show what changed each app (deploys, rollbacks, restarts, repairs ...), newest first',
    flags: (y) =>
      appArg(y)
        .option('n', { type: 'string', describe: 'show the last N records (default 20)' })
        .option('svg', { type: 'string', describe: 'draw them as a timeline of their steps into this SVG file' }),
    run: async (a, { ctx, json }) => {
      const limit = a.n === undefined ? 20 : count(a.n, '-n');
      const { history, formatHistory } = await import('../commands/history.js');
      const app = a.app || a.config ? appName(a) : undefined;
      const { records, skipped } = await history(ctx, app, limit);
      // on stderr even with --json: stdout holds records only
      if (skipped) process.stderr.write(`note: ${skipped} torn line(s) skipped (a run killed mid-write)\n`);
      if (a.svg !== undefined) {
        const { historySvg } = await import('../commands/history-svg.js');
        const file = resolve(String(a.svg));
        await ctx.sys.fs.write(file, historySvg(records, `portflip history${app ? `: ${app}` : ''}`), 0o644);
        process.stderr.write(`wrote ${file}: ${records.length} record(s)\n`);
      } else if (json) for (const r of records) process.stdout.write(JSON.stringify(r) + '\n');
      else if (records.length) process.stdout.write(formatHistory(records) + '\n');
      else process.stderr.write(`nothing recorded yet${app ? ` for ${app}` : ''}\n`);
    },
  },
  {
    usage: 'rollback [app]',
    records: 'rollback',
    describe: 'point the public port back at the kept previous instance',
    flags: appArg,
    run: async (a, { ctx }) => (await import('../commands/rollback.js')).rollback(ctx, appName(a)),
  },
  {
    usage: 'pause [app]',
    records: 'pause',
    describe: 'hold new connections to the public port until resume (open ones keep flowing)',
    flags: (y) =>
      appArg(y)
        .option('timeout', { type: 'string', default: '60s', describe: 'release on its own after this long' })
        .option('queue-len', { type: 'number', describe: 'how many SYNs the queue keeps (default 8192)' })
        .option('dry-run', { type: 'boolean', describe: 'print the steps, change nothing' }),
    run: async (a, { ctx }) => {
      const { pause, DEFAULT_QUEUE_LEN } = await import('../commands/hold.js');
      const timeoutMs = parseDuration(String(a.timeout), '--timeout');
      const queueLen = a.queueLen === undefined ? DEFAULT_QUEUE_LEN : Number(a.queueLen);
      await pause(ctx, appName(a), { timeoutMs, queueLen, dryRun: !!a.dryRun });
    },
  },
  {
    usage: 'resume [app]',
    records: 'resume',
    describe: 'let every held new connection in at once and stop holding',
    flags: appArg,
    run: async (a, { ctx }) => (await import('../commands/hold.js')).resume(ctx, appName(a)),
  },
  {
    usage: 'promote [app]',
    records: 'promote',
    describe: 'make the live canary the only instance (its old one drains); with --canary P%, only set its share',
    flags: (y) =>
      dryRunFlag(
        appArg(y).option('canary', {
          type: 'string',
          describe: 'set the share to this (e.g. 50%) instead of promoting',
        }),
      ),
    run: async (a, { ctx }) => {
      const percent = a.canary === undefined ? undefined : parseShare(a.canary, '--canary');
      await (await import('../commands/canary.js')).promote(ctx, appName(a), { percent, dryRun: !!a.dryRun });
    },
  },
  {
    usage: 'abort [app]',
    records: 'abort',
    describe: 'send every new connection back to the active instance; the canary drains and stops',
    flags: (y) => dryRunFlag(appArg(y)),
    run: async (a, { ctx }) => (await import('../commands/canary.js')).abort(ctx, appName(a), { dryRun: !!a.dryRun }),
  },
  {
    usage: 'stop [app]',
    records: 'stop',
    describe: "remove the app's rules and stop all its instances",
    flags: appArg,
    run: async (a, { ctx }) => (await import('../commands/stop.js')).stop(ctx, appName(a)),
  },
  {
    usage: 'restore',
    records: 'restore',
    every: true,
    describe: "re-create every app's rules from the state files",
    run: async (_a, { ctx }) => (await import('../commands/restore.js')).restore(ctx),
  },
  {
    usage: 'cleanup',
    records: 'cleanup',
    every: true,
    describe: 'remove every chain and rule portflip owns',
    flags: (y) =>
      y.option('stop-instances', { type: 'boolean', describe: 'also stop every instance and forget the apps' }),
    run: async (a, { ctx }) => (await import('../commands/cleanup.js')).cleanup(ctx, !!a.stopInstances),
  },
  {
    usage: 'agent [app]',
    describe: "answer HAProxy's agent-check for APP from portflip's state (drain/maint/ready, up/down, weight)",
    flags: (y) =>
      appArg(y)
        .option('port', { type: 'string', describe: 'TCP port to answer on (default 9777)' })
        .option('address', { type: 'string', describe: 'address to listen on (default: all)' })
        .option('set', {
          type: 'string',
          describe: 'drain, maint, ready or clear: what this host tells HAProxy from now on',
        })
        .option('once', { type: 'boolean', describe: 'print the answer HAProxy would get now, and exit' })
        .option('metrics', {
          type: 'string',
          describe: 'while answering, also serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9778',
        }),
    run: async (a, { ctx, abort }) => {
      const app = appName(a);
      if (a.metrics !== undefined && (a.set !== undefined || a.once))
        fail('usage', '--metrics goes with the agent that keeps answering, not with --set or --once');
      const metrics = metricsOf(a);
      const { DEFAULT_AGENT_PORT, agentAnswer, readView, serveAgent, setMode } = await import('../commands/agent.js');
      if (a.set !== undefined) {
        const file = await setMode(ctx.sys, ctx.paths, app, String(a.set));
        process.stderr.write(`${app}: agent mode ${a.set} (${file})\n`);
      } else if (a.once) process.stdout.write(agentAnswer(await readView(ctx.sys, ctx.paths, app)) + '\n');
      else {
        const listen = a.port === undefined ? DEFAULT_AGENT_PORT : port(a.port, '--port');
        const address = a.address as string | undefined;
        // read-only like the agent: the endpoint, but no textfile writes (the agent may run without root)
        await withMetrics(metrics, ctx, false, () =>
          serveAgent(ctx.sys, ctx.paths, { app, port: listen, address }, ctx.emit, abort),
        );
      }
    },
  },
  {
    usage: '_reap <app>', // the detached reaper a deploy with --keep-old starts
    describe: false,
    flags: appArg,
    run: async (a, { ctx }) => (await import('../commands/reap.js')).reap(ctx, String(a.app)),
  },
];

/** Runs a command; one that changes an app leaves a record in its history, ok or failed (a dry run none). */
async function runRecorded(c: Command, a: Record<string, any>, io: Io): Promise<void> {
  if (!c.records || a.dryRun) return c.run(a, io);
  const { recorded, recordedEvery } = await import('../ops/record.js');
  const as = { action: c.records, by: 'cli' as const };
  const run = (ctx: Ctx) => c.run(a, { ...io, ctx });
  if (c.every) return recordedEvery(io.ctx, as, run);
  let app: string;
  try {
    app = appName(a);
  } catch {
    return c.run(a, io); // no app named: the command says so, and there is nothing to record
  }
  return recorded(io.ctx, app, as, run);
}

/** The part of yargs' internals that main() reaches to skip its help-text cache (as in yargs 18). */
interface YargsInternals {
  getInternalMethods?(): { getUsageInstance?(): { cacheHelpMessage: () => void } } | undefined;
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
  const io: Io = { ctx, json, abort: abort.signal };
  let command: Promise<void> = Promise.resolve();

  const parser = yargs(argv)
    .scriptName('portflip')
    .usage('$0 <command> [app] [options]')
    .parserConfiguration({ 'populate--': true })
    .option('json', { type: 'boolean', describe: 'one JSON object per line on stdout' })
    .option('config', { alias: 'c', type: 'string', describe: 'config file (default /etc/portflip/APP.toml)' });
  for (const c of COMMANDS) {
    const flags = c.flags ?? ((y: Argv) => y);
    const handler = (a: Record<string, any>) => void (command = runRecorded(c, a, io));
    // yargs types a hidden command (false) apart from one with a description
    if (c.describe === false) parser.command(c.usage, false, flags, handler);
    else parser.command(c.usage, c.describe, flags, handler);
  }
  parser
    .demandCommand(
      1,
      'name a command: deploy, promote, abort, status, history, logs, rollback, pause, resume, stop, restore, ' +
        'cleanup, init, run, reload, watch, systemd or agent',
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
