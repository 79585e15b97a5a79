/**
 * lib/retry.ts: time (a Clock the tests can speed up) and the one retry
 * helper, signal-aware, with backoff and jitter, in the manner of Deno std's
 * async/retry.ts; its options are checked with errors naming option and value.
 *
 * Pure but for the clock: it knows nothing of queues or SSH.
 */

export interface Clock {
  now(): number;
  sleep(ms: number, signal?: AbortSignal): Promise<void>;
}

export const realClock: Clock = {
  now: () => Date.now(),
  sleep: (ms, signal) =>
    new Promise((resolve) => {
      if (signal?.aborted) return resolve();
      const done = () => {
        clearTimeout(timer);
        signal?.removeEventListener("abort", done);
        resolve();
      };
      const timer = setTimeout(done, ms);
      signal?.addEventListener("abort", done, { once: true });
    }),
};

interface RetryOptions {
  /** The first wait, in ms; each later one doubles, up to `maxDelayMs`. */
  minDelayMs: number;
  maxDelayMs: number;
  /** Tries in all, the first included; Infinity tries until `signal` aborts. */
  maxAttempts: number;
  /** Whether an error may pass with time; default: every error. */
  retryable?: (e: unknown) => boolean;
  /** Told of each failure that will be tried again, and the wait before it. */
  onRetry?: (e: unknown, attempt: number, delayMs: number) => void;
  /** Ends the waiting: the retry rejects with the signal's reason. */
  signal?: AbortSignal;
  clock?: Clock;
}

/**
 * Calls `fn` until it succeeds, waiting a capped exponential backoff with
 * jitter between tries. The last error is thrown when tries run out or an
 * error is not retryable.
 */
export async function retry<T>(
  fn: () => Promise<T>,
  options: RetryOptions,
): Promise<T> {
  const { minDelayMs, maxDelayMs, maxAttempts, signal } = options;
  if (!(Number.isFinite(minDelayMs) && minDelayMs >= 0)) {
    throw new RangeError(
      `retry: minDelayMs must be a number of ms from 0 up, not ${minDelayMs}`,
    );
  }
  if (!(maxDelayMs >= minDelayMs)) {
    throw new RangeError(
      `retry: maxDelayMs must be at least minDelayMs (${minDelayMs}), not ${maxDelayMs}`,
    );
  }
  if (
    !(maxAttempts === Infinity || Number.isInteger(maxAttempts) &&
        maxAttempts >= 1)
  ) {
    throw new RangeError(
      `retry: maxAttempts must be a whole number from 1 up, or Infinity, not ${maxAttempts}`,
    );
  }
  const clock = options.clock ?? realClock;
  for (let attempt = 1;; attempt++) {
    signal?.throwIfAborted();
    try {
      return await fn();
    } catch (e) {
      const retryable = options.retryable?.(e) ?? true;
      if (attempt >= maxAttempts || !retryable || signal?.aborted) throw e;
      const delayMs = backoffMs(
        attempt - 1,
        minDelayMs,
        maxDelayMs,
        Math.random(),
      );
      options.onRetry?.(e, attempt, delayMs);
      await clock.sleep(delayMs, signal);
    }
  }
}

/**
 * Capped exponential backoff: `baseMs` doubled `attempt` times, at most
 * `capMs`; `random` in [0, 1] picks a point in its upper half (1: the top).
 */
export function backoffMs(
  attempt: number,
  baseMs: number,
  capMs: number,
  random: number,
): number {
  const ceiling = Math.min(capMs, baseMs * 2 ** Math.min(attempt, 30));
  return Math.round(ceiling / 2 + random * ceiling / 2);
}

/** Resolves when `work` settles or `signal` aborts, leaving no listener behind. */
export function settledOrAborted(
  work: Promise<unknown>,
  signal: AbortSignal,
): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      signal.removeEventListener("abort", done);
      resolve();
    };
    if (signal.aborted) return resolve();
    signal.addEventListener("abort", done, { once: true });
    work.then(done, done);
  });
}
