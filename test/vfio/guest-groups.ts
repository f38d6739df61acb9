/**
 * The IOMMU groups of the VFIO lane's guest, as its /init (test/vfio/init.sh)
 * read them from sysfs and wrote them to KVMVFIO_GUEST_GROUPS. Group numbers
 * come from here, never from constants. Shared by the tests in test/vfio/.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';

export interface GuestDevice {
  /** "0000:00:04.0" */
  address: string;
  /** 4 hex digits, no 0x ("1234"). */
  vendorId: string;
  deviceId: string;
  /** 6 hex digits ("00ff00"). */
  classCode: string;
  /** The bound driver, "" when none. */
  driver: string;
  /**
   * Its VFIO device cdev ("vfio0": sysfs vfio-dev/vfioN with a dev number), "" when none (Debian's
   * vfio, KVMVFIO_LANE_CDEV=0: the vfio-dev/vfioN is there, but without a dev number or node).
   */
  cdev: string;
}

export interface GuestGroup {
  number: number;
  /** "/dev/vfio/N", or "" when VFIO does not know the group (no device of it on vfio-pci). */
  path: string;
  /** Predicted by /init: every device unbound or on vfio-pci (family), pci-stub or pcieport. */
  viable: boolean;
  /** Sorted by address. */
  devices: GuestDevice[];
  /** The devices that keep the group from being viable, with their drivers. */
  blockers: { address: string; driver: string }[];
}

export interface GuestGroups {
  /** uname -r of the guest. */
  kernel: string;
  /** Every IOMMU group of the guest, by number. */
  groups: GuestGroup[];
  /** VFIO groups (/dev/vfio/N exists) that are viable. */
  viable: number[];
  /** VFIO groups that are not viable (a device of theirs is on a kernel driver). */
  notViable: number[];
}

/** True inside the lane's guest (test/vfio/lane.sh). */
export const IN_VFIO_GUEST = process.env.KVMVFIO_GUEST === '1';

/** For `describe(..., { skip: VFIO_GUEST_SKIP })`: false in the guest, a reason elsewhere. */
export const VFIO_GUEST_SKIP: string | false = IN_VFIO_GUEST ? false : 'not in the VFIO guest (run npm run test:vfio)';

/**
 * The lane rebuilt vfio with iommufd (KVMVFIO_LANE_CDEV, default 1) and its /init checked
 * /dev/iommu and each device's /dev/vfio/devices/vfioN. For `{ skip: VFIO_CDEV_SKIP }`.
 */
export const VFIO_CDEV_SKIP: string | false =
  process.env.KVMVFIO_GUEST_CDEV === '1' ? false : 'the lane ran with KVMVFIO_LANE_CDEV=0: Debian\'s vfio, no cdevs';

export function loadGuestGroups(file = process.env.KVMVFIO_GUEST_GROUPS): GuestGroups {
  assert.ok(file, 'KVMVFIO_GUEST_GROUPS is not set (the lane sets it in the guest)');
  return JSON.parse(readFileSync(file, 'utf8')) as GuestGroups;
}

export function guestGroup(g: GuestGroups, n: number): GuestGroup {
  const found = g.groups.find((x) => x.number === n);
  assert.ok(found, `group ${n} is listed but not described in groups.json`);
  return found;
}

/** Viable VFIO groups of exactly one device, on vfio-pci. */
export function singleDeviceGroups(g: GuestGroups): GuestGroup[] {
  return g.viable.map((n) => guestGroup(g, n)).filter((x) => x.devices.length === 1 && x.devices[0].driver === 'vfio-pci');
}

/** VFIO groups with a device on vfio-pci that a sibling on a kernel driver makes not viable. */
export function blockedGroups(g: GuestGroups): GuestGroup[] {
  return g.notViable
    .map((n) => guestGroup(g, n))
    .filter((x) => x.devices.some((d) => d.driver === 'vfio-pci') && x.blockers.length > 0);
}
