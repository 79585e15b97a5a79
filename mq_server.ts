/**
 * An embedded queue server that speaks IronMQ's v3 REST API, so the worker can run
 * and be tested without an Iron.io account. Messages live in SQLite (node:sqlite).
 *
 * Embedded: `startQueueServer({ port: 0, dbPath: ":memory:" })`, then `close()`.
 * Standalone: `deno task mq`, configured by MQ_HOST, MQ_PORT, MQ_DB and MQ_TOKEN.
 * Both serve Prometheus metrics at `GET /metrics`.
 */
import { DatabaseSync, type SQLOutputValue } from "node:sqlite";
import { createHash, timingSafeEqual } from "node:crypto";
import { collectDefaultMetrics, Counter, Gauge, Registry } from "prom-client";

// ---------------------------------------------------------------------------
// Options, public types and limits

export interface QueueServerOptions {
  /** Address to listen on; default "127.0.0.1". Non-loopback needs a token. */
  hostname?: string;
  /** Port to listen on; default 8080; 0 picks a free port. */
  port?: number;
  /** SQLite file; ":memory:" keeps everything in memory. Default "ironmq.sqlite". */
  dbPath?: string;
  /**
   * When set, every request needs `Authorization: OAuth <token>`; /metrics also
   * takes `Authorization: Bearer <token>`, which is what Prometheus sends.
   */
  token?: string;
  /** Sink for one-line events (listening, internal errors); default: none. */
  log?: (line: string) => void;
  /** Clock in milliseconds since the epoch; tests inject one to move time. */
  now?: () => number;
}

export interface QueueServer {
  readonly hostname: string;
  readonly port: number;
  readonly url: string;
  /** Stops listening, ends pending long-polls, closes the database. */
  close(): Promise<void>;
}

const DEFAULT_HOSTNAME = "127.0.0.1";
const DEFAULT_PORT = 8080;
const DEFAULT_DB_PATH = "ironmq.sqlite";

const MAX_REQUEST_BYTES = 256 * 1024;
const MAX_BATCH = 100;
const MAX_QUEUES_PAGE = 100;
const DEFAULT_QUEUES_PAGE = 30;
const MIN_TIMEOUT_S = 30;
const MAX_TIMEOUT_S = 86_400;
const MAX_WAIT_S = 30;
const MAX_DELAY_S = 604_800;
const MIN_EXPIRATION_S = 60;
const MAX_EXPIRATION_S = 2_592_000;
const DEFAULT_MESSAGE_TIMEOUT_S = 60;
const DEFAULT_MESSAGE_EXPIRATION_S = 604_800;
const DEFAULT_MAX_RESERVATIONS = 10;
const MAX_MAX_RESERVATIONS = 1000;
const MAX_NAME_LENGTH = 255;

/** A failure the client caused or can act on: answered as `{"msg": message}`. */
class ApiError extends Error {
  constructor(readonly status: number, message: string) {
    super(message);
  }
}

/** The client closed the connection before its request arrived whole. */
class ClientGone extends Error {}

const queueNotFound = () => new ApiError(404, "Queue not found");
const messageNotFound = () => new ApiError(404, "Message not found");
const badRequest = (message: string) => new ApiError(400, message);

function asError(error: unknown): Error {
  return error instanceof Error ? error : new Error(String(error));
}

// ---------------------------------------------------------------------------
// Storage: queues and messages in SQLite

interface QueueRef {
  project: string;
  name: string;
}

interface DeadLetter {
  queue_name: string;
  max_reservations: number;
}

interface QueueRow {
  id: number;
  project: string;
  name: string;
  message_timeout: number;
  message_expiration: number;
  dead_letter?: DeadLetter;
  total_messages: number;
}

/** Fields a create or update may set; `dead_letter.queue_name: ""` removes it. */
interface QueueSettings {
  message_timeout?: number;
  message_expiration?: number;
  dead_letter?: { queue_name: string; max_reservations?: number };
}

interface NewMessage {
  body: string;
  delaySeconds: number;
}

interface MessageView {
  id: string;
  body: string;
  reserved_count: number;
}

interface ReservedMessage extends MessageView {
  reservation_id: string;
}

interface ReserveRequest {
  n: number;
  timeoutSeconds?: number;
  deleteOnReserve: boolean;
}

interface QueueCounts extends QueueRef {
  ready: number;
  delayed: number;
  reserved: number;
}

interface MessageTarget {
  id: string;
  reservationId?: string;
}

/** Where a message is in its life; the SQL below spells these as 0, 1 and 2. */
const State = { ready: 0, delayed: 1, reserved: 2 } as const;

interface MessageRow {
  id: number;
  body: string;
  state: number;
  available_at: number;
  reserved_count: number;
  reservation_id: string | null;
}

// Delayed and reserved messages (state > 0) are pending until `available_at`; the
// next reserve or peek makes them ready. `front` = 1 marks messages that timed out
// or were released: they are served before the rest.
const SCHEMA = `
  CREATE TABLE IF NOT EXISTS queues (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    project TEXT NOT NULL,
    name TEXT NOT NULL,
    message_timeout INTEGER NOT NULL,
    message_expiration INTEGER NOT NULL,
    dead_letter_queue TEXT,
    dead_letter_max_reservations INTEGER,
    total_messages INTEGER NOT NULL DEFAULT 0,
    UNIQUE (project, name)
  );
  CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue_id INTEGER NOT NULL,
    body TEXT NOT NULL,
    state INTEGER NOT NULL,
    front INTEGER NOT NULL DEFAULT 0,
    available_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    reserved_count INTEGER NOT NULL DEFAULT 0,
    reservation_id TEXT
  );
  CREATE INDEX IF NOT EXISTS messages_in_order
    ON messages (queue_id, state, front DESC, id);
  CREATE INDEX IF NOT EXISTS messages_pending
    ON messages (queue_id, available_at) WHERE state > 0;
  CREATE INDEX IF NOT EXISTS messages_expiry ON messages (expires_at);
  PRAGMA user_version = 1;
`;

const QUEUE_COLUMNS = `id, project, name, message_timeout, message_expiration,
  dead_letter_queue, dead_letter_max_reservations, total_messages`;
const MESSAGE_COLUMNS =
  "id, body, state, available_at, reserved_count, reservation_id";

function openDatabase(path: string): DatabaseSync {
  let db: DatabaseSync | undefined;
  try {
    if (path !== ":memory:") createPrivately(path);
    db = new DatabaseSync(path);
    if (path !== ":memory:") {
      // Exclusive locking keeps a second server off the same file.
      db.exec("PRAGMA locking_mode = EXCLUSIVE; PRAGMA journal_mode = WAL;");
    }
    db.exec("PRAGMA synchronous = NORMAL;");
    db.exec(`BEGIN EXCLUSIVE; ${SCHEMA} COMMIT;`);
    return db;
  } catch (error) {
    db?.close();
    throw new Error(
      `Cannot open the queue database ${JSON.stringify(path)}: ${
        errorText(error)
      }. Check the path is writable and that no other mq_server uses it.`,
    );
  }
}

/**
 * Creates the database file 0600 whatever the umask: it holds message bodies.
 * SQLite gives the -wal, -shm and -journal files the database file's mode.
 */
function createPrivately(path: string): void {
  try {
    Deno.openSync(path, { createNew: true, write: true, mode: 0o600 }).close();
  } catch (error) {
    if (!(error instanceof Deno.errors.AlreadyExists)) throw error;
  }
}

function prepareStatements(db: DatabaseSync) {
  return {
    begin: db.prepare("BEGIN"),
    commit: db.prepare("COMMIT"),
    rollback: db.prepare("ROLLBACK"),
    queueByName: db.prepare(
      `SELECT ${QUEUE_COLUMNS} FROM queues WHERE project = ? AND name = ?`,
    ),
    insertQueue: db.prepare(
      `INSERT INTO queues (project, name, message_timeout, message_expiration,
         dead_letter_queue, dead_letter_max_reservations) VALUES (?, ?, ?, ?, ?, ?)`,
    ),
    updateQueue: db.prepare(
      `UPDATE queues SET message_timeout = ?, message_expiration = ?,
         dead_letter_queue = ?, dead_letter_max_reservations = ? WHERE id = ?`,
    ),
    addTotal: db.prepare(
      "UPDATE queues SET total_messages = total_messages + ? WHERE id = ?",
    ),
    deleteQueue: db.prepare("DELETE FROM queues WHERE id = ?"),
    listQueues: db.prepare(
      `SELECT name FROM queues WHERE project = ? AND name > ?
         AND substr(name, 1, length(?)) = ? ORDER BY name LIMIT ?`,
    ),
    countMessages: db.prepare(
      "SELECT count(*) AS size FROM messages WHERE queue_id = ?",
    ),
    insertMessage: db.prepare(
      `INSERT INTO messages (queue_id, body, state, available_at, expires_at)
         VALUES (?, ?, ?, ?, ?)`,
    ),
    messageById: db.prepare(
      `SELECT ${MESSAGE_COLUMNS} FROM messages WHERE id = ? AND queue_id = ?`,
    ),
    readyMessages: db.prepare(
      `SELECT ${MESSAGE_COLUMNS} FROM messages WHERE queue_id = ? AND state = 0
         ORDER BY front DESC, id LIMIT ?`,
    ),
    promoteDue: db.prepare(
      `UPDATE messages SET state = 0, front = max(front, state = 2)
         WHERE queue_id = ? AND state > 0 AND available_at <= ?`,
    ),
    // Without INDEXED BY the planner scans every pending row of the queue.
    nextAvailableAt: db.prepare(
      `SELECT min(available_at) AS at FROM messages INDEXED BY messages_pending
         WHERE queue_id = ? AND state > 0`,
    ),
    markReserved: db.prepare(
      `UPDATE messages SET state = 2, available_at = ?, reservation_id = ?,
         reserved_count = reserved_count + 1 WHERE id = ?`,
    ),
    moveMessage: db.prepare(
      `UPDATE messages SET queue_id = ?, state = 0, front = 0, available_at = ?,
         expires_at = ?, reservation_id = NULL WHERE id = ?`,
    ),
    putBack: db.prepare(
      `UPDATE messages SET state = ?, front = 1, available_at = ?,
         reservation_id = NULL WHERE id = ?`,
    ),
    deleteMessage: db.prepare("DELETE FROM messages WHERE id = ?"),
    clearQueue: db.prepare("DELETE FROM messages WHERE queue_id = ?"),
    deleteExpired: db.prepare("DELETE FROM messages WHERE expires_at <= ?"),
    earliestExpiry: db.prepare(
      "SELECT min(expires_at) AS at FROM messages",
    ),
    // ?1 is now: what a reserve or peek would see, without promoting or purging.
    countByState: db.prepare(
      `SELECT q.project, q.name,
         count(CASE WHEN m.state = 0 OR m.available_at <= ?1 THEN 1 END) AS ready,
         count(CASE WHEN m.state = 1 AND m.available_at > ?1 THEN 1 END) AS delayed,
         count(CASE WHEN m.state = 2 AND m.available_at > ?1 THEN 1 END) AS reserved
       FROM queues q LEFT JOIN messages m ON m.queue_id = q.id AND m.expires_at > ?1
       GROUP BY q.id ORDER BY q.project, q.name`,
    ),
  };
}

function queueFromRow(row: Record<string, SQLOutputValue>): QueueRow {
  const queue: QueueRow = {
    id: Number(row.id),
    project: String(row.project),
    name: String(row.name),
    message_timeout: Number(row.message_timeout),
    message_expiration: Number(row.message_expiration),
    total_messages: Number(row.total_messages),
  };
  if (typeof row.dead_letter_queue === "string") {
    queue.dead_letter = {
      queue_name: row.dead_letter_queue,
      max_reservations: Number(row.dead_letter_max_reservations),
    };
  }
  return queue;
}

function messageFromRow(row: Record<string, SQLOutputValue>): MessageRow {
  return {
    id: Number(row.id),
    body: String(row.body),
    state: Number(row.state),
    available_at: Number(row.available_at),
    reserved_count: Number(row.reserved_count),
    reservation_id: typeof row.reservation_id === "string"
      ? row.reservation_id
      : null,
  };
}

function messageView(row: MessageRow): MessageView {
  return {
    id: String(row.id),
    body: row.body,
    reserved_count: row.reserved_count,
  };
}

function newReservationId(): string {
  return crypto.randomUUID().replaceAll("-", "");
}

function isReservedAt(row: MessageRow, now: number): boolean {
  return row.state === State.reserved && row.available_at > now;
}

/** Throws 403 unless `given` is the message's live reservation. */
function requireLiveReservation(
  row: MessageRow,
  given: string,
  now: number,
): void {
  if (row.reservation_id !== given) {
    throw new ApiError(
      403,
      "Wrong reservation_id: the message is not reserved under it " +
        "(the reservation may have timed out and the message been reserved again)",
    );
  }
  if (!isReservedAt(row, now)) {
    throw new ApiError(403, "Reservation timed out");
  }
}

/** A delete needs the live reservation of a reserved message, and nothing otherwise. */
function checkDeletable(
  row: MessageRow,
  given: string | undefined,
  now: number,
): void {
  if (given !== undefined) return requireLiveReservation(row, given, now);
  if (isReservedAt(row, now)) {
    throw new ApiError(
      403,
      "Message is reserved: pass its reservation_id to delete it",
    );
  }
}

function parseMessageId(id: string): number | undefined {
  return /^\d{1,15}$/.test(id) ? Number(id) : undefined;
}

/**
 * All queue state. Every operation is one SQLite transaction; after it commits,
 * `onChange` hears of each queue whose messages changed, to wake long-polls.
 */
class QueueStore {
  readonly #db: DatabaseSync;
  readonly #sql: ReturnType<typeof prepareStatements>;
  readonly #now: () => number;
  readonly #onChange: (ref: QueueRef) => void;
  readonly #changed = new Map<string, QueueRef>();
  #earliestExpiry: number;

  constructor(
    path: string,
    now: () => number,
    onChange: (ref: QueueRef) => void,
  ) {
    this.#db = openDatabase(path);
    this.#sql = prepareStatements(this.#db);
    this.#now = now;
    this.#onChange = onChange;
    this.#earliestExpiry = this.#readEarliestExpiry();
  }

  close(): void {
    this.#db.close();
  }

  // Queues

  putQueue(ref: QueueRef, settings: QueueSettings): QueueRow {
    return this.#transaction(() => {
      if (!this.#findQueue(ref)) this.#createQueue(ref);
      return this.#applySettings(ref, settings);
    });
  }

  updateQueue(ref: QueueRef, settings: QueueSettings): QueueRow {
    return this.#transaction(() => {
      this.#queue(ref);
      return this.#applySettings(ref, settings);
    });
  }

  queueInfo(ref: QueueRef): { queue: QueueRow; size: number } {
    return this.#transaction(() => {
      const queue = this.#queue(ref);
      const row = this.#sql.countMessages.get(queue.id);
      return { queue, size: Number(row?.size ?? 0) };
    });
  }

  listQueues(
    project: string,
    page: { perPage: number; previous: string; prefix: string },
  ): string[] {
    const rows = this.#sql.listQueues.all(
      project,
      page.previous,
      page.prefix,
      page.prefix,
      page.perPage,
    );
    return rows.map((row) => String(row.name));
  }

  deleteQueue(ref: QueueRef): void {
    this.#transaction(() => {
      const queue = this.#queue(ref);
      this.#sql.clearQueue.run(queue.id);
      this.#sql.deleteQueue.run(queue.id);
      this.#markChanged(ref);
    });
  }

  // Messages

  post(ref: QueueRef, messages: NewMessage[]): string[] {
    return this.#transaction((now) => {
      const queue = this.#findQueue(ref) ?? this.#createQueue(ref);
      const expiresAt = now + queue.message_expiration * 1000;
      const ids = messages.map(({ body, delaySeconds }) => {
        const state = delaySeconds > 0 ? State.delayed : State.ready;
        const availableAt = now + delaySeconds * 1000;
        const { lastInsertRowid } = this.#sql.insertMessage.run(
          queue.id,
          body,
          state,
          availableAt,
          expiresAt,
        );
        return String(lastInsertRowid);
      });
      this.#sql.addTotal.run(messages.length, queue.id);
      this.#earliestExpiry = Math.min(this.#earliestExpiry, expiresAt);
      this.#markChanged(ref);
      return ids;
    });
  }

  reserve(ref: QueueRef, request: ReserveRequest): ReservedMessage[] {
    return this.#transaction((now) => {
      const queue = this.#queue(ref);
      this.#sql.promoteDue.run(queue.id, now);
      const timeoutS = request.timeoutSeconds ?? queue.message_timeout;
      const reserved: ReservedMessage[] = [];
      while (reserved.length < request.n) {
        const candidates = this.#sql.readyMessages
          .all(queue.id, request.n - reserved.length)
          .map(messageFromRow);
        if (candidates.length === 0) break;
        for (const row of candidates) {
          const deadLetter = queue.dead_letter;
          if (deadLetter && row.reserved_count >= deadLetter.max_reservations) {
            this.#moveToDeadLetter(queue.project, deadLetter, row.id, now);
          } else {
            reserved.push(
              this.#reserveOne(row, now + timeoutS * 1000, request),
            );
          }
        }
      }
      if (reserved.length > 0) this.#markChanged(ref);
      return reserved;
    });
  }

  getMessage(ref: QueueRef, id: string): MessageView {
    return this.#transaction(() => messageView(this.#message(ref, id).row));
  }

  peek(ref: QueueRef, n: number): MessageView[] {
    return this.#transaction((now) => {
      const queue = this.#queue(ref);
      this.#sql.promoteDue.run(queue.id, now);
      return this.#sql.readyMessages.all(queue.id, n).map((row) =>
        messageView(messageFromRow(row))
      );
    });
  }

  deleteMessages(ref: QueueRef, targets: MessageTarget[]): void {
    this.#transaction((now) => {
      const queue = this.#queue(ref);
      for (const target of targets) {
        const row = this.#messageInQueue(queue, target.id);
        checkDeletable(row, target.reservationId, now);
        this.#sql.deleteMessage.run(row.id);
      }
    });
  }

  clear(ref: QueueRef): void {
    this.#transaction(() => {
      this.#sql.clearQueue.run(this.#queue(ref).id);
    });
  }

  touch(
    ref: QueueRef,
    target: Required<MessageTarget>,
    timeoutSeconds: number | undefined,
  ): string {
    return this.#transaction((now) => {
      const { queue, row } = this.#message(ref, target.id);
      requireLiveReservation(row, target.reservationId, now);
      const reservationId = newReservationId();
      const timeoutS = timeoutSeconds ?? queue.message_timeout;
      this.#sql.markReserved.run(now + timeoutS * 1000, reservationId, row.id);
      this.#markChanged(ref);
      return reservationId;
    });
  }

  release(
    ref: QueueRef,
    target: Required<MessageTarget>,
    delaySeconds: number,
  ): void {
    this.#transaction((now) => {
      const { row } = this.#message(ref, target.id);
      requireLiveReservation(row, target.reservationId, now);
      const state = delaySeconds > 0 ? State.delayed : State.ready;
      this.#sql.putBack.run(state, now + delaySeconds * 1000, row.id);
      this.#markChanged(ref);
    });
  }

  /**
   * Every queue's messages by state, as the API would answer now: a due delayed
   * message or a timed-out reservation is ready, an expired message is gone.
   */
  messageCounts(): QueueCounts[] {
    return this.#sql.countByState.all(this.#now()).map((row) => ({
      project: String(row.project),
      name: String(row.name),
      ready: Number(row.ready),
      delayed: Number(row.delayed),
      reserved: Number(row.reserved),
    }));
  }

  /** When the queue's next delayed or reserved message becomes available, if any. */
  nextAvailableAt(ref: QueueRef): number | undefined {
    const queue = this.#findQueue(ref);
    if (!queue) return undefined;
    const at = this.#sql.nextAvailableAt.get(queue.id)?.at;
    return at === null || at === undefined ? undefined : Number(at);
  }

  // Helpers, each inside a transaction

  #transaction<T>(work: (now: number) => T): T {
    const now = this.#now();
    this.#sql.begin.run();
    let result: T;
    try {
      this.#purgeExpired(now);
      result = work(now);
      this.#sql.commit.run();
    } catch (error) {
      // SQLite may have rolled back already (it does on a full disk); a
      // ROLLBACK then fails, and its error would hide the one that matters.
      if (this.#db.isTransaction) this.#sql.rollback.run();
      this.#changed.clear();
      throw error;
    }
    const changed = [...this.#changed.values()];
    this.#changed.clear();
    for (const ref of changed) this.#onChange(ref);
    return result;
  }

  #markChanged(ref: QueueRef): void {
    this.#changed.set(queueKey(ref), ref);
  }

  #purgeExpired(now: number): void {
    if (now < this.#earliestExpiry) return;
    this.#sql.deleteExpired.run(now);
    this.#earliestExpiry = this.#readEarliestExpiry();
  }

  #readEarliestExpiry(): number {
    const at = this.#sql.earliestExpiry.get()?.at;
    return at === null || at === undefined ? Infinity : Number(at);
  }

  #findQueue(ref: QueueRef): QueueRow | undefined {
    const row = this.#sql.queueByName.get(ref.project, ref.name);
    return row ? queueFromRow(row) : undefined;
  }

  #queue(ref: QueueRef): QueueRow {
    const queue = this.#findQueue(ref);
    if (!queue) throw queueNotFound();
    return queue;
  }

  #createQueue(ref: QueueRef): QueueRow {
    this.#sql.insertQueue.run(
      ref.project,
      ref.name,
      DEFAULT_MESSAGE_TIMEOUT_S,
      DEFAULT_MESSAGE_EXPIRATION_S,
      null,
      null,
    );
    return this.#queue(ref);
  }

  #applySettings(ref: QueueRef, settings: QueueSettings): QueueRow {
    const queue = this.#queue(ref);
    const deadLetter = this.#resolveDeadLetter(queue, settings.dead_letter);
    this.#sql.updateQueue.run(
      settings.message_timeout ?? queue.message_timeout,
      settings.message_expiration ?? queue.message_expiration,
      deadLetter?.queue_name ?? null,
      deadLetter?.max_reservations ?? null,
      queue.id,
    );
    if (deadLetter) {
      const target = { project: ref.project, name: deadLetter.queue_name };
      if (!this.#findQueue(target)) this.#createQueue(target);
    }
    return this.#queue(ref);
  }

  #resolveDeadLetter(
    queue: QueueRow,
    requested: QueueSettings["dead_letter"],
  ): DeadLetter | undefined {
    if (!requested) return queue.dead_letter;
    if (requested.queue_name === "") {
      if (queue.dead_letter) return undefined;
      throw badRequest(
        "dead_letter.queue_name must name the dead letter queue " +
          "(an empty name only removes an existing one)",
      );
    }
    if (requested.queue_name === queue.name) {
      throw badRequest(
        "dead_letter.queue_name must differ from the queue's own name",
      );
    }
    return {
      queue_name: requested.queue_name,
      max_reservations: requested.max_reservations ??
        queue.dead_letter?.max_reservations ?? DEFAULT_MAX_RESERVATIONS,
    };
  }

  #message(ref: QueueRef, id: string): { queue: QueueRow; row: MessageRow } {
    const queue = this.#queue(ref);
    return { queue, row: this.#messageInQueue(queue, id) };
  }

  #messageInQueue(queue: QueueRow, id: string): MessageRow {
    const messageId = parseMessageId(id);
    const row = messageId === undefined
      ? undefined
      : this.#sql.messageById.get(messageId, queue.id);
    if (!row) throw messageNotFound();
    return messageFromRow(row);
  }

  #reserveOne(
    row: MessageRow,
    reservedUntil: number,
    request: ReserveRequest,
  ): ReservedMessage {
    const reservationId = newReservationId();
    if (request.deleteOnReserve) {
      this.#sql.deleteMessage.run(row.id);
    } else {
      this.#sql.markReserved.run(reservedUntil, reservationId, row.id);
    }
    return {
      ...messageView(row),
      reserved_count: row.reserved_count + 1,
      reservation_id: reservationId,
    };
  }

  /** Same id, body and reserved_count; the expiration restarts with the target's. */
  #moveToDeadLetter(
    project: string,
    deadLetter: DeadLetter,
    messageId: number,
    now: number,
  ): void {
    const ref = { project, name: deadLetter.queue_name };
    const target = this.#findQueue(ref) ?? this.#createQueue(ref);
    const expiresAt = now + target.message_expiration * 1000;
    this.#sql.moveMessage.run(target.id, now, expiresAt, messageId);
    this.#sql.addTotal.run(1, target.id);
    this.#earliestExpiry = Math.min(this.#earliestExpiry, expiresAt);
    this.#markChanged(ref);
  }
}

function queueKey(ref: QueueRef): string {
  return JSON.stringify([ref.project, ref.name]);
}

// ---------------------------------------------------------------------------
// Long-polls: reserve requests with `wait`, woken in-process

interface Waiter {
  attempt: () => ReservedMessage[];
  nextAvailableAt: () => number | undefined;
  finish: (outcome: ReservedMessage[] | Error) => void;
}

/**
 * Reservers waiting on empty queues. A change to a queue wakes its waiters (in a
 * microtask, after the change committed); a timer per queue wakes them when the
 * next delayed or reserved message becomes available.
 */
class LongPolls {
  readonly #now: () => number;
  readonly #waiting = new Map<string, Waiter[]>();
  readonly #wakeTimers = new Map<
    string,
    { at: number; id: ReturnType<typeof setTimeout> }
  >();
  readonly #poked = new Set<string>();
  #closed = false;

  constructor(now: () => number) {
    this.#now = now;
  }

  wait(
    key: string,
    request: Pick<Waiter, "attempt" | "nextAvailableAt">,
    waitMs: number,
    signal: AbortSignal,
  ): Promise<ReservedMessage[]> {
    if (this.#closed || signal.aborted) return Promise.resolve([]);
    return new Promise((resolve, reject) => {
      const waiter: Waiter = {
        ...request,
        finish: (outcome) => {
          clearTimeout(deadline);
          signal.removeEventListener("abort", giveUp);
          this.#remove(key, waiter);
          if (outcome instanceof Error) reject(outcome);
          else resolve(outcome);
        },
      };
      const giveUp = () => waiter.finish([]);
      const deadline = setTimeout(giveUp, waitMs);
      signal.addEventListener("abort", giveUp);
      const list = this.#waiting.get(key) ?? [];
      list.push(waiter);
      this.#waiting.set(key, list);
      this.#scheduleWake(key);
    });
  }

  /** A queue changed: serve its waiters once the current work is done. */
  poke(key: string): void {
    if (this.#closed || !this.#waiting.has(key)) return;
    this.#poked.add(key);
    if (this.#poked.size > 1) return;
    queueMicrotask(() => {
      const keys = [...this.#poked];
      this.#poked.clear();
      for (const poked of keys) this.#serve(poked);
    });
  }

  close(): void {
    this.#closed = true;
    for (const waiters of [...this.#waiting.values()]) {
      for (const waiter of [...waiters]) waiter.finish([]);
    }
    for (const timer of this.#wakeTimers.values()) clearTimeout(timer.id);
    this.#wakeTimers.clear();
  }

  #serve(key: string): void {
    if (this.#closed) return;
    for (const waiter of [...(this.#waiting.get(key) ?? [])]) {
      let messages: ReservedMessage[];
      try {
        messages = waiter.attempt();
      } catch (error) {
        waiter.finish(asError(error));
        continue;
      }
      if (messages.length === 0) break;
      waiter.finish(messages);
    }
    this.#scheduleWake(key);
  }

  #scheduleWake(key: string): void {
    const current = this.#wakeTimers.get(key);
    const at = this.#nextAvailableAt(key);
    if (current && (at === undefined || at < current.at)) {
      clearTimeout(current.id);
      this.#wakeTimers.delete(key);
    }
    if (at === undefined || this.#wakeTimers.has(key)) return;
    // No waiter outlives MAX_WAIT_S, so a later wake-up would find none.
    const delay = Math.min(Math.max(at - this.#now(), 0), MAX_WAIT_S * 1000);
    const id = setTimeout(() => {
      this.#wakeTimers.delete(key);
      this.#serve(key);
    }, delay);
    this.#wakeTimers.set(key, { at, id });
  }

  /** Runs from timers too, where a throw would end the process: waiters then just time out. */
  #nextAvailableAt(key: string): number | undefined {
    try {
      return this.#waiting.get(key)?.[0]?.nextAvailableAt();
    } catch {
      return undefined;
    }
  }

  #remove(key: string, waiter: Waiter): void {
    const list = this.#waiting.get(key);
    if (!list) return;
    const index = list.indexOf(waiter);
    if (index >= 0) list.splice(index, 1);
    if (list.length > 0) return;
    this.#waiting.delete(key);
    const timer = this.#wakeTimers.get(key);
    if (timer) clearTimeout(timer.id);
    this.#wakeTimers.delete(key);
  }
}

// ---------------------------------------------------------------------------
// HTTP: request parsing and validation

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

// ---------------------------------------------------------------------------
// HTTP: routes and handlers

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

function buildRoutes(store: QueueStore, polls: LongPolls): Route[] {
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

function route(pattern: string, methods: Record<string, Handler>): Route {
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

function createRequestHandler(
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

// ---------------------------------------------------------------------------
// Metrics: Prometheus text at /metrics

const METRICS_PATH = "/metrics";

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
class ServerMetrics {
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

// ---------------------------------------------------------------------------
// Starting, stopping and configuring the server

function formatUrl(hostname: string, port: number): string {
  return `http://${bracketIPv6(hostname)}:${port}`;
}

type ResolvedOptions = Required<Omit<QueueServerOptions, "token">> & {
  token?: string;
};

/** Defaults filled in; throws on settings that are invalid or unsafe. */
function resolveOptions(options: QueueServerOptions): ResolvedOptions {
  const resolved: ResolvedOptions = {
    hostname: options.hostname ?? DEFAULT_HOSTNAME,
    port: options.port ?? DEFAULT_PORT,
    dbPath: options.dbPath ?? DEFAULT_DB_PATH,
    token: options.token,
    log: options.log ?? (() => {}),
    now: options.now ?? Date.now,
  };
  const { hostname, port, token } = resolved;
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    throw new Error(`Invalid port ${port}: use an integer from 0 to 65535`);
  }
  if (token === "") {
    throw new Error("The token is empty: set a non-empty token or none");
  }
  if (token === undefined && !isLoopback(hostname)) {
    throw new Error(
      `Refusing to listen on ${hostname} without a token: anyone who reaches it ` +
        "could read and delete messages. Set MQ_TOKEN (option token), " +
        "or listen on 127.0.0.1",
    );
  }
  return resolved;
}

function listen(options: ResolvedOptions): QueueServer {
  const { hostname, dbPath, token, log, now } = options;
  const polls = new LongPolls(now);
  const store = new QueueStore(dbPath, now, (ref) => polls.poke(queueKey(ref)));
  const metrics = new ServerMetrics(store);
  const routes = [
    ...buildRoutes(store, polls),
    route(METRICS_PATH, { GET: () => metrics.scrape() }),
  ];
  const handler = createRequestHandler(routes, token, log, metrics);
  let server: Deno.HttpServer<Deno.NetAddr>;
  try {
    server = Deno.serve(
      { hostname, port: options.port, onListen: () => {} },
      handler,
    );
  } catch (error) {
    store.close();
    throw new Error(
      `Cannot listen on ${hostname}:${options.port}: ${
        errorText(error)
      }. Choose another port or stop what uses it.`,
    );
  }

  const url = formatUrl(hostname, server.addr.port);
  const auth = token === undefined ? "no auth" : "token required";
  log(`mq_server: listening on ${url} (database ${dbPath}, ${auth})`);
  let closing: Promise<void> | undefined;
  const close = async () => {
    polls.close();
    await server.shutdown();
    store.close();
  };
  return {
    hostname,
    port: server.addr.port,
    url,
    close: () => closing ??= close(),
  };
}

/** Starts the server; resolves once it is listening. */
export function startQueueServer(
  options: QueueServerOptions = {},
): Promise<QueueServer> {
  try {
    return Promise.resolve(listen(resolveOptions(options)));
  } catch (error) {
    return Promise.reject(error);
  }
}

/**
 * Options from MQ_HOST, MQ_PORT, MQ_DB and MQ_TOKEN (empty means unset). Throws
 * one Error naming every bad variable; the token's value is never echoed.
 */
export function queueServerOptionsFromEnv(
  env: Env,
): QueueServerOptions {
  const value = (name: string) => envValue(env, name);
  const problems: string[] = [];
  const hostname = value("MQ_HOST") ?? DEFAULT_HOSTNAME;
  if (!/^(?:[A-Za-z0-9.-]+|[0-9A-Fa-f:.]+)$/.test(hostname)) {
    problems.push(
      `MQ_HOST must be a host name or IP address such as 127.0.0.1 (got ${
        JSON.stringify(hostname)
      })`,
    );
  }
  const rawPort = value("MQ_PORT") ?? String(DEFAULT_PORT);
  const port = /^\d{1,5}$/.test(rawPort) ? Number(rawPort) : NaN;
  if (!(port <= 65535)) {
    problems.push(
      `MQ_PORT must be an integer from 0 to 65535 (got ${
        JSON.stringify(rawPort)
      })`,
    );
  }
  const token = value("MQ_TOKEN");
  if (token !== undefined && !/^[\x21-\x7e]+$/.test(token)) {
    problems.push(
      "MQ_TOKEN must be printable ASCII without spaces (value not shown)",
    );
  }
  if (problems.length > 0) {
    throw new Error(
      `Invalid environment for mq_server: ${problems.join("; ")}. ` +
        "Fix these variables and start again.",
    );
  }
  return {
    hostname,
    port,
    dbPath: value("MQ_DB") ?? DEFAULT_DB_PATH,
    token,
  };
}

async function main(): Promise<void> {
  let options: QueueServerOptions;
  try {
    options = queueServerOptionsFromEnv(Deno.env.toObject());
  } catch (error) {
    console.error(`mq_server: ${errorText(error)}`);
    Deno.exit(2);
  }
  let server: QueueServer;
  try {
    server = await startQueueServer({
      ...options,
      log: (line) => console.log(line),
    });
  } catch (error) {
    console.error(`mq_server: ${errorText(error)}`);
    Deno.exit(1);
  }
  const stop = async (signal: Deno.Signal) => {
    console.log(`mq_server: ${signal} received, stopping`);
    await server.close();
    Deno.exit(0);
  };
  for (const signal of ["SIGINT", "SIGTERM"] as const) {
    Deno.addSignalListener(signal, () => void stop(signal));
  }
}

if (import.meta.main) await main();

// ---------------------------------------------------------------------------
// Helpers shared with tasks.ts (which imports them from here)

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
