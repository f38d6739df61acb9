/**
 * User and group names, read from /etc/passwd and /etc/group (Node has no
 * getpwnam). Used when a policy names principals by name: names are resolved
 * when the policy is loaded, so a rename takes a reload.
 */
import { readFileSync } from 'node:fs';

export interface Accounts {
  uidOf(user: string): number | undefined;
  gidOf(group: string): number | undefined;
  nameOfUid(uid: number): string | undefined;
  /** Names of the users listed as members of group `gid` in /etc/group. */
  membersOf(gid: number): string[];
}

function rows(path: string): string[][] {
  try {
    return readFileSync(path, 'utf8')
      .split('\n')
      .filter((l) => l && !l.startsWith('#'))
      .map((l) => l.split(':'));
  } catch {
    return [];
  }
}

export function readAccounts(etc = '/etc'): Accounts {
  const users = new Map<string, number>();
  const uidNames = new Map<number, string>();
  for (const r of rows(`${etc}/passwd`)) {
    const uid = Number(r[2]);
    if (r[0] && Number.isInteger(uid)) {
      users.set(r[0], uid);
      if (!uidNames.has(uid)) uidNames.set(uid, r[0]);
    }
  }
  const groups = new Map<string, number>();
  const members = new Map<number, string[]>();
  for (const r of rows(`${etc}/group`)) {
    const gid = Number(r[2]);
    if (r[0] && Number.isInteger(gid)) {
      groups.set(r[0], gid);
      members.set(gid, (r[3] ?? '').split(',').filter(Boolean));
    }
  }
  return {
    uidOf: (u) => users.get(u),
    gidOf: (g) => groups.get(g),
    nameOfUid: (uid) => uidNames.get(uid),
    membersOf: (gid) => members.get(gid) ?? [],
  };
}
