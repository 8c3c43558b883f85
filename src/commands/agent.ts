// `portflip agent`: answers HAProxy's agent-check for one app from portflip's state, read-only (no lock, no rules).
//
// HAProxy connects to the agent port (a node:net server, like the supervisor's control socket; files go
// through Sys) every agent-inter, reads one line and closes. The line carries up to
// three things, each optional: an administrative word (ready, drain, maint), an operational word (up, down)
// and a weight ("100%"). The agent only speaks about the administrative state when the operator set a mode
// on this host (`portflip agent APP --set MODE`, a flag file next to the state file), so a drain or maint
// set on the balancer (by hand or by the playbook's load-balancer mode) is not undone by the agent.

import { createServer, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { PortflipError, fail } from '../core/errors.js';
import type { Emit } from '../core/events.js';
import { appChain } from '../os/iptables.js';
import { isAlive } from '../os/proc.js';
import { readState, type AppState, type Paths } from '../core/state.js';
import type { Sys } from '../os/sys.js';

export type AgentMode = 'ready' | 'drain' | 'maint';
export const SET_MODES = ['ready', 'drain', 'maint', 'clear'] as const;
export type SetMode = (typeof SET_MODES)[number];

/** `--set ready` is said this long, then the agent goes quiet on the admin state again (see the top of the file). */
export const READY_FOR_MS = 60_000;
export const DEFAULT_AGENT_PORT = 9777;

/** What the agent knows of the host at the moment HAProxy asks. */
export interface AgentView {
  app: string;
  mode: AgentMode | null; // the operator's flag, null when none (or an expired ready)
  known: boolean; // a state file for the app exists
  alive: boolean; // its active instance exists and its pid + start time still match
  canaryWeight?: number; // percent of the normal weight while a canary runs here (canary state is not written yet)
}

/** The one line HAProxy reads. Pure: every case is a unit test. */
export function agentAnswer(v: AgentView): string {
  if (v.mode === 'maint') return 'maint'; // out of rotation: health and weight do not matter
  const words: string[] = [];
  if (v.mode) words.push(v.mode);
  if (!v.known) return [...words, `down #no portflip app ${v.app} on this host`].join(' ');
  if (!v.alive) return [...words, `down #no live active instance of ${v.app}`].join(' ');
  words.push('up');
  // Draining: the weight stays as it is; otherwise always say it, so the end of a canary restores 100%.
  if (v.mode !== 'drain') words.push(`${weightPercent(v.canaryWeight)}%`);
  return words.join(' ');
}

const weightPercent = (w: number | undefined) => (w === undefined ? 100 : Math.max(0, Math.min(100, Math.round(w))));

/** The flag file's content and age -> the mode in force. An unknown word counts as no flag. */
export function modeFromFlag(text: string | null, ageMs: number): AgentMode | null {
  const word = text?.trim();
  if (word === 'drain' || word === 'maint') return word;
  if (word === 'ready') return ageMs <= READY_FOR_MS ? 'ready' : null;
  return null;
}

/** A future canary records its share here; until then no state file has it and the weight is 100%. */
export function canaryWeightOf(st: AppState | null): number | undefined {
  const w = (st as { canary?: { weight?: unknown } } | null)?.canary?.weight;
  return typeof w === 'number' && Number.isFinite(w) ? w : undefined;
}

export const flagFile = (p: Paths, app: string) => join(p.stateDir, `${app}.agent`);

export async function readView(sys: Sys, p: Paths, app: string): Promise<AgentView> {
  const file = flagFile(p, app);
  let mode: AgentMode | null = null;
  try {
    const [text, st] = await Promise.all([sys.fs.read(file), sys.fs.stat(file)]);
    mode = modeFromFlag(text, sys.wallNow() - st.mtimeMs);
  } catch {
    mode = null; // no flag file
  }
  const state = await readState(sys, p, app);
  const active = state?.instances.find((i) => i.state === 'active');
  return {
    app,
    mode,
    known: state !== null,
    alive: active ? await isAlive(sys, active.pid, active.startTime) : false,
    canaryWeight: canaryWeightOf(state),
  };
}

/** `portflip agent APP --set MODE`: writes (or with clear, removes) the flag file, atomically. Touches nothing else. */
export async function setMode(sys: Sys, p: Paths, app: string, mode: string): Promise<string> {
  appChain(app); // the same name rules as everywhere else
  if (!(SET_MODES as readonly string[]).includes(mode))
    fail('usage', `--set ${mode}: use one of ${SET_MODES.join(', ')}`);
  const noDir = `${p.stateDir} does not exist: deploy an app on this host first (or set PORTFLIP_STATE_DIR)`;
  await sys.fs.stat(p.stateDir).catch(() => fail('config', noDir));
  const file = flagFile(p, app);
  if (mode === 'clear') {
    await sys.fs.unlink(file).catch(() => {});
    return file;
  }
  await sys.fs.writeAtomic(file, `${mode}\n`, 0o644);
  return file;
}

export interface AgentOptions {
  app: string;
  port: number;
  address?: string; // default: every address (HAProxy connects from the balancer)
}

/** Serves the answer until the signal aborts. Each connection gets one line, then the socket is closed. */
export async function serveAgent(sys: Sys, p: Paths, o: AgentOptions, emit: Emit, abort: AbortSignal): Promise<void> {
  appChain(o.app);
  const answer = async (sock: Socket) => {
    let line: string;
    try {
      line = agentAnswer(await readView(sys, p, o.app));
    } catch (err) {
      line = `down #${(err as Error).message.replace(/[\r\n]+/g, ' ')}`; // e.g. a state file with a newer schema
    }
    sock.end(`${line}\n`);
  };
  const server: Server = createServer((sock) => {
    sock.on('error', () => {}); // HAProxy may close first; nothing to do about it
    void answer(sock);
  });
  await new Promise<void>((resolve, reject) => {
    const inUse = `agent port ${o.port} is already in use; pick another with --port`;
    server.once('error', (err: NodeJS.ErrnoException) =>
      reject(err.code === 'EADDRINUSE' ? new PortflipError('portInUse', inUse) : err),
    );
    server.listen({ port: o.port, host: o.address }, () => resolve());
  });
  emit({
    kind: 'notice',
    app: o.app,
    message: `agent answering HAProxy on ${o.address ?? '*'}:${o.port} (Ctrl-C to stop)`,
  });
  if (!abort.aborted)
    await new Promise<void>((resolve) => abort.addEventListener('abort', () => resolve(), { once: true }));
  await new Promise<void>((resolve) => server.close(() => resolve()));
}
