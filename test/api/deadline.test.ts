/**
 * Deadlines of requests to a VMM (docs/session-protocol.md, S24 and S25): a
 * request past its deadline gives its caller DEADLINE_EXCEEDED but stays
 * outstanding, and its late result updates the VM's record, so the record
 * follows the VMM's kernel; a VMM that never answers gets its VM failed and
 * is stopped. The late VMM is the C reference VMM with KVMVFIO_SLOW_ANSWER.
 */
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { status } from '@grpc/grpc-js';
import type { KvmVfioApi } from '../../src/client/client';
import { buildCVmm, removeCVmm } from '../helpers/cvmm';
import { makeFakeHost, type FakeHost } from '../helpers/fakehost';
import { startDaemon, type RunningDaemon } from '../helpers/daemon';
import { SILENT_VMM, runVmm, type VmmProc } from '../helpers/vmmproc';
import { expectStatus, until } from '../helpers/assert';

const GROUPS = [5, 6].map((n) => ({ number: n, devices: [{ address: `0000:00:0${n}.0`, vendor: '8086', device: '10d3', class: '020000', driver: 'vfio-pci' }] }));
/** The daemon's deadline; its answer bound is 6 times that. */
const DEADLINE_MS = 500;
const BOUND_MS = 6 * DEADLINE_MS;
const GRACE_MS = 2000;

describe('requests past their deadline (S24, S25)', () => {
  let host: FakeHost;
  let d: RunningDaemon;
  let c: KvmVfioApi;
  let handoff: string;
  let bin: string;
  const vmms: VmmProc[] = [];
  const lateVmm = (token: string, slow: string) => {
    const v = runVmm([bin, handoff], token, true, { env: { KVMVFIO_SLOW_ANSWER: slow } });
    vmms.push(v);
    return v;
  };

  before(async () => {
    bin = await buildCVmm();
    host = await makeFakeHost(GROUPS);
    d = await startDaemon({ sysfs: host.sysfs, dev: host.dev, args: ['--vmm-timeout-ms', String(DEADLINE_MS), '--vmm-exit-grace-ms', String(GRACE_MS)] });
    c = d.client();
    handoff = join(d.runtimeDir, 'handoff.sock');
  });

  after(async () => {
    for (const v of vmms) v.kill();
    await d?.cleanup();
    await host?.cleanup();
    await removeCVmm();
  });

  test('S24: a late CREATE_VFIO_DEVICE result updates the record; meanwhile the caller got DEADLINE_EXCEEDED and other calls UNAVAILABLE; a retry then gets the kernel\'s EBUSY', async () => {
    const { vm, attach_token } = await c.createVm({ name: 'late-device', vmm_uid: 65534 });
    const v = lateVmm(attach_token!.token, 'CREATE_VFIO_DEVICE:1500');
    await until('RUNNING', async () => (await c.getVm(vm!.id)).state === 'VM_STATE_RUNNING');
    await expectStatus(c.createVfioDevice(vm!.id), status.DEADLINE_EXCEEDED, /did not answer CREATE_VFIO_DEVICE within 500 ms; the request stays outstanding/);
    assert.equal((await c.getVm(vm!.id)).vfio_device, false, 'not answered yet');
    // While it is overdue nothing more is sent to the VMM: it would only queue behind.
    await expectStatus(c.addGroup({ vm_id: vm!.id, group: 5 }), status.UNAVAILABLE, /has not answered CREATE_VFIO_DEVICE \(seq \d+\) yet/);
    assert.equal((await c.getIommuGroup(5)).vm_id, '', 'the refused call claimed nothing');
    // The VMM's kernel made the device at once; its result comes 1.5 s later, and the record follows.
    await v.waitFor('slow-answer');
    const updated = await until('vfio_device true', async () => {
      const g = await c.getVm(vm!.id);
      return g.vfio_device && g;
    }, 4000);
    assert.equal(updated.state, 'VM_STATE_RUNNING');
    await d.waitForLog((l) => l.event === 'late-result-applied' && l.vm === vm!.id);
    // The record and the kernel agree: a second device is the kernel's EBUSY.
    await expectStatus(c.createVfioDevice(vm!.id), status.ALREADY_EXISTS, /EBUSY/);
    await c.deleteVm({ vm_id: vm!.id });
    assert.equal((await v.exit).code, 0);
  });

  test('S24: a late refusal of ADD_GROUP: the record never lists the group, the group follows the VMM\'s fd, and requests flow again after the late result', async () => {
    const { vm, attach_token } = await c.createVm({ name: 'late-add', vmm_uid: 65534, vfio_device: true });
    const v = lateVmm(attach_token!.token, 'ADD_GROUP:1500');
    await until('RUNNING', async () => (await c.getVm(vm!.id)).state === 'VM_STATE_RUNNING');
    await expectStatus(c.addGroup({ vm_id: vm!.id, group: 6 }), status.DEADLINE_EXCEEDED, /did not answer ADD_GROUP of group 6 within 500 ms/);
    await expectStatus(c.removeGroup({ vm_id: vm!.id, group: 6 }), status.UNAVAILABLE, /has not answered ADD_GROUP of group 6/);
    assert.deepEqual((await c.getVm(vm!.id)).groups, [], 'not in the record before its result');
    // The VMM's kernel refused the fake group file (EINVAL) at once and the VMM closed the fd: the witness frees the group.
    await until('group 6 free', async () => (await c.getIommuGroup(6)).vm_id === '', 4000);
    await v.waitFor((e) => e.event === 'request' && e.type === 'ADD_GROUP' && e.errno === 22);
    await until('requests flow again', async () => {
      try {
        await c.createVfioDevice(vm!.id);
      } catch (e) {
        return /EBUSY/.test(String((e as Error).message));
      }
      return false;
    }, 4000);
    const after = await c.getVm(vm!.id);
    assert.deepEqual(after.groups, []);
    assert.equal(after.state, 'VM_STATE_RUNNING');
    await c.deleteVm({ vm_id: vm!.id });
    assert.equal((await v.exit).code, 0);
  });

  test('S24: a plan step past its deadline waits for its late result: the VM becomes RUNNING, not FAILED', async () => {
    const { vm, attach_token } = await c.createVm({ name: 'late-plan', vmm_uid: 65534, vfio_device: true });
    const v = lateVmm(attach_token!.token, 'CREATE_VFIO_DEVICE:1500');
    await v.waitFor('slow-answer');
    await new Promise((r) => setTimeout(r, DEADLINE_MS + 200));
    assert.equal((await c.getVm(vm!.id)).state, 'VM_STATE_PENDING', 'past the deadline, still being set up');
    const running = await until('RUNNING', async () => {
      const g = await c.getVm(vm!.id);
      return g.state !== 'VM_STATE_PENDING' && g;
    }, 4000);
    assert.equal(running.state, 'VM_STATE_RUNNING');
    assert.equal(running.vfio_device, true);
    assert.equal(running.failure_reason, '');
    await c.deleteVm({ vm_id: vm!.id });
    assert.equal((await v.exit).code, 0);
  });

  test('S25: a VMM that never answers: DEADLINE_EXCEEDED, then at the answer bound the VM fails saying so, and the VMM is stopped (SIGKILL after the grace: it reads no SHUTDOWN)', async () => {
    const { vm, attach_token } = await c.createVm({ name: 'never-answers', vmm_uid: 65534 });
    const v = runVmm([process.execPath, SILENT_VMM, handoff], attach_token!.token);
    vmms.push(v);
    await v.waitFor('silent');
    await until('RUNNING', async () => (await c.getVm(vm!.id)).state === 'VM_STATE_RUNNING');
    const t0 = Date.now();
    await expectStatus(c.createVfioDevice(vm!.id), status.DEADLINE_EXCEEDED, /did not answer CREATE_VFIO_DEVICE within 500 ms/);
    assert.equal((await c.getVm(vm!.id)).state, 'VM_STATE_RUNNING', 'the session stays');
    const failed = await until('FAILED', async () => {
      const g = await c.getVm(vm!.id);
      return g.state === 'VM_STATE_FAILED' && g;
    }, BOUND_MS + 3000);
    const failedAfter = Date.now() - t0;
    assert.ok(failedAfter >= BOUND_MS - 200, `failed after ${failedAfter} ms, not before the ${BOUND_MS} ms bound`);
    assert.match(failed.failure_reason, new RegExp(`its VMM \\(pid ${v.pid}\\) did not answer CREATE_VFIO_DEVICE \\(seq \\d+\\) within ${BOUND_MS} ms`));
    const exit = await v.exit;
    assert.equal(exit.signal, 'SIGKILL');
    assert.ok(Date.now() - t0 < BOUND_MS + GRACE_MS + 2000);
    await c.deleteVm({ vm_id: vm!.id });
  });
});
