/**
 * Who may call: the policy, checked in one place (service.ts wraps every
 * handler), never inside handlers. The current policy can be swapped (a
 * SIGHUP reload); calls already running keep the principal they started with.
 */
import type { Caller } from '../broker/broker';
import { Policy, type Principal } from '../broker/policy';

export interface Authorizer {
  /** Throws PermissionDeniedError naming what the caller lacks; returns the principal it acts as. */
  authorize(caller: Caller, method: string): Principal;
}

export class PolicyAuthorizer implements Authorizer {
  #policy: Policy;

  constructor(policy: Policy = Policy.rootOnly()) {
    this.#policy = policy;
  }

  get policy(): Policy {
    return this.#policy;
  }

  set policy(p: Policy) {
    this.#policy = p;
  }

  authorize(caller: Caller, method: string): Principal {
    return this.#policy.authorize(caller, method);
  }
}
