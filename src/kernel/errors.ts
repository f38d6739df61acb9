import { constants } from 'node:os';

const errnoNames = new Map<number, string>();
for (const [name, value] of Object.entries(constants.errno)) {
  // EAGAIN/EWOULDBLOCK and EDEADLK/EDEADLOCK share numbers: keep the first, canonical one.
  if (!errnoNames.has(value)) errnoNames.set(value, name);
}

export function errnoName(errno: number): string {
  return errnoNames.get(errno) ?? `errno ${errno}`;
}

export const Errno = constants.errno;

/**
 * A failed system call. `code` is the errno name ("EBUSY"), `call` the
 * syscall or ioctl ("KVM_CREATE_DEVICE"), `object` what it was made on
 * ("/dev/vfio/12", "vm probe"). The message carries all three.
 */
export class SysError extends Error {
  readonly errno: number;
  readonly code: string;
  readonly call: string;
  readonly object: string;

  constructor(call: string, object: string, errno: number) {
    const code = errnoName(errno);
    super(`${call} on ${object}: ${code}`);
    this.name = 'SysError';
    this.errno = errno;
    this.code = code;
    this.call = call;
    this.object = object;
  }

  /** Wraps a Node.js fs error (which has `errno` negative and `code`) as a SysError. */
  static fromNode(call: string, object: string, err: NodeJS.ErrnoException): SysError {
    const n = typeof err.errno === 'number' ? Math.abs(err.errno) : (err.code ? (constants.errno as Record<string, number>)[err.code] : undefined);
    if (n === undefined) throw err;
    return new SysError(call, object, n);
  }
}
