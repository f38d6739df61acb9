/**
 * The iommufd and VFIO device cdev wrappers where this host lets them run:
 * it has no /dev/iommu and no VFIO, so what is checked here is that every
 * failure is a SysError naming the call, the object and the errno — ENOENT
 * for a missing node, ENOTTY for an fd that is not one of theirs — and that
 * each fd is closed once. The calls that succeed run against real devices in
 * the VFIO lane (test/vfio/cdev.test.ts).
 */
import { sysErrorOf } from '../helpers/assert';
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Iommufd, OwnedFd, SysError, VfioDeviceCdev, openFdCount } from '../../src/kernel';


test('Iommufd.open without /dev/iommu is ENOENT naming the path', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'kvmvfiod-iommufd-'));
  try {
    await assert.rejects(Iommufd.open(dir), (e: unknown) => e instanceof SysError && e.code === 'ENOENT' && e.message.includes(join(dir, 'iommu')));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('each ioctl on a file that is not an iommufd or a cdev is ENOTTY with its name; fds closed once', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'kvmvfiod-iommufd-'));
  const fake = join(dir, 'iommu');
  writeFileSync(fake, '');
  const before = await openFdCount();
  try {
    const ictx = await Iommufd.open(dir);
    for (const [call, fn] of [
      ['IOMMU_IOAS_ALLOC', () => ictx.allocIoas()],
      ['IOMMU_IOAS_MAP', () => ictx.mapFixed(1, 0x1000n, 0n, 0x1000n)],
      ['IOMMU_IOAS_UNMAP', () => ictx.unmap(1, 0n, 0x1000n)],
      ['IOMMU_DESTROY', () => ictx.destroy(1)],
    ] as const) {
      const e = sysErrorOf(fn);
      assert.equal(e.call, call);
      assert.equal(e.code, 'ENOTTY', e.message);
      assert.ok(e.message.includes(fake), e.message);
    }
    const cdev = await VfioDeviceCdev.open(fake);
    for (const [call, fn] of [
      ['VFIO_DEVICE_BIND_IOMMUFD', () => cdev.bindIommufd(ictx.fd)],
      ['VFIO_DEVICE_ATTACH_IOMMUFD_PT', () => cdev.attach(1)],
      ['VFIO_DEVICE_DETACH_IOMMUFD_PT', () => cdev.detach()],
      ['VFIO_DEVICE_GET_INFO', () => cdev.info()],
      ['VFIO_DEVICE_GET_REGION_INFO', () => cdev.pciVendorId()],
    ] as const) {
      const e = sysErrorOf(fn);
      assert.equal(e.call, call);
      assert.equal(e.code, 'ENOTTY', e.message);
    }
    await cdev.close();
    await ictx.close();
    assert.throws(() => cdev.fd, /after close/);
    await cdev.close(); // a second close does nothing
    assert.equal(await openFdCount(), before);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('VfioDeviceCdev wraps an fd it owns: a closed one is refused, never reused by number', async () => {
  const fd = new OwnedFd(require('node:fs').openSync('/dev/null', 'r') as number, '/dev/null');
  const cdev = new VfioDeviceCdev(fd, '/dev/null');
  cdev.closeSync();
  assert.throws(() => cdev.bindIommufd(3), /after close/);
});
