/**
 * cli/runs_live.ts as a user meets it: `runs cancel` posts a revocation to
 * the worker's queue server over HTTP (who, until when); `runs follow` reads
 * a listener's event stream and exits as send --wait does; their mistakes
 * are said with what to do. (test/live_test.ts runs both against real workers.)
 */
import assert from "node:assert/strict";
import { DeadLetters } from "../lib/dead_letters.ts";
import { Monitor } from "../lib/monitor.ts";
import { parseRevocation } from "../lib/revoke.ts";
import { LiveRuns } from "../lib/stream.ts";
import { freePort } from "../test/sshd.ts";
import { baseEnv, spawnCollecting, startTestQueue } from "../test/support.ts";

async function runsLive(args: string[], env: Record<string, string>) {
  const c = spawnCollecting(
    "deno",
    ["task", "-q", "runs", ...args],
    env,
  );
  await c.child.status;
  const { code } = await c.stop();
  return { code, text: c.lines.join("\n") };
}

Deno.test("runs cancel posts a revocation naming user@hostname to <queue>_revoked, holding TASK_REVOKE_TTL", async () => {
  const q = await startTestQueue({}, "local", "my_queue");
  const home = await Deno.makeTempDir();
  try {
    const env = {
      ...baseEnv(home),
      MQ_PORT: new URL(q.server.url).port,
      TASK_REVOKE_TTL: "120",
    };
    const before = Date.now();
    const done = await runsLive(["cancel", "run-42"], env);
    assert.equal(done.code, 0, done.text);
    assert.match(done.text, /run run-42: cancel posted to my_queue_revoked/);
    const [message] = await q.peek("my_queue_revoked");
    const revocation = parseRevocation(message.body)!;
    assert.equal(revocation.run, "run-42");
    assert.match(revocation.by, /^\S+@\S+$/);
    assert.equal(revocation.expiresMs - revocation.atMs, 120_000);
    assert.ok(revocation.atMs >= before - 1000);

    const wrong = await runsLive(["cancel", "run-42"], {
      ...env,
      TASK_REVOKE_TTL: "0",
    });
    assert.equal(wrong.code, 2);
    assert.match(wrong.text, /TASK_REVOKE_TTL/);
    const usage = await runsLive(["cancel"], env);
    assert.equal(usage.code, 2);
    assert.match(usage.text, /give one run id/);
  } finally {
    await q.close();
    await Deno.remove(home, { recursive: true });
  }
});

Deno.test("runs cancel says what to check when the queue cannot be reached", async () => {
  const home = await Deno.makeTempDir();
  try {
    const done = await runsLive(["cancel", "r"], {
      ...baseEnv(home),
      MQ_PORT: String(freePort()),
    });
    assert.equal(done.code, 1);
    assert.match(
      done.text,
      /cannot post to my_queue_revoked: .*is the queue reachable/,
    );
  } finally {
    await Deno.remove(home, { recursive: true });
  }
});

Deno.test("runs follow prints a run's lines from the listener, then its end, exiting with its exit status; needs the token and the port", async () => {
  const q = await startTestQueue({}, "test", "jobs");
  const monitor = new Monitor();
  const live = new LiveRuns();
  const token = "follow-token-0123456789";
  const port = freePort();
  const served = await monitor.serve({
    hostname: "127.0.0.1",
    port,
    token,
    deadLetters: new DeadLetters(q.client, "jobs_failed"),
    maskBody: (b) => b,
    log: () => {},
    live: {
      follow: (id) => live.follow(id),
      cancel: () => Promise.resolve({ ok: true, text: "posted" }),
    },
  });
  const home = await Deno.makeTempDir();
  try {
    const env = {
      ...baseEnv(home),
      TASK_HTTP_PORT: String(port),
      TASK_HTTP_TOKEN: token,
    };
    const feed = live.open("run-7", "70");
    feed({
      event: "STARTED",
      task_id: "run-7",
      message_id: "70",
      attempt: 1,
      hosts: ["web1"],
      at: new Date().toISOString(),
    });
    const follower = spawnCollecting(
      "deno",
      ["task", "-q", "runs", "follow", "run-7"],
      env,
    );
    await follower.line(/^started: message 70, attempt 1, on web1$/);
    feed({
      event: "OUTPUT",
      task_id: "run-7",
      message_id: "70",
      host: "web1",
      lines: [["out", "deploying"], ["err", "careful"]],
      dropped: 0,
    });
    await follower.line(/^\[web1\] err: careful$/);
    live.settled("run-7", "70", () => ({
      event: "RESULT",
      status: "FAILURE",
      message_id: "70",
      task_id: "run-7",
      attempts: 1,
      reason: "exit status 4",
      hosts: {
        web1: {
          exit_status: 4,
          signal: null,
          duration_ms: 12,
          stdout: "deploying\n",
          stderr: "careful\n",
          error: null,
        },
      },
    }));
    await follower.child.status;
    const { code } = await follower.stop();
    assert.equal(code, 4, follower.lines.join("\n"));
    assert.deepEqual(
      follower.lines.filter((l) => l.startsWith("[web1]")),
      [
        "[web1] out: deploying",
        "[web1] err: careful",
        "[web1] exit: 4 (message 70, 12 ms)",
      ],
    );
    assert.ok(
      follower.lines.includes("FAILURE after 1 attempt(s): exit status 4"),
    );

    const refused = await runsLive(["follow", "run-7"], {
      ...env,
      TASK_HTTP_TOKEN: "another-token-0123456789",
    });
    assert.equal(refused.code, 1);
    assert.match(
      refused.text,
      /needs its token \(TASK_HTTP_TOKEN\).*HTTP 401/s,
    );
    const unset = await runsLive(["follow", "run-7"], baseEnv(home));
    assert.equal(unset.code, 2);
    assert.match(unset.text, /TASK_HTTP_PORT: not set/);
  } finally {
    await served.close();
    await q.close();
    await Deno.remove(home, { recursive: true });
  }
});
