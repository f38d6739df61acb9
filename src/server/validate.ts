/**
 * Request validation at the edge: every field is checked before the broker
 * sees the call, each failure names its field, and a rejected request
 * changes nothing.
 */
import { totalmem } from 'node:os';
import { isVmIdShaped } from '../api/ids';
import { InvalidArgumentError } from '../broker/errors';
import type { CreateVmSpec, PageRequest, VmFilter } from '../broker/broker';
import type { VmState } from '../broker/vms';
import type { CreateVmRequest__Output } from '../generated/kvmvfio/v1/CreateVmRequest';
import type { ListVmsRequest__Output } from '../generated/kvmvfio/v1/ListVmsRequest';
import { decodePageToken } from './pagetoken';

export const LIMITS = {
  nameLength: 63,
  labels: 32,
  labelKeyLength: 63,
  labelValueLength: 253,
  groupsPerVm: 64,
  requestIdLength: 128,
  vmIdLength: 64,
  /** ListVms page_size when 0; see the proto. */
  defaultPageSize: 100,
  /** A larger ListVms page_size is taken as this: one answer of 500 VMs is about 200 KB and a few ms of the event loop. */
  maxPageSize: 500,
} as const;

const DNS_LABEL = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/;
const LABEL_KEY = /^[A-Za-z0-9._/-]+$/;
const REQUEST_ID = /^[A-Za-z0-9._:-]+$/;
const VM_ID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
const MAX_UID = 0xfffffffe;
/** Read once: os.totalmem() reads /proc/meminfo on every call. */
const HOST_RAM = BigInt(totalmem()); // (uid_t)-1 means "no uid" to the kernel

const stateNames = new Map<string, VmState>([
  ['VM_STATE_PENDING', 'PENDING'],
  ['VM_STATE_RUNNING', 'RUNNING'],
  ['VM_STATE_EXITED', 'EXITED'],
  ['VM_STATE_FAILED', 'FAILED'],
]);

export function vmName(field: string, v: string): string {
  if (!v) throw new InvalidArgumentError(field, 'required');
  if (v.length > LIMITS.nameLength) throw new InvalidArgumentError(field, `longer than ${LIMITS.nameLength} characters`);
  // A name that reads as an id would let one tenant's VM be taken for another's by whoever
  // resolves names (kvmvfioctl takes such an argument as an id, always).
  if (isVmIdShaped(v)) throw new InvalidArgumentError(field, `"${v}" is shaped like a VM id (a UUID); a name must not be, so that no name is ever taken for an id`);
  if (!DNS_LABEL.test(v)) throw new InvalidArgumentError(field, `"${v}" is not a DNS label (lower-case letters, digits and '-', starting and ending with a letter or digit)`);
  return v;
}

export function vmId(field: string, v: string): string {
  if (!v) throw new InvalidArgumentError(field, 'required');
  if (v.length > LIMITS.vmIdLength || !VM_ID.test(v)) throw new InvalidArgumentError(field, 'not a VM id (a UUID as returned by CreateVm)');
  return v;
}

export function labels(field: string, v: Record<string, string>): Record<string, string> {
  const entries = Object.entries(v ?? {});
  if (entries.length > LIMITS.labels) throw new InvalidArgumentError(field, `${entries.length} labels; at most ${LIMITS.labels}`);
  for (const [k, val] of entries) {
    if (!k || k.length > LIMITS.labelKeyLength || !LABEL_KEY.test(k)) {
      throw new InvalidArgumentError(`${field}[${JSON.stringify(k.slice(0, 80))}]`, `a key is 1-${LIMITS.labelKeyLength} characters of [A-Za-z0-9._/-]`);
    }
    if (val.length > LIMITS.labelValueLength) throw new InvalidArgumentError(`${field}[${k}]`, `value longer than ${LIMITS.labelValueLength} characters`);
    if (/[\u0000-\u001f\u007f]/.test(val)) throw new InvalidArgumentError(`${field}[${k}]`, 'value has control characters');
  }
  // fromEntries defines own properties, so even a key "__proto__" is kept as a label.
  return Object.fromEntries(entries);
}

export function groupList(field: string, v: number[]): number[] {
  if (v.length > LIMITS.groupsPerVm) throw new InvalidArgumentError(field, `${v.length} groups; at most ${LIMITS.groupsPerVm}`);
  const seen = new Set<number>();
  for (const g of v) {
    if (seen.has(g)) throw new InvalidArgumentError(field, `group ${g} is listed twice`);
    seen.add(g);
  }
  return [...seen];
}

export function states(field: string, v: readonly (string | number)[]): VmState[] {
  return v.map((s) => {
    const name = typeof s === 'string' ? stateNames.get(s) : undefined;
    if (!name) throw new InvalidArgumentError(field, `unknown state ${JSON.stringify(s)}`);
    return name;
  });
}

export function filter(req: { labels: Record<string, string>; states: readonly (string | number)[] }): VmFilter {
  return { labels: labels('labels', req.labels), states: states('states', req.states) };
}

/** A page size as AIP-158 has it: 0 is the default, more than the maximum is the maximum, negative is refused. */
export function pageSize(field: string, v: number): number {
  if (!Number.isInteger(v) || v < 0) {
    throw new InvalidArgumentError(field, `${v} is ${Number.isInteger(v) ? 'negative' : 'not an integer'}; give 1-${LIMITS.maxPageSize} (more is taken as ${LIMITS.maxPageSize}), or 0 for ${LIMITS.defaultPageSize}`);
  }
  if (v === 0) return LIMITS.defaultPageSize;
  return Math.min(v, LIMITS.maxPageSize);
}

export function listVms(req: ListVmsRequest__Output): { filter: VmFilter; page: PageRequest } {
  const f = filter(req);
  const size = pageSize('page_size', req.page_size);
  return { filter: f, page: { size, afterSeq: decodePageToken('page_token', req.page_token, f) } };
}

export function createVm(req: CreateVmRequest__Output): CreateVmSpec {
  const name = vmName('name', req.name);
  if (req._vmm_uid !== 'vmm_uid' || req.vmm_uid === undefined) {
    throw new InvalidArgumentError('vmm_uid', 'required: the uid the VMM will run as');
  }
  if (req.vmm_uid > MAX_UID) throw new InvalidArgumentError('vmm_uid', `${req.vmm_uid} is not a valid uid`);
  const groups = groupList('groups', req.groups);
  if (groups.length && !req.vfio_device) {
    throw new InvalidArgumentError('vfio_device', 'groups need the KVM-VFIO device: set vfio_device');
  }
  const memlockText = req.memlock_bytes || '0';
  if (!/^\d{1,20}$/.test(memlockText)) throw new InvalidArgumentError('memlock_bytes', 'not a non-negative integer');
  const memlock = BigInt(memlockText);
  const ram = HOST_RAM;
  if (memlock > ram) throw new InvalidArgumentError('memlock_bytes', `${memlock} is more than the host's memory (${ram} bytes)`);
  // Absent (a client built before the field) is UNSPECIFIED; a number the decoder has no name for is refused.
  const handoffName = (req as { vfio_handoff?: unknown }).vfio_handoff ?? 'VFIO_HANDOFF_UNSPECIFIED';
  if (handoffName !== 'VFIO_HANDOFF_CDEV' && handoffName !== 'VFIO_HANDOFF_GROUP' && handoffName !== 'VFIO_HANDOFF_UNSPECIFIED') {
    throw new InvalidArgumentError('vfio_handoff', `${JSON.stringify(handoffName)} is not VFIO_HANDOFF_GROUP or VFIO_HANDOFF_CDEV`);
  }
  const handoff = handoffName === 'VFIO_HANDOFF_CDEV' ? 'cdev' : handoffName === 'VFIO_HANDOFF_GROUP' ? 'group' : undefined;
  const requestId = req.request_id;
  if (requestId && (requestId.length > LIMITS.requestIdLength || !REQUEST_ID.test(requestId))) {
    throw new InvalidArgumentError('request_id', `at most ${LIMITS.requestIdLength} characters of [A-Za-z0-9._:-]`);
  }
  return {
    name,
    labels: labels('labels', req.labels),
    vmmUid: req.vmm_uid,
    vfioDevice: req.vfio_device,
    groups,
    memlockBytes: Number(memlock),
    requestId,
    ...(handoff ? { handoff } : {}),
  };
}
