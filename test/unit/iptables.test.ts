// Rule text and the parser of iptables-save, as pure functions.

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { appChain, appRules, appText, canonicalCidr, checkApp, cleanupText, filterRules, markRules, markText, parseSave, removeAppText, wouldDrop, type AppSpec } from '../../src/os/iptables.js';
import { PortflipError } from '../../src/core/errors.js';

const spec = (app: string, listen: number, target: number | null, o: Partial<AppSpec> = {}): AppSpec => ({
  app,
  listen,
  target,
  open: target === null ? [] : [target],
  firewall: null,
  ...o,
});
const ensureText = (view: ReturnType<typeof parseSave>, app: string, listen: number, port: number) =>
  appText(view, spec(app, listen, port), 'ipv4')!;
const rulesState = (view: ReturnType<typeof parseSave>, app: string, listen: number, port: number | null) =>
  checkApp(view, spec(app, listen, port), 'ipv4').nat;

const live = (rules: string[], chains: string[] = []) =>
  parseSave(
    [
      '*filter',
      ':INPUT ACCEPT [0:0]',
      '-A INPUT -p tcp --dport 22 -j ACCEPT',
      'COMMIT',
      '*nat',
      ':PREROUTING ACCEPT [0:0]',
      ':OUTPUT ACCEPT [0:0]',
      ...chains.map((c) => `:${c} - [0:0]`),
      ...rules,
      'COMMIT',
    ].join('\n'),
  );

const wired = live(
  [
    '-A PREROUTING -m addrtype --dst-type LOCAL -j PORTFLIP',
    '-A OUTPUT -m addrtype --dst-type LOCAL -j PORTFLIP',
    '-A PORTFLIP -p tcp -m tcp --dport 80 -j PF-web',
    '-A PORTFLIP -p tcp -m tcp --dport 81 -j PF-api',
    '-A PF-web -p tcp -j REDIRECT --to-ports 8001',
    '-A PF-api -p tcp -j REDIRECT --to-ports 9001',
  ],
  ['PORTFLIP', 'PF-web', 'PF-api', 'DOCKER'],
);

test('app names map onto chain names or are refused', () => {
  assert.is(appChain('web'), 'PF-web');
  assert.is(appChain('a'.repeat(25)), 'PF-' + 'a'.repeat(25));
  for (const bad of ['', 'a'.repeat(26), 'Web', '-x', 'a b', 'a/b', 'ü']) {
    assert.throws(
      () => appChain(bad),
      (e: unknown) => e instanceof PortflipError && e.kind === 'usage',
      bad,
    );
  }
});

test('the switch only adds: the new redirect goes on top, and the next commit tidies the old one away', () => {
  assert.is(ensureText(wired, 'web', 80, 8002), '*nat\n-I PF-web 1 -p tcp -j REDIRECT --to-ports 8002\nCOMMIT\n');
  assert.is(appText(wired, spec('web', 80, 8001), 'ipv4'), null, 'nothing to do when the rules already say it');
  const switched = live(
    [
      ...wired.nat.rules.filter((r) => !r.startsWith('-A PF-web ')),
      '-A PF-web -p tcp -j REDIRECT --to-ports 8002',
      '-A PF-web -p tcp -j REDIRECT --to-ports 8001',
    ],
    [...wired.nat.chains],
  );
  assert.is(appRules(switched, 'web').target, 8002, 'the first rule is the one the kernel applies');
  const check = checkApp(switched, spec('web', 80, 8002), 'ipv4');
  assert.is(check.nat, 'ok');
  assert.ok(check.tidy);
  assert.equal(check.missing, [], 'a shadowed rule is nothing for the healer to repair');
  assert.is(
    ensureText(switched, 'web', 80, 8002),
    '*nat\n:PF-web - [0:0]\n-A PF-web -p tcp -j REDIRECT --to-ports 8002\nCOMMIT\n',
  );
  assert.is(
    ensureText(switched, 'web', 80, 8001),
    '*nat\n:PF-web - [0:0]\n-A PF-web -p tcp -j REDIRECT --to-ports 8001\nCOMMIT\n',
    'a second switch before the tidy rewrites the chain: it never grows past two rules',
  );
  const foreignTop = live(
    [
      ...wired.nat.rules.filter((r) => !r.startsWith('-A PF-web ')),
      '-A PF-web -j ACCEPT',
      '-A PF-web -p tcp -j REDIRECT --to-ports 8001',
    ],
    [...wired.nat.chains],
  );
  assert.is(checkApp(foreignTop, spec('web', 80, 8001), 'ipv4').nat, 'mismatch', 'a plain redirect must come first');
});

test('parseSave keeps nat and filter apart', () => {
  assert.ok(wired.nat.chains.has('DOCKER'));
  assert.not.ok(wired.nat.rules.some((r) => r.includes('INPUT')));
  assert.ok(wired.filter.rules.includes('-A INPUT -p tcp --dport 22 -j ACCEPT'));
  assert.is(wired.filter.policies.get('INPUT'), 'ACCEPT');
  assert.equal(appRules(wired, 'web'), { jumps: [80], target: 8001, shadowed: 0, hooked: true });
  assert.equal(appRules(wired, 'nope'), { jumps: [], target: null, shadowed: 0, hooked: true });
});

test('ensure on an empty table creates the whole layout', () => {
  const text = ensureText(live([]), 'web', 80, 8001);
  assert.is(
    text,
    [
      '*nat',
      ':PORTFLIP - [0:0]',
      ':PF-web - [0:0]',
      '-A PREROUTING -m addrtype --dst-type LOCAL -j PORTFLIP',
      '-A OUTPUT -m addrtype --dst-type LOCAL -j PORTFLIP',
      '-A PORTFLIP -p tcp -m tcp --dport 80 -j PF-web',
      '-A PF-web -p tcp -j REDIRECT --to-ports 8001',
      'COMMIT',
      '',
    ].join('\n'),
  );
});

test('ensure beside other apps never redeclares the shared root chain', () => {
  const text = ensureText(wired, 'new', 90, 9100);
  assert.not.ok(text.includes(':PORTFLIP'));
  assert.not.ok(text.includes('PREROUTING'));
  assert.ok(text.includes('-A PORTFLIP -p tcp -m tcp --dport 90 -j PF-new'));
});

test('ensure moves a changed listen port', () => {
  const text = ensureText(wired, 'web', 8080, 8002);
  assert.ok(text.includes('-D PORTFLIP -p tcp -m tcp --dport 80 -j PF-web'));
  assert.ok(text.includes('-A PORTFLIP -p tcp -m tcp --dport 8080 -j PF-web'));
});

test('removing one app leaves the others and the hooks', () => {
  const text = removeAppText(wired, 'web')!;
  assert.ok(text.includes('-D PORTFLIP -p tcp -m tcp --dport 80 -j PF-web'));
  assert.ok(text.includes('-X PF-web'));
  assert.not.ok(text.includes('PF-api'));
  assert.not.ok(text.includes('PREROUTING'));
});

test('removing the last app removes the root chain and hooks', () => {
  const one = live(
    wired.nat.rules.filter((r) => !r.includes('api')),
    ['PORTFLIP', 'PF-web'],
  );
  const text = removeAppText(one, 'web')!;
  assert.ok(text.includes('-D PREROUTING -m addrtype --dst-type LOCAL -j PORTFLIP'));
  assert.ok(text.includes('-X PORTFLIP'));
  assert.is(removeAppText(live([]), 'web'), null);
});

test('cleanup removes everything of ours and nothing else', () => {
  const text = cleanupText(wired)!;
  for (const c of ['PF-web', 'PF-api', 'PORTFLIP']) assert.ok(text.includes(`-X ${c}`), c);
  assert.not.ok(text.includes('DOCKER'));
  // declarations come before the commands in restore syntax
  const lines = text.split('\n');
  const lastDecl = Math.max(...lines.map((l, i) => (l.startsWith(':') ? i : -1)));
  const firstCmd = lines.findIndex((l) => l.startsWith('-'));
  assert.ok(lastDecl < firstCmd);
  assert.is(cleanupText(live([])), null);
});

test('rulesState says ok, missing or mismatch', () => {
  assert.is(rulesState(wired, 'web', 80, 8001), 'ok');
  assert.is(rulesState(wired, 'web', 80, 8002), 'mismatch');
  assert.is(rulesState(wired, 'web', 81, 8001), 'mismatch');
  assert.is(rulesState(live([]), 'web', 80, 8001), 'missing');
  assert.is(rulesState(live([]), 'web', 80, null), 'ok');
  const unhooked = live(
    wired.nat.rules.filter((r) => !r.startsWith('-A OUTPUT')),
    [...wired.nat.chains],
  );
  assert.is(rulesState(unhooked, 'web', 80, 8001), 'missing');
});

const fw = { exposePorts: false, allowFrom: [] as string[] };

test('the filter chain accepts exactly what was redirected to the open ports, and keeps them private', () => {
  assert.equal(filterRules(spec('web', 80, 8002, { open: [8002, 8001], firewall: fw }), 'ipv4'), [
    '-A PF-web -p tcp -m conntrack --ctstate DNAT --ctorigdstport 80 --ctreplsrcport 8001 -j ACCEPT',
    '-A PF-web -p tcp -m conntrack --ctstate DNAT --ctorigdstport 80 --ctreplsrcport 8002 -j ACCEPT',
    '-A PF-web ! -i lo -p tcp -m tcp --dport 8001 -j REJECT --reject-with tcp-reset',
    '-A PF-web ! -i lo -p tcp -m tcp --dport 8002 -j REJECT --reject-with tcp-reset',
  ]);
  assert.equal(filterRules(spec('web', 80, 8002, { firewall: { exposePorts: true, allowFrom: [] } }), 'ipv4'), [
    '-A PF-web -p tcp -m conntrack --ctstate DNAT --ctorigdstport 80 --ctreplsrcport 8002 -j ACCEPT',
  ]);
  assert.equal(filterRules(spec('web', 80, 8002), 'ipv4'), [], 'nothing with --firewall off');
});

test('--allow-from keeps this host and the given networks of each family, and drops the rest', () => {
  const s = spec('web', 80, 8002, { firewall: { exposePorts: true, allowFrom: ['192.0.2.0/24', '2001:db8::/32'] } });
  assert.equal(filterRules(s, 'ipv4'), [
    '-A PF-web -i lo -p tcp -m conntrack --ctstate DNAT --ctorigdstport 80 --ctreplsrcport 8002 -j ACCEPT',
    '-A PF-web -s 192.0.2.0/24 -p tcp -m conntrack --ctstate DNAT --ctorigdstport 80 --ctreplsrcport 8002 -j ACCEPT',
    '-A PF-web -p tcp -m conntrack --ctstate DNAT --ctorigdstport 80 -j DROP',
  ]);
  assert.ok(
    filterRules(s, 'ipv6').includes(
      '-A PF-web -s 2001:db8::/32 -p tcp -m conntrack --ctstate DNAT --ctorigdstport 80 --ctreplsrcport 8002 -j ACCEPT',
    ),
  );
});

test('CIDRs are written the way iptables-save prints them', () => {
  assert.is(canonicalCidr('10.1.2.3/8'), '10.0.0.0/8');
  assert.is(canonicalCidr('192.0.2.7'), '192.0.2.7/32');
  assert.is(canonicalCidr('2001:DB8:0:0:1::/32'), '2001:db8::/32');
  assert.is(canonicalCidr('fd00::1'), 'fd00::1/128');
  assert.is(canonicalCidr('::/0'), '::/0');
  for (const bad of ['10.0.0.256', '10.0.0.0/33', 'fd00::/129', 'example.com', '1:2:3'])
    assert.is(canonicalCidr(bad), null, bad);
});

test('a switch with the firewall opens the new port in filter before nat points at it, in one text', () => {
  const both = parseSave(
    [
      '*nat',
      ...wired.nat.rules,
      'COMMIT',
      '*filter',
      ':INPUT DROP [0:0]',
      ':PORTFLIP - [0:0]',
      ':PF-web - [0:0]',
      '-A INPUT -j PORTFLIP',
      '-A PORTFLIP -p tcp -j PF-web',
      '-A PF-web -p tcp -m conntrack --ctstate DNAT --ctorigdstport 80 --ctreplsrcport 8001 -j ACCEPT',
      'COMMIT',
    ].join('\n'),
  );
  both.nat.chains = new Set(wired.nat.chains);
  const text = appText(
    both,
    spec('web', 80, 8002, { open: [8001, 8002], firewall: { exposePorts: true, allowFrom: [] } }),
    'ipv4',
  )!;
  assert.is(
    text,
    [
      '*filter',
      '-A PF-web -p tcp -m conntrack --ctstate DNAT --ctorigdstport 80 --ctreplsrcport 8002 -j ACCEPT',
      'COMMIT',
      '*nat',
      '-I PF-web 1 -p tcp -j REDIRECT --to-ports 8002',
      'COMMIT',
      '',
    ].join('\n'),
  );
  const first = appText(live([]), spec('web', 80, 8002, { firewall: fw }), 'ipv4')!;
  assert.ok(first.indexOf('*filter') < first.indexOf('*nat'));
  assert.ok(first.includes('-I INPUT 1 -j PORTFLIP'), 'the filter hook goes first in INPUT');
  const gone = removeAppText(both, 'web')!;
  assert.ok(gone.indexOf('*nat') < gone.indexOf('*filter'), 'removal takes the redirect away before the accept');
  assert.ok(gone.includes('-D INPUT -j PORTFLIP') && gone.includes('-X PF-web'));
});

const filterView = (rules: string[]) =>
  parseSave(
    [
      '*filter',
      ':INPUT ACCEPT [0:0]',
      ':PORTFLIP - [0:0]',
      ':PF-web - [0:0]',
      '-A INPUT -j PORTFLIP',
      '-A PORTFLIP -p tcp -j PF-web',
      ...rules,
      'COMMIT',
    ].join('\n'),
  );

test('opening a port only adds: each missing rule goes in at its place in the wanted order, nothing is deleted', () => {
  const open = (view: ReturnType<typeof parseSave>, o: Partial<AppSpec>) =>
    appText(view, spec('web', 80, 8002, { open: [8001, 8002], firewall: fw, ...o }), 'ipv4', 'filter');
  const one = filterRules(spec('web', 80, 8001, { firewall: fw }), 'ipv4');
  assert.is(
    open(filterView(one), {}),
    [
      '*filter',
      '-I PF-web 2 -p tcp -m conntrack --ctstate DNAT --ctorigdstport 80 --ctreplsrcport 8002 -j ACCEPT',
      '-A PF-web ! -i lo -p tcp -m tcp --dport 8002 -j REJECT --reject-with tcp-reset',
      'COMMIT',
      '',
    ].join('\n'),
  );
  // a lower port goes in front of the live rules; with allowed networks, at every level of the layout
  const allow = { firewall: { exposePorts: false, allowFrom: ['192.0.2.0/24'] } };
  const high = filterRules(spec('web', 80, 8002, allow), 'ipv4');
  const lines = open(filterView(high), allow)!.split('\n').slice(1, -2);
  assert.equal(lines, [
    '-I PF-web 1 -i lo -p tcp -m conntrack --ctstate DNAT --ctorigdstport 80 --ctreplsrcport 8001 -j ACCEPT',
    '-I PF-web 3 -s 192.0.2.0/24 -p tcp -m conntrack --ctstate DNAT --ctorigdstport 80 --ctreplsrcport 8001 -j ACCEPT',
    '-I PF-web 6 ! -i lo -p tcp -m tcp --dport 8001 -j REJECT --reject-with tcp-reset',
  ]);
  // replayed in order, the inserts give exactly the wanted chain
  const chain = [...high];
  for (const l of lines) chain.splice(Number(l.split(' ')[2]) - 1, 0, l.replace(/^-I PF-web \d+ /, '-A PF-web '));
  assert.equal(chain, filterRules(spec('web', 80, 8002, { ...allow, open: [8001, 8002] }), 'ipv4'));
  // a rule that is not wanted, or rules out of order: the chain is written whole
  const stray = open(filterView([...one, '-A PF-web -p udp -j ACCEPT']), {})!;
  assert.ok(stray.includes(':PF-web - [0:0]'), stray);
  const swapped = open(filterView([...one].reverse()), {})!;
  assert.ok(swapped.includes(':PF-web - [0:0]'), swapped);
});

test('a foreign rule that jumps to an app chain keeps it from being deleted, and is left alone', () => {
  const v = live([...wired.nat.rules, '-A OUTPUT -p udp -j PF-web'], [...wired.nat.chains]);
  const text = removeAppText(v, 'web')!;
  assert.ok(text.includes(':PF-web - [0:0]'), 'emptied');
  assert.not.ok(text.includes('-X PF-web'), 'not deleted');
  assert.not.ok(text.includes('udp'), 'the foreign rule is not touched');
  assert.not.ok(cleanupText(v)!.includes('-X PF-web'));
});

test('marking: both directions of a draining port to its queue, tagged with the app; other apps and rules untouched', () => {
  const foreign = [
    '-A INPUT -p tcp -m tcp --dport 22 -j MARK --set-xmark 0x1/0xffffffff',
    '-A PREROUTING -j CONNMARK --restore-mark',
  ];
  const mangle = (rules: string[], chains: string[] = []) =>
    parseSave(
      [
        '*mangle',
        ':PREROUTING ACCEPT [0:0]',
        ':INPUT ACCEPT [0:0]',
        ':OUTPUT ACCEPT [0:0]',
        ...chains.map((c) => `:${c} - [0:0]`),
        ...foreign,
        ...rules,
        'COMMIT',
      ].join('\n'),
    );
  const web = spec('web', 80, 8002, { mark: [{ port: 8001, queue: 40007 }] });
  const text = appText(mangle([]), web, 'ipv4', 'mangle')!;
  assert.is(
    text,
    [
      '*mangle',
      ':PF-MARK-IN - [0:0]',
      ':PF-MARK-OUT - [0:0]',
      '-I INPUT 1 -j PF-MARK-IN',
      '-I OUTPUT 1 -j PF-MARK-OUT',
      '-A PF-MARK-IN -p tcp -m tcp --dport 8001 -m comment --comment PF-web -j NFQUEUE --queue-num 40007 --queue-bypass',
      '-A PF-MARK-OUT -p tcp -m tcp --sport 8001 -m comment --comment PF-web -j NFQUEUE --queue-num 40007 --queue-bypass',
      'COMMIT',
      '',
    ].join('\n'),
  );
  // as iptables-save prints it back: nothing left to do, and the check agrees
  const hooks = ['-A INPUT -j PF-MARK-IN', '-A OUTPUT -j PF-MARK-OUT'];
  const both = mangle(
    [...hooks, ...markRules('web', { port: 8001, queue: 40007 }), ...markRules('api', { port: 9001, queue: 40007 })],
    ['PF-MARK-IN', 'PF-MARK-OUT'],
  );
  assert.is(appText(both, web, 'ipv4', 'mangle'), null);
  // web's drain ends: only its two rules go, api's stay, and so do the chains and hooks
  const done = spec('web', 80, 8002);
  assert.is(
    appText(both, done, 'ipv4', 'mangle'),
    ['*mangle', ...markRules('web', { port: 8001, queue: 40007 }).map((r) => r.replace('-A', '-D')), 'COMMIT', ''].join(
      '\n',
    ),
  );
  // the last app's: rules, hooks and chains all go; the foreign rules are never named
  const last = mangle([...hooks, ...markRules('web', { port: 8001, queue: 40007 })], ['PF-MARK-IN', 'PF-MARK-OUT']);
  const gone = markText(last, done)!;
  assert.match(gone, /-D INPUT -j PF-MARK-IN\n-D OUTPUT -j PF-MARK-OUT\n-X PF-MARK-IN\n-X PF-MARK-OUT\nCOMMIT/);
  for (const f of foreign) assert.not.ok(gone.includes(f.slice(3)), f);
  // no other commit touches the marking (its chains are shared: ops/retire.ts syncMarks changes them one at a time)
  for (const only of ['nat', 'filter', undefined] as const) assert.not.ok((appText(last, done, 'ipv4', only) ?? '').includes('PF-MARK'));
  const clean = cleanupText(last)!;
  assert.match(clean, /-D INPUT -j PF-MARK-IN/);
  assert.match(clean, /-X PF-MARK-OUT/);
  for (const f of foreign) assert.not.ok(clean.includes(f.slice(3)), f);
});

test('checkApp names what is missing', () => {
  const c = checkApp(live([]), spec('web', 80, 8001, { firewall: fw }), 'ipv4');
  assert.is(c.nat, 'missing');
  assert.is(c.filter, 'missing');
  assert.ok(c.missing.includes('filter: INPUT hook'));
});

test('wouldDrop: a default-deny INPUT with nothing that accepts redirected traffic', () => {
  const t = (lines: string[], policy = 'DROP') =>
    parseSave(['*filter', `:INPUT ${policy} [0:0]`, ...lines, 'COMMIT'].join('\n')).filter;
  assert.ok(wouldDrop(t(['-A INPUT -p tcp -m tcp --dport 80 -j ACCEPT']), 8002));
  assert.not.ok(wouldDrop(t(['-A INPUT -p tcp -m tcp --dport 8002 -j ACCEPT']), 8002));
  assert.not.ok(wouldDrop(t(['-A INPUT -m conntrack --ctstate DNAT -j ACCEPT']), 8002));
  assert.not.ok(wouldDrop(t([], 'ACCEPT'), 8002));
  assert.ok(wouldDrop(t(['-A INPUT -j REJECT --reject-with icmp-port-unreachable'], 'ACCEPT'), 8002));
});

test.run();
