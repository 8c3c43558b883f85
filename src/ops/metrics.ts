// Metrics from history records: a stub on this branch; the metrics module (issue 21, part 3) fills it.

import type { HistoryRecord } from '../core/history.js';
import type { Ctx } from './context.js';

export async function publish(_ctx: Ctx, _record: HistoryRecord): Promise<void> {}
