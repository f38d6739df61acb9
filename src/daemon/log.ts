/**
 * The daemon's logger: pino JSON lines on stdout, with the lines a peer can
 * cause at will rate-limited (src/server/logthrottle.ts) where they are
 * written, so that every place that logs one of these events is covered
 * without a second code path. The events are listed here, in one place.
 */
import pino, { type DestinationStream, type Logger } from 'pino';
import { LogThrottle, type LogSummary } from '../server/logthrottle';

/**
 * Events an unprivileged peer triggers as often as it likes: connecting,
 * sending garbage, presenting a bad token, calling what it may not. Lines of
 * uid 0 are never held back. A call line is throttled only when denied: the
 * audit line of an allowed call always goes out.
 */
export const THROTTLED_EVENTS: ReadonlySet<string> = new Set([
  'api-connection-refused',
  'api-accept-failed',
  'handoff-connection-refused',
  'handoff-no-credentials',
  'handoff-accept-failed',
  'session-open',
  'session-end',
  'session-protocol-error',
  'attach-refused',
  'late-result',
  'session-tolerated',
  'request-overdue',
  'call:PERMISSION_DENIED',
]);

/** The throttle key of a log line's object, if it is one of THROTTLED_EVENTS. */
function throttleKey(o: Record<string, unknown>): string | undefined {
  const event = o.event;
  if (typeof event !== 'string') return undefined;
  const key = event === 'call' ? `call:${String(o.outcome)}` : event;
  return THROTTLED_EVENTS.has(key) ? key : undefined;
}

const asUid = (v: unknown): number | undefined => (typeof v === 'number' ? v : undefined);

export interface DaemonLogger {
  log: Logger;
  throttle: LogThrottle;
}

export function createLogger(opts: { level: string; burst: number; intervalMs: number }, destination?: DestinationStream): DaemonLogger {
  let root: Logger | undefined;
  const throttle = new LogThrottle({ burst: opts.burst, intervalMs: opts.intervalMs }, (s: LogSummary) => {
    const seconds = s.intervalMs / 1000;
    const line = { event: 'log-suppressed', of: s.event, suppressed: s.suppressed, by_uid: s.byUid, interval_ms: s.intervalMs };
    const msg = `${s.event}: ${s.suppressed.toLocaleString('en-US')} more in the last ${seconds} s`;
    // At the level of the lines it stands for (pino: 40 warn, 50 error).
    if (s.level >= 50) root?.error(line, msg);
    else if (s.level >= 40) root?.warn(line, msg);
    else root?.info(line, msg);
  });
  root = pino(
    {
      level: opts.level,
      // No pid in the base: `pid` on a call line is the caller's (the daemon's pid is on the ready line).
      base: { name: 'kvmvfiod' },
      hooks: {
        logMethod(args, method, level) {
          const o = args[0] as unknown;
          if (o && typeof o === 'object') {
            const key = throttleKey(o as Record<string, unknown>);
            if (key) {
              const rec = o as Record<string, unknown>;
              // Session lines carry the VMM's uid in their child logger's bindings.
              const uid = asUid(rec.uid) ?? asUid(rec.vmm_uid) ?? asUid((this.bindings() as Record<string, unknown>).vmm_uid);
              if (uid !== 0 && !throttle.admit(key, uid, level)) return;
            }
          }
          method.apply(this, args as Parameters<typeof method>);
        },
      },
    },
    destination,
  );
  return { log: root, throttle };
}
