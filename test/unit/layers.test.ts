// The shape of src/: every module opens with its purpose, and no two modules import each other, even by a
// chain (a cycle makes load order matter, and makes one command load another's code).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, join, normalize, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

const src = fileURLToPath(new URL('../../../src/', import.meta.url)); // from dist/test/unit
const walk = (d: string): string[] =>
  readdirSync(d).flatMap((f) => (statSync(join(d, f)).isDirectory() ? walk(join(d, f)) : [join(d, f)]));
const modules = walk(src).filter((f) => /\.c?ts$/.test(f));

/** The src modules a module imports, type-only imports and re-exports included. */
function importsOf(file: string): string[] {
  const text = readFileSync(file, 'utf8');
  return [...text.matchAll(/^(?:import|export)\s[^;]*?from\s+'(\.[^']+)'/gms)].map((m) =>
    normalize(join(dirname(file), m[1].replace(/\.cjs$/, '.cts').replace(/\.js$/, '.ts'))),
  );
}

test('src/ has its modules in folders by layer, each opening with a line saying what it is for', () => {
  assert.ok(modules.length > 40, `found ${modules.length} modules under ${src}`);
  for (const f of modules) {
    const lines = readFileSync(f, 'utf8').split('\n');
    const first = lines[0].startsWith('#!') ? lines[1] : lines[0];
    assert.ok(first.startsWith('// '), `${relative(src, f)} opens with "${first}", not a purpose line`);
  }
});

test('no import cycles in src/', () => {
  const graph = new Map(modules.map((f) => [f, importsOf(f)]));
  const cycles: string[] = [];
  const state = new Map<string, 'open' | 'done'>();
  const path: string[] = [];
  const visit = (f: string) => {
    state.set(f, 'open');
    path.push(f);
    for (const d of graph.get(f) ?? []) {
      if (state.get(d) === 'open') cycles.push([...path.slice(path.indexOf(d)), d].map((p) => relative(src, p)).join(' -> '));
      else if (!state.has(d)) visit(d);
    }
    path.pop();
    state.set(f, 'done');
  };
  for (const f of modules) if (!state.has(f)) visit(f);
  assert.equal(cycles, []);
});

test.run();
