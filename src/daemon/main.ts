#!/usr/bin/env -S node --max-semi-space-size=2
/** kvmvfiod: the entry point. Parses settings, starts the daemon, stops it on SIGTERM/SIGINT. */
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { format } from 'node:util';
import { DAEMON_VERSION } from '../version';
import { ConfigError, USAGE, parseConfig } from './config';
import { Daemon } from './daemon';
import pino from 'pino';
import { createLogger } from './log';

async function main(): Promise<number> {
  let cfg;
  try {
    cfg = parseConfig(process.argv.slice(2), process.env);
  } catch (e) {
    if (e instanceof ConfigError) {
      process.stderr.write(`kvmvfiod: ${e.message}\n\n${USAGE}`);
      return 2;
    }
    throw e;
  }
  if (cfg === 'help') return process.stdout.write(USAGE), 0;
  if (cfg === 'version') return process.stdout.write(`${DAEMON_VERSION}\n`), 0;

  // Written off the event loop: lines logged while a write is under way go out together in the next
  // one (measured: synchronous writes of stdout were ~7 % of the daemon's busy time under launch load).
  // Flushed synchronously on every way out, below.
  logDestination = pino.destination({ dest: 1, sync: false });
  const { log, throttle } = createLogger({ level: cfg.logLevel, burst: cfg.logBurst, intervalMs: cfg.logIntervalMs }, logDestination);
  // A library that prints (lmdb, on a commit that failed) reaches the log as one structured line, not raw stderr.
  for (const level of ['error', 'warn', 'log', 'info'] as const) {
    console[level] = (...args: unknown[]) => log.warn({ event: 'library-output', text: format(...args).slice(0, 2000) }, 'output of a library');
  }
  const daemon = new Daemon(cfg, log);
  try {
    await daemon.start();
  } catch (e) {
    log.fatal({ event: 'start-failed', err: (e as Error).message }, `cannot start: ${(e as Error).message}`);
    await daemon.stop().catch(() => {});
    return 1;
  }
  log.info({ event: 'ready', runtimeDir: cfg.runtimeDir, version: DAEMON_VERSION, daemon_pid: process.pid }, 'kvmvfiod ready');

  // Test hook for the watchdog lane: SIGUSR2 blocks the event loop for this many seconds, as a stuck
  // loop would; systemd's watchdog must then act. Off unless the variable is set.
  const stall = Number(process.env.KVMVFIOD_TEST_STALL_ON_SIGUSR2 ?? 0);
  if (stall > 0) {
    process.on('SIGUSR2', () => {
      log.warn({ event: 'test-stall', seconds: stall }, 'blocking the event loop (KVMVFIOD_TEST_STALL_ON_SIGUSR2)');
      const end = Date.now() + stall * 1000;
      while (Date.now() < end);
    });
  }

  process.on('SIGHUP', () => void daemon.reloadPolicy());

  // KVMVFIOD_LOOP_STATS=1: the event loop's delay histogram, logged every 10 s and at stop (benchmarks, diagnosis).
  let loopStats: (() => void) | undefined;
  if (process.env.KVMVFIOD_LOOP_STATS === '1') {
    const h = monitorEventLoopDelay({ resolution: 2 });
    h.enable();
    loopStats = () => {
      log.info({ event: 'loop-delay', max_ms: h.max / 1e6, p99_ms: h.percentile(99) / 1e6, mean_ms: h.mean / 1e6 }, 'event-loop delay');
      h.reset();
    };
    setInterval(loopStats, 10_000).unref();
  }

  return new Promise<number>((resolve) => {
    const onSignal = (signal: NodeJS.Signals) => {
      log.info({ event: 'signal', signal }, 'stopping');
      // A second signal while stopping does not cut the cleanup short.
      process.removeAllListeners('SIGTERM');
      process.removeAllListeners('SIGINT');
      process.on('SIGTERM', () => {});
      process.on('SIGINT', () => {});
      daemon.stop().then(
        () => {
          loopStats?.();
          // What was held back until now gets its summary line.
          throttle.close();
          resolve(0);
        },
        (e) => {
          log.error({ event: 'stop-failed', err: (e as Error).message }, 'error while stopping');
          resolve(1);
        },
      );
    };
    process.once('SIGTERM', onSignal);
    process.once('SIGINT', onSignal);
  });
}

/** The log's stream once main() made it: flushed before the process leaves. */
let logDestination: ReturnType<typeof pino.destination> | undefined;

function flushLog(): void {
  try {
    logDestination?.flushSync();
  } catch {
    // stdout gone (EPIPE): nothing more can be said.
  }
}

main().then(
  (code) => {
    flushLog();
    process.exitCode = code;
    // Anything left on the loop after stop() is a bug, but it must not keep
    // a stopped daemon alive: leave shortly.
    setTimeout(() => {
      flushLog();
      process.exit(code);
    }, 1000).unref();
  },
  (e) => {
    process.stderr.write(`kvmvfiod: ${(e as Error).stack ?? e}\n`);
    flushLog();
    process.exit(70);
  },
);
