// --user drops root before exec: the instance runs as that user and owns its log.

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { chmodSync, copyFileSync, mkdtempSync, readFileSync, rmSync, statSync, symlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { freePorts } from '../helpers/netns.js';
import { inWorld, show, get } from '../helpers/world.js';
import { events } from '../helpers/events.js';
import { fixture } from '../helpers/netns.js';
import { needsRoot, testUnless } from '../helpers/skip.js';

/** The fixture app copied into a fresh temp dir of this mode: a clone may sit in a 0700 directory (/root/portflip). */
function fixtureIn(mode: number): { app: string; dir: string; done(): void } {
  const dir = mkdtempSync(path.join(tmpdir(), 'portflip-user-'));
  chmodSync(dir, mode);
  const app = path.join(dir, 'app.mjs');
  copyFileSync(fixture('app.mjs'), app);
  chmodSync(app, 0o644);
  return { app, dir, done: () => rmSync(dir, { recursive: true, force: true }) };
}

const uidOf = (pid: number) => Number(/^Uid:\s+(\d+)/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))![1]);

testUnless(needsRoot('switching users'), 'an instance deployed with --user nobody runs as nobody', async () => {
  const copy = fixtureIn(0o755);
  await inWorld(async (w) => {
    const ports = await freePorts(2);
    const r = await w.pf([
      'deploy',
      'web',
      '--listen',
      '80',
      '--ports',
      ports.join(','),
      '--user',
      'nobody',
      '--cwd',
      '/',
      '--json',
      '--',
      process.execPath,
      copy.app,
      '--port',
      '{port}',
      '--version',
      'v1',
    ]);
    assert.is(r.code, 0, show(r));
    const pid = events(r.stdout).find((e) => e.step === 'start')!.pid as number;
    const nobody = Number(/^nobody:[^:]*:(\d+):/m.exec(readFileSync('/etc/passwd', 'utf8'))![1]);
    assert.is(uidOf(pid), nobody);
    assert.is(await get(w.ns, 'http://127.0.0.1:80/pid'), String(pid));
    const log = JSON.parse((await w.pf(['status', '--json'])).stdout).apps[0].active.log;
    assert.is(statSync(log).uid, nobody, 'the log belongs to the app user');
  }).finally(copy.done);
});

testUnless(
  needsRoot('switching users'),
  'deploy --user nobody of a script in a 0700 directory fails in preflight, naming it',
  async () => {
    const copy = fixtureIn(0o700);
    await inWorld(async (w) => {
      const ports = await freePorts(2);
      const r = await w.pf([
        'deploy',
        'web',
        '--listen',
        '80',
        '--ports',
        ports.join(','),
        '--user',
        'nobody',
        '--cwd',
        '/',
        '--json',
        '--',
        process.execPath,
        copy.app,
        '--port',
        '{port}',
      ]);
      assert.is(r.code, 8, show(r));
      const all = events(r.stdout);
      assert.equal(
        all.filter((e) => e.kind === 'step'),
        [],
        'nothing ran: it failed in preflight',
      );
      const err = all.find((e) => e.kind === 'error')!;
      assert.is(err.error, 'config');
      assert.is(err.message, r.stderr.trim().replace(/^portflip: /, ''), 'one line, the same on stderr');
      assert.ok(
        err.message.startsWith(
          `--user nobody cannot reach its script ${copy.app}: ${copy.dir} is in the way (mode 0700`,
        ),
        err.message,
      );
      assert.is(JSON.parse((await w.pf(['status', '--json'])).stdout).apps.length, 0, 'no app was left behind');
    }).finally(copy.done);
  },
);

testUnless(
  needsRoot('switching users'),
  'deploy --user nobody of a command linked from a reachable directory into a 0700 one names the 0700 one',
  async () => {
    const hidden = fixtureIn(0o700);
    const open = fixtureIn(0o755);
    symlinkSync(process.execPath, path.join(hidden.dir, 'node'));
    symlinkSync(path.join(hidden.dir, 'node'), path.join(open.dir, 'node')); // as /usr/local/bin/node -> /root/.nvm/...
    await inWorld(async (w) => {
      const ports = await freePorts(2);
      const r = await w.pf([
        'deploy',
        'web',
        '--listen',
        '80',
        '--ports',
        ports.join(','),
        '--user',
        'nobody',
        '--cwd',
        '/',
        '--',
        path.join(open.dir, 'node'),
        open.app,
        '--port',
        '{port}',
      ]);
      assert.is(r.code, 8, show(r));
      const line = `portflip: --user nobody cannot reach the command ${path.join(open.dir, 'node')}: ${hidden.dir} is in the way`;
      assert.ok(r.stderr.startsWith(line), r.stderr);
    }).finally(() => (hidden.done(), open.done()));
  },
);

testUnless(
  needsRoot('lowering and restoring priority'),
  'portflip runs niced as root, and the instances it starts get the normal priority back',
  async () => {
    await inWorld(async (w) => {
      const ports = await freePorts(2);
      const r = await w.pf([
        'deploy',
        'web',
        '--listen',
        '80',
        '--ports',
        ports.join(','),
        '--json',
        '--',
        'sh',
        '-c',
        `echo portflip-nice=$(cut -d' ' -f19 /proc/$PPID/stat); exec ${process.execPath} ${fixture('app.mjs')} --port $PORT`,
      ]);
      assert.is(r.code, 0, show(r));
      const pid = events(r.stdout).find((e) => e.step === 'start')!.pid as number;
      const niceOf = (p: number) => Number(readFileSync(`/proc/${p}/stat`, 'utf8').split(') ')[1].split(' ')[16]);
      assert.is(niceOf(pid), 0, 'the instance runs at the normal priority');
      const log = JSON.parse((await w.pf(['status', '--json'])).stdout).apps[0].active.log;
      assert.match(readFileSync(log, 'utf8'), /portflip-nice=10\b/, 'portflip itself ran niced');
    });
  },
);

test.run();
