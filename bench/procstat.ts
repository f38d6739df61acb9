/** What /proc says about a process: resident memory, open fds, CPU time. Read from outside, as an operator would. */
import { readFileSync, readdirSync } from 'node:fs';

/** VmRSS from /proc/<pid>/status, in MB (1 MB = 1024 kB, as `ps` and `top` count). */
export function rssMb(pid: number): number {
  const m = /VmRSS:\s+(\d+)\s+kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  if (!m) throw new Error(`no VmRSS for pid ${pid}`);
  return Number(m[1]) / 1024;
}

export function fdCount(pid: number): number {
  return readdirSync(`/proc/${pid}/fd`).length;
}

// USER_HZ: 100 on every Linux this runs on (sysconf(_SC_CLK_TCK) is not reachable from Node).
const TICK_MS = 10;

/** User + system CPU time so far, ms (10 ms resolution). */
export function cpuMs(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  // The command name may hold spaces and parentheses: the fields start after the last ')'.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  // utime and stime are fields 14 and 15 of stat(5); fields[0] here is field 3.
  return (Number(fields[11]) + Number(fields[12])) * TICK_MS;
}

/** CPU ms each pid used while `work` ran, and the wall time. */
export async function cpuDuring<T>(pids: Record<string, number>, work: () => Promise<T>): Promise<{ result: T; wallMs: number; cpuMs: Record<string, number> }> {
  const before: Record<string, number> = {};
  for (const [k, pid] of Object.entries(pids)) before[k] = k === 'bench' ? ownCpuMs() : cpuMs(pid);
  const t0 = performance.now();
  const result = await work();
  const wallMs = performance.now() - t0;
  const used: Record<string, number> = {};
  for (const [k, pid] of Object.entries(pids)) used[k] = (k === 'bench' ? ownCpuMs() : cpuMs(pid)) - before[k];
  return { result, wallMs, cpuMs: used };
}

/** This process's CPU time, ms, at µs resolution. */
export function ownCpuMs(): number {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1000;
}
