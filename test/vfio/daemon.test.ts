/**
 * The product's success paths against real VFIO groups, inside the nested
 * guest of the vfio lane (test/vfio/lane.sh): the real daemon, the real
 * client, unprivileged reference VMMs (TypeScript and C) making the KVM and
 * VFIO calls in their own processes. Outside the guest it skips.
 */
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { openSync, closeSync, existsSync, readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { status } from '@grpc/grpc-js';
import { type IommuGroup, type KvmVfioApi } from '../../src/client/client';
import { startDaemon, type RunningDaemon } from '../helpers/daemon';
import { REFERENCE_VMM, runVmm, type VmmProc } from '../helpers/vmmproc';
import { buildCVmm } from '../helpers/cvmm';
import { expectStatus, until as untilShort } from '../helpers/assert';

/** TCG is slow: a minute for anything in the guest. */
const until = <T>(what: string, fn: () => Promise<T | undefined | false>) => untilShort(what, fn, 60_000);

const inGuest = process.env.KVMVFIO_GUEST === '1';



const sysfsVendor = (address: string) => readFileSync(`/sys/bus/pci/devices/${address}/vendor`, 'utf8').trim();

describe('real VFIO groups through kvmvfiod', { skip: inGuest ? false : 'runs only in the nested VFIO guest (npm run test:vfio)' }, () => {
  let d: RunningDaemon;
  let c: KvmVfioApi;
  let handoff: string;
  let viable: IommuGroup[];
  let blocked: IommuGroup;
  let cvmm: string;
  const vmms: VmmProc[] = [];

  /** A VMM of `kind` as uid 65534, using each group it is given. */
  const vmm = (kind: 'ts' | 'c', token: string) => {
    const argv = kind === 'ts' ? [process.execPath, REFERENCE_VMM, '--socket', handoff] : [cvmm, handoff];
    const v = runVmm(argv, token);
    vmms.push(v);
    return v;
  };

  const vfioUse = (v: VmmProc, group: number) =>
    until(`vfio-use of group ${group}`, async () => v.events.find((e) => e.event === 'vfio-use' && e.group === group));

  before(async () => {
    process.env.KVMVFIO_USE_VFIO = '1';
    cvmm = process.env.KVMVFIO_CVMM || (await buildCVmm());
    d = await startDaemon({ args: ['--vmm-timeout-ms', '20000', '--vmm-exit-grace-ms', '20000'] });
    c = d.client();
    handoff = join(d.runtimeDir, 'handoff.sock');
    const { groups } = await c.listIommuGroups();
    viable = groups.filter((g) => g.viable && g.devices.length === 1 && g.devices[0].driver === 'vfio-pci');
    const notViable = groups.filter((g) => !g.viable && g.devices.some((x) => x.driver === 'vfio-pci'));
    assert.ok(viable.length >= 2, `two single-device vfio-pci groups expected: ${JSON.stringify(groups)}`);
    assert.equal(notViable.length, 1, 'one group with a device on vfio-pci and one on another driver');
    blocked = notViable[0];
  });

  after(async () => {
    for (const v of vmms) v.kill();
    await d?.cleanup();
  });

  test('ListIommuGroups shows the groups, their devices, drivers and viability', async () => {
    const h = await c.getHostInfo();
    assert.equal(h.support?.vfio_container, true);
    assert.equal(h.support?.iommu_groups, true);
    // What the guest's kernel has (Debian's 6.12: neither, unless the lane rebuilt vfio and iommufd).
    assert.equal(h.support?.iommufd, existsSync('/dev/iommu'));
    assert.equal(h.support?.vfio_device_cdev, existsSync('/dev/vfio/devices'));
    for (const g of viable) {
      const dir = `/sys/bus/pci/devices/${g.devices[0].address}/vfio-dev`;
      const named = existsSync(dir) ? readdirSync(dir).find((n) => /^vfio\d+$/.test(n) && existsSync(`${dir}/${n}/dev`)) : undefined;
      assert.equal(g.devices[0].cdev, named ?? '');
      if (named) assert.ok(existsSync(`/dev/vfio/devices/${named}`), `the daemon names ${named}, which has a node`);
    }
    for (const g of viable) {
      assert.equal(g.devices[0].vendor_id, sysfsVendor(g.devices[0].address).replace(/^0x/, ''));
      assert.deepEqual(g.not_viable_reasons, []);
    }
    const other = blocked.devices.find((x) => x.driver !== 'vfio-pci' && x.driver !== '')!;
    assert.ok(blocked.devices.length >= 2);
    assert.deepEqual(blocked.not_viable_reasons, [`${other.address} is bound to ${other.driver}; bind ${other.address} to vfio-pci`]);
  });

  for (const [kind, exitHow] of [['ts', 'DeleteVm'], ['c', 'SIGKILL']] as const) {
    test(`${kind} VMM: ADD of a real group at attach, AddGroup/RemoveGroup with the kernel's verdicts, VFIO use, EBUSY, groups back clean after ${exitHow}`, async () => {
      const [A, B] = viable;
      const { vm, attach_token } = await c.createVm({ name: `vm-${kind}`, vmm_uid: 65534, vfio_device: true, vfio_handoff: 'VFIO_HANDOFF_GROUP', groups: [A.number], memlock_bytes: String(64 << 20) });
      const v = vmm(kind, attach_token!.token);
      const attached = await v.waitFor('attached', 60_000);
      assert.equal(attached.uid, 65534);
      assert.equal(attached.container, true);
      assert.equal(attached.memlock, 64 << 20);

      const useA = await vfioUse(v, A.number);
      assert.equal(useA.ok, true, JSON.stringify(useA));
      assert.equal(useA.vendor, sysfsVendor(A.devices[0].address), 'config space read through VFIO matches sysfs');
      assert.equal(useA.dma, true);
      const running = await until('RUNNING', async () => {
        const g = await c.getVm(vm!.id);
        return g.state === 'VM_STATE_RUNNING' && g;
      });
      assert.deepEqual(running.groups, [A.number]);

      assert.deepEqual((await c.addGroup({ vm_id: vm!.id, group: B.number })).groups, [A.number, B.number].sort((x, y) => x - y));
      assert.equal((await vfioUse(v, B.number)).ok, true);
      await expectStatus(c.addGroup({ vm_id: vm!.id, group: B.number }), status.ALREADY_EXISTS, /VFIO_FILE_ADD.*EEXIST/);
      assert.deepEqual((await c.removeGroup({ vm_id: vm!.id, group: B.number })).groups, [A.number]);
      await expectStatus(c.removeGroup({ vm_id: vm!.id, group: B.number }), status.NOT_FOUND);

      await expectStatus(c.createVm({ name: `second-${kind}`, vmm_uid: 65534, vfio_device: true, vfio_handoff: 'VFIO_HANDOFF_GROUP', groups: [A.number] }), status.FAILED_PRECONDITION, new RegExp(`held by vm vm-${kind}`));
      const other = blocked.devices.find((x) => x.driver !== 'vfio-pci' && x.driver !== '')!;
      await expectStatus(
        c.createVm({ name: `blocked-${kind}`, vmm_uid: 65534, vfio_device: true, vfio_handoff: 'VFIO_HANDOFF_GROUP', groups: [blocked.number] }),
        status.FAILED_PRECONDITION,
        new RegExp(`${other.address} is bound to ${other.driver}; bind ${other.address} to vfio-pci`),
      );

      assert.throws(() => closeSync(openSync(`/dev/vfio/${A.number}`, 'r+')), (e: NodeJS.ErrnoException) => e.code === 'EBUSY');

      if (exitHow === 'SIGKILL') v.kill('SIGKILL');
      else await c.deleteVm({ vm_id: vm!.id });
      await until('groups back', async () => (await c.getIommuGroup(A.number)).vm_id === '' && (await c.getIommuGroup(B.number)).vm_id === '');

      // The same groups, a new VM and VMM: container set and DMA mapped again, no EBUSY.
      const next = await c.createVm({ name: `again-${kind}`, vmm_uid: 65534, vfio_device: true, vfio_handoff: 'VFIO_HANDOFF_GROUP', groups: [A.number, B.number] });
      const w = vmm(kind, next.attach_token!.token);
      for (const g of [A, B]) {
        const use = await vfioUse(w, g.number);
        assert.equal(use.ok, true, `after ${exitHow}: ${JSON.stringify(use)}`);
      }
      await c.deleteVm({ vm_id: next.vm!.id });
      if (exitHow === 'SIGKILL') await c.deleteVm({ vm_id: vm!.id });
    });
  }
});
