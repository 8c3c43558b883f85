#!/usr/bin/env node
// The portflip executable: runs the CLI and exits with its code.

import { main } from './cli.js';

process.exitCode = await main(process.argv.slice(2));
