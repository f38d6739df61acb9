/**
 * A fuzz run over the gRPC API socket of a real daemon (fake sysfs/dev tree):
 * request bytes encoded from valid messages (CreateVm, AddGroup, ListVms,
 * WatchVms, GetVm, GetIommuGroup) and then mutated — bit flips, truncations,
 * insertions, deletions, repeated ranges, overlong varints, bad wire types —
 * plus random bytes, unknown methods and oversize messages, sent through
 * grpc-js with identity serializers; and malformed gRPC framing sent over
 * plain HTTP/2 (wrong length prefixes, compressed flags, no message, two
 * messages, wrong content type, a corrupt gzip body).
 *
 * Every call must end, within its deadline, with a gRPC status the API
 * documents: an error status never carries a stack or the daemon's internals
 * (INTERNAL only as grpc-js's own "Error deserializing request"; an INTERNAL
 * with a log reference is a daemon bug), INVALID_ARGUMENT names its field, an
 * OK reply decodes. Afterwards the daemon answers, its fd count is back at
 * its baseline, its RSS near the start, it logged nothing at error level, and
 * its state changed only by the creates that succeeded: every VM listed is
 * well formed, the VMs made before the run are as they were.
 *
 * Seeded: KVMVFIO_FUZZ_SEED=N replays a run; KVMVFIO_FUZZ_SCALE multiplies the counts.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { connect as h2connect, constants as h2 } from 'node:http2';
import { connect as netConnect } from 'node:net';
import { totalmem } from 'node:os';
import { gzipSync } from 'node:zlib';
import * as grpc from '@grpc/grpc-js';
import fc from 'fast-check';
import { loadApi } from '../../src/api/proto';
import type { KvmVfioApi, Vm } from '../../src/client/client';
import { type RunningDaemon, startDaemon } from '../helpers/daemon';
import { type FakeHost, makeFakeHost } from '../helpers/fakehost';
import { assertAlive, assertFdsBack, assertNoErrorLogs, fuzzSeed, logSummary, pool, rssBytes, runs, sleep, withSeed } from '../helpers/fuzz';

const SEED = fuzzSeed('grpc');
const CASES = runs(6000);
const WIDTH = 8;
const DEADLINE_MS = 5000;
const GROUPS = [5, 6, 8];
const MAX_REQUEST = 64 * 1024;
const RSS_SLACK = 40 * 1024 * 1024;
const SERVICE = 'kvmvfio.v1.KvmVfio';

type MethodDef = grpc.MethodDefinition<object, object>;
const api = loadApi().definition[SERVICE] as unknown as Record<string, MethodDef>;

// --- valid requests, as the generated client would send them ----------------------

const uint32 = fc.integer({ min: 0, max: 0xffffffff });
const dnsLabel = fc.stringMatching(/^[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?$/);
const labels = fc.dictionary(fc.stringMatching(/^[A-Za-z0-9._/-]{1,12}$/), fc.string({ maxLength: 12 }), { maxKeys: 4, noNullPrototype: true });
const states = fc.array(fc.constantFrom('VM_STATE_UNSPECIFIED', 'VM_STATE_PENDING', 'VM_STATE_RUNNING', 'VM_STATE_EXITED', 'VM_STATE_FAILED'), { maxLength: 3 });
const groupNumber = fc.oneof(fc.constantFrom(...GROUPS), uint32);

const pageSize = fc.oneof(fc.constant(0), fc.integer({ min: -1, max: 600 }), fc.integer({ min: -(2 ** 31), max: 2 ** 31 - 1 }));
/** Mostly none; else junk, or the shape of a real token (20 base64url characters) with random content. */
const pageToken = fc.oneof({ weight: 3, arbitrary: fc.constant('') }, fc.string({ maxLength: 30 }), fc.stringMatching(/^[A-Za-z0-9_-]{20}$/));

/** A VM id for AddGroup/GetVm: one of the targets made before the run (by index), or a random one. */
const vmRef = fc.oneof(fc.nat(3).map((i) => ({ target: i })), fc.uuid().map((id) => ({ id })));

type Request = {
  method: 'CreateVm' | 'AddGroup' | 'RemoveGroup' | 'CreateVfioDevice' | 'CreateAttachToken' | 'DeleteVm' | 'ListVms' | 'WatchVms' | 'GetVm' | 'GetIommuGroup' | 'GetHostInfo';
  body: Record<string, unknown>;
  ref?: { target: number } | { id: string };
};

const request: fc.Arbitrary<Request> = fc.oneof(
  {
    weight: 4,
    arbitrary: fc
      .record({
        name: fc.oneof(dnsLabel, fc.string({ maxLength: 20 })),
        labels,
        vmm_uid: fc.oneof(fc.constantFrom(0, 65534), uint32),
        vfio_device: fc.boolean(),
        groups: fc.uniqueArray(groupNumber, { maxLength: 3 }),
        memlock_bytes: fc.oneof(fc.constant('0'), fc.bigInt({ min: 0n, max: 1n << 34n }).map(String)),
        request_id: fc.oneof(fc.constant(''), fc.stringMatching(/^[a-z0-9]{1,8}$/)),
      })
      .map((body) => ({ method: 'CreateVm' as const, body })),
  },
  { weight: 3, arbitrary: fc.tuple(vmRef, groupNumber).map(([ref, group]) => ({ method: 'AddGroup' as const, body: { group }, ref })) },
  { weight: 1, arbitrary: fc.tuple(vmRef, groupNumber).map(([ref, group]) => ({ method: 'RemoveGroup' as const, body: { group }, ref })) },
  { weight: 1, arbitrary: vmRef.map((ref) => ({ method: 'CreateVfioDevice' as const, body: {}, ref })) },
  { weight: 1, arbitrary: vmRef.map((ref) => ({ method: 'CreateAttachToken' as const, body: {}, ref })) },
  // Only ids nobody has: the VMs made before the run must stay.
  { weight: 1, arbitrary: fc.tuple(fc.uuid(), fc.boolean()).map(([id, force]) => ({ method: 'DeleteVm' as const, body: { force }, ref: { id } })) },
  { weight: 2, arbitrary: fc.record({ labels, states, page_size: pageSize, page_token: pageToken }).map((body) => ({ method: 'ListVms' as const, body })) },
  { weight: 2, arbitrary: fc.record({ labels, states }).map((body) => ({ method: 'WatchVms' as const, body })) },
  { weight: 1, arbitrary: vmRef.map((ref) => ({ method: 'GetVm' as const, body: {}, ref })) },
  { weight: 1, arbitrary: groupNumber.map((number) => ({ method: 'GetIommuGroup' as const, body: { number } })) },
  { weight: 1, arbitrary: fc.constant({ method: 'GetHostInfo' as const, body: {} }) },
);

// --- byte mutations ----------------------------------------------------------------

type ByteMutation =
  | { op: 'flip'; at: number; bit: number }
  | { op: 'truncate'; at: number }
  | { op: 'insert'; at: number; bytes: Uint8Array }
  | { op: 'delete'; at: number; n: number }
  | { op: 'repeat'; at: number; n: number }
  | { op: 'set'; at: number; value: number }
  | { op: 'append'; bytes: Uint8Array };

/** Protobuf-shaped junk: overlong varints, bad wire types, field 0, huge lengths, deep groups. */
const protoJunk = fc.constantFrom(
  Buffer.from([0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]), // 11-byte varint
  Buffer.from([0x0f]), // wire type 7
  Buffer.from([0x0e, 0x00]), // wire type 6
  Buffer.from([0x00, 0x00]), // field 0
  Buffer.from([0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f]), // a string of 4 GiB
  Buffer.from([0x12, 0x05, 0x0a, 0x80, 0x80, 0x80, 0x80]), // a map entry with a truncated varint
  Buffer.from([0x13, 0x13, 0x13, 0x13, 0x14]), // unbalanced start-groups
  Buffer.from('0b'.repeat(200), 'hex'), // 200 nested start-groups (field 1)
  Buffer.from([0x2a, 0x03, 0xff, 0xff, 0xff]), // packed groups with a bad varint
  Buffer.from([0x28, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x02]), // uint32 field with 70 bits
  Buffer.from([0x18, 0xff, 0xff, 0xff, 0xff, 0x1f]), // vmm_uid above 2^32
  Buffer.from([0x10, 0xff, 0xff, 0xff, 0xff, 0x0f]), // group/states as a big number
  Buffer.from([0x12, 0x04, 0x0a, 0x02, 0xc3, 0x28]), // a map key that is not UTF-8
  Buffer.from([0x0a, 0x03, 0xed, 0xa0, 0x80]), // a string holding a UTF-16 surrogate
);

const byteMutation: fc.Arbitrary<ByteMutation> = fc.oneof(
  fc.record({ op: fc.constant('flip' as const), at: fc.nat(300), bit: fc.nat(7) }),
  fc.record({ op: fc.constant('truncate' as const), at: fc.nat(300) }),
  fc.record({ op: fc.constant('insert' as const), at: fc.nat(300), bytes: fc.oneof(fc.uint8Array({ minLength: 1, maxLength: 16 }), protoJunk) }),
  fc.record({ op: fc.constant('delete' as const), at: fc.nat(300), n: fc.integer({ min: 1, max: 8 }) }),
  fc.record({ op: fc.constant('repeat' as const), at: fc.nat(300), n: fc.integer({ min: 1, max: 40 }) }),
  fc.record({ op: fc.constant('set' as const), at: fc.nat(300), value: fc.constantFrom(0x00, 0x7f, 0x80, 0xff, 0x0a, 0x12, 0x2a) }),
  fc.record({ op: fc.constant('append' as const), bytes: fc.oneof(protoJunk, fc.uint8Array({ minLength: 1, maxLength: 32 })) }),
);

function applyBytes(b: Buffer, m: ByteMutation): Buffer {
  const at = b.length ? ('at' in m ? m.at % (b.length + 1) : 0) : 0;
  switch (m.op) {
    case 'flip': {
      if (!b.length) return b;
      const c = Buffer.from(b);
      c[at % b.length] ^= 1 << m.bit;
      return c;
    }
    case 'truncate':
      return b.subarray(0, at);
    case 'insert':
      return Buffer.concat([b.subarray(0, at), m.bytes, b.subarray(at)]);
    case 'delete':
      return Buffer.concat([b.subarray(0, at), b.subarray(at + m.n)]);
    case 'repeat':
      return Buffer.concat([b.subarray(0, at + m.n), b.subarray(at)]);
    case 'set': {
      if (!b.length) return b;
      const c = Buffer.from(b);
      c[at % b.length] = m.value;
      return c;
    }
    case 'append':
      return Buffer.concat([b, m.bytes]);
  }
}

interface Case {
  req: Request;
  shape: 'valid' | 'mutated' | 'random' | 'oversize' | 'unknown-method';
  mutations: ByteMutation[];
  random: Uint8Array;
}

const fuzzCase: fc.Arbitrary<Case> = fc.record({
  req: request,
  shape: fc.oneof(
    { weight: 3, arbitrary: fc.constant('valid' as const) },
    { weight: 12, arbitrary: fc.constant('mutated' as const) },
    { weight: 3, arbitrary: fc.constant('random' as const) },
    { weight: 1, arbitrary: fc.constant('unknown-method' as const) },
    { weight: 1, arbitrary: fc.constant('oversize' as const) },
  ),
  mutations: fc.array(byteMutation, { minLength: 1, maxLength: 4 }),
  random: fc.oneof(fc.uint8Array({ maxLength: 64 }), fc.uint8Array({ maxLength: 2000 })),
});

// --- checking replies -----------------------------------------------------------------

const FIELD_FIRST = /^[a-z_]+(\[.*\])?: /;
/** Details that would leak internals: a stack frame, a source path, a Node error code. */
const INTERNALS = /\n\s+at |\bat [\w.<>]+ \(|node_modules|\/work\/|\.[jt]s:\d+|\bERR_[A-Z_]+\b|TypeError|ReferenceError|RangeError/;
const OK_CODES = new Set<grpc.status>([
  grpc.status.OK,
  grpc.status.INVALID_ARGUMENT,
  grpc.status.NOT_FOUND,
  grpc.status.ALREADY_EXISTS,
  grpc.status.FAILED_PRECONDITION,
  grpc.status.RESOURCE_EXHAUSTED,
  grpc.status.INTERNAL,
  grpc.status.UNIMPLEMENTED,
]);

class Tally {
  readonly byCode = new Map<string, number>();
  readonly examples = new Map<string, string>();
  add(shape: string, code: grpc.status, details: string): void {
    const k = `${shape}:${grpc.status[code]}`;
    this.byCode.set(k, (this.byCode.get(k) ?? 0) + 1);
    if (!this.examples.has(`${grpc.status[code]}`) && details) this.examples.set(`${grpc.status[code]}`, details.slice(0, 120));
  }
  toString(): string {
    return [...this.byCode].sort().map(([k, v]) => `${k}=${v}`).join(' ');
  }
}

function checkStatus(what: string, shape: Case['shape'], code: grpc.status, details: string): void {
  assert.ok(OK_CODES.has(code), `${what}: status ${grpc.status[code]} (${details})`);
  assert.doesNotMatch(details, INTERNALS, `${what}: details leak internals: ${details}`);
  if (code === grpc.status.INTERNAL) {
    // grpc-js's answer to bytes that do not decode; anything else INTERNAL is a daemon bug.
    assert.equal(details, 'Error deserializing request', `${what}: INTERNAL from the daemon (a bug; see its log): ${details}`);
  }
  if (code === grpc.status.UNIMPLEMENTED) assert.equal(shape, 'unknown-method', `${what}: UNIMPLEMENTED`);
  if (code === grpc.status.INVALID_ARGUMENT) assert.match(details, FIELD_FIRST, `${what}: INVALID_ARGUMENT without the field first`);
  if (shape === 'oversize') assert.equal(code, grpc.status.RESOURCE_EXHAUSTED, `${what}: oversize request got ${grpc.status[code]}`);
}

// --- well-formed VMs ---------------------------------------------------------------------

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
function assertWellFormed(vm: Vm): void {
  const w = `vm ${JSON.stringify(vm)}`;
  assert.match(vm.id, UUID, w);
  assert.match(vm.name, /^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/, w);
  assert.ok(vm.name.length <= 63, w);
  const entries = Object.entries(vm.labels);
  assert.ok(entries.length <= 32 && entries.every(([k, v]) => /^[A-Za-z0-9._/-]{1,63}$/.test(k) && v.length <= 253 && !/[\u0000-\u001f\u007f]/.test(v)), w);
  assert.ok(['VM_STATE_PENDING', 'VM_STATE_RUNNING', 'VM_STATE_EXITED', 'VM_STATE_FAILED'].includes(vm.state), w);
  assert.equal(vm.owner_uid, 0, w);
  assert.ok(vm.vmm_uid >= 0 && vm.vmm_uid <= 0xfffffffe, w);
  assert.ok(vm.groups.every((g, i) => GROUPS.includes(g) && (i === 0 || vm.groups[i - 1] < g)), `${w}: groups`);
  assert.ok(!vm.groups.length || vm.vfio_device, w);
  assert.ok(/^\d+$/.test(vm.memlock_bytes) && BigInt(vm.memlock_bytes) <= BigInt(totalmem()), w);
  assert.ok(vm.request_id === '' || /^[A-Za-z0-9._:-]{1,128}$/.test(vm.request_id), w);
  assert.ok(!Number.isNaN(Date.parse(vm.create_time)) && !Number.isNaN(Date.parse(vm.update_time)), w);
  assert.ok(/^\d+$/.test(vm.revision) && BigInt(vm.revision) >= 1n, w);
}

// --- raw HTTP/2 ------------------------------------------------------------------------

interface RawReply {
  httpStatus?: number;
  grpcStatus?: number;
  grpcMessage?: string;
  body: Buffer;
}

/** One HTTP/2 request to the API socket, with the body given (framing and all); resolves with what came back. */
function rawH2(socketPath: string, path: string, body: Buffer, headers: Record<string, string> = {}, timeoutMs = DEADLINE_MS): Promise<RawReply> {
  return new Promise((resolve, reject) => {
    const session = h2connect('http://localhost', { createConnection: () => netConnect(socketPath) });
    const timer = setTimeout(() => {
      session.destroy();
      reject(new Error(`no reply to ${path} within ${timeoutMs} ms`));
    }, timeoutMs);
    session.on('error', () => undefined);
    const reply: RawReply = { body: Buffer.alloc(0) };
    const req = session.request({
      [h2.HTTP2_HEADER_METHOD]: 'POST',
      [h2.HTTP2_HEADER_PATH]: path,
      [h2.HTTP2_HEADER_CONTENT_TYPE]: 'application/grpc',
      te: 'trailers',
      ...headers,
    });
    const chunks: Buffer[] = [];
    req.on('response', (h) => {
      reply.httpStatus = Number(h[h2.HTTP2_HEADER_STATUS]);
      if (h['grpc-status'] !== undefined) reply.grpcStatus = Number(h['grpc-status']);
      if (h['grpc-message'] !== undefined) reply.grpcMessage = decodeURIComponent(String(h['grpc-message']));
    });
    req.on('trailers', (h) => {
      if (h['grpc-status'] !== undefined) reply.grpcStatus = Number(h['grpc-status']);
      if (h['grpc-message'] !== undefined) reply.grpcMessage = decodeURIComponent(String(h['grpc-message']));
    });
    req.on('data', (c: Buffer) => chunks.push(c));
    const done = () => {
      clearTimeout(timer);
      reply.body = Buffer.concat(chunks);
      session.close();
      resolve(reply);
    };
    req.on('close', done);
    req.on('error', () => undefined);
    req.end(body);
  });
}

/** A gRPC length-prefixed message frame. */
const frame = (msg: Buffer, compressed = 0, claimed = msg.length) => {
  const h = Buffer.alloc(5);
  h.writeUInt8(compressed, 0);
  h.writeUInt32BE(claimed, 1);
  return Buffer.concat([h, msg]);
};

// --- the run ------------------------------------------------------------------------------

describe(`gRPC API fuzz (seed ${SEED})`, () => {
  let host: FakeHost;
  let d: RunningDaemon;
  let c: KvmVfioApi;
  let raw: grpc.Client;
  let baseFds: number;
  let baseRss: number;
  let before_: Vm[] = [];
  const targets: Vm[] = [];
  const created = new Set<string>();

  before(async () => {
    host = await makeFakeHost(GROUPS.map((n) => ({ number: n, devices: [{ address: `0000:00:0${n}.0`, vendor: '8086', device: '10d3', class: '020000', driver: 'vfio-pci' }] })));
    d = await startDaemon({ sysfs: host.sysfs, dev: host.dev });
    c = d.client();
    // Claim every group once (the daemon keeps a claimed group's fd for good) and give it back.
    const all = await c.createVm({ name: 'claim-all', vmm_uid: 0, vfio_device: true, groups: GROUPS });
    await c.deleteVm({ vm_id: all.vm!.id });
    // Targets for AddGroup/GetVm (PENDING, with their device), and a sentinel nobody names.
    for (let i = 0; i < 4; i++) targets.push((await c.createVm({ name: `target-${i}`, vmm_uid: 65534, vfio_device: true, labels: { role: 'target' } })).vm!);
    await c.createVm({ name: 'sentinel', vmm_uid: 1000, labels: { role: 'sentinel' }, memlock_bytes: '4096', request_id: 'sentinel-1' });
    before_ = await c.listAllVms({ page_size: 500 });
    raw = new grpc.Client(`unix:${d.apiSocket}`, grpc.credentials.createInsecure());
    // Warm up (JIT, heap growth to its working size) so the RSS baseline is a used daemon's.
    const list = (api.ListVms.requestSerialize as (o: object) => Buffer)({ labels: { a: 'b' } });
    for (let i = 0; i < 1500; i += 10) await Promise.all(Array.from({ length: 10 }, (_, j) => unary(api.ListVms.path, j % 2 ? list : Buffer.from([0x0f]))));
    await c.getHostInfo();
    await sleep(100);
    baseFds = await d.fdCount();
    baseRss = await rssBytes(d.pid);
  });

  after(async () => {
    raw?.close();
    await d?.cleanup();
    await host?.cleanup();
  });

  function unary(path: string, bytes: Buffer): Promise<{ code: grpc.status; details: string; reply?: Buffer }> {
    return new Promise((resolve) => {
      raw.makeUnaryRequest<Buffer, Buffer>(
        path,
        (b) => b,
        (b) => b,
        bytes,
        new grpc.Metadata(),
        { deadline: Date.now() + DEADLINE_MS },
        (err, reply) => {
          if (err) resolve({ code: err.code, details: err.details });
          else resolve({ code: grpc.status.OK, details: '', reply });
        },
      );
    });
  }

  /** A server stream read until SYNCED (then cancelled) or its status. */
  function watch(path: string, bytes: Buffer): Promise<{ code: grpc.status; details: string; events: Buffer[] }> {
    return new Promise((resolve) => {
      const events: Buffer[] = [];
      const deser = api.WatchVms.responseDeserialize as (b: Buffer) => { type: string };
      const call = raw.makeServerStreamRequest<Buffer, Buffer>(path, (b) => b, (b) => b, bytes, new grpc.Metadata(), { deadline: Date.now() + DEADLINE_MS });
      let synced = false;
      call.on('data', (b: Buffer) => {
        events.push(b);
        if (deser(b).type === 'TYPE_SYNCED') {
          synced = true;
          call.cancel();
        }
      });
      call.on('error', (e: grpc.ServiceError) => resolve({ code: synced && e.code === grpc.status.CANCELLED ? grpc.status.OK : e.code, details: synced ? '' : e.details, events }));
      call.on('end', () => resolve({ code: grpc.status.OK, details: '', events }));
    });
  }

  async function runCase(k: Case, i: number, tally: Tally): Promise<void> {
    const m = api[k.req.method];
    const body = { ...k.req.body };
    if (k.req.ref) Object.assign(body, { vm_id: 'target' in k.req.ref ? targets[k.req.ref.target].id : k.req.ref.id });
    let bytes = (m.requestSerialize as (o: object) => Buffer)(body);
    let path = m.path;
    if (k.shape === 'mutated') for (const mu of k.mutations) bytes = applyBytes(bytes, mu);
    else if (k.shape === 'random') bytes = Buffer.from(k.random);
    else if (k.shape === 'unknown-method') path = fc.sample(fc.constantFrom(`/${SERVICE}/Nope`, '/x/y', `/${SERVICE}/`, '/kvmvfio.v1.KvmVfio/createvm', '/grpc.health.v1.Health/Nope'), { seed: SEED + i, numRuns: 1 })[0];
    else if (k.shape === 'oversize') bytes = Buffer.concat([bytes, (api.CreateVm.requestSerialize as (o: object) => Buffer)({ labels: { big: 'x'.repeat(MAX_REQUEST) } })]);
    const what = `case ${i} (${k.req.method}, ${k.shape}, ${bytes.length} bytes ${bytes.subarray(0, 48).toString('hex')})`;
    const streaming = k.req.method === 'WatchVms' && k.shape !== 'unknown-method';
    const r = streaming ? await watch(path, bytes) : await unary(path, bytes);
    tally.add(k.shape, r.code, r.details);
    checkStatus(what, k.shape, r.code, r.details);
    if (r.code !== grpc.status.OK) return;
    if (streaming) {
      const evs = (r as { events: Buffer[] }).events.map((b) => (api.WatchVms.responseDeserialize as (b: Buffer) => { type: string; vm?: Vm })(b));
      assert.equal(evs.at(-1)?.type, 'TYPE_SYNCED', `${what}: the watch did not sync`);
      for (const ev of evs.slice(0, -1)) assertWellFormed(ev.vm!);
      return;
    }
    const reply = (m.responseDeserialize as (b: Buffer) => Record<string, unknown>)((r as { reply: Buffer }).reply);
    if (k.req.method === 'CreateVm') {
      const vm = reply.vm as Vm;
      assertWellFormed(vm);
      if (!before_.some((b) => b.id === vm.id)) created.add(vm.id);
    }
  }

  test(`${CASES} mutated, random, unknown and oversize requests: every reply a documented status, no internals`, async (t) => {
    const cases = fc.sample(fuzzCase, { seed: SEED, numRuns: CASES });
    const tally = new Tally();
    const t0 = Date.now();
    await withSeed('grpc cases', SEED, () => pool(WIDTH, cases, (k, i) => runCase(k, i, tally)));
    t.diagnostic(`${CASES} calls in ${Date.now() - t0} ms: ${tally}`);
    t.diagnostic(`examples: ${JSON.stringify(Object.fromEntries(tally.examples))}`);
    assertAlive(d);
  });

  test('malformed gRPC framing over raw HTTP/2 gets a status, never a hang', async (t) => {
    const path = api.ListVms.path;
    const good = (api.ListVms.requestSerialize as (o: object) => Buffer)({ labels: { a: 'b' } });
    const cases: [string, Buffer, Record<string, string>?][] = [
      ['no message at all', Buffer.alloc(0)],
      ['a length prefix longer than the body', frame(good, 0, good.length + 10)],
      ['a length prefix of 4 GiB - 1', frame(good, 0, 0xffffffff)],
      ['half a frame header', Buffer.from([0, 0, 0])],
      ['compressed flag without grpc-encoding', frame(good, 1)],
      ['compressed flag 7', frame(good, 7)],
      ['gzip declared, body not gzip', frame(good, 1), { 'grpc-encoding': 'gzip' }],
      ['gzip that inflates past 64 KiB', frame(gzipSync(Buffer.concat([good, Buffer.alloc(200_000)])), 1), { 'grpc-encoding': 'gzip' }],
      ['an unknown grpc-encoding', frame(good, 1), { 'grpc-encoding': 'zstd-nope' }],
      ['two messages on a unary call', Buffer.concat([frame(good), frame(good)])],
      ['a frame claiming more than 64 KiB', frame(Buffer.alloc(MAX_REQUEST + 10), 0)],
      ['content-type text/plain', frame(good), { 'content-type': 'text/plain' }],
      ['a garbage grpc-timeout', frame(good), { 'grpc-timeout': 'soon' }],
    ];
    for (const [what, body, headers] of cases) {
      const r = await rawH2(d.apiSocket, path, body, headers);
      t.diagnostic(`${what}: HTTP ${r.httpStatus}, grpc-status ${r.grpcStatus === undefined ? '-' : grpc.status[r.grpcStatus]}${r.grpcMessage ? ` "${r.grpcMessage.slice(0, 100)}"` : ''}`);
      if (r.grpcStatus !== undefined) {
        assert.doesNotMatch(r.grpcMessage ?? '', INTERNALS, `${what}: ${r.grpcMessage}`);
        assert.ok(r.grpcStatus !== grpc.status.UNKNOWN, `${what}: UNKNOWN`);
      } else assert.ok(r.httpStatus && r.httpStatus >= 400, `${what}: neither a grpc-status nor an HTTP error (HTTP ${r.httpStatus})`);
    }
    // Random framing: random bytes as the whole body, and random prefixes to a good message.
    const bodies = fc.sample(fc.oneof(fc.uint8Array({ maxLength: 300 }).map((b) => Buffer.from(b)), fc.uint8Array({ minLength: 5, maxLength: 5 }).map((h) => Buffer.concat([h, good]))), { seed: SEED, numRuns: runs(60) });
    await pool(4, bodies, async (b, i) => {
      const r = await rawH2(d.apiSocket, path, b);
      assert.ok(r.grpcStatus !== undefined || (r.httpStatus ?? 0) >= 400, `random framing ${i} (${b.subarray(0, 16).toString('hex')}): no status`);
      assert.doesNotMatch(r.grpcMessage ?? '', INTERNALS);
    });
    assertAlive(d);
  });

  test('afterwards: the daemon answers; fds back at baseline; RSS near the start; state changed only by the creates that succeeded', async (t) => {
    assertAlive(d);
    raw.close();
    await c.getHostInfo();
    const now = await c.listAllVms({ page_size: 500 });
    for (const vm of now) assertWellFormed(vm);
    // What was there before is still there, unchanged but for groups AddGroup added to the targets.
    for (const b of before_) {
      const a = now.find((v) => v.id === b.id);
      assert.ok(a, `vm ${b.name} disappeared`);
      if (b.name.startsWith('target-')) assert.deepEqual({ ...a, groups: [], revision: '', update_time: '' }, { ...b, groups: [], revision: '', update_time: '' });
      else assert.deepEqual(a, b, `vm ${b.name} changed`);
    }
    assert.equal(now.length, before_.length + created.size, `${now.length} VMs: ${before_.length} before, ${created.size} made by creates that succeeded`);
    // Every group is held by at most one VM, and the pool agrees with the records.
    for (const g of GROUPS) {
      const holders = now.filter((v) => v.groups.includes(g)).map((v) => v.id);
      assert.ok(holders.length <= 1, `group ${g} in ${holders.length} VMs`);
      assert.equal((await c.getIommuGroup(g)).vm_id, holders[0] ?? '', `group ${g}: pool and records disagree`);
    }
    await assertFdsBack(d, baseFds, 10_000);
    const rss = await rssBytes(d.pid);
    t.diagnostic(`${now.length} VMs (${created.size} made by the fuzz); fds ${await d.fdCount()} (baseline ${baseFds}); RSS ${(rss / 2 ** 20).toFixed(1)} MiB (start ${(baseRss / 2 ** 20).toFixed(1)} MiB)`);
    t.diagnostic(`daemon warnings and worse: ${logSummary(d) || 'none'}`);
    assert.ok(rss <= baseRss + RSS_SLACK, `RSS grew from ${baseRss} to ${rss}`);
    assertNoErrorLogs(d);
  });

  // Found by this fuzz: @grpc/grpc-js 1.14.7 (on Node 20) keeps every request
  // it refuses for exceeding grpc.max_receive_message_length (its
  // ServerHttp2Stream and server call, ~25 KB each) until the HTTP/2
  // connection closes. One connection sending oversize requests grows the
  // daemon's memory without bound — before any authorization, so any local
  // user can. See the fuzz report for the repro and the suggested mitigation.
  test('oversize requests on one connection do not grow the daemon without bound', { todo: 'grpc-js retains each oversize-refused call until its connection closes; see the fuzz report' }, async (t) => {
    const client = new grpc.Client(`unix:${d.apiSocket}`, grpc.credentials.createInsecure());
    const call = (b: Buffer) =>
      new Promise<grpc.status>((resolve) =>
        client.makeUnaryRequest<Buffer, Buffer>(api.ListVms.path, (x) => x, (x) => x, b, new grpc.Metadata(), { deadline: Date.now() + DEADLINE_MS }, (e) => resolve(e ? e.code : grpc.status.OK)),
      );
    try {
      const good = (api.ListVms.requestSerialize as (o: object) => Buffer)({});
      for (let i = 0; i < 1000; i += 10) await Promise.all(Array.from({ length: 10 }, () => call(good)));
      const start = await rssBytes(d.pid);
      const big = Buffer.alloc(MAX_REQUEST + 4000, 0x0a);
      const n = runs(4000);
      for (let i = 0; i < n; i += 10) {
        const codes = await Promise.all(Array.from({ length: 10 }, () => call(big)));
        assert.ok(codes.every((k) => k === grpc.status.RESOURCE_EXHAUSTED));
      }
      const end = await rssBytes(d.pid);
      t.diagnostic(`${n} oversize requests on one connection: RSS ${(start / 2 ** 20).toFixed(1)} → ${(end / 2 ** 20).toFixed(1)} MiB`);
      assert.ok(end - start < RSS_SLACK, `RSS grew by ${((end - start) / 2 ** 20).toFixed(1)} MiB`);
    } finally {
      client.close();
    }
  });
});
