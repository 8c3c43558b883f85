#!/usr/bin/env node
// Where portflip started before main.cjs: systemd units and links made by earlier versions name this file.
import './main.cjs';
