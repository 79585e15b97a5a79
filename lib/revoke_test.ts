/**
 * lib/revoke.ts against the queue server over real HTTP: every worker's
 * peek sees a revocation and none takes it away; a watched run is told once;
 * expired revocations are ignored and deleted; no revoked queue is no cancel.
 */
import assert from "node:assert/strict";
import { realClock } from "./retry.ts";
import {
  parseRevocation,
  postRevocation,
  revocationBody,
  Revocations,
  revokedReason,
} from "./revoke.ts";
import { memoryLog, startTestQueue, until } from "../test/support.ts";

Deno.test("revoke: a revocation posted once is seen by every worker's peek, and stays for the others", async () => {
  const q = await startTestQueue({}, "test", "jobs");
  try {
    const workers = [0, 1].map(() => {
      const log = memoryLog();
      return {
        log,
        revocations: new Revocations(q.client, "jobs", realClock, log),
      };
    });
    const now = Date.now();
    await postRevocation(q.client, "jobs", "run-1", "ann@box", now, 3600);
    for (const { revocations } of workers) {
      await until("seen", () => {
        revocations.refresh();
        return revocations.of(["msg-9", "run-1"]) !== undefined;
      });
      const seen = revocations.of(["run-1"])!;
      assert.equal(seen.by, "ann@box");
      assert.equal(
        revokedReason(seen),
        `cancelled by ann@box at ${new Date(now).toISOString()}`,
      );
      assert.equal(revocations.of(["run-2"]), undefined);
    }
    assert.equal((await q.peek("jobs_revoked")).length, 1, "not taken away");
    for (const { log } of workers) {
      assert.equal(
        log.lines.filter((l) => /^revocation seen: run run-1 /.test(l)).length,
        1,
      );
    }
  } finally {
    await q.close();
  }
});

Deno.test("revoke: a watched run is told once, at the peek after its revocation comes; an ended watch is not", async () => {
  const q = await startTestQueue({}, "test", "jobs");
  const stop = new AbortController();
  try {
    const revocations = new Revocations(
      q.client,
      "jobs",
      realClock,
      memoryLog(),
    );
    const watching = revocations.run(stop.signal);
    const told: string[] = [];
    const unwatch = revocations.watch(["run-2", "m-2"], (r) => told.push(r.by));
    const ended = revocations.watch(["run-3"], () => told.push("ended"));
    ended();
    await postRevocation(q.client, "jobs", "m-2", "bob@box", Date.now(), 60);
    await postRevocation(q.client, "jobs", "run-3", "bob@box", Date.now(), 60);
    // The worker's loop peeks every second while a run is watched.
    await until("told", () => told.length > 0, 5_000);
    // Nothing watched now: the loop rests; a long-poll round's refresh peeks.
    await until("run-3 known", () => {
      revocations.refresh();
      return revocations.of(["run-3"]) !== undefined;
    });
    unwatch();
    assert.deepEqual(told, ["bob@box"]);
    // Already revoked when watched: told at once.
    revocations.watch(["run-3"], () => told.push("at once"));
    assert.deepEqual(told, ["bob@box", "at once"]);
    stop.abort();
    await watching;
  } finally {
    stop.abort();
    await q.close();
  }
});

Deno.test("revoke: an expired revocation, or a message that is none, cancels nothing and is deleted", async () => {
  const q = await startTestQueue({}, "test", "jobs");
  try {
    const day = 86_400_000;
    await q.client.post("jobs_revoked", [
      revocationBody("old-run", "ann@box", Date.now() - 2 * day, 86_400),
      "not a revocation",
    ]);
    await postRevocation(
      q.client,
      "jobs",
      "new-run",
      "ann@box",
      Date.now(),
      60,
    );
    const revocations = new Revocations(
      q.client,
      "jobs",
      realClock,
      memoryLog(),
    );
    await until("the live one seen", () => {
      revocations.refresh();
      return revocations.of(["new-run"]) !== undefined;
    });
    assert.equal(revocations.of(["old-run"]), undefined);
    await until(
      "the others deleted",
      async () => (await q.peek("jobs_revoked")).length === 1,
    );
  } finally {
    await q.close();
  }
});

Deno.test("revoke: with no revoked queue yet nothing is cancelled and nothing is logged", async () => {
  const q = await startTestQueue({}, "test", "jobs");
  try {
    const log = memoryLog();
    let peeks = 0;
    const counted = {
      peek: (queue: string, n: number) => {
        peeks++;
        return q.client.peek(queue, n);
      },
      deleteMessage: (queue: string, id: string) =>
        q.client.deleteMessage(queue, id),
    };
    const revocations = new Revocations(counted, "jobs", realClock, log);
    const stop = new AbortController();
    const watching = revocations.run(stop.signal);
    let told = false;
    revocations.watch(["r"], () => told = true);
    // The loop peeks every second while a run is watched: each answers 404.
    await until("three peeks", () => peeks >= 3, 10_000);
    stop.abort();
    await watching;
    assert.equal(told, false);
    assert.deepEqual(log.lines, []);
  } finally {
    await q.close();
  }
});

Deno.test("revoke: a revocation's body is read back as written; other bodies are none", () => {
  const body = revocationBody("r-1", "ann@box", 1_000_000, 60);
  assert.deepEqual(parseRevocation(body), {
    run: "r-1",
    by: "ann@box",
    atMs: 1_000_000,
    expiresMs: 1_060_000,
  });
  assert.equal(parseRevocation("{}"), undefined);
  assert.equal(parseRevocation('{"revoke": "x"}'), undefined, "no expiry");
  assert.equal(parseRevocation("[1]"), undefined);
  assert.equal(
    parseRevocation('{"revoke": "x", "expires_at": "2030-01-01T00:00:00Z"}')
      ?.by,
    "someone",
  );
});
