/**
 * lib/hooks.ts: `POST /hooks/<name>`: a webhook request checked against its
 * hook (lib/hook_spec.ts) and turned into a task's message on the queue.
 *
 * In order: the body (at most 1 MiB), the signature or token (constant-time,
 * over the raw bytes), the JSON, `when`, the parameters from their dotted
 * paths, the Celery message checked as the worker will check it (planMessage,
 * as `deno task send` does), the delivery id not seen in 24 h, the post.
 * Every request gets one small JSON answer and one log line.
 *
 * It never logs or answers with a secret or the raw body, and never posts a
 * message whose signature failed or whose parameters the task refuses.
 */

import { createHash, createHmac, timingSafeEqual } from "node:crypto";
import { Buffer } from "node:buffer";
import { type Catalog } from "./catalog.ts";
import { type HookSpec } from "./hook_spec.ts";
import { type HostSpec } from "./hosts.ts";
import { type IronMqClient } from "./ironmq.ts";
import { escapeControls } from "./log.ts";
import { parseJsonBody, planMessage } from "./message.ts";
import { errorText, isRecord, readAtMost } from "./util.ts";

/** GitHub's own limit on a delivery's payload is 25 MB; ours is the queue's kind of size. */
const MAX_HOOK_BODY_BYTES = 1024 * 1024;
/** How long a delivery id is remembered. */
const DEDUPE_MS = 24 * 60 * 60 * 1000;
/** Delivery ids kept at most (each at most 128 characters): about 20 MB at worst. */
const DEDUPE_KEPT = 50_000;
const MAX_DELIVERY_ID = 128;

type HookOutcome =
  | "accepted"
  | "unauthorized"
  | "unknown_hook"
  | "ignored"
  | "duplicate"
  | "invalid"
  | "bad_request"
  | "too_large"
  | "queue_error";

/** The label of a request for no configured hook (kept out of the hook names' space). */
const UNKNOWN_HOOK = "(unknown)";

export interface HookAnswer {
  /** The hook's name, or UNKNOWN_HOOK: a bounded label. */
  hook: string;
  outcome: HookOutcome;
  response: Response;
}

interface HookDeps {
  catalog: Catalog;
  /** Hook name to its secret or token (lib/config.ts, from the environment). */
  secrets: Map<string, string>;
  /** SSH_HOST's hosts, for tasks without hosts: (as the worker plans them). */
  hosts: HostSpec[];
  queue: Pick<IronMqClient, "post">;
  queueName: string;
  log: (line: string) => void;
  now: () => number;
}

export class HookReceiver {
  private readonly seen: SeenDeliveries;

  constructor(private readonly deps: HookDeps) {
    this.seen = new SeenDeliveries(deps.now);
  }

  /** One request to /hooks/<name>: its answer, counted and logged once. */
  async receive(
    name: string,
    request: Request,
    remote: string,
  ): Promise<HookAnswer> {
    const hook = this.deps.catalog.hooks.get(name);
    const delivery = hook?.dedupeHeader === undefined
      ? undefined
      : request.headers.get(hook.dedupeHeader) ?? undefined;
    let answer: Answer;
    try {
      answer = hook === undefined
        ? {
          status: 404,
          outcome: "unknown_hook",
          body: { error: "no such hook" },
        }
        : await this.handle(hook, request, delivery);
    } catch (e) {
      // Nothing above throws by design; if something does, the sender retries.
      answer = {
        status: 503,
        outcome: "queue_error",
        body: { error: "internal error: try again" },
        detail: `unexpected: ${errorText(e)}`,
      };
    }
    const label = hook === undefined ? UNKNOWN_HOOK : name;
    const about = [
      delivery === undefined
        ? undefined
        : `delivery ${escapeControls(delivery.slice(0, MAX_DELIVERY_ID))}`,
      `from ${remote}`,
    ].filter((s) => s !== undefined).join(", ");
    this.deps.log(
      `hook ${
        hook === undefined
          ? JSON.stringify(escapeControls(name.slice(0, 64)))
          : name
      }: ${answer.status} ${answer.outcome}${
        answer.detail === undefined ? "" : `: ${escapeControls(answer.detail)}`
      } (${about})`,
    );
    return {
      hook: label,
      outcome: answer.outcome,
      response: new Response(JSON.stringify(answer.body), {
        status: answer.status,
        headers: {
          "Content-Type": "application/json; charset=utf-8",
          "Cache-Control": "no-store",
          "X-Content-Type-Options": "nosniff",
        },
      }),
    };
  }

  private async handle(
    hook: HookSpec,
    request: Request,
    delivery: string | undefined,
  ): Promise<Answer> {
    const refuse = (
      status: number,
      outcome: HookOutcome,
      error: string,
      detail = error,
    ): Answer => ({ status, outcome, body: { error }, detail });
    if (request.method !== "POST") {
      return refuse(405, "bad_request", "a hook takes POST only");
    }
    const tooLarge = () =>
      refuse(
        413,
        "too_large",
        `the body is over ${MAX_HOOK_BODY_BYTES} bytes`,
      );
    const length = Number(request.headers.get("content-length") ?? 0);
    if (length > MAX_HOOK_BODY_BYTES) return tooLarge();
    let bytes: Uint8Array | undefined;
    try {
      bytes = await readAtMost(request.body, MAX_HOOK_BODY_BYTES);
    } catch (e) {
      return refuse(
        400,
        "bad_request",
        "the body could not be read",
        `the body: ${errorText(e)}`,
      );
    }
    if (bytes === undefined) return tooLarge();

    const secret = this.deps.secrets.get(hook.name);
    const unsigned = secret === undefined
      ? "no secret configured"
      : signatureProblem(hook, request.headers, bytes, secret);
    if (unsigned !== undefined) {
      return refuse(
        401,
        "unauthorized",
        "missing or wrong signature or token",
        unsigned,
      );
    }

    const payload = readPayload(request.headers.get("content-type"), bytes);
    if ("error" in payload) {
      return refuse(payload.status, "bad_request", payload.error);
    }
    const body = payload.object;

    for (const [header, value] of hook.whenHeaders) {
      const given = request.headers.get(header);
      if (given !== value) {
        return ignored(`${header} is ${show(given)}, not ${show(value)}`);
      }
    }
    for (const { path, value } of hook.whenBody) {
      const given = at(body, path);
      if (given !== value) {
        return ignored(`${path} is ${show(given)}, not ${show(value)}`);
      }
    }

    const kwargs: Record<string, unknown> = {};
    for (const { param, path } of hook.params) {
      const value = at(body, path);
      if (value !== undefined) kwargs[param] = value;
    }
    const id = crypto.randomUUID();
    const message = JSON.stringify({
      id,
      task: hook.task,
      args: [],
      kwargs,
      sender: `hook:${hook.name}`,
    });
    const plan = planMessage(
      message,
      this.deps.catalog,
      "",
      this.deps.now(),
      this.deps.hosts,
    );
    if (plan.kind === "reject") {
      // bindParams names a missing parameter; say where the hook looked.
      const missing = /parameter (\w+) is required/.exec(plan.reason)?.[1];
      const path = hook.params.find((p) => p.param === missing)?.path;
      const reason = path === undefined
        ? plan.reason
        : `${plan.reason}: the body has no ${path}`;
      return refuse(422, "invalid", reason);
    }

    if (delivery !== undefined && delivery.length > MAX_DELIVERY_ID) {
      return refuse(
        400,
        "bad_request",
        `${hook.dedupeHeader} is over ${MAX_DELIVERY_ID} characters`,
      );
    }
    const key = delivery === undefined
      ? undefined
      : `${hook.name}\0${delivery}`;
    if (key !== undefined) {
      const earlier = this.seen.claim(key);
      if (earlier !== undefined) {
        return {
          status: 200,
          outcome: "duplicate",
          body: { duplicate: delivery, ...earlier },
          detail: earlier.id === undefined
            ? "the first is being posted"
            : `run ${earlier.id}`,
        };
      }
    }
    let messageId: string | undefined;
    try {
      [messageId] = await this.deps.queue.post(this.deps.queueName, [message]);
    } catch (e) {
      if (key !== undefined) this.seen.forget(key); // the sender's retry may post it
      return refuse(
        503,
        "queue_error",
        "the queue refused the message: try again later",
        `cannot post to ${this.deps.queueName}: ${errorText(e)}`,
      );
    }
    if (key !== undefined) this.seen.posted(key, id, messageId);
    return {
      status: 202,
      outcome: "accepted",
      body: { id, message_id: messageId },
      detail: `run ${id}, message ${messageId} (${hook.task})`,
    };
  }
}

interface Answer {
  status: number;
  outcome: HookOutcome;
  body: Record<string, unknown>;
  /** For the log line: never a secret or the body. */
  detail?: string;
}

function ignored(why: string): Answer {
  return {
    status: 200,
    outcome: "ignored",
    body: { ignored: why },
    detail: why,
  };
}

/** A value for a reason: JSON, cut short (a header or body value, never a secret). */
function show(value: unknown): string {
  if (value === undefined || value === null) return "absent";
  const text = JSON.stringify(value);
  return text.length > 80 ? `${text.slice(0, 80)}…` : text;
}

/** The value at a dotted path (`repository.full_name`, `commits.0.id`), or undefined. */
function at(body: unknown, path: string): unknown {
  let value = body;
  for (const key of path.split(".")) {
    if (Array.isArray(value) && /^\d+$/.test(key)) value = value[Number(key)];
    else if (isRecord(value) && Object.hasOwn(value, key)) value = value[key];
    else return undefined;
  }
  return value;
}

/**
 * The JSON object of a body: application/json (or no type), or GitHub's
 * form encoding (`payload=<json>`).
 */
function readPayload(
  contentType: string | null,
  bytes: Uint8Array,
):
  | { object: Record<string, unknown> }
  | { status: number; error: string } {
  const type = (contentType ?? "application/json").split(";")[0].trim()
    .toLowerCase();
  let text: string;
  try {
    text = new TextDecoder("utf-8", { fatal: true }).decode(bytes);
  } catch {
    return { status: 400, error: "the body is not UTF-8" };
  }
  if (type === "application/x-www-form-urlencoded") {
    const payload = new URLSearchParams(text).get("payload");
    if (payload === null) {
      return {
        status: 400,
        error:
          "a form body needs its JSON in payload= (or send Content-Type: application/json)",
      };
    }
    text = payload;
  } else if (type !== "application/json" && !type.endsWith("+json")) {
    return {
      status: 415,
      error: `Content-Type ${
        JSON.stringify(type.slice(0, 80))
      } is not JSON: send application/json`,
    };
  }
  const parsed = parseJsonBody(text);
  if (parsed === undefined) {
    return { status: 400, error: "the body is not a JSON object" };
  }
  if ("reason" in parsed) {
    return {
      status: 400,
      error: /not valid JSON/.test(parsed.reason)
        ? "the body is not valid JSON"
        : "the body must be a JSON object",
    };
  }
  return parsed;
}

/** Why the request's signature or token does not match its hook's secret, or undefined. */
function signatureProblem(
  hook: HookSpec,
  headers: Headers,
  bytes: Uint8Array,
  secret: string,
): string | undefined {
  const verify = hook.verify;
  switch (verify.kind) {
    case "gitlab": {
      const given = headers.get("x-gitlab-token");
      if (given === null) return "no X-Gitlab-Token";
      // Digests of equal length: the compare takes the same time whatever matches.
      return timingSafeEqual(digest(given), digest(secret))
        ? undefined
        : "X-Gitlab-Token does not match";
    }
    case "github":
      return hmacProblem(
        headers,
        bytes,
        secret,
        "x-hub-signature-256",
        "sha256",
        "sha256=",
      );
    case "hmac":
      return hmacProblem(
        headers,
        bytes,
        secret,
        verify.header,
        verify.algorithm,
        verify.prefix,
      );
  }
}

function hmacProblem(
  headers: Headers,
  bytes: Uint8Array,
  secret: string,
  header: string,
  algorithm: "sha256" | "sha512",
  prefix: string,
): string | undefined {
  const given = headers.get(header);
  if (given === null) return `no ${header}`;
  const expected = createHmac(algorithm, secret).update(bytes).digest();
  const hex = given.startsWith(prefix) ? given.slice(prefix.length) : "";
  // The length of a signature is no secret; its bytes are compared in constant time.
  if (!/^[0-9a-fA-F]*$/.test(hex) || hex.length !== expected.length * 2) {
    return `${header} is not ${prefix}<${expected.length * 2} hex digits>`;
  }
  return timingSafeEqual(Buffer.from(hex, "hex"), expected)
    ? undefined
    : `${header} does not match the body`;
}

function digest(value: string): Uint8Array {
  return createHash("sha256").update(value).digest();
}

/**
 * Delivery ids of the last 24 h, per worker, in memory: at most DEDUPE_KEPT,
 * the oldest forgotten first. A Map keeps insertion order, so the oldest
 * are at its front.
 */
class SeenDeliveries {
  private readonly ids = new Map<
    string,
    { at: number; id?: string; messageId?: string }
  >();

  constructor(private readonly now: () => number) {}

  /** Undefined when new (now claimed), else what the first delivery became. */
  claim(key: string): { id?: string; message_id?: string } | undefined {
    const now = this.now();
    for (const [old, seen] of this.ids) {
      if (now - seen.at < DEDUPE_MS && this.ids.size < DEDUPE_KEPT) break;
      this.ids.delete(old);
    }
    const seen = this.ids.get(key);
    if (seen !== undefined) return { id: seen.id, message_id: seen.messageId };
    this.ids.set(key, { at: now });
    return undefined;
  }

  posted(key: string, id: string, messageId: string | undefined): void {
    const seen = this.ids.get(key);
    if (seen !== undefined) Object.assign(seen, { id, messageId });
  }

  forget(key: string): void {
    this.ids.delete(key);
  }
}
