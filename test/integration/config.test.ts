// Config files and lifecycle hooks, for real: flags win, mistakes name the file and key, hooks see their environment.

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { mkdtempSync, writeFileSync, readFileSync, existsSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { freePorts, fixture } from '../helpers/netns.js';
import { inWorld, show, get } from '../helpers/world.js';
import { events } from '../helpers/events.js';

const appCommand = (v: string) =>
  JSON.stringify([process.execPath, fixture('app.mjs'), '--port', '{port}', '--version', v]);
const envFile = (text: string) =>
  Object.fromEntries(
    text
      .trim()
      .split('\n')
      .map((l) => l.split(/=(.*)/s).slice(0, 2)),
  );

test('deploy from a config file; flags win over it; init writes a starter and never overwrites', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'pf-cfg-'));
  try {
    await inWorld(async (w) => {
      const [a, b, c, d] = await freePorts(4);
      const init = await w.pf(['init', 'web'], { PORTFLIP_CONFIG_DIR: dir });
      assert.is(init.code, 0, show(init));
      assert.match(readFileSync(join(dir, 'web.toml'), 'utf8'), /listen = 80/);
      const again = await w.pf(['init', 'web'], { PORTFLIP_CONFIG_DIR: dir });
      assert.is(again.code, 2);
      assert.match(again.stderr, /already exists/);

      writeFileSync(
        join(dir, 'web.toml'),
        `listen = 80\nports = [${a}, ${b}]\ncommand = ${appCommand('v1')}\nready = "http://127.0.0.1:{port}/health"\ndrain_timeout = "5s"\nkill_after = 3\n`,
      );
      const r = await w.pf(['deploy', 'web', '--json'], { PORTFLIP_CONFIG_DIR: dir });
      assert.is(r.code, 0, show(r));
      assert.ok([a, b].includes(events(r.stdout).find((e) => e.step === 'switch')!.port));
      assert.is(await get(w.ns, 'http://127.0.0.1:80/'), 'v1');
      // -c FILE, with flags winning: other ports, another command
      const r2 = await w.pf([
        'deploy',
        '-c',
        join(dir, 'web.toml'),
        '--ports',
        `${c},${d}`,
        '--json',
        '--',
        process.execPath,
        fixture('app.mjs'),
        '--port',
        '{port}',
        '--version',
        'v2',
      ]);
      assert.is(r2.code, 0, show(r2));
      assert.ok([c, d].includes(events(r2.stdout).find((e) => e.step === 'switch')!.port));
      assert.is(await get(w.ns, 'http://127.0.0.1:80/'), 'v2');
      const st = JSON.parse((await w.pf(['status', '-c', join(dir, 'web.toml'), '--json'])).stdout);
      assert.is(st.apps[0].app, 'web');
    });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a bad config file: one line naming the file, the key and what is expected; nothing changed', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'pf-cfg-'));
  try {
    await inWorld(async (w) => {
      const before = await w.save();
      const cases: [string, RegExp][] = [
        ['listen = 80\nlistne = 81\n', /web\.toml: unknown key "listne"/],
        ['listen = "80"\n', /web\.toml: key "listen": expected a port number/],
        ['listen = 80\nports = [8001, "x"]\n', /web\.toml: key "ports\.1": expected a port number/],
        ['listen = 80\ndrain = "sometimes"\n', /web\.toml: key "drain": expected "auto", "signal" or "idle"/],
        ['listen = 80\ncommand = "node server.js"\n', /web\.toml: key "command": expected a list of strings/],
        ['listen = 80\nkill_after = "soon"\ncommand = ["true"]\n', /--kill-after: "soon" is not a duration/],
        ['listen = [80\n', /web\.toml:\d+: /],
      ];
      for (const [text, message] of cases) {
        writeFileSync(join(dir, 'web.toml'), text);
        const r = await w.pf(['deploy', '-c', join(dir, 'web.toml')]);
        assert.ok(r.code === 8 || r.code === 2, show(r));
        assert.is(r.stderr.trim().split('\n').length, 1, r.stderr);
        assert.match(r.stderr, message);
      }
      const missing = await w.pf(['deploy', '-c', join(dir, 'nope.toml')]);
      assert.is(missing.code, 8);
      assert.match(missing.stderr, /nope\.toml: cannot read it/);
      assert.is(await w.save(), before);
      assert.not.ok(existsSync(join(w.dirs.stateDir, 'web.json')));
    });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('hooks run at their steps with the app environment and PORTFLIP_APP/PORT/PREVIOUS_PORT/STEP', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'pf-hooks-'));
  try {
    await inWorld(async (w) => {
      const [a, b] = await freePorts(2);
      const dump = (name: string) =>
        `env | grep -E '^(PORTFLIP_|GREETING=)' | sort > ${dir}/${name}.env; echo ${name} >> ${dir}/order`;
      const config = (v: string, extra = '') =>
        `listen = 80\nports = [${a}, ${b}]\ncommand = ${appCommand(v)}\nenv = { GREETING = "hi" }\n` +
        ['before_start', 'after_ready', 'after_switch', 'after_drain', 'on_failure']
          .map((h) => `${h} = "${dump(h)}"`)
          .join('\n') +
        '\n' +
        extra;
      writeFileSync(join(dir, 'web.toml'), config('v1'));
      assert.is((await w.pf(['deploy', '-c', join(dir, 'web.toml')])).code, 0);
      rmSync(join(dir, 'order'));
      const r = await w.pf([
        'deploy',
        '-c',
        join(dir, 'web.toml'),
        '--json',
        '--',
        process.execPath,
        fixture('app.mjs'),
        '--port',
        '{port}',
        '--version',
        'v2',
      ]);
      assert.is(r.code, 0, show(r));
      assert.equal(readFileSync(join(dir, 'order'), 'utf8').trim().split('\n'), [
        'before_start',
        'after_ready',
        'after_switch',
        'after_drain',
      ]);
      const to = events(r.stdout).find((e) => e.step === 'switch')!.port;
      const from = to === a ? b : a;
      for (const h of ['before_start', 'after_ready', 'after_switch', 'after_drain']) {
        assert.equal(
          envFile(readFileSync(join(dir, `${h}.env`), 'utf8')),
          {
            GREETING: 'hi',
            PORTFLIP_APP: 'web',
            PORTFLIP_PORT: String(to),
            PORTFLIP_PREVIOUS_PORT: String(from),
            PORTFLIP_STEP: h,
          },
          h,
        );
      }

      // a failing before_start: nothing starts, nothing switches, on_failure is told the step
      for (const [failing, startsCandidate] of [
        ['before_start', false],
        ['after_ready', true],
      ] as const) {
        rmSync(join(dir, 'order'), { force: true });
        writeFileSync(join(dir, 'web.toml'), config('v3').replace(`${failing} = "`, `${failing} = "exit 3; `));
        const before = await w.save();
        const bad = await w.pf(['deploy', '-c', join(dir, 'web.toml'), '--json']);
        assert.is(bad.code, 1, show(bad));
        assert.match(bad.stderr, new RegExp(`${failing} hook failed \\(exit 3\\)`));
        assert.is(await w.save(), before, 'nothing switched');
        assert.is(await get(w.ns, 'http://127.0.0.1:80/'), 'v2');
        assert.is(
          events(bad.stdout).some((e) => e.step === 'start'),
          startsCandidate,
        );
        assert.is(JSON.parse((await w.pf(['status', '--json'])).stdout).apps[0].others.length, 0, 'no candidate left');
        assert.is(envFile(readFileSync(join(dir, 'on_failure.env'), 'utf8')).PORTFLIP_STEP, failing);
      }
    });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test.run();
