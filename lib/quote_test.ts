/** Tests of lib/quote.ts: arguments quoted for a real sh. */
import { planCommand } from "./message.ts";
import { shellQuote } from "./quote.ts";
import assert from "node:assert/strict";

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
