import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ConfigError, DEFAULTS, USAGE, apiSocketPath, parseConfig } from '../../src/daemon/config';

test('defaults are the paths of DESIGN.md', () => {
  const c = parseConfig([], {});
  assert.deepEqual(c, DEFAULTS);
  assert.equal(apiSocketPath(DEFAULTS), '/run/kvmvfiod/api.sock');
});

test('the environment overrides defaults and a flag overrides the environment', () => {
  const env = {
    KVMVFIOD_RUNTIME_DIR: '/tmp/env-run',
    KVMVFIOD_STATE_DIR: '/tmp/env-state',
    KVMVFIOD_POLICY: '/tmp/p.json',
    KVMVFIOD_SYSFS: '/tmp/sys',
    KVMVFIOD_DEV: '/tmp/dev',
    KVMVFIOD_LOG_LEVEL: 'warn',
  };
  const fromEnv = parseConfig([], env);
  assert.ok(typeof fromEnv === 'object');
  assert.equal(fromEnv.runtimeDir, '/tmp/env-run');
  assert.equal(fromEnv.stateDir, '/tmp/env-state');
  assert.equal(fromEnv.policy, '/tmp/p.json');
  assert.equal(fromEnv.sysfsRoot, '/tmp/sys');
  assert.equal(fromEnv.devRoot, '/tmp/dev');
  assert.equal(fromEnv.logLevel, 'warn');
  const fromFlag = parseConfig(['--runtime-dir', '/tmp/flag-run', '--log-level', 'debug'], env);
  assert.ok(typeof fromFlag === 'object');
  assert.equal(fromFlag.runtimeDir, '/tmp/flag-run');
  assert.equal(fromFlag.logLevel, 'debug');
  assert.equal(fromFlag.stateDir, '/tmp/env-state');
});

test('bad settings are refused with the setting named', () => {
  assert.throws(() => parseConfig(['--log-level', 'loud'], {}), (e: unknown) => e instanceof ConfigError && /--log-level/.test(e.message));
  assert.throws(() => parseConfig(['--runtime-dir', 'relative/dir'], {}), (e: unknown) => e instanceof ConfigError && /runtimeDir.*absolute/.test(e.message));
  assert.throws(() => parseConfig(['--no-such-flag'], {}), ConfigError);
  assert.throws(() => parseConfig(['--shutdown-grace-ms', '-1'], {}), ConfigError);
  assert.equal(parseConfig(['--help'], {}), 'help');
  assert.equal(parseConfig(['--version'], {}), 'version');
});

test('--max-watches-per-uid: 16 by default, at least 1', () => {
  assert.equal(DEFAULTS.maxWatchesPerUid, 16);
  const c = parseConfig(['--max-watches-per-uid', '4'], {});
  assert.ok(typeof c === 'object');
  assert.equal(c.maxWatchesPerUid, 4);
  assert.throws(() => parseConfig(['--max-watches-per-uid', '0'], {}), (e: unknown) => e instanceof ConfigError && /--max-watches-per-uid: an integer from 1/.test(e.message));
});

test('connection limits, the API idle timeout and the log rate: flags, environment, bounds', () => {
  const env = {
    KVMVFIOD_MAX_API_CONNECTIONS: '500',
    KVMVFIOD_MAX_API_CONNECTIONS_PER_UID: '8',
    KVMVFIOD_MAX_HANDOFF_CONNECTIONS: '700',
    KVMVFIOD_MAX_HANDOFF_CONNECTIONS_PER_UID: '9',
    KVMVFIOD_API_IDLE_TIMEOUT_MS: '30000',
    KVMVFIOD_LOG_BURST: '3',
    KVMVFIOD_LOG_INTERVAL_MS: '5000',
  };
  const c = parseConfig([], env);
  assert.ok(typeof c === 'object');
  assert.deepEqual(
    [c.maxApiConnections, c.maxApiConnectionsPerUid, c.maxHandoffConnections, c.maxHandoffConnectionsPerUid, c.apiIdleTimeoutMs, c.logBurst, c.logIntervalMs],
    [500, 8, 700, 9, 30_000, 3, 5000],
  );
  const f = parseConfig(['--max-api-connections-per-uid', '2', '--max-handoff-connections-per-uid', '3', '--api-idle-timeout-ms', '1000', '--log-burst', '1', '--log-interval-ms', '100'], env);
  assert.ok(typeof f === 'object');
  assert.deepEqual([f.maxApiConnectionsPerUid, f.maxHandoffConnectionsPerUid, f.apiIdleTimeoutMs, f.logBurst, f.logIntervalMs], [2, 3, 1000, 1, 100]);
  for (const [flag, bad] of [
    ['--max-api-connections-per-uid', '0'],
    ['--max-handoff-connections-per-uid', 'many'],
    ['--api-idle-timeout-ms', '99'],
    ['--log-burst', '0'],
    ['--log-interval-ms', '10'],
  ]) {
    assert.throws(() => parseConfig([flag, bad], {}), (e: unknown) => e instanceof ConfigError && e.message.startsWith(flag));
  }
  // The usage text names every new flag with its variable.
  for (const v of Object.keys(env)) assert.match(USAGE, new RegExp(v));
});

test("S31: kvmvfioctl vm delete's default deadline exceeds the daemon's default wait for a VMM to exit, by more than a daemon's answer takes", async () => {
  const { DELETE_TIMEOUT_MS } = await import('../../src/cli/main');
  assert.ok(DELETE_TIMEOUT_MS >= DEFAULTS.vmmExitGraceMs + 5000, `${DELETE_TIMEOUT_MS} ms vs --vmm-exit-grace-ms ${DEFAULTS.vmmExitGraceMs}`);
});
