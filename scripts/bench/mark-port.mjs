// Benchmark helper, run inside a namespace: sends one port's packets through portflip's marking queue until stdin ends.
// node mark-port.mjs PORT   (prints "ready" once the queue is bound and the rules are in; the marker's counts at the end)
import { spawnSync } from 'node:child_process';
import { markPort } from '../../dist/src/drain/drainmark.js';
import { appText, parseSave } from '../../dist/src/os/iptables.js';
import { realSys } from '../../dist/src/os/sys.js';

const port = Number(process.argv[2]);
const restore = (mark) => {
  const view = parseSave(spawnSync('iptables-save', ['-t', 'mangle'], { encoding: 'utf8' }).stdout);
  const text = appText(view, { app: 'bench', listen: 0, target: null, open: [], firewall: null, mark }, 'ipv4', 'mangle');
  if (text && spawnSync('iptables-restore', ['--noflush'], { input: text }).status !== 0) throw new Error(`iptables-restore: ${text}`);
};
const handle = await markPort(realSys, port);
restore([{ port, queue: handle.queue }]);
process.stdout.write('ready\n');
process.stdin.resume();
process.stdin.on('end', async () => {
  restore([]);
  const stats = handle.stats();
  await handle.end();
  process.stdout.write(`${JSON.stringify(stats)}\n`);
  process.exit(0);
});
