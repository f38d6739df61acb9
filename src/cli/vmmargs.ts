/**
 * `kvmvfioctl vm args VM --vmm qemu`: the arguments that make an unmodified
 * VMM use what kvmvfiod hands it, with the placeholders `kvmvfioctl attach`
 * fills in ({kvm}...; see attach.ts fillPlaceholders). For QEMU (≥ 8.2;
 * measured with Debian's 10.0, docs/vmm-integration.md): /dev/kvm as fdset 1
 * and the KVM accelerator on it; for a VM with the device-cdev handoff, its
 * iommufd as an `iommufd` object and each device as a `vfio-pci` device on
 * it. QEMU opens VFIO groups and the container only by path, so a VM with
 * IOMMU groups handed over as groups gets an error saying so rather than
 * arguments that cannot work.
 */
import type { Vm } from '../client/client';

/** The VM cannot be run by that VMM with what kvmvfiod hands out. */
export class VmmArgsError extends Error {
  override readonly name = 'VmmArgsError';
  readonly code = 'FAILED_PRECONDITION';
}

export const KNOWN_VMMS = ['qemu'] as const;

/** `devices`: the PCI addresses of the devices of the VM's groups (for the cdev handoff). */
export function vmmArgs(vm: Vm, vmm: (typeof KNOWN_VMMS)[number], devices: readonly string[] = []): string[] {
  const kvm = ['-add-fd', 'fd={kvm},set=1,opaque=kvmvfiod-kvm', '-accel', 'kvm,device=/dev/fdset/1'];
  if (vm.vfio_handoff === 'VFIO_HANDOFF_CDEV') {
    if (!devices.length) return kvm;
    return [
      ...kvm,
      '-object', 'iommufd,id=kvmvfiod-iommufd,fd={iommufd}',
      ...devices.flatMap((a) => ['-device', `vfio-pci,iommufd=kvmvfiod-iommufd,fd={device:${a}},id=kvmvfiod-${a.replace(/:/g, '-')}`]),
    ];
  }
  if (vm.groups.length) {
    throw new VmmArgsError(
      `vm ${vm.name} has IOMMU groups ${vm.groups.join(',')} handed over as group files: QEMU takes a VFIO device from outside only as a device cdev fd with an iommufd; create the VM with the CDEV handoff (kvmvfioctl vm create --cdev)`,
    );
  }
  return kvm;
}
