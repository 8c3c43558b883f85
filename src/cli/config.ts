// Per-app config files (TOML): every deploy flag has a key of the same name in snake_case; flags win.

import { createHash } from 'node:crypto';
import { basename, dirname, join } from 'node:path';
import type { z as Zod } from 'zod';
import { fail } from '../core/errors.js';
import type { Sys } from '../os/sys.js';

export const configDir = (env: NodeJS.ProcessEnv = process.env) => env.PORTFLIP_CONFIG_DIR || '/etc/portflip';

export const HOOKS = ['before_start', 'after_ready', 'after_switch', 'after_drain', 'on_failure'] as const;
export type HookName = (typeof HOOKS)[number];

// The parser and the schema library load only when a config file is read: most runs have none,
// and every deploy's CPU time competes with the requests the old instance is serving.
function makeSchema(z: typeof Zod) {
  const duration = z.union([z.string(), z.number().nonnegative()], {
    error: 'expected a duration such as "30s" or a number of seconds',
  });
  const port = z.number({ error: 'expected a port number' }).int().min(1).max(65535);
  const hook = z.string({ error: 'expected a shell command (a string)' });
  return z.strictObject({
    listen: port.optional(),
    ports: z.array(port, { error: 'expected a list of ports such as [8001, 8002]' }).min(2).optional(),
    command: z
      .array(z.string(), { error: 'expected a list of strings such as ["node", "server.js", "--port", "{port}"]' })
      .min(1)
      .optional(),
    cwd: z.string().optional(),
    user: z.string().optional(),
    env: z
      .record(z.string(), z.string(), { error: 'expected a table of strings such as { NODE_ENV = "production" }' })
      .optional(),
    ready: z.string().optional(),
    ready_cmd: z.string().optional(),
    ready_timeout: duration.optional(),
    drain: z.enum(['auto', 'signal', 'idle'], { error: 'expected "auto", "signal" or "idle"' }).optional(),
    drain_timeout: duration.optional(),
    stop_signal: z.string().optional(),
    kill_after: duration.optional(),
    keep_old: duration.optional(),
    verify: duration.optional(),
    ipv6: z.enum(['auto', 'on', 'off'], { error: 'expected "auto", "on" or "off"' }).optional(),
    firewall: z.enum(['auto', 'off'], { error: 'expected "auto" or "off"' }).optional(),
    expose_ports: z.boolean({ error: 'expected true or false' }).optional(),
    allow_from: z
      .array(z.string(), { error: 'expected a list of networks such as ["192.0.2.0/24", "2001:db8::/32"]' })
      .optional(),
    node_drain: z.enum(['on', 'off'], { error: 'expected "on" or "off"' }).optional(),
    mark_close: z.enum(['on', 'off'], { error: 'expected "on" or "off"' }).optional(),
    label: z.string({ error: 'expected a version label (a string)' }).optional(),
    before_start: hook.optional(),
    after_ready: hook.optional(),
    after_switch: hook.optional(),
    after_drain: hook.optional(),
    on_failure: hook.optional(),
  });
}

export type AppConfig = Zod.infer<ReturnType<typeof makeSchema>>;

/**
 * Reads the app's config file. The default path may be absent (flags then say everything);
 * a file named with -c must exist. Any mistake is one line naming the file and the key. `hash` is the
 * sha256 of the file as read, which the history records beside the instance it deployed.
 */
export async function readConfig(
  sys: Sys,
  app: string | undefined,
  file: string | undefined,
  env = process.env,
): Promise<{ path: string | null; config: AppConfig; hash?: string }> {
  const path = file ?? (app ? join(configDir(env), `${app}.toml`) : null);
  if (!path) return { path: null, config: {} };
  let text: string;
  try {
    text = await sys.fs.read(path);
  } catch (err) {
    if (!file && (err as NodeJS.ErrnoException).code === 'ENOENT') return { path: null, config: {} };
    return fail('config', `${path}: cannot read it (${(err as NodeJS.ErrnoException).code ?? err})`);
  }
  const [{ parse }, { z }] = await Promise.all([import('smol-toml'), import('zod')]);
  const schema = makeSchema(z);
  let data: unknown;
  try {
    data = parse(text);
  } catch (err) {
    const e = err as { line?: number; message: string };
    return fail('config', `${path}:${e.line ?? '?'}: ${String(e.message).split('\n')[0]}`);
  }
  const r = schema.safeParse(data);
  if (!r.success) {
    const issue = r.error.issues[0];
    if (issue.code === 'unrecognized_keys') {
      fail('config', `${path}: unknown key "${issue.keys[0]}"; known keys: ${Object.keys(schema.shape).join(', ')}`);
    }
    const key = issue.path.map(String).join('.') || '(file)';
    fail('config', `${path}: key "${key}": ${issue.message}`);
  }
  return { path, config: r.data!, hash: createHash('sha256').update(text).digest('hex') };
}

/** The app name a config file stands for, when the command line names none: web.toml -> web. */
export const appFromFile = (file: string) => basename(file).replace(/\.toml$/, '');

export function starterConfig(app: string): string {
  return `# portflip config for "${app}": every key is also a deploy flag (snake_case here, --kebab-case there).
# Flags given on the command line win over this file. Docs: docs/reference.md, "Config files".

# The public port clients connect to. The app never binds it: an iptables redirect points it at an instance.
listen = 80

# Instance ports to alternate between (each deploy takes the one not in use).
ports = [8001, 8002]

# How to start one instance. "{port}" is replaced by the instance port; PORT is set in its environment too.
command = ["node", "server.js", "--port", "{port}"]

# cwd = "/srv/${app}/current"
# user = "www-data"
# env = { NODE_ENV = "production" }

# Ready when: "tcp" (a TCP connect succeeds), or an http(s) URL answering 2xx/3xx.
ready = "http://127.0.0.1:{port}/health"
# ready_cmd = "curl -fsS http://127.0.0.1:$PORT/health"
ready_timeout = "60s"

# After the switch: "signal" sends stop_signal at once (graceful apps); "idle" waits for no open connections first;
# "auto" is signal for Node.js apps with the drain module (node_drain), and for any other it waits until every
# open connection is closed or quiet. While it waits, mark_close makes keep-alive clients close theirs.
drain = "auto"
drain_timeout = "30s"
stop_signal = "SIGTERM"
kill_after = "10s"
# keep_old = "5m"    # keep the previous instance for an instant "portflip rollback"
# ipv6 = "auto"
# node_drain = "on"  # Node.js apps: make server.close() drain keep-alive connections (docs/drain.md)
# mark_close = "on"  # any HTTP/1.x app: one answer per keep-alive connection says Connection: close while it drains
# label = "v1.4.2"   # a version name, shown in status and portflip history (--label wins)

# Firewall: "auto" accepts the connections portflip redirected in its own filter chain, so a default-deny
# firewall (ufw) that opens only the public port keeps working; "off" never touches the filter table.
# firewall = "auto"
# expose_ports = false                 # true: other hosts may connect to instance ports directly
# allow_from = ["192.0.2.0/24"]        # accept redirected traffic only from these networks (and this host)

# Hooks: shell commands run as the app's user, with PORTFLIP_APP, PORTFLIP_PORT, PORTFLIP_PREVIOUS_PORT
# and PORTFLIP_STEP set. A failing before_start or after_ready aborts the deploy with nothing switched.
# before_start = "npm ci --omit=dev"
# after_ready = "curl -fsS http://127.0.0.1:$PORTFLIP_PORT/health"
# after_switch = "echo switched to $PORTFLIP_PORT"
# after_drain = "echo old instance on $PORTFLIP_PREVIOUS_PORT stopped"
# on_failure = "echo deploy failed at $PORTFLIP_STEP"
`;
}

export async function writeStarter(
  sys: Sys,
  app: string,
  file: string | undefined,
  env = process.env,
): Promise<string> {
  const path = file ?? join(configDir(env), `${app}.toml`);
  await sys.fs.mkdir(dirname(path), 0o777); // the umask decides, as for any directory a user makes
  try {
    await sys.fs.write(path, starterConfig(app), 0o644, true);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST')
      fail('usage', `${path} already exists; edit it, or remove it first`);
    throw err;
  }
  return path;
}
