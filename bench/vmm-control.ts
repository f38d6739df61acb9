/**
 * The orchestrator's handle on the benchmark VMM (bench/vmm.ts): starts it
 * (as uid 65534 through setpriv when this runs as root, as a sandboxed VMM
 * would run), sends it tokens, and waits for what it reports.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { track } from './daemon';
import type { FromVmm, ToVmm } from './vmm';

const VMM_JS = join(__dirname, 'vmm.js');
export const NOBODY = 65534;
const SETPRIV = '/usr/bin/setpriv';

type Up = Extract<FromVmm, { t: 'up' }>;
type Stats = Extract<FromVmm, { t: 'stats' }>;

export class BenchVmm {
  readonly proc: ChildProcess;
  readonly pid: number;
  /** The uid the VMM runs as: the vmm_uid its VMs are created with. */
  readonly uid: number;
  readonly #ups = new Map<string, (m: Up) => void>();
  readonly #errors = new Map<string, (e: Error) => void>();
  #downAll?: (m: { n: number; ms: number }) => void;
  #stats?: (m: Stats) => void;
  readonly #exited: Promise<void>;
  /** Errors reported for VMs nobody waits on. */
  readonly strayErrors: string[] = [];

  private constructor(proc: ChildProcess, uid: number) {
    this.proc = proc;
    this.pid = proc.pid!;
    this.uid = uid;
    this.#exited = new Promise((r) => proc.once('exit', () => r()));
    proc.on('message', (m: FromVmm) => this.#onMessage(m));
  }

  static async start(handoffSocket: string): Promise<BenchVmm> {
    const asNobody = process.getuid?.() === 0 && existsSync(SETPRIV);
    const node = [process.execPath, VMM_JS];
    const argv = asNobody ? [SETPRIV, `--reuid=${NOBODY}`, `--regid=${NOBODY}`, '--clear-groups', ...node] : node;
    const proc = track(spawn(argv[0], argv.slice(1), {
      stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
      // Many KVM-VFIO device closes at once share RCU grace periods only if they run in parallel.
      env: { ...process.env, KVMVFIO_HANDOFF: handoffSocket, UV_THREADPOOL_SIZE: '128' },
    }));
    const ready = await new Promise<Extract<FromVmm, { t: 'ready' }>>((resolve, reject) => {
      proc.once('message', (m: FromVmm) => (m.t === 'ready' ? resolve(m) : reject(new Error(`bench vmm: ${JSON.stringify(m)}`))));
      proc.once('exit', (code) => reject(new Error(`bench vmm exited (${code}) before it was ready`)));
    });
    return new BenchVmm(proc, ready.uid);
  }

  #send(m: ToVmm): void {
    this.proc.send(m);
  }

  #onMessage(m: FromVmm): void {
    switch (m.t) {
      case 'up':
        this.#ups.get(m.id)?.(m);
        this.#ups.delete(m.id);
        return;
      case 'down-all':
        this.#downAll?.(m);
        return;
      case 'stats':
        this.#stats?.(m);
        return;
      case 'error': {
        const reject = m.id ? this.#errors.get(m.id) : undefined;
        if (reject) reject(new Error(`bench vmm, vm ${m.id}: ${m.message}`));
        else this.strayErrors.push(m.message);
        return;
      }
    }
  }

  /**
   * Sends the token. With `report`, resolves with the VMM's stamps once it
   * has answered CREATE_VFIO_DEVICE; without, resolves at once (errors are
   * then only kept in strayErrors).
   */
  attach(id: string, token: string, report: boolean): Promise<Up | undefined> {
    if (!report) {
      this.#send({ t: 'attach', id, token, report });
      return Promise.resolve(undefined);
    }
    const p = new Promise<Up>((resolve, reject) => {
      this.#ups.set(id, resolve);
      this.#errors.set(id, reject);
    }).finally(() => this.#errors.delete(id));
    this.#send({ t: 'attach', id, token, report });
    return p;
  }

  /** Closes every VM's session, VM and device fds (in parallel); resolves when the closes are done. */
  teardownAll(): Promise<{ n: number; ms: number }> {
    const p = new Promise<{ n: number; ms: number }>((r) => (this.#downAll = r));
    this.#send({ t: 'teardown-all' });
    return p;
  }

  /** Starts the VMM's event-loop histogram; stats() reads and stops it. */
  loopBegin(): void {
    this.#send({ t: 'loop-begin' });
  }

  stats(): Promise<Stats> {
    const p = new Promise<Stats>((r) => (this.#stats = r));
    this.#send({ t: 'stats' });
    return p;
  }

  /** Ends the process (it exits when the IPC channel closes) and waits for it. */
  async exit(): Promise<void> {
    if (this.proc.connected) this.proc.disconnect();
    const timer = setTimeout(() => this.proc.kill('SIGKILL'), 30_000);
    await this.#exited;
    clearTimeout(timer);
  }
}
