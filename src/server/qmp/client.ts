/**
 * A QMP client on a stream socket the daemon owns: its end of the socketpair
 * whose other end is a passive VMM's QEMU monitor (docs/session-protocol.md,
 * "The QMP channel"). QEMU's monitor protocol: docs/interop/qmp-spec.rst in
 * QEMU's tree — a greeting, capability negotiation, then commands answered
 * in order (each answer echoes the command's `id`) and events in between,
 * one JSON object per line.
 *
 * What is at the other end runs as the VMM's uid and is not trusted: every
 * line is parsed strictly and bounded in size, anything that breaks the
 * protocol closes the channel (its commands fail UNAVAILABLE), and a peer
 * that does not answer makes each command fail DEADLINE_EXCEEDED on its own
 * deadline. Only commands travel from here: one at a time, so that an fd
 * sent with a command (SCM_RIGHTS, for `getfd`) is read by QEMU with that
 * command and no other.
 */
import { DeadlineExceededError, InvalidArgumentError, UnavailableError } from '../../broker/errors';
import { type FdWatch, type SendableFd, type StreamSocket, SysError, peerCredentials, socketKind, watchReadable } from '../../kernel';

const AF_UNIX = 1;
const SOCK_STREAM = 1;

/**
 * The QMP fd a passive VMM sent with its ATTACH must be an AF_UNIX
 * SOCK_STREAM socket whose other end that VMM process made: SO_PEERCRED
 * names the process that created a socketpair (kvmvfioctl attach, the VMM
 * before its exec), but the listening service for a connection. So a VMM
 * cannot make the daemon write, as root, into a connection to some other
 * service. InvalidArgumentError otherwise (the ATTACH is refused, EINVAL).
 */
export function checkQmpSocket(fd: number, vmmPid: number): void {
  let kind;
  try {
    kind = socketKind(fd, 'the QMP fd');
  } catch (e) {
    throw new InvalidArgumentError('QMP fd', `not a socket (${e instanceof SysError ? e.code : (e as Error).message})`);
  }
  if (kind.domain !== AF_UNIX || kind.type !== SOCK_STREAM) throw new InvalidArgumentError('QMP fd', `a socket of family ${kind.domain}, type ${kind.type}; an AF_UNIX SOCK_STREAM socketpair is needed`);
  let peer;
  try {
    peer = peerCredentials(fd);
  } catch (e) {
    throw new InvalidArgumentError('QMP fd', `no peer (${e instanceof SysError ? e.code : (e as Error).message})`);
  }
  if (peer.pid !== vmmPid) {
    throw new InvalidArgumentError('QMP fd', `its other end was made by pid ${peer.pid}, not by the VMM (pid ${vmmPid}): pass one end of a socketpair the VMM made (kvmvfioctl attach does)`);
  }
}

/** QEMU answered a command with an error: its class and description, as QEMU wrote them. */
export class QmpError extends Error {
  override readonly name = 'QmpError';
  readonly command: string;
  /** GenericError, CommandNotFound, DeviceNotFound... */
  readonly errorClass: string;
  readonly desc: string;
  constructor(who: string, command: string, errorClass: string, desc: string) {
    super(`${who}: ${command}: ${desc}`);
    this.command = command;
    this.errorClass = errorClass;
    this.desc = desc;
  }
}

export interface QmpEvent {
  event: string;
  data: Record<string, unknown>;
}

export interface QmpOptions {
  /** How long a command may take from the call to its answer, waiting for QEMU's start and greeting included. */
  commandTimeoutMs: number;
  /** The peer in messages: "QEMU (pid 412) of vm web-1". */
  who: string;
  /** The longest line taken from the peer (default 1 MiB); a longer one closes the channel. */
  maxLineBytes?: number;
  log?: (event: Record<string, unknown>, msg: string) => void;
  /**
   * A channel the previous daemon process negotiated (from the fd store):
   * no greeting comes, commands go at once, and their ids start past any
   * that process can have used, so its late answers are told apart. The
   * first line may be the rest of one that process had half read: if it
   * does not parse, it is dropped.
   */
  resumed?: boolean;
}

interface Command {
  id: number;
  execute: string;
  line: Buffer;
  fd?: SendableFd;
  resolve(value: unknown): void;
  reject(e: Error): void;
  timer?: NodeJS.Timeout;
}

type Phase = 'greeting' | 'negotiating' | 'ready' | 'closed';

const DEFAULT_MAX_LINE = 1 << 20;
/** Bytes read per readable callback at most: a flooding peer yields the loop to other work between slices. */
const READ_SLICE = 256 * 1024;
/** Late answers (to commands that timed out) remembered so they are ignored quietly, at most. */
const MAX_ABANDONED = 64;

const isObject = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);

export class QmpClient {
  readonly who: string;
  readonly #sock: StreamSocket;
  readonly #opts: QmpOptions;
  readonly #queue: Command[] = [];
  readonly #listeners = new Set<(e: QmpEvent) => void>();
  readonly #closeListeners = new Set<(reason: string) => void>();
  readonly #abandoned = new Set<number>();
  #inFlight?: Command;
  #phase: Phase = 'greeting';
  #watch?: FdWatch;
  #pending: Buffer[] = [];
  #pendingBytes = 0;
  #nextId = 1;
  /** Answers to no command in flight: logged the first time and then every 1000th, not once each (a peer can send millions). */
  #strayAnswers = 0;
  #greeting?: Record<string, unknown>;
  /** Resumed: the first line read may be the tail of one the previous daemon process had half read. */
  #mayBeTail = false;
  #closed!: (reason: string) => void;
  /** Resolves with the reason once the channel is closed (by either side, or for breaking the protocol). */
  readonly closed: Promise<string>;
  #closeReason?: string;

  /** Takes `sock` (it closes it when the channel ends) and waits for QEMU's greeting on it (unless `opts.resumed`). */
  constructor(sock: StreamSocket, opts: QmpOptions) {
    this.#sock = sock;
    this.#opts = opts;
    this.who = opts.who;
    this.closed = new Promise((r) => (this.#closed = r));
    if (opts.resumed) {
      this.#phase = 'ready';
      this.#mayBeTail = true;
      // A daemon process numbers from 1, or (resumed) from its start time in µs: this start is later.
      this.#nextId = Date.now() * 1000;
    }
    this.#watch = watchReadable(sock.fd, () => this.#onReadable());
  }

  /** The daemon's end of the channel while it is open (for the fd store). */
  get fd(): number | undefined {
    return this.#phase === 'closed' ? undefined : this.#sock.fd;
  }

  /** QEMU's greeting (`{"QMP": {...}}`'s contents) once it came; its version, say. */
  get greeting(): Readonly<Record<string, unknown>> | undefined {
    return this.#greeting;
  }

  get isOpen(): boolean {
    return this.#phase !== 'closed';
  }

  get ready(): boolean {
    return this.#phase === 'ready';
  }

  /**
   * Runs `execute` with `args` and resolves with its `return`. `fd`, when
   * given, travels with the command's bytes (SCM_RIGHTS) and is closed right
   * after the send, or when the command fails before it: this client never
   * keeps it. Rejects with QmpError (QEMU's error), DeadlineExceededError (no
   * answer within the timeout) or UnavailableError (the channel closed).
   */
  execute<T = unknown>(execute: string, args?: Record<string, unknown>, fd?: SendableFd): Promise<T> {
    if (this.#phase === 'closed') {
      fd?.closeSync();
      return Promise.reject(this.#closedError(execute));
    }
    const id = this.#nextId++;
    const line = Buffer.from(`${JSON.stringify(args === undefined ? { execute, id } : { execute, arguments: args, id })}\n`);
    return new Promise<T>((resolve, reject) => {
      const cmd: Command = { id, execute, line, fd, resolve: resolve as (v: unknown) => void, reject };
      cmd.timer = setTimeout(() => this.#timedOut(cmd), this.#opts.commandTimeoutMs);
      this.#queue.push(cmd);
      this.#pump();
    });
  }

  /** Calls `listener` with every event from now on; returns the unsubscribe. */
  onEvent(listener: (e: QmpEvent) => void): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  /** Calls `listener` once, with the reason, when the channel closes; returns the unsubscribe. */
  onClosed(listener: (reason: string) => void): () => void {
    if (this.#phase === 'closed') {
      listener(this.#closeReason ?? 'closed');
      return () => undefined;
    }
    this.#closeListeners.add(listener);
    return () => this.#closeListeners.delete(listener);
  }

  /** Ends the channel: pending commands fail UNAVAILABLE with `reason`, the socket is closed. */
  close(reason: string): void {
    if (this.#phase === 'closed') return;
    this.#phase = 'closed';
    this.#closeReason = reason;
    this.#watch?.close();
    this.#watch = undefined;
    this.#sock.closeSync();
    const all = [...(this.#inFlight ? [this.#inFlight] : []), ...this.#queue.splice(0)];
    this.#inFlight = undefined;
    for (const c of all) this.#fail(c, this.#closedError(c.execute));
    this.#pending = [];
    this.#pendingBytes = 0;
    this.#listeners.clear();
    const told = [...this.#closeListeners];
    this.#closeListeners.clear();
    for (const l of told) l(reason);
    this.#closed(reason);
  }

  #closedError(execute: string): UnavailableError {
    return new UnavailableError(`${this.who}: ${execute}: the QMP channel is closed (${this.#closeReason ?? 'closed'})`);
  }

  #fail(c: Command, e: Error): void {
    clearTimeout(c.timer);
    c.fd?.closeSync();
    c.fd = undefined;
    c.reject(e);
  }

  #timedOut(c: Command): void {
    const e = new DeadlineExceededError(
      `${this.who} did not answer ${c.execute} within ${this.#opts.commandTimeoutMs} ms${this.#phase === 'greeting' ? ' (no QMP greeting yet: is QEMU running with the kvmvfiod monitor, -mon chardev=…,mode=control?)' : ''}`,
    );
    const queued = this.#queue.indexOf(c);
    if (queued >= 0) {
      this.#queue.splice(queued, 1);
      this.#fail(c, e);
      return;
    }
    if (this.#inFlight === c) {
      // Its answer may still come: it is then recognised by its id and dropped.
      this.#inFlight = undefined;
      this.#abandoned.add(c.id);
      if (this.#abandoned.size > MAX_ABANDONED) this.#abandoned.delete(this.#abandoned.values().next().value as number);
      this.#fail(c, e);
      this.#pump();
    }
  }

  /** Sends the next command when none is in flight and the channel is negotiated. */
  #pump(): void {
    if (this.#phase !== 'ready' || this.#inFlight) return;
    const next = this.#queue.shift();
    if (next) this.#send(next);
  }

  #send(c: Command): void {
    this.#inFlight = c;
    let written: number;
    try {
      written = this.#sock.send(c.line, c.fd ? [c.fd.fd] : []);
    } catch (e) {
      this.close(e instanceof SysError ? `sending ${c.execute}: ${e.code}` : `sending ${c.execute}: ${(e as Error).message}`);
      return;
    }
    // The daemon's copy goes at once: QEMU holds the only one now (or none, if the send failed).
    c.fd?.closeSync();
    c.fd = undefined;
    if (written < c.line.length) {
      // One small command at a time leaves the socket's buffer full only when QEMU stopped
      // reading its monitor long ago: nothing more will get through.
      this.close(`QEMU does not read its monitor (${written} of ${c.line.length} bytes of ${c.execute} taken)`);
    }
  }

  #onReadable(): void {
    let taken = 0;
    while (this.#phase !== 'closed' && taken < READ_SLICE) {
      let chunk: Buffer | null;
      try {
        chunk = this.#sock.recv();
      } catch (e) {
        this.close(e instanceof SysError ? `reading the monitor: ${e.code}` : `reading the monitor: ${(e as Error).message}`);
        return;
      }
      if (chunk === null) return;
      if (chunk.length === 0) {
        this.close('QEMU closed its monitor');
        return;
      }
      taken += chunk.length;
      this.#feed(chunk);
    }
  }

  #feed(chunk: Buffer): void {
    let start = 0;
    for (let nl = chunk.indexOf(10); nl >= 0 && this.#phase !== 'closed'; nl = chunk.indexOf(10, start)) {
      const part = chunk.subarray(start, nl);
      start = nl + 1;
      const line = this.#pending.length ? Buffer.concat([...this.#pending, part]) : part;
      this.#pending = [];
      this.#pendingBytes = 0;
      if (line.length > this.#maxLine) {
        this.close(`QEMU sent a line of ${line.length} bytes (at most ${this.#maxLine})`);
        return;
      }
      this.#line(line);
    }
    if (this.#phase === 'closed' || start >= chunk.length) return;
    const rest = chunk.subarray(start);
    this.#pendingBytes += rest.length;
    if (this.#pendingBytes > this.#maxLine) {
      this.close(`QEMU sent a line of more than ${this.#maxLine} bytes`);
      return;
    }
    // A copy: `chunk` is a view of a buffer reused by nothing, but keep only what is needed.
    this.#pending.push(Buffer.from(rest));
  }

  get #maxLine(): number {
    return this.#opts.maxLineBytes ?? DEFAULT_MAX_LINE;
  }

  #line(raw: Buffer): void {
    const text = raw.toString('utf8').trim();
    if (!text) return;
    const tail = this.#mayBeTail;
    this.#mayBeTail = false;
    let msg: unknown;
    try {
      msg = JSON.parse(text);
    } catch {
      if (tail) {
        this.#opts.log?.({ event: 'qmp-resumed-tail', bytes: raw.length }, 'dropped the rest of a QMP line the previous daemon process had begun to read');
        return;
      }
      this.close(`QEMU sent a line that is not JSON: ${JSON.stringify(text.slice(0, 80))}`);
      return;
    }
    if (!isObject(msg)) {
      if (tail) return;
      this.close(`QEMU sent JSON that is not an object: ${JSON.stringify(text.slice(0, 80))}`);
      return;
    }
    if (this.#phase === 'greeting') {
      if (!isObject(msg.QMP)) {
        this.close(`QEMU's first line is not a QMP greeting: ${JSON.stringify(text.slice(0, 80))}`);
        return;
      }
      this.#greeting = msg.QMP;
      this.#phase = 'negotiating';
      this.#negotiate();
      return;
    }
    if (typeof msg.event === 'string') {
      const e: QmpEvent = { event: msg.event, data: isObject(msg.data) ? msg.data : {} };
      for (const l of [...this.#listeners]) {
        try {
          l(e);
        } catch (err) {
          this.#opts.log?.({ event: 'qmp-listener-failed', qmp_event: e.event, err: (err as Error).message }, 'a QMP event listener threw');
        }
      }
      return;
    }
    if ('return' in msg || isObject(msg.error)) {
      this.#answer(msg);
      return;
    }
    if (tail) return;
    this.close(`QEMU sent a message that is neither an answer nor an event: ${JSON.stringify(text.slice(0, 80))}`);
  }

  /** qmp_capabilities without any capability (no out-of-band): commands then run one at a time, in order. */
  #negotiate(): void {
    const id = this.#nextId++;
    const cmd: Command = {
      id,
      execute: 'qmp_capabilities',
      line: Buffer.from(`${JSON.stringify({ execute: 'qmp_capabilities', id })}\n`),
      resolve: () => {
        this.#phase = 'ready';
        this.#pump();
      },
      reject: (e) => this.close(`qmp_capabilities failed: ${e.message}`),
    };
    this.#send(cmd);
  }

  #answer(msg: Record<string, unknown>): void {
    const c = this.#inFlight;
    if (!c || msg.id !== c.id) {
      if (typeof msg.id === 'number' && this.#abandoned.delete(msg.id)) return;
      // An answer to nothing asked: QEMU's reply to a line it could not parse has no id; anything else is a lie.
      if (this.#strayAnswers++ % 1000 === 0) this.#opts.log?.({ event: 'qmp-unexpected-answer', id: msg.id ?? null, count: this.#strayAnswers }, 'QMP answer to no command in flight; ignored');
      return;
    }
    this.#inFlight = undefined;
    clearTimeout(c.timer);
    if (isObject(msg.error)) {
      const cls = typeof msg.error.class === 'string' ? msg.error.class : 'GenericError';
      const desc = typeof msg.error.desc === 'string' ? msg.error.desc : JSON.stringify(msg.error).slice(0, 200);
      c.reject(new QmpError(this.who, c.execute, cls, desc));
    } else c.resolve(msg.return);
    if (this.#phase !== 'closed') this.#pump();
  }
}
