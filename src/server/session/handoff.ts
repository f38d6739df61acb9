/**
 * The handoff socket: a SOCK_SEQPACKET listener at <runtime>/handoff.sock,
 * mode 0666 (the token and SO_PEERCRED are the gate), accepted on Node's
 * event loop through a uv_poll — never a blocking accept.
 */
import type { Logger } from 'pino';
import type { Broker } from '../../broker/broker';
import type { Caller } from '../../broker/broker';
import { type OwnedFd, type SeqpacketSocket, peerCredentials } from '../../kernel';
import { PolledListener } from '../polled';
import { type QmpSessionOptions, type RestoredSession, Session, type SessionOptions } from './session';
import { SliceQueue } from './slices';

export interface HandoffOptions {
  requestTimeoutMs: number;
  attachTimeoutMs: number;
  /** Connections that have not attached yet, at most (uid 0's aside); more are closed at once. */
  maxConnections?: number;
  /** Connections of one uid that have not attached yet, at most. */
  maxConnectionsPerUid?: number;
  /** Callers the two limits above never refuse (uid 0 and admin principals); default: uid 0. */
  privileged?(cred: Caller): boolean;
  /** Attached sessions at most; an ATTACH beyond is refused with EMFILE. */
  maxSessions?: number;
  onAttached?(session: Session): void;
  onSocketClosed?(session: Session): void;
  onQmpClosed?(session: Session): void;
  /** A session is done (and, with a VM, its VMM is gone). */
  onDone?(session: Session): void;
  /** Told of each connection closed at accept (metrics). */
  onRefused?(reason: 'per-uid-limit' | 'limit'): void;
  /** Told of each request to a VMM once it settles (metrics). */
  observeRequest?(kind: string, seconds: number, outcome: string): void;
  /** Hot-plug into passive VMMs that send their QEMU's monitor with their ATTACH. */
  qmp?: QmpSessionOptions;
}

export class HandoffServer {
  readonly #broker: Broker;
  readonly #log: Logger;
  readonly #opts: HandoffOptions;
  readonly sessions = new Set<Session>();
  /** Attached sessions by VM (one per VM: a VM takes one attach). */
  readonly #byVm = new Map<string, Session>();
  /** Connections not attached yet, with the uid they count against (none: privileged). */
  readonly #unattached = new Map<Session, number | undefined>();
  readonly #unattachedPerUid = new Map<number, number>();
  /** Of #unattached, those of callers that are not privileged. */
  #unattachedOthers = 0;
  readonly #polled = new PolledListener(() => this.#accept());
  #nextId = 0;
  /** VMM exits, handled a slice per loop turn. */
  readonly #exits: SliceQueue;

  constructor(broker: Broker, log: Logger, opts: HandoffOptions) {
    this.#broker = broker;
    this.#log = log;
    this.#opts = opts;
    this.#exits = new SliceQueue({ onError: (e) => log.error({ event: 'vmm-exit-failed', err: (e as Error).message }, 'handling a VMM exit failed') });
  }

  async listen(path: string): Promise<void> {
    // A deep backlog, as the API socket's: a flood of connections from one uid is refused at accept, and
    // meanwhile a VMM's connect should find room in the queue.
    await this.#polled.listen(path, { mode: 0o666, backlog: 4096, prepare: (l) => l.passCredentials() });
    this.#log.info({ event: 'handoff-listening', path }, 'handoff socket ready');
  }

  /** Serves on a listening SOCK_SEQPACKET socket systemd passed (socket activation). */
  listenFd(fd: OwnedFd, path: string): void {
    this.#polled.adopt(fd, path, (l) => l.passCredentials());
    this.#log.info({ event: 'handoff-listening', path, activated: true }, 'handoff socket from systemd');
  }

  /** The session attached to a VM, if any. */
  sessionOf(vmId: string): Session | undefined {
    return this.#byVm.get(vmId);
  }

  /** Carries on a session of the previous daemon process (its socket and pidfd from the fd store). */
  restore(sock: SeqpacketSocket, peer: Caller, restored: RestoredSession): Session {
    const session = new Session(++this.#nextId, sock, peer, this.#broker, this.#log, this.#sessionOptions(), restored);
    this.sessions.add(session);
    this.#byVm.set(restored.vmId, session);
    this.#log.info({ event: 'session-restored', session: session.id, vm: restored.vmId, vmm_pid: peer.pid, pidfd: !!restored.pidfd }, 'session carried over a restart');
    return session;
  }

  #sessionOptions(): SessionOptions {
    return {
      requestTimeoutMs: this.#opts.requestTimeoutMs,
      attachTimeoutMs: this.#opts.attachTimeoutMs,
      maxSessions: this.#opts.maxSessions,
      qmp: this.#opts.qmp,
      onClosed: (s) => {
        this.#attachedOrGone(s);
        if (this.#byVm.get(s.vmId) === s) this.#byVm.delete(s.vmId);
        if (this.sessions.delete(s)) this.#opts.onDone?.(s);
      },
      onAttached: (s) => {
        this.#attachedOrGone(s);
        this.#byVm.set(s.vmId, s);
        this.#opts.onAttached?.(s);
      },
      onSocketClosed: (s) => this.#opts.onSocketClosed?.(s),
      onQmpClosed: (s) => this.#opts.onQmpClosed?.(s),
      schedule: (job) => this.#exits.push(job),
      observeRequest: this.#opts.observeRequest,
    };
  }

  #accept(): void {
    const listener = this.#polled.listener;
    if (!listener) return;
    for (;;) {
      let sock;
      try {
        sock = listener.accept();
      } catch (e) {
        // EMFILE and friends: the connection stays queued. The listener is
        // level-triggered, so stop watching it for a moment rather than spin.
        this.#log.error({ event: 'handoff-accept-failed', err: (e as Error).message }, 'accept failed; retrying in 100 ms');
        this.#polled.pause();
        return;
      }
      if (!sock) return;
      let cred;
      try {
        cred = peerCredentials(sock.fd);
      } catch (e) {
        this.#log.warn({ event: 'handoff-no-credentials', err: (e as Error).message }, 'dropping a connection without credentials');
        sock.closeSync();
        continue;
      }
      // Refused before any session exists: the connection costs an accept and a close.
      const privileged = this.#opts.privileged ? this.#opts.privileged(cred) : cred.uid === 0;
      if (!privileged) {
        const mine = this.#unattachedPerUid.get(cred.uid) ?? 0;
        const perUid = this.#opts.maxConnectionsPerUid ?? Number.MAX_SAFE_INTEGER;
        const all = this.#opts.maxConnections ?? Number.MAX_SAFE_INTEGER;
        const reason = mine >= perUid ? 'per-uid-limit' : this.#unattachedOthers >= all ? 'limit' : undefined;
        if (reason) {
          sock.closeSync();
          this.#opts.onRefused?.(reason);
          const limit = reason === 'per-uid-limit' ? perUid : all;
          const flag = reason === 'per-uid-limit' ? '--max-handoff-connections-per-uid' : '--max-handoff-connections';
          this.#log.warn(
            { event: 'handoff-connection-refused', uid: cred.uid, gid: cred.gid, pid: cred.pid, reason, limit },
            `handoff connection refused: ${reason === 'per-uid-limit' ? `uid ${cred.uid} has` : 'there are'} ${reason === 'per-uid-limit' ? mine : this.#unattachedOthers} connections not attached yet (${flag} ${limit})`,
          );
          continue;
        }
      }
      try {
        // The kernel then says who sent each record: an ATTACH must come from the process that connected.
        sock.passCredentials();
      } catch (e) {
        this.#log.warn({ event: 'handoff-no-credentials', err: (e as Error).message }, 'dropping a connection whose records cannot carry credentials');
        sock.closeSync();
        continue;
      }
      const session = new Session(++this.#nextId, sock, cred, this.#broker, this.#log, this.#sessionOptions());
      this.sessions.add(session);
      this.#unattached.set(session, privileged ? undefined : cred.uid);
      if (!privileged) {
        this.#unattachedPerUid.set(cred.uid, (this.#unattachedPerUid.get(cred.uid) ?? 0) + 1);
        this.#unattachedOthers++;
      }
      this.#log.debug({ event: 'session-open', session: session.id, vmm_pid: cred.pid, vmm_uid: cred.uid }, 'handoff connection');
    }
  }

  /** A session leaves the unattached count once: when it attaches, or ends without. */
  #attachedOrGone(s: Session): void {
    if (!this.#unattached.has(s)) return;
    const uid = this.#unattached.get(s);
    this.#unattached.delete(s);
    if (uid === undefined) return;
    const n = (this.#unattachedPerUid.get(uid) ?? 1) - 1;
    if (n > 0) this.#unattachedPerUid.set(uid, n);
    else this.#unattachedPerUid.delete(uid);
    this.#unattachedOthers--;
  }

  /** Stops accepting; sessions stay. */
  async stopAccepting(): Promise<void> {
    await this.#polled.stop();
  }

  /** For daemon shutdown: closes our copies of the session sockets (the fd store may keep its own). */
  closeSessions(): void {
    const all = [...this.sessions];
    this.sessions.clear();
    this.#byVm.clear();
    this.#unattached.clear();
    this.#unattachedPerUid.clear();
    this.#unattachedOthers = 0;
    for (const s of all) s.close();
  }
}
