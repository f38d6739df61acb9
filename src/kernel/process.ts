/**
 * Other processes, by pidfd: who a VMM is, whether it still lives, its
 * RLIMIT_MEMLOCK, and killing it. A pidfd names one process for good, so a
 * recycled pid can never be signalled by mistake.
 */
import { closeSync, fstatSync } from 'node:fs';
import { readFile, readdir, readlink } from 'node:fs/promises';
import { SysError } from './errors';
import { watchReadable } from './unix';
import { OwnedFd } from './fd';
import { lastErrno, lib, libc } from './libc';

const sys = {
  poll: lib.func('int poll(void *fds, unsigned long nfds, int timeout)'),
  clockGettime: lib.func('int clock_gettime(int clk, void *ts)'),
  socket: lib.func('int socket(int domain, int type, int protocol)'),
  send: lib.func('intptr_t send(int fd, const void *buf, size_t len, int flags)'),
  recv: lib.func('intptr_t recv(int fd, void *buf, size_t len, int flags)'),
  syscall3: lib.func('long syscall(long nr, long a, long b, long c)'),
  syscall4: lib.func('long syscall(long nr, long a, long b, void *c, long d)'),
  prlimit: lib.func('int prlimit(int pid, int resource, const void *newlim, void *oldlim)'),
};

const SYS_pidfd_send_signal = 424;
const SYS_pidfd_open = 434;
const SOL_SOCKET = 1;
const SO_PEERPIDFD = 77; // Linux 6.5
const RLIMIT_MEMLOCK = 8;
const ESRCH = 3;
const EINTR = 4;
const ENOENT = 2;
const EINVAL = 22;
const ENOPROTOOPT = 92;
const POLLIN = 1;
const POLLERR = 8;
const POLLHUP = 16;
const AF_UNIX = 1;
const AF_NETLINK = 16;
const SOCK_DGRAM = 2;
const SOCK_CLOEXEC = 0o2000000;
const NETLINK_SOCK_DIAG = 4;
const SOCK_DIAG_BY_FAMILY = 20;
const NLM_F_REQUEST = 1;
const NLMSG_ERROR = 2;
const UDIAG_SHOW_PEER = 0x4;
const UNIX_DIAG_PEER = 2;
export const SIGKILL = 9;
export const SIGTERM = 15;

/** pidfd_open(2): a close-on-exec pidfd of `pid` (PIDFD_CLOEXEC is implied). ESRCH: no such process. */
export function pidfdOpen(pid: number): OwnedFd {
  const r = Number(sys.syscall3(SYS_pidfd_open, pid, 0, 0));
  if (r < 0) throw new SysError('pidfd_open', `pid ${pid}`, lastErrno());
  return new OwnedFd(r, `pidfd of ${pid}`);
}

/** How the daemon knows the process behind a peer's pidfd is the peer. */
export type PeerProof = 'SO_PEERPIDFD' | 'holds-socket' | 'sent-record';

export interface PeerPidfd {
  pidfd: OwnedFd;
  proof: PeerProof;
}

/**
 * The pidfd of the process on the other end of a Unix socket — the one that
 * connected, alive now — given `pid` (SO_PEERCRED: who connected) and
 * `senderPid` (SCM_CREDENTIALS of the record at hand: who sent it). The two
 * must be the same process: a record sent by another one (a child the
 * connecting process forked, say) is refused.
 *
 * SO_PEERPIDFD (Linux 6.5) names the process that connected, with no pid in
 * between. Older kernels (Debian 12's 6.1) have only the SO_PEERCRED pid, a
 * number the connecting process may have left behind — exited, and the pid
 * given to someone else. Then the pidfd is opened from the pid and accepted
 * only with a proof that its process is the peer:
 *   holds-socket  it holds the peer end of this socket (that end's inode
 *                 from sock_diag, among its /proc/<pid>/fd), and is alive
 *                 after the look, so the number could not have changed hands
 *                 during it;
 *   sent-record   where sock_diag cannot tell (the connection lives in
 *                 another network namespace, or netlink is not allowed):
 *                 the kernel's SCM_CREDENTIALS of the record says this pid
 *                 sent it, the process behind the pidfd started before the
 *                 connection was accepted (`acceptedAt`, boottimeNs(); a process that took
 *                 the pid later is refused), and it is alive once the pidfd
 *                 is open. What is left: a pid changing hands between the
 *                 connect and the accept — a busy daemon's backlog — which
 *                 takes control of pid allocation (root) to aim.
 *
 * Throws SysError ESRCH when the peer has exited, or cannot be shown to be
 * the process behind the pid, or is not the sender.
 */
export async function peerPidfd(socketFd: number, pid: number, senderPid?: number, acceptedAt?: bigint): Promise<PeerPidfd> {
  if (senderPid === 0) throw new SysError('SCM_CREDENTIALS', `the record from the peer of pid ${pid}: no sender named`, ESRCH);
  if (senderPid !== undefined && senderPid !== pid) {
    throw new SysError('SCM_CREDENTIALS', `the record from pid ${senderPid}, not from the process that connected (pid ${pid})`, ESRCH);
  }
  const out = Buffer.alloc(4);
  const len = Buffer.alloc(4);
  len.writeUInt32LE(4, 0);
  const r = libc.getsockopt(socketFd, SOL_SOCKET, SO_PEERPIDFD, out, len) as number;
  if (r === 0) {
    const pidfd = new OwnedFd(out.readInt32LE(0), `pidfd of ${pid}`);
    if (pidfdExited(pidfd.fd)) {
      pidfd.closeSync();
      throw new SysError('SO_PEERPIDFD', `peer pid ${pid} (it has exited)`, ESRCH);
    }
    return { pidfd, proof: 'SO_PEERPIDFD' };
  }
  const errno = lastErrno();
  // A kernel that has SO_PEERPIDFD says EINVAL (6.5-6.8) or ESRCH when the peer has no task left: it exited.
  if (errno === EINVAL || errno === ESRCH) throw new SysError('SO_PEERPIDFD', `peer pid ${pid} (it has exited)`, ESRCH);
  if (errno !== ENOPROTOOPT) throw new SysError('getsockopt(SO_PEERPIDFD)', `pid ${pid}`, errno);
  let peerInode: number | undefined;
  try {
    peerInode = unixPeerInode(socketFd);
  } catch (e) {
    // Not in this network namespace (ENOENT), or no netlink here (a sandbox): the weaker proof.
    if (!(e instanceof SysError) || senderPid === undefined) throw e;
  }
  let pidfd: OwnedFd;
  try {
    pidfd = pidfdOpen(pid);
  } catch (e) {
    if (e instanceof SysError && e.code === 'ESRCH') throw new SysError('pidfd_open', `peer pid ${pid} (it has exited)`, ESRCH);
    throw e;
  }
  try {
    if (peerInode !== undefined && !(await processHoldsSocket(pid, peerInode))) {
      throw new SysError('pidfd_open', `peer pid ${pid} (it exited, and the pid now names a process that does not hold the connection)`, ESRCH);
    }
    if (peerInode === undefined && acceptedAt !== undefined && !(await startedBefore(pid, acceptedAt))) {
      throw new SysError('pidfd_open', `peer pid ${pid} (it exited, and the pid now names a process started after the connection)`, ESRCH);
    }
    if (pidfdExited(pidfd.fd)) throw new SysError('pidfd_open', `peer pid ${pid} (it has exited)`, ESRCH);
  } catch (e) {
    pidfd.closeSync();
    throw e;
  }
  return { pidfd, proof: peerInode !== undefined ? 'holds-socket' : 'sent-record' };
}

/**
 * Whether process `pid` started no later than `at` (boottimeNs()), to the
 * 10 ms tick of /proc/<pid>/stat's start time (the kernel rounds it down: a
 * process started in the tick of `at` counts as before). False when it
 * cannot be read.
 */
async function startedBefore(pid: number, at: bigint): Promise<boolean> {
  try {
    const stat = await readFile(`/proc/${pid}/stat`, 'utf8');
    // Fields after the command (which may hold spaces and parentheses): state is field 3, starttime field 22.
    const startTicks = stat.slice(stat.lastIndexOf(')') + 2).split(' ')[22 - 3];
    return /^\d+$/.test(startTicks) && BigInt(startTicks) * NS_PER_TICK <= at;
  } catch {
    return false;
  }
}
const NS_PER_TICK = 10_000_000n; // USER_HZ = 100 on Linux

/** clock_gettime(CLOCK_BOOTTIME) in ns: the clock of a process's start time in /proc/<pid>/stat. */
export function boottimeNs(): bigint {
  const ts = Buffer.alloc(16);
  if ((sys.clockGettime(CLOCK_BOOTTIME, ts) as number) < 0) throw new SysError('clock_gettime(CLOCK_BOOTTIME)', 'this process', lastErrno());
  return ts.readBigInt64LE(0) * 1_000_000_000n + ts.readBigInt64LE(8);
}
const CLOCK_BOOTTIME = 7;

/** Scans of a process's fds running at once: the rest wait, so attaching VMMs cannot fill the libuv pool. */
const MAX_SCANS = 2;
let scans = 0;
const waiting: (() => void)[] = [];

/** Whether /proc/<pid>/fd has an fd on the socket of inode `inode`. At most 65,536 fds are looked at. */
async function processHoldsSocket(pid: number, inode: number): Promise<boolean> {
  if (scans >= MAX_SCANS) await new Promise<void>((r) => waiting.push(r));
  scans++;
  try {
    return await scanForSocket(pid, inode);
  } finally {
    scans--;
    waiting.shift()?.();
  }
}

async function scanForSocket(pid: number, inode: number): Promise<boolean> {
  const dir = `/proc/${pid}/fd`;
  let names: string[];
  try {
    names = await readdir(dir);
  } catch {
    return false;
  }
  const target = `socket:[${inode}]`;
  for (let i = 0; i < Math.min(names.length, 65536); i += 256) {
    const links = await Promise.all(names.slice(i, i + 256).map((n) => readlink(`${dir}/${n}`).catch(() => '')));
    if (links.includes(target)) return true;
  }
  return false;
}

/** Whether the process of `pidfd` has exited (a pidfd polls readable then). Does not block. */
export function pidfdExited(pidfd: number): boolean {
  const pfd = Buffer.alloc(8);
  pfd.writeInt32LE(pidfd, 0);
  pfd.writeInt16LE(POLLIN, 4);
  let n: number;
  // poll is never restarted after a signal handler (signal(7)): a profiler's SIGPROF or a SIGCHLD would
  // otherwise fail an ATTACH with EINTR (seen under the bench's --profile).
  do n = sys.poll(pfd, 1, 0) as number;
  while (n < 0 && lastErrno() === EINTR);
  if (n < 0) throw new SysError('poll', `pidfd ${pidfd}`, lastErrno());
  return n > 0 && (pfd.readInt16LE(6) & (POLLIN | POLLHUP | POLLERR)) !== 0;
}

/**
 * The inode of the socket at the other end of the connected Unix socket
 * `socketFd`: sock_diag (NETLINK_SOCK_DIAG, unix_diag with UDIAG_SHOW_PEER)
 * asked about this end's inode. ENOENT when the kernel has no peer for it.
 */
export function unixPeerInode(socketFd: number): number {
  const ino = fstatSync(socketFd).ino;
  const nl = sys.socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_SOCK_DIAG) as number;
  if (nl < 0) throw new SysError('socket(AF_NETLINK, NETLINK_SOCK_DIAG)', 'unix_diag', lastErrno());
  try {
    // struct nlmsghdr (16) + struct unix_diag_req (24)
    const req = Buffer.alloc(40);
    req.writeUInt32LE(40, 0);
    req.writeUInt16LE(SOCK_DIAG_BY_FAMILY, 4);
    req.writeUInt16LE(NLM_F_REQUEST, 6);
    req.writeUInt32LE(1, 8);
    req.writeUInt8(AF_UNIX, 16);
    req.writeUInt32LE(0xffffffff, 20); // udiag_states: any
    req.writeUInt32LE(Number(ino), 24);
    req.writeUInt32LE(UDIAG_SHOW_PEER, 28);
    req.writeUInt32LE(0xffffffff, 32); // udiag_cookie: INET_DIAG_NOCOOKIE
    req.writeUInt32LE(0xffffffff, 36);
    let sent: number;
    do sent = sys.send(nl, req, req.length, 0) as number;
    while (sent < 0 && lastErrno() === EINTR);
    if (sent < 0) throw new SysError('send(SOCK_DIAG_BY_FAMILY)', `socket inode ${ino}`, lastErrno());
    const res = Buffer.alloc(8192);
    let n: number;
    do n = sys.recv(nl, res, res.length, 0) as number;
    while (n < 0 && lastErrno() === EINTR);
    if (n < 0) throw new SysError('recv(SOCK_DIAG_BY_FAMILY)', `socket inode ${ino}`, lastErrno());
    for (let off = 0; off + 16 <= n; ) {
      const msgLen = res.readUInt32LE(off);
      const type = res.readUInt16LE(off + 4);
      if (msgLen < 16 || off + msgLen > n) break;
      if (type === NLMSG_ERROR) {
        const err = -res.readInt32LE(off + 16);
        throw new SysError('SOCK_DIAG_BY_FAMILY(unix_diag)', `socket inode ${ino}`, err || ENOENT);
      }
      if (type === SOCK_DIAG_BY_FAMILY) {
        // struct unix_diag_msg (16 bytes), then netlink attributes.
        for (let a = off + 32; a + 4 <= off + msgLen; ) {
          const aLen = res.readUInt16LE(a);
          const aType = res.readUInt16LE(a + 2);
          if (aLen < 4) break;
          if (aType === UNIX_DIAG_PEER && aLen >= 8) {
            const peer = res.readUInt32LE(a + 4);
            if (peer !== 0) return peer;
          }
          a += (aLen + 3) & ~3;
        }
      }
      off += (msgLen + 3) & ~3;
    }
    throw new SysError('SOCK_DIAG_BY_FAMILY(unix_diag)', `socket inode ${ino}: no peer`, ENOENT);
  } finally {
    closeSync(nl);
  }
}

/**
 * Calls `onExit` once when process `pid` exits (a pidfd of it, polled on the
 * event loop); returns the cancel, which closes the pidfd. A pid that names
 * no process calls back on the next turn. For hints only (a stray group's
 * holder): the pid may have changed hands before the pidfd was opened, and a
 * wrong guess costs one early retry.
 */
export function watchProcessExit(pid: number, onExit: () => void): () => void {
  let pidfd: OwnedFd;
  try {
    pidfd = pidfdOpen(pid);
  } catch {
    const t = setImmediate(onExit);
    return () => clearImmediate(t);
  }
  let done = false;
  const stop = () => {
    if (done) return;
    done = true;
    watch.close();
    pidfd.closeSync();
  };
  const watch = watchReadable(pidfd.fd, () => {
    stop();
    onExit();
  });
  return stop;
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
 * prlimit(2) on RLIMIT_MEMLOCK of another process, raising only: the soft
 * limit becomes at least `bytes`, the hard limit at least the new soft one
 * (raising a hard limit needs CAP_SYS_RESOURCE: EPERM without it). A limit
 * already at or above `bytes` is left as it is — the process may have been
 * given more on purpose — and then nothing is written. Returns the limits
 * before.
 */
export function setMemlockLimit(pid: number, bytes: bigint): Rlimit {
  const current = getMemlockLimit(pid);
  if (current.soft >= bytes) return current;
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
