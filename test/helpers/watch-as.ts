/**
 * Opens WatchVms streams one after another and prints each one's outcome as a
 * JSON line; run it through setpriv to watch as another uid. It stays alive,
 * holding its streams, until it is killed.
 *   node watch-as.js SOCKET COUNT read|stall
 * read: each stream is read on and on; its line comes at SYNCED.
 * stall: each stream is read up to its first event, then never again (its
 * client stops taking what the daemon sends).
 * A stream the daemon ends prints {stream, code, details}.
 */
import * as grpc from '@grpc/grpc-js';
import { loadApi } from '../../src/api/proto';
import type { VmEvent__Output } from '../../src/generated/kvmvfio/v1/VmEvent';

const [socket, countText, mode] = process.argv.slice(2);
const say = (o: Record<string, unknown>) => process.stdout.write(`${JSON.stringify(o)}\n`);

async function main(): Promise<void> {
  const { proto } = loadApi();
  const client = new proto.kvmvfio.v1.KvmVfio(`unix:${socket}`, grpc.credentials.createInsecure(), { 'grpc.max_receive_message_length': 16 * 1024 * 1024 });
  for (let i = 0; i < Number(countText); i++) {
    await new Promise<void>((resolve) => {
      const call = client.WatchVms({});
      let told = false;
      const tell = (o: Record<string, unknown>) => {
        if (told) return;
        told = true;
        say({ stream: i, ...o });
        resolve();
      };
      call.on('data', (ev: VmEvent__Output) => {
        if (mode === 'stall') {
          call.pause();
          tell({ first: ev.type });
        } else if (ev.type === 'TYPE_SYNCED') tell({ synced: true });
      });
      call.on('error', (e: grpc.ServiceError) => {
        if (told) say({ stream: i, code: e.code, details: e.details });
        else tell({ code: e.code, details: e.details });
      });
    });
  }
  say({ done: true });
  // Hold the streams until killed.
  setInterval(() => {}, 1 << 30);
}

void main();
