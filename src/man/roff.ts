/** roff (man(7) macros) from a parsed help text: escaping, terms in bold and italics, sections. */
import type { Entry, Paragraph, Section } from './help';

/**
 * Text safe in a roff text line: a backslash is `\e`; every "-" is `\-`, which
 * man-db's groff prints as an ASCII hyphen-minus, so flags copied from the
 * page work; a line starting with "." or "'" would be a request.
 */
export function escape(text: string): string {
  const s = text.replace(/\\/g, '\\e').replace(/-/g, '\\-');
  return /^[.']/.test(s) ? `\\&${s}` : s;
}

/**
 * A term or synopsis: flags and literal words in bold, placeholders (NAME,
 * [HOST:]PORT, KEY=VALUE) in italics, brackets, "|" and "..." in roman.
 */
export function formatTerm(term: string): string {
  return term
    .split(/(\s+|[[\]|,]|\.\.\.)/)
    .filter((t) => t !== '')
    .map((t) => {
      if (/^(\s+|[[\]|,]|\.\.\.)$/.test(t)) return escape(t);
      // A placeholder: capitals, digits and the punctuation of KEY=VALUE or HOST:PORT;
      // not an environment variable (KVMVFIO_SOCKET) or a signal (SIGTERM), which are literal.
      const literal = /^[A-Z0-9]+_[A-Z0-9_]+$/.test(t) || /^SIG[A-Z0-9]+$/.test(t);
      if (!literal && /^[A-Z][A-Z0-9_]*(?:[=:][A-Z][A-Z0-9_]*)?:?$/.test(t)) return `\\fI${escape(t)}\\fR`;
      return `\\fB${escape(t)}\\fR`;
    })
    .join('');
}

export function renderBlocks(blocks: readonly (Entry | Paragraph)[], term: (t: string) => string = formatTerm): string[] {
  const out: string[] = [];
  for (const b of blocks) {
    if (b.kind === 'entry') out.push('.TP', term(b.term), ...b.description.map(escape));
    else out.push('.PP', ...b.lines.map(escape));
  }
  return out;
}

/** One section: its title in capitals, its note as a first paragraph. */
export function renderSection(s: Section, term?: (t: string) => string): string[] {
  const out = [`.SH ${s.title.toUpperCase()}`];
  if (s.note) out.push('.PP', escape(`${s.note[0].toUpperCase()}${s.note.slice(1)}.`));
  return out.concat(renderBlocks(s.blocks, term));
}

/** A synopsis line: the command in bold, its arguments formatted as a term, with a hanging indent. */
export function renderSynopsis(synopsis: string): string[] {
  const [command, ...rest] = synopsis.split(' ');
  if (!/^[a-z][a-z0-9]*$/.test(command)) throw new Error(`a synopsis starts with the command's name: ${synopsis}`);
  return [`.SY ${command}`, ...(rest.length ? [formatTerm(rest.join(' '))] : []), '.YS'];
}
