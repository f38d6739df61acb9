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
  /** The live token of each VM (one at most), so revoking is not a scan. */
  readonly #byVm = new Map<string, string>();
  #sweptAt = 0;
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
    const key = digest(token);
    this.#live.set(key, { vmId, vmmUid, expiresAt });
    this.#byVm.set(vmId, key);
    return { token, expiresAt: new Date(expiresAt) };
  }

  /**
   * Spends a token for a VMM running as `uid`. Throws PermissionDeniedError
   * saying which check failed; a token presented by the wrong uid stays
   * valid for the right one.
   */
  redeem(token: string, uid: number): string {
    const key = this.check(token, uid);
    const e = this.#live.get(key)!;
    this.#drop(key, e.vmId);
    this.#used.set(key, e.expiresAt);
    return e.vmId;
  }

  /**
   * The checks of redeem() without spending the token (its digest when it
   * would redeem): for the session to refuse a bad token before any costly
   * step of an attach.
   */
  check(token: string, uid: number): string {
    const key = digest(token);
    const e = this.#live.get(key);
    if (!e) {
      throw new PermissionDeniedError(this.#used.has(key) ? 'attach token was already used' : 'attach token is not known');
    }
    if (e.expiresAt <= this.#now()) {
      this.#drop(key, e.vmId);
      throw new PermissionDeniedError('attach token has expired');
    }
    if (e.vmmUid !== uid) throw new PermissionDeniedError(`attach token is for vmm uid ${e.vmmUid}, not uid ${uid}`);
    return key;
  }

  revokeVm(vmId: string): void {
    const key = this.#byVm.get(vmId);
    if (key) this.#drop(key, vmId);
  }

  #drop(key: string, vmId: string): void {
    this.#live.delete(key);
    if (this.#byVm.get(vmId) === key) this.#byVm.delete(vmId);
  }

  /** Tokens still redeemable for any of `vmIds`: O(vmIds), each checked for expiry here rather than by a sweep of every token. */
  pendingFor(vmIds: ReadonlySet<string>): number {
    const now = this.#now();
    let n = 0;
    for (const id of vmIds) {
      const key = this.#byVm.get(id);
      const e = key === undefined ? undefined : this.#live.get(key);
      if (e && e.expiresAt > now) n++;
    }
    return n;
  }

  /** Tokens still redeemable. */
  get pending(): number {
    this.#sweep(true);
    return this.#live.size;
  }

  /** Forgets expired tokens; at most once a second (redeem checks expiry itself). */
  #sweep(force = false): void {
    const now = this.#now();
    if (!force && now - this.#sweptAt < 1000) return;
    this.#sweptAt = now;
    for (const [k, e] of this.#live) if (e.expiresAt <= now) this.#drop(k, e.vmId);
    for (const [k, t] of this.#used) if (t <= now) this.#used.delete(k);
  }
}
