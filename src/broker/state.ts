/**
 * The state file: what the daemon knows that the kernel does not keep for
 * it — VM records, who holds which group, which VMM sessions are live — so a
 * restarted daemon (with its fds back from systemd's fd store) carries on.
 * Written atomically (temp file + rename) after every change, one write at
 * a time, the latest state winning.
 */
import { readFile, rename, writeFile, mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import type { VmRecord } from './vms';

export const STATE_VERSION = 1;

export interface SessionState {
  vmId: string;
  pid: number;
  uid: number;
  gid: number;
  passive: boolean;
}

export interface DaemonState {
  version: number;
  writtenAt: string;
  /** The highest revision handed out, so revisions keep growing across restarts. */
  revision: number;
  vms: VmRecord[];
  claims: { group: number; vmId: string; vmName: string }[];
  sessions: SessionState[];
}

export class StateFile {
  readonly path: string;
  readonly #snapshot: () => Omit<DaemonState, 'version' | 'writtenAt'>;
  #writing: Promise<void> | undefined;
  #dirty = false;
  #dirMade = false;
  #lastWrite = 0;
  #onError: (e: Error) => void;
  /** The shortest time between two writes. */
  minIntervalMs = 50;

  constructor(dir: string, snapshot: () => Omit<DaemonState, 'version' | 'writtenAt'>, onError: (e: Error) => void) {
    this.path = join(dir, 'state.json');
    this.#snapshot = snapshot;
    this.#onError = onError;
  }

  /** Reads the state a previous run left; undefined when there is none. Throws on a file it cannot understand. */
  async read(): Promise<DaemonState | undefined> {
    let text: string;
    try {
      text = await readFile(this.path, 'utf8');
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw e;
    }
    const s = JSON.parse(text) as DaemonState;
    if (s.version !== STATE_VERSION || !Array.isArray(s.vms) || !Array.isArray(s.claims) || !Array.isArray(s.sessions)) {
      throw new Error(`${this.path}: not a version ${STATE_VERSION} state file`);
    }
    return s;
  }

  /** Asks for a write; writes coalesce, so a burst of changes costs one or two writes. */
  changed(): void {
    this.#dirty = true;
    this.#writing ??= this.#drain();
  }

  /** Resolves once everything asked so far is on disk. */
  async flush(): Promise<void> {
    while (this.#writing) await this.#writing;
  }

  async #drain(): Promise<void> {
    try {
      while (this.#dirty) {
        // Under load, at most one write per interval: each rewrites every record. A crash loses at
        // most the changes of the last interval (see the README on restarts).
        const wait = this.#lastWrite + this.minIntervalMs - Date.now();
        await new Promise((r) => (wait > 0 ? setTimeout(r, wait) : setImmediate(r)));
        this.#dirty = false;
        const state: DaemonState = { version: STATE_VERSION, writtenAt: new Date().toISOString(), ...this.#snapshot() };
        if (!this.#dirMade) {
          await mkdir(join(this.path, '..'), { recursive: true, mode: 0o700 });
          this.#dirMade = true;
        }
        const tmp = `${this.path}.tmp`;
        await writeFile(tmp, JSON.stringify(state), { mode: 0o600 });
        await rename(tmp, this.path);
        this.#lastWrite = Date.now();
      }
    } catch (e) {
      this.#onError(e as Error);
    } finally {
      this.#writing = undefined;
    }
  }
}
