/**
 * lib/limits.ts: limits that hold across every worker of a queue (issue 19):
 * a task's `concurrency:` (per `concurrency_key:`) and a host group's
 * `max_parallel:`. Each limit lives in the queue service itself: a lock
 * queue holding N token messages. A run passes with one reserved token per
 * limit (a lease, touched while the run lasts, released when it ends); a
 * worker that dies loses its leases when their reservations time out.
 *
 * Never lost, never doubled (README, Limits): a token is only ever released,
 * never deleted by a run that passed with it, so a kill between any two
 * queue calls leaves it ready or reserved by nobody alive (back after the
 * reservation timeout). A run passes only if, with its token reserved, the
 * queue counts at most N messages in the lock queue: if N + 1 runs held
 * tokens at once, the last of them to count would have seen N + 1 (each
 * holds its token, reserved, until it ends). So a count gone wrong (two
 * workers repairing at once, a retried post) stops runs, never doubles one;
 * a surplus token is deleted by the run that reserved it, a missing one
 * posted by a worker that finds the count short twice.
 *
 * It never runs a command and never settles a message: a run over its limit
 * waits here (its message kept by the Fetcher's Keeper), without a processor,
 * and goes back to the processors (`resume`) once it holds every lease; one
 * cancelled (lib/revoke.ts) or expired while it waits leaves its line at once,
 * freeing only the leases it holds, and goes to the worker (`drop`) to settle.
 */

import { createHash } from "node:crypto";
import { type Catalog, PLACEHOLDER } from "./catalog.ts";
import { type TaskConfig } from "./config.ts";
import {
  fieldsOf,
  type Held,
  runIdOf,
  taskLabel,
  type WorkerDeps,
} from "./held.ts";
import { hostKey, type HostSpec } from "./hosts.ts";
import { queueCall, QueueError } from "./ironmq.ts";
import { type Log } from "./log.ts";
import { expiredReason } from "./message.ts";
import { type Clock } from "./retry.ts";
import { type Revocations, revokedReason } from "./revoke.ts";
import { errorText } from "./util.ts";

/** One limit a run is under: its lock queue and its number of tokens. */
export interface Lock {
  queue: string;
  limit: number;
  /** What the log names: the task (and its key), or a host. */
  label: string;
  /** A per-host lock ({{host}}, max_parallel): the host's name in the run. */
  host?: string;
}

/** What a run says of itself that its limits depend on (a MessagePlan's run). */
export interface RunShape {
  task?: { name: string; limit?: { concurrency: number; key?: string } };
  values?: Record<string, string | number | boolean>;
  hosts: HostSpec[];
  /** Celery's `expires`: no longer waited for after it. */
  expiresMs?: number;
}

/** The calls a lock queue needs (an IronMqClient for that queue). */
type LockQueue = ReturnType<NonNullable<WorkerDeps["locks"]>>;

/** What Limits tells of waiting runs (the Monitor listens). */
export interface LimitEvents {
  runsWaiting(task: string, count: number): void;
}

export interface LimitsDeps {
  /** A client for the named lock queue. */
  locks: (queue: string) => LockQueue;
  log: Log;
  clock: Clock;
  monitor?: LimitEvents;
  /** Cancels: a waiting run's is watched, so it leaves its line when one comes. */
  revocations?: Pick<Revocations, "watch">;
  /** How often a lease is touched; default a third of its reservation timeout. */
  touchIntervalMs?: number;
  /** For the jitter of a repair; Math.random by default. */
  random?: () => number;
}

/**
 * A token older than this is deleted by the next run that reserves it (and
 * replaced by a repair), so none expires while a run holds it: IronMQ drops
 * a message its message_expiration (7 days by default) after it was posted.
 */
const RETIRE_AFTER_MS = 24 * 3600_000;

/**
 * Pure: the locks a run needs, each once, in one order for every worker (by
 * queue name), so two runs never wait for each other's leases in a cycle.
 */
export function locksFor(
  run: RunShape,
  catalog: Catalog | undefined,
  queueName: string,
): Lock[] {
  const locks = new Map<string, Lock>();
  const add = (lock: Lock) => {
    if (!locks.has(lock.queue)) locks.set(lock.queue, lock);
  };
  const limit = run.task?.limit;
  if (run.task !== undefined && limit !== undefined) {
    const task = run.task.name;
    const render = (host?: HostSpec) =>
      limit.key?.replace(
        PLACEHOLDER,
        (_, name: string) =>
          name === "host" && host !== undefined
            ? hostKey(host)
            : String(run.values?.[name] ?? ""),
      ) ?? "";
    const shown = (host?: HostSpec) =>
      limit.key?.replace(
        PLACEHOLDER,
        (_, name: string) =>
          name === "host" && host !== undefined
            ? host.name
            : String(run.values?.[name] ?? ""),
      ) ?? "";
    const perHost = [...(limit.key ?? "").matchAll(PLACEHOLDER)]
      .some((m) => m[1] === "host");
    for (const host of perHost ? run.hosts : [undefined]) {
      add({
        queue: lockQueueName(
          queueName,
          task,
          limit.concurrency,
          `task\0${task}\0${render(host)}`,
        ),
        limit: limit.concurrency,
        label: limit.key === undefined ? task : `${task} ${shown(host)}`,
        host: host?.name,
      });
    }
  }
  for (const host of run.hosts) {
    const parallel = catalog?.maxParallel.get(hostKey(host));
    if (parallel === undefined) continue;
    add({
      queue: lockQueueName(
        queueName,
        "host",
        parallel,
        `host\0${hostKey(host)}`,
      ),
      limit: parallel,
      label: `host ${host.name}`,
      host: host.name,
    });
  }
  return [...locks.values()].sort((a, b) => a.queue < b.queue ? -1 : 1);
}

/**
 * A lock queue's name: readable, and valid whatever a key's values hold (a
 * hash of them). N is part of it: workers that disagree on N (a rolling
 * change of the catalog) use two locks instead of fighting over one count.
 */
function lockQueueName(
  queueName: string,
  what: string,
  limit: number,
  key: string,
): string {
  const hash = createHash("sha256").update(key).digest("hex").slice(0, 16);
  return `${queueName}.limit.${what}.${limit}.${hash}`;
}

/** A token's body: which of N it is and when it was posted (to retire it). */
function tokenBody(index: number, limit: number, now: number): string {
  return JSON.stringify({ token: index, of: limit, posted: now });
}

function postedAt(body: string): number | undefined {
  try {
    const parsed: unknown = JSON.parse(body);
    const posted = (parsed as { posted?: unknown } | null)?.posted;
    return typeof posted === "number" ? posted : undefined;
  } catch {
    return undefined;
  }
}

/** One reserved token: touched until it is released (or deleted, if surplus). */
class Lease {
  private readonly timer: ReturnType<typeof setInterval>;
  private touching?: Promise<void>;
  private lapsed = false;

  constructor(
    readonly lock: Lock,
    private readonly api: LockQueue,
    private readonly id: string,
    private reservationId: string,
    private readonly timeoutS: number,
    private readonly deps: LimitsDeps,
  ) {
    this.timer = setInterval(() => {
      this.touching ??= this.touch().finally(() => this.touching = undefined);
    }, deps.touchIntervalMs ?? timeoutS * 333);
  }

  /** Puts the token back (one call; it keeps its identity). */
  async release(): Promise<void> {
    await this.end();
    try {
      await queueCall(
        () => this.api.release(this.id, this.reservationId, 0),
        this.deps.clock,
      );
    } catch (e) {
      // Not released: it comes back when its reservation times out.
      this.deps.log.warn(
        `limit ${this.lock.label}: could not release its token (${
          errorText(e)
        }); it is back within ${this.timeoutS} s`,
      );
    }
  }

  /** Deletes the token (a surplus or an old one): only ever one this run did not pass with. */
  async discard(): Promise<void> {
    await this.end();
    try {
      await queueCall(
        () => this.api.delete(this.id, this.reservationId),
        this.deps.clock,
      );
    } catch (e) {
      this.deps.log.warn(
        `limit ${this.lock.label}: could not delete a surplus token (${
          errorText(e)
        })`,
      );
    }
  }

  private async end(): Promise<void> {
    clearInterval(this.timer);
    await this.touching;
  }

  private async touch(): Promise<void> {
    try {
      this.reservationId = await queueCall(
        () => this.api.touch(this.id, this.reservationId, this.timeoutS),
        this.deps.clock,
        3,
      );
    } catch (e) {
      const gone = e instanceof QueueError &&
        (e.status === 403 || e.status === 404);
      if (gone && !this.lapsed) {
        this.lapsed = true;
        this.deps.log.error(
          `limit ${this.lock.label}: this run's lease lapsed (${
            errorText(e)
          }): another run may pass while it runs`,
        );
      } else if (!gone) {
        this.deps.log.warn(
          `limit ${this.lock.label}: could not extend its lease (${
            errorText(e)
          }); if it lapses, another run may pass`,
        );
      }
    }
  }
}

/** One place in a lock's line: its lease now (true) or later (`later`). */
class Waiter {
  private readonly first = Promise.withResolvers<boolean>();
  private decided = false;
  lease?: Lease;

  constructor(private readonly later: (lease: Lease) => void) {}

  get now(): Promise<boolean> {
    return this.first.promise;
  }

  give(lease: Lease): void {
    if (this.decided) return this.later(lease);
    this.decided = true;
    this.lease = lease;
    this.first.resolve(true);
  }

  park(): void {
    if (this.decided) return;
    this.decided = true;
    this.first.resolve(false);
  }
}

/** This worker's line for one lock: its waiters in arrival order, and the reserves for them. */
class Gate {
  private readonly line: Waiter[] = [];
  /** Whether serve() runs: set and cleared in the same turn as its loop's checks. */
  private serving = false;
  private loop?: Promise<void>;
  private readonly api: LockQueue;
  private failing = false;

  constructor(
    readonly lock: Lock,
    private readonly task: TaskConfig,
    private readonly deps: LimitsDeps,
    private readonly halt: AbortSignal,
    /** Its line is empty: forgotten, so keys of one use each do not pile up. */
    private readonly idle: () => void,
  ) {
    this.api = deps.locks(lock.queue);
  }

  /** Joins the line: true with a lease at once; false: waiting (the lease comes through the waiter). */
  enter(waiter: Waiter): Promise<boolean> {
    if (this.halt.aborted) return Promise.resolve(false);
    this.line.push(waiter);
    // Behind others: it waits, whatever the queue would say now.
    if (this.serving) waiter.park();
    else {
      this.serving = true;
      this.loop = this.serve().catch((e) =>
        this.deps.log.error(`limit ${this.lock.label}: ${errorText(e)}`)
      );
    }
    return waiter.now;
  }

  /** Takes a waiter out of the line (its run withdrawn): it gets no lease from here. */
  remove(waiter: Waiter): void {
    const at = this.line.indexOf(waiter);
    if (at >= 0) this.line.splice(at, 1);
    waiter.park(); // an enter still waiting for its first answer says false
    // A loop under way ends by itself at its next check.
    if (this.line.length === 0 && !this.serving) this.idle();
  }

  /** Resolves once its last reserve has returned (and what it brought, released). */
  async ended(): Promise<void> {
    await this.loop;
  }

  private async serve(): Promise<void> {
    // The loop's last check and clearing `serving` happen in one turn (this
    // finally, no await between): a waiter that joins after it starts a new
    // loop, and never parks with none to serve it.
    try {
      let wait = 0; // the first try answers at once; then long-polls
      while (this.line.length > 0 && !this.halt.aborted) {
        const n = Math.min(this.line.length, this.lock.limit, 100);
        const started = this.deps.clock.now();
        let tokens: { id: string; body: string; reservation_id: string }[] = [];
        try {
          // Never cut by a stop: a reserve cut off mid-flight could leave a
          // token reserved by nobody until its reservation times out.
          tokens = await this.api.reserve(
            n,
            this.task.reservationTimeoutSeconds,
            wait,
          );
          this.failing = false;
        } catch (e) {
          if (!(e instanceof QueueError && e.status === 404)) {
            if (!this.failing) {
              this.deps.log.warn(
                `limit ${this.lock.label}: reserve from ${this.lock.queue}: ${
                  errorText(e)
                }; trying again`,
              );
            }
            this.failing = true;
            for (const waiter of this.line) waiter.park();
            await this.deps.clock.sleep(1000, this.halt).catch(() => {});
            wait = this.pollWait();
            continue;
          }
          // No lock queue yet: the repair below creates it with its tokens.
        }
        let passed = 0;
        for (const token of tokens) {
          const lease = await this.check(token);
          if (lease === undefined) continue;
          passed++;
          const waiter = this.line.shift();
          if (waiter === undefined || this.halt.aborted) await lease.release();
          else waiter.give(lease);
        }
        // Tokens posted just now (a new key's first, or missing ones) are
        // tried at once: no run waits for a repair.
        if (tokens.length < n && await this.repair()) {
          wait = 0;
          continue;
        }
        if (passed < n) { for (const waiter of this.line) waiter.park(); }
        // An empty answer sooner than the long-poll allows (wait 0, or a
        // server that ignores it) must not make this loop spin.
        if (
          wait > 0 && tokens.length === 0 &&
          this.deps.clock.now() - started < wait * 500
        ) {
          await this.deps.clock.sleep(1000, this.halt).catch(() => {});
        }
        wait = this.pollWait();
      }
      for (const waiter of this.line) waiter.park();
    } finally {
      this.serving = false;
      if (this.line.length === 0) this.idle();
    }
  }

  private pollWait(): number {
    return Math.max(1, this.task.pollWaitSeconds);
  }

  /**
   * A reserved token becomes a lease only if the lock queue counts at most
   * N messages now (the argument in the header); a surplus or old token is
   * deleted instead.
   */
  private async check(
    token: { id: string; body: string; reservation_id: string },
  ): Promise<Lease | undefined> {
    const { clock, log } = this.deps;
    const lease = new Lease(
      this.lock,
      this.api,
      token.id,
      token.reservation_id,
      this.task.reservationTimeoutSeconds,
      this.deps,
    );
    const posted = postedAt(token.body);
    if (posted === undefined || clock.now() - posted > RETIRE_AFTER_MS) {
      log.debug(`limit ${this.lock.label}: an old token retired`);
      await lease.discard();
      return undefined;
    }
    let count: number;
    try {
      count = await queueCall(
        () => this.api.queueSize(this.lock.queue),
        clock,
        3,
      );
    } catch (e) {
      log.warn(
        `limit ${this.lock.label}: cannot count its tokens (${
          errorText(e)
        }): not passing until it can`,
      );
      await lease.release();
      return undefined;
    }
    if (count > this.lock.limit) {
      log.warn(
        `limit ${this.lock.label}: ${count} tokens for ${this.lock.limit}: one deleted`,
      );
      await lease.discard();
      return undefined;
    }
    return lease;
  }

  /**
   * Posts the tokens missing, when the count is short twice, a random
   * moment apart: two workers rarely repair at once, and if they do, the
   * surplus stops runs (check), never doubles one.
   */
  private async repair(): Promise<boolean> {
    const { clock, log } = this.deps;
    const count = () =>
      this.api.queueSize(this.lock.queue).catch((e) => {
        if (e instanceof QueueError && e.status === 404) return 0;
        throw e;
      });
    try {
      if (await count() >= this.lock.limit) return false;
      const jitter = 200 + (this.deps.random ?? Math.random)() * 800;
      await clock.sleep(jitter, this.halt);
      const found = await count();
      if (found >= this.lock.limit) return false;
      const now = clock.now();
      // Once, not retried: a post whose reply was lost may have landed.
      await this.api.post(
        this.lock.queue,
        Array.from(
          { length: this.lock.limit - found },
          (_, i) => tokenBody(found + i + 1, this.lock.limit, now),
        ),
      );
      const what = `limit ${this.lock.label}: ${
        this.lock.limit - found
      } token(s) posted to ${this.lock.queue}`;
      if (found === 0) log.info(`${what} (found none)`);
      else log.warn(`${what} (found ${found} of ${this.lock.limit})`);
      return true;
    } catch (e) {
      if (!this.halt.aborted) {
        log.warn(
          `limit ${this.lock.label}: cannot repair its tokens (${
            errorText(e)
          }); trying again at the next poll`,
        );
      }
      return false;
    }
  }
}

/** A run's progress through its locks, in their order. */
interface Entry {
  held: Held;
  locks: Lock[];
  leases: Lease[];
  /** Waiting (logged, counted on the page) since it first had to. */
  waiting: boolean;
  granted: boolean;
  started: boolean;
  expiresMs?: number;
  /** Its place while it waits for a lease, to leave it if withdrawn. */
  place?: { gate: Gate; waiter: Waiter };
  /** Ends the watch for its cancel and expiry, kept while it waits. */
  unwatch?: () => void;
}

/**
 * The limits of this worker's runs. `enter` before a run starts, `hostDone`
 * as each host ends, `leave` when it is over; `run(stop)` hands back, at a
 * stop, the messages still waiting.
 */
export class Limits {
  private readonly gates = new Map<string, Gate>();
  private readonly entries = new Map<Held, Entry>();
  private readonly waiting = new Map<string, number>();
  private readonly halt = new AbortController();

  constructor(
    private readonly task: TaskConfig,
    private readonly queueName: string,
    private readonly deps: LimitsDeps,
    /** A run that now holds every lease it needs: back to the processors, first in line. */
    private readonly resume: (held: Held) => void,
    /** A waiting run cancelled or expired, out of its line: to be revoked with `reason`. */
    private readonly drop: (held: Held, reason: string) => void,
  ) {}

  /**
   * Whether `held` may run now. If not, it waits here (without a processor)
   * and comes back through `resume`; its next `enter` is then true.
   */
  async enter(held: Held, run: RunShape): Promise<boolean> {
    const known = this.entries.get(held);
    if (known !== undefined) {
      if (!known.granted || known.started) return false;
      known.started = true;
      return true;
    }
    const locks = locksFor(run, this.task.catalog, this.queueName);
    if (locks.length === 0) return true;
    const entry: Entry = {
      held,
      locks,
      leases: [],
      waiting: false,
      granted: false,
      started: false,
      expiresMs: run.expiresMs,
    };
    this.entries.set(held, entry);
    if (!await this.advance(entry)) return false;
    entry.started = true;
    return true;
  }

  /** A host of the run has ended: its per-host leases go back at once. */
  hostDone(held: Held, host: HostSpec): void {
    const entry = this.entries.get(held);
    if (entry === undefined || !entry.started) return;
    const done = entry.leases.filter((l) => l.lock.host === host.name);
    entry.leases = entry.leases.filter((l) => l.lock.host !== host.name);
    for (const lease of done) void lease.release();
  }

  /**
   * The message's run is over (it ran, or will not: revoked, rejected,
   * failed to start): every lease it holds goes back, and nothing else. A
   * message still waiting is not touched (its processor only parked it).
   */
  leave(held: Held): void {
    const entry = this.entries.get(held);
    if (entry === undefined || !entry.granted) return;
    this.entries.delete(held);
    for (const lease of entry.leases.splice(0)) void lease.release();
  }

  /**
   * Until `stop`: then no lease is given any more, every lease of a run not
   * started goes back, and it resolves to the messages still waiting, for
   * the worker to hand back as it does its unstarted ones.
   */
  async run(stop: AbortSignal): Promise<Held[]> {
    if (!stop.aborted) {
      await new Promise((resolve) =>
        stop.addEventListener("abort", resolve, { once: true })
      );
    }
    this.halt.abort();
    await Promise.all([...this.gates.values()].map((g) => g.ended()));
    const handBack: Held[] = [];
    const releases: Promise<void>[] = [];
    for (const entry of [...this.entries.values()]) {
      if (entry.started) continue;
      this.entries.delete(entry.held);
      releases.push(...entry.leases.splice(0).map((l) => l.release()));
      this.setWaiting(entry, false);
      // A granted one is back in the fetcher's line, which hands it back.
      if (!entry.granted) handBack.push(entry.held);
    }
    await Promise.all(releases);
    return handBack;
  }

  /** Takes the entry's remaining leases in order; false if it must wait for one. */
  private async advance(entry: Entry): Promise<boolean> {
    while (entry.leases.length < entry.locks.length) {
      if (this.halt.signal.aborted) return false;
      const lock = entry.locks[entry.leases.length];
      const gate = this.gate(lock);
      const waiter = new Waiter((lease) => {
        if (this.entries.get(entry.held) !== entry) {
          return void lease.release(); // handed back or withdrawn meanwhile
        }
        entry.leases.push(lease);
        this.advance(entry).then((all) => {
          if (!all) return;
          this.setWaiting(entry, false);
          this.resume(entry.held);
        }, (e) => this.deps.log.error(`limits: ${errorText(e)}`));
      });
      entry.place = { gate, waiter };
      const now = await gate.enter(waiter);
      if (this.entries.get(entry.held) !== entry) {
        // Withdrawn while its enter was under way: a lease it got goes back.
        if (now) await waiter.lease!.release();
        return false;
      }
      if (!now) {
        if (!this.halt.signal.aborted) {
          this.deps.log.info(
            `message ${entry.held.message.id}: waiting for ${lock.label} (at most ${lock.limit} at once)`,
            fieldsOf(entry.held),
          );
        }
        this.setWaiting(entry, true);
        return false;
      }
      entry.leases.push(waiter.lease!);
    }
    entry.granted = true;
    entry.place = undefined;
    return true;
  }

  /**
   * A waiting run cancelled or expired: out of its line now (the next in it
   * unaffected), the leases it holds back, nothing else freed; the worker
   * revokes its message. One granted meanwhile is the processors' to revoke.
   */
  private withdraw(
    entry: Entry,
    what: "not run" | "revoked",
    reason: string,
  ): void {
    if (this.entries.get(entry.held) !== entry || entry.granted) return;
    const { held } = entry;
    this.deps.log.warn(
      `message ${held.message.id}: ${what}: ${reason} (it was waiting for ${
        entry.locks[entry.leases.length].label
      })`,
      fieldsOf(held),
    );
    this.entries.delete(held);
    entry.place?.gate.remove(entry.place.waiter);
    entry.place = undefined;
    for (const lease of entry.leases.splice(0)) void lease.release();
    this.setWaiting(entry, false);
    this.drop(held, reason);
  }

  /** While `entry` waits: its cancel (peeked every second, lib/revoke.ts) and its expiry. */
  private watch(entry: Entry): void {
    const { held, expiresMs } = entry;
    const expiry = new AbortController();
    entry.unwatch = () => expiry.abort();
    if (expiresMs !== undefined) {
      const left = Math.max(0, expiresMs - this.deps.clock.now());
      void this.deps.clock.sleep(left, expiry.signal).then(() => {
        if (expiry.signal.aborted) return;
        this.withdraw(entry, "revoked", expiredReason(expiresMs));
      });
    }
    const unwatch = this.deps.revocations?.watch(
      [runIdOf(held), held.message.id],
      (revocation) =>
        this.withdraw(entry, "not run", revokedReason(revocation)),
    );
    // Cancelled already, the watch called back at once and is over.
    if (unwatch === undefined || expiry.signal.aborted) return;
    entry.unwatch = () => {
      unwatch();
      expiry.abort();
    };
  }

  private gate(lock: Lock): Gate {
    let gate = this.gates.get(lock.queue);
    if (gate === undefined) {
      const made: Gate = new Gate(
        lock,
        this.task,
        this.deps,
        this.halt.signal,
        () => {
          if (this.gates.get(lock.queue) === made) {
            this.gates.delete(lock.queue);
          }
        },
      );
      this.gates.set(lock.queue, made);
      gate = made;
    }
    return gate;
  }

  private setWaiting(entry: Entry, waiting: boolean): void {
    if (entry.waiting === waiting) return;
    entry.waiting = waiting;
    const task = taskLabel(entry.held);
    const count = (this.waiting.get(task) ?? 0) + (waiting ? 1 : -1);
    this.waiting.set(task, count);
    this.deps.monitor?.runsWaiting(task, count);
    // Last: a cancel already seen withdraws it from within the watch.
    if (waiting) this.watch(entry);
    else entry.unwatch?.();
  }
}
