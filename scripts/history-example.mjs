// Draws docs/history-example.svg from docs/history-example.jsonl (records of a real session) with the built CLI.
// Usage: npm run build && node scripts/history-example.mjs [FILE.jsonl] [OUT.svg]   (no root needed)
// The records are copied into a throwaway state dir, and `portflip history web --svg` draws them, in UTC.
import { execFileSync } from 'node:child_process';
import { copyFileSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const from = path.resolve(process.argv[2] ?? path.join(root, 'docs', 'history-example.jsonl'));
const out = path.resolve(process.argv[3] ?? path.join(root, 'docs', 'history-example.svg'));
const state = mkdtempSync(path.join(tmpdir(), 'portflip-history-example-'));
try {
  mkdirSync(path.join(state, 'history'));
  copyFileSync(from, path.join(state, 'history', 'web.jsonl'));
  execFileSync(process.execPath, [path.join(root, 'dist', 'src', 'main.cjs'), 'history', 'web', '--svg', out], {
    env: { ...process.env, PORTFLIP_STATE_DIR: state, PORTFLIP_RUN_DIR: state, PORTFLIP_TEXTFILE_DIR: '', TZ: 'UTC' },
    stdio: 'inherit',
  });
} finally {
  rmSync(state, { recursive: true, force: true });
}
