/**
 * A test stand for one phase: a fresh daemon (so no phase pays for another's
 * records), an orchestrator client, and as the phase needs them the
 * benchmark VMM, a WatchVms stream and the event-loop watchers (the daemon's
 * preloaded histogram, the external probe, an idle control process). A loop
 * window reads every process's loop delay over a stretch of work.
 */
import { existsSync, mkdirSync, renameSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import type { KvmVfioApi } from '../src/client/client';
import type { FakeHost } from '../test/helpers/fakehost';
import { LoopProbe, type ProbeReport } from './cprogs';
import { BenchDaemon, ControlProcess, type LoopStats } from './daemon';
import { RunningWatch } from './orchestrator';
import { round, sleep } from './stats';
import { BenchVmm } from './vmm-control';

export interface Ctx {
  quick: boolean;
  profile: boolean;
  /** Profiles written so far (--profile): one per measured window. */
  profiles: { label: string; path: string }[];
  host: FakeHost;
  bins: { rawLaunch: string; loopProbe: string };
  resultsDir: string;
  say(msg: string): void;
}

/** The orchestrator's (this process's) own event loop; on only inside a loop window. */
const clientLoop = monitorEventLoopDelay({ resolution: 1 });

/**
 * monitorEventLoopDelay records the whole interval between two runs of its
 * repeating timer (measured: ~1.1 ms mean for an idle loop at resolution
 * 1 ms), so a stall is that interval less the 1 ms period (±1 ms).
 */
const stallMs = (intervalMs: number) => round(Math.max(0, intervalMs - 1), 2);

export interface LoopWindow {
  /** Longest stall and the 99th percentile inside the daemon (monitorEventLoopDelay, bench/loop-preload.ts). */
  daemon: { maxMs: number; p99Ms: number; p999Ms: number };
  /** The same in an idle Node process beside it: what the host's scheduling alone does. */
  control: { maxMs: number; p99Ms: number };
  /** PING round trips from bench/loop_probe.c (include CPU run-queue waits and two wake-ups). */
  probe?: { maxMs: number; p99Ms: number; p999Ms: number; n: number; over5ms: number };
  /** The orchestrator process (gRPC client side). */
  client: { maxMs: number; p99Ms: number };
  vmm?: { maxMs: number; p99Ms: number };
}

export class Stand {
  readonly daemon: BenchDaemon;
  readonly api: KvmVfioApi;
  vmm?: BenchVmm;
  watch?: RunningWatch;
  probe?: LoopProbe;
  control?: ControlProcess;
  readonly tag: string;
  readonly #ctx: Ctx;
  #peakRssMb = 0;
  #closing?: Promise<{ daemonStopMs: number }>;
  readonly #rssTimer: NodeJS.Timeout;

  private constructor(ctx: Ctx, tag: string, daemon: BenchDaemon) {
    this.#ctx = ctx;
    this.tag = tag;
    this.daemon = daemon;
    this.api = daemon.client();
    // The daemon's RSS, sampled every 100 ms: its peak is what a memory budget must hold.
    this.#rssTimer = setInterval(() => {
      try {
        this.#peakRssMb = Math.max(this.#peakRssMb, daemon.rssMb());
      } catch {
        /* exiting */
      }
    }, 100);
  }

  /** The highest RSS sampled since the previous call; starts afresh. */
  takePeakRssMb(): number {
    const p = Math.max(this.#peakRssMb, this.daemon.rssMb());
    this.#peakRssMb = 0;
    return round(p, 1);
  }

  /**
   * `loop`: watch event loops (the daemon's histogram, the external probe,
   * the idle control process). Their timers and pings wake the processes
   * ~4,000 times a second, which on this VM slows a sequential launch by
   * ~25 %: the latency phases run without them.
   */
  static async open(ctx: Ctx, tag: string, want: { vmm?: boolean; watch?: boolean; loop?: boolean } = {}): Promise<Stand> {
    let profileDir: string | undefined;
    if (ctx.profile) {
      profileDir = join(ctx.resultsDir, 'profiles', `${tag}-windows`);
      mkdirSync(profileDir, { recursive: true });
    }
    // --profile needs the preload's windows, so it watches loops everywhere (its numbers are inflated anyway).
    const loop = want.loop === true || ctx.profile;
    // Its daemon-wide caps (10,000 VMs, 8,000 sessions, 2,048 handoff connections by default) raised:
    // this measures cost, not the caps (the throughput phase keeps thousands of sessions open).
    const args = ['--max-vms', '50000', '--max-sessions', '50000', '--max-handoff-connections', '50000'];
    const daemon = await BenchDaemon.start({ tag, sysfs: ctx.host.sysfs, dev: ctx.host.dev, profileDir, loopMonitor: loop, args });
    daemon.profileDir = profileDir;
    const s = new Stand(ctx, tag, daemon);
    try {
      if (loop) {
        s.control = await ControlProcess.start(daemon.dir);
        await s.attachProbe();
      }
      if (want.vmm) s.vmm = await BenchVmm.start(daemon.handoffSocket);
      if (want.watch) {
        s.watch = new RunningWatch();
        await s.watch.start(daemon.client());
      }
    } catch (e) {
      await s.close();
      throw e;
    }
    return s;
  }

  /** Starts the external event-loop probe: a VMM of its own VM (PENDING, attached, no VM made), running as root. */
  async attachProbe(): Promise<void> {
    const { attach_token } = await this.api.createVm({ name: 'loop-probe', vmm_uid: process.getuid!() });
    this.probe = await LoopProbe.start(this.#ctx.bins.loopProbe, this.daemon.handoffSocket, attach_token!.token);
  }

  /** Starts an event-loop window (and a profile with --profile); nothing when this stand watches no loop. */
  async beginLoopWindow(): Promise<void> {
    if (!this.control) return;
    await this.daemon.loopStats();
    await this.control.loop.read();
    await this.probe?.report();
    this.vmm?.loopBegin();
    clientLoop.reset();
    clientLoop.enable();
  }

  /**
   * Ends the window; with --profile, keeps the daemon's CPU profile of it as
   * <tag>-<label>.cpuprofile. Undefined when this stand watches no loop.
   */
  async endLoopWindow(label: string): Promise<(LoopWindow & { daemonRaw: LoopStats }) | undefined> {
    if (!this.control) return undefined;
    const d = await this.daemon.loopStats();
    if (this.daemon.profileDir) {
      const from = join(this.daemon.profileDir, `window-${d.seq}.cpuprofile`);
      const to = join(this.#ctx.resultsDir, 'profiles', `${this.tag}-${label}.cpuprofile`);
      for (let i = 0; i < 200 && !existsSync(from); i++) await sleep(25);
      renameSync(from, to);
      this.#ctx.profiles.push({ label: `${this.tag} ${label}`, path: to });
    }
    const c = await this.control.loop.read();
    clientLoop.disable();
    const client = { maxMs: stallMs(clientLoop.max / 1e6), p99Ms: stallMs(clientLoop.percentile(99) / 1e6) };
    const p: ProbeReport | undefined = await this.probe?.report();
    const v = await this.vmm?.stats();
    return {
      daemonRaw: d,
      daemon: { maxMs: stallMs(d.maxMs), p99Ms: stallMs(d.p99Ms), p999Ms: stallMs(d.p999Ms) },
      control: { maxMs: stallMs(c.maxMs), p99Ms: stallMs(c.p99Ms) },
      probe: p && { maxMs: round(p.max_us / 1000, 2), p99Ms: round(p.p99_us / 1000, 2), p999Ms: round(p.p999_us / 1000, 2), n: p.n, over5ms: p.over_5ms },
      client,
      vmm: v && { maxMs: stallMs(v.loopMaxMs), p99Ms: stallMs(v.loopP99Ms) },
    };
  }

  /** Ends everything; the VMM first (its VMs end with it), then the daemon. */
  close(): Promise<{ daemonStopMs: number }> {
    this.#closing ??= this.#close();
    return this.#closing;
  }

  async #close(): Promise<{ daemonStopMs: number }> {
    clearInterval(this.#rssTimer);
    await this.watch?.stop().catch(() => undefined);
    if (this.vmm) {
      // Exiting with VMs open would close each device fd in turn, an RCU grace period apiece.
      await this.vmm.teardownAll();
      await this.vmm.exit();
    }
    await this.probe?.end();
    await this.control?.stop();
    const { ms } = await this.daemon.stop();
    await this.daemon.cleanup();
    if (this.daemon.profileDir) rmSync(this.daemon.profileDir, { recursive: true, force: true });
    return { daemonStopMs: ms };
  }
}
