// What people read: the status table (colour only on a terminal), --watch, and the active instance's log.

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import type { ChildProcess } from 'node:child_process';
import { freePorts, repoRoot, waitFor } from '../helpers/netns.js';
import { inWorld, deployArgs, show } from '../helpers/world.js';

const collect = (child: ChildProcess) => {
  const out = { text: '' };
  child.stdout!.on('data', (d) => (out.text += d));
  return out;
};
const exitOf = (child: ChildProcess) => new Promise<number | null>((r) => child.once('exit', (c) => r(c)));

test('status: a table without colour in a pipe, with colour on a terminal; --watch refreshes until Ctrl-C', async () => {
  await inWorld(async (w) => {
    const ports = await freePorts(2);
    assert.is((await w.pf(deployArgs(ports, [], ['--version', 'v1']))).code, 0);
    const plain = await w.pf(['status']);
    assert.match(plain.stdout, /^APP\s+LISTEN\s+PORT\s+PID\s+STATE\s+UPTIME\s+CPU%\s+MEM\s+CONNS\s+FIREWALL\s+RULES/);
    assert.match(plain.stdout, /web\s+80\s+\d+\s+\d+\s+active\s+\d+s\s+[\d.]+\s+[\d.]+M\s+\d+\s+ok\s+ok/);
    assert.match(plain.stdout, /\nconntrack: \d+ of \d+ entries \([\d.]+%\)/);
    assert.not.match(plain.stdout, /\x1b\[/);
    const main = `${process.execPath} ${repoRoot}/dist/src/main.cjs`;
    const tty = await w.ns.exec('script', ['-qec', `${main} status`, '/dev/null'], {
      env: { PORTFLIP_STATE_DIR: w.dirs.stateDir, PORTFLIP_RUN_DIR: w.dirs.runDir },
    });
    assert.is(tty.code, 0, show(tty));
    assert.match(tty.stdout, /\x1b\[32mactive/);

    const watch = w.pfSpawn(['status', '--watch', '200ms', '--json']);
    const out = collect(watch);
    const exited = exitOf(watch);
    await waitFor(() => out.text.split('\n').filter(Boolean).length >= 3, 10_000, 'three refreshes');
    watch.kill('SIGINT');
    assert.is(await exited, 0);
    for (const line of out.text.trim().split('\n')) assert.is(JSON.parse(line).apps[0].app, 'web');
  });
});

test('logs shows the active instance log, and -f follows it across a deploy', async () => {
  await inWorld(async (w) => {
    const ports = await freePorts(2);
    assert.is((await w.pf(deployArgs(ports, [], ['--version', 'v1']))).code, 0);
    const r = await w.pf(['logs', 'web']);
    assert.is(r.code, 0, show(r));
    assert.match(r.stdout, /listening on \d+ version v1/);
    const follow = w.pfSpawn(['logs', 'web', '-f', '-n', '5']);
    const out = collect(follow);
    const exited = exitOf(follow);
    await waitFor(() => /version v1/.test(out.text), 5000, 'the first lines');
    assert.is((await w.pf(deployArgs(ports, [], ['--version', 'v2']))).code, 0);
    await waitFor(
      () => /now following .*\n[\s\S]*version v2/.test(out.text),
      10_000,
      `the new instance's log: ${out.text}`,
    );
    follow.kill('SIGINT');
    assert.is(await exited, 0);
    const none = await w.pf(['logs', 'nope']);
    assert.is(none.code, 9);
  });
});

test.run();
