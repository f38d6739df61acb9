/**
 * Why a daemon holding many fds stalls now and then: when a process with
 * threads (Node always has them: the libuv pool, V8's) outgrows its fd table,
 * the kernel (expand_fdtable) waits for an RCU grace period in the thread that
 * asked for the fd — here the event loop — ~5-20 ms on this host, at 256,
 * 512, 1024, 2048, 4096 ... open fds. Each VM with a live session holds 2 fds
 * in the daemon (session socket, pidfd), so the daemon crosses those lines
 * as VMs come.
 *
 * Run in a child of its own (a table never shrinks):
 *   node fdtable.js [--pregrow]   → one JSON line
 * It makes 5,000 fds with OwnedFd.dup (fcntl F_DUPFD_CLOEXEC, what the
 * daemon does per attach) and reports the slow ones. --pregrow first makes
 * fd 19,999 and closes it: the table is sized once, at start, and no later
 * fd waits (the fix suggested for the daemon).
 */
import { closeSync, openSync, readFile } from 'node:fs';
import koffi from 'koffi';
import { OwnedFd } from '../src/kernel/fd';

const F_DUPFD_CLOEXEC = 1030;
const fcntl = koffi.load('libc.so.6').func('int fcntl(int fd, int cmd, int arg)');

// One pool job first, so the libuv threads exist, as in the daemon.
readFile('/proc/self/status', () => {
  const base = new OwnedFd(openSync('/dev/null', 'r'), '/dev/null');
  let pregrowMs: number | undefined;
  if (process.argv.includes('--pregrow')) {
    const t = process.hrtime.bigint();
    const top = fcntl(base.fd, F_DUPFD_CLOEXEC, 19_999) as number;
    if (top >= 0) closeSync(top);
    pregrowMs = Number(process.hrtime.bigint() - t) / 1e6;
  }
  const held: OwnedFd[] = [];
  const slow: { fd: number; ms: number }[] = [];
  let worstMs = 0;
  for (let i = 0; i < 5000; i++) {
    const t = process.hrtime.bigint();
    const fd = base.dup();
    const ms = Number(process.hrtime.bigint() - t) / 1e6;
    held.push(fd);
    worstMs = Math.max(worstMs, ms);
    if (ms > 1) slow.push({ fd: fd.fd, ms: Math.round(ms * 10) / 10 });
  }
  process.stdout.write(`${JSON.stringify({ pregrowMs, slow, worstMs: Math.round(worstMs * 100) / 100 })}\n`);
  for (const f of held) f.closeSync();
});
