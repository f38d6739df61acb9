/**
 * What the fuzz and property tests share: a seed that is printed and can be
 * replayed (KVMVFIO_FUZZ_SEED), a bounded pool of concurrent async jobs, and
 * the daemon health checks every fuzz run ends with (fd count back to
 * baseline, RSS near the start, no error-level log line).
 */
import assert from 'node:assert/strict';
import { randomInt } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import type { LogLine, RunningDaemon } from './daemon';

/**
 * The run's seed: KVMVFIO_FUZZ_SEED when set, else a fresh one. Printed to
 * stderr with its test's name so a failure in CI can be replayed.
 */
export function fuzzSeed(name: string): number {
  const env = process.env.KVMVFIO_FUZZ_SEED;
  const seed = env !== undefined && env !== '' ? Number(env) : randomInt(0, 0x7fffffff);
  if (!Number.isSafeInteger(seed)) throw new Error(`KVMVFIO_FUZZ_SEED=${env} is not an integer`);
  process.stderr.write(`# fuzz ${name}: seed ${seed} (replay with KVMVFIO_FUZZ_SEED=${seed})\n`);
  return seed;
}

/**
 * A case count scaled by KVMVFIO_FUZZ_SCALE (default 1): CI runs the
 * defaults, a longer local hunt sets e.g. KVMVFIO_FUZZ_SCALE=20.
 */
export function runs(n: number): number {
  const scale = Number(process.env.KVMVFIO_FUZZ_SCALE ?? '1');
  return Math.max(1, Math.round(n * (Number.isFinite(scale) && scale > 0 ? scale : 1)));
}

/** Runs `fn`; a failure is rethrown with the seed to replay it in its message. */
export async function withSeed<T>(name: string, seed: number, fn: () => Promise<T> | T): Promise<T> {
  try {
    return await fn();
  } catch (e) {
    const err = e instanceof Error ? e : new Error(String(e));
    err.message = `[${name}: replay with KVMVFIO_FUZZ_SEED=${seed}] ${err.message}`;
    throw err;
  }
}

/** Runs `jobs` with at most `width` at a time; the first failure rejects once the running ones settle. */
export async function pool<T>(width: number, items: readonly T[], job: (item: T, index: number) => Promise<void>): Promise<void> {
  let next = 0;
  let failure: unknown;
  const worker = async () => {
    while (failure === undefined && next < items.length) {
      const i = next++;
      try {
        await job(items[i], i);
      } catch (e) {
        failure ??= e;
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(width, items.length) }, worker));
  if (failure !== undefined) throw failure;
}

export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** `p`'s value, or null if it takes longer than `ms` (the timer is cleared either way). */
export async function within<T>(p: Promise<T>, ms: number): Promise<T | null> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([p, new Promise<null>((r) => (timer = setTimeout(() => r(null), ms)))]);
  } finally {
    clearTimeout(timer);
  }
}

/** Polls the daemon's fd count until it is at most `target` or `timeoutMs` passed; returns the last count. */
export async function settleFdCount(d: RunningDaemon, target: number, timeoutMs = 5000): Promise<number> {
  const end = Date.now() + timeoutMs;
  let n = await d.fdCount();
  while (n > target && Date.now() < end) {
    await sleep(50);
    n = await d.fdCount();
  }
  return n;
}

/** The daemon's fds with what they point at, for a failure message. */
export async function describeFds(d: RunningDaemon): Promise<string> {
  const { readdir, readlink } = await import('node:fs/promises');
  const names = await readdir(`/proc/${d.pid}/fd`);
  const targets = await Promise.all(names.map((n) => readlink(`/proc/${d.pid}/fd/${n}`).catch(() => '?')));
  const counts = new Map<string, number>();
  for (const t of targets) {
    const k = t.replace(/\[\d+\]$/, '[…]');
    counts.set(k, (counts.get(k) ?? 0) + 1);
  }
  return [...counts].map(([k, v]) => `${v}× ${k}`).join(', ');
}

/** VmRSS of a process, in bytes. */
export async function rssBytes(pid: number): Promise<number> {
  const m = /^VmRSS:\s+(\d+) kB$/m.exec(await readFile(`/proc/${pid}/status`, 'utf8'));
  assert.ok(m, `no VmRSS for pid ${pid}`);
  return Number(m[1]) * 1024;
}

/** pino levels: 50 error, 60 fatal. */
export const ERROR_LEVEL = 50;

/** Asserts no log line at error level or above except those `expected` allows. */
export function assertNoErrorLogs(d: RunningDaemon, expected: (l: LogLine) => boolean = () => false): void {
  const bad = d.logs.filter((l) => l.level >= ERROR_LEVEL && !expected(l));
  assert.equal(bad.length, 0, `error-level log lines: ${JSON.stringify(bad.slice(0, 5))}`);
}

/** The daemon process has not exited. */
export function assertAlive(d: RunningDaemon): void {
  assert.equal(d.proc.exitCode, null, `daemon exited with ${d.proc.exitCode}`);
  assert.equal(d.proc.signalCode, null, `daemon killed by ${d.proc.signalCode}`);
}

/**
 * The fd count settles back to `base` (a few more are tolerated only if they
 * are gone after a second look); on failure the message lists the daemon's fds.
 */
export async function assertFdsBack(d: RunningDaemon, base: number, timeoutMs = 5000): Promise<void> {
  const n = await settleFdCount(d, base, timeoutMs);
  if (n > base) assert.fail(`daemon fd count ${n}, baseline ${base}: ${await describeFds(d)}`);
}

/** "event×count" for the daemon's log lines at `minLevel` or above, for a test's diagnostics. */
export function logSummary(d: RunningDaemon, minLevel = 40): string {
  const counts = new Map<string, number>();
  for (const l of d.logs) {
    if (l.level < minLevel) continue;
    const k = `${l.level}:${l.event ?? l.msg}`;
    counts.set(k, (counts.get(k) ?? 0) + 1);
  }
  return [...counts].map(([k, v]) => `${k}×${v}`).join(' ');
}
