/**
 * A VMM using the VFIO groups it was given, the way QEMU does: the group
 * joins the container, the container gets its IOMMU (type1v2) once, the
 * device fd is taken, its PCI config space read, and guest memory is mapped
 * for DMA. Used by the reference VMM in the nested-guest lane, where real
 * groups exist.
 */
import { readdirSync } from 'node:fs';
import { GuestMemory, type Iommufd, type OwnedFd, SysError, VFIO, VfioContainer, type VfioDeviceCdev, VfioGroup } from '../kernel';

export interface VfioUse {
  /** The group (group handoff); absent for a device cdev, named by `device`. */
  group?: number;
  ok: boolean;
  device?: string;
  /** "0x1234" */
  vendor?: string;
  dma?: boolean;
  step?: string;
  errno?: number;
  reason?: string;
}

const DMA_BYTES = 1n << 20n;

export class VfioUser {
  readonly #container: VfioContainer | null;
  readonly #sysfs: string;
  #iommuSet = false;
  readonly #memory: GuestMemory[] = [];

  /** `container` stays owned by the caller (the session). */
  constructor(container: OwnedFd | null, sysfs = '/sys') {
    this.#container = container ? new VfioContainer(container) : null;
    this.#sysfs = sysfs;
  }

  /** Uses group `n` (its fd still owned by the session). Never throws: the result says which step failed. */
  use(n: number, groupFd: OwnedFd): VfioUse {
    if (!this.#container) return { group: n, ok: false, step: 'container', errno: 0, reason: 'no container' };
    let step = 'sysfs';
    try {
      const device = readdirSync(`${this.#sysfs}/kernel/iommu_groups/${n}/devices`)
        .filter((d) => /^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$/.test(d))
        .sort()[0];
      if (!device) return { group: n, ok: false, step, errno: 0, reason: 'no PCI device in the group' };
      const group = new VfioGroup(groupFd, n, `/dev/vfio/${n}`);
      step = 'set_container';
      if (!group.status().containerSet) group.setContainer(this.#container.fd);
      step = 'set_iommu';
      if (!this.#iommuSet) {
        this.#container.setIommu(this.#container.checkExtension(VFIO.TYPE1v2_IOMMU) ? VFIO.TYPE1v2_IOMMU : VFIO.TYPE1_IOMMU);
        this.#iommuSet = true;
      }
      step = 'get_device_fd';
      const dev = group.getDeviceFd(device);
      try {
        step = 'pread';
        const vendor = `0x${dev.pciVendorId().toString(16).padStart(4, '0')}`;
        step = 'map_dma';
        const mem = GuestMemory.map(Number(DMA_BYTES), `dma for group ${n}`);
        this.#memory.push(mem);
        this.#container.mapDma(mem.address, BigInt(n) * 2n * DMA_BYTES, DMA_BYTES);
        return { group: n, ok: true, device, vendor, dma: true };
      } finally {
        void dev.close();
      }
    } catch (e) {
      if (e instanceof SysError) return { group: n, ok: false, step, errno: e.errno, reason: e.message };
      return { group: n, ok: false, step, errno: 0, reason: (e as Error).message };
    }
  }

  /**
   * Uses a device handed over as a cdev, bound and attached to `ioas` of
   * `iommufd` already (the session did that): its config space is read, and
   * 1 MiB of memory mapped for DMA in the IOAS. Never throws.
   */
  useDevice(address: string, cdev: VfioDeviceCdev, iommufd: Iommufd, ioas: number): VfioUse {
    let step = 'pread';
    try {
      const vendor = `0x${cdev.pciVendorId().toString(16).padStart(4, '0')}`;
      step = 'ioas_map';
      const mem = GuestMemory.map(Number(DMA_BYTES), `dma for ${address}`);
      this.#memory.push(mem);
      iommufd.mapFixed(ioas, mem.address, BigInt(this.#memory.length) * 2n * DMA_BYTES, DMA_BYTES);
      return { device: address, ok: true, vendor, dma: true };
    } catch (e) {
      if (e instanceof SysError) return { device: address, ok: false, step, errno: e.errno, reason: e.message };
      return { device: address, ok: false, step, errno: 0, reason: (e as Error).message };
    }
  }

  /** Unmaps the DMA memory (the container's mappings go with the process anyway). */
  close(): void {
    for (const m of this.#memory.splice(0)) m.unmap();
  }
}
