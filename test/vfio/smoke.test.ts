/**
 * The VFIO lane's own smoke test: the plumbing the daemon tests stand on.
 * It runs inside the lane's guest (test/vfio/lane.sh sets KVMVFIO_GUEST=1 and
 * KVMVFIO_GUEST_GROUPS to the groups.json its /init wrote from sysfs);
 * anywhere else it skips. `npm test` does not load test/vfio/.
 *
 * It proves: the groups the guest /init described are what sysfs shows; each
 * viable group opens, a second open is EBUSY, and the kernel's
 * VFIO_GROUP_GET_STATUS agrees with the predicted viability (also for the
 * group that is not viable); /dev/kvm is there and answers; with the lane's
 * rebuilt vfio (KVMVFIO_LANE_CDEV=1, the default), /dev/iommu and each device's
 * cdev are char devices, and a device's cdev opens while its group is open
 * (the kernel refuses only at bind, which is the next feature's to use).
 */
import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, constants, existsSync, openSync, readFileSync, readdirSync, readlinkSync, statSync } from 'node:fs';
import { basename } from 'node:path';
import { Kvm, VfioGroup } from '../../src/kernel';
import {
  VFIO_CDEV_SKIP,
  VFIO_GUEST_SKIP,
  blockedGroups,
  guestGroup,
  loadGuestGroups,
  singleDeviceGroups,
} from './guest-groups';

function driverOf(address: string): string {
  try {
    return basename(readlinkSync(`/sys/bus/pci/devices/${address}/driver`));
  } catch {
    return '';
  }
}

/**
 * The device's cdev names in sysfs; [] when it has none. Every device on vfio-pci has a
 * vfio-dev/vfioN, but only with CONFIG_VFIO_DEVICE_CDEV does it have a dev number (a `dev` file).
 */
function sysfsCdevs(address: string): string[] {
  const dir = `/sys/bus/pci/devices/${address}/vfio-dev`;
  try {
    return readdirSync(dir).filter((n) => /^vfio\d+$/.test(n) && existsSync(`${dir}/${n}/dev`));
  } catch {
    return [];
  }
}

/** "major:minor" of a device node, as sysfs writes it in a `dev` file. */
function nodeNumbers(path: string): string {
  const st = statSync(path, { bigint: true });
  assert.ok(st.isCharacterDevice(), `${path} is a character device`);
  // glibc's dev_t: minor in bits 0-7 and 20-43, major in bits 8-19 and 44-63.
  const major = ((st.rdev >> 8n) & 0xfffn) | ((st.rdev >> 32n) & 0xfffff000n);
  const minor = (st.rdev & 0xffn) | ((st.rdev >> 12n) & 0xffffff00n);
  return `${major}:${minor}`;
}

function openFails(path: string): string | undefined {
  try {
    closeSync(openSync(path, constants.O_RDWR));
    return undefined;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code;
  }
}

describe('VFIO lane plumbing', { skip: VFIO_GUEST_SKIP }, () => {
  test('groups.json matches sysfs and has the promised cases', () => {
    const g = loadGuestGroups();
    for (const grp of g.groups) {
      const inSysfs = readdirSync(`/sys/kernel/iommu_groups/${grp.number}/devices`).sort();
      assert.deepEqual(grp.devices.map((d) => d.address).sort(), inSysfs, `devices of group ${grp.number}`);
      for (const d of grp.devices) {
        assert.equal(d.driver, driverOf(d.address), `driver of ${d.address}`);
        assert.equal(d.cdev, sysfsCdevs(d.address)[0] ?? '', `cdev of ${d.address}`);
      }
    }
    const singles = singleDeviceGroups(g);
    assert.ok(singles.length >= 2, `>= 2 viable single-device groups on vfio-pci, got ${JSON.stringify(g.viable)}`);
    const blocked = blockedGroups(g);
    assert.ok(blocked.length >= 1, `a VFIO group made non-viable by a kernel driver, got ${JSON.stringify(g.notViable)}`);
    for (const x of blocked) {
      for (const b of x.blockers) assert.notEqual(b.driver, '', `blocker ${b.address} names its driver`);
    }
  });

  test('each viable group opens once; a second open is EBUSY; the kernel says VIABLE', async () => {
    const g = loadGuestGroups();
    for (const n of g.viable) {
      const grp = guestGroup(g, n);
      assert.equal(grp.path, `/dev/vfio/${n}`);
      assert.ok(statSync(grp.path).isCharacterDevice(), `${grp.path} is a character device`);
      const opened = await VfioGroup.open(grp.path, n);
      try {
        assert.deepEqual(opened.status(), { viable: true, containerSet: false }, `VFIO_GROUP_GET_STATUS of ${grp.path}`);
        assert.equal(openFails(grp.path), 'EBUSY', `second open of ${grp.path}`);
      } finally {
        await opened.close();
      }
      assert.equal(openFails(grp.path), undefined, `${grp.path} opens again once closed`);
    }
  });

  test('the kernel agrees that each non-viable group is not viable', async () => {
    const g = loadGuestGroups();
    for (const n of g.notViable) {
      const grp = guestGroup(g, n);
      const opened = await VfioGroup.open(grp.path, n);
      try {
        assert.equal(opened.status().viable, false, `VFIO_GROUP_GET_STATUS of ${grp.path} (blockers ${JSON.stringify(grp.blockers)})`);
      } finally {
        await opened.close();
      }
    }
  });

  test('each single-device group: its cdev and /dev/iommu are char devices; the cdev opens while the group is open', { skip: VFIO_CDEV_SKIP }, async () => {
    assert.equal(nodeNumbers('/dev/iommu'), readFileSync('/sys/class/misc/iommu/dev', 'utf8').trim(), '/dev/iommu');
    const singles = singleDeviceGroups(loadGuestGroups());
    assert.ok(singles.length >= 2, `>= 2 viable single-device groups, got ${singles.length}`);
    for (const grp of singles) {
      const { address } = grp.devices[0];
      const names = sysfsCdevs(address);
      assert.equal(names.length, 1, `${address} has one cdev in sysfs (vfio-dev/), got ${JSON.stringify(names)}`);
      const cdev = `/dev/vfio/devices/${names[0]}`;
      const sysfsDev = readFileSync(`/sys/bus/pci/devices/${address}/vfio-dev/${names[0]}/dev`, 'utf8').trim();
      assert.equal(nodeNumbers(cdev), sysfsDev, `${cdev} is the node of ${address}'s cdev`);
      const group = await VfioGroup.open(grp.path, grp.number);
      try {
        // Group and cdev are two doors to one device; the kernel lets both open and
        // refuses only the cdev's BIND_IOMMUFD while the group is open (EBUSY).
        assert.equal(openFails(cdev), undefined, `open ${cdev} while ${grp.path} is open`);
      } finally {
        await group.close();
      }
    }
  });

  test('/dev/kvm and /dev/vfio/vfio are there; KVM answers', () => {
    assert.ok(statSync('/dev/kvm').isCharacterDevice(), '/dev/kvm');
    assert.ok(statSync('/dev/vfio/vfio').isCharacterDevice(), '/dev/vfio/vfio');
    const kvm = Kvm.open('/dev');
    try {
      assert.equal(kvm.apiVersion(), 12, 'KVM_GET_API_VERSION');
    } finally {
      kvm.closeSync();
    }
  });
});
