// Sample app for the Vagrant demo and provision.sh: the app contract in docs/drain.md (listen on $PORT, drain on SIGTERM).
'use strict';
const http = require('node:http');
const net = require('node:net');

const IDLE_MS = 1000; // while draining, close a connection once it has been idle this long
const VERSION = process.env.SAMPLE_VERSION || 'v1';
const started = new Date().toISOString();
let draining = false;
const conns = new Map(); // socket -> { busy: requests in flight, idleSince: ms }

const server = http.createServer((req, res) => {
  const c = conns.get(req.socket);
  c.busy++;
  res.on('close', () => {
    c.busy--;
    c.idleSince = Date.now();
  });
  if (draining) res.setHeader('Connection', 'close'); // Node closes the socket after this answer
  if (req.url === '/health') return res.end('ok\n');
  res.end(`hello from portflip-sample ${VERSION}, pid ${process.pid}, port ${process.env.PORT}, started ${started}\n`);
});
server.on('connection', (s) => {
  conns.set(s, { busy: 0, idleSince: Date.now() });
  s.on('close', () => conns.delete(s));
});
server.listen(Number(process.env.PORT)); // no host: all addresses (:: and 0.0.0.0)

process.on('SIGTERM', () => {
  draining = true;
  // Stop accepting. Not server.close(): since Node 19 it also drops idle keep-alive sockets at once.
  net.Server.prototype.close.call(server, () => process.exit(0)); // runs when the last socket closes
  setInterval(() => {
    for (const [s, c] of conns) if (c.busy === 0 && Date.now() - c.idleSince > IDLE_MS) s.destroy();
  }, 200);
});
