/**
 * Puts the daemon together — kernel, broker, server — and takes it apart
 * again: start() opens /dev/kvm, probes it and binds the API socket;
 * stop() refuses new calls, lets calls in flight finish within the grace
 * time, and closes every fd the daemon owns.
 */
import { Server, ServerCredentials } from '@grpc/grpc-js';
import { HealthImplementation } from 'grpc-health-check';
import { ReflectionService } from '@grpc/reflection';
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
import { type LoadedState, StateStore, StoreTooNewError, loadState, prepareStateDir, setAsideLegacy, setAsideStore } from '../broker/store';
import { ROOT_NAME } from '../broker/policy';
import type { VmRecord } from '../broker/vms';
import { Kvm, OwnedFd, SeqpacketSocket, SysError, peerCredentials, Systemd, VfioGroup, watchProcessExit, fdLimits, listOpenFds, openFdCount, presizeFdTable, setMemlockLimit, takeListenFds } from '../kernel';
import { FdStore, fdName } from './fdstore';
import { HandoffServer } from '../server/session/handoff';
import { PolicyAuthorizer } from '../server/auth';
import { readAccounts } from '../broker/accounts';
import { ResourceExhaustedError } from '../broker/errors';
import { Policy, PolicyError } from '../broker/policy';
import { type Admission, ApiListener } from '../server/listener';
import { createService } from '../server/service';
import { Metrics, serveMetrics } from '../server/metrics';
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
  #store?: FdStore;
  #authorizer?: PolicyAuthorizer;
  #state?: StateStore;
  /** What stop() could not save; stop() throws when it is set. */
  #unsavedAtStop?: { unsaved: number; errno?: string };
  #stateFailureLog?: NodeJS.Timeout;
  #watchdog?: NodeJS.Timeout;
  #statusTimer?: NodeJS.Timeout;
  host?: HostFacts;
  /** Set at start(); read by GetMetrics and --metrics-address. */
  metrics!: Metrics;
  #metricsServer?: import('node:http').Server;

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
    // Up to the fds the daemon may use, so the table never grows (and stalls the loop) under load.
    presizeFdTable(Math.min(fdLimits().soft, 1 << 16));
    const passed = takeListenFds();
    const take = (name: string): OwnedFd | undefined => {
      const list = passed.get(name);
      const fd = list?.shift();
      if (list && list.length === 0) passed.delete(name);
      return fd;
    };
    const store = (this.#store = new FdStore(log));
    if (passed.size) log.info({ event: 'fds-from-systemd', names: [...passed.keys()].slice(0, 50), count: [...passed.values()].reduce((a, l) => a + l.length, 0) }, 'fds passed by systemd');

    const storedKvm = take(fdName.kvm);
    this.#kvm = storedKvm ? Kvm.fromFd(storedKvm, join(config.devRoot, 'kvm')) : Kvm.open(config.devRoot);
    if (!storedKvm) store.put(fdName.kvm, this.#kvm.fd);
    this.host = await learnHost(this.#kvm, config.devRoot);
    log.info({ event: 'host', ...this.host }, 'kernel probed');
    const policy = (await Policy.load(config.policy, readAccounts())) ?? Policy.rootOnly();
    this.#authorizer = new PolicyAuthorizer(policy);
    log.info({ event: 'policy', source: policy.source, principals: policy.principalCount }, policy.source === 'none' ? 'no policy file: only uid 0 may call' : 'policy loaded');

    this.#pool = new GroupPool({
      sysfsRoot: config.sysfsRoot,
      devRoot: config.devRoot,
      openGroup: (path, n) => VfioGroup.open(path, n),
      watchExit: watchProcessExit,
      onStray: (group, hold) => this.#broker?.groupStrayChanged(group, hold.owner.vmId, hold),
      onStrayReturned: (group, owner) => this.#broker?.groupStrayChanged(group, owner.vmId),
      log: (event, msg) => log.info(event, msg),
      onStatusUnavailable: (group, err) =>
        log.warn({ event: 'group-status-unavailable', group, err: err.message }, 'not a VFIO group node; trusting sysfs'),
      onOpened: (group, handle) => {
        store.put(fdName.group(group), (handle as VfioGroup).fd);
        this.#state?.claimChanged(group);
      },
      onClosed: (group) => store.remove(fdName.group(group)),
      onClaimsChanged: (groups) => {
        for (const g of groups) this.#state?.claimChanged(g);
      },
    });
    let fdCheck = { at: 0, open: 0, soft: 0, calls: 0 };
    const kvm = this.#kvm;
    const host: VmmHost = {
      lendKvm: () => kvm.lend(),
      // Both opens only allocate (a container, an iommufd context): on the loop, without a thread-pool round trip.
      openContainer: async () => {
        const path = join(config.devRoot, 'vfio', 'vfio');
        try {
          return OwnedFd.openDevice(path);
        } catch (e) {
          if (e instanceof SysError && e.code === 'ENOENT') return null;
          throw e;
        }
      },
      openIommufd: async () => OwnedFd.openDevice(join(config.devRoot, 'iommu')),
      setMemlock: (pid, bytes) => void setMemlockLimit(pid, BigInt(bytes)),
    };
    this.#broker = new Broker(this.#pool, new VmRegistry(), {
      tokens: new TokenStore(config.tokenTtlMs),
      host,
      exitGraceMs: config.vmmExitGraceMs,
      maxVms: config.maxVms,
      fdGuard: async () => {
        // Listing /proc/self/fd costs more than the rest of an attach (5 ms at 9,000 fds): list again
        // only after 1 s, or sooner once the calls since the last listing could have used half the
        // headroom (an attach or a create opens a few fds; the margin absorbs the rest).
        const now = Date.now();
        const headroom = fdCheck.soft - config.fdMargin - fdCheck.open;
        if (now - fdCheck.at > 1000 || ++fdCheck.calls * 8 > headroom / 2) {
          fdCheck = { at: now, open: await openFdCount(), soft: fdLimits().soft, calls: 0 };
        }
        if (fdCheck.open > fdCheck.soft - config.fdMargin) {
          throw new ResourceExhaustedError(`kvmvfiod has ${fdCheck.open} fds open; RLIMIT_NOFILE is ${fdCheck.soft} and ${config.fdMargin} are kept free (--fd-margin)`);
        }
      },
      log: (event, msg) => log.info(event, msg),
      onVmmGone: (vmId) => this.#state?.sessionChanged(vmId),
      // The policy in force now (a SIGHUP swaps it), not the one of the call that made the VM.
      principalNamed: (name) => this.#authorizer?.policy.principalNamed(name),
    });
    const broker = this.#broker;
    const pool = this.#pool;
    this.metrics = new Metrics({
      vmsByState: () => {
        const by: Record<string, number> = {};
        for (const vm of broker.vms.all()) by[vm.state] = (by[vm.state] ?? 0) + 1;
        return by;
      },
      groupsByHolding: async () => {
        const by: Record<string, number> = {};
        for (const g of await broker.listGroups()) by[g.holding] = (by[g.holding] ?? 0) + 1;
        return by;
      },
      sessions: () => broker.sessionCount,
      pendingTokens: () => broker.tokens.pending,
      stateWritable: () => !this.#state?.failure,
    });
    // The store reads each entry it writes from here, when it writes it.
    this.#state = new StateStore(
      config.stateDir,
      {
        revision: () => broker.vms.revision,
        vm: (id) => broker.vms.get(id),
        claim: (group) => pool.claimOf(group),
        session: (vmId) => {
          // Carried over a restart while the VMM's pidfd is open (its socket may have closed).
          const s = this.#handoff?.sessionOf(vmId);
          if (!s?.storableFds) return undefined;
          return { vmId, pid: s.peer.pid, uid: s.peer.uid, gid: s.peer.gid, passive: s.passive, ...(s.edition2 ? { edition2: true } : {}) };
        },
        ids: () => ({
          vms: [...broker.vms.all()].map((vm) => vm.id),
          claims: pool.claims().map((c) => c.group),
          sessions: [...(this.#handoff?.sessions ?? [])].filter((s) => s.vmId).map((s) => s.vmId),
        }),
      },
      {
        onWriteFailed: (e, first) => {
          if (!first) return;
          log.error({ event: 'state-write-failed', errno: e.errno, err: e.message, path: config.stateDir }, 'the state cannot be written; mutating calls are refused until it can');
          this.#health?.setStatus(SERVICE_NAME, 'NOT_SERVING');
          // One line a minute while it lasts, not one per retry.
          clearInterval(this.#stateFailureLog);
          this.#stateFailureLog = setInterval(() => {
            const f = this.#state?.failure;
            if (f) log.error({ event: 'state-write-still-failing', errno: f.errno, unsaved: this.#state?.unsaved }, 'the state still cannot be written');
          }, 60_000);
          this.#stateFailureLog.unref();
        },
        onRecovered: (info) => {
          clearInterval(this.#stateFailureLog);
          log.info({ event: 'state-write-recovered', failed_ms: info.failedForMs, attempts: info.attempts }, 'the state is written again; accepting changes');
          if (!this.#broker?.closing) this.#health?.setStatus(SERVICE_NAME, 'SERVING');
        },
        onWarning: (event, msg) => log.warn(event, msg),
        onCommit: (seconds, errno) => {
          if (errno) this.metrics.stateCommitFailures.inc({ errno });
          else this.metrics.stateCommitSeconds.observe(seconds);
        },
      },
    );
    broker.vms.subscribe((change) => this.#state?.vmChanged(change.vm.id));

    const { definition, proto } = loadApi();
    this.#grpc = new Server({
      'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
      'grpc.max_send_message_length': 16 * 1024 * 1024,
      // Applies to injected connections too (grpc-js runs its session handler on the injector's
      // HTTP/2 server): counted from the connection's start, so one that never completes the
      // handshake is closed as well; a connection with a call or watch in flight is not idle.
      'grpc.max_connection_idle_ms': config.apiIdleTimeoutMs,
    });
    const service = createService({
      broker: this.#broker,
      host: this.host,
      authorizer: this.#authorizer,
      callTimeoutMs: config.callTimeoutMs,
      maxWatchesPerUid: config.maxWatchesPerUid,
      peers: (p) => this.#listener?.peers.lookup(p),
      durability: this.#state,
      metrics: this.metrics,
      log,
    });
    this.#endWatches = service.endWatches;
    this.#grpc.addService(proto.kvmvfio.v1.KvmVfio.service, service.handlers);
    this.#health = new HealthImplementation({ '': 'SERVING', [SERVICE_NAME]: 'SERVING' });
    this.#health.addToServer(this.#grpc);
    new ReflectionService(definition).addToServer(this.#grpc);

    this.#handoff = new HandoffServer(this.#broker, log, {
      requestTimeoutMs: config.vmmTimeoutMs,
      attachTimeoutMs: config.attachTimeoutMs,
      maxConnections: config.maxHandoffConnections,
      maxConnectionsPerUid: config.maxHandoffConnectionsPerUid,
      privileged: (cred) => this.#admit(cred) === 'privileged',
      maxSessions: config.maxSessions,
      onRefused: (reason) => this.metrics.refusals.inc({ socket: 'handoff', reason }),
      observeRequest: (kind, seconds, outcome) => this.metrics.sessionRequestSeconds.observe({ kind, outcome }, seconds),
      onAttached: (s) => {
        const fds = s.storableFds;
        if (fds) {
          if (fds.socket !== undefined) store.put(fdName.session(s.vmId), fds.socket);
          store.put(fdName.pidfd(s.vmId), fds.pidfd);
          if (fds.qmp !== undefined) store.put(fdName.qmp(s.vmId), fds.qmp);
        }
        this.#state?.sessionChanged(s.vmId);
      },
      onQmpClosed: (s) => store.remove(fdName.qmp(s.vmId)),
      onSocketClosed: (s) => {
        store.remove(fdName.session(s.vmId));
        this.#state?.sessionChanged(s.vmId);
      },
      onDone: (s) => {
        if (s.vmId) {
          store.remove(fdName.session(s.vmId));
          store.remove(fdName.pidfd(s.vmId));
          store.remove(fdName.qmp(s.vmId));
          this.#state?.sessionChanged(s.vmId);
        }
      },
      qmp: { commandTimeoutMs: config.vmmTimeoutMs, unplugTimeoutMs: config.hotUnplugTimeoutMs, openIommufd: host.openIommufd },
    });

    const legacyFiles = await this.#restore(take, storedKvm !== undefined);
    this.#keepOrphans(passed, take);
    // From here on every change is committed: first the whole state as restored, in one transaction.
    await this.#state.open(legacyFiles);

    await mkdir(config.runtimeDir, { recursive: true, mode: 0o755 });
    this.#listener = new ApiListener(this.#grpc.createConnectionInjector(ServerCredentials.createInsecure()), log, {
      maxConnections: config.maxApiConnections,
      maxConnectionsPerUid: config.maxApiConnectionsPerUid,
      admit: (cred) => this.#admit(cred),
      onRefused: (reason) => this.metrics.refusals.inc({ socket: 'api', reason }),
    });
    const api = take('api');
    if (api) await this.#listener.listenFd(api);
    else await this.#listener.listen(apiSocketPath(config));
    const handoff = take('handoff');
    if (handoff) this.#handoff.listenFd(handoff, handoffSocketPath(config));
    else await this.#handoff.listen(handoffSocketPath(config));
    await this.#state.durable();
    if (config.metrics) {
      this.#metricsServer = await serveMetrics(this.metrics, config.metrics.host, config.metrics.port);
      log.info({ event: 'metrics-listening', host: config.metrics.host, port: config.metrics.port }, `metrics at http://${config.metrics.host.includes(':') ? `[${config.metrics.host}]` : config.metrics.host}:${config.metrics.port}/metrics`);
    }
    this.#notifyReady();
  }

  /**
   * Rebuilds the records of the previous process from the state store (or
   * the files of version 2) and the fds systemd kept. Without the kept fds
   * (no systemd, or `systemctl stop` flushed the store) there is nothing to
   * carry on: the old state is set aside and the daemon starts empty.
   * Returns the version-2 files to rename once the store holds their state.
   */
  async #restore(take: (name: string) => OwnedFd | undefined, haveStore: boolean): Promise<string[]> {
    const { log, config } = this;
    const store = this.#store!;
    await prepareStateDir(config.stateDir);
    let loaded: LoadedState;
    try {
      loaded = await loadState(config.stateDir, (event, msg) => log.warn(event, msg));
    } catch (e) {
      if (e instanceof StoreTooNewError) throw e;
      // A version-2 snapshot that cannot be understood: kept aside rather than overwritten.
      const files = await setAsideLegacy(config.stateDir).catch(() => []);
      log.error({ event: 'state-unreadable', path: config.stateDir, err: (e as Error).message, files }, 'state unreadable; set aside, starting empty');
      return [];
    }
    if (loaded.from === 'version-2') log.info({ event: 'state-migrating', files: loaded.legacyFiles, vms: loaded.state?.vms.length }, 'a version-2 state: moving it into the store');
    const previous = loaded.state;
    if (!previous) return [];
    if (!haveStore) {
      const files = loaded.from === 'store' ? await setAsideStore(config.stateDir) : await setAsideLegacy(config.stateDir);
      log.warn(
        { event: 'state-set-aside', files, vms: previous.vms.length, sessions: previous.sessions.length },
        'a previous state without its stored fds: its VMs and sessions cannot be carried on; starting empty',
      );
      return [];
    }
    const t0 = Date.now();
    const broker = this.broker;
    const pool = this.#pool!;
    broker.vms.restore(previous.vms, previous.revision);
    const withSession = new Set(previous.sessions.map((s) => s.vmId));
    for (const c of previous.claims) {
      const fd = this.#storedGroup(c.group, take);
      // Written before holds were recorded: the daemon lent its own fd to any VMM that attached (the
      // plan, a passive attach), so a VM that ever had one may share that file: never adopt it then.
      const vm = broker.vms.get(c.vmId);
      const holding = c.holding ?? ((vm?.vmmPid ?? 0) > 0 || vm?.state !== 'PENDING' || withSession.has(c.vmId) ? 'vmm' : 'claimed');
      if (holding === 'claimed' && c.mode !== 'cdev') {
        if (fd) pool.adopt(c.group, new VfioGroup(fd, c.group, pool.groupPath(c.group)));
      } else if (fd) {
        // The daemon keeps no copy of a group a VMM was given (an old daemon's loan): closed, and out of the store.
        fd.closeSync();
        store.remove(fdName.group(c.group));
      }
      pool.restoreHold(c.group, { holding, owner: { vmId: c.vmId, vmName: c.vmName }, holders: c.holders, since: c.since, ...(c.mode === 'cdev' ? { mode: 'cdev' as const } : {}) });
      if (holding === 'claimed' && c.mode !== 'cdev' && !fd && !(await pool.reopen(c.group))) {
        log.warn({ event: 'group-not-reopened', group: c.group, vm: c.vmId }, 'a claimed group did not come back from the fd store and could not be opened again');
      }
    }
    let sessions = 0;
    for (const s of previous.sessions) {
      const vm = broker.vms.get(s.vmId);
      // A session whose record was lost: its fds stay in `passed`, for #keepOrphans.
      if (!vm) continue;
      const sock = take(fdName.session(s.vmId));
      const pidfd = take(fdName.pidfd(s.vmId));
      this.#carryOn(vm, sock, pidfd, { pid: s.pid, uid: s.uid, gid: s.gid }, s.passive, s.edition2 === true, take(fdName.qmp(s.vmId)));
      sessions++;
    }
    // Groups handed to VMMs that exited while no daemon ran: looked at now.
    await broker.reconcileHolds();
    log.info({ event: 'restored', vms: previous.vms.length, claims: previous.claims.length, sessions, ms: Date.now() - t0 }, 'state carried over a restart');
    return loaded.legacyFiles;
  }

  /** Carries on the session of `vm` with the fds the store kept: its socket (if still open), its VMM's pidfd, its QEMU's monitor. */
  #carryOn(vm: VmRecord, sock: OwnedFd | undefined, pidfd: OwnedFd | undefined, peer: { pid: number; uid: number; gid: number }, passive: boolean, edition2: boolean, qmp?: OwnedFd): void {
    // A VMM whose socket was already closed still holds its groups: watch it through a closed pair.
    let socket: SeqpacketSocket;
    if (sock) socket = new SeqpacketSocket(sock, `session of vm ${vm.name}`);
    else {
      const [mine, other] = SeqpacketSocket.pair(`closed session of vm ${vm.name}`);
      other.closeSync();
      socket = mine;
    }
    const session = this.#handoff!.restore(socket, peer, { vmId: vm.id, vmName: vm.name, passive, edition2, pidfd, qmp });
    this.broker.restoreLink(vm.id, session);
  }

  /**
   * The fd store's copy of group `n`, if it is still the file at /dev/vfio/N:
   * a group that went away (a device unplugged while the daemon was down) or
   * was made again under its number is another file, and an old fd must not
   * stand for it. Such a copy is closed and leaves the store.
   */
  #storedGroup(n: number, take: (name: string) => OwnedFd | undefined): OwnedFd | undefined {
    const fd = take(fdName.group(n));
    if (!fd) return undefined;
    const path = this.#pool!.groupPath(n);
    if (fd.isOpenOf(path)) return fd;
    this.log.warn({ event: 'fdstore-group-gone', group: n, path }, `the stored fd of IOMMU group ${n} is not the file at ${path} any more (the group went away or was made again); closing it`);
    fd.closeSync();
    this.#store!.remove(fdName.group(n));
    return undefined;
  }

  /**
   * Fds the fd store kept that the state does not name: the state was
   * damaged, or the daemon died between a change and its commit. None is
   * closed — a session is a VM living in its VMM, a group fd a claim (unless
   * it is no longer the file at /dev/vfio/N: #storedGroup) — and each is
   * reported. A session of a known VM is carried on (a VM still
   * PENDING in its record is failed: its set-up was cut short); one of an
   * unknown VM gets a record of its own, RUNNING, owned by root, named
   * recovered-<id>, labelled kvmvfiod.io/recovered. A group fd goes to the
   * PENDING VM whose plan lists it, or else to a FAILED record recovered-
   * group-<N> that holds it until DeleteVm.
   */
  #keepOrphans(passed: Map<string, OwnedFd[]>, take: (name: string) => OwnedFd | undefined): void {
    const { log } = this;
    const broker = this.broker;
    const pool = this.#pool!;
    const recovered = (id: string, name: string, state: 'RUNNING' | 'FAILED', reason: string, extra: Partial<VmRecord>): VmRecord => {
      const now = new Date().toISOString();
      const rec: VmRecord = {
        id,
        seq: broker.vms.revision + 1,
        name,
        labels: { 'kvmvfiod.io/recovered': 'fd-store' },
        ownerUid: 0,
        vmmUid: 0,
        state,
        vfioDevice: false,
        groups: [],
        memlockBytes: 0,
        requestId: '',
        principal: ROOT_NAME,
        requestFingerprint: '',
        createTime: now,
        updateTime: now,
        failureReason: reason,
        revision: broker.vms.revision + 1,
        vmmPid: 0,
        passive: false,
        strayGroups: [],
        handoff: 'group',
        ...extra,
      };
      broker.vms.restore([rec], rec.revision);
      return broker.vms.get(id)!;
    };
    for (const name of [...passed.keys()]) {
      const m = /^(?:session|pidfd)-(.+)$/.exec(name);
      if (!m || this.#handoff!.sessionOf(m[1])) continue;
      const vmId = m[1];
      const sock = take(fdName.session(vmId));
      const pidfd = take(fdName.pidfd(vmId));
      let peer = { pid: 0, uid: 0, gid: 0 };
      try {
        if (sock) peer = peerCredentials(sock.fd);
      } catch {
        // A socket whose peer is gone still carries the VMM's pidfd, if there is one.
      }
      let vm = broker.vms.get(vmId);
      if (!vm) vm = recovered(vmId, `recovered-${vmId.slice(0, 8)}`, 'RUNNING', '', { vmmUid: peer.uid, vmmPid: peer.pid });
      // Its edition is not known: edition 1, the lenient one.
      this.#carryOn(vm, sock, pidfd, peer, vm.passive, false, take(fdName.qmp(vmId)));
      log.warn({ event: 'state-orphan-session', vm: vm.id, name: vm.name, vmm_pid: peer.pid, vmm_uid: peer.uid, socket: !!sock, pidfd: !!pidfd }, 'the fd store holds a session the state does not name; carrying it on');
    }
    for (const name of [...passed.keys()]) {
      const m = /^group-(\d+)$/.exec(name);
      if (!m) continue;
      const group = Number(m[1]);
      const fd = this.#storedGroup(group, take);
      if (!fd) continue;
      let owner = [...broker.vms.all()].find((v) => v.state === 'PENDING' && v.groups.includes(group) && !pool.holdOf(group));
      owner ??= recovered(broker.vms.newId(), `recovered-group-${group}`, 'FAILED', `the fd store held IOMMU group ${group} and the state had no claim on it; DeleteVm releases it`, { groups: [group] });
      pool.adopt(group, new VfioGroup(fd, group, pool.groupPath(group)));
      pool.restoreHold(group, { holding: 'claimed', owner: { vmId: owner.id, vmName: owner.name } });
      log.warn({ event: 'state-orphan-group', group, vm: owner.id, name: owner.name }, 'the fd store holds a group the state does not name; keeping it claimed');
    }
    for (const [name, fds] of passed) {
      if (name === 'api' || name === 'handoff') continue;
      // Nothing carried it on: a name the daemon never uses, or the QMP channel of a session that did not come back.
      log.warn({ event: 'fdstore-unknown', name, count: fds.length }, 'a stored fd nothing carries on; closing it');
      for (const fd of fds) fd.closeSync();
      this.#store!.remove(name);
    }
  }

  /**
   * How the connection limits treat a caller, by the current policy: uid 0
   * and admin principals are privileged (never refused by a limit); with a
   * policy file, a uid no principal names is a stranger (closed at accept);
   * without one, non-root callers may connect, within the limits, and are
   * told PERMISSION_DENIED per call.
   */
  #admit(cred: { uid: number; gid: number }): Admission {
    if (cred.uid === 0) return 'privileged';
    const policy = this.#authorizer!.policy;
    const principal = policy.principalOf(cred);
    if (principal?.admin) return 'privileged';
    return !principal && policy.source !== 'none' ? 'stranger' : 'tenant';
  }

  #notifyReady(): void {
    const usec = Systemd.watchdogUsec();
    if (usec > 0) {
      // From the event loop, at half the interval: a stuck loop stops the pings and systemd acts.
      this.#watchdog = setInterval(() => Systemd.notify('WATCHDOG=1'), Math.max(1, Math.floor(usec / 2000)));
      this.#watchdog.unref();
    }
    Systemd.notify(`READY=1\nSTATUS=${this.statusLine()}`);
    this.#statusTimer = setInterval(() => Systemd.notify(`STATUS=${this.statusLine()}`), 5000);
    this.#statusTimer.unref();
  }

  /** "3 VMs (2 running), 2 groups claimed, 2 sessions" */
  statusLine(): string {
    const b = this.#broker;
    if (!b) return 'starting';
    let running = 0;
    for (const vm of b.vms.all()) if (vm.state === 'RUNNING') running++;
    return `${b.vms.size} VMs (${running} running), ${b.pool.claimedCount} groups claimed, ${b.sessionCount} sessions`;
  }

  /**
   * SIGHUP: reads the policy file again. A file that does not validate keeps
   * the old policy (and says why); a good one applies to calls from now on.
   */
  async reloadPolicy(): Promise<boolean> {
    const { log, config } = this;
    try {
      const next = (await Policy.load(config.policy, readAccounts())) ?? Policy.rootOnly();
      this.#authorizer!.policy = next;
      log.info({ event: 'policy-reloaded', source: next.source, principals: next.principalCount }, 'policy reloaded');
      return true;
    } catch (e) {
      const problems = e instanceof PolicyError ? e.problems : [(e as Error).message];
      log.error({ event: 'policy-reload-failed', path: config.policy, problems }, 'the new policy is not valid; keeping the old one');
      return false;
    }
  }

  /** Idempotent; resolves when every fd the daemon owns is closed. */
  stop(): Promise<void> {
    this.#stopping ??= this.#stop();
    return this.#stopping;
  }

  async #stop(): Promise<void> {
    const { log } = this;
    const t0 = Date.now();
    // What closes from here on stays in systemd's fd store for the next start.
    this.#store?.freeze();
    Systemd.notify('STOPPING=1\nSTATUS=stopping');
    clearInterval(this.#watchdog);
    clearInterval(this.#statusTimer);
    this.#broker?.beginShutdown();
    this.#health?.setStatus('', 'NOT_SERVING');
    this.#health?.setStatus(SERVICE_NAME, 'NOT_SERVING');
    await this.#listener?.stopAccepting();
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
    if (this.#metricsServer) {
      const server = this.#metricsServer;
      await new Promise<void>((r) => {
        server.close(() => r());
        server.closeAllConnections();
      });
    }
    // What closes from here on (sessions, groups) stays in the fd store, and in the state store.
    clearInterval(this.#stateFailureLog);
    const saved = await this.#state?.close();
    if (saved?.unsaved) this.#unsavedAtStop = { unsaved: saved.unsaved, errno: saved.error?.errno };
    // VMs live in their VMMs: closing the sessions ends no guest, but without
    // a daemon their VMMs take no more requests.
    this.#handoff?.closeSessions();
    await this.#pool?.closeAll();
    await this.#kvm?.close();
    // What is still open after cleanup is Node's own (epoll, eventfd, stdio);
    // logged so a leak of ours shows (and is tested).
    log.info({ event: 'stopped', ms: Date.now() - t0, fds: await listOpenFds() }, 'kvmvfiod stopped');
    if (this.#unsavedAtStop) {
      const { unsaved, errno } = this.#unsavedAtStop;
      log.error({ event: 'state-not-saved', unsaved, errno }, `stopped with ${unsaved} changes to the state not saved (${errno ?? 'unknown error'})`);
      throw new Error(`${unsaved} changes to the state were not saved (${errno ?? 'unknown error'})`);
    }
  }
}
