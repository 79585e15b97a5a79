/**
 * lib/ironmq.ts: the IronMQ v3 calls the worker makes (reserve, delete,
 * touch, release, post, peek), over plain fetch, with bounded replies and
 * retries of what may pass.
 *
 * Errors are QueueErrors that say whether a retry may help; the token never
 * appears in one.
 */

import { errorText, isRecord, readAtMost } from "./util.ts";
import { type QueueConfig } from "./config.ts";
import { type Clock, retry } from "./retry.ts";

/** A queue call retried while its failure may pass (5xx, 408, 429, network): 6 tries, about 10 s. */
export function queueCall<T>(
  call: () => Promise<T>,
  clock: Clock,
  maxAttempts = 6,
): Promise<T> {
  return retry(call, {
    minDelayMs: 200,
    maxDelayMs: 5_000,
    maxAttempts,
    retryable: (e) => e instanceof QueueError && e.retryable,
    clock,
  });
}

export interface QueueMessage {
  id: string;
  body: string;
  reserved_count: number;
  reservation_id: string;
}

/** A message read without reserving it (peek, get). */
export type StoredMessage = Omit<QueueMessage, "reservation_id">;

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

/** A reply over its size limit: read no further (a broken or hostile server). */
export class ReplyTooLarge extends QueueError {}

/**
 * Replies are read up to a limit, so a broken or hostile server cannot take
 * the worker's memory. A reserve's reply holds up to 100 messages of up to
 * 256 KiB each, escaped; after one too large the fetcher asks for one at a time.
 */
const MAX_RESERVE_REPLY_BYTES = 16 * 1024 * 1024;
const MAX_REPLY_BYTES = 1024 * 1024;

export interface DeleteItem {
  id: string;
  reservation_id: string;
}

/** What the client tells of its requests (the Monitor, lib/monitor.ts, listens). */
export interface QueueEvents {
  queueRequest(op: string, status: number | "error"): void;
}

/** The IronMQ v3 calls the worker makes. Errors are QueueErrors that say whether a retry may help. */
export class IronMqClient {
  constructor(
    private readonly config: QueueConfig,
    /** Told of each request and its status (the worker's own client). */
    private readonly monitor?: QueueEvents,
  ) {}

  /** Creates the queue if it does not exist yet, so the first reserve finds it; true if it did. */
  async ensureQueue(signal?: AbortSignal): Promise<boolean> {
    try {
      await this.call("GET", `/queues/${this.queue()}`, undefined, { signal });
      return false;
    } catch (e) {
      if (!(e instanceof QueueError) || e.status !== 404) throw e;
      await this.call("PUT", `/queues/${this.queue()}`, { queue: {} }, {
        signal,
      });
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
      { waitSeconds, signal, maxReplyBytes: MAX_RESERVE_REPLY_BYTES },
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

  async post(
    queue: string,
    bodies: string[],
    delaySeconds = 0,
  ): Promise<string[]> {
    const reply = await this.call<{ ids?: unknown }>(
      "POST",
      `/queues/${encodeURIComponent(queue)}/messages`,
      {
        messages: bodies.map((body) =>
          delaySeconds > 0 ? { body, delay: delaySeconds } : { body }
        ),
      },
    );
    return Array.isArray(reply.ids) ? reply.ids.map(String) : [];
  }

  /** Deletes this client's queue with its messages (a reply queue, once read). */
  async deleteQueue(): Promise<void> {
    await this.call("DELETE", `/queues/${this.queue()}`, {});
  }

  /** Posts one message whose body is `body` byte for byte (IronMQ's webhook: no JSON escaping). */
  async postVerbatim(queue: string, body: string): Promise<string[]> {
    const reply = await this.call<{ ids?: unknown }>(
      "POST",
      `/queues/${encodeURIComponent(queue)}/webhook`,
      body,
    );
    return Array.isArray(reply.ids) ? reply.ids.map(String) : [];
  }

  /**
   * Up to `n` (1 to 100) of `queue`'s messages that are ready, oldest first,
   * without reserving them: reserved and delayed ones are not shown.
   */
  peek(queue: string, n: number): Promise<StoredMessage[]> {
    return this.call<{ messages?: unknown }>(
      "GET",
      `/queues/${encodeURIComponent(queue)}/messages?n=${n}`,
      undefined,
      { maxReplyBytes: MAX_RESERVE_REPLY_BYTES },
    ).then((reply) => {
      if (!Array.isArray(reply.messages)) {
        throw new QueueError("peek reply has no messages array", 200, true);
      }
      return reply.messages.map(parseStored);
    });
  }

  /** One message of `queue`, reserved or not; a QueueError with status 404 if there is none. */
  async getMessage(queue: string, id: string): Promise<StoredMessage> {
    // One message of up to 256 KiB, escaped, can be over the usual limit.
    const reply = await this.call<{ message?: unknown }>(
      "GET",
      `/queues/${encodeURIComponent(queue)}/messages/${encodeURIComponent(id)}`,
      undefined,
      { maxReplyBytes: MAX_RESERVE_REPLY_BYTES },
    );
    return parseStored(reply.message);
  }

  /** Deletes a message nobody holds (a reserved one is refused: 403). */
  async deleteMessage(queue: string, id: string): Promise<void> {
    await this.call(
      "DELETE",
      `/queues/${encodeURIComponent(queue)}/messages/${encodeURIComponent(id)}`,
      {},
    );
  }

  /** Deletes every message of `queue`, reserved ones too; the queue stays. */
  async clearQueue(queue: string): Promise<void> {
    await this.call(
      "DELETE",
      `/queues/${encodeURIComponent(queue)}/messages`,
      {},
    );
  }

  /** How many messages `queue` holds, reserved and delayed ones included. */
  async queueSize(queue: string): Promise<number> {
    const reply = await this.call<{ queue?: unknown }>(
      "GET",
      `/queues/${encodeURIComponent(queue)}`,
      undefined,
    );
    const size = isRecord(reply.queue) ? reply.queue.size : undefined;
    if (typeof size !== "number") {
      throw new QueueError("queue reply has no size", 200, true);
    }
    return size;
  }

  private queue(): string {
    return encodeURIComponent(this.config.queueName);
  }

  /** One request; a string body is sent as it is, anything else as JSON. */
  private async call<T>(
    method: string,
    path: string,
    body: unknown,
    { waitSeconds = 0, signal, maxReplyBytes = MAX_REPLY_BYTES }: {
      waitSeconds?: number;
      signal?: AbortSignal;
      maxReplyBytes?: number;
    } = {},
  ): Promise<T> {
    const url =
      `${this.config.baseUrl}/3/projects/${this.config.projectId}${path}`;
    const where = `${method} ${this.config.baseUrl}/3/projects/.../${
      path.replace(/^\//, "")
    }`;
    const headers: Record<string, string> = {
      "Content-Type": typeof body === "string"
        ? "text/plain; charset=utf-8"
        : "application/json",
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
      response = await fetch(url, {
        method,
        headers,
        body: body === undefined || typeof body === "string"
          ? body
          : JSON.stringify(body),
        signal: timeout.signal,
      });
      const bytes = await readAtMost(response.body, maxReplyBytes);
      if (bytes === undefined) {
        throw new ReplyTooLarge(
          `${where}: HTTP ${response.status} with a reply over ${maxReplyBytes} bytes: not read (is IRON_HOST an IronMQ server?)`,
          response.status,
          true,
        );
      }
      text = new TextDecoder().decode(bytes);
    } catch (e) {
      if (!signal?.aborted) {
        this.monitor?.queueRequest(opOf(method, path, body), "error");
      }
      if (signal?.aborted || e instanceof ReplyTooLarge) throw e;
      throw new QueueError(`${where}: ${errorText(e)}`, undefined, true);
    } finally {
      clearTimeout(timer);
      signal?.removeEventListener("abort", onStop);
    }
    this.monitor?.queueRequest(opOf(method, path, body), response.status);
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

/** A request's kind, for the metrics: reserve, delete, post, touch... */
function opOf(method: string, path: string, body: unknown): string {
  const rest = path.replace(/\?.*$/, "").replace(/^\/queues\/[^/]+/, "");
  if (rest === "") {
    return { GET: "queue_info", PUT: "create_queue" }[method] ?? "delete_queue";
  }
  if (rest === "/messages") {
    if (method === "POST") return "post";
    if (method === "GET") return "peek";
    return isRecord(body) && "ids" in body ? "delete_batch" : "clear";
  }
  const last = rest.split("/").pop()!;
  if (["reservations", "webhook", "touch", "release"].includes(last)) {
    return { reservations: "reserve", webhook: "post_verbatim" }[last] ?? last;
  }
  return method === "GET" ? "get_message" : "delete";
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

/** A message as peek and get show it: no reservation. */
function parseStored(m: unknown): StoredMessage {
  if (!isRecord(m) || typeof m.id !== "string" || typeof m.body !== "string") {
    throw new QueueError("the reply has a malformed message", 200, true);
  }
  return {
    id: m.id,
    body: m.body,
    reserved_count: typeof m.reserved_count === "number" ? m.reserved_count : 0,
  };
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

/** The IronMQ calls the worker makes. */
export type QueueApi = Pick<
  IronMqClient,
  | "ensureQueue"
  | "reserve"
  | "delete"
  | "deleteBatch"
  | "release"
  | "touch"
  | "post"
  | "postVerbatim"
>;
