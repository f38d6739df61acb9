/**
 * WatchVms's limits, against stand-in streams whose client reads only when
 * told: streams per uid, and the allowance of unsent events per caller that
 * opening snapshots count against.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { EventEmitter } from 'node:events';
import { status as Status, type ServerWritableStream } from '@grpc/grpc-js';
import pino from 'pino';
import { Broker, type Caller } from '../../src/broker/broker';
import type { Principal } from '../../src/broker/policy';
import { GroupPool } from '../../src/broker/pool';
import { TokenStore } from '../../src/broker/tokens';
import { VmRegistry } from '../../src/broker/vms';
import type { VmEvent } from '../../src/generated/kvmvfio/v1/VmEvent';
import type { WatchVmsRequest__Output } from '../../src/generated/kvmvfio/v1/WatchVmsRequest';
import { createService } from '../../src/server/service';
import { makeFakeHost } from '../helpers/fakehost';
import { HostDouble, KernelDouble } from '../helpers/kerneldouble';

/** A server stream whose client takes what was written only on `take()`. */
class StreamDouble extends EventEmitter {
  readonly request: WatchVmsRequest__Output = { labels: {}, states: [] };
  readonly written: VmEvent[] = [];
  taken = 0;
  error?: { code: Status; details: string };
  ended = false;
  constructor(readonly peer: string) {
    super();
    // grpc-js listens too: it turns the error into the call's status.
    this.on('error', () => {});
  }
  getPeer(): string {
    return this.peer;
  }
  write(ev: VmEvent): boolean {
    this.written.push(ev);
    return true;
  }
  get writableLength(): number {
    return this.written.length - this.taken;
  }
  end(): void {
    this.ended = true;
  }
  /** The client reads everything written so far. */
  take(): void {
    this.taken = this.written.length;
  }
  /** grpc-js is done with the call (read to its end, or cancelled). */
  close(): void {
    this.emit('close');
  }
  override emit(name: string | symbol, ...args: unknown[]): boolean {
    if (name === 'error') this.error = args[0] as { code: Status; details: string };
    return super.emit(name, ...args);
  }
  get synced(): boolean {
    return this.written.some((e) => e.type === 'TYPE_SYNCED');
  }
}

const admin = (name: string): Principal => ({
  name,
  admin: true,
  limits: { vms: 1e6, groups: 1e6, pendingTokens: 1e6, memlockPerVmBytes: 0, memlockBytes: 0 },
  mayCall: () => true,
  mayUseGroup: () => true,
  mayNameVmmUid: () => true,
});

async function withService(opts: { backlog: number; maxPerUid: number; vms: number }, fn: (t: { broker: Broker; watch(uid: number): StreamDouble }) => Promise<void>): Promise<void> {
  const host = await makeFakeHost([]);
  const pool = new GroupPool({ sysfsRoot: host.sysfs, devRoot: host.dev, procRoot: host.root, openGroup: new KernelDouble().openGroup });
  const vmmHost = new HostDouble();
  const broker = new Broker(pool, new VmRegistry(), { tokens: new TokenStore(60_000), host: vmmHost, exitGraceMs: 1000 });
  const ROOT: Caller = { uid: 0, gid: 0, pid: 1 };
  for (let i = 0; i < opts.vms; i++) await broker.createVm(ROOT, { name: `vm-${i}`, labels: {}, vmmUid: 1, vfioDevice: false, groups: [], memlockBytes: 0, requestId: '' });
  // Every caller is an admin, so each sees every VM; the peer string carries the uid.
  const { handlers } = createService({
    broker,
    host: {} as never,
    authorizer: { authorize: (c: Caller) => admin(`ops-${c.uid}`) },
    peers: (peer) => ({ uid: Number(peer), gid: Number(peer), pid: 1 }),
    log: pino({ level: 'silent' }),
    watchBacklog: opts.backlog,
    maxWatchesPerUid: opts.maxPerUid,
  });
  const watch = (uid: number) => {
    const s = new StreamDouble(String(uid));
    handlers.WatchVms(s as unknown as ServerWritableStream<WatchVmsRequest__Output, VmEvent>);
    return s;
  };
  try {
    await fn({ broker, watch });
  } finally {
    vmmHost.close();
    await pool.closeAll();
    await host.cleanup();
  }
}

const turn = () => new Promise((r) => setImmediate(r));

describe('WatchVms limits', () => {
  test('streams per uid: one more than --max-watches-per-uid is refused naming the limit; a stream counts until grpc-js closes it; uid 0 is not limited', async () => {
    await withService({ backlog: 4096, maxPerUid: 2, vms: 3 }, async ({ watch }) => {
      const [a, b] = [watch(1000), watch(1000)];
      assert.ok(a.synced && b.synced);
      const c = watch(1000);
      assert.equal(c.error?.code, Status.RESOURCE_EXHAUSTED);
      assert.equal(c.error?.details, 'uid 1000 has 2 WatchVms streams open; the limit per uid (--max-watches-per-uid) is 2 (a stream counts until its client has read it to its end or cancelled it)');
      assert.equal(c.written.length, 0, 'a refused stream gets no snapshot');
      // Another uid has its own count.
      assert.ok(watch(2000).synced);
      // Ended by the daemon is not enough: the stream still holds what it was sent until it is closed.
      a.emit('cancelled');
      assert.equal(watch(1000).error?.code, Status.RESOURCE_EXHAUSTED);
      a.close();
      const d = watch(1000);
      assert.equal(d.error, undefined);
      assert.ok(d.synced);
      for (let i = 0; i < 5; i++) assert.ok(watch(0).synced, 'uid 0 has no count');
    });
  });

  test("the opening snapshot counts: a caller's unread snapshots together stay within its allowance; another caller has its own", async () => {
    // 4 VMs: each snapshot is 5 events; the allowance is max(10, 2 × 4) = 10.
    await withService({ backlog: 10, maxPerUid: 16, vms: 4 }, async ({ watch }) => {
      const a = watch(1000);
      const b = watch(1000);
      assert.equal(a.writableLength + b.writableLength, 10);
      const c = watch(1000);
      assert.equal(c.error?.code, Status.RESOURCE_EXHAUSTED);
      assert.equal(
        c.error?.details,
        'the WatchVms streams of uid 1000 hold 10 events not yet taken by their clients; an opening snapshot of 5 more would pass the allowance of 10 unsent events per caller (the larger of 10 and twice the VMs); read or close the other streams',
      );
      assert.equal(c.written.length, 0);
      assert.ok(watch(2000).synced, 'uid 2000 has its own allowance');
      // Once a client reads its stream, the allowance has room again.
      a.take();
      assert.ok(watch(1000).synced);
      // uid 0: each stream alone.
      for (let i = 0; i < 3; i++) assert.ok(watch(0).synced);
    });
  });

  test("changes count too: the stream whose event would pass the caller's allowance is ended; an ended stream counts until closed; a reading caller is not touched", async () => {
    // 4 VMs: the allowance stays max(10, 2 × 4) = 10 (updates add no VM).
    await withService({ backlog: 10, maxPerUid: 16, vms: 4 }, async ({ broker, watch }) => {
      const slow = watch(1000); // never reads: 5
      const fast = watch(1000);
      const other = watch(2000);
      const reads = () => {
        fast.take();
        other.take();
      };
      reads();
      const vm = broker.listVms({ uid: 0, gid: 0, pid: 1 }, { labels: {}, states: [] })[0];
      const change = async () => {
        broker.vms.update(vm, (v) => (v.vmmPid += 1));
        await turn();
      };
      for (let i = 0; i < 3; i++) {
        await change();
        reads();
      }
      assert.equal(slow.writableLength, 8);
      assert.equal(slow.error, undefined);
      // fast stops reading: 8 + 1 + 1 = 10 is the allowance, reached but not passed.
      await change();
      other.take();
      assert.deepEqual([slow.writableLength, fast.writableLength, slow.error, fast.error], [9, 1, undefined, undefined]);
      // One more event each would pass it: slow is ended, and fast too, since slow still holds its 9.
      await change();
      other.take();
      for (const s of [slow, fast]) {
        assert.equal(s.error?.code, Status.RESOURCE_EXHAUSTED);
        assert.equal(s.error?.details, 'watcher fell behind: the WatchVms streams of uid 1000 hold 10 events not yet taken by their clients; the allowance is 10 (the larger of 10 and twice the VMs); watch again');
      }
      assert.equal(slow.written.length, 9, 'nothing more was written after the end');
      assert.equal(other.error, undefined, 'uid 2000 reads, and has its own allowance');
      // slow's client cancels: its events are let go, and uid 1000 may sync a new stream.
      assert.equal(watch(1000).error?.code, Status.RESOURCE_EXHAUSTED);
      slow.close();
      assert.ok(watch(1000).synced);
    });
  });
});
