// Instance states: the allowed moves, the refused ones, and the invariant every state write checks.

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { canMove, invariantProblem, move, type InstanceState } from '../../src/core/lifecycle.js';
import { PortflipError } from '../../src/core/errors.js';
import { writeState, type AppState } from '../../src/core/state.js';
import { realSys } from '../../src/os/sys.js';

const inst = (port: number, state: InstanceState) => ({ port, pid: 100 + port, state });

test('a deploy, a rollback and an undo move instances only along allowed edges', () => {
  const cand = inst(8002, 'candidate');
  const old = inst(8001, 'active');
  move(cand, 'active');
  move(old, 'kept');
  move(old, 'active'); // rollback
  move(cand, 'draining');
  assert.is(cand.state, 'draining');
  assert.ok(canMove('active', 'candidate'), 'a switch can be undone');
  assert.ok(canMove('draining', 'active'), 'the live redirect can point at a draining instance');
});

test('any other move is refused as a bug', () => {
  for (const [from, to] of [
    ['candidate', 'kept'],
    ['candidate', 'draining'],
    ['draining', 'kept'],
    ['kept', 'candidate'],
    ['draining', 'candidate'],
  ] as const) {
    assert.not.ok(canMove(from, to), `${from} -> ${to}`);
    assert.throws(
      () => move(inst(1, from), to),
      (e: unknown) => e instanceof PortflipError && e.kind === 'internal' && /cannot go from/.test(e.message),
    );
  }
});

test('the invariant: one active, one candidate, at most two besides the candidate, one instance per port', () => {
  assert.is(invariantProblem([inst(1, 'active'), inst(2, 'kept'), inst(3, 'candidate')]), null);
  assert.match(invariantProblem([inst(1, 'active'), inst(2, 'active')])!, /2 active/);
  assert.match(invariantProblem([inst(1, 'candidate'), inst(2, 'candidate')])!, /2 candidates/);
  assert.match(
    invariantProblem([inst(1, 'active'), inst(2, 'kept'), inst(3, 'draining')])!,
    /3 instances besides the candidate/,
  );
  assert.match(invariantProblem([inst(1, 'active'), inst(1, 'candidate')])!, /one port/);
});

test('a state that breaks the invariant is refused, not written', async () => {
  const st = {
    schema: 1,
    app: 'web',
    listen: 80,
    backend: 'nft',
    families: ['ipv4'],
    instances: [inst(1, 'active'), inst(2, 'active')],
  } as unknown as AppState;
  const paths = { stateDir: '/nonexistent-portflip-test', runDir: '/nonexistent', logDir: '/nonexistent' };
  await writeState(realSys, paths, st).then(
    () => assert.unreachable('written'),
    (e) =>
      assert.ok(
        e instanceof PortflipError && /refused to write the state of "web": 2 active/.test(e.message),
        String(e),
      ),
  );
});

test.run();
