/**
 * `kvmvfioctl vm args VM --vmm qemu`: the arguments that make an unmodified
 * VMM use what kvmvfiod hands it, with the placeholders `kvmvfioctl attach`
 * fills in ({kvm}...; see attach.ts fillPlaceholders). For QEMU (≥ 8.2;
 * measured with Debian's 10.0, docs/vmm-integration.md): /dev/kvm as fdset 1
 * and the KVM accelerator on it. QEMU opens VFIO groups and the container
 * only by path, so a VM with IOMMU groups gets an error saying so rather
 * than arguments that cannot work.
 */
import type { Vm } from '../client/client';

/** The VM cannot be run by that VMM with what kvmvfiod hands out. */
export class VmmArgsError extends Error {
  override readonly name = 'VmmArgsError';
  readonly code = 'FAILED_PRECONDITION';
}

export const KNOWN_VMMS = ['qemu'] as const;

export function vmmArgs(vm: Vm, vmm: (typeof KNOWN_VMMS)[number]): string[] {
  if (vm.groups.length) {
    throw new VmmArgsError(
      `vm ${vm.name} has IOMMU groups ${vm.groups.join(',')}: QEMU takes a VFIO device from outside only as a device cdev fd with an iommufd, not as a group fd, and kvmvfiod hands out groups; attach a VMM that speaks the session protocol, or give QEMU no groups`,
    );
  }
  return ['-add-fd', 'fd={kvm},set=1,opaque=kvmvfiod-kvm', '-accel', 'kvm,device=/dev/fdset/1'];
}
