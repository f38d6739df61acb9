/**
 * The names kvmvfiod and the QEMU command line it prints (`kvmvfioctl vm
 * args --vmm qemu`) agree on, so that the daemon finds in QEMU, through QMP,
 * what the command line made: its iommufd object, its devices, its monitor
 * and the PCIe root ports it may hot-plug into. Shared by the CLI and the
 * daemon; no I/O here.
 */

/** The `iommufd` object holding the VMM's /dev/iommu, made at start (`-object`) or by the daemon over QMP. */
export const QEMU_IOMMUFD_ID = 'kvmvfiod-iommufd';

/** The chardev of the daemon's monitor: one end of the socketpair `kvmvfioctl attach` made ({qmp}). */
export const QEMU_MONITOR_ID = 'kvmvfiod-qmp';

/** Root ports kvmvfiod's arguments add are named so: a hot-plug prefers them to the VM's own. */
export const QEMU_PORT_PREFIX = 'kvmvfiod-port-';

/**
 * The chassis number of kvmvfiod's root ports (slots 1, 2, ...). A (chassis,
 * slot) pair is unique per QEMU: a number a hand-written command line is
 * unlikely to use.
 */
export const QEMU_PORT_CHASSIS = 201;

/** The QEMU device id of a VFIO device: "kvmvfiod-0000-00-04.0" for 0000:00:04.0. */
export function qemuDeviceId(address: string): string {
  return `kvmvfiod-${address.replace(/:/g, '-')}`;
}

/** The PCI address of a device kvmvfiod plugged, from its QEMU id; undefined for another id. */
export function addressOfQemuDeviceId(id: string): string | undefined {
  const m = /^kvmvfiod-([0-9a-f]{4})-([0-9a-f]{2})-([0-9a-f]{2}\.[0-7])$/.exec(id);
  return m ? `${m[1]}:${m[2]}:${m[3]}` : undefined;
}

export function qemuPortId(n: number): string {
  return `${QEMU_PORT_PREFIX}${n}`;
}
