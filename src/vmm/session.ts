/**
 * The VMM's side of a handoff session (docs/session-protocol.md). A VMM —
 * unprivileged, with no /dev access — connects, presents its token, receives
 * /dev/kvm (and a VFIO container), makes its VM in its own process and then
 * runs the daemon's requests there: the KVM-VFIO device, and adding and
 * removing VFIO groups, each answered with the kernel's errno.
 */
import { type FdWatch, Iommufd, Kvm, type KvmVfioDevice, type OwnedFd, SeqpacketSocket, SysError, VfioDeviceCdev, type VmFd, peersHungUp, watchReadable } from '../kernel';
import {
  AttachFlag,
  FdKind,
  type Message,
  MsgType,
  ProtocolError,
  REFUSAL_TOKEN_KEPT,
  RESULT_BIT,
  decode,
  encode,
  fieldViolation,
  idToPciAddress,
  isResult,
  manifestViolation,
  typeName,
} from '../protocol/session';

export interface AttachResult {
  vmId: string;
  vmName: string;
  /** RLIMIT_MEMLOCK the daemon gave this process (0: untouched). */
  memlockBytes: number;
  kvm: Kvm;
  container: OwnedFd | null;
  /** Passive attach only: the VM's group fds, by number. */
  groups: Map<number, OwnedFd>;
  /** The device-cdev handoff (passive attach): this VMM's iommufd, and each device's cdev by PCI address. */
  iommufd: OwnedFd | null;
  devices: Map<string, OwnedFd>;
  /** The edition of docs/session-protocol.md both sides follow: 2 unless the daemon predates it. */
  edition: 1 | 2;
}

export class AttachError extends Error {
  readonly errno: number;
  /** Edition 2: the daemon said the refusal neither spent the token nor changed the VM (it may be presented again). */
  readonly tokenKept: boolean;
  constructor(errno: number, message: string, tokenKept = false) {
    super(message);
    this.name = 'AttachError';
    this.errno = errno;
    this.tokenKept = tokenKept;
  }
}

/** The daemon closed the session without answering the ATTACH. */
const NO_RESULT = 104; // ECONNRESET

export interface VmmEvents {
  /** After each request is answered (for logs and tests). */
  onRequest?(type: string, arg: number, errno: number): void;
  /** A group was added to the KVM-VFIO device (answered already); its fd stays owned by the session. */
  onGroupAdded?(group: number, fd: OwnedFd): void;
  /** A device cdev was bound, attached to the session's IOAS and added (answered already); owned by the session. */
  onDeviceAdded?(address: string, device: VfioDeviceCdev, iommufd: Iommufd, ioas: number): void;
  /** SHUTDOWN from the daemon (answered already); the VMM should stop its VM and exit. */
  onShutdown?(reason: string): void;
  /** The session ended (the daemon closed it or broke the protocol). */
  onClosed?(reason: string): void;
}

/** Waits until `sock` is readable, then returns the next record (the socket is non-blocking). */
function nextRecord(sock: SeqpacketSocket): Promise<{ msg: Message; fds: OwnedFd[] }> {
  return new Promise((resolve, reject) => {
    const tryRead = (): boolean => {
      const r = sock.recv();
      if (!r) return false;
      if (r.data.length === 0) {
        for (const f of r.fds) f.closeSync();
        throw new AttachError(NO_RESULT, 'the daemon closed the session');
      }
      if (r.truncated) throw new ProtocolError('truncated record');
      try {
        resolve({ msg: decode(r.data, r.fds.length), fds: r.fds });
      } catch (e) {
        for (const f of r.fds) f.closeSync();
        throw e;
      }
      return true;
    };
    let w: FdWatch | undefined;
    const step = () => {
      try {
        if (tryRead()) w?.close();
      } catch (e) {
        w?.close();
        reject(e);
      }
    };
    w = watchReadable(sock.fd, step);
    step();
  });
}

/**
 * connect(2), non-blocking: EAGAIN means the daemon's accept queue is full
 * for a moment (a flood it is refusing connection by connection); wait a
 * little and try again, for up to 5 s, rather than fail the attach.
 */
async function connectWithRoom(path: string): Promise<SeqpacketSocket> {
  const until = Date.now() + 5000;
  for (let delay = 5; ; delay = Math.min(delay * 2, 100)) {
    try {
      return SeqpacketSocket.connect(path, true);
    } catch (e) {
      if (!(e instanceof SysError && e.code === 'EAGAIN') || Date.now() >= until) throw e;
    }
    await new Promise((r) => setTimeout(r, delay));
  }
}

/**
 * A connection to the handoff socket made before its token is known
 * (VmmSession.preconnect): a VMM that serves VM after VM keeps one ready, so
 * connect(2) and the daemon's accept are behind it when a token comes. The
 * daemon ends a connection that has not attached within its
 * --attach-timeout-ms (10 s by default): one found closed when its token
 * comes is replaced by a fresh connection.
 */
export class HandoffConnection {
  readonly path: string;
  #sock: SeqpacketSocket | undefined;

  /** @internal VmmSession.preconnect makes these. */
  constructor(path: string, sock: SeqpacketSocket) {
    this.path = path;
    this.#sock = sock;
  }

  /** The socket's fd while unused; undefined once taken or closed. */
  get fd(): number | undefined {
    return this.#sock?.fd;
  }

  /** The connected socket, once: this one if the daemon has not closed it, else a new connection. */
  async take(): Promise<SeqpacketSocket> {
    const sock = this.#sock;
    if (!sock) throw new Error(`this handoff connection to ${this.path} was used already`);
    this.#sock = undefined;
    let open: boolean;
    try {
      open = peersHungUp([sock.fd]).length === 0;
    } catch (e) {
      sock.closeSync();
      throw e;
    }
    if (open) return sock;
    sock.closeSync();
    return connectWithRoom(this.path);
  }

  /** Closes it unused. */
  close(): void {
    this.#sock?.closeSync();
    this.#sock = undefined;
  }
}

/** This side numbers its own requests (S6): ATTACH is 1, VM_CREATED 2. */
const VM_CREATED_SEQ = 2;

export class VmmSession {
  readonly sock: SeqpacketSocket;
  readonly attach: AttachResult;
  vm?: VmFd;
  device?: KvmVfioDevice;
  /** Group fds this VMM holds, by group number (kept for DEL and for VFIO use). */
  readonly groups = new Map<number, OwnedFd>();
  /** Device cdevs this VMM holds (the device-cdev handoff), by PCI address: bound, attached, in the KVM-VFIO device. */
  readonly devices = new Map<string, VfioDeviceCdev>();
  #iommufd?: Iommufd;
  #ioas?: number;
  #watch?: FdWatch;
  #events: VmmEvents = {};
  #closed = false;
  /** This side's requests not answered yet, by seq (S6): VM_CREATED's. */
  readonly #outstanding = new Set<number>();

  private constructor(sock: SeqpacketSocket, attach: AttachResult) {
    this.sock = sock;
    this.attach = attach;
  }

  /**
   * Connects to the handoff socket (or takes a connection made earlier by
   * preconnect) and attaches with `token`, asking for
   * edition 2 of the protocol (S12). A daemon older than edition 2 closes the
   * session without a result (the token is then unspent): this attaches
   * again, once, as edition 1. Rejects with AttachError (the daemon's errno
   * and reason) when refused.
   */
  static async connect(to: string | HandoffConnection, token: string, opts: { passive?: boolean; edition?: 1 | 2; qmpFd?: number } = {}): Promise<VmmSession> {
    const edition = opts.edition ?? 2;
    const path = typeof to === 'string' ? to : to.path;
    try {
      return await VmmSession.#attachOnce(typeof to === 'string' ? connectWithRoom(to) : to.take(), token, !!opts.passive, edition, opts.qmpFd);
    } catch (e) {
      const older = e instanceof AttachError && (e.errno === NO_RESULT || (e.errno === 95 /* EOPNOTSUPP */ && e.tokenKept));
      if (edition === 2 && older) return VmmSession.#attachOnce(connectWithRoom(path), token, !!opts.passive, 1, opts.qmpFd);
      throw e;
    }
  }

  /**
   * A connection to the handoff socket at `path`, to attach later with
   * connect(connection, token): connect(2) and the daemon's accept are done
   * before the token is known (see HandoffConnection).
   */
  static async preconnect(path: string): Promise<HandoffConnection> {
    return new HandoffConnection(path, await connectWithRoom(path));
  }

  static async #attachOnce(connected: Promise<SeqpacketSocket>, token: string, passive: boolean, edition: 1 | 2, qmpFd?: number): Promise<VmmSession> {
    const sock = await connected;
    try {
      const flags = (passive ? AttachFlag.PASSIVE : 0) | (edition === 2 ? AttachFlag.EDITION2 : 0);
      // A passive VMM may send its QEMU's monitor (one end of a stream socketpair): the daemon drives hot-plug through it.
      // SCM_RIGHTS sends a copy: the fd is still this process's for a second attempt.
      const qmp = passive && qmpFd !== undefined ? [qmpFd] : [];
      sock.send(encode({ type: MsgType.ATTACH, seq: 1, status: 0, arg: flags, manifest: qmp.map(() => ({ kind: FdKind.QMP, id: 0 })), text: token }), qmp);
      const { msg, fds } = await nextRecord(sock);
      const owned = [...fds];
      try {
        if (msg.type !== (MsgType.ATTACH | RESULT_BIT) || msg.seq !== 1) throw new ProtocolError(`expected the ATTACH result, got ${typeName(msg.type)}`);
        if (msg.status !== 0) {
          // EOPNOTSUPP names the bits the daemon knows in arg (S12): tokenKept there means "without EDITION2, try again".
          const kept = msg.status === 95 ? (msg.arg & AttachFlag.EDITION2) === 0 : edition === 2 && (msg.arg & REFUSAL_TOKEN_KEPT) !== 0;
          throw new AttachError(msg.status, msg.text || `attach refused (errno ${msg.status})`, kept);
        }
        const wrong = edition === 2 ? (fieldViolation(msg) ?? manifestViolation(msg)) : undefined;
        if (wrong) throw new ProtocolError(wrong);
        let kvm: Kvm | undefined;
        let container: OwnedFd | null = null;
        let iommufd: OwnedFd | null = null;
        const groups = new Map<number, OwnedFd>();
        const devices = new Map<string, OwnedFd>();
        // By kind, never by position (S14).
        msg.manifest.forEach((e, i) => {
          const fd = fds[i];
          if (e.kind === FdKind.KVM && !kvm) kvm = Kvm.fromFd(fd);
          else if (e.kind === FdKind.VFIO_CONTAINER && !container) container = fd;
          else if (e.kind === FdKind.VFIO_GROUP && !groups.has(e.id)) groups.set(e.id, fd);
          else if (e.kind === FdKind.IOMMUFD && !iommufd) iommufd = fd;
          else if (e.kind === FdKind.VFIO_DEVICE && !devices.has(idToPciAddress(e.id))) devices.set(idToPciAddress(e.id), fd);
          else throw new ProtocolError(`unexpected fd kind ${e.kind} in the ATTACH result`);
        });
        if (!kvm) throw new ProtocolError('the ATTACH result carries no /dev/kvm fd');
        owned.length = 0;
        const [vmId, ...name] = msg.text.split(' ');
        return new VmmSession(sock, { vmId, vmName: name.join(' '), memlockBytes: msg.arg, kvm, container, groups, iommufd, devices, edition });
      } finally {
        for (const f of owned) f.closeSync();
      }
    } catch (e) {
      sock.closeSync();
      throw e;
    }
  }

  /**
   * KVM_CREATE_VM with the received /dev/kvm, in this process, and tells the
   * daemon. The plan's requests are already queued on the socket behind the
   * ATTACH result; serve() answers them, now that the VM exists.
   */
  async createVm(): Promise<VmFd> {
    this.vm = this.attach.kvm.createVmSync(`vm ${this.attach.vmName}`);
    this.sock.send(encode({ type: MsgType.VM_CREATED, seq: VM_CREATED_SEQ, status: 0, arg: 0, manifest: [], text: '' }));
    this.#outstanding.add(VM_CREATED_SEQ);
    return this.vm;
  }

  /** Answers the daemon's requests from the event loop until the session ends. Call after createVm(). */
  serve(events: VmmEvents = {}): void {
    this.#events = events;
    this.#watch = watchReadable(this.sock.fd, () => this.#onReadable());
    this.#onReadable();
  }

  #onReadable(): void {
    while (!this.#closed) {
      let r;
      try {
        r = this.sock.recv();
      } catch (e) {
        this.close(`recvmsg: ${(e as Error).message}`);
        return;
      }
      if (!r) return;
      if (r.data.length === 0) {
        for (const f of r.fds) f.closeSync();
        this.close('the daemon closed the session');
        return;
      }
      let msg: Message;
      try {
        if (r.truncated) throw new ProtocolError('truncated record');
        msg = decode(r.data, r.fds.length);
        // Garbled too (S5 in edition 2, S21): acted on never, answered never; the session ends (S4).
        const wrong = (this.attach.edition === 2 ? fieldViolation(msg) : undefined) ?? manifestViolation(msg);
        if (wrong) throw new ProtocolError(wrong);
        // A result answers one of this side's own requests, matched by type and seq (S6, S7).
        if (isResult(msg.type) && !(msg.type === (MsgType.VM_CREATED | RESULT_BIT) && this.#outstanding.delete(msg.seq))) {
          throw new ProtocolError(`${typeName(msg.type)} (seq ${msg.seq}) answers no request of this VMM`);
        }
      } catch (e) {
        for (const f of r.fds) f.closeSync();
        this.close(`protocol error: ${(e as Error).message}`);
        return;
      }
      if (isResult(msg.type)) {
        if (msg.status !== 0) {
          this.close(`the daemon refused VM_CREATED: errno ${msg.status} (${msg.text})`);
          return;
        }
        continue; // the VM_CREATED result, wherever it comes among the requests (S18)
      }
      this.#answer(msg, r.fds);
    }
  }

  #answer(msg: Message, fds: OwnedFd[]): void {
    let errno = 0;
    let text = 'ok';
    try {
      switch (msg.type) {
        case MsgType.CREATE_VFIO_DEVICE:
          if (!this.vm) throw new SysError('KVM_CREATE_DEVICE(VFIO)', 'no VM yet', 22);
          if (this.device) {
            // A second device: ask the kernel anyway, so the answer is its own (EBUSY).
            void this.vm.createVfioDevice().close();
          }
          this.device = this.vm.createVfioDevice();
          break;
        case MsgType.ADD_GROUP: {
          const fd = fds.shift();
          if (!fd) throw new SysError('KVM_SET_DEVICE_ATTR(VFIO_FILE_ADD)', `group ${msg.arg}: no fd`, 9);
          if (!this.device) {
            void fd.close();
            throw new SysError('KVM_SET_DEVICE_ATTR(VFIO_FILE_ADD)', 'no KVM-VFIO device', 19 /* ENODEV */);
          }
          try {
            this.device.addFile(fd.fd, `group ${msg.arg}`);
          } catch (e) {
            void fd.close();
            throw e;
          }
          const earlier = this.groups.get(msg.arg);
          this.groups.set(msg.arg, fd);
          if (earlier) void earlier.close();
          break;
        }
        case MsgType.ADD_DEVICE: {
          const address = idToPciAddress(msg.arg);
          const fd = fds.shift();
          if (!fd) throw new SysError('ADD_DEVICE', `device ${address}: no fd`, 9);
          const cdev = new VfioDeviceCdev(fd, `device ${address}`);
          try {
            if (!this.device) throw new SysError('KVM_SET_DEVICE_ATTR(VFIO_FILE_ADD)', 'no KVM-VFIO device', 19 /* ENODEV */);
            if (!this.attach.iommufd) throw new SysError('VFIO_DEVICE_BIND_IOMMUFD', 'no iommufd from the daemon', 9 /* EBADF */);
            this.#iommufd ??= new Iommufd(this.attach.iommufd, 'iommufd from kvmvfiod');
            cdev.bindIommufd(this.#iommufd.fd);
            this.#ioas ??= this.#iommufd.allocIoas();
            cdev.attach(this.#ioas);
            this.device.addFile(cdev.fd, `device ${address}`);
          } catch (e) {
            cdev.closeSync();
            throw e;
          }
          this.devices.get(address)?.closeSync();
          this.devices.set(address, cdev);
          break;
        }
        case MsgType.REMOVE_DEVICE: {
          const address = idToPciAddress(msg.arg);
          const cdev = this.devices.get(address);
          if (!cdev || !this.device) throw new SysError('KVM_SET_DEVICE_ATTR(VFIO_FILE_DEL)', `device ${address}`, 2 /* ENOENT */);
          this.device.deleteFile(cdev.fd, `device ${address}`);
          this.devices.delete(address);
          cdev.closeSync();
          break;
        }
        case MsgType.REMOVE_GROUP: {
          const fd = this.groups.get(msg.arg);
          if (!fd || !this.device) throw new SysError('KVM_SET_DEVICE_ATTR(VFIO_FILE_DEL)', `group ${msg.arg}`, 2 /* ENOENT */);
          this.device.deleteFile(fd.fd, `group ${msg.arg}`);
          this.groups.delete(msg.arg);
          void fd.close();
          break;
        }
        case MsgType.PING:
          text = 'pong';
          break;
        case MsgType.SHUTDOWN:
          text = 'stopping';
          break;
        default:
          throw new SysError(typeName(msg.type), 'this VMM', 95 /* EOPNOTSUPP */);
      }
    } catch (e) {
      if (!(e instanceof SysError)) throw e;
      errno = e.errno;
      text = e.message;
    } finally {
      for (const f of fds) f.closeSync();
    }
    try {
      this.sock.send(encode({ type: msg.type | RESULT_BIT, seq: msg.seq, status: errno, arg: 0, manifest: [], text: text.slice(0, 1000) }));
    } catch (e) {
      this.close(`sendmsg: ${(e as Error).message}`);
      return;
    }
    this.#events.onRequest?.(typeName(msg.type), msg.arg, errno);
    if (msg.type === MsgType.ADD_GROUP && errno === 0) {
      const fd = this.groups.get(msg.arg);
      if (fd) this.#events.onGroupAdded?.(msg.arg, fd);
    }
    if (msg.type === MsgType.ADD_DEVICE && errno === 0) {
      const address = idToPciAddress(msg.arg);
      const cdev = this.devices.get(address);
      if (cdev && this.#iommufd && this.#ioas !== undefined) this.#events.onDeviceAdded?.(address, cdev, this.#iommufd, this.#ioas);
    }
    if (msg.type === MsgType.SHUTDOWN) this.#events.onShutdown?.(msg.text);
  }

  /** Ends the session and closes every fd this VMM holds, the VM's last. */
  close(reason = 'closed by the VMM'): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#watch?.close();
    this.sock.closeSync();
    for (const fd of this.groups.values()) fd.closeSync();
    this.groups.clear();
    for (const fd of this.attach.groups.values()) fd.closeSync();
    for (const fd of this.attach.devices.values()) fd.closeSync();
    for (const cdev of this.devices.values()) cdev.closeSync();
    this.devices.clear();
    this.attach.iommufd?.closeSync();
    this.attach.container?.closeSync();
    this.#events.onClosed?.(reason);
  }
}
