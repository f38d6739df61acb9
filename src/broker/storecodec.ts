/**
 * How a state entry is kept in the store: the first 8 bytes of the SHA-256
 * of its JSON text, then the text. LMDB keeps no checksums of its own, so a
 * damaged byte in a value would otherwise be read back as a different record.
 */
import { createHash } from 'node:crypto';

const DIGEST_BYTES = 8;

const digestOf = (text: Buffer) => createHash('sha256').update(text).digest().subarray(0, DIGEST_BYTES);

export function encodeEntry(json: string): Buffer {
  const text = Buffer.from(json, 'utf8');
  return Buffer.concat([digestOf(text), text]);
}

export type Decoded = { ok: true; json: string; value: unknown } | { ok: false; why: string };

export function decodeEntry(buf: Buffer | Uint8Array | undefined): Decoded {
  if (!buf || buf.length < DIGEST_BYTES) return { ok: false, why: 'shorter than its checksum' };
  const b = Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength);
  const text = b.subarray(DIGEST_BYTES);
  if (!digestOf(text).equals(b.subarray(0, DIGEST_BYTES))) return { ok: false, why: 'checksum mismatch' };
  const json = text.toString('utf8');
  try {
    return { ok: true, json, value: JSON.parse(json) };
  } catch {
    return { ok: false, why: 'not JSON' };
  }
}
