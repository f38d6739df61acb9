/**
 * The daemon's side of one handoff session (docs/session-protocol.md): reads
 * records from the VMM on the event loop, attaches it with its token, and
 * is the broker's VmmLink to it — each request carries a sequence number and
 * waits for its result with a deadline.
 *
 * fds: every fd received is owned here and closed unless a handler keeps it;
 * every fd sent is closed right after sendmsg (the VMM has its own reference);
 * the daemon's /dev/kvm fd is sent as a loan, which stays open, and a group's
 * fd is handed over: the daemon keeps no copy of a group a VMM holds.
 */
import type { Logger } from 'pino';
import type { Broker, Caller } from '../../broker/broker';
import { DeadlineExceededError, DomainError, FailedPreconditionError, PermissionDeniedError, ResourceExhaustedError, UnavailableError } from '../../broker/errors';
import type { AttachGrant, VmmLink } from '../../broker/vmm';
import { type FdWatch, type OwnedFd, type SendableFd, SIGKILL, SIGTERM, type SeqpacketSocket, StreamSocket, SysError, boottimeNs, peerPidfd, pidfdExited, pidfdSendSignal, watchReadable } from '../../kernel';
import {
  ATTACH_KNOWN_FLAGS,
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
  isResult,
  pciAddressToId,
  typeName,
} from '../../protocol/session';
import { QmpClient, checkQmpSocket } from '../qmp/client';
import { QemuHotplug } from '../qmp/hotplug';

/** Requests whose success changes the VM in its VMM's kernel (S25: a result the record cannot follow fails the VM). */
const CHANGES_THE_VM = new Set<number>([MsgType.CREATE_VFIO_DEVICE, MsgType.ADD_GROUP, MsgType.REMOVE_GROUP, MsgType.ADD_DEVICE, MsgType.REMOVE_DEVICE]);

const EACCES = 13;
const EPROTO = 71;
const EOPNOTSUPP = 95;

/** The errno an ATTACH refusal carries, by the broker's error kind (documented in docs/session-protocol.md). */
const refusalErrno: Partial<Record<DomainError['kind'], number>> = {
  'permission-denied': EACCES,
  'not-found': 2, // ENOENT: the VM was deleted
  'failed-precondition': 16, // EBUSY: the VM is not waiting for a VMM
  'resource-exhausted': 24, // EMFILE
  unavailable: 108, // ESHUTDOWN: the daemon is stopping
  'invalid-argument': 22, // EINVAL: a QMP fd that is not the VMM's own stream socketpair
};

export interface SessionOptions {
  /** How long a request waits for the VMM's result before its caller gets DEADLINE_EXCEEDED. */
  requestTimeoutMs: number;
  /**
   * How long an overdue request stays outstanding, counted like its deadline:
   * past it the VMM is taken as not answering, and its VM fails (see
   * Broker.vmmOutOfStep). Default: 6 × requestTimeoutMs.
   */
  answerBoundMs?: number;
  /** How long a new connection has to send ATTACH. */
  attachTimeoutMs: number;
  /** Attached sessions at most, daemon-wide. */
  maxSessions?: number;
  /** Called once the session needs nothing more: socket closed and, if a VM was attached, the VMM gone. */
  onClosed(session: Session): void;
  /** Called when a VMM has attached (its fds sent): the session's fds may go to the fd store. */
  onAttached?(session: Session): void;
  /** Called when the session's socket is closed while its VMM lives on. */
  onSocketClosed?(session: Session): void;
  /** Called when a passive VMM's QMP channel has closed: its fd leaves the fd store. */
  onQmpClosed?(session: Session): void;
  /** Runs the handling of a VMM's exit; the handoff server spreads a burst of exits over loop turns. Default: at once. */
  schedule?(job: () => void): void;
  /** Told of each request to the VMM once it settles: its kind, its time and its outcome (ok, the errno name, deadline, closed). */
  observeRequest?(kind: string, seconds: number, outcome: string): void;
  /** For a passive VMM that sends a QMP fd with its ATTACH: how the daemon drives its QEMU. Absent: such an ATTACH is refused. */
  qmp?: QmpSessionOptions;
}

export interface QmpSessionOptions {
  /** How long a QMP command may take (QEMU's start included, for the first). */
  commandTimeoutMs: number;
  /** How long a hot-unplug waits for the guest (DEVICE_DELETED). */
  unplugTimeoutMs: number;
  /** A fresh /dev/iommu for the QEMU's iommufd object. */
  openIommufd(): Promise<OwnedFd>;
}

export interface RestoredSession {
  vmId: string;
  vmName: string;
  passive: boolean;
  /** The VMM attached with AttachFlag.EDITION2 (absent in states written before editions were kept: edition 1). */
  edition2?: boolean;
  /** The VMM's pidfd from the fd store; without it the VMM is taken as gone. */
  pidfd: OwnedFd | undefined;
  /** A passive VMM's QEMU monitor from the fd store (the daemon's end of the channel), resumed as it was. */
  qmp?: OwnedFd;
}

interface Pending {
  type: number;
  /** What the request asked, for messages ("ADD_GROUP of group 5"). */
  what: string;
  resolve(m: Message): void;
  reject(e: Error): void;
  /** Unset while the VMM has not made its VM: a deadline counts from VM_CREATED (see #request). */
  timer: NodeJS.Timeout | undefined;
  /** Called once at the deadline: the caller gets DEADLINE_EXCEEDED and the request stays outstanding. */
  onDeadline(): void;
  /** Past its deadline, waiting for a late result until the answer bound. */
  overdue: boolean;
}

type Phase = 'new' | 'attaching' | 'attached' | 'ready' | 'closed';

export class Session implements VmmLink {
  readonly peer: Caller;
  readonly id: number;
  readonly #sock: SeqpacketSocket;
  readonly #broker: Broker;
  readonly #log: Logger;
  readonly #opts: SessionOptions;
  readonly #pending = new Map<number, Pending>();
  /** Requests given up at the answer bound: a result for one after that is logged and ignored. */
  readonly #abandoned = new Set<number>();
  #attachTimer: NodeJS.Timeout | undefined;
  #watch: FdWatch | undefined;
  #pidfd: OwnedFd | undefined;
  #pidWatch: FdWatch | undefined;
  #phase: Phase = 'new';
  /** How the pidfd was tied to the peer (logged at attach). */
  #proof = '';
  /** When the connection was accepted (CLOCK_BOOTTIME, ns): the VMM started before it. */
  readonly #acceptedAt = boottimeNs();
  #seq = 0;
  #vmId = '';
  #vmName = '';
  #passive = false;
  /** The VMM set AttachFlag.EDITION2: the rules marked ② apply to it (S5's checks end its session). */
  #edition2 = false;
  /** What an edition-1 VMM broke of S5 and was let through (logged once each). */
  readonly #tolerated = new Set<string>();
  /** A passive VMM's QEMU, driven through the QMP fd it sent with its ATTACH (hot-plug). */
  #qemu?: QemuHotplug;
  /** Carried over a daemon restart: results of requests the old process sent are ignored, not errors. */
  #restored = false;
  #exited!: () => void;
  readonly exited: Promise<void>;
  #made!: { resolve(): void; reject(e: Error): void };
  #madeVm = false;
  readonly vmMade: Promise<void>;

  constructor(id: number, sock: SeqpacketSocket, peer: Caller, broker: Broker, log: Logger, opts: SessionOptions, restored?: RestoredSession) {
    this.id = id;
    this.#sock = sock;
    this.peer = peer;
    this.#broker = broker;
    this.#opts = opts;
    this.#log = log.child({ session: id, vmm_pid: peer.pid, vmm_uid: peer.uid, vmm_gid: peer.gid });
    this.exited = new Promise((r) => (this.#exited = r));
    this.vmMade = new Promise<void>((resolve, reject) => (this.#made = { resolve: () => ((this.#madeVm = true), resolve()), reject }));
    this.vmMade.catch(() => undefined); // a session may end before anyone asks
    if (restored) {
      this.#restored = true;
      this.#phase = 'ready';
      this.#vmId = restored.vmId;
      this.#vmName = restored.vmName;
      this.#passive = restored.passive;
      this.#edition2 = restored.edition2 === true;
      this.#made.resolve();
      this.#pidfd = restored.pidfd;
      if (this.#pidfd) this.#pidWatch = watchReadable(this.#pidfd.fd, () => this.#exitSeen());
      else queueMicrotask(() => this.#onExit());
      if (restored.qmp && this.#opts.qmp && this.#passive) this.#driveQemu(restored.qmp, true);
      else restored.qmp?.closeSync();
    } else {
      this.#attachTimer = setTimeout(() => this.#end(`no ATTACH within ${opts.attachTimeoutMs} ms`), opts.attachTimeoutMs);
      this.#attachTimer.unref();
    }
    this.#watch = watchReadable(sock.fd, () => this.#onReadable());
  }

  /**
   * The fds that carry this session over a daemon restart (for the fd store):
   * the VMM's pidfd while the process is watched, and its socket while that
   * is open (a VMM may close its session and live on, holding its VM).
   */
  get storableFds(): { socket?: number; pidfd: number; qmp?: number } | undefined {
    if (!this.#pidfd?.isOpen) return undefined;
    const qmp = this.#qemu?.qmp.fd;
    return { ...(this.#sock.isOpen ? { socket: this.#sock.fd } : {}), pidfd: this.#pidfd.fd, ...(qmp !== undefined ? { qmp } : {}) };
  }

  get pid(): number {
    return this.peer.pid;
  }

  get passive(): boolean {
    return this.#passive;
  }

  /** The VMM negotiated edition 2 at its ATTACH (kept over a restart, with the session). */
  get edition2(): boolean {
    return this.#edition2;
  }

  /** How a passive VMM takes hot changes: 'qmp' when its QEMU's monitor came with its ATTACH. */
  get hotplug(): 'qmp' | undefined {
    return this.#qemu ? 'qmp' : undefined;
  }

  get vmId(): string {
    return this.#vmId;
  }

  /** The oldest request past its deadline that the VMM has not answered yet, if any ("CREATE_VFIO_DEVICE (seq 3)"). */
  get overdue(): string | undefined {
    for (const [seq, p] of this.#pending) if (p.overdue) return `${p.what} (seq ${seq})`;
    return undefined;
  }

  get madeVm(): boolean {
    return this.#madeVm;
  }

  get isOpen(): boolean {
    return this.#phase !== 'closed';
  }

  // --- VmmLink -------------------------------------------------------------

  async createVfioDevice(): Promise<void> {
    // QEMU makes its KVM-VFIO device itself, with its first VFIO device: nothing to ask.
    if (this.#passive && this.#qemu) return;
    await this.#request(MsgType.CREATE_VFIO_DEVICE, 0, [], 'KVM_CREATE_DEVICE(VFIO)');
  }

  async addGroup(group: number, fd: SendableFd): Promise<void> {
    if (this.#passive && this.#qemu) {
      fd.closeSync();
      throw new FailedPreconditionError(`QEMU takes a VFIO device only as a device cdev with an iommufd, never as a group file: vm ${this.#vmName} needs the CDEV handoff (CreateVm vfio_handoff VFIO_HANDOFF_CDEV)`);
    }
    await this.#request(MsgType.ADD_GROUP, group, [{ kind: FdKind.VFIO_GROUP, id: group, fd }], 'KVM_SET_DEVICE_ATTR(VFIO_FILE_ADD)', `group ${group}`);
  }

  async removeGroup(group: number): Promise<void> {
    if (this.#passive && this.#qemu) throw new FailedPreconditionError(`vm ${this.#vmName}'s QEMU holds no group files (it takes device cdevs only)`);
    await this.#request(MsgType.REMOVE_GROUP, group, [], 'KVM_SET_DEVICE_ATTR(VFIO_FILE_DEL)', `group ${group}`);
  }

  async addDevice(address: string, fd: SendableFd): Promise<void> {
    if (this.#passive && this.#qemu) return this.#qemu.addDevice(address, fd);
    const id = pciAddressToId(address);
    await this.#request(MsgType.ADD_DEVICE, id, [{ kind: FdKind.VFIO_DEVICE, id, fd }], 'ADD_DEVICE (bind, attach, KVM_DEV_VFIO_FILE_ADD)', `device ${address}`);
  }

  async removeDevice(address: string): Promise<void> {
    if (this.#passive && this.#qemu) return this.#qemu.removeDevice(address);
    await this.#request(MsgType.REMOVE_DEVICE, pciAddressToId(address), [], 'REMOVE_DEVICE (KVM_DEV_VFIO_FILE_DEL)', `device ${address}`);
  }

  shutdown(reason: string): void {
    if (this.#passive) {
      // A passive VMM (QEMU under kvmvfioctl attach) never reads its session: SIGTERM through the
      // pidfd, which QEMU and cloud-hypervisor take as a clean stop.
      this.#signal(SIGTERM, reason);
      return;
    }
    if (this.#phase === 'closed') return;
    // The result is not awaited: the VMM answers, then exits.
    this.#request(MsgType.SHUTDOWN, 0, [], 'SHUTDOWN', '', reason).catch(() => undefined);
  }

  assertAlive(step: string): void {
    if (!this.#pidfd?.isOpen || pidfdExited(this.#pidfd.fd)) throw new UnavailableError(`VMM pid ${this.pid} exited before ${step}`);
  }

  kill(): void {
    this.#signal(SIGKILL);
  }

  /** A signal through the pidfd (never by pid); a VMM gone already (ESRCH) is no error. */
  #signal(signal: number, reason?: string): void {
    if (!this.#pidfd?.isOpen) return;
    try {
      pidfdSendSignal(this.#pidfd.fd, signal, `VMM pid ${this.pid}`);
      if (signal === SIGKILL) this.#log.warn({ event: 'vmm-killed', vm: this.#vmId }, 'VMM killed');
      else this.#log.info({ event: 'vmm-terminated', vm: this.#vmId, reason }, 'SIGTERM sent to the passive VMM');
    } catch (e) {
      if (!(e instanceof SysError && e.code === 'ESRCH')) throw e;
    }
  }

  // --- reading ---------------------------------------------------------------

  #onReadable(): void {
    while (this.#phase !== 'closed') {
      let rec;
      try {
        rec = this.#sock.recv();
      } catch (e) {
        this.#end(`recvmsg failed: ${(e as Error).message}`);
        return;
      }
      if (!rec) return;
      if (rec.data.length === 0 && rec.fds.length === 0) {
        // Stop watching now (EOF stays readable); the rest waits its turn, as exits do: a VMM
        // that serves thousands of VMs closes all their sessions at once.
        this.#watch?.close();
        this.#watch = undefined;
        if (this.#opts.schedule) this.#opts.schedule(() => this.#end('VMM closed the session'));
        else this.#end('VMM closed the session');
        return;
      }
      const fds = rec.fds;
      try {
        if (rec.truncated) throw new ProtocolError('record or its fds were truncated (MSG_TRUNC/MSG_CTRUNC)');
        const msg = decode(rec.data, fds.length);
        this.#handle(msg, fds, rec.sender?.pid);
      } catch (e) {
        for (const f of fds) f.closeSync();
        if (e instanceof ProtocolError) {
          this.#log.warn({ event: 'session-protocol-error', reason: e.message }, 'ending a session that broke the protocol');
          this.#end(`protocol error: ${e.message}`);
          return;
        }
        throw e;
      }
    }
  }

  /** `senderPid`: who sent the record (SCM_CREDENTIALS), where the socket passes credentials. */
  #handle(msg: Message, fds: OwnedFd[], senderPid?: number): void {
    // No message from a VMM carries fds, but a passive VMM's ATTACH its QEMU's monitor (FdKind.QMP).
    if (fds.length && !(msg.type === MsgType.ATTACH && this.#phase === 'new')) throw new ProtocolError(`${typeName(msg.type)} carries ${fds.length} fds; none are expected from a VMM`);
    this.#checkFields(msg);
    if (isResult(msg.type)) {
      if (this.#abandoned.delete(msg.seq)) {
        this.#log.warn({ event: 'late-result', type: typeName(msg.type), seq: msg.seq, errno: msg.status }, 'result after its answer bound; ignored');
        return;
      }
      if (this.#restored && !this.#pending.has(msg.seq)) {
        // Sent by the daemon process before the restart: this one cannot tell what it changed (which
        // group, say). A refusal changed nothing; a success changed the VMM's kernel behind the record.
        const changed = msg.status === 0 && CHANGES_THE_VM.has(msg.type & ~RESULT_BIT);
        this.#log.warn({ event: 'late-result', vm: this.#vmId, type: typeName(msg.type), seq: msg.seq, errno: msg.status }, `result of a request of the previous daemon process; ${changed ? 'failing the VM' : 'ignored'}`);
        if (changed) {
          const reason = `its VMM (pid ${this.pid}) reported ${typeName(msg.type & ~RESULT_BIT)} (seq ${msg.seq}) done, a request of the daemon before it restarted: the record cannot say what it changed`;
          void this.#broker.vmmOutOfStep(this.#vmId, this, reason);
        }
        return;
      }
      const p = this.#pending.get(msg.seq);
      if (!p || p.type !== (msg.type & ~RESULT_BIT)) throw new ProtocolError(`${typeName(msg.type)} answers no request (seq ${msg.seq})`);
      this.#pending.delete(msg.seq);
      clearTimeout(p.timer);
      if (p.overdue) this.#log.info({ event: 'late-result', vm: this.#vmId, type: typeName(msg.type), seq: msg.seq, errno: msg.status }, 'result after its deadline; applied');
      else this.#log.debug({ event: 'result', vm: this.#vmId, type: typeName(msg.type), seq: msg.seq, errno: msg.status, text: msg.text }, 'result');
      p.resolve(msg);
      return;
    }
    if (this.#phase === 'new' ? msg.type !== MsgType.ATTACH : msg.type === MsgType.ATTACH) {
      // The document's rule: ATTACH first and once; otherwise EACCES and the session ends.
      const reason = this.#phase === 'new' ? `${typeName(msg.type)} before ATTACH` : 'ATTACH sent twice';
      this.#reply(msg, EACCES, reason);
      throw new ProtocolError(reason);
    }
    switch (msg.type) {
      case MsgType.ATTACH: {
        // In BigInt: arg has up to 53 bits, and JS bitwise operators keep 32.
        const unknown = BigInt(msg.arg) & ~BigInt(ATTACH_KNOWN_FLAGS);
        if (unknown) {
          // Negotiation (S12): the VMM learns which bits this daemon knows, and may attach again without the others.
          const reason = `ATTACH arg 0x${msg.arg.toString(16)} has bits this kvmvfiod does not know (0x${unknown.toString(16)}); it knows 0x${ATTACH_KNOWN_FLAGS.toString(16)}`;
          for (const f of fds.splice(0)) f.closeSync();
          this.#reply(msg, EOPNOTSUPP, reason, ATTACH_KNOWN_FLAGS);
          this.#log.warn({ event: 'attach-refused', reason }, 'attach refused');
          this.#end(`attach refused: ${reason}`);
          return;
        }
        if (fds.length && (fds.length !== 1 || msg.manifest[0].kind !== FdKind.QMP || (msg.arg & AttachFlag.PASSIVE) === 0)) {
          throw new ProtocolError(`an ATTACH may carry one fd, a QMP channel, and only with the passive bit (manifest kinds ${msg.manifest.map((e) => e.kind).join(',')}, arg ${msg.arg})`);
        }
        this.#phase = 'attaching';
        clearTimeout(this.#attachTimer);
        // The QMP fd is #attach's from here (it closes it on any failure).
        void this.#attach(msg, senderPid, fds.splice(0)[0]);
        return;
      }
      case MsgType.VM_CREATED:
        if (this.#phase !== 'attached' || this.#passive) {
          // Well formed, so answered (S8), then the session ends (S17).
          const reason = this.#passive ? 'VM_CREATED from a passive VMM' : this.#phase === 'ready' ? 'VM_CREATED sent twice' : `VM_CREATED before the ATTACH result`;
          this.#reply(msg, EPROTO, reason);
          throw new ProtocolError(reason);
        }
        this.#phase = 'ready';
        this.#reply(msg, 0, 'ok');
        // The plan's requests went out with the ATTACH result; their deadlines start now.
        for (const [seq, p] of this.#pending) if (!p.timer) p.timer = this.#deadline(seq);
        this.#log.info({ event: 'vm-created', vm: this.#vmId }, 'VMM made its VM');
        this.#made.resolve();
        return;
      case MsgType.PING:
        this.#reply(msg, 0, 'pong');
        return;
      default: {
        const reason = `${typeName(msg.type)} may not be sent by a VMM`;
        this.#reply(msg, EPROTO, reason);
        throw new ProtocolError(reason);
      }
    }
  }

  /**
   * S5: a NUL in a text, a nonzero status on a request, an arg the table fixes
   * at 0. Garbled for an edition-2 VMM (known from its ATTACH); an edition-1
   * VMM, written when the daemon let them through, still is let through, and
   * each kind is logged once per session so that its operator can see it.
   */
  #checkFields(msg: Message): void {
    const violation = fieldViolation(msg);
    if (!violation) return;
    const edition2 = this.#phase === 'new' ? msg.type === MsgType.ATTACH && (msg.arg & AttachFlag.EDITION2) !== 0 : this.#edition2;
    if (edition2) throw new ProtocolError(violation);
    const kind = violation.replace(/\d+/g, 'N');
    if (this.#tolerated.has(kind)) return;
    this.#tolerated.add(kind);
    this.#log.warn({ event: 'session-tolerated', vm: this.#vmId || undefined, reason: violation }, 'an edition-1 VMM broke a rule of the session protocol (S5); let through, as edition 1 does');
  }

  /**
   * Drives the passive VMM's QEMU through `fd`, the daemon's end of its
   * monitor (this session's from here): fresh from the ATTACH (greeting and
   * negotiation to come), or `resumed` from the fd store after a restart.
   */
  #driveQemu(fd: OwnedFd, resumed: boolean): void {
    const qmpOpts = this.#opts.qmp!;
    const vmId = this.#vmId;
    const log = (event: Record<string, unknown>, m: string) => this.#log.info({ vm: vmId, ...event }, m);
    const qmp = new QmpClient(new StreamSocket(fd, `QMP of vm ${this.#vmName}`), { commandTimeoutMs: qmpOpts.commandTimeoutMs, who: `QEMU (pid ${this.pid}) of vm ${this.#vmName}`, log, resumed });
    const onDeviceGone = (address: string) =>
      void this.#broker.deviceLeftVmm(vmId, address).catch((e: unknown) => this.#log.error({ event: 'device-left-failed', vm: vmId, device: address, err: (e as Error).message }, 'handling a device QEMU let go of failed'));
    this.#qemu = new QemuHotplug(qmp, { openIommufd: qmpOpts.openIommufd, unplugTimeoutMs: qmpOpts.unplugTimeoutMs, vmName: this.#vmName, log, onDeviceGone });
    void qmp.closed.then((reason) => {
      this.#log.info({ event: 'qmp-closed', vm: vmId, reason }, 'QMP channel closed');
      this.#opts.onQmpClosed?.(this);
    });
  }

  async #attach(msg: Message, senderPid?: number, qmpFd?: OwnedFd): Promise<void> {
    this.#passive = (msg.arg & AttachFlag.PASSIVE) !== 0;
    this.#edition2 = (msg.arg & AttachFlag.EDITION2) !== 0;
    let grant: AttachGrant;
    try {
      if (qmpFd) {
        if (!this.#opts.qmp) throw new FailedPreconditionError('this kvmvfiod does not drive QEMU monitors (no QMP options)');
        // Before the token is spent: a bad channel leaves the VM waiting for a good attach.
        checkQmpSocket(qmpFd.fd, this.peer.pid);
      }
      if (!msg.text) throw new PermissionDeniedError('attach token missing');
      // SO_PEERCRED gives pid 0 for a peer outside the daemon's pid namespace: such a VMM cannot be
      // watched, limited or killed, so it is refused (a container daemon needs the host's pid namespace).
      if (this.peer.pid <= 0) throw new FailedPreconditionError("the VMM's pid is not visible in kvmvfiod's pid namespace; run kvmvfiod in the host pid namespace");
      const max = this.#opts.maxSessions ?? Number.MAX_SAFE_INTEGER;
      if (this.#broker.sessionCount >= max) throw new ResourceExhaustedError(`kvmvfiod has ${this.#broker.sessionCount} VMM sessions; its limit (--max-sessions) is ${max}`);
      // A bad token is refused before the costlier checks below (the fallback's /proc look).
      this.#broker.tokens.check(msg.text, this.peer.uid);
      // The pidfd first: from here on the VMM is named by it, never by a pid that could be reused.
      // A peer that has exited (its connection inherited by another process) is refused here.
      const { pidfd, proof } = await peerPidfd(this.#sock.fd, this.peer.pid, senderPid, this.#acceptedAt);
      if (this.#phase !== 'attaching') {
        pidfd.closeSync();
        return;
      }
      this.#pidfd = pidfd;
      this.#proof = proof;
      this.#pidWatch = watchReadable(pidfd.fd, () => this.#exitSeen());
      grant = await this.#broker.attach(msg.text, this.peer, this);
    } catch (e) {
      const reason = e instanceof DomainError || e instanceof SysError ? e.message : 'internal error';
      this.#log.warn({ event: 'attach-refused', reason }, 'attach refused');
      const errno = e instanceof SysError ? e.errno : e instanceof DomainError ? (refusalErrno[e.kind] ?? EPROTO) : EPROTO;
      qmpFd?.closeSync();
      // Edition 2 (S13): whether the token is still good, i.e. this refusal neither spent it nor touched the VM.
      let arg = 0;
      if (this.#edition2) {
        try {
          this.#broker.tokens.check(msg.text, this.peer.uid);
          arg = REFUSAL_TOKEN_KEPT;
        } catch {
          // spent, expired, never known, or another uid's: not worth presenting again from here
        }
      }
      this.#reply(msg, errno, reason, arg);
      this.#end(`attach refused: ${reason}`);
      return;
    }
    this.#vmId = grant.vmId;
    this.#vmName = grant.vmName;
    const fdsOfGrant = () => [grant.kvm, grant.container, grant.iommufd, ...grant.groups.map((g) => g.fd), ...grant.devices.map((d) => d.fd)];
    if (this.#phase !== 'attaching') {
      // The session ended while the broker attached it: nothing reached the
      // VMM, so its VM ends here and its groups go back (our copies closed first).
      qmpFd?.closeSync();
      for (const f of fdsOfGrant()) f?.closeSync();
      this.#exited();
      return;
    }
    if (this.#pidfd && pidfdExited(this.#pidfd.fd)) {
      // Gone before its fds left: send nothing. The pidfd watch ends the VM.
      qmpFd?.closeSync();
      for (const f of fdsOfGrant()) f?.closeSync();
      this.#end('VMM exited before its fds were sent');
      return;
    }
    const sent: { kind: number; id: number; fd: SendableFd }[] = [{ kind: FdKind.KVM, id: 0, fd: grant.kvm }];
    if (grant.container) sent.push({ kind: FdKind.VFIO_CONTAINER, id: 0, fd: grant.container });
    for (const g of grant.groups) sent.push({ kind: FdKind.VFIO_GROUP, id: g.number, fd: g.fd });
    if (grant.iommufd) sent.push({ kind: FdKind.IOMMUFD, id: 0, fd: grant.iommufd });
    for (const d of grant.devices) sent.push({ kind: FdKind.VFIO_DEVICE, id: pciAddressToId(d.address), fd: d.fd });
    try {
      this.#send({ type: msg.type | RESULT_BIT, seq: msg.seq, status: 0, arg: grant.memlockBytes, manifest: sent, text: `${grant.vmId} ${grant.vmName}` }, sent);
      this.#phase = 'attached';
      if (this.#passive) this.#made.resolve();
      if (qmpFd && this.#opts.qmp) {
        this.#driveQemu(qmpFd, false);
        qmpFd = undefined;
      }
      this.#opts.onAttached?.(this);
    } catch (e) {
      qmpFd?.closeSync();
      this.#end(`sending the attach result failed: ${(e as Error).message}`);
      return;
    }
    this.#log.info({ event: 'vmm-attached', vm: grant.vmId, passive: this.#passive, fds: sent.map((s) => s.kind), pidfd: this.#proof, ...(this.#qemu ? { qmp: true } : {}) }, 'VMM attached');
    void this.#broker.applyPlan(grant.vmId);
  }

  // --- writing ---------------------------------------------------------------

  #reply(req: Message, status: number, text: string, arg = 0): void {
    try {
      this.#send({ type: req.type | RESULT_BIT, seq: req.seq, status, arg, manifest: [], text }, []);
    } catch (e) {
      this.#end(`reply failed: ${(e as Error).message}`);
    }
  }

  /**
   * Sends one record and closes the fds it carried (the peer has its
   * copies). Closed at once, not on the libuv pool: a group handed over must
   * not be held by the daemon a moment longer, or its return to the pool (a
   * fresh open) would see the daemon's own copy.
   */
  #send(m: Message, fds: { fd: SendableFd }[]): void {
    try {
      this.#sock.send(encode(m), fds.map((f) => f.fd.fd));
    } finally {
      for (const f of fds) f.fd.closeSync();
    }
  }

  /**
   * Sends a request and resolves with its result (rejects with a SysError
   * carrying the VMM's errno). At the deadline the promise rejects with
   * DeadlineExceededError, whose `answer` is the request's outcome still to
   * come: the request stays outstanding until the answer bound (the contract's
   * S24, S25). While one is overdue no other request is sent but SHUTDOWN and
   * PING: they would only queue behind it.
   */
  #request(type: number, arg: number, fds: { kind: number; id: number; fd: SendableFd }[], call: string, object = '', text = ''): Promise<Message> {
    if (this.#phase === 'closed') {
      for (const f of fds) f.fd.closeSync();
      return Promise.reject(new UnavailableError(`the session with VMM pid ${this.pid} has ended`));
    }
    if (this.#passive) {
      for (const f of fds) f.fd.closeSync();
      return Promise.reject(new UnavailableError('a passive VMM takes no requests'));
    }
    const overdue = type === MsgType.SHUTDOWN || type === MsgType.PING ? undefined : this.overdue;
    if (overdue) {
      for (const f of fds) f.fd.closeSync();
      return Promise.reject(new UnavailableError(`VMM pid ${this.pid} has not answered ${overdue} yet; nothing more is sent to it until it does`));
    }
    const seq = (this.#seq = (this.#seq + 1) >>> 0);
    const what = `${typeName(type)}${object ? ` of ${object}` : ''}`;
    let p!: Pending;
    // The result, whenever it comes: the kernel's verdict, named as the call the VMM made in its own process.
    const answer = new Promise<Message>((resolve, reject) => {
      p = { type, what, resolve, reject, timer: undefined, onDeadline: () => undefined, overdue: false };
    }).then((res) => {
      if (res.status !== 0) throw new SysError(call, `${object ? `${object}, ` : ''}vm ${this.#vmName} (VMM pid ${this.pid})`, res.status);
      return res;
    });
    answer.catch(() => undefined); // a caller past its deadline may not look at it
    this.#observe(type, process.hrtime.bigint(), answer);
    const inTime = new Promise<Message>((resolve, reject) => {
      answer.then(resolve, reject);
      p.onDeadline = () => {
        const bound = this.#answerBoundMs;
        reject(
          new DeadlineExceededError(
            `VMM pid ${this.pid} did not answer ${what} within ${this.#opts.requestTimeoutMs} ms; the request stays outstanding: ` +
              `its result, if it comes within ${bound} ms of the send, updates vm ${this.#vmName}, else the VM is failed and its VMM stopped`,
            answer.then(() => undefined),
          ),
        );
      };
    });
    // Sent before VM_CREATED (the plan, pipelined behind the ATTACH result), a request waits
    // for the VMM to make its VM first: its deadline starts at VM_CREATED.
    this.#pending.set(seq, p);
    if (this.#phase === 'ready') p.timer = this.#deadline(seq);
    try {
      this.#send({ type, seq, status: 0, arg, manifest: fds.map(({ kind, id }) => ({ kind, id })), text }, fds);
    } catch (e) {
      clearTimeout(p.timer);
      this.#pending.delete(seq);
      p.reject(e instanceof SysError ? new UnavailableError(`VMM pid ${this.pid}: ${e.message}`) : (e as Error));
    }
    return inTime;
  }

  /** Times a request for the metrics, from its sending to its result (late ones too) or its end. */
  #observe(type: number, started: bigint, answer: Promise<Message>): void {
    const observe = this.#opts.observeRequest;
    if (!observe) return;
    const done = (outcome: string) => observe(typeName(type), Number(process.hrtime.bigint() - started) / 1e9, outcome);
    answer.then(
      () => done('ok'),
      (e: unknown) => done(e instanceof SysError ? e.code : e instanceof DeadlineExceededError ? 'unanswered' : e instanceof UnavailableError ? 'closed' : 'error'),
    );
  }

  get #answerBoundMs(): number {
    return Math.max(this.#opts.answerBoundMs ?? 6 * this.#opts.requestTimeoutMs, this.#opts.requestTimeoutMs);
  }

  /** The deadline of request `seq`, then its answer bound. */
  #deadline(seq: number): NodeJS.Timeout {
    const timer = setTimeout(() => {
      const p = this.#pending.get(seq);
      if (!p) return;
      p.overdue = true;
      this.#log.warn({ event: 'request-overdue', vm: this.#vmId, type: typeName(p.type), seq, ms: this.#opts.requestTimeoutMs }, 'VMM past the deadline of a request; it stays outstanding');
      p.onDeadline();
      p.timer = setTimeout(() => this.#unanswered(seq), this.#answerBoundMs - this.#opts.requestTimeoutMs);
      p.timer.unref();
    }, this.#opts.requestTimeoutMs);
    timer.unref();
    return timer;
  }

  /** The answer bound passed: the request is given up, and the broker fails the VM (its record can no longer follow the kernel). */
  #unanswered(seq: number): void {
    const p = this.#pending.get(seq);
    if (!p) return;
    this.#pending.delete(seq);
    this.#abandoned.add(seq);
    if (this.#abandoned.size > 64) this.#abandoned.delete(this.#abandoned.values().next().value as number);
    const what = `${p.what} (seq ${seq}) within ${this.#answerBoundMs} ms`;
    p.reject(new DeadlineExceededError(`VMM pid ${this.pid} did not answer ${what}`));
    this.#log.warn({ event: 'request-unanswered', vm: this.#vmId, type: typeName(p.type), seq, ms: this.#answerBoundMs }, 'VMM never answered a request; failing its VM');
    void this.#broker.vmmOutOfStep(this.#vmId, this, `its VMM (pid ${this.pid}) did not answer ${what}`);
  }

  // --- ending ----------------------------------------------------------------

  /** The pidfd became readable: stop watching it (it stays readable) and handle the exit in its turn. */
  #exitSeen(): void {
    this.#pidWatch?.close();
    this.#pidWatch = undefined;
    if (this.#opts.schedule) this.#opts.schedule(() => this.#onExit());
    else this.#onExit();
  }

  #onExit(): void {
    this.#pidWatch?.close();
    this.#pidWatch = undefined;
    // A pidfd close involves no RCU wait: done here, not on the libuv pool.
    this.#pidfd?.closeSync();
    this.#qemu?.close('QEMU exited');
    this.#end('VMM exited', true);
    // One line for the exit and the session's end together.
    this.#log.info({ event: 'vmm-exit', vm: this.#vmId }, 'VMM process exited; session ended');
    this.#exited();
    this.#opts.onClosed(this);
  }

  /** Closes the socket. The VM itself ends when the VMM process exits (the pidfd), not here. */
  #end(reason: string, quiet = false): void {
    if (this.#phase === 'closed') return;
    this.#phase = 'closed';
    clearTimeout(this.#attachTimer);
    this.#watch?.close();
    this.#watch = undefined;
    this.#sock.closeSync();
    for (const [, p] of this.#pending) {
      clearTimeout(p.timer);
      p.reject(new UnavailableError(`the session with VMM pid ${this.pid} ended: ${reason}`));
    }
    this.#pending.clear();
    this.#made.reject(new UnavailableError(`the session with VMM pid ${this.pid} ended before the VMM made its VM: ${reason}`));
    if (!quiet) this.#log.info({ event: 'session-end', vm: this.#vmId || undefined, reason }, 'session ended');
    // Before attach no VM depends on the process: stop watching it. After,
    // the session is done only when the process is gone (#onExit).
    if (!this.#vmId) {
      this.#pidWatch?.close();
      this.#pidWatch = undefined;
      void this.#pidfd?.close();
      this.#opts.onClosed(this);
    } else if (reason !== 'daemon stopping') {
      this.#opts.onSocketClosed?.(this);
    }
  }

  /** For daemon shutdown: close the socket and stop watching the process. */
  close(): void {
    this.#qemu?.close('daemon stopping');
    this.#end('daemon stopping');
    this.#pidWatch?.close();
    this.#pidWatch = undefined;
    this.#pidfd?.closeSync();
    this.#opts.onClosed(this);
  }
}
