/**
 * The daemon's use of systemd's fd store: what must outlive this process
 * (the /dev/kvm fd, each claimed group fd, each live session socket and its
 * VMM's pidfd) is stored under a name, and removed when it ends. At shutdown
 * the store is frozen: what this process closes on its way out stays stored
 * for the next start. Without systemd every call is a no-op.
 */
import type { Logger } from 'pino';
import { Systemd } from '../kernel';

export const fdName = {
  kvm: 'kvm',
  group: (n: number) => `group-${n}`,
  session: (vmId: string) => `session-${vmId}`,
  pidfd: (vmId: string) => `pidfd-${vmId}`,
  /** A passive VMM's QEMU monitor: the daemon's end of the channel. */
  qmp: (vmId: string) => `qmp-${vmId}`,
};

export class FdStore {
  readonly enabled = Systemd.managed;
  readonly #log: Logger;
  #frozen = false;

  constructor(log: Logger) {
    this.#log = log;
  }

  put(name: string, fd: number): void {
    if (!this.enabled || this.#frozen) return;
    try {
      Systemd.storeFds(name, [fd]);
    } catch (e) {
      this.#log.warn({ event: 'fdstore-failed', name, err: (e as Error).message }, 'could not store an fd; it will not survive a restart');
    }
  }

  remove(name: string): void {
    if (!this.enabled || this.#frozen) return;
    try {
      Systemd.removeFds(name);
    } catch (e) {
      this.#log.warn({ event: 'fdstore-remove-failed', name, err: (e as Error).message }, 'could not remove a stored fd');
    }
  }

  /** From here on, nothing is stored or removed (shutdown). */
  freeze(): void {
    this.#frozen = true;
  }
}
