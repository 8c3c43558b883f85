// Turns argv into typed options, calls the core, and maps errors to exit codes. Nothing else does either.

import yargs, { type Argv } from 'yargs';
import { deploy, type DeployOptions } from './deploy.js';
import { cleanup, formatStatus, reap, restore, rollback, status, stop } from './commands.js';
import { parseDuration } from './duration.js';
import { ExitCode, PortflipError, fail } from './errors.js';
import { makeEmitter } from './events.js';
import type { Ctx } from './ops.js';
import { paths } from './state.js';
import { realSys } from './sys.js';
import type { DrainMode } from './state.js';

const SIGNALS = ['SIGTERM', 'SIGINT', 'SIGQUIT', 'SIGHUP', 'SIGUSR1', 'SIGUSR2', 'SIGWINCH', 'SIGKILL'];

function port(v: unknown, flag: string): number {
  const n = Number(v);
  if (!/^\d+$/.test(String(v)) || n < 1 || n > 65535) fail('usage', `${flag} ${v}: a port is a whole number from 1 to 65535`);
  return n;
}

function toDeployOptions(a: Record<string, any>): DeployOptions {
  const ready = String(a.ready ?? 'tcp');
  if (a.readyCmd && a.ready && a.ready !== 'tcp') fail('usage', 'give --ready or --ready-cmd, not both');
  if (ready !== 'tcp' && !/^https?:\/\/[^/]/.test(ready)) fail('usage', `--ready ${ready}: use tcp or an http(s):// URL such as http://127.0.0.1:{port}/health`);
  const signal = String(a.stopSignal).toUpperCase().replace(/^(?!SIG)/, 'SIG');
  if (!SIGNALS.includes(signal)) fail('usage', `--stop-signal ${a.stopSignal}: use one of ${SIGNALS.join(', ')}`);
  if (a.drain !== 'signal' && a.drain !== 'idle') fail('usage', `--drain ${a.drain}: use signal or idle`);
  if (!['auto', 'on', 'off'].includes(a.ipv6)) fail('usage', `--ipv6 ${a.ipv6}: use auto, on or off`);
  const env: Record<string, string> = {};
  for (const kv of [a.env ?? []].flat().map(String)) {
    const i = kv.indexOf('=');
    if (i < 1) fail('usage', `--env ${kv}: write it as NAME=value`);
    env[kv.slice(0, i)] = kv.slice(i + 1);
  }
  const ports = a.ports === undefined ? undefined : String(a.ports).split(',').map((p) => port(p.trim(), '--ports'));
  if (ports && ports.length < 2) fail('usage', `--ports ${a.ports}: give two or more ports to alternate between, like 8001,8002`);
  return {
    app: String(a.app),
    listen: port(a.listen, '--listen'),
    command: (a['--'] ?? []).map(String),
    ports,
    cwd: String(a.cwd ?? process.cwd()),
    user: a.user,
    env,
    ready: a.readyCmd ? { kind: 'cmd', command: String(a.readyCmd), cwd: String(a.cwd ?? process.cwd()) } : ready === 'tcp' ? { kind: 'tcp' } : { kind: 'http', url: ready },
    readyTimeoutMs: parseDuration(a.readyTimeout, '--ready-timeout'),
    stop: {
      drain: a.drain as DrainMode,
      drainTimeoutMs: parseDuration(a.drainTimeout, '--drain-timeout'),
      stopSignal: signal as NodeJS.Signals,
      killAfterMs: parseDuration(a.killAfter, '--kill-after'),
    },
    keepOldMs: a.keepOld === undefined ? undefined : parseDuration(a.keepOld, '--keep-old'),
    ipv6: a.ipv6,
    dryRun: !!a.dryRun,
  };
}

const appArg = (y: Argv) => y.positional('app', { type: 'string', describe: 'the app name (1-25 of a-z 0-9 - _)' });

export async function main(argv: string[]): Promise<number> {
  const abort = new AbortController();
  let interrupts = 0;
  const onSignal = (sig: NodeJS.Signals) => {
    // the first signal asks the core to stop and undo; a second one leaves at once
    if (++interrupts > 1) process.exit(130);
    process.stderr.write(`portflip: ${sig} received, undoing what is not finished (again to quit now)\n`);
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
    .command('deploy <app>', 'start a new instance and flip the public port to it', (y) =>
      appArg(y)
        .usage('$0 deploy <app> --listen PORT [options] -- COMMAND [ARGS...]')
        .option('listen', { type: 'string', demandOption: true, describe: 'the public port' })
        .option('ports', { type: 'string', describe: 'instance ports to alternate between, e.g. 8001,8002' })
        .option('cwd', { type: 'string', describe: 'working directory of the app' })
        .option('user', { type: 'string', describe: 'run the app as this user' })
        .option('env', { type: 'string', array: true, describe: 'K=V, repeatable' })
        .option('ready', { type: 'string', default: 'tcp', describe: 'tcp, or http://127.0.0.1:{port}/PATH (2xx/3xx)' })
        .option('ready-cmd', { type: 'string', describe: 'a shell command that exits 0 when ready ($PORT set)' })
        .option('ready-timeout', { type: 'string', default: '60s' })
        .option('drain', { type: 'string', default: 'signal', describe: 'signal: stop signal right after the switch; idle: wait for no open connections first' })
        .option('drain-timeout', { type: 'string', default: '30s' })
        .option('stop-signal', { type: 'string', default: 'SIGTERM' })
        .option('kill-after', { type: 'string', default: '10s' })
        .option('keep-old', { type: 'string', describe: 'keep the previous instance this long for an instant rollback' })
        .option('ipv6', { type: 'string', default: 'auto', describe: 'auto: redirect IPv6 when the host has it and the app listens on ::; on; off' })
        .option('dry-run', { type: 'boolean', describe: 'print the steps and rules, change nothing' }),
      (a) => run(() => deploy(toDeployOptions(a), ctx)),
    )
    .command('status [app]', 'show apps, instances and whether the live rules agree', (y) => appArg(y), (a) =>
      run(async () => {
        const apps = await status(ctx, a.app as string | undefined);
        process.stdout.write(json ? JSON.stringify({ apps }) + '\n' : formatStatus(apps) + '\n');
      }),
    )
    .command('rollback <app>', 'point the public port back at the kept previous instance', (y) => appArg(y), (a) => run(() => rollback(ctx, String(a.app))))
    .command('stop <app>', "remove the app's rules and stop all its instances", (y) => appArg(y), (a) => run(() => stop(ctx, String(a.app))))
    .command('restore', "re-create every app's rules from the state files", (y) => y, () => run(() => restore(ctx)))
    .command('cleanup', 'remove every chain and rule portflip owns', (y) =>
      y.option('stop-instances', { type: 'boolean', describe: 'also stop every instance and forget the apps' }),
      (a) => run(() => cleanup(ctx, !!a.stopInstances)),
    )
    .command('_reap <app>', false, (y) => appArg(y), (a) => run(() => reap(ctx, String(a.app))))
    .demandCommand(1, 'name a command: deploy, status, rollback, stop, restore or cleanup')
    .strict()
    .help()
    .version()
    .wrap(Math.min(110, process.stdout.columns || 100))
    .exitProcess(false)
    .fail((msg, err) => {
      throw err instanceof PortflipError ? err : new PortflipError('usage', msg || String(err?.message));
    });

  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  process.on('SIGHUP', onSignal);
  try {
    await parser.parseAsync();
    await command;
    return ExitCode.ok;
  } catch (err) {
    if (err instanceof PortflipError) {
      if (json) process.stdout.write(JSON.stringify({ kind: 'error', error: err.kind, exitCode: err.exitCode, message: err.message }) + '\n');
      process.stderr.write(`portflip: ${err.message}\n`);
      return err.exitCode;
    }
    process.stderr.write(`portflip: internal error: ${(err as Error)?.stack ?? err}\n`);
    return ExitCode.internal;
  }
}
