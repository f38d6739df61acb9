/**
 * The one place where errors become gRPC statuses (DESIGN.md, "Errors").
 * Domain errors carry their kind; kernel errors their errno; anything else
 * is a bug and becomes INTERNAL with a reference, its stack in the log only.
 */
import { status as Status, type ServiceError, Metadata } from '@grpc/grpc-js';
import { randomBytes } from 'node:crypto';
import { DomainError } from '../broker/errors';
import { SysError } from '../kernel';
import { QmpError } from './qmp/client';

const byKind: Record<DomainError['kind'], Status> = {
  'not-found': Status.NOT_FOUND,
  'already-exists': Status.ALREADY_EXISTS,
  'failed-precondition': Status.FAILED_PRECONDITION,
  'invalid-argument': Status.INVALID_ARGUMENT,
  'permission-denied': Status.PERMISSION_DENIED,
  'resource-exhausted': Status.RESOURCE_EXHAUSTED,
  unavailable: Status.UNAVAILABLE,
  'deadline-exceeded': Status.DEADLINE_EXCEEDED,
};

const byErrno: Record<string, Status> = {
  EBUSY: Status.FAILED_PRECONDITION,
  EEXIST: Status.ALREADY_EXISTS,
  ENOENT: Status.NOT_FOUND,
  EINVAL: Status.INVALID_ARGUMENT,
  EBADF: Status.INVALID_ARGUMENT,
  ENXIO: Status.FAILED_PRECONDITION,
  ENODEV: Status.FAILED_PRECONDITION,
  ENOTTY: Status.FAILED_PRECONDITION,
  EPERM: Status.PERMISSION_DENIED,
  EACCES: Status.PERMISSION_DENIED,
  EMFILE: Status.RESOURCE_EXHAUSTED,
  ENFILE: Status.RESOURCE_EXHAUSTED,
  ENOMEM: Status.RESOURCE_EXHAUSTED,
  ENOSPC: Status.RESOURCE_EXHAUSTED,
  ETIMEDOUT: Status.DEADLINE_EXCEEDED,
  EIO: Status.FAILED_PRECONDITION,
  ENOSYS: Status.UNIMPLEMENTED,
  // errno 95: Node names it ENOTSUP (its alias EOPNOTSUPP never comes out of a SysError).
  ENOTSUP: Status.UNIMPLEMENTED,
  ECONNRESET: Status.UNAVAILABLE,
  EPIPE: Status.UNAVAILABLE,
};

/**
 * QEMU's refusals over QMP (QmpError), by its description: QEMU reports the
 * kernel's errno, if at all, as strerror text inside it. The texts are the
 * ones measured with QEMU 10 (labs/qmp-hotplug); the first match wins.
 */
const byQmpDesc: [RegExp, Status][] = [
  // VFIO_DEVICE_BIND_IOMMUFD: EINVAL, the device is bound to another iommufd (another process has it);
  // EBUSY, its group file is open somewhere.
  [/error bind device .*: (Invalid argument|Device or resource busy)$/, Status.FAILED_PRECONDITION],
  // The fd is no VFIO device cdev (a group fd, /dev/null).
  [/Inappropriate ioctl for device/, Status.INVALID_ARGUMENT],
  [/^Duplicate device ID /, Status.ALREADY_EXISTS],
  // Pinning guest RAM for DMA met RLIMIT_MEMLOCK (CreateVm memlock_bytes).
  [/Cannot allocate memory/, Status.RESOURCE_EXHAUSTED],
  // The port cannot take the device (one the daemon picked changed under it).
  [/^Bus '.*' (does not support hotplugging|not found|is full)$|can't go on .* bus$/, Status.FAILED_PRECONDITION],
  [/Permission denied|Operation not permitted/, Status.PERMISSION_DENIED],
];

const byQmpClass: Record<string, Status> = {
  DeviceNotFound: Status.NOT_FOUND,
  CommandNotFound: Status.UNIMPLEMENTED,
  KVMMissingCap: Status.FAILED_PRECONDITION,
};

/** The status of QEMU's refusal; one the table does not know is UNKNOWN (QEMU's answer, named in the message), not INTERNAL. */
export function statusForQmpError(e: QmpError): Status {
  for (const [re, code] of byQmpDesc) if (re.test(e.desc)) return code;
  return byQmpClass[e.errorClass] ?? Status.UNKNOWN;
}

export interface MappedStatus {
  code: Status;
  details: string;
  /** Set for INTERNAL: the reference written to the log with the stack. */
  ref?: string;
}

/**
 * The status for a kernel errno; a second KVM-VFIO device (EBUSY) is
 * ALREADY_EXISTS. An errno with no mapping is UNKNOWN, not INTERNAL: it is a
 * kernel's (or a VMM's) answer, named in the message, not a daemon bug.
 */
export function statusForSysError(e: SysError): Status {
  if (e.code === 'EBUSY' && e.call.startsWith('KVM_CREATE_DEVICE')) return Status.ALREADY_EXISTS;
  return byErrno[e.code] ?? Status.UNKNOWN;
}

export function toStatus(err: unknown): MappedStatus {
  if (err instanceof DomainError) return { code: byKind[err.kind], details: err.message };
  if (err instanceof SysError) return { code: statusForSysError(err), details: err.message };
  if (err instanceof QmpError) return { code: statusForQmpError(err), details: err.message };
  return { code: Status.INTERNAL, details: '', ref: randomBytes(4).toString('hex') };
}

export function toServiceError(m: MappedStatus): Partial<ServiceError> {
  const details = m.code === Status.INTERNAL && m.ref ? `internal error (ref ${m.ref}; see the kvmvfiod log)` : m.details;
  return { code: m.code, details, metadata: new Metadata() };
}
