/**
 * An unmodified QEMU 10 (Debian's, from bookworm-backports) takes a real
 * VFIO device from kvmvfiod, in the lane's nested guest with vfio and
 * iommufd rebuilt for device cdevs: uid 65534, no access to /dev/kvm,
 * /dev/iommu or /dev/vfio, given only fds — /dev/kvm, a fresh iommufd and
 * the edu device's cdev — through `kvmvfioctl attach`, with the arguments of
 * `kvmvfioctl vm args --vmm qemu`. QMP's query-pci shows the device (vendor
 * 0x1234, device 0x11e8) and query-kvm KVM (nested, inside the TCG guest).
 * After DeleteVm the device is back and a VMM of a new VM uses it (group
 * handoff: container, DMA map).
 *
 * Skips outside the guest, without /dev/iommu, or without QEMU 10
 * (KVMVFIO_QEMU, passed in by test/vfio/lane.sh from the QEMU lane's cache).
 */
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { chmodSync, existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { KvmVfioApi } from '../../src/client/client';
import { CLI_JS, startDaemon, type RunningDaemon } from '../helpers/daemon';
import { buildCVmm } from '../helpers/cvmm';
import { collectJsonLines, runVmm, type VmmProc } from '../helpers/vmmproc';
import { qmp } from '../helpers/qmp';
import { until as untilShort } from '../helpers/assert';
import { IN_VFIO_GUEST } from './guest-groups';

const QEMU = process.env.KVMVFIO_QEMU;
const skip = !IN_VFIO_GUEST
  ? 'not in the VFIO guest (run npm run test:vfio)'
  : !existsSync('/dev/iommu')
    ? "no /dev/iommu: the guest runs Debian's vfio modules (KVMVFIO_LANE_CDEV=0)"
    : !QEMU
      ? 'no QEMU 10 (KVMVFIO_QEMU; the QEMU lane fetches it: npm run test:qemu)'
      : false;
const until = <T>(what: string, fn: () => Promise<T | undefined | false>) => untilShort(what, fn, 90_000);
const NOBODY = ['setpriv', '--reuid=65534', '--regid=65534', '--clear-groups', '--inh-caps=-all', '--bounding-set=-all'];


interface PciDev {
  bus: number;
  slot: number;
  qdev_id: string;
  id: { vendor: number; device: number };
  pci_bridge?: { devices?: PciDev[] };
}

describe('QEMU 10 takes a real VFIO device from kvmvfiod (device-cdev handoff)', { skip }, () => {
  let d: RunningDaemon;
  let c: KvmVfioApi;
  let work: string;
  const procs: VmmProc[] = [];

  before(async () => {
    d = await startDaemon({ args: ['--vmm-exit-grace-ms', '30000'] });
    c = d.client();
    work = mkdtempSync(join(tmpdir(), 'kvmvfiod-qemu-'));
    chmodSync(work, 0o777);
  });

  after(async () => {
    for (const p of procs) p.kill();
    await d?.cleanup();
    rmSync(work, { recursive: true, force: true });
  });

  test('QEMU as uid 65534 realizes vfio-pci from the fds kvmvfiod hands it; the device is back for the next VM', async (t) => {
    const { groups } = await c.listIommuGroups();
    const edu = groups.find((g) => g.viable && g.devices.length === 1 && g.devices[0].vendor_id === '1234' && g.devices[0].device_id === '11e8' && g.devices[0].cdev);
    assert.ok(edu, `a viable group holding the edu with a cdev: ${JSON.stringify(groups.map((g) => [g.number, g.devices.map((x) => [x.address, x.vendor_id, x.cdev])]))}`);
    const address = edu.devices[0].address;

    const { vm, attach_token } = await c.createVm({
      name: 'qemu-edu',
      vmm_uid: 65534,
      vfio_device: true,
      groups: [edu.number],
      vfio_handoff: 'VFIO_HANDOFF_CDEV',
      memlock_bytes: String(256 << 20), // guest RAM is pinned (iommufd charges it to the user)
    });
    const argsRun = spawn(process.execPath, [CLI_JS, '--socket', d.apiSocket, '--json', 'vm', 'args', 'qemu-edu', '--vmm', 'qemu'], { stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    argsRun.stdout!.on('data', (b: Buffer) => (out += b.toString()));
    assert.equal(await new Promise((r) => argsRun.once('exit', r)), 0);
    const { args } = JSON.parse(out) as { args: string[] };
    // On a root port of its own (kvmvfiod-port-1), so that RemoveGroup can hot-unplug it.
    assert.ok(args.includes(`vfio-pci,iommufd=kvmvfiod-iommufd,fd={device:${address}},bus=kvmvfiod-port-1,id=kvmvfiod-${address.replace(/:/g, '-')}`), JSON.stringify(args));

    const qmpSocket = join(work, 'qmp.sock');
    const t0 = Date.now();
    const argv = [
      ...NOBODY, process.execPath, CLI_JS, 'attach', '--handoff', join(d.runtimeDir, 'handoff.sock'), '--',
      QEMU!, ...args,
      '-machine', 'q35', '-cpu', 'qemu64', '-m', '64', '-nodefaults', '-nographic', '-display', 'none', '-monitor', 'none',
      // Not -S: QEMU lists a device behind a root port only once the firmware numbered the port's bus.
      '-serial', 'none', '-no-user-config', '-qmp', `unix:${qmpSocket},server=on,wait=off`,
    ];
    const qemu = collectJsonLines(spawn(argv[0], argv.slice(1), { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, KVMVFIO_TOKEN: attach_token!.token } }));
    procs.push(qemu);
    // The device sits behind its root port: walk the bridges too, until the firmware numbered the port's bus.
    const listed = (pci: { devices: PciDev[] }[]): PciDev[] => {
      const out: PciDev[] = [];
      const walk = (ds: PciDev[] | undefined) => ds?.forEach((x) => (out.push(x), walk(x.pci_bridge?.devices)));
      for (const b of pci) walk(b.devices);
      return out;
    };
    let devices: PciDev[] = [];
    const hostdev = await until('QMP query-pci listing the device', async () => {
      if (!existsSync(qmpSocket)) return qemu.proc.exitCode === null ? false : assert.fail(`QEMU exited: ${qemu.stderr()}`);
      const pci = (await qmp(qmpSocket, 'query-pci').catch(() => undefined)) as { devices: PciDev[] }[] | undefined;
      devices = pci ? listed(pci) : [];
      return devices.find((x) => x.qdev_id === `kvmvfiod-${address.replace(/:/g, '-')}`);
    });
    t.diagnostic(`QMP's query-pci listed the device ${Date.now() - t0} ms after kvmvfioctl attach started`);
    assert.ok(hostdev, JSON.stringify(devices.map((x) => [x.qdev_id, x.id])));
    assert.deepEqual([hostdev.id.vendor, hostdev.id.device], [0x1234, 0x11e8]);
    assert.deepEqual(await qmp(qmpSocket, 'query-kvm'), { enabled: true, present: true });
    const running = await c.getVm(vm!.id);
    assert.equal(running.state, 'VM_STATE_RUNNING');
    assert.equal(running.vmm_pid, qemu.pid);
    const held = await c.getIommuGroup(edu.number);
    assert.deepEqual([held.holding, held.open_in_daemon], ['GROUP_HOLDING_VMM', false]);

    await c.deleteVm({ vm_id: vm!.id });
    await qemu.exit;
    await until('the group back in the pool', async () => (await c.getIommuGroup(edu.number)).holding === 'GROUP_HOLDING_FREE');

    // The device is clean for the next VM: a group-handoff VMM sets a container on it and maps DMA.
    process.env.KVMVFIO_USE_VFIO = '1';
    const next = await c.createVm({ name: 'after-qemu', vmm_uid: 65534, vfio_device: true, vfio_handoff: 'VFIO_HANDOFF_GROUP', groups: [edu.number], memlock_bytes: String(64 << 20) });
    const w = runVmm([await buildCVmm(), join(d.runtimeDir, 'handoff.sock')], next.attach_token!.token);
    procs.push(w);
    const use = await until('vfio-use', async () => w.events.find((e) => e.event === 'vfio-use' && e.group === edu.number));
    assert.equal(use.ok, true, JSON.stringify(use));
    assert.equal(use.dma, true);
    await c.deleteVm({ vm_id: next.vm!.id });
  });
});
