/** Domain records to API messages. */
import type { FileHolder } from '../broker/holders';
import type { GroupView } from '../broker/pool';
import type { GroupHolder } from '../generated/kvmvfio/v1/GroupHolder';
import type { GroupHolding } from '../generated/kvmvfio/v1/GroupHolding';
import type { IssuedToken } from '../broker/tokens';
import type { AttachToken } from '../generated/kvmvfio/v1/AttachToken';
import type { VmRecord, VmState } from '../broker/vms';
import type { IommuGroup } from '../generated/kvmvfio/v1/IommuGroup';
import type { Vm } from '../generated/kvmvfio/v1/Vm';
import type { VmState as VmStateMessage } from '../generated/kvmvfio/v1/VmState';

const stateMessage: Record<VmState, VmStateMessage> = {
  PENDING: 'VM_STATE_PENDING',
  RUNNING: 'VM_STATE_RUNNING',
  EXITED: 'VM_STATE_EXITED',
  FAILED: 'VM_STATE_FAILED',
};

const holdingMessage: Record<GroupView['holding'], GroupHolding> = {
  free: 'GROUP_HOLDING_FREE',
  claimed: 'GROUP_HOLDING_CLAIMED',
  vmm: 'GROUP_HOLDING_VMM',
  stray: 'GROUP_HOLDING_STRAY',
};

function holderMessage(h: FileHolder): GroupHolder {
  return { pid: h.pid, uid: String(h.uid), comm: h.comm };
}

export function vmMessage(vm: Readonly<VmRecord>): Vm {
  return {
    id: vm.id,
    name: vm.name,
    labels: { ...vm.labels },
    state: stateMessage[vm.state],
    owner_uid: vm.ownerUid,
    vmm_uid: vm.vmmUid,
    vfio_device: vm.vfioDevice,
    groups: [...vm.groups],
    memlock_bytes: String(vm.memlockBytes),
    request_id: vm.requestId,
    create_time: vm.createTime,
    update_time: vm.updateTime,
    failure_reason: vm.failureReason,
    revision: String(vm.revision),
    vmm_pid: vm.vmmPid,
    passive_vmm: vm.passive,
    principal: vm.principal,
    stray_groups: (vm.strayGroups ?? []).map((g) => ({ group: g.group, holders: g.holders.map(holderMessage), since: g.since })),
    vfio_handoff: vm.handoff === 'cdev' ? 'VFIO_HANDOFF_CDEV' : 'VFIO_HANDOFF_GROUP',
  };
}

export function tokenMessage(t: IssuedToken): AttachToken {
  return { token: t.token, expire_time: t.expiresAt.toISOString() };
}

export function groupMessage(g: GroupView): IommuGroup {
  return {
    number: g.number,
    devices: g.devices.map((d) => ({
      address: d.address,
      vendor_id: d.vendorId,
      device_id: d.deviceId,
      class_code: d.classCode,
      driver: d.driver,
      cdev: d.cdev,
    })),
    viable: g.viable,
    not_viable_reasons: [...g.notViableReasons],
    vm_id: g.owner?.vmId ?? '',
    vm_name: g.owner?.vmName ?? '',
    open_in_daemon: g.openInDaemon,
    holding: holdingMessage[g.holding],
    holders: g.holders.map(holderMessage),
    stray_since: g.holding === 'stray' ? (g.since ?? '') : '',
  };
}
