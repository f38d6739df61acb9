/**
 * Properties of request validation (src/server/validate.ts), over every
 * request the gRPC decoder can produce (@grpc/proto-loader with the daemon's
 * options: strings, maps as plain objects, uint32 numbers, uint64 as decimal
 * strings, enums as names — or numbers when unknown):
 *
 *  - a request is accepted exactly when every field obeys the rules written in
 *    proto/kvmvfio/v1/kvmvfio.proto (checked against an independent oracle
 *    below), and the spec it yields satisfies them;
 *  - a refused request throws InvalidArgumentError whose `field` names a
 *    request field that the oracle also finds bad, and whose message starts
 *    with that name — never any other exception;
 *  - requests generated from the rules are always accepted, unchanged.
 *
 * Seeded: KVMVFIO_FUZZ_SEED=N replays a run.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { totalmem } from 'node:os';
import fc from 'fast-check';
import { InvalidArgumentError } from '../../src/broker/errors';
import * as validate from '../../src/server/validate';
import type { CreateVmRequest__Output } from '../../src/generated/kvmvfio/v1/CreateVmRequest';
import { fuzzSeed, runs } from '../helpers/fuzz';

const SEED = fuzzSeed('validate');
const RUNS = runs(3000);
const params = { seed: SEED, numRuns: RUNS } as const;

const RAM = BigInt(totalmem());
const MAX_UID = 0xfffffffe;
const STATE_NAMES = ['VM_STATE_PENDING', 'VM_STATE_RUNNING', 'VM_STATE_EXITED', 'VM_STATE_FAILED'];

// --- the oracle: the rules as the proto states them, written independently ---

const isDnsLabel = (s: string) => s.length >= 1 && s.length <= 63 && /^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/.test(s);
// A name must not read as a VM id: 8-4-4-4-12 hex digits, in any case.
const isIdShaped = (s: string) => {
  const parts = s.split('-');
  return parts.length === 5 && parts.map((x) => x.length).join() === '8,4,4,4,12' && parts.every((x) => /^[0-9A-Fa-f]+$/.test(x));
};
const isVmName = (s: string) => isDnsLabel(s) && !isIdShaped(s);
const isLabelKey = (s: string) => s.length >= 1 && s.length <= 63 && /^[A-Za-z0-9._/-]+$/.test(s);
// "values at most 253 characters": measured in UTF-16 code units (see the report:
// an astral character counts twice). No control characters (C0 or DEL).
const isLabelValue = (s: string) => s.length <= 253 && !/[\u0000-\u001f\u007f]/.test(s);
const labelsOk = (l: Record<string, string>) => {
  const e = Object.entries(l);
  return e.length <= 32 && e.every(([k, v]) => isLabelKey(k) && isLabelValue(v));
};
const groupsOk = (g: number[]) => g.length <= 64 && new Set(g).size === g.length;
const memlockOk = (m: string) => /^[0-9]*$/.test(m) && BigInt(m || '0') <= RAM;
const requestIdOk = (r: string) => r === '' || (r.length <= 128 && /^[A-Za-z0-9._:-]+$/.test(r));
const uidOk = (r: CreateVmRequest__Output) => r._vmm_uid === 'vmm_uid' && r.vmm_uid !== undefined && r.vmm_uid >= 0 && r.vmm_uid <= MAX_UID;

/** The fields the oracle finds bad ("labels" for any label problem). */
function badFields(r: CreateVmRequest__Output): Set<string> {
  const bad = new Set<string>();
  if (!isVmName(r.name)) bad.add('name');
  if (!labelsOk(r.labels)) bad.add('labels');
  if (!uidOk(r)) bad.add('vmm_uid');
  if (!groupsOk(r.groups)) bad.add('groups');
  if (r.groups.length > 0 && !r.vfio_device) bad.add('vfio_device');
  if (!memlockOk(r.memlock_bytes)) bad.add('memlock_bytes');
  if (!requestIdOk(r.request_id)) bad.add('request_id');
  const handoff = (r as { vfio_handoff?: unknown }).vfio_handoff;
  if (handoff !== undefined && !['VFIO_HANDOFF_UNSPECIFIED', 'VFIO_HANDOFF_GROUP', 'VFIO_HANDOFF_CDEV'].includes(handoff as string)) bad.add('vfio_handoff');
  return bad;
}

/** "labels[\"k\"]" and "labels[k]" name the labels field. */
const fieldRoot = (f: string) => (f.startsWith('labels[') ? 'labels' : f);

/** Runs `fn`; returns its value, or the InvalidArgumentError it threw. Anything else fails the property. */
function outcome<T>(fn: () => T): { ok: true; value: T } | { ok: false; err: InvalidArgumentError } {
  try {
    return { ok: true, value: fn() };
  } catch (e) {
    if (!(e instanceof InvalidArgumentError)) {
      throw new Error(`threw ${e instanceof Error ? `${e.constructor.name}: ${e.message}` : String(e)}, not InvalidArgumentError`);
    }
    assert.ok(e.message.startsWith(`${e.field}: `), `message ${JSON.stringify(e.message)} does not start with its field ${e.field}`);
    return { ok: false, err: e };
  }
}

// --- generators ---------------------------------------------------------------

const dnsLabel = fc.stringMatching(/^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$/);
const vmName = dnsLabel.filter((s) => !isIdShaped(s));
const hex = (n: number) => fc.stringMatching(new RegExp(`^[0-9a-f]{${n}}$`));
/** Names shaped like a VM id, and near misses that are fine names. */
const idShaped = fc.tuple(hex(8), hex(4), hex(4), hex(4), hex(12)).map((p) => p.join('-'));
const nearIds = fc.oneof(idShaped.map((s) => s.slice(0, 35)), idShaped.map((s) => `${s}0`), idShaped.map((s) => s.replace(/-/g, '')), idShaped.map((s) => `x${s.slice(1)}`));
const labelKey = fc.oneof(
  { weight: 8, arbitrary: fc.stringMatching(/^[A-Za-z0-9._/-]{1,63}$/) },
  { weight: 1, arbitrary: fc.constantFrom('__proto__', 'constructor', 'toString', 'hasOwnProperty', 'a'.repeat(63), 'example.com/role') },
);
const noControl = (s: string) => s.replace(/[\u0000-\u001f\u007f]/g, '');
const labelValue = fc.oneof(
  fc.string({ unit: 'grapheme-ascii', maxLength: 253 }).map(noControl),
  fc.string({ unit: 'binary', maxLength: 120 }).map(noControl),
  fc.constant('v'.repeat(253)),
);
const entriesToLabels = (e: [string, string][]) => Object.fromEntries(e) as Record<string, string>;
const validLabels = fc.uniqueArray(fc.tuple(labelKey, labelValue), { maxLength: 32, selector: ([k]) => k }).map(entriesToLabels);
const uint32 = fc.integer({ min: 0, max: 0xffffffff });
const validGroups = fc.uniqueArray(uint32, { maxLength: 64 });
const validMemlock = fc.oneof(fc.constant('0'), fc.bigInt({ min: 0n, max: RAM }).map(String), fc.constant(String(RAM)));
const validRequestId = fc.oneof(fc.constant(''), fc.stringMatching(/^[A-Za-z0-9._:-]{1,128}$/));

const validCreate: fc.Arbitrary<CreateVmRequest__Output> = fc
  .record({
    name: fc.oneof({ weight: 9, arbitrary: vmName }, { weight: 1, arbitrary: nearIds.filter(isDnsLabel) }),
    labels: validLabels,
    vmm_uid: fc.oneof(fc.integer({ min: 0, max: MAX_UID }), fc.constantFrom(0, 65534, MAX_UID)),
    groups: validGroups,
    device: fc.boolean(),
    memlock_bytes: validMemlock,
    request_id: validRequestId,
    vfio_handoff: fc.constantFrom('VFIO_HANDOFF_UNSPECIFIED' as const, 'VFIO_HANDOFF_GROUP' as const, 'VFIO_HANDOFF_CDEV' as const),
  })
  .map(({ device, ...r }) => ({ ...r, vfio_device: device || r.groups.length > 0, _vmm_uid: 'vmm_uid' as const }));

// Anything the decoder could hand over: mostly good values (so that requests
// with one bad field, or none, are common), near misses around every limit,
// and plain junk.
const mostly = <T>(good: fc.Arbitrary<T>, ...bad: fc.Arbitrary<T>[]) =>
  fc.oneof({ weight: 6 * bad.length, arbitrary: good }, ...bad.map((arbitrary) => ({ weight: 1, arbitrary })));
const anyName = mostly(
  dnsLabel,
  fc.string({ unit: 'binary', maxLength: 80 }),
  fc.constantFrom('', '-a', 'a-', 'A', 'a'.repeat(64), 'a_b', 'a.b', 'é', 'a\u0000', 'a\n', ' a', '0'),
  dnsLabel.map((s) => s.toUpperCase()),
  idShaped,
  idShaped.map((s) => s.toUpperCase()),
  nearIds,
);
const anyLabelKey = fc.oneof(labelKey, fc.string({ unit: 'binary', maxLength: 70 }), fc.constantFrom('', 'a'.repeat(64), 'a b', 'a=b', 'ä', 'k\u0000'));
const anyLabelValue = fc.oneof(labelValue, fc.string({ unit: 'binary', maxLength: 300 }), fc.constantFrom('v'.repeat(254), 'a\tb', 'a\u007f', '\u001b[31m', '😀'.repeat(127)));
const junkLabels = fc.uniqueArray(fc.tuple(anyLabelKey, anyLabelValue), { maxLength: 40, selector: ([k]) => k }).map(entriesToLabels);
const anyLabels = mostly(validLabels, junkLabels, fc.uniqueArray(fc.tuple(labelKey, labelValue), { minLength: 33, maxLength: 34, selector: ([k]) => k }).map(entriesToLabels));
const anyGroups = mostly(validGroups, fc.array(fc.integer({ min: 0, max: 8 }), { minLength: 2, maxLength: 10 }), fc.uniqueArray(uint32, { minLength: 65, maxLength: 70 }));
const anyMemlock = mostly(validMemlock, fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }).map(String), fc.constantFrom(String(RAM + 1n), '18446744073709551615'));
const anyRequestId = mostly(validRequestId, fc.string({ unit: 'binary', maxLength: 140 }), fc.constantFrom('a'.repeat(129), 'a b', 'a/b', 'ü'));
const anyUid = mostly<Partial<Pick<CreateVmRequest__Output, 'vmm_uid' | '_vmm_uid'>>>(
  fc.record({ _vmm_uid: fc.constant('vmm_uid' as const), vmm_uid: fc.integer({ min: 0, max: MAX_UID }) }),
  fc.constant({ _vmm_uid: 'vmm_uid' as const, vmm_uid: 0xffffffff }),
  fc.constant({}),
  fc.record({ vmm_uid: uint32 }), // a value without its presence marker: proto3 says absent
);

const anyCreate: fc.Arbitrary<CreateVmRequest__Output> = fc
  .record({
    name: anyName,
    labels: anyLabels,
    uid: anyUid,
    vfio_device: mostly(fc.constant(true), fc.constant(false)),
    groups: anyGroups,
    memlock_bytes: anyMemlock,
    request_id: anyRequestId,
    // An enum value the decoder has no name for arrives as its number; an old client sends none.
    vfio_handoff: mostly<unknown>(
      fc.constantFrom('VFIO_HANDOFF_UNSPECIFIED', 'VFIO_HANDOFF_GROUP', 'VFIO_HANDOFF_CDEV'),
      fc.oneof(fc.constant(undefined), fc.integer({ min: -3, max: 9 }), fc.constantFrom('CDEV', 'toString', '')),
    ),
  })
  .map(({ uid, ...r }) => ({ ...r, ...uid }) as CreateVmRequest__Output);

const anyStates = fc.array(
  fc.oneof(
    fc.constantFrom(...STATE_NAMES),
    fc.constantFrom('VM_STATE_UNSPECIFIED', 'toString', '__proto__', 'constructor', 'PENDING', ''),
    fc.integer({ min: -5, max: 10 }), // an enum number the decoder has no name for
  ),
  { maxLength: 6 },
);

// --- properties ---------------------------------------------------------------

describe(`validate (seed ${SEED})`, () => {
  test('createVm: a request generated from the rules is accepted, field for field', () => {
    fc.assert(
      fc.property(validCreate, (req) => {
        const r = outcome(() => validate.createVm(req));
        assert.ok(r.ok, `refused: ${!r.ok && r.err.message}`);
        const spec = r.value;
        assert.equal(spec.name, req.name);
        assert.deepEqual({ ...spec.labels }, { ...req.labels });
        assert.deepEqual(Object.keys(spec.labels).sort(), Object.keys(req.labels).sort());
        assert.equal(spec.vmmUid, req.vmm_uid);
        assert.equal(spec.vfioDevice, req.vfio_device);
        assert.deepEqual(spec.groups, req.groups);
        assert.equal(spec.memlockBytes, Number(req.memlock_bytes));
        assert.equal(spec.requestId, req.request_id);
      }),
      params,
    );
  });

  test('createVm: any request is accepted exactly when the oracle finds nothing bad; a refusal names a bad field', () => {
    let accepted = 0;
    const refusedBy = new Map<string, number>();
    fc.assert(
      fc.property(anyCreate, (req) => {
        const bad = badFields(req);
        const r = outcome(() => validate.createVm(req));
        if (r.ok) {
          accepted++;
          assert.equal(bad.size, 0, `accepted although ${[...bad].join(', ')} is bad`);
          const s = r.value;
          // The invariants of an accepted spec.
          assert.ok(isVmName(s.name));
          assert.ok(labelsOk(s.labels));
          assert.ok(Number.isInteger(s.vmmUid) && s.vmmUid >= 0 && s.vmmUid <= MAX_UID);
          assert.ok(groupsOk(s.groups) && s.groups.every((g) => Number.isInteger(g) && g >= 0 && g <= 0xffffffff));
          assert.ok(!s.groups.length || s.vfioDevice);
          assert.ok(Number.isSafeInteger(s.memlockBytes) && s.memlockBytes >= 0 && BigInt(s.memlockBytes) <= RAM);
          assert.ok(requestIdOk(s.requestId));
        } else {
          const root = fieldRoot(r.err.field);
          refusedBy.set(root, (refusedBy.get(root) ?? 0) + 1);
          assert.ok(bad.has(root), `refused naming ${r.err.field} (${r.err.message}), which the rules find good; bad: ${[...bad].join(', ') || 'nothing'}`);
        }
      }),
      params,
    );
    // The generator must reach both sides and every field, or the property says little.
    assert.ok(accepted > RUNS / 50, `only ${accepted} of ${RUNS} accepted`);
    for (const f of ['name', 'labels', 'vmm_uid', 'groups', 'vfio_device', 'memlock_bytes', 'request_id']) {
      assert.ok((refusedBy.get(f) ?? 0) > 0, `no request was refused for ${f}: ${JSON.stringify([...refusedBy])}`);
    }
  });

  test('filter: labels and states, accepted exactly when valid; states map to their short names', () => {
    fc.assert(
      fc.property(fc.oneof(validLabels, anyLabels), anyStates, (labels, states) => {
        const r = outcome(() => validate.filter({ labels, states }));
        const statesOk = states.every((s) => typeof s === 'string' && STATE_NAMES.includes(s));
        if (r.ok) {
          assert.ok(labelsOk(labels) && statesOk, 'accepted a bad filter');
          assert.deepEqual(
            r.value.states,
            states.map((s) => String(s).slice('VM_STATE_'.length)),
          );
          assert.deepEqual({ ...r.value.labels }, { ...labels });
        } else {
          const root = fieldRoot(r.err.field);
          assert.ok(root === 'labels' || root === 'states', `field ${r.err.field}`);
          assert.ok(root === 'labels' ? !labelsOk(labels) : !statesOk, `refused a good ${root}: ${r.err.message}`);
        }
      }),
      params,
    );
  });

  test('labels: the field name given is the one reported', () => {
    fc.assert(
      fc.property(fc.constantFrom('labels', 'filter.labels'), anyLabels, (field, labels) => {
        const r = outcome(() => validate.labels(field, labels));
        if (r.ok) assert.ok(labelsOk(labels));
        else {
          assert.ok(!labelsOk(labels));
          assert.ok(r.err.field === field || r.err.field.startsWith(`${field}[`), `field ${r.err.field}`);
        }
      }),
      params,
    );
  });

  test('vmId: exactly the lower-case UUIDs CreateVm hands out', () => {
    const uuidRe = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
    const anyId = fc.oneof(
      fc.uuid(),
      fc.uuid().map((u) => u.toUpperCase()),
      fc.uuid().map((u) => `${u}\n`),
      fc.uuid().map((u) => ` ${u}`),
      fc.string({ unit: 'binary', maxLength: 80 }),
      fc.constantFrom('', '../../etc/passwd', '00000000-0000-0000-0000-000000000000', 'x'.repeat(100000)),
    );
    fc.assert(
      fc.property(anyId, (id) => {
        const r = outcome(() => validate.vmId('vm_id', id));
        if (r.ok) {
          assert.ok(uuidRe.test(id), `accepted ${JSON.stringify(id)}`);
          assert.equal(r.value, id);
        } else {
          assert.equal(r.err.field, 'vm_id');
          assert.ok(!uuidRe.test(id), `refused ${JSON.stringify(id)}`);
        }
      }),
      params,
    );
  });

  // Outside the decoder's domain (a uint64 always arrives as an unsigned
  // decimal string), but validation is the daemon's last word on the number
  // given to prlimit: a negative one must not pass.
  test('createVm: memlock_bytes strings in any form never yield a negative or non-integer limit', () => {
    const base: CreateVmRequest__Output = { name: 'a', labels: {}, _vmm_uid: 'vmm_uid', vmm_uid: 0, vfio_device: false, groups: [], memlock_bytes: '0', request_id: '', vfio_handoff: 'VFIO_HANDOFF_UNSPECIFIED' };
    fc.assert(
      fc.property(fc.oneof(fc.string({ maxLength: 30 }), fc.constantFrom('-1', '-0', '0x10', ' 12 ', '1e3', '1.5', '+5', '0b11')), (m) => {
        const r = outcome(() => validate.createVm({ ...base, memlock_bytes: m }));
        if (r.ok) assert.ok(Number.isSafeInteger(r.value.memlockBytes) && r.value.memlockBytes >= 0, `memlock_bytes ${JSON.stringify(m)} gave ${r.value.memlockBytes}`);
        else assert.equal(r.err.field, 'memlock_bytes');
      }),
      params,
    );
  });
});
