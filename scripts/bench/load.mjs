// Open-loop HTTP load for the benchmark: requests at a fixed rate, latency from the scheduled time, every error by kind.
//
// Why not autocannon (which is installed): autocannon keeps its connections open and only reconnects when one
// fails, so it has no "new connection per request" mode; its rate limiting (overallRate) holds requests back per
// connection and times each one from when it was actually sent, so a server stall shows up as fewer requests sent
// rather than as latency (coordinated omission); and it reports errors as one count plus timeouts and non-2xx,
// not as refused versus reset. Those three things are the point of this benchmark, so the scheduler is written
// here on node:http: agent:false (and Connection: close) for a new connection per request, a keepAlive Agent for
// keep-alive. A request on a reused keep-alive socket that fails is counted, never retried.
//
// Modes: --rate R (open loop, R requests/s) or --closed N (N workers back to back, for throughput).
// Output: one JSON line on stdout when done: { t0, mode, records: [[scheduledMs, latencyMs, kind], ...] }
// where t0 is the wall-clock time (Date.now()) of scheduled offset 0 and kind is "ok" or an error kind.
import http from 'node:http';
import readline from 'node:readline';
import { parseArgs } from 'node:util';

const { values: opt } = parseArgs({
  options: {
    url: { type: 'string' },
    mode: { type: 'string', default: 'new' },
    rate: { type: 'string', default: '0' },
    closed: { type: 'string', default: '0' },
    duration: { type: 'string', default: '30000' }, // hard bound; the parent normally says "stop" sooner
    timeout: { type: 'string', default: '5000' },
    'max-outstanding': { type: 'string', default: '3000' },
    'max-requests': { type: 'string', default: '200000' },
  },
});
const die = (msg) => {
  process.stderr.write(`load: ${msg}\n`);
  process.exit(2);
};
if (!opt.url) die('need --url');
if (opt.mode !== 'new' && opt.mode !== 'keepalive') die(`--mode must be new|keepalive, got ${opt.mode}`);
const url = new URL(opt.url);
const rate = Number(opt.rate);
const closed = Number(opt.closed);
const durationMs = Number(opt.duration);
const timeoutMs = Number(opt.timeout);
const maxOutstanding = Number(opt['max-outstanding']);
const maxRequests = Number(opt['max-requests']);
if (!(rate > 0) === !(closed > 0)) die('give exactly one of --rate R or --closed N');

const agent = opt.mode === 'keepalive' ? new http.Agent({ keepAlive: true, maxSockets: 64 }) : false;
const headers = agent ? {} : { connection: 'close' };

export function kindOf(err) {
  const code = err?.code ?? '';
  if (code === 'ECONNREFUSED') return 'refused';
  if (code === 'ECONNRESET' || code === 'EPIPE' || /socket hang up/i.test(err?.message ?? '')) return 'reset';
  if (code === 'ETIMEDOUT' || code === 'ESOCKETTIMEDOUT') return 'timeout';
  return `other:${code || err?.message || 'error'}`;
}

const records = [];
const firstErrors = [];
let outstanding = 0;
let issued = 0;
let stopping = false;
const perf0 = performance.now();
const t0 = Date.now(); // wall clock of perf0, shared with the parent process (same host clock)

// One request scheduled at `sched` (ms after perf0); resolves when it has an outcome.
function fire(sched) {
  issued++;
  outstanding++;
  return new Promise((resolve) => {
    let done = false;
    const finish = (kind, detail) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      outstanding--;
      records.push([Math.round(sched * 100) / 100, Math.round((performance.now() - perf0 - sched) * 100) / 100, kind]);
      if (kind !== 'ok' && firstErrors.length < 10) firstErrors.push(`${kind}: ${detail}`);
      resolve();
    };
    const req = http.get(url, { agent, headers }, (res) => {
      res.resume();
      res.on('error', (err) => finish(kindOf(err), `${err.code} ${err.message} (body)`));
      res.on('end', () => {
        const s = res.statusCode ?? 0;
        finish(s >= 200 && s < 300 ? 'ok' : 'non2xx', `status ${s}`);
      });
    });
    // The timeout counts from the scheduled time too, like the latency.
    const left = Math.max(1, timeoutMs - (performance.now() - perf0 - sched));
    const timer = setTimeout(() => {
      finish('timeout', `no answer ${timeoutMs} ms after scheduled`);
      req.destroy();
    }, left);
    req.on('error', (err) => finish(kindOf(err), `${err.code} ${err.message}${req.reusedSocket ? ' (reused socket)' : ''}`));
  });
}

const inflight = new Set();
function track(p) {
  inflight.add(p);
  p.then(() => inflight.delete(p));
}

function stop() {
  stopping = true;
}
setTimeout(stop, durationMs);
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
readline.createInterface({ input: process.stdin }).on('line', (l) => l.trim() === 'stop' && stop());
process.stdin.on('end', stop);

process.stderr.write(`start ${t0}\n`);
if (rate > 0) {
  // Open loop: request i is due at i/rate, whatever happened to the earlier ones. A late timer fires every due
  // request at once, and their latency still counts from when they were due.
  const interval = 1000 / rate;
  let next = 0;
  let dropped = 0;
  await new Promise((resolve) => {
    const tick = () => {
      const now = performance.now() - perf0;
      while (!stopping && next <= now && issued < maxRequests) {
        if (outstanding >= maxOutstanding) {
          // Bounded memory: past this many open requests the client itself is the bottleneck; count it.
          records.push([Math.round(next * 100) / 100, 0, 'client-overload']);
          dropped++;
        } else track(fire(next));
        next += interval;
      }
      if (stopping || issued >= maxRequests) return resolve();
      setTimeout(tick, Math.max(0, next - (performance.now() - perf0)));
    };
    tick();
  });
} else {
  const worker = async () => {
    while (!stopping && issued < maxRequests) await fire(performance.now() - perf0);
  };
  await Promise.all(Array.from({ length: closed }, worker));
}
await Promise.race([Promise.all(inflight), new Promise((r) => setTimeout(r, timeoutMs + 1000))]);
if (agent) agent.destroy();
records.sort((a, b) => a[0] - b[0]);
process.stdout.write(`${JSON.stringify({ t0, mode: opt.mode, rate, closed, firstErrors, records })}\n`, () => process.exit(0));
