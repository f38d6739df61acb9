import { close as fsClose, closeSync, constants, fstatSync, openSync, statSync } from 'node:fs';
import { SysError } from './errors';
import { F_DUPFD_CLOEXEC, O_CLOEXEC, lastErrno, libc } from './libc';

/**
 * An fd on its way to another process with SCM_RIGHTS: an OwnedFd the sender
 * closes once sent, or an fd its owner lends for the send (`OwnedFd.lend()`),
 * whose close() leaves it open.
 */
export interface SendableFd {
  readonly fd: number;
  close(): Promise<void>;
  closeSync(): void;
}

/**
 * The one owner of an fd. It is closed exactly once: by `close()`, or never
 * if ownership moved on with `release()`. Reading `fd` after either throws,
 * so a stale number is never used.
 *
 * `close()` runs on the libuv pool: closing a KVM-VFIO device fd waits for an
 * RCU grace period in the kernel (3–47 ms here), which must not stall the
 * event loop.
 */
export class OwnedFd {
  #fd: number;
  readonly what: string;

  constructor(fd: number, what: string) {
    if (!Number.isInteger(fd) || fd < 0) throw new RangeError(`bad fd ${fd} for ${what}`);
    this.#fd = fd;
    this.what = what;
  }

  /**
   * open(path, O_RDWR | O_CLOEXEC) of a device node whose open only
   * allocates (the VFIO container, /dev/iommu, a VFIO device cdev, whose
   * bind comes later by ioctl), on the event loop: a few µs in the kernel,
   * where a round trip through the libuv pool costs a thread wake-up each
   * way (50–100 µs on a busy 2-vCPU host). Not for a node whose open may
   * wait on a lock another process holds (a VFIO group: VfioGroup.open).
   */
  static openDevice(path: string): OwnedFd {
    let fd: number;
    try {
      fd = openSync(path, constants.O_RDWR | O_CLOEXEC);
    } catch (e) {
      throw SysError.fromNode('open', path, e as NodeJS.ErrnoException);
    }
    return new OwnedFd(fd, path);
  }

  /**
   * Whether this fd is the file now at `path` (same device and inode). A
   * device node removed and made again (a VFIO group that went away and came
   * back under its number) is a new inode: false, as when `path` is gone.
   */
  isOpenOf(path: string): boolean {
    let there;
    try {
      there = statSync(path, { bigint: true });
    } catch {
      return false;
    }
    const mine = fstatSync(this.fd, { bigint: true });
    return mine.dev === there.dev && mine.ino === there.ino;
  }

  get fd(): number {
    if (this.#fd < 0) throw new Error(`${this.what}: fd used after close or release`);
    return this.#fd;
  }

  get isOpen(): boolean {
    return this.#fd >= 0;
  }

  /** A new owned duplicate (close-on-exec) of this fd. */
  dup(what = this.what): OwnedFd {
    const n = libc.fcntl(this.fd, F_DUPFD_CLOEXEC, 3) as number;
    if (n < 0) throw new SysError('fcntl(F_DUPFD_CLOEXEC)', this.what, lastErrno());
    return new OwnedFd(n, what);
  }

  /**
   * This fd, lent for one send: SCM_RIGHTS gives the receiver its own
   * reference, so nothing needs duplicating, and closing the loan does
   * nothing. Reading `fd` after the owner closed throws, as on the owner.
   */
  lend(): SendableFd {
    const owner = this;
    return {
      get fd() {
        return owner.fd;
      },
      close: () => Promise.resolve(),
      closeSync: () => undefined,
    };
  }

  /** Gives the number away; the caller now owns it and this object forgets it. */
  release(): number {
    const n = this.fd;
    this.#fd = -1;
    return n;
  }

  close(): Promise<void> {
    if (this.#fd < 0) return Promise.resolve();
    const n = this.#fd;
    this.#fd = -1;
    return new Promise((resolve) => {
      // The fd is gone from the table whatever close(2) says (Linux never
      // retries a close); an error here is only worth the caller's log.
      fsClose(n, () => resolve());
    });
  }

  /** Only for exit paths where the loop is ending anyway. */
  closeSync(): void {
    if (this.#fd < 0) return;
    const n = this.#fd;
    this.#fd = -1;
    try {
      closeSync(n);
    } catch {
      /* see close() */
    }
  }
}
