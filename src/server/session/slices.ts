/**
 * Runs queued jobs on the event loop a slice at a time, so a burst (a
 * thousand VMMs killed at once, each pidfd readable in the same loop turn)
 * is spread over turns and the loop keeps answering calls in between.
 *
 * A slice ends after `maxJobs` jobs or `budgetMs` of their synchronous time;
 * the promise work a job starts (the broker's, under its locks) runs in the
 * same turn, right after the slice, which is why the job count is capped too.
 */
export class SliceQueue {
  readonly #jobs: (() => void)[] = [];
  #head = 0;
  #scheduled = false;
  readonly #budgetMs: number;
  readonly #maxJobs: number;
  readonly #onError: (e: unknown) => void;

  constructor(opts: { budgetMs?: number; maxJobs?: number; onError: (e: unknown) => void }) {
    this.#budgetMs = opts.budgetMs ?? 1;
    this.#maxJobs = opts.maxJobs ?? 32;
    this.#onError = opts.onError;
  }

  get length(): number {
    return this.#jobs.length - this.#head;
  }

  push(job: () => void): void {
    this.#jobs.push(job);
    if (!this.#scheduled) {
      this.#scheduled = true;
      setImmediate(() => this.#slice());
    }
  }

  #slice(): void {
    const end = performance.now() + this.#budgetMs;
    let n = 0;
    while (this.#head < this.#jobs.length && n < this.#maxJobs && (n === 0 || performance.now() < end)) {
      const job = this.#jobs[this.#head];
      this.#jobs[this.#head++] = undefined as never;
      n++;
      try {
        job();
      } catch (e) {
        this.#onError(e);
      }
    }
    if (this.#head === this.#jobs.length) {
      this.#jobs.length = 0;
      this.#head = 0;
      this.#scheduled = false;
    } else {
      setImmediate(() => this.#slice());
    }
  }
}
