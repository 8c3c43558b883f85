// `--metrics ADDR` on watch, run and agent: GET /metrics served from what is true at each scrape; and the
// textfile kept fresh while such a long-lived command runs.
//
// The server is node:http (a server, not a call, like the agent's and the supervisor's sockets); what it
// reads goes through the Sys of the ctx, as everything else does.

import { createServer, type Server } from 'node:http';
import { PortflipError } from '../core/errors.js';
import type { Ctx } from './context.js';
import { CONTENT_TYPE, gather, render, textfileDir, writeTextfile } from './metrics.js';

/** Where to listen: `host` undefined means every address (`:9778`). */
export interface MetricsAddress {
  host: string | undefined;
  port: number;
  text: string; // as given, for messages
}

export interface MetricsServer {
  url: string;
  close(): Promise<void>;
}

/** Listens on the address and answers GET /metrics; 404 elsewhere, 405 for other methods. */
export async function serveMetrics(ctx: Ctx, addr: MetricsAddress): Promise<MetricsServer> {
  const server: Server = createServer((req, res) => {
    const path = (req.url ?? '/').split('?')[0];
    if (path !== '/metrics') {
      res.writeHead(404, { 'content-type': 'text/plain; charset=utf-8' }).end('not found; metrics are at /metrics\n');
      return;
    }
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.writeHead(405, { allow: 'GET, HEAD', 'content-type': 'text/plain; charset=utf-8' }).end('use GET\n');
      return;
    }
    gather(ctx).then(
      (view) => res.writeHead(200, { 'content-type': CONTENT_TYPE }).end(req.method === 'HEAD' ? '' : render(view)),
      (err) =>
        res.writeHead(500, { 'content-type': 'text/plain; charset=utf-8' }).end(`${(err as Error)?.message ?? err}\n`),
    );
  });
  server.on('clientError', (_err, sock) => sock.destroy()); // a bad request line is the client's problem
  await new Promise<void>((resolve, reject) => {
    server.once('error', (err: NodeJS.ErrnoException) => {
      if (err.code === 'EADDRINUSE')
        reject(
          new PortflipError('portInUse', `metrics address ${addr.text} is already in use; pick another with --metrics`),
        );
      else if (err.code === 'EADDRNOTAVAIL' || err.code === 'ENOTFOUND' || err.code === 'EAI_AGAIN')
        reject(new PortflipError('usage', `--metrics ${addr.text}: ${addr.host} is not an address of this host`));
      else reject(err);
    });
    server.listen({ port: addr.port, host: addr.host }, () => resolve());
  });
  const host = addr.host === undefined ? '*' : addr.host.includes(':') ? `[${addr.host}]` : addr.host;
  const bound = server.address();
  const url = `http://${host}:${typeof bound === 'object' && bound ? bound.port : addr.port}/metrics`; // port 0: the one given
  ctx.emit({ kind: 'notice', message: `serving metrics on ${url}` });
  return {
    url,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections(); // a scraper's keep-alive connection must not hold the exit up
      }),
  };
}

/** How often watch and run rewrite the textfile, so its gauges (connections, memory) stay fresh between commands. */
export const TEXTFILE_REFRESH_MS = 15_000;

/**
 * Runs a long-lived command (`watch`, `run`, `agent`) with its metrics: the endpoint when `listen` is given
 * (started first, so a taken port fails before the command starts), and with `refreshTextfile` the textfile
 * rewritten every TEXTFILE_REFRESH_MS while it runs. Both end when the command does.
 */
export async function withMetrics<T>(
  ctx: Ctx,
  o: { listen?: MetricsAddress; refreshTextfile?: boolean },
  fn: () => Promise<T>,
): Promise<T> {
  const server = o.listen ? await serveMetrics(ctx, o.listen) : null;
  const stop = new AbortController();
  const refresher = o.refreshTextfile ? refreshTextfile(ctx, stop.signal) : Promise.resolve();
  try {
    return await fn();
  } finally {
    stop.abort();
    await refresher;
    await server?.close();
  }
}

async function refreshTextfile(ctx: Ctx, stop: AbortSignal): Promise<void> {
  if (!(await textfileDir(ctx).catch(() => null))) return;
  let said = ''; // one notice per new problem, not one every 15 s
  while (!stop.aborted) {
    try {
      await writeTextfile(ctx);
      said = '';
    } catch (err) {
      const message = `metrics: could not write the textfile: ${(err as Error)?.message ?? err}`;
      if (message !== said) ctx.emit({ kind: 'notice', message });
      said = message;
    }
    await ctx.sys.sleep(TEXTFILE_REFRESH_MS, stop);
  }
}
