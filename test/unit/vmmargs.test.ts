import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { Vm } from '../../src/client/client';
import { VmmArgsError, vmmArgs } from '../../src/cli/vmmargs';
import { idToPciAddress, pciAddressToId } from '../../src/protocol/session';

const vm = (over: Partial<Vm>): Vm => ({ name: 'q', groups: [], vfio_handoff: 'VFIO_HANDOFF_GROUP', ...over }) as Vm;

test('vm args for QEMU: /dev/kvm through an fdset; a cdev VM adds its iommufd, the monitor, a root port per device plus spares, one vfio-pci per device', () => {
  const kvm = ['-add-fd', 'fd={kvm},set=1,opaque=kvmvfiod-kvm', '-accel', 'kvm,device=/dev/fdset/1'];
  assert.deepEqual(vmmArgs(vm({}), 'qemu'), kvm);
  const monitor = ['-chardev', 'socket,id=kvmvfiod-qmp,fd={qmp}', '-mon', 'chardev=kvmvfiod-qmp,mode=control'];
  const port = (n: number) => ['-device', `pcie-root-port,id=kvmvfiod-port-${n},chassis=201,slot=${n}`];
  assert.deepEqual(vmmArgs(vm({ vfio_handoff: 'VFIO_HANDOFF_CDEV', groups: [4, 5] }), 'qemu', ['0000:00:04.0', '0000:00:05.0'], 1), [
    ...kvm,
    '-object', 'iommufd,id=kvmvfiod-iommufd,fd={iommufd}',
    ...monitor,
    ...port(1), ...port(2), ...port(3),
    '-device', 'vfio-pci,iommufd=kvmvfiod-iommufd,fd={device:0000:00:04.0},bus=kvmvfiod-port-1,id=kvmvfiod-0000-00-04.0',
    '-device', 'vfio-pci,iommufd=kvmvfiod-iommufd,fd={device:0000:00:05.0},bus=kvmvfiod-port-2,id=kvmvfiod-0000-00-05.0',
  ]);
  // A cdev VM without groups (yet): everything AddGroup needs, four spare ports by default.
  assert.deepEqual(vmmArgs(vm({ vfio_handoff: 'VFIO_HANDOFF_CDEV' }), 'qemu'), [...kvm, '-object', 'iommufd,id=kvmvfiod-iommufd,fd={iommufd}', ...monitor, ...port(1), ...port(2), ...port(3), ...port(4)]);
  assert.deepEqual(vmmArgs(vm({ vfio_handoff: 'VFIO_HANDOFF_CDEV' }), 'qemu', [], 0), [...kvm, '-object', 'iommufd,id=kvmvfiod-iommufd,fd={iommufd}', ...monitor]);
  assert.throws(() => vmmArgs(vm({ vfio_handoff: 'VFIO_HANDOFF_CDEV' }), 'qemu', ['0000:00:04.0'], 255), (e: unknown) => e instanceof VmmArgsError && /255 root ports/.test(e.message));
  assert.throws(() => vmmArgs(vm({ groups: [4] }), 'qemu'), (e: unknown) => e instanceof VmmArgsError && /handed over as group files/.test(e.message));
});

test('a PCI address is the 32 bits of a manifest id, and back', () => {
  for (const a of ['0000:00:04.0', '0000:ff:1f.7', 'ffff:01:00.1']) assert.equal(idToPciAddress(pciAddressToId(a)), a);
  assert.equal(pciAddressToId('0000:00:04.0'), 0x20);
  assert.equal(pciAddressToId('0001:02:03.4'), 0x0001021c);
  assert.throws(() => pciAddressToId('00:04.0'), RangeError);
  assert.throws(() => pciAddressToId('0000:00:20.0'), RangeError, 'device numbers go to 0x1f');
});
