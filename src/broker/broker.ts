/**
 * The domain rules: who sees which VM, what a call may change in which
 * state, and the claims on IOMMU groups that go with it. No gRPC here: the
 * server turns requests into these calls and errors into statuses.
 */
import { AlreadyExistsError, FailedPreconditionError, NotFoundError, UnavailableError } from './errors';
import { KeyedMutex } from './mutex';
import type { GroupPool, GroupView } from './pool';
import { type NewVm, type VmChange, type VmRecord, type VmRegistry, type VmState } from './vms';

export interface Caller {
  uid: number;
  gid: number;
  pid: number;
}

export interface CreateVmSpec {
  name: string;
  labels: Record<string, string>;
  vmmUid: number;
  vfioDevice: boolean;
  groups: number[];
  memlockBytes: number;
  requestId: string;
}

export interface VmFilter {
  labels: Record<string, string>;
  states: VmState[];
}

export interface CreateVmResult {
  vm: VmRecord;
  /** false when a retry with the same request_id returned the existing VM. */
  created: boolean;
}

export function vmMatches(vm: Readonly<VmRecord>, f: VmFilter): boolean {
  if (f.states.length && !f.states.includes(vm.state)) return false;
  for (const [k, v] of Object.entries(f.labels)) if (!Object.hasOwn(vm.labels, k) || vm.labels[k] !== v) return false;
  return true;
}

/** Only these states take changes to the VM's plan; RUNNING VMs change through their VMM's session. */
function assertEditable(vm: VmRecord): void {
  if (vm.state !== 'PENDING') {
    throw new FailedPreconditionError(`vm ${vm.name} (${vm.id}) is ${vm.state} and takes no changes`);
  }
}

export class Broker {
  readonly pool: GroupPool;
  readonly vms: VmRegistry;
  readonly #locks = new KeyedMutex();
  #closing = false;

  constructor(pool: GroupPool, vms: VmRegistry) {
    this.pool = pool;
    this.vms = vms;
  }

  /** uid 0 sees every VM; anyone else sees the VMs they created. */
  canSee(caller: Caller, vm: Readonly<VmRecord>): boolean {
    return caller.uid === 0 || vm.ownerUid === caller.uid;
  }

  async createVm(caller: Caller, spec: CreateVmSpec): Promise<CreateVmResult> {
    this.#assertOpen();
    const fingerprint = JSON.stringify([spec.name, Object.entries(spec.labels).sort(), spec.vmmUid, spec.vfioDevice, [...spec.groups].sort((a, b) => a - b), spec.memlockBytes]);
    // One create at a time per owner: name uniqueness and request_id retries
    // are decided without another create of the same owner in between.
    return this.#locks.run(`owner:${caller.uid}`, async () => {
      const earlier = this.vms.findByRequestId(caller.uid, spec.requestId);
      if (earlier) {
        if (earlier.requestFingerprint !== fingerprint) {
          throw new FailedPreconditionError(`request_id ${spec.requestId} was used for a different CreateVm (vm ${earlier.name}, ${earlier.id})`);
        }
        return { vm: earlier, created: false };
      }
      const same = this.vms.findByName(caller.uid, spec.name);
      if (same) throw new AlreadyExistsError(`vm ${spec.name} already exists (${same.id})`);
      const id = this.vms.newId();
      await this.pool.claim(spec.groups, { vmId: id, vmName: spec.name });
      const record: NewVm = { ...spec, ownerUid: caller.uid, requestFingerprint: fingerprint };
      return { vm: this.vms.insert(id, record), created: true };
    });
  }

  getVm(caller: Caller, id: string): VmRecord {
    const vm = this.vms.get(id);
    if (!vm || !this.canSee(caller, vm)) throw new NotFoundError(`vm ${id} not found`);
    return vm;
  }

  listVms(caller: Caller, filter: VmFilter): VmRecord[] {
    const out: VmRecord[] = [];
    for (const vm of this.vms.all()) if (this.canSee(caller, vm) && vmMatches(vm, filter)) out.push(vm);
    return out.sort((a, b) => a.createTime.localeCompare(b.createTime) || a.revision - b.revision);
  }

  async deleteVm(caller: Caller, id: string): Promise<VmRecord> {
    this.#assertOpen();
    return this.#onVm(caller, id, async (vm) => {
      this.pool.release(vm.groups, vm.id);
      this.vms.remove(vm);
      return vm;
    });
  }

  async createVfioDevice(caller: Caller, id: string): Promise<VmRecord> {
    this.#assertOpen();
    return this.#onVm(caller, id, async (vm) => {
      assertEditable(vm);
      if (vm.vfioDevice) throw new AlreadyExistsError(`vm ${vm.name} already has its KVM-VFIO device (one per VM)`);
      return this.vms.update(vm, (v) => (v.vfioDevice = true));
    });
  }

  async addGroup(caller: Caller, id: string, group: number): Promise<VmRecord> {
    this.#assertOpen();
    return this.#onVm(caller, id, async (vm) => {
      assertEditable(vm);
      if (vm.groups.includes(group)) throw new AlreadyExistsError(`IOMMU group ${group} is already in vm ${vm.name}`);
      if (!vm.vfioDevice) {
        throw new FailedPreconditionError(`vm ${vm.name} has no KVM-VFIO device; call CreateVfioDevice before AddGroup`);
      }
      await this.pool.claim([group], { vmId: vm.id, vmName: vm.name });
      return this.vms.update(vm, (v) => v.groups.push(group));
    });
  }

  async removeGroup(caller: Caller, id: string, group: number): Promise<VmRecord> {
    this.#assertOpen();
    return this.#onVm(caller, id, async (vm) => {
      assertEditable(vm);
      if (!vm.groups.includes(group)) throw new NotFoundError(`IOMMU group ${group} is not in vm ${vm.name}`);
      this.pool.release([group], vm.id);
      return this.vms.update(vm, (v) => (v.groups = v.groups.filter((g) => g !== group)));
    });
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

  #assertOpen(): void {
    if (this.#closing) throw new UnavailableError('kvmvfiod is shutting down');
  }

  /** Runs `work` on a visible VM with that VM's lock held; the VM is re-read under the lock. */
  #onVm<T>(caller: Caller, id: string, work: (vm: VmRecord) => Promise<T>): Promise<T> {
    this.getVm(caller, id);
    return this.#locks.run(`vm:${id}`, async () => work(this.getVm(caller, id)));
  }
}
