import { readFileSync } from 'node:fs';
import { join } from 'node:path';

/** The package's version, read from package.json at the package root (dist/src → ../..). */
export const DAEMON_VERSION: string = (() => {
  try {
    return (JSON.parse(readFileSync(join(__dirname, '..', '..', 'package.json'), 'utf8')) as { version: string }).version;
  } catch {
    return 'unknown';
  }
})();
