// Unit files for running portflip under systemd: pure text builders, printed by `portflip systemd`.

import { dirname } from 'node:path';
import { appChain } from './iptables.js';

/** systemd's own PATH for services; a node outside it cannot be found by the `#!/usr/bin/env node` line. */
const SYSTEMD_PATH = ['/usr/local/sbin', '/usr/local/bin', '/usr/sbin', '/usr/bin', '/sbin', '/bin'];

/**
 * How ExecStart should start portflip: the resolved script path alone when its shebang will find node,
 * else node's absolute path first (a .js run in place, or node from nvm and the like).
 */
export function execPrefix(script: string, nodePath: string): string[] {
  const shebangWorks = !/\.[cm]?js$/.test(script) && SYSTEMD_PATH.includes(dirname(nodePath));
  return shebangWorks ? [script] : [nodePath, script];
}

/** One ExecStart word: `%` and `$` escaped for systemd, quoted when it holds anything but plain characters. */
export function quoteArg(arg: string): string {
  const escaped = arg.replaceAll('%', '%%').replaceAll('$', '$$$$');
  return /^[A-Za-z0-9_@%$+=:,./-]+$/.test(escaped)
    ? escaped
    : `"${escaped.replaceAll('\\', '\\\\').replaceAll('"', '\\"')}"`;
}

const line = (args: string[]) => args.map(quoteArg).join(' ');

export interface AppUnitOptions {
  app: string;
  exec: string[]; // from execPrefix
  config?: string; // absolute path of -c FILE, when given
}

export const appUnitName = (app: string) => `portflip-${app}.service`;
export const RESTORE_UNIT = 'portflip-restore.service';
export const WATCH_UNIT = 'portflip-watch.service';

export function appUnit(o: AppUnitOptions): string {
  appChain(o.app); // refuses a name portflip itself would refuse
  const run = [...o.exec, 'run', o.app, ...(o.config ? ['-c', o.config] : [])];
  return `# ${appUnitName(o.app)}: written by \`portflip systemd ${o.app}\`. Install it as /etc/systemd/system/${appUnitName(o.app)},
# then: systemctl daemon-reload && systemctl enable --now ${appUnitName(o.app)}
${supervisorUnit(o.app, line(run), line([...o.exec, 'reload', o.app]))}`;
}

export const APP_TEMPLATE_UNIT = 'portflip@.service';

/** The .deb's template unit: portflip@web.service supervises web from its default config, /etc/portflip/web.toml. */
export function appTemplateUnit(exec: string[]): string {
  // %i is systemd's instance name, so it stays unescaped; systemd itself refuses names with spaces or slashes
  return `# ${APP_TEMPLATE_UNIT}: installed by the portflip package. For an app web configured in /etc/portflip/web.toml:
# systemctl enable --now portflip@web.service
${supervisorUnit('%i', `${line([...exec, 'run'])} %i`, `${line([...exec, 'reload'])} %i`)}`;
}

function supervisorUnit(app: string, execStart: string, execReload: string): string {
  return `[Unit]
Description=portflip supervisor for ${app} (zero-downtime restarts)
Wants=network-online.target
After=network-online.target ${RESTORE_UNIT}

[Service]
Type=simple
ExecStart=${execStart}
# reload waits for the zero-downtime deploy and fails the reload if the deploy fails (kill -HUP would not)
ExecReload=${execReload}
Restart=on-failure
RestartSec=2s
# KillMode=process: on stop only portflip gets SIGTERM; it removes the redirect, then stops each instance
# with its stop signal and --kill-after. Instances run in their own process groups inside this cgroup:
# the default (control-group) would signal them all at once, before the redirect is gone, and
# "mixed" would kill them when portflip itself crashes. With "process" they keep serving, and the
# restarted supervisor deploys over them with no downtime.
KillMode=process

[Install]
WantedBy=multi-user.target
`;
}

export function restoreUnit(exec: string[]): string {
  return `# ${RESTORE_UNIT}: written by \`portflip systemd --restore\`. Install it as /etc/systemd/system/${RESTORE_UNIT},
# then: systemctl daemon-reload && systemctl enable ${RESTORE_UNIT}
[Unit]
Description=portflip: re-create the redirects of every app from its state file at boot
# after the firewall is loaded (firewalls order themselves before network-pre.target), so it is not flushed over
After=network-pre.target

[Service]
Type=oneshot
ExecStart=${line([...exec, 'restore'])}
RemainAfterExit=yes

[Install]
WantedBy=multi-user.target
`;
}

export function watchUnit(exec: string[]): string {
  return `# ${WATCH_UNIT}: written by \`portflip systemd --watch\`. Install it as /etc/systemd/system/${WATCH_UNIT},
# then: systemctl daemon-reload && systemctl enable --now ${WATCH_UNIT}
[Unit]
Description=portflip: put every app's rules back within a second when a firewall reload removes them
After=network-pre.target ${RESTORE_UNIT}

[Service]
Type=simple
ExecStart=${line([...exec, 'watch'])}
Restart=always
RestartSec=1s

[Install]
WantedBy=multi-user.target
`;
}
