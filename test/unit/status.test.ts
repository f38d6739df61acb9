import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { status as Status } from '@grpc/grpc-js';
import { statusForSysError, toServiceError, toStatus } from '../../src/server/status';
import {
  AlreadyExistsError,
  DomainError,
  FailedPreconditionError,
  InvalidArgumentError,
  NotFoundError,
  PermissionDeniedError,
  ResourceExhaustedError,
  UnavailableError,
} from '../../src/broker/errors';
import { Errno, SysError } from '../../src/kernel';

class DeadlineError extends DomainError {
  readonly kind = 'deadline-exceeded' as const;
}

const name = (c: Status): string => Status[c] ?? String(c);

describe('toStatus: domain errors', () => {
  const cases: [DomainError, Status][] = [
    [new NotFoundError('vm x not found'), Status.NOT_FOUND],
    [new AlreadyExistsError('vm web-1 already exists'), Status.ALREADY_EXISTS],
    [new FailedPreconditionError('IOMMU group 7 is not viable'), Status.FAILED_PRECONDITION],
    [new InvalidArgumentError('name', 'required'), Status.INVALID_ARGUMENT],
    [new PermissionDeniedError('uid 1000 may not CreateVm'), Status.PERMISSION_DENIED],
    [new ResourceExhaustedError('out of fds'), Status.RESOURCE_EXHAUSTED],
    [new UnavailableError('kvmvfiod is shutting down'), Status.UNAVAILABLE],
    [new DeadlineError('the VMM did not answer'), Status.DEADLINE_EXCEEDED],
  ];
  for (const [err, code] of cases) {
    test(`${err.kind} -> ${name(code)}, message as details`, () => {
      const m = toStatus(err);
      assert.equal(name(m.code), name(code));
      assert.equal(m.details, err.message);
      assert.equal(m.ref, undefined);
      const se = toServiceError(m);
      assert.equal(se.code, code);
      assert.equal(se.details, err.message);
    });
  }
});

describe('toStatus: kernel errors', () => {
  const cases: [string, string, number, Status][] = [
    ['KVM_CREATE_DEVICE(VFIO)', 'vm web-1', Errno.EBUSY, Status.ALREADY_EXISTS],
    ['KVM_CREATE_DEVICE', 'vm web-1', Errno.EBUSY, Status.ALREADY_EXISTS],
    ['open', '/dev/vfio/12', Errno.EBUSY, Status.FAILED_PRECONDITION],
    ['KVM_SET_DEVICE_ATTR(ADD)', 'vm web-1 group 12', Errno.EEXIST, Status.ALREADY_EXISTS],
    ['KVM_SET_DEVICE_ATTR(DEL)', 'vm web-1 group 12', Errno.ENOENT, Status.NOT_FOUND],
    ['open', '/dev/vfio/99', Errno.ENOENT, Status.NOT_FOUND],
    ['KVM_SET_DEVICE_ATTR(ADD)', 'vm web-1 fd 7', Errno.EINVAL, Status.INVALID_ARGUMENT],
    ['KVM_SET_DEVICE_ATTR(ADD)', 'vm web-1 fd 99', Errno.EBADF, Status.INVALID_ARGUMENT],
    ['open', '/dev/kvm', Errno.EPERM, Status.PERMISSION_DENIED],
    ['open', '/dev/vfio/12', Errno.EACCES, Status.PERMISSION_DENIED],
    ['open', '/dev/vfio/12', Errno.EMFILE, Status.RESOURCE_EXHAUSTED],
    ['open', '/dev/vfio/12', Errno.ENFILE, Status.RESOURCE_EXHAUSTED],
    ['KVM_CREATE_VM', '/dev/kvm', Errno.ENOMEM, Status.RESOURCE_EXHAUSTED],
  ];
  for (const [call, object, errno, code] of cases) {
    const e = new SysError(call, object, errno);
    test(`${e.code} from ${call} -> ${name(code)}; details carry the errno name and object`, () => {
      const m = toStatus(e);
      assert.equal(name(m.code), name(code));
      assert.equal(name(statusForSysError(e)), name(code));
      assert.ok(m.details.includes(e.code), m.details);
      assert.ok(m.details.includes(object), m.details);
      assert.ok(m.details.includes(call), m.details);
      assert.equal(m.ref, undefined);
      const se = toServiceError(m);
      assert.equal(se.code, code);
      assert.equal(se.details, m.details);
    });
  }

  test('EBUSY on anything but KVM_CREATE_DEVICE is FAILED_PRECONDITION', () => {
    for (const call of ['open', 'VFIO_GROUP_SET_CONTAINER', 'KVM_SET_DEVICE_ATTR(ADD)', 'ioctl KVM_CREATE_DEVICE']) {
      assert.equal(name(toStatus(new SysError(call, 'x', Errno.EBUSY)).code), 'FAILED_PRECONDITION', call);
    }
  });

  test('SysError.fromNode keeps the errno name, so fs errors map the same way', () => {
    const err = Object.assign(new Error('EMFILE: too many open files'), { errno: -Errno.EMFILE, code: 'EMFILE' }) as NodeJS.ErrnoException;
    const e = SysError.fromNode('open', '/dev/vfio/3', err);
    assert.equal(e.code, 'EMFILE');
    assert.equal(toStatus(e).code, Status.RESOURCE_EXHAUSTED);
  });
});

describe('toStatus: the unexpected', () => {
  test('an unknown Error is INTERNAL with a ref, and its own message never leaves', () => {
    const secret = 'TypeError at /work/main/src/broker/pool.ts:42 reading token 5f3c9a';
    const m = toStatus(new TypeError(secret));
    assert.equal(name(m.code), 'INTERNAL');
    assert.ok(m.ref && /^[0-9a-f]{4,}$/.test(m.ref), `ref ${m.ref}`);
    assert.ok(!m.details.includes(secret));
    const se = toServiceError(m);
    assert.equal(se.code, Status.INTERNAL);
    assert.ok(typeof se.details === 'string' && se.details.includes(m.ref!), se.details);
    assert.ok(!se.details!.includes(secret), se.details);
    assert.ok(!se.details!.includes('pool.ts'), se.details);
    assert.ok(!se.details!.includes('5f3c9a'), se.details);
  });

  test('each INTERNAL gets its own ref', () => {
    const refs = new Set(Array.from({ length: 20 }, () => toStatus(new Error('x')).ref));
    assert.equal(refs.size, 20);
  });

  test('non-Error throwables (string, undefined, plain object) are INTERNAL too, with nothing leaked', () => {
    for (const thrown of ['secret-string', undefined, null, { message: 'secret-object', kind: 'not-found' }, 42]) {
      const m = toStatus(thrown);
      assert.equal(name(m.code), 'INTERNAL', String(thrown));
      const se = toServiceError(m);
      assert.ok(se.details?.includes(m.ref!), se.details);
      assert.ok(!se.details!.includes('secret'), se.details);
    }
  });

  test('an Error that merely looks like a SysError (code EBUSY) is not trusted', () => {
    const fake = Object.assign(new Error('open /secret: EBUSY'), { code: 'EBUSY', call: 'open', object: '/secret' });
    const m = toStatus(fake);
    assert.equal(name(m.code), 'INTERNAL');
    assert.ok(!toServiceError(m).details!.includes('/secret'));
  });
});
