/**
 * The VFIO device cdev and iommufd wrappers (src/kernel/iommufd.ts) against
 * real devices, in the lane's guest with vfio and iommufd rebuilt for device
 * cdevs (test/vfio/lane.sh). Skips outside the guest, and in a guest with
 * Debian's own modules (no /dev/iommu).
 *
 * It pins the rules the broker's cdev handoff builds on: a held group file
 * makes the bind EBUSY; a bound cdev makes the group EBUSY and another bind
 * EINVAL (a fresh open included); after every copy of the bound file is
 * closed, the group opens again. And the calls a VMM makes: bind, IOAS, DMA
 * map, config space read, KVM_DEV_VFIO_FILE_ADD/DEL with the cdev fd.
 */
import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { GuestMemory, Iommufd, Kvm, SysError, VfioDeviceCdev, VfioGroup } from '../../src/kernel';
import { IN_VFIO_GUEST, loadGuestGroups, singleDeviceGroups } from './guest-groups';

const skip = !IN_VFIO_GUEST ? 'not in the VFIO guest (run npm run test:vfio)' : !existsSync('/dev/iommu') ? 'no /dev/iommu: the guest runs Debian\'s vfio modules (KVMVFIO_LANE_CDEV=0)' : false;

function errnoOf(fn: () => unknown): string {
  try {
    fn();
  } catch (e) {
    assert.ok(e instanceof SysError, String(e));
    return e.code;
  }
  return 'no error';
}

const cdevOf = (address: string): string => {
  const names = readdirSync(`/sys/bus/pci/devices/${address}/vfio-dev`).filter((n) => /^vfio\d+$/.test(n));
  assert.equal(names.length, 1, `${address}: ${names.join(',')}`);
  return `/dev/vfio/devices/${names[0]}`;
};

describe('VFIO device cdev + iommufd on a real device', { skip }, () => {
  test('the binding rules, then bind, IOAS, DMA map, config read and KVM ADD/DEL of the cdev', async (t) => {
    const [g] = singleDeviceGroups(loadGuestGroups());
    assert.ok(g, 'a viable single-device group');
    const address = g.devices[0].address;
    const path = cdevOf(address);
    const vendor = parseInt(readFileSync(`/sys/bus/pci/devices/${address}/vendor`, 'utf8'), 16);

    const ictx = await Iommufd.open('/dev');
    const cdev = await VfioDeviceCdev.open(path);
    // A broker that holds the group open blocks the cdev: the bind is EBUSY.
    const group = await VfioGroup.open(g.path, g.number);
    assert.equal(errnoOf(() => cdev.bindIommufd(ictx.fd)), 'EBUSY');
    await group.close();

    const devid = cdev.bindIommufd(ictx.fd);
    t.diagnostic(`${path} bound, device id ${devid}`);
    assert.equal(errnoOf(() => cdev.bindIommufd(ictx.fd)), 'EINVAL', 'a second bind of the same file');
    const other = await VfioDeviceCdev.open(path); // opens are not exclusive
    const second = await Iommufd.open('/dev');
    assert.equal(errnoOf(() => other.bindIommufd(second.fd)), 'EINVAL', 'a bind of a fresh open while the device is bound');
    await other.close();
    await second.close();
    await assert.rejects(VfioGroup.open(g.path, g.number), (e: unknown) => e instanceof SysError && e.code === 'EBUSY', 'the group while its device is bound');

    const ioas = ictx.allocIoas();
    cdev.attach(ioas);
    const info = cdev.info();
    assert.ok(info.numRegions >= 8, `a PCI device has its BAR, ROM and config regions: ${JSON.stringify(info)}`);
    assert.equal(cdev.pciVendorId(), vendor, 'config space through the cdev matches sysfs');
    const mem = GuestMemory.map(1 << 20, 'dma buffer');
    ictx.mapFixed(ioas, mem.address, 0x100000n, BigInt(1 << 20));
    assert.equal(errnoOf(() => ictx.destroy(ioas)), 'EBUSY', 'an IOAS with a device attached');

    // What QEMU does with the cdev: add it to its KVM-VFIO device.
    const kvm = Kvm.open('/dev');
    const vm = kvm.createVmSync('cdev test vm');
    const kdev = vm.createVfioDevice();
    kdev.addFile(cdev.fd, path);
    assert.equal(errnoOf(() => kdev.addFile(cdev.fd, path)), 'EEXIST');
    kdev.deleteFile(cdev.fd, path);
    assert.equal(errnoOf(() => kdev.deleteFile(cdev.fd, path)), 'ENOENT');
    await kdev.close();
    await vm.close();
    await kvm.close();

    ictx.unmap(ioas, 0x100000n, BigInt(1 << 20));
    mem.unmap();
    cdev.detach();
    ictx.destroy(ioas);
    await cdev.close();
    await ictx.close();
    // Every copy of the bound file closed: the device is free; the group opens (and a new bind would work).
    const again = await VfioGroup.open(g.path, g.number);
    await again.close();
    const fresh = await VfioDeviceCdev.open(path);
    const ctx2 = await Iommufd.open('/dev');
    assert.ok(fresh.bindIommufd(ctx2.fd) >= 0);
    await fresh.close();
    await ctx2.close();
  });
});

describe('a VMM that speaks the session, with the device-cdev handoff', { skip }, () => {
  for (const kind of ["ts", "c"] as const)
  test(`${kind} VMM: binds, attaches and KVM-ADDs each device the daemon sends; AddGroup/RemoveGroup; devices back after DeleteVm`, async (t) => {
    const { startDaemon } = await import('../helpers/daemon');
    const { REFERENCE_VMM, runVmm } = await import('../helpers/vmmproc');
    const { buildCVmm } = await import('../helpers/cvmm');
    const { expectStatus, until } = await import('../helpers/assert');
    const { status } = await import('@grpc/grpc-js');
    const d = await startDaemon({ args: ['--vmm-timeout-ms', '20000', '--vmm-exit-grace-ms', '20000'] });
    const procs: { kill(): void }[] = [];
    try {
      const c = d.client();
      const slow = <T>(what: string, fn: () => Promise<T | undefined | false>) => until(what, fn, 60_000);
      const [A, B] = singleDeviceGroups(loadGuestGroups());
      assert.ok(A && B, 'two viable single-device groups');
      const sysVendor = (g: typeof A) => `0x${readFileSync(`/sys/bus/pci/devices/${g.devices[0].address}/vendor`, 'utf8').trim().replace(/^0x/, '')}`;
      const { vm, attach_token } = await c.createVm({ name: `cdev-${kind}`, vmm_uid: 65534, vfio_device: true, groups: [A.number], vfio_handoff: 'VFIO_HANDOFF_CDEV', memlock_bytes: String(64 << 20) });
      const handoff = `${d.runtimeDir}/handoff.sock`;
      const argv = kind === 'ts' ? [process.execPath, REFERENCE_VMM, '--socket', handoff] : [process.env.KVMVFIO_CVMM || (await buildCVmm()), handoff];
      const v = runVmm(argv, attach_token!.token, true, { env: { KVMVFIO_USE_VFIO: '1' } });
      procs.push(v);
      assert.equal((await v.waitFor('attached', 60_000)).iommufd, true);
      const useOf = (g: typeof A) => slow(`vfio-use of ${g.devices[0].address}`, async () => v.events.find((e) => e.event === 'vfio-use' && e.device === g.devices[0].address));
      const useA = await useOf(A);
      assert.equal(useA.ok, true, JSON.stringify(useA));
      assert.equal(useA.vendor, sysVendor(A), 'config space through the cdev');
      assert.equal(useA.dma, true);
      await slow('RUNNING', async () => (await c.getVm(vm!.id)).state === 'VM_STATE_RUNNING');
      assert.deepEqual([(await c.getIommuGroup(A.number)).holding, (await c.getIommuGroup(A.number)).open_in_daemon], ['GROUP_HOLDING_VMM', false]);

      assert.deepEqual((await c.addGroup({ vm_id: vm!.id, group: B.number })).groups, [A.number, B.number].sort((x, y) => x - y));
      assert.equal((await useOf(B)).ok, true);
      await expectStatus(c.addGroup({ vm_id: vm!.id, group: B.number }), status.ALREADY_EXISTS);
      assert.deepEqual((await c.removeGroup({ vm_id: vm!.id, group: B.number })).groups, [A.number]);
      assert.equal((await c.getIommuGroup(B.number)).holding, 'GROUP_HOLDING_FREE', 'the VMM closed the cdev: the daemon opens the group again');
      const t0 = Date.now();
      await c.deleteVm({ vm_id: vm!.id });
      await slow('group A free', async () => (await c.getIommuGroup(A.number)).holding === 'GROUP_HOLDING_FREE');
      t.diagnostic(`device back ${Date.now() - t0} ms after DeleteVm was called`);
    } finally {
      for (const p of procs) p.kill();
      await d.cleanup();
    }
  });
});

describe('the host default handoff', { skip }, () => {
  test('unspecified: CDEV for a VM whose devices all have cdevs (this guest), GROUP for a VM without groups', async () => {
    const { startDaemon } = await import('../helpers/daemon');
    const d = await startDaemon();
    try {
      const c = d.client();
      assert.equal((await c.getHostInfo()).support?.vfio_device_cdev, true);
      const [g] = singleDeviceGroups(loadGuestGroups());
      const withGroup = await c.createVm({ name: 'default-cdev', vmm_uid: 65534, vfio_device: true, groups: [g.number] });
      assert.equal(withGroup.vm!.vfio_handoff, 'VFIO_HANDOFF_CDEV');
      assert.equal((await c.getIommuGroup(g.number)).open_in_daemon, false, 'claimed for a cdev handoff: no group fd kept');
      const without = await c.createVm({ name: 'default-none', vmm_uid: 65534 });
      assert.equal(without.vm!.vfio_handoff, 'VFIO_HANDOFF_GROUP');
      await c.deleteVm({ vm_id: withGroup.vm!.id });
      await c.deleteVm({ vm_id: without.vm!.id });
    } finally {
      await d.cleanup();
    }
  });
});
