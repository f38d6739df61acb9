import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { readAccounts } from '../../src/broker/accounts';
import { PermissionDeniedError } from '../../src/broker/errors';
import { Policy, PolicyError } from '../../src/broker/policy';

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
