/**
 * `kvmvfioctl attach`: runs a VMM that does not speak the handoff session
 * (QEMU, cloud-hypervisor) as the VMM of a VM recorded by kvmvfiod.
 *
 * It attaches as a *passive* VMM (docs/session-protocol.md: bit 0 of the
 * ATTACH arg), receives /dev/kvm, the VFIO container (when the daemon has
 * one) and the VM's group fds, and then execs the VMM in this very process:
 * the pid stays, so the daemon's pidfd of its peer now names the VMM, and
 * the VM ends when the VMM exits. The received fds and the session socket
 * are inherited by the VMM, described in KVMVFIO_FDS and written into its
 * arguments where they name them ({kvm}, {group:N}...: fillPlaceholders).
 *
 * What the exec'd VMM inherits is chosen, not left to chance: exactly
 * stdin, stdout, stderr and the fds listed in KVMVFIO_FDS.
 * - Node sets FD_CLOEXEC at startup on fd 0 and up, to the first gap
 *   (measured with Node 20.20: strace shows fcntl(n, F_SETFD, FD_CLOEXEC)
 *   for 0, 1, 2, 3...): stdio is made inheritable again here, else the VMM
 *   would have no stdout. The same startup step closes-on-exec whatever low
 *   fds the caller meant to pass on (a tap fd, say), before any of this code
 *   runs, so they cannot be told from Node's own; rather than pass some
 *   inherited fds and not others, none are passed.
 * - Any fd left without close-on-exec (opened so by mistake, or inherited
 *   above the first gap) is closed just before the exec.
 * - SIGPIPE and SIGXFSZ, which Node ignores and an exec would leave ignored,
 *   get a handler first so that the exec resets them to their defaults;
 * - the token leaves the environment (it is spent).
 * stdout and stderr must not have been made non-blocking by Node before the
 * exec: O_NONBLOCK belongs to the open file, which the VMM shares, and Node
 * sets it on a pipe or socket stdio when it creates process.stdout/stderr.
 * So this path writes nothing on success and main.ts does not load grpc-js
 * for it (grpc-js loads node:assert, which creates process.stderr).
 */
import { closeSync, readFileSync, readdirSync } from 'node:fs';
import { type OwnedFd, StreamSocket, SysError, errnoName, execReplace, inheritAcrossExec } from '../kernel';
import { ProtocolError } from '../protocol/session';
import { AttachError, VmmSession } from '../vmm/session';

export const DEFAULT_HANDOFF = '/run/kvmvfiod/handoff.sock';

/** A failed attach, named like a failed gRPC call: the status name and the message. */
export class AttachFailure extends Error {
  override readonly name = 'AttachFailure';
  readonly code: string;
  constructor(code: string, message: string) {
    super(message);
    this.code = code;
  }
}

/** The VMM could not be exec'd. Exit status 127 when it was not found, 126 otherwise, as sh(1) does. */
export class ExecFailure extends Error {
  override readonly name = 'ExecFailure';
  readonly code: string;
  readonly exitCode: number;
  constructor(code: string, message: string, exitCode: number) {
    super(message);
    this.code = code;
    this.exitCode = exitCode;
  }
}

export interface AttachOptions {
  handoff: string;
  token: string;
  /** CMD and its arguments; CMD is searched in PATH. */
  argv: string[];
  /** How long to wait for the daemon's ATTACH result. */
  timeoutMs: number;
  /** Called when the attach is given up with the daemon's answer still due (the process should exit promptly). */
  onAbandon(): void;
}

/** How the daemon's errno on a refused ATTACH reads as a status (the mapping of the gRPC API). */
const REFUSAL_STATUS: Record<string, string> = {
  EACCES: 'PERMISSION_DENIED',
  EPERM: 'PERMISSION_DENIED',
  ENOENT: 'NOT_FOUND',
  EEXIST: 'ALREADY_EXISTS',
  EINVAL: 'INVALID_ARGUMENT',
  EBUSY: 'FAILED_PRECONDITION',
  ESHUTDOWN: 'UNAVAILABLE',
  // Anything else the daemon could not name more precisely.
  EPROTO: 'INTERNAL',
  EMFILE: 'RESOURCE_EXHAUSTED',
  ENFILE: 'RESOURCE_EXHAUSTED',
  ENOMEM: 'RESOURCE_EXHAUSTED',
  ECONNRESET: 'UNAVAILABLE',
  EPIPE: 'UNAVAILABLE',
};

/** /proc/self/fdinfo shows FD_CLOEXEC as O_CLOEXEC in `flags`. */
const O_CLOEXEC = 0o2000000;

/** This process's open fds and their flags, from /proc/self/fdinfo. */
function openFdFlags(): Map<number, number> {
  const out = new Map<number, number>();
  for (const name of readdirSync('/proc/self/fd')) {
    const fd = Number(name);
    let info: string;
    try {
      info = readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8');
    } catch {
      continue; // the directory's own fd, closed by now
    }
    const m = /^flags:\s+([0-7]+)$/m.exec(info);
    if (m) out.set(fd, parseInt(m[1], 8));
  }
  return out;
}

/** The fds an exec would leave open: those without close-on-exec. */
function inheritable(): number[] {
  const out: number[] = [];
  for (const [fd, flags] of openFdFlags()) if (!(flags & O_CLOEXEC)) out.push(fd);
  return out.sort((a, b) => a - b);
}

function connectFailure(e: SysError, handoff: string): AttachFailure {
  const hint = 'is kvmvfiod running? (--handoff PATH or KVMVFIO_HANDOFF selects another socket)';
  switch (e.code) {
    case 'ENOENT':
      return new AttachFailure('UNAVAILABLE', `no kvmvfiod handoff socket at ${handoff}: ${hint}`);
    case 'ECONNREFUSED':
      return new AttachFailure('UNAVAILABLE', `nothing listens on ${handoff} (ECONNREFUSED): ${hint}`);
    case 'EACCES':
    case 'EPERM':
      return new AttachFailure('PERMISSION_DENIED', `cannot connect to ${handoff}: ${e.code}`);
    default:
      return new AttachFailure('UNAVAILABLE', `cannot connect to ${handoff}: ${e.message}`);
  }
}

/** VmmSession.connect as a passive VMM, with a deadline and every failure as an AttachFailure. */
async function connect(opts: AttachOptions, qmpFd?: number): Promise<VmmSession> {
  const connecting = VmmSession.connect(opts.handoff, opts.token, { passive: true, qmpFd });
  let timer: NodeJS.Timeout | undefined;
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      // The answer may still come: then end that session; this process is leaving.
      connecting.then((s) => s.close('given up'), () => undefined);
      opts.onAbandon();
      reject(new AttachFailure('DEADLINE_EXCEEDED', `kvmvfiod at ${opts.handoff} did not answer the attach within ${opts.timeoutMs} ms (--timeout MS changes it)`));
    }, opts.timeoutMs);
  });
  try {
    return await Promise.race([connecting, deadline]);
  } catch (e) {
    if (e instanceof AttachFailure) throw e;
    if (e instanceof AttachError) {
      const name = errnoName(e.errno);
      const reason = e.errno === 104 /* ECONNRESET */ ? `kvmvfiod closed the session on ${opts.handoff} without answering` : e.message;
      throw new AttachFailure(REFUSAL_STATUS[name] ?? 'UNKNOWN', Object.hasOwn(REFUSAL_STATUS, name) ? reason : `${reason} (${name})`);
    }
    if (e instanceof SysError) {
      if (e.call === 'connect' || e.call.startsWith('socket')) throw connectFailure(e, opts.handoff);
      throw new AttachFailure('UNAVAILABLE', `session with kvmvfiod at ${opts.handoff}: ${e.message}`);
    }
    if (e instanceof ProtocolError) throw new AttachFailure('INTERNAL', `kvmvfiod at ${opts.handoff} broke the session protocol: ${e.message}`);
    throw e;
  } finally {
    clearTimeout(timer);
  }
}

/**
 * KVMVFIO_FDS: `name:fd` pairs, comma-separated, in this order: `kvm`,
 * `vfio-container` (only when the daemon sent one), `group-N` for each of
 * the VM's IOMMU groups — or, for the device-cdev handoff, `iommufd` and
 * `device-ADDRESS` for each device (an address has colons: split an item at
 * its last one) — `qmp` when the command line names {qmp}, and `session`.
 */
export function describeFds(fds: readonly (readonly [string, number])[]): string {
  return fds.map(([name, fd]) => `${name}:${fd}`).join(',');
}

/**
 * The placeholders of CMD's arguments: `{kvm}`, `{vfio-container}`,
 * `{session}` and `{group:N}` stand for the numbers of the fds handed over
 * (the names of KVMVFIO_FDS, `group-N` written `group:N`), so a VMM that
 * takes pre-opened fds by number gets them on its command line:
 * `-add-fd fd={kvm},set=1 -accel kvm,device=/dev/fdset/1`. Only these exact
 * words are replaced (other braces, a QEMU JSON option say, stay as they
 * are). A VM with the device-cdev handoff has `{iommufd}` and
 * `{device:ADDRESS}` ("{device:0000:00:04.0}") instead of `{group:N}` and
 * `{vfio-container}`. `{qmp}` is not the daemon's: it is one end of a
 * stream socketpair attach makes when the command line names it, for QEMU's
 * monitor (`-chardev socket,id=…,fd={qmp} -mon chardev=…,mode=control`),
 * whose other end goes to the daemon with the ATTACH: the daemon drives
 * hot-plug through it. A placeholder for an fd the daemon did not hand out is
 * an error (INVALID_ARGUMENT), before anything is exec'd.
 */
export const PLACEHOLDER = /\{(kvm|vfio-container|session|qmp|group:\d+|iommufd|device:[0-9a-fA-F:.]+)\}/g;

/** Whether the command line asks for the QMP channel: {qmp} in any argument. */
export function wantsQmp(argv: readonly string[]): boolean {
  return argv.some((a) => a.includes('{qmp}'));
}

export function fillPlaceholders(argv: readonly string[], handed: readonly (readonly [string, number])[]): string[] {
  const byName = new Map(handed.map(([name, fd]) => [name.replace(/^(group|device)-/, '$1:'), fd]));
  return argv.map((arg) =>
    arg.replace(PLACEHOLDER, (_, name: string) => {
      const fd = byName.get(name);
      if (fd === undefined) {
        throw new AttachFailure(
          'INVALID_ARGUMENT',
          `the command line names {${name}}, which kvmvfiod did not hand to this VM's VMM (handed: ${[...byName.keys()].map((n) => `{${n}}`).join(', ')})`,
        );
      }
      return String(fd);
    }),
  );
}

/** Attaches, then execs the VMM. Returns only by throwing (AttachFailure, ExecFailure). */
export async function runAttach(opts: AttachOptions): Promise<never> {
  // {qmp}: a socketpair, one end for the VMM's monitor, the other sent to the daemon with the ATTACH and closed here.
  let qmp: [OwnedFd, OwnedFd] | undefined;
  if (wantsQmp(opts.argv)) {
    try {
      qmp = StreamSocket.pair('QMP socketpair');
    } catch (e) {
      throw new AttachFailure('RESOURCE_EXHAUSTED', `cannot make the QMP socketpair: ${(e as Error).message}`);
    }
  }
  let s: VmmSession;
  try {
    s = await connect(opts, qmp?.[1].fd);
  } catch (e) {
    qmp?.[0].closeSync();
    throw e;
  } finally {
    qmp?.[1].closeSync();
  }
  const { attach } = s;
  const handed: [string, number][] = [['kvm', attach.kvm.fd]];
  if (attach.container) handed.push(['vfio-container', attach.container.fd]);
  for (const [group, fd] of attach.groups) handed.push([`group-${group}`, fd.fd]);
  if (attach.iommufd) handed.push(['iommufd', attach.iommufd.fd]);
  for (const [address, fd] of attach.devices) handed.push([`device-${address}`, fd.fd]);
  if (qmp) handed.push(['qmp', qmp[0].fd]);
  handed.push(['session', s.sock.fd]);
  // Before any fd is made inheritable: a bad placeholder ends here, and the session with it.
  const argv = fillPlaceholders(opts.argv, handed);

  // Ignored signals stay ignored across exec, caught ones go back to SIG_DFL.
  for (const sig of ['SIGPIPE', 'SIGXFSZ'] as const) process.on(sig, () => undefined);
  delete process.env.KVMVFIO_TOKEN;

  inheritAcrossExec(0, 'stdin');
  inheritAcrossExec(1, 'stdout');
  inheritAcrossExec(2, 'stderr');
  for (const [name, fd] of handed) inheritAcrossExec(fd, name);
  const keep = new Set([0, 1, 2, ...handed.map(([, fd]) => fd)]);
  for (const fd of inheritable()) {
    if (!keep.has(fd)) closeSync(fd);
  }

  const env = { KVMVFIO_FDS: describeFds(handed), KVMVFIO_VM_ID: attach.vmId, KVMVFIO_VM_NAME: attach.vmName };
  try {
    return execReplace(argv, env);
  } catch (e) {
    if (!(e instanceof SysError)) throw e;
    // The session closes when this process exits, and the VM ends with it.
    const cmd = JSON.stringify(opts.argv[0]);
    if (e.code === 'ENOENT') throw new ExecFailure(e.code, `cannot exec ${cmd}: not found${opts.argv[0].includes('/') ? '' : ' in PATH'}`, 127);
    throw new ExecFailure(e.code, `cannot exec ${cmd}: ${e.code}`, 126);
  }
}
