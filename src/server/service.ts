/**
 * The KvmVfio gRPC service: thin adapters from requests to the broker.
 * Every handler goes through `unary`/`stream`, which find the caller (peer
 * credentials of its connection), authorize it, log mutating calls and map
 * errors to statuses. Handlers themselves only validate and convert.
 */
import { type ServerUnaryCall, type ServerWritableStream, type sendUnaryData, status as Status } from '@grpc/grpc-js';
import type { Logger } from 'pino';
import type { Broker, Caller } from '../broker/broker';
import { vmMatcher } from '../broker/broker';
import { DeadlineExceededError, ResourceExhaustedError, UnavailableError } from '../broker/errors';
import { type HostFacts, snapshot } from '../broker/host';
import type { VmChange } from '../broker/vms';
import type { KvmVfioHandlers } from '../generated/kvmvfio/v1/KvmVfio';
import type { VmEvent } from '../generated/kvmvfio/v1/VmEvent';
import { DAEMON_VERSION } from '../version';
import type { Authorizer } from './auth';
import { groupMessage, tokenMessage, vmMessage } from './convert';
import type { Metrics } from './metrics';
import { encodePageToken } from './pagetoken';
import { type MappedStatus, toServiceError, toStatus } from './status';
import * as validate from './validate';

/** Resolves the peer string grpc-js gives a call to the credentials taken at accept. */
export type PeerLookup = (peer: string) => Caller | undefined;

export interface ServiceDeps {
  broker: Broker;
  host: HostFacts;
  authorizer: Authorizer;
  peers: PeerLookup;
  log: Logger;
  /**
   * The allowance of unsent WatchVms events per caller: this, or twice the
   * number of VMs if that is more. A caller's streams together (uid 0's each
   * alone) hold at most that many, opening snapshots included.
   */
  watchBacklog?: number;
  /** WatchVms streams open at once per uid (uid 0: no limit); more are refused (RESOURCE_EXHAUSTED). */
  maxWatchesPerUid?: number;
  /** No unary call runs longer than this (DEADLINE_EXCEEDED), whatever deadline the client set. */
  callTimeoutMs?: number;
  /**
   * The state store, for acknowledged-means-durable: a mutating call is
   * refused while the state cannot be written (check() throws), and answers
   * only once what it changed is on disk (durable()). Absent: no store.
   */
  durability?: Durability;
  /** Where calls are counted and timed, and GetMetrics reads from. Absent: GetMetrics answers UNAVAILABLE. */
  metrics?: Metrics;
}

export interface Durability {
  /** Throws (UNAVAILABLE, naming the errno) while the state cannot be written. */
  check(): void;
  /** Resolves once every change made so far is on disk; rejects when it cannot be written. */
  durable(): Promise<void>;
}

/** Runs `work`, failing with DEADLINE_EXCEEDED once `ms` have passed (the work itself is not cancelled). */
async function runWithin<T>(method: string, ms: number, work: () => Promise<T> | T): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new DeadlineExceededError(`${method} did not finish within the daemon's ${ms} ms call limit`)), ms);
  });
  try {
    return await Promise.race([Promise.resolve().then(work), late]);
  } finally {
    clearTimeout(timer);
  }
}

/** How long before a caller's deadline a call that waits (DeleteVm) stops waiting, to answer in time. */
const ANSWER_MARGIN_MS = 250;

type Outcome = { code: Status; details?: string; ref?: string };

/** An open WatchVms stream, as its caller's allowance sees it. */
interface OpenWatch {
  /** Events written to the stream that its client has not taken yet. */
  unsent(): number;
}

function unsentOf(group: ReadonlySet<OpenWatch>): number {
  let n = 0;
  for (const w of group) n += w.unsent();
  return n;
}

const statusName = (c: Status) => Status[c] ?? String(c);

export function createService(deps: ServiceDeps): { handlers: KvmVfioHandlers; endWatches(): void } {
  const { broker, authorizer, log } = deps;
  const watches = new Set<() => void>();
  /**
   * The open WatchVms streams of each uid but 0. A stream stays in its set
   * until grpc-js closes it — not when the daemon ends it — because until then
   * the events written to it are still held: a client that stops reading keeps
   * them, and must not get a fresh stream (and allowance) for each it stalls.
   */
  const watchesByUid = new Map<number, Set<OpenWatch>>();
  const backlog = deps.watchBacklog ?? 4096;
  const maxWatchesPerUid = deps.maxWatchesPerUid ?? 16;
  // A burst makes at most a few events per VM (all VMMs exiting at once: one each), so the
  // allowance grows with the records rather than cutting every watcher on a large host; and a
  // whole snapshot (one event per VM, and SYNCED) always fits in it.
  const allowance = () => Math.max(backlog, 2 * broker.vms.size);
  const allowanceRule = `the larger of ${backlog} and twice the VMs`;

  function callerOf(call: { getPeer(): string }): Caller {
    const c = deps.peers(call.getPeer());
    // A call on a connection we did not accept ourselves cannot be attributed: refuse it.
    if (!c) throw new UnavailableError('caller credentials unknown');
    return c;
  }

  function report(method: string, caller: Caller | undefined, mutating: boolean, vm: string | undefined, started: bigint, out: Outcome, err?: unknown): void {
    const seconds = Number(process.hrtime.bigint() - started) / 1e9;
    deps.metrics?.calls.inc({ method, code: statusName(out.code) });
    deps.metrics?.callSeconds.observe({ method }, seconds);
    const entry = {
      event: 'call',
      method,
      uid: caller?.uid,
      gid: caller?.gid,
      pid: caller?.pid,
      principal: caller?.principal?.name,
      vm,
      outcome: statusName(out.code),
      ms: seconds * 1000,
      ...(out.code !== Status.OK ? { details: out.details } : {}),
      ...(out.ref ? { ref: out.ref, err } : {}),
    };
    if (out.ref) log.error(entry, 'internal error');
    else if (mutating || out.code === Status.PERMISSION_DENIED) log.info(entry, method);
    else log.debug(entry, method);
  }

  /**
   * Wraps a unary handler. `vmOf` names the VM in the log line (the request's
   * id, or for CreateVm the result's).
   */
  function unary<Req, Res>(
    method: string,
    mutating: boolean,
    run: (caller: Caller, req: Req, untilMs: number) => Promise<Res> | Res,
    vmOf: (req: Req, res?: Res) => string | undefined = () => undefined,
  ) {
    return (call: ServerUnaryCall<Req, Res>, callback: sendUnaryData<Res>) => {
      const started = process.hrtime.bigint();
      let caller: Caller | undefined;
      void (async () => {
        try {
          caller = callerOf(call);
          caller = { ...caller, principal: authorizer.authorize(caller, method) };
          // A change is refused before it is made while the state cannot be written: nothing changes.
          if (mutating) deps.durability?.check();
          // When the client's deadline falls (ms since the epoch; Infinity: none), for calls that wait on a VMM.
          const deadline = call.getDeadline();
          const untilMs = deadline instanceof Date ? deadline.getTime() : Number(deadline);
          const res = await runWithin(method, deps.callTimeoutMs ?? 60_000, () => run(caller!, call.request, untilMs));
          // Acknowledged means durable: the answer waits for the commit that carries the change.
          if (mutating) await deps.durability?.durable();
          report(method, caller, mutating, vmOf(call.request, res), started, { code: Status.OK });
          callback(null, res);
        } catch (e) {
          const m: MappedStatus = toStatus(e);
          report(method, caller, mutating, vmOf(call.request), started, m, e);
          callback(toServiceError(m), null);
        }
      })();
    };
  }

  const handlers: KvmVfioHandlers = {
    GetHostInfo: unary('GetHostInfo', false, async () => {
      const h = await snapshot(deps.host);
      const groups = await broker.listGroups();
      return {
        kernel_release: h.kernelRelease,
        kvm_api_version: h.kvmApiVersion,
        support: {
          kvm_vfio_device: h.support.kvmVfioDevice,
          vfio_file_add: h.support.fileAdd,
          vfio_file_del: h.support.fileDel,
          vfio_container: h.support.vfioContainer,
          iommu_groups: groups.length > 0,
          probe_errors: h.support.errors,
          iommufd: h.iommufd,
          vfio_device_cdev: h.vfioDeviceCdev,
        },
        daemon_version: DAEMON_VERSION,
        fd_limit_soft: String(h.fdLimitSoft),
        fd_limit_hard: String(h.fdLimitHard),
        fds_open: String(h.fdsOpen),
        vm_count: broker.vms.size,
        claimed_group_count: broker.pool.claimedCount,
        iommu_group_count: groups.length,
        start_time: h.startTime,
      };
    }),

    ListIommuGroups: unary('ListIommuGroups', false, async () => ({ groups: (await broker.listGroups()).map(groupMessage) })),

    GetIommuGroup: unary('GetIommuGroup', false, async (_c, req: { number: number }) => groupMessage(await broker.getGroup(req.number))),

    GetMetrics: unary('GetMetrics', false, async () => {
      if (!deps.metrics) throw new UnavailableError('this daemon keeps no metrics');
      return { text: await deps.metrics.text(), content_type: deps.metrics.contentType };
    }),

    CreateVm: unary(
      'CreateVm',
      true,
      async (caller, req) => {
        const { vm, created, token } = await broker.createVm(caller, validate.createVm(req));
        if (created && deps.durability) {
          try {
            await deps.durability.durable();
          } catch (e) {
            // Not saved, so not made: the record, its claims and its token go.
            await broker.undoCreate(vm.id);
            throw e;
          }
        }
        if (!created) log.info({ event: 'create-retry', vm: vm.id, request_id: vm.requestId }, 'CreateVm retry returned the existing VM');
        return { vm: vmMessage(vm), attach_token: token ? tokenMessage(token) : null };
      },
      (req, res) => res?.vm?.id ?? req.name,
    ),

    GetVm: unary('GetVm', false, (caller, req) => vmMessage(broker.getVm(caller, validate.vmId('vm_id', req.vm_id)))),

    CreateAttachToken: unary(
      'CreateAttachToken',
      true,
      async (caller, req) => tokenMessage((await broker.createAttachToken(caller, validate.vmId('vm_id', req.vm_id))).token),
      (req) => req.vm_id,
    ),

    ListVms: unary('ListVms', false, (caller, req) => {
      const { filter, page } = validate.listVms(req);
      const { vms, nextAfterSeq } = broker.listVmsPage(caller, filter, page);
      return { vms: vms.map(vmMessage), next_page_token: nextAfterSeq === undefined ? '' : encodePageToken(nextAfterSeq, filter) };
    }),

    DeleteVm: unary(
      'DeleteVm',
      true,
      // The wait for the VMM ends a little before the caller's deadline, so the caller gets the daemon's
      // answer (which says that force kills it), not a deadline of its own.
      async (caller, req, untilMs) => ({ vm: vmMessage(await broker.deleteVm(caller, validate.vmId('vm_id', req.vm_id), req.force, untilMs - Date.now() - ANSWER_MARGIN_MS)) }),
      (req) => req.vm_id,
    ),

    CreateVfioDevice: unary(
      'CreateVfioDevice',
      true,
      async (caller, req) => vmMessage(await broker.createVfioDevice(caller, validate.vmId('vm_id', req.vm_id))),
      (req) => req.vm_id,
    ),

    AddGroup: unary(
      'AddGroup',
      true,
      async (caller, req) => vmMessage(await broker.addGroup(caller, validate.vmId('vm_id', req.vm_id), req.group)),
      (req) => req.vm_id,
    ),

    RemoveGroup: unary(
      'RemoveGroup',
      true,
      async (caller, req) => vmMessage(await broker.removeGroup(caller, validate.vmId('vm_id', req.vm_id), req.group)),
      (req) => req.vm_id,
    ),

    WatchVms: (call: ServerWritableStream<import('../generated/kvmvfio/v1/WatchVmsRequest').WatchVmsRequest__Output, VmEvent>) => {
      const started = process.hrtime.bigint();
      let caller: Caller | undefined;
      let unsubscribe = () => {};
      let ended = false;
      const end = (m?: MappedStatus) => {
        if (ended) return;
        ended = true;
        unsubscribe();
        watches.delete(stop);
        if (m) call.emit('error', toServiceError(m));
        else call.end();
      };
      const stop = () => end({ code: Status.UNAVAILABLE, details: 'kvmvfiod is shutting down' });
      try {
        caller = callerOf(call);
        caller = { ...caller, principal: authorizer.authorize(caller, 'WatchVms') };
        const filter = validate.filter(call.request);
        const { uid } = caller;
        // uid 0 is trusted: no count, and each of its streams has an allowance of its own.
        const group = uid === 0 ? new Set<OpenWatch>() : (watchesByUid.get(uid) ?? new Set<OpenWatch>());
        const whose = uid === 0 ? 'this WatchVms stream holds' : `the WatchVms streams of uid ${uid} hold`;
        if (uid !== 0 && group.size >= maxWatchesPerUid) {
          throw new ResourceExhaustedError(
            `uid ${uid} has ${group.size} WatchVms streams open; the limit per uid (--max-watches-per-uid) is ${maxWatchesPerUid} (a stream counts until its client has read it to its end or cancelled it)`,
          );
        }
        const existing = broker.listVms(caller, filter);
        // The opening snapshot (EXISTING per VM, then SYNCED) counts against the caller's allowance
        // like any event: a caller cannot pin memory by opening streams it does not read.
        const snapshot = existing.length + 1;
        const held = unsentOf(group);
        if (held + snapshot > allowance()) {
          throw new ResourceExhaustedError(
            `${whose} ${held} events not yet taken by their clients; an opening snapshot of ${snapshot} more would pass the allowance of ${allowance()} unsent events per caller (${allowanceRule}); read or close the other streams`,
          );
        }
        const me: OpenWatch = { unsent: () => call.writableLength };
        group.add(me);
        if (uid !== 0) watchesByUid.set(uid, group);
        call.on('close', () => {
          group.delete(me);
          if (group.size === 0 && watchesByUid.get(uid) === group) watchesByUid.delete(uid);
        });
        // Changes are written after the work that made them (setImmediate): a CreateVm answer or an
        // ATTACH result goes out first, and the watcher's copy follows in one batch per loop turn.
        let queued: VmChange[] = [];
        const flush = () => {
          const batch = queued;
          queued = [];
          let unsent = unsentOf(group);
          for (const ch of batch) {
            if (ended) return;
            const allowed = allowance();
            // The stream whose event would pass the caller's allowance is ended, even when a sibling
            // holds more: the caller answers for all its streams.
            if (unsent + 1 > allowed) {
              end(toStatus(new ResourceExhaustedError(`watcher fell behind: ${whose} ${unsent} events not yet taken by their clients; the allowance is ${allowed} (${allowanceRule}); watch again`)));
              return;
            }
            call.write({ type: `TYPE_${ch.type}`, vm: vmMessage(ch.vm) });
            unsent++;
          }
        };
        const send = (ch: VmChange) => {
          if (ended) return;
          if (queued.push(ch) === 1) setImmediate(flush);
        };
        // Subscribe before sending the snapshot: both run in this tick, so no change falls between.
        const matches = vmMatcher(filter);
        unsubscribe = broker.watch(caller, (ch: VmChange) => {
          if (matches(ch.vm)) send(ch);
        });
        for (const vm of existing) call.write({ type: 'TYPE_EXISTING', vm: vmMessage(vm) });
        call.write({ type: 'TYPE_SYNCED' });
        watches.add(stop);
        call.on('cancelled', () => end());
        call.on('close', () => end());
        report('WatchVms', caller, false, undefined, started, { code: Status.OK });
      } catch (e) {
        const m = toStatus(e);
        report('WatchVms', caller, false, undefined, started, m, e);
        end(m);
      }
    },
  };

  return {
    handlers,
    endWatches: () => {
      for (const stop of [...watches]) stop();
    },
  };
}
