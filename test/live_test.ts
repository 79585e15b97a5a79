/**
 * Following and cancelling runs (issue 18, the live half) with real worker
 * processes, a real sshd listening on two loopback hosts and the queue over
 * HTTP: `send --follow` and `runs follow` print a slow command's lines while
 * it still runs; `runs cancel` stops a running run and keeps a delayed one
 * from starting, on two workers sharing the queue.
 */
import assert from "node:assert/strict";
import {
  freePort,
  needs,
  type Sshd,
  sshdMissing,
  sshEnv,
  startSshd,
} from "./sshd.ts";
import {
  baseEnv,
  type Collected,
  spawnCollecting,
  startTestQueue,
  type TestQueue,
  until,
} from "./support.ts";

const sshdTest = needs(sshdMissing(), "following and cancelling runs");

const HOSTS = ["127.0.0.2", "127.0.0.3"];

/** A folder the remote user can write to, with the commands the tests run. */
async function commands(sshd: Sshd): Promise<string> {
  const dir = sshd.dir;
  await Deno.writeTextFile(
    `${dir}/slow.sh`,
    `#!/bin/sh
ip=$(echo "$SSH_CONNECTION" | cut -d' ' -f3)
echo "first on $ip"
echo "note on $ip" >&2
while [ ! -e ${dir}/go ]; do sleep 0.05; done
date +%s%3N > ${dir}/ended.$ip
echo "last on $ip"
`,
  );
  await Deno.writeTextFile(
    `${dir}/hang.sh`,
    `#!/bin/sh
echo "started $1" >> ${dir}/started
echo "first of $1"
exec sleep 617
`,
  );
  await Deno.chmod(`${dir}/slow.sh`, 0o755);
  await Deno.chmod(`${dir}/hang.sh`, 0o755);
  await Deno.chmod(dir, 0o777);
  const catalog = `${dir}/tasks.yaml`;
  await Deno.writeTextFile(
    catalog,
    `tasks:
  slow:
    command: ${dir}/slow.sh
  hang:
    command: ${dir}/hang.sh {{name}}
    params:
      name: {pattern: "[a-z0-9-]+"}
  quick:
    command: echo quick
`,
  );
  return catalog;
}

function runsLive(args: string[], env: Record<string, string>): Collected {
  return spawnCollecting(
    "deno",
    ["task", "-q", "runs", ...args],
    env,
  );
}

async function ended(c: Collected): Promise<number> {
  await c.child.status;
  return (await c.stop()).code;
}

Deno.test({
  name:
    "follow: send --follow prints each host's first line while the command still runs, then the result; runs follow joins a run under way",
  ...sshdTest,
  async fn() {
    const sshd = await startSshd({ addresses: HOSTS });
    const catalog = await commands(sshd);
    const mqPort = freePort();
    const httpPort = freePort();
    const env = {
      ...baseEnv(sshd.dir),
      MQ_PORT: String(mqPort),
      TASKS_FILE: catalog,
    };
    const listenerEnv = { ...env, TASK_HTTP_PORT: String(httpPort) };
    const worker = spawnCollecting("deno", ["task", "start"], {
      ...listenerEnv,
      ...sshEnv(sshd),
      SSH_HOST: HOSTS.join(","),
      MQ_DB: ":memory:",
      TASK_POLL_WAIT: "1",
    });
    try {
      await worker.line(/^worker: queue my_queue at /);

      // send --follow: both first lines while both commands wait for `go`.
      const sender = spawnCollecting("deno", [
        "task",
        "send",
        "--follow",
        "slow",
      ], env);
      await sender.line(/^\[127\.0\.0\.2\] out: first on 127\.0\.0\.2$/);
      await sender.line(/^\[127\.0\.0\.3\] out: first on 127\.0\.0\.3$/);
      await sender.line(/^\[127\.0\.0\.3\] err: note on 127\.0\.0\.3$/);
      const firstSeenAt = Date.now();
      assert.ok(!sender.exited(), "still following");
      await Deno.writeTextFile(`${sshd.dir}/go`, "");
      const code = await ended(sender);
      assert.equal(code, 0, sender.lines.join("\n"));
      for (const ip of HOSTS) {
        const end = Number(await Deno.readTextFile(`${sshd.dir}/ended.${ip}`));
        assert.ok(
          firstSeenAt < end,
          `the first lines came ${
            end - firstSeenAt
          } ms before ${ip}'s command ended`,
        );
        const last = sender.lines.indexOf(`[${ip}] out: last on ${ip}`);
        const exit = sender.lines.findIndex((l) =>
          l.startsWith(`[${ip}] exit: 0 (message `)
        );
        assert.ok(last >= 0 && last < exit, sender.lines.join("\n"));
        // Shown once: as it came, not again from the result.
        assert.equal(
          sender.lines.filter((l) => l === `[${ip}] out: first on ${ip}`)
            .length,
          1,
        );
      }
      assert.ok(
        sender.lines.some((l) =>
          /^started: message \d+, attempt 1, on 127\.0\.0\.2, 127\.0\.0\.3$/
            .test(l)
        ),
      );
      await Deno.remove(`${sshd.dir}/go`);

      // runs follow: a run already under way, joined from the listener.
      const posted = spawnCollecting("deno", ["task", "send", "slow"], env);
      assert.equal(await ended(posted), 0, posted.lines.join("\n"));
      const messageId = posted.lines.find((l) => /^\d+$/.test(l))!;
      await worker.line(/^\[127\.0\.0\.3\] out: first on 127\.0\.0\.3$/);
      await until(
        "both first lines",
        () =>
          worker.lines.filter((l) => / out: first on /.test(l)).length === 4,
      );
      const follower = runsLive(["follow", messageId], listenerEnv);
      // What it showed before the follower came, then what comes.
      await follower.line(/^\[127\.0\.0\.2\] out: first on 127\.0\.0\.2$/);
      assert.ok(!follower.exited());
      await Deno.writeTextFile(`${sshd.dir}/go`, "");
      assert.equal(await ended(follower), 0, follower.lines.join("\n"));
      for (const ip of HOSTS) {
        assert.ok(follower.lines.includes(`[${ip}] out: last on ${ip}`));
        assert.ok(
          follower.lines.some((l) =>
            l.startsWith(`[${ip}] exit: 0 (message ${messageId},`)
          ),
          follower.lines.join("\n"),
        );
      }

      // A run not under way: said, exit 1.
      const none = runsLive(["follow", "no-such-run"], listenerEnv);
      assert.equal(await ended(none), 1);
      assert.match(none.lines.join("\n"), /not under way on this worker/);

      // "stream" without a reply queue is refused with what to do.
      const refused = await fetch(
        `http://127.0.0.1:${mqPort}/3/projects/local/queues/my_queue/messages`,
        {
          method: "POST",
          headers: { "Content-Type": "application/json" },
          body: JSON.stringify({
            messages: [{
              body: JSON.stringify({ task: "quick", stream: true }),
            }],
          }),
        },
      );
      assert.equal(refused.status, 201);
      await refused.body?.cancel();
      await worker.line(
        /will not run anything: "stream": true needs "reply_to"/,
      );

      assert.equal((await worker.stop()).code, 0, worker.lines.join("\n"));
    } finally {
      if (!worker.exited()) await worker.stop();
      await sshd.stop();
      await Deno.remove(sshd.dir, { recursive: true });
    }
  },
});

interface Result {
  task_id: string;
  status: string;
  reason: string | null;
  hosts: Record<string, { error: string | null; stdout: string }>;
}

/** The results on `replies`, read without taking them. */
async function results(q: TestQueue): Promise<Result[]> {
  return (await q.peek("replies")).map((m) => JSON.parse(m.body));
}

Deno.test({
  name:
    "cancel: runs cancel stops a running run and deletes a delayed one unrun, on two workers sharing the queue: REVOKED with who, not retried, not dead-lettered; an unknown run is harmless",
  ...sshdTest,
  async fn() {
    const sshd = await startSshd();
    const catalog = await commands(sshd);
    const q = await startTestQueue({}, "local", "my_queue");
    const { port } = new URL(q.server.url);
    const env = {
      ...baseEnv(sshd.dir),
      IRON_HOST: "127.0.0.1",
      IRON_PORT: port,
      IRON_SCHEME: "http",
      IRON_PROJECT_ID: "local",
      IRON_MQ_QUEUE_NAME: "my_queue",
      TASKS_FILE: catalog,
    };
    const workers = [0, 1].map(() =>
      spawnCollecting("deno", ["task", "start"], {
        ...env,
        ...sshEnv(sshd),
        TASK_POLL_WAIT: "1",
        TASK_CONCURRENCY: "1",
        TASK_RETRY_DELAY: "0",
      })
    );
    const logs = () => workers.map((w) => w.lines.join("\n")).join("\n----\n");
    try {
      for (const w of workers) await w.line(/^worker: queue my_queue at /);

      // A running run: stopped (TERM), deleted, REVOKED naming who.
      await q.post([JSON.stringify({
        id: "run-running",
        task: "hang",
        kwargs: { name: "running" },
        reply_to: "replies",
      })]);
      await until(
        logs,
        () =>
          workers.some((w) =>
            w.lines.some((l) => / out: first of running$/.test(l))
          ),
      );
      const cancel = runsLive(["cancel", "run-running"], env);
      assert.equal(await ended(cancel), 0, cancel.lines.join("\n"));
      assert.match(
        cancel.lines.join("\n"),
        /cancel posted to my_queue_revoked/,
      );
      await until(
        logs,
        async () => (await results(q)).some((r) => r.task_id === "run-running"),
      );
      const running = (await results(q)).find((r) =>
        r.task_id === "run-running"
      )!;
      assert.equal(running.status, "REVOKED");
      assert.match(running.reason ?? "", /^cancelled by \S+@\S+ at \d{4}-/);
      assert.equal(running.hosts["127.0.0.1"].error, "stopped by a cancel");
      assert.equal(running.hosts["127.0.0.1"].stdout, "first of running\n");
      assert.match(
        logs(),
        /\[127\.0\.0\.1\] stopped by a cancel \(message \d+/,
      );
      // Both workers saw it: the one running it, and the other.
      for (const w of workers) {
        await w.line(/revocation seen: run run-running cancelled by /);
      }
      await until("the remote command ended", async () => {
        const out = await new Deno.Command("pgrep", {
          args: ["-f", "sleep 617"],
        }).output();
        return out.code === 1;
      });

      // A delayed run: both workers know of the cancel before its eta; deleted unrun.
      const etaMs = Date.now() + 12_000;
      await q.post([JSON.stringify({
        id: "run-delayed",
        task: "hang",
        kwargs: { name: "delayed" },
        eta: new Date(etaMs).toISOString(),
        reply_to: "replies",
      })]);
      await until(
        logs,
        () =>
          workers.some((w) =>
            w.lines.some((l) => /held back until its eta/.test(l))
          ),
      );
      const later = runsLive(["cancel", "run-delayed"], env);
      assert.equal(await ended(later), 0, later.lines.join("\n"));
      for (const w of workers) {
        await w.line(/revocation seen: run run-delayed cancelled by /);
      }
      assert.ok(
        Date.now() < etaMs,
        "both workers saw the cancel before the eta",
      );
      await until(
        logs,
        async () => (await results(q)).some((r) => r.task_id === "run-delayed"),
      );
      const delayed = (await results(q)).find((r) =>
        r.task_id === "run-delayed"
      )!;
      assert.equal(delayed.status, "REVOKED");
      assert.match(delayed.reason ?? "", /^cancelled by \S+@\S+ at /);
      assert.match(logs(), /not run: cancelled by /);
      assert.equal(
        (await Deno.readTextFile(`${sshd.dir}/started`)).trim(),
        "started running",
        "the delayed run never started; the running one started once",
      );

      // Unknown and finished runs: harmless; the workers go on.
      for (const id of ["no-such-run", "run-running"]) {
        const c = runsLive(["cancel", id], env);
        assert.equal(await ended(c), 0);
      }
      await q.post([
        JSON.stringify({ id: "after", task: "quick", reply_to: "replies" }),
      ]);
      await until(
        logs,
        async () => (await results(q)).some((r) => r.task_id === "after"),
      );
      assert.equal(
        (await results(q)).find((r) => r.task_id === "after")!.status,
        "SUCCESS",
      );

      // Deleted, not retried, not dead-lettered. A result is posted before
      // its message's delete lands: the queue empties just after.
      await until(
        logs,
        async () => (await q.info("my_queue")).size === 0,
      );
      assert.equal((await q.info("my_queue_failed")).size, 0);
      assert.equal(
        (await results(q)).length,
        3,
        JSON.stringify(await results(q)),
      );
      for (const w of workers) {
        assert.equal((await w.stop()).code, 0, logs());
      }
      assert.equal(
        (await Deno.readTextFile(`${sshd.dir}/started`)).trim(),
        "started running",
      );
    } finally {
      for (const w of workers) if (!w.exited()) await w.stop();
      await q.close();
      await sshd.stop();
      await Deno.remove(sshd.dir, { recursive: true });
    }
  },
});
