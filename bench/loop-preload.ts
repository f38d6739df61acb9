/**
 * Loaded into the daemon with `node --require` by the benchmark only: the
 * daemon has no hook of its own yet for its event-loop delay. It keeps a
 * perf_hooks.monitorEventLoopDelay histogram (1 ms timer) and, on SIGUSR2,
 * writes it with process.memoryUsage() to $KVMVFIO_BENCH_LOOP_FILE (write,
 * then rename) and starts a new one. Without that variable it does nothing.
 *
 * With $KVMVFIO_BENCH_PROFILE_DIR as well, a CPU profile (node:inspector,
 * in this process) runs from one SIGUSR2 to the next and is written as
 * window-<seq>.cpuprofile there, <seq> being that of the loop report written
 * at the same signal: one profile per measured window, without start-up.
 *
 * The hook the daemon should have (suggested in bench/RESULTS.md): the same
 * histogram behind an environment variable, logged at stop and on demand.
 */
import { renameSync, writeFileSync } from 'node:fs';
import { Session } from 'node:inspector';
import { join } from 'node:path';
import { monitorEventLoopDelay } from 'node:perf_hooks';

const file = process.env.KVMVFIO_BENCH_LOOP_FILE;
const profileDir = process.env.KVMVFIO_BENCH_PROFILE_DIR;

function startProfiler(): Session {
  const s = new Session();
  s.connect();
  s.post('Profiler.enable');
  s.post('Profiler.setSamplingInterval', { interval: 250 });
  s.post('Profiler.start');
  return s;
}

if (file) {
  const h = monitorEventLoopDelay({ resolution: 1 });
  h.enable();
  let seq = 0;
  let since = Date.now();
  let profiler = profileDir ? startProfiler() : undefined;
  process.on('SIGUSR2', () => {
    const ms = (ns: number) => Math.round(ns / 1000) / 1000;
    const mem = process.memoryUsage();
    const out = {
      seq: ++seq,
      windowMs: Date.now() - since,
      // Intervals of a 1 ms repeating timer: how late the loop came round to it (the reader removes the 1 ms).
      maxMs: ms(h.max),
      p99Ms: ms(h.percentile(99)),
      p999Ms: ms(h.percentile(99.9)),
      meanMs: ms(h.mean),
      samples: h.count,
      rssMb: mem.rss / 1048576,
      heapUsedMb: mem.heapUsed / 1048576,
      heapTotalMb: mem.heapTotal / 1048576,
      externalMb: mem.external / 1048576,
    };
    if (profiler && profileDir) {
      const done = profiler;
      const n = seq;
      done.post('Profiler.stop', (err, res) => {
        if (!err) writeFileSync(join(profileDir, `window-${n}.cpuprofile`), JSON.stringify(res.profile));
        done.disconnect();
      });
      profiler = startProfiler();
    }
    writeFileSync(`${file}.tmp`, JSON.stringify(out));
    renameSync(`${file}.tmp`, file);
    h.reset();
    since = Date.now();
  });
}
