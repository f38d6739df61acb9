/**
 * Owning wrappers for KVM objects: the /dev/kvm system fd, a VM fd and a KVM
 * device fd. One method per ioctl; every failure is a SysError with the errno.
 *
 * A VM fd and its device fds only work in the process that made the VM
 * (KVM binds the VM to its creator's mm; elsewhere every ioctl is EIO), so the
 * daemon uses VmFd only for its own probe VM; VMMs use it for their VM.
 */
import { constants, openSync } from 'node:fs';
import { join } from 'node:path';
import { SysError } from './errors';
import { OwnedFd, type SendableFd } from './fd';
import { KVM, KVM_DEV_VFIO, O_CLOEXEC, allocInt32, kvmCreateDevice, kvmDeviceAttr, lastErrno, libc } from './libc';

export class Kvm {
  readonly path: string;
  readonly #fd: OwnedFd;

  private constructor(fd: OwnedFd, path: string) {
    this.#fd = fd;
    this.path = path;
  }

  /** open("<devRoot>/kvm", O_RDWR|O_CLOEXEC). */
  static open(devRoot = '/dev'): Kvm {
    const path = join(devRoot, 'kvm');
    try {
      const fd = openSync(path, constants.O_RDWR | O_CLOEXEC);
      return new Kvm(new OwnedFd(fd, path), path);
    } catch (e) {
      throw SysError.fromNode('open', path, e as NodeJS.ErrnoException);
    }
  }

  /** Takes ownership of an already open /dev/kvm fd (one received over SCM_RIGHTS, say). */
  static fromFd(fd: OwnedFd, path = '/dev/kvm'): Kvm {
    return new Kvm(fd, path);
  }

  get fd(): number {
    return this.#fd.fd;
  }

  /** The fd itself, lent to send to a VMM (no duplicate: SCM_RIGHTS makes the VMM's own reference). */
  lend(): SendableFd {
    return this.#fd.lend();
  }

  /** KVM_GET_API_VERSION: 12 on every kernel since 2.6.22. */
  apiVersion(): number {
    const r = libc.ioctlInt(this.fd, KVM.GET_API_VERSION, 0) as number;
    if (r < 0) throw new SysError('KVM_GET_API_VERSION', this.path, lastErrno());
    return r;
  }

  /** KVM_CHECK_EXTENSION on the system fd: 0 when absent, else a capability-specific value. */
  checkExtension(cap: number): number {
    const r = libc.ioctlInt(this.fd, KVM.CHECK_EXTENSION, cap) as number;
    if (r < 0) throw new SysError('KVM_CHECK_EXTENSION', this.path, lastErrno());
    return r;
  }

  /** KVM_CREATE_VM, in this thread. For a VMM making its own VM. */
  createVmSync(label = 'vm'): VmFd {
    const r = libc.ioctlInt(this.fd, KVM.CREATE_VM, 0) as number;
    if (r < 0) throw new SysError('KVM_CREATE_VM', this.path, lastErrno());
    return new VmFd(new OwnedFd(r, label), label);
  }

  /** KVM_CREATE_VM on the libuv pool: it takes ~140 µs and may sleep. */
  createVm(label = 'vm'): Promise<VmFd> {
    const fd = this.fd;
    return new Promise((resolve, reject) => {
      libc.ioctlInt.async(fd, KVM.CREATE_VM, 0, (err: unknown, r: number) => {
        if (err) return reject(err);
        // koffi restores the worker's errno around this callback.
        if (r < 0) return reject(new SysError('KVM_CREATE_VM', this.path, lastErrno()));
        resolve(new VmFd(new OwnedFd(r, label), label));
      });
    });
  }

  close(): Promise<void> {
    return this.#fd.close();
  }

  closeSync(): void {
    this.#fd.closeSync();
  }
}

export class VmFd {
  readonly label: string;
  readonly #fd: OwnedFd;

  constructor(fd: OwnedFd, label: string) {
    this.#fd = fd;
    this.label = label;
  }

  get fd(): number {
    return this.#fd.fd;
  }

  /**
   * KVM_CREATE_DEVICE with KVM_CREATE_DEVICE_TEST: whether this kernel can
   * make a device of `type` in this VM, without making one. ENODEV means no.
   */
  supportsDevice(type: number): boolean {
    const r = libc.ioctlPtr(this.fd, KVM.CREATE_DEVICE, kvmCreateDevice(type, KVM.CREATE_DEVICE_TEST)) as number;
    if (r === 0) return true;
    const errno = lastErrno();
    if (errno === 19 /* ENODEV */) return false;
    throw new SysError('KVM_CREATE_DEVICE_TEST', `${this.label} (device type ${type})`, errno);
  }

  /**
   * KVM_CREATE_DEVICE(KVM_DEV_TYPE_VFIO): the VM's one KVM-VFIO device. A
   * second one fails with EBUSY.
   */
  createVfioDevice(): KvmVfioDevice {
    const arg = kvmCreateDevice(KVM.DEV_TYPE_VFIO, 0);
    const r = libc.ioctlPtr(this.fd, KVM.CREATE_DEVICE, arg) as number;
    if (r < 0) throw new SysError('KVM_CREATE_DEVICE(VFIO)', this.label, lastErrno());
    const label = `kvm-vfio device of ${this.label}`;
    return new KvmVfioDevice(new OwnedFd(arg.readUInt32LE(4), label), label);
  }

  close(): Promise<void> {
    return this.#fd.close();
  }
}

/** The KVM-VFIO pseudo device (Documentation/virt/kvm/devices/vfio.rst). */
export class KvmVfioDevice {
  readonly label: string;
  readonly #fd: OwnedFd;
  // kvm_device_attr.addr points at an int32 holding the VFIO file's fd; the
  // int32 lives in memory that never moves.
  readonly #fdSlot = allocInt32();

  constructor(fd: OwnedFd, label: string) {
    this.#fd = fd;
    this.label = label;
  }

  get fd(): number {
    return this.#fd.fd;
  }

  /** KVM_HAS_DEVICE_ATTR(KVM_DEV_VFIO_FILE, attr): ENXIO means the attribute is unknown. */
  hasVfioAttr(attr: number): boolean {
    const r = libc.ioctlPtr(this.fd, KVM.HAS_DEVICE_ATTR, kvmDeviceAttr(KVM_DEV_VFIO.FILE, attr, 0n)) as number;
    if (r === 0) return true;
    const errno = lastErrno();
    if (errno === 6 /* ENXIO */) return false;
    throw new SysError('KVM_HAS_DEVICE_ATTR', this.label, errno);
  }

  /**
   * KVM_SET_DEVICE_ATTR(KVM_DEV_VFIO_FILE_ADD) with a VFIO group (or device
   * cdev) fd. EEXIST: already added; EINVAL: not a VFIO file; EBADF: not an fd.
   */
  addFile(fileFd: number, what: string): void {
    this.#setAttr(KVM_DEV_VFIO.FILE_ADD, fileFd, 'KVM_SET_DEVICE_ATTR(VFIO_FILE_ADD)', what);
  }

  /** KVM_SET_DEVICE_ATTR(KVM_DEV_VFIO_FILE_DEL). ENOENT: the file was not added. */
  deleteFile(fileFd: number, what: string): void {
    this.#setAttr(KVM_DEV_VFIO.FILE_DEL, fileFd, 'KVM_SET_DEVICE_ATTR(VFIO_FILE_DEL)', what);
  }

  #setAttr(attr: number, fileFd: number, call: string, what: string): void {
    this.#fdSlot.set(fileFd);
    const r = libc.ioctlPtr(this.fd, KVM.SET_DEVICE_ATTR, kvmDeviceAttr(KVM_DEV_VFIO.FILE, attr, this.#fdSlot.address)) as number;
    if (r < 0) throw new SysError(call, what, lastErrno());
  }

  /** Runs on the libuv pool: the kernel's release waits for an RCU grace period. */
  close(): Promise<void> {
    return this.#fd.close();
  }
}
