/**
 * Guest memory, vCPUs and KVM_RUN against the real /dev/kvm: the tiny
 * real-mode guest, in this process and in an unprivileged child that has
 * only an inherited /dev/kvm fd.
 */
import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { openSync, closeSync, readFileSync, accessSync, constants } from 'node:fs';
import { join } from 'node:path';
import { GuestMemory, KVM_EXIT, KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT, KVM_GUEST, Kvm, SysError, Vcpu, openFdCount, setUserMemoryRegion, vcpuMmapSize } from '../../src/kernel';
import { runTinyGuest, tinyGuestImage } from '../../src/vmm/tinyguest';

const CHILD_JS = join(__dirname, '..', 'helpers', 'run-guest-child.js');
const NOBODY = 65534;

// include/uapi/asm-generic/ioctl.h: _IOC(dir, type, nr, size) = dir<<30 | size<<16 | type<<8 | nr.
const KVMIO = 0xae;
const ioc = (dir: number, nr: number, size: number) => ((dir << 30) | (size << 16) | (KVMIO << 8) | nr) >>> 0;
const IO = (nr: number) => ioc(0, nr, 0);
const IOW = (nr: number, size: number) => ioc(1, nr, size);
const IOR = (nr: number, size: number) => ioc(2, nr, size);

function vcpuMappings(): string[] {
  return readFileSync('/proc/self/maps', 'utf8').split('\n').filter((l) => l.includes('kvm-vcpu'));
}

describe('KVM guest ioctls', () => {
  test('request numbers are the _IOC values of their structs (x86_64)', () => {
    assert.equal(KVM_GUEST.GET_VCPU_MMAP_SIZE, IO(0x04));
    assert.equal(KVM_GUEST.CREATE_VCPU, IO(0x41));
    assert.equal(KVM_GUEST.SET_USER_MEMORY_REGION, IOW(0x46, 32));
    assert.equal(KVM_GUEST.RUN, IO(0x80));
    assert.equal(KVM_GUEST.GET_REGS, IOR(0x81, 144));
    assert.equal(KVM_GUEST.SET_REGS, IOW(0x82, 144));
    assert.equal(KVM_GUEST.GET_SREGS, IOR(0x83, 312));
    assert.equal(KVM_GUEST.SET_SREGS, IOW(0x84, 312));
    assert.deepEqual(
      [KVM_GUEST.SET_USER_MEMORY_REGION, KVM_GUEST.CREATE_VCPU, KVM_GUEST.GET_VCPU_MMAP_SIZE, KVM_GUEST.RUN, KVM_GUEST.GET_REGS, KVM_GUEST.SET_REGS, KVM_GUEST.GET_SREGS, KVM_GUEST.SET_SREGS],
      [0x4020ae46, 0xae41, 0xae04, 0xae80, 0x8090ae81, 0x4090ae82, 0x8138ae83, 0x4138ae84],
    );
  });

  test('GuestMemory maps, copies in and out, unmaps once, and refuses use after unmap', () => {
    const mem = GuestMemory.map(0x10000, 'test memory');
    const start = mem.address.toString(16);
    const mapped = () => readFileSync('/proc/self/maps', 'utf8').split('\n').some((l) => l.startsWith(`${start}-`));
    assert.ok(mapped(), 'the mapping is in /proc/self/maps');
    mem.write(0xfff0, Buffer.from('0123456789abcdef'));
    assert.equal(mem.read(0xfff8, 8).toString(), '89abcdef');
    assert.throws(() => mem.write(0xfff1, Buffer.alloc(16)), RangeError);
    mem.unmap();
    mem.unmap();
    assert.equal(mem.isMapped, false);
    assert.ok(!mapped(), 'munmap removed it');
    assert.throws(() => mem.write(0, Buffer.alloc(1)), /used after unmap/);
    assert.throws(() => GuestMemory.map(1000), RangeError);
  });

  test('tiny guest image is the hand-assembled code followed by the message', () => {
    assert.deepEqual(
      [...tinyGuestImage(Buffer.from('hi'))],
      [0xba, 0xf8, 0x03, 0xbe, 0x10, 0x10, 0xb9, 0x02, 0x00, 0xe3, 0x04, 0xac, 0xee, 0xe2, 0xfc, 0xf4, 0x68, 0x69],
    );
  });

  test('as root, in this process: the tiny guest writes its line to 0x3f8 and halts; no fd or mapping is left', async () => {
    const fdsBefore = await openFdCount();
    const kvm = Kvm.open('/dev');
    const vm = await kvm.createVm('tiny vm');
    try {
      const fdsWithVm = await openFdCount();
      const message = 'kvmvfio guest ok\n';
      const r = runTinyGuest(kvm, vm, message);
      assert.equal(r.serial, message);
      assert.equal(r.halted, true);
      assert.ok(r.exits >= message.length + 1, `${r.exits} exits: one per byte and the HLT`);
      assert.equal(await openFdCount(), fdsWithVm, 'the vCPU fd is closed');
      assert.deepEqual(vcpuMappings(), [], 'kvm_run is unmapped');
    } finally {
      await vm.close();
      await kvm.close();
    }
    assert.equal(await openFdCount(), fdsBefore);
  });

  test('Vcpu: registers round-trip, an IN is answered through kvm_run, a second vCPU 0 is EEXIST', async () => {
    const kvm = Kvm.open('/dev');
    const vm = await kvm.createVm('io vm');
    const mem = GuestMemory.map(0x10000);
    let vcpu: Vcpu | undefined;
    try {
      assert.ok(vcpuMmapSize(kvm) >= 4096);
      // 1000: mov dx, 0x3f8 / in al, dx / out dx, al / hlt
      mem.write(0x1000, Buffer.from([0xba, 0xf8, 0x03, 0xec, 0xee, 0xf4]));
      setUserMemoryRegion(vm, { slot: 0, guestPhysAddr: 0n, memorySize: 0x10000n, userspaceAddr: mem.address });
      vcpu = Vcpu.create(kvm, vm, 0);
      const again = (() => {
        try {
          Vcpu.create(kvm, vm, 0).closeSync();
        } catch (e) {
          return e;
        }
      })();
      assert.ok(again instanceof SysError && again.code === 'EEXIST' && again.call === 'KVM_CREATE_VCPU', String(again));

      const sregs = vcpu.getSregs();
      assert.equal(sregs.segment('cs').selector, 0xf000, 'a new vCPU sits at the reset vector');
      sregs.setSegment('cs', { base: 0n, selector: 0 });
      vcpu.setSregs(sregs);
      assert.deepEqual({ base: vcpu.getSregs().segment('cs').base, selector: vcpu.getSregs().segment('cs').selector }, { base: 0n, selector: 0 });
      vcpu.setRegs({ ...vcpu.getRegs(), rip: 0x1000n, rflags: 0x2n, rax: 0x1234n });
      assert.equal(vcpu.getRegs().rip, 0x1000n);

      const inExit = vcpu.run();
      assert.equal(inExit.reason, KVM_EXIT.IO);
      const { direction, size, port, count } = inExit.io!;
      assert.deepEqual({ direction, size, port, count }, { direction: KVM_EXIT_IO_IN, size: 1, port: 0x3f8, count: 1 });
      vcpu.setIoInData(inExit.io!, Buffer.from('Z'));
      const outExit = vcpu.run();
      assert.equal(outExit.io?.direction, KVM_EXIT_IO_OUT);
      assert.equal(outExit.io?.data.toString(), 'Z');
      assert.equal(vcpu.run().name, 'KVM_EXIT_HLT');
      assert.equal(vcpu.getRegs().rip, 0x1006n, 'rip is past the hlt');
    } finally {
      vcpu?.closeSync();
      setUserMemoryRegion(vm, { slot: 0, guestPhysAddr: 0n, memorySize: 0n, userspaceAddr: 0n });
      mem.unmap();
      await vm.close();
      await kvm.close();
    }
    assert.throws(() => vcpu!.run(), /used after close/);
  });

  test('unprivileged: uid 65534 cannot open /dev/kvm, but with an inherited /dev/kvm fd runs its own VM and guest', async () => {
    accessSync(CHILD_JS, constants.R_OK);
    const message = 'hello from nobody\n';
    const kvmFd = openSync('/dev/kvm', 'r+');
    let stdout = '';
    let stderr = '';
    let code: number | null;
    try {
      const child = spawn('setpriv', [`--reuid=${NOBODY}`, `--regid=${NOBODY}`, '--clear-groups', process.execPath, CHILD_JS, message], {
        stdio: ['ignore', 'pipe', 'pipe', kvmFd],
        env: { ...process.env, KVMVFIO_GUEST_CHILD: '1' },
      });
      child.stdout!.on('data', (d: Buffer) => (stdout += d));
      child.stderr!.on('data', (d: Buffer) => (stderr += d));
      code = await new Promise<number | null>((resolve, reject) => {
        child.once('error', reject);
        child.once('close', (c) => resolve(c));
      });
    } finally {
      closeSync(kvmFd);
    }
    const lines = stdout.trim().split('\n');
    const out = JSON.parse(lines[lines.length - 1]!) as Record<string, unknown>;
    assert.equal(code, 0, `child failed: ${stdout} ${stderr}`);
    assert.equal(out.uid, NOBODY);
    assert.equal(out.euid, NOBODY);
    assert.equal(out.gid, NOBODY);
    assert.deepEqual(out.groups, []);
    assert.equal(out.openByPath, 'EACCES', 'open("/dev/kvm") by path is refused');
    assert.equal(out.apiVersion, 12);
    assert.equal(out.serial, message);
    assert.equal(out.halted, true);
  });
});
