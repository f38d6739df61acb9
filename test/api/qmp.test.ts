/**
 * AddGroup and RemoveGroup on a passive QEMU VM, end to end without QEMU: a
 * real daemon on a fake host, the built `kvmvfioctl attach` as uid 65534
 * with `{qmp}` on the command line, and test/helpers/fakeqemu.js as the
 * "QEMU" it execs, which serves QMP on that fd as QEMU 10 was measured to
 * (test/helpers/fakeqmp.ts) and reports every command and the fds it holds.
 * What needs the kernel's witness of a real device (a bound cdev keeps its
 * group busy) and a real QEMU and guest is in the VFIO lane
 * (test/vfio/hotplug.test.ts).
 */
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readdir, readlink } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { status } from '@grpc/grpc-js';
import type { KvmVfioApi } from '../../src/client/client';
import { SeqpacketSocket, StreamSocket } from '../../src/kernel';
import { AttachError, VmmSession } from '../../src/vmm/session';
import { FdKind, MsgType, encode } from '../../src/protocol/session';
import { makeFakeHost, type FakeHost } from '../helpers/fakehost';
import { CLI_JS, REPO, startDaemon, type RunningDaemon } from '../helpers/daemon';
import { NOBODY, type VmmProc, type VmmEvent, collectJsonLines } from '../helpers/vmmproc';
import { expectStatus, until } from '../helpers/assert';
import type { FakeQmpOptions } from '../helpers/fakeqmp';

const FAKE_QEMU = join(REPO, 'dist', 'test', 'helpers', 'fakeqemu.js');
const NOBODY_UID = 65534;
const UNPLUG_MS = 1500;
const group = (n: number) => ({ number: n, devices: [{ address: `0000:00:${String(n).padStart(2, '0')}.0`, vendor: '1234', device: '11e8', class: '00ff00', driver: 'vfio-pci', cdev: `vfio${n}` }] });
const qemuId = (n: number) => `kvmvfiod-0000-00-${String(n).padStart(2, '0')}.0`;
const PORTS = ['kvmvfiod-port-1', 'kvmvfiod-port-2'];

describe('AddGroup and RemoveGroup on a passive QEMU, through its QMP monitor', () => {
  let host: FakeHost;
  let d: RunningDaemon;
  let c: KvmVfioApi;
  let handoff: string;
  const procs: VmmProc[] = [];

  before(async () => {
    host = await makeFakeHost([21, 22, 23, 24, 25, 26].map(group), { iommufd: true });
    d = await startDaemon({ sysfs: host.sysfs, dev: host.dev, args: ['--hot-unplug-timeout-ms', String(UNPLUG_MS), '--vmm-timeout-ms', '5000'] });
    c = d.client();
    handoff = join(d.runtimeDir, 'handoff.sock');
  });

  after(async () => {
    for (const p of procs) p.kill();
    await Promise.all(procs.map((p) => p.exit));
    await d?.cleanup();
    await host?.cleanup();
  });

  const cdevPath = (n: number) => join(host.dev, 'vfio', 'devices', `vfio${n}`);

  /** The device cdevs and iommufds the daemon process has open (a free group's own file it keeps: the pool). */
  async function daemonDevFds(): Promise<string[]> {
    const dir = `/proc/${d.pid}/fd`;
    const out: string[] = [];
    for (const n of await readdir(dir)) {
      const t = await readlink(`${dir}/${n}`).catch(() => '');
      if (t.startsWith(join(host.dev, 'vfio', 'devices')) || t === join(host.dev, 'iommu')) out.push(t);
    }
    return out.sort();
  }

  /** A cdev VM with a KVM-VFIO device, run by the fake QEMU under kvmvfioctl attach with {qmp}. */
  async function startQemu(name: string, fake: FakeQmpOptions, vm: { handoff?: 'VFIO_HANDOFF_CDEV' | 'VFIO_HANDOFF_GROUP'; qmp?: boolean } = {}) {
    const { vm: rec, attach_token } = await c.createVm({ name, vmm_uid: NOBODY_UID, vfio_device: true, vfio_handoff: vm.handoff ?? 'VFIO_HANDOFF_CDEV' });
    const argv = [...NOBODY, process.execPath, CLI_JS, 'attach', '--handoff', handoff, '--', 'node', FAKE_QEMU, ...(vm.qmp === false ? [] : ['--qmp', '{qmp}']), '--opts', JSON.stringify(fake)];
    const env: NodeJS.ProcessEnv = { ...process.env, KVMVFIO_TOKEN: attach_token!.token, PATH: `${dirname(process.execPath)}:/usr/bin:/bin` };
    const q = collectJsonLines(spawn(argv[0], argv.slice(1), { stdio: ['pipe', 'pipe', 'pipe'], env }));
    procs.push(q);
    const started = await q.waitFor('started');
    await until(`${name} RUNNING`, async () => (await c.getVm(rec!.id)).state === 'VM_STATE_RUNNING');
    const qmp = (): VmmEvent[] => q.events.filter((e) => e.event === 'qmp');
    return { id: rec!.id, q, started, qmp };
  }

  test('attach with {qmp}: QEMU gets one end of a socketpair in KVMVFIO_FDS, the daemon the other, and greets it', async () => {
    const { q, started, qmp, id } = await startQemu('qmp-attach', { ports: PORTS });
    assert.equal(started.uid, NOBODY_UID);
    assert.match(String(started.fds), /^kvm:\d+,iommufd:\d+,qmp:\d+,session:\d+$/);
    assert.equal(started.qmpIsSocket, true);
    assert.ok(d.logs.some((l) => l.event === 'vmm-attached' && l.vm === id && l.qmp === true), 'the daemon took the channel');
    // The daemon negotiates at once, before any call needs it.
    await until('qmp_capabilities', async () => qmp().some((e) => e.execute === 'qmp_capabilities'));
    await c.deleteVm({ vm_id: id });
    assert.deepEqual(await q.exit, { code: 0, signal: null });
  });

  test('AddGroup: getfd + object-add iommufd, getfd of the cdev, device_add on a free port; RemoveGroup: device_del, OK after DEVICE_DELETED; the group back; the daemon keeps no copy', async () => {
    const baseline = await daemonDevFds();
    const { id, q, qmp } = await startQemu('qmp-cycle', { ports: PORTS, deleteAfterMs: 300 });
    const added = await c.addGroup({ vm_id: id, group: 21 });
    assert.deepEqual(added.groups, [21]);
    const cmds = qmp().map((e) => e.execute);
    assert.deepEqual(cmds, ['qmp_capabilities', 'qom-list', 'getfd', 'object-add', 'query-pci', 'getfd', 'device_add']);
    const [, , iommuGetfd, , , cdevGetfd, deviceAdd] = qmp();
    assert.deepEqual(iommuGetfd.fds, [join(host.dev, 'iommu')], 'a fresh /dev/iommu for the iommufd object');
    assert.deepEqual(cdevGetfd.fds, [cdevPath(21)], "the device's cdev");
    assert.deepEqual(deviceAdd.arguments, { driver: 'vfio-pci', iommufd: 'kvmvfiod-iommufd', fd: (cdevGetfd.arguments as { fdname: string }).fdname, bus: 'kvmvfiod-port-1', id: qemuId(21) });
    assert.deepEqual((deviceAdd.held as string[]).sort(), [join(host.dev, 'iommu'), cdevPath(21)].sort(), 'QEMU holds the iommufd and the cdev, nothing else');
    assert.deepEqual(await daemonDevFds(), baseline, 'the daemon kept no copy of the cdev or the iommufd');
    assert.deepEqual([(await c.getIommuGroup(21)).holding, (await c.getIommuGroup(21)).vm_name], ['GROUP_HOLDING_VMM', 'qmp-cycle']);
    await expectStatus(c.addGroup({ vm_id: id, group: 21 }), status.ALREADY_EXISTS);
    await expectStatus(c.createVfioDevice(id), status.ALREADY_EXISTS, /already has its KVM-VFIO device/);

    const t0 = Date.now();
    const removed = await c.removeGroup({ vm_id: id, group: 21 });
    assert.ok(Date.now() - t0 >= 280, `RemoveGroup answered before the guest acknowledged (${Date.now() - t0} ms)`);
    assert.deepEqual(removed.groups, []);
    assert.equal((await c.getIommuGroup(21)).holding, 'GROUP_HOLDING_FREE');
    assert.deepEqual(qmp().at(-1)?.arguments, { id: qemuId(21) });

    // Again, into the same QEMU: the iommufd object is reused, the device gets a fresh cdev open.
    assert.deepEqual((await c.addGroup({ vm_id: id, group: 21 })).groups, [21]);
    assert.equal(qmp().filter((e) => e.execute === 'object-add').length, 1, 'one iommufd object per VM');
    assert.deepEqual(qmp().filter((e) => e.execute === 'getfd').at(-1)?.fds, [cdevPath(21)]);
    await c.deleteVm({ vm_id: id });
    assert.deepEqual(await q.exit, { code: 0, signal: null });
    await until('group 21 free after DeleteVm', async () => (await c.getIommuGroup(21)).holding === 'GROUP_HOLDING_FREE');
    assert.deepEqual(await daemonDevFds(), baseline);
  });

  test('a guest that does not acknowledge: RemoveGroup is DEADLINE_EXCEEDED, the record and the hold unchanged; a late DEVICE_DELETED, or QEMU\'s exit, frees the group', async () => {
    const { id, q, qmp } = await startQemu('qmp-deaf', { ports: PORTS, deleteAfterMs: 'never' });
    await c.addGroup({ vm_id: id, group: 22 });
    const t0 = Date.now();
    await expectStatus(c.removeGroup({ vm_id: id, group: 22 }), status.DEADLINE_EXCEEDED, /did not let go of device 0000:00:22.0 within 1500 ms/);
    assert.ok(Date.now() - t0 >= UNPLUG_MS - 50);
    assert.deepEqual((await c.getVm(id)).groups, [22], 'the record changes only on success');
    assert.deepEqual([(await c.getIommuGroup(22)).holding, (await c.getIommuGroup(22)).vm_name], ['GROUP_HOLDING_VMM', 'qmp-deaf']);
    // Another VM cannot have it meanwhile.
    await expectStatus(c.createVm({ name: 'wants-22', vmm_uid: NOBODY_UID, vfio_device: true, groups: [22] }), status.FAILED_PRECONDITION, /held by vm qmp-deaf/);
    // Asked again: QEMU takes a second device_del while the first is pending, and the wait starts over.
    await expectStatus(c.removeGroup({ vm_id: id, group: 22 }), status.DEADLINE_EXCEEDED);
    assert.equal(qmp().filter((e) => e.execute === 'device_del').length, 2);
    // The guest acknowledges late (or a reset completes the unplug): QEMU's DEVICE_DELETED is the cue,
    // the group leaves the record and is back once the daemon's own open of it succeeds.
    q.proc.stdin!.write(`${JSON.stringify({ unplug: qemuId(22) })}\n`);
    await until('group 22 free after the late DEVICE_DELETED', async () => (await c.getIommuGroup(22)).holding === 'GROUP_HOLDING_FREE');
    assert.deepEqual((await c.getVm(id)).groups, []);
    assert.ok(d.logs.some((l) => l.event === 'vmm-let-go' && l.vm === id && l.group === 22 && l.record_changed === true));
    // Again, and this time QEMU exits with the device still in it.
    await c.addGroup({ vm_id: id, group: 22 });
    await expectStatus(c.removeGroup({ vm_id: id, group: 22 }), status.DEADLINE_EXCEEDED);
    q.kill('SIGTERM');
    await q.exit;
    await until('VM EXITED', async () => (await c.getVm(id)).state === 'VM_STATE_EXITED');
    await until('group 22 free once QEMU exited', async () => (await c.getIommuGroup(22)).holding === 'GROUP_HOLDING_FREE');
    await c.deleteVm({ vm_id: id });
  });

  test('no free port: RESOURCE_EXHAUSTED; no port at all: FAILED_PRECONDITION; no fd reaches QEMU, none stays in the daemon, the group is free', async () => {
    const baseline = await daemonDevFds();
    const one = await startQemu('qmp-one-port', { ports: ['kvmvfiod-port-1'] });
    await c.addGroup({ vm_id: one.id, group: 23 });
    await expectStatus(c.addGroup({ vm_id: one.id, group: 24 }), status.RESOURCE_EXHAUSTED, /every hot-plug port is taken \(kvmvfiod-port-1\).*--hotplug-ports/);
    assert.deepEqual((await c.getVm(one.id)).groups, [23]);
    assert.equal((await c.getIommuGroup(24)).holding, 'GROUP_HOLDING_FREE');
    assert.equal(one.qmp().filter((e) => e.execute === 'getfd').length, 2, 'the iommufd and the first cdev; nothing of group 24');
    assert.deepEqual((one.qmp().at(-1)?.held as string[]).sort(), [join(host.dev, 'iommu'), cdevPath(23)].sort());

    const none = await startQemu('qmp-no-port', {});
    await expectStatus(c.addGroup({ vm_id: none.id, group: 24 }), status.FAILED_PRECONDITION, /no PCIe port .* start QEMU \(machine q35\) with pcie-root-port devices/);
    assert.equal((await c.getIommuGroup(24)).holding, 'GROUP_HOLDING_FREE');
    assert.equal(none.qmp().filter((e) => e.execute === 'getfd' && (e.fds as string[]).some((f) => f.includes('devices'))).length, 0);
    for (const v of [one, none]) {
      await c.deleteVm({ vm_id: v.id });
      await v.q.exit;
    }
    assert.deepEqual(await daemonDevFds(), baseline);
  });

  test("QEMU's refusals of device_add map to statuses; the fd is dropped in QEMU (closefd), the group is free, the record unchanged", async () => {
    const cases: [number, string, boolean, status][] = [
      [24, `vfio ${qemuId(24)}: error bind device fd=17 to iommufd=16: Invalid argument`, true, status.FAILED_PRECONDITION],
      [25, `vfio ${qemuId(25)}: error bind device fd=18 to iommufd=16: Inappropriate ioctl for device`, true, status.INVALID_ARGUMENT],
      [26, `Duplicate device ID '${qemuId(26)}'`, false, status.ALREADY_EXISTS],
    ];
    const deviceErrors = Object.fromEntries(cases.map(([n, desc, consumesFd]) => [qemuId(n), { desc, consumesFd }]));
    const { id, q, qmp } = await startQemu('qmp-refusals', { ports: PORTS, deviceErrors });
    for (const [n, desc, , code] of cases) {
      const details = await expectStatus(c.addGroup({ vm_id: id, group: n }), code);
      assert.ok(details.includes(desc) && details.includes('QEMU (pid'), details);
      await until(`closefd after group ${n}`, async () => qmp().at(-1)?.execute === 'closefd');
      assert.deepEqual(qmp().at(-1)?.held, [join(host.dev, 'iommu')], 'QEMU holds no cdev');
      assert.equal((await c.getIommuGroup(n)).holding, 'GROUP_HOLDING_FREE');
    }
    assert.deepEqual((await c.getVm(id)).groups, []);
    await c.deleteVm({ vm_id: id });
    await q.exit;
  });

  test('a passive VMM without {qmp} takes no hot changes (FAILED_PRECONDITION naming the monitor); a GROUP-handoff VM cannot hot-plug into QEMU', async () => {
    const plain = await startQemu('no-qmp', {}, { qmp: false });
    await expectStatus(c.addGroup({ vm_id: plain.id, group: 25 }), status.FAILED_PRECONDITION, /without a control channel.*\{qmp\}/);
    await expectStatus(c.removeGroup({ vm_id: plain.id, group: 25 }), status.FAILED_PRECONDITION, /without a control channel/);
    assert.equal((await c.getIommuGroup(25)).holding, 'GROUP_HOLDING_FREE');
    const grp = await startQemu('qmp-group-handoff', { ports: PORTS }, { handoff: 'VFIO_HANDOFF_GROUP' });
    await expectStatus(c.addGroup({ vm_id: grp.id, group: 25 }), status.FAILED_PRECONDITION, /only as a device cdev.*CDEV handoff/);
    assert.equal((await c.getIommuGroup(25)).holding, 'GROUP_HOLDING_FREE');
    assert.equal(grp.qmp().filter((e) => e.execute === 'getfd').length, 0);
    for (const v of [plain, grp]) {
      await c.deleteVm({ vm_id: v.id });
      await v.q.exit;
    }
  });

  test('the QMP fd of an ATTACH must be the VMM\'s own stream socketpair: a connection to another service, or any fd on an active ATTACH, is refused before the token is spent', async () => {
    const { vm, attach_token } = await c.createVm({ name: 'qmp-bad-fd', vmm_uid: 0, vfio_device: true, vfio_handoff: 'VFIO_HANDOFF_CDEV' });
    // A connection to the daemon's own API socket: its SO_PEERCRED names the daemon, not this VMM.
    const api = await new Promise<import('node:net').Socket>((resolve, reject) => {
      const s = require('node:net').connect(d.apiSocket) as import('node:net').Socket;
      s.once('connect', () => resolve(s)).once('error', reject);
    });
    const fd = (api as unknown as { _handle: { fd: number } })._handle.fd;
    await assert.rejects(VmmSession.connect(handoff, attach_token!.token, { passive: true, qmpFd: fd }), (e: unknown) => e instanceof AttachError && e.errno === 22 && /made by pid \d+, not by the VMM/.test(e.message));
    api.destroy();
    const [s1, s2] = SeqpacketSocket.pair('not a stream');
    await assert.rejects(VmmSession.connect(handoff, attach_token!.token, { passive: true, qmpFd: s1.fd }), (e: unknown) => e instanceof AttachError && e.errno === 22 && /SOCK_STREAM/.test(e.message));
    s1.closeSync();
    s2.closeSync();
    // An active VMM sends no fd at all: the session ends without an answer.
    const [a, b] = StreamSocket.pair('active');
    const raw = SeqpacketSocket.connect(handoff);
    raw.send(encode({ type: MsgType.ATTACH, seq: 1, status: 0, arg: 0, manifest: [{ kind: FdKind.QMP, id: 0 }], text: attach_token!.token }), [a.fd]);
    await until('session-protocol-error', async () => d.logs.some((l) => l.event === 'session-protocol-error' && /only with the passive bit/.test(String(l.reason))));
    raw.closeSync();
    a.closeSync();
    b.closeSync();
    // The token still works: a good channel attaches.
    const [mine, theirs] = StreamSocket.pair('good');
    const s = await VmmSession.connect(handoff, attach_token!.token, { passive: true, qmpFd: theirs.fd });
    theirs.closeSync();
    assert.equal((await c.getVm(vm!.id)).state, 'VM_STATE_RUNNING');
    s.close();
    mine.closeSync();
    // Not deleted: its passive VMM is this test process, which DeleteVm would SIGTERM.
  });

  // Last: it stops the daemon.
  test("the daemon's end of the socketpair is its only copy: attach closed its own, so QEMU sees its monitor end when the daemon stops", async () => {
    const { q } = await startQemu('qmp-last', { ports: PORTS });
    await until('negotiated', async () => q.events.some((e) => e.event === 'qmp' && e.execute === 'qmp_capabilities'));
    assert.ok(!q.events.some((e) => e.event === 'qmp-closed'));
    await d.stop();
    // Had attach (and so QEMU) kept a copy of the daemon's end, QEMU would never see end of stream.
    await q.waitFor('qmp-closed', 5000);
  });
});
