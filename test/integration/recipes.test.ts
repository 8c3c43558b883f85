// The recipes in docs/drain.md (examples/): Go, gunicorn and uvicorn apps, 3 deploys each under keep-alive load over veth, 0 failed.

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { freePorts, repoRoot, startLoad, type LoadResult } from '../helpers/netns.js';
import { inWorld, show, type World } from '../helpers/world.js';

const examples = path.join(repoRoot, 'examples');
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Deploys v1, starts keep-alive load from the client namespace, deploys v2..v4 under it. */
async function threeDeploys(w: World, args: (v: string) => string[]): Promise<LoadResult> {
  const ports = await freePorts(2);
  const deploy = (v: string) => w.pf(['deploy', 'web', '--listen', '80', '--ports', ports.join(','), ...args(v)]);
  const first = await deploy('v1');
  assert.is(first.code, 0, show(first));
  const load = await startLoad(w.ns, 'client', {
    url: `http://${w.ns.serverAddr}:80/`,
    mode: 'keepalive',
    concurrency: 16,
    durationMs: 120_000,
    maxRequests: 5_000_000,
  });
  let res: LoadResult | undefined;
  try {
    for (const v of ['v2', 'v3', 'v4']) {
      await sleep(1000);
      const r = await deploy(v);
      assert.is(r.code, 0, show(r));
    }
    await sleep(300);
  } finally {
    res = await load.stop();
  }
  assert.is(res.failed, 0, JSON.stringify(res));
  assert.ok(res.ok > 200, `enough requests ran: ${res.ok}`);
  assert.equal([...new Set(res.versions)], ['v1', 'v2', 'v3', 'v4'], res.versions.join(','));
  return res;
}

test('docs/drain.md shows each recipe exactly as examples/ holds it', () => {
  const readme = readFileSync(path.join(repoRoot, 'docs/drain.md'), 'utf8');
  for (const f of ['go/server.go', 'python/wsgi.py', 'python/asgi.py']) {
    assert.ok(
      readme.includes(readFileSync(path.join(examples, f), 'utf8').trimEnd()),
      `docs/drain.md holds examples/${f} verbatim`,
    );
  }
});

test('Go recipe (net/http: Connection: close, then SetKeepAlivesEnabled(false) and Shutdown after 2 s): 0 failed', async () => {
  const dir = mkdtempSync(path.join(tmpdir(), 'portflip-go-'));
  try {
    const bin = path.join(dir, 'server');
    execFileSync('go', ['build', '-o', bin, '.'], {
      cwd: path.join(examples, 'go'),
      stdio: 'pipe',
      env: {
        ...process.env,
        GOCACHE: path.join(tmpdir(), 'portflip-go-cache'),
        GOFLAGS: '-mod=mod',
        GOTOOLCHAIN: 'local',
      },
    });
    await inWorld((w) => threeDeploys(w, (v) => ['--drain', 'signal', '--', bin, v]).then(() => {}), { peer: true });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('gunicorn recipe (sync workers, SIGTERM): 0 failed', async () => {
  await inWorld(
    (w) =>
      threeDeploys(w, (v) => [
        '--cwd',
        path.join(examples, 'python'),
        '--env',
        `APP_VERSION=${v}`,
        '--',
        '/usr/bin/gunicorn',
        '--bind',
        '0.0.0.0:{port}',
        '--workers',
        '2',
        '--timeout',
        '6',
        'wsgi:app',
      ]).then(() => {}),
    { peer: true },
  );
});

test('uvicorn recipe (SIGUSR1: Connection: close, then uvicorn stops itself after 2 s): 0 failed', async () => {
  await inWorld(
    (w) =>
      threeDeploys(w, (v) => [
        '--cwd',
        path.join(examples, 'python'),
        '--env',
        `APP_VERSION=${v}`,
        '--stop-signal',
        'SIGUSR1',
        '--drain',
        'signal',
        '--',
        '/usr/bin/python3',
        '-m',
        'uvicorn',
        'asgi:app',
        '--host',
        '0.0.0.0',
        '--port',
        '{port}',
      ]).then(() => {}),
    { peer: true },
  );
});

test.run();
