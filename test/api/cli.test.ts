/**
 * kvmvfioctl end to end: the built CLI (dist/src/cli/main.js) run as a child
 * process against a real daemon, asserting on what a user or a script sees:
 * stdout, stderr and the exit status.
 */
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { makeFakeHost, type FakeHost } from '../helpers/fakehost';
import { CLI_JS, REPO, startDaemon, type RunningDaemon } from '../helpers/daemon';

interface Run {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** Runs kvmvfioctl with `args`; never rejects, the caller asserts on the exit status. */
function ctl(args: readonly string[], env: NodeJS.ProcessEnv = {}): Promise<Run> {
  return new Promise((resolve) => {
    execFile(process.execPath, [CLI_JS, ...args], { env: { ...process.env, KVMVFIO_SOCKET: '', ...env }, timeout: 30_000 }, (err, stdout, stderr) => {
      // execFile's error carries the exit status as a number (or the signal).
      const code = err ? (typeof err.code === 'number' ? err.code : null) : 0;
      resolve({ code, signal: err?.signal ?? null, stdout, stderr });
    });
  });
}

function ok(r: Run, what: string): string {
  assert.equal(r.code, 0, `${what}: exit ${r.code} ${r.signal ?? ''}; stderr: ${r.stderr}`);
  assert.equal(r.stderr, '', `${what}: stderr`);
  return r.stdout;
}

/** The fields of each message in kvmvfio.proto, in proto order: --json prints exactly these. */
const VM_FIELDS = ['id', 'name', 'labels', 'state', 'owner_uid', 'vmm_uid', 'vfio_device', 'groups', 'memlock_bytes', 'request_id', 'create_time', 'update_time', 'failure_reason', 'revision', 'vmm_pid', 'passive_vmm', 'principal', 'stray_groups', 'vfio_handoff'];
const HOST_FIELDS = ['kernel_release', 'kvm_api_version', 'support', 'daemon_version', 'fd_limit_soft', 'fd_limit_hard', 'fds_open', 'vm_count', 'claimed_group_count', 'iommu_group_count', 'start_time'];
const SUPPORT_FIELDS = ['kvm_vfio_device', 'vfio_file_add', 'vfio_file_del', 'vfio_container', 'iommu_groups', 'probe_errors', 'iommufd', 'vfio_device_cdev'];
const GROUP_FIELDS = ['number', 'devices', 'viable', 'not_viable_reasons', 'vm_id', 'vm_name', 'open_in_daemon', 'holding', 'holders', 'stray_since'];
const DEVICE_FIELDS = ['address', 'vendor_id', 'device_id', 'class_code', 'driver', 'cdev'];

type Json = Record<string, unknown>;
const parse = (s: string): Json => JSON.parse(s) as Json;

const groups = [
  {
    number: 3,
    devices: [
      { address: '0000:01:00.0', vendor: '10de', device: '1eb8', class: '030200', driver: 'vfio-pci' },
      { address: '0000:01:00.1', vendor: '10de', device: '10f8', class: '040300', driver: 'vfio-pci' },
    ],
  },
  { number: 4, devices: [{ address: '0000:00:04.0', vendor: '1af4', device: '1041', class: '020000', driver: 'vfio-pci' }] },
  { number: 9, devices: [{ address: '0000:02:00.0', vendor: '8086', device: '1533', class: '020000', driver: 'igb' }] },
  { number: 12, devices: [{ address: '0000:03:00.0', vendor: '15b3', device: '101e', class: '020000' }] },
];

const packageVersion = (JSON.parse(readFileSync(join(REPO, 'package.json'), 'utf8')) as { version: string }).version;

describe('kvmvfioctl against a daemon with IOMMU groups', () => {
  let host: FakeHost;
  let d: RunningDaemon;
  /** kvmvfioctl --socket <the daemon's socket> ARGS */
  const run = (...args: string[]) => ctl(['--socket', d.apiSocket, ...args]);

  before(async () => {
    host = await makeFakeHost(groups);
    d = await startDaemon({ sysfs: host.sysfs, dev: host.dev });
  });

  after(async () => {
    await d?.cleanup();
    await host?.cleanup();
  });

  test('info --json is the HostInfo message, field for field', async () => {
    const h = parse(ok(await run('info', '--json'), 'info --json'));
    assert.deepEqual(Object.keys(h), HOST_FIELDS);
    assert.equal(h.kvm_api_version, 12);
    assert.equal(h.daemon_version, packageVersion);
    assert.equal(h.iommu_group_count, 4);
    assert.equal(h.vm_count, 0);
    // uint64 fields are decimal strings, as in the proto3 JSON mapping.
    assert.match(String(h.fds_open), /^[1-9][0-9]*$/);
    assert.equal(typeof h.fds_open, 'string');
    const support = h.support as Json;
    assert.deepEqual(Object.keys(support), SUPPORT_FIELDS);
    assert.equal(support.iommu_groups, true);
    assert.equal(support.kvm_vfio_device, true);
  });

  test('info prints key: value lines', async () => {
    const out = ok(await run('info'), 'info');
    assert.match(out, /^kvm api version: +12$/m);
    assert.match(out, new RegExp(`^daemon version: +${packageVersion.replace(/\./g, '\\.')}$`, 'm'));
    assert.match(out, /^iommu groups: +4$/m);
    // Every value starts in the same column.
    const cols = out.trimEnd().split('\n').map((l) => /^[^:]+: +/.exec(l)?.[0].length);
    assert.ok(cols.every((c) => c !== undefined && c === cols[0]), `values not aligned:\n${out}`);
  });

  test('groups prints an aligned table, one row per device', async () => {
    const out = ok(await run('groups'), 'groups');
    const lines = out.trimEnd().split('\n');
    assert.match(lines[0], /^GROUP +VIABLE +VM +DEVICES$/);
    assert.equal(lines.length, 1 + 5, out);
    const devCol = lines[0].indexOf('DEVICES');
    assert.match(lines[1], /^3 +yes +- +0000:01:00\.0 10de:1eb8 vfio-pci$/);
    // The second device of group 3 continues under DEVICES with blank group columns.
    assert.equal(lines[2].trimStart(), '0000:01:00.1 10de:10f8 vfio-pci');
    assert.match(lines[3], /^4 +yes +- +0000:00:04\.0 1af4:1041 vfio-pci$/);
    assert.match(lines[4], /^9 +no +- +0000:02:00\.0 8086:1533 igb$/);
    assert.match(lines[5], /^12 +yes +- +0000:03:00\.0 15b3:101e -$/, 'a device with no driver shows -');
    for (const l of lines.slice(1)) assert.equal(l.indexOf('0000:'), devCol, `misaligned: ${JSON.stringify(l)}`);
  });

  test('groups --json is the ListIommuGroupsResponse; groups N shows one group', async () => {
    const res = parse(ok(await run('--json', 'groups'), 'groups --json'));
    assert.deepEqual(Object.keys(res), ['groups']);
    const gs = res.groups as Json[];
    assert.deepEqual(gs.map((g) => g.number), [3, 4, 9, 12]);
    for (const g of gs) assert.deepEqual(Object.keys(g), GROUP_FIELDS);
    const g9 = gs[2];
    assert.equal(g9.viable, false);
    assert.deepEqual(g9.not_viable_reasons, ['0000:02:00.0 is bound to igb; bind 0000:02:00.0 to vfio-pci']);
    const dev = (gs[0].devices as Json[])[1];
    assert.deepEqual(Object.keys(dev), DEVICE_FIELDS);
    assert.deepEqual(dev, { address: '0000:01:00.1', vendor_id: '10de', device_id: '10f8', class_code: '040300', driver: 'vfio-pci', cdev: '' });

    const one = parse(ok(await run('groups', '12', '--json'), 'groups 12 --json'));
    assert.deepEqual(Object.keys(one), GROUP_FIELDS);
    assert.equal(one.number, 12);
    assert.equal((one.devices as Json[])[0].driver, '');

    const human = ok(await run('groups', '9'), 'groups 9');
    assert.match(human, /^group: +9$/m);
    assert.match(human, /^viable: +no$/m);
    assert.match(human, /^not viable: +0000:02:00\.0 is bound to igb; bind 0000:02:00\.0 to vfio-pci$/m);
  });

  test('vm create with groups, then vm list and vm get by name', async () => {
    const created = await run('vm', 'create', 'web-1', '--vmm-uid', '1000', '--vfio-device', '--group', '4', '--group', '3', '--label', 'app=web', '--label', 'tier=front', '--memlock', '2G', '--request-id', 'req-1', '--json');
    const res = parse(ok(created, 'vm create'));
    assert.deepEqual(Object.keys(res), ['vm', 'attach_token']);
    const token = res.attach_token as Json;
    assert.deepEqual(Object.keys(token), ['token', 'expire_time']);
    assert.ok(String(token.token).length >= 16, 'an attach token');
    const vm = res.vm as Json;
    assert.deepEqual(Object.keys(vm), VM_FIELDS);
    assert.match(String(vm.id), /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/);
    assert.equal(vm.state, 'VM_STATE_PENDING');
    assert.deepEqual(vm.groups, [3, 4]);
    assert.deepEqual(vm.labels, { app: 'web', tier: 'front' });
    assert.equal(vm.memlock_bytes, String(2 * 1024 ** 3));
    assert.equal(vm.vmm_uid, 1000);
    assert.equal(vm.request_id, 'req-1');

    const list = ok(await run('vm', 'list'), 'vm list').trimEnd().split('\n');
    assert.match(list[0], /^ID +NAME +STATE +VMM UID +VFIO +GROUPS +LABELS +(AGE|CREATED)$/);
    assert.equal(list.length, 2);
    const row = list[1];
    assert.match(row, new RegExp(`^${String(vm.id)} +web-1 +PENDING +1000 +yes +3,4 +app=web,tier=front +\\d+s$`));
    assert.equal(row.indexOf('web-1'), list[0].indexOf('NAME'));
    assert.equal(row.indexOf('PENDING'), list[0].indexOf('STATE'));

    const get = ok(await run('vm', 'get', 'web-1'), 'vm get');
    assert.match(get, new RegExp(`^id: +${String(vm.id)}$`, 'm'));
    assert.match(get, /^state: +PENDING$/m, 'the VM_STATE_ prefix is for machines');
    assert.match(get, /^groups: +3,4$/m);
    assert.match(get, /^memlock: +2147483648 \(2 GiB\)$/m);
    assert.doesNotMatch(get, /VM_STATE_/);

    // A fresh token replaces the one CreateVm gave.
    const fresh = parse(ok(await run('vm', 'token', 'web-1', '--json'), 'vm token'));
    assert.deepEqual(Object.keys(fresh), ['token', 'expire_time']);
    assert.notEqual(fresh.token, token.token);
    assert.match(ok(await run('vm', 'token', 'web-1'), 'vm token'), /^attach token: +\S{16,}\ntoken expires: +\d{4}-/);

    const byId = parse(ok(await run('vm', 'get', String(vm.id), '--json'), 'vm get id --json'));
    assert.deepEqual(byId, vm);

    // The group table now names the holder.
    assert.match(ok(await run('groups'), 'groups'), /^3 +yes +web-1 +0000:01:00\.0/m);

    // Filters: labels must all match, states any.
    assert.deepEqual((parse(ok(await run('vm', 'list', '--json', '--label', 'app=web', '--state', 'pending'), 'list')).vms as Json[]).map((v) => v.name), ['web-1']);
    assert.deepEqual(parse(ok(await run('vm', 'list', '--json', '--label', 'app=db'), 'list')).vms, []);
    assert.deepEqual(parse(ok(await run('vm', 'list', '--json', '--state', 'running', '--state', 'exited'), 'list')).vms, []);
    assert.equal(ok(await run('vm', 'list', '--state', 'failed'), 'list'), 'No VMs match.\n');
  });

  test('vm args --vmm qemu: the arguments with attach\'s placeholders; a --cdev VM\'s monitor and root ports; refused for a VM with groups', async () => {
    ok(await run('vm', 'create', 'qemu-vm', '--vmm-uid', '65534'), 'vm create qemu-vm');
    assert.equal(ok(await run('vm', 'args', 'qemu-vm', '--vmm', 'qemu'), 'vm args'), '-add-fd fd={kvm},set=1,opaque=kvmvfiod-kvm -accel kvm,device=/dev/fdset/1\n');
    assert.deepEqual(JSON.parse(ok(await run('--json', 'vm', 'args', 'qemu-vm', '--vmm', 'qemu'), 'vm args --json')), {
      args: ['-add-fd', 'fd={kvm},set=1,opaque=kvmvfiod-kvm', '-accel', 'kvm,device=/dev/fdset/1'],
    });
    const usage = await run('vm', 'args', 'qemu-vm');
    assert.equal(usage.code, 2);
    assert.match(usage.stderr, /vm args needs --vmm qemu/);
    const other = await run('vm', 'args', 'qemu-vm', '--vmm', 'firecracker');
    assert.equal(other.code, 2);
    const free = (JSON.parse(ok(await run('--json', 'groups'), 'groups')) as { groups: { number: number; viable: boolean; vm_id: string }[] }).groups.find((g) => g.viable && !g.vm_id);
    assert.ok(free, 'a free viable group');
    ok(await run('vm', 'create', 'qemu-groups', '--vmm-uid', '65534', '--vfio-device', '--group', String(free.number)), 'vm create qemu-groups');
    const refused = await run('vm', 'args', 'qemu-groups', '--vmm', 'qemu');
    assert.equal(refused.code, 1);
    assert.match(refused.stderr, new RegExp(`^kvmvfioctl: FAILED_PRECONDITION: vm qemu-groups has IOMMU groups ${free.number} handed over as group files: QEMU takes a VFIO device from outside only as a device cdev fd`));
    // A --cdev VM: its iommufd, the daemon's monitor ({qmp}) and spare root ports for hot-plug.
    ok(await run('vm', 'create', 'qemu-cdev', '--vmm-uid', '65534', '--cdev'), 'vm create qemu-cdev');
    assert.equal(
      ok(await run('vm', 'args', 'qemu-cdev', '--vmm', 'qemu', '--hotplug-ports', '1'), 'vm args --hotplug-ports 1'),
      '-add-fd fd={kvm},set=1,opaque=kvmvfiod-kvm -accel kvm,device=/dev/fdset/1 -object iommufd,id=kvmvfiod-iommufd,fd={iommufd} -chardev socket,id=kvmvfiod-qmp,fd={qmp} -mon chardev=kvmvfiod-qmp,mode=control -device pcie-root-port,id=kvmvfiod-port-1,chassis=201,slot=1\n',
    );
    assert.equal((JSON.parse(ok(await run('--json', 'vm', 'args', 'qemu-cdev', '--vmm', 'qemu'), 'vm args default ports')) as { args: string[] }).args.filter((a) => a.startsWith('pcie-root-port')).length, 4);
    for (const bad of ['x', '1.5', '256']) {
      const r = await run('vm', 'args', 'qemu-cdev', '--vmm', 'qemu', '--hotplug-ports', bad);
      assert.equal(r.code, 2, bad);
      assert.match(r.stderr, /--hotplug-ports: a number from 0 to 255/);
    }
    for (const name of ['qemu-vm', 'qemu-groups', 'qemu-cdev']) ok(await run('vm', 'delete', name), `vm delete ${name}`);
  });

  test('vm vfio-device, add-group and remove-group change a PENDING VM', async () => {
    const made = ok(await run('vm', 'create', 'db', '--vmm-uid', '0'), 'vm create db');
    // People get the VM and the token its VMM needs, in one aligned block.
    assert.match(made, /^name: +db$/m);
    assert.match(made, /^attach token: +\S{16,}$/m);
    const cols = made.trimEnd().split('\n').map((l) => /^[^:]+: +/.exec(l)?.[0].length);
    assert.ok(cols.every((c) => c === cols[0]), `not aligned:\n${made}`);
    // No KVM-VFIO device yet: the daemon refuses groups.
    const early = await run('vm', 'add-group', 'db', '12');
    assert.equal(early.code, 1);
    assert.match(early.stderr, /^kvmvfioctl: FAILED_PRECONDITION: .*no KVM-VFIO device/);

    assert.match(ok(await run('vm', 'vfio-device', 'db'), 'vfio-device'), /^vm db: KVM-VFIO device planned/);
    const twice = await run('vm', 'vfio-device', 'db');
    assert.equal(twice.code, 1);
    assert.match(twice.stderr, /^kvmvfioctl: ALREADY_EXISTS: /);

    assert.equal(ok(await run('vm', 'add-group', 'db', '12'), 'add-group'), 'vm db: IOMMU group 12 added; groups now 12\n');
    const added = parse(ok(await run('vm', 'get', 'db', '--json'), 'get'));
    assert.deepEqual(added.groups, [12]);
    assert.equal(added.vfio_device, true);
    assert.equal(parse(ok(await run('groups', '12', '--json'), 'groups 12')).vm_name, 'db');

    const held = await run('vm', 'add-group', 'db', '3');
    assert.equal(held.code, 1);
    assert.match(held.stderr, /^kvmvfioctl: FAILED_PRECONDITION: IOMMU group 3 is held by vm web-1/);
    const notViable = await run('vm', 'add-group', 'db', '9');
    assert.equal(notViable.code, 1);
    assert.match(notViable.stderr, /bound to igb/);

    const removed = parse(ok(await run('--json', 'vm', 'remove-group', 'db', '12'), 'remove-group'));
    assert.deepEqual(Object.keys(removed), VM_FIELDS);
    assert.deepEqual(removed.groups, []);
    assert.equal(parse(ok(await run('groups', '12', '--json'), 'groups 12')).vm_name, '');
    const again = await run('vm', 'remove-group', 'db', '12');
    assert.equal(again.code, 1);
    assert.match(again.stderr, /^kvmvfioctl: NOT_FOUND: IOMMU group 12 is not in vm db/);
  });

  test('vm delete by name removes the VM and frees its groups', async () => {
    ok(await run('vm', 'create', 'gone', '--vmm-uid', '7', '--vfio-device', '--group', '12'), 'create');
    const id = String((parse(ok(await run('vm', 'get', 'gone', '--json'), 'get')) as Json).id);
    assert.equal(ok(await run('vm', 'delete', 'gone'), 'delete'), `deleted vm gone (${id})\n`);
    const after = await run('vm', 'get', 'gone');
    assert.equal(after.code, 1);
    assert.match(after.stderr, /NOT_FOUND/);
    assert.equal(parse(ok(await run('groups', '12', '--json'), 'groups 12')).vm_id, '');
    assert.ok(!(parse(ok(await run('vm', 'list', '--json'), 'list')).vms as Json[]).some((v) => v.name === 'gone'));
  });

  test('vm watch --json prints one event per line and sees a VM created while it runs', async () => {
    const watch = spawn(process.execPath, [CLI_JS, '--socket', d.apiSocket, 'vm', 'watch', '--json', '--label', 'team=a'], { stdio: ['ignore', 'pipe', 'pipe'] });
    const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => watch.once('exit', (code, signal) => resolve({ code, signal })));
    const events: Json[] = [];
    let buf = '';
    let stderr = '';
    let wake = () => {};
    watch.stdout.setEncoding('utf8').on('data', (chunk: string) => {
      buf += chunk;
      let i;
      while ((i = buf.indexOf('\n')) >= 0) {
        events.push(parse(buf.slice(0, i)));
        buf = buf.slice(i + 1);
      }
      wake();
    });
    watch.stderr.setEncoding('utf8').on('data', (c: string) => (stderr += c));
    const waitFor = (pred: (e: Json) => boolean, what: string) =>
      new Promise<Json>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`no ${what} event in 10 s; events: ${JSON.stringify(events)}; stderr: ${stderr}`)), 10_000);
        wake = () => {
          const hit = events.find(pred);
          if (hit) {
            clearTimeout(timer);
            resolve(hit);
          }
        };
        wake();
      });
    try {
      await waitFor((e) => e.type === 'TYPE_SYNCED', 'SYNCED');
      assert.deepEqual(Object.keys(events[events.length - 1]), ['type', 'vm']);
      // A VM outside the filter first, then one inside: only the second may show.
      ok(await run('vm', 'create', 'other', '--vmm-uid', '0', '--label', 'team=b'), 'create other');
      ok(await run('vm', 'create', 'watched', '--vmm-uid', '0', '--label', 'team=a'), 'create watched');
      const ev = await waitFor((e) => e.type === 'TYPE_CREATED', 'CREATED');
      const vm = ev.vm as Json;
      assert.equal(vm.name, 'watched');
      assert.deepEqual(Object.keys(vm), VM_FIELDS);
      assert.equal(vm.state, 'VM_STATE_PENDING');
      assert.ok(!events.some((e) => (e.vm as Json | null)?.name === 'other'), 'the label filter let another VM through');
      assert.equal(watch.exitCode, null, 'the watch ended by itself');
      watch.kill('SIGTERM');
      const end = await exited;
      assert.equal(end.code, 0, `watch exit after SIGTERM: ${JSON.stringify(end)}; stderr: ${stderr}`);
      assert.equal(stderr, '');
    } finally {
      if (watch.exitCode === null && watch.signalCode === null) {
        watch.kill('SIGKILL');
        await exited;
      }
    }
  });

  test('vm watch prints human lines without the VM_STATE_ prefix', async () => {
    const watch = spawn(process.execPath, [CLI_JS, '--socket', d.apiSocket, 'vm', 'watch', '--state', 'pending'], { stdio: ['ignore', 'pipe', 'pipe'] });
    const exited = new Promise<number | null>((resolve) => watch.once('exit', (code) => resolve(code)));
    let out = '';
    try {
      await new Promise<void>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`no SYNCED line in 10 s: ${out}`)), 10_000);
        watch.stdout.setEncoding('utf8').on('data', (c: string) => {
          out += c;
          if (/^SYNCED/m.test(out)) {
            clearTimeout(timer);
            resolve();
          }
        });
      });
      watch.kill('SIGINT');
      assert.equal(await exited, 0);
      // The VMs left from the tests above (web-1, db, other, watched) come first as EXISTING.
      assert.match(out, /^EXISTING +web-1 [0-9a-f-]{36} PENDING vfio=yes groups=3,4 /m);
      assert.match(out, /^EXISTING +db [0-9a-f-]{36} PENDING vfio=yes groups=- /m);
      assert.doesNotMatch(out, /VM_STATE_/);
    } finally {
      if (watch.exitCode === null && watch.signalCode === null) {
        watch.kill('SIGKILL');
        await exited;
      }
    }
  });

  test('a failed call exits 1 with the status name on stderr, or a JSON error with --json', async () => {
    const byName = await run('vm', 'get', 'no-such-vm');
    assert.equal(byName.code, 1);
    assert.equal(byName.stdout, '');
    assert.equal(byName.stderr, 'kvmvfioctl: NOT_FOUND: no VM named no-such-vm\n');

    const missingId = '00000000-0000-4000-8000-000000000000';
    const byId = await run('--json', 'vm', 'delete', missingId);
    assert.equal(byId.code, 1);
    assert.equal(byId.stdout, '');
    const err = parse(byId.stderr.trim());
    assert.deepEqual(Object.keys(err), ['error']);
    assert.equal((err.error as Json).code, 'NOT_FOUND');
    assert.match(String((err.error as Json).message), new RegExp(missingId));

    const group = await run('groups', '99');
    assert.equal(group.code, 1);
    assert.equal(group.stderr, 'kvmvfioctl: NOT_FOUND: IOMMU group 99 does not exist on this host\n');

    const bad = await run('vm', 'create', 'Not_A_Label', '--vmm-uid', '0');
    assert.equal(bad.code, 1);
    assert.match(bad.stderr, /^kvmvfioctl: INVALID_ARGUMENT: name: /);
  });

  test('usage errors exit 2 with a short usage and send nothing', async () => {
    const cases: [string[], RegExp][] = [
      [['frobnicate'], /unknown command frobnicate/],
      [['toString'], /unknown command toString/],
      [['vm', 'constructor'], /unknown command vm constructor/],
      [['vm', 'create', 'dup-label', '--vmm-uid', '0', '--label', 'a=1', '--label', 'a=2'], /--label a given twice/],
      [[], /missing command/],
      [['vm'], /missing vm subcommand/],
      [['vm', 'create', 'bad-group', '--vmm-uid', '0', '--vfio-device', '--group', '1a'], /--group: "1a" is not a non-negative integer/],
      [['vm', 'create', 'neg-group', '--vmm-uid', '0', '--vfio-device', '--group=-1'], /--group: "-1" is not a non-negative integer/],
      [['vm', 'create', 'huge-group', '--vmm-uid', '0', '--vfio-device', '--group', '4294967296'], /--group: 4294967296 is larger than 4294967295/],
      [['vm', 'create', 'no-uid'], /--vmm-uid UID is required/],
      [['vm', 'create', 'uid-x', '--vmm-uid', '0x10'], /--vmm-uid: "0x10" is not a non-negative integer/],
      [['vm', 'create', 'no-device', '--vmm-uid', '0', '--group', '4'], /--group needs --vfio-device/],
      [['vm', 'create', 'mem', '--vmm-uid', '0', '--memlock', '2GB'], /--memlock: "2GB" is not a size/],
      [['vm', 'create', 'lbl', '--vmm-uid', '0', '--label', 'novalue'], /--label "novalue": expected KEY=VALUE/],
      [['vm', 'add-group', 'db'], /missing GROUP/],
      [['vm', 'add-group', 'db', '1.5'], /GROUP: "1.5" is not a non-negative integer/],
      [['groups', '1a'], /GROUP: "1a" is not a non-negative integer/],
      [['vm', 'get', 'db', '--force'], /vm get does not take --force/],
      [['vm', 'list', '--state', 'sleeping'], /--state "sleeping": expected one of pending, running, exited, failed/],
      [['--timeout', 'soon', 'info'], /--timeout: "soon" is not a non-negative integer/],
      [['info', '--bogus'], /Unknown option '--bogus'/],
    ];
    for (const [args, message] of cases) {
      const r = await run(...args);
      assert.equal(r.code, 2, `${args.join(' ')}: exit ${r.code}; stderr: ${r.stderr}`);
      assert.equal(r.stdout, '', args.join(' '));
      assert.match(r.stderr, /^kvmvfioctl: /, args.join(' '));
      assert.match(r.stderr, message, args.join(' '));
      assert.match(r.stderr, /^Usage:/m, args.join(' '));
    }
    // The synopsis shown is the command's own.
    assert.match((await run('vm', 'add-group', 'db')).stderr, /^Usage: kvmvfioctl vm add-group VM GROUP$/m);
    const names = (parse(ok(await run('vm', 'list', '--json'), 'list')).vms as Json[]).map((v) => v.name);
    for (const n of ['dup-label', 'bad-group', 'neg-group', 'huge-group', 'no-uid', 'uid-x', 'no-device', 'mem', 'lbl']) assert.ok(!names.includes(n), `${n} was created`);
  });

  test('the socket comes from --socket, else KVMVFIO_SOCKET; global flags go anywhere', async () => {
    const viaEnv = await ctl(['info', '--json'], { KVMVFIO_SOCKET: d.apiSocket });
    assert.equal(parse(ok(viaEnv, 'env socket')).kvm_api_version, 12);
    const flagWins = await ctl(['vm', 'list', '--socket', d.apiSocket, '--json'], { KVMVFIO_SOCKET: join(d.dir, 'wrong.sock') });
    assert.ok(Array.isArray(parse(ok(flagWins, 'flag wins')).vms));
  });

  test('--version and --help', async () => {
    assert.equal(ok(await ctl(['--version']), 'version'), `kvmvfioctl ${packageVersion}\n`);
    const help = ok(await ctl(['vm', 'list', '--help']), 'help');
    for (const c of ['info', 'groups [GROUP]', 'vm create NAME --vmm-uid UID', 'vm watch', 'vm add-group VM GROUP', '--socket PATH', 'KVMVFIO_SOCKET']) assert.ok(help.includes(c), `help lacks ${c}`);
  });
});

describe('kvmvfioctl without IOMMU groups or without a daemon', () => {
  let d: RunningDaemon | undefined;
  let scratch: string | undefined;

  after(async () => {
    await d?.cleanup();
    if (scratch) await rm(scratch, { recursive: true, force: true });
  });

  test('groups says the host has no IOMMU groups instead of printing an empty table', async (t) => {
    const real = await readdir('/sys/kernel/iommu_groups').catch(() => []);
    if (real.length) {
      t.skip('this host has IOMMU groups');
      return;
    }
    d = await startDaemon();
    const human = await ctl(['--socket', d.apiSocket, 'groups']);
    const out = ok(human, 'groups');
    assert.match(out, /no IOMMU groups/);
    assert.match(out, /intel_iommu=on/);
    assert.match(out, /amd_iommu/);
    assert.doesNotMatch(out, /GROUP +VIABLE/);
    assert.deepEqual(parse(ok(await ctl(['--socket', d.apiSocket, 'groups', '--json']), 'groups --json')), { groups: [] });
  });

  test('a missing daemon socket is named in the error', async () => {
    scratch = await mkdtemp(join(tmpdir(), 'kvmvfioctl-test-'));
    const sock = join(scratch, 'absent', 'api.sock');
    const r = await ctl(['--socket', sock, 'info']);
    assert.equal(r.code, 1);
    assert.equal(r.stdout, '');
    assert.match(r.stderr, /^kvmvfioctl: UNAVAILABLE: /);
    assert.ok(r.stderr.includes(sock), r.stderr);

    const viaEnv = await ctl(['--json', 'vm', 'list'], { KVMVFIO_SOCKET: sock });
    assert.equal(viaEnv.code, 1);
    const err = parse(viaEnv.stderr.trim()).error as Json;
    assert.equal(err.code, 'UNAVAILABLE');
    assert.ok(String(err.message).includes(sock), String(err.message));
  });
});

describe('kvmvfioctl policy check', () => {
  test("prints each principal's limits with the defaults applied, memlock included; a bad limit is named", async () => {
    const dir = await mkdtemp(join(tmpdir(), 'kvmvfioctl-policy-'));
    try {
      const file = join(dir, 'policy.json');
      const principals = [
        { name: 'tenant', match: { uids: [1000] }, calls: ['*'], limits: { vms: 5, memlockPerVmBytes: '2G', memlockBytes: 8 * 2 ** 30 } },
        { name: 'plain', match: { uids: [1001] }, calls: ['*'] },
        { name: 'ops', match: { uids: [1002] }, calls: ['*'], admin: true },
      ];
      await writeFile(file, JSON.stringify({ principals }));
      const out = ok(await ctl(['policy', 'check', file]), 'policy check');
      assert.equal(
        out,
        `${file}: valid, 3 principal(s)\n` +
          '  tenant: vms 5, groups 64, pendingTokens 100, memlockPerVmBytes 2147483648, memlockBytes 8589934592\n' +
          '  plain: vms 100, groups 64, pendingTokens 100, memlockPerVmBytes 0, memlockBytes 0\n' +
          '  ops (admin): vms 100, groups 64, pendingTokens 100, memlockPerVmBytes unlimited, memlockBytes unlimited\n',
      );
      const json = parse(ok(await ctl(['policy', 'check', file, '--json']), 'policy check --json'));
      assert.equal(json.ok, true);
      assert.deepEqual((json.effective as Json[])[1], { name: 'plain', admin: false, limits: { vms: 100, groups: 64, pendingTokens: 100, memlockPerVmBytes: 0, memlockBytes: 0 } });
      assert.deepEqual(((json.effective as Json[])[2].limits as Json).memlockBytes, 'unlimited');

      await writeFile(file, JSON.stringify({ principals: [{ ...principals[0], limits: { memlockBytes: '1 TB' } }, { name: 'Root', match: { uids: [5] }, calls: ['*'] }] }));
      const bad = await ctl(['policy', 'check', file]);
      assert.equal(bad.code, 1);
      assert.match(bad.stdout, /principals\[0\]\.limits\.memlockBytes: "1 TB" is not a size/);
      assert.match(bad.stdout, /principals\[1\]\.name: "root" is the built-in principal of uid 0/);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
