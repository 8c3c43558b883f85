// The git post-receive hook: a push to a bare repository deploys the pushed revision with zero failed requests.

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { mkdtempSync, writeFileSync, copyFileSync, rmSync, readdirSync, chmodSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { freePorts, fixture, repoRoot, startLoad } from '../helpers/netns.js';
import { inWorld, show, get } from '../helpers/world.js';

test('git push deploys the new revision under load, zero failed requests', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'pf-git-'));
  try {
    await inWorld(async (w) => {
      const [a, b] = await freePorts(2);
      const bare = join(dir, 'web.git');
      const work = join(dir, 'work');
      const git = async (cwd: string, ...args: string[]) => {
        const r = await w.ns.exec(
          'git',
          ['-C', cwd, '-c', 'user.name=t', '-c', 'user.email=t@example.invalid', ...args],
          {
            env: { PORTFLIP_STATE_DIR: w.dirs.stateDir, PORTFLIP_RUN_DIR: w.dirs.runDir },
          },
        );
        assert.is(r.code, 0, `git ${args.join(' ')}\n${show(r)}`);
        return r;
      };
      await git(dir, 'init', '-q', '--bare', '-b', 'main', bare);
      copyFileSync(join(repoRoot, 'scripts', 'post-receive'), join(bare, 'hooks', 'post-receive'));
      chmodSync(join(bare, 'hooks', 'post-receive'), 0o755);
      writeFileSync(
        join(dir, 'web.toml'),
        `listen = 80\nports = [${a}, ${b}]\nready = "http://127.0.0.1:{port}/health"\n` +
          `command = ["sh", "-c", "exec ${process.execPath} app.mjs --port $PORT --version $(cat VERSION)"]\n`,
      );
      await git(bare, 'config', 'portflip.app', 'web');
      await git(bare, 'config', 'portflip.config', join(dir, 'web.toml'));
      await git(bare, 'config', 'portflip.releases', join(dir, 'releases'));
      await git(bare, 'config', 'portflip.keep', '2');
      await git(bare, 'config', 'portflip.bin', `${process.execPath} ${join(repoRoot, 'dist', 'src', 'main.cjs')}`);

      await git(dir, 'init', '-q', '-b', 'main', work);
      copyFileSync(fixture('app.mjs'), join(work, 'app.mjs'));
      writeFileSync(join(work, 'VERSION'), 'v1\n');
      await git(work, 'add', '.');
      await git(work, 'commit', '-qm', 'v1');
      await git(work, 'remote', 'add', 'origin', bare);
      const first = await git(work, 'push', '-q', 'origin', 'main');
      assert.match(first.stderr, /checked out into/);
      assert.is(await get(w.ns, 'http://127.0.0.1:80/'), 'v1');

      const loads = await Promise.all([
        startLoad(w.ns, 'server', { url: 'http://127.0.0.1:80/', mode: 'new', durationMs: 60_000 }),
        startLoad(w.ns, 'server', { url: 'http://127.0.0.1:80/', mode: 'keepalive', durationMs: 60_000 }),
      ]);
      for (const v of ['v2', 'v3']) {
        writeFileSync(join(work, 'VERSION'), `${v}\n`);
        await git(work, 'commit', '-qam', v);
        await git(work, 'push', '-q', 'origin', 'main');
        assert.is(await get(w.ns, 'http://127.0.0.1:80/'), v);
      }
      for (const res of await Promise.all(loads.map((l) => l.stop()))) {
        assert.is(res.failed, 0, JSON.stringify(res));
        assert.equal([...new Set(res.versions)], ['v1', 'v2', 'v3']);
      }
      // two releases kept, plus the "current" link
      assert.is(readdirSync(join(dir, 'releases')).length, 3);

      // a push to another branch deploys nothing
      await git(work, 'checkout', '-qb', 'topic');
      writeFileSync(join(work, 'VERSION'), 'v9\n');
      await git(work, 'commit', '-qam', 'v9');
      const other = await git(work, 'push', '-q', 'origin', 'topic');
      assert.match(other.stderr, /is not main; not deployed/);
      assert.is(await get(w.ns, 'http://127.0.0.1:80/'), 'v3');
    });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test.run();
