import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { isDriverVfioSafe, readIommuGroup, readIommuGroups } from '../../src/broker/sysfs';
import { findFileHolders } from '../../src/broker/holders';
import { makeFakeHost, FakeHost, FakeGroup } from '../helpers/fakehost';

const GPU = { vendor: '10de', device: '1eb8', class: '030000' };
const AUDIO = { vendor: '10de', device: '10f8', class: '040300' };
const NIC = { vendor: '8086', device: '1521', class: '020000' };
const BRIDGE = { vendor: '8086', device: '1901', class: '060400' };

async function withHost(groups: FakeGroup[], fn: (h: FakeHost) => Promise<void>): Promise<void> {
  const host = await makeFakeHost(groups);
  try {
    await fn(host);
  } finally {
    await host.cleanup();
  }
}

test('two single-device vfio-pci groups are read with ids, class and driver, and are viable', async () => {
  await withHost(
    [
      { number: 12, devices: [{ address: '0000:01:00.0', ...GPU, driver: 'vfio-pci' }] },
      { number: 13, devices: [{ address: '0000:02:00.0', ...NIC, driver: 'vfio-pci' }] },
    ],
    async (h) => {
      const groups = await readIommuGroups(h.sysfs);
      assert.deepEqual(groups, [
        {
          number: 12,
          devices: [{ address: '0000:01:00.0', vendorId: '10de', deviceId: '1eb8', classCode: '030000', driver: 'vfio-pci', cdev: '' }],
          viable: true,
          notViableReasons: [],
        },
        {
          number: 13,
          devices: [{ address: '0000:02:00.0', vendorId: '8086', deviceId: '1521', classCode: '020000', driver: 'vfio-pci', cdev: '' }],
          viable: true,
          notViableReasons: [],
        },
      ]);
      assert.deepEqual(await readIommuGroup(h.sysfs, 13), groups[1]);
    },
  );
});

test('a group with one device on a host driver is not viable, with the exact reason', async () => {
  await withHost(
    [
      {
        number: 7,
        devices: [
          { address: '0000:01:00.0', ...GPU, driver: 'vfio-pci' },
          { address: '0000:01:00.1', ...AUDIO, driver: 'snd_hda_intel' },
        ],
      },
    ],
    async (h) => {
      const g = await readIommuGroup(h.sysfs, 7);
      assert.ok(g);
      assert.equal(g.viable, false);
      assert.deepEqual(g.notViableReasons, ['0000:01:00.1 is bound to snd_hda_intel; bind 0000:01:00.1 to vfio-pci']);
      assert.deepEqual(
        g.devices.map((d) => [d.address, d.driver]),
        [
          ['0000:01:00.0', 'vfio-pci'],
          ['0000:01:00.1', 'snd_hda_intel'],
        ],
      );
    },
  );
});

test('one reason line per offending device', async () => {
  await withHost(
    [
      {
        number: 3,
        devices: [
          { address: '0000:05:00.0', ...NIC, driver: 'igb' },
          { address: '0000:05:00.1', ...NIC, driver: 'igb' },
        ],
      },
    ],
    async (h) => {
      const g = await readIommuGroup(h.sysfs, 3);
      assert.deepEqual(g?.notViableReasons, [
        '0000:05:00.0 is bound to igb; bind 0000:05:00.0 to vfio-pci',
        '0000:05:00.1 is bound to igb; bind 0000:05:00.1 to vfio-pci',
      ]);
      assert.equal(g?.viable, false);
    },
  );
});

test('a device with no driver is viable and reports driver ""', async () => {
  await withHost(
    [
      {
        number: 4,
        devices: [
          { address: '0000:03:00.0', ...GPU },
          { address: '0000:03:00.1', ...AUDIO, driver: 'vfio-pci' },
        ],
      },
    ],
    async (h) => {
      const g = await readIommuGroup(h.sysfs, 4);
      assert.ok(g);
      assert.equal(g.devices[0].driver, '');
      assert.equal(g.viable, true);
      assert.deepEqual(g.notViableReasons, []);
    },
  );
});

test('pcieport and pci-stub leave a group viable (they set driver_managed_dma)', async () => {
  await withHost(
    [
      {
        number: 1,
        devices: [
          { address: '0000:00:1c.0', ...BRIDGE, driver: 'pcieport' },
          { address: '0000:04:00.0', ...NIC, driver: 'vfio-pci' },
        ],
      },
      { number: 2, devices: [{ address: '0000:06:00.0', ...NIC, driver: 'pci-stub' }] },
      { number: 3, devices: [{ address: '0000:07:00.0', ...NIC, driver: 'mlx5_vfio_pci' }] },
      {
        number: 5,
        devices: [
          { address: '0000:00:1d.0', ...BRIDGE, driver: 'pcieport' },
          { address: '0000:08:00.0', ...NIC, driver: 'e1000e' },
        ],
      },
    ],
    async (h) => {
      const groups = await readIommuGroups(h.sysfs);
      assert.deepEqual(
        groups.map((g) => [g.number, g.viable]),
        [
          [1, true],
          [2, true],
          [3, true],
          [5, false],
        ],
      );
      // The bridge is not blamed; only the endpoint on a host driver is.
      assert.deepEqual(groups[3].notViableReasons, ['0000:08:00.0 is bound to e1000e; bind 0000:08:00.0 to vfio-pci']);
    },
  );
});

test('isDriverVfioSafe: the driver_managed_dma set, and nothing else', () => {
  for (const d of ['', 'vfio-pci', 'pci-stub', 'pcieport', 'vfio-platform', 'vfio-fsl-mc', 'mlx5_vfio_pci', 'hisi_acc_vfio_pci', 'xe-vfio-pci', 'pds_vfio']) {
    assert.equal(isDriverVfioSafe(d), true, d);
  }
  for (const d of ['nvidia', 'snd_hda_intel', 'e1000e', 'xhci_hcd', 'nouveau', 'vfiox', 'myvfio', 'pcieport2', 'pci_stub']) {
    assert.equal(isDriverVfioSafe(d), false, d);
  }
});

test('a group number that does not exist, or is not a group number, gives undefined', async () => {
  await withHost([{ number: 0, devices: [{ address: '0000:01:00.0', ...GPU, driver: 'vfio-pci' }] }], async (h) => {
    assert.equal(await readIommuGroup(h.sysfs, 99), undefined);
    assert.equal(await readIommuGroup(h.sysfs, -1), undefined);
    assert.equal(await readIommuGroup(h.sysfs, 0.5), undefined);
    assert.equal((await readIommuGroup(h.sysfs, 0))?.number, 0);
  });
});

test('a host without IOMMU (no kernel/iommu_groups) gives [] and undefined, not an error', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'kvmvfiod-noiommu-'));
  try {
    fs.mkdirSync(path.join(dir, 'kernel'));
    assert.deepEqual(await readIommuGroups(dir), []);
    assert.equal(await readIommuGroup(dir, 0), undefined);
    assert.deepEqual(await readIommuGroups(path.join(dir, 'does-not-exist')), []);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('entries of iommu_groups that are not plain decimal numbers are ignored', async () => {
  await withHost([{ number: 2, devices: [{ address: '0000:01:00.0', ...GPU, driver: 'vfio-pci' }] }], async (h) => {
    const groupsDir = path.join(h.sysfs, 'kernel', 'iommu_groups');
    for (const name of ['foo', '3a', '-4', '02', '2.0', ' 2']) {
      fs.mkdirSync(path.join(groupsDir, name, 'devices'), { recursive: true });
      fs.symlinkSync('../../../../devices/pci0000:00/0000:01:00.0', path.join(groupsDir, name, 'devices', '0000:01:00.0'));
    }
    fs.writeFileSync(path.join(groupsDir, 'README'), 'not a group\n');
    assert.deepEqual(
      (await readIommuGroups(h.sysfs)).map((g) => g.number),
      [2],
    );
  });
});

test('groups sort numerically and devices by address', async () => {
  await withHost(
    [
      { number: 10, devices: [{ address: '0000:0a:00.0', ...NIC, driver: 'vfio-pci' }] },
      {
        number: 2,
        devices: [
          { address: '0000:03:00.1', ...AUDIO, driver: 'vfio-pci' },
          { address: '0000:03:00.0', ...GPU, driver: 'vfio-pci' },
          { address: '0000:02:00.0', ...BRIDGE, driver: 'pcieport' },
        ],
      },
      { number: 1, devices: [{ address: '0000:01:00.0', ...NIC }] },
    ],
    async (h) => {
      const groups = await readIommuGroups(h.sysfs);
      assert.deepEqual(
        groups.map((g) => g.number),
        [1, 2, 10],
      );
      assert.deepEqual(
        groups[1].devices.map((d) => d.address),
        ['0000:02:00.0', '0000:03:00.0', '0000:03:00.1'],
      );
    },
  );
});

test('a non-PCI device in a group has empty ids; a dangling member is skipped', async () => {
  await withHost([{ number: 9, devices: [{ address: '0000:01:00.0', ...GPU, driver: 'vfio-pci' }] }], async (h) => {
    const platDir = path.join(h.sysfs, 'devices', 'platform', 'fe000000.dma');
    fs.mkdirSync(platDir, { recursive: true });
    const groupDevices = path.join(h.sysfs, 'kernel', 'iommu_groups', '9', 'devices');
    fs.symlinkSync('../../../../devices/platform/fe000000.dma', path.join(groupDevices, 'fe000000.dma'));
    fs.symlinkSync('../../../../devices/pci0000:00/0000:09:00.0', path.join(groupDevices, '0000:09:00.0')); // unplugged
    const g = await readIommuGroup(h.sysfs, 9);
    assert.deepEqual(g?.devices, [
      { address: '0000:01:00.0', vendorId: '10de', deviceId: '1eb8', classCode: '030000', driver: 'vfio-pci', cdev: '' },
      { address: 'fe000000.dma', vendorId: '', deviceId: '', classCode: '', driver: '', cdev: '' },
    ]);
    assert.equal(g?.viable, true);
  });
});

test('fakehost: kernel layout, relative links, /dev/vfio nodes, and bindDriver', async () => {
  const h = await makeFakeHost(
    [{ number: 12, devices: [{ address: '0000:01:00.0', ...GPU, driver: 'nvidia' }] }],
    { vfioContainer: true },
  );
  try {
    const devDir = path.join(h.sysfs, 'devices', 'pci0000:00', '0000:01:00.0');
    assert.equal(fs.readFileSync(path.join(devDir, 'vendor'), 'utf8'), '0x10de\n');
    assert.equal(fs.readFileSync(path.join(devDir, 'class'), 'utf8'), '0x030000\n');
    const drvLink = fs.readlinkSync(path.join(devDir, 'driver'));
    assert.equal(drvLink, '../../../bus/pci/drivers/nvidia');
    const memberLink = fs.readlinkSync(path.join(h.sysfs, 'kernel', 'iommu_groups', '12', 'devices', '0000:01:00.0'));
    assert.equal(memberLink, '../../../../devices/pci0000:00/0000:01:00.0');
    assert.equal(
      fs.realpathSync(path.join(devDir, 'iommu_group')),
      fs.realpathSync(path.join(h.sysfs, 'kernel', 'iommu_groups', '12')),
    );
    for (const node of ['12', 'vfio']) {
      const st = fs.statSync(path.join(h.dev, 'vfio', node));
      assert.ok(st.isFile(), node);
      assert.equal(st.size, 0);
      assert.equal(st.mode & 0o777, 0o600);
    }

    assert.equal((await readIommuGroup(h.sysfs, 12))?.viable, false);
    await h.bindDriver('0000:01:00.0', 'vfio-pci');
    let g = await readIommuGroup(h.sysfs, 12);
    assert.equal(g?.devices[0].driver, 'vfio-pci');
    assert.equal(g?.viable, true);
    assert.ok(!fs.existsSync(path.join(h.sysfs, 'bus', 'pci', 'drivers', 'nvidia', '0000:01:00.0')));
    assert.ok(fs.existsSync(path.join(h.sysfs, 'bus', 'pci', 'drivers', 'vfio-pci', '0000:01:00.0')));
    await h.bindDriver('0000:01:00.0', null);
    g = await readIommuGroup(h.sysfs, 12);
    assert.equal(g?.devices[0].driver, '');
    await h.bindDriver('0000:01:00.0', null); // unbinding twice is harmless
    await assert.rejects(h.bindDriver('0000:99:00.0', 'vfio-pci'), /no device/);
  } finally {
    await h.cleanup();
  }
  assert.ok(!fs.existsSync(h.root));
});

test('a device bound to vfio-pci on a kernel with device cdevs names its cdev (sysfs vfio-dev/vfioN)', async () => {
  const host = await makeFakeHost(
    [
      { number: 4, devices: [{ address: '0000:00:04.0', ...NIC, driver: 'vfio-pci', cdev: 'vfio0' }] },
      { number: 5, devices: [{ address: '0000:00:05.0', ...NIC, driver: 'vfio-pci' }] },
    ],
    { iommufd: true },
  );
  try {
    const [g4, g5] = await readIommuGroups(host.sysfs);
    assert.equal(g4.devices[0].cdev, 'vfio0');
    assert.equal(g5.devices[0].cdev, '', 'no vfio-dev directory: no cdev');
    assert.ok(fs.existsSync(path.join(host.dev, 'vfio', 'devices', 'vfio0')));
    assert.ok(fs.existsSync(path.join(host.dev, 'iommu')));
    // The entry a kernel without device cdevs makes: vfio-dev/vfioN with no device number.
    fs.rmSync(path.join(host.sysfs, 'devices', 'pci0000:00', '0000:00:04.0', 'vfio-dev', 'vfio0', 'dev'));
    assert.equal((await readIommuGroup(host.sysfs, 4))!.devices[0].cdev, '', 'no dev file: no cdev');
    // Something else in vfio-dev is not a cdev name.
    fs.rmSync(path.join(host.sysfs, 'devices', 'pci0000:00', '0000:00:04.0', 'vfio-dev', 'vfio0'), { recursive: true });
    fs.mkdirSync(path.join(host.sysfs, 'devices', 'pci0000:00', '0000:00:04.0', 'vfio-dev', 'uevent'));
    assert.equal((await readIommuGroup(host.sysfs, 4))!.devices[0].cdev, '');
  } finally {
    await host.cleanup();
  }
});

test('fakehost: no vfio container node unless asked', async () => {
  await withHost([{ number: 1, devices: [{ address: '0000:01:00.0', ...GPU }] }], async (h) => {
    assert.ok(fs.existsSync(path.join(h.dev, 'vfio', '1')));
    assert.ok(!fs.existsSync(path.join(h.dev, 'vfio', 'vfio')));
  });
});

test('findFileHolders finds this process holding a file open, and not after close', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'kvmvfiod-holders-'));
  const file = path.join(dir, 'held');
  fs.writeFileSync(file, '');
  const comm = fs.readFileSync('/proc/self/comm', 'utf8').trim();
  try {
    const fd = fs.openSync(file, 'r');
    let holders: { pid: number; uid: number; comm: string }[];
    try {
      holders = await findFileHolders('/proc', file);
    } finally {
      fs.closeSync(fd);
    }
    assert.deepEqual(holders, [{ pid: process.pid, uid: process.getuid!(), comm }]);
    assert.deepEqual(await findFileHolders('/proc', file), []);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('findFileHolders on a fake /proc: once per pid, sorted, vanished entries skipped, bounded', async () => {
  const proc = fs.mkdtempSync(path.join(os.tmpdir(), 'kvmvfiod-proc-'));
  const target = '/dev/vfio/12';
  const mkProc = (pid: string, comm: string | null, links: string[], uid = 0): void => {
    fs.mkdirSync(path.join(proc, pid, 'fd'), { recursive: true });
    if (comm !== null) fs.writeFileSync(path.join(proc, pid, 'comm'), `${comm}\n`);
    if (comm !== null && pid !== '5') fs.writeFileSync(path.join(proc, pid, 'status'), `Name:\t${comm}\nUmask:\t0022\nUid:\t${uid}\t${uid}\t${uid}\t${uid}\n`);
    links.forEach((l, i) => fs.symlinkSync(l, path.join(proc, pid, 'fd', String(i))));
  };
  try {
    mkProc('300', 'qemu', ['/dev/null', target, target], 65534);
    mkProc('20', 'cloud-hypervisor', ['/dev/vfio/121', target], 1000);
    mkProc('5', 'init', ['/dev/null', '/dev/vfio/1']);
    mkProc('44', null, [target]); // exited before its comm was read
    fs.mkdirSync(path.join(proc, '77')); // no fd dir: exited mid-scan
    mkProc('self', 'ignored', [target]);
    fs.writeFileSync(path.join(proc, 'uptime'), '1 1\n');

    assert.deepEqual(await findFileHolders(proc, target), [
      { pid: 20, uid: 1000, comm: 'cloud-hypervisor' },
      { pid: 300, uid: 65534, comm: 'qemu' },
    ]);
    // No status file (unreadable): the uid is unknown (-1), the holder still named.
    assert.deepEqual(await findFileHolders(proc, '/dev/vfio/1'), [{ pid: 5, uid: -1, comm: 'init' }]);
    // pid 5 has 2 fds, pid 20 has its match at fd 1: a budget of 3 stops just short of it.
    assert.deepEqual(await findFileHolders(proc, target, { maxFds: 3 }), []);
    assert.deepEqual(await findFileHolders(proc, target, { maxFds: 4 }), [{ pid: 20, uid: 1000, comm: 'cloud-hypervisor' }]);
  } finally {
    fs.rmSync(proc, { recursive: true, force: true });
  }
});

test('the real /sys gives an array of numbered groups', async () => {
  const groups = await readIommuGroups('/sys');
  assert.ok(Array.isArray(groups));
  for (const g of groups) {
    assert.ok(Number.isSafeInteger(g.number) && g.number >= 0);
    assert.ok(Array.isArray(g.devices));
    assert.equal(g.viable, g.notViableReasons.length === 0);
  }
  assert.deepEqual(
    groups.map((g) => g.number),
    [...groups.map((g) => g.number)].sort((a, b) => a - b),
  );
});
