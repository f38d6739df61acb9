/**
 * AddGroup and RemoveGroup on an unmodified QEMU 10 (Debian's) run by
 * `kvmvfioctl attach` as uid 65534, in the lane's guest with real VFIO
 * devices: the daemon drives QEMU's monitor ({qmp}, one end of a socketpair)
 * and hands it each fd with SCM_RIGHTS. Each test also opens a monitor of its
 * own on QEMU (-qmp unix:…) to see what QEMU sees.
 *
 * - guest-less QEMU on nested KVM with native PCIe hot-plug (QEMU unplugs at
 *   once when no guest ever powered the slot): AddGroup → query-pci shows
 *   1234:11e8; RemoveGroup → OK after DEVICE_DELETED, QEMU still running;
 *   the group goes to another VM whose VMM binds the device and maps DMA;
 *   then back into the first QEMU.
 * - negative cases: a device bound elsewhere, no free port: each its status,
 *   no fd of it left in QEMU or in the daemon.
 * - guest-less QEMU with ACPI hot-plug (q35's default), which needs the
 *   guest's acknowledgement: RemoveGroup is DEADLINE_EXCEEDED, the group stays
 *   held (the kernel's witness: its group file does not open), and is free
 *   once QEMU exits.
 *
 * The guest's side is hotplug-l2.test.ts. Skips outside the guest, without
 * /dev/iommu or QEMU 10.
 */
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { chmodSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { status } from '@grpc/grpc-js';
import type { KvmVfioApi } from '../../src/client/client';
import { Iommufd, VfioDeviceCdev } from '../../src/kernel';
import { startDaemon, type RunningDaemon } from '../helpers/daemon';
import { REFERENCE_VMM, runVmm, type VmmProc } from '../helpers/vmmproc';
import { qmp } from '../helpers/qmp';
import { expectStatus } from '../helpers/assert';
import { loadGuestGroups, singleDeviceGroups, type GuestGroup } from './guest-groups';
import { NATIVE, cdevOf, client, qemuId, skip, startQemu, until, vfioFdsOf } from './qemu-hotplug';

describe('AddGroup/RemoveGroup on QEMU 10 by QMP hot-plug, no guest OS', { skip }, () => {
  let d: RunningDaemon;
  let c: KvmVfioApi;
  let work: string;
  let edu: GuestGroup;
  let other: GuestGroup;
  const procs: VmmProc[] = [];
  const holding = async (g: GuestGroup) => (await c.getIommuGroup(g.number)).holding;

  before(async () => {
    d = await startDaemon({ args: ['--vmm-timeout-ms', '30000', '--vmm-exit-grace-ms', '30000', '--hot-unplug-timeout-ms', '4000'], readyTimeoutMs: 60_000 });
    c = client(d);
    work = mkdtempSync(join(tmpdir(), 'kvmvfiod-hotplug-'));
    chmodSync(work, 0o777);
    const singles = singleDeviceGroups(loadGuestGroups()).filter((g) => g.devices[0].cdev);
    edu = singles.find((g) => g.devices[0].vendorId === '1234' && g.devices[0].deviceId === '11e8')!;
    other = singles.find((g) => g !== edu)!;
    assert.ok(edu && other, `the edu and another single-device group with cdevs: ${JSON.stringify(singles.map((g) => g.number))}`);
  });

  after(async () => {
    for (const p of procs) p.kill();
    await Promise.all(procs.map((p) => p.exit));
    await d?.cleanup();
    rmSync(work, { recursive: true, force: true });
  });

  test('native hot-plug: AddGroup → QEMU lists 1234:11e8; RemoveGroup → OK after DEVICE_DELETED, QEMU runs on; the device binds in another VM, then goes back into the same QEMU', async (t) => {
    const a = await startQemu(c, d, work, procs, 'hp-native', { ports: 2, extra: NATIVE });
    assert.deepEqual(vfioFdsOf(a.proc.pid), ['/dev/iommu'], 'QEMU starts with its iommufd and no device');
    let t0 = Date.now();
    assert.deepEqual((await c.addGroup({ vm_id: a.id, group: edu.number })).groups, [edu.number]);
    t.diagnostic(`AddGroup answered in ${Date.now() - t0} ms`);
    assert.ok((await a.pci()).includes(`${qemuId(edu)}=1234:11e8`), JSON.stringify(await a.pci()));
    assert.deepEqual(vfioFdsOf(a.proc.pid), ['/dev/iommu', cdevOf(edu)]);
    assert.deepEqual(vfioFdsOf(d.pid), [], 'the daemon keeps no copy of the cdev');
    assert.equal(await holding(edu), 'GROUP_HOLDING_VMM');

    t0 = Date.now();
    assert.deepEqual((await c.removeGroup({ vm_id: a.id, group: edu.number })).groups, []);
    t.diagnostic(`RemoveGroup (device_del → DEVICE_DELETED → witness) answered in ${Date.now() - t0} ms`);
    // OK means the daemon's own open of the group succeeded: no bound copy of the cdev is left anywhere.
    assert.equal(await holding(edu), 'GROUP_HOLDING_FREE');
    assert.ok(!(await a.pci()).some((x) => x.endsWith('=1234:11e8')));
    assert.deepEqual(vfioFdsOf(a.proc.pid), ['/dev/iommu']);
    assert.deepEqual(await qmp(a.monitor, 'query-status'), { running: true, status: 'running' });

    // The next VM's VMM binds the device, attaches it to its IOAS and maps DMA.
    const b = await c.createVm({ name: 'after-hotplug', vmm_uid: 65534, vfio_device: true, groups: [edu.number], vfio_handoff: 'VFIO_HANDOFF_CDEV', memlock_bytes: String(64 << 20) });
    const v = runVmm([process.execPath, REFERENCE_VMM, '--socket', join(d.runtimeDir, 'handoff.sock')], b.attach_token!.token, true, { env: { KVMVFIO_USE_VFIO: '1' } });
    procs.push(v);
    const use = await until('vfio-use in the next VM', async () => v.events.find((e) => e.event === 'vfio-use' && e.device === edu.devices[0].address));
    assert.equal(use.ok, true, JSON.stringify(use));
    assert.equal(use.dma, true);
    await c.deleteVm({ vm_id: b.vm!.id });
    await until('free after the second VM', async () => (await holding(edu)) === 'GROUP_HOLDING_FREE');

    // And back into the first QEMU, which kept running.
    t0 = Date.now();
    await c.addGroup({ vm_id: a.id, group: edu.number });
    t.diagnostic(`AddGroup into the same QEMU again in ${Date.now() - t0} ms`);
    assert.ok((await a.pci()).includes(`${qemuId(edu)}=1234:11e8`));
    await c.deleteVm({ vm_id: a.id });
    await a.proc.exit;
    await until('free after QEMU exited', async () => (await holding(edu)) === 'GROUP_HOLDING_FREE');
  });

  test('negative cases: a device bound elsewhere is FAILED_PRECONDITION, a QEMU without a free port RESOURCE_EXHAUSTED; no fd of them in QEMU or the daemon', async () => {
    // Runs after the native test, which leaves `other` alone (see below).
    const q = await startQemu(c, d, work, procs, 'hp-negative', { ports: 1, extra: NATIVE });
    // Another process (this one, root) binds the device to its own iommufd. It can only while no one
    // holds the group file: this daemon has not claimed that group yet (a free group it claimed once,
    // it keeps open, and then this bind would be EBUSY).
    assert.equal((await c.getIommuGroup(other.number)).open_in_daemon, false, 'the earlier tests left this group alone');
    const ictx = await Iommufd.open('/dev');
    const cdev = await VfioDeviceCdev.open(cdevOf(other));
    cdev.bindIommufd(ictx.fd);
    try {
      await expectStatus(c.addGroup({ vm_id: q.id, group: other.number }), status.FAILED_PRECONDITION, new RegExp(`IOMMU group ${other.number} is busy.*pid ${process.pid}`));
      assert.deepEqual(vfioFdsOf(q.proc.pid), ['/dev/iommu'], 'nothing reached QEMU');
      assert.deepEqual(vfioFdsOf(d.pid), []);
      assert.deepEqual((await c.getVm(q.id)).groups, []);
      assert.equal((await c.getIommuGroup(other.number)).holding, 'GROUP_HOLDING_FREE');
    } finally {
      await cdev.close();
      await ictx.close();
    }

    // Its one port taken, QEMU has none for a second device.
    await c.addGroup({ vm_id: q.id, group: edu.number });
    await expectStatus(c.addGroup({ vm_id: q.id, group: other.number }), status.RESOURCE_EXHAUSTED, /every hot-plug port is taken \(kvmvfiod-port-1\)/);
    assert.deepEqual(vfioFdsOf(q.proc.pid), ['/dev/iommu', cdevOf(edu)], `QEMU holds no cdev of ${other.devices[0].address}`);
    assert.deepEqual(vfioFdsOf(d.pid), []);
    assert.equal(await holding(other), 'GROUP_HOLDING_FREE');
    assert.deepEqual((await c.getVm(q.id)).groups, [edu.number]);
    await c.removeGroup({ vm_id: q.id, group: edu.number });
    await c.deleteVm({ vm_id: q.id });
    await q.proc.exit;
  });

  test('ACPI hot-plug and no guest to acknowledge: RemoveGroup is DEADLINE_EXCEEDED, the group stays held (the kernel says so); a reset completing the unplug, or QEMU\'s exit, frees it', async (t) => {
    const q = await startQemu(c, d, work, procs, 'hp-acpi-deaf', { ports: 1, extra: [] });
    await c.addGroup({ vm_id: q.id, group: edu.number });
    const t0 = Date.now();
    await expectStatus(c.removeGroup({ vm_id: q.id, group: edu.number }), status.DEADLINE_EXCEEDED, /did not let go of device .* within 4000 ms/);
    t.diagnostic(`DEADLINE_EXCEEDED after ${Date.now() - t0} ms`);
    assert.deepEqual((await c.getVm(q.id)).groups, [edu.number], 'the record is unchanged');
    assert.equal(await holding(edu), 'GROUP_HOLDING_VMM');
    assert.deepEqual(vfioFdsOf(q.proc.pid), ['/dev/iommu', cdevOf(edu)], 'QEMU still has the device');
    // Not the daemon's bookkeeping only: the group file does not open while QEMU's cdev is bound.
    await expectStatus(c.createVm({ name: 'wants-edu', vmm_uid: 65534, vfio_device: true, groups: [edu.number], vfio_handoff: 'VFIO_HANDOFF_CDEV' }), status.FAILED_PRECONDITION, /held by vm hp-acpi-deaf/);
    // A reset completes the pending unplug: QEMU's DEVICE_DELETED, which no RemoveGroup awaits now, is the daemon's cue.
    const t2 = Date.now();
    assert.deepEqual(await qmp(q.monitor, 'system_reset'), {});
    await until('free after the reset', async () => (await holding(edu)) === 'GROUP_HOLDING_FREE');
    t.diagnostic(`group free ${Date.now() - t2} ms after system_reset, QEMU running`);
    assert.deepEqual((await c.getVm(q.id)).groups, [], 'the group left the record');
    assert.deepEqual(vfioFdsOf(q.proc.pid), ['/dev/iommu']);
    // Again, and this time QEMU exits with the device in it.
    await c.addGroup({ vm_id: q.id, group: edu.number });
    await expectStatus(c.removeGroup({ vm_id: q.id, group: edu.number }), status.DEADLINE_EXCEEDED);
    assert.equal(await holding(edu), 'GROUP_HOLDING_VMM');
    assert.deepEqual(await qmp(q.monitor, 'quit'), {});
    await q.proc.exit;
    const t1 = Date.now();
    await until('free once QEMU exited', async () => (await holding(edu)) === 'GROUP_HOLDING_FREE');
    t.diagnostic(`group free ${Date.now() - t1} ms after QEMU exited`);
    assert.equal((await c.getVm(q.id)).state, 'VM_STATE_EXITED');
    await c.deleteVm({ vm_id: q.id });
  });
});
