// portflip's --json output in tests: one Event (src/events.ts) per line, typed, read whole or awaited as it comes.

import type { ChildProcess } from 'node:child_process';
import type { Event } from '../../src/core/events.js';

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
