/**
 * A minimal unprivileged VMM, for test/kernel/guest.test.ts. Run as
 *
 *   setpriv --reuid=65534 --regid=65534 --clear-groups node run-guest-child.js [MESSAGE]
 *
 * with KVMVFIO_GUEST_CHILD=1 in its environment and an open /dev/kvm as fd 3. It shows that it cannot open /dev/kvm by
 * path, takes fd 3, makes its own VM, runs the tiny guest and prints one line
 * of JSON: { uid, gid, euid, groups, openByPath, apiVersion, serial, exits, halted }
 * or { ..., error }. Exit status 0 when the guest ran to HLT.
 */
import { openSync, closeSync, readFileSync } from 'node:fs';
import { Kvm, OwnedFd, SysError } from '../../src/kernel';
import { runTinyGuest } from '../../src/vmm/tinyguest';

const KVM_FD = 3;

function main(): number {
  // process.getgroups() adds the egid; /proc/self/status lists the supplementary groups only.
  const groupsLine = /^Groups:(.*)$/m.exec(readFileSync('/proc/self/status', 'utf8'))?.[1] ?? '';
  const groups = groupsLine.trim().split(/\s+/).filter(Boolean).map(Number);
  const out: Record<string, unknown> = { uid: process.getuid!(), gid: process.getgid!(), euid: process.geteuid!(), groups };
  try {
    closeSync(openSync('/dev/kvm', 'r+'));
    out.openByPath = 'opened';
  } catch (e) {
    out.openByPath = (e as NodeJS.ErrnoException).code;
  }
  const kvm = Kvm.fromFd(new OwnedFd(KVM_FD, '/dev/kvm (inherited fd 3)'), '/dev/kvm (inherited fd 3)');
  try {
    out.apiVersion = kvm.apiVersion();
    const vm = kvm.createVmSync('child vm');
    try {
      Object.assign(out, runTinyGuest(kvm, vm, process.argv[2]));
    } finally {
      void vm.close();
    }
  } catch (e) {
    out.error = e instanceof SysError ? { message: e.message, code: e.code, call: e.call } : { message: String(e) };
  } finally {
    kvm.closeSync();
  }
  process.stdout.write(JSON.stringify(out) + '\n');
  return out.halted === true ? 0 : 1;
}

// `node --test dist/test/` also runs every file under test/helpers as a test
// file: do nothing unless started as the child, with the variable the test sets.
if (process.env.KVMVFIO_GUEST_CHILD === '1') process.exitCode = main();
