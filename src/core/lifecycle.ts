// Instance states and the only moves between them; the state file's invariant, checked before every write.
//
// Invariant: an app has at most one active instance, at most one candidate (started, not yet ready),
// and at most two instances besides the candidate: the active one and the one it replaced (kept for
// a rollback, or draining). Every state change goes through move(), which refuses any other.
// A canary (canary.ts) is one of those two: it gets a share of new connections next to the active
// instance, so it never comes without one, and a deploy that makes it retires kept and draining ones first.

import { PortflipError } from './errors.js';

export type InstanceState = 'candidate' | 'active' | 'draining' | 'kept' | 'canary';

/** from -> to, and why it happens; nothing else is allowed. */
const MOVES: Record<InstanceState, Partial<Record<InstanceState, string>>> = {
  candidate: {
    active: 'the switch pointed the redirect at it',
    canary: 'the canary split sends it a share of new connections',
  },
  active: {
    draining: 'a switch replaced it, or the live redirect points elsewhere',
    kept: 'a switch replaced it and --keep-old keeps it for a rollback',
    candidate: 'the switch to it was undone',
    canary: 'a promote undone',
  },
  canary: {
    active: 'promote, or the live redirect points at it',
    draining: 'abort, or its split was lost',
    candidate: 'the split to it was undone',
  },
  kept: {
    active: 'a rollback, or a switch undone',
    draining: 'its keep time is over, or a newer instance replaced it',
  },
  draining: { active: 'a switch undone, or the live redirect points at it', canary: 'an abort undone' },
};

interface HasState {
  port: number;
  pid: number | null;
  state: InstanceState;
}

/** Moves an instance to a new state, or throws: a refused move is a bug, never a user error. */
export function move<T extends HasState>(inst: T, to: InstanceState): T {
  if (inst.state !== to && !MOVES[inst.state][to]) {
    throw new PortflipError(
      'internal',
      `instance on port ${inst.port}${inst.pid ? ` (pid ${inst.pid})` : ''} cannot go from ${inst.state} to ${to}`,
    );
  }
  inst.state = to;
  return inst;
}

export const canMove = (from: InstanceState, to: InstanceState) => from === to || !!MOVES[from][to];

/** What is wrong with a set of instances, or null: written before every state file write. */
export function invariantProblem(instances: readonly HasState[]): string | null {
  const count = (s: InstanceState) => instances.filter((i) => i.state === s).length;
  if (count('active') > 1) return `${count('active')} active instances`;
  if (count('candidate') > 1) return `${count('candidate')} candidates`;
  if (count('canary') > 1) return `${count('canary')} canaries`;
  if (count('canary') && !count('active')) return 'a canary without an active instance';
  const settled = instances.length - count('candidate');
  if (settled > 2)
    return `${settled} instances besides the candidate (${instances.map((i) => `${i.port}:${i.state}`).join(', ')})`;
  const ports = instances.map((i) => i.port);
  if (new Set(ports).size !== ports.length) return `two instances on one port (${ports.join(', ')})`;
  return null;
}
