/**
 * A VMM is named by a pidfd, never by a bare pid — played as a hostile
 * tenant would, against a real daemon and the C reference VMM as nobody:
 *   - a VMM that connects, forks and exits, its child presenting the token on
 *     the inherited connection, is refused (the peer that connected is gone);
 *   - a VMM that forks and attaches from the child while it lives is bound
 *     to the process that connected, and its exit ends the VM;
 *   - without SO_PEERPIDFD (Debian 12's kernel; forced here with a seccomp
 *     filter, test/helpers/no-peerpidfd.c), a pid given to another tenant's
 *     process before the ATTACH is never limited (prlimit) nor killed: the
 *     daemon checks that the process behind its pidfd holds the connection.
 * Each runs on both paths (SO_PEERPIDFD, and the pid with its proof).
 */
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';

import { join } from 'node:path';
import { status } from '@grpc/grpc-js';
import type { KvmVfioApi } from '../../src/client/client';
import { readFileSync, writeFileSync } from 'node:fs';
import { buildCVmm, buildNoPeerPidfd, removeCVmm } from '../helpers/cvmm';
import { startDaemon, type RunningDaemon } from '../helpers/daemon';
import { endControl, runVmm, type VmmProc } from '../helpers/vmmproc';
import { expectStatus, until } from '../helpers/assert';

const ESRCH = 3;

const exitOf = (v: VmmProc) =>
  new Promise<void>((resolve) => {
    if (v.proc.exitCode !== null || v.proc.signalCode !== null) resolve();
    else v.proc.once('exit', () => resolve());
  });

/** The "Max locked memory" line of /proc/<pid>/limits (prlimit of another uid's process needs CAP_SYS_RESOURCE to read). */
const memlockOf = (pid: number): string => /^Max locked memory.*$/m.exec(readFileSync(`/proc/${pid}/limits`, 'utf8'))?.[0] ?? '';

const alive = (pid: number): boolean => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};

for (const path of ['SO_PEERPIDFD', 'no SO_PEERPIDFD (pid + proof)'] as const) {
  const fallback = path !== 'SO_PEERPIDFD';
  describe(`who a VMM is, ${path}`, () => {
    let d: RunningDaemon;
    let c: KvmVfioApi;
    let handoff: string;
    let cvmm: string;
    const procs: VmmProc[] = [];
    const pids: number[] = [];

    before(async () => {
      cvmm = await buildCVmm();
      const wrap = fallback ? [await buildNoPeerPidfd()] : undefined;
      d = await startDaemon({ wrap, args: ['--vmm-exit-grace-ms', '2000'] });
      c = d.client();
      handoff = join(d.runtimeDir, 'handoff.sock');
    });

    after(async () => {
      for (const v of procs) v.kill();
      for (const pid of pids) if (alive(pid)) process.kill(pid, 'SIGKILL');
      await d?.cleanup();
      await removeCVmm();
    });

    const cVmm = (token: string, fork?: 'early' | 'late') => {
      const v = runVmm([cvmm, handoff], token, true, { env: fork ? { KVMVFIO_FORK: fork } : {}, control: fork === 'late' });
      procs.push(v);
      return v;
    };

    test('an ATTACH on the connection of a VMM that has exited is refused (ESRCH), nothing sent, the token still good', async () => {
      const { vm, attach_token } = await c.createVm({ name: 'orphan', vmm_uid: 65534, vfio_device: true });
      const v = cVmm(attach_token!.token, 'early');
      const child = Number((await v.waitFor('forked')).child);
      pids.push(child);
      const refused = await v.waitFor('attach-refused');
      assert.equal(refused.errno, ESRCH, JSON.stringify(refused));
      assert.match(String(refused.reason), fallback ? /does not hold the connection|exited/ : /has exited/);
      assert.ok(!v.events.some((e) => e.event === 'attached'));
      const still = await c.getVm(vm!.id);
      assert.equal(still.state, 'VM_STATE_PENDING');
      assert.equal(still.vmm_pid, 0);
      const line = await d.waitForLog((l) => l.event === 'attach-refused');
      assert.match(String(line.reason), /ESRCH/);

      // The token was not spent: a VMM that is what it connected as attaches with it.
      const good = cVmm(attach_token!.token);
      await good.waitFor('attached');
      await until('RUNNING', async () => (await c.getVm(vm!.id)).state === 'VM_STATE_RUNNING');
      const attached = await d.waitForLog((l) => l.event === 'vmm-attached' && l.vm === vm!.id);
      assert.equal(attached.pidfd, fallback ? 'holds-socket' : 'SO_PEERPIDFD');
      await c.deleteVm({ vm_id: vm!.id, force: true });
    });

    test('a VMM that forks and attaches from its child is the process that connected: its exit ends the VM', async () => {
      const { vm, attach_token } = await c.createVm({ name: 'forker', vmm_uid: 65534, vfio_device: true });
      const v = cVmm(attach_token!.token, 'late');
      const child = Number((await v.waitFor('forked')).child);
      pids.push(child);
      await v.waitFor('attached');
      const running = await until('RUNNING', async () => {
        const g = await c.getVm(vm!.id);
        return g.state === 'VM_STATE_RUNNING' && g;
      });
      assert.equal(running.vmm_pid, v.pid, 'the connecting process, not the child that spoke');
      endControl(v);
      await exitOf(v);
      await until('EXITED', async () => (await c.getVm(vm!.id)).state === 'VM_STATE_EXITED');
      await v.waitFor('holding');
      assert.ok(alive(child), 'the child lives on; the VM record no longer counts on it');
      await c.deleteVm({ vm_id: vm!.id });
    });

    test("a pid handed to another tenant's process before the ATTACH: that process is never limited nor killed", { skip: process.getuid!() !== 0 ? 'needs root (ns_last_pid)' : false }, async () => {
      const { vm, attach_token } = await c.createVm({ name: 'reuse', vmm_uid: 65534, memlock_bytes: String(32 << 20) });
      // Give the exited VMM's pid to a victim (uid 1) through ns_last_pid; a few tries, in case another fork takes it first.
      let victim: ReturnType<typeof spawn> | undefined;
      let v: VmmProc | undefined;
      for (let round = 0; round < 8 && !victim; round++) {
        // The child attaches only once the test ends its control pipe, after the victim took the pid.
        v = runVmm([cvmm, handoff], attach_token!.token, true, { env: { KVMVFIO_FORK: 'early' }, control: true });
        procs.push(v);
        pids.push(Number((await v.waitFor('forked')).child));
        await exitOf(v);
        writeFileSync('/proc/sys/kernel/ns_last_pid', String(v.pid - 1));
        const s = spawn('setpriv', ['--reuid=1', '--regid=1', '--clear-groups', 'sleep', '600'], { stdio: 'ignore' });
        if (s.pid === v.pid) victim = s;
        else {
          s.kill('SIGKILL');
          endControl(v);
        }
      }
      assert.ok(victim && v, 'the victim never got the pid');
      const victimPid = victim.pid!;
      pids.push(victimPid);
      await until('the victim runs sleep', async () => alive(victimPid));
      const limitBefore = memlockOf(victimPid);
      endControl(v);
      const refused = await v.waitFor('attach-refused');
      if (!fallback) {
        // SO_PEERPIDFD names the process that connected, whatever its pid became: it has exited.
        assert.equal(refused.errno, ESRCH);
      } else {
        assert.equal(refused.errno, ESRCH, JSON.stringify(refused));
        assert.match(String(refused.reason), /does not hold the connection/);
      }
      assert.deepEqual(memlockOf(victimPid), limitBefore, 'no prlimit on the victim');
      const still = await c.getVm(vm!.id);
      assert.equal(still.state, 'VM_STATE_PENDING');
      assert.equal(still.vmm_pid, 0);
      // Nothing of the VM points at the victim: a forced delete kills nobody.
      await c.deleteVm({ vm_id: vm!.id, force: true });
      await new Promise((r) => setTimeout(r, 100));
      assert.ok(alive(victimPid), 'the victim lives');
      victim.kill('SIGKILL');
      await expectStatus(c.getVm(vm!.id), status.NOT_FOUND);
    });
  });
}
