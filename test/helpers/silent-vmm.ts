/**
 * A VMM that attaches and makes its VM, then never reads its session again:
 * the daemon's requests to it must time out (DEADLINE_EXCEEDED).
 *
 * With a second argument `slow:<ms>` it is slow instead: it waits that long
 * after the ATTACH result before making its VM, then answers every request
 * (to check that deadlines count from VM_CREATED, not from the send).
 */
import { VmmSession } from '../../src/vmm/session';

const print = (o: object) => process.stdout.write(`${JSON.stringify(o)}\n`);

async function main(): Promise<void> {
  const s = await VmmSession.connect(process.argv[2], process.env.KVMVFIO_TOKEN ?? '');
  const slow = /^slow:(\d+)$/.exec(process.argv[3] ?? '');
  if (slow) {
    print({ event: 'attached', vm: s.attach.vmId });
    await new Promise((r) => setTimeout(r, Number(slow[1])));
    await s.createVm();
    print({ event: 'vm-made' });
    s.serve({ onRequest: (type, arg, errno) => print({ event: 'request', type, arg, errno }), onShutdown: () => process.exit(0) });
    return;
  }
  await s.createVm();
  print({ event: 'silent', vm: s.attach.vmId });
  setInterval(() => undefined, 60_000);
}

main().catch((e) => {
  print({ event: 'error', reason: (e as Error).message });
  process.exit(1);
});
