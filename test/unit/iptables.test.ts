// Rule text and the parser of iptables-save, as pure functions.

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { appChain, appRules, cleanupText, ensureText, parseSave, removeAppText, switchText } from '../../src/iptables.js';
import { PortflipError } from '../../src/errors.js';
import { rulesState } from '../../src/ops.js';

const live = (rules: string[], chains: string[] = []) =>
  parseSave(['*filter', ':INPUT ACCEPT [0:0]', '-A INPUT -p tcp --dport 22 -j ACCEPT', 'COMMIT', '*nat', ':PREROUTING ACCEPT [0:0]', ':OUTPUT ACCEPT [0:0]', ...chains.map((c) => `:${c} - [0:0]`), ...rules, 'COMMIT'].join('\n'));

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
    assert.throws(() => appChain(bad), (e: unknown) => e instanceof PortflipError && e.kind === 'usage', bad);
  }
});

test('the switch redeclares only the app chain and adds one rule', () => {
  assert.is(switchText('web', 8002), '*nat\n:PF-web - [0:0]\n-A PF-web -p tcp -j REDIRECT --to-ports 8002\nCOMMIT\n');
});

test('parseSave keeps only nat', () => {
  assert.ok(wired.chains.has('DOCKER'));
  assert.not.ok(wired.rules.some((r) => r.includes('INPUT')));
  assert.equal(appRules(wired, 'web'), { jumps: [80], target: 8001, hooked: true });
  assert.equal(appRules(wired, 'nope'), { jumps: [], target: null, hooked: true });
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
  const one = live(wired.rules.filter((r) => !r.includes('api')), ['PORTFLIP', 'PF-web']);
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
  const unhooked = live(wired.rules.filter((r) => !r.startsWith('-A OUTPUT')), [...wired.chains]);
  assert.is(rulesState(unhooked, 'web', 80, 8001), 'missing');
});

test.run();
