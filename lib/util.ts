/**
 * lib/util.ts: the small helpers the worker and the queue server share:
 * errors as text, records, environment values, loopback names, bounded reads.
 *
 * Nothing here knows about queues, SSH or the worker.
 */

export class ConfigError extends Error {
  constructor(readonly problems: string[]) {
    super(
      `invalid configuration:\n${problems.map((p) => `  - ${p}`).join("\n")}`,
    );
    this.name = "ConfigError";
  }
}

export type Env = Record<string, string | undefined>;

/** A variable's value; empty counts as unset, as in a runit env/ directory. */
export function envValue(env: Env, name: string): string | undefined {
  const value = env[name];
  return value === "" ? undefined : value;
}

export function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

/** An error's message, with its cause's (fetch hides "connection refused" there). */
export function errorText(e: unknown): string {
  if (!(e instanceof Error)) return String(e);
  const cause = e.cause instanceof Error ? e.cause.message : undefined;
  return cause && !e.message.includes(cause)
    ? `${e.message}: ${cause}`
    : e.message;
}

/** localhost, ::1 (bracketed or not) and 127.0.0.0/8: traffic that stays on this machine. */
export function isLoopback(host: string): boolean {
  return host === "localhost" || host === "::1" || host === "[::1]" ||
    /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(host);
}

/** An IPv6 address as a URL or Deno permission wants it: `[::1]`. */
export function bracketIPv6(host: string): string {
  return host.includes(":") && !host.startsWith("[") ? `[${host}]` : host;
}

/** readAtMost's first buffer for the bytes; it doubles as they come. */
const FIRST_BYTES = 1024;
/**
 * What readAtMost reads through, as Deno's own reader does: Deno's HTTP server
 * parses a chunked body's framing (chunk lines, trailers up to 64 KiB) only
 * within one read's size, and stalls if it does not fit.
 */
const READ_BYTES = 64 * 1024;

/**
 * A stream's bytes, or undefined (the stream cancelled) past `maxBytes`. They
 * are kept in one buffer that doubles as it fills. A byte stream (a request or
 * reply body) is read through one reused view: its default reader allocates a
 * fresh 64 KiB buffer for every read, so a body sent a byte per packet made
 * 64 KiB of garbage per byte, and grew the server's RSS by 60 to 75 MB for
 * 6,000 bytes before collections caught up.
 */
export async function readAtMost(
  stream: ReadableStream<Uint8Array> | null,
  maxBytes: number,
): Promise<Uint8Array | undefined> {
  let bytes = new Uint8Array(0);
  let size = 0;
  /** Appends `chunk`; false, keeping nothing of it, past `maxBytes`. */
  const append = (chunk: Uint8Array): boolean => {
    const needed = size + chunk.byteLength;
    if (needed > maxBytes) return false;
    if (needed > bytes.length) {
      const length = Math.max(FIRST_BYTES, 2 * bytes.length, needed);
      const grown = new Uint8Array(Math.min(length, maxBytes));
      grown.set(bytes.subarray(0, size));
      bytes = grown;
    }
    bytes.set(chunk, size);
    size = needed;
    return true;
  };
  if (stream === null) return bytes;
  const byob = byobReader(stream);
  if (byob === undefined) {
    const reader = stream.getReader();
    for (
      let read = await reader.read();
      !read.done;
      read = await reader.read()
    ) {
      if (!append(read.value)) {
        await reader.cancel();
        return undefined;
      }
    }
    return bytes.subarray(0, size);
  }
  let view = new Uint8Array(READ_BYTES);
  for (;;) {
    const { value, done } = await byob.read(view);
    if (done) return bytes.subarray(0, size);
    if (!append(value)) {
      await byob.cancel();
      return undefined;
    }
    // The read moved the view's memory into `value`; take it back.
    view = new Uint8Array(value.buffer);
  }
}

/** A BYOB reader, if `stream` is a byte stream (only those have one). */
function byobReader(
  stream: ReadableStream<Uint8Array>,
): ReadableStreamBYOBReader | undefined {
  try {
    return stream.getReader({ mode: "byob" });
  } catch {
    return undefined;
  }
}

/**
 * Creates a database file 0600 whatever the umask (it holds message bodies,
 * output); SQLite gives its -wal, -shm and -journal files the same mode.
 */
export function createPrivately(path: string): void {
  try {
    Deno.openSync(path, { createNew: true, write: true, mode: 0o600 }).close();
  } catch (error) {
    if (!(error instanceof Deno.errors.AlreadyExists)) throw error;
  }
}
