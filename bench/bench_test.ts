/**
 * The bench's code, run quickly: option parsing, the percentile, the latency
 * proxy of the far-away queue rows, and one smoke run of every measure at tiny
 * sizes against a real sshd. The figures of a smoke run mean nothing; the test
 * checks that each one is there and sane.
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
import { IronMqClient } from "../lib/ironmq.ts";
import { needs, sshdMissing } from "../test/sshd.ts";
import { startQueueProxy, startTestQueue, until } from "../test/support.ts";

Deno.test("bench options: flags beat BENCH_* variables beat the defaults", () => {
  const options = readOptions(
    ["--drain=50", "--baseline-sleep=0.5", "--wan150=30"],
    {
      BENCH_DRAIN: "7",
      BENCH_PICKUPS: "9",
      BENCH_BASELINE_PICKUPS: "0",
      BENCH_WAN40: "40",
    },
  );
  assert.equal(options.sizes.drain, 50);
  assert.equal(options.sizes.wan40, 40);
  assert.equal(options.sizes.wan150, 30);
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

Deno.test("bench latency proxy: every reply comes its latency later, and requests wait side by side", async () => {
  const latencyMs = 1_000;
  const queue = await startTestQueue();
  const proxy = startQueueProxy(queue.server.url, { latencyMs });
  const far = new IronMqClient({
    baseUrl: `http://127.0.0.1:${proxy.port}`,
    projectId: "test",
    queueName: "jobs",
  });
  // Settled once the proxy closed, so a failed check is not followed by their errors.
  const requests: Promise<unknown>[] = [];
  try {
    await queue.client.ensureQueue();
    // A long-poll parked in the server for up to 30 s holds no one up.
    let parkedReplied = false;
    const parked = far.reserve(1, 60, 30).finally(() => parkedReplied = true);
    let replies = 0;
    const posts = Array.from({ length: 8 }, async (_, i) => {
      const startedAt = performance.now();
      await far.post("other", [`m${i}`]);
      replies++;
      return performance.now() - startedAt;
    });
    requests.push(parked, ...posts);
    await until("9 requests in the proxy", () => proxy.requests === 9, 10_000);
    assert.equal(
      replies,
      0,
      "a reply came before all 9 requests were in: the proxy held them one after another",
    );
    for (const ms of await Promise.all(posts)) {
      // Less 2 ms: a timer may fire a fraction of a millisecond early.
      assert.ok(ms >= latencyMs - 2, `a reply came ${ms} ms after its request`);
    }
    assert.equal(await queue.size("other"), 8);
    assert.equal(parkedReplied, false, "the long-poll is still parked");
    await queue.post(["wake"]);
    const [message] = await parked;
    assert.equal(message?.body, "wake");
  } finally {
    await proxy.close();
    await Promise.allSettled(requests);
    await queue.close();
  }
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
      "historyDrain",
      "limits",
      "pickups",
      "memory",
      "seed",
      "seedPickups",
      "follow",
    ] as const;
    for (const key of measures) assert.ok(results[key], `${key} is measured`);
    // The far-away queue drains, through the latency proxy, nearest first.
    assert.deepEqual(
      results.wanDrains.map((d) => [d.latencyMs, d.count]),
      [[40, SMOKE_SIZES.wan40], [150, SMOKE_SIZES.wan150]],
    );
    const allRows = tableRows(results);
    // The many-hosts rows (6.) are checked below: a missing tool skips its row.
    const rows = allRows.filter((r) => !r.measure.startsWith("6."));
    assert.equal(rows.filter((r) => r.verdict !== "").length, 13);
    // A followed run's posts: every line carried or said dropped; none unfollowed.
    const follow = results.follow!;
    assert.equal(follow.floodStreamed + follow.floodDropped, follow.floodLines);
    assert.ok(follow.floodPosts >= 2 && follow.pacedPosts >= 2);
    assert.equal(follow.unfollowedPosts, 0);
    const history = rows.filter((r) => /with the run history/.test(r.measure));
    assert.deepEqual(history.map((r) => r.target), ["≥ 0.9×"]);
    assert.match(history[0].figure, /^[\d.]+× \([\d,]+ vs [\d,]+ msg\/s\)$/);
    const wanRows = rows.filter((r) => /ms queue latency$/.test(r.measure));
    assert.deepEqual(wanRows.map((r) => r.target), [
      "≥ 0.8× loopback",
      "≥ 0.6× loopback",
    ]);
    for (const row of wanRows) {
      assert.match(row.figure, /^[\d,]+ msg\/s \([\d.]+× loopback\)$/);
    }
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
    const hosts = results.hosts;
    assert.ok(hosts, "the many-hosts measures ran");
    assert.equal(hosts.hosts, SMOKE_SIZES.hosts);
    assert.equal(hosts.floorCold.length, SMOKE_SIZES.hostCold);
    assert.equal(hosts.floorWarm.length, SMOKE_SIZES.hostWarm);
    assert.deepEqual(
      [hosts.workerCold, hosts.workerWarm].map((s) =>
        Array.isArray(s) ? s.length : s.skipped
      ),
      [SMOKE_SIZES.hostCold, SMOKE_SIZES.hostWarm],
      "the worker fanned out to every host",
    );
    // A tool that is there must work; one that is missing is skipped, saying so.
    for (
      const [tool, samples] of [["fabric", hosts.fabric], [
        "pssh",
        hosts.pssh,
      ]] as const
    ) {
      if (Array.isArray(samples)) {
        assert.equal(samples.length, SMOKE_SIZES.hostCold, tool);
      } else {
        assert.match(
          samples.skipped,
          /not found|no python3 imports fabric/,
          tool,
        );
      }
    }
    assert.deepEqual(hosts.ansible, { skipped: "not run (--ansible=0)" });
    const rss = hosts.rss;
    assert.ok(rss && !("skipped" in rss), `worker RSS: ${JSON.stringify(rss)}`);
    assert.ok(rss.peakMb > 10, `peak RSS ${rss.peakMb} MB`);
    assert.ok(
      rss.openSeen >= SMOKE_SIZES.hosts,
      `${rss.openSeen} connections seen open for ${SMOKE_SIZES.hosts} hosts`,
    );
    const hostRows = allRows.filter((r) => r.measure.startsWith("6."));
    assert.ok(
      hostRows.some((r) => /^6\. worker \(\.\/start\): warm/.test(r.measure)),
    );
    for (const row of hostRows) {
      assert.match(row.figure, /^(-?[\d,.]+|skipped: )/, row.measure);
      assert.doesNotMatch(row.figure, /NaN|Infinity|failed/, row.measure);
    }
    const report = formatReport(results);
    assert.match(report, /nproc \d+, Deno \d/);
    assert.match(report, /\| Measure +\| Figure +\| Target +\| Result \|/);
  },
});
