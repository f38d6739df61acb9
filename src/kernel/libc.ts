/**
 * The raw libc boundary: koffi declarations, ioctl request numbers and
 * struct layouts (x86_64), in one place. Nothing outside src/kernel/ imports
 * this file.
 *
 * ioctl is declared non-variadic with a concrete third argument type: on
 * x86_64 glibc it only forwards the register to the syscall, it is ~300 ns
 * cheaper per call than koffi's variadic form, and it can run with `.async`
 * on the libuv pool (measured in shared/labs/perf).
 */
import koffi from 'koffi';

/** The one handle of libc; every kernel module declares its functions on it. */
export const lib = koffi.load('libc.so.6');

export const libc = {
  ioctlInt: lib.func('int ioctl(int fd, unsigned long req, unsigned long arg)'),
  ioctlPtr: lib.func('int ioctl(int fd, unsigned long req, void *arg)'),
  getsockopt: lib.func('int getsockopt(int fd, int level, int name, void *val, void *len)'),
  getrlimit: lib.func('int getrlimit(int resource, void *rlim)'),
  dup3: lib.func('int dup3(int oldfd, int newfd, int flags)'),
  fcntl: lib.func('int fcntl(int fd, int cmd, int arg)'),
};

export function lastErrno(): number {
  return koffi.errno();
}

/** Stable (non-moving) native memory holding one int32, for struct fields that point at an fd. */
export function allocInt32(): { ptr: unknown; address: bigint; set(v: number): void } {
  const ptr = koffi.alloc('int32_t', 1);
  const address = BigInt(koffi.address(ptr) as bigint | number);
  return { ptr, address, set: (v: number) => koffi.encode(ptr, 'int32_t', v) };
}

// Documentation/virt/kvm/api.rst and include/uapi/linux/kvm.h
export const KVM = {
  GET_API_VERSION: 0xae00, // _IO(KVMIO, 0x00)
  CREATE_VM: 0xae01, // _IO(KVMIO, 0x01)
  CHECK_EXTENSION: 0xae03, // _IO(KVMIO, 0x03)
  CREATE_DEVICE: 0xc00caee0, // _IOWR(KVMIO, 0xe0, struct kvm_create_device) 12 bytes
  SET_DEVICE_ATTR: 0x4018aee1, // _IOW(KVMIO, 0xe1, struct kvm_device_attr) 24 bytes
  HAS_DEVICE_ATTR: 0x4018aee3, // _IOW(KVMIO, 0xe3, struct kvm_device_attr)
  CREATE_DEVICE_TEST: 1,
  DEV_TYPE_VFIO: 4,
  CAP_DEVICE_CTRL: 89,
  API_VERSION: 12,
} as const;

// Documentation/virt/kvm/devices/vfio.rst: KVM_DEV_VFIO_FILE (formerly KVM_DEV_VFIO_GROUP) = 1.
export const KVM_DEV_VFIO = {
  FILE: 1,
  FILE_ADD: 1,
  FILE_DEL: 2,
} as const;

// include/uapi/linux/vfio.h: VFIO_TYPE ';' (0x3b), VFIO_BASE 100.
export const VFIO = {
  GET_API_VERSION: 0x3b64,
  CHECK_EXTENSION: 0x3b65,
  SET_IOMMU: 0x3b66,
  GROUP_GET_STATUS: 0x3b67,
  GROUP_SET_CONTAINER: 0x3b68,
  GROUP_UNSET_CONTAINER: 0x3b69,
  GROUP_GET_DEVICE_FD: 0x3b6a,
  DEVICE_GET_REGION_INFO: 0x3b6c, // struct vfio_region_info, 32 bytes
  IOMMU_MAP_DMA: 0x3b71, // struct vfio_iommu_type1_dma_map, 32 bytes
  GROUP_FLAGS_VIABLE: 1,
  GROUP_FLAGS_CONTAINER_SET: 2,
  TYPE1_IOMMU: 1,
  TYPE1v2_IOMMU: 3,
  PCI_CONFIG_REGION_INDEX: 7,
  DMA_MAP_FLAG_READ: 1,
  DMA_MAP_FLAG_WRITE: 2,
  // The device cdev (/dev/vfio/devices/vfioN, 6.6+): _IO(VFIO_TYPE, VFIO_BASE + 7, 18, 19, 20).
  DEVICE_GET_INFO: 0x3b6b, // struct vfio_device_info, 24 bytes
  DEVICE_BIND_IOMMUFD: 0x3b76, // struct vfio_device_bind_iommufd { argsz, flags, s32 iommufd, out_devid }
  DEVICE_ATTACH_IOMMUFD_PT: 0x3b77, // struct vfio_device_attach_iommufd_pt { argsz, flags, pt_id }
  DEVICE_DETACH_IOMMUFD_PT: 0x3b78, // struct vfio_device_detach_iommufd_pt { argsz, flags }
} as const;

// include/uapi/linux/iommufd.h: IOMMUFD_TYPE ';' (0x3b), IOMMUFD_CMD_BASE 0x80; each struct starts with its size.
export const IOMMUFD = {
  DESTROY: 0x3b80, // struct iommu_destroy { size, id }
  IOAS_ALLOC: 0x3b81, // struct iommu_ioas_alloc { size, flags, out_ioas_id }
  IOAS_MAP: 0x3b85, // struct iommu_ioas_map { size, flags, ioas_id, __reserved, u64 user_va, length, iova }
  IOAS_UNMAP: 0x3b86, // struct iommu_ioas_unmap { size, ioas_id, u64 iova, length }
  MAP_FIXED_IOVA: 1,
  MAP_WRITEABLE: 2,
  MAP_READABLE: 4,
} as const;

export const SOCK = {
  SOL_SOCKET: 1,
  SO_PEERCRED: 17,
} as const;

export const RLIMIT_NOFILE = 7;
export const F_DUPFD_CLOEXEC = 1030;

/** struct kvm_create_device { __u32 type; __u32 fd; __u32 flags; } */
export function kvmCreateDevice(type: number, flags: number): Buffer {
  const b = Buffer.alloc(12);
  b.writeUInt32LE(type, 0);
  b.writeUInt32LE(flags, 8);
  return b;
}

/** struct kvm_device_attr { __u32 flags; __u32 group; __u64 attr; __u64 addr; } */
export function kvmDeviceAttr(group: number, attr: number, addr: bigint): Buffer {
  const b = Buffer.alloc(24);
  b.writeUInt32LE(group, 4);
  b.writeBigUInt64LE(BigInt(attr), 8);
  b.writeBigUInt64LE(addr, 16);
  return b;
}

/** struct vfio_group_status { __u32 argsz; __u32 flags; } */
export function vfioGroupStatus(): Buffer {
  const b = Buffer.alloc(8);
  b.writeUInt32LE(8, 0);
  return b;
}

/** fs.constants has no O_CLOEXEC; libuv sets it anyway, this makes it explicit. */
export const O_CLOEXEC = 0o2000000;
