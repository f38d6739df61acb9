/**
 * One session exchange, measured on its own: this process attaches to a VM
 * as its VMM (never making a VM, so the daemon sends it nothing) and sends
 * PING, which the daemon answers in the session's read callback. A round
 * trip is two process wake-ups and the daemon's record handling, the same
 * kernel and loop path an AddGroup's request and answer take, without the
 * gRPC call around it or the ioctl in the VMM.
 */
import { type FdWatch, watchReadable } from '../src/kernel';
import { MsgType, RESULT_BIT, decode, encode } from '../src/protocol/session';
import { VmmSession } from '../src/vmm/session';

export class SessionPinger {
  readonly #session: VmmSession;
  readonly #watch: FdWatch;
  #seq = 100;
  #waiting: { seq: number; resolve(): void; reject(e: Error): void } | undefined;

  private constructor(session: VmmSession) {
    this.#session = session;
    // The ATTACH result's fds are not needed.
    session.attach.kvm.close();
    session.attach.container?.closeSync();
    this.#watch = watchReadable(session.sock.fd, () => this.#onReadable());
  }

  static async attach(handoffSocket: string, token: string): Promise<SessionPinger> {
    return new SessionPinger(await VmmSession.connect(handoffSocket, token));
  }

  ping(): Promise<void> {
    const seq = ++this.#seq;
    return new Promise((resolve, reject) => {
      this.#waiting = { seq, resolve, reject };
      this.#session.sock.send(encode({ type: MsgType.PING, seq, status: 0, arg: 0, manifest: [], text: '' }));
    });
  }

  #onReadable(): void {
    for (;;) {
      const r = this.#session.sock.recv();
      if (!r) return;
      for (const f of r.fds) f.closeSync();
      const w = this.#waiting;
      this.#waiting = undefined;
      if (!w) continue;
      if (r.data.length === 0) return w.reject(new Error('the daemon closed the pinger session'));
      const m = decode(r.data, r.fds.length);
      if (m.type === (MsgType.PING | RESULT_BIT) && m.seq === w.seq && m.status === 0) w.resolve();
      else w.reject(new Error(`unexpected record type 0x${m.type.toString(16)} seq ${m.seq} status ${m.status}`));
    }
  }

  close(): void {
    this.#watch.close();
    this.#session.close('benchmark done');
  }
}
