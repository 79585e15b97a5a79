/**
 * Tests of lib/hooks.ts on the monitor's real listener and a real queue
 * server: what the worker-level test (test/webhooks_test.ts) does not reach:
 * the Host check left to the other paths, a queue that refuses, the 24 h of
 * a delivery id, GitHub's form encoding, the log line and the page's counts.
 */
import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { parseCatalog } from "./catalog.ts";
import { DeadLetters } from "./dead_letters.ts";
import { HookReceiver } from "./hooks.ts";
import { Monitor } from "./monitor.ts";
import { HOST_DEFAULTS } from "../test/fixtures.ts";
import { startTestQueue, type TestQueue } from "../test/support.ts";

const SECRET = "the-hook-secret-0123456789";

const { catalog } = parseCatalog(
  "tasks.yaml",
  `
tasks:
  checkout:
    command: /bin/checkout {{sha}}
    params:
      sha: {pattern: "[0-9a-f]{40}"}
hooks:
  gh:
    task: checkout
    verify: {github: {secret_env: GH}}
    params: {sha: after}
    dedupe_header: X-GitHub-Delivery
`,
  { timeoutMs: 0, maxAttempts: 5, host: HOST_DEFAULTS },
);

interface Served {
  url: string;
  port: number;
  log: string[];
  clock: { now: number };
}

/** A listener without a token (loopback), its hooks posting to `queue`. */
async function withHooks(
  queue: TestQueue,
  fn: (served: Served) => Promise<void>,
): Promise<void> {
  const monitor = new Monitor();
  const log: string[] = [];
  const clock = { now: Date.now() };
  const receiver = new HookReceiver({
    catalog,
    secrets: new Map([["gh", SECRET]]),
    hosts: [],
    queue: queue.client,
    queueName: "jobs",
    log: (line) => log.push(line),
    now: () => clock.now,
  });
  const server = await monitor.serve({
    hostname: "127.0.0.1",
    port: 0,
    deadLetters: new DeadLetters(queue.client, "jobs_failed"),
    maskBody: (body) => body,
    log: (line) => log.push(line),
    hooks: (name, request, remote) => receiver.receive(name, request, remote),
  });
  try {
    await fn({
      url: server.url,
      port: Number(new URL(server.url).port),
      log,
      clock,
    });
  } finally {
    await server.close();
  }
}

const body = (n: number) =>
  JSON.stringify({ after: n.toString(16).padStart(40, "0") });
const signature = (text: string) =>
  `sha256=${createHmac("sha256", SECRET).update(text).digest("hex")}`;

async function send(
  url: string,
  text: string,
  delivery: string,
  type = "application/json",
  signed = text,
) {
  const response = await fetch(`${url}/hooks/gh`, {
    method: "POST",
    headers: {
      "Content-Type": type,
      "X-GitHub-Delivery": delivery,
      "X-Hub-Signature-256": signature(signed),
    },
    body: text,
  });
  return { status: response.status, json: await response.json() };
}

/** The status line of one raw request (fetch will not send another Host). */
async function statusLine(port: number, request: string): Promise<string> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  try {
    await conn.write(new TextEncoder().encode(request));
    const buffer = new Uint8Array(4096);
    const n = await conn.read(buffer);
    return new TextDecoder().decode(buffer.subarray(0, n ?? 0)).split(
      "\r\n",
    )[0];
  } finally {
    conn.close();
  }
}

Deno.test("hooks: a loopback listener without a token takes a hook under any Host, and the other paths keep the Host check", async () => {
  const queue = await startTestQueue();
  try {
    await withHooks(queue, async ({ port }) => {
      const text = body(1);
      assert.match(
        await statusLine(
          port,
          `POST /hooks/gh HTTP/1.1\r\nHost: hooks.example.org\r\nContent-Type: application/json\r\nX-Hub-Signature-256: ${
            signature(text)
          }\r\nContent-Length: ${text.length}\r\nConnection: close\r\n\r\n${text}`,
        ),
        /^HTTP\/1\.1 202/,
      );
      assert.match(
        await statusLine(
          port,
          "GET /metrics HTTP/1.1\r\nHost: hooks.example.org\r\nConnection: close\r\n\r\n",
        ),
        /^HTTP\/1\.1 403/,
      );
      assert.equal(await queue.size(), 1);
    });
  } finally {
    await queue.close();
  }
});

Deno.test("hooks: a refusing queue gets 503 and the sender's retry of that delivery posts it once", async () => {
  let queue = await startTestQueue();
  const port = Number(new URL(queue.server.url).port);
  try {
    await withHooks(queue, async ({ url, log }) => {
      await queue.close();
      const down = await send(url, body(2), "d-1");
      assert.equal(down.status, 503);
      assert.match(String(down.json.error), /try again/);
      assert.match(
        log.at(-1)!,
        /^hook gh: 503 queue_error: cannot post to jobs: /,
      );
      queue = await startTestQueue({ port });
      const retried = await send(url, body(2), "d-1");
      assert.equal(retried.status, 202, JSON.stringify(retried));
      const again = await send(url, body(2), "d-1");
      assert.equal(again.status, 200);
      assert.equal(again.json.message_id, retried.json.message_id);
      assert.equal(await queue.size(), 1);
    });
  } finally {
    await queue.close();
  }
});

Deno.test("hooks: a delivery id is dropped for 24 h, then runs again", async () => {
  const queue = await startTestQueue();
  try {
    await withHooks(queue, async ({ url, clock }) => {
      assert.equal((await send(url, body(3), "d-2")).status, 202);
      clock.now += 24 * 3600_000 - 1;
      assert.deepEqual((await send(url, body(3), "d-2")).status, 200);
      clock.now += 2;
      assert.equal((await send(url, body(3), "d-2")).status, 202);
      assert.equal(await queue.size(), 2);
    });
  } finally {
    await queue.close();
  }
});

Deno.test("hooks: GitHub's form encoding (payload=) runs as its JSON does, signed over the form", async () => {
  const queue = await startTestQueue();
  try {
    await withHooks(queue, async ({ url }) => {
      const form = `payload=${encodeURIComponent(body(4))}`;
      const answer = await send(
        url,
        form,
        "d-3",
        "application/x-www-form-urlencoded",
      );
      assert.equal(answer.status, 202, JSON.stringify(answer));
      const [message] = await queue.peek();
      const posted = JSON.parse(message.body);
      assert.equal(posted.id, answer.json.id);
      assert.equal(posted.sender, "hook:gh");
      assert.deepEqual(posted.kwargs, { sha: "0".repeat(39) + "4" });
    });
  } finally {
    await queue.close();
  }
});

Deno.test("hooks: one log line a request, without the secret or the body; the page's snapshot counts them", async () => {
  const queue = await startTestQueue();
  try {
    await withHooks(queue, async ({ url, log }) => {
      const marker = "f".repeat(40);
      await send(url, JSON.stringify({ after: marker }), "d-4");
      await send(url, JSON.stringify({ after: "nope" }), "d-5");
      await send(url, body(5), "d-6", "application/json", "other");
      const lines = log.filter((l) => l.startsWith("hook "));
      assert.equal(lines.length, 3, lines.join("\n"));
      assert.match(
        lines[0],
        /^hook gh: 202 accepted: run [0-9a-f-]{36}, message \d+ \(checkout\) \(delivery d-4, from 127\.0\.0\.1\)$/,
      );
      assert.match(
        lines[1],
        /^hook gh: 422 invalid: task checkout: parameter sha: "nope" must match/,
      );
      assert.match(
        lines[2],
        /^hook gh: 401 unauthorized: x-hub-signature-256 does not match the body/,
      );
      for (const line of log) {
        assert.ok(!line.includes(SECRET) && !line.includes(marker), line);
      }
      const events = await fetch(`${url}/events`);
      const reader = events.body!.pipeThrough(new TextDecoderStream())
        .getReader();
      let text = "";
      while (!text.includes("\n\n")) text += (await reader.read()).value;
      await reader.cancel();
      const snapshot = JSON.parse(/^data: (.*)$/m.exec(text)![1]);
      assert.deepEqual(snapshot.hooks, {
        gh: { accepted: 1, invalid: 1, unauthorized: 1 },
      });
    });
  } finally {
    await queue.close();
  }
});
