// Named, counted skips: uvu has no skip for one test, so a skipped test prints one line that scripts/test.mjs counts.

import { test, type Test } from 'uvu';

/** The start of the line the runner reads; what follows is JSON: { name, why }. */
export const SKIP_LINE = 'portflip-test-skip ';

/** Registers a skipped test with the runner: it is counted and listed with why, never counted as passed. */
export function skip(name: string, why: string): void {
  process.stdout.write(`${SKIP_LINE}${JSON.stringify({ name, why })}\n`);
}

/** `on(name, fn)` (uvu's test, or a suite) when there is no reason to skip; otherwise a counted skip that says why. */
export function testUnless(
  why: string | false | null | undefined,
  name: string,
  fn: () => unknown,
  on: Test = test,
): void {
  if (why) skip(name, why);
  else on(name, fn as () => Promise<void>);
}

/** The reason a test that needs real root cannot run here, or '' as root. */
export const needsRoot = (what: string): string =>
  process.getuid?.() === 0 ? '' : `needs real root (${what}); CI runs as root`;
