/**
 * Command-line parsing for kvmvfioctl: one node:util parseArgs pass over the
 * whole command line (so global flags go anywhere), then strict checks of
 * every value. Anything wrong here is the user's to fix: a UsageError, exit 2.
 */
import { parseArgs } from 'node:util';
import type { VmState } from '../generated/kvmvfio/v1/VmState';

export class UsageError extends Error {
  override readonly name = 'UsageError';
}

/** Every flag of every command; which command takes which is checked after parsing. */
const OPTIONS = {
  socket: { type: 'string' },
  json: { type: 'boolean' },
  timeout: { type: 'string' },
  help: { type: 'boolean', short: 'h' },
  version: { type: 'boolean' },
  'vmm-uid': { type: 'string' },
  'vfio-device': { type: 'boolean' },
  group: { type: 'string', multiple: true },
  label: { type: 'string', multiple: true },
  memlock: { type: 'string' },
  'request-id': { type: 'string' },
  state: { type: 'string', multiple: true },
  'page-size': { type: 'string' },
  force: { type: 'boolean' },
  token: { type: 'string' },
  handoff: { type: 'string' },
  vmm: { type: 'string' },
  cdev: { type: 'boolean' },
  only: { type: 'string', multiple: true },
  'hotplug-ports': { type: 'string' },
} as const;

export type OptionName = keyof typeof OPTIONS;

export const GLOBAL_OPTIONS: readonly OptionName[] = ['socket', 'json', 'timeout', 'help', 'version'];

function parse(argv: string[]) {
  return parseArgs({ args: argv, options: OPTIONS, allowPositionals: true, strict: true, tokens: true });
}

export type Values = ReturnType<typeof parse>['values'];

export interface CommandLine {
  positionals: string[];
  values: Values;
  /** The flags present on the command line, by long name. */
  given: Set<OptionName>;
  /**
   * Where `--` stood: the number of positionals before it (those after it are
   * `positionals.slice(terminatorAt)`, taken as they are, flags or not);
   * undefined when there was none.
   */
  terminatorAt?: number;
}

/**
 * The command words of a line parseArgs refused, so the usage error can show
 * that command's synopsis: the first two words that are neither flags nor
 * the values of string flags.
 */
export function commandWords(argv: readonly string[]): string[] {
  const words: string[] = [];
  for (let i = 0; i < argv.length && words.length < 2; i++) {
    const a = argv[i];
    if (a === '--') break;
    if (a.startsWith('-')) {
      const name = a.slice(2);
      if (a.startsWith('--') && !a.includes('=') && Object.hasOwn(OPTIONS, name) && OPTIONS[name as OptionName].type === 'string') i++;
      continue;
    }
    words.push(a);
  }
  return words[0] === 'vm' ? words : words.slice(0, 1);
}

/** String flags whose values are opaque and may start with "-": an attach token is base64url, 1 in 32 starts so. */
const OPAQUE: readonly string[] = ['--token'];

/**
 * `--token -Abc` as `--token=-Abc`: parseArgs refuses a value starting with
 * "-" after a space (it may be a forgotten value), which would make one
 * token in 32 unusable as `--token "$T"`. Not after `--`, and `--` itself
 * is never taken as the value.
 */
function joinOpaqueValues(argv: readonly string[]): string[] {
  const out: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--') return out.concat(argv.slice(i));
    const next = argv[i + 1];
    if (OPAQUE.includes(a) && next !== undefined && next !== '--' && next.startsWith('-')) {
      out.push(`${a}=${next}`);
      i++;
    } else out.push(a);
  }
  return out;
}

export function parseCommandLine(argv: string[]): CommandLine {
  let parsed: ReturnType<typeof parse>;
  try {
    parsed = parse(joinOpaqueValues(argv));
  } catch (e) {
    // parseArgs throws TypeErrors with ERR_PARSE_ARGS_* codes and a readable message.
    let message = (e as Error).message;
    // `attach --token T qemu -m 1G`: the VMM's own flags reached the parser.
    if (commandWords(argv)[0] === 'attach' && !argv.includes('--')) message += ' (the VMM command and its arguments go after --)';
    throw new UsageError(message);
  }
  const given = new Set<OptionName>();
  let seen = 0;
  let terminatorAt: number | undefined;
  for (const t of parsed.tokens) {
    if (t.kind === 'option') given.add(t.name as OptionName);
    else if (t.kind === 'positional') seen++;
    else if (t.kind === 'option-terminator') terminatorAt = seen;
  }
  return { positionals: parsed.positionals, values: parsed.values, given, terminatorAt };
}

/** Refuses flags the command does not take (parseArgs knows only the union of all commands' flags). */
export function allowOnly(cl: CommandLine, command: string, allowed: readonly OptionName[]): void {
  for (const name of cl.given) {
    if (!GLOBAL_OPTIONS.includes(name) && !allowed.includes(name)) throw new UsageError(`${command} does not take --${name}`);
  }
}

/** Exactly `names.length` positionals after the command words, named for the message. */
export function positionals(args: string[], names: readonly string[]): string[] {
  if (args.length < names.length) throw new UsageError(`missing ${names.slice(args.length).join(' ')}`);
  if (args.length > names.length) throw new UsageError(`unexpected argument ${JSON.stringify(args[names.length])}`);
  return args;
}

// Digits only: no sign, no spaces, no hex, no exponent ("1a", "-1", "1e3", " 1" are all refused).
const DIGITS = /^[0-9]+$/;

/** A non-negative integer no larger than `max`. */
export function parseUint(text: string, what: string, max: number): number {
  if (!DIGITS.test(text)) throw new UsageError(`${what}: ${JSON.stringify(text)} is not a non-negative integer`);
  const n = Number(text);
  if (!Number.isSafeInteger(n) || n > max) throw new UsageError(`${what}: ${text} is larger than ${max}`);
  return n;
}

export const UINT32_MAX = 0xffffffff;
/** ListVms page_size is an int32; the daemon takes more than 500 as 500. */
export const PAGE_SIZE_MAX = 0x7fffffff;
/** (uid_t)-1 means "no uid" to the kernel; it cannot be a VMM's uid. */
export const UID_MAX = 0xfffffffe;
const UINT64_MAX = (1n << 64n) - 1n;

/** An IOMMU group number (the proto's uint32). */
export const parseGroup = (text: string, what = 'GROUP'): number => parseUint(text, what, UINT32_MAX);

/** Group numbers of repeated --group flags, in the order given; a repeat is refused. */
export function parseGroups(texts: readonly string[] | undefined): number[] {
  const out: number[] = [];
  for (const t of texts ?? []) {
    const n = parseGroup(t, '--group');
    if (out.includes(n)) throw new UsageError(`--group ${n} given twice`);
    out.push(n);
  }
  return out;
}

/** Repeated --label k=v flags. The value may be empty; the key may not; a key given twice is refused. */
export function parseLabels(texts: readonly string[] | undefined): Record<string, string> {
  // A Map, then fromEntries: a key like "__proto__" stays an ordinary key.
  const out = new Map<string, string>();
  for (const t of texts ?? []) {
    const eq = t.indexOf('=');
    if (eq <= 0) throw new UsageError(`--label ${JSON.stringify(t)}: expected KEY=VALUE`);
    const key = t.slice(0, eq);
    if (out.has(key)) throw new UsageError(`--label ${key} given twice`);
    out.set(key, t.slice(eq + 1));
  }
  return Object.fromEntries(out);
}

const STATES: Record<string, VmState> = {
  pending: 'VM_STATE_PENDING',
  running: 'VM_STATE_RUNNING',
  exited: 'VM_STATE_EXITED',
  failed: 'VM_STATE_FAILED',
};

/** Repeated --state flags: pending|running|exited|failed, any case, with or without the VM_STATE_ prefix. */
export function parseStates(texts: readonly string[] | undefined): VmState[] {
  const out: VmState[] = [];
  for (const t of texts ?? []) {
    const key = t.toLowerCase().replace(/^vm_state_/, '');
    const s = Object.hasOwn(STATES, key) ? STATES[key] : undefined;
    if (!s) throw new UsageError(`--state ${JSON.stringify(t)}: expected one of ${Object.keys(STATES).join(', ')}`);
    if (!out.includes(s)) out.push(s);
  }
  return out;
}

const UNITS: Record<string, bigint> = { '': 1n, k: 1n << 10n, m: 1n << 20n, g: 1n << 30n, t: 1n << 40n };

/**
 * A byte count: plain digits, or digits with K, M, G or T (optionally KiB...),
 * all powers of 1024 as memlock limits are counted (ulimit, systemd). "2GB" is
 * refused rather than guessed at. Returned as a decimal string (the proto's uint64).
 */
export function parseSize(text: string, what: string): string {
  const m = /^([0-9]+)(?:([kmgt])(?:iB)?)?$/i.exec(text);
  if (!m) throw new UsageError(`${what}: ${JSON.stringify(text)} is not a size (bytes, or a number with K, M, G or T, e.g. 2G)`);
  const bytes = BigInt(m[1]) * UNITS[(m[2] ?? '').toLowerCase()];
  if (bytes > UINT64_MAX) throw new UsageError(`${what}: ${text} is too large`);
  return bytes.toString();
}
