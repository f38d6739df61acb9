/**
 * Properties of the session record codec (src/protocol/session.ts) against
 * docs/session-protocol.md:
 *
 *  - every valid message survives encode → decode unchanged, and its record
 *    is at most 4096 bytes; encode refuses (RangeError) rather than produce a
 *    record the peer must reject;
 *  - decode of arbitrary bytes, and of valid records mutated (bit flips,
 *    truncation, extension, header fields overwritten, manifest kinds, wrong
 *    fd counts, oversize), either returns a message that re-encodes to the
 *    very same bytes or throws ProtocolError — never anything else;
 *  - anything over 4096 bytes is refused.
 *
 * Seeded: KVMVFIO_FUZZ_SEED=N replays a run; KVMVFIO_FUZZ_SCALE multiplies the case counts.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { FdKind, HEADER_BYTES, MAX_FDS_PER_RECORD, MAX_RECORD_BYTES, type Message, MsgType, ProtocolError, RESULT_BIT, decode, encode } from '../../src/protocol/session';
import { fuzzSeed, runs } from '../helpers/fuzz';
import { BOM, KINDS, TYPES, junkRecord, mutate, mutation, uint32, utf8Length, validMessage } from '../helpers/records';

const SEED = fuzzSeed('protocol');
const params = (n: number) => ({ seed: SEED, numRuns: runs(n) });

const utf8 = utf8Length;

/** Outcome of a decode: the message, or the ProtocolError. Any other exception fails the property. */
function tryDecode(b: Uint8Array, fds: number): Message | ProtocolError {
  try {
    return decode(b, fds);
  } catch (e) {
    if (e instanceof ProtocolError) return e;
    throw new Error(`decode threw ${e instanceof Error ? `${e.constructor.name}: ${e.message}` : String(e)}, not ProtocolError, for ${Buffer.from(b).toString('hex').slice(0, 200)} with ${fds} fds`);
  }
}

/** Well-formed UTF-8 that TextDecoder gives back byte for byte (no leading BOM: see the report). */
function textRoundTrips(bytes: Uint8Array): boolean {
  if (bytes.length >= 3 && bytes[0] === 0xef && bytes[1] === 0xbb && bytes[2] === 0xbf) return false;
  try {
    new TextDecoder('utf-8', { fatal: true }).decode(bytes);
    return true;
  } catch {
    return false;
  }
}

/** fds received: usually what the manifest says, sometimes not. */
const fdDelta = fc.oneof({ weight: 3, arbitrary: fc.constant(0) }, { weight: 1, arbitrary: fc.integer({ min: -3, max: 3 }) }, { weight: 1, arbitrary: fc.integer({ min: 9, max: 253 }) });

// --- properties ---------------------------------------------------------------

describe(`session record codec (seed ${SEED})`, () => {
  test('encode → decode gives back every valid message; the record is 32 + 8·nfds + text bytes ≤ 4096', () => {
    fc.assert(
      fc.property(validMessage, (m) => {
        const rec = encode(m);
        assert.equal(rec.length, HEADER_BYTES + 8 * m.manifest.length + utf8(m.text));
        assert.ok(rec.length <= MAX_RECORD_BYTES);
        const back = decode(rec, m.manifest.length);
        assert.deepEqual(back, m);
        // Also from a view into a larger buffer (as a receive buffer would be).
        const big = Buffer.alloc(rec.length + 40, 0xee);
        rec.copy(big, 17);
        assert.deepEqual(decode(new Uint8Array(big.buffer, big.byteOffset + 17, rec.length), m.manifest.length), m);
      }),
      params(3000),
    );
  });

  test('encode refuses a message that would make an oversize record or carry more than 8 fds', () => {
    const tooBig = fc.record({
      type: fc.constantFrom(...TYPES),
      seq: uint32,
      status: fc.constant(0),
      arg: fc.constant(0),
      manifest: fc.array(fc.record({ kind: fc.constantFrom(...KINDS), id: uint32 }), { maxLength: 12 }),
      text: fc.string({ unit: 'grapheme-ascii', minLength: 3900, maxLength: 5000 }),
    });
    fc.assert(
      fc.property(tooBig, (m) => {
        const len = HEADER_BYTES + 8 * m.manifest.length + utf8(m.text);
        if (len <= MAX_RECORD_BYTES && m.manifest.length <= MAX_FDS_PER_RECORD) return;
        assert.throws(() => encode(m), RangeError);
      }),
      params(500),
    );
  });

  test('decode of a mutated valid record: a message whose header and manifest re-encode identically, or ProtocolError', () => {
    let decoded = 0;
    let refused = 0;
    fc.assert(
      fc.property(validMessage, fc.array(mutation, { minLength: 1, maxLength: 3 }), fdDelta, (m, muts, delta) => {
        let rec = encode(m);
        for (const mu of muts) rec = mutate(rec, mu);
        const nfds = rec.length >= 26 ? rec.readUInt16LE(24) : m.manifest.length;
        const fds = Math.max(0, nfds + delta);
        const out = tryDecode(rec, fds);
        if (out instanceof ProtocolError) {
          refused++;
          return;
        }
        decoded++;
        assert.ok(rec.length <= MAX_RECORD_BYTES && rec.length >= HEADER_BYTES, `decoded a ${rec.length}-byte record`);
        assert.equal(out.manifest.length, fds, 'the manifest matches the fds received');
        assert.ok(TYPES.includes(out.type & ~RESULT_BIT), `type ${out.type}`);
        assert.ok(out.status >= 0 && Number.isSafeInteger(out.arg) && out.arg >= 0);
        const textStart = HEADER_BYTES + 8 * out.manifest.length;
        if (textRoundTrips(rec.subarray(textStart))) {
          assert.ok(encode(out).equals(rec), `re-encoding differs: ${rec.toString('hex').slice(0, 160)}`);
        } else {
          // Known: see the next (todo) test. The fixed part must still match.
          assert.equal(out.manifest.length, rec.readUInt16LE(24));
        }
      }),
      params(6000),
    );
    assert.ok(decoded > 0 && refused > 0, `decoded ${decoded}, refused ${refused}`);
  });

  test('decode of arbitrary bytes: ProtocolError or a message that re-encodes to the same bytes', () => {
    fc.assert(
      fc.property(junkRecord, fc.integer({ min: 0, max: 10 }), (b, fds) => {
        const out = tryDecode(b, fds);
        if (out instanceof ProtocolError) return;
        if (textRoundTrips(b.subarray(HEADER_BYTES + 8 * out.manifest.length))) assert.ok(encode(out).equals(Buffer.from(b)));
      }),
      params(4000),
    );
  });

  test('decode refuses every record over 4096 bytes, whatever it says', () => {
    fc.assert(
      fc.property(validMessage, fc.integer({ min: MAX_RECORD_BYTES + 1, max: 70000 }), fc.boolean(), (m, len, consistent) => {
        const rec = Buffer.alloc(len, 0x62);
        encode({ ...m, text: '' }).copy(rec);
        if (consistent && len - HEADER_BYTES - 8 * m.manifest.length <= 0xffff) rec.writeUInt16LE(len - HEADER_BYTES - 8 * m.manifest.length, 26);
        const out = tryDecode(rec, m.manifest.length);
        assert.ok(out instanceof ProtocolError, `a ${len}-byte record was decoded`);
      }),
      params(500),
    );
  });

  test('garbled records named by the document are all refused', () => {
    const ok = encode({ type: MsgType.ATTACH, seq: 1, status: 0, arg: 0, manifest: [{ kind: FdKind.KVM, id: 0 }], text: 'tok' });
    const set = (off: number, w: number, v: number | bigint) => {
      const b = Buffer.from(ok);
      if (w === 8) b.writeBigUInt64LE(BigInt(v), off);
      else b.writeUIntLE(Number(v), off, w);
      return b;
    };
    const cases: [string, Buffer, number][] = [
      ['shorter than 32', ok.subarray(0, 31), 1],
      ['bad magic', set(0, 4, 0x3146564c), 1],
      ['bad version', set(4, 2, 2), 1],
      ['reserved not 0', set(28, 4, 1), 1],
      ['length mismatch (text_len)', set(26, 2, 4), 1],
      ['length mismatch (extra byte)', Buffer.concat([ok, Buffer.from([0])]), 1],
      ['nfds over 8', set(24, 2, 9), 9],
      ['fds received differ', ok, 0],
      ['fds received differ (more)', ok, 2],
      ['unknown manifest kind', set(32, 4, 7), 1],
      ['unknown type', set(6, 2, 4), 1],
      ['unknown result type', set(6, 2, 0x8004), 1],
      ['negative status', set(12, 4, 0xffffffff), 1],
      ['arg above 2^53 - 1', set(16, 8, 2n ** 53n), 1],
    ];
    for (const [what, b, fds] of cases) assert.ok(tryDecode(b, fds) instanceof ProtocolError, what);
  });

  // docs/session-protocol.md: text is "UTF-8 text". decode() uses
  // TextDecoder('utf-8', { fatal: false }) with the default ignoreBOM: false,
  // so a leading U+FEFF is dropped (a valid message does not round-trip) and
  // invalid UTF-8 is replaced with U+FFFD (the peer's bytes are not what the
  // daemon logs or compares).
  test('strict: every decoded record re-encodes byte for byte (text included)', () => {
    fc.assert(
      fc.property(
        fc.oneof(
          fc.string({ unit: 'binary', maxLength: 50 }).map((s) => encode({ type: MsgType.PING, seq: 1, status: 0, arg: 0, manifest: [], text: BOM + s })),
          fc.uint8Array({ maxLength: 50 }).map((t) => Buffer.concat([encode({ type: MsgType.PING, seq: 1, status: 0, arg: 0, manifest: [], text: 'x'.repeat(t.length) }).subarray(0, HEADER_BYTES), t])),
        ),
        (rec) => {
          const out = tryDecode(rec, 0);
          if (!(out instanceof ProtocolError)) assert.ok(encode(out).equals(rec), `${rec.toString('hex')} decoded to ${JSON.stringify(out.text)}`);
        },
      ),
      params(500),
    );
  });
});
