/**
 * The daemon's settings: each has a flag and an environment variable
 * (DESIGN.md, "Names"); a flag wins over the environment, which wins over
 * the default.
 */
import { parseArgs } from 'node:util';
import { join } from 'node:path';
import { parseMetricsAddress } from '../server/metrics';

export interface DaemonConfig {
  runtimeDir: string;
  stateDir: string;
  policy: string;
  sysfsRoot: string;
  devRoot: string;
  logLevel: string;
  /** How long SIGTERM waits for calls in flight before closing connections. */
  shutdownGraceMs: number;
  /** Lifetime of an attach token. */
  tokenTtlMs: number;
  /** How long a request to a VMM waits for its answer. */
  vmmTimeoutMs: number;
  /** How long DeleteVm waits for a VMM to exit; also a failed VMM's time before SIGKILL. */
  vmmExitGraceMs: number;
  /** How long a handoff connection has to present its token. */
  attachTimeoutMs: number;
  /** Daemon-wide limits (RESOURCE_EXHAUSTED, or a refused connection, beyond them). */
  maxVms: number;
  maxSessions: number;
  /**
   * API connections of callers other than uid 0 and admin principals, together; each such uid
   * holds at most `maxApiConnectionsPerUid`. uid 0 and admins are never refused by either.
   */
  maxApiConnections: number;
  maxApiConnectionsPerUid: number;
  /** Handoff connections not attached yet (uid 0's aside), together and per uid. */
  maxHandoffConnections: number;
  maxHandoffConnectionsPerUid: number;
  /** An API connection with no call in flight (or that never completes the HTTP/2 handshake) is closed after this. */
  apiIdleTimeoutMs: number;
  /** Log lines of one event (that an unprivileged peer can cause) and uid let through per interval; then one summary line per interval. */
  logBurst: number;
  logIntervalMs: number;
  /** WatchVms streams open at once per uid (uid 0 is not limited). */
  maxWatchesPerUid: number;
  /** fds kept free under RLIMIT_NOFILE: calls that would open more fail with RESOURCE_EXHAUSTED first. */
  fdMargin: number;
  /** The longest any unary call may run. */
  callTimeoutMs: number;
  /** Where Prometheus scrapes GET /metrics over HTTP; unset: no TCP listener (GetMetrics still answers). */
  metrics?: { host: string; port: number };
  /** How long RemoveGroup on a QEMU VM waits for the guest to let go of a device (DEVICE_DELETED). */
  hotUnplugTimeoutMs: number;
}

export const DEFAULTS: DaemonConfig = {
  runtimeDir: '/run/kvmvfiod',
  stateDir: '/var/lib/kvmvfiod',
  policy: '/etc/kvmvfiod/policy.json',
  sysfsRoot: '/sys',
  devRoot: '/dev',
  logLevel: 'info',
  shutdownGraceMs: 5000,
  tokenTtlMs: 60_000,
  vmmTimeoutMs: 5000,
  vmmExitGraceMs: 10_000,
  attachTimeoutMs: 10_000,
  maxVms: 10_000,
  maxSessions: 8_000,
  maxApiConnections: 1024,
  maxApiConnectionsPerUid: 64,
  maxHandoffConnections: 2048,
  maxHandoffConnectionsPerUid: 256,
  apiIdleTimeoutMs: 60_000,
  logBurst: 10,
  logIntervalMs: 10_000,
  maxWatchesPerUid: 16,
  fdMargin: 256,
  callTimeoutMs: 60_000,
  hotUnplugTimeoutMs: 20_000,
};

export const USAGE = `Usage: kvmvfiod [OPTION]...

Root broker of /dev/kvm and VFIO groups for sandboxed VMMs.

It holds /dev/kvm and the VFIO groups, records VMs and serves the kvmvfio.v1 gRPC API on
api.sock; an unprivileged VMM presents a VM's attach token on handoff.sock and receives the
fds it needs. A flag wins over its environment variable, which wins over the default.

Options (environment variable in brackets, default in parentheses):
  --runtime-dir DIR   sockets api.sock and handoff.sock [KVMVFIOD_RUNTIME_DIR] (${DEFAULTS.runtimeDir})
  --state-dir DIR     state [KVMVFIOD_STATE_DIR] (${DEFAULTS.stateDir})
  --policy FILE       policy file [KVMVFIOD_POLICY] (${DEFAULTS.policy})
  --sysfs DIR         sysfs root [KVMVFIOD_SYSFS] (${DEFAULTS.sysfsRoot})
  --dev DIR           /dev root [KVMVFIOD_DEV] (${DEFAULTS.devRoot})
  --log-level LEVEL   trace|debug|info|warn|error [KVMVFIOD_LOG_LEVEL] (${DEFAULTS.logLevel})
  --shutdown-grace-ms N  time calls in flight get at SIGTERM (${DEFAULTS.shutdownGraceMs})
  --token-ttl-ms N    lifetime of an attach token [KVMVFIOD_TOKEN_TTL_MS] (${DEFAULTS.tokenTtlMs})
  --vmm-timeout-ms N  how long a VMM has to answer a request (${DEFAULTS.vmmTimeoutMs})
  --vmm-exit-grace-ms N  how long DeleteVm waits for a VMM to exit (${DEFAULTS.vmmExitGraceMs})
  --attach-timeout-ms N  how long a handoff connection has to attach (${DEFAULTS.attachTimeoutMs})
  --max-vms N         VM records at most (${DEFAULTS.maxVms})
  --max-sessions N    attached VMM sessions at most (${DEFAULTS.maxSessions})
  --max-api-connections N  API connections of callers other than uid 0 and admin
                      principals, together [KVMVFIOD_MAX_API_CONNECTIONS] (${DEFAULTS.maxApiConnections})
  --max-api-connections-per-uid N  API connections of one such uid
                      [KVMVFIOD_MAX_API_CONNECTIONS_PER_UID] (${DEFAULTS.maxApiConnectionsPerUid})
  --max-handoff-connections N  handoff connections not attached yet, uid 0's aside
                      [KVMVFIOD_MAX_HANDOFF_CONNECTIONS] (${DEFAULTS.maxHandoffConnections})
  --max-handoff-connections-per-uid N  unattached handoff connections of one uid
                      [KVMVFIOD_MAX_HANDOFF_CONNECTIONS_PER_UID] (${DEFAULTS.maxHandoffConnectionsPerUid})
  --api-idle-timeout-ms N  an API connection with no call in flight is closed
                      [KVMVFIOD_API_IDLE_TIMEOUT_MS] (${DEFAULTS.apiIdleTimeoutMs})
  --log-burst N       lines of one event and uid a peer can cause, per interval; the rest
                      are counted in one summary line [KVMVFIOD_LOG_BURST] (${DEFAULTS.logBurst})
  --log-interval-ms N  the interval of --log-burst [KVMVFIOD_LOG_INTERVAL_MS] (${DEFAULTS.logIntervalMs})
  --max-watches-per-uid N  WatchVms streams open at once per uid; uid 0 is not limited
                      [KVMVFIOD_MAX_WATCHES_PER_UID] (${DEFAULTS.maxWatchesPerUid})
  --fd-margin N       fds kept free under RLIMIT_NOFILE (${DEFAULTS.fdMargin})
  --call-timeout-ms N  the longest a call may run (${DEFAULTS.callTimeoutMs})
  --metrics-address [HOST:]PORT  serve Prometheus metrics at http://HOST:PORT/metrics;
                      HOST defaults to 127.0.0.1; off unless given (the GetMetrics call
                      serves the same text on the API socket) [KVMVFIOD_METRICS_ADDRESS]
  --hot-unplug-timeout-ms N  how long RemoveGroup on a QEMU VM waits for its guest to
                      let go of a device (${DEFAULTS.hotUnplugTimeoutMs}); QMP commands get --vmm-timeout-ms
  --help              this help
  --version           the daemon's version

Environment (besides the options' variables):
  KVMVFIOD_LOOP_STATS  1: log the event loop's delay histogram every 10 s (event loop-delay)
  STATE_DIRECTORY      the state directory when neither --state-dir nor KVMVFIOD_STATE_DIR
                       is given (systemd sets it from StateDirectory=)
  NOTIFY_SOCKET        set by systemd: readiness (READY=1, STATUS=), the watchdog and the fd
                       store, which keeps /dev/kvm, group fds and VMM sessions across a restart
  LISTEN_FDS, LISTEN_FDNAMES  set by systemd: the listening sockets, found by their names
                       api and handoff; the daemon then creates no socket of its own

Files:
  /run/kvmvfiod/api.sock       the gRPC API, mode 0666: SO_PEERCRED and the policy are the gate
  /run/kvmvfiod/handoff.sock   VMM sessions (SOCK_SEQPACKET), mode 0666: attach tokens are the gate
  /var/lib/kvmvfiod/state.mdb  the state store (LMDB), mode 0600 in a 0700 directory; a change
                               is acknowledged once it is written there and fdatasync'd
  /etc/kvmvfiod/policy.json    who may call what; absent, only uid 0 may call

Signals:
  SIGTERM, SIGINT     stop accepting, let calls in flight finish (--shutdown-grace-ms), end
                      every session and close every fd, exit 0 (1 when changes could not be
                      saved); VMs are not stopped: they live in their VMMs
  SIGHUP              read the policy file again; one that does not validate keeps the old
                      policy and is logged (policy-reload-failed)
`;

const LEVELS = ['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent'];

export class ConfigError extends Error {}

const ms = (v: string | undefined, fallback: number) => (v === undefined ? fallback : /^\d+$/.test(v) ? Number(v) : NaN);

export function parseConfig(argv: string[], env: NodeJS.ProcessEnv): DaemonConfig | 'help' | 'version' {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      options: {
        'runtime-dir': { type: 'string' },
        'state-dir': { type: 'string' },
        policy: { type: 'string' },
        sysfs: { type: 'string' },
        dev: { type: 'string' },
        'log-level': { type: 'string' },
        'shutdown-grace-ms': { type: 'string' },
        'token-ttl-ms': { type: 'string' },
        'vmm-timeout-ms': { type: 'string' },
        'vmm-exit-grace-ms': { type: 'string' },
        'attach-timeout-ms': { type: 'string' },
        'max-vms': { type: 'string' },
        'max-sessions': { type: 'string' },
        'max-api-connections': { type: 'string' },
        'max-api-connections-per-uid': { type: 'string' },
        'max-handoff-connections': { type: 'string' },
        'max-handoff-connections-per-uid': { type: 'string' },
        'api-idle-timeout-ms': { type: 'string' },
        'log-burst': { type: 'string' },
        'log-interval-ms': { type: 'string' },
        'max-watches-per-uid': { type: 'string' },
        'fd-margin': { type: 'string' },
        'call-timeout-ms': { type: 'string' },
        'metrics-address': { type: 'string' },
        'hot-unplug-timeout-ms': { type: 'string' },
        help: { type: 'boolean' },
        version: { type: 'boolean' },
      },
      strict: true,
      allowPositionals: false,
    }));
  } catch (e) {
    throw new ConfigError((e as Error).message);
  }
  if (values.help) return 'help';
  if (values.version) return 'version';
  const cfg: DaemonConfig = {
    runtimeDir: values['runtime-dir'] ?? env.KVMVFIOD_RUNTIME_DIR ?? DEFAULTS.runtimeDir,
    // STATE_DIRECTORY: set by systemd for StateDirectory=.
    stateDir: values['state-dir'] ?? env.KVMVFIOD_STATE_DIR ?? env.STATE_DIRECTORY?.split(':')[0] ?? DEFAULTS.stateDir,
    policy: values.policy ?? env.KVMVFIOD_POLICY ?? DEFAULTS.policy,
    sysfsRoot: values.sysfs ?? env.KVMVFIOD_SYSFS ?? DEFAULTS.sysfsRoot,
    devRoot: values.dev ?? env.KVMVFIOD_DEV ?? DEFAULTS.devRoot,
    logLevel: values['log-level'] ?? env.KVMVFIOD_LOG_LEVEL ?? DEFAULTS.logLevel,
    shutdownGraceMs: ms(values['shutdown-grace-ms'], DEFAULTS.shutdownGraceMs),
    tokenTtlMs: ms(values['token-ttl-ms'] ?? env.KVMVFIOD_TOKEN_TTL_MS, DEFAULTS.tokenTtlMs),
    vmmTimeoutMs: ms(values['vmm-timeout-ms'], DEFAULTS.vmmTimeoutMs),
    vmmExitGraceMs: ms(values['vmm-exit-grace-ms'], DEFAULTS.vmmExitGraceMs),
    attachTimeoutMs: ms(values['attach-timeout-ms'], DEFAULTS.attachTimeoutMs),
    maxVms: ms(values['max-vms'], DEFAULTS.maxVms),
    maxSessions: ms(values['max-sessions'], DEFAULTS.maxSessions),
    maxApiConnections: ms(values['max-api-connections'] ?? env.KVMVFIOD_MAX_API_CONNECTIONS, DEFAULTS.maxApiConnections),
    maxApiConnectionsPerUid: ms(values['max-api-connections-per-uid'] ?? env.KVMVFIOD_MAX_API_CONNECTIONS_PER_UID, DEFAULTS.maxApiConnectionsPerUid),
    maxHandoffConnections: ms(values['max-handoff-connections'] ?? env.KVMVFIOD_MAX_HANDOFF_CONNECTIONS, DEFAULTS.maxHandoffConnections),
    maxHandoffConnectionsPerUid: ms(values['max-handoff-connections-per-uid'] ?? env.KVMVFIOD_MAX_HANDOFF_CONNECTIONS_PER_UID, DEFAULTS.maxHandoffConnectionsPerUid),
    apiIdleTimeoutMs: ms(values['api-idle-timeout-ms'] ?? env.KVMVFIOD_API_IDLE_TIMEOUT_MS, DEFAULTS.apiIdleTimeoutMs),
    logBurst: ms(values['log-burst'] ?? env.KVMVFIOD_LOG_BURST, DEFAULTS.logBurst),
    logIntervalMs: ms(values['log-interval-ms'] ?? env.KVMVFIOD_LOG_INTERVAL_MS, DEFAULTS.logIntervalMs),
    maxWatchesPerUid: ms(values['max-watches-per-uid'] ?? env.KVMVFIOD_MAX_WATCHES_PER_UID, DEFAULTS.maxWatchesPerUid),
    fdMargin: ms(values['fd-margin'], DEFAULTS.fdMargin),
    callTimeoutMs: ms(values['call-timeout-ms'], DEFAULTS.callTimeoutMs),
    hotUnplugTimeoutMs: ms(values['hot-unplug-timeout-ms'], DEFAULTS.hotUnplugTimeoutMs),
  };
  const metricsAddress = values['metrics-address'] ?? env.KVMVFIOD_METRICS_ADDRESS;
  if (metricsAddress) {
    try {
      cfg.metrics = parseMetricsAddress(metricsAddress);
    } catch (e) {
      throw new ConfigError((e as Error).message);
    }
  }
  if (!LEVELS.includes(cfg.logLevel)) throw new ConfigError(`--log-level: "${cfg.logLevel}" is not one of ${LEVELS.join(', ')}`);
  const bounds: [keyof DaemonConfig, string, number, number][] = [
    ['shutdownGraceMs', '--shutdown-grace-ms', 0, 600_000],
    ['tokenTtlMs', '--token-ttl-ms', 1000, 86_400_000],
    ['vmmTimeoutMs', '--vmm-timeout-ms', 10, 600_000],
    ['vmmExitGraceMs', '--vmm-exit-grace-ms', 10, 600_000],
    ['attachTimeoutMs', '--attach-timeout-ms', 10, 600_000],
    ['maxVms', '--max-vms', 1, 1_000_000],
    ['maxSessions', '--max-sessions', 1, 1_000_000],
    ['maxApiConnections', '--max-api-connections', 1, 1_000_000],
    ['maxApiConnectionsPerUid', '--max-api-connections-per-uid', 1, 1_000_000],
    ['maxHandoffConnections', '--max-handoff-connections', 1, 1_000_000],
    ['maxHandoffConnectionsPerUid', '--max-handoff-connections-per-uid', 1, 1_000_000],
    ['apiIdleTimeoutMs', '--api-idle-timeout-ms', 100, 86_400_000],
    ['logBurst', '--log-burst', 1, 1_000_000],
    ['logIntervalMs', '--log-interval-ms', 100, 3_600_000],
    ['maxWatchesPerUid', '--max-watches-per-uid', 1, 1_000_000],
    ['fdMargin', '--fd-margin', 16, 1_000_000],
    ['callTimeoutMs', '--call-timeout-ms', 100, 3_600_000],
    ['hotUnplugTimeoutMs', '--hot-unplug-timeout-ms', 100, 3_600_000],
  ];
  for (const [key, flag, lo, hi] of bounds) {
    const v = cfg[key] as number;
    if (!Number.isInteger(v) || v < lo || v > hi) throw new ConfigError(`${flag}: an integer from ${lo} to ${hi}`);
  }
  for (const k of ['runtimeDir', 'stateDir', 'sysfsRoot', 'devRoot'] as const) {
    if (!cfg[k].startsWith('/')) throw new ConfigError(`${k}: "${cfg[k]}" must be an absolute path`);
  }
  return cfg;
}

export const apiSocketPath = (c: DaemonConfig) => join(c.runtimeDir, 'api.sock');
export const handoffSocketPath = (c: DaemonConfig) => join(c.runtimeDir, 'handoff.sock');
