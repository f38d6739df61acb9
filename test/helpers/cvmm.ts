/**
 * Builds the C reference VMM (test/vmm/refvmm.c) with the system gcc, once
 * per process, into a temp dir that an unprivileged uid can enter and whose
 * binary it can run (the VMM runs as nobody).
 */
import { execFile } from 'node:child_process';
import { chmod, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { promisify } from 'node:util';
import { REPO } from './daemon';

export const CVMM_SOURCE = join(REPO, 'test', 'vmm', 'refvmm.c');
export const CVMM_CFLAGS = ['-O2', '-Wall', '-Wextra', '-Werror', '-std=c11', '-D_GNU_SOURCE'];

const run = promisify(execFile);
let built: Promise<string> | undefined;

async function build(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'kvmvfiod-cvmm-'));
  try {
    await chmod(dir, 0o755);
    const bin = join(dir, 'refvmm');
    try {
      await run('gcc', [...CVMM_CFLAGS, '-o', bin, CVMM_SOURCE]);
    } catch (e) {
      const err = e as Error & { stderr?: string; code?: number | string };
      throw new Error(`gcc ${CVMM_CFLAGS.join(' ')} ${CVMM_SOURCE} failed (${err.code ?? 'no exit code'}):\n${err.stderr || err.message}`);
    }
    await chmod(bin, 0o755);
    return bin;
  } catch (e) {
    await rm(dir, { recursive: true, force: true });
    throw e;
  }
}

/** The path of the compiled VMM. Compiles on the first call; a failed build is retried on the next. */
export function buildCVmm(): Promise<string> {
  built ??= build().catch((e: unknown) => {
    built = undefined;
    throw e;
  });
  return built;
}

/** Removes the build's temp dir (call from `after`); the next buildCVmm() compiles again. */
export async function removeCVmm(): Promise<void> {
  const p = built;
  built = undefined;
  if (!p) return;
  const bin = await p.catch(() => undefined);
  if (bin) await rm(dirname(bin), { recursive: true, force: true });
}
