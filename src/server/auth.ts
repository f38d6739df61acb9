/**
 * Who may call. Checked in one place (service.ts wraps every handler), never
 * inside handlers. Without a policy file only uid 0 may call.
 */
import { PermissionDeniedError } from '../broker/errors';
import type { Caller } from '../broker/broker';

export interface Authorizer {
  /** Throws PermissionDeniedError naming what the caller lacks. */
  authorize(caller: Caller, method: string): void;
}

export class RootOnly implements Authorizer {
  authorize(caller: Caller, method: string): void {
    if (caller.uid !== 0) {
      throw new PermissionDeniedError(`${method}: uid ${caller.uid} may not call kvmvfiod (no policy is loaded, so only uid 0 may)`);
    }
  }
}
