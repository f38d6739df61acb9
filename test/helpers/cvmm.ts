/**
 * Builds the test's C programs with the system gcc — the C reference VMM
 * (test/vmm/refvmm.c), the no-peerpidfd wrapper — once per process each,
 * into a temp dir that an unprivileged uid can enter and whose binary it can
 * run (the VMM runs as nobody).
 */
import { execFile } from 'node:child_process';
import { chmod, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { promisify } from 'node:util';
import { REPO } from './daemon';

export const CVMM_SOURCE = join(REPO, 'test', 'vmm', 'refvmm.c');
export const NO_PEERPIDFD_SOURCE = join(REPO, 'test', 'helpers', 'no-peerpidfd.c');
export const CVMM_CFLAGS = ['-O2', '-Wall', '-Wextra', '-Werror', '-std=c11', '-D_GNU_SOURCE'];

const run = promisify(execFile);
let built: Promise<string> | undefined;
let wrapper: Promise<string> | undefined;

async function build(source = CVMM_SOURCE, name = 'refvmm'): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), `kvmvfiod-${name}-`));
  try {
    await chmod(dir, 0o755);
    const bin = join(dir, name);
    try {
      await run('gcc', [...CVMM_CFLAGS, '-o', bin, source]);
    } catch (e) {
      const err = e as Error & { stderr?: string; code?: number | string };
      throw new Error(`gcc ${CVMM_CFLAGS.join(' ')} ${source} failed (${err.code ?? 'no exit code'}):\n${err.stderr || err.message}`);
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

/**
 * The path of the no-peerpidfd wrapper (test/helpers/no-peerpidfd.c): a
 * command run under it sees a kernel without SO_PEERPIDFD.
 */
export function buildNoPeerPidfd(): Promise<string> {
  wrapper ??= build(NO_PEERPIDFD_SOURCE, 'no-peerpidfd').catch((e: unknown) => {
    wrapper = undefined;
    throw e;
  });
  return wrapper;
}

/** Removes the builds' temp dirs (call from `after`); the next build compiles again. */
export async function removeCVmm(): Promise<void> {
  const all = [built, wrapper];
  built = wrapper = undefined;
  for (const p of all) {
    const bin = await p?.catch(() => undefined);
    if (bin) await rm(dirname(bin), { recursive: true, force: true });
  }
}
