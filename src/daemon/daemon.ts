/**
 * Puts the daemon together — kernel, broker, server — and takes it apart
 * again: start() opens /dev/kvm, probes it and binds the API socket;
 * stop() refuses new calls, lets calls in flight finish within the grace
 * time, and closes every fd the daemon owns.
 */
import { Server, ServerCredentials } from '@grpc/grpc-js';
import { HealthImplementation } from 'grpc-health-check';
import { ReflectionService } from '@grpc/reflection';
import { constants, existsSync, open as fsOpen } from 'node:fs';
import { join } from 'node:path';
import { mkdir } from 'node:fs/promises';
import type { Logger } from 'pino';
import { loadApi } from '../api/proto';
import { Broker } from '../broker/broker';
import { type HostFacts, learnHost } from '../broker/host';
import { GroupPool } from '../broker/pool';
import { VmRegistry } from '../broker/vms';
import { TokenStore } from '../broker/tokens';
import type { VmmHost } from '../broker/vmm';
import { Kvm, OwnedFd, SysError, VfioGroup, listOpenFds, setMemlockLimit } from '../kernel';
import { HandoffServer } from '../server/session/handoff';
import { RootOnly } from '../server/auth';
import { ApiListener } from '../server/listener';
import { createService } from '../server/service';
import { type DaemonConfig, apiSocketPath, handoffSocketPath } from './config';

export const SERVICE_NAME = 'kvmvfio.v1.KvmVfio';
/** gRPC messages above this are refused (RESOURCE_EXHAUSTED): no request needs more. */
export const MAX_MESSAGE_BYTES = 64 * 1024;

export class Daemon {
  readonly config: DaemonConfig;
  readonly log: Logger;
  #kvm?: Kvm;
  #pool?: GroupPool;
  #broker?: Broker;
  #grpc?: Server;
  #listener?: ApiListener;
  #handoff?: HandoffServer;
  #health?: HealthImplementation;
  #endWatches: () => void = () => {};
  #stopping?: Promise<void>;
  host?: HostFacts;

  constructor(config: DaemonConfig, log: Logger) {
    this.config = config;
    this.log = log;
  }

  get broker(): Broker {
    if (!this.#broker) throw new Error('daemon not started');
    return this.#broker;
  }

  async start(): Promise<void> {
    const { config, log } = this;
    this.#kvm = Kvm.open(config.devRoot);
    this.host = await learnHost(this.#kvm, config.devRoot);
    log.info({ event: 'host', ...this.host }, 'kernel probed');
    if (existsSync(config.policy)) {
      log.warn({ event: 'policy-ignored', path: config.policy }, 'policy files are not supported by this version; only uid 0 may call');
    }

    this.#pool = new GroupPool({
      sysfsRoot: config.sysfsRoot,
      devRoot: config.devRoot,
      openGroup: (path, n) => VfioGroup.open(path, n),
      onStatusUnavailable: (group, err) =>
        log.warn({ event: 'group-status-unavailable', group, err: err.message }, 'not a VFIO group node; trusting sysfs'),
    });
    const kvm = this.#kvm;
    const host: VmmHost = {
      dupKvm: () => kvm.dup(),
      openContainer: async () => {
        const path = join(config.devRoot, 'vfio', 'vfio');
        if (!existsSync(path)) return null;
        return new Promise<OwnedFd>((resolve, reject) =>
          fsOpen(path, constants.O_RDWR | 0o2000000, (err, fd) => (err ? reject(SysError.fromNode('open', path, err)) : resolve(new OwnedFd(fd, path)))),
        );
      },
      setMemlock: (pid, bytes) => void setMemlockLimit(pid, BigInt(bytes)),
    };
    this.#broker = new Broker(this.#pool, new VmRegistry(), {
      tokens: new TokenStore(config.tokenTtlMs),
      host,
      exitGraceMs: config.vmmExitGraceMs,
      log: (event, msg) => log.info(event, msg),
    });

    const { definition, proto } = loadApi();
    this.#grpc = new Server({
      'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
      'grpc.max_send_message_length': 16 * 1024 * 1024,
    });
    const service = createService({
      broker: this.#broker,
      host: this.host,
      authorizer: new RootOnly(),
      peers: (p) => this.#listener?.peers.lookup(p),
      log,
    });
    this.#endWatches = service.endWatches;
    this.#grpc.addService(proto.kvmvfio.v1.KvmVfio.service, service.handlers);
    this.#health = new HealthImplementation({ '': 'SERVING', [SERVICE_NAME]: 'SERVING' });
    this.#health.addToServer(this.#grpc);
    new ReflectionService(definition).addToServer(this.#grpc);

    await mkdir(config.runtimeDir, { recursive: true, mode: 0o755 });
    this.#listener = new ApiListener(this.#grpc.createConnectionInjector(ServerCredentials.createInsecure()), log);
    await this.#listener.listen(apiSocketPath(config));
    this.#handoff = new HandoffServer(this.#broker, log, { requestTimeoutMs: config.vmmTimeoutMs, attachTimeoutMs: config.attachTimeoutMs });
    await this.#handoff.listen(handoffSocketPath(config));
  }

  /** Idempotent; resolves when every fd the daemon owns is closed. */
  stop(): Promise<void> {
    this.#stopping ??= this.#stop();
    return this.#stopping;
  }

  async #stop(): Promise<void> {
    const { log } = this;
    const t0 = Date.now();
    this.#broker?.beginShutdown();
    this.#health?.setStatus('', 'NOT_SERVING');
    this.#health?.setStatus(SERVICE_NAME, 'NOT_SERVING');
    this.#listener?.stopAccepting();
    await this.#handoff?.stopAccepting();
    this.#endWatches();
    if (this.#grpc) {
      const grpc = this.#grpc;
      const finished = new Promise<boolean>((resolve) => grpc.tryShutdown(() => resolve(true)));
      const timer = new Promise<boolean>((resolve) => setTimeout(() => resolve(false), this.config.shutdownGraceMs).unref());
      if (!(await Promise.race([finished, timer]))) {
        log.warn({ event: 'shutdown-forced', graceMs: this.config.shutdownGraceMs }, 'calls still in flight; closing their connections');
        grpc.forceShutdown();
      }
    }
    this.#listener?.destroyConnections();
    // VMs live in their VMMs: closing the sessions ends no guest, but without
    // a daemon their VMMs take no more requests.
    this.#handoff?.closeSessions();
    await this.#pool?.closeAll();
    await this.#kvm?.close();
    // What is still open after cleanup is Node's own (epoll, eventfd, stdio);
    // logged so a leak of ours shows (and is tested).
    log.info({ event: 'stopped', ms: Date.now() - t0, fds: await listOpenFds() }, 'kvmvfiod stopped');
  }
}
