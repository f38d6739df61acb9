// A fake host tree (sysfs + /dev) in a temp dir, laid out like the kernel's, so
// the pool and whole daemons can be tested without an IOMMU.
import { chmod, mkdir, mkdtemp, readlink, rm, symlink, unlink, writeFile } from 'node:fs/promises';
import * as os from 'node:os';
import * as path from 'node:path';

export interface FakeDevice {
  /** PCI address, "0000:01:00.0". */
  address: string;
  /** Hex without "0x" ("10de"); written to sysfs as "0x10de\n". */
  vendor: string;
  device: string;
  /** Six hex digits without "0x" ("030000"). */
  class: string;
  /** Bound driver; absent = no driver. */
  driver?: string;
  /** Its VFIO device cdev ("vfio0"): sysfs <device>/vfio-dev/vfio0 and /dev/vfio/devices/vfio0. */
  cdev?: string;
}

export interface FakeGroup {
  number: number;
  devices: FakeDevice[];
}

export interface FakeHost {
  /** The temp dir holding everything. */
  root: string;
  /** `<root>/sys`: pass as the sysfs root (KVMVFIOD_SYSFS). */
  sysfs: string;
  /** `<root>/dev`: pass as the dev root (KVMVFIOD_DEV). */
  dev: string;
  cleanup(): Promise<void>;
  /** Rebind a device to `driver`, or unbind it with null. */
  bindDriver(address: string, driver: string | null): Promise<void>;
}

const PCI_ADDRESS = /^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$/;
const HEX = /^[0-9a-f]+$/;

function checkDevice(d: FakeDevice): void {
  if (!PCI_ADDRESS.test(d.address)) throw new Error(`fakehost: bad PCI address ${JSON.stringify(d.address)}`);
  for (const [name, value, width] of [
    ['vendor', d.vendor, 4],
    ['device', d.device, 4],
    ['class', d.class, 6],
  ] as const) {
    if (!HEX.test(value) || value.length > width) {
      throw new Error(`fakehost: ${d.address}: ${name} must be up to ${width} lower-case hex digits, got ${JSON.stringify(value)}`);
    }
  }
  if (d.driver !== undefined && (d.driver === '' || d.driver.includes('/'))) {
    throw new Error(`fakehost: ${d.address}: bad driver name ${JSON.stringify(d.driver)}`);
  }
}

/** Relative symlink at `link` pointing to `target`, as the kernel's sysfs links are. */
async function relSymlink(target: string, link: string): Promise<void> {
  await symlink(path.relative(path.dirname(link), target), link);
}

async function ignoreMissing(p: Promise<unknown>): Promise<void> {
  try {
    await p;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
  }
}

export async function makeFakeHost(groups: FakeGroup[], opts: { vfioContainer?: boolean; iommufd?: boolean } = {}): Promise<FakeHost> {
  const seenGroups = new Set<number>();
  const seenDevices = new Set<string>();
  for (const g of groups) {
    if (!Number.isSafeInteger(g.number) || g.number < 0) throw new Error(`fakehost: bad group number ${g.number}`);
    if (seenGroups.has(g.number)) throw new Error(`fakehost: group ${g.number} given twice`);
    seenGroups.add(g.number);
    for (const d of g.devices) {
      checkDevice(d);
      if (seenDevices.has(d.address)) throw new Error(`fakehost: device ${d.address} given twice`);
      seenDevices.add(d.address);
    }
  }

  const root = await mkdtemp(path.join(os.tmpdir(), 'kvmvfiod-fakehost-'));
  const sysfs = path.join(root, 'sys');
  const dev = path.join(root, 'dev');
  const pciRoot = path.join(sysfs, 'devices', 'pci0000:00');
  const driversDir = path.join(sysfs, 'bus', 'pci', 'drivers');
  const busDevicesDir = path.join(sysfs, 'bus', 'pci', 'devices');
  const groupsDir = path.join(sysfs, 'kernel', 'iommu_groups');
  const vfioDir = path.join(dev, 'vfio');
  const deviceDir = (address: string): string => path.join(pciRoot, address);

  async function bind(address: string, driver: string | null): Promise<void> {
    const dir = deviceDir(address);
    const link = path.join(dir, 'driver');
    // Drop the old binding: the device's driver link and the driver's link back.
    try {
      const old = path.basename(await readlink(link));
      await ignoreMissing(unlink(path.join(driversDir, old, address)));
      await unlink(link);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
    }
    if (driver === null) return;
    const drvDir = path.join(driversDir, driver);
    await mkdir(drvDir, { recursive: true });
    await relSymlink(drvDir, link);
    await relSymlink(dir, path.join(drvDir, address));
  }

  try {
    await mkdir(pciRoot, { recursive: true });
    await mkdir(driversDir, { recursive: true });
    await mkdir(busDevicesDir, { recursive: true });
    await mkdir(groupsDir, { recursive: true });
    await mkdir(vfioDir, { recursive: true });

    for (const g of groups) {
      const groupDir = path.join(groupsDir, String(g.number));
      await mkdir(path.join(groupDir, 'devices'), { recursive: true });
      for (const d of g.devices) {
        const dir = deviceDir(d.address);
        await mkdir(dir);
        await writeFile(path.join(dir, 'vendor'), `0x${d.vendor.padStart(4, '0')}\n`);
        await writeFile(path.join(dir, 'device'), `0x${d.device.padStart(4, '0')}\n`);
        await writeFile(path.join(dir, 'class'), `0x${d.class.padStart(6, '0')}\n`);
        await relSymlink(groupDir, path.join(dir, 'iommu_group'));
        await relSymlink(dir, path.join(groupDir, 'devices', d.address));
        await relSymlink(dir, path.join(busDevicesDir, d.address));
        if (d.driver !== undefined) await bind(d.address, d.driver);
        if (d.cdev !== undefined) {
          if (!/^vfio[0-9]+$/.test(d.cdev)) throw new Error(`fakehost: ${d.address}: bad cdev name ${JSON.stringify(d.cdev)}`);
          await mkdir(path.join(dir, 'vfio-dev', d.cdev), { recursive: true });
          await writeFile(path.join(dir, 'vfio-dev', d.cdev, 'dev'), '244:0\n');
          await mkdir(path.join(vfioDir, 'devices'), { recursive: true });
          await writeFile(path.join(vfioDir, 'devices', d.cdev), '', { mode: 0o600 });
        }
      }
      // An ordinary file stands in for the char device; tests only need it to exist and be openable.
      const node = path.join(vfioDir, String(g.number));
      await writeFile(node, '', { mode: 0o600 });
      await chmod(node, 0o600);
    }
    // The real /dev/kvm, reached through the fake dev root: KVM is tested against the real kernel.
    await symlink('/dev/kvm', path.join(vfioDir, '..', 'kvm'));
    if (opts.iommufd) await writeFile(path.join(dev, 'iommu'), '', { mode: 0o660 });
    if (opts.vfioContainer) {
      const node = path.join(vfioDir, 'vfio');
      await writeFile(node, '', { mode: 0o600 });
      await chmod(node, 0o600);
    }
  } catch (err) {
    await rm(root, { recursive: true, force: true });
    throw err;
  }

  return {
    root,
    sysfs,
    dev,
    async cleanup(): Promise<void> {
      await rm(root, { recursive: true, force: true });
    },
    async bindDriver(address: string, driver: string | null): Promise<void> {
      if (!seenDevices.has(address)) throw new Error(`fakehost: no device ${address}`);
      if (driver !== null && (driver === '' || driver.includes('/'))) {
        throw new Error(`fakehost: bad driver name ${JSON.stringify(driver)}`);
      }
      await bind(address, driver);
    },
  };
}
