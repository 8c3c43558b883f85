// Preload for Node.js instances (NODE_OPTIONS --require): server.close() drains keep-alive connections gently.
//
// Since Node 19, http(s).Server.close() also destroys every idle keep-alive connection at once; a client
// whose next request is already on the wire then gets a reset (or, behind an nginx keepalive pool, a 502).
// Loaded by portflip into every Node process of an instance, this replaces close() on http.Server and
// https.Server so that, once it is called, the server
//   - stops accepting (the listener closes, as before),
//   - answers each further request with `Connection: close` and closes the connection after it,
//   - closes a keep-alive connection only once it has been idle for the server's keepAliveTimeout,
//   - and calls close()'s callback when the last connection is gone, as before.
// Its SIGTERM handlers also wait until the keep-alive connections have moved on (see the end of this file).
// Nothing else changes, and nothing at all before SIGTERM or close(): a Node process that never closes a
// server (npm itself, a build step, a worker) only pays for the two property assignments below.
// PORTFLIP_NODE_DRAIN_MAX_IDLE_MS (set by portflip from --kill-after) bounds the idle wait, so that an app
// with a long keepAliveTimeout still exits before it would be killed.

/* eslint-disable @typescript-eslint/no-explicit-any */
const http = require('node:http') as typeof import('node:http');
const https = require('node:https') as typeof import('node:https');
const net = require('node:net') as typeof import('node:net');

const POLL_MS = 200;
const DEFAULT_IDLE_MS = 5000; // Node's default keepAliveTimeout, for servers that set it to 0 (never)
const maxIdle = Number(process.env.PORTFLIP_NODE_DRAIN_MAX_IDLE_MS) || Infinity;
const kDraining = Symbol('portflip.draining');

/** Node's own list of a server's HTTP connections (an internal field since Node 18.2; absent before). */
function connectionsList(server: any): any | undefined {
  const sym = Object.getOwnPropertySymbols(server).find((s) => s.description === 'http.server.connections');
  return sym ? server[sym] : undefined;
}

function internalInterval(server: any): any {
  const sym = Object.getOwnPropertySymbols(server).find(
    (s) => s.description === 'http.server.connectionsCheckingInterval',
  );
  return sym ? server[sym] : undefined;
}

function gentleClose(this: any, ...args: unknown[]): any {
  const list = connectionsList(this);
  if (this[kDraining] || !list || !this.listening) {
    // closed already, never listened, or a Node without the connections list: net's close reports it as before
    return net.Server.prototype.close.apply(this, args as any);
  }
  this[kDraining] = true;
  const server = this;
  const idleMs = Math.min(server.keepAliveTimeout > 0 ? server.keepAliveTimeout : DEFAULT_IDLE_MS, maxIdle);
  const idleSince = new WeakMap<object, number>();
  const now = () => performance.now();

  // Each answer from now on says Connection: close, and Node closes the socket after sending it.
  server.prependListener('request', (req: any, res: any) => {
    res.shouldKeepAlive = false;
    idleSince.delete(req.socket);
  });
  for (const parser of list.all()) {
    const res = parser.socket?._httpMessage;
    if (res && !res.headersSent) res.shouldKeepAlive = false; // in flight: its answer closes too
  }

  // Close a connection once it has been idle (no request in flight, none being read) for idleMs.
  const reap = () => {
    const idle = new Set(list.idle().map((p: any) => p.socket));
    for (const parser of list.all()) {
      const socket = parser.socket;
      if (!socket || socket.destroyed) continue;
      if (!idle.has(socket) || socket._httpMessage) {
        idleSince.delete(socket);
        continue;
      }
      const since = idleSince.get(socket);
      if (since === undefined) idleSince.set(socket, now());
      else if (now() - since >= idleMs) socket.destroy();
    }
  };
  const timer = setInterval(reap, POLL_MS);
  timer.unref(); // the open sockets keep the process alive, not this timer
  server.once('close', () => {
    clearInterval(timer);
    clearInterval(internalInterval(server));
  });
  reap();
  net.Server.prototype.close.apply(server, args as any); // stop accepting; the callback fires once all sockets closed
  return server;
}

// Frameworks (fastify) call closeIdleConnections() themselves right after close(): not while draining.
function closeIdleUnlessDraining(original: (...a: unknown[]) => void) {
  return function (this: any, ...args: unknown[]) {
    if (this[kDraining]) return;
    return original.apply(this, args);
  };
}

for (const proto of [http.Server.prototype, https.Server.prototype] as any[]) {
  if (proto.close === gentleClose) continue; // loaded twice (NODE_OPTIONS repeated)
  proto.close = gentleClose;
  const closeIdle = proto.closeIdleConnections;
  if (typeof closeIdle === 'function') proto.closeIdleConnections = closeIdleUnlessDraining(closeIdle);
}

// The app's own SIGTERM handlers run once its servers' keep-alive connections have moved on: each one's next
// answer says Connection: close, an idle one goes after the same idle time as above, bounded the same way.
// A framework that refuses requests while it closes (fastify answers them 503) then finds none left. With no
// listening server, or none with a connection, the handlers run at once, as before.
const servers = new Set<any>();
for (const proto of [http.Server.prototype, https.Server.prototype] as any[]) {
  const listen = proto.listen;
  if (listen[kDraining]) continue;
  const tracked = function (this: any, ...args: unknown[]) {
    servers.add(this);
    this.once('close', () => servers.delete(this));
    return listen.apply(this, args);
  };
  (tracked as any)[kDraining] = true;
  proto.listen = tracked;
}

let moved: Promise<void> | null = null;
function connectionsMoved(): Promise<void> {
  moved ??= new Promise<void>((resolve) => {
    const live = [...servers].filter((s) => s.listening && connectionsList(s)?.all().length);
    if (!live.length) return resolve();
    const idleOf = (s: any) => Math.min(s.keepAliveTimeout > 0 ? s.keepAliveTimeout : DEFAULT_IDLE_MS, maxIdle);
    // at most half of what the module may wait in all: the app's own close keeps the rest of --kill-after
    const deadline = performance.now() + Math.min(Math.max(...live.map(idleOf)), maxIdle / 2) + POLL_MS;
    const idleSince = new WeakMap<object, number>();
    for (const s of live) {
      s.prependListener('request', (_req: any, res: any) => void (res.shouldKeepAlive = false));
      for (const parser of connectionsList(s).all()) {
        const res = parser.socket?._httpMessage;
        if (res && !res.headersSent) res.shouldKeepAlive = false;
      }
    }
    const tick = () => {
      let open = 0;
      for (const s of live) {
        const list = connectionsList(s);
        const idle = new Set(list.idle().map((p: any) => p.socket));
        for (const parser of list.all()) {
          const socket = parser.socket;
          if (!socket || socket.destroyed) continue;
          open++;
          if (!idle.has(socket) || socket._httpMessage) idleSince.delete(socket);
          else if (!idleSince.has(socket)) idleSince.set(socket, performance.now());
          else if (performance.now() - idleSince.get(socket)! >= idleOf(s)) socket.destroy();
        }
      }
      if (open === 0 || performance.now() >= deadline) {
        clearInterval(timer);
        resolve();
      }
    };
    const timer = setInterval(tick, POLL_MS);
    tick();
  });
  return moved;
}

const deferred = new WeakMap<(...a: any[]) => unknown, (...a: any[]) => void>();
const defer = (fn: (...a: any[]) => unknown) => {
  let d = deferred.get(fn);
  if (!d) {
    d = function (this: unknown, ...args: unknown[]) {
      void connectionsMoved().then(() => fn.apply(this, args));
    };
    deferred.set(fn, d);
  }
  return d;
};
const proc = process as any;
if (!proc[kDraining]) {
  proc[kDraining] = true;
  for (const m of ['on', 'addListener', 'once', 'prependListener', 'prependOnceListener']) {
    const add = proc[m];
    proc[m] = function (this: unknown, event: unknown, fn: unknown) {
      return add.call(this, event, event === 'SIGTERM' && typeof fn === 'function' ? defer(fn as any) : fn);
    };
  }
  for (const m of ['off', 'removeListener']) {
    const remove = proc[m];
    proc[m] = function (this: unknown, event: unknown, fn: any) {
      return remove.call(this, event, event === 'SIGTERM' ? (deferred.get(fn) ?? fn) : fn);
    };
  }
}
