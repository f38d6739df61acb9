/**
 * One holder per group, proven by the kernel, on real VFIO groups inside the
 * lane's nested guest (test/vfio/lane.sh); anywhere else it skips.
 *
 * The attack: a VMM (uid 65534) attaches, gets group A in its VM and uses it
 * (container, DMA map), then forks a child that keeps every fd — the VM, the
 * group — and is killed. (A child that presents the token itself is refused
 * at ATTACH: test/api/identity.test.ts.) The daemon's pidfd ends the VM, but
 * the child still holds /dev/vfio/A, so the daemon's fresh open fails EBUSY:
 * the group is stray, named (the child's pid and uid) in the group and the
 * VM, and another tenant's claim is refused. Once the child exits (a pidfd of
 * it tells the daemon), the group is back and a new VM's VMM sets a container
 * on it and maps DMA.
 */
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { status } from '@grpc/grpc-js';
import type { IommuGroup, KvmVfioApi } from '../../src/client/client';
import { startDaemon, type RunningDaemon } from '../helpers/daemon';
import { buildCVmm } from '../helpers/cvmm';
import { runVmm, type VmmProc } from '../helpers/vmmproc';
import { expectStatus, until as untilShort } from '../helpers/assert';

/** TCG is slow: a minute for anything in the guest. */
const until = <T>(what: string, fn: () => Promise<T | undefined | false>) => untilShort(what, fn, 60_000);
const inGuest = process.env.KVMVFIO_GUEST === '1';

describe('one holder per VFIO group, whatever the VMM forks', { skip: inGuest ? false : 'runs only in the nested VFIO guest (npm run test:vfio)' }, () => {
  let d: RunningDaemon;
  let c: KvmVfioApi;
  let handoff: string;
  let cvmm: string;
  let A: IommuGroup;
  const vmms: VmmProc[] = [];
  const strays: number[] = [];

  before(async () => {
    process.env.KVMVFIO_USE_VFIO = '1';
    cvmm = process.env.KVMVFIO_CVMM || (await buildCVmm());
    d = await startDaemon({ args: ['--vmm-timeout-ms', '20000', '--vmm-exit-grace-ms', '20000'] });
    c = d.client();
    handoff = join(d.runtimeDir, 'handoff.sock');
    const { groups } = await c.listIommuGroups();
    const viable = groups.filter((g) => g.viable && g.devices.length === 1 && g.devices[0].driver === 'vfio-pci');
    assert.ok(viable.length >= 1, JSON.stringify(groups));
    A = viable[0];
  });

  after(async () => {
    for (const v of vmms) v.kill();
    for (const pid of strays) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        /* gone */
      }
    }
    await d?.cleanup();
  });

  test('a child the VMM forked keeps the group after its VM ended: stray, named, claims refused; back once the child exits', async (t) => {
    const { vm, attach_token } = await c.createVm({ name: 'forker', vmm_uid: 65534, vfio_device: true, vfio_handoff: 'VFIO_HANDOFF_GROUP', groups: [A.number] });
    const v = runVmm([cvmm, handoff], attach_token!.token, true, { env: { KVMVFIO_FORK: 'after-add' } });
    vmms.push(v);
    const use = await until('the VMM uses group A', async () => v.events.find((e) => e.event === 'vfio-use' && e.group === A.number));
    assert.equal(use.ok, true, JSON.stringify(use));
    assert.equal(use.dma, true);
    const child = Number((await v.waitFor('holding', 60_000)).pid);
    strays.push(child);
    const running = await until('RUNNING', async () => {
      const g = await c.getVm(vm!.id);
      return g.state === 'VM_STATE_RUNNING' && g;
    });
    assert.equal(running.vmm_pid, v.pid);
    const inVmm = await c.getIommuGroup(A.number);
    assert.deepEqual([inVmm.holding, inVmm.open_in_daemon, inVmm.vm_id], ['GROUP_HOLDING_VMM', false, vm!.id], 'the daemon keeps no copy of a group its VMM holds');

    // The VMM is killed; its child lives on with the group.
    v.kill('SIGKILL');
    await until('EXITED', async () => (await c.getVm(vm!.id)).state === 'VM_STATE_EXITED');
    const stray = await until('group A stray', async () => {
      const g = await c.getIommuGroup(A.number);
      return g.holding === 'GROUP_HOLDING_STRAY' && g;
    });
    assert.equal(stray.vm_id, vm!.id);
    assert.ok(
      stray.holders.some((h) => h.pid === child && h.uid === '65534'),
      `the child (pid ${child}, uid 65534) is named: ${JSON.stringify(stray.holders)}`,
    );
    const record = await c.getVm(vm!.id);
    assert.deepEqual(record.stray_groups.map((s) => s.group), [A.number]);
    assert.ok(record.stray_groups[0].holders.some((h) => h.pid === child));

    // Another tenant's claim: refused, naming the holder; it leaves nothing behind.
    await expectStatus(
      c.createVm({ name: 'second-tenant', vmm_uid: 65534, vfio_device: true, vfio_handoff: 'VFIO_HANDOFF_GROUP', groups: [A.number] }),
      status.FAILED_PRECONDITION,
      new RegExp(`IOMMU group ${A.number} is held by .*pid ${child} \\(uid 65534`),
    );
    assert.ok(!(await c.listVms()).vms.some((x) => x.name === 'second-tenant'));

    // The child exits: the daemon's pidfd of it fires, its open succeeds, the group is back.
    const t0 = Date.now();
    process.kill(child, 'SIGKILL');
    await until('group A free', async () => (await c.getIommuGroup(A.number)).holding === 'GROUP_HOLDING_FREE');
    const ms = Date.now() - t0;
    t.diagnostic(`group ${A.number} back in the pool ${ms} ms after its holder's SIGKILL`);
    assert.deepEqual((await c.getVm(vm!.id)).stray_groups, [], 'the record says the group is back');

    // A new VM's VMM sets a container on it and maps DMA: the group is clean.
    const next = await c.createVm({ name: 'next', vmm_uid: 65534, vfio_device: true, vfio_handoff: 'VFIO_HANDOFF_GROUP', groups: [A.number] });
    const w = runVmm([cvmm, handoff], next.attach_token!.token);
    vmms.push(w);
    const again = await until('vfio-use of A again', async () => w.events.find((e) => e.event === 'vfio-use' && e.group === A.number));
    assert.equal(again.ok, true, JSON.stringify(again));
    assert.equal(again.dma, true);
    await c.deleteVm({ vm_id: next.vm!.id });
    await c.deleteVm({ vm_id: vm!.id });
    await until('group A free after DeleteVm', async () => (await c.getIommuGroup(A.number)).holding === 'GROUP_HOLDING_FREE');
  });
});
