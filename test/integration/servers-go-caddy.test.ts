// Go net/http (Shutdown, and no signal handling) and caddy, unchanged, deployed with default flags: 0 failed.
// (The servers are split over two files so that each stays well inside the runner's per-file time limit.)
import { test } from 'uvu';
import { serverTests } from '../helpers/anyserver.js';

serverTests(['Go net/http', 'caddy']);
test.run();
