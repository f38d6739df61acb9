/**
 * The state store (LMDB): group commit, durable() after the commit that
 * carries a change, a full filesystem (a real tmpfs) refused and recovered
 * from without a file per retry, damage that costs the damaged entries
 * only, the migration of a version-2 state dir, and a private state dir.
 */
import { describe, test, beforeEach, afterEach, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { chmod, lstat, mkdir, mkdtemp, readFile, readdir, rm, stat, symlink, unlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { ClaimState, SessionState } from '../../src/broker/state';
import { STORE_FILE, type StateSource, StateStore, StateWriteError, loadState, prepareStateDir } from '../../src/broker/store';
import { type NewVm, type VmRecord, VmRegistry } from '../../src/broker/vms';

const spec = (name: string): NewVm => ({
  name,
  labels: { app: 'web' },
  ownerUid: 1000,
  vmmUid: 65534,
  vfioDevice: false,
  groups: [],
  memlockBytes: 0,
  requestId: '',
  requestFingerprint: name,
  principal: '',
});

/** The daemon's wiring, in small: a registry that tells the store, and claims and sessions in maps. */
class World implements StateSource {
  readonly vms = new VmRegistry();
  readonly claims = new Map<number, ClaimState>();
  readonly sessions = new Map<string, SessionState>();
  reads = 0;

  revision() {
    return this.vms.revision;
  }
  vm(id: string) {
    this.reads++;
    return this.vms.get(id);
  }
  claim(group: number) {
    return this.claims.get(group);
  }
  session(vmId: string) {
    return this.sessions.get(vmId);
  }
  ids() {
    return { vms: [...this.vms.all()].map((v) => v.id), claims: this.claims.keys(), sessions: this.sessions.keys() };
  }
  add(name: string): VmRecord {
    return this.vms.insert(this.vms.newId(), spec(name));
  }
}

const warnings: Record<string, unknown>[] = [];
const failures: StateWriteError[] = [];
const recoveries: { failedForMs: number; attempts: number }[] = [];
const events = {
  onWriteFailed: (e: StateWriteError) => failures.push(e),
  onRecovered: (i: { failedForMs: number; attempts: number }) => recoveries.push(i),
  onWarning: (e: Record<string, unknown>) => warnings.push(e),
};

function storeOf(dir: string, world: World, opts = {}): StateStore {
  const store = new StateStore(dir, world, events, opts);
  world.vms.subscribe((c) => store.vmChanged(c.vm.id));
  return store;
}

const warn = (e: Record<string, unknown>) => warnings.push(e);

let dir: string;
beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'kvmvfiod-store-'));
  warnings.length = 0;
  failures.length = 0;
  recoveries.length = 0;
});
afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('commits', () => {
  test('the changes of a burst share one commit; durable() resolves once they are read back', async () => {
    const w = new World();
    const store = storeOf(dir, w);
    await store.open();
    const first = store.commits;
    const made = Array.from({ length: 200 }, (_, i) => w.add(`vm-${i}`));
    for (const vm of made.slice(0, 50)) w.vms.transition(vm, 'RUNNING');
    await store.durable();
    assert.equal(store.commits - first, 1, 'one transaction for the burst');
    w.claims.set(7, { group: 7, vmId: made[0].id, vmName: 'vm-0', holding: 'claimed' });
    store.claimChanged(7);
    w.vms.remove(made[199]);
    await store.durable();
    assert.equal(store.commits - first, 2);
    await store.close();
    const loaded = await loadState(dir, warn);
    assert.equal(loaded.from, 'store');
    assert.equal(loaded.state!.vms.length, 199);
    assert.deepEqual(
      loaded.state!.vms.map((v) => v.name),
      made.slice(0, 199).map((v) => v.name),
      'records come back in the order they were made',
    );
    assert.equal(loaded.state!.vms.filter((v) => v.state === 'RUNNING').length, 50);
    assert.deepEqual(loaded.state!.claims, [{ group: 7, vmId: made[0].id, vmName: 'vm-0', holding: 'claimed' }]);
    assert.equal(loaded.state!.revision, w.vms.revision);
    assert.deepEqual(warnings, []);
  });

  test('changes told while a commit is on its way go together into the next one', async () => {
    const w = new World();
    const store = storeOf(dir, w);
    await store.open();
    const first = store.commits;
    const waits: Promise<void>[] = [];
    // 20 rounds of 25 creates, each round started while the previous commit may still be in flight.
    for (let round = 0; round < 20; round++) {
      for (let i = 0; i < 25; i++) w.add(`r${round}-${i}`);
      waits.push(store.durable());
      await new Promise((r) => setImmediate(r));
    }
    await Promise.all(waits);
    const commits = store.commits - first;
    assert.ok(commits >= 1 && commits <= 20, `${commits} commits for 20 rounds`);
    await store.close();
    assert.equal((await loadState(dir, warn)).state!.vms.length, 500);
  });

  test('a VM changed many times before its commit is read once', async () => {
    const w = new World();
    const store = storeOf(dir, w);
    await store.open();
    const vm = w.add('busy');
    w.reads = 0;
    for (let i = 0; i < 100; i++) w.vms.update(vm, (v) => (v.failureReason = `round ${i}`));
    await store.durable();
    assert.equal(w.reads, 1);
    await store.close();
    assert.equal((await loadState(dir, warn)).state!.vms[0].failureReason, 'round 99');
  });

  test('open() writes the state as restored and drops entries it no longer has', async () => {
    const w = new World();
    const store = storeOf(dir, w);
    await store.open();
    const keep = w.add('keep');
    const gone = w.add('gone');
    await store.durable();
    await store.close();
    const next = new World();
    next.vms.restore([{ ...keep }], w.vms.revision);
    const again = storeOf(dir, next);
    await again.open();
    await again.close();
    const s = (await loadState(dir, warn)).state!;
    assert.deepEqual(
      s.vms.map((v) => v.id),
      [keep.id],
    );
    assert.notEqual(keep.id, gone.id);
    assert.equal(s.revision, w.vms.revision);
  });
});

describe('a filesystem that fills', () => {
  let mnt: string;
  before(async () => {
    mnt = await mkdtemp(join(tmpdir(), 'kvmvfiod-full-'));
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=1m,mode=0700', 'tmpfs', mnt]);
  });
  after(async () => {
    execFileSync('umount', [mnt]);
    await rm(mnt, { recursive: true, force: true });
  });

  test('ENOSPC: durable() and check() say so, nothing is written, no file per retry; space back: it recovers by itself', async () => {
    const state = join(mnt, 'state');
    const w = new World();
    const store = storeOf(state, w, { retryMs: 20, maxRetryMs: 50 });
    await store.open();
    const kept = w.add('kept');
    await store.durable();
    // Fill the filesystem, then make changes that need new pages.
    const filler = join(mnt, 'filler');
    try {
      execFileSync('dd', ['if=/dev/zero', `of=${filler}`, 'bs=4k', 'count=1000'], { stdio: 'ignore' });
    } catch {
      // dd stops at ENOSPC: the filesystem is full now.
    }
    const big = Array.from({ length: 100 }, (_, i) => w.vms.insert(w.vms.newId(), { ...spec(`big-${i}`), labels: { blob: 'x'.repeat(1000) } }));
    const err = await store.durable().then(
      () => undefined,
      (e: unknown) => e,
    );
    assert.ok(err instanceof StateWriteError, `durable() rejects with a StateWriteError, got ${String(err)}`);
    assert.equal(err.errno, 'ENOSPC');
    assert.throws(() => store.check(), /ENOSPC/);
    assert.equal(failures[0]?.errno, 'ENOSPC');
    const filesWhileFailing = (await readdir(state)).sort();
    await new Promise((r) => setTimeout(r, 300));
    assert.ok(failures.length >= 3, `retried (${failures.length} failures)`);
    assert.deepEqual((await readdir(state)).sort(), filesWhileFailing, 'retries leave no file behind');
    assert.deepEqual(filesWhileFailing, [STORE_FILE, `${STORE_FILE}-lock`]);
    assert.equal(recoveries.length, 0);

    await unlink(filler);
    for (let i = 0; i < 100 && store.failure; i++) await new Promise((r) => setTimeout(r, 20));
    assert.equal(store.failure, undefined, 'recovered once space came back');
    assert.equal(recoveries.length, 1);
    store.check();
    await store.durable();
    await store.close();
    const s = (await loadState(state, warn)).state!;
    assert.equal(s.vms.length, 1 + big.length);
    assert.ok(s.vms.some((v) => v.id === kept.id));
  });

  test('close() with changes it cannot save says how many and why', async () => {
    const state = join(mnt, 'state2');
    const w = new World();
    const store = storeOf(state, w, { retryMs: 20, maxRetryMs: 50 });
    await store.open();
    const filler = join(mnt, 'filler2');
    try {
      execFileSync('dd', ['if=/dev/zero', `of=${filler}`, 'bs=4k', 'count=1000'], { stdio: 'ignore' });
    } catch {
      // full
    }
    for (let i = 0; i < 200; i++) w.vms.insert(w.vms.newId(), { ...spec(`big-${i}`), labels: { blob: 'x'.repeat(2000) } });
    const r = await store.close();
    await unlink(filler);
    assert.equal(r.unsaved, 200);
    assert.equal(r.error?.errno, 'ENOSPC');
  });
});

/** Writes `n` VMs to a store in `dir` and closes it. */
async function storeWith(n: number): Promise<VmRecord[]> {
  const w = new World();
  const store = storeOf(dir, w);
  await store.open();
  const vms = Array.from({ length: n }, (_, i) => w.add(`vm-${i}`));
  await store.durable();
  await store.close();
  return vms;
}

describe('damage', () => {
  test('a damaged byte in one record costs that record: the others come back, the file is set aside', async () => {
    const vms = await storeWith(5);
    const path = join(dir, STORE_FILE);
    const buf = await readFile(path);
    const at = buf.indexOf(Buffer.from(`"name":"vm-2"`));
    assert.ok(at > 0, 'the record is in the file');
    buf[at + 9] ^= 0x01;
    await writeFile(path, buf);
    const loaded = await loadState(dir, warn);
    assert.deepEqual(
      loaded.state!.vms.map((v) => v.name),
      ['vm-0', 'vm-1', 'vm-3', 'vm-4'],
    );
    assert.ok(loaded.damage, 'damage reported');
    assert.deepEqual(
      loaded.damage.badEntries.map((b) => b.key),
      [`vm/${vms[2].id}`],
    );
    assert.equal(loaded.damage.badEntries[0].why, 'checksum mismatch');
    assert.ok((await stat(loaded.damage.setAside)).isFile());
    assert.equal(warnings.filter((w) => w.event === 'state-damaged').length, 1);
    // A new store starts in its place.
    await assert.rejects(lstat(path));
  });

  test('a page of garbage in the middle: what can be read from either end comes back, no crash', async () => {
    await storeWith(400);
    const path = join(dir, STORE_FILE);
    const buf = await readFile(path);
    // Scribble over the whole leaf page that holds vm-200, its header included.
    const at = buf.indexOf(Buffer.from('"name":"vm-200"'));
    assert.ok(at > 0);
    const page = Math.floor(at / 4096);
    for (let i = 0; i < 4096; i++) buf[page * 4096 + i] = (i * 131 + 7) & 0xff;
    await writeFile(path, buf);
    const loaded = await loadState(dir, warn);
    assert.ok(loaded.damage, 'damage reported');
    const n = loaded.state!.vms.length;
    assert.ok(n > 0 && n < 400, `${n} of 400 records recovered`);
  });

  test('a file that is not a store at all: set aside, nothing recovered, no throw', async () => {
    await writeFile(join(dir, STORE_FILE), Buffer.alloc(64 * 1024, 0x5a));
    const loaded = await loadState(dir, warn);
    assert.ok(loaded.damage?.unreadable);
    assert.equal(loaded.state!.vms.length, 0);
  });
});

describe('migration of a version-2 state dir', () => {
  test('snapshot and journals are read, a damaged journal line costs its entry, the files are renamed once the store holds them', async () => {
    const w = new World();
    const a = w.add('a');
    const b = w.add('b');
    const c = w.add('c');
    const snapshot = { version: 2, writtenAt: '2026-01-01T00:00:00.000Z', journal: 3, revision: 3, vms: [{ ...a }], claims: [{ group: 9, vmId: a.id, vmName: 'a', holding: 'claimed' }], sessions: [] };
    await writeFile(join(dir, 'state.json'), JSON.stringify(snapshot));
    await writeFile(
      join(dir, 'state.journal.3'),
      [
        JSON.stringify({ key: `vm/${b.id}`, value: b, revision: 4, commit: true }),
        `{"key":"vm/${c.id}","value":{"id":"${c.id}",, damaged`,
        JSON.stringify({ key: 'claim/10', value: { group: 10, vmId: b.id, vmName: 'b', holding: 'claimed' }, revision: 5, commit: true }),
        '',
      ].join('\n'),
    );
    const loaded = await loadState(dir, warn);
    assert.equal(loaded.from, 'version-2');
    assert.deepEqual(loaded.legacyFiles.sort(), ['state.journal.3', 'state.json']);
    assert.deepEqual(loaded.state!.vms.map((v) => v.name).sort(), ['a', 'b']);
    assert.deepEqual(
      loaded.state!.claims.map((x) => x.group),
      [9, 10],
    );
    assert.ok(warnings.some((x) => x.event === 'state-journal-damaged'));

    // The daemon restores, then opens the store with the legacy files to rename.
    const next = new World();
    next.vms.restore(loaded.state!.vms, loaded.state!.revision);
    for (const x of loaded.state!.claims) next.claims.set(x.group, x);
    const store = storeOf(dir, next);
    await store.open(loaded.legacyFiles);
    await store.close();
    assert.deepEqual((await readdir(dir)).sort(), ['state.journal.3.migrated', 'state.json.migrated', STORE_FILE, `${STORE_FILE}-lock`]);
    const again = await loadState(dir, warn);
    assert.equal(again.from, 'store');
    assert.deepEqual(again.state!.vms.map((v) => v.name).sort(), ['a', 'b']);
    assert.equal(again.state!.claims.length, 2);
  });
});

describe('a private state dir', () => {
  test('made 0700, store files 0600; a symbolic link or a file of another user is refused', async () => {
    const state = join(dir, 'state');
    await mkdir(state, { mode: 0o755 });
    await chmod(state, 0o755);
    const store = storeOf(state, new World());
    await store.open();
    await store.close();
    assert.equal((await stat(state)).mode & 0o777, 0o700);
    assert.equal((await stat(join(state, STORE_FILE))).mode & 0o777, 0o600);
    assert.equal((await stat(join(state, `${STORE_FILE}-lock`))).mode & 0o777, 0o600);

    const elsewhere = join(dir, 'target');
    await writeFile(elsewhere, '');
    const linked = join(dir, 'linked');
    await mkdir(linked, { mode: 0o700 });
    await symlink(elsewhere, join(linked, STORE_FILE));
    await assert.rejects(prepareStateDir(linked), /symbolic link/);
    await symlink(state, join(dir, 'dirlink'));
    await assert.rejects(prepareStateDir(join(dir, 'dirlink')), /symbolic link/);
    const foreign = join(dir, 'foreign');
    await mkdir(foreign, { mode: 0o700 });
    await writeFile(join(foreign, STORE_FILE), '');
    execFileSync('chown', ['65534', join(foreign, STORE_FILE)]);
    await assert.rejects(prepareStateDir(foreign), /not a plain file of uid 0/);
  });
});
