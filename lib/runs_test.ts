/**
 * The run store (lib/runs.ts) on a real SQLite file: what a run's record
 * holds, its filters, the bounds, and a store that cannot write. The worker
 * with it (a real sshd and queue) is in test/runs_test.ts.
 */
import assert from "node:assert/strict";
import { DatabaseSync } from "node:sqlite";
import { type Held, type RunRecord } from "./held.ts";
import { Secrets, Tail } from "./log.ts";
import { type MessagePlan, planMessage } from "./message.ts";
import { RunStore, sinceMs } from "./runs.ts";
import { catalog, hostNamed } from "../test/fixtures.ts";

function clockAt(start: number) {
  const clock = { t: start, now: () => clock.t };
  return clock;
}

function heldFor(id: string, body: string, attempt = 1): Held {
  return {
    message: { id, body, reserved_count: attempt, reservation_id: "r" },
    reservationId: "r",
    attempt,
  };
}

/** A message planned as the worker plans it, against the test catalog. */
function planned(held: Held, now: number): MessagePlan & { kind: "run" } {
  const plan = planMessage(held.message.body, catalog(), "true", now, [
    hostNamed("a"),
    hostNamed("b"),
  ]);
  assert.equal(plan.kind, "run", JSON.stringify(plan));
  held.meta = plan.meta;
  held.secrets = new Secrets(["worker-token"]).with(
    plan.kind === "run" ? plan.secrets : [],
  );
  return plan as MessagePlan & { kind: "run" };
}

function ran(
  host: string,
  at: number,
  code: number,
  out: string,
  err = "",
): RunRecord {
  const stdout = new Tail();
  const stderr = new Tail();
  for (const line of out.split("\n").filter(Boolean)) stdout.add(line);
  for (const line of err.split("\n").filter(Boolean)) stderr.add(line);
  return {
    host: hostNamed(host),
    startedAt: at,
    finishedAt: at + 50,
    result: { kind: "exit", code },
    stdout,
    stderr,
  };
}

async function withStore(
  fn: (
    open: (settings?: { keepDays?: number; max?: number }) => RunStore,
    lines: string[],
    clock: ReturnType<typeof clockAt>,
    path: string,
  ) => Promise<void> | void,
): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "runs-test-" });
  const lines: string[] = [];
  const clock = clockAt(Date.parse("2026-12-01T10:00:00Z"));
  const opened: RunStore[] = [];
  try {
    await fn(
      (settings = {}) => {
        const store = RunStore.open(
          {
            path: `${dir}/runs.sqlite`,
            keepDays: settings.keepDays ?? 30,
            max: settings.max ?? 100_000,
          },
          (line) => lines.push(line),
          clock,
        );
        if (!(store instanceof RunStore)) throw new Error(store.problem);
        opened.push(store);
        return store;
      },
      lines,
      clock,
      `${dir}/runs.sqlite`,
    );
  } finally {
    for (const store of opened) store.close();
    await Deno.remove(dir, { recursive: true });
  }
}

const DEPLOY = (id: string, extra = {}) =>
  JSON.stringify({
    id,
    task: "deploy",
    kwargs: { version: "v1.2.3", token: "s3cr3t-value" },
    sender: "ops@box",
    ...extra,
  });

Deno.test("a run's record keeps every attempt on every host, masked, across its messages and a reopen, found by its id or a message id", async () => {
  await withStore((open, _lines, clock) => {
    let store = open();
    // Attempt 1 on a and b: a fails. Then its continuation (a new message) for a.
    const first = heldFor("m1", DEPLOY("run-1"));
    store.startedRun(first, planned(first, clock.now()));
    first.runs = [
      ran("a", clock.now(), 3, "step s3cr3t-value\nboom", "bad worker-token"),
      ran("b", clock.now(), 0, "fine"),
    ];
    clock.t += 1000;
    store.settledRun(first, "retry", "1 of 2 hosts failed: a (exit 3)");
    const second = heldFor(
      "m2",
      DEPLOY("run-1", { hosts: ["a"], retries: 1 }),
      2,
    );
    clock.t += 1000;
    store.startedRun(second, planned(second, clock.now()));
    second.runs = [ran("a", clock.now(), 0, "ok now")];
    clock.t += 1000;
    store.settledRun(second, "success");
    store.close();

    store = open(); // what survives a restart
    const record = store.get("run-1")!;
    assert.equal(record.status, "SUCCESS");
    assert.equal(record.task, "deploy");
    assert.equal(record.sender, "ops@box");
    assert.deepEqual(record.message_ids, ["m1", "m2"]);
    assert.deepEqual(record.hosts, ["a", "b"]);
    assert.equal(record.attempts, 2);
    assert.deepEqual(record.parameters, {
      version: "v1.2.3",
      token: "[redacted]",
    });
    assert.deepEqual(
      record.statuses.map((s) => s.status),
      ["RUNNING", "RETRY", "RUNNING", "SUCCESS"],
    );
    const runs = record.host_runs;
    assert.deepEqual(
      runs.map((r) => [r.message_id, r.attempt, r.host, r.exit_status]),
      [["m1", 1, "a", 3], ["m1", 1, "b", 0], ["m2", 2, "a", 0]],
    );
    assert.equal(runs[0].stdout, "step [redacted]\nboom\n");
    assert.equal(runs[0].stderr, "bad [redacted]\n");
    assert.equal(record.duration_ms, 3000);
    assert.doesNotMatch(JSON.stringify(record), /s3cr3t|worker-token/);
    assert.equal(store.succeededAt(second), clock.now());
    const other = heldFor("m3", DEPLOY("run-2"));
    planned(other, clock.now());
    assert.equal(store.succeededAt(other), undefined);
    assert.equal(store.get("nope"), undefined);
    // A queue message id (what send prints) finds its run.
    assert.equal(store.get("m2")?.id, "run-1");
    assert.deepEqual(store.get("m1"), record);
  });
});

Deno.test("the history lists newest first, by task, host, status, time and output text", async () => {
  await withStore((open, _lines, clock) => {
    const store = open();
    const settle = (
      id: string,
      body: string,
      hosts: string[],
      outcome: "success" | "failure",
      out: string,
    ) => {
      const held = heldFor(id, body);
      const plan = planned(held, clock.now());
      store.startedRun(held, plan);
      held.runs = hosts.map((h) =>
        ran(h, clock.now(), outcome === "success" ? 0 : 1, out)
      );
      store.settledRun(held, outcome, outcome === "failure" ? "exit 1" : "");
      clock.t += 60_000;
    };
    settle("m1", DEPLOY("d1"), ["a", "b"], "success", "deployed v1");
    settle(
      "m2",
      JSON.stringify({ task: "restart", kwargs: { service: "app" } }),
      ["a"],
      "failure",
      "no such unit",
    );
    settle("m3", DEPLOY("d3", { hosts: ["b"] }), ["b"], "success", "v3 out");
    store.flush();
    const ids = (query: string) => {
      const listed = store.list(new URLSearchParams(query));
      assert.ok("runs" in listed, JSON.stringify(listed));
      return listed.runs.map((r) => r.id);
    };
    assert.deepEqual(ids(""), ["d3", "m2", "d1"]);
    assert.deepEqual(ids("task=deploy"), ["d3", "d1"]);
    assert.deepEqual(ids("host=a"), ["m2", "d1"]);
    assert.deepEqual(ids("status=failure"), ["m2"]);
    assert.deepEqual(ids("q=deployed"), ["d1"]);
    assert.deepEqual(ids("q=nothing like it"), []);
    assert.deepEqual(ids("since=90s"), ["d3"]);
    assert.deepEqual(ids("limit=1"), ["d3"]);
    assert.deepEqual(ids("task=deploy&host=a"), ["d1"]);
    for (
      const [query, error] of [
        ["status=DONE", /status=DONE: must be one of RUNNING, RETRY/],
        ["since=yesterday", /since=yesterday: give a duration/],
        ["limit=0", /limit=0: must be a whole number from 1/],
      ]
    ) {
      const listed = store.list(new URLSearchParams(query as string));
      assert.ok("error" in listed);
      assert.match(listed.error, error as RegExp);
    }
    assert.equal(sinceMs("2h", 10_000_000), 10_000_000 - 7_200_000);
    assert.equal(
      sinceMs("2026-12-01T00:00:00Z", 0),
      Date.parse("2026-12-01T00:00:00Z"),
    );
  });
});

Deno.test("the history holds at most TASK_RUNS_MAX runs and none older than TASK_RUNS_KEEP_DAYS, oldest gone first", async () => {
  await withStore((open, _lines, clock) => {
    let store = open({ max: 3 });
    const one = (id: string) => {
      const held = heldFor(id, "plain text");
      held.meta = { priorRetries: 0 };
      held.runs = [ran("a", clock.now(), 0, id)];
      store.settledRun(held, "success");
      clock.t += 86_400_000; // a day apart
    };
    for (const id of ["r1", "r2", "r3", "r4", "r5"]) one(id);
    store.flush();
    const ids = () => {
      const listed = store.list(new URLSearchParams(""));
      return "runs" in listed ? listed.runs.map((r) => r.id) : listed.error;
    };
    assert.deepEqual(ids(), ["r5", "r4", "r3"]);
    assert.equal(store.get("r1"), undefined, "its host runs went with it");
    store.close();
    // Reopened with tighter bounds: pruned at once, by age then by count.
    clock.t -= 86_400_000; // now is r5's start
    store = open({ keepDays: 1, max: 3 });
    assert.deepEqual(ids(), ["r5", "r4"]);
    store.close();
    store = open({ keepDays: 30, max: 1 });
    assert.deepEqual(ids(), ["r5"]);
  });
});

Deno.test("a store whose writes fail logs it once, counts every one, and the worker's calls return at once", async () => {
  await withStore((open, lines, clock, path) => {
    const store = open();
    // Another process holding the write lock: the store's BEGIN fails (SQLITE_BUSY).
    const other = new DatabaseSync(path);
    other.exec("BEGIN EXCLUSIVE");
    try {
      for (const id of ["x1", "x2"]) {
        const held = heldFor(`m-${id}`, DEPLOY(id));
        planned(held, 0);
        held.runs = [ran("a", 0, 0, "out")];
        store.settledRun(held, "success");
      }
      // Not written yet, a success is known all the same.
      const again = heldFor("m3", DEPLOY("x1"));
      planned(again, 0);
      assert.equal(store.succeededAt(again), clock.now());
      const before = performance.now();
      store.flush();
      assert.ok(
        performance.now() - before < 1000,
        "it never waits on the lock",
      );
    } finally {
      other.exec("ROLLBACK");
      other.close();
    }
    assert.equal(
      lines.filter((l) => /write\(s\) failed/.test(l)).length,
      1,
      lines.join("\n"),
    );
    assert.match(lines[0], /2 write\(s\) failed: database is locked/);
    assert.equal(store.get("x1"), undefined);
  });
});

Deno.test("a message without a Celery id is never taken for a success before it, and a new message reusing a finished run's message id starts a new record", async () => {
  await withStore((open, _lines, clock) => {
    const store = open();
    const plain = (attempt = 1) => {
      const held = heldFor("1", '{"args": ["x"]}', attempt);
      held.meta = { priorRetries: 0 };
      return held;
    };
    const first = plain();
    store.startedRun(first, {
      kind: "run",
      command: "true x",
      display: "true x",
      hosts: [hostNamed("a")],
      secrets: [],
      meta: first.meta!,
    });
    first.runs = [ran("a", clock.now(), 0, "first")];
    store.settledRun(first, "success");
    store.flush();
    // A fresh queue (the embedded one in memory, restarted) counts from 1 again.
    const second = plain();
    assert.equal(store.succeededAt(second), undefined);
    clock.t += 1000;
    second.runs = [ran("a", clock.now(), 1, "second")];
    store.settledRun(second, "rejected", "not valid");
    store.flush();
    const record = store.get("1")!;
    assert.equal(record.status, "REJECTED");
    assert.deepEqual(record.statuses.map((s) => s.status), ["REJECTED"]);
    assert.deepEqual(record.host_runs.map((r) => r.stdout), ["second\n"]);
    const listed = store.list(new URLSearchParams());
    assert.ok("runs" in listed);
    assert.equal(listed.runs.length, 1);
  });
});

Deno.test("a history that cannot be opened says why and what to do", () => {
  const opened = RunStore.open(
    { path: "/nonexistent-dir/runs.sqlite", keepDays: 30, max: 10 },
    () => {},
    { now: () => 0 },
  );
  assert.ok(!(opened instanceof RunStore));
  assert.match(
    opened.problem,
    /cannot open the run history "\/nonexistent-dir\/runs\.sqlite" \(.*\): check that its folder is writable, or set TASK_RUNS_DB/,
  );
});
