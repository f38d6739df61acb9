import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { Broker, type Caller, type CreateVmSpec, type VmFilter } from '../../src/broker/broker';
import { GroupPool } from '../../src/broker/pool';
import { VmRegistry, type VmChange, type VmRecord } from '../../src/broker/vms';
import { AlreadyExistsError, FailedPreconditionError, NotFoundError, PermissionDeniedError, ResourceExhaustedError, UnavailableError } from '../../src/broker/errors';
import type { Principal } from '../../src/broker/policy';
import type { VmmLink } from '../../src/broker/vmm';
import { Errno } from '../../src/kernel';
import { makeFakeHost, type FakeGroup, type FakeHost } from '../helpers/fakehost';
import { HostDouble, KernelDouble } from '../helpers/kerneldouble';
import { TokenStore } from '../../src/broker/tokens';

const NIC = { vendor: '8086', device: '1521', class: '020000' };
const GPU = { vendor: '10de', device: '1eb8', class: '030000' };
const AUDIO = { vendor: '10de', device: '10f8', class: '040300' };

/** Groups 1-6 and 12 viable; 7 not (audio function on snd_hda_intel). */
const GROUPS: FakeGroup[] = [
  ...[1, 2, 3, 4, 5, 6].map((n) => ({ number: n, devices: [{ address: `0000:0${n}:00.0`, ...NIC, driver: 'vfio-pci' }] })),
  {
    number: 7,
    devices: [
      { address: '0000:07:00.0', ...GPU, driver: 'vfio-pci' },
      { address: '0000:07:00.1', ...AUDIO, driver: 'snd_hda_intel' },
    ],
  },
  { number: 12, devices: [{ address: '0000:0c:00.0', ...GPU, driver: 'vfio-pci' }] },
];

const ROOT: Caller = { uid: 0, gid: 0, pid: 10 };
const ALICE: Caller = { uid: 1000, gid: 1000, pid: 11 };
const BOB: Caller = { uid: 2000, gid: 2000, pid: 12 };

function spec(over: Partial<CreateVmSpec> = {}): CreateVmSpec {
  return { name: 'web-1', labels: {}, vmmUid: 64000, vfioDevice: true, groups: [], memlockBytes: 0, requestId: '', ...over };
}

interface Ctx {
  host: FakeHost;
  k: KernelDouble;
  pool: GroupPool;
  broker: Broker;
}

async function withBroker(fn: (c: Ctx) => Promise<void>): Promise<void> {
  const host = await makeFakeHost(GROUPS);
  const k = new KernelDouble();
  const pool = new GroupPool({ sysfsRoot: host.sysfs, devRoot: host.dev, procRoot: host.root, openGroup: k.openGroup });
  const vmmHost = new HostDouble();
  const broker = new Broker(pool, new VmRegistry(), { tokens: new TokenStore(60_000), host: vmmHost, exitGraceMs: 1000 });
  try {
    await fn({ host, k, pool, broker });
  } finally {
    vmmHost.close();
    await pool.closeAll();
    await host.cleanup();
  }
}

async function rejectsWith<E extends Error>(p: Promise<unknown> | (() => unknown), cls: new (...a: never[]) => E): Promise<E> {
  try {
    await (typeof p === 'function' ? p() : p);
  } catch (e) {
    assert.ok(e instanceof cls, `expected ${cls.name}, got ${(e as Error)?.constructor?.name}: ${(e as Error)?.message}`);
    return e;
  }
  assert.fail(`expected ${cls.name}, but it succeeded`);
}

/** A snapshot of what a failed call must not change. */
function snap(vm: VmRecord): { groups: number[]; revision: number; vfioDevice: boolean; state: string; updateTime: string } {
  return { groups: [...vm.groups], revision: vm.revision, vfioDevice: vm.vfioDevice, state: vm.state, updateTime: vm.updateTime };
}

describe('Broker: createVm', () => {
  test('stores a PENDING VM with its groups claimed for it', async () => {
    await withBroker(async ({ broker, pool, k }) => {
      const { vm, created } = await broker.createVm(ALICE, spec({ groups: [12, 3], labels: { app: 'web' }, memlockBytes: 4096, requestId: 'r1' }));
      assert.equal(created, true);
      assert.equal(vm.state, 'PENDING');
      assert.equal(vm.name, 'web-1');
      assert.equal(vm.ownerUid, 1000);
      assert.equal(vm.vmmUid, 64000);
      assert.deepEqual(vm.groups, [3, 12]);
      assert.deepEqual(vm.labels, { app: 'web' });
      assert.equal(vm.memlockBytes, 4096);
      assert.match(vm.id, /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/);
      assert.deepEqual(pool.ownerOf(12), { vmId: vm.id, vmName: 'web-1' });
      assert.deepEqual(pool.ownerOf(3), { vmId: vm.id, vmName: 'web-1' });
      assert.equal(k.opens(12), 1);
      assert.equal(broker.getVm(ALICE, vm.id), vm);
    });
  });

  test('a create whose group cannot be claimed stores nothing and claims nothing', async () => {
    await withBroker(async ({ broker, pool }) => {
      await rejectsWith(broker.createVm(ALICE, spec({ groups: [1, 7] })), FailedPreconditionError);
      await rejectsWith(broker.createVm(ALICE, spec({ groups: [1, 99] })), NotFoundError);
      assert.equal(broker.vms.size, 0);
      assert.equal(pool.claimedCount, 0);
      // The name is still free.
      await broker.createVm(ALICE, spec({ groups: [1] }));
    });
  });

  test('the same request_id with the same request returns the same VM, created:false', async () => {
    await withBroker(async ({ broker, pool, k }) => {
      const first = await broker.createVm(ALICE, spec({ groups: [1, 2], labels: { a: '1', b: '2' }, requestId: 'req-1' }));
      // Same request, groups and labels given in another order.
      const again = await broker.createVm(ALICE, spec({ groups: [2, 1], labels: { b: '2', a: '1' }, requestId: 'req-1' }));
      assert.equal(again.created, false);
      assert.equal(again.vm.id, first.vm.id);
      assert.equal(broker.vms.size, 1);
      assert.equal(pool.claimedCount, 2);
      assert.equal(k.opens(1), 1);
    });
  });

  test('the same request_id with a different request is FailedPreconditionError and claims nothing', async () => {
    await withBroker(async ({ broker, pool }) => {
      const first = await broker.createVm(ALICE, spec({ groups: [1], requestId: 'req-1' }));
      for (const other of [
        spec({ name: 'web-2', groups: [2], requestId: 'req-1' }),
        spec({ groups: [1, 2], requestId: 'req-1' }),
        spec({ groups: [1], memlockBytes: 1 << 20, requestId: 'req-1' }),
        spec({ groups: [1], labels: { x: 'y' }, requestId: 'req-1' }),
        spec({ groups: [1], vmmUid: 1, requestId: 'req-1' }),
      ]) {
        const e = await rejectsWith(broker.createVm(ALICE, other), FailedPreconditionError);
        assert.match(e.message, /req-1/);
      }
      assert.equal(broker.vms.size, 1);
      assert.equal(pool.ownerOf(2), undefined);
      assert.equal(pool.claimedCount, 1);
      assert.deepEqual(broker.getVm(ALICE, first.vm.id).groups, [1]);
    });
  });

  test('a request_id is per owner: another uid using it creates its own VM', async () => {
    await withBroker(async ({ broker }) => {
      const a = await broker.createVm(ALICE, spec({ requestId: 'req-1' }));
      const b = await broker.createVm(BOB, spec({ requestId: 'req-1' }));
      assert.equal(b.created, true);
      assert.notEqual(a.vm.id, b.vm.id);
    });
  });

  test('a duplicate name for the same owner is AlreadyExistsError and claims nothing', async () => {
    await withBroker(async ({ broker, pool }) => {
      await broker.createVm(ALICE, spec({ groups: [1] }));
      const e = await rejectsWith(broker.createVm(ALICE, spec({ groups: [2] })), AlreadyExistsError);
      assert.match(e.message, /web-1/);
      assert.equal(pool.ownerOf(2), undefined);
      assert.equal(broker.vms.size, 1);
    });
  });

  test('the same name for a different owner uid is allowed', async () => {
    await withBroker(async ({ broker }) => {
      const a = await broker.createVm(ALICE, spec());
      const b = await broker.createVm(BOB, spec());
      assert.equal(b.created, true);
      assert.notEqual(a.vm.id, b.vm.id);
      assert.equal(broker.vms.size, 2);
    });
  });

  test('concurrent createVm with the same name: exactly one wins, the loser claims nothing', async () => {
    await withBroker(async ({ broker, pool }) => {
      const results = await Promise.allSettled([broker.createVm(ALICE, spec({ groups: [1] })), broker.createVm(ALICE, spec({ groups: [2] }))]);
      const won = results.filter((r) => r.status === 'fulfilled');
      const lost = results.filter((r): r is PromiseRejectedResult => r.status === 'rejected');
      assert.equal(won.length, 1);
      assert.equal(lost.length, 1);
      assert.ok(lost[0].reason instanceof AlreadyExistsError, String(lost[0].reason));
      assert.equal(broker.vms.size, 1);
      assert.equal(pool.claimedCount, 1);
    });
  });

  test('concurrent createVm with the same name and request_id: one VM, one created:true', async () => {
    await withBroker(async ({ broker }) => {
      const [a, b] = await Promise.all([broker.createVm(ALICE, spec({ groups: [1], requestId: 'r' })), broker.createVm(ALICE, spec({ groups: [1], requestId: 'r' }))]);
      assert.equal(a.vm.id, b.vm.id);
      assert.deepEqual([a.created, b.created].sort(), [false, true]);
      assert.equal(broker.vms.size, 1);
    });
  });

  test('concurrent createVm of different owners on the same group: exactly one gets it', async () => {
    await withBroker(async ({ broker, pool, k }) => {
      const results = await Promise.allSettled([broker.createVm(ALICE, spec({ groups: [12] })), broker.createVm(BOB, spec({ groups: [12] }))]);
      assert.equal(results.filter((r) => r.status === 'fulfilled').length, 1);
      const lost = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
      assert.ok(lost?.reason instanceof FailedPreconditionError, String(lost?.reason));
      assert.equal(broker.vms.size, 1);
      assert.equal(pool.ownerOf(12)?.vmId, [...broker.vms.all()][0].id);
      assert.equal(k.opens(12), 1);
    });
  });
});

describe('Broker: quotas per principal', () => {
  test('VMs, groups held and live tokens are counted per principal; expired, redeemed and deleted ones stop counting', async () => {
    const host = await makeFakeHost(GROUPS);
    const k = new KernelDouble();
    const pool = new GroupPool({ sysfsRoot: host.sysfs, devRoot: host.dev, procRoot: host.root, openGroup: k.openGroup });
    const vmmHost = new HostDouble();
    let now = 1_000_000;
    const broker = new Broker(pool, new VmRegistry(), { tokens: new TokenStore(60_000, () => now), host: vmmHost, exitGraceMs: 1000 });
    const tenant = (name: string, uid: number): Caller => ({
      uid,
      gid: uid,
      pid: 99,
      principal: { name, admin: false, limits: { vms: 3, groups: 2, pendingTokens: 2, memlockPerVmBytes: 0, memlockBytes: 0 }, mayCall: () => true, mayUseGroup: () => true, mayNameVmmUid: () => true },
    });
    const a = tenant('a', 1000);
    const b = tenant('b', 2000);
    const spec = (name: string, groups: number[] = []): CreateVmSpec => ({ name, labels: {}, vmmUid: 65534, vfioDevice: true, groups, memlockBytes: 0, requestId: '' });
    try {
      const a1 = await broker.createVm(a, spec('a1', [1]));
      await broker.createVm(a, spec('a2', [2]));
      // Two live tokens: the third create is refused on tokens, before VMs or groups.
      await assert.rejects(broker.createVm(a, spec('a3')), /principal a has 2 unused attach tokens; its limit \(limits.pendingTokens\) is 2/);
      // Another principal is counted apart.
      await broker.createVm(b, spec('b1', [3]));
      // A redeemed token stops counting.
      broker.tokens.redeem(a1.token!.token, 65534);
      const a3 = await broker.createVm(a, spec('a3'));
      await assert.rejects(broker.createVm(a, spec('a4')), /principal a holds 3 VMs; its limit \(limits.vms\) is 3/);
      // Two groups held: one more is refused, on a new VM or an existing one.
      await assert.rejects(broker.addGroup(a, a3.vm.id, 4), /principal a holds 2 IOMMU groups; 1 more would pass its limit \(limits.groups\) of 2/);
      await broker.deleteVm(a, a1.vm.id);
      await broker.addGroup(a, a3.vm.id, 4);
      assert.equal(broker.tokens.pendingFor(broker.vms.idsOf('a')), 2);
      // Expired tokens stop counting without any sweep.
      now += 61_000;
      assert.equal(broker.tokens.pendingFor(broker.vms.idsOf('a')), 0);
      assert.deepEqual([...broker.vms.idsOf('b')].length, 1);
      assert.equal(broker.vms.idsOf('nobody').size, 0);
    } finally {
      vmmHost.close();
      await pool.closeAll();
      await host.cleanup();
    }
  });
});

describe('Broker: visibility', () => {
  test('uid 0 sees all VMs; uid 1000 sees only its own', async () => {
    await withBroker(async ({ broker }) => {
      const a = (await broker.createVm(ALICE, spec({ name: 'a' }))).vm;
      const b = (await broker.createVm(BOB, spec({ name: 'b' }))).vm;
      const r = (await broker.createVm(ROOT, spec({ name: 'r' }))).vm;
      assert.deepEqual(
        broker.listVms(ROOT, { labels: {}, states: [] }).map((v) => v.name).sort(),
        ['a', 'b', 'r'],
      );
      assert.deepEqual(
        broker.listVms(ALICE, { labels: {}, states: [] }).map((v) => v.name),
        ['a'],
      );
      assert.equal(broker.getVm(ROOT, b.id), b);
      assert.equal(broker.getVm(ALICE, a.id), a);
      await rejectsWith(() => broker.getVm(ALICE, b.id), NotFoundError);
      await rejectsWith(() => broker.getVm(ALICE, r.id), NotFoundError);
      await rejectsWith(() => broker.getVm(ALICE, '00000000-0000-4000-8000-000000000000'), NotFoundError);
    });
  });

  test('another owner\'s VM cannot be changed or deleted (NotFoundError), and is left as it was', async () => {
    await withBroker(async ({ broker, pool }) => {
      const b = (await broker.createVm(BOB, spec({ name: 'b', groups: [1], vfioDevice: false }))).vm;
      const before = snap(b);
      await rejectsWith(broker.deleteVm(ALICE, b.id), NotFoundError);
      await rejectsWith(broker.createVfioDevice(ALICE, b.id), NotFoundError);
      await rejectsWith(broker.addGroup(ALICE, b.id, 2), NotFoundError);
      await rejectsWith(broker.removeGroup(ALICE, b.id, 1), NotFoundError);
      assert.deepEqual(snap(broker.getVm(BOB, b.id)), before);
      assert.equal(pool.ownerOf(1)?.vmId, b.id);
      assert.equal(pool.ownerOf(2), undefined);
      // Root may.
      await broker.deleteVm(ROOT, b.id);
      assert.equal(broker.vms.size, 0);
    });
  });

  test('listVms filters by labels (all must match) and by states (any)', async () => {
    await withBroker(async ({ broker }) => {
      const a = (await broker.createVm(ALICE, spec({ name: 'a', labels: { app: 'web', env: 'prod' } }))).vm;
      await broker.createVm(ALICE, spec({ name: 'b', labels: { app: 'web', env: 'dev' } }));
      const c = (await broker.createVm(ALICE, spec({ name: 'c', labels: { app: 'db' } }))).vm;
      await broker.createVm(BOB, spec({ name: 'd', labels: { app: 'web', env: 'prod' } }));
      broker.vms.transition(c, 'FAILED', 'x');
      const names = (labels: Record<string, string>, states: VmRecord['state'][] = []) =>
        broker.listVms(ALICE, { labels, states }).map((v) => v.name).sort();
      assert.deepEqual(names({ app: 'web' }), ['a', 'b']);
      assert.deepEqual(names({ app: 'web', env: 'prod' }), ['a']);
      assert.deepEqual(names({ app: 'nope' }), []);
      assert.deepEqual(names({}, ['FAILED']), ['c']);
      assert.deepEqual(names({}, ['PENDING']), ['a', 'b']);
      assert.deepEqual(names({}, ['PENDING', 'FAILED']), ['a', 'b', 'c']);
      assert.deepEqual(names({}, ['RUNNING']), []);
      assert.deepEqual(names({ app: 'db' }, ['PENDING']), []);
      assert.deepEqual(
        broker.listVms(ROOT, { labels: { env: 'prod' }, states: [] }).map((v) => v.name).sort(),
        ['a', 'd'],
      );
      assert.ok(a);
    });
  });
});

describe('Broker: ownership per principal', () => {
  const principal = (name: string, admin = false): NonNullable<Caller['principal']> => ({
    name,
    admin,
    limits: { vms: 100, groups: 64, pendingTokens: 100, memlockPerVmBytes: 0, memlockBytes: 0 },
    mayCall: () => true,
    mayUseGroup: () => true,
    mayNameVmmUid: () => true,
  });
  const tenantA = principal('tenant-a');
  const A1: Caller = { uid: 1000, gid: 1000, pid: 21, principal: tenantA };
  const A2: Caller = { uid: 1001, gid: 1001, pid: 22, principal: tenantA };
  const B1: Caller = { uid: 2000, gid: 2000, pid: 23, principal: principal('tenant-b') };
  const OPS: Caller = { uid: 3000, gid: 3000, pid: 24, principal: principal('ops', true) };
  const ALL = { labels: {}, states: [] };

  test('every uid of a principal sees and changes its VMs; another principal sees nothing; admins and uid 0 see all', async () => {
    await withBroker(async ({ broker, pool }) => {
      const vm = (await broker.createVm(A1, spec({ name: 'web', groups: [1] }))).vm;
      assert.equal(vm.principal, 'tenant-a');
      assert.equal(vm.ownerUid, 1000);
      assert.equal(broker.getVm(A2, vm.id), vm);
      assert.deepEqual(broker.listVms(A2, ALL).map((v) => v.id), [vm.id]);
      await broker.addGroup(A2, vm.id, 2);
      assert.equal(pool.ownerOf(2)?.vmId, vm.id);
      await rejectsWith(() => broker.getVm(B1, vm.id), NotFoundError);
      await rejectsWith(broker.addGroup(B1, vm.id, 3), NotFoundError);
      assert.deepEqual(broker.listVms(B1, ALL), []);
      assert.deepEqual(broker.listVms(OPS, ALL).map((v) => v.id), [vm.id]);
      assert.deepEqual(broker.listVms(ROOT, ALL).map((v) => v.id), [vm.id]);
      // A change by one uid reaches a watcher of the other.
      const seen: string[] = [];
      const stop = broker.watch(A1, (ch) => seen.push(`${ch.type} ${ch.vm.name}`));
      const hidden = broker.watch(B1, (ch) => seen.push(`b saw ${ch.vm.name}`));
      await broker.deleteVm(A2, vm.id);
      stop();
      hidden();
      assert.deepEqual(seen, ['DELETED web']);
      assert.equal(pool.ownerOf(1), undefined);
    });
  });

  test('names and request_id retries are per principal, whichever of its uids calls', async () => {
    await withBroker(async ({ broker }) => {
      const first = await broker.createVm(A1, spec({ name: 'web', requestId: 'r-1' }));
      const retry = await broker.createVm(A2, spec({ name: 'web', requestId: 'r-1' }));
      assert.equal(retry.created, false);
      assert.equal(retry.vm.id, first.vm.id);
      await rejectsWith(broker.createVm(A2, spec({ name: 'web' })), AlreadyExistsError);
      await rejectsWith(broker.createVm(A2, spec({ name: 'other', requestId: 'r-1' })), FailedPreconditionError);
      // Another principal has its own names and request ids, even on the same uid.
      const b = await broker.createVm({ ...B1, uid: 1000 }, spec({ name: 'web', requestId: 'r-1' }));
      assert.equal(b.created, true);
      assert.equal(broker.vms.size, 2);
    });
  });

  test('concurrent creates of one name from two uids of a principal: exactly one wins', async () => {
    await withBroker(async ({ broker }) => {
      const results = await Promise.allSettled([broker.createVm(A1, spec({ name: 'web', groups: [1] })), broker.createVm(A2, spec({ name: 'web', groups: [2] }))]);
      assert.equal(results.filter((r) => r.status === 'fulfilled').length, 1);
      assert.equal(broker.vms.size, 1);
    });
  });

  test('a record without a principal (from an older state file) stays with the uid that made it', async () => {
    await withBroker(async ({ broker }) => {
      const legacy = broker.vms.insert(broker.vms.newId(), {
        name: 'old', labels: {}, ownerUid: 1000, vmmUid: 64000, vfioDevice: true, groups: [], memlockBytes: 0, requestId: 'r-old', requestFingerprint: '', principal: '',
      });
      const mine = (await broker.createVm(A1, spec({ name: 'new' }))).vm;
      assert.equal(broker.getVm(A1, legacy.id), legacy);
      assert.deepEqual(broker.listVms(A1, ALL).map((v) => v.name), ['old', 'new']);
      assert.deepEqual(broker.listVmsPage(A1, ALL, { afterSeq: 0, size: 1 }).vms.map((v) => v.name), ['old']);
      assert.deepEqual(broker.listVmsPage(A1, ALL, { afterSeq: legacy.seq, size: 1 }).vms.map((v) => v.name), ['new']);
      // The principal's other uid did not make it: not its.
      await rejectsWith(() => broker.getVm(A2, legacy.id), NotFoundError);
      assert.deepEqual(broker.listVms(A2, ALL).map((v) => v.id), [mine.id]);
      // Its name and request_id still count for the uid that made it.
      await rejectsWith(broker.createVm(A1, spec({ name: 'old' })), AlreadyExistsError);
      await rejectsWith(broker.createVm(A1, spec({ name: 'x', requestId: 'r-old' })), FailedPreconditionError);
      await broker.deleteVm(A1, legacy.id);
    });
  });
});

describe('Broker: memlock limits', () => {
  const MiB = 1 << 20;
  const tenant = (memlockPerVmBytes: number, memlockBytes: number): Principal => ({
    name: 'tenant-m',
    admin: false,
    limits: { vms: 100, groups: 64, pendingTokens: 100, memlockPerVmBytes, memlockBytes },
    mayCall: () => true,
    mayUseGroup: () => true,
    mayNameVmmUid: () => true,
  });
  /** A VMM that attaches and then only waits to be told to exit. */
  const quietLink = (): VmmLink & { end(): void } => {
    let end!: () => void;
    const exited = new Promise<void>((r) => (end = r));
    return {
      pid: 4321,
      passive: false,
      createVfioDevice: async () => {},
      addGroup: async () => {},
      removeGroup: async () => {},
      addDevice: async () => {},
      removeDevice: async () => {},
      shutdown: () => {},
      kill: () => end(),
      assertAlive: () => {},
      vmMade: Promise.resolve(),
      exited,
      end,
    };
  };
  const VMM: Caller = { uid: 64000, gid: 64000, pid: 4321 };

  async function withMemlock(fn: (c: { broker: Broker; pool: GroupPool; vmmHost: HostDouble; policy: Map<string, Principal> }) => Promise<void>): Promise<void> {
    const host = await makeFakeHost(GROUPS);
    const k = new KernelDouble();
    const pool = new GroupPool({ sysfsRoot: host.sysfs, devRoot: host.dev, procRoot: host.root, openGroup: k.openGroup });
    const vmmHost = new HostDouble();
    // The "current policy": tests change it between CreateVm and attach, as a SIGHUP would.
    const policy = new Map<string, Principal>();
    const broker = new Broker(pool, new VmRegistry(), { tokens: new TokenStore(60_000), host: vmmHost, exitGraceMs: 1000, principalNamed: (n) => policy.get(n) });
    try {
      await fn({ broker, pool, vmmHost, policy });
    } finally {
      vmmHost.close();
      await pool.closeAll();
      await host.cleanup();
    }
  }

  test('CreateVm: over the per-VM limit is PERMISSION_DENIED, over the total of live VMs RESOURCE_EXHAUSTED, each naming the limit and the figures; nothing is made', async () => {
    await withMemlock(async ({ broker, pool }) => {
      const t: Caller = { uid: 1000, gid: 1000, pid: 5, principal: tenant(4 * MiB, 6 * MiB) };
      const e = await rejectsWith(broker.createVm(t, spec({ name: 'big', memlockBytes: 4 * MiB + 1, groups: [1] })), PermissionDeniedError);
      assert.equal(e.message, `principal tenant-m may not give a VM memlock_bytes ${4 * MiB + 1}; its per-VM limit (limits.memlockPerVmBytes) is ${4 * MiB}`);
      const a = (await broker.createVm(t, spec({ name: 'a', memlockBytes: 4 * MiB }))).vm;
      await broker.createVm(t, spec({ name: 'b', memlockBytes: 2 * MiB }));
      const over = await rejectsWith(broker.createVm(t, spec({ name: 'c', memlockBytes: 1, groups: [1] })), ResourceExhaustedError);
      assert.equal(over.message, `principal tenant-m's live VMs ask ${6 * MiB} bytes of memlock; memlock_bytes 1 more would pass its limit (limits.memlockBytes) of ${6 * MiB}`);
      assert.equal(broker.vms.size, 2);
      assert.equal(pool.ownerOf(1), undefined, 'a refused create claims nothing');
      // No memlock asked: no memlock limit applies.
      await broker.createVm(t, spec({ name: 'c', memlockBytes: 0 }));
      // Only live VMs count: a FAILED one, or a deleted one, frees its share.
      broker.vms.transition(a, 'FAILED', 'test');
      await broker.createVm(t, spec({ name: 'd', memlockBytes: 4 * MiB }));
      await rejectsWith(broker.createVm(t, spec({ name: 'e', memlockBytes: 1 })), ResourceExhaustedError);
      // A principal with the defaults of a non-admin (0) may ask none; uid 0 any.
      await rejectsWith(broker.createVm({ uid: 1001, gid: 1001, pid: 6, principal: tenant(0, 0) }, spec({ name: 'z', memlockBytes: 4096 })), PermissionDeniedError);
      await broker.createVm(ROOT, spec({ name: 'r', memlockBytes: 64 * MiB }));
    });
  });

  test('attach checks memlock against the policy as it is now: a limit lowered since CreateVm fails the VM with the reason, sets no rlimit and frees its groups', async () => {
    await withMemlock(async ({ broker, pool, vmmHost, policy }) => {
      policy.set('tenant-m', tenant(4 * MiB, 8 * MiB));
      const t: Caller = { uid: 1000, gid: 1000, pid: 5, principal: policy.get('tenant-m') };
      const ok = await broker.createVm(t, spec({ name: 'ok', memlockBytes: 4 * MiB, vmmUid: VMM.uid }));
      const cut = await broker.createVm(t, spec({ name: 'cut', memlockBytes: 4 * MiB, vmmUid: VMM.uid, groups: [2] }));
      // Within the limits: the rlimit is raised.
      const l1 = quietLink();
      (await broker.attach(ok.token!.token, VMM, l1)).kvm.closeSync();
      assert.deepEqual(vmmHost.memlock, [{ pid: VMM.pid, bytes: 4 * MiB }]);
      // SIGHUP: the per-VM limit drops under what "cut" asked.
      policy.set('tenant-m', tenant(2 * MiB, 8 * MiB));
      const l2 = quietLink();
      const e = await rejectsWith(broker.attach(cut.token!.token, VMM, l2), PermissionDeniedError);
      assert.match(e.message, /its per-VM limit \(limits.memlockPerVmBytes\) is 2097152/);
      const failed = broker.getVm(ROOT, cut.vm.id);
      assert.equal(failed.state, 'FAILED');
      assert.match(failed.failureReason, /^attach of VMM pid 4321: principal tenant-m may not give a VM memlock_bytes 4194304/);
      assert.equal(vmmHost.memlock.length, 1, 'no rlimit raised for the refused VMM');
      assert.equal(pool.ownerOf(2), undefined);
      l1.end();
      l2.end();
    });
  });

  test('attach: the total counts the other live VMs under the current limit; a principal gone from the policy, or a record without one, gets none', async () => {
    await withMemlock(async ({ broker, vmmHost, policy }) => {
      policy.set('tenant-m', tenant(4 * MiB, 8 * MiB));
      const t: Caller = { uid: 1000, gid: 1000, pid: 5, principal: policy.get('tenant-m') };
      const a = await broker.createVm(t, spec({ name: 'a', memlockBytes: 4 * MiB, vmmUid: VMM.uid }));
      const b = await broker.createVm(t, spec({ name: 'b', memlockBytes: 4 * MiB, vmmUid: VMM.uid }));
      policy.set('tenant-m', tenant(4 * MiB, 6 * MiB));
      const e = await rejectsWith(broker.attach(a.token!.token, VMM, quietLink()), ResourceExhaustedError);
      assert.match(e.message, /live VMs ask 4194304 bytes of memlock; memlock_bytes 4194304 more would pass its limit \(limits.memlockBytes\) of 6291456/);
      // "a" failed and counts no more: "b" fits.
      const lb = quietLink();
      (await broker.attach(b.token!.token, VMM, lb)).kvm.closeSync();
      assert.deepEqual(vmmHost.memlock, [{ pid: VMM.pid, bytes: 4 * MiB }]);

      const c = await broker.createVm(t, spec({ name: 'c', memlockBytes: MiB, vmmUid: VMM.uid }));
      policy.delete('tenant-m');
      const gone = await rejectsWith(broker.attach(c.token!.token, VMM, quietLink()), PermissionDeniedError);
      assert.match(gone.message, /principal tenant-m of vm c is no longer in the policy; memlock_bytes 1048576 is not granted/);

      const legacy = broker.vms.insert(broker.vms.newId(), {
        name: 'old', labels: {}, ownerUid: 1000, vmmUid: VMM.uid, vfioDevice: false, groups: [], memlockBytes: MiB, requestId: '', requestFingerprint: '', principal: '',
      });
      const old = await rejectsWith(broker.attach(broker.tokens.issue(legacy.id, VMM.uid).token, VMM, quietLink()), PermissionDeniedError);
      assert.match(old.message, /vm old was recorded without a principal/);
      // Root's records are always granted; so is a VM that asks no memlock.
      policy.set('root', { ...tenant(0, 0), name: 'root', limits: { vms: 1e9, groups: 1e9, pendingTokens: 1e9, memlockPerVmBytes: Number.MAX_SAFE_INTEGER, memlockBytes: Number.MAX_SAFE_INTEGER } });
      const r = await broker.createVm(ROOT, spec({ name: 'r', memlockBytes: 64 * MiB, vmmUid: VMM.uid }));
      const lr = quietLink();
      (await broker.attach(r.token!.token, VMM, lr)).kvm.closeSync();
      const n = await broker.createVm(t, spec({ name: 'n', memlockBytes: 0, vmmUid: VMM.uid }));
      const ln = quietLink();
      (await broker.attach(n.token!.token, VMM, ln)).kvm.closeSync();
      assert.deepEqual(vmmHost.memlock.map((m) => m.bytes), [4 * MiB, 64 * MiB]);
      for (const l of [lb, lr, ln]) l.end();
    });
  });
});

describe('Broker: ListVms pages', () => {
  const ALL = { labels: {}, states: [] };
  /** Follows the pages from the start; returns the names and the page sizes seen. */
  const walk = (broker: Broker, caller: Caller, size: number, filter: Parameters<Broker['listVms']>[1] = ALL) => {
    const names: string[] = [];
    const sizes: number[] = [];
    let afterSeq = 0;
    for (;;) {
      const page = broker.listVmsPage(caller, filter, { afterSeq, size });
      names.push(...page.vms.map((v) => v.name));
      sizes.push(page.vms.length);
      if (page.nextAfterSeq === undefined) return { names, sizes };
      afterSeq = page.nextAfterSeq;
    }
  };
  const fill = async (broker: Broker, n: number, caller: Caller = ROOT, labels: (i: number) => Record<string, string> = () => ({})) => {
    for (let i = 0; i < n; i++) await broker.createVm(caller, spec({ name: `vm-${i}`, vfioDevice: false, labels: labels(i) }));
  };

  test('250 records in pages of 100: 100, 100, 50, in creation order, each once; the last page says it is the last', async () => {
    await withBroker(async ({ broker }) => {
      await fill(broker, 250);
      const { names, sizes } = walk(broker, ROOT, 100);
      assert.deepEqual(sizes, [100, 100, 50]);
      assert.deepEqual(names, Array.from({ length: 250 }, (_, i) => `vm-${i}`));
      assert.deepEqual(broker.listVms(ROOT, ALL).map((v) => v.name), names);
    });
  });

  test('a listing that ends on a page boundary has no empty page after it', async () => {
    await withBroker(async ({ broker }) => {
      await fill(broker, 200);
      assert.deepEqual(walk(broker, ROOT, 100).sizes, [100, 100]);
      assert.deepEqual(walk(broker, ROOT, 500).sizes, [200]);
    });
  });

  test('records deleted or created between pages: none twice, none lost that still exists, the deleted ones not returned', async () => {
    await withBroker(async ({ broker }) => {
      await fill(broker, 30);
      const first = broker.listVmsPage(ROOT, ALL, { afterSeq: 0, size: 10 });
      assert.equal(first.vms.length, 10);
      // The page's last record (the cursor itself), one already listed and two not yet listed go; two come.
      const byName = (n: string) => broker.listVms(ROOT, ALL).find((v) => v.name === n)!;
      for (const n of ['vm-9', 'vm-3', 'vm-10', 'vm-25']) await broker.deleteVm(ROOT, byName(n).id);
      await broker.createVm(ROOT, spec({ name: 'late-1', vfioDevice: false }));
      await broker.createVm(ROOT, spec({ name: 'late-2', vfioDevice: false }));
      const rest: string[] = [];
      let afterSeq = first.nextAfterSeq!;
      for (;;) {
        const page = broker.listVmsPage(ROOT, ALL, { afterSeq, size: 10 });
        rest.push(...page.vms.map((v) => v.name));
        if (page.nextAfterSeq === undefined) break;
        afterSeq = page.nextAfterSeq;
      }
      const expected = [...Array.from({ length: 19 }, (_, i) => `vm-${i + 11}`).filter((n) => n !== 'vm-25'), 'late-1', 'late-2'];
      assert.deepEqual(rest, expected);
    });
  });

  test('a filtered listing pages over the matches only; the owner scope holds on every page', async () => {
    await withBroker(async ({ broker }) => {
      // Alice's and Bob's records interleaved; every third of Alice's is labelled.
      for (let i = 0; i < 40; i++) {
        await broker.createVm(i % 2 ? BOB : ALICE, spec({ name: `vm-${i}`, vfioDevice: false, labels: i % 3 === 0 ? { app: 'web' } : {} }));
      }
      const alice = walk(broker, ALICE, 3);
      assert.deepEqual(alice.names, Array.from({ length: 20 }, (_, i) => `vm-${2 * i}`));
      assert.deepEqual(alice.sizes, [3, 3, 3, 3, 3, 3, 2]);
      const web = walk(broker, ALICE, 2, { labels: { app: 'web' }, states: [] });
      assert.deepEqual(web.names, ['vm-0', 'vm-6', 'vm-12', 'vm-18', 'vm-24', 'vm-30', 'vm-36']);
      assert.deepEqual(walk(broker, ROOT, 7, { labels: { app: 'web' }, states: ['PENDING'] }).names.length, 14);
      assert.deepEqual(walk(broker, ALICE, 5, { labels: { app: 'db' }, states: [] }).sizes, [0]);
    });
  });
});

describe('Broker: ListVms pages against a plain scan', () => {
  test('any caller, filter and page size: the pages hold exactly what a scan of every record finds, in seq order', async () => {
    await withBroker(async ({ broker }) => {
      // A small deterministic generator: the same records every run.
      let x = 12345;
      const rand = (n: number) => ((x = (x * 1103515245 + 12345) % 2 ** 31), x % n);
      const callers = [ROOT, ALICE, BOB, { uid: 3000, gid: 3000, pid: 13 }];
      const pick = <T>(a: readonly T[]) => a[rand(a.length)];
      const labelSets: Record<string, string>[] = [{}, { app: 'web' }, { app: 'db' }, { app: 'web', env: 'prod' }, { env: 'prod' }, { env: 'dev', app: 'web' }, { 'a=b': 'c' }, { a: 'b=c' }];
      const live: VmRecord[] = [];
      for (let i = 0; i < 400; i++) {
        if (live.length && rand(4) === 0) {
          const vm = live.splice(rand(live.length), 1)[0];
          await broker.deleteVm(ROOT, vm.id);
        } else {
          live.push((await broker.createVm(pick(callers.slice(0, 3)), spec({ name: `vm-${i}`, vfioDevice: false, labels: pick(labelSets) }))).vm);
        }
      }
      for (const vm of live) if (rand(3) === 0) broker.vms.transition(vm, 'FAILED', 'x');
      const filters = [
        { labels: {}, states: [] },
        { labels: { app: 'web' }, states: [] },
        { labels: { app: 'web', env: 'prod' }, states: [] },
        { labels: { env: 'dev', app: 'web' }, states: ['FAILED'] },
        { labels: { env: 'prod' }, states: ['PENDING'] },
        { labels: { app: 'nope' }, states: [] },
        { labels: { 'a=b': 'c' }, states: [] },
        { labels: { a: 'b=c' }, states: [] },
        { labels: {}, states: ['PENDING', 'FAILED'] },
      ] as const;
      const bySeq = [...broker.vms.all()].sort((a, b) => a.seq - b.seq);
      for (const caller of callers) {
        for (const f of filters) {
          const filter: VmFilter = { labels: { ...f.labels }, states: [...f.states] };
          const expected = bySeq
            .filter((vm) => broker.canSee(caller, vm) && (!filter.states.length || filter.states.includes(vm.state)))
            .filter((vm) => Object.entries(filter.labels).every(([k, v]) => Object.hasOwn(vm.labels, k) && vm.labels[k] === v))
            .map((vm) => vm.id);
          assert.deepEqual(broker.listVms(caller, filter).map((v) => v.id), expected);
          for (const size of [1, 7, 100]) {
            const got: string[] = [];
            let afterSeq = 0;
            for (let n = 0; ; n++) {
              const page = broker.listVmsPage(caller, filter, { afterSeq, size });
              got.push(...page.vms.map((v) => v.id));
              assert.ok(page.vms.length <= size);
              if (page.nextAfterSeq === undefined) break;
              assert.equal(page.vms.length, size, 'only a full page says more may follow');
              afterSeq = page.nextAfterSeq;
              assert.ok(n < 1000);
            }
            assert.deepEqual(got, expected, `uid ${caller.uid}, ${JSON.stringify(filter)}, size ${size}`);
          }
        }
      }
    });
  });
});

describe('VmRegistry: creation order', () => {
  const newVm = (name: string) => ({ name, labels: {}, ownerUid: 0, vmmUid: 1, vfioDevice: false, groups: [], memlockBytes: 0, requestId: '', requestFingerprint: '', principal: '' });
  const names = (r: VmRegistry, after = 0) => [...r.inOrderAfter(after)].map((v) => v.name);

  test('seq grows with each creation and survives a restore; new records come after restored ones', () => {
    const a = new VmRegistry();
    const x = a.insert(a.newId(), newVm('x'));
    const y = a.insert(a.newId(), newVm('y'));
    a.update(x, (v) => (v.vmmPid = 5)); // an update bumps the revision, not the seq
    const z = a.insert(a.newId(), newVm('z'));
    assert.ok(x.seq < y.seq && y.seq < z.seq);
    assert.ok(x.revision > y.seq);
    assert.deepEqual(names(a), ['x', 'y', 'z']);
    assert.deepEqual(names(a, y.seq), ['z']);
    assert.deepEqual(names(a, y.seq - 1), ['y', 'z']);

    const b = new VmRegistry();
    // A state file's order is not creation order; seq is.
    b.restore([z, x, y].map((v) => ({ ...v })), a.revision);
    assert.deepEqual(names(b), ['x', 'y', 'z']);
    const w = b.insert(b.newId(), newVm('w'));
    assert.ok(w.seq > z.seq && w.seq > x.revision);
    b.remove(b.get(y.id)!);
    assert.deepEqual(names(b), ['x', 'z', 'w']);
    assert.deepEqual(names(b, y.seq), ['z', 'w']);
  });

  test('a walk keeps to the owner\'s records or to a label pair\'s, whichever is shorter, and the lists follow removals', () => {
    const r = new VmRegistry();
    const add = (name: string, ownerUid: number, labels: Record<string, string>) => r.insert(r.newId(), { ...newVm(name), ownerUid, labels });
    add('a', 1, { app: 'web' });
    const b = add('b', 2, { app: 'web', env: 'prod' });
    add('c', 1, { app: 'db' });
    add('d', 1, { app: 'web', env: 'prod' });
    add('e', 2, {});
    const walk = (hint: Parameters<VmRegistry['inOrderAfter']>[1], after = 0) => [...r.inOrderAfter(after, hint)].map((v) => v.name);
    assert.deepEqual(walk({}), ['a', 'b', 'c', 'd', 'e']);
    assert.deepEqual(walk({ owners: ['uid:1'] }), ['a', 'c', 'd']);
    assert.deepEqual(walk({ owners: ['uid:9'] }), []);
    assert.deepEqual(walk({ labels: { env: 'prod' } }), ['b', 'd']);
    assert.deepEqual(walk({ labels: { app: 'web', env: 'prod' } }), ['b', 'd']);
    assert.deepEqual(walk({ labels: { app: 'web', env: 'nope' } }), []);
    assert.deepEqual(walk({ owners: ['uid:2'], labels: { app: 'web' } }), ['b', 'e'], 'the owner\'s list is the shorter');
    assert.deepEqual(walk({ labels: { env: 'prod' } }, b.seq), ['d']);
    r.remove(b);
    assert.deepEqual(walk({ labels: { env: 'prod' } }), ['d']);
    assert.deepEqual(walk({ owners: ['uid:2'] }), ['e']);
    r.remove(r.get([...r.inOrderAfter(0, { labels: { env: 'prod' } })][0].id)!);
    assert.deepEqual(walk({ labels: { env: 'prod' } }), []);
    assert.deepEqual(walk({}), ['a', 'c', 'e']);
  });

  test("a walk over several owners' lists (a principal's and its uid's older records) merges them in seq order", () => {
    const r = new VmRegistry();
    const add = (name: string, principal: string, ownerUid: number, labels: Record<string, string> = {}) => r.insert(r.newId(), { ...newVm(name), principal, ownerUid, labels });
    add('p1', 'tenant-a', 1000);
    add('u1', '', 1000);
    add('o1', 'tenant-b', 1000);
    const p2 = add('p2', 'tenant-a', 1001);
    add('u2', '', 1000, { app: 'web' });
    add('p3', 'tenant-a', 1000, { app: 'web' });
    add('x', '', 1001);
    const walk = (hint: Parameters<VmRegistry['inOrderAfter']>[1], after = 0) => [...r.inOrderAfter(after, hint)].map((v) => v.name);
    assert.deepEqual(walk({ owners: ['tenant-a', 'uid:1000'] }), ['p1', 'u1', 'p2', 'u2', 'p3']);
    assert.deepEqual(walk({ owners: ['tenant-a', 'uid:1000'] }, p2.seq), ['u2', 'p3']);
    assert.deepEqual(walk({ owners: ['uid:1000', 'tenant-a'] }, p2.seq - 1), ['p2', 'u2', 'p3']);
    assert.deepEqual(walk({ owners: ['tenant-a', 'uid:1000'], labels: { app: 'web' } }), ['u2', 'p3'], "the label's list is the shorter");
    assert.deepEqual(walk({ owners: ['nobody', 'uid:7'] }), []);
    // Names are unique per owner key: the same name under a principal and under a bare uid are two owners.
    assert.equal(r.findByName('tenant-a', 'p2')?.ownerUid, 1001);
    assert.equal(r.findByName('uid:1001', 'p2'), undefined);
    assert.equal(r.findByName('uid:1000', 'u1')?.name, 'u1');
  });

  test('records of a state file without seq get one in creation-time order', () => {
    const a = new VmRegistry();
    const made = ['p', 'q', 'r'].map((n) => a.insert(a.newId(), newVm(n)));
    const legacy = made.map((v, i) => {
      const { seq: _seq, ...old } = v;
      // q was created first, then r, then p; revisions bumped by later updates.
      return { ...old, createTime: ['2024-01-01T00:00:03.000Z', '2024-01-01T00:00:01.000Z', '2024-01-01T00:00:02.000Z'][i], revision: 10 + i } as VmRecord;
    });
    const b = new VmRegistry();
    b.restore(legacy, 12);
    assert.deepEqual(names(b), ['q', 'r', 'p']);
    assert.ok(b.insert(b.newId(), newVm('s')).seq > 12);
    assert.deepEqual(names(b), ['q', 'r', 'p', 's']);
  });
});

describe('Broker: the VFIO device and groups of a pending VM', () => {
  test('createVfioDevice sets the device; a second one is AlreadyExistsError', async () => {
    await withBroker(async ({ broker }) => {
      const vm = (await broker.createVm(ALICE, spec({ vfioDevice: false }))).vm;
      const after = await broker.createVfioDevice(ALICE, vm.id);
      assert.equal(after.vfioDevice, true);
      const rev = after.revision;
      await rejectsWith(broker.createVfioDevice(ALICE, vm.id), AlreadyExistsError);
      assert.equal(broker.getVm(ALICE, vm.id).revision, rev);
    });
  });

  test('addGroup without the device is FailedPreconditionError and claims nothing', async () => {
    await withBroker(async ({ broker, pool, k }) => {
      const vm = (await broker.createVm(ALICE, spec({ vfioDevice: false }))).vm;
      const before = snap(vm);
      const e = await rejectsWith(broker.addGroup(ALICE, vm.id, 12), FailedPreconditionError);
      assert.match(e.message, /CreateVfioDevice/);
      assert.deepEqual(snap(broker.getVm(ALICE, vm.id)), before);
      assert.equal(pool.ownerOf(12), undefined);
      assert.equal(k.attempts(12), 0);
    });
  });

  test('addGroup claims the group and adds it in order', async () => {
    await withBroker(async ({ broker, pool }) => {
      const vm = (await broker.createVm(ALICE, spec({ groups: [5] }))).vm;
      const rev = vm.revision;
      const after = await broker.addGroup(ALICE, vm.id, 2);
      assert.deepEqual(after.groups, [2, 5]);
      assert.ok(after.revision > rev);
      assert.deepEqual(pool.ownerOf(2), { vmId: vm.id, vmName: 'web-1' });
    });
  });

  test('addGroup of a group already in the VM is AlreadyExistsError', async () => {
    await withBroker(async ({ broker, pool }) => {
      const vm = (await broker.createVm(ALICE, spec({ groups: [12] }))).vm;
      const before = snap(vm);
      await rejectsWith(broker.addGroup(ALICE, vm.id, 12), AlreadyExistsError);
      assert.deepEqual(snap(broker.getVm(ALICE, vm.id)), before);
      assert.equal(pool.ownerOf(12)?.vmId, vm.id);
    });
  });

  test('addGroup of a group held by another VM names it; nothing changes', async () => {
    await withBroker(async ({ broker, pool }) => {
      const other = (await broker.createVm(BOB, spec({ name: 'db-1', groups: [12] }))).vm;
      const vm = (await broker.createVm(ALICE, spec())).vm;
      const before = snap(vm);
      const e = await rejectsWith(broker.addGroup(ALICE, vm.id, 12), FailedPreconditionError);
      assert.ok(e.message.includes('db-1'), e.message);
      assert.deepEqual(snap(broker.getVm(ALICE, vm.id)), before);
      assert.equal(pool.ownerOf(12)?.vmId, other.id);
    });
  });

  test('a failed addGroup (not viable, unknown, busy, out of fds) changes nothing and leaves the group free', async () => {
    await withBroker(async ({ broker, pool, k }) => {
      k.set(3, { openErrno: Errno.EBUSY });
      k.set(4, { openErrno: Errno.EMFILE });
      k.set(5, { viable: false });
      const vm = (await broker.createVm(ALICE, spec({ groups: [1] }))).vm;
      const before = snap(vm);
      const events: VmChange[] = [];
      const stop = broker.watch(ROOT, (c) => events.push(c));
      for (const g of [7, 99, 3, 4, 5]) {
        await assert.rejects(broker.addGroup(ALICE, vm.id, g));
        assert.deepEqual(snap(broker.getVm(ALICE, vm.id)), before, `after group ${g}`);
        assert.equal(pool.ownerOf(g), undefined, `group ${g}`);
      }
      stop();
      assert.deepEqual(events, []);
      assert.equal(pool.openCount, 1);
      assert.equal(k.live(5), 0);
      // The groups can still go to another VM once fixed.
      k.set(3, {});
      const other = (await broker.createVm(BOB, spec({ name: 'x', groups: [3] }))).vm;
      assert.equal(pool.ownerOf(3)?.vmId, other.id);
    });
  });

  test('removeGroup of a group not in the VM is NotFoundError', async () => {
    await withBroker(async ({ broker, pool }) => {
      const other = (await broker.createVm(BOB, spec({ name: 'db-1', groups: [2] }))).vm;
      const vm = (await broker.createVm(ALICE, spec({ groups: [1] }))).vm;
      const before = snap(vm);
      await rejectsWith(broker.removeGroup(ALICE, vm.id, 2), NotFoundError);
      await rejectsWith(broker.removeGroup(ALICE, vm.id, 99), NotFoundError);
      assert.deepEqual(snap(broker.getVm(ALICE, vm.id)), before);
      assert.equal(pool.ownerOf(2)?.vmId, other.id, "another VM's group is not released");
    });
  });

  test('removeGroup frees the group for another VM, keeping the daemon\'s fd', async () => {
    await withBroker(async ({ broker, pool, k }) => {
      const vm = (await broker.createVm(ALICE, spec({ groups: [1, 12] }))).vm;
      await rejectsWith(broker.createVm(BOB, spec({ name: 'db-1', groups: [12] })), FailedPreconditionError);
      const after = await broker.removeGroup(ALICE, vm.id, 12);
      assert.deepEqual(after.groups, [1]);
      assert.equal(pool.ownerOf(12), undefined);
      const other = (await broker.createVm(BOB, spec({ name: 'db-1', groups: [12] }))).vm;
      assert.equal(pool.ownerOf(12)?.vmId, other.id);
      assert.equal(k.opens(12), 1);
      assert.equal(k.closes(12), 0);
    });
  });

  test('deleteVm releases the VM\'s groups and forgets it', async () => {
    await withBroker(async ({ broker, pool }) => {
      const keep = (await broker.createVm(ALICE, spec({ name: 'keep', groups: [3] }))).vm;
      const vm = (await broker.createVm(ALICE, spec({ groups: [1, 2] }))).vm;
      const gone = await broker.deleteVm(ALICE, vm.id);
      assert.equal(gone.id, vm.id);
      assert.equal(pool.ownerOf(1), undefined);
      assert.equal(pool.ownerOf(2), undefined);
      assert.equal(pool.ownerOf(3)?.vmId, keep.id);
      await rejectsWith(() => broker.getVm(ALICE, vm.id), NotFoundError);
      await rejectsWith(broker.deleteVm(ALICE, vm.id), NotFoundError);
      // The name and the groups can be used again.
      await broker.createVm(BOB, spec({ groups: [1, 2] }));
      await broker.createVm(ALICE, spec({ groups: [] }));
    });
  });

  test('changes to a VM that is not PENDING are FailedPreconditionError; it can still be deleted', async () => {
    await withBroker(async ({ broker, pool }) => {
      const failed = (await broker.createVm(ALICE, spec({ name: 'f', groups: [1], vfioDevice: false }))).vm;
      broker.vms.transition(failed, 'FAILED', 'x');
      const running = (await broker.createVm(ALICE, spec({ name: 'r', groups: [3] }))).vm;
      broker.vms.transition(broker.vms.transition(running, 'RUNNING'), 'EXITED');
      for (const vm of [failed, running]) {
        const before = snap(vm);
        await rejectsWith(broker.createVfioDevice(ALICE, vm.id), FailedPreconditionError);
        const e = await rejectsWith(broker.addGroup(ALICE, vm.id, 2), FailedPreconditionError);
        assert.ok(e.message.includes(vm.state), e.message);
        await rejectsWith(broker.removeGroup(ALICE, vm.id, vm.groups[0]), FailedPreconditionError);
        assert.deepEqual(snap(broker.getVm(ALICE, vm.id)), before);
        assert.equal(pool.ownerOf(vm.groups[0])?.vmId, vm.id);
      }
      assert.equal(pool.ownerOf(2), undefined);
      const e = await rejectsWith(broker.createVfioDevice(ALICE, running.id), FailedPreconditionError);
      assert.match(e.message, /EXITED/);
      await broker.deleteVm(ALICE, failed.id);
      assert.equal(pool.ownerOf(1), undefined);
    });
  });
});

describe('Broker: watch', () => {
  test('delivers CREATED, UPDATED, DELETED only for VMs the watcher can see', async () => {
    await withBroker(async ({ broker }) => {
      const seen: Record<string, [string, string][]> = { root: [], alice: [], bob: [] };
      const stops = [
        broker.watch(ROOT, (c) => seen.root.push([c.type, c.vm.name])),
        broker.watch(ALICE, (c) => seen.alice.push([c.type, c.vm.name])),
        broker.watch(BOB, (c) => seen.bob.push([c.type, c.vm.name])),
      ];
      const a = (await broker.createVm(ALICE, spec({ name: 'a', vfioDevice: false }))).vm;
      const b = (await broker.createVm(BOB, spec({ name: 'b', vfioDevice: false }))).vm;
      await broker.createVfioDevice(ALICE, a.id);
      await broker.addGroup(ALICE, a.id, 1);
      await broker.createVfioDevice(BOB, b.id);
      await broker.deleteVm(ALICE, a.id);
      await broker.deleteVm(ROOT, b.id);
      assert.deepEqual(seen.alice, [
        ['CREATED', 'a'],
        ['UPDATED', 'a'],
        ['UPDATED', 'a'],
        ['DELETED', 'a'],
      ]);
      assert.deepEqual(seen.bob, [
        ['CREATED', 'b'],
        ['UPDATED', 'b'],
        ['DELETED', 'b'],
      ]);
      assert.deepEqual(seen.root, [
        ['CREATED', 'a'],
        ['CREATED', 'b'],
        ['UPDATED', 'a'],
        ['UPDATED', 'a'],
        ['UPDATED', 'b'],
        ['DELETED', 'a'],
        ['DELETED', 'b'],
      ]);
      for (const stop of stops) stop();
      await broker.createVm(ALICE, spec({ name: 'c' }));
      assert.equal(seen.alice.length, 4, 'no event after unsubscribe');
      assert.equal(seen.root.length, 7);
    });
  });

  test('events carry a frozen copy of the VM as it was at the change', async () => {
    await withBroker(async ({ broker }) => {
      const events: VmChange[] = [];
      const stop = broker.watch(ALICE, (c) => events.push(c));
      const vm = (await broker.createVm(ALICE, spec({ groups: [1] }))).vm;
      await broker.addGroup(ALICE, vm.id, 2);
      stop();
      assert.deepEqual(events.map((e) => e.vm.groups), [[1], [1, 2]]);
      assert.ok(Object.isFrozen(events[0].vm));
      assert.notEqual(events[1].vm, vm);
      assert.ok(events[1].vm.revision > events[0].vm.revision);
    });
  });
});

describe('Broker: shutdown', () => {
  test('after beginShutdown every mutation is UnavailableError; reads still work', async () => {
    await withBroker(async ({ broker, pool }) => {
      const vm = (await broker.createVm(ALICE, spec({ groups: [1], vfioDevice: false }))).vm;
      const bare = (await broker.createVm(ALICE, spec({ name: 'dev', groups: [] }))).vm;
      broker.beginShutdown();
      await rejectsWith(broker.createVm(ALICE, spec({ name: 'new', groups: [2] })), UnavailableError);
      await rejectsWith(broker.createVfioDevice(ALICE, vm.id), UnavailableError);
      await rejectsWith(broker.addGroup(ALICE, bare.id, 2), UnavailableError);
      await rejectsWith(broker.removeGroup(ALICE, vm.id, 1), UnavailableError);
      await rejectsWith(broker.deleteVm(ALICE, vm.id), UnavailableError);
      assert.equal(broker.vms.size, 2);
      assert.equal(pool.ownerOf(1)?.vmId, vm.id);
      assert.equal(pool.ownerOf(2), undefined);
      assert.equal(broker.getVm(ALICE, vm.id).vfioDevice, false);
      assert.equal(broker.listVms(ALICE, { labels: {}, states: [] }).length, 2);
      assert.equal((await broker.getGroup(1)).owner?.vmId, vm.id);
    });
  });
});
