// --user drops root before exec: the instance runs as that user and owns its log.

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { readFileSync, statSync } from 'node:fs';
import { freePorts } from '../helpers/netns.js';
import { inWorld, deployArgs, events, show, get } from './lib.js';

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

test.run();
