/** Generic gRPC tools can explore the daemon: the health service and reflection answer. */
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { protoPath as healthProto } from 'grpc-health-check';
import { REPO, startDaemon, type RunningDaemon } from '../helpers/daemon';

type Ctor = new (address: string, creds: grpc.ChannelCredentials) => grpc.Client;

function clientCtor(file: string, includeDir: string, dotted: string): Ctor {
  const def = protoLoader.loadSync(file, { includeDirs: [includeDir], keepCase: true, enums: String });
  let node: unknown = grpc.loadPackageDefinition(def);
  for (const part of dotted.split('.')) node = (node as Record<string, unknown>)[part];
  return node as Ctor;
}

let d: RunningDaemon;
before(async () => (d = await startDaemon()));
after(async () => d?.cleanup());

test('grpc.health.v1.Health says SERVING for the daemon and its service', async () => {
  const Health = clientCtor(healthProto, join(healthProto, '..', '..', '..'), 'grpc.health.v1.Health');
  const h = new Health(`unix:${d.apiSocket}`, grpc.credentials.createInsecure()) as grpc.Client & {
    Check(req: { service: string }, cb: (e: grpc.ServiceError | null, r?: { status: string }) => void): void;
  };
  try {
    for (const service of ['', 'kvmvfio.v1.KvmVfio']) {
      const r = await new Promise<{ status: string }>((res, rej) => h.Check({ service }, (e, v) => (e ? rej(e) : res(v!))));
      assert.equal(r.status, 'SERVING', `service "${service}"`);
    }
    await assert.rejects(
      new Promise((res, rej) => h.Check({ service: 'no.such.Service' }, (e, v) => (e ? rej(e) : res(v)))),
      (e: grpc.ServiceError) => e.code === grpc.status.NOT_FOUND,
    );
  } finally {
    h.close();
  }
});

test('reflection lists kvmvfio.v1.KvmVfio and serves its file descriptor', async () => {
  const protoFile = join(REPO, 'node_modules/@grpc/reflection/build/proto/grpc/reflection/v1/reflection.proto');
  const Reflection = clientCtor(protoFile, join(protoFile, '..', '..', '..', '..'), 'grpc.reflection.v1.ServerReflection');
  const r = new Reflection(`unix:${d.apiSocket}`, grpc.credentials.createInsecure()) as grpc.Client & {
    ServerReflectionInfo(): grpc.ClientDuplexStream<Record<string, unknown>, Record<string, { service?: { name: string }[]; file_descriptor_proto?: Buffer[] }>>;
  };
  try {
    const call = r.ServerReflectionInfo();
    const replies: Record<string, { service?: { name: string }[]; file_descriptor_proto?: Buffer[] }>[] = [];
    const done = new Promise<void>((res, rej) => {
      call.on('data', (m) => {
        replies.push(m);
        if (replies.length === 2) call.end();
      });
      call.on('end', res);
      call.on('error', rej);
    });
    call.write({ list_services: '' });
    call.write({ file_containing_symbol: 'kvmvfio.v1.KvmVfio' });
    await done;
    const names = replies[0].list_services_response?.service?.map((s) => s.name) ?? [];
    assert.ok(names.includes('kvmvfio.v1.KvmVfio'), `services: ${names.join(', ')}`);
    const fds = replies[1].file_descriptor_response?.file_descriptor_proto ?? [];
    assert.ok(fds.length >= 1);
    assert.ok(Buffer.concat(fds).includes(Buffer.from('CreateVfioDevice')));
  } finally {
    r.close();
  }
});
