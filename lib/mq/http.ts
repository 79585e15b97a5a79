/**
 * lib/mq/http.ts: the embedded queue server's HTTP API: requests parsed and
 * checked against IronMQ v3's rules, routed to the store, answered as
 * IronMQ answers; and its Prometheus metrics.
 *
 * Bad input gets a JSON error with the right status and loses nothing; a
 * request body is read within its limit, never kept whole before the check.
 */
import { createHash, timingSafeEqual } from "node:crypto";
import { collectDefaultMetrics, Counter, Gauge, Registry } from "prom-client";
import { errorText, isRecord, readAtMost } from "../util.ts";
import {
  ApiError,
  badRequest,
  ClientGone,
  DEFAULT_QUEUES_PAGE,
  LongPolls,
  MAX_BATCH,
  MAX_DELAY_S,
  MAX_EXPIRATION_S,
  MAX_MAX_RESERVATIONS,
  MAX_NAME_LENGTH,
  MAX_QUEUES_PAGE,
  MAX_REQUEST_BYTES,
  MAX_TIMEOUT_S,
  MAX_WAIT_S,
  type MessageTarget,
  MIN_EXPIRATION_S,
  MIN_TIMEOUT_S,
  type NewMessage,
  queueKey,
  type QueueRef,
  type QueueRow,
  type QueueSettings,
  QueueStore,
  type ReserveRequest,
} from "./store.ts";

type JsonObject = Record<string, unknown>;

/**
 * The body as text; 413 past the size limit, checked on the declared length
 * first and counted as a chunked body streams in. A leading byte order mark
 * is dropped, unless `verbatim` (a webhook's body is the message's, byte for
 * byte).
 */
async function readBody(request: Request, verbatim = false): Promise<string> {
  const length = request.headers.get("content-length");
  const declared = Number(length ?? 0);
  if (declared > MAX_REQUEST_BYTES) throw tooLarge();
  let body: Uint8Array | undefined;
  try {
    // Deno's HTTP server ends a body at its Content-Length (and refuses one
    // that also has Transfer-Encoding), so the check above bounds it, and
    // bytes() reads it natively into one buffer of that size. Read through
    // the stream instead, a body trickled a byte a packet ran JavaScript and
    // allocated per packet: 60 to 75 MB of RSS for 6,000 bytes.
    body = length !== null && !request.headers.has("transfer-encoding")
      ? await request.bytes()
      : await readAtMost(request.body, MAX_REQUEST_BYTES);
  } catch {
    // The body stream fails only when the connection does.
    throw new ClientGone();
  }
  if (body === undefined) throw tooLarge();
  return new TextDecoder("utf-8", { ignoreBOM: verbatim }).decode(body);
}

function tooLarge(): ApiError {
  return new ApiError(
    413,
    `Request body too large: the limit is ${MAX_REQUEST_BYTES} bytes (256 KiB); ` +
      "send fewer or smaller messages per request",
  );
}

/** The body as a JSON object; an empty body is `{}` only where `allowEmpty`. */
async function readJsonObject(
  request: Request,
  allowEmpty: boolean,
): Promise<JsonObject> {
  const text = await readBody(request);
  if (text.trim() === "") {
    if (allowEmpty) return {};
    throw badRequest("Request body is empty: send a JSON object");
  }
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (error) {
    throw badRequest(`Malformed JSON in request body: ${errorText(error)}`);
  }
  if (!isRecord(value)) throw badRequest("Request body must be a JSON object");
  return value;
}

function integerField(
  object: JsonObject,
  field: string,
  range: { min: number; max: number; label?: string },
): number | undefined {
  const value = object[field];
  if (value === undefined || value === null) return undefined;
  if (
    typeof value !== "number" || !Number.isInteger(value) ||
    value < range.min || value > range.max
  ) {
    const label = range.label ?? field;
    throw badRequest(
      `${label} must be an integer from ${range.min} to ${range.max}`,
    );
  }
  return value;
}

function stringField(
  object: JsonObject,
  field: string,
  label = field,
): string | undefined {
  const value = object[field];
  if (value === undefined || value === null) return undefined;
  if (typeof value !== "string" || value === "") {
    throw badRequest(`${label} must be a non-empty string`);
  }
  return value;
}

function booleanField(object: JsonObject, field: string): boolean | undefined {
  const value = object[field];
  if (value === undefined || value === null) return undefined;
  if (typeof value !== "boolean") {
    throw badRequest(`${field} must be true or false`);
  }
  return value;
}

function queryInteger(
  url: URL,
  field: string,
  range: { min: number; max: number; fallback: number },
): number {
  const raw = url.searchParams.get(field);
  if (raw === null || raw === "") return range.fallback;
  const value = /^\d+$/.test(raw) ? Number(raw) : NaN;
  if (!(value >= range.min && value <= range.max)) {
    throw badRequest(
      `${field} must be an integer from ${range.min} to ${range.max}`,
    );
  }
  return value;
}

function isValidName(name: string): boolean {
  return name.length >= 1 && name.length <= MAX_NAME_LENGTH &&
    !/[\p{Cc}/]/u.test(name);
}

function parseQueueSettings(body: JsonObject): QueueSettings {
  const queue = body.queue ?? {};
  if (!isRecord(queue)) throw badRequest("queue must be a JSON object");
  const type = queue.type;
  if (type === "multicast" || type === "unicast" || queue.push !== undefined) {
    throw badRequest(
      "Push queues are not supported by this server: use type pull",
    );
  }
  if (type !== undefined && type !== "pull") {
    throw badRequest('type must be "pull"');
  }
  return {
    message_timeout: integerField(queue, "message_timeout", {
      min: MIN_TIMEOUT_S,
      max: MAX_TIMEOUT_S,
    }),
    message_expiration: integerField(queue, "message_expiration", {
      min: MIN_EXPIRATION_S,
      max: MAX_EXPIRATION_S,
    }),
    dead_letter: parseDeadLetter(queue.dead_letter),
  };
}

function parseDeadLetter(value: unknown): QueueSettings["dead_letter"] {
  if (value === undefined || value === null) return undefined;
  if (!isRecord(value)) throw badRequest("dead_letter must be a JSON object");
  const name = value.queue_name;
  if (typeof name !== "string" || (name !== "" && !isValidName(name))) {
    throw badRequest(
      "dead_letter.queue_name must be a queue name (1 to 255 characters, no '/')",
    );
  }
  return {
    queue_name: name,
    max_reservations: integerField(value, "max_reservations", {
      min: 1,
      max: MAX_MAX_RESERVATIONS,
      label: "dead_letter.max_reservations",
    }),
  };
}

function parseNewMessages(body: JsonObject): NewMessage[] {
  const messages = body.messages;
  if (!Array.isArray(messages) || messages.length === 0) {
    throw badRequest(
      'messages must be a non-empty array, e.g. {"messages":[{"body":"hello"}]}',
    );
  }
  return messages.map((message: unknown, index) => {
    const label = `messages[${index}]`;
    if (!isRecord(message)) throw badRequest(`${label} must be a JSON object`);
    const messageBody = stringField(message, "body", `${label}.body`);
    if (messageBody === undefined) {
      throw badRequest(`${label}.body is required (a non-empty string)`);
    }
    const delaySeconds = integerField(message, "delay", {
      min: 0,
      max: MAX_DELAY_S,
      label: `${label}.delay`,
    });
    return { body: messageBody, delaySeconds: delaySeconds ?? 0 };
  });
}

function parseReserveRequest(
  body: JsonObject,
): ReserveRequest & { waitSeconds: number } {
  return {
    n: integerField(body, "n", { min: 1, max: MAX_BATCH }) ?? 1,
    timeoutSeconds: integerField(body, "timeout", {
      min: MIN_TIMEOUT_S,
      max: MAX_TIMEOUT_S,
    }),
    waitSeconds: integerField(body, "wait", { min: 0, max: MAX_WAIT_S }) ?? 0,
    deleteOnReserve: booleanField(body, "delete") ?? false,
  };
}

function messageIdField(value: unknown, label: string): string {
  if (typeof value === "string" && value !== "") return value;
  if (typeof value === "number" && Number.isSafeInteger(value)) {
    return String(value);
  }
  throw badRequest(`${label} must be a message id`);
}

/** `{"ids": [...]}` deletes those messages; exactly `{}` clears the queue. */
function parseBatchDelete(body: JsonObject): MessageTarget[] | "clear" {
  if (Object.keys(body).length === 0) return "clear";
  const ids = body.ids;
  if (!Array.isArray(ids) || ids.length === 0 || ids.length > MAX_BATCH) {
    throw badRequest(
      `Send {"ids":[{"id":...,"reservation_id":...}]} with 1 to ${MAX_BATCH} ` +
        "messages to delete them, or {} to clear the queue",
    );
  }
  return ids.map((item: unknown, index) => {
    const label = `ids[${index}]`;
    if (!isRecord(item)) throw badRequest(`${label} must be a JSON object`);
    return {
      id: messageIdField(item.id, `${label}.id`),
      reservationId: stringField(
        item,
        "reservation_id",
        `${label}.reservation_id`,
      ),
    };
  });
}

function requiredReservationId(body: JsonObject): string {
  const reservationId = stringField(body, "reservation_id");
  if (reservationId === undefined) {
    throw badRequest(
      "reservation_id is required: pass the one reserve gave you",
    );
  }
  return reservationId;
}

interface RequestContext {
  request: Request;
  url: URL;
  params: Record<string, string>;
}

type Handler = (context: RequestContext) => Response | Promise<Response>;

interface Route {
  /** The path with `:name` placeholders: the `route` label of the request count. */
  pattern: string;
  segments: string[];
  methods: Record<string, Handler>;
}

function json(status: number, data: unknown): Response {
  return Response.json(data, { status });
}

function errorResponse(
  status: number,
  msg: string,
  headers?: HeadersInit,
): Response {
  return Response.json({ msg }, { status, headers });
}

function queueRefOf({ params }: RequestContext): QueueRef {
  return { project: params.project, name: params.queue };
}

function queueView(queue: QueueRow, counts?: { size: number }): JsonObject {
  return {
    project_id: queue.project,
    name: queue.name,
    ...(counts
      ? { size: counts.size, total_messages: queue.total_messages }
      : {}),
    message_timeout: queue.message_timeout,
    message_expiration: queue.message_expiration,
    type: "pull",
    ...(queue.dead_letter ? { dead_letter: queue.dead_letter } : {}),
  };
}

export function buildRoutes(store: QueueStore, polls: LongPolls): Route[] {
  const postMessages: Handler = async (context) => {
    const messages = parseNewMessages(
      await readJsonObject(context.request, false),
    );
    const ids = store.post(queueRefOf(context), messages);
    return json(201, { ids, msg: "Messages put on queue." });
  };

  const reserve: Handler = async (context) => {
    const request = parseReserveRequest(
      await readJsonObject(context.request, true),
    );
    const ref = queueRefOf(context);
    const attempt = () => store.reserve(ref, request);
    const messages = attempt();
    if (messages.length > 0 || request.waitSeconds === 0) {
      return json(200, { messages });
    }
    const waited = await polls.wait(
      queueKey(ref),
      { attempt, nextAvailableAt: () => store.nextAvailableAt(ref) },
      request.waitSeconds * 1000,
      context.request.signal,
    );
    return json(200, { messages: waited });
  };

  const queues = "/3/projects/:project/queues";
  const queue = `${queues}/:queue`;
  const message = `${queue}/messages/:id`;
  return [
    route(queues, {
      GET: ({ url, params }) => {
        const names = store.listQueues(params.project, {
          perPage: queryInteger(url, "per_page", {
            min: 1,
            max: MAX_QUEUES_PAGE,
            fallback: DEFAULT_QUEUES_PAGE,
          }),
          previous: url.searchParams.get("previous") ?? "",
          prefix: url.searchParams.get("prefix") ?? "",
        });
        return json(200, { queues: names.map((name) => ({ name })) });
      },
    }),
    route(queue, {
      GET: (context) => {
        const { queue, size } = store.queueInfo(queueRefOf(context));
        return json(200, { queue: queueView(queue, { size }) });
      },
      PUT: async (context) => {
        const settings = parseQueueSettings(
          await readJsonObject(context.request, true),
        );
        const queue = store.putQueue(queueRefOf(context), settings);
        return json(200, { queue: queueView(queue) });
      },
      PATCH: async (context) => {
        const settings = parseQueueSettings(
          await readJsonObject(context.request, true),
        );
        const ref = queueRefOf(context);
        store.updateQueue(ref, settings);
        const { queue, size } = store.queueInfo(ref);
        return json(200, { queue: queueView(queue, { size }) });
      },
      DELETE: (context) => {
        store.deleteQueue(queueRefOf(context));
        return json(200, { msg: "Deleted" });
      },
    }),
    route(`${queue}/messages`, {
      POST: postMessages,
      GET: (context) => {
        const n = queryInteger(context.url, "n", {
          min: 1,
          max: MAX_BATCH,
          fallback: 1,
        });
        return json(200, { messages: store.peek(queueRefOf(context), n) });
      },
      DELETE: async (context) => {
        const batch = parseBatchDelete(
          await readJsonObject(context.request, false),
        );
        if (batch === "clear") {
          store.clear(queueRefOf(context));
          return json(200, { msg: "Cleared" });
        }
        store.deleteMessages(queueRefOf(context), batch);
        return json(200, { msg: "Deleted" });
      },
    }),
    route(`${queue}/webhook`, {
      POST: async (context) => {
        const body = await readBody(context.request, true);
        if (body === "") {
          throw badRequest(
            "Request body is empty: the webhook body becomes the message body",
          );
        }
        const ids = store.post(queueRefOf(context), [
          { body, delaySeconds: 0 },
        ]);
        return json(201, { ids, msg: "Messages put on queue." });
      },
    }),
    route(`${queue}/reservations`, { POST: reserve }),
    route(message, {
      GET: (context) =>
        json(200, {
          message: store.getMessage(queueRefOf(context), context.params.id),
        }),
      DELETE: async (context) => {
        const body = await readJsonObject(context.request, true);
        store.deleteMessages(queueRefOf(context), [{
          id: context.params.id,
          reservationId: stringField(body, "reservation_id"),
        }]);
        return json(200, { msg: "Deleted" });
      },
    }),
    route(`${message}/touch`, {
      POST: async (context) => {
        const body = await readJsonObject(context.request, false);
        const target = {
          id: context.params.id,
          reservationId: requiredReservationId(body),
        };
        const timeout = integerField(body, "timeout", {
          min: MIN_TIMEOUT_S,
          max: MAX_TIMEOUT_S,
        });
        const reservationId = store.touch(queueRefOf(context), target, timeout);
        return json(200, { reservation_id: reservationId, msg: "Touched" });
      },
    }),
    route(`${message}/release`, {
      POST: async (context) => {
        const body = await readJsonObject(context.request, false);
        const target = {
          id: context.params.id,
          reservationId: requiredReservationId(body),
        };
        const delay = integerField(body, "delay", { min: 0, max: MAX_DELAY_S });
        store.release(queueRefOf(context), target, delay ?? 0);
        return json(200, { msg: "Released" });
      },
    }),
    // The v1 enqueue call of the original 2014 setup, on the same store.
    route("/1/projects/:project/queues/:queue/messages", {
      POST: postMessages,
    }),
  ];
}

export function route(
  pattern: string,
  methods: Record<string, Handler>,
): Route {
  return { pattern, segments: pattern.split("/").slice(1), methods };
}

/** The route the path's parts fit by their fixed segments; names are checked later. */
function findRoute(routes: Route[], parts: string[]): Route | undefined {
  return routes.find((candidate) =>
    candidate.segments.length === parts.length &&
    candidate.segments.every((segment, index) =>
      segment.startsWith(":") || segment === parts[index]
    )
  );
}

function routeParams(route: Route, parts: string[]): Record<string, string> {
  const params: Record<string, string> = {};
  route.segments.forEach((segment, index) => {
    if (segment.startsWith(":")) {
      params[segment.slice(1)] = decodeName(parts[index]);
    }
  });
  return params;
}

function decodeName(segment: string): string {
  let name: string;
  try {
    name = decodeURIComponent(segment);
  } catch {
    throw badRequest(`Malformed percent-encoding in URL path: ${segment}`);
  }
  if (!isValidName(name)) {
    throw badRequest(
      "Names in the path must be 1 to 255 characters without '/' or control characters",
    );
  }
  return name;
}

function sha256(text: string): Uint8Array {
  return createHash("sha256").update(text).digest();
}

/**
 * Accepts `Authorization: OAuth <token>` or Iron's `?oauth=<token>`, and where
 * `bearer` (the metrics, for Prometheus) also `Authorization: Bearer <token>`.
 */
function isAuthorized(
  request: Request,
  url: URL,
  token: string,
  bearer: boolean,
): boolean {
  const header = request.headers.get("authorization") ?? "";
  const scheme = bearer
    ? /^(?:OAuth|Bearer)\s+(\S+)\s*$/i
    : /^OAuth\s+(\S+)\s*$/i;
  const match = scheme.exec(header);
  const presented = match?.[1] ?? url.searchParams.get("oauth");
  if (presented === null) return false;
  return timingSafeEqual(sha256(presented), sha256(token));
}

const SQLITE_FULL = 13;

/** SQLite's "database or disk is full", from node:sqlite's error code. */
function isDatabaseFull(error: unknown): boolean {
  return isRecord(error) && typeof error.errcode === "number" &&
    (error.errcode & 0xff) === SQLITE_FULL;
}

export function createRequestHandler(
  routes: Route[],
  token: string | undefined,
  log: (line: string) => void,
  metrics: ServerMetrics,
): (request: Request) => Promise<Response> {
  const respond = async (
    request: Request,
    url: URL,
    parts: string[],
    found: Route | undefined,
  ): Promise<Response> => {
    try {
      const scrape = found?.pattern === METRICS_PATH;
      if (token !== undefined && !isAuthorized(request, url, token, scrape)) {
        const header = scrape
          ? "Bearer <token>' (or 'OAuth <token>')"
          : "OAuth <token>'";
        return errorResponse(
          401,
          `Unauthorized: send the header 'Authorization: ${header} with this server's token`,
        );
      }
      if (!found) {
        return errorResponse(
          404,
          `Not found: no IronMQ endpoint at ${url.pathname}`,
        );
      }
      const params = routeParams(found, parts);
      const handler = found.methods[request.method];
      if (!handler) {
        const allowed = Object.keys(found.methods).join(", ");
        return errorResponse(
          405,
          `Method ${request.method} not allowed here; use ${allowed}`,
          { allow: allowed },
        );
      }
      return await handler({ request, url, params });
    } catch (error) {
      if (error instanceof ApiError) {
        return errorResponse(error.status, error.message);
      }
      const where = `mq_server: ${request.method} ${url.pathname}`;
      if (error instanceof ClientGone) {
        log(`${where}: client closed the connection mid-body; request dropped`);
        return errorResponse(
          400,
          "Request body incomplete: the connection closed before all of it arrived",
        );
      }
      log(`${where} failed: ${errorText(error)}`);
      if (isDatabaseFull(error)) {
        return errorResponse(
          507,
          `The queue's database is full (${errorText(error)}): ` +
            "free disk space where it lives, then retry",
        );
      }
      return errorResponse(
        500,
        `Internal server error: ${errorText(error)}`,
      );
    }
  };
  return async (request) => {
    const url = new URL(request.url);
    const parts = url.pathname.split("/").slice(1);
    const found = findRoute(routes, parts);
    const response = await respond(request, url, parts, found);
    metrics.countRequest(request.method, found?.pattern, response.status);
    return response;
  };
}

export const METRICS_PATH = "/metrics";

/** Methods counted by name; any other is counted as "other" (labels stay few). */
const COUNTED_METHODS = new Set([
  "GET",
  "HEAD",
  "POST",
  "PUT",
  "PATCH",
  "DELETE",
  "OPTIONS",
]);

let processMetrics: Registry | undefined;

/** prom-client's gauges read from /proc/self/status and /proc/self/fd. */
const PROC_GAUGES = [
  "process_resident_memory_bytes",
  "process_virtual_memory_bytes",
  "process_heap_bytes",
  "process_open_fds",
];

/**
 * prom-client's default metrics (CPU, memory, file descriptors, event loop, GC),
 * registered once per process: they describe the process, and each registration
 * adds a GC observer and an event loop monitor that nothing can remove. Made at
 * the first scrape, so a server nobody scrapes never reads /proc.
 */
function processRegistry(): Registry {
  if (processMetrics) return processMetrics;
  const registry = new Registry();
  // prom-client reads /proc/self, already while registering. Where this process
  // may not read there (a worker's ./start grants only the paths its settings
  // name), Deno would halt it on a permission prompt in a terminal.
  const proc = Deno.permissions.querySync({ name: "read", path: "/proc/self" });
  if (proc.state === "granted") {
    collectDefaultMetrics({ register: registry });
    // Gauges named *_total, which promtool rejects (the suffix is for counters);
    // the per-type gauges they sum (nodejs_active_handles...) stay.
    for (const kind of ["handles", "requests", "resources"]) {
      registry.removeSingleMetric(`nodejs_active_${kind}_total`);
    }
    // Deno lets only --allow-all read /proc/self/*; `deno task mq` has read
    // access without it, and these gauges would stay at 0 there.
    if (!procReadable()) {
      for (const name of PROC_GAUGES) registry.removeSingleMetric(name);
    }
  }
  return processMetrics = registry;
}

function procReadable(): boolean {
  try {
    Deno.readTextFileSync("/proc/self/status");
    return true;
  } catch (error) {
    return !(error instanceof Deno.errors.NotCapable); // no /proc: not Linux
  }
}

/**
 * One server's own metrics, in its own registry: several servers run in one
 * process (the tests; a worker with its embedded queue), and prom-client's
 * global registry would mix their counts.
 */
export class ServerMetrics {
  readonly #registry = new Registry();
  readonly #requests = new Counter({
    name: "ironmq_http_requests_total",
    help: "HTTP requests answered, by method, route pattern and status code.",
    labelNames: ["method", "route", "status"] as const,
    registers: [this.#registry],
  });

  constructor(store: QueueStore) {
    new Gauge({
      name: "ironmq_queue_messages",
      help: "Messages in each queue by state (ready, reserved, delayed), " +
        "read from the database at scrape time.",
      labelNames: ["project", "queue", "state"] as const,
      registers: [this.#registry],
      collect() {
        // From scratch: a deleted queue's series must go too.
        this.reset();
        for (const counts of store.messageCounts()) {
          const labels = { project: counts.project, queue: counts.name };
          for (const state of ["ready", "reserved", "delayed"] as const) {
            this.set({ ...labels, state }, counts[state]);
          }
        }
      },
    });
  }

  /** `route` is the matched pattern (not the path, which has names and ids). */
  countRequest(method: string, route: string | undefined, status: number) {
    this.#requests.inc({
      method: COUNTED_METHODS.has(method) ? method : "other",
      route: route ?? "unmatched",
      status: String(status),
    });
  }

  async scrape(): Promise<Response> {
    const registry = Registry.merge([processRegistry(), this.#registry]);
    return new Response(await registry.metrics(), {
      headers: { "content-type": registry.contentType },
    });
  }
}
