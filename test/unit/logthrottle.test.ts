/**
 * The log throttle (src/server/logthrottle.ts) and the daemon's logger that
 * applies it (src/daemon/log.ts): a burst per event and uid per interval,
 * then one summary line; uid 0 and allowed calls never held back.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { Writable } from 'node:stream';
import { createLogger } from '../../src/daemon/log';
import { LogThrottle, type LogSummary } from '../../src/server/logthrottle';

describe('LogThrottle', () => {
  test('lets `burst` lines of an event and uid through per interval, counts the rest, and summarizes them when the interval ends', (t) => {
    t.mock.timers.enable({ apis: ['setInterval'] });
    const summaries: LogSummary[] = [];
    const th = new LogThrottle({ burst: 3, intervalMs: 10_000 }, (s) => summaries.push(s));
    const passed = (event: string, uid: number | undefined, n: number) => Array.from({ length: n }, () => th.admit(event, uid, 40)).filter(Boolean).length;
    assert.equal(passed('refused', 65534, 1000), 3);
    // Another uid's lines, and another event's, have buckets of their own.
    assert.equal(passed('refused', 1000, 2), 2);
    assert.equal(passed('other', 65534, 5), 3);
    assert.equal(summaries.length, 0);
    t.mock.timers.tick(10_000);
    assert.deepEqual(summaries, [
      { event: 'refused', suppressed: 997, byUid: { '65534': 997 }, intervalMs: 10_000, level: 40 },
      { event: 'other', suppressed: 2, byUid: { '65534': 2 }, intervalMs: 10_000, level: 40 },
    ]);
    // A new interval: a new burst.
    assert.equal(passed('refused', 65534, 5), 3);
    t.mock.timers.tick(10_000);
    assert.equal(summaries.length, 3);
    // Quiet intervals write nothing.
    t.mock.timers.tick(50_000);
    assert.equal(summaries.length, 3);
    th.close();
  });

  test('past maxBuckets, new uids share one bucket; a summary names the largest uids and sums the rest', (t) => {
    t.mock.timers.enable({ apis: ['setInterval'] });
    const summaries: LogSummary[] = [];
    const th = new LogThrottle({ burst: 1, intervalMs: 1000, maxBuckets: 4, maxUidsPerSummary: 2 }, (s) => summaries.push(s));
    let passed = 0;
    for (let uid = 1; uid <= 100; uid++) for (let i = 0; i < uid; i++) if (th.admit('refused', uid)) passed++;
    // Four buckets (uids 1-4) and the shared one: five lines in all.
    assert.equal(passed, 5);
    th.close();
    assert.equal(summaries.length, 1);
    const s = summaries[0];
    assert.equal(s.suppressed, (100 * 101) / 2 - 5);
    // The shared bucket (uids 5-100) and uid 4 are the largest; uids 2 and 3 are summed.
    assert.deepEqual(Object.keys(s.byUid).sort(), ['*', '4', 'other']);
    assert.equal(s.byUid['4'], 3);
    assert.equal(s.byUid.other, 1 + 2);
    assert.equal(s.byUid['*'] + s.byUid['4'] + s.byUid.other, s.suppressed);
  });

  test('close() writes what is pending and leaves no timer behind', () => {
    const summaries: LogSummary[] = [];
    const th = new LogThrottle({ burst: 1, intervalMs: 3_600_000 }, (s) => summaries.push(s));
    th.admit('x', 5);
    th.admit('x', 5);
    th.close();
    assert.equal(summaries[0]?.suppressed, 1);
    // Were a timer left, this test file would not end.
  });
});

describe('the daemon logger', () => {
  function capture() {
    const lines: Record<string, unknown>[] = [];
    const sink = new Writable({
      write(chunk: Buffer, _enc, cb) {
        for (const l of chunk.toString().split('\n')) if (l) lines.push(JSON.parse(l) as Record<string, unknown>);
        cb();
      },
    });
    return { lines, sink };
  }

  test('throttles the events a peer can cause, by uid (the session child logger’s vmm_uid too); never uid 0, never an allowed call', async (t) => {
    t.mock.timers.enable({ apis: ['setInterval'] });
    const { lines, sink } = capture();
    const { log, throttle } = createLogger({ level: 'debug', burst: 2, intervalMs: 10_000 }, sink);
    for (let i = 0; i < 50; i++) log.warn({ event: 'api-connection-refused', uid: 65534, reason: 'per-uid-limit' }, 'refused');
    for (let i = 0; i < 50; i++) log.warn({ event: 'api-connection-refused', uid: 0, reason: 'limit' }, 'refused');
    for (let i = 0; i < 50; i++) log.info({ event: 'call', method: 'GetVm', uid: 65534, outcome: 'PERMISSION_DENIED' }, 'GetVm');
    for (let i = 0; i < 50; i++) log.info({ event: 'call', method: 'CreateVm', uid: 1000, outcome: 'OK' }, 'CreateVm');
    const session = log.child({ session: 7, vmm_pid: 1, vmm_uid: 65534, vmm_gid: 65534 });
    for (let i = 0; i < 50; i++) session.info({ event: 'session-end', reason: 'no ATTACH within 10 ms' }, 'session ended');
    // Not a throttled event at all.
    for (let i = 0; i < 5; i++) log.info({ event: 'vm-created' }, 'made');
    await new Promise((r) => setImmediate(r));
    const n = (pred: (l: Record<string, unknown>) => boolean) => lines.filter(pred).length;
    assert.equal(n((l) => l.event === 'api-connection-refused' && l.uid === 65534), 2);
    assert.equal(n((l) => l.event === 'api-connection-refused' && l.uid === 0), 50);
    assert.equal(n((l) => l.event === 'call' && l.outcome === 'PERMISSION_DENIED'), 2);
    assert.equal(n((l) => l.event === 'call' && l.outcome === 'OK'), 50);
    assert.equal(n((l) => l.event === 'session-end'), 2);
    assert.equal(n((l) => l.event === 'vm-created'), 5);
    t.mock.timers.tick(10_000);
    await new Promise((r) => setImmediate(r));
    const summaries = lines.filter((l) => l.event === 'log-suppressed');
    assert.deepEqual(
      summaries.map((s) => [s.of, s.suppressed, s.by_uid, s.level, s.msg]),
      [
        ['api-connection-refused', 48, { '65534': 48 }, 40, 'api-connection-refused: 48 more in the last 10 s'],
        ['call:PERMISSION_DENIED', 48, { '65534': 48 }, 30, 'call:PERMISSION_DENIED: 48 more in the last 10 s'],
        ['session-end', 48, { '65534': 48 }, 30, 'session-end: 48 more in the last 10 s'],
      ],
    );
    throttle.close();
  });
});
