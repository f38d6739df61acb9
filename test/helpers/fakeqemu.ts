/**
 * A process that stands in for QEMU under `kvmvfioctl attach` in the API
 * tests: `node fakeqemu.js --qmp {qmp} [--opts JSON]` serves QMP on the fd
 * attach filled in (test/helpers/fakeqmp.ts, with the FakeQmpOptions in
 * JSON) and prints JSON lines: `started` (its pid, uid and KVMVFIO_FDS, and
 * whether the qmp fd is a socket), then one `qmp` line per command with what
 * came with it and every fd it holds afterwards (`held`), and `qmp-closed`
 * when the daemon's end goes away. Without --qmp it idles (a QEMU started
 * without the daemon's monitor). A line `{"unplug": ID}` on stdin completes
 * the pending unplug of device ID now (a guest acknowledging late, a
 * reset). SIGTERM ends it (exit 0), as it does QEMU.
 */
import { fstatSync } from 'node:fs';
import { OwnedFd } from '../../src/kernel';
import { FakeQmpPeer, type FakeQmpOptions } from './fakeqmp';

const arg = (name: string): string | undefined => {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : undefined;
};
const print = (o: Record<string, unknown>) => process.stdout.write(`${JSON.stringify(o)}\n`);

const qmpFd = Number(arg('--qmp'));
const opts = JSON.parse(arg('--opts') ?? '{}') as FakeQmpOptions;
process.on('SIGTERM', () => process.exit(0));
print({ event: 'started', pid: process.pid, uid: process.getuid?.(), fds: process.env.KVMVFIO_FDS ?? null, qmpIsSocket: Number.isInteger(qmpFd) && fstatSync(qmpFd).isSocket() });
// Without --qmp it is a passive VMM with no monitor for the daemon: it only idles.
if (Number.isInteger(qmpFd)) {
  const peer = new FakeQmpPeer(new OwnedFd(qmpFd, 'qmp'), opts);
  peer.onCommand = (c) =>
    // After the command ran: what it did shows in `held`.
    setImmediate(() => print({ event: 'qmp', execute: c.execute, arguments: c.arguments, fds: c.fds, held: peer.heldPaths(), devices: [...peer.devices.keys()] }));
  let input = '';
  process.stdin.setEncoding('utf8').on('data', (chunk: string) => {
    input += chunk;
    for (let nl = input.indexOf('\n'); nl >= 0; nl = input.indexOf('\n')) {
      const line = input.slice(0, nl);
      input = input.slice(nl + 1);
      const cmd = JSON.parse(line) as { unplug?: string };
      if (cmd.unplug) peer.unplugNow(cmd.unplug);
    }
  });
  const watch = setInterval(() => {
    if (!peer.isOpen) {
      print({ event: 'qmp-closed' });
      clearInterval(watch);
    }
  }, 20);
}
setInterval(() => undefined, 1 << 30);
