/**
 * ListVms page tokens (AIP-158): opaque to callers, 20 base64url characters.
 *
 *   byte 0      format version (1)
 *   bytes 1-6   the first 6 bytes of SHA-256 over the filter, in a canonical
 *               form (labels by key, states sorted and without repeats)
 *   bytes 7-14  the seq of the last VM of the previous page, big-endian
 *
 * The token holds a place in creation order, not an offset, so records
 * created or deleted between pages shift nothing. It needs no secret: a
 * forged place only moves the listing within what the caller may see anyway
 * (the owner scope is applied on every page). The filter digest catches a
 * token reused with another filter, which would silently skip or repeat VMs.
 */
import { createHash } from 'node:crypto';
import type { VmFilter } from '../broker/broker';
import { InvalidArgumentError } from '../broker/errors';

const VERSION = 1;
const DIGEST_BYTES = 6;
const TOKEN_BYTES = 1 + DIGEST_BYTES + 8;
/** base64url of 15 bytes: 20 characters, no padding, no spare bits. */
const TOKEN_TEXT = /^[A-Za-z0-9_-]{20}$/;

function filterDigest(f: VmFilter): Buffer {
  const labels = Object.keys(f.labels)
    .sort()
    .map((k) => [k, f.labels[k]]);
  const states = [...new Set(f.states)].sort();
  return createHash('sha256').update(JSON.stringify([labels, states])).digest().subarray(0, DIGEST_BYTES);
}

/** The token of the page that starts after the record `afterSeq`, for this filter. */
export function encodePageToken(afterSeq: number, filter: VmFilter): string {
  const b = Buffer.alloc(TOKEN_BYTES);
  b[0] = VERSION;
  filterDigest(filter).copy(b, 1);
  b.writeBigUInt64BE(BigInt(afterSeq), 1 + DIGEST_BYTES);
  return b.toString('base64url');
}

/**
 * The place a token marks (the seq after which the page starts); 0 for an
 * empty token (the first page). InvalidArgumentError on `field` for a token
 * this daemon did not make, or made for another filter.
 */
export function decodePageToken(field: string, token: string, filter: VmFilter): number {
  if (token === '') return 0;
  const malformed = () =>
    new InvalidArgumentError(field, 'not a page token returned by ListVms (use next_page_token as it came, or leave page_token empty to start over)');
  if (!TOKEN_TEXT.test(token)) throw malformed();
  const b = Buffer.from(token, 'base64url');
  if (b.length !== TOKEN_BYTES || b[0] !== VERSION) throw malformed();
  const seq = b.readBigUInt64BE(1 + DIGEST_BYTES);
  if (seq < 1n || seq > BigInt(Number.MAX_SAFE_INTEGER)) throw malformed();
  if (!filterDigest(filter).equals(b.subarray(1, 1 + DIGEST_BYTES))) {
    throw new InvalidArgumentError(field, 'was returned for a different filter; send the same labels and states as the request that returned it, or leave page_token empty to start over');
  }
  return Number(seq);
}
