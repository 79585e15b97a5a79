/**
 * Webhooks (issue 20) end to end: a real worker, started as `deno task start`
 * starts it, with its embedded queue and a real sshd running the task; the
 * requests signed in the test as GitHub documents it (X-Hub-Signature-256:
 * `sha256=` and the hex HMAC-SHA256 of the raw body, keyed with the secret).
 * Each refusal is checked to have posted nothing (the queue's total count),
 * and what ran is read from the file the task writes.
 */
import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
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

const GH_SECRET = "gh-secret-for-the-test-0123456789";
const GL_TOKEN = "gl-token-for-the-test-0123456789";
const ALERT_SECRET = "alert-secret-for-the-test-01234";
const HTTP_TOKEN = "listener-token-0123456789abcdef";

function catalogText(dir: string): string {
  return `
tasks:
  checkout:
    command: ${dir}/record.sh {{repo}} {{sha}}
    params:
      sha: {pattern: "[0-9a-f]{40}"}
      repo: {pattern: "[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+"}
  note:
    command: ${dir}/record.sh note {{what}}
    params:
      what: {pattern: "[a-z0-9]+"}
hooks:
  github:
    task: checkout
    verify: {github: {secret_env: GH_SECRET}}
    when:
      header: {X-GitHub-Event: push}
      body: {ref: refs/heads/main}
    params: {sha: after, repo: repository.full_name}
    dedupe_header: X-GitHub-Delivery
  gitlab:
    task: checkout
    verify: {gitlab: {token_env: GL_TOKEN}}
    params: {sha: checkout_sha, repo: project.path_with_namespace}
  alert256:
    task: note
    verify: {hmac: {secret_env: ALERT_SECRET, header: X-Signature, algorithm: sha256, prefix: "sha256="}}
    params: {what: labels.service}
  alert512:
    task: note
    verify: {hmac: {secret_env: ALERT_SECRET, header: X-Sig, algorithm: sha512}}
    params: {what: labels.service}
`;
}

const sign = (algorithm: string, secret: string, body: string | Uint8Array) =>
  createHmac(algorithm, secret).update(body).digest("hex");

const sha = (n: number) => n.toString(16).padStart(40, "0");

function push(n: number, ref = "refs/heads/main", after = sha(n)): string {
  return JSON.stringify({
    ref,
    after,
    repository: { full_name: "acme/app", private: false },
    pusher: { name: "someone" },
  });
}

interface Answer {
  status: number;
  json: Record<string, unknown>;
}

/** A raw HTTP/1.1 exchange: what fetch will not send (any Host, huge headers, `..`). */
async function rawStatus(port: number, request: string): Promise<string> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  try {
    await conn.write(new TextEncoder().encode(request));
    const chunks: string[] = [];
    const buffer = new Uint8Array(64 * 1024);
    for (;;) {
      let n: number | null;
      try {
        n = await conn.read(buffer);
      } catch {
        break; // reset: the server hung up
      }
      if (n === null) break;
      chunks.push(new TextDecoder().decode(buffer.subarray(0, n)));
      if (chunks.join("").includes("\r\n\r\n")) break;
    }
    return chunks.join("").split("\r\n")[0];
  } finally {
    conn.close();
  }
}

Deno.test({
  name:
    "webhooks: a real worker runs a signed GitHub push with its mapped parameters, refuses the rest without posting, and answers 1,000 at once each once",
  ...needs(
    toolMissing(PROMTOOL, "prometheus") ?? sshdMissing(),
    "webhooks into a real worker",
  ),
  async fn() {
    const sshd: Sshd = await startSshd();
    const out = `${sshd.dir}/out`;
    await Deno.mkdir(out);
    await Deno.chmod(out, 0o777);
    await Deno.writeTextFile(
      `${sshd.dir}/record.sh`,
      `#!/bin/sh\nprintf '%s %s\\n' "$1" "$2" >> ${out}/runs.txt\n`,
    );
    await Deno.chmod(`${sshd.dir}/record.sh`, 0o755);
    await Deno.writeTextFile(`${sshd.dir}/tasks.yaml`, catalogText(sshd.dir));
    const httpPort = freePort();
    const mqPort = freePort();
    const base = `http://127.0.0.1:${httpPort}`;
    const mq = `http://127.0.0.1:${mqPort}/3/projects/local/queues`;
    const worker = spawnCollecting("deno", ["task", "start"], {
      ...baseEnv(sshd.dir),
      ...sshEnv(sshd),
      MQ_DB: ":memory:",
      MQ_PORT: String(mqPort),
      TASK_HTTP_PORT: String(httpPort),
      TASK_HTTP_TOKEN: HTTP_TOKEN,
      TASKS_FILE: `${sshd.dir}/tasks.yaml`,
      TASK_POLL_WAIT: "1",
      GH_SECRET,
      GL_TOKEN,
      ALERT_SECRET,
    });
    const runs = async () => {
      try {
        return (await Deno.readTextFile(`${out}/runs.txt`)).split("\n")
          .filter((l) => l !== "");
      } catch {
        return [];
      }
    };
    const posted = async (queue = "my_queue") => {
      const reply = await fetch(`${mq}/${queue}`);
      const info = await reply.json();
      return reply.status === 404 ? 0 : info.queue.total_messages as number;
    };
    const hook = async (
      name: string,
      body: string | Uint8Array<ArrayBuffer>,
      headers: Record<string, string>,
    ): Promise<Answer> => {
      const response = await fetch(`${base}/hooks/${name}`, {
        method: "POST",
        headers: { "Content-Type": "application/json", ...headers },
        body,
      });
      return { status: response.status, json: await response.json() };
    };
    const github = (
      body: string,
      event = "push",
      delivery: string = crypto.randomUUID(),
      signature = `sha256=${sign("sha256", GH_SECRET, body)}`,
    ) =>
      hook("github", body, {
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery,
        "X-Hub-Signature-256": signature,
      });
    /** Asserts that `fn` answers `status` and posts nothing. */
    const refused = async (
      what: string,
      fn: () => Promise<Answer>,
      status: number,
      check: (json: Record<string, unknown>) => void = () => {},
    ) => {
      const before = await posted();
      const answer = await fn();
      assert.equal(answer.status, status, `${what}: ${JSON.stringify(answer)}`);
      check(answer.json);
      assert.equal(await posted(), before, `${what}: posted nothing`);
      return answer;
    };
    try {
      await worker.line(/web: listening on /);

      // A signed push: 202 with the run id, run with the mapped parameters.
      const delivery = crypto.randomUUID();
      const first = await github(push(1), "push", delivery);
      assert.equal(first.status, 202, JSON.stringify(first));
      assert.match(String(first.json.id), /^[0-9a-f-]{36}$/);
      assert.match(String(first.json.message_id), /^\d+$/);
      await until("the push ran", async () => (await runs()).length === 1);
      assert.deepEqual(await runs(), [`acme/app ${sha(1)}`]);
      assert.equal(await posted(), 1);
      await worker.line(
        new RegExp(`hook github: 202 accepted: run ${first.json.id}`),
      );

      // Refused, each with nothing posted.
      const body = push(2);
      const good = sign("sha256", GH_SECRET, body);
      await refused(
        "wrong signature",
        () =>
          github(
            body,
            "push",
            undefined,
            `sha256=${sign("sha256", "x", body)}`,
          ),
        401,
      );
      await refused("missing signature", () =>
        hook("github", body, {
          "X-GitHub-Event": "push",
          "X-GitHub-Delivery": crypto.randomUUID(),
        }), 401);
      await refused(
        "truncated signature",
        () => github(body, "push", undefined, `sha256=${good.slice(0, -2)}`),
        401,
      );
      await refused(
        "signature of another body",
        () => github(push(3), "push", undefined, `sha256=${good}`),
        401,
      );
      await refused(
        "another event",
        () => github(body, "ping"),
        200,
        (json) => assert.match(String(json.ignored), /x-github-event/i),
      );
      await refused(
        "another branch",
        () => github(push(2, "refs/heads/dev")),
        200,
        (json) => assert.match(String(json.ignored), /ref .*refs\/heads\/dev/),
      );
      await refused(
        "a parameter breaking its pattern",
        () => github(push(2, "refs/heads/main", "$(reboot)")),
        422,
        (json) => assert.match(String(json.error), /parameter sha/),
      );
      await refused(
        "a repeated delivery id",
        () => github(push(1), "push", delivery),
        200,
        (json) => {
          assert.equal(json.duplicate, delivery);
          assert.equal(json.id, first.json.id);
        },
      );
      const huge = new Uint8Array(2 * 1024 * 1024).fill(0x20);
      await refused("a 2 MiB body", () =>
        hook("github", huge, {
          "X-GitHub-Event": "push",
          "X-Hub-Signature-256": `sha256=${sign("sha256", GH_SECRET, huge)}`,
        }), 413);
      await refused("an unknown hook", () => hook("nope", body, {}), 404);
      // Bad input: answered, and the listener and worker carry on.
      const signed = (text: string, type = "application/json") =>
        hook("github", text, {
          "Content-Type": type,
          "X-GitHub-Event": "push",
          "X-Hub-Signature-256": `sha256=${sign("sha256", GH_SECRET, text)}`,
        });
      await refused("malformed JSON", () => signed('{"ref": '), 400);
      await refused("a JSON list", () => signed("[1, 2]"), 400);
      await refused("a JSON string", () => signed('"push"'), 400);
      await refused("text/plain", () => signed(push(2), "text/plain"), 415);
      const bigHeader = await rawStatus(
        httpPort,
        `POST /hooks/github HTTP/1.1\r\nHost: x\r\nX-Big: ${
          "a".repeat(200_000)
        }\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}`,
      );
      // Deno's server answers 400 past its header limit (about 64 KiB), unread.
      assert.match(bigHeader, /^HTTP\/1\.1 4\d\d /);
      assert.equal((await fetch(`${base}/healthz`)).status, 200);

      // GitLab's token, and the generic HMAC with sha256 and with sha512.
      const gitlab = JSON.stringify({
        checkout_sha: sha(4),
        project: { path_with_namespace: "acme/lab" },
      });
      assert.equal(
        (await hook("gitlab", gitlab, { "X-Gitlab-Token": GL_TOKEN })).status,
        202,
      );
      await refused(
        "a wrong GitLab token",
        () => hook("gitlab", gitlab, { "X-Gitlab-Token": `${GL_TOKEN}x` }),
        401,
      );
      const alert = JSON.stringify({ labels: { service: "web" } });
      assert.equal(
        (await hook("alert256", alert, {
          "X-Signature": `sha256=${sign("sha256", ALERT_SECRET, alert)}`,
        })).status,
        202,
      );
      const alert2 = JSON.stringify({ labels: { service: "db" } });
      assert.equal(
        (await hook("alert512", alert2, {
          "X-Sig": sign("sha512", ALERT_SECRET, alert2),
        })).status,
        202,
      );
      await refused(
        "sha256 where sha512 is due",
        () =>
          hook("alert512", alert2, {
            "X-Sig": sign("sha256", ALERT_SECRET, alert2),
          }),
        401,
      );
      await until("the three ran", async () => (await runs()).length === 4);
      assert.deepEqual((await runs()).slice(1).sort(), [
        `acme/lab ${sha(4)}`,
        "note db",
        "note web",
      ]);

      // The listener's other paths still need the bearer token; the hook's
      // path opens nothing else, whatever the Host.
      assert.equal((await fetch(`${base}/metrics`)).status, 401);
      assert.equal(
        (await fetch(`${base}/api/dead-letters/1/requeue`, { method: "POST" }))
          .status,
        401,
      );
      assert.match(
        await rawStatus(
          httpPort,
          "GET /hooks/../metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        ),
        /^HTTP\/1\.1 401/,
      );
      assert.match(
        await rawStatus(
          httpPort,
          `POST /hooks/gitlab HTTP/1.1\r\nHost: hooks.example.org\r\nX-Gitlab-Token: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}`,
        ),
        /^HTTP\/1\.1 401/,
        "any Host reaches the hook, which checks its token",
      );

      // 1,000 at once: a mix of accepted, refused, ignored, invalid and
      // duplicated deliveries (pairs sharing one id: exactly one posts).
      const before = await posted();
      const ran = (await runs()).length;
      const requests = Array.from({ length: 1000 }, (_, i) => {
        const n = 1000 + i;
        switch (i % 5) {
          case 0:
            return github(push(n), "push", undefined, "sha256=00");
          case 1:
            return github(push(n, "refs/heads/dev"));
          case 2:
            return github(push(n, "refs/heads/main", "-x"));
          default: {
            const pair = 1000 + i - (i % 5 === 4 ? 1 : 0);
            return github(push(pair), "push", `pair-${pair}`);
          }
        }
      });
      const answers = await Promise.all(requests);
      const statuses = new Map<number, number>();
      for (const a of answers) {
        statuses.set(a.status, (statuses.get(a.status) ?? 0) + 1);
      }
      const accepted = answers.filter((a) => a.status === 202);
      assert.deepEqual(
        Object.fromEntries(statuses),
        { 401: 200, 200: 400, 422: 200, 202: 200 },
      );
      assert.equal(
        answers.filter((a) => a.json.duplicate !== undefined).length,
        200,
      );
      assert.equal(new Set(accepted.map((a) => a.json.id)).size, 200);
      assert.equal(await posted(), before + 200);
      await until(
        "the 200 accepted ran",
        async () => (await runs()).length === ran + 200,
        60_000,
      );
      const lines = (await runs()).slice(ran);
      assert.equal(new Set(lines).size, 200, "each ran once");
      const pairs = Array.from({ length: 200 }, (_, k) => 1003 + 5 * k);
      assert.deepEqual(
        lines.sort(),
        pairs.map((p) => `acme/app ${sha(p)}`).sort(),
      );
      assert.equal(await posted("my_queue_failed"), 0, "nothing dead-lettered");

      // Counted, by hook and outcome, behind the token.
      const metrics = await (await fetch(`${base}/metrics`, {
        headers: { Authorization: `Bearer ${HTTP_TOKEN}` },
      })).text();
      const count = (hook: string, outcome: string) =>
        sample(
          metrics,
          `tasks_hook_requests_total{hook="${hook}",outcome="${outcome}"}`,
        );
      assert.equal(count("github", "accepted"), 201);
      assert.equal(count("github", "duplicate"), 201);
      assert.equal(count("(unknown)", "unknown_hook"), 1);
      assert.equal(count("alert512", "unauthorized"), 1);
      await checkMetrics(metrics);
      // No secret in the log.
      const log = worker.lines.join("\n");
      for (const secret of [GH_SECRET, GL_TOKEN, ALERT_SECRET, HTTP_TOKEN]) {
        assert.ok(!log.includes(secret), "a secret in the log");
      }
      const status = await worker.stop();
      assert.equal(status.code, 0, worker.lines.slice(-20).join("\n"));
    } finally {
      if (!worker.exited()) await worker.stop();
      await sshd.stop();
      await Deno.remove(sshd.dir, { recursive: true });
    }
  },
});
