/** Tests of lib/catalog.ts: catalogs parsed and parameters bound. */
import { bindParams, parseCatalog } from "./catalog.ts";
import { ConfigError } from "./util.ts";
import { needs, sshdMissing, withSshd } from "../test/sshd.ts";
import { memoryLog, mulberry32 } from "../test/support.ts";
import assert from "node:assert/strict";
import {
  CATALOG,
  catalog,
  configError,
  HOST_DEFAULTS,
  poolFor,
  randomArgs,
  runCollect,
} from "../test/fixtures.ts";

/** Tests that need OpenSSH (sshd, ssh-keygen): skipped with a reason, or failing under CI. */
const sshdTest = needs(sshdMissing(), "tests with a real sshd");

Deno.test("catalog: a valid catalog parses, with defaults and per-task limits", () => {
  const { catalog: c, warnings } = parseCatalog("tasks.yaml", CATALOG, {
    timeoutMs: 7_000,
    maxAttempts: 5,
    host: HOST_DEFAULTS,
  });
  assert.deepEqual(warnings, []);
  assert.deepEqual([...c.tasks.keys()], [
    "os_release",
    "restart",
    "deploy",
    "fail",
  ]);
  assert.equal(c.defaultTask, "os_release");
  assert.equal(c.tasks.get("restart")!.timeoutMs, 60_000);
  assert.equal(c.tasks.get("os_release")!.timeoutMs, 7_000);
  assert.equal(c.tasks.get("restart")!.maxAttempts, 3);
  const deploy = c.tasks.get("deploy")!;
  assert.deepEqual(deploy.params.map((p) => [p.name, p.type, p.required]), [
    ["version", "string", true],
    ["dry_run", "boolean", false],
    ["count", "integer", false],
    ["ratio", "number", false],
    ["token", "string", false],
  ]);
});

Deno.test("catalog: a bad catalog is refused with every problem named by file, task and field", () => {
  const bad = `
tasks:
  a:
    command: run {{x}} {{missing}} {{z}} "at {{q}}" '{{q}}' \\'{{q}}
    params:
      q: {}
      x: {type: integer, enum: [1], min: 5, max: 2}
      y: {pattern: '([', default: 3}
      z: {type: text}
    timeout: -1
    retries: 2
  "bad name!":
    command: ""
default: nope
extra: 1
`;

  const problems = configError(() => {
    parseCatalog("cat.yaml", bad, {
      timeoutMs: 0,
      maxAttempts: 5,
      host: HOST_DEFAULTS,
    });
    throw new Error("accepted");
  });
  const expected = [
    /^cat\.yaml: extra: unknown key/,
    /^cat\.yaml: tasks\.a\.retries: unknown field/,
    /^cat\.yaml: tasks\.a\.params\.x\.enum: applies to strings only/,
    /^cat\.yaml: tasks\.a\.params\.x\.min: is over max \(2\)/,
    /^cat\.yaml: tasks\.a\.params\.y\.pattern: must be a regular expression/,
    /^cat\.yaml: tasks\.a\.params\.y\.default: must be a string, not number 3/,
    /^cat\.yaml: tasks\.a\.params\.z\.type: must be one of string, integer, number, boolean/,
    /^cat\.yaml: tasks\.a\.command: \{\{missing\}\} has no parameter/,
    /^cat\.yaml: tasks\.a\.command: \{\{q\}\} is inside quotes: write it bare/,
    /^cat\.yaml: tasks\.a\.command: \{\{q\}\} must stand as a whole word/,
    /^cat\.yaml: tasks\.a\.timeout: must be seconds/,
    /^cat\.yaml: tasks\.bad name!: a task name is/,
    /^cat\.yaml: tasks\.bad name!\.command: must be the command line/,
    /^cat\.yaml: default: must name one of the tasks/,
  ];
  for (const pattern of expected) {
    assert.ok(
      problems.some((p) => pattern.test(p)),
      `${pattern} in:\n${problems.join("\n")}`,
    );
  }
  assert.equal(problems.length, expected.length, problems.join("\n"));
  assert.throws(
    () =>
      parseCatalog("x.yaml", "tasks: [", {
        timeoutMs: 0,
        maxAttempts: 1,
        host: HOST_DEFAULTS,
      }),
    (e) =>
      e instanceof ConfigError && /x\.yaml: not valid YAML/.test(e.problems[0]),
  );
  const { warnings } = parseCatalog(
    "w.yaml",
    'tasks:\n  t:\n    command: "true"\n    params:\n      unused: {required: false}\n',
    { timeoutMs: 0, maxAttempts: 1, host: HOST_DEFAULTS },
  );
  assert.deepEqual(warnings, [
    "w.yaml: tasks.t.params.unused: declared but never used in the command",
  ]);
});

Deno.test("named tasks: each parameter type's valid values are quoted in, invalid ones are refused naming the parameter and rule", () => {
  const deploy = catalog().tasks.get("deploy")!;
  const ok = bindParams(deploy, ["v1.2.3"], {
    dry_run: true,
    count: 10,
    ratio: 0,
    token: "s3cr3t value",
  });
  assert.deepEqual(ok, {
    ok: true,
    command: "printf '%s|' v1.2.3 true 10 0 's3cr3t value'",
    display: "printf '%s|' v1.2.3 true 10 0 [redacted]",
    values: {
      version: "v1.2.3",
      dry_run: true,
      count: 10,
      ratio: 0,
      token: "s3cr3t value",
    },
    secrets: ["s3cr3t value", "'s3cr3t value'"],
  });
  const defaults = bindParams(deploy, [], { version: "v0.0.1" });
  assert.ok(defaults.ok);
  assert.equal(defaults.command, "printf '%s|' v0.0.1 false 1 0.5 ''");
  const cases: [unknown[], Record<string, unknown>, RegExp][] = [
    [[], {}, /parameter version is required/],
    [["1.2.3"], {}, /parameter version: "1\.2\.3" must match/],
    [["v1.2.3-long-1"], {}, /must match/],
    [["v1.2.3"], { dry_run: "yes" }, /dry_run: "yes" must be true or false/],
    [["v1.2.3"], { count: 11 }, /count: 11 must be at most 10/],
    [["v1.2.3"], { count: 1.5 }, /count: 1\.5 must be a whole number/],
    [["v1.2.3"], { count: "3" }, /count: "3" must be an integer/],
    [["v1.2.3"], { ratio: -0.1 }, /ratio: -0\.1 must be at least 0/],
    [["v1.2.3"], { other: 1 }, /unknown parameter "other"/],
    [["v1.2.3", false, 1, 0.5, "t", "extra"], {}, /6 args for 5 parameter/],
    [["v1.2.3"], { version: "v1.2.3" }, /given both in args and in kwargs/],
    [
      ["v1.2.3"],
      { token: "-rf" },
      /token \(secret, value not shown\) starts with "-"/,
    ],
    [
      ["v1.2.3"],
      { token: 12345 },
      /token \(secret, value not shown\) must be a string$/,
    ],
  ];
  for (const [args, kwargs, reason] of cases) {
    const bound = bindParams(deploy, args, kwargs);
    assert.equal(bound.ok, false, JSON.stringify([args, kwargs]));
    if (!bound.ok) {
      assert.match(bound.reason, reason);
      assert.match(bound.reason, /^task deploy: /);
      assert.doesNotMatch(bound.reason, /-rf/, "a secret's value is not shown");
    }
  }
  const dash = bindParams(deploy, ["-rf"], {});
  assert.ok(!dash.ok && /version: "-rf" starts with "-"/.test(dash.reason));
  const listed = catalog(
    "tasks:\n  t:\n    command: ls {{flag}}\n    params:\n      flag: {enum: [-l, -a]}\n",
  ).tasks.get("t")!;
  assert.equal(
    bindParams(listed, ["-l"], {}).ok,
    true,
    "an enum is the allowlist",
  );
  const restart = catalog().tasks.get("restart")!;
  const wrong = bindParams(restart, ["apache"], {});
  assert.ok(
    !wrong.ok && /"apache" must be one of nginx, app/.test(wrong.reason),
  );
});

Deno.test({
  name:
    "named tasks: property: 10,000 random strings through a {{placeholder}} arrive at the remote side exactly",
  ...sshdTest,
  fn: () =>
    withSshd(async (sshd) => {
      const runs = Number(Deno.env.get("PROPERTY_RUNS") ?? 10_000);
      const seed = Number(Deno.env.get("PROPERTY_SEED") ?? Date.now() % 1e9);
      const random = mulberry32(seed);
      const task = catalog(
        "tasks:\n  echo:\n    command: printf '%s' {{value}}; printf END\n" +
          "    params:\n      value: {allow_dash: true}\n",
      ).tasks.get("echo")!;
      const pool = poolFor(sshd, memoryLog(), {}, 8);
      const values = Array.from(
        { length: runs },
        () => randomArgs(random).join(""),
      );
      let next = 0;
      let checked = 0;
      try {
        await pool.ready(AbortSignal.timeout(10_000));
        await Promise.all(Array.from({ length: 8 }, async () => {
          while (next < values.length) {
            const value = values[next++];
            const bound = bindParams(task, [value], {});
            assert.ok(bound.ok, `seed ${seed}: ${JSON.stringify(value)}`);
            const { result, stdout } = await runCollect(pool, bound.command);
            assert.deepEqual(result, { kind: "exit", code: 0 });
            assert.equal(
              stdout,
              `${value}END`,
              `seed ${seed}: ${JSON.stringify(value)}`,
            );
            checked++;
          }
        }));
      } finally {
        pool.close();
      }
      assert.equal(checked, runs);
      console.log(
        `property: ${checked} placeholder values matched (seed ${seed})`,
      );
    }),
});

Deno.test("catalog: a placeholder that would not stand as one plain shell word is refused", () => {
  const refused: [string, RegExp][] = [
    [`echo '{{x}}'`, /inside quotes/],
    [`echo "at {{x}}"`, /inside quotes/],
    [`echo $'it\\'s {{x}}'`, /\$'\.\.\.' reads escapes/],
    ["cat <<EOF\n{{x}}\nEOF", /here-document/],
    ["echo {{x}} # for {{x}}", /in a comment/],
    ["echo \\{{x}}", /whole word/],
    ["echo `echo {{x}}`", /backticks/],
    ["echo a{{x}}", /whole word/],
    ["echo {{x}}b", /whole word/],
    [`echo "{{x}}`, /never closed/],
  ];
  for (const [command, reason] of refused) {
    const problems = configError(() => {
      parseCatalog(
        "t.yaml",
        JSON.stringify({ tasks: { t: { command, params: { x: {} } } } }),
        { timeoutMs: 0, maxAttempts: 1, host: HOST_DEFAULTS },
      );
      throw new Error(`accepted: ${command}`);
    });
    assert.ok(
      problems.some((p) => reason.test(p)),
      `${JSON.stringify(command)}: ${problems.join("; ")}`,
    );
  }
  for (
    const command of [
      "systemctl restart {{x}}",
      "run --name={{x}} && echo ok",
      "(cd /srv && make {{x}})",
      "echo {{x}}>/tmp/out; X={{x}} env",
      "echo '#' {{x}} \"quoted\" it\\'s",
    ]
  ) {
    parseCatalog(
      "t.yaml",
      JSON.stringify({ tasks: { t: { command, params: { x: {} } } } }),
      { timeoutMs: 0, maxAttempts: 1, host: HOST_DEFAULTS },
    );
  }
});
