/**
 * `kvmvfioctl health`: the standard grpc.health.v1.Health/Check on the API
 * socket, the question a container HEALTHCHECK or a liveness probe asks. The
 * service definition comes from grpc-health-check, the package the daemon
 * serves it with, so both ends read the same health.proto.
 */
import * as grpc from '@grpc/grpc-js';
import { service as healthService } from 'grpc-health-check';

/** HealthCheckResponse.ServingStatus, by name (the package loads enums as strings). */
export type ServingStatus = 'UNKNOWN' | 'SERVING' | 'NOT_SERVING' | 'SERVICE_UNKNOWN';

type HealthClient = grpc.Client & {
  Check(req: { service: string }, opts: grpc.CallOptions, cb: (e: grpc.ServiceError | null, r?: { status: ServingStatus }) => void): void;
};

/**
 * The serving status of `service` ("" is the daemon as a whole) at the API
 * socket. A call that fails (no daemon, an unknown service: NOT_FOUND, the
 * deadline) rejects with the grpc-js status error, as the client's calls do.
 */
export async function checkHealth(socket: string, service: string, timeoutMs: number): Promise<ServingStatus> {
  const Health = grpc.makeClientConstructor(healthService as unknown as grpc.ServiceDefinition, 'grpc.health.v1.Health');
  const client = new Health(`unix:${socket}`, grpc.credentials.createInsecure()) as unknown as HealthClient;
  try {
    return await new Promise<ServingStatus>((resolve, reject) =>
      client.Check({ service }, { deadline: Date.now() + timeoutMs }, (e, r) => (e ? reject(e) : resolve(r?.status ?? 'UNKNOWN'))),
    );
  } finally {
    client.close();
  }
}
