/**
 * The API socket. grpc-js cannot tell who is on the other end of a Unix
 * socket, so the daemon accepts connections itself, reads SO_PEERCRED, and
 * hands each connection to grpc-js through a connection injector. The
 * credentials are found again per call by the peer string, which is the
 * `remoteAddress` this listener gives the socket.
 *
 * accept(2) is the daemon's own (on a uv_poll, as the handoff socket's), not
 * net.Server's: a connection a limit refuses is closed before Node makes a
 * socket object of it (an accept, a getsockopt and a close: a third of what
 * net.Server spends on it), and each loop turn accepts a bounded number, so
 * a flood of connections from one user delays root's calls by little.
 */
import type { ConnectionInjector } from '@grpc/grpc-js';
import { Socket } from 'node:net';
import type { Logger } from 'pino';
import type { Caller } from '../broker/broker';
import { type OwnedFd, peerCredentials, peersHungUp } from '../kernel';
import { PolledListener } from './polled';

export { clearStaleSocket } from './polled';

/** Connections accepted per loop turn at most; the listener is level-triggered, so the rest wait one turn. */
const ACCEPTS_PER_TURN = 32;
/**
 * The listen backlog (the kernel caps it at net.core.somaxconn). A Unix
 * socket's connect fails with EAGAIN, not waits, when the backlog is full: a
 * deep one keeps root's connect queued behind a flood rather than refused.
 */
const API_BACKLOG = 4096;

export class PeerDirectory {
  readonly #byPeer = new Map<string, Caller>();
  #next = 0;

  add(cred: Caller): string {
    const key = `unix:conn-${++this.#next}:uid=${cred.uid}`;
    this.#byPeer.set(key, cred);
    return key;
  }

  remove(key: string): void {
    this.#byPeer.delete(key);
  }

  lookup = (peer: string): Caller | undefined => this.#byPeer.get(peer);

  get size(): number {
    return this.#byPeer.size;
  }
}

/**
 * How a caller ranks at accept: uid 0 and admin principals are never refused
 * by a connection limit; a tenant counts against them; a stranger (a policy
 * exists and names no principal for it) is closed at once.
 */
export type Admission = 'privileged' | 'tenant' | 'stranger';

export interface ApiListenerOptions {
  /** Connections of tenants (every caller but uid 0 and admin principals) together, at most. */
  maxConnections: number;
  /** Connections of one tenant uid at most. */
  maxConnectionsPerUid: number;
  /** Ranks a caller by its credentials (asked at each accept, so a policy reload applies at once). */
  admit(cred: Caller): Admission;
  /** How often the open connections are checked for a peer that hung up. Default 200 ms. */
  sweepMs?: number;
  /** A connection whose HTTP/2 session has ended its side but is still open this long is destroyed. Default 2 s. */
  closeGraceMs?: number;
  /** Told of each connection closed at accept (metrics). */
  onRefused?(reason: Refusal): void;
}

interface Connection {
  sock: Socket;
  fd: number;
  key: string;
  uid: number;
  tenant: boolean;
  /** When the session ended its writable side (grpc-js closing it), if it did. */
  endedAt?: number;
}

/** Why a connection was refused, in the log line's `reason`. */
export type Refusal = 'per-uid-limit' | 'limit' | 'no-principal';

export class ApiListener {
  readonly peers = new PeerDirectory();
  readonly #injector: ConnectionInjector;
  readonly #polled = new PolledListener(() => this.#acceptSome());
  readonly #conns = new Map<Socket, Connection>();
  /** Tenant connections per uid. */
  readonly #perUid = new Map<number, number>();
  #tenants = 0;
  readonly #log: Logger;
  readonly #opts: Required<ApiListenerOptions>;
  #sweep: NodeJS.Timeout | undefined;

  constructor(injector: ConnectionInjector, log: Logger, opts: ApiListenerOptions) {
    this.#log = log;
    this.#injector = injector;
    this.#opts = { sweepMs: 200, closeGraceMs: 2000, onRefused: () => {}, ...opts };
  }

  #acceptSome(): void {
    const listener = this.#polled.listener;
    if (!listener) return;
    for (let i = 0; i < ACCEPTS_PER_TURN; i++) {
      let conn;
      try {
        conn = listener.accept();
      } catch (e) {
        // EMFILE and friends: the connection stays queued. Stop watching for a moment rather than spin.
        this.#log.error({ event: 'api-accept-failed', err: (e as Error).message }, 'API accept failed; retrying in 100 ms');
        this.#polled.pause();
        return;
      }
      if (!conn) return;
      let cred: Caller;
      try {
        cred = peerCredentials(conn.fd);
      } catch (e) {
        this.#log.warn({ event: 'api-accept-failed', err: (e as Error).message }, 'dropping an API connection without credentials');
        conn.closeSync();
        continue;
      }
      const rank = this.#opts.admit(cred);
      const tenant = rank !== 'privileged';
      let refusal: Refusal | undefined;
      if (rank === 'stranger') refusal = 'no-principal';
      else if (tenant && (this.#perUid.get(cred.uid) ?? 0) >= this.#opts.maxConnectionsPerUid) refusal = 'per-uid-limit';
      else if (tenant && this.#tenants >= this.#opts.maxConnections) refusal = 'limit';
      if (refusal) {
        conn.closeSync();
        this.#refused(cred, refusal);
        continue;
      }
      // From here the net.Socket owns the fd (it closes it on destroy).
      const fd = conn.release();
      let sock: Socket;
      try {
        sock = new Socket({ fd, readable: true, writable: true });
      } catch (e) {
        this.#log.warn({ event: 'api-accept-failed', err: (e as Error).message }, 'dropping an API connection Node could not take');
        continue;
      }
      this.#admitted(sock, fd, cred, tenant);
    }
  }

  #admitted(sock: Socket, fd: number, cred: Caller, tenant: boolean): void {
    if (tenant) {
      this.#perUid.set(cred.uid, (this.#perUid.get(cred.uid) ?? 0) + 1);
      this.#tenants++;
    }
    const key = this.peers.add(cred);
    Object.defineProperty(sock, 'remoteAddress', { value: key, configurable: true });
    const conn: Connection = { sock, fd, key, uid: cred.uid, tenant };
    this.#conns.set(sock, conn);
    sock.once('close', () => this.#forget(conn));
    this.#injector.injectConnection(sock);
    this.#sweep ??= setInterval(() => this.#sweepConnections(), this.#opts.sweepMs).unref();
  }

  #refused(cred: Caller, reason: Refusal): void {
    this.#opts.onRefused?.(reason);
    const limit = reason === 'per-uid-limit' ? this.#opts.maxConnectionsPerUid : reason === 'limit' ? this.#opts.maxConnections : undefined;
    const why =
      reason === 'no-principal'
        ? `uid ${cred.uid} matches no principal of the policy`
        : reason === 'per-uid-limit'
          ? `uid ${cred.uid} holds ${this.#perUid.get(cred.uid)} API connections (--max-api-connections-per-uid ${limit})`
          : `callers other than root and admins hold ${this.#tenants} API connections (--max-api-connections ${limit})`;
    this.#log.warn({ event: 'api-connection-refused', uid: cred.uid, gid: cred.gid, pid: cred.pid, reason, limit }, `API connection refused: ${why}`);
  }

  /** Every connection's fd, ownership and counts end here, once ('close' is emitted once per socket). */
  #forget(conn: Connection): void {
    if (!this.#conns.delete(conn.sock)) return;
    this.peers.remove(conn.key);
    if (conn.tenant) {
      this.#tenants--;
      const n = (this.#perUid.get(conn.uid) ?? 1) - 1;
      if (n > 0) this.#perUid.set(conn.uid, n);
      else this.#perUid.delete(conn.uid);
    }
    if (this.#conns.size === 0) {
      clearInterval(this.#sweep);
      this.#sweep = undefined;
    }
  }

  /**
   * Destroys the connections whose peer is gone. Node's HTTP/2 stops
   * reading a session after a connection error (a bad frame: nghttp2 sends
   * GOAWAY and wants no more input), so the peer's close would never be
   * read and the socket would stay open for good. Also destroys a
   * connection whose session ended its side (grpc-js's idle close) but that
   * a peer which reads nothing keeps from closing.
   */
  #sweepConnections(): void {
    const now = Date.now();
    const conns: Connection[] = [];
    for (const c of this.#conns.values()) {
      if (c.sock.destroyed) continue;
      if (c.sock.writableEnded) {
        c.endedAt ??= now;
        if (now - c.endedAt >= this.#opts.closeGraceMs) {
          c.sock.destroy();
          continue;
        }
      }
      conns.push(c);
    }
    for (const i of peersHungUp(conns.map((c) => c.fd))) conns[i].sock.destroy();
  }

  async listen(path: string, mode = 0o666): Promise<void> {
    // Anyone may connect: SO_PEERCRED and the policy decide what they may do.
    await this.#polled.listen(path, { backlog: API_BACKLOG, stream: true, mode });
    this.#log.info({ event: 'api-listening', path }, 'API socket ready');
  }

  /** Serves on a listening socket systemd passed (socket activation); its path and mode are the unit's. */
  async listenFd(fd: OwnedFd): Promise<void> {
    const n = fd.fd;
    this.#polled.adopt(fd, 'api.sock (from systemd)');
    this.#log.info({ event: 'api-listening', fd: n, activated: true }, 'API socket from systemd');
  }

  get connections(): number {
    return this.#conns.size;
  }

  /** Stops accepting (and removes the socket file it made); open connections stay until grpc-js drains them. */
  async stopAccepting(): Promise<void> {
    await this.#polled.stop();
  }

  destroyConnections(): void {
    for (const c of [...this.#conns.values()]) c.sock.destroy();
    clearInterval(this.#sweep);
    this.#sweep = undefined;
  }
}
