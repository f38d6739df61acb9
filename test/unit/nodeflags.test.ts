/**
 * The daemon's V8 flags (src/daemon/nodeflags.ts) are the same wherever it is
 * started: a place that drops them would run with another memory profile
 * than the one measured.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { DAEMON_NODE_FLAGS } from '../../src/daemon/nodeflags';

const REPO = join(__dirname, '..', '..', '..');
const read = (p: string) => readFileSync(join(REPO, p), 'utf8');
const flags = DAEMON_NODE_FLAGS.join(' ');

test('the unit, the image, npm start, the #! line and the built executable all start node with DAEMON_NODE_FLAGS', () => {
  assert.ok(DAEMON_NODE_FLAGS.length > 0);
  const execStart = /^ExecStart=(.*)$/m.exec(read('systemd/kvmvfiod.service'))?.[1];
  assert.equal(execStart, `/usr/bin/node ${flags} /usr/lib/node_modules/kvmvfiod/dist/src/daemon/main.js`);
  const entry = /^ENTRYPOINT (.*)$/m.exec(read('Dockerfile'))?.[1];
  assert.deepEqual(JSON.parse(entry!), ['node', ...DAEMON_NODE_FLAGS, '/opt/kvmvfiod/dist/src/daemon/main.js']);
  assert.equal((JSON.parse(read('package.json')) as { scripts: Record<string, string> }).scripts.start, `node ${flags} dist/src/daemon/main.js`);
  assert.equal(read('src/daemon/main.ts').split('\n')[0], `#!/usr/bin/env -S node ${flags}`);
  assert.equal(read('dist/src/daemon/main.js').split('\n')[0], `#!/usr/bin/env -S node ${flags}`);
});
