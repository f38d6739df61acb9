/**
 * The daemon's side of the session contract (docs/session-protocol.md), rule
 * by rule: what it answers, refuses and ends, for VMMs of both editions. The
 * VMM's side of the contract is checked by the conformance runner
 * (conformance.test.ts). Scripted VMMs are test/helpers/fuzz-vmm.ts, run as
 * separate processes (a VM is tied to its VMM's pid); records before ATTACH
 * come from raw connections.
 */
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { KvmVfioApi } from '../../src/client/client';
import { SeqpacketSocket } from '../../src/kernel';
import { AttachFlag, type Message, MsgType, REFUSAL_TOKEN_KEPT, RESULT_BIT, decode, encode } from '../../src/protocol/session';
import type { FuzzVmmPlan } from '../helpers/fuzz-vmm';
import { REPO, startDaemon, type RunningDaemon } from '../helpers/daemon';
import { REFERENCE_VMM, runVmm, type VmmEvent, type VmmProc } from '../helpers/vmmproc';
import { until } from '../helpers/assert';

const FUZZ_VMM = join(REPO, 'dist', 'test', 'helpers', 'fuzz-vmm.js');
const EACCES = 13;
const EMFILE = 24;
const EPROTO = 71;
const EOPNOTSUPP = 95;

const hex = (m: Partial<Message> & { type: number; seq: number }) => encode({ status: 0, arg: 0, manifest: [], text: '', ...m }).toString('hex');

/** Sends `records` on a fresh raw connection and returns what the daemon answered before it closed the connection. */
async function rawExchange(handoff: string, records: Buffer[]): Promise<{ answers: Message[]; closed: boolean }> {
  const s = SeqpacketSocket.connect(handoff, true);
  try {
    for (const r of records) s.send(r);
    const answers: Message[] = [];
    const end = Date.now() + 5000;
    for (;;) {
      let r;
      try {
        r = s.recv();
      } catch {
        return { answers, closed: true };
      }
      if (r) {
        if (r.data.length === 0) return { answers, closed: true };
        for (const f of r.fds) f.closeSync();
        answers.push(decode(r.data, r.fds.length));
        continue;
      }
      if (Date.now() > end) return { answers, closed: false };
      await new Promise((res) => setTimeout(res, 10));
    }
  } finally {
    s.closeSync();
  }
}

describe('the daemon keeps the session contract', () => {
  let d: RunningDaemon;
  let c: KvmVfioApi;
  let handoff: string;
  let dir: string;
  const vmms: VmmProc[] = [];

  /** A scripted VMM (fuzz-vmm) as root for a VM of vmm_uid 0: ATTACH with `attachArg`, VM_CREATED, then `after`. */
  const scripted = async (name: string, plan: Partial<FuzzVmmPlan>): Promise<{ v: VmmProc; vmId: string }> => {
    const { vm, attach_token } = await c.createVm({ name, vmm_uid: 0 });
    const full: FuzzVmmPlan = { attachArg: 0, attachThen: 'wait', before: [], sendCreated: true, responder: 'ok', errno: 0, after: [], afterAtMs: 200, serveMs: 1500, end: 'exit', lingerMs: 0, ...plan };
    const file = join(dir, `${name}.json`);
    await writeFile(file, JSON.stringify(full));
    const v = runVmm([process.execPath, FUZZ_VMM, handoff, file], attach_token!.token, false);
    vmms.push(v);
    return { v, vmId: vm!.id };
  };
  const results = (v: VmmProc, type: number) => v.events.filter((e: VmmEvent) => e.event === 'result' && e.type === (type | RESULT_BIT));

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'kvmvfio-contract-'));
    d = await startDaemon();
    c = d.client();
    handoff = join(d.runtimeDir, 'handoff.sock');
  });

  after(async () => {
    for (const v of vmms) v.kill();
    await d?.cleanup();
    await rm(dir, { recursive: true, force: true });
  });

  test('S5 ②: an edition-2 VMM that sends a request with a nonzero status, or a NUL in a text, has its session ended without a reply; an edition-1 VMM is let through, logged once', async () => {
    const strict = await scripted('ed2-status', { attachArg: AttachFlag.EDITION2, after: [{ hex: hex({ type: MsgType.PING, seq: 9, status: 5 }), fds: [] }] });
    await strict.v.waitFor('closed');
    assert.equal(results(strict.v, MsgType.PING).length, 0, 'no answer to the garbled PING');
    await d.waitForLog((l) => l.event === 'session-protocol-error' && /PING has status 5; a request carries 0/.test(String(l.reason)));

    const nul = await scripted('ed2-nul', { attachArg: AttachFlag.EDITION2, after: [{ hex: hex({ type: MsgType.PING, seq: 9, text: 'a\0b' }), fds: [] }] });
    await nul.v.waitFor('closed');
    assert.equal(results(nul.v, MsgType.PING).length, 0);

    const lenient = await scripted('ed1-status', { attachArg: 0, after: [{ hex: hex({ type: MsgType.PING, seq: 9, status: 5 }), fds: [] }, { hex: hex({ type: MsgType.PING, seq: 10, status: 6 }), fds: [] }] });
    await until('two PING results', async () => results(lenient.v, MsgType.PING).length === 2);
    assert.deepEqual(results(lenient.v, MsgType.PING).map((e) => [e.seq, e.status]), [[9, 0], [10, 0]]);
    await d.waitForLog((l) => l.event === 'session-tolerated' && l.vm === lenient.vmId);
    assert.equal(d.logs.filter((l) => l.event === 'session-tolerated' && l.vm === lenient.vmId).length, 1, 'once per kind and session');
    for (const x of [strict, nul, lenient]) await x.v.exit;
  });

  test('S6, S7: a result whose type does not echo its request ends the session; so does a result sent first, without a reply', async () => {
    const { vm, attach_token } = await c.createVm({ name: 'wrong-type', vmm_uid: 0, vfio_device: true });
    const plan: FuzzVmmPlan = { attachArg: AttachFlag.EDITION2, attachThen: 'wait', before: [], sendCreated: true, responder: 'wrong-type', errno: 0, after: [], afterAtMs: 100, serveMs: 1000, end: 'exit', lingerMs: 0 };
    const file = join(dir, 'wrong-type.json');
    await writeFile(file, JSON.stringify(plan));
    const v = runVmm([process.execPath, FUZZ_VMM, handoff, file], attach_token!.token, false);
    vmms.push(v);
    await v.waitFor('closed');
    await d.waitForLog((l) => l.event === 'session-protocol-error' && /answers no request/.test(String(l.reason)));
    await v.exit;
    const failed = await until('FAILED', async () => {
      const g = await c.getVm(vm!.id);
      return g.state === 'VM_STATE_FAILED' && g;
    });
    assert.match(failed.failure_reason, /setting up KVM-VFIO device: .*protocol error: ADD_GROUP result answers no request \(seq 1\)/);

    const first = await rawExchange(handoff, [encode({ type: MsgType.PING | RESULT_BIT, seq: 1, status: 0, arg: 0, manifest: [], text: '' })]);
    assert.deepEqual(first, { answers: [], closed: true });
  });

  test('S8, S11: a request before ATTACH gets EACCES, echoing its seq, and the session ends', async () => {
    const r = await rawExchange(handoff, [encode({ type: MsgType.PING, seq: 0xfffffff0, status: 0, arg: 0, manifest: [], text: '' })]);
    assert.equal(r.closed, true);
    assert.deepEqual(r.answers.map((m) => [m.type, m.seq, m.status]), [[MsgType.PING | RESULT_BIT, 0xfffffff0, EACCES]]);
  });

  test('S8, S17: a second VM_CREATED, or a request only the daemon sends, gets EPROTO, then the session ends', async () => {
    const twice = await scripted('created-twice', { attachArg: AttachFlag.EDITION2, after: [{ hex: hex({ type: MsgType.VM_CREATED, seq: 3 }), fds: [] }] });
    await twice.v.waitFor('closed');
    assert.deepEqual(results(twice.v, MsgType.VM_CREATED).map((e) => [e.seq, e.status]), [[2, 0], [3, EPROTO]]);
    assert.match(String(results(twice.v, MsgType.VM_CREATED)[1].text), /VM_CREATED sent twice/);

    const daemonOnly = await scripted('daemon-only', { attachArg: 0, after: [{ hex: hex({ type: MsgType.REMOVE_GROUP, seq: 3, arg: 5 }), fds: [] }] });
    await daemonOnly.v.waitFor('closed');
    assert.deepEqual(results(daemonOnly.v, MsgType.REMOVE_GROUP).map((e) => [e.seq, e.status]), [[3, EPROTO]]);
    for (const x of [twice, daemonOnly]) await x.v.exit;
  });

  test('S27: the daemon answers a VMM\'s PING with status 0', async () => {
    const p = await scripted('pinger', { attachArg: AttachFlag.EDITION2, after: [{ hex: hex({ type: MsgType.PING, seq: 40 }), fds: [] }] });
    await until('the PING result', async () => results(p.v, MsgType.PING).length === 1);
    assert.deepEqual(results(p.v, MsgType.PING).map((e) => [e.seq, e.status, e.arg]), [[40, 0, 0]]);
    await p.v.exit;
  });

  test('S12: unknown ATTACH bits get EOPNOTSUPP with the known bits in arg, and leave the token unspent', async () => {
    const { vm, attach_token } = await c.createVm({ name: 'unknown-bits', vmm_uid: 0 });
    const r = await rawExchange(handoff, [encode({ type: MsgType.ATTACH, seq: 1, status: 0, arg: 4 | AttachFlag.EDITION2, manifest: [], text: attach_token!.token })]);
    assert.equal(r.closed, true);
    assert.deepEqual(r.answers.map((m) => [m.type, m.status, m.arg]), [[MsgType.ATTACH | RESULT_BIT, EOPNOTSUPP, AttachFlag.PASSIVE | AttachFlag.EDITION2]]);
    assert.equal((await c.getVm(vm!.id)).state, 'VM_STATE_PENDING');
    const v = runVmm([process.execPath, REFERENCE_VMM, '--socket', handoff], attach_token!.token, false);
    vmms.push(v);
    await v.waitFor('attached');
    await c.deleteVm({ vm_id: vm!.id });
    await v.exit;
  });

  test('S13 ②: a refusal says in arg whether the token is still good (TOKEN_KEPT): at the session limit it is, and attaches later; a used one is not', async () => {
    // A daemon of its own, whose --max-sessions 2 two attached VMMs fill.
    const d = await startDaemon({ args: ['--max-sessions', '2'] });
    const c = d.client();
    const handoff = join(d.runtimeDir, 'handoff.sock');
    try {
      const holders = [];
      for (const name of ['holder-1', 'holder-2']) {
        const { vm, attach_token } = await c.createVm({ name, vmm_uid: 0 });
        const v = runVmm([process.execPath, REFERENCE_VMM, '--socket', handoff], attach_token!.token, false);
        vmms.push(v);
        await v.waitFor('guest');
        holders.push({ vmId: vm!.id, v });
      }
      const { vm, attach_token } = await c.createVm({ name: 'waits', vmm_uid: 0 });
      const full = await rawExchange(handoff, [encode({ type: MsgType.ATTACH, seq: 1, status: 0, arg: AttachFlag.EDITION2, manifest: [], text: attach_token!.token })]);
      assert.deepEqual(full.answers.map((m) => [m.status, m.arg & REFUSAL_TOKEN_KEPT]), [[EMFILE, REFUSAL_TOKEN_KEPT]]);
      assert.match(full.answers[0].text, /--max-sessions/);
      // Edition 1 gets arg 0, as before.
      const ed1 = await rawExchange(handoff, [encode({ type: MsgType.ATTACH, seq: 1, status: 0, arg: 0, manifest: [], text: attach_token!.token })]);
      assert.deepEqual(ed1.answers.map((m) => [m.status, m.arg]), [[EMFILE, 0]]);
      assert.equal((await c.getVm(vm!.id)).state, 'VM_STATE_PENDING');

      await c.deleteVm({ vm_id: holders[0].vmId });
      const v = runVmm([process.execPath, REFERENCE_VMM, '--socket', handoff], attach_token!.token, false);
      vmms.push(v);
      await v.waitFor('guest');
      await c.deleteVm({ vm_id: holders[1].vmId }); // below the limit again: the token is what is refused
      const used = await rawExchange(handoff, [encode({ type: MsgType.ATTACH, seq: 1, status: 0, arg: AttachFlag.EDITION2, manifest: [], text: attach_token!.token })]);
      assert.deepEqual(used.answers.map((m) => [m.status, m.arg]), [[EACCES, 0]]);
      assert.match(used.answers[0].text, /already used/);
      await c.deleteVm({ vm_id: vm!.id });
    } finally {
      await d.cleanup();
    }
  });
});
