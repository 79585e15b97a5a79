/** Tests of lib/config.ts: every setting, its default and its errors. */
import { parseConfig, permissionFlags } from "./config.ts";
import { hostKey } from "./hosts.ts";
import { type Env } from "./util.ts";
import { keygen, needs, sshdMissing } from "../test/sshd.ts";
import assert from "node:assert/strict";
import { configError, context } from "../test/fixtures.ts";

/** Tests that need OpenSSH (sshd, ssh-keygen): skipped with a reason, or failing under CI. */
const sshdTest = needs(sshdMissing(), "tests with a real sshd");

Deno.test("config: no IronMQ settings means the embedded server and defaults", () => {
  const config = parseConfig({}, context());
  assert.ok(config.embedded, "embedded server expected");
  assert.equal(config.queue.queueName, "my_queue");
  assert.equal(config.queue.projectId, "local");
  assert.equal(config.queue.token, undefined);
  assert.deepEqual(config.task.hosts.map(hostKey), ["op@127.0.0.1:22"]);
  assert.equal(config.ssh.port, 22);
  assert.equal(config.ssh.user, "op");
  assert.equal(config.ssh.keyFile, "/home/op/.ssh/id_ed25519");
  assert.equal(config.ssh.knownHostsFile, "/home/op/.ssh/known_hosts");
  assert.equal(config.ssh.strictHostKeyChecking, "yes");
  assert.equal(config.task.command, "cat /etc/os-release");
  assert.equal(config.task.deadLetterQueue, "my_queue_failed");
});

Deno.test("config: IRON_MQ_* beats IRON_*, which beats iron.json; cwd file beats home file", () => {
  const files = [
    {
      path: "/work/iron.json",
      text: JSON.stringify({
        token: "cwd-token",
        project_id: "cwdproj",
        mq: { host: "mq.example" },
      }),
    },
    {
      path: "/home/op/iron.json",
      text: JSON.stringify({ token: "home", project_id: "home", port: 8443 }),
    },
  ];
  const fromFiles = parseConfig({}, context({ ironJsonFiles: files }));
  assert.equal(fromFiles.queue.token, "cwd-token");
  assert.equal(fromFiles.queue.projectId, "cwdproj");
  assert.equal(fromFiles.queue.baseUrl, "https://mq.example:8443");
  assert.equal(fromFiles.embedded, undefined);

  const fromEnv = parseConfig(
    {
      IRON_TOKEN: "env-token",
      IRON_MQ_TOKEN: "mq-token",
      IRON_PROJECT_ID: "envproj",
      IRON_HOST: "mq-aws-eu-west-1-1.iron.io",
    },
    context({ ironJsonFiles: files }),
  );
  assert.equal(fromEnv.queue.token, "mq-token");
  assert.equal(fromEnv.queue.projectId, "envproj");
  assert.equal(
    fromEnv.queue.baseUrl,
    "https://mq-aws-eu-west-1-1.iron.io:8443",
  );
});

Deno.test("config: every bad variable is named at once", () => {
  const problems = configError(() =>
    parseConfig(
      {
        SSH_PORT: "70000",
        TASK_CONCURRENCY: "zero",
        TASK_TIMEOUT: "-1",
        IRON_SCHEME: "ftp",
        SSH_STRICT_HOST_KEY_CHECKING: "no",
        IRON_TOKEN: "secret-token-value",
      },
      context(),
    )
  );
  const text = problems.join("\n");
  for (
    const name of [
      "SSH_PORT",
      "TASK_CONCURRENCY",
      "TASK_TIMEOUT",
      "IRON_SCHEME",
      "SSH_STRICT_HOST_KEY_CHECKING",
      "IRON_PROJECT_ID",
    ]
  ) {
    assert.match(text, new RegExp(name), `${name} should be named`);
  }
  assert.ok(!text.includes("secret-token-value"), "token must not appear");
});

Deno.test("config: no key and no agent is an error that says what to do", () => {
  const problems = configError(() =>
    parseConfig({}, context({ exists: () => false }))
  );
  assert.match(problems.join("\n"), /SSH_KEY_FILE.*ssh-keygen/);
  const withAgent = parseConfig(
    { SSH_AUTH_SOCK: "/tmp/agent.sock" },
    context({ exists: () => false }),
  );
  assert.equal(withAgent.ssh.agentSocket, "/tmp/agent.sock");
  assert.equal(withAgent.ssh.keyFile, undefined);
});

Deno.test("config: the run history's settings, every problem named", () => {
  assert.deepEqual(parseConfig({}, context()).runs, {
    path: "runs.sqlite",
    keepDays: 30,
    max: 100_000,
  });
  assert.equal(parseConfig({ TASK_RUNS_DB: "off" }, context()).runs, undefined);
  const problems = configError(() =>
    parseConfig(
      {
        TASK_RUNS_DB: "/var/lib/tasks/",
        TASK_RUNS_KEEP_DAYS: "0",
        TASK_RUNS_MAX: "lots",
      },
      context(),
    )
  ).join("\n");
  assert.match(problems, /TASK_RUNS_DB="\/var\/lib\/tasks\/": name a file/);
  assert.match(
    problems,
    /TASK_RUNS_KEEP_DAYS="0": must be a whole number from 1/,
  );
  assert.match(problems, /TASK_RUNS_MAX="lots": must be a whole number from 1/);
});

Deno.test("config: a broken iron.json is reported with its path", () => {
  const problems = configError(() =>
    parseConfig(
      {},
      context({ ironJsonFiles: [{ path: "/w/iron.json", text: "{oops" }] }),
    )
  );
  assert.match(problems.join("\n"), /\/w\/iron\.json: not valid JSON/);
});

Deno.test("permissions: only the configured hosts and files are granted", () => {
  const embedded = parseConfig(
    {
      MQ_DB: "/var/lib/tasks/q.sqlite",
      SSH_HOST: "10.1.1.73",
      TASK_RUNS_DB: "/var/lib/tasks/runs.sqlite",
    },
    context(),
  );
  const q = "/var/lib/tasks/q.sqlite";
  const runs = "/var/lib/tasks/runs.sqlite";
  const files = (db: string) =>
    ["", "-wal", "-shm", "-journal"].map((s) => db + s).join(",");
  assert.deepEqual(permissionFlags(embedded, ["/srv/iron.json"], false), [
    "--allow-env",
    "--allow-net=127.0.0.1:8080,10.1.1.73:22",
    `--allow-read=/srv/iron.json,${files(q)},${
      files(runs)
    },/home/op/.ssh/known_hosts,/home/op/.ssh/id_ed25519`,
    `--allow-write=${files(q)},${files(runs)}`,
  ]);
  const hosted = parseConfig(
    {
      IRON_TOKEN: "t0ken-value",
      IRON_PROJECT_ID: "p1",
      SSH_HOST: "::1",
      SSH_PORT: "2222",
      SSH_STRICT_HOST_KEY_CHECKING: "accept-new",
      SSH_KEY_FILE: "/keys/worker",
      TASK_RUNS_DB: "off",
    },
    context(),
  );
  const flags = permissionFlags(hosted, [], true);
  assert.deepEqual(flags, [
    "--allow-env",
    "--allow-net=mq-aws-us-east-1-1.iron.io:443,[::1]:2222",
    "--allow-read=/home/op/.ssh/known_hosts,/keys/worker",
    "--allow-write=/home/op/.ssh/known_hosts",
    "--allow-sys=uid,gid,userInfo",
  ]);
  // By default the history is runs.sqlite where the worker starts (./start goes there).
  const local = permissionFlags(
    parseConfig({ IRON_TOKEN: "t", IRON_PROJECT_ID: "p" }, context()),
    [],
    false,
  );
  assert.ok(
    local.includes(`--allow-write=${files("runs.sqlite")}`),
    local.join(" "),
  );
  assert.ok(!flags.join(" ").includes("t0ken-value"));
  const spaced = parseConfig({ SSH_KEY_FILE: "/my keys/id" }, context());
  assert.throws(() => permissionFlags(spaced, [], false), /space or comma/);
});

Deno.test("config: errors name where a bad value came from; half-set IronMQ settings are refused", () => {
  const files = [{
    path: "/srv/iron.json",
    text: JSON.stringify({ token: "tok-from-file", port: "99999" }),
  }];
  const problems = configError(() =>
    parseConfig(
      { IRON_MQ_SCHEME: "ftp", IRON_HOST: "mq.example" },
      context({ ironJsonFiles: files }),
    )
  ).join("\n");
  assert.match(problems, /IRON_MQ_SCHEME="ftp": must be http or https/);
  assert.match(problems, /\/srv\/iron\.json "port"="99999": must be a port/);

  const half = configError(() => parseConfig({ IRON_PORT: "8096" }, context()));
  assert.match(half.join("\n"), /IRON_PORT="8096": set IRON_HOST too/);

  const plain = configError(() =>
    parseConfig(
      { IRON_TOKEN: "t0ken", IRON_PROJECT_ID: "p", IRON_SCHEME: "http" },
      context(),
    )
  );
  assert.match(plain.join("\n"), /would send IRON_TOKEN unencrypted/);
  // A token to a local `deno task mq` over http is fine, with any project id.
  const local = parseConfig(
    { IRON_TOKEN: "t0ken", IRON_HOST: "127.0.0.1", IRON_SCHEME: "http" },
    context(),
  );
  assert.equal(local.queue.projectId, "local");
  assert.equal(local.queue.baseUrl, "http://127.0.0.1:80");
});

Deno.test({
  name: "config: a key that cannot log in is named with the other problems",
  ...sshdTest,
  fn: async () => {
    const dir = await Deno.makeTempDir();
    try {
      await keygen(`${dir}/k`, "s3cret-pass");
      const readKey = (path: string) => Deno.readFileSync(path);
      const problems = (env: Env) =>
        configError(() =>
          parseConfig({ SSH_PORT: "abc", ...env }, context({ readKey }))
        ).join("\n");
      assert.match(
        problems({ SSH_KEY_FILE: `${dir}/k` }),
        /SSH_PORT[\s\S]*SSH_KEY_FILE=.*set SSH_KEY_PASSPHRASE/,
      );
      assert.match(
        problems({ SSH_KEY_FILE: `${dir}/k.pub` }),
        /this is a public key/,
      );
      assert.match(
        problems({ SSH_KEY_FILE: `${dir}/none` }),
        /SSH_KEY_FILE=.*cannot read it/,
      );
      const ok = parseConfig(
        { SSH_KEY_FILE: `${dir}/k`, SSH_KEY_PASSPHRASE: "s3cret-pass" },
        context({ readKey }),
      );
      assert.equal(ok.ssh.keyFile, `${dir}/k`);
      assert.match(
        configError(() =>
          parseConfig(
            { SSH_AUTH_SOCK: `${dir}/no-agent` },
            context({ exists: () => false, isSocket: () => false }),
          )
        ).join("\n"),
        /SSH_AUTH_SOCK=.*is ssh-agent running/,
      );
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});
