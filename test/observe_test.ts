/**
 * Seeing it work (issue 12) with the real worker, started as `deno task start`
 * starts it (its permissions), on a real sshd: /metrics after a known run,
 * and /readyz following the SSH host.
 */
import assert from "node:assert/strict";
import {
  checkMetrics,
  freePort,
  needs,
  PROMTOOL,
  type Sshd,
  sshdMissing,
  sshEnv,
  startSshd,
  toolMissing,
} from "./sshd.ts";
import { baseEnv, sample, spawnCollecting, until } from "./support.ts";

function promtoolMissing(): string | undefined {
  return toolMissing(PROMTOOL, "prometheus") ?? sshdMissing();
}

/** The worker with its listener, as `deno task start` runs it. */
function startWorker(sshd: Sshd, httpPort: number, mqPort: number) {
  return spawnCollecting("deno", ["task", "start"], {
    ...baseEnv(sshd.dir),
    ...sshEnv(sshd),
    MQ_DB: ":memory:",
    MQ_PORT: String(mqPort),
    TASK_HTTP_PORT: String(httpPort),
    TASK_COMMAND: `${sshd.dir}/act.sh`,
    TASK_MAX_ATTEMPTS: "1",
    TASK_POLL_WAIT: "1",
  });
}

async function get(url: string): Promise<{ status: number; text: string }> {
  const response = await fetch(url);
  return { status: response.status, text: await response.text() };
}

Deno.test({
  name:
    "observe: a real worker's /metrics counts a known run exactly and passes promtool; /readyz follows its sshd",
  ...needs(promtoolMissing(), "metrics and readiness of a real worker"),
  async fn() {
    const sshd = await startSshd();
    await Deno.writeTextFile(
      `${sshd.dir}/act.sh`,
      `#!/bin/sh\necho "step $1"\nexit "$1"\n`,
    );
    await Deno.chmod(`${sshd.dir}/act.sh`, 0o755);
    const httpPort = freePort();
    const base = `http://127.0.0.1:${httpPort}`;
    const mqPort = freePort();
    const worker = startWorker(sshd, httpPort, mqPort);
    let restarted: Sshd | undefined;
    try {
      await worker.line(/post a test message: curl /);
      const post = async (body: string) => {
        const response = await fetch(
          `http://127.0.0.1:${mqPort}/3/projects/local/queues/my_queue/messages`,
          {
            method: "POST",
            headers: { "Content-Type": "application/json" },
            body: JSON.stringify({ messages: [{ body }] }),
          },
        );
        return await response.text();
      };
      for (
        const body of [
          '{"args":["0"]}',
          '{"args":["0"]}',
          '{"args":["3"]}',
          '{"bad"',
        ]
      ) {
        assert.match(await post(body), /"ids":\["\d+"\]/);
      }
      await worker.line(/moved to my_queue_failed .*exit status 3/);
      await worker.line(/moved to my_queue_failed .*not valid JSON/);
      let metrics = "";
      await until("every message counted", async () => {
        metrics = (await get(`${base}/metrics`)).text;
        return sample(
          metrics,
          'tasks_messages_total{task="TASK_COMMAND",outcome="success"}',
        ) === 2;
      });
      const expected: Record<string, number> = {
        'tasks_messages_total{task="TASK_COMMAND",outcome="success"}': 2,
        'tasks_messages_total{task="TASK_COMMAND",outcome="failure"}': 1,
        'tasks_messages_total{task="TASK_COMMAND",outcome="rejected"}': 1,
        'tasks_dead_letters_total{task="TASK_COMMAND"}': 2,
        'tasks_command_duration_seconds_count{task="TASK_COMMAND",host="127.0.0.1"}':
          3,
        "tasks_commands_running": 0,
        "tasks_messages_reserved": 0,
        'tasks_ssh_connections{host="127.0.0.1"}': 1,
        // The two dead-letter records; nothing else posts.
        'tasks_queue_requests_total{op="post",status="201"}': 2,
      };
      for (const [name, value] of Object.entries(expected)) {
        assert.equal(sample(metrics, name), value, `${name} in\n${metrics}`);
      }
      assert.equal(
        metrics.match(/^tasks_messages_total\{/gm)?.length,
        3,
        "no other outcome counted",
      );
      await checkMetrics(metrics);

      // Readiness follows the only host: down when its sshd stops, up again after.
      assert.equal((await get(`${base}/readyz`)).status, 200);
      await sshd.stop();
      let down = { status: 0, text: "" };
      await until("/readyz says 503", async () => {
        down = await get(`${base}/readyz`);
        return down.status === 503;
      });
      assert.match(down.text, /127\.0\.0\.1|ssh|host/i);
      assert.equal((await get(`${base}/healthz`)).status, 200);
      restarted = await startSshd({ dir: sshd.dir, port: sshd.port });
      await until(
        "/readyz says 200 again",
        async () => (await get(`${base}/readyz`)).status === 200,
      );
      const status = await worker.stop();
      assert.equal(status.code, 0, worker.lines.join("\n"));
    } finally {
      if (!worker.exited()) await worker.stop();
      await restarted?.stop();
      await sshd.stop();
      await Deno.remove(sshd.dir, { recursive: true });
    }
  },
});
