// Stands in for node:assert in the CLI bundle (scripts/bundle.mjs): yargs imports it for two internal
// sanity checks, and node:assert's import loads Node's assertion-error and colour modules with it,
// some 4-8 ms of every run. The semantics are node:assert's: Object.is, and the message when given.

export function strictEqual(actual: unknown, expected: unknown, message?: string): void {
  if (!Object.is(actual, expected)) throw new Error(message ?? `expected ${String(expected)}, got ${String(actual)}`);
}

export function notStrictEqual(actual: unknown, expected: unknown, message?: string): void {
  if (Object.is(actual, expected)) throw new Error(message ?? `expected anything but ${String(expected)}`);
}
