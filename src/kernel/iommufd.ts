/**
 * iommufd (/dev/iommu, Linux 6.2+) and the VFIO device cdev
 * (/dev/vfio/devices/vfioN, 6.6+): the interface through which released
 * VMMs (QEMU ≥ 8.2, Cloud Hypervisor) take VFIO devices as pre-opened fds.
 * Documentation/userspace-api/iommufd.rst, Documentation/driver-api/vfio.rst
 * ("VFIO device cdev"). Measured semantics (docs/vmm-integration.md): a cdev
 * opens any number of times but binds to one iommufd at a time (a second
 * bind: EINVAL); while the group file /dev/vfio/N is open, a bind is EBUSY;
 * while a cdev is bound, opening the group is EBUSY; a device is clean again
 * only when every copy of its bound file is closed.
 */
import { join } from 'node:path';
import { SysError } from './errors';
import { OwnedFd } from './fd';
import { IOMMUFD, VFIO, lastErrno, libc } from './libc';
import { pciVendorIdOf, regionInfoOf } from './vfio';

/** An iommufd context: I/O address spaces (IOAS) and the mappings in them. One per VMM. */
export class Iommufd {
  readonly path: string;
  readonly #fd: OwnedFd;

  constructor(fd: OwnedFd, path: string) {
    this.#fd = fd;
    this.path = path;
  }

  /** open(<devRoot>/iommu, O_RDWR): it only allocates a context (OwnedFd.openDevice). ENOENT: no iommufd in this kernel. */
  static async open(devRoot = '/dev'): Promise<Iommufd> {
    const path = join(devRoot, 'iommu');
    return new Iommufd(OwnedFd.openDevice(path), path);
  }

  get fd(): number {
    return this.#fd.fd;
  }

  /** IOMMU_IOAS_ALLOC: a new, empty I/O address space; its id. */
  allocIoas(): number {
    const b = Buffer.alloc(12);
    b.writeUInt32LE(12, 0);
    if ((libc.ioctlPtr(this.fd, IOMMUFD.IOAS_ALLOC, b) as number) < 0) throw new SysError('IOMMU_IOAS_ALLOC', this.path, lastErrno());
    return b.readUInt32LE(8);
  }

  /**
   * IOMMU_IOAS_MAP of [vaddr, vaddr+length) at `iova`, read-write: pins the
   * pages (charged to RLIMIT_MEMLOCK of the caller's user, ENOMEM past it).
   */
  mapFixed(ioas: number, vaddr: bigint, iova: bigint, length: bigint): void {
    const b = Buffer.alloc(40);
    b.writeUInt32LE(40, 0);
    b.writeUInt32LE(IOMMUFD.MAP_FIXED_IOVA | IOMMUFD.MAP_READABLE | IOMMUFD.MAP_WRITEABLE, 4);
    b.writeUInt32LE(ioas, 8);
    b.writeBigUInt64LE(vaddr, 16);
    b.writeBigUInt64LE(length, 24);
    b.writeBigUInt64LE(iova, 32);
    if ((libc.ioctlPtr(this.fd, IOMMUFD.IOAS_MAP, b) as number) < 0) {
      throw new SysError('IOMMU_IOAS_MAP', `${this.path} (ioas ${ioas}, iova 0x${iova.toString(16)})`, lastErrno());
    }
  }

  /** IOMMU_IOAS_UNMAP of [iova, iova+length); ENOENT when nothing is mapped there. */
  unmap(ioas: number, iova: bigint, length: bigint): void {
    const b = Buffer.alloc(24);
    b.writeUInt32LE(24, 0);
    b.writeUInt32LE(ioas, 4);
    b.writeBigUInt64LE(iova, 8);
    b.writeBigUInt64LE(length, 16);
    if ((libc.ioctlPtr(this.fd, IOMMUFD.IOAS_UNMAP, b) as number) < 0) {
      throw new SysError('IOMMU_IOAS_UNMAP', `${this.path} (ioas ${ioas}, iova 0x${iova.toString(16)})`, lastErrno());
    }
  }

  /** IOMMU_DESTROY of an object (an IOAS); EBUSY while a device is attached to it. */
  destroy(id: number): void {
    const b = Buffer.alloc(8);
    b.writeUInt32LE(8, 0);
    b.writeUInt32LE(id, 4);
    if ((libc.ioctlPtr(this.fd, IOMMUFD.DESTROY, b) as number) < 0) throw new SysError('IOMMU_DESTROY', `${this.path} (object ${id})`, lastErrno());
  }

  close(): Promise<void> {
    return this.#fd.close();
  }
}

export interface VfioDeviceInfo {
  flags: number;
  numRegions: number;
  numIrqs: number;
}

/** A VFIO device cdev (/dev/vfio/devices/vfioN). Unusable until bound to an iommufd and attached to an IOAS. */
export class VfioDeviceCdev {
  readonly path: string;
  readonly #fd: OwnedFd;

  constructor(fd: OwnedFd, path: string) {
    this.#fd = fd;
    this.path = path;
  }

  /** open(path, O_RDWR) (QEMU needs read-write: config space and BARs); the bind is a later ioctl, so the open only allocates (OwnedFd.openDevice). */
  static async open(path: string): Promise<VfioDeviceCdev> {
    return new VfioDeviceCdev(OwnedFd.openDevice(path), path);
  }

  get fd(): number {
    return this.#fd.fd;
  }

  /** VFIO_DEVICE_BIND_IOMMUFD: binds this file to `iommufd`; the device id in that context. EINVAL: bound already. EBUSY: its group is open. */
  bindIommufd(iommufd: number): number {
    const b = Buffer.alloc(16);
    b.writeUInt32LE(16, 0);
    b.writeInt32LE(iommufd, 8);
    if ((libc.ioctlPtr(this.fd, VFIO.DEVICE_BIND_IOMMUFD, b) as number) < 0) throw new SysError('VFIO_DEVICE_BIND_IOMMUFD', this.path, lastErrno());
    return b.readUInt32LE(12);
  }

  /** VFIO_DEVICE_ATTACH_IOMMUFD_PT: the device's DMA goes through IOAS (or page table) `ptId`. */
  attach(ptId: number): number {
    const b = Buffer.alloc(12);
    b.writeUInt32LE(12, 0);
    b.writeUInt32LE(ptId, 8);
    if ((libc.ioctlPtr(this.fd, VFIO.DEVICE_ATTACH_IOMMUFD_PT, b) as number) < 0) {
      throw new SysError('VFIO_DEVICE_ATTACH_IOMMUFD_PT', `${this.path} (pt ${ptId})`, lastErrno());
    }
    return b.readUInt32LE(8);
  }

  /** VFIO_DEVICE_DETACH_IOMMUFD_PT. */
  detach(): void {
    const b = Buffer.alloc(8);
    b.writeUInt32LE(8, 0);
    if ((libc.ioctlPtr(this.fd, VFIO.DEVICE_DETACH_IOMMUFD_PT, b) as number) < 0) throw new SysError('VFIO_DEVICE_DETACH_IOMMUFD_PT', this.path, lastErrno());
  }

  /** VFIO_DEVICE_GET_INFO. */
  info(): VfioDeviceInfo {
    const b = Buffer.alloc(24);
    b.writeUInt32LE(24, 0);
    if ((libc.ioctlPtr(this.fd, VFIO.DEVICE_GET_INFO, b) as number) < 0) throw new SysError('VFIO_DEVICE_GET_INFO', this.path, lastErrno());
    return { flags: b.readUInt32LE(4), numRegions: b.readUInt32LE(8), numIrqs: b.readUInt32LE(12) };
  }

  /** VFIO_DEVICE_GET_REGION_INFO. */
  regionInfo(index: number): { size: bigint; offset: bigint; flags: number } {
    return regionInfoOf(this.fd, this.path, index);
  }

  /** The PCI vendor id, read from the config space region. */
  pciVendorId(): number {
    return pciVendorIdOf(this.fd, this.path);
  }

  close(): Promise<void> {
    return this.#fd.close();
  }

  closeSync(): void {
    this.#fd.closeSync();
  }
}
