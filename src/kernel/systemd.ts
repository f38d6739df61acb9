/**
 * systemd integration through libsystemd.so.0 (koffi): sd_notify for
 * READY/STATUS/WATCHDOG/STOPPING, sd_pid_notify_with_fds for the fd store,
 * and the fds systemd passed (socket activation and the store) by name.
 *
 * The npm package `systemd-notify` of the design card is not used: it spawns
 * a process per message, is refused under NotifyAccess=main once the unit
 * drops capabilities, and cannot pass fds (measured in shared/labs/systemd).
 *
 * Without NOTIFY_SOCKET (not run by systemd) every call is a no-op.
 */
import koffi from 'koffi';
import { SysError } from './errors';
import { OwnedFd } from './fd';
import { lastErrno, libc } from './libc';

interface SdLib {
  notify(unsetEnv: number, state: string): number;
  notifyWithFds(pid: number, unsetEnv: number, state: string, fds: Int32Array, n: number): number;
  watchdogEnabled(unsetEnv: number, usec: bigint[]): number;
}

let lib: SdLib | null | undefined;

function sd(): SdLib | null {
  if (lib !== undefined) return lib;
  try {
    const l = koffi.load('libsystemd.so.0');
    lib = {
      notify: l.func('int sd_notify(int unset_environment, const char *state)'),
      notifyWithFds: l.func('int sd_pid_notify_with_fds(int pid, int unset_environment, const char *state, const int *fds, unsigned int n_fds)'),
      watchdogEnabled: l.func('int sd_watchdog_enabled(int unset_environment, _Out_ uint64_t *usec)'),
    };
  } catch {
    lib = null; // no libsystemd (a minimal container): nothing to notify
  }
  return lib;
}

const fcntl = libc.fcntl;
const F_SETFD = 2;
const FD_CLOEXEC = 1;
const SD_LISTEN_FDS_START = 3;

export class Systemd {
  /** Whether a service manager listens (NOTIFY_SOCKET is set and libsystemd loads). */
  static get managed(): boolean {
    return !!process.env.NOTIFY_SOCKET && sd() !== null;
  }

  /** sd_notify(3) with newline-separated assignments ("READY=1\nSTATUS=..."). Returns whether it was sent. */
  static notify(state: string): boolean {
    const l = Systemd.managed ? sd() : null;
    if (!l) return false;
    const r = l.notify(0, state);
    if (r < 0) throw new SysError('sd_notify', state.split('\n')[0], -r);
    return r > 0;
  }

  /** sd_pid_notify_with_fds(3): FDSTORE=1 with FDNAME=name (one name per message). The fds stay ours. */
  static storeFds(name: string, fds: number[]): boolean {
    const l = Systemd.managed ? sd() : null;
    if (!l || fds.length === 0) return false;
    const r = l.notifyWithFds(0, 0, `FDSTORE=1\nFDNAME=${name}\nFDPOLL=0`, Int32Array.from(fds), fds.length);
    if (r < 0) throw new SysError('sd_pid_notify_with_fds(FDSTORE)', name, -r);
    return r > 0;
  }

  /** FDSTOREREMOVE=1: systemd closes its copies of the fds stored under `name`. */
  static removeFds(name: string): boolean {
    return Systemd.notify(`FDSTOREREMOVE=1\nFDNAME=${name}`);
  }

  /** The watchdog interval in µs when the unit has WatchdogSec= for this process, else 0. */
  static watchdogUsec(): number {
    const l = Systemd.managed ? sd() : null;
    if (!l) return 0;
    const out = [0n];
    const r = l.watchdogEnabled(0, out);
    return r > 0 ? Number(out[0]) : 0;
  }
}

/**
 * The fds systemd passed this process (LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES,
 * sockets first, then the fd store), owned, close-on-exec, grouped by name.
 * The order is systemd's, not the unit's: callers look fds up by name. The
 * variables are removed so no child inherits them.
 */
export function takeListenFds(env: NodeJS.ProcessEnv = process.env): Map<string, OwnedFd[]> {
  const out = new Map<string, OwnedFd[]>();
  const pid = Number(env.LISTEN_PID);
  const n = Number(env.LISTEN_FDS);
  const names = (env.LISTEN_FDNAMES ?? '').split(':');
  delete env.LISTEN_PID;
  delete env.LISTEN_FDS;
  delete env.LISTEN_FDNAMES;
  if (pid !== process.pid || !Number.isInteger(n) || n <= 0) return out;
  for (let i = 0; i < n; i++) {
    const fd = SD_LISTEN_FDS_START + i;
    if ((fcntl(fd, F_SETFD, FD_CLOEXEC) as number) < 0) throw new SysError('fcntl(FD_CLOEXEC)', `listen fd ${fd}`, lastErrno());
    const name = names[i] || 'unknown';
    const list = out.get(name) ?? [];
    list.push(new OwnedFd(fd, `${name} (from systemd)`));
    out.set(name, list);
  }
  return out;
}
