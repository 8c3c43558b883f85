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
  config: 8, // unknown user, missing directory, unreadable config
  nothingToDo: 9, // rollback with no kept instance, unknown app
  rules: 10, // iptables refused portflip's rules (a foreign rule in the way, a kernel without a match)
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
