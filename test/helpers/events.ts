// portflip's --json output in tests: one Event (src/events.ts) per line, typed, read whole or awaited as it comes.

import type { ChildProcess } from 'node:child_process';
import type { Event } from '../../src/core/events.js';
import { waitFor } from './netns.js';

/** An event as read back: its kind and known fields typed, any other field readable without narrowing first. */
export type JsonEvent = Event & Record<string, any>;

/** Every event in the stdout of a finished `portflip ... --json`. */
export const events = (stdout: string): JsonEvent[] =>
  stdout
    .trim()
    .split('\n')
    .filter(Boolean)
    .map((l) => JSON.parse(l) as JsonEvent);

/** Resolves with the first event a running `portflip ... --json` prints that matches. */
export function waitEvent(
  child: ChildProcess,
  match: (e: JsonEvent) => boolean,
  timeoutMs = 20_000,
): Promise<JsonEvent> {
  return new Promise((resolve, reject) => {
    let buf = '';
    const timer = setTimeout(() => reject(new Error(`no matching event in ${timeoutMs}ms: ${buf}`)), timeoutMs);
    child.stdout!.on('data', (d) => {
      buf += d;
      for (const line of buf.split('\n').slice(0, -1)) {
        const e = JSON.parse(line) as JsonEvent;
        if (match(e)) {
          clearTimeout(timer);
          resolve(e);
        }
      }
      buf = buf.slice(buf.lastIndexOf('\n') + 1);
    });
    child.once('exit', () => reject(new Error('portflip exited before the event')));
  });
}

/** A long-running `portflip ... --json` (run, watch, agent) as it goes: its events so far, its stderr, its exit. */
export interface Followed {
  events: JsonEvent[];
  exited: Promise<number | null>;
  output(): string; // stderr and every event so far, for failure messages
  /** The first event that matches, waited for; fails at once if the command exits first. */
  wait(match: (e: JsonEvent) => boolean, what: string, timeoutMs?: number): Promise<JsonEvent>;
}

export function follow(child: ChildProcess): Followed {
  const evs: JsonEvent[] = [];
  let out = '';
  let err = '';
  child.stdout!.on('data', (d) => {
    out += d;
    const lines = out.split('\n');
    out = lines.pop()!;
    for (const l of lines) if (l.trim()) evs.push(JSON.parse(l));
  });
  child.stderr!.on('data', (d) => (err += d));
  const exited = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
  const output = () => `stderr: ${err}\nevents: ${evs.map((e) => JSON.stringify(e)).join('\n')}`;
  const wait = async (match: (e: JsonEvent) => boolean, what: string, timeoutMs = 20_000) => {
    await waitFor(
      () => {
        if (child.exitCode !== null) throw new Error(`exited (${child.exitCode}) before ${what}\n${output()}`);
        return evs.some(match);
      },
      timeoutMs,
      `${what}\n${output()}`,
    );
    return evs.find(match)!;
  };
  return { events: evs, exited, output, wait };
}
