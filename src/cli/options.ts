// Every flag of every command and its check: flags and config file keys to typed options. A bad value
// fails here with exit 2 (usage) before a command's module loads. What a deploy's options must say
// together is deploy-run.ts's checkOptions, which the deploy runs for every caller (run, tests).

import { isIP } from 'node:net';
import type { Argv } from 'yargs';
import type { CanaryOptions } from '../commands/canary.js';
import type { DeployOptions } from '../commands/deploy-run.js';
import { parseDuration } from '../core/duration.js';
import { fail } from '../core/errors.js';
import type { DrainMode } from '../core/state.js';
import type { MetricsAddress } from '../ops/metrics-http.js';
import { canonicalCidr } from '../os/iptables.js';
import { HOOKS, appFromFile, type AppConfig } from './config.js';

const STOP_SIGNALS = ['SIGTERM', 'SIGINT', 'SIGQUIT', 'SIGHUP', 'SIGUSR1', 'SIGUSR2', 'SIGWINCH', 'SIGKILL'];

export function port(v: unknown, flag: string): number {
  const n = Number(v);
  if (!/^\d+$/.test(String(v)) || n < 1 || n > 65535)
    fail('usage', `${flag} ${v}: a port is a whole number from 1 to 65535`);
  return n;
}

/** `--metrics ADDR`: `127.0.0.1:9778`, `[::1]:9778`, `localhost:9778`, or `:9778` for every address. */
export function metricsAddress(v: unknown): MetricsAddress {
  const text = String(v);
  const bad = () =>
    fail('usage', `--metrics ${text}: give ADDRESS:PORT, like 127.0.0.1:9778, [::1]:9778 or :9778 (every address)`);
  const m = /^(?:\[([^\]]+)\]|([^:[\]]*)):([^:]+)$/.exec(text.trim());
  if (!m) return bad();
  const host = m[1] ?? m[2];
  if (m[1] !== undefined ? isIP(host) !== 6 : host && !isIP(host) && !/^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$/i.test(host))
    return bad();
  return { host: host || undefined, port: port(m[3], '--metrics'), text };
}

/** The --metrics flag of watch, run and agent. */
export const metricsFlag = (y: Argv) =>
  y.option('metrics', {
    type: 'string',
    describe: 'serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9778 or :9778',
  });

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
    label: from('label', 'label'),
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
  const label = a.label === undefined ? undefined : String(a.label);
  if (label !== undefined && (!label || label.length > 64 || /[\x00-\x1f\x7f]/.test(label)))
    fail('usage', `--label ${JSON.stringify(label)}: give 1-64 printable characters, like v1.4.2 or a commit hash`);
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
  // one port is allowed: an in-place restart (docs/hold.md)
  const o: DeployOptions = {
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
    ...(label ? { label } : {}),
  };
  // deploy only (run has no canary flags): keep_old and verify in a config file are for plain deploys
  const canary = canaryOptions(flags);
  return canary ? { ...o, canary, keepOldMs: undefined, verifyMs: undefined } : o;
}

/** A count of at least 1 (`history -n`). */
export function count(v: unknown, flag: string): number {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 1) fail('usage', `${flag} ${v}: give a whole number of at least 1`);
  return n;
}

/** "10%" or "10" -> 10; a whole percent from 1 to 99 (0 and 100 are abort and promote). */
export function parseShare(v: unknown, flag: string): number {
  const m = /^(\d{1,2})%?$/.exec(String(v).trim());
  const n = m ? Number(m[1]) : NaN;
  if (!(n >= 1 && n <= 99)) fail('usage', `${flag} ${v}: give a whole percent from 1 to 99, like 10%`);
  return n;
}

export function parseBy(v: unknown): 'conn' | 'ip' {
  const by = String(v ?? 'conn');
  if (by !== 'conn' && by !== 'ip')
    fail('usage', `--canary-by ${by}: use conn (each new connection) or ip (each client address)`);
  return by as 'conn' | 'ip';
}

/** The canary flags of a deploy, checked against the rest of its options; undefined without --canary. */
export function canaryOptions(flags: Record<string, unknown>): CanaryOptions | undefined {
  if (flags.canary === undefined) {
    for (const f of ['canaryBy', 'canaryFor'] as const)
      if (flags[f] !== undefined) fail('usage', `--${f === 'canaryBy' ? 'canary-by' : 'canary-for'} needs --canary P%`);
    return undefined;
  }
  // keep_old and verify in a config file are for plain deploys: the CLI drops them for a canary one
  if (flags.keepOld !== undefined)
    fail('usage', '--keep-old does not go with --canary: the old instance stays up until promote or abort');
  if (flags.verify !== undefined) fail('usage', '--verify does not go with --canary: use --canary-for DURATION');
  const forMs = flags.canaryFor === undefined ? undefined : parseDuration(String(flags.canaryFor), '--canary-for');
  if (forMs !== undefined && forMs < 1000) fail('usage', `--canary-for ${flags.canaryFor}: give at least 1s`);
  return { percent: parseShare(flags.canary, '--canary'), by: parseBy(flags.canaryBy), forMs };
}

export const appArg = (y: Argv) =>
  y.positional('app', { type: 'string', describe: 'the app name (1-25 of a-z 0-9 - _)' });

/** The deploy flags, shared by deploy and run. */
export const deployFlags = (y: Argv) =>
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
    .option('label', { type: 'string', describe: 'a version name for this deploy, shown in status and history' })
    .option('dry-run', { type: 'boolean', describe: 'print the steps and rules, change nothing' });

/** deploy only: a canary is one deploy's choice, so `portflip run` and config files do not take it (docs/canary.md). */
export const canaryFlags = (y: Argv) =>
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

/** The app named on the command line, or the one a -c file stands for (web.toml -> web). */
export function appName(a: Record<string, unknown>): string {
  if (a.app) return String(a.app);
  if (a.config) return appFromFile(String(a.config));
  return fail('usage', 'name the app, like: portflip deploy web (or give -c FILE)');
}
