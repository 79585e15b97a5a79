/**
 * lib/stream.ts: how a run's output is batched for the reply queue and the
 * listener's followers, what a slow queue does to it (coalesced, then the
 * oldest lines dropped and said), the bound on posts, and what a follower prints.
 */
import assert from "node:assert/strict";
import { realClock } from "./retry.ts";
import {
  followedLines,
  LiveRuns,
  MAX_STREAM_POSTS,
  type RunEnd,
  RunStream,
  STREAM_BATCH_CHARS,
  type StreamEvent,
} from "./stream.ts";
import { memoryLog, until } from "../test/support.ts";

interface Sink {
  posts: StreamEvent[];
  /** Posts begun (some may be held). */
  calls: number;
  post: (body: string) => Promise<unknown>;
  /** Holds every post until `release()` (a slow queue). */
  hold(): void;
  release(): void;
  fail: boolean;
}

function sink(): Sink {
  let held: PromiseWithResolvers<void> | undefined;
  const s: Sink = {
    posts: [],
    calls: 0,
    fail: false,
    post: async (body) => {
      s.calls++;
      await held?.promise;
      if (s.fail) throw new Error("HTTP 503");
      s.posts.push(JSON.parse(body));
    },
    hold: () => held = Promise.withResolvers(),
    release: () => {
      const h = held;
      held = undefined;
      h?.resolve();
    },
  };
  return s;
}

const outputs = (events: StreamEvent[]) =>
  events.filter((e) => e.event === "OUTPUT") as (StreamEvent & {
    event: "OUTPUT";
  })[];

function streamTo(s: Sink, log = memoryLog()) {
  return new RunStream(
    { taskId: "t1", messageId: "m1" },
    { post: s.post },
    realClock,
    log,
    "message m1",
  );
}

Deno.test("stream: lines that come together go out as one event per host, whole and in order, after STARTED", async () => {
  const s = sink();
  const stream = streamTo(s);
  stream.started(["a", "b"], 1);
  for (let i = 0; i < 10; i++) stream.line("a", "out", `a${i}`);
  stream.line("b", "err", "b0");
  stream.line("a", "err", "a-err");
  await until("STARTED and two batches", () => s.posts.length === 3);
  assert.deepEqual(s.posts[0], {
    event: "STARTED",
    task_id: "t1",
    message_id: "m1",
    attempt: 1,
    hosts: ["a", "b"],
    at: (s.posts[0] as { at: string }).at,
  });
  const [a, b] = outputs(s.posts);
  assert.equal(a.host, "a");
  assert.deepEqual(a.lines, [
    ...Array.from({ length: 10 }, (_, i) => ["out", `a${i}`]),
    ["err", "a-err"],
  ]);
  assert.deepEqual(b.lines, [["err", "b0"]]);
  assert.equal(a.dropped, 0);
  assert.deepEqual(await stream.end(), { posts: 3, dropped: 0 });
});

Deno.test("stream: a host's batch is at most 64 Ki characters of whole lines", async () => {
  const s = sink();
  const stream = streamTo(s);
  const line = "x".repeat(10_000);
  for (let i = 0; i < 20; i++) stream.line("a", "out", `${i} ${line}`);
  await stream.end();
  const events = outputs(s.posts);
  assert.ok(events.length >= 4, `${events.length} events`);
  const all = events.flatMap((e) => e.lines.map(([, l]) => l));
  assert.deepEqual(all, Array.from({ length: 20 }, (_, i) => `${i} ${line}`));
  for (const e of events) {
    const chars = e.lines.reduce((n, [, l]) => n + l.length, 0);
    assert.ok(chars <= STREAM_BATCH_CHARS, `${chars} characters`);
  }
});

Deno.test("stream: a slow queue never holds the command up: lines wait and coalesce, the oldest past 256 Ki are dropped, and the next event says how many", async () => {
  const s = sink();
  const log = memoryLog();
  const stream = streamTo(s, log);
  s.hold();
  stream.line("a", "out", "first");
  // The first post is under way (held): what comes now waits for it.
  await until("first post begun", () => s.calls === 1);
  const line = "y".repeat(1000);
  const started = performance.now();
  for (let i = 0; i < 1000; i++) stream.line("a", "out", `${i} ${line}`);
  const tookMs = performance.now() - started;
  assert.ok(tookMs < 200, `line() returned at once (${tookMs} ms for 1000)`);
  assert.equal(s.calls, 1, "nothing more posted while the first is under way");
  s.release();
  const ended = await stream.end();
  const events = outputs(s.posts);
  const shown = events.flatMap((e) => e.lines.map(([, l]) => l));
  assert.equal(shown[0], "first");
  assert.equal(shown.at(-1), `999 ${line}`, "the newest lines are kept");
  const dropped = events.reduce((n, e) => n + e.dropped, 0);
  assert.ok(dropped > 0, "some dropped");
  assert.equal(shown.length - 1 + dropped, 1000, "every line sent or counted");
  assert.equal(ended.dropped, dropped);
  assert.ok(
    log.lines.some((l) =>
      /slower than the output comes: oldest waiting lines dropped/.test(l)
    ),
    log.lines.join("\n"),
  );
  assert.ok(events.length < 10, `coalesced into ${events.length} posts`);
});

Deno.test("stream: at most MAX_STREAM_POSTS posts an attempt; the last one says so, and the log", async () => {
  const s = sink();
  const log = memoryLog();
  const stream = streamTo(s, log);
  stream.started(["a"], 1);
  const big = "z".repeat(STREAM_BATCH_CHARS);
  for (let i = 0; i < MAX_STREAM_POSTS + 20; i++) {
    stream.line("a", "out", big);
    const want = Math.min(MAX_STREAM_POSTS, i + 2);
    // Each post lands within a few turns of the event loop (no timer: a
    // full batch goes at once).
    for (let turn = 0; s.posts.length < want && turn < 1000; turn++) {
      await new Promise((r) => setTimeout(r, 0));
    }
    assert.equal(s.posts.length, want);
  }
  await stream.end();
  assert.equal(s.posts.length, MAX_STREAM_POSTS);
  const last = s.posts.at(-1) as StreamEvent & { event: "OUTPUT" };
  assert.equal(last.limit, true);
  assert.ok(log.lines.some((l) => /1000 stream posts made/.test(l)));
});

Deno.test("stream: a failed post is not retried: its lines are counted as dropped and the next batch goes on", async () => {
  const s = sink();
  const log = memoryLog();
  const stream = streamTo(s, log);
  s.fail = true;
  stream.line("a", "out", "lost");
  await until(
    "the failure logged",
    () => log.lines.some((l) => /a stream post failed \(HTTP 503\)/.test(l)),
  );
  s.fail = false;
  stream.line("a", "out", "kept");
  const ended = await stream.end();
  assert.deepEqual(outputs(s.posts).map((e) => e.lines), [[["out", "kept"]]]);
  assert.equal(ended.dropped, 1);
});

async function readEvents(
  response: Response,
): Promise<{ event: string; data: Record<string, unknown> }[]> {
  const text = await response.text();
  return text.split("\n\n").filter((b) => b.startsWith("event:")).map((b) => {
    const [event, data] = b.split("\n");
    return {
      event: event.slice("event: ".length),
      data: JSON.parse(data.slice("data: ".length)),
    };
  });
}

Deno.test("stream: a follower on the listener gets what a run showed lately, then what comes, then its result; unknown runs are undefined", async () => {
  const live = new LiveRuns();
  assert.equal(live.follow("r1"), undefined);
  const feed = live.open("r1", "m1");
  const stream = new RunStream(
    { taskId: "r1", messageId: "m1" },
    { feed },
    realClock,
    memoryLog(),
    "message m1",
  );
  stream.started(["a"], 1);
  stream.line("a", "out", "before");
  await stream.end();
  assert.equal(live.runIdOf("m1"), "r1");
  const response = live.follow("m1")!;
  assert.equal(response.status, 200);
  const reading = readEvents(response);
  feed({
    event: "OUTPUT",
    task_id: "r1",
    message_id: "m1",
    host: "a",
    lines: [["err", "after"]],
    dropped: 0,
  });
  const end: RunEnd = {
    event: "RESULT",
    status: "SUCCESS",
    message_id: "m1",
    task_id: "r1",
    attempts: 1,
    reason: null,
    hosts: {},
  };
  live.settled("r1", "other-message", () => end); // not this run's message: ignored
  assert.equal(live.runIdOf("r1"), "r1");
  live.settled("r1", "m1", () => end);
  const events = await reading;
  assert.deepEqual(events.map((e) => e.event), [
    "started",
    "output",
    "output",
    "result",
  ]);
  assert.deepEqual(events[1].data.lines, [["out", "before"]]);
  assert.deepEqual(events[2].data.lines, [["err", "after"]]);
  assert.equal(live.follow("r1"), undefined, "settled: no longer under way");
  assert.equal(live.runIdOf("m1"), undefined);
});

Deno.test("stream: a follower prints events as the worker logs lines, with notes for drops and the bound", () => {
  assert.deepEqual(
    followedLines({
      event: "OUTPUT",
      host: "web1",
      lines: [["out", "hello"], ["err", "oops"]],
      dropped: 3,
      limit: true,
    }),
    {
      out: ["[web1] out: hello", "[web1] err: oops"],
      notes: [
        "[web1] 3 line(s) not streamed here (the queue was slow); the worker's log has them",
        "the worker streams at most 1000 posts an attempt: the rest of the output is in its log (and the end of it in the result)",
      ],
    },
  );
  assert.deepEqual(
    followedLines({
      event: "STARTED",
      message_id: "7",
      attempt: 2,
      hosts: ["a", "b"],
    }),
    { out: [], notes: ["started: message 7, attempt 2, on a, b"] },
  );
  assert.equal(followedLines({ status: "SUCCESS" }), undefined);
  assert.equal(followedLines("text"), undefined);
});
