/**
 * The daemon's settings: each has a flag and an environment variable
 * (DESIGN.md, "Names"); a flag wins over the environment, which wins over
 * the default.
 */
import { parseArgs } from 'node:util';
import { join } from 'node:path';

export interface DaemonConfig {
  runtimeDir: string;
  stateDir: string;
  policy: string;
  sysfsRoot: string;
  devRoot: string;
  logLevel: string;
  /** How long SIGTERM waits for calls in flight before closing connections. */
  shutdownGraceMs: number;
}

export const DEFAULTS: DaemonConfig = {
  runtimeDir: '/run/kvmvfiod',
  stateDir: '/var/lib/kvmvfiod',
  policy: '/etc/kvmvfiod/policy.json',
  sysfsRoot: '/sys',
  devRoot: '/dev',
  logLevel: 'info',
  shutdownGraceMs: 5000,
};

export const USAGE = `Usage: kvmvfiod [options]

Root broker of /dev/kvm and VFIO groups for sandboxed VMMs.

Options (environment variable in brackets):
  --runtime-dir DIR   sockets api.sock and handoff.sock [KVMVFIOD_RUNTIME_DIR] (${DEFAULTS.runtimeDir})
  --state-dir DIR     state [KVMVFIOD_STATE_DIR] (${DEFAULTS.stateDir})
  --policy FILE       policy file [KVMVFIOD_POLICY] (${DEFAULTS.policy})
  --sysfs DIR         sysfs root [KVMVFIOD_SYSFS] (${DEFAULTS.sysfsRoot})
  --dev DIR           /dev root [KVMVFIOD_DEV] (${DEFAULTS.devRoot})
  --log-level LEVEL   trace|debug|info|warn|error [KVMVFIOD_LOG_LEVEL] (${DEFAULTS.logLevel})
  --shutdown-grace-ms N  time calls in flight get at SIGTERM (${DEFAULTS.shutdownGraceMs})
  --version, --help
`;

const LEVELS = ['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent'];

export class ConfigError extends Error {}

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
    stateDir: values['state-dir'] ?? env.KVMVFIOD_STATE_DIR ?? DEFAULTS.stateDir,
    policy: values.policy ?? env.KVMVFIOD_POLICY ?? DEFAULTS.policy,
    sysfsRoot: values.sysfs ?? env.KVMVFIOD_SYSFS ?? DEFAULTS.sysfsRoot,
    devRoot: values.dev ?? env.KVMVFIOD_DEV ?? DEFAULTS.devRoot,
    logLevel: values['log-level'] ?? env.KVMVFIOD_LOG_LEVEL ?? DEFAULTS.logLevel,
    shutdownGraceMs: values['shutdown-grace-ms'] !== undefined ? Number(values['shutdown-grace-ms']) : DEFAULTS.shutdownGraceMs,
  };
  if (!LEVELS.includes(cfg.logLevel)) throw new ConfigError(`--log-level: "${cfg.logLevel}" is not one of ${LEVELS.join(', ')}`);
  if (!Number.isInteger(cfg.shutdownGraceMs) || cfg.shutdownGraceMs < 0 || cfg.shutdownGraceMs > 600_000) {
    throw new ConfigError('--shutdown-grace-ms: an integer from 0 to 600000');
  }
  for (const k of ['runtimeDir', 'stateDir', 'sysfsRoot', 'devRoot'] as const) {
    if (!cfg[k].startsWith('/')) throw new ConfigError(`${k}: "${cfg[k]}" must be an absolute path`);
  }
  return cfg;
}

export const apiSocketPath = (c: DaemonConfig) => join(c.runtimeDir, 'api.sock');
export const handoffSocketPath = (c: DaemonConfig) => join(c.runtimeDir, 'handoff.sock');
