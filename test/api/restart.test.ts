/**
 * Restart without losing anything, against a stand-in for systemd's
 * notify socket and fd store: readiness, status, the watchdog, socket
 * activation by name, and a daemon killed with SIGKILL whose successor
 * carries on the VMs, the claims and the live VMM sessions.
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { chmod, mkdir, mkdtemp, readdir, readlink, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { status } from '@grpc/grpc-js';
import { SeqpacketListener } from '../../src/kernel';
import { buildCVmm, removeCVmm } from '../helpers/cvmm';
import { type FakeGroup, makeFakeHost } from '../helpers/fakehost';
import { CLI_JS, REPO, startDaemon, type RunningDaemon } from '../helpers/daemon';
import { spawn } from 'node:child_process';
import { dirname } from 'node:path';
import { FakeSystemd } from '../helpers/fakesystemd';
import { NOBODY, REFERENCE_VMM, collectJsonLines, runVmm, type VmmEvent, type VmmProc } from '../helpers/vmmproc';
import { expectStatus, until } from '../helpers/assert';
import { MsgType, encode } from '../../src/protocol/session';
import { VmmSession } from '../../src/vmm/session';

const cleanups: (() => Promise<void> | void)[] = [];
after(async () => {
  for (const c of cleanups.reverse()) await c();
});

/** A state dir others may search, a fake host (viable groups 9 and 10 unless told), and a stand-in for systemd; all cleaned up after. */
async function stand(prefix: string, groups: FakeGroup[] = [9, 10].map((n) => ({ number: n, devices: [{ address: `0000:00:${n.toString(16).padStart(2, '0')}.0`, vendor: '8086', device: '10d3', class: '020000', driver: 'vfio-pci' }] })), hostOpts: { iommufd?: boolean } = {}) {
  const dir = await mkdtemp(join(tmpdir(), prefix));
  await chmod(dir, 0o755);
  cleanups.push(() => rm(dir, { recursive: true, force: true }));
  const host = await makeFakeHost(groups, hostOpts);
  cleanups.push(() => host.cleanup());
  const systemd = new FakeSystemd(dir);
  cleanups.push(() => systemd.close());
  return { dir, host, systemd };
}

/** The API and handoff sockets as systemd's .socket units hold them: listening under <dir>/run, never accepted on here. */
async function heldSockets(dir: string) {
  const runtime = join(dir, 'run');
  await mkdir(runtime, { recursive: true });
  const apiPath = join(runtime, 'api.sock');
  const handoffPath = join(runtime, 'handoff.sock');
  const api = SeqpacketListener.listen(apiPath, 128, true);
  cleanups.push(() => api.close());
  await chmod(apiPath, 0o666);
  const handoff = SeqpacketListener.listen(handoffPath);
  cleanups.push(() => handoff.close());
  await chmod(handoffPath, 0o666);
  return { handoffPath, api, handoff };
}

test('fake systemd: READY, STATUS, WATCHDOG; SIGKILL; the next daemon restores VMs, claims and sessions from the fd store', async () => {
  const { dir, host, systemd } = await stand('kvmvfiod-restart-');
  // The sockets systemd would make from the .socket units.
  const { handoffPath, api, handoff } = await heldSockets(dir);
  const apiFd = api.fd;
  // Names in an order other than the units': the daemon must look them up by name.
  const sockets = [
    { name: 'handoff', fd: handoff.fd },
    { name: 'api', fd: apiFd },
  ];
  const env = { NOTIFY_SOCKET: systemd.path, WATCHDOG_USEC: '400000' };
  const common = { dir, sysfs: host.sysfs, dev: host.dev, env };
  const daemons: RunningDaemon[] = [];
  const vmms: VmmProc[] = [];
  cleanups.push(async () => {
    for (const v of vmms) v.kill();
    for (const d of daemons) await d.cleanup();
  });

  const d1 = await startDaemon({ ...common, listenFds: sockets });
  daemons.push(d1);
  await until('READY=1', async () => systemd.count('READY', '1') === 1);
  assert.match(systemd.messages.find((m) => m.fields.READY)!.fields.STATUS, /^0 VMs \(0 running\), 0 groups claimed, 0 sessions$/);
  assert.ok(d1.logs.some((l) => l.event === 'api-listening' && l.activated === true), 'API socket taken from systemd');
  assert.ok(d1.logs.some((l) => l.event === 'handoff-listening' && l.activated === true), 'handoff socket taken from systemd');
  await until('two watchdog pings', async () => systemd.count('WATCHDOG', '1') >= 2, 3000);
  assert.equal(systemd.store.size, 1, 'only /dev/kvm stored so far');
  assert.ok(systemd.store.has('kvm'));

  const c1 = d1.client();
  // A claimed group (its VM not attached yet): the daemon holds its file, so the fd store has it.
  const pending = (await c1.createVm({ name: 'waiting', vmm_uid: 65534, vfio_device: true, groups: [9] })).vm!;
  await until('group-9 stored', async () => systemd.store.has('group-9'));
  // A group handed to a VMM (a passive one gets its groups at attach): the daemon keeps no copy, stored or not.
  const held = await c1.createVm({ name: 'holder', vmm_uid: 0, vfio_device: true, groups: [10] });
  await until('group-10 stored', async () => systemd.store.has('group-10'));
  const passive = spawn(process.execPath, [CLI_JS, 'attach', '--token', held.attach_token!.token, '--handoff', handoffPath, '--', 'sleep', '600'], { stdio: 'ignore' });
  cleanups.push(() => void passive.kill('SIGKILL'));
  await until('passive VMM RUNNING', async () => (await c1.getVm(held.vm!.id)).state === 'VM_STATE_RUNNING');
  await until('group-10 out of the fd store', async () => !systemd.store.has('group-10'));
  assert.equal((await c1.getIommuGroup(10)).holding, 'GROUP_HOLDING_VMM');
  assert.equal((await c1.getIommuGroup(10)).open_in_daemon, false);

  // A VMM that closes its session and lives on: still the VM's VMM, carried over by its pidfd alone.
  const closer = await c1.createVm({ name: 'closer', vmm_uid: 0 });
  const closing = spawn(process.execPath, [CLI_JS, 'attach', '--token', closer.attach_token!.token, '--handoff', handoffPath, '--', 'bash', '-c', 'exec {session}>&-; exec sleep 600'], { stdio: 'ignore' });
  cleanups.push(() => void closing.kill('SIGKILL'));
  await until('the closer attached and closed its session', async () => d1.logs.some((l) => l.event === 'session-end' && l.vm === closer.vm!.id));
  await until('its pidfd stored, its socket not', async () => systemd.store.has(`pidfd-${closer.vm!.id}`) && !systemd.store.has(`session-${closer.vm!.id}`));

  const { vm: live, attach_token: tok } = await c1.createVm({ name: 'survivor', vmm_uid: 65534, vfio_device: true });
  const v = runVmm([process.execPath, REFERENCE_VMM, '--socket', handoffPath], tok!.token);
  vmms.push(v);
  await v.waitFor('guest');
  await until('RUNNING', async () => (await c1.getVm(live!.id)).state === 'VM_STATE_RUNNING');
  await until('session fds stored', async () => systemd.store.has(`session-${live!.id}`) && systemd.store.has(`pidfd-${live!.id}`));
  const before = await c1.listVms();
  const revisionBefore = Number((await c1.getVm(live!.id)).revision);
  await until('state written', async () => systemd.count('STATUS') > 0 && d1.logs.some((l) => l.event === 'vmm-attached'));
  await new Promise((r) => setTimeout(r, 100)); // the state file is written at the end of the tick

  // Crash.
  const crash = await d1.stop('SIGKILL');
  assert.equal(crash.signal, 'SIGKILL');
  assert.equal(v.proc.exitCode, null, 'the VMM runs on while the daemon is down');

  const d2 = await startDaemon({ ...common, listenFds: [...sockets, ...systemd.listenFds()] });
  daemons.push(d2);
  const restored = await d2.waitForLog((l) => l.event === 'restored');
  assert.equal(restored.sessions, 3, 'the active VMM, the passive one, and the one that closed its session');
  const c2 = d2.client();
  const after = await c2.listVms();
  assert.deepEqual(
    after.vms.map((x) => [x.id, x.name, x.state, x.vmm_pid]),
    before.vms.map((x) => [x.id, x.name, x.state, x.vmm_pid]),
  );
  assert.ok(after.vms.some((x) => x.id === pending.id && x.state === 'VM_STATE_PENDING'));
  const g9 = await c2.getIommuGroup(9);
  assert.deepEqual([g9.vm_id, g9.holding, g9.open_in_daemon], [pending.id, 'GROUP_HOLDING_CLAIMED', true], 'the claim survived, with its fd from the store');
  const g10 = await c2.getIommuGroup(10);
  assert.deepEqual([g10.vm_id, g10.holding, g10.open_in_daemon], [held.vm!.id, 'GROUP_HOLDING_VMM', false], "the passive VMM's group: still its VM's, no fd in the daemon");
  assert.ok(!systemd.store.has('group-10'));
  // The VMM answers through its carried-over session: its kernel says EBUSY to a second device.
  await expectStatus(c2.createVfioDevice(live!.id), status.ALREADY_EXISTS, /EBUSY/);
  assert.ok(Number((await c2.getVm(live!.id)).revision) >= revisionBefore);

  // The restored pidfd still tells when the VMM goes.
  v.kill('SIGKILL');
  await until('EXITED', async () => (await c2.getVm(live!.id)).state === 'VM_STATE_EXITED');
  passive.kill('SIGKILL');
  await until('passive VMM EXITED', async () => (await c2.getVm(held.vm!.id)).state === 'VM_STATE_EXITED');
  closing.kill('SIGKILL');
  await until('the closer EXITED: its pidfd came back from the store', async () => (await c2.getVm(closer.vm!.id)).state === 'VM_STATE_EXITED');
  const back = await c2.getIommuGroup(10);
  assert.deepEqual([back.vm_id, back.holding, back.open_in_daemon], ['', 'GROUP_HOLDING_FREE', true], "the daemon's fresh open took it back");
  await until("group-10 stored again: the daemon's own open", async () => systemd.store.has('group-10'));
  await until('session fds dropped from the store', async () => !systemd.store.has(`session-${live!.id}`) && !systemd.store.has(`pidfd-${live!.id}`));

  // A clean stop says STOPPING=1; a start with the sockets but without the stored fds (systemctl stop,
  // then start: systemd 252 flushes the store) sets the state aside.
  const stopped = await d2.stop('SIGTERM');
  assert.equal(stopped.code, 0);
  assert.ok(systemd.count('STOPPING', '1') >= 1);
  const d3 = await startDaemon({ ...common, listenFds: sockets });
  daemons.push(d3);
  await d3.waitForLog((l) => l.event === 'state-set-aside');
  assert.deepEqual((await d3.client().listVms()).vms, []);
});

test('S25: a result of a request the daemon sent before it was killed fails the VM, since the record cannot follow what it changed; the VMM is stopped', async () => {
  const { dir, systemd } = await stand('kvmvfiod-restart-late-');
  const { handoffPath, api, handoff } = await heldSockets(dir);
  const common = { dir, env: { NOTIFY_SOCKET: systemd.path }, listenFds: [{ name: 'api', fd: api.fd }, { name: 'handoff', fd: handoff.fd }] };
  const daemons: RunningDaemon[] = [];
  let vmm: VmmProc | undefined;
  cleanups.push(async () => {
    vmm?.kill();
    for (const d of daemons) await d.cleanup();
    await removeCVmm();
  });

  const d1 = await startDaemon(common);
  daemons.push(d1);
  const c1 = d1.client();
  const { vm, attach_token } = await c1.createVm({ name: 'in-flight', vmm_uid: 65534 });
  // The C reference VMM makes the device at once and answers 2.5 s later: the daemon is gone by then.
  vmm = runVmm([await buildCVmm(), handoffPath], attach_token!.token, true, { env: { KVMVFIO_SLOW_ANSWER: 'CREATE_VFIO_DEVICE:2500' } });
  await until('RUNNING', async () => (await c1.getVm(vm!.id)).state === 'VM_STATE_RUNNING');
  await until('session fds stored', async () => systemd.store.has(`session-${vm!.id}`) && systemd.store.has(`pidfd-${vm!.id}`));
  await new Promise((r) => setTimeout(r, 100)); // the state file is written at the end of the tick
  c1.createVfioDevice(vm!.id).catch(() => undefined);
  await vmm.waitFor('slow-answer');
  await d1.stop('SIGKILL');

  const d2 = await startDaemon({ ...common, listenFds: [...common.listenFds, ...systemd.listenFds()] });
  daemons.push(d2);
  await d2.waitForLog((l) => l.event === 'restored');
  const c2 = d2.client();
  assert.equal((await c2.getVm(vm!.id)).vfio_device, false, 'the record before the result');
  const failed = await until('FAILED', async () => {
    const g = await c2.getVm(vm!.id);
    return g.state === 'VM_STATE_FAILED' && g;
  });
  assert.match(failed.failure_reason, /reported CREATE_VFIO_DEVICE \(seq \d+\) done, a request of the daemon before it restarted: the record cannot say what it changed/);
  assert.deepEqual(await vmm.exit, { code: 0, signal: null }, 'told to stop (SHUTDOWN), it exits');
  await c2.deleteVm({ vm_id: vm!.id });
});

test('a session carried over a restart keeps its edition: edition 2 still ends on a garbled request, edition 1 still has it let through', async () => {
  const { dir, systemd } = await stand('kvmvfiod-edition-');
  const env = { NOTIFY_SOCKET: systemd.path };
  const d1 = await startDaemon({ dir, env, listenFds: systemd.listenFds() });
  cleanups.push(() => d1.cleanup());
  const c1 = d1.client();
  const handoff = join(d1.runtimeDir, 'handoff.sock');
  // This process is both VMMs (root, its own uid): each session makes a VM, so its record is RUNNING.
  const sessions: VmmSession[] = [];
  cleanups.push(() => sessions.forEach((s) => s.close()));
  const vms: Record<'two' | 'one', string> = { two: '', one: '' };
  for (const [name, edition] of [['two', 2], ['one', 1]] as const) {
    const { vm, attach_token } = await c1.createVm({ name: `edition-${name}`, vmm_uid: process.getuid!() });
    const s = await VmmSession.connect(handoff, attach_token!.token, { edition });
    sessions.push(s);
    await s.createVm();
    vms[name] = vm!.id;
    await until(`edition ${edition} RUNNING`, async () => (await c1.getVm(vm!.id)).state === 'VM_STATE_RUNNING');
    await until('its session stored', async () => systemd.store.has(`session-${vm!.id}`));
  }
  await new Promise((r) => setTimeout(r, 100));
  await d1.stop('SIGKILL');

  const d2 = await startDaemon({ dir, env, listenFds: systemd.listenFds() });
  cleanups.push(() => d2.cleanup());
  await d2.waitForLog((l) => l.event === 'restored' && l.sessions === 2);
  // S5: a request with a nonzero status. Edition 2 ends the session; edition 1 is let through and logged once.
  const garbled = (seq: number) => encode({ type: MsgType.PING, seq, status: 7, arg: 0, manifest: [], text: '' });
  sessions[0].sock.send(garbled(900));
  await d2.waitForLog((l) => l.event === 'session-end' && l.vm === vms.two && /protocol error/.test(String(l.reason)));
  sessions[1].sock.send(garbled(901));
  await d2.waitForLog((l) => l.event === 'session-tolerated' && l.vm === vms.one);
  assert.ok(!d2.logs.some((l) => l.event === 'session-end' && l.vm === vms.one), 'the edition-1 session goes on');
  assert.ok(!d2.logs.some((l) => l.event === 'session-tolerated' && l.vm === vms.two));
  // Both VMs live on in their VMM (this process): the records say RUNNING.
  const c2 = d2.client();
  for (const id of [vms.two, vms.one]) assert.equal((await c2.getVm(id)).state, 'VM_STATE_RUNNING');
});

test('a stored group fd that is no longer the file at /dev/vfio/N is closed, not adopted: the claim opens the new node; an orphan one gets no record', async () => {
  const { dir, host, systemd } = await stand('kvmvfiod-gone-');
  const env = { NOTIFY_SOCKET: systemd.path };
  const common = { dir, sysfs: host.sysfs, dev: host.dev, env };
  const d1 = await startDaemon({ ...common, listenFds: systemd.listenFds() });
  cleanups.push(() => d1.cleanup());
  const { vm } = await d1.client().createVm({ name: 'claims-9', vmm_uid: 65534, vfio_device: true, groups: [9] });
  await until('group-9 stored', async () => systemd.store.has('group-9'));
  await d1.stop('SIGKILL');

  // While the daemon is down, group 9's node is made again (a new inode, as after an unplug and a replug).
  const node = join(host.dev, 'vfio', '9');
  await rm(node);
  await writeFile(node, '');
  const d2 = await startDaemon({ ...common, listenFds: systemd.listenFds() });
  cleanups.push(() => d2.cleanup());
  await d2.waitForLog((l) => l.event === 'restored');
  assert.ok(d2.logs.some((l) => l.event === 'fdstore-group-gone' && l.group === 9), 'the old fd was told apart from the new node');
  const g9 = await d2.client().getIommuGroup(9);
  assert.equal(g9.vm_id, vm!.id, 'the claim stands');
  assert.equal(g9.open_in_daemon, true, 'held through a fresh open of the new node');
  assert.ok(!d2.logs.some((l) => l.event === 'group-not-reopened'));
  const links = await Promise.all((await readdir(`/proc/${d2.pid}/fd`)).map((f) => readlink(`/proc/${d2.pid}/fd/${f}`).catch(() => '')));
  assert.ok(!links.some((l) => l.startsWith(node) && l.includes('(deleted)')), `the daemon holds no fd of the old node: ${links.filter((l) => l.startsWith(node)).join(', ')}`);
  assert.equal(links.filter((l) => l === node).length, 1, 'one fd of the new node');
  await d2.stop('SIGKILL');

  // Now the state is lost and group 9 is gone for good: the stored fd is an orphan of nothing.
  await rm(join(dir, 'state'), { recursive: true, force: true });
  await rm(node);
  const d3 = await startDaemon({ ...common, listenFds: systemd.listenFds() });
  cleanups.push(() => d3.cleanup());
  await d3.waitForLog((l) => l.event === 'restored' || l.event === 'ready');
  assert.ok(d3.logs.some((l) => l.event === 'fdstore-group-gone' && l.group === 9));
  assert.ok(!d3.logs.some((l) => l.event === 'state-orphan-group'), 'not kept as a claim');
  const names = (await d3.client().listVms()).vms.map((v) => v.name);
  assert.ok(!names.includes('recovered-group-9'), `no record for it: ${names.join(', ')}`);
  assert.ok(!systemd.store.has('group-9'), 'out of the fd store');
});

test("a passive QEMU's QMP channel is carried over a SIGKILL: RemoveGroup and AddGroup go through it from the next daemon, with no second negotiation", async () => {
  const cdevGroup = (n: number): FakeGroup => ({ number: n, devices: [{ address: `0000:00:${n}.0`, vendor: '1234', device: '11e8', class: '00ff00', driver: 'vfio-pci', cdev: `vfio${n}` }] });
  const { dir, host, systemd } = await stand('kvmvfiod-qmp-restart-', [31, 32].map(cdevGroup), { iommufd: true });
  const common = { dir, sysfs: host.sysfs, dev: host.dev, env: { NOTIFY_SOCKET: systemd.path }, args: ['--hot-unplug-timeout-ms', '3000'] };
  const d1 = await startDaemon({ ...common, listenFds: systemd.listenFds() });
  cleanups.push(() => d1.cleanup());
  const c1 = d1.client();
  const { vm, attach_token } = await c1.createVm({ name: 'qemu-lives-on', vmm_uid: 65534, vfio_device: true, vfio_handoff: 'VFIO_HANDOFF_CDEV' });
  const fake = { ports: ['kvmvfiod-port-1', 'kvmvfiod-port-2'], deleteAfterMs: 200 };
  const argv = [...NOBODY, process.execPath, CLI_JS, 'attach', '--handoff', join(d1.runtimeDir, 'handoff.sock'), '--', 'node', join(REPO, 'dist', 'test', 'helpers', 'fakeqemu.js'), '--qmp', '{qmp}', '--opts', JSON.stringify(fake)];
  const q = collectJsonLines(spawn(argv[0], argv.slice(1), { stdio: ['pipe', 'pipe', 'pipe'], env: { ...process.env, KVMVFIO_TOKEN: attach_token!.token, PATH: `${dirname(process.execPath)}:/usr/bin:/bin` } }));
  cleanups.push(() => q.kill());
  await q.waitFor('started');
  await until('RUNNING', async () => (await c1.getVm(vm!.id)).state === 'VM_STATE_RUNNING');
  const qmp = (): VmmEvent[] => q.events.filter((e) => e.event === 'qmp');
  assert.deepEqual((await c1.addGroup({ vm_id: vm!.id, group: 31 })).groups, [31]);
  await until('the QMP channel stored', async () => systemd.store.has(`qmp-${vm!.id}`));
  await d1.stop('SIGKILL');
  const before = qmp().length;

  const d2 = await startDaemon({ ...common, listenFds: systemd.listenFds() });
  cleanups.push(() => d2.cleanup());
  await d2.waitForLog((l) => l.event === 'restored');
  const c2 = d2.client();
  const t0 = Date.now();
  assert.deepEqual((await c2.removeGroup({ vm_id: vm!.id, group: 31 })).groups, [], 'RemoveGroup through the carried channel');
  assert.ok(Date.now() - t0 >= 180, 'answered after the DEVICE_DELETED the new daemon waited for');
  assert.deepEqual((await c2.addGroup({ vm_id: vm!.id, group: 32 })).groups, [32], 'AddGroup through it');
  const after = qmp().slice(before).map((e) => e.execute);
  assert.ok(after.includes('device_del') && after.includes('device_add'), `commands after the restart: ${after.join(', ')}`);
  assert.ok(!after.includes('qmp_capabilities'), 'no second negotiation on a channel in command mode');
  assert.ok(!d2.logs.some((l) => l.event === 'qmp-closed'), 'the channel stayed open');

  // A clean stop (an upgrade): closing the channel on the way out leaves it in the store, and the next daemon goes on.
  await d2.stop('SIGTERM');
  assert.ok(systemd.store.has(`qmp-${vm!.id}`), 'still stored after a clean stop');
  const d3 = await startDaemon({ ...common, listenFds: systemd.listenFds() });
  cleanups.push(() => d3.cleanup());
  await d3.waitForLog((l) => l.event === 'restored');
  const c3 = d3.client();
  assert.deepEqual((await c3.removeGroup({ vm_id: vm!.id, group: 32 })).groups, [], 'RemoveGroup after a clean restart');
  await c3.deleteVm({ vm_id: vm!.id });
  assert.deepEqual(await q.exit, { code: 0, signal: null });
  await until('the QMP channel out of the store', async () => !systemd.store.has(`qmp-${vm!.id}`));
});
