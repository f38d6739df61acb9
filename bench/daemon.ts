/**
 * Runs a real kvmvfiod (dist/src/daemon/main.js) for a benchmark phase, in a
 * temp dir, at its shipped log level (info).
 *
 * Not test/helpers/daemon.ts: that helper runs the daemon at debug level
 * (a log line per call) and parses every line in the calling process, which
 * here is the orchestrator being measured. This one sends the log to a file,
 * passes node flags (--cpu-prof) and preloads bench/loop-preload.js, which
 * reports the daemon's event-loop delay on SIGUSR2.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync, openSync, readFileSync, closeSync, statSync } from 'node:fs';
import { chmod, copyFile, mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { KvmVfioApi } from '../src/client/client';
import { DAEMON_NODE_FLAGS } from '../src/daemon/nodeflags';
import { cpuMs, fdCount, rssMb } from './procstat';
import { sleep } from './stats';

export const REPO = join(__dirname, '..', '..');

/** Every child this benchmark started that may outlive a crash of it: killed when it exits, however it exits. */
const children = new Set<ChildProcess>();
process.on('exit', () => {
  for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
});
export function track(c: ChildProcess): ChildProcess {
  children.add(c);
  c.once('exit', () => children.delete(c));
  return c;
}
export const DAEMON_JS = join(REPO, 'dist', 'src', 'daemon', 'main.js');
const PRELOAD_JS = join(__dirname, 'loop-preload.js');

export interface LoopStats {
  seq: number;
  windowMs: number;
  maxMs: number;
  p99Ms: number;
  p999Ms: number;
  meanMs: number;
  samples: number;
  rssMb: number;
  heapUsedMb: number;
  heapTotalMb: number;
  externalMb: number;
}

/**
 * Reads the event-loop histogram bench/loop-preload.js keeps in a process:
 * SIGUSR2 makes it write the histogram since the previous read to `file`.
 */
export class LoopReader {
  readonly #proc: ChildProcess;
  readonly #file: string;
  #seq = 0;

  constructor(proc: ChildProcess, file: string) {
    this.#proc = proc;
    this.#file = file;
  }

  async read(): Promise<LoopStats> {
    const want = ++this.#seq;
    this.#proc.kill('SIGUSR2');
    const deadline = Date.now() + 5000;
    for (;;) {
      if (existsSync(this.#file)) {
        const s = JSON.parse(readFileSync(this.#file, 'utf8')) as LoopStats;
        if (s.seq >= want) return s;
      }
      if (Date.now() > deadline) throw new Error(`pid ${this.#proc.pid} did not report its event-loop delay (SIGUSR2)`);
      await sleep(5);
    }
  }
}

/**
 * An idle Node process with the same histogram: the host's own scheduling
 * noise (a VM on a shared host; HZ=250), to set the daemon's stalls against.
 */
export class ControlProcess {
  readonly proc: ChildProcess;
  readonly loop: LoopReader;

  private constructor(proc: ChildProcess, file: string) {
    this.proc = proc;
    this.loop = new LoopReader(proc, file);
  }

  static async start(dir: string): Promise<ControlProcess> {
    const file = join(dir, 'control-loop.json');
    // "ready" is printed after the preload installed its SIGUSR2 handler (before it, SIGUSR2 kills).
    const proc = spawn(process.execPath, ['--require', PRELOAD_JS, '-e', 'process.stdout.write("ready\\n"); setInterval(() => {}, 1 << 30)'], {
      stdio: ['ignore', 'pipe', 'inherit'],
      env: { ...process.env, KVMVFIO_BENCH_LOOP_FILE: file },
    });
    track(proc);
    await new Promise<void>((resolve, reject) => {
      proc.stdout!.once('data', () => resolve());
      proc.once('exit', (code) => reject(new Error(`the control process exited (${code})`)));
    });
    proc.stdout!.resume();
    return new ControlProcess(proc, file);
  }

  async stop(): Promise<void> {
    if (this.proc.exitCode !== null || this.proc.signalCode !== null) return;
    const gone = new Promise((r) => this.proc.once('exit', r));
    this.proc.kill('SIGKILL');
    await gone;
  }
}

export interface DaemonOptions {
  /** A name for its temp dir and log. */
  tag: string;
  sysfs?: string;
  dev?: string;
  /** Node flags put before the script (e.g. --cpu-prof). */
  nodeFlags?: string[];
  /** Daemon flags put after the defaults. */
  args?: string[];
  /** A state.json left by an earlier daemon, copied into the state dir: the new daemon restores it. */
  stateFile?: string;
  /**
   * Pass an open /dev/kvm as fd 3 named "kvm" with LISTEN_FDS, as systemd's
   * fd store does at a restart: the daemon restores its state file only
   * when its fds came back with it.
   */
  passKvmFd?: boolean;
  /** Keep the event-loop histogram in the daemon (default true); its 1 ms timer wakes the daemon 1,000 times a second. */
  loopMonitor?: boolean;
  /** Profile each window between two loop reports into this directory (bench/loop-preload.ts). */
  profileDir?: string;
}

export class BenchDaemon {
  readonly proc: ChildProcess;
  readonly pid: number;
  readonly dir: string;
  readonly apiSocket: string;
  readonly handoffSocket: string;
  readonly logPath: string;
  readonly #loop: LoopReader;
  readonly #exited: Promise<number | null>;
  readonly #clients: KvmVfioApi[] = [];
  /** Spawn → the daemon's "ready" log line, ms (from the line's own time stamp). */
  startMs = NaN;
  /** Where the preload writes a CPU profile per window (--profile). */
  profileDir?: string;
  /** The daemon's "restored" log line, if it restored a state. */
  restored?: { vms: number; ms: number };

  private constructor(proc: ChildProcess, dir: string, logPath: string, loopFile: string) {
    this.proc = proc;
    this.pid = proc.pid!;
    this.dir = dir;
    this.apiSocket = join(dir, 'run', 'api.sock');
    this.handoffSocket = join(dir, 'run', 'handoff.sock');
    this.logPath = logPath;
    this.#loop = new LoopReader(proc, loopFile);
    this.#exited = new Promise((r) => proc.once('exit', (code) => r(code)));
  }

  static async start(opts: DaemonOptions): Promise<BenchDaemon> {
    const dir = await mkdtemp(join(tmpdir(), `kvmvfiod-bench-${opts.tag}-`));
    // The VMM runs as uid 65534 and must reach handoff.sock inside.
    await chmod(dir, 0o755);
    await mkdir(join(dir, 'state'));
    if (opts.stateFile) await copyFile(opts.stateFile, join(dir, 'state', 'state.json'));
    const logPath = join(dir, 'daemon.log');
    const loopFile = join(dir, 'loop.json');
    const args = [
      // As shipped (src/daemon/nodeflags.ts), unless KVMVFIO_BENCH_NO_NODE_FLAGS=1 (for A/B runs).
      ...(process.env.KVMVFIO_BENCH_NO_NODE_FLAGS === '1' ? [] : DAEMON_NODE_FLAGS),
      ...(opts.nodeFlags ?? []),
      // Extra V8 flags for an A/B run (later flags win), e.g. KVMVFIO_BENCH_NODE_FLAGS='--max-semi-space-size=8'.
      ...(process.env.KVMVFIO_BENCH_NODE_FLAGS ?? '').split(' ').filter(Boolean),
      '--require',
      PRELOAD_JS,
      DAEMON_JS,
      '--runtime-dir',
      join(dir, 'run'),
      '--state-dir',
      join(dir, 'state'),
      '--policy',
      join(dir, 'no-policy.json'),
      '--log-level',
      'info',
      ...(opts.sysfs ? ['--sysfs', opts.sysfs] : []),
      ...(opts.dev ? ['--dev', opts.dev] : []),
      ...(opts.args ?? []),
    ];
    const out = openSync(logPath, 'w');
    const env: NodeJS.ProcessEnv = { ...process.env };
    if (opts.loopMonitor !== false) env.KVMVFIO_BENCH_LOOP_FILE = loopFile;
    if (opts.profileDir) env.KVMVFIO_BENCH_PROFILE_DIR = opts.profileDir;
    const stdio: ('ignore' | number)[] = ['ignore', out, out];
    let argv0 = process.execPath;
    let argv = args;
    let kvm: number | undefined;
    if (opts.passKvmFd) {
      kvm = openSync('/dev/kvm', 'r+');
      stdio.push(kvm);
      env.LISTEN_FDS = '1';
      env.LISTEN_FDNAMES = 'kvm';
      // LISTEN_PID must be the daemon's own pid: set it in a shell that then execs node.
      argv0 = '/bin/sh';
      argv = ['-c', 'LISTEN_PID=$$ exec "$0" "$@"', process.execPath, ...args];
    }
    const spawnedAt = Date.now();
    const proc = track(spawn(argv0, argv, { stdio, env }));
    closeSync(out);
    if (kvm !== undefined) closeSync(kvm);
    const d = new BenchDaemon(proc, dir, logPath, loopFile);
    let gone = false;
    void d.#exited.then(() => (gone = true));
    const deadline = Date.now() + 60_000;
    for (;;) {
      const log = readFileSync(logPath, 'utf8');
      const ready = /^.*"event":"ready".*$/m.exec(log);
      if (ready) {
        d.startMs = (JSON.parse(ready[0]) as { time: number }).time - spawnedAt;
        const restored = /^.*"event":"restored".*$/m.exec(log);
        if (restored) d.restored = JSON.parse(restored[0]) as { vms: number; ms: number };
        break;
      }
      if (gone || Date.now() > deadline) {
        proc.kill('SIGKILL');
        await d.#exited;
        await rm(dir, { recursive: true, force: true });
        throw new Error(`kvmvfiod (${opts.tag}) did not start:\n${log.slice(-2000)}`);
      }
      await sleep(5);
    }
    return d;
  }

  /** A client with its own channel (its own connection to api.sock). */
  client(): KvmVfioApi {
    const c = new KvmVfioApi(this.apiSocket, { timeoutMs: 30_000 });
    this.#clients.push(c);
    return c;
  }

  rssMb(): number {
    return rssMb(this.pid);
  }

  fdCount(): number {
    return fdCount(this.pid);
  }

  cpuMs(): number {
    return cpuMs(this.pid);
  }

  /** The daemon's state dir: state.json (a snapshot) and state.journal.<G> (the changes since). */
  get stateDir(): string {
    return join(this.dir, 'state');
  }

  logBytes(): number {
    return statSync(this.logPath).size;
  }

  /**
   * The event-loop delay histogram since the previous call (or the start),
   * from the preload; starts a new one.
   */
  loopStats(): Promise<LoopStats> {
    return this.#loop.read();
  }

  /** Lines of the log holding `needle`. */
  countLog(needle: string): number {
    let n = 0;
    const log = readFileSync(this.logPath, 'utf8');
    for (let i = log.indexOf(needle); i >= 0; i = log.indexOf(needle, i + needle.length)) n++;
    return n;
  }

  /** SIGTERM, then wait for exit (a --cpu-prof profile is written at exit). */
  async stop(): Promise<{ ms: number; code: number | null }> {
    for (const c of this.#clients.splice(0)) c.close();
    const t0 = Date.now();
    if (this.proc.exitCode === null && this.proc.signalCode === null) this.proc.kill('SIGTERM');
    const timer = setTimeout(() => this.proc.kill('SIGKILL'), 30_000);
    const code = await this.#exited;
    clearTimeout(timer);
    return { ms: Date.now() - t0, code };
  }

  async cleanup(): Promise<void> {
    if (this.proc.exitCode === null && this.proc.signalCode === null) {
      this.proc.kill('SIGKILL');
      await this.#exited;
    }
    // KVMVFIO_BENCH_KEEP=1 keeps each daemon's directory (its log with each call's `ms`, its state) to read after the run.
    if (process.env.KVMVFIO_BENCH_KEEP === '1') process.stderr.write(`kept ${this.dir}\n`);
    else await rm(this.dir, { recursive: true, force: true });
  }
}
