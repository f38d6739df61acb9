/**
 * fast-check generators of session records (docs/session-protocol.md): valid
 * messages, mutations of their encodings, and plain junk. Shared by the codec
 * properties (test/fuzz/protocol.property.test.ts) and the handoff socket fuzz
 * (test/fuzz/handoff.fuzz.test.ts).
 */
import fc from 'fast-check';
import { FdKind, HEADER_BYTES, MANIFEST_ENTRY_BYTES, MAX_FDS_PER_RECORD, MAX_RECORD_BYTES, type Message, MsgType, RESULT_BIT, encode } from '../../src/protocol/session';

export const TYPES = Object.values(MsgType) as number[];
export const KINDS = Object.values(FdKind) as number[];
export const BOM = '\uFEFF';
export const utf8Length = (s: string) => Buffer.byteLength(s, 'utf8');

export const uint32 = fc.integer({ min: 0, max: 0xffffffff });

// Plain objects (fc.record makes null-prototype ones, which deepEqual tells apart).
export const manifest = fc.array(
  fc.tuple(fc.constantFrom(...KINDS), uint32).map(([kind, id]) => ({ kind, id })),
  { maxLength: MAX_FDS_PER_RECORD },
);

export const text = fc.oneof(
  fc.string({ unit: 'grapheme-ascii', maxLength: 200 }),
  fc.string({ unit: 'binary', maxLength: 200 }),
  fc.string({ unit: 'binary-ascii', maxLength: 200 }), // NUL and control characters too
  fc.string({ unit: 'grapheme-ascii', minLength: 3900, maxLength: 4064 }), // near the 4096-byte limit
  fc.constantFrom('', 'x', '\u0000', 'é', '😀', `a${BOM}`), // a BOM that is not first is kept
);

/** A message of the protocol within the record size limit; its text never starts with a BOM (see the fuzz report). */
export const validMessage: fc.Arbitrary<Message> = fc
  .record({
    type: fc.constantFrom(...TYPES),
    result: fc.boolean(),
    seq: uint32,
    status: fc.oneof(fc.constant(0), fc.integer({ min: 0, max: 0x7fffffff })),
    arg: fc.oneof(fc.constantFrom(0, 1, 12, 0xffffffff, 2 ** 32, Number.MAX_SAFE_INTEGER), fc.maxSafeNat()),
    manifest,
    text,
  })
  .map(({ result, type, ...m }) => ({ ...m, type: result ? type | RESULT_BIT : type }))
  .filter((m) => !m.text.startsWith(BOM) && HEADER_BYTES + MANIFEST_ENTRY_BYTES * m.manifest.length + utf8Length(m.text) <= MAX_RECORD_BYTES);

export type Mutation =
  | { kind: 'flip'; bits: number[] }
  | { kind: 'truncate'; at: number }
  | { kind: 'extend'; bytes: Uint8Array }
  | { kind: 'field'; offset: number; width: 1 | 2 | 4 | 8; value: bigint }
  | { kind: 'manifest-kind'; entry: number; value: number }
  | { kind: 'text-bytes'; bytes: Uint8Array }
  | { kind: 'oversize'; extra: number };

const HEADER_FIELDS: { offset: number; width: 2 | 4 | 8 }[] = [
  { offset: 0, width: 4 }, // magic
  { offset: 4, width: 2 }, // version
  { offset: 6, width: 2 }, // type
  { offset: 8, width: 4 }, // seq
  { offset: 12, width: 4 }, // status
  { offset: 16, width: 8 }, // arg
  { offset: 24, width: 2 }, // nfds
  { offset: 26, width: 2 }, // text_len
  { offset: 28, width: 4 }, // reserved
];

const interesting = (width: number) => {
  const max = (1n << BigInt(8 * width)) - 1n;
  return fc.oneof(
    fc.bigInt({ min: 0n, max }),
    fc.constantFrom(0n, 1n, 2n, 8n, 9n, max, max >> 1n, (max >> 1n) + 1n, 4096n, 4097n, 0x8000n, 2n ** 32n, 2n ** 32n + 1n, 2n ** 53n - 1n, 2n ** 53n).map((v) => v & max),
  );
};

export const mutation: fc.Arbitrary<Mutation> = fc.oneof(
  fc.record({ kind: fc.constant('flip' as const), bits: fc.array(fc.nat(8 * 4200), { minLength: 1, maxLength: 4 }) }),
  fc.record({ kind: fc.constant('truncate' as const), at: fc.nat(4200) }),
  fc.record({ kind: fc.constant('extend' as const), bytes: fc.uint8Array({ minLength: 1, maxLength: 64 }) }),
  fc.constantFrom(...HEADER_FIELDS).chain(({ offset, width }) => interesting(width).map((value) => ({ kind: 'field' as const, offset, width, value }))),
  fc.record({ kind: fc.constant('manifest-kind' as const), entry: fc.nat(7), value: fc.oneof(uint32, fc.constantFrom(0, 1, 2, 3, 4)) }),
  fc.record({ kind: fc.constant('text-bytes' as const), bytes: fc.uint8Array({ maxLength: 64 }) }),
  fc.record({ kind: fc.constant('oversize' as const), extra: fc.integer({ min: 1, max: 4000 }) }),
);

/** Applies one mutation to an encoded record (a copy; the input is not changed). */
export function mutate(rec: Uint8Array, m: Mutation): Buffer {
  const b = Buffer.from(rec);
  switch (m.kind) {
    case 'flip':
      for (const bit of m.bits) if (bit >> 3 < b.length) b[bit >> 3] ^= 1 << (bit & 7);
      return b;
    case 'truncate':
      return b.subarray(0, Math.min(m.at, b.length));
    case 'extend':
      return Buffer.concat([b, m.bytes]);
    case 'field':
      if (m.offset + m.width > b.length) return b;
      if (m.width === 8) b.writeBigUInt64LE(m.value, m.offset);
      else b.writeUIntLE(Number(m.value), m.offset, m.width);
      return b;
    case 'manifest-kind': {
      if (b.length < HEADER_BYTES) return b;
      const n = b.readUInt16LE(24);
      if (m.entry < n && HEADER_BYTES + 8 * m.entry + 4 <= b.length) b.writeUInt32LE(m.value, HEADER_BYTES + 8 * m.entry);
      return b;
    }
    case 'text-bytes': {
      // Replace the text with raw bytes and fix text_len: the header stays consistent.
      if (b.length < HEADER_BYTES) return b;
      const n = b.readUInt16LE(24);
      const head = Buffer.from(b.subarray(0, HEADER_BYTES + 8 * n));
      head.writeUInt16LE(m.bytes.length, 26);
      return Buffer.concat([head, m.bytes]);
    }
    case 'oversize': {
      // A consistent header that claims (and has) more than 4096 bytes.
      if (b.length < HEADER_BYTES) return b;
      const out = Buffer.concat([b, Buffer.alloc(m.extra, 0x61)]);
      const len = b.readUInt16LE(26) + m.extra;
      if (len > 0xffff) return out;
      out.writeUInt16LE(len, 26);
      return out.length > MAX_RECORD_BYTES ? out : Buffer.concat([out, Buffer.alloc(MAX_RECORD_BYTES + 1 - out.length, 0x61)]);
    }
  }
}

/** A valid message's record with one to three mutations applied. */
export const mutatedRecord = fc.tuple(validMessage, fc.array(mutation, { minLength: 1, maxLength: 3 })).map(([m, muts]) => muts.reduce<Buffer>((r, mu) => mutate(r, mu), encode(m)));

/** Bytes with no particular structure, some starting like a record. */
export const junkRecord: fc.Arbitrary<Uint8Array> = fc.oneof(
  fc.uint8Array({ maxLength: 64 }),
  fc.uint8Array({ minLength: 32, maxLength: 600 }),
  fc.uint8Array({ minLength: 4090, maxLength: 4200 }),
  // The right magic and version, the rest random: gets past the first checks.
  fc.uint8Array({ minLength: 26, maxLength: 300 }).map((r) => Buffer.concat([Buffer.from([0x4b, 0x56, 0x46, 0x31, 0x01, 0x00]), r])),
);

/** A 256-bit token in the daemon's encoding (base64url), known to nobody. */
export const randomToken = fc.uint8Array({ minLength: 32, maxLength: 32 }).map((b) => Buffer.from(b).toString('base64url'));
