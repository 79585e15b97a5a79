/**
 * lib/monitor.ts: what the worker is doing, for people and for Prometheus.
 *
 * The worker calls a Monitor as things happen (queue requests, SSH
 * connections, commands and their output lines, settled messages); the Monitor
 * keeps a bounded picture of it (running commands with their output tails, the
 * last results, each host's state) and Prometheus counters. With
 * TASK_HTTP_PORT set, `serve` listens for:
 *
 * - `GET /`: one page (page.html, plain HTML/CSS/JS) that shows it all live;
 * - `GET /events`: the same as Server-Sent Events: a snapshot, then changes;
 * - `GET /metrics`: Prometheus text; `GET /healthz`; `GET /readyz`;
 * - `GET /api/dead-letters`, `POST /api/dead-letters/<id>/requeue|discard`;
 * - `POST /hooks/<name>`: webhooks (lib/hooks.ts), trusted by their signature;
 * - `GET /runs?task=&host=&status=&since=&q=&limit=`, `GET /runs/<id>`: the
 *   run history (lib/runs.ts);
 * - `GET /runs/<id>/events`, `POST /runs/<id>/cancel`: a run under way,
 *   followed or cancelled (lib/stream.ts, lib/revoke.ts).
 *
 * It imports only types from tasks.ts, so tasks.ts can import it.
 */

import { createHash, timingSafeEqual } from "node:crypto";
import {
  collectDefaultMetrics,
  Counter,
  Gauge,
  Histogram,
  Registry,
} from "prom-client";
import { type DeadLetter, type DeadLetters } from "./dead_letters.ts";
import { type HookAnswer } from "./hooks.ts";
import { type HostState, type RunResult } from "./ssh.ts";
import { bracketIPv6, errorText, isLoopback, isRecord } from "./util.ts";

export type Outcome =
  | "success"
  | "failure"
  | "rejected"
  | "revoked"
  | "retry"
  | "not_run"
  /** A task id that already succeeded here: deleted, not run again. */
  | "duplicate";

export interface HostOutcome {
  exit_status: number | null;
  signal: string | null;
  duration_ms: number;
  stdout: string;
  stderr: string;
  error: string | null;
}

/** Output lines kept per running command, for a page opened mid-run. */
const RUN_LINES_KEPT = 200;
const RUN_CHARS_KEPT = 16 * 1024;
/** Per host of a kept result: the end of each stream, and at most this many hosts. */
const RESULT_TAIL_CHARS = 1_000;
const RESULT_HOSTS_KEPT = 20;
/** Distinct task label values; more (unknown task names in messages) count as "other". */
const TASK_LABELS_KEPT = 200;
/** Event bytes a page may fall behind by before it is dropped (it reconnects). */
const CLIENT_BACKLOG_BYTES = 1024 * 1024;
const MAX_CLIENTS = 32;
const HEARTBEAT_MS = 15_000;
/** What a dead-letter record shows of a body or text: the start. */
const DEAD_LETTER_TEXT_CHARS = 4_000;
const DEAD_LETTER_ID = /^[A-Za-z0-9_.-]{1,64}$/;

/** process_* metrics of prom-client's defaults that work under Deno's permissions. */
const DEFAULT_METRICS_KEPT = [
  "process_cpu_user_seconds_total",
  "process_cpu_system_seconds_total",
  "process_cpu_seconds_total",
  "process_start_time_seconds",
];

type Stream = "out" | "err";
type OutputLine = [Stream, string];

interface Run {
  runId: string;
  messageId: string;
  task: string;
  host: string;
  command: string;
  startedAt: number;
  lines: OutputLine[];
  chars: number;
  /** Lines no longer kept (the page says so). */
  dropped: number;
}

interface HostView {
  host: string;
  state: HostState;
  detail?: string;
  since: number;
  connections: number;
}

interface ResultView {
  messageId: string;
  task: string;
  outcome: Outcome;
  finishedAt: number;
  reason?: string;
  /** The longest host's run. */
  durationMs: number;
  hostCount: number;
  failedHosts: number;
  /** Failed hosts first, output tails only. */
  hosts: Record<string, HostOutcome>;
  hostsOmitted: number;
}

interface Readiness {
  ok: boolean;
  reason: string;
}

/** The run history's reading side (lib/runs.ts), for /runs. */
export interface RunReader {
  list(params: URLSearchParams): { runs: unknown[] } | { error: string };
  get(id: string): unknown | undefined;
}

/** What the dead-letter part of the page needs (DeadLetters in tasks.ts). */
type DeadLetterQueue = Pick<DeadLetters, "list" | "requeue" | "discard">;

export interface ServeOptions {
  hostname: string;
  port: number;
  /** When set, every request but the page itself, /healthz and the hooks must carry it. */
  token?: string;
  deadLetters: DeadLetterQueue;
  maskBody: (body: string) => string;
  log: (line: string) => void;
  /** With hooks in the catalog: answers POST /hooks/<name> (lib/hooks.ts). */
  hooks?: (name: string, request: Request, remote: string) => Promise<
    HookAnswer
  >;
  /** Runs under way: followed (GET /runs/<id>/events) and cancelled (POST .../cancel). */
  live?: RunControl;
  /** The run history, when the worker keeps one (TASK_RUNS_DB). */
  runs?: RunReader;
}

/** What the listener does for a run under way (lib/stream.ts, lib/revoke.ts in tasks.ts). */
export interface RunControl {
  /** Its events as they come; undefined when it is not under way here. */
  follow(id: string): Response | undefined;
  /** Posts its revocation from `who`; resolves to what to tell the page. */
  cancel(id: string, who: string): Promise<{ ok: boolean; text: string }>;
}

export class Monitor {
  private readonly registry = new Registry();
  private readonly messages: Counter<"task" | "outcome">;
  private readonly durations: Histogram<"task" | "host">;
  private readonly running: Gauge;
  private readonly reserved: Gauge;
  private readonly connections: Gauge<"host">;
  private readonly sshErrors: Counter<"host" | "kind">;
  private readonly queueRequests: Counter<"op" | "status">;
  private readonly deadLetters: Counter<"task">;
  private readonly hookRequests: Counter<"hook" | "outcome">;
  /** hook, then outcome, to its count: for the page. */
  private readonly hookCounts = new Map<string, Record<string, number>>();
  private readonly runsStoredGauge: Gauge;
  private readonly runsBytes: Gauge;
  private readonly runWriteFailures: Counter;

  private readonly runs = new Map<string, Run>();
  private readonly results: ResultView[] = [];
  private readonly hosts = new Map<string, HostView>();
  private readonly taskLabels = new Set<string>();
  private lastQueue?: { op: string; status: number | "error"; at: number };
  private readiness: Readiness;
  private readonly resultsKept: number;

  private readonly clients = new Set<EventClient>();
  private pendingOutput = new Map<string, OutputLine[]>();
  private flushScheduled = false;
  private serving = false;

  constructor(options: { resultsKept?: number } = {}) {
    this.resultsKept = options.resultsKept ?? 50;
    const registers = [this.registry];
    this.messages = new Counter({
      name: "tasks_messages_total",
      help: "Messages settled, by task and outcome.",
      labelNames: ["task", "outcome"],
      registers,
    });
    this.durations = new Histogram({
      name: "tasks_command_duration_seconds",
      help: "How long commands ran, by task and host.",
      labelNames: ["task", "host"],
      buckets: [0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600],
      registers,
    });
    this.running = new Gauge({
      name: "tasks_commands_running",
      help: "Commands running now.",
      registers,
    });
    this.reserved = new Gauge({
      name: "tasks_messages_reserved",
      help: "Messages this worker holds reserved now (running or waiting).",
      registers,
    });
    this.connections = new Gauge({
      name: "tasks_ssh_connections",
      help: "Open SSH connections, by host.",
      labelNames: ["host"],
      registers,
    });
    this.sshErrors = new Counter({
      name: "tasks_ssh_errors_total",
      help:
        "SSH failures, by host and kind (connect, timeout, auth, host_key, dropped, exec).",
      labelNames: ["host", "kind"],
      registers,
    });
    this.queueRequests = new Counter({
      name: "tasks_queue_requests_total",
      help: "Requests to the queue, by operation and HTTP status (or error).",
      labelNames: ["op", "status"],
      registers,
    });
    this.deadLetters = new Counter({
      name: "tasks_dead_letters_total",
      help: "Messages moved to the dead-letter queue, by task.",
      labelNames: ["task"],
      registers,
    });
    this.hookRequests = new Counter({
      name: "tasks_hook_requests_total",
      help: "Webhook requests (POST /hooks/<name>), by hook and outcome.",
      labelNames: ["hook", "outcome"],
      registers,
    });
    this.runsStoredGauge = new Gauge({
      name: "tasks_runs_stored",
      help: "Runs in this worker's history (TASK_RUNS_DB).",
      registers,
    });
    this.runsBytes = new Gauge({
      name: "tasks_runs_db_bytes",
      help: "Size of the run history's database, in bytes.",
      registers,
    });
    this.runWriteFailures = new Counter({
      name: "tasks_runs_write_failures_total",
      help:
        "Run history writes that failed (a full disk, a lock) or were dropped; the worker went on.",
      registers,
    });
    // prom-client's other process_* metrics read /proc/self, which Deno only
    // allows with --allow-all (they would say 0): resident memory comes from
    // Deno instead.
    const defaults = new Registry();
    collectDefaultMetrics({ register: defaults });
    for (const name of DEFAULT_METRICS_KEPT) {
      const metric = defaults.getSingleMetric(name);
      if (metric !== undefined) this.registry.registerMetric(metric);
    }
    new Gauge({
      name: "process_resident_memory_bytes",
      help: "Resident memory size in bytes.",
      registers,
      collect() {
        this.set(Deno.memoryUsage().rss);
      },
    });
    this.readiness = this.computeReadiness();
  }

  // -- queue ---------------------------------------------------------------

  queueRequest(op: string, status: number | "error"): void {
    this.queueRequests.inc({ op, status: String(status) });
    this.lastQueue = { op, status, at: Date.now() };
    this.updateReadiness();
  }

  held(count: number): void {
    this.reserved.set(count);
  }

  // -- limits (lib/limits.ts) ----------------------------------------------

  private readonly waiting = new Map<string, number>();
  private waitingGauge?: Gauge<"task">;

  /** Runs of `task` waiting for a limit (concurrency, max_parallel) now. */
  runsWaiting(task: string, count: number): void {
    this.waitingGauge ??= new Gauge({
      name: "tasks_runs_waiting",
      help: "Runs waiting for a limit (concurrency, max_parallel), by task.",
      labelNames: ["task"],
      registers: [this.registry],
    });
    this.waitingGauge.set({ task }, count);
    if (count === 0) this.waiting.delete(task);
    else this.waiting.set(task, count);
    this.broadcast("waiting", Object.fromEntries(this.waiting));
  }

  // -- SSH -----------------------------------------------------------------

  sshConnections(host: string, open: number): void {
    this.connections.set({ host }, open);
    const view = this.hostView(host);
    if (view.connections === open) return;
    view.connections = open;
    this.broadcast("host", view);
  }

  sshError(host: string, kind: string): void {
    this.sshErrors.inc({ host, kind });
  }

  hostState(
    host: string,
    state: HostState,
    detail?: string,
  ): void {
    const view = this.hostView(host);
    if (view.state !== state) view.since = Date.now();
    view.state = state;
    view.detail = detail;
    this.broadcast("host", view);
    this.updateReadiness();
  }

  private hostView(host: string): HostView {
    let view = this.hosts.get(host);
    if (view === undefined) {
      // Until told otherwise a host counts as reachable (see readiness).
      view = { host, state: "idle", since: Date.now(), connections: 0 };
      this.hosts.set(host, view);
    }
    return view;
  }

  // -- commands ------------------------------------------------------------

  commandStarted(run: {
    runId: string;
    messageId: string;
    task: string;
    host: string;
    command: string;
    startedAt: number;
  }): void {
    const kept: Run = { ...run, lines: [], chars: 0, dropped: 0 };
    this.runs.set(run.runId, kept);
    this.running.set(this.runs.size);
    this.broadcast("started", runView(kept));
  }

  /** `line` is already masked and escaped, as the log shows it. */
  commandOutput(runId: string, stream: "out" | "err", line: string): void {
    const run = this.runs.get(runId);
    if (run === undefined) return;
    run.lines.push([stream, line]);
    run.chars += line.length;
    while (
      run.lines.length > RUN_LINES_KEPT ||
      run.chars > RUN_CHARS_KEPT && run.lines.length > 1
    ) {
      run.chars -= run.lines.shift()![1].length;
      run.dropped++;
    }
    if (this.clients.size === 0) return;
    // Lines that come together (one chunk of output) go out as one event.
    let pending = this.pendingOutput.get(runId);
    if (pending === undefined) this.pendingOutput.set(runId, pending = []);
    pending.push([stream, line]);
    if (!this.flushScheduled) {
      this.flushScheduled = true;
      queueMicrotask(() => this.flushOutput());
    }
  }

  commandEnded(
    runId: string,
    end: { result: RunResult; finishedAt: number },
  ): void {
    const run = this.runs.get(runId);
    if (run === undefined) return;
    this.flushOutput();
    this.runs.delete(runId);
    this.running.set(this.runs.size);
    const durationMs = Math.max(0, end.finishedAt - run.startedAt);
    this.durations.observe(
      { task: this.taskLabel(run.task), host: run.host },
      durationMs / 1000,
    );
    this.broadcast("ended", {
      runId,
      messageId: run.messageId,
      result: describeResult(end.result),
      ok: end.result.kind === "exit" && end.result.code === 0,
      durationMs,
    });
  }

  // -- messages ------------------------------------------------------------

  messageSettled(s: {
    messageId: string;
    task: string;
    outcome: Outcome;
    hosts: Record<string, HostOutcome>;
    finishedAt: number;
    reason?: string;
  }): void {
    this.messages.inc({ task: this.taskLabel(s.task), outcome: s.outcome });
    const result = resultView(s);
    this.results.unshift(result);
    this.results.length = Math.min(this.results.length, this.resultsKept);
    this.broadcast("settled", result);
  }

  deadLettered(task: string): void {
    this.deadLetters.inc({ task: this.taskLabel(task) });
    this.broadcast("dead", { task });
  }

  // -- run history (lib/runs.ts reports here) -----------------------------

  runsStored(runs: number, bytes: number): void {
    this.runsStoredGauge.set(runs);
    this.runsBytes.set(bytes);
  }

  runWritesFailed(count: number): void {
    this.runWriteFailures.inc(count);
  }

  /** A task name as a label: names past the first TASK_LABELS_KEPT count as "other". */
  private taskLabel(task: string): string {
    if (this.taskLabels.has(task)) return task;
    if (this.taskLabels.size >= TASK_LABELS_KEPT) return "other";
    this.taskLabels.add(task);
    return task;
  }

  // -- readiness -----------------------------------------------------------

  /** 200 when the queue's last answer came (below 500) and some host is not unreachable. */
  private computeReadiness(): Readiness {
    const last = this.lastQueue;
    if (last === undefined) {
      return { ok: false, reason: "no answer from the queue yet" };
    }
    if (last.status === "error" || last.status >= 500) {
      const answer = last.status === "error"
        ? "no answer"
        : `HTTP ${last.status}`;
      return {
        ok: false,
        reason:
          `the queue's last request (${last.op}) got ${answer}: is IronMQ reachable? (the log says more)`,
      };
    }
    if (last.status === 401 || last.status === 403) {
      return {
        ok: false,
        reason:
          `the queue refused the worker's token (HTTP ${last.status} to ${last.op}): check IRON_TOKEN`,
      };
    }
    const hosts = [...this.hosts.values()];
    if (hosts.length > 0 && hosts.every((h) => h.state === "unreachable")) {
      const named = hosts.slice(0, 5).map((h) =>
        h.detail ? `${h.host} (${h.detail})` : h.host
      );
      const more = hosts.length > 5 ? ` and ${hosts.length - 5} more` : "";
      return {
        ok: false,
        reason: `no SSH host is reachable: ${named.join(", ")}${more}`,
      };
    }
    return { ok: true, reason: "ready" };
  }

  private updateReadiness(): void {
    const now = this.computeReadiness();
    if (now.ok === this.readiness.ok && now.reason === this.readiness.reason) {
      return;
    }
    this.readiness = now;
    this.broadcast("ready", now);
  }

  // -- events to pages -----------------------------------------------------

  private snapshot(): Record<string, unknown> {
    return {
      now: Date.now(),
      ready: this.readiness,
      running: [...this.runs.values()].map((run) => ({
        ...runView(run),
        lines: run.lines,
        dropped: run.dropped,
      })),
      results: this.results,
      hosts: [...this.hosts.values()],
      hooks: Object.fromEntries(this.hookCounts),
      waiting: Object.fromEntries(this.waiting),
    };
  }

  private flushOutput(): void {
    this.flushScheduled = false;
    if (this.pendingOutput.size === 0) return;
    const runs = [...this.pendingOutput].map(([runId, lines]) => ({
      runId,
      lines,
    }));
    this.pendingOutput = new Map();
    this.broadcast("output", { runs });
  }

  private broadcast(event: string, data: unknown): void {
    if (this.clients.size === 0) return;
    if (event !== "output") this.flushOutput(); // keeps events in order
    const text = sseEvent(event, data);
    for (const client of this.clients) client.send(text);
  }

  private openEvents(): Response {
    if (this.clients.size >= MAX_CLIENTS) {
      return text(503, `too many pages open (${MAX_CLIENTS}); close one`);
    }
    this.flushOutput(); // the snapshot holds those lines already
    const client = new EventClient((gone) => this.clients.delete(gone));
    client.send(sseEvent("snapshot", this.snapshot()));
    this.clients.add(client);
    return new Response(client.stream, {
      headers: {
        ...SECURITY_HEADERS,
        "Content-Type": "text/event-stream; charset=utf-8",
        "X-Accel-Buffering": "no",
      },
    });
  }

  // -- HTTP ----------------------------------------------------------------

  /** The HTTP listener: the page, events, metrics, health and the dead-letter API. */
  async serve(
    options: ServeOptions,
  ): Promise<{ url: string; close(): Promise<void> }> {
    if (this.serving) throw new Error("this Monitor serves already");
    const page = await loadPage();
    const tokenDigest = options.token === undefined
      ? undefined
      : sha256(options.token);
    const api = new DeadLetterApi(options);
    const handle = async (request: Request, remote: string) => {
      const url = new URL(request.url);
      // A hook's signature is its authentication: no token, any Host (it
      // sits behind a proxy). Only /hooks/<name> opens this way.
      const hook = /^\/hooks\/([^/]*)$/.exec(url.pathname);
      if (hook && options.hooks) {
        const answer = await options.hooks(hook[1], request, remote);
        this.hookRequests.inc({ hook: answer.hook, outcome: answer.outcome });
        const counts = this.hookCounts.get(answer.hook) ?? {};
        counts[answer.outcome] = (counts[answer.outcome] ?? 0) + 1;
        this.hookCounts.set(answer.hook, counts);
        this.broadcast("hook", { hook: answer.hook, counts });
        return answer.response;
      }
      const refused = refusal(request, url, tokenDigest);
      if (refused) return refused;
      const route = `${request.method} ${url.pathname}`;
      switch (route) {
        case "GET /":
          return new Response(page.html, {
            headers: {
              ...SECURITY_HEADERS,
              "Content-Type": "text/html; charset=utf-8",
              "Content-Security-Policy": page.csp,
            },
          });
        case "GET /healthz":
          return text(200, "ok");
        case "GET /readyz":
          return text(
            this.readiness.ok ? 200 : 503,
            this.readiness.reason,
          );
        case "GET /metrics":
          return new Response(await this.registry.metrics(), {
            headers: {
              ...SECURITY_HEADERS,
              "Content-Type": this.registry.contentType,
            },
          });
        case "GET /events":
          return this.openEvents();
        case "GET /api/dead-letters":
          return await api.list();
      }
      const run = /^(GET|POST) \/runs\/([^/]{1,200})\/(events|cancel)$/
        .exec(route);
      if (run && options.live) {
        const [, method, raw, verb] = run;
        let id: string;
        try {
          id = decodeURIComponent(raw);
        } catch {
          return text(400, "a run id must be URL-encoded UTF-8");
        }
        if (verb === "events" && method === "GET") {
          return options.live.follow(id) ??
            text(
              404,
              `run ${id} is not under way on this worker: it may be waiting (for its eta or a limit), running on another worker, or ended (runs show ${id} tells how)`,
            );
        }
        if (verb === "cancel" && method === "POST") {
          const done = await options.live.cancel(id, `the page (${remote})`);
          return text(done.ok ? 202 : 503, done.text);
        }
        return text(405, `${method} is not allowed here`);
      }
      if (url.pathname === "/runs" || url.pathname.startsWith("/runs/")) {
        return runsRoute(request.method, url, options.runs);
      }
      const action = /^POST \/api\/dead-letters\/([^/]+)\/(requeue|discard)$/
        .exec(route);
      if (action) {
        // Message ids need no decoding: anything that would is refused.
        const [, id, verb] = action;
        return verb === "requeue"
          ? await api.requeue(id, remote)
          : await api.discard(id, remote);
      }
      const known = ROUTES.some((r) => r.endsWith(` ${url.pathname}`));
      return known
        ? text(405, `${request.method} is not allowed here`)
        : text(404, "not found");
    };
    const server = Deno.serve({
      hostname: options.hostname,
      port: options.port,
      onListen: () => {},
      onError: (e) => {
        options.log(`web: ${errorText(e)}`);
        return text(500, "internal error (the worker's log says more)");
      },
    }, (request, info) => {
      const remote = (info.remoteAddr as Deno.NetAddr).hostname;
      return handle(request, remote);
    });
    this.serving = true;
    const heartbeat = setInterval(() => {
      for (const client of this.clients) client.send(HEARTBEAT);
    }, HEARTBEAT_MS);
    const url = `http://${bracketIPv6(options.hostname)}:${server.addr.port}`;
    options.log(
      `web: listening on ${url}${
        options.token === undefined ? "" : " (TASK_HTTP_TOKEN required)"
      }`,
    );
    let closed: Promise<void> | undefined;
    return {
      url,
      close: () =>
        closed ??= (async () => {
          clearInterval(heartbeat);
          for (const client of [...this.clients]) client.close();
          await server.shutdown();
          this.serving = false;
        })(),
    };
  }
}

// ---------------------------------------------------------------------------
// Views: what pages receive
// ---------------------------------------------------------------------------

function runView(run: Run) {
  return {
    runId: run.runId,
    messageId: run.messageId,
    task: run.task,
    host: run.host,
    command: run.command,
    startedAt: run.startedAt,
  };
}

function describeResult(result: RunResult): string {
  switch (result.kind) {
    case "exit":
      return `exit ${result.code}`;
    case "signal":
      return `killed by ${result.signal}`;
    case "timeout":
      return "timed out";
    case "aborted":
      return "stopped";
    case "unreachable":
      return `not started: ${result.error}`;
    case "ssh-error":
      return `SSH error: ${result.error}`;
  }
}

function hostFailed(h: HostOutcome): boolean {
  return h.exit_status !== 0 || h.error !== null || h.signal !== null;
}

/** A settled message as kept: failed hosts first, only the end of each stream. */
function resultView(s: {
  messageId: string;
  task: string;
  outcome: Outcome;
  hosts: Record<string, HostOutcome>;
  finishedAt: number;
  reason?: string;
}): ResultView {
  const entries = Object.entries(s.hosts);
  const failed = entries.filter(([, h]) => hostFailed(h));
  const ordered = [
    ...failed,
    ...entries.filter(([, h]) => !hostFailed(h)),
  ];
  const kept = ordered.slice(0, RESULT_HOSTS_KEPT).map((
    [host, h],
  ): [string, HostOutcome] => [host, {
    ...h,
    stdout: tail(h.stdout, RESULT_TAIL_CHARS),
    stderr: tail(h.stderr, RESULT_TAIL_CHARS),
  }]);
  return {
    messageId: s.messageId,
    task: s.task,
    outcome: s.outcome,
    finishedAt: s.finishedAt,
    reason: s.reason,
    durationMs: Math.max(0, ...entries.map(([, h]) => h.duration_ms)),
    hostCount: entries.length,
    failedHosts: failed.length,
    hosts: Object.fromEntries(kept),
    hostsOmitted: entries.length - kept.length,
  };
}

function tail(text: string, max: number): string {
  return text.length <= max ? text : `…${text.slice(-max)}`;
}

function head(text: string, max: number): string {
  return text.length <= max ? text : `${text.slice(0, max)}…`;
}

// ---------------------------------------------------------------------------
// Server-Sent Events
// ---------------------------------------------------------------------------

const encoder = new TextEncoder();
const HEARTBEAT = encoder.encode(": still here\n\n");

export function sseEvent(event: string, data: unknown): Uint8Array {
  // JSON has no raw line breaks, so the data is one `data:` line.
  return encoder.encode(`event: ${event}\ndata: ${JSON.stringify(data)}\n\n`);
}

/**
 * One page's event stream. Events wait in the stream's queue while the page
 * reads slower than they come; past CLIENT_BACKLOG_BYTES the page is dropped
 * (its connection closed), so a page that stops reading cannot take the
 * worker's memory. The page reconnects and starts again from a snapshot.
 */
export class EventClient {
  readonly stream: ReadableStream<Uint8Array>;
  private controller?: ReadableStreamDefaultController<Uint8Array>;
  private done = false;

  constructor(private readonly onGone: (client: EventClient) => void) {
    this.stream = new ReadableStream<Uint8Array>(
      {
        start: (controller) => {
          this.controller = controller;
        },
        cancel: () => this.gone(),
      },
      new ByteLengthQueuingStrategy({ highWaterMark: CLIENT_BACKLOG_BYTES }),
    );
  }

  send(bytes: Uint8Array): void {
    if (this.done || this.controller === undefined) return;
    // desiredSize is the backlog allowed minus the bytes waiting: at 0 the page
    // is a full backlog behind. (One event may be larger: a big snapshot.)
    if ((this.controller.desiredSize ?? 0) <= 0) {
      this.controller.error(new Error("the page stopped reading its events"));
      this.gone();
      return;
    }
    // A copy each: the server may take over the buffer it is given.
    this.controller.enqueue(bytes.slice());
  }

  close(): void {
    if (this.done) return;
    try {
      this.controller?.close();
    } catch {
      // already errored
    }
    this.gone();
  }

  private gone(): void {
    if (this.done) return;
    this.done = true;
    this.onGone(this);
  }
}

// ---------------------------------------------------------------------------
// HTTP: access rules, the page, the dead-letter API
// ---------------------------------------------------------------------------

const ROUTES = [
  "GET /",
  "GET /healthz",
  "GET /readyz",
  "GET /metrics",
  "GET /events",
  "GET /api/dead-letters",
];

/** Open to anyone who reaches the listener: the page holds no data, and a liveness probe. */
const OPEN_ROUTES = new Set(["GET /", "GET /healthz"]);

const SECURITY_HEADERS = {
  "Cache-Control": "no-store",
  "X-Content-Type-Options": "nosniff",
  "Referrer-Policy": "no-referrer",
  "X-Frame-Options": "DENY",
};

function text(status: number, body: string, headers = {}): Response {
  return new Response(body + "\n", {
    status,
    headers: {
      ...SECURITY_HEADERS,
      "Content-Type": "text/plain; charset=utf-8",
      ...headers,
    },
  });
}

function json(status: number, body: unknown): Response {
  return new Response(JSON.stringify(body), {
    status,
    headers: {
      ...SECURITY_HEADERS,
      "Content-Type": "application/json; charset=utf-8",
    },
  });
}

function sha256(value: string): Uint8Array {
  return createHash("sha256").update(value).digest();
}

/**
 * Why a request is refused, or undefined to serve it. With a token, every
 * request but the open routes must carry it. Without one (loopback only), the
 * Host must be a loopback name, so a web site cannot reach the listener by
 * pointing its own name at 127.0.0.1 (DNS rebinding). A POST must come from
 * the page itself (its Origin, when the browser sends one, is the listener's),
 * so another site's form cannot requeue or discard.
 */
function refusal(
  request: Request,
  url: URL,
  tokenDigest: Uint8Array | undefined,
): Response | undefined {
  const host = request.headers.get("host") ?? "";
  if (tokenDigest === undefined) {
    const name = hostName(host);
    if (!isLoopback(name)) {
      return text(
        403,
        `this listener answers only to a loopback name (127.0.0.1, localhost), not ${
          JSON.stringify(name)
        }`,
      );
    }
  }
  const origin = request.headers.get("origin");
  if (
    request.method !== "GET" && request.method !== "HEAD" && origin !== null &&
    originHost(origin) !== host.toLowerCase()
  ) {
    return text(403, "refused: this request comes from another site");
  }
  if (
    tokenDigest === undefined ||
    OPEN_ROUTES.has(`${request.method} ${url.pathname}`)
  ) {
    return undefined;
  }
  const given = /^Bearer +(\S+)\s*$/i.exec(
    request.headers.get("authorization") ?? "",
  )?.[1];
  if (given !== undefined && timingSafeEqual(sha256(given), tokenDigest)) {
    return undefined;
  }
  return text(
    401,
    "this worker's listener needs its token (TASK_HTTP_TOKEN): send Authorization: Bearer <token>, or open / and enter it",
    { "WWW-Authenticate": 'Bearer realm="tasks"' },
  );
}

/** host:port of an Origin header (the scheme may differ behind a TLS proxy). */
function originHost(origin: string): string | undefined {
  try {
    return new URL(origin).host;
  } catch {
    return undefined;
  }
}

/** The host name of a Host header: `127.0.0.1:9100` → 127.0.0.1, `[::1]:9100` → ::1. */
function hostName(host: string): string {
  const bracketed = /^\[([^\]]*)\]/.exec(host);
  if (bracketed) return bracketed[1];
  return host.replace(/:\d*$/, "").toLowerCase();
}

/** page.html, and a Content-Security-Policy that allows its own script and style only. */
async function loadPage(): Promise<{ html: string; csp: string }> {
  const path = new URL("./page.html", import.meta.url);
  let html: string;
  try {
    html = await Deno.readTextFile(path);
  } catch (e) {
    throw new Error(
      `cannot read ${path.pathname} (${
        errorText(e)
      }): it belongs next to tasks.ts`,
    );
  }
  const hashes = (tag: string) =>
    [...html.matchAll(new RegExp(`<${tag}>([\\s\\S]*?)</${tag}>`, "g"))]
      .map((m) =>
        `'sha256-${createHash("sha256").update(m[1]).digest("base64")}'`
      )
      .join(" ");
  const csp = [
    "default-src 'none'",
    `script-src ${hashes("script")}`,
    `style-src ${hashes("style")}`,
    "connect-src 'self'",
    "img-src 'self' data:",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
  ].join("; ");
  return { html, csp };
}

/** GET, requeue and discard dead letters for the page; bodies masked. */
class DeadLetterApi {
  constructor(private readonly options: ServeOptions) {}

  async list(): Promise<Response> {
    let letters: DeadLetter[];
    try {
      letters = await this.options.deadLetters.list(100);
    } catch (e) {
      return json(502, {
        error: `cannot read the dead-letter queue: ${errorText(e)}`,
      });
    }
    // A record too large for one message names the message holding its body:
    // that one is part of the record, not a dead letter of its own.
    const bodies = new Set(
      letters.map((l) => l.record?.body_message_id).filter((id) =>
        typeof id === "string"
      ),
    );
    const shown = letters.filter((l) => !bodies.has(l.id));
    return json(200, { items: shown.map((l) => this.view(l)) });
  }

  async requeue(id: string, remote: string): Promise<Response> {
    if (!DEAD_LETTER_ID.test(id)) return json(400, { error: "bad message id" });
    try {
      const newId = await this.options.deadLetters.requeue(id);
      this.options.log(
        `web: dead letter ${id} queued again as message ${newId} (from ${remote})`,
      );
      return json(200, { id: newId });
    } catch (e) {
      return failure(`cannot run dead letter ${id} again`, e);
    }
  }

  async discard(id: string, remote: string): Promise<Response> {
    if (!DEAD_LETTER_ID.test(id)) return json(400, { error: "bad message id" });
    try {
      await this.options.deadLetters.discard(id);
      this.options.log(`web: dead letter ${id} discarded (from ${remote})`);
      return json(200, { discarded: id });
    } catch (e) {
      return failure(`cannot discard dead letter ${id}`, e);
    }
  }

  /** What the page shows of one record: texts masked and cut to a readable length. */
  private view(letter: DeadLetter): Record<string, unknown> {
    const mask = (value: unknown) =>
      typeof value === "string"
        ? head(this.options.maskBody(value), DEAD_LETTER_TEXT_CHARS)
        : null;
    const r = letter.record;
    if (r === undefined) {
      return { id: letter.id, record: false, raw: mask(letter.raw) };
    }
    const number = (value: unknown) => typeof value === "number" ? value : null;
    return {
      id: letter.id,
      record: true,
      task: typeof r.task === "string" ? r.task : null,
      queue: typeof r.queue === "string" ? r.queue : null,
      message_id: typeof r.id === "string" ? r.id : null,
      attempts: number(r.attempts),
      exit_status: number(r.exit_status),
      reason: mask(r.reason),
      failed_at: typeof r.failed_at === "string" ? r.failed_at : null,
      hosts: isRecord(r.hosts) ? Object.keys(r.hosts) : [],
      body: mask(r.body),
      body_message_id: typeof r.body_message_id === "string"
        ? r.body_message_id
        : null,
      stderr_tail: mask(r.stderr_tail),
    };
  }
}

/**
 * `/runs` and `/runs/<id>[/<what>]`: the run history. One route a case, so
 * that what a run offers besides its record sits beside it here.
 */
function runsRoute(
  method: string,
  url: URL,
  runs: RunReader | undefined,
): Response {
  if (runs === undefined) {
    const off =
      "this worker keeps no run history (TASK_RUNS_DB=off, or it could not be opened: its log says)";
    // The page asks for the list whatever the worker keeps: an empty one, said why.
    return method === "GET" && url.pathname === "/runs"
      ? json(200, { runs: [], off })
      : json(404, { error: off });
  }
  const [, id, what] = /^\/runs(?:\/([^/]+)(?:\/([^/]+))?)?$/.exec(
    url.pathname,
  ) ?? [];
  let runId: string | undefined;
  try {
    runId = id === undefined ? undefined : decodeURIComponent(id);
  } catch {
    return json(400, { error: "a run id must be URL-encoded UTF-8" });
  }
  switch (
    `${method} ${runId === undefined ? "" : "<id>"}${what ? `/${what}` : ""}`
  ) {
    case "GET ": {
      const listed = runs.list(url.searchParams);
      return json("error" in listed ? 400 : 200, listed);
    }
    case "GET <id>": {
      const record = runs.get(runId!);
      return record === undefined
        ? json(404, {
          error: `no run ${JSON.stringify(runId)} in this worker's history`,
        })
        : json(200, record);
    }
  }
  return json(404, { error: `no such route: ${method} ${url.pathname}` });
}

/** An error for the page: 404 when the message is gone, 502 when the queue failed, else 409. */
function failure(what: string, e: unknown): Response {
  const status = isRecord(e) && typeof e.status === "number"
    ? e.status
    : undefined;
  const queueFailed = e instanceof Error && e.name === "QueueError" &&
    (status === undefined || status >= 500);
  const code = status === 404 ? 404 : queueFailed ? 502 : 409;
  return json(code, { error: `${what}: ${errorText(e)}` });
}
