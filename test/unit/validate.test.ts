import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { totalmem } from 'node:os';
import * as validate from '../../src/server/validate';
import { InvalidArgumentError } from '../../src/broker/errors';
import type { CreateVmRequest__Output } from '../../src/generated/kvmvfio/v1/CreateVmRequest';
import type { ListVmsRequest__Output } from '../../src/generated/kvmvfio/v1/ListVmsRequest';
import { encodePageToken } from '../../src/server/pagetoken';

/** A good request as proto-loader decodes it (keepCase, longs=String, defaults, oneofs). */
function req(over: Partial<CreateVmRequest__Output> = {}): CreateVmRequest__Output {
  return {
    name: 'web-1',
    labels: {},
    vmm_uid: 64000,
    _vmm_uid: 'vmm_uid',
    vfio_device: true,
    groups: [12],
    memlock_bytes: '0',
    request_id: '',
    vfio_handoff: 'VFIO_HANDOFF_UNSPECIFIED',
    ...over,
  };
}

/** Asserts `fn` throws InvalidArgumentError for `field` (a string, or a pattern for label entries). */
function rejects(fn: () => unknown, field: string | RegExp, why?: string): InvalidArgumentError {
  try {
    fn();
  } catch (e) {
    assert.ok(e instanceof InvalidArgumentError, `${why ?? ''}: expected InvalidArgumentError, got ${String(e)}`);
    if (typeof field === 'string') assert.equal(e.field, field, why);
    else assert.match(e.field, field, why);
    assert.ok(e.message.startsWith(`${e.field}: `), e.message);
    return e;
  }
  assert.fail(`${why ?? ''}: expected InvalidArgumentError on ${String(field)}, but it passed`);
}

const labelField = /^labels(\[.*\])?$/;

describe('validate.createVm: good requests', () => {
  test('a good request gives the spec', () => {
    const s = validate.createVm(
      req({ labels: { app: 'web', 'example.com/tier': 'front end' }, groups: [12, 3], memlock_bytes: '1073741824', request_id: 'ci-42:try.1_a' }),
    );
    assert.deepEqual(s, {
      name: 'web-1',
      labels: { app: 'web', 'example.com/tier': 'front end' },
      vmmUid: 64000,
      vfioDevice: true,
      groups: [12, 3],
      memlockBytes: 1073741824,
      requestId: 'ci-42:try.1_a',
    });
    assert.equal(validate.createVm(req({ vfio_handoff: 'VFIO_HANDOFF_CDEV' })).handoff, 'cdev');
    assert.equal(validate.createVm(req({ vfio_handoff: 'VFIO_HANDOFF_GROUP' })).handoff, 'group');
  });

  test('limits are inclusive: 63-char name, 64 groups, 32 labels, 253-char value, 128-char request_id, memlock = RAM', () => {
    const name = 'a' + '0'.repeat(61) + 'z';
    assert.equal(name.length, 63);
    assert.equal(validate.createVm(req({ name })).name, name);
    const groups = Array.from({ length: 64 }, (_, i) => i);
    assert.deepEqual(validate.createVm(req({ groups })).groups, groups);
    const labels = Object.fromEntries(Array.from({ length: 32 }, (_, i) => [`k${i}`, 'v'.repeat(253)]));
    assert.deepEqual(validate.createVm(req({ labels })).labels, labels);
    const requestId = 'r'.repeat(128);
    assert.equal(validate.createVm(req({ request_id: requestId })).requestId, requestId);
    assert.equal(validate.createVm(req({ memlock_bytes: String(totalmem()) })).memlockBytes, totalmem());
    assert.equal(validate.createVm(req({ vmm_uid: 0xfffffffe })).vmmUid, 0xfffffffe);
  });

  test('no groups and no device, an empty request_id and memlock 0 are fine', () => {
    const s = validate.createVm(req({ groups: [], vfio_device: false, memlock_bytes: '', request_id: '' }));
    assert.deepEqual(s.groups, []);
    assert.equal(s.vfioDevice, false);
    assert.equal(s.memlockBytes, 0);
    assert.equal(s.requestId, '');
    assert.equal(validate.createVm(req({ vfio_device: true, groups: [] })).vfioDevice, true);
  });

  test('names: digits, inner dashes and single characters are DNS labels', () => {
    for (const name of ['a', '0', 'web-1', 'a--b', '1vm']) assert.equal(validate.createVm(req({ name })).name, name);
  });
});

describe('validate.createVm: each bad field names itself', () => {
  test('name: empty, 64 chars, uppercase, leading or trailing "-", unicode, other characters', () => {
    const bad = ['', 'a'.repeat(64), 'Web-1', 'WEB', '-web', 'web-', 'wéb', 'vm-😀', 'web_1', 'web.1', 'web 1', '../x', 'web\n'];
    for (const name of bad) rejects(() => validate.createVm(req({ name })), 'name', JSON.stringify(name));
  });

  test('vmm_uid: absent (no _vmm_uid) or 0xffffffff', () => {
    const absent = req();
    delete absent._vmm_uid;
    delete absent.vmm_uid;
    rejects(() => validate.createVm(absent), 'vmm_uid', 'absent');
    // A decoded default without its presence marker is not a uid the caller gave.
    const defaulted = req({ vmm_uid: 0 });
    delete defaulted._vmm_uid;
    rejects(() => validate.createVm(defaulted), 'vmm_uid', 'default 0 without presence');
    rejects(() => validate.createVm(req({ vmm_uid: 0xffffffff })), 'vmm_uid', '(uid_t)-1');
  });

  test('a name shaped like a VM id (a UUID, in any case) is refused, saying why; near misses are names', () => {
    const id = randomUUID();
    for (const name of [id, id.toUpperCase(), '00000000-0000-0000-0000-000000000000', 'abcdef01-2345-6789-abcd-ef0123456789']) {
      const e = rejects(() => validate.createVm(req({ name })), 'name', name);
      assert.match(e.message, /shaped like a VM id/, name);
    }
    // One character short or long, no dashes, a non-hex letter: ordinary DNS labels.
    for (const name of [id.slice(0, 35), `${id}0`, id.replace(/-/g, ''), `g${id.slice(1)}`, `${id.slice(0, 8)}-web`]) {
      assert.equal(validate.createVm(req({ name })).name, name);
    }
  });

  test('groups: repeated, or more than 64', () => {
    rejects(() => validate.createVm(req({ groups: [1, 2, 1] })), 'groups', 'repeated');
    rejects(() => validate.createVm(req({ groups: Array.from({ length: 65 }, (_, i) => i) })), 'groups', '65');
  });

  test('groups without vfio_device', () => {
    const e = rejects(() => validate.createVm(req({ groups: [12], vfio_device: false })), 'vfio_device');
    assert.match(e.message, /vfio_device/);
  });

  test('memlock_bytes above the host memory, or not a number', () => {
    const e = rejects(() => validate.createVm(req({ memlock_bytes: String(BigInt(totalmem()) + 1n) })), 'memlock_bytes', 'RAM + 1');
    assert.ok(e.message.includes(String(totalmem())), e.message);
    rejects(() => validate.createVm(req({ memlock_bytes: '18446744073709551615' })), 'memlock_bytes', 'u64 max');
    rejects(() => validate.createVm(req({ memlock_bytes: 'lots' })), 'memlock_bytes', 'not a number');
  });

  test('request_id: a space, 129 characters, other characters', () => {
    for (const id of ['req 1', 'r'.repeat(129), 'req/1', 'réq', 'req\n']) {
      rejects(() => validate.createVm(req({ request_id: id })), 'request_id', JSON.stringify(id));
    }
  });

  test('labels: 33 entries', () => {
    const labels = Object.fromEntries(Array.from({ length: 33 }, (_, i) => [`k${i}`, 'v']));
    rejects(() => validate.createVm(req({ labels })), 'labels');
  });

  test('labels: a bad key', () => {
    for (const k of ['', 'has space', 'ké', 'k'.repeat(64), 'a=b', 'a:b', 'k\n']) {
      const e = rejects(() => validate.createVm(req({ labels: { ok: 'v', [k]: 'v' } })), labelField, JSON.stringify(k));
      assert.notEqual(e.field, 'labels[ok]');
    }
  });

  test('labels: a 254-char value', () => {
    const e = rejects(() => validate.createVm(req({ labels: { app: 'v'.repeat(254) } })), labelField);
    assert.ok(e.field.includes('app'), e.field);
  });

  test('labels: control characters in a value', () => {
    for (const v of ['a\nb', 'tab\there', 'nul\u0000', 'del\u007f', '\u001b[31m']) {
      rejects(() => validate.createVm(req({ labels: { app: v } })), labelField, JSON.stringify(v));
    }
  });

  test('the first bad field is reported even when later fields are good', () => {
    rejects(() => validate.createVm(req({ name: 'Bad', groups: [1, 1] })), 'name');
  });
});

describe('validate: ids, states, filters', () => {
  test('vmId accepts a UUID as CreateVm returns it', () => {
    const id = randomUUID();
    assert.equal(validate.vmId('id', id), id);
  });

  test('vmId rejects non-UUIDs and paths', () => {
    const id = randomUUID();
    for (const bad of ['', 'x', '../x', '/etc/passwd', `${id}/../x`, `../${id}`, `${id}\n`, `${id} `, id.replace(/-/g, ''), `${id}0`, 'a'.repeat(65)]) {
      rejects(() => validate.vmId('id', bad), 'id', JSON.stringify(bad));
    }
    rejects(() => validate.vmId('vm_id', '../x'), 'vm_id');
  });

  test('states maps the proto names and rejects unknown ones', () => {
    assert.deepEqual(validate.states('states', ['VM_STATE_PENDING', 'VM_STATE_RUNNING', 'VM_STATE_EXITED', 'VM_STATE_FAILED']), [
      'PENDING',
      'RUNNING',
      'EXITED',
      'FAILED',
    ]);
    assert.deepEqual(validate.states('states', []), []);
    for (const bad of ['PENDING', 'VM_STATE_BOGUS', 'VM_STATE_UNSPECIFIED', 'vm_state_pending', '']) {
      rejects(() => validate.states('states', [bad]), 'states', JSON.stringify(bad));
    }
    rejects(() => validate.states('states', ['VM_STATE_PENDING', 'nope']), 'states');
    rejects(() => validate.states('states', [1]), 'states', 'a bare number');
  });

  test('states rejects names that are Object.prototype properties', () => {
    for (const bad of ['toString', 'constructor', '__proto__', 'hasOwnProperty']) {
      rejects(() => validate.states('states', [bad]), 'states', JSON.stringify(bad));
    }
  });

  test('filter validates both labels and states', () => {
    assert.deepEqual(validate.filter({ labels: { app: 'web' }, states: ['VM_STATE_FAILED'] }), { labels: { app: 'web' }, states: ['FAILED'] });
    rejects(() => validate.filter({ labels: {}, states: ['VM_STATE_NOPE'] }), 'states');
    rejects(() => validate.filter({ labels: { 'bad key': 'v' }, states: [] }), labelField);
  });
});

describe('validate.listVms: page_size and page_token', () => {
  const list = (over: Partial<ListVmsRequest__Output> = {}): ListVmsRequest__Output => ({ labels: {}, states: [], page_size: 0, page_token: '', ...over });

  test('page_size: 0 is 100, 1-500 as given, more is 500, negative is refused', () => {
    assert.equal(validate.listVms(list()).page.size, 100);
    for (const n of [1, 99, 500]) assert.equal(validate.listVms(list({ page_size: n })).page.size, n);
    for (const n of [501, 10_000, 2 ** 31 - 1]) assert.equal(validate.listVms(list({ page_size: n })).page.size, 500);
    for (const n of [-1, -(2 ** 31)]) {
      const e = rejects(() => validate.listVms(list({ page_size: n })), 'page_size');
      assert.match(e.message, /is negative; give 1-500 \(more is taken as 500\), or 0 for 100$/);
    }
    rejects(() => validate.pageSize('page_size', 1.5), 'page_size');
  });

  test('a token round-trips to its place for the same filter, in any label or state order; empty is the start', () => {
    const f = validate.filter({ labels: { app: 'web', tier: 'front' }, states: ['VM_STATE_RUNNING', 'VM_STATE_PENDING'] });
    assert.equal(validate.listVms(list({ labels: f.labels, states: ['VM_STATE_RUNNING', 'VM_STATE_PENDING'] })).page.afterSeq, 0);
    for (const seq of [1, 4242, Number.MAX_SAFE_INTEGER]) {
      const token = encodePageToken(seq, f);
      assert.match(token, /^[A-Za-z0-9_-]{20}$/);
      const page = validate.listVms(list({ labels: { tier: 'front', app: 'web' }, states: ['VM_STATE_PENDING', 'VM_STATE_RUNNING', 'VM_STATE_PENDING'], page_token: token })).page;
      assert.equal(page.afterSeq, seq);
    }
  });

  test('a token of another filter, or one not made by ListVms, names page_token and says which', () => {
    const token = encodePageToken(7, { labels: { app: 'web' }, states: [] });
    for (const other of [list({ page_token: token }), list({ labels: { app: 'db' }, page_token: token }), list({ labels: { app: 'web' }, states: ['VM_STATE_FAILED'], page_token: token })]) {
      const e = rejects(() => validate.listVms(other), 'page_token');
      assert.match(e.message, /was returned for a different filter/);
    }
    // A label value that would collide with a naive join of key and value.
    const a = encodePageToken(7, { labels: { 'a=b': 'c' }, states: [] });
    rejects(() => validate.listVms(list({ labels: { a: 'b=c' }, page_token: a })), 'page_token');
    const raw = Buffer.from(token, 'base64url');
    const variants = [
      '',
      'x',
      token.slice(0, 19),
      `${token}A`,
      `${token.slice(0, 19)}=`,
      Buffer.concat([Buffer.from([2]), raw.subarray(1)]).toString('base64url'), // unknown version
      Buffer.concat([raw.subarray(0, 7), Buffer.alloc(8)]).toString('base64url'), // seq 0
      Buffer.concat([raw.subarray(0, 7), Buffer.alloc(8, 0xff)]).toString('base64url'), // seq past 2^53
    ];
    for (const bad of variants.slice(1)) {
      const e = rejects(() => validate.listVms(list({ labels: { app: 'web' }, page_token: bad })), 'page_token', bad);
      assert.match(e.message, /not a page token returned by ListVms/);
    }
  });

  test('page_token is checked after the filter: a bad filter is reported first', () => {
    rejects(() => validate.listVms(list({ states: ['VM_STATE_NOPE' as never], page_token: 'junk', page_size: -1 })), 'states');
    rejects(() => validate.listVms(list({ page_token: 'junk', page_size: -1 })), 'page_size');
  });
});
