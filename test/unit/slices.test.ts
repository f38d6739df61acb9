/**
 * SliceQueue: a burst of jobs is spread over event-loop turns, by count and
 * by time, in order, and a failing job does not stop the others.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SliceQueue } from '../../src/server/session/slices';

const turn = () => new Promise((r) => setImmediate(r));

test('at most maxJobs jobs per loop turn, in order; nothing runs in the pushing turn', async () => {
  const errors: unknown[] = [];
  const q = new SliceQueue({ maxJobs: 10, budgetMs: 1000, onError: (e) => errors.push(e) });
  const ran: number[] = [];
  for (let i = 0; i < 25; i++) q.push(() => ran.push(i));
  assert.equal(ran.length, 0);
  assert.equal(q.length, 25);
  await turn();
  assert.equal(ran.length, 10);
  await turn();
  assert.equal(ran.length, 20);
  await turn();
  assert.deepEqual(ran, [...Array(25).keys()]);
  assert.equal(q.length, 0);
  assert.deepEqual(errors, []);
});

test('a slice ends when its time budget is spent (one job at least); a throwing job is reported and the rest run', async () => {
  const errors: unknown[] = [];
  const q = new SliceQueue({ maxJobs: 100, budgetMs: 1, onError: (e) => errors.push(e) });
  const ran: number[] = [];
  const spin = (ms: number) => {
    const end = performance.now() + ms;
    while (performance.now() < end);
  };
  q.push(() => {
    spin(3);
    ran.push(0);
  });
  q.push(() => {
    throw new Error('job 1 failed');
  });
  q.push(() => ran.push(2));
  await turn();
  assert.deepEqual(ran, [0], 'the first job spent the budget: the others wait for the next turn');
  await turn();
  assert.deepEqual(ran, [0, 2]);
  assert.equal((errors[0] as Error).message, 'job 1 failed');
  // The queue is idle again and takes new work.
  q.push(() => ran.push(3));
  await turn();
  assert.deepEqual(ran, [0, 2, 3]);
});
