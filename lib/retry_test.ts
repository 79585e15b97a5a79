/** Tests of lib/retry.ts: backoff and the retry helper. */
import { backoffMs, retry } from "./retry.ts";
import { until } from "../test/support.ts";
import assert from "node:assert/strict";

Deno.test("backoff: grows, is capped, and jitters within [half, full]", () => {
  assert.equal(backoffMs(0, 100, 10_000, 0), 50);
  assert.equal(backoffMs(0, 100, 10_000, 0.999999), 100);
  assert.equal(backoffMs(3, 100, 10_000, 0), 400);
  assert.equal(backoffMs(50, 100, 10_000, 0.999999), 10_000);
  // Release delays take the top of the range: TASK_RETRY_DELAY, doubling, at most 15 minutes.
  assert.equal(backoffMs(0, 10_000, 900_000, 1), 10_000);
  assert.equal(backoffMs(2, 10_000, 900_000, 1), 40_000);
  assert.equal(backoffMs(29, 10_000, 900_000, 1), 900_000);
});

Deno.test("retry: bad options are named with their values; it stops on a signal, and on an error that will not pass", async () => {
  const never = () => Promise.resolve(1);
  const base = { minDelayMs: 1, maxDelayMs: 10, maxAttempts: 3 };
  for (
    const [options, message] of [
      [{ ...base, minDelayMs: -1 }, /minDelayMs .* not -1/],
      [
        { ...base, maxDelayMs: 0.5 },
        /maxDelayMs must be at least minDelayMs \(1\), not 0\.5/,
      ],
      [{ ...base, maxAttempts: 0 }, /maxAttempts .* not 0/],
      [{ ...base, maxAttempts: 1.5 }, /maxAttempts .* not 1\.5/],
    ] as const
  ) {
    await assert.rejects(
      retry(never, options),
      (e) => e instanceof RangeError && message.test(e.message),
    );
  }
  let calls = 0;
  const failing = () => {
    calls++;
    return Promise.reject(new Error(`failure ${calls}`));
  };
  await assert.rejects(retry(failing, base), /failure 3/);
  assert.equal(calls, 3, "three tries in all");
  calls = 0;
  await assert.rejects(
    retry(failing, { ...base, retryable: () => false }),
    /failure 1/,
  );
  calls = 0;
  const stop = new AbortController();
  const waits: number[] = [];
  const stopped = retry(failing, {
    minDelayMs: 60_000,
    maxDelayMs: 60_000,
    maxAttempts: Infinity,
    signal: stop.signal,
    onRetry: (_, __, delayMs) => waits.push(delayMs),
  });
  await until("the first wait", () => waits.length === 1);
  stop.abort(new Error("stopped by the caller"));
  await assert.rejects(stopped, /stopped by the caller/);
  assert.equal(calls, 1, "no try after the signal");
  assert.ok(waits[0] >= 30_000 && waits[0] <= 60_000);
});
