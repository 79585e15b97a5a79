/**
 * lib/held.ts: what the worker holds while it works on a message: the
 * reserved message with its current reservation id, the runs on its hosts,
 * and what went wrong; and what the worker is given to touch the world with
 * (WorkerDeps). Shared by the loop (tasks.ts), the fetcher and the settler.
 *
 * Types and two small lookups only: nothing here talks to the queue or SSH.
 */

import { type HostOutcome, Monitor, type Outcome } from "./monitor.ts";
import { type HostSpec } from "./hosts.ts";
import {
  type IronMqClient,
  type QueueApi,
  type QueueMessage,
} from "./ironmq.ts";
import { type Log, type LogFields, Secrets, Tail } from "./log.ts";
import { type MessageMeta, type MessagePlan } from "./message.ts";
import { type Clock } from "./retry.ts";
import { type Revocations } from "./revoke.ts";
import { type CommandRunner, type RunResult } from "./ssh.ts";
import { type LiveRuns } from "./stream.ts";

export interface WorkerDeps {
  queue: QueueApi;
  runner: CommandRunner;
  log: Log;
  clock: Clock;
  /** How often a held message's reservation is extended; default half of it. */
  touchIntervalMs?: number;
  /** Masked in what leaves the worker besides the log (dead-letter records). */
  secrets?: Secrets;
  /** Told what happens, for the metrics and the page (lib/monitor.ts). */
  monitor?: Monitor;
  /** Which runs are cancelled (lib/revoke.ts); without it, none is. */
  revocations?: Revocations;
  /** Runs under way, for their followers on the listener (lib/stream.ts). */
  live?: LiveRuns;
  /** Told each run's start and outcomes, for its history (lib/runs.ts). */
  runs?: RunHistory;
  /** A client for a lock queue of the catalog's limits (lib/limits.ts). */
  locks?: (
    queue: string,
  ) => Pick<
    IronMqClient,
    "reserve" | "touch" | "release" | "delete" | "post" | "queueSize"
  >;
}

/** The run history as the worker tells it (lib/runs.ts); it never throws or waits. */
export interface RunHistory {
  /** A message's command starts on its hosts. */
  startedRun(held: Held, plan: MessagePlan & { kind: "run" }): void;
  /** A message settled (the Settler's outcome), with this attempt's hosts. */
  settledRun(held: Held, outcome: Outcome, reason?: string): void;
  /** When the run of this message's Celery id succeeded, if it did: it is not run again. */
  succeededAt(held: Held): number | undefined;
}

/** A reserved message and its current reservation id (a touch replaces it). */
export interface Held {
  message: QueueMessage;
  reservationId: string;
  /** Which run this is, counting this one. */
  attempt: number;
  /** Touches the reservation while the message waits and runs. */
  keeper?: { stop(): Promise<void> };
  /** What the message says of itself (task, Celery id, reply queue), once read. */
  meta?: MessageMeta;
  /** Its task's max_attempts (else TASK_MAX_ATTEMPTS), once read. */
  maxAttempts?: number;
  /** The worker's secrets and the message's secret parameters. */
  secrets?: Secrets;
  /** Its runs, one a host, for the result. */
  runs?: RunRecord[];
}

export interface RunRecord {
  host: HostSpec;
  startedAt: number;
  finishedAt: number;
  result: RunResult;
  stdout: Tail;
  stderr: Tail;
}

/** What went wrong on the last run, for the log and the dead-letter record. */
export interface Failure {
  reason: string;
  exitStatus?: number | string;
  stderrTail?: string;
  /** The hosts to run it on again (the failed ones), when others succeeded. */
  hosts?: string[];
  /** Those hosts were stopped by a shutdown, not failed: no attempt counted. */
  notAnAttempt?: boolean;
  /** Each host's outcome, kept while its dead-letter record is owed. */
  outcomes?: Record<string, HostOutcome>;
}

/** A message's task for the metrics: its name, or TASK_COMMAND. */
export function taskLabel(held: Held): string {
  return held.meta?.task ?? "TASK_COMMAND";
}

/**
 * The run a message belongs to: its Celery `id` (a continuation for failed
 * hosts keeps it), else the queue message's own id.
 */
export function runIdOf(held: Held): string {
  return held.meta?.taskId ?? held.message.id;
}

/** What a message's log lines are about, for LOG_FORMAT=json. */
export function fieldsOf(held: Held): LogFields {
  return { message_id: held.message.id, task: held.meta?.task };
}
