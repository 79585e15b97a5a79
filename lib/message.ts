/**
 * lib/message.ts: what a message body asks for: plain text, `{"args": [...]}`,
 * or a Celery-format message naming a task of the catalog, with its eta,
 * expiry, hosts and reply queue; read into a plan (run, reject, hold, revoke).
 *
 * Pure: it never runs, posts or logs anything; a body it cannot read is a
 * reason, never an exception.
 */

import { errorText, isRecord } from "./util.ts";
import { bindParams, type Catalog, type TaskSpec } from "./catalog.ts";
import { type HostSpec, narrowHosts } from "./hosts.ts";
import { MAX_COMMAND_BYTES, shellQuote } from "./quote.ts";

type CommandPlan =
  | { ok: true; command: string; args: string[] }
  | { ok: false; reason: string };

/**
 * A body that starts like JSON (`{` or `[`, after white space or a byte order
 * mark) must be `{"args": [strings]}`; any other body runs the configured
 * command as it is. A malformed one runs nothing: taking it as plain text
 * would drop the arguments its sender asked for (a `--dry-run`, say).
 */
export function planCommand(baseCommand: string, body: string): CommandPlan {
  const parsed = parseJsonBody(body);
  if (parsed === undefined) return withArgs(baseCommand, []);
  if ("reason" in parsed) return { ok: false, reason: parsed.reason };
  const args = argsOf(parsed.object);
  return Array.isArray(args)
    ? withArgs(baseCommand, args)
    : { ok: false, reason: args.reason };
}

function withArgs(baseCommand: string, args: string[]): CommandPlan {
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

/** A body that starts like JSON, parsed: an object, or why not; undefined for plain text. */
export function parseJsonBody(
  body: string,
): { object: Record<string, unknown> } | { reason: string } | undefined {
  const text = body.replace(/^\uFEFF/, "").trim();
  if (!text.startsWith("{") && !text.startsWith("[")) return undefined;
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (e) {
    // V8's message quotes part of the body, which may hold a secret: only
    // the position is kept.
    const at = /at position \d+/.exec(errorText(e))?.[0];
    return {
      reason: `the body starts like JSON but is not valid JSON${
        at === undefined ? "" : ` (${at})`
      }: send {"args": ["..."]}, or a body that does not start with { or [`,
    };
  }
  if (!isRecord(parsed)) {
    return { reason: `a JSON body must be an object: {"args": ["..."]}` };
  }
  return { object: parsed };
}

/** `{"args": [strings]}`, with "hosts" and "retries" allowed beside it. */
function argsOf(
  parsed: Record<string, unknown>,
): string[] | { reason: string } {
  const extra = Object.keys(parsed).filter((k) =>
    !["args", "hosts", "retries"].includes(k)
  );
  if (extra.length > 0) {
    return {
      reason: `unknown field(s) ${
        extra.map((k) => JSON.stringify(k)).join(", ")
      } in a JSON body: only "args", "hosts" and "retries" are allowed (or "task" and its fields, with a catalog)`,
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

/** Who sent a message and where its result goes, as far as the message says. */
export interface MessageMeta {
  task?: string;
  /** Celery's `id`, kept as the result's `task_id`. */
  taskId?: string;
  replyTo?: string;
  /** Who sent it, as the message says (`send`: user@hostname; a hook: hook:<name>). */
  sender?: string;
  /** `"stream": true`: its output goes to the reply queue as it comes. */
  stream?: boolean;
  /** Celery's `retries`: attempts made before this message was sent. */
  priorRetries: number;
}

/** What one message asks for, read against the catalog (if any). */
export type MessagePlan =
  | {
    kind: "run";
    command: string;
    /** The command as the log shows it: secret parameters [redacted]. */
    display: string;
    task?: TaskSpec;
    /** Where it runs: its task's hosts (else SSH_HOST's), narrowed by the message. */
    hosts: HostSpec[];
    /** Values of secret parameters, masked wherever the message shows. */
    secrets: string[];
    /** Its task's parameter values, checked (for a concurrency_key). */
    values?: Record<string, string | number | boolean>;
    /** Celery's `expires`: a run still waiting for a limit then is revoked. */
    expiresMs?: number;
    meta: MessageMeta;
  }
  | { kind: "reject"; reason: string; meta: MessageMeta }
  | { kind: "hold"; untilMs: number; meta: MessageMeta }
  | { kind: "revoke"; reason: string; meta: MessageMeta };

/** A queue name this worker accepts (its own, a dead-letter, a reply or results queue). */
export const QUEUE_NAME = /^[A-Za-z0-9_.-]{1,64}$/;

/** Celery's message fields that this worker reads, and those it accepts and ignores. */
const CELERY_FIELDS = [
  "id",
  "task",
  "args",
  "kwargs",
  "retries",
  "eta",
  "expires",
  "reply_to",
  "hosts",
  // Ours, beside Celery's: who sent it (for the run's record), and whether
  // the sender follows its output live on the reply queue.
  "sender",
  "stream",
];

const CELERY_IGNORED = [
  "utc",
  "callbacks",
  "errbacks",
  "timelimit",
  "taskset",
  "chord",
  "group",
];

/**
 * The plan for a body: plain text runs the catalog's default task (or
 * TASK_COMMAND with no catalog); `{"args": [...]}` fills the default task's
 * parameters (or follows TASK_COMMAND); a Celery message (`{"task": ...}`)
 * runs that task of the catalog, once its `eta` has come and unless its
 * `expires` has passed. It runs on its task's hosts (else on `hosts`, SSH_HOST),
 * or on those of them the message's `"hosts"` names.
 */
export function planMessage(
  body: string,
  catalog: Catalog | undefined,
  baseCommand: string,
  nowMs: number,
  hosts: HostSpec[],
): MessagePlan {
  const meta: MessageMeta = { priorRetries: 0 };
  const reject = (reason: string): MessagePlan => ({
    kind: "reject",
    reason,
    meta,
  });
  let wanted: unknown;
  const where = (task?: TaskSpec): HostSpec[] | string => {
    const all = task?.hosts ?? hosts;
    return wanted === undefined
      ? all
      : narrowHosts(wanted, all, catalog?.groups ?? new Map());
  };
  const run = (
    task: TaskSpec,
    args: unknown[],
    kwargs: Record<string, unknown>,
  ): MessagePlan => {
    const bound = bindParams(task, args, kwargs);
    if (!bound.ok) return reject(bound.reason);
    const on = where(task);
    if (typeof on === "string") return reject(on);
    return {
      kind: "run",
      command: bound.command,
      display: bound.display,
      task,
      hosts: on,
      secrets: bound.secrets,
      values: bound.values,
      meta,
    };
  };
  /** Celery's `retries`; a continuation's too: the attempts its hosts have had. */
  const readRetries = (object: Record<string, unknown>): string | undefined => {
    const retries = object.retries ?? 0;
    if (!(Number.isInteger(retries) && (retries as number) >= 0)) {
      return `"retries" must be a whole number from 0 up`;
    }
    meta.priorRetries = retries as number;
  };
  const defaultTask = () => {
    if (catalog?.defaultTask === undefined) return undefined;
    meta.task = catalog.defaultTask;
    return catalog.tasks.get(catalog.defaultTask)!;
  };
  const noDefault = () =>
    reject(
      `${
        catalog!.path
      } names no default task for a body without "task": send {"task": "<name>", ...} (tasks: ${
        [...catalog!.tasks.keys()].join(", ")
      }), or set default: in the catalog`,
    );

  const parsed = parseJsonBody(body);
  if (parsed !== undefined && "reason" in parsed) return reject(parsed.reason);
  if (parsed === undefined || !("task" in parsed.object)) {
    const args = parsed === undefined ? [] : argsOf(parsed.object);
    if (!Array.isArray(args)) return reject(args.reason);
    wanted = parsed?.object.hosts;
    const retries = parsed && readRetries(parsed.object);
    if (retries) return reject(retries);
    if (catalog === undefined) {
      const plan = withArgs(baseCommand, args);
      if (!plan.ok) return reject(plan.reason);
      const on = where();
      if (typeof on === "string") return reject(on);
      return {
        kind: "run",
        command: plan.command,
        display: plan.command,
        hosts: on,
        secrets: [],
        meta,
      };
    }
    const task = defaultTask();
    return task === undefined ? noDefault() : run(task, args, {});
  }

  const message = parsed.object;
  const unknown = Object.keys(message).filter((k) =>
    !CELERY_FIELDS.includes(k) && !CELERY_IGNORED.includes(k)
  );
  if (typeof message.id === "string") meta.taskId = message.id;
  if (typeof message.task === "string") meta.task = message.task;
  if (typeof message.reply_to === "string") {
    if (!QUEUE_NAME.test(message.reply_to)) {
      return reject(
        `"reply_to" must be a queue name (letters, digits, '_', '-', '.')`,
      );
    }
    meta.replyTo = message.reply_to;
  }
  if (unknown.length > 0) {
    return reject(
      `unknown field(s) ${
        unknown.map((k) => JSON.stringify(k)).join(", ")
      } in a task message`,
    );
  }
  if (typeof message.task !== "string") {
    return reject(`"task" must be a task name (a string)`);
  }
  if (message.id !== undefined && typeof message.id !== "string") {
    return reject(`"id" must be a string`);
  }
  if (message.sender !== undefined && message.sender !== null) {
    if (typeof message.sender !== "string" || message.sender.length > 200) {
      return reject(`"sender" must be a string of at most 200 characters`);
    }
    meta.sender = message.sender;
  }
  if (message.stream !== undefined && message.stream !== null) {
    if (typeof message.stream !== "boolean") {
      return reject(`"stream" must be true or false`);
    }
    meta.stream = message.stream;
  }
  if (
    message.reply_to !== undefined && message.reply_to !== null &&
    meta.replyTo === undefined
  ) {
    return reject(`"reply_to" must be a queue name`);
  }
  // Streamed to nobody, the output its sender waits for would never come;
  // a shared TASK_RESULTS_QUEUE is no place for it either.
  if (meta.stream && meta.replyTo === undefined) {
    return reject(
      `"stream": true needs "reply_to": the queue its output goes to as it comes (deno task send --follow sets both)`,
    );
  }
  const retries = readRetries(message);
  if (retries) return reject(retries);
  wanted = message.hosts;
  const args = message.args ?? [];
  if (!Array.isArray(args)) return reject(`"args" must be a list`);
  const kwargs = message.kwargs ?? {};
  if (!isRecord(kwargs)) return reject(`"kwargs" must be an object`);
  const times: Record<"eta" | "expires", number | undefined> = {
    eta: undefined,
    expires: undefined,
  };
  for (const field of ["eta", "expires"] as const) {
    const value = message[field];
    if (value === undefined || value === null) continue;
    const ms = typeof value === "string" ? Date.parse(value) : NaN;
    if (Number.isNaN(ms)) {
      return reject(
        `"${field}" must be an ISO 8601 time, such as 2026-11-27T15:00:00Z`,
      );
    }
    times[field] = ms;
  }
  if (catalog === undefined) {
    return reject(
      `named tasks need a catalog: set TASKS_FILE, or put tasks.yaml where the worker starts`,
    );
  }
  const task = catalog.tasks.get(message.task);
  if (task === undefined) {
    return reject(
      `unknown task ${JSON.stringify(message.task)} (${catalog.path} has: ${
        [...catalog.tasks.keys()].join(", ")
      })`,
    );
  }
  if (times.expires !== undefined && times.expires <= nowMs) {
    return { kind: "revoke", reason: expiredReason(times.expires), meta };
  }
  const plan = run(task, args, kwargs);
  if (plan.kind === "run" && times.eta !== undefined && times.eta > nowMs) {
    return { kind: "hold", untilMs: times.eta, meta };
  }
  if (plan.kind === "run" && times.expires !== undefined) {
    plan.expiresMs = times.expires;
  }
  return plan;
}

/** The REVOKED result's reason for a message past its `expires`. */
export function expiredReason(expiresMs: number): string {
  return `expired at ${new Date(expiresMs).toISOString()} before it ran`;
}
