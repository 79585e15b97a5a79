/**
 * The monitor's listener (lib/monitor.ts) as a person and Prometheus see it: the page
 * in a real headless Chromium (Debian's, driven by compat/browser.ts), the
 * metrics checked by promtool, the HTTP rules over real HTTP on 127.0.0.1.
 */
import assert from "node:assert/strict";
import { parseCatalog } from "./catalog.ts";
import { parseConfig, permissionFlags } from "./config.ts";
import { DeadLetters, maskedBody } from "./dead_letters.ts";
import { Secrets } from "./log.ts";
import { ConfigError } from "./util.ts";
import { Monitor, type ServeOptions } from "./monitor.ts";
import { HookReceiver } from "./hooks.ts";
import {
  checkMetrics,
  freePort,
  needs,
  PROMTOOL,
  type Sshd,
  sshdMissing,
  sshEnv,
  toolMissing,
  withSshd,
} from "../test/sshd.ts";
import {
  REPO,
  spawnCollecting,
  startTestQueue,
  type TestQueue,
} from "../test/support.ts";

const CHROMIUM = "/usr/bin/chromium";
const browserTest = needs(
  toolMissing(CHROMIUM, "chromium"),
  "the browser tests",
);
const promtoolTest = needs(
  toolMissing(PROMTOOL, "prometheus"),
  "the promtool test",
);

// ---------------------------------------------------------------------------
// The browser: compat/browser.ts in a subprocess, one JSON request a line
// ---------------------------------------------------------------------------

interface Tab {
  goto(url: string): Promise<void>;
  /** Waits until `expression` (JavaScript, in the page) is truthy. */
  waitFor(expression: string, timeoutMs?: number): Promise<void>;
  value<T>(expression: string): Promise<T>;
  click(selector: string): Promise<void>;
  fill(selector: string, value: string): Promise<void>;
  screenshot(path: string, fullPage?: boolean): Promise<void>;
  /** Uncaught exceptions and console errors so far (a CSP refusal is one). */
  errors(): Promise<string[]>;
}

interface Browser {
  open(options: { width: number; height: number; mobile?: boolean }): Promise<
    Tab
  >;
}

async function withBrowser(fn: (browser: Browser) => Promise<void>) {
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "--quiet",
      "--config",
      `${REPO}compat/deno.json`,
      "--allow-all",
      `${REPO}compat/browser.ts`,
      CHROMIUM,
    ],
    env: { NO_COLOR: "1" },
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const writer = child.stdin.getWriter();
  const pending = new Map<
    number,
    { resolve(v: unknown): void; reject(e: Error): void }
  >();
  let stderr = "";
  const readErrors = (async () => {
    for await (
      const chunk of child.stderr.pipeThrough(new TextDecoderStream())
    ) stderr += chunk;
  })();
  const reading = (async () => {
    let buffer = "";
    for await (
      const chunk of child.stdout.pipeThrough(new TextDecoderStream())
    ) {
      buffer += chunk;
      let end: number;
      while ((end = buffer.indexOf("\n")) >= 0) {
        const reply = JSON.parse(buffer.slice(0, end));
        buffer = buffer.slice(end + 1);
        const waiter = pending.get(reply.id);
        pending.delete(reply.id);
        if (reply.ok) waiter?.resolve(reply.value);
        else waiter?.reject(new Error(`browser: ${reply.error}`));
      }
    }
    for (const waiter of pending.values()) {
      waiter.reject(new Error(`the browser driver ended: ${stderr}`));
    }
  })();
  let nextId = 1;
  const request = (op: string, args: Record<string, unknown> = {}) => {
    const id = nextId++;
    const answer = new Promise<unknown>((resolve, reject) =>
      pending.set(id, { resolve, reject })
    );
    writer.write(
      new TextEncoder().encode(JSON.stringify({ id, op, ...args }) + "\n"),
    );
    return answer;
  };
  const browser: Browser = {
    async open(options) {
      const page = await request("open", options);
      const on = (op: string, args: Record<string, unknown> = {}) =>
        request(op, { page, ...args });
      return {
        goto: async (url) => void await on("goto", { url }),
        waitFor: async (expression, timeoutMs = 30_000) =>
          void await on("waitFor", { expression, timeoutMs }),
        value: async <T>(expression: string) =>
          await on("evaluate", { expression }) as T,
        click: async (selector) => void await on("click", { selector }),
        fill: async (selector, value) =>
          void await on("fill", { selector, value }),
        screenshot: async (path, fullPage = false) =>
          void await on("screenshot", { path, fullPage }),
        errors: async () => await on("errors") as string[],
      };
    },
  };
  try {
    await fn(browser);
  } finally {
    await writer.close();
    const status = await child.status;
    await reading;
    await readErrors;
    assert.equal(status.code, 0, `the browser driver failed: ${stderr}`);
  }
}

// ---------------------------------------------------------------------------
// A Monitor, served on a free loopback port
// ---------------------------------------------------------------------------

interface Served {
  monitor: Monitor;
  url: string;
  log: string[];
  /** The queue server behind the dead letters: work queue "jobs", dead letters "jobs_failed". */
  queue: TestQueue;
}

const SECRET = "hunter2-deploy-token";
/** A catalog whose deploy task has a secret parameter, as the worker's maskBody reads it. */
const CATALOG = parseCatalog(
  "tasks.yaml",
  `
tasks:
  deploy:
    command: /srv/app/bin/deploy --release {{version}} --token {{token}}
    params:
      version: {}
      token: { secret: true }
`,
  { timeoutMs: 0, maxAttempts: 3, host: { user: "op", port: 22, jump: [] } },
).catalog;

/** A dead-letter record as the worker writes it (Settler.recordDeadLetter). */
function deadRecord(fields: Record<string, unknown>): string {
  return JSON.stringify({
    queue: "jobs",
    id: "17",
    task: "deploy",
    body: JSON.stringify({ task: "deploy", args: ["v1.4.1", SECRET] }),
    attempts: 3,
    reason: "exit status 3",
    exit_status: 3,
    stderr_tail: "error: the health check failed after 30 s\n",
    failed_at: new Date(Date.now() - 3_600_000).toISOString(),
    hosts: { "10.1.1.73": { exit_status: 3 } },
    ...fields,
  });
}

/** A Monitor served on a free loopback port, its dead letters on a real queue server. */
async function withMonitor(
  options: Partial<ServeOptions>,
  fn: (served: Served) => Promise<void>,
): Promise<void> {
  const queue = await startTestQueue({}, "test", "jobs");
  const monitor = new Monitor();
  const log: string[] = [];
  const secrets = new Secrets(options.token ? [options.token] : []);
  try {
    const server = await monitor.serve({
      hostname: "127.0.0.1",
      port: 0,
      deadLetters: new DeadLetters(queue.client, "jobs_failed"),
      maskBody: (body) => maskedBody(body, CATALOG, secrets),
      log: (line) => log.push(line),
      ...options,
    });
    try {
      await fn({ monitor, url: server.url, log, queue });
    } finally {
      await server.close();
    }
  } finally {
    await queue.close();
  }
}

const runSelector = (runId: string) => `[data-run="${runId}"]`;
const outputLines = (runId: string) =>
  `[...document.querySelectorAll('${
    runSelector(runId)
  } .output > div')].map((d) => d.textContent)`;

/** A few hosts, results and a running command: what a worker's page shows on a normal day. */
function feedADay(monitor: Monitor, now: number): void {
  monitor.queueRequest("ensure_queue", 200);
  monitor.queueRequest("reserve", 200);
  for (const host of ["10.1.1.73", "10.1.1.74", "10.1.2.10"]) {
    monitor.hostState(host, "connected");
    monitor.sshConnections(host, 1);
  }
  monitor.hostState(
    "10.1.2.10",
    "unreachable",
    "connect ECONNREFUSED 10.1.2.10:22; next try in 8 s",
  );
  monitor.sshConnections("10.1.2.10", 0);
  const host = (code: number, stdout: string, stderr = "", ms = 412) => ({
    exit_status: code,
    signal: null,
    duration_ms: ms,
    stdout,
    stderr,
    error: null,
  });
  monitor.messageSettled({
    messageId: "38",
    task: "os_release",
    outcome: "success",
    hosts: {
      "10.1.1.73": host(0, 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n'),
      "10.1.1.74": host(0, 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n'),
    },
    finishedAt: now - 95_000,
  });
  monitor.messageSettled({
    messageId: "39",
    task: "restart",
    outcome: "retry",
    hosts: {
      "10.1.1.73": host(0, "", "", 2_210),
      "10.1.2.10": {
        exit_status: null,
        signal: null,
        duration_ms: 5_004,
        stdout: "",
        stderr: "",
        error: "connect ECONNREFUSED 10.1.2.10:22",
      },
    },
    finishedAt: now - 61_000,
    reason: "1 of 2 hosts failed: 10.1.2.10 (SSH: connect ECONNREFUSED)",
  });
  monitor.messageSettled({
    messageId: "40",
    task: "logs",
    outcome: "rejected",
    hosts: {},
    finishedAt: now - 30_000,
    reason: 'parameter "lines": must be at most 1000 (got 5000)',
  });
}

// ---------------------------------------------------------------------------
// The page
// ---------------------------------------------------------------------------

/**
 * A real worker through ./start, run from `dir` (its HOME and where its
 * files go), on `sshd`, its embedded queue in memory on `mqPort`.
 */
function startInDir(
  dir: string,
  sshd: Sshd,
  mqPort: number,
  env: Record<string, string>,
) {
  return spawnCollecting(`${REPO}start`, [], {
    PATH: Deno.env.get("PATH") ?? "/usr/bin:/bin",
    HOME: dir,
    INIT_CWD: dir,
    DENO_DIR: Deno.env.get("DENO_DIR") ?? `${Deno.env.get("HOME")}/.cache/deno`,
    NO_COLOR: "1",
    ...sshEnv(sshd),
    MQ_PORT: String(mqPort),
    MQ_DB: ":memory:",
    ...env,
  }, dir);
}

Deno.test({
  name:
    "web: the page shows a long command's output line by line while it runs",
  ...browserTest,
  fn: () =>
    withMonitor(
      {},
      ({ monitor, url, queue }) =>
        withBrowser(async (browser) => {
          const now = Date.now();
          feedADay(monitor, now);
          await queue.client.post("jobs_failed", [deadRecord({})]);
          const tab = await browser.open({ width: 1280, height: 800 });
          await tab.goto(url);
          await tab.waitFor(`document.querySelector("[data-dead]")`);
          await tab.waitFor(
            `document.getElementById("live").textContent === "live"`,
          );
          await tab.waitFor(
            `document.querySelectorAll("#results details").length === 3`,
          );

          monitor.commandStarted({
            runId: "r1",
            messageId: "41",
            task: "deploy",
            host: "10.1.1.73",
            command: "/srv/app/bin/deploy --release v1.4.2",
            startedAt: now - 42_000,
          });
          await tab.waitFor(`document.querySelector('${runSelector("r1")}')`);
          const shown: string[] = [];
          const steps = [
            "fetching release v1.4.2",
            "unpacking 312 files",
            "migrating the database: 3 migrations",
            "restarting app.service",
            "waiting for the health check",
          ];
          for (const line of steps) {
            monitor.commandOutput("r1", "out", line);
            shown.push(line);
            // This line is on the page, and nothing past it: it came as it ran.
            await tab.waitFor(
              `${outputLines("r1")}.length === ${shown.length}`,
            );
            assert.deepEqual(await tab.value(outputLines("r1")), shown);
            assert.equal(
              await tab.value(
                `document.querySelector('${
                  runSelector("r1")
                } .badge').textContent`,
              ),
              "running",
            );
          }
          monitor.commandOutput("r1", "err", "warning: 2 old releases kept");
          await tab.waitFor(
            `document.querySelector('${runSelector("r1")} .output .err')`,
          );
          assert.equal(
            await tab.value(
              `document.getElementById("running-count").textContent`,
            ),
            "1",
          );
          assert.match(
            await tab.value<string>(
              `document.getElementById("ready").textContent`,
            ),
            /^ready$/,
          );
          // The README's picture: rewritten when asked for (TASKS_SCREENSHOT=1),
          // so that a test run leaves the repository as it was.
          const shot = Deno.env.get("TASKS_SCREENSHOT") === "1"
            ? `${REPO}docs/page.png`
            : `${await Deno.makeTempDir()}/page.png`;
          await tab.screenshot(shot, true);
          assert.ok((await Deno.stat(shot)).size > 10_000, "a screenshot");
          if (!shot.startsWith(REPO)) {
            await Deno.remove(shot.replace(/\/page\.png$/, ""), {
              recursive: true,
            });
          }

          monitor.commandEnded("r1", {
            result: { kind: "exit", code: 0 },
            finishedAt: Date.now(),
          });
          await tab.waitFor(
            `document.querySelector('${
              runSelector("r1")
            } .badge').textContent === "exit 0"`,
          );
          assert.deepEqual(await tab.errors(), []);
        }),
    ),
});

Deno.test({
  name:
    "web: on a phone the page fits the screen's width (no sideways scrolling)",
  ...browserTest,
  fn: () =>
    withMonitor({}, ({ monitor, url }) =>
      withBrowser(async (browser) => {
        const now = Date.now();
        feedADay(monitor, now);
        monitor.hostState(
          "a-very-long-host-name-of-a-build-server.eu-central-1.compute.internal",
          "unreachable",
          "getaddrinfo ENOTFOUND a-very-long-host-name-of-a-build-server.eu-central-1.compute.internal",
        );
        monitor.commandStarted({
          runId: "r1",
          messageId: "41",
          task: "deploy",
          host: "10.1.1.73",
          command: `/srv/app/bin/deploy ${"--flag ".repeat(40)}`,
          startedAt: now,
        });
        monitor.commandOutput("r1", "out", "x".repeat(500));
        monitor.commandOutput("r1", "err", "a long line ".repeat(40));
        const tab = await browser.open({
          width: 390,
          height: 844,
          mobile: true,
        });
        await tab.goto(url);
        await tab.waitFor(`${outputLines("r1")}.length === 2`);
        await tab.click(`[data-message="39"] summary`); // opened, with its hosts
        await tab.waitFor(`document.querySelector('[data-message="39"]').open`);
        const widths = await tab.value<{ scroll: number; client: number }>(
          `({ scroll: document.documentElement.scrollWidth, client: document.documentElement.clientWidth })`,
        );
        assert.ok(
          widths.scroll <= widths.client,
          `the page is ${widths.scroll} px wide on a ${widths.client} px screen`,
        );
        // One column: the sections are stacked, each as wide as the screen allows.
        const lefts = await tab.value<number[]>(
          `[...document.querySelectorAll("section")].map((s) => Math.round(s.getBoundingClientRect().left))`,
        );
        assert.equal(new Set(lefts).size, 1, `sections start at ${lefts}`);
        assert.deepEqual(await tab.errors(), []);
      })),
});

Deno.test({
  name: "web: output and names show as text on the page, never as markup",
  ...browserTest,
  fn: () =>
    withMonitor({}, ({ monitor, url }) =>
      withBrowser(async (browser) => {
        const tab = await browser.open({ width: 1280, height: 800 });
        await tab.goto(url);
        await tab.waitFor(
          `document.getElementById("live").textContent === "live"`,
        );
        const markup =
          `<img src=x onerror="document.title='pwned'"><b>bold</b>`;
        monitor.hostState(`<i>host</i>`, "connected", markup);
        monitor.commandStarted({
          runId: "r<1>",
          messageId: "<m>",
          task: `<script>alert(1)</script>`,
          host: "10.1.1.73",
          command: markup,
          startedAt: Date.now(),
        });
        monitor.commandOutput("r<1>", "out", markup);
        await tab.waitFor(
          `[...document.querySelectorAll(".run .output > div")].some((d) => d.textContent === ${
            JSON.stringify(markup)
          })`,
        );
        assert.equal(
          await tab.value(
            `document.querySelectorAll("main img, main b, main i, main script").length`,
          ),
          0,
        );
        assert.notEqual(await tab.value(`document.title`), "pwned");
        assert.match(
          await tab.value<string>(
            `document.querySelector(".run .what").textContent`,
          ),
          /^<script>alert\(1\)<\/script> on 10\.1\.1\.73$/,
        );
        assert.deepEqual(await tab.errors(), []);
      })),
});

const deadCard = (id: string) => `[data-dead="${id}"]`;
const noticeText = `document.getElementById("notice").textContent`;

Deno.test({
  name:
    "web: a dead letter runs again from the page: its body goes back to its queue as it was",
  ...browserTest,
  fn: () =>
    withMonitor(
      {},
      ({ monitor, url, queue }) =>
        withBrowser(async (browser) => {
          const body = JSON.stringify({
            task: "deploy",
            args: ["v1.4.1", SECRET],
          });
          const tab = await browser.open({ width: 1280, height: 800 });
          await tab.goto(url);
          await tab.waitFor(
            `document.getElementById("live").textContent === "live"`,
          );
          // The worker dead-letters a message: the page shows it without a reload.
          const [id] = await queue.client.post("jobs_failed", [
            deadRecord({ body }),
          ]);
          monitor.deadLettered("deploy");
          await tab.waitFor(`document.querySelector('${deadCard(id)}')`);
          const shown = await tab.value<string>(
            `document.querySelector('${deadCard(id)}').innerText`,
          );
          assert.match(shown, /v1\.4\.1/);
          assert.match(shown, /\[redacted\]/);
          assert.ok(!shown.includes(SECRET), shown);
          assert.match(shown, /exit status 3/);

          await tab.click(`${deadCard(id)} .requeue`);
          await tab.waitFor(`${noticeText}.includes("queued again")`);
          const [requeued] = await queue.peek("jobs");
          assert.equal(requeued.body, body);
          assert.equal(
            await tab.value(noticeText),
            `Dead letter ${id} is queued again as message ${requeued.id}.`,
          );
          await tab.waitFor(`!document.querySelector('${deadCard(id)}')`);
          assert.deepEqual(await queue.peek("jobs_failed"), []);

          // A body too large for the record is a message of its own: one
          // card all the same, and Run again sends that body.
          const large = "x".repeat(200_000);
          const [bodyId] = await queue.client.postVerbatim(
            "jobs_failed",
            large,
          );
          const [recordId] = await queue.client.post("jobs_failed", [
            deadRecord({ body: null, body_message_id: bodyId }),
          ]);
          monitor.deadLettered("deploy");
          await tab.waitFor(`document.querySelector('${deadCard(recordId)}')`);
          assert.equal(
            await tab.value(`document.querySelectorAll("[data-dead]").length`),
            1,
          );
          assert.match(
            await tab.value<string>(
              `document.querySelector('${deadCard(recordId)}').innerText`,
            ),
            new RegExp(`kept verbatim in message ${bodyId}`),
          );
          await tab.click(`${deadCard(recordId)} .requeue`);
          await tab.waitFor(`!document.querySelector('${deadCard(recordId)}')`);
          const bodies = (await queue.peek("jobs")).map((m) => m.body);
          assert.deepEqual(bodies, [body, large]);
          assert.deepEqual(await queue.peek("jobs_failed"), []);
          assert.deepEqual(await tab.errors(), []);
        }),
    ),
});

Deno.test({
  name:
    "web: a dead letter discarded from the page is gone; a second click confirms it",
  ...browserTest,
  fn: () =>
    withMonitor({}, ({ url, queue, log }) =>
      withBrowser(async (browser) => {
        const [keep, drop] = await queue.client.post("jobs_failed", [
          deadRecord({ id: "17" }),
          deadRecord({ id: "18", reason: "exit status 1" }),
        ]);
        const tab = await browser.open({
          width: 390,
          height: 844,
          mobile: true,
        });
        await tab.goto(url);
        await tab.waitFor(
          `document.querySelectorAll("[data-dead]").length === 2`,
        );
        await tab.click(`${deadCard(drop)} .discard`);
        // One click only arms it.
        assert.equal(
          await tab.value(
            `document.querySelector('${deadCard(drop)} .discard').textContent`,
          ),
          "Discard for good?",
        );
        assert.equal((await queue.peek("jobs_failed")).length, 2);
        await tab.click(`${deadCard(drop)} .discard`);
        await tab.waitFor(`${noticeText} === "Dead letter ${drop} discarded."`);
        await tab.waitFor(
          `document.querySelectorAll("[data-dead]").length === 1`,
        );
        assert.deepEqual(
          (await queue.peek("jobs_failed")).map((m) => m.id),
          [keep],
        );
        assert.deepEqual(await queue.peek("jobs"), []); // nothing ran again
        assert.ok(
          log.some((l) => l.startsWith(`web: dead letter ${drop} discarded`)),
          log.join("\n"),
        );

        // Gone meanwhile (another tab, `deno task dlq`): the page says so.
        await queue.api("DELETE", `/queues/jobs_failed/messages/${keep}`, {});
        await tab.click(`${deadCard(keep)} .requeue`);
        await tab.waitFor(
          `document.getElementById("notice").className === "bad"`,
        );
        assert.match(
          await tab.value<string>(noticeText),
          new RegExp(`no message "${keep}"`),
        );
        await tab.waitFor(
          `document.querySelectorAll("[data-dead]").length === 0`,
        );
        // The browser logs the refused request; nothing else went wrong.
        assert.deepEqual(await tab.errors(), [
          "Failed to load resource: the server responded with a status of 409 (Conflict)",
        ]);
      })),
});

// ---------------------------------------------------------------------------
// Access
// ---------------------------------------------------------------------------

const TOKEN = "s3cret-t0ken-0123456789";

/** One HTTP/1.1 request over a raw connection (a Host header fetch would not send); status and body. */
async function rawRequest(
  url: string,
  lines: string[],
): Promise<{ status: number; body: string }> {
  const { hostname, port } = new URL(url);
  const conn = await Deno.connect({ hostname, port: Number(port) });
  try {
    await conn.write(
      new TextEncoder().encode(
        [...lines, "Connection: close", "", ""].join("\r\n"),
      ),
    );
    let text = "";
    for await (
      const chunk of conn.readable.pipeThrough(new TextDecoderStream())
    ) {
      text += chunk;
    }
    const status = Number(/^HTTP\/1\.1 (\d{3})/.exec(text)?.[1]);
    return { status, body: text.slice(text.indexOf("\r\n\r\n") + 4) };
  } catch (e) {
    conn.close();
    throw e;
  }
}

async function get(
  url: string,
  headers: Record<string, string> = {},
): Promise<{ status: number; body: string; headers: Headers }> {
  const response = await fetch(url, { headers });
  return {
    status: response.status,
    body: await response.text(),
    headers: response.headers,
  };
}

Deno.test("web: a non-loopback listener without TASK_HTTP_TOKEN is a configuration problem", () => {
  const context = {
    home: "/home/op",
    user: "op",
    ironJsonFiles: [],
    exists: (path: string) => path === "/home/op/.ssh/id_ed25519",
  };
  const problems = (env: Record<string, string>) => {
    try {
      parseConfig(env, context);
      return [];
    } catch (e) {
      if (e instanceof ConfigError) return e.problems;
      throw e;
    }
  };
  assert.equal(parseConfig({}, context).http, undefined); // off by default
  const open = problems({
    TASK_HTTP_PORT: "9100",
    TASK_HTTP_HOST: "0.0.0.0",
    TASK_CONCURRENCY: "0",
  });
  assert.equal(open.length, 2, open.join("\n")); // listed with the others
  assert.match(
    open.join("\n"),
    /TASK_HTTP_HOST=0\.0\.0\.0: a non-loopback address needs TASK_HTTP_TOKEN/,
  );
  assert.match(
    problems({ TASK_HTTP_PORT: "9100", TASK_HTTP_TOKEN: "short" }).join(),
    /TASK_HTTP_TOKEN: must be at least 16 printable ASCII characters .*\(value not shown\)/,
  );
  assert.match(problems({ TASK_HTTP_PORT: "http" }).join(), /TASK_HTTP_PORT/);

  const local = parseConfig({ TASK_HTTP_PORT: "9100" }, context);
  assert.deepEqual(local.http, {
    hostname: "127.0.0.1",
    port: 9100,
    token: undefined,
  });
  const shared = parseConfig({
    TASK_HTTP_PORT: "9100",
    TASK_HTTP_HOST: "0.0.0.0",
    TASK_HTTP_TOKEN: TOKEN,
  }, context);
  const flags = permissionFlags(shared, [], false);
  assert.ok(flags.includes("--allow-env"));
  const net = flags.find((f) => f.startsWith("--allow-net="))!.split(/[=,]/);
  assert.ok(net.includes("0.0.0.0:9100"), flags.join(" "));
  const read = flags.find((f) => f.startsWith("--allow-read="))!.split(/[=,]/);
  assert.ok(read.includes(`${REPO}lib/page.html`), flags.join(" "));
  assert.ok(!flags.join(" ").includes(TOKEN));
});

Deno.test({
  name:
    "web: with a token, a request without it is refused (401) and the page asks for it",
  ...browserTest,
  fn: () =>
    withMonitor(
      { token: TOKEN },
      ({ monitor, url, log }) =>
        withBrowser(async (browser) => {
          monitor.queueRequest("reserve", 200);
          for (
            const path of [
              "/metrics",
              "/readyz",
              "/events",
              "/api/dead-letters",
            ]
          ) {
            for (
              const headers of [
                {} as Record<string, string>,
                { Authorization: "Bearer wrong-token-0123456789" },
                { Authorization: `OAuth ${TOKEN}` },
              ]
            ) {
              const reply = await get(url + path, headers);
              assert.equal(
                reply.status,
                401,
                `${path} ${JSON.stringify(headers)}`,
              );
              assert.match(
                reply.headers.get("www-authenticate") ?? "",
                /^Bearer/,
              );
              assert.match(reply.body, /TASK_HTTP_TOKEN/);
            }
          }
          const refused = await fetch(`${url}/api/dead-letters/1/discard`, {
            method: "POST",
          });
          await refused.body?.cancel();
          assert.equal(refused.status, 401);
          const authorized = { Authorization: `Bearer ${TOKEN}` };
          assert.equal((await get(`${url}/readyz`, authorized)).status, 200);
          assert.equal((await get(`${url}/metrics`, authorized)).status, 200);
          // The page and the liveness probe are open: they hold nothing.
          assert.equal((await get(`${url}/healthz`)).body, "ok\n");
          assert.equal((await get(url)).status, 200);
          // With a token any Host may be used (a name in front of the worker).
          const named = await rawRequest(url, [
            "GET /readyz HTTP/1.1",
            "Host: tasks.example.org:9100",
            `Authorization: Bearer ${TOKEN}`,
          ]);
          assert.equal(named.status, 200);

          const tab = await browser.open({ width: 1280, height: 800 });
          await tab.goto(url);
          await tab.waitFor(`!document.getElementById("token-form").hidden`);
          assert.equal(
            await tab.value(`document.getElementById("main").hidden`),
            true,
          );
          await tab.fill("#token", "wrong-token-0123456789");
          await tab.click(`#token-form button`);
          await tab.waitFor(
            `!document.getElementById("token-form").hidden && document.getElementById("token-why").textContent.includes("refused")`,
          );
          await tab.fill("#token", TOKEN);
          await tab.click(`#token-form button`);
          await tab.waitFor(
            `document.getElementById("live").textContent === "live"`,
          );
          monitor.hostState("10.1.1.73", "connected");
          await tab.waitFor(
            `document.querySelector('[data-host="10.1.1.73"]')`,
          );
          // Kept for this tab: a reload needs no new entry.
          await tab.goto(url);
          await tab.waitFor(
            `document.getElementById("live").textContent === "live"`,
          );
          assert.equal(
            await tab.value(`document.getElementById("token-form").hidden`),
            true,
          );
          assert.ok(!log.join("\n").includes(TOKEN), log.join("\n"));
          // 401s for the wrong token are logged by the browser as failed loads.
          const errors = (await tab.errors()).filter((e) => !/401/.test(e));
          assert.deepEqual(errors, []);
        }),
    ),
});

Deno.test("web: without a token only loopback names are served, and a POST from another site is refused", async () => {
  await withMonitor({}, async ({ url }) => {
    const port = new URL(url).port;
    const rebound = await rawRequest(url, [
      "GET /api/dead-letters HTTP/1.1",
      `Host: attacker.example:${port}`,
    ]);
    assert.equal(rebound.status, 403);
    assert.match(rebound.body, /loopback name/);
    for (const host of [`127.0.0.1:${port}`, `localhost:${port}`, "[::1]:9"]) {
      const ok = await rawRequest(url, [
        "GET /healthz HTTP/1.1",
        `Host: ${host}`,
      ]);
      assert.equal(ok.status, 200, host);
    }
    const forged = await fetch(`${url}/api/dead-letters/1/discard`, {
      method: "POST",
      headers: { Origin: "https://attacker.example" },
    });
    await forged.body?.cancel();
    assert.equal(forged.status, 403);
    const unknown = await get(`${url}/nothing-here`);
    assert.equal(unknown.status, 404);
    const wrongMethod = await fetch(`${url}/metrics`, { method: "POST" });
    await wrongMethod.body?.cancel();
    assert.equal(wrongMethod.status, 405);
  });
});

// ---------------------------------------------------------------------------
// Health, readiness, metrics, events
// ---------------------------------------------------------------------------

Deno.test("web: /healthz answers ok; /readyz follows the queue's last answer and the hosts", async () => {
  await withMonitor({}, async ({ monitor, url }) => {
    const ready = () => get(`${url}/readyz`);
    assert.deepEqual((await get(`${url}/healthz`)).body, "ok\n");
    let reply = await ready();
    assert.equal(reply.status, 503);
    assert.match(reply.body, /no answer from the queue yet/);

    monitor.queueRequest("ensure_queue", 404); // an answer, if not a yes
    assert.equal((await ready()).status, 200);
    monitor.queueRequest("reserve", "error");
    reply = await ready();
    assert.equal(reply.status, 503);
    assert.match(
      reply.body,
      /the queue's last request \(reserve\) got no answer/,
    );
    monitor.queueRequest("reserve", 503);
    assert.match((await ready()).body, /got HTTP 503/);
    monitor.queueRequest("reserve", 401); // an answer, but nothing will work
    reply = await ready();
    assert.equal(reply.status, 503);
    assert.match(reply.body, /refused the worker's token \(HTTP 401/);
    monitor.queueRequest("reserve", 200);
    assert.equal((await ready()).status, 200);

    monitor.hostState("127.0.0.2", "unreachable", "connect ECONNREFUSED");
    monitor.hostState("127.0.0.3", "idle");
    assert.equal((await ready()).status, 200); // one host is still reachable
    monitor.hostState("127.0.0.3", "unreachable", "timed out");
    reply = await ready();
    assert.equal(reply.status, 503);
    assert.equal(
      reply.body,
      "no SSH host is reachable: 127.0.0.2 (connect ECONNREFUSED), 127.0.0.3 (timed out)\n",
    );
    monitor.hostState("127.0.0.3", "connected");
    assert.equal((await ready()).status, 200);
  });
});

/** Prometheus text as {"name{label="v",...}": value}, labels sorted. */
function samples(text: string): Map<string, number> {
  const found = new Map<string, number>();
  for (const line of text.split("\n")) {
    if (line === "" || line.startsWith("#")) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/.exec(line);
    assert.ok(m, `not a sample line: ${line}`);
    const labels = [
      ...(m[2] ?? "").matchAll(/([a-zA-Z_]\w*)="((?:[^"\\]|\\.)*)"/g),
    ]
      .map(([, k, v]) => `${k}="${v}"`).sort().join(",");
    found.set(labels ? `${m[1]}{${labels}}` : m[1], Number(m[3]));
  }
  return found;
}

Deno.test({
  name:
    "web: /metrics passes promtool check metrics and counts exactly the calls made",
  ...promtoolTest,
  fn: () =>
    withMonitor({}, async ({ monitor, url }) => {
      for (let i = 0; i < 3; i++) monitor.queueRequest("reserve", 200);
      monitor.queueRequest("delete_batch", 200);
      monitor.queueRequest("reserve", "error");
      monitor.queueRequest("reserve", "error");
      monitor.queueRequest("post", 503);
      monitor.held(7);
      monitor.sshConnections("127.0.0.2", 2);
      monitor.sshConnections("127.0.0.3", 1);
      monitor.sshError("127.0.0.3", "connect");
      monitor.sshError("127.0.0.3", "connect");
      monitor.sshError("127.0.0.3", "auth");
      const t0 = Date.now();
      const start = (runId: string, host: string) =>
        monitor.commandStarted({
          runId,
          messageId: "1",
          task: "deploy",
          host,
          command: "deploy",
          startedAt: t0,
        });
      start("r1", "127.0.0.2");
      start("r2", "127.0.0.3");
      start("r3", "127.0.0.3");
      monitor.commandEnded("r1", {
        result: { kind: "exit", code: 0 },
        finishedAt: t0 + 250,
      });
      monitor.commandEnded("r2", {
        result: { kind: "exit", code: 1 },
        finishedAt: t0 + 2_500,
      });
      const settled = (task: string, outcome: "success" | "failure") =>
        monitor.messageSettled({
          messageId: "1",
          task,
          outcome,
          hosts: {},
          finishedAt: t0,
        });
      settled("deploy", "success");
      settled("deploy", "success");
      settled("restart", "failure");
      monitor.deadLettered("restart");

      const reply = await get(`${url}/metrics`);
      assert.equal(reply.status, 200);
      assert.match(
        reply.headers.get("content-type") ?? "",
        /^text\/plain; version=0\.0\.4/,
      );
      await checkMetrics(reply.body);

      const values = samples(reply.body);
      const ours = new Map(
        [...values].filter(([k]) => k.startsWith("tasks_")),
      );
      const bucket = (host: string, le: string) =>
        `tasks_command_duration_seconds_bucket{host="${host}",le="${le}",task="deploy"}`;
      const expected: Record<string, number> = {
        'tasks_queue_requests_total{op="reserve",status="200"}': 3,
        'tasks_queue_requests_total{op="delete_batch",status="200"}': 1,
        'tasks_queue_requests_total{op="reserve",status="error"}': 2,
        'tasks_queue_requests_total{op="post",status="503"}': 1,
        "tasks_messages_reserved": 7,
        'tasks_ssh_connections{host="127.0.0.2"}': 2,
        'tasks_ssh_connections{host="127.0.0.3"}': 1,
        'tasks_ssh_errors_total{host="127.0.0.3",kind="connect"}': 2,
        'tasks_ssh_errors_total{host="127.0.0.3",kind="auth"}': 1,
        "tasks_commands_running": 1,
        'tasks_messages_total{outcome="success",task="deploy"}': 2,
        'tasks_messages_total{outcome="failure",task="restart"}': 1,
        'tasks_dead_letters_total{task="restart"}': 1,
        // No run history in this monitor's worker: its series are there, at 0.
        "tasks_runs_stored": 0,
        "tasks_runs_db_bytes": 0,
        "tasks_runs_write_failures_total": 0,
        [bucket("127.0.0.2", "0.1")]: 0,
        [bucket("127.0.0.2", "0.5")]: 1,
        [bucket("127.0.0.2", "+Inf")]: 1,
        [bucket("127.0.0.3", "1")]: 0,
        [bucket("127.0.0.3", "5")]: 1,
        [bucket("127.0.0.3", "+Inf")]: 1,
        'tasks_command_duration_seconds_sum{host="127.0.0.2",task="deploy"}':
          0.25,
        'tasks_command_duration_seconds_count{host="127.0.0.2",task="deploy"}':
          1,
        'tasks_command_duration_seconds_sum{host="127.0.0.3",task="deploy"}':
          2.5,
        'tasks_command_duration_seconds_count{host="127.0.0.3",task="deploy"}':
          1,
      };
      for (const [key, value] of Object.entries(expected)) {
        assert.equal(ours.get(key), value, key);
      }
      // Nothing else counted: every series but the histogram's other buckets is listed.
      const unlisted = [...ours.keys()].filter((k) =>
        !(k in expected) &&
        !k.startsWith("tasks_command_duration_seconds_bucket")
      );
      assert.deepEqual(unlisted, []);
      for (
        const name of [
          "process_cpu_seconds_total",
          "process_start_time_seconds",
        ]
      ) {
        assert.ok(values.has(name), name);
      }
      assert.ok(values.get("process_resident_memory_bytes")! > 1_000_000);
    }),
});

Deno.test("web: a page that stops reading its events is dropped, not buffered without end", async () => {
  await withMonitor({}, async ({ monitor, url }) => {
    const { port } = new URL(url);
    const conn = await Deno.connect({
      hostname: "127.0.0.1",
      port: Number(port),
    });
    await conn.write(
      new TextEncoder().encode(
        `GET /events HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\n\r\n`,
      ),
    );
    monitor.commandStarted({
      runId: "r1",
      messageId: "1",
      task: "cat",
      host: "127.0.0.2",
      command: "cat big",
      startedAt: Date.now(),
    });
    // 64 MB of output, in 128 KB events, while the page reads nothing.
    const line = "x".repeat(16_000);
    const lines = 4_000;
    for (let i = 0; i < lines; i++) {
      monitor.commandOutput("r1", "out", line);
      if (i % 8 === 7) await new Promise((resolve) => setTimeout(resolve, 0));
    }
    // Now read: what the socket buffers held, then the end, long before 64 MB.
    // Kept instead, all 64 MB would come, and no end: a deadline says so.
    let received = 0;
    const buffer = new Uint8Array(256 * 1024);
    const deadline = setTimeout(() => conn.close(), 60_000);
    try {
      for (;;) {
        const n = await conn.read(buffer);
        if (n === null) break;
        received += n;
        assert.ok(
          received < lines * line.length / 2,
          `${received} bytes came: the lines were kept for it`,
        );
      }
    } catch (e) {
      throw new Error(`no end after ${received} bytes: ${e}`);
    } finally {
      clearTimeout(deadline);
    }
    conn.close();
    // A page that reads gets everything from a fresh snapshot.
    const response = await fetch(`${url}/events`);
    const reader = response.body!.pipeThrough(new TextDecoderStream())
      .getReader();
    const { value } = await reader.read();
    assert.match(value ?? "", /^event: snapshot\n/);
    await reader.cancel();
  });
});

// ---------------------------------------------------------------------------
// A real worker: ./start with TASK_HTTP_PORT, a real sshd, a long command
// ---------------------------------------------------------------------------

const workerTest = needs(
  toolMissing(CHROMIUM, "chromium") ?? toolMissing(PROMTOOL, "prometheus") ??
    sshdMissing(),
  "the browser test against a real worker",
);

Deno.test({
  name:
    "web: a real worker's page shows a long command's output line by line as it runs on a real sshd",
  ...workerTest,
  fn: () =>
    withSshd(async (sshd) => {
      const dir = await Deno.makeTempDir({ prefix: "tasks-web-" });
      await Deno.chmod(dir, 0o755); // the command, as sshd.user, looks in it
      const mqPort = freePort();
      const httpPort = freePort();
      // Each step waits for the test to say go: the lines come one at a time
      // with no fixed sleep, and the test sees each while the command still runs.
      const command =
        `for i in 1 2 3 4; do echo "step $i"; while [ ! -e ${dir}/go$i ]; do sleep 0.05; done; done; echo done`;
      const worker = startInDir(dir, sshd, mqPort, {
        TASK_COMMAND: command,
        TASK_POLL_WAIT: "1",
        TASK_HTTP_PORT: String(httpPort),
      });
      try {
        const url = `http://127.0.0.1:${httpPort}`;
        await worker.line(
          new RegExp(`web: listening on http://127\\.0\\.0\\.1:${httpPort}$`),
          90_000,
        );
        assert.equal((await get(`${url}/healthz`)).body, "ok\n");
        await withBrowser(async (browser) => {
          const tab = await browser.open({ width: 1280, height: 800 });
          await tab.goto(url);
          await tab.waitFor(
            `document.getElementById("live").textContent === "live"`,
          );
          const posted = await fetch(
            `http://127.0.0.1:${mqPort}/3/projects/local/queues/my_queue/messages`,
            {
              method: "POST",
              headers: { "Content-Type": "application/json" },
              body: JSON.stringify({ messages: [{ body: "go" }] }),
            },
          );
          assert.equal(posted.status, 201, await posted.text());
          const lines =
            `[...document.querySelectorAll(".run .output > div")].map((d) => d.textContent)`;
          for (let i = 1; i <= 4; i++) {
            await tab.waitFor(`${lines}.includes("step ${i}")`);
            // This step's line is there and the next is not: it has not run yet.
            assert.deepEqual(
              await tab.value(lines),
              Array.from({ length: i }, (_, n) => `step ${n + 1}`),
            );
            assert.equal(
              await tab.value(
                `document.querySelector(".run .badge").textContent`,
              ),
              "running",
            );
            await Deno.writeTextFile(`${dir}/go${i}`, "");
          }
          await tab.waitFor(
            `document.querySelector("#results [data-message]")`,
          );
          assert.equal(
            await tab.value(
              `document.querySelector('[data-host="127.0.0.1"] .badge').textContent`,
            ),
            "connected",
          );
          assert.match(
            await tab.value<string>(
              `document.querySelector("#results [data-message] .badge").textContent`,
            ),
            /^success$/,
          );
          assert.deepEqual(await tab.errors(), []);
        });
        const ready = await get(`${url}/readyz`);
        assert.equal(`${ready.status} ${ready.body}`, "200 ready\n");
        const text = (await get(`${url}/metrics`)).body;
        await checkMetrics(text);
        const metrics = samples(text);
        assert.equal(
          metrics.get(
            'tasks_messages_total{outcome="success",task="TASK_COMMAND"}',
          ),
          1,
        );
        const exactly: Record<string, number> = {
          'tasks_command_duration_seconds_count{host="127.0.0.1",task="TASK_COMMAND"}':
            1,
          'tasks_queue_requests_total{op="create_queue",status="200"}': 1,
          'tasks_ssh_connections{host="127.0.0.1"}': 1,
          "tasks_commands_running": 0,
          "tasks_messages_reserved": 0,
        };
        for (const [key, value] of Object.entries(exactly)) {
          assert.equal(metrics.get(key), value, key);
        }
        assert.ok(metrics.get("process_resident_memory_bytes")! > 1_000_000);
      } finally {
        const status = await worker.stop();
        await Deno.remove(dir, { recursive: true });
        assert.equal(status.code, 0, worker.lines.join("\n"));
      }
    }),
});

Deno.test({
  name:
    "web: the page counts webhook requests by hook and outcome, live and after a reload",
  ...browserTest,
  async fn() {
    const hookQueue = await startTestQueue();
    const { catalog } = parseCatalog(
      "tasks.yaml",
      `
tasks:
  ping:
    command: echo {{n}}
    params: { n: { type: integer } }
hooks:
  alerts:
    task: ping
    verify: { gitlab: { token_env: T } }
    params: { n: n }
`,
      {
        timeoutMs: 0,
        maxAttempts: 3,
        host: { user: "op", port: 22, jump: [] },
      },
    );
    const receiver = new HookReceiver({
      catalog,
      secrets: new Map([["alerts", "the-token"]]),
      hosts: [],
      queue: hookQueue.client,
      queueName: "jobs",
      log: () => {},
      now: () => Date.now(),
    });
    const send = (token: string) =>
      fetch(`${served}/hooks/alerts`, {
        method: "POST",
        headers: {
          "X-Gitlab-Token": token,
          "Content-Type": "application/json",
        },
        body: '{"n": 1}',
      }).then((r) => r.body?.cancel());
    let served = "";
    const shown =
      `document.querySelector('[data-hook="alerts"] .detail')?.textContent`;
    try {
      await withMonitor({
        hooks: (name, request, remote) =>
          receiver.receive(name, request, remote),
      }, ({ url }) =>
        withBrowser(async (browser) => {
          served = url;
          const tab = await browser.open({ width: 1280, height: 800 });
          await tab.goto(url);
          await tab.waitFor(
            `document.getElementById("live").textContent === "live"`,
          );
          assert.equal(await tab.value(`$("hooks-section")`), null);
          await send("the-token");
          await send("wrong");
          await send("wrong");
          await tab.waitFor(`${shown} === "accepted 1 · unauthorized 2"`);
          await tab.goto(url);
          await tab.waitFor(`${shown} === "accepted 1 · unauthorized 2"`);
          assert.equal(await tab.value(`$("hooks-count").textContent`), "1");
          assert.deepEqual(await tab.errors(), []);
        }));
      assert.equal(await hookQueue.size(), 1);
    } finally {
      await hookQueue.close();
    }
  },
});

Deno.test({
  name:
    "web: Stop on a running command, clicked twice, cancels it: the worker stops it and its result is REVOKED by the page",
  ...workerTest,
  fn: () =>
    withSshd(async (sshd) => {
      const dir = await Deno.makeTempDir({ prefix: "tasks-web-" });
      await Deno.chmod(dir, 0o755);
      const mqPort = freePort();
      const httpPort = freePort();
      const worker = startInDir(dir, sshd, mqPort, {
        TASK_COMMAND: "echo started; exec sleep 618",
        TASK_POLL_WAIT: "1",
        TASK_HTTP_PORT: String(httpPort),
        TASK_RESULTS_QUEUE: "replies",
      });
      const queues = `http://127.0.0.1:${mqPort}/3/projects/local/queues`;
      try {
        const url = `http://127.0.0.1:${httpPort}`;
        await worker.line(
          new RegExp(`web: listening on http://127\\.0\\.0\\.1:${httpPort}$`),
          90_000,
        );
        await withBrowser(async (browser) => {
          const tab = await browser.open({ width: 1280, height: 800 });
          await tab.goto(url);
          await tab.waitFor(
            `document.getElementById("live").textContent === "live"`,
          );
          const posted = await fetch(`${queues}/my_queue/messages`, {
            method: "POST",
            headers: { "Content-Type": "application/json" },
            body: JSON.stringify({ messages: [{ body: "go" }] }),
          });
          assert.equal(posted.status, 201, await posted.text());
          const badge = `document.querySelector(".run .badge").textContent`;
          await tab.waitFor(
            `[...document.querySelectorAll(".run .output > div")].some((d) => d.textContent === "started")`,
          );
          // One click arms it; the command runs on.
          await tab.click(".run button.stop");
          assert.equal(
            await tab.value(
              `document.querySelector(".run button.stop").textContent`,
            ),
            "Stop it?",
          );
          assert.equal(await tab.value(badge), "running");
          assert.ok(!worker.lines.some((l) => /cancel asked/.test(l)));
          await tab.click(".run button.stop");
          await tab.waitFor(`${badge} === "stopped"`);
          await tab.waitFor(
            `document.querySelector("#results [data-message] .badge")?.textContent === "revoked"`,
          );
          assert.deepEqual(await tab.errors(), []);
        });
        const peeked = await (await fetch(`${queues}/replies/messages?n=10`))
          .json();
        assert.equal(peeked.messages.length, 1);
        const result = JSON.parse(peeked.messages[0].body);
        assert.equal(result.status, "REVOKED");
        assert.match(
          result.reason,
          /^cancelled by the page \(127\.0\.0\.1\) at /,
        );
        assert.match(
          worker.lines.join("\n"),
          /\[127\.0\.0\.1\] stopped by a cancel \(message \d+/,
        );
        const left = await (await fetch(`${queues}/my_queue`)).json();
        assert.equal(left.queue.size, 0, "deleted, not retried");
      } finally {
        const status = await worker.stop();
        await Deno.remove(dir, { recursive: true });
        assert.equal(status.code, 0, worker.lines.join("\n"));
      }
    }),
});

Deno.test({
  name:
    "web: a real worker's page shows its run history after a restart, filtered, each run opening to each host's output",
  ...workerTest,
  fn: () =>
    withSshd(async (sshd) => {
      const dir = await Deno.makeTempDir({ prefix: "tasks-web-" });
      const mqPort = freePort();
      const httpPort = freePort();
      // ./start from `dir`: the history is runs.sqlite there, by default.
      const start = () =>
        startInDir(dir, sshd, mqPort, {
          TASK_COMMAND: "echo line-out; echo line-err >&2; exit",
          TASK_MAX_ATTEMPTS: "1",
          TASK_POLL_WAIT: "1",
          TASK_HTTP_PORT: String(httpPort),
        });
      const url = `http://127.0.0.1:${httpPort}`;
      let worker = start();
      try {
        await worker.line(/web: listening on/, 90_000);
        for (const body of ['{"args": ["0"]}', '{"args": ["5"]}']) {
          const posted = await fetch(
            `http://127.0.0.1:${mqPort}/3/projects/local/queues/my_queue/messages`,
            {
              method: "POST",
              headers: { "Content-Type": "application/json" },
              body: JSON.stringify({ messages: [{ body }] }),
            },
          );
          assert.equal(posted.status, 201, await posted.text());
        }
        await worker.line(/moved to my_queue_failed/);
        await worker.line(/\[127\.0\.0\.1\] exit: 0/);
        assert.equal((await worker.stop()).code, 0, worker.lines.join("\n"));
        await Deno.stat(`${dir}/runs.sqlite`);

        worker = start();
        await worker.line(/web: listening on/, 90_000);
        await withBrowser(async (browser) => {
          const tab = await browser.open({ width: 1280, height: 900 });
          await tab.goto(url);
          const listed =
            `[...document.querySelectorAll("#history details")].map((d) => d.querySelector(".badge").textContent)`;
          await tab.waitFor(`${listed}.length === 2`);
          assert.deepEqual(await tab.value(listed), ["failure", "success"]);
          await tab.value(
            `document.querySelector('#history-filters select[name="status"]').value = "FAILURE"`,
          );
          await tab.click('#history-filters button[type="submit"]');
          await tab.waitFor(`${listed}.length === 1`);
          assert.deepEqual(await tab.value(listed), ["failure"]);
          await tab.click("#history details summary");
          const out =
            `[...document.querySelectorAll("#history .host-out .output > div")].map((d) => (d.className === "err" ? "err: " : "out: ") + d.textContent)`;
          await tab.waitFor(`${out}.length === 2`);
          assert.deepEqual(await tab.value(out), [
            "out: line-out",
            "err: line-err",
          ]);
          assert.equal(
            await tab.value(
              `document.querySelector("#history .host-out h3 .badge").textContent`,
            ),
            "exit 5",
          );
          // q searches the output: none of the runs printed this.
          await tab.value(
            `document.querySelector('#history-filters select[name="status"]').value = ""`,
          );
          await tab.fill('#history-filters input[name="q"]', "not printed");
          await tab.click('#history-filters button[type="submit"]');
          await tab.waitFor(`${listed}.length === 0`);
          assert.equal(
            await tab.value(
              `document.getElementById("history-empty").textContent`,
            ),
            "No run matches.",
          );
          assert.deepEqual(await tab.errors(), []);
        });
      } finally {
        const status = await worker.stop();
        await Deno.remove(dir, { recursive: true });
        assert.equal(status.code, 0, worker.lines.join("\n"));
      }
    }),
});
