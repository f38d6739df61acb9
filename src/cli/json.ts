/**
 * --json output: each response message with exactly the fields of the proto,
 * snake_case, in proto order. Built field by field against the generated
 * __Output types, so a field added to or removed from the proto fails the
 * build here instead of silently changing the output (and nothing the
 * loader adds at runtime, such as oneof markers, leaks out). Defaults are
 * printed (0, "", false, []), 64-bit integers are decimal strings and enums
 * their names, as in the proto3 JSON mapping; an unset message is null.
 */
import type { HostInfo, IommuGroup, Vm, VmEvent } from '../client/client';
import type { AttachToken__Output } from '../generated/kvmvfio/v1/AttachToken';
import type { CreateVmResponse__Output } from '../generated/kvmvfio/v1/CreateVmResponse';
import type { DeleteVmResponse__Output } from '../generated/kvmvfio/v1/DeleteVmResponse';
import type { KernelSupport__Output } from '../generated/kvmvfio/v1/KernelSupport';
import type { ListIommuGroupsResponse__Output } from '../generated/kvmvfio/v1/ListIommuGroupsResponse';
import type { ListVmsResponse__Output } from '../generated/kvmvfio/v1/ListVmsResponse';
import type { GroupHolder__Output } from '../generated/kvmvfio/v1/GroupHolder';
import type { PciDevice__Output } from '../generated/kvmvfio/v1/PciDevice';

export function vmJson(v: Vm): Vm {
  return {
    id: v.id,
    name: v.name,
    labels: { ...v.labels },
    state: v.state,
    owner_uid: v.owner_uid,
    vmm_uid: v.vmm_uid,
    vfio_device: v.vfio_device,
    groups: [...v.groups],
    memlock_bytes: v.memlock_bytes,
    request_id: v.request_id,
    create_time: v.create_time,
    update_time: v.update_time,
    failure_reason: v.failure_reason,
    revision: v.revision,
    vmm_pid: v.vmm_pid,
    passive_vmm: v.passive_vmm,
    principal: v.principal,
    stray_groups: v.stray_groups.map((g) => ({ group: g.group, holders: g.holders.map(holderJson), since: g.since })),
    vfio_handoff: v.vfio_handoff,
  };
}

function holderJson(h: GroupHolder__Output): GroupHolder__Output {
  return { pid: h.pid, uid: h.uid, comm: h.comm };
}

export function tokenJson(t: AttachToken__Output): AttachToken__Output {
  return { token: t.token, expire_time: t.expire_time };
}

function supportJson(s: KernelSupport__Output): KernelSupport__Output {
  return {
    kvm_vfio_device: s.kvm_vfio_device,
    vfio_file_add: s.vfio_file_add,
    vfio_file_del: s.vfio_file_del,
    vfio_container: s.vfio_container,
    iommu_groups: s.iommu_groups,
    probe_errors: [...s.probe_errors],
    iommufd: s.iommufd,
    vfio_device_cdev: s.vfio_device_cdev,
  };
}

export function hostInfoJson(h: HostInfo): HostInfo {
  return {
    kernel_release: h.kernel_release,
    kvm_api_version: h.kvm_api_version,
    support: h.support ? supportJson(h.support) : null,
    daemon_version: h.daemon_version,
    fd_limit_soft: h.fd_limit_soft,
    fd_limit_hard: h.fd_limit_hard,
    fds_open: h.fds_open,
    vm_count: h.vm_count,
    claimed_group_count: h.claimed_group_count,
    iommu_group_count: h.iommu_group_count,
    start_time: h.start_time,
  };
}

function deviceJson(d: PciDevice__Output): PciDevice__Output {
  return { address: d.address, vendor_id: d.vendor_id, device_id: d.device_id, class_code: d.class_code, driver: d.driver, cdev: d.cdev };
}

export function groupJson(g: IommuGroup): IommuGroup {
  return {
    number: g.number,
    devices: g.devices.map(deviceJson),
    viable: g.viable,
    not_viable_reasons: [...g.not_viable_reasons],
    vm_id: g.vm_id,
    vm_name: g.vm_name,
    open_in_daemon: g.open_in_daemon,
    holding: g.holding,
    holders: g.holders.map(holderJson),
    stray_since: g.stray_since,
  };
}

export const groupsJson = (r: ListIommuGroupsResponse__Output): ListIommuGroupsResponse__Output => ({ groups: r.groups.map(groupJson) });
/** `vm list --json`: the VMs of every page in one ListVmsResponse, without next_page_token (the listing is complete). */
export const vmsJson = (vms: readonly Vm[]): Pick<ListVmsResponse__Output, 'vms'> => ({ vms: vms.map(vmJson) });
export const createVmJson = (r: CreateVmResponse__Output): CreateVmResponse__Output => ({
  vm: r.vm ? vmJson(r.vm) : null,
  attach_token: r.attach_token ? tokenJson(r.attach_token) : null,
});
export const deleteVmJson = (r: DeleteVmResponse__Output): DeleteVmResponse__Output => ({ vm: r.vm ? vmJson(r.vm) : null });
export const eventJson = (e: VmEvent): VmEvent => ({ type: e.type, vm: e.vm ? vmJson(e.vm) : null });

/** A unary response, indented for people who read it too. */
export const pretty = (v: unknown): string => `${JSON.stringify(v, null, 2)}\n`;
/** One stream event: one object per line, so `jq` and line readers can follow it. */
export const line = (v: unknown): string => `${JSON.stringify(v)}\n`;
