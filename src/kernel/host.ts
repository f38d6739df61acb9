/** Process- and host-level calls: peer credentials, fd limits, the KVM-VFIO probe. */
import { closeSync } from 'node:fs';
import { readdir, readlink } from 'node:fs/promises';
import { release } from 'node:os';
import { SysError } from './errors';
import { Kvm } from './kvm';
import { F_DUPFD_CLOEXEC, KVM, KVM_DEV_VFIO, RLIMIT_NOFILE, SOCK, lastErrno, libc } from './libc';

export interface PeerCred {
  pid: number;
  uid: number;
  gid: number;
}

/** getsockopt(SO_PEERCRED) on a connected Unix socket: who is on the other end. */
export function peerCredentials(socketFd: number): PeerCred {
  const cred = Buffer.alloc(12);
  const len = Buffer.alloc(4);
  len.writeUInt32LE(12, 0);
  const r = libc.getsockopt(socketFd, SOCK.SOL_SOCKET, SOCK.SO_PEERCRED, cred, len) as number;
  if (r < 0) throw new SysError('getsockopt(SO_PEERCRED)', `socket fd ${socketFd}`, lastErrno());
  return { pid: cred.readInt32LE(0), uid: cred.readUInt32LE(4), gid: cred.readUInt32LE(8) };
}

export interface FdLimits {
  soft: number;
  hard: number;
}

/** getrlimit(RLIMIT_NOFILE). */
export function fdLimits(): FdLimits {
  const b = Buffer.alloc(16);
  if ((libc.getrlimit(RLIMIT_NOFILE, b) as number) < 0) throw new SysError('getrlimit(RLIMIT_NOFILE)', 'self', lastErrno());
  const clamp = (v: bigint) => (v > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(v));
  return { soft: clamp(b.readBigUInt64LE(0)), hard: clamp(b.readBigUInt64LE(8)) };
}

/** How many fds this process has open now. */
export async function openFdCount(): Promise<number> {
  return (await readdir('/proc/self/fd')).length - 1; // minus the one readdir itself opened
}

/** What each open fd of this process points at ("/dev/kvm", "socket:[123]", "anon_inode:kvm-vm"). */
export async function listOpenFds(): Promise<string[]> {
  const names = await readdir('/proc/self/fd');
  const out = await Promise.all(names.map((n) => readlink(`/proc/self/fd/${n}`).catch(() => '')));
  return out.filter((t) => t && !t.startsWith('/proc/'));
}

/**
 * Grows this process's fd table once, up front, to hold `n` fds. Growing it
 * later — at 256, 512, 1024... fds — makes the kernel wait an RCU grace period
 * in a process with threads, a 5-17 ms stall of the event loop each time
 * (measured in bench/RESULTS.md).
 */
export function presizeFdTable(n: number): void {
  const fd = libc.fcntl(0, F_DUPFD_CLOEXEC, Math.max(3, n - 1)) as number;
  if (fd >= 0) closeSync(fd);
}

export function kernelRelease(): string {
  return release();
}

export interface KvmVfioSupport {
  kvmVfioDevice: boolean;
  fileAdd: boolean;
  fileDel: boolean;
  errors: string[];
}

/**
 * What this kernel's KVM can do for VFIO, asked of a throwaway probe VM:
 * KVM_CREATE_DEVICE_TEST for KVM_DEV_TYPE_VFIO (KVM_CAP_DEVICE_CTRL reads 0
 * on 6.1 although the device works, so the capability is not trusted), then
 * KVM_HAS_DEVICE_ATTR for FILE_ADD and FILE_DEL on a real device. Every fd
 * of the probe is closed before this resolves; the closes run on the libuv
 * pool since the device's release sleeps in the kernel.
 */
export async function probeKvmVfio(kvm: Kvm): Promise<KvmVfioSupport> {
  const out: KvmVfioSupport = { kvmVfioDevice: false, fileAdd: false, fileDel: false, errors: [] };
  let vm;
  try {
    vm = await kvm.createVm('probe vm');
  } catch (e) {
    out.errors.push(String((e as Error).message));
    return out;
  }
  try {
    out.kvmVfioDevice = vm.supportsDevice(KVM.DEV_TYPE_VFIO);
    if (out.kvmVfioDevice) {
      const dev = vm.createVfioDevice();
      try {
        out.fileAdd = dev.hasVfioAttr(KVM_DEV_VFIO.FILE_ADD);
        out.fileDel = dev.hasVfioAttr(KVM_DEV_VFIO.FILE_DEL);
      } finally {
        await dev.close();
      }
    }
  } catch (e) {
    out.errors.push(String((e as Error).message));
  } finally {
    await vm.close();
  }
  return out;
}
