/**
 * The two C programs of the benchmark: bench/raw_launch.c (the raw path,
 * timed in C) and bench/loop_probe.c (the daemon's event loop seen from
 * outside). Built with gcc into dist/bench/bin and driven line by line.
 */
import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { REPO, track } from './daemon';

const BIN = join(REPO, 'dist', 'bench', 'bin');

export function buildC(): { rawLaunch: string; loopProbe: string } {
  mkdirSync(BIN, { recursive: true });
  const out: Record<string, string> = {};
  for (const name of ['raw_launch', 'loop_probe']) {
    out[name] = join(BIN, name);
    execFileSync('gcc', ['-O2', '-Wall', '-Wextra', '-pthread', '-o', out[name], join(REPO, 'bench', `${name}.c`)], { stdio: 'inherit' });
  }
  return { rawLaunch: out.raw_launch, loopProbe: out.loop_probe };
}

/** A C child answering one line per request. */
class LineChild {
  readonly proc: ChildProcess;
  readonly #lines: string[] = [];
  readonly #waiters: ((l: string) => void)[] = [];
  #stderr = '';

  constructor(argv: string[]) {
    this.proc = track(spawn(argv[0], argv.slice(1), { stdio: ['pipe', 'pipe', 'pipe'] }));
    createInterface({ input: this.proc.stdout! }).on('line', (l) => {
      const w = this.#waiters.shift();
      if (w) w(l);
      else this.#lines.push(l);
    });
    this.proc.stderr!.setEncoding('utf8').on('data', (c: string) => (this.#stderr += c));
  }

  nextLine(timeoutMs = 30_000): Promise<string> {
    const queued = this.#lines.shift();
    if (queued !== undefined) return Promise.resolve(queued);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`${this.proc.spawnfile}: no answer in ${timeoutMs} ms; stderr: ${this.#stderr}`)), timeoutMs);
      this.#waiters.push((l) => {
        clearTimeout(timer);
        resolve(l);
      });
    });
  }

  write(line: string): void {
    this.proc.stdin!.write(`${line}\n`);
  }

  async end(): Promise<void> {
    if (this.proc.exitCode !== null) return;
    const exited = new Promise((r) => this.proc.once('exit', r));
    this.proc.stdin!.end();
    const timer = setTimeout(() => this.proc.kill('SIGKILL'), 5000);
    await exited;
    clearTimeout(timer);
  }
}

export interface RawLaunch {
  /** KVM_CREATE_VM + KVM_CREATE_DEVICE + KVM_SET_DEVICE_ATTR, µs. */
  totalUs: number;
  vmUs: number;
  deviceUs: number;
  attrUs: number;
  attrErrno: number;
}

export class RawLauncher {
  readonly #child: LineChild;

  private constructor(child: LineChild) {
    this.#child = child;
  }

  static async start(bin: string): Promise<RawLauncher> {
    const child = new LineChild([bin, 'serve']);
    const first = await child.nextLine();
    if (first !== 'ready') throw new Error(`raw_launch: ${first}`);
    return new RawLauncher(child);
  }

  get pid(): number {
    return this.#child.proc.pid!;
  }

  async launch(): Promise<RawLaunch> {
    this.#child.write('go');
    const line = await this.#child.nextLine();
    const f = line.split(' ');
    if (f[0] !== 'ok') throw new Error(`raw_launch: ${line}`);
    const us = (i: number) => Number(f[i]) / 1000;
    return { totalUs: us(1), vmUs: us(2), deviceUs: us(3), attrUs: us(4), attrErrno: Number(f[5]) };
  }

  /** Closes every VM launched so far (in parallel); resolves with the count and the ms it took. */
  async flush(): Promise<{ n: number; ms: number }> {
    this.#child.write('flush');
    const f = (await this.#child.nextLine()).split(' ');
    if (f[0] !== 'flushed') throw new Error(`raw_launch: ${f.join(' ')}`);
    return { n: Number(f[1]), ms: Number(f[2]) };
  }

  end(): Promise<void> {
    return this.#child.end();
  }
}

export interface ProbeReport {
  n: number;
  p50_us: number;
  p99_us: number;
  p999_us: number;
  max_us: number;
  over_1ms: number;
  over_5ms: number;
  timeouts: number;
}

/** bench/loop_probe.c attached to a daemon's handoff socket with a token (a PENDING VM of its own). */
export class LoopProbe {
  readonly #child: LineChild;

  private constructor(child: LineChild) {
    this.#child = child;
  }

  static async start(bin: string, handoffSocket: string, token: string, intervalUs = 1000): Promise<LoopProbe> {
    const child = new LineChild([bin, handoffSocket, token, String(intervalUs)]);
    const first = await child.nextLine(10_000);
    if (first !== 'attached') throw new Error(`loop_probe: ${first}`);
    return new LoopProbe(child);
  }

  get pid(): number {
    return this.#child.proc.pid!;
  }

  /** Round trips since the previous report. */
  async report(): Promise<ProbeReport> {
    this.#child.write('report');
    // A report waits for the PING in flight (at most its 5 s timeout).
    return JSON.parse(await this.#child.nextLine(15_000)) as ProbeReport;
  }

  end(): Promise<void> {
    return this.#child.end();
  }
}
