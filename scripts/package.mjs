// `npm run package`: the release artifacts in dist/package/, after `npm run build`. For each arch (x64, arm64):
// portflip-VERSION-linux-ARCH, one executable that carries its own Node.js (single executable application:
// the CLI and holder bundled by esbuild, the Node drain module and koffi's native module as assets), and
// portflip_VERSION_DEB-ARCH.deb; then SHA256SUMS. Node.js and koffi's prebuilt module for each arch come from the
// npm registry (node-linux-ARCH, @koromix/koffi-linux-ARCH), through npm, cached in node_modules/.cache.
// Usage: node scripts/package.mjs [--arch x64,arm64] [--no-deb] [--out DIR]
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { chmodSync, copyFileSync, existsSync, mkdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { gzipSync } from 'node:zlib';
import { build } from 'esbuild';
import { buildDefines, buildInfo } from './build-info.mjs';
import { commandsOf, manPage } from './manpage.mjs';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const dist = path.join(root, 'dist', 'src');
const pkg = JSON.parse(readFileSync(path.join(root, 'package.json'), 'utf8'));
// The Node.js inside the executables. The blob must be made by the same Node.js version it is injected into,
// so the build runs the downloaded binary of this machine's arch, not the node that runs this script.
const NODE_VERSION = process.env.PORTFLIP_NODE_VERSION || '20.20.2';
const KOFFI_VERSION = JSON.parse(readFileSync(path.join(root, 'node_modules', 'koffi', 'package.json'), 'utf8')).version;
const SEA_FUSE = 'NODE_SEA_FUSE_fce680ab2cc467b6e072b8b5df1996b2'; // Node's documented sentinel
const DEB_ARCH = { x64: 'amd64', arm64: 'arm64' };

function parseArgs(argv) {
  const o = { arches: ['x64', 'arm64'], deb: true, out: path.join(root, 'dist', 'package') };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--arch') o.arches = String(argv[++i] ?? '').split(',').filter(Boolean);
    else if (a === '--no-deb') o.deb = false;
    else if (a === '--out') o.out = path.resolve(String(argv[++i] ?? ''));
    else usage(`unknown argument ${a}`);
  }
  for (const a of o.arches) if (!DEB_ARCH[a]) usage(`--arch ${a}: use x64, arm64 or both (x64,arm64)`);
  if (!o.arches.length) usage('--arch: name at least one of x64, arm64');
  return o;
}

function usage(msg) {
  process.stderr.write(`package: ${msg}\nusage: node scripts/package.mjs [--arch x64,arm64] [--no-deb] [--out DIR]\n`);
  process.exit(2);
}

const run = (cmd, args, opts = {}) => execFileSync(cmd, args, { stdio: ['ignore', 'pipe', 'inherit'], encoding: 'utf8', ...opts });
const sha256 = (file) => createHash('sha256').update(readFileSync(file)).digest('hex');
const step = (what) => process.stderr.write(`package: ${what}\n`);

/** An npm package unpacked once into the cache (npm pack checks the registry's integrity hash). */
function fromRegistry(spec, cache) {
  const dir = path.join(cache, spec.replace(/[@/]/g, '_'));
  if (existsSync(path.join(dir, 'package', 'package.json'))) return path.join(dir, 'package');
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });
  step(`fetching ${spec} from the npm registry`);
  const [{ filename }] = JSON.parse(run('npm', ['pack', spec, '--json', '--silent', '--pack-destination', dir]));
  run('tar', ['-xzf', path.join(dir, filename), '-C', dir]);
  rmSync(path.join(dir, filename));
  return path.join(dir, 'package');
}

/** The glibc build of koffi's module: Debian and Ubuntu hosts (the musl one is for Alpine, which this does not target). */
const koffiModule = (dir, arch) => path.join(dir, `linux_${arch}`, 'koffi.node');

async function bundleFor(arch, info, koffiNode, work) {
  const files = {};
  for (const [name, file] of [['koffi.node', koffiNode], ['node-drain.cjs', path.join(dist, 'node-drain.cjs')]])
    files[name] = { sha256: sha256(file), size: statSync(file).size };
  const outfile = path.join(work, `sea-${arch}.cjs`);
  await build({
    entryPoints: [path.join(dist, 'sea-main.js')],
    outfile,
    bundle: true,
    format: 'cjs',
    platform: 'node',
    target: 'node20',
    supported: { 'dynamic-import': false }, // one script: every import is in it
    external: ['koffi'], // never required here: self.ts loads the embedded module instead
    alias: { 'string-width': path.join(dist, 'cli', 'text-width.js'), assert: path.join(dist, 'cli', 'assert-lite.js') }, // as bundle.mjs
    define: {
      'import.meta.url': '__pfModuleUrl',
      ...buildDefines(info),
      __PORTFLIP_EMBEDDED__: JSON.stringify({ files, koffiVersion: KOFFI_VERSION }),
    },
    banner: { js: "var __pfModuleUrl = require('node:url').pathToFileURL(__filename).href;" },
    minifyWhitespace: true,
    legalComments: 'none',
    logLevel: 'warning',
  });
  return { outfile, files };
}

async function executable(arch, hostArch, info, cache, work, out) {
  const node = path.join(fromRegistry(`node-linux-${arch}@${NODE_VERSION}`, cache), 'bin', 'node');
  const generator = path.join(fromRegistry(`node-linux-${hostArch}@${NODE_VERSION}`, cache), 'bin', 'node');
  const koffi = koffiModule(fromRegistry(`@koromix/koffi-linux-${arch}@${KOFFI_VERSION}`, cache), arch);
  const { outfile } = await bundleFor(arch, info, koffi, work);
  const blob = path.join(work, `sea-${arch}.blob`);
  const config = path.join(work, `sea-${arch}.json`);
  writeFileSync(config, JSON.stringify({
    main: outfile,
    output: blob,
    disableExperimentalSEAWarning: true,
    // V8's code cache saves compiling the CLI at every start, but it only loads on the arch that made it
    useCodeCache: arch === hostArch,
    assets: { 'koffi.node': koffi, 'node-drain.cjs': path.join(dist, 'node-drain.cjs') },
  }));
  step(`${arch}: blob (code cache: ${arch === hostArch ? 'yes' : 'no, made on ' + hostArch})`);
  run(generator, ['--experimental-sea-config', config], { env: { ...process.env, NODE_OPTIONS: '' } });
  const exe = path.join(out, `portflip-${info.version}-linux-${arch}`);
  copyFileSync(node, exe);
  chmodSync(exe, 0o755);
  step(`${arch}: injecting into node ${NODE_VERSION}`);
  run(process.execPath, [path.join(root, 'node_modules', 'postject', 'dist', 'cli.js'), exe, 'NODE_SEA_BLOB', blob,
    '--sentinel-fuse', SEA_FUSE], { stdio: ['ignore', 'ignore', 'pipe'] });
  if (arch === hostArch) {
    const v = run(exe, ['--version'], { env: { ...process.env, NODE_OPTIONS: '' } }).trim();
    if (!v.includes(info.commit)) throw new Error(`${exe} --version says ${JSON.stringify(v)}, expected the commit ${info.commit}`);
    step(`${arch}: ${path.basename(exe)} --version: ${v}`);
  }
  return exe;
}

/** The help texts for the man page, from the npm build of the same source (no need to run a foreign arch). */
function helpTexts() {
  const cli = (args) => run(process.execPath, [path.join(dist, 'main.cjs'), ...args], { env: { ...process.env, COLUMNS: '100' } });
  const top = cli(['--help']);
  return { top, commands: commandsOf(top).map((name) => ({ name, help: cli([name, '--help']) })) };
}

async function deb(arch, exe, info, work, out) {
  const version = info.version;
  const stage = path.join(work, `deb-${arch}`);
  rmSync(stage, { recursive: true, force: true });
  const put = (rel, data, mode = 0o644) => {
    const file = path.join(stage, rel);
    mkdirSync(path.dirname(file), { recursive: true, mode: 0o755 });
    writeFileSync(file, data, { mode });
    chmodSync(file, mode);
  };
  put('usr/bin/portflip', readFileSync(exe), 0o755);
  const systemd = await import(path.join(dist, 'os', 'systemd.js'));
  const exec = ['/usr/bin/portflip'];
  put(`usr/lib/systemd/system/${systemd.APP_TEMPLATE_UNIT}`, systemd.appTemplateUnit(exec));
  put(`usr/lib/systemd/system/${systemd.RESTORE_UNIT}`, systemd.restoreUnit(exec));
  put(`usr/lib/systemd/system/${systemd.WATCH_UNIT}`, systemd.watchUnit(exec));
  const completion = run(process.execPath, [path.join(dist, 'main.cjs'), 'completion']);
  put('usr/share/bash-completion/completions/portflip', completion);
  const date = run('git', ['-C', root, 'log', '-1', '--format=%cs'], { stdio: ['ignore', 'pipe', 'ignore'] }).trim();
  put('usr/share/man/man1/portflip.1.gz', gzipSync(manPage({ version, date, description: pkg.description, ...helpTexts() }), { level: 9 }));
  put('usr/share/doc/portflip/copyright', `portflip ${version} (commit ${info.commit})\nLicense: ${pkg.license}\n` +
    `It carries Node.js ${NODE_VERSION} (MIT and the licenses of its bundled parts: /usr/share/doc/nodejs in Debian lists them)\n` +
    `and koffi ${KOFFI_VERSION} (MIT).\n`);
  const kib = Math.ceil(run('du', ['-sk', '--apparent-size', stage]).split('\t')[0]);
  put('DEBIAN/control', [
    'Package: portflip',
    `Version: ${version}`,
    `Architecture: ${DEB_ARCH[arch]}`,
    `Maintainer: ${process.env.PORTFLIP_MAINTAINER || 'portflip maintainers <root@localhost>'}`,
    `Installed-Size: ${kib}`,
    // the executable carries its own Node.js: no nodejs; iptables and ip are run, conntrack only for flushing entries
    'Depends: iptables, iproute2',
    'Recommends: conntrack',
    'Section: net',
    'Priority: optional',
    `Description: ${pkg.description.replace(/^./, (c) => c.toLowerCase())}`,
    ' portflip points a public TCP port at one instance of an app through an iptables',
    ' nat REDIRECT and flips it to the next instance in one atomic commit, so a deploy',
    ' refuses, resets or stalls no client. One executable with its own Node.js.',
    '',
  ].join('\n'));
  const file = path.join(out, `portflip_${version}_${DEB_ARCH[arch]}.deb`);
  step(`${arch}: ${path.basename(file)}`);
  // gzip: dpkg on every Debian and Ubuntu still supported reads it, and it takes seconds where xz takes a minute
  run('dpkg-deb', ['--root-owner-group', '-Zgzip', '-z9', '--build', stage, file], { stdio: ['ignore', 'ignore', 'inherit'] });
  return file;
}

const o = parseArgs(process.argv.slice(2));
const hostArch = process.arch;
if (!DEB_ARCH[hostArch]) usage(`this machine is ${hostArch}: build on x64 or arm64`);
for (const f of ['sea-main.js', 'node-drain.cjs', 'main.cjs', 'os/systemd.js'])
  if (!existsSync(path.join(dist, f))) usage(`dist/src/${f} is missing: run npm run build first (npm run package does)`);
const info = buildInfo(root);
const cache = path.join(root, 'node_modules', '.cache', 'portflip-package');
const work = path.join(cache, 'work');
mkdirSync(work, { recursive: true });
mkdirSync(o.out, { recursive: true });
const started = Date.now();
const made = [];
for (const arch of o.arches) {
  const exe = await executable(arch, hostArch, info, cache, work, o.out);
  made.push(exe);
  if (o.deb) made.push(await deb(arch, exe, info, work, o.out));
}
// what this run made, and nothing older that may sit beside it: `sha256sum -c SHA256SUMS` in dist/package checks them
writeFileSync(path.join(o.out, 'SHA256SUMS'), made.map((f) => `${sha256(f)}  ${path.basename(f)}\n`).join(''));
step(`done in ${((Date.now() - started) / 1000).toFixed(0)} s: ${made.map((f) => path.relative(root, f)).join(', ')}, SHA256SUMS`);
