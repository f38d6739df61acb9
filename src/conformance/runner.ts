/**
 * The conformance runner: plays the daemon's side of the handoff session
 * (docs/session-protocol.md) against a VMM binary and reports, rule by rule,
 * whether the VMM follows the contract. Each scenario runs the VMM afresh on
 * a handoff socket of the runner's own and drives it through records a
 * daemon would send — and some a daemon never should — watching what it
 * answers, what it closes and whether it exits.
 *
 * It needs /dev/kvm (the VMM makes a real VM with the fd it is given); the
 * "VFIO group" it hands over is one end of a socketpair, which the VMM's
 * kernel refuses (EINVAL) and whose close the runner sees on the other end.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { randomBytes, randomUUID } from 'node:crypto';
import { chmodSync, constants, mkdtempSync, openSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { OwnedFd, SeqpacketListener, SeqpacketSocket } from '../kernel';
import {
  AttachFlag,
  FdKind,
  type Message,
  MsgType,
  RESULT_BIT,
  decode,
  encode,
  fieldViolation,
  typeName,
} from '../protocol/session';

export type Level = 'MUST' | 'SHOULD';

/** The rules a VMM must follow that the runner checks, by id, as the document states them. */
export const VMM_RULES: Record<string, { level: Level; title: string }> = {
  S1: { level: 'MUST', title: 'records the VMM sends are at most 4096 bytes' },
  S2: { level: 'MUST', title: 'the VMM sends no fds' },
  S3: { level: 'MUST', title: 'records the VMM sends decode (magic, version, lengths, reserved 0, UTF-8)' },
  S4: { level: 'MUST', title: 'on a garbled record the VMM neither acts nor answers, closes its fds and ends the session' },
  S5: { level: 'MUST', title: 'the VMM sends requests with status 0 and the fixed args, results with arg 0, texts without NUL; ② it treats records that break this as garbled' },
  S6: { level: 'MUST', title: "a result echoes its request's seq and type | 0x8000, whatever the seq" },
  S7: { level: 'MUST', title: 'a result that answers none of its requests ends the session without a reply' },
  S8: { level: 'MUST', title: 'exactly one result per request' },
  S10: { level: 'MUST', title: 'ATTACH first, with the token, from the process that connected' },
  S12: { level: 'MUST', title: 'ATTACH flags: no unknown bits, no PASSIVE for a VMM that speaks the session; SHOULD attach again without EDITION2 when the daemon predates it' },
  S13: { level: 'SHOULD', title: 'after a refusal without TOKEN_KEPT the VMM does not present the token again' },
  S14: { level: 'MUST', title: 'the VMM takes the fds of the ATTACH result by manifest kind, not position' },
  S16: { level: 'MUST', title: 'VM_CREATED once, after its KVM_CREATE_VM, before it answers any request' },
  S18: { level: 'MUST', title: 'the VMM accepts the VM_CREATED result before, among or after the requests' },
  S20: { level: 'MUST', title: "requests answered in order, with its kernel's errno; EOPNOTSUPP for types the daemon does not send; ENOENT for a REMOVE of what it does not hold" },
  S21: { level: 'MUST', title: 'a request whose manifest does not match its type is garbled' },
  S22: { level: 'MUST', title: 'the fd of a failed ADD_GROUP is closed' },
  S26: { level: 'MUST', title: 'SHUTDOWN: status 0, then the VMM stops its VM and exits' },
  S27: { level: 'MUST', title: 'PING answered with status 0' },
  S28: { level: 'SHOULD', title: 'when the daemon ends the session the VMM stops its VM and exits' },
};

export type Outcome = 'pass' | 'fail' | 'skip';

export interface RuleReport {
  id: string;
  level: Level;
  title: string;
  outcome: Outcome;
  /** What was seen: the first failure, or the checks that passed. */
  details: string[];
}

export interface ConformanceOptions {
  /** The VMM and its arguments; `{handoff}` becomes the socket's path. */
  argv: string[];
  /** Added to the VMM's environment (the runner sets KVMVFIO_HANDOFF and KVMVFIO_TOKEN). */
  env?: Record<string, string>;
  /** How long to wait for each thing a VMM should do. Default 5000 ms. */
  waitMs?: number;
  /** Scenario names to run (default: all). */
  only?: string[];
  /** Progress lines. */
  log?: (line: string) => void;
}

/** open(2)'s O_CLOEXEC (Node's fs.constants lacks it). */
const O_CLOEXEC = 0o2000000;
const ERRNO = { ENOENT: 2, EINVAL: 22, EBUSY: 16, EACCES: 13, EOPNOTSUPP: 95 } as const;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

type Got = { kind: 'record'; msg: Message; fds: OwnedFd[] } | { kind: 'eof' } | { kind: 'timeout' } | { kind: 'bad'; reason: string };

/** What the runner saw of each rule. */
class Verdicts {
  readonly #seen = new Map<string, { pass: string[]; fail: string[]; skip: string[] }>();

  #of(id: string) {
    let v = this.#seen.get(id);
    if (!v) this.#seen.set(id, (v = { pass: [], fail: [], skip: [] }));
    return v;
  }

  check(id: string, ok: boolean, what: string): boolean {
    this.#of(id)[ok ? 'pass' : 'fail'].push(what);
    return ok;
  }

  skip(id: string, why: string): void {
    this.#of(id).skip.push(why);
  }

  report(): RuleReport[] {
    return Object.entries(VMM_RULES).map(([id, r]) => {
      const v = this.#seen.get(id) ?? { pass: [], fail: [], skip: ['not checked'] };
      const outcome: Outcome = v.fail.length ? 'fail' : v.pass.length ? 'pass' : 'skip';
      return { id, ...r, outcome, details: outcome === 'fail' ? v.fail : outcome === 'pass' ? v.pass : v.skip };
    });
  }
}

/** One run of the VMM: its process and its connection. */
class Run {
  readonly proc: ChildProcess;
  readonly token = randomBytes(32).toString('base64url');
  sock?: SeqpacketSocket;
  /** The tail of what it printed, for failure details. */
  #output = '';
  #exit?: { code: number | null; signal: NodeJS.Signals | null };
  readonly #exited: Promise<void>;

  constructor(argv: string[], env: NodeJS.ProcessEnv) {
    this.proc = spawn(argv[0], argv.slice(1), { stdio: ['ignore', 'pipe', 'pipe'], env: { ...env, KVMVFIO_TOKEN: this.token } });
    const keep = (c: Buffer) => (this.#output = (this.#output + c.toString('utf8')).slice(-2000));
    this.proc.stdout!.on('data', keep);
    this.proc.stderr!.on('data', keep);
    this.#exited = new Promise((resolve) => this.proc.once('close', (code, signal) => ((this.#exit = { code, signal }), resolve())));
    this.proc.once('error', (e) => (this.#output += `\nspawn: ${e.message}`));
  }

  get output(): string {
    return this.#output.trim();
  }

  get exitStatus(): string {
    return this.#exit ? (this.#exit.signal ? `killed by ${this.#exit.signal}` : `exit ${this.#exit.code}`) : 'running';
  }

  /** Whether the process exits within `ms`. */
  async exitsWithin(ms: number): Promise<boolean> {
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<boolean>((r) => (timer = setTimeout(() => r(false), ms)));
    const ok = await Promise.race([this.#exited.then(() => true), late]);
    clearTimeout(timer);
    return ok;
  }

  async stop(): Promise<void> {
    this.sock?.closeSync();
    this.sock = undefined;
    if (!this.#exit) {
      this.proc.kill('SIGKILL');
      await this.#exited;
    }
  }
}

export class ConformanceRunner {
  readonly #opts: ConformanceOptions;
  readonly #wait: number;
  readonly #v = new Verdicts();
  #dir = '';
  #listener?: SeqpacketListener;
  #kvm?: OwnedFd;
  #devNull?: OwnedFd;
  /** The EDITION2 bit of the VMM's ATTACH in the first scenario: edition-2 rules are checked only then. */
  #edition2: boolean | undefined;

  constructor(opts: ConformanceOptions) {
    this.#opts = opts;
    this.#wait = opts.waitMs ?? 5000;
  }

  async run(): Promise<RuleReport[]> {
    this.#dir = mkdtempSync(join(tmpdir(), 'kvmvfio-conformance-'));
    try {
      chmodSync(this.#dir, 0o755); // a VMM run as another uid connects here
      const path = join(this.#dir, 'handoff.sock');
      this.#listener = SeqpacketListener.listen(path, 16);
      this.#listener.passCredentials();
      chmodSync(path, 0o666);
      this.#kvm = new OwnedFd(openSync('/dev/kvm', constants.O_RDWR | O_CLOEXEC), '/dev/kvm');
      this.#devNull = new OwnedFd(openSync('/dev/null', constants.O_RDWR | O_CLOEXEC), '/dev/null');
      const scenarios: [string, () => Promise<void>][] = [
        ['lifecycle', () => this.#lifecycle()],
        ['requests', () => this.#requests()],
        ['garbled', () => this.#garbled()],
        ['manifest', () => this.#manifest()],
        ['stray-result', () => this.#strayResult()],
        ['edition2-status', () => this.#edition2Field('status')],
        ['edition2-nul', () => this.#edition2Field('nul')],
        ['refused', () => this.#refused()],
        ['older-daemon', () => this.#olderDaemon()],
      ];
      for (const [name, scenario] of scenarios) {
        if (this.#opts.only && !this.#opts.only.includes(name)) continue;
        this.#opts.log?.(`scenario ${name}`);
        try {
          await scenario();
        } catch (e) {
          this.#v.check('S10', false, `scenario ${name} stopped: ${(e as Error).message}`);
        }
      }
      return this.#v.report();
    } finally {
      this.#kvm?.closeSync();
      this.#devNull?.closeSync();
      await this.#listener?.close();
      rmSync(this.#dir, { recursive: true, force: true });
    }
  }

  // --- plumbing --------------------------------------------------------------

  #spawn(): Run {
    const path = join(this.#dir, 'handoff.sock');
    const argv = this.#opts.argv.map((a) => a.replaceAll('{handoff}', path));
    return new Run(argv, { ...process.env, ...this.#opts.env, KVMVFIO_HANDOFF: path });
  }

  async #accept(run: Run, ms = this.#wait): Promise<SeqpacketSocket | undefined> {
    const end = Date.now() + ms;
    for (;;) {
      const s = this.#listener!.accept();
      if (s) return (run.sock = s);
      if (Date.now() > end || (await run.exitsWithin(0))) return undefined;
      await sleep(5);
    }
  }

  /**
   * The next record from the VMM, checked against what any record it sends
   * must be (S1, S2, S3, S5); `ms` 0 looks once.
   */
  async #next(sock: SeqpacketSocket, ms = this.#wait): Promise<Got> {
    const end = Date.now() + ms;
    for (;;) {
      let r;
      try {
        r = sock.recv();
      } catch {
        return { kind: 'eof' }; // ECONNRESET: closed with records of ours unread
      }
      if (r) {
        if (r.data.length === 0 && r.fds.length === 0) return { kind: 'eof' };
        for (const f of r.fds) f.closeSync();
        this.#v.check('S2', r.fds.length === 0, r.fds.length ? `a record came with ${r.fds.length} fds` : 'no fds on its records');
        if (r.data.length > 4096 || r.truncated) {
          this.#v.check('S1', false, `a record of more than 4096 bytes (${r.data.length} read)`);
          return { kind: 'bad', reason: 'oversize record' };
        }
        this.#v.check('S1', true, 'records within 4096 bytes');
        let msg: Message;
        try {
          msg = decode(r.data, r.fds.length);
        } catch (e) {
          this.#v.check('S3', false, `a record that does not decode: ${(e as Error).message}`);
          return { kind: 'bad', reason: (e as Error).message };
        }
        this.#v.check('S3', true, 'its records decode');
        const wrong = fieldViolation(msg);
        this.#v.check('S5', !wrong, wrong ?? `${typeName(msg.type)}: fields as the table says`);
        return { kind: 'record', msg, fds: [] };
      }
      if (Date.now() >= end) return { kind: 'timeout' };
      await sleep(3);
    }
  }

  /** What `got` is, for a message. */
  #describe(got: Got): string {
    switch (got.kind) {
      case 'record':
        return `${typeName(got.msg.type)} (seq ${got.msg.seq}, status ${got.msg.status})`;
      case 'eof':
        return 'the end of the session';
      case 'timeout':
        return `nothing within ${this.#wait} ms`;
      case 'bad':
        return `a garbled record (${got.reason})`;
    }
  }

  #send(sock: SeqpacketSocket, m: Omit<Message, 'status' | 'manifest' | 'text'> & Partial<Message>, fds: number[] = []): void {
    sock.send(encode({ status: 0, manifest: [], text: '', ...m }), fds);
  }

  /** Bytes of a record that encode() refuses to make, with one header field set raw. */
  #raw(m: Message, patch: (b: Buffer) => void): Buffer {
    const b = encode(m);
    patch(b);
    return b;
  }

  /**
   * Runs the VMM up to an accepted ATTACH: reads its ATTACH (S10, S12),
   * sends the result with the fds in the order given (S14), and, when
   * `created`, reads its VM_CREATED (S16). Undefined when the VMM did not get
   * that far (the failure is recorded).
   */
  async #attach(run: Run, opts: { plan?: Message[]; containerFirst?: boolean; created?: boolean } = {}): Promise<{ sock: SeqpacketSocket; attach: Message } | undefined> {
    const sock = await this.#accept(run);
    if (!this.#v.check('S10', !!sock, sock ? 'it connected' : `it did not connect within ${this.#wait} ms (${run.exitStatus}): ${run.output}`) || !sock) return undefined;
    sock.passCredentials();
    const first = await this.#nextWithSender(sock);
    if (!first) return undefined;
    const { got, senderPid } = first;
    if (!this.#v.check('S10', got.kind === 'record' && got.msg.type === MsgType.ATTACH, `its first record is ${this.#describe(got)}`) || got.kind !== 'record') return undefined;
    const attach = got.msg;
    this.#v.check('S10', attach.text === run.token, attach.text === run.token ? 'ATTACH carries the token' : 'ATTACH does not carry the token of KVMVFIO_TOKEN');
    this.#v.check('S10', senderPid === run.proc.pid, `ATTACH sent by pid ${senderPid}, the VMM is pid ${run.proc.pid}`);
    const unknown = BigInt(attach.arg) & ~BigInt(AttachFlag.EDITION2 | AttachFlag.PASSIVE);
    this.#v.check('S12', unknown === 0n && (attach.arg & AttachFlag.PASSIVE) === 0, `ATTACH arg 0x${attach.arg.toString(16)}`);
    this.#edition2 ??= (attach.arg & AttachFlag.EDITION2) !== 0;
    const fds = [
      { kind: FdKind.KVM, id: 0, fd: this.#kvm!.fd },
      { kind: FdKind.VFIO_CONTAINER, id: 0, fd: this.#devNull!.fd },
    ];
    if (opts.containerFirst) fds.reverse();
    this.#send(sock, { type: MsgType.ATTACH | RESULT_BIT, seq: attach.seq, arg: 0, manifest: fds.map(({ kind, id }) => ({ kind, id })), text: `${randomUUID()} conformance` }, fds.map((f) => f.fd));
    for (const m of opts.plan ?? []) this.#send(sock, m);
    if (opts.created === false) return { sock, attach };
    const created = await this.#next(sock, 3 * this.#wait);
    const ok = created.kind === 'record' && created.msg.type === MsgType.VM_CREATED;
    const what = opts.plan?.length ? `after the ATTACH result and ${opts.plan.length} requests it sent ${this.#describe(created)}` : `after the ATTACH result it sent ${this.#describe(created)}`;
    if (!this.#v.check('S16', ok, ok ? 'VM_CREATED before any answer' : `${what} (${run.exitStatus}): ${run.output}`)) return undefined;
    if (opts.containerFirst) this.#v.check('S14', true, 'made its VM with KVM listed second in the manifest');
    return { sock, attach: (created as { msg: Message }).msg };
  }

  async #nextWithSender(sock: SeqpacketSocket): Promise<{ got: Got; senderPid?: number } | undefined> {
    // The sender's pid rides on the record (SCM_CREDENTIALS); read it before #next decodes.
    const end = Date.now() + this.#wait;
    for (;;) {
      let r;
      try {
        r = sock.recv();
      } catch {
        return { got: { kind: 'eof' } };
      }
      if (r) {
        if (r.data.length === 0 && r.fds.length === 0) return { got: { kind: 'eof' } };
        for (const f of r.fds) f.closeSync();
        this.#v.check('S2', r.fds.length === 0, r.fds.length ? `ATTACH came with ${r.fds.length} fds` : 'no fds on its records');
        try {
          const msg = decode(r.data, r.fds.length);
          const wrong = fieldViolation(msg);
          this.#v.check('S5', !wrong, wrong ?? 'ATTACH fields as the table says');
          return { got: { kind: 'record', msg, fds: [] }, senderPid: r.sender?.pid };
        } catch (e) {
          this.#v.check('S3', false, `ATTACH does not decode: ${(e as Error).message}`);
          return { got: { kind: 'bad', reason: (e as Error).message } };
        }
      }
      if (Date.now() >= end) return { got: { kind: 'timeout' } };
      await sleep(3);
    }
  }

  /** After the VMM is expected to end the session: no record, then end of stream. */
  async #expectSilentClose(sock: SeqpacketSocket, rule: string, what: string): Promise<void> {
    const got = await this.#next(sock);
    this.#v.check(rule, got.kind === 'eof', got.kind === 'eof' ? `${what}: no reply, session ended` : `${what}: got ${this.#describe(got)}, not the end of the session`);
  }

  /** Whether the VMM exits within `ms` (default: twice the wait, 10 s as the daemon's exit grace). */
  async #expectExit(run: Run, rule: string, what: string, ms = 2 * this.#wait): Promise<void> {
    const ok = await run.exitsWithin(ms);
    this.#v.check(rule, ok, ok ? `${what}: exited (${run.exitStatus})` : `${what}: still running after ${ms} ms`);
  }

  /** One end of a socketpair to hand over as a "group": the other end reads EOF once every copy of it is closed. */
  #witness(): { give: SeqpacketSocket; keep: SeqpacketSocket; closedWithin(ms: number): Promise<boolean> } {
    const [give, keep] = SeqpacketSocket.pair('conformance witness');
    return {
      give,
      keep,
      closedWithin: async (ms) => {
        const end = Date.now() + ms;
        for (;;) {
          const r = keep.recv();
          if (r && r.data.length === 0) return true;
          if (Date.now() > end) return false;
          await sleep(5);
        }
      },
    };
  }

  // --- scenarios -------------------------------------------------------------

  /** The fds by kind, a plan request answered after VM_CREATED, the VM_CREATED result after it, SHUTDOWN. */
  async #lifecycle(): Promise<void> {
    const run = this.#spawn();
    try {
      const plan: Message = { type: MsgType.CREATE_VFIO_DEVICE, seq: 1, status: 0, arg: 0, manifest: [], text: '' };
      const a = await this.#attach(run, { plan: [plan], containerFirst: true });
      if (!a) return;
      const { sock, attach: created } = a;
      const res = await this.#next(sock);
      const ok = res.kind === 'record' && res.msg.type === (MsgType.CREATE_VFIO_DEVICE | RESULT_BIT) && res.msg.seq === 1;
      this.#v.check('S6', ok, `the plan's CREATE_VFIO_DEVICE (seq 1) answered by ${this.#describe(res)}`);
      if (ok) this.#v.check('S20', res.msg.status === 0, `CREATE_VFIO_DEVICE on a fresh VM: status ${res.msg.status}`);
      // The VM_CREATED result after the request it answered first.
      this.#send(sock, { type: MsgType.VM_CREATED | RESULT_BIT, seq: created.seq, arg: 0, text: 'ok' });
      this.#send(sock, { type: MsgType.SHUTDOWN, seq: 2, arg: 0, text: 'conformance: lifecycle done' });
      const down = await this.#next(sock);
      const answered = down.kind === 'record' && down.msg.type === (MsgType.SHUTDOWN | RESULT_BIT) && down.msg.seq === 2;
      this.#v.check('S18', answered, `after the VM_CREATED result came after a request, SHUTDOWN got ${this.#describe(down)}`);
      this.#v.check('S26', answered && down.msg.status === 0, `SHUTDOWN answered by ${this.#describe(down)}`);
      await this.#expectExit(run, 'S26', 'after SHUTDOWN');
    } finally {
      await run.stop();
    }
  }

  /** Pipelined requests with seqs at the edges of uint32: order, echo, one result each, errnos, fds closed; then the daemon closes. */
  async #requests(): Promise<void> {
    const run = this.#spawn();
    const group = this.#witness();
    try {
      const a = await this.#attach(run);
      if (!a) return;
      const { sock, attach: created } = a;
      // The VM_CREATED result first, before any request.
      this.#send(sock, { type: MsgType.VM_CREATED | RESULT_BIT, seq: created.seq, arg: 0, text: 'ok' });
      const asked: { type: number; seq: number; arg?: number; fd?: number; rule: string; want: number; what: string }[] = [
        { type: MsgType.CREATE_VFIO_DEVICE, seq: 0xfffffffe, rule: 'S20', want: 0, what: 'CREATE_VFIO_DEVICE' },
        { type: MsgType.PING, seq: 0xffffffff, rule: 'S27', want: 0, what: 'PING' },
        { type: MsgType.ADD_GROUP, seq: 0, arg: 7, fd: group.give.fd, rule: 'S20', want: ERRNO.EINVAL, what: 'ADD_GROUP of a file that is no VFIO group (EINVAL from KVM)' },
        { type: MsgType.CREATE_VFIO_DEVICE, seq: 77, rule: 'S20', want: ERRNO.EBUSY, what: 'a second CREATE_VFIO_DEVICE (EBUSY from KVM)' },
        { type: MsgType.REMOVE_GROUP, seq: 3, arg: 9, rule: 'S20', want: ERRNO.ENOENT, what: 'REMOVE_GROUP of a group it holds no fd of' },
        { type: MsgType.ATTACH, seq: 2, rule: 'S20', want: ERRNO.EOPNOTSUPP, what: 'an ATTACH from the daemon' },
        { type: MsgType.VM_CREATED, seq: 1, rule: 'S20', want: ERRNO.EOPNOTSUPP, what: 'a VM_CREATED from the daemon' },
      ];
      for (const q of asked) {
        const manifest = q.fd !== undefined ? [{ kind: FdKind.VFIO_GROUP, id: q.arg! }] : [];
        this.#send(sock, { type: q.type, seq: q.seq, arg: q.arg ?? 0, manifest }, q.fd !== undefined ? [q.fd] : []);
      }
      group.give.closeSync();
      let inOrder = true;
      for (const q of asked) {
        const got = await this.#next(sock);
        if (got.kind !== 'record') {
          this.#v.check('S8', false, `${q.what} (seq ${q.seq}): got ${this.#describe(got)} (${run.exitStatus}): ${run.output}`);
          return;
        }
        const echoes = got.msg.type === (q.type | RESULT_BIT) && got.msg.seq === q.seq;
        if (!echoes) inOrder = false;
        this.#v.check('S6', echoes, `${q.what} (seq ${q.seq}): answered by ${this.#describe(got)}`);
        if (echoes) this.#v.check(q.rule, got.msg.status === q.want, `${q.what}: status ${got.msg.status}, want ${q.want}`);
      }
      this.#v.check('S20', inOrder, inOrder ? 'seven pipelined requests answered in order' : 'results out of order');
      const extra = await this.#next(sock, 300);
      this.#v.check('S8', extra.kind === 'timeout', extra.kind === 'timeout' ? 'one result each, nothing more' : `then ${this.#describe(extra)}`);
      const closed = await group.closedWithin(this.#wait);
      this.#v.check('S22', closed, closed ? 'the fd of the refused ADD_GROUP was closed' : `the fd of the refused ADD_GROUP was still open after ${this.#wait} ms`);
      // The daemon ends the session: the VMM should stop.
      sock.closeSync();
      run.sock = undefined;
      await this.#expectExit(run, 'S28', 'after the daemon closed the session');
    } finally {
      group.keep.closeSync();
      if (group.give.isOpen) group.give.closeSync();
      await run.stop();
    }
  }

  /** Starts a VMM through VM_CREATED and its result, then hands `sock` to `then`. */
  async #ready(then: (sock: SeqpacketSocket, run: Run) => Promise<void>): Promise<void> {
    const run = this.#spawn();
    try {
      const a = await this.#attach(run);
      if (!a) return;
      this.#send(a.sock, { type: MsgType.VM_CREATED | RESULT_BIT, seq: a.attach.seq, arg: 0, text: 'ok' });
      await then(a.sock, run);
    } finally {
      await run.stop();
    }
  }

  /** A garbled request (reserved ≠ 0) with an fd: no answer, the fd closed, the session ended, then the VMM exits. */
  async #garbled(): Promise<void> {
    await this.#ready(async (sock, run) => {
      const w = this.#witness();
      try {
        const bytes = this.#raw({ type: MsgType.ADD_GROUP, seq: 5, status: 0, arg: 7, manifest: [{ kind: FdKind.VFIO_GROUP, id: 7 }], text: '' }, (b) => b.writeUInt32LE(1, 28));
        sock.send(bytes, [w.give.fd]);
        w.give.closeSync();
        await this.#expectSilentClose(sock, 'S4', 'an ADD_GROUP with reserved = 1');
        const closed = await w.closedWithin(this.#wait);
        this.#v.check('S4', closed, closed ? 'the fd of the garbled record was closed' : `the fd of the garbled record was still open after ${this.#wait} ms`);
        await this.#expectExit(run, 'S28', 'after it ended the session on a garbled record');
      } finally {
        w.keep.closeSync();
        if (w.give.isOpen) w.give.closeSync();
      }
    });
  }

  /** ADD_GROUP without its fd: garbled (S21). */
  async #manifest(): Promise<void> {
    await this.#ready(async (sock) => {
      this.#send(sock, { type: MsgType.ADD_GROUP, seq: 5, arg: 7 });
      await this.#expectSilentClose(sock, 'S21', 'an ADD_GROUP without its VFIO_GROUP fd');
    });
  }

  /** A result for a request the VMM never sent (S7). */
  async #strayResult(): Promise<void> {
    await this.#ready(async (sock) => {
      this.#send(sock, { type: MsgType.PING | RESULT_BIT, seq: 4242, arg: 0, text: 'pong' });
      await this.#expectSilentClose(sock, 'S7', 'a PING result for a PING it never sent');
    });
  }

  /** ② A request with a nonzero status, or a NUL in its text: garbled in edition 2 (S5). */
  async #edition2Field(which: 'status' | 'nul'): Promise<void> {
    if (this.#edition2 === false) {
      this.#v.skip('S5', 'an edition-1 VMM: the ② receiving rules do not apply');
      return;
    }
    await this.#ready(async (sock) => {
      if (which === 'status') {
        const bytes = this.#raw({ type: MsgType.PING, seq: 6, status: 0, arg: 0, manifest: [], text: '' }, (b) => b.writeInt32LE(5, 12));
        sock.send(bytes);
        await this.#expectSilentClose(sock, 'S5', '② a PING with status 5');
      } else {
        sock.send(encode({ type: MsgType.SHUTDOWN, seq: 6, status: 0, arg: 0, manifest: [], text: 'stop\0now' }));
        await this.#expectSilentClose(sock, 'S5', '② a SHUTDOWN whose text holds a NUL');
      }
    });
  }

  /** A refusal without TOKEN_KEPT: the VMM should not come back with the token, and should exit. */
  async #refused(): Promise<void> {
    const run = this.#spawn();
    try {
      const sock = await this.#accept(run);
      if (!this.#v.check('S10', !!sock, sock ? 'it connected' : `it did not connect (${run.exitStatus})`) || !sock) return;
      const got = await this.#next(sock);
      if (got.kind !== 'record' || got.msg.type !== MsgType.ATTACH) return;
      this.#send(sock, { type: MsgType.ATTACH | RESULT_BIT, seq: got.msg.seq, status: ERRNO.EACCES, arg: 0, text: 'attach token was already used' });
      sock.closeSync();
      run.sock = undefined;
      const again = await this.#accept(run, 1000);
      if (again) {
        const rec = await this.#next(again, 1000);
        again.closeSync();
        const same = rec.kind === 'record' && rec.msg.type === MsgType.ATTACH && rec.msg.text === run.token;
        this.#v.check('S13', !same, same ? 'presented the refused token again' : 'connected again, without the refused token');
      } else this.#v.check('S13', true, 'did not present the refused token again');
      await this.#expectExit(run, 'S13', 'after its ATTACH was refused', this.#wait);
    } finally {
      await run.stop();
    }
  }

  /** A daemon older than edition 2 ends the session on EDITION2 without a result: the VMM should attach again without it. */
  async #olderDaemon(): Promise<void> {
    if (this.#edition2 === false) {
      this.#v.skip('S12', 'an edition-1 VMM sets no EDITION2');
      return;
    }
    const run = this.#spawn();
    try {
      const first = await this.#accept(run);
      if (!first) return;
      const got = await this.#next(first);
      first.closeSync();
      run.sock = undefined;
      if (got.kind !== 'record' || got.msg.type !== MsgType.ATTACH || !(got.msg.arg & AttachFlag.EDITION2)) return;
      const second = await this.#accept(run);
      const again = second ? await this.#next(second) : ({ kind: 'timeout' } as Got);
      const ok = again.kind === 'record' && again.msg.type === MsgType.ATTACH && !(again.msg.arg & AttachFlag.EDITION2) && again.msg.text === run.token;
      this.#v.check('S12', ok, ok ? 'attached again without EDITION2 when the session closed without a result' : `after a close without a result: ${this.#describe(again)}`);
      second?.closeSync();
    } finally {
      await run.stop();
    }
  }
}

/** Runs every scenario against the VMM of `opts.argv`. */
export function runConformance(opts: ConformanceOptions): Promise<RuleReport[]> {
  return new ConformanceRunner(opts).run();
}

/** The report as text, one rule a line: "PASS S6 MUST ...", the details of failures under it. */
export function formatReport(reports: readonly RuleReport[]): string {
  const lines = reports.map((r) => {
    const head = `${r.outcome.toUpperCase().padEnd(4)} ${r.id.padEnd(3)} ${r.level.padEnd(6)} ${r.title}`;
    return r.outcome === 'pass' ? head : `${head}\n${r.details.map((d) => `       ${d}`).join('\n')}`;
  });
  const count = (o: Outcome) => reports.filter((r) => r.outcome === o).length;
  return `${lines.join('\n')}\n${count('pass')} passed, ${count('fail')} failed, ${count('skip')} not checked\n`;
}
