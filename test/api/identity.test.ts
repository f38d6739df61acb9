/**
 * A VMM is named by a pidfd, never by a bare pid — played as a hostile
 * tenant would, against a real daemon and the C reference VMM as nobody:
 *   - a VMM that connects, forks and exits, its child presenting the token on
 *     the inherited connection, is refused (the peer that connected is gone);
 *   - so is an ATTACH sent by a forked child while the connecting process
 *     lives: the kernel's SCM_CREDENTIALS name the sender;
 *   - a VMM that connects, sends its ATTACH and exits, its pid given to
 *     another tenant's process (ns_last_pid) before the daemon reads the
 *     ATTACH (the daemon held with SIGSTOP): that process is never limited
 *     (prlimit) nor killed.
 * Each runs on the three paths: SO_PEERPIDFD; a kernel without it (Debian
 * 12's 6.1, forced with a seccomp filter, test/helpers/no-peerpidfd.c) where
 * sock_diag shows who holds the connection; and one where netlink is not
 * allowed either (the systemd unit's sandbox), where the ATTACH's sender and
 * its start time must do.
 */
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';

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

const PATHS = [
  { name: 'SO_PEERPIDFD', wrap: undefined, proof: 'SO_PEERPIDFD', reuse: /SO_PEERPIDFD on peer pid \d+ \(it has exited\)/ },
  { name: 'no SO_PEERPIDFD, sock_diag', wrap: [] as string[], proof: 'holds-socket', reuse: /does not hold the connection/ },
  { name: 'no SO_PEERPIDFD, no netlink', wrap: ['--no-netlink'], proof: 'sent-record', reuse: /a process started after the connection/ },
] as const;

for (const path of PATHS) {
  describe(`who a VMM is: ${path.name}`, () => {
    let d: RunningDaemon;
    let c: KvmVfioApi;
    let handoff: string;
    let cvmm: string;
    const procs: VmmProc[] = [];
    const pids: number[] = [];

    before(async () => {
      cvmm = await buildCVmm();
      const wrap = path.wrap ? [await buildNoPeerPidfd(), ...path.wrap] : undefined;
      d = await startDaemon({ wrap, args: ['--vmm-exit-grace-ms', '2000'] });
      c = d.client();
      handoff = join(d.runtimeDir, 'handoff.sock');
    });

    after(async () => {
      if (d && alive(d.pid)) process.kill(d.pid, 'SIGCONT');
      for (const v of procs) v.kill();
      for (const pid of pids) if (alive(pid)) process.kill(pid, 'SIGKILL');
      await d?.cleanup();
      await removeCVmm();
    });

    const cVmm = (token: string, env: Record<string, string> = {}, control = false) => {
      const v = runVmm([cvmm, handoff], token, true, { env, control });
      procs.push(v);
      return v;
    };

    /** The VM is untouched and its token still good: a VMM that is what it connected as attaches with it. */
    const stillPending = async (vmId: string, token: string) => {
      const still = await c.getVm(vmId);
      assert.equal(still.state, 'VM_STATE_PENDING');
      assert.equal(still.vmm_pid, 0);
      const good = cVmm(token);
      await good.waitFor('attached');
      await until('RUNNING', async () => (await c.getVm(vmId)).state === 'VM_STATE_RUNNING');
      const attached = await d.waitForLog((l) => l.event === 'vmm-attached' && l.vm === vmId);
      assert.equal(attached.pidfd, path.proof);
      await c.deleteVm({ vm_id: vmId, force: true });
    };

    test('an ATTACH on the connection of a VMM that has exited is refused (ESRCH), nothing sent, the token still good', async () => {
      const { vm, attach_token } = await c.createVm({ name: 'orphan', vmm_uid: 65534, vfio_device: true });
      const v = cVmm(attach_token!.token, { KVMVFIO_FORK: 'early' });
      pids.push(Number((await v.waitFor('forked')).child));
      const refused = await v.waitFor('attach-refused');
      assert.equal(refused.errno, ESRCH, JSON.stringify(refused));
      assert.match(String(refused.reason), /not from the process that connected/);
      assert.ok(!v.events.some((e) => e.event === 'attached'));
      const line = await d.waitForLog((l) => l.event === 'attach-refused');
      assert.match(String(line.reason), /ESRCH/);
      await stillPending(vm!.id, attach_token!.token);
    });

    test('an ATTACH sent by a forked child while the connecting process lives is refused', async () => {
      const { vm, attach_token } = await c.createVm({ name: 'forker', vmm_uid: 65534, vfio_device: true });
      const v = cVmm(attach_token!.token, { KVMVFIO_FORK: 'late' }, true);
      const child = Number((await v.waitFor('forked')).child);
      pids.push(child);
      const refused = await v.waitFor('attach-refused');
      assert.equal(refused.errno, ESRCH);
      assert.match(String(refused.reason), new RegExp(`from pid ${child}, not from the process that connected \\(pid ${v.pid}\\)`));
      endControl(v);
      await stillPending(vm!.id, attach_token!.token);
    });

    test("a VMM's pid handed to another tenant's process before its ATTACH is read: that process is never limited nor killed", { skip: process.getuid!() !== 0 ? 'needs root (ns_last_pid, SIGSTOP)' : false }, async () => {
      const { vm, attach_token } = await c.createVm({ name: 'reuse', vmm_uid: 65534, memlock_bytes: String(32 << 20) });
      let victim: ChildProcess | undefined;
      let v: VmmProc | undefined;
      try {
        for (let round = 0; round < 8 && !victim; round++) {
          // Connects, then waits: the daemon accepts it (and would read its ATTACH at once).
          v = cVmm(attach_token!.token, { KVMVFIO_SEND_AND_EXIT: '1' }, true);
          pids.push(Number((await v.waitFor('keeper')).child));
          const vmmPid = v.pid;
          await d.waitForLog((l) => l.event === 'session-open' && l.vmm_pid === vmmPid);
          // Past the 10 ms tick of the accept: a process's start time is known to the tick.
          await new Promise((r) => setTimeout(r, 30));
          // The daemon is held, the VMM sends its ATTACH and exits, and its pid goes to a victim (uid 1).
          process.kill(d.pid, 'SIGSTOP');
          endControl(v);
          await exitOf(v);
          writeFileSync('/proc/sys/kernel/ns_last_pid', String(v.pid - 1));
          const s = spawn('setpriv', ['--reuid=1', '--regid=1', '--clear-groups', 'sleep', '600'], { stdio: 'ignore' });
          if (s.pid === v.pid) victim = s;
          else s.kill('SIGKILL');
          process.kill(d.pid, 'SIGCONT');
        }
        assert.ok(victim && v, 'the victim never got the pid');
        const victimPid = victim.pid!;
        pids.push(victimPid);
        await until('the victim runs sleep', async () => readFileSync(`/proc/${victimPid}/comm`, 'utf8').trim() === 'sleep');
        const limitBefore = memlockOf(victimPid);
        const refused = await d.waitForLog((l) => l.event === 'attach-refused' && l.vmm_pid === victimPid);
        assert.match(String(refused.reason), path.reuse);
        assert.match(String(refused.reason), /ESRCH/);
        assert.equal(memlockOf(victimPid), limitBefore, 'no prlimit on the victim');
        const still = await c.getVm(vm!.id);
        assert.equal(still.state, 'VM_STATE_PENDING');
        assert.equal(still.vmm_pid, 0);
        // Nothing of the VM points at the victim: a forced delete kills nobody.
        await c.deleteVm({ vm_id: vm!.id, force: true });
        await new Promise((r) => setTimeout(r, 100));
        assert.ok(alive(victimPid), 'the victim lives');
        await expectStatus(c.getVm(vm!.id), status.NOT_FOUND);
      } finally {
        if (alive(d.pid)) process.kill(d.pid, 'SIGCONT');
        victim?.kill('SIGKILL');
      }
    });
  });
}
