/**
 * What the VFIO lane's hot-plug tests share (test/vfio/hotplug.test.ts,
 * hotplug-l2.test.ts): QEMU 10 started under `kvmvfioctl attach` for a new
 * cdev VM with the arguments of `kvmvfioctl vm args`, plus a monitor of the
 * test's own; what a process holds of VFIO; QEMU's view of its PCI devices.
 */
import { after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, readdirSync, readlinkSync } from 'node:fs';
import { join } from 'node:path';
import { KvmVfioApi } from '../../src/client/client';
import { CLI_JS, type RunningDaemon } from '../helpers/daemon';
import { collectJsonLines, type VmmProc } from '../helpers/vmmproc';
import { qmp } from '../helpers/qmp';
import { until as untilShort } from '../helpers/assert';
import { IN_VFIO_GUEST, type GuestGroup } from './guest-groups';

export const QEMU = process.env.KVMVFIO_QEMU;
export const L2_KERNEL = process.env.KVMVFIO_L2_KERNEL;
export const L2_INITRD = process.env.KVMVFIO_L2_INITRD;
export const skip = !IN_VFIO_GUEST
  ? 'not in the VFIO guest (run npm run test:vfio)'
  : !existsSync('/dev/iommu')
    ? "no /dev/iommu: the guest runs Debian's vfio modules (KVMVFIO_LANE_CDEV=0)"
    : !QEMU
      ? 'no QEMU 10 (KVMVFIO_QEMU; the QEMU lane fetches it: npm run test:qemu)'
      : false;
export const skipL2 = skip || (!L2_KERNEL || !L2_INITRD ? 'no L2 kernel and initramfs (KVMVFIO_LANE_L2=0)' : false);
export const until = <T>(what: string, fn: () => Promise<T | undefined | false>, ms = 90_000) => untilShort(what, fn, ms);
const NOBODY = ['setpriv', '--reuid=65534', '--regid=65534', '--clear-groups', '--inh-caps=-all', '--bounding-set=-all'];
/** A client whose calls may take a minute: a hot-plug's time is the guest's (TCG in TCG here), and the daemon's deadlines are what is tested. */
const clients: KvmVfioApi[] = [];
/** A client whose calls may take two minutes (closed after the file's tests). */
export function client(d: RunningDaemon): KvmVfioApi {
  const c = new KvmVfioApi(d.apiSocket, { timeoutMs: 120_000 });
  clients.push(c);
  return c;
}
after(() => {
  for (const c of clients) c.close();
});
/** q35's ACPI PCI hot-plug off: native PCIe hot-plug on the root ports. */
export const NATIVE = ['-global', 'ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off'];

interface PciDev {
  qdev_id: string;
  id: { vendor: number; device: number };
  pci_bridge?: { bus?: { secondary?: number }; devices?: PciDev[] };
}

/** Every device QEMU's query-pci lists, behind bridges too, as "qdev_id=vvvv:dddd". */
export function pciList(pci: { devices: PciDev[] }[]): string[] {
  const out: string[] = [];
  const walk = (ds: PciDev[] | undefined) => {
    for (const d of ds ?? []) {
      out.push(`${d.qdev_id}=${d.id.vendor.toString(16).padStart(4, '0')}:${d.id.device.toString(16).padStart(4, '0')}`);
      walk(d.pci_bridge?.devices);
    }
  };
  for (const b of pci) walk(b.devices);
  return out;
}

/** What process `pid` holds open among device cdevs and iommufds. */
export function vfioFdsOf(pid: number): string[] {
  const out: string[] = [];
  for (const n of readdirSync(`/proc/${pid}/fd`)) {
    try {
      const t = readlinkSync(`/proc/${pid}/fd/${n}`);
      if (t.startsWith('/dev/vfio/devices/') || t === '/dev/iommu') out.push(t);
    } catch {
      /* closed meanwhile */
    }
  }
  return out.sort();
}

export const cdevOf = (g: GuestGroup) => `/dev/vfio/devices/${g.devices[0].cdev}`;
export const qemuId = (g: GuestGroup) => `kvmvfiod-${g.devices[0].address.replace(/:/g, '-')}`;

export interface Qemu {
  id: string;
  proc: VmmProc;
  monitor: string;
  serial: string;
  pci(): Promise<string[]>;
}

/** Runs QEMU 10 under kvmvfioctl attach for a new cdev VM, with `vm args` (less `drop`, plus `extra`). */
export async function startQemu(
  c: KvmVfioApi,
  d: RunningDaemon,
  work: string,
  procs: VmmProc[],
  name: string,
  o: { ports: number; extra: string[]; drop?: (a: string) => boolean; memMb?: number; serial?: string },
): Promise<Qemu> {
  const mem = o.memMb ?? 64;
  const { vm, attach_token } = await c.createVm({ name, vmm_uid: 65534, vfio_device: true, vfio_handoff: 'VFIO_HANDOFF_CDEV', memlock_bytes: String((mem + 256) << 20) });
  const run = spawn(process.execPath, [CLI_JS, '--socket', d.apiSocket, '--json', 'vm', 'args', name, '--vmm', 'qemu', '--hotplug-ports', String(o.ports)], { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  run.stdout!.on('data', (b: Buffer) => (out += b.toString()));
  assert.equal(await new Promise((r) => run.once('exit', r)), 0);
  const { args } = JSON.parse(out) as { args: string[] };
  assert.ok(args.includes('socket,id=kvmvfiod-qmp,fd={qmp}'), JSON.stringify(args));
  const kept: string[] = [];
  for (let i = 0; i < args.length; i += 2) if (!o.drop?.(args[i + 1])) kept.push(args[i], args[i + 1]);
  const monitor = join(work, `${name}.qmp`);
  const serial = o.serial ?? join(work, `${name}.serial`);
  const argv = [
    ...NOBODY, process.execPath, CLI_JS, 'attach', '--handoff', join(d.runtimeDir, 'handoff.sock'), '--',
    QEMU!, ...kept,
    '-machine', 'q35', '-cpu', 'qemu64', '-m', String(mem), '-smp', '1', '-nodefaults', '-nographic', '-display', 'none', '-monitor', 'none',
    '-no-user-config', '-serial', `file:${serial}`, '-qmp', `unix:${monitor},server=on,wait=off`, ...o.extra,
  ];
  const proc = collectJsonLines(spawn(argv[0], argv.slice(1), { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, KVMVFIO_TOKEN: attach_token!.token } }));
  procs.push(proc);
  await until(`${name}: its monitor`, async () => {
    if (proc.proc.exitCode !== null) assert.fail(`QEMU ${name} exited: ${proc.stderr()}`);
    return existsSync(monitor) && (await qmp(monitor, 'query-status').catch(() => undefined));
  });
  await until(`${name} RUNNING`, async () => (await c.getVm(vm!.id)).state === 'VM_STATE_RUNNING');
  // query-pci lists what sits behind a root port only once the firmware has given the port a secondary bus number
  // (QEMU's qmp_query_pci_bridge); with the host busy (a TCG guest just ended), SeaBIOS may not have yet.
  await until(`${name}: the firmware numbered its hot-plug ports`, async () => {
    const ports = ((await qmp(monitor, 'query-pci')) as { devices: PciDev[] }[]).flatMap((b) => b.devices).filter((d) => d.qdev_id.startsWith('kvmvfiod-port-'));
    return ports.length === o.ports && ports.every((d) => (d.pci_bridge?.bus?.secondary ?? 0) > 0);
  }, 60_000);
  return { id: vm!.id, proc, monitor, serial, pci: async () => pciList((await qmp(monitor, 'query-pci')) as { devices: PciDev[] }[]) };
}
