/**
 * Makes one API call and prints its outcome as JSON: run it through setpriv
 * as another uid to test what the policy lets that uid do.
 *   node call-as.js SOCKET METHOD 'JSON request'
 */
import { KvmVfioApi, isApiError } from '../../src/client/client';

async function main(): Promise<void> {
  const [socket, method, json] = process.argv.slice(2);
  const api = new KvmVfioApi(socket, { timeoutMs: 5000 }) as unknown as Record<string, (req: unknown) => Promise<unknown>>;
  try {
    const res = await api[method](JSON.parse(json || '{}'));
    process.stdout.write(`${JSON.stringify({ ok: true, res })}\n`);
  } catch (e) {
    if (!isApiError(e)) throw e;
    process.stdout.write(`${JSON.stringify({ ok: false, code: e.code, details: e.details })}\n`);
  }
  (api as unknown as KvmVfioApi).close();
}

void main();
