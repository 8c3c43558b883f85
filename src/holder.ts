// The holder: a small detached process that keeps new-connection SYNs in an NFQUEUE until told to let them go.
//
// node holder.js QUEUE MAXLEN TIMEOUT_MS SOCKET [OWNER_PID]
// It binds the queue, answers one-line commands on a unix socket (status, release, exit), and is
// bounded in time: past TIMEOUT_MS it releases everything on its own, and it exits EXIT_GRACE_MS
// later whatever happens. Once released it accepts every packet the moment it arrives, until it
// exits; after that the rule's --queue-bypass lets SYNs pass with no reader at all. With OWNER_PID (the
// deploy that holds), it also releases the moment that process is gone: a killed deploy holds no one.

import { createServer } from 'node:net';
import { readFileSync, unlinkSync } from 'node:fs';
import { NfQueue, parseQueueStats } from './os/nfqueue.js';

export const EXIT_GRACE_MS = 10_000;

export interface HolderStatus {
  queue: number;
  pid: number;
  waiting: number; // SYNs held right now
  held: number; // SYNs held since the start
  released: boolean;
  full: number; // SYNs the kernel dropped because the queue was full
  maxlen: number;
  untilMs: number; // epoch ms: releases on its own then
}

async function main(argv: string[]): Promise<void> {
  const [queue, maxlen, timeoutMs] = argv.slice(0, 3).map(Number);
  const sockPath = argv[3];
  const owner = Number(argv[4] ?? 0);
  const q = new NfQueue(queue);
  q.open(maxlen);
  const until = Date.now() + timeoutMs;
  let maxId = -1;
  let released = false;
  let released0 = 0; // ids up to here have a verdict
  let held = 0;
  let exiting = false;

  const release = (why: string) => {
    if (!released) console.log(`${new Date().toISOString()} release (${why}): ${held - released0} waiting`);
    released = true;
    if (maxId >= 0) q.acceptUpTo(maxId);
    released0 = held;
  };
  const finish = async (why: string) => {
    if (exiting) return;
    exiting = true;
    release(why);
    server.close();
    // what arrived since the last read is accepted too: unbinding would drop it (the client would retransmit)
    for (const id of await q.read(0).catch(() => [])) if (id > maxId) maxId = id;
    release(why);
    q.close();
    try {
      unlinkSync(sockPath);
    } catch {
      // gone already
    }
    console.log(`${new Date().toISOString()} exit (${why})`);
    process.exit(0);
  };
  const status = (): HolderStatus => {
    let full = 0;
    try {
      const row = parseQueueStats(readFileSync('/proc/net/netfilter/nfnetlink_queue', 'utf8')).find(
        (s) => s.queue === queue,
      );
      full = row?.dropped ?? 0;
    } catch {
      // not readable: reported as 0
    }
    return { queue, pid: process.pid, waiting: held - released0, held, released, full, maxlen, untilMs: until };
  };

  const server = createServer((conn) => {
    let buf = '';
    conn.on('error', () => {});
    conn.on('data', (d) => {
      buf += d.toString();
      for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
        const cmd = buf.slice(0, nl).trim();
        buf = buf.slice(nl + 1);
        if (cmd === 'status') conn.write(JSON.stringify(status()) + '\n');
        else if (cmd === 'release') {
          const s = status();
          release('asked');
          conn.write(JSON.stringify({ ...s, released: true }) + '\n');
        } else if (cmd === 'exit') {
          conn.end(JSON.stringify(status()) + '\n', () => void finish('asked'));
        } else conn.write(JSON.stringify({ error: `unknown command "${cmd}"` }) + '\n');
      }
    });
  });
  try {
    unlinkSync(sockPath);
  } catch {
    // no leftover
  }
  await new Promise<void>((res, rej) => server.listen(sockPath, res).once('error', rej));
  for (const sig of ['SIGTERM', 'SIGINT', 'SIGHUP'] as const) process.on(sig, () => void finish(sig));
  setTimeout(() => release('timeout'), Math.max(0, until - Date.now())).unref();
  if (owner > 0) {
    const watch = setInterval(() => {
      try {
        process.kill(owner, 0);
      } catch {
        clearInterval(watch);
        release(`its deploy, pid ${owner}, is gone`);
      }
    }, 200);
    watch.unref();
  }
  setTimeout(() => void finish('time is up'), Math.max(0, until - Date.now()) + EXIT_GRACE_MS).unref();
  console.log(
    `${new Date().toISOString()} holding queue ${queue} (maxlen ${maxlen}) until ${new Date(until).toISOString()}`,
  );
  for (;;) {
    if (exiting) return;
    const ids = await q.read(50);
    held += ids.length;
    for (const id of ids) if (id > maxId) maxId = id;
    if (exiting) return;
    if (ids.length && released) release('already released');
  }
}

main(process.argv.slice(2)).catch((err) => {
  console.error(`holder: ${(err as Error).message}`);
  process.exit(1);
});
