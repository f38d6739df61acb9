/**
 * Who may do what, through a real daemon with a policy file: tenants apart,
 * missing permissions named, quotas, admins, and a reload that keeps the old
 * policy when the new file is broken. Calls are made as other uids (setpriv).
 */
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp, rm, writeFile, chmod } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { status } from '@grpc/grpc-js';
import { makeFakeHost, type FakeHost } from '../helpers/fakehost';
import { REPO, startDaemon, type RunningDaemon } from '../helpers/daemon';
import { REFERENCE_VMM, runVmm } from '../helpers/vmmproc';
import { until } from '../helpers/assert';

const run = promisify(execFile);
const CALL_AS = join(REPO, 'dist', 'test', 'helpers', 'call-as.js');
const A = 1000;
const B = 1001;
const VIEWER = 1002;
const STRANGER = 1003;
const ADMIN = 1004;

const policy = {
  principals: [
    { name: 'tenant-a', match: { uids: [A] }, calls: ['*'], iommuGroups: [5, '7-8'], vmmUids: [65534], limits: { vms: 2, groups: 1, pendingTokens: 5 } },
    { name: 'tenant-b', match: { uids: [B] }, calls: ['GetVm', 'ListVms', 'DeleteVm', 'CreateVm', 'CreateVfioDevice', 'RemoveGroup'], iommuGroups: 'all', vmmUids: [65533] },
    { name: 'viewer', match: { uids: [VIEWER] }, calls: ['GetHostInfo', 'ListIommuGroups'] },
    { name: 'ops', match: { uids: [ADMIN] }, admin: true, calls: ['GetVm', 'ListVms'] },
  ],
};

type Outcome = { ok: true; res: Record<string, unknown> } | { ok: false; code: number; details: string };

describe('policy', () => {
  let host: FakeHost;
  let dir: string;
  let d: RunningDaemon;

  const callAs = async (uid: number, method: string, req: unknown = {}): Promise<Outcome> => {
    const { stdout } = await run('setpriv', [`--reuid=${uid}`, `--regid=${uid}`, '--clear-groups', process.execPath, CALL_AS, d.apiSocket, method, JSON.stringify(req)]);
    return JSON.parse(stdout) as Outcome;
  };
  const denied = async (o: Promise<Outcome>, code: status, re: RegExp) => {
    const r = await o;
    assert.equal(r.ok, false, `expected ${status[code]}, got ${JSON.stringify(r)}`);
    if (!r.ok) {
      assert.equal(status[r.code], status[code], r.details);
      assert.match(r.details, re);
    }
  };

  before(async () => {
    host = await makeFakeHost([5, 6, 7, 12].map((n) => ({ number: n, devices: [{ address: `0000:00:0${n % 10}.${n >= 10 ? 1 : 0}`, vendor: '8086', device: '10d3', class: '020000', driver: 'vfio-pci' }] })));
    dir = await mkdtemp(join(tmpdir(), 'kvmvfiod-policy-'));
    await chmod(dir, 0o755);
    await writeFile(join(dir, 'policy.json'), JSON.stringify(policy));
    d = await startDaemon({ dir, sysfs: host.sysfs, dev: host.dev });
  });

  after(async () => {
    await d?.cleanup();
    await host?.cleanup();
    await rm(dir, { recursive: true, force: true });
  });

  test("uid A's VMs are invisible to uid B: B can neither list, get, change nor delete them", async () => {
    const created = await callAs(A, 'createVm', { name: 'a-1', vmm_uid: 65534, vfio_device: true, groups: [5] });
    assert.ok(created.ok, JSON.stringify(created));
    const id = (created.res.vm as { id: string }).id;
    const listB = await callAs(B, 'listVms', {});
    assert.ok(listB.ok);
    assert.deepEqual((listB.res as { vms: unknown[] }).vms, []);
    await denied(callAs(B, 'getVm', id), status.NOT_FOUND, new RegExp(`vm ${id} not found`));
    await denied(callAs(B, 'deleteVm', { vm_id: id }), status.NOT_FOUND, /not found/);
    await denied(callAs(B, 'createVfioDevice', id), status.NOT_FOUND, /not found/);
    const own = await callAs(A, 'getVm', id);
    assert.ok(own.ok);
    // An admin principal sees it; a stranger matches no principal: its connection is closed at accept.
    const adminList = await callAs(ADMIN, 'listVms', {});
    assert.ok(adminList.ok && (adminList.res as { vms: { id: string }[] }).vms.some((v) => v.id === id));
    await denied(callAs(STRANGER, 'listVms', {}), status.UNAVAILABLE, /connect/i);
    await d.waitForLog((l) => l.event === 'api-connection-refused' && l.uid === STRANGER && l.reason === 'no-principal');
  });

  test("B cannot redeem A's token: a VMM of another uid is refused and nothing is sent", async () => {
    const created = await callAs(A, 'createVm', { name: 'a-token', vmm_uid: 65534 });
    assert.ok(created.ok, JSON.stringify(created));
    const token = (created.res.attach_token as { token: string }).token;
    const v = runVmm(['setpriv', '--reuid=65533', '--regid=65533', '--clear-groups', process.execPath, REFERENCE_VMM, '--socket', join(d.runtimeDir, 'handoff.sock')], token, false);
    const refused = await v.waitFor('attach-refused');
    assert.equal(refused.errno, 13);
    assert.match(String(refused.reason), /for vmm uid 65534, not uid 65533/);
    await callAs(A, 'deleteVm', { vm_id: (created.res.vm as { id: string }).id });
  });

  test('a missing permission is named: the call, the IOMMU group, the vmm uid', async () => {
    const b = await callAs(B, 'createVm', { name: 'b-1', vmm_uid: 65533, vfio_device: true });
    assert.ok(b.ok, JSON.stringify(b));
    await denied(callAs(B, 'addGroup', { vm_id: (b.res.vm as { id: string }).id, group: 6 }), status.PERMISSION_DENIED, /principal tenant-b lacks the permission to call AddGroup/);
    await denied(callAs(A, 'createVm', { name: 'a-12', vmm_uid: 65534, vfio_device: true, groups: [12] }), status.PERMISSION_DENIED, /principal tenant-a may not use IOMMU group 12/);
    await denied(callAs(A, 'createVm', { name: 'a-root', vmm_uid: 0 }), status.PERMISSION_DENIED, /principal tenant-a may not name vmm_uid 0/);
    await denied(callAs(VIEWER, 'createVm', { name: 'v-1', vmm_uid: 1 }), status.PERMISSION_DENIED, /principal viewer lacks the permission to call CreateVm/);
    const info = await callAs(VIEWER, 'getHostInfo');
    assert.ok(info.ok);
    assert.equal((await d.client().getIommuGroup(12)).vm_id, '', 'a refused create claimed nothing');
  });

  test('quotas give RESOURCE_EXHAUSTED naming the limit and its value', async () => {
    // tenant-a holds a-1 (group 5): one more group passes limits.groups = 1; a third VM passes limits.vms = 2.
    await denied(callAs(A, 'createVm', { name: 'a-2', vmm_uid: 65534, vfio_device: true, groups: [7] }), status.RESOURCE_EXHAUSTED, /principal tenant-a holds 1 IOMMU groups; 1 more would pass its limit \(limits.groups\) of 1/);
    const second = await callAs(A, 'createVm', { name: 'a-2', vmm_uid: 65534 });
    assert.ok(second.ok, JSON.stringify(second));
    await denied(callAs(A, 'createVm', { name: 'a-3', vmm_uid: 65534 }), status.RESOURCE_EXHAUSTED, /principal tenant-a holds 2 VMs; its limit \(limits.vms\) is 2/);
  });

  test('every call is audited with uid, gid, pid and principal, allowed or denied', async () => {
    const line = await d.waitForLog((l) => l.event === 'call' && l.method === 'AddGroup' && l.uid === B);
    assert.equal(line.outcome, 'PERMISSION_DENIED');
    assert.equal(line.gid, B);
    assert.ok(typeof line.pid === 'number' && line.pid > 1);
    const ok = await d.waitForLog((l) => l.event === 'call' && l.method === 'CreateVm' && l.uid === A && l.outcome === 'OK');
    assert.equal(ok.principal, 'tenant-a');
  });

  test('SIGHUP: a broken policy keeps the old one (and says why); a good one applies to new calls', async () => {
    await writeFile(join(dir, 'policy.json'), '{"principals": [{"name": "x", "match": {}, "calls": ["Fly"]}]}');
    d.proc.kill('SIGHUP');
    const failed = await d.waitForLog((l) => l.event === 'policy-reload-failed');
    const problems = failed.problems as string[];
    assert.ok(problems.some((p) => /principals\[0\]\.calls\[0\]/.test(p)), problems.join('; '));
    assert.ok(problems.some((p) => /principals\[0\]\.match/.test(p)), problems.join('; '));
    assert.ok((await callAs(VIEWER, 'getHostInfo')).ok, 'the old policy still applies');

    const next = { principals: policy.principals.filter((p) => p.name !== 'viewer') };
    await writeFile(join(dir, 'policy.json'), JSON.stringify(next));
    d.proc.kill('SIGHUP');
    await until('reloaded', async () => d.logs.some((l) => l.event === 'policy-reloaded'));
    // The viewer is a stranger now: refused at accept.
    await denied(callAs(VIEWER, 'getHostInfo'), status.UNAVAILABLE, /connect/i);
    await d.waitForLog((l) => l.event === 'api-connection-refused' && l.uid === VIEWER && l.reason === 'no-principal');
    assert.ok((await callAs(A, 'listVms', {})).ok);
  });
});

describe('policy at start', () => {
  test('a daemon refuses to start on a policy that does not validate, naming where and what', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'kvmvfiod-policy-'));
    try {
      await writeFile(join(dir, 'policy.json'), '{"principals": [{"name": "a", "match": {"uids": [1]}, "calls": ["*"], "limits": {"vms": "lots"}}]}');
      await assert.rejects(startDaemon({ dir }), /principals\[0\]\.limits\.vms: Expected number, received string/);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
