/**
 * AF_UNIX SOCK_SEQPACKET sockets with SCM_RIGHTS, through koffi: what the
 * handoff session runs on. One record per message; fds ride on the record
 * that names them. Receiving uses MSG_CMSG_CLOEXEC and reports MSG_CTRUNC /
 * MSG_TRUNC so the caller can treat them as errors.
 *
 * x86_64 layouts: msghdr {name@0 namelen@8 iov@16 iovlen@24 control@32
 * controllen@40 flags@48} = 56 bytes; iovec {base@0 len@8}; cmsghdr {len@0
 * (size_t) level@8 type@12 data@16}; CMSG_SPACE(n) = 16 + align8(n).
 */
import koffi from 'koffi';
import { SysError } from './errors';
import { OwnedFd } from './fd';
import { lastErrno, lib } from './libc';

const sys = {
  socket: lib.func('int socket(int domain, int type, int protocol)'),
  bind: lib.func('int bind(int fd, const void *addr, uint32_t len)'),
  listen: lib.func('int listen(int fd, int backlog)'),
  accept4: lib.func('int accept4(int fd, void *addr, void *len, int flags)'),
  connect: lib.func('int connect(int fd, const void *addr, uint32_t len)'),
  sendmsg: lib.func('intptr_t sendmsg(int fd, void *msg, int flags)'),
  recvmsg: lib.func('intptr_t recvmsg(int fd, void *msg, int flags)'),
  socketpair: lib.func('int socketpair(int domain, int type, int protocol, _Out_ int *sv)'),
  shutdown: lib.func('int shutdown(int fd, int how)'),
  setsockopt: lib.func('int setsockopt(int fd, int level, int name, const void *val, uint32_t len)'),
  poll: lib.func('int poll(void *fds, uint64_t nfds, int timeout)'),
  recv: lib.func('intptr_t recv(int fd, void *buf, size_t len, int flags)'),
  getsockopt: lib.func('int getsockopt(int fd, int level, int name, void *val, void *len)'),
};

const AF_UNIX = 1;
const SOCK_STREAM = 1;
const SOCK_SEQPACKET = 5;
const SO_TYPE = 3;
const SO_DOMAIN = 39;
const SOCK_NONBLOCK = 0o4000;
const SOCK_CLOEXEC = 0o2000000;
const SOL_SOCKET = 1;
const SCM_RIGHTS = 1;
const SCM_CREDENTIALS = 2;
const SO_PASSCRED = 16;
const MSG_DONTWAIT = 0x40;
const MSG_NOSIGNAL = 0x4000;
const MSG_CMSG_CLOEXEC = 0x40000000;
const MSG_TRUNC = 0x20;
const MSG_CTRUNC = 0x8;
const EAGAIN = 11;
const EINTR = 4;

/** The largest record either side sends or accepts, and the most fds on one record. */
export const MAX_RECORD = 4096;
export const MAX_FDS = 8;

const align8 = (n: number) => (n + 7) & ~7;
// Room for SCM_RIGHTS (MAX_FDS ints) and SCM_CREDENTIALS (struct ucred, 12 bytes).
const CTL_SPACE = 16 + align8(4 * MAX_FDS) + 16 + align8(12);
const OFF_IOV = 56;
const OFF_CTL = 72;
const OFF_DATA = OFF_CTL + CTL_SPACE;
// One extra byte beyond MAX_RECORD so an oversize record shows as MSG_TRUNC.
const BLOCK = OFF_DATA + MAX_RECORD + 1;

/** One msghdr, iovec, control and data area in memory that does not move. */
class MsgBlock {
  readonly ptr = koffi.alloc('uint8_t', BLOCK);
  readonly base = BigInt(koffi.address(this.ptr) as bigint | number);
  readonly dv: DataView;
  readonly u8: Uint8Array;

  constructor() {
    const ab = koffi.view(this.ptr, BLOCK);
    this.dv = new DataView(ab);
    this.u8 = new Uint8Array(ab);
    this.dv.setBigUint64(16, this.base + BigInt(OFF_IOV), true);
    this.dv.setBigUint64(24, 1n, true);
    this.dv.setBigUint64(OFF_IOV, this.base + BigInt(OFF_DATA), true);
  }
}

// The event loop is single-threaded: one block serves every socket.
let block: MsgBlock | undefined;
const blk = () => (block ??= new MsgBlock());

function sockaddr(path: string): Buffer {
  const b = Buffer.alloc(110);
  b.writeUInt16LE(AF_UNIX, 0);
  const n = Buffer.byteLength(path);
  if (n > 107) throw new SysError('bind', path, 36 /* ENAMETOOLONG */);
  b.write(path, 2);
  return b.subarray(0, 2 + n + 1);
}

function setPassCred(fd: number, label: string): void {
  const one = Buffer.alloc(4);
  one.writeInt32LE(1, 0);
  if ((sys.setsockopt(fd, SOL_SOCKET, SO_PASSCRED, one, 4) as number) < 0) throw new SysError('setsockopt(SO_PASSCRED)', label, lastErrno());
}

export interface Received {
  data: Buffer;
  /** Owned by the caller now; close what you do not keep. */
  fds: OwnedFd[];
  /** The kernel dropped fds (MSG_CTRUNC) or cut the record (MSG_TRUNC). */
  truncated: boolean;
  /**
   * SCM_CREDENTIALS, on a socket with passCredentials(): the process that
   * sent this record, as the kernel saw it at sendmsg (its pid numbered in
   * this process's pid namespace at recvmsg).
   */
  sender?: { pid: number; uid: number; gid: number };
}

/**
 * sendmsg(2) of `data` with `fds` as SCM_RIGHTS, without blocking, retried on
 * EINTR; the bytes sent. Throws SysError (EAGAIN when the peer's queue is
 * full: then the fds were not sent either; EPIPE when it has closed).
 */
function sendRecord(fd: number, label: string, data: Uint8Array, fds: readonly number[]): number {
    if (fds.length > MAX_FDS) throw new RangeError(`${fds.length} fds > ${MAX_FDS}`);
    const b = blk();
    const dv = b.dv;
    b.u8.set(data, OFF_DATA);
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
      const n = Number(sys.sendmsg(fd, b.ptr, MSG_NOSIGNAL | MSG_DONTWAIT));
      if (n >= 0) return n;
      const errno = lastErrno();
      if (errno !== EINTR) throw new SysError('sendmsg', label, errno);
    }
}

export class SeqpacketSocket {
  readonly #fd: OwnedFd;
  readonly label: string;

  constructor(fd: OwnedFd, label: string) {
    this.#fd = fd;
    this.label = label;
  }

  get fd(): number {
    return this.#fd.fd;
  }

  get isOpen(): boolean {
    return this.#fd.isOpen;
  }

  /** A connected, non-blocking pair (tests, and in-process peers). */
  static pair(label = 'socketpair'): [SeqpacketSocket, SeqpacketSocket] {
    const sv = [0, 0];
    if ((sys.socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv) as number) < 0) {
      throw new SysError('socketpair', label, lastErrno());
    }
    return [new SeqpacketSocket(new OwnedFd(sv[0], label), label), new SeqpacketSocket(new OwnedFd(sv[1], label), label)];
  }

  /** connect(2) to a SOCK_SEQPACKET listener. `nonblocking` sockets suit the event loop. */
  static connect(path: string, nonblocking = false): SeqpacketSocket {
    const s = sys.socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | (nonblocking ? SOCK_NONBLOCK : 0), 0) as number;
    if (s < 0) throw new SysError('socket(AF_UNIX, SOCK_SEQPACKET)', path, lastErrno());
    const fd = new OwnedFd(s, path);
    const addr = sockaddr(path);
    if ((sys.connect(s, addr, addr.length) as number) < 0) {
      const e = new SysError('connect', path, lastErrno());
      fd.closeSync();
      throw e;
    }
    return new SeqpacketSocket(fd, path);
  }

  /** sendmsg(2) of one record with `fds` as SCM_RIGHTS. Throws SysError (EAGAIN when the peer's queue is full). */
  send(data: Uint8Array, fds: readonly number[] = []): void {
    if (data.length > MAX_RECORD) throw new RangeError(`record of ${data.length} bytes > ${MAX_RECORD}`);
    sendRecord(this.fd, this.label, data, fds);
  }

  /**
   * recvmsg(2) of one record, without blocking. Returns null when nothing is
   * queued (EAGAIN), a Received with empty data at end of stream.
   */
  recv(): Received | null {
    const b = blk();
    const dv = b.dv;
    dv.setBigUint64(OFF_IOV + 8, BigInt(MAX_RECORD + 1), true);
    dv.setBigUint64(32, b.base + BigInt(OFF_CTL), true);
    dv.setBigUint64(40, BigInt(CTL_SPACE), true);
    dv.setInt32(48, 0, true);
    let n: number;
    for (;;) {
      n = Number(sys.recvmsg(this.fd, b.ptr, MSG_CMSG_CLOEXEC | MSG_DONTWAIT));
      if (n >= 0) break;
      const errno = lastErrno();
      if (errno === EAGAIN) return null;
      if (errno !== EINTR) throw new SysError('recvmsg', this.label, errno);
    }
    const fds: OwnedFd[] = [];
    let sender: Received['sender'];
    const ctlLen = Number(dv.getBigUint64(40, true));
    let off = 0;
    while (off + 16 <= ctlLen) {
      const len = Number(dv.getBigUint64(OFF_CTL + off, true));
      if (len < 16 || off + len > ctlLen) break;
      const level = dv.getInt32(OFF_CTL + off + 8, true);
      const type = dv.getInt32(OFF_CTL + off + 12, true);
      if (level === SOL_SOCKET && type === SCM_RIGHTS) {
        for (let i = 0; i < (len - 16) / 4; i++) fds.push(new OwnedFd(dv.getInt32(OFF_CTL + off + 16 + 4 * i, true), `fd from ${this.label}`));
      } else if (level === SOL_SOCKET && type === SCM_CREDENTIALS && len >= 28) {
        sender = { pid: dv.getInt32(OFF_CTL + off + 16, true), uid: dv.getUint32(OFF_CTL + off + 20, true), gid: dv.getUint32(OFF_CTL + off + 24, true) };
      }
      off += align8(len);
    }
    const flags = dv.getInt32(48, true);
    const data = Buffer.from(b.u8.subarray(OFF_DATA, OFF_DATA + Math.min(n, MAX_RECORD + 1)));
    return { data, fds, truncated: (flags & (MSG_CTRUNC | MSG_TRUNC)) !== 0, ...(sender ? { sender } : {}) };
  }

  /**
   * SO_PASSCRED: from now on every record received carries its sender's
   * credentials (Received.sender), stamped by the kernel — records already
   * queued too, since the kernel keeps the sender with each record.
   */
  passCredentials(): void {
    setPassCred(this.fd, this.label);
  }

  /** shutdown(SHUT_RDWR): the peer sees end of stream even while other copies of this fd live. */
  shutdown(): void {
    if (this.#fd.isOpen) sys.shutdown(this.fd, 2);
  }

  /** Hands the fd on (to an exec'd child, say); this object forgets it. */
  release(): number {
    return this.#fd.release();
  }

  close(): Promise<void> {
    return this.#fd.close();
  }

  closeSync(): void {
    this.#fd.closeSync();
  }
}

/** What a socket fd is: its family and type (getsockopt SO_DOMAIN, SO_TYPE). */
export interface SocketKind {
  /** AF_UNIX is 1. */
  domain: number;
  /** SOCK_STREAM 1, SOCK_DGRAM 2, SOCK_SEQPACKET 5. */
  type: number;
}

function intSockopt(fd: number, name: number, label: string): number {
  const val = Buffer.alloc(4);
  const len = Buffer.alloc(4);
  len.writeUInt32LE(4, 0);
  if ((sys.getsockopt(fd, SOL_SOCKET, name, val, len) as number) < 0) throw new SysError(`getsockopt(${name === SO_TYPE ? 'SO_TYPE' : 'SO_DOMAIN'})`, label, lastErrno());
  return val.readInt32LE(0);
}

/** SO_DOMAIN and SO_TYPE of `fd`; ENOTSOCK when it is no socket. */
export function socketKind(fd: number, label = `fd ${fd}`): SocketKind {
  return { domain: intSockopt(fd, SO_DOMAIN, label), type: intSockopt(fd, SO_TYPE, label) };
}

/**
 * One end of a connected AF_UNIX SOCK_STREAM socket, for a byte stream that
 * may carry fds with SCM_RIGHTS: a QEMU monitor (QMP) on one end of a
 * socketpair. Reads never take fds (recv(2) without ancillary space: the
 * kernel closes any the peer sent), so a peer cannot fill this process's fd
 * table. Neither call blocks.
 */
export class StreamSocket {
  readonly #fd: OwnedFd;
  readonly label: string;

  constructor(fd: OwnedFd, label: string) {
    this.#fd = fd;
    this.label = label;
  }

  /**
   * socketpair(AF_UNIX, SOCK_STREAM), close-on-exec, blocking: the two ends
   * as owned fds, one to keep, one to give away (each end is its own open
   * file, so the receiver's O_NONBLOCK is its own business).
   */
  static pair(label = 'stream socketpair'): [OwnedFd, OwnedFd] {
    const sv = [0, 0];
    if ((sys.socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) as number) < 0) throw new SysError('socketpair(AF_UNIX, SOCK_STREAM)', label, lastErrno());
    return [new OwnedFd(sv[0], label), new OwnedFd(sv[1], label)];
  }

  get fd(): number {
    return this.#fd.fd;
  }

  get isOpen(): boolean {
    return this.#fd.isOpen;
  }

  /**
   * sendmsg(2) of `data`, with `fds` as SCM_RIGHTS on its first byte,
   * without blocking. Returns the bytes the kernel took: fewer than
   * `data.length` when the socket's buffer is (nearly) full, 0 when it is
   * full (EAGAIN; then the fds were not sent either). EPIPE when the peer
   * has closed its end.
   */
  send(data: Uint8Array, fds: readonly number[] = []): number {
    if (data.length === 0 || data.length > MAX_RECORD) throw new RangeError(`a stream write of ${data.length} bytes (1 to ${MAX_RECORD})`);
    try {
      return sendRecord(this.fd, this.label, data, fds);
    } catch (e) {
      if (e instanceof SysError && e.code === 'EAGAIN') return 0;
      throw e;
    }
  }

  /**
   * recv(2) of what is there, up to `max` bytes, without blocking: null when
   * nothing is (EAGAIN), an empty buffer at end of stream.
   */
  recv(max = 65536): Buffer | null {
    const buf = Buffer.allocUnsafe(max);
    for (;;) {
      const n = Number(sys.recv(this.fd, buf, max, MSG_DONTWAIT));
      if (n >= 0) return buf.subarray(0, n);
      const errno = lastErrno();
      if (errno === EAGAIN) return null;
      if (errno !== EINTR) throw new SysError('recv', this.label, errno);
    }
  }

  /** shutdown(SHUT_RDWR): the peer sees end of stream even while other copies of this fd live. */
  shutdown(): void {
    if (this.#fd.isOpen) sys.shutdown(this.fd, 2);
  }

  closeSync(): void {
    this.#fd.closeSync();
  }
}

/**
 * A bound AF_UNIX SOCK_DGRAM socket, read with the same record API (one
 * datagram per recv). Tests use it to stand in for systemd's NOTIFY_SOCKET.
 */
export function bindDatagramSocket(path: string): SeqpacketSocket {
  const SOCK_DGRAM = 2;
  const s = sys.socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0) as number;
  if (s < 0) throw new SysError('socket(AF_UNIX, SOCK_DGRAM)', path, lastErrno());
  const fd = new OwnedFd(s, path);
  const addr = sockaddr(path);
  if ((sys.bind(s, addr, addr.length) as number) < 0) {
    const e = new SysError('bind', path, lastErrno());
    fd.closeSync();
    throw e;
  }
  return new SeqpacketSocket(fd, path);
}

/** A listening SOCK_SEQPACKET socket; accept() never blocks. */
export class SeqpacketListener {
  readonly #fd: OwnedFd;
  readonly path: string;

  private constructor(fd: OwnedFd, path: string) {
    this.#fd = fd;
    this.path = path;
  }

  /**
   * socket + bind + listen. The caller removes a stale file first and sets
   * the mode after. `stream` makes a SOCK_STREAM listener instead (tests
   * that play systemd hold one without accepting on it).
   */
  static listen(path: string, backlog = 128, stream = false): SeqpacketListener {
    const s = sys.socket(AF_UNIX, (stream ? 1 : SOCK_SEQPACKET) | SOCK_CLOEXEC | SOCK_NONBLOCK, 0) as number;
    if (s < 0) throw new SysError('socket(AF_UNIX, SOCK_SEQPACKET)', path, lastErrno());
    const fd = new OwnedFd(s, path);
    const addr = sockaddr(path);
    if ((sys.bind(s, addr, addr.length) as number) < 0 || (sys.listen(s, backlog) as number) < 0) {
      const e = new SysError('bind/listen', path, lastErrno());
      fd.closeSync();
      throw e;
    }
    return new SeqpacketListener(fd, path);
  }

  /** Takes over an already listening socket (socket activation). */
  static fromFd(fd: OwnedFd, path: string): SeqpacketListener {
    return new SeqpacketListener(fd, path);
  }

  get fd(): number {
    return this.#fd.fd;
  }

  /**
   * SO_PASSCRED on the listener: records sent on a connection before it is
   * accepted, or between its accept and the accepted socket's own
   * SO_PASSCRED, carry their sender too (the accepted socket inherits it).
   */
  passCredentials(): void {
    setPassCred(this.fd, this.path);
  }

  /** accept4(2), non-blocking and close-on-exec. null when no connection waits. */
  accept(): SeqpacketSocket | null {
    for (;;) {
      const c = sys.accept4(this.fd, null, null, SOCK_CLOEXEC | SOCK_NONBLOCK) as number;
      if (c >= 0) return new SeqpacketSocket(new OwnedFd(c, `${this.path} connection`), `${this.path} connection`);
      const errno = lastErrno();
      if (errno === EAGAIN || errno === 103 /* ECONNABORTED */) return null;
      if (errno !== EINTR) throw new SysError('accept4', this.path, errno);
    }
  }

  close(): Promise<void> {
    return this.#fd.close();
  }
}

// poll(2) events (include/uapi/asm-generic/poll.h); struct pollfd {int fd; short events; short revents} = 8 bytes.
const POLLERR = 0x8;
const POLLHUP = 0x10;
const POLLRDHUP = 0x2000;
const POLLFD = 8;

let pollArea: { ptr: unknown; dv: DataView; capacity: number } | undefined;

/**
 * Which of `fds` (connected stream sockets) have a peer that hung up or shut
 * down its side: one poll(2) with a zero timeout, so it never blocks and
 * registers nothing with the event loop. Returns indexes into `fds`.
 *
 * For sockets the event loop no longer reads (Node's HTTP/2 stops reading a
 * session nghttp2 gave up on), this is how the peer's close is seen at all.
 */
export function peersHungUp(fds: readonly number[]): number[] {
  if (fds.length === 0) return [];
  if (!pollArea || pollArea.capacity < fds.length) {
    const capacity = Math.max(256, 2 ** Math.ceil(Math.log2(fds.length)));
    const ptr = koffi.alloc('uint8_t', capacity * POLLFD);
    pollArea = { ptr, dv: new DataView(koffi.view(ptr, capacity * POLLFD)), capacity };
  }
  const { ptr, dv } = pollArea;
  for (let i = 0; i < fds.length; i++) {
    dv.setInt32(i * POLLFD, fds[i], true);
    dv.setInt16(i * POLLFD + 4, POLLRDHUP, true);
    dv.setInt16(i * POLLFD + 6, 0, true);
  }
  let n: number;
  for (;;) {
    n = sys.poll(ptr, fds.length, 0) as number;
    if (n >= 0) break;
    const errno = lastErrno();
    if (errno !== EINTR) throw new SysError('poll', `${fds.length} sockets`, errno);
  }
  const gone: number[] = [];
  for (let i = 0; i < fds.length && gone.length < n; i++) {
    // POLLNVAL (not an open fd) is not a hang-up: that fd is no socket of the caller's any more.
    if (dv.getInt16(i * POLLFD + 6, true) & (POLLHUP | POLLRDHUP | POLLERR)) gone.push(i);
  }
  return gone;
}

export interface FdWatch {
  close(): void;
}

/**
 * Calls `onReadable` from Node's own event loop whenever `fd` is readable
 * (koffi.node.poll, a uv_poll). The returned watch must be kept referenced
 * (a collected poll handle stops silently) and closed before the fd is.
 * uv_poll sets the fd O_NONBLOCK.
 */
export function watchReadable(fd: number, onReadable: () => void): FdWatch {
  // koffi passes (status, events) although its typings say (events).
  const handle = koffi.node.poll(fd, { readable: true, disconnect: true } as never, (() => onReadable()) as never);
  return { close: () => handle.close() };
}
