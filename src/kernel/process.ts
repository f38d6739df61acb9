/**
 * Other processes, by pidfd: who a VMM is, whether it still lives, its
 * RLIMIT_MEMLOCK, and killing it. A pidfd names one process for good, so a
 * recycled pid can never be signalled by mistake.
 */
import { SysError } from './errors';
import { OwnedFd } from './fd';
import { lastErrno, lib, libc } from './libc';

const sys = {
  syscall3: lib.func('long syscall(long nr, long a, long b, long c)'),
  syscall4: lib.func('long syscall(long nr, long a, long b, void *c, long d)'),
  prlimit: lib.func('int prlimit(int pid, int resource, const void *newlim, void *oldlim)'),
};

const SYS_pidfd_send_signal = 424;
const SYS_pidfd_open = 434;
const SOL_SOCKET = 1;
const SO_PEERPIDFD = 77; // Linux 6.5
const RLIMIT_MEMLOCK = 8;
export const SIGKILL = 9;
export const SIGTERM = 15;

/** pidfd_open(2): a close-on-exec pidfd of `pid` (PIDFD_CLOEXEC is implied). ESRCH: no such process. */
export function pidfdOpen(pid: number): OwnedFd {
  const r = Number(sys.syscall3(SYS_pidfd_open, pid, 0, 0));
  if (r < 0) throw new SysError('pidfd_open', `pid ${pid}`, lastErrno());
  return new OwnedFd(r, `pidfd of ${pid}`);
}

/**
 * The pidfd of the process on the other end of a Unix socket: SO_PEERPIDFD
 * where the kernel has it (no race with pid reuse), else pidfd_open of the
 * SO_PEERCRED pid.
 */
export function peerPidfd(socketFd: number, pid: number): OwnedFd {
  const out = Buffer.alloc(4);
  const len = Buffer.alloc(4);
  len.writeUInt32LE(4, 0);
  const r = libc.getsockopt(socketFd, SOL_SOCKET, SO_PEERPIDFD, out, len) as number;
  if (r === 0) return new OwnedFd(out.readInt32LE(0), `pidfd of ${pid}`);
  const errno = lastErrno();
  if (errno !== 92 /* ENOPROTOOPT */ && errno !== 22 /* EINVAL */) throw new SysError('getsockopt(SO_PEERPIDFD)', `pid ${pid}`, errno);
  return pidfdOpen(pid);
}

/** pidfd_send_signal(2). ESRCH: the process is gone already. */
export function pidfdSendSignal(pidfd: number, signal: number, who: string): void {
  const r = Number(sys.syscall4(SYS_pidfd_send_signal, pidfd, signal, null, 0));
  if (r < 0) throw new SysError('pidfd_send_signal', who, lastErrno());
}

export interface Rlimit {
  soft: bigint;
  hard: bigint;
}

/**
 * prlimit(2) on RLIMIT_MEMLOCK of another process: the soft limit becomes
 * `bytes`; the hard limit is raised to match only when it is lower (raising a
 * hard limit needs CAP_SYS_RESOURCE: EPERM without it). Returns the old limits.
 */
export function setMemlockLimit(pid: number, bytes: bigint): Rlimit {
  const current = getMemlockLimit(pid);
  const next = Buffer.alloc(16);
  next.writeBigUInt64LE(bytes, 0);
  next.writeBigUInt64LE(bytes > current.hard ? bytes : current.hard, 8);
  const old = Buffer.alloc(16);
  if ((sys.prlimit(pid, RLIMIT_MEMLOCK, next, old) as number) < 0) throw new SysError('prlimit(RLIMIT_MEMLOCK)', `pid ${pid}`, lastErrno());
  return { soft: old.readBigUInt64LE(0), hard: old.readBigUInt64LE(8) };
}

/** prlimit(2) read of RLIMIT_MEMLOCK. */
export function getMemlockLimit(pid: number): Rlimit {
  const old = Buffer.alloc(16);
  if ((sys.prlimit(pid, RLIMIT_MEMLOCK, null, old) as number) < 0) throw new SysError('prlimit(RLIMIT_MEMLOCK)', `pid ${pid}`, lastErrno());
  return { soft: old.readBigUInt64LE(0), hard: old.readBigUInt64LE(8) };
}

const exec = {
  execvp: lib.func('int execvp(const char *file, const char **argv)'),
  setenv: lib.func('int setenv(const char *name, const char *value, int overwrite)'),
  fcntl: lib.func('int fcntl(int fd, int cmd, int arg)'),
};
const F_GETFD = 1;
const F_SETFD = 2;
const FD_CLOEXEC = 1;

/** Clears FD_CLOEXEC so `fd` survives an exec (an fd handed on to an exec'd VMM). */
export function inheritAcrossExec(fd: number, what: string): void {
  const flags = exec.fcntl(fd, F_GETFD, 0) as number;
  if (flags < 0 || (exec.fcntl(fd, F_SETFD, flags & ~FD_CLOEXEC) as number) < 0) throw new SysError('fcntl(F_SETFD)', what, lastErrno());
}

/**
 * execvp(3): replaces this process (same pid, so a daemon's pidfd of it stays
 * true) with `argv[0]`, searched in PATH, with `env` added to the
 * environment. Returns only by throwing.
 *
 * What a Node caller must settle first: Node marks its stdio close-on-exec
 * and ignores SIGPIPE and SIGXFSZ, and ignored signals stay ignored across
 * exec (kvmvfioctl attach clears the one and installs handlers for the
 * other, so exec resets them to their defaults).
 */
export function execReplace(argv: string[], env: Record<string, string>): never {
  for (const [k, v] of Object.entries(env)) {
    if ((exec.setenv(k, v, 1) as number) < 0) throw new SysError('setenv', k, lastErrno());
  }
  exec.execvp(argv[0], [...argv, null]);
  throw new SysError('execvp', argv[0], lastErrno());
}
