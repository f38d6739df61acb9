/**
 * AddGroup and RemoveGroup on QEMU 10 seen from its guest: an L2 Linux
 * inside the QEMU that `kvmvfioctl attach` runs as uid 65534 in the VFIO
 * lane's guest. TCG for the L2 (nested KVM L2s hang after smpboot on this
 * lane's TCG L1, labs/qmp-hotplug), q35's ACPI hot-plug, and QEMU started
 * with no VFIO object at all: the daemon makes the iommufd object over QMP.
 * The guest's own sysfs, polled by its /init (test/vfio/l2-init.sh) and
 * printed on its serial console, lists 1234:11e8 after AddGroup and not
 * after RemoveGroup, which answers OK once the guest let go. ~2.5-4 min,
 * nearly all of it the L2's boot; its console is kept in the lane's
 * results (run/share/l2/serial.log). Skips without the L2 kernel and
 * initramfs (KVMVFIO_LANE_L2=0), and where hotplug.test.ts skips.
 */
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { KvmVfioApi } from '../../src/client/client';
import { startDaemon, type RunningDaemon } from '../helpers/daemon';
import type { VmmProc } from '../helpers/vmmproc';
import { qmp } from '../helpers/qmp';
import { loadGuestGroups, singleDeviceGroups } from './guest-groups';
import { L2_INITRD, L2_KERNEL, client, skipL2, startQemu, until, vfioFdsOf } from './qemu-hotplug';

describe('AddGroup/RemoveGroup on QEMU 10 seen from its guest: an L2 Linux (TCG), ACPI hot-plug', { skip: skipL2 }, () => {
  let d: RunningDaemon;
  let c: KvmVfioApi;
  let work: string;
  const procs: VmmProc[] = [];

  before(async () => {
    d = await startDaemon({ args: ['--vmm-timeout-ms', '60000', '--vmm-exit-grace-ms', '30000', '--hot-unplug-timeout-ms', '60000'], readyTimeoutMs: 60_000 });
    c = client(d);
    work = mkdtempSync(join(tmpdir(), 'kvmvfiod-hotplug-l2-'));
    chmodSync(work, 0o777);
  });

  after(async () => {
    for (const p of procs) p.kill();
    await Promise.all(procs.map((p) => p.exit));
    await d?.cleanup();
    rmSync(work, { recursive: true, force: true });
  });

  test('AddGroup → the guest\'s sysfs lists 1234:11e8; RemoveGroup → gone in the guest, OK in gRPC; QEMU had no VFIO object at start', { timeout: 600_000 }, async (t) => {
    const edu = singleDeviceGroups(loadGuestGroups()).find((g) => g.devices[0].vendorId === '1234' && g.devices[0].deviceId === '11e8' && g.devices[0].cdev)!;
    assert.ok(edu);
    // Complete lines only, each from its "kvmvfio-l2:" on (SeaBIOS leaves escape sequences before the first).
    const lines = (file: string): string[] =>
      existsSync(file)
        ? readFileSync(file, 'utf8')
            .split('\n')
            .slice(0, -1)
            .map((l) => l.slice(Math.max(0, l.indexOf('kvmvfio-l2:'))).replace(/\r$/, ''))
        : [];
    const t0 = Date.now();
    // TCG for the L2 (not the daemon's /dev/kvm), and no iommufd object: the daemon makes it over QMP.
    // The console goes to the lane's results, where it outlives the guest.
    const results = process.env.KVMVFIO_GUEST_RESULTS;
    let serial: string | undefined;
    if (results) {
      mkdirSync(join(results, 'l2'), { recursive: true });
      chmodSync(join(results, 'l2'), 0o777);
      serial = join(results, 'l2', 'serial.log');
      rmSync(serial, { force: true });
    }
    const q = await startQemu(c, d, work, procs, 'hp-l2', {
      ports: 2,
      serial,
      memMb: 192,
      drop: (a) => a.startsWith('fd={kvm}') || a.startsWith('kvm,device=') || a.startsWith('iommufd,id=kvmvfiod-iommufd'),
      extra: ['-accel', 'tcg', '-no-reboot', '-kernel', L2_KERNEL!, '-initrd', L2_INITRD!, '-append', 'console=ttyS0 loglevel=3 panic=-1'],
    });
    const objects = async () => ((await qmp(q.monitor, 'qom-list', 30_000, { path: '/objects' })) as { name: string }[]).map((o) => o.name);
    assert.ok(!(await objects()).includes('kvmvfiod-iommufd'), 'no iommufd object at start');
    // The iommufd attach handed over, inherited but unused by this command line.
    assert.deepEqual(vfioFdsOf(q.proc.pid), ['/dev/iommu']);
    const init = await until('the L2 guest at /init', async () => lines(q.serial).find((l) => l.includes('kvmvfio-l2: init')), 480_000);
    t.diagnostic(`L2 at /init ${((Date.now() - t0) / 1000).toFixed(1)} s after QEMU started (${init})`);
    await until('its first PCI listing', async () => lines(q.serial).some((l) => l.includes('kvmvfio-l2: pci ')), 120_000);

    const mark = lines(q.serial).length;
    let t1 = Date.now();
    await c.addGroup({ vm_id: q.id, group: edu.number });
    const added = Date.now() - t1;
    const seen = await until('1234:11e8 in the guest', async () => lines(q.serial).slice(mark).find((l) => l.includes('kvmvfio-l2: pci ') && l.includes('=1234:11e8')), 120_000);
    t.diagnostic(`AddGroup ${added} ms; the guest listed 1234:11e8 ${Date.now() - t1} ms after the call: ${seen}`);
    assert.ok((await objects()).includes('kvmvfiod-iommufd'), 'the daemon made the iommufd object over QMP');
    assert.deepEqual(vfioFdsOf(q.proc.pid), ['/dev/iommu', '/dev/iommu', `/dev/vfio/devices/${edu.devices[0].cdev}`], "the inherited iommufd, the object's, and the cdev");
    assert.deepEqual(vfioFdsOf(d.pid), []);

    const mark2 = lines(q.serial).length;
    t1 = Date.now();
    assert.deepEqual((await c.removeGroup({ vm_id: q.id, group: edu.number })).groups, []);
    const removed = Date.now() - t1;
    const gone = await until('1234:11e8 gone in the guest', async () => lines(q.serial).slice(mark2).find((l) => l.includes('kvmvfio-l2: pci ') && !l.includes('=1234:11e8')), 120_000);
    t.diagnostic(`RemoveGroup OK in ${removed} ms (the guest acknowledged the ACPI eject); the guest's list without it ${Date.now() - t1} ms after the call: ${gone}`);
    assert.equal((await c.getIommuGroup(edu.number)).holding, 'GROUP_HOLDING_FREE');
    assert.deepEqual(vfioFdsOf(q.proc.pid), ['/dev/iommu', '/dev/iommu']);
    await c.deleteVm({ vm_id: q.id });
    await q.proc.exit;
  });
});
