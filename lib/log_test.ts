/** Tests of lib/log.ts: lines, log formats, masking and escaping. */
import { parseConfig } from "./config.ts";
import { formatRecord, LineSplitter, Secrets, setupLogging } from "./log.ts";
import { REPO } from "../test/support.ts";
import assert from "node:assert/strict";
import { context } from "../test/fixtures.ts";

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
