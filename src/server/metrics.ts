/**
 * The daemon's metrics (prom-client), in its own registry: served as the
 * Prometheus text by the opt-in HTTP listener (--metrics-address) and by the
 * GetMetrics call on the API socket. Labels stay bounded: methods, status
 * codes, session request kinds, states, errno names, refusal reasons — never
 * a VM id, name or uid.
 *
 * Gauges of what the daemon holds are read when scraped (collect), from the
 * broker; counters and histograms are told by the code that does the work.
 */
import { type IncomingMessage, type Server, type ServerResponse, createServer } from 'node:http';
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';

export interface MetricsSources {
  vmsByState(): Record<string, number>;
  /** IOMMU groups by holding: free, claimed, vmm, stray. */
  groupsByHolding(): Promise<Record<string, number>>;
  sessions(): number;
  pendingTokens(): number;
  /** 1 while the state store commits, 0 while it fails. */
  stateWritable(): boolean;
}

const VM_STATES = ['PENDING', 'RUNNING', 'EXITED', 'FAILED'];
const HOLDINGS = ['free', 'claimed', 'vmm', 'stray'];

/** Latency buckets, seconds: 100 µs to 10 s. */
const BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];

export class Metrics {
  readonly registry = new Registry();
  readonly calls: Counter<'method' | 'code'>;
  readonly callSeconds: Histogram<'method'>;
  readonly sessionRequestSeconds: Histogram<'kind' | 'outcome'>;
  readonly stateCommitSeconds: Histogram;
  readonly stateCommitFailures: Counter<'errno'>;
  readonly refusals: Counter<'socket' | 'reason'>;

  constructor(sources: MetricsSources) {
    const registers = [this.registry];
    collectDefaultMetrics({ register: this.registry, prefix: 'kvmvfiod_', eventLoopMonitoringPrecision: 10 });
    new Gauge({
      name: 'kvmvfiod_vms',
      help: 'VM records by state.',
      labelNames: ['state'],
      registers,
      collect() {
        const by = sources.vmsByState();
        for (const s of VM_STATES) this.set({ state: s }, by[s] ?? 0);
      },
    });
    new Gauge({
      name: 'kvmvfiod_iommu_groups',
      help: 'IOMMU groups of the host by holding: free (in the pool), claimed (the daemon holds it for a VM), vmm (a VM\'s VMM holds it), stray (a process holds it after its VM let it go).',
      labelNames: ['holding'],
      registers,
      async collect() {
        const by = await sources.groupsByHolding();
        for (const h of HOLDINGS) this.set({ holding: h }, by[h] ?? 0);
      },
    });
    new Gauge({
      name: 'kvmvfiod_sessions',
      help: 'Live VMM sessions (attached).',
      registers,
      collect() {
        this.set(sources.sessions());
      },
    });
    new Gauge({
      name: 'kvmvfiod_attach_tokens_pending',
      help: 'Attach tokens issued and neither redeemed nor expired.',
      registers,
      collect() {
        this.set(sources.pendingTokens());
      },
    });
    new Gauge({
      name: 'kvmvfiod_state_writable',
      help: '1 while the state store commits; 0 while it cannot be written (mutating calls are refused).',
      registers,
      collect() {
        this.set(sources.stateWritable() ? 1 : 0);
      },
    });
    this.calls = new Counter({ name: 'kvmvfiod_grpc_calls_total', help: 'gRPC calls of the KvmVfio service by method and status code.', labelNames: ['method', 'code'], registers });
    this.callSeconds = new Histogram({ name: 'kvmvfiod_grpc_call_duration_seconds', help: 'gRPC call latency in the daemon, from the request to the answer, by method.', labelNames: ['method'], buckets: BUCKETS, registers });
    this.sessionRequestSeconds = new Histogram({
      name: 'kvmvfiod_session_request_duration_seconds',
      help: 'Session requests to VMMs, from sending to the result (late ones too), by kind and outcome (ok, the errno name, unanswered, closed).',
      labelNames: ['kind', 'outcome'],
      buckets: BUCKETS,
      registers,
    });
    this.stateCommitSeconds = new Histogram({ name: 'kvmvfiod_state_commit_duration_seconds', help: 'State store commits: the transaction written and fdatasync\'d.', buckets: BUCKETS, registers });
    this.stateCommitFailures = new Counter({ name: 'kvmvfiod_state_commit_failures_total', help: 'State store commits that failed, by errno.', labelNames: ['errno'], registers });
    this.refusals = new Counter({ name: 'kvmvfiod_connections_refused_total', help: 'Connections closed at accept, by socket (api, handoff) and reason.', labelNames: ['socket', 'reason'], registers });
  }

  get contentType(): string {
    return this.registry.contentType;
  }

  text(): Promise<string> {
    return this.registry.metrics();
  }
}

/** Parses --metrics-address: "PORT" or ":PORT" (loopback), "HOST:PORT", "[V6]:PORT". */
export function parseMetricsAddress(v: string): { host: string; port: number } {
  const m = /^(?:(?:\[([0-9a-fA-F:.]+)\]|([^:[\]]*)):)?(\d{1,5})$/.exec(v);
  const port = m ? Number(m[3]) : NaN;
  if (!m || !(port > 0 && port < 65536)) throw new Error(`--metrics-address: "${v}" is not PORT, HOST:PORT or [V6]:PORT`);
  const host = m[1] ?? (m[2] || '127.0.0.1');
  return { host, port };
}

/** The HTTP listener: GET /metrics, nothing else. */
export function serveMetrics(metrics: Metrics, host: string, port: number): Promise<Server> {
  const server = createServer((req: IncomingMessage, res: ServerResponse) => {
    if (req.method !== 'GET' || (req.url ?? '').split('?')[0] !== '/metrics') {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('only GET /metrics is served here\n');
      return;
    }
    metrics.text().then(
      (text) => res.writeHead(200, { 'content-type': metrics.contentType }).end(text),
      (e: Error) => res.writeHead(500, { 'content-type': 'text/plain' }).end(`metrics unavailable: ${e.message}\n`),
    );
  });
  // A scraper does not keep a connection for long; an idle one is closed.
  server.keepAliveTimeout = 30_000;
  server.headersTimeout = 10_000;
  server.requestTimeout = 10_000;
  server.maxConnections = 64;
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => {
      server.off('error', reject);
      resolve(server);
    });
  });
}
