/**
 * VMM sessions on the real /dev/kvm: an unprivileged VMM attaches with a
 * token, runs its guest, and runs the daemon's requests in its own process;
 * tokens, faults and bad peers.
 */
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { openSync, closeSync, readdirSync, readFileSync, readlinkSync } from 'node:fs';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { status } from '@grpc/grpc-js';
import { type KvmVfioApi, type VmEvent } from '../../src/client/client';
import { SeqpacketSocket } from '../../src/kernel';
import { MsgType, decode, encode } from '../../src/protocol/session';
import { VmmSession } from '../../src/vmm/session';
import { makeFakeHost, type FakeHost } from '../helpers/fakehost';
import { startDaemon, type RunningDaemon } from '../helpers/daemon';
import { NOBODY, REFERENCE_VMM, SILENT_VMM, runVmm, type VmmProc } from '../helpers/vmmproc';
import { expectStatus, until } from '../helpers/assert';

const GROUPS = [5, 6, 8].map((n) => ({ number: n, devices: [{ address: `0000:00:0${n}.0`, vendor: '8086', device: '10d3', class: '020000', driver: 'vfio-pci' }] }));



async function settledFdCount(d: RunningDaemon, target: number): Promise<number> {
  let n = await d.fdCount();
  for (let i = 0; i < 100 && n > target; i++) {
    await new Promise((r) => setTimeout(r, 50));
    n = await d.fdCount();
  }
  return n;
}

describe('VMM sessions', () => {
  let host: FakeHost;
  let d: RunningDaemon;
  let c: KvmVfioApi;
  let handoff: string;
  const vmms: VmmProc[] = [];
  const refVmm = (token: string, asNobody = true) => {
    const v = runVmm([process.execPath, REFERENCE_VMM, '--socket', handoff], token, asNobody);
    vmms.push(v);
    return v;
  };

  before(async () => {
    host = await makeFakeHost(GROUPS);
    d = await startDaemon({ sysfs: host.sysfs, dev: host.dev, args: ['--vmm-timeout-ms', '500', '--vmm-exit-grace-ms', '3000'] });
    c = d.client();
    handoff = join(d.runtimeDir, 'handoff.sock');
  });

  after(async () => {
    for (const v of vmms) v.kill();
    await d?.cleanup();
    await host?.cleanup();
  });

  test('the handoff socket is a SOCK_SEQPACKET socket anyone may connect to', async () => {
    const { mode } = await import('node:fs').then((fs) => fs.statSync(handoff));
    assert.equal(mode & 0o777, 0o666);
    const s = SeqpacketSocket.connect(handoff);
    s.closeSync();
  });

  test('an unprivileged VMM, unable to open /dev/kvm, attaches, runs its guest to HLT and makes its KVM-VFIO device', async () => {
    const { vm, attach_token } = await c.createVm({ name: 'guest-1', vmm_uid: 65534, vfio_device: true });
    assert.ok(vm && attach_token);
    assert.ok(attach_token.token.length >= 43, '≥ 256 bits, base64url');
    assert.ok(Date.parse(attach_token.expire_time) > Date.now());
    // The VMM's uid really cannot open /dev/kvm by path.
    const probe = runVmm([process.execPath, '-e', "try{require('fs').openSync('/dev/kvm','r+');console.log(JSON.stringify({event:'opened'}))}catch(e){console.log(JSON.stringify({event:'refused',code:e.code}))}"], '');
    assert.equal((await probe.waitFor('refused')).code, 'EACCES');

    const v = refVmm(attach_token.token);
    assert.equal((await v.waitFor('attached')).uid, 65534);
    const guest = await v.waitFor('guest');
    assert.equal(guest.serial, 'kvmvfio guest ok\n');
    assert.equal(guest.halted, true);
    const running = await until('RUNNING', async () => {
      const g = await c.getVm(vm.id);
      return g.state === 'VM_STATE_RUNNING' && g;
    });
    assert.equal(running.vmm_pid, v.pid);
    assert.equal(running.vfio_device, true);
    // The VMM prints its line after sending the answer: wait for it rather than race it.
    await v.waitFor((e) => e.event === 'request' && e.type === 'CREATE_VFIO_DEVICE' && e.errno === 0);

    await expectStatus(c.createVfioDevice(vm.id), status.ALREADY_EXISTS, /KVM_CREATE_DEVICE\(VFIO\) on vm guest-1 \(VMM pid \d+\): EBUSY/);
    await v.waitFor((e) => e.event === 'request' && e.type === 'CREATE_VFIO_DEVICE' && e.errno === 16);

    // With a fake tree the group node is an ordinary file: the VMM's kernel refuses it.
    await expectStatus(c.addGroup({ vm_id: vm.id, group: 5 }), status.INVALID_ARGUMENT, /KVM_SET_DEVICE_ATTR\(VFIO_FILE_ADD\) on group 5, vm guest-1 .*: EINVAL/);
    // The VMM closed the fd of its refused ADD, so the daemon's own fresh open succeeds: the group is back at once.
    const g5 = await c.getIommuGroup(5);
    assert.equal(g5.vm_id, '');
    assert.equal(g5.holding, 'GROUP_HOLDING_FREE');
    assert.equal(g5.open_in_daemon, true);
    await expectStatus(c.removeGroup({ vm_id: vm.id, group: 5 }), status.NOT_FOUND);
    assert.deepEqual((await c.getVm(vm.id)).groups, [], 'the record changes only when the VMM reports success');

    const del = await c.deleteVm({ vm_id: vm.id });
    assert.equal(del.vm?.state, 'VM_STATE_EXITED');
    assert.deepEqual(await v.exit, { code: 0, signal: null });
    assert.ok(v.events.some((e) => e.event === 'shutdown'));
    assert.equal((await c.getIommuGroup(5)).vm_id, '', 'back in the pool once the VMM is gone');
    await expectStatus(c.getVm(vm.id), status.NOT_FOUND);
  });

  test('S19: the plan is applied at attach; a failing step fails the VM with the reason, ends its VMM and returns the groups', async () => {
    const { vm, attach_token } = await c.createVm({ name: 'plan-fails', vmm_uid: 65534, vfio_device: true, groups: [6] });
    const events: VmEvent[] = [];
    const watch = (async () => {
      for await (const ev of c.watchVms()) {
        if (ev.vm?.id === vm!.id) events.push(ev);
        if (ev.vm?.id === vm!.id && ev.vm.state === 'VM_STATE_FAILED') break;
      }
    })();
    const v = refVmm(attach_token!.token);
    await watch;
    const failed = await c.getVm(vm!.id);
    assert.equal(failed.state, 'VM_STATE_FAILED');
    assert.match(failed.failure_reason, /setting up IOMMU group 6: KVM_SET_DEVICE_ATTR\(VFIO_FILE_ADD\) on group 6.*EINVAL/);
    assert.equal((await v.exit).code, 0, 'the VMM was told to shut down');
    await until('group 6 free', async () => (await c.getIommuGroup(6)).vm_id === '');
    assert.deepEqual(
      events.map((e) => e.vm!.state),
      events.map((e) => e.vm!.state).filter((s) => s === 'VM_STATE_PENDING' || s === 'VM_STATE_FAILED'),
      'PENDING → FAILED, never RUNNING',
    );
    await c.deleteVm({ vm_id: vm!.id });
  });

  test('S18, S24: the plan waits for the VMM to make its VM: deadlines count from VM_CREATED; meanwhile the VM is PENDING and refuses changes at once', async () => {
    const { vm, attach_token } = await c.createVm({ name: 'slow-maker', vmm_uid: 65534, vfio_device: true });
    // The daemon's deadline is 500 ms; this VMM makes its VM 1,200 ms after the ATTACH result.
    const v = runVmm([process.execPath, SILENT_VMM, handoff, 'slow:1200'], attach_token!.token);
    vmms.push(v);
    await v.waitFor('attached');
    await new Promise((r) => setTimeout(r, 700));
    assert.equal((await c.getVm(vm!.id)).state, 'VM_STATE_PENDING', 'past the request deadline, yet not failed');
    const t0 = Date.now();
    await expectStatus(c.addGroup({ vm_id: vm!.id, group: 5 }), status.FAILED_PRECONDITION, /being set up by its VMM/);
    assert.ok(Date.now() - t0 < 300, 'refused at once, not queued behind the plan');
    const req = await v.waitFor('request');
    assert.deepEqual([req.type, req.errno], ['CREATE_VFIO_DEVICE', 0]);
    await until('RUNNING', async () => (await c.getVm(vm!.id)).state === 'VM_STATE_RUNNING');
    assert.equal((await c.getVm(vm!.id)).vfio_device, true);
    await c.deleteVm({ vm_id: vm!.id });
    assert.equal((await v.exit).code, 0);
  });

  test('S29: a VMM gone before it made its VM: FAILED, saying so, its groups back', async () => {
    const { vm, attach_token } = await c.createVm({ name: 'gone-early', vmm_uid: 65534, vfio_device: true, groups: [8] });
    const v = runVmm([process.execPath, SILENT_VMM, handoff, 'slow:60000'], attach_token!.token);
    vmms.push(v);
    await v.waitFor('attached');
    v.kill();
    await until('FAILED', async () => (await c.getVm(vm!.id)).state === 'VM_STATE_FAILED');
    await until('group 8 free', async () => (await c.getIommuGroup(8)).vm_id === '');
    assert.match((await c.getVm(vm!.id)).failure_reason, new RegExp(`its VMM \\(pid ${v.pid}\\) exited before it made its VM \\(no VM_CREATED\\)`));
    await c.deleteVm({ vm_id: vm!.id });
  });

  test('S29: a VMM killed with SIGKILL: EXITED within 1 s, its groups back', async () => {
    const { vm, attach_token } = await c.createVm({ name: 'killed', vmm_uid: 65534, vfio_device: true });
    const v = refVmm(attach_token!.token);
    await until('RUNNING', async () => (await c.getVm(vm!.id)).state === 'VM_STATE_RUNNING');
    await expectStatus(c.addGroup({ vm_id: vm!.id, group: 8 }), status.INVALID_ARGUMENT);
    const seen = new Promise<number>((resolve) => {
      void (async () => {
        for await (const ev of c.watchVms()) if (ev.vm?.id === vm!.id && ev.vm.state === 'VM_STATE_EXITED') return resolve(Date.now());
      })();
    });
    const t0 = Date.now();
    v.kill('SIGKILL');
    const t1 = await seen;
    assert.ok(t1 - t0 < 1000, `EXITED after ${t1 - t0} ms`);
    assert.equal((await c.getIommuGroup(8)).holding, 'GROUP_HOLDING_FREE');
    assert.deepEqual((await c.getVm(vm!.id)).stray_groups, []);
    await c.deleteVm({ vm_id: vm!.id });
  });

  test('S13: tokens: single use, bound to vmm_uid; a refused attach gets EACCES and no fds', async () => {
    const { vm, attach_token } = await c.createVm({ name: 'tok', vmm_uid: 65534 });
    // Presented by root, not 65534: refused, and the token stays good for 65534.
    const wrongUid = refVmm(attach_token!.token, false);
    const refused = await wrongUid.waitFor('attach-refused');
    assert.equal(refused.errno, 13);
    assert.match(String(refused.reason), /attach token is for vmm uid 65534, not uid 0/);
    const v = refVmm(attach_token!.token);
    await v.waitFor('guest');
    const replay = refVmm(attach_token!.token);
    assert.match(String((await replay.waitFor('attach-refused')).reason), /already used/);
    assert.equal((await replay.exit).code, 1);
    await expectStatus(c.createAttachToken(vm!.id), status.FAILED_PRECONDITION, /RUNNING|attached/);

    // A raw refusal: the result record carries no fds.
    const s = SeqpacketSocket.connect(handoff);
    try {
      s.send(encode({ type: MsgType.ATTACH, seq: 7, status: 0, arg: 0, manifest: [], text: randomBytes(32).toString('base64url') }));
      const r = await until('a result', async () => s.recv() ?? undefined);
      assert.equal(r.fds.length, 0);
      const m = decode(r.data, 0);
      assert.equal(m.type, MsgType.ATTACH | 0x8000);
      assert.equal(m.seq, 7);
      assert.equal(m.status, 13);
      assert.match(m.text, /not known/);
    } finally {
      s.closeSync();
    }
    await c.deleteVm({ vm_id: vm!.id });
  });

  test('CreateAttachToken mints a new token for a PENDING VM and the old one stops working', async () => {
    const { vm, attach_token } = await c.createVm({ name: 'remint', vmm_uid: 65534 });
    const fresh = await c.createAttachToken(vm!.id);
    assert.notEqual(fresh.token, attach_token!.token);
    const old = refVmm(attach_token!.token);
    assert.match(String((await old.waitFor('attach-refused')).reason), /not known/);
    const v = refVmm(fresh.token);
    await v.waitFor('guest');
    await c.deleteVm({ vm_id: vm!.id, force: true });
    assert.equal((await v.exit).signal, 'SIGKILL', 'force kills through the pidfd');
  });

  test('S24: a VMM that never answers: DEADLINE_EXCEEDED, and the daemon keeps serving', async () => {
    const { vm, attach_token } = await c.createVm({ name: 'silent', vmm_uid: 65534 });
    const v = runVmm([process.execPath, SILENT_VMM, handoff], attach_token!.token);
    vmms.push(v);
    await v.waitFor('silent');
    await until('RUNNING', async () => (await c.getVm(vm!.id)).state === 'VM_STATE_RUNNING');
    await expectStatus(c.createVfioDevice(vm!.id), status.DEADLINE_EXCEEDED, /did not answer CREATE_VFIO_DEVICE within 500 ms/);
    assert.equal((await c.getVm(vm!.id)).vfio_device, false);
    await c.getHostInfo();
    await c.deleteVm({ vm_id: vm!.id, force: true });
  });

  test('S2, S4: garbage on the handoff socket ends that session only, without a reply; fds come back', async () => {
    await c.getHostInfo();
    const base = await d.fdCount();
    const records: Buffer[] = [
      randomBytes(64),
      Buffer.alloc(0),
      Buffer.from('KVF1'),
      encode({ type: MsgType.ATTACH, seq: 1, status: 0, arg: 0, manifest: [], text: 'x' }).subarray(0, 40),
      encode({ type: 999, seq: 1, status: 0, arg: 0, manifest: [], text: '' }),
      encode({ type: MsgType.VM_CREATED, seq: 1, status: 0, arg: 0, manifest: [], text: '' }),
      randomBytes(4096),
    ];
    const nul = openSync('/dev/null', 'r');
    try {
      for (const rec of records) {
        const s = SeqpacketSocket.connect(handoff);
        s.send(rec, rec.length % 2 ? [nul, nul] : []);
        // The daemon closes a garbling session: we read end of stream.
        const r = await until('end of stream', async () => s.recv() ?? undefined);
        for (const f of r.fds) f.closeSync();
        s.closeSync();
      }
      // An ATTACH with an fd attached is garbled too (a VMM sends no fds).
      const s = SeqpacketSocket.connect(handoff);
      s.send(encode({ type: MsgType.ATTACH, seq: 1, status: 0, arg: 0, manifest: [{ kind: 1, id: 0 }], text: 't' }), [nul]);
      const r = await until('end of stream', async () => s.recv() ?? undefined);
      assert.equal(r.data.length, 0);
      s.closeSync();
    } finally {
      closeSync(nul);
    }
    await c.getHostInfo();
    assert.equal(await settledFdCount(d, base), base);
    assert.ok(d.logs.some((l) => l.event === 'session-protocol-error'));
  });

  test('1,000 connections that send nothing: the daemon stays healthy and its fds return', async () => {
    await c.getHostInfo();
    const base = await d.fdCount();
    const socks: SeqpacketSocket[] = [];
    try {
      for (let i = 0; i < 1000; i++) socks.push(SeqpacketSocket.connect(handoff));
      await until('1000 sessions', async () => (await d.fdCount()) >= base + 1000);
      assert.ok((await c.getHostInfo()).kvm_api_version === 12);
    } finally {
      for (const s of socks) s.closeSync();
    }
    assert.equal(await settledFdCount(d, base), base);
  });

  test("S15: memlock_bytes raises the VMM's RLIMIT_MEMLOCK (prlimit) and never lowers it; where the daemon may not, the VM fails with EPERM named", async () => {
    const limitsOf = (pid: number) => {
      const m = /Max locked memory\s+(\d+|unlimited)\s+(\d+|unlimited)\s/.exec(readFileSync(`/proc/${pid}/limits`, 'utf8'));
      assert.ok(m, 'a Max locked memory line');
      return [m[1], m[2]];
    };
    // Another uid's limit, and any hard limit, needs CAP_SYS_RESOURCE (bit 24) to raise, which some sandboxes lack.
    const capEff = BigInt('0x' + /CapEff:\s+([0-9a-f]+)/.exec(readFileSync('/proc/self/status', 'utf8'))![1]);
    const mayRaise = (capEff & (1n << 24n)) !== 0n;
    // [the VMM's soft:hard limit before, memlock_bytes, soft and hard after]
    const cases: [string, number, string[]][] = [
      ['1048576:8388608', 4 << 20, ['4194304', '8388608']], // soft raised, hard kept
      ['8388608:8388608', 4 << 20, ['8388608', '8388608']], // larger already: untouched (it was lowered to 4 MiB)
      ['2097152:2097152', 2 << 20, ['2097152', '2097152']], // equal: untouched
    ];
    if (mayRaise) cases.push(['8388608:8388608', 16 << 20, ['16777216', '16777216']]); // both raised
    for (const [before, bytes, after] of cases) {
      const { vm, attach_token } = await c.createVm({ name: `memlock-${before.replace(':', '-')}-${bytes}`, vmm_uid: 0, memlock_bytes: String(bytes) });
      const v = runVmm(['prlimit', `--memlock=${before}`, process.execPath, REFERENCE_VMM, '--socket', handoff], attach_token!.token, false);
      vmms.push(v);
      assert.equal((await v.waitFor('attached')).memlock, bytes, 'the ATTACH result says what the VM asked');
      assert.deepEqual(limitsOf(v.pid), after, `limit ${before}, memlock_bytes ${bytes}`);
      await c.deleteVm({ vm_id: vm!.id });
    }

    // More than the 8 MiB the VMM starts with: the daemon must call prlimit.
    const other = await c.createVm({ name: 'memlock-nobody', vmm_uid: 65534, memlock_bytes: String(16 << 20) });
    const w = refVmm(other.attach_token!.token);
    if (mayRaise) {
      assert.equal((await w.waitFor('attached')).memlock, 16 << 20);
    } else {
      assert.match(String((await w.waitFor('attach-refused')).reason), /prlimit\(RLIMIT_MEMLOCK\) on pid \d+: EPERM/);
      const failed = await c.getVm(other.vm!.id);
      assert.equal(failed.state, 'VM_STATE_FAILED');
      assert.match(failed.failure_reason, /EPERM/);
    }
    await c.deleteVm({ vm_id: other.vm!.id, force: true });
  });

  test('no fd of the daemon leaks into a VMM: it receives only what the manifest lists', async () => {
    const { vm, attach_token } = await c.createVm({ name: 'fds', vmm_uid: 65534 });
    const v = refVmm(attach_token!.token);
    await v.waitFor('guest');
    const targets = readdirSync(`/proc/${v.pid}/fd`).map((n) => {
      try {
        return readlinkSync(`/proc/${v.pid}/fd/${n}`);
      } catch {
        return '?';
      }
    });
    assert.equal(targets.filter((t) => t === '/dev/kvm').length, 1);
    assert.ok(!targets.some((t) => t.includes('api.sock')));
    await c.deleteVm({ vm_id: vm!.id });
  });
});

describe('token expiry and idle connections', () => {
  test('S10, S13: an expired token is refused; an idle connection is closed after the attach timeout', async () => {
    const d = await startDaemon({ args: ['--token-ttl-ms', '1000', '--attach-timeout-ms', '300'] });
    try {
      const c = d.client();
      const { attach_token } = await c.createVm({ name: 'late', vmm_uid: 65534 });
      await new Promise((r) => setTimeout(r, 1100));
      const v = runVmm([process.execPath, REFERENCE_VMM, '--socket', join(d.runtimeDir, 'handoff.sock')], attach_token!.token);
      assert.match(String((await v.waitFor('attach-refused')).reason), /expired/);
      const s = SeqpacketSocket.connect(join(d.runtimeDir, 'handoff.sock'));
      const r = await until('closed by the daemon', async () => s.recv() ?? undefined, 3000);
      assert.equal(r.data.length, 0);
      s.closeSync();
      assert.ok(d.logs.some((l) => l.event === 'session-end' && /no ATTACH within 300 ms/.test(String(l.reason))));
    } finally {
      await d.cleanup();
    }
  });
});

describe('connections made ahead of their token', () => {
  test('VmmSession.preconnect: the connection attaches when its token comes; one the daemon ended for idling is replaced by a fresh one', async () => {
    const d = await startDaemon({ args: ['--attach-timeout-ms', '1000'] });
    const handoff = join(d.runtimeDir, 'handoff.sock');
    const sessions: VmmSession[] = [];
    try {
      const c = d.client();
      const ahead = await VmmSession.preconnect(handoff);
      const idle = await VmmSession.preconnect(handoff);
      const aheadFd = ahead.fd;
      const a = await c.createVm({ name: 'ahead', vmm_uid: process.getuid!() });
      const s1 = await VmmSession.connect(ahead, a.attach_token!.token);
      sessions.push(s1);
      assert.equal(s1.sock.fd, aheadFd, 'the session runs on the connection made ahead');
      assert.equal(ahead.fd, undefined);
      await assert.rejects(ahead.take(), /used already/);
      assert.equal(s1.attach.vmId, a.vm!.id);
      await s1.createVm();
      await until('ahead RUNNING', async () => (await c.getVm(a.vm!.id)).state === 'VM_STATE_RUNNING');
      // The other one idles past the attach timeout: the daemon ends it; its token's attach goes through a new connection.
      await until('the idle connection ended by the daemon', async () => d.logs.some((l) => l.event === 'session-end' && /no ATTACH within 1000 ms/.test(String(l.reason))), 5000);
      const idleFd = idle.fd;
      const b = await c.createVm({ name: 'after-idle', vmm_uid: process.getuid!() });
      const s2 = await VmmSession.connect(idle, b.attach_token!.token);
      sessions.push(s2);
      assert.equal(s2.attach.vmId, b.vm!.id);
      assert.equal(s2.attach.edition, 2, 'attached on the first try, not through the edition-1 fallback');
      await s2.createVm();
      await until('after-idle RUNNING', async () => (await c.getVm(b.vm!.id)).state === 'VM_STATE_RUNNING');
      assert.ok(idleFd !== undefined && !d.logs.some((l) => l.event === 'attach-refused'), 'no attach was refused');
      // One not wanted after all: closed by the VMM, the daemon sees the connection end at once, not at its timeout.
      const unwanted = await VmmSession.preconnect(handoff);
      const ended = d.logs.filter((l) => l.event === 'session-end').length;
      unwanted.close();
      assert.equal(unwanted.fd, undefined);
      await assert.rejects(unwanted.take(), /used already/);
      await until('the unwanted connection ended', async () => d.logs.filter((l) => l.event === 'session-end').length > ended, 900);
    } finally {
      for (const s of sessions) s.close('test over');
      await d.cleanup();
    }
  });
});

describe('the fd margin under RLIMIT_NOFILE', () => {
  test('too close to the limit: an attach is refused with EMFILE and a CreateVm with groups with RESOURCE_EXHAUSTED, naming the numbers; nothing changes', async () => {
    const host = await makeFakeHost(GROUPS);
    // A margin above the soft limit: every fd check fails, as when the daemon is near its limit.
    const d = await startDaemon({ sysfs: host.sysfs, dev: host.dev, args: ['--fd-margin', '1000000'] });
    try {
      const c = d.client();
      await expectStatus(c.createVm({ name: 'with-group', vmm_uid: 65534, vfio_device: true, groups: [5] }), status.RESOURCE_EXHAUSTED, /kvmvfiod has \d+ fds open; RLIMIT_NOFILE is \d+ and 1000000 are kept free \(--fd-margin\)/);
      assert.equal((await c.getIommuGroup(5)).vm_id, '', 'nothing claimed');
      // A VM without groups opens no fd at create; its VMM's attach would.
      const { vm, attach_token } = await c.createVm({ name: 'no-group', vmm_uid: 65534 });
      const v = runVmm([process.execPath, REFERENCE_VMM, '--socket', join(d.runtimeDir, 'handoff.sock')], attach_token!.token);
      const refused = await v.waitFor('attach-refused');
      assert.equal(refused.errno, 24, 'EMFILE');
      assert.match(String(refused.reason), /RLIMIT_NOFILE is \d+ and 1000000 are kept free/);
      assert.equal((await c.getVm(vm!.id)).state, 'VM_STATE_PENDING', 'the token was not spent: the VM waits for a VMM');
    } finally {
      await d.cleanup();
      await host.cleanup();
    }
  });
});

assert.ok(NOBODY.length > 0);
