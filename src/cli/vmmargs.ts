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
 *
 * A cdev VM's QEMU also gets the daemon's monitor — one end of the socketpair
 * `attach` makes for {qmp} — and PCIe root ports: one per device of its
 * groups (each device sits on its own, so it can be hot-unplugged) and
 * `hotplugPorts` spare ones, where AddGroup hot-plugs devices (machine q35).
 * The names are the ones the daemon looks for (src/protocol/qemu.ts).
 */
import type { Vm } from '../client/client';
import { QEMU_IOMMUFD_ID, QEMU_MONITOR_ID, QEMU_PORT_CHASSIS, qemuDeviceId, qemuPortId } from '../protocol/qemu';

/** The VM cannot be run by that VMM with what kvmvfiod hands out. */
export class VmmArgsError extends Error {
  override readonly name = 'VmmArgsError';
  readonly code = 'FAILED_PRECONDITION';
}

export const KNOWN_VMMS = ['qemu'] as const;

/** Spare root ports for hot-plug when --hotplug-ports is not given. */
export const DEFAULT_HOTPLUG_PORTS = 4;
/** A (chassis, slot) pair per port: slots 1 to 255 of kvmvfiod's chassis. */
export const MAX_PORTS = 255;

/**
 * `devices`: the PCI addresses of the devices of the VM's groups (for the
 * cdev handoff); `hotplugPorts`: the spare root ports of a cdev VM.
 */
export function vmmArgs(vm: Vm, vmm: (typeof KNOWN_VMMS)[number], devices: readonly string[] = [], hotplugPorts = DEFAULT_HOTPLUG_PORTS): string[] {
  const kvm = ['-add-fd', 'fd={kvm},set=1,opaque=kvmvfiod-kvm', '-accel', 'kvm,device=/dev/fdset/1'];
  if (vm.vfio_handoff === 'VFIO_HANDOFF_CDEV') {
    if (devices.length + hotplugPorts > MAX_PORTS) {
      throw new VmmArgsError(`vm ${vm.name}: ${devices.length} devices and ${hotplugPorts} spare ports need more than the ${MAX_PORTS} root ports kvmvfiod numbers`);
    }
    const ports = Array.from({ length: devices.length + hotplugPorts }, (_, i) => ['-device', `pcie-root-port,id=${qemuPortId(i + 1)},chassis=${QEMU_PORT_CHASSIS},slot=${i + 1}`]).flat();
    return [
      ...kvm,
      '-object', `iommufd,id=${QEMU_IOMMUFD_ID},fd={iommufd}`,
      '-chardev', `socket,id=${QEMU_MONITOR_ID},fd={qmp}`,
      '-mon', `chardev=${QEMU_MONITOR_ID},mode=control`,
      ...ports,
      ...devices.flatMap((a, i) => ['-device', `vfio-pci,iommufd=${QEMU_IOMMUFD_ID},fd={device:${a}},bus=${qemuPortId(i + 1)},id=${qemuDeviceId(a)}`]),
    ];
  }
  if (vm.groups.length) {
    throw new VmmArgsError(
      `vm ${vm.name} has IOMMU groups ${vm.groups.join(',')} handed over as group files: QEMU takes a VFIO device from outside only as a device cdev fd with an iommufd; create the VM with the CDEV handoff (kvmvfioctl vm create --cdev)`,
    );
  }
  return kvm;
}
