// Who holds a file open, read from /proc: used to name the process that keeps
// a VFIO group busy (a group file opens only once).
import { readdir, readFile, readlink } from 'node:fs/promises';
import * as path from 'node:path';

export interface FileHolder {
  pid: number;
  /** Its real uid (/proc/<pid>/status). */
  uid: number;
  comm: string;
}

/** Default cap on fds examined in one scan, so a host with huge fd tables cannot stall the daemon. */
export const MAX_SCANNED_FDS = 65536;

// Processes exit and close fds while we walk; other users' fds are unreadable without privilege.
const SKIPPABLE = new Set(['ENOENT', 'EACCES', 'ESRCH', 'EPERM', 'ENOTDIR']);

function isSkippable(err: unknown): boolean {
  const code = typeof err === 'object' && err !== null ? (err as { code?: unknown }).code : undefined;
  return typeof code === 'string' && SKIPPABLE.has(code);
}

const NUMERIC = /^[0-9]+$/;
const byNumber = (a: number, b: number): number => a - b;
// Readlinks in flight at once per process.
const CHUNK = 256;

/**
 * Processes with an fd whose link is exactly `target` (e.g. "/dev/vfio/12"),
 * each once, sorted by pid. Stops after `maxFds` fds in total, in pid order.
 */
export async function findFileHolders(
  procRoot: string,
  target: string,
  opts: { maxFds?: number } = {},
): Promise<FileHolder[]> {
  let budget = opts.maxFds ?? MAX_SCANNED_FDS;
  const pids = (await readdir(procRoot))
    .filter((name) => NUMERIC.test(name))
    .map(Number)
    .sort(byNumber);

  const found: number[] = [];
  for (const pid of pids) {
    if (budget <= 0) break;
    const fdDir = path.join(procRoot, String(pid), 'fd');
    let fds: number[];
    try {
      fds = (await readdir(fdDir)).filter((n) => NUMERIC.test(n)).map(Number).sort(byNumber);
    } catch (err) {
      if (isSkippable(err)) continue;
      throw err;
    }
    fds = fds.slice(0, budget);
    budget -= fds.length;
    if (await holdsTarget(fdDir, fds, target)) found.push(pid);
  }

  const holders: FileHolder[] = [];
  for (const pid of found) {
    try {
      const comm = (await readFile(path.join(procRoot, String(pid), 'comm'), 'utf8')).trim();
      const status = await readFile(path.join(procRoot, String(pid), 'status'), 'utf8').catch(() => '');
      const uid = Number(/^Uid:\s+(\d+)/m.exec(status)?.[1] ?? -1);
      holders.push({ pid, uid, comm });
    } catch (err) {
      // Gone since the scan: it no longer holds the file.
      if (isSkippable(err)) continue;
      throw err;
    }
  }
  return holders;
}

async function holdsTarget(fdDir: string, fds: number[], target: string): Promise<boolean> {
  for (let i = 0; i < fds.length; i += CHUNK) {
    const links = await Promise.all(
      fds.slice(i, i + CHUNK).map(async (fd) => {
        try {
          return await readlink(path.join(fdDir, String(fd)));
        } catch (err) {
          if (isSkippable(err)) return undefined;
          throw err;
        }
      }),
    );
    if (links.includes(target)) return true;
  }
  return false;
}
