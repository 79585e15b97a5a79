import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { createHmac } from "node:crypto";
import {
  backoffMs,
  bindParams,
  type Catalog,
  checkHostKey,
  type CommandRunner,
  type Config,
  type ConfigContext,
  ConfigError,
  fingerprint,
  formatRecord,
  hostFieldMatches,
  hostKey,
  type HostSpec,
  IronMqClient,
  keyTypeOfBlob,
  knownKeyAlgorithms,
  LineSplitter,
  loadSshCredentials,
  type Log,
  parseCatalog,
  parseConfig,
  parseHost,
  parseKnownHosts,
  permissionFlags,
  planCommand,
  planMessage,
  QueueError,
  realClock,
  ReplyTooLarge,
  retry,
  type RunIo,
  type RunResult,
  Secrets,
  setupLogging,
  shellQuote,
  SshHosts,
  type TaskConfig,
  Worker,
  type WorkerDeps,
} from "./tasks.ts";
import {
  type Env,
  type QueueServerOptions,
  startQueueServer,
} from "./mq_server.ts";
import {
  childPids,
  crashSessions,
  endOrphans,
  freePort,
  keygen,
  killChildren,
  needs,
  run,
  type Sshd,
  sshdMissing,
  sshEnv,
  startSshd,
  withSshd,
} from "./test_sshd.ts";
import {
  fastClock,
  jumpingClock,
  memoryLog,
  mulberry32,
  REPO,
  spawnCollecting,
  startTestQueue,
  type StoredMessage,
  type TestQueue,
  until,
} from "./test_support.ts";

/** Tests that need OpenSSH (sshd, ssh-keygen): skipped with a reason, or failing under CI. */
const sshdTest = needs(sshdMissing(), "tests with a real sshd");

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

function context(overrides: Partial<ConfigContext> = {}): ConfigContext {
  return {
    home: "/home/op",
    user: "op",
    ironJsonFiles: [],
    exists: (path) => path === "/home/op/.ssh/id_ed25519",
    ...overrides,
  };
}

function configError(fn: () => Config): string[] {
  try {
    fn();
  } catch (e) {
    if (e instanceof ConfigError) return e.problems;
    throw e;
  }
  throw new Error("expected a ConfigError");
}

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

Deno.test("config: a broken iron.json is reported with its path", () => {
  const problems = configError(() =>
    parseConfig(
      {},
      context({ ironJsonFiles: [{ path: "/w/iron.json", text: "{oops" }] }),
    )
  );
  assert.match(problems.join("\n"), /\/w\/iron\.json: not valid JSON/);
});

// ---------------------------------------------------------------------------
// Messages and quoting
// ---------------------------------------------------------------------------

async function shArgv(command: string): Promise<string[]> {
  const out = await new Deno.Command("sh", {
    args: ["-c", command],
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert.equal(out.code, 0, new TextDecoder().decode(out.stderr));
  const parts = new TextDecoder().decode(out.stdout).split("\0");
  parts.pop();
  return parts;
}

Deno.test("quoting: hostile arguments reach a real sh exactly", async () => {
  const args = [
    "",
    "plain",
    "two words",
    "it's",
    "'",
    "''",
    '"double"',
    "$(touch /tmp/pwned)",
    "`id`",
    "; rm -rf /",
    "a\nb",
    "tab\there",
    "back\\slash",
    "$HOME",
    "*",
    "~",
    "-n",
    "ünïcødé ✓ 😀",
    "!bang",
    "&&",
    "|",
    "#not a comment",
  ];
  const plan = planCommand("printf '%s\\0'", JSON.stringify({ args }));
  assert.ok(plan.ok);
  assert.deepEqual(await shArgv(plan.command), args);
  assert.equal(shellQuote("simple-arg_1.txt"), "simple-arg_1.txt");
  assert.equal(shellQuote(""), "''");
});

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

// ---------------------------------------------------------------------------
// known_hosts
// ---------------------------------------------------------------------------

function blob(type: string, seed: number): Uint8Array {
  const name = new TextEncoder().encode(type);
  const out = new Uint8Array(4 + name.length + 32);
  new DataView(out.buffer).setUint32(0, name.length);
  out.set(name, 4);
  out.fill(seed, 4 + name.length);
  return out;
}

const b64 = (b: Uint8Array) => Buffer.from(b).toString("base64");

function hashedHost(name: string, salt: Uint8Array): string {
  const hash = createHmac("sha1", salt).update(name).digest("base64");
  return `|1|${b64(salt)}|${hash}`;
}

Deno.test("known_hosts: plain, port, pattern, negation and hashed entries", () => {
  const key = blob("ssh-ed25519", 1);
  const other = blob("ssh-ed25519", 2);
  const text = [
    "# comment",
    `web1.example,10.0.0.5 ssh-ed25519 ${b64(key)}`,
    `[10.0.0.6]:2222 ssh-ed25519 ${b64(key)}`,
    `*.prod.example,!db.prod.example ssh-ed25519 ${b64(key)}`,
    `${
      hashedHost("[127.0.0.1]:2022", new Uint8Array(20).fill(7))
    } ssh-ed25519 ${b64(key)}`,
    `@revoked old.example ssh-ed25519 ${b64(other)}`,
    `old.example ssh-ed25519 ${b64(other)}`,
  ].join("\n");
  const entries = parseKnownHosts(text);
  assert.equal(checkHostKey(entries, "web1.example", 22, key), "match");
  assert.equal(checkHostKey(entries, "10.0.0.5", 22, key), "match");
  assert.equal(checkHostKey(entries, "10.0.0.5", 22, other), "mismatch");
  assert.equal(checkHostKey(entries, "10.0.0.5", 2222, key), "unknown");
  assert.equal(checkHostKey(entries, "10.0.0.6", 2222, key), "match");
  assert.equal(checkHostKey(entries, "app.prod.example", 22, key), "match");
  assert.equal(checkHostKey(entries, "db.prod.example", 22, key), "unknown");
  assert.equal(checkHostKey(entries, "127.0.0.1", 2022, key), "match");
  assert.equal(checkHostKey(entries, "127.0.0.1", 2022, other), "mismatch");
  assert.equal(checkHostKey(entries, "127.0.0.1", 22, key), "unknown");
  assert.equal(checkHostKey(entries, "old.example", 22, other), "revoked");
  assert.equal(checkHostKey(entries, "new.example", 22, key), "unknown");
  assert.deepEqual(knownKeyAlgorithms(entries, "10.0.0.5", 22), [
    "ssh-ed25519",
  ]);
  assert.equal(hostFieldMatches("WEB1.example", "web1.EXAMPLE"), true);
  assert.equal(keyTypeOfBlob(key), "ssh-ed25519");
});

Deno.test({
  name: "known_hosts: entries hashed by ssh-keygen -H match",
  ...sshdTest,
  fn: async () => {
    const dir = await Deno.makeTempDir();
    try {
      const key = blob("ssh-ed25519", 3);
      const file = `${dir}/known_hosts`;
      await Deno.writeTextFile(
        file,
        `[127.0.0.1]:2200 ssh-ed25519 ${b64(key)}\nexample.org ssh-ed25519 ${
          b64(key)
        }\n`,
      );
      await run("ssh-keygen", ["-H", "-f", file]);
      const text = await Deno.readTextFile(file);
      assert.ok(!text.includes("example.org"), "file should now be hashed");
      const entries = parseKnownHosts(text);
      assert.equal(checkHostKey(entries, "127.0.0.1", 2200, key), "match");
      assert.equal(checkHostKey(entries, "example.org", 22, key), "match");
      assert.equal(checkHostKey(entries, "example.com", 22, key), "unknown");
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "fingerprint: the same as ssh-keygen -l",
  ...sshdTest,
  fn: async () => {
    const dir = await Deno.makeTempDir();
    try {
      await keygen(`${dir}/k`);
      const pub = (await Deno.readTextFile(`${dir}/k.pub`)).split(" ");
      const listed = await new Deno.Command("ssh-keygen", {
        args: ["-l", "-f", `${dir}/k.pub`],
        stdout: "piped",
      }).output();
      const expected = new TextDecoder().decode(listed.stdout).split(" ")[1];
      assert.equal(fingerprint(Buffer.from(pub[1], "base64")), expected);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

// ---------------------------------------------------------------------------
// Backoff, lines, log format
// ---------------------------------------------------------------------------

Deno.test("backoff: grows, is capped, and jitters within [half, full]", () => {
  assert.equal(backoffMs(0, 100, 10_000, 0), 50);
  assert.equal(backoffMs(0, 100, 10_000, 0.999999), 100);
  assert.equal(backoffMs(3, 100, 10_000, 0), 400);
  assert.equal(backoffMs(50, 100, 10_000, 0.999999), 10_000);
  // Release delays take the top of the range: TASK_RETRY_DELAY, doubling, at most 15 minutes.
  assert.equal(backoffMs(0, 10_000, 900_000, 1), 10_000);
  assert.equal(backoffMs(2, 10_000, 900_000, 1), 40_000);
  assert.equal(backoffMs(29, 10_000, 900_000, 1), 900_000);
});

Deno.test("lines: split across chunks, CRLF, multi-byte characters, long lines", () => {
  const lines: string[] = [];
  const splitter = new LineSplitter((l) => lines.push(l), { maxLine: 8 });
  const bytes = new TextEncoder().encode("ab\r\ncé");
  splitter.push(bytes.subarray(0, 5)); // cuts "é" in half
  splitter.push(bytes.subarray(5));
  splitter.push(new TextEncoder().encode("\n0123456789abc"));
  splitter.end();
  assert.deepEqual(lines, ["ab", "cé", "01234567", "89abc"]);
});

Deno.test("log format: plain for info, marked for problems, secrets masked", () => {
  const record = (level: "info" | "error", text: string) => ({
    category: ["tasks"],
    level,
    message: ["", text, ""],
    rawMessage: "",
    timestamp: 0,
    properties: {},
  });
  assert.equal(
    formatRecord(record("info", "[h] out: {x}"), new Secrets([])),
    "[h] out: {x}",
  );
  assert.equal(
    formatRecord(
      record("error", "token s3cr3t-tok\nnext"),
      new Secrets(["s3cr3t-tok"]),
    ),
    "ERROR token [redacted]\\nnext",
  );
});

Deno.test("log format: LOG_FORMAT=json writes one object a line with message id, task, host and stream, secrets masked", async () => {
  const lines: string[] = [];
  const log = await setupLogging(
    (line) => lines.push(line),
    "info",
    new Secrets(["s3cr3t-tok"]),
    "json",
  );
  log.info("[web1] out: token s3cr3t-tok {x}\u2028forged", {
    message_id: "12",
    task: "deploy",
    host: "web1",
    stream: "stdout",
  });
  log.warn("message 12: released");
  log.debug("not at info");
  assert.equal(lines.length, 2);
  assert.ok(lines.every((l) => !l.includes("\n") && !l.includes("\u2028")));
  const [out, warn] = lines.map((l) => JSON.parse(l));
  assert.match(out.time, /^\d{4}-\d\d-\d\dT/);
  assert.deepEqual({ ...out, time: undefined }, {
    time: undefined,
    level: "info",
    message: "[web1] out: token [redacted] {x}\\u2028forged",
    message_id: "12",
    task: "deploy",
    host: "web1",
    stream: "stdout",
  });
  assert.deepEqual({ ...warn, time: undefined }, {
    time: undefined,
    level: "warn",
    message: "message 12: released",
  });
  assert.throws(
    () => parseConfig({ LOG_FORMAT: "xml", SSH_KEY_FILE: "/k" }, context()),
    /LOG_FORMAT="xml": must be one of text, json/,
  );
  // A bad setting, too, is one JSON object (./start prints it, then stops).
  const start = await new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "-A",
      "--config",
      `${REPO}deno.json`,
      `${REPO}tasks.ts`,
      "--permissions",
    ],
    env: { LOG_FORMAT: "json", TASK_CONCURRENCY: "0", SSH_KEY_FILE: "/k" },
    clearEnv: true,
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert.equal(start.code, 2);
  const fatal = JSON.parse(new TextDecoder().decode(start.stderr));
  assert.equal(fatal.level, "fatal");
  assert.match(fatal.message, /TASK_CONCURRENCY="0"/);
  await setupLogging(() => {}, "info", new Secrets([]));
});

// ---------------------------------------------------------------------------
// The SSH runner against a real sshd on loopback
// ---------------------------------------------------------------------------

function sshConfigFor(sshd: Sshd, env: Env = {}): Config {
  return parseConfig(
    {
      ...sshEnv(sshd),
      ...env,
    },
    context(),
  );
}

/**
 * The SSH runner for one test sshd (SSH_HOST is its address): whatever host
 * a test worker names (203.0.113.9 in its results), commands run there.
 */
class TestPool implements CommandRunner {
  readonly host: HostSpec;
  private readonly hosts: SshHosts;
  constructor(config: Config, concurrency: number, log: Log) {
    this.host = config.task.hosts[0];
    this.hosts = new SshHosts(
      config.ssh,
      loadSshCredentials(config.ssh),
      config.task.hosts,
      concurrency,
      log,
    );
  }
  ready(signal: AbortSignal): Promise<void> {
    return this.hosts.ready(signal);
  }
  reachable(): boolean {
    return this.hosts.reachable();
  }
  run(_: HostSpec, command: string, io: RunIo): Promise<RunResult> {
    return this.hosts.run(this.host, command, io);
  }
  close(): void {
    this.hosts.close();
  }
}

function poolFor(sshd: Sshd, log: Log, env: Env = {}, concurrency = 4) {
  return new TestPool(sshConfigFor(sshd, env), concurrency, log);
}

/** Runs a command and collects its output. */
async function runCollect(
  pool: TestPool,
  command: string,
  options: { timeoutMs?: number; signal?: AbortSignal } = {},
) {
  const stdout: Uint8Array[] = [];
  let stderr = "";
  const result = await pool.run(pool.host, command, {
    onStdout: (c) => stdout.push(c.slice()),
    onStderr: (c) => stderr += new TextDecoder().decode(c),
    timeoutMs: options.timeoutMs ?? 0,
    signal: options.signal ?? new AbortController().signal,
  });
  const bytes = new Uint8Array(stdout.reduce((n, c) => n + c.length, 0));
  let at = 0;
  for (const c of stdout) {
    bytes.set(c, at);
    at += c.length;
  }
  return { result, stdout: new TextDecoder().decode(bytes), stderr };
}

Deno.test({
  name: "ssh: output, exit status and stderr come back from a real sshd",
  ...sshdTest,
  fn: () =>
    withSshd(async (sshd) => {
      const log = memoryLog();
      const pool = poolFor(sshd, log);
      try {
        await pool.ready(AbortSignal.timeout(10_000));
        const ok = await runCollect(pool, "echo hello; echo oops >&2");
        assert.deepEqual(ok.result, { kind: "exit", code: 0 });
        assert.equal(ok.stdout, "hello\n");
        assert.equal(ok.stderr, "oops\n");
        const bad = await runCollect(pool, "exit 7");
        assert.deepEqual(bad.result, { kind: "exit", code: 7 });
        const killed = await runCollect(pool, "kill -9 $$");
        assert.deepEqual(killed.result, { kind: "signal", signal: "SIGKILL" });
      } finally {
        pool.close();
      }
    }),
});

/** Random argument lists with the characters a shell treats specially. */
function randomArgs(random: () => number): string[] {
  const pieces = [
    "'",
    '"',
    "\\",
    "$(id)",
    "`id`",
    "${HOME}",
    "$",
    ";",
    "&",
    "|",
    "\n",
    "\t",
    " ",
    "*",
    "?",
    "[a]",
    "~",
    "#",
    "!",
    "-",
    "--",
    "<",
    ">",
    "(",
    ")",
    "{",
    "}",
    "%s",
    "é",
    "ü",
    "✓",
    "😀",
    "\u00a0",
    "\r",
    "\x1b",
    "a",
    "Z",
    "0",
    "",
  ];
  const count = Math.floor(random() * 6);
  return Array.from({ length: count }, () => {
    const length = Math.floor(random() * 6);
    let arg = "";
    for (let i = 0; i < length; i++) {
      arg += random() < 0.1
        ? String.fromCodePoint(1 + Math.floor(random() * 0x2fff))
        : pieces[Math.floor(random() * pieces.length)];
    }
    return arg;
  });
}

Deno.test({
  name:
    "ssh: property: 10,000 random argument lists arrive as the remote argv exactly",
  ...sshdTest,
  fn: () =>
    withSshd(async (sshd) => {
      const runs = Number(Deno.env.get("PROPERTY_RUNS") ?? 10_000);
      const seed = Number(Deno.env.get("PROPERTY_SEED") ?? Date.now() % 1e9);
      const random = mulberry32(seed);
      const log = memoryLog();
      const pool = poolFor(sshd, log, {}, 8);
      let checked = 0;
      try {
        await pool.ready(AbortSignal.timeout(10_000));
        const lists = Array.from({ length: runs }, () => randomArgs(random));
        let next = 0;
        await Promise.all(Array.from({ length: 8 }, async () => {
          while (next < lists.length) {
            const args = lists[next++];
            const plan = planCommand(
              "printf '%s\\0'",
              JSON.stringify({ args }),
            );
            assert.ok(plan.ok, `seed ${seed}: ${JSON.stringify(args)}`);
            const { result, stdout } = await runCollect(
              pool,
              `${plan.command}; printf 'END'`,
            );
            assert.deepEqual(result, { kind: "exit", code: 0 });
            const argv = stdout.slice(0, -"END".length).split("\0");
            argv.pop();
            // printf with no arguments still prints the format once.
            const expected = args.length === 0 ? [""] : args;
            assert.deepEqual(
              argv,
              expected,
              `seed ${seed}: ${JSON.stringify(args)}`,
            );
            checked++;
          }
        }));
      } finally {
        pool.close();
      }
      assert.equal(checked, runs);
      console.log(`property: ${checked} argument lists matched (seed ${seed})`);
    }),
});

async function processGone(pid: number, withinMs: number): Promise<boolean> {
  const deadline = Date.now() + withinMs;
  while (Date.now() < deadline) {
    try {
      await Deno.stat(`/proc/${pid}`);
    } catch {
      return true;
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  return false;
}

Deno.test({
  name: "ssh: a command past its timeout is stopped on the remote side",
  ...sshdTest,
  fn: () =>
    withSshd(async (sshd) => {
      const pool = poolFor(sshd, memoryLog());
      try {
        await pool.ready(AbortSignal.timeout(10_000));
        const started = Date.now();
        const pidFile = `${sshd.dir}/pid`;
        await Deno.chmod(sshd.dir, 0o777);
        const { result } = await runCollect(
          pool,
          `echo $$ > ${pidFile}; exec sleep 30`,
          { timeoutMs: 300 },
        );
        assert.deepEqual(result, { kind: "timeout" });
        assert.ok(Date.now() - started < 5_000, "stopped promptly");
        const pid = Number(await Deno.readTextFile(pidFile));
        assert.ok(
          await processGone(pid, 3_000),
          `remote pid ${pid} still runs`,
        );
      } finally {
        pool.close();
      }
    }),
});

Deno.test({
  name: "ssh: a host key that does not match runs nothing and says why",
  ...sshdTest,
  fn: () =>
    withSshd(async (sshd) => {
      const other = `${sshd.dir}/other`;
      await keygen(other);
      const otherKey = (await Deno.readTextFile(`${other}.pub`)).split(" ");
      await Deno.writeTextFile(
        sshd.knownHostsFile,
        `[127.0.0.1]:${sshd.port} ${otherKey[0]} ${otherKey[1]}\n`,
      );
      const marker = `${sshd.dir}/ran`;
      const log = memoryLog();
      const pool = poolFor(sshd, log, {
        SSH_STRICT_HOST_KEY_CHECKING: "accept-new",
      });
      try {
        await assert.rejects(pool.ready(AbortSignal.timeout(1_500)));
        const { result } = await runCollect(pool, `touch ${marker}`);
        assert.equal(result.kind, "unreachable");
        await assert.rejects(Deno.stat(marker), Deno.errors.NotFound);
        assert.match(
          log.lines.join("\n"),
          /HOST KEY MISMATCH for \[127\.0\.0\.1\]/,
        );
      } finally {
        pool.close();
      }
    }),
});

Deno.test({
  name: "ssh: unknown host key refused by default, remembered with accept-new",
  ...sshdTest,
  fn: () =>
    withSshd(async (sshd) => {
      await Deno.writeTextFile(sshd.knownHostsFile, "");
      const strictLog = memoryLog();
      const strict = poolFor(sshd, strictLog);
      try {
        await assert.rejects(strict.ready(AbortSignal.timeout(1_000)));
        assert.match(strictLog.lines.join("\n"), /host key of .* is unknown/);
      } finally {
        strict.close();
      }
      const log = memoryLog();
      const tofu = poolFor(sshd, log, {
        SSH_STRICT_HOST_KEY_CHECKING: "accept-new",
      });
      try {
        await tofu.ready(AbortSignal.timeout(10_000));
        const recorded = await Deno.readTextFile(sshd.knownHostsFile);
        assert.equal(recorded.trim(), sshd.knownHostsLine);
        assert.match(log.lines.join("\n"), /new host key ssh-ed25519 SHA256:/);
      } finally {
        tofu.close();
      }
    }),
});

Deno.test({
  name:
    "ssh: refused, wrong key and dropped connections name host, port, user and cause",
  ...sshdTest,
  fn: () =>
    withSshd(async (sshd) => {
      const log = memoryLog();
      const refused = poolFor(sshd, log, { SSH_PORT: String(freePort()) }, 1);
      await assert.rejects(refused.ready(AbortSignal.timeout(500)));
      refused.close();
      assert.match(
        log.lines.join("\n"),
        new RegExp(
          `${sshd.user}@127\\.0\\.0\\.1:\\d+: cannot connect: connection refused`,
        ),
      );

      const stranger = `${sshd.dir}/stranger`;
      await keygen(stranger);
      const authLog = memoryLog();
      const wrongKey = poolFor(sshd, authLog, { SSH_KEY_FILE: stranger });
      await assert.rejects(wrongKey.ready(AbortSignal.timeout(1_500)));
      wrongKey.close();
      assert.match(authLog.lines.join("\n"), /authentication failed/);

      const pool = poolFor(sshd, memoryLog());
      try {
        await pool.ready(AbortSignal.timeout(10_000));
        const running = runCollect(pool, "sleep 20");
        await new Promise((r) => setTimeout(r, 300));
        killChildren(sshd.pid);
        const { result } = await running;
        assert.equal(result.kind, "ssh-error");
        if (result.kind === "ssh-error") assert.match(result.error, /dropped/);
      } finally {
        pool.close();
      }
    }),
});

Deno.test({
  name:
    "ssh: a session that will not open (sshd's session processes gone, the connections alive) starts nothing there; the command runs once on a fresh connection",
  ...sshdTest,
  async fn() {
    let sshd = await startSshd();
    const log = memoryLog();
    // Eight at once: two connections of four channels.
    const pool = poolFor(sshd, log, {}, 8);
    let orphans: number[] = [];
    const shared = await Deno.makeTempDir();
    await Deno.chmod(shared, 0o777); // the remote user writes the markers
    try {
      const warm = await Promise.all(
        Array.from({ length: 8 }, () => runCollect(pool, "sleep 0.2")),
      );
      assert.deepEqual(warm.map((r) => r.result.kind), Array(8).fill("exit"));
      assert.equal(log.lines.filter((l) => /: connected$/.test(l)).length, 2);
      ({ sshd, orphans } = await crashSessions(sshd));
      assert.ok(
        orphans.length === 2 && orphans.every((p) => childPids(1).includes(p)),
        `both connections' network halves live on: ${orphans}`,
      );

      // The first command meets a dead connection: it retires the other too.
      const first = await runCollect(
        pool,
        `echo 0 >> ${shared}/ran; echo ran 0`,
      );
      const warned = () =>
        log.lines.filter((l) => /the command did not start/.test(l)).length;
      assert.deepEqual([first.result, first.stdout], [
        { kind: "exit", code: 0 },
        "ran 0\n",
      ]);
      assert.equal(warned(), 1, log.lines.join("\n"));
      assert.match(
        log.lines.join("\n"),
        /retiring \d connection\(s\) after a session would not open/,
      );
      // The rest never meet an old connection.
      const runs = await Promise.all(
        Array.from(
          { length: 5 },
          (_, i) =>
            runCollect(
              pool,
              `echo ${i + 1} >> ${shared}/ran; echo ran ${i + 1}`,
            ),
        ),
      );
      assert.deepEqual(
        runs.map((r) => [r.result, r.stdout]),
        Array.from({ length: 5 }, (_, i) => [
          { kind: "exit", code: 0 },
          `ran ${i + 1}\n`,
        ]),
      );
      assert.equal(warned(), 1, log.lines.join("\n"));
      const ran = (await Deno.readTextFile(`${shared}/ran`)).split("\n")
        .filter((l) => l !== "").sort();
      assert.deepEqual(ran, ["0", "1", "2", "3", "4", "5"], "each ran once");
      const text = log.lines.join("\n");
      assert.match(text, /the command did not start: trying it on a new/);
      assert.doesNotMatch(text, /dropped while the command was running/);
      assert.equal(pool.reachable(), true);
    } finally {
      pool.close();
      await sshd.stop();
      endOrphans(orphans);
      await Deno.remove(sshd.dir, { recursive: true });
      await Deno.remove(shared, { recursive: true });
    }
  },
});

Deno.test({
  name:
    "ssh: a host that accepts connections but opens no session is unreachable after a few fresh connections, and nothing ran",
  ...sshdTest,
  fn: () =>
    withSshd(async (sshd) => {
      const log = memoryLog();
      const pool = poolFor(sshd, log);
      const marker = `${sshd.dir}/ran`;
      try {
        await pool.ready(AbortSignal.timeout(10_000));
        const { result } = await runCollect(pool, `touch ${marker}`);
        assert.equal(result.kind, "unreachable");
        assert.match(
          result.kind === "unreachable" ? result.error : "",
          /^cannot open a session \(.*open failed.*; tried 3 connection\(s\)\): nothing ran$/,
        );
        await assert.rejects(Deno.stat(marker), Deno.errors.NotFound);
        assert.equal(log.lines.filter((l) => /: connected$/.test(l)).length, 3);
        // Unreachable, as a refused connection is: the worker holds back.
        assert.equal(pool.reachable(), false);
      } finally {
        pool.close();
      }
    }, { config: ["MaxSessions 0"] }),
});

// ---------------------------------------------------------------------------
// The worker loop against the embedded queue server over real HTTP
// ---------------------------------------------------------------------------

type Script = (
  command: string,
  io: RunIo,
) => Promise<RunResult>;

/** A CommandRunner that records commands and answers from a script. */
class FakeRunner implements CommandRunner {
  readonly commands: string[] = [];
  constructor(
    private readonly script: Script,
    /** Whether some host can be reached (false: the worker's only host is down). */
    private readonly anyReachable = true,
  ) {}
  ready(): Promise<void> {
    return Promise.resolve();
  }
  reachable(): boolean {
    return this.anyReachable;
  }
  run(_: HostSpec, command: string, io: RunIo): Promise<RunResult> {
    this.commands.push(command);
    return this.script(command, io);
  }
  close(): void {}
}

/** A command that runs until it is stopped. */
const untilAborted = (io: RunIo): Promise<RunResult> =>
  new Promise((resolve) =>
    io.signal.addEventListener("abort", () => resolve({ kind: "aborted" }))
  );

const exit = (code: number): Promise<RunResult> =>
  Promise.resolve({ kind: "exit", code });

/** A queue server for one test, and a log for its worker. */
type Harness = TestQueue & { log: Log & { lines: string[] } };

async function harness(
  serverOptions: QueueServerOptions = {},
): Promise<Harness> {
  return { ...await startTestQueue(serverOptions), log: memoryLog() };
}

/** Waits until `count` results are in the "replies" queue. */
function untilResults(h: Harness, count: number): Promise<void> {
  return until(
    `${count} results in replies`,
    async () => (await h.peek("replies")).length === count,
  );
}

/** Waits until the one message is in jobs_failed and gone from jobs. */
async function untilDeadLettered(h: Harness): Promise<void> {
  await until(
    "dead-lettered",
    async () => (await h.peek("jobs_failed")).length === 1,
  );
  await until("source empty", async () => (await h.info()).size === 0);
}

const HOST_DEFAULTS = { user: "op", port: 22, jump: [] };

/** A host as SSH_HOST names it, with the usual user and port. */
function hostNamed(name: string): HostSpec {
  const host = parseHost(name, HOST_DEFAULTS);
  if (typeof host === "string") throw new Error(host);
  return host;
}

function taskConfig(overrides: Partial<TaskConfig> = {}): TaskConfig {
  return {
    command: "run-it",
    hosts: [hostNamed("203.0.113.9")],
    concurrency: 4,
    hostParallelism: 32,
    timeoutMs: 0,
    maxAttempts: 3,
    retryDelaySeconds: 0,
    deadLetterQueue: "jobs_failed",
    reservationTimeoutSeconds: 30,
    pollWaitSeconds: 1,
    shutdownGraceMs: 2_000,
    ...overrides,
  };
}

/** Starts a worker; `stop()` signals it and waits for a clean end. */
function startWorker(
  h: Harness,
  runner: CommandRunner,
  task: Partial<TaskConfig> = {},
  deps: Partial<WorkerDeps> = {},
) {
  const worker = new Worker(
    taskConfig(task),
    { queue: h.client, runner, log: h.log, clock: realClock, ...deps },
    "jobs",
  );
  const controller = new AbortController();
  const done = worker.run(controller.signal);
  return {
    worker,
    stop: async () => {
      controller.abort();
      await done;
    },
  };
}

Deno.test("worker: runs each message, logs like Fabric, then deletes it", async () => {
  const h = await harness();
  const runner = new FakeRunner((_, io) => {
    io.onStdout(new TextEncoder().encode("CentOS release 6.4\n"));
    io.onStderr(new TextEncoder().encode("warning: x\n"));
    return exit(0);
  });
  const w = startWorker(h, runner);
  try {
    await h.post(["hello world!", JSON.stringify({ args: ["a", "b c"] })]);
    await until("queue drained", async () => (await h.info()).size === 0);
    await until("both ran", () => runner.commands.length === 2);
  } finally {
    await w.stop();
    await h.close();
  }
  assert.deepEqual(runner.commands.sort(), ["run-it", "run-it a 'b c'"]);
  const log = h.log.lines.join("\n");
  assert.match(log, /^\[203\.0\.113\.9\] run: run-it$/m);
  assert.match(log, /^\[203\.0\.113\.9\] out: CentOS release 6\.4$/m);
  assert.match(log, /^\[203\.0\.113\.9\] err: warning: x$/m);
  assert.match(log, /^\[203\.0\.113\.9\] exit: 0 /m);
});

Deno.test("worker: a failing command is released and retried, then dead-lettered with its record", async () => {
  const h = await harness();
  const runner = new FakeRunner((_, io) => {
    io.onStderr(new TextEncoder().encode("disk full\n"));
    return exit(3);
  });
  const w = startWorker(h, runner, { maxAttempts: 3 });
  let id: string;
  try {
    [id] = await h.post(["hello world!"]);
    await untilDeadLettered(h);
  } finally {
    await w.stop();
  }
  try {
    assert.equal(runner.commands.length, 3, "ran once per attempt");
    const [dead] = await h.peek("jobs_failed");
    const record = JSON.parse(dead.body);
    assert.equal(record.id, id);
    assert.equal(record.body, "hello world!");
    assert.equal(record.attempts, 3);
    assert.equal(record.exit_status, 3);
    assert.equal(record.stderr_tail, "disk full\n");
    assert.equal(record.queue, "jobs");
    assert.match(
      h.log.lines.join("\n"),
      /released for a retry in 0 s \(exit status 3, attempt 1 of 3\)/,
    );
  } finally {
    await h.close();
  }
});

Deno.test("worker: a body whose args are invalid runs nothing and goes to the dead-letter queue at once", async () => {
  const h = await harness();
  const runner = new FakeRunner(() => exit(0));
  const w = startWorker(h, runner);
  try {
    await h.post([JSON.stringify({ args: ["ok", 5] })]);
    await untilDeadLettered(h);
  } finally {
    await w.stop();
  }
  try {
    assert.equal(runner.commands.length, 0);
    const record = JSON.parse((await h.peek("jobs_failed"))[0].body);
    assert.match(record.reason, /"args"\[1\] is number/);
    assert.equal(record.attempts, 1);
  } finally {
    await h.close();
  }
});

Deno.test("worker: SSH failures while no host can be reached release the message and never dead-letter it", async () => {
  const h = await harness();
  const runner = new FakeRunner(
    () => Promise.resolve({ kind: "unreachable", error: "connection refused" }),
    false,
  );
  const w = startWorker(h, runner, { maxAttempts: 1 });
  try {
    await h.post(["x"]);
    await until("tried twice", () => runner.commands.length >= 2);
  } finally {
    await w.stop();
  }
  try {
    assert.equal((await h.peek("jobs_failed")).length, 0);
    assert.equal((await h.info()).size, 1, "still in the queue");
  } finally {
    await h.close();
  }
});

Deno.test("worker: a command whose connection was lost after it started is an attempt, even while no host can be reached", async () => {
  const h = await harness();
  // It may have run (a reboot takes its own connection down): never silently again.
  const runner = new FakeRunner(
    () =>
      Promise.resolve({
        kind: "ssh-error",
        error: "connection to x dropped while the command was running",
      }),
    false,
  );
  const w = startWorker(h, runner, { maxAttempts: 1 });
  let dead: StoredMessage[] = [];
  try {
    await h.post(["x"]);
    await until(
      "dead-lettered after its one attempt",
      async () => (dead = await h.peek("jobs_failed")).length === 1,
    );
  } finally {
    await w.stop();
  }
  try {
    assert.equal(runner.commands.length, 1);
    assert.match(JSON.parse(dead[0].body).reason, /dropped while the command/);
  } finally {
    await h.close();
  }
});

Deno.test("worker: on stop, a command that outlives the grace period is stopped and its message released", async () => {
  const h = await harness();
  let started = 0;
  const runner = new FakeRunner((command, io) => {
    started++;
    if (command.endsWith("quick")) {
      return new Promise((resolve) =>
        setTimeout(() => resolve({ kind: "exit", code: 0 }), 300)
      );
    }
    return untilAborted(io);
  });
  const w = startWorker(h, runner, { shutdownGraceMs: 800 });
  await h.post([
    JSON.stringify({ args: ["slow"] }),
    JSON.stringify({ args: ["quick"] }),
  ]);
  await until("both started", () => started === 2);
  const stopping = Date.now();
  await w.stop();
  const took = Date.now() - stopping;
  try {
    assert.ok(took >= 700 && took < 3_000, `stop took ${took} ms`);
    const left = await h.peek("jobs");
    assert.equal(
      left.length,
      1,
      "the quick one was deleted, the slow one kept",
    );
    assert.deepEqual(JSON.parse(left[0].body), { args: ["slow"] });
    // Released, not left reserved: it can be reserved again right away.
    const again = await h.client.reserve(1, 30, 0);
    assert.equal(again.length, 1);
    assert.match(
      h.log.lines.join("\n"),
      /released for a retry in 0 s \(stopped by shutdown\)/,
    );
  } finally {
    await h.close();
  }
});

Deno.test("worker: a command longer than its reservation keeps it by touching", async () => {
  // The server's clock runs 20 times faster: its 30 s reservation lasts 1.5 s here.
  const h = await harness({ now: fastClock(20) });
  let release: () => void = () => {};
  const runner = new FakeRunner(() =>
    new Promise((resolve) => {
      release = () => resolve({ kind: "exit", code: 0 });
    })
  );
  const w = startWorker(h, runner, {}, { touchIntervalMs: 400 });
  try {
    await h.post(["long"]);
    await until("started", () => runner.commands.length === 1);
    await new Promise((r) => setTimeout(r, 4_000)); // 80 s of server time
    const other = await h.client.reserve(1, 30, 0);
    assert.equal(other.length, 0, "no other reserver got it while it ran");
    release();
    await until("deleted", async () => (await h.info()).size === 0);
  } finally {
    await w.stop();
    await h.close();
  }
  assert.equal(runner.commands.length, 1, "ran once");
});

// ---------------------------------------------------------------------------
// End to end: `deno task start`, the curl line it logs, a real sshd
// ---------------------------------------------------------------------------

/** A remote command that records its argv (NUL-separated) in a new file in `dir`. */
async function recorder(dir: string): Promise<string> {
  const path = `${dir}/record.sh`;
  await Deno.writeTextFile(
    path,
    `#!/bin/sh\nf=$(mktemp "${dir}/argv.XXXXXX")\nfor a in "$@"; do printf '%s\\0' "$a"; done > "$f"\necho "ran with $# args"\n`,
  );
  await Deno.chmod(path, 0o755);
  await Deno.chmod(dir, 0o777);
  return path;
}

async function recorded(dir: string): Promise<string[][]> {
  const runs: string[][] = [];
  for await (const entry of Deno.readDir(dir)) {
    if (!entry.name.startsWith("argv.")) continue;
    const parts = (await Deno.readTextFile(`${dir}/${entry.name}`)).split("\0");
    parts.pop();
    runs.push(parts);
  }
  return runs;
}

function workerEnv(sshd: Sshd, extra: Record<string, string>) {
  return {
    PATH: Deno.env.get("PATH") ?? "/usr/bin:/bin",
    HOME: sshd.dir,
    DENO_DIR: Deno.env.get("DENO_DIR") ??
      `${Deno.env.get("HOME")}/.cache/deno`,
    ...sshEnv(sshd),
    MQ_DB: ":memory:",
    MQ_PORT: String(freePort()),
    ...extra,
  };
}

Deno.test({
  name:
    "end to end: deno task start, the curl line it logs, hostile args, delete, SIGTERM",
  ...sshdTest,
  fn: () =>
    withSshd(async (sshd) => {
      const command = await recorder(sshd.dir);
      const worker = spawnCollecting(
        "deno",
        ["task", "start"],
        workerEnv(sshd, { TASK_COMMAND: command }),
      );
      let status: Deno.CommandStatus | undefined;
      try {
        const curlLine = (await worker.line(/post a test message: curl /))
          .replace(/^.*post a test message: /, "");
        const posted = await run("sh", ["-c", curlLine]);
        assert.match(posted, /"ids":\["\d+"\]/);
        await until("the first run", async () =>
          (await recorded(sshd.dir)).length === 1);
        assert.deepEqual(await recorded(sshd.dir), [[]]);
        await worker.line(/^\[127\.0\.0\.1\] out: ran with 0 args$/);

        const hostile = [
          "it's",
          "$(touch /tmp/pwned)",
          "`id`",
          "; rm -rf /",
          "a\nb",
          "",
          '"q"',
          "\\",
        ];
        const bodyFile = `${sshd.dir}/body.json`;
        await Deno.writeTextFile(
          bodyFile,
          JSON.stringify({
            messages: [{ body: JSON.stringify({ args: hostile }) }],
          }),
        );
        await run("sh", [
          "-c",
          curlLine.replace(/-d '[^']*'/, `-d @${bodyFile}`),
        ]);
        await until("the second run", async () =>
          (await recorded(sshd.dir)).length === 2);
        const runs = await recorded(sshd.dir);
        assert.ok(
          runs.some((argv) =>
            JSON.stringify(argv) === JSON.stringify(hostile)
          ),
          JSON.stringify(runs),
        );
        await worker.line(/^\[127\.0\.0\.1\] out: ran with 8 args$/);
        const url = curlLine.split(" ").at(-1)!.replace(/\/messages$/, "");
        await until("both deleted", async () => {
          const info = await (await fetch(url)).json();
          return info.queue.size === 0 && info.queue.total_messages === 2;
        });
        await assert.rejects(Deno.stat("/tmp/pwned"), Deno.errors.NotFound);
      } finally {
        status = await worker.stop();
      }
      const log = worker.lines.join("\n");
      assert.equal(status.code, 0, log);
      assert.match(
        log,
        new RegExp(`^\\[127\\.0\\.0\\.1\\] run: ${command}$`, "m"),
      );
      assert.match(log, /^stopped$/m);
    }),
});

Deno.test("permissions: only the configured hosts and files are granted", () => {
  const embedded = parseConfig(
    { MQ_DB: "/var/lib/tasks/q.sqlite", SSH_HOST: "10.1.1.73" },
    context(),
  );
  assert.deepEqual(permissionFlags(embedded, ["/srv/iron.json"], false), [
    "--allow-env",
    "--allow-net=127.0.0.1:8080,10.1.1.73:22",
    "--allow-read=/srv/iron.json,/var/lib/tasks/q.sqlite,/var/lib/tasks/q.sqlite-wal,/var/lib/tasks/q.sqlite-shm,/var/lib/tasks/q.sqlite-journal,/home/op/.ssh/known_hosts,/home/op/.ssh/id_ed25519",
    "--allow-write=/var/lib/tasks/q.sqlite,/var/lib/tasks/q.sqlite-wal,/var/lib/tasks/q.sqlite-shm,/var/lib/tasks/q.sqlite-journal",
  ]);
  const hosted = parseConfig(
    {
      IRON_TOKEN: "t0ken-value",
      IRON_PROJECT_ID: "p1",
      SSH_HOST: "::1",
      SSH_PORT: "2222",
      SSH_STRICT_HOST_KEY_CHECKING: "accept-new",
      SSH_KEY_FILE: "/keys/worker",
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
  assert.ok(!flags.join(" ").includes("t0ken-value"));
  const spaced = parseConfig({ SSH_KEY_FILE: "/my keys/id" }, context());
  assert.throws(() => permissionFlags(spaced, [], false), /space or comma/);
});

Deno.test({
  name:
    "worker with a real sshd: a failing command is released and retried; a wrong host key runs nothing",
  ...sshdTest,
  fn: () =>
    withSshd(async (sshd) => {
      const h = await harness();
      const marker = `${sshd.dir}/attempts`;
      await Deno.chmod(sshd.dir, 0o777);
      const pool = poolFor(sshd, h.log);
      const w = startWorker(h, pool, {
        command: `echo attempt >> ${marker}; echo boom >&2; exit 3`,
        maxAttempts: 1000,
      });
      try {
        await h.post(["hello world!"]);
        await until("two attempts", async () =>
          (await Deno.readTextFile(marker).catch(() =>
            ""
          )).split("\n")
            .length > 2);
      } finally {
        await w.stop();
        pool.close();
      }
      const [kept] = await h.peek("jobs");
      assert.ok(kept, "the message is still in the queue");
      assert.ok(kept.reserved_count >= 2, `reserved ${kept.reserved_count}`);
      const log = h.log.lines.join("\n");
      assert.match(log, /^\[203\.0\.113\.9\] err: boom$/m);
      assert.match(log, /^WARN \[203\.0\.113\.9\] exit: 3 /m);

      // The same message, a worker whose known_hosts names another key.
      await Deno.writeTextFile(
        sshd.knownHostsFile,
        sshd.knownHostsLine.replace(
          / \S+$/,
          " AAAAC3NzaC1lZDI1NTE5AAAAIB5g1ogk9WDyC8E6Y3hHYTdLaNUHm2dQzDgY8wUoW6uk",
        ),
      );
      await Deno.remove(marker);
      const refusing = poolFor(sshd, h.log);
      const w2 = startWorker(h, refusing, { command: `touch ${marker}` });
      try {
        await until(
          "the mismatch reported",
          () => h.log.lines.some((l) => /HOST KEY MISMATCH/.test(l)),
        );
        await new Promise((r) => setTimeout(r, 1_500));
      } finally {
        await w2.stop();
        refusing.close();
      }
      await assert.rejects(Deno.stat(marker), Deno.errors.NotFound);
      assert.equal((await h.info()).size, 1, "not deleted");
      await h.close();
    }),
});

Deno.test("worker: on stop, reserved messages that have not started go back at once", async () => {
  const h = await harness();
  const runner = new FakeRunner((_, io) => untilAborted(io));
  const w = startWorker(h, runner, { concurrency: 1, shutdownGraceMs: 100 });
  try {
    await h.post(["first", "second", "third"]);
    // One runs; one more waits reserved in the worker's backlog.
    await until(
      "one running, one waiting",
      async () => runner.commands.length === 1 && (await h.peek()).length === 1,
    );
  } finally {
    await w.stop();
  }
  try {
    assert.equal(runner.commands.length, 1, "the waiting one never ran");
    assert.equal((await h.peek()).length, 3, "all three are available again");
    assert.match(
      h.log.lines.join("\n"),
      /released for a retry in 0 s \(shutting down before it started\)/,
    );
  } finally {
    await h.close();
  }
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

Deno.test({
  name:
    "end to end: ssh-agent through deno task start; a double Ctrl-C still stops gracefully",
  ...sshdTest,
  fn: () =>
    withSshd(async (sshd) => {
      const socket = `${sshd.dir}/agent.sock`;
      const agent = new Deno.Command("ssh-agent", {
        args: ["-D", "-a", socket],
        stdout: "null",
        stderr: "null",
      }).spawn();
      try {
        await until("the agent socket", () =>
          Deno.stat(socket).then(() => true, () => false));
        await new Deno.Command("ssh-add", {
          args: [sshd.clientKeyFile],
          env: { SSH_AUTH_SOCK: socket },
          stdout: "null",
          stderr: "null",
        }).output();
        const env: Record<string, string> = {
          ...workerEnv(sshd, {
            TASK_COMMAND: "sleep 1.5; echo slept",
            SSH_AUTH_SOCK: socket,
          }),
        };
        delete env.SSH_KEY_FILE;
        const worker = spawnCollecting("deno", ["task", "start"], env);
        let status: Deno.CommandStatus | undefined;
        try {
          const curlLine = (await worker.line(/post a test message: curl /))
            .replace(/^.*post a test message: /, "");
          await run("sh", ["-c", curlLine]);
          await worker.line(/^\[127\.0\.0\.1\] run: sleep 1\.5/);
          // A terminal's Ctrl-C reaches `deno task` and the worker at once.
          const [inner] = childPids(worker.child.pid);
          assert.ok(inner, "the worker process under deno task");
          Deno.kill(worker.child.pid, "SIGINT");
          Deno.kill(inner, "SIGINT");
          await worker.line(/^\[127\.0\.0\.1\] out: slept$/);
          await worker.line(/^stopped$/, 15_000);
        } finally {
          status = await worker.stop();
        }
        const log = worker.lines.join("\n");
        assert.equal(status.code, 0, log);
        assert.doesNotMatch(log, /second stop signal/);
        assert.match(log, /exit: 0 \(message 1,/);
      } finally {
        agent.kill("SIGTERM");
        await agent.status;
      }
    }),
});

Deno.test("worker: a delete refused because the reservation expired is logged as 'may run twice'", async () => {
  // 20 times faster: the 30 s reservation is over after 1.5 s of a 2 s command.
  const h = await harness({ now: fastClock(20) });
  let runs = 0;
  const runner = new FakeRunner(async () => {
    runs++;
    if (runs === 1) await new Promise((r) => setTimeout(r, 2_000));
    return { kind: "exit", code: 0 };
  });
  const w = startWorker(h, runner, { concurrency: 1 }, {
    touchIntervalMs: 1e9, // no touching: let the reservation lapse
  });
  try {
    await h.post(["slow"]);
    await until(
      "the refused delete",
      () => h.log.lines.some((l) => /MAY RUN TWICE/.test(l)),
      10_000,
    );
  } finally {
    await w.stop();
    await h.close();
  }
  assert.match(
    h.log.lines.join("\n"),
    /WARN message 1: the command succeeded but the delete did not: its reservation had expired/,
  );
});

/**
 * The crash-safety test's lapse, step by step: a message this worker ran whose
 * reservation lapsed before its delete (the server's clock jumps past it while
 * the command runs), then handed back by this worker's own next reserve: after
 * the delete was refused, or while that delete was still in flight. The
 * worker's reserves and deletes go to the real server, each held at a gate
 * until the test opens it, so the order is the test's.
 */
async function lapsedThenReservedAgain(
  order: "after the refusal" | "while the delete is in flight",
): Promise<void> {
  const clock = jumpingClock();
  const h = await harness({ now: clock.now });
  const gates = {
    reserves: Promise.withResolvers<void>(),
    deletes: Promise.withResolvers<void>(),
  };
  let reserves = 0;
  let handedBack = false;
  let deleteAsked = false;
  const queue = Object.assign(Object.create(h.client) as IronMqClient, {
    reserve: async (...args: Parameters<IronMqClient["reserve"]>) => {
      if (++reserves > 1) await gates.reserves.promise; // the first one passes
      const messages = await h.client.reserve(...args);
      if (messages.some((m) => m.reserved_count === 2)) handedBack = true;
      return messages;
    },
    deleteBatch: async (items: Parameters<IronMqClient["deleteBatch"]>[0]) => {
      if (!deleteAsked) {
        deleteAsked = true;
        if (order === "while the delete is in flight") {
          await gates.deletes.promise;
        }
      }
      return await h.client.deleteBatch(items);
    },
  });
  let finish = () => {};
  let runs = 0;
  const runner = new FakeRunner(() =>
    ++runs > 1 ? exit(0) : new Promise((resolve) => {
      finish = () => resolve({ kind: "exit", code: 0 });
    })
  );
  const w = startWorker(h, runner, { concurrency: 1 }, {
    queue,
    touchIntervalMs: 1e9, // no touch comes before the lapse
  });
  try {
    await h.post(["once"]);
    await until("it runs", () => runner.commands.length === 1);
    clock.jump(31_000); // past its 30 s reservation
    finish();
    await until("its delete is asked for", () => deleteAsked);
    if (order === "after the refusal") {
      await until(
        "the refused delete",
        () => h.log.lines.some((l) => /MAY RUN TWICE/.test(l)),
      );
    }
    gates.reserves.resolve();
    await until("its own reserve hands it back", () => handedBack);
    gates.deletes.resolve();
    await until("deleted", async () => (await h.info()).size === 0);
  } finally {
    gates.reserves.resolve();
    gates.deletes.resolve();
    await w.stop();
    await h.close();
  }
  assert.deepEqual(runner.commands, ["run-it"], "it ran once");
  assert.match(
    h.log.lines.join("\n"),
    /message 1: reserved here again after its delete was refused; its SUCCESS outcome stands, so it is deleted under the new reservation, not run again/,
  );
}

Deno.test("worker: a message it ran whose delete was refused (its reservation lapsed) is deleted, not run again, when its own reserve hands it back", () =>
  lapsedThenReservedAgain("after the refusal"));

Deno.test("worker: a message it ran whose reservation lapsed is deleted, not run again, when its own reserve hands it back while that delete is in flight", () =>
  lapsedThenReservedAgain("while the delete is in flight"));

Deno.test("worker: starting, it reserves no more than its concurrency ahead while no processor has come back for more", async () => {
  const h = await harness();
  // Each reading at least 1 ms after the last, as on a busy machine where the
  // processors' first takes land on different milliseconds.
  let last = 0;
  const clock = {
    ...realClock,
    now: () => last = Math.max(Date.now(), last + 1),
  };
  const asked: number[] = [];
  const queue = Object.assign(Object.create(h.client) as IronMqClient, {
    reserve: (...args: Parameters<IronMqClient["reserve"]>) => {
      asked.push(args[0]);
      return h.client.reserve(...args);
    },
  });
  const runner = new FakeRunner((_, io) => untilAborted(io));
  const w = startWorker(h, runner, { concurrency: 4, shutdownGraceMs: 0 }, {
    queue,
    clock,
  });
  let held = 0;
  try {
    await h.post(Array.from({ length: 100 }, (_, i) => `m${i}`));
    await until("all four run", () => runner.commands.length === 4);
    // Its next reserve fills the processors' waiting line; none comes after
    // it while the four run.
    await until("it reserved again", () => asked.length >= 2);
    await until("that reserve answered", async () => {
      held = 100 - (await h.peek()).length;
      return held >= 4 + asked[1];
    });
  } finally {
    await w.stop();
    await h.close();
  }
  assert.ok(
    held <= 8,
    `held ${held} messages (reserves asked for ${
      asked.join(", ")
    }): four running, at most four waiting`,
  );
});

// ---------------------------------------------------------------------------
// Hostile input and failures (the worker-core issue)
// ---------------------------------------------------------------------------

Deno.test("worker: a body that starts like JSON but does not parse runs nothing and is dead-lettered with the reason", async () => {
  const h = await harness();
  const runner = new FakeRunner(() => exit(0));
  const w = startWorker(h, runner);
  const bodies = ['{"args":["--dry-run"],}', "{'args': ['--dry-run']}"];
  try {
    await h.post(bodies);
    await until(
      "both dead-lettered",
      async () => (await h.peek("jobs_failed")).length === 2,
    );
  } finally {
    await w.stop();
  }
  try {
    assert.deepEqual(runner.commands, [], "nothing ran without its --dry-run");
    const records = (await h.peek("jobs_failed")).map((m) =>
      JSON.parse(m.body)
    );
    assert.deepEqual(records.map((r) => r.body).sort(), [...bodies].sort());
    for (const record of records) {
      assert.match(record.reason, /starts like JSON but is not valid JSON/);
    }
  } finally {
    await h.close();
  }
});

Deno.test("worker: a message too large for its dead-letter record is dead-lettered whole: its body verbatim, then the record naming it", async () => {
  const h = await harness();
  const runner = new FakeRunner(() => exit(1));
  const w = startWorker(h, runner, { maxAttempts: 1 });
  // 240 KB of quotes fits one webhook post (the raw body), but escaped twice
  // inside a record it is ~960 KB: over the queue's 256 KiB per request.
  const body = '"'.repeat(240_000);
  try {
    const posted = await fetch(
      `${h.server.url}/3/projects/test/queues/jobs/webhook`,
      { method: "POST", body },
    );
    assert.equal(posted.status, 201);
    await posted.body?.cancel();
    await until(
      "the body and its record in jobs_failed",
      async () => (await h.peek("jobs_failed")).length === 2,
    );
    await until("gone from jobs", async () => (await h.info()).size === 0);
  } finally {
    await w.stop();
  }
  try {
    assert.equal(runner.commands.length, 1, "ran once, never again");
    const [verbatim, recordMessage] = await h.peek("jobs_failed");
    assert.equal(verbatim.body, body);
    const record = JSON.parse(recordMessage.body);
    assert.equal(record.body_message_id, verbatim.id);
    assert.equal(record.body, undefined);
    assert.equal(record.reason, "exit status 1");
    assert.equal(record.attempts, 1);
    assert.match(h.log.lines.join("\n"), /its body verbatim as message/);
  } finally {
    await h.close();
  }
});

Deno.test("worker: a message whose dead-letter record cannot be written stays queued, counts its attempts and never runs again", async () => {
  const h = await harness();
  const refuse = () =>
    Promise.reject(new QueueError("HTTP 413 (Request too large)", 413, false));
  // The real client, but the dead-letter queue refuses every record.
  const queue = Object.assign(Object.create(h.client) as IronMqClient, {
    post: refuse,
    postVerbatim: refuse,
  });
  const runner = new FakeRunner(() => exit(1));
  const w = startWorker(h, runner, { maxAttempts: 2 }, { queue });
  try {
    await h.post(["fails every time"]);
    await until(
      "reserved three more times after its last attempt, without running",
      () =>
        h.log.lines.filter((l) =>
          /not run again: its FAILURE dead-letter record is still to be posted/
            .test(l)
        )
          .length >= 3,
    );
  } finally {
    await w.stop();
  }
  try {
    assert.equal(runner.commands.length, 2, "ran its 2 attempts, no more");
    assert.equal((await h.info()).size, 1, "kept in the queue, not lost");
    assert.match(
      h.log.lines.join("\n"),
      /cannot record it in jobs_failed .*where it will not run again/,
    );
  } finally {
    await h.close();
  }
});

Deno.test("log format: control characters from output and messages are shown escaped, never raw", () => {
  const record = {
    category: ["tasks"],
    level: "info" as const,
    message: [
      "",
      "[h] out: a\x1b[2Kb\rc\0d\ve\u0085f\u2028g\u202eh\ti\x7fj",
      "",
    ],
    rawMessage: "",
    timestamp: 0,
    properties: {},
  };
  const line = formatRecord(record, new Secrets([]));
  assert.equal(
    line,
    "[h] out: a\\x1b[2Kb\\rc\\x00d\\x0be\\x85f\\u2028g\\u202eh\ti\\x7fj",
  );
  // deno-lint-ignore no-control-regex -- looking for raw control characters
  assert.doesNotMatch(line, /[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]/);
});

Deno.test("lines: a secret is masked before a long line is cut, so no cut leaves half of it", () => {
  const secret = "s3cr3t-token-value";
  for (const chunkSize of [1, 3, 7, 64]) {
    for (let at = 0; at < 20; at++) {
      const pieces: string[] = [];
      const splitter = new LineSplitter((l) => pieces.push(l), {
        maxLine: 16,
        secrets: new Secrets([secret]),
      });
      const text = `${"x".repeat(at)}${secret}${"y".repeat(40)}\n`;
      const bytes = new TextEncoder().encode(text);
      for (let i = 0; i < bytes.length; i += chunkSize) {
        splitter.push(bytes.subarray(i, i + chunkSize));
      }
      splitter.end();
      const shown = pieces.join("\n");
      for (const half of [secret.slice(0, 9), secret.slice(9)]) {
        assert.ok(
          !shown.includes(half),
          `chunks of ${chunkSize}, secret at ${at}: ${JSON.stringify(pieces)}`,
        );
      }
      assert.ok(pieces.every((p) => p.length <= 16 + secret.length));
    }
  }
});

Deno.test("queue client: a reply larger than its limit is not read whole", async () => {
  let sent = 0;
  const chunk = new Uint8Array(1024 * 1024).fill(0x20);
  const server = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: () => {} },
    () =>
      new Response(
        new ReadableStream({
          pull(controller) {
            // 400 MB of white space, made only as fast as it is read.
            if (sent >= 400 * chunk.length) return controller.close();
            sent += chunk.length;
            controller.enqueue(chunk);
          },
        }),
        { headers: { "content-type": "application/json" } },
      ),
  );
  try {
    const client = new IronMqClient({
      baseUrl: `http://127.0.0.1:${server.addr.port}`,
      projectId: "p",
      queueName: "q",
    });
    await assert.rejects(
      client.reserve(100, 60, 0),
      (e) => e instanceof ReplyTooLarge && /over \d+ bytes/.test(e.message),
    );
    assert.ok(sent < 64 * chunk.length, `the server sent ${sent} bytes`);
  } finally {
    await server.shutdown();
  }
});

/**
 * A TCP relay to sshd that can turn into a black hole: after `freeze()`, the
 * connections open then stay open but carry nothing (a dead route, a NAT that
 * forgot them); new connections still go through.
 */
function startRelay(targetPort: number) {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const conns: Deno.Conn[] = [];
  const frozen = new Set<Deno.Conn>();
  const pipe = async (from: Deno.Conn, to: Deno.Conn) => {
    const buffer = new Uint8Array(64 * 1024);
    try {
      for (;;) {
        const n = await from.read(buffer);
        if (n === null) break;
        if (!frozen.has(from)) await to.write(buffer.subarray(0, n));
      }
    } catch {
      // closed
    }
  };
  const accepting = (async () => {
    for await (const client of listener) {
      const server = await Deno.connect({
        hostname: "127.0.0.1",
        port: targetPort,
      });
      conns.push(client, server);
      pipe(client, server);
      pipe(server, client);
    }
  })().catch(() => {});
  return {
    port: (listener.addr as Deno.NetAddr).port,
    freeze: () => conns.forEach((c) => frozen.add(c)),
    async close() {
      listener.close();
      for (const c of conns) {
        try {
          c.close();
        } catch {
          // already closed
        }
      }
      await accepting;
    },
  };
}

Deno.test({
  name:
    "ssh: a connection that silently stops forwarding is noticed within about 15 s, and the next command runs",
  ...sshdTest,
  fn: () =>
    withSshd(async (sshd) => {
      const relay = startRelay(sshd.port);
      await Deno.writeTextFile(
        sshd.knownHostsFile,
        sshd.knownHostsLine.replace(`]:${sshd.port} `, `]:${relay.port} `) +
          "\n",
        { append: true },
      );
      const log = memoryLog();
      const pool = poolFor(sshd, log, { SSH_PORT: String(relay.port) });
      const shared = await Deno.makeTempDir();
      await Deno.chmod(shared, 0o777); // the remote user writes the marker
      const marker = `${shared}/started`;
      try {
        await pool.ready(AbortSignal.timeout(10_000));
        const running = runCollect(pool, `touch ${marker}; sleep 60`);
        await until("the command started", async () => {
          try {
            await Deno.stat(marker);
            return true;
          } catch {
            return false;
          }
        });
        relay.freeze();
        const frozenAt = Date.now();
        const { result } = await running;
        const noticedAfter = Date.now() - frozenAt;
        assert.equal(result.kind, "ssh-error");
        assert.ok(
          noticedAfter < 20_000,
          `noticed after ${noticedAfter} ms (keepalive: about 15 s at most)`,
        );
        const next = await runCollect(pool, "echo back");
        assert.deepEqual(next.result, { kind: "exit", code: 0 });
        assert.equal(next.stdout, "back\n");
      } finally {
        pool.close();
        await relay.close();
        await Deno.remove(shared, { recursive: true });
      }
    }),
});

Deno.test("retry: bad options are named with their values; it stops on a signal, and on an error that will not pass", async () => {
  const never = () => Promise.resolve(1);
  const base = { minDelayMs: 1, maxDelayMs: 10, maxAttempts: 3 };
  for (
    const [options, message] of [
      [{ ...base, minDelayMs: -1 }, /minDelayMs .* not -1/],
      [
        { ...base, maxDelayMs: 0.5 },
        /maxDelayMs must be at least minDelayMs \(1\), not 0\.5/,
      ],
      [{ ...base, maxAttempts: 0 }, /maxAttempts .* not 0/],
      [{ ...base, maxAttempts: 1.5 }, /maxAttempts .* not 1\.5/],
    ] as const
  ) {
    await assert.rejects(
      retry(never, options),
      (e) => e instanceof RangeError && message.test(e.message),
    );
  }
  let calls = 0;
  const failing = () => {
    calls++;
    return Promise.reject(new Error(`failure ${calls}`));
  };
  await assert.rejects(retry(failing, base), /failure 3/);
  assert.equal(calls, 3, "three tries in all");
  calls = 0;
  await assert.rejects(
    retry(failing, { ...base, retryable: () => false }),
    /failure 1/,
  );
  calls = 0;
  const stop = new AbortController();
  const waits: number[] = [];
  const stopped = retry(failing, {
    minDelayMs: 60_000,
    maxDelayMs: 60_000,
    maxAttempts: Infinity,
    signal: stop.signal,
    onRetry: (_, __, delayMs) => waits.push(delayMs),
  });
  await until("the first wait", () => waits.length === 1);
  stop.abort(new Error("stopped by the caller"));
  await assert.rejects(stopped, /stopped by the caller/);
  assert.equal(calls, 1, "no try after the signal");
  assert.ok(waits[0] >= 30_000 && waits[0] <= 60_000);
});

Deno.test({
  name:
    "end to end: a busy port and a locked database name the settings that get past them",
  ...sshdTest,
  fn: () =>
    withSshd(async (sshd) => {
      const taken = Deno.listen({ hostname: "127.0.0.1", port: 0 });
      const port = (taken.addr as Deno.NetAddr).port;
      const dir = await Deno.makeTempDir();
      const db = `${dir}/queue.sqlite`;
      const holder = await startQueueServer({ port: 0, dbPath: db });
      try {
        const busy = spawnCollecting(
          "deno",
          ["run", "--allow-all", "tasks.ts"],
          {
            ...workerEnv(sshd, { MQ_PORT: String(port) }),
          },
        );
        assert.equal((await busy.child.status).code, 1);
        await busy.stop();
        const said = busy.lines.join("\n");
        assert.match(said, new RegExp(`MQ_PORT=${port + 1}`));
        assert.match(
          said,
          new RegExp(
            `IRON_HOST=127\\.0\\.0\\.1 IRON_PORT=${port} IRON_SCHEME=http`,
          ),
        );
        const locked = spawnCollecting(
          "deno",
          ["run", "--allow-all", "tasks.ts"],
          { ...workerEnv(sshd, { MQ_DB: db }) },
        );
        assert.equal((await locked.child.status).code, 1);
        await locked.stop();
        assert.match(
          locked.lines.join("\n"),
          /Another queue server holds .*queue\.sqlite.*MQ_DB=/,
        );
      } finally {
        taken.close();
        await holder.close();
        await Deno.remove(dir, { recursive: true });
      }
    }),
});

// ---------------------------------------------------------------------------
// Named tasks: the catalog, Celery messages, results
// ---------------------------------------------------------------------------

const CATALOG = `
tasks:
  os_release:
    command: cat /etc/os-release
  restart:
    command: echo restarting {{service}}
    params:
      service: {enum: [nginx, app]}
    timeout: 60
    max_attempts: 3
  deploy:
    command: printf '%s|' {{version}} {{dry_run}} {{count}} {{ratio}} {{token}}
    params:
      version: {pattern: '^v[0-9]+\\.[0-9]+\\.[0-9]+$', max_length: 12}
      dry_run: {type: boolean, default: false}
      count: {type: integer, min: 1, max: 10, default: 1}
      ratio: {type: number, min: 0, max: 1, default: 0.5}
      token: {secret: true, required: false}
  fail:
    command: echo {{why}} >&2; exit 3
    params:
      why: {secret: true}
    max_attempts: 1
default: os_release
`;

function catalog(text = CATALOG) {
  return parseCatalog("tasks.yaml", text, {
    timeoutMs: 0,
    maxAttempts: 5,
    host: HOST_DEFAULTS,
  })
    .catalog;
}

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

Deno.test({
  name:
    "named tasks: against a real sshd, results carry every field; invalid values run nothing and are dead-lettered; secrets never show",
  ...sshdTest,
  fn: () =>
    withSshd(async (sshd) => {
      const h = await harness();
      const pool = poolFor(sshd, h.log);
      const secret = "s3cr3t-t0ken value";
      const w = startWorker(h, pool, { catalog: catalog() }, {
        secrets: new Secrets([]),
      });
      const celery = (fields: Record<string, unknown>) =>
        JSON.stringify({ retries: 0, eta: null, expires: null, ...fields });
      try {
        await h.post([
          celery({
            id: "ok-1",
            task: "deploy",
            args: ["v1.2.3"],
            kwargs: { dry_run: true, count: 10, token: secret },
            reply_to: "replies",
          }),
          celery({
            id: "bad-1",
            task: "restart",
            kwargs: { service: "apache" },
            reply_to: "replies",
          }),
          celery({
            id: "fail-1",
            task: "fail",
            args: [`because ${secret}`],
            reply_to: "replies",
          }),
        ]);
        await untilResults(h, 3);
      } finally {
        await w.stop();
        pool.close();
      }
      try {
        const results = new Map(
          (await h.peek("replies")).map((m) => {
            const r = JSON.parse(m.body);
            return [r.task_id, r];
          }),
        );
        const ok = results.get("ok-1");
        assert.equal(ok.status, "SUCCESS");
        assert.equal(ok.task, "deploy");
        assert.equal(typeof ok.message_id, "string");
        assert.equal(ok.attempts, 1);
        assert.equal(ok.reason, null);
        assert.ok(Date.parse(ok.started_at) <= Date.parse(ok.finished_at));
        const host = ok.hosts["203.0.113.9"];
        assert.deepEqual(
          { ...host, duration_ms: typeof host.duration_ms },
          {
            exit_status: 0,
            signal: null,
            duration_ms: "number",
            stdout: "v1.2.3|true|10|0.5|[redacted]|\n",
            stderr: "",
            truncated: { stdout: false, stderr: false },
            error: null,
          },
        );
        const bad = results.get("bad-1");
        assert.equal(bad.status, "REJECTED");
        assert.deepEqual(bad.hosts, {});
        assert.equal(bad.started_at, null);
        assert.match(bad.reason, /service: "apache" must be one of nginx, app/);
        const fail = results.get("fail-1");
        assert.equal(fail.status, "FAILURE");
        assert.equal(fail.hosts["203.0.113.9"].exit_status, 3);
        assert.equal(fail.hosts["203.0.113.9"].stderr, "[redacted]\n");
        const dead = (await h.peek("jobs_failed")).map((m) =>
          JSON.parse(m.body)
        );
        assert.deepEqual(dead.map((r) => r.task_id).sort(), [
          "bad-1",
          "fail-1",
        ]);
        const all = [
          ...h.log.lines,
          ...(await h.peek("replies")).map((m) => m.body),
        ].join("\n");
        assert.ok(!all.includes(secret), "the secret parameter never shows");
        assert.ok(!all.includes("s3cr3t-t0ken"), "nor a piece of it");
      } finally {
        await h.close();
      }
    }),
});

Deno.test("named tasks: an eta holds a message back without running it; an expired one is revoked, never run", async () => {
  const h = await harness();
  const runner = new FakeRunner(() => exit(0));
  const w = startWorker(h, runner, { catalog: catalog() });
  const eta = Date.now() + 2_000;
  try {
    await h.post([
      JSON.stringify({
        id: "later",
        task: "restart",
        args: ["app"],
        eta: new Date(eta).toISOString(),
        reply_to: "replies",
      }),
      JSON.stringify({
        id: "stale",
        task: "restart",
        args: ["app"],
        expires: new Date(Date.now() - 1_000).toISOString(),
        reply_to: "replies",
      }),
    ]);
    await untilResults(h, 2);
  } finally {
    await w.stop();
  }
  try {
    assert.equal(runner.commands.length, 1, "only the held one ran, once");
    const results = (await h.peek("replies")).map((m) => JSON.parse(m.body));
    const later = results.find((r) => r.task_id === "later");
    const stale = results.find((r) => r.task_id === "stale");
    assert.equal(later.status, "SUCCESS");
    assert.equal(later.attempts, 1, "holding back is no attempt");
    assert.ok(
      Date.parse(later.started_at) >= eta - 1_000,
      `ran at ${later.started_at}, eta ${new Date(eta).toISOString()}`,
    );
    assert.equal(stale.status, "REVOKED");
    assert.match(stale.reason, /expired at .* before it ran/);
    assert.equal((await h.info()).size, 0, "both gone from the queue");
    assert.match(h.log.lines.join("\n"), /held back until its eta/);
  } finally {
    await h.close();
  }
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

Deno.test({
  name:
    "named tasks: a bad catalog stops the worker at start, every problem named",
  ...sshdTest,
  fn: () =>
    withSshd(async (sshd) => {
      const dir = await Deno.makeTempDir();
      const file = `${dir}/tasks.yaml`;
      await Deno.writeTextFile(
        file,
        "tasks:\n  a:\n    command: run {{x}}\n  b:\n    command: go\n    params:\n      n: {type: integer, default: nope}\n",
      );
      try {
        const worker = spawnCollecting(
          "deno",
          ["run", "--allow-all", "tasks.ts"],
          workerEnv(sshd, { TASKS_FILE: file, TASK_CONCURRENCY: "zero" }),
        );
        assert.equal((await worker.child.status).code, 2);
        await worker.stop();
        const said = worker.lines.join("\n");
        assert.match(said, /^FATAL invalid configuration:/m);
        assert.match(said, /TASK_CONCURRENCY="zero"/);
        assert.match(
          said,
          /tasks\.yaml: tasks\.a\.command: \{\{x\}\} has no parameter/,
        );
        assert.match(
          said,
          /tasks\.yaml: tasks\.b\.params\.n\.default: must be an integer, not string "nope"/,
        );
      } finally {
        await Deno.remove(dir, { recursive: true });
      }
    }),
});

Deno.test("worker: after a stop, no waiting message starts, even when a processor frees up", async () => {
  const h = await harness();
  const runner = new FakeRunner((_, io) => untilAborted(io));
  const w = startWorker(h, runner, { concurrency: 2, shutdownGraceMs: 100 });
  try {
    await h.post(["1", "2", "3", "4", "5", "6"]);
    await until(
      "two running, more held",
      async () => runner.commands.length === 2 && (await h.peek()).length < 4,
    );
  } finally {
    await w.stop();
  }
  try {
    assert.equal(runner.commands.length, 2, "nothing started after the stop");
    assert.equal((await h.peek()).length, 6, "all six are available again");
  } finally {
    await h.close();
  }
});

Deno.test("worker: a message whose reservation lapsed while it ran, and that the worker reserved again, runs once", async () => {
  // 20 times faster: the 30 s reservation lapses after 1.5 s of a 2.5 s command.
  const h = await harness({ now: fastClock(20) });
  const runner = new FakeRunner(async () => {
    await new Promise((r) => setTimeout(r, 2_500));
    return { kind: "exit", code: 0 };
  });
  const w = startWorker(h, runner, { concurrency: 2 }, {
    touchIntervalMs: 1e9, // no touching: let the reservation lapse
  });
  try {
    await h.post(["once"]);
    await until(
      "reserved again",
      () =>
        h.log.lines.some((l) =>
          /reserved again while this worker held it/.test(l)
        ),
      10_000,
    );
    await until("deleted", async () => (await h.info()).size === 0, 10_000);
  } finally {
    await w.stop();
  }
  try {
    assert.equal(runner.commands.length, 1, "one message, one run");
  } finally {
    await h.close();
  }
});

Deno.test("worker: an unexpected error in the processing step releases the message instead of holding it", async () => {
  const h = await harness();
  let calls = 0;
  const runner = new FakeRunner(() => {
    calls++;
    if (calls === 1) throw new Error("boom");
    return exit(0);
  });
  const w = startWorker(h, runner, { concurrency: 1 });
  try {
    await h.post(["x"]);
    await until("ran after the error", () => calls === 2);
    await until("deleted", async () => (await h.info()).size === 0);
  } finally {
    await w.stop();
  }
  try {
    assert.match(h.log.lines.join("\n"), /unexpected error: boom/);
    assert.match(
      h.log.lines.join("\n"),
      /released for a retry in 0 s \(unexpected error\)/,
    );
  } finally {
    await h.close();
  }
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
