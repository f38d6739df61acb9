/**
 * The IOMMU group pool: what the host has (sysfs), which groups the daemon
 * holds open, and who holds each group it gave out.
 *
 * A VFIO group file opens once system-wide (EBUSY), and that rule is the
 * pool's witness. A group is, for the pool:
 *   free      nobody's; the daemon may keep its own open of it (from an
 *             earlier claim), ready for the next VM;
 *   claimed   reserved for a VM whose VMM has not been given it: the daemon
 *             keeps the only open file;
 *   vmm       handed to the VM's VMM: the daemon sent its file and closed its
 *             own copy, so the VM's record, not an fd, says who holds it;
 *   stray     its VM let it go (the VMM exited, or a removal), but the
 *             daemon's fresh open still fails: some process kept the file
 *             (a forked child, say), and it is named.
 * A group goes back to free only when the daemon's own fresh open() of
 * /dev/vfio/N succeeds: then no process holds it, whatever a VMM said.
 * A stray group is tried again when one of its holders exits (a pidfd) and
 * otherwise on a bounded backoff, never in a hot loop.
 *
 * A claim is all-or-nothing: a call that fails claims nothing and closes
 * what it opened.
 */
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import type { SendableFd, VfioGroupStatus } from '../kernel';
import { OwnedFd, SysError } from '../kernel';
import { AlreadyExistsError, FailedPreconditionError, NotFoundError, ResourceExhaustedError } from './errors';
import { type FileHolder, findFileHolders } from './holders';
import { type GroupInventory, readIommuGroup, readIommuGroups } from './sysfs';

/** What the pool needs of an open group; src/kernel's VfioGroup is one. */
export interface GroupHandle {
  readonly number: number;
  readonly path: string;
  status(): VfioGroupStatus;
  unsetContainer(): void;
  /**
   * The group's fd itself, to send to a VMM: the sender closes it once sent
   * and this handle is done. The daemon keeps no copy of a file it hands out.
   */
  handOver(): SendableFd;
  close(): Promise<void>;
}

export type OpenGroup = (path: string, number: number) => Promise<GroupHandle>;

export interface GroupOwner {
  vmId: string;
  vmName: string;
}

export type Holding = 'claimed' | 'vmm' | 'stray';

/** group: the VMM gets the group file; cdev: a fresh open of each device's cdev (the daemon then keeps no group fd, which would make the VMM's bind EBUSY). */
export type HandoffMode = 'group' | 'cdev';

export interface GroupHold {
  holding: Holding;
  /** Default group. */
  mode?: HandoffMode;
  /** The VM that holds it (claimed, vmm), or whose VMM left it held (stray). */
  owner: GroupOwner;
  /** stray: the processes found holding /dev/vfio/N (where /proc shows them), by pid. */
  holders?: FileHolder[];
  /** stray: since when (RFC 3339). */
  since?: string;
}

export interface GroupView extends GroupInventory {
  /** The VM holding the group, or (stray) the VM whose VMM left it held. */
  owner?: GroupOwner;
  holding: Holding | 'free';
  holders: FileHolder[];
  /** stray: since when. */
  since?: string;
  openInDaemon: boolean;
}

/** Watches a process (a holder of a stray group) and calls back once it exits; returns the cancel. */
export type WatchExit = (pid: number, onExit: () => void) => (() => void) | undefined;

export interface PoolOptions {
  sysfsRoot: string;
  devRoot: string;
  procRoot?: string;
  openGroup: OpenGroup;
  /** Opens a device cdev for a VMM (O_RDWR, close-on-exec); a seam for tests. */
  openDeviceCdev?: (path: string) => Promise<SendableFd>;
  /** Who holds a file open (default: findFileHolders over procRoot); a seam for tests. */
  findHolders?: (path: string) => Promise<FileHolder[]>;
  /** Tells when a holder of a stray group exits, so the group is tried again at once. */
  watchExit?: WatchExit;
  /** Backoff of the retries of a stray group, in ms: each failure waits the next, then the last again. */
  retryDelaysMs?: readonly number[];
  /** Told when a group's status cannot be read (an ordinary file in a test tree). */
  onStatusUnavailable?: (group: number, err: SysError) => void;
  /** Told when the daemon opens a group's fd (to put it in the fd store) and when it closes or hands one over. */
  onOpened?: (group: number, handle: GroupHandle) => void;
  onClosed?: (group: number) => void;
  /** Told whenever who-holds-what changed, with the groups whose hold changed (for the state file). */
  onClaimsChanged?: (groups: readonly number[]) => void;
  /** A stray group came back: the daemon's open succeeded. `owner` is the VM its VMM had been. */
  onStrayReturned?: (group: number, owner: GroupOwner) => void;
  /** A group became stray, or its holders changed. */
  onStray?: (group: number, hold: GroupHold) => void;
  log?: (event: Record<string, unknown>, msg: string) => void;
}

/** A device cdev opened for a VMM: read-write (QEMU needs config space and BARs), close-on-exec; the open only allocates (the bind is the VMM's ioctl). */
async function openCdev(path: string): Promise<SendableFd> {
  return OwnedFd.openDevice(path);
}

/** 100 ms up to a minute: a holder's exit usually cuts it short (watchExit). */
export const DEFAULT_RETRY_DELAYS_MS = [100, 250, 500, 1000, 2000, 5000, 10_000, 30_000, 60_000] as const;
/** Holders watched per stray group, at most. */
const MAX_WATCHED_HOLDERS = 8;
/** The /proc scan for holders runs at most this often per group. */
const RESCAN_MS = 1000;

interface Retry {
  timer?: NodeJS.Timeout;
  attempt: number;
  watches: Map<number, () => void>;
  scannedAt: number;
  running?: Promise<boolean>;
}

/** "pid 412 (uid 65534, refvmm)", or what the kernel leaves unnamed. */
export function describeHolders(holders: readonly FileHolder[] | undefined, path: string): string {
  if (!holders?.length) return `a process kvmvfiod cannot name (no open fd of ${path} in /proc: a KVM VM fd or an fd in flight may hold it)`;
  return holders.map((h) => `pid ${h.pid} (uid ${h.uid}, ${h.comm})`).join(', ');
}

export class GroupPool {
  readonly #opts: PoolOptions;
  readonly #open = new Map<number, GroupHandle>();
  readonly #holds = new Map<number, GroupHold>();
  readonly #retries = new Map<number, Retry>();
  #closed = false;
  /** Groups whose node answered VFIO_GROUP_GET_STATUS with ENOTTY/EINVAL, already reported. */
  readonly #statusUnavailableTold = new Set<number>();

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

  /** The VM that holds the group (claimed, or handed to its VMM); undefined for a free or stray group. */
  ownerOf(n: number): GroupOwner | undefined {
    const h = this.#holds.get(n);
    return h && h.holding !== 'stray' ? h.owner : undefined;
  }

  holdOf(n: number): Readonly<GroupHold> | undefined {
    return this.#holds.get(n);
  }

  /** Groups claimed or handed out (stray ones not counted). */
  get claimedCount(): number {
    let n = 0;
    for (const h of this.#holds.values()) if (h.holding !== 'stray') n++;
    return n;
  }

  get openCount(): number {
    return this.#open.size;
  }

  /** The daemon's own handle of a group it holds open (free or claimed). */
  handle(n: number): GroupHandle | undefined {
    return this.#open.get(n);
  }

  /**
   * Claims every group of `numbers` for `owner`, or none. Ownership is
   * reserved synchronously before the first await, so two concurrent claims
   * of one group cannot both win. A stray group is tried once more first:
   * its claim is refused, naming the holders, unless the daemon's open now
   * succeeds.
   */
  async claim(numbers: readonly number[], owner: GroupOwner, mode: HandoffMode = 'group'): Promise<void> {
    const strays = numbers.filter((n) => this.#holds.get(n)?.holding === 'stray');
    if (strays.length) await Promise.all(strays.map((n) => this.retryStray(n)));
    for (const n of numbers) {
      const hold = this.#holds.get(n);
      if (!hold) continue;
      if (hold.holding === 'stray') {
        throw new FailedPreconditionError(
          `IOMMU group ${n} is held by ${describeHolders(hold.holders, this.groupPath(n))}, outside any VM: it was handed to the VMM of vm ${hold.owner.vmName} (${hold.owner.vmId}), which has let it go, but the process still holds ${this.groupPath(n)}; it comes back when that process closes it`,
        );
      }
      if (hold.owner.vmId === owner.vmId) throw new AlreadyExistsError(`IOMMU group ${n} is already in vm ${owner.vmName}`);
      throw new FailedPreconditionError(`IOMMU group ${n} is held by vm ${hold.owner.vmName} (${hold.owner.vmId})`);
    }
    for (const n of numbers) this.#holds.set(n, { holding: 'claimed', owner, ...(mode === 'cdev' ? { mode } : {}) });
    if (numbers.length) this.#opts.onClaimsChanged?.(numbers);
    const openedHere: number[] = [];
    try {
      for (const n of numbers) {
        // A group the daemon holds open answers for itself: VIABLE from VFIO_GROUP_GET_STATUS is the kernel's word,
        // and sysfs is read only to say why not, for a node that cannot answer, or to list a cdev handoff's devices.
        if (mode === 'group' && this.#open.has(n) && this.#kernelSaysViable(n)) continue;
        const inv = await this.#inventory(n);
        if (!inv.viable) {
          throw new FailedPreconditionError(`IOMMU group ${n} is not viable: ${inv.notViableReasons.join('; ')}`);
        }
        if (mode === 'cdev') {
          const without = inv.devices.filter((d) => !d.cdev).map((d) => d.address);
          if (without.length) {
            throw new FailedPreconditionError(
              `IOMMU group ${n}: ${without.join(', ')} has no VFIO device cdev (it needs vfio-pci on a kernel with CONFIG_VFIO_DEVICE_CDEV, 6.6+); create the VM with the GROUP handoff`,
            );
          }
        }
        if (!this.#open.has(n)) {
          const handle = await this.#openGroup(n);
          this.#open.set(n, handle);
          openedHere.push(n);
          this.#opts.onOpened?.(n, handle);
        }
        this.#checkStatus(n);
        // The daemon's open proved nobody holds the group; for a cdev handoff it must not stay open (the VMM's bind would be EBUSY).
        if (mode === 'cdev') await this.#closeGroup(n);
      }
    } catch (e) {
      for (const n of numbers) if (this.#holds.get(n)?.owner === owner) this.#holds.delete(n);
      this.#opts.onClaimsChanged?.(numbers);
      await Promise.all(openedHere.map((n) => this.#closeGroup(n)));
      throw e;
    }
  }

  /**
   * The daemon's fd of a group claimed by `vmId`, to send to its VMM. From
   * here on the daemon has no copy (the fd store's is removed too): the
   * caller sends it and closes it, and the group is held by the VM until
   * letGo() sees it free again.
   */
  handOver(n: number, vmId: string): SendableFd {
    const hold = this.#holds.get(n);
    if (!hold || hold.owner.vmId !== vmId || hold.holding !== 'claimed' || hold.mode === 'cdev') {
      throw new Error(`group ${n} is not claimed by vm ${vmId} for a group handoff (${hold ? `${hold.holding}, ${hold.mode ?? 'group'}` : 'free'})`);
    }
    const handle = this.#open.get(n);
    if (!handle) {
      throw new FailedPreconditionError(`IOMMU group ${n} of vm ${hold.owner.vmName} is not open in kvmvfiod (it could not be opened again after a restart); delete the VM and create it again`);
    }
    this.#open.delete(n);
    this.#opts.onClosed?.(n);
    hold.holding = 'vmm';
    this.#opts.onClaimsChanged?.([n]);
    return handle.handOver();
  }

  /**
   * The handoff of a VM whose request left it to the host: cdev where the
   * kernel has iommufd and device cdevs and every device of `groups` has a
   * cdev (what released VMMs take); group otherwise, and for a VM created
   * without groups.
   */
  async defaultHandoff(groups: readonly number[]): Promise<HandoffMode> {
    if (!groups.length || !existsSync(join(this.#opts.devRoot, 'iommu')) || !existsSync(join(this.#opts.devRoot, 'vfio', 'devices'))) return 'group';
    for (const n of groups) {
      const inv = await readIommuGroup(this.#opts.sysfsRoot, n);
      if (!inv || !inv.devices.length || inv.devices.some((d) => !d.cdev)) return 'group';
    }
    return 'cdev';
  }

  /**
   * A fresh O_RDWR open of the cdev of each device of group `n`, claimed by
   * `vmId` for a cdev handoff, for its VMM: the caller sends them and closes
   * them; the daemon keeps no copy. The group is then the VM's until the
   * daemon's open of /dev/vfio/N succeeds again (while a cdev of it is bound,
   * that open is EBUSY).
   */
  async handOverDevices(n: number, vmId: string): Promise<{ address: string; fd: SendableFd }[]> {
    const hold = this.#holds.get(n);
    if (!hold || hold.owner.vmId !== vmId || hold.holding !== 'claimed' || hold.mode !== 'cdev') {
      throw new Error(`group ${n} is not claimed by vm ${vmId} for a cdev handoff (${hold ? `${hold.holding}, ${hold.mode ?? 'group'}` : 'free'})`);
    }
    const inv = await this.#inventory(n);
    const open = this.#opts.openDeviceCdev ?? openCdev;
    const out: { address: string; fd: SendableFd }[] = [];
    try {
      for (const d of inv.devices) {
        if (!d.cdev) throw new FailedPreconditionError(`IOMMU group ${n}: ${d.address} has no VFIO device cdev any more`);
        out.push({ address: d.address, fd: await open(join(this.#opts.devRoot, 'vfio', 'devices', d.cdev)) });
      }
    } catch (e) {
      for (const o of out) o.fd.closeSync();
      throw e instanceof SysError ? new FailedPreconditionError(`IOMMU group ${n}: ${e.message}`) : e;
    }
    if (this.#holds.get(n) !== hold) {
      for (const o of out) o.fd.closeSync();
      throw new FailedPreconditionError(`IOMMU group ${n} left vm ${hold.owner.vmName} while its devices were opened`);
    }
    hold.holding = 'vmm';
    this.#opts.onClaimsChanged?.([n]);
    return out;
  }

  /**
   * VM `vmId` no longer wants group `n` (a removal, a failed add, its VMM
   * gone). A group the daemon still holds (claimed) is free at once; one it
   * handed out is free only if the daemon's fresh open succeeds. Otherwise
   * it stays held by the VM while `vmmAlive` (its VMM still has the file),
   * or becomes stray, with its holders named and retries scheduled.
   * Returns what the group is now.
   */
  async letGo(n: number, vmId: string, vmmAlive: boolean): Promise<Holding | 'free'> {
    const hold = this.#holds.get(n);
    if (!hold || hold.owner.vmId !== vmId || hold.holding === 'stray') return hold?.holding ?? 'free';
    if (hold.holding === 'claimed') {
      this.#holds.delete(n);
      this.#opts.onClaimsChanged?.([n]);
      return 'free';
    }
    if (await this.#witness(n, hold)) return 'free';
    if (this.#holds.get(n) !== hold) return this.#holds.get(n)?.holding ?? 'free';
    if (vmmAlive) return 'vmm';
    hold.holding = 'stray';
    hold.since = new Date().toISOString();
    hold.holders = await this.#holders(n);
    // A claim may have tried it again meanwhile (retryStray) and won it back: then it is not stray.
    if (this.#holds.get(n) !== hold) return this.#holds.get(n)?.holding ?? 'free';
    this.#opts.onClaimsChanged?.([n]);
    this.#opts.log?.(
      { event: 'group-stray', group: n, vm: hold.owner.vmId, holders: hold.holders },
      `IOMMU group ${n} is still held after its VM let it go; it stays out of the pool until the holder closes it`,
    );
    this.#opts.onStray?.(n, hold);
    this.#scheduleRetry(n, true);
    return 'stray';
  }

  /**
   * Tries a stray group again now: true when it is back (free). Concurrent
   * calls share one attempt.
   */
  retryStray(n: number): Promise<boolean> {
    const hold = this.#holds.get(n);
    if (!hold || hold.holding !== 'stray') return Promise.resolve(!hold);
    const r = this.#retryState(n);
    r.running ??= (async () => {
      try {
        if (await this.#witness(n, hold)) return true;
        if (Date.now() - r.scannedAt >= RESCAN_MS) {
          const holders = await this.#holders(n);
          r.scannedAt = Date.now();
          if (this.#holds.get(n) === hold && JSON.stringify(holders) !== JSON.stringify(hold.holders)) {
            hold.holders = holders;
            this.#opts.onClaimsChanged?.([n]);
            this.#opts.onStray?.(n, hold);
          }
          this.#watchHolders(n, holders);
        }
        return false;
      } finally {
        r.running = undefined;
      }
    })();
    return r.running;
  }

  /** Gives claimed groups (never handed to a VMM) back to the pool. The daemon keeps their fds open for the next VM. */
  release(numbers: readonly number[], vmId: string): void {
    const changed: number[] = [];
    for (const n of numbers) {
      const hold = this.#holds.get(n);
      if (hold?.owner.vmId === vmId && hold.holding === 'claimed') {
        this.#holds.delete(n);
        changed.push(n);
      }
    }
    if (changed.length) this.#opts.onClaimsChanged?.(changed);
  }

  /** The groups `vmId` holds (claimed or handed to its VMM), ascending. */
  heldBy(vmId: string): number[] {
    return this.#groupsOf(vmId, (h) => h.holding !== 'stray');
  }

  /** The stray groups `vmId`'s VMM left held, ascending. */
  strayOf(vmId: string): number[] {
    return this.#groupsOf(vmId, (h) => h.holding === 'stray');
  }

  /** How many groups are held by, or left stray by, any of `vmIds`: O(held groups), not O(VMs). */
  heldByAny(vmIds: ReadonlySet<string>): number {
    let n = 0;
    for (const h of this.#holds.values()) if (vmIds.has(h.owner.vmId)) n++;
    return n;
  }

  /** Takes a group fd the daemon held before a restart (from the fd store). */
  adopt(n: number, handle: GroupHandle): void {
    if (this.#open.has(n)) throw new Error(`group ${n} adopted twice`);
    this.#open.set(n, handle);
  }

  /** Restores a hold from before a restart; a stray one is tried again soon. */
  restoreHold(n: number, hold: GroupHold): void {
    this.#holds.set(n, { ...hold, owner: { ...hold.owner } });
    if (hold.holding === 'stray') this.#scheduleRetry(n, true);
  }

  /** Opens a claimed group again whose fd did not come back from the fd store. False when it could not. */
  async reopen(n: number): Promise<boolean> {
    if (this.#open.has(n)) return true;
    try {
      const handle = await this.#opts.openGroup(this.groupPath(n), n);
      this.#open.set(n, handle);
      this.#opts.onOpened?.(n, handle);
      return true;
    } catch {
      return false;
    }
  }

  /** Every hold, for the state file. */
  claims(): { group: number; vmId: string; vmName: string; holding: Holding; mode?: HandoffMode; holders?: FileHolder[]; since?: string }[] {
    return [...this.#holds].map(([group, h]) => this.claimOf(group, h)!).sort((a, b) => a.group - b.group);
  }

  claimOf(group: number, h = this.#holds.get(group)) {
    if (!h) return undefined;
    return { group, vmId: h.owner.vmId, vmName: h.owner.vmName, holding: h.holding, ...(h.mode === 'cdev' ? { mode: h.mode } : {}), ...(h.holding === 'stray' ? { holders: h.holders ?? [], since: h.since } : {}) };
  }

  /**
   * Closes every group fd the daemon holds and stops every retry. For
   * shutdown: `onClosed` is not told, so the fd store keeps its copies for
   * the next start.
   */
  async closeAll(): Promise<void> {
    this.#closed = true;
    for (const n of [...this.#retries.keys()]) this.#stopRetry(n);
    const all = [...this.#open.keys()];
    this.#holds.clear();
    await Promise.all(all.map((n) => this.#closeGroup(n, false)));
  }

  /**
   * The witness: the daemon's own open of /dev/vfio/N. Success means no
   * process holds the group: it is free again, kept open by the daemon, with
   * no container left set. EBUSY (or any failure) leaves the hold as it is.
   */
  async #witness(n: number, hold: GroupHold): Promise<boolean> {
    if (this.#open.has(n)) {
      // Cannot happen for a group handed out (the daemon closed its copy); if it does, the daemon's own fd proves nothing.
      return false;
    }
    let handle: GroupHandle;
    try {
      handle = await this.#opts.openGroup(this.groupPath(n), n);
    } catch (e) {
      if (!(e instanceof SysError && e.code === 'EBUSY')) {
        this.#opts.log?.({ event: 'group-witness-failed', group: n, err: (e as Error).message }, `could not open IOMMU group ${n} to take it back`);
      }
      return false;
    }
    if (this.#closed || this.#holds.get(n) !== hold || this.#open.has(n)) {
      await handle.close();
      return false;
    }
    try {
      if (handle.status().containerSet) handle.unsetContainer();
    } catch (e) {
      if (!(e instanceof SysError && (e.code === 'ENOTTY' || e.code === 'EINVAL'))) {
        this.#opts.log?.({ event: 'group-clean-failed', group: n, err: (e as Error).message }, 'could not unset the VFIO container');
      }
    }
    this.#open.set(n, handle);
    this.#opts.onOpened?.(n, handle);
    this.#holds.delete(n);
    this.#stopRetry(n);
    this.#opts.onClaimsChanged?.([n]);
    if (hold.holding === 'stray') {
      this.#opts.log?.({ event: 'group-returned', group: n, vm: hold.owner.vmId }, `stray IOMMU group ${n} is back in the pool`);
      this.#opts.onStrayReturned?.(n, hold.owner);
    }
    return true;
  }

  #retryState(n: number): Retry {
    let r = this.#retries.get(n);
    if (!r) {
      r = { attempt: 0, watches: new Map(), scannedAt: 0 };
      this.#retries.set(n, r);
    }
    return r;
  }

  /** The next retry of a stray group after the current backoff step (`fresh`: from the start). */
  #scheduleRetry(n: number, fresh = false): void {
    if (this.#closed) return;
    const r = this.#retryState(n);
    if (fresh) {
      r.attempt = 0;
      r.scannedAt = Date.now();
      this.#watchHolders(n, this.#holds.get(n)?.holders ?? []);
    }
    clearTimeout(r.timer);
    const delays = this.#opts.retryDelaysMs ?? DEFAULT_RETRY_DELAYS_MS;
    const ms = delays[Math.min(r.attempt, delays.length - 1)];
    r.attempt++;
    r.timer = setTimeout(() => void this.#retryNow(n), ms);
    r.timer.unref();
  }

  async #retryNow(n: number): Promise<void> {
    if (!(await this.retryStray(n)) && this.#holds.get(n)?.holding === 'stray') this.#scheduleRetry(n);
  }

  /** Watches up to MAX_WATCHED_HOLDERS holders: each exit tries the group again at once. */
  #watchHolders(n: number, holders: readonly FileHolder[]): void {
    const watch = this.#opts.watchExit;
    if (!watch) return;
    const r = this.#retryState(n);
    const wanted = new Set(holders.slice(0, MAX_WATCHED_HOLDERS).map((h) => h.pid));
    for (const [pid, cancel] of r.watches) {
      if (!wanted.has(pid)) {
        cancel();
        r.watches.delete(pid);
      }
    }
    for (const pid of wanted) {
      if (r.watches.has(pid)) continue;
      const cancel = watch(pid, () => {
        r.watches.get(pid)?.();
        r.watches.delete(pid);
        void this.#retryNow(n);
      });
      if (cancel) r.watches.set(pid, cancel);
    }
  }

  #stopRetry(n: number): void {
    const r = this.#retries.get(n);
    if (!r) return;
    clearTimeout(r.timer);
    for (const cancel of r.watches.values()) cancel();
    this.#retries.delete(n);
  }

  #groupsOf(vmId: string, take: (h: GroupHold) => boolean): number[] {
    const out: number[] = [];
    for (const [n, h] of this.#holds) if (h.owner.vmId === vmId && take(h)) out.push(n);
    return out.sort((a, b) => a - b);
  }

  /** Who holds the group's file, or (a cdev handoff) one of its devices' cdevs. */
  async #holders(n: number): Promise<FileHolder[]> {
    const find = this.#opts.findHolders ?? ((p: string) => findFileHolders(this.#opts.procRoot ?? '/proc', p));
    const paths = [this.groupPath(n)];
    if (this.#holds.get(n)?.mode === 'cdev') {
      const inv = await readIommuGroup(this.#opts.sysfsRoot, n).catch(() => undefined);
      for (const d of inv?.devices ?? []) if (d.cdev) paths.push(join(this.#opts.devRoot, 'vfio', 'devices', d.cdev));
    }
    const found = new Map<number, FileHolder>();
    for (const p of paths) for (const h of await find(p).catch(() => [])) found.set(h.pid, h);
    return [...found.values()].sort((a, b) => a.pid - b.pid);
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
        throw new FailedPreconditionError(`IOMMU group ${n} is busy: ${path} is held by ${describeHolders(await this.#holders(n), path)} (open: EBUSY)`);
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

  /** VFIO_GROUP_GET_STATUS of the daemon's open group says viable; false when it says not, or cannot say. */
  #kernelSaysViable(n: number): boolean {
    try {
      return this.#open.get(n)!.status().viable;
    } catch {
      return false;
    }
  }

  /**
   * VFIO_GROUP_GET_STATUS must say viable. A node that is not a VFIO group
   * (ENOTTY: an ordinary file in a test tree) cannot be asked; sysfs's
   * answer stands and the caller is told, once per group.
   */
  #checkStatus(n: number): void {
    const g = this.#open.get(n)!;
    let status: VfioGroupStatus;
    try {
      status = g.status();
    } catch (e) {
      if (e instanceof SysError && (e.code === 'ENOTTY' || e.code === 'EINVAL')) {
        if (!this.#statusUnavailableTold.has(n)) {
          this.#statusUnavailableTold.add(n);
          this.#opts.onStatusUnavailable?.(n, e);
        }
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
    const hold = this.#holds.get(g.number);
    return { ...g, owner: hold?.owner, holding: hold?.holding ?? 'free', holders: hold?.holders ?? [], since: hold?.since, openInDaemon: this.#open.has(g.number) };
  }
}
