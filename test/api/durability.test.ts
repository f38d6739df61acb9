/**
 * Acknowledged means durable, played as the attacker of the issue would:
 * SIGKILL under load, a state dir whose filesystem fills, and a damaged byte
 * in the store — each against whole daemons, restarted from a stand-in for
 * systemd's fd store as in restart.test.ts.
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { closeSync, openSync } from 'node:fs';
import { chmod, mkdir, mkdtemp, readFile, readdir, rm, unlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { protoPath as healthProto } from 'grpc-health-check';
import { status } from '@grpc/grpc-js';
import { STORE_FILE } from '../../src/broker/store';
import { libc } from '../../src/kernel/libc';
import { makeFakeHost } from '../helpers/fakehost';
import { startDaemon, type RunningDaemon } from '../helpers/daemon';
import { FakeSystemd } from '../helpers/fakesystemd';
import { REFERENCE_VMM, runVmm, type VmmProc } from '../helpers/vmmproc';
import { expectStatus, until } from '../helpers/assert';

const cleanups: (() => Promise<void> | void)[] = [];
after(async () => {
  for (const c of cleanups.reverse()) await c();
});

async function workDir(prefix: string): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), prefix));
  await chmod(dir, 0o755);
  cleanups.push(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

/** EXT4_IOC_SHUTDOWN (flag NOLOGFLUSH): from now on every write to the filesystem fails with EIO. */
function shutDownFilesystem(path: string): void {
  const fd = openSync(path, 'r');
  try {
    const flag = Buffer.alloc(4);
    flag.writeUInt32LE(2);
    assert.equal(libc.ioctlPtr(fd, 0x8004587d, flag), 0, 'EXT4_IOC_SHUTDOWN');
  } finally {
    closeSync(fd);
  }
}

/** A daemon in `dir` whose fds a stand-in for systemd keeps, as restarts need. */
async function underFakeSystemd(dir: string): Promise<{ systemd: FakeSystemd; env: Record<string, string>; d: RunningDaemon }> {
  const systemd = new FakeSystemd(dir);
  cleanups.push(() => systemd.close());
  const env = { NOTIFY_SOCKET: systemd.path };
  const d = await startDaemon({ dir, env, listenFds: systemd.listenFds() });
  cleanups.push(() => d.cleanup());
  return { systemd, env, d };
}

type HealthClient = grpc.Client & { Check(req: { service: string }, cb: (e: grpc.ServiceError | null, r?: { status: string }) => void): void };

function healthOf(d: RunningDaemon): (service: string) => Promise<string> {
  const def = protoLoader.loadSync(healthProto, { includeDirs: [join(healthProto, '..', '..', '..')], keepCase: true, enums: String });
  const pkg = grpc.loadPackageDefinition(def) as unknown as { grpc: { health: { v1: { Health: new (a: string, c: grpc.ChannelCredentials) => HealthClient } } } };
  const h = new pkg.grpc.health.v1.Health(`unix:${d.apiSocket}`, grpc.credentials.createInsecure());
  cleanups.push(() => h.close());
  return (service) => new Promise((res, rej) => h.Check({ service }, (e, v) => (e ? rej(e) : res(v!.status))));
}

test('20 SIGKILLs under create/delete load: no acknowledged create lost, no acknowledged delete back', { timeout: 300_000 }, async () => {
  const dir = await workDir('kvmvfiod-kill-');
  const systemd = new FakeSystemd(dir);
  cleanups.push(() => systemd.close());
  const env = { NOTIFY_SOCKET: systemd.path };
  const created = new Set<string>(); // acknowledged creates, not acknowledged deleted since
  const deleted = new Set<string>(); // acknowledged deletes
  let inFlightAtKill = 0;
  let acks = 0;
  for (let round = 0; round < 20; round++) {
    const d = await startDaemon({ dir, env, listenFds: systemd.listenFds() });
    cleanups.push(() => d.cleanup());
    const c = d.client();
    // What the previous rounds were told is there, and nothing they deleted.
    const present = new Set((await c.listAllVms()).map((v) => v.id));
    const lost = [...created].filter((id) => !present.has(id));
    const back = [...deleted].filter((id) => present.has(id));
    assert.deepEqual(lost, [], `round ${round}: acknowledged creates lost`);
    assert.deepEqual(back, [], `round ${round}: acknowledged deletes resurrected`);
    // Calls in flight at the kill may have landed or not: take the daemon's word for them now.
    for (const id of present) created.add(id);

    let stop = false;
    let inFlight = 0;
    const worker = async (w: number) => {
      for (let i = 0; !stop; i++) {
        inFlight++;
        try {
          if (i % 3 === 2 && created.size) {
            const id = [...created][Math.floor(Math.random() * created.size)];
            created.delete(id);
            await c.deleteVm({ vm_id: id, force: true });
            deleted.add(id);
          } else {
            const r = await c.createVm({ name: `r${round}-w${w}-${i}`, vmm_uid: 65534, labels: { round: String(round) } });
            created.add(r.vm!.id);
          }
          acks++;
        } catch {
          // The daemon died under the call: its outcome is unknown, and the check above takes the daemon's word.
          break;
        } finally {
          inFlight--;
        }
      }
    };
    const workers = Array.from({ length: 6 }, (_, w) => worker(w));
    await new Promise((r) => setTimeout(r, 150 + Math.random() * 350));
    inFlightAtKill += inFlight;
    await d.stop('SIGKILL');
    stop = true;
    await Promise.all(workers);
  }
  const d = await startDaemon({ dir, env, listenFds: systemd.listenFds() });
  cleanups.push(() => d.cleanup());
  const present = new Set((await d.client().listAllVms()).map((v) => v.id));
  assert.deepEqual([...created].filter((id) => !present.has(id)), []);
  assert.deepEqual([...deleted].filter((id) => present.has(id)), []);
  assert.ok(acks > 200, `${acks} acknowledged calls across the rounds`);
  assert.ok(inFlightAtKill > 20, `${inFlightAtKill} calls were in flight at the kills`);
  // Deletes were acknowledged too, so both halves of the promise were played.
  assert.ok(deleted.size > 20, `${deleted.size} acknowledged deletes`);
  process.stdout.write(`# 20 SIGKILLs: ${acks} acknowledged calls, ${deleted.size} deletes, ${inFlightAtKill} in flight at the kills; 0 lost, 0 resurrected\n`);
});

test('a state dir on a full filesystem: each change is either saved or refused UNAVAILABLE naming ENOSPC, reads served, no file per retry; space back: it recovers by itself; nothing acknowledged lost', { timeout: 120_000 }, async () => {
  const dir = await workDir('kvmvfiod-full-');
  const stateDir = join(dir, 'state');
  await mkdir(stateDir, { mode: 0o700 });
  execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=256k,mode=0700', 'tmpfs', stateDir]);
  cleanups.push(() => void execFileSync('umount', ['-l', stateDir]));
  const { systemd, env, d } = await underFakeSystemd(dir);
  const c = d.client();
  const health = healthOf(d);
  const acked: string[] = [];
  for (let i = 0; i < 3; i++) acked.push((await c.createVm({ name: `before-${i}`, vmm_uid: 65534 })).vm!.id);

  // The filler takes what is left of the 256 KiB.
  const filler = join(stateDir, 'filler');
  const fill = () => {
    try {
      execFileSync('dd', ['if=/dev/zero', `of=${filler}`, 'bs=4k', 'count=100'], { stdio: 'ignore' });
    } catch {
      // dd stops at ENOSPC: full now.
    }
  };
  fill();
  const filesBefore = (await readdir(stateDir)).sort();
  let refused = 0;
  let notServing = 0;
  const blob = 'x'.repeat(200);
  const labels = Object.fromEntries(Array.from({ length: 12 }, (_, k) => [`k${k}`, blob]));
  // LMDB writes into its free pages while it has them: a change that fits is saved (and durable), one that
  // needs the file to grow is refused. Each answer must be one of the two, and the record must agree.
  for (let i = 0; i < 60; i++) {
    try {
      acked.push((await c.createVm({ name: `full-${i}`, vmm_uid: 65534, labels })).vm!.id);
    } catch (e) {
      const err = e as grpc.ServiceError;
      assert.equal(err.code, status.UNAVAILABLE, `create ${i}: ${err.message}`);
      assert.match(err.details, /ENOSPC/);
      refused++;
      if ((await health('kvmvfio.v1.KvmVfio')) === 'NOT_SERVING') notServing++;
    }
  }
  assert.ok(refused >= 40, `${refused} of 60 creates refused`);
  assert.ok(notServing > 0, 'health said NOT_SERVING after a refusal');
  assert.equal(await health(''), 'SERVING');
  // Nothing refused was made: the daemon lists exactly what it acknowledged.
  assert.deepEqual((await c.listAllVms()).map((v) => v.id).sort(), [...acked].sort());
  await new Promise((r) => setTimeout(r, 1000));
  assert.deepEqual((await readdir(stateDir)).sort(), filesBefore, 'no file per retry');
  const failedLines = d.logs.filter((l) => l.event === 'state-write-failed').length;
  const recoveredLines = d.logs.filter((l) => l.event === 'state-write-recovered').length;
  assert.ok(failedLines >= 1 && failedLines - recoveredLines <= 1, `a line per failure and its recovery (${failedLines} / ${recoveredLines}), not one per retry`);

  // Space comes back: the daemon finds out by itself.
  await unlink(filler);
  await until('SERVING again', async () => (await health('kvmvfio.v1.KvmVfio')) === 'SERVING', 10_000);
  acked.push((await c.createVm({ name: 'after', vmm_uid: 65534, labels })).vm!.id);

  // SIGKILL now loses nothing that was acknowledged.
  await d.stop('SIGKILL');
  const d2 = await startDaemon({ dir, env, listenFds: systemd.listenFds() });
  cleanups.push(() => d2.cleanup());
  assert.deepEqual((await d2.client().listAllVms()).map((v) => v.id).sort(), [...acked].sort());
  process.stdout.write(`# full filesystem: ${refused} of 60 creates refused ENOSPC, ${60 - refused} saved; ${acked.length} acknowledged, all back after SIGKILL\n`);
});

test('a state filesystem that fails every write (ext4 shut down: EIO): every change refused, health NOT_SERVING for good, SIGTERM exits non-zero saying what was not saved', { timeout: 120_000 }, async () => {
  const dir = await workDir('kvmvfiod-eio-');
  const img = join(dir, 'state.img');
  execFileSync('truncate', ['-s', '16M', img]);
  execFileSync('mkfs.ext4', ['-q', '-F', img]);
  const stateDir = join(dir, 'state');
  await mkdir(stateDir, { mode: 0o700 });
  execFileSync('mount', ['-o', 'loop', img, stateDir]);
  let mounted = true;
  cleanups.push(() => void (mounted && execFileSync('umount', ['-l', stateDir])));
  const { systemd, env, d } = await underFakeSystemd(dir);
  const c = d.client();
  const health = healthOf(d);
  const acked: string[] = [];
  for (let i = 0; i < 5; i++) acked.push((await c.createVm({ name: `vm-${i}`, vmm_uid: 65534 })).vm!.id);

  shutDownFilesystem(stateDir);
  await expectStatus(c.createVm({ name: 'refused', vmm_uid: 65534 }), status.UNAVAILABLE, /EIO/);
  await expectStatus(c.deleteVm({ vm_id: acked[0], force: true }), status.UNAVAILABLE, /the state cannot be written \(EIO/);
  await expectStatus(c.createAttachToken(acked[1]), status.UNAVAILABLE, /EIO/);
  // Reads are served, and nothing changed.
  assert.deepEqual((await c.listAllVms()).map((v) => v.id).sort(), [...acked].sort());
  for (let i = 0; i < 4; i++) {
    assert.equal(await health('kvmvfio.v1.KvmVfio'), 'NOT_SERVING');
    await new Promise((r) => setTimeout(r, 250));
  }
  const stopped = await d.stop('SIGTERM');
  assert.notEqual(stopped.code, 0, 'exit code');
  assert.ok(d.logs.some((l) => l.event === 'state-not-saved' && (l.unsaved as number) > 0 && l.errno === 'EIO'), 'the log says what was not saved, and why');

  // The filesystem back (its journal replayed at mount): everything acknowledged, nothing refused.
  execFileSync('umount', [stateDir]);
  execFileSync('mount', ['-o', 'loop', img, stateDir]);
  const d2 = await startDaemon({ dir, env, listenFds: systemd.listenFds() });
  cleanups.push(() => d2.cleanup());
  assert.deepEqual((await d2.client().listAllVms()).map((v) => v.id).sort(), [...acked].sort());
  await d2.stop('SIGTERM');
  execFileSync('umount', [stateDir]);
  mounted = false;
});

test('a damaged byte in the store costs the damaged record: the other VMs, the live session and the claim carry on', { timeout: 120_000 }, async () => {
  const dir = await workDir('kvmvfiod-damage-');
  const host = await makeFakeHost([{ number: 9, devices: [{ address: '0000:00:09.0', vendor: '8086', device: '10d3', class: '020000', driver: 'vfio-pci' }] }]);
  cleanups.push(() => host.cleanup());
  const systemd = new FakeSystemd(dir);
  cleanups.push(() => systemd.close());
  const env = { NOTIFY_SOCKET: systemd.path };
  const common = { dir, env, sysfs: host.sysfs, dev: host.dev };
  const d1 = await startDaemon({ ...common, listenFds: systemd.listenFds() });
  cleanups.push(() => d1.cleanup());
  const c1 = d1.client();
  const names = ['alpha', 'bravo', 'charlie', 'delta'];
  const vms = [];
  for (const name of names) vms.push((await c1.createVm({ name, vmm_uid: 65534 })).vm!);
  const claimer = (await c1.createVm({ name: 'claimer', vmm_uid: 65534, vfio_device: true, groups: [9] })).vm!;
  const { vm: live, attach_token: tok } = await c1.createVm({ name: 'live', vmm_uid: 65534, vfio_device: true });
  const vmms: VmmProc[] = [];
  cleanups.push(() => vmms.forEach((v) => v.kill()));
  const v = runVmm([process.execPath, REFERENCE_VMM, '--socket', join(d1.runtimeDir, 'handoff.sock')], tok!.token);
  vmms.push(v);
  await until('RUNNING', async () => (await c1.getVm(live!.id)).state === 'VM_STATE_RUNNING');
  await until('the session stored', async () => systemd.store.has(`session-${live!.id}`) && systemd.store.has('group-9'));
  await new Promise((r) => setTimeout(r, 200));
  await d1.stop('SIGKILL');

  // One byte of charlie's record, of the live VM's record and of group 9's claim: each costs that entry.
  const path = join(dir, 'state', STORE_FILE);
  const buf = await readFile(path);
  // Every copy: LMDB copies a page on write, and a page freed by an older transaction may still hold the text.
  for (const text of ['"name":"charlie"', '"name":"live"', '"vmName":"claimer"']) {
    let copies = 0;
    for (let at = buf.indexOf(Buffer.from(text)); at >= 0; at = buf.indexOf(Buffer.from(text), at + 1)) {
      buf[at + text.length - 3] ^= 0x20;
      copies++;
    }
    assert.ok(copies > 0, `${text} is in the store`);
  }
  await writeFile(path, buf);

  const d2 = await startDaemon({ ...common, listenFds: systemd.listenFds() });
  cleanups.push(() => d2.cleanup());
  const c2 = d2.client();
  const damaged = await d2.waitForLog((l) => l.event === 'state-damaged');
  assert.equal((damaged.badEntries as unknown[]).length, 3);
  const after = await c2.listAllVms();
  const byName = new Map(after.map((x) => [x.name, x]));
  for (const name of ['alpha', 'bravo', 'delta', 'claimer']) assert.ok(byName.has(name), `${name} came back`);
  assert.ok(!byName.has('charlie'), 'the damaged record is gone');
  // The live VM's record was damaged, but its session came back from the fd store: kept, under a record made for it.
  assert.ok(d2.logs.some((l) => l.event === 'state-orphan-session' && l.vm === live!.id));
  const kept = await c2.getVm(live!.id);
  assert.equal(kept.state, 'VM_STATE_RUNNING');
  assert.equal(kept.labels['kvmvfiod.io/recovered'], 'fd-store');
  assert.equal(v.proc.exitCode, null, 'the VMM was not told to stop');
  // Its session answers: the VMM's kernel says EBUSY to a second KVM-VFIO device.
  await expectStatus(c2.createVfioDevice(live!.id), status.ALREADY_EXISTS, /EBUSY/);
  // The claim's entry was damaged; the group fd came back from the fd store and goes to the VM whose plan lists it.
  assert.ok(d2.logs.some((l) => l.event === 'state-orphan-group' && l.group === 9 && l.vm === claimer.id));
  const g9 = await c2.getIommuGroup(9);
  assert.deepEqual([g9.vm_id, g9.holding, g9.open_in_daemon], [claimer.id, 'GROUP_HOLDING_CLAIMED', true]);
  assert.ok(systemd.store.has('group-9'), 'the group fd was not dropped');
  v.kill('SIGKILL');
  await until('EXITED', async () => (await c2.getVm(live!.id)).state === 'VM_STATE_EXITED');
});
