/**
 * lib/fetch.ts: the Fetcher (long-polls in batches, prefetching what the
 * queue's round trip needs) and the Keeper (touches a held message while it
 * waits and runs).
 *
 * It never runs a command and never settles a message itself: what it holds
 * at a stop goes back through the settler.
 */

import { errorText } from "./util.ts";
import { type TaskConfig } from "./config.ts";
import { type Held, type WorkerDeps } from "./held.ts";
import {
  queueCall,
  QueueError,
  type QueueMessage,
  ReplyTooLarge,
} from "./ironmq.ts";
import { OutageLog } from "./log.ts";
import { retry } from "./retry.ts";
import { AttemptCounter, Settler } from "./settle.ts";

/** At most this many reserves in flight, and messages held waiting. */
const MAX_POLLS = 4;

const MAX_PREFETCH = 1000;

/** Bodies held waiting, in UTF-16 code units: a bound for memory. */
const MAX_PREFETCH_CHARS = 32 * 1024 * 1024;

/**
 * Keeps reserved messages ready for the processors. It asks for what they
 * take in three of the queue's round trips (at least one waiting for each),
 * never more than they start within a quarter of the reservation timeout,
 * with several reserves in flight while the queue has more. A message that
 * waits is kept reserved by touching.
 */
export class Fetcher {
  private readonly ready: Held[] = [];
  private readyChars = 0;
  private readonly takers: ((held: Held | undefined) => void)[] = [];
  /** Reserves in flight, and the messages they asked for. */
  private polls = 0;
  private asked = 0;
  /** The last reply had fewer messages than asked: one long-poll is enough. */
  private drained = true;
  /** Reserve round trips that brought messages (ms), newest last. */
  private readonly roundTrips: number[] = [];
  /** When processors asked for messages (ms), newest last: their rate. */
  private readonly takes: number[] = [];
  /** How many times processors asked, in all. */
  private taken = 0;
  /** Shrinks after a reply too large to read, grows back after good ones. */
  private batch = 100;
  private changed?: () => void;
  private readonly outage: OutageLog;
  /** Every message this worker holds, by id, until it is settled. */
  private readonly holding = new Map<string, Held>();
  private readonly polled = Promise.withResolvers<void>();
  /** Stopped, and what waited handed back: nothing joins the line any more. */
  private handedBack = false;
  /**
   * Resolves once no reserve is in flight after a stop: a message released
   * sooner could go straight back to this worker's own last long-poll.
   */
  readonly pollsEnded = this.polled.promise;

  constructor(
    private readonly task: TaskConfig,
    private readonly deps: WorkerDeps,
    private readonly queueName: string,
    private readonly attempts: AttemptCounter,
    private readonly settler: Settler,
    private readonly hardStop: AbortSignal,
  ) {
    this.outage = new OutageLog(`reserve from ${queueName}`, deps.log);
  }

  async ensureQueue(stop: AbortSignal): Promise<void> {
    try {
      if (await this.deps.queue.ensureQueue(stop)) {
        this.deps.log.info(
          `queue ${this.queueName}: created (it did not exist yet)`,
        );
      }
    } catch (e) {
      if (!stop.aborted) {
        this.deps.log.warn(`queue ${this.queueName}: ${errorText(e)}`);
      }
    }
  }

  /** Reserves until `stop`, then releases what it still holds. */
  async run(stop: AbortSignal): Promise<void> {
    const onStop = () => {
      for (const take of this.takers.splice(0)) take(undefined);
      this.changed?.();
    };
    stop.addEventListener("abort", onStop, { once: true });
    const polls = new Set<Promise<void>>();
    while (!stop.aborted) {
      const want = this.wanted();
      if (
        want > 0 &&
        (this.polls === 0 || !this.drained && this.polls < MAX_POLLS)
      ) {
        try {
          await this.deps.runner.ready(stop); // no reserving while SSH is down
        } catch {
          break; // stopped
        }
        const poll: Promise<void> = this.poll(Math.min(this.batch, want), stop)
          .finally(() => polls.delete(poll));
        polls.add(poll);
        continue;
      }
      await new Promise<void>((resolve) => this.changed = resolve);
      this.changed = undefined;
    }
    stop.removeEventListener("abort", onStop);
    if (polls.size > 0) {
      this.deps.log.info(
        `stopping: waiting up to ${this.task.pollWaitSeconds} s for the queue's long-poll to return (TASK_POLL_WAIT), so that no message is left reserved`,
      );
    }
    await Promise.all(polls);
    this.polled.resolve();
    this.handedBack = true;
    for (const held of this.ready.splice(0)) {
      this.settler.notRun(held, 0, "shutting down before it started");
    }
  }

  /** The next message for a processor; undefined once stopping. */
  take(stop: AbortSignal): Promise<Held | undefined> {
    // Once stopping, nothing new starts: what waits goes back to the queue.
    if (stop.aborted) return Promise.resolve(undefined);
    this.takes.push(this.deps.clock.now());
    this.taken++;
    if (this.takes.length > 64) this.takes.shift();
    const held = this.ready.shift();
    if (held !== undefined) this.readyChars -= held.message.body.length;
    this.changed?.();
    if (held !== undefined) return Promise.resolve(held);
    return new Promise((resolve) => this.takers.push(resolve));
  }

  /**
   * A message back from waiting for its limits (lib/limits.ts), its leases
   * held: first in line. Once the line is handed back, it goes back too.
   */
  resume(held: Held): void {
    if (this.handedBack) {
      return this.settler.notRun(held, 0, "shutting down before it started");
    }
    const taker = this.takers.shift();
    if (taker !== undefined) return taker(held);
    this.ready.unshift(held);
    this.readyChars += held.message.body.length;
  }

  /** A settled message: a new reservation of it is a new message again. */
  forget(held: Held): void {
    if (this.holding.get(held.message.id) === held) {
      this.holding.delete(held.message.id);
      this.deps.monitor?.held(this.holding.size);
    }
  }

  /** How many more messages to ask for now. */
  private wanted(): number {
    if (this.readyChars >= MAX_PREFETCH_CHARS) return 0;
    const concurrency = this.task.concurrency;
    const perMs = this.takeRate();
    const forRoundTrips = concurrency + Math.ceil(3 * perMs * this.roundTrip());
    const withinReservation = Math.floor(
      perMs * this.task.reservationTimeoutSeconds * 250,
    );
    const target = Math.min(
      MAX_PREFETCH,
      Math.max(concurrency, Math.min(forRoundTrips, withinReservation)),
    );
    return target - this.ready.length - this.asked;
  }

  /** Messages the processors take per ms, over their last 64 takes. */
  private takeRate(): number {
    // The first takes are the processors starting, all at once: a few ms
    // apart, they would seem hundreds a second, and the first reserves would
    // hold far more than the processors start within the reservation. There
    // is a rate once one of them comes back for its next message.
    if (this.taken <= this.task.concurrency) return 0;
    const span = this.takes[this.takes.length - 1] - this.takes[0];
    return this.takes.length > 1 && span > 0
      ? (this.takes.length - 1) / span
      : 0;
  }

  /** The shortest recent round trip: a reply that waited for messages is no measure of distance. */
  private roundTrip(): number {
    return this.roundTrips.length > 0 ? Math.min(...this.roundTrips) : 0;
  }

  private async poll(n: number, stop: AbortSignal): Promise<void> {
    this.polls++;
    this.asked += n;
    try {
      const messages = await this.reserve(n, stop);
      this.drained = messages.length < n;
      for (const message of messages) this.accept(message, stop);
    } finally {
      this.polls--;
      this.asked -= n;
      this.changed?.();
    }
  }

  /** One reserve, retried with backoff until it answers or `stop` aborts. */
  private async reserve(n: number, stop: AbortSignal): Promise<QueueMessage[]> {
    const { clock, queue } = this.deps;
    const wait = this.task.pollWaitSeconds;
    try {
      const messages = await retry(async () => {
        // Each long-poll round also looks for revocations (lib/revoke.ts), so
        // a cancelled message is known when it comes up.
        this.deps.revocations?.refresh();
        const started = clock.now();
        try {
          // Only a hard stop cuts a poll: one cut off mid-flight can leave its
          // messages reserved by nobody until they time out.
          const messages = await queue.reserve(
            n,
            this.task.reservationTimeoutSeconds,
            wait,
            this.hardStop,
          );
          const took = clock.now() - started;
          if (messages.length > 0) {
            this.roundTrips.push(took);
            if (this.roundTrips.length > 8) this.roundTrips.shift();
          }
          this.batch = Math.min(100, this.batch * 2);
          // An empty answer sooner than the long-poll allows (wait 0, or a
          // server that ignores it) must not make this loop spin.
          if (messages.length === 0 && took < wait * 500 + 50) {
            await clock.sleep(1000, stop);
          }
          return messages;
        } catch (e) {
          this.drained = true; // one poll at a time until the queue answers
          if (e instanceof QueueError && e.status === 404) {
            await this.ensureQueue(stop);
          }
          if (e instanceof ReplyTooLarge) this.batch = 1;
          throw e;
        }
      }, {
        minDelayMs: 250,
        maxDelayMs: 30_000,
        maxAttempts: Infinity,
        signal: stop,
        clock,
        onRetry: (e, _, delayMs) => this.outage.failed(e, delayMs),
      });
      this.outage.recovered();
      return messages;
    } catch (e) {
      if (stop.aborted) return [];
      throw e;
    }
  }

  /** A reserved message goes to a waiting processor, or waits (kept reserved) for one. */
  private accept(message: QueueMessage, stop: AbortSignal): void {
    const already = this.holding.get(message.id);
    if (already !== undefined) {
      // Its reservation lapsed while this worker held it (a touch failed), and
      // this worker reserved it again: one message, now under the new
      // reservation, not a second run of it.
      already.reservationId = message.reservation_id;
      this.attempts.notRun(message.id);
      this.deps.log.warn(
        `message ${message.id}: reserved again while this worker held it (its reservation had lapsed); carrying on under the new one`,
      );
      return;
    }
    const held: Held = {
      message,
      reservationId: message.reservation_id,
      attempt: this.attempts.attemptOf(message),
    };
    this.holding.set(message.id, held);
    this.deps.monitor?.held(this.holding.size);
    // Settled here, but its delete was refused (its reservation had lapsed):
    // deleted under this reservation, not run again, stop or no stop.
    if (this.settler.settledBefore(held)) return;
    if (stop.aborted) {
      return this.settler.notRun(
        held,
        0,
        "shutting down before it started",
        this.pollsEnded,
      );
    }
    held.keeper = new Keeper(held, this.task, this.deps, this.attempts);
    const taker = this.takers.shift();
    if (taker !== undefined) return taker(held);
    this.ready.push(held);
    this.readyChars += message.body.length;
  }
}

/** Touches a held message every third of its reservation timeout, so a long wait or run keeps it. */
export class Keeper {
  private readonly timer: ReturnType<typeof setInterval>;
  private touching?: Promise<void>;

  constructor(
    private readonly held: Held,
    private readonly task: TaskConfig,
    private readonly deps: WorkerDeps,
    private readonly attempts: AttemptCounter,
  ) {
    this.timer = setInterval(() => {
      this.touching ??= this.touch().finally(() => this.touching = undefined);
      // A third, not a half: a touch that fails (3 quick tries) leaves time
      // for the next one before the reservation lapses.
    }, deps.touchIntervalMs ?? task.reservationTimeoutSeconds * 333);
  }

  /** Stops touching; resolves once a touch under way has landed, so the reservation id is current. */
  async stop(): Promise<void> {
    clearInterval(this.timer);
    await this.touching;
  }

  private async touch(): Promise<void> {
    const { message } = this.held;
    try {
      this.held.reservationId = await queueCall(
        () =>
          this.deps.queue.touch(
            message.id,
            this.held.reservationId,
            this.task.reservationTimeoutSeconds,
          ),
        this.deps.clock,
        3,
      );
      this.attempts.notRun(message.id); // IronMQ counts a touch as a reservation
      this.deps.log.debug(`message ${message.id}: reservation extended`);
    } catch (e) {
      this.deps.log.warn(
        `message ${message.id}: could not extend its reservation (${
          errorText(e)
        }); if it lapses, it may run again elsewhere`,
      );
    }
  }
}
