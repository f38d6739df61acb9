/** Human output of kvmvfioctl: aligned tables and key: value blocks. */
import type { HostInfo, IommuGroup, Vm, VmEvent } from '../client/client';

/** Columns padded to their widest cell, two spaces apart; the last column is not padded. */
export function table(headers: readonly string[], rows: readonly (readonly string[])[]): string {
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const render = (cells: readonly string[]) =>
    cells
      .map((c, i) => (i === cells.length - 1 ? c : c.padEnd(widths[i])))
      .join('  ')
      .trimEnd();
  return [headers, ...rows].map(render).join('\n') + '\n';
}

/** "key:  value" lines with the values aligned. */
export function keyValues(pairs: readonly (readonly [string, string])[]): string {
  const width = Math.max(...pairs.map(([k]) => k.length)) + 1;
  return pairs.map(([k, v]) => `${`${k}:`.padEnd(width)}  ${v}`.trimEnd()).join('\n') + '\n';
}

/** People read PENDING, not VM_STATE_PENDING. */
export const stateName = (s: string): string => s.replace(/^VM_STATE_/, '');
export const eventName = (t: string): string => t.replace(/^TYPE_/, '');
const yesNo = (b: boolean): string => (b ? 'yes' : 'no');
const orDash = (s: string): string => (s === '' ? '-' : s);

/** Time since an RFC 3339 instant, in the largest unit that fits: 45s, 12m, 5h, 3d. */
export function age(iso: string, now: number = Date.now()): string {
  const t = Date.parse(iso);
  if (Number.isNaN(t)) return '-';
  const s = Math.max(0, Math.floor((now - t) / 1000));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m`;
  if (s < 86400) return `${Math.floor(s / 3600)}h`;
  return `${Math.floor(s / 86400)}d`;
}

const groupList = (g: readonly number[]): string => (g.length ? g.join(',') : '-');

function labelList(labels: Record<string, string>, sep: string): string {
  const keys = Object.keys(labels).sort();
  return keys.length ? keys.map((k) => `${k}=${labels[k]}`).join(sep) : '-';
}

/** Bytes with the binary size people wrote them as ("2147483648 (2 GiB)"); 0 leaves the limit alone. */
export function memlock(bytes: string): string {
  const n = BigInt(bytes || '0');
  if (n === 0n) return '0 (unchanged)';
  const units = ['TiB', 'GiB', 'MiB', 'KiB'];
  for (let i = 0; i < units.length; i++) {
    const unit = 1n << BigInt(10 * (units.length - i));
    if (n >= unit && n % unit === 0n) return `${n} (${n / unit} ${units[i]})`;
  }
  return `${n}`;
}

export function vmTable(vms: readonly Vm[], now: number = Date.now()): string {
  return table(
    ['ID', 'NAME', 'STATE', 'VMM UID', 'VFIO', 'GROUPS', 'LABELS', 'AGE'],
    vms.map((v) => [v.id, v.name, stateName(v.state), String(v.vmm_uid), yesNo(v.vfio_device), groupList(v.groups), labelList(v.labels, ','), age(v.create_time, now)]),
  );
}

/** `extra` lines go after the VM's own, in the same aligned block. */
export function vmDetail(v: Vm, extra: readonly [string, string][] = [], now: number = Date.now()): string {
  const pairs: [string, string][] = [
    ['id', v.id],
    ['name', v.name],
    ['state', stateName(v.state)],
    ['principal', orDash(v.principal)],
    ['owner uid', String(v.owner_uid)],
    ['vmm uid', String(v.vmm_uid)],
    ['vmm pid', v.vmm_pid ? `${v.vmm_pid}${v.passive_vmm ? ' (passive: attached by kvmvfioctl attach)' : ''}` : '-'],
    ['vfio device', yesNo(v.vfio_device)],
    ['groups', groupList(v.groups)],
    ...v.stray_groups.map((g, i): [string, string] => [i === 0 ? 'stray groups' : '', `${g.group}: held by ${holderList(g.holders)} since ${g.since}`]),
    ['memlock', memlock(v.memlock_bytes)],
    ['labels', labelList(v.labels, ', ')],
    ['request id', orDash(v.request_id)],
    ['created', `${v.create_time} (${age(v.create_time, now)} ago)`],
    ['updated', v.update_time],
    ['revision', v.revision],
  ];
  if (v.failure_reason) pairs.push(['failure', v.failure_reason]);
  return keyValues([...pairs, ...extra]);
}

/** "0000:01:00.0 10de:1eb8 vfio-pci"; a device with no driver shows "-". */
const deviceCell = (d: IommuGroup['devices'][number]): string => `${d.address} ${d.vendor_id}:${d.device_id} ${orDash(d.driver)}${d.cdev ? ` (${d.cdev})` : ''}`;

/** What a host without IOMMU groups prints instead of an empty table. */
export const NO_IOMMU_GROUPS =
  'This host has no IOMMU groups: its IOMMU is off or absent, so no device can be given to a VM.\n' +
  'Enable VT-d or AMD-Vi in the firmware and the IOMMU on the kernel command line (intel_iommu=on;\n' +
  'on AMD check that amd_iommu is not off), then reboot.\n';

const HOLDING_NAMES: Record<string, string> = {
  GROUP_HOLDING_FREE: 'free',
  GROUP_HOLDING_CLAIMED: 'claimed (the daemon holds it for the VM)',
  GROUP_HOLDING_VMM: "in the VM's VMM",
  GROUP_HOLDING_STRAY: 'stray (its VM let it go; a process still holds it)',
};
const holdingName = (h: string): string => HOLDING_NAMES[h] ?? h;

/** "pid 412 (uid 65534, refvmm), pid 413 (...)", or what nothing in /proc names. */
function holderList(holders: readonly { pid: number; uid: string; comm: string }[]): string {
  return holders.length ? holders.map((h) => `pid ${h.pid} (uid ${h.uid}, ${h.comm})`).join(', ') : 'a process not visible in /proc';
}

/** One row per device; a group with several devices continues on rows with blank group columns. */
export function groupTable(groups: readonly IommuGroup[]): string {
  const rows: string[][] = [];
  for (const g of groups) {
    const vm = g.vm_name || g.vm_id || '-';
    const devices = g.devices.length ? g.devices.map(deviceCell) : ['-'];
    devices.forEach((d, i) => rows.push(i === 0 ? [String(g.number), yesNo(g.viable), vm, d] : ['', '', '', d]));
  }
  return table(['GROUP', 'VIABLE', 'VM', 'DEVICES'], rows);
}

export function groupDetail(g: IommuGroup): string {
  const pairs: [string, string][] = [
    ['group', String(g.number)],
    ['viable', yesNo(g.viable)],
    ['vm', g.vm_id ? `${g.vm_name} (${g.vm_id})` : '-'],
    ['holding', holdingName(g.holding)],
    ...(g.holding === 'GROUP_HOLDING_STRAY' ? [['held by', `${holderList(g.holders)} since ${g.stray_since}`] as [string, string]] : []),
    ['open in daemon', yesNo(g.open_in_daemon)],
  ];
  g.devices.forEach((d, i) => pairs.push([i === 0 ? 'devices' : '', `${deviceCell(d)} class ${d.class_code}`]));
  if (!g.devices.length) pairs.push(['devices', '-']);
  g.not_viable_reasons.forEach((r, i) => pairs.push([i === 0 ? 'not viable' : '', r]));
  // Continuation lines (blank key) carry no colon.
  return keyValues(pairs).replace(/^:( *)/gm, ' $1');
}

export function hostInfo(h: HostInfo, now: number = Date.now()): string {
  const s = h.support;
  const pairs: [string, string][] = [
    ['kernel', h.kernel_release],
    ['kvm api version', String(h.kvm_api_version)],
    ['daemon version', h.daemon_version],
    ['started', `${h.start_time} (${age(h.start_time, now)} ago)`],
    ['kvm-vfio device', s ? yesNo(s.kvm_vfio_device) : '-'],
    ['vfio file add/del', s ? `${yesNo(s.vfio_file_add)}/${yesNo(s.vfio_file_del)}` : '-'],
    ['vfio container', s ? yesNo(s.vfio_container) : '-'],
    ['vfio device cdevs', s ? yesNo(s.vfio_device_cdev) : '-'],
    ['iommufd', s ? yesNo(s.iommufd) : '-'],
    ['iommu groups', String(h.iommu_group_count)],
    ['claimed groups', String(h.claimed_group_count)],
    ['vms', String(h.vm_count)],
    ['fds', `${h.fds_open} open, limit ${h.fd_limit_soft} (hard ${h.fd_limit_hard})`],
  ];
  if (s?.probe_errors.length) pairs.push(['probe errors', s.probe_errors.join('; ')]);
  return keyValues(pairs);
}

/** After vm create: the token its VMM presents on the handoff socket, or why there is none. */
export function attachTokenPairs(t: { token: string; expire_time: string } | null): [string, string][] {
  if (!t) return [['attach token', '- (a VMM already attached; none is issued on a retry)']];
  return [
    ['attach token', t.token],
    ['token expires', t.expire_time],
  ];
}

/** One line per watch event. SYNCED carries no VM: it marks the end of the VMs that already existed. */
export function eventLine(e: VmEvent): string {
  const type = eventName(e.type).padEnd(8);
  if (!e.vm) return e.type === 'TYPE_SYNCED' ? `${type} (the VMs above existed when the watch began; changes follow)\n` : `${type}\n`;
  const v = e.vm;
  return `${type} ${v.name} ${v.id} ${stateName(v.state)} vfio=${yesNo(v.vfio_device)} groups=${groupList(v.groups)} revision=${v.revision}\n`;
}
