/**
 * A minimal QMP client for tests that run QEMU: one command per connection —
 * the greeting, qmp_capabilities, the command — resolving with its `return`
 * (events are skipped; an `error` rejects with QEMU's description).
 */
import { connect } from 'node:net';

export function qmp(socket: string, command: string, timeoutMs = 30_000, args?: Record<string, unknown>): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const s = connect(socket);
    let buf = '';
    let step = 0;
    const timer = setTimeout(() => (s.destroy(), reject(new Error(`QMP ${command}: no answer in ${timeoutMs} ms; got ${buf}`))), timeoutMs);
    const done = (f: () => void) => {
      clearTimeout(timer);
      s.destroy();
      f();
    };
    s.on('error', (e) => done(() => reject(e)));
    s.on('data', (chunk) => {
      buf += chunk.toString();
      let i;
      while ((i = buf.indexOf('\n')) >= 0) {
        const msg = JSON.parse(buf.slice(0, i)) as { return?: unknown; error?: { desc: string }; event?: string };
        buf = buf.slice(i + 1);
        if (msg.event) continue;
        if (msg.error) return done(() => reject(new Error(`QMP ${command}: ${msg.error!.desc}`)));
        if (step === 0) s.write(`${JSON.stringify({ execute: 'qmp_capabilities' })}\n`);
        else if (step === 1) s.write(`${JSON.stringify(args ? { execute: command, arguments: args } : { execute: command })}\n`);
        else return done(() => resolve(msg.return));
        step++;
      }
    });
  });
}
