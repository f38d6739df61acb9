/**
 * A hostile local user, for the denial-of-service tests: run it through
 * setpriv as an unprivileged uid. It opens connections to the daemon's two
 * sockets as a plan says, holds them or throws them away, opens new ones as
 * the daemon closes them, and prints what happened as JSON lines.
 *
 *   node flood-peer.js '{"api":PATH,"handoff":PATH,"workers":[...],"maxMs":N}'
 *
 * Workers (all run at once):
 * - `api-hold`: keeps up to `hold` connections to api.sock open; `send`
 *   says what each writes first (nothing, or the HTTP/2 preface and an empty
 *   SETTINGS frame); one the daemon closes is replaced while `attempts` last.
 * - `api-churn`: `attempts` connections, `width` at a time, each writing the
 *   preface, an empty SETTINGS frame and a frame no server accepts (length
 *   16 MiB, random rest), then closing at once.
 * - `handoff-hold`: as `api-hold`, on handoff.sock, silent.
 *
 * Everything is bounded: `attempts` per worker, `maxMs` for the whole run
 * (then it closes all and exits). `{"event":"progress",...}` lines come
 * every `progressMs`; SIGTERM, or stdin closing, ends the run early: all
 * its sockets are closed before the final `{"event":"done",...}` line.
 */
import { randomBytes } from 'node:crypto';
import { connect as netConnect, type Socket } from 'node:net';
import { type FdWatch, SeqpacketSocket, SysError, watchReadable } from '../../src/kernel';

export interface FloodWorker {
  kind: 'api-hold' | 'api-churn' | 'handoff-hold';
  /** Connections to hold at once (hold kinds). */
  hold?: number;
  /** Connections to open in all, replacements included. */
  attempts: number;
  /** Churn: connections in flight at once. */
  width?: number;
  /** api-hold: what to write after connecting. */
  send?: 'nothing' | 'preface';
}

export interface FloodPlan {
  api: string;
  handoff: string;
  workers: FloodWorker[];
  maxMs: number;
  progressMs?: number;
}

export interface FloodStats {
  /** Connections made (connect(2) succeeded). */
  opened: number;
  /** connect(2) failed for good (not EAGAIN). */
  connectFailed: number;
  /** connect(2) said EAGAIN (the daemon's listen backlog was full); retried. */
  eagain: number;
  /** Held connections the daemon closed. */
  closedByDaemon: number;
  /** Held connections the daemon closed within 100 ms of the connect (refused at accept, most likely). */
  closedAtOnce: number;
  /** Held now. */
  held: number;
}

const PREFACE = Buffer.from('PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n');
const EMPTY_SETTINGS = Buffer.from('000000040000000000', 'hex');

/** A frame header that declares 16 MiB - 1 (over any SETTINGS_MAX_FRAME_SIZE): a connection error. */
function badFrame(): Buffer {
  const b = randomBytes(16);
  b[0] = 0xff;
  b[1] = 0xff;
  b[2] = 0xff;
  return b;
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

class Flood {
  readonly stats: FloodStats = { opened: 0, connectFailed: 0, eagain: 0, closedByDaemon: 0, closedAtOnce: 0, held: 0 };
  readonly #api = new Set<Socket>();
  readonly #seq = new Map<SeqpacketSocket, FdWatch>();
  stopping = false;

  constructor(readonly plan: FloodPlan) {}

  /** One raw connection to api.sock; resolves once connected (or failed for good). */
  #connectApi(onClosed: (atOnce: boolean) => void, write?: Buffer, closeAfterWrite = false): Promise<boolean> {
    return new Promise((resolve) => {
      const attempt = () => {
        if (this.stopping) return resolve(false);
        const sock = netConnect(this.plan.api);
        let connectedAt = 0;
        sock.on('data', () => undefined);
        sock.on('error', (e: NodeJS.ErrnoException) => {
          if (connectedAt) return; // 'close' follows
          if (e.code === 'EAGAIN') {
            this.stats.eagain++;
            setTimeout(attempt, 2);
            return;
          }
          this.stats.connectFailed++;
          resolve(false);
        });
        sock.once('connect', () => {
          connectedAt = Date.now();
          this.stats.opened++;
          if (closeAfterWrite) {
            if (write) sock.end(write);
            else sock.end();
            sock.destroySoon();
            resolve(true);
            return;
          }
          if (write) sock.write(write);
          this.#api.add(sock);
          this.stats.held++;
          sock.once('close', () => {
            if (!this.#api.delete(sock)) return; // we closed it
            this.stats.held--;
            this.stats.closedByDaemon++;
            const atOnce = Date.now() - connectedAt < 100;
            if (atOnce) this.stats.closedAtOnce++;
            onClosed(atOnce);
          });
          resolve(true);
        });
      };
      attempt();
    });
  }

  /** One SOCK_SEQPACKET connection to handoff.sock, watched for the daemon closing it. */
  async #connectHandoff(onClosed: (atOnce: boolean) => void): Promise<boolean> {
    for (;;) {
      if (this.stopping) return false;
      let s: SeqpacketSocket;
      try {
        s = SeqpacketSocket.connect(this.plan.handoff, true);
      } catch (e) {
        if (e instanceof SysError && e.code === 'EAGAIN') {
          this.stats.eagain++;
          await sleep(2);
          continue;
        }
        this.stats.connectFailed++;
        return false;
      }
      const at = Date.now();
      this.stats.opened++;
      this.stats.held++;
      const watch = watchReadable(s.fd, () => {
        let rec;
        try {
          rec = s.recv();
        } catch {
          rec = { data: Buffer.alloc(0), fds: [], truncated: false };
        }
        if (!rec) return;
        for (const f of rec.fds) f.closeSync();
        if (rec.data.length) return;
        // End of stream: the daemon closed it.
        watch.close();
        this.#seq.delete(s);
        s.closeSync();
        this.stats.held--;
        this.stats.closedByDaemon++;
        const atOnce = Date.now() - at < 100;
        if (atOnce) this.stats.closedAtOnce++;
        onClosed(atOnce);
      });
      this.#seq.set(s, watch);
      return true;
    }
  }

  async #hold(w: FloodWorker): Promise<void> {
    let left = w.attempts;
    const hold = w.hold ?? 1;
    let wake: (() => void) | undefined;
    let open = 0;
    // A refused connection is replaced after a short pause; one that lived is replaced at once.
    const onClosed = (atOnce: boolean) => {
      open--;
      if (atOnce) setTimeout(() => wake?.(), 5);
      else wake?.();
    };
    const first = w.send === 'preface' ? Buffer.concat([PREFACE, EMPTY_SETTINGS]) : undefined;
    while (left > 0 && !this.stopping) {
      while (open < hold && left > 0 && !this.stopping) {
        left--;
        const ok = w.kind === 'handoff-hold' ? await this.#connectHandoff(onClosed) : await this.#connectApi(onClosed, first);
        if (ok) open++;
        // Let the daemon's replies and closes in between now and then.
        if (left % 64 === 0) await sleep(0);
      }
      if (left > 0 && !this.stopping) await new Promise<void>((r) => (wake = r));
      wake = undefined;
    }
  }

  async #churn(w: FloodWorker): Promise<void> {
    let left = w.attempts;
    const lane = async () => {
      while (left > 0 && !this.stopping) {
        left--;
        await this.#connectApi(() => undefined, Buffer.concat([PREFACE, EMPTY_SETTINGS, badFrame()]), true);
      }
    };
    await Promise.all(Array.from({ length: w.width ?? 8 }, lane));
  }

  run(): Promise<void> {
    return Promise.all(this.plan.workers.map((w) => (w.kind === 'api-churn' ? this.#churn(w) : this.#hold(w)))).then(() => undefined);
  }

  closeAll(): void {
    this.stopping = true;
    for (const s of this.#api) s.destroy();
    this.#api.clear();
    for (const [s, watch] of this.#seq) {
      watch.close();
      s.closeSync();
    }
    this.#seq.clear();
    this.stats.held = 0;
  }
}

async function main(): Promise<void> {
  const plan = JSON.parse(process.argv[2]) as FloodPlan;
  const flood = new Flood(plan);
  const say = (event: string, extra: object = {}) => process.stdout.write(`${JSON.stringify({ event, ...flood.stats, ...extra })}\n`);
  let finish!: () => void;
  const stopped = new Promise<void>((r) => (finish = r));
  process.once('SIGTERM', () => finish());
  process.stdin.on('end', () => finish()).resume();
  const deadline = setTimeout(() => finish(), plan.maxMs);
  const progress = setInterval(() => say('progress'), plan.progressMs ?? 500);
  const t0 = Date.now();
  void flood.run().then(() => say('all-opened', { ms: Date.now() - t0 }));
  await stopped;
  clearTimeout(deadline);
  clearInterval(progress);
  flood.closeAll();
  say('done', { ms: Date.now() - t0 });
  // Sockets destroyed above close on the next turns; then nothing is left.
  setTimeout(() => process.exit(0), 50);
}

if (require.main === module) void main();
