/**
 * The session protocol is language-neutral: the C reference VMM
 * (test/vmm/refvmm.c, libc only) attaches to a real daemon as nobody, runs
 * the tiny guest on the /dev/kvm fd it is given, and answers the daemon's
 * requests with its own kernel's errnos, which come back through gRPC.
 */
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { type VmmEvent, type VmmProc, collectJsonLines } from '../helpers/vmmproc';
import { readdir, readlink } from 'node:fs/promises';
import { join } from 'node:path';
import { status } from '@grpc/grpc-js';
import { isApiError, type KvmVfioApi } from '../../src/client/client';
import { buildCVmm, removeCVmm } from '../helpers/cvmm';
import { makeFakeHost, type FakeHost } from '../helpers/fakehost';
import { startDaemon, type RunningDaemon } from '../helpers/daemon';

const NOBODY = 65534;
const GROUP = 5;

type Event = VmmEvent;

/** Runs the VMM as nobody with no supplementary groups; stdout is parsed as JSON lines. */
function runCVmm(bin: string, handoff: string, token: string): VmmProc {
  return collectJsonLines(
    spawn('setpriv', [`--reuid=${NOBODY}`, `--regid=${NOBODY}`, '--clear-groups', bin, handoff], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { PATH: process.env.PATH ?? '/usr/bin:/bin', KVMVFIO_TOKEN: token },
    }),
  );
}

async function expectStatus(p: Promise<unknown>, code: status, ...details: RegExp[]): Promise<string> {
  try {
    await p;
  } catch (e) {
    assert.ok(isApiError(e), `not a gRPC error: ${String(e)}`);
    assert.equal(status[e.code], status[code], `got ${status[e.code]}: ${e.details}`);
    for (const d of details) assert.match(e.details, d);
    return e.details;
  }
  assert.fail(`expected ${status[code]}`);
}

async function until<T>(what: string, fn: () => Promise<T | undefined | false>, timeoutMs = 5000): Promise<T> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > end) assert.fail(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

async function fdTargets(pid: number): Promise<string[]> {
  const names = await readdir(`/proc/${pid}/fd`);
  return Promise.all(names.map((n) => readlink(`/proc/${pid}/fd/${n}`).catch(() => '?')));
}

const isRequest = (type: string, errno?: number) => (e: Event) => e.event === 'request' && e.type === type && (errno === undefined || e.errno === errno);

describe('the C reference VMM speaks the session protocol', () => {
  let host: FakeHost;
  let d: RunningDaemon;
  let c: KvmVfioApi;
  let bin: string;
  let handoff: string;
  const vmms: VmmProc[] = [];

  before(async () => {
    bin = await buildCVmm();
    host = await makeFakeHost([{ number: GROUP, devices: [{ address: '0000:00:05.0', vendor: '8086', device: '10d3', class: '020000', driver: 'vfio-pci' }] }]);
    d = await startDaemon({ sysfs: host.sysfs, dev: host.dev });
    c = d.client();
    handoff = join(d.runtimeDir, 'handoff.sock');
  });

  after(async () => {
    for (const v of vmms) {
      if (v.proc.exitCode === null && v.proc.signalCode === null) {
        v.proc.kill('SIGKILL');
        await v.exit;
      }
    }
    await d?.cleanup();
    await host?.cleanup();
    await removeCVmm();
  });

  test('attaches as nobody, runs its guest, answers with its kernel, stops on DeleteVm; a used token is refused', async () => {
    const { vm, attach_token } = await c.createVm({ name: 'c-vmm', vmm_uid: NOBODY, vfio_device: true });
    assert.ok(vm && attach_token?.token, 'CreateVm returns the VM and its attach token');
    assert.equal(vm.state, 'VM_STATE_PENDING');
    const token = attach_token.token;

    const v = runCVmm(bin, handoff, token);
    vmms.push(v);
    const attached = await v.waitFor((e) => e.event === 'attached');
    assert.equal(attached.uid, NOBODY);
    assert.equal(attached.vm, vm.id);
    assert.equal(attached.name, 'c-vmm');

    const guest = await v.waitFor((e) => e.event === 'guest');
    assert.equal(guest.serial, 'kvmvfio guest ok\n');
    assert.equal(guest.halted, true);

    // The plan came behind the ATTACH result: the KVM-VFIO device, made by the VMM's kernel once it has its VM.
    const running = await until('VM_STATE_RUNNING', async () => {
      const got = await c.getVm(vm.id);
      return got.state === 'VM_STATE_RUNNING' && got;
    });
    assert.equal(running.vmm_pid, v.proc.pid);
    assert.equal(running.vfio_device, true);
    // The VMM prints its line after sending the answer: wait for it rather than race it.
    await v.waitFor(isRequest('CREATE_VFIO_DEVICE', 0));

    // A second device: the VMM asks its kernel, whose EBUSY is the answer.
    await expectStatus(c.createVfioDevice(vm.id), status.ALREADY_EXISTS, /EBUSY/);
    await v.waitFor(isRequest('CREATE_VFIO_DEVICE', 16));

    // The fake group node is an ordinary file: the VMM's kernel refuses it, and the VMM closes the fd.
    await expectStatus(c.addGroup({ vm_id: vm.id, group: GROUP }), status.INVALID_ARGUMENT, /VFIO_FILE_ADD/, /EINVAL/);
    const add = await v.waitFor(isRequest('ADD_GROUP'));
    assert.equal(add.arg, GROUP);
    assert.equal(add.errno, 22);
    const node = join(host.dev, 'vfio', String(GROUP));
    const vmmFds = await fdTargets(v.proc.pid!);
    assert.ok(vmmFds.includes('/dev/kvm'), `the VMM holds its /dev/kvm fd: ${vmmFds.join(', ')}`);
    assert.ok(!vmmFds.includes(node), `the refused group fd was closed: ${vmmFds.join(', ')}`);

    await expectStatus(c.removeGroup({ vm_id: vm.id, group: GROUP }), status.NOT_FOUND, new RegExp(`group ${GROUP}`));

    // The token was spent by the first VMM: a second one is refused with EACCES, and the VM is untouched.
    const again = runCVmm(bin, handoff, token);
    vmms.push(again);
    const refused = await again.waitFor((e) => e.event === 'attach-refused');
    assert.equal(refused.errno, 13);
    assert.match(String(refused.reason), /token/);
    assert.deepEqual(await again.exit, { code: 1, signal: null });
    assert.ok(!again.events.some((e) => e.event === 'attached'));
    assert.equal((await c.getVm(vm.id)).state, 'VM_STATE_RUNNING');

    // DeleteVm: SHUTDOWN to the VMM, which answers, says so and exits 0; then the record is gone.
    await c.deleteVm({ vm_id: vm.id });
    await v.waitFor((e) => e.event === 'shutdown');
    assert.ok(v.events.some(isRequest('SHUTDOWN', 0)));
    assert.deepEqual(await v.exit, { code: 0, signal: null });
    assert.equal(v.stderr(), '');
    assert.deepEqual(
      v.events.map((e) => e.event),
      ['attached', 'guest', 'request', 'request', 'request', 'request', 'shutdown'],
    );
    await expectStatus(c.getVm(vm.id), status.NOT_FOUND);
    assert.deepEqual((await c.listVms()).vms, []);
  });
});
