/**
 * The API end to end: a real daemon on temp sockets with a fake sysfs/dev
 * tree, the real typed client, every RPC and its error codes.
 */
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { readdir, readlink } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { status } from '@grpc/grpc-js';
import { isApiError, type KvmVfioApi, type VmEvent } from '../../src/client/client';
import { makeFakeHost, type FakeHost } from '../helpers/fakehost';
import { REPO, startDaemon, type RunningDaemon } from '../helpers/daemon';
import { expectStatus } from '../helpers/assert';

const run = promisify(execFile);


async function fdTargets(pid: number): Promise<string[]> {
  const names = await readdir(`/proc/${pid}/fd`);
  return Promise.all(names.map((n) => readlink(`/proc/${pid}/fd/${n}`).catch(() => '?')));
}

const groups = [
  { number: 3, devices: [{ address: '0000:00:03.0', vendor: '8086', device: '10d3', class: '020000', driver: 'vfio-pci' }] },
  { number: 4, devices: [{ address: '0000:00:04.0', vendor: '1af4', device: '1041', class: '020000', driver: 'vfio-pci', cdev: 'vfio3' }] },
  {
    number: 7,
    devices: [
      { address: '0000:01:00.0', vendor: '10de', device: '1eb8', class: '030200', driver: 'vfio-pci' },
      { address: '0000:01:00.1', vendor: '10de', device: '10f8', class: '040300', driver: 'snd_hda_intel' },
    ],
  },
  { number: 12, devices: [{ address: '0000:02:00.0', vendor: '15b3', device: '101e', class: '020000' }] },
];

describe('kvmvfio.v1 API on a real daemon', () => {
  let host: FakeHost;
  let d: RunningDaemon;
  let c: KvmVfioApi;

  before(async () => {
    host = await makeFakeHost(groups);
    d = await startDaemon({ sysfs: host.sysfs, dev: host.dev });
    c = d.client();
  });

  after(async () => {
    await d?.cleanup();
    await host?.cleanup();
  });

  test('GetHostInfo reports the kernel, the probe and the daemon', async () => {
    const h = await c.getHostInfo();
    assert.equal(h.kvm_api_version, 12);
    assert.match(h.kernel_release, /^\d+\.\d+/);
    assert.equal(h.support?.kvm_vfio_device, true);
    assert.equal(h.support?.vfio_file_add, true);
    assert.equal(h.support?.vfio_file_del, true);
    assert.equal(h.support?.vfio_container, false);
    assert.equal(h.support?.iommu_groups, true);
    // The fake tree has a device cdev (group 4's) but no /dev/iommu.
    assert.equal(h.support?.vfio_device_cdev, true);
    assert.equal(h.support?.iommufd, false);
    assert.equal(h.iommu_group_count, 4);
    assert.equal(h.daemon_version, (require(join(REPO, 'package.json')) as { version: string }).version);
    assert.ok(Number(h.fd_limit_soft) > 0 && Number(h.fds_open) > 0);
  });

  test('ListIommuGroups and GetIommuGroup show devices, drivers and viability', async () => {
    const { groups: gs } = await c.listIommuGroups();
    assert.deepEqual(gs.map((g) => [g.number, g.viable]), [[3, true], [4, true], [7, false], [12, true]]);
    const g7 = gs.find((g) => g.number === 7)!;
    assert.deepEqual(g7.devices.map((x) => [x.address, `${x.vendor_id}:${x.device_id}`, x.class_code, x.driver]), [
      ['0000:01:00.0', '10de:1eb8', '030200', 'vfio-pci'],
      ['0000:01:00.1', '10de:10f8', '040300', 'snd_hda_intel'],
    ]);
    assert.deepEqual(g7.not_viable_reasons, ['0000:01:00.1 is bound to snd_hda_intel; bind 0000:01:00.1 to vfio-pci']);
    assert.equal((await c.getIommuGroup(12)).devices[0].driver, '');
    assert.equal((await c.getIommuGroup(4)).devices[0].cdev, 'vfio3', "the device's cdev under /dev/vfio/devices");
    assert.equal((await c.getIommuGroup(3)).devices[0].cdev, '');
    await expectStatus(c.getIommuGroup(99), status.NOT_FOUND, /IOMMU group 99 does not exist/);
  });

  test('CreateVm claims groups; retries are idempotent; conflicts name the VM, the device and the driver', async () => {
    const { vm } = await c.createVm({ name: 'web-1', vmm_uid: 1000, vfio_device: true, groups: [4, 3], labels: { app: 'web' }, request_id: 'r-1', memlock_bytes: '1048576' });
    assert.ok(vm);
    assert.equal(vm.state, 'VM_STATE_PENDING');
    assert.deepEqual(vm.groups, [3, 4]);
    assert.equal(vm.memlock_bytes, '1048576');
    assert.equal(vm.owner_uid, 0);
    const g3 = await c.getIommuGroup(3);
    assert.equal(g3.vm_name, 'web-1');
    assert.equal(g3.vm_id, vm.id);
    assert.equal(g3.open_in_daemon, true);

    const again = await c.createVm({ name: 'web-1', vmm_uid: 1000, vfio_device: true, groups: [3, 4], labels: { app: 'web' }, request_id: 'r-1', memlock_bytes: '1048576' });
    assert.equal(again.vm?.id, vm.id);
    await expectStatus(c.createVm({ name: 'web-2', vmm_uid: 1000, request_id: 'r-1' }), status.FAILED_PRECONDITION, /request_id r-1 was used/);
    await expectStatus(c.createVm({ name: 'web-1', vmm_uid: 1000 }), status.ALREADY_EXISTS, new RegExp(vm.id));
    await expectStatus(c.createVm({ name: 'db-1', vmm_uid: 1000, vfio_device: true, groups: [3] }), status.FAILED_PRECONDITION, /group 3 is held by vm web-1/);
    await expectStatus(
      c.createVm({ name: 'gpu-1', vmm_uid: 1000, vfio_device: true, groups: [12, 7] }),
      status.FAILED_PRECONDITION,
      /group 7 is not viable: 0000:01:00\.1 is bound to snd_hda_intel; bind 0000:01:00\.1 to vfio-pci/,
    );
    assert.equal((await c.getIommuGroup(12)).vm_id, '', 'a failed create claims nothing');
    await expectStatus(c.createVm({ name: 'x-1', vmm_uid: 1000, vfio_device: true, groups: [99] }), status.NOT_FOUND, /group 99/);
    assert.deepEqual((await c.listVms()).vms.map((v) => v.name), ['web-1']);
    await c.deleteVm({ vm_id: vm.id });
  });

  test('bad fields get INVALID_ARGUMENT naming the field and change nothing', async () => {
    const cases: [Parameters<KvmVfioApi['createVm']>[0], RegExp][] = [
      [{ name: '', vmm_uid: 1 }, /^name: required/],
      [{ name: 'Web_1', vmm_uid: 1 }, /^name: "Web_1" is not a DNS label/],
      [{ name: 'a'.repeat(64), vmm_uid: 1 }, /^name: longer than 63/],
      [{ name: 'ok' }, /^vmm_uid: required/],
      [{ name: 'ok', vmm_uid: 1, groups: [3, 3], vfio_device: true }, /^groups: group 3 is listed twice/],
      [{ name: 'ok', vmm_uid: 1, groups: [3] }, /^vfio_device: groups need the KVM-VFIO device/],
      [{ name: 'ok', vmm_uid: 1, labels: { 'bad key': 'v' } }, /^labels\["bad key"\]/],
      [{ name: 'ok', vmm_uid: 1, memlock_bytes: '18446744073709551615' }, /^memlock_bytes: .* more than the host's memory/],
      [{ name: 'ok', vmm_uid: 1, request_id: 'has space' }, /^request_id:/],
    ];
    for (const [req, re] of cases) await expectStatus(c.createVm(req), status.INVALID_ARGUMENT, re);
    await expectStatus(c.getVm('../../etc/passwd'), status.INVALID_ARGUMENT, /^vm_id: not a VM id/);
    await expectStatus(c.listVms({ states: [7 as never] }), status.INVALID_ARGUMENT, /^states: unknown state/);
    assert.equal((await c.listVms()).vms.length, 0);
    assert.equal((await c.getHostInfo()).claimed_group_count, 0);
  });

  test('GetVm, ListVms filters, DeleteVm', async () => {
    const a = (await c.createVm({ name: 'a', vmm_uid: 1, labels: { tier: 'web' } })).vm!;
    const b = (await c.createVm({ name: 'b', vmm_uid: 1, labels: { tier: 'db' }, vfio_device: true, groups: [12] })).vm!;
    assert.equal((await c.getVm(a.id)).name, 'a');
    assert.deepEqual((await c.listVms({ labels: { tier: 'db' } })).vms.map((v) => v.name), ['b']);
    assert.deepEqual((await c.listVms({ states: ['VM_STATE_PENDING'] })).vms.map((v) => v.name), ['a', 'b']);
    assert.deepEqual((await c.listVms({ states: ['VM_STATE_RUNNING'] })).vms, []);
    const del = await c.deleteVm({ vm_id: b.id });
    assert.equal(del.vm?.name, 'b');
    assert.equal((await c.getIommuGroup(12)).vm_id, '', 'deleting a VM returns its groups');
    await expectStatus(c.getVm(b.id), status.NOT_FOUND);
    await expectStatus(c.deleteVm({ vm_id: b.id }), status.NOT_FOUND);
    await c.deleteVm({ vm_id: a.id });
  });

  test('CreateVfioDevice, AddGroup, RemoveGroup change a PENDING plan with the same checks', async () => {
    const vm = (await c.createVm({ name: 'plan', vmm_uid: 1 })).vm!;
    const other = (await c.createVm({ name: 'other', vmm_uid: 1, vfio_device: true, groups: [4] })).vm!;
    await expectStatus(c.addGroup({ vm_id: vm.id, group: 3 }), status.FAILED_PRECONDITION, /no KVM-VFIO device; call CreateVfioDevice/);
    assert.equal((await c.createVfioDevice(vm.id)).vfio_device, true);
    await expectStatus(c.createVfioDevice(vm.id), status.ALREADY_EXISTS, /one per VM/);
    assert.deepEqual((await c.addGroup({ vm_id: vm.id, group: 3 })).groups, [3]);
    await expectStatus(c.addGroup({ vm_id: vm.id, group: 3 }), status.ALREADY_EXISTS, /already in vm plan/);
    await expectStatus(c.addGroup({ vm_id: vm.id, group: 4 }), status.FAILED_PRECONDITION, /held by vm other/);
    await expectStatus(c.addGroup({ vm_id: vm.id, group: 7 }), status.FAILED_PRECONDITION, /snd_hda_intel/);
    await expectStatus(c.addGroup({ vm_id: vm.id, group: 55 }), status.NOT_FOUND, /group 55/);
    const before = await c.getVm(vm.id);
    assert.deepEqual(before.groups, [3]);
    assert.deepEqual((await c.removeGroup({ vm_id: vm.id, group: 3 })).groups, []);
    await expectStatus(c.removeGroup({ vm_id: vm.id, group: 3 }), status.NOT_FOUND, /not in vm plan/);
    assert.deepEqual((await c.addGroup({ vm_id: other.id, group: 3 })).groups, [3, 4], 'a removed group is free for another VM');
    await expectStatus(c.addGroup({ vm_id: '00000000-0000-4000-8000-000000000000', group: 3 }), status.NOT_FOUND);
    await c.deleteVm({ vm_id: vm.id });
    await c.deleteVm({ vm_id: other.id });
  });

  test('WatchVms sends EXISTING, SYNCED, then every change in order', async () => {
    const first = (await c.createVm({ name: 'w-1', vmm_uid: 1, labels: { w: 'yes' } })).vm!;
    await c.createVm({ name: 'w-skip', vmm_uid: 1, labels: { w: 'no' } });
    const events: VmEvent[] = [];
    const stream = c.watchVms({ labels: { w: 'yes' } });
    const done = (async () => {
      for await (const ev of stream) {
        events.push(ev);
        if (ev.type === 'TYPE_DELETED') break;
      }
    })();
    while (!events.some((e) => e.type === 'TYPE_SYNCED')) await new Promise((r) => setTimeout(r, 10));
    const second = (await c.createVm({ name: 'w-2', vmm_uid: 1, labels: { w: 'yes' } })).vm!;
    await c.createVfioDevice(second.id);
    await c.deleteVm({ vm_id: second.id });
    await done;
    assert.deepEqual(
      events.map((e) => [e.type, e.vm?.name ?? '']),
      [
        ['TYPE_EXISTING', 'w-1'],
        ['TYPE_SYNCED', ''],
        ['TYPE_CREATED', 'w-2'],
        ['TYPE_UPDATED', 'w-2'],
        ['TYPE_DELETED', 'w-2'],
      ],
    );
    const revs = events.slice(2).map((e) => Number(e.vm!.revision));
    assert.ok(revs[0] < revs[1] && revs[1] < revs[2], 'revisions grow');
    assert.equal(events[3].vm!.vfio_device, true);
    for (const v of (await c.listVms()).vms) await c.deleteVm({ vm_id: v.id });
    assert.ok(first.id);
  });

  test('a request over 64 KiB is refused with RESOURCE_EXHAUSTED', async () => {
    await expectStatus(c.createVm({ name: 'big', vmm_uid: 1, labels: { k: 'v'.repeat(70_000) } }), status.RESOURCE_EXHAUSTED);
  });

  test('uid 65534 is denied and the denial is logged with its uid and pid', async () => {
    const script = `
      const { KvmVfioApi } = require(${JSON.stringify(join(REPO, 'dist/src/client/client.js'))});
      const c = new KvmVfioApi(${JSON.stringify(d.apiSocket)});
      c.getHostInfo().then(() => { console.log('OK'); process.exit(0); }, (e) => { console.log(e.code + ' ' + e.details); process.exit(0); });`;
    const { stdout } = await run('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath, '-e', script]);
    assert.match(stdout, new RegExp(`^${status.PERMISSION_DENIED} GetHostInfo: uid 65534 may not call kvmvfiod`));
    const line = await d.waitForLog((l) => l.event === 'call' && l.uid === 65534);
    assert.equal(line.outcome, 'PERMISSION_DENIED');
    assert.equal(line.gid, 65534);
    assert.ok(typeof line.pid === 'number' && line.pid > 1);
  });

  test('every mutating call is logged with uid, gid, pid, method, VM and outcome', async () => {
    const vm = (await c.createVm({ name: 'logged', vmm_uid: 1 })).vm!;
    await c.deleteVm({ vm_id: vm.id });
    const create = await d.waitForLog((l) => l.event === 'call' && l.method === 'CreateVm' && l.vm === vm.id);
    assert.equal(create.uid, 0);
    assert.equal(create.gid, 0);
    assert.equal(create.pid, process.pid);
    assert.equal(create.outcome, 'OK');
    const del = await d.waitForLog((l) => l.event === 'call' && l.method === 'DeleteVm' && l.vm === vm.id);
    assert.equal(del.outcome, 'OK');
  });
});

describe('daemon lifecycle', () => {
  test('SIGTERM exits 0 promptly and closes every fd the daemon opened', async () => {
    const host = await makeFakeHost(groups);
    const d = await startDaemon({ sysfs: host.sysfs, dev: host.dev });
    try {
      const atStart = await fdTargets(d.pid);
      assert.ok(atStart.includes('/dev/kvm'));
      const clients = [d.client(), d.client(), d.client()];
      await Promise.all(clients.map((cl) => cl.getHostInfo()));
      await clients[0].createVm({ name: 'held', vmm_uid: 1, vfio_device: true, groups: [3, 12] });
      const busy = await fdTargets(d.pid);
      assert.ok(busy.includes(join(host.dev, 'vfio', '3')), 'claimed group fd open');
      const r = await d.stop('SIGTERM');
      assert.equal(r.code, 0);
      assert.ok(r.ms < 5000, `stopped in ${r.ms} ms`);
      const stopped = d.logs.find((l) => l.event === 'stopped') as { fds: string[] } | undefined;
      assert.ok(stopped, 'stopped line logged');
      const left = [...stopped.fds];
      for (const t of left) assert.ok(atStart.includes(t), `fd ${t} was opened after start and never closed`);
      assert.ok(!left.includes('/dev/kvm'));
      assert.ok(!left.some((t) => t.startsWith(host.dev)), 'no group fd left');
      assert.ok(left.length <= atStart.length - 2, 'the /dev/kvm fd and the listening socket are closed');
    } finally {
      await d.cleanup();
      await host.cleanup();
    }
  });

  test('SIGTERM with a watcher and idle clients connected: the watch ends UNAVAILABLE and the daemon exits 0 in bound', async () => {
    const d = await startDaemon();
    try {
      const idle = d.client();
      await idle.getHostInfo();
      const watcher = d.client();
      const ended = (async () => {
        try {
          for await (const ev of watcher.watchVms()) void ev;
          return 'ended without status';
        } catch (e) {
          return isApiError(e) ? status[e.code] : String(e);
        }
      })();
      await new Promise((r) => setTimeout(r, 200));
      const t0 = Date.now();
      d.proc.kill('SIGTERM');
      assert.equal(await ended, 'UNAVAILABLE');
      const r = await d.stop();
      assert.equal(r.code, 0);
      assert.ok(Date.now() - t0 < 7000, `exited ${Date.now() - t0} ms after SIGTERM`);
    } finally {
      await d.cleanup();
    }
  });

  test('connections that come and go leave the fd count where it was', async () => {
    const d = await startDaemon();
    try {
      const c0 = d.client();
      await c0.getHostInfo();
      const base = await d.fdCount();
      for (let round = 0; round < 3; round++) {
        const cs = Array.from({ length: 20 }, () => d.client());
        await Promise.all(cs.map((x) => x.listVms()));
        for (const x of cs) x.close();
      }
      let now = await d.fdCount();
      for (let i = 0; i < 50 && now > base; i++) {
        await new Promise((r) => setTimeout(r, 50));
        now = await d.fdCount();
      }
      assert.equal(now, base);
    } finally {
      await d.cleanup();
    }
  });
});
