// Typed events the core emits, and the two ways to render them: lines for people, JSON for scripts.

import type { HookName } from '../cli/config.js';
import { formatMs } from './duration.js';
import type { ExitCodeName } from './errors.js';
import type { MarkStats } from '../drain/httpmark.js';

export type StepName =
  | 'preflight'
  | 'repair'
  | 'retire'
  | 'start'
  | 'ready'
  | 'bind-check'
  | 'open'
  | 'switch'
  | 'drain'
  | 'stop'
  | 'rollback'
  | 'restore'
  | 'cleanup'
  | 'verify'
  | 'canary'
  | 'canary-for'
  | 'promote'
  | 'abort'
  | 'done'
  | 'hold'
  | 'release'
  | 'stop-old'
  | HookName;

export type Event =
  | {
      kind: 'step';
      step: StepName;
      app: string;
      status: 'ok' | 'failed';
      port?: number;
      pid?: number | null;
      durationMs: number;
      detail?: string;
      missing?: string[];
    }
  | { kind: 'notice'; app?: string; message: string }
  | { kind: 'signal'; app: string; port: number; pid: number; signal: string; reason: string }
  | { kind: 'connections'; app: string; port: number; pid: number; open: number }
  | ({ kind: 'marking'; app: string; port: number; pid: number | null; openAtSignal: number | null } & MarkStats)
  | { kind: 'log-tail'; app: string; port: number; log: string; lines: string[] }
  | {
      kind: 'plan';
      app: string;
      steps: { step: string; does: string; undo: string }[];
      rules: { family: string; text: string }[];
    }
  | { kind: 'crash'; app: string; port: number; pid: number | null; upMs: number; restartInMs: number }
  | { kind: 'supervisor'; app: string; action: SupervisorAction; pid?: number | null; port?: number; detail?: string }
  // a command's failure, last; the Ansible role reads this shape (ansible/roles/portflip/tasks/deploy.yml)
  | { kind: 'error'; error: ExitCodeName; exitCode: number; message: string };

/** What `portflip run` is doing: the lines a person reads in `journalctl -u portflip-APP`. */
export type SupervisorAction =
  | 'started'
  | 'reload'
  | 'reloaded'
  | 'reload-failed'
  | 'restart'
  | 'restarted'
  | 'restart-failed'
  | 'adopted'
  | 'stopping'
  | 'exit'
  | 'heal-failed';

export type Emit = (e: Event) => void;

const pad = (s: string, n: number) => (s.length >= n ? s : s + ' '.repeat(n - s.length));

export function formatHuman(e: Event): string {
  switch (e.kind) {
    case 'step': {
      const mark = e.status === 'ok' ? 'ok  ' : 'FAIL';
      const where = [e.port ? `port ${e.port}` : '', e.pid ? `pid ${e.pid}` : ''].filter(Boolean).join(' ');
      return `${e.app}: ${mark} ${pad(e.step, 10)} ${pad(where, 22)} ${pad(formatMs(e.durationMs), 7)}${e.detail ? ` ${e.detail}` : ''}`;
    }
    case 'notice':
      return `${e.app ? `${e.app}: ` : ''}note: ${e.message}`;
    case 'signal':
      return `${e.app}:      signal     port ${e.port} pid ${e.pid}: ${e.signal} (${e.reason})`;
    case 'connections':
      return `${e.app}:      drain      port ${e.port} pid ${e.pid}: ${e.open} connection${e.open === 1 ? '' : 's'} open`;
    case 'marking':
      return `${e.app}:      marking    port ${e.port}${e.pid ? ` pid ${e.pid}` : ''}: ${markingWords(e)}`;
    case 'log-tail':
      return [`${e.app}: last lines of ${e.log}:`, ...e.lines.map((l) => `  | ${l}`)].join('\n');
    case 'plan':
      return [
        `${e.app}: dry run, nothing is changed. The deploy would:`,
        ...e.steps.map((s, i) => `  ${i + 1}. ${pad(s.step, 10)} ${s.does}${s.undo ? `  (undo: ${s.undo})` : ''}`),
        ...e.rules.flatMap((r) => [
          `  ${r.family} (iptables-restore --noflush):`,
          ...r.text
            .trimEnd()
            .split('\n')
            .map((l) => `    ${l}`),
        ]),
      ].join('\n');
    case 'crash':
      return (
        `${e.app}: CRASH      port ${e.port}${e.pid ? ` pid ${e.pid}` : ''}: ` +
        `the active instance died after ${formatMs(e.upMs)}; restart in ${formatMs(e.restartInMs)}`
      );
    case 'supervisor':
      return (
        `${e.app}: run        ${e.action}${e.port ? ` port ${e.port}` : ''}${e.pid ? ` pid ${e.pid}` : ''}` +
        (e.detail ? `: ${e.detail}` : '')
      );
    case 'error':
      return `portflip: ${e.message}`;
  }
}

const plural = (n: number, one: string, many = `${one}s`) => `${n} ${n === 1 ? one : many}`;

/** "12 answers marked Connection: close (12 by their Date line), 12 connections closed, ..." */
export function markingWords(m: MarkStats & { openAtSignal: number | null }): string {
  const how = Object.entries(m.rewrites)
    .filter(([, n]) => n)
    .map(
      ([k, n]) => `${n} by their ${k === 'connection' ? 'Connection' : k === 'date' ? 'Date line' : 'HTTP version'}`,
    );
  const alone = Object.entries(m.untouched).map(([k, n]) => `${n} ${UNTOUCHED[k] ?? k}`);
  return [
    `${plural(m.marked, 'answer')} marked Connection: close${how.length ? ` (${how.join(', ')})` : ''}`,
    `${plural(m.closed, 'connection')} closed`,
    ...(m.openAtSignal !== null ? [`${m.openAtSignal} open at the stop signal`] : []),
    ...(alone.length ? [`left alone: ${alone.join(', ')}`] : []),
  ].join(', ');
}

const UNTOUCHED: Record<string, string> = {
  tls: 'TLS',
  http2: 'HTTP/2',
  'not-http': 'not HTTP/1.x',
  pipelined: 'pipelining',
  upgraded: 'upgraded (WebSocket)',
  untracked: 'packets past the connection limit',
};

export function makeEmitter(json: boolean): Emit {
  return json
    ? (e) => process.stdout.write(JSON.stringify(e) + '\n')
    : (e) => process.stderr.write(formatHuman(e) + '\n');
}
