/**
 * An owned VFIO group fd (/dev/vfio/N). A group file opens only once
 * system-wide (EBUSY), so the daemon opens each group it claims once and
 * hands out duplicates.
 */
import { open as fsOpen, constants } from 'node:fs';
import { SysError } from './errors';
import { OwnedFd } from './fd';
import { O_CLOEXEC, VFIO, allocInt32, lastErrno, libc, vfioGroupStatus } from './libc';

export interface VfioGroupStatus {
  viable: boolean;
  containerSet: boolean;
}

export class VfioGroup {
  readonly number: number;
  readonly path: string;
  readonly #fd: OwnedFd;

  constructor(fd: OwnedFd, number: number, path: string) {
    this.#fd = fd;
    this.number = number;
    this.path = path;
  }

  /** open(path, O_RDWR|O_CLOEXEC) on the libuv pool. EBUSY: another process holds the group. */
  static open(path: string, number: number): Promise<VfioGroup> {
    return new Promise((resolve, reject) => {
      fsOpen(path, constants.O_RDWR | O_CLOEXEC, (err, fd) => {
        if (err) return reject(SysError.fromNode('open', path, err));
        resolve(new VfioGroup(new OwnedFd(fd, path), number, path));
      });
    });
  }

  get fd(): number {
    return this.#fd.fd;
  }

  /** A close-on-exec duplicate of the group fd, to hand to a VMM. */
  dup(): OwnedFd {
    return this.#fd.dup(this.path);
  }

  /** VFIO_GROUP_GET_STATUS. Test the bits: VIABLE|CONTAINER_SET is a normal in-use group. */
  status(): VfioGroupStatus {
    const b = vfioGroupStatus();
    const r = libc.ioctlPtr(this.fd, VFIO.GROUP_GET_STATUS, b) as number;
    if (r < 0) throw new SysError('VFIO_GROUP_GET_STATUS', this.path, lastErrno());
    const flags = b.readUInt32LE(4);
    return { viable: (flags & VFIO.GROUP_FLAGS_VIABLE) !== 0, containerSet: (flags & VFIO.GROUP_FLAGS_CONTAINER_SET) !== 0 };
  }

  /** VFIO_GROUP_SET_CONTAINER: the int32 pointed at is the container fd. */
  setContainer(containerFd: number): void {
    const slot = allocInt32();
    slot.set(containerFd);
    const r = libc.ioctlPtr(this.fd, VFIO.GROUP_SET_CONTAINER, slot.ptr) as number;
    if (r < 0) throw new SysError('VFIO_GROUP_SET_CONTAINER', this.path, lastErrno());
  }

  /** VFIO_GROUP_UNSET_CONTAINER: leaves the group clean for its next user. EINVAL when none is set. */
  unsetContainer(): void {
    const r = libc.ioctlInt(this.fd, VFIO.GROUP_UNSET_CONTAINER, 0) as number;
    if (r < 0) throw new SysError('VFIO_GROUP_UNSET_CONTAINER', this.path, lastErrno());
  }

  close(): Promise<void> {
    return this.#fd.close();
  }

  closeSync(): void {
    this.#fd.closeSync();
  }
}
