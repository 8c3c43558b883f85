// deploy --user against the fake Sys: preflight names the directory that keeps the user from the app, before any start.

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { whatBlocks } from '../../src/os/access.js';
import { deploy } from '../../src/commands/deploy.js';
import { ExitCode, PortflipError } from '../../src/core/errors.js';
import { FakeSys, fakeCtx, fakeDeploy } from '../helpers/fakesys.js';

/** A fake host with user `app` (uid 1000, gid 1000) and a private directory /root/clone (0700 root). */
async function host(): Promise<FakeSys> {
  const sys = new FakeSys();
  await sys.fs.mkdir('/etc', 0o755);
  await sys.fs.write('/etc/passwd', 'root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n', 0o644);
  await sys.fs.mkdir('/root/clone/app', 0o755);
  await sys.fs.chmod('/root', 0o700);
  await sys.fs.write('/root/clone/app/server.js', '', 0o644);
  await sys.fs.write('/srv/app/server.js', '', 0o644);
  return sys;
}

async function refused(sys: FakeSys, over: Parameters<typeof fakeDeploy>[0]): Promise<PortflipError> {
  const { ctx, events } = fakeCtx(sys);
  const err = await deploy(fakeDeploy({ user: 'app', ...over }), ctx).then(
    () => null,
    (e) => e,
  );
  assert.ok(err instanceof PortflipError, String(err));
  assert.is(err.kind, 'config');
  assert.is(err.exitCode, ExitCode.config);
  assert.is(sys.apps().length, 0, 'nothing was started');
  assert.equal(
    events.filter((e) => e.kind === 'step'),
    [],
    'it failed in preflight, before any step',
  );
  return err;
}

test('whatBlocks walks from the root down and names the first closed directory, or the file', async () => {
  const sys = await host();
  assert.equal(await whatBlocks(sys, '/root/clone/app/server.js', 1000, 1000, 'read'), {
    path: '/root',
    mode: 0o700,
    uid: 0,
    need: 'execute',
  });
  assert.is(await whatBlocks(sys, '/root/clone/app/server.js', 0, 0, 'read'), null, 'root passes');
  assert.is(await whatBlocks(sys, '/srv/app/server.js', 1000, 1000, 'read'), null);
  await sys.fs.chmod('/srv/app/server.js', 0o600);
  assert.equal(await whatBlocks(sys, '/srv/app/server.js', 1000, 1000, 'read'), {
    path: '/srv/app/server.js',
    mode: 0o600,
    uid: 0,
    need: 'read',
  });
  await sys.fs.chown('/srv/app/server.js', 1000, 1000);
  assert.is(await whatBlocks(sys, '/srv/app/server.js', 1000, 1000, 'read'), null, 'the owner bits apply to the owner');
  await sys.fs.chmod('/srv/app/server.js', 0o044);
  assert.ok(await whatBlocks(sys, '/srv/app/server.js', 1000, 1000, 'read'), 'only the owner bits apply to the owner');
  const relative = await whatBlocks(sys, 'no/such/file', 1000, 1000, 'read');
  assert.ok(relative && 'missing' in relative, 'a relative path is walked from the current directory, to an end');
});

test('a script in a directory the user cannot reach is refused in preflight, naming the directory', async () => {
  const sys = await host();
  const err = await refused(sys, { command: ['fakeapp', '/root/clone/app/server.js'] });
  assert.match(err.message, /^--user app cannot reach its script \/root\/clone\/app\/server\.js: \/root is in the way/);
  assert.match(err.message, /mode 0700, owner uid 0; app needs execute permission on it/);
  assert.not.match(err.message, /\n/, 'one line');
});

test('a working directory or a command the user cannot reach is refused the same way', async () => {
  const sys = await host();
  const cwd = await refused(sys, { cwd: '/root/clone/app', command: ['fakeapp', 'server.js'] });
  assert.match(cwd.message, /^--user app cannot reach --cwd \/root\/clone\/app: \/root is in the way/);
  await sys.fs.write('/root/clone/app/run', '', 0o755);
  const cmd = await refused(sys, { command: ['/root/clone/app/run'] });
  assert.match(cmd.message, /^--user app cannot reach the command \/root\/clone\/app\/run: \/root is in the way/);
  await sys.fs.chmod('/srv/app/server.js', 0o600);
  const unreadable = await refused(sys, { command: ['fakeapp', 'server.js'] });
  assert.match(
    unreadable.message,
    /its script \/srv\/app\/server\.js \(mode 0600, owner uid 0; app needs read permission/,
  );
});

test('a user who can reach everything deploys as before; flags and missing files are not scripts', async () => {
  const sys = await host();
  const { ctx } = fakeCtx(sys);
  await deploy(fakeDeploy({ user: 'app', command: ['fakeapp', '--port={port}', 'server.js'] }), ctx);
  await deploy(fakeDeploy({ user: 'app', command: ['fakeapp', 'server.js'] }), fakeCtx(sys).ctx);
  await deploy(fakeDeploy({ user: 'app', command: ['fakeapp', 'no-such-file.js'] }), fakeCtx(sys).ctx);
  assert.is(sys.apps().length, 1);
});

test.run();
