/** Assertions the tests share. */
import assert from 'node:assert/strict';
import { status } from '@grpc/grpc-js';
import { isApiError } from '../../src/client/client';
import { SysError } from '../../src/kernel';

/** Awaits `p` and asserts it failed with gRPC status `code` (and details matching `detail`); returns the details. */
export async function expectStatus(p: Promise<unknown>, code: status, detail?: RegExp): Promise<string> {
  try {
    await p;
  } catch (e) {
    assert.ok(isApiError(e), `not a gRPC error: ${String(e)}`);
    assert.equal(status[e.code], status[code], `got ${status[e.code]}: ${e.details}`);
    if (detail) assert.match(e.details, detail);
    return e.details;
  }
  assert.fail(`expected ${status[code]}`);
}

/** Polls `fn` until it returns something truthy; fails naming `what` after `timeoutMs`. */
export async function until<T>(what: string, fn: () => Promise<T | undefined | false>, timeoutMs = 10_000): Promise<T> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > end) assert.fail(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** Runs `fn`, which must throw a SysError; returns it. */
export function sysErrorOf(fn: () => unknown): SysError {
  try {
    fn();
  } catch (e) {
    assert.ok(e instanceof SysError, `expected a SysError, got ${String(e)}`);
    return e;
  }
  assert.fail('expected the call to fail');
}
