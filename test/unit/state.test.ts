/**
 * The state file: a snapshot plus an append-only journal of changed entries.
 * Replay of puts and deletes, revisions that keep growing, compaction, a
 * write cut short by a crash, a crash between the steps of a compaction, the
 * version-1 file of earlier daemons, and a burst of changes costing one line.
 */
import { describe, test, beforeEach, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { appendFile, copyFile, mkdir, mkdtemp, readFile, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { type ClaimState, type DaemonState, type SessionState, type StateSource, StateFile, readState } from '../../src/broker/state';
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

/** The daemon's wiring, in small: a registry that tells the file, and claims and sessions in maps. */
class World implements StateSource {
  readonly vms = new VmRegistry();
  readonly claims = new Map<number, ClaimState>();
  readonly sessions = new Map<string, SessionState>();
  /** Entries read by the file: what a write costs. */
  reads = 0;
  failOn: string | undefined;

  revision() {
    return this.vms.revision;
  }
  vm(id: string) {
    this.reads++;
    if (id === this.failOn) throw new Error(`cannot read vm ${id}`);
    return this.vms.get(id);
  }
  claim(group: number) {
    this.reads++;
    return this.claims.get(group);
  }
  session(vmId: string) {
    this.reads++;
    return this.sessions.get(vmId);
  }
  ids() {
    return { vms: [...this.vms.all()].map((v) => v.id), claims: this.claims.keys(), sessions: this.sessions.keys() };
  }

  /** Told to the file through the registry's events, as in the daemon. */
  add(name: string): VmRecord {
    return this.vms.insert(this.vms.newId(), spec(name));
  }
  claim_(file: StateFile, group: number, vm: VmRecord) {
    this.claims.set(group, { group, vmId: vm.id, vmName: vm.name });
    file.claimChanged(group);
  }
  release(file: StateFile, group: number) {
    this.claims.delete(group);
    file.claimChanged(group);
  }
  attach(file: StateFile, vm: VmRecord, pid: number) {
    this.sessions.set(vm.id, { vmId: vm.id, pid, uid: 65534, gid: 65534, passive: false });
    file.sessionChanged(vm.id);
  }
  detach(file: StateFile, vm: VmRecord) {
    this.sessions.delete(vm.id);
    file.sessionChanged(vm.id);
  }

  /** What a restore must give back. */
  expected(): Omit<DaemonState, 'version' | 'writtenAt'> {
    return {
      revision: this.vms.revision,
      vms: [...this.vms.all()].map((v) => ({ ...v })).sort(byId),
      claims: [...this.claims.values()].sort((a, b) => a.group - b.group),
      sessions: [...this.sessions.values()].sort((a, b) => a.vmId.localeCompare(b.vmId)),
    };
  }
}

const byId = (a: { id: string }, b: { id: string }) => a.id.localeCompare(b.id);

function comparable(s: DaemonState | undefined): Omit<DaemonState, 'version' | 'writtenAt'> {
  assert.ok(s, 'a state was read');
  return {
    revision: s.revision,
    vms: [...s.vms].sort(byId),
    claims: [...s.claims].sort((a, b) => a.group - b.group),
    sessions: [...s.sessions].sort((a, b) => a.vmId.localeCompare(b.vmId)),
  };
}

let dir: string;
const warnings: Record<string, unknown>[] = [];
const errors: Error[] = [];
const events = { onError: (e: Error) => errors.push(e), onWarning: (e: Record<string, unknown>) => warnings.push(e) };

/** A file on `dir` wired to `world` as the daemon wires it; no minimum interval unless asked. */
function stateFile(world: World, opts: ConstructorParameters<typeof StateFile>[3] = {}): StateFile {
  const file = new StateFile(dir, world, events, { minIntervalMs: 0, ...opts });
  world.vms.subscribe((c) => file.vmChanged(c.vm.id));
  return file;
}

const journals = async () => (await readdir(dir)).filter((n) => /^state\.journal\.\d+$/.test(n)).sort();
const lines = async (path: string) => (await readFile(path, 'utf8')).split('\n').filter(Boolean);

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'kvmvfiod-state-'));
  warnings.length = 0;
  errors.length = 0;
});
afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('journal', () => {
  test('puts and deletes replay to the state as last written', async () => {
    const w = new World();
    const file = stateFile(w);
    await file.open();
    const a = w.add('a');
    const b = w.add('b');
    w.claim_(file, 3, a);
    w.claim_(file, 4, b);
    w.attach(file, a, 100);
    w.attach(file, b, 101);
    await file.flush();
    w.vms.transition(a, 'RUNNING');
    w.vms.remove(b);
    w.release(file, 4);
    w.detach(file, b);
    await file.flush();

    assert.deepEqual(comparable(await readState(dir)), w.expected());
    const read = await readState(dir);
    assert.equal(read!.vms.length, 1);
    assert.equal(read!.vms[0].state, 'RUNNING');
    assert.deepEqual(read!.claims, [{ group: 3, vmId: a.id, vmName: 'a' }]);
    // The deletions are lines of their own: the snapshot written at open() held nothing.
    const written = (await lines(file.journalPath)).map((l) => JSON.parse(l) as { key: string; value: unknown; commit?: boolean });
    assert.ok(written.some((e) => e.key === `vm/${b.id}` && e.value === null));
    assert.ok(written.some((e) => e.key === 'claim/4' && e.value === null));
    assert.ok(written.some((e) => e.key === `session/${b.id}` && e.value === null));
    assert.equal(written.filter((e) => e.commit).length, 2, 'one commit per write');
    assert.deepEqual(errors, []);
    await file.close();
  });

  test('a change writes the entries it names, not every record', async () => {
    const w = new World();
    const file = stateFile(w);
    for (let i = 0; i < 1000; i++) w.add(`vm-${i}`);
    await file.open();
    const size = (await stat(file.journalPath)).size;
    w.reads = 0;
    const vm = w.add('one-more');
    w.vms.transition(vm, 'RUNNING');
    w.claim_(file, 9, vm);
    await file.flush();
    assert.equal(w.reads, 2, 'the new VM and its claim were read, nothing else');
    const added = (await readFile(file.journalPath, 'utf8')).slice(size);
    assert.ok(added.length < 1500, `one write of two lines, ${added.length} bytes`);
    assert.equal((await readState(dir))!.vms.length, 1001);
    await file.close();
  });

  test('a burst of changes to one VM is one line', async () => {
    const w = new World();
    const file = stateFile(w, { minIntervalMs: 50 });
    await file.open();
    const vm = w.add('busy');
    for (let i = 0; i < 100; i++) w.vms.update(vm, (v) => (v.vmmPid = 1000 + i));
    await file.flush();
    const written = await lines(file.journalPath);
    assert.equal(written.length, 1);
    const entry = JSON.parse(written[0]) as { key: string; value: VmRecord; revision: number; commit: boolean };
    assert.equal(entry.key, `vm/${vm.id}`);
    assert.equal(entry.value.vmmPid, 1099, 'its value when written');
    assert.equal(entry.revision, w.vms.revision);
    assert.equal(entry.commit, true);
    await file.close();
  });

  test('revisions keep growing across restarts, deletions included', async () => {
    const w = new World();
    const file = stateFile(w);
    await file.open();
    const a = w.add('a');
    const b = w.add('b');
    w.vms.remove(b); // the highest revision now belongs to no record
    await file.flush();
    await file.close();
    const highest = w.vms.revision;
    assert.ok(highest > a.revision);

    const read = await readState(dir);
    assert.equal(read!.revision, highest);
    const next = new VmRegistry();
    next.restore(read!.vms, read!.revision);
    assert.equal(next.insert(next.newId(), spec('c')).revision, highest + 1);
  });

  test('nothing is written after close()', async () => {
    const w = new World();
    const file = stateFile(w);
    await file.open();
    w.add('a');
    await file.close();
    const before = await readFile(file.journalPath, 'utf8');
    w.add('b');
    await file.flush();
    assert.equal(await readFile(file.journalPath, 'utf8'), before);
    assert.equal((await readState(dir))!.vms.length, 1);
  });

  test('a failed write is followed by a whole snapshot, a second later', async () => {
    const w = new World();
    const file = stateFile(w);
    await file.open();
    const a = w.add('a');
    await file.flush();
    const first = file.journalPath;
    w.failOn = a.id;
    w.vms.transition(a, 'RUNNING');
    await file.flush();
    assert.equal(errors.length, 1);
    w.failOn = undefined;
    // No further change: the retry alone writes it.
    const deadline = Date.now() + 3000;
    while (file.journalPath === first && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    await file.flush();
    assert.notEqual(file.journalPath, first, 'a new snapshot and journal');
    assert.deepEqual(await journals(), [file.journalPath.split('/').pop()]);
    assert.equal((await readState(dir))!.vms[0].state, 'RUNNING');
    w.add('b');
    await file.flush();
    assert.deepEqual(comparable(await readState(dir)), w.expected());
    assert.equal(errors.length, 1);
    await file.close();
  });
});

describe('compaction', () => {
  test('keeps the state and starts a short journal', async () => {
    const w = new World();
    const file = stateFile(w, { compactFloorBytes: 8 * 1024, sliceEntries: 7 });
    await file.open();
    const vms = Array.from({ length: 20 }, (_, i) => w.add(`vm-${i}`));
    await file.flush();
    let compactions = 0;
    let last = file.journalPath;
    for (let round = 0; round < 30; round++) {
      for (const vm of vms) w.vms.update(vm, (v) => (v.vmmPid = round));
      w.claim_(file, round, vms[round % vms.length]);
      if (round % 3 === 0) w.release(file, round - 3);
      await file.flush();
      if (file.journalPath !== last) {
        compactions++;
        last = file.journalPath;
      }
    }
    w.vms.remove(vms[0]);
    await file.flush();
    assert.ok(compactions >= 3, `compacted ${compactions} times`);
    // The journal is bounded by max(floor, 2 × the snapshot) plus one write.
    assert.ok(file.journalBytes < Math.max(8 * 1024, 2 * file.snapshotBytes) + 12 * 1024, `journal ${file.journalBytes} B, snapshot ${file.snapshotBytes} B`);
    assert.equal((await stat(file.path)).size, file.snapshotBytes);
    assert.deepEqual(await journals(), [last.split('/').pop()], 'the older journals are gone');
    const snapshot = JSON.parse(await readFile(file.path, 'utf8')) as { version: number; journal: number; vms: unknown[] };
    assert.equal(snapshot.version, 2);
    assert.equal(`state.journal.${snapshot.journal}`, last.split('/').pop());
    assert.deepEqual(comparable(await readState(dir)), w.expected());
    assert.deepEqual(errors, []);
    assert.deepEqual(warnings, []);
    await file.close();
  });

  test('a crash between any two steps replays to the right state', async () => {
    const w = new World();
    const aside = join(dir, 'aside');
    // Before: snapshot 1 and journal 1, as a run left them (no compaction: a high floor).
    const first = stateFile(w, { compactFloorBytes: 1 << 30 });
    await first.open();
    const a = w.add('a');
    const b = w.add('b');
    w.claim_(first, 1, a);
    w.attach(first, a, 10);
    await first.flush();
    w.vms.transition(a, 'RUNNING');
    await first.flush();
    await first.close();
    await mkdir(aside);
    await copyFile(join(dir, 'state.json'), join(aside, 'state.json'));
    await copyFile(join(dir, 'state.journal.1'), join(aside, 'state.journal.1'));

    // After: snapshot 2 (made from the state the journal left), then journal 2 with later changes,
    // among them one that journal 1 would undo if it were replayed after snapshot 2.
    const second = stateFile(w);
    w.vms.transition(b, 'FAILED', 'while nobody wrote');
    await second.open();
    w.vms.transition(a, 'EXITED');
    w.release(second, 1);
    w.detach(second, a);
    w.add('c');
    await second.flush();
    await second.close();
    const want = w.expected();
    assert.deepEqual(await journals(), ['state.journal.2']);
    const snapshot2 = await readFile(join(dir, 'state.json'), 'utf8');
    const journal2 = await readFile(join(dir, 'state.journal.2'), 'utf8');
    const journal1 = await readFile(join(aside, 'state.journal.1'), 'utf8');
    const snapshot1 = await readFile(join(aside, 'state.json'), 'utf8');

    const crashAt = async (files: Record<string, string>) => {
      for (const n of await readdir(dir)) if (n !== 'aside') await rm(join(dir, n));
      for (const [n, text] of Object.entries(files)) await writeFile(join(dir, n), text);
      return readState(dir);
    };
    // 1. The new journal is made and written to; the snapshot not yet renamed (its temp file half written).
    const step1 = comparable(await crashAt({ 'state.json': snapshot1, 'state.json.tmp': snapshot2.slice(0, 40), 'state.journal.1': journal1, 'state.journal.2': journal2 }));
    const withoutB = (s: typeof want) => ({ ...s, vms: s.vms.filter((v) => v.id !== b.id) });
    assert.deepEqual(withoutB(step1), withoutB(want));
    // b FAILED was told before snapshot 2 and is in no journal: lost with the crash, as any unwritten change.
    assert.equal(step1.vms.find((v) => v.id === b.id)!.state, 'PENDING');
    // 2. The snapshot is renamed; the older journal not yet deleted: it is skipped, or b would be PENDING again.
    const step2 = await crashAt({ 'state.json': snapshot2, 'state.journal.1': journal1, 'state.journal.2': journal2 });
    assert.deepEqual(comparable(step2), want);
    // 3. Done.
    assert.deepEqual(comparable(await crashAt({ 'state.json': snapshot2, 'state.journal.2': journal2 })), want);
    // A crash right after the new journal was created: empty.
    const empty = await crashAt({ 'state.json': snapshot1, 'state.journal.1': journal1, 'state.journal.2': '' });
    assert.equal(empty!.vms.find((v) => v.id === a.id)!.state, 'RUNNING');
    assert.deepEqual(warnings, []);
  });

  test('the regular compaction writes journals that replay across the switch', async () => {
    const w = new World();
    const file = stateFile(w, { compactFloorBytes: 2048, sliceEntries: 3 });
    await file.open();
    const vms = Array.from({ length: 10 }, (_, i) => w.add(`vm-${i}`));
    // Changes while the snapshot is being written go to the new journal: never wait in between.
    for (let round = 0; round < 40; round++) {
      for (const vm of vms) w.vms.update(vm, (v) => (v.vmmPid = round));
      await new Promise((r) => setImmediate(r));
    }
    await file.flush();
    assert.notEqual(file.journalPath, join(dir, 'state.journal.1'), 'compacted');
    assert.deepEqual(comparable(await readState(dir)), w.expected());
    assert.deepEqual(errors, []);
    await file.close();
  });
});

describe('reading', () => {
  test('a write cut short by a crash is left out, with a warning', async () => {
    const w = new World();
    const file = stateFile(w);
    await file.open();
    const a = w.add('a');
    await file.flush();
    const want = w.expected();
    const before = await readFile(file.journalPath, 'utf8');
    await file.close();

    // Torn in the middle of a line.
    await appendFile(file.journalPath, `{"key":"vm/${a.id}","value":{"id":"${a.id}","na`);
    assert.deepEqual(comparable(await readState(dir, (e) => warnings.push(e))), want);
    assert.equal(warnings.length, 1);
    assert.equal(warnings[0].event, 'state-journal-torn');

    // Whole lines, but the write's last (its commit) missing; NULs after it (power loss).
    await writeFile(file.journalPath, `${before}{"key":"vm/${a.id}","value":null}\n\0\0\0\0`);
    assert.deepEqual(comparable(await readState(dir)), want);

    // Damage before the end is not a crash: it is refused.
    await writeFile(file.journalPath, `{"key":"vm/x","val\n${before}`);
    await assert.rejects(readState(dir), /line 1 is not JSON/);
  });

  test('a version-1 state.json is read, and the next write makes it version 2', async () => {
    const w = new World();
    const a = w.vms.insert(w.vms.newId(), spec('old'));
    w.vms.transition(a, 'RUNNING');
    const v1 = {
      version: 1,
      writtenAt: '2024-01-01T00:00:00.000Z',
      revision: 41,
      vms: [{ ...a }],
      claims: [{ group: 12, vmId: a.id, vmName: 'old' }],
      sessions: [{ vmId: a.id, pid: 4242, uid: 65534, gid: 65534, passive: true }],
    };
    await writeFile(join(dir, 'state.json'), JSON.stringify(v1));
    // A journal beside a version-1 file can only be stale: it is not replayed.
    await writeFile(join(dir, 'state.journal.3'), `{"key":"vm/${a.id}","value":null,"revision":50,"commit":true}\n`);
    const read = await readState(dir);
    assert.deepEqual(read!.vms, v1.vms);
    assert.deepEqual(read!.claims, v1.claims);
    assert.deepEqual(read!.sessions, v1.sessions);
    assert.equal(read!.revision, 41);

    // As the daemon does: restore, then open() writes version 2 (and a journal past the stale one).
    const next = new World();
    next.vms.restore(read!.vms, read!.revision);
    for (const c of read!.claims) next.claims.set(c.group, c);
    for (const s of read!.sessions) next.sessions.set(s.vmId, s);
    const file = stateFile(next);
    await file.open();
    await file.close();
    const snapshot = JSON.parse(await readFile(join(dir, 'state.json'), 'utf8')) as { version: number; journal: number };
    assert.equal(snapshot.version, 2);
    assert.equal(snapshot.journal, 4);
    assert.deepEqual(await journals(), ['state.journal.4']);
    assert.deepEqual(comparable(await readState(dir)), comparable(read));
  });

  test('no state: undefined; a file of another kind: an error', async () => {
    assert.equal(await readState(dir), undefined);
    await writeFile(join(dir, 'state.json'), JSON.stringify({ version: 3, vms: [], claims: [], sessions: [], revision: 0 }));
    await assert.rejects(readState(dir), /not a version 1 or 2 state file/);
  });

  test('setAside() moves the snapshot and its journals out of the way', async () => {
    const w = new World();
    const file = stateFile(w);
    await file.open();
    w.add('a');
    await file.close();
    await writeFile(join(dir, 'state.journal.0.prev'), 'from an earlier start');
    const moved = await file.setAside();
    assert.deepEqual(moved.sort(), ['state.journal.1.prev', 'state.json.prev']);
    assert.deepEqual((await readdir(dir)).sort(), ['state.journal.1.prev', 'state.json.prev']);
    assert.equal(await readState(dir), undefined);
  });
});
