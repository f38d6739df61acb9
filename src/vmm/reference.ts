#!/usr/bin/env node
/**
 * The reference VMM: attaches to kvmvfiod with a token, makes its VM with the
 * received /dev/kvm, runs a tiny real-mode guest to HLT (its serial output
 * printed), then serves the daemon's requests until SHUTDOWN. It needs no
 * privilege and no /dev access. Events go to stdout as JSON lines.
 *
 *   KVMVFIO_TOKEN=... node reference.js [--socket /run/kvmvfiod/handoff.sock] [--message TEXT]
 */
import { parseArgs } from 'node:util';
import { runTinyGuest } from './tinyguest';
import { AttachError, VmmSession } from './session';
import { VfioUser } from './vfio';

const say = (event: string, fields: Record<string, unknown> = {}) => process.stdout.write(`${JSON.stringify({ event, ...fields })}\n`);

async function main(): Promise<number> {
  const { values } = parseArgs({
    options: {
      socket: { type: 'string', default: process.env.KVMVFIO_HANDOFF ?? '/run/kvmvfiod/handoff.sock' },
      token: { type: 'string' },
      message: { type: 'string', default: 'kvmvfio guest ok\n' },
    },
  });
  const token = values.token ?? process.env.KVMVFIO_TOKEN;
  if (!token) {
    process.stderr.write('reference-vmm: no token (KVMVFIO_TOKEN or --token)\n');
    return 2;
  }
  let s: VmmSession;
  try {
    s = await VmmSession.connect(values.socket!, token);
  } catch (e) {
    say('attach-refused', { errno: e instanceof AttachError ? e.errno : undefined, reason: (e as Error).message });
    return 1;
  }
  say('attached', { vm: s.attach.vmId, name: s.attach.vmName, memlock: s.attach.memlockBytes, container: s.attach.container !== null, iommufd: s.attach.iommufd !== null, uid: process.getuid?.() });
  const vm = await s.createVm();
  const guest = runTinyGuest(s.attach.kvm, vm, values.message!);
  say('guest', { ...guest });
  // KVMVFIO_USE_VFIO=1: use each group added (container, IOMMU, device fd, config space, DMA), as QEMU would.
  const vfio = process.env.KVMVFIO_USE_VFIO === '1' ? new VfioUser(s.attach.container) : undefined;
  return new Promise<number>((resolve) => {
    s.serve({
      onRequest: (type, arg, errno) => say('request', { type, arg, errno }),
      onGroupAdded: (group, fd) => {
        if (vfio) say('vfio-use', { ...vfio.use(group, fd) });
      },
      onDeviceAdded: (address, cdev, iommufd, ioas) => {
        if (vfio) say('vfio-use', { ...vfio.useDevice(address, cdev, iommufd, ioas) });
      },
      onShutdown: (reason) => {
        say('shutdown', { reason });
        s.close('shutdown');
      },
      onClosed: (reason) => {
        vfio?.close();
        say('closed', { reason });
        resolve(0);
      },
    });
  });
}

main().then(
  (code) => process.exit(code),
  (e) => {
    process.stderr.write(`reference-vmm: ${(e as Error).stack ?? e}\n`);
    process.exit(70);
  },
);
