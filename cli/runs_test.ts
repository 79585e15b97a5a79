/**
 * `deno task runs` against a real worker's listener (started as `deno task
 * start` starts it, on a real sshd, its embedded queue over HTTP): the table,
 * one run's record with its output as the worker logs it, and what it says
 * for an unknown id, a wrong token and no worker at all.
 */
import assert from "node:assert/strict";
import {
  freePort,
  needs,
  type Sshd,
  sshdMissing,
  sshEnv,
  withSshd,
} from "../test/sshd.ts";
import { baseEnv, spawnCollecting, until } from "../test/support.ts";

const sshdTest = needs(sshdMissing(), "deno task runs with a real worker");

const TOKEN = "runs-cli-test-token-0123456789";

/** `deno task -q runs ARGS` with exactly `env`, to its end. */
async function runs(args: string[], env: Record<string, string>) {
  const cli = spawnCollecting("deno", ["task", "-q", "runs", ...args], env);
  await cli.child.status;
  const status = await cli.stop();
  return { code: status.code, text: cli.lines.join("\n") };
}

Deno.test({
  name:
    "deno task runs lists a worker's runs as a table and shows one with its output as the worker logs it; an unknown id, a wrong token or no worker exit 1 saying what to do",
  ...sshdTest,
  fn: () =>
    withSshd(async (sshd: Sshd) => {
      const httpPort = freePort();
      const mqPort = freePort();
      const listener = {
        TASK_HTTP_PORT: String(httpPort),
        TASK_HTTP_TOKEN: TOKEN,
      };
      const worker = spawnCollecting("deno", ["task", "start"], {
        ...baseEnv(sshd.dir),
        ...sshEnv(sshd),
        ...listener,
        MQ_DB: ":memory:",
        MQ_PORT: String(mqPort),
        TASK_RUNS_DB: `${sshd.dir}/runs.sqlite`,
        TASK_COMMAND: "echo hello; echo oops >&2; exit",
        TASK_MAX_ATTEMPTS: "1",
        TASK_POLL_WAIT: "1",
      });
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
          return (await response.json()).ids[0] as string;
        };
        const okId = await post('{"args": ["0"]}');
        const failId = await post('{"args": ["4"]}');
        await worker.line(new RegExp(`message ${failId}: moved to`));
        const env = { ...baseEnv(sshd.dir), ...listener };
        let listed = { code: -1, text: "" };
        await until(() => `both runs listed:\n${listed.text}`, async () => {
          listed = await runs(["list"], env);
          return /FAILURE/.test(listed.text) && /SUCCESS/.test(listed.text);
        });
        assert.equal(listed.code, 0, listed.text);
        const [head, ...rows] = listed.text.split("\n");
        assert.match(
          head,
          /^ID +TASK +STATUS +HOSTS +ATTEMPTS +STARTED +DURATION$/,
        );
        assert.equal(rows.length, 2);
        assert.match(
          rows[0],
          new RegExp(
            `^${failId} +TASK_COMMAND +FAILURE +127\\.0\\.0\\.1 +1 +\\d{4}-\\d\\d-\\d\\dT[\\d:]+Z +\\d`,
          ),
        );
        assert.match(rows[1], new RegExp(`^${okId} +TASK_COMMAND +SUCCESS `));

        const failures = await runs(["list", "--status", "failure"], env);
        assert.equal(failures.text.split("\n").length, 2, failures.text);
        assert.equal(
          (await runs(["list", "--since", "1h", "--limit", "1"], env)).text
            .split("\n").length,
          2,
        );

        const shown = await runs(["show", failId], env);
        assert.equal(shown.code, 0, shown.text);
        for (
          const line of [
            `run: ${failId}`,
            "status: FAILURE",
            "reason: exit status 4",
            "[127.0.0.1] out: hello",
            "[127.0.0.1] err: oops",
          ]
        ) {
          assert.ok(shown.text.includes(line), `${line} in:\n${shown.text}`);
        }
        assert.match(shown.text, /RUNNING\n.* FAILURE: exit status 4/);
        assert.match(shown.text, /\[127\.0\.0\.1\] exit: 4 \(\d+ ms\)/);

        const unknown = await runs(["show", "no-such-run"], env);
        assert.equal(unknown.code, 1);
        assert.match(
          unknown.text,
          /no run "no-such-run" in this worker's history/,
        );

        const wrong = await runs(["list"], {
          ...env,
          TASK_HTTP_TOKEN: "not-the-token-at-all-123",
        });
        assert.equal(wrong.code, 1);
        assert.match(
          wrong.text,
          /refused the token: set TASK_HTTP_TOKEN to the worker's/,
        );

        const bad = await runs(["list", "--status", "done"], env);
        assert.equal(bad.code, 2);
        assert.match(bad.text, /status=DONE: must be one of/);
      } finally {
        await worker.stop();
      }
      const gone = await runs(["list"], {
        ...baseEnv(sshd.dir),
        TASK_HTTP_PORT: String(httpPort),
      });
      assert.equal(gone.code, 1);
      assert.match(
        gone.text,
        new RegExp(
          `no worker listener at http://127\\.0\\.0\\.1:${httpPort} .*is the worker running with TASK_HTTP_PORT=${httpPort}\\?`,
        ),
      );
      const unset = await runs(["list"], baseEnv(sshd.dir));
      assert.equal(unset.code, 2);
      assert.match(unset.text, /TASK_HTTP_PORT: not set/);
    }),
});
