/**
 * An unmodified QEMU 10 (Debian's, from bookworm-backports) as a sandboxed
 * VMM of kvmvfiod on this host: uid 65534, no capabilities, no access to
 * /dev/kvm by path. It gets /dev/kvm from the daemon through `kvmvfioctl
 * attach`, whose placeholders put the fd's number into the arguments that
 * `kvmvfioctl vm args --vmm qemu` printed; it boots SeaBIOS on KVM; the
 * daemon shows it RUNNING with QEMU's pid; DeleteVm ends it (SIGTERM).
 *
 * Run by test/qemu/lane.sh (npm run test:qemu), which fetches QEMU 10 and
 * sets KVMVFIO_QEMU; without it the suite skips.
 */
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { accessSync, chmodSync, constants, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { KvmVfioApi } from '../../src/client/client';
import { CLI_JS, startDaemon, type RunningDaemon } from '../helpers/daemon';
import { collectJsonLines, type VmmProc } from '../helpers/vmmproc';
import { qmp } from '../helpers/qmp';
import { until } from '../helpers/assert';

const QEMU = process.env.KVMVFIO_QEMU;
const NOBODY = ['setpriv', '--reuid=65534', '--regid=65534', '--clear-groups', '--inh-caps=-all', '--bounding-set=-all'];


describe('QEMU 10, unmodified, as a sandboxed VMM of kvmvfiod', { skip: QEMU ? false : 'KVMVFIO_QEMU is not set (npm run test:qemu fetches QEMU 10 and sets it)' }, () => {
  let d: RunningDaemon;
  let c: KvmVfioApi;
  let work: string;
  const procs: VmmProc[] = [];

  before(async () => {
    d = await startDaemon({ args: ['--vmm-exit-grace-ms', '10000'] });
    c = d.client();
    work = mkdtempSync(join(tmpdir(), 'kvmvfiod-qemu-'));
    chmodSync(work, 0o777); // QEMU, as 65534, makes its QMP socket and serial log here
  });

  after(async () => {
    for (const p of procs) p.kill();
    await d?.cleanup();
    rmSync(work, { recursive: true, force: true });
  });

  test('boots SeaBIOS on the /dev/kvm fd kvmvfiod handed it; RUNNING with its pid; DeleteVm ends it', async (t) => {
    // The sandbox's point: uid 65534 cannot open /dev/kvm itself.
    const probe = spawn(NOBODY[0], [...NOBODY.slice(1), process.execPath, '-e', "require('fs').openSync('/dev/kvm','r+')"], { stdio: 'ignore' });
    assert.notEqual(await new Promise((r) => probe.once('exit', r)), 0, 'uid 65534 opened /dev/kvm by path');
    assert.doesNotThrow(() => accessSync(QEMU!, constants.X_OK));

    const { vm, attach_token } = await c.createVm({ name: 'qemu10', vmm_uid: 65534 });
    const argsRun = spawn(process.execPath, [CLI_JS, '--socket', d.apiSocket, '--json', 'vm', 'args', 'qemu10', '--vmm', 'qemu'], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    argsRun.stdout!.on('data', (b: Buffer) => (out += b.toString()));
    assert.equal(await new Promise((r) => argsRun.once('exit', r)), 0);
    const { args } = JSON.parse(out) as { args: string[] };
    assert.ok(args.some((a) => a.includes('{kvm}')), JSON.stringify(args));

    const serial = join(work, 'serial.log');
    const qmpSocket = join(work, 'qmp.sock');
    const t0 = Date.now();
    const argv = [
      ...NOBODY, process.execPath, CLI_JS, 'attach', '--handoff', join(d.runtimeDir, 'handoff.sock'), '--',
      QEMU!, ...args,
      '-machine', 'q35', '-cpu', 'qemu64', '-m', '64', '-nodefaults', '-nographic', '-display', 'none', '-monitor', 'none', '-no-user-config',
      '-serial', `file:${serial}`, '-qmp', `unix:${qmpSocket},server=on,wait=off`,
    ];
    const qemu = collectJsonLines(spawn(argv[0], argv.slice(1), { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, KVMVFIO_TOKEN: attach_token!.token } }));
    procs.push(qemu);

    await until('SeaBIOS on the serial port', async () => {
      try {
        return readFileSync(serial, 'utf8').includes('SeaBIOS');
      } catch {
        return false;
      }
    }, 60_000);
    t.diagnostic(`SeaBIOS on the serial port ${Date.now() - t0} ms after kvmvfioctl attach started`);
    const running = await c.getVm(vm!.id);
    assert.equal(running.state, 'VM_STATE_RUNNING');
    assert.equal(running.passive_vmm, true);
    assert.equal(running.vmm_pid, qemu.pid, 'the pid kvmvfioctl attach exec\'d QEMU in');
    const status = readFileSync(`/proc/${qemu.pid}/status`, 'utf8');
    assert.match(status, /^Name:\s+qemu-system-x86$/m);
    assert.match(status, /^Uid:\s+65534\s+65534\s+65534\s+65534$/m);
    assert.match(status, /^CapEff:\s+0+$/m);
    assert.deepEqual(await qmp(qmpSocket, 'query-kvm'), { enabled: true, present: true });

    // A passive VMM never reads its session: DeleteVm stops it with SIGTERM through the pidfd.
    const t1 = Date.now();
    const del = await c.deleteVm({ vm_id: vm!.id });
    t.diagnostic(`DeleteVm (SIGTERM to QEMU) answered in ${Date.now() - t1} ms`);
    assert.equal(del.vm?.id, vm!.id);
    const exit = await qemu.exit;
    assert.equal(exit.code ?? exit.signal, 0, `QEMU's exit after SIGTERM: ${JSON.stringify(exit)}; stderr: ${qemu.stderr()}`);
  });
});
