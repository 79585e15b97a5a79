/**
 * lib/revoke.ts: cancelling a run. A revocation is a message on
 * `<queue>_revoked` naming a run (its Celery id, or a queue message id), who
 * cancelled it and until when it holds (TASK_REVOKE_TTL). Every worker peeks
 * that queue (never reserving it, so every worker sees every revocation) at
 * each long-poll round, and every second while it runs a command or a run
 * waits for a limit; the loop asks it whether a message it reserved is
 * revoked, and is told when a run it has under way (or waiting) is.
 *
 * It never stops a command itself (it tells the one who runs it) and never
 * takes a revocation away from the others: it deletes only expired ones.
 */

import {
  type IronMqClient,
  type QueueApi,
  QueueError,
  type StoredMessage,
} from "./ironmq.ts";
import { type Log, OutageLog } from "./log.ts";
import { type Clock } from "./retry.ts";
import { errorText, isRecord } from "./util.ts";

/** The queue the revocations of `queueName`'s runs go to. */
export function revokedQueueOf(queueName: string): string {
  return `${queueName}_revoked`;
}

/** IronMQ's peek shows at most 100 messages: the live revocations seen. */
const PEEK_MAX = 100;
/** Peeks no closer together than this (a drain's rounds come faster). */
const MIN_PEEK_GAP_MS = 250;
/** How often a worker with a command under way looks for its revocation. */
const RUNNING_PEEK_MS = 1_000;
/** Revocations remembered by one worker; the oldest make room. */
const MAX_KNOWN = 10_000;

export interface Revocation {
  /** The run's id (or one of its messages' ids). */
  run: string;
  by: string;
  atMs: number;
  expiresMs: number;
}

/** The message that cancels `run`, from `by`, holding for `ttlSeconds`. */
export function revocationBody(
  run: string,
  by: string,
  nowMs: number,
  ttlSeconds: number,
): string {
  return JSON.stringify({
    revoke: run,
    by,
    at: new Date(nowMs).toISOString(),
    expires_at: new Date(nowMs + ttlSeconds * 1000).toISOString(),
  });
}

/** A revocation's body read; undefined for anything else (ignored). */
export function parseRevocation(body: string): Revocation | undefined {
  let parsed: unknown;
  try {
    parsed = JSON.parse(body);
  } catch {
    return undefined;
  }
  if (!isRecord(parsed) || typeof parsed.revoke !== "string") return undefined;
  const atMs = typeof parsed.at === "string" ? Date.parse(parsed.at) : NaN;
  const expiresMs = typeof parsed.expires_at === "string"
    ? Date.parse(parsed.expires_at)
    : NaN;
  if (Number.isNaN(expiresMs) || parsed.revoke === "") return undefined;
  return {
    run: parsed.revoke,
    by: typeof parsed.by === "string" && parsed.by !== ""
      ? parsed.by.slice(0, 200)
      : "someone",
    atMs: Number.isNaN(atMs) ? expiresMs : atMs,
    expiresMs,
  };
}

/** The REVOKED result's reason: who cancelled it, and when. */
export function revokedReason(revocation: Revocation): string {
  return `cancelled by ${revocation.by} at ${
    new Date(revocation.atMs).toISOString()
  }`;
}

/** Posts a revocation of `run`; resolves to its message id. */
export async function postRevocation(
  queue: Pick<QueueApi, "post">,
  queueName: string,
  run: string,
  by: string,
  nowMs: number,
  ttlSeconds: number,
): Promise<string> {
  const [id] = await queue.post(revokedQueueOf(queueName), [
    revocationBody(run, by, nowMs, ttlSeconds),
  ]);
  return id;
}

/** A cancel asked on the listener (the page's Stop): posted, and what to tell the page. */
export async function cancelFromListener(
  queue: Pick<QueueApi, "post">,
  queueName: string,
  run: string,
  who: string,
  ttlSeconds: number,
  log: Log,
): Promise<{ ok: boolean; text: string }> {
  try {
    await postRevocation(queue, queueName, run, who, Date.now(), ttlSeconds);
  } catch (e) {
    return {
      ok: false,
      text: `cannot post the cancel of run ${run} to ${
        revokedQueueOf(queueName)
      }: ${errorText(e)}; try again`,
    };
  }
  log.info(`run ${run}: cancel asked by ${who}`);
  return { ok: true, text: `run ${run}: cancel posted` };
}

interface Watch {
  ids: string[];
  stop: (revocation: Revocation) => void;
}

/** One worker's view of the revocations, kept by peeking. */
export class Revocations {
  private readonly known = new Map<string, Revocation>();
  private readonly watches = new Set<Watch>();
  private readonly queueName: string;
  private readonly outage: OutageLog;
  private peeking?: Promise<void>;
  private lastPeekMs = -Infinity;
  private wake?: () => void;

  constructor(
    private readonly queue: Pick<IronMqClient, "peek" | "deleteMessage">,
    queueName: string,
    private readonly clock: Clock,
    private readonly log: Log,
  ) {
    this.queueName = revokedQueueOf(queueName);
    this.outage = new OutageLog(`peek at ${this.queueName}`, log);
  }

  /** The revocation of a message's run (or of the message itself), if one holds now. */
  of(ids: string[]): Revocation | undefined {
    const now = this.clock.now();
    for (const id of ids) {
      const revocation = this.known.get(id);
      if (revocation !== undefined && revocation.expiresMs > now) {
        return revocation;
      }
    }
    return undefined;
  }

  /**
   * Calls `stop` once, when one of `ids` is revoked (now, or at a later
   * peek); the returned function ends the watch.
   */
  watch(ids: string[], stop: (revocation: Revocation) => void): () => void {
    const watch: Watch = { ids, stop };
    const already = this.of(ids);
    if (already !== undefined) {
      stop(already);
      return () => {};
    }
    this.watches.add(watch);
    this.wake?.();
    return () => this.watches.delete(watch);
  }

  /** Peeks now, unless a peek is under way or one began within 250 ms. */
  refresh(): void {
    if (this.peeking !== undefined) return;
    if (this.clock.now() - this.lastPeekMs < MIN_PEEK_GAP_MS) return;
    this.lastPeekMs = this.clock.now();
    this.peeking = this.peek().finally(() => this.peeking = undefined);
  }

  /** While runs are watched (running, or waiting for a limit), a peek every second; until `stop`. */
  async run(stop: AbortSignal): Promise<void> {
    const onStop = () => this.wake?.();
    stop.addEventListener("abort", onStop, { once: true });
    while (!stop.aborted) {
      if (this.watches.size === 0) {
        await new Promise<void>((resolve) => this.wake = resolve);
        this.wake = undefined;
        continue;
      }
      this.refresh();
      await this.peeking;
      await this.clock.sleep(RUNNING_PEEK_MS, stop).catch(() => {});
    }
    stop.removeEventListener("abort", onStop);
    await this.peeking;
  }

  private async peek(): Promise<void> {
    let messages: StoredMessage[];
    try {
      messages = await this.queue.peek(this.queueName, PEEK_MAX);
    } catch (e) {
      // No such queue: nobody has cancelled anything yet.
      if (e instanceof QueueError && e.status === 404) {
        this.outage.recovered();
        return;
      }
      this.outage.failed(e, RUNNING_PEEK_MS);
      return;
    }
    this.outage.recovered();
    const now = this.clock.now();
    for (const message of messages) {
      const revocation = parseRevocation(message.body);
      if (revocation === undefined || revocation.expiresMs <= now) {
        // Expired (or not a revocation): nobody needs it; another worker
        // may have deleted it first.
        this.queue.deleteMessage(this.queueName, message.id).catch((e) => {
          if (!(e instanceof QueueError && e.status === 404)) {
            this.log.debug(
              `${this.queueName}: could not delete expired message ${message.id}: ${
                errorText(e)
              }`,
            );
          }
        });
        continue;
      }
      if (this.known.has(revocation.run)) continue;
      this.known.set(revocation.run, revocation);
      if (this.known.size > MAX_KNOWN) {
        this.known.delete(this.known.keys().next().value!);
      }
      this.log.info(
        `revocation seen: run ${revocation.run} ${
          revokedReason(revocation)
        } (holds until ${new Date(revocation.expiresMs).toISOString()})`,
      );
    }
    for (const watch of [...this.watches]) {
      const revocation = this.of(watch.ids);
      if (revocation === undefined) continue;
      this.watches.delete(watch);
      watch.stop(revocation);
    }
  }
}
