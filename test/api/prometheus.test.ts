/**
 * Debian's own Prometheus server scrapes the daemon's --metrics-address on
 * loopback; the series are read back through Prometheus's HTTP API after VMs
 * were launched and deleted, and checked against what was done. The same
 * text comes over the API socket (GetMetrics, `kvmvfioctl metrics`).
 *
 * Needs /usr/bin/prometheus (.ci/run installs Debian's package). Without it
 * the test skips, unless KVMVFIO_REQUIRE_PROMETHEUS=1 (CI), where it fails.
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CLI_JS, startDaemon } from '../helpers/daemon';
import { REFERENCE_VMM, runVmm, type VmmProc } from '../helpers/vmmproc';
import { until } from '../helpers/assert';

const PROMETHEUS = '/usr/bin/prometheus';
const required = process.env.KVMVFIO_REQUIRE_PROMETHEUS === '1';

const cleanups: (() => Promise<void> | void)[] = [];
after(async () => {
  for (const c of cleanups.reverse()) await c();
});

/** A TCP port free on loopback now. */
function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });
}

interface Sample {
  metric: Record<string, string>;
  value: [number, string];
}

test('Prometheus scrapes the daemon: VMs, groups, sessions, tokens, calls, session requests, state commits, fds, event loop', { skip: !existsSync(PROMETHEUS) && !required ? 'no /usr/bin/prometheus (apt-get install prometheus)' : false, timeout: 120_000 }, async () => {
  assert.ok(existsSync(PROMETHEUS), `${PROMETHEUS} is installed`);
  const dir = await mkdtemp(join(tmpdir(), 'kvmvfiod-prom-'));
  cleanups.push(() => rm(dir, { recursive: true, force: true }));
  const metricsPort = await freePort();
  const d = await startDaemon({ args: ['--metrics-address', String(metricsPort)] });
  cleanups.push(() => d.cleanup());
  assert.ok(d.logs.some((l) => l.event === 'metrics-listening' && l.host === '127.0.0.1' && l.port === metricsPort), 'a bare port listens on loopback');
  const c = d.client();

  // Three VMs launched by the reference VMM, two of them deleted; one PENDING with its token unused.
  const vmms: VmmProc[] = [];
  cleanups.push(() => vmms.forEach((v) => v.kill()));
  const running: string[] = [];
  for (let i = 0; i < 3; i++) {
    const { vm, attach_token: tok } = await c.createVm({ name: `prom-${i}`, vmm_uid: 65534, vfio_device: true });
    const v = runVmm([process.execPath, REFERENCE_VMM, '--socket', join(d.runtimeDir, 'handoff.sock')], tok!.token);
    vmms.push(v);
    await until(`vm ${i} RUNNING`, async () => (await c.getVm(vm!.id)).state === 'VM_STATE_RUNNING');
    running.push(vm!.id);
  }
  for (const id of running.slice(0, 2)) await c.deleteVm({ vm_id: id, force: true });
  await c.createVm({ name: 'prom-pending', vmm_uid: 65534 });

  const promPort = await freePort();
  const config = join(dir, 'prometheus.yml');
  await writeFile(
    config,
    ['global:', '  scrape_interval: 1s', 'scrape_configs:', '  - job_name: kvmvfiod', '    static_configs:', `      - targets: ['127.0.0.1:${metricsPort}']`, ''].join('\n'),
  );
  const prom: ChildProcess = spawn(PROMETHEUS, [`--config.file=${config}`, `--storage.tsdb.path=${join(dir, 'tsdb')}`, `--web.listen-address=127.0.0.1:${promPort}`], { stdio: 'ignore' });
  cleanups.push(() => void prom.kill('SIGKILL'));
  const api = `http://127.0.0.1:${promPort}`;
  const query = async (q: string): Promise<Sample[]> => {
    const r = await fetch(`${api}/api/v1/query?query=${encodeURIComponent(q)}`);
    const body = (await r.json()) as { status: string; data: { result: Sample[] } };
    assert.equal(body.status, 'success', q);
    return body.data.result;
  };
  const value = async (q: string): Promise<number | undefined> => {
    const r = await query(q);
    return r.length ? Number(r[0].value[1]) : undefined;
  };
  await until('Prometheus ready', async () => (await fetch(`${api}/-/ready`).catch(() => undefined))?.ok === true, 30_000);
  await until('the target scraped and up', async () => (await value('up{job="kvmvfiod"}')) === 1, 30_000);
  // What was done, read back from Prometheus.
  await until('the VM series', async () => (await value('kvmvfiod_vms{state="RUNNING"}')) === 1, 15_000);
  assert.equal(await value('kvmvfiod_vms{state="PENDING"}'), 1);
  assert.equal(await value('kvmvfiod_vms{state="EXITED"}'), 0);
  assert.equal(await value('kvmvfiod_sessions'), 1);
  assert.equal(await value('kvmvfiod_attach_tokens_pending'), 1);
  assert.equal(await value('kvmvfiod_grpc_calls_total{method="CreateVm",code="OK"}'), 4);
  assert.equal(await value('kvmvfiod_grpc_calls_total{method="DeleteVm",code="OK"}'), 2);
  assert.ok((await value('kvmvfiod_grpc_call_duration_seconds_count{method="CreateVm"}'))! >= 4);
  assert.ok((await value('kvmvfiod_grpc_call_duration_seconds_bucket{method="CreateVm",le="+Inf"}'))! >= 4);
  const median = await value('histogram_quantile(0.5, sum by (le) (kvmvfiod_grpc_call_duration_seconds_bucket{method="CreateVm"}))');
  assert.ok(median! > 0 && median! < 1, `CreateVm median ${median} s`);
  // Each launch's plan made its KVM-VFIO device through the session.
  assert.equal(await value('sum(kvmvfiod_session_request_duration_seconds_count{kind="CREATE_VFIO_DEVICE",outcome="ok"})'), 3);
  assert.ok((await value('kvmvfiod_state_commit_duration_seconds_count'))! >= 6, 'a commit per mutating call at least');
  assert.equal(await value('kvmvfiod_state_writable'), 1);
  assert.equal((await query('kvmvfiod_iommu_groups')).length, 4, 'one series per holding');
  assert.ok((await value('kvmvfiod_process_open_fds'))! > 0);
  assert.ok((await value('kvmvfiod_process_max_fds'))! >= 1024);
  assert.ok((await value('kvmvfiod_nodejs_eventloop_lag_p99_seconds')) !== undefined);
  // Labels stay bounded: no series carries a VM id or name.
  const all = await query('{job="kvmvfiod"}');
  const labelValues = all.flatMap((s) => Object.values(s.metric));
  for (const id of running) assert.ok(!labelValues.includes(id), 'no VM id as a label');
  assert.ok(!labelValues.some((v) => v.startsWith('prom-')), 'no VM name as a label');

  // The same text over the API socket, for an agent with no TCP.
  const text = execFileSync(process.execPath, [CLI_JS, '--socket', d.apiSocket, 'metrics'], { encoding: 'utf8' });
  assert.match(text, /^kvmvfiod_vms\{state="RUNNING"\} 1$/m);
  assert.match(text, /^kvmvfiod_sessions 1$/m);
  // Other paths of the HTTP listener are not served.
  assert.equal((await fetch(`http://127.0.0.1:${metricsPort}/`)).status, 404);
});
