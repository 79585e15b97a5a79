/**
 * lib/stream.ts: a run's output while it runs. To the sender, through its
 * reply queue (a message with "stream": true and "reply_to"): a STARTED
 * event naming the hosts, then OUTPUT events, batched per host (at most
 * every 250 ms or 64 Ki characters, whole lines, as the log shows them:
 * masked and escaped); the settler posts the result after them. To whoever
 * follows the run on the worker's listener (LiveRuns, GET /runs/<id>/events):
 * the same events, then its RESULT. And the lines a follower prints
 * (send --follow, runs follow).
 *
 * It never delays the command: lines wait in memory and go out off the
 * output path, one post at a time per run; while a post is under way the
 * next batch grows, and past 256 Ki characters a host's oldest waiting lines
 * are dropped (counted, and said in the next event and the log). A post is
 * never retried, and a run posts at most MAX_STREAM_POSTS events per attempt.
 */

import { type Clock } from "./retry.ts";
import { type Log } from "./log.ts";
import { EventClient, sseEvent } from "./monitor.ts";
import { errorText, isRecord } from "./util.ts";

/** A batch goes out this long after its first line, at the latest. */
export const STREAM_INTERVAL_MS = 250;
/** A host's batch goes out once it holds this many characters. */
export const STREAM_BATCH_CHARS = 64 * 1024;
/** Events (STARTED and OUTPUT) posted to the reply queue per attempt of a run. */
export const MAX_STREAM_POSTS = 1_000;
/** A host's lines waiting for a slow queue, at most; the oldest go first. */
const MAX_WAITING_CHARS = 256 * 1024;
/** How long the end of a run waits for its last posts before the result goes. */
const END_WAIT_MS = 5_000;
/** Recent events a follower who joins mid-run is shown first. */
const RECENT_CHARS = 64 * 1024;
/** Followers of one run on the listener. */
const MAX_FOLLOWERS = 8;

type Stream = "out" | "err";
type Line = [Stream, string];

export type StreamEvent =
  | {
    event: "STARTED";
    task_id: string;
    message_id: string;
    attempt: number;
    hosts: string[];
    at: string;
  }
  | {
    event: "OUTPUT";
    task_id: string;
    message_id: string;
    host: string;
    lines: Line[];
    /** Lines of this host not streamed before these (a slow queue). */
    dropped: number;
    /** The last event this attempt posts: MAX_STREAM_POSTS reached. */
    limit?: true;
  };

/** One host's lines waiting to go out. */
class Waiting {
  lines: Line[] = [];
  chars = 0;
  dropped = 0;

  add(line: Line, max: number): boolean {
    this.lines.push(line);
    this.chars += line[1].length;
    let dropped = false;
    while (this.chars > max && this.lines.length > 1) {
      this.chars -= this.lines.shift()![1].length;
      this.dropped++;
      dropped = true;
    }
    return dropped;
  }

  /** Lines of up to `max` characters (one line at least), oldest first. */
  take(max: number): { lines: Line[]; dropped: number } {
    let chars = 0;
    let n = 0;
    while (
      n < this.lines.length &&
      (n === 0 || chars + this.lines[n][1].length <= max)
    ) chars += this.lines[n++][1].length;
    const taken = { lines: this.lines.splice(0, n), dropped: this.dropped };
    this.chars -= chars;
    this.dropped = 0;
    return taken;
  }
}

/** Where a run's events go: the reply queue (posts), the listener's followers (feed). */
export interface StreamSinks {
  post?: (body: string) => Promise<unknown>;
  feed?: (event: StreamEvent) => void;
}

/** One attempt of a run, streamed. */
export class RunStream {
  private readonly toQueue = new Map<string, Waiting>();
  private readonly toFeed = new Map<string, Waiting>();
  private timer?: ReturnType<typeof setTimeout>;
  private posting?: Promise<void>;
  private readonly outbox: StreamEvent[] = [];
  private posts = 0;
  private droppedLines = 0;
  private saidDropped = false;
  private ended = false;

  constructor(
    private readonly ids: { taskId: string; messageId: string },
    private readonly sinks: StreamSinks,
    private readonly clock: Clock,
    private readonly log: Log,
    private readonly about: string,
  ) {}

  started(hosts: string[], attempt: number): void {
    const event: StreamEvent = {
      event: "STARTED",
      task_id: this.ids.taskId,
      message_id: this.ids.messageId,
      attempt,
      hosts,
      at: new Date(this.clock.now()).toISOString(),
    };
    this.sinks.feed?.(event);
    if (this.sinks.post) this.send(event);
  }

  /** A whole line, as the log shows it (masked, escaped). */
  line(host: string, stream: Stream, text: string): void {
    if (this.ended) return;
    if (this.sinks.feed) {
      waitingOf(this.toFeed, host).add([stream, text], MAX_WAITING_CHARS);
    }
    if (this.sinks.post && this.posts < MAX_STREAM_POSTS) {
      const waiting = waitingOf(this.toQueue, host);
      if (waiting.add([stream, text], MAX_WAITING_CHARS)) this.fellBehind();
      if (waiting.chars >= STREAM_BATCH_CHARS && this.posting === undefined) {
        this.flush();
        return;
      }
    }
    this.timer ??= setTimeout(() => this.flush(), STREAM_INTERVAL_MS);
  }

  /** The command ended: what waits goes out (within END_WAIT_MS), before the result. */
  async end(): Promise<{ posts: number; dropped: number }> {
    this.flush();
    this.ended = true;
    const deadline = this.clock.now() + END_WAIT_MS;
    while (this.posting !== undefined || this.pendingForQueue()) {
      if (this.clock.now() >= deadline) {
        this.log.warn(
          `${this.about}: its last output was not streamed within ${
            END_WAIT_MS / 1000
          } s (the queue is slow); the result follows without it`,
        );
        break;
      }
      if (this.posting === undefined) this.flush();
      const over = new AbortController();
      await Promise.race([
        this.posting,
        this.clock.sleep(deadline - this.clock.now(), over.signal),
      ]).catch(() => {});
      over.abort();
    }
    return { posts: this.posts, dropped: this.droppedLines };
  }

  private pendingForQueue(): boolean {
    if (this.posts >= MAX_STREAM_POSTS) return false;
    return this.outbox.length > 0 ||
      [...this.toQueue.values()].some((w) => w.lines.length > 0);
  }

  private flush(): void {
    clearTimeout(this.timer);
    this.timer = undefined;
    for (const [host, waiting] of this.toFeed) {
      while (waiting.lines.length > 0) {
        this.sinks.feed!(this.output(host, waiting.take(STREAM_BATCH_CHARS)));
      }
    }
    // While a post is under way the queue's lines wait: the next batch grows.
    if (this.posting !== undefined) {
      if (this.pendingForQueue()) {
        this.timer = setTimeout(() => this.flush(), STREAM_INTERVAL_MS);
      }
      return;
    }
    for (const [host, waiting] of this.toQueue) {
      while (waiting.lines.length > 0) {
        this.outbox.push(this.output(host, waiting.take(STREAM_BATCH_CHARS)));
      }
    }
    this.pump();
  }

  private output(
    host: string,
    taken: { lines: Line[]; dropped: number },
  ): StreamEvent {
    return {
      event: "OUTPUT",
      task_id: this.ids.taskId,
      message_id: this.ids.messageId,
      host,
      ...taken,
    };
  }

  private send(event: StreamEvent): void {
    this.outbox.push(event);
    this.pump();
  }

  /** One post at a time, in order, until the outbox is empty or the bound is reached. */
  private pump(): void {
    if (this.posting !== undefined || this.outbox.length === 0) return;
    const event = this.outbox.shift()!;
    if (this.posts >= MAX_STREAM_POSTS) {
      this.outbox.length = 0;
      return;
    }
    this.posts++;
    if (this.posts === MAX_STREAM_POSTS && event.event === "OUTPUT") {
      event.limit = true;
      this.log.warn(
        `${this.about}: ${MAX_STREAM_POSTS} stream posts made: the rest of its output is not streamed (the log and the result have it)`,
      );
    }
    this.posting = this.sinks.post!(JSON.stringify(event))
      .then(() => {}, (e) => {
        // Not retried: the next batch goes on; the lost lines are counted.
        if (event.event === "OUTPUT") this.droppedLines += event.lines.length;
        this.log.warn(
          `${this.about}: a stream post failed (${
            errorText(e)
          }); its output goes on with the next one`,
        );
      })
      .finally(() => {
        this.posting = undefined;
        if (this.outbox.length > 0) this.pump();
        else if (this.pendingForQueue() && this.timer === undefined) {
          this.timer = setTimeout(() => this.flush(), STREAM_INTERVAL_MS);
        }
      });
  }

  private fellBehind(): void {
    this.droppedLines++;
    if (this.saidDropped) return;
    this.saidDropped = true;
    this.log.warn(
      `${this.about}: the reply queue takes its stream slower than the output comes: oldest waiting lines dropped (the next event says how many; the log and the result have them)`,
    );
  }
}

function waitingOf(map: Map<string, Waiting>, host: string): Waiting {
  let waiting = map.get(host);
  if (waiting === undefined) map.set(host, waiting = new Waiting());
  return waiting;
}

// ---------------------------------------------------------------------------
// The listener's followers: GET /runs/<id>/events
// ---------------------------------------------------------------------------

/** A run's end for its followers: its result as the reply queue would have it. */
export interface RunEnd {
  event: "RESULT";
  status: string;
  message_id: string;
  task_id: string;
  attempts: number;
  reason: string | null;
  hosts: Record<string, unknown>;
}

interface Followed {
  messageIds: Set<string>;
  recent: (StreamEvent | RunEnd)[];
  recentChars: number;
  followers: Set<EventClient>;
}

/** The runs under way on this worker, for whoever follows one on the listener. */
export class LiveRuns {
  private readonly runs = new Map<string, Followed>();
  private readonly byMessage = new Map<string, string>();

  /** A run starts (an attempt of it): its events go to its followers. */
  open(runId: string, messageId: string): (event: StreamEvent) => void {
    let run = this.runs.get(runId);
    if (run === undefined) {
      run = {
        messageIds: new Set(),
        recent: [],
        recentChars: 0,
        followers: new Set(),
      };
      this.runs.set(runId, run);
    }
    run.messageIds.add(messageId);
    this.byMessage.set(messageId, runId);
    const followed = run;
    return (event) => this.tell(followed, event);
  }

  /** The run's attempt is settled: its followers get the end (made only for them), and are let go. */
  settled(runId: string, messageId: string, end: () => RunEnd): void {
    const run = this.runs.get(runId);
    if (run === undefined || !run.messageIds.has(messageId)) return;
    const text = run.followers.size === 0
      ? undefined
      : sseEvent("result", end());
    for (const follower of run.followers) {
      follower.send(text!);
      follower.close();
    }
    for (const id of run.messageIds) this.byMessage.delete(id);
    this.runs.delete(runId);
  }

  /** The run a run id or message id names, if it is under way here. */
  runIdOf(id: string): string | undefined {
    return this.runs.has(id) ? id : this.byMessage.get(id);
  }

  /** An event stream of a run under way: what it showed lately, then as it comes. */
  follow(id: string): Response | undefined {
    const runId = this.runIdOf(id);
    const run = runId === undefined ? undefined : this.runs.get(runId);
    if (run === undefined) return undefined;
    if (run.followers.size >= MAX_FOLLOWERS) {
      return new Response(
        `run ${runId} has ${MAX_FOLLOWERS} followers already; stop one\n`,
        { status: 503 },
      );
    }
    const follower = new EventClient((gone) => run.followers.delete(gone));
    for (const event of run.recent) {
      follower.send(sseEvent(eventName(event), event));
    }
    run.followers.add(follower);
    return new Response(follower.stream, {
      headers: {
        "Cache-Control": "no-store",
        "Content-Type": "text/event-stream; charset=utf-8",
        "X-Content-Type-Options": "nosniff",
      },
    });
  }

  private tell(run: Followed, event: StreamEvent): void {
    const chars = event.event === "OUTPUT"
      ? event.lines.reduce((n, [, l]) => n + l.length, 0)
      : 0;
    run.recent.push(event);
    run.recentChars += chars;
    while (run.recentChars > RECENT_CHARS && run.recent.length > 2) {
      // The STARTED event stays first.
      const [gone] = run.recent.splice(1, 1);
      if (gone.event === "OUTPUT") {
        run.recentChars -= gone.lines.reduce((n, [, l]) => n + l.length, 0);
      }
    }
    if (run.followers.size === 0) return;
    const text = sseEvent(eventName(event), event);
    for (const follower of run.followers) follower.send(text);
  }
}

function eventName(event: StreamEvent | RunEnd): string {
  return event.event.toLowerCase();
}

// ---------------------------------------------------------------------------
// What a follower prints
// ---------------------------------------------------------------------------

/**
 * A stream event's lines as the worker logs them (`[host] out: ...`), for
 * stdout, and notes for stderr; undefined for a body that is no stream event
 * (a result, say).
 */
export function followedLines(
  body: unknown,
): { out: string[]; notes: string[] } | undefined {
  if (!isRecord(body) || typeof body.event !== "string") return undefined;
  if (body.event === "STARTED") {
    const hosts = Array.isArray(body.hosts) ? body.hosts.map(String) : [];
    return {
      out: [],
      notes: [
        `started: message ${body.message_id}, attempt ${body.attempt}, on ${
          hosts.join(", ")
        }`,
      ],
    };
  }
  if (body.event !== "OUTPUT") return undefined;
  const host = String(body.host);
  const out: string[] = [];
  const notes: string[] = [];
  if (typeof body.dropped === "number" && body.dropped > 0) {
    notes.push(
      `[${host}] ${body.dropped} line(s) not streamed here (the queue was slow); the worker's log has them`,
    );
  }
  for (const line of Array.isArray(body.lines) ? body.lines : []) {
    if (!Array.isArray(line) || typeof line[1] !== "string") continue;
    out.push(`[${host}] ${line[0] === "err" ? "err" : "out"}: ${line[1]}`);
  }
  if (body.limit === true) {
    notes.push(
      `the worker streams at most ${MAX_STREAM_POSTS} posts an attempt: the rest of the output is in its log (and the end of it in the result)`,
    );
  }
  return { out, notes };
}
