import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { readAccounts } from '../../src/broker/accounts';
import { PermissionDeniedError } from '../../src/broker/errors';
import { Policy, PolicyError, UNLIMITED } from '../../src/broker/policy';

function etc(): { dir: string; done(): void } {
  const dir = mkdtempSync(join(tmpdir(), 'kvmvfio-etc-'));
  writeFileSync(join(dir, 'passwd'), 'root:x:0:0::/root:/bin/sh\nnova:x:1500:1500::/:/bin/false\nops1:x:1600:1600::/:/bin/false\n');
  writeFileSync(join(dir, 'group'), 'root:x:0:\nnova:x:1500:\nkvmvfio:x:990:ops1\n');
  return { dir, done: () => rmSync(dir, { recursive: true, force: true }) };
}

test('principals match by user name, by group membership in /etc/group, by uid and gid; the first match applies; root is implicit', () => {
  const e = etc();
  try {
    const p = Policy.fromDocument(
      {
        principals: [
          { name: 'nova', match: { users: ['nova'] }, calls: ['CreateVm'], iommuGroups: ['10-19'], vmmUids: 'any' },
          { name: 'ops', match: { groups: ['kvmvfio'] }, calls: ['*'], admin: true },
          { name: 'late', match: { uids: [1600] }, calls: ['GetVm'] },
        ],
      },
      'test',
      readAccounts(e.dir),
    );
    assert.equal(p.principalOf({ uid: 1500, gid: 1500 })?.name, 'nova');
    assert.equal(p.principalOf({ uid: 1600, gid: 1600 })?.name, 'ops', 'member of kvmvfio by /etc/group, and ops comes first');
    assert.equal(p.principalOf({ uid: 7, gid: 990 })?.name, 'ops', 'primary gid');
    assert.equal(p.principalOf({ uid: 0, gid: 0 })?.name, 'root');
    assert.equal(p.principalOf({ uid: 42, gid: 42 }), undefined);
    const nova = p.authorize({ uid: 1500, gid: 1500 }, 'CreateVm');
    assert.equal(nova.mayUseGroup(10), true);
    assert.equal(nova.mayUseGroup(19), true);
    assert.equal(nova.mayUseGroup(20), false);
    assert.equal(nova.mayNameVmmUid(123456), true);
    assert.throws(() => p.authorize({ uid: 1500, gid: 1500 }, 'DeleteVm'), (err: unknown) => err instanceof PermissionDeniedError && /nova lacks the permission to call DeleteVm/.test(err.message));
    assert.throws(() => p.authorize({ uid: 42, gid: 42 }, 'GetVm'), /matches no principal/);
    assert.throws(() => Policy.rootOnly().authorize({ uid: 42, gid: 42 }, 'GetVm'), /no policy is loaded, so only uid 0 may/);
  } finally {
    e.done();
  }
});

test('problems are reported with where and what, all at once; unknown names are problems too', () => {
  const e = etc();
  try {
    assert.throws(
      () =>
        Policy.fromDocument(
          { principals: [{ name: 'a b', match: { users: ['ghost'] }, calls: ['*'], extra: 1 }, { name: 'c', match: { uids: [-1] }, calls: [] }] },
          'p.json',
          readAccounts(e.dir),
        ),
      (err: unknown) => {
        assert.ok(err instanceof PolicyError);
        const all = err.problems.join('\n');
        assert.match(all, /principals\[0\]\.name: a name is 1-64 characters/);
        assert.match(all, /principals\[0\]: Unrecognized key\(s\) in object: 'extra'/);
        assert.match(all, /principals\[1\]\.match\.uids\[0\]: Number must be greater than or equal to 0/);
        return true;
      },
    );
    assert.throws(
      () => Policy.fromDocument({ principals: [{ name: 'a', match: { users: ['ghost'] }, calls: ['*'] }] }, 'p.json', readAccounts(e.dir)),
      /principals\[0\]\.match\.users\[0\]: no user "ghost" on this host/,
    );
    assert.throws(() => Policy.fromDocument({ principals: [{ name: 'a', match: { uids: [1] }, calls: [] }, { name: 'a', match: { uids: [2] }, calls: [] }] }, 'p.json', readAccounts(e.dir)), /principal names must be unique/);
  } finally {
    e.done();
  }
});

test('"root" (in any case) is the built-in principal of uid 0: a policy cannot give the name to another', () => {
  const e = etc();
  try {
    for (const name of ['root', 'Root', 'ROOT']) {
      assert.throws(
        () => Policy.fromDocument({ principals: [{ name, match: { uids: [1000] }, calls: ['*'] }] }, 'p.json', readAccounts(e.dir)),
        (err: unknown) => err instanceof PolicyError && err.problems.some((x) => /^principals\[0\]\.name: "root" is the built-in principal of uid 0/.test(x)),
        name,
      );
    }
    const p = Policy.fromDocument({ principals: [{ name: 'root-ish', match: { uids: [1000] }, calls: ['*'] }] }, 'p.json', readAccounts(e.dir));
    assert.equal(p.principalOf({ uid: 1000, gid: 1000 })?.name, 'root-ish');
    assert.equal(p.principalOf({ uid: 0, gid: 0 })?.name, 'root');
  } finally {
    e.done();
  }
});

test('memlock limits: bytes, K/M/G/T sizes or "unlimited"; default 0 for a principal that is not an admin, unlimited for an admin and for uid 0', () => {
  const e = etc();
  try {
    const p = Policy.fromDocument(
      {
        principals: [
          { name: 'tenant', match: { uids: [1000] }, calls: ['*'] },
          { name: 'sized', match: { uids: [1001] }, calls: ['*'], limits: { memlockPerVmBytes: '2G', memlockBytes: 8 * 2 ** 30 } },
          { name: 'ops', match: { uids: [1002] }, calls: ['*'], admin: true },
          { name: 'capped-ops', match: { uids: [1003] }, calls: ['*'], admin: true, limits: { memlockPerVmBytes: '512MiB' } },
          { name: 'open', match: { uids: [1004] }, calls: ['*'], limits: { memlockPerVmBytes: 'unlimited', memlockBytes: '1t' } },
        ],
      },
      'p.json',
      readAccounts(e.dir),
    );
    const limits = (name: string) => {
      const { memlockPerVmBytes, memlockBytes } = p.principalNamed(name)!.limits;
      return [memlockPerVmBytes, memlockBytes];
    };
    assert.deepEqual(limits('tenant'), [0, 0]);
    assert.deepEqual(limits('sized'), [2 ** 31, 2 ** 33]);
    assert.deepEqual(limits('ops'), [UNLIMITED, UNLIMITED]);
    assert.deepEqual(limits('capped-ops'), [512 * 2 ** 20, UNLIMITED]);
    assert.deepEqual(limits('open'), [UNLIMITED, 2 ** 40]);
    assert.deepEqual(limits('root'), [UNLIMITED, UNLIMITED]);
    assert.equal(p.principalNamed('nobody'), undefined);
    assert.deepEqual(p.principals.map((x) => x.name), ['tenant', 'sized', 'ops', 'capped-ops', 'open']);

    const problems = (limits: unknown) => {
      try {
        Policy.fromDocument({ principals: [{ name: 'x', match: { uids: [1] }, calls: ['*'], limits }] }, 'p.json', readAccounts(e.dir));
      } catch (err) {
        assert.ok(err instanceof PolicyError);
        return err.problems.join('\n');
      }
      assert.fail(`accepted ${JSON.stringify(limits)}`);
    };
    assert.match(problems({ memlockBytes: -1 }), /limits\.memlockBytes: -1 is not a whole number of bytes/);
    assert.match(problems({ memlockBytes: 1.5 }), /limits\.memlockBytes: 1\.5 is not a whole number of bytes/);
    assert.match(problems({ memlockPerVmBytes: 'lots' }), /limits\.memlockPerVmBytes: "lots" is not a size/);
    assert.match(problems({ memlockPerVmBytes: '2 G' }), /is not a size/);
    assert.match(problems({ memlockPerVmBytes: true }), /true is not a size/);
    assert.match(problems({ memlockBytes: '9999999T' }), /9999999T is more than 9007199254740991 bytes; write "unlimited"/);
    assert.match(problems({ memlock: 1 }), /Unrecognized key\(s\) in object: 'memlock'/);
  } finally {
    e.done();
  }
});
