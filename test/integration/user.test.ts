// --user drops root before exec: the instance runs as that user and owns its log.

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { readFileSync, statSync } from 'node:fs';
import { freePorts } from '../helpers/netns.js';
import { inWorld, deployArgs, events, show, get } from './lib.js';
import { fixture } from '../helpers/netns.js';

const uidOf = (pid: number) => Number(/^Uid:\s+(\d+)/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))![1]);

test('an instance deployed with --user nobody runs as nobody', async () => {
  if (process.getuid?.() !== 0) {
    console.log('  (skipped: needs real root to switch users; CI runs as root)');
    return;
  }
  await inWorld(async (w) => {
    const ports = await freePorts(2);
    const r = await w.pf(deployArgs(ports, ['--user', 'nobody', '--cwd', '/', '--json'], ['--version', 'v1']));
    assert.is(r.code, 0, show(r));
    const pid = events(r.stdout).find((e) => e.step === 'start')!.pid as number;
    const nobody = Number(/^nobody:[^:]*:(\d+):/m.exec(readFileSync('/etc/passwd', 'utf8'))![1]);
    assert.is(uidOf(pid), nobody);
    assert.is(await get(w.ns, 'http://127.0.0.1:80/pid'), String(pid));
    const log = JSON.parse((await w.pf(['status', '--json'])).stdout).apps[0].active.log;
    assert.is(statSync(log).uid, nobody, 'the log belongs to the app user');
  });
});

test('portflip runs niced as root, and the instances it starts get the normal priority back', async () => {
  if (process.getuid?.() !== 0) {
    console.log('  (skipped: lowering and restoring priority needs real root; CI runs as root)');
    return;
  }
  await inWorld(async (w) => {
    const ports = await freePorts(2);
    const r = await w.pf(['deploy', 'web', '--listen', '80', '--ports', ports.join(','), '--json', '--', 'sh', '-c',
      `echo portflip-nice=$(cut -d' ' -f19 /proc/$PPID/stat); exec ${process.execPath} ${fixture('app.mjs')} --port $PORT`]);
    assert.is(r.code, 0, show(r));
    const pid = events(r.stdout).find((e) => e.step === 'start')!.pid as number;
    const niceOf = (p: number) => Number(readFileSync(`/proc/${p}/stat`, 'utf8').split(') ')[1].split(' ')[16]);
    assert.is(niceOf(pid), 0, 'the instance runs at the normal priority');
    const log = JSON.parse((await w.pf(['status', '--json'])).stdout).apps[0].active.log;
    assert.match(readFileSync(log, 'utf8'), /portflip-nice=10\b/, 'portflip itself ran niced');
  });
});

test.run();
