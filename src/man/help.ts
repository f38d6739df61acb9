/**
 * Reads a --help text (kvmvfioctl's help(), kvmvfiod's USAGE) into its parts,
 * so that the manual pages are rendered from the very text --help prints.
 *
 * The shape a help text keeps (a line that breaks it is an error, so the
 * build fails rather than render a wrong page):
 *
 *   Usage: SYNOPSIS                 the first line
 *   <blank>
 *   Description, one or more        unindented paragraphs, up to the first heading
 *   paragraphs.
 *   <blank>
 *   Heading (a note):               unindented, ending in ":" with no other ":";
 *     TERM        description         entries: two spaces, the term, two or more spaces,
 *                 continued           the description; deeper lines continue it
 *     A LONG TERM                     a term alone on its line continues on lines
 *         MORE OF THE TERM            indented less than the description column (set by
 *                 description         the section's first entry) and its description
 *                                     on lines at that column or deeper
 *   A paragraph.                    unindented lines after the entries
 */

export interface Entry {
  kind: 'entry';
  term: string;
  /** The description's lines, as written (a renderer may fill them). */
  description: string[];
}

export interface Paragraph {
  kind: 'paragraph';
  lines: string[];
}

export interface Section {
  /** "Global flags" for "Global flags (anywhere on the line):". */
  title: string;
  /** "anywhere on the line", or undefined. */
  note?: string;
  blocks: (Entry | Paragraph)[];
}

export interface ParsedHelp {
  /** The synopsis after "Usage: ". */
  usage: string;
  description: string[][];
  sections: Section[];
}

export class HelpShapeError extends Error {
  override readonly name = 'HelpShapeError';
}

const HEADING = /^([A-Z][^:]*?)(?: \(([^():]+)\))?:$/;
const indentOf = (line: string) => line.length - line.trimStart().length;

export function parseHelp(text: string): ParsedHelp {
  const lines = text.replace(/\n$/, '').split('\n');
  const fail = (i: number, why: string): never => {
    throw new HelpShapeError(`help line ${i + 1}: ${why}: ${JSON.stringify(lines[i])}`);
  };
  if (!lines[0]?.startsWith('Usage: ')) fail(0, 'the first line must be "Usage: SYNOPSIS"');
  const usage = lines[0].slice('Usage: '.length);
  const description: string[][] = [];
  const sections: Section[] = [];
  let section: Section | undefined;
  let entry: Entry | undefined;
  let paragraph: string[] | undefined;
  /** Where the current section's descriptions start (from its first entry). */
  let descColumn = 0;

  for (let i = 1; i < lines.length; i++) {
    const line = lines[i];
    if (line.trim() === '') {
      entry = undefined;
      paragraph = undefined;
      continue;
    }
    if (/\s$/.test(line)) fail(i, 'trailing white space');
    const indent = indentOf(line);
    if (indent === 0) {
      const heading = HEADING.exec(line);
      if (heading) {
        section = { title: heading[1], note: heading[2], blocks: [] };
        sections.push(section);
        entry = undefined;
        paragraph = undefined;
        descColumn = 0;
        continue;
      }
      entry = undefined;
      if (!paragraph) {
        paragraph = [];
        if (section) section.blocks.push({ kind: 'paragraph', lines: paragraph });
        else description.push(paragraph);
      }
      paragraph.push(line);
      continue;
    }
    if (!section) fail(i, 'an indented line before the first heading');
    if (paragraph) fail(i, 'an indented line inside a paragraph');
    const s = section!;
    if (indent === 2) {
      const m = /^ {2}(\S.*?)(?: {2,}(\S.*))?$/.exec(line)!;
      entry = { kind: 'entry', term: m[1], description: m[2] === undefined ? [] : [m[2]] };
      s.blocks.push(entry);
      if (descColumn === 0) {
        if (m[2] === undefined) fail(i, "a section's first entry must have its description on its own line, which sets the description column");
        descColumn = line.length - m[2].length;
      }
      continue;
    }
    if (!entry) fail(i, 'a continuation line with no entry above it');
    const e = entry!;
    if (indent < descColumn) {
      if (e.description.length) fail(i, `a term continued after its description started (descriptions start at column ${descColumn + 1})`);
      e.term += ` ${line.trim()}`;
    } else e.description.push(line.trim());
  }
  for (const s of sections) {
    for (const b of s.blocks) if (b.kind === 'entry' && !b.description.length) throw new HelpShapeError(`help section "${s.title}": the entry "${b.term}" has no description`);
  }
  return { usage, description, sections };
}
