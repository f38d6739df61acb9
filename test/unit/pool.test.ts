import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { GroupPool, type GroupOwner, type OpenGroup } from '../../src/broker/pool';
import { AlreadyExistsError, FailedPreconditionError, NotFoundError, ResourceExhaustedError } from '../../src/broker/errors';
import { Errno, SysError, VfioGroup } from '../../src/kernel';
import { makeFakeHost, type FakeGroup, type FakeHost } from '../helpers/fakehost';
import { KernelDouble, gate } from '../helpers/kerneldouble';

const GPU = { vendor: '10de', device: '1eb8', class: '030000' };
const AUDIO = { vendor: '10de', device: '10f8', class: '040300' };
const NIC = { vendor: '8086', device: '1521', class: '020000' };

/** Groups 1, 2, 3, 5, 12 viable (vfio-pci); 7 has its audio function on the host driver; 8 has two offenders. */
const GROUPS: FakeGroup[] = [
  { number: 1, devices: [{ address: '0000:02:00.0', ...NIC, driver: 'vfio-pci' }] },
  { number: 2, devices: [{ address: '0000:03:00.0', ...NIC, driver: 'vfio-pci' }] },
  { number: 3, devices: [{ address: '0000:04:00.0', ...NIC, driver: 'vfio-pci' }] },
  { number: 5, devices: [{ address: '0000:05:00.0', ...NIC }] },
  {
    number: 7,
    devices: [
      { address: '0000:01:00.0', ...GPU, driver: 'vfio-pci' },
      { address: '0000:01:00.1', ...AUDIO, driver: 'snd_hda_intel' },
    ],
  },
  {
    number: 8,
    devices: [
      { address: '0000:08:00.0', ...NIC, driver: 'igb' },
      { address: '0000:08:00.1', ...NIC, driver: 'e1000e' },
    ],
  },
  { number: 12, devices: [{ address: '0000:0c:00.0', ...GPU, driver: 'vfio-pci' }] },
];

const A: GroupOwner = { vmId: '11111111-1111-4111-8111-111111111111', vmName: 'web-1' };
const B: GroupOwner = { vmId: '22222222-2222-4222-8222-222222222222', vmName: 'db-1' };

interface Ctx {
  host: FakeHost;
  k: KernelDouble;
  pool: GroupPool;
}

async function withPool(fn: (c: Ctx) => Promise<void>, opts: { openGroup?: OpenGroup; procRoot?: string } = {}): Promise<void> {
  const host = await makeFakeHost(GROUPS);
  const k = new KernelDouble();
  const pool = new GroupPool({ sysfsRoot: host.sysfs, devRoot: host.dev, procRoot: opts.procRoot, openGroup: opts.openGroup ?? k.openGroup });
  try {
    await fn({ host, k, pool });
  } finally {
    await pool.closeAll();
    await host.cleanup();
  }
}

/** Asserts the promise rejects with an instance of `cls` and returns the error. */
async function rejectsWith<E extends Error>(p: Promise<unknown>, cls: new (...a: never[]) => E): Promise<E> {
  try {
    await p;
  } catch (e) {
    assert.ok(e instanceof cls, `expected ${cls.name}, got ${(e as Error)?.constructor?.name}: ${(e as Error)?.message}`);
    return e;
  }
  assert.fail(`expected ${cls.name}, but it resolved`);
}

describe('GroupPool: refusals', () => {
  test('an unknown group is NotFoundError and opens nothing', async () => {
    await withPool(async ({ k, pool }) => {
      const e = await rejectsWith(pool.claim([99], A), NotFoundError);
      assert.match(e.message, /99/);
      assert.equal(k.attempts(99), 0);
      assert.equal(pool.ownerOf(99), undefined);
      assert.equal(pool.claimedCount, 0);
      await rejectsWith(pool.get(99), NotFoundError);
    });
  });

  test('a group that is not viable in sysfs names the device, its driver and the fix, and is not opened', async () => {
    await withPool(async ({ k, pool }) => {
      const e = await rejectsWith(pool.claim([7], A), FailedPreconditionError);
      assert.match(e.message, /IOMMU group 7/);
      assert.ok(e.message.includes('0000:01:00.1'), e.message);
      assert.ok(e.message.includes('snd_hda_intel'), e.message);
      assert.ok(e.message.includes('bind 0000:01:00.1 to vfio-pci'), e.message);
      // The vfio-pci function is not blamed.
      assert.ok(!e.message.includes('0000:01:00.0'), e.message);
      assert.equal(k.attempts(7), 0);
      assert.equal(pool.ownerOf(7), undefined);
    });
  });

  test('every offending device of a group is named with its driver and fix', async () => {
    await withPool(async ({ pool }) => {
      const e = await rejectsWith(pool.claim([8], A), FailedPreconditionError);
      for (const [addr, drv] of [
        ['0000:08:00.0', 'igb'],
        ['0000:08:00.1', 'e1000e'],
      ]) {
        assert.ok(e.message.includes(`${addr} is bound to ${drv}`), e.message);
        assert.ok(e.message.includes(`bind ${addr} to vfio-pci`), e.message);
      }
    });
  });

  test('a group held by another VM is FailedPreconditionError naming that VM; the holder keeps it', async () => {
    await withPool(async ({ k, pool }) => {
      await pool.claim([12], A);
      const e = await rejectsWith(pool.claim([12], B), FailedPreconditionError);
      assert.ok(e.message.includes('web-1'), e.message);
      assert.ok(e.message.includes(A.vmId), e.message);
      assert.deepEqual(pool.ownerOf(12), A);
      assert.equal(k.opens(12), 1);
      assert.equal(k.closes(12), 0);
    });
  });

  test('a group claimed twice by the same VM is AlreadyExistsError', async () => {
    await withPool(async ({ pool }) => {
      await pool.claim([12], A);
      await rejectsWith(pool.claim([12], A), AlreadyExistsError);
      assert.deepEqual(pool.ownerOf(12), A);
    });
  });

  test('EBUSY on open names this process as the holder when /proc shows it', async () => {
    let fd = -1;
    const k = new KernelDouble();
    await withPool(
      async ({ host, pool }) => {
        const node = path.join(host.dev, 'vfio', '12');
        k.set(12, { openErrno: Errno.EBUSY });
        fd = fs.openSync(node, 'r');
        try {
          const e = await rejectsWith(pool.claim([12], A), FailedPreconditionError);
          const comm = fs.readFileSync('/proc/self/comm', 'utf8').trim();
          assert.ok(e.message.includes(node), e.message);
          assert.ok(e.message.includes(`pid ${process.pid} (uid ${process.getuid!()}, ${comm})`), e.message);
          assert.match(e.message, /EBUSY/);
          assert.equal(pool.ownerOf(12), undefined);
          assert.equal(pool.openCount, 0);
        } finally {
          fs.closeSync(fd);
        }
      },
      { openGroup: k.openGroup, procRoot: '/proc' },
    );
  });

  test('EBUSY on open with no holder found says another process holds the group', async () => {
    const emptyProc = fs.mkdtempSync('/tmp/kvmvfiod-proc-');
    try {
      await withPool(
        async ({ k, pool }) => {
          k.set(12, { openErrno: Errno.EBUSY });
          const e = await rejectsWith(pool.claim([12], A), FailedPreconditionError);
          assert.match(e.message, /a process kvmvfiod cannot name/);
          assert.match(e.message, /IOMMU group 12/);
          assert.equal(pool.ownerOf(12), undefined);
        },
        { procRoot: emptyProc },
      );
    } finally {
      fs.rmSync(emptyProc, { recursive: true, force: true });
    }
  });

  test('EMFILE and ENFILE on open are ResourceExhaustedError; nothing is claimed', async () => {
    await withPool(async ({ k, pool }) => {
      k.set(1, { openErrno: Errno.EMFILE });
      k.set(2, { openErrno: Errno.ENFILE });
      const e1 = await rejectsWith(pool.claim([1], A), ResourceExhaustedError);
      assert.match(e1.message, /EMFILE/);
      const e2 = await rejectsWith(pool.claim([2], A), ResourceExhaustedError);
      assert.match(e2.message, /ENFILE/);
      assert.equal(pool.claimedCount, 0);
      assert.equal(pool.openCount, 0);
    });
  });

  test('another errno on open (EACCES) passes through as the SysError', async () => {
    await withPool(async ({ k, pool }) => {
      k.set(1, { openErrno: Errno.EACCES });
      const e = await rejectsWith(pool.claim([1], A), SysError);
      assert.equal(e.code, 'EACCES');
      assert.equal(pool.ownerOf(1), undefined);
    });
  });

  test('a group whose VFIO status says not viable is FailedPreconditionError; its fd is closed and it stays free', async () => {
    await withPool(async ({ k, pool }) => {
      k.set(12, { viable: false });
      const e = await rejectsWith(pool.claim([12], A), FailedPreconditionError);
      assert.match(e.message, /IOMMU group 12 is not viable/);
      assert.match(e.message, /vfio-pci/);
      assert.equal(k.opens(12), 1);
      assert.equal(k.closes(12), 1);
      assert.equal(pool.ownerOf(12), undefined);
      assert.equal(pool.openCount, 0);
      // Fixed in the kernel: the next claim opens it again and succeeds.
      k.set(12, {});
      await pool.claim([12], B);
      assert.deepEqual(pool.ownerOf(12), B);
    });
  });
});

describe('GroupPool: the kernel has the last word on viability', () => {
  test('a group the daemon holds open is claimed on VFIO_GROUP_GET_STATUS alone; sysfs is read to say why it is not viable', async () => {
    await withPool(async ({ host, k, pool }) => {
      await pool.claim([12], A);
      pool.release([12], A.vmId);
      assert.equal(pool.openCount, 1, 'the daemon keeps the group open');
      // sysfs now predicts "not viable"; the kernel, asked on the daemon's own fd, says viable: its word stands.
      await host.bindDriver('0000:0c:00.0', 'nvidia');
      const asked = k.statusCalls(12);
      await pool.claim([12], B);
      assert.deepEqual(pool.ownerOf(12), B);
      assert.ok(k.statusCalls(12) > asked, 'the claim asked the kernel');
      pool.release([12], B.vmId);
      // The kernel says not viable: refused, and the message names the device and its driver from sysfs.
      k.set(12, { viable: false });
      const e = await rejectsWith(pool.claim([12], A), FailedPreconditionError);
      assert.match(e.message, /IOMMU group 12 is not viable: 0000:0c:00\.0 is bound to nvidia/);
      assert.equal(pool.ownerOf(12), undefined);
    });
  });
});

describe('GroupPool: claims are all-or-nothing', () => {
  test('a claim whose last group fails to open claims none and closes what it opened', async () => {
    await withPool(async ({ k, pool }) => {
      k.set(3, { openErrno: Errno.EBUSY });
      await rejectsWith(pool.claim([1, 2, 3], A), FailedPreconditionError);
      for (const n of [1, 2, 3]) assert.equal(pool.ownerOf(n), undefined, `group ${n}`);
      assert.equal(pool.claimedCount, 0);
      assert.equal(k.opens(1), 1);
      assert.equal(k.closes(1), 1);
      assert.equal(k.opens(2), 1);
      assert.equal(k.closes(2), 1);
      assert.equal(k.opens(3), 0);
      assert.equal(pool.openCount, 0);
      assert.equal(k.live(1) + k.live(2), 0);
      // The groups are free for another VM.
      await pool.claim([1, 2], B);
      assert.deepEqual(pool.ownerOf(1), B);
      assert.deepEqual(pool.ownerOf(2), B);
    });
  });

  test('a claim whose last group is not viable (sysfs) or unknown claims none', async () => {
    await withPool(async ({ k, pool }) => {
      await rejectsWith(pool.claim([1, 2, 7], A), FailedPreconditionError);
      await rejectsWith(pool.claim([1, 2, 99], A), NotFoundError);
      assert.equal(pool.claimedCount, 0);
      assert.equal(pool.openCount, 0);
      assert.equal(k.opens(1), 2);
      assert.equal(k.closes(1), 2);
      assert.equal(k.opens(2), k.closes(2));
    });
  });

  test('a claim whose last group is held by another VM claims none and opens nothing', async () => {
    await withPool(async ({ k, pool }) => {
      await pool.claim([3], B);
      const e = await rejectsWith(pool.claim([1, 2, 3], A), FailedPreconditionError);
      assert.ok(e.message.includes('db-1'), e.message);
      assert.equal(pool.ownerOf(1), undefined);
      assert.equal(pool.ownerOf(2), undefined);
      assert.deepEqual(pool.ownerOf(3), B);
      assert.equal(k.attempts(1) + k.attempts(2), 0);
    });
  });

  test('a failed claim does not close a group fd opened by an earlier call', async () => {
    await withPool(async ({ k, pool }) => {
      await pool.claim([1], B);
      pool.release([1], B.vmId);
      k.set(12, { viable: false });
      await rejectsWith(pool.claim([1, 2, 12], A), FailedPreconditionError);
      // 1 was the daemon's already: kept open, not reopened, not closed.
      assert.equal(k.opens(1), 1);
      assert.equal(k.closes(1), 0);
      assert.ok(pool.handle(1));
      // 2 and 12 were opened by the failed call: closed.
      assert.equal(k.closes(2), 1);
      assert.equal(k.closes(12), 1);
      assert.equal(pool.handle(2), undefined);
      assert.equal(pool.handle(12), undefined);
      assert.equal(pool.claimedCount, 0);
    });
  });

  test('a failed claim leaves the other VMs\' claims alone', async () => {
    await withPool(async ({ k, pool }) => {
      await pool.claim([5], B);
      k.set(2, { openErrno: Errno.EMFILE });
      await rejectsWith(pool.claim([1, 2], A), ResourceExhaustedError);
      assert.deepEqual(pool.ownerOf(5), B);
      assert.equal(pool.claimedCount, 1);
      assert.equal(k.closes(5), 0);
    });
  });
});

describe('GroupPool: ownership and fds', () => {
  test('a successful claim owns every group, opens each once, and shows in get/list', async () => {
    await withPool(async ({ host, k, pool }) => {
      await pool.claim([1, 12], A);
      assert.deepEqual(pool.ownerOf(1), A);
      assert.deepEqual(pool.ownerOf(12), A);
      assert.equal(pool.claimedCount, 2);
      assert.equal(pool.openCount, 2);
      assert.deepEqual(k.paths.sort(), [path.join(host.dev, 'vfio', '1'), path.join(host.dev, 'vfio', '12')].sort());
      const g = await pool.get(12);
      assert.deepEqual(g.owner, A);
      assert.equal(g.openInDaemon, true);
      const views = await pool.list();
      assert.deepEqual(
        views.map((v) => [v.number, v.owner?.vmName ?? null, v.openInDaemon]),
        [
          [1, 'web-1', true],
          [2, null, false],
          [3, null, false],
          [5, null, false],
          [7, null, false],
          [8, null, false],
          [12, 'web-1', true],
        ],
      );
    });
  });

  test('each group is opened once for the daemon\'s life: claim, release, claim again', async () => {
    await withPool(async ({ k, pool }) => {
      await pool.claim([12], A);
      const h = pool.handle(12);
      pool.release([12], A.vmId);
      assert.equal(pool.ownerOf(12), undefined);
      assert.equal(k.closes(12), 0, 'release keeps the fd');
      assert.equal((await pool.get(12)).openInDaemon, true);
      await pool.claim([12], B);
      pool.release([12], B.vmId);
      await pool.claim([12], A);
      assert.equal(k.attempts(12), 1);
      assert.equal(k.opens(12), 1);
      assert.equal(k.closes(12), 0);
      assert.equal(pool.handle(12), h);
      assert.deepEqual(pool.ownerOf(12), A);
    });
  });

  test('release only releases the given VM\'s groups', async () => {
    await withPool(async ({ pool }) => {
      await pool.claim([1, 2], A);
      await pool.claim([3], B);
      pool.release([1, 3], A.vmId);
      assert.equal(pool.ownerOf(1), undefined);
      assert.deepEqual(pool.ownerOf(2), A);
      assert.deepEqual(pool.ownerOf(3), B);
      pool.release([2, 3, 99], 'not-a-vm');
      assert.deepEqual(pool.ownerOf(2), A);
      assert.deepEqual(pool.ownerOf(3), B);
      assert.equal(pool.claimedCount, 2);
    });
  });

  test('two concurrent claims of the same group: exactly one wins, the group is opened once', async () => {
    await withPool(async ({ k, pool }) => {
      const g = gate();
      k.set(12, { openGate: g.promise });
      const both = Promise.allSettled([pool.claim([12], A), pool.claim([12], B)]);
      g.open();
      const [ra, rb] = await both;
      const won = [ra, rb].filter((r) => r.status === 'fulfilled');
      const lost = [ra, rb].filter((r): r is PromiseRejectedResult => r.status === 'rejected');
      assert.equal(won.length, 1);
      assert.equal(lost.length, 1);
      assert.ok(lost[0].reason instanceof FailedPreconditionError, String(lost[0].reason));
      const winner = ra.status === 'fulfilled' ? A : B;
      assert.deepEqual(pool.ownerOf(12), winner);
      assert.equal(k.opens(12), 1);
      assert.equal(k.closes(12), 0);
    });
  });

  test('concurrent overlapping multi-group claims: one wins all, the other gets none', async () => {
    await withPool(async ({ k, pool }) => {
      const [ra, rb] = await Promise.allSettled([pool.claim([1, 2, 3], A), pool.claim([3, 5], B)]);
      assert.equal([ra, rb].filter((r) => r.status === 'fulfilled').length, 1);
      const owners = [1, 2, 3, 5].map((n) => pool.ownerOf(n)?.vmName ?? null);
      if (ra.status === 'fulfilled') assert.deepEqual(owners, ['web-1', 'web-1', 'web-1', null]);
      else assert.deepEqual(owners, [null, null, 'db-1', 'db-1']);
      for (const n of [1, 2, 3, 5]) assert.ok(k.opens(n) <= 1, `group ${n} opened ${k.opens(n)} times`);
      assert.equal(pool.openCount, pool.claimedCount);
    });
  });

  test('closeAll closes every fd once and forgets every claim', async () => {
    await withPool(async ({ k, pool }) => {
      await pool.claim([1, 2], A);
      await pool.claim([12], B);
      pool.release([12], B.vmId); // released but still open in the daemon
      await pool.closeAll();
      for (const n of [1, 2, 12]) {
        assert.equal(k.opens(n), 1, `group ${n}`);
        assert.equal(k.closes(n), 1, `group ${n}`);
      }
      assert.ok(k.handles.every((h) => h.closeCalls === 1));
      assert.equal(pool.openCount, 0);
      assert.equal(pool.claimedCount, 0);
      assert.equal(pool.handle(1), undefined);
      await pool.closeAll();
      assert.equal(k.totalCloses, 3, 'a second closeAll closes nothing again');
    });
  });
});

describe('GroupPool: the real VfioGroup on the fake tree', () => {
  test('VfioGroup.open on an ordinary file works; the status check falls back to sysfs (ENOTTY)', async () => {
    const host = await makeFakeHost(GROUPS);
    const told: [number, string, string][] = [];
    const opened: VfioGroup[] = [];
    const pool = new GroupPool({
      sysfsRoot: host.sysfs,
      devRoot: host.dev,
      openGroup: async (p, n) => {
        const g = await VfioGroup.open(p, n);
        opened.push(g);
        return g;
      },
      onStatusUnavailable: (n, err) => told.push([n, err.code, err.call]),
    });
    try {
      await pool.claim([12], A);
      assert.deepEqual(pool.ownerOf(12), A);
      assert.deepEqual(told, [[12, 'ENOTTY', 'VFIO_GROUP_GET_STATUS']]);
      assert.equal(opened.length, 1);
      const fd = opened[0].fd;
      assert.equal(fs.readlinkSync(`/proc/self/fd/${fd}`), path.join(host.dev, 'vfio', '12'));
      // What a VMM is sent is the pool's own fd, handed over: once the sender closes it, the daemon holds no copy.
      const sent = pool.handOver(12, A.vmId);
      assert.equal(sent.fd, fd);
      assert.equal(pool.handle(12), undefined);
      assert.equal((await pool.get(12)).holding, 'vmm');
      assert.equal((await pool.get(12)).openInDaemon, false);
      sent.closeSync();
      assert.throws(() => opened[0].fd, /after close/, 'the handle has no fd once handed over');
      assert.ok(!(fs.existsSync(`/proc/self/fd/${fd}`) && fs.readlinkSync(`/proc/self/fd/${fd}`) === path.join(host.dev, 'vfio', '12')), 'the daemon no longer has the file open');
      // An ordinary file always opens again: the witness takes it back, and the daemon keeps the fresh open.
      assert.equal(await pool.letGo(12, A.vmId, false), 'free');
      assert.equal(opened.length, 2);
      assert.equal((await pool.get(12)).openInDaemon, true);
      // Claimed again: the same node cannot be asked again, and the caller was told already (once per group, not a line per claim).
      await pool.claim([12], A);
      pool.release([12], A.vmId);
      assert.deepEqual(told, [[12, 'ENOTTY', 'VFIO_GROUP_GET_STATUS']]);
      await pool.closeAll();
      assert.throws(() => opened[1].fd, /after close/);
    } finally {
      await pool.closeAll();
      await host.cleanup();
    }
  });

  test('VfioGroup.open of a missing node is FailedPreconditionError naming the path', async () => {
    const host = await makeFakeHost(GROUPS);
    const pool = new GroupPool({ sysfsRoot: host.sysfs, devRoot: host.dev, openGroup: (p, n) => VfioGroup.open(p, n) });
    try {
      fs.unlinkSync(path.join(host.dev, 'vfio', '12'));
      const e = await rejectsWith(pool.claim([12], A), FailedPreconditionError);
      assert.ok(e.message.includes(path.join(host.dev, 'vfio', '12')), e.message);
      assert.match(e.message, /ENOENT/);
      assert.equal(pool.ownerOf(12), undefined);
    } finally {
      await pool.closeAll();
      await host.cleanup();
    }
  });
});

describe('GroupPool: a group let go while someone claims it', () => {
  test('a claim that wins a group back during the holder scan leaves it claimed, not reported stray', async () => {
    const host = await makeFakeHost(GROUPS);
    const k = new KernelDouble();
    const scan = gate();
    const events: string[] = [];
    const pool = new GroupPool({
      sysfsRoot: host.sysfs,
      devRoot: host.dev,
      openGroup: k.openGroup,
      findHolders: async () => {
        await scan.promise; // the /proc walk takes its time
        return [{ pid: 4242, uid: 65534, comm: 'child' }];
      },
      onStray: (g, h) => events.push(`stray ${g} ${h.owner.vmName}`),
      onStrayReturned: (g, o) => events.push(`returned ${g} ${o.vmName}`),
    });
    try {
      await pool.claim([12], A);
      const sent = pool.handOver(12, A.vmId);
      const child = k.forkHold(12); // A's VMM forked before it exited: the child keeps the file
      sent.closeSync();
      const letGo = pool.letGo(12, A.vmId, false);
      while (pool.holdOf(12)?.holding !== 'stray') await new Promise((r) => setImmediate(r));
      child(); // the child exits while the daemon is still looking for holders
      await pool.claim([12], B);
      scan.open();
      assert.equal(await letGo, 'claimed');
      assert.deepEqual(pool.holdOf(12), { holding: 'claimed', owner: B });
      assert.deepEqual(events, ['returned 12 web-1'], 'not reported stray after it came back');
    } finally {
      scan.open();
      await pool.closeAll();
      await host.cleanup();
    }
  });
});
