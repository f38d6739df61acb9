/**
 * The five measurements of issue 7. Each phase opens its own stand (a fresh
 * daemon), measures, and returns plain numbers (µs unless named otherwise)
 * for the table and the JSON.
 */
import { status } from '@grpc/grpc-js';
import { execFileSync } from 'node:child_process';
import { mkdtemp, open, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { STORE_FILE, commitPuts, openStoreDb, readStoreFile } from '../src/broker/store';
import { isApiError, type KvmVfioApi } from '../src/client/client';
import { RawLauncher } from './cprogs';
import { SessionPinger } from './pinger';
import { BenchDaemon } from './daemon';
import { type Launch, launch } from './orchestrator';
import { cpuDuring } from './procstat';
import { type Ctx, type LoopWindow, Stand } from './stand';
import { type Summary, nowUs, pairedRatio, round, roundSummary, sleep, summarize } from './stats';
import { NOBODY } from './vmm-control';

/** The IOMMU group of the fake sysfs tree (bench/main.ts): viable, bound to vfio-pci, its /dev node an ordinary file. */
export const FAKE_GROUP = 7;

const rs = (v: number[]) => roundSummary(summarize(v));

// ---------------------------------------------------------------------------
// 1. Launch: raw C against the broker path, interleaved.

export interface LaunchSeries {
  /** back-to-back: launches follow each other at once; idle: 20 ms of idle host before each timed launch. */
  mode: 'back-to-back' | 'idle';
  pairs: number;
  raw: { total: Summary; createVm: Summary; createDevice: Summary; setDeviceAttr: Summary; attrErrno: number };
  /** CreateVm sent → RUNNING event received, less the benchmark's own token hand-off (an IPC message to the VMM). */
  broker: Summary;
  /** The same with the token hand-off left in. */
  brokerGross: Summary;
  /** Where the broker path's time goes (each stage's own percentiles). */
  stages: Record<string, Summary>;
  ratio: { ofMedians: number; medianOfPairs: number; deltaP50: number };
  /**
   * One fdatasync of a 4 KiB write on the state dir's filesystem, timed
   * between the pairs: what a durable commit costs at least, against which
   * the launch's share of the state store is judged.
   */
  fdatasync: Summary;
  /**
   * The launch's floor, its parts timed interleaved with the launches: the
   * gRPC floor call (ListVms matching nothing), one session exchange (PING),
   * the raw C path, one durable commit of an LMDB store on the state
   * filesystem. floor = the sum of their medians; ratio = launch p50 ÷ floor.
   */
  floor: { grpc: Summary; session: Summary; commit: Summary; total: number; ratio: number };
  /** Only with --profile: the latency phases run without loop watchers (they slow what is timed). */
  loop?: LoopWindow;
}

export interface LaunchResult {
  series: LaunchSeries[];
  /** Teardown, outside every launch: closing a batch of VMs in parallel, ms per VM (raw C threads / the VMM's libuv pool). */
  teardownMsPerVm: { raw: number; vmm: number };
}

/**
 * Teardown is never timed: both sides keep their VMs and close them in
 * batches between pairs (closing a KVM-VFIO device fd waits for an RCU grace
 * period, ~14 ms here). Two series: back to back (a busy host), and with
 * 20 ms of idle before each timed launch (a sporadic launch: on this VM an
 * idle vCPU is slow to wake, and the broker path wakes ~10 times).
 */
function floorOf(launch: Summary, raw: Summary, grpc: Summary, session: Summary, commit: Summary): LaunchSeries['floor'] {
  const total = round(grpc.p50 + session.p50 + raw.p50 + commit.p50);
  return { grpc, session, commit, total, ratio: round(launch.p50 / total, 2) };
}

export async function launchPhase(ctx: Ctx): Promise<LaunchResult> {
  const st = await Stand.open(ctx, 'launch', { vmm: true, watch: true });
  const raw = await RawLauncher.start(ctx.bins.rawLaunch);
  // The floor's session exchange and durable commit (see LaunchSeries.floor).
  const pingVm = await st.api.createVm({ name: 'pinger', vmm_uid: process.getuid!() });
  const pinger = await SessionPinger.attach(st.daemon.handoffSocket, pingVm.attach_token!.token);
  // Opened and written as the daemon's store is (src/broker/store.ts): an entry and the meta entry per commit.
  const commitDb = openStoreDb(join(st.daemon.stateDir, 'bench-commit.mdb'));
  const teardown = { raw: { n: 0, ms: 0 }, vmm: { n: 0, ms: 0 } };
  const flush = async () => {
    const r = await raw.flush();
    const v = await st.vmm!.teardownAll();
    teardown.raw.n += r.n;
    teardown.raw.ms += r.ms;
    teardown.vmm.n += v.n;
    teardown.vmm.ms += v.ms;
  };
  try {
    const series: LaunchSeries[] = [];
    for (const mode of ['back-to-back', 'idle'] as const) {
      const warm = ctx.quick ? 20 : 50;
      const n = mode === 'idle' ? (ctx.quick ? 20 : 150) : ctx.quick ? 50 : 300;
      const r = { total: [] as number[], vm: [] as number[], dev: [] as number[], attr: [] as number[] };
      let attrErrno = 0;
      const b = { net: [] as number[], gross: [] as number[] };
      const stages: Record<string, number[]> = { createVm: [], tokenHandoff: [], attach: [], kvmCreateVm: [], plan: [], runningEvent: [] };
      const syncs: number[] = [];
      const probe = await open(join(st.daemon.stateDir, 'bench-fdatasync'), 'w', 0o600);
      const page = Buffer.alloc(4096, 1);
      const parts = { grpc: [] as number[], session: [] as number[], commit: [] as number[] };
      const timed = async (into: number[], i: number, work: () => Promise<unknown>) => {
        const t = process.hrtime.bigint();
        await work();
        if (i >= 0) into.push(Number(process.hrtime.bigint() - t) / 1000);
      };
      await st.beginLoopWindow();
      for (let i = -warm; i < n; i++) {
        if ((i + warm) % 25 === 24) await flush();
        await timed(syncs, i, async () => {
          await probe.write(page, 0, page.length, 0);
          await probe.datasync();
        });
        await timed(parts.grpc, i, () => st.api.listVms({ labels: { bench: 'none' } }));
        await timed(parts.session, i, () => pinger.ping());
        await timed(parts.commit, i, () => commitPuts(commitDb, [['vm/k', Buffer.from(String(i))], ['meta', Buffer.from(String(i))]]));
        // ABBA: neither path always goes first.
        for (const which of i % 2 ? (['raw', 'broker'] as const) : (['broker', 'raw'] as const)) {
          if (mode === 'idle') await sleep(20);
          if (which === 'raw') {
            const x = await raw.launch();
            if (i < 0) continue;
            r.total.push(x.totalUs);
            r.vm.push(x.vmUs);
            r.dev.push(x.deviceUs);
            r.attr.push(x.attrUs);
            attrErrno = x.attrErrno;
          } else {
            const l: Launch = await launch(st.api, st.vmm!, st.watch!, 'launch', true);
            if (i < 0) continue;
            const v = l.vmm!;
            const handoff = v.recvUs - l.t1;
            b.gross.push(l.ready - l.t0);
            b.net.push(l.ready - l.t0 - handoff);
            stages.createVm.push(l.t1 - l.t0);
            stages.tokenHandoff.push(handoff);
            stages.attach.push(v.attachedUs - v.recvUs);
            stages.kvmCreateVm.push(v.createdUs - v.attachedUs);
            stages.plan.push(v.deviceUs - v.createdUs);
            stages.runningEvent.push(l.ready - v.deviceUs);
          }
        }
      }
      const loop = await st.endLoopWindow(`launch-${mode}`);
      await probe.close();
      await flush();
      series.push({
        mode,
        pairs: n,
        raw: { total: rs(r.total), createVm: rs(r.vm), createDevice: rs(r.dev), setDeviceAttr: rs(r.attr), attrErrno },
        broker: rs(b.net),
        brokerGross: rs(b.gross),
        stages: Object.fromEntries(Object.entries(stages).map(([k, v]) => [k, rs(v)])),
        ratio: mapRatio(pairedRatio(b.net, r.total)),
        fdatasync: rs(syncs),
        floor: floorOf(rs(b.net), rs(r.total), rs(parts.grpc), rs(parts.session), rs(parts.commit)),
        loop,
      });
    }
    return {
      series,
      teardownMsPerVm: { raw: round(teardown.raw.ms / Math.max(1, teardown.raw.n), 2), vmm: round(teardown.vmm.ms / Math.max(1, teardown.vmm.n), 2) },
    };
  } finally {
    pinger.close();
    await commitDb.close();
    await raw.end();
    await st.close();
  }
}

const mapRatio = (x: { ofMedians: number; medianOfPairs: number; deltaP50: number }) => ({
  ofMedians: round(x.ofMedians, 2),
  medianOfPairs: round(x.medianOfPairs, 2),
  deltaP50: round(x.deltaP50, 1),
});

// ---------------------------------------------------------------------------
// 2. A request on a running VM: AddGroup against the floor, interleaved.

export interface RequestResult {
  pairs: number;
  addGroup: Summary;
  floor: Summary;
  /** What AddGroup answered (this host: the VMM kernel's EINVAL). */
  addGroupAnswer: string;
  overFloorP50: number;
  ratio: { ofMedians: number; medianOfPairs: number; deltaP50: number };
  /** PING over a session, from a Node process to the daemon and back (bench/pinger.ts): the exchange AddGroup adds. */
  sessionPing: Summary;
  /** Only with --profile. */
  loop?: LoopWindow;
}

/**
 * The floor is ListVms filtered by a label no VM has: it goes through the
 * same path as every KvmVfio call (connection's peer credentials, the
 * authorizer, the handler wrapper, validation) and answers the smallest
 * message, after a scan of the one record this stand holds. GetHostInfo is
 * not a floor (it reads /proc/self/fd and walks sysfs per call) and the
 * health service skips the KvmVfio wrapper.
 */
export async function requestPhase(ctx: Ctx): Promise<RequestResult> {
  const st = await Stand.open(ctx, 'request', { vmm: true, watch: true });
  try {
    const vm = await launch(st.api, st.vmm!, st.watch!, 'addgroup', true);
    const pingVm = await st.api.createVm({ name: 'pinger', vmm_uid: process.getuid!() });
    const pinger = await SessionPinger.attach(st.daemon.handoffSocket, pingVm.attach_token!.token);
    let answer = '';
    const addGroup = async () => {
      try {
        await st.api.addGroup({ vm_id: vm.id, group: FAKE_GROUP });
      } catch (e) {
        if (isApiError(e) && e.code === status.INVALID_ARGUMENT) {
          answer ||= `${status[e.code]}: ${e.details}`;
          return;
        }
        throw e;
      }
      throw new Error('AddGroup succeeded; on this host (fake group node) the VMM kernel should answer EINVAL');
    };
    const floor = async () => {
      const { vms } = await st.api.listVms({ labels: { bench: 'none' } });
      if (vms.length) throw new Error('the floor call matched a VM');
    };
    // grpc-js and the handlers need ~1,000 calls before their time settles (JIT): warm up well.
    const warm = ctx.quick ? 300 : 1000;
    const n = ctx.quick ? 500 : 3000;
    const add: number[] = [];
    const flo: number[] = [];
    const pings: number[] = [];
    await st.beginLoopWindow();
    for (let i = -warm; i < n; i++) {
      for (const which of i % 2 ? (['add', 'floor', 'ping'] as const) : (['ping', 'floor', 'add'] as const)) {
        const t0 = nowUs();
        await (which === 'add' ? addGroup() : which === 'floor' ? floor() : pinger.ping());
        const us = nowUs() - t0;
        if (i >= 0) (which === 'add' ? add : which === 'floor' ? flo : pings).push(us);
      }
    }
    const loop = await st.endLoopWindow('addgroup');
    pinger.close();
    const a = summarize(add);
    const f = summarize(flo);
    return {
      pairs: n,
      addGroup: roundSummary(a),
      floor: roundSummary(f),
      addGroupAnswer: answer,
      overFloorP50: round(a.p50 - f.p50),
      sessionPing: roundSummary(summarize(pings)),
      ratio: mapRatio(pairedRatio(add, flo)),
      loop,
    };
  } finally {
    await st.close();
  }
}

// ---------------------------------------------------------------------------
// 3. Throughput with C concurrent orchestrator clients.

export interface MassExit {
  vms: number;
  /** The VMM's closes of every session, VM and device fd (parallel, on its libuv pool). */
  vmmTeardownMs: number;
  /** VMM process exit → the orchestrator has seen every VM EXITED. */
  exitToAllExitedMs: number;
  loop: LoopWindow;
}

export interface ThroughputResult {
  clients: number;
  windowS: number;
  launchesPerS: number;
  /** CreateVm sent → RUNNING seen, under load (the token hand-off included). */
  latency: Summary;
  failures: number;
  failureSample?: string;
  /** What the VMM reported failing (attach refused, connect failed ...), with the count. */
  vmmErrors: number;
  vmmErrorSample?: string;
  /** CPU ms used per launch in the window, per process. */
  cpuMsPerLaunch: Record<string, number>;
  /** Share of one CPU each process used in the window. */
  cpuShare: Record<string, number>;
  daemonLogBytesPerLaunch: number;
  loop: LoopWindow;
  afterRssMb: number;
  peakRssMb: number;
  daemonFds: number;
  vmsLaunched: number;
  massExit: MassExit;
}

export async function throughputPhase(ctx: Ctx, clients: number): Promise<ThroughputResult> {
  const st = await Stand.open(ctx, `tput${clients}`, { vmm: true, watch: true, loop: true });
  try {
    const apis = Array.from({ length: clients }, () => st.daemon.client());
    // Every channel connected before the clock starts.
    await Promise.all(apis.map((a) => a.listVms({ labels: { bench: 'none' } })));
    const warmMs = ctx.quick ? 200 : 700;
    const windowMs = ctx.quick ? 1000 : 3000;
    let stop = false;
    let wStart = Infinity;
    let wEnd = Infinity;
    let inWindow = 0;
    let launched = 0;
    let failures = 0;
    let failureSample: string | undefined;
    const lat: number[] = [];
    const worker = async (api: KvmVfioApi) => {
      while (!stop) {
        try {
          const l = await launch(api, st.vmm!, st.watch!, `t${clients}`, false);
          launched++;
          if (l.ready >= wStart && l.ready <= wEnd) {
            inWindow++;
            lat.push(l.ready - l.t0);
          }
        } catch (e) {
          failures++;
          failureSample ??= (e as Error).message;
          if (failures > 50) stop = true;
        }
      }
    };
    const logBefore = { bytes: 0 };
    const workers = apis.map(worker);
    await sleep(warmMs);
    await st.beginLoopWindow();
    logBefore.bytes = st.daemon.logBytes();
    st.takePeakRssMb();
    const pids = { daemon: st.daemon.pid, vmm: st.vmm!.pid, bench: process.pid, probe: st.probe!.pid };
    const { cpuMs, wallMs } = await cpuDuring(pids, async () => {
      wStart = nowUs();
      await sleep(windowMs);
      wEnd = nowUs();
    });
    const logBytes = st.daemon.logBytes() - logBefore.bytes;
    const loop = (await st.endLoopWindow('window'))!;
    stop = true;
    await Promise.all(workers);
    await sleep(200);
    const afterRssMb = round(st.daemon.rssMb(), 1);
    const peakRssMb = st.takePeakRssMb();
    const daemonFds = st.daemon.fdCount();
    const vmmErrors = [...st.vmm!.strayErrors];
    const massExit = await massVmmExit(st, launched);
    return {
      clients,
      windowS: round(wallMs / 1000, 2),
      launchesPerS: round(inWindow / (wallMs / 1000), 0),
      latency: rs(lat),
      failures,
      failureSample,
      vmmErrors: vmmErrors.length,
      vmmErrorSample: vmmErrors[0],
      cpuMsPerLaunch: Object.fromEntries(Object.entries(cpuMs).map(([k, v]) => [k, round(v / Math.max(1, inWindow), 3)])),
      cpuShare: Object.fromEntries(Object.entries(cpuMs).map(([k, v]) => [k, round(v / wallMs, 2)])),
      daemonLogBytesPerLaunch: round(logBytes / Math.max(1, inWindow), 0),
      loop,
      afterRssMb,
      peakRssMb,
      daemonFds,
      vmsLaunched: launched,
      massExit,
    };
  } finally {
    await st.close();
  }
}

/**
 * Ends every VM of the stand's VMM at once: the VMM closes all its sessions
 * and VM fds, then its process exits, and the daemon gets one pidfd event
 * per VM in the same loop turn. Measures how long until the orchestrator
 * has seen them all EXITED, and the event-loop stall that causes.
 */
async function massVmmExit(st: Stand, vms: number): Promise<MassExit> {
  await st.beginLoopWindow();
  const td = await st.vmm!.teardownAll();
  const exitedBefore = st.watch!.exitedSeen;
  const all = st.watch!.waitExited(exitedBefore + vms);
  const t0 = nowUs();
  const vmm = st.vmm!;
  st.vmm = undefined;
  await vmm.exit();
  const tAll = await Promise.race([all, sleep(30_000).then(() => NaN)]);
  const loop = (await st.endLoopWindow('mass-exit'))!;
  return { vms, vmmTeardownMs: round(td.ms, 0), exitToAllExitedMs: round((tAll - t0) / 1000, 1), loop };
}

// ---------------------------------------------------------------------------
// 4a. Scale in records: 100, 1,000, 10,000 PENDING VMs.

export interface LevelResult {
  records: number;
  rssMb: number;
  heapUsedMb: number;
  daemonFds: number;
  fdsPerVm: number;
  /** CreateVm calls per second while filling up to this level (32 in flight). */
  fillPerS: number;
  /** With nothing written meanwhile. */
  getVm: Summary;
  /** Right after another call changed the records (the state file is being rewritten). */
  getVmWhileWriting: Summary;
  listVmsFiltered: Summary;
  createVm: Summary;
  deleteVm: Summary;
  /** ListVms with no filter, following every page of the default size (100): the whole listing, first call to last answer. */
  listVmsAll: Summary;
  /** Calls one such listing takes. */
  listVmsAllPages: number;
  /** One page of ListVms, no filter: the default size (100), and the largest (500), from a place in the middle. */
  listVmsPage: Summary;
  listVmsPageMax: Summary;
  loop: LoopWindow;
  /** The daemon's loop while whole listings (pages of 100) were answered. */
  listAllLoopMaxMs: number;
  /** The daemon's loop while single pages (100 and 500) were answered. */
  listPageLoopMaxMs: number;
  /** The daemon's state store (state.mdb). */
  storeKb: number;
  /** The highest RSS sampled while filling up to this level. */
  fillPeakRssMb: number;
  /** The daemon's longest loop stall while filling up to this level. */
  fillLoopMaxMs: number;
}

export interface RestoreResult {
  records: number;
  /** Spawn → ready, ms (each run). */
  startMs: number[];
  /** The daemon's own "restored" step, ms (each run). */
  restoreMs: number[];
  rssMb: number;
}

export interface ScaleResult {
  idleRssMb: number;
  idleFds: number;
  levels: LevelResult[];
  /** Start with N PENDING records to restore (state file + /dev/kvm fd passed as from the fd store), against an empty start. */
  restore: RestoreResult[];
  peakRssMb: number;
}

const SELECTED = 10;

/** Record counts the scale phase fills to; --quick stops at 3,000 to stay under 30 s. */
export const scaleLevels = (ctx: { quick: boolean }) => (ctx.quick ? [100, 1000, 3000] : [100, 1000, 10_000]);

export async function scalePhase(ctx: Ctx): Promise<ScaleResult> {
  const st = await Stand.open(ctx, 'scale', { loop: true });
  const saved = await mkdtemp(join(tmpdir(), 'kvmvfiod-bench-states-'));
  const states = new Map<number, string>();
  try {
    await sleep(ctx.quick ? 500 : 1000);
    const idleRssMb = round(st.daemon.rssMb(), 1);
    const idleFds = st.daemon.fdCount();
    const apis = Array.from({ length: 4 }, () => st.daemon.client());
    const ids: string[] = [];
    let created = 0;
    const levels: LevelResult[] = [];
    const rounds = ctx.quick ? 100 : 400;
    // The peak of the whole phase, and apart the peak of each fill (where state writes pile up).
    let peakRssMb = 0;
    const takePeak = () => {
      const p = st.takePeakRssMb();
      peakRssMb = Math.max(peakRssMb, p);
      return p;
    };
    for (const target of scaleLevels(ctx)) {
      takePeak();
      await st.beginLoopWindow();
      const t0 = nowUs();
      const before = created;
      let next = created;
      const filler = async (api: KvmVfioApi) => {
        while (next < target) {
          const i = next++;
          // The first SELECTED records carry a label the filtered ListVms asks for: it matches 10 at every level.
          const labels: Record<string, string> = i < SELECTED ? { bench: 'fill', sel: 'probe' } : { bench: 'fill' };
          const res = await api.createVm({ name: `s-${i}`, vmm_uid: NOBODY, labels });
          ids.push(res.vm!.id);
          created++;
        }
      };
      await Promise.all(apis.flatMap((a) => Array.from({ length: 8 }, () => filler(a))));
      const fillPerS = round((created - before) / ((nowUs() - t0) / 1e6), 0);
      const fillLoop = (await st.endLoopWindow(`fill-${target}`))!;
      const fillPeakRssMb = takePeak();
      await sleep(ctx.quick ? 200 : 500);
      const sizes = await saveState(st, target, join(saved, `state-${target}.json`));
      const storeKb = round(sizes.store / 1024, 0);
      states.set(target, join(saved, `state-${target}.json`));
      const stats = await st.daemon.loopStats();
      const rssMb = round(st.daemon.rssMb(), 1);
      const daemonFds = st.daemon.fdCount();
      const get: number[] = [];
      const list: number[] = [];
      const create: number[] = [];
      const del: number[] = [];
      const getMixed: number[] = [];
      const timed = async (into: number[] | undefined, call: () => Promise<unknown>) => {
        const t = nowUs();
        await call();
        into?.push(nowUs() - t);
      };
      const getOne = (r: number) => () => st.api.getVm(ids[(r * 7919) % ids.length]);
      const listSelected = async () => {
        const { vms } = await st.api.listVms({ labels: { sel: 'probe' } });
        if (vms.length !== SELECTED) throw new Error(`filtered ListVms matched ${vms.length}, not ${SELECTED}`);
      };
      // Created and deleted again, so the level stays where it is.
      let tmp = 0;
      const createDelete = async (c?: number[], d?: number[]) => {
        let id = '';
        await timed(c, async () => (id = (await st.api.createVm({ name: `tmp-${target}-${++tmp}`, vmm_uid: NOBODY, labels: { bench: 'tmp' } })).vm!.id));
        await timed(d, () => st.api.deleteVm({ vm_id: id }));
      };
      await st.beginLoopWindow();
      // The first level warms the handlers up (JIT) well, or it would look slower than the later ones.
      const warm = levels.length === 0 ? (ctx.quick ? 100 : 500) : 20;
      // Reads alone: nothing is written meanwhile.
      for (let r = -warm; r < rounds; r++) {
        await timed(r >= 0 ? get : undefined, getOne(r + warm));
        await timed(r >= 0 ? list : undefined, listSelected);
      }
      // Writes: each CreateVm and DeleteVm changes the record set (and rewrites the state file).
      for (let r = -warm / 2; r < rounds / 2; r++) await createDelete(r >= 0 ? create : undefined, r >= 0 ? del : undefined);
      // Reads while another client writes: a GetVm right after each CreateVm and DeleteVm.
      for (let r = 0; r < rounds / 2; r++) {
        await createDelete();
        await timed(getMixed, getOne(r));
      }
      const loop = (await st.endLoopWindow(`calls-${target}`))!;
      // The listing windows start once the state file's last rewrite (tens of ms at 10,000 records) is done.
      await sleep(ctx.quick ? 200 : 500);
      await st.beginLoopWindow();
      // Single pages, starting half way through the records (a token from a listing that got there).
      let middle = '';
      for (let seen = 0; seen < target / 2; ) {
        const p = await st.api.listVms({ page_size: 500, page_token: middle });
        seen += p.vms.length;
        middle = p.next_page_token;
      }
      const page: number[] = [];
      const pageMax: number[] = [];
      for (let r = 0; r < (ctx.quick ? 50 : 200); r++) {
        await timed(page, async () => {
          if (!(await st.api.listVms({ page_token: middle })).vms.length) throw new Error('ListVms: an empty page in the middle');
        });
        await timed(pageMax, () => st.api.listVms({ page_size: 500, page_token: middle }));
      }
      const pageLoop = (await st.endLoopWindow(`list-page-${target}`))!;
      const all: number[] = [];
      let pages = 0;
      for (let k = 0; k < (ctx.quick ? 3 : 5); k++) {
        const t = nowUs();
        let n = 0;
        let token = '';
        pages = 0;
        do {
          const p = await st.api.listVms({ page_token: token });
          n += p.vms.length;
          token = p.next_page_token;
          pages++;
        } while (token);
        all.push(nowUs() - t);
        if (n < target) throw new Error(`ListVms pages returned ${n} of ${target}`);
      }
      const allLoop = (await st.endLoopWindow(`list-all-${target}`))!;
      levels.push({
        records: target,
        rssMb,
        heapUsedMb: round(stats.heapUsedMb, 1),
        daemonFds,
        fdsPerVm: round((daemonFds - idleFds) / target, 3),
        fillPerS,
        getVm: rs(get),
        getVmWhileWriting: rs(getMixed),
        listVmsFiltered: rs(list),
        createVm: rs(create),
        deleteVm: rs(del),
        listVmsAll: rs(all),
        listVmsAllPages: pages,
        listVmsPage: rs(page),
        listVmsPageMax: rs(pageMax),
        loop,
        listAllLoopMaxMs: allLoop.daemon.maxMs,
        listPageLoopMaxMs: pageLoop.daemon.maxMs,
        storeKb,
        fillPeakRssMb,
        fillLoopMaxMs: fillLoop.daemon.maxMs,
      });
      ctx.say(`  ${target} records: RSS ${rssMb} MB, GetVm p50 ${round(summarize(get).p50)} µs, CreateVm p50 ${round(summarize(create).p50)} µs`);
    }
    takePeak();
    await st.close();
    const restore: RestoreResult[] = [];
    for (const records of ctx.quick ? [0, scaleLevels(ctx).at(-1)!] : [0, ...scaleLevels(ctx).slice(1)]) {
      const r: RestoreResult = { records, startMs: [], restoreMs: [], rssMb: NaN };
      for (let k = 0; k < (ctx.quick ? 1 : 3); k++) {
        const d = await BenchDaemon.start({ tag: `restore${records}`, sysfs: ctx.host.sysfs, dev: ctx.host.dev, stateFile: states.get(records), passKvmFd: true, args: ['--max-vms', '50000'] });
        try {
          if (records && d.restored?.vms !== records) throw new Error(`restored ${d.restored?.vms} records, not ${records}`);
          r.startMs.push(d.startMs);
          if (d.restored) r.restoreMs.push(d.restored.ms);
          await sleep(300);
          r.rssMb = round(d.rssMb(), 1);
        } finally {
          await d.stop();
          await d.cleanup();
        }
      }
      restore.push(r);
    }
    return { idleRssMb, idleFds, levels, restore, peakRssMb };
  } finally {
    await st.close();
    await rm(saved, { recursive: true, force: true });
  }
}

/**
 * Saves the daemon's state (its store, read while it runs) once it holds
 * `records` VMs, as a version-2 state.json that a new daemon migrates into
 * its store at start, minus the probe's live session: a restart from the fd
 * store would bring that session's fds back, and this one passes only
 * /dev/kvm. Returns the size of the daemon's store file then.
 */
async function saveState(st: Stand, records: number, to: string): Promise<{ store: number }> {
  const deadline = Date.now() + 10_000;
  const path = join(st.daemon.stateDir, STORE_FILE);
  for (;;) {
    const { state, whole } = await readStoreFile(path);
    if (whole) {
      const fill = state.vms.filter((v) => v.name.startsWith('s-'));
      if (fill.length >= records) {
        state.vms = fill;
        state.sessions = [];
        // "journal": the first journal generation that follows this snapshot; there is none.
        await writeFile(to, JSON.stringify({ ...state, version: 2, journal: 0 }));
        return { store: (await stat(path)).size };
      }
    }
    if (Date.now() > deadline) throw new Error(`the state store never held ${records} records`);
    await sleep(50);
  }
}

// ---------------------------------------------------------------------------
// 4b. 1,000 live sessions (RUNNING VMs whose VMM keeps its session open).

export interface SessionsLevel {
  sessions: number;
  /** Launches per second (16 clients) while filling up to this level. */
  fillPerS: number;
  rssMb: number;
  heapUsedMb: number;
  daemonFds: number;
  fdsPerVm: number;
  getVm: Summary;
  listVmsFiltered: Summary;
}

export interface SessionsResult {
  idleRssMb: number;
  levels: SessionsLevel[];
  peakRssMb: number;
  massExit: MassExit;
}

export async function sessionsPhase(ctx: Ctx): Promise<SessionsResult> {
  const st = await Stand.open(ctx, 'sessions', { vmm: true, watch: true, loop: true });
  try {
    await sleep(300);
    const idleRssMb = round(st.daemon.rssMb(), 1);
    const fds0 = st.daemon.fdCount();
    const apis = Array.from({ length: 16 }, () => st.daemon.client());
    let live = 0;
    const levels: SessionsLevel[] = [];
    const rounds = ctx.quick ? 150 : 300;
    const ids: string[] = [];
    for (const target of [100, 1000]) {
      let next = live;
      const t0 = nowUs();
      const worker = async (api: KvmVfioApi) => {
        while (next < target) {
          next++;
          const l = await launch(api, st.vmm!, st.watch!, 'live', false);
          ids.push(l.id);
          live++;
        }
      };
      await Promise.all(apis.map(worker));
      const fillPerS = round((target - (levels.at(-1)?.sessions ?? 0)) / ((nowUs() - t0) / 1e6), 0);
      await sleep(ctx.quick ? 200 : 500);
      const rssMb = round(st.daemon.rssMb(), 1);
      const daemonFds = st.daemon.fdCount();
      const heap = await st.daemon.loopStats();
      const get: number[] = [];
      const list: number[] = [];
      const warm = levels.length === 0 ? (ctx.quick ? 150 : 800) : 20;
      for (let r = -warm; r < rounds; r++) {
        for (const op of r % 2 ? ['get', 'list'] : ['list', 'get']) {
          const t = nowUs();
          if (op === 'get') await st.api.getVm(ids[((r + warm) * 7919) % ids.length]);
          // A filter every RUNNING VM fails: it scans them all and answers the probe's PENDING VM.
          else await st.api.listVms({ states: ['VM_STATE_PENDING'] });
          if (r >= 0) (op === 'get' ? get : list).push(nowUs() - t);
        }
      }
      levels.push({
        sessions: target,
        fillPerS,
        rssMb,
        heapUsedMb: round(heap.heapUsedMb, 1),
        daemonFds,
        fdsPerVm: round((daemonFds - fds0) / target, 2),
        getVm: rs(get),
        listVmsFiltered: rs(list),
      });
      ctx.say(`  ${target} live sessions: RSS ${rssMb} MB, ${daemonFds} fds`);
    }
    const peakRssMb = st.takePeakRssMb();
    const massExit = await massVmmExit(st, live);
    return { idleRssMb, levels, peakRssMb, massExit };
  } finally {
    await st.close();
  }
}

// ---------------------------------------------------------------------------
// 5b. fd-table growth: a stall the daemon meets as its fds grow (bench/fdtable.ts).

export interface FdTableResult {
  /** fds whose creation waited > 1 ms, and how long, as the table grew. */
  growing: { fd: number; ms: number }[];
  /** The same 5,000 fds after sizing the table once at start. */
  pregrown: { pregrowMs: number; worstMs: number };
}

export async function fdTablePhase(): Promise<FdTableResult> {
  const run = (args: string[]) =>
    JSON.parse(execFileSync(process.execPath, [join(__dirname, 'fdtable.js'), ...args], { encoding: 'utf8' })) as { pregrowMs?: number; slow: { fd: number; ms: number }[]; worstMs: number };
  const growing = run([]);
  const pregrown = run(['--pregrow']);
  return { growing: growing.slow, pregrown: { pregrowMs: round(pregrown.pregrowMs ?? NaN, 1), worstMs: pregrown.worstMs } };
}
