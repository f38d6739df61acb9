/**
 * The domain's error kinds. The broker throws these (and the kernel layer's
 * SysError); the server maps both to a gRPC status in one place
 * (src/server/status.ts). Messages are written for the caller: they name the
 * object and, where there is one, the fix.
 */
export abstract class DomainError extends Error {
  abstract readonly kind: 'not-found' | 'already-exists' | 'failed-precondition' | 'invalid-argument' | 'permission-denied' | 'resource-exhausted' | 'unavailable' | 'deadline-exceeded';
}

/** A VM or an IOMMU group that does not exist (or that the caller may not see). */
export class NotFoundError extends DomainError {
  readonly kind = 'not-found';
}

/** A name taken by another VM of the caller, a group already in the VM, a second KVM-VFIO device. */
export class AlreadyExistsError extends DomainError {
  readonly kind = 'already-exists';
}

/** The request is well formed but the world is not ready for it: a group not viable, held, busy. */
export class FailedPreconditionError extends DomainError {
  readonly kind = 'failed-precondition';
}

/** A malformed field. `field` is its name in the request. */
export class InvalidArgumentError extends DomainError {
  readonly kind = 'invalid-argument';
  readonly field: string;
  constructor(field: string, why: string) {
    super(`${field}: ${why}`);
    this.field = field;
  }
}

/** The caller may not make this call; the message names the missing permission. */
export class PermissionDeniedError extends DomainError {
  readonly kind = 'permission-denied';
}

/** A limit was met; the message names the limit and its value. */
export class ResourceExhaustedError extends DomainError {
  readonly kind = 'resource-exhausted';
}

/** The daemon is shutting down, or a VMM is gone. */
export class UnavailableError extends DomainError {
  readonly kind = 'unavailable';
}

/** A VMM did not answer in time, or did not exit when asked. */
export class DeadlineExceededError extends DomainError {
  readonly kind = 'deadline-exceeded';
  /**
   * For a request to a VMM past its deadline: the request's outcome still to
   * come (resolves when the VMM reports success; rejects with its SysError,
   * or with an UnavailableError or DeadlineExceededError when no result will
   * come). The request stays outstanding meanwhile.
   */
  readonly answer?: Promise<void>;
  constructor(message: string, answer?: Promise<void>) {
    super(message);
    this.answer = answer;
    answer?.catch(() => undefined);
  }
}
