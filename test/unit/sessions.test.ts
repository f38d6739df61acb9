/**
 * The broker's rules for attached VMMs, against a VmmLink double: attach
 * checks, the plan applied in order with undo on failure, groups held until
 * the VMM exits and handed back clean (VFIO_GROUP_UNSET_CONTAINER).
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { Broker, type Caller, type CreateVmSpec } from '../../src/broker/broker';
import { DeadlineExceededError, FailedPreconditionError, PermissionDeniedError, UnavailableError } from '../../src/broker/errors';
import { GroupPool } from '../../src/broker/pool';
import { TokenStore } from '../../src/broker/tokens';
import type { VmmLink } from '../../src/broker/vmm';
import { VmRegistry } from '../../src/broker/vms';
import { type OwnedFd, SysError, openFdCount } from '../../src/kernel';
import { makeFakeHost } from '../helpers/fakehost';
import { HostDouble, KernelDouble, gate } from '../helpers/kerneldouble';
import { until } from '../helpers/assert';

const ROOT: Caller = { uid: 0, gid: 0, pid: 1 };
const VMM: Caller = { uid: 64000, gid: 64000, pid: 4242 };

/** Plays a VMM: records requests, answers with the errno set per request type. */
class LinkDouble implements VmmLink {
  readonly pid = VMM.pid;
  passive = false;
  readonly calls: string[] = [];
  readonly fail = new Map<string, number>();
  readonly heldFds: OwnedFd[] = [];
  shutdowns: string[] = [];
  killed = false;
  #exit!: () => void;
  readonly exited = new Promise<void>((r) => (this.#exit = r));
  vmMade = Promise.resolve();
  #answer(what: string): Promise<void> {
    this.calls.push(what);
    const errno = this.fail.get(what.split(' ')[0]);
    return errno ? Promise.reject(new SysError(what, 'vmm double', errno)) : Promise.resolve();
  }
  createVfioDevice() {
    return this.#answer('device');
  }
  /** Set to play a VMM that keeps the fd of a refused ADD (the protocol says close it). */
  keepRefused = false;
  readonly #kept = new Map<number, OwnedFd>();
  addGroup(group: number, fd: OwnedFd) {
    return this.#answer(`add ${group}`).then(
      () => void this.#kept.set(group, fd),
      (e: unknown) => {
        if (this.keepRefused) this.heldFds.push(fd);
        else fd.closeSync();
        throw e;
      },
    );
  }
  readonly #devices = new Map<string, OwnedFd>();
  addDevice(address: string, fd: OwnedFd) {
    return this.#answer(`add-device ${address}`).then(
      () => void this.#devices.set(address, fd),
      (e: unknown) => {
        fd.closeSync();
        throw e;
      },
    );
  }
  removeDevice(address: string) {
    return this.#answer(`remove-device ${address}`).then(() => {
      this.#devices.get(address)?.closeSync();
      this.#devices.delete(address);
    });
  }
  removeGroup(group: number) {
    return this.#answer(`remove ${group}`).then(() => {
      this.#kept.get(group)?.closeSync();
      this.#kept.delete(group);
    });
  }
  shutdown(reason: string) {
    this.shutdowns.push(reason);
  }
  /** Set to play a VMM that dies of the SIGKILL (kill() then exits it). */
  killExits = false;
  kill() {
    this.killed = true;
    if (this.killExits) this.exit();
  }
  /** Set to play a VMM that exited while the broker was attaching it. */
  dead = false;
  assertAlive(step: string) {
    if (this.dead) throw new UnavailableError(`VMM pid ${this.pid} exited before ${step}`);
  }
  exit() {
    for (const fd of [...this.heldFds, ...this.#kept.values(), ...this.#devices.values()]) fd.closeSync();
    this.#exit();
  }
}

async function setup() {
  const host = await makeFakeHost([
    ...[1, 2, 3].map((n) => ({ number: n, devices: [{ address: `0000:0${n}:00.0`, vendor: '8086', device: '1521', class: '020000', driver: 'vfio-pci', cdev: `vfio${n}` }] })),
    // Two functions in one group (a GPU and its audio, say), each with a cdev.
    { number: 4, devices: [0, 1].map((f) => ({ address: `0000:04:00.${f}`, vendor: '10de', device: '1eb8', class: '030000', driver: 'vfio-pci', cdev: `vfio${4 + f * 10}` })) },
  ]);
  const k = new KernelDouble();
  const hostDouble = new HostDouble();
  let broker: Broker | undefined;
  const pool = new GroupPool({
    sysfsRoot: host.sysfs,
    devRoot: host.dev,
    openGroup: k.openGroup,
    retryDelaysMs: [20],
    onStray: (g, hold) => broker?.groupStrayChanged(g, hold.owner.vmId, hold),
    onStrayReturned: (g, owner) => broker?.groupStrayChanged(g, owner.vmId),
  });
  const b = new Broker(pool, new VmRegistry(), { tokens: new TokenStore(60_000), host: hostDouble, exitGraceMs: 200 });
  broker = b;
  const create = async (over: Partial<CreateVmSpec> = {}) =>
    b.createVm(ROOT, { name: 'vm-a', labels: {}, vmmUid: VMM.uid, vfioDevice: true, groups: [], memlockBytes: 0, requestId: '', ...over });
  return {
    k,
    pool,
    broker: b,
    hostDouble,
    create,
    async done() {
      hostDouble.close();
      await pool.closeAll();
      await host.cleanup();
    },
  };
}

describe('Broker with attached VMMs', () => {
  test('attach checks the token and uid, raises memlock, sends kvm; the plan runs device first, then groups in order', async () => {
    const t = await setup();
    try {
      const { vm, token } = await t.create({ groups: [2, 1], memlockBytes: 1 << 20 });
      const link = new LinkDouble();
      await assert.rejects(t.broker.attach(token!.token, { ...VMM, uid: 1 }, link), PermissionDeniedError);
      const grant = await t.broker.attach(token!.token, VMM, link);
      assert.equal(grant.vmId, vm.id);
      assert.deepEqual(t.hostDouble.memlock, [{ pid: VMM.pid, bytes: 1 << 20 }]);
      assert.equal(grant.groups.length, 0, 'an active VMM gets group fds with ADD_GROUP, not at attach');
      await grant.kvm.close();
      await assert.rejects(t.broker.attach(token!.token, VMM, new LinkDouble()), /already used/);
      await t.broker.applyPlan(vm.id);
      assert.deepEqual(link.calls, ['device', 'add 1', 'add 2']);
      assert.equal(t.broker.getVm(ROOT, vm.id).state, 'RUNNING');
      assert.equal(t.broker.getVm(ROOT, vm.id).vmmPid, VMM.pid);
      link.exit();
    } finally {
      await t.done();
    }
  });

  test('the plan goes out at once, pipelined; RUNNING only once the VMM has made its VM; a VMM gone before that is left to exit', async () => {
    const t = await setup();
    try {
      const { vm, token } = await t.create({ groups: [1, 2] });
      const link = new LinkDouble();
      let made!: () => void;
      link.vmMade = new Promise<void>((r) => (made = r));
      (await t.broker.attach(token!.token, VMM, link)).kvm.closeSync();
      const applying = t.broker.applyPlan(vm.id);
      await new Promise((r) => setTimeout(r, 20));
      assert.deepEqual(link.calls, ['device', 'add 1', 'add 2'], 'every step sent before VM_CREATED');
      assert.equal(t.broker.getVm(ROOT, vm.id).state, 'PENDING');
      made();
      await applying;
      assert.equal(t.broker.getVm(ROOT, vm.id).state, 'RUNNING');
      link.exit();

      const second = await t.create({ name: 'vm-b', groups: [3] });
      const gone = new LinkDouble();
      (await t.broker.attach(second.token!.token, VMM, gone)).kvm.closeSync();
      gone.vmMade = Promise.reject(new UnavailableError('session ended'));
      await t.broker.applyPlan(second.vm.id);
      assert.equal(t.broker.getVm(ROOT, second.vm.id).state, 'PENDING', 'not FAILED: vmmExited decides');
      assert.deepEqual(gone.shutdowns, []);
      gone.exit();
      await t.broker.vmmExited(second.vm.id);
      const failed = t.broker.getVm(ROOT, second.vm.id);
      assert.equal(failed.state, 'FAILED', 'S29: never RUNNING, so not EXITED');
      assert.match(failed.failureReason, /its VMM \(pid 4242\) exited before it made its VM/);
    } finally {
      await t.done();
    }
  });

  test('a failing plan step undoes the earlier ones, fails the VM with the reason and shuts the VMM down', async () => {
    const t = await setup();
    try {
      const { vm, token } = await t.create({ groups: [1, 2, 3] });
      const link = new LinkDouble();
      link.fail.set('add', 0);
      const grant = await t.broker.attach(token!.token, VMM, link);
      await grant.kvm.close();
      // The third ADD fails.
      const orig = link.addGroup.bind(link);
      link.addGroup = (g: number, fd: OwnedFd) => (g === 3 ? (link.heldFds.push(fd), Promise.reject(new SysError('KVM_SET_DEVICE_ATTR(VFIO_FILE_ADD)', 'group 3', 22))) : orig(g, fd));
      await t.broker.applyPlan(vm.id);
      assert.deepEqual(link.calls, ['device', 'add 1', 'add 2', 'remove 2', 'remove 1']);
      const failed = t.broker.getVm(ROOT, vm.id);
      assert.equal(failed.state, 'FAILED');
      assert.match(failed.failureReason, /setting up IOMMU group 3: KVM_SET_DEVICE_ATTR\(VFIO_FILE_ADD\) on group 3: EINVAL/);
      assert.equal(link.shutdowns.length, 1);
      assert.deepEqual(t.pool.heldBy(vm.id), [1, 2, 3], 'held until the VMM is gone');
      await new Promise((r) => setTimeout(r, 300));
      assert.equal(link.killed, true, 'a failed VMM that does not exit is killed after the grace');
      link.exit();
      await link.exited;
      await new Promise((r) => setImmediate(r));
      await t.broker.vmmExited(vm.id);
      assert.deepEqual(t.pool.heldBy(vm.id), []);
      assert.equal(t.broker.getVm(ROOT, vm.id).state, 'FAILED');
    } finally {
      await t.done();
    }
  });

  test('requests on a RUNNING VM go to its VMM; the record changes only on success; a group comes back once the daemon can open it again', async () => {
    const t = await setup();
    try {
      const { vm, token } = await t.create({ groups: [1] });
      const link = new LinkDouble();
      (await t.broker.attach(token!.token, VMM, link)).kvm.closeSync();
      await t.broker.applyPlan(vm.id);
      assert.equal(t.pool.handle(1), undefined, 'the daemon keeps no copy of a group its VMM holds');
      assert.equal((await t.pool.get(1)).holding, 'vmm');

      link.fail.set('device', 16);
      const busy = await t.broker.createVfioDevice(ROOT, vm.id).catch((e: unknown) => e);
      assert.ok(busy instanceof SysError && busy.code === 'EBUSY');

      // A refused ADD: the VMM closes the fd it got (the protocol), so the daemon's open succeeds: free at once.
      link.fail.set('add', 22);
      await assert.rejects(t.broker.addGroup(ROOT, vm.id, 2), (e: unknown) => e instanceof SysError && e.code === 'EINVAL');
      assert.deepEqual(t.broker.getVm(ROOT, vm.id).groups, [1]);
      assert.equal((await t.pool.get(2)).holding, 'free');
      assert.equal(t.pool.ownerOf(2), undefined);

      // A VMM that keeps the fd of a refused ADD: the kernel says the file is still open, so the group stays the VM's.
      link.keepRefused = true;
      await assert.rejects(t.broker.addGroup(ROOT, vm.id, 3), (e: unknown) => e instanceof SysError && e.code === 'EINVAL');
      assert.equal(t.pool.ownerOf(3)?.vmId, vm.id, 'still open in the VMM: held by its VM');
      await assert.rejects(t.create({ name: 'other', groups: [3] }), /IOMMU group 3 is held by vm vm-a/);
      link.fail.delete('add');
      await assert.rejects(t.broker.addGroup(ROOT, vm.id, 3), /still holds .*dev\/vfio\/3/);
      link.keepRefused = false;

      assert.deepEqual((await t.broker.addGroup(ROOT, vm.id, 2)).groups, [1, 2]);
      await assert.rejects(t.broker.addGroup(ROOT, vm.id, 2), /already in the KVM-VFIO device of vm vm-a.*EEXIST/);

      // RemoveGroup: the VMM deletes it from its device and closes its fd; the daemon's open succeeds.
      await t.broker.removeGroup(ROOT, vm.id, 1);
      assert.deepEqual(t.broker.getVm(ROOT, vm.id).groups, [2]);
      assert.equal(t.pool.ownerOf(1), undefined, 'removed and closed by the VMM: back in the pool at once');
      assert.ok(t.pool.handle(1), 'kept open by the daemon again');

      // The kernel left a container set on group 2 at its last close: the daemon unsets it on its fresh fd.
      t.k.set(2, { containerSetOnOpen: true });
      link.exit();
      await link.exited;
      await new Promise((r) => setImmediate(r));
      await t.broker.vmmExited(vm.id);
      const fresh2 = t.k.handles.filter((h) => h.number === 2).at(-1)!;
      assert.equal(fresh2.containerSet, false);
      assert.equal(fresh2.unsetCalls, 1);
      assert.deepEqual(t.pool.heldBy(vm.id), []);
      assert.equal((await t.pool.get(3)).holding, 'free', 'the refused fd the VMM kept is closed at its exit');
      assert.equal(t.broker.getVm(ROOT, vm.id).state, 'EXITED');
      assert.deepEqual(t.broker.getVm(ROOT, vm.id).strayGroups, []);
      await assert.rejects(t.broker.addGroup(ROOT, vm.id, 3), FailedPreconditionError);
    } finally {
      await t.done();
    }
  });

  test('S24: a request past its deadline stays outstanding; its late success puts the group in the record, a late refusal gives it back; S25: none within the bound fails the VM', async () => {
    const t = await setup();
    try {
      const { vm, token } = await t.create({ groups: [] });
      const link = new LinkDouble();
      (await t.broker.attach(token!.token, VMM, link)).kvm.closeSync();
      await t.broker.applyPlan(vm.id);
      const lateAdd = () => {
        let settle!: { ok(): void; refuse(errno: number): void };
        const answer = new Promise<void>((resolve, reject) => (settle = { ok: resolve, refuse: (errno) => reject(new SysError('KVM_SET_DEVICE_ATTR(VFIO_FILE_ADD)', 'late', errno)) }));
        let held: OwnedFd | undefined;
        link.addGroup = (_g: number, fd: OwnedFd) => ((held = fd), Promise.reject(new DeadlineExceededError('no answer in time', answer)));
        return { settle, close: () => held?.closeSync() };
      };

      const first = lateAdd();
      await assert.rejects(t.broker.addGroup(ROOT, vm.id, 2), DeadlineExceededError);
      assert.deepEqual(t.broker.getVm(ROOT, vm.id).groups, [], 'not before its result');
      assert.equal(t.pool.ownerOf(2)?.vmId, vm.id, 'held: the VMM has its fd');
      first.settle.ok();
      await until('group 2 in the record', async () => t.broker.getVm(ROOT, vm.id).groups.includes(2));

      const second = lateAdd();
      await assert.rejects(t.broker.addGroup(ROOT, vm.id, 3), DeadlineExceededError);
      second.close(); // a refused ADD: the VMM closes the fd, then answers
      second.settle.refuse(22);
      await until('group 3 back', async () => t.pool.ownerOf(3) === undefined);
      assert.deepEqual(t.broker.getVm(ROOT, vm.id).groups, [2]);
      assert.equal(t.broker.getVm(ROOT, vm.id).state, 'RUNNING');

      await t.broker.vmmOutOfStep(vm.id, link, 'its VMM (pid 4242) did not answer ADD_GROUP of group 1 (seq 9) within 30000 ms');
      const failed = t.broker.getVm(ROOT, vm.id);
      assert.equal(failed.state, 'FAILED');
      assert.match(failed.failureReason, /its VMM \(pid 4242\) did not answer ADD_GROUP of group 1/);
      assert.equal(link.shutdowns.length, 1, 'told to stop');
      link.exit();
    } finally {
      await t.done();
    }
  });

  test('a forked child keeps a group after its VMM exits: stray, named, claims refused, back when the child lets go', async () => {
    const t = await setup();
    try {
      const { vm, token } = await t.create({ groups: [1, 2] });
      const link = new LinkDouble();
      (await t.broker.attach(token!.token, VMM, link)).kvm.closeSync();
      await t.broker.applyPlan(vm.id);
      const child = t.k.forkHold(1); // the VMM forked: its child has group 1's file too
      link.exit();
      await link.exited;
      await t.broker.vmmExited(vm.id);

      const after = t.broker.getVm(ROOT, vm.id);
      assert.equal(after.state, 'EXITED');
      assert.deepEqual(after.strayGroups.map((s) => s.group), [1], 'the VM record names the group left held');
      assert.equal((await t.pool.get(1)).holding, 'stray');
      assert.equal((await t.pool.get(2)).holding, 'free', 'the group nobody kept is back');
      assert.equal(t.pool.ownerOf(1), undefined);
      await assert.rejects(t.create({ name: 'next', groups: [1] }), (e: unknown) => e instanceof FailedPreconditionError && /IOMMU group 1 is held by .* outside any VM: it was handed to the VMM of vm vm-a/.test(e.message));
      assert.equal([...t.broker.vms.all()].length, 1, 'the refused create left nothing');

      const opensBefore = t.k.attempts(1);
      await new Promise((r) => setTimeout(r, 60));
      assert.ok(t.k.attempts(1) > opensBefore, 'retried on the backoff');
      assert.ok(t.k.attempts(1) - opensBefore <= 4, `a bounded backoff, not a hot loop (${t.k.attempts(1) - opensBefore} tries in 60 ms)`);

      child();
      const back = await t.pool.retryStray(1);
      assert.equal(back, true);
      assert.equal((await t.pool.get(1)).holding, 'free');
      assert.deepEqual(t.broker.getVm(ROOT, vm.id).strayGroups, [], 'the record says it is back');
      const next = await t.create({ name: 'next', groups: [1] });
      assert.deepEqual(next.vm.groups, [1]);
    } finally {
      await t.done();
    }
  });

  test('after a restart: a group handed to a VMM that exited meanwhile is taken back; a stray one stays named until its holder lets go', async () => {
    const t = await setup();
    try {
      // What the previous daemon left: group 1 in a VMM that is gone now, group 2 stray (a child holds it).
      const { vm } = await t.create({ groups: [] });
      const [g1, g2] = await Promise.all([t.k.openGroup('/dev/vfio/1', 1), t.k.openGroup('/dev/vfio/2', 2)]);
      const gone = g1.handOver();
      gone.closeSync(); // the VMM exited while no daemon ran
      const child = t.k.forkHold(2);
      g2.handOver().closeSync(); // the VMM is gone; its child keeps group 2
      t.pool.restoreHold(1, { holding: 'vmm', owner: { vmId: vm.id, vmName: vm.name } });
      t.pool.restoreHold(2, { holding: 'stray', owner: { vmId: vm.id, vmName: vm.name }, holders: [{ pid: 77, uid: 65534, comm: 'child' }], since: '2026-12-04T00:00:00.000Z' });
      await t.broker.reconcileHolds();
      assert.equal((await t.pool.get(1)).holding, 'free', 'no live session: the daemon looked, and its open succeeded');
      assert.equal((await t.pool.get(2)).holding, 'stray');
      await assert.rejects(t.create({ name: 'other', groups: [2] }), /IOMMU group 2 is held by pid 77 \(uid 65534, child\), outside any VM/);
      child();
      await until('group 2 back on the backoff', async () => (await t.pool.get(2)).holding === 'free');
      assert.ok(t.pool.handle(2), 'kept open by the daemon');
    } finally {
      await t.done();
    }
  });

  test('DeleteVm with force while an attach waits on the VM\'s lock: the VMM that got in is killed before the record goes', async () => {
    const t = await setup();
    try {
      const { vm, token } = await t.create({ groups: [1] });
      // A plan edit holds the VM's lock across an await (its open of group 2).
      const opening = gate();
      t.k.set(2, { openGate: opening.promise });
      const adding = t.broker.addGroup(ROOT, vm.id, 2);
      const link = new LinkDouble();
      link.passive = true;
      link.killExits = true;
      const attaching = t.broker.attach(token!.token, VMM, link); // its token spent, it waits for the lock
      await new Promise((r) => setImmediate(r));
      const deleting = t.broker.deleteVm(ROOT, vm.id, true); // no VMM yet when it starts
      opening.open();
      await adding;
      const grant = await attaching;
      for (const g of grant.groups) link.heldFds.push(g.fd as OwnedFd);
      grant.kvm.closeSync();
      const deleted = await deleting;
      assert.equal(deleted.id, vm.id);
      assert.equal(link.killed, true, 'the VMM that attached meanwhile was killed');
      assert.equal(t.broker.sessionCount, 0);
      assert.equal(t.broker.vms.get(vm.id), undefined);
      assert.deepEqual(t.pool.claims(), [], 'its groups are back, not held by a deleted VM');
    } finally {
      await t.done();
    }
  });

  test('the device-cdev handoff: the plan ADD_DEVICEs each device of each group; the daemon holds no group fd; RemoveGroup REMOVE_DEVICEs', async () => {
    const t = await setup();
    try {
      const { vm, token } = await t.create({ groups: [2, 1], handoff: 'cdev' });
      assert.equal(t.pool.handle(1), undefined, 'claimed without a group fd: a held group makes the bind EBUSY');
      const link = new LinkDouble();
      const grant = await t.broker.attach(token!.token, VMM, link);
      assert.ok(grant.iommufd, 'a fresh iommufd for this VMM');
      assert.equal(grant.devices.length, 0, 'an active VMM gets its devices with the plan');
      grant.kvm.closeSync();
      await t.broker.applyPlan(vm.id);
      assert.deepEqual(link.calls, ['device', 'add-device 0000:01:00.0', 'add-device 0000:02:00.0']);
      assert.equal(t.broker.getVm(ROOT, vm.id).state, 'RUNNING');
      assert.equal((await t.pool.get(1)).holding, 'vmm');
      await assert.rejects(t.broker.addGroup(ROOT, vm.id, 1), /already in the KVM-VFIO device/);
      assert.deepEqual((await t.broker.addGroup(ROOT, vm.id, 3)).groups, [1, 2, 3]);
      assert.equal(link.calls.at(-1), 'add-device 0000:03:00.0');
      await t.broker.removeGroup(ROOT, vm.id, 3);
      assert.equal(link.calls.at(-1), 'remove-device 0000:03:00.0');
      assert.equal((await t.pool.get(3)).holding, 'free', 'the VMM closed the cdev: the daemon opens the group again');
      await grant.iommufd!.close();
      link.exit();
      await link.exited;
      await t.broker.vmmExited(vm.id);
      assert.deepEqual([(await t.pool.get(1)).holding, (await t.pool.get(2)).holding], ['free', 'free']);
    } finally {
      await t.done();
    }
  });

  test('memlock with the device-cdev handoff: a VMM gets what its uid\'s live cdev VMs ask together (iommufd charges the user)', async () => {
    const t = await setup();
    try {
      const first = await t.create({ name: 'c1', groups: [1], handoff: 'cdev', memlockBytes: 1 << 20 });
      const firstLink = new LinkDouble();
      (await t.broker.attach(first.token!.token, VMM, firstLink)).kvm.closeSync();
      const second = await t.create({ name: 'c2', groups: [2], handoff: 'cdev', memlockBytes: 2 << 20 });
      (await t.broker.attach(second.token!.token, VMM, new LinkDouble())).kvm.closeSync();
      const grouped = await t.create({ name: 'g1', groups: [3], memlockBytes: 4 << 20 });
      (await t.broker.attach(grouped.token!.token, VMM, new LinkDouble())).kvm.closeSync();
      assert.deepEqual(
        t.hostDouble.memlock.map((m) => m.bytes),
        [1 << 20, 3 << 20, 4 << 20],
        'the second cdev VMM of the uid: both VMs\' figures; a group-handoff VMM: its own',
      );
    } finally {
      await t.done();
    }
  });

  test('the device-cdev handoff: a refused ADD_DEVICE of a group\'s first device closes the second\'s fd unsent and gives the group back', async () => {
    const t = await setup();
    try {
      const { vm, token } = await t.create({ groups: [1], handoff: 'cdev' });
      const link = new LinkDouble();
      const grant = await t.broker.attach(token!.token, VMM, link);
      grant.kvm.closeSync();
      await t.broker.applyPlan(vm.id);
      const before = await openFdCount();
      link.fail.set('add-device', 22);
      await assert.rejects(t.broker.addGroup(ROOT, vm.id, 4), (e: unknown) => e instanceof SysError && e.code === 'EINVAL');
      assert.deepEqual(link.calls.slice(-1), ['add-device 0000:04:00.0'], 'the second device is not sent after the first failed');
      assert.equal(await openFdCount(), before, 'no fd of the unsent device is left open');
      assert.equal((await t.pool.get(4)).holding, 'free');
      assert.deepEqual(t.broker.getVm(ROOT, vm.id).groups, [1]);
      await grant.iommufd!.close();
    } finally {
      await t.done();
    }
  });

  test('an attach whose VMM has exited is refused before prlimit; nothing is sent', async () => {
    const t = await setup();
    try {
      const { vm, token } = await t.create({ groups: [1], memlockBytes: 1 << 20 });
      const link = new LinkDouble();
      link.dead = true;
      await assert.rejects(t.broker.attach(token!.token, VMM, link), /exited before raising its RLIMIT_MEMLOCK/);
      assert.deepEqual(t.hostDouble.memlock, [], 'no prlimit on a pid whose process is gone');
      assert.equal(t.broker.getVm(ROOT, vm.id).state, 'FAILED');
      assert.equal((await t.pool.get(1)).holding, 'free');
    } finally {
      await t.done();
    }
  });

  test('DeleteVm asks the VMM to stop and waits; with force it kills; a VMM that stays gives DEADLINE_EXCEEDED', async () => {
    const t = await setup();
    try {
      const { vm, token } = await t.create();
      const link = new LinkDouble();
      (await t.broker.attach(token!.token, VMM, link)).kvm.closeSync();
      await t.broker.applyPlan(vm.id);
      await assert.rejects(t.broker.deleteVm(ROOT, vm.id), DeadlineExceededError);
      assert.deepEqual(link.shutdowns, ['DeleteVm']);
      const deleting = t.broker.deleteVm(ROOT, vm.id, true);
      await new Promise((r) => setTimeout(r, 20));
      assert.equal(link.killed, true);
      link.exit();
      assert.equal((await deleting).id, vm.id);
      assert.equal(t.broker.vms.get(vm.id), undefined);
    } finally {
      await t.done();
    }
  });

  test('a RUNNING VM whose VMM is gone answers UNAVAILABLE; a passive one FAILED_PRECONDITION', async () => {
    const t = await setup();
    try {
      const a = await t.create({ name: 'gone' });
      t.broker.vms.transition(a.vm, 'RUNNING');
      await assert.rejects(t.broker.createVfioDevice(ROOT, a.vm.id), UnavailableError);
      const p = await t.create({ name: 'passive', groups: [3] });
      const link = new LinkDouble();
      link.passive = true;
      const grant = await t.broker.attach(p.token!.token, VMM, link);
      assert.deepEqual(grant.groups.map((g) => g.number), [3], 'a passive VMM gets its group fds at attach');
      for (const g of grant.groups) g.fd.closeSync();
      grant.kvm.closeSync();
      assert.equal(t.broker.getVm(ROOT, p.vm.id).state, 'RUNNING');
      await assert.rejects(t.broker.addGroup(ROOT, p.vm.id, 1), /passive/);
      link.exit();
    } finally {
      await t.done();
    }
  });
});
