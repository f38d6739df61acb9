/**
 * The handoff session protocol, version 1 (docs/session-protocol.md):
 * encoding and strict decoding of one SOCK_SEQPACKET record. Shared by the
 * daemon (src/server/session) and the VMM library (src/vmm). No I/O here.
 */

export const MAGIC = 0x3146564b; // the bytes "KVF1"
export const VERSION = 1;
export const HEADER_BYTES = 32;
export const MANIFEST_ENTRY_BYTES = 8;
export const RESULT_BIT = 0x8000;
/** Same bounds as the transport (src/kernel/unix.ts). */
export const MAX_RECORD_BYTES = 4096;
export const MAX_FDS_PER_RECORD = 8;

export const MsgType = {
  ATTACH: 1,
  VM_CREATED: 2,
  PING: 3,
  CREATE_VFIO_DEVICE: 16,
  ADD_GROUP: 17,
  REMOVE_GROUP: 18,
  SHUTDOWN: 19,
  /** Device-cdev handoff: bind the device (one VFIO_DEVICE fd) to the VMM's iommufd, attach it to its IOAS, KVM_DEV_VFIO_FILE_ADD it. arg = the PCI address id. */
  ADD_DEVICE: 20,
  /** KVM_DEV_VFIO_FILE_DEL of the device (arg = its PCI address id), then detach and close it. */
  REMOVE_DEVICE: 21,
} as const;
export type MsgTypeName = keyof typeof MsgType;

/** ATTACH arg bits (S12). */
export const AttachFlag = {
  /** The VMM does not speak the session after ATTACH (kvmvfioctl attach): its result carries every fd at once. */
  PASSIVE: 1,
  /** The VMM follows the rules of edition 2 of the document, marked ②; the daemon then applies them to it too. */
  EDITION2: 2,
} as const;
export const ATTACH_KNOWN_FLAGS = AttachFlag.PASSIVE | AttachFlag.EDITION2;

/** Edition 2, in a refused ATTACH result's arg (S13): the refusal neither spent the token nor changed the VM. */
export const REFUSAL_TOKEN_KEPT = 1;

/** Request types whose arg is 0 (S5). */
const argZero = new Set<number>([MsgType.VM_CREATED, MsgType.PING, MsgType.CREATE_VFIO_DEVICE, MsgType.SHUTDOWN]);

/**
 * What a record that decodes breaks of S5 (edition 2 makes these garbled):
 * a NUL in its text, a request with a nonzero status, a request whose arg
 * the table fixes at 0 with another, an ATTACH arg with unknown bits is left
 * to the daemon (it answers EOPNOTSUPP), a result other than ATTACH's with a
 * nonzero arg. Undefined when it breaks none.
 */
export function fieldViolation(m: Message): string | undefined {
  if (m.text.includes('\0')) return `${typeName(m.type)} text holds a NUL byte`;
  if (isResult(m.type)) {
    if (m.type !== (MsgType.ATTACH | RESULT_BIT) && m.arg !== 0) return `${typeName(m.type)} has arg ${m.arg}; a result other than ATTACH's carries 0`;
    return undefined;
  }
  if (m.status !== 0) return `${typeName(m.type)} has status ${m.status}; a request carries 0`;
  if (argZero.has(m.type) && m.arg !== 0) return `${typeName(m.type)} has arg ${m.arg}; it carries 0`;
  return undefined;
}

/**
 * Whether a request's manifest is the one its type has (S21): ADD_GROUP one
 * VFIO_GROUP, ADD_DEVICE one VFIO_DEVICE, each with the id of the arg; the
 * ATTACH result the kinds it lists; everything else none. Undefined when it
 * is; otherwise what is wrong.
 */
export function manifestViolation(m: Message): string | undefined {
  const one = (kind: number, what: string) =>
    m.manifest.length === 1 && m.manifest[0].kind === kind && m.manifest[0].id === m.arg ? undefined : `${typeName(m.type)} must carry exactly one ${what} fd whose id is its arg (${m.arg})`;
  if (m.type === MsgType.ADD_GROUP) return one(FdKind.VFIO_GROUP, 'VFIO_GROUP');
  if (m.type === MsgType.ADD_DEVICE) return one(FdKind.VFIO_DEVICE, 'VFIO_DEVICE');
  if (m.type === (MsgType.ATTACH | RESULT_BIT)) return undefined;
  return m.manifest.length ? `${typeName(m.type)} carries ${m.manifest.length} fds; it carries none` : undefined;
}

const typeNames = new Map<number, MsgTypeName>(Object.entries(MsgType).map(([k, v]) => [v, k as MsgTypeName]));

export const FdKind = {
  KVM: 1,
  VFIO_CONTAINER: 2,
  VFIO_GROUP: 3,
  /** A VMM's own iommufd (/dev/iommu); id 0. */
  IOMMUFD: 4,
  /** A VFIO device cdev (/dev/vfio/devices/vfioN); id = its PCI address (pciAddressToId). */
  VFIO_DEVICE: 5,
  /**
   * Sent by a passive VMM with its ATTACH: its end of an AF_UNIX SOCK_STREAM
   * socketpair whose other end is its QEMU's monitor (QMP); id 0. The daemon
   * drives hot-plug through it (docs/session-protocol.md, "The QMP channel").
   */
  QMP: 6,
} as const;

const PCI_ADDRESS = /^([0-9a-f]{4}):([0-9a-f]{2}):([0-1][0-9a-f])\.([0-7])$/;

/** "0000:00:04.0" as the 32 bits of a manifest id: domain << 16 | bus << 8 | device << 3 | function. */
export function pciAddressToId(address: string): number {
  const m = PCI_ADDRESS.exec(address);
  if (!m) throw new RangeError(`not a PCI address: ${JSON.stringify(address)}`);
  return ((parseInt(m[1], 16) << 16) | (parseInt(m[2], 16) << 8) | (parseInt(m[3], 16) << 3) | Number(m[4])) >>> 0;
}

export function idToPciAddress(id: number): string {
  const hex = (v: number, w: number) => v.toString(16).padStart(w, '0');
  return `${hex(id >>> 16, 4)}:${hex((id >>> 8) & 0xff, 2)}:${hex((id >>> 3) & 0x1f, 2)}.${id & 7}`;
}

const fdKinds = new Set<number>(Object.values(FdKind));

export interface FdEntry {
  kind: number;
  id: number;
}

export interface Message {
  type: number;
  seq: number;
  /** 0 or a positive errno; requests carry 0. */
  status: number;
  arg: number;
  manifest: FdEntry[];
  text: string;
}

/** A record that breaks the protocol; the session ends with this reason. */
export class ProtocolError extends Error {
  override readonly name = 'ProtocolError';
}

export function isResult(type: number): boolean {
  return (type & RESULT_BIT) !== 0;
}

/** "ADD_GROUP", "ADD_GROUP result", or "type 0x1234" for an unknown one. */
export function typeName(type: number): string {
  const base = typeNames.get(type & ~RESULT_BIT);
  if (!base) return `type 0x${type.toString(16)}`;
  return isResult(type) ? `${base} result` : base;
}

const strictUtf8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });

export function encode(m: Message): Buffer {
  const text = Buffer.from(m.text, 'utf8');
  const len = HEADER_BYTES + MANIFEST_ENTRY_BYTES * m.manifest.length + text.length;
  if (m.manifest.length > MAX_FDS_PER_RECORD) throw new RangeError(`${m.manifest.length} fds > ${MAX_FDS_PER_RECORD}`);
  if (len > MAX_RECORD_BYTES) throw new RangeError(`record of ${len} bytes > ${MAX_RECORD_BYTES}`);
  const b = Buffer.alloc(len);
  b.writeUInt32LE(MAGIC, 0);
  b.writeUInt16LE(VERSION, 4);
  b.writeUInt16LE(m.type, 6);
  b.writeUInt32LE(m.seq >>> 0, 8);
  b.writeInt32LE(m.status, 12);
  b.writeBigUInt64LE(BigInt(m.arg), 16);
  b.writeUInt16LE(m.manifest.length, 24);
  b.writeUInt16LE(text.length, 26);
  b.writeUInt32LE(0, 28);
  m.manifest.forEach((e, i) => {
    b.writeUInt32LE(e.kind, HEADER_BYTES + 8 * i);
    b.writeUInt32LE(e.id, HEADER_BYTES + 8 * i + 4);
  });
  text.copy(b, HEADER_BYTES + MANIFEST_ENTRY_BYTES * m.manifest.length);
  return b;
}

/**
 * Decodes one record received with `fdsReceived` fds. Throws ProtocolError
 * for anything the document calls garbled.
 */
export function decode(b: Uint8Array, fdsReceived: number): Message {
  if (b.length < HEADER_BYTES) throw new ProtocolError(`record of ${b.length} bytes is shorter than the ${HEADER_BYTES}-byte header`);
  if (b.length > MAX_RECORD_BYTES) throw new ProtocolError(`record longer than ${MAX_RECORD_BYTES} bytes`);
  const buf = Buffer.from(b.buffer, b.byteOffset, b.length);
  const magic = buf.readUInt32LE(0);
  if (magic !== MAGIC) throw new ProtocolError(`bad magic 0x${magic.toString(16)}`);
  const version = buf.readUInt16LE(4);
  if (version !== VERSION) throw new ProtocolError(`protocol version ${version} is not supported (this side speaks ${VERSION})`);
  const type = buf.readUInt16LE(6);
  if (!typeNames.has(type & ~RESULT_BIT)) throw new ProtocolError(`unknown message ${typeName(type)}`);
  const nfds = buf.readUInt16LE(24);
  const textLen = buf.readUInt16LE(26);
  if (buf.readUInt32LE(28) !== 0) throw new ProtocolError('reserved header field is not 0');
  if (nfds > MAX_FDS_PER_RECORD) throw new ProtocolError(`manifest of ${nfds} fds > ${MAX_FDS_PER_RECORD}`);
  const expected = HEADER_BYTES + MANIFEST_ENTRY_BYTES * nfds + textLen;
  if (expected !== buf.length) throw new ProtocolError(`record is ${buf.length} bytes, its header says ${expected}`);
  if (nfds !== fdsReceived) throw new ProtocolError(`manifest lists ${nfds} fds, ${fdsReceived} arrived`);
  const arg = buf.readBigUInt64LE(16);
  if (arg > BigInt(Number.MAX_SAFE_INTEGER)) throw new ProtocolError('arg out of range');
  const manifest: FdEntry[] = [];
  for (let i = 0; i < nfds; i++) {
    const kind = buf.readUInt32LE(HEADER_BYTES + 8 * i);
    if (!fdKinds.has(kind)) throw new ProtocolError(`unknown fd kind ${kind} in the manifest`);
    manifest.push({ kind, id: buf.readUInt32LE(HEADER_BYTES + 8 * i + 4) });
  }
  const textBytes = buf.subarray(HEADER_BYTES + MANIFEST_ENTRY_BYTES * nfds);
  let text: string;
  try {
    // Exactly the bytes sent: no BOM stripped, no invalid UTF-8 papered over.
    text = strictUtf8.decode(textBytes);
  } catch {
    throw new ProtocolError('text is not UTF-8');
  }
  const status = buf.readInt32LE(12);
  if (status < 0) throw new ProtocolError(`negative status ${status}`);
  return { type, seq: buf.readUInt32LE(8), status, arg: Number(arg), manifest, text };
}
