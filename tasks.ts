/**
 * tasks.ts: a worker that turns IronMQ messages into commands on a remote server.
 *
 * For each message it reserves, it runs the configured command over SSH, logs the
 * output the way Fabric did (`[host] out: ...`), and deletes the message only after
 * the command succeeded. A failed command is released for a retry; a message that
 * keeps failing, or can never run, goes to a dead-letter queue. With no IronMQ
 * token or host configured it starts the embedded queue server (mq_server.ts)
 * in-process.
 *
 * The file reads top to bottom: configuration, logging, message parsing and
 * quoting, time and backoff, the IronMQ client, known_hosts, the SSH runner, the
 * worker loop, and the entry point (with `--permissions`, the Deno flags that
 * ./start grants).
 */

import { createHash, createHmac, timingSafeEqual } from "node:crypto";
import { Buffer } from "node:buffer";
import { userInfo } from "node:os";
// @ts-types="@types/ssh2"
import { Client, type ClientChannel, utils as sshUtils } from "ssh2";
import { configure, getLogger, type LogRecord } from "@logtape/logtape";
import {
  bracketIPv6,
  type Env,
  envValue,
  errorText,
  isLoopback,
  isRecord,
  type QueueServer,
  type QueueServerOptions,
  queueServerOptionsFromEnv,
  startQueueServer,
} from "./mq_server.ts";

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

export type HostKeyPolicy = "yes" | "accept-new";
export type LogLevelName = "debug" | "info" | "warning" | "error";

export interface QueueConfig {
  /** scheme://host:port of the IronMQ API, no trailing slash. */
  baseUrl: string;
  projectId: string;
  token?: string;
  queueName: string;
}

export interface SshConfig {
  host: string;
  port: number;
  user: string;
  /** Private key file; undefined means ssh-agent (agentSocket) only. */
  keyFile?: string;
  agentSocket?: string;
  passphrase?: string;
  knownHostsFile: string;
  strictHostKeyChecking: HostKeyPolicy;
  connectTimeoutMs: number;
  channelsPerConnection: number;
}

export interface TaskConfig {
  command: string;
  concurrency: number;
  /** 0 means no limit. */
  timeoutMs: number;
  maxAttempts: number;
  retryDelaySeconds: number;
  deadLetterQueue: string;
  reservationTimeoutSeconds: number;
  pollWaitSeconds: number;
  shutdownGraceMs: number;
}

export interface Config {
  queue: QueueConfig;
  /** Set when no IronMQ is configured: the worker starts its own server. */
  embedded?: QueueServerOptions;
  ssh: SshConfig;
  task: TaskConfig;
  logLevel: LogLevelName;
}

/** An iron.json file found on disk, as read (path for error messages). */
export interface IronJsonFile {
  path: string;
  text: string;
}

/** What configuration defaults depend on outside the environment. */
export interface ConfigContext {
  home: string;
  user: string;
  ironJsonFiles: IronJsonFile[];
  /** Whether a regular file exists, for the default key search. */
  exists: (path: string) => boolean;
  /** Reads a key file, so a bad key is reported with the other problems. */
  readKey?: (path: string) => Uint8Array;
  /** Whether a Unix socket exists there, for SSH_AUTH_SOCK. */
  isSocket?: (path: string) => boolean;
}

export class ConfigError extends Error {
  constructor(readonly problems: string[]) {
    super(
      `invalid configuration:\n${problems.map((p) => `  - ${p}`).join("\n")}`,
    );
    this.name = "ConfigError";
  }
}

const IRON_KEYS = ["token", "project_id", "host", "port", "scheme"] as const;
type IronKey = typeof IRON_KEYS[number];
type IronSettings = Partial<Record<IronKey, string>>;

/** Reads iron.json settings; an "mq" or "iron_mq" sub-object overrides the top level. */
function ironJsonSettings(
  file: IronJsonFile,
  problems: string[],
): IronSettings {
  let parsed: unknown;
  try {
    parsed = JSON.parse(file.text);
  } catch (e) {
    problems.push(`${file.path}: not valid JSON (${errorText(e)})`);
    return {};
  }
  if (!isRecord(parsed)) {
    problems.push(`${file.path}: must hold a JSON object`);
    return {};
  }
  const settings: IronSettings = {};
  for (const layer of [parsed, parsed.iron_mq, parsed.mq]) {
    if (!isRecord(layer)) continue;
    for (const key of IRON_KEYS) {
      const value = layer[key];
      if (typeof value === "string" || typeof value === "number") {
        settings[key] = String(value);
      }
    }
  }
  return settings;
}

/** A setting's value and where it came from, for error messages. */
interface Sourced {
  value: string;
  from: string;
}

/** IRON_MQ_X beats IRON_X beats iron.json in the working directory, then home. */
function ironSetting(
  env: Env,
  files: { path: string; settings: IronSettings }[],
  key: IronKey,
): Sourced | undefined {
  const name = key.toUpperCase();
  for (const variable of [`IRON_MQ_${name}`, `IRON_${name}`]) {
    const value = env[variable];
    if (value !== undefined && value !== "") return { value, from: variable };
  }
  for (const { path, settings } of files) {
    const value = settings[key];
    if (value !== undefined && value !== "") {
      return { value, from: `${path} "${key}"` };
    }
  }
  return undefined;
}

/** Collects every problem instead of stopping at the first. */
class EnvReader {
  readonly problems: string[] = [];
  constructor(private readonly env: Env) {}

  text(name: string, fallback: string): string {
    return envValue(this.env, name) ?? fallback;
  }

  optional(name: string): string | undefined {
    return envValue(this.env, name);
  }

  integer(name: string, fallback: number, min: number, max: number): number {
    return this.parseNumber(name, fallback, min, max, true);
  }

  /** Seconds, fractions allowed, returned as seconds. */
  seconds(name: string, fallback: number, min: number, max: number): number {
    return this.parseNumber(name, fallback, min, max, false);
  }

  choice<T extends string>(name: string, fallback: T, choices: T[]): T {
    const value = this.text(name, fallback);
    if ((choices as string[]).includes(value)) return value as T;
    this.problems.push(
      `${name}=${JSON.stringify(value)}: must be one of ${choices.join(", ")}`,
    );
    return fallback;
  }

  private parseNumber(
    name: string,
    fallback: number,
    min: number,
    max: number,
    whole: boolean,
  ): number {
    const raw = this.optional(name);
    if (raw === undefined) return fallback;
    const value = Number(raw.trim());
    const kind = whole ? "a whole number" : "a number of seconds";
    if (
      raw.trim() === "" || !Number.isFinite(value) ||
      (whole && !Number.isInteger(value)) || value < min || value > max
    ) {
      this.problems.push(
        `${name}=${JSON.stringify(raw)}: must be ${kind} from ${min} to ${max}`,
      );
      return fallback;
    }
    return value;
  }
}

const DEFAULT_KEY_FILES = ["id_ed25519", "id_ecdsa", "id_rsa"];
/** Iron.io's default host, as its official clients use when given only a token. */
const DEFAULT_IRON_HOST = "mq-aws-us-east-1-1.iron.io";

/** Pure: environment plus context in, validated configuration (or ConfigError) out. */
export function parseConfig(env: Env, context: ConfigContext): Config {
  const read = new EnvReader(env);
  const problems = read.problems;
  const files = context.ironJsonFiles.map((file) => ({
    path: file.path,
    settings: ironJsonSettings(file, problems),
  }));
  const iron = (key: IronKey) => ironSetting(env, files, key);
  const shown = (s: Sourced) => `${s.from}=${JSON.stringify(s.value)}`;

  const queueName = read.text("IRON_MQ_QUEUE_NAME", "my_queue");
  if (!/^[A-Za-z0-9_.-]{1,64}$/.test(queueName)) {
    problems.push(
      `IRON_MQ_QUEUE_NAME=${
        JSON.stringify(queueName)
      }: use 1 to 64 letters, digits, '_', '-' or '.'`,
    );
  }

  const token = iron("token")?.value;
  const host = iron("host")?.value;
  const embedded = token === undefined && host === undefined;
  for (const key of ["port", "scheme", "project_id"] as const) {
    const given = iron(key);
    if (embedded && given !== undefined) {
      problems.push(
        `${
          shown(given)
        }: set IRON_HOST too (and IRON_TOKEN for Iron.io), or unset it to use the embedded queue server`,
      );
    }
  }
  const schemeSetting = iron("scheme");
  const scheme = schemeSetting?.value ?? (embedded ? "http" : "https");
  if (schemeSetting && scheme !== "http" && scheme !== "https") {
    problems.push(`${shown(schemeSetting)}: must be http or https`);
  }
  const queueHost = host ?? DEFAULT_IRON_HOST;
  if (token !== undefined && scheme === "http" && !isLoopback(queueHost)) {
    problems.push(
      `${
        shown(schemeSetting!)
      }: would send IRON_TOKEN unencrypted to ${queueHost}; use https`,
    );
  }
  const portSetting = iron("port");
  const port = Number(portSetting?.value ?? (scheme === "http" ? 80 : 443));
  if (portSetting && !/^\d{1,5}$/.test(portSetting.value) || port > 65535) {
    problems.push(`${shown(portSetting!)}: must be a port from 1 to 65535`);
  }
  // Only Iron.io's own hosts need a real project id; any id works elsewhere.
  const projectSetting = iron("project_id");
  const projectId = projectSetting?.value ??
    (token !== undefined && host === undefined ? "" : "local");
  if (projectId === "") {
    problems.push(
      "IRON_PROJECT_ID: required with IRON_TOKEN for Iron.io (find it in the Iron.io dashboard)",
    );
  } else if (!/^[A-Za-z0-9_-]+$/.test(projectId)) {
    problems.push(`${shown(projectSetting!)}: use letters, digits, '_' or '-'`);
  }
  let embeddedOptions: QueueServerOptions | undefined;
  if (embedded) {
    try {
      embeddedOptions = queueServerOptionsFromEnv(env);
    } catch (e) {
      problems.push(errorText(e));
    }
  }
  const queue: QueueConfig = {
    baseUrl: `${scheme}://${bracketIPv6(queueHost)}:${port}`,
    projectId,
    token: token ?? embeddedOptions?.token,
    queueName,
  };

  const keyFile = read.optional("SSH_KEY_FILE");
  const agentSocket = keyFile === undefined
    ? read.optional("SSH_AUTH_SOCK")
    : undefined;
  const defaultKey = DEFAULT_KEY_FILES
    .map((name) => `${context.home}/.ssh/${name}`)
    .find(context.exists);
  const ssh: SshConfig = {
    host: read.text("SSH_HOST", "127.0.0.1"),
    port: read.integer("SSH_PORT", 22, 1, 65535),
    user: read.text("SSH_USER", context.user),
    keyFile: keyFile ?? (agentSocket === undefined ? defaultKey : undefined),
    agentSocket,
    passphrase: read.optional("SSH_KEY_PASSPHRASE"),
    knownHostsFile: read.text(
      "SSH_KNOWN_HOSTS",
      `${context.home}/.ssh/known_hosts`,
    ),
    strictHostKeyChecking: read.choice(
      "SSH_STRICT_HOST_KEY_CHECKING",
      "yes",
      ["yes", "accept-new"],
    ),
    connectTimeoutMs: read.seconds("SSH_CONNECT_TIMEOUT", 10, 1, 300) * 1000,
    channelsPerConnection: read.integer(
      "SSH_CHANNELS_PER_CONNECTION",
      4,
      1,
      8,
    ),
  };
  if (ssh.keyFile !== undefined && context.readKey !== undefined) {
    let problem: string | undefined;
    try {
      problem = keyProblem(context.readKey(ssh.keyFile), ssh.passphrase);
    } catch (e) {
      problem = `cannot read it (${errorText(e)})`;
    }
    if (problem) problems.push(`SSH_KEY_FILE=${ssh.keyFile}: ${problem}`);
  }
  if (
    ssh.agentSocket !== undefined && context.isSocket !== undefined &&
    !context.isSocket(ssh.agentSocket)
  ) {
    problems.push(
      `SSH_AUTH_SOCK=${ssh.agentSocket}: no socket there; is ssh-agent running? (or set SSH_KEY_FILE)`,
    );
  }
  if (ssh.keyFile === undefined && ssh.agentSocket === undefined) {
    problems.push(
      `SSH_KEY_FILE: no key given and none found (${
        DEFAULT_KEY_FILES.map((n) => `~/.ssh/${n}`).join(", ")
      }) and no ssh-agent (SSH_AUTH_SOCK): create one with ssh-keygen -t ed25519, or set SSH_KEY_FILE`,
    );
  }

  const reservationTimeoutSeconds = read.integer(
    "TASK_RESERVATION_TIMEOUT",
    60,
    30,
    86400,
  );
  const task: TaskConfig = {
    command: read.text("TASK_COMMAND", "cat /etc/os-release"),
    concurrency: read.integer("TASK_CONCURRENCY", 8, 1, 256),
    timeoutMs: read.seconds("TASK_TIMEOUT", 0, 0, 86400) * 1000,
    maxAttempts: read.integer("TASK_MAX_ATTEMPTS", 5, 1, 1000),
    retryDelaySeconds: read.integer("TASK_RETRY_DELAY", 10, 0, 604800),
    deadLetterQueue: read.text("TASK_DEAD_LETTER_QUEUE", `${queueName}_failed`),
    reservationTimeoutSeconds,
    pollWaitSeconds: read.integer("TASK_POLL_WAIT", 5, 0, 30),
    // Grace + 2 s of TERM/KILL stays under runit's 7 s `sv` timeout.
    shutdownGraceMs: read.seconds("TASK_SHUTDOWN_GRACE", 4, 0, 3600) * 1000,
  };
  if (task.command.trim() === "") {
    problems.push("TASK_COMMAND: must not be blank");
  }
  if (task.deadLetterQueue === queueName) {
    problems.push(
      "TASK_DEAD_LETTER_QUEUE: must differ from IRON_MQ_QUEUE_NAME",
    );
  }
  const logLevel = read.choice<LogLevelName>("LOG_LEVEL", "info", [
    "debug",
    "info",
    "warning",
    "error",
  ]);

  if (problems.length > 0) throw new ConfigError(problems);
  return {
    queue,
    embedded: embeddedOptions,
    ssh,
    task,
    logLevel,
  };
}

/** Reads iron.json (or .iron.json) from the working directory, then home. */
export function readIronJsonFiles(cwd: string, home: string): IronJsonFile[] {
  const found: IronJsonFile[] = [];
  for (const path of ironJsonPaths(cwd, home)) {
    const text = readTextIfExists(path);
    if (text !== undefined) found.push({ path, text });
  }
  return found;
}

/** The iron.json files the configuration may read, found or not. */
export function ironJsonPaths(cwd: string, home: string): string[] {
  const paths = [cwd, home].flatMap((dir) =>
    ["iron.json", ".iron.json"].map((name) => `${dir}/${name}`)
  );
  return [...new Set(paths)];
}

function readTextIfExists(path: string): string | undefined {
  try {
    return Deno.readTextFileSync(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return undefined;
    throw new Error(`cannot read ${path}: ${errorText(e)}`);
  }
}

// ---------------------------------------------------------------------------
// Logging: one event a line on stdout; svlogd adds the timestamps.
// ---------------------------------------------------------------------------

export type LineSink = (line: string) => void;

export interface Log {
  debug(text: string): void;
  info(text: string): void;
  warn(text: string): void;
  error(text: string): void;
}

const LEVEL_PREFIX: Record<string, string> = {
  trace: "DEBUG ",
  debug: "DEBUG ",
  info: "",
  warning: "WARN ",
  error: "ERROR ",
  fatal: "FATAL ",
};

/** Formats a record as one line; secrets are masked even if they slip in. */
export function formatRecord(record: LogRecord, secrets: string[]): string {
  const text = maskSecrets(
    record.message.map((part) =>
      typeof part === "string" ? part : JSON.stringify(part)
    ).join(""),
    secrets,
  );
  return `${LEVEL_PREFIX[record.level] ?? ""}${
    text.replaceAll(/\r?\n/g, "\\n")
  }`;
}

export function maskSecrets(text: string, secrets: string[]): string {
  for (const secret of secrets) {
    if (secret.length >= 4) text = text.replaceAll(secret, "[redacted]");
  }
  return text;
}

export function stdoutSink(): LineSink {
  const encoder = new TextEncoder();
  return (line) => {
    const bytes = encoder.encode(line + "\n");
    let written = 0;
    while (written < bytes.length) {
      written += Deno.stdout.writeSync(bytes.subarray(written));
    }
  };
}

/** Sets up LogTape with a line sink; returns the worker's logger. */
export async function setupLogging(
  sink: LineSink,
  level: LogLevelName,
  secrets: string[],
): Promise<Log> {
  await configure({
    reset: true,
    sinks: { lines: (record) => sink(formatRecord(record, secrets)) },
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
  // Tagged templates keep braces in command output from being read as placeholders.
  return {
    debug: (text) => logger.debug`${text}`,
    info: (text) => logger.info`${text}`,
    warn: (text) => logger.warn`${text}`,
    error: (text) => logger.error`${text}`,
  };
}

// ---------------------------------------------------------------------------
// Messages: what a body asks for, and how its arguments are quoted
// ---------------------------------------------------------------------------

/** sshd passes the command to `sh -c` as one argument: stay under Linux's 128 KiB limit. */
export const MAX_COMMAND_BYTES = 100_000;

export type CommandPlan =
  | { ok: true; command: string; args: string[] }
  | { ok: false; reason: string };

/** Quotes one argument for a POSIX shell: the shell receives exactly `arg`. */
export function shellQuote(arg: string): string {
  if (/^[A-Za-z0-9_@%+=:,./-]+$/.test(arg)) return arg;
  return `'${arg.replaceAll("'", `'\\''`)}'`;
}

/**
 * A JSON object body must be `{"args": [strings]}`; any other body (plain text,
 * other JSON values) runs the configured command as it is.
 */
export function planCommand(baseCommand: string, body: string): CommandPlan {
  const args = parseArgs(body);
  if (!Array.isArray(args)) return { ok: false, reason: args.reason };
  const command = [baseCommand, ...args.map(shellQuote)].join(" ");
  const bytes = new TextEncoder().encode(command).length;
  if (bytes > MAX_COMMAND_BYTES) {
    return {
      ok: false,
      reason:
        `the command with its args is ${bytes} bytes, over the ${MAX_COMMAND_BYTES}-byte limit`,
    };
  }
  return { ok: true, command, args };
}

function parseArgs(body: string): string[] | { reason: string } {
  if (!body.trimStart().startsWith("{")) return [];
  let parsed: unknown;
  try {
    parsed = JSON.parse(body);
  } catch {
    return []; // Text that merely starts with "{" is plain text.
  }
  if (!isRecord(parsed)) return [];
  const extra = Object.keys(parsed).filter((k) => k !== "args");
  if (extra.length > 0) {
    return {
      reason: `unknown field(s) ${
        extra.map((k) => JSON.stringify(k)).join(", ")
      } in a JSON body: only "args" is allowed`,
    };
  }
  const args = parsed.args;
  if (!Array.isArray(args)) {
    return { reason: `"args" must be an array of strings` };
  }
  for (const [i, arg] of args.entries()) {
    if (typeof arg !== "string") {
      return { reason: `"args"[${i}] is ${typeof arg}, not a string` };
    }
    if (arg.includes("\0")) {
      return {
        reason: `"args"[${i}] contains a NUL byte, which no shell can pass`,
      };
    }
    if (!arg.isWellFormed()) {
      return {
        reason: `"args"[${i}] is not well-formed Unicode (lone surrogate)`,
      };
    }
  }
  return args;
}

// ---------------------------------------------------------------------------
// Time, backoff and retries
// ---------------------------------------------------------------------------

export interface Clock {
  now(): number;
  sleep(ms: number, signal?: AbortSignal): Promise<void>;
}

export const realClock: Clock = {
  now: () => Date.now(),
  sleep: (ms, signal) =>
    new Promise((resolve) => {
      if (signal?.aborted) return resolve();
      const done = () => {
        clearTimeout(timer);
        signal?.removeEventListener("abort", done);
        resolve();
      };
      const timer = setTimeout(done, ms);
      signal?.addEventListener("abort", done, { once: true });
    }),
};

/** Capped exponential backoff with full jitter; `random` is in [0, 1). */
export function backoffMs(
  attempt: number,
  baseMs: number,
  capMs: number,
  random: number,
): number {
  const ceiling = Math.min(capMs, baseMs * 2 ** Math.min(attempt, 30));
  return Math.round(ceiling / 2 + random * ceiling / 2);
}

/** The release delay after `attempts` failed runs: doubles each time, at most 15 minutes. */
export function retryDelaySeconds(
  attempts: number,
  baseSeconds: number,
): number {
  return Math.min(900, baseSeconds * 2 ** Math.max(0, attempts - 1));
}

// ---------------------------------------------------------------------------
// IronMQ client (plain fetch)
// ---------------------------------------------------------------------------

export interface QueueMessage {
  id: string;
  body: string;
  reserved_count: number;
  reservation_id: string;
}

export class QueueError extends Error {
  constructor(
    message: string,
    readonly status: number | undefined,
    readonly retryable: boolean,
  ) {
    super(message);
    this.name = "QueueError";
  }
}

export type Fetch = typeof fetch;

export interface DeleteItem {
  id: string;
  reservation_id: string;
}

/** The IronMQ v3 calls the worker makes. Errors are QueueErrors that say whether a retry may help. */
export class IronMqClient {
  constructor(
    private readonly config: QueueConfig,
    private readonly fetchFn: Fetch = fetch,
  ) {}

  /** Creates the queue if it does not exist yet, so the first reserve finds it; true if it did. */
  async ensureQueue(signal?: AbortSignal): Promise<boolean> {
    try {
      await this.call("GET", `/queues/${this.queue()}`, undefined, 0, signal);
      return false;
    } catch (e) {
      if (!(e instanceof QueueError) || e.status !== 404) throw e;
      await this.call(
        "PUT",
        `/queues/${this.queue()}`,
        { queue: {} },
        0,
        signal,
      );
      return true;
    }
  }

  reserve(
    n: number,
    timeoutSeconds: number,
    waitSeconds: number,
    signal?: AbortSignal,
  ): Promise<QueueMessage[]> {
    return this.call<{ messages?: unknown }>(
      "POST",
      `/queues/${this.queue()}/reservations`,
      { n, timeout: timeoutSeconds, wait: waitSeconds },
      waitSeconds,
      signal,
    ).then((reply) => parseReserved(reply.messages));
  }

  async delete(id: string, reservationId: string): Promise<void> {
    await this.call("DELETE", `/queues/${this.queue()}/messages/${id}`, {
      reservation_id: reservationId,
    });
  }

  async deleteBatch(items: DeleteItem[]): Promise<void> {
    await this.call("DELETE", `/queues/${this.queue()}/messages`, {
      ids: items,
    });
  }

  async release(
    id: string,
    reservationId: string,
    delaySeconds: number,
  ): Promise<void> {
    await this.call(
      "POST",
      `/queues/${this.queue()}/messages/${id}/release`,
      { reservation_id: reservationId, delay: delaySeconds },
    );
  }

  async touch(
    id: string,
    reservationId: string,
    timeoutSeconds: number,
  ): Promise<string> {
    const reply = await this.call<{ reservation_id?: unknown }>(
      "POST",
      `/queues/${this.queue()}/messages/${id}/touch`,
      { reservation_id: reservationId, timeout: timeoutSeconds },
    );
    if (typeof reply.reservation_id !== "string") {
      throw new QueueError("touch reply has no reservation_id", 200, true);
    }
    return reply.reservation_id;
  }

  async post(queue: string, bodies: string[]): Promise<string[]> {
    const reply = await this.call<{ ids?: unknown }>(
      "POST",
      `/queues/${encodeURIComponent(queue)}/messages`,
      { messages: bodies.map((body) => ({ body })) },
    );
    return Array.isArray(reply.ids) ? reply.ids.map(String) : [];
  }

  private queue(): string {
    return encodeURIComponent(this.config.queueName);
  }

  private async call<T>(
    method: string,
    path: string,
    body: unknown,
    waitSeconds = 0,
    signal?: AbortSignal,
  ): Promise<T> {
    const url =
      `${this.config.baseUrl}/3/projects/${this.config.projectId}${path}`;
    const where = `${method} ${this.config.baseUrl}/3/projects/.../${
      path.replace(/^\//, "")
    }`;
    const headers: Record<string, string> = {
      "Content-Type": "application/json",
      "Accept": "application/json",
    };
    if (this.config.token !== undefined) {
      headers.Authorization = `OAuth ${this.config.token}`;
    }
    // A timer cleared once the reply is read: AbortSignal.timeout() would keep
    // every request's signal alive for its full 30 s, thousands at a time.
    const timeout = new AbortController();
    const timer = setTimeout(
      () => timeout.abort(new Error("no reply within the time limit")),
      (waitSeconds + 30) * 1000,
    );
    const onStop = () => timeout.abort(signal?.reason);
    if (signal?.aborted) onStop();
    signal?.addEventListener("abort", onStop, { once: true });
    let response: Response;
    let text: string;
    try {
      response = await this.fetchFn(url, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: timeout.signal,
      });
      text = await response.text();
    } catch (e) {
      if (signal?.aborted) throw e;
      throw new QueueError(`${where}: ${errorText(e)}`, undefined, true);
    } finally {
      clearTimeout(timer);
      signal?.removeEventListener("abort", onStop);
    }
    if (!response.ok) {
      const status = response.status;
      const retryable = status >= 500 || status === 408 || status === 429;
      const hint = status === 401
        ? ": check IRON_TOKEN (for a `deno task mq` server: its MQ_TOKEN)"
        : "";
      throw new QueueError(
        `${where}: HTTP ${status}${serverMessage(text)}${hint}`,
        status,
        retryable,
      );
    }
    try {
      const parsed: unknown = JSON.parse(text);
      if (isRecord(parsed)) return parsed as T;
    } catch {
      // fall through
    }
    throw new QueueError(
      `${where}: HTTP ${response.status} with a reply that is not a JSON object`,
      response.status,
      true,
    );
  }
}

function serverMessage(text: string): string {
  try {
    const parsed: unknown = JSON.parse(text);
    if (isRecord(parsed) && typeof parsed.msg === "string") {
      return ` (${parsed.msg})`;
    }
  } catch {
    // not JSON
  }
  return text === "" ? "" : ` (${text.slice(0, 200)})`;
}

function parseReserved(value: unknown): QueueMessage[] {
  if (!Array.isArray(value)) {
    throw new QueueError("reserve reply has no messages array", 200, true);
  }
  return value.map((m): QueueMessage => {
    if (
      !isRecord(m) || typeof m.id !== "string" ||
      typeof m.reservation_id !== "string" || typeof m.body !== "string"
    ) {
      throw new QueueError("reserve reply has a malformed message", 200, true);
    }
    return {
      id: m.id,
      body: m.body,
      reservation_id: m.reservation_id,
      reserved_count: typeof m.reserved_count === "number"
        ? m.reserved_count
        : 1,
    };
  });
}

// ---------------------------------------------------------------------------
// known_hosts (OpenSSH format, hashed entries too)
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// SSH runner: a small pool of ssh2 connections, several channels on each
// ---------------------------------------------------------------------------

export type RunResult =
  | { kind: "exit"; code: number }
  | { kind: "signal"; signal: string }
  | { kind: "timeout" }
  | { kind: "aborted" }
  | { kind: "ssh-error"; error: string };

export interface RunIo {
  onStdout(chunk: Uint8Array): void;
  onStderr(chunk: Uint8Array): void;
  timeoutMs: number;
  signal: AbortSignal;
}

/** What the worker needs from SSH; tests may supply their own. */
export interface CommandRunner {
  /** Resolves once commands can run (connects, backing off); rejects when `signal` aborts. */
  ready(signal: AbortSignal): Promise<void>;
  run(command: string, io: RunIo): Promise<RunResult>;
  close(): void;
}

export interface SshCredentials {
  privateKey?: Uint8Array;
  passphrase?: string;
  agent?: string;
}

/** Reads and checks the key at start, so a bad key stops the worker before it reserves anything. */
export function loadSshCredentials(ssh: SshConfig): SshCredentials {
  if (ssh.keyFile === undefined) return { agent: ssh.agentSocket };
  let privateKey: Uint8Array;
  try {
    privateKey = Deno.readFileSync(ssh.keyFile);
  } catch (e) {
    throw new ConfigError([
      `SSH_KEY_FILE=${ssh.keyFile}: cannot read it (${errorText(e)})`,
    ]);
  }
  const problem = keyProblem(privateKey, ssh.passphrase);
  if (problem) {
    throw new ConfigError([`SSH_KEY_FILE=${ssh.keyFile}: ${problem}`]);
  }
  return { privateKey, passphrase: ssh.passphrase, agent: ssh.agentSocket };
}

/** Why a key file's bytes cannot log in, or undefined when they can. */
export function keyProblem(
  bytes: Uint8Array,
  passphrase: string | undefined,
): string | undefined {
  const parsed = sshUtils.parseKey(Buffer.from(bytes), passphrase);
  if (parsed instanceof Error) {
    const hint = /passphrase|encrypted/i.test(parsed.message)
      ? "set SSH_KEY_PASSPHRASE, or check it"
      : "is it an OpenSSH private key?";
    return `cannot use this key: ${parsed.message} (${hint})`;
  }
  if (!parsed.isPrivateKey()) {
    return "this is a public key: name the private key file (without .pub)";
  }
  return undefined;
}

interface Connection {
  client: Client;
  active: number;
  closed: boolean;
}

export class SshPool implements CommandRunner {
  private readonly connections: Connection[] = [];
  private readonly maxConnections: number;
  private connecting?: Promise<Connection>;
  private readonly slotWaiters: (() => void)[] = [];
  private failures = 0;
  private lastError?: string;
  private nextAttemptAt = 0;
  private closed = false;

  constructor(
    private readonly ssh: SshConfig,
    private readonly credentials: SshCredentials,
    concurrency: number,
    private readonly log: Log,
    private readonly clock: Clock = realClock,
  ) {
    this.maxConnections = Math.ceil(concurrency / ssh.channelsPerConnection);
  }

  private get where(): string {
    return `${this.ssh.user}@${this.ssh.host}:${this.ssh.port}`;
  }

  async ready(signal: AbortSignal): Promise<void> {
    while (!signal.aborted) {
      if (this.connections.some((c) => !c.closed)) return;
      const wait = this.nextAttemptAt - this.clock.now();
      if (wait > 0) {
        await this.clock.sleep(wait, signal);
        continue;
      }
      try {
        await this.connect();
      } catch {
        // connect() logged it and set the backoff.
      }
    }
    throw new DOMException("stopped", "AbortError");
  }

  async run(command: string, io: RunIo): Promise<RunResult> {
    let connection: Connection;
    try {
      connection = await this.acquire();
    } catch (e) {
      return { kind: "ssh-error", error: errorText(e) };
    }
    try {
      return await this.exec(connection, command, io);
    } finally {
      connection.active--;
      this.slotWaiters.shift()?.();
    }
  }

  close(): void {
    this.closed = true;
    for (const c of this.connections) c.client.end();
    this.connections.length = 0;
    for (const wake of this.slotWaiters.splice(0)) wake();
  }

  /**
   * Takes a channel slot on the least busy open connection, opening another
   * connection when all are full. The slot is taken synchronously, so callers
   * running at once never crowd one connection past its channel limit.
   */
  private async acquire(): Promise<Connection> {
    for (;;) {
      if (this.closed) throw new Error("SSH pool is closed");
      const open = this.connections.filter((c) => !c.closed);
      const free = open
        .filter((c) => c.active < this.ssh.channelsPerConnection)
        .sort((a, b) => a.active - b.active)[0];
      if (free !== undefined) {
        free.active++;
        return free;
      }
      const mayOpen = open.length === 0 ||
        (open.length < this.maxConnections &&
          this.clock.now() >= this.nextAttemptAt);
      if (mayOpen) {
        try {
          await this.connect();
        } catch (e) {
          if (open.length === 0) throw e;
        }
        continue;
      }
      await new Promise<void>((wake) => this.slotWaiters.push(wake));
    }
  }

  private connect(): Promise<Connection> {
    const wait = this.nextAttemptAt - this.clock.now();
    if (this.connecting === undefined && wait > 0) {
      return Promise.reject(
        new Error(
          `not connected to ${this.where}; next attempt in ${
            Math.ceil(wait / 1000)
          } s`,
        ),
      );
    }
    this.connecting ??= this.openConnection().then(
      (c) => {
        this.failures = 0;
        this.lastError = undefined;
        this.nextAttemptAt = 0;
        return c;
      },
      (e: unknown) => {
        this.failures++;
        const delay = backoffMs(this.failures - 1, 500, 30_000, Math.random());
        this.nextAttemptAt = this.clock.now() + delay;
        const text = errorText(e);
        const changed = text !== this.lastError;
        this.lastError = text;
        if (changed || this.failures % 10 === 0) {
          this.log.error(
            `ssh ${this.where}: cannot connect: ${text}; retrying with backoff (attempt ${this.failures})`,
          );
        }
        throw e;
      },
    ).finally(() => {
      this.connecting = undefined;
    });
    return this.connecting;
  }

  private openConnection(): Promise<Connection> {
    if (this.closed) return Promise.reject(new Error("SSH pool is closed"));
    const { host, port, user } = this.ssh;
    let entries: KnownHost[];
    try {
      entries = parseKnownHosts(
        readTextIfExists(this.ssh.knownHostsFile) ?? "",
      );
    } catch (e) {
      return Promise.reject(new Error(errorText(e)));
    }
    const algorithms = knownKeyAlgorithms(entries, host, port);
    let hostKeyFailure: string | undefined;
    const verify = (key: Buffer): boolean => {
      const verdict = checkHostKey(entries, host, port, key);
      if (verdict === "match") return true;
      if (
        verdict === "unknown" && this.ssh.strictHostKeyChecking === "accept-new"
      ) {
        this.rememberHostKey(key);
        return true;
      }
      hostKeyFailure = hostKeyMessage(verdict, this.ssh, key);
      return false;
    };
    return new Promise((resolve, reject) => {
      const client = new Client();
      const connection: Connection = { client, active: 0, closed: false };
      let settled = false;
      client.on("ready", () => {
        settled = true;
        client.setNoDelay(true); // Nagle + delayed ACK costs ~40 ms per exec.
        this.connections.push(connection);
        this.log.info(`ssh ${this.where}: connected`);
        resolve(connection);
      });
      client.on("error", (e: Error) => {
        if (settled) return;
        settled = true;
        reject(
          new Error(hostKeyFailure ?? describeSshError(e)),
        );
      });
      client.on("close", () => {
        connection.closed = true;
        const i = this.connections.indexOf(connection);
        if (i >= 0) this.connections.splice(i, 1);
        for (const wake of this.slotWaiters.splice(0)) wake();
        if (!settled) {
          settled = true;
          reject(
            new Error(
              hostKeyFailure ?? "connection closed during the handshake",
            ),
          );
        }
      });
      client.connect({
        host,
        port,
        username: user,
        privateKey: this.credentials.privateKey
          ? Buffer.from(this.credentials.privateKey)
          : undefined,
        passphrase: this.credentials.passphrase,
        agent: this.credentials.agent,
        hostVerifier: verify,
        readyTimeout: this.ssh.connectTimeoutMs,
        keepaliveInterval: 15_000,
        keepaliveCountMax: 3,
        algorithms: algorithms.length > 0
          ? {
            serverHostKey: algorithms as NonNullable<
              NonNullable<Parameters<Client["connect"]>[0]["algorithms"]>[
                "serverHostKey"
              ]
            >,
          }
          : undefined,
      });
    });
  }

  private rememberHostKey(key: Buffer): void {
    const line = `${knownHostsName(this.ssh.host, this.ssh.port)} ${
      keyTypeOfBlob(key)
    } ${key.toString("base64")}\n`;
    try {
      Deno.writeTextFileSync(this.ssh.knownHostsFile, line, {
        append: true,
        create: true,
        mode: 0o600,
      });
      this.log.warn(
        `ssh ${this.where}: new host key ${keyTypeOfBlob(key)} ${
          fingerprint(key)
        } added to ${this.ssh.knownHostsFile} (SSH_STRICT_HOST_KEY_CHECKING=accept-new)`,
      );
    } catch (e) {
      this.log.error(
        `ssh ${this.where}: accepted a new host key but cannot record it in ${this.ssh.knownHostsFile}: ${
          errorText(e)
        }`,
      );
    }
  }

  private exec(
    connection: Connection,
    command: string,
    io: RunIo,
  ): Promise<RunResult> {
    return new Promise((resolve) => {
      let channel: ClientChannel | undefined;
      let outcome: RunResult | undefined;
      let stopping: "timeout" | "aborted" | undefined;
      let killTimer: ReturnType<typeof setTimeout> | undefined;
      let timeoutTimer: ReturnType<typeof setTimeout> | undefined;

      const finish = (result: RunResult) => {
        clearTimeout(timeoutTimer);
        clearTimeout(killTimer);
        io.signal.removeEventListener("abort", onAbort);
        connection.client.removeListener("close", onDrop);
        resolve(result);
      };
      // TERM, then KILL and close; give up waiting for the server after that.
      const stop = (why: "timeout" | "aborted") => {
        if (stopping || channel === undefined) return;
        const ch = channel;
        stopping = why;
        sendSignal(ch, "TERM");
        killTimer = setTimeout(() => {
          sendSignal(ch, "KILL");
          ch.close();
          killTimer = setTimeout(() => {
            this.log.warn(
              `${this.where}: the stopped command did not end; it may still be running there`,
            );
            finish({ kind: why });
          }, 1000);
        }, 1000);
      };
      const onAbort = () => stop("aborted");
      const onDrop = () =>
        finish({
          kind: "ssh-error",
          error:
            `connection to ${this.where} dropped while the command was running`,
        });

      connection.client.once("close", onDrop);
      io.signal.addEventListener("abort", onAbort, { once: true });
      connection.client.exec(command, (err, ch) => {
        if (err) {
          return finish({
            kind: "ssh-error",
            error: `${this.where}: cannot start the command: ${err.message}`,
          });
        }
        channel = ch;
        ch.on("data", (chunk: Uint8Array) => io.onStdout(chunk));
        ch.stderr.on("data", (chunk: Uint8Array) => io.onStderr(chunk));
        ch.on(
          "exit",
          (code: number | null, signal?: string) => {
            outcome = code !== null && code !== undefined
              ? { kind: "exit", code }
              : { kind: "signal", signal: signal ?? "unknown" };
          },
        );
        ch.on("close", () => {
          if (stopping) return finish({ kind: stopping });
          finish(
            outcome ?? {
              kind: "ssh-error",
              error: `${this.where}: the channel closed without an exit status`,
            },
          );
        });
        ch.end(); // No stdin for the remote command.
        if (io.signal.aborted) stop("aborted");
        if (io.timeoutMs > 0) {
          timeoutTimer = setTimeout(() => stop("timeout"), io.timeoutMs);
        }
      });
    });
  }
}

/** The internals of ssh2 that `sendSignal` reaches for. */
interface ChannelInternals {
  outgoing?: { id?: number; state?: string };
  _client?: { _protocol?: { signal?(id: number, name: string): void } };
}

/**
 * ssh2's `signal()` is silently skipped once stdin has ended (which we do at
 * start, so commands never wait for input); send the request through its
 * protocol object then, as `signal()` itself would.
 */
function sendSignal(channel: ClientChannel, name: string): void {
  if (channel.writable) return channel.signal(name);
  const internals = channel as unknown as ChannelInternals;
  const id = internals.outgoing?.id;
  if (internals.outgoing?.state === "closed" || id === undefined) return;
  internals._client?._protocol?.signal?.(id, name);
}

function hostKeyMessage(
  verdict: HostKeyVerdict,
  ssh: SshConfig,
  key: Buffer,
): string {
  const shown = `${keyTypeOfBlob(key)} ${fingerprint(key)}`;
  const name = knownHostsName(ssh.host, ssh.port);
  if (verdict === "mismatch") {
    return `HOST KEY MISMATCH for ${name}: the server shows ${shown}, which differs from ${ssh.knownHostsFile}; someone may be intercepting the connection, or the host was reinstalled. Nothing will run until the entry is fixed (ssh-keygen -R '${name}' -f ${ssh.knownHostsFile})`;
  }
  if (verdict === "revoked") {
    return `host key ${shown} of ${name} is marked @revoked in ${ssh.knownHostsFile}; refusing to connect`;
  }
  return `host key of ${name} is unknown (${shown}, not in ${ssh.knownHostsFile}); add it after checking the fingerprint (ssh-keyscan -p ${ssh.port} ${ssh.host} >> ${ssh.knownHostsFile}) or set SSH_STRICT_HOST_KEY_CHECKING=accept-new`;
}

/** The fingerprint `ssh-keygen -l` prints: SHA256 of the key blob, unpadded base64. */
export function fingerprint(key: Uint8Array): string {
  return `SHA256:${
    createHash("sha256").update(key).digest("base64").replace(/=+$/, "")
  }`;
}

function describeSshError(
  e: Error & { level?: string; code?: string },
): string {
  if (e.code === "ECONNREFUSED") return "connection refused (is sshd running?)";
  if (e.code === "ETIMEDOUT" || /Timed out/i.test(e.message)) {
    return `timed out (${e.message})`;
  }
  if (e.level === "client-authentication") {
    return "authentication failed: the server refused the key (check SSH_USER, SSH_KEY_FILE and the server's authorized_keys)";
  }
  return e.message;
}

// ---------------------------------------------------------------------------
// Worker loop: reserve, run, then delete (or release, or dead-letter)
// ---------------------------------------------------------------------------

export type QueueApi = Pick<
  IronMqClient,
  | "ensureQueue"
  | "reserve"
  | "delete"
  | "deleteBatch"
  | "release"
  | "touch"
  | "post"
>;

export interface WorkerDeps {
  queue: QueueApi;
  runner: CommandRunner;
  log: Log;
  clock: Clock;
  random?: () => number;
  /** How often a running message's reservation is extended; default half of it. */
  touchIntervalMs?: number;
  /** Masks secrets in what goes to the dead-letter queue (stderr of a command). */
  redact?: (text: string) => string;
}

/** Splits a byte stream into lines for the log; a very long line is cut into pieces. */
export class LineSplitter {
  private readonly decoder = new TextDecoder();
  private partial = "";
  constructor(
    private readonly emit: (line: string) => void,
    private readonly maxLine = 16_384,
  ) {}

  push(chunk: Uint8Array): void {
    this.take(this.decoder.decode(chunk, { stream: true }));
  }

  end(): void {
    this.take(this.decoder.decode());
    if (this.partial !== "") this.emit(this.partial);
    this.partial = "";
  }

  private take(text: string): void {
    const lines = (this.partial + text).split("\n");
    this.partial = lines.pop() ?? "";
    for (const line of lines) this.emit(line.replace(/\r$/, ""));
    while (this.partial.length > this.maxLine) {
      this.emit(this.partial.slice(0, this.maxLine));
      this.partial = this.partial.slice(this.maxLine);
    }
  }
}

/** The last few KiB of a stream, kept for the dead-letter record. */
class Tail {
  private text = "";
  constructor(private readonly max = 2048) {}
  add(line: string): void {
    this.text = (this.text + line + "\n").slice(-this.max);
  }
  toString(): string {
    return this.text;
  }
}

/** Logs an outage as a warning, as an error once it lasts 30 s, then once a minute, then its end. */
class OutageLog {
  private since?: number;
  private lastLogged = 0;
  private tries = 0;
  constructor(
    private readonly what: string,
    private readonly log: Log,
    private readonly clock: Clock,
  ) {}

  failed(e: unknown): void {
    const now = this.clock.now();
    this.tries++;
    if (this.since === undefined) {
      this.since = now;
      this.lastLogged = now;
      this.log.warn(`${this.what}: ${errorText(e)}; retrying with backoff`);
    } else if (
      now - this.since >= 30_000 && now - this.lastLogged >= 60_000 ||
      now - this.since >= 30_000 && this.lastLogged === this.since
    ) {
      // Past 30 s it is no blip: an error, then once a minute.
      this.lastLogged = now;
      this.log.error(
        `${this.what}: still failing after ${
          Math.round((now - this.since) / 1000)
        } s and ${this.tries} tries: ${errorText(e)}`,
      );
    }
  }

  recovered(): void {
    if (this.since === undefined) return;
    this.log.info(
      `${this.what}: working again after ${
        Math.round((this.clock.now() - this.since) / 1000)
      } s and ${this.tries} failed tries`,
    );
    this.since = undefined;
    this.tries = 0;
  }
}

type DeleteOutcome = "deleted" | "expired" | "gone" | "failed";

/** Coalesces deletes: while one batch is in flight, the next ones gather (up to 100). */
class DeleteBatcher {
  private pending: { item: DeleteItem; done: (o: DeleteOutcome) => void }[] =
    [];
  private flushing?: Promise<void>;

  constructor(private readonly deps: WorkerDeps) {}

  delete(item: DeleteItem): Promise<DeleteOutcome> {
    return new Promise((done) => {
      this.pending.push({ item, done });
      this.flushing ??= this.flush().finally(() => {
        this.flushing = undefined;
      });
    });
  }

  async idle(): Promise<void> {
    while (this.flushing) await this.flushing;
  }

  private async flush(): Promise<void> {
    while (this.pending.length > 0) {
      const batch = this.pending.splice(0, 100);
      const outcomes = await this.deleteAll(batch.map((b) => b.item));
      batch.forEach((b, i) => b.done(outcomes[i]));
    }
  }

  private async deleteAll(items: DeleteItem[]): Promise<DeleteOutcome[]> {
    const result = await withRetries(
      () => this.deps.queue.deleteBatch(items),
      this.deps,
    );
    if (result.ok) return items.map(() => "deleted");
    // One bad reservation fails the whole batch: find out which, one by one.
    if (items.length > 1 && !result.retryable) {
      return await Promise.all(items.map((item) => this.deleteOne(item)));
    }
    return items.map(() => outcomeOf(result.error));
  }

  private async deleteOne(item: DeleteItem): Promise<DeleteOutcome> {
    const result = await withRetries(
      () => this.deps.queue.delete(item.id, item.reservation_id),
      this.deps,
    );
    return result.ok ? "deleted" : outcomeOf(result.error);
  }
}

function outcomeOf(e: unknown): DeleteOutcome {
  if (e instanceof QueueError && e.status === 403) return "expired";
  if (e instanceof QueueError && e.status === 404) return "gone";
  return "failed";
}

type Attempt<T> =
  | { ok: true; value: T }
  | { ok: false; error: unknown; retryable: boolean };

/** Retries a queue call that may fail for a moment (5xx, 408, 429, network): 6 tries, about 10 s. */
async function withRetries<T>(
  call: () => Promise<T>,
  deps: WorkerDeps,
  tries = 6,
): Promise<Attempt<T>> {
  let last: unknown;
  for (let attempt = 0; attempt < tries; attempt++) {
    try {
      return { ok: true, value: await call() };
    } catch (e) {
      last = e;
      if (!(e instanceof QueueError) || !e.retryable) {
        return { ok: false, error: e, retryable: !(e instanceof QueueError) };
      }
      if (attempt + 1 < tries) {
        const random = deps.random ?? Math.random;
        await deps.clock.sleep(backoffMs(attempt, 200, 5_000, random()));
      }
    }
  }
  return { ok: false, error: last, retryable: true };
}

/** A reserved message and its current reservation id (touch replaces it). */
interface Held {
  message: QueueMessage;
  reservationId: string;
  /** Which run this is, counting this one. */
  attempt: number;
  /** The command with the message's arguments, quoted. */
  command: string;
  /** Touches the reservation while the message waits and runs. */
  keeper: { stop(): void };
}

/** What went wrong on the last run, for the log and the dead-letter record. */
interface Failure {
  reason: string;
  exitStatus?: number | string;
  stderrTail?: string;
}

export class Worker {
  /** Reserved, kept by touching, not started yet: the next commands to run. */
  private readonly backlog: Held[] = [];
  /** Commands running now: how to stop each, and when it ends. */
  private readonly running = new Map<
    Held,
    { controller: AbortController; ended: Promise<void> }
  >();
  /** Deletes, releases and dead-letter moves still under way. */
  private readonly settling = new Set<Promise<void>>();
  private readonly hardStop = new AbortController();
  /**
   * Reservations and touches of a message that were no failed run (a touch, an
   * SSH failure, a stop): IronMQ's reserved_count counts them all.
   */
  private readonly notRuns = new Map<string, number>();
  private readonly deletes: DeleteBatcher;
  private readonly reserveOutage: OutageLog;
  private roomMade?: () => void;

  constructor(
    private readonly task: TaskConfig,
    private readonly deps: WorkerDeps,
    private readonly host: string,
    private readonly queueName: string,
  ) {
    this.deletes = new DeleteBatcher(deps);
    this.reserveOutage = new OutageLog(
      `reserve from ${queueName}`,
      deps.log,
      deps.clock,
    );
  }

  /**
   * Runs until `stop` aborts, then shuts down gracefully. It keeps up to
   * `concurrency` commands running and as many reserved messages waiting, so
   * a slot that frees up starts the next command without a round trip.
   */
  async run(stop: AbortSignal): Promise<void> {
    await this.ensureQueue(stop);
    const limit = 2 * this.task.concurrency;
    let lastPoll: Promise<void> = Promise.resolve();
    while (!stop.aborted) {
      await this.waitForRoom(limit, stop);
      try {
        await this.deps.runner.ready(stop);
      } catch {
        break; // stopped while SSH was unreachable
      }
      const room = limit - this.backlog.length - this.running.size;
      lastPoll = this.reserve(Math.min(100, room), stop).then((messages) => {
        for (const message of messages) this.accept(message, stop);
        this.startWaiting();
      });
      // On stop, the grace period starts now, while the poll finishes.
      await settledOrAborted(lastPoll, stop);
    }
    await this.shutdown(lastPoll);
  }

  /** Aborts every running command now (a second SIGTERM). */
  abortRunning(): void {
    this.hardStop.abort();
    this.stopCommands();
  }

  private stopCommands(): void {
    for (const { controller } of this.running.values()) controller.abort();
  }

  private async ensureQueue(stop: AbortSignal): Promise<void> {
    try {
      if (await this.deps.queue.ensureQueue(stop)) {
        this.deps.log.info(
          `queue ${this.queueName} did not exist: created it (check IRON_MQ_QUEUE_NAME if you expected messages)`,
        );
      }
    } catch (e) {
      if (!stop.aborted) {
        this.deps.log.warn(`queue ${this.queueName}: ${errorText(e)}`);
      }
    }
  }

  private waitForRoom(limit: number, stop: AbortSignal): Promise<void> {
    if (this.backlog.length + this.running.size < limit || stop.aborted) {
      return Promise.resolve();
    }
    return new Promise((resolve) => {
      const done = () => {
        stop.removeEventListener("abort", done);
        this.roomMade = undefined;
        resolve();
      };
      this.roomMade = done;
      stop.addEventListener("abort", done, { once: true });
    });
  }

  private async reserve(
    n: number,
    stop: AbortSignal,
  ): Promise<QueueMessage[]> {
    const { clock, queue } = this.deps;
    const random = this.deps.random ?? Math.random;
    const wait = this.task.pollWaitSeconds;
    for (let attempt = 0; !stop.aborted; attempt++) {
      const started = clock.now();
      try {
        // Not aborted by `stop`: a poll cut off mid-flight can leave its messages
        // reserved by nobody until they time out. What it returns is released.
        const messages = await queue.reserve(
          n,
          this.task.reservationTimeoutSeconds,
          wait,
          this.hardStop.signal,
        );
        this.reserveOutage.recovered();
        // An empty answer sooner than the long-poll allows (wait 0, or a server
        // that ignores it) must not make this loop spin.
        if (messages.length === 0 && clock.now() - started < wait * 500 + 50) {
          await clock.sleep(1000, stop);
        }
        return messages;
      } catch (e) {
        if (stop.aborted) break;
        if (e instanceof QueueError && e.status === 404) {
          await this.ensureQueue(stop);
        }
        this.reserveOutage.failed(e);
        await clock.sleep(backoffMs(attempt, 250, 30_000, random()), stop);
      }
    }
    return [];
  }

  /** Takes a reserved message in: to the backlog, or straight to its end. */
  private accept(message: QueueMessage, stop: AbortSignal): void {
    const held: Held = {
      message,
      reservationId: message.reservation_id,
      attempt: this.attemptOf(message),
      command: "",
      keeper: { stop: () => {} },
    };
    const plan = planCommand(this.task.command, message.body);
    if (!plan.ok) {
      this.deps.log.error(
        `message ${message.id}: will not run anything: ${plan.reason}`,
      );
      return this.settle(held, this.deadLetter(held, { reason: plan.reason }));
    }
    if (stop.aborted) {
      this.countNotRun(held);
      return this.settle(
        held,
        this.release(held, 0, "shutting down before it started"),
      );
    }
    held.command = plan.command;
    held.keeper = this.keepReserved(held);
    this.backlog.push(held);
  }

  /** Starts waiting commands while there are free slots. */
  private startWaiting(): void {
    while (
      this.running.size < this.task.concurrency && this.backlog.length > 0
    ) {
      const held = this.backlog.shift()!;
      const controller = new AbortController();
      const ended = this.execute(held, controller.signal).then(
        (run) => this.settle(held, run.afterwards),
        (e) =>
          this.deps.log.error(
            `message ${held.message.id}: unexpected error: ${errorText(e)}`,
          ),
      ).finally(() => {
        this.running.delete(held);
        this.startWaiting();
        this.roomMade?.();
      });
      this.running.set(held, { controller, ended });
    }
  }

  /** Tracks what is done after a run (delete, release, dead letter) for shutdown. */
  private settle(held: Held, work: Promise<void>): void {
    const tracked = work.catch((e) =>
      this.deps.log.error(
        `message ${held.message.id}: unexpected error: ${errorText(e)}`,
      )
    ).finally(() => this.settling.delete(tracked));
    this.settling.add(tracked);
  }

  /**
   * Runs the command; its slot is free again as soon as this resolves, while
   * what follows (delete, release, dead letter) goes on as `afterwards`.
   */
  private async execute(
    held: Held,
    signal: AbortSignal,
  ): Promise<{ afterwards: Promise<void> }> {
    const { log, clock } = this.deps;
    const id = held.message.id;
    const prefix = `[${this.host}]`;
    log.info(`${prefix} run: ${held.command}`);
    log.debug(`message ${id}: attempt ${held.attempt}`);
    const stderrTail = new Tail();
    const out = new LineSplitter((line) => log.info(`${prefix} out: ${line}`));
    const err = new LineSplitter((line) => {
      stderrTail.add(line);
      log.info(`${prefix} err: ${line}`);
    });
    const started = clock.now();
    let result: RunResult;
    try {
      result = await this.deps.runner.run(held.command, {
        onStdout: (chunk) => out.push(chunk),
        onStderr: (chunk) => err.push(chunk),
        timeoutMs: this.task.timeoutMs,
        signal,
      });
    } finally {
      held.keeper.stop();
    }
    out.end();
    err.end();
    const took = `${clock.now() - started} ms`;
    const failure = (reason: string, exitStatus: number | string) => ({
      afterwards: this.failed(held, {
        reason,
        exitStatus,
        stderrTail: stderrTail.toString(),
      }),
    });

    switch (result.kind) {
      case "exit":
        if (result.code === 0) {
          log.info(`${prefix} exit: 0 (message ${id}, ${took})`);
          return { afterwards: this.deleteDone(held) };
        }
        log.warn(`${prefix} exit: ${result.code} (message ${id}, ${took})`);
        return failure(`exit status ${result.code}`, result.code);
      case "signal":
        log.warn(
          `${prefix} killed by signal ${result.signal} (message ${id}, ${took})`,
        );
        return failure(`killed by signal ${result.signal}`, result.signal);
      case "timeout": {
        const limit = `${this.task.timeoutMs / 1000} s`;
        log.warn(`${prefix} timed out after ${limit}: stopped (message ${id})`);
        return failure(`timed out after ${limit} (TASK_TIMEOUT)`, "timeout");
      }
      case "aborted":
        log.warn(`${prefix} stopped by shutdown (message ${id}, ${took})`);
        this.countNotRun(held);
        return { afterwards: this.release(held, 0, "stopped by shutdown") };
      case "ssh-error":
        log.error(`${prefix} ssh error: ${result.error} (message ${id})`);
        this.countNotRun(held);
        return {
          afterwards: this.release(
            held,
            retryDelaySeconds(1, this.task.retryDelaySeconds),
            "SSH failed",
          ),
        };
    }
  }

  /**
   * Which run a newly reserved message is on: reserved_count less what this
   * process knows were no runs (an earlier process's are forgotten, so this
   * errs on the high side).
   */
  private attemptOf(message: QueueMessage): number {
    return Math.max(
      1,
      message.reserved_count - (this.notRuns.get(message.id) ?? 0),
    );
  }

  private countNotRun(held: Held): void {
    const id = held.message.id;
    this.notRuns.set(id, (this.notRuns.get(id) ?? 0) + 1);
  }

  /** Touches the message at half its reservation so a long command keeps it. */
  private keepReserved(held: Held): { stop(): void } {
    const timeout = this.task.reservationTimeoutSeconds;
    const timer = setInterval(async () => {
      const result = await withRetries(
        () =>
          this.deps.queue.touch(held.message.id, held.reservationId, timeout),
        this.deps,
        3,
      );
      if (result.ok) {
        held.reservationId = result.value;
        this.countNotRun(held);
        this.deps.log.debug(`message ${held.message.id}: reservation extended`);
      } else {
        this.deps.log.warn(
          `message ${held.message.id}: could not extend its reservation (${
            errorText(result.error)
          }); another worker may run it too`,
        );
      }
    }, this.deps.touchIntervalMs ?? timeout * 500);
    return { stop: () => clearInterval(timer) };
  }

  private async deleteDone(held: Held): Promise<void> {
    const id = held.message.id;
    this.notRuns.delete(id);
    const outcome = await this.deletes.delete({
      id,
      reservation_id: held.reservationId,
    });
    if (outcome === "deleted") return;
    if (outcome === "gone") {
      // Most often our own earlier try landed and only its reply was lost.
      this.deps.log.info(
        `message ${id}: already gone from the queue when deleted`,
      );
      return;
    }
    const why = outcome === "expired"
      ? "its reservation had expired, so another worker may have it: it MAY RUN TWICE (not rerun here)"
      : "the queue kept failing; it will reappear when its reservation times out and MAY RUN TWICE";
    this.deps.log.warn(
      `message ${id}: the command succeeded but the delete did not: ${why}`,
    );
  }

  private async failed(held: Held, failure: Failure): Promise<void> {
    const attempts = held.attempt;
    if (attempts >= this.task.maxAttempts) {
      return await this.deadLetter(held, failure);
    }
    const delay = retryDelaySeconds(attempts, this.task.retryDelaySeconds);
    await this.release(
      held,
      delay,
      `${failure.reason}, attempt ${attempts} of ${this.task.maxAttempts}`,
    );
  }

  private async release(
    held: Held,
    delaySeconds: number,
    why: string,
  ): Promise<void> {
    const id = held.message.id;
    const result = await withRetries(
      () => this.deps.queue.release(id, held.reservationId, delaySeconds),
      this.deps,
    );
    if (result.ok) {
      this.deps.log.info(
        `message ${id}: released for a retry in ${delaySeconds} s (${why})`,
      );
    } else {
      this.deps.log.warn(
        `message ${id}: release failed (${
          errorText(result.error)
        }); it returns to the queue when its reservation times out (${why})`,
      );
    }
  }

  /** Records the message in the dead-letter queue, then deletes it; if recording fails, releases it. */
  private async deadLetter(held: Held, failure: Failure): Promise<void> {
    const { message } = held;
    const record = {
      queue: this.queueName,
      id: message.id,
      body: message.body,
      attempts: held.attempt,
      reason: failure.reason,
      exit_status: failure.exitStatus,
      stderr_tail: failure.stderrTail === undefined
        ? undefined
        : (this.deps.redact ?? String)(failure.stderrTail),
      failed_at: new Date(this.deps.clock.now()).toISOString(),
    };
    const posted = await withRetries(
      () =>
        this.deps.queue.post(this.task.deadLetterQueue, [
          JSON.stringify(record),
        ]),
      this.deps,
    );
    if (!posted.ok) {
      this.deps.log.error(
        `message ${message.id}: cannot record it in ${this.task.deadLetterQueue} (${
          errorText(posted.error)
        }); keeping it in ${this.queueName}`,
      );
      return await this.release(
        held,
        this.task.retryDelaySeconds,
        "dead-letter queue unavailable",
      );
    }
    this.deps.log.error(
      `message ${message.id}: moved to ${this.task.deadLetterQueue} after ${held.attempt} attempt(s): ${failure.reason}`,
    );
    await this.deleteDone(held);
  }

  /** Ends the backlog, the running commands and `lastPoll`, then what they left to do. */
  private async shutdown(lastPoll: Promise<void>): Promise<void> {
    const { log, clock } = this.deps;
    for (const held of this.backlog.splice(0)) {
      held.keeper.stop();
      this.countNotRun(held);
      this.settle(
        held,
        this.release(held, 0, "shutting down before it started"),
      );
    }
    const ended = () => [...this.running.values()].map((r) => r.ended);
    if (this.running.size > 0) {
      log.info(
        `stopping: waiting up to ${
          this.task.shutdownGraceMs / 1000
        } s for ${this.running.size} running command(s)`,
      );
      const graceOver = new AbortController();
      await Promise.race([
        Promise.allSettled(ended()),
        clock.sleep(this.task.shutdownGraceMs, graceOver.signal),
      ]);
      graceOver.abort();
      if (this.running.size > 0) {
        log.warn(
          `stopping: ${this.running.size} command(s) still running after the grace period: stopping them and releasing their messages`,
        );
        this.stopCommands();
        await Promise.allSettled(ended());
      }
    }
    await lastPoll;
    while (this.settling.size > 0) await Promise.allSettled([...this.settling]);
    await this.deletes.idle();
  }
}

// ---------------------------------------------------------------------------
// Entry point
// ---------------------------------------------------------------------------

/** The curl line that posts a test message; a token is shown as $MQ_TOKEN, never its value. */
export function curlExample(queue: QueueConfig): string {
  const url =
    `${queue.baseUrl}/3/projects/${queue.projectId}/queues/${queue.queueName}/messages`;
  const auth = queue.token === undefined
    ? ""
    : ` -H "Authorization: OAuth $MQ_TOKEN"`;
  return `curl -sS -X POST -H 'Content-Type: application/json'${auth} -d '{"messages":[{"body":"hello world!"}]}' ${url}`;
}

/** HOME and the user name from the environment, else from the system (chpst sets neither). */
function configContext(env: Env): ConfigContext {
  let account: { username: string; homedir: string } | undefined;
  const system = () => (account ??= userInfo());
  let home: string;
  let user: string;
  try {
    home = env.HOME ?? system().homedir;
    user = env.USER ?? env.LOGNAME ?? system().username;
  } catch (e) {
    throw new ConfigError([
      `HOME/USER: not set and the system's account cannot be read (${
        errorText(e)
      }): set HOME and USER (or SSH_USER)`,
    ]);
  }
  return {
    home,
    user,
    ironJsonFiles: readIronJsonFiles(Deno.cwd(), home),
    exists: (path) => {
      try {
        return Deno.statSync(path).isFile;
      } catch {
        return false;
      }
    },
    readKey: (path) => Deno.readFileSync(path),
    isSocket: (path) => {
      try {
        return Deno.statSync(path).isSocket === true;
      } catch {
        return false;
      }
    },
  };
}

/**
 * Deno flags granting the worker only what this configuration needs: the queue
 * and SSH addresses, the key, known_hosts, iron.json and the embedded database.
 */
export function permissionFlags(
  config: Config,
  configPaths: string[],
  needsUserInfo: boolean,
): string[] {
  const net = new Set<string>();
  const read = new Set<string>(configPaths);
  const write = new Set<string>();
  if (config.embedded) {
    const host = bracketIPv6(config.embedded.hostname ?? "127.0.0.1");
    const port = config.embedded.port ?? 8080;
    net.add(port === 0 ? host : `${host}:${port}`);
    const db = config.embedded.dbPath ?? "ironmq.sqlite";
    if (db !== ":memory:") {
      for (const suffix of ["", "-wal", "-shm", "-journal"]) {
        read.add(db + suffix);
        write.add(db + suffix);
      }
    }
  } else {
    const url = new URL(config.queue.baseUrl);
    net.add(
      `${url.hostname}:${url.port || (url.protocol === "https:" ? 443 : 80)}`,
    );
  }
  net.add(`${bracketIPv6(config.ssh.host)}:${config.ssh.port}`);
  read.add(config.ssh.knownHostsFile);
  if (config.ssh.strictHostKeyChecking === "accept-new") {
    write.add(config.ssh.knownHostsFile);
  }
  if (config.ssh.keyFile !== undefined) read.add(config.ssh.keyFile);
  if (config.ssh.agentSocket !== undefined) {
    net.add(`unix:${config.ssh.agentSocket}`);
    read.add(config.ssh.agentSocket);
    write.add(config.ssh.agentSocket);
  }
  const unusable = [...net, ...read, ...write].filter((p) => /[\s,]/.test(p));
  if (unusable.length > 0) {
    throw new ConfigError(
      unusable.map((p) =>
        `${
          JSON.stringify(p)
        }: a path or host with a space or comma cannot be granted to Deno; move or rename it`
      ),
    );
  }
  const flags = [
    "--allow-env",
    `--allow-net=${[...net].join(",")}`,
    `--allow-read=${[...read].join(",")}`,
  ];
  if (write.size > 0) flags.push(`--allow-write=${[...write].join(",")}`);
  if (needsUserInfo) flags.push("--allow-sys=uid,gid,userInfo");
  return flags;
}

/** Starts everything from the environment; resolves to the exit code. */
export async function main(
  env: Env = Deno.env.toObject(),
  sink: LineSink = stdoutSink(),
): Promise<number> {
  let config: Config;
  let credentials: SshCredentials;
  try {
    config = parseConfig(env, configContext(env));
    credentials = loadSshCredentials(config.ssh);
  } catch (e) {
    sink(`FATAL ${errorText(e).replaceAll("\n", "\n  ")}`);
    return 2;
  }
  const secrets = [config.queue.token, config.ssh.passphrase].filter(
    (s): s is string => s !== undefined,
  );
  const log = await setupLogging(sink, config.logLevel, secrets);

  let server: QueueServer | undefined;
  if (config.embedded) {
    try {
      server = await startQueueServer(config.embedded);
    } catch (e) {
      log.error(
        `cannot start the embedded queue server: ${
          errorText(e)
        } (MQ_PORT sets its port; or set IRON_HOST/IRON_TOKEN to use another IronMQ server)`,
      );
      return 1;
    }
    config.queue.baseUrl = server.url;
    log.info(`embedded IronMQ server listening on ${server.url}`);
    log.info(`post a test message: ${curlExample(config.queue)}`);
  }

  const stop = new AbortController();
  const queue = new IronMqClient(config.queue);
  const runner = new SshPool(
    config.ssh,
    credentials,
    config.task.concurrency,
    log,
  );
  const worker = new Worker(
    config.task,
    {
      queue,
      runner,
      log,
      clock: realClock,
      redact: (text) => maskSecrets(text, secrets),
    },
    config.ssh.host,
    config.queue.queueName,
  );
  let firstSignalAt = 0;
  const onSignal = () => {
    // Ctrl-C reaches the worker twice at once (from the terminal, and from
    // `deno task` passing it on): only a later one means "stop now".
    if (stop.signal.aborted && Date.now() - firstSignalAt < 1000) return;
    if (stop.signal.aborted) {
      log.warn("second stop signal: stopping running commands now");
      worker.abortRunning();
      return;
    }
    log.info("stop signal received: no new messages will be reserved");
    firstSignalAt = Date.now();
    stop.abort();
  };
  Deno.addSignalListener("SIGTERM", onSignal);
  Deno.addSignalListener("SIGINT", onSignal);

  log.info(
    `worker: queue ${config.queue.queueName} at ${config.queue.baseUrl}, ssh ${config.ssh.user}@${config.ssh.host}:${config.ssh.port}, command: ${config.task.command}, concurrency ${config.task.concurrency}`,
  );
  try {
    await worker.run(stop.signal);
  } finally {
    Deno.removeSignalListener("SIGTERM", onSignal);
    Deno.removeSignalListener("SIGINT", onSignal);
    runner.close();
    await server?.close();
  }
  log.info("stopped");
  return 0;
}

/** `tasks.ts --permissions`: print the flags for `deno run` (see ./start). */
function printPermissions(env: Env): number {
  try {
    const context = configContext(env);
    const config = parseConfig(env, context);
    const flags = permissionFlags(
      config,
      ironJsonPaths(Deno.cwd(), context.home),
      env.USER === undefined && env.LOGNAME === undefined ||
        env.HOME === undefined,
    );
    console.log(flags.join(" "));
    return 0;
  } catch (e) {
    console.error(`FATAL ${errorText(e).replaceAll("\n", "\n  ")}`);
    return 2;
  }
}

if (import.meta.main) {
  Deno.exit(
    Deno.args.includes("--permissions")
      ? printPermissions(Deno.env.toObject())
      : await main(),
  );
}

// ---------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------

/** Resolves when `work` settles or `signal` aborts, leaving no listener behind. */
function settledOrAborted(
  work: Promise<unknown>,
  signal: AbortSignal,
): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      signal.removeEventListener("abort", done);
      resolve();
    };
    if (signal.aborted) return resolve();
    signal.addEventListener("abort", done, { once: true });
    work.then(done, done);
  });
}
