// Canary deploys: the split's rule text, its states, and deploy/promote/abort (and deaths) against the fake Sys.

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { abort, promote } from '../../src/commands/canary.js';
import { canaryOptions, parseShare } from '../../src/cli/options.js';
import { restore } from '../../src/commands/restore.js';
import { deploy } from '../../src/commands/deploy.js';
import { PortflipError } from '../../src/core/errors.js';
import type { Event } from '../../src/core/events.js';
import {
  appRules,
  appText,
  canaryRules,
  checkApp,
  markBlocks,
  natRules,
  parseSave,
  probabilityText,
  type AppSpec,
} from '../../src/os/iptables.js';
import { canMove, invariantProblem } from '../../src/core/lifecycle.js';
import { Healer } from '../../src/ops/healer.js';
import { readState } from '../../src/core/state.js';
import { FAKE_PATHS, FakeSys, fakeCtx, fakeDeploy } from '../helpers/fakesys.js';

// ---- rule text ------------------------------------------------------------------------------

const split = (o: Partial<NonNullable<AppSpec['canary']>> = {}): AppSpec => ({
  app: 'web',
  listen: 80,
  target: 8001,
  open: [8001, 8002],
  firewall: null,
  canary: { port: 8002, percent: 10, by: 'conn', rnd: 0x1234abcd, ...o },
});

const wired = (chainRules: string[]) =>
  parseSave(
    [
      '*nat',
      ':PREROUTING ACCEPT [0:0]',
      ':OUTPUT ACCEPT [0:0]',
      ':PORTFLIP - [0:0]',
      ':PF-web - [0:0]',
      ':PF-api - [0:0]',
      ':DOCKER - [0:0]',
      '-A PREROUTING -m addrtype --dst-type LOCAL -j PORTFLIP',
      '-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER',
      '-A OUTPUT -m addrtype --dst-type LOCAL -j PORTFLIP',
      '-A PORTFLIP -p tcp -m tcp --dport 80 -j PF-web',
      '-A PORTFLIP -p tcp -m tcp --dport 81 -j PF-api',
      ...chainRules,
      '-A PF-api -p tcp -j REDIRECT --to-ports 9001',
      'COMMIT',
    ].join('\n'),
  );

test('the probability is printed as iptables-save prints the kernel fraction', () => {
  assert.is(probabilityText(10), '0.10000000009');
  assert.is(probabilityText(50), '0.50000000000');
  assert.is(probabilityText(1), '0.00999999978'); // what iptables-save prints for 0.01
});

test('mark blocks cover exactly marks 1..n, never mark 0, in few rules', () => {
  const matches = (block: string, mark: number) => {
    const [v, m] = block.split('/').map((x) => Number(x));
    return (mark & (m ?? 0xffffffff)) >>> 0 === v;
  };
  for (let n = 1; n <= 99; n++) {
    const blocks = markBlocks(n);
    assert.ok(blocks.length <= 12, `${n}: ${blocks.length} rules`);
    for (let mark = 0; mark <= 101; mark++) {
      const hit = blocks.filter((b) => matches(b, mark)).length;
      assert.is(hit, mark >= 1 && mark <= n ? 1 : 0, `n=${n} mark=${mark}: ${blocks.join(' ')}`);
    }
  }
  assert.equal(markBlocks(10), ['0x1', '0x2/0xfffffffe', '0x4/0xfffffffc', '0x8/0xfffffffe', '0xa']);
});

test('a canary by connection is one statistic rule before the redirect', () => {
  assert.equal(natRules(split(), 'ipv4'), [
    '-A PF-web -p tcp -m statistic --mode random --probability 0.10000000009 -j REDIRECT --to-ports 8002',
    '-A PF-web -p tcp -j REDIRECT --to-ports 8001',
  ]);
});

test('a canary by address hashes the source alone into marks 1-100, per family', () => {
  const v4 = canaryRules('web', split({ by: 'ip', percent: 3 }).canary!, 'ipv4');
  assert.equal(v4, [
    '-A PF-web -p tcp -j HMARK --hmark-src-prefix 32 --hmark-dst-prefix 0 --hmark-sport-mask 0x0000 ' +
      '--hmark-dport-mask 0x0000 --hmark-proto-mask 0x00 --hmark-rnd 0x1234abcd --hmark-mod 100 --hmark-offset 1',
    '-A PF-web -p tcp -m mark --mark 0x1 -j REDIRECT --to-ports 8002',
    '-A PF-web -p tcp -m mark --mark 0x2/0xfffffffe -j REDIRECT --to-ports 8002',
  ]);
  const v6 = canaryRules('web', split({ by: 'ip', percent: 3 }).canary!, 'ipv6');
  assert.match(v6[0], /--hmark-src-prefix 128 --hmark-dst-prefix 0 /);
});

test('adding the split rewrites only the app chain, in one commit; foreign rules stay byte-identical', () => {
  const view = wired(['-A PF-web -p tcp -j REDIRECT --to-ports 8001']);
  assert.is(checkApp(view, split(), 'ipv4').nat, 'mismatch');
  assert.ok(checkApp(view, split(), 'ipv4').missing.includes('nat: canary 10% by conn to 8002'));
  const text = appText(view, split(), 'ipv4')!;
  assert.is(
    text,
    [
      '*nat',
      ':PF-web - [0:0]',
      '-A PF-web -p tcp -m statistic --mode random --probability 0.10000000009 -j REDIRECT --to-ports 8002',
      '-A PF-web -p tcp -j REDIRECT --to-ports 8001',
      'COMMIT',
      '',
    ].join('\n'),
  );
  assert.not.match(text, /DOCKER|PF-api|PREROUTING/);
  const after = wired(natRules(split(), 'ipv4'));
  assert.is(appText(after, split(), 'ipv4'), null, 'nothing to do once the split is live');
  assert.equal(appRules(after, 'web'), { jumps: [80], target: 8001, shadowed: 0, canary: 8002, hooked: true });
  // a changed share or seed is a mismatch the repair rewrites
  assert.is(checkApp(after, split({ percent: 50 }), 'ipv4').nat, 'mismatch');
  assert.is(checkApp(after, split({ by: 'ip' }), 'ipv4').nat, 'mismatch');
  // promote / abort: the split goes, the redirect stays one rule
  const plain = { ...split(), canary: null };
  assert.match(
    appText(after, plain, 'ipv4')!,
    /:PF-web - \[0:0\]\n-A PF-web -p tcp -j REDIRECT --to-ports 8001\nCOMMIT/,
  );
  assert.ok(checkApp(after, plain, 'ipv4').missing.includes('nat: PF-web should only redirect to 8001'));
});

test('share and flag parsing refuse what is not a whole percent from 1 to 99', () => {
  assert.is(parseShare('10%', '--canary'), 10);
  assert.is(parseShare('50', '--canary'), 50);
  for (const bad of ['0%', '100%', '10.5%', 'ten', '-5', ''])
    assert.throws(
      () => parseShare(bad, '--canary'),
      (e: unknown) => e instanceof PortflipError && e.kind === 'usage',
      bad,
    );
  assert.equal(canaryOptions({ canary: '10%', canaryBy: 'ip', canaryFor: '30s' }), {
    percent: 10,
    by: 'ip',
    forMs: 30_000,
  });
  const usage = (f: Record<string, unknown>, re: RegExp) =>
    assert.throws(
      () => canaryOptions(f),
      (e: unknown) => e instanceof PortflipError && e.kind === 'usage' && re.test(e.message),
    );
  usage({ canaryBy: 'ip' }, /--canary-by needs --canary/);
  usage({ canary: '10%', canaryBy: 'cookie' }, /use conn .* or ip/);
  usage({ canary: '10%', keepOld: '5m' }, /--keep-old does not go with --canary/);
  usage({ canary: '10%', verify: '5s' }, /use --canary-for/);
  assert.is(canaryOptions({}), undefined);
});

test('the canary state: its moves, and never without an active instance or beside a kept one', () => {
  assert.ok(canMove('candidate', 'canary') && canMove('canary', 'active') && canMove('canary', 'draining'));
  assert.not.ok(canMove('kept', 'canary') || canMove('canary', 'kept'));
  const i = (port: number, state: 'active' | 'canary' | 'kept' | 'draining' | 'candidate') => ({ port, pid: 1, state });
  assert.is(invariantProblem([i(1, 'active'), i(2, 'canary')]), null);
  assert.is(invariantProblem([i(1, 'active'), i(2, 'canary'), i(3, 'candidate')]), null);
  assert.match(invariantProblem([i(2, 'canary')])!, /canary without an active/);
  assert.match(invariantProblem([i(1, 'active'), i(2, 'canary'), i(3, 'kept')])!, /3 instances/);
  assert.match(invariantProblem([i(1, 'active'), i(2, 'canary'), i(3, 'canary')])!, /2 canaries/);
});

// ---- against the fake Sys ------------------------------------------------------------------

type StepEvent = Extract<Event, { kind: 'step' }>;
const steps = (events: Event[]) =>
  (events.filter((e) => e.kind === 'step') as StepEvent[]).map((e) => `${e.step}:${e.status}`);
const chain = (sys: FakeSys, family: 'ipv4' | 'ipv6' = 'ipv4') => sys.iptables[family].nat.get('PF-web')?.rules ?? [];
const states = async (sys: FakeSys) =>
  ((await readState(sys, FAKE_PATHS, 'web'))?.instances ?? []).map((i) => [i.port, i.state]);

async function withCanary(percent = 10, by: 'conn' | 'ip' = 'conn') {
  const sys = new FakeSys();
  await deploy(fakeDeploy(), fakeCtx(sys).ctx);
  const [v1] = sys.apps();
  const { ctx, events } = fakeCtx(sys);
  await deploy(fakeDeploy({ canary: { percent, by } }), ctx);
  const v2 = sys.apps().find((p) => p !== v1)!;
  return { sys, v1, v2, events };
}

test('deploy --canary starts and checks the new instance, then splits; both stay up', async () => {
  const { sys, v1, v2, events } = await withCanary();
  assert.equal(steps(events), [
    'preflight:ok',
    'start:ok',
    'ready:ok',
    'bind-check:ok',
    'open:ok',
    'canary:ok',
    'done:ok',
  ]);
  assert.equal(chain(sys), [
    `-A PF-web -p tcp -m statistic --mode random --probability 0.10000000009 -j REDIRECT --to-ports ${v2.port}`,
    `-A PF-web -p tcp -j REDIRECT --to-ports ${v1.port}`,
  ]);
  const filter = sys.iptables.ipv4.filter.get('PF-web')!.rules.join('\n');
  for (const p of [v1.port, v2.port]) assert.match(filter, new RegExp(`--ctreplsrcport ${p} -j ACCEPT`));
  assert.equal(v1.signals, [], 'the active instance keeps running');
  const st = (await readState(sys, FAKE_PATHS, 'web'))!;
  assert.equal(
    st.instances.map((i) => [i.pid, i.state]),
    [
      [v1.pid, 'active'],
      [v2.pid, 'canary'],
    ],
  );
  assert.equal([st.canary!.percent, st.canary!.by, st.canary!.families], [10, 'conn', ['ipv4']]);
});

test('a plain deploy while a canary is live is refused, naming promote and abort; nothing changes', async () => {
  const { sys } = await withCanary();
  const before = { rules: [...chain(sys)], apps: sys.apps().map((p) => p.pid), states: await states(sys) };
  const err = await deploy(fakeDeploy(), fakeCtx(sys).ctx).then(
    () => null,
    (e) => e,
  );
  assert.ok(err instanceof PortflipError && err.kind === 'canaryLive', String(err));
  assert.is(err.exitCode, 12);
  assert.match(err.message, /portflip promote web, or portflip abort web/);
  assert.not.match(err.message, /\n/);
  assert.equal({ rules: chain(sys), apps: sys.apps().map((p) => p.pid), states: await states(sys) }, before);
  const again = await deploy(fakeDeploy({ canary: { percent: 5, by: 'conn' } }), fakeCtx(sys).ctx).catch((e) => e);
  assert.is(again.kind, 'canaryLive', 'a second canary too');
});

test('a canary deploy needs an active instance to split with', async () => {
  const sys = new FakeSys();
  const err = await deploy(fakeDeploy({ canary: { percent: 10, by: 'conn' } }), fakeCtx(sys).ctx).catch((e) => e);
  assert.ok(err instanceof PortflipError && err.kind === 'nothingToDo', String(err));
  assert.equal(sys.apps(), [], 'nothing was started');
});

test('promote makes the canary the only instance in one commit and drains the old one', async () => {
  const { sys, v1, v2 } = await withCanary();
  const { ctx, events } = fakeCtx(sys);
  await promote(ctx, 'web');
  assert.equal(steps(events), ['promote:ok', 'drain:ok']);
  assert.equal(chain(sys), [`-A PF-web -p tcp -j REDIRECT --to-ports ${v2.port}`]);
  assert.equal(
    v1.signals.map((s) => s.signal),
    ['SIGTERM'],
  );
  assert.equal(
    sys.apps().map((p) => p.pid),
    [v2.pid],
  );
  const st = (await readState(sys, FAKE_PATHS, 'web'))!;
  assert.equal(
    st.instances.map((i) => [i.pid, i.state]),
    [[v2.pid, 'active']],
  );
  assert.is(st.canary, undefined);
  await deploy(fakeDeploy(), fakeCtx(sys).ctx); // a plain deploy works again
});

test('promote --canary 50% only changes the share', async () => {
  const { sys, v1, v2 } = await withCanary(10, 'ip');
  const rnd = (await readState(sys, FAKE_PATHS, 'web'))!.canary!.rnd;
  const { ctx, events } = fakeCtx(sys);
  await promote(ctx, 'web', { percent: 50 });
  assert.equal(steps(events), ['canary:ok']);
  const st = (await readState(sys, FAKE_PATHS, 'web'))!;
  assert.equal(
    [st.canary!.percent, st.canary!.by, st.canary!.rnd],
    [50, 'ip', rnd],
    'the same hash seed: clients stay',
  );
  assert.equal(
    chain(sys),
    natRules({ ...split({ port: v2.port!, percent: 50, by: 'ip', rnd }), target: v1.port }, 'ipv4'),
  );
  assert.equal(v1.signals, []);
  assert.is(sys.apps().length, 2);
});

test('abort sends every new connection back to the old instance, then drains and stops the canary', async () => {
  const { sys, v1, v2 } = await withCanary();
  const { ctx, events } = fakeCtx(sys);
  await abort(ctx, 'web');
  assert.equal(steps(events), ['abort:ok', 'drain:ok']);
  assert.equal(chain(sys), [`-A PF-web -p tcp -j REDIRECT --to-ports ${v1.port}`]);
  assert.equal(
    v2.signals.map((s) => s.signal),
    ['SIGTERM'],
  );
  assert.equal(await states(sys), [[v1.port, 'active']]);
  const again = await abort(fakeCtx(sys).ctx, 'web').catch((e) => e);
  assert.ok(again instanceof PortflipError && again.kind === 'nothingToDo' && /no live canary/.test(again.message));
});

test('promote and abort --dry-run print the steps and the exact commit, and change nothing', async () => {
  const { sys, v1, v2 } = await withCanary();
  const before = [...chain(sys)];
  const p = fakeCtx(sys);
  await promote(p.ctx, 'web', { dryRun: true });
  const plan = p.events.find((e) => e.kind === 'plan') as Extract<Event, { kind: 'plan' }>;
  assert.equal(
    plan.steps.map((s) => s.step),
    ['promote', 'drain'],
  );
  assert.match(plan.rules[0].text, new RegExp(`-A PF-web -p tcp -j REDIRECT --to-ports ${v2.port}\nCOMMIT`));
  const a = fakeCtx(sys);
  await abort(a.ctx, 'web', { dryRun: true });
  const aplan = a.events.find((e) => e.kind === 'plan') as Extract<Event, { kind: 'plan' }>;
  assert.equal(
    aplan.steps.map((s) => s.step),
    ['abort', 'drain'],
  );
  assert.match(aplan.rules[0].text, new RegExp(`-A PF-web -p tcp -j REDIRECT --to-ports ${v1.port}\nCOMMIT`));
  assert.equal(chain(sys), before);
  assert.equal(v1.signals.concat(v2.signals), []);
});

test('deploy --canary --dry-run lists the canary step instead of the switch, with the split it would commit', async () => {
  const sys = new FakeSys();
  await deploy(fakeDeploy(), fakeCtx(sys).ctx);
  const [v1] = sys.apps();
  const before = [...chain(sys)];
  const { ctx, events } = fakeCtx(sys);
  await deploy(fakeDeploy({ dryRun: true, canary: { percent: 25, by: 'conn', forMs: 60_000 } }), ctx);
  const plan = events.find((e) => e.kind === 'plan') as Extract<Event, { kind: 'plan' }>;
  const names = plan.steps.map((s) => s.step);
  assert.ok(names.includes('canary') && names.includes('canary-for'), names.join(' '));
  assert.not.ok(names.includes('switch') || names.includes('verify'), names.join(' '));
  assert.match(
    plan.rules[0].text,
    /-m statistic --mode random --probability 0\.25000000000 -j REDIRECT --to-ports \d+\n/,
  );
  assert.match(plan.rules[0].text, new RegExp(`-A PF-web -p tcp -j REDIRECT --to-ports ${v1.port}\nCOMMIT`));
  assert.equal(chain(sys), before);
  assert.is(sys.apps().length, 1);
});

test('--canary-for promotes on its own after passing checks', async () => {
  const sys = new FakeSys();
  await deploy(fakeDeploy(), fakeCtx(sys).ctx);
  const [v1] = sys.apps();
  const { ctx, events } = fakeCtx(sys);
  const t0 = sys.now();
  await deploy(fakeDeploy({ canary: { percent: 10, by: 'conn', forMs: 5000 } }), ctx);
  assert.ok(sys.now() - t0 >= 5000, 'it watched for the whole time');
  assert.equal(steps(events).slice(-5), ['canary:ok', 'promote:ok', 'drain:ok', 'canary-for:ok', 'done:ok']);
  const [v2] = sys.apps();
  assert.is.not(v2.pid, v1.pid);
  assert.equal(chain(sys), [`-A PF-web -p tcp -j REDIRECT --to-ports ${v2.port}`]);
});

test('--canary-for aborts on its own when the canary dies', async () => {
  const sys = new FakeSys();
  await deploy(fakeDeploy(), fakeCtx(sys).ctx);
  const [v1] = sys.apps();
  sys.behave = () => ({ listenAfterMs: 50, termExitMs: 100, exitAfterMs: 2000 });
  const { ctx, events } = fakeCtx(sys);
  const err = await deploy(fakeDeploy({ canary: { percent: 10, by: 'conn', forMs: 10_000 } }), ctx).catch((e) => e);
  assert.ok(err instanceof PortflipError && err.kind === 'deployFailed', String(err));
  assert.match(err.message, /exited during --canary-for; aborted: every new connection goes to port \d+/);
  assert.ok(steps(events).includes('abort:ok'), steps(events).join(' '));
  assert.equal(chain(sys), [`-A PF-web -p tcp -j REDIRECT --to-ports ${v1.port}`]);
  assert.equal(await states(sys), [[v1.port, 'active']]);
  assert.equal(
    sys.apps().map((p) => p.pid),
    [v1.pid],
  );
});

test('a dead canary loses its split at the next run; a dead active one leaves the canary serving alone', async () => {
  const a = await withCanary();
  a.sys.kill(a.v2.pid, 'SIGKILL');
  await a.sys.advance(10);
  await restore(fakeCtx(a.sys).ctx);
  assert.equal(chain(a.sys), [`-A PF-web -p tcp -j REDIRECT --to-ports ${a.v1.port}`]);
  assert.equal(await states(a.sys), [[a.v1.port, 'active']]);
  const b = await withCanary();
  b.sys.kill(b.v1.pid, 'SIGKILL');
  await b.sys.advance(10);
  await restore(fakeCtx(b.sys).ctx);
  assert.equal(chain(b.sys), [`-A PF-web -p tcp -j REDIRECT --to-ports ${b.v2.port}`]);
  assert.equal(await states(b.sys), [[b.v2.port, 'active']]);
});

test('restore recreates the split after a firewall reload flushed it', async () => {
  const { sys } = await withCanary(20, 'ip');
  const want = [...chain(sys)];
  sys.flushRules();
  await restore(fakeCtx(sys).ctx);
  assert.equal(chain(sys), want);
});

test('the self-healer sees a lost or changed split and puts it back', async () => {
  const { sys } = await withCanary(10, 'ip');
  const want = [...chain(sys)];
  const healer = new Healer(fakeCtx(sys).ctx);
  assert.is(await healer.heal('web'), 'ok');
  // someone rewrites the app chain to the active port only, as an old saved ruleset would
  sys.iptables.ipv4.nat.get('PF-web')!.rules = [want.at(-1)!];
  const st = (await readState(sys, FAKE_PATHS, 'web'))!;
  assert.match((await healer.check(st)).join('; '), /nat: canary 10% by ip to \d+/);
  assert.is(await healer.heal('web'), 'repaired');
  assert.equal(chain(sys), want);
});

// ---- kill points ---------------------------------------------------------------------------

/** After any death and the repair: every live process is recorded, and the rules reach live instances only. */
async function invariant(sys: FakeSys, where: string): Promise<void> {
  const st = await readState(sys, FAKE_PATHS, 'web');
  const live = sys
    .apps()
    .map((p) => p.pid)
    .sort();
  assert.equal(live, (st?.instances ?? []).map((i) => i.pid).sort(), `${where}: orphans`);
  const active = st!.instances.find((i) => i.state === 'active')!;
  const canary = st!.instances.find((i) => i.state === 'canary');
  assert.ok(
    st!.instances.every((i) => i.state === 'active' || i.state === 'canary'),
    `${where}: ${JSON.stringify(st)}`,
  );
  const rules = chain(sys);
  assert.is(rules.at(-1), `-A PF-web -p tcp -j REDIRECT --to-ports ${active.port}`, `${where}: ${rules.join('; ')}`);
  assert.is(sys.listener(active.port)?.pid, active.pid, `${where}: the redirect reaches the active instance`);
  if (canary) {
    assert.ok(st!.canary, `${where}: a canary without its split settings`);
    const split = rules.slice(0, -1).filter((r) => r.includes('--to-ports'));
    assert.ok(split.length, `${where}: no split: ${rules.join('; ')}`);
    for (const r of split)
      assert.match(r, new RegExp(`--to-ports ${canary.port}$`), `${where}: the split goes to the canary`);
    assert.is(sys.listener(canary.port)?.pid, canary.pid ?? undefined);
  } else assert.is(rules.length, 1, `${where}: a split without a canary: ${rules.join('; ')}`);
}

type Act = (sys: FakeSys) => Promise<unknown>;

/** Kills `act` before its effect 1, 2, ... ; after each, restore must leave the invariant, and promote/abort/deploy work. */
async function everyKill(setup: (sys: FakeSys) => Promise<void>, act: Act, label: string): Promise<number> {
  let n = 1;
  for (; n < 400; n++) {
    const sys = new FakeSys();
    await setup(sys);
    sys.killAt = sys.effects + n;
    await act(sys).catch(() => null);
    const died = sys.dead;
    sys.revive();
    await sys.advance(1000);
    await restore(fakeCtx(sys).ctx);
    await invariant(sys, `${label} killed before effect ${n}, after restore`);
    const st = (await readState(sys, FAKE_PATHS, 'web'))!;
    if (st.canary) await abort(fakeCtx(sys).ctx, 'web');
    await deploy(fakeDeploy(), fakeCtx(sys).ctx);
    await invariant(sys, `${label} killed before effect ${n}, after the next deploy`);
    if (!died) break;
  }
  assert.ok(n > 5 && n < 400, `${label}: ${n} kill points`);
  return n;
}

const oneActive = async (sys: FakeSys) => void (await deploy(fakeDeploy(), fakeCtx(sys).ctx));
const canaryLive = async (sys: FakeSys) => {
  await oneActive(sys);
  await deploy(fakeDeploy({ canary: { percent: 10, by: 'ip' } }), fakeCtx(sys).ctx);
};

test('a canary deploy killed before any of its effects is repaired by restore', async () => {
  await everyKill(
    oneActive,
    (sys) => deploy(fakeDeploy({ canary: { percent: 10, by: 'conn' } }), fakeCtx(sys).ctx),
    'deploy --canary',
  );
});

test('a canary deploy with --canary-for killed anywhere (auto promote included) is repaired', async () => {
  await everyKill(
    oneActive,
    (sys) => deploy(fakeDeploy({ canary: { percent: 10, by: 'conn', forMs: 3000 } }), fakeCtx(sys).ctx),
    'deploy --canary-for',
  );
});

test('promote killed before any of its effects is repaired by restore', async () => {
  await everyKill(canaryLive, (sys) => promote(fakeCtx(sys).ctx, 'web'), 'promote');
});

test('promote --canary 50% killed before any of its effects is repaired by restore', async () => {
  await everyKill(canaryLive, (sys) => promote(fakeCtx(sys).ctx, 'web', { percent: 50 }), 'promote --canary');
});

test('abort killed before any of its effects is repaired by restore', async () => {
  await everyKill(canaryLive, (sys) => abort(fakeCtx(sys).ctx, 'web'), 'abort');
});

test.run();
