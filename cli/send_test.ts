import assert from "node:assert/strict";
import { parseCatalog } from "../lib/catalog.ts";
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
  type TestQueue,
  withCatalogQueue,
} from "../test/support.ts";

/** Tests that need OpenSSH (sshd, ssh-keygen): skipped with a reason, or failing under CI. */
const sshdTest = needs(sshdMissing(), "send tests with a real sshd");

const CATALOG = `
default: hello
tasks:
  hello:
    command: echo hello from the default task
  fail:
    command: "echo about to fail; echo oops >&2; exit 3"
    max_attempts: 1
  greet:
    description: Greets someone
    command: "printf 'hi %s, %s times, loud=%s, token %s\\\\n' {{name}} {{times}} {{loud}} {{token}}"
    params:
      name: {enum: [ann, bob], description: who}
      times: {type: integer, min: 1, max: 3}
      loud: {type: boolean, default: false}
      token: {secret: true}
`;
const SECRET = "s3cret-token-42";

/** What a sender's process showed, and how it ended. */
interface Sent {
  code: number;
  lines: string[];
  text: string;
}

/** The send task's command line (deno.json), to run it from another folder. */
const SEND_TASK: string[] = JSON.parse(
  Deno.readTextFileSync(`${REPO}deno.json`),
).tasks.send.split(" ").map((arg: string) =>
  arg === "cli/send.ts" ? `${REPO}${arg}` : arg
);

/** Starts the sender: `deno task send` by default, else the task's command line in `cwd`. */
function startSender(
  args: string[],
  env: Record<string, string>,
  cwd?: string,
) {
  return cwd === undefined
    ? spawnCollecting("deno", ["task", "send", ...args], env)
    : spawnCollecting(SEND_TASK[0], [...SEND_TASK.slice(1), ...args], env, cwd);
}

/** Runs the sender to its end. */
async function send(
  args: string[],
  env: Record<string, string>,
  cwd?: string,
): Promise<Sent> {
  const sender = startSender(args, env, cwd);
  await sender.child.status;
  const status = await sender.stop();
  return {
    code: status.code,
    lines: sender.lines,
    text: sender.lines.join("\n"),
  };
}

/** A folder with the catalog, a queue server, and the env that points at both. */
function withQueue(
  fn: (q: TestQueue, env: Record<string, string>, dir: string) => Promise<void>,
): Promise<void> {
  return withCatalogQueue(CATALOG, fn);
}

/** The reply queue a waiting sender named. */
function replyQueueOf(sent: Sent): string {
  const match = /for its result on (reply_[0-9a-f]{12})/.exec(sent.text);
  assert.ok(match, sent.text);
  return match[1];
}

Deno.test({
  name:
    "end to end: deno task send --wait passes the remote exit status through, with the output as the worker logs it",
  ...sshdTest,
  fn: () =>
    withSshd(async (sshd: Sshd) => {
      // Not tasks.yaml: a sender started in this folder finds no catalog.
      await Deno.writeTextFile(`${sshd.dir}/catalog.yaml`, CATALOG);
      const port = freePort();
      const env = {
        ...baseEnv(sshd.dir),
        MQ_PORT: String(port),
        TASKS_FILE: `${sshd.dir}/catalog.yaml`,
      };
      const worker = spawnCollecting(
        "deno",
        ["run", "--allow-all", "tasks.ts"],
        { ...env, ...sshEnv(sshd), MQ_DB: ":memory:" },
      );
      const queueUrl = `http://127.0.0.1:${port}/3/projects/local/queues`;
      try {
        await worker.line(/^worker: queue my_queue at /);

        const failed = await send(["fail", "--wait=60"], env);
        assert.equal(failed.code, 3, failed.text);
        const out = failed.lines.indexOf("[127.0.0.1] out: about to fail");
        const err = failed.lines.indexOf("[127.0.0.1] err: oops");
        const exit = failed.lines.findIndex((l) =>
          /^\[127\.0\.0\.1\] exit: 3 \(message \d+, \d+ ms\)$/.test(l)
        );
        assert.ok(out >= 0 && out < err && err < exit, failed.text);
        assert.match(
          failed.text,
          /^FAILURE after 1 attempt\(s\): exit status 3$/m,
        );
        const gone = await fetch(`${queueUrl}/${replyQueueOf(failed)}`);
        assert.equal(gone.status, 404, "the reply queue is removed");
        await gone.body?.cancel();

        // Typed from the command line by the catalog: times and loud are not strings.
        const greeted = await send(
          [
            "greet",
            "ann",
            "times=2",
            "loud=true",
            `token=${SECRET}`,
            "--wait=60",
          ],
          env,
        );
        assert.equal(greeted.code, 0, greeted.text);
        assert.ok(
          greeted.lines.includes(
            "[127.0.0.1] out: hi ann, 2 times, loud=true, token [redacted]",
          ),
          greeted.text,
        );
        assert.match(greeted.text, /^\[127\.0\.0\.1\] exit: 0 \(message \d+/m);
        // deno task echoes its command line ("Task send ..."); send itself never shows it.
        const own = greeted.lines.filter((l) => !l.startsWith("Task send "));
        assert.ok(!own.join("\n").includes(SECRET), greeted.text);

        // Without the catalog the sender cannot check; the worker refuses.
        const { TASKS_FILE: _, ...noCatalog } = env;
        const unchecked = await send(
          ["greet", "carol", "times=2", "token=x", "--wait=60"],
          noCatalog,
          sshd.dir,
        );
        assert.equal(unchecked.code, 1, unchecked.text);
        assert.match(unchecked.text, /^values not checked: no catalog here/m);
        assert.match(
          unchecked.text,
          /^REJECTED: task greet: parameter name: "carol" must be one of ann, bob$/m,
        );

        // A plain body runs the default task.
        const plain = await send(["--text", "hello world!"], env);
        assert.equal(plain.code, 0, plain.text);
        assert.ok(plain.lines.some((l) => /^\d+$/.test(l)), plain.text);
        await worker.line(
          /^\[127\.0\.0\.1\] out: hello from the default task$/,
        );
      } finally {
        await worker.stop();
      }
    }),
});

Deno.test("send: a value the catalog refuses, or an unknown task, exits 2 with the worker's reason and posts nothing", () =>
  withQueue(async (q, env, dir) => {
    const cases: [string[], RegExp][] = [
      [
        ["greet", "carol", "times=2", `token=${SECRET}`],
        /^send: not posted: task greet: parameter name: "carol" must be one of ann, bob$/m,
      ],
      [
        ["greet", "ann", "times=two", `token=${SECRET}`],
        /^send: not posted: task greet: parameter times: "two" must be an integer, not string "two"$/m,
      ],
      [
        ["greet", "ann", "times=9", `token=${SECRET}`],
        /^send: not posted: task greet: parameter times: 9 must be at most 3$/m,
      ],
      [
        ["greet", "bob", "times=1", "token=-x"],
        /^send: not posted: task greet: parameter token \(secret, value not shown\) starts with "-"/m,
      ],
      [
        ["greet", "ann"],
        /^send: not posted: task greet: parameter times is required$/m,
      ],
      [
        ["restart", "nginx"],
        /^send: not posted: unknown task "restart" \(.*tasks\.yaml has: hello, fail, greet\)$/m,
      ],
    ];
    for (const [args, reason] of cases) {
      const sent = await send(args, env, dir);
      assert.equal(sent.code, 2, sent.text);
      assert.match(sent.text, reason);
      assert.ok(!sent.text.includes(SECRET), sent.text);
    }
    assert.equal((await q.info()).total_messages, 0, "nothing was posted");
  }));

Deno.test("send: a task message is Celery's, its values typed by the catalog; stdout is the message id", () =>
  withQueue(async (q, env, dir) => {
    const before = Date.now();
    const sent = await send(
      [
        "greet",
        "ann",
        "times=3",
        "loud=true",
        `token=${SECRET}`,
        "--delay",
        "60",
      ],
      { ...env, USER: "deployer" },
      dir,
    );
    assert.equal(sent.code, 0, sent.text);
    const [message] = await q.peek();
    assert.deepEqual(sent.lines.filter((l) => /^\d+$/.test(l)), [message.id]);
    const body = JSON.parse(message.body);
    assert.match(body.id, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-/);
    assert.deepEqual(
      { ...body, id: undefined, eta: undefined },
      {
        id: undefined,
        task: "greet",
        args: ["ann"],
        kwargs: { times: 3, loud: true, token: SECRET },
        retries: 0,
        eta: undefined,
        expires: null,
        reply_to: null,
        sender: `deployer@${Deno.hostname()}`,
      },
    );
    const eta = Date.parse(body.eta);
    assert.ok(eta >= before + 60_000 && eta <= Date.now() + 60_000, body.eta);
    assert.match(sent.text, new RegExp(`^it runs from ${body.eta}$`, "m"));
    assert.ok(!sent.text.includes(SECRET), sent.text);
  }));

Deno.test("send: without a catalog the values go as strings, and it says they were not checked", () =>
  withQueue(async (q, env, dir) => {
    const { TASKS_FILE: _, ...noCatalog } = env;
    await Deno.remove(`${dir}/tasks.yaml`);
    const sent = await send(
      ["anything", "7", "x=true", "--eta", "2026-11-27T15:00:00+01:00"],
      noCatalog,
      dir,
    );
    assert.equal(sent.code, 0, sent.text);
    assert.match(sent.text, /^values not checked: no catalog here/m);
    const body = JSON.parse((await q.peek())[0].body);
    assert.deepEqual(
      [body.task, body.args, body.kwargs, body.eta],
      ["anything", ["7"], { x: "true" }, "2026-11-27T14:00:00.000Z"],
    );
  }));

Deno.test("send --text posts the body as it is and prints its id", () =>
  withQueue(async (q, env, dir) => {
    const sent = await send(["--text", "hello world!"], env, dir);
    assert.equal(sent.code, 0, sent.text);
    const [message] = await q.peek();
    assert.equal(message.body, "hello world!");
    assert.deepEqual(sent.lines, [message.id]);
  }));

Deno.test("send --help lists the catalog's tasks, their commands and their parameters' rules", async () => {
  const dir = await Deno.makeTempDir({ prefix: "send-test-" });
  try {
    await Deno.writeTextFile(`${dir}/tasks.yaml`, CATALOG);
    // No TASKS_FILE: ./tasks.yaml where send starts.
    const sent = await send(["--help"], baseEnv(dir), dir);
    assert.equal(sent.code, 0, sent.text);
    assert.match(sent.text, /^Usage: deno task send /m);
    assert.match(sent.text, /\(a plain --text body runs hello\):$/m);
    const lines = sent.lines.map((l) => l.trim());
    const has = (line: string) => assert.ok(lines.includes(line), sent.text);
    has("greet <name> <times> [loud] <token> - Greets someone");
    has("name: one of ann, bob - who");
    has("times: integer, from 1 to 3");
    has("loud: true or false, default false");
    has("token: string, secret: never shown");
    const fail = lines.indexOf("fail");
    assert.match(
      lines[fail + 1],
      /^runs: echo about to fail; .* \(1 attempt\)$/,
    );
    const greet = lines.findIndex((l) => l.startsWith("greet "));
    assert.match(lines[greet + 1], /^runs: printf .* \(up to 5 attempts\)$/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("send --wait=SECONDS without a result exits 124, says the message may still run, and removes its reply queue", () =>
  withQueue(async (q, env, dir) => {
    const sent = await send(["hello", "--wait=1"], env, dir);
    assert.equal(sent.code, 124, sent.text);
    assert.match(
      sent.text,
      /^no result for message \d+ within 1 s: it may still run, or wait in my_queue\. Reply queue reply_[0-9a-f]{12} removed/m,
    );
    assert.equal(await q.size(), 1, "the message stays queued");
    const reply = await q.api("GET", `/queues/${replyQueueOf(sent)}`);
    assert.deepEqual(reply, { msg: "Queue not found" });
  }));

Deno.test("send --wait stopped by Ctrl-C exits 130 and removes its reply queue", () =>
  withQueue(async (q, env, dir) => {
    const sender = startSender(["hello", "--wait"], env, dir);
    const waiting = await sender.line(/waiting for its result on reply_/);
    const status = await sender.stop("SIGINT");
    const text = sender.lines.join("\n");
    assert.equal(status.code, 130, text);
    assert.match(text, /^stopped waiting: message \d+ may still run/m);
    const name = /reply_[0-9a-f]{12}/.exec(waiting)![0];
    assert.deepEqual(await q.api("GET", `/queues/${name}`), {
      msg: "Queue not found",
    });
  }));

Deno.test("send: every configuration problem is named at once, with exit 2", async () => {
  const dir = await Deno.makeTempDir({ prefix: "send-test-" });
  try {
    await Deno.writeTextFile(`${dir}/tasks.yaml`, "tasks: {}\n");
    const sent = await send(["hello"], {
      ...baseEnv(dir),
      IRON_PORT: "8081",
      IRON_MQ_QUEUE_NAME: "no spaces",
    }, dir);
    assert.equal(sent.code, 2, sent.text);
    assert.match(sent.text, /^FATAL invalid configuration:$/m);
    assert.match(sent.text, /^ {4}- IRON_MQ_QUEUE_NAME="no spaces": /m);
    assert.match(sent.text, /^ {4}- IRON_PORT="8081": set IRON_HOST too/m);
    assert.match(sent.text, /tasks\.yaml: tasks: must map task names/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("send: a command line it cannot read exits 2 and says what is wrong", async () => {
  const dir = await Deno.makeTempDir({ prefix: "send-test-" });
  try {
    const cases: [string[], RegExp][] = [
      [["hello", "--bogus"], /^send: unknown option --bogus/m],
      [
        ["hello", "--eta", "tomorrow"],
        /^send: --eta "tomorrow": must be an ISO 8601 time/m,
      ],
      [
        ["hello", "--eta=2026-11-27", "--delay=5"],
        /^send: give --eta or --delay, not both$/m,
      ],
      [["--text", "hi", "--wait"], /^send: --wait needs a task message/m],
      [["--queue", "a b", "hello"], /^send: --queue "a b": a queue name is/m],
      [[], /^send: name a task, or give --text/m],
    ];
    for (const [args, problem] of cases) {
      const sent = await send(args, baseEnv(dir), dir);
      assert.equal(sent.code, 2, sent.text);
      assert.match(sent.text, problem);
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("tasks.example.yaml is a valid catalog: no problems, no warnings", async () => {
  const path = `${REPO}tasks.example.yaml`;
  const { catalog, warnings } = parseCatalog(
    path,
    await Deno.readTextFile(path),
    { timeoutMs: 0, maxAttempts: 5, host: { user: "op", port: 22, jump: [] } },
  );
  assert.deepEqual(warnings, []);
  assert.equal(catalog.defaultTask, "os_release");
  const params = [...catalog.tasks.values()].flatMap((t) => t.params);
  assert.ok(params.some((p) => p.enum), "an enum");
  assert.ok(params.some((p) => p.pattern), "a pattern");
  assert.ok(params.some((p) => p.type === "boolean" && p.default === false));
  assert.ok(params.some((p) => p.type === "integer"));
  assert.ok(params.some((p) => p.secret), "a secret");
});

Deno.test("send with no queue server there says where it looked and what to start, with exit 2", async () => {
  const dir = await Deno.makeTempDir({ prefix: "send-test-" });
  try {
    const port = freePort();
    const sent = await send(
      ["--text", "hi"],
      { ...baseEnv(dir), MQ_PORT: String(port) },
      dir,
    );
    assert.equal(sent.code, 2, sent.text);
    assert.match(
      sent.text,
      new RegExp(
        `^send: cannot post: POST http://127\\.0\\.0\\.1:${port}/.*refused.*Is the worker running \\(deno task start\\)\\?`,
        "m",
      ),
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
