/**
 * The IOMMU group pool: what the host has (sysfs), which groups the daemon
 * holds open, and which VM each claimed group belongs to.
 *
 * Claiming opens /dev/vfio/N once and keeps the fd for the daemon's life: a
 * group file opens only once system-wide, and KVM keeps the group held while
 * it references it, so the daemon never needs to (and could not) reopen it.
 * A claim is all-or-nothing: a call that fails claims nothing and closes
 * what it opened.
 */
import { join } from 'node:path';
import type { SendableFd, VfioGroupStatus } from '../kernel';
import { SysError } from '../kernel';
import { AlreadyExistsError, FailedPreconditionError, NotFoundError, ResourceExhaustedError } from './errors';
import { findFileHolders } from './holders';
import { type GroupInventory, readIommuGroup, readIommuGroups } from './sysfs';

/** What the pool needs of an open group; src/kernel's VfioGroup is one. */
export interface GroupHandle {
  readonly number: number;
  readonly path: string;
  status(): VfioGroupStatus;
  unsetContainer(): void;
  /** The daemon's own group fd, lent to send to a VMM. */
  lend(): SendableFd;
  close(): Promise<void>;
}

export type OpenGroup = (path: string, number: number) => Promise<GroupHandle>;

export interface GroupOwner {
  vmId: string;
  vmName: string;
}

export interface GroupView extends GroupInventory {
  owner?: GroupOwner;
  openInDaemon: boolean;
}

export interface PoolOptions {
  sysfsRoot: string;
  devRoot: string;
  procRoot?: string;
  openGroup: OpenGroup;
  /** Told when a group's status cannot be read (an ordinary file in a test tree). */
  onStatusUnavailable?: (group: number, err: SysError) => void;
  /** Told when the daemon opens a group's fd (to put it in the fd store) and when it closes one. */
  onOpened?: (group: number, handle: GroupHandle) => void;
  onClosed?: (group: number) => void;
  /** Told whenever who-holds-what changed, with the groups whose holder changed (for the state file). */
  onClaimsChanged?: (groups: readonly number[]) => void;
}

export class GroupPool {
  readonly #opts: PoolOptions;
  readonly #open = new Map<number, GroupHandle>();
  readonly #owners = new Map<number, GroupOwner>();

  constructor(opts: PoolOptions) {
    this.#opts = opts;
  }

  groupPath(n: number): string {
    return join(this.#opts.devRoot, 'vfio', String(n));
  }

  async list(): Promise<GroupView[]> {
    const groups = await readIommuGroups(this.#opts.sysfsRoot);
    return groups.map((g) => this.#view(g));
  }

  /** NotFoundError when the host has no such group. */
  async get(n: number): Promise<GroupView> {
    return this.#view(await this.#inventory(n));
  }

  ownerOf(n: number): GroupOwner | undefined {
    return this.#owners.get(n);
  }

  get claimedCount(): number {
    return this.#owners.size;
  }

  get openCount(): number {
    return this.#open.size;
  }

  /** The daemon's own handle of a claimed group (to lend to a VMM, or to clean). */
  handle(n: number): GroupHandle | undefined {
    return this.#open.get(n);
  }

  /**
   * Claims every group of `numbers` for `owner`, or none. Ownership is
   * reserved synchronously before the first await, so two concurrent claims
   * of one group cannot both win.
   */
  async claim(numbers: readonly number[], owner: GroupOwner): Promise<void> {
    for (const n of numbers) {
      const holder = this.#owners.get(n);
      if (holder?.vmId === owner.vmId) throw new AlreadyExistsError(`IOMMU group ${n} is already in vm ${owner.vmName}`);
      if (holder) throw new FailedPreconditionError(`IOMMU group ${n} is held by vm ${holder.vmName} (${holder.vmId})`);
    }
    for (const n of numbers) this.#owners.set(n, owner);
    if (numbers.length) this.#opts.onClaimsChanged?.(numbers);
    const openedHere: number[] = [];
    try {
      for (const n of numbers) {
        const inv = await this.#inventory(n);
        if (!inv.viable) {
          throw new FailedPreconditionError(`IOMMU group ${n} is not viable: ${inv.notViableReasons.join('; ')}`);
        }
        if (!this.#open.has(n)) {
          const handle = await this.#openGroup(n);
          this.#open.set(n, handle);
          openedHere.push(n);
          this.#opts.onOpened?.(n, handle);
        }
        this.#checkStatus(n);
      }
    } catch (e) {
      for (const n of numbers) if (this.#owners.get(n) === owner) this.#owners.delete(n);
      this.#opts.onClaimsChanged?.(numbers);
      await Promise.all(openedHere.map((n) => this.#closeGroup(n)));
      throw e;
    }
  }

  /** Gives groups back to the pool. The daemon keeps their fds open for the next VM. */
  release(numbers: readonly number[], vmId: string): void {
    const changed: number[] = [];
    for (const n of numbers) {
      if (this.#owners.get(n)?.vmId === vmId) {
        this.#owners.delete(n);
        changed.push(n);
      }
    }
    if (changed.length) this.#opts.onClaimsChanged?.(changed);
  }

  /** The groups `vmId` holds, ascending. */
  heldBy(vmId: string): number[] {
    return [...this.#owners].filter(([, o]) => o.vmId === vmId).map(([n]) => n).sort((a, b) => a - b);
  }

  /** Takes a group fd the daemon held before a restart (from the fd store). */
  adopt(n: number, handle: GroupHandle): void {
    if (this.#open.has(n)) throw new Error(`group ${n} adopted twice`);
    this.#open.set(n, handle);
  }

  /** Restores who held a group before a restart. */
  restoreOwner(n: number, owner: GroupOwner): void {
    this.#owners.set(n, owner);
  }

  /** Every claim, for the state file. */
  /** How many claimed groups are held by any of `vmIds`: O(claimed groups), not O(VMs). */
  heldByAny(vmIds: ReadonlySet<string>): number {
    let n = 0;
    for (const o of this.#owners.values()) if (vmIds.has(o.vmId)) n++;
    return n;
  }

  claims(): { group: number; vmId: string; vmName: string }[] {
    return [...this.#owners].map(([group, o]) => ({ group, ...o })).sort((a, b) => a.group - b.group);
  }

  /**
   * Closes every group fd the daemon holds. For shutdown: `onClosed` is not
   * told, so the fd store keeps its copies for the next start.
   */
  async closeAll(): Promise<void> {
    const all = [...this.#open.keys()];
    this.#owners.clear();
    await Promise.all(all.map((n) => this.#closeGroup(n, false)));
  }

  async #inventory(n: number): Promise<GroupInventory> {
    const inv = await readIommuGroup(this.#opts.sysfsRoot, n);
    if (!inv) throw new NotFoundError(`IOMMU group ${n} does not exist on this host`);
    return inv;
  }

  async #openGroup(n: number): Promise<GroupHandle> {
    const path = this.groupPath(n);
    try {
      return await this.#opts.openGroup(path, n);
    } catch (e) {
      if (!(e instanceof SysError)) throw e;
      if (e.code === 'EBUSY') {
        const holders = await findFileHolders(this.#opts.procRoot ?? '/proc', path).catch(() => []);
        const who = holders.length
          ? `held by ${holders.map((h) => `pid ${h.pid} (${h.comm})`).join(', ')}`
          : 'held by another process';
        throw new FailedPreconditionError(`IOMMU group ${n} is busy: ${path} is ${who} (open: EBUSY)`);
      }
      if (e.code === 'ENOENT') {
        throw new FailedPreconditionError(`IOMMU group ${n}: ${path} does not exist (open: ENOENT); is vfio-pci loaded and the group bound to it?`);
      }
      if (e.code === 'EMFILE' || e.code === 'ENFILE') {
        throw new ResourceExhaustedError(`IOMMU group ${n}: the daemon is out of file descriptors (open ${path}: ${e.code})`);
      }
      throw e;
    }
  }

  /**
   * VFIO_GROUP_GET_STATUS must say viable. A node that is not a VFIO group
   * (ENOTTY: an ordinary file in a test tree) cannot be asked; sysfs's
   * answer stands and the caller is told.
   */
  #checkStatus(n: number): void {
    const g = this.#open.get(n)!;
    let status: VfioGroupStatus;
    try {
      status = g.status();
    } catch (e) {
      if (e instanceof SysError && (e.code === 'ENOTTY' || e.code === 'EINVAL')) {
        this.#opts.onStatusUnavailable?.(n, e);
        return;
      }
      throw e;
    }
    if (!status.viable) {
      throw new FailedPreconditionError(`IOMMU group ${n} is not viable (VFIO_GROUP_GET_STATUS); bind every device of the group to vfio-pci`);
    }
  }

  async #closeGroup(n: number, tell = true): Promise<void> {
    const g = this.#open.get(n);
    this.#open.delete(n);
    if (g && tell) this.#opts.onClosed?.(n);
    await g?.close();
  }

  #view(g: GroupInventory): GroupView {
    return { ...g, owner: this.#owners.get(g.number), openInDaemon: this.#open.has(g.number) };
  }
}
