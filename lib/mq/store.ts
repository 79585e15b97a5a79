/**
 * lib/mq/store.ts: the embedded queue server's storage: queues and messages
 * in SQLite (node:sqlite), with IronMQ v3's semantics (reservations, delays,
 * expiry, dead letters), the API's limits and errors, and long-polls woken
 * in-process.
 *
 * Every change is one transaction; it never answers HTTP itself.
 */
import { DatabaseSync, type SQLOutputValue } from "node:sqlite";
import { createPrivately, errorText } from "../util.ts";

export const MAX_REQUEST_BYTES = 256 * 1024;

export const MAX_BATCH = 100;

export const MAX_QUEUES_PAGE = 100;

export const DEFAULT_QUEUES_PAGE = 30;

export const MIN_TIMEOUT_S = 30;

export const MAX_TIMEOUT_S = 86_400;

export const MAX_WAIT_S = 30;

export const MAX_DELAY_S = 604_800;

export const MIN_EXPIRATION_S = 60;

export const MAX_EXPIRATION_S = 2_592_000;

const DEFAULT_MESSAGE_TIMEOUT_S = 60;

const DEFAULT_MESSAGE_EXPIRATION_S = 604_800;

const DEFAULT_MAX_RESERVATIONS = 10;

export const MAX_MAX_RESERVATIONS = 1000;

export const MAX_NAME_LENGTH = 255;

/** A failure the client caused or can act on: answered as `{"msg": message}`. */
export class ApiError extends Error {
  constructor(readonly status: number, message: string) {
    super(message);
  }
}

/** The client closed the connection before its request arrived whole. */
export class ClientGone extends Error {}

const queueNotFound = () => new ApiError(404, "Queue not found");
const messageNotFound = () => new ApiError(404, "Message not found");
export const badRequest = (message: string) => new ApiError(400, message);

function asError(error: unknown): Error {
  return error instanceof Error ? error : new Error(String(error));
}

export interface QueueRef {
  project: string;
  name: string;
}

interface DeadLetter {
  queue_name: string;
  max_reservations: number;
}

export interface QueueRow {
  id: number;
  project: string;
  name: string;
  message_timeout: number;
  message_expiration: number;
  dead_letter?: DeadLetter;
  total_messages: number;
}

/** Fields a create or update may set; `dead_letter.queue_name: ""` removes it. */
export interface QueueSettings {
  message_timeout?: number;
  message_expiration?: number;
  dead_letter?: { queue_name: string; max_reservations?: number };
}

export interface NewMessage {
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

export interface ReserveRequest {
  n: number;
  timeoutSeconds?: number;
  deleteOnReserve: boolean;
}

interface QueueCounts extends QueueRef {
  ready: number;
  delayed: number;
  reserved: number;
}

export interface MessageTarget {
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
export class QueueStore {
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

export function queueKey(ref: QueueRef): string {
  return JSON.stringify([ref.project, ref.name]);
}

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
export class LongPolls {
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
