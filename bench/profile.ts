/**
 * Reads a V8 .cpuprofile (node --cpu-prof) and says where the time went:
 * self time by area (grpc-js, protobufjs, pino, koffi, node core, each
 * directory of ours, GC) and the functions with the most self time, and the
 * inclusive time of our own functions.
 */
import { readFileSync } from 'node:fs';

interface CallFrame {
  functionName: string;
  url: string;
  lineNumber: number;
}

interface ProfileNode {
  id: number;
  callFrame: CallFrame;
  children?: number[];
}

interface CpuProfile {
  nodes: ProfileNode[];
  samples: number[];
  timeDeltas: number[];
  startTime: number;
  endTime: number;
}

export interface ProfileSummary {
  file: string;
  totalMs: number;
  /** Not idle: the daemon's busy time. */
  busyMs: number;
  byArea: { area: string; ms: number; share: number }[];
  topSelf: { fn: string; ms: number; share: number }[];
  /** Functions of kvmvfiod (dist/src) by inclusive time. */
  oursInclusive: { fn: string; ms: number; share: number }[];
}

function area(f: CallFrame): string {
  const u = f.url;
  if (!u) {
    if (f.functionName === '(garbage collector)') return 'GC';
    if (f.functionName === '(idle)') return 'idle';
    if (f.functionName === '(program)') return 'native (program)';
    return 'native';
  }
  const pkg = /node_modules\/((?:@[^/]+\/)?[^/]+)\//.exec(u);
  if (pkg) return pkg[1];
  const ours = /\/dist\/(src|bench)\/([^/]+)\//.exec(u);
  if (ours) return `kvmvfiod ${ours[1]}/${ours[2]}`;
  if (u.startsWith('node:')) return 'node core';
  return 'other';
}

function fnName(f: CallFrame): string {
  const file = f.url.replace(/^.*\/node_modules\//, '').replace(/^.*\/dist\//, '').replace(/^file:\/\//, '');
  return `${f.functionName || '(anonymous)'} ${file}${file ? `:${f.lineNumber + 1}` : ''}`;
}

export function summarizeProfile(file: string, top = 25): ProfileSummary {
  const p = JSON.parse(readFileSync(file, 'utf8')) as CpuProfile;
  const byId = new Map<number, ProfileNode>();
  const parent = new Map<number, number>();
  for (const n of p.nodes) {
    byId.set(n.id, n);
    for (const c of n.children ?? []) parent.set(c, n.id);
  }
  const self = new Map<number, number>();
  for (let i = 0; i < p.samples.length; i++) self.set(p.samples[i], (self.get(p.samples[i]) ?? 0) + (p.timeDeltas[i] ?? 0));

  const areas = new Map<string, number>();
  const fns = new Map<string, number>();
  let total = 0;
  let idle = 0;
  for (const [id, us] of self) {
    const f = byId.get(id)!.callFrame;
    total += us;
    const a = area(f);
    if (a === 'idle') idle += us;
    areas.set(a, (areas.get(a) ?? 0) + us);
    if (a !== 'idle') fns.set(fnName(f), (fns.get(fnName(f)) ?? 0) + us);
  }
  // Inclusive time of our functions: each sample counts once per function on its stack.
  const incl = new Map<string, number>();
  for (const [id, us] of self) {
    const seen = new Set<string>();
    for (let n: number | undefined = id; n !== undefined; n = parent.get(n)) {
      const f = byId.get(n)!.callFrame;
      if (!/\/dist\/src\//.test(f.url)) continue;
      const k = fnName(f);
      if (seen.has(k)) continue;
      seen.add(k);
      incl.set(k, (incl.get(k) ?? 0) + us);
    }
  }
  const busy = total - idle;
  const rows = (m: Map<string, number>, base: number, limit: number) =>
    [...m]
      .sort((a, b) => b[1] - a[1])
      .slice(0, limit)
      .map(([k, us]) => ({ key: k, ms: Math.round(us / 100) / 10, share: Math.round((1000 * us) / base) / 10 }));
  return {
    file,
    totalMs: Math.round(total / 1000),
    busyMs: Math.round(busy / 1000),
    byArea: rows(areas, busy, 30)
      .filter((r) => r.key !== 'idle')
      .map((r) => ({ area: r.key, ms: r.ms, share: r.share })),
    topSelf: rows(fns, busy, top).map((r) => ({ fn: r.key, ms: r.ms, share: r.share })),
    oursInclusive: rows(incl, busy, top).map((r) => ({ fn: r.key, ms: r.ms, share: r.share })),
  };
}

export function printProfile(s: ProfileSummary, out: (line: string) => void): void {
  out(`profile ${s.file}: ${s.busyMs} ms busy of ${s.totalMs} ms (shares below are of busy time)`);
  out('  by area (self time):');
  for (const r of s.byArea) out(`    ${r.share.toFixed(1).padStart(5)} %  ${r.ms.toFixed(0).padStart(7)} ms  ${r.area}`);
  out('  top functions (self time):');
  for (const r of s.topSelf) out(`    ${r.share.toFixed(1).padStart(5)} %  ${r.ms.toFixed(0).padStart(7)} ms  ${r.fn}`);
  out('  kvmvfiod functions (inclusive time):');
  for (const r of s.oursInclusive) out(`    ${r.share.toFixed(1).padStart(5)} %  ${r.ms.toFixed(0).padStart(7)} ms  ${r.fn}`);
}
