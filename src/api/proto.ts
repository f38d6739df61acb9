/** Loads proto/kvmvfio/v1/kvmvfio.proto once, typed by the generated definitions (src/generated). */
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { join } from 'node:path';
import type { ProtoGrpcType } from '../generated/kvmvfio';

/** proto/ at the package root: dist/src/api → ../../../proto. */
export const PROTO_DIR = join(__dirname, '..', '..', '..', 'proto');
export const PROTO_FILE = 'kvmvfio/v1/kvmvfio.proto';

/** Must match the flags of `npm run gen`, so the runtime shapes are the generated types. */
export const LOADER_OPTIONS: protoLoader.Options = {
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
  includeDirs: [PROTO_DIR],
};

let cached: { definition: protoLoader.PackageDefinition; proto: ProtoGrpcType } | undefined;

export function loadApi(): { definition: protoLoader.PackageDefinition; proto: ProtoGrpcType } {
  if (!cached) {
    const definition = protoLoader.loadSync(PROTO_FILE, LOADER_OPTIONS);
    const proto = grpc.loadPackageDefinition(definition) as unknown as ProtoGrpcType;
    cached = { definition, proto };
  }
  return cached;
}

export type { Vm__Output as VmMessage } from '../generated/kvmvfio/v1/Vm';
export type { IommuGroup__Output as IommuGroupMessage } from '../generated/kvmvfio/v1/IommuGroup';
export type { HostInfo__Output as HostInfoMessage } from '../generated/kvmvfio/v1/HostInfo';
export type { VmEvent__Output as VmEventMessage } from '../generated/kvmvfio/v1/VmEvent';
export type { VmState as VmStateName } from '../generated/kvmvfio/v1/VmState';
export type { KvmVfioClient } from '../generated/kvmvfio/v1/KvmVfio';
export type { KvmVfioHandlers } from '../generated/kvmvfio/v1/KvmVfio';
