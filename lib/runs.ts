/**
 * lib/runs.ts: the run history: every run this worker takes (one message's
 * ask across all its attempts and hosts; a continuation is the same run),
 * kept in SQLite (node:sqlite) at TASK_RUNS_DB, read by the listener's
 * `GET /runs` and `GET /runs/<id>` (lib/monitor.ts), the page and
 * `deno task runs`.
 *
 * Writes never happen on the processing path: the worker's calls queue them
 * (bounded in bytes), a timer writes them in one transaction, and a write
 * that fails (a full disk, a lock) is logged and counted, never thrown. The
 * database never holds more than TASK_RUNS_MAX runs (the oldest go in the
 * same transaction) or runs older than TASK_RUNS_KEEP_DAYS (pruned in the
 * background). It never runs, posts or settles anything, and stores output
 * and parameters only masked.
 */

import { DatabaseSync, type SQLOutputValue } from "node:sqlite";
import { createPrivately, errorText, isRecord } from "./util.ts";
import { type TaskSpec } from "./catalog.ts";
import { type RunsSettings } from "./config.ts";
import { type Held, type RunHistory, runIdOf, taskLabel } from "./held.ts";
import { Secrets } from "./log.ts";
import { type MessagePlan, parseJsonBody } from "./message.ts";
import { type Outcome, type RunReader } from "./monitor.ts";
import { type Clock } from "./retry.ts";

const RUN_STATUSES = [
  "RUNNING",
  "RETRY",
  "SUCCESS",
  "FAILURE",
  "REJECTED",
  "REVOKED",
] as const;
type RunStatus = typeof RUN_STATUSES[number];

/** Writes waiting for the timer, in bytes of output and text: past it, new ones are dropped. */
const MAX_PENDING_BYTES = 16 * 1024 * 1024;
/** How often the waiting writes go to the database (fewer, larger batches cost the loop less). */
const FLUSH_MS = 1000;
/** Age pruning: how often, and how many runs a step (a long prune never holds the loop). */
const PRUNE_EVERY_MS = 10 * 60_000;
const PRUNE_STEP = 500;
/** Status changes kept per run (a message retried a thousand times keeps its last ones). */
const STATUSES_KEPT = 100;
/** A failing store is said at most once in this long (with how many writes failed). */
const FAILURE_LOG_MS = 60_000;
const LIST_LIMIT_MAX = 1000;

/** What the store reports, for the metrics (the Monitor implements it). */
export interface RunsReport {
  runsStored(runs: number, bytes: number): void;
  runWritesFailed(count: number): void;
}

interface AttemptRow {
  message_id: string;
  attempt: number;
  host: string;
  started_at: number;
  finished_at: number;
  exit_status: number | null;
  signal: string | null;
  error: string | null;
  stdout: string;
  stderr: string;
}

/** What one call asks the store to write, in order. */
interface OpAbout {
  id: string;
  taskId: boolean;
  fresh: boolean;
  messageId: string;
  task: string;
  sender: string | null;
  attempt: number;
  at: number;
}

type Op =
  | OpAbout & {
    kind: "start";
    id: string;
    messageId: string;
    task: string;
    sender: string | null;
    parameters: string | null;
    command: string;
    hosts: string[];
    attempt: number;
    at: number;
  }
  | OpAbout & {
    kind: "settle";
    id: string;
    messageId: string;
    task: string;
    sender: string | null;
    status: RunStatus;
    reason: string | null;
    attempt: number;
    at: number;
    attempts: AttemptRow[];
  };

const SCHEMA = `
  CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    task TEXT NOT NULL,
    status TEXT NOT NULL,
    sender TEXT,
    parameters TEXT,
    command TEXT,
    hosts TEXT NOT NULL,
    message_ids TEXT NOT NULL,
    statuses TEXT NOT NULL,
    reason TEXT,
    attempts INTEGER NOT NULL,
    started_at INTEGER NOT NULL,
    finished_at INTEGER,
    succeeded_at INTEGER
  );
  CREATE INDEX IF NOT EXISTS runs_started ON runs (started_at);
  CREATE TABLE IF NOT EXISTS attempts (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    message_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    host TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    finished_at INTEGER NOT NULL,
    exit_status INTEGER,
    signal TEXT,
    error TEXT,
    stdout TEXT NOT NULL,
    stderr TEXT NOT NULL
  );
  CREATE INDEX IF NOT EXISTS attempts_run ON attempts (run_id);
  PRAGMA user_version = 1;
`;

/**
 * The history of this worker's runs. `open` gives one, or why not; the
 * worker goes on without a history then (and says so).
 */
export class RunStore implements RunHistory, RunReader {
  private pending: Op[] = [];
  private pendingBytes = 0;
  private flushTimer?: ReturnType<typeof setTimeout>;
  private pruneTimer?: ReturnType<typeof setInterval>;
  /** Successes still waiting to be written: a duplicate is known before the write lands. */
  private readonly succeeding = new Map<string, number>();
  /** Messages whose start was recorded here: a release of one is its run's RETRY. */
  private readonly started = new WeakSet<Held>();
  private count: number;
  private failed = 0;
  private failedSinceLog = 0;
  private lastFailureLog = -Infinity;
  private closed = false;
  private readonly statements;

  private constructor(
    private readonly db: DatabaseSync,
    private readonly settings: RunsSettings,
    private readonly log: (line: string) => void,
    private readonly clock: Pick<Clock, "now">,
    private readonly report?: RunsReport,
  ) {
    this.statements = {
      get: db.prepare("SELECT * FROM runs WHERE id = ?"),
      // The newest run a queue message belonged to (send prints its message id).
      ofMessage: db.prepare(
        `SELECT runs.* FROM runs, json_each(runs.message_ids)
        WHERE json_each.value = ? ORDER BY runs.started_at DESC LIMIT 1`,
      ),
      remove: db.prepare("DELETE FROM runs WHERE id = ?"),
      succeeded: db.prepare(
        "SELECT succeeded_at FROM runs WHERE id = ? AND succeeded_at IS NOT NULL",
      ),
      upsert: db.prepare(`
        INSERT INTO runs (id, task, status, sender, parameters, command, hosts,
          message_ids, statuses, reason, attempts, started_at, finished_at,
          succeeded_at)
        VALUES (:id, :task, :status, :sender, :parameters, :command, :hosts,
          :message_ids, :statuses, :reason, :attempts, :started_at,
          :finished_at, :succeeded_at)
        ON CONFLICT (id) DO UPDATE SET task = excluded.task,
          status = excluded.status, sender = excluded.sender,
          parameters = excluded.parameters, command = excluded.command,
          hosts = excluded.hosts, message_ids = excluded.message_ids,
          statuses = excluded.statuses, reason = excluded.reason,
          attempts = excluded.attempts, finished_at = excluded.finished_at,
          succeeded_at = excluded.succeeded_at`),
      attempt: db.prepare(`
        INSERT INTO attempts (run_id, message_id, attempt, host, started_at,
          finished_at, exit_status, signal, error, stdout, stderr)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`),
      attemptsOf: db.prepare(
        "SELECT * FROM attempts WHERE run_id = ? ORDER BY seq",
      ),
      count: db.prepare("SELECT count(*) AS n FROM runs"),
      oldest: db.prepare(`DELETE FROM runs WHERE id IN
        (SELECT id FROM runs ORDER BY started_at, rowid LIMIT ?)`),
      older: db.prepare(`DELETE FROM runs WHERE id IN
        (SELECT id FROM runs WHERE started_at < ? ORDER BY started_at LIMIT ?)`),
      size: db.prepare(
        "SELECT page_count * page_size AS bytes FROM pragma_page_count(), pragma_page_size()",
      ),
    };
    this.count = Number(this.statements.count.get()!.n);
  }

  /** Opens (or creates, 0600) the database; its problem in words when it cannot. */
  static open(
    settings: RunsSettings,
    log: (line: string) => void,
    clock: Pick<Clock, "now">,
    report?: RunsReport,
  ): RunStore | { problem: string } {
    let db: DatabaseSync | undefined;
    try {
      if (settings.path !== ":memory:") createPrivately(settings.path);
      db = new DatabaseSync(settings.path);
      db.exec(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;",
      );
      db.exec(`BEGIN IMMEDIATE; ${SCHEMA} COMMIT;`);
      const store = new RunStore(db, settings, log, clock, report);
      store.prune(); // past the bounds since the last start (they may be lower now)
      store.pruneTimer = setInterval(() => store.prune(), PRUNE_EVERY_MS);
      store.reportSize();
      return store;
    } catch (e) {
      db?.close();
      return {
        problem: `cannot open the run history ${
          JSON.stringify(settings.path)
        } (${
          errorText(e)
        }): check that its folder is writable, or set TASK_RUNS_DB to another file (off: no history)`,
      };
    }
  }

  // -- what the worker tells it (RunHistory) -------------------------------

  /** A message's command starts on its hosts: its run is RUNNING. */
  startedRun(held: Held, plan: MessagePlan & { kind: "run" }): void {
    const about = this.about(held);
    this.started.add(held);
    const secrets = held.secrets ?? new Secrets([]);
    const parameters = parametersOf(held.message.body, plan.task, secrets);
    this.queue({
      kind: "start",
      ...about,
      parameters: parameters === undefined ? null : JSON.stringify(parameters),
      command: secrets.mask(plan.display),
      hosts: plan.hosts.map((h) => h.name),
    }, held.message.body.length);
  }

  /** A message settled (the Settler's outcome): its run's status, and this attempt's hosts. */
  settledRun(held: Held, outcome: Outcome, reason?: string): void {
    const status = statusOf(outcome, this.started.has(held));
    if (status === undefined) return;
    const mask = (text: string) => (held.secrets ?? new Secrets([])).mask(text);
    const attempts: AttemptRow[] = outcome === "not_run"
      ? [] // nothing ran: no attempt
      : (held.runs ?? []).map((run) => {
        const { result } = run;
        return {
          message_id: held.message.id,
          attempt: held.attempt,
          host: run.host.name,
          started_at: run.startedAt,
          finished_at: run.finishedAt,
          exit_status: result.kind === "exit" ? result.code : null,
          signal: result.kind === "signal" ? result.signal : null,
          error: result.kind === "ssh-error" || result.kind === "unreachable"
            ? mask(result.error)
            : result.kind === "timeout"
            ? "timed out"
            : result.kind === "aborted"
            ? "stopped by shutdown"
            : null,
          stdout: mask(run.stdout.toString()),
          stderr: mask(run.stderr.toString()),
        };
      });
    const op: Op = {
      kind: "settle",
      ...this.about(held),
      status,
      reason: reason === undefined
        ? null
        : outcome === "not_run"
        ? `not run: ${reason}`
        : reason,
      attempts,
    };
    if (status === "SUCCESS") this.succeeding.set(op.id, op.at);
    this.queue(
      op,
      attempts.reduce((n, a) => n + a.stdout.length + a.stderr.length, 0),
    );
  }

  /**
   * When the run of this message's Celery id succeeded, if it has (in this
   * worker's history). Only a Celery id says "the same task": a queue
   * message id is one message's only while its queue lasts.
   */
  succeededAt(held: Held): number | undefined {
    const runId = held.meta?.taskId;
    if (runId === undefined) return undefined;
    const waiting = this.succeeding.get(runId);
    if (waiting !== undefined) return waiting;
    try {
      const row = this.statements.succeeded.get(runId);
      return row === undefined ? undefined : Number(row.succeeded_at);
    } catch (e) {
      // Unreadable now: it runs (as it would without a history), said once.
      this.writeFailed(1, `cannot read it (${errorText(e)})`);
      return undefined;
    }
  }

  private about(held: Held) {
    return {
      id: runIdOf(held),
      /** The run id is the message's Celery id (else its queue message id). */
      taskId: held.meta?.taskId !== undefined,
      /** Its run begins here: its start, or an outcome with no start (a rejection). */
      fresh: !this.started.has(held),
      messageId: held.message.id,
      task: taskLabel(held),
      sender: held.meta?.sender ?? null,
      attempt: held.attempt,
      at: this.clock.now(),
    };
  }

  private queue(op: Op, bytes: number): void {
    if (this.closed) return;
    // One write larger than the bound alone (a fan-out to hundreds of hosts) still goes.
    if (
      this.pending.length > 0 && this.pendingBytes + bytes > MAX_PENDING_BYTES
    ) {
      this.writeFailed(
        1,
        `the store is behind (${this.pending.length} writes waiting): this one is dropped`,
      );
      return;
    }
    this.pending.push(op);
    this.pendingBytes += bytes;
    this.flushTimer ??= setTimeout(() => this.flush(), FLUSH_MS);
  }

  /** Writes what waits, in one transaction; a failure drops it, logged and counted. */
  flush(): void {
    if (this.flushTimer !== undefined) clearTimeout(this.flushTimer);
    this.flushTimer = undefined;
    const ops = this.pending;
    if (ops.length === 0) return;
    this.pending = [];
    this.pendingBytes = 0;
    try {
      this.db.exec("BEGIN IMMEDIATE");
      try {
        this.writeAll(ops);
        // The newest are in: the oldest past TASK_RUNS_MAX go in the same transaction.
        if (this.count > this.settings.max) {
          this.statements.oldest.run(this.count - this.settings.max);
          this.count = this.settings.max;
        }
        this.db.exec("COMMIT");
      } catch (e) {
        // SQLite may have rolled back already (it does on a full disk).
        if (this.db.isTransaction) this.db.exec("ROLLBACK");
        this.count = Number(this.statements.count.get()!.n);
        throw e;
      }
    } catch (e) {
      this.writeFailed(ops.length, errorText(e));
    } finally {
      for (const op of ops) {
        if (op.kind === "settle" && op.status === "SUCCESS") {
          this.succeeding.delete(op.id);
        }
      }
    }
    this.reportSize();
  }

  /**
   * Writes a batch: each run read once, its ops applied in order, written
   * once (a start and its outcome in one batch cost one row's write).
   */
  private writeAll(ops: Op[]): void {
    const batch = new Map<
      string,
      {
        run?: StoredRun;
        stored: boolean;
        replace: boolean;
        attempts: AttemptRow[];
      }
    >();
    for (const op of ops) {
      let entry = batch.get(op.id);
      if (entry === undefined) {
        const row = this.statements.get.get(op.id);
        entry = {
          run: row === undefined ? undefined : runRow(row),
          stored: row !== undefined,
          replace: false,
          attempts: [],
        };
        batch.set(op.id, entry);
      }
      if (
        entry.run !== undefined && op.fresh && !op.taskId &&
        entry.run.finished_at !== null
      ) {
        // A message id names one message only while its queue lasts (a new
        // embedded queue counts from 1 again): a finished run's id on a new
        // message is a new run, and the old record gives way.
        entry.replace = entry.stored;
        entry.run = undefined;
        entry.attempts = [];
      }
      entry.run = merged(entry.run, op);
      if (op.kind === "settle") entry.attempts.push(...op.attempts);
    }
    for (const [id, entry] of batch) {
      const run = entry.run!;
      if (entry.replace) {
        this.statements.remove.run(id);
        this.count--;
      }
      if (!entry.stored || entry.replace) this.count++;
      this.statements.upsert.run({
        id,
        task: run.task,
        status: run.status,
        sender: run.sender,
        parameters: run.parameters,
        command: run.command,
        hosts: JSON.stringify(run.hosts),
        message_ids: JSON.stringify(run.message_ids),
        statuses: JSON.stringify(run.statuses.slice(-STATUSES_KEPT)),
        reason: run.reason,
        attempts: run.attempts,
        started_at: run.started_at,
        finished_at: run.finished_at,
        succeeded_at: run.succeeded_at,
      });
      for (const a of entry.attempts) {
        this.statements.attempt.run(
          id,
          a.message_id,
          a.attempt,
          a.host,
          a.started_at,
          a.finished_at,
          a.exit_status,
          a.signal,
          a.error,
          a.stdout,
          a.stderr,
        );
      }
    }
  }

  /** Runs past TASK_RUNS_KEEP_DAYS or TASK_RUNS_MAX, oldest first, a step at a time. */
  prune(): void {
    if (this.closed) return;
    try {
      const before = this.clock.now() - this.settings.keepDays * 86_400_000;
      const aged = Number(
        this.statements.older.run(before, PRUNE_STEP).changes,
      );
      const over = Math.min(PRUNE_STEP, this.count - this.settings.max);
      if (over > 0) this.statements.oldest.run(over);
      this.count = Number(this.statements.count.get()!.n);
      // More to go: the next step after other work had its turn.
      if (aged === PRUNE_STEP || over === PRUNE_STEP) {
        setTimeout(() => this.prune(), 0);
      }
    } catch (e) {
      this.writeFailed(1, `pruning: ${errorText(e)}`);
    }
    this.reportSize();
  }

  private writeFailed(count: number, why: string): void {
    this.failed += count;
    this.failedSinceLog += count;
    this.report?.runWritesFailed(count);
    const now = this.clock.now();
    if (now - this.lastFailureLog < FAILURE_LOG_MS) return;
    this.lastFailureLog = now;
    this.log(
      `run history ${this.settings.path}: ${this.failedSinceLog} write(s) failed: ${why}; the worker goes on without recording them (free disk space, or check what else uses the file)`,
    );
    this.failedSinceLog = 0;
  }

  private reportSize(): void {
    if (this.report === undefined) return;
    try {
      const bytes = Number(this.statements.size.get()!.bytes);
      this.report.runsStored(this.count, bytes);
    } catch {
      // the size is for the metrics only
    }
  }

  /** Writes what waits and closes the database. */
  close(): void {
    if (this.closed) return;
    this.flush();
    this.closed = true;
    clearInterval(this.pruneTimer);
    this.db.close();
  }

  // -- reading (RunReader, for the listener) -------------------------------

  /** Runs newest first, filtered by `?task=&host=&status=&since=&q=&limit=`; or what is wrong. */
  list(params: URLSearchParams): { runs: RunView[] } | { error: string } {
    const filter = runFilter(params, this.clock.now());
    if ("error" in filter) return filter;
    const where: string[] = [];
    const values: (string | number)[] = [];
    if (filter.task !== undefined) {
      where.push("task = ?");
      values.push(filter.task);
    }
    if (filter.status !== undefined) {
      where.push("status = ?");
      values.push(filter.status);
    }
    if (filter.since !== undefined) {
      where.push("started_at >= ?");
      values.push(filter.since);
    }
    if (filter.host !== undefined) {
      where.push(
        "EXISTS (SELECT 1 FROM json_each(runs.hosts) WHERE value = ?)",
      );
      values.push(filter.host);
    }
    if (filter.q !== undefined) {
      where.push(`EXISTS (SELECT 1 FROM attempts a WHERE a.run_id = runs.id AND
        (instr(a.stdout, ?) > 0 OR instr(a.stderr, ?) > 0))`);
      values.push(filter.q, filter.q);
    }
    const sql = `SELECT * FROM runs ${
      where.length === 0 ? "" : `WHERE ${where.join(" AND ")}`
    } ORDER BY started_at DESC, rowid DESC LIMIT ?`;
    const rows = this.db.prepare(sql).all(...values, filter.limit);
    return { runs: rows.map((row) => runView(runRow(row))) };
  }

  /**
   * The whole record of one run: every attempt with each host's output. `id`
   * is the run's id, or one of its queue message ids.
   */
  get(id: string): RunRecordView | undefined {
    const row = this.statements.get.get(id) ??
      this.statements.ofMessage.get(id);
    if (row === undefined) return undefined;
    const hostRuns = this.statements.attemptsOf.all(String(row.id)).map((a) => {
      const started = Number(a.started_at);
      const finished = Number(a.finished_at);
      return {
        message_id: String(a.message_id),
        attempt: Number(a.attempt),
        host: String(a.host),
        started_at: iso(started),
        finished_at: iso(finished),
        duration_ms: finished - started,
        exit_status: a.exit_status === null ? null : Number(a.exit_status),
        signal: a.signal === null ? null : String(a.signal),
        error: a.error === null ? null : String(a.error),
        stdout: String(a.stdout),
        stderr: String(a.stderr),
      };
    });
    const run = runRow(row);
    return {
      ...runView(run),
      parameters: run.parameters === null ? null : JSON.parse(run.parameters),
      command: run.command,
      statuses: run.statuses.map((s) => ({ ...s, at: iso(s.at) })),
      host_runs: hostRuns,
    };
  }
}

/** A run as listed. */
interface RunView {
  id: string;
  task: string;
  status: string;
  sender: string | null;
  hosts: string[];
  message_ids: string[];
  attempts: number;
  reason: string | null;
  started_at: string;
  finished_at: string | null;
  duration_ms: number | null;
}

/** A run's whole record: each host's run of each attempt, in order, with its output. */
interface RunRecordView extends RunView {
  parameters: unknown;
  command: string | null;
  statuses: { status: string; at: string; reason?: string }[];
  host_runs: {
    message_id: string;
    attempt: number;
    host: string;
    started_at: string;
    finished_at: string;
    duration_ms: number;
    exit_status: number | null;
    signal: string | null;
    error: string | null;
    stdout: string;
    stderr: string;
  }[];
}

interface StoredRun {
  id: string;
  task: string;
  status: string;
  sender: string | null;
  /** As JSON: parsed only for a record read whole. */
  parameters: string | null;
  command: string | null;
  hosts: string[];
  message_ids: string[];
  statuses: { status: string; at: number; reason?: string }[];
  reason: string | null;
  attempts: number;
  started_at: number;
  finished_at: number | null;
  succeeded_at: number | null;
}

function runRow(row: Record<string, SQLOutputValue>): StoredRun {
  const text = (v: SQLOutputValue) => v === null ? null : String(v);
  return {
    id: String(row.id),
    task: String(row.task),
    status: String(row.status),
    sender: text(row.sender),
    parameters: text(row.parameters),
    command: text(row.command),
    hosts: JSON.parse(String(row.hosts)),
    message_ids: JSON.parse(String(row.message_ids)),
    statuses: JSON.parse(String(row.statuses)),
    reason: text(row.reason),
    attempts: Number(row.attempts),
    started_at: Number(row.started_at),
    finished_at: row.finished_at === null ? null : Number(row.finished_at),
    succeeded_at: row.succeeded_at === null ? null : Number(row.succeeded_at),
  };
}

/** A run as it is after `op`: its status and times, message ids and hosts. */
function merged(had: StoredRun | undefined, op: Op): StoredRun {
  const status: RunStatus = op.kind === "start" ? "RUNNING" : op.status;
  const reason = op.kind === "settle" ? op.reason : null;
  const final = status !== "RUNNING" && status !== "RETRY";
  const messageIds = had?.message_ids ?? [];
  if (!messageIds.includes(op.messageId)) messageIds.push(op.messageId);
  const hosts = new Set(had?.hosts ?? []);
  if (op.kind === "start") op.hosts.forEach((h) => hosts.add(h));
  else op.attempts.forEach((a) => hosts.add(a.host));
  return {
    id: op.id,
    task: op.task,
    status,
    sender: op.sender ?? had?.sender ?? null,
    parameters: op.kind === "start" ? op.parameters : had?.parameters ?? null,
    command: op.kind === "start" ? op.command : had?.command ?? null,
    hosts: [...hosts],
    message_ids: messageIds,
    statuses: [
      ...had?.statuses ?? [],
      reason === null ? { status, at: op.at } : { status, at: op.at, reason },
    ],
    reason: reason ?? (final ? null : had?.reason ?? null),
    attempts: Math.max(had?.attempts ?? 0, op.attempt),
    started_at: had?.started_at ?? op.at,
    finished_at: final ? op.at : null,
    succeeded_at: status === "SUCCESS" ? op.at : had?.succeeded_at ?? null,
  };
}

function runView(run: StoredRun): RunView {
  return {
    id: run.id,
    task: run.task,
    status: run.status,
    sender: run.sender,
    hosts: run.hosts,
    message_ids: run.message_ids,
    attempts: run.attempts,
    reason: run.reason,
    started_at: iso(run.started_at),
    finished_at: run.finished_at === null ? null : iso(run.finished_at),
    duration_ms: run.finished_at === null
      ? null
      : run.finished_at - run.started_at,
  };
}

function iso(ms: number): string {
  return new Date(ms).toISOString();
}

/** The run status a Settler outcome gives; undefined: nothing to record. */
function statusOf(outcome: Outcome, started: boolean): RunStatus | undefined {
  switch (outcome) {
    case "success":
      return "SUCCESS";
    case "failure":
      return "FAILURE";
    case "rejected":
      return "REJECTED";
    case "revoked":
      return "REVOKED";
    case "retry":
      return "RETRY";
    case "not_run":
      // Started here and stopped (a shutdown, SSH down): it runs again later.
      // One held back for its eta never started: no run yet.
      return started ? "RETRY" : undefined;
    case "duplicate":
      return undefined; // its run's SUCCESS stands
  }
}

interface RunFilter {
  task?: string;
  host?: string;
  status?: RunStatus;
  since?: number;
  q?: string;
  limit: number;
}

/** `?task=&host=&status=&since=&q=&limit=` read, or what is wrong with it. */
function runFilter(
  params: URLSearchParams,
  nowMs: number,
): RunFilter | { error: string } {
  const value = (name: string) => {
    const v = params.get(name);
    return v === null || v === "" ? undefined : v;
  };
  const filter: RunFilter = {
    task: value("task"),
    host: value("host"),
    q: value("q"),
    limit: 100,
  };
  const status = value("status")?.toUpperCase();
  if (status !== undefined) {
    if (!(RUN_STATUSES as readonly string[]).includes(status)) {
      return {
        error: `status=${status}: must be one of ${RUN_STATUSES.join(", ")}`,
      };
    }
    filter.status = status as RunStatus;
  }
  const since = value("since");
  if (since !== undefined) {
    const at = sinceMs(since, nowMs);
    if (at === undefined) {
      return {
        error:
          `since=${since}: give a duration back from now (30s, 15m, 2h, 7d) or an ISO 8601 time`,
      };
    }
    filter.since = at;
  }
  const limit = value("limit");
  if (limit !== undefined) {
    const n = Number(limit);
    if (!Number.isInteger(n) || n < 1 || n > LIST_LIMIT_MAX) {
      return {
        error:
          `limit=${limit}: must be a whole number from 1 to ${LIST_LIMIT_MAX}`,
      };
    }
    filter.limit = n;
  }
  return filter;
}

/** `2h` back from now, or an ISO time, in ms; undefined when it is neither. */
export function sinceMs(text: string, nowMs: number): number | undefined {
  const span = /^(\d+(?:\.\d+)?)\s*(s|m|h|d)$/.exec(text.trim());
  if (span) {
    const unit = { s: 1_000, m: 60_000, h: 3_600_000, d: 86_400_000 }[
      span[2] as "s" | "m" | "h" | "d"
    ];
    return nowMs - Number(span[1]) * unit;
  }
  const at = Date.parse(text);
  return Number.isNaN(at) ? undefined : at;
}

/**
 * A message's parameters for its record: a task's by name (secret ones
 * [redacted]), or TASK_COMMAND's args; every text masked. Undefined for a
 * body that is no JSON object (plain text runs with no parameters).
 */
function parametersOf(
  body: string,
  task: TaskSpec | undefined,
  secrets: Secrets,
): Record<string, unknown> | undefined {
  const parsed = parseJsonBody(body);
  if (parsed === undefined || !("object" in parsed)) return undefined;
  const { object } = parsed;
  const args = Array.isArray(object.args) ? object.args : [];
  const kwargs = isRecord(object.kwargs) ? object.kwargs : {};
  const masked = (value: unknown): unknown =>
    typeof value === "string" ? secrets.mask(value) : value;
  if (task === undefined) return { args: args.map(masked) };
  const named: Record<string, unknown> = {};
  args.forEach((value, i) => {
    const name = task.params[i]?.name ?? String(i);
    named[name] = value;
  });
  Object.assign(named, kwargs);
  const secret = new Set(
    task.params.filter((p) => p.secret).map((p) => p.name),
  );
  for (const name of Object.keys(named)) {
    named[name] = secret.has(name) ? "[redacted]" : masked(named[name]);
  }
  return named;
}
