// The host's IOMMU groups as sysfs shows them: which devices share a group,
// what they are, which driver holds each, and whether VFIO could own the group.
// Read synchronously: sysfs attributes live in memory and answer in µs,
// while a round trip through the libuv pool costs a thread wake-up each way
// (50–100 µs on a busy 2-vCPU host) — nine of them per group read before.
// Listing every group yields to the event loop between batches.
import { readdirSync, readFileSync, readlinkSync, statSync } from 'node:fs';
import * as path from 'node:path';

export interface PciDeviceInfo {
  /** Name of the device in the group ("0000:01:00.0" for PCI). */
  address: string;
  /** 4 lower-case hex digits without 0x ("10de"); "" for a non-PCI device. */
  vendorId: string;
  deviceId: string;
  /** 6 hex digits: class, subclass, prog-if ("030000"); "" for a non-PCI device. */
  classCode: string;
  /** Bound driver name, "" when none. */
  driver: string;
  /**
   * The device's VFIO cdev ("vfio0", i.e. /dev/vfio/devices/vfio0): present
   * while it is bound to vfio-pci on a kernel with CONFIG_VFIO_DEVICE_CDEV
   * (sysfs: <device>/vfio-dev/vfioN); "" otherwise.
   */
  cdev: string;
}

export interface GroupInventory {
  number: number;
  /** Sorted by address. */
  devices: PciDeviceInfo[];
  viable: boolean;
  /** One line per offending device, naming the fix. */
  notViableReasons: string[];
}

/*
 * Which bound drivers leave a group usable by VFIO.
 *
 * The kernel's rule (Linux >= 5.19, commit 512881eacfa7 "bus: platform,amba,
 * fsl-mc,PCI: Add device DMA ownership management"): when a driver binds,
 * pci_dma_configure() (drivers/pci/pci-driver.c) calls
 * iommu_device_use_default_domain() unless the driver sets
 * `driver_managed_dma`; that claims the group's DMA for the kernel, and VFIO
 * then reports the group not VIABLE (drivers/vfio/group.c,
 * VFIO_GROUP_GET_STATUS: `!iommu_group_dma_owner_claimed()`) and refuses it.
 * Drivers that set driver_managed_dma in mainline:
 *   - vfio-pci and its variant drivers (mlx5_vfio_pci, hisi_acc_vfio_pci,
 *     virtio_vfio_pci, nvgrace_gpu_vfio_pci, qat_vfio_pci, ism_vfio_pci,
 *     xe-vfio-pci, pds_vfio...), vfio-platform, vfio-amba, vfio-fsl-mc, vfio-cdx;
 *   - pci-stub (drivers/pci/pci-stub.c, commit 18c7a349d072);
 *   - pcieport (drivers/pci/pcie/portdrv.c, commit c7d469849747 "PCI: portdrv:
 *     Set driver_managed_dma": it does no DMA, so a switch port may stay bound
 *     while the devices below it, in its group, go to VFIO).
 * The vfio family is matched by a "vfio" word in the name, since variant
 * drivers keep appearing. This is a prediction for the inventory; the
 * authoritative answer stays VFIO_GROUP_GET_STATUS on the opened group.
 * (Before 5.19, vfio.c allowed pci-stub by name and any PCI bridge whatever
 * its driver; the rule above is the current one.)
 */
const DMA_SAFE_DRIVERS = new Set(['pci-stub', 'pcieport']);
const VFIO_FAMILY = /(^|[-_])vfio([-_]|$)/;

/** True when a device bound to `driver` ("" = unbound) does not stop VFIO owning its group. */
export function isDriverVfioSafe(driver: string): boolean {
  if (driver === '') return true;
  return DMA_SAFE_DRIVERS.has(driver) || VFIO_FAMILY.test(driver);
}

function errnoCode(err: unknown): string | undefined {
  return typeof err === 'object' && err !== null && 'code' in err
    ? String((err as { code: unknown }).code)
    : undefined;
}

/** Errors meaning "this path is not there" (a device or group unplugged while we read, a host without IOMMU). */
function isAbsent(err: unknown): boolean {
  const code = errnoCode(err);
  return code === 'ENOENT' || code === 'ENOTDIR';
}

const GROUP_NAME = /^(0|[1-9][0-9]*)$/;

function groupsDir(sysfsRoot: string): string {
  return path.join(sysfsRoot, 'kernel', 'iommu_groups');
}

/** "0x10DE\n" -> "10de", padded to `width` digits; "" when the file is absent (non-PCI device). */
function readHexAttr(file: string, width: number): string {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    if (isAbsent(err)) return '';
    throw err;
  }
  const hex = text.trim().toLowerCase().replace(/^0x/, '');
  if (!/^[0-9a-f]+$/.test(hex)) return '';
  return hex.padStart(width, '0');
}

const CDEV_NAME = /^vfio[0-9]+$/;

/**
 * A cdev is a vfio-dev/vfioN entry with a device number (its `dev` file):
 * a kernel without CONFIG_VFIO_DEVICE_CDEV makes the entry too, with no
 * number and no /dev node (measured on Debian's 6.12).
 */
function readCdev(deviceDir: string): string {
  let names: string[];
  try {
    names = readdirSync(path.join(deviceDir, 'vfio-dev')).filter((n) => CDEV_NAME.test(n));
  } catch (err) {
    if (isAbsent(err)) return '';
    throw err;
  }
  for (const n of names) {
    try {
      statSync(path.join(deviceDir, 'vfio-dev', n, 'dev'));
      return n;
    } catch (err) {
      if (!isAbsent(err)) throw err;
    }
  }
  return '';
}

function readDriver(deviceDir: string): string {
  try {
    return path.basename(readlinkSync(path.join(deviceDir, 'driver')));
  } catch (err) {
    if (isAbsent(err)) return '';
    throw err;
  }
}

/** Undefined when the device vanished between listing and reading (hot unplug). */
function readDevice(groupDevicesDir: string, address: string): PciDeviceInfo | undefined {
  const dir = path.join(groupDevicesDir, address);
  try {
    statSync(dir); // follows the symlink: dangling means gone
  } catch (err) {
    if (isAbsent(err)) return undefined;
    throw err;
  }
  return {
    address,
    vendorId: readHexAttr(path.join(dir, 'vendor'), 4),
    deviceId: readHexAttr(path.join(dir, 'device'), 4),
    classCode: readHexAttr(path.join(dir, 'class'), 6),
    driver: readDriver(dir),
    cdev: readCdev(dir),
  };
}

function reasonFor(dev: PciDeviceInfo): string {
  return `${dev.address} is bound to ${dev.driver}; bind ${dev.address} to vfio-pci`;
}

/** One group, or undefined when `<sysfsRoot>/kernel/iommu_groups/<n>` does not exist. */
export async function readIommuGroup(sysfsRoot: string, n: number): Promise<GroupInventory | undefined> {
  return readIommuGroupSync(sysfsRoot, n);
}

/** readIommuGroup on the spot. */
export function readIommuGroupSync(sysfsRoot: string, n: number): GroupInventory | undefined {
  if (!Number.isSafeInteger(n) || n < 0) return undefined;
  const devicesDir = path.join(groupsDir(sysfsRoot), String(n), 'devices');
  let names: string[];
  try {
    names = readdirSync(devicesDir);
  } catch (err) {
    if (isAbsent(err)) return undefined;
    throw err;
  }
  // Fixed-width lower-case PCI addresses sort correctly as strings.
  names.sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
  const read = names.map((name) => readDevice(devicesDir, name));
  const devices = read.filter((d): d is PciDeviceInfo => d !== undefined);
  const notViableReasons = devices.filter((d) => !isDriverVfioSafe(d.driver)).map(reasonFor);
  return { number: n, devices, viable: notViableReasons.length === 0, notViableReasons };
}

/** Every group, sorted by number; [] on a host without IOMMU (no iommu_groups dir). */
export async function readIommuGroups(sysfsRoot: string): Promise<GroupInventory[]> {
  let entries: string[];
  try {
    entries = readdirSync(groupsDir(sysfsRoot));
  } catch (err) {
    if (isAbsent(err)) return [];
    throw err;
  }
  const numbers = entries
    .filter((e) => GROUP_NAME.test(e))
    .map(Number)
    .filter(Number.isSafeInteger)
    .sort((a, b) => a - b);
  const groups: GroupInventory[] = [];
  // Big hosts have hundreds of groups: 16 at a time (~100 µs of reads), then the event loop's turn.
  const BATCH = 16;
  for (let i = 0; i < numbers.length; i += BATCH) {
    if (i > 0) await new Promise<void>((r) => setImmediate(r));
    for (const n of numbers.slice(i, i + BATCH)) {
      const g = readIommuGroupSync(sysfsRoot, n);
      if (g !== undefined) groups.push(g);
    }
  }
  return groups;
}
