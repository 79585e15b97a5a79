/** Tests of lib/known_hosts.ts: entries matched and host keys judged. */
import { Buffer } from "node:buffer";
import { createHmac } from "node:crypto";
import {
  checkHostKey,
  hostFieldMatches,
  keyTypeOfBlob,
  knownKeyAlgorithms,
  parseKnownHosts,
} from "./known_hosts.ts";
import { needs, run, sshdMissing } from "../test/sshd.ts";
import assert from "node:assert/strict";

/** Tests that need OpenSSH (sshd, ssh-keygen): skipped with a reason, or failing under CI. */
const sshdTest = needs(sshdMissing(), "tests with a real sshd");

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
