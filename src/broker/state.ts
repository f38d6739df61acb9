/**
 * The state: what the daemon knows that the kernel does not keep for it —
 * VM records, who holds which group, which VMM sessions are live — so a
 * restarted daemon (with its fds back from systemd's fd store) carries on.
 *
 * Two kinds of file in the state dir:
 *   state.json          a snapshot: {version: 2, journal: G, revision, vms, claims, sessions}
 *   state.journal.<G>   what changed since, one JSON line per changed entry:
 *                       {"key":"vm/<id>","value":<record or null>}; the last line of
 *                       each write also carries "revision" and "commit":true
 * Entries: vm/<id> (a VmRecord), claim/<group> (a ClaimState), session/<vmId>
 * (a SessionState); null is a deletion.
 *
 * Why a journal: rewriting every record after each change blocked the event
 * loop 15–40 ms per write at 10,000 records (bench/RESULTS.md, hot spot 3).
 * A change now costs a line for the entry it touched. Writes are batched: the
 * entries changed since the last write go out in one append, each with its
 * value at that moment, so a burst of changes to one VM is one line.
 *
 * Restore reads the snapshot, then each journal of generation ≥ G in order,
 * and applies only committed writes: a crash mid-write loses that write alone.
 *
 * Compaction, once the journal passes max(1 MiB, 2 × the snapshot):
 *   1. state.journal.<G+1> is created and takes the writes from then on;
 *   2. a snapshot of what the older journals hold (the last line written per
 *      entry, kept in memory), marked journal G+1, is written to
 *      state.json.tmp in slices, fsynced and renamed over state.json;
 *   3. the journals older than G+1 are deleted.
 * A crash before 2 leaves the old snapshot and both journals, which replay to
 * the same state; after 2 the older journals are skipped (deleted at the next
 * start). Generations only grow, so no file that may still count is reused.
 */
import { constants } from 'node:fs';
import { type FileHandle, mkdir, open, readFile, readdir, rename, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import type { VmRecord } from './vms';

export const STATE_VERSION = 2;

const SNAPSHOT = 'state.json';
const JOURNAL_PREFIX = 'state.journal.';

export interface SessionState {
  vmId: string;
  pid: number;
  uid: number;
  gid: number;
  passive: boolean;
}

export interface ClaimState {
  group: number;
  vmId: string;
  vmName: string;
  /**
   * claimed: the daemon holds the file (in the fd store); vmm: handed to
   * the VM's VMM, no fd kept; stray: a process holds it after its VM let it
   * go. Absent in entries written before holds were recorded (see the
   * daemon's restore).
   */
  holding?: 'claimed' | 'vmm' | 'stray';
  /** cdev: handed out as device cdevs (the daemon keeps no group fd, even while claimed). Absent: group. */
  mode?: 'group' | 'cdev';
  holders?: { pid: number; uid: number; comm: string }[];
  since?: string;
}

export interface DaemonState {
  version: number;
  writtenAt: string;
  /** The highest revision handed out, so revisions keep growing across restarts. */
  revision: number;
  vms: VmRecord[];
  claims: ClaimState[];
  sessions: SessionState[];
}

/** Where the state file reads the current value of an entry when it writes it; undefined: gone. */
export interface StateSource {
  revision(): number;
  vm(id: string): VmRecord | undefined;
  claim(group: number): ClaimState | undefined;
  session(vmId: string): SessionState | undefined;
  /** Every entry there is now, for a snapshot of everything. */
  ids(): { vms: Iterable<string>; claims: Iterable<number>; sessions: Iterable<string> };
}

export interface StateEvents {
  /** A write failed; a whole snapshot is written again a second later. */
  onError(e: Error): void;
  /** Something read was left out (a write cut short by a crash). */
  onWarning(event: Record<string, unknown>, msg: string): void;
}

export interface StateFileOptions {
  /** The shortest time between two journal writes: the changes in between share one write. */
  minIntervalMs?: number;
  /** The journal is compacted once it passes max(this, 2 × the snapshot). */
  compactFloorBytes?: number;
  /** Entries serialised, or written to the snapshot, per turn of the event loop. */
  sliceEntries?: number;
}

/** A snapshot's entries as JSON texts, taken from what the journals hold. */
interface SnapshotParts {
  revision: number;
  vms: string[];
  claims: string[];
  sessions: string[];
}

interface JournalEntry {
  key: string;
  value: unknown;
  revision?: number;
  commit?: boolean;
}

const journalName = (generation: number) => `${JOURNAL_PREFIX}${generation}`;

function journalGeneration(name: string): number | undefined {
  const m = /^state\.journal\.(\d+)$/.exec(name);
  return m ? Number(m[1]) : undefined;
}

async function journalsIn(dir: string): Promise<number[]> {
  let names: string[];
  try {
    names = await readdir(dir);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw e;
  }
  const gens: number[] = [];
  for (const n of names) {
    const g = journalGeneration(n);
    if (g !== undefined) gens.push(g);
  }
  return gens.sort((a, b) => a - b);
}

async function writeAll(fh: FileHandle, buf: Buffer): Promise<void> {
  for (let off = 0; off < buf.length; ) off += (await fh.write(buf, off, buf.length - off)).bytesWritten;
}

const nextTurn = () => new Promise<void>((r) => setImmediate(r));

/** The entries of a restore, by key, as the snapshot and the journals leave them. */
class Replay {
  readonly vms = new Map<string, VmRecord>();
  readonly claims = new Map<number, ClaimState>();
  readonly sessions = new Map<string, SessionState>();
  revision = 0;

  apply(e: JournalEntry, where: string): void {
    const slash = e.key.indexOf('/');
    const kind = e.key.slice(0, slash);
    const id = e.key.slice(slash + 1);
    if (slash < 1 || !id || (e.value !== null && typeof e.value !== 'object')) throw new Error(`${where}: not a state entry`);
    if (kind === 'vm') {
      if (e.value === null) this.vms.delete(id);
      else this.vms.set(id, e.value as VmRecord);
    } else if (kind === 'claim') {
      const group = Number(id);
      if (!Number.isInteger(group)) throw new Error(`${where}: bad group in ${e.key}`);
      if (e.value === null) this.claims.delete(group);
      else this.claims.set(group, e.value as ClaimState);
    } else if (kind === 'session') {
      if (e.value === null) this.sessions.delete(id);
      else this.sessions.set(id, e.value as SessionState);
    } else {
      throw new Error(`${where}: unknown entry ${e.key}`);
    }
  }

  /**
   * Applies the committed writes of one journal. An unreadable last line, or
   * lines after the last commit, are a write a crash cut short: left out, with
   * a warning. An unreadable line before the end is damage: it throws.
   */
  journal(text: string, path: string, warn: StateEvents['onWarning']): void {
    const lines = text.split('\n');
    let pending: JournalEntry[] = [];
    let torn = false;
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      if (!line) continue;
      let e: JournalEntry;
      try {
        e = JSON.parse(line) as JournalEntry;
      } catch {
        // Power loss can leave NULs after the last write as well.
        if (lines.slice(i + 1).every((l) => /^[\s\0]*$/.test(l))) {
          torn = true;
          break;
        }
        throw new Error(`${path}: line ${i + 1} is not JSON`);
      }
      if (typeof e !== 'object' || e === null || typeof e.key !== 'string' || !('value' in e)) throw new Error(`${path}: line ${i + 1} is not a state entry`);
      pending.push(e);
      if (e.commit === true) {
        for (const p of pending) this.apply(p, `${path}: line ${i + 1}`);
        if (typeof e.revision === 'number') this.revision = Math.max(this.revision, e.revision);
        pending = [];
      }
    }
    if (torn || pending.length) {
      warn({ event: 'state-journal-torn', path, linesIgnored: pending.length + (torn ? 1 : 0) }, 'the last write to the state journal was cut short (a crash mid-write); leaving it out');
    }
  }

  state(writtenAt: string): DaemonState {
    return {
      version: STATE_VERSION,
      writtenAt,
      revision: this.revision,
      vms: [...this.vms.values()],
      claims: [...this.claims.values()].sort((a, b) => a.group - b.group),
      sessions: [...this.sessions.values()],
    };
  }
}

/**
 * Reads the state a previous run left in `dir`: the snapshot, then its
 * journals. Undefined when there is none; throws on files it cannot
 * understand. Reads a version-1 state.json (a whole state, no journal) too.
 */
export async function readState(dir: string, warn: StateEvents['onWarning'] = () => {}): Promise<DaemonState | undefined> {
  const path = join(dir, SNAPSHOT);
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw e;
  }
  const s = JSON.parse(text) as DaemonState & { journal?: number };
  const wellFormed = Array.isArray(s.vms) && Array.isArray(s.claims) && Array.isArray(s.sessions) && typeof s.revision === 'number';
  if (!wellFormed || !(s.version === 1 || (s.version === 2 && Number.isInteger(s.journal)))) {
    throw new Error(`${path}: not a version 1 or ${STATE_VERSION} state file`);
  }
  const r = new Replay();
  r.revision = s.revision;
  for (const vm of s.vms) r.vms.set(vm.id, vm);
  for (const c of s.claims) r.claims.set(c.group, c);
  for (const x of s.sessions) r.sessions.set(x.vmId, x);
  // A version-1 file is a whole state; a journal beside it can only be a stale one.
  if (s.version === 2) {
    for (const g of await journalsIn(dir)) {
      if (g < s.journal!) continue;
      const jpath = join(dir, journalName(g));
      r.journal(await readFile(jpath, 'utf8'), jpath, warn);
    }
  }
  return r.state(s.writtenAt);
}

export class StateFile {
  readonly dir: string;
  /** The snapshot (state.json). */
  readonly path: string;
  readonly #source: StateSource;
  readonly #events: StateEvents;
  readonly #minIntervalMs: number;
  readonly #compactFloorBytes: number;
  readonly #slice: number;
  #dirty = new Set<string>();
  /** Each entry's value as the journals hold it (its last line written): snapshots are made of these, without serialising a record again. */
  readonly #written = new Map<string, string>();
  #journal: FileHandle | undefined;
  #generation = 0;
  #journalBytes = 0;
  #snapshotBytes = 0;
  /** The journal cannot be trusted to continue the snapshot (not opened yet, or a write failed): write everything again. */
  #needSnapshot = true;
  #opened = false;
  #closed = false;
  #writing: Promise<void> | undefined;
  #compacting: Promise<void> | undefined;
  #lastWrite = 0;

  constructor(dir: string, source: StateSource, events: StateEvents, opts: StateFileOptions = {}) {
    this.dir = dir;
    this.path = join(dir, SNAPSHOT);
    this.#source = source;
    this.#events = events;
    this.#minIntervalMs = opts.minIntervalMs ?? 50;
    this.#compactFloorBytes = opts.compactFloorBytes ?? 1 << 20;
    this.#slice = opts.sliceEntries ?? 500;
  }

  /** The journal written now. */
  get journalPath(): string {
    return join(this.dir, journalName(this.#generation));
  }

  get journalBytes(): number {
    return this.#journalBytes;
  }

  get snapshotBytes(): number {
    return this.#snapshotBytes;
  }

  /** Reads the state a previous run left; undefined when there is none. Throws on files it cannot understand. */
  read(): Promise<DaemonState | undefined> {
    return readState(this.dir, (event, msg) => this.#events.onWarning(event, msg));
  }

  /**
   * Moves the state of a previous run out of the way (state.json.prev,
   * state.journal.<G>.prev), replacing what an earlier start set aside.
   * Returns the files moved.
   */
  async setAside(): Promise<string[]> {
    let names: string[];
    try {
      names = await readdir(this.dir);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return [];
      throw e;
    }
    for (const n of names) if (n.endsWith('.prev')) await unlink(join(this.dir, n)).catch(() => undefined);
    const moved: string[] = [];
    for (const n of names) {
      if (n !== SNAPSHOT && journalGeneration(n) === undefined) continue;
      await rename(join(this.dir, n), join(this.dir, `${n}.prev`));
      moved.push(`${n}.prev`);
    }
    return moved;
  }

  /**
   * Starts writing, once the previous state is restored (or set aside):
   * writes a snapshot of everything and starts a new journal. Changes told
   * before are in it.
   */
  async open(): Promise<void> {
    await mkdir(this.dir, { recursive: true, mode: 0o700 });
    // Generations only grow: a journal left by an earlier run is never reopened or truncated.
    for (const g of await journalsIn(this.dir)) this.#generation = Math.max(this.#generation, g);
    this.#opened = true;
    this.#kick();
    await this.flush();
  }

  vmChanged(id: string): void {
    this.#changed(`vm/${id}`);
  }

  claimChanged(group: number): void {
    this.#changed(`claim/${group}`);
  }

  sessionChanged(vmId: string): void {
    this.#changed(`session/${vmId}`);
  }

  /** Resolves once everything asked so far is on disk (and a compaction under way is done). */
  async flush(): Promise<void> {
    while (this.#writing || this.#compacting) {
      await this.#writing;
      await this.#compacting;
    }
  }

  /** Writes what is pending and closes the journal; later changes are not written (shutdown). */
  async close(): Promise<void> {
    await this.flush();
    this.#closed = true;
    await this.#journal?.close().catch(() => undefined);
    this.#journal = undefined;
  }

  #changed(key: string): void {
    if (this.#closed) return;
    this.#dirty.add(key);
    this.#kick();
  }

  #kick(): void {
    if (this.#opened && !this.#closed) this.#writing ??= this.#drain();
  }

  async #drain(): Promise<void> {
    try {
      while (this.#needSnapshot || this.#dirty.size) {
        if (this.#needSnapshot) {
          await this.#snapshotEverything();
          continue;
        }
        // Changes within the interval share one write (and a VM changed twice in it, one line).
        const wait = this.#lastWrite + this.#minIntervalMs - Date.now();
        await new Promise((r) => (wait > 0 ? setTimeout(r, wait) : setImmediate(r)));
        await this.#append();
        if (!this.#compacting && this.#journalBytes > Math.max(this.#compactFloorBytes, 2 * this.#snapshotBytes)) await this.#compact(false);
      }
    } catch (e) {
      // The journal may end in a partial write now: nothing more is appended to it. Tried again
      // in a second, not only at the next change, so a quiet daemon's state catches up too.
      this.#needSnapshot = true;
      this.#events.onError(e as Error);
      setTimeout(() => this.#kick(), 1000).unref();
    } finally {
      this.#writing = undefined;
    }
  }

  #valueOf(key: string): unknown {
    const slash = key.indexOf('/');
    const id = key.slice(slash + 1);
    switch (key.slice(0, slash)) {
      case 'vm':
        return this.#source.vm(id);
      case 'claim':
        return this.#source.claim(Number(id));
      case 'session':
        return this.#source.session(id);
      default:
        throw new Error(`unknown state entry ${key}`);
    }
  }

  /** One append: a line per entry changed since the last, with its value now. */
  async #append(): Promise<void> {
    const keys = this.#dirty;
    this.#dirty = new Set();
    const lines: string[] = [];
    for (const key of keys) {
      const value = this.#valueOf(key);
      let json: string;
      if (value === undefined) {
        // Never written (created and gone within the interval), or already deleted: nothing to say.
        if (!this.#written.delete(key)) continue;
        json = 'null';
      } else {
        json = JSON.stringify(value);
        if (this.#written.get(key) === json) continue;
        this.#written.set(key, json);
      }
      lines.push(`{"key":${JSON.stringify(key)},"value":${json}`);
    }
    if (!lines.length) return;
    const last = lines.length - 1;
    lines[last] += `,"revision":${this.#source.revision()},"commit":true`;
    const buf = Buffer.from(`${lines.join('}\n')}}\n`);
    await writeAll(this.#journal!, buf);
    this.#journalBytes += buf.length;
    this.#lastWrite = Date.now();
  }

  /**
   * Serialises every entry anew, a slice per loop turn, then writes the
   * snapshot before anything more is appended. An entry that changes after
   * its slice is told again and goes to the new journal.
   */
  async #snapshotEverything(): Promise<void> {
    this.#needSnapshot = false;
    this.#dirty.clear();
    this.#written.clear();
    const ids = this.#source.ids();
    const keys: string[] = [];
    for (const id of ids.vms) keys.push(`vm/${id}`);
    for (const g of ids.claims) keys.push(`claim/${g}`);
    for (const id of ids.sessions) keys.push(`session/${id}`);
    for (let i = 0; i < keys.length; i++) {
      if (i && i % this.#slice === 0) await nextTurn();
      const value = this.#valueOf(keys[i]);
      if (value !== undefined) this.#written.set(keys[i], JSON.stringify(value));
    }
    await this.#compact(true);
  }

  /**
   * Starts the next journal and writes a snapshot of what the journals hold
   * so far. Called between appends, so #written is exactly that. `wait`:
   * appends wait for the snapshot (the journal before it cannot be trusted).
   */
  async #compact(wait: boolean): Promise<void> {
    while (this.#compacting) await this.#compacting;
    // Counted before the open: a generation whose open failed is not tried again.
    const generation = ++this.#generation;
    const next = await open(join(this.dir, journalName(generation)), constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_APPEND, 0o600);
    const old = this.#journal;
    this.#journal = next;
    const carried = this.#journalBytes;
    this.#journalBytes = 0;
    const parts = this.#snapshotParts();
    await old?.close().catch(() => undefined);
    const written = this.#writeSnapshot(generation, parts).then(async (bytes) => {
      this.#snapshotBytes = bytes;
      for (const g of await journalsIn(this.dir)) if (g < generation) await unlink(join(this.dir, journalName(g))).catch(() => undefined);
    });
    if (wait) {
      await written;
      return;
    }
    this.#compacting = written
      .catch((e: Error) => {
        // The older journals stay and still count; the next append tries again.
        this.#journalBytes += carried;
        this.#events.onError(e);
      })
      .finally(() => (this.#compacting = undefined));
  }

  #snapshotParts(): SnapshotParts {
    const parts: SnapshotParts = { revision: this.#source.revision(), vms: [], claims: [], sessions: [] };
    for (const [key, json] of this.#written) {
      if (key.startsWith('vm/')) parts.vms.push(json);
      else if (key.startsWith('claim/')) parts.claims.push(json);
      else parts.sessions.push(json);
    }
    return parts;
  }

  /** Writes a snapshot to state.json.tmp, a slice of entries per write, and renames it over state.json. Returns its size. */
  async #writeSnapshot(generation: number, parts: SnapshotParts): Promise<number> {
    const tmp = `${this.path}.tmp`;
    const fh = await open(tmp, 'w', 0o600);
    let bytes = 0;
    const put = async (text: string) => {
      const buf = Buffer.from(text);
      await writeAll(fh, buf);
      bytes += buf.length;
    };
    try {
      await put(`{"version":${STATE_VERSION},"writtenAt":"${new Date().toISOString()}","journal":${generation},"revision":${parts.revision},`);
      const lists = [
        ['vms', parts.vms],
        ['claims', parts.claims],
        ['sessions', parts.sessions],
      ] as const;
      for (const [name, list] of lists) {
        await put(`${name === 'vms' ? '' : ','}"${name}":[`);
        for (let i = 0; i < list.length; i += this.#slice) await put(`${i ? ',' : ''}${list.slice(i, i + this.#slice).join(',')}`);
        await put(']');
      }
      await put('}');
      await fh.sync();
    } finally {
      await fh.close();
    }
    await rename(tmp, this.path);
    return bytes;
  }
}
