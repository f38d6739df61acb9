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
  /** Each sample charged to the nearest frame on its stack that says what it is doing. */
  byActivity: { activity: string; ms: number; share: number }[];
  topSelf: { fn: string; ms: number; share: number }[];
  /** Functions of kvmvfiod (dist/src) by inclusive time. */
  oursInclusive: { fn: string; ms: number; share: number }[];
  /**
   * The longest stretches of the main thread busy without a break (no idle
   * sample in between): the event-loop stalls, with what filled them.
   */
  stalls: { ms: number; atMs: number; activities: string; longestSample: string }[];
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

/**
 * What a frame says about the work on its stack, or undefined to look
 * further up (Node's own frames, natives): the first answer from the leaf
 * up names the sample's activity.
 */
function activityOf(f: CallFrame): string | undefined {
  const u = f.url;
  if (!u) return undefined;
  if (/node_modules\/(pino|sonic-boom|pino-std-serializers|quick-format-unescaped|thread-stream|on-exit-leak-free|atomic-sleep)\//.test(u)) return 'logging (pino)';
  if (/\/dist\/src\/broker\/state\.js/.test(u)) return 'state file (snapshot + write)';
  if (/\/dist\/src\/kernel\//.test(u)) return 'kernel calls (koffi: sendmsg, recvmsg, accept4, dup, close ...)';
  if (/\/dist\/src\/(server\/session|protocol)\//.test(u)) return 'handoff sessions (ours)';
  if (/\/dist\/src\/broker\//.test(u)) return 'broker: records, tokens, pool (ours)';
  if (/\/dist\/src\//.test(u)) return 'gRPC handlers, validation, conversion (ours)';
  if (/\/dist\/bench\//.test(u)) return 'benchmark preload (profiler)';
  if (/node_modules\/(@grpc|protobufjs|@protobufjs|long|lodash)/.test(u) || u.startsWith('node:internal/http2')) return 'gRPC + HTTP/2 + protobuf';
  return undefined;
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
  const activities = new Map<string, number>();
  for (const [id, us] of self) {
    const leaf = byId.get(id)!.callFrame;
    let act: string | undefined;
    if (leaf.functionName === '(idle)') continue;
    if (leaf.functionName === '(garbage collector)') act = 'GC';
    else if (leaf.functionName === '(program)') act = 'native, not attributed (program)';
    for (let n: number | undefined = id; !act && n !== undefined; n = parent.get(n)) act = activityOf(byId.get(n)!.callFrame);
    act ??= 'Node core, other';
    activities.set(act, (activities.get(act) ?? 0) + us);
  }
  // Stretches of consecutive non-idle samples.
  const activityOfSample = (id: number): string => {
    const leaf = byId.get(id)!.callFrame;
    if (leaf.functionName === '(garbage collector)') return 'GC';
    if (leaf.functionName === '(program)') return 'program';
    for (let n: number | undefined = id; n !== undefined; n = parent.get(n)) {
      const a = activityOf(byId.get(n)!.callFrame);
      if (a) return a.replace(/ \(.*$/, '');
    }
    return 'Node core';
  };
  const idleIds = new Set(p.nodes.filter((n) => n.callFrame.functionName === '(idle)').map((n) => n.id));
  const stretches: { ms: number; atMs: number; activities: string; longestSample: string }[] = [];
  let clock = 0;
  let cur: { start: number; us: number; acts: Map<string, number>; longest: { us: number; id: number } } | undefined;
  const close = () => {
    if (cur && cur.us >= 2000) {
      const acts = [...cur.acts].sort((a, b) => b[1] - a[1]).slice(0, 3).map(([a, us]) => `${a} ${(us / 1000).toFixed(1)}`);
      stretches.push({ ms: Math.round(cur.us / 100) / 10, atMs: Math.round(cur.start / 1000), activities: acts.join(', '), longestSample: `${(cur.longest.us / 1000).toFixed(1)} ms in ${fnName(byId.get(cur.longest.id)!.callFrame)}` });
    }
    cur = undefined;
  };
  for (let i = 0; i < p.samples.length; i++) {
    const id = p.samples[i];
    const dt = p.timeDeltas[i] ?? 0;
    clock += dt;
    if (idleIds.has(id)) {
      close();
      continue;
    }
    cur ??= { start: clock - dt, us: 0, acts: new Map(), longest: { us: 0, id } };
    cur.us += dt;
    const a = activityOfSample(id);
    cur.acts.set(a, (cur.acts.get(a) ?? 0) + dt);
    if (dt > cur.longest.us) cur.longest = { us: dt, id };
  }
  close();
  stretches.sort((a, b) => b.ms - a.ms);
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
    byActivity: rows(activities, busy, 30).map((r) => ({ activity: r.key, ms: r.ms, share: r.share })),
    topSelf: rows(fns, busy, top).map((r) => ({ fn: r.key, ms: r.ms, share: r.share })),
    oursInclusive: rows(incl, busy, top).map((r) => ({ fn: r.key, ms: r.ms, share: r.share })),
    stalls: stretches.slice(0, 8),
  };
}

export function printProfile(s: ProfileSummary, out: (line: string) => void): void {
  out(`profile ${s.file}: ${s.busyMs} ms busy of ${s.totalMs} ms (shares below are of busy time)`);
  out('  by activity (each sample charged to the nearest frame that says what it does):');
  for (const r of s.byActivity) out(`    ${r.share.toFixed(1).padStart(5)} %  ${r.ms.toFixed(0).padStart(7)} ms  ${r.activity}`);
  out('  by area (self time):');
  for (const r of s.byArea) out(`    ${r.share.toFixed(1).padStart(5)} %  ${r.ms.toFixed(0).padStart(7)} ms  ${r.area}`);
  out('  longest busy stretches of the main thread (stalls; ms by activity):');
  for (const r of s.stalls) out(`    ${r.ms.toFixed(1).padStart(6)} ms at +${r.atMs} ms: ${r.activities}; longest sample ${r.longestSample}`);
  out('  top functions (self time):');
  for (const r of s.topSelf) out(`    ${r.share.toFixed(1).padStart(5)} %  ${r.ms.toFixed(0).padStart(7)} ms  ${r.fn}`);
  out('  kvmvfiod functions (inclusive time):');
  for (const r of s.oursInclusive) out(`    ${r.share.toFixed(1).padStart(5)} %  ${r.ms.toFixed(0).padStart(7)} ms  ${r.fn}`);
}
