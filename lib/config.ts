/**
 * lib/config.ts: the configuration: the environment (and iron.json, the
 * catalog file, the SSH key) in, a validated Config out, or a ConfigError
 * naming every problem and where it came from; and the Deno permission flags
 * ./start grants for it.
 *
 * A pure function of its inputs (the files come in through ConfigContext);
 * it never connects to anything, and never shows a secret in an error.
 */

import { Buffer } from "node:buffer";
import { userInfo } from "node:os";
// @ts-types="@types/ssh2"
import { utils as sshUtils } from "ssh2";
import {
  type QueueServerOptions,
  queueServerOptionsFromEnv,
} from "./mq/server.ts";
import {
  bracketIPv6,
  type Env,
  envValue,
  errorText,
  isLoopback,
  isRecord,
} from "./util.ts";
import { type Catalog, type CatalogDefaults, parseCatalog } from "./catalog.ts";
import { hookSecrets } from "./hook_spec.ts";
import {
  type HostDefaults,
  hostKey,
  type HostSpec,
  parseHostList,
  parseJump,
} from "./hosts.ts";
import { type LogFormat, type LogLevelName } from "./log.ts";
import { QUEUE_NAME } from "./message.ts";
import { ConfigError } from "./util.ts";

/** Every host the worker may run commands on: SSH_HOST's, and its tasks'. */
export function servedHosts(task: TaskConfig): HostSpec[] {
  const all = new Map<string, HostSpec>();
  const tasks = [...task.catalog?.tasks.values() ?? []];
  // SSH_HOST's serve TASK_COMMAND, and the catalog's tasks without hosts:.
  const usesDefault = task.catalog === undefined ||
    tasks.some((t) => t.hosts === undefined);
  for (
    const host of [
      ...usesDefault ? task.hosts : [],
      ...tasks.flatMap((t) => t.hosts ?? []),
    ]
  ) {
    if (!all.has(hostKey(host))) all.set(hostKey(host), host);
  }
  return [...all.values()];
}

type HostKeyPolicy = "yes" | "accept-new";

export interface QueueConfig {
  /** scheme://host:port of the IronMQ API, no trailing slash. */
  baseUrl: string;
  projectId: string;
  token?: string;
  queueName: string;
}

export interface SshConfig {
  /** SSH_PORT and SSH_USER: for hosts written without them. */
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
  /** A connection unused this long is closed (SSH_IDLE_TIMEOUT). */
  idleTimeoutMs: number;
  /** The key file's bytes, once the configuration has read and checked them. */
  privateKey?: Uint8Array;
}

export interface TaskConfig {
  command: string;
  /** Where TASK_COMMAND, the default task and tasks without hosts: run (SSH_HOST). */
  hosts: HostSpec[];
  concurrency: number;
  /** How many of a message's hosts run at once (TASK_HOST_PARALLELISM). */
  hostParallelism: number;
  /** 0 means no limit. */
  timeoutMs: number;
  maxAttempts: number;
  retryDelaySeconds: number;
  deadLetterQueue: string;
  reservationTimeoutSeconds: number;
  pollWaitSeconds: number;
  shutdownGraceMs: number;
  /** Named tasks (TASKS_FILE); without one, every message runs `command`. */
  catalog?: Catalog;
  /** Where each message's result goes when it names no reply_to queue. */
  resultsQueue?: string;
  /** How long a revocation (a cancel) holds, in seconds (TASK_REVOKE_TTL). */
  revokeTtlSeconds: number;
}

export interface Config {
  queue: QueueConfig;
  /** Set when no IronMQ is configured: the worker starts its own server. */
  embedded?: QueueServerOptions;
  ssh: SshConfig;
  task: TaskConfig;
  logLevel: LogLevelName;
  /** LOG_FORMAT: Fabric-style text lines for svlogd, or JSON objects. */
  logFormat: LogFormat;
  /** Parameters a catalog declares and never uses, to say at start. */
  warnings: string[];
  /** TASK_HTTP_PORT: the monitor's listener (lib/monitor.ts); off when unset. */
  http?: { hostname: string; port: number; token?: string };
  /** Each hook's secret (hook name to value), when this worker's listener receives them. */
  hookSecrets?: Map<string, string>;
  /** TASK_RUNS_*: the run history (lib/runs.ts); off with TASK_RUNS_DB=off. */
  runs?: RunsSettings;
}

export interface RunsSettings {
  /** The database file (relative: to where the worker starts), or ":memory:". */
  path: string;
  keepDays: number;
  max: number;
}

/** An iron.json file found on disk, as read (path for error messages). */
interface IronJsonFile {
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
  /** The task catalog: TASKS_FILE, else tasks.yaml where the worker starts (text undefined: no such file). */
  catalogFile?: { path: string; text?: string; named: boolean };
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

/** The queue settings (IronMQ, or the embedded server), every problem into `read`. */
function queueSettings(
  read: EnvReader,
  env: Env,
  context: ConfigContext,
): { queue: QueueConfig; embedded?: QueueServerOptions } {
  const problems = read.problems;
  const files = context.ironJsonFiles.map((file) => ({
    path: file.path,
    settings: ironJsonSettings(file, problems),
  }));
  const iron = (key: IronKey) => ironSetting(env, files, key);
  const shown = (s: Sourced) => `${s.from}=${JSON.stringify(s.value)}`;

  const queueName = read.text("IRON_MQ_QUEUE_NAME", "my_queue");
  if (!QUEUE_NAME.test(queueName)) {
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
  return { queue, embedded: embeddedOptions };
}

/** Pure: environment plus context in, validated configuration (or ConfigError) out. */
export function parseConfig(env: Env, context: ConfigContext): Config {
  const read = new EnvReader(env);
  const problems = read.problems;
  const { queue, embedded: embeddedOptions } = queueSettings(
    read,
    env,
    context,
  );
  const queueName = queue.queueName;

  const keyFile = read.optional("SSH_KEY_FILE");
  const agentSocket = keyFile === undefined
    ? read.optional("SSH_AUTH_SOCK")
    : undefined;
  // Looked for only when needed: under ./start, Deno may read nothing else.
  const defaultKey = keyFile === undefined && agentSocket === undefined
    ? DEFAULT_KEY_FILES
      .map((name) => `${context.home}/.ssh/${name}`)
      .find(context.exists)
    : undefined;
  const { hosts, defaults: hostDefaults } = hostSettings(read, context);
  const ssh: SshConfig = {
    port: hostDefaults.port,
    user: hostDefaults.user,
    keyFile: keyFile ?? defaultKey,
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
    idleTimeoutMs: read.seconds("SSH_IDLE_TIMEOUT", 300, 1, 86400) * 1000,
  };
  if (ssh.keyFile !== undefined && context.readKey !== undefined) {
    let problem: string | undefined;
    try {
      const bytes = context.readKey(ssh.keyFile);
      problem = keyProblem(bytes, ssh.passphrase);
      if (problem === undefined) ssh.privateKey = bytes; // read and parsed once
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
    hosts,
    concurrency: read.integer("TASK_CONCURRENCY", 8, 1, 256),
    hostParallelism: read.integer("TASK_HOST_PARALLELISM", 32, 1, 1024),
    timeoutMs: read.seconds("TASK_TIMEOUT", 0, 0, 86400) * 1000,
    maxAttempts: read.integer("TASK_MAX_ATTEMPTS", 5, 1, 1000),
    retryDelaySeconds: read.integer("TASK_RETRY_DELAY", 10, 0, 900),
    deadLetterQueue: read.text("TASK_DEAD_LETTER_QUEUE", `${queueName}_failed`),
    reservationTimeoutSeconds,
    pollWaitSeconds: read.integer("TASK_POLL_WAIT", 5, 0, 30),
    // Grace + 2 s of TERM/KILL stays under runit's 7 s `sv` timeout.
    shutdownGraceMs: read.seconds("TASK_SHUTDOWN_GRACE", 4, 0, 3600) * 1000,
    revokeTtlSeconds: revokeTtl(read),
  };
  if (task.command.trim() === "") {
    problems.push("TASK_COMMAND: must not be blank");
  }
  const resultsQueue = read.optional("TASK_RESULTS_QUEUE");
  if (resultsQueue !== undefined) {
    if (!QUEUE_NAME.test(resultsQueue)) {
      problems.push(
        `TASK_RESULTS_QUEUE=${
          JSON.stringify(resultsQueue)
        }: use 1 to 64 letters, digits, '_', '-' or '.'`,
      );
    }
    task.resultsQueue = resultsQueue;
  }
  const http = httpSettings(read);
  const runs = runsSettings(read);
  const warnings: string[] = [];
  const loaded = loadCatalog(
    context.catalogFile,
    { ...task, host: hostDefaults },
    problems,
  );
  task.catalog = loaded?.catalog;
  warnings.push(...loaded?.warnings ?? []);
  // Hooks come in on the listener: without one this worker only runs their
  // tasks (another worker may receive them), and needs none of their secrets.
  const hooks = task.catalog?.hooks ?? new Map();
  let hookSecretValues: Map<string, string> | undefined;
  if (hooks.size > 0 && http === undefined) {
    warnings.push(
      `${task.catalog!.path}: hooks (${
        [...hooks.keys()].join(", ")
      }) are not received by this worker: set TASK_HTTP_PORT to receive them (it still runs their tasks)`,
    );
  } else if (hooks.size > 0) {
    const found = hookSecrets(task.catalog!.path, hooks, env);
    problems.push(...found.problems);
    hookSecretValues = found.secrets;
  }
  if (task.deadLetterQueue === queueName) {
    problems.push(
      "TASK_DEAD_LETTER_QUEUE: must differ from IRON_MQ_QUEUE_NAME",
    );
  }
  const logFormat = read.choice<LogFormat>("LOG_FORMAT", "text", [
    "text",
    "json",
  ]);
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
    logFormat,
    warnings,
    http,
    hookSecrets: hookSecretValues,
    runs,
  };
}

/**
 * TASK_REVOKE_TTL: a revocation holds a day by default, so a delayed run is
 * still cancelled when it comes up; at most IronMQ's 7-day delay.
 */
function revokeTtl(read: EnvReader): number {
  return read.seconds("TASK_REVOKE_TTL", 86_400, 1, 604_800);
}

/** TASK_RUNS_DB (runs.sqlite where the worker starts; off: none), _KEEP_DAYS, _MAX. */
function runsSettings(read: EnvReader): RunsSettings | undefined {
  const path = read.text("TASK_RUNS_DB", "runs.sqlite");
  const keepDays = read.integer("TASK_RUNS_KEEP_DAYS", 30, 1, 36_500);
  const max = read.integer("TASK_RUNS_MAX", 100_000, 1, 100_000_000);
  if (path === "off") return undefined;
  if (path.endsWith("/")) {
    read.problems.push(
      `TASK_RUNS_DB=${
        JSON.stringify(path)
      }: name a file (such as ${path}runs.sqlite), or off`,
    );
  }
  return { path, keepDays, max };
}

/** TASK_HTTP_*: the monitor's listener, off unless TASK_HTTP_PORT is set. */
function httpSettings(read: EnvReader): Config["http"] {
  if (read.optional("TASK_HTTP_PORT") === undefined) return undefined;
  const port = read.integer("TASK_HTTP_PORT", 0, 0, 65535);
  const hostname = read.text("TASK_HTTP_HOST", "127.0.0.1");
  const token = read.optional("TASK_HTTP_TOKEN");
  if (!/^(?:[A-Za-z0-9.-]+|[0-9A-Fa-f:.]+)$/.test(hostname)) {
    read.problems.push(
      `TASK_HTTP_HOST=${
        JSON.stringify(hostname)
      }: must be a host name or IP address such as 127.0.0.1`,
    );
  } else if (token === undefined && !isLoopback(hostname)) {
    read.problems.push(
      `TASK_HTTP_HOST=${hostname}: a non-loopback address needs TASK_HTTP_TOKEN (a long random string, e.g. openssl rand -hex 32), or listen on 127.0.0.1`,
    );
  }
  if (token !== undefined && !/^[\x21-\x7e]{16,}$/.test(token)) {
    read.problems.push(
      "TASK_HTTP_TOKEN: must be at least 16 printable ASCII characters without spaces (value not shown)",
    );
  }
  return { hostname, port, token };
}

/**
 * What `deno task send` needs: the worker's queue (a running worker's embedded
 * server at MQ_HOST:MQ_PORT, when no IronMQ is set) and its catalog, if any.
 */
export function senderConfig(
  env: Env,
): {
  queue: QueueConfig;
  catalog?: Catalog;
  hosts: HostSpec[];
  deadLetterQueue: string;
  /** Who sends: the user name (SSH_USER's default), for the messages' `sender`. */
  user: string;
  /** TASK_REVOKE_TTL: how long a cancel holds, in seconds. */
  revokeTtlSeconds: number;
} {
  const context = configContext(env);
  const read = new EnvReader(env);
  const { queue, embedded } = queueSettings(read, env, context);
  if (embedded) {
    queue.baseUrl = `http://${bracketIPv6(embedded.hostname ?? "127.0.0.1")}:${
      embedded.port ?? 8080
    }`;
  }
  const { hosts, defaults: host } = hostSettings(read, context);
  const defaults = {
    timeoutMs: read.seconds("TASK_TIMEOUT", 0, 0, 86400) * 1000,
    maxAttempts: read.integer("TASK_MAX_ATTEMPTS", 5, 1, 1000),
    host,
  };
  const deadLetterQueue = read.text(
    "TASK_DEAD_LETTER_QUEUE",
    `${queue.queueName}_failed`,
  );
  const catalog = loadCatalog(context.catalogFile, defaults, read.problems)
    ?.catalog;
  const revokeTtlSeconds = revokeTtl(read);
  if (read.problems.length > 0) throw new ConfigError(read.problems);
  return {
    queue,
    catalog,
    hosts,
    deadLetterQueue,
    user: context.user,
    revokeTtlSeconds,
  };
}

/**
 * Where `deno task runs` finds a running worker's listener: its TASK_HTTP_PORT,
 * TASK_HTTP_HOST and TASK_HTTP_TOKEN, as the worker reads them.
 */
export function listenerConfig(
  env: Env,
): { url: string; token?: string } {
  const read = new EnvReader(env);
  const http = httpSettings(read);
  if (http === undefined) {
    read.problems.push(
      "TASK_HTTP_PORT: not set; set it (and TASK_HTTP_HOST, TASK_HTTP_TOKEN) as the worker has them: the run history is read from its listener",
    );
  } else if (http.port === 0) {
    read.problems.push(
      "TASK_HTTP_PORT=0: the worker listens on a port chosen at start; give the port its log names (web: listening on ...)",
    );
  }
  if (read.problems.length > 0) throw new ConfigError(read.problems);
  const host = http!.hostname === "0.0.0.0" ? "127.0.0.1" : http!.hostname;
  return {
    url: `http://${bracketIPv6(host)}:${http!.port}`,
    token: http!.token,
  };
}

/** SSH_HOST's list, and what hosts written without user, port or jump get. */
function hostSettings(
  read: EnvReader,
  context: ConfigContext,
): { hosts: HostSpec[]; defaults: HostDefaults } {
  const bare = {
    port: read.integer("SSH_PORT", 22, 1, 65535),
    user: read.text("SSH_USER", context.user),
  };
  const jumpText = read.optional("SSH_PROXY_JUMP");
  const { jump, problems: jumpProblems } = jumpText === undefined
    ? { jump: [], problems: [] }
    : parseJump(jumpText, bare);
  for (const p of jumpProblems) read.problems.push(`SSH_PROXY_JUMP=${p}`);
  const defaults = { ...bare, jump };
  const { hosts, problems } = parseHostList(
    read.text("SSH_HOST", "127.0.0.1"),
    defaults,
  );
  for (const p of problems) read.problems.push(`SSH_HOST: ${p}`);
  return { hosts, defaults };
}

/** The catalog file parsed, its problems added to `problems`; none without a file. */
function loadCatalog(
  file: ConfigContext["catalogFile"],
  defaults: CatalogDefaults,
  problems: string[],
): { catalog: Catalog; warnings: string[] } | undefined {
  if (file?.text === undefined) {
    if (file?.named) problems.push(`TASKS_FILE=${file.path}: no such file`);
    return undefined;
  }
  try {
    return parseCatalog(file.path, file.text, defaults);
  } catch (e) {
    if (!(e instanceof ConfigError)) throw e;
    problems.push(...e.problems);
    return undefined;
  }
}

/** TASKS_FILE, else tasks.yaml in the working directory, as read. */
function catalogFile(env: Env): ConfigContext["catalogFile"] {
  const named = envValue(env, "TASKS_FILE");
  const path = named ?? `${Deno.cwd()}/tasks.yaml`;
  return { path, text: readTextIfExists(path), named: named !== undefined };
}

/** Reads iron.json (or .iron.json) from the working directory, then home. */
function readIronJsonFiles(cwd: string, home: string): IronJsonFile[] {
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

export function readTextIfExists(path: string): string | undefined {
  try {
    return Deno.readTextFileSync(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return undefined;
    throw new Error(`cannot read ${path}: ${errorText(e)}`);
  }
}

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
export function configContext(env: Env): ConfigContext {
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
    catalogFile: catalogFile(env),
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
 * and SSH addresses, the key, known_hosts, iron.json, the embedded database and
 * the run history.
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
  // Hosts behind a jump host are reached through it, not by the worker.
  for (const host of servedHosts(config.task)) {
    const first = host.jump[0] ?? host;
    net.add(`${bracketIPv6(first.host)}:${first.port}`);
  }
  const history = config.runs?.path;
  if (history !== undefined && history !== ":memory:") {
    for (const suffix of ["", "-wal", "-shm", "-journal"]) {
      read.add(history + suffix);
      write.add(history + suffix);
    }
  }
  if (config.http) {
    const host = bracketIPv6(config.http.hostname);
    net.add(config.http.port === 0 ? host : `${host}:${config.http.port}`);
    read.add(new URL("./page.html", import.meta.url).pathname);
  }
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

export interface SshCredentials {
  privateKey?: Uint8Array;
  passphrase?: string;
  agent?: string;
}

/** The key as the configuration read and checked it, or read and checked now: a bad key stops the worker before it reserves anything. */
export function loadSshCredentials(ssh: SshConfig): SshCredentials {
  if (ssh.keyFile === undefined) return { agent: ssh.agentSocket };
  if (ssh.privateKey !== undefined) {
    const { privateKey, passphrase, agentSocket: agent } = ssh;
    return { privateKey, passphrase, agent };
  }
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
function keyProblem(
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
