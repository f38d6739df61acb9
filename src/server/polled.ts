/**
 * A listening Unix socket served from Node's event loop through a uv_poll —
 * never a blocking accept — shared by the API and the handoff listeners:
 * the watch, a pause when accept(2) fails (EMFILE: the connection stays
 * queued and the level-triggered poll would spin), and the end, which
 * removes the socket file only if this process made it.
 */
import { chmod, lstat, unlink } from 'node:fs/promises';
import { connect } from 'node:net';
import { type FdWatch, type OwnedFd, SeqpacketListener, watchReadable } from '../kernel';

/**
 * Removes a stale socket file left by a daemon that died; refuses when a
 * live daemon still answers on it.
 */
export async function clearStaleSocket(path: string): Promise<void> {
  let st;
  try {
    st = await lstat(path);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw e;
  }
  if (!st.isSocket()) throw new Error(`${path} exists and is not a socket; remove it or choose another runtime directory`);
  const alive = await new Promise<boolean>((resolve) => {
    const s = connect(path);
    s.once('connect', () => (s.destroy(), resolve(true)));
    s.once('error', () => resolve(false));
  });
  if (alive) throw new Error(`${path}: another kvmvfiod is serving on it`);
  await unlink(path);
}

/** How long the poll rests after a failed accept. */
const PAUSE_MS = 100;

export class PolledListener {
  #listener?: SeqpacketListener;
  #watch?: FdWatch;
  #unlinkOnStop = false;
  readonly #onReadable: () => void;

  /** `onReadable`: accept what is queued (some of it; the poll calls again while more waits). */
  constructor(onReadable: () => void) {
    this.#onReadable = onReadable;
  }

  /** The listener while serving. */
  get listener(): SeqpacketListener | undefined {
    return this.#listener;
  }

  /** Makes the socket at `path` (a stale file of a dead daemon is removed first), mode `mode`. */
  async listen(path: string, opts: { backlog?: number; stream?: boolean; mode: number; prepare?: (l: SeqpacketListener) => void }): Promise<void> {
    await clearStaleSocket(path);
    const l = SeqpacketListener.listen(path, opts.backlog ?? 128, opts.stream ?? false);
    this.#listener = l;
    this.#unlinkOnStop = true;
    opts.prepare?.(l);
    await chmod(path, opts.mode);
    this.#start();
  }

  /** Serves on a listening socket systemd passed (socket activation); the socket is systemd's to remove. */
  adopt(fd: OwnedFd, label: string, prepare?: (l: SeqpacketListener) => void): void {
    const l = SeqpacketListener.fromFd(fd, label);
    this.#listener = l;
    prepare?.(l);
    this.#start();
  }

  /** After a failed accept: rest, then watch again. */
  pause(): void {
    this.#watch?.close();
    this.#watch = undefined;
    setTimeout(() => {
      if (this.#listener && !this.#watch) this.#start();
    }, PAUSE_MS).unref();
  }

  async stop(): Promise<void> {
    this.#watch?.close();
    this.#watch = undefined;
    const path = this.#listener?.path;
    await this.#listener?.close();
    this.#listener = undefined;
    if (path && this.#unlinkOnStop) await unlink(path).catch(() => undefined);
  }

  #start(): void {
    if (this.#listener) this.#watch = watchReadable(this.#listener.fd, this.#onReadable);
  }
}
