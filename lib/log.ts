/**
 * lib/log.ts: the log: one event a line on stdout for svlogd (text, or JSON
 * with LOG_FORMAT=json), secrets masked and control characters escaped; a
 * command's output split into lines; outages logged once, then once a minute.
 *
 * Logging never blocks: when stdout is not read, lines are dropped and
 * counted, and the worker goes on.
 */

import { configure, getLogger, type LogRecord } from "@logtape/logtape";
import { errorText } from "./util.ts";
import { realClock } from "./retry.ts";

/**
 * Logs an outage with the time of the next try: its start, each change of
 * cause, then, once it lasts 30 s, once a minute as an error; and its end.
 */
export class OutageLog {
  private since?: number;
  private lastLogged = 0;
  private lastError = "";
  private tries = 0;
  constructor(
    private readonly what: string,
    private readonly log: Log,
    /** The first failure's level: "warn" for what is often a blip. */
    private readonly firstLevel: "warn" | "error" = "warn",
  ) {}

  failed(e: unknown, nextInMs: number): void {
    const now = Date.now();
    const error = errorText(e);
    const next = `next attempt in ${
      Math.max(1, Math.round(nextInMs / 1000))
    } s`;
    this.tries++;
    if (this.since === undefined) {
      this.since = now;
      this.lastLogged = now;
      this.log[this.firstLevel](`${this.what}: ${error}; ${next}`);
    } else if (error !== this.lastError && now - this.since < 30_000) {
      this.log[this.firstLevel](`${this.what}: now ${error}; ${next}`);
    } else if (
      error !== this.lastError ||
      now - this.since >= 30_000 &&
        (now - this.lastLogged >= 60_000 || this.lastLogged === this.since)
    ) {
      // Past 30 s it is no blip: an error, on a new cause and once a minute.
      this.lastLogged = now;
      this.log.error(
        `${this.what}: still failing after ${
          Math.round((now - this.since) / 1000)
        } s and ${this.tries} tries: ${error}; ${next}`,
      );
    }
    this.lastError = error;
  }

  recovered(): void {
    if (this.since === undefined) return;
    this.log.info(
      `${this.what}: working again after ${
        Math.round((Date.now() - this.since) / 1000)
      } s and ${this.tries} failed tries`,
    );
    this.since = undefined;
    this.tries = 0;
    this.lastError = "";
  }
}

/** What a line is about, for LOG_FORMAT=json (the text form has it in the line). */
export interface LogFields {
  message_id?: string;
  task?: string;
  host?: string;
  stream?: "stdout" | "stderr";
}

export interface Log {
  debug(text: string, fields?: LogFields): void;
  info(text: string, fields?: LogFields): void;
  warn(text: string, fields?: LogFields): void;
  error(text: string, fields?: LogFields): void;
}

const LOG_FIELDS = ["message_id", "task", "host", "stream"] as const;

const LEVEL_PREFIX: Record<string, string> = {
  trace: "DEBUG ",
  debug: "DEBUG ",
  info: "",
  warning: "WARN ",
  error: "ERROR ",
  fatal: "FATAL ",
};

/** The values never to show (tokens, passphrases): masked wherever they appear. */
export class Secrets {
  private readonly values: string[];
  /** The longest value's length: a cut closer than this to the end may split one. */
  readonly longest: number;

  constructor(values: (string | undefined)[]) {
    this.values = values
      .filter((v): v is string => v !== undefined && v.length >= 4)
      .sort((a, b) => b.length - a.length);
    this.longest = Math.max(0, ...this.values.map((v) => v.length));
  }

  /** These and `more`. */
  with(more: string[]): Secrets {
    return more.length === 0 ? this : new Secrets([...this.values, ...more]);
  }

  mask(text: string): string {
    for (const value of this.values) {
      text = text.replaceAll(value, "[redacted]");
    }
    return text;
  }
}

/**
 * Characters that would let remote output or a message forge or hide log
 * lines: C0 and C1 controls (a tab aside), line and paragraph separators,
 * and bidirectional overrides.
 */
const UNSAFE_CHARACTERS =
  // deno-lint-ignore no-control-regex -- matching control characters is the point
  /[\x00-\x08\x0a-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]/g;

export function escapeControls(text: string): string {
  return text.replace(UNSAFE_CHARACTERS, (c) => {
    if (c === "\n") return "\\n";
    if (c === "\r") return "\\r";
    const code = c.charCodeAt(0);
    return code < 0x100
      ? `\\x${code.toString(16).padStart(2, "0")}`
      : `\\u${code.toString(16).padStart(4, "0")}`;
  });
}

/** Formats a record as one line: secrets masked, control characters made visible. */
export function formatRecord(record: LogRecord, secrets: Secrets): string {
  return `${LEVEL_PREFIX[record.level] ?? ""}${messageOf(record, secrets)}`;
}

/** LOG_FORMAT=json: one JSON object a line, for log shippers. */
export function formatJson(record: LogRecord, secrets: Secrets): string {
  const line: Record<string, unknown> = {
    time: new Date(record.timestamp).toISOString(),
    level: record.level === "warning" ? "warn" : record.level,
    message: messageOf(record, secrets),
  };
  for (const field of LOG_FIELDS) {
    const value = record.properties[field];
    if (typeof value === "string") line[field] = escapeControls(value);
  }
  return JSON.stringify(line);
}

function messageOf(record: LogRecord, secrets: Secrets): string {
  const text = record.message.map((part) =>
    typeof part === "string" ? part : JSON.stringify(part)
  ).join("");
  return escapeControls(secrets.mask(text));
}

/**
 * Log lines to stdout that never block the worker: they queue in a bounded
 * buffer that one write at a time drains. When the reader stops reading
 * (svlogd on a full disk), lines past the bound are dropped and counted, and
 * the count is logged once writing works again. A blocking write would stop
 * everything: touches (so a running message goes to another worker) and
 * signals (so runit could not stop the worker).
 *
 * Lines are encoded into two buffers made once, one filling while the other
 * is written: a line of a flood of output costs no allocation here (a
 * Uint8Array a line, and a 1 MiB one a write, were garbage that made V8 grow
 * its heap).
 */
export class StdoutLines {
  private filling: Uint8Array;
  private spare: Uint8Array;
  private filled = 0;
  /** Bytes of the batch being written: they count against the bound too. */
  private writingBytes = 0;
  private dropped = 0;
  private writing?: Promise<void>;
  private readonly encoder = new TextEncoder();

  constructor(private readonly maxBytes = 1024 * 1024) {
    this.filling = new Uint8Array(maxBytes);
    this.spare = new Uint8Array(maxBytes);
  }

  readonly write = (line: string): void => {
    const room = this.maxBytes - this.writingBytes - this.filled;
    // One byte kept for the newline; a line that does not fit whole is not kept.
    const { read, written } = room > 1
      ? this.encoder.encodeInto(
        line,
        this.filling.subarray(this.filled, this.filled + room - 1),
      )
      : { read: -1, written: 0 };
    if (read !== line.length) {
      this.dropped++;
      return;
    }
    this.filling[this.filled + written] = 0x0a;
    this.filled += written + 1;
    this.writing ??= this.drain().finally(() => this.writing = undefined);
  };

  /** Waits for the queued lines to be written, at most `timeoutMs`. */
  async flush(timeoutMs = 2_000): Promise<void> {
    const gaveUp = new AbortController();
    await Promise.race([
      this.writing,
      realClock.sleep(timeoutMs, gaveUp.signal),
    ]);
    gaveUp.abort();
  }

  private async drain(): Promise<void> {
    while (this.filled > 0 || this.dropped > 0) {
      if (this.dropped > 0) {
        // Before the lines that came after the dropped ones began to fit again.
        const notice = this.encoder.encode(
          `WARN log: ${this.dropped} line(s) dropped: stdout was not being read\n`,
        );
        this.dropped = 0;
        await this.writeAll(notice);
      }
      const batch = this.filling.subarray(0, this.filled);
      [this.filling, this.spare] = [this.spare, this.filling];
      this.writingBytes = this.filled;
      this.filled = 0;
      await this.writeAll(batch);
      this.writingBytes = 0;
    }
  }

  private async writeAll(bytes: Uint8Array): Promise<void> {
    try {
      for (let written = 0; written < bytes.length;) {
        written += await Deno.stdout.write(bytes.subarray(written));
      }
    } catch {
      // stdout is gone (a broken pipe): nobody is left to tell.
    }
  }
}

/** LogTape's mark for a sink that is done with a record when it returns. */
const IMMEDIATE_SINK = Symbol.for("LogTape.sinkSnapshotPolicy.immediate");

/** Sets up LogTape to write formatted lines; returns the worker's logger. */
export async function setupLogging(
  write: (line: string) => void,
  level: LogLevelName,
  secrets: Secrets,
  format: LogFormat = "text",
): Promise<Log> {
  const formatter = format === "json" ? formatJson : formatRecord;
  const lines = (record: LogRecord) => write(formatter(record, secrets));
  // It formats each record as it comes, as LogTape's own stream sink does: so
  // marked as that one is, LogTape does not copy every record for it first
  // (1.4 KB of garbage a line, in a flood of output).
  Object.defineProperty(lines, IMMEDIATE_SINK, { value: true });
  await configure({
    reset: true,
    sinks: { lines },
    loggers: [
      { category: ["tasks"], lowestLevel: level, sinks: ["lines"] },
      {
        category: ["logtape", "meta"],
        lowestLevel: "warning",
        sinks: ["lines"],
      },
    ],
  });
  const logger = getLogger(["tasks"]);
  // The text form has no use for the fields: no per-line logger for them.
  const about = (fields?: LogFields) =>
    fields === undefined || format === "text"
      ? logger
      : logger.with({ ...fields });
  // Tagged templates keep braces in command output from being read as placeholders.
  return {
    debug: (text, fields) => about(fields).debug`${text}`,
    info: (text, fields) => about(fields).info`${text}`,
    warn: (text, fields) => about(fields).warn`${text}`,
    error: (text, fields) => about(fields).error`${text}`,
  };
}

/**
 * Splits a byte stream into lines for the log. A very long line is cut into
 * pieces, with secrets masked first, so that no cut splits one into halves
 * that each escape the mask.
 */
export class LineSplitter {
  private static readonly PIECE_BYTES = 4096;
  private readonly decoder = new TextDecoder();
  private partial = "";
  private readonly maxLine: number;
  private readonly secrets?: Secrets;
  constructor(
    private readonly emit: (line: string) => void,
    options: { maxLine?: number; secrets?: Secrets } = {},
  ) {
    this.maxLine = options.maxLine ?? 16_384;
    this.secrets = options.secrets;
  }

  push(chunk: Uint8Array): void {
    // Decoded a few lines at a time, up to the first newline after each
    // PIECE_BYTES: a whole chunk's text (32 KiB from ssh2) would be alive
    // through most young-generation collections of a flood, and V8 grows
    // that generation by what outlives them.
    for (let from = 0; from < chunk.length;) {
      const nl = chunk.indexOf(0x0a, from + LineSplitter.PIECE_BYTES - 1);
      const to = nl < 0 ? chunk.length : nl + 1;
      this.take(
        this.decoder.decode(chunk.subarray(from, to), { stream: true }),
      );
      from = to;
    }
  }

  /** Lines are found in place, each a slice of the text: no array of them. */
  private take(text: string): void {
    let start = 0;
    for (let nl = text.indexOf("\n"); nl >= 0; nl = text.indexOf("\n", start)) {
      const piece = text.slice(start, nl);
      const line = this.partial === "" ? piece : this.partial + piece;
      this.partial = "";
      this.cut(line.endsWith("\r") ? line.slice(0, -1) : line);
      start = nl + 1;
    }
    this.unfinished(text.slice(start));
  }

  end(): void {
    this.unfinished(this.decoder.decode());
    if (this.partial !== "") this.cut(this.partial);
    this.partial = "";
  }

  /** Text with no newline in it: the start of a line still to come. */
  private unfinished(text: string): void {
    this.partial += text;
    // An unfinished line is cut only where no secret can straddle the cut.
    const hold = this.secrets?.longest ?? 0;
    while (this.partial.length > this.maxLine + hold) {
      this.partial = this.secrets?.mask(this.partial) ?? this.partial;
      if (this.partial.length <= this.maxLine + hold) break;
      this.emit(this.partial.slice(0, this.maxLine));
      this.partial = this.partial.slice(this.maxLine);
    }
  }

  private cut(line: string): void {
    const masked = this.secrets?.mask(line) ?? line;
    for (let at = 0; at === 0 || at < masked.length; at += this.maxLine) {
      this.emit(masked.slice(at, at + this.maxLine));
    }
  }
}

/** Where a Tail encodes a line before copying it in; grown to the longest line. */
let lineBytes = new Uint8Array(4096);

/**
 * The last 64 KiB of a stream's lines, for the result and the dead-letter
 * record. Kept as UTF-8 in a ring that grows to that size and is then
 * reused: in a flood of lines, lines kept as strings would each outlive a
 * young-generation collection, and V8 grows that generation (to 64 MB) by
 * what outlives it.
 */
export class Tail {
  private ring = new Uint8Array(0);
  /** Where the next byte goes; once full, the oldest byte is here too. */
  private at = 0;
  private kept = 0;
  truncated = false;
  private static readonly encoder = new TextEncoder();
  private static readonly decoder = new TextDecoder();
  constructor(private readonly max = 64 * 1024) {}

  add(line: string): void {
    // At most 3 bytes a UTF-16 unit, and the newline.
    if (lineBytes.length < line.length * 3 + 1) {
      lineBytes = new Uint8Array(line.length * 3 + 1);
    }
    const { written } = Tail.encoder.encodeInto(line, lineBytes);
    lineBytes[written] = 0x0a;
    this.push(lineBytes.subarray(0, written + 1));
  }

  toString(): string {
    if (this.kept < this.ring.length) {
      return Tail.decoder.decode(this.ring.subarray(0, this.kept));
    }
    const bytes = new Uint8Array(this.kept);
    bytes.set(this.ring.subarray(this.at));
    bytes.set(this.ring.subarray(0, this.at), this.ring.length - this.at);
    // What was let go may have ended in the middle of a character.
    let start = 0;
    while (
      this.truncated && start < bytes.length && (bytes[start] & 0xc0) === 0x80
    ) start++;
    return Tail.decoder.decode(bytes.subarray(start));
  }

  private push(bytes: Uint8Array): void {
    const needed = this.kept + bytes.length;
    if (needed > this.ring.length && this.ring.length < this.max) {
      // Not wrapped yet: the bytes kept are the ring's first ones.
      let size = Math.max(256, this.ring.length * 2);
      while (size < needed) size *= 2;
      const ring = new Uint8Array(Math.min(size, this.max));
      ring.set(this.ring.subarray(0, this.kept));
      this.ring = ring;
      this.at = this.kept;
    }
    const size = this.ring.length;
    if (needed > size) this.truncated = true;
    // Longer than the ring: only its end can be kept.
    if (bytes.length > size) bytes = bytes.subarray(bytes.length - size);
    const first = Math.min(bytes.length, size - this.at);
    this.ring.set(bytes.subarray(0, first), this.at);
    this.ring.set(bytes.subarray(first));
    this.kept = Math.min(needed, size);
    this.at = (this.at + bytes.length) % size;
  }
}

export type LogLevelName = "debug" | "info" | "warning" | "error";

export type LogFormat = "text" | "json";
