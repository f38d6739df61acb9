/**
 * Attach tokens: how an orchestrator lets one VMM (by uid) take one VM.
 * 256 random bits, single use, bound to the VM's vmm_uid, with a TTL. Only
 * a SHA-256 of each token is kept, so neither logs nor state can replay one.
 */
import { createHash, randomBytes } from 'node:crypto';
import { PermissionDeniedError } from './errors';

export interface IssuedToken {
  token: string;
  expiresAt: Date;
}

interface Entry {
  vmId: string;
  vmmUid: number;
  expiresAt: number;
}

const digest = (token: string) => createHash('sha256').update(token).digest('base64url');

export class TokenStore {
  readonly #live = new Map<string, Entry>();
  /** Redeemed tokens, remembered until they would have expired, to say "used" rather than "unknown". */
  readonly #used = new Map<string, number>();
  readonly #now: () => number;
  readonly ttlMs: number;

  constructor(ttlMs: number, now: () => number = Date.now) {
    this.ttlMs = ttlMs;
    this.#now = now;
  }

  /** A new token for the VM; earlier tokens of the same VM stop working. */
  issue(vmId: string, vmmUid: number): IssuedToken {
    this.revokeVm(vmId);
    this.#sweep();
    const token = randomBytes(32).toString('base64url');
    const expiresAt = this.#now() + this.ttlMs;
    this.#live.set(digest(token), { vmId, vmmUid, expiresAt });
    return { token, expiresAt: new Date(expiresAt) };
  }

  /**
   * Spends a token for a VMM running as `uid`. Throws PermissionDeniedError
   * saying which check failed; a token presented by the wrong uid stays
   * valid for the right one.
   */
  redeem(token: string, uid: number): string {
    const key = digest(token);
    const e = this.#live.get(key);
    if (!e) {
      throw new PermissionDeniedError(this.#used.has(key) ? 'attach token was already used' : 'attach token is not known');
    }
    if (e.expiresAt <= this.#now()) {
      this.#live.delete(key);
      throw new PermissionDeniedError('attach token has expired');
    }
    if (e.vmmUid !== uid) throw new PermissionDeniedError(`attach token is for vmm uid ${e.vmmUid}, not uid ${uid}`);
    this.#live.delete(key);
    this.#used.set(key, e.expiresAt);
    return e.vmId;
  }

  revokeVm(vmId: string): void {
    for (const [k, e] of this.#live) if (e.vmId === vmId) this.#live.delete(k);
  }

  /** Tokens still redeemable for any of `vmIds`. */
  pendingFor(vmIds: Set<string>): number {
    this.#sweep();
    let n = 0;
    for (const e of this.#live.values()) if (vmIds.has(e.vmId)) n++;
    return n;
  }

  /** Tokens still redeemable. */
  get pending(): number {
    this.#sweep();
    return this.#live.size;
  }

  #sweep(): void {
    const now = this.#now();
    for (const [k, e] of this.#live) if (e.expiresAt <= now) this.#live.delete(k);
    for (const [k, t] of this.#used) if (t <= now) this.#used.delete(k);
  }
}
