/**
 * The benchmark VMM: one process, started before the measurements, that
 * serves many VMs, so VMM process start-up is not in any number. For each
 * token it is sent (Node IPC from the orchestrator) it does what the
 * reference VMM does up to a running VM, with the VMM library:
 * VmmSession.connect (ATTACH) → createVm (KVM_CREATE_VM + VM_CREATED) →
 * serve (the daemon's CREATE_VFIO_DEVICE, ADD_GROUP ... answered in this
 * process). It runs no guest: a vCPU and guest memory are the VMM's own
 * business and the same with or without the broker.
 *
 * Like a VMM that serves VM after VM, it keeps a few handoff connections
 * made ahead (VmmSession.preconnect), so connect(2) and the daemon's accept
 * are behind it when a token comes; KVMVFIO_BENCH_PRECONNECT=0 connects after
 * the token instead (for A/B runs).
 *
 * The /dev/kvm fd received is closed once the VM exists (each VM then holds
 * 3 fds here: session, VM, KVM-VFIO device). Teardown closes those on the
 * libuv pool (UV_THREADPOOL_SIZE is raised by the parent), where concurrent
 * device closes share RCU grace periods.
 *
 * Messages in: attach, teardown-all, loop-begin, stats. Out: ready, up,
 * down-all, stats, error. Stamps are CLOCK_MONOTONIC µs (bench/stats.ts).
 */
import { readdirSync } from 'node:fs';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { type HandoffConnection, VmmSession } from '../src/vmm/session';
import { nowUs } from './stats';

export type ToVmm =
  | { t: 'attach'; id: string; token: string; report: boolean }
  | { t: 'teardown-all' }
  | { t: 'loop-begin' }
  | { t: 'stats' };

export type FromVmm =
  | { t: 'ready'; pid: number; uid: number }
  | { t: 'up'; id: string; recvUs: number; attachedUs: number; createdUs: number; deviceUs: number }
  | { t: 'down-all'; n: number; ms: number }
  | { t: 'stats'; loopMaxMs: number; loopP99Ms: number; rssMb: number; fds: number; vms: number }
  | { t: 'error'; id?: string; message: string };

interface Held {
  session: VmmSession;
  stamps: { recvUs: number; attachedUs: number; createdUs: number; deviceUs: number };
}

const handoff = process.env.KVMVFIO_HANDOFF;
const vms = new Map<string, Held>();
// On only between loop-begin and stats: its 1 ms timer wakes this process, which would slow what is timed.
const loop = monitorEventLoopDelay({ resolution: 1 });

const send = (m: FromVmm) => process.send!(m);

const SPARES = process.env.KVMVFIO_BENCH_PRECONNECT === '0' ? 0 : 4;
const spares: HandoffConnection[] = [];
let connecting = 0;
/** Tops the spare connections up to SPARES, one connect at a time. */
function refill(): void {
  if (connecting || spares.length >= SPARES) return;
  connecting++;
  VmmSession.preconnect(handoff!)
    .then((c) => spares.push(c))
    .catch((e: Error) => send({ t: 'error', message: `preconnect: ${e.message}` }))
    .finally(() => {
      connecting--;
      refill();
    });
}

async function attach(id: string, token: string, report: boolean): Promise<void> {
  const recvUs = nowUs();
  const session = await VmmSession.connect(spares.shift() ?? handoff!, token);
  const attachedUs = nowUs();
  await session.createVm();
  const createdUs = nowUs();
  refill();
  session.attach.kvm.closeSync();
  const held: Held = { session, stamps: { recvUs, attachedUs, createdUs, deviceUs: 0 } };
  vms.set(id, held);
  session.serve({
    onRequest: (type) => {
      if (type === 'CREATE_VFIO_DEVICE' && !held.stamps.deviceUs) {
        held.stamps.deviceUs = nowUs();
        if (report) send({ t: 'up', id, ...held.stamps });
      }
    },
    // A VM failed by the daemon: stop it as the reference VMM would (the process stays for the others).
    onShutdown: () => void teardown(id),
  });
}

async function teardown(id: string): Promise<void> {
  const held = vms.get(id);
  if (!held) return;
  vms.delete(id);
  held.session.close('benchmark teardown');
  await Promise.all([held.session.device?.close(), held.session.vm?.close()]);
}

process.on('message', (m: ToVmm) => {
  switch (m.t) {
    case 'attach':
      attach(m.id, m.token, m.report).catch((e: Error) => send({ t: 'error', id: m.id, message: e.message }));
      return;
    case 'teardown-all': {
      const t0 = performance.now();
      const ids = [...vms.keys()];
      void Promise.all(ids.map(teardown)).then(() => send({ t: 'down-all', n: ids.length, ms: performance.now() - t0 }));
      return;
    }
    case 'loop-begin':
      loop.reset();
      loop.enable();
      return;
    case 'stats': {
      const mem = process.memoryUsage();
      send({ t: 'stats', loopMaxMs: loop.max / 1e6, loopP99Ms: loop.percentile(99) / 1e6, rssMb: mem.rss / 1048576, fds: readdirSync('/proc/self/fd').length, vms: vms.size });
      loop.disable();
      loop.reset();
      return;
    }
  }
});
// The orchestrator went away: leave (closing every VM with the process).
process.on('disconnect', () => process.exit(0));

if (!handoff) {
  process.stderr.write('bench vmm: KVMVFIO_HANDOFF is not set\n');
  process.exit(2);
}
refill();
send({ t: 'ready', pid: process.pid, uid: process.getuid!() });
