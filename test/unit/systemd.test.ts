// The unit files `portflip systemd` prints: exact lines, quoting, and which node starts portflip.

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { appUnit, execPrefix, quoteArg, restoreUnit } from '../../src/os/systemd.js';
import { PortflipError } from '../../src/core/errors.js';
import { backoffMs } from '../../src/commands/supervisor.js';

const lines = (text: string) => text.split('\n');
const section = (text: string, name: string) => {
  const all = lines(text);
  const start = all.indexOf(`[${name}]`);
  const end = all.findIndex((l, i) => i > start && l.startsWith('['));
  return all.slice(start + 1, end < 0 ? undefined : end).filter((l) => l && !l.startsWith('#'));
};

test('the app unit runs `portflip run APP` in the foreground and reloads through `portflip reload`', () => {
  const text = appUnit({ app: 'web', exec: ['/usr/local/bin/portflip'] });
  assert.equal(section(text, 'Service'), [
    'Type=simple',
    'ExecStart=/usr/local/bin/portflip run web',
    'ExecReload=/usr/local/bin/portflip reload web',
    'Restart=on-failure',
    'RestartSec=2s',
    'KillMode=process',
  ]);
  assert.equal(section(text, 'Install'), ['WantedBy=multi-user.target']);
  assert.ok(section(text, 'Unit').includes('After=network-online.target portflip-restore.service'));
  assert.match(text, /^# portflip-web\.service: /);
  // the choice of KillMode says why, right above it
  const all = lines(text);
  assert.match(all[all.indexOf('KillMode=process') - 1], /^# /);
  assert.match(text, /# KillMode=process: on stop only portflip gets SIGTERM/);
});

test('-c FILE is passed on to run, not to reload (reload asks the supervisor, which knows its file)', () => {
  const text = appUnit({
    app: 'api',
    exec: ['/usr/bin/node', '/opt/portflip/dist/src/main.js'],
    config: '/etc/portflip/api.toml',
  });
  assert.ok(
    lines(text).includes('ExecStart=/usr/bin/node /opt/portflip/dist/src/main.js run api -c /etc/portflip/api.toml'),
  );
  assert.ok(lines(text).includes('ExecReload=/usr/bin/node /opt/portflip/dist/src/main.js reload api'));
});

test('the restore unit is a oneshot at boot, after the firewall is loaded', () => {
  const text = restoreUnit(['/usr/local/bin/portflip']);
  assert.equal(section(text, 'Unit'), [
    'Description=portflip: re-create the redirects of every app from its state file at boot',
    'After=network-pre.target',
  ]);
  assert.equal(section(text, 'Service'), [
    'Type=oneshot',
    'ExecStart=/usr/local/bin/portflip restore',
    'RemainAfterExit=yes',
  ]);
  assert.equal(section(text, 'Install'), ['WantedBy=multi-user.target']);
  assert.match(text, /^# portflip-restore\.service: /);
});

test('ExecStart words are escaped for systemd: % and $ doubled, spaces and quotes quoted', () => {
  assert.is(quoteArg('/usr/local/bin/portflip'), '/usr/local/bin/portflip');
  assert.is(quoteArg('/srv/my app/web.toml'), '"/srv/my app/web.toml"');
  assert.is(quoteArg('/etc/100%.toml'), '/etc/100%%.toml');
  assert.is(quoteArg('/etc/$HOME.toml'), '/etc/$$HOME.toml');
  assert.is(quoteArg('a"b\\c'), '"a\\"b\\\\c"');
  const text = appUnit({ app: 'web', exec: ['/opt/port flip/bin/portflip'], config: '/etc/portflip/web 2.toml' });
  assert.ok(lines(text).includes('ExecStart="/opt/port flip/bin/portflip" run web -c "/etc/portflip/web 2.toml"'));
});

test("node comes first unless the shebang will find it on systemd's PATH", () => {
  assert.equal(execPrefix('/usr/local/bin/portflip', '/usr/bin/node'), ['/usr/local/bin/portflip']);
  assert.equal(execPrefix('/usr/local/bin/portflip', '/usr/local/bin/node'), ['/usr/local/bin/portflip']);
  assert.equal(execPrefix('/usr/local/bin/portflip', '/root/.nvm/versions/node/v20.1.0/bin/node'), [
    '/root/.nvm/versions/node/v20.1.0/bin/node',
    '/usr/local/bin/portflip',
  ]);
  assert.equal(execPrefix('/opt/portflip/dist/src/main.js', '/usr/bin/node'), [
    '/usr/bin/node',
    '/opt/portflip/dist/src/main.js',
  ]);
});

test('a bad app name is refused, not written into a unit', () => {
  assert.throws(
    () => appUnit({ app: 'Web App', exec: ['/usr/local/bin/portflip'] }),
    (e: unknown) => e instanceof PortflipError && e.kind === 'usage',
  );
});

test('crash restarts back off 1s, 2s, 4s ... capped at 30s', () => {
  assert.equal([0, 1, 2, 3, 4, 5, 6, 10].map(backoffMs), [1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]);
});

test.run();
