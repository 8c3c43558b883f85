// `portflip logs`: the active instance's log, followed across deploys.

import { fail } from '../core/errors.js';
import { readState } from '../core/state.js';
import type { Ctx } from '../ops/context.js';

/** The active instance's log: the last lines, then (with follow) new lines as they come, across deploys. */
export async function logs(
  ctx: Ctx,
  app: string,
  opts: { follow: boolean; lines: number },
  write: (s: string) => void,
): Promise<void> {
  const activeLog = async () => {
    const st = await readState(ctx.sys, ctx.paths, app);
    if (!st) return fail('nothingToDo', `no app named "${app}" here (no state in ${ctx.paths.stateDir})`);
    const a = st.instances.find((i) => i.state === 'active');
    return a?.log ?? null;
  };
  let path = await activeLog();
  if (!path) fail('nothingToDo', `"${app}" has no active instance; deploy it first`);
  const text = await ctx.sys.fs.read(path!).catch(() => '');
  const tail = text.split('\n');
  if (tail.at(-1) === '') tail.pop();
  write(
    tail
      .slice(-opts.lines)
      .map((l) => l + '\n')
      .join(''),
  );
  let offset = Buffer.byteLength(text);
  while (opts.follow && !ctx.abort.aborted) {
    await ctx.sys.sleep(250, ctx.abort);
    const now = await activeLog().catch(() => null);
    if (now && now !== path) {
      // a deploy moved the port: carry on with the new instance's log from its start
      write(`--- portflip: now following ${now}\n`);
      path = now;
      offset = 0;
    }
    // from the start again when the file got shorter: truncated, a new instance on the same port
    const chunk = await ctx.sys.fs.readFrom(path!, offset).catch(() => null);
    if (!chunk) continue;
    offset = chunk.size;
    if (chunk.text) write(chunk.text);
  }
}
