// The queue a draining instance's packets pass through while its answers are marked Connection: close.
//
// One NFQUEUE per portflip process, read in this process (a deploy drains its old instance itself),
// serving every port it drains at once. Fail-open on every path: the rules carry --queue-bypass, so
// when this process dies (the socket closes) packets pass untouched; a full queue lets packets pass
// (CFG_F_FAIL_OPEN). The rules and the state file entry are ops/retire.ts's; this module binds,
// reads and counts.

import { Marker, type MarkStats } from './httpmark.js';
import type { DrainWatch } from '../ops/instance.js';
import type { PacketQueue, Sys } from '../os/sys.js';

const QUEUE_BASE = 40000; // marking queues: 40000-49999 (holds use 30000-39999)
const QUEUE_TRIES = 64;
const QUEUE_LEN = 4096;
const READ_MS = 100;
const PRUNE_MS = 5000;

interface Session {
  queue: PacketQueue;
  marker: Marker;
  users: number;
  loop: Promise<void>;
  stop: boolean;
  failure?: string;
}

let session: Promise<Session> | null = null;
const here = new Set<number>(); // ports this process marks now

/** Is this process marking `port` now? (Under the app's lock, any other marking is a dead run's.) */
export const marksHere = (port: number) => here.has(port);

async function open(sys: Sys): Promise<Session> {
  let last = '';
  // a queue number another process reads refuses the bind: move on to the next
  for (let i = 0; i < QUEUE_TRIES; i++) {
    const n = QUEUE_BASE + ((sys.pid + i * 7919) % 10000);
    try {
      const queue = await sys.openQueue(n, QUEUE_LEN);
      const s: Session = { queue, marker: new Marker(), users: 0, loop: Promise.resolve(), stop: false };
      s.loop = serve(sys, s);
      return s;
    } catch (err) {
      last = (err as Error).message;
      if (!/EPERM|EBUSY|EEXIST/.test(last)) break;
    }
  }
  throw new Error(last || 'no free queue');
}

async function serve(sys: Sys, s: Session): Promise<void> {
  let pruned = sys.now();
  try {
    while (!s.stop) {
      await s.queue.serve(READ_MS, (p) => s.marker.packet(p, sys.now()));
      if (sys.now() - pruned > PRUNE_MS) [pruned] = [sys.now(), s.marker.prune(sys.now())];
    }
  } catch (err) {
    // reading failed: unbind now, so that the rules' --queue-bypass lets every packet pass at once
    // instead of waiting in the kernel's queue for a reader that is gone
    s.failure = (err as Error).message;
    s.queue.close();
  }
}

/** A port being marked: its queue number (for the rules), what the drain reads, and its end. */
export interface MarkHandle {
  queue: number;
  watch: DrainWatch;
  stats(): MarkStats; // read before end()
  /** Stops marking the port; the last port closes the queue. Call it once the rules are gone. */
  end(): Promise<void>;
}

/** Starts marking `port` in this process; throws with the reason when the queue cannot be had. */
export async function markPort(sys: Sys, port: number): Promise<MarkHandle> {
  const opening = (session ??= open(sys));
  let s: Session;
  try {
    s = await opening;
  } catch (err) {
    if (session === opening) session = null;
    throw err;
  }
  s.users++;
  s.marker.addPort(port, sys.now());
  here.add(port);
  let ended = false;
  return {
    queue: s.queue.queue,
    watch: {
      quiet: (remotes) => !s.failure && s.marker.quiet(port, remotes, sys.now()),
    },
    stats: () => s.marker.stats(port)!,
    async end() {
      if (ended) return;
      ended = true;
      here.delete(port);
      s.marker.removePort(port);
      if (--s.users > 0) return;
      s.stop = true;
      if (session === opening) session = null;
      await s.loop;
      s.queue.close();
    },
  };
}
