/**
 * A fuzz run over the handoff socket of a real daemon (fake sysfs/dev tree,
 * real /dev/kvm), bounded in count and time:
 *
 *  1. anonymous peers, many at once: random records, mutated valid records,
 *     ATTACH with unknown tokens, results for requests never sent, unknown
 *     types, wrong fd counts, fds of the wrong kind (pipes, /dev/null, memfd,
 *     eventfd, sockets, /dev/kvm, a directory — and up to 40 on one record),
 *     oversize records, empty records, peers that half-close, peers that close
 *     at once, peers that wait past the attach timeout (300 ms here). Each must
 *     be answered only with refusals (a result with an errno and no fds) and
 *     be closed by the daemon within a bound;
 *  2. VMMs that attach with a real token and then misbehave (a process each,
 *     as root, test/helpers/fuzz-vmm.ts): leave right after ATTACH, send
 *     garbage, wrong fds, a second ATTACH, answers with the wrong seq or type,
 *     twice, with fds or never, passive VMMs that send VM_CREATED, then exit,
 *     linger or are killed — while the orchestrator calls CreateVfioDevice,
 *     AddGroup, RemoveGroup, CreateAttachToken, GetVm and DeleteVm on their
 *     VMs (each call must get a documented status, never INTERNAL). Each VM
 *     must end EXITED or FAILED (or be deleted) with its group back in the
 *     pool once its VMM is gone;
 *
 * and afterwards the daemon answers GetHostInfo, a real VMM (the reference
 * VMM, as uid 65534) still attaches and runs, the daemon's fd count is back
 * at its baseline, its RSS within 40 MB of the start, and it logged nothing
 * at error level.
 *
 * Seeded: KVMVFIO_FUZZ_SEED=N replays a run; KVMVFIO_FUZZ_SCALE multiplies the counts.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import fc from 'fast-check';
import { status } from '@grpc/grpc-js';
import { type KvmVfioApi, isApiError } from '../../src/client/client';
import { SeqpacketSocket, SysError } from '../../src/kernel';
import { MAX_RECORD_BYTES, MsgType, RESULT_BIT, decode, encode } from '../../src/protocol/session';
import { expectStatus, until } from '../helpers/assert';
import { type RunningDaemon, REPO, startDaemon } from '../helpers/daemon';
import { type FakeHost, makeFakeHost } from '../helpers/fakehost';
import { assertAlive, assertFdsBack, assertNoErrorLogs, fuzzSeed, logSummary, pool, rssBytes, runs, sleep, withSeed, within } from '../helpers/fuzz';
import type { FuzzVmmPlan, PlannedRecord } from '../helpers/fuzz-vmm';
import { EAGAIN, FD_KINDS, FdFactory, type FdKindName, rawSend, shutdownWrite } from '../helpers/rawsock';
import { TYPES, junkRecord, mutatedRecord, randomToken, uint32, validMessage } from '../helpers/records';
import { REFERENCE_VMM, runVmm, type VmmProc } from '../helpers/vmmproc';

const SEED = fuzzSeed('handoff');
const ATTACH_TIMEOUT_MS = 300;
const PEERS = runs(1000);
const VMM_PEERS = runs(15);
const WIDTH = 24;
const RSS_SLACK = 40 * 1024 * 1024;
const GROUPS = [5, 6, 8];
const FUZZ_VMM = join(REPO, 'dist', 'test', 'helpers', 'fuzz-vmm.js');

// --- what anonymous peers send ---------------------------------------------------

const otherType = fc.integer({ min: 0, max: 0xffff }).filter((t) => !TYPES.includes(t & ~RESULT_BIT));
const header = { status: 0, manifest: [] as { kind: number; id: number }[] };

const peerBytes: fc.Arbitrary<Uint8Array> = fc.oneof(
  { weight: 3, arbitrary: junkRecord },
  { weight: 4, arbitrary: mutatedRecord },
  { weight: 1, arbitrary: validMessage.map(encode) },
  // ATTACH with a token nobody issued, and every kind of arg.
  {
    weight: 3,
    arbitrary: fc
      .tuple(uint32, fc.oneof(randomToken, fc.constantFrom('', ' ', 'x'.repeat(4064)), fc.string({ unit: 'binary', maxLength: 100 })), fc.constantFrom(0, 1, 2, 3, 0x80000000, 2 ** 32, 2 ** 32 + 1, Number.MAX_SAFE_INTEGER))
      .map(([seq, text, arg]) => encode({ type: MsgType.ATTACH, seq, arg, ...header, text })),
  },
  // Anything else first: PING, VM_CREATED, daemon-only requests.
  { weight: 2, arbitrary: fc.tuple(fc.constantFrom(...TYPES.filter((t) => t !== MsgType.ATTACH)), uint32).map(([type, seq]) => encode({ type, seq, arg: 0, ...header, text: '' })) },
  // Results for requests never sent.
  { weight: 2, arbitrary: fc.tuple(fc.constantFrom(...TYPES), uint32, fc.nat(200)).map(([t, seq, status]) => encode({ type: t | RESULT_BIT, seq, status, arg: 0, manifest: [], text: 'ok' })) },
  // Unknown types, otherwise well formed.
  {
    weight: 1,
    arbitrary: fc.tuple(otherType, uint32).map(([type, seq]) => {
      const b = encode({ type: MsgType.PING, seq, arg: 0, ...header, text: 'x' });
      b.writeUInt16LE(type, 6);
      return b;
    }),
  },
  // A manifest: fds described (the fds attached may or may not match).
  { weight: 2, arbitrary: fc.tuple(fc.integer({ min: 1, max: 8 }), fc.constantFrom(...TYPES)).map(([n, type]) => encode({ type, seq: 1, status: 0, arg: 0, manifest: Array.from({ length: n }, () => ({ kind: 3, id: 5 })), text: '' })) },
  // Oversize: up to four times the limit.
  { weight: 1, arbitrary: fc.uint8Array({ minLength: MAX_RECORD_BYTES + 1, maxLength: 4 * MAX_RECORD_BYTES }) },
  // Exactly the limit.
  { weight: 1, arbitrary: fc.constant(encode({ type: MsgType.ATTACH, seq: 1, arg: 0, ...header, text: 'y'.repeat(MAX_RECORD_BYTES - 32) })) },
  // Empty (on SOCK_SEQPACKET, indistinguishable from end of stream unless fds ride along).
  { weight: 1, arbitrary: fc.constant(new Uint8Array(0)) },
);

const fdList: fc.Arbitrary<FdKindName[]> = fc.oneof(
  { weight: 6, arbitrary: fc.constant<FdKindName[]>([]) },
  { weight: 3, arbitrary: fc.array(fc.constantFrom(...FD_KINDS), { minLength: 1, maxLength: 8 }) },
  { weight: 1, arbitrary: fc.array(fc.constantFrom(...FD_KINDS), { minLength: 9, maxLength: 40 }) },
);

interface PeerPlan {
  delayMs: number;
  records: { bytes: Uint8Array; fds: FdKindName[] }[];
  end: 'close' | 'half-close' | 'read-to-eof';
}

const peerPlan: fc.Arbitrary<PeerPlan> = fc.record({
  delayMs: fc.oneof({ weight: 8, arbitrary: fc.constant(0) }, { weight: 2, arbitrary: fc.integer({ min: 0, max: 250 }) }, { weight: 1, arbitrary: fc.integer({ min: ATTACH_TIMEOUT_MS + 50, max: ATTACH_TIMEOUT_MS + 200 }) }),
  records: fc.oneof({ weight: 1, arbitrary: fc.constant<PeerPlan['records']>([]) }, { weight: 12, arbitrary: fc.array(fc.record({ bytes: peerBytes, fds: fdList }), { minLength: 1, maxLength: 10 }) }),
  end: fc.constantFrom('close', 'half-close', 'read-to-eof', 'read-to-eof'),
});

/** Connects without blocking the test's event loop; retries while the daemon's backlog is full. */
async function connect(path: string): Promise<SeqpacketSocket> {
  for (let i = 0; ; i++) {
    try {
      return SeqpacketSocket.connect(path, true);
    } catch (e) {
      if (!(e instanceof SysError && e.code === 'EAGAIN') || i > 200) throw e;
      await sleep(10);
    }
  }
}

interface PeerStats {
  sent: number;
  refusals: number;
  fdsSent: number;
}

/**
 * Reads until the daemon closes the connection. Every record it sends before
 * is a refusal: a result, an errno, no fds.
 */
async function readToEof(sock: SeqpacketSocket, timeoutMs: number, stats: PeerStats, what: string): Promise<void> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    let r;
    try {
      r = sock.recv();
    } catch (e) {
      if (e instanceof SysError && e.code === 'ECONNRESET') return; // closed with our records unread
      throw e;
    }
    if (r) {
      if (r.data.length === 0 && r.fds.length === 0) return;
      for (const f of r.fds) f.closeSync();
      assert.equal(r.fds.length, 0, `${what}: the daemon sent ${r.fds.length} fds to an unattached peer`);
      assert.ok(!r.truncated, `${what}: truncated record from the daemon`);
      const m = decode(r.data, 0);
      assert.ok(m.type & RESULT_BIT, `${what}: the daemon sent a request (${m.type}) to an unattached peer`);
      // A PING sent after an ATTACH (while the daemon checks the token) is answered; nothing else succeeds.
      assert.ok(m.status > 0 || m.type === (MsgType.PING | RESULT_BIT), `${what}: a result with status 0 (${m.type}, ${m.text}) to an unattached peer`);
      stats.refusals++;
      continue;
    }
    if (Date.now() > end) assert.fail(`${what}: the daemon did not close the connection within ${timeoutMs} ms`);
    await sleep(10);
  }
}

async function runPeer(handoff: string, plan: PeerPlan, stats: PeerStats, what: string): Promise<void> {
  const sock = await connect(handoff);
  const fdf = new FdFactory(handoff);
  try {
    if (plan.delayMs) await sleep(plan.delayMs);
    for (const rec of plan.records) {
      const fds = rec.fds.map((k) => fdf.make(k));
      let err = rawSend(sock.fd, rec.bytes, fds);
      for (let i = 0; err === EAGAIN && i < 20; i++) {
        await sleep(10);
        err = rawSend(sock.fd, rec.bytes, fds);
      }
      fdf.closeAll();
      if (err === 0) {
        stats.sent++;
        stats.fdsSent += fds.length;
      } else if (err !== EAGAIN) break; // EPIPE / ECONNRESET: the daemon has closed it
    }
    if (plan.end === 'close') return;
    if (plan.end === 'half-close') shutdownWrite(sock.fd);
    await readToEof(sock, ATTACH_TIMEOUT_MS + plan.delayMs + 5000, stats, what);
  } finally {
    fdf.closeAll();
    sock.closeSync();
  }
}

// --- VMMs with real tokens that misbehave -------------------------------------------

const plannedRecord: fc.Arbitrary<PlannedRecord> = fc.record({
  hex: fc.oneof(peerBytes.filter((b) => b.length <= 5000), fc.constant(encode({ type: MsgType.ATTACH, seq: 9, arg: 0, ...header, text: 'again' }))).map((b) => Buffer.from(b).toString('hex')),
  fds: fc.oneof({ weight: 3, arbitrary: fc.constant<FdKindName[]>([]) }, { weight: 1, arbitrary: fc.array(fc.constantFrom(...FD_KINDS), { minLength: 1, maxLength: 3 }) }),
});

type ApiOp = 'vfio-device' | 'add-group' | 'remove-group' | 'token' | 'get' | 'delete' | 'delete-force';

interface VmmCase {
  plan: FuzzVmmPlan;
  vfioDevice: boolean;
  withGroup: boolean;
  memlock: number;
  /** Calls the orchestrator makes while the VMM misbehaves. */
  ops: { op: ApiOp; delayMs: number }[];
}

/**
 * What a call made while the VMM misbehaves may answer: the kernel's verdict
 * as relayed, the VMM's silence or absence, a state that takes no change.
 * INTERNAL is not among them: nothing a VMM does is a bug of the daemon.
 */
const OP_CODES = new Set<status>([
  status.OK,
  status.ALREADY_EXISTS,
  status.INVALID_ARGUMENT,
  status.NOT_FOUND,
  status.FAILED_PRECONDITION,
  status.PERMISSION_DENIED,
  status.DEADLINE_EXCEEDED,
  status.UNAVAILABLE,
]);

const vmmCase: fc.Arbitrary<VmmCase> = fc.record({
  plan: fc.record({
    attachArg: fc.constantFrom(0, 0, 0, 1),
    attachThen: fc.constantFrom('wait', 'wait', 'wait', 'wait', 'half-close', 'close'),
    before: fc.oneof({ weight: 3, arbitrary: fc.constant<PlannedRecord[]>([]) }, { weight: 1, arbitrary: fc.array(plannedRecord, { minLength: 1, maxLength: 2 }) }),
    sendCreated: fc.oneof({ weight: 4, arbitrary: fc.constant(true) }, { weight: 1, arbitrary: fc.constant(false) }),
    responder: fc.oneof(
      { weight: 4, arbitrary: fc.constant('ok' as const) },
      { weight: 4, arbitrary: fc.constantFrom('errno', 'wrong-seq', 'wrong-type', 'silent', 'garbage', 'with-fds', 'twice') },
    ),
    // Errnos the API maps (an unmapped one is its own test below).
    errno: fc.constantFrom(1, 2, 9, 16, 17, 22, 25),
    after: fc.array(plannedRecord, { maxLength: 3 }),
    afterAtMs: fc.integer({ min: 0, max: 1000 }),
    serveMs: fc.integer({ min: 300, max: 1000 }),
    end: fc.constantFrom('exit', 'kill', 'close-linger', 'half-close-linger'),
    lingerMs: fc.integer({ min: 0, max: 400 }),
  }) as fc.Arbitrary<FuzzVmmPlan>,
  vfioDevice: fc.boolean(),
  withGroup: fc.boolean(),
  memlock: fc.constantFrom(0, 0, 4 << 20),
  ops: fc.array(
    fc.record({
      op: fc.constantFrom<ApiOp>('vfio-device', 'add-group', 'add-group', 'remove-group', 'token', 'get', 'delete', 'delete-force'),
      delayMs: fc.integer({ min: 0, max: 150 }),
    }),
    { maxLength: 3 },
  ),
});

// --- the run ------------------------------------------------------------------------

describe(`handoff socket fuzz (seed ${SEED})`, () => {
  let host: FakeHost;
  let d: RunningDaemon;
  let c: KvmVfioApi;
  let handoff: string;
  let baseFds: number;
  let baseRss: number;
  const vmms: VmmProc[] = [];

  /** A real VMM (the reference VMM as uid 65534) attaches, runs its guest, and goes on DeleteVm. */
  async function realAttach(name: string): Promise<void> {
    const { vm, attach_token } = await c.createVm({ name, vmm_uid: 65534, vfio_device: true });
    const v = runVmm([process.execPath, REFERENCE_VMM, '--socket', handoff], attach_token!.token);
    vmms.push(v);
    assert.equal((await v.waitFor('guest')).halted, true);
    await until(`${name} RUNNING`, async () => (await c.getVm(vm!.id)).state === 'VM_STATE_RUNNING', 5000);
    await c.deleteVm({ vm_id: vm!.id });
    assert.equal((await v.exit).code, 0);
  }

  before(async () => {
    host = await makeFakeHost(GROUPS.map((n) => ({ number: n, devices: [{ address: `0000:00:0${n}.0`, vendor: '8086', device: '10d3', class: '020000', driver: 'vfio-pci' }] })));
    d = await startDaemon({
      sysfs: host.sysfs,
      dev: host.dev,
      args: ['--attach-timeout-ms', String(ATTACH_TIMEOUT_MS), '--vmm-timeout-ms', '300', '--vmm-exit-grace-ms', '2000'],
    });
    c = d.client();
    handoff = join(d.runtimeDir, 'handoff.sock');
    // Warm up every path once (a real attach, a refusal, a garbled record) so lazily made things count in the baseline.
    await c.getHostInfo();
    await realAttach('warm-up');
    // The daemon keeps a group's fd once it claimed the group ("opened once, for good"): claim each now.
    const all = await c.createVm({ name: 'claim-all', vmm_uid: 0, vfio_device: true, groups: GROUPS });
    await c.deleteVm({ vm_id: all.vm!.id });
    const s = await connect(handoff);
    rawSend(s.fd, encode({ type: MsgType.PING, seq: 1, arg: 0, ...header, text: '' }));
    await readToEof(s, 3000, { sent: 0, refusals: 0, fdsSent: 0 }, 'warm-up');
    s.closeSync();
    await sleep(200);
    baseFds = await d.fdCount();
    baseRss = await rssBytes(d.pid);
  });

  after(async () => {
    for (const v of vmms) v.kill();
    await d?.cleanup();
    await host?.cleanup();
  });

  test(`${PEERS} anonymous peers, ${WIDTH} at a time: refusals only, every connection closed by the daemon`, async (t) => {
    const plans = fc.sample(peerPlan, { seed: SEED, numRuns: PEERS });
    const stats: PeerStats = { sent: 0, refusals: 0, fdsSent: 0 };
    const t0 = Date.now();
    await withSeed('handoff peers', SEED, () => pool(WIDTH, plans, (p, i) => runPeer(handoff, p, stats, `peer ${i}`)));
    t.diagnostic(`${PEERS} peers, ${stats.sent} records (${stats.fdsSent} fds) sent, ${stats.refusals} refusals read, ${Date.now() - t0} ms`);
    assert.ok(stats.sent >= PEERS, `only ${stats.sent} records went out`);
    assertAlive(d);
    await c.getHostInfo();
    const ended = d.logs.filter((l) => l.event === 'session-end').length;
    const garbled = d.logs.filter((l) => l.event === 'session-protocol-error').length;
    const timedOut = d.logs.filter((l) => l.event === 'session-end' && /no ATTACH within/.test(String(l.reason))).length;
    t.diagnostic(`daemon: ${ended} sessions ended, ${garbled} for a protocol error, ${timedOut} by the attach timeout`);
    assert.ok(garbled > 0 && timedOut > 0);
  });

  test('slow peers: 64 connections that never speak are all closed after the attach timeout', async () => {
    const socks = await Promise.all(Array.from({ length: 64 }, () => connect(handoff)));
    const t0 = Date.now();
    try {
      await Promise.all(socks.map((s, i) => readToEof(s, ATTACH_TIMEOUT_MS + 5000, { sent: 0, refusals: 0, fdsSent: 0 }, `slow peer ${i}`)));
    } finally {
      for (const s of socks) s.closeSync();
    }
    assert.ok(Date.now() - t0 >= ATTACH_TIMEOUT_MS - 50, 'closed before the attach timeout');
  });

  test('a peer that floods one connection until its queue is full is closed and costs nothing', async () => {
    const s = await connect(handoff);
    let sent = 0;
    try {
      const rec = encode({ type: MsgType.PING, seq: 1, arg: 0, ...header, text: 'z'.repeat(1000) });
      while (sent < 10_000 && rawSend(s.fd, rec) === 0) sent++;
      await readToEof(s, 5000, { sent: 0, refusals: 0, fdsSent: 0 }, 'flooding peer');
    } finally {
      s.closeSync();
    }
    assert.ok(sent > 1);
    await c.getHostInfo();
  });

  test(`${VMM_PEERS} VMMs with real tokens misbehave after attaching: each VM ends EXITED or FAILED, its group back`, async (t) => {
    const cases = fc.sample(vmmCase, { seed: SEED ^ 0x5a5a, numRuns: VMM_PEERS });
    const outcomes = new Map<string, number>();
    const opCodes = new Map<string, number>();
    const opDetails = new Set<string>();
    // One lane per group, so that no two cases want the same group at once.
    const lanes = GROUPS.map((g, lane) => cases.filter((_, i) => i % GROUPS.length === lane).map((k) => ({ ...k, group: g })));
    let n = 0;
    await withSeed('misbehaving VMMs', SEED, () =>
      Promise.all(
        lanes.map(async (lane) => {
          for (const k of lane) {
            const i = n++;
            const name = `fuzz-vmm-${i}`;
            const groups = k.withGroup ? [k.group] : [];
            const { vm, attach_token } = await c.createVm({ name, vmm_uid: 0, vfio_device: k.vfioDevice || groups.length > 0, groups, memlock_bytes: String(k.memlock) });
            const planFile = join(d.dir, `plan-${i}.json`);
            await writeFile(planFile, JSON.stringify(k.plan));
            const v = runVmm([process.execPath, FUZZ_VMM, handoff, planFile], attach_token!.token, false);
            vmms.push(v);
            let deleted = false;
            // The calls start once the VMM has presented its token (a new token before that would, rightly, void it).
            await until(`${name}: the VMM to attach`, async () => v.events.find((e) => ['attached', 'left', 'attach-refused', 'error'].includes(e.event)), 10_000);
            for (const { op, delayMs } of k.ops) {
              await sleep(delayMs);
              const id = vm!.id;
              const call: Promise<unknown> =
                op === 'vfio-device' ? c.createVfioDevice(id)
                : op === 'add-group' ? c.addGroup({ vm_id: id, group: k.group })
                : op === 'remove-group' ? c.removeGroup({ vm_id: id, group: k.group })
                : op === 'token' ? c.createAttachToken(id)
                : op === 'get' ? c.getVm(id)
                : c.deleteVm({ vm_id: id, force: op === 'delete-force' });
              const code = await call.then(
                () => status.OK,
                (e: unknown) => {
                  assert.ok(isApiError(e), String(e));
                  assert.ok(OP_CODES.has(e.code), `${name}: ${op} while the VMM misbehaves: ${status[e.code]} ${e.details}; plan ${JSON.stringify(k.plan)}`);
                  opDetails.add(`${op}: ${status[e.code]} ${e.details.slice(0, 90)}`);
                  return e.code;
                },
              );
              const key = `${op}:${status[code]}`;
              opCodes.set(key, (opCodes.get(key) ?? 0) + 1);
              if (op.startsWith('delete') && code === status.OK) deleted = true;
              if (deleted) break;
            }
            const exit = await within(v.exit, 10_000);
            assert.ok(exit, `${name}: the fuzz VMM did not end (plan ${JSON.stringify(k.plan)}); events ${JSON.stringify(v.events)}`);
            if (k.plan.attachThen === 'wait') assert.ok(v.events.some((e) => e.event === 'attached'), `${name}: did not attach: ${JSON.stringify(v.events)} ${v.stderr()}`);
            if (deleted) {
              await expectStatus(c.getVm(vm!.id), status.NOT_FOUND);
              for (const g of [k.group]) await until(`${name}: group ${g} free`, async () => (await c.getIommuGroup(g)).vm_id === '', 5000);
              outcomes.set('DELETED', (outcomes.get('DELETED') ?? 0) + 1);
              continue;
            }
            const ended = await until(
              `${name} EXITED or FAILED`,
              async () => {
                const g = await c.getVm(vm!.id);
                return (g.state === 'VM_STATE_EXITED' || g.state === 'VM_STATE_FAILED') && g;
              },
              5000,
            ).catch(async (e: Error) => assert.fail(`${e.message}: ${JSON.stringify(await c.getVm(vm!.id))}; plan ${JSON.stringify(k.plan)}; VMM events ${JSON.stringify(v.events)}`));
            outcomes.set(ended.state, (outcomes.get(ended.state) ?? 0) + 1);
            if (process.env.KVMVFIO_FUZZ_DEBUG) t.diagnostic(`${name} ${ended.state} ${JSON.stringify(v.events.map((e) => e.event + (e.reason ? `(${String(e.reason).slice(0, 60)})` : "")))} resp=${k.plan.responder} created=${k.plan.sendCreated} before=${k.plan.before.length} ${ended.failure_reason}`);
            assert.equal((await c.getIommuGroup(k.group)).vm_id, '', `${name}: group ${k.group} still held`);
            await c.deleteVm({ vm_id: vm!.id });
          }
        }),
      ),
    );
    t.diagnostic(`outcomes: ${JSON.stringify([...outcomes])}; API calls meanwhile: ${JSON.stringify([...opCodes].sort())}`);
    t.diagnostic(`refusals seen: ${JSON.stringify([...opDetails].sort().slice(0, 12))}`);
    assert.deepEqual((await c.listVms({})).vms, []);
  });

  test('afterwards: the daemon answers, a real VMM attaches, fds back at baseline, RSS near the start, no error logged', async (t) => {
    assertAlive(d);
    const info = await c.getHostInfo();
    assert.equal(info.kvm_api_version, 12);
    await realAttach('after-fuzz');
    for (const g of GROUPS) assert.equal((await c.getIommuGroup(g)).vm_id, '');
    await assertFdsBack(d, baseFds, 10_000);
    const rss = await rssBytes(d.pid);
    t.diagnostic(`fds ${await d.fdCount()} (baseline ${baseFds}); RSS ${(rss / 2 ** 20).toFixed(1)} MiB (start ${(baseRss / 2 ** 20).toFixed(1)} MiB)`);
    assert.ok(rss <= baseRss + RSS_SLACK, `RSS grew from ${baseRss} to ${rss}`);
    t.diagnostic(`daemon warnings and worse: ${logSummary(d)}`);
    assertNoErrorLogs(d);
  });

  // A VMM's answer is input like any other: an errno the status table does not
  // list (EIO, ENOSYS, or junk) is the VMM's verdict, not a daemon bug, and
  // should not come back as INTERNAL nor log at error level.
  test('a VMM that answers with an errno the API does not map: not INTERNAL, nothing logged at error level', async () => {
    const errors = () => d.logs.filter((l) => l.level >= 50).length;
    const before = errors();
    const seen: string[] = [];
    for (const errno of [5 /* EIO */, 38 /* ENOSYS */, 0x7fffffff]) {
      const { vm, attach_token } = await c.createVm({ name: `errno-${errno}`, vmm_uid: 0 });
      const plan: FuzzVmmPlan = { attachArg: 0, attachThen: 'wait', before: [], sendCreated: true, responder: 'errno', errno, after: [], afterAtMs: 0, serveMs: 1500, end: 'exit', lingerMs: 0 };
      const planFile = join(d.dir, `plan-errno-${errno}.json`);
      await writeFile(planFile, JSON.stringify(plan));
      const v = runVmm([process.execPath, FUZZ_VMM, handoff, planFile], attach_token!.token, false);
      vmms.push(v);
      await until('RUNNING', async () => (await c.getVm(vm!.id)).state === 'VM_STATE_RUNNING', 5000);
      const code = await c.createVfioDevice(vm!.id).then(
        () => 'OK',
        (e: unknown) => (isApiError(e) ? `${status[e.code]}: ${e.details}` : String(e)),
      );
      seen.push(`errno ${errno} → ${code}`);
      await c.deleteVm({ vm_id: vm!.id, force: true });
      await v.exit;
    }
    assert.ok(seen.every((x) => !x.includes('INTERNAL')), seen.join('; '));
    assert.equal(errors(), before, `error-level log lines: ${JSON.stringify(d.logs.filter((l) => l.level >= 50).slice(-3))}`);
  });

  // docs/session-protocol.md, S12: ATTACH's arg has bits 0 (passive) and 1 (edition 2); any other is refused with
  // EOPNOTSUPP and the known bits in arg. JS bitwise operators keep 32 bits: bits 32..52 must not pass.
  test('S12: an ATTACH whose arg has bits above 31 set is refused with EOPNOTSUPP, naming the bits the daemon knows', async () => {
    const s = await connect(handoff);
    try {
      rawSend(s.fd, encode({ type: MsgType.ATTACH, seq: 77, arg: 2 ** 32, ...header, text: 'bits-above-31' }));
      const r = await until('the result', async () => s.recv() ?? undefined, 3000);
      const m = decode(r.data, r.fds.length);
      assert.deepEqual([m.type, m.seq, m.status, m.arg, r.fds.length], [MsgType.ATTACH | RESULT_BIT, 77, 95, 3, 0]);
      assert.match(m.text, /bits this kvmvfiod does not know \(0x100000000\)/);
      const stats = { sent: 0, refusals: 0, fdsSent: 0 };
      await readToEof(s, 3000, stats, 'ATTACH arg 2^32');
      assert.equal(stats.refusals, 0, 'nothing after the refusal: the session ends');
    } finally {
      s.closeSync();
    }
  });
});
