// Failure classes and their exit codes: the CLI maps every error to one of these.

export const ExitCode = {
  ok: 0,
  deployFailed: 1, // the candidate failed or the deploy was interrupted; the redirect was left on the old instance
  usage: 2, // bad flag, duration, port or app name
  lockHeld: 3, // another portflip run holds the app's lock
  notPrivileged: 4, // neither root nor CAP_NET_ADMIN
  noIptables: 5, // iptables missing or not working
  portInUse: 6, // an instance port is already bound
  commandNotFound: 7, // the app command cannot be resolved
  config: 8, // unknown user, missing directory, unreadable config file
  nothingToDo: 9, // rollback with no kept instance, unknown app
  rules: 10, // iptables refused portflip's rules (a foreign rule in the way, a kernel without a match)
  system: 11, // the OS refused a file or process operation (permissions, a read-only or full disk)
  canaryLive: 12, // a canary is live: promote or abort it before the next deploy
  noNfqueue: 13, // the kernel cannot queue packets (no nfnetlink_queue): no pause, no in-place deploy
  badState: 14, // a state file that is not JSON or has another schema version
  noFreeQueue: 15, // every NFQUEUE number portflip may use (30000-39999) is taken
  internal: 70,
} as const;

export type ExitCodeName = keyof typeof ExitCode;

export class PortflipError extends Error {
  constructor(
    readonly kind: ExitCodeName,
    message: string,
  ) {
    super(message);
  }
  get exitCode(): number {
    return ExitCode[this.kind];
  }
}

export const fail = (kind: ExitCodeName, message: string): never => {
  throw new PortflipError(kind, message);
};

const ERRNO_HINT: Record<string, string> = {
  EACCES: 'permission denied; run it as root (sudo) or fix the permissions',
  EPERM: 'operation not permitted; run it as root (sudo)',
  ENOSPC: 'no space left on the device; free some and run again',
  EROFS: 'the file system is read-only; point PORTFLIP_STATE_DIR / PORTFLIP_RUN_DIR at a writable place',
  ENOENT: 'no such file or directory',
  ENOTDIR: 'a part of the path is not a directory',
  EMFILE: 'too many open files; raise the limit (ulimit -n)',
};

/** An error from the OS (it has an errno code and a syscall) as a one-line failure of its own class. */
export function fromSystemError(err: unknown): PortflipError | null {
  const e = err as (NodeJS.ErrnoException & { dest?: string }) | null;
  if (!e || typeof e.code !== 'string' || !e.syscall) return null;
  const what = [e.syscall, e.path, e.dest && `-> ${e.dest}`].filter(Boolean).join(' ');
  return new PortflipError('system', `${what}: ${ERRNO_HINT[e.code] ?? e.code} (${e.code})`);
}
