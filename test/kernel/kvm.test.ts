/**
 * The kernel layer against the real /dev/kvm of this host: the probe, and
 * errno of real failures reaching a caller as the right gRPC status.
 */
import { sysErrorOf } from '../helpers/assert';
import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { openSync, closeSync, writeFileSync, mkdtempSync, rmSync, fstatSync, statSync } from 'node:fs';
import { createServer, connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { status } from '@grpc/grpc-js';
import { Kvm, KVM, OwnedFd, SysError, VfioGroup, openFdCount, peerCredentials, probeKvmVfio } from '../../src/kernel';
import { toStatus } from '../../src/server/status';
import { libc } from '../../src/kernel/libc';


describe('Kvm on the real /dev/kvm', () => {
  test('API version is 12 and the VFIO device probe succeeds without leaking fds', async () => {
    const kvm = Kvm.open('/dev');
    try {
      assert.equal(kvm.apiVersion(), KVM.API_VERSION);
      const before = await openFdCount();
      const support = await probeKvmVfio(kvm);
      assert.deepEqual(support, { kvmVfioDevice: true, fileAdd: true, fileDel: true, errors: [] });
      assert.equal(await openFdCount(), before, 'the probe VM and device fds are closed');
    } finally {
      await kvm.close();
    }
  });

  test('a missing /dev/kvm is ENOENT naming the path', () => {
    const e = sysErrorOf(() => Kvm.open('/nonexistent-dev'));
    assert.equal(e.code, 'ENOENT');
    assert.equal(e.object, '/nonexistent-dev/kvm');
    assert.equal(toStatus(e).code, status.NOT_FOUND);
  });

  test('the /dev/kvm fd is close-on-exec; a loan of it is that fd, its close leaves it open, and it refuses once the owner closed', async () => {
    const kvm = Kvm.open('/dev');
    const loan = kvm.lend();
    try {
      assert.equal((libc.fcntl(kvm.fd, 1 /* F_GETFD */, 0) as number) & 1 /* FD_CLOEXEC */, 1);
      assert.equal(loan.fd, kvm.fd);
      await loan.close();
      loan.closeSync();
      assert.equal(fstatSync(kvm.fd).rdev, statSync('/dev/kvm').rdev, 'still open');
    } finally {
      await kvm.close();
    }
    assert.throws(() => loan.fd, /after close/);
  });

  describe('KVM-VFIO device errors', () => {
    test('second device EBUSY → ALREADY_EXISTS; ADD non-VFIO EINVAL → INVALID_ARGUMENT; bad fd EBADF; DEL ENOENT → NOT_FOUND', async () => {
      const kvm = Kvm.open('/dev');
      const vm = await kvm.createVm('test vm');
      const dev = vm.createVfioDevice();
      const nul = openSync('/dev/null', 'r');
      try {
        const busy = sysErrorOf(() => vm.createVfioDevice());
        assert.equal(busy.code, 'EBUSY');
        assert.equal(toStatus(busy).code, status.ALREADY_EXISTS);
        assert.match(toStatus(busy).details, /KVM_CREATE_DEVICE\(VFIO\) on test vm: EBUSY/);

        const inval = sysErrorOf(() => dev.addFile(nul, '/dev/null'));
        assert.equal(inval.code, 'EINVAL');
        assert.equal(toStatus(inval).code, status.INVALID_ARGUMENT);
        assert.match(toStatus(inval).details, /VFIO_FILE_ADD\) on \/dev\/null: EINVAL/);

        const badf = sysErrorOf(() => dev.addFile(100_000, 'fd 100000'));
        assert.equal(badf.code, 'EBADF');
        assert.equal(toStatus(badf).code, status.INVALID_ARGUMENT);

        const noent = sysErrorOf(() => dev.deleteFile(nul, '/dev/null'));
        assert.equal(noent.code, 'ENOENT');
        assert.equal(toStatus(noent).code, status.NOT_FOUND);

        assert.equal(dev.hasVfioAttr(99), false, 'an unknown attribute is ENXIO → false');
      } finally {
        closeSync(nul);
        await dev.close();
        await vm.close();
        await kvm.close();
      }
    });
  });
});

describe('OwnedFd', () => {
  test('closes once; use after close or release throws; release hands the number over', async () => {
    const a = new OwnedFd(openSync('/dev/null', 'r'), 'null a');
    const n = a.fd;
    await a.close();
    await a.close(); // second close is a no-op, never a close of a reused number
    assert.equal(a.isOpen, false);
    assert.throws(() => a.fd, /used after close/);
    const b = new OwnedFd(openSync('/dev/null', 'r'), 'null b');
    const m = b.release();
    assert.throws(() => b.fd, /used after close or release/);
    await b.close(); // does not close m
    assert.doesNotThrow(() => fstatSync(m));
    closeSync(m);
    assert.ok(n >= 0);
  });
});

describe('VfioGroup', () => {
  test('open of a missing group node is ENOENT; an ordinary file answers GET_STATUS with ENOTTY', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'kvmvfio-k-'));
    try {
      await assert.rejects(VfioGroup.open(join(dir, '7'), 7), (e: unknown) => e instanceof SysError && e.code === 'ENOENT' && e.object === join(dir, '7'));
      writeFileSync(join(dir, '7'), '');
      const g = await VfioGroup.open(join(dir, '7'), 7);
      try {
        const e = sysErrorOf(() => g.status());
        assert.equal(e.code, 'ENOTTY');
        assert.equal(e.call, 'VFIO_GROUP_GET_STATUS');
      } finally {
        await g.close();
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('peerCredentials', () => {
  test('SO_PEERCRED of an accepted Unix connection is this process', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'kvmvfio-k-'));
    const path = join(dir, 's.sock');
    let accepted: Socket | undefined;
    const server = createServer((s) => (accepted = s));
    await new Promise<void>((r) => server.listen(path, r));
    const client = connect(path);
    try {
      await new Promise<void>((r) => client.once('connect', () => r()));
      while (!accepted) await new Promise((r) => setTimeout(r, 5));
      const fd = (accepted as unknown as { _handle: { fd: number } })._handle.fd;
      assert.deepEqual(peerCredentials(fd), { pid: process.pid, uid: process.getuid!(), gid: process.getgid!() });
      const nul = openSync('/dev/null', 'r');
      try {
        assert.equal(sysErrorOf(() => peerCredentials(nul)).code, 'ENOTSOCK');
      } finally {
        closeSync(nul);
      }
    } finally {
      client.destroy();
      accepted?.destroy();
      await new Promise((r) => server.close(r));
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
