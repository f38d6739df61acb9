/**
 * The smallest real guest: 16-bit real-mode code that writes a message to
 * the first serial port (I/O port 0x3f8) and halts. A VMM runs it on the VM
 * it made to prove that its /dev/kvm fd, memory slots and vCPUs work — for
 * instance a sandboxed VMM, unable to open /dev/kvm, given the fd by
 * kvmvfiod.
 *
 * No in-kernel irqchip and no serial device model: every `out` to 0x3f8 is a
 * KVM_EXIT_IO to us, and `hlt` with no irqchip is KVM_EXIT_HLT.
 */
import { GuestMemory, KVM_EXIT, KVM_EXIT_IO_OUT, type Kvm, Vcpu, type VcpuExit, type VmFd, setUserMemoryRegion } from '../kernel';

/** Guest RAM: 64 KiB at guest physical 0, memory slot 0. */
export const TINY_GUEST_MEMORY = 0x10000;
export const TINY_GUEST_SLOT = 0;
/** Where the code starts (cs:ip = 0000:1000) and where the message follows it. */
export const TINY_GUEST_ENTRY = 0x1000;
export const TINY_GUEST_MESSAGE = 0x1010;
export const SERIAL_PORT = 0x3f8;
/** ds:si with ds = 0 reaches 0xffff: the longest message in bytes. */
export const TINY_GUEST_MAX_MESSAGE = TINY_GUEST_MEMORY - TINY_GUEST_MESSAGE;

/**
 * The guest's code, hand-assembled (checked with `objdump -D -b binary
 * -m i8086`), followed by the message bytes. A count in cx, not a
 * terminator, so any byte (NUL included) goes out:
 *
 *   1000: ba f8 03     mov dx, 0x3f8
 *   1003: be 10 10     mov si, 0x1010        ; the message
 *   1006: b9 LL HH     mov cx, <length>
 *   1009: e3 04        jcxz 0x100f           ; empty message: straight to hlt
 *   100b: ac           lodsb                 ; al = [ds:si], si++ (DF = 0: rflags = 0x2)
 *   100c: ee           out dx, al            ; one KVM_EXIT_IO per byte
 *   100d: e2 fc        loop 0x100b           ; cx--, again while cx != 0
 *   100f: f4           hlt                   ; KVM_EXIT_HLT
 *   1010: <message>
 */
export function tinyGuestImage(message: Uint8Array): Buffer {
  if (message.length > TINY_GUEST_MAX_MESSAGE) throw new RangeError(`tiny guest message is ${message.length} bytes, at most ${TINY_GUEST_MAX_MESSAGE}`);
  const code = Buffer.from([
    0xba, SERIAL_PORT & 0xff, SERIAL_PORT >> 8,
    0xbe, TINY_GUEST_MESSAGE & 0xff, TINY_GUEST_MESSAGE >> 8,
    0xb9, message.length & 0xff, message.length >> 8,
    0xe3, 0x04,
    0xac,
    0xee,
    0xe2, 0xfc,
    0xf4,
  ]);
  return Buffer.concat([code, message]);
}

export interface TinyGuestResult {
  /** What the guest wrote to port 0x3f8, decoded as UTF-8. */
  serial: string;
  /** KVM_RUN returns, the final HLT included. */
  exits: number;
  /** false only when the exit cap was reached first. */
  halted: boolean;
}

/**
 * Runs the tiny guest on `vm` (which must be this process's own VM, with no
 * memory slot 0 and no vCPU 0 yet): maps 64 KiB of guest RAM as slot 0,
 * creates vCPU 0 in real mode at 0000:1000, and runs it until HLT, collecting
 * what it writes to 0x3f8. Synchronous: the whole run takes microseconds.
 *
 * Any other exit (SHUTDOWN, FAIL_ENTRY, INTERNAL_ERROR, an unexpected port
 * or direction, ...) throws with the reason. At most message length + 64
 * exits; past that, `halted` is false. Before returning or throwing, the
 * vCPU is unmapped and closed, slot 0 deleted and the memory unmapped; the
 * VM stays open (and keeps its vCPU 0 until the VM is closed, as KVM does).
 */
export function runTinyGuest(kvm: Kvm, vm: VmFd, message = 'kvmvfio guest ok\n'): TinyGuestResult {
  const bytes = Buffer.from(message, 'utf8');
  const image = tinyGuestImage(bytes);
  const maxExits = bytes.length + 64;
  const memory = GuestMemory.map(TINY_GUEST_MEMORY, `guest memory of ${vm.label}`);
  let slotSet = false;
  let vcpu: Vcpu | undefined;
  let result: TinyGuestResult | undefined;
  let failure: unknown;
  try {
    memory.write(TINY_GUEST_ENTRY, image);
    setUserMemoryRegion(vm, { slot: TINY_GUEST_SLOT, guestPhysAddr: 0n, memorySize: BigInt(TINY_GUEST_MEMORY), userspaceAddr: memory.address });
    slotSet = true;
    vcpu = Vcpu.create(kvm, vm, 0);

    // A new vCPU is at the x86 reset vector (cs = f000, base ffff0000,
    // ip = fff0), already in real mode. Point cs, and ds for lodsb, at 0.
    const sregs = vcpu.getSregs();
    sregs.setSegment('cs', { base: 0n, selector: 0 });
    sregs.setSegment('ds', { base: 0n, selector: 0 });
    vcpu.setSregs(sregs);
    vcpu.setRegs({ ...vcpu.getRegs(), rip: BigInt(TINY_GUEST_ENTRY), rflags: 0x2n });

    const serial: Buffer[] = [];
    let exits = 0;
    let halted = false;
    while (!halted && exits < maxExits) {
      const exit = vcpu.run();
      exits++;
      switch (exit.reason) {
        case KVM_EXIT.IO: {
          const io = exit.io!;
          if (io.direction !== KVM_EXIT_IO_OUT || io.port !== SERIAL_PORT) throw new Error(`${vcpu.label}: unexpected ${describe(exit)}`);
          serial.push(io.data);
          break;
        }
        case KVM_EXIT.HLT:
          halted = true;
          break;
        case KVM_EXIT.INTR: // a signal interrupted KVM_RUN: run again
          break;
        default:
          throw new Error(`${vcpu.label}: guest stopped with ${describe(exit)}`);
      }
    }
    result = { serial: Buffer.concat(serial).toString('utf8'), exits, halted };
  } catch (e) {
    failure = e;
  }

  // Undo in reverse, each step even if an earlier one failed; the first
  // error wins.
  const steps: (() => void)[] = [
    () => vcpu?.closeSync(),
    () => slotSet && setUserMemoryRegion(vm, { slot: TINY_GUEST_SLOT, guestPhysAddr: 0n, memorySize: 0n, userspaceAddr: 0n }),
    () => memory.unmap(),
  ];
  for (const step of steps) {
    try {
      step();
    } catch (e) {
      failure ??= e;
    }
  }
  if (failure !== undefined) throw failure;
  return result!;
}

function hex(n: number | bigint): string {
  return `0x${n.toString(16)}`;
}

function describe(exit: VcpuExit): string {
  if (exit.io) {
    const { io } = exit;
    return `${exit.name}: ${io.direction === KVM_EXIT_IO_OUT ? 'OUT' : 'IN'} ${io.size}×${io.count} on port ${hex(io.port)}`;
  }
  const parts: string[] = [];
  if (exit.hardwareReason !== undefined) parts.push(`hardware reason ${hex(exit.hardwareReason)}`);
  if (exit.cpu !== undefined) parts.push(`cpu ${exit.cpu}`);
  if (exit.suberror !== undefined) parts.push(`suberror ${exit.suberror}`);
  if (exit.eventType !== undefined) parts.push(`type ${exit.eventType}`);
  if (exit.mmio) parts.push(`${exit.mmio.isWrite ? 'write' : 'read'} of ${exit.mmio.len} bytes at ${hex(exit.mmio.physAddr)}`);
  if (exit.data?.length) parts.push(`data [${exit.data.map(hex).join(', ')}]`);
  return parts.length ? `${exit.name} (${parts.join(', ')})` : exit.name;
}
