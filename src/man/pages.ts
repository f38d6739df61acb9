/**
 * The manual pages kvmvfioctl(1) and kvmvfiod(8), rendered from the text
 * their --help prints (src/cli/usage.ts help() and SYNOPSIS,
 * src/daemon/config.ts USAGE), so the two cannot say different things.
 * `npm run build` writes them to man/ (build.ts); package.json's "man"
 * installs them; test/unit/docs.test.ts renders them again and compares.
 */
import { GLOBAL_SYNOPSIS, SYNOPSIS, help } from '../cli/usage';
import { USAGE } from '../daemon/config';
import { DAEMON_VERSION } from '../version';
import { type Entry, type ParsedHelp, parseHelp } from './help';
import { escape, renderBlocks, renderSection, renderSynopsis } from './roff';

export interface ManPage {
  /** Where it goes in the package: man/NAME.SECTION. */
  file: string;
  name: string;
  section: 1 | 8;
  render(): string;
}

/** The documents the pages send readers to; the docs test checks that each exists. */
export const DOCS_NAMED = ['README.md', 'docs/api.md', 'docs/operations.md', 'docs/policy.md', 'docs/security.md', 'docs/vmm-integration.md', 'docs/session-protocol.md'];

/** The one-line summary of NAME: the description's first line, without its capital and full stop. */
function summary(h: ParsedHelp): string {
  const first = h.description[0]?.[0];
  if (!first) throw new Error('the help text has no description');
  return `${first[0].toLowerCase()}${first.slice(1).replace(/\.$/, '')}`;
}

function page(name: string, section: 1 | 8, source: string, h: ParsedHelp, synopses: string[], body: string[], seeAlso: string[]): string {
  return [
    `.\\" ${name}(${section}), generated from \`${name} --help\` (${source}) by src/man/build.ts.`,
    '.\\" Edit the help text, not this file: npm run build writes it again.',
    `.TH ${name.toUpperCase()} ${section} "" "kvmvfiod ${DAEMON_VERSION}" "kvmvfiod"`,
    // No hyphenation (a flag or a variable split at a line's end cannot be copied), ragged right.
    // HY too: .YS turns hyphenation back on at that level.
    '.nr HY 0',
    '.nh',
    '.ad l',
    '.SH NAME',
    `${name} \\- ${escape(summary(h))}`,
    '.SH SYNOPSIS',
    ...synopses.flatMap(renderSynopsis),
    '.SH DESCRIPTION',
    ...h.description.flatMap((p, i) => [...(i ? ['.PP'] : []), ...p.map(escape)]),
    ...body,
    '.SH SEE ALSO',
    ...seeAlso,
    '',
  ].join('\n');
}

/** Where an installed package keeps its documents. */
const DOCS_PARAGRAPH = [
  '.PP',
  escape(`The package's documents, in $(npm prefix -g)/lib/node_modules/kvmvfiod/ once installed: ${DOCS_NAMED.join(', ')}.`),
];

export function renderKvmvfioctl(): string {
  const h = parseHelp(help());
  const synopses = [`kvmvfioctl ${h.usage.slice('kvmvfioctl '.length)}`, ...Object.values(SYNOPSIS), 'kvmvfioctl --help', 'kvmvfioctl --version'];
  if (!h.usage.startsWith(`kvmvfioctl ${GLOBAL_SYNOPSIS}`)) throw new Error(`kvmvfioctl's usage line does not show its global flags: ${h.usage}`);
  return page('kvmvfioctl', 1, 'src/cli/usage.ts', h, synopses, h.sections.flatMap((s) => renderSection(s)), ['.BR kvmvfiod (8)', ...DOCS_PARAGRAPH]);
}

/** The options' environment variables: `[KVMVFIOD_X]` in an option's description. */
export function optionVariables(h: ParsedHelp): Entry[] {
  const options = h.sections.find((s) => s.title === 'Options');
  if (!options) throw new Error('kvmvfiod --help has no Options section');
  const out: Entry[] = [];
  for (const b of options.blocks) {
    if (b.kind !== 'entry') continue;
    const v = /\[(KVMVFIOD_[A-Z_]+)\]/.exec(b.description.join(' '));
    if (v) out.push({ kind: 'entry', term: v[1], description: [`as ${b.term.split(' ')[0]}`] });
  }
  return out;
}

export function renderKvmvfiod(): string {
  const h = parseHelp(USAGE);
  const body = h.sections.flatMap((s) => {
    if (s.title !== 'Environment') return renderSection(s);
    // One ENVIRONMENT section: each option's variable, then the others.
    return ['.SH ENVIRONMENT', ...renderBlocks([...optionVariables(h), ...s.blocks])];
  });
  if (!h.sections.some((s) => s.title === 'Environment')) throw new Error('kvmvfiod --help has no Environment section');
  return page('kvmvfiod', 8, 'src/daemon/config.ts', h, [`kvmvfiod ${h.usage.slice('kvmvfiod '.length)}`], body, [
    '.BR kvmvfioctl (1),',
    '.BR systemd.socket (5),',
    '.BR sd_notify (3)',
    ...DOCS_PARAGRAPH,
  ]);
}

export const MAN_PAGES: ManPage[] = [
  { file: 'man/kvmvfioctl.1', name: 'kvmvfioctl', section: 1, render: renderKvmvfioctl },
  { file: 'man/kvmvfiod.8', name: 'kvmvfiod', section: 8, render: renderKvmvfiod },
];
