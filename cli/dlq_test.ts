/**
 * Tests of `deno task dlq` and the DeadLetters API under it: records written
 * by a real worker (over a real sshd) and by hand in the worker's format, read,
 * shown with secrets masked, requeued byte for byte, discarded and purged,
 * all over real HTTP against the embedded queue server.
 */
import assert from "node:assert/strict";
import { parseCatalog } from "../lib/catalog.ts";
import { DeadLetters, maskedBody } from "../lib/dead_letters.ts";
import { Secrets } from "../lib/log.ts";
import {
  freePort,
  needs,
  type Sshd,
  sshdMissing,
  sshEnv,
  withSshd,
} from "../test/sshd.ts";
import {
  baseEnv,
  REPO,
  spawnCollecting,
  startTestQueue,
  type TestQueue,
  until,
  withCatalogQueue,
} from "../test/support.ts";

const sshdTest = needs(sshdMissing(), "dlq tests with a real worker and sshd");

const SECRET = "s3cret-token-42";
const CATALOG = `
default: fail
tasks:
  fail:
    command: "echo oops >&2; exit 3"
    max_attempts: 1
  deploy:
    command: "printf '%s %s' {{version}} {{token}} >/dev/null; exit 4"
    max_attempts: 1
    params:
      version: {}
      token: {secret: true}
`;

/** What a dlq process printed, and how it ended. */
interface Ran {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs `deno task -q dlq ARGS` with exactly `env`, to its end. */
async function dlq(args: string[], env: Record<string, string>): Promise<Ran> {
  const output = await new Deno.Command("deno", {
    args: ["task", "-q", "dlq", ...args],
    env,
    clearEnv: true,
    cwd: REPO,
    stdin: "null",
  }).output();
  const decode = (bytes: Uint8Array) => new TextDecoder().decode(bytes);
  return {
    code: output.code,
    stdout: decode(output.stdout),
    stderr: decode(output.stderr),
  };
}

/** A folder with the catalog, a queue server, and the env that points at both. */
function withQueue(
  fn: (q: TestQueue, env: Record<string, string>, dir: string) => Promise<void>,
): Promise<void> {
  return withCatalogQueue(CATALOG, fn);
}

/** A record as the worker writes it (Settler.recordDeadLetter). */
function record(fields: Record<string, unknown>): string {
  return JSON.stringify({
    queue: "my_queue",
    id: "1",
    task: "fail",
    task_id: undefined,
    body: "hello",
    body_message_id: undefined,
    attempts: 1,
    reason: "exit status 3",
    exit_status: 3,
    stderr_tail: "oops\n",
    failed_at: "2026-11-27T14:33:35.249Z",
    ...fields,
  });
}

/** Posts raw messages to the dead-letter queue; resolves to their ids. */
function postDead(q: TestQueue, bodies: string[]): Promise<string[]> {
  return q.client.post("my_queue_failed", bodies);
}

Deno.test({
  name:
    "end to end: what the worker dead-letters, dlq lists, shows with secrets masked, and requeues to its queue byte for byte",
  ...sshdTest,
  fn: () =>
    withSshd(async (sshd: Sshd) => {
      await Deno.writeTextFile(`${sshd.dir}/tasks.yaml`, CATALOG);
      const q = await startTestQueue({}, "local", "my_queue");
      const env = {
        ...baseEnv(sshd.dir),
        MQ_PORT: new URL(q.server.url).port,
        TASKS_FILE: `${sshd.dir}/tasks.yaml`,
      };
      // Plain text (the default task, which fails): quotes, a tab, a
      // backslash, non-ASCII and a trailing newline must come back unchanged.
      const plain = 'hello "world"\t\\ ünïcødé ✓ \n';
      // Too large for one record: the worker posts it verbatim, then the
      // record naming it (body_message_id).
      const large = '"'.repeat(240_000);
      const deploy = JSON.stringify({
        task: "deploy",
        kwargs: { version: "v1.4.2", token: SECRET },
      });
      try {
        await q.post([plain, deploy]);
        const webhook = await fetch(
          `${q.server.url}/3/projects/local/queues/my_queue/webhook`,
          { method: "POST", body: large },
        );
        assert.equal(webhook.status, 201);
        await webhook.body?.cancel();

        const worker = spawnCollecting(
          "deno",
          ["run", "--allow-all", "tasks.ts"],
          {
            ...env,
            ...sshEnv(sshd),
            IRON_HOST: "127.0.0.1",
            IRON_PORT: env.MQ_PORT,
            IRON_SCHEME: "http",
            TASK_POLL_WAIT: "1",
          },
        );
        try {
          // Three records and the large body's own message.
          await until(
            () =>
              `4 messages in my_queue_failed; worker:\n${
                worker.lines.join("\n")
              }`,
            async () =>
              (await q.peek("my_queue_failed")).length === 4 &&
              (await q.size("my_queue")) === 0,
            60_000,
          );
        } finally {
          await worker.stop();
        }

        const listed = await dlq(["list"], env);
        assert.equal(listed.code, 0, listed.stderr);
        const lines = listed.stdout.trimEnd().split("\n");
        assert.match(lines[0], /^ID +FAILED AT +TASK +ATTEMPTS +REASON$/);
        assert.equal(
          lines.length,
          4,
          `the body message is not a row:\n${listed.stdout}`,
        );
        const row = (pattern: RegExp) => {
          const found = lines.find((l) => pattern.test(l));
          assert.ok(found, `${pattern} in:\n${listed.stdout}`);
          return found.split(/ {2,}/)[0];
        };
        const deployId = row(/ deploy +1 +exit status 4$/);
        const failIds = lines.slice(1).filter((l) =>
          / fail +1 +exit status 3$/.test(l)
        ).map((l) => l.split(/ {2,}/)[0]);
        assert.equal(failIds.length, 2, listed.stdout);
        assert.ok(!listed.stdout.includes(SECRET));

        const shown = await dlq(["show", deployId], env);
        assert.equal(shown.code, 0, shown.stderr);
        assert.ok(!(shown.stdout + shown.stderr).includes(SECRET));
        const deployRecord = JSON.parse(shown.stdout);
        assert.equal(deployRecord.queue, "my_queue");
        assert.equal(deployRecord.attempts, 1);
        assert.deepEqual(JSON.parse(deployRecord.body), {
          task: "deploy",
          kwargs: { version: "v1.4.2", token: "[redacted]" },
        });

        // Which fail record is which: show gives the body (the large one
        // from its own message).
        const bodies = new Map<string, string>();
        for (const id of failIds) {
          const one = await dlq(["show", id], env);
          assert.equal(one.code, 0, one.stderr);
          const r = JSON.parse(one.stdout);
          bodies.set(r.body, id);
          if (r.body === large) assert.match(r.body_message_id, /^\d+$/);
        }
        assert.deepEqual([...bodies.keys()].sort(), [large, plain].sort());

        const requeued = await dlq(
          ["requeue", bodies.get(plain)!, bodies.get(large)!],
          env,
        );
        assert.equal(requeued.code, 0, requeued.stderr);
        const newIds = [...requeued.stdout.matchAll(
          /^requeued \d+ to my_queue: new message (\d+)$/gm,
        )].map((m) => m[1]);
        assert.equal(newIds.length, 2, requeued.stdout);

        const back = await q.peek("my_queue");
        assert.deepEqual(back.map((m) => m.id), newIds);
        const bytes = (s: string) => new TextEncoder().encode(s);
        assert.deepEqual(bytes(back[0].body), bytes(plain));
        assert.deepEqual(bytes(back[1].body), bytes(large));
        // Both records are gone, and the large body's message with its record.
        assert.deepEqual(
          (await q.peek("my_queue_failed")).map((m) => m.id),
          [deployId],
        );

        const discarded = await dlq(["discard", deployId], env);
        assert.equal(discarded.code, 0, discarded.stderr);
        const empty = await dlq(["list"], env);
        assert.equal(empty.stdout.trim(), "no dead letters in my_queue_failed");
      } finally {
        await q.close();
      }
    }),
});

Deno.test("dlq: a record whose body is in its own message is shown and requeued with that body, and both messages go", () =>
  withQueue(async (q, env) => {
    const body = "a body too large for its record\n";
    const [bodyId] = await q.client.postVerbatim("my_queue_failed", body);
    const [recordId] = await postDead(q, [
      record({ body: undefined, body_message_id: bodyId }),
    ]);

    const listed = await dlq(["list"], env);
    assert.equal(listed.code, 0, listed.stderr);
    assert.equal(listed.stdout.trimEnd().split("\n").length, 2, listed.stdout);
    assert.match(listed.stdout, new RegExp(`^${recordId} `, "m"));

    const shown = await dlq(["show", recordId], env);
    assert.equal(shown.code, 0, shown.stderr);
    const view = JSON.parse(shown.stdout);
    assert.equal(view.body, body);
    assert.equal(view.body_message_id, bodyId);

    const requeued = await dlq(["requeue", recordId], env);
    assert.equal(requeued.code, 0, requeued.stderr);
    assert.match(
      requeued.stdout,
      /^requeued \d+ to my_queue: new message \d+$/m,
    );
    assert.deepEqual((await q.peek("my_queue")).map((m) => m.body), [body]);
    assert.equal(await q.size("my_queue_failed"), 0);
  }));

Deno.test("dlq show masks secret parameters, also for an unknown task or a secret escaped in the JSON", () =>
  withQueue(async (q, env) => {
    const escaped = `{"task":"deploy","kwargs":{"version":"v2","token":"${
      [...SECRET].map((c) =>
        `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`
      )
        .join("")
    }"}}`;
    const ids = await postDead(q, [
      record({
        task: "deploy",
        body: JSON.stringify({ task: "deploy", args: ["v1", SECRET] }),
      }),
      record({ task: "deploy", body: escaped }),
      // A typo in the task's name: any task's secret parameter is masked.
      record({
        task: "deplyo",
        body: JSON.stringify({ task: "deplyo", kwargs: { token: SECRET } }),
      }),
      // Not JSON at all, with secret parameters in the catalog: not shown.
      record({ body: `{"task":"deploy","args":["v1","${SECRET}"],}` }),
    ]);
    const bodies: string[] = [];
    for (const id of ids) {
      const shown = await dlq(["show", id], env);
      assert.equal(shown.code, 0, shown.stderr);
      assert.ok(!shown.stdout.includes(SECRET), shown.stdout);
      assert.ok(!shown.stdout.includes("\\u0073\\u0033"), shown.stdout);
      bodies.push(JSON.parse(shown.stdout).body);
    }
    assert.deepEqual(JSON.parse(bodies[0]).args, ["v1", "[redacted]"]);
    assert.deepEqual(JSON.parse(bodies[1]).kwargs, {
      version: "v2",
      token: "[redacted]",
    });
    assert.deepEqual(JSON.parse(bodies[2]).kwargs, { token: "[redacted]" });
    assert.match(bodies[3], /^\[not shown: /);
  }));

Deno.test("maskedBody: the body as sent when nothing in it is secret; the worker's own secrets masked in any body", () => {
  const catalog = parseCatalog("tasks.yaml", CATALOG, {
    timeoutMs: 0,
    maxAttempts: 5,
    host: { user: "op", port: 22, jump: [] },
  }).catalog;
  const secrets = new Secrets(["iron-token-123"]);
  const spaced = '{ "task": "deploy",  "kwargs": {"version": "v3"} }';
  assert.equal(maskedBody(spaced, catalog, secrets), spaced);
  assert.equal(
    maskedBody("plain iron-token-123 text", catalog, secrets),
    "plain [redacted] text",
  );
  assert.equal(
    maskedBody(`{"args":["x","${SECRET}"]}`, undefined, secrets),
    `{"args":["x","${SECRET}"]}`,
    "without a catalog nothing is known to be secret",
  );
});

Deno.test("dlq: an id that names no message exits 1 and says how to see the ids", () =>
  withQueue(async (q, env) => {
    await postDead(q, [record({})]);
    for (
      const args of [["show", "999"], ["requeue", "999"], ["discard", "../x"]]
    ) {
      const ran = await dlq(args, env);
      assert.equal(ran.code, 1, `${args}: ${ran.stderr}`);
      assert.match(
        ran.stderr,
        /^dlq: no message "(999|\.\.\/x)" in my_queue_failed/m,
      );
      assert.match(ran.stderr, /deno task dlq list/);
    }
    assert.equal(await q.size("my_queue_failed"), 1, "nothing deleted");
    assert.equal(await q.size("my_queue"), 0, "nothing requeued");
  }));

Deno.test("dlq: a message that is not a record is listed as such, and requeue refuses it with exit 1", () =>
  withQueue(async (q, env) => {
    const [id] = await postDead(q, ["someone posted this here"]);
    const listed = await dlq(["list"], env);
    assert.match(
      listed.stdout,
      new RegExp(`^${id} .*\\(not a dead-letter record\\)$`, "m"),
    );
    const ran = await dlq(["requeue", id], env);
    assert.equal(ran.code, 1);
    assert.match(ran.stderr, /is not a dead-letter record/);
    assert.equal(await q.size("my_queue"), 0);
    const discarded = await dlq(["discard", id], env);
    assert.equal(discarded.code, 0, discarded.stderr);
    assert.equal(await q.size("my_queue_failed"), 0);
  }));

Deno.test("dlq: an unknown command or a bad command line prints the usage with exit 2; --help exits 0", async () => {
  const env = baseEnv(Deno.cwd());
  for (
    const args of [[], ["bogus"], ["show"], ["show", "1", "2"], ["requeue"], [
      "requeue",
      "--all",
      "3",
    ], ["list", "--yes"]]
  ) {
    const ran = await dlq(args, env);
    assert.equal(ran.code, 2, `${args}: ${ran.stderr}`);
    assert.match(ran.stderr, /^dlq: /);
    assert.match(ran.stderr, /^Usage: deno task dlq <command>/m);
  }
  const help = await dlq(["--help"], env);
  assert.equal(help.code, 0);
  assert.match(help.stdout, /^ {2}requeue --all /m);
});

Deno.test("dlq purge says how many and deletes nothing without --yes (exit 2); with --yes it empties the queue", () =>
  withQueue(async (q, env) => {
    await postDead(q, [record({}), record({ id: "2" }), "stray"]);
    const asked = await dlq(["purge"], env);
    assert.equal(asked.code, 2);
    assert.match(
      asked.stderr,
      /my_queue_failed holds 3 message\(s\); nothing deleted: run deno task dlq purge --yes/,
    );
    assert.equal(await q.size("my_queue_failed"), 3);
    const purged = await dlq(["purge", "--yes"], env);
    assert.equal(purged.code, 0, purged.stderr);
    assert.equal(
      purged.stdout.trim(),
      "purged 3 message(s) from my_queue_failed",
    );
    assert.equal(await q.size("my_queue_failed"), 0);
    const again = await dlq(["purge", "--yes"], env);
    assert.equal(
      again.stdout.trim(),
      "purged 0 message(s) from my_queue_failed",
    );
  }));

Deno.test("dlq requeue --all moves every record there when it starts, past the 100 that one peek shows, and none that failed since", () =>
  withQueue(async (q, env) => {
    const bodies = Array.from({ length: 150 }, (_, i) => `job ${i}`);
    await postDead(q, bodies.slice(0, 100).map((body) => record({ body })));
    // As a requeued message that failed again, while the worker runs, comes back.
    await postDead(q, [
      record({ body: "failed again", failed_at: "2999-01-01T00:00:00.000Z" }),
    ]);
    await postDead(q, bodies.slice(100).map((body) => record({ body })));
    const ran = await dlq(["requeue", "--all"], env);
    assert.equal(ran.code, 0, ran.stderr);
    assert.equal(ran.stdout.trimEnd().split("\n").length, 150);
    assert.equal(await q.size("my_queue_failed"), 1);
    const back = [
      ...await q.peek("my_queue"),
    ];
    assert.equal(await q.size("my_queue"), 150);
    assert.deepEqual(back.map((m) => m.body), bodies.slice(0, 100));
  }));

Deno.test("dlq with no queue server there exits 1 and says what to start", async () => {
  const env = { ...baseEnv(Deno.cwd()), MQ_PORT: String(freePort()) };
  const ran = await dlq(["list"], env);
  assert.equal(ran.code, 1);
  assert.match(
    ran.stderr,
    /No queue server at http:\/\/127\.0\.0\.1:\d+: .*deno task start/,
  );
});

Deno.test("DeadLetters: a missing queue lists nothing; a body the webhook would change (a leading byte order mark) is requeued unchanged; a gone body message is a clear error", async () => {
  const q = await startTestQueue({}, "local", "my_queue");
  try {
    const letters = new DeadLetters(q.client, "my_queue_failed");
    assert.deepEqual(await letters.list(), []);
    assert.equal(await letters.purge(), 0);
    assert.equal(await letters.get("1"), undefined);

    const odd = [
      "\uFEFFstarts with a byte order mark",
      "CR LF\r\nand trailing spaces  \r\n",
    ];
    const [bom, crlf, gone] = await postDead(q, [
      ...odd.map((body) => record({ body })),
      record({ body: undefined, body_message_id: "77" }),
    ]);
    const listed = await letters.list(2);
    assert.deepEqual(listed.map((l) => l.id), [bom, crlf]);
    assert.equal(listed[0].record?.body, odd[0]);
    for (const id of [bom, crlf]) await letters.requeue(id);
    assert.deepEqual((await q.peek("my_queue")).map((m) => m.body), odd);

    await assert.rejects(
      letters.requeue(gone),
      /record \d+'s body, message 77 in my_queue_failed, is gone: nothing requeued; discard the record/,
    );
    assert.equal(await q.size("my_queue"), 2, "nothing more posted");
    await letters.discard(gone);
    assert.equal(await q.size("my_queue_failed"), 0);
  } finally {
    await q.close();
  }
});
