/**
 * ListVms pages (AIP-158) on a real daemon: the pages, their order and size,
 * records created and deleted between pages, bad page_size and page_token,
 * a non-root principal paging through its own VMs only, kvmvfioctl
 * `vm list` following the pages; and WatchVms's opening snapshot of more VMs
 * than its backlog.
 */
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { chmod, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { status } from '@grpc/grpc-js';
import type { KvmVfioApi, Vm } from '../../src/client/client';
import type { ListVmsRequest } from '../../src/generated/kvmvfio/v1/ListVmsRequest';
import { makeFakeHost, type FakeHost } from '../helpers/fakehost';
import { CLI_JS, REPO, startDaemon, type RunningDaemon } from '../helpers/daemon';
import { expectStatus } from '../helpers/assert';

const run = promisify(execFile);
const CALL_AS = join(REPO, 'dist', 'test', 'helpers', 'call-as.js');
const TENANT = 1000;

const policy = {
  principals: [{ name: 'tenant', match: { uids: [TENANT] }, calls: ['*'], vmmUids: [65534], limits: { vms: 10 } }],
};

type Page = { vms: Vm[]; next_page_token: string };

describe('ListVms pages', () => {
  let host: FakeHost;
  let dir: string;
  let d: RunningDaemon;
  let c: KvmVfioApi;
  /** Ids in creation order, as the daemon answered CreateVm (one at a time). */
  const created: string[] = [];

  const create = async (name: string, labels: Record<string, string> = {}) => {
    const vm = (await c.createVm({ name, vmm_uid: 65534, labels })).vm!;
    created.push(vm.id);
    return vm;
  };
  /** Follows every page; returns the pages. */
  const pages = async (req: Omit<ListVmsRequest, 'page_token'>, api: KvmVfioApi = c): Promise<Page[]> => {
    const out: Page[] = [];
    let token = '';
    do {
      const p = await api.listVms({ ...req, page_token: token });
      out.push(p);
      token = p.next_page_token;
    } while (token);
    return out;
  };
  const ids = (ps: Page[]) => ps.flatMap((p) => p.vms.map((v) => v.id));

  before(async () => {
    host = await makeFakeHost([]);
    dir = await mkdtemp(join(tmpdir(), 'kvmvfiod-paging-'));
    await chmod(dir, 0o755);
    await writeFile(join(dir, 'policy.json'), JSON.stringify(policy));
    d = await startDaemon({ dir, sysfs: host.sysfs, dev: host.dev });
    c = d.client();
  });

  after(async () => {
    await d?.cleanup();
    await host?.cleanup();
    await rm(dir, { recursive: true, force: true });
  });

  test('250 VMs with page_size 100: pages of 100, 100 and 50, every id once, in creation order; the last token is empty', async () => {
    for (let i = 0; i < 250; i++) await create(`vm-${i}`, { half: i % 2 ? 'odd' : 'even' });
    const ps = await pages({ page_size: 100 });
    assert.deepEqual(
      ps.map((p) => p.vms.length),
      [100, 100, 50],
    );
    assert.deepEqual(ids(ps), created);
    assert.ok(ps[0].next_page_token && ps[1].next_page_token && ps[0].next_page_token !== ps[1].next_page_token);
    assert.equal(ps[2].next_page_token, '');
    assert.ok(ps[0].next_page_token.length <= 32, `a small token: ${ps[0].next_page_token}`);
    // A filter pages over its matches only.
    const odd = await pages({ labels: { half: 'odd' }, page_size: 40 });
    assert.deepEqual(
      odd.map((p) => p.vms.length),
      [40, 40, 40, 5],
    );
    assert.deepEqual(ids(odd), created.filter((_, i) => i % 2));
    // A listing that ends on a page boundary has no empty page after it.
    assert.deepEqual(
      (await pages({ labels: { half: 'odd' }, page_size: 125 })).map((p) => p.vms.length),
      [125],
    );
  });

  test('page_size 0 means 100; more than 500 is taken as 500', async () => {
    const first = await c.listVms({});
    assert.equal(first.vms.length, 100);
    assert.deepEqual(
      first.vms.map((v) => v.id),
      created.slice(0, 100),
    );
    assert.ok(first.next_page_token);
    for (let i = 250; i < 620; i++) await create(`vm-${i}`);
    for (const size of [501, 1000, 2 ** 31 - 1]) {
      const big = await c.listVms({ page_size: size });
      assert.equal(big.vms.length, 500, `page_size ${size}`);
      assert.ok(big.next_page_token);
    }
    const ps = await pages({ page_size: 100_000 });
    assert.deepEqual(
      ps.map((p) => p.vms.length),
      [500, 120],
    );
    assert.deepEqual(ids(ps), created);
    // The client's helper follows the pages too.
    assert.deepEqual(
      (await c.listAllVms({ page_size: 70 })).map((v) => v.id),
      created,
    );
  });

  test('VMs created and deleted between pages: none twice, the deleted ones not returned, the new ones at the end, no error', async () => {
    const p1 = await c.listVms({ page_size: 100 });
    assert.deepEqual(
      p1.vms.map((v) => v.id),
      created.slice(0, 100),
    );
    // Gone: the cursor VM (the page's last), one already returned, two not returned yet.
    const gone = [created[99], created[10], created[100], created[400]];
    for (const id of gone) await c.deleteVm({ vm_id: id });
    const late = [await create('late-1'), await create('late-2')];
    const rest: Page[] = [];
    let token = p1.next_page_token;
    // A page size that changes between pages is allowed.
    for (let size = 150; token; size = 90) {
      const p = await c.listVms({ page_size: size, page_token: token });
      rest.push(p);
      token = p.next_page_token;
    }
    const seen = [...p1.vms.map((v) => v.id), ...ids(rest)];
    assert.equal(new Set(seen).size, seen.length, 'no VM twice');
    assert.deepEqual(ids(rest), created.slice(100).filter((id) => !gone.includes(id)));
    assert.deepEqual(ids(rest).slice(-2), late.map((v) => v.id));
    for (const id of gone) created.splice(created.indexOf(id), 1);
    assert.deepEqual(await c.listAllVms({ page_size: 500 }), (await pages({ page_size: 500 })).flatMap((p) => p.vms));
  });

  test('a page token used with another filter is INVALID_ARGUMENT; the same filter in another order is not', async () => {
    const first = await c.listVms({ labels: { half: 'odd' }, states: ['VM_STATE_PENDING'], page_size: 10 });
    const token = first.next_page_token;
    assert.ok(token);
    const other = /^page_token: was returned for a different filter; send the same labels and states/;
    await expectStatus(c.listVms({ page_token: token }), status.INVALID_ARGUMENT, other);
    await expectStatus(c.listVms({ labels: { half: 'even' }, states: ['VM_STATE_PENDING'], page_token: token }), status.INVALID_ARGUMENT, other);
    await expectStatus(c.listVms({ labels: { half: 'odd' }, page_token: token }), status.INVALID_ARGUMENT, other);
    await expectStatus(c.listVms({ labels: { half: 'odd' }, states: ['VM_STATE_PENDING', 'VM_STATE_RUNNING'], page_token: token }), status.INVALID_ARGUMENT, other);
    const same = await c.listVms({ labels: { half: 'odd' }, states: ['VM_STATE_PENDING', 'VM_STATE_PENDING'], page_size: 10, page_token: token });
    const odd = await c.listAllVms({ labels: { half: 'odd' }, page_size: 500 });
    assert.deepEqual(
      same.vms.map((v) => v.id),
      odd.slice(10, 20).map((v) => v.id),
    );
    // A token of the unfiltered listing is refused with a filter.
    const plain = (await c.listVms({ page_size: 1 })).next_page_token;
    await expectStatus(c.listVms({ labels: { half: 'odd' }, page_token: plain }), status.INVALID_ARGUMENT, other);
  });

  test('a garbled page token and a negative page_size are INVALID_ARGUMENT naming the field; nothing changes', async () => {
    const before = (await c.getHostInfo()).vm_count;
    const good = (await c.listVms({ page_size: 5 })).next_page_token;
    const flipped = good.slice(0, 1) === 'A' ? `B${good.slice(1)}` : `A${good.slice(1)}`;
    const malformed = /^page_token: not a page token returned by ListVms/;
    for (const token of ['x', 'garbage!', good.slice(1), `${good}A`, flipped, 'AAAAAAAAAAAAAAAAAAAA', '/'.repeat(20), good.replace(/.$/, '=')]) {
      await expectStatus(c.listVms({ page_token: token }), status.INVALID_ARGUMENT, malformed);
    }
    // A version byte it knows, the right filter digest, an impossible place (seq 0).
    const zero = Buffer.from(good, 'base64url');
    zero.fill(0, 7);
    await expectStatus(c.listVms({ page_token: zero.toString('base64url') }), status.INVALID_ARGUMENT, malformed);
    await expectStatus(c.listVms({ page_size: -1 }), status.INVALID_ARGUMENT, /^page_size: -1 is negative; give 1-500/);
    await expectStatus(c.listVms({ page_size: -(2 ** 31), page_token: good }), status.INVALID_ARGUMENT, /^page_size: /);
    assert.equal((await c.getHostInfo()).vm_count, before);
  });

  test('a non-root principal paging sees only its own VMs, on every page, whatever token it brings', async () => {
    const callAs = async <T>(method: string, req: unknown): Promise<T> => {
      const { stdout } = await run('setpriv', [`--reuid=${TENANT}`, `--regid=${TENANT}`, '--clear-groups', process.execPath, CALL_AS, d.apiSocket, method, JSON.stringify(req)]);
      const r = JSON.parse(stdout) as { ok: boolean; res: T; details?: string };
      assert.ok(r.ok, JSON.stringify(r));
      return r.res;
    };
    const mine: string[] = [];
    for (let i = 0; i < 5; i++) {
      mine.push((await callAs<{ vm: Vm }>('createVm', { name: `t-${i}`, vmm_uid: 65534 })).vm.id);
      // Interleaved with root's VMs.
      await create(`r-${i}`);
    }
    const seen: string[][] = [];
    let token = '';
    do {
      const p = await callAs<Page>('listVms', { page_size: 2, page_token: token });
      seen.push(p.vms.map((v) => v.id));
      token = p.next_page_token;
    } while (token);
    assert.deepEqual(seen, [mine.slice(0, 2), mine.slice(2, 4), mine.slice(4)]);
    // A token from root's listing only moves the tenant's listing along: it still sees only its VMs after that place.
    const rootPage = await c.listVms({ page_size: 1 });
    const fromRoot = await callAs<Page>('listVms', { page_size: 500, page_token: rootPage.next_page_token });
    assert.deepEqual(
      fromRoot.vms.map((v) => v.id),
      mine,
    );
    assert.equal(fromRoot.next_page_token, '');
    // Root sees them all, in creation order.
    assert.deepEqual(
      (await c.listAllVms({ page_size: 500 })).map((v) => v.id).filter((id) => mine.includes(id)),
      mine,
    );
  });

  test('kvmvfioctl vm list follows the pages: every VM once, in one table (and --json), whatever --page-size', async () => {
    const all = await c.listAllVms({ page_size: 500 });
    assert.ok(all.length > 600);
    const cli = async (...args: string[]) => (await run(process.execPath, [CLI_JS, '--socket', d.apiSocket, ...args], { maxBuffer: 64 * 1024 * 1024 })).stdout;
    for (const extra of [[], ['--page-size', '7'], ['--page-size', '100000']]) {
      const lines = (await cli('vm', 'list', ...extra)).trimEnd().split('\n');
      assert.match(lines[0], /^ID +NAME +STATE/);
      assert.deepEqual(
        lines.slice(1).map((l) => l.split(/ +/)[0]),
        all.map((v) => v.id),
        `vm list ${extra.join(' ')}`,
      );
    }
    const json = JSON.parse(await cli('vm', 'list', '--json', '--label', 'half=even')) as { vms: Vm[] };
    assert.deepEqual(Object.keys(json), ['vms']);
    assert.deepEqual(
      json.vms.map((v) => v.id),
      all.filter((v) => v.labels.half === 'even').map((v) => v.id),
    );
    // A VM named on a later page is found by name.
    const lastName = all.at(-1)!.name;
    assert.match(await cli('vm', 'get', lastName), new RegExp(`^name: +${lastName}$`, 'm'));
    await assert.rejects(run(process.execPath, [CLI_JS, '--socket', d.apiSocket, 'vm', 'list', '--page-size', '-1']), (e: { code: number; stderr: string }) => {
      assert.equal(e.code, 2);
      assert.match(e.stderr, /--page-size/);
      return true;
    });
  });

  test('WatchVms opens with every VM, one message each, even more VMs than its 4,096-event backlog, then SYNCED', async () => {
    const have = (await c.getHostInfo()).vm_count;
    let next = have;
    const target = 4300;
    await Promise.all(
      Array.from({ length: 8 }, async () => {
        while (next < target) await c.createVm({ name: `w-${next++}`, vmm_uid: 65534 });
      }),
    );
    const all = (await c.listAllVms({ page_size: 500 })).map((v) => v.id);
    assert.equal(all.length, target);
    const existing: string[] = [];
    for await (const ev of c.watchVms({})) {
      if (ev.type === 'TYPE_SYNCED') break;
      assert.equal(ev.type, 'TYPE_EXISTING');
      existing.push(ev.vm!.id);
    }
    assert.deepEqual(existing, all);
  });
});
