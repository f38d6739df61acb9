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
 * of the same handle counts too, so double closes show up). `lend()` lends
 * a real fd of /dev/null, since the pool's callers need a real fd number;
 * it is closed with the handle.
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

  constructor(double: KernelDouble, number: number, path: string) {
    this.#double = double;
    this.number = number;
    this.path = path;
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

  /** The double's own fd (/dev/null: the pool's callers need a real number), opened on first loan. */
  #own?: OwnedFd;
  lend(): SendableFd {
    if (this.closed) throw new Error(`double: lend() on closed group ${this.number}`);
    this.#own ??= new OwnedFd(openSync('/dev/null', 'r'), this.path);
    return this.#own.lend();
  }

  async close(): Promise<void> {
    this.#own?.closeSync();
    this.closeCalls++;
    this.#double.count(this.#double.closeCounts, this.number);
  }
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
    const g = new DoubleGroup(this, n, path);
    this.handles.push(g);
    this.count(this.openCounts, n);
    return g;
  };

  opens(n: number): number {
    return this.openCounts.get(n) ?? 0;
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
  setMemlock(pid: number, bytes: number): void {
    if (this.memlockErrno !== undefined) throw new SysError('prlimit(RLIMIT_MEMLOCK)', `pid ${pid}`, this.memlockErrno);
    this.memlock.push({ pid, bytes });
  }
}
