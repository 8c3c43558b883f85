// The stand-in for node:assert that yargs gets in the bundle: it must agree with node:assert.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as node from 'node:assert';
import { notStrictEqual, strictEqual } from '../../src/cli/assert-lite.js';

const outcome = (fn: () => void) => {
  try {
    fn();
    return 'ok';
  } catch (e) {
    return (e as Error).message.startsWith('why') ? 'threw: why' : 'threw'; // node:assert may add a diff after it
  }
};

test('strictEqual and notStrictEqual agree with node:assert, NaN and -0 included, and keep the message', () => {
  const pairs: [unknown, unknown][] = [
    [1, 1],
    [1, '1'],
    [NaN, NaN],
    [0, -0],
    [undefined, undefined],
    [undefined, null],
    ['a', 'a'],
  ]; // yargs compares values with undefined, and typeof with 'string'
  for (const [a, b] of pairs) {
    assert.is(
      outcome(() => strictEqual(a, b, 'why')),
      outcome(() => node.strictEqual(a, b, 'why')),
      `strictEqual(${String(a)}, ${String(b)})`,
    );
    assert.is(
      outcome(() => notStrictEqual(a, b, 'why')),
      outcome(() => node.notStrictEqual(a, b, 'why')),
      `notStrictEqual(${String(a)}, ${String(b)})`,
    );
  }
  assert.is(
    outcome(() => strictEqual(1, 2)),
    'threw',
  );
});

test.run();
