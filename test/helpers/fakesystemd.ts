/**
 * Stands in for systemd's side of sd_notify(3): a bound SOCK_DGRAM socket at
 * NOTIFY_SOCKET that records each message and keeps the fds sent with
 * FDSTORE=1 under their FDNAME, dropping them on FDSTOREREMOVE=1 — enough to
 * test readiness, the watchdog and a restart from the fd store without
 * systemd (the nspawn lane does it with the real one).
 */
import { join } from 'node:path';
import { type FdWatch, type OwnedFd, type SeqpacketSocket, bindDatagramSocket, watchReadable } from '../../src/kernel';

export interface Notification {
  at: number;
  fields: Record<string, string>;
  fds: number;
}

export class FakeSystemd {
  readonly path: string;
  readonly messages: Notification[] = [];
  /** The fd store: name → fds (in the order stored). */
  readonly store = new Map<string, OwnedFd[]>();
  readonly #sock: SeqpacketSocket;
  readonly #watch: FdWatch;

  constructor(dir: string) {
    this.path = join(dir, 'notify.sock');
    this.#sock = bindDatagramSocket(this.path);
    this.#watch = watchReadable(this.#sock.fd, () => this.#read());
  }

  #read(): void {
    for (;;) {
      const r = this.#sock.recv();
      if (!r) return;
      const fields: Record<string, string> = {};
      for (const line of r.data.toString('utf8').split('\n')) {
        const i = line.indexOf('=');
        if (i > 0) fields[line.slice(0, i)] = line.slice(i + 1);
      }
      this.messages.push({ at: Date.now(), fields, fds: r.fds.length });
      if (fields.FDSTORE === '1') {
        const name = fields.FDNAME ?? 'stored';
        this.store.set(name, [...(this.store.get(name) ?? []), ...r.fds]);
      } else {
        for (const f of r.fds) f.closeSync();
      }
      if (fields.FDSTOREREMOVE === '1' && fields.FDNAME) {
        for (const f of this.store.get(fields.FDNAME) ?? []) f.closeSync();
        this.store.delete(fields.FDNAME);
      }
    }
  }

  /** The stored fds as LISTEN_FDS entries for the next start. */
  listenFds(): { name: string; fd: number }[] {
    return [...this.store].flatMap(([name, fds]) => fds.map((f) => ({ name, fd: f.fd })));
  }

  count(key: string, value?: string): number {
    return this.messages.filter((m) => key in m.fields && (value === undefined || m.fields[key] === value)).length;
  }

  close(): void {
    this.#watch.close();
    this.#sock.closeSync();
    for (const fds of this.store.values()) for (const f of fds) f.closeSync();
    this.store.clear();
  }
}
