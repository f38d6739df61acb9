/**
 * VM records and their state machine. The registry only stores and
 * announces; the rules that involve groups and callers live in broker.ts.
 *
 *   PENDING ──VMM attached, VM made, plan applied──▶ RUNNING ──VMM exits──▶ EXITED
 *      └──setup fails (token spent, prlimit, a plan step, the VMM exits or
 *         stops answering before the VM is RUNNING)──▶ FAILED ◀──a request
 *         to a RUNNING VM's VMM goes unanswered past its bound── RUNNING
 */
import { EventEmitter } from 'node:events';
import { randomUUID } from 'node:crypto';

export type VmState = 'PENDING' | 'RUNNING' | 'EXITED' | 'FAILED';

export interface VmRecord {
  readonly id: string;
  /**
   * The record's place in creation order: unique, never reused, growing
   * across restarts (it is the registry revision at creation). ListVms walks
   * records in this order and its page tokens carry the last one seen.
   */
  readonly seq: number;
  readonly name: string;
  readonly labels: Readonly<Record<string, string>>;
  /** The uid that created it. It owns the record only when `principal` is "" (see ownerKey). */
  readonly ownerUid: number;
  readonly vmmUid: number;
  state: VmState;
  vfioDevice: boolean;
  /** Ascending. */
  groups: number[];
  readonly memlockBytes: number;
  readonly requestId: string;
  /**
   * The principal it belongs to: every uid the policy matches to it sees and
   * changes it, and its quotas count it ("root" for uid 0). "" for a record
   * made without one (before principals were recorded, or in unit tests):
   * such a record belongs to its ownerUid.
   */
  readonly principal: string;
  /** What the create request asked, to tell a true retry from a reused request_id. */
  readonly requestFingerprint: string;
  readonly createTime: string;
  updateTime: string;
  failureReason: string;
  revision: number;
  /** The attached VMM's pid; 0 before attach. */
  vmmPid: number;
  /** Attached by `kvmvfioctl attach` (a VMM that does not take requests). */
  passive: boolean;
  /**
   * Groups this VM's VMM was given that a process still holds although the
   * VM let them go (its VMM exited, say): out of the pool until that process
   * closes them. Ascending by group.
   */
  strayGroups: StrayGroup[];
  /** How its groups reach its VMM (see VfioHandoff). */
  readonly handoff: VfioHandoff;
}

/** group: the group files (/dev/vfio/N); cdev: a fresh open of each device's cdev and an iommufd. */
export type VfioHandoff = 'group' | 'cdev';

/** A group left held by a process after its VM let it go; `holders` as /proc shows them. */
export interface StrayGroup {
  group: number;
  holders: { pid: number; uid: number; comm: string }[];
  /** RFC 3339. */
  since: string;
}

export type VmEventType = 'CREATED' | 'UPDATED' | 'DELETED';

export interface VmChange {
  type: VmEventType;
  /** A frozen copy taken at the change. */
  vm: Readonly<VmRecord>;
}

const allowed: Record<VmState, VmState[]> = {
  // A VMM that exits before its VM is RUNNING fails it (no PENDING -> EXITED).
  PENDING: ['RUNNING', 'FAILED'],
  RUNNING: ['EXITED', 'FAILED'],
  EXITED: [],
  FAILED: [],
};

export interface NewVm {
  name: string;
  labels: Record<string, string>;
  ownerUid: number;
  vmmUid: number;
  vfioDevice: boolean;
  groups: number[];
  memlockBytes: number;
  requestId: string;
  requestFingerprint: string;
  /** The principal it belongs to (see VmRecord.principal). */
  principal: string;
  /** Default group. */
  handoff?: VfioHandoff;
}

const NONE: ReadonlySet<string> = new Set();

/**
 * Who owns a record, as one key: its principal's name, or "uid:N" for a
 * record without a principal. Principal names cannot hold ":", so the two
 * never meet. Name uniqueness, request_id retries and the per-owner listing
 * index are all per this key.
 */
export function ownerKey(principal: string, uid: number): string {
  return principal || `uid:${uid}`;
}

const ownerKeyOf = (vm: Pick<VmRecord, 'principal' | 'ownerUid'>) => ownerKey(vm.principal, vm.ownerUid);

/** Lists a walk may keep to (see VmRegistry.inOrderAfter). */
export interface CandidateHint {
  /** The owner keys (see ownerKey) whose records are wanted. */
  owners?: readonly string[];
  labels?: Readonly<Record<string, string>>;
}

/** The index of the first record of `list` (ascending by seq) whose seq is greater than `seq`. */
function firstAfter(list: readonly VmRecord[], seq: number): number {
  let lo = 0;
  let hi = list.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (list[mid].seq <= seq) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

function appendTo<K>(lists: Map<K, VmRecord[]>, key: K, vm: VmRecord): void {
  const list = lists.get(key);
  if (list) list.push(vm);
  else lists.set(key, [vm]);
}

function removeFrom(list: VmRecord[] | undefined, vm: VmRecord): void {
  if (!list) return;
  const at = firstAfter(list, vm.seq - 1);
  if (list[at] === vm) list.splice(at, 1);
}

export class VmRegistry {
  readonly #byId = new Map<string, VmRecord>();
  /**
   * Every record, ascending by seq, and the same for the records of each
   * owner and of each label pair (labels never change): listings start after
   * a given record without looking at those before it, and look only at the
   * narrowest list their filter allows. Inserts append (a new seq is always
   * the largest); a removal is a binary search and a splice per list, a
   * memmove of a few microseconds at 10,000 records.
   */
  readonly #ordered: VmRecord[] = [];
  readonly #byOwner = new Map<string, VmRecord[]>();
  /** label key → label value → records. */
  readonly #byLabel = new Map<string, Map<string, VmRecord[]>>();
  /** Indexes for the per-create lookups, so a create costs the same at 10,000 records as at 10. */
  readonly #byName = new Map<string, VmRecord>();
  readonly #byRequestId = new Map<string, VmRecord>();
  /** VM ids by policy principal, for quotas. */
  readonly #byPrincipal = new Map<string, Set<string>>();
  readonly #events = new EventEmitter();
  #revision = 0;

  constructor() {
    // Each watcher is one listener; the cap is set by the server's limits.
    this.#events.setMaxListeners(0);
  }

  get size(): number {
    return this.#byId.size;
  }

  get(id: string): VmRecord | undefined {
    return this.#byId.get(id);
  }

  all(): IterableIterator<VmRecord> {
    return this.#byId.values();
  }

  /**
   * Records with a seq greater than `afterSeq`, in creation order (from 0:
   * from the first). With `only`, the walk may skip records that are not the
   * owner's or lack one of the label pairs (it walks the shortest of those
   * lists); it may also return such records, so the caller still checks each
   * one. Iterate it synchronously: the registry must not change meanwhile.
   */
  *inOrderAfter(afterSeq: number, only: CandidateHint = {}): Generator<VmRecord, void, undefined> {
    const lists = this.#narrowest(only);
    if (lists.length === 1) {
      const list = lists[0];
      for (let i = firstAfter(list, afterSeq); i < list.length; i++) yield list[i];
      return;
    }
    // Several owners' lists (a principal's and its uid's older records): merged by seq.
    const at = lists.map((l) => firstAfter(l, afterSeq));
    for (;;) {
      let next = -1;
      for (let j = 0; j < lists.length; j++) if (at[j] < lists[j].length && (next < 0 || lists[j][at[j]].seq < lists[next][at[next]].seq)) next = j;
      if (next < 0) return;
      yield lists[next][at[next]++];
    }
  }

  /** The shortest choice of lists that together hold every record the hint allows. */
  #narrowest(only: CandidateHint): readonly (readonly VmRecord[])[] {
    let best: readonly (readonly VmRecord[])[] = [this.#ordered];
    let size = this.#ordered.length;
    if (only.owners) {
      best = only.owners.map((k) => this.#byOwner.get(k) ?? []);
      size = best.reduce((n, l) => n + l.length, 0);
    }
    if (only.labels) {
      for (const k of Object.keys(only.labels)) {
        const list = this.#byLabel.get(k)?.get(only.labels[k]) ?? [];
        if (list.length < size) {
          best = [list];
          size = list.length;
        }
      }
    }
    return best;
  }

  /** Adds a record to the ordered lists; it must have the largest seq so far, or they are sorted after (restore). */
  #addOrdered(vm: VmRecord): void {
    this.#ordered.push(vm);
    appendTo(this.#byOwner, ownerKeyOf(vm), vm);
    for (const k of Object.keys(vm.labels)) {
      let values = this.#byLabel.get(k);
      if (!values) this.#byLabel.set(k, (values = new Map()));
      appendTo(values, vm.labels[k], vm);
    }
  }

  #removeOrdered(vm: VmRecord): void {
    removeFrom(this.#ordered, vm);
    const owner = ownerKeyOf(vm);
    removeFrom(this.#byOwner.get(owner), vm);
    if (!this.#byOwner.get(owner)?.length) this.#byOwner.delete(owner);
    for (const k of Object.keys(vm.labels)) {
      const values = this.#byLabel.get(k);
      const list = values?.get(vm.labels[k]);
      removeFrom(list, vm);
      if (values && !list?.length) {
        values.delete(vm.labels[k]);
        if (!values.size) this.#byLabel.delete(k);
      }
    }
  }

  /** The record of that name among the owner's (`owner` as ownerKey gives it). */
  findByName(owner: string, name: string): VmRecord | undefined {
    return this.#byName.get(`${owner}/${name}`);
  }

  findByRequestId(owner: string, requestId: string): VmRecord | undefined {
    if (!requestId) return undefined;
    return this.#byRequestId.get(`${owner}/${requestId}`);
  }

  /** The ids of the VMs a policy principal created (its quotas count them); empty for an unknown one. */
  idsOf(principal: string): ReadonlySet<string> {
    return this.#byPrincipal.get(principal) ?? NONE;
  }

  #index(vm: VmRecord): void {
    const owner = ownerKeyOf(vm);
    this.#byName.set(`${owner}/${vm.name}`, vm);
    if (vm.requestId) this.#byRequestId.set(`${owner}/${vm.requestId}`, vm);
    let ids = this.#byPrincipal.get(vm.principal);
    if (!ids) this.#byPrincipal.set(vm.principal, (ids = new Set()));
    ids.add(vm.id);
  }

  /** A fresh id for a record about to be inserted (its groups are claimed under it first). */
  newId(): string {
    return randomUUID();
  }

  insert(id: string, spec: NewVm): VmRecord {
    const now = new Date().toISOString();
    const revision = ++this.#revision;
    const vm: VmRecord = {
      id,
      seq: revision,
      ...spec,
      groups: [...spec.groups].sort((a, b) => a - b),
      state: 'PENDING',
      createTime: now,
      updateTime: now,
      failureReason: '',
      revision,
      vmmPid: 0,
      passive: false,
      strayGroups: [],
      handoff: spec.handoff ?? 'group',
    };
    this.#byId.set(id, vm);
    this.#addOrdered(vm);
    this.#index(vm);
    this.#emit('CREATED', vm);
    return vm;
  }

  /** Applies `change` to the record, bumps its revision and announces it. */
  update(vm: VmRecord, change: (vm: VmRecord) => void): VmRecord {
    change(vm);
    vm.groups.sort((a, b) => a - b);
    vm.updateTime = new Date().toISOString();
    vm.revision = ++this.#revision;
    this.#emit('UPDATED', vm);
    return vm;
  }

  /** Moves a VM along the state machine; a move it does not allow is a bug, so it throws. */
  transition(vm: VmRecord, to: VmState, reason = ''): VmRecord {
    if (!allowed[vm.state].includes(to)) throw new Error(`vm ${vm.id}: no transition ${vm.state} -> ${to}`);
    return this.update(vm, (v) => {
      v.state = to;
      if (to === 'FAILED') v.failureReason = reason;
    });
  }

  /**
   * Puts back the records of a previous run (no events: nothing changed), and
   * its revision counter. A state file written before records had a seq gets
   * one in the order ListVms used then (creation time, then revision): 1, 2,
   * ..., below every revision to come, since each creation took a revision.
   */
  restore(records: VmRecord[], revision: number): void {
    const hasSeq = (r: VmRecord) => Number.isSafeInteger(r.seq) && r.seq > 0;
    let inOrder = records;
    let legacySeq: Map<VmRecord, number> | undefined;
    if (!records.every(hasSeq)) {
      const legacy = records.filter((r) => !hasSeq(r)).sort((a, b) => a.createTime.localeCompare(b.createTime) || a.revision - b.revision);
      legacySeq = new Map(legacy.map((r, i) => [r, i + 1]));
    }
    const seqOf = (r: VmRecord) => legacySeq?.get(r) ?? r.seq;
    // The state file lists records in insertion order, which is seq order: sort only when it is not.
    for (let i = 1; i < records.length; i++) {
      if (seqOf(records[i - 1]) > seqOf(records[i])) {
        inOrder = [...records].sort((a, b) => seqOf(a) - seqOf(b));
        break;
      }
    }
    let top = Math.max(this.#revision, revision);
    for (const r of inOrder) {
      // A state file from before principals were recorded has none: the record belongs to its uid.
      const vm: VmRecord = { ...r, seq: seqOf(r), groups: [...r.groups], labels: { ...r.labels }, principal: r.principal ?? '', strayGroups: [...(r.strayGroups ?? [])], handoff: r.handoff ?? 'group' };
      this.#byId.set(vm.id, vm);
      this.#addOrdered(vm);
      this.#index(vm);
      if (vm.revision > top) top = vm.revision;
      if (vm.seq > top) top = vm.seq;
    }
    this.#revision = top;
  }

  get revision(): number {
    return this.#revision;
  }

  remove(vm: VmRecord): void {
    if (!this.#byId.delete(vm.id)) return;
    this.#removeOrdered(vm);
    const owner = ownerKeyOf(vm);
    this.#byName.delete(`${owner}/${vm.name}`);
    if (vm.requestId) this.#byRequestId.delete(`${owner}/${vm.requestId}`);
    const ids = this.#byPrincipal.get(vm.principal);
    ids?.delete(vm.id);
    if (ids?.size === 0) this.#byPrincipal.delete(vm.principal);
    vm.revision = ++this.#revision;
    this.#emit('DELETED', vm);
  }

  subscribe(listener: (change: VmChange) => void): () => void {
    this.#events.on('change', listener);
    return () => this.#events.off('change', listener);
  }

  #emit(type: VmEventType, vm: VmRecord): void {
    const copy = Object.freeze({ ...vm, groups: [...vm.groups], labels: { ...vm.labels } });
    this.#events.emit('change', { type, vm: copy } satisfies VmChange);
  }
}
