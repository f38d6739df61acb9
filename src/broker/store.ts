/**
 * The state store: what the daemon knows that the kernel does not keep for
 * it — VM records, who holds which group, which VMM sessions are live — in
 * one LMDB file (the `lmdb` package), `<state dir>/state.mdb`, so a restarted
 * daemon (with its fds back from systemd's fd store) carries on.
 *
 * Acknowledged means durable. A change is told here (vmChanged, ...) while
 * the call that makes it runs; the call answers only once durable() resolves:
 * the entries it changed are committed in one LMDB transaction and
 * fdatasync'd. Group commit: one transaction at a time; the changes told
 * while it is on its way to disk go together in the next one, so under load
 * many calls share one fdatasync. Values are read from the source when their
 * transaction is built (a VM changed five times in between is written once).
 *
 * When a commit fails (ENOSPC, EIO, EROFS...), the store is "failing": the
 * call that waited gets a StateWriteError (UNAVAILABLE, naming the errno), the
 * daemon refuses mutating calls until a commit succeeds again (check()), and
 * the entries are retried with a backoff, in the same file: LMDB writes into
 * its own pages, so a retry leaves no file behind.
 *
 * Entries: "vm/<id>" (a VmRecord), "claim/<group>" (a ClaimState),
 * "session/<vmId>" (a SessionState), "meta" ({schema, revision}). Each value is
 * its JSON with a checksum (storecodec.ts). The store is read back in a child
 * process (storedump.ts): a damaged value costs that entry, a damaged page
 * costs the entries behind it, never the daemon.
 */
import { spawn } from 'node:child_process';
import { promises as fsp } from 'node:fs';
import { constants as osConstants } from 'node:os';
import { join } from 'node:path';
import { type RootDatabase, open as openLmdb } from 'lmdb';
import { UnavailableError } from './errors';
import { type ClaimState, type DaemonState, type SessionState, STATE_VERSION, readState } from './state';
import { encodeEntry } from './storecodec';
import type { VmRecord } from './vms';

export const STORE_FILE = 'state.mdb';
const LOCK_FILE = 'state.mdb-lock';
/** The store's layout; a store written by a later layout is not opened (a downgrade would lose it). */
export const STORE_SCHEMA = 3;
const META = 'meta';

/** Where the store reads the current value of an entry when it writes it; undefined: gone. */
export interface StateSource {
  revision(): number;
  vm(id: string): VmRecord | undefined;
  claim(group: number): ClaimState | undefined;
  session(vmId: string): SessionState | undefined;
  /** Every entry there is now, for the first write after a start. */
  ids(): { vms: Iterable<string>; claims: Iterable<number>; sessions: Iterable<string> };
}

/** Opens an LMDB file the way the store does (the benchmark's floor opens its own the same way). */
export function openStoreDb(path: string): RootDatabase<Buffer, string> {
  return openLmdb<Buffer, string>({
    path,
    noSubdir: true,
    encoding: 'binary',
    // A write's promise settles once its transaction is committed and fdatasync'd.
    overlappingSync: false,
    // Transactions are ours (#commit); lmdb-js's own batching leaves a promise unhandled when a commit fails.
    eventTurnBatching: false,
    mapSize: 1 << 30,
  });
}

/**
 * One LMDB transaction of `puts` (a value, or undefined to remove the key),
 * settled once it is committed and fdatasync'd. lmdb-js's batch: its writer
 * thread applies the queued writes and commits without calling back into
 * the event loop, where a transaction callback waits for a busy loop (a
 * commit took 0.86 ms p50 in the daemon under launch load that way, 0.71 ms
 * as a batch; bench/RESULTS.md).
 */
export function commitPuts(db: RootDatabase<Buffer, string>, puts: readonly (readonly [string, Buffer | undefined])[]): Promise<unknown> {
  return db.batch(() => {
    for (const [key, value] of puts) {
      if (value) void db.put(key, value);
      else void db.remove(key);
    }
  });
}

/** The store was written by a later kvmvfiod: not opened, so a downgrade loses nothing. */
export class StoreTooNewError extends Error {}

/** A change the state could not save: the errno (ENOSPC, EIO, EROFS...) and what failed. */
export class StateWriteError extends UnavailableError {
  readonly errno: string;
  constructor(errno: string, detail: string) {
    super(`the state cannot be written (${errno}: ${detail}); no change is accepted until it can`);
    this.errno = errno;
  }
}

export interface StoreEvents {
  /** A commit failed; `first`: the store was healthy until now. */
  onWriteFailed(e: StateWriteError, first: boolean): void;
  /** A commit succeeded after failures. */
  onRecovered(info: { failedForMs: number; attempts: number }): void;
  onWarning(event: Record<string, unknown>, msg: string): void;
  /** Every commit's time (the transaction written and fdatasync'd), and its errno when it failed. */
  onCommit?(seconds: number, errno?: string): void;
}

export interface StoreOptions {
  /** The first retry after a failed commit; doubled up to maxRetryMs. */
  retryMs?: number;
  maxRetryMs?: number;
}

/** What a start found in the state dir. */
export interface LoadedState {
  state?: DaemonState;
  /** Where it came from: the store, the journal of version 2 (migrated at open), or nothing. */
  from: 'store' | 'version-2' | 'none';
  /** The store could not be read whole: where its file was set aside, and what was lost. */
  damage?: { setAside: string; badEntries: { key: string; why: string }[]; unreadable: boolean; recovered: number };
  /** Files of version 2 to rename once the store holds their state. */
  legacyFiles: string[];
}

interface Deferred {
  promise: Promise<void>;
  resolve(): void;
  reject(e: Error): void;
}

function deferred(): Deferred {
  let resolve!: () => void;
  let reject!: (e: Error) => void;
  const promise = new Promise<void>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  // A commit nobody waited for may fail: that is told through onWriteFailed, not as an unhandled rejection.
  promise.catch(() => undefined);
  return { promise, resolve, reject };
}

const errnoNames = new Map(Object.entries(osConstants.errno).map(([name, n]) => [n, name]));

/**
 * The errno of a failed LMDB commit. LMDB reports a short write as EIO; on a
 * full filesystem that is ENOSPC, so a short write on a filesystem with no
 * room left is named so.
 */
async function errnoOf(e: unknown, dir: string): Promise<{ errno: string; detail: string }> {
  let inner: unknown = e;
  const commitError = (e as { commitError?: Promise<unknown> }).commitError;
  if (commitError) {
    try {
      await commitError;
    } catch (c) {
      inner = c;
    }
  }
  const code = (inner as { code?: unknown }).code;
  let errno = typeof code === 'number' ? (errnoNames.get(code) ?? `errno ${code}`) : typeof code === 'string' ? code : 'EIO';
  const detail = (inner as Error).message ?? String(inner);
  if (errno === 'EIO') {
    const fs = await fsp.statfs(dir).catch(() => undefined);
    if (fs && fs.bavail * fs.bsize < 64 * 1024) return { errno: 'ENOSPC', detail: `${detail}; the filesystem of ${dir} has ${fs.bavail * fs.bsize} bytes free` };
  }
  return { errno, detail };
}

/**
 * Makes the state dir private to the daemon: created 0700 if missing, and
 * refused when it, or a file of the store, is a symbolic link or belongs to
 * another user (the daemon would otherwise write where a link points).
 */
export async function prepareStateDir(dir: string): Promise<void> {
  await fsp.mkdir(dir, { recursive: true, mode: 0o700 });
  const uid = process.geteuid?.() ?? 0;
  const st = await fsp.lstat(dir);
  if (st.isSymbolicLink() || !st.isDirectory()) throw new Error(`state dir ${dir} is ${st.isSymbolicLink() ? 'a symbolic link' : 'not a directory'}; refusing to use it`);
  if (st.uid !== uid) throw new Error(`state dir ${dir} belongs to uid ${st.uid}, not ${uid}; refusing to use it`);
  if ((st.mode & 0o077) !== 0) await fsp.chmod(dir, 0o700);
  for (const name of [STORE_FILE, LOCK_FILE]) {
    const f = await fsp.lstat(join(dir, name)).catch(() => undefined);
    if (!f) continue;
    if (!f.isFile() || f.uid !== uid || f.nlink !== 1) {
      throw new Error(`${join(dir, name)} is not a plain file of uid ${uid} (${f.isSymbolicLink() ? 'a symbolic link' : f.isFile() ? `uid ${f.uid}, ${f.nlink} links` : 'not a file'}); refusing to use it`);
    }
  }
}

/** Moves a store out of the way (state.mdb.prev, replacing an earlier one). Returns the files moved. */
export async function setAsideStore(dir: string): Promise<string[]> {
  const prev = join(dir, `${STORE_FILE}.prev`);
  await fsp.rename(join(dir, STORE_FILE), prev);
  await fsp.unlink(join(dir, LOCK_FILE)).catch(() => undefined);
  return [prev];
}

/** Moves the files of a version-1 or version-2 state out of the way (NAME.prev). Returns the files moved. */
export async function setAsideLegacy(dir: string): Promise<string[]> {
  const names = await fsp.readdir(dir).catch(() => [] as string[]);
  const moved: string[] = [];
  for (const n of names) {
    if (n !== 'state.json' && !/^state\.journal\.\d+$/.test(n)) continue;
    await fsp.rename(join(dir, n), join(dir, `${n}.prev`));
    moved.push(`${n}.prev`);
  }
  return moved;
}

interface Dump {
  entries: Map<string, unknown>;
  bad: { key: string; why: string }[];
  /** The walk reached the end without an error or a crash. */
  whole: boolean;
  stderr: string;
}

/** Runs storedump.js on `path` and collects what it printed, up to a crash if there is one. */
function dump(path: string, reverse: boolean): Promise<Dump> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [join(__dirname, 'storedump.js'), path, ...(reverse ? ['reverse'] : [])], { stdio: ['ignore', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (b: Buffer) => out.push(b));
    child.stderr.on('data', (b: Buffer) => err.push(b));
    child.on('close', (code, signal) => {
      const d: Dump = { entries: new Map(), bad: [], whole: false, stderr: Buffer.concat(err).toString('utf8').slice(0, 2000) };
      let ended = false;
      let walkedAll = false;
      for (const line of Buffer.concat(out).toString('utf8').split('\n')) {
        if (!line) continue;
        let e: { k?: string; v?: unknown; bad?: string; end?: number; entries?: number };
        try {
          e = JSON.parse(line) as typeof e;
        } catch {
          continue; // a line cut short by a crash
        }
        if (typeof e.end === 'number') {
          ended = true;
          if (e.end !== e.entries) d.stderr = `walked ${e.end} entries; the tree counts ${e.entries}`;
          else walkedAll = true;
        }
        else if (typeof e.k === 'string' && typeof e.bad === 'string') d.bad.push({ key: e.k, why: e.bad });
        else if (typeof e.k === 'string') d.entries.set(e.k, e.v);
      }
      d.whole = ended && walkedAll && code === 0 && !signal;
      if (signal) d.stderr = `${d.stderr}killed by ${signal}`.trim();
      resolve(d);
    });
  });
}

/** A state made of the store's entries; entries that are not well-formed are reported and left out. */
function stateOf(entries: Map<string, unknown>, bad: { key: string; why: string }[]): DaemonState {
  const s: DaemonState = { version: STATE_VERSION, writtenAt: '', revision: 0, vms: [], claims: [], sessions: [] };
  const isObject = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);
  for (const [key, v] of entries) {
    const slash = key.indexOf('/');
    const kind = slash > 0 ? key.slice(0, slash) : key;
    const id = key.slice(slash + 1);
    if (key === META && isObject(v)) {
      if (typeof v.revision === 'number') s.revision = v.revision;
      if (typeof v.writtenAt === 'string') s.writtenAt = v.writtenAt;
    } else if (kind === 'vm' && isObject(v) && v.id === id && typeof v.name === 'string') s.vms.push(v as unknown as VmRecord);
    else if (kind === 'claim' && isObject(v) && v.group === Number(id)) s.claims.push(v as unknown as ClaimState);
    else if (kind === 'session' && isObject(v) && v.vmId === id) s.sessions.push(v as unknown as SessionState);
    else bad.push({ key, why: 'not a state entry' });
  }
  // Keys are in byte order, ids are random: records go back in the order they were made.
  s.vms.sort((a, b) => (a.seq ?? 0) - (b.seq ?? 0));
  return s;
}

/**
 * Reads what a previous run left in `dir`: the store, or else the version-2
 * snapshot and journals (migrated at the store's open). A store that cannot be
 * read whole is set aside (state.mdb.damaged-<time>) and what can be read of
 * it is returned: walked from both ends, each entry checked.
 */
export async function loadState(dir: string, warn: StoreEvents['onWarning']): Promise<LoadedState> {
  const path = join(dir, STORE_FILE);
  const exists = await fsp
    .lstat(path)
    .then(() => true)
    .catch(() => false);
  if (!exists) {
    const legacy = await readState(dir, warn);
    if (!legacy) return { from: 'none', legacyFiles: [] };
    const names = await fsp.readdir(dir);
    return { state: legacy, from: 'version-2', legacyFiles: names.filter((n) => n === 'state.json' || /^state\.journal\.\d+$/.test(n)) };
  }
  const forward = await dump(path, false);
  return afterDump(dir, path, forward, warn);
}

/** Reads a store that may be in use (LMDB readers see the last commit), without setting anything aside. */
export async function readStoreFile(path: string): Promise<{ state: DaemonState; whole: boolean; bad: { key: string; why: string }[] }> {
  const d = await dump(path, false);
  const bad = [...d.bad];
  return { state: stateOf(d.entries, bad), whole: d.whole, bad };
}

async function afterDump(dir: string, path: string, forward: Dump, warn: StoreEvents['onWarning']): Promise<LoadedState> {
  const meta = forward.entries.get(META) as { schema?: unknown } | undefined;
  if (forward.whole && typeof meta?.schema === 'number' && meta.schema > STORE_SCHEMA) {
    throw new StoreTooNewError(`${path} was written by a later kvmvfiod (store schema ${meta.schema}; this one knows ${STORE_SCHEMA}); refusing to start rather than lose it`);
  }
  if (forward.whole && !forward.bad.length) return { state: stateOf(forward.entries, forward.bad), from: 'store', legacyFiles: [] };
  const entries = new Map(forward.entries);
  const bad = [...forward.bad];
  if (!forward.whole) {
    const backward = await dump(path, true);
    for (const [k, v] of backward.entries) if (!entries.has(k)) entries.set(k, v);
    for (const b of backward.bad) if (!bad.some((x) => x.key === b.key)) bad.push(b);
  }
  const aside = `${path}.damaged-${new Date().toISOString().replace(/[:.]/g, '-')}`;
  await fsp.rename(path, aside);
  await fsp.unlink(join(dir, LOCK_FILE)).catch(() => undefined);
  const state = stateOf(entries, bad);
  warn(
    { event: 'state-damaged', path, setAside: aside, unreadable: !forward.whole, err: forward.stderr || undefined, recovered: entries.size, badEntries: bad.slice(0, 20) },
    'the state store could not be read whole; set aside, keeping what could be read',
  );
  return { state, from: 'store', damage: { setAside: aside, badEntries: bad, unreadable: !forward.whole, recovered: entries.size }, legacyFiles: [] };
}

export class StateStore {
  readonly dir: string;
  readonly path: string;
  readonly #source: StateSource;
  readonly #events: StoreEvents;
  readonly #retryMs: number;
  readonly #maxRetryMs: number;
  #db: RootDatabase<Buffer, string> | undefined;
  #dirty = new Set<string>();
  /** Settles when the commit of what is dirty now is done. */
  #next: Deferred | undefined;
  /** The commit on its way to disk. */
  #current: Deferred | undefined;
  #scheduled = false;
  #closed = false;
  #failure: StateWriteError | undefined;
  #failedSince = 0;
  #attempts = 0;
  #retryTimer: NodeJS.Timeout | undefined;
  /** Commits made, and the fdatasync'd transactions they took (for the bench and tests). */
  commits = 0;

  constructor(dir: string, source: StateSource, events: StoreEvents, opts: StoreOptions = {}) {
    this.dir = dir;
    this.path = join(dir, STORE_FILE);
    this.#source = source;
    this.#events = events;
    this.#retryMs = opts.retryMs ?? 100;
    this.#maxRetryMs = opts.maxRetryMs ?? 5000;
  }

  /** The failure that stops mutating calls now; undefined while commits succeed. */
  get failure(): StateWriteError | undefined {
    return this.#failure;
  }

  /** Changes told and not yet on disk. */
  get unsaved(): number {
    return this.#dirty.size;
  }

  /**
   * Opens (or creates) the store and writes every entry the source has now
   * in one transaction, dropping any other: the first commit of a start is
   * the state as restored. Throws when that commit fails (the daemon does not
   * start on a state it cannot write). Then renames the files of version 2
   * (state.json.migrated, ...): the store holds their state now.
   */
  async open(legacyFiles: string[] = []): Promise<void> {
    await prepareStateDir(this.dir);
    this.#db = openStoreDb(this.path);
    for (const name of [STORE_FILE, LOCK_FILE]) await fsp.chmod(join(this.dir, name), 0o600).catch(() => undefined);
    const ids = this.#source.ids();
    const keys = new Set<string>();
    for (const id of ids.vms) keys.add(`vm/${id}`);
    for (const g of ids.claims) keys.add(`claim/${g}`);
    for (const id of ids.sessions) keys.add(`session/${id}`);
    const db = this.#db;
    const stale: string[] = [];
    for (const key of db.getKeys()) if (String(key) !== META && !keys.has(String(key))) stale.push(String(key));
    this.#dirty = keys;
    await this.#commit(stale);
    if (this.#failure) throw this.#failure;
    for (const name of legacyFiles) {
      await fsp.rename(join(this.dir, name), join(this.dir, `${name}.migrated`)).catch((e: Error) => this.#events.onWarning({ event: 'state-migrate-rename-failed', name, err: e.message }, 'could not rename a version-2 state file'));
    }
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

  /** Throws the StateWriteError that stops mutating calls, if the store is failing. */
  check(): void {
    if (this.#failure) throw this.#failure;
  }

  /**
   * Resolves once every change told so far is committed and fdatasync'd;
   * rejects with a StateWriteError when the commit that carries it fails.
   */
  durable(): Promise<void> {
    if (this.#dirty.size) {
      this.#next ??= deferred();
      return this.#next.promise;
    }
    return this.#current?.promise ?? Promise.resolve();
  }

  /**
   * Commits what is pending and closes the store; later changes are not
   * saved (shutdown). Returns what could not be saved.
   */
  async close(): Promise<{ unsaved: number; error?: StateWriteError }> {
    if (this.#closed) return { unsaved: 0 };
    clearTimeout(this.#retryTimer);
    let error: StateWriteError | undefined;
    if (this.#db) {
      // One last try for what a failing store still holds.
      if (this.#dirty.size && !this.#current) void this.#commit();
      while (this.#current || this.#dirty.size) {
        try {
          await this.durable();
        } catch (e) {
          error = e as StateWriteError;
          break;
        }
      }
    }
    this.#closed = true;
    const unsaved = this.#dirty.size;
    await this.#db?.close().catch(() => undefined);
    this.#db = undefined;
    return { unsaved, error: unsaved ? (error ?? this.#failure) : undefined };
  }

  #changed(key: string): void {
    if (this.#closed) return;
    this.#dirty.add(key);
    this.#schedule();
  }

  #schedule(): void {
    // While failing, commits follow the retry timer, not each change.
    if (!this.#db || this.#closed || this.#current || this.#scheduled || this.#failure) return;
    this.#scheduled = true;
    // The changes of this turn of the event loop (and what a commit under way holds back) go together.
    setImmediate(() => {
      this.#scheduled = false;
      if (!this.#current && this.#dirty.size) void this.#commit();
    });
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

  /** One transaction: every dirty entry with its value now (removed when gone), and the meta entry. */
  async #commit(removeAlso: string[] = []): Promise<void> {
    const db = this.#db!;
    const keys = this.#dirty;
    this.#dirty = new Set();
    const done = this.#next ?? deferred();
    this.#next = undefined;
    this.#current = done;
    const puts: [string, Buffer | undefined][] = [];
    for (const key of keys) {
      const value = this.#valueOf(key);
      puts.push([key, value === undefined ? undefined : encodeEntry(JSON.stringify(value))]);
    }
    for (const key of removeAlso) puts.push([key, undefined]);
    const meta = encodeEntry(JSON.stringify({ schema: STORE_SCHEMA, revision: this.#source.revision(), writtenAt: new Date().toISOString() }));
    const started = process.hrtime.bigint();
    const elapsed = () => Number(process.hrtime.bigint() - started) / 1e9;
    try {
      puts.push([META, meta]);
      await commitPuts(db, puts);
      this.commits++;
      this.#events.onCommit?.(elapsed());
      if (this.#failure) {
        this.#events.onRecovered({ failedForMs: Date.now() - this.#failedSince, attempts: this.#attempts });
        this.#failure = undefined;
        this.#attempts = 0;
      }
      done.resolve();
    } catch (e) {
      // Everything of this commit is tried again, with what changed since.
      for (const key of keys) this.#dirty.add(key);
      const { errno, detail } = await errnoOf(e, this.dir);
      const err = new StateWriteError(errno, detail);
      this.#events.onCommit?.(elapsed(), errno);
      const first = !this.#failure;
      if (first) this.#failedSince = Date.now();
      this.#failure = err;
      this.#attempts++;
      this.#events.onWriteFailed(err, first);
      done.reject(err);
      // Those waiting on the next commit are told now too: nothing is committed until a retry succeeds.
      const waiting = this.#next as Deferred | undefined;
      waiting?.reject(err);
      this.#next = undefined;
      if (!this.#closed) {
        const wait = Math.min(this.#maxRetryMs, this.#retryMs * 2 ** Math.min(this.#attempts - 1, 16));
        this.#retryTimer = setTimeout(() => {
          if (!this.#current && !this.#closed) void this.#commit();
        }, wait);
        this.#retryTimer.unref();
      }
    } finally {
      if (this.#current === done) this.#current = undefined;
    }
    if (this.#dirty.size && !this.#failure) this.#schedule();
  }
}
