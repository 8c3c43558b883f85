// gunicorn (gthread), uvicorn, aiohttp and puma, unchanged, deployed with default flags: 0 failed.
// (The servers are split over two files so that each stays well inside the runner's per-file time limit.)
import { test } from 'uvu';
import { serverTests } from '../helpers/anyserver.js';

serverTests(['gunicorn', 'uvicorn', 'aiohttp', 'puma']);
test.run();
