/**
 * Runs a VMM process for tests — the TypeScript reference VMM or a test
 * VMM — optionally as uid 65534 through setpriv, and collects the JSON lines
 * it prints.
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
  events: VmmEvent[];
  stderr(): string;
  waitFor(event: string, timeoutMs?: number): Promise<VmmEvent>;
  exit: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  kill(signal?: NodeJS.Signals): void;
}

/** argv: the command (e.g. [process.execPath, REFERENCE_VMM, '--socket', path]); `asNobody` prefixes setpriv. */
export function runVmm(argv: string[], token: string, asNobody = true): VmmProc {
  const cmd = asNobody ? [...NOBODY, ...argv] : argv;
  const proc = spawn(cmd[0], cmd.slice(1), { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, KVMVFIO_TOKEN: token } });
  const events: VmmEvent[] = [];
  const waiters = new Set<() => void>();
  let buf = '';
  let err = '';
  proc.stdout!.setEncoding('utf8').on('data', (c: string) => {
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
  const exit = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((r) => proc.once('exit', (code, signal) => r({ code, signal })));
  return {
    proc,
    pid: proc.pid!,
    events,
    stderr: () => err,
    exit,
    kill: (signal = 'SIGKILL') => void proc.kill(signal),
    waitFor: (event, timeoutMs = 10_000) =>
      new Promise((resolve, reject) => {
        const check = () => {
          const hit = events.find((e) => e.event === event);
          if (hit) {
            waiters.delete(check);
            clearTimeout(t);
            resolve(hit);
          }
        };
        const t = setTimeout(() => {
          waiters.delete(check);
          reject(new Error(`VMM event ${event} not seen in ${timeoutMs} ms; events: ${JSON.stringify(events)}; stderr: ${err}`));
        }, timeoutMs);
        waiters.add(check);
        check();
        void exit.then(() => setTimeout(check, 50));
      }),
  };
}
