/**
 * VFIO hot-plug into an unmodified QEMU (≥ 8.2) through its monitor: what
 * `AddGroup` and `RemoveGroup` of a passive VMM's VM become, per device.
 * The sequences were measured with Debian's QEMU 10 running as uid 65534
 * with empty /dev and /sys (labs/qmp-hotplug in the shared notes):
 *
 *   add     (once per VM) getfd + a fresh /dev/iommu, object-add iommufd
 *           `kvmvfiod-iommufd` with it — unless the command line made it;
 *           query-pci for a PCIe port with nothing behind it;
 *           getfd + a fresh O_RDWR open of the device's cdev (the daemon's
 *           copy is closed as soon as it is sent);
 *           device_add vfio-pci,iommufd=kvmvfiod-iommufd,fd=…,bus=<port>,id=…
 *           — QEMU binds the cdev, maps guest RAM, and makes (the first
 *           time) and feeds its own KVM-VFIO device.
 *   remove  device_del, then the DEVICE_DELETED event: by then QEMU has
 *           taken the cdev out of its KVM-VFIO device and closed it. The
 *           guest must acknowledge (ACPI or native PCIe hot-plug); one that
 *           does not keeps the device until a reset or QEMU's exit, so the
 *           wait has a deadline.
 *
 * Whether the device is free afterwards is not QEMU's word: the broker's
 * witness (a fresh open of the group, EBUSY while any bound copy of a cdev is
 * open) decides, on DEVICE_DELETED or on QEMU's exit.
 *
 * QEMU's iommufd object is never deleted: QEMU does not close an fd-given
 * iommufd at object-del (measured: one leaked /dev/iommu per cycle), so one
 * object serves every device of the VM.
 */
import { FailedPreconditionError, ResourceExhaustedError, UnavailableError, DeadlineExceededError } from '../../broker/errors';
import type { OwnedFd, SendableFd } from '../../kernel';
import { QEMU_IOMMUFD_ID, QEMU_PORT_PREFIX, addressOfQemuDeviceId, qemuDeviceId } from '../../protocol/qemu';
import { QmpError, type QmpClient } from './client';

export interface QemuHotplugOptions {
  /** A fresh /dev/iommu (read-write) for this QEMU, the first time it needs the iommufd object. */
  openIommufd(): Promise<OwnedFd>;
  /** How long a removal waits for the guest's acknowledgement (DEVICE_DELETED). */
  unplugTimeoutMs: number;
  /** The VM in messages. */
  vmName: string;
  /**
   * QEMU let go of a device of ours (DEVICE_DELETED) that no removal was
   * waiting for: a guest's late acknowledgement, a reset completing a
   * pending unplug, the guest ejecting it. The cue to look at its group.
   */
  onDeviceGone?(address: string): void;
  log?: (event: Record<string, unknown>, msg: string) => void;
}

/** The ports QEMU could hot-plug a PCI device into, from its own view (query-pci). */
export interface HotplugPorts {
  /** Bridges with a device id (their secondary bus is named after it), in the order a hot-plug tries them. */
  all: string[];
  /** Of those, the ones with nothing behind them. */
  free: string[];
}

const PCI_BRIDGE_CLASS = 0x0604;
/** query-pci is QEMU's answer, not ours: its walk is bounded. */
const MAX_DEPTH = 16;
const MAX_DEVICES = 4096;

const isObject = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);

/**
 * The hot-plug ports in a query-pci answer: PCI-to-PCI bridges (a
 * pcie-root-port is one) that have a device id, kvmvfiod's own
 * (`kvmvfiod-port-N`, by N) before the VM's others (in QEMU's order). Free
 * means no device listed on the bridge's bus, one whose unplug is pending
 * included — a hint only: before the guest's firmware numbered a bridge's
 * bus, QEMU lists nothing behind it (device_add then refuses an occupied
 * port, and the next is tried). Anything of another shape is skipped,
 * never trusted.
 */
export function hotplugPorts(pci: unknown): HotplugPorts {
  const ours: { n: number; id: string; free: boolean }[] = [];
  const others: { id: string; free: boolean }[] = [];
  let seen = 0;
  const walk = (devices: unknown, depth: number): void => {
    if (!Array.isArray(devices) || depth > MAX_DEPTH) return;
    for (const d of devices) {
      if (++seen > MAX_DEVICES) return;
      if (!isObject(d) || !isObject(d.pci_bridge)) continue;
      const bridged = d.pci_bridge.devices;
      const cls = isObject(d.class_info) ? d.class_info.class : undefined;
      if (typeof d.qdev_id === 'string' && d.qdev_id !== '' && (cls === undefined || cls === PCI_BRIDGE_CLASS)) {
        const free = !Array.isArray(bridged) || bridged.length === 0;
        const m = d.qdev_id.startsWith(QEMU_PORT_PREFIX) ? /^\d+$/.exec(d.qdev_id.slice(QEMU_PORT_PREFIX.length)) : null;
        if (m) ours.push({ n: Number(m[0]), id: d.qdev_id, free });
        else others.push({ id: d.qdev_id, free });
      }
      walk(bridged, depth + 1);
    }
  };
  if (Array.isArray(pci)) for (const bus of pci) if (isObject(bus)) walk(bus.devices, 0);
  const ordered = [...ours.sort((a, b) => a.n - b.n), ...others];
  return { all: ordered.map((p) => p.id), free: ordered.filter((p) => p.free).map((p) => p.id) };
}

/**
 * device_add errors that say the port cannot take the device, raised before
 * the device's own realize (the fd is not used): the next port is tried. A
 * port query-pci showed empty may hold a device all the same: QEMU lists
 * what sits behind a bridge only once the guest's firmware numbered its bus
 * (not with -S, not early in the boot).
 */
const PORT_REFUSED = [
  /^Bus '.*' does not support hotplugging$/,
  /^Bus '.*' not found$/,
  /^Bus '.*' is full$/,
  /can't go on .* bus$/,
  /^PCI: slot \d+ function \d+ not available for /,
  /^PCI: slot \d+ is not valid for .*only allows plugging into slot 0/,
  /^PCI: no slot\/function available for /,
];

export class QemuHotplug {
  readonly #qmp: QmpClient;
  readonly #opts: QemuHotplugOptions;
  #iommufdReady = false;
  #fdSeq = 0;
  /** Device ids a removeDevice is waiting for. */
  readonly #awaited = new Set<string>();

  constructor(qmp: QmpClient, opts: QemuHotplugOptions) {
    this.#qmp = qmp;
    this.#opts = opts;
    qmp.onEvent((e) => {
      if (e.event !== 'DEVICE_DELETED' || typeof e.data.device !== 'string' || this.#awaited.has(e.data.device)) return;
      const address = addressOfQemuDeviceId(e.data.device);
      if (address) opts.onDeviceGone?.(address);
    });
  }

  get qmp(): QmpClient {
    return this.#qmp;
  }

  /**
   * Hot-plugs the device at `address`, its cdev `fd` handed over (closed
   * here once sent, or on any failure before). Resolves once QEMU realized
   * it. A QmpError carries QEMU's refusal (the status mapping names it); no
   * port at all is FAILED_PRECONDITION, every port taken RESOURCE_EXHAUSTED.
   * After a refusal, the fd is dropped from QEMU's monitor too (closefd).
   */
  async addDevice(address: string, fd: SendableFd): Promise<void> {
    let mine: SendableFd | undefined = fd;
    try {
      await this.#ensureIommufd();
      const ports = hotplugPorts(await this.#qmp.execute('query-pci'));
      if (!ports.all.length) {
        throw new FailedPreconditionError(
          `${this.#qmp.who} has no PCIe port to hot-plug device ${address} into: start QEMU (machine q35) with pcie-root-port devices that have an id (kvmvfioctl vm args --vmm qemu adds them)`,
        );
      }
      if (!ports.free.length) {
        throw new ResourceExhaustedError(
          `${this.#qmp.who}: every hot-plug port is taken (${ports.all.join(', ')}); device ${address} needs a free one: start QEMU with more pcie-root-port devices (kvmvfioctl vm args --hotplug-ports N)`,
        );
      }
      const name = `kvmvfiod-fd-${++this.#fdSeq}`;
      mine = undefined;
      try {
        await this.#qmp.execute('getfd', { fdname: name }, fd);
      } catch (e) {
        this.#dropFd(name);
        throw e;
      }
      const id = qemuDeviceId(address);
      let refused: QmpError | undefined;
      for (const bus of ports.free) {
        try {
          await this.#qmp.execute('device_add', { driver: 'vfio-pci', iommufd: QEMU_IOMMUFD_ID, fd: name, bus, id });
          this.#opts.log?.({ event: 'qemu-device-added', vm_name: this.#opts.vmName, device: address, qemu_id: id, bus }, 'device hot-plugged into QEMU');
          return;
        } catch (e) {
          if (e instanceof QmpError && e.command === 'device_add' && PORT_REFUSED.some((re) => re.test(e.desc))) {
            refused = e;
            continue;
          }
          // Consumed (a bind error closes it) or not (a bus error): either way QEMU keeps no copy.
          this.#dropFd(name);
          throw e;
        }
      }
      this.#dropFd(name);
      throw new ResourceExhaustedError(`${this.#qmp.who}: no port took device ${address} (${ports.free.join(', ')}; the last said: ${refused?.desc ?? '?'})`);
    } finally {
      mine?.closeSync();
    }
  }

  /**
   * Hot-unplugs the device at `address` and resolves on QEMU's
   * DEVICE_DELETED for it — or at once when QEMU has no such device (gone
   * already: a late acknowledgement, or never plugged). DeadlineExceededError
   * when the guest does not acknowledge in time (the device stays with the
   * VM); FailedPreconditionError when it reports that it cannot let go.
   */
  async removeDevice(address: string): Promise<void> {
    const id = qemuDeviceId(address);
    const ms = this.#opts.unplugTimeoutMs;
    let stop = (): void => undefined;
    // Listening before device_del: with native hot-plug and no guest, the event may come in its wake.
    const gone = new Promise<'deleted'>((resolve, reject) => {
      const timer = setTimeout(
        () =>
          reject(
            new DeadlineExceededError(
              `the guest of vm ${this.#opts.vmName} did not let go of device ${address} within ${ms} ms (${this.#qmp.who}: device_del ${id} sent, no DEVICE_DELETED): hot-unplug waits for the guest's acknowledgement; the device stays with the VM until QEMU releases it (the guest acknowledges, system_reset, or QEMU exits)`,
            ),
          ),
        ms,
      );
      const off = this.#qmp.onEvent((e) => {
        if (e.data.device !== id) return;
        if (e.event === 'DEVICE_DELETED') resolve('deleted');
        else if (e.event === 'DEVICE_UNPLUG_GUEST_ERROR') reject(new FailedPreconditionError(`the guest of vm ${this.#opts.vmName} refused to let go of device ${address} (${this.#qmp.who}: DEVICE_UNPLUG_GUEST_ERROR)`));
      });
      const offClosed = this.#qmp.onClosed((reason) => reject(new UnavailableError(`${this.#qmp.who}: the QMP channel closed while device ${address} was being removed (${reason})`)));
      stop = () => {
        clearTimeout(timer);
        off();
        offClosed();
      };
    });
    gone.catch(() => undefined);
    this.#awaited.add(id);
    try {
      try {
        await this.#qmp.execute('device_del', { id });
      } catch (e) {
        if (e instanceof QmpError && e.errorClass === 'DeviceNotFound') return;
        // A second removal while the guest has not answered the first: keep waiting for it.
        if (!(e instanceof QmpError && /already in the process of unplug/.test(e.desc))) throw e;
      }
      await gone;
      this.#opts.log?.({ event: 'qemu-device-deleted', vm_name: this.#opts.vmName, device: address, qemu_id: id }, 'QEMU let go of a hot-unplugged device');
    } finally {
      this.#awaited.delete(id);
      stop();
    }
  }

  close(reason: string): void {
    this.#qmp.close(reason);
  }

  /** QEMU's iommufd object: the one the command line made, or one made now from a fresh /dev/iommu. */
  async #ensureIommufd(): Promise<void> {
    if (this.#iommufdReady) return;
    const objects = await this.#qmp.execute('qom-list', { path: '/objects' });
    const found = Array.isArray(objects) ? objects.find((o) => isObject(o) && o.name === QEMU_IOMMUFD_ID) : undefined;
    if (found) {
      if (!(isObject(found) && found.type === 'child<iommufd>')) {
        throw new FailedPreconditionError(`${this.#qmp.who} has an object ${QEMU_IOMMUFD_ID} that is not an iommufd (${JSON.stringify(isObject(found) ? found.type : found)})`);
      }
      this.#iommufdReady = true;
      return;
    }
    const fd = await this.#opts.openIommufd();
    const name = 'kvmvfiod-iommufd-fd';
    try {
      await this.#qmp.execute('getfd', { fdname: name }, fd);
      await this.#qmp.execute('object-add', { 'qom-type': 'iommufd', id: QEMU_IOMMUFD_ID, fd: name });
    } catch (e) {
      this.#dropFd(name);
      throw e;
    }
    this.#iommufdReady = true;
  }

  /** closefd, not awaited: QEMU then holds no fd of that name, whether or not a command used it ("not found" is fine). */
  #dropFd(name: string): void {
    if (!this.#qmp.isOpen) return;
    this.#qmp.execute('closefd', { fdname: name }).catch(() => undefined);
  }
}
