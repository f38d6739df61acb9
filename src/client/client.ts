/**
 * A typed, promise-based client of kvmvfio.v1 for orchestration services and
 * for kvmvfioctl. One channel per instance; every unary call has a deadline.
 */
import * as grpc from '@grpc/grpc-js';
import { isVmIdShaped } from '../api/ids';
import { loadApi } from '../api/proto';
import type { AddGroupRequest } from '../generated/kvmvfio/v1/AddGroupRequest';
import type { AttachToken__Output } from '../generated/kvmvfio/v1/AttachToken';
import type { CreateVmRequest } from '../generated/kvmvfio/v1/CreateVmRequest';
import type { CreateVmResponse__Output } from '../generated/kvmvfio/v1/CreateVmResponse';
import type { DeleteVmRequest } from '../generated/kvmvfio/v1/DeleteVmRequest';
import type { DeleteVmResponse__Output } from '../generated/kvmvfio/v1/DeleteVmResponse';
import type { HostInfo__Output } from '../generated/kvmvfio/v1/HostInfo';
import type { GetMetricsResponse__Output } from '../generated/kvmvfio/v1/GetMetricsResponse';
import type { IommuGroup__Output } from '../generated/kvmvfio/v1/IommuGroup';
import type { KvmVfioClient } from '../generated/kvmvfio/v1/KvmVfio';
import type { ListIommuGroupsResponse__Output } from '../generated/kvmvfio/v1/ListIommuGroupsResponse';
import type { ListVmsRequest } from '../generated/kvmvfio/v1/ListVmsRequest';
import type { ListVmsResponse__Output } from '../generated/kvmvfio/v1/ListVmsResponse';
import type { RemoveGroupRequest } from '../generated/kvmvfio/v1/RemoveGroupRequest';
import type { Vm__Output } from '../generated/kvmvfio/v1/Vm';
import type { VmEvent__Output } from '../generated/kvmvfio/v1/VmEvent';
import type { WatchVmsRequest } from '../generated/kvmvfio/v1/WatchVmsRequest';

export const DEFAULT_SOCKET = '/run/kvmvfiod/api.sock';

/** "<id> (principal tenant-a, owner uid 1000)": one candidate of an ambiguous name. */
function describeOwner(vm: Vm__Output): string {
  return `${vm.id} (${vm.principal ? `principal ${vm.principal}, ` : ''}owner uid ${vm.owner_uid})`;
}

export interface ClientOptions {
  /** Per-call deadline for unary calls, ms. */
  timeoutMs?: number;
}

export type { Vm__Output as Vm, HostInfo__Output as HostInfo, IommuGroup__Output as IommuGroup, VmEvent__Output as VmEvent };

/** A grpc-js status error, as the calls reject with. */
export type ApiError = grpc.ServiceError;

export function isApiError(e: unknown): e is ApiError {
  return typeof e === 'object' && e !== null && 'code' in e && 'details' in e;
}

type Unary<Req, Res> = (req: Req, md: grpc.Metadata, opts: grpc.CallOptions, cb: grpc.requestCallback<Res>) => grpc.ClientUnaryCall;

export class KvmVfioApi {
  readonly socket: string;
  readonly #client: KvmVfioClient;
  readonly #timeoutMs: number;

  constructor(socket: string = process.env.KVMVFIO_SOCKET || DEFAULT_SOCKET, opts: ClientOptions = {}) {
    this.socket = socket;
    this.#timeoutMs = opts.timeoutMs ?? 10_000;
    const { proto } = loadApi();
    this.#client = new proto.kvmvfio.v1.KvmVfio(`unix:${socket}`, grpc.credentials.createInsecure(), {
      'grpc.max_receive_message_length': 16 * 1024 * 1024,
    });
  }

  #call<Req, Res>(fn: Unary<Req, Res>, req: Req): Promise<Res> {
    return new Promise((resolve, reject) => {
      fn.call(this.#client, req, new grpc.Metadata(), { deadline: Date.now() + this.#timeoutMs }, (err, res) => {
        if (err) reject(err);
        else resolve(res as Res);
      });
    });
  }

  getHostInfo(): Promise<HostInfo__Output> {
    return this.#call(this.#client.GetHostInfo, {});
  }

  /** The daemon's metrics in the Prometheus text format. */
  getMetrics(): Promise<GetMetricsResponse__Output> {
    return this.#call(this.#client.GetMetrics, {});
  }

  listIommuGroups(): Promise<ListIommuGroupsResponse__Output> {
    return this.#call(this.#client.ListIommuGroups, {});
  }

  getIommuGroup(number: number): Promise<IommuGroup__Output> {
    return this.#call(this.#client.GetIommuGroup, { number });
  }

  createVm(req: CreateVmRequest): Promise<CreateVmResponse__Output> {
    return this.#call(this.#client.CreateVm, req);
  }

  getVm(vmId: string): Promise<Vm__Output> {
    return this.#call(this.#client.GetVm, { vm_id: vmId });
  }

  /** A new attach token for a PENDING VM; earlier tokens of the VM stop working. */
  createAttachToken(vmId: string): Promise<AttachToken__Output> {
    return this.#call(this.#client.CreateAttachToken, { vm_id: vmId });
  }

  /**
   * One page of ListVms: at most `page_size` VMs (0: the daemon's default,
   * 100; at most 500) and `next_page_token`, empty on the last page. Pass it
   * back as `page_token`, with the same filter, for the next page.
   */
  listVms(req: ListVmsRequest = {}): Promise<ListVmsResponse__Output> {
    return this.#call(this.#client.ListVms, req);
  }

  /**
   * Every VM ListVms returns for the filter, following the pages (each call
   * has its own deadline). The VMs come in creation order, each once, even
   * when VMs are created or deleted meanwhile.
   */
  async *allVms(req: Omit<ListVmsRequest, 'page_token'> = {}): AsyncGenerator<Vm__Output> {
    let token = '';
    do {
      const page = await this.listVms({ ...req, page_token: token });
      yield* page.vms;
      // A daemon never answers a token with itself; guard against looping on one that did.
      if (page.next_page_token && page.next_page_token === token) throw new Error('ListVms answered a page token with the same token');
      token = page.next_page_token;
    } while (token);
  }

  /** allVms, collected. */
  async listAllVms(req: Omit<ListVmsRequest, 'page_token'> = {}): Promise<Vm__Output[]> {
    const out: Vm__Output[] = [];
    for await (const vm of this.allVms(req)) out.push(vm);
    return out;
  }

  deleteVm(req: DeleteVmRequest): Promise<DeleteVmResponse__Output> {
    return this.#call(this.#client.DeleteVm, req);
  }

  createVfioDevice(vmId: string): Promise<Vm__Output> {
    return this.#call(this.#client.CreateVfioDevice, { vm_id: vmId });
  }

  addGroup(req: AddGroupRequest): Promise<Vm__Output> {
    return this.#call(this.#client.AddGroup, req);
  }

  removeGroup(req: RemoveGroupRequest): Promise<Vm__Output> {
    return this.#call(this.#client.RemoveGroup, req);
  }

  /**
   * The WatchVms stream as an async iterator. Breaking out of the loop
   * cancels the call; the daemon ending it with a status throws it.
   */
  async *watchVms(req: WatchVmsRequest = {}, signal?: AbortSignal): AsyncGenerator<VmEvent__Output> {
    const call = this.#client.WatchVms(req);
    // An abort cancels at once, even while the stream waits for its next event.
    const onAbort = () => call.cancel();
    signal?.addEventListener('abort', onAbort, { once: true });
    try {
      for await (const ev of call as AsyncIterable<VmEvent__Output>) yield ev;
    } catch (e) {
      if (signal?.aborted && isApiError(e) && e.code === grpc.status.CANCELLED) return;
      throw e;
    } finally {
      signal?.removeEventListener('abort', onAbort);
      call.cancel();
    }
  }

  /**
   * The VM's id from an argument that is either an id or a name, never
   * both: an argument shaped like an id (a UUID, in any case) is only ever
   * taken as an id — the daemon refuses such names — and anything else only
   * as a name. A name more than one visible VM has (names are unique per
   * owner, and uid 0 or an admin sees every owner's VMs) is an error that
   * lists the candidates; it is never resolved by a guess.
   */
  async resolveVm(idOrName: string): Promise<string> {
    if (isVmIdShaped(idOrName)) return idOrName.toLowerCase();
    const hits: Vm__Output[] = [];
    for await (const vm of this.allVms({ page_size: 500 })) if (vm.name === idOrName) hits.push(vm);
    if (hits.length === 1) return hits[0].id;
    const message = hits.length
      ? `${hits.length} VMs you can see are named ${idOrName}: ${hits.map(describeOwner).join('; ')}; give the id of the one you mean`
      : `no VM named ${idOrName}`;
    throw Object.assign(new Error(message), { code: hits.length ? grpc.status.FAILED_PRECONDITION : grpc.status.NOT_FOUND, details: message });
  }

  close(): void {
    this.#client.close();
  }
}
