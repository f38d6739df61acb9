/**
 * docs/session-protocol.md is a contract whose every MUST is tested: each
 * rule (S1, S2, ...) that says MUST is checked by the conformance runner
 * (src/conformance/runner.ts VMM_RULES, run against both reference VMMs by
 * test/api/conformance.test.ts) or by a test whose name starts with its id
 * ("S24: ...", "S6, S7: ..."). This test fails when a MUST has neither.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { VMM_RULES } from '../../src/conformance/runner';

const REPO = join(__dirname, '..', '..', '..');

interface Rule {
  id: string;
  text: string;
}

function rules(): Rule[] {
  const doc = readFileSync(join(REPO, 'docs', 'session-protocol.md'), 'utf8');
  const out: Rule[] = [];
  const re = /^\*\*(S\d+) — [^*]+\*\*([\s\S]*?)(?=^\*\*S\d+ — |^## |(?![\s\S]))/gm;
  for (let m = re.exec(doc); m; m = re.exec(doc)) out.push({ id: m[1], text: m[2] });
  return out;
}

/** The rule ids each test of test/ names at the start of its title. */
function testedIds(): Set<string> {
  const ids = new Set<string>();
  const walk = (dir: string) => {
    for (const name of readdirSync(dir)) {
      const p = join(dir, name);
      if (statSync(p).isDirectory()) walk(p);
      else if (p.endsWith('.ts')) {
        for (const m of readFileSync(p, 'utf8').matchAll(/\btest\(\s*(['"`])((?:S\d+(?:, S\d+)*)(?: ②)?): /g)) for (const id of m[2].matchAll(/S\d+/g)) ids.add(id[0]);
      }
    }
  };
  walk(join(REPO, 'test'));
  return ids;
}

test('the contract numbers its rules S1, S2, ... once each, in order', () => {
  const ids = rules().map((r) => r.id);
  assert.ok(ids.length >= 30, `${ids.length} rules found`);
  assert.deepEqual(ids, ids.map((_, i) => `S${i + 1}`));
});

test('every rule with a MUST is checked by the conformance runner or by a test named after it', () => {
  const tested = testedIds();
  const untested = rules()
    .filter((r) => /\bMUST\b/.test(r.text))
    .filter((r) => !Object.hasOwn(VMM_RULES, r.id) && !tested.has(r.id))
    .map((r) => r.id);
  assert.deepEqual(untested, []);
});

test("the runner's rules are the document's, with the document's strength", () => {
  const byId = new Map(rules().map((r) => [r.id, r.text]));
  for (const [id, r] of Object.entries(VMM_RULES)) {
    const text = byId.get(id);
    assert.ok(text !== undefined, `${id} is not in the document`);
    assert.match(text, new RegExp(`\\b${r.level}\\b`), `${id} is a ${r.level} in the runner but the document says otherwise`);
  }
});
