/**
 * lib/settle.ts: settling a message once its outcome is known: deletes in
 * batches, releases with backoff, continuations for the failed hosts,
 * results and dead-letter records, off the processors' path; and the
 * attempt count of each message across its reservations.
 *
 * It never runs a command, and never leaves a message it was handed
 * reserved and untouched: each path ends in a delete, a release, or a
 * record still owed (kept so the message is not run again).
 */

import { type HostOutcome, type Outcome } from "./monitor.ts";
import { errorText } from "./util.ts";
import { type TaskConfig } from "./config.ts";
import {
  type Failure,
  fieldsOf,
  type Held,
  runIdOf,
  taskLabel,
  type WorkerDeps,
} from "./held.ts";
import {
  type DeleteItem,
  queueCall,
  QueueError,
  type QueueMessage,
} from "./ironmq.ts";
import { Tail } from "./log.ts";
import { parseJsonBody } from "./message.ts";
import { backoffMs, retry } from "./retry.ts";

/** A message's outcome, in its result; RETRY: some hosts failed and only they run again. */
type Status = "SUCCESS" | "FAILURE" | "REJECTED" | "REVOKED" | "RETRY";

/** A message to post before the delete: the result, or the continuation for the failed hosts. */
interface Post {
  what: "result" | "continuation";
  queue: string;
  body: string;
  delaySeconds: number;
}

/** What is still to be posted for a message whose outcome is known. */
type Owed =
  | {
    kind: "record";
    status: "FAILURE" | "REJECTED";
    failure: Failure;
    /** Its attempts then: the record says so when it is posted later. */
    attempt: number;
  }
  | { kind: "posts"; status: Status; posts: Post[] };

/** A settled outcome as a result's status; "not run" goes back to the queue. */
const STATUS_OF: Record<Outcome, string> = {
  success: "SUCCESS",
  failure: "FAILURE",
  rejected: "REJECTED",
  revoked: "REVOKED",
  retry: "RETRY",
  not_run: "NOT_RUN",
  // Already succeeded here (the run history says): its result is that success.
  duplicate: "SUCCESS",
};

/** At most this many settled messages whose delete did not land are remembered. */
const MAX_UNDELETED = 10_000;

/** A message settled here, and its delete (in flight, or refused). */
interface Undeleted {
  status: Status;
  deleting: Promise<DeleteOutcome>;
  /** Reserved here again while that delete was in flight. */
  reservedAgain?: boolean;
}

export class Settler {
  private readonly pending = new Set<Promise<void>>();
  private readonly deletes: DeleteBatcher;
  /**
   * Messages whose outcome is final here (the command ran; its result,
   * continuation or dead-letter record posted) while their delete is in flight
   * or was refused (the reservation had lapsed, or the queue kept failing).
   * Reserved here again, one is deleted, not run again. The oldest make room.
   */
  private readonly undeleted = new Map<string, Undeleted>();

  constructor(
    private readonly task: TaskConfig,
    private readonly deps: WorkerDeps,
    private readonly queueName: string,
    private readonly attempts: AttemptCounter,
    /** Told when a message's settling begins (a delete, release or dead letter). */
    private readonly settled: (held: Held) => void,
    /** The worker's stop signal, once it runs. */
    private readonly stopping: () => AbortSignal | undefined,
  ) {
    this.deletes = new DeleteBatcher(deps);
  }

  /** The command succeeded. */
  delete(held: Held): void {
    this.count(held, "success");
    this.track(held, this.finish(held, "SUCCESS"));
  }

  /**
   * Revoked: expired before it ran (Celery's `expires`), or cancelled (runs
   * cancel, the page's Stop) before or while it ran: deleted, never retried.
   */
  revoke(held: Held, reason: string): void {
    this.count(held, "revoked", reason);
    this.track(held, this.finish(held, "REVOKED", reason));
  }

  /**
   * The command failed: a retry later, or the dead-letter queue after the
   * last attempt. When only some of its hosts failed, the retry is a new
   * message for those hosts (its continuation, delayed as a release would
   * be, carrying the attempts so far), posted before this one is deleted.
   */
  failed(held: Held, failure: Failure): void {
    const maxAttempts = held.maxAttempts ?? this.task.maxAttempts;
    if (held.attempt >= maxAttempts && !failure.notAnAttempt) {
      return this.deadLetter(held, failure, "FAILURE");
    }
    this.count(held, "retry", failure.reason);
    const delay = failure.notAnAttempt ? 0 : releaseDelaySeconds(
      held.attempt,
      this.task.retryDelaySeconds,
    );
    if (failure.hosts !== undefined) {
      const continuation: Post = {
        what: "continuation",
        queue: this.queueName,
        body: continuationBody(
          held.message.body,
          failure.hosts,
          held.attempt - (failure.notAnAttempt ? 1 : 0),
        ),
        delaySeconds: delay,
      };
      return this.track(
        held,
        this.finish(held, "RETRY", failure.reason, [continuation]),
      );
    }
    this.track(
      held,
      this.release(
        held,
        delay,
        `${failure.reason}, attempt ${held.attempt} of ${maxAttempts}`,
      ),
    );
  }

  /**
   * Nothing ran (SSH failed, a stop, an eta to come): back to the queue, not
   * counted as an attempt; once `after` resolves, when given.
   */
  notRun(
    held: Held,
    delaySeconds: number,
    why: string,
    after?: Promise<void>,
  ): void {
    this.count(held, "not_run", why);
    this.attempts.notRun(held.message.id);
    this.track(
      held,
      (async () => {
        await after;
        await this.release(held, delaySeconds, why);
      })(),
    );
  }

  /** Moves it to the dead-letter queue (`again`: its record is owed, its outcome counted before). */
  deadLetter(
    held: Held,
    failure: Failure,
    status: "FAILURE" | "REJECTED",
    again = false,
  ): void {
    if (!again) {
      this.count(
        held,
        status === "FAILURE" ? "failure" : "rejected",
        failure.reason,
      );
    }
    this.track(held, this.recordDeadLetter(held, failure, status));
  }

  /** A task id that already succeeded here (its history says): deleted, not run again. */
  duplicate(held: Held): void {
    this.count(held, "duplicate");
    this.track(held, this.deleteSettled(held, "SUCCESS"));
  }

  /** One settled message, for the metrics, the page and the run history. */
  private count(held: Held, outcome: Outcome, reason?: string): void {
    const masked = reason === undefined
      ? undefined
      : this.maskerFor(held)(reason);
    this.deps.runs?.settledRun(held, outcome, masked);
    this.deps.monitor?.messageSettled({
      messageId: held.message.id,
      task: taskLabel(held),
      outcome,
      hosts: this.hostsOf(held, 2048, outcome === "revoked"),
      finishedAt: this.deps.clock.now(),
      reason: masked,
    });
    // Its followers on the listener (runs follow) get its end as a result.
    this.deps.live?.settled(runIdOf(held), held.message.id, () => ({
      event: "RESULT",
      status: STATUS_OF[outcome],
      message_id: held.message.id,
      task_id: runIdOf(held),
      attempts: held.attempt,
      reason: masked ?? null,
      hosts: this.hostsOf(held, 64 * 1024, outcome === "revoked"),
    }));
  }

  async idle(): Promise<void> {
    while (this.pending.size > 0) await Promise.allSettled([...this.pending]);
    await this.deletes.idle();
  }

  private track(held: Held, work: Promise<void>): void {
    // Settling has begun: a reservation of it from now on is a new one (a
    // release's reply may come after the long-poll that reserves it again).
    this.settled(held);
    const tracked = work.catch((e) =>
      this.deps.log.error(
        `message ${held.message.id}: unexpected error: ${errorText(e)}`,
        fieldsOf(held),
      )
    ).finally(() => this.pending.delete(tracked));
    this.pending.add(tracked);
  }

  /**
   * A message this worker settled, reserved by it again because its delete
   * did not land: true when so, and then it is deleted under the new
   * reservation (once the earlier delete's outcome is in), never run again.
   */
  settledBefore(held: Held): boolean {
    const earlier = this.undeleted.get(held.message.id);
    if (earlier === undefined) return false;
    earlier.reservedAgain = true;
    this.track(
      held,
      (async () => {
        // The earlier delete may still be in flight: its refusal comes first.
        await earlier.deleting;
        await this.deleteSettled(held, earlier.status, true);
      })(),
    );
    return true;
  }

  /** What could not be posted before (a result, a continuation): posted now, then the delete. */
  resendPosts(held: Held, owed: Owed & { kind: "posts" }): void {
    this.track(
      held,
      this.finish(held, owed.status, undefined, owed.posts, true),
    );
  }

  /**
   * Posts the continuation (when some hosts run again) and the result (when
   * one is asked for), then deletes the message.
   */
  private async finish(
    held: Held,
    status: Status,
    reason?: string,
    posts: Post[] = [],
    owed = false,
  ): Promise<void> {
    const result = owed ? undefined : this.resultOf(held, status, reason);
    const all = result === undefined ? posts : [...posts, result];
    for (const [i, post] of all.entries()) {
      if (await this.post(held, status, post)) continue;
      // Released, the message would run on all its hosts again (elsewhere):
      // it stays held (touched) while the queue recovers, until a stop.
      // Owed meanwhile: reserved here again (its reservation lapsed while
      // the queue was down), it is posted, not run.
      this.attempts.owe(held.message.id, {
        kind: "posts",
        status,
        posts: all.slice(i),
      });
      if (post.what === "continuation" && await this.keepPosting(held, post)) {
        continue;
      }
      // Never zero results, never a lost retry: the message goes back; this
      // worker posts what is left when it comes back (other workers may run
      // it again).
      return await this.release(
        held,
        releaseDelaySeconds(held.attempt, this.task.retryDelaySeconds),
        `its ${
          post.what === "result" ? `${status} result` : "continuation"
        } could not be posted yet`,
      );
    }
    await this.deleteSettled(held, status);
  }

  /**
   * Deletes a message whose outcome is final here (`again`: under a new
   * reservation, after its delete did not land). Remembered until a delete
   * lands, so that this worker's own reserve handing it back does not run it.
   */
  private async deleteSettled(
    held: Held,
    status: Status,
    again = false,
  ): Promise<void> {
    await held.keeper?.stop(); // its reservation id is final now
    const id = held.message.id;
    this.attempts.forget(id);
    const entry: Undeleted = {
      status,
      deleting: this.deletes.delete({
        id,
        reservation_id: held.reservationId,
      }),
    };
    this.undeleted.delete(id); // re-inserted last: the newest
    this.undeleted.set(id, entry);
    if (this.undeleted.size > MAX_UNDELETED) {
      this.undeleted.delete(this.undeleted.keys().next().value!);
    }
    const outcome = await entry.deleting;
    if (outcome === "deleted" || outcome === "gone") {
      if (this.undeleted.get(id) === entry) this.undeleted.delete(id);
    }
    if (outcome === "deleted") {
      if (again) {
        this.deps.log.info(
          `message ${id}: reserved here again after its delete was refused; its ${status} outcome stands, so it is deleted under the new reservation, not run again`,
          fieldsOf(held),
        );
      }
      return;
    }
    if (outcome === "gone") {
      // Most often our own earlier try landed and only its reply was lost.
      this.deps.log.info(
        `message ${id}: already gone from the queue when deleted`,
        fieldsOf(held),
      );
      return;
    }
    // Reserved here again meanwhile: that reservation's delete tells the end.
    if (entry.reservedAgain) return;
    // Another worker may reserve it and run it; this one, reserving it again,
    // deletes it (settledBefore).
    const why = outcome === "expired"
      ? "its reservation had expired, so another worker may reserve it: it MAY RUN TWICE there (if this worker reserves it again, it deletes it without running it)"
      : "the queue kept failing; it will reappear when its reservation times out and MAY RUN TWICE on another worker (if this worker reserves it again, it deletes it without running it)";
    this.deps.log.warn(
      `message ${id}: ${
        status === "SUCCESS" ? "the command succeeded but " : ""
      }the delete did not: ${why}`,
      fieldsOf(held),
    );
  }

  /**
   * The result of a message's outcome, for its `reply_to` queue or
   * TASK_RESULTS_QUEUE; undefined when none is asked for.
   */
  private resultOf(
    held: Held,
    status: Status,
    reason?: string,
  ): Post | undefined {
    const to = held.meta?.replyTo ?? this.task.resultsQueue;
    if (to === undefined) return undefined;
    const mask = this.maskerFor(held);
    const runs = held.runs ?? [];
    const body = JSON.stringify({
      message_id: held.message.id,
      task_id: held.meta?.taskId ?? null,
      task: held.meta?.task ?? null,
      status,
      hosts: this.hostsOf(held, Infinity, status === "REVOKED"),
      attempts: held.attempt,
      started_at: runs.length > 0
        ? new Date(Math.min(...runs.map((r) => r.startedAt))).toISOString()
        : null,
      finished_at: new Date(
        runs.length > 0
          ? Math.max(...runs.map((r) => r.finishedAt))
          : this.deps.clock.now(),
      ).toISOString(),
      reason: reason === undefined ? null : mask(reason),
    });
    return { what: "result", queue: to, body, delaySeconds: 0 };
  }

  /** Each host's outcome of the last run, output tails cut to `tailChars`. */
  private hostsOf(
    held: Held,
    tailChars: number,
    /** Its runs were stopped by a cancel (REVOKED), not by a shutdown. */
    cancelled = false,
  ): Record<string, HostOutcome & { truncated: Record<string, boolean> }> {
    const mask = this.maskerFor(held);
    const tail = (t: Tail) => mask(t.toString()).slice(-tailChars);
    const hosts: Record<
      string,
      HostOutcome & { truncated: Record<string, boolean> }
    > = {};
    for (const run of held.runs ?? []) {
      const { result } = run;
      hosts[run.host.name] = {
        exit_status: result.kind === "exit" ? result.code : null,
        signal: result.kind === "signal" ? result.signal : null,
        duration_ms: run.finishedAt - run.startedAt,
        stdout: tail(run.stdout),
        stderr: tail(run.stderr),
        truncated: {
          stdout: run.stdout.truncated ||
            run.stdout.toString().length > tailChars,
          stderr: run.stderr.truncated ||
            run.stderr.toString().length > tailChars,
        },
        error: result.kind === "ssh-error" || result.kind === "unreachable"
          ? mask(result.error)
          : result.kind === "timeout"
          ? "timed out"
          : result.kind === "aborted"
          ? cancelled ? "stopped by a cancel" : "stopped by shutdown"
          : null,
      };
    }
    return hosts;
  }

  /** Tries a continuation again, with backoff, while the queue fails and no stop comes. */
  private async keepPosting(held: Held, post: Post): Promise<boolean> {
    const stop = this.stopping();
    if (stop === undefined || stop.aborted) return false;
    this.deps.log.warn(
      `message ${held.message.id}: keeping it reserved while its continuation cannot be posted, trying again until the queue takes it (or a stop)`,
      fieldsOf(held),
    );
    try {
      await retry(
        () => this.deps.queue.post(post.queue, [post.body], post.delaySeconds),
        {
          minDelayMs: 1_000,
          maxDelayMs: 30_000,
          maxAttempts: Infinity,
          retryable: (e) => e instanceof QueueError && e.retryable,
          signal: stop,
          clock: this.deps.clock,
        },
      );
    } catch {
      return false;
    }
    this.deps.log.info(
      `message ${held.message.id}: the failed hosts run again (continuation posted)`,
      fieldsOf(held),
    );
    return true;
  }

  private async post(held: Held, status: Status, post: Post): Promise<boolean> {
    const { queue, clock, log } = this.deps;
    const what = post.what === "result" ? `${status} result` : "continuation";
    try {
      const [id] = await queueCall(
        () => queue.post(post.queue, [post.body], post.delaySeconds),
        clock,
      );
      if (post.what === "continuation") {
        log.info(
          `message ${held.message.id}: the failed hosts run again as message ${id} in ${post.delaySeconds} s`,
          fieldsOf(held),
        );
      } else {
        log.debug(
          `message ${held.message.id}: ${what} posted to ${post.queue}`,
          fieldsOf(held),
        );
      }
      return true;
    } catch (e) {
      log.error(
        `message ${held.message.id}: cannot post its ${what} to ${post.queue} (${
          errorText(e)
        })`,
        fieldsOf(held),
      );
      return false;
    }
  }

  private maskerFor(held: Held): (text: string) => string {
    const secrets = held.secrets ?? this.deps.secrets;
    return (text) => secrets?.mask(text) ?? text;
  }

  private async release(
    held: Held,
    delaySeconds: number,
    why: string,
  ): Promise<void> {
    await held.keeper?.stop();
    const id = held.message.id;
    try {
      await queueCall(
        () => this.deps.queue.release(id, held.reservationId, delaySeconds),
        this.deps.clock,
      );
      this.deps.log.info(
        `message ${id}: released for a retry in ${delaySeconds} s (${why})`,
        fieldsOf(held),
      );
    } catch (e) {
      this.deps.log.warn(
        `message ${id}: release failed (${
          errorText(e)
        }); it returns to the queue when its reservation times out (${why})`,
        fieldsOf(held),
      );
    }
  }

  /**
   * Records the message in the dead-letter queue, posts its result, then
   * deletes it. A record too large for the queue (the body is escaped once
   * more inside it) goes as two messages: the body verbatim, then the record
   * naming it. If nothing can be recorded, the message is released and, when
   * this worker reserves it again, not run again: the record is tried anew.
   */
  private async recordDeadLetter(
    held: Held,
    failure: Failure,
    status: "FAILURE" | "REJECTED",
  ): Promise<void> {
    await held.keeper?.stop();
    const { message } = held;
    const { queue, clock, log } = this.deps;
    const dlq = this.task.deadLetterQueue;
    const mask = this.maskerFor(held);
    // Run again from here, it runs on the hosts that failed, from attempt 1.
    const body = failure.hosts !== undefined || held.meta?.priorRetries
      ? continuationBody(message.body, failure.hosts)
      : message.body;
    const record = {
      queue: this.queueName,
      id: message.id,
      task: held.meta?.task,
      task_id: held.meta?.taskId,
      body: body as string | undefined,
      body_message_id: undefined as string | undefined,
      attempts: held.attempt,
      reason: mask(failure.reason),
      exit_status: failure.exitStatus,
      stderr_tail: failure.stderrTail === undefined
        ? undefined
        : mask(failure.stderrTail),
      hosts: failure.outcomes ?? this.hostsOf(held, 2048),
      failed_at: new Date(clock.now()).toISOString(),
    };
    let where = dlq;
    let recordId: string | undefined;
    try {
      try {
        [recordId] = await queueCall(
          () => queue.post(dlq, [JSON.stringify(record)]),
          clock,
        );
      } catch (e) {
        if (!(e instanceof QueueError && e.status === 413)) throw e;
        const [bodyId] = await queueCall(
          () => queue.postVerbatim(dlq, body),
          clock,
        );
        record.body = undefined;
        record.body_message_id = bodyId;
        [recordId] = await queueCall(
          () => queue.post(dlq, [JSON.stringify(record)]),
          clock,
        );
        where =
          `${dlq} (too large for one message: its body verbatim as message ${bodyId}, then the record)`;
      }
    } catch (e) {
      log.error(
        `message ${message.id}: cannot record it in ${dlq} (${
          errorText(e)
        }); keeping it in ${this.queueName}, where it will not run again`,
        fieldsOf(held),
      );
      this.attempts.owe(message.id, {
        kind: "record",
        status,
        failure: { ...failure, outcomes: record.hosts },
        attempt: held.attempt,
      });
      return await this.release(
        held,
        releaseDelaySeconds(held.attempt, this.task.retryDelaySeconds),
        "dead-letter queue unavailable",
      );
    }
    this.deps.monitor?.deadLettered(taskLabel(held));
    log.error(
      `message ${message.id}: moved to ${where} after ${held.attempt} attempt(s): ${
        mask(failure.reason)
      } (deno task dlq show ${recordId})`,
      fieldsOf(held),
    );
    await this.finish(held, status, failure.reason);
  }
}

/** The release delay after `attempts` failed runs: the base, doubling each time, at most 15 minutes. */
function releaseDelaySeconds(attempts: number, baseSeconds: number): number {
  return backoffMs(attempts - 1, baseSeconds * 1000, 900_000, 1) / 1000;
}

/**
 * The message again, for some of its hosts: its JSON object (a plain-text
 * body runs as `{"args": []}` does) with "hosts" set (unless undefined), and
 * "retries" set to the attempts so far (left out: a fresh start, for a dead
 * letter's body).
 */
function continuationBody(
  body: string,
  hosts: string[] | undefined,
  retries?: number,
): string {
  const parsed = parseJsonBody(body);
  const message: Record<string, unknown> = parsed !== undefined &&
      "object" in parsed
    ? { ...parsed.object }
    : { args: [] };
  if (hosts !== undefined) message.hosts = hosts;
  if (retries === undefined) delete message.retries;
  else message.retries = retries;
  return JSON.stringify(message);
}

type DeleteOutcome = "deleted" | "expired" | "gone" | "failed";

/**
 * Coalesces deletes: up to four batches in flight; while they are, the next
 * deletes gather (up to 100 a batch, IronMQ's limit).
 */
class DeleteBatcher {
  private pending: { item: DeleteItem; done: (o: DeleteOutcome) => void }[] =
    [];
  private readonly inFlight = new Set<Promise<void>>();

  constructor(private readonly deps: WorkerDeps) {}

  delete(item: DeleteItem): Promise<DeleteOutcome> {
    return new Promise((done) => {
      this.pending.push({ item, done });
      this.pump();
    });
  }

  async idle(): Promise<void> {
    while (this.inFlight.size > 0) await Promise.all([...this.inFlight]);
  }

  private pump(): void {
    while (this.inFlight.size < 4 && this.pending.length > 0) {
      const batch = this.pending.splice(0, 100);
      const flight: Promise<void> = this.deleteAll(batch.map((b) => b.item))
        .then((outcomes) => batch.forEach((b, i) => b.done(outcomes[i])))
        .finally(() => {
          this.inFlight.delete(flight);
          this.pump();
        });
      this.inFlight.add(flight);
    }
  }

  private async deleteAll(items: DeleteItem[]): Promise<DeleteOutcome[]> {
    try {
      await queueCall(
        () => this.deps.queue.deleteBatch(items),
        this.deps.clock,
      );
      return items.map(() => "deleted");
    } catch (e) {
      // One bad reservation fails the whole batch: find out which, one by one.
      if (items.length > 1 && e instanceof QueueError && !e.retryable) {
        return await Promise.all(items.map((item) => this.deleteOne(item)));
      }
      return items.map(() => outcomeOf(e));
    }
  }

  private async deleteOne(item: DeleteItem): Promise<DeleteOutcome> {
    try {
      await queueCall(
        () => this.deps.queue.delete(item.id, item.reservation_id),
        this.deps.clock,
      );
      return "deleted";
    } catch (e) {
      return outcomeOf(e);
    }
  }
}

function outcomeOf(e: unknown): DeleteOutcome {
  if (e instanceof QueueError && e.status === 403) return "expired";
  if (e instanceof QueueError && e.status === 404) return "gone";
  return "failed";
}

/**
 * Which run a reserved message is on. IronMQ's reserved_count counts every
 * reservation and touch; this subtracts those this process knows were no run
 * (touches, SSH failures, stops). An earlier process's are unknown, so it errs
 * high. Bounded: messages that other workers finish are never forgotten here,
 * so the oldest entries make room.
 */
export class AttemptCounter {
  private readonly notRuns = new Map<string, number>();
  /**
   * Messages whose outcome is known here but could not be posted (a dead-letter
   * record, a result): at most 200, as a result holds up to 128 KiB of output.
   */
  private readonly owing = new Map<string, Owed>();
  constructor(private readonly max = 10_000) {}

  owe(id: string, owed: Owed): void {
    this.owing.delete(id);
    this.owing.set(id, owed);
    if (this.owing.size > 200) {
      this.owing.delete(this.owing.keys().next().value!);
    }
  }

  owed(id: string): Owed | undefined {
    return this.owing.get(id);
  }

  attemptOf(message: QueueMessage): number {
    return Math.max(
      1,
      message.reserved_count - (this.notRuns.get(message.id) ?? 0),
    );
  }

  notRun(id: string): void {
    const count = (this.notRuns.get(id) ?? 0) + 1;
    this.notRuns.delete(id); // re-inserted last: the newest
    this.notRuns.set(id, count);
    if (this.notRuns.size > this.max) {
      this.notRuns.delete(this.notRuns.keys().next().value!);
    }
  }

  forget(id: string): void {
    this.notRuns.delete(id);
    this.owing.delete(id);
  }
}
