// portflip(1) in roff, generated from the CLI's own --help texts (scripts/package.mjs puts it in the .deb).

/** Escapes text for roff: backslashes, and a leading dot or quote that would read as a request. */
export function roffEscape(text) {
  return text
    .replace(/\\/g, '\\e')
    .split('\n')
    .map((l) => (/^[.']/.test(l) ? `\\&${l}` : l))
    .join('\n');
}

/** The command words listed under "Commands:" in the top-level help: `portflip deploy [app]` -> deploy. */
export function commandsOf(help) {
  const words = [];
  let inCommands = false;
  for (const line of help.split('\n')) {
    if (/^Commands:/.test(line)) inCommands = true;
    else if (/^\S/.test(line)) inCommands = false;
    else if (inCommands) {
      const m = /^ {2}portflip ([a-z][\w-]*)/.exec(line);
      if (m) words.push(m[1]);
    }
  }
  return words;
}

/**
 * The page: NAME, SYNOPSIS, DESCRIPTION, then the top-level help and each command's help verbatim (no-fill, so
 * yargs' columns stay aligned), then FILES, ENVIRONMENT and SEE ALSO.
 */
export function manPage({ version, date, description, top, commands }) {
  const verbatim = (text) => ['.nf', roffEscape(text.trimEnd()), '.fi'].join('\n');
  return [
    `.TH PORTFLIP 1 "${date}" "portflip ${version}" "User Commands"`,
    '.SH NAME',
    `portflip \\- ${roffEscape(description.replace(/^./, (c) => c.toLowerCase()))}`,
    '.SH SYNOPSIS',
    '.B portflip',
    '\\fIcommand\\fR [\\fIapp\\fR] [\\fIoptions\\fR] [\\fB\\-\\-\\fR \\fIcommand\\fR [\\fIargs\\fR...]]',
    '.SH DESCRIPTION',
    'portflip points a public TCP port at one instance of an app through an iptables nat REDIRECT, starts the',
    'next instance on another port, waits until it is ready, and flips the redirect in one atomic commit.',
    'Open connections stay on the old instance until they close. This page is generated from',
    '.BR "portflip \\-\\-help" ;',
    'the README and docs/ in the source tree say more.',
    '.SH OPTIONS',
    verbatim(top),
    '.SH COMMANDS',
    ...commands.flatMap(({ name, help }) => [`.SS ${name}`, verbatim(help)]),
    '.SH FILES',
    '.TP',
    '.I /etc/portflip/APP.toml',
    "an app's config file (flags win over it)",
    '.TP',
    '.I /var/lib/portflip',
    'state files, instance logs, and the native library the executable writes there on first use',
    '.TP',
    '.I /run/portflip',
    'locks and sockets',
    '.TP',
    '.I /var/lib/portflip-node',
    'the Node drain module, readable by app users',
    '.TP',
    '.I /var/lib/prometheus/node-exporter/portflip.prom',
    "Prometheus metrics for node_exporter's textfile collector, when that directory exists",
    '.SH ENVIRONMENT',
    'PORTFLIP_STATE_DIR, PORTFLIP_RUN_DIR, PORTFLIP_PRELOAD_DIR, PORTFLIP_CONFIG_DIR, PORTFLIP_IPTABLES,',
    'PORTFLIP_LIB_DIR, PORTFLIP_TEXTFILE_DIR (empty: no textfile) move or force what the FILES section and the',
    'iptables backend default to.',
    '.SH SEE ALSO',
    '.BR iptables (8),',
    '.BR conntrack (8),',
    '.BR systemd.service (5)',
    '',
  ].join('\n');
}
