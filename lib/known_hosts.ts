/**
 * lib/known_hosts.ts: OpenSSH's known_hosts format (hashed entries,
 * patterns, markers) and the verdict on a host key.
 *
 * Pure: reading and matching only; it never writes the file.
 */

import { Buffer } from "node:buffer";
import { createHmac, timingSafeEqual } from "node:crypto";

export interface KnownHost {
  marker?: "@revoked" | "@cert-authority";
  hosts: string;
  keyType: string;
  key: Uint8Array;
}

export type HostKeyVerdict = "match" | "mismatch" | "unknown" | "revoked";

export function parseKnownHosts(text: string): KnownHost[] {
  const entries: KnownHost[] = [];
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (line === "" || line.startsWith("#")) continue;
    const fields = line.split(/\s+/);
    let marker: KnownHost["marker"];
    if (fields[0] === "@revoked" || fields[0] === "@cert-authority") {
      marker = fields.shift() as KnownHost["marker"];
    }
    const [hosts, keyType, keyBase64] = fields;
    if (!hosts || !keyType || !keyBase64) continue;
    entries.push({
      marker,
      hosts,
      keyType,
      key: Buffer.from(keyBase64, "base64"),
    });
  }
  return entries;
}

/** The name OpenSSH looks up: `host`, or `[host]:port` off port 22. */
export function knownHostsName(host: string, port: number): string {
  return port === 22 ? host : `[${host}]:${port}`;
}

function globMatch(pattern: string, text: string): boolean {
  const regex = pattern.replace(/[.+^${}()|[\]\\]/g, "\\$&")
    .replaceAll("*", ".*").replaceAll("?", ".");
  return new RegExp(`^${regex}$`, "i").test(text);
}

/** Does a known_hosts host field (hashed, or patterns with `!` negation) name `name`? */
export function hostFieldMatches(field: string, name: string): boolean {
  if (field.startsWith("|1|")) {
    const [, , salt, hash] = field.split("|");
    if (!salt || !hash) return false;
    const expected = Buffer.from(hash, "base64");
    const actual = createHmac("sha1", Buffer.from(salt, "base64"))
      .update(name).digest();
    return expected.length === actual.length &&
      timingSafeEqual(expected, actual);
  }
  let matched = false;
  for (const pattern of field.split(",")) {
    if (pattern.startsWith("!")) {
      if (globMatch(pattern.slice(1), name)) return false;
    } else if (globMatch(pattern, name)) {
      matched = true;
    }
  }
  return matched;
}

/** The key type named inside an SSH public key blob (a length-prefixed string). */
export function keyTypeOfBlob(blob: Uint8Array): string {
  if (blob.length < 4) return "";
  const length = new DataView(blob.buffer, blob.byteOffset, blob.byteLength)
    .getUint32(0);
  return new TextDecoder().decode(blob.subarray(4, 4 + length));
}

/** A host with entries but none for this key is a mismatch, whatever the key type. */
export function checkHostKey(
  entries: KnownHost[],
  host: string,
  port: number,
  key: Uint8Array,
): HostKeyVerdict {
  const name = knownHostsName(host, port);
  const same = (entry: KnownHost) => Buffer.from(entry.key).equals(key);
  const forHost = entries.filter((e) => hostFieldMatches(e.hosts, name));
  if (forHost.some((e) => e.marker === "@revoked" && same(e))) return "revoked";
  const plain = forHost.filter((e) => e.marker === undefined);
  if (plain.some(same)) return "match";
  return plain.length > 0 ? "mismatch" : "unknown";
}

/** Host key algorithms ssh2 should offer so the server shows a key we know. */
export function knownKeyAlgorithms(
  entries: KnownHost[],
  host: string,
  port: number,
): string[] {
  const name = knownHostsName(host, port);
  const algorithms = new Set<string>();
  for (const entry of entries) {
    if (entry.marker !== undefined) continue;
    if (!hostFieldMatches(entry.hosts, name)) continue;
    if (entry.keyType === "ssh-rsa") {
      ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"].forEach((a) =>
        algorithms.add(a)
      );
    } else algorithms.add(entry.keyType);
  }
  return [...algorithms];
}
