/**
 * A VMM that attaches and makes its VM, then never reads its session again:
 * the daemon's requests to it must time out (DEADLINE_EXCEEDED).
 */
import { VmmSession } from '../../src/vmm/session';

async function main(): Promise<void> {
  const s = await VmmSession.connect(process.argv[2], process.env.KVMVFIO_TOKEN ?? '');
  await s.createVm();
  process.stdout.write(`${JSON.stringify({ event: 'silent', vm: s.attach.vmId })}\n`);
  setInterval(() => undefined, 60_000);
}

main().catch((e) => {
  process.stdout.write(`${JSON.stringify({ event: 'error', reason: (e as Error).message })}\n`);
  process.exit(1);
});
