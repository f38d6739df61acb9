/**
 * The VMM that `kvmvfioctl attach` execs in the attach tests: it reports
 * what it inherited and then idles like a VMM.
 *
 * It parses KVMVFIO_FDS, checks each fd — `kvm` answers KVM_GET_API_VERSION,
 * `session` is a socket, `group-N` and `vfio-container` are read back with
 * readlink(/proc/self/fd/N) for the test to compare with the fake tree —
 * notes which of its stdio fds are O_NONBLOCK, and prints it all as one
 * JSON line:
 *   {"event":"fds","uid":65534,"pid":...,"fds":{"kvm":17,...},"kvmApi":12,...}
 * Then it sleeps until SIGTERM (exit 0), or exits 0 after `--exit-after MS`.
 * A malformed KVMVFIO_FDS is reported in `problems`, not thrown.
 */
import { fstatSync, readFileSync, readlinkSync } from 'node:fs';
import { Kvm, OwnedFd } from '../../src/kernel';

const O_NONBLOCK = 0o4000;

/** The open-file flags of `fd`, from /proc/self/fdinfo. */
function fdFlags(fd: number): number {
  const m = /^flags:\s+([0-7]+)$/m.exec(readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8'));
  return m ? parseInt(m[1], 8) : 0;
}

// First, before process.stdout exists (creating it makes a pipe or socket non-blocking).
// Which fds were inherited cannot be told here: Node marks fds 0..first gap close-on-exec
// at startup. The attach test lists an exec'd process's fds with ls(1) instead.
const stdioNonBlocking = [0, 1, 2].filter((fd) => (fdFlags(fd) & O_NONBLOCK) !== 0);

const problems: string[] = [];
const fds: Record<string, number> = {};
const spec = process.env.KVMVFIO_FDS;
if (spec === undefined) problems.push('KVMVFIO_FDS is not set');
for (const item of spec ? spec.split(',') : []) {
  const m = /^([a-z][a-z0-9-]*):([0-9]+)$/.exec(item);
  if (!m) problems.push(`bad KVMVFIO_FDS item ${JSON.stringify(item)}`);
  else if (Object.hasOwn(fds, m[1])) problems.push(`${m[1]} listed twice`);
  else fds[m[1]] = Number(m[2]);
}

const link = (fd: number): string | null => {
  try {
    return readlinkSync(`/proc/self/fd/${fd}`);
  } catch (e) {
    problems.push(`fd ${fd}: ${(e as Error).message}`);
    return null;
  }
};

let kvmApi: number | null = null;
let sessionIsSocket: boolean | null = null;
let container: string | null = null;
const groups: Record<string, string | null> = {};
for (const [name, fd] of Object.entries(fds)) {
  try {
    if (name === 'kvm') kvmApi = Kvm.fromFd(new OwnedFd(fd, 'kvm')).apiVersion();
    else if (name === 'session') sessionIsSocket = fstatSync(fd).isSocket();
    else if (name === 'vfio-container') container = link(fd);
    else if (/^group-[0-9]+$/.test(name)) groups[name.slice('group-'.length)] = link(fd);
    else problems.push(`unknown fd name ${name}`);
  } catch (e) {
    problems.push(`${name} (fd ${fd}): ${(e as Error).message}`);
  }
}

// Before the report: a test may signal as soon as it reads it.
process.on('SIGTERM', () => process.exit(0));
process.stdout.write(
  `${JSON.stringify({
    event: 'fds',
    uid: process.getuid?.(),
    gid: process.getgid?.(),
    pid: process.pid,
    spec: spec ?? null,
    fds,
    kvmApi,
    sessionIsSocket,
    container,
    groups,
    stdioNonBlocking,
    vmId: process.env.KVMVFIO_VM_ID ?? null,
    vmName: process.env.KVMVFIO_VM_NAME ?? null,
    tokenInEnv: process.env.KVMVFIO_TOKEN !== undefined,
    problems,
  })}\n`,
);

const i = process.argv.indexOf('--exit-after');
const exitAfter = i >= 0 ? Number(process.argv[i + 1]) : NaN;
if (Number.isFinite(exitAfter)) setTimeout(() => process.exit(0), exitAfter);
else setInterval(() => undefined, 1 << 30);
