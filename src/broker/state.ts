/**
 * The state's shapes, and the reader of the files the daemon wrote before
 * the store (store.ts): a version-1 state.json, or a version-2 snapshot
 * (state.json) with its journals (state.journal.<G>, one JSON line per changed
 * entry, {"key","value"}; the last line of each write carries "revision" and
 * "commit":true). A start that finds them and no store migrates them into it.
 *
 * Reading costs what is damaged, not the state: a line cut short by a crash
 * (at the end of a journal) and a line that is damaged elsewhere are left
 * out, each with a warning, and the rest is applied.
 */
import { constants } from 'node:fs';
import { open, readdir } from 'node:fs/promises';
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
  /** The VMM negotiated edition 2 of the session protocol; absent: edition 1. */
  edition2?: boolean;
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

interface JournalEntry {
  key: string;
  value: unknown;
  revision?: number;
  commit?: boolean;
}

/** Reads a file of the state dir, refusing a symbolic link (O_NOFOLLOW). */
async function readNoFollow(path: string): Promise<string> {
  const fh = await open(path, constants.O_RDONLY | constants.O_NOFOLLOW);
  try {
    return await fh.readFile('utf8');
  } finally {
    await fh.close();
  }
}

type Warn = (event: Record<string, unknown>, msg: string) => void;

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
   * a warning. An unreadable line before the end is damage: that entry is left
   * out, with a warning, and the rest applies.
   */
  journal(text: string, path: string, warn: Warn): void {
    const lines = text.split('\n');
    let pending: JournalEntry[] = [];
    let torn = false;
    const damaged: number[] = [];
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
        damaged.push(i + 1);
        continue;
      }
      if (typeof e !== 'object' || e === null || typeof e.key !== 'string' || !('value' in e)) {
        damaged.push(i + 1);
        continue;
      }
      pending.push(e);
      if (e.commit === true) {
        for (const p of pending) {
          try {
            this.apply(p, `${path}: line ${i + 1}`);
          } catch {
            damaged.push(i + 1);
          }
        }
        if (typeof e.revision === 'number') this.revision = Math.max(this.revision, e.revision);
        pending = [];
      }
    }
    if (torn || pending.length) {
      warn({ event: 'state-journal-torn', path, linesIgnored: pending.length + (torn ? 1 : 0) }, 'the last write to the state journal was cut short (a crash mid-write); leaving it out');
    }
    if (damaged.length) {
      warn({ event: 'state-journal-damaged', path, lines: damaged.slice(0, 20), count: damaged.length }, 'damaged lines in the state journal; leaving those entries out');
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
 * Reads the state a version-1 or version-2 daemon left in `dir`: the
 * snapshot, then its journals. Undefined when there is none; throws when the
 * snapshot itself cannot be understood.
 */
export async function readState(dir: string, warn: Warn = () => {}): Promise<DaemonState | undefined> {
  const path = join(dir, SNAPSHOT);
  let text: string;
  try {
    text = await readNoFollow(path);
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
      r.journal(await readNoFollow(jpath), jpath, warn);
    }
  }
  return r.state(s.writtenAt);
}
