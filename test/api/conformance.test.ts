/**
 * The conformance runner (src/conformance/runner.ts, `kvmvfioctl
 * conformance`) against both reference VMMs, run as uid 65534: every VMM
 * rule of docs/session-protocol.md it checks must pass. And against a VMM
 * that breaks the rules (the silent test VMM), so that a check that cannot
 * fail would show.
 */
import { test, describe, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { runConformance, VMM_RULES, type RuleReport } from '../../src/conformance/runner';
import { buildCVmm, removeCVmm } from '../helpers/cvmm';
import { CLI_JS } from '../helpers/daemon';
import { NOBODY, REFERENCE_VMM, SILENT_VMM } from '../helpers/vmmproc';

const failures = (reports: RuleReport[]) => reports.filter((r) => r.outcome !== 'pass').map((r) => `${r.outcome} ${r.id}: ${r.details.join('; ')}`);

describe('the conformance runner', () => {
  after(() => removeCVmm());

  test('the TypeScript reference VMM (src/vmm) passes every rule the runner checks', async () => {
    const reports = await runConformance({ argv: [...NOBODY, process.execPath, REFERENCE_VMM, '--socket', '{handoff}'] });
    assert.deepEqual(reports.map((r) => r.id), Object.keys(VMM_RULES));
    assert.deepEqual(failures(reports), []);
  });

  test('the C reference VMM (test/vmm/refvmm.c) passes every rule the runner checks, through kvmvfioctl conformance (exit 0)', async () => {
    const bin = await buildCVmm();
    const { code, stdout, stderr } = await new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) =>
      execFile(process.execPath, [CLI_JS, '--json', 'conformance', '--', ...NOBODY, bin, '{handoff}'], { timeout: 120_000 }, (err, out, errText) =>
        resolve({ code: err ? (typeof err.code === 'number' ? err.code : null) : 0, stdout: out, stderr: errText }),
      ),
    );
    const reports = (JSON.parse(stdout) as { rules: RuleReport[] }).rules;
    assert.deepEqual(failures(reports), [], stderr);
    assert.equal(code, 0);
    assert.equal(reports.length, Object.keys(VMM_RULES).length);
  });

  test('a VMM that never answers fails the rules it breaks, and kvmvfioctl conformance exits 1', async () => {
    const reports = await runConformance({ argv: [...NOBODY, process.execPath, SILENT_VMM, '{handoff}'], waitMs: 600, only: ['lifecycle', 'stray-result', 'manifest'] });
    const outcome = Object.fromEntries(reports.map((r) => [r.id, r.outcome]));
    // It attaches and makes its VM: those pass. It reads nothing after: answering, closing on a bad record, SHUTDOWN fail.
    assert.equal(outcome.S10, 'pass');
    assert.equal(outcome.S16, 'pass');
    for (const id of ['S6', 'S7', 'S21', 'S26']) assert.equal(outcome[id], 'fail', `${id}: ${JSON.stringify(reports.find((r) => r.id === id))}`);
    const cli = await new Promise<number | null>((resolve) =>
      execFile(process.execPath, [CLI_JS, '--timeout', '600', 'conformance', '--only', 'stray-result', '--', ...NOBODY, process.execPath, SILENT_VMM, '{handoff}'], (err) => resolve(err ? (typeof err.code === 'number' ? err.code : null) : 0)),
    );
    assert.equal(cli, 1);
  });
});
