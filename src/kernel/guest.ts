/**
 * What a VMM needs to run a guest on a VM it made: guest RAM (an anonymous
 * mapping), memory slots, vCPUs with their shared `struct kvm_run`, register
 * access and KVM_RUN. One owning wrapper per kernel object (GuestMemory,
 * Vcpu), one function or method per ioctl, every failure a SysError.
 *
 * Like every VM and vCPU ioctl these work only in the process that created
 * the VM (elsewhere: EIO). The /dev/kvm fd itself may come from anywhere (an
 * unprivileged VMM receives it over SCM_RIGHTS).
 *
 * The VM-level calls (setUserMemoryRegion, Vcpu.create) are free functions
 * taking a VmFd because VmFd lives in kvm.ts; they belong next to it.
 *
 * Request numbers and layouts are x86_64, from include/uapi/linux/kvm.h and
 * arch/x86/include/uapi/asm/kvm.h (KVMIO = 0xAE; _IOC = dir<<30 | size<<16 |
 * type<<8 | nr with _IOC_WRITE = 1, _IOC_READ = 2). Each value and offset was
 * checked against the host's <linux/kvm.h> with a C program printing the
 * macros, sizeof and offsetof (see test/kernel/guest.test.ts for the
 * _IOC arithmetic).
 */
import koffi from 'koffi';
import { SysError } from './errors';
import { OwnedFd } from './fd';
import type { Kvm, VmFd } from './kvm';
import { lastErrno, lib, libc } from './libc';

// koffi 3 returns and takes `void *` as a BigInt address.
const mm = {
  mmap: lib.func('void *mmap(void *addr, size_t len, int prot, int flags, int fd, intptr_t off)'),
  munmap: lib.func('int munmap(void *addr, size_t len)'),
};

// <sys/mman.h> (asm-generic/mman-common.h, x86_64)
const PROT_READ = 0x1;
const PROT_WRITE = 0x2;
const MAP_SHARED = 0x01;
const MAP_PRIVATE = 0x02;
const MAP_ANONYMOUS = 0x20;
const MAP_NORESERVE = 0x4000;
const MAP_FAILED = 0xffff_ffff_ffff_ffffn; // (void *)-1
const PAGE_SIZE = 4096;
const EINTR = 4;

/** include/uapi/linux/kvm.h, x86_64. */
export const KVM_GUEST = {
  GET_VCPU_MMAP_SIZE: 0xae04, // _IO(KVMIO, 0x04), system ioctl
  CREATE_VCPU: 0xae41, // _IO(KVMIO, 0x41), arg = vcpu id
  SET_USER_MEMORY_REGION: 0x4020ae46, // _IOW(KVMIO, 0x46, struct kvm_userspace_memory_region) 32 bytes
  RUN: 0xae80, // _IO(KVMIO, 0x80)
  GET_REGS: 0x8090ae81, // _IOR(KVMIO, 0x81, struct kvm_regs) 144 bytes
  SET_REGS: 0x4090ae82, // _IOW(KVMIO, 0x82, struct kvm_regs)
  GET_SREGS: 0x8138ae83, // _IOR(KVMIO, 0x83, struct kvm_sregs) 312 bytes
  SET_SREGS: 0x4138ae84, // _IOW(KVMIO, 0x84, struct kvm_sregs)
  MEM_LOG_DIRTY_PAGES: 1,
  MEM_READONLY: 2,
} as const;

/** kvm_run.exit_reason values (include/uapi/linux/kvm.h, KVM_EXIT_*). */
export const KVM_EXIT = {
  UNKNOWN: 0,
  EXCEPTION: 1,
  IO: 2,
  HYPERCALL: 3,
  DEBUG: 4,
  HLT: 5,
  MMIO: 6,
  IRQ_WINDOW_OPEN: 7,
  SHUTDOWN: 8,
  FAIL_ENTRY: 9,
  INTR: 10,
  SET_TPR: 11,
  TPR_ACCESS: 12,
  NMI: 16,
  INTERNAL_ERROR: 17,
  SYSTEM_EVENT: 24,
  IOAPIC_EOI: 26,
  HYPERV: 27,
  X86_RDMSR: 29,
  X86_WRMSR: 30,
  DIRTY_RING_FULL: 31,
  X86_BUS_LOCK: 33,
  NOTIFY: 37,
  MEMORY_FAULT: 39, // 6.8+
} as const;

/** kvm_run.io.direction */
export const KVM_EXIT_IO_IN = 0;
export const KVM_EXIT_IO_OUT = 1;

const exitNames = new Map<number, string>(Object.entries(KVM_EXIT).map(([k, v]) => [v, `KVM_EXIT_${k}`]));

export function exitReasonName(reason: number): string {
  return exitNames.get(reason) ?? `KVM_EXIT ${reason}`;
}

/** KVM_GET_VCPU_MMAP_SIZE on the system fd: the size of each vCPU's kvm_run mapping (3 pages on x86_64). */
export function vcpuMmapSize(kvm: Kvm): number {
  const r = libc.ioctlInt(kvm.fd, KVM_GUEST.GET_VCPU_MMAP_SIZE, 0) as number;
  if (r < 0) throw new SysError('KVM_GET_VCPU_MMAP_SIZE', kvm.path, lastErrno());
  return r;
}

export interface MemoryRegion {
  slot: number;
  /** KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY; 0 by default. */
  flags?: number;
  guestPhysAddr: bigint;
  /** 0n deletes the slot. */
  memorySize: bigint;
  userspaceAddr: bigint;
}

/**
 * KVM_SET_USER_MEMORY_REGION: creates, moves or (memorySize 0n) deletes a
 * memory slot.
 *
 * struct kvm_userspace_memory_region { __u32 slot@0; __u32 flags@4;
 * __u64 guest_phys_addr@8; __u64 memory_size@16; __u64 userspace_addr@24; } = 32 bytes
 *
 * Delete a slot before unmapping the memory behind it. Deleting waits for an
 * SRCU grace period (expedited) in the kernel.
 */
export function setUserMemoryRegion(vm: VmFd, region: MemoryRegion): void {
  const b = Buffer.alloc(32);
  b.writeUInt32LE(region.slot, 0);
  b.writeUInt32LE(region.flags ?? 0, 4);
  b.writeBigUInt64LE(region.guestPhysAddr, 8);
  b.writeBigUInt64LE(region.memorySize, 16);
  b.writeBigUInt64LE(region.userspaceAddr, 24);
  const r = libc.ioctlPtr(vm.fd, KVM_GUEST.SET_USER_MEMORY_REGION, b) as number;
  if (r < 0) throw new SysError('KVM_SET_USER_MEMORY_REGION', `${vm.label} slot ${region.slot}`, lastErrno());
}

/**
 * Guest RAM: an anonymous private mapping (MAP_NORESERVE: pages are only
 * charged when the guest or the VMM touches them). Owned; unmapped exactly
 * once. The view on it never leaves this object, so nothing can touch the
 * memory after munmap.
 */
export class GuestMemory {
  readonly label: string;
  readonly size: number;
  #address: bigint;
  #bytes: Uint8Array | undefined;

  private constructor(address: bigint, size: number, label: string) {
    this.#address = address;
    this.size = size;
    this.label = label;
    this.#bytes = new Uint8Array(koffi.view(address, size));
  }

  /** mmap(NULL, size, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE, -1, 0). `size` is a whole number of pages. */
  static map(size: number, label = 'guest memory'): GuestMemory {
    if (!Number.isSafeInteger(size) || size <= 0 || size % PAGE_SIZE !== 0) throw new RangeError(`${label}: size ${size} is not a positive multiple of ${PAGE_SIZE}`);
    const p = BigInt(mm.mmap(null, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0) as bigint);
    if (p === MAP_FAILED) throw new SysError('mmap', `${label} (${size} bytes)`, lastErrno());
    return new GuestMemory(p, size, label);
  }

  /** The host virtual address, for kvm_userspace_memory_region.userspace_addr. */
  get address(): bigint {
    this.#live();
    return this.#address;
  }

  get isMapped(): boolean {
    return this.#bytes !== undefined;
  }

  /** Copies `bytes` to `offset` bytes into the region. */
  write(offset: number, bytes: Uint8Array): void {
    const mem = this.#live();
    if (!Number.isSafeInteger(offset) || offset < 0 || offset + bytes.length > this.size) {
      throw new RangeError(`${this.label}: write of ${bytes.length} bytes at ${offset} is outside ${this.size} bytes`);
    }
    mem.set(bytes, offset);
  }

  /** A copy of `length` bytes at `offset`. */
  read(offset: number, length: number): Buffer {
    const mem = this.#live();
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new RangeError(`${this.label}: read of ${length} bytes at ${offset} is outside ${this.size} bytes`);
    }
    return Buffer.from(mem.subarray(offset, offset + length));
  }

  /** munmap. A second call does nothing. Delete any memory slot using it first. */
  unmap(): void {
    if (this.#bytes === undefined) return;
    this.#bytes = undefined;
    const r = mm.munmap(this.#address, this.size) as number;
    // munmap of a range we mapped fails only on bad arguments; the mapping is
    // forgotten either way, so that is worth an exception, not a retry.
    if (r < 0) throw new SysError('munmap', this.label, lastErrno());
  }

  #live(): Uint8Array {
    if (this.#bytes === undefined) throw new Error(`${this.label}: used after unmap`);
    return this.#bytes;
  }
}

/** struct kvm_regs (arch/x86/include/uapi/asm/kvm.h): 18 × __u64 in this order, 144 bytes. */
export interface KvmRegs {
  rax: bigint;
  rbx: bigint;
  rcx: bigint;
  rdx: bigint;
  rsi: bigint;
  rdi: bigint;
  rsp: bigint;
  rbp: bigint;
  r8: bigint;
  r9: bigint;
  r10: bigint;
  r11: bigint;
  r12: bigint;
  r13: bigint;
  r14: bigint;
  r15: bigint;
  rip: bigint;
  rflags: bigint;
}

const REG_NAMES: readonly (keyof KvmRegs)[] = ['rax', 'rbx', 'rcx', 'rdx', 'rsi', 'rdi', 'rsp', 'rbp', 'r8', 'r9', 'r10', 'r11', 'r12', 'r13', 'r14', 'r15', 'rip', 'rflags'];
const KVM_REGS_SIZE = 144;

/**
 * struct kvm_segment { __u64 base@0; __u32 limit@8; __u16 selector@12;
 * __u8 type@14, present@15, dpl@16, db@17, s@18, l@19, g@20, avl@21,
 * unusable@22, padding@23; } = 24 bytes
 */
export interface KvmSegment {
  base: bigint;
  limit: number;
  selector: number;
  type: number;
  present: number;
  dpl: number;
  db: number;
  s: number;
  l: number;
  g: number;
  avl: number;
  unusable: number;
}

export type SegmentName = 'cs' | 'ds' | 'es' | 'fs' | 'gs' | 'ss' | 'tr' | 'ldt';
const SEGMENT_OFFSETS: Record<SegmentName, number> = { cs: 0, ds: 24, es: 48, fs: 72, gs: 96, ss: 120, tr: 144, ldt: 168 };
const SEGMENT_BYTES = ['type', 'present', 'dpl', 'db', 's', 'l', 'g', 'avl', 'unusable'] as const;
const KVM_SREGS_SIZE = 312;

/**
 * struct kvm_sregs (arch/x86/include/uapi/asm/kvm.h), kept as its 312 bytes
 * so a get/modify/set round trip preserves every field:
 * cs@0 ds@24 es@48 fs@72 gs@96 ss@120 tr@144 ldt@168 (kvm_segment);
 * gdt@192 idt@208 (kvm_dtable {__u64 base; __u16 limit; __u16 padding[3]} = 16);
 * cr0@224 cr2@232 cr3@240 cr4@248 cr8@256 efer@264 apic_base@272 (__u64);
 * interrupt_bitmap@280 (__u64[4]).
 */
export class KvmSregs {
  readonly buf: Buffer;

  constructor(buf = Buffer.alloc(KVM_SREGS_SIZE)) {
    if (buf.length !== KVM_SREGS_SIZE) throw new RangeError(`kvm_sregs is ${KVM_SREGS_SIZE} bytes, got ${buf.length}`);
    this.buf = buf;
  }

  segment(name: SegmentName): KvmSegment {
    const o = SEGMENT_OFFSETS[name];
    const b = this.buf;
    const seg = { base: b.readBigUInt64LE(o), limit: b.readUInt32LE(o + 8), selector: b.readUInt16LE(o + 12) } as KvmSegment;
    SEGMENT_BYTES.forEach((k, i) => (seg[k] = b.readUInt8(o + 14 + i)));
    return seg;
  }

  /** Changes the given fields of one segment; the others keep their value. */
  setSegment(name: SegmentName, fields: Partial<KvmSegment>): void {
    const seg = { ...this.segment(name), ...fields };
    const o = SEGMENT_OFFSETS[name];
    const b = this.buf;
    b.writeBigUInt64LE(seg.base, o);
    b.writeUInt32LE(seg.limit, o + 8);
    b.writeUInt16LE(seg.selector, o + 12);
    SEGMENT_BYTES.forEach((k, i) => b.writeUInt8(seg[k], o + 14 + i));
  }

  get cr0(): bigint {
    return this.buf.readBigUInt64LE(224);
  }

  set cr0(v: bigint) {
    this.buf.writeBigUInt64LE(v, 224);
  }

  get efer(): bigint {
    return this.buf.readBigUInt64LE(264);
  }

  set efer(v: bigint) {
    this.buf.writeBigUInt64LE(v, 264);
  }
}

/** kvm_run.io, for KVM_EXIT_IO. */
export interface IoExit {
  /** KVM_EXIT_IO_IN (0) or KVM_EXIT_IO_OUT (1). */
  direction: number;
  /** Bytes per access: 1, 2 or 4. */
  size: number;
  port: number;
  /** Accesses (more than 1 for a rep ins/outs). */
  count: number;
  /** Offset of the data in the kvm_run mapping. */
  dataOffset: number;
  /** For OUT: a copy of the size × count bytes the guest wrote. For IN: zeros; answer with Vcpu.setIoInData. */
  data: Buffer;
}

export interface VcpuExit {
  reason: number;
  /** "KVM_EXIT_IO", ... */
  name: string;
  io?: IoExit;
  /** KVM_EXIT_UNKNOWN: hw.hardware_exit_reason; KVM_EXIT_FAIL_ENTRY: fail_entry.hardware_entry_failure_reason. */
  hardwareReason?: bigint;
  /** KVM_EXIT_FAIL_ENTRY: fail_entry.cpu. */
  cpu?: number;
  /** KVM_EXIT_INTERNAL_ERROR: internal.suberror (1 emulation, 2 simultaneous exceptions, 3 delivery event, 4 unexpected exit reason). */
  suberror?: number;
  /** KVM_EXIT_INTERNAL_ERROR: internal.data[0..ndata); KVM_EXIT_SYSTEM_EVENT: system_event.data[0..ndata). */
  data?: bigint[];
  /** KVM_EXIT_MMIO: mmio.phys_addr, len and is_write (and the data for a write). */
  mmio?: { physAddr: bigint; len: number; isWrite: boolean; data: Buffer };
  /** KVM_EXIT_SYSTEM_EVENT: system_event.type. */
  eventType?: number;
}

/*
 * struct kvm_run (include/uapi/linux/kvm.h), the fields read here:
 * request_interrupt_window u8@0, immediate_exit u8@1, exit_reason u32@8,
 * ready_for_interrupt_injection u8@12, if_flag u8@13, flags u16@14,
 * cr8 u64@16, apic_base u64@24, then the exit union at 32:
 *   hw { hardware_exit_reason u64@32 }
 *   fail_entry { hardware_entry_failure_reason u64@32, cpu u32@40 }
 *   io { direction u8@32, size u8@33, port u16@34, count u32@36, data_offset u64@40 }
 *   mmio { phys_addr u64@32, data u8[8]@40, len u32@48, is_write u8@52 }
 *   internal { suberror u32@32, ndata u32@36, data u64[16]@40 }
 *   system_event { type u32@32, ndata u32@36, data u64[16]@40 }
 */
const RUN = {
  EXIT_REASON: 8,
  U: 32,
} as const;

/**
 * A vCPU: its fd (close-on-exec, as KVM makes it) and its kvm_run mapping
 * (mmap of the vCPU fd, shared with the kernel). close() unmaps then closes,
 * each exactly once.
 *
 * api.rst: vCPU ioctls should come from the thread that created the vCPU
 * (another thread works, with a cost on the first ioctl after a switch).
 */
export class Vcpu {
  readonly id: number;
  readonly label: string;
  readonly #fd: OwnedFd;
  readonly #runSize: number;
  #runAddress: bigint;
  #run: DataView | undefined;
  #runBytes: Uint8Array | undefined;

  private constructor(fd: OwnedFd, id: number, label: string, runAddress: bigint, runSize: number) {
    this.#fd = fd;
    this.id = id;
    this.label = label;
    this.#runAddress = runAddress;
    this.#runSize = runSize;
    const ab = koffi.view(runAddress, runSize);
    this.#run = new DataView(ab);
    this.#runBytes = new Uint8Array(ab);
  }

  /**
   * KVM_GET_VCPU_MMAP_SIZE (on `kvm`), KVM_CREATE_VCPU(id) on `vm`, then
   * mmap(NULL, size, PROT_READ|PROT_WRITE, MAP_SHARED, vcpufd, 0) of its kvm_run.
   */
  static create(kvm: Kvm, vm: VmFd, id = 0): Vcpu {
    const label = `vcpu ${id} of ${vm.label}`;
    const size = vcpuMmapSize(kvm);
    const r = libc.ioctlInt(vm.fd, KVM_GUEST.CREATE_VCPU, id) as number;
    if (r < 0) throw new SysError('KVM_CREATE_VCPU', label, lastErrno());
    const fd = new OwnedFd(r, label);
    const p = BigInt(mm.mmap(null, size, PROT_READ | PROT_WRITE, MAP_SHARED, r, 0) as bigint);
    if (p === MAP_FAILED) {
      const errno = lastErrno();
      fd.closeSync();
      throw new SysError('mmap(kvm_run)', label, errno);
    }
    return new Vcpu(fd, id, label, p, size);
  }

  get fd(): number {
    return this.#fd.fd;
  }

  get isOpen(): boolean {
    return this.#fd.isOpen;
  }

  /** KVM_GET_REGS */
  getRegs(): KvmRegs {
    const b = Buffer.alloc(KVM_REGS_SIZE);
    const r = libc.ioctlPtr(this.fd, KVM_GUEST.GET_REGS, b) as number;
    if (r < 0) throw new SysError('KVM_GET_REGS', this.label, lastErrno());
    const regs = {} as KvmRegs;
    REG_NAMES.forEach((name, i) => (regs[name] = b.readBigUInt64LE(i * 8)));
    return regs;
  }

  /** KVM_SET_REGS. rflags bit 1 is reserved and must be set (0x2). */
  setRegs(regs: KvmRegs): void {
    const b = Buffer.alloc(KVM_REGS_SIZE);
    REG_NAMES.forEach((name, i) => b.writeBigUInt64LE(BigInt.asUintN(64, regs[name]), i * 8));
    const r = libc.ioctlPtr(this.fd, KVM_GUEST.SET_REGS, b) as number;
    if (r < 0) throw new SysError('KVM_SET_REGS', this.label, lastErrno());
  }

  /** KVM_GET_SREGS */
  getSregs(): KvmSregs {
    const s = new KvmSregs();
    const r = libc.ioctlPtr(this.fd, KVM_GUEST.GET_SREGS, s.buf) as number;
    if (r < 0) throw new SysError('KVM_GET_SREGS', this.label, lastErrno());
    return s;
  }

  /** KVM_SET_SREGS */
  setSregs(sregs: KvmSregs): void {
    const r = libc.ioctlPtr(this.fd, KVM_GUEST.SET_SREGS, sregs.buf) as number;
    if (r < 0) throw new SysError('KVM_SET_SREGS', this.label, lastErrno());
  }

  /**
   * KVM_RUN: enters the guest and returns at its next exit to userspace.
   *
   * Synchronous, on the calling thread: the call blocks exactly as long as
   * the guest runs without an exit to userspace. For a guest that does a
   * few port writes and halts that is microseconds, so a VMM may call it on
   * its main thread; a VMM running a real guest runs each vCPU on a thread
   * of its own (a worker), never on an event loop that serves anything else.
   *
   * A signal arriving during the run makes KVM return EINTR with
   * exit_reason KVM_EXIT_INTR; that is reported as a KVM_EXIT_INTR exit (run
   * again), not an error. In a process other than the VM's creator: EIO.
   */
  run(): VcpuExit {
    const run = this.#view();
    const r = libc.ioctlInt(this.fd, KVM_GUEST.RUN, 0) as number;
    if (r < 0) {
      const errno = lastErrno();
      if (errno === EINTR) return { reason: KVM_EXIT.INTR, name: exitReasonName(KVM_EXIT.INTR) };
      throw new SysError('KVM_RUN', this.label, errno);
    }
    const reason = run.getUint32(RUN.EXIT_REASON, true);
    const exit: VcpuExit = { reason, name: exitReasonName(reason) };
    const u = RUN.U;
    switch (reason) {
      case KVM_EXIT.IO: {
        const size = run.getUint8(u + 1);
        const count = run.getUint32(u + 4, true);
        const dataOffset = Number(run.getBigUint64(u + 8, true));
        const len = size * count;
        if (dataOffset + len > this.#runSize) throw new Error(`${this.label}: KVM_EXIT_IO data at ${dataOffset}+${len} is outside the ${this.#runSize}-byte kvm_run mapping`);
        exit.io = {
          direction: run.getUint8(u),
          size,
          port: run.getUint16(u + 2, true),
          count,
          dataOffset,
          data: Buffer.from(this.#runBytes!.subarray(dataOffset, dataOffset + len)),
        };
        break;
      }
      case KVM_EXIT.UNKNOWN:
        exit.hardwareReason = run.getBigUint64(u, true);
        break;
      case KVM_EXIT.FAIL_ENTRY:
        exit.hardwareReason = run.getBigUint64(u, true);
        exit.cpu = run.getUint32(u + 8, true);
        break;
      case KVM_EXIT.INTERNAL_ERROR:
        exit.suberror = run.getUint32(u, true);
        exit.data = readU64s(run, u + 8, Math.min(run.getUint32(u + 4, true), 16));
        break;
      case KVM_EXIT.SYSTEM_EVENT:
        exit.eventType = run.getUint32(u, true);
        exit.data = readU64s(run, u + 8, Math.min(run.getUint32(u + 4, true), 16));
        break;
      case KVM_EXIT.MMIO: {
        const len = Math.min(run.getUint32(u + 16, true), 8);
        exit.mmio = { physAddr: run.getBigUint64(u, true), len, isWrite: run.getUint8(u + 20) !== 0, data: Buffer.from(this.#runBytes!.subarray(u + 8, u + 8 + len)) };
        break;
      }
    }
    return exit;
  }

  /** Answers a KVM_EXIT_IO IN: the bytes the guest reads, placed at io.data_offset before the next run. */
  setIoInData(io: IoExit, bytes: Uint8Array): void {
    this.#view();
    if (bytes.length !== io.size * io.count) throw new RangeError(`${this.label}: IN of ${io.size}×${io.count} bytes answered with ${bytes.length}`);
    this.#runBytes!.set(bytes, io.dataOffset);
  }

  /** Unmaps kvm_run, then closes the fd on the libuv pool. */
  close(): Promise<void> {
    let unmapError: unknown;
    try {
      this.#unmapRun();
    } catch (e) {
      unmapError = e;
    }
    const closed = this.#fd.close();
    return unmapError === undefined ? closed : closed.then(() => Promise.reject(unmapError));
  }

  /**
   * Unmaps kvm_run and closes the fd on this thread. Closing a vCPU fd only
   * drops a reference (the vCPU lives until its VM goes), so this does not
   * sleep the way a KVM-VFIO device close does.
   */
  closeSync(): void {
    try {
      this.#unmapRun();
    } finally {
      this.#fd.closeSync();
    }
  }

  #unmapRun(): void {
    if (this.#run === undefined) return;
    this.#run = undefined;
    this.#runBytes = undefined;
    const addr = this.#runAddress;
    this.#runAddress = 0n;
    if ((mm.munmap(addr, this.#runSize) as number) < 0) throw new SysError('munmap(kvm_run)', this.label, lastErrno());
  }

  #view(): DataView {
    if (this.#run === undefined) throw new Error(`${this.label}: used after close`);
    return this.#run;
  }
}

function readU64s(dv: DataView, offset: number, n: number): bigint[] {
  const out: bigint[] = [];
  for (let i = 0; i < n; i++) out.push(dv.getBigUint64(offset + 8 * i, true));
  return out;
}
