/**
 * What the fuzz tests need beyond src/kernel/unix.ts, which refuses to send
 * anything a well-behaved peer would not: records over 4096 bytes, more than
 * 8 fds on one record, a half-close (shutdown(SHUT_WR)), and fds of odd kinds
 * (pipes, memfds, eventfds) to attach. Test-only; x86_64 layouts as in
 * src/kernel/unix.ts.
 */
import koffi from 'koffi';
import { closeSync, openSync } from 'node:fs';
import { SeqpacketSocket } from '../../src/kernel';

const lib = koffi.load('libc.so.6');
const sys = {
  sendmsg: lib.func('intptr_t sendmsg(int fd, void *msg, int flags)'),
  shutdown: lib.func('int shutdown(int fd, int how)'),
  pipe2: lib.func('int pipe2(_Out_ int *fds, int flags)'),
  memfdCreate: lib.func('int memfd_create(const char *name, unsigned int flags)'),
  eventfd: lib.func('int eventfd(unsigned int initval, int flags)'),
};

const SOL_SOCKET = 1;
const SCM_RIGHTS = 1;
const MSG_DONTWAIT = 0x40;
const MSG_NOSIGNAL = 0x4000;
const O_CLOEXEC = 0o2000000;
const SHUT_WR = 1;
export const EAGAIN = 11;

/** The kernel's SCM_MAX_FD: the most fds one sendmsg may carry. */
export const SCM_MAX_FD = 253;
/** Bigger records than this are not worth sending: the daemon reads at most 4097 bytes. */
export const RAW_MAX_RECORD = 65536;

const align8 = (n: number) => (n + 7) & ~7;
const OFF_IOV = 56;
const OFF_CTL = 72;
const CTL_SPACE = 16 + align8(4 * SCM_MAX_FD);
const OFF_DATA = OFF_CTL + CTL_SPACE;
const BLOCK = OFF_DATA + RAW_MAX_RECORD;

let block: { ptr: unknown; base: bigint; dv: DataView; u8: Uint8Array } | undefined;
function blk() {
  if (!block) {
    const ptr = koffi.alloc('uint8_t', BLOCK);
    const base = BigInt(koffi.address(ptr) as bigint | number);
    const ab = koffi.view(ptr, BLOCK);
    block = { ptr, base, dv: new DataView(ab), u8: new Uint8Array(ab) };
  }
  return block;
}

/**
 * sendmsg(2) of `data` with `fds` attached, unchecked. Returns 0 or the errno
 * (EAGAIN when the peer's queue is full, EPIPE/ECONNRESET once it closed).
 */
export function rawSend(sockFd: number, data: Uint8Array, fds: readonly number[] = []): number {
  if (data.length > RAW_MAX_RECORD) throw new RangeError(`rawSend: ${data.length} bytes > ${RAW_MAX_RECORD}`);
  if (fds.length > SCM_MAX_FD) throw new RangeError(`rawSend: ${fds.length} fds > ${SCM_MAX_FD}`);
  const b = blk();
  const dv = b.dv;
  b.u8.set(data, OFF_DATA);
  dv.setBigUint64(0, 0n, true); // msg_name
  dv.setUint32(8, 0, true); // msg_namelen
  dv.setBigUint64(16, b.base + BigInt(OFF_IOV), true);
  dv.setBigUint64(24, 1n, true);
  dv.setBigUint64(OFF_IOV, b.base + BigInt(OFF_DATA), true);
  dv.setBigUint64(OFF_IOV + 8, BigInt(data.length), true);
  if (fds.length) {
    dv.setBigUint64(32, b.base + BigInt(OFF_CTL), true);
    dv.setBigUint64(40, BigInt(16 + align8(4 * fds.length)), true);
    dv.setBigUint64(OFF_CTL, BigInt(16 + 4 * fds.length), true);
    dv.setInt32(OFF_CTL + 8, SOL_SOCKET, true);
    dv.setInt32(OFF_CTL + 12, SCM_RIGHTS, true);
    fds.forEach((fd, i) => dv.setInt32(OFF_CTL + 16 + 4 * i, fd, true));
  } else {
    dv.setBigUint64(32, 0n, true);
    dv.setBigUint64(40, 0n, true);
  }
  dv.setInt32(48, 0, true);
  for (;;) {
    const n = Number(sys.sendmsg(sockFd, b.ptr, MSG_NOSIGNAL | MSG_DONTWAIT));
    if (n >= 0) return 0;
    const errno = koffi.errno();
    if (errno !== 4 /* EINTR */) return errno;
  }
}

/** shutdown(SHUT_WR): the peer reads end of stream, this side can still read. */
export function shutdownWrite(sockFd: number): void {
  sys.shutdown(sockFd, SHUT_WR);
}

/** Kinds of fd a fuzzing peer attaches to its records. */
export const FD_KINDS = ['pipe-read', 'pipe-write', 'dev-null', 'memfd', 'eventfd', 'socketpair', 'handoff-conn', 'dev-kvm', 'directory'] as const;
export type FdKindName = (typeof FD_KINDS)[number];

/**
 * Opens one fd of each kind asked for (numbers the caller closes with
 * `closeAll`). `handoffPath` is used for 'handoff-conn': a connection to the
 * daemon's own handoff socket, sent back to it.
 */
export class FdFactory {
  readonly #open: number[] = [];
  readonly #handoffPath: string;

  constructor(handoffPath: string) {
    this.#handoffPath = handoffPath;
  }

  make(kind: FdKindName): number {
    let fds: number[];
    let keep: number;
    switch (kind) {
      case 'pipe-read':
      case 'pipe-write': {
        const p = [0, 0];
        if ((sys.pipe2(p, O_CLOEXEC) as number) < 0) throw new Error(`pipe2: errno ${koffi.errno()}`);
        fds = p;
        keep = kind === 'pipe-read' ? p[0] : p[1];
        break;
      }
      case 'dev-null':
        keep = openSync('/dev/null', 'r+');
        fds = [keep];
        break;
      case 'memfd': {
        keep = sys.memfdCreate('kvmvfio-fuzz', 1 /* MFD_CLOEXEC */) as number;
        if (keep < 0) throw new Error(`memfd_create: errno ${koffi.errno()}`);
        fds = [keep];
        break;
      }
      case 'eventfd':
        keep = sys.eventfd(0, O_CLOEXEC) as number;
        if (keep < 0) throw new Error(`eventfd: errno ${koffi.errno()}`);
        fds = [keep];
        break;
      case 'socketpair': {
        const [a, b] = SeqpacketSocket.pair('fuzz socketpair');
        fds = [a.release(), b.release()];
        keep = fds[0];
        break;
      }
      case 'handoff-conn':
        keep = SeqpacketSocket.connect(this.#handoffPath, true).release();
        fds = [keep];
        break;
      case 'dev-kvm':
        keep = openSync('/dev/kvm', 'r');
        fds = [keep];
        break;
      case 'directory':
        keep = openSync('/', 'r');
        fds = [keep];
        break;
    }
    this.#open.push(...fds);
    return keep;
  }

  get openCount(): number {
    return this.#open.length;
  }

  closeAll(): void {
    for (const fd of this.#open.splice(0)) {
      try {
        closeSync(fd);
      } catch {
        /* already gone */
      }
    }
  }
}
