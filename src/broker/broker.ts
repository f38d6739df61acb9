/**
 * The domain rules: who sees which VM, what a call may change in which
 * state, and the claims on IOMMU groups that go with it. No gRPC here: the
 * server turns requests into these calls and errors into statuses.
 */
import { AlreadyExistsError, DeadlineExceededError, DomainError, FailedPreconditionError, NotFoundError, PermissionDeniedError, ResourceExhaustedError, UnavailableError } from './errors';
import { type Principal, ROOT_NAME, UNLIMITED } from './policy';
import { KeyedMutex } from './mutex';
import type { GroupHold, GroupPool, GroupView } from './pool';
import type { IssuedToken, TokenStore } from './tokens';
import type { AttachGrant, VmmHost, VmmLink } from './vmm';
import { type NewVm, type VfioHandoff, type VmChange, type VmRecord, type VmRegistry, type VmState, ownerKey } from './vms';

export interface Caller {
  uid: number;
  gid: number;
  pid: number;
  /** The policy principal the caller acts as (set by the server's authorization); absent: no policy limits apply. */
  principal?: Principal;
}

export interface CreateVmSpec {
  name: string;
  labels: Record<string, string>;
  vmmUid: number;
  vfioDevice: boolean;
  groups: number[];
  memlockBytes: number;
  requestId: string;
  /**
   * How the VM's groups reach its VMM: the group files, or each device's
   * cdev with an iommufd. Unset: the host's default (GroupPool.defaultHandoff).
   */
  handoff?: VfioHandoff;
}

export interface VmFilter {
  labels: Record<string, string>;
  states: VmState[];
}

export interface CreateVmResult {
  vm: VmRecord;
  /** false when a retry with the same request_id returned the existing VM. */
  created: boolean;
  /** A fresh attach token (a retry mints a new one while the VM is PENDING and unattached). */
  token?: IssuedToken;
}

export interface BrokerOptions {
  tokens: TokenStore;
  /** Daemon-wide cap on VM records (RESOURCE_EXHAUSTED beyond it). */
  maxVms?: number;
  /** Throws ResourceExhaustedError when the daemon is too close to RLIMIT_NOFILE to open more fds. */
  fdGuard?: () => Promise<void>;
  host: VmmHost;
  /** How long DeleteVm waits for a VMM to exit, and a failed VMM gets before SIGKILL. */
  exitGraceMs: number;
  log?: (event: Record<string, unknown>, msg: string) => void;
  /** Told when a VM's VMM is gone (its groups are back and its record told by then), for the state file. */
  onVmmGone?: (vmId: string) => void;
  /**
   * The current policy's principal of that name ("root": uid 0's), for what
   * is checked again after the call that made a VM — a SIGHUP may have
   * changed the policy since: the memlock limits at attach. Absent (unit
   * tests): no such check.
   */
  principalNamed?: (name: string) => Principal | undefined;
}

/** Whether `p` settles within `ms`; the timer is cleared either way. */
async function within(p: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<boolean>((r) => (timer = setTimeout(() => r(false), ms)));
  try {
    return await Promise.race([p.then(() => true), late]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * The filter as a predicate, built once per listing or watch: the label pairs
 * are taken out of the filter object here, not once per record.
 */
export function vmMatcher(f: VmFilter): (vm: Readonly<VmRecord>) => boolean {
  const keys = Object.keys(f.labels);
  const values = keys.map((k) => f.labels[k]);
  const states = f.states.length ? new Set(f.states) : undefined;
  return (vm) => {
    if (states && !states.has(vm.state)) return false;
    const labels = vm.labels;
    for (let i = 0; i < keys.length; i++) if (!Object.hasOwn(labels, keys[i]) || labels[keys[i]] !== values[i]) return false;
    return true;
  };
}

/** Where a page of ListVms starts and how many records it holds at most. */
export interface PageRequest {
  /** The seq of the last record of the previous page; 0 for the first page. */
  afterSeq: number;
  /** At least 1. */
  size: number;
}

export interface VmPage {
  vms: VmRecord[];
  /**
   * The seq of the page's last record when at least one more record matches
   * after it (the next page starts there); undefined when this page ends the
   * listing.
   */
  nextAfterSeq?: number;
}

function notEditable(vm: VmRecord): FailedPreconditionError {
  return new FailedPreconditionError(`vm ${vm.name} (${vm.id}) is ${vm.state} and takes no changes`);
}

const describeError = (e: unknown) => (e instanceof Error ? e.message : String(e));

/**
 * How a VM's groups relate to its VMM: a group's file is handed to the VMM
 * (the daemon keeps no copy), and the group stays held by that VM until the
 * daemon's own fresh open of it succeeds — the kernel's single-open rule is
 * the witness, whatever the VMM answered or however many processes it
 * forked. The daemon looks when the VM lets a group go (RemoveGroup, a failed
 * AddGroup, the VMM's exit); a group some process still holds after its VMM
 * exited is stray (see pool.ts) and named in the VM's record. `vm.groups`
 * lists the groups in the VM's KVM-VFIO device (or planned for it); the pool
 * may hold more for the VM ("lingering": removed, but the VMM still has it).
 */
export class Broker {
  readonly pool: GroupPool;
  readonly vms: VmRegistry;
  readonly tokens: TokenStore;
  readonly #opts: BrokerOptions;
  readonly #locks = new KeyedMutex();
  readonly #links = new Map<string, VmmLink>();
  #closing = false;

  constructor(pool: GroupPool, vms: VmRegistry, opts: BrokerOptions) {
    this.pool = pool;
    this.vms = vms;
    this.tokens = opts.tokens;
    this.#opts = opts;
  }

  /** The VMM attached to a VM, if any. */
  linkOf(vmId: string): VmmLink | undefined {
    return this.#links.get(vmId);
  }

  get sessionCount(): number {
    return this.#links.size;
  }

  /**
   * The owner keys (see ownerKey) of the records the caller owns: its
   * principal's, then its uid's — records without a principal, from before
   * principals were recorded, stay with the uid that made them. The first
   * is the key of what it creates.
   */
  #ownKeys(caller: Caller): string[] {
    const byUid = ownerKey('', caller.uid);
    return caller.principal ? [ownerKey(caller.principal.name, caller.uid), byUid] : [byUid];
  }

  /** uid 0 and policy admins see every VM (undefined); anyone else the VMs it owns (#ownKeys). */
  #ownerScope(caller: Caller): string[] | undefined {
    return caller.uid === 0 || caller.principal?.admin === true ? undefined : this.#ownKeys(caller);
  }

  /** A VM belongs to its principal: every uid of that principal sees and changes it. */
  canSee(caller: Caller, vm: Readonly<VmRecord>): boolean {
    const owners = this.#ownerScope(caller);
    return owners === undefined || owners.includes(ownerKey(vm.principal, vm.ownerUid));
  }

  /** The policy's word on groups and the VMM's uid, and the principal's quotas. */
  #checkPolicy(caller: Caller, groups: readonly number[], vmmUid: number | undefined, newVm: boolean, vmId?: string): void {
    const p = caller.principal;
    if (!p) return;
    for (const g of groups) if (!p.mayUseGroup(g)) throw new PermissionDeniedError(`principal ${p.name} may not use IOMMU group ${g}`);
    if (vmmUid !== undefined && !p.mayNameVmmUid(vmmUid)) throw new PermissionDeniedError(`principal ${p.name} may not name vmm_uid ${vmmUid}`);
    // Unlimited (root): nothing to count.
    if (p.limits.vms >= Number.MAX_SAFE_INTEGER && p.limits.groups >= Number.MAX_SAFE_INTEGER) return;
    // Indexed: the principal's VMs, and the claimed groups (few) checked against them.
    const mine = this.vms.idsOf(p.name);
    const vms = mine.size;
    const held = this.pool.heldByAny(mine);
    if (newVm && vms >= p.limits.vms) throw new ResourceExhaustedError(`principal ${p.name} holds ${vms} VMs; its limit (limits.vms) is ${p.limits.vms}`);
    const adding = groups.filter((g) => vmId === undefined || this.pool.ownerOf(g)?.vmId !== vmId).length;
    if (adding && held + adding > p.limits.groups) {
      throw new ResourceExhaustedError(`principal ${p.name} holds ${held} IOMMU groups; ${adding} more would pass its limit (limits.groups) of ${p.limits.groups}`);
    }
  }

  /**
   * Memlock is host memory a VMM may pin for good: `bytes` for one VM must be
   * within the principal's per-VM limit (PERMISSION_DENIED: no amount of
   * waiting makes it allowed), and with the memlock of its other live VMs
   * (PENDING or RUNNING; `except` is the VM itself) within its total
   * (RESOURCE_EXHAUSTED: deleting VMs frees it).
   */
  #checkMemlock(p: Principal, bytes: number, except?: string): void {
    if (bytes === 0) return;
    const { memlockPerVmBytes: perVm, memlockBytes: total } = p.limits;
    if (bytes > perVm) {
      throw new PermissionDeniedError(`principal ${p.name} may not give a VM memlock_bytes ${bytes}; its per-VM limit (limits.memlockPerVmBytes) is ${perVm}`);
    }
    if (total >= UNLIMITED) return;
    let live = 0;
    for (const id of this.vms.idsOf(p.name)) {
      const vm = id === except ? undefined : this.vms.get(id);
      if (vm && (vm.state === 'PENDING' || vm.state === 'RUNNING')) live += vm.memlockBytes;
    }
    if (live + bytes > total) {
      throw new ResourceExhaustedError(
        `principal ${p.name}'s live VMs ask ${live} bytes of memlock; memlock_bytes ${bytes} more would pass its limit (limits.memlockBytes) of ${total}`,
      );
    }
  }

  /**
   * At attach, just before RLIMIT_MEMLOCK is raised: the VM's memlock against
   * the limits of its principal in the policy as it is now. A principal the
   * policy no longer has, or a record without one (from an older state file,
   * not uid 0's), is granted none.
   */
  #checkMemlockNow(vm: VmRecord): void {
    const lookup = this.#opts.principalNamed;
    if (vm.memlockBytes === 0 || !lookup) return;
    const name = vm.principal || (vm.ownerUid === 0 ? ROOT_NAME : '');
    if (!name) {
      throw new PermissionDeniedError(
        `vm ${vm.name} was recorded without a principal (by an older kvmvfiod), so memlock_bytes ${vm.memlockBytes} cannot be checked against the policy; create it again`,
      );
    }
    const p = lookup(name);
    if (!p) throw new PermissionDeniedError(`principal ${name} of vm ${vm.name} is no longer in the policy; memlock_bytes ${vm.memlockBytes} is not granted`);
    this.#checkMemlock(p, vm.memlockBytes, vm.id);
  }

  #checkPendingTokens(caller: Caller): void {
    const p = caller.principal;
    if (!p || p.limits.pendingTokens >= Number.MAX_SAFE_INTEGER) return;
    const pending = this.tokens.pendingFor(this.vms.idsOf(p.name));
    if (pending >= p.limits.pendingTokens) {
      throw new ResourceExhaustedError(`principal ${p.name} has ${pending} unused attach tokens; its limit (limits.pendingTokens) is ${p.limits.pendingTokens}`);
    }
  }

  async createVm(caller: Caller, spec: CreateVmSpec): Promise<CreateVmResult> {
    this.#assertOpen();
    const fingerprint = JSON.stringify([spec.name, Object.entries(spec.labels).sort(), spec.vmmUid, spec.vfioDevice, [...spec.groups].sort((a, b) => a - b), spec.memlockBytes, spec.handoff ?? 'host default']);
    // One create at a time per owner (a principal, whichever of its uids calls): name uniqueness
    // and request_id retries are decided without another create of the same owner in between.
    const owners = this.#ownKeys(caller);
    return this.#locks.run(`owner:${owners[0]}`, async () => {
      const earlier = this.#firstOwned(owners, (o) => this.vms.findByRequestId(o, spec.requestId));
      if (earlier) {
        if (earlier.requestFingerprint !== fingerprint) {
          throw new FailedPreconditionError(`request_id ${spec.requestId} was used for a different CreateVm (vm ${earlier.name}, ${earlier.id})`);
        }
        const token = earlier.state === 'PENDING' && !this.#links.has(earlier.id) ? this.tokens.issue(earlier.id, earlier.vmmUid) : undefined;
        return { vm: earlier, created: false, token };
      }
      const same = this.#firstOwned(owners, (o) => this.vms.findByName(o, spec.name));
      if (same) throw new AlreadyExistsError(`vm ${spec.name} already exists (${same.id})`);
      this.#checkPolicy(caller, spec.groups, spec.vmmUid, true);
      if (caller.principal) this.#checkMemlock(caller.principal, spec.memlockBytes);
      this.#checkPendingTokens(caller);
      const max = this.#opts.maxVms ?? Number.MAX_SAFE_INTEGER;
      if (this.vms.size >= max) throw new ResourceExhaustedError(`kvmvfiod holds ${this.vms.size} VMs; its limit (--max-vms) is ${max}`);
      if (spec.groups.length) await this.#opts.fdGuard?.();
      const id = this.vms.newId();
      const handoff = spec.handoff ?? (await this.pool.defaultHandoff(spec.groups));
      await this.pool.claim(spec.groups, { vmId: id, vmName: spec.name }, handoff);
      const record: NewVm = { ...spec, handoff, ownerUid: caller.uid, requestFingerprint: fingerprint, principal: caller.principal?.name ?? '' };
      const vm = this.vms.insert(id, record);
      return { vm, created: true, token: this.tokens.issue(vm.id, vm.vmmUid) };
    });
  }

  #firstOwned(owners: readonly string[], find: (owner: string) => VmRecord | undefined): VmRecord | undefined {
    for (const o of owners) {
      const vm = find(o);
      if (vm) return vm;
    }
    return undefined;
  }

  getVm(caller: Caller, id: string): VmRecord {
    const vm = this.vms.get(id);
    if (!vm || !this.canSee(caller, vm)) throw new NotFoundError(`vm ${id} not found`);
    return vm;
  }

  /** A new attach token for a PENDING VM no VMM has attached to; earlier tokens stop working. */
  async createAttachToken(caller: Caller, id: string): Promise<{ vm: VmRecord; token: IssuedToken }> {
    this.#assertOpen();
    return this.#onVm(caller, id, async (vm) => {
      if (vm.state !== 'PENDING') throw new FailedPreconditionError(`vm ${vm.name} is ${vm.state}; only a PENDING VM takes an attach token`);
      if (this.#links.has(vm.id)) throw new FailedPreconditionError(`vm ${vm.name} already has a VMM attached (pid ${vm.vmmPid})`);
      this.tokens.revokeVm(vm.id);
      this.#checkPendingTokens(caller);
      return { vm, token: this.tokens.issue(vm.id, vm.vmmUid) };
    });
  }

  /**
   * The records after `afterSeq`, in creation order, that the caller sees
   * (canSee) and the filter takes. The walk keeps to the shortest list that
   * holds them all (the caller's own VMs, or those with one of the filter's
   * label pairs), and each record it meets is checked by one predicate built
   * once.
   */
  *#visibleAfter(caller: Caller, filter: VmFilter, afterSeq: number): Generator<VmRecord, void, undefined> {
    const matches = vmMatcher(filter);
    const owners = this.#ownerScope(caller);
    const take = owners === undefined ? matches : (vm: VmRecord) => owners.includes(ownerKey(vm.principal, vm.ownerUid)) && matches(vm);
    for (const vm of this.vms.inOrderAfter(afterSeq, { owners, labels: filter.labels })) if (take(vm)) yield vm;
  }

  /** Every VM the caller sees that the filter takes, in creation order (WatchVms's snapshot). */
  listVms(caller: Caller, filter: VmFilter): VmRecord[] {
    return [...this.#visibleAfter(caller, filter, 0)];
  }

  /**
   * One page of the VMs the caller sees that the filter takes, in creation
   * order, starting after the record `page.afterSeq` (which may have been
   * deleted since: the walk starts at the first record after its place).
   * Records before that place are not looked at, nor (see #visibleAfter)
   * most records the caller does not see or the filter's labels exclude;
   * after a full page the walk goes on only until it finds one more match,
   * to tell whether the listing continues. Records created since the
   * previous page come after every older one, so a listing followed to its
   * end sees them and never sees a record twice.
   */
  listVmsPage(caller: Caller, filter: VmFilter, page: PageRequest): VmPage {
    if (!(Number.isSafeInteger(page.size) && page.size >= 1)) throw new Error(`page size ${page.size} is not a positive integer`);
    const vms: VmRecord[] = [];
    for (const vm of this.#visibleAfter(caller, filter, page.afterSeq)) {
      if (vms.length === page.size) return { vms, nextAfterSeq: vms[vms.length - 1].seq };
      vms.push(vm);
    }
    return { vms };
  }

  /**
   * Removes the VM. With a VMM attached it first asks it to exit (SHUTDOWN;
   * SIGTERM through the pidfd for a passive VMM, which reads no session), or
   * with `force` kills it, and waits for the process to be gone, so the VM's
   * groups come back clean before the record goes. It waits the exit grace,
   * or `waitMs` when that is shorter (the caller's deadline), then answers
   * DEADLINE_EXCEEDED naming the fix.
   */
  async deleteVm(caller: Caller, id: string, force = false, waitMs = Infinity): Promise<VmRecord> {
    this.#assertOpen();
    this.getVm(caller, id);
    // No new VMM from here on; one that spent its token before this (its attach waiting on the VM's
    // lock) is found under the lock below and stopped like any other.
    this.tokens.revokeVm(id);
    for (let round = 0; ; round++) {
      const link = this.#links.get(id);
      if (link) {
        if (force) link.kill();
        else link.shutdown('DeleteVm');
        const grace = this.#opts.exitGraceMs;
        const wait = Math.max(0, Math.min(grace, waitMs));
        if (!(await within(link.exited, wait))) {
          const how = link.passive ? 'SIGTERM' : 'SHUTDOWN';
          const waited = wait < grace ? `${Math.round(wait)} ms (the call's deadline; kvmvfiod waits up to ${grace} ms, --vmm-exit-grace-ms)` : `${grace} ms`;
          throw new DeadlineExceededError(`the VMM of vm ${id} (pid ${link.pid}) did not exit within ${waited}${force ? ' of SIGKILL' : ` of ${how}; DeleteVm with force kills it`}`);
        }
        // vmmExited() runs under the VM's lock; wait for it before removing.
      }
      const removed = await this.#onVm(caller, id, async (vm) => {
        if (this.#links.has(vm.id)) return undefined;
        await this.#letGoAll(vm.id, false);
        this.vms.remove(vm);
        return vm;
      });
      if (removed) return removed;
      if (round >= 2) throw new FailedPreconditionError(`vm ${id} keeps getting a VMM attached while it is being deleted; retry`);
    }
  }

  /**
   * Takes back a VM whose creation could not be saved (the state store
   * failed): its record, claims and tokens go, as if CreateVm had not been
   * made. A VM a VMM attached to in the meantime is left alone.
   */
  async undoCreate(id: string): Promise<boolean> {
    this.tokens.revokeVm(id);
    return this.#locks.run(`vm:${id}`, async () => {
      const vm = this.vms.get(id);
      if (!vm || vm.state !== 'PENDING' || this.#links.has(id)) return false;
      await this.#letGoAll(id, false);
      this.vms.remove(vm);
      return true;
    });
  }

  async createVfioDevice(caller: Caller, id: string): Promise<VmRecord> {
    this.#assertOpen();
    return this.#onVm(caller, id, async (vm) => {
      if (vm.state === 'RUNNING') {
        const link = this.#activeLink(vm);
        // QEMU makes its own KVM-VFIO device (with its first VFIO device): only the record can say it is there.
        if (link.hotplug && vm.vfioDevice) throw new AlreadyExistsError(`vm ${vm.name} already has its KVM-VFIO device (one per VM)`);
        const made = (v: VmRecord) => this.vms.update(v, (x) => (x.vfioDevice = true));
        await link.createVfioDevice().catch((e: unknown) => this.#lateAnswer(vm, link, e, { ok: made }));
        return made(vm);
      }
      this.#assertPlanEditable(vm);
      if (vm.vfioDevice) throw new AlreadyExistsError(`vm ${vm.name} already has its KVM-VFIO device (one per VM)`);
      return this.vms.update(vm, (v) => (v.vfioDevice = true));
    });
  }

  async addGroup(caller: Caller, id: string, group: number): Promise<VmRecord> {
    this.#assertOpen();
    return this.#onVm(caller, id, async (vm) => {
      this.#checkPolicy(caller, [group], undefined, false, vm.id);
      if (vm.state === 'RUNNING') {
        const link = this.#activeLink(vm);
        if (!vm.vfioDevice) throw new FailedPreconditionError(`vm ${vm.name} has no KVM-VFIO device; call CreateVfioDevice before AddGroup`);
        if (vm.groups.includes(group)) {
          // The daemon has no copy of a file it handed out, so it cannot send it again.
          throw new AlreadyExistsError(
            `IOMMU group ${group} is already in the KVM-VFIO device of vm ${vm.name}, whose VMM holds it (a second KVM_DEV_VFIO_FILE_ADD of the same file fails EEXIST)`,
          );
        }
        const hold = this.pool.holdOf(group);
        if (hold?.holding === 'vmm' && hold.owner.vmId === vm.id && (await this.pool.letGo(group, vm.id, true)) === 'vmm') {
          throw new FailedPreconditionError(
            `IOMMU group ${group} was removed from vm ${vm.name}, but its VMM (pid ${link.pid}) still holds ${this.pool.groupPath(group)}; it can be added again once the VMM closes it`,
          );
        }
        if (vm.handoff === 'cdev') {
          await this.pool.claim([group], { vmId: vm.id, vmName: vm.name }, 'cdev');
          let devices;
          try {
            devices = await this.pool.handOverDevices(group, vm.id);
          } catch (e) {
            this.pool.release([group], vm.id);
            throw e;
          }
          const added: string[] = [];
          let next = 0;
          try {
            // addDevice owns the fd it is given (sent and closed, or closed); the ones not reached yet are ours.
            for (; next < devices.length; next++) {
              await link.addDevice(devices[next].address, devices[next].fd);
              added.push(devices[next].address);
            }
          } catch (e) {
            for (const d of devices.slice(next + 1)) d.fd.closeSync();
            const undo = async (andLast: boolean) => {
              for (const a of (andLast ? [...added, devices[next].address] : added).reverse()) await link.removeDevice(a).catch(() => undefined);
              await this.pool.letGo(group, vm.id, true);
            };
            // Past its deadline: the undo waits for the late result (nothing is sent to an overdue VMM).
            if (!this.#isLate(e)) await undo(false);
            const last = next === devices.length - 1;
            this.#lateAnswer(vm, link, e, { ok: (v) => (last ? void this.vms.update(v, (x) => !x.groups.includes(group) && x.groups.push(group)) : undo(true)), refused: () => undo(false) }, false);
            throw e;
          }
          return this.vms.update(vm, (v) => v.groups.push(group));
        }
        await this.pool.claim([group], { vmId: vm.id, vmName: vm.name });
        let fd;
        try {
          fd = this.pool.handOver(group, vm.id);
        } catch (e) {
          this.pool.release([group], vm.id);
          throw e;
        }
        try {
          await link.addGroup(group, fd);
        } catch (e) {
          // The VMM may have closed the file (a refused ADD), or may still hold it (no answer in time): the witness tells.
          await this.pool.letGo(group, vm.id, true);
          this.#lateAnswer(vm, link, e, { ok: (v) => void this.vms.update(v, (x) => !x.groups.includes(group) && x.groups.push(group)), refused: (v) => this.pool.letGo(group, v.id, true) }, false);
          throw e;
        }
        return this.vms.update(vm, (v) => v.groups.push(group));
      }
      this.#assertPlanEditable(vm);
      if (vm.groups.includes(group)) throw new AlreadyExistsError(`IOMMU group ${group} is already in vm ${vm.name}`);
      if (!vm.vfioDevice) {
        throw new FailedPreconditionError(`vm ${vm.name} has no KVM-VFIO device; call CreateVfioDevice before AddGroup`);
      }
      await this.pool.claim([group], { vmId: vm.id, vmName: vm.name }, vm.handoff);
      return this.vms.update(vm, (v) => v.groups.push(group));
    });
  }

  async removeGroup(caller: Caller, id: string, group: number): Promise<VmRecord> {
    this.#assertOpen();
    return this.#onVm(caller, id, async (vm) => {
      if (vm.state === 'RUNNING') {
        const link = this.#activeLink(vm);
        if (!vm.groups.includes(group)) throw new NotFoundError(`IOMMU group ${group} is not in vm ${vm.name}`);
        const removed = async (v: VmRecord) => {
          const updated = this.vms.update(v, (x) => (x.groups = x.groups.filter((g) => g !== group)));
          // Back in the pool at once if the VMM closed its file (the protocol asks it to); else held until it does, or exits.
          await this.pool.letGo(group, v.id, true);
          return updated;
        };
        if (vm.handoff !== 'cdev') {
          await link.removeGroup(group).catch((e: unknown) => this.#lateAnswer(vm, link, e, { ok: removed }));
          return removed(vm);
        }
        // One REMOVE_DEVICE per device: once one is out, the group is out of the record or the VM fails,
        // for the record cannot say "part of group 4".
        const addresses = (await this.pool.get(group)).devices.map((d) => d.address);
        const removeFrom = async (v: VmRecord, from: number): Promise<VmRecord> => {
          for (let i = from; i < addresses.length; i++) {
            try {
              await link.removeDevice(addresses[i]);
            } catch (e) {
              const partly = (done: number) => `removing IOMMU group ${group}: ${done} of its ${addresses.length} devices are out of the VM's KVM-VFIO device, then ${describeError(e)}`;
              if (!this.#isLate(e)) {
                if (i > 0) this.#fail(v, link, partly(i));
              } else this.#lateAnswer(v, link, e, { ok: (now) => (i + 1 < addresses.length ? removeFrom(now, i + 1).then(() => undefined) : removed(now).then(() => undefined)), refused: (now) => (i > 0 ? this.#fail(now, link, partly(i)) : undefined) }, false);
              throw e;
            }
          }
          return removed(v);
        };
        return removeFrom(vm, 0);
      }
      this.#assertPlanEditable(vm);
      if (!vm.groups.includes(group)) throw new NotFoundError(`IOMMU group ${group} is not in vm ${vm.name}`);
      this.pool.release([group], vm.id);
      return this.vms.update(vm, (v) => (v.groups = v.groups.filter((g) => g !== group)));
    });
  }

  /**
   * A VMM presents its token. Checks it (PermissionDeniedError naming the
   * failed check; nothing is sent), records the VMM, raises its
   * RLIMIT_MEMLOCK when the VM asks, and returns the fds to send. A failure
   * after the token was spent fails the VM.
   */
  async attach(token: string, vmm: Caller, link: VmmLink): Promise<AttachGrant> {
    this.#assertOpen();
    await this.#opts.fdGuard?.();
    const vmId = this.tokens.redeem(token, vmm.uid);
    return this.#locks.run(`vm:${vmId}`, async () => {
      const vm = this.vms.get(vmId);
      if (!vm) throw new NotFoundError(`vm ${vmId} was deleted`);
      if (vm.state !== 'PENDING' || this.#links.has(vm.id)) {
        throw new FailedPreconditionError(`vm ${vm.name} is ${vm.state}${this.#links.has(vm.id) ? ' with a VMM attached' : ''}; it takes no attach`);
      }
      this.#links.set(vm.id, link);
      this.vms.update(vm, (v) => {
        v.vmmPid = vmm.pid;
        v.passive = link.passive;
      });
      void link.exited.then(() => this.vmmExited(vm.id));
      const sent: AttachGrant = { vmId: vm.id, vmName: vm.name, kvm: undefined as never, container: null, memlockBytes: vm.memlockBytes, groups: [], iommufd: null, devices: [] };
      try {
        // The policy may have changed since CreateVm (SIGHUP): its limits now decide.
        this.#checkMemlockNow(vm);
        if (vm.memlockBytes > 0) {
          // prlimit takes a pid: act on it only while the pidfd says that process lives (then the pid is still its own).
          link.assertAlive('raising its RLIMIT_MEMLOCK');
          this.#opts.host.setMemlock(vmm.pid, this.#memlockFor(vm));
          link.assertAlive('raising its RLIMIT_MEMLOCK');
        }
        sent.kvm = this.#opts.host.lendKvm();
        if (vm.handoff === 'cdev') {
          // A fresh iommufd for this VMM alone, and a fresh open of each device's cdev: nothing of another VMM's.
          sent.iommufd = await this.#opts.host.openIommufd();
          // An active VMM gets the devices with the plan (ADD_DEVICE), a passive one now.
          if (link.passive) for (const g of vm.groups) for (const d of await this.pool.handOverDevices(g, vm.id)) sent.devices.push({ group: g, ...d });
        } else {
          sent.container = await this.#opts.host.openContainer();
          if (link.passive) for (const g of vm.groups) sent.groups.push({ number: g, fd: this.pool.handOver(g, vm.id) });
        }
      } catch (e) {
        // Nothing reached the VMM: once the fds are closed, its groups can go back at once.
        await Promise.all([sent.kvm?.close(), sent.container?.close(), sent.iommufd?.close(), ...sent.groups.map((g) => g.fd.close()), ...sent.devices.map((d) => d.fd.close())]);
        this.#links.delete(vm.id);
        await this.#letGoAll(vm.id, false);
        const reason = `attach of VMM pid ${vmm.pid}: ${describeError(e)}`;
        this.vms.transition(vm, 'FAILED', reason);
        this.#opts.log?.({ event: 'vm-failed', vm: vm.id, reason }, 'VM setup failed');
        throw e;
      }
      if (link.passive) this.vms.transition(vm, 'RUNNING');
      return sent;
    });
  }

  /**
   * The ATTACH result reached the VMM: send the plan at once, pipelined
   * behind it — the KVM-VFIO device, then each group — rather than waiting
   * for VM_CREATED and then for each answer in turn. The VMM reads them only
   * once it has made its VM, and answers in order. The VM is RUNNING when
   * the VMM has said VM_CREATED and every step succeeded. A failed step
   * undoes the ones before it (DEL of the groups added), fails the VM with
   * the reason, and ends its VMM. A VMM gone before VM_CREATED leaves the
   * VM to vmmExited (FAILED, saying so), as it would with no plan.
   */
  async applyPlan(vmId: string): Promise<void> {
    const sent = await this.#locks.run(`vm:${vmId}`, async () => {
      const vm = this.vms.get(vmId);
      const link = this.#links.get(vmId);
      if (!vm || !link || link.passive || vm.state !== 'PENDING') return undefined;
      const steps: { what: string; group?: number; device?: string; done: Promise<void> }[] = [];
      try {
        if (vm.vfioDevice) steps.push({ what: 'KVM-VFIO device', done: link.createVfioDevice() });
        for (const g of vm.groups) {
          if (vm.handoff === 'cdev') {
            for (const d of await this.pool.handOverDevices(g, vm.id)) {
              steps.push({ what: `device ${d.address} of IOMMU group ${g}`, device: d.address, done: link.addDevice(d.address, d.fd) });
            }
          } else steps.push({ what: `IOMMU group ${g}`, group: g, done: link.addGroup(g, this.pool.handOver(g, vm.id)) });
        }
      } catch (e) {
        // Could not send a step (no fd of a group): what went out is answered, then undone below.
        steps.push({ what: 'the plan', done: Promise.reject(e) });
      }
      return { link, steps };
    });
    if (!sent) return;
    const { link, steps } = sent;
    // Outside the VM's lock: the VMM may take its time making its VM, and meanwhile calls on this VM
    // get a prompt "being set up" (FAILED_PRECONDITION) instead of queueing behind it.
    // A step past its deadline stays outstanding: the plan waits for its late result, up to the answer bound (S24, S25).
    const [made, ...outcomes] = await Promise.allSettled([link.vmMade, ...steps.map((s) => s.done.catch((e: unknown) => (this.#isLate(e) ? e.answer : Promise.reject(e))))]);
    await this.#locks.run(`vm:${vmId}`, async () => {
      const vm = this.vms.get(vmId);
      if (!vm || vm.state !== 'PENDING' || this.#links.get(vmId) !== link || made.status === 'rejected') return;
      const failed = outcomes.findIndex((o) => o.status === 'rejected');
      if (failed < 0) {
        this.vms.transition(vm, 'RUNNING');
        return;
      }
      const added = steps.filter((s, i) => (s.group !== undefined || s.device !== undefined) && outcomes[i].status === 'fulfilled');
      for (const s of added.reverse()) await (s.device !== undefined ? link.removeDevice(s.device) : link.removeGroup(s.group!)).catch(() => undefined);
      const reason = (outcomes[failed] as PromiseRejectedResult).reason;
      this.#fail(vm, link, `setting up ${steps[failed].what}: ${describeError(reason)}`);
    });
  }

  /**
   * A VMM let go of a device of `vmId` on its own — QEMU's DEVICE_DELETED
   * that no RemoveGroup waited for: the guest acknowledged after the
   * deadline, a reset completed a pending unplug, or the guest ejected it.
   * That is the cue, not the proof: the device's group leaves the VM's
   * record, and goes back to the pool once the daemon's own open of it
   * succeeds (the witness), as after RemoveGroup; until then the VM holds it.
   */
  async deviceLeftVmm(vmId: string, address: string): Promise<void> {
    await this.#locks.run(`vm:${vmId}`, async () => {
      const vm = this.vms.get(vmId);
      if (!vm || vm.handoff !== 'cdev') return;
      for (const g of this.pool.heldBy(vmId)) {
        const inv = await this.pool.get(g).catch(() => undefined);
        if (!inv?.devices.some((d) => d.address === address)) continue;
        const inRecord = vm.groups.includes(g);
        if (inRecord) this.vms.update(vm, (v) => (v.groups = v.groups.filter((x) => x !== g)));
        const now = await this.pool.letGo(g, vmId, true);
        this.#opts.log?.({ event: 'vmm-let-go', vm: vmId, device: address, group: g, holding: now, record_changed: inRecord }, 'the VMM let go of a device on its own');
      }
    });
  }

  /**
   * The VMM process is gone (its pidfd said so): each group it held goes
   * back to the pool if the daemon's fresh open succeeds (the kernel then
   * leaves no container set on it); one that a process still holds — a
   * child the VMM forked, say — is stray, named in the VM's record, and
   * comes back when that process lets go. A RUNNING VM is EXITED; one still
   * PENDING (its VMM gone before VM_CREATED or during the plan) is FAILED
   * with the reason; a FAILED VM stays FAILED.
   */
  async vmmExited(vmId: string): Promise<void> {
    await this.#locks.run(`vm:${vmId}`, async () => {
      const link = this.#links.get(vmId);
      this.#links.delete(vmId);
      const { back, stray } = await this.#letGoAll(vmId, false);
      const vm = this.vms.get(vmId);
      if (vm?.state === 'RUNNING') this.vms.transition(vm, 'EXITED');
      else if (vm?.state === 'PENDING') {
        // Attached but never RUNNING: its setup failed, and the record says how.
        const when = link?.madeVm ? 'while its plan was applied' : 'before it made its VM (no VM_CREATED)';
        const reason = `its VMM (pid ${vm.vmmPid}) exited ${when}`;
        this.vms.transition(vm, 'FAILED', reason);
        this.#opts.log?.({ event: 'vm-failed', vm: vmId, reason }, 'VM setup failed');
      }
      // The exit itself is the session's log line; this one only when groups went back.
      if (back.length) this.#opts.log?.({ event: 'groups-returned', vm: vmId, groups: back }, "the exited VMM's groups are back in the pool");
      if (stray.length) this.#opts.log?.({ event: 'groups-stray', vm: vmId, groups: stray }, "some of the exited VMM's groups are still held by another process");
      this.#opts.onVmmGone?.(vmId);
    });
  }

  /**
   * A group became stray (or its holders changed: `hold`), or came back
   * (`hold` undefined): the VM record of `vmId`, if it still exists, says so.
   */
  groupStrayChanged(group: number, vmId: string, hold?: Readonly<GroupHold>): void {
    const vm = this.vms.get(vmId);
    if (!vm) return;
    const others = (vm.strayGroups ?? []).filter((s) => s.group !== group);
    if (!hold && others.length === (vm.strayGroups ?? []).length) return;
    this.vms.update(vm, (v) => {
      v.strayGroups = hold ? [...others, { group, holders: [...(hold.holders ?? [])], since: hold.since ?? new Date().toISOString() }].sort((a, b) => a.group - b.group) : others;
    });
  }

  /**
   * After a restart: groups handed to a VMM that is no longer attached (it
   * exited while the daemon was away) are looked at now.
   */
  async reconcileHolds(): Promise<void> {
    for (const c of this.pool.claims()) {
      if (c.holding === 'vmm' && !this.#links.has(c.vmId)) await this.pool.letGo(c.group, c.vmId, false);
    }
  }

  /**
   * After a restart: the VMM of `vmId` is still attached through a session
   * from the fd store. A VM caught mid-setup (PENDING with a VMM) cannot
   * resume its plan: it fails, and its VMM is told to stop.
   */
  restoreLink(vmId: string, link: VmmLink): void {
    const vm = this.vms.get(vmId);
    if (!vm) throw new Error(`restored session of unknown vm ${vmId}`);
    this.#links.set(vmId, link);
    void link.exited.then(() => this.vmmExited(vmId));
    if (vm.state === 'PENDING') this.#fail(vm, link, 'the daemon restarted while the VM was being set up');
  }

  /** Calls `listener` with every change to a VM the caller can see. Returns the unsubscribe. */
  watch(caller: Caller, listener: (change: VmChange) => void): () => void {
    return this.vms.subscribe((change) => {
      if (this.canSee(caller, change.vm)) listener(change);
    });
  }

  listGroups(): Promise<GroupView[]> {
    return this.pool.list();
  }

  getGroup(n: number): Promise<GroupView> {
    return this.pool.get(n);
  }

  /** Refuses new mutations from here on; the daemon then closes its fds. */
  beginShutdown(): void {
    this.#closing = true;
  }

  get closing(): boolean {
    return this.#closing;
  }

  #assertPlanEditable(vm: VmRecord): void {
    if (vm.state !== 'PENDING') throw notEditable(vm);
    if (this.#links.has(vm.id)) throw new FailedPreconditionError(`vm ${vm.name} is being set up by its VMM (pid ${vm.vmmPid}); retry when it is RUNNING`);
  }

  #activeLink(vm: VmRecord): VmmLink {
    const link = this.#links.get(vm.id);
    if (!link) throw new UnavailableError(`vm ${vm.name}: its VMM is gone`);
    if (link.passive && !link.hotplug) {
      throw new FailedPreconditionError(
        `vm ${vm.name} runs a passive VMM (kvmvfioctl attach) without a control channel, which takes no requests; for hot-plug into QEMU, start it with the monitor of kvmvfioctl vm args --vmm qemu ({qmp})`,
      );
    }
    const overdue = link.overdue;
    if (overdue) throw new UnavailableError(`vm ${vm.name}: its VMM (pid ${link.pid}) has not answered ${overdue} yet; retry once it has (its result updates the VM), or the VM fails if it never does`);
    return link;
  }

  /**
   * The RLIMIT_MEMLOCK to give a VM's VMM. With the device-cdev handoff,
   * iommufd charges pinned pages to the VMM's *user* and checks the total
   * against the limit of the process that pins: so a VMM of a uid gets the
   * sum of what the live cdev VMs of that uid ask (their VMMs attached, and
   * this one). A VMM attached earlier keeps the limit it got. With the group
   * handoff the type1 driver charges the process: its own figure.
   */
  #memlockFor(vm: VmRecord): number {
    if (vm.handoff !== 'cdev') return vm.memlockBytes;
    let sum = vm.memlockBytes;
    for (const id of this.#links.keys()) {
      const other = id === vm.id ? undefined : this.vms.get(id);
      if (other && other.handoff === 'cdev' && other.vmmUid === vm.vmmUid && (other.state === 'PENDING' || other.state === 'RUNNING')) sum += other.memlockBytes;
    }
    return sum;
  }

  /** Lets go of every group `vmId` holds (see GroupPool.letGo); says which came back and which are stray. */
  async #letGoAll(vmId: string, vmmAlive: boolean): Promise<{ back: number[]; stray: number[] }> {
    const groups = this.pool.heldBy(vmId);
    const now = await Promise.all(groups.map((g) => this.pool.letGo(g, vmId, vmmAlive)));
    return { back: groups.filter((_, i) => now[i] === 'free'), stray: groups.filter((_, i) => now[i] === 'stray') };
  }

  #isLate(e: unknown): e is DeadlineExceededError & { answer: Promise<void> } {
    return e instanceof DeadlineExceededError && e.answer !== undefined;
  }

  /**
   * A request to a RUNNING VM's VMM failed with `e`. When `e` is its deadline
   * (the caller gets DEADLINE_EXCEEDED), the request stays outstanding and
   * its late result is applied when it comes, under the VM's lock: `ok` on
   * success, `refused` on the VMM's errno — so the record follows the VMM's
   * kernel (S24). No result at all within the answer bound fails the VM
   * (vmmOutOfStep). Rethrows `e` unless `rethrow` is false.
   */
  #lateAnswer(vm: VmRecord, link: VmmLink, e: unknown, then: { ok(vm: VmRecord): unknown; refused?(vm: VmRecord): unknown }, rethrow = true): never | void {
    if (this.#isLate(e)) {
      const id = vm.id;
      const settle = (ok: boolean) =>
        this.#locks.run(`vm:${id}`, async () => {
          const now = this.vms.get(id);
          if (!now || this.#links.get(id) !== link || now.state !== 'RUNNING') return;
          await (ok ? then.ok(now) : then.refused?.(now));
          this.#opts.log?.({ event: 'late-result-applied', vm: id, ok }, ok ? "a late result of the VMM is in the VM's record" : 'a late refusal of the VMM is in the VM\'s record');
        });
      // An UnavailableError (the session ended) or DeadlineExceededError (the bound passed) is handled where it happens.
      e.answer
        .then(
          () => settle(true),
          (err: unknown) => (err instanceof DomainError ? undefined : settle(false)),
        )
        .catch((err: unknown) => this.#opts.log?.({ event: 'late-result-failed', vm: id, err: describeError(err) }, 'applying a late result failed'));
    }
    if (rethrow) throw e;
  }

  /**
   * The record of `vmId` can no longer follow its VMM's kernel: a request
   * went unanswered past the answer bound (S25), or a result came that no
   * request of this daemon process can place (one sent before a restart).
   * The kernel may hold what the record does not say, or the reverse, so the
   * VM fails with `reason` and its VMM is told to stop (SHUTDOWN, then
   * SIGKILL after the exit grace): the two cannot disagree for good.
   */
  async vmmOutOfStep(vmId: string, link: VmmLink, reason: string): Promise<void> {
    await this.#locks.run(`vm:${vmId}`, async () => {
      const vm = this.vms.get(vmId);
      if (!vm || this.#links.get(vmId) !== link || (vm.state !== 'PENDING' && vm.state !== 'RUNNING')) return;
      this.#fail(vm, link, reason);
    });
  }

  #fail(vm: VmRecord, link: VmmLink, reason: string): void {
    this.vms.transition(vm, 'FAILED', reason);
    this.#opts.log?.({ event: 'vm-failed', vm: vm.id, reason }, 'VM setup failed');
    link.shutdown(reason);
    // Its groups come back when the VMM is gone; one that ignores SHUTDOWN is ended.
    const timer = setTimeout(() => link.kill(), this.#opts.exitGraceMs);
    timer.unref();
    void link.exited.then(() => clearTimeout(timer));
  }

  #assertOpen(): void {
    if (this.#closing) throw new UnavailableError('kvmvfiod is shutting down');
  }

  /** Runs `work` on a visible VM with that VM's lock held; the VM is re-read under the lock. */
  #onVm<T>(caller: Caller, id: string, work: (vm: VmRecord) => Promise<T>): Promise<T> {
    this.getVm(caller, id);
    return this.#locks.run(`vm:${id}`, async () => work(this.getVm(caller, id)));
  }
}
