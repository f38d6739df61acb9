/**
 * Runs a real kvmvfiod (the built dist/src/daemon/main.js) in its own
 * process, with its runtime and state dirs in a temp dir and, optionally, a
 * fake sysfs/dev tree. Used by the API and CLI tests.
 */
import { DAEMON_NODE_FLAGS } from '../../src/daemon/nodeflags';
import { type ChildProcess, spawn } from 'node:child_process';
import { chmod, mkdtemp, readdir, rm } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { KvmVfioApi } from '../../src/client/client';

export const REPO = join(__dirname, '..', '..', '..');
export const DAEMON_JS = join(REPO, 'dist', 'src', 'daemon', 'main.js');
export const CLI_JS = join(REPO, 'dist', 'src', 'cli', 'main.js');

export interface LogLine {
  level: number;
  msg: string;
  event?: string;
  [k: string]: unknown;
}

export interface RunningDaemon {
  proc: ChildProcess;
  pid: number;
  dir: string;
  runtimeDir: string;
  apiSocket: string;
  logs: LogLine[];
  client(): KvmVfioApi;
  /** Open fds of the daemon process now. */
  fdCount(): Promise<number>;
  /** SIGTERM and wait for exit; resolves with the exit code and how long it took. */
  stop(signal?: NodeJS.Signals): Promise<{ code: number | null; signal: NodeJS.Signals | null; ms: number }>;
  cleanup(): Promise<void>;
  waitForLog(pred: (l: LogLine) => boolean, timeoutMs?: number): Promise<LogLine>;
}

export interface DaemonOptions {
  sysfs?: string;
  dev?: string;
  env?: Record<string, string>;
  args?: string[];
  /** Reuse a temp dir (its state dir persists across daemons). */
  dir?: string;
  /**
   * fds handed to the daemon as 3, 4, ... with LISTEN_FDS/LISTEN_FDNAMES, as
   * systemd does; LISTEN_PID is set by an exec wrapper, since it must be the
   * daemon's own pid.
   */
  listenFds?: { name: string; fd: number }[];
  /** A command the daemon runs under (e.g. the no-peerpidfd wrapper): it execs node with the daemon's arguments. */
  wrap?: string[];
  /** How long the daemon may take to be ready (default 10 s; the VFIO lane's TCG guest can be slower under load). */
  readyTimeoutMs?: number;
}

export async function startDaemon(opts: DaemonOptions = {}): Promise<RunningDaemon> {
  const dir = opts.dir ?? (await mkdtemp(join(tmpdir(), 'kvmvfiod-test-')));
  // Unprivileged test clients must reach the socket inside.
  await chmod(dir, 0o755);
  const runtimeDir = join(dir, 'run');
  const args = [...DAEMON_NODE_FLAGS, DAEMON_JS, '--runtime-dir', runtimeDir, '--state-dir', join(dir, 'state'), '--policy', join(dir, 'policy.json'), '--log-level', 'debug'];
  if (opts.sysfs) args.push('--sysfs', opts.sysfs);
  if (opts.dev) args.push('--dev', opts.dev);
  args.push(...(opts.args ?? []));
  const env: NodeJS.ProcessEnv = { ...process.env, ...opts.env };
  let cmd = process.execPath;
  let argv = args;
  const stdio: (number | 'ignore' | 'pipe')[] = ['ignore', 'pipe', 'pipe'];
  if (opts.listenFds?.length) {
    env.LISTEN_FDS = String(opts.listenFds.length);
    env.LISTEN_FDNAMES = opts.listenFds.map((f) => f.name).join(':');
    stdio.push(...opts.listenFds.map((f) => f.fd));
    cmd = '/bin/sh';
    argv = ['-c', 'LISTEN_PID=$$ exec "$0" "$@"', process.execPath, ...args];
  }
  if (opts.wrap?.length) {
    argv = [...opts.wrap.slice(1), cmd, ...argv];
    cmd = opts.wrap[0];
  }
  const proc = spawn(cmd, argv, { stdio, env });
  const logs: LogLine[] = [];
  const waiters = new Set<() => void>();
  let buf = '';
  let stderr = '';
  proc.stdout!.setEncoding('utf8').on('data', (chunk: string) => {
    buf += chunk;
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, i);
      buf = buf.slice(i + 1);
      try {
        logs.push(JSON.parse(line) as LogLine);
      } catch {
        logs.push({ level: 0, msg: line });
      }
      for (const w of waiters) w();
    }
  });
  proc.stderr!.setEncoding('utf8').on('data', (c: string) => (stderr += c));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => proc.once('exit', (code, signal) => resolve({ code, signal })));

  const waitForLog = (pred: (l: LogLine) => boolean, timeoutMs = 10_000) =>
    new Promise<LogLine>((resolve, reject) => {
      const check = () => {
        const hit = logs.find(pred);
        if (hit) {
          waiters.delete(check);
          clearTimeout(timer);
          resolve(hit);
        }
      };
      const timer = setTimeout(() => {
        waiters.delete(check);
        reject(new Error(`log line not seen in ${timeoutMs} ms; stderr: ${stderr}; logs: ${JSON.stringify(logs.slice(-5))}`));
      }, timeoutMs);
      waiters.add(check);
      check();
    });

  const ready = await Promise.race([
    waitForLog((l) => l.event === 'ready' || l.event === 'start-failed', opts.readyTimeoutMs).then((l) => l.event === 'ready'),
    exited.then(() => false),
  ]).catch((e: unknown) => {
    // Not ready in time: a daemon left running would keep the test process (and its lane) alive.
    proc.kill('SIGKILL');
    throw e;
  });
  if (!ready) {
    proc.kill('SIGKILL');
    throw new Error(`daemon did not start; stderr: ${stderr}; logs: ${JSON.stringify(logs)}`);
  }
  const clients: KvmVfioApi[] = [];
  const d: RunningDaemon = {
    proc,
    pid: proc.pid!,
    dir,
    runtimeDir,
    apiSocket: join(runtimeDir, 'api.sock'),
    logs,
    client() {
      const c = new KvmVfioApi(join(runtimeDir, 'api.sock'), { timeoutMs: 5000 });
      clients.push(c);
      return c;
    },
    async fdCount() {
      return (await readdir(`/proc/${proc.pid}/fd`)).length;
    },
    async stop(signal = 'SIGTERM') {
      for (const c of clients.splice(0)) c.close();
      const t0 = Date.now();
      if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
      const r = await exited;
      return { ...r, ms: Date.now() - t0 };
    },
    async cleanup() {
      if (proc.exitCode === null && proc.signalCode === null) {
        proc.kill('SIGKILL');
        await exited;
      }
      if (!opts.dir && existsSync(dir)) await rm(dir, { recursive: true, force: true });
    },
    waitForLog,
  };
  return d;
}
