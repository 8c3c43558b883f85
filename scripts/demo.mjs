// `npm run demo`: deploys a sample app v1, then v2 and v3 under steady load, in a throwaway network namespace, with live progress.
// Run it through scripts/demo.sh (as root), which installs and builds what is missing first.
import { spawn } from 'node:child_process';
import readline from 'node:readline';
import { createNetns, tmpDirs, portflipSpawn, fixture } from '../dist/test/helpers/netns.js';

const APP = 'web';
const LISTEN = 80;
const PORTS = [8001, 8002]; // inside the namespace only, like everything else here
const VERSIONS = ['v1', 'v2', 'v3'];
const START_DELAY_MS = 300; // the sample app takes this long to listen, so "ready" has something to wait for
const SETTLE_MS = 1000; // load runs this long before the first redeploy, between them, and after the last
const LOAD_CAP_MS = 25_000; // the load stops by itself after this, whatever happens here
const DEPLOY_TIMEOUT_MS = 30_000;
const REFRESH_MS = 1000;
const CLIENTS = 2; // per load generator; closed loop, so more only takes CPU from the deploys it is watching

const tty = process.stdout.isTTY;
const c = (code) => (s) => (tty ? `\x1b[${code}m${s}\x1b[0m` : s);
const [bold, dim, green, red] = [c(1), c(2), c(32), c(31)];
const t0 = performance.now();
const elapsed = () => `${((performance.now() - t0) / 1000).toFixed(1).padStart(5)}s`;
const ms = (n) => (n === undefined ? '-' : n >= 1000 ? `${(n / 1000).toFixed(2)}s` : `${Math.round(n)}ms`);
const sleep = (n) => new Promise((r) => setTimeout(r, n));

// The status line at the bottom is redrawn in place on a terminal, and printed once a second otherwise.
const loads = [];
let statusShown = false;
function statusText() {
  const total = loads.reduce((n, l) => n + l.live.total, 0);
  const failed = loads.reduce((n, l) => n + l.live.failed, 0);
  const f = failed === 0 ? green('0') : red(String(failed));
  return `${elapsed()}  requests ${String(total).padStart(6)}  failed ${f}  ${dim(loads.map((l) => `${l.label}: ${l.live.total}`).join(', '))}`;
}
function say(line) {
  if (tty && statusShown) process.stdout.write('\r\x1b[2K');
  process.stdout.write(`${line}\n`);
  if (tty && statusShown) process.stdout.write(statusText());
}
function drawStatus() {
  if (loads.length === 0) return;
  if (tty) process.stdout.write(`\r\x1b[2K${statusText()}`);
  else process.stdout.write(`${statusText()}\n`);
  statusShown = true;
}
function endStatus() {
  if (tty && statusShown) process.stdout.write('\r\x1b[2K');
  statusShown = false;
}

// Everything this run made, torn down exactly once: on success, on failure, on Ctrl-C and on SIGTERM.
let ns;
let dirs;
let ticker;
const children = new Set();
function cleanupSync() {
  clearInterval(ticker);
  for (const child of children) {
    try {
      process.kill(-child.pid, 'SIGKILL');
    } catch {}
  }
  dirs?.cleanup(); // SIGKILLs the app instances recorded in the state dir, then removes it
  dirs = undefined;
  // The namespace holders are killed by the helpers' own exit handler, which takes the rules with them.
}
process.on('exit', cleanupSync);
for (const sig of ['SIGINT', 'SIGTERM']) {
  // Runs before the helpers' handler, which kills what they started and exits 130 or 143.
  process.prependListener(sig, () => {
    endStatus();
    if (tty) process.stdout.write('\x1b[0m');
    process.stderr.write(`\ndemo: ${sig}, cleaning up: app instances, load, namespaces, temp dirs\n`);
    cleanupSync();
  });
}

// Streams portflip's --json events, shows each step, and resolves with the steps and the exit code.
function deploy(version) {
  const args = [
    'deploy', APP, '--listen', String(LISTEN), '--ports', PORTS.join(','),
    '--ready', 'http://127.0.0.1:{port}/health', '--json',
    '--', process.execPath, fixture('app.mjs'), '--port', '{port}', '--version', version,
    '--start-delay', String(START_DELAY_MS),
  ];
  say(bold(`${elapsed()}  deploy ${version}: portflip ${args.slice(0, 9).join(' ')} -- node app.mjs --version ${version}`));
  const child = portflipSpawn(ns, args, dirs, { stdio: ['ignore', 'pipe', 'pipe'] });
  children.add(child);
  const steps = {};
  let stderr = '';
  child.stderr.on('data', (d) => (stderr += d));
  readline.createInterface({ input: child.stdout }).on('line', (line) => {
    let e;
    try {
      e = JSON.parse(line);
    } catch {
      return say(`         ${line}`);
    }
    if (e.kind === 'step') {
      steps[e.step] = e;
      const where = e.port ? `port ${e.port}${e.pid ? ` pid ${e.pid}` : ''}` : '';
      const status = e.status === 'ok' ? green('ok    ') : red(e.status.padEnd(6));
      say(`${elapsed()}    ${version} ${status} ${e.step.padEnd(10)} ${where.padEnd(22)} ${ms(e.durationMs).padStart(7)}  ${dim(e.detail ?? '')}`);
    } else if (e.kind === 'signal') {
      say(dim(`${elapsed()}    ${version}        signal     port ${e.port} pid ${e.pid}: ${e.signal} (${e.reason})`));
    } else if (e.kind === 'connections') {
      say(dim(`${elapsed()}    ${version}        drain      port ${e.port}: ${e.open} connections open`));
    } else if (e.kind === 'notice' || e.kind === 'error') {
      say(`${elapsed()}    ${version} ${e.kind}: ${e.message}`);
    } else if (e.kind === 'log-tail') {
      say(`${elapsed()}    ${version} last lines of ${e.log}:\n${e.lines.join('\n')}`);
    }
  });
  return new Promise((resolve) => {
    const timer = setTimeout(() => {
      say(red(`deploy ${version} took longer than ${DEPLOY_TIMEOUT_MS} ms, stopping it`));
      try {
        process.kill(-child.pid, 'SIGKILL');
      } catch {}
    }, DEPLOY_TIMEOUT_MS);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      children.delete(child);
      if (code !== 0 && stderr.trim()) say(red(stderr.trim()));
      resolve({ version, code: code ?? 128, signal, steps });
    });
  });
}

// One bounded load generator (test/fixtures/load.mjs) inside a namespace, with live counts from its stderr.
async function startLoad(where, label, url, mode) {
  const argv = [
    fixture('load.mjs'), '--url', url, '--mode', mode, '--concurrency', String(CLIENTS),
    '--duration', String(LOAD_CAP_MS), '--max-requests', '500000', '--timeout', '5000', '--progress', '250',
  ];
  const child = where === 'client' ? ns.spawnClient(process.execPath, argv) : ns.spawn(process.execPath, argv);
  children.add(child);
  const load = { label, url, mode, child, live: { total: 0, ok: 0, failed: 0 }, stderr: '' };
  loads.push(load);
  let stdout = '';
  child.stdout.on('data', (d) => (stdout += d));
  child.stdin.on('error', () => {});
  let ready;
  const isReady = new Promise((r) => (ready = r));
  readline.createInterface({ input: child.stderr }).on('line', (line) => {
    if (line === 'ready') ready(true);
    else if (line.startsWith('progress ')) load.live = JSON.parse(line.slice(9));
    else load.stderr += `${line}\n`;
  });
  load.result = new Promise((resolve) => {
    child.on('close', (code) => {
      children.delete(child);
      ready(false);
      try {
        resolve(JSON.parse(stdout.trim().split('\n').pop()));
      } catch {
        resolve({ total: load.live.total, ok: load.live.ok, failed: load.live.failed + 1, versions: [], errors: { [`load exited ${code} without a summary`]: 1 }, p99: 0 });
      }
    });
  });
  load.stop = () => {
    child.stdin.end('stop\n'); // it finishes the requests in flight, then prints its summary
    const t = setTimeout(() => child.kill('SIGKILL'), 10_000);
    return load.result.finally(() => clearTimeout(t));
  };
  const t = setTimeout(() => ready(false), 10_000);
  const ok = await isReady;
  clearTimeout(t);
  if (!ok) throw new Error(`load ${label} got no good answer from ${url}: ${load.stderr.trim()}`);
  return load;
}

// align: one letter per column, l or r.
function table(rows, align) {
  const widths = rows[0].map((_, i) => Math.max(...rows.map((r) => r[i].length)));
  return rows
    .map((r, n) => {
      const line = r.map((cell, i) => (align[i] === 'l' ? cell.padEnd(widths[i]) : cell.padStart(widths[i]))).join('   ').trimEnd();
      return n === 0 ? bold(line) : line;
    })
    .join('\n');
}

async function main() {
  say(bold('portflip demo: a sample app behind port 80, three deploys, steady load, zero failed requests'));
  ns = await createNetns({ peer: true });
  dirs = tmpDirs();
  say(dim(`         throwaway network namespaces: server (pid ${ns.pid}, ${ns.serverAddr}) and client (pid ${ns.clientPid}, ${ns.clientAddr}), joined by veth;`));
  say(dim(`         rules, apps and load live there only; the host's own rules are not touched`));

  const deploys = [];
  const first = await deploy('v1');
  deploys.push(first);
  if (first.code !== 0) throw new Error(`the first deploy failed (exit ${first.code})`);

  say(`${elapsed()}  load: ${CLIENTS} clients, a new connection per request, from the client namespace to http://${ns.serverAddr}:${LISTEN}/ (PREROUTING)`);
  say(`${elapsed()}  load: ${CLIENTS} clients on keep-alive connections, on the server's loopback to http://127.0.0.1:${LISTEN}/ (OUTPUT)`);
  await Promise.all([
    startLoad('client', 'new conns', `http://${ns.serverAddr}:${LISTEN}/`, 'new'),
    startLoad('server', 'keep-alive', `http://127.0.0.1:${LISTEN}/`, 'keepalive'),
  ]);
  ticker = setInterval(drawStatus, REFRESH_MS);
  drawStatus();
  await sleep(SETTLE_MS);
  for (const v of VERSIONS.slice(1)) {
    const r = await deploy(v);
    deploys.push(r);
    if (r.code !== 0) break;
    await sleep(SETTLE_MS);
  }
  clearInterval(ticker);
  drawStatus();
  endStatus();
  const results = await Promise.all(loads.map((l) => l.stop()));

  // The closing summary.
  const failed = results.reduce((n, r) => n + r.failed, 0);
  const total = results.reduce((n, r) => n + r.total, 0);
  const loadRows = [['load', 'requests', 'failed', 'p99', 'versions seen, in order of first answer']];
  // Answers are recorded as they finish, so one on a connection still open to the old instance can
  // finish after the first answer from the new one; the table shows first appearances, the note the raw order.
  const notes = [];
  loads.forEach((l, i) => {
    const raw = results[i].versions;
    const firstSeen = [...new Set(raw)];
    if (raw.length !== firstSeen.length) notes.push(`${l.label}: in the order answers finished: ${raw.join(' -> ')} (answers on connections still open to a draining instance, as designed)`);
    loadRows.push([l.label, String(results[i].total), String(results[i].failed), ms(results[i].p99), firstSeen.join(' -> ')]);
  });
  loadRows.push(['total', String(total), String(failed), '', '']);
  const deployRows = [['deploy', 'exit', 'start-to-ready', 'switch', 'drain', 'total']];
  for (const d of deploys) {
    const s = d.steps;
    const toReady = s.start && s.ready ? s.start.durationMs + s.ready.durationMs : undefined;
    deployRows.push([d.version, String(d.code), ms(toReady), ms(s.switch?.durationMs), ms(s.drain?.durationMs), ms(s.done?.durationMs)]);
  }
  process.stdout.write(`\n${table(loadRows, 'lrrrl')}\n${notes.map((n) => dim(`  ${n}`)).join('\n')}${notes.length ? '\n' : ''}\n${table(deployRows, 'lrrrrr')}\n\n`);
  for (const [i, r] of results.entries()) {
    if (r.failed > 0) process.stdout.write(red(`${loads[i].label}: errors ${JSON.stringify(r.errors)} first: ${JSON.stringify(r.firstErrors ?? [])}\n`));
  }
  const deploysOk = deploys.length === VERSIONS.length && deploys.every((d) => d.code === 0);
  const ok = failed === 0 && deploysOk && total > 0;
  process.stdout.write(ok
    ? green(`${total} requests, 0 failed, while portflip deployed ${VERSIONS.join(', ')}.\n`)
    : red(`${failed} of ${total} requests failed${deploysOk ? '' : ', and a deploy failed'}.\n`));

  // Tidy teardown: portflip stops its app and removes its rules; then the namespaces go.
  const stop = portflipSpawn(ns, ['stop', APP], dirs, { stdio: 'ignore' });
  children.add(stop);
  await new Promise((r) => {
    const t = setTimeout(() => { try { process.kill(-stop.pid, 'SIGKILL'); } catch {} }, 15_000);
    stop.on('close', () => { clearTimeout(t); children.delete(stop); r(); });
  });
  cleanupSync();
  await ns.destroy();
  return ok ? 0 : 1;
}

main().then(
  (code) => process.exit(code),
  (err) => {
    endStatus();
    process.stderr.write(red(`demo failed: ${err.stack ?? err}\n`));
    process.exit(1);
  },
);
