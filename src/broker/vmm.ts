/**
 * What the broker needs of a VMM attached over a session, and of the host to
 * attach one. The server's session implements VmmLink; tests use doubles.
 */
import type { OwnedFd, SendableFd } from '../kernel';

export interface VmmLink {
  readonly pid: number;
  /** A VMM attached by `kvmvfioctl attach`: it does not take requests. */
  readonly passive: boolean;
  /**
   * A passive VMM that still takes hot changes: 'qmp', its QEMU's monitor
   * (the daemon drives it: addDevice/removeDevice become device_add and
   * device_del). Absent: a passive VMM takes none.
   */
  readonly hotplug?: 'qmp';
  /**
   * Each runs one request in the VMM and resolves when it succeeded. A
   * kernel failure in the VMM rejects with a SysError carrying its errno; no
   * answer in time with DeadlineExceededError, whose `answer` is the outcome
   * still to come (the request stays outstanding); a gone session with
   * UnavailableError.
   */
  createVfioDevice(): Promise<void>;
  /** Sends `fd` (the daemon's only copy of the group's file, handed over) with the request and closes it once sent. */
  addGroup(group: number, fd: SendableFd): Promise<void>;
  removeGroup(group: number): Promise<void>;
  /**
   * The device-cdev handoff: ADD_DEVICE / REMOVE_DEVICE of one device (by
   * PCI address); `fd` as addGroup's. Through QMP, removeDevice resolves once
   * QEMU let go of the device (DEVICE_DELETED), after the guest acknowledged.
   */
  addDevice(address: string, fd: SendableFd): Promise<void>;
  removeDevice(address: string): Promise<void>;
  /** Asks the VMM to stop its VM and exit. */
  shutdown(reason: string): void;
  /** SIGKILL through the pidfd. */
  kill(): void;
  /**
   * Throws UnavailableError when the VMM process has exited (its pidfd says
   * so): called right before acting on its pid (prlimit), so that pid is
   * still the VMM's.
   */
  assertAlive(step: string): void;
  /**
   * Resolves when the VMM says it made its VM (VM_CREATED; at once for a
   * passive or restored VMM); rejects when the session ends first.
   */
  readonly vmMade: Promise<void>;
  /** A request past its deadline that the VMM has not answered yet ("ADD_GROUP of group 5 (seq 3)"); none is sent meanwhile. */
  readonly overdue?: string;
  /** Whether vmMade has resolved (VM_CREATED came); for the reason of a VM whose VMM exited during setup. */
  readonly madeVm?: boolean;
  /** Resolves once the VMM process has exited (its pidfd became readable). */
  readonly exited: Promise<void>;
}

export interface VmmHost {
  /** The daemon's /dev/kvm fd, lent to send to a VMM. */
  lendKvm(): SendableFd;
  /** A fresh VFIO container (/dev/vfio/vfio), or null where the host has none. */
  openContainer(): Promise<OwnedFd | null>;
  /** A fresh iommufd (/dev/iommu, read-write) for one VMM (the device-cdev handoff). */
  openIommufd(): Promise<OwnedFd>;
  /** Raise the VMM's RLIMIT_MEMLOCK (prlimit). */
  setMemlock(pid: number, bytes: number): void;
}

/** What the session sends a VMM at attach. The session closes each once sent: a loan (/dev/kvm) stays open, a group handed over is the daemon's only copy and goes. */
export interface AttachGrant {
  vmId: string;
  vmName: string;
  kvm: SendableFd;
  container: OwnedFd | null;
  memlockBytes: number;
  /** For `kvmvfioctl attach`: the group fds, since a passive VMM gets its plan at once. */
  groups: { number: number; fd: SendableFd }[];
  /** The device-cdev handoff: the VMM's own iommufd, and a fresh open of each device's cdev of each group. */
  iommufd: OwnedFd | null;
  devices: { group: number; address: string; fd: SendableFd }[];
}
