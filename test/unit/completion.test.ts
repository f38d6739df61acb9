/**
 * `kvmvfioctl completion bash`, sourced in a real bash and asked as readline
 * would ask it (COMP_WORDS, COMP_CWORD), for each kind of word it completes.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CLI_JS } from '../helpers/daemon';
import { SYNOPSIS } from '../../src/cli/usage';
import { commandSpecs } from '../../src/cli/completion';

const script = execFileSync(process.execPath, [CLI_JS, 'completion', 'bash'], { encoding: 'utf8' });

/** What the completion offers for a command line whose last word is being typed (cur may be ''). */
function complete(...words: string[]): string[] {
  const program = [
    script,
    `COMP_WORDS=(${['kvmvfioctl', ...words].map((w) => `'${w}'`).join(' ')})`,
    `COMP_CWORD=${words.length}`,
    '_kvmvfioctl',
    'printf "%s\\n" "${COMPREPLY[@]}"',
  ].join('\n');
  const r = spawnSync('bash', ['--norc', '--noprofile', '-c', program], { encoding: 'utf8' });
  assert.equal(r.status, 0, r.stderr);
  assert.equal(r.stderr, '', `bash said: ${r.stderr}`);
  return r.stdout.split('\n').filter(Boolean);
}

test('completion bash: a script bash accepts, registered for kvmvfioctl', () => {
  const r = spawnSync('bash', ['--norc', '--noprofile', '-c', `${script}\ncomplete -p kvmvfioctl`], { encoding: 'utf8' });
  assert.equal(r.status, 0, r.stderr);
  assert.equal(r.stdout.trim(), 'complete -F _kvmvfioctl kvmvfioctl');
});

test('completion: commands, subcommands, flags per command, and flag values', () => {
  // Every first word of the command table, and nothing else.
  assert.deepEqual(complete('').sort(), [...new Set(Object.keys(SYNOPSIS).map((k) => k.split(' ')[0]))].sort());
  assert.deepEqual(complete('g'), ['groups']);
  assert.deepEqual(complete('vm', 'remove'), ['remove-group']);
  assert.deepEqual(complete('vm', '').length, Object.keys(SYNOPSIS).filter((k) => k.startsWith('vm ')).length);
  assert.deepEqual(complete('policy', ''), ['check']);
  assert.deepEqual(complete('completion', ''), ['bash']);
  // vm create's own flags and the global ones, after its name; not another command's.
  const create = complete('vm', 'create', 'web-1', '--');
  for (const f of ['--vmm-uid', '--vfio-device', '--group', '--cdev', '--label', '--memlock', '--request-id', '--socket', '--json', '--timeout']) assert.ok(create.includes(f), `vm create: ${f} missing from ${create.join(' ')}`);
  assert.ok(!create.includes('--force') && !create.includes('--token'), create.join(' '));
  assert.deepEqual(complete('vm', 'delete', 'web-1', '--f'), ['--force']);
  // Values: states, the VMM kinds; a global flag's value is skipped when finding the command.
  assert.deepEqual(complete('vm', 'list', '--state', 'r'), ['running']);
  assert.deepEqual(complete('--socket', '/tmp/api.sock', 'vm', 'watch', '--state', ''), ['pending', 'running', 'exited', 'failed']);
  assert.deepEqual(complete('vm', 'args', 'web-1', '--vmm', ''), ['qemu']);
  assert.deepEqual(complete('vm', 'list', '--state', '=', 'e'), ['exited']);
  // --label KEY=VALUE reaches the function as KEY, "=", VALUE: none of them is a command word.
  assert.deepEqual(complete('vm', 'list', '--label', 'app', '=', 'web', '--p'), ['--page-size']);
  assert.deepEqual(complete('--label', 'app', '=', 'web', 'comp'), ['completion']);
  assert.deepEqual(complete('vm', 'create', 'web-1', '--label', 'app', '=', 'web', '--memlock', '2G', '--vfio'), ['--vfio-device']);
  // A flag that takes a number offers nothing rather than commands.
  assert.deepEqual(complete('vm', 'create', 'web-1', '--vmm-uid', ''), []);
});

test('completion: files where a synopsis says FILE or PATH, commands after attach --', () => {
  const dir = mkdtempSync(join(tmpdir(), 'kvmvfio-completion-'));
  try {
    writeFileSync(join(dir, 'policy.json'), '{}');
    assert.deepEqual(complete('policy', 'check', join(dir, 'pol')), [join(dir, 'policy.json')]);
    assert.deepEqual(complete('--socket', join(dir, 'p')), [join(dir, 'policy.json')]);
    assert.deepEqual(complete('attach', '--handoff', join(dir, 'po')), [join(dir, 'policy.json')]);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  assert.ok(complete('attach', '--', 'bas').includes('bash'));
  assert.deepEqual(complete('attach', '--', 'bash', join(tmpdir(), 'kvmvfio-no-such-')), []);
});

test('completion: each command of the table is completed with the flags its synopsis names', () => {
  for (const spec of commandSpecs()) {
    const words = spec.words.split(' ');
    const offered = complete(...words, ...spec.positionals.map(() => 'x'), '--');
    for (const f of spec.flags) assert.ok(offered.includes(f.flag), `${spec.words}: ${f.flag} not offered`);
  }
});

test('completion: a shell other than bash is a usage error', () => {
  const r = spawnSync(process.execPath, [CLI_JS, 'completion', 'zsh'], { encoding: 'utf8' });
  assert.equal(r.status, 2);
  assert.match(r.stderr, /only bash is supported/);
  assert.match(r.stderr, /^Usage: kvmvfioctl completion bash$/m);
});
