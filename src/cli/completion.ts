/**
 * `kvmvfioctl completion bash`: a bash completion script built from the
 * command table (SYNOPSIS in usage.ts), so that a new command or flag is
 * completed as soon as its synopsis names it. Static: it never calls the
 * daemon (VM names and group numbers are not offered).
 */
import { GLOBAL_SYNOPSIS, SYNOPSIS } from './usage';

/** A flag as a synopsis shows it: its value's placeholder or literal choices, if it takes one. */
export interface FlagSpec {
  flag: string;
  /** `PATH`, `N`, `pending|running|...`, `qemu`; undefined for a switch. */
  value?: string;
}

export interface CommandSpec {
  /** The command words: `info`, `vm create`. */
  words: string;
  flags: FlagSpec[];
  /** The positional arguments after the command words, in order: `NAME`, `VM`, `bash`. */
  positionals: string[];
}

const FLAG = /^--[a-z][a-z-]*$/;

/** Reads one synopsis: `[--group N]...` is a flag with a value, `[--force]` a switch, `NAME` a positional. */
export function parseSynopsis(words: string, synopsis: string): CommandSpec {
  const prefix = `kvmvfioctl ${words}`;
  if (!synopsis.startsWith(prefix)) throw new Error(`synopsis of ${words} does not start with "${prefix}": ${synopsis}`);
  return { words, ...parseArgsSynopsis(synopsis.slice(prefix.length)) };
}

function parseArgsSynopsis(text: string): { flags: FlagSpec[]; positionals: string[] } {
  // Brackets and repetition marks say optional and repeatable, which completion need not know.
  const tokens = text.replace(/[[\]]/g, ' ').replace(/\.\.\./g, ' ').split(/\s+/).filter(Boolean);
  const flags: FlagSpec[] = [];
  const positionals: string[] = [];
  for (let i = 0; i < tokens.length; i++) {
    const t = tokens[i];
    if (t === '--') break; // attach: the VMM's command line follows
    if (FLAG.test(t)) {
      const next = tokens[i + 1];
      if (next !== undefined && !next.startsWith('-')) {
        flags.push({ flag: t, value: next });
        i++;
      } else flags.push({ flag: t });
    } else positionals.push(t);
  }
  return { flags, positionals };
}

/** The global flags: those of GLOBAL_SYNOPSIS, and --help/-h and --version. */
export function globalFlags(): FlagSpec[] {
  return [...parseArgsSynopsis(GLOBAL_SYNOPSIS).flags, { flag: '--help' }, { flag: '-h' }, { flag: '--version' }];
}

export function commandSpecs(): CommandSpec[] {
  return Object.entries(SYNOPSIS).map(([words, synopsis]) => parseSynopsis(words, synopsis));
}

/** Everything emitted into the script is one of these words, so nothing needs quoting. */
const SAFE = /^[A-Za-z0-9_.|:=-]+$/;
function safe(word: string): string {
  if (!SAFE.test(word)) throw new Error(`completion: ${JSON.stringify(word)} cannot go into the script unquoted`);
  return word;
}
const list = (words: string[]) => words.map(safe).join(' ');

/** A value or positional: literal choices (`pending|running`, `qemu`, `bash`), a file (`PATH`, `FILE`), or nothing to offer. */
function valueCompletion(value: string): string {
  if (value === 'PATH' || value === 'FILE') return 'COMPREPLY=($(compgen -f -- "$cur")); compopt -o filenames 2>/dev/null';
  if (/^[a-z][a-z0-9.|-]*$/.test(value)) return `COMPREPLY=($(compgen -W '${list(value.split('|'))}' -- "$cur"))`;
  return NOTHING;
}
const NOTHING = 'COMPREPLY=()';

/** Case patterns that complete alike, joined with "|" (one line each); `offersOnly` drops those with nothing to offer. */
function byCompletion(pairs: [pattern: string, value: string][], offersOnly = false): [string, string][] {
  const by = new Map<string, string[]>();
  for (const [pattern, value] of pairs) {
    const how = valueCompletion(value);
    if (offersOnly && how === NOTHING) continue;
    by.set(how, [...(by.get(how) ?? []), pattern]);
  }
  return [...by].map(([how, patterns]) => [patterns.join('|'), how]);
}

export function bashCompletion(): string {
  const specs = commandSpecs();
  const globals = globalFlags();
  const valueFlags = new Map<string, string>();
  for (const f of [...globals, ...specs.flatMap((s) => s.flags)]) {
    if (f.value === undefined) continue;
    const seen = valueFlags.get(f.flag);
    // One flag, one kind of value across commands: the script completes a value by its flag alone.
    if (seen !== undefined && seen !== f.value) throw new Error(`completion: ${f.flag} takes ${seen} in one synopsis and ${f.value} in another`);
    valueFlags.set(f.flag, f.value);
  }
  const top = [...new Set(specs.map((s) => s.words.split(' ')[0]))];
  const groups = top.filter((w) => specs.some((s) => s.words.startsWith(`${w} `)));
  const sub = (g: string) => specs.filter((s) => s.words.startsWith(`${g} `)).map((s) => s.words.slice(g.length + 1));

  const lines = [
    '# bash completion for kvmvfioctl, printed by `kvmvfioctl completion bash` from its command table.',
    '#   source <(kvmvfioctl completion bash)        # this shell; add the line to ~/.bashrc to keep it',
    '#   kvmvfioctl completion bash > /etc/bash_completion.d/kvmvfioctl',
    '_kvmvfioctl() {',
    '    local cur=${COMP_WORDS[COMP_CWORD]} prev="" i w key="" nkey=0',
    '    local -a words=()',
    '    (( COMP_CWORD > 0 )) && prev=${COMP_WORDS[COMP_CWORD-1]}',
    '    # --flag=value: bash splits at "=" (COMP_WORDBREAKS).',
    '    if [[ $cur == = ]]; then cur=""; elif [[ $prev == = ]] && (( COMP_CWORD > 1 )); then prev=${COMP_WORDS[COMP_CWORD-2]}; fi',
    '    COMPREPLY=()',
    '    for (( i = 1; i < COMP_CWORD; i++ )); do',
    '        w=${COMP_WORDS[i]}',
    '        if [[ $w == -- ]]; then',
    '            # attach: the VMM command, then its arguments.',
    '            if (( i == COMP_CWORD - 1 )); then COMPREPLY=($(compgen -c -- "$cur"));',
    '            else COMPREPLY=($(compgen -f -- "$cur")); compopt -o filenames 2>/dev/null; fi',
    '            return 0',
    '        fi',
    '        case $w in',
    `            ${[...valueFlags.keys()].map(safe).join('|')})`,
    '                if [[ ${COMP_WORDS[i+1]} == = ]]; then (( i += 2 )); else (( i++ )); fi ;;',
    '            =) (( i++ )) ;;  # KEY=VALUE, split at "=" by bash: not a command word',
    '            -*) ;;',
    '            *) words+=("$w") ;;',
    '        esac',
    '    done',
    '    # The value of a flag.',
    '    case $prev in',
    ...byCompletion([...valueFlags].map(([flag, value]) => [flag, value])).map(([flags, how]) => `        ${flags}) ${how}; return 0 ;;`),
    '    esac',
    '    # The command words: one, or two for a group of commands (vm create, policy check).',
    '    if (( ${#words[@]} == 0 )); then',
    `        if [[ $cur == -* ]]; then COMPREPLY=($(compgen -W '${list(globals.map((f) => f.flag))}' -- "$cur"));`,
    `        else COMPREPLY=($(compgen -W '${list(top)}' -- "$cur")); fi`,
    '        return 0',
    '    fi',
    '    case ${words[0]} in',
    ...groups.map((g) => `        ${safe(g)}) if (( \${#words[@]} == 1 )); then COMPREPLY=($(compgen -W '${list(sub(g))}' -- "$cur")); return 0; fi; key="${safe(g)} \${words[1]}"; nkey=2 ;;`),
    '        *) key=${words[0]}; nkey=1 ;;',
    '    esac',
    '    if [[ $cur == -* ]]; then',
    '        case $key in',
    ...specs.map((s) => `            '${s.words}') COMPREPLY=($(compgen -W '${list([...s.flags.map((f) => f.flag), ...globals.map((f) => f.flag)])}' -- "$cur")) ;;`),
    '        esac',
    '        return 0',
    '    fi',
    '    # A positional argument, by its place after the command words.',
    '    case "$key $(( ${#words[@]} - nkey ))" in',
    ...byCompletion(specs.flatMap((s) => s.positionals.map((p, i): [string, string] => [`'${s.words} ${i}'`, p])), true).map(([cases, how]) => `        ${cases}) ${how} ;;`),
    '    esac',
    '    return 0',
    '}',
    'complete -F _kvmvfioctl kvmvfioctl',
    '',
  ];
  for (const s of specs) for (const w of s.words.split(' ')) safe(w);
  return lines.join('\n');
}
