/**
 * A kernel double for the unit lane: stands in for src/kernel's VfioGroup
 * behind the pool's `OpenGroup` seam, with a behaviour per group and counters.
 *
 *   const k = new KernelDouble();
 *   k.set(12, { openErrno: Errno.EBUSY });      // open(/dev/vfio/12) fails EBUSY
 *   k.set(13, { viable: false });               // VFIO_GROUP_GET_STATUS says not viable
 *   k.set(14, { statusErrno: Errno.ENOTTY });   // status cannot be read
 *   const pool = new GroupPool({ sysfsRoot, devRoot, openGroup: k.openGroup });
 *   ...
 *   k.opens(12); k.closes(12); k.live(12);
 *
 * A group with no behaviour set opens fine and reports viable. `opens(n)`
 * counts successful opens, `attempts(n)` every call (failed ones too),
 * `closes(n)` every close() call on a handle of that group (a second close
 * of the same handle counts too, so double closes show up). The double
 * keeps the kernel's single-open rule: an open of a group whose file still
 * has a reference (the daemon's handle, a handed-over fd a VMM keeps, a
 * forkHold()) fails EBUSY. `handOver()` gives a real fd of /dev/null, since
 * the pool's callers need a real fd number; closing it drops the reference.
 */
import { openSync } from 'node:fs';
import type { GroupHandle, OpenGroup } from '../../src/broker/pool';
import type { VmmHost } from '../../src/broker/vmm';
import { OwnedFd, type SendableFd, SysError, type VfioGroupStatus } from '../../src/kernel';

export interface GroupBehaviour {
  /** open() rejects with SysError('open', path, openErrno). */
  openErrno?: number;
  /** status() throws SysError('VFIO_GROUP_GET_STATUS', path, statusErrno). */
  statusErrno?: number;
  /** What status() reports as VIABLE; default true. */
  viable?: boolean;
  /** Awaited inside open() before it answers, to hold an open in flight. */
  openGate?: Promise<void>;
  /** A fresh open finds a VFIO container still set (a kernel that did not unset it at the last close). */
  containerSetOnOpen?: boolean;
}

export class DoubleGroup implements GroupHandle {
  readonly number: number;
  readonly path: string;
  closeCalls = 0;
  statusCalls = 0;
  unsetCalls = 0;
  /** Set by a test to play a VMM that left its container on the group. */
  containerSet = false;
  readonly #double: KernelDouble;

  constructor(double: KernelDouble, number: number, path: string, file: DoubleFile) {
    this.#double = double;
    this.number = number;
    this.path = path;
    this.file = file;
  }

  get closed(): boolean {
    return this.closeCalls > 0;
  }

  status(): VfioGroupStatus {
    this.statusCalls++;
    if (this.closed) throw new Error(`double: status() on closed group ${this.number}`);
    const b = this.#double.behaviour(this.number);
    if (b.statusErrno !== undefined) throw new SysError('VFIO_GROUP_GET_STATUS', this.path, b.statusErrno);
    return { viable: b.viable ?? true, containerSet: this.containerSet };
  }

  unsetContainer(): void {
    this.unsetCalls++;
    if (!this.containerSet) throw new SysError('VFIO_GROUP_UNSET_CONTAINER', this.path, 22);
    this.containerSet = false;
  }

  /** The open file this handle refers to (the group's single open). */
  readonly file: DoubleFile;
  handedOver = false;
  #dropped = false;

  /**
   * The handle's fd given away (to a VMM): a real fd of /dev/null (callers
   * need a real number) whose close drops this handle's reference to the
   * file. The handle's own close() then drops nothing.
   */
  handOver(): SendableFd {
    if (this.closed || this.handedOver) throw new Error(`double: handOver() on ${this.closed ? 'closed' : 'handed-over'} group ${this.number}`);
    this.handedOver = true;
    const own = new OwnedFd(openSync('/dev/null', 'r'), this.path);
    const drop = () => {
      if (!own.isOpen) return;
      own.closeSync();
      this.#drop();
    };
    return {
      get fd() {
        return own.fd;
      },
      close: async () => drop(),
      closeSync: drop,
    };
  }

  #drop(): void {
    if (this.#dropped) return;
    this.#dropped = true;
    this.file.refs--;
  }

  async close(): Promise<void> {
    if (!this.handedOver) this.#drop();
    this.closeCalls++;
    this.#double.count(this.#double.closeCounts, this.number);
  }
}

/** A group's open file: it stays open (a second open is EBUSY) while any reference to it lives. */
export interface DoubleFile {
  readonly group: number;
  refs: number;
}

export class KernelDouble {
  readonly #behaviour = new Map<number, GroupBehaviour>();
  readonly openCounts = new Map<number, number>();
  readonly attemptCounts = new Map<number, number>();
  readonly closeCounts = new Map<number, number>();
  /** Every handle handed out, in order. */
  readonly handles: DoubleGroup[] = [];
  /** Paths open() was called with, in order. */
  readonly paths: string[] = [];

  readonly #files = new Map<number, DoubleFile>();

  /** Whether some reference to group n's open file lives (the daemon's, a VMM's, a forked child's). */
  held(n: number): boolean {
    return (this.#files.get(n)?.refs ?? 0) > 0;
  }

  /**
   * One more reference to group n's open file, as a process that inherited
   * it (a VMM's forked child) holds; returns its close (idempotent).
   */
  forkHold(n: number): () => void {
    const f = this.#files.get(n);
    if (!f || f.refs <= 0) throw new Error(`double: group ${n} has no open file to inherit`);
    f.refs++;
    let open = true;
    return () => {
      if (open) f.refs--;
      open = false;
    };
  }

  set(n: number, b: GroupBehaviour): this {
    this.#behaviour.set(n, b);
    return this;
  }

  behaviour(n: number): GroupBehaviour {
    return this.#behaviour.get(n) ?? {};
  }

  /** The pool's `openGroup`: bound, so it can be passed as is. */
  readonly openGroup: OpenGroup = async (path, n) => {
    this.paths.push(path);
    this.count(this.attemptCounts, n);
    const b = this.behaviour(n);
    if (b.openGate) await b.openGate;
    if (b.openErrno !== undefined) throw new SysError('open', path, b.openErrno);
    // The kernel's rule: a group file is open once; a second open while any reference lives is EBUSY.
    if ((this.#files.get(n)?.refs ?? 0) > 0) throw new SysError('open', path, 16 /* EBUSY */);
    const file: DoubleFile = { group: n, refs: 1 };
    this.#files.set(n, file);
    const g = new DoubleGroup(this, n, path, file);
    g.containerSet = b.containerSetOnOpen ?? false;
    this.handles.push(g);
    this.count(this.openCounts, n);
    return g;
  };

  opens(n: number): number {
    return this.openCounts.get(n) ?? 0;
  }

  /** VFIO_GROUP_GET_STATUS calls on every handle of group n. */
  statusCalls(n: number): number {
    let t = 0;
    for (const h of this.handles) if (h.number === n) t += h.statusCalls;
    return t;
  }

  attempts(n: number): number {
    return this.attemptCounts.get(n) ?? 0;
  }

  closes(n: number): number {
    return this.closeCounts.get(n) ?? 0;
  }

  /** Handles of group n opened and not yet closed. */
  live(n: number): number {
    return this.handles.filter((h) => h.number === n && !h.closed).length;
  }

  get totalOpens(): number {
    return sum(this.openCounts);
  }

  get totalCloses(): number {
    return sum(this.closeCounts);
  }

  /** @internal used by DoubleGroup. */
  count(m: Map<number, number>, n: number): void {
    m.set(n, (m.get(n) ?? 0) + 1);
  }
}

function sum(m: Map<number, number>): number {
  let t = 0;
  for (const v of m.values()) t += v;
  return t;
}

/** A promise with its resolve, to hold an async step until the test lets it go. */
export function gate(): { promise: Promise<void>; open: () => void } {
  let open!: () => void;
  const promise = new Promise<void>((r) => (open = r));
  return { promise, open };
}

/** A VmmHost double: /dev/null stands in for the fds, memlock requests are recorded. */
export class HostDouble implements VmmHost {
  readonly memlock: { pid: number; bytes: number }[] = [];
  memlockErrno?: number;
  readonly #kvm = new OwnedFd(openSync('/dev/null', 'r'), '/dev/kvm (double)');
  lendKvm(): SendableFd {
    return this.#kvm.lend();
  }
  /** Closes the stand-in /dev/kvm fd. */
  close(): void {
    this.#kvm.closeSync();
  }
  async openContainer(): Promise<OwnedFd | null> {
    return null;
  }
  /** iommufds opened (fresh /dev/null fds), for a test to check each VMM got its own. */
  readonly iommufds: OwnedFd[] = [];
  async openIommufd(): Promise<OwnedFd> {
    const fd = new OwnedFd(openSync('/dev/null', 'r'), '/dev/iommu (double)');
    this.iommufds.push(fd);
    return fd;
  }
  setMemlock(pid: number, bytes: number): void {
    if (this.memlockErrno !== undefined) throw new SysError('prlimit(RLIMIT_MEMLOCK)', `pid ${pid}`, this.memlockErrno);
    this.memlock.push({ pid, bytes });
  }
}
