/**
 * Timing and summaries for the benchmarks. Times are µs as doubles, taken
 * from process.hrtime (CLOCK_MONOTONIC), which every process on the host
 * shares, so a stamp taken in the VMM can be set against one taken here.
 * Percentiles are nearest-rank, as in ../shared/labs/perf.
 */

/** CLOCK_MONOTONIC in µs (exact to the ns for ~100 days of uptime). */
export const nowUs = (): number => Number(process.hrtime.bigint()) / 1000;

export interface Summary {
  n: number;
  p50: number;
  p99: number;
  mean: number;
  min: number;
  max: number;
}

export function percentile(sorted: ArrayLike<number>, q: number): number {
  if (sorted.length === 0) return NaN;
  const k = Math.min(sorted.length, Math.max(1, Math.ceil(q * sorted.length)));
  return sorted[k - 1];
}

export function summarize(values: readonly number[]): Summary {
  const s = Float64Array.from(values).sort();
  let sum = 0;
  for (const v of s) sum += v;
  return { n: s.length, p50: percentile(s, 0.5), p99: percentile(s, 0.99), mean: s.length ? sum / s.length : NaN, min: s[0] ?? NaN, max: s[s.length - 1] ?? NaN };
}

/**
 * A/B samples taken in pairs (interleaved): the ratio of the medians and,
 * less sensitive to drift on a noisy host, the median of the per-pair ratios.
 */
export function pairedRatio(a: readonly number[], b: readonly number[]): { ofMedians: number; medianOfPairs: number; deltaP50: number } {
  const n = Math.min(a.length, b.length);
  const pairs: number[] = [];
  for (let i = 0; i < n; i++) pairs.push(a[i] / b[i]);
  const sa = summarize(a.slice(0, n));
  const sb = summarize(b.slice(0, n));
  return { ofMedians: sa.p50 / sb.p50, medianOfPairs: summarize(pairs).p50, deltaP50: sa.p50 - sb.p50 };
}

/** "812 µs", "1.43 ms", "12.1 s" — three significant digits or so. */
export function fmtUs(us: number): string {
  if (!Number.isFinite(us)) return 'n/a';
  if (us < 10) return `${us.toFixed(1)} µs`;
  if (us < 1000) return `${us.toFixed(0)} µs`;
  if (us < 10_000) return `${(us / 1000).toFixed(2)} ms`;
  if (us < 1_000_000) return `${(us / 1000).toFixed(1)} ms`;
  return `${(us / 1e6).toFixed(2)} s`;
}

export const round = (x: number, digits = 1): number => (Number.isFinite(x) ? Number(x.toFixed(digits)) : x);

/** A Summary with every field rounded, for JSON. */
export function roundSummary(s: Summary, digits = 1): Summary {
  return { n: s.n, p50: round(s.p50, digits), p99: round(s.p99, digits), mean: round(s.mean, digits), min: round(s.min, digits), max: round(s.max, digits) };
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
