/**
 * A connection flood against a real daemon: 1,000 connections to the API
 * socket (most idle, some sending garbage where the HTTP/2 preface belongs)
 * and 1,000 to the handoff socket, held open together, then all closed —
 * twice. While the flood is open the daemon keeps serving: a call on a
 * connection made before the flood succeeds; a new connection and a VMM
 * attach either work or are refused by a limit (RESOURCE_EXHAUSTED /
 * UNAVAILABLE, EMFILE), never hang. Afterwards its fd count is back at its
 * baseline and it logged nothing at error level.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { connect as netConnect, type Socket } from 'node:net';
import { join } from 'node:path';
import { status } from '@grpc/grpc-js';
import { type KvmVfioApi, isApiError } from '../../src/client/client';
import { SeqpacketSocket, SysError } from '../../src/kernel';
import { until } from '../helpers/assert';
import { type RunningDaemon, startDaemon } from '../helpers/daemon';
import { assertAlive, assertFdsBack, assertNoErrorLogs, logSummary, sleep } from '../helpers/fuzz';
import { REFERENCE_VMM, runVmm, type VmmProc } from '../helpers/vmmproc';

const API_CONNECTIONS = 1000;
const HANDOFF_CONNECTIONS = 1000;
const ROUNDS = 2;

const PREFACE = 'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n';
/** What a misbehaving API client writes instead of (or after) the HTTP/2 preface. */
const GARBAGE: Buffer[] = [
  Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n'),
  Buffer.from(PREFACE.slice(0, 10)), // half a preface, then silence
  Buffer.from(`${PREFACE}\x00\x00\x00\x04\x00\x00\x00\x00\x00`), // preface + an empty SETTINGS, then silence
  Buffer.concat([Buffer.from(PREFACE), Buffer.from('00ffff01050000000100', 'hex')]), // a HEADERS frame claiming 64 KiB, then nothing
  Buffer.from('\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03', 'latin1'), // a TLS ClientHello
  Buffer.alloc(70_000, 0x41), // a lot of junk
];

interface ApiConn {
  sock: Socket;
  outcome: Promise<'open' | 'closed'>;
  /** connect(2) retries after EAGAIN (the listen backlog was full). */
  retries: number;
  error?: string;
}

/**
 * Opens one raw connection to the API socket, retrying while the listen
 * backlog is full (a Unix socket connect fails with EAGAIN then, where TCP
 * would wait); resolves 'open' once connected (and written to), 'closed' if
 * refused otherwise or dropped.
 */
function openApi(path: string, garbage: Buffer | undefined): ApiConn {
  const conn = { retries: 0 } as ApiConn;
  conn.outcome = new Promise<'open' | 'closed'>((resolve) => {
    const attempt = () => {
      const sock = netConnect(path);
      conn.sock = sock;
      let connected = false;
      sock.on('data', () => undefined);
      sock.on('error', (e: NodeJS.ErrnoException) => {
        if (!connected && e.code === 'EAGAIN' && conn.retries < 300) {
          conn.retries++;
          setTimeout(attempt, 10);
          return;
        }
        conn.error ??= e.code ?? e.message;
        resolve('closed');
      });
      sock.once('connect', () => {
        connected = true;
        if (garbage) sock.write(garbage);
        resolve('open');
      });
      sock.once('close', () => {
        if (connected) resolve('closed');
      });
    };
    attempt();
  });
  return conn;
}

let handoffRetries = 0;

/** A non-blocking SOCK_SEQPACKET connect, retried while the daemon's backlog is full; null if refused otherwise. */
async function openHandoff(path: string): Promise<SeqpacketSocket | null> {
  for (let i = 0; ; i++) {
    try {
      return SeqpacketSocket.connect(path, true);
    } catch (e) {
      if (e instanceof SysError && e.code === 'EAGAIN' && i < 500) {
        handoffRetries++;
        await sleep(5);
        continue;
      }
      if (e instanceof SysError) return null;
      throw e;
    }
  }
}

describe('connection flood', () => {
  let d: RunningDaemon;
  let c: KvmVfioApi;
  let handoff: string;
  let base: number;
  const vmms: VmmProc[] = [];

  before(async () => {
    d = await startDaemon({ args: ['--attach-timeout-ms', '60000'] });
    c = d.client();
    handoff = join(d.runtimeDir, 'handoff.sock');
    // Warm up: a call, and a VMM attach and exit, so the baseline holds what a used daemon holds.
    await c.getHostInfo();
    const { vm, attach_token } = await c.createVm({ name: 'warm-up', vmm_uid: 65534 });
    const v = runVmm([process.execPath, REFERENCE_VMM, '--socket', handoff], attach_token!.token);
    vmms.push(v);
    await v.waitFor('guest');
    await c.deleteVm({ vm_id: vm!.id });
    await v.exit;
    await sleep(200);
    base = await d.fdCount();
  });

  after(async () => {
    for (const v of vmms) v.kill();
    await d?.cleanup();
  });

  for (let round = 1; round <= ROUNDS; round++) {
    test(`round ${round}: ${API_CONNECTIONS} API + ${HANDOFF_CONNECTIONS} handoff connections; the daemon serves throughout; fds back after`, async (t) => {
      const t0 = Date.now();
      const api: ApiConn[] = [];
      const seq: SeqpacketSocket[] = [];
      let handoffRefused = 0;
      // Calls on a connection made before the flood, all along: none may fail.
      let pinging = true;
      const latencies: number[] = [];
      // Settles with the first failure (or null), so that it is never an unhandled rejection.
      const pinger = (async () => {
        while (pinging) {
          const t1 = Date.now();
          await c.getHostInfo();
          latencies.push(Date.now() - t1);
          await sleep(25);
        }
      })().then(
        () => null,
        (e: unknown) => e,
      );
      try {
        for (let i = 0; i < API_CONNECTIONS; i++) api.push(openApi(d.apiSocket, i % 10 === 0 ? GARBAGE[(i / 10) % GARBAGE.length] : undefined));
        for (let i = 0; i < HANDOFF_CONNECTIONS; i++) {
          const s = await openHandoff(handoff);
          if (s) seq.push(s);
          else handoffRefused++;
          if (i % 100 === 0) await sleep(0); // let the API sockets connect meanwhile
        }
        const outcomes = await Promise.all(api.map((a) => a.outcome));
        const apiOpen = outcomes.filter((o) => o === 'open').length;
        const apiErrors = new Map<string, number>();
        for (const a of api) if (a.error) apiErrors.set(a.error, (apiErrors.get(a.error) ?? 0) + 1);
        const retried = api.reduce((n, a) => n + a.retries, 0);
        // Give the daemon a moment to accept everything queued, then look at it under load.
        await until('the daemon to accept the flood', async () => (await d.fdCount()) >= base + Math.min(500, apiOpen + seq.length) || undefined, 10_000).catch(() => undefined);
        const fdsUnderFlood = await d.fdCount();

        // A connection made before the flood is served.
        const tc = Date.now();
        const info = await c.getHostInfo();
        assert.equal(info.kvm_api_version, 12);
        const callMs = Date.now() - tc;

        // A new connection: served, or refused by a limit — never a hang.
        const fresh = d.client();
        let freshOutcome = 'OK';
        try {
          await fresh.getHostInfo();
        } catch (e) {
          assert.ok(isApiError(e), String(e));
          assert.ok([status.RESOURCE_EXHAUSTED, status.UNAVAILABLE].includes(e.code), `new connection during the flood: ${status[e.code]} ${e.details}`);
          freshOutcome = `${status[e.code]}: ${e.details}`;
        }
        fresh.close();

        // A VMM attaches, or is refused for a limit.
        const { vm, attach_token } = await c.createVm({ name: `flood-${round}`, vmm_uid: 65534 });
        const v = runVmm([process.execPath, REFERENCE_VMM, '--socket', handoff], attach_token!.token);
        vmms.push(v);
        const seen = await until('the VMM to attach or be refused', async () => v.events.find((e) => e.event === 'guest' || e.event === 'attach-refused'), 15_000);
        const first = seen.event === 'guest' ? 'attached' : `refused: ${String(seen.reason)}`;
        if (first !== 'attached') assert.match(first, /EMFILE|limit|too many|connection/i, `VMM during the flood: ${first}`);
        await c.deleteVm({ vm_id: vm!.id, force: true });
        await v.exit;

        pinging = false;
        const pingFailure = await pinger;
        if (pingFailure) throw pingFailure;
        t.diagnostic(
          `GetHostInfo during the flood: ${latencies.length} calls, slowest ${Math.max(...latencies)} ms; ` +
          `${apiOpen}/${API_CONNECTIONS} API (${retried} EAGAIN retries; errors: ${JSON.stringify([...apiErrors])}) and ${seq.length}/${HANDOFF_CONNECTIONS} handoff connections open (${handoffRetries} EAGAIN retries so far, ${handoffRefused} refused); daemon fds ${fdsUnderFlood} (baseline ${base}); ` +
            `GetHostInfo on an old connection ${callMs} ms; new connection: ${freshOutcome}; VMM: ${first}; ${Date.now() - t0} ms`,
        );
      } finally {
        pinging = false;
        await pinger;
        for (const a of api) a.sock.destroy();
        for (const s of seq) s.closeSync();
      }
      assertAlive(d);
      await c.getHostInfo();
      await assertFdsBack(d, base, 15_000);
      t.diagnostic(`fds back to ${await d.fdCount()} after ${Date.now() - t0} ms; warnings and worse: ${logSummary(d) || 'none'}`);
      assertNoErrorLogs(d);
    });
  }
});
