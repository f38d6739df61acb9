/**
 * The API socket. grpc-js cannot tell who is on the other end of a Unix
 * socket, so the daemon accepts connections itself, reads SO_PEERCRED, and
 * hands each connection to grpc-js through a connection injector. The
 * credentials are found again per call by the peer string, which is the
 * `remoteAddress` this listener gives the socket.
 */
import type { ConnectionInjector } from '@grpc/grpc-js';
import { connect, createServer, type Server as NetServer, type Socket } from 'node:net';
import { chmod, lstat, unlink } from 'node:fs/promises';
import type { Logger } from 'pino';
import type { Caller } from '../broker/broker';
import { type OwnedFd, peerCredentials } from '../kernel';

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

/** The fd under a net.Socket of a Unix connection. */
function socketFd(sock: Socket): number {
  const fd = (sock as unknown as { _handle?: { fd?: number } })._handle?.fd;
  if (typeof fd !== 'number' || fd < 0) throw new Error('accepted socket has no fd');
  return fd;
}

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

export class ApiListener {
  readonly peers = new PeerDirectory();
  readonly #net: NetServer;
  readonly #sockets = new Set<Socket>();
  readonly #log: Logger;

  constructor(injector: ConnectionInjector, log: Logger, maxConnections = 1024) {
    this.#log = log;
    this.#net = createServer((sock) => {
      let key: string;
      try {
        key = this.peers.add(peerCredentials(socketFd(sock)));
      } catch (e) {
        log.warn({ event: 'api-accept-failed', err: (e as Error).message }, 'dropping an API connection without credentials');
        sock.destroy();
        return;
      }
      Object.defineProperty(sock, 'remoteAddress', { value: key, configurable: true });
      this.#sockets.add(sock);
      sock.once('close', () => {
        this.#sockets.delete(sock);
        this.peers.remove(key);
      });
      injector.injectConnection(sock);
    });
    // Beyond the limit Node closes new connections at once (the client sees UNAVAILABLE and retries).
    this.#net.maxConnections = maxConnections;
    this.#net.on('drop', () => log.warn({ event: 'api-connection-dropped', limit: maxConnections }, 'API connection refused: --max-api-connections reached'));
    this.#net.on('error', (e) => log.error({ event: 'api-listener-error', err: e.message }, 'API listener error'));
  }

  async listen(path: string, mode = 0o666): Promise<void> {
    await clearStaleSocket(path);
    await new Promise<void>((resolve, reject) => {
      this.#net.once('error', reject);
      this.#net.listen(path, () => {
        this.#net.off('error', reject);
        resolve();
      });
    });
    // Anyone may connect: SO_PEERCRED and the policy decide what they may do.
    await chmod(path, mode);
    this.#log.info({ event: 'api-listening', path }, 'API socket ready');
  }

  /** Serves on a listening socket systemd passed (socket activation); its path and mode are the unit's. */
  async listenFd(fd: OwnedFd): Promise<void> {
    const n = fd.release();
    await new Promise<void>((resolve, reject) => {
      this.#net.once('error', reject);
      this.#net.listen({ fd: n }, () => {
        this.#net.off('error', reject);
        resolve();
      });
    });
    this.#log.info({ event: 'api-listening', fd: n, activated: true }, 'API socket from systemd');
  }

  get connections(): number {
    return this.#sockets.size;
  }

  /**
   * Stops accepting; open connections stay until grpc-js drains them.
   * net.Server.close() calls back only once every connection has ended, so
   * its callback is not awaited: the caller's grace period bounds the rest.
   */
  stopAccepting(): void {
    this.#net.close();
  }

  destroyConnections(): void {
    for (const s of this.#sockets) s.destroy();
  }
}
