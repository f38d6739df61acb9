/**
 * `kvmvfioctl attach` end to end: a real daemon with a fake host, the built
 * CLI run as uid 65534, and test/helpers/fdcheck.js as the VMM it execs,
 * which reports what it inherited. Asserts what the exec'd VMM gets (fds,
 * environment, pid), what the daemon makes of a passive VMM, and the exit
 * statuses of refusals, usage errors and exec failures.
 */
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, execFileSync, spawn } from 'node:child_process';
import { chmodSync, mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { status } from '@grpc/grpc-js';
import { type KvmVfioApi } from '../../src/client/client';
import { SeqpacketListener } from '../../src/kernel';
import { makeFakeHost, type FakeHost } from '../helpers/fakehost';
import { CLI_JS, REPO, startDaemon, type RunningDaemon } from '../helpers/daemon';
import { NOBODY, type VmmProc, collectJsonLines } from '../helpers/vmmproc';
import { expectStatus, until } from '../helpers/assert';

const FDCHECK = join(REPO, 'dist', 'test', 'helpers', 'fdcheck.js');
const NOBODY_UID = 65534;
const vfioGroup = (n: number) => ({ number: n, devices: [{ address: `0000:00:${String(n).padStart(2, '0')}.0`, vendor: '8086', device: '10d3', class: '020000', driver: 'vfio-pci' }] });

type Json = Record<string, unknown>;
type Attached = VmmProc;

const running: Attached[] = [];
const EXTRA_FD = 40;

/**
 * `setpriv --reuid=65534 ... node kvmvfioctl attach ARGS` with `env` added to
 * a clean environment (no KVMVFIO_* of the test's own) and a PATH in which
 * `-- node ...` is found by the exec's PATH search. With `extraFd`
 * the child also gets an fd EXTRA_FD without close-on-exec, as a caller
 * passing a tap fd would (high, past a gap: Node's startup marks fds 0, 1,
 * 2, 3... close-on-exec up to the first gap, so a low one would never reach
 * kvmvfioctl's own code).
 */
function attach(args: readonly string[], env: Record<string, string> = {}, extraFd = false): Attached {
  const base: NodeJS.ProcessEnv = { ...process.env };
  for (const k of Object.keys(base)) if (k.startsWith('KVMVFIO')) delete base[k];
  const argv = [...NOBODY, process.execPath, CLI_JS, 'attach', ...args];
  const proc = spawn(argv[0], argv.slice(1), {
    stdio: ['ignore', 'pipe', 'pipe', ...(extraFd ? [...Array<'ignore'>(EXTRA_FD - 3).fill('ignore'), 'pipe' as const] : [])],
    // Only directories uid 65534 may search: execvp reports EACCES, not ENOENT, after one it may not.
    env: { ...base, PATH: `${dirname(process.execPath)}:/usr/bin:/bin`, ...env },
  });
  const a: Attached = collectJsonLines(proc);
  running.push(a);
  return a;
}



/** fds of this test process without close-on-exec: every child it spawns inherits them. */
function inheritedHere(): number[] {
  const out: number[] = [];
  for (const name of readdirSync('/proc/self/fd')) {
    try {
      const m = /^flags:\s+([0-7]+)$/m.exec(readFileSync(`/proc/self/fdinfo/${name}`, 'utf8'));
      if (m && !(parseInt(m[1], 8) & 0o2000000) && Number(name) > 2) out.push(Number(name));
    } catch {
      /* readdir's own fd */
    }
  }
  return out;
}

after(async () => {
  for (const a of running) if (a.proc.exitCode === null && a.proc.signalCode === null) a.proc.kill('SIGKILL');
  await Promise.all(running.map((a) => a.exit));
});

describe('kvmvfioctl attach with a VFIO container', () => {
  let host: FakeHost;
  let d: RunningDaemon;
  let c: KvmVfioApi;
  let handoff: string;
  /** A token spent by the first test, for the refusal test. */
  let spentToken = '';

  before(async () => {
    host = await makeFakeHost([vfioGroup(12), vfioGroup(13), vfioGroup(14), vfioGroup(15), vfioGroup(16), { ...vfioGroup(17), devices: [{ ...vfioGroup(17).devices[0], cdev: 'vfio7' }] }], {
      vfioContainer: true,
      iommufd: true,
    });
    d = await startDaemon({ sysfs: host.sysfs, dev: host.dev });
    c = d.client();
    handoff = join(d.runtimeDir, 'handoff.sock');
  });

  after(async () => {
    await d?.cleanup();
    await host?.cleanup();
  });

  test('the exec\'d VMM keeps the pid and gets its fds; the VM is RUNNING, passive, and ends when it exits', async () => {
    const { vm, attach_token } = await c.createVm({ name: 'passive-1', vmm_uid: NOBODY_UID, vfio_device: true, groups: [12] });
    assert.ok(vm && attach_token);
    spentToken = attach_token.token;
    const a = attach(['--handoff', handoff, '--', 'node', FDCHECK], { KVMVFIO_TOKEN: attach_token.token });
    const ev = await a.waitFor('fds');

    assert.deepEqual(ev.problems, [], JSON.stringify(ev));
    assert.equal(ev.uid, NOBODY_UID);
    assert.equal(ev.pid, a.pid, 'the VMM runs in the process that attached (exec kept the pid)');
    assert.equal(ev.kvmApi, 12);
    const fds = ev.fds as Record<string, number>;
    assert.deepEqual(Object.keys(fds), ['kvm', 'vfio-container', 'group-12', 'session']);
    assert.match(String(ev.spec), /^kvm:\d+,vfio-container:\d+,group-12:\d+,session:\d+$/);
    assert.equal(ev.sessionIsSocket, true);
    assert.equal(ev.container, join(host.dev, 'vfio', 'vfio'));
    assert.deepEqual(ev.groups, { '12': join(host.dev, 'vfio', '12') });
    assert.equal(ev.vmId, vm.id);
    assert.equal(ev.vmName, 'passive-1');
    assert.equal(ev.tokenInEnv, false, 'the spent token is not handed to the VMM');
    assert.deepEqual(ev.stdioNonBlocking, [], 'kvmvfioctl left stdio O_NONBLOCK for the VMM');
    assert.equal(a.stderr(), '');

    const live = await c.getVm(vm.id);
    assert.equal(live.state, 'VM_STATE_RUNNING');
    assert.equal(live.passive_vmm, true);
    assert.equal(live.vmm_pid, a.pid);
    assert.equal((await c.getIommuGroup(12)).vm_name, 'passive-1');

    await expectStatus(c.createVfioDevice(vm.id), status.FAILED_PRECONDITION, /passive/);
    await expectStatus(c.addGroup({ vm_id: vm.id, group: 13 }), status.FAILED_PRECONDITION, /passive/);
    assert.equal((await c.getIommuGroup(13)).vm_id, '', 'a refused AddGroup claimed the group');
    assert.deepEqual((await c.getVm(vm.id)).groups, [12]);

    // Only fdcheck's SIGTERM handler exits 0: a signal death would mean the CLI still ran.
    a.proc.kill('SIGTERM');
    assert.deepEqual(await a.exit, { code: 0, signal: null });
    const ended = await until('vm EXITED', async () => {
      const v = await c.getVm(vm.id);
      return v.state === 'VM_STATE_EXITED' && v;
    });
    assert.equal(ended.state, 'VM_STATE_EXITED');
    await until('group 12 free', async () => (await c.getIommuGroup(12)).vm_id === '');
    // Free means claimable by the next VM.
    const next = await c.createVm({ name: 'after-passive', vmm_uid: NOBODY_UID, vfio_device: true, groups: [12] });
    assert.deepEqual(next.vm?.groups, [12]);
    await c.deleteVm({ vm_id: next.vm!.id });
  });

  test('the VMM inherits stdin, stdout, stderr and the fds in KVMVFIO_FDS, and no other fd', async () => {
    const { vm, attach_token } = await c.createVm({ name: 'fd-table', vmm_uid: NOBODY_UID, vfio_device: true, groups: [15] });
    assert.ok(vm && attach_token);
    // ls opens one fd of its own (the directory); sh -c ... exec opens none. The caller adds
    // EXTRA_FD without close-on-exec, and this test process may pass more to every child.
    const passedToChildren = inheritedHere();
    const script = 'echo "$KVMVFIO_FDS"; grep ^SigIgn: /proc/$$/status; exec ls /proc/self/fd';
    const a = attach(['--handoff', handoff, '--', 'sh', '-c', script], { KVMVFIO_TOKEN: attach_token.token }, true);
    assert.deepEqual(await a.exit, { code: 0, signal: null }, a.stderr());
    const [spec, sigIgn, ...entries] = a.stdout().trimEnd().split('\n');
    // Node ignores SIGPIPE and SIGXFSZ; an exec keeps a signal ignored, so attach must undo that.
    const ignored = BigInt(`0x${/^SigIgn:\s+([0-9a-f]+)$/.exec(sigIgn)?.[1] ?? 'ffffffffffffffff'}`);
    assert.equal(ignored & (1n << 12n), 0n, `SIGPIPE is ignored in the VMM: ${sigIgn}`);
    assert.equal(ignored & (1n << 24n), 0n, `SIGXFSZ is ignored in the VMM: ${sigIgn}`);
    assert.match(spec, /^kvm:\d+,vfio-container:\d+,group-15:\d+,session:\d+$/);
    const described = spec.split(',').map((item) => Number(item.split(':')[1]));
    const open = entries.map(Number);
    const expected = [0, 1, 2, ...described];
    for (const fd of expected) assert.ok(open.includes(fd), `fd ${fd} is not open in the VMM: ${entries.join(' ')}`);
    assert.ok(!open.includes(EXTRA_FD), `the caller's fd ${EXTRA_FD} reached the VMM`);
    const others = open.filter((fd) => !expected.includes(fd));
    assert.equal(others.length, 1, `fds beyond stdio, the described ones and ls's own: ${JSON.stringify(others)} (the caller's ${[EXTRA_FD, ...passedToChildren].join(', ')} must not pass)`);
    await until('vm fd-table EXITED', async () => (await c.getVm(vm.id)).state === 'VM_STATE_EXITED');
  });

  test('placeholders in the VMM\'s arguments become the handed fds\' numbers; DeleteVm without force stops it with SIGTERM', async () => {
    const { vm, attach_token } = await c.createVm({ name: 'placeholders', vmm_uid: NOBODY_UID, vfio_device: true, groups: [16] });
    // sh prints its arguments as the VMM would get them, then becomes fdcheck (same pid).
    const script = 'printf \'{"event":"argv","a":"%s","b":"%s","c":%s}\\n\' "$1" "$2" "$3"; exec node "$0"';
    const a = attach(
      ['--handoff', handoff, '--', 'sh', '-c', script, FDCHECK, 'fd={kvm},set=1', 'x{group:16}y{session}', '{"qom-type":"x","n":{kvm}}'],
      { KVMVFIO_TOKEN: attach_token!.token },
    );
    const args = await a.waitFor('argv');
    const fds = (await a.waitFor('fds')).fds as Record<string, number>;
    assert.equal(args.a, `fd=${fds.kvm},set=1`);
    assert.equal(args.b, `x${fds['group-16']}y${fds.session}`);
    assert.deepEqual(args.c, { 'qom-type': 'x', n: fds.kvm }, 'other braces stay as they are');
    const running = await until('RUNNING', async () => {
      const v = await c.getVm(vm!.id);
      return v.state === 'VM_STATE_RUNNING' && v;
    });
    assert.equal(running.vmm_pid, a.pid);
    // A passive VMM never reads its session: DeleteVm sends SIGTERM through the pidfd, and fdcheck exits 0 on it.
    const del = await c.deleteVm({ vm_id: vm!.id });
    assert.equal(del.vm?.id, vm!.id);
    assert.deepEqual(await a.exit, { code: 0, signal: null });
    assert.ok(d.logs.some((l) => l.event === 'vmm-terminated' && l.vm === vm!.id));
  });

  test('S31: a passive VMM that ignores SIGTERM: vm delete gets the daemon\'s DEADLINE_EXCEEDED naming the fix before its own deadline; --force kills it', async () => {
    const { vm, attach_token } = await c.createVm({ name: 'stubborn', vmm_uid: NOBODY_UID });
    // sh ignores SIGTERM and keeps the pid (and so the VM) until it is killed.
    const a = attach(['--handoff', handoff, '--', 'sh', '-c', 'trap "" TERM; echo \'{"event":"up"}\'; while :; do sleep 0.1; done'], { KVMVFIO_TOKEN: attach_token!.token });
    await a.waitFor('up');
    await until('RUNNING', async () => (await c.getVm(vm!.id)).state === 'VM_STATE_RUNNING');
    const ctl = (args: string[]) =>
      new Promise<{ code: number | null; stderr: string; ms: number }>((resolve) => {
        const t0 = Date.now();
        execFile(process.execPath, [CLI_JS, '--socket', d.apiSocket, ...args], (err, _out, stderr) =>
          resolve({ code: err ? (typeof err.code === 'number' ? err.code : null) : 0, stderr, ms: Date.now() - t0 }),
        );
      });
    // The daemon waits up to its exit grace (10 s by default) but answers before the call's deadline.
    const r = await ctl(['--timeout', '2000', 'vm', 'delete', 'stubborn']);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /DEADLINE_EXCEEDED: the VMM of vm \S+ \(pid \d+\) did not exit within \d+ ms \(the call's deadline; kvmvfiod waits up to 10000 ms, --vmm-exit-grace-ms\) of SIGTERM; DeleteVm with force kills it/);
    // The daemon's own message (not grpc-js's "Deadline exceeded") proves it answered before the deadline; the
    // wall time includes the CLI's start, so it only has to show the daemon did not wait out its 10 s grace.
    assert.ok(r.ms < 9000, `answered after ${r.ms} ms`);
    assert.ok(d.logs.some((l) => l.event === 'vmm-terminated' && l.vm === vm!.id), 'SIGTERM went through the pidfd');
    assert.equal((await c.getVm(vm!.id)).state, 'VM_STATE_RUNNING', 'it ignored SIGTERM');
    const forced = await ctl(['vm', 'delete', '--force', 'stubborn']);
    assert.equal(forced.code, 0, forced.stderr);
    assert.equal((await a.exit).signal, 'SIGKILL');
  });

  test('the device-cdev handoff: a fresh iommufd and each device\'s cdev, at the numbers of {iommufd} and {device:ADDRESS}; no group fd in the daemon', async () => {
    await expectStatus(
      c.createVm({ name: 'no-cdev', vmm_uid: NOBODY_UID, vfio_device: true, groups: [16], vfio_handoff: 'VFIO_HANDOFF_CDEV' }),
      status.FAILED_PRECONDITION,
      /IOMMU group 16: 0000:00:16.0 has no VFIO device cdev/,
    );
    // Left to the host: a group whose devices have no cdev is handed over as a group.
    const grouped = await c.createVm({ name: 'default-group', vmm_uid: NOBODY_UID, vfio_device: true, groups: [16] });
    assert.equal(grouped.vm!.vfio_handoff, 'VFIO_HANDOFF_GROUP');
    await c.deleteVm({ vm_id: grouped.vm!.id });
    // This host has /dev/iommu and group 17's device has a cdev: left to the host, it is CDEV.
    const { vm, attach_token } = await c.createVm({ name: 'cdev-vm', vmm_uid: NOBODY_UID, vfio_device: true, groups: [17] });
    assert.equal(vm!.vfio_handoff, 'VFIO_HANDOFF_CDEV');
    const claimed = await c.getIommuGroup(17);
    assert.deepEqual([claimed.holding, claimed.open_in_daemon], ['GROUP_HOLDING_CLAIMED', false], 'a held group file would make the VMM\'s bind EBUSY');
    const address = claimed.devices[0].address;
    // What QEMU would be given; here a shell reports which files its fds are.
    const script = 'printf \'{"event":"fds","iommufd":"%s","device":"%s","spec":"%s"}\\n\' "$(readlink /proc/$$/fd/$1)" "$(readlink /proc/$$/fd/$2)" "$KVMVFIO_FDS"; exec sleep 600';
    const a = attach(['--handoff', handoff, '--', 'sh', '-c', script, 'sh', '{iommufd}', `{device:${address}}`], { KVMVFIO_TOKEN: attach_token!.token });
    const ev = await a.waitFor('fds');
    assert.equal(ev.iommufd, join(host.dev, 'iommu'));
    assert.equal(ev.device, join(host.dev, 'vfio', 'devices', 'vfio7'));
    assert.match(String(ev.spec), new RegExp(`^kvm:\\d+,iommufd:\\d+,device-${address.replace(/\./g, '\\.')}:\\d+,session:\\d+$`));
    const held = await until('RUNNING', async () => {
      const v = await c.getVm(vm!.id);
      return v.state === 'VM_STATE_RUNNING' && (await c.getIommuGroup(17));
    });
    assert.deepEqual([held.holding, held.open_in_daemon], ['GROUP_HOLDING_VMM', false]);
    await c.deleteVm({ vm_id: vm!.id });
    assert.equal((await a.exit).signal, 'SIGTERM');
    const back = await c.getIommuGroup(17);
    assert.deepEqual([back.holding, back.open_in_daemon], ['GROUP_HOLDING_FREE', true], "back once the daemon's open of the group succeeds");
  });

  test('a placeholder for an fd not handed out: INVALID_ARGUMENT, nothing exec\'d, the VM ends', async () => {
    const { vm, attach_token } = await c.createVm({ name: 'bad-placeholder', vmm_uid: NOBODY_UID });
    const a = attach(['--handoff', handoff, '--', 'node', FDCHECK, '{group:99}'], { KVMVFIO_TOKEN: attach_token!.token });
    assert.deepEqual(await a.exit, { code: 1, signal: null });
    assert.match(a.stderr(), /^kvmvfioctl: INVALID_ARGUMENT: the command line names \{group:99\}, which kvmvfiod did not hand to this VM's VMM \(handed: \{kvm\}, \{vfio-container\}, \{session\}\)\n$/);
    assert.ok(!a.events.some((e) => e.event === 'fds'), 'nothing was exec\'d');
    await until('vm EXITED', async () => (await c.getVm(vm!.id)).state === 'VM_STATE_EXITED');
  });

  test('a used token: exit 1, PERMISSION_DENIED with the daemon\'s reason, nothing exec\'d', async () => {
    assert.ok(spentToken, 'the first test ran');
    const a = attach(['--handoff', handoff, '--', 'node', FDCHECK], { KVMVFIO_TOKEN: spentToken });
    assert.deepEqual(await a.exit, { code: 1, signal: null });
    // The daemon's own reason, passed through.
    assert.match(a.stderr(), /^kvmvfioctl: PERMISSION_DENIED: [^\n]*already used[^\n]*\n$/);
    assert.equal(a.stdout(), '', 'fdcheck ran');

    const j = attach(['--json', '--handoff', handoff, '--', 'node', FDCHECK], { KVMVFIO_TOKEN: 'not-a-token-at-all' });
    assert.deepEqual(await j.exit, { code: 1, signal: null });
    const err = (JSON.parse(j.stderr()) as { error: Json }).error;
    assert.deepEqual(Object.keys(err), ['code', 'message']);
    assert.equal(err.code, 'PERMISSION_DENIED');
    assert.ok(String(err.message).length > 0);

    // A token is base64url: one in 32 starts with "-", and `--token "$T"` must still take it.
    const dash = attach(['--token', '-Not-a-token', '--handoff', handoff, '--', 'node', FDCHECK]);
    assert.deepEqual(await dash.exit, { code: 1, signal: null }, dash.stderr());
    assert.match(dash.stderr(), /^kvmvfioctl: PERMISSION_DENIED: /);
  });

  test('usage errors exit 2 and spend no token; then the token attaches (--token, KVMVFIO_HANDOFF)', async () => {
    const { vm, attach_token } = await c.createVm({ name: 'usage', vmm_uid: NOBODY_UID, vfio_device: true, groups: [14] });
    assert.ok(vm && attach_token);
    const token = { KVMVFIO_TOKEN: attach_token.token };
    const cases: [string[], Record<string, string>, RegExp][] = [
      [['--handoff', handoff], token, /missing -- CMD/],
      [['--handoff', handoff, '--'], token, /missing CMD after --/],
      [['--handoff', handoff, 'node', FDCHECK], token, /unexpected argument "node": the VMM command and its arguments go after --/],
      [['--handoff', handoff, 'node', '--exit-after', '1'], token, /Unknown option '--exit-after'.*go after --/],
      [['--handoff', handoff, '--', 'node', FDCHECK], {}, /missing attach token: set KVMVFIO_TOKEN/],
      [['--handoff', '', '--', 'node', FDCHECK], token, /--handoff: empty path/],
      [['--handoff', handoff, '--force', '--', 'node', FDCHECK], token, /attach does not take --force/],
    ];
    for (const [args, env, message] of cases) {
      const a = attach(args, env);
      const x = await a.exit;
      assert.deepEqual(x, { code: 2, signal: null }, `${args.join(' ')}: ${a.stderr()}`);
      assert.match(a.stderr(), /^kvmvfioctl: /, args.join(' '));
      assert.match(a.stderr(), message, args.join(' '));
      assert.match(a.stderr(), /^Usage: kvmvfioctl attach \[--token TOKEN\] \[--handoff PATH\] -- CMD \[ARG\]\.\.\.$/m, args.join(' '));
      assert.equal(a.stdout(), '');
    }
    assert.equal((await c.getVm(vm.id)).state, 'VM_STATE_PENDING');

    // The token on the command line, the socket from the environment; fdcheck exits by itself.
    const a = attach(['--token', attach_token.token, '--', 'node', FDCHECK, '--exit-after', '100'], { KVMVFIO_HANDOFF: handoff });
    const ev = await a.waitFor('fds');
    assert.deepEqual(ev.problems, []);
    assert.equal(ev.pid, a.pid);
    assert.deepEqual(Object.keys(ev.fds as Json), ['kvm', 'vfio-container', 'group-14', 'session']);
    assert.deepEqual(await a.exit, { code: 0, signal: null });
    await until('vm usage EXITED', async () => (await c.getVm(vm.id)).state === 'VM_STATE_EXITED');
    await until('group 14 free', async () => (await c.getIommuGroup(14)).vm_id === '');
  });

  test('a CMD that is not found: exit 127 with the errno; the VM ends', async () => {
    const { vm, attach_token } = await c.createVm({ name: 'no-such-vmm', vmm_uid: NOBODY_UID, vfio_device: true, groups: [13] });
    assert.ok(vm && attach_token);
    const a = attach(['--handoff', handoff, '--', 'kvmvfio-no-such-vmm', '-m', '1G'], { KVMVFIO_TOKEN: attach_token.token });
    assert.deepEqual(await a.exit, { code: 127, signal: null });
    assert.equal(a.stderr(), 'kvmvfioctl: ENOENT: cannot exec "kvmvfio-no-such-vmm": not found in PATH\n');
    // It attached (the token is spent), and its exit ended the VM.
    await until('vm no-such-vmm EXITED', async () => (await c.getVm(vm.id)).state === 'VM_STATE_EXITED');
    await until('group 13 free', async () => (await c.getIommuGroup(13)).vm_id === '');
    assert.equal((await c.getVm(vm.id)).vmm_pid, a.pid);

    // Found but not executable (a .js file without x): 126, as sh says.
    const t2 = await c.createVm({ name: 'not-executable', vmm_uid: NOBODY_UID });
    const b = attach(['--handoff', handoff, '--', FDCHECK], { KVMVFIO_TOKEN: t2.attach_token!.token });
    assert.deepEqual(await b.exit, { code: 126, signal: null });
    assert.equal(b.stderr(), `kvmvfioctl: EACCES: cannot exec ${JSON.stringify(FDCHECK)}: EACCES\n`);
  });

  test('--help describes attach and why the token belongs in the environment', () => {
    const help = execFileSync(process.execPath, [CLI_JS, 'attach', '--help'], { encoding: 'utf8' });
    assert.ok(help.includes('attach [--token TOKEN] [--handoff PATH] -- CMD [ARG]...'));
    assert.ok(help.includes('KVMVFIO_TOKEN'));
    assert.match(help, /visible to every user in ps/);
    assert.ok(help.includes('KVMVFIO_HANDOFF'));
    assert.ok(help.includes('KVMVFIO_FDS'));
  });
});

describe('kvmvfioctl attach without a VFIO container', () => {
  let host: FakeHost;
  let d: RunningDaemon;
  let c: KvmVfioApi;

  before(async () => {
    host = await makeFakeHost([vfioGroup(7)]);
    d = await startDaemon({ sysfs: host.sysfs, dev: host.dev });
    c = d.client();
  });

  after(async () => {
    await d?.cleanup();
    await host?.cleanup();
  });

  test('KVMVFIO_FDS lists only what the daemon sent', async () => {
    const { vm, attach_token } = await c.createVm({ name: 'no-container', vmm_uid: NOBODY_UID, vfio_device: true, groups: [7] });
    assert.ok(vm && attach_token);
    const a = attach(['--handoff', join(d.runtimeDir, 'handoff.sock'), '--', 'node', FDCHECK], { KVMVFIO_TOKEN: attach_token.token });
    const ev = await a.waitFor('fds');
    assert.deepEqual(ev.problems, []);
    assert.match(String(ev.spec), /^kvm:\d+,group-7:\d+,session:\d+$/);
    assert.equal(ev.container, null);
    assert.deepEqual(ev.groups, { '7': join(host.dev, 'vfio', '7') });
    assert.equal(ev.kvmApi, 12);
    a.proc.kill('SIGKILL');
    await a.exit;
    await until('vm EXITED', async () => (await c.getVm(vm.id)).state === 'VM_STATE_EXITED');
  });
});

describe('kvmvfioctl attach without an answering daemon', () => {
  let dir: string;
  let silent: SeqpacketListener | undefined;

  before(() => {
    dir = mkdtempSync(join(tmpdir(), 'kvmvfioctl-attach-'));
    chmodSync(dir, 0o755);
  });

  after(async () => {
    await silent?.close();
    rmSync(dir, { recursive: true, force: true });
  });

  test('no socket: UNAVAILABLE naming the path, exit 1', async () => {
    const path = join(dir, 'absent.sock');
    const a = attach(['--handoff', path, '--', 'node', FDCHECK], { KVMVFIO_TOKEN: 'some-token' });
    assert.deepEqual(await a.exit, { code: 1, signal: null });
    assert.equal(a.stderr(), `kvmvfioctl: UNAVAILABLE: no kvmvfiod handoff socket at ${path}: is kvmvfiod running? (--handoff PATH or KVMVFIO_HANDOFF selects another socket)\n`);
    assert.equal(a.stdout(), '');
  });

  test('a listener that never answers: DEADLINE_EXCEEDED after --timeout, exit 1', async () => {
    const path = join(dir, 'silent.sock');
    // Never accepted: connect and the ATTACH record still succeed (the backlog holds them).
    silent = SeqpacketListener.listen(path);
    chmodSync(path, 0o666);
    const t0 = Date.now();
    const a = attach(['--timeout', '300', '--handoff', path, '--', 'node', FDCHECK], { KVMVFIO_TOKEN: 'some-token' });
    assert.deepEqual(await a.exit, { code: 1, signal: null });
    assert.ok(Date.now() - t0 < 5000, `took ${Date.now() - t0} ms`);
    assert.match(a.stderr(), /^kvmvfioctl: DEADLINE_EXCEEDED: kvmvfiod at \S+ did not answer the attach within 300 ms/);
    assert.equal(a.stdout(), '');
  });
});
