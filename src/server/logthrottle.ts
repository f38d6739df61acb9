/**
 * Rate limiting for log lines a peer can cause at will (a refused
 * connection, a garbled session, a denied call): without it one local user
 * makes the daemon write as fast as it can connect (measured: 168,000
 * lines in 20 s). Per interval, the first `burst` lines of each event and
 * uid go through; the rest are counted, and when the interval ends one
 * summary per event says how many were held back and from which uids.
 *
 * Buckets are per (event, uid) so that one uid's flood never silences
 * another's lines; their number is bounded (`maxBuckets`): past it, new
 * uids share one bucket per event.
 */

export interface LogThrottleOptions {
  /** Lines per event and uid let through per interval. */
  burst: number;
  intervalMs: number;
  /** Buckets at most per interval; beyond, new uids of an event share the bucket '*'. Default 1024. */
  maxBuckets?: number;
  /** Uids named in a summary at most (the largest counts); the rest are summed under 'other'. Default 16. */
  maxUidsPerSummary?: number;
}

export interface LogSummary {
  event: string;
  /** Lines held back in the interval. */
  suppressed: number;
  /** Of those, by uid ('-': no uid known, '*': over maxBuckets, 'other': past maxUidsPerSummary). */
  byUid: Record<string, number>;
  intervalMs: number;
  /** The most severe pino level among the lines held back. */
  level: number;
}

interface Bucket {
  passed: number;
  suppressed: number;
}

interface EventTally {
  suppressed: number;
  level: number;
  byUid: Map<string, number>;
}

export class LogThrottle {
  readonly #opts: Required<LogThrottleOptions>;
  readonly #onSummary: (s: LogSummary) => void;
  #buckets = new Map<string, Bucket>();
  #tallies = new Map<string, EventTally>();
  #timer: NodeJS.Timeout | undefined;
  /** Whether anything was logged or held back since the last tick: an idle throttle stops its timer. */
  #busy = false;

  constructor(opts: LogThrottleOptions, onSummary: (s: LogSummary) => void) {
    this.#opts = { maxBuckets: 1024, maxUidsPerSummary: 16, ...opts };
    this.#onSummary = onSummary;
  }

  /**
   * Whether a line of `event` from `uid` may be written now; a line held
   * back is counted for the interval's summary.
   */
  admit(event: string, uid: number | undefined, level = 30): boolean {
    this.#busy = true;
    if (!this.#timer) {
      // Intervals start with the first line after a quiet one.
      this.#timer = setInterval(() => this.#tick(), this.#opts.intervalMs);
      this.#timer.unref();
    }
    const who = uid === undefined ? '-' : String(uid);
    let key = `${event}\u0000${who}`;
    let b = this.#buckets.get(key);
    if (!b) {
      if (this.#buckets.size >= this.#opts.maxBuckets) key = `${event}\u0000*`;
      b = this.#buckets.get(key);
      if (!b) this.#buckets.set(key, (b = { passed: 0, suppressed: 0 }));
    }
    if (b.passed < this.#opts.burst) {
      b.passed++;
      return true;
    }
    b.suppressed++;
    let t = this.#tallies.get(event);
    if (!t) this.#tallies.set(event, (t = { suppressed: 0, level, byUid: new Map() }));
    t.suppressed++;
    if (level > t.level) t.level = level;
    const bucketUid = key.endsWith('\u0000*') ? '*' : who;
    t.byUid.set(bucketUid, (t.byUid.get(bucketUid) ?? 0) + 1);
    return false;
  }

  /** Ends the interval now: a summary per event with lines held back, and fresh buckets. */
  flush(): void {
    const tallies = this.#tallies;
    this.#tallies = new Map();
    this.#buckets = new Map();
    for (const [event, t] of tallies) {
      const sorted = [...t.byUid].sort((a, b) => b[1] - a[1]);
      const byUid: Record<string, number> = {};
      let other = 0;
      sorted.forEach(([uid, n], i) => {
        if (i < this.#opts.maxUidsPerSummary) byUid[uid] = n;
        else other += n;
      });
      if (other) byUid.other = other;
      this.#onSummary({ event, suppressed: t.suppressed, byUid, intervalMs: this.#opts.intervalMs, level: t.level });
    }
  }

  #tick(): void {
    this.flush();
    if (!this.#busy) {
      clearInterval(this.#timer);
      this.#timer = undefined;
    }
    this.#busy = false;
  }

  /** Writes what is pending and stops the timer (daemon stop). */
  close(): void {
    clearInterval(this.#timer);
    this.#timer = undefined;
    this.flush();
  }
}
