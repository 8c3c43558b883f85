// Shared setup for the integration tests: a namespace, state dirs, and the CLI with the fixture app.

import { existsSync, readFileSync } from 'node:fs';
import {
  fixture,
  createNetns,
  tmpDirs,
  portflip,
  portflipSpawn,
  type Netns,
  type TmpDirs,
  type ExecResult,
} from './netns.js';

export interface World {
  ns: Netns;
  dirs: TmpDirs;
  pf(args: string[], env?: NodeJS.ProcessEnv): Promise<ExecResult>;
  pfSpawn(args: string[], env?: NodeJS.ProcessEnv): ReturnType<typeof portflipSpawn>;
  sh(script: string): Promise<ExecResult>;
  save(): Promise<string>;
}

/** Runs `fn` in a fresh namespace (two, joined by veth, with peer) and always cleans up. */
export async function inWorld(fn: (w: World) => Promise<void>, opts: { peer?: boolean } = {}): Promise<void> {
  const ns = await createNetns(opts);
  const dirs = tmpDirs();
  const w: World = {
    ns,
    dirs,
    pf: (args, env) => portflip(ns, args, dirs, { env }),
    pfSpawn: (args, env) => portflipSpawn(ns, args, dirs, { env }),
    sh: (script) => ns.exec('sh', ['-c', script]),
    save: async () => {
      const r = await ns.exec('sh', ['-c', 'iptables-save; ip6tables-save']);
      return r.stdout
        .split('\n')
        .filter((l) => !l.startsWith('#'))
        .map((l) => l.replace(/\[\d+:\d+\]$/, '[0:0]'))
        .join('\n');
    },
  };
  try {
    await fn(w);
  } finally {
    await w.pf(['cleanup', '--stop-instances']).catch(() => {});
    dirs.cleanup();
    await ns.destroy();
  }
}

export const app = (...args: string[]) => ['--', process.execPath, fixture('app.mjs'), '--port', '{port}', ...args];

export function deployArgs(ports: number[], extra: string[], appArgs: string[], name = 'web', listen = 80): string[] {
  return ['deploy', name, '--listen', String(listen), '--ports', ports.join(','), ...extra, ...app(...appArgs)];
}

export const show = (r: ExecResult) => `exit ${r.code}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`;

export async function get(ns: Netns, url: string, where: 'server' | 'client' = 'server'): Promise<string> {
  const script = `fetch(${JSON.stringify(url)}).then(r=>r.text()).then(t=>process.stdout.write(t),e=>{process.stdout.write('ERR '+e.cause?.code);})`;
  const r =
    where === 'server'
      ? await ns.exec(process.execPath, ['-e', script])
      : await ns.execClient(process.execPath, ['-e', script]);
  return r.stdout.trim();
}

/** Alive and not a zombie. */
export const alive = (pid: number) => {
  try {
    return existsSync(`/proc/${pid}`) && !/\) Z /.test(readFileSync(`/proc/${pid}/stat`, 'utf8'));
  } catch {
    return false;
  }
};
