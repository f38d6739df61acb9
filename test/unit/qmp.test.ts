/**
 * The daemon's QMP client (src/server/qmp/client.ts) and its QEMU hot-plug
 * driver (hotplug.ts) against a fake QMP peer on the other end of a real
 * socketpair (test/helpers/fakeqmp.ts): the greeting and capabilities,
 * answers matched to commands, events, QEMU's errors, a peer that stalls,
 * closes or lies; the add and remove sequences, the port choice, and the
 * statuses QEMU's refusals map to.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { openSync, readdirSync, readlinkSync } from 'node:fs';
import { status as Status } from '@grpc/grpc-js';
import { DeadlineExceededError, FailedPreconditionError, InvalidArgumentError, ResourceExhaustedError, UnavailableError } from '../../src/broker/errors';
import { OwnedFd, SeqpacketSocket, StreamSocket } from '../../src/kernel';
import { QmpClient, QmpError, checkQmpSocket } from '../../src/server/qmp/client';
import { QemuHotplug, hotplugPorts } from '../../src/server/qmp/hotplug';
import { statusForQmpError, toStatus } from '../../src/server/status';
import { FakeQmpPeer, type FakeQmpOptions } from '../helpers/fakeqmp';

const until = async (what: string, fn: () => boolean, ms = 5000): Promise<void> => {
  const end = Date.now() + ms;
  while (!fn()) {
    if (Date.now() > end) assert.fail(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
};

/** The fds of this process that point at `path`. */
const openOf = (path: string): number => readdirSync('/proc/self/fd').filter((n) => {
  try {
    return readlinkSync(`/proc/self/fd/${n}`) === path;
  } catch {
    return false;
  }
}).length;

function pair(opts: FakeQmpOptions = {}, timeoutMs = 2000): { client: QmpClient; peer: FakeQmpPeer; done(): void } {
  const [mine, theirs] = StreamSocket.pair('test QMP');
  const client = new QmpClient(new StreamSocket(mine, 'test QMP'), { commandTimeoutMs: timeoutMs, who: 'QEMU (test)' });
  const peer = new FakeQmpPeer(theirs, opts);
  return { client, peer, done: () => (client.close('test over'), peer.close()) };
}

/** A raw peer: the test writes QEMU's side by hand. */
function rawPair(timeoutMs = 500, resumed = false): { client: QmpClient; peer: SeqpacketSocket; lines(): string[]; done(): void } {
  const [mine, theirs] = StreamSocket.pair('test QMP');
  const client = new QmpClient(new StreamSocket(mine, 'test QMP'), { commandTimeoutMs: timeoutMs, who: 'QEMU (raw)', maxLineBytes: 4096, resumed });
  const peer = new SeqpacketSocket(theirs, 'raw peer');
  let buf = '';
  return {
    client,
    peer,
    lines: () => {
      for (let r = peer.recv(); r && r.data.length; r = peer.recv()) buf += r.data.toString();
      return buf.split('\n').filter(Boolean);
    },
    done: () => (client.close('test over'), peer.closeSync()),
  };
}

const say = (peer: SeqpacketSocket, obj: unknown) => peer.send(Buffer.from(`${JSON.stringify(obj)}\r\n`));

describe('QMP client', () => {
  test('waits for the greeting, negotiates capabilities without any, then runs commands in order, each answer matched by its id', async () => {
    const { client, peer, done } = pair({ greetAfterMs: 100, ports: ['rp1'] });
    try {
      const first = client.execute('query-pci');
      const second = client.execute('qom-list', { path: '/objects' });
      assert.equal(client.ready, false);
      const [pci, objects] = await Promise.all([first, second]);
      assert.ok(Array.isArray(pci));
      assert.deepEqual(objects, []);
      assert.deepEqual(peer.commands.map((c) => c.execute), ['qmp_capabilities', 'query-pci', 'qom-list']);
      assert.deepEqual(peer.commands[0].arguments, {}, 'no capability asked (no out-of-band)');
      assert.equal((client.greeting?.version as { qemu: { major: number } }).qemu.major, 10);
      assert.equal(client.ready, true);
    } finally {
      done();
    }
  });

  test('an answer with another id is not taken for the command in flight; events between are delivered, not answers', async () => {
    const { client, peer, lines, done } = rawPair(2000);
    try {
      const events: string[] = [];
      client.onEvent((e) => events.push(`${e.event}:${String(e.data.device)}`));
      say(peer, { QMP: { version: {}, capabilities: [] } });
      const got = client.execute('query-status');
      await until('capabilities', () => lines().length === 1);
      const caps = JSON.parse(lines()[0]) as { id: number };
      say(peer, { return: {}, id: caps.id });
      await until('query-status', () => lines().length === 2);
      const q = JSON.parse(lines()[1]) as { execute: string; id: number };
      assert.equal(q.execute, 'query-status');
      say(peer, { event: 'DEVICE_DELETED', data: { device: 'x' } });
      say(peer, { return: { status: 'wrong' }, id: q.id + 100 });
      say(peer, { return: { status: 'wrong' } });
      say(peer, { return: { status: 'running' }, id: q.id });
      assert.deepEqual(await got, { status: 'running' });
      assert.deepEqual(events, ['DEVICE_DELETED:x']);
      assert.equal(client.isOpen, true);
    } finally {
      done();
    }
  });

  test('resumed after a restart: no greeting awaited, ids past the old process\'s, the half-read line it left dropped; a later garbled line still closes', async () => {
    const { client, peer, lines, done } = rawPair(2000, true);
    try {
      const events: string[] = [];
      client.onEvent((e) => events.push(e.event));
      // What the old process left: the rest of a line it had begun to read, and a late answer to its command 7.
      peer.send(Buffer.from('us": "running"}, "id": 6}\n'));
      say(peer, { return: {}, id: 7 });
      const got = client.execute('query-status');
      await until('query-status sent at once, without a greeting', () => lines().length === 1);
      const q = JSON.parse(lines()[0]) as { execute: string; id: number };
      assert.equal(q.execute, 'query-status');
      assert.ok(q.id > Date.now() * 1000 - 60_000_000, `id ${q.id} is past any the old process used`);
      say(peer, { event: 'RESUME', data: {} });
      say(peer, { return: { status: 'running' }, id: q.id });
      assert.deepEqual(await got, { status: 'running' });
      assert.deepEqual(events, ['RESUME']);
      assert.equal(client.isOpen, true, 'the tail and the old answer did not close it');
      peer.send(Buffer.from('not json\n'));
      await client.closed;
      assert.equal(client.isOpen, false);
    } finally {
      done();
    }
  });

  test("QEMU's error is a QmpError with its class and description", async () => {
    const { client, done } = pair({ errors: { device_del: { class: 'DeviceNotFound', desc: "Device 'nope' not found" } } });
    try {
      const e = await client.execute('device_del', { id: 'nope' }).then(() => undefined, (x: unknown) => x);
      assert.ok(e instanceof QmpError, String(e));
      assert.deepEqual([e.command, e.errorClass, e.desc], ['device_del', 'DeviceNotFound', "Device 'nope' not found"]);
      assert.match(e.message, /QEMU \(test\): device_del: Device 'nope' not found/);
      // The channel stays usable.
      assert.ok(Array.isArray(await client.execute('query-pci')));
    } finally {
      done();
    }
  });

  test("an fd travels with its command's bytes and the daemon's copy is closed once sent", async () => {
    const { client, peer, done } = pair();
    try {
      const fd = new OwnedFd(openSync('/dev/null', 'r'), '/dev/null');
      const before = openOf('/dev/null');
      await client.execute('getfd', { fdname: 'n1' }, fd);
      assert.equal(fd.isOpen, false, 'the client closed its copy');
      const getfd = peer.commands.find((c) => c.execute === 'getfd')!;
      assert.deepEqual(getfd.fds, ['/dev/null'], 'exactly one fd arrived, with getfd');
      assert.deepEqual(peer.commands.filter((c) => c.execute !== 'getfd').flatMap((c) => c.fds), [], 'no fd rode on another command');
      assert.equal(openOf('/dev/null'), before, 'one /dev/null fewer here would be the client keeping it; one more, a leak');
      assert.ok(peer.held.has('n1'));
    } finally {
      done();
    }
  });

  test('a peer that never greets: each command fails DEADLINE_EXCEEDED on its own deadline, and its fd is closed', async () => {
    const { client, done } = pair({ greetAfterMs: false }, 200);
    try {
      const fd = new OwnedFd(openSync('/dev/null', 'r'), '/dev/null');
      const t0 = Date.now();
      await assert.rejects(client.execute('getfd', { fdname: 'x' }, fd), (e: unknown) => e instanceof DeadlineExceededError && /no QMP greeting yet/.test(e.message));
      assert.ok(Date.now() - t0 >= 190);
      assert.equal(fd.isOpen, false);
      assert.equal(toStatus(new DeadlineExceededError('x')).code, Status.DEADLINE_EXCEEDED);
    } finally {
      done();
    }
  });

  test('a peer that stalls after the greeting: DEADLINE_EXCEEDED; its late answer is dropped and the next command gets its own', async () => {
    const { client, peer, lines, done } = rawPair(200);
    try {
      say(peer, { QMP: { version: {}, capabilities: [] } });
      const slow = client.execute('query-pci');
      await until('capabilities', () => lines().length === 1);
      say(peer, { return: {}, id: (JSON.parse(lines()[0]) as { id: number }).id });
      await assert.rejects(slow, DeadlineExceededError);
      const next = client.execute('query-status');
      await until('two commands', () => lines().length === 3);
      const [, q1, q2] = lines().map((l) => JSON.parse(l) as { id: number; execute: string });
      assert.deepEqual([q1.execute, q2.execute], ['query-pci', 'query-status']);
      say(peer, { return: 'late', id: q1.id });
      say(peer, { return: 'mine', id: q2.id });
      assert.equal(await next, 'mine');
    } finally {
      done();
    }
  });

  test('a peer that closes: commands in flight and queued fail UNAVAILABLE, later ones at once, fds closed, listeners told', async () => {
    const { client, peer, done } = pair({ mute: true });
    try {
      let told = '';
      client.onClosed((r) => (told = r));
      await until('greeting', () => client.ready);
      const a = client.execute('query-pci');
      const b = client.execute('query-status');
      await until('the first command sent', () => peer.commands.length === 2);
      peer.close();
      await assert.rejects(a, (e: unknown) => e instanceof UnavailableError && /QEMU closed its monitor/.test(e.message));
      await assert.rejects(b, UnavailableError);
      assert.equal(await client.closed, 'QEMU closed its monitor');
      assert.equal(told, 'QEMU closed its monitor');
      const fd = new OwnedFd(openSync('/dev/null', 'r'), '/dev/null');
      await assert.rejects(client.execute('getfd', { fdname: 'x' }, fd), UnavailableError);
      assert.equal(fd.isOpen, false);
    } finally {
      done();
    }
  });

  for (const [what, text, reason] of [
    ['a first line that is not a greeting', '{"return": {}}\n', /not a QMP greeting/],
    ['a line that is not JSON', '{"QMP": {}}\nnot json\n', /not JSON/],
    ['JSON that is not an object', '{"QMP": {}}\n[1,2]\n', /not an object/],
    ['a line longer than the bound', `{"QMP": {}}\n"${'x'.repeat(5000)}"\n`, /line of .* bytes/],
    ['an unterminated line past the bound', `{"QMP": {}}\n${'y'.repeat(9000)}`, /line of more than 4096 bytes/],
  ] as const) {
    test(`a peer that sends ${what} ends the channel`, async () => {
      const { client, peer, done } = rawPair(2000);
      try {
        const pending = client.execute('query-pci');
        for (let off = 0; off < text.length; off += 4000) peer.send(Buffer.from(text.slice(off, off + 4000)));
        assert.match(await client.closed, reason);
        await assert.rejects(pending, UnavailableError);
        assert.equal(client.isOpen, false);
      } finally {
        done();
      }
    });
  }

  test('only an AF_UNIX stream socket whose other end the VMM made is taken as its QMP fd', () => {
    const [a, b] = StreamSocket.pair('mine');
    try {
      checkQmpSocket(a.fd, process.pid);
      assert.throws(() => checkQmpSocket(a.fd, process.pid + 1), (e: unknown) => e instanceof InvalidArgumentError && /made by pid \d+, not by the VMM/.test(e.message));
    } finally {
      a.closeSync();
      b.closeSync();
    }
    const [s1, s2] = SeqpacketSocket.pair('seqpacket');
    try {
      assert.throws(() => checkQmpSocket(s1.fd, process.pid), /type 5; an AF_UNIX SOCK_STREAM socketpair is needed/);
    } finally {
      s1.closeSync();
      s2.closeSync();
    }
    const nul = openSync('/dev/null', 'r');
    try {
      assert.throws(() => checkQmpSocket(nul, process.pid), /not a socket \(ENOTSOCK\)/);
    } finally {
      new OwnedFd(nul, '/dev/null').closeSync();
    }
  });
});

describe('hot-plug ports from query-pci', () => {
  const bridge = (id: string, devices: unknown[] = [], extra: Record<string, unknown> = {}) => ({ qdev_id: id, class_info: { class: 0x0604 }, pci_bridge: { bus: {}, devices }, ...extra });
  test("bridges with an id, kvmvfiod's by number first, free when nothing is behind them; nested bridges too", () => {
    const pci = [
      {
        bus: 0,
        devices: [
          { qdev_id: '', class_info: { class: 0x0600 } },
          bridge('rp-user', [{ qdev_id: 'nic0' }]),
          bridge('kvmvfiod-port-10'),
          bridge('kvmvfiod-port-2', [bridge('down1')]),
          bridge(''),
          bridge('spare'),
          { qdev_id: 'not-a-bridge', class_info: { class: 0x0200 } },
          { qdev_id: 'odd', class_info: { class: 0x0604 }, pci_bridge: 'nonsense' },
        ],
      },
    ];
    assert.deepEqual(hotplugPorts(pci), { all: ['kvmvfiod-port-2', 'kvmvfiod-port-10', 'rp-user', 'down1', 'spare'], free: ['kvmvfiod-port-10', 'down1', 'spare'] });
  });
  test('an answer of another shape gives no port, whatever it holds', () => {
    for (const junk of [null, 42, 'x', {}, [null], [{ devices: 'x' }], [{ devices: [null, 1, 'a'] }]]) assert.deepEqual(hotplugPorts(junk), { all: [], free: [] });
    let deep: unknown = bridge('leaf');
    for (let i = 0; i < 100; i++) deep = bridge(`b${i}`, [deep]);
    assert.ok(hotplugPorts([{ devices: [deep] }]).all.length <= 18, 'the walk is bounded in depth');
  });
});

describe('QEMU hot-plug driver', () => {
  const ADDRESS = '0000:00:04.0';
  const ID = 'kvmvfiod-0000-00-04.0';

  function driver(opts: FakeQmpOptions, unplugTimeoutMs = 1000) {
    const p = pair(opts);
    const iommufds: OwnedFd[] = [];
    const gone: string[] = [];
    const hp = new QemuHotplug(p.client, {
      openIommufd: async () => {
        const fd = new OwnedFd(openSync('/dev/zero', 'r'), '/dev/zero as iommufd');
        iommufds.push(fd);
        return fd;
      },
      unplugTimeoutMs,
      vmName: 'web-1',
      onDeviceGone: (a) => gone.push(a),
    });
    return { ...p, hp, iommufds, gone };
  }
  const cdev = () => new OwnedFd(openSync('/dev/null', 'r'), '/dev/null as a cdev');

  test('add: the iommufd object once (its fd from a fresh open), a free port, getfd of the cdev, device_add on that port; remove: device_del, DEVICE_DELETED', async () => {
    const { hp, peer, done, iommufds } = driver({ ports: ['rp-user', 'kvmvfiod-port-1', 'kvmvfiod-port-2'] });
    try {
      const fd = cdev();
      await hp.addDevice(ADDRESS, fd);
      assert.equal(fd.isOpen, false, "the daemon's copy of the cdev is closed");
      assert.equal(iommufds.length, 1);
      assert.equal(iommufds[0].isOpen, false, "and of the iommufd");
      const seq = peer.commands.map((c) => c.execute);
      assert.deepEqual(seq, ['qmp_capabilities', 'qom-list', 'getfd', 'object-add', 'query-pci', 'getfd', 'device_add']);
      assert.deepEqual(peer.commands[2].fds, ['/dev/zero']);
      assert.deepEqual(peer.commands[3].arguments, { 'qom-type': 'iommufd', id: 'kvmvfiod-iommufd', fd: 'kvmvfiod-iommufd-fd' });
      assert.deepEqual(peer.commands[5].fds, ['/dev/null']);
      const add = peer.commands[6].arguments;
      assert.deepEqual(add, { driver: 'vfio-pci', iommufd: 'kvmvfiod-iommufd', fd: peer.commands[5].arguments.fdname, bus: 'kvmvfiod-port-1', id: ID });
      assert.deepEqual(peer.heldPaths().sort(), ['/dev/null', '/dev/zero'], 'QEMU holds the cdev (in its device) and the iommufd; no named fd is left over');

      // A second device: the object is there, the next free port.
      await hp.addDevice('0000:00:05.0', cdev());
      assert.equal(iommufds.length, 1, 'one iommufd object per VM');
      assert.equal(peer.devices.get('kvmvfiod-0000-00-05.0')?.bus, 'kvmvfiod-port-2');

      await hp.removeDevice(ADDRESS);
      assert.equal(peer.devices.has(ID), false);
      assert.deepEqual(peer.commands.at(-1)?.arguments, { id: ID });
    } finally {
      done();
    }
  });

  test("the command line's iommufd object is used, not a second one", async () => {
    const { hp, peer, done, iommufds } = driver({ ports: ['kvmvfiod-port-1'], objects: [{ name: 'kvmvfiod-iommufd', type: 'child<iommufd>' }] });
    try {
      await hp.addDevice(ADDRESS, cdev());
      assert.equal(iommufds.length, 0);
      assert.deepEqual(peer.commands.map((c) => c.execute), ['qmp_capabilities', 'qom-list', 'query-pci', 'getfd', 'device_add']);
    } finally {
      done();
    }
  });

  test('no port at all: FAILED_PRECONDITION; every port taken: RESOURCE_EXHAUSTED; in neither case does an fd reach QEMU', async () => {
    const none = driver({ objects: [{ name: 'kvmvfiod-iommufd', type: 'child<iommufd>' }] });
    try {
      const fd = cdev();
      await assert.rejects(none.hp.addDevice(ADDRESS, fd), (e: unknown) => e instanceof FailedPreconditionError && /start QEMU \(machine q35\) with pcie-root-port devices/.test(e.message));
      assert.equal(fd.isOpen, false);
      assert.equal(none.peer.commands.filter((c) => c.execute === 'getfd').length, 0);
      assert.equal(toStatus(new FailedPreconditionError('x')).code, Status.FAILED_PRECONDITION);
    } finally {
      none.done();
    }
    const full = driver({ ports: ['kvmvfiod-port-1'], objects: [{ name: 'kvmvfiod-iommufd', type: 'child<iommufd>' }] });
    try {
      await full.hp.addDevice(ADDRESS, cdev());
      const fd = cdev();
      await assert.rejects(full.hp.addDevice('0000:00:05.0', fd), (e: unknown) => e instanceof ResourceExhaustedError && /every hot-plug port is taken \(kvmvfiod-port-1\)/.test(e.message));
      assert.equal(fd.isOpen, false);
      assert.equal(full.peer.commands.filter((c) => c.execute === 'getfd').length, 1, 'only the first device was sent');
      assert.deepEqual(full.peer.heldPaths(), ['/dev/null']);
      assert.equal(toStatus(new ResourceExhaustedError('x')).code, Status.RESOURCE_EXHAUSTED);
    } finally {
      full.done();
    }
  });

  test("QEMU's refusal of device_add: the error as QEMU said it, and closefd of the name, whether device_add took the fd or not", async () => {
    for (const consumesFd of [true, false]) {
      const desc = `vfio ${ID}: error bind device fd=17 to iommufd=16: Invalid argument`;
      const { hp, peer, done } = driver({ ports: ['kvmvfiod-port-1'], objects: [{ name: 'kvmvfiod-iommufd', type: 'child<iommufd>' }], errors: { device_add: { desc, consumesFd } } });
      try {
        const e = await hp.addDevice(ADDRESS, cdev()).then(() => undefined, (x: unknown) => x);
        assert.ok(e instanceof QmpError && e.desc === desc, String(e));
        await until('closefd', () => peer.commands.some((c) => c.execute === 'closefd'));
        await until('no fd left in QEMU', () => peer.heldPaths().length === 0);
      } finally {
        done();
      }
    }
  });

  test('a port QEMU says cannot take the device is skipped for the next free one', async () => {
    const { hp, peer, done } = driver({ ports: ['kvmvfiod-port-2'], objects: [{ name: 'kvmvfiod-iommufd', type: 'child<iommufd>' }] });
    try {
      // query-pci lists a bridge device_add does not know (a stale view): the driver goes on to the next.
      const orig = peer.send.bind(peer);
      peer.send = (msg: unknown) => {
        const m = msg as { return?: { devices: unknown[] }[] };
        if (Array.isArray(m.return) && m.return[0]?.devices) m.return[0].devices.unshift({ qdev_id: 'kvmvfiod-port-1', class_info: { class: 0x0604 }, pci_bridge: { bus: {}, devices: [] } });
        orig(msg);
      };
      await hp.addDevice(ADDRESS, cdev());
      const adds = peer.commands.filter((c) => c.execute === 'device_add').map((c) => c.arguments.bus);
      assert.deepEqual(adds, ['kvmvfiod-port-1', 'kvmvfiod-port-2']);
      assert.equal(peer.devices.get(ID)?.bus, 'kvmvfiod-port-2');
    } finally {
      done();
    }
  });

  test('a port query-pci shows empty but QEMU says is taken (buses not numbered yet, -S): the next port takes the device', async () => {
    const { hp, peer, done } = driver({ ports: ['kvmvfiod-port-1', 'kvmvfiod-port-2'], objects: [{ name: 'kvmvfiod-iommufd', type: 'child<iommufd>' }], unnumberedBuses: true });
    try {
      await hp.addDevice(ADDRESS, cdev());
      await hp.addDevice('0000:00:05.0', cdev());
      assert.deepEqual(peer.commands.filter((c) => c.execute === 'device_add').map((c) => c.arguments.bus), ['kvmvfiod-port-1', 'kvmvfiod-port-1', 'kvmvfiod-port-2']);
      assert.equal(peer.devices.get('kvmvfiod-0000-00-05.0')?.bus, 'kvmvfiod-port-2');
      assert.equal(peer.commands.filter((c) => c.execute === 'getfd').length, 2, 'one getfd per device: the fd not taken by the refused port went on to the next');
      assert.deepEqual(peer.held, new Map(), 'no fd left unused in QEMU');
    } finally {
      done();
    }
  });

  test('remove: a guest that never acknowledges is DEADLINE_EXCEEDED and QEMU keeps the device; a second remove waits again; a device QEMU does not have is removed already', async () => {
    const { hp, peer, done } = driver({ ports: ['kvmvfiod-port-1'], deleteAfterMs: 'never' }, 300);
    try {
      await hp.addDevice(ADDRESS, cdev());
      await assert.rejects(hp.removeDevice(ADDRESS), (e: unknown) => e instanceof DeadlineExceededError && /did not let go of device 0000:00:04.0 within 300 ms/.test(e.message));
      assert.ok(peer.devices.has(ID));
      const again = hp.removeDevice(ADDRESS);
      setTimeout(() => peer.unplugNow(ID), 100);
      await again;
      await hp.removeDevice(ADDRESS);
      assert.equal(peer.commands.filter((c) => c.execute === 'device_del').length, 3);
    } finally {
      done();
    }
  });

  test("a DEVICE_DELETED no removal waits for (a late acknowledgement, a guest's own eject) is reported with the device's address; awaited ones and others' are not", async () => {
    const { hp, peer, done, gone } = driver({ ports: ['kvmvfiod-port-1', 'kvmvfiod-port-2'], deleteAfterMs: 'never' }, 200);
    try {
      await hp.addDevice(ADDRESS, cdev());
      await assert.rejects(hp.removeDevice(ADDRESS), DeadlineExceededError);
      assert.deepEqual(gone, []);
      peer.unplugNow(ID);
      await until('the late event', () => gone.length === 1);
      assert.deepEqual(gone, [ADDRESS]);
      peer.emit('DEVICE_DELETED', { device: 'nic0', path: '/machine/peripheral/nic0' });
      peer.emit('DEVICE_DELETED', { path: '/machine/peripheral-anon/device[3]' });
      await hp.addDevice('0000:00:05.0', cdev());
      const awaited = hp.removeDevice('0000:00:05.0');
      await until('device_del', () => peer.commands.filter((c) => c.execute === 'device_del').length === 2);
      peer.unplugNow('kvmvfiod-0000-00-05.0');
      await awaited;
      await new Promise((r) => setTimeout(r, 50));
      assert.deepEqual(gone, [ADDRESS], 'the awaited removal and the devices not ours are not reported');
    } finally {
      done();
    }
  });

  test('remove: the guest refusing (DEVICE_UNPLUG_GUEST_ERROR) is FAILED_PRECONDITION; the channel closing is UNAVAILABLE', async () => {
    const { hp, peer, done } = driver({ ports: ['kvmvfiod-port-1'], deleteAfterMs: 'never' }, 5000);
    try {
      await hp.addDevice(ADDRESS, cdev());
      const refused = hp.removeDevice(ADDRESS);
      await until('device_del', () => peer.commands.some((c) => c.execute === 'device_del'));
      peer.emit('DEVICE_DELETED', { device: 'someone-else' });
      peer.emit('DEVICE_UNPLUG_GUEST_ERROR', { device: ID, path: `/machine/peripheral/${ID}` });
      await assert.rejects(refused, (e: unknown) => e instanceof FailedPreconditionError && /refused to let go/.test(e.message));
      const cut = hp.removeDevice(ADDRESS);
      await until('second device_del', () => peer.commands.filter((c) => c.execute === 'device_del').length === 2);
      peer.close();
      await assert.rejects(cut, UnavailableError);
    } finally {
      done();
    }
  });
});

describe("QEMU's refusals in the one status mapping", () => {
  const cases: [string, string, string, Status][] = [
    ['device_add', 'GenericError', 'vfio kvmvfiod-0000-00-04.0: error bind device fd=17 to iommufd=16: Invalid argument', Status.FAILED_PRECONDITION],
    ['device_add', 'GenericError', 'vfio kvmvfiod-0000-00-04.0: error bind device fd=17 to iommufd=16: Device or resource busy', Status.FAILED_PRECONDITION],
    ['device_add', 'GenericError', 'vfio VFIO_FD18: error bind device fd=18 to iommufd=17: Inappropriate ioctl for device', Status.INVALID_ARGUMENT],
    ['device_add', 'GenericError', "Duplicate device ID 'kvmvfiod-0000-00-04.0'", Status.ALREADY_EXISTS],
    ['device_add', 'GenericError', "Bus 'pcie.0' does not support hotplugging", Status.FAILED_PRECONDITION],
    ['device_add', 'GenericError', "Bus 'rp9' not found", Status.FAILED_PRECONDITION],
    ['device_add', 'GenericError', 'vfio kvmvfiod-0000-00-04.0: memory listener initialization failed: Region pc.ram: vfio_container_dma_map(0x1, 0x0, 0x4000000, 0x7f) = -12 (Cannot allocate memory)', Status.RESOURCE_EXHAUSTED],
    ['device_del', 'DeviceNotFound', "Device 'x' not found", Status.NOT_FOUND],
    ['frobnicate', 'CommandNotFound', 'The command frobnicate has not been found', Status.UNIMPLEMENTED],
    ['device_add', 'GenericError', 'something QEMU never said before', Status.UNKNOWN],
  ];
  for (const [command, cls, desc, code] of cases) {
    test(`${command}: ${desc.slice(0, 70)} -> ${Status[code]}`, () => {
      const e = new QmpError('QEMU (pid 7) of vm web-1', command, cls, desc);
      assert.equal(Status[statusForQmpError(e)], Status[code]);
      const m = toStatus(e);
      assert.equal(Status[m.code], Status[code]);
      assert.ok(m.details.includes(desc) && m.details.includes('QEMU (pid 7) of vm web-1'), m.details);
      assert.equal(m.ref, undefined, 'never INTERNAL: it is QEMU\'s answer');
    });
  }
});
