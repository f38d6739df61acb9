/**
 * Reads a state store in a child process and prints its entries, one JSON
 * line each: {"k":KEY,"v":VALUE}, or {"k":KEY,"bad":WHY} for an entry whose
 * checksum or JSON does not hold, then {"end":N,"entries":M}: N entries
 * walked, M the count the tree's root keeps.
 *
 * Why a child: LMDB trusts the pointers in its pages, so a damaged page can
 * crash the process that walks it (SIGSEGV, SIGBUS) rather than raise an
 * error. The daemon runs this, keeps what was printed before a crash, and
 * walks from the other end to get what lies after the damage (store.ts).
 *
 *   node storedump.js PATH [reverse]
 */
import { writeSync } from 'node:fs';
import { open } from 'lmdb';
import { decodeEntry } from './storecodec';

function main(): number {
  const [path, order] = process.argv.slice(2);
  if (!path) {
    process.stderr.write('usage: storedump PATH [reverse]\n');
    return 2;
  }
  const db = open({ path, noSubdir: true, readOnly: true, encoding: 'binary' });
  let out: string[] = [];
  let size = 0;
  // Synchronous writes, a batch at a time: what was printed before a crash has reached the pipe.
  const flush = () => {
    if (out.length) writeSync(1, out.join(''));
    out = [];
    size = 0;
  };
  let n = 0;
  for (const { key, value } of db.getRange({ reverse: order === 'reverse' })) {
    const k = String(key);
    const d = decodeEntry(value as Buffer);
    const line = d.ok ? `{"k":${JSON.stringify(k)},"v":${d.json}}\n` : `{"k":${JSON.stringify(k)},"bad":${JSON.stringify(d.why)}}\n`;
    out.push(line);
    size += line.length;
    n++;
    if (size > 64 * 1024) flush();
  }
  // A leaf page whose header is damaged can read as empty rather than fail: the count the tree keeps
  // in its root tells the walk that missed entries.
  const entries = (db.getStats() as { entryCount?: number }).entryCount;
  out.push(`{"end":${n},"entries":${entries}}\n`);
  flush();
  return 0;
}

try {
  process.exitCode = main();
} catch (e) {
  process.stderr.write(`storedump: ${(e as Error).message}\n`);
  process.exitCode = 1;
}
