/**
 * Runs a VMM (or any helper that reports in JSON lines) for tests — the
 * TypeScript reference VMM, the C one, kvmvfioctl attach — optionally as uid
 * 65534 through setpriv, and collects what it prints.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { join } from 'node:path';
import { REPO } from './daemon';

export const REFERENCE_VMM = join(REPO, 'dist', 'src', 'vmm', 'reference.js');
export const SILENT_VMM = join(REPO, 'dist', 'test', 'helpers', 'silent-vmm.js');
export const NOBODY = ['setpriv', '--reuid=65534', '--regid=65534', '--clear-groups'];

export interface VmmEvent {
  event: string;
  [k: string]: unknown;
}

export interface VmmProc {
  proc: ChildProcess;
  pid: number;
  /** Each stdout line parsed as JSON; a line that is not JSON is `{event: 'text', line}`. */
  events: VmmEvent[];
  stdout(): string;
  stderr(): string;
  /**
   * The first event named `match` (or satisfying it). Rejects at the timeout,
   * or as soon as the process exits without it, saying what it did print.
   */
  waitFor(match: string | ((e: VmmEvent) => boolean), timeoutMs?: number): Promise<VmmEvent>;
  exit: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  kill(signal?: NodeJS.Signals): void;
}

/** Collects the JSON lines of a spawned process (stdout and stderr must be pipes). */
export function collectJsonLines(proc: ChildProcess): VmmProc {
  const events: VmmEvent[] = [];
  const waiters = new Set<() => void>();
  let out = '';
  let buf = '';
  let err = '';
  let exited = false;
  proc.stdout!.setEncoding('utf8').on('data', (c: string) => {
    out += c;
    buf += c;
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, i);
      buf = buf.slice(i + 1);
      try {
        events.push(JSON.parse(line) as VmmEvent);
      } catch {
        events.push({ event: 'text', line });
      }
      for (const w of waiters) w();
    }
  });
  proc.stderr!.setEncoding('utf8').on('data', (c: string) => (err += c));
  const exit = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    // 'close': stdout is drained too, so nothing it printed is missed.
    proc.once('close', (code, signal) => {
      exited = true;
      resolve({ code, signal });
      for (const w of waiters) w();
    }),
  );
  return {
    proc,
    pid: proc.pid!,
    events,
    stdout: () => out,
    stderr: () => err,
    exit,
    kill: (signal = 'SIGKILL') => void proc.kill(signal),
    waitFor: (match, timeoutMs = 15_000) =>
      new Promise((resolve, reject) => {
        const pred = typeof match === 'string' ? (e: VmmEvent) => e.event === match : match;
        const what = typeof match === 'string' ? match : 'the awaited event';
        const check = () => {
          const hit = events.find(pred);
          if (!hit && !exited) return;
          waiters.delete(check);
          clearTimeout(t);
          if (hit) resolve(hit);
          else reject(new Error(`exited ${JSON.stringify({ code: proc.exitCode, signal: proc.signalCode })} without ${what}; stdout: ${out}; stderr: ${err}`));
        };
        const t = setTimeout(() => {
          waiters.delete(check);
          reject(new Error(`no ${what} in ${timeoutMs} ms; stdout: ${out}; stderr: ${err}`));
        }, timeoutMs);
        waiters.add(check);
        check();
      }),
  };
}

/**
 * argv: the command (e.g. [process.execPath, REFERENCE_VMM, '--socket', path]); `asNobody` prefixes setpriv.
 * `opts.env` is added to the environment; `opts.control` gives the VMM a pipe as fd 3 that the test
 * can end (`proc.stdio[3]`): unlike stdin, Node leaves it open when the process exits (a forked child
 * may still read it).
 */
export function runVmm(argv: string[], token: string, asNobody = true, opts: { env?: Record<string, string>; control?: boolean } = {}): VmmProc {
  const cmd = asNobody ? [...NOBODY, ...argv] : argv;
  const stdio: ('ignore' | 'pipe')[] = ['ignore', 'pipe', 'pipe', ...(opts.control ? ['pipe' as const] : [])];
  return collectJsonLines(spawn(cmd[0], cmd.slice(1), { stdio, env: { ...process.env, KVMVFIO_TOKEN: token, ...opts.env } }));
}

/** Ends the control pipe of a VMM started with `control: true`. */
export function endControl(v: VmmProc): void {
  (v.proc.stdio[3] as NodeJS.WritableStream | null)?.end();
}
