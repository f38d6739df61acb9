/**
 * Who may do what, through a real daemon with a policy file: tenants apart,
 * missing permissions named, quotas, admins, and a reload that keeps the old
 * policy when the new file is broken. Calls are made as other uids (setpriv).
 */
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { mkdtemp, rm, writeFile, chmod } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { status } from '@grpc/grpc-js';
import { makeFakeHost, type FakeHost } from '../helpers/fakehost';
import { CLI_JS, REPO, startDaemon, type RunningDaemon } from '../helpers/daemon';
import { REFERENCE_VMM, collectJsonLines, runVmm } from '../helpers/vmmproc';
import { until } from '../helpers/assert';

const run = promisify(execFile);
const CALL_AS = join(REPO, 'dist', 'test', 'helpers', 'call-as.js');
const WATCH_AS = join(REPO, 'dist', 'test', 'helpers', 'watch-as.js');
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

/**
 * The holes of issue 12: names shaped like ids, VMs owned per principal,
 * memlock limits, WatchVms caps. One daemon; tenant-a has two uids.
 */
describe('policy: names, owners, memlock, watches', () => {
  const A2 = 1005;
  const holes = {
    principals: [
      { name: 'tenant-a', match: { uids: [A, A2] }, calls: ['*'], iommuGroups: 'all', vmmUids: [65534], limits: { memlockPerVmBytes: '4M', memlockBytes: '6M' } as Record<string, unknown> },
      { name: 'tenant-b', match: { uids: [B] }, calls: ['*'], iommuGroups: 'all', vmmUids: [65533] },
      { name: 'ops', match: { uids: [ADMIN] }, admin: true, calls: ['*'], vmmUids: 'any' },
    ],
  };
  let host: FakeHost;
  let dir: string;
  let d: RunningDaemon;

  const callAs = async (uid: number, method: string, req: unknown = {}): Promise<Outcome> => {
    const { stdout } = await run('setpriv', [`--reuid=${uid}`, `--regid=${uid}`, '--clear-groups', process.execPath, CALL_AS, d.apiSocket, method, JSON.stringify(req)]);
    return JSON.parse(stdout) as Outcome;
  };
  const created = async (uid: number, req: Record<string, unknown>): Promise<{ id: string; name: string; owner_uid: number }> => {
    const r = await callAs(uid, 'createVm', req);
    assert.ok(r.ok, `createVm as uid ${uid}: ${JSON.stringify(r)}`);
    return r.res.vm as { id: string; name: string; owner_uid: number };
  };
  const refused = async (o: Promise<Outcome>, code: status, re: RegExp): Promise<string> => {
    const r = await o;
    assert.equal(r.ok, false, `expected ${status[code]}, got ${JSON.stringify(r)}`);
    if (r.ok) return '';
    assert.equal(status[r.code], status[code], r.details);
    assert.match(r.details, re);
    return r.details;
  };
  /** kvmvfioctl as root; resolves with the exit status and output, never rejects. */
  const ctl = (...args: string[]) =>
    new Promise<{ code: number; stdout: string; stderr: string }>((resolve) =>
      execFile(process.execPath, [CLI_JS, '--socket', d.apiSocket, ...args], (err, stdout, stderr) =>
        resolve({ code: err ? Number((err as { code?: number }).code) : 0, stdout, stderr }),
      ),
    );
  const exists = async (id: string) => (await d.client().listAllVms()).some((v) => v.id === id);

  before(async () => {
    host = await makeFakeHost([5, 6].map((n) => ({ number: n, devices: [{ address: `0000:00:0${n}.0`, vendor: '8086', device: '10d3', class: '020000', driver: 'vfio-pci' }] })));
    dir = await mkdtemp(join(tmpdir(), 'kvmvfiod-holes-'));
    await chmod(dir, 0o755);
    await writeFile(join(dir, 'policy.json'), JSON.stringify(holes));
    d = await startDaemon({ dir, sysfs: host.sysfs, dev: host.dev, args: ['--max-watches-per-uid', '3'] });
  });

  after(async () => {
    await d?.cleanup();
    await host?.cleanup();
    await rm(dir, { recursive: true, force: true });
  });

  test("a VM cannot be named after another VM's id, so root's `vm delete <that>` cannot be turned on tenant B's VM", async () => {
    const b = await created(B, { name: 'b-web', vmm_uid: 65533 });
    // The attack: tenant A names its VM after B's id, hoping root deletes "A's VM" by name.
    await refused(callAs(A, 'createVm', { name: b.id, vmm_uid: 65534 }), status.INVALID_ARGUMENT, /^name: .* is shaped like a VM id/);
    await refused(callAs(A, 'createVm', { name: b.id.toUpperCase(), vmm_uid: 65534 }), status.INVALID_ARGUMENT, /^name: .* is shaped like a VM id/);
    const listed = await callAs(A, 'listVms', {});
    assert.ok(listed.ok);
    assert.deepEqual(listed.res.vms, [], 'the refused creates made nothing');
    // An id-shaped argument is only ever an id, in any case: root deletes exactly the VM of that id.
    const a = await created(A, { name: 'a-web', vmm_uid: 65534 });
    const del = await ctl('vm', 'delete', a.id.toUpperCase());
    assert.equal(del.code, 0, del.stderr);
    assert.equal(del.stdout, `deleted vm a-web (${a.id})\n`);
    assert.equal(await exists(a.id), false);
    assert.equal(await exists(b.id), true);
    // An unknown id is NOT_FOUND as an id; it is never looked up as a name.
    const ghost = '00000000-0000-4000-8000-000000000000';
    const get = await ctl('vm', 'get', ghost);
    assert.equal(get.code, 1);
    assert.equal(get.stderr, `kvmvfioctl: NOT_FOUND: vm ${ghost} not found\n`);
  });

  test('a name two owners use is ambiguous to root: the CLI lists the candidates with their owners and changes nothing', async () => {
    const a = await created(A, { name: 'shared', vmm_uid: 65534 });
    const b = await created(B, { name: 'shared', vmm_uid: 65533 });
    const del = await ctl('vm', 'delete', 'shared');
    assert.equal(del.code, 1);
    assert.match(del.stderr, /^kvmvfioctl: FAILED_PRECONDITION: 2 VMs you can see are named shared: /);
    assert.ok(del.stderr.includes(`${a.id} (principal tenant-a, owner uid ${A})`), del.stderr);
    assert.ok(del.stderr.includes(`${b.id} (principal tenant-b, owner uid ${B})`), del.stderr);
    assert.match(del.stderr, /give the id of the one you mean/);
    assert.equal(await exists(a.id), true);
    assert.equal(await exists(b.id), true);
    // Each tenant sees one VM of that name, and resolves it.
    const own = await ctl('--json', 'vm', 'get', b.id);
    assert.equal(JSON.parse(own.stdout).owner_uid, B);
    for (const vm of [a, b]) assert.equal((await ctl('vm', 'delete', vm.id)).code, 0);
  });

  test('a VM belongs to its principal: its other uid sees, changes and deletes it; another principal does not; the API and CLI name the principal', async () => {
    const vm = await created(A, { name: 'team', vmm_uid: 65534 });
    const got = await callAs(A2, 'getVm', vm.id);
    assert.ok(got.ok, JSON.stringify(got));
    assert.equal(got.res.principal, 'tenant-a');
    assert.equal(got.res.owner_uid, A);
    const listed = await callAs(A2, 'listVms', {});
    assert.ok(listed.ok);
    assert.deepEqual((listed.res.vms as { id: string }[]).map((v) => v.id), [vm.id]);
    // Names are the principal's: the other uid cannot take it again.
    await refused(callAs(A2, 'createVm', { name: 'team', vmm_uid: 65534 }), status.ALREADY_EXISTS, /vm team already exists/);
    await refused(callAs(B, 'getVm', vm.id), status.NOT_FOUND, /not found/);
    await refused(callAs(B, 'deleteVm', { vm_id: vm.id }), status.NOT_FOUND, /not found/);
    const shown = await ctl('vm', 'get', vm.id);
    assert.match(shown.stdout, /^principal: +tenant-a$/m);
    assert.match(shown.stdout, new RegExp(`^owner uid: +${A}$`, 'm'));
    const rootVm = await d.client().createVm({ name: 'by-root', vmm_uid: 0 });
    assert.equal(rootVm.vm?.principal, 'root');
    await refused(callAs(ADMIN, 'getVm', 'x'), status.INVALID_ARGUMENT, /^vm_id: /);
    assert.ok((await callAs(ADMIN, 'getVm', rootVm.vm!.id)).ok, 'an admin sees every VM');
    const del = await callAs(A2, 'deleteVm', { vm_id: vm.id });
    assert.ok(del.ok, JSON.stringify(del));
    assert.equal(await exists(vm.id), false);
    await d.client().deleteVm({ vm_id: rootVm.vm!.id });
  });

  test('memlock: a tenant cannot ask the host\'s RAM; per-VM and per-principal limits at CreateVm, and again at attach under a reloaded policy', async () => {
    const MiB = 1 << 20;
    // tenant-b has no memlock limits in the policy: as a non-admin it may ask none.
    await refused(callAs(B, 'createVm', { name: 'b-mem', vmm_uid: 65533, memlock_bytes: '4096' }), status.PERMISSION_DENIED, /^principal tenant-b may not give a VM memlock_bytes 4096; its per-VM limit \(limits.memlockPerVmBytes\) is 0$/);
    await refused(callAs(A, 'createVm', { name: 'a-ram', vmm_uid: 65534, memlock_bytes: String(8 * MiB) }), status.PERMISSION_DENIED, /its per-VM limit \(limits.memlockPerVmBytes\) is 4194304/);
    const m1 = await created(A, { name: 'm-1', vmm_uid: 65534, memlock_bytes: String(4 * MiB) });
    // The total is the principal's, whichever of its uids asks.
    await refused(
      callAs(A2, 'createVm', { name: 'm-2', vmm_uid: 65534, memlock_bytes: String(4 * MiB) }),
      status.RESOURCE_EXHAUSTED,
      /^principal tenant-a's live VMs ask 4194304 bytes of memlock; memlock_bytes 4194304 more would pass its limit \(limits.memlockBytes\) of 6291456$/,
    );
    const m2r = await callAs(A2, 'createVm', { name: 'm-2', vmm_uid: 65534, memlock_bytes: String(2 * MiB) });
    assert.ok(m2r.ok, JSON.stringify(m2r));
    const token = (m2r.res.attach_token as { token: string }).token;
    const m2 = m2r.res.vm as { id: string };
    assert.deepEqual(
      (await d.client().listAllVms()).filter((v) => v.name.startsWith('m-') || v.name.endsWith('-ram') || v.name === 'b-mem').map((v) => v.name).sort(),
      ['m-1', 'm-2'],
      'refused creates made nothing',
    );

    // SIGHUP lowers the per-VM limit under what m-2 asked: its VMM is refused at attach, the VM fails saying why.
    const lowered = structuredClone(holes);
    lowered.principals[0].limits = { memlockPerVmBytes: '1M', memlockBytes: '6M' };
    await writeFile(join(dir, 'policy.json'), JSON.stringify(lowered));
    const reloads = d.logs.filter((l) => l.event === 'policy-reloaded').length;
    d.proc.kill('SIGHUP');
    await until('reloaded', async () => d.logs.filter((l) => l.event === 'policy-reloaded').length > reloads);
    const v = runVmm([process.execPath, REFERENCE_VMM, '--socket', join(d.runtimeDir, 'handoff.sock')], token);
    const refusal = await v.waitFor('attach-refused');
    assert.equal(refusal.errno, 13, 'EACCES');
    assert.match(String(refusal.reason), /principal tenant-a may not give a VM memlock_bytes 2097152; its per-VM limit \(limits.memlockPerVmBytes\) is 1048576/);
    const failed = await d.client().getVm(m2.id);
    assert.equal(failed.state, 'VM_STATE_FAILED');
    assert.match(failed.failure_reason, /limits.memlockPerVmBytes\) is 1048576/);
    await v.exit;

    await writeFile(join(dir, 'policy.json'), JSON.stringify(holes));
    d.proc.kill('SIGHUP');
    await until('reloaded back', async () => d.logs.filter((l) => l.event === 'policy-reloaded').length > reloads + 1);
    for (const id of [m1.id, m2.id]) await d.client().deleteVm({ vm_id: id });
  });

  /** Opens `count` WatchVms streams as `uid`, one after another (see watch-as.ts), and holds them. */
  const watchAs = (uid: number, count: number, mode: 'read' | 'stall') =>
    collectJsonLines(
      spawn('setpriv', [`--reuid=${uid}`, `--regid=${uid}`, '--clear-groups', process.execPath, WATCH_AS, d.apiSocket, String(count), mode], { stdio: ['ignore', 'pipe', 'pipe'] }),
    );
  const outcomes = async (w: ReturnType<typeof watchAs>) => {
    await w.waitFor((e) => e.done === true, 20_000);
    return w.events.filter((e) => typeof e.stream === 'number');
  };

  test('WatchVms: at most --max-watches-per-uid streams per uid (uid 0 unlimited); one more is RESOURCE_EXHAUSTED naming the limit; a closed stream frees its place', async () => {
    const w = watchAs(A, 4, 'read');
    const got = await outcomes(w);
    assert.deepEqual(got.slice(0, 3).map((e) => e.synced), [true, true, true], JSON.stringify(got));
    assert.equal(got[3].code, status.RESOURCE_EXHAUSTED, JSON.stringify(got[3]));
    assert.equal(got[3].details, `uid ${A} has 3 WatchVms streams open; the limit per uid (--max-watches-per-uid) is 3 (a stream counts until its client has read it to its end or cancelled it)`);
    // The count is per uid: the principal's other uid has its own.
    const other = watchAs(A2, 1, 'read');
    assert.equal((await outcomes(other))[0].synced, true);
    // uid 0 is not limited.
    const stop = new AbortController();
    const rootStreams = Array.from({ length: 5 }, async () => {
      for await (const ev of d.client().watchVms({}, stop.signal)) if (ev.type === 'TYPE_SYNCED') return true;
      return false;
    });
    try {
      assert.deepEqual(await Promise.all(rootStreams), [true, true, true, true, true]);
    } finally {
      stop.abort();
    }
    // Its streams closed (the client is gone), uid A may watch again.
    w.kill();
    other.kill();
    await w.exit;
    await until('the closed streams to free their places', async () => {
      const again = watchAs(A, 3, 'read');
      try {
        return (await outcomes(again)).every((e) => e.synced === true);
      } finally {
        again.kill();
        await again.exit;
      }
    });
  });

  test("WatchVms: the opening snapshot counts against the caller's allowance of unsent events, across its streams", async () => {
    const c = d.client();
    // Enough VMs that the allowance (the larger of 4,096 and twice the VMs) is twice the VMs, and
    // events large enough (about 8 KB of labels) that little fits in the flow-control windows.
    const labels = Object.fromEntries(Array.from({ length: 32 }, (_, i) => [`k${i}`, 'v'.repeat(250)]));
    let next = 0;
    const total = 2100;
    await Promise.all(
      Array.from({ length: 8 }, async () => {
        while (next < total) await c.createVm({ name: `bulk-${next++}`, vmm_uid: 1, labels });
      }),
    );
    const vms = (await c.getHostInfo()).vm_count;
    const allowance = Math.max(4096, 2 * vms);
    // An admin (not uid 0) sees every VM: each snapshot is vms + 1 events. It reads one event of each
    // stream and no more. Two fit; the third does not, and is refused before anything is sent.
    const w = watchAs(ADMIN, 3, 'stall');
    try {
      const got = await outcomes(w);
      assert.deepEqual(got.slice(0, 2).map((e) => e.first), ['TYPE_EXISTING', 'TYPE_EXISTING'], JSON.stringify(got));
      assert.equal(got[2].code, status.RESOURCE_EXHAUSTED, JSON.stringify(got[2]));
      const m = /^the WatchVms streams of uid 1004 hold (\d+) events not yet taken by their clients; an opening snapshot of (\d+) more would pass the allowance of (\d+) unsent events per caller \(the larger of 4096 and twice the VMs\); read or close the other streams$/.exec(String(got[2].details));
      assert.ok(m, String(got[2].details));
      assert.equal(Number(m[2]), vms + 1);
      assert.equal(Number(m[3]), allowance);
      assert.ok(Number(m[1]) + vms + 1 > allowance);
      // Another caller is not held to this one's allowance.
      const other = watchAs(A, 1, 'read');
      assert.equal((await outcomes(other))[0].synced, true);
      other.kill();
    } finally {
      w.kill();
      await w.exit;
    }
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
