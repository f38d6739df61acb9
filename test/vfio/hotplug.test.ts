/**
 * AddGroup and RemoveGroup on an unmodified QEMU 10 (Debian's) run by
 * `kvmvfioctl attach` as uid 65534, in the lane's guest with real VFIO
 * devices: the daemon drives QEMU's monitor ({qmp}, one end of a socketpair)
 * and hands it each fd with SCM_RIGHTS. Each test also opens a monitor of its
 * own on QEMU (-qmp unix:…) to see what QEMU sees.
 *
 * - guest-less QEMU on nested KVM with native PCIe hot-plug (QEMU unplugs at
 *   once when no guest ever powered the slot): AddGroup → query-pci shows
 *   1234:11e8; RemoveGroup → OK after DEVICE_DELETED, QEMU still running;
 *   the group goes to another VM whose VMM binds the device and maps DMA;
 *   then back into the first QEMU.
 * - negative cases: a device bound elsewhere, no free port: each its status,
 *   no fd of it left in QEMU or in the daemon.
 * - guest-less QEMU with ACPI hot-plug (q35's default), which needs the
 *   guest's acknowledgement: RemoveGroup is DEADLINE_EXCEEDED, the group stays
 *   held (the kernel's witness: its group file does not open), and is free
 *   once QEMU exits.
 * - an L2 Linux inside QEMU (TCG: nested KVM L2s hang on this lane's TCG
 *   L1, labs/qmp-hotplug), ACPI hot-plug, QEMU started with no VFIO object
 *   (the daemon makes the iommufd object over QMP): the guest's own sysfs
 *   (its serial console) lists 1234:11e8 after AddGroup and not after
 *   RemoveGroup. ~2.5 min, most of it the L2's boot.
 *
 * Skips outside the guest, without /dev/iommu or QEMU 10; the L2 test also
 * without the L2 kernel and initramfs (KVMVFIO_LANE_L2=0).
 */
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { chmodSync, existsSync, mkdtempSync, readFileSync, readdirSync, readlinkSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { status } from '@grpc/grpc-js';
import { KvmVfioApi } from '../../src/client/client';
import { Iommufd, VfioDeviceCdev } from '../../src/kernel';
import { CLI_JS, startDaemon, type RunningDaemon } from '../helpers/daemon';
import { REFERENCE_VMM, collectJsonLines, runVmm, type VmmProc } from '../helpers/vmmproc';
import { qmp } from '../helpers/qmp';
import { expectStatus, until as untilShort } from '../helpers/assert';
import { IN_VFIO_GUEST, loadGuestGroups, singleDeviceGroups, type GuestGroup } from './guest-groups';

const QEMU = process.env.KVMVFIO_QEMU;
const L2_KERNEL = process.env.KVMVFIO_L2_KERNEL;
const L2_INITRD = process.env.KVMVFIO_L2_INITRD;
const skip = !IN_VFIO_GUEST
  ? 'not in the VFIO guest (run npm run test:vfio)'
  : !existsSync('/dev/iommu')
    ? "no /dev/iommu: the guest runs Debian's vfio modules (KVMVFIO_LANE_CDEV=0)"
    : !QEMU
      ? 'no QEMU 10 (KVMVFIO_QEMU; the QEMU lane fetches it: npm run test:qemu)'
      : false;
const skipL2 = skip || (!L2_KERNEL || !L2_INITRD ? 'no L2 kernel and initramfs (KVMVFIO_LANE_L2=0)' : false);
const until = <T>(what: string, fn: () => Promise<T | undefined | false>, ms = 90_000) => untilShort(what, fn, ms);
const NOBODY = ['setpriv', '--reuid=65534', '--regid=65534', '--clear-groups', '--inh-caps=-all', '--bounding-set=-all'];
/** A client whose calls may take a minute: a hot-plug's time is the guest's (TCG in TCG here), and the daemon's deadlines are what is tested. */
const clients: KvmVfioApi[] = [];
function client(d: RunningDaemon): KvmVfioApi {
  const c = new KvmVfioApi(d.apiSocket, { timeoutMs: 120_000 });
  clients.push(c);
  return c;
}
after(() => {
  for (const c of clients) c.close();
});
/** q35's ACPI PCI hot-plug off: native PCIe hot-plug on the root ports. */
const NATIVE = ['-global', 'ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off'];

interface PciDev {
  qdev_id: string;
  id: { vendor: number; device: number };
  pci_bridge?: { devices?: PciDev[] };
}

/** Every device QEMU's query-pci lists, behind bridges too, as "qdev_id=vvvv:dddd". */
function pciList(pci: { devices: PciDev[] }[]): string[] {
  const out: string[] = [];
  const walk = (ds: PciDev[] | undefined) => {
    for (const d of ds ?? []) {
      out.push(`${d.qdev_id}=${d.id.vendor.toString(16).padStart(4, '0')}:${d.id.device.toString(16).padStart(4, '0')}`);
      walk(d.pci_bridge?.devices);
    }
  };
  for (const b of pci) walk(b.devices);
  return out;
}

/** What process `pid` holds open among device cdevs and iommufds. */
function vfioFdsOf(pid: number): string[] {
  const out: string[] = [];
  for (const n of readdirSync(`/proc/${pid}/fd`)) {
    try {
      const t = readlinkSync(`/proc/${pid}/fd/${n}`);
      if (t.startsWith('/dev/vfio/devices/') || t === '/dev/iommu') out.push(t);
    } catch {
      /* closed meanwhile */
    }
  }
  return out.sort();
}

const cdevOf = (g: GuestGroup) => `/dev/vfio/devices/${g.devices[0].cdev}`;
const qemuId = (g: GuestGroup) => `kvmvfiod-${g.devices[0].address.replace(/:/g, '-')}`;

interface Qemu {
  id: string;
  proc: VmmProc;
  monitor: string;
  serial: string;
  pci(): Promise<string[]>;
}

/** Runs QEMU 10 under kvmvfioctl attach for a new cdev VM, with `vm args` (less `drop`, plus `extra`). */
async function startQemu(
  c: KvmVfioApi,
  d: RunningDaemon,
  work: string,
  procs: VmmProc[],
  name: string,
  o: { ports: number; extra: string[]; drop?: (a: string) => boolean; memMb?: number },
): Promise<Qemu> {
  const mem = o.memMb ?? 64;
  const { vm, attach_token } = await c.createVm({ name, vmm_uid: 65534, vfio_device: true, vfio_handoff: 'VFIO_HANDOFF_CDEV', memlock_bytes: String((mem + 256) << 20) });
  const run = spawn(process.execPath, [CLI_JS, '--socket', d.apiSocket, '--json', 'vm', 'args', name, '--vmm', 'qemu', '--hotplug-ports', String(o.ports)], { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  run.stdout!.on('data', (b: Buffer) => (out += b.toString()));
  assert.equal(await new Promise((r) => run.once('exit', r)), 0);
  const { args } = JSON.parse(out) as { args: string[] };
  assert.ok(args.includes('socket,id=kvmvfiod-qmp,fd={qmp}'), JSON.stringify(args));
  const kept: string[] = [];
  for (let i = 0; i < args.length; i += 2) if (!o.drop?.(args[i + 1])) kept.push(args[i], args[i + 1]);
  const monitor = join(work, `${name}.qmp`);
  const serial = join(work, `${name}.serial`);
  const argv = [
    ...NOBODY, process.execPath, CLI_JS, 'attach', '--handoff', join(d.runtimeDir, 'handoff.sock'), '--',
    QEMU!, ...kept,
    '-machine', 'q35', '-cpu', 'qemu64', '-m', String(mem), '-smp', '1', '-nodefaults', '-nographic', '-display', 'none', '-monitor', 'none',
    '-no-user-config', '-serial', `file:${serial}`, '-qmp', `unix:${monitor},server=on,wait=off`, ...o.extra,
  ];
  const proc = collectJsonLines(spawn(argv[0], argv.slice(1), { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, KVMVFIO_TOKEN: attach_token!.token } }));
  procs.push(proc);
  await until(`${name}: its monitor`, async () => {
    if (proc.proc.exitCode !== null) assert.fail(`QEMU ${name} exited: ${proc.stderr()}`);
    return existsSync(monitor) && (await qmp(monitor, 'query-status').catch(() => undefined));
  });
  await until(`${name} RUNNING`, async () => (await c.getVm(vm!.id)).state === 'VM_STATE_RUNNING');
  return { id: vm!.id, proc, monitor, serial, pci: async () => pciList((await qmp(monitor, 'query-pci')) as { devices: PciDev[] }[]) };
}

describe('AddGroup/RemoveGroup on QEMU 10 by QMP hot-plug, no guest OS', { skip }, () => {
  let d: RunningDaemon;
  let c: KvmVfioApi;
  let work: string;
  let edu: GuestGroup;
  let other: GuestGroup;
  const procs: VmmProc[] = [];
  const holding = async (g: GuestGroup) => (await c.getIommuGroup(g.number)).holding;

  before(async () => {
    d = await startDaemon({ args: ['--vmm-timeout-ms', '30000', '--vmm-exit-grace-ms', '30000', '--hot-unplug-timeout-ms', '4000'], readyTimeoutMs: 60_000 });
    c = client(d);
    work = mkdtempSync(join(tmpdir(), 'kvmvfiod-hotplug-'));
    chmodSync(work, 0o777);
    const singles = singleDeviceGroups(loadGuestGroups()).filter((g) => g.devices[0].cdev);
    edu = singles.find((g) => g.devices[0].vendorId === '1234' && g.devices[0].deviceId === '11e8')!;
    other = singles.find((g) => g !== edu)!;
    assert.ok(edu && other, `the edu and another single-device group with cdevs: ${JSON.stringify(singles.map((g) => g.number))}`);
  });

  after(async () => {
    for (const p of procs) p.kill();
    await Promise.all(procs.map((p) => p.exit));
    await d?.cleanup();
    rmSync(work, { recursive: true, force: true });
  });

  test('native hot-plug: AddGroup → QEMU lists 1234:11e8; RemoveGroup → OK after DEVICE_DELETED, QEMU runs on; the device binds in another VM, then goes back into the same QEMU', async (t) => {
    const a = await startQemu(c, d, work, procs, 'hp-native', { ports: 2, extra: NATIVE });
    assert.deepEqual(vfioFdsOf(a.proc.pid), ['/dev/iommu'], 'QEMU starts with its iommufd and no device');
    let t0 = Date.now();
    assert.deepEqual((await c.addGroup({ vm_id: a.id, group: edu.number })).groups, [edu.number]);
    t.diagnostic(`AddGroup answered in ${Date.now() - t0} ms`);
    assert.ok((await a.pci()).includes(`${qemuId(edu)}=1234:11e8`), JSON.stringify(await a.pci()));
    assert.deepEqual(vfioFdsOf(a.proc.pid), ['/dev/iommu', cdevOf(edu)]);
    assert.deepEqual(vfioFdsOf(d.pid), [], 'the daemon keeps no copy of the cdev');
    assert.equal(await holding(edu), 'GROUP_HOLDING_VMM');

    t0 = Date.now();
    assert.deepEqual((await c.removeGroup({ vm_id: a.id, group: edu.number })).groups, []);
    t.diagnostic(`RemoveGroup (device_del → DEVICE_DELETED → witness) answered in ${Date.now() - t0} ms`);
    // OK means the daemon's own open of the group succeeded: no bound copy of the cdev is left anywhere.
    assert.equal(await holding(edu), 'GROUP_HOLDING_FREE');
    assert.ok(!(await a.pci()).some((x) => x.endsWith('=1234:11e8')));
    assert.deepEqual(vfioFdsOf(a.proc.pid), ['/dev/iommu']);
    assert.deepEqual(await qmp(a.monitor, 'query-status'), { running: true, status: 'running' });

    // The next VM's VMM binds the device, attaches it to its IOAS and maps DMA.
    const b = await c.createVm({ name: 'after-hotplug', vmm_uid: 65534, vfio_device: true, groups: [edu.number], vfio_handoff: 'VFIO_HANDOFF_CDEV', memlock_bytes: String(64 << 20) });
    const v = runVmm([process.execPath, REFERENCE_VMM, '--socket', join(d.runtimeDir, 'handoff.sock')], b.attach_token!.token, true, { env: { KVMVFIO_USE_VFIO: '1' } });
    procs.push(v);
    const use = await until('vfio-use in the next VM', async () => v.events.find((e) => e.event === 'vfio-use' && e.device === edu.devices[0].address));
    assert.equal(use.ok, true, JSON.stringify(use));
    assert.equal(use.dma, true);
    await c.deleteVm({ vm_id: b.vm!.id });
    await until('free after the second VM', async () => (await holding(edu)) === 'GROUP_HOLDING_FREE');

    // And back into the first QEMU, which kept running.
    t0 = Date.now();
    await c.addGroup({ vm_id: a.id, group: edu.number });
    t.diagnostic(`AddGroup into the same QEMU again in ${Date.now() - t0} ms`);
    assert.ok((await a.pci()).includes(`${qemuId(edu)}=1234:11e8`));
    await c.deleteVm({ vm_id: a.id });
    await a.proc.exit;
    await until('free after QEMU exited', async () => (await holding(edu)) === 'GROUP_HOLDING_FREE');
  });

  test('negative cases: a device bound elsewhere is FAILED_PRECONDITION, a QEMU without a free port RESOURCE_EXHAUSTED; no fd of them in QEMU or the daemon', async () => {
    // Runs after the native test, which leaves `other` alone (see below).
    const q = await startQemu(c, d, work, procs, 'hp-negative', { ports: 1, extra: NATIVE });
    // Another process (this one, root) binds the device to its own iommufd. It can only while no one
    // holds the group file: this daemon has not claimed that group yet (a free group it claimed once,
    // it keeps open, and then this bind would be EBUSY).
    assert.equal((await c.getIommuGroup(other.number)).open_in_daemon, false, 'the earlier tests left this group alone');
    const ictx = await Iommufd.open('/dev');
    const cdev = await VfioDeviceCdev.open(cdevOf(other));
    cdev.bindIommufd(ictx.fd);
    try {
      await expectStatus(c.addGroup({ vm_id: q.id, group: other.number }), status.FAILED_PRECONDITION, new RegExp(`IOMMU group ${other.number} is busy.*pid ${process.pid}`));
      assert.deepEqual(vfioFdsOf(q.proc.pid), ['/dev/iommu'], 'nothing reached QEMU');
      assert.deepEqual(vfioFdsOf(d.pid), []);
      assert.deepEqual((await c.getVm(q.id)).groups, []);
      assert.equal((await c.getIommuGroup(other.number)).holding, 'GROUP_HOLDING_FREE');
    } finally {
      await cdev.close();
      await ictx.close();
    }

    // Its one port taken, QEMU has none for a second device.
    await c.addGroup({ vm_id: q.id, group: edu.number });
    await expectStatus(c.addGroup({ vm_id: q.id, group: other.number }), status.RESOURCE_EXHAUSTED, /every hot-plug port is taken \(kvmvfiod-port-1\)/);
    assert.deepEqual(vfioFdsOf(q.proc.pid), ['/dev/iommu', cdevOf(edu)], `QEMU holds no cdev of ${other.devices[0].address}`);
    assert.deepEqual(vfioFdsOf(d.pid), []);
    assert.equal(await holding(other), 'GROUP_HOLDING_FREE');
    assert.deepEqual((await c.getVm(q.id)).groups, [edu.number]);
    await c.removeGroup({ vm_id: q.id, group: edu.number });
    await c.deleteVm({ vm_id: q.id });
    await q.proc.exit;
  });

  test('ACPI hot-plug and no guest to acknowledge: RemoveGroup is DEADLINE_EXCEEDED, the group stays held (the kernel says so); free once QEMU exits', async (t) => {
    const q = await startQemu(c, d, work, procs, 'hp-acpi-deaf', { ports: 1, extra: [] });
    await c.addGroup({ vm_id: q.id, group: edu.number });
    const t0 = Date.now();
    await expectStatus(c.removeGroup({ vm_id: q.id, group: edu.number }), status.DEADLINE_EXCEEDED, /did not let go of device .* within 4000 ms/);
    t.diagnostic(`DEADLINE_EXCEEDED after ${Date.now() - t0} ms`);
    assert.deepEqual((await c.getVm(q.id)).groups, [edu.number], 'the record is unchanged');
    assert.equal(await holding(edu), 'GROUP_HOLDING_VMM');
    assert.deepEqual(vfioFdsOf(q.proc.pid), ['/dev/iommu', cdevOf(edu)], 'QEMU still has the device');
    // Not the daemon's bookkeeping only: the group file does not open while QEMU's cdev is bound.
    await expectStatus(c.createVm({ name: 'wants-edu', vmm_uid: 65534, vfio_device: true, groups: [edu.number], vfio_handoff: 'VFIO_HANDOFF_CDEV' }), status.FAILED_PRECONDITION, /held by vm hp-acpi-deaf/);
    assert.deepEqual(await qmp(q.monitor, 'quit'), {});
    await q.proc.exit;
    const t1 = Date.now();
    await until('free once QEMU exited', async () => (await holding(edu)) === 'GROUP_HOLDING_FREE');
    t.diagnostic(`group free ${Date.now() - t1} ms after QEMU exited`);
    assert.equal((await c.getVm(q.id)).state, 'VM_STATE_EXITED');
    await c.deleteVm({ vm_id: q.id });
  });
});

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
    const lines = (file: string): string[] => (existsSync(file) ? readFileSync(file, 'utf8').split('\n').map((l) => l.replace(/\r$/, '')) : []);
    const t0 = Date.now();
    // TCG for the L2 (not the daemon's /dev/kvm), and no iommufd object: the daemon makes it over QMP.
    const q = await startQemu(c, d, work, procs, 'hp-l2', {
      ports: 2,
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
