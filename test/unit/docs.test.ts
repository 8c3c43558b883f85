// The docs tell the truth about the code: every event kind, step name and supervisor action is in the
// reference, and every relative link in README.md and docs/*.md resolves, file and #anchor (GitHub's rules).

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

// dist/test/unit/docs.test.js -> the repo; read without netns.ts, which a unit test has no use for
const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');

function sources(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) return sources(p);
    return /\.c?ts$/.test(e.name) ? [p] : [];
  });
}

/** The text of `export type NAME = ...;` or `export const NAME = [...]`, wherever it lives under src/ (files move). */
function declaration(name: string, kind: 'type' | 'const'): string {
  for (const f of sources(path.join(repoRoot, 'src'))) {
    const text = readFileSync(f, 'utf8');
    const at = text.indexOf(`export ${kind} ${name} =`);
    // to the `;` that ends an unindented line: the end of the declaration, not of a field inside it
    if (at >= 0) return text.slice(at, at + text.slice(at).search(/;\n(?![ \t])/));
  }
  throw new Error(`no export ${kind} ${name} under src/`);
}

const literals = (text: string, re: RegExp) => [...text.matchAll(re)].map((m) => m[1]);

test('the code has the names this test reads (so it cannot pass by finding none)', () => {
  assert.ok(literals(declaration('Event', 'type'), /kind: '([^']+)'/g).length >= 9);
  assert.ok(literals(declaration('StepName', 'type'), /'([^']+)'/g).length >= 20);
  assert.ok(literals(declaration('HOOKS', 'const'), /'([^']+)'/g).length >= 5);
});

test('docs/reference.md names every event kind, step name and supervisor action the code emits', () => {
  const reference = readFileSync(path.join(repoRoot, 'docs/reference.md'), 'utf8');
  const names = {
    'event kind': literals(declaration('Event', 'type'), /kind: '([^']+)'/g),
    'step name': [
      ...literals(declaration('StepName', 'type'), /'([^']+)'/g),
      ...literals(declaration('HOOKS', 'const'), /'([^']+)'/g),
    ],
    'supervisor action': literals(declaration('SupervisorAction', 'type'), /'([^']+)'/g),
  };
  const missing = Object.entries(names).flatMap(([what, list]) =>
    list.filter((n) => !reference.includes(`\`${n}\``)).map((n) => `${what} \`${n}\``),
  );
  assert.equal(missing, [], `docs/reference.md does not mention: ${missing.join(', ')}`);
});

/** The lines of a markdown file outside fenced code blocks. */
function prose(text: string): string[] {
  let fenced = false;
  return text.split('\n').map((l) => {
    if (/^\s*```/.test(l)) {
      fenced = !fenced;
      return '';
    }
    return fenced ? '' : l;
  });
}

/** GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats get -1, -2 ... */
export function anchors(markdown: string): Set<string> {
  const seen = new Map<string, number>();
  const out = new Set<string>();
  for (const line of prose(markdown)) {
    const m = /^#{1,6}\s+(.*?)\s*#*\s*$/.exec(line);
    if (!m) continue;
    const text = m[1].replace(/\[([^\]]*)\]\([^)]*\)/g, '$1'); // a link in a heading anchors by its text
    const base = text
      .toLowerCase()
      .replace(/[^\p{L}\p{N}\s_-]/gu, '')
      .replace(/\s/g, '-');
    const n = seen.get(base) ?? 0;
    seen.set(base, n + 1);
    out.add(n ? `${base}-${n}` : base);
  }
  return out;
}

test('anchors follow GitHub: backticks and punctuation dropped, repeats numbered', () => {
  const a = anchors('# Canary deploys: `--canary`, `promote`, `abort`\n## Python: uvicorn\n## Python: uvicorn\n');
  assert.equal([...a], ['canary-deploys---canary-promote-abort', 'python-uvicorn', 'python-uvicorn-1']);
});

test('every relative link in README.md and docs/*.md resolves, file and #anchor', () => {
  const docs = readdirSync(path.join(repoRoot, 'docs'))
    .filter((f) => f.endsWith('.md'))
    .map((f) => `docs/${f}`);
  const broken: string[] = [];
  let checked = 0;
  for (const file of ['README.md', ...docs]) {
    const lines = prose(readFileSync(path.join(repoRoot, file), 'utf8'));
    lines.forEach((line, i) => {
      const outsideCode = line.replace(/`[^`]*`/g, '');
      for (const [, target] of outsideCode.matchAll(/\]\(([^)\s]+)\)/g)) {
        if (/^[a-z]+:/i.test(target)) continue; // http:, https:, mailto:
        checked++;
        const [file2, anchor] = target.split('#');
        const resolved = file2 ? path.join(repoRoot, path.dirname(file), file2) : path.join(repoRoot, file);
        const where = `${file}:${i + 1}: ${target}`;
        if (!existsSync(resolved)) broken.push(`${where} (no such file)`);
        else if (anchor !== undefined) {
          if (statSync(resolved).isDirectory() || !resolved.endsWith('.md'))
            broken.push(`${where} (anchor on a non-page)`);
          else if (!anchors(readFileSync(resolved, 'utf8')).has(anchor)) broken.push(`${where} (no such heading)`);
        }
      }
    });
  }
  assert.ok(checked > 30, `only ${checked} links found: the parser is broken`);
  assert.equal(broken, [], `broken links:\n${broken.join('\n')}`);
});

test.run();
