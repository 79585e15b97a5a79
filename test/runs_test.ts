/**
 * The run history (issue 18) with the real worker, started as `deno task
 * start` starts it, on real sshd hosts and a real queue over HTTP: each run's
 * record on the listener after success, failure after retries on two hosts,
 * and rejection; the filters and q; a task id that succeeded not run again;
 * the history after a restart, and its bounds (count and age); a store on a
 * full disk.
 */
import assert from "node:assert/strict";
import { RunStore } from "../lib/runs.ts";
import {
  freePort,
  type LoopbackHosts,
  needs,
  sshdMissing,
  startLoopbackHosts,
} from "./sshd.ts";
import {
  baseEnv,
  mountTmpfs,
  sample,
  spawnCollecting,
  startTestQueue,
  type TestQueue,
  until,
} from "./support.ts";

const sshdTest = needs(sshdMissing(), "run history tests with a real worker");

const SECRET = "hunter2-secret-value";

/** On each host: say which, then exit `code`, or 3 on the host named `fail_on`. */
const ACT = `#!/bin/sh
server=$(echo "$SSH_CONNECTION" | cut -d' ' -f3)
echo "step $1 on $server with $3"
echo "to stderr $server" >&2
if [ "$server" = "$2" ]; then exit 3; fi
exit "$1"
`;

function catalogFor(dir: string): string {
  return `
tasks:
  act:
    command: ${dir}/act.sh {{code}} {{fail_on}} {{token}}
    max_attempts: 2
    params:
      code: {}
      fail_on: {default: none}
      token: {secret: true, default: none}
`;
}

interface Setup {
  hosts: LoopbackHosts;
  queue: TestQueue;
  dir: string;
}

async function withSetup(fn: (s: Setup) => Promise<void>): Promise<void> {
  const hosts = await startLoopbackHosts(2);
  const queue = await startTestQueue({}, "local", "my_queue");
  const dir = hosts.clientKeyFile.replace(/\/[^/]+$/, "");
  try {
    await Deno.writeTextFile(`${dir}/act.sh`, ACT);
    await Deno.chmod(`${dir}/act.sh`, 0o755);
    await Deno.writeTextFile(`${dir}/tasks.yaml`, catalogFor(dir));
    await fn({ hosts, queue, dir });
  } finally {
    await queue.close();
    await hosts.stop();
  }
}

/** The worker as `deno task start` runs it, its history in `db`. */
function startWorker(s: Setup, httpPort: number, env: Record<string, string>) {
  const { hostname, port } = new URL(s.queue.server.url);
  return spawnCollecting("deno", ["task", "start"], {
    ...baseEnv(s.dir),
    IRON_HOST: hostname,
    IRON_PORT: port,
    IRON_SCHEME: "http",
    IRON_PROJECT_ID: "local",
    IRON_MQ_QUEUE_NAME: "my_queue",
    SSH_HOST: s.hosts.hosts.join(","),
    SSH_PORT: String(s.hosts.port),
    SSH_USER: s.hosts.user,
    SSH_KEY_FILE: s.hosts.clientKeyFile,
    SSH_KNOWN_HOSTS: s.hosts.knownHostsFile,
    TASKS_FILE: `${s.dir}/tasks.yaml`,
    TASK_HTTP_PORT: String(httpPort),
    TASK_POLL_WAIT: "1",
    TASK_RETRY_DELAY: "0",
    ...env,
  });
}

function act(id: string, kwargs: Record<string, string>): string {
  return JSON.stringify({ id, task: "act", kwargs, sender: "ops@desk" });
}

/** What these tests read of a run's record (GET /runs/<id>) and a list's items. */
interface RunJson {
  id: string;
  status: string;
  sender: string | null;
  parameters: unknown;
  hosts: string[];
  message_ids: string[];
  attempts: number;
  reason: string | null;
  statuses: { status: string }[];
  host_runs: {
    message_id: string;
    attempt: number;
    host: string;
    exit_status: number | null;
    stdout: string;
    stderr: string;
  }[];
  error?: string;
}

async function getJson(
  url: string,
): Promise<{ status: number; body: RunJson & { runs: RunJson[] } }> {
  const response = await fetch(url);
  return { status: response.status, body: await response.json() };
}

Deno.test({
  name:
    "the worker records each run (success, failure after retries on two hosts, rejection), lists it by filter, keeps it across a restart within its bounds, and never runs a succeeded task id again",
  ...sshdTest,
  async fn() {
    await withSetup(async (s) => {
      const httpPort = freePort();
      const base = `http://127.0.0.1:${httpPort}`;
      const env = { TASK_RUNS_DB: `${s.dir}/history/runs.sqlite` };
      await Deno.mkdir(`${s.dir}/history`);
      let worker = startWorker(s, httpPort, env);
      try {
        await worker.line(/web: listening on/);
        // One after another, each once its run is recorded: the newest-first
        // order below is then theirs (posted at once, they would start at once).
        const bodies: [string, string][] = [
          ["run-ok", act("run-ok", { code: "0", token: SECRET })],
          ["run-fail", act("run-fail", { code: "0", fail_on: "127.0.0.3" })],
          ["run-bad", JSON.stringify({ id: "run-bad", task: "no_such_task" })],
        ];
        for (const [id, body] of bodies) {
          await s.queue.post([body]);
          await until(`run ${id} recorded`, async () => {
            const { body } = await getJson(`${base}/runs`);
            return body.runs.some((r) => r.id === id);
          });
        }
        await until("three runs settled", async () => {
          const { body } = await getJson(`${base}/runs`);
          return body.runs.length === 3 &&
            body.runs.every((r) =>
              ["SUCCESS", "FAILURE", "REJECTED"].includes(r.status)
            );
        });

        const ok = (await getJson(`${base}/runs/run-ok`)).body;
        assert.equal(ok.status, "SUCCESS");
        assert.equal(ok.sender, "ops@desk");
        assert.deepEqual(ok.parameters, {
          code: "0",
          token: "[redacted]",
        });
        assert.deepEqual(ok.hosts, ["127.0.0.2", "127.0.0.3"]);
        assert.deepEqual(
          ok.host_runs.map((r) => [
            r.host,
            r.exit_status,
          ]),
          [["127.0.0.2", 0], ["127.0.0.3", 0]],
        );
        assert.equal(
          ok.host_runs[0].stdout,
          "step 0 on 127.0.0.2 with [redacted]\n",
        );
        assert.equal(ok.host_runs[1].stderr, "to stderr 127.0.0.3\n");
        assert.deepEqual(
          ok.statuses.map((x) => x.status),
          ["RUNNING", "SUCCESS"],
        );

        // Attempt 1 on both hosts, then attempt 2 (its continuation) on the failed one.
        const failed = (await getJson(`${base}/runs/run-fail`)).body;
        assert.equal(failed.status, "FAILURE");
        assert.equal(failed.attempts, 2);
        assert.equal(failed.message_ids.length, 2);
        assert.deepEqual(
          failed.host_runs.map((r) => [
            r.message_id,
            r.attempt,
            r.host,
            r.exit_status,
          ]),
          [
            [failed.message_ids[0], 1, "127.0.0.2", 0],
            [failed.message_ids[0], 1, "127.0.0.3", 3],
            [failed.message_ids[1], 2, "127.0.0.3", 3],
          ],
        );
        assert.deepEqual(
          failed.statuses.map((x) => x.status),
          ["RUNNING", "RETRY", "RUNNING", "FAILURE"],
        );
        assert.match(failed.reason ?? "", /exit status 3/);

        const bad = (await getJson(`${base}/runs/run-bad`)).body;
        assert.equal(bad.status, "REJECTED");
        assert.match(bad.reason ?? "", /unknown task "no_such_task"/);
        assert.deepEqual(bad.host_runs, []);

        const ids = async (query: string) =>
          (await getJson(`${base}/runs?${query}`)).body.runs.map((r) => r.id);
        assert.deepEqual(await ids(""), ["run-bad", "run-fail", "run-ok"]);
        assert.deepEqual(await ids("status=FAILURE"), ["run-fail"]);
        assert.deepEqual(await ids("task=act"), ["run-fail", "run-ok"]);
        assert.deepEqual(await ids("host=127.0.0.3&q=step%200"), [
          "run-fail",
          "run-ok",
        ]);
        assert.deepEqual(await ids(`q=${SECRET}`), [], "output is masked");
        assert.deepEqual(await ids("since=1h&limit=1"), ["run-bad"]);
        const unknown = await getJson(`${base}/runs/nope`);
        assert.equal(unknown.status, 404);
        assert.match(unknown.body.error ?? "", /no run "nope"/);
        assert.equal((await getJson(`${base}/runs?status=DONE`)).status, 400);

        // The same task id again: deleted, not run.
        await s.queue.post([act("run-ok", { code: "0" })]);
        await worker.line(
          /message \d+: task id run-ok already succeeded at \S+Z; not run again/,
        );
        await until(
          "the duplicate deleted",
          async () => await s.queue.size("my_queue") === 0,
        );
        const metrics = await (await fetch(`${base}/metrics`)).text();
        assert.equal(
          sample(
            metrics,
            'tasks_messages_total{task="act",outcome="duplicate"}',
          ),
          1,
        );
        assert.equal(sample(metrics, "tasks_runs_stored"), 3);
        assert.ok(sample(metrics, "tasks_runs_db_bytes")! > 0);
        assert.equal(
          worker.lines.filter((l) => /\[127\.0\.0\.2\] run: /.test(l)).length,
          2,
          "run-ok and run-fail's first attempt ran there, nothing else",
        );
        assert.equal((await worker.stop()).code, 0, worker.lines.join("\n"));

        // A restart: the history is there, and run-ok still does not run again.
        worker = startWorker(s, httpPort, env);
        await worker.line(/web: listening on/);
        assert.deepEqual(await ids(""), ["run-bad", "run-fail", "run-ok"]);
        assert.equal(
          (await getJson(`${base}/runs/run-fail`)).body.host_runs.length,
          3,
        );
        await s.queue.post([act("run-ok", { code: "0" })]);
        await worker.line(/task id run-ok already succeeded .*not run again/);
        assert.equal((await worker.stop()).code, 0, worker.lines.join("\n"));

        // Restarted with a lower bound: the oldest run is pruned.
        worker = startWorker(s, httpPort, { ...env, TASK_RUNS_MAX: "2" });
        await worker.line(/web: listening on/);
        assert.deepEqual(await ids(""), ["run-bad", "run-fail"]);
        assert.equal((await worker.stop()).code, 0, worker.lines.join("\n"));

        // A run recorded two days ago, then a start keeping one day: it goes.
        const past = RunStore.open(
          { path: env.TASK_RUNS_DB, keepDays: 30, max: 100 },
          () => {},
          { now: () => Date.now() - 2 * 86_400_000 },
        );
        assert.ok(past instanceof RunStore);
        past.settledRun({
          message: {
            id: "9",
            body: "old",
            reserved_count: 1,
            reservation_id: "r",
          },
          reservationId: "r",
          attempt: 1,
          meta: { priorRetries: 0 },
        }, "success");
        past.close();
        worker = startWorker(s, httpPort, env);
        await worker.line(/web: listening on/);
        assert.deepEqual(await ids(""), ["run-bad", "run-fail", "9"]);
        assert.equal((await worker.stop()).code, 0, worker.lines.join("\n"));
        worker = startWorker(s, httpPort, { ...env, TASK_RUNS_KEEP_DAYS: "1" });
        await worker.line(/web: listening on/);
        assert.deepEqual(await ids(""), ["run-bad", "run-fail"]);
        assert.equal((await worker.stop()).code, 0, worker.lines.join("\n"));
        assert.doesNotMatch(worker.lines.join("\n"), new RegExp(SECRET));
      } finally {
        if (!worker.exited()) await worker.stop();
      }
    });
  },
});

Deno.test({
  name:
    "a worker whose run history is on a full disk logs the failed writes and goes on running and deleting its messages",
  ...sshdTest,
  async fn() {
    await withSetup(async (s) => {
      const disk = `${s.dir}/disk`;
      await Deno.mkdir(disk);
      const cannotMount = await mountTmpfs(disk, "512k");
      if (cannotMount !== undefined) {
        const why = `a 512 KiB tmpfs cannot be mounted here (${cannotMount})`;
        if (Deno.env.get("CI") === "true") throw new Error(why);
        console.log(`SKIP full-disk history test: ${why}; run it as root`);
        return;
      }
      const httpPort = freePort();
      const base = `http://127.0.0.1:${httpPort}`;
      const worker = startWorker(s, httpPort, {
        TASK_RUNS_DB: `${disk}/runs.sqlite`,
      });
      try {
        await worker.line(/web: listening on/);
        // The rest of the disk filled: the history's next writes find no room.
        const filler = await Deno.open(`${disk}/filler`, {
          write: true,
          create: true,
        });
        try {
          const block = new Uint8Array(16 * 1024);
          for (;;) await filler.write(block);
        } catch (e) {
          assert.match(String(e), /No space left|ENOSPC|space/i);
        } finally {
          filler.close();
        }
        const ids = await s.queue.post(
          Array.from(
            { length: 6 },
            (_, i) => act(`full-${i}`, { code: "0", token: "x".repeat(i) }),
          ),
        );
        await until("every message ran and was deleted", async () => {
          const done = worker.lines.filter((l) =>
            /2 of 2 hosts succeeded/.test(l)
          ).length;
          return done === ids.length &&
            await s.queue.size("my_queue") === 0;
        });
        await worker.line(
          /run history .*runs\.sqlite: \d+ write\(s\) failed: database or disk is full/,
        );
        const metrics = await (await fetch(`${base}/metrics`)).text();
        assert.ok(
          sample(metrics, "tasks_runs_write_failures_total")! >= 1,
          metrics,
        );
        assert.equal(
          sample(metrics, 'tasks_messages_total{task="act",outcome="success"}'),
          ids.length,
        );
        assert.equal((await worker.stop()).code, 0, worker.lines.join("\n"));
      } finally {
        if (!worker.exited()) await worker.stop();
        await new Deno.Command("umount", { args: ["--lazy", disk] }).output();
      }
    });
  },
});
