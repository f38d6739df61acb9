/**
 * A misbehaving VMM for the handoff fuzz (test/fuzz/handoff.fuzz.test.ts): it
 * attaches with a real token, then follows a plan the test generated —
 * records of its own (garbage, wrong fds, a second ATTACH, ...), VM_CREATED
 * or not, answers to the daemon's requests that are right, wrong, late or
 * missing — and ends by exiting, lingering with its session closed, or
 * SIGKILL. It runs in its own process because the daemon ties an attached VM
 * to its VMM's pid: the VM ends when this process does.
 *
 *   KVMVFIO_TOKEN=... node fuzz-vmm.js HANDOFF_SOCKET PLAN.json
 *
 * Prints JSON lines: attached / attach-refused / request / result / closed / done.
 */
import { readFileSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { SeqpacketSocket } from '../../src/kernel';
import { MsgType, RESULT_BIT, decode, encode, isResult } from '../../src/protocol/session';
import { FdFactory, type FdKindName, rawSend, shutdownWrite } from './rawsock';

export interface PlannedRecord {
  /** The record's bytes, hex. */
  hex: string;
  /** fds to attach, by kind. */
  fds: FdKindName[];
}

export type Responder = 'ok' | 'errno' | 'wrong-seq' | 'wrong-type' | 'silent' | 'garbage' | 'with-fds' | 'twice';

export interface FuzzVmmPlan {
  /** ATTACH arg: 0, or 1 for a passive VMM. */
  attachArg: number;
  /**
   * 'wait' for the attach result and go on with the plan; or end the session
   * right after sending ATTACH (half-close or close), linger `lingerMs`, exit.
   */
  attachThen: 'wait' | 'half-close' | 'close';
  /** Sent right after the attach result, before VM_CREATED. */
  before: PlannedRecord[];
  sendCreated: boolean;
  responder: Responder;
  /** An errno for 'errno'. */
  errno: number;
  /** Sent `afterAtMs` into serving (or when serving ends, if sooner). */
  after: PlannedRecord[];
  afterAtMs: number;
  /** How long to serve before ending. */
  serveMs: number;
  end: 'exit' | 'kill' | 'close-linger' | 'half-close-linger';
  lingerMs: number;
}

const say = (event: string, fields: Record<string, unknown> = {}) => process.stdout.write(`${JSON.stringify({ event, ...fields })}\n`);

async function main(): Promise<void> {
  const [path, planFile] = process.argv.slice(2);
  const plan = JSON.parse(readFileSync(planFile, 'utf8')) as FuzzVmmPlan;
  const fdf = new FdFactory(path);
  const sock = SeqpacketSocket.connect(path, true);
  let open = true;

  const send = (bytes: Uint8Array, kinds: FdKindName[] = []) => {
    if (!open) return;
    const fds = kinds.map((k) => fdf.make(k));
    const err = rawSend(sock.fd, bytes, fds);
    fdf.closeAll();
    if (err) say('send-failed', { errno: err });
  };
  /** The next record, or null at end of stream / after `ms`. */
  const next = async (ms: number) => {
    const end = Date.now() + ms;
    while (open) {
      let r;
      try {
        r = sock.recv();
      } catch (e) {
        say('closed', { reason: (e as Error).message });
        open = false;
        return null;
      }
      if (r) {
        if (r.data.length === 0 && r.fds.length === 0) {
          say('closed', { reason: 'end of stream' });
          open = false;
          return null;
        }
        return r;
      }
      if (Date.now() > end) return null;
      await sleep(5);
    }
    return null;
  };

  send(encode({ type: MsgType.ATTACH, seq: 1, status: 0, arg: plan.attachArg, manifest: [], text: process.env.KVMVFIO_TOKEN ?? '' }));
  if (plan.attachThen !== 'wait') {
    if (plan.attachThen === 'close') sock.closeSync();
    else shutdownWrite(sock.fd);
    say('left', { how: plan.attachThen });
    await sleep(plan.lingerMs);
    process.exit(0);
  }
  const res = await next(5000);
  if (!res) {
    say('attach-refused', { reason: 'no result' });
    process.exit(1);
  }
  for (const f of res.fds) f.closeSync();
  const m = decode(res.data, res.fds.length);
  if (m.status !== 0) {
    say('attach-refused', { errno: m.status, reason: m.text });
    process.exit(1);
  }
  say('attached', { vm: m.text.split(' ')[0], fds: res.fds.length });

  for (const r of plan.before) send(Buffer.from(r.hex, 'hex'), r.fds);
  if (plan.sendCreated) send(encode({ type: MsgType.VM_CREATED, seq: 2, status: 0, arg: 0, manifest: [], text: '' }));

  const started = Date.now();
  let afterSent = false;
  const sendAfter = () => {
    if (afterSent) return;
    afterSent = true;
    for (const r of plan.after) send(Buffer.from(r.hex, 'hex'), r.fds);
  };
  while (open && Date.now() - started < plan.serveMs) {
    if (Date.now() - started >= plan.afterAtMs) sendAfter();
    const r = await next(Math.max(1, Math.min(plan.serveMs, afterSent ? plan.serveMs : plan.afterAtMs) - (Date.now() - started)));
    if (!r) continue;
    for (const f of r.fds) f.closeSync();
    let req;
    try {
      req = decode(r.data, r.fds.length);
    } catch (e) {
      say('bad-record', { reason: (e as Error).message });
      continue;
    }
    if (isResult(req.type)) {
      say('result', { type: req.type, seq: req.seq, status: req.status, arg: req.arg, text: req.text });
      continue;
    }
    say('request', { type: req.type, seq: req.seq });
    const answer = (over: Partial<Parameters<typeof encode>[0]> = {}) =>
      encode({ type: req.type | RESULT_BIT, seq: req.seq, status: 0, arg: 0, manifest: [], text: '', ...over });
    switch (plan.responder) {
      case 'ok':
        send(answer());
        break;
      case 'errno':
        send(answer({ status: plan.errno }));
        break;
      case 'wrong-seq':
        send(answer({ seq: (req.seq + 1000) >>> 0 }));
        break;
      case 'wrong-type':
        send(answer({ type: (req.type === MsgType.ADD_GROUP ? MsgType.REMOVE_GROUP : MsgType.ADD_GROUP) | RESULT_BIT }));
        break;
      case 'silent':
        break;
      case 'garbage':
        send(Buffer.from('not a record at all'));
        break;
      case 'with-fds':
        send(encode({ type: req.type | RESULT_BIT, seq: req.seq, status: 0, arg: 0, manifest: [{ kind: 3, id: 0 }], text: '' }), ['dev-null']);
        break;
      case 'twice':
        send(answer());
        send(answer());
        break;
    }
  }
  sendAfter();
  // A VMM whose session ended early lives on (its VM with it) until its time is up.
  const left = plan.serveMs - (Date.now() - started);
  if (left > 0) await sleep(left);
  say('done', { end: plan.end });
  switch (plan.end) {
    case 'exit':
      process.exit(0);
      break;
    case 'kill':
      process.kill(process.pid, 'SIGKILL');
      break;
    case 'close-linger':
      sock.closeSync();
      await sleep(plan.lingerMs);
      process.exit(0);
      break;
    case 'half-close-linger':
      shutdownWrite(sock.fd);
      await sleep(plan.lingerMs);
      process.exit(0);
  }
}

main().catch((e) => {
  say('error', { reason: (e as Error).message });
  process.exit(2);
});
