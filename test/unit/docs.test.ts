/**
 * The documents and the manual pages stay true to the tree:
 * - every relative link of the Markdown documents reaches a file, and a
 *   #fragment reaches a heading of the Markdown file it names;
 * - man/ holds what --help renders to, and --help, the command table and the
 *   flag parsers name the same commands and flags;
 * - every test docs/security.md cites exists, under the title it quotes.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync, readdirSync, statSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { REPO } from '../helpers/daemon';
import { COMMANDS } from '../../src/cli/main';
import { GLOBAL_OPTIONS } from '../../src/cli/args';
import { GLOBAL_SYNOPSIS, SYNOPSIS, help } from '../../src/cli/usage';
import { USAGE } from '../../src/daemon/config';
import { parseHelp, type Entry } from '../../src/man/help';
import { DOCS_NAMED, MAN_PAGES } from '../../src/man/pages';
import { status as Status } from '@grpc/grpc-js';
import { Errno, SysError } from '../../src/kernel';
import { statusForSysError } from '../../src/server/status';

// ---- Markdown: links and headings

/** The Markdown files whose links are checked: the README, docs/, and the other documents of the tree. */
export function markdownFiles(root = REPO): string[] {
  const docs = readdirSync(join(root, 'docs')).filter((n) => n.endsWith('.md')).map((n) => join(root, 'docs', n));
  return [join(root, 'README.md'), ...docs, join(root, 'bench', 'RESULTS.md'), join(root, 'test', 'fuzz', 'README.md')].filter((f) => existsSync(f));
}

/** The text outside fenced code blocks, line by line (fenced lines become empty, so line numbers hold). */
function proseLines(text: string): string[] {
  let fence: string | undefined;
  return text.split('\n').map((line) => {
    const m = /^\s*(`{3,}|~{3,})/.exec(line);
    if (m && (fence === undefined || m[1].startsWith(fence))) {
      fence = fence === undefined ? m[1] : undefined;
      return '';
    }
    return fence === undefined ? line : '';
  });
}

/** GitHub's anchor of a heading: lower case, punctuation dropped but "-" and "_", each space a "-". */
export function slug(heading: string): string {
  return heading
    .replace(/\[([^\]]*)\]\([^)]*\)/g, '$1')
    .replace(/<[^>]+>/g, '')
    .trim()
    .toLowerCase()
    .replace(/[^\p{L}\p{N}\p{M}\s_-]/gu, '')
    .replace(/\s/g, '-');
}

/** Every anchor a Markdown file has: one per heading (repeats get -1, -2...), and <a id|name="..."> ones. */
export function anchorsOf(text: string): Set<string> {
  const seen = new Map<string, number>();
  const out = new Set<string>();
  for (const line of proseLines(text)) {
    const h = /^#{1,6}\s+(.*?)\s*#*\s*$/.exec(line);
    if (h) {
      const base = slug(h[1]);
      const n = seen.get(base) ?? 0;
      seen.set(base, n + 1);
      out.add(n ? `${base}-${n}` : base);
    }
    for (const a of line.matchAll(/<a\s+(?:id|name)="([^"]+)"/g)) out.add(a[1]);
  }
  return out;
}

export interface Link {
  file: string;
  line: number;
  target: string;
}

/** The links of a Markdown file: inline ones and reference definitions, outside code. */
export function linksOf(file: string, text: string): Link[] {
  const out: Link[] = [];
  proseLines(text).forEach((raw, i) => {
    // Code spans hold no links; blank them out without touching the brackets around them.
    const line = raw.replace(/(`+)(?:(?!\1).)+?\1/g, (m) => 'x'.repeat(m.length));
    for (const m of line.matchAll(/\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)/g)) out.push({ file, line: i + 1, target: m[1] });
    const ref = /^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+"[^"]*")?\s*$/.exec(line);
    if (ref) out.push({ file, line: i + 1, target: ref[1] });
  });
  return out;
}

/** Why a link does not resolve, or undefined when it does. External links (a scheme) are not followed. */
export function brokenLink(link: Link): string | undefined {
  if (/^[a-z][a-z0-9+.-]*:/i.test(link.target)) return undefined;
  const [pathPart, fragment] = link.target.split('#', 2) as [string, string | undefined];
  const path = decodeURIComponent(pathPart);
  const target = path === '' ? link.file : resolve(dirname(link.file), path);
  if (!existsSync(target)) return `${path} does not exist`;
  if (fragment === undefined || fragment === '') return undefined;
  // Fragments of other kinds of file (#L10 of a source file) are not checked.
  if (!target.endsWith('.md') || statSync(target).isDirectory()) return undefined;
  if (!anchorsOf(readFileSync(target, 'utf8')).has(decodeURIComponent(fragment))) return `${relative(REPO, target)} has no heading #${fragment}`;
  return undefined;
}

test('docs: every relative link of README.md, docs/*.md and the other documents resolves, #fragments included', () => {
  const files = markdownFiles();
  assert.ok(files.some((f) => f.endsWith('README.md')) && files.some((f) => f.includes(`${join('docs', '')}`)), 'no documents found');
  const problems: string[] = [];
  let relativeLinks = 0;
  for (const file of files) {
    for (const link of linksOf(file, readFileSync(file, 'utf8'))) {
      if (!/^[a-z][a-z0-9+.-]*:/i.test(link.target)) relativeLinks++;
      const why = brokenLink(link);
      if (why) problems.push(`${relative(REPO, file)}:${link.line}: (${link.target}) ${why}`);
    }
  }
  assert.deepEqual(problems, []);
  assert.ok(relativeLinks > 50, `only ${relativeLinks} relative links found: is the link reader broken?`);
});

test('docs: the checker itself finds a broken file, a broken anchor, and skips code', () => {
  const file = join(REPO, 'README.md');
  const links = linksOf(file, ['[a](docs/api.md)', '[b](docs/no-such.md)', '[c](docs/api.md#no-such-heading)', '`[d](nowhere.md)`', '```', '[e](nowhere.md)', '```', '[f]: docs/api.md#calls'].join('\n'));
  assert.deepEqual(links.map((l) => l.target), ['docs/api.md', 'docs/no-such.md', 'docs/api.md#no-such-heading', 'docs/api.md#calls']);
  assert.deepEqual(links.map((l) => brokenLink(l) !== undefined), [false, true, true, false]);
  assert.equal(slug('`GetVm`, `ListVms`: reads (and *paging*)'), 'getvm-listvms-reads-and-paging');
  assert.deepEqual([...anchorsOf('# A\n## A\n```\n# B\n```\n<a id="x"></a>')], ['a', 'a-1', 'x']);
});

// ---- --help and the manual pages

test('man: man/ holds what --help renders (run npm run build after changing a help text)', () => {
  for (const page of MAN_PAGES) {
    const path = join(REPO, page.file);
    assert.ok(existsSync(path), `${page.file} is missing: npm run build writes it`);
    assert.equal(readFileSync(path, 'utf8'), page.render(), `${page.file} differs from ${page.name} --help rendered`);
  }
});

/** The --flags of a text (a synopsis, a term). */
const flagsIn = (text: string) => new Set([...text.matchAll(/(?<![\w-])--[a-z][a-z-]*/g)].map((m) => m[0]));
const sorted = (s: Iterable<string>) => [...s].sort();
/** A roff page's text with its escapes undone, enough to find names in it. */
const unroff = (roff: string) => roff.replace(/\\f[BIRP]/g, '').replace(/\\-/g, '-').replace(/\\e/g, '\\').replace(/\\&/g, '');

test('man: kvmvfioctl --help, its man page, its command table and its parser name the same commands and flags', () => {
  assert.deepEqual(sorted(Object.keys(COMMANDS)), sorted(Object.keys(SYNOPSIS)), 'a command without a synopsis, or a synopsis without a command');
  const h = parseHelp(help());
  const commands = h.sections.find((s) => s.title === 'Commands')?.blocks.filter((b): b is Entry => b.kind === 'entry') ?? [];
  const man = unroff(readFileSync(join(REPO, 'man', 'kvmvfioctl.1'), 'utf8'));
  for (const [words, synopsis] of Object.entries(SYNOPSIS)) {
    const flags = flagsIn(synopsis);
    // The parser: the flags this command accepts are those its synopsis shows.
    assert.deepEqual(sorted(flags), sorted(COMMANDS[words].options.map((o) => `--${o}`)), `${words}: the synopsis and the command's options differ`);
    // --help: one entry per command, showing the same flags.
    const entry = commands.filter((e) => e.term === words || e.term.startsWith(`${words} `));
    assert.equal(entry.length, 1, `--help has ${entry.length} entries for ${words}`);
    assert.deepEqual(sorted(flagsIn(entry[0].term)), sorted(flags), `${words}: --help shows other flags than its synopsis`);
    // The man page: the synopsis, and the entry.
    assert.ok(man.includes(`.SY kvmvfioctl\n${synopsis.slice('kvmvfioctl '.length)}\n.YS`), `man kvmvfioctl lacks the synopsis of ${words}`);
    assert.ok(man.includes(`.TP\n${entry[0].term}\n`), `man kvmvfioctl lacks the entry of ${words}`);
  }
  // Every command of --help is in the table.
  for (const e of commands) assert.ok(Object.keys(SYNOPSIS).some((w) => e.term === w || e.term.startsWith(`${w} `)), `--help describes "${e.term}", which is no command`);
  // Global flags: the parser's, the help's and the synopsis's.
  const globals = h.sections.find((s) => s.title === 'Global flags')?.blocks.filter((b): b is Entry => b.kind === 'entry') ?? [];
  assert.deepEqual(sorted(globals.flatMap((e) => [...flagsIn(e.term)])), sorted(GLOBAL_OPTIONS.map((o) => `--${o}`)));
  for (const f of flagsIn(GLOBAL_SYNOPSIS)) assert.ok((GLOBAL_OPTIONS as readonly string[]).includes(f.slice(2)), `${f} in GLOBAL_SYNOPSIS is no global flag`);
  for (const e of globals) assert.ok(man.includes(`.TP\n${e.term}\n`), `man kvmvfioctl lacks ${e.term}`);
});

/** The flags kvmvfiod's parser accepts, read from its parseArgs options in src/daemon/config.ts. */
function daemonParserFlags(): { flags: Set<string>; variables: Set<string> } {
  const source = readFileSync(join(REPO, 'src', 'daemon', 'config.ts'), 'utf8');
  const block = /parseArgs\(\{[\s\S]*?options: \{([\s\S]*?)\n {6}\},/.exec(source);
  assert.ok(block, 'the parseArgs options of src/daemon/config.ts were not found');
  const flags = new Set([...block[1].matchAll(/^\s+'?([a-z][a-z-]*)'?: \{ type:/gm)].map((m) => `--${m[1]}`));
  const variables = new Set([...source.matchAll(/env\.(KVMVFIOD_[A-Z_]+)/g)].map((m) => m[1]));
  return { flags, variables };
}

test('man: kvmvfiod --help, its man page and its parser name the same flags and variables', () => {
  const { flags, variables } = daemonParserFlags();
  assert.ok(flags.size > 20 && flags.has('--runtime-dir') && flags.has('--help'), `parser flags not read: ${[...flags].join(' ')}`);
  const h = parseHelp(USAGE);
  const options = h.sections.find((s) => s.title === 'Options')?.blocks.filter((b): b is Entry => b.kind === 'entry') ?? [];
  assert.deepEqual(sorted(options.map((e) => e.term.split(' ')[0])), sorted(flags), '--help and the parser differ');
  const man = unroff(readFileSync(join(REPO, 'man', 'kvmvfiod.8'), 'utf8'));
  for (const e of options) assert.ok(man.includes(`.TP\n${e.term}\n`), `man kvmvfiod lacks ${e.term}`);
  // Each variable the parser reads is named in --help and has its ENVIRONMENT entry in the man page.
  for (const v of variables) {
    assert.ok(USAGE.includes(v), `--help does not name ${v}`);
    assert.ok(man.includes(`.TP\n${v}\n`), `man kvmvfiod has no ENVIRONMENT entry for ${v}`);
  }
});

test('man: the documents the pages name exist', () => {
  for (const d of DOCS_NAMED) assert.ok(existsSync(join(REPO, d)), `${d} is named in the manual pages but does not exist`);
});

// ---- docs/api.md: the error table

test('api.md: its error table is the one src/server/status.ts applies, errno for errno', () => {
  const doc = readFileSync(join(REPO, 'docs', 'api.md'), 'utf8');
  const section = /\n## Errors\n([\s\S]*?)\n## /.exec(doc)?.[1];
  assert.ok(section, 'docs/api.md has no Errors section');
  const rows = section.split('\n').filter((l) => /^\| .* \| `[A-Z_]+`/.test(l));
  const documented = new Map<string, string>();
  const code = (name: string) => (Errno as Record<string, number>)[name];
  for (const row of rows) {
    const [cause, status] = row.split(' | ');
    const expected = /`([A-Z_]+)`/.exec(status)![1];
    const call = cause.includes('KVM_CREATE_DEVICE') ? 'KVM_CREATE_DEVICE' : 'open';
    for (const [, errno] of cause.matchAll(/`(E[A-Z0-9]+)`/g)) {
      assert.ok(code(errno) !== undefined, `${errno} is no errno`);
      // Node names one number once: EOPNOTSUPP arrives as ENOTSUP, EWOULDBLOCK as EAGAIN.
      assert.equal(new SysError(call, 'x', code(errno)).code, errno, `the daemon names errno ${code(errno)} ${new SysError(call, 'x', code(errno)).code}, not ${errno}`);
      assert.equal(Status[statusForSysError(new SysError(call, 'x', code(errno)))], expected, `docs/api.md maps ${errno} from ${call} to ${expected}`);
      documented.set(`${call} ${errno}`, expected);
    }
  }
  // Every errno the table in the code maps (not to UNKNOWN) is documented.
  for (const [name, n] of Object.entries(Errno)) {
    const mapped = Status[statusForSysError(new SysError('open', 'x', n))];
    if (mapped !== 'UNKNOWN' && name === new SysError('open', 'x', n).code) assert.ok(documented.has(`open ${name}`), `${name} → ${mapped} is not in docs/api.md's error table`);
  }
  assert.ok(rows.some((r) => r.includes('`UNKNOWN`')), 'the table does not say what an unmapped errno becomes');
  assert.equal(Status[statusForSysError(new SysError('open', 'x', 0x7fff))], 'UNKNOWN');
});

// ---- docs/security.md: the tests it cites

/** The titles of the tests and suites of a test file, as written (template literals unexpanded). */
function testTitles(file: string): string[] {
  const source = readFileSync(file, 'utf8');
  return [...source.matchAll(/\b(?:test|it|describe)\(\s*(['"`])((?:\\.|(?!\1)[\s\S])*?)\1/g)].map((m) => m[2].replace(/\\(['"`\\])/g, '$1'));
}

/** Each citation: a link to a test file followed by one or more quoted title fragments, `[x](../test/f.ts): "a"; "b"`. */
export function citations(text: string): { file: string; fragments: string[] }[] {
  const out: { file: string; fragments: string[] }[] = [];
  for (const m of text.matchAll(/\]\((\.\.\/test\/[^)#\s]+)\)((?:\s*[:;,]?\s*"[^"\n]+")+)/g)) {
    out.push({ file: m[1], fragments: [...m[2].matchAll(/"([^"\n]+)"/g)].map((f) => f[1]) });
  }
  return out;
}

test('security.md: every test it cites exists, under the title it quotes', () => {
  const doc = join(REPO, 'docs', 'security.md');
  const cited = citations(readFileSync(doc, 'utf8'));
  assert.ok(cited.length >= 15, `only ${cited.length} citations found in docs/security.md`);
  const missing: string[] = [];
  for (const c of cited) {
    const file = resolve(dirname(doc), c.file);
    if (!existsSync(file)) {
      missing.push(`${c.file}: no such file`);
      continue;
    }
    const titles = /\.ts$/.test(file) ? testTitles(file) : [readFileSync(file, 'utf8')];
    for (const f of c.fragments) if (!titles.some((t) => t.includes(f))) missing.push(`${c.file}: no test titled "…${f}…"`);
  }
  assert.deepEqual(missing, []);
});
