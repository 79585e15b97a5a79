/** Tests of lib/message.ts: what a body asks for, read into a plan. */
import { type Catalog } from "./catalog.ts";
import { planCommand, planMessage } from "./message.ts";
import assert from "node:assert/strict";
import { CATALOG, catalog, hostNamed } from "../test/fixtures.ts";

Deno.test("messages: text bodies run the command as configured", () => {
  for (const body of ["hello world!", "", "42", '"text"', "not {json"]) {
    const plan = planCommand("cat /etc/os-release", body);
    assert.deepEqual(plan, {
      ok: true,
      command: "cat /etc/os-release",
      args: [],
    });
  }
});

Deno.test("messages: a JSON body after a byte order mark or white space keeps its args", () => {
  for (
    const body of [
      '\uFEFF{"args": ["--dry-run"]}',
      '\n  {"args": ["--dry-run"]} ',
    ]
  ) {
    assert.deepEqual(planCommand("deploy", body), {
      ok: true,
      command: "deploy --dry-run",
      args: ["--dry-run"],
    });
  }
});

Deno.test("messages: invalid args never run and say why", () => {
  const cases: [string, RegExp][] = [
    ['{"args": "a b"}', /array of strings/],
    ['{"args": ["a", 1]}', /\[1\] is number/],
    ['{"args": [null]}', /\[0\] is object/],
    ['{"args": ["a"], "cmd": "rm"}', /unknown field.*"cmd"/],
    ['{"other": 1}', /unknown field/],
    ['{"args": ["a\\u0000b"]}', /NUL/],
    ['{"args": ["\\ud800"]}', /lone surrogate/],
    [JSON.stringify({ args: ["x".repeat(200_000)] }), /over the 100000-byte/],
    // Starts like JSON but is not: taken as plain text, it would drop the args.
    ['{"args":["--dry-run"],}', /starts like JSON but is not valid JSON/],
    ["{'args': ['--dry-run']}", /starts like JSON but is not valid JSON/],
    ['  \n{"args": ["a"]', /starts like JSON but is not valid JSON/],
    ["{not json", /starts like JSON/],
    ["[1,2]", /must be an object/],
  ];
  for (const [body, reason] of cases) {
    const plan = planCommand("echo", body);
    assert.equal(plan.ok, false, body.slice(0, 40));
    if (!plan.ok) assert.match(plan.reason, reason);
  }
});

Deno.test("named tasks: message forms, eta, expires and retries", () => {
  const c = catalog();
  const now = Date.parse("2026-11-27T12:00:00Z");
  const plan = (body: string, cat: Catalog | "none" = c) =>
    planMessage(
      body,
      cat === "none" ? undefined : cat,
      "cat /etc/os-release",
      now,
      [hostNamed("203.0.113.9")],
    );
  const text = plan("hello world!");
  assert.equal(text.kind, "run");
  assert.equal(text.kind === "run" && text.command, "cat /etc/os-release");
  assert.equal(text.meta.task, "os_release");
  const celery = plan(JSON.stringify({
    id: "abc-1",
    task: "restart",
    args: [],
    kwargs: { service: "nginx" },
    retries: 1,
    eta: null,
    expires: null,
    reply_to: "replies",
    utc: true,
  }));
  assert.equal(celery.kind, "run");
  assert.equal(
    celery.kind === "run" && celery.command,
    "echo restarting nginx",
  );
  assert.deepEqual(celery.meta, {
    task: "restart",
    taskId: "abc-1",
    replyTo: "replies",
    priorRetries: 1,
  });
  const later = plan(
    JSON.stringify({
      task: "restart",
      args: ["app"],
      eta: "2026-11-27T12:05:00Z",
    }),
  );
  assert.deepEqual(later, {
    kind: "hold",
    untilMs: Date.parse("2026-11-27T12:05:00Z"),
    meta: { task: "restart", priorRetries: 0 },
  });
  const expired = plan(
    JSON.stringify({
      task: "restart",
      args: ["app"],
      expires: "2026-11-27T11:59:59Z",
    }),
  );
  assert.equal(expired.kind, "revoke");
  const rejects: [string, RegExp, Catalog | "none"][] = [
    [
      '{"task": "nope"}',
      /unknown task "nope" \(tasks\.yaml has: os_release/,
      c,
    ],
    ['{"task": "restart", "args": ["x"]}', /must be one of nginx, app/, c],
    [
      '{"task": "restart", "eta": "tomorrow"}',
      /"eta" must be an ISO 8601 time/,
      c,
    ],
    ['{"task": "restart", "priority": 1}', /unknown field\(s\) "priority"/, c],
    [
      '{"task": "restart", "retries": -1}',
      /"retries" must be a whole number/,
      c,
    ],
    ['{"task": "restart"}', /named tasks need a catalog/, "none"],
    ['{"args": ["a"]}', /os_release: 1 args for 0 parameter/, c],
  ];
  for (const [body, reason, cat] of rejects) {
    const p = plan(body, cat);
    assert.equal(p.kind, "reject", body);
    if (p.kind === "reject") assert.match(p.reason, reason);
  }
  const noDefault = catalog(CATALOG.replace("default: os_release", ""));
  const plain = plan("hello", noDefault);
  assert.ok(
    plain.kind === "reject" && /names no default task/.test(plain.reason),
  );
});

Deno.test("messages: a task message's sender and stream are read, and wrong ones never run", () => {
  const body = (extra: Record<string, unknown>) =>
    JSON.stringify({ task: "restart", kwargs: { service: "nginx" }, ...extra });
  const plan = planMessage(
    body({ sender: "ann@laptop", stream: true, reply_to: "replies" }),
    catalog(),
    "",
    Date.now(),
    [hostNamed("203.0.113.9")],
  );
  assert.equal(plan.kind, "run", JSON.stringify(plan));
  assert.equal(plan.meta.sender, "ann@laptop");
  assert.equal(plan.meta.stream, true);
  const cases: [Record<string, unknown>, RegExp][] = [
    [{ sender: 7 }, /"sender" must be a string/],
    [{ sender: "x".repeat(201) }, /at most 200/],
    [{ stream: "yes" }, /"stream" must be true or false/],
    // Streamed to no queue, its output would reach nobody.
    [{ stream: true }, /"stream": true needs "reply_to"/],
  ];
  for (const [extra, reason] of cases) {
    const wrong = planMessage(body(extra), catalog(), "", Date.now(), [
      hostNamed("203.0.113.9"),
    ]);
    assert.equal(wrong.kind, "reject", JSON.stringify(extra));
    if (wrong.kind === "reject") assert.match(wrong.reason, reason);
  }
});
