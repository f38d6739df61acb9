/**
 * The orchestrator's side of a launch, as a real one would do it with the
 * typed client: CreateVm, hand the token to a VMM, and learn from WatchVms
 * when the VM is RUNNING.
 *
 * "Ready" in every launch number is this: the orchestrator has received the
 * WatchVms event in which the VM is RUNNING. The daemon moves a VM to RUNNING
 * after its VMM made the VM (KVM_CREATE_VM, VM_CREATED) and answered the
 * plan's CREATE_VFIO_DEVICE (KVM_CREATE_DEVICE in the VMM); the event is
 * sent in the same tick.
 */
import type { KvmVfioApi, VmEvent } from '../src/client/client';
import { nowUs } from './stats';
import type { BenchVmm } from './vmm-control';

export class RunningWatch {
  readonly #ac = new AbortController();
  readonly #waiters = new Map<string, { resolve(us: number): void; reject(e: Error): void }>();
  #exited = 0;
  #exitWaiter?: { n: number; resolve(us: number): void };
  #done?: Promise<void>;

  /** Starts the stream; resolves once the daemon said SYNCED. */
  async start(api: KvmVfioApi): Promise<void> {
    let synced!: () => void;
    const ready = new Promise<void>((r) => (synced = r));
    this.#done = (async () => {
      for await (const ev of api.watchVms({}, this.#ac.signal)) this.#onEvent(ev, synced);
    })().catch((e: Error) => {
      for (const w of this.#waiters.values()) w.reject(e);
    });
    await ready;
  }

  #onEvent(ev: VmEvent, synced: () => void): void {
    const t = nowUs();
    if (ev.type === 'TYPE_SYNCED') return synced();
    const vm = ev.vm;
    if (!vm || ev.type === 'TYPE_EXISTING') return;
    if (vm.state === 'VM_STATE_RUNNING' || vm.state === 'VM_STATE_FAILED') {
      const w = this.#waiters.get(vm.id);
      if (w) {
        this.#waiters.delete(vm.id);
        if (vm.state === 'VM_STATE_RUNNING') w.resolve(t);
        else w.reject(new Error(`vm ${vm.name} FAILED: ${vm.failure_reason}`));
      }
    } else if (vm.state === 'VM_STATE_EXITED' && ev.type === 'TYPE_UPDATED') {
      this.#exited++;
      if (this.#exitWaiter && this.#exited >= this.#exitWaiter.n) {
        this.#exitWaiter.resolve(t);
        this.#exitWaiter = undefined;
      }
    }
  }

  /** Resolves with the µs stamp at which the RUNNING event arrived. Register before the VMM gets the token. */
  waitRunning(id: string, timeoutMs = 15_000): Promise<number> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#waiters.delete(id);
        reject(new Error(`vm ${id}: no RUNNING event within ${timeoutMs} ms`));
      }, timeoutMs);
      const settle = () => clearTimeout(timer);
      this.#waiters.set(id, {
        resolve: (us) => (settle(), resolve(us)),
        reject: (e) => (settle(), reject(e)),
      });
    });
  }

  get exitedSeen(): number {
    return this.#exited;
  }

  /** Resolves with the stamp of the event that made `n` EXITED VMs seen in all. */
  waitExited(n: number): Promise<number> {
    if (this.#exited >= n) return Promise.resolve(nowUs());
    return new Promise((resolve) => (this.#exitWaiter = { n, resolve }));
  }

  async stop(): Promise<void> {
    this.#ac.abort();
    await this.#done;
  }
}

export interface Launch {
  id: string;
  /** CreateVm sent. */
  t0: number;
  /** CreateVm answered (the token in hand). */
  t1: number;
  /** RUNNING event received. */
  ready: number;
  /** The VMM's stamps, when asked to report. */
  vmm?: { recvUs: number; attachedUs: number; createdUs: number; deviceUs: number };
}

let serial = 0;

/** One VM from CreateVm to RUNNING, its VMM being the benchmark VMM. */
export async function launch(api: KvmVfioApi, vmm: BenchVmm, watch: RunningWatch, prefix: string, report: boolean): Promise<Launch> {
  const t0 = nowUs();
  const res = await api.createVm({ name: `${prefix}-${++serial}`, vmm_uid: vmm.uid, vfio_device: true });
  const t1 = nowUs();
  const id = res.vm!.id;
  const running = watch.waitRunning(id);
  const up = vmm.attach(id, res.attach_token!.token, report);
  const [ready, stamps] = await Promise.all([running, up]);
  return { id, t0, t1, ready, vmm: stamps ? { recvUs: stamps.recvUs, attachedUs: stamps.attachedUs, createdUs: stamps.createdUs, deviceUs: stamps.deviceUs } : undefined };
}
