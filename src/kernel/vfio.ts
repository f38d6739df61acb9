/**
 * An owned VFIO group fd (/dev/vfio/N). A group file opens only once
 * system-wide (EBUSY): that rule is how the daemon knows nobody else holds a
 * group. So it never keeps a copy of a group file it gives away — it hands
 * over its fd itself (handOver), sends it, and closes it.
 */
import { open as fsOpen, constants, readSync } from 'node:fs';
import { SysError } from './errors';
import { OwnedFd, type SendableFd } from './fd';
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

  /**
   * The group fd itself, handed over to be sent to a VMM: SCM_RIGHTS gives
   * the VMM its reference, and the sender's close() after the send ends the
   * daemon's. This object has no fd after it.
   */
  handOver(): SendableFd {
    return this.#fd;
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

  /** VFIO_GROUP_GET_DEVICE_FD: the device's fd, by its name in the group ("0000:00:02.0"). Needs a container with an IOMMU set. */
  getDeviceFd(name: string): VfioDevice {
    const r = libc.ioctlPtr(this.fd, VFIO.GROUP_GET_DEVICE_FD, Buffer.from(`${name}\0`)) as number;
    if (r < 0) throw new SysError('VFIO_GROUP_GET_DEVICE_FD', `${name} in ${this.path}`, lastErrno());
    return new VfioDevice(new OwnedFd(r, `vfio device ${name}`), name);
  }

  close(): Promise<void> {
    return this.#fd.close();
  }

  closeSync(): void {
    this.#fd.closeSync();
  }
}

/** A VFIO container (/dev/vfio/vfio): the IOMMU context groups join. */
export class VfioContainer {
  readonly #fd: OwnedFd;

  constructor(fd: OwnedFd) {
    this.#fd = fd;
  }

  get fd(): number {
    return this.#fd.fd;
  }

  /** VFIO_CHECK_EXTENSION: nonzero when the container supports `ext` (an IOMMU type, say). */
  checkExtension(ext: number): number {
    const r = libc.ioctlInt(this.fd, VFIO.CHECK_EXTENSION, ext) as number;
    if (r < 0) throw new SysError('VFIO_CHECK_EXTENSION', 'container', lastErrno());
    return r;
  }

  /** VFIO_SET_IOMMU: once, after the first group joined. */
  setIommu(type: number): void {
    const r = libc.ioctlInt(this.fd, VFIO.SET_IOMMU, type) as number;
    if (r < 0) throw new SysError('VFIO_SET_IOMMU', `container (type ${type})`, lastErrno());
  }

  /** VFIO_IOMMU_MAP_DMA of [vaddr, vaddr+size) at `iova`, read-write. Pins the pages (RLIMIT_MEMLOCK). */
  mapDma(vaddr: bigint, iova: bigint, size: bigint): void {
    const b = Buffer.alloc(32);
    b.writeUInt32LE(32, 0);
    b.writeUInt32LE(VFIO.DMA_MAP_FLAG_READ | VFIO.DMA_MAP_FLAG_WRITE, 4);
    b.writeBigUInt64LE(vaddr, 8);
    b.writeBigUInt64LE(iova, 16);
    b.writeBigUInt64LE(size, 24);
    const r = libc.ioctlPtr(this.fd, VFIO.IOMMU_MAP_DMA, b) as number;
    if (r < 0) throw new SysError('VFIO_IOMMU_MAP_DMA', `container (iova 0x${iova.toString(16)})`, lastErrno());
  }

  close(): Promise<void> {
    return this.#fd.close();
  }

  closeSync(): void {
    this.#fd.closeSync();
  }
}

/** A VFIO device fd (from VFIO_GROUP_GET_DEVICE_FD). */
export class VfioDevice {
  readonly name: string;
  readonly #fd: OwnedFd;

  constructor(fd: OwnedFd, name: string) {
    this.#fd = fd;
    this.name = name;
  }

  get fd(): number {
    return this.#fd.fd;
  }

  /** VFIO_DEVICE_GET_REGION_INFO: where region `index` lives in the device fd. */
  regionInfo(index: number): { size: bigint; offset: bigint; flags: number } {
    return regionInfoOf(this.fd, this.name, index);
  }

  /** The PCI vendor id, read from the config space region (VFIO_PCI_CONFIG_REGION_INDEX). */
  pciVendorId(): number {
    return pciVendorIdOf(this.fd, this.name);
  }

  close(): Promise<void> {
    return this.#fd.close();
  }
}

/** VFIO_DEVICE_GET_REGION_INFO on a device fd (from a group, or a cdev). */
export function regionInfoOf(fd: number, what: string, index: number): { size: bigint; offset: bigint; flags: number } {
  const b = Buffer.alloc(32);
  b.writeUInt32LE(32, 0);
  b.writeUInt32LE(index, 8);
  const r = libc.ioctlPtr(fd, VFIO.DEVICE_GET_REGION_INFO, b) as number;
  if (r < 0) throw new SysError('VFIO_DEVICE_GET_REGION_INFO', `${what} region ${index}`, lastErrno());
  return { flags: b.readUInt32LE(4), size: b.readBigUInt64LE(16), offset: b.readBigUInt64LE(24) };
}

/** The PCI vendor id of a device fd, read from its config space region. */
export function pciVendorIdOf(fd: number, what: string): number {
  const { offset } = regionInfoOf(fd, what, VFIO.PCI_CONFIG_REGION_INDEX);
  const b = Buffer.alloc(2);
  try {
    readSync(fd, b, 0, 2, Number(offset));
  } catch (e) {
    throw SysError.fromNode('pread(config space)', what, e as NodeJS.ErrnoException);
  }
  return b.readUInt16LE(0);
}
