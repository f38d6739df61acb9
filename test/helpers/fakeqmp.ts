/**
 * A stand-in for QEMU's monitor, for tests without QEMU: it speaks QMP on one
 * end of a stream socket — greeting, qmp_capabilities, answers with the
 * command's id, events — and models what the daemon's hot-plug uses, the way
 * QEMU 10 was measured to behave (labs/qmp-hotplug): `getfd` takes the fd
 * that came with the command's bytes, `closefd` drops one, `object-add`
 * iommufd and `device_add` vfio-pci consume their fd, `device_add` refuses a
 * bus that is not a free root port, `query-pci` lists the root ports and what
 * sits on them, `device_del` starts an unplug that ends with DEVICE_DELETED
 * (after `deleteAfterMs`, or never, as a guest that ignores ACPI).
 *
 * fds are read with recvmsg(2) and SCM_RIGHTS (a SeqpacketSocket's recv works
 * on a stream socket too; it takes what one call returns): each fd is kept
 * with the path it points at, so a test sees what the daemon handed over.
 * Every command is reported to `onCommand`, and every fd QEMU would hold is
 * in `held`.
 */
import { readlinkSync } from 'node:fs';
import { type FdWatch, type OwnedFd, SeqpacketSocket, watchReadable } from '../../src/kernel';

export interface FakeQmpOptions {
  /** Greet at once (default), after this many ms, or never (false). */
  greetAfterMs?: number | false;
  /** Root port ids (the bus names device_add takes). */
  ports?: string[];
  /** Objects at start, as qom-list /objects shows them: e.g. the iommufd of the command line. */
  objects?: { name: string; type: string }[];
  /** When device_del's DEVICE_DELETED comes: after these ms (default 50), or never (a guest that ignores the request). */
  deleteAfterMs?: number | 'never';
  /** Errors to answer a command with instead of running it: command → {class, desc}; `consumesFd`: device_add took (and closed) its fd. */
  errors?: Record<string, { class?: string; desc: string; consumesFd?: boolean }>;
  /** device_add of one device id answered with an error (QEMU's refusal of that device). */
  deviceErrors?: Record<string, { desc: string; consumesFd?: boolean }>;
  /** Answer nothing after the greeting (a hung QEMU). */
  mute?: boolean;
  /** query-pci lists nothing behind the root ports, as QEMU before the guest's firmware numbered their buses (-S). */
  unnumberedBuses?: boolean;
}

export interface FakeCommand {
  execute: string;
  arguments: Record<string, unknown>;
  /** What the fds that came with this command point at (readlink). */
  fds: string[];
}

interface Device {
  bus: string;
  fd: OwnedFd;
  path: string;
  deleting: boolean;
}

type Json = Record<string, unknown>;

export class FakeQmpPeer {
  readonly commands: FakeCommand[] = [];
  /** fds named by getfd and not used yet. */
  readonly held = new Map<string, { fd: OwnedFd; path: string }>();
  readonly devices = new Map<string, Device>();
  readonly objects: { name: string; type: string; fd?: OwnedFd; path?: string }[];
  onCommand?: (c: FakeCommand) => void;
  readonly #sock: SeqpacketSocket;
  readonly #opts: FakeQmpOptions;
  #watch?: FdWatch;
  #buf = '';
  #lastFds: OwnedFd[] = [];
  #closed = false;
  readonly #timers = new Set<NodeJS.Timeout>();

  constructor(fd: OwnedFd, opts: FakeQmpOptions = {}) {
    this.#sock = new SeqpacketSocket(fd, 'fake QMP');
    this.#opts = opts;
    this.objects = [...(opts.objects ?? [])];
    this.#watch = watchReadable(this.#sock.fd, () => this.#onReadable());
    const greet = opts.greetAfterMs ?? 0;
    if (greet !== false) this.#later(greet, () => this.send({ QMP: { version: { qemu: { major: 10, minor: 0, micro: 2 }, package: 'fake' }, capabilities: ['oob'] } }));
  }

  get isOpen(): boolean {
    return !this.#closed;
  }

  /** Writes one message (a line of JSON) to the daemon. */
  send(msg: unknown): void {
    if (this.#closed) return;
    this.sendRaw(`${JSON.stringify(msg)}\r\n`);
  }

  sendRaw(text: string): void {
    if (this.#closed) return;
    const b = Buffer.from(text);
    for (let off = 0; off < b.length; off += 4096) this.#sock.send(b.subarray(off, off + 4096));
  }

  emit(event: string, data: Json): void {
    this.send({ event, data, timestamp: { seconds: Math.floor(Date.now() / 1000), microseconds: 0 } });
  }

  /** Every fd this QEMU holds: named ones, the devices', the objects'. */
  heldPaths(): string[] {
    return [...[...this.held.values()].map((h) => h.path), ...[...this.devices.values()].map((d) => d.path), ...this.objects.flatMap((o) => (o.path ? [o.path] : []))];
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const t of this.#timers) clearTimeout(t);
    this.#watch?.close();
    this.#sock.closeSync();
    for (const h of this.held.values()) h.fd.closeSync();
    for (const d of this.devices.values()) d.fd.closeSync();
    for (const o of this.objects) o.fd?.closeSync();
    for (const f of this.#lastFds) f.closeSync();
  }

  #later(ms: number, fn: () => void): void {
    const t = setTimeout(() => {
      this.#timers.delete(t);
      fn();
    }, ms);
    this.#timers.add(t);
  }

  #onReadable(): void {
    while (!this.#closed) {
      let r;
      try {
        r = this.#sock.recv();
      } catch {
        this.close();
        return;
      }
      if (!r) return;
      if (r.data.length === 0 && r.fds.length === 0) {
        this.close();
        return;
      }
      // As QEMU: fds that came with a read belong to the command in it; unclaimed ones are dropped by the next.
      if (r.fds.length) {
        for (const f of this.#lastFds) f.closeSync();
        this.#lastFds = r.fds;
      }
      this.#buf += r.data.toString('utf8');
      let nl;
      while ((nl = this.#buf.indexOf('\n')) >= 0 && !this.#closed) {
        const line = this.#buf.slice(0, nl).trim();
        this.#buf = this.#buf.slice(nl + 1);
        if (line) this.#command(JSON.parse(line) as Json);
      }
    }
  }

  #command(msg: Json): void {
    const fds = this.#lastFds;
    this.#lastFds = [];
    const paths = fds.map((f) => readlinkSync(`/proc/self/fd/${f.fd}`));
    const c: FakeCommand = { execute: String(msg.execute), arguments: (msg.arguments as Json | undefined) ?? {}, fds: paths };
    this.commands.push(c);
    this.onCommand?.(c);
    if (this.#opts.mute && c.execute !== 'qmp_capabilities') {
      for (const f of fds) f.closeSync();
      return;
    }
    const reply = (body: Json) => this.send({ ...body, ...(msg.id !== undefined ? { id: msg.id } : {}) });
    const fail = (desc: string, cls = 'GenericError') => reply({ error: { class: cls, desc } });
    const injected = this.#opts.errors?.[c.execute];
    if (injected) {
      for (const f of fds) f.closeSync();
      if (c.execute === 'device_add' && injected.consumesFd) this.#take(String(c.arguments.fd))?.fd.closeSync();
      fail(injected.desc, injected.class);
      return;
    }
    const a = c.arguments;
    switch (c.execute) {
      case 'qmp_capabilities':
        return reply({ return: {} });
      case 'getfd': {
        const fd = fds.shift();
        for (const f of fds) f.closeSync();
        if (!fd) return fail('No file descriptor supplied via SCM_RIGHTS');
        this.held.get(String(a.fdname))?.fd.closeSync();
        this.held.set(String(a.fdname), { fd, path: paths[0] });
        return reply({ return: {} });
      }
      case 'closefd': {
        const h = this.#take(String(a.fdname));
        if (!h) return fail(`File descriptor named '${String(a.fdname)}' not found`);
        h.fd.closeSync();
        return reply({ return: {} });
      }
      case 'qom-list':
        return reply({ return: a.path === '/objects' ? this.objects.map((o) => ({ name: o.name, type: o.type })) : [] });
      case 'object-add': {
        const h = this.#take(String(a.fd));
        if (!h) return fail(`Could not parse remote object fd ${String(a.fd)}:File descriptor named '${String(a.fd)}' has not been found`);
        if (this.objects.some((o) => o.name === a.id)) {
          h.fd.closeSync();
          return fail(`attempt to add duplicate property '${String(a.id)}' to object (type 'container')`);
        }
        this.objects.push({ name: String(a.id), type: `child<${String(a['qom-type'])}>`, fd: h.fd, path: h.path });
        return reply({ return: {} });
      }
      case 'query-pci':
        return reply({ return: [{ bus: 0, devices: this.#pci() }] });
      case 'device_add': {
        const refusal = this.#opts.deviceErrors?.[String(a.id)];
        if (refusal) {
          if (refusal.consumesFd) this.#take(String(a.fd))?.fd.closeSync();
          return fail(refusal.desc);
        }
        const bus = String(a.bus);
        if (!(this.#opts.ports ?? []).includes(bus)) return fail(bus === 'pcie.0' ? `Bus 'pcie.0' does not support hotplugging` : `Bus '${bus}' not found`);
        // QEMU 10's words for a second device on a PCIe port (it picks slot 1, the port takes slot 0 only).
        if ([...this.devices.values()].some((d) => d.bus === bus)) return fail(`PCI: slot 1 is not valid for vfio-pci, parent device only allows plugging into slot 0.`);
        if (this.devices.has(String(a.id))) return fail(`Duplicate device ID '${String(a.id)}'`);
        if (!this.objects.some((o) => o.name === a.iommufd)) return fail(`Property 'vfio-pci.iommufd' can't find value '${String(a.iommufd)}'`);
        const h = this.#take(String(a.fd));
        if (!h) return fail(`Could not parse remote object fd ${String(a.fd)}:File descriptor named '${String(a.fd)}' has not been found`);
        this.devices.set(String(a.id), { bus, fd: h.fd, path: h.path, deleting: false });
        return reply({ return: {} });
      }
      case 'device_del': {
        const id = String(a.id);
        const d = this.devices.get(id);
        if (!d) return fail(`Device '${id}' not found`, 'DeviceNotFound');
        reply({ return: {} });
        if (d.deleting) return;
        d.deleting = true;
        const after = this.#opts.deleteAfterMs ?? 50;
        if (after !== 'never') this.#later(after, () => this.unplugNow(id));
        return;
      }
      default:
        return fail(`The command ${c.execute} has not been found`, 'CommandNotFound');
    }
  }

  /** Completes a device's unplug as QEMU does once the guest acknowledged (or at system_reset): fd closed, then the event. */
  unplugNow(id: string): void {
    const d = this.devices.get(id);
    if (!d) return;
    this.devices.delete(id);
    d.fd.closeSync();
    this.emit('DEVICE_DELETED', { device: id, path: `/machine/peripheral/${id}` });
  }

  #take(name: string): { fd: OwnedFd; path: string } | undefined {
    const h = this.held.get(name);
    this.held.delete(name);
    return h;
  }

  #pci(): Json[] {
    const ports = this.#opts.ports ?? [];
    return [
      { bus: 0, slot: 0, function: 0, class_info: { class: 0x0600, desc: 'Host bridge' }, id: { vendor: 0x8086, device: 0x29c0 }, qdev_id: '', regions: [] },
      ...ports.map((p, i) => ({
        bus: 0,
        slot: i + 1,
        function: 0,
        class_info: { class: 0x0604, desc: 'PCI bridge' },
        id: { vendor: 0x1b36, device: 0x000c },
        qdev_id: p,
        regions: [],
        pci_bridge: {
          bus: { number: i + 1, secondary: i + 1, subordinate: i + 1 },
          devices: [...this.devices.entries()]
            .filter(([, d]) => d.bus === p && !this.#opts.unnumberedBuses)
            .map(([id]) => ({ bus: i + 1, slot: 0, function: 0, class_info: { class: 0x00ff }, id: { vendor: 0x1234, device: 0x11e8 }, qdev_id: id, regions: [] })),
        },
      })),
    ];
  }
}
