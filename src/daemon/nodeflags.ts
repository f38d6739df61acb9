/**
 * The V8 flags kvmvfiod runs with, wherever it is started: the systemd unit,
 * the container's ENTRYPOINT, `npm start`, the executable's `#!` line, the
 * tests and the benchmark (test/unit/nodeflags.test.ts checks they agree).
 *
 * --max-semi-space-size=2 (MiB; Node 20's default is 16 on this machine):
 * objects alive across a call's awaits get promoted, and with a large young
 * generation the old space then grows in big steps V8 keeps. Filling 10,000
 * records took RSS to 159 MB with the default and 131 MB with 2 MiB, for
 * the same live heap (bench/RESULTS.md).
 */
export const DAEMON_NODE_FLAGS: readonly string[] = ['--max-semi-space-size=2'];
