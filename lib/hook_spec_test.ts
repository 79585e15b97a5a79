/** Tests of lib/hook_spec.ts: the catalog's hooks: section and the secrets it names. */
import assert from "node:assert/strict";
import { parseCatalog } from "./catalog.ts";
import { parseConfig } from "./config.ts";
import { ConfigError } from "./util.ts";
import { configError, context, HOST_DEFAULTS } from "../test/fixtures.ts";

const TASKS = `
tasks:
  checkout:
    command: /bin/checkout {{repo}} {{sha}} {{force}}
    params:
      sha: {pattern: "[0-9a-f]{40}"}
      repo: {}
      force: {type: boolean, default: false}
`;

function problems(hooks: string): string[] {
  try {
    parseCatalog("tasks.yaml", TASKS + hooks, {
      timeoutMs: 0,
      maxAttempts: 5,
      host: HOST_DEFAULTS,
    });
  } catch (e) {
    if (e instanceof ConfigError) return e.problems;
    throw e;
  }
  return [];
}

Deno.test("hooks: the issue's shape parses: verify, when, params and dedupe_header", () => {
  const { catalog } = parseCatalog(
    "tasks.yaml",
    TASKS + `
hooks:
  gh:
    task: checkout
    verify: {github: {secret_env: GH_SECRET}}
    when: {header: {X-GitHub-Event: push}, body: {ref: refs/heads/main, n: 3}}
    params: {sha: after, repo: repository.full_name}
    dedupe_header: X-GitHub-Delivery
  alert:
    task: checkout
    verify: {hmac: {secret_env: A, header: X-Signature, algorithm: sha512}}
    params: {sha: a.b, repo: c}
`,
    { timeoutMs: 0, maxAttempts: 5, host: HOST_DEFAULTS },
  );
  assert.deepEqual(catalog.hooks.get("gh"), {
    name: "gh",
    task: "checkout",
    verify: { kind: "github", secretEnv: "GH_SECRET" },
    whenHeaders: [["x-github-event", "push"]],
    whenBody: [{ path: "ref", value: "refs/heads/main" }, {
      path: "n",
      value: 3,
    }],
    params: [{ param: "sha", path: "after" }, {
      param: "repo",
      path: "repository.full_name",
    }],
    dedupeHeader: "x-github-delivery",
  });
  assert.deepEqual(catalog.hooks.get("alert")!.verify, {
    kind: "hmac",
    secretEnv: "A",
    header: "x-signature",
    algorithm: "sha512",
    prefix: "",
  });
});

Deno.test("hooks: every mistake is named at start with its place in the file", () => {
  assert.deepEqual(
    problems(`
hooks:
  a:
    task: nope
    verify: {github: {secret_env: GH}}
  b:
    task: checkout
    params: {sha: after, repo: r, colour: x}
  c:
    task: checkout
    verify: {hmac: {secret_env: "not a name", header: X-S, algorithm: sha1}}
    params: {sha: after}
  d:
    task: checkout
    verify: {gitlab: {token_env: T, token: hunter2}}
    when: {body: {ref: [a, b]}, method: POST}
    params: {sha: "a..b", repo: r}
    dedupe_header: "not a header"
`),
    [
      "tasks.yaml: hooks.a.task: must name one of the tasks (checkout)",
      "tasks.yaml: hooks.b.verify: is required: one of { github: { secret_env } }, { gitlab: { token_env } } or { hmac: { secret_env, header, algorithm, prefix } }",
      "tasks.yaml: hooks.b.params.colour: task checkout has no such parameter (it has: sha, repo, force)",
      "tasks.yaml: hooks.c.verify.hmac.secret_env: must name the environment variable that holds the secret (the secret itself never goes in this file)",
      "tasks.yaml: hooks.c.verify.hmac.algorithm: must be sha256 or sha512 (SHA-1 and MD5 are too weak)",
      "tasks.yaml: hooks.c.params: task checkout's required parameter repo is not given: map it to a path in the body",
      "tasks.yaml: hooks.d.verify.gitlab.token: unknown field (known: token_env)",
      "tasks.yaml: hooks.d.when.method: unknown field (known: header, body)",
      "tasks.yaml: hooks.d.when.body.ref: must be one value (a string, number, true, false or null)",
      "tasks.yaml: hooks.d.params.sha: must be a dotted path (a.b.c)",
      "tasks.yaml: hooks.d.dedupe_header: must be a header name",
    ],
  );
});

const HOOKED = TASKS + `
hooks:
  gh:
    task: checkout
    verify: {github: {secret_env: GH_SECRET}}
    params: {sha: after, repo: repository.full_name}
  gl:
    task: checkout
    verify: {gitlab: {token_env: GL_TOKEN}}
    params: {sha: after, repo: repository.full_name}
`;

const withCatalog = (text: string) =>
  context({ catalogFile: { path: "/etc/tasks.yaml", text, named: true } });

Deno.test("hooks: a receiving worker without a hook's secret variable does not start, and says which", () => {
  assert.deepEqual(
    configError(() =>
      parseConfig(
        { TASK_HTTP_PORT: "9100", GH_SECRET: "s3cret-value-abc" },
        withCatalog(HOOKED),
      )
    ),
    [
      "/etc/tasks.yaml: hooks.gl.verify.gitlab.token_env: GL_TOKEN is not set: set it to the hook's secret in the worker's environment (under runit: a file env/GL_TOKEN), as the sender has it",
    ],
  );
  const config = parseConfig(
    { TASK_HTTP_PORT: "9100", GH_SECRET: "s3cret-value-abc", GL_TOKEN: "t0k" },
    withCatalog(HOOKED),
  );
  assert.deepEqual(
    [...config.hookSecrets!],
    [["gh", "s3cret-value-abc"], ["gl", "t0k"]],
  );
});

Deno.test("hooks: a worker without a listener starts with a warning and needs no hook secret", () => {
  const config = parseConfig({}, withCatalog(HOOKED));
  assert.equal(config.hookSecrets, undefined);
  assert.deepEqual(config.warnings, [
    "/etc/tasks.yaml: hooks (gh, gl) are not received by this worker: set TASK_HTTP_PORT to receive them (it still runs their tasks)",
  ]);
});

Deno.test("hooks: a hook's mistakes are named beside its task's, once each", () => {
  const text = `
tasks:
  broken:
    command: echo {{x}}
hooks:
  a:
    task: broken
    verify: {github: {secret_env: GH}}
  b:
    task: broken
    verify: {hmac: {secret_env: S, header: X-S, algorithm: md5}}
`;
  try {
    parseCatalog("tasks.yaml", text, {
      timeoutMs: 0,
      maxAttempts: 5,
      host: HOST_DEFAULTS,
    });
    assert.fail("expected a ConfigError");
  } catch (e) {
    if (!(e instanceof ConfigError)) throw e;
    assert.deepEqual(e.problems, [
      "tasks.yaml: tasks.broken.command: {{x}} has no parameter: declare it under params",
      "tasks.yaml: hooks.b.verify.hmac.algorithm: must be sha256 or sha512 (SHA-1 and MD5 are too weak)",
    ]);
  }
});
