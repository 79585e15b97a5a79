/**
 * The bench's code, run quickly: option parsing, the percentile, and one smoke
 * run of every measure at tiny sizes against a real sshd. The figures of a
 * smoke run mean nothing; the test checks that each one is there and sane.
 */
import assert from "node:assert/strict";
import {
  formatReport,
  FULL_SIZES,
  percentile,
  readOptions,
  runBench,
  SMOKE_SIZES,
  tableRows,
} from "./bench.ts";
import { needs, sshdMissing } from "./test_sshd.ts";

Deno.test("bench options: flags beat BENCH_* variables beat the defaults", () => {
  const options = readOptions(
    ["--drain=50", "--baseline-sleep=0.5"],
    { BENCH_DRAIN: "7", BENCH_PICKUPS: "9", BENCH_BASELINE_PICKUPS: "0" },
  );
  assert.equal(options.sizes.drain, 50);
  assert.equal(options.sizes.pickups, 9);
  assert.equal(options.sizes.baselinePickups, 0);
  assert.equal(options.sizes.baselineSleep, 0.5);
  assert.equal(options.sizes.rss, FULL_SIZES.rss);
  assert.deepEqual(readOptions(["--smoke"], {}).sizes, SMOKE_SIZES);
});

Deno.test("bench options: a bad size is refused by its names", () => {
  assert.throws(
    () => readOptions(["--floor=-1"], {}),
    /--floor \(BENCH_FLOOR\) must be a whole number ≥ 0, got -1/,
  );
  assert.throws(
    () => readOptions([], { BENCH_RSS: "lots" }),
    /--rss \(BENCH_RSS\) must be a whole number ≥ 0, got lots/,
  );
  assert.throws(
    () => readOptions(["--settle=x"], {}),
    /--settle \(BENCH_SETTLE\) must be a number of seconds ≥ 0, got x/,
  );
});

Deno.test("bench percentile: nearest rank", () => {
  const samples = [5, 1, 4, 2, 3, 6, 7, 8, 9, 10];
  assert.equal(percentile(samples, 50), 5);
  assert.equal(percentile(samples, 99), 10);
  assert.equal(percentile(samples, 0), 1);
  assert.equal(percentile([3], 99), 3);
  assert.ok(Number.isNaN(percentile([], 50)));
});

Deno.test({
  name: "bench smoke run: every measure at tiny sizes, one table",
  ...needs(sshdMissing(), "the bench smoke run"),
  fn: async () => {
    const results = await runBench({ sizes: SMOKE_SIZES });
    const measures = [
      "queueBatches",
      "wakeUps",
      "floor",
      "drain",
      "drainSerial",
      "pickups",
      "memory",
      "seed",
      "seedPickups",
    ] as const;
    for (const key of measures) assert.ok(results[key], `${key} is measured`);
    const rows = tableRows(results);
    assert.equal(rows.filter((r) => r.verdict !== "").length, 8);
    for (const row of rows) {
      assert.match(row.figure, /^-?[\d,.]+/, `${row.measure}: ${row.figure}`);
      assert.doesNotMatch(row.figure, /NaN|Infinity/, row.measure);
    }
    assert.equal(results.pickups?.length, SMOKE_SIZES.pickups);
    assert.equal(results.seedPickups?.length, SMOKE_SIZES.baselinePickups);
    const pickups = [...results.pickups ?? [], ...results.floor?.pickups ?? []];
    for (const ms of pickups) assert.ok(ms > 0 && ms < 5_000, `pickup ${ms}`);
    const memory = results.memory;
    assert.ok(memory && memory.startMb > 10 && memory.peakMb >= memory.startMb);
    const report = formatReport(results);
    assert.match(report, /nproc \d+, Deno \d/);
    assert.match(report, /\| Measure +\| Figure +\| Target +\| Result \|/);
  },
});
