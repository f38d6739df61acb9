/**
 * Writes the manual pages to man/ (run by `npm run build`, after tsc):
 *   node dist/src/man/build.js [OUTDIR]
 * OUTDIR defaults to the package's man/ folder.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { basename, join } from 'node:path';
import { MAN_PAGES } from './pages';

/** The package root, from dist/src/man/. */
export const PACKAGE_ROOT = join(__dirname, '..', '..', '..');

function main(): void {
  const out = process.argv[2] ?? join(PACKAGE_ROOT, 'man');
  mkdirSync(out, { recursive: true });
  for (const p of MAN_PAGES) writeFileSync(join(out, basename(p.file)), p.render());
}

if (require.main === module) main();
