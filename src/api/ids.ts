/**
 * The shape of a VM id, shared by the server (which refuses VM names of this
 * shape) and the client (which takes an argument of this shape as an id and
 * never as a name). Ids are lower-case UUIDs (randomUUID); the shape is
 * matched case-insensitively, so that "0A1B…" is never a name either.
 */
const VM_ID_SHAPE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

/** Whether `s` reads as a VM id (a UUID, in any case). */
export function isVmIdShaped(s: string): boolean {
  return s.length === 36 && VM_ID_SHAPE.test(s);
}
