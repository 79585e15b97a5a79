/**
 * tasks.ts: a worker that turns IronMQ messages into commands on a remote server.
 *
 * The loop of the original tasks.py, `while True: get a message; run it over SSH;
 * delete it`, kept recognizable: for each message it reserves, it runs the
 * configured command over SSH, logs the output the way Fabric did
 * (`[host] out: ...`), and deletes the message only after the command succeeded.
 * A failed command is released for a retry; a message that keeps failing, or can
 * never run, goes to a dead-letter queue. With no IronMQ token or host configured
 * it starts the embedded queue server (mq_server.ts) in-process.
 *
 * The file reads top down: the entry point; the loop (TASK_CONCURRENCY
 * processors, each taking one message at a time); the processing step of one
 * message; then the parts it uses, each with one concern, in the manner of
 * Sidekiq's Manager, Processor and Fetcher: settling (batched deletes, releases,
 * dead letters), fetching (long-polls with a prefetch sized by the queue's round
 * trip), the retry helper, message parsing and quoting, logging, configuration
 * (with `--permissions`, the Deno flags that ./start grants), the IronMQ client,
 * known_hosts, and the SSH runner.
 */

import { createHash, createHmac, timingSafeEqual } from "node:crypto";
import { Buffer } from "node:buffer";
import { userInfo } from "node:os";
// @ts-types="@types/ssh2"
import { Client, type ClientChannel, utils as sshUtils } from "ssh2";
import { configure, getLogger, type LogRecord } from "@logtape/logtape";
import { parse as parseYaml } from "yaml";
import {
  bracketIPv6,
  type Env,
  envValue,
  errorText,
  isLoopback,
  isRecord,
  type QueueServer,
  type QueueServerOptions,
  queueServerOptionsFromEnv,
  readAtMost,
  startQueueServer,
} from "./mq_server.ts";
import { type HostOutcome, Monitor, type Outcome } from "./web.ts";

// ---------------------------------------------------------------------------
// Entry point (called at the bottom of the file, once everything is defined)
// ---------------------------------------------------------------------------

/** Starts everything from the environment; resolves to the exit code. */
async function main(): Promise<number> {
  const env = Deno.env.toObject();
  const output = new StdoutLines();
  let config: Config;
  let credentials: SshCredentials;
  try {
    config = parseConfig(env, configContext(env));
    credentials = loadSshCredentials(config.ssh);
  } catch (e) {
    output.write(fatalText(e, env));
    await output.flush();
    return 2;
  }
  const secrets = new Secrets([
    config.queue.token,
    config.ssh.passphrase,
    config.http?.token,
  ]);
  const log = await setupLogging(
    output.write,
    config.logLevel,
    secrets,
    config.logFormat,
  );

  let server: QueueServer | undefined;
  if (config.embedded) {
    try {
      // Its own lines (listening, a client that hung up, a full disk) join the log.
      server = await startQueueServer({
        ...config.embedded,
        log: (line) => log.info(line),
      });
    } catch (e) {
      log.error(
        `cannot start the embedded queue server: ${errorText(e)}${
          embeddedServerHint(e, config.embedded)
        }`,
      );
      await output.flush();
      return 1;
    }
    config.queue.baseUrl = server.url;
    log.info(`post a test message: ${curlExample(config.queue)}`);
  }

  // What the worker does, counted and shown: web.ts. With TASK_HTTP_PORT its
  // listener serves the page, the metrics and the dead-letter actions;
  // without one, nothing is counted.
  const monitor = config.http ? new Monitor() : undefined;
  let web: { close(): Promise<void> } | undefined;
  if (monitor && config.http) {
    try {
      web = await monitor.serve({
        ...config.http,
        deadLetters: new DeadLetters(
          new IronMqClient(config.queue),
          config.task.deadLetterQueue,
        ),
        maskBody: (body) => maskedBody(body, config.task.catalog, secrets),
        log: (line) => log.info(line),
      });
    } catch (e) {
      log.error(
        `cannot listen on ${config.http.hostname}:${config.http.port}: ${
          errorText(e)
        } (set TASK_HTTP_HOST and TASK_HTTP_PORT to a free address, or unset TASK_HTTP_PORT)`,
      );
      await server?.close();
      await output.flush();
      return 1;
    }
  }

  const stop = new AbortController();
  const hosts = servedHosts(config.task);
  const runner = new SshHosts(
    config.ssh,
    credentials,
    hosts,
    config.task.concurrency,
    log,
    monitor,
  );
  const worker = new Worker(
    config.task,
    {
      queue: new IronMqClient(config.queue, monitor),
      runner,
      log,
      clock: realClock,
      secrets,
      monitor,
    },
    config.queue.queueName,
  );
  let firstSignalAt = 0;
  const onSignal = () => {
    // Ctrl-C reaches the worker twice at once (from the terminal, and from
    // `deno task` passing it on): only a later one means "stop now".
    if (stop.signal.aborted && Date.now() - firstSignalAt < 1000) return;
    if (stop.signal.aborted) {
      log.warn("second stop signal: stopping running commands now");
      worker.abortRunning();
      return;
    }
    log.info("stop signal received: no new messages will be reserved");
    firstSignalAt = Date.now();
    stop.abort();
  };
  Deno.addSignalListener("SIGTERM", onSignal);
  Deno.addSignalListener("SIGINT", onSignal);

  const catalog = config.task.catalog;
  const runs = catalog === undefined
    ? `command: ${config.task.command}`
    : `tasks from ${catalog.path}: ${[...catalog.tasks.keys()].join(", ")}`;
  log.info(
    `worker: queue ${config.queue.queueName} at ${config.queue.baseUrl}, ssh ${
      hosts.length === 1 ? hostKey(hosts[0]) : `${hosts.length} hosts`
    }, ${runs}, concurrency ${config.task.concurrency}`,
  );
  for (const warning of config.warnings) log.warn(warning);
  try {
    await worker.run(stop.signal);
  } finally {
    Deno.removeSignalListener("SIGTERM", onSignal);
    Deno.removeSignalListener("SIGINT", onSignal);
    runner.close();
    await web?.close();
    await server?.close();
  }
  log.info("stopped");
  await output.flush();
  return 0;
}

/** A configuration error for the terminal or svlogd: one problem a line, escaped. */
function fatalText(e: unknown, env: Env): string {
  if (envValue(env, "LOG_FORMAT") === "json") {
    // As LOG_FORMAT=json's lines are, for a log shipper reading them.
    return JSON.stringify({
      time: new Date().toISOString(),
      level: "fatal",
      message: escapeControls(errorText(e)),
    });
  }
  return `FATAL ${errorText(e).split("\n").map(escapeControls).join("\n  ")}`;
}

/** What to do when the embedded server cannot start: another port, or the server already there. */
function embeddedServerHint(e: unknown, options: QueueServerOptions): string {
  const text = errorText(e);
  if (/address already in use|AddrInUse/i.test(text)) {
    const host = options.hostname ?? "127.0.0.1";
    const port = options.port ?? 8080;
    const token = options.token === undefined
      ? ""
      : " IRON_TOKEN=<its MQ_TOKEN>";
    return `. Port ${port} is taken: start this one on another port (MQ_PORT=${
      port + 1
    }), or, if a queue server already runs there, use it: IRON_HOST=${host} IRON_PORT=${port} IRON_SCHEME=http${token}`;
  }
  if (/database is locked|locked/i.test(text)) {
    return `. Another queue server holds ${
      options.dbPath ?? "ironmq.sqlite"
    }: stop it, or give this one its own file (MQ_DB=/path/to/other.sqlite)`;
  }
  return " (MQ_HOST, MQ_PORT and MQ_DB configure it; or set IRON_HOST and IRON_TOKEN to use another IronMQ server)";
}

// ---------------------------------------------------------------------------
// The loop: TASK_CONCURRENCY processors, each taking one message at a time
// ---------------------------------------------------------------------------

export interface WorkerDeps {
  queue: QueueApi;
  runner: CommandRunner;
  log: Log;
  clock: Clock;
  /** How often a held message's reservation is extended; default half of it. */
  touchIntervalMs?: number;
  /** Masked in what leaves the worker besides the log (dead-letter records). */
  secrets?: Secrets;
  /** Told what happens, for the metrics and the page (web.ts). */
  monitor?: Monitor;
}

/** A reserved message and its current reservation id (a touch replaces it). */
interface Held {
  message: QueueMessage;
  reservationId: string;
  /** Which run this is, counting this one. */
  attempt: number;
  /** Touches the reservation while the message waits and runs. */
  keeper?: Keeper;
  /** What the message says of itself (task, Celery id, reply queue), once read. */
  meta?: MessageMeta;
  /** Its task's max_attempts (else TASK_MAX_ATTEMPTS), once read. */
  maxAttempts?: number;
  /** The worker's secrets and the message's secret parameters. */
  secrets?: Secrets;
  /** Its runs, one a host, for the result. */
  runs?: RunRecord[];
}

interface RunRecord {
  host: HostSpec;
  startedAt: number;
  finishedAt: number;
  result: RunResult;
  stdout: Tail;
  stderr: Tail;
}

/** What went wrong on the last run, for the log and the dead-letter record. */
interface Failure {
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

export class Worker {
  private readonly fetcher: Fetcher;
  private readonly settler: Settler;
  /** How to stop each running command (grace period over, or a second signal). */
  private readonly running = new Set<AbortController>();
  private readonly hardStop = new AbortController();
  /** Aborted by a stop signal: no host starts after it, not even in a fan-out. */
  private stopping?: AbortSignal;
  private readonly attempts: AttemptCounter;

  constructor(
    private readonly task: TaskConfig,
    private readonly deps: WorkerDeps,
    queueName: string,
  ) {
    const attempts = new AttemptCounter();
    this.settler = new Settler(
      task,
      deps,
      queueName,
      attempts,
      (held) => this.fetcher.forget(held),
      () => this.stopping,
    );
    this.attempts = attempts;
    this.fetcher = new Fetcher(
      task,
      deps,
      queueName,
      attempts,
      this.settler,
      this.hardStop.signal,
    );
  }

  /**
   * `process_one until done`, by TASK_CONCURRENCY processors at once, until
   * `stop` aborts. The fetcher keeps reserved messages ready, so a processor
   * that finishes starts its next command without a round trip to the queue.
   */
  async run(stop: AbortSignal): Promise<void> {
    this.stopping = stop;
    await this.fetcher.ensureQueue(stop);
    const fetching = this.fetcher.run(stop);
    const processor = async () => {
      for (;;) {
        const held = await this.fetcher.take(stop);
        if (held === undefined) return; // stopping
        await this.processOne(held).catch((e) => {
          this.deps.log.error(
            `message ${held.message.id}: unexpected error: ${errorText(e)}`,
          );
          // Never left reserved, touched forever: back for a later try.
          this.settler.notRun(
            held,
            this.task.retryDelaySeconds,
            "unexpected error",
          );
        });
      }
    };
    const processing = Promise.all(
      Array.from({ length: this.task.concurrency }, processor),
    );
    await settledOrAborted(processing, stop);
    await this.gracePeriod(processing);
    await fetching; // its last long-poll, and what it held, released
    await this.settler.idle();
  }

  /** Stops every running command now (a second SIGTERM or Ctrl-C). */
  abortRunning(): void {
    this.hardStop.abort();
    for (const command of this.running) command.abort();
  }

  /**
   * One message, start to end, as in tasks.py: run its command, then delete it
   * (success), release it for a retry (failure, or no run at all), or move it
   * to the dead-letter queue (attempts used up, or a body that can never run).
   * The settler does the queue calls (and posts the result, when the message
   * asks for one), so the processor moves on at once.
   */
  private async processOne(held: Held): Promise<void> {
    const { log, clock } = this.deps;
    const id = held.message.id;
    const plan = planMessage(
      held.message.body,
      this.task.catalog,
      this.task.command,
      clock.now(),
      this.task.hosts,
    );
    held.meta = plan.meta;
    held.secrets = (this.deps.secrets ?? new Secrets([])).with(
      plan.kind === "run" ? plan.secrets : [],
    );
    const named = plan.meta.task === undefined ? "" : ` (${plan.meta.task})`;
    const about = fieldsOf(held);
    const owed = this.attempts.owed(id);
    if (owed !== undefined) {
      // Its outcome is known here, but its dead-letter record or its result
      // could not be posted then: post it now, without running it again.
      log.warn(
        `message ${id}${named}: not run again: its ${owed.status} ${
          owed.kind === "record" ? "dead-letter record" : "result"
        } is still to be posted`,
        about,
      );
      return owed.kind === "record"
        ? this.settler.deadLetter(
          Object.assign(held, { attempt: owed.attempt }),
          owed.failure,
          owed.status,
          true,
        )
        : this.settler.resendPosts(held, owed);
    }
    switch (plan.kind) {
      case "reject":
        log.error(
          `message ${id}${named}: will not run anything: ${plan.reason}`,
          about,
        );
        return this.settler.deadLetter(
          held,
          { reason: plan.reason },
          "REJECTED",
        );
      case "revoke":
        log.warn(`message ${id}${named}: revoked: ${plan.reason}`, about);
        return this.settler.revoke(held, plan.reason);
      case "hold": {
        const seconds = Math.ceil((plan.untilMs - clock.now()) / 1000);
        log.info(
          `message ${id}${named}: held back until its eta, ${
            new Date(plan.untilMs).toISOString()
          }`,
          about,
        );
        // IronMQ delays a release by at most 7 days: a later eta takes several.
        return this.settler.notRun(held, Math.min(604_800, seconds), "its eta");
      }
    }
    held.attempt += plan.meta.priorRetries;
    held.maxAttempts = plan.task?.maxAttempts ?? this.task.maxAttempts;

    const { hosts } = plan;
    const display = held.secrets.mask(plan.display);
    if (hosts.length > 1) {
      log.info(
        `message ${id}: ${plan.meta.task ?? display} on ${hosts.length} hosts`,
        about,
      );
    }
    log.debug(`message ${id}${named}: attempt ${held.attempt}`, about);
    const timeoutMs = plan.task?.timeoutMs ?? this.task.timeoutMs;
    const limit = `${timeoutMs / 1000} s`;
    const limitSource = plan.task ? "its timeout" : "TASK_TIMEOUT";
    const runs = await this.fanOut(hosts, async (host) => {
      log.info(`[${host.name}] run: ${display}`, { ...about, host: host.name });
      const run = await this.execute(
        host,
        plan.command,
        display,
        timeoutMs,
        held,
      );
      logEnd(log, run, id, limit, { ...about, host: host.name });
      return run;
    });
    held.runs = runs;

    const failed = runs.filter((r) =>
      r.result.kind !== "exit" || r.result.code !== 0
    );
    if (hosts.length > 1) {
      const ok = `message ${id}: ${
        hosts.length - failed.length
      } of ${hosts.length} hosts succeeded`;
      if (failed.length === 0) log.info(ok, about);
      else {
        log.warn(
          `${ok}; failed: ${
            failed.map((r) => `${r.host.name} (${briefly(r.result, limit)})`)
              .join(", ")
          }`,
          about,
        );
      }
    }
    if (failed.length === 0) return this.settler.delete(held);
    // Nothing started anywhere, in a stop or while no host can be reached:
    // not an attempt. A host that cannot be reached while others can is that
    // host's failure, counted like a failed command; so is a command whose
    // connection was lost after it started (it may have run).
    const stopped = failed.some((r) => r.result.kind === "aborted");
    if (
      failed.length === runs.length &&
      failed.every((r) =>
        r.result.kind === "aborted" || r.result.kind === "unreachable"
      ) &&
      (stopped || !this.deps.runner.reachable())
    ) {
      return stopped
        ? this.settler.notRun(
          held,
          0,
          "stopped by shutdown",
          this.fetcher.pollsEnded,
        )
        : this.settler.notRun(held, this.task.retryDelaySeconds, "SSH failed");
    }
    const failure = failureOf(failed, runs.length, limit, limitSource);
    // Only the failed hosts run again; those that succeeded never do.
    if (failed.length < runs.length) {
      failure.hosts = failed.map((r) => r.host.name);
      // Only stopped by the shutdown, they have not had an attempt.
      failure.notAnAttempt = failed.every((r) => r.result.kind === "aborted");
    }
    return this.settler.failed(held, failure);
  }

  /** Runs `each` for every host, at most TASK_HOST_PARALLELISM at once, in order. */
  private async fanOut(
    hosts: HostSpec[],
    each: (host: HostSpec) => Promise<RunRecord>,
  ): Promise<RunRecord[]> {
    const runs: RunRecord[] = [];
    let next = 0;
    const lane = async () => {
      while (next < hosts.length) {
        const i = next++;
        runs[i] = await each(hosts[i]);
      }
    };
    const lanes = Math.min(this.task.hostParallelism, hosts.length);
    await Promise.all(Array.from({ length: lanes }, lane));
    return runs;
  }

  /** Runs a command on one host, logging its output line by line as Fabric did. */
  private async execute(
    host: HostSpec,
    command: string,
    display: string,
    timeoutMs: number,
    held: Held,
  ): Promise<RunRecord> {
    const { log, clock } = this.deps;
    const secrets = held.secrets ?? new Secrets([]);
    const prefix = `[${host.name}]`;
    const about: LogFields = { ...fieldsOf(held), host: host.name };
    const monitor = this.deps.monitor;
    const runId = `${held.message.id}/${held.attempt}/${host.name}`;
    const stdout = new Tail();
    const stderr = new Tail();
    // The page shows the line as the log does: masked, control characters escaped.
    const out = new LineSplitter(
      (line) => {
        stdout.add(line);
        log.info(`${prefix} out: ${line}`, { ...about, stream: "stdout" });
        monitor?.commandOutput(
          runId,
          "out",
          escapeControls(secrets.mask(line)),
        );
      },
      { secrets },
    );
    const err = new LineSplitter(
      (line) => {
        stderr.add(line);
        log.info(`${prefix} err: ${line}`, { ...about, stream: "stderr" });
        monitor?.commandOutput(
          runId,
          "err",
          escapeControls(secrets.mask(line)),
        );
      },
      { secrets },
    );
    const startedAt = clock.now();
    const record = (result: RunResult): RunRecord => ({
      host,
      startedAt,
      finishedAt: clock.now(),
      result,
      stdout,
      stderr,
    });
    // Stopping: the hosts of a fan-out not started yet never start.
    if (this.stopping?.aborted || this.hardStop.signal.aborted) {
      return record({ kind: "aborted" });
    }
    const controller = new AbortController();
    this.running.add(controller);
    monitor?.commandStarted({
      runId,
      messageId: held.message.id,
      task: taskLabel(held),
      host: host.name,
      command: escapeControls(display),
      startedAt,
    });
    let result: RunResult = { kind: "aborted" };
    try {
      result = await this.deps.runner.run(host, command, {
        onStdout: (chunk) => out.push(chunk),
        onStderr: (chunk) => err.push(chunk),
        timeoutMs,
        signal: controller.signal,
      });
      out.end();
      err.end();
      return record(result);
    } finally {
      this.running.delete(controller);
      monitor?.commandEnded(runId, { result, finishedAt: clock.now() });
    }
  }

  /** Gives running commands TASK_SHUTDOWN_GRACE to end, then stops them. */
  private async gracePeriod(processing: Promise<unknown>): Promise<void> {
    const { log, clock } = this.deps;
    if (this.running.size > 0) {
      log.info(
        `stopping: waiting up to ${
          this.task.shutdownGraceMs / 1000
        } s for ${this.running.size} running command(s) (TASK_SHUTDOWN_GRACE); Ctrl-C again stops them now`,
      );
      const over = new AbortController();
      await Promise.race([
        processing,
        clock.sleep(this.task.shutdownGraceMs, over.signal),
      ]);
      over.abort();
      if (this.running.size > 0) {
        log.warn(
          `stopping: ${this.running.size} command(s) still running after the grace period: stopping them and releasing their messages`,
        );
        for (const command of this.running) command.abort();
      }
    }
    await processing;
  }
}

/** A message's task for the metrics: its name, or TASK_COMMAND. */
function taskLabel(held: Held): string {
  return held.meta?.task ?? "TASK_COMMAND";
}

/** What a message's log lines are about, for LOG_FORMAT=json. */
function fieldsOf(held: Held): LogFields {
  return { message_id: held.message.id, task: held.meta?.task };
}

/** A host's end, in the log: Fabric's `[host] exit: 0`, or what went wrong. */
function logEnd(
  log: Log,
  run: RunRecord,
  id: string,
  limit: string,
  about: LogFields,
): void {
  const prefix = `[${run.host.name}]`;
  const took = `${run.finishedAt - run.startedAt} ms`;
  const { result } = run;
  switch (result.kind) {
    case "exit":
      if (result.code === 0) {
        return log.info(`${prefix} exit: 0 (message ${id}, ${took})`, about);
      }
      return log.warn(
        `${prefix} exit: ${result.code} (message ${id}, ${took})`,
        about,
      );
    case "signal":
      return log.warn(
        `${prefix} killed by signal ${result.signal} (message ${id}, ${took})`,
        about,
      );
    case "timeout":
      return log.warn(
        `${prefix} timed out after ${limit}: stopped (message ${id})`,
        about,
      );
    case "aborted":
      return log.warn(
        `${prefix} stopped by shutdown (message ${id}, ${took})`,
        about,
      );
    case "unreachable":
      return log.error(
        `${prefix} not started: ${result.error} (message ${id})`,
        about,
      );
    case "ssh-error":
      return log.error(
        `${prefix} ssh error: ${result.error} (message ${id})`,
        about,
      );
  }
}

/** A failed run in a few words, for the summary line and the failure's reason. */
function briefly(result: RunResult, limit: string): string {
  switch (result.kind) {
    case "exit":
      return `exit ${result.code}`;
    case "signal":
      return `killed by signal ${result.signal}`;
    case "timeout":
      return `timed out after ${limit}`;
    case "aborted":
      return "stopped by shutdown";
    case "unreachable":
    case "ssh-error":
      // Its first words: the host's own line has the whole of it.
      return `ssh: ${
        result.error.replace(/ for \S+.*$| \(.*$|: .*$|; .*$/s, "")
      }`;
  }
}

/** Why a message failed: its one host's outcome, or which of its hosts failed and how. */
function failureOf(
  failed: RunRecord[],
  hosts: number,
  limit: string,
  limitSource: string,
): Failure {
  if (hosts === 1) {
    const { result, stderr } = failed[0];
    return {
      reason: result.kind === "exit"
        ? `exit status ${result.code}`
        : result.kind === "timeout"
        ? `timed out after ${limit} (${limitSource})`
        : result.kind === "ssh-error" || result.kind === "unreachable"
        ? `ssh: ${result.error}`
        : briefly(result, limit),
      exitStatus: result.kind === "exit"
        ? result.code
        : result.kind === "signal"
        ? result.signal
        : result.kind === "timeout"
        ? "timeout"
        : undefined,
      stderrTail: stderr.toString().slice(-2048),
    };
  }
  return {
    reason: `${failed.length} of ${hosts} hosts failed: ${
      failed.map((r) => `${r.host.name} (${briefly(r.result, limit)})`).join(
        ", ",
      )
    }`,
  };
}

// ---------------------------------------------------------------------------
// Settling: deletes in batches, releases and dead letters, off the processors'
// path; shutdown waits for them
// ---------------------------------------------------------------------------

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

/** At most this many settled messages whose delete did not land are remembered. */
const MAX_UNDELETED = 10_000;

/** A message settled here, and its delete (in flight, or refused). */
interface Undeleted {
  status: Status;
  deleting: Promise<DeleteOutcome>;
  /** Reserved here again while that delete was in flight. */
  reservedAgain?: boolean;
}

class Settler {
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

  /** Expired before it ran (Celery's `expires`): deleted, never run. */
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

  /** One settled message, for the metrics and the page. */
  private count(held: Held, outcome: Outcome, reason?: string): void {
    this.deps.monitor?.messageSettled({
      messageId: held.message.id,
      task: taskLabel(held),
      outcome,
      hosts: this.hostsOf(held, 2048),
      finishedAt: this.deps.clock.now(),
      reason: reason === undefined ? undefined : this.maskerFor(held)(reason),
    });
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
      hosts: this.hostsOf(held, Infinity),
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
          ? "stopped by shutdown"
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
class AttemptCounter {
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

// ---------------------------------------------------------------------------
// Fetching: long-polls in batches, prefetching what the round trip needs
// ---------------------------------------------------------------------------

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
class Fetcher {
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
class Keeper {
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

/**
 * Logs an outage with the time of the next try: its start, each change of
 * cause, then, once it lasts 30 s, once a minute as an error; and its end.
 */
class OutageLog {
  private since?: number;
  private lastLogged = 0;
  private lastError = "";
  private tries = 0;
  constructor(
    private readonly what: string,
    private readonly log: Log,
    /** The first failure's level: "warn" for what is often a blip. */
    private readonly firstLevel: "warn" | "error" = "warn",
  ) {}

  failed(e: unknown, nextInMs: number): void {
    const now = Date.now();
    const error = errorText(e);
    const next = `next attempt in ${
      Math.max(1, Math.round(nextInMs / 1000))
    } s`;
    this.tries++;
    if (this.since === undefined) {
      this.since = now;
      this.lastLogged = now;
      this.log[this.firstLevel](`${this.what}: ${error}; ${next}`);
    } else if (error !== this.lastError && now - this.since < 30_000) {
      this.log[this.firstLevel](`${this.what}: now ${error}; ${next}`);
    } else if (
      error !== this.lastError ||
      now - this.since >= 30_000 &&
        (now - this.lastLogged >= 60_000 || this.lastLogged === this.since)
    ) {
      // Past 30 s it is no blip: an error, on a new cause and once a minute.
      this.lastLogged = now;
      this.log.error(
        `${this.what}: still failing after ${
          Math.round((now - this.since) / 1000)
        } s and ${this.tries} tries: ${error}; ${next}`,
      );
    }
    this.lastError = error;
  }

  recovered(): void {
    if (this.since === undefined) return;
    this.log.info(
      `${this.what}: working again after ${
        Math.round((Date.now() - this.since) / 1000)
      } s and ${this.tries} failed tries`,
    );
    this.since = undefined;
    this.tries = 0;
    this.lastError = "";
  }
}

// ---------------------------------------------------------------------------
// Retries and time
// ---------------------------------------------------------------------------

export interface Clock {
  now(): number;
  sleep(ms: number, signal?: AbortSignal): Promise<void>;
}

export const realClock: Clock = {
  now: () => Date.now(),
  sleep: (ms, signal) =>
    new Promise((resolve) => {
      if (signal?.aborted) return resolve();
      const done = () => {
        clearTimeout(timer);
        signal?.removeEventListener("abort", done);
        resolve();
      };
      const timer = setTimeout(done, ms);
      signal?.addEventListener("abort", done, { once: true });
    }),
};

interface RetryOptions {
  /** The first wait, in ms; each later one doubles, up to `maxDelayMs`. */
  minDelayMs: number;
  maxDelayMs: number;
  /** Tries in all, the first included; Infinity tries until `signal` aborts. */
  maxAttempts: number;
  /** Whether an error may pass with time; default: every error. */
  retryable?: (e: unknown) => boolean;
  /** Told of each failure that will be tried again, and the wait before it. */
  onRetry?: (e: unknown, attempt: number, delayMs: number) => void;
  /** Ends the waiting: the retry rejects with the signal's reason. */
  signal?: AbortSignal;
  clock?: Clock;
}

/**
 * Calls `fn` until it succeeds, waiting a capped exponential backoff with
 * jitter between tries. The last error is thrown when tries run out or an
 * error is not retryable.
 */
export async function retry<T>(
  fn: () => Promise<T>,
  options: RetryOptions,
): Promise<T> {
  const { minDelayMs, maxDelayMs, maxAttempts, signal } = options;
  if (!(Number.isFinite(minDelayMs) && minDelayMs >= 0)) {
    throw new RangeError(
      `retry: minDelayMs must be a number of ms from 0 up, not ${minDelayMs}`,
    );
  }
  if (!(maxDelayMs >= minDelayMs)) {
    throw new RangeError(
      `retry: maxDelayMs must be at least minDelayMs (${minDelayMs}), not ${maxDelayMs}`,
    );
  }
  if (
    !(maxAttempts === Infinity || Number.isInteger(maxAttempts) &&
        maxAttempts >= 1)
  ) {
    throw new RangeError(
      `retry: maxAttempts must be a whole number from 1 up, or Infinity, not ${maxAttempts}`,
    );
  }
  const clock = options.clock ?? realClock;
  for (let attempt = 1;; attempt++) {
    signal?.throwIfAborted();
    try {
      return await fn();
    } catch (e) {
      const retryable = options.retryable?.(e) ?? true;
      if (attempt >= maxAttempts || !retryable || signal?.aborted) throw e;
      const delayMs = backoffMs(
        attempt - 1,
        minDelayMs,
        maxDelayMs,
        Math.random(),
      );
      options.onRetry?.(e, attempt, delayMs);
      await clock.sleep(delayMs, signal);
    }
  }
}

/** A queue call retried while its failure may pass (5xx, 408, 429, network): 6 tries, about 10 s. */
function queueCall<T>(
  call: () => Promise<T>,
  clock: Clock,
  maxAttempts = 6,
): Promise<T> {
  return retry(call, {
    minDelayMs: 200,
    maxDelayMs: 5_000,
    maxAttempts,
    retryable: (e) => e instanceof QueueError && e.retryable,
    clock,
  });
}

/**
 * Capped exponential backoff: `baseMs` doubled `attempt` times, at most
 * `capMs`; `random` in [0, 1] picks a point in its upper half (1: the top).
 */
export function backoffMs(
  attempt: number,
  baseMs: number,
  capMs: number,
  random: number,
): number {
  const ceiling = Math.min(capMs, baseMs * 2 ** Math.min(attempt, 30));
  return Math.round(ceiling / 2 + random * ceiling / 2);
}

/** Resolves when `work` settles or `signal` aborts, leaving no listener behind. */
function settledOrAborted(
  work: Promise<unknown>,
  signal: AbortSignal,
): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      signal.removeEventListener("abort", done);
      resolve();
    };
    if (signal.aborted) return resolve();
    signal.addEventListener("abort", done, { once: true });
    work.then(done, done);
  });
}

// ---------------------------------------------------------------------------
// Messages: what a body asks for, and how its arguments are quoted
// ---------------------------------------------------------------------------

/** sshd passes the command to `sh -c` as one argument: stay under Linux's 128 KiB limit. */
const MAX_COMMAND_BYTES = 100_000;

type CommandPlan =
  | { ok: true; command: string; args: string[] }
  | { ok: false; reason: string };

/** Quotes one argument for a POSIX shell: the shell receives exactly `arg`. */
export function shellQuote(arg: string): string {
  if (/^[A-Za-z0-9_@%+=:,./-]+$/.test(arg)) return arg;
  return `'${arg.replaceAll("'", `'\\''`)}'`;
}

/**
 * A body that starts like JSON (`{` or `[`, after white space or a byte order
 * mark) must be `{"args": [strings]}`; any other body runs the configured
 * command as it is. A malformed one runs nothing: taking it as plain text
 * would drop the arguments its sender asked for (a `--dry-run`, say).
 */
export function planCommand(baseCommand: string, body: string): CommandPlan {
  const parsed = parseJsonBody(body);
  if (parsed === undefined) return withArgs(baseCommand, []);
  if ("reason" in parsed) return { ok: false, reason: parsed.reason };
  const args = argsOf(parsed.object);
  return Array.isArray(args)
    ? withArgs(baseCommand, args)
    : { ok: false, reason: args.reason };
}

function withArgs(baseCommand: string, args: string[]): CommandPlan {
  const command = [baseCommand, ...args.map(shellQuote)].join(" ");
  const bytes = new TextEncoder().encode(command).length;
  if (bytes > MAX_COMMAND_BYTES) {
    return {
      ok: false,
      reason:
        `the command with its args is ${bytes} bytes, over the ${MAX_COMMAND_BYTES}-byte limit`,
    };
  }
  return { ok: true, command, args };
}

/** A body that starts like JSON, parsed: an object, or why not; undefined for plain text. */
function parseJsonBody(
  body: string,
): { object: Record<string, unknown> } | { reason: string } | undefined {
  const text = body.replace(/^\uFEFF/, "").trim();
  if (!text.startsWith("{") && !text.startsWith("[")) return undefined;
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (e) {
    // V8's message quotes part of the body, which may hold a secret: only
    // the position is kept.
    const at = /at position \d+/.exec(errorText(e))?.[0];
    return {
      reason: `the body starts like JSON but is not valid JSON${
        at === undefined ? "" : ` (${at})`
      }: send {"args": ["..."]}, or a body that does not start with { or [`,
    };
  }
  if (!isRecord(parsed)) {
    return { reason: `a JSON body must be an object: {"args": ["..."]}` };
  }
  return { object: parsed };
}

/** `{"args": [strings]}`, with "hosts" and "retries" allowed beside it. */
function argsOf(
  parsed: Record<string, unknown>,
): string[] | { reason: string } {
  const extra = Object.keys(parsed).filter((k) =>
    !["args", "hosts", "retries"].includes(k)
  );
  if (extra.length > 0) {
    return {
      reason: `unknown field(s) ${
        extra.map((k) => JSON.stringify(k)).join(", ")
      } in a JSON body: only "args", "hosts" and "retries" are allowed (or "task" and its fields, with a catalog)`,
    };
  }
  const args = parsed.args;
  if (!Array.isArray(args)) {
    return { reason: `"args" must be an array of strings` };
  }
  for (const [i, arg] of args.entries()) {
    if (typeof arg !== "string") {
      return { reason: `"args"[${i}] is ${typeof arg}, not a string` };
    }
    if (arg.includes("\0")) {
      return {
        reason: `"args"[${i}] contains a NUL byte, which no shell can pass`,
      };
    }
    if (!arg.isWellFormed()) {
      return {
        reason: `"args"[${i}] is not well-formed Unicode (lone surrogate)`,
      };
    }
  }
  return args;
}

/** Who sent a message and where its result goes, as far as the message says. */
export interface MessageMeta {
  task?: string;
  /** Celery's `id`, kept as the result's `task_id`. */
  taskId?: string;
  replyTo?: string;
  /** Celery's `retries`: attempts made before this message was sent. */
  priorRetries: number;
}

/** What one message asks for, read against the catalog (if any). */
export type MessagePlan =
  | {
    kind: "run";
    command: string;
    /** The command as the log shows it: secret parameters [redacted]. */
    display: string;
    task?: TaskSpec;
    /** Where it runs: its task's hosts (else SSH_HOST's), narrowed by the message. */
    hosts: HostSpec[];
    /** Values of secret parameters, masked wherever the message shows. */
    secrets: string[];
    meta: MessageMeta;
  }
  | { kind: "reject"; reason: string; meta: MessageMeta }
  | { kind: "hold"; untilMs: number; meta: MessageMeta }
  | { kind: "revoke"; reason: string; meta: MessageMeta };

/** A queue name this worker accepts (its own, a dead-letter, a reply or results queue). */
export const QUEUE_NAME = /^[A-Za-z0-9_.-]{1,64}$/;

/** Celery's message fields that this worker reads, and those it accepts and ignores. */
const CELERY_FIELDS = [
  "id",
  "task",
  "args",
  "kwargs",
  "retries",
  "eta",
  "expires",
  "reply_to",
  "hosts",
];
const CELERY_IGNORED = [
  "utc",
  "callbacks",
  "errbacks",
  "timelimit",
  "taskset",
  "chord",
  "group",
];

/**
 * The plan for a body: plain text runs the catalog's default task (or
 * TASK_COMMAND with no catalog); `{"args": [...]}` fills the default task's
 * parameters (or follows TASK_COMMAND); a Celery message (`{"task": ...}`)
 * runs that task of the catalog, once its `eta` has come and unless its
 * `expires` has passed. It runs on its task's hosts (else on `hosts`, SSH_HOST),
 * or on those of them the message's `"hosts"` names.
 */
export function planMessage(
  body: string,
  catalog: Catalog | undefined,
  baseCommand: string,
  nowMs: number,
  hosts: HostSpec[],
): MessagePlan {
  const meta: MessageMeta = { priorRetries: 0 };
  const reject = (reason: string): MessagePlan => ({
    kind: "reject",
    reason,
    meta,
  });
  let wanted: unknown;
  const where = (task?: TaskSpec): HostSpec[] | string => {
    const all = task?.hosts ?? hosts;
    return wanted === undefined
      ? all
      : narrowHosts(wanted, all, catalog?.groups ?? new Map());
  };
  const run = (
    task: TaskSpec,
    args: unknown[],
    kwargs: Record<string, unknown>,
  ): MessagePlan => {
    const bound = bindParams(task, args, kwargs);
    if (!bound.ok) return reject(bound.reason);
    const on = where(task);
    if (typeof on === "string") return reject(on);
    return {
      kind: "run",
      command: bound.command,
      display: bound.display,
      task,
      hosts: on,
      secrets: bound.secrets,
      meta,
    };
  };
  /** Celery's `retries`; a continuation's too: the attempts its hosts have had. */
  const readRetries = (object: Record<string, unknown>): string | undefined => {
    const retries = object.retries ?? 0;
    if (!(Number.isInteger(retries) && (retries as number) >= 0)) {
      return `"retries" must be a whole number from 0 up`;
    }
    meta.priorRetries = retries as number;
  };
  const defaultTask = () => {
    if (catalog?.defaultTask === undefined) return undefined;
    meta.task = catalog.defaultTask;
    return catalog.tasks.get(catalog.defaultTask)!;
  };
  const noDefault = () =>
    reject(
      `${
        catalog!.path
      } names no default task for a body without "task": send {"task": "<name>", ...} (tasks: ${
        [...catalog!.tasks.keys()].join(", ")
      }), or set default: in the catalog`,
    );

  const parsed = parseJsonBody(body);
  if (parsed !== undefined && "reason" in parsed) return reject(parsed.reason);
  if (parsed === undefined || !("task" in parsed.object)) {
    const args = parsed === undefined ? [] : argsOf(parsed.object);
    if (!Array.isArray(args)) return reject(args.reason);
    wanted = parsed?.object.hosts;
    const retries = parsed && readRetries(parsed.object);
    if (retries) return reject(retries);
    if (catalog === undefined) {
      const plan = withArgs(baseCommand, args);
      if (!plan.ok) return reject(plan.reason);
      const on = where();
      if (typeof on === "string") return reject(on);
      return {
        kind: "run",
        command: plan.command,
        display: plan.command,
        hosts: on,
        secrets: [],
        meta,
      };
    }
    const task = defaultTask();
    return task === undefined ? noDefault() : run(task, args, {});
  }

  const message = parsed.object;
  const unknown = Object.keys(message).filter((k) =>
    !CELERY_FIELDS.includes(k) && !CELERY_IGNORED.includes(k)
  );
  if (typeof message.id === "string") meta.taskId = message.id;
  if (typeof message.task === "string") meta.task = message.task;
  if (typeof message.reply_to === "string") {
    if (!QUEUE_NAME.test(message.reply_to)) {
      return reject(
        `"reply_to" must be a queue name (letters, digits, '_', '-', '.')`,
      );
    }
    meta.replyTo = message.reply_to;
  }
  if (unknown.length > 0) {
    return reject(
      `unknown field(s) ${
        unknown.map((k) => JSON.stringify(k)).join(", ")
      } in a task message`,
    );
  }
  if (typeof message.task !== "string") {
    return reject(`"task" must be a task name (a string)`);
  }
  if (message.id !== undefined && typeof message.id !== "string") {
    return reject(`"id" must be a string`);
  }
  if (
    message.reply_to !== undefined && message.reply_to !== null &&
    meta.replyTo === undefined
  ) {
    return reject(`"reply_to" must be a queue name`);
  }
  const retries = readRetries(message);
  if (retries) return reject(retries);
  wanted = message.hosts;
  const args = message.args ?? [];
  if (!Array.isArray(args)) return reject(`"args" must be a list`);
  const kwargs = message.kwargs ?? {};
  if (!isRecord(kwargs)) return reject(`"kwargs" must be an object`);
  const times: Record<"eta" | "expires", number | undefined> = {
    eta: undefined,
    expires: undefined,
  };
  for (const field of ["eta", "expires"] as const) {
    const value = message[field];
    if (value === undefined || value === null) continue;
    const ms = typeof value === "string" ? Date.parse(value) : NaN;
    if (Number.isNaN(ms)) {
      return reject(
        `"${field}" must be an ISO 8601 time, such as 2026-11-27T15:00:00Z`,
      );
    }
    times[field] = ms;
  }
  if (catalog === undefined) {
    return reject(
      `named tasks need a catalog: set TASKS_FILE, or put tasks.yaml where the worker starts`,
    );
  }
  const task = catalog.tasks.get(message.task);
  if (task === undefined) {
    return reject(
      `unknown task ${JSON.stringify(message.task)} (${catalog.path} has: ${
        [...catalog.tasks.keys()].join(", ")
      })`,
    );
  }
  if (times.expires !== undefined && times.expires <= nowMs) {
    return {
      kind: "revoke",
      reason: `expired at ${
        new Date(times.expires).toISOString()
      } before it ran`,
      meta,
    };
  }
  const plan = run(task, args, kwargs);
  if (plan.kind === "run" && times.eta !== undefined && times.eta > nowMs) {
    return { kind: "hold", untilMs: times.eta, meta };
  }
  return plan;
}

// ---------------------------------------------------------------------------
// Named tasks: a catalog of allowed commands with typed parameters (TASKS_FILE)
// ---------------------------------------------------------------------------

type ParamType = "string" | "integer" | "number" | "boolean";
type ParamValue = string | number | boolean;

export interface ParamSpec {
  name: string;
  type: ParamType;
  required: boolean;
  default?: ParamValue;
  /** Masked in every log line and result, as the token is. */
  secret: boolean;
  enum?: string[];
  /** Matched against the whole value. */
  pattern?: RegExp;
  maxLength?: number;
  min?: number;
  max?: number;
  /** A string starting with "-" is refused unless allowed: quoting stops the shell, not a command reading it as an option. */
  allowDash: boolean;
  description?: string;
}

export interface TaskSpec {
  name: string;
  command: string;
  params: ParamSpec[];
  /** 0 means no limit. */
  timeoutMs: number;
  maxAttempts: number;
  description?: string;
  /** Where it runs (its hosts: groups and hosts); undefined: SSH_HOST. */
  hosts?: HostSpec[];
}

export interface Catalog {
  path: string;
  tasks: Map<string, TaskSpec>;
  /** What a plain-text body runs. */
  defaultTask?: string;
  /** The host groups (hosts:), for tasks and for a message's "hosts". */
  groups: Map<string, HostSpec[]>;
}

/** What a catalog's tasks get when they do not say. */
export interface CatalogDefaults {
  timeoutMs: number;
  maxAttempts: number;
  /** SSH_USER, SSH_PORT and SSH_PROXY_JUMP, for the hosts it names. */
  host: HostDefaults;
}

const PLACEHOLDER = /\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}/g;
const PARAM_TYPES: ParamType[] = ["string", "integer", "number", "boolean"];

/**
 * Pure: a catalog's YAML (1.2, so JSON too) in, the catalog and its warnings
 * out; or a ConfigError naming every problem by file, task and field.
 */
export function parseCatalog(
  path: string,
  text: string,
  defaults: CatalogDefaults,
): { catalog: Catalog; warnings: string[] } {
  const problems: string[] = [];
  const warnings: string[] = [];
  const at = (where: string, what: string) => `${path}: ${where}: ${what}`;
  let root: unknown;
  try {
    root = parseYaml(text, { version: "1.2" });
  } catch (e) {
    throw new ConfigError([`${path}: not valid YAML: ${errorText(e)}`]);
  }
  if (!isRecord(root)) {
    throw new ConfigError([
      `${path}: must be a mapping with "tasks:" (see tasks.example.yaml)`,
    ]);
  }
  for (const key of Object.keys(root)) {
    if (!["tasks", "default", "hosts"].includes(key)) {
      problems.push(
        at(key, `unknown key (expected "tasks", "default" or "hosts")`),
      );
    }
  }
  const groups = parseGroups(
    root.hosts,
    defaults.host,
    (where, what) => problems.push(at(`hosts${where}`, what)),
  );
  const tasks = new Map<string, TaskSpec>();
  if (!isRecord(root.tasks) || Object.keys(root.tasks).length === 0) {
    problems.push(at("tasks", "must map task names to their commands"));
  } else {
    for (const [name, value] of Object.entries(root.tasks)) {
      const task = parseTask(
        name,
        value,
        defaults,
        groups,
        (where, what) => problems.push(at(`tasks.${name}${where}`, what)),
      );
      if (task === undefined) continue;
      tasks.set(name, task);
      const used = new Set(
        [...task.command.matchAll(PLACEHOLDER)].map((m) => m[1]),
      );
      for (const param of task.params) {
        if (!used.has(param.name)) {
          warnings.push(
            at(
              `tasks.${name}.params.${param.name}`,
              `declared but never used in the command`,
            ),
          );
        }
      }
    }
  }
  let defaultTask: string | undefined;
  if (root.default !== undefined) {
    if (typeof root.default !== "string" || !tasks.has(root.default)) {
      if (tasks.size > 0 || typeof root.default !== "string") {
        problems.push(at("default", `must name one of the tasks`));
      }
    } else if (tasks.get(root.default)!.params.some((p) => p.required)) {
      problems.push(
        at(
          "default",
          `task ${root.default} has required parameters, which a plain-text body cannot give`,
        ),
      );
    } else {
      defaultTask = root.default;
    }
  }
  if (problems.length > 0) throw new ConfigError(problems);
  return { catalog: { path, tasks, defaultTask, groups }, warnings };
}

type Complain = (where: string, what: string) => void;

/** `hosts:` of a catalog: group names to lists of hosts, or to {hosts, jump}. */
function parseGroups(
  value: unknown,
  defaults: HostDefaults,
  complain: Complain,
): Map<string, HostSpec[]> {
  const groups = new Map<string, HostSpec[]>();
  if (value === undefined || value === null) return groups;
  if (!isRecord(value)) {
    complain("", "must map group names to lists of hosts");
    return groups;
  }
  for (const [name, group] of Object.entries(value)) {
    const where = `.${name}`;
    if (!/^[A-Za-z0-9_.-]{1,64}$/.test(name)) {
      complain(
        where,
        "a group name is 1 to 64 letters, digits, '_', '-' or '.'",
      );
    }
    let list: unknown = group;
    let jump = defaults.jump;
    if (isRecord(group)) {
      for (const key of Object.keys(group)) {
        if (key !== "hosts" && key !== "jump") {
          complain(`${where}.${key}`, `unknown field (known: hosts, jump)`);
        }
      }
      list = group.hosts;
      if (group.jump !== undefined) {
        if (typeof group.jump !== "string") {
          complain(
            `${where}.jump`,
            "must be [user@]host[:port], a chain of them, or none",
          );
        } else {
          const parsed = parseJump(group.jump, defaults);
          parsed.problems.forEach((p) => complain(`${where}.jump`, p));
          jump = parsed.jump;
        }
      }
    }
    if (
      !Array.isArray(list) || list.length === 0 ||
      !list.every((h) => typeof h === "string")
    ) {
      complain(where, "must be a list of hosts ([user@]host[:port])");
      continue;
    }
    const parsed = parseHostList(list.join(","), { ...defaults, jump });
    parsed.problems.forEach((p) => complain(where, p));
    groups.set(name, parsed.hosts);
  }
  return groups;
}

/** A task's `hosts:`, groups and single hosts, each host once. */
function parseTaskHosts(
  value: unknown,
  defaults: HostDefaults,
  groups: Map<string, HostSpec[]>,
  complain: Complain,
): HostSpec[] | undefined {
  if (value === undefined || value === null) return undefined;
  if (
    !Array.isArray(value) || value.length === 0 ||
    !value.every((h) => typeof h === "string")
  ) {
    complain(".hosts", "must be a list of group names or hosts");
    return undefined;
  }
  const hosts: HostSpec[] = [];
  for (const entry of value as string[]) {
    let found = groups.get(entry);
    // A bare word that is not a group is a typo more often than a host.
    if (found === undefined && !/[.:@]/.test(entry) && entry !== "localhost") {
      complain(
        ".hosts",
        `${JSON.stringify(entry)} is not a group in hosts: (${
          [...groups.keys()].join(", ") || "none"
        }); a single host needs a dot, a colon or user@ (its address)`,
      );
      continue;
    }
    if (found === undefined) {
      const host = parseHost(entry, defaults);
      if (typeof host === "string") {
        complain(".hosts", host);
        continue;
      }
      found = [host];
    }
    for (const host of found) {
      if (!hosts.some((h) => h.name === host.name)) hosts.push(host);
    }
  }
  return hosts;
}

function parseTask(
  name: string,
  value: unknown,
  defaults: CatalogDefaults,
  groups: Map<string, HostSpec[]>,
  complain: Complain,
): TaskSpec | undefined {
  if (!/^[A-Za-z0-9_.-]{1,64}$/.test(name)) {
    complain("", "a task name is 1 to 64 letters, digits, '_', '-' or '.'");
  }
  if (!isRecord(value)) {
    complain("", `must be a mapping with "command:"`);
    return undefined;
  }
  const known = [
    "command",
    "params",
    "timeout",
    "max_attempts",
    "description",
    "hosts",
  ];
  for (const key of Object.keys(value)) {
    if (!known.includes(key)) {
      complain(`.${key}`, `unknown field (known: ${known.join(", ")})`);
    }
  }
  const command = value.command;
  if (typeof command !== "string" || command.trim() === "") {
    complain(".command", "must be the command line to run (a string)");
  }
  const params: ParamSpec[] = [];
  if (value.params !== undefined && value.params !== null) {
    if (!isRecord(value.params)) {
      complain(".params", "must map parameter names to their rules");
    } else {
      for (const [pname, rules] of Object.entries(value.params)) {
        const param = parseParam(
          pname,
          rules,
          (where, what) => complain(`.params.${pname}${where}`, what),
        );
        if (param) params.push(param);
      }
    }
  }
  if (typeof command === "string") {
    for (const problem of placeholderProblems(command)) {
      complain(".command", problem);
    }
    // Declared, even where its rules are wrong: one problem, not two.
    const declared = new Set(
      isRecord(value.params) ? Object.keys(value.params) : [],
    );
    for (const [, used] of command.matchAll(PLACEHOLDER)) {
      if (!declared.has(used)) {
        complain(
          ".command",
          `{{${used}}} has no parameter: declare it under params`,
        );
      }
    }
  }
  const timeout = value.timeout;
  if (
    timeout !== undefined &&
    !(typeof timeout === "number" && timeout >= 0 && timeout <= 86400)
  ) {
    complain(".timeout", "must be seconds from 0 (no limit) to 86400");
  }
  const maxAttempts = value.max_attempts;
  if (
    maxAttempts !== undefined &&
    !(Number.isInteger(maxAttempts) && (maxAttempts as number) >= 1 &&
      (maxAttempts as number) <= 1000)
  ) {
    complain(".max_attempts", "must be a whole number from 1 to 1000");
  }
  const hosts = parseTaskHosts(value.hosts, defaults.host, groups, complain);
  if (typeof command !== "string") return undefined;
  return {
    name,
    command,
    params,
    timeoutMs: typeof timeout === "number"
      ? timeout * 1000
      : defaults.timeoutMs,
    maxAttempts: typeof maxAttempts === "number"
      ? maxAttempts
      : defaults.maxAttempts,
    description: typeof value.description === "string"
      ? value.description
      : undefined,
    hosts,
  };
}

/**
 * Why a command's placeholders would not each stand as one plain shell word.
 * A value is quoted as one word; inside quotes, after a backslash, in a
 * comment, a here-document, backticks or `$'...'`, or glued to other text,
 * that quoting would end a quote or be read again, and the value would run
 * as shell code.
 */
function placeholderProblems(command: string): string[] {
  const uses = [...command.matchAll(PLACEHOLDER)];
  if (uses.length === 0) return [];
  type Context = "plain" | "single" | "double" | "comment" | "escaped";
  const context: Context[] = [];
  const problems = new Set<string>();
  let state: "plain" | "single" | "double" | "comment" = "plain";
  for (let i = 0; i < command.length; i++) {
    const c = command[i];
    context[i] = state;
    if (state === "comment") {
      if (c === "\n") state = "plain";
    } else if (state === "single") {
      if (c === "'") state = "plain";
    } else if (c === "\\") {
      context[++i] = "escaped";
    } else if (state === "double") {
      if (c === '"') state = "plain";
      if (c === "`") problems.add("backticks run their text again: use $(...)");
    } else if (c === "'" || c === '"') {
      state = c === "'" ? "single" : "double";
      if (c === "'" && command[i - 1] === "$") {
        problems.add("$'...' reads escapes in its text: use '...'");
      }
    } else if (c === "#" && (i === 0 || /\s/.test(command[i - 1]))) {
      state = "comment";
      context[i] = "comment";
    } else if (c === "`") {
      problems.add("backticks run their text again: use $(...)");
    } else if (c === "<" && command[i + 1] === "<") {
      problems.add(
        "a here-document (<<) reads its text again: pass values as arguments",
      );
    }
  }
  if (state === "single" || state === "double") {
    problems.add(`a ${state} quote is never closed`);
  }
  for (const use of uses) {
    const at = use.index!;
    const end = at + use[0].length;
    const where = context[at];
    const before = at === 0 ? " " : command[at - 1];
    const after = end === command.length ? " " : command[end];
    const name = `{{${use[1]}}}`;
    if (where === "single" || where === "double") {
      problems.add(
        `${name} is inside quotes: write it bare, its value is quoted for you`,
      );
    } else if (where === "comment") {
      problems.add(
        `${name} is in a comment (after #), where a newline ends it`,
      );
    } else if (
      where !== "plain" || !/[\s=(;|&]/.test(before) ||
      !/[\s;)|&<>]/.test(after)
    ) {
      problems.add(
        `${name} must stand as a whole word (spaces around it, or --option={{x}}): its value is quoted as one`,
      );
    }
  }
  return [...problems];
}

function parseParam(
  name: string,
  rules: unknown,
  complain: Complain,
): ParamSpec | undefined {
  if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(name)) {
    complain(
      "",
      "a parameter name is a letter or '_', then letters, digits or '_'",
    );
    return undefined;
  }
  if (rules === null || rules === undefined) rules = {};
  if (!isRecord(rules)) {
    complain("", "must be a mapping of rules ({} for a plain string)");
    return undefined;
  }
  const known = [
    "type",
    "enum",
    "pattern",
    "max_length",
    "min",
    "max",
    "required",
    "default",
    "secret",
    "allow_dash",
    "description",
  ];
  for (const key of Object.keys(rules)) {
    if (!known.includes(key)) {
      complain(`.${key}`, `unknown rule (known: ${known.join(", ")})`);
    }
  }
  const type = rules.type ?? "string";
  if (!PARAM_TYPES.includes(type as ParamType)) {
    complain(".type", `must be one of ${PARAM_TYPES.join(", ")}`);
    return undefined;
  }
  const param: ParamSpec = {
    name,
    type: type as ParamType,
    required: true,
    secret: false,
    allowDash: false,
  };
  const flag = (key: "required" | "secret" | "allow_dash") => {
    const v = rules[key];
    if (v !== undefined && typeof v !== "boolean") {
      complain(`.${key}`, "must be true or false");
    }
    return v === true ? true : v === false ? false : undefined;
  };
  param.secret = flag("secret") ?? false;
  param.allowDash = flag("allow_dash") ?? false;
  const stringOnly = (key: string) => {
    if (rules[key] !== undefined && param.type !== "string") {
      complain(`.${key}`, `applies to strings only (this is ${param.type})`);
      return false;
    }
    return rules[key] !== undefined;
  };
  if (stringOnly("enum")) {
    const values = rules.enum;
    if (
      !Array.isArray(values) || values.length === 0 ||
      !values.every((v) => typeof v === "string")
    ) {
      complain(".enum", "must be a list of strings");
    } else param.enum = values as string[];
  }
  if (stringOnly("pattern")) {
    try {
      param.pattern = new RegExp(`^(?:${rules.pattern})$`, "u");
      if (typeof rules.pattern !== "string") throw new Error("not a string");
    } catch (e) {
      complain(".pattern", `must be a regular expression (${errorText(e)})`);
    }
  }
  if (stringOnly("max_length")) {
    const v = rules.max_length;
    if (!(Number.isInteger(v) && (v as number) >= 1)) {
      complain(".max_length", "must be a whole number from 1 up");
    } else param.maxLength = v as number;
  }
  for (const key of ["min", "max"] as const) {
    if (rules[key] === undefined) continue;
    if (param.type !== "integer" && param.type !== "number") {
      complain(`.${key}`, `applies to integer and number only`);
    } else if (typeof rules[key] !== "number") {
      complain(`.${key}`, "must be a number");
    } else param[key] = rules[key] as number;
  }
  if (
    param.min !== undefined && param.max !== undefined && param.min > param.max
  ) {
    complain(".min", `is over max (${param.max})`);
  }
  const required = flag("required");
  if (rules.default !== undefined) {
    if (required === true) {
      complain(".required", "a parameter with a default is not required");
    }
    const problem = valueProblem(param, rules.default);
    if (problem) complain(".default", problem);
    else param.default = rules.default as ParamValue;
    param.required = false;
  } else {
    param.required = required ?? true;
  }
  if (typeof rules.description === "string") {
    param.description = rules.description;
  }
  return param;
}

/** Why `value` does not fit the parameter, or undefined when it does. */
function valueProblem(param: ParamSpec, value: unknown): string | undefined {
  switch (param.type) {
    case "string": {
      if (typeof value !== "string") {
        return `must be a string, not ${kindOf(value)}`;
      }
      if (value.includes("\0")) {
        return "contains a NUL byte, which no shell can pass";
      }
      if (!value.isWellFormed()) {
        return "is not well-formed Unicode (lone surrogate)";
      }
      if (param.enum) {
        // The list is the allowlist: what it names passes, dash or not.
        return param.enum.includes(value)
          ? undefined
          : `must be one of ${param.enum.join(", ")}`;
      }
      if (value.startsWith("-") && !param.allowDash) {
        return `starts with "-", which the command could read as an option (the catalog may set allow_dash: true)`;
      }
      if (param.pattern && !param.pattern.test(value)) {
        return `must match ${param.pattern.source.slice(4, -2)}`;
      }
      if (
        param.maxLength !== undefined && [...value].length > param.maxLength
      ) {
        return `is longer than ${param.maxLength} characters`;
      }
      return undefined;
    }
    case "integer":
    case "number": {
      if (typeof value !== "number" || !Number.isFinite(value)) {
        return `must be a${
          param.type === "integer" ? "n integer" : " number"
        }, not ${kindOf(value)}`;
      }
      if (param.type === "integer" && !Number.isInteger(value)) {
        return "must be a whole number";
      }
      if (param.min !== undefined && value < param.min) {
        return `must be at least ${param.min}`;
      }
      if (param.max !== undefined && value > param.max) {
        return `must be at most ${param.max}`;
      }
      return undefined;
    }
    case "boolean":
      return typeof value === "boolean"
        ? undefined
        : `must be true or false, not ${kindOf(value)}`;
  }
}

function kindOf(value: unknown): string {
  if (value === null) return "null";
  if (Array.isArray(value)) return "a list";
  return typeof value === "object"
    ? "an object"
    : `${typeof value} ${JSON.stringify(value)}`;
}

export type Binding =
  | {
    ok: true;
    command: string;
    /** The command with each secret parameter shown as [redacted], for the log. */
    display: string;
    values: Record<string, ParamValue>;
    /** The values of secret parameters, to mask. */
    secrets: string[];
  }
  | { ok: false; reason: string };

/**
 * Fills a task's parameters, `args` in declaration order and `kwargs` by
 * name, checks every value, and puts each into the command shell-quoted.
 */
export function bindParams(
  task: TaskSpec,
  args: unknown[],
  kwargs: Record<string, unknown>,
): Binding {
  const fail = (reason: string): Binding => ({
    ok: false,
    reason: `task ${task.name}: ${reason}`,
  });
  if (args.length > task.params.length) {
    return fail(
      `${args.length} args for ${task.params.length} parameter(s) (${
        task.params.map((p) => p.name).join(", ") || "none"
      })`,
    );
  }
  const given = new Map<string, unknown>();
  args.forEach((value, i) => given.set(task.params[i].name, value));
  for (const [name, value] of Object.entries(kwargs)) {
    if (!task.params.some((p) => p.name === name)) {
      return fail(`unknown parameter ${JSON.stringify(name)}`);
    }
    if (given.has(name)) {
      return fail(`parameter ${name} given both in args and in kwargs`);
    }
    given.set(name, value);
  }
  const values: Record<string, ParamValue> = {};
  const secrets: string[] = [];
  for (const param of task.params) {
    let value = given.get(param.name);
    if (value === undefined) {
      if (param.required) return fail(`parameter ${param.name} is required`);
      if (param.default === undefined) continue;
      value = param.default;
    }
    const problem = valueProblem(param, value);
    if (problem) {
      // A secret's value is never shown, not even in the reason.
      return fail(
        param.secret
          ? `parameter ${param.name} (secret, value not shown) ${
            problem.replace(/,? not .*$/, "")
          }`
          : `parameter ${param.name}: ${JSON.stringify(value)} ${problem}`,
      );
    }
    values[param.name] = value as ParamValue;
    if (param.secret) {
      // As given, and as quoted into the command line.
      secrets.push(String(value), shellQuote(String(value)));
    }
  }
  const secret = new Set(
    task.params.filter((p) => p.secret).map((p) => p.name),
  );
  const fill = (shown: boolean) =>
    task.command.replace(PLACEHOLDER, (_, name: string) => {
      if (!Object.hasOwn(values, name)) return "''";
      return shown && secret.has(name)
        ? "[redacted]"
        : shellQuote(String(values[name]));
    });
  const command = fill(false);
  const bytes = new TextEncoder().encode(command).length;
  if (bytes > MAX_COMMAND_BYTES) {
    return fail(
      `the command with its parameters is ${bytes} bytes, over the ${MAX_COMMAND_BYTES}-byte limit`,
    );
  }
  return { ok: true, command, display: fill(true), values, secrets };
}

// ---------------------------------------------------------------------------
// Hosts: where a message's command runs (SSH_HOST, the catalog's groups)
// ---------------------------------------------------------------------------

/** One SSH destination. */
export interface HostSpec {
  /** As written (SSH_HOST, the catalog): its name in log lines, results and a message's "hosts". */
  name: string;
  host: string;
  port: number;
  user: string;
  /** The jump hosts to go through, first to last (SSH_PROXY_JUMP, or its group's jump:). */
  jump: HostSpec[];
}

/** What a host written without a user, a port or a jump gets. */
export interface HostDefaults {
  user: string;
  port: number;
  jump: HostSpec[];
}

const HOST_NAME = /^[A-Za-z0-9_]([A-Za-z0-9_.-]{0,252})$/;
const USER_NAME = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}$/;

/** `[user@]host[:port]` (an IPv6 address in brackets when a port follows), or why not. */
export function parseHost(
  text: string,
  defaults: HostDefaults,
): HostSpec | string {
  const written = text.trim();
  const form = `${JSON.stringify(text)}: write [user@]host[:port]`;
  let rest = written;
  let user = defaults.user;
  const at = rest.lastIndexOf("@");
  if (at >= 0) {
    user = rest.slice(0, at);
    rest = rest.slice(at + 1);
    if (!USER_NAME.test(user)) return `${form} (bad user name)`;
  }
  let host = rest;
  let port = String(defaults.port);
  const bracketed = /^\[([0-9A-Fa-f:.]+)\](?::(.*))?$/.exec(rest);
  if (bracketed) {
    host = bracketed[1];
    port = bracketed[2] ?? port;
  } else if ((rest.match(/:/g) ?? []).length === 1) {
    [host, port] = rest.split(":");
  }
  const ipv6 = host.includes(":");
  if (ipv6 ? !/^[0-9A-Fa-f:.]+$/.test(host) : !HOST_NAME.test(host)) {
    return `${form} (bad host name)`;
  }
  const portNumber = Number(port);
  if (!/^\d{1,5}$/.test(port) || portNumber < 1 || portNumber > 65535) {
    return `${form} (the port must be 1 to 65535)`;
  }
  return { name: written, host, port: portNumber, user, jump: defaults.jump };
}

/**
 * A comma-separated list of hosts (SSH_HOST), or an OpenSSH ProxyJump chain
 * (SSH_PROXY_JUMP, `jump:`): hosts, or the problems, each naming its entry.
 */
export function parseHostList(
  text: string,
  defaults: HostDefaults,
): { hosts: HostSpec[]; problems: string[] } {
  const hosts: HostSpec[] = [];
  const problems: string[] = [];
  const entries = text.split(",").map((s) => s.trim());
  for (const entry of entries) {
    if (entry === "") {
      problems.push(`an empty entry: separate hosts with single commas`);
      continue;
    }
    const host = parseHost(entry, defaults);
    if (typeof host === "string") problems.push(host);
    else if (hosts.some((h) => h.name === host.name)) {
      problems.push(`${JSON.stringify(entry)} is listed twice`);
    } else hosts.push(host);
  }
  return { hosts, problems };
}

/** A jump chain as written: none, or hosts each reached through the ones before it. */
export function parseJump(
  text: string,
  defaults: Omit<HostDefaults, "jump">,
): { jump: HostSpec[]; problems: string[] } {
  if (text.trim() === "none") return { jump: [], problems: [] };
  const { hosts, problems } = parseHostList(text, { ...defaults, jump: [] });
  return { jump: hosts, problems };
}

/** Every host the worker may run commands on: SSH_HOST's, and its tasks'. */
export function servedHosts(task: TaskConfig): HostSpec[] {
  const all = new Map<string, HostSpec>();
  const tasks = [...task.catalog?.tasks.values() ?? []];
  // SSH_HOST's serve TASK_COMMAND, and the catalog's tasks without hosts:.
  const usesDefault = task.catalog === undefined ||
    tasks.some((t) => t.hosts === undefined);
  for (
    const host of [
      ...usesDefault ? task.hosts : [],
      ...tasks.flatMap((t) => t.hosts ?? []),
    ]
  ) {
    if (!all.has(hostKey(host))) all.set(hostKey(host), host);
  }
  return [...all.values()];
}

/** Which connection a host needs: through its jump hosts, as that user, to that address. */
export function hostKey(host: HostSpec): string {
  return [...host.jump, { ...host, jump: [] }]
    .map((h) => `${h.user}@${bracketIPv6(h.host)}:${h.port}`)
    .join(" > ");
}

/** A message's `"hosts"`: groups or host names inside the task's set, or why not. */
function narrowHosts(
  wanted: unknown,
  hosts: HostSpec[],
  groups: Map<string, HostSpec[]>,
): HostSpec[] | string {
  if (
    !Array.isArray(wanted) || wanted.length === 0 ||
    !wanted.every((w) => typeof w === "string")
  ) {
    return `"hosts" must be a list of host or group names`;
  }
  const chosen = new Set<string>();
  const outside: string[] = [];
  for (const name of wanted as string[]) {
    const group = groups.get(name);
    const members = group?.map((h) => h.name) ?? [name];
    if (members.every((m) => hosts.some((h) => h.name === m))) {
      for (const m of members) chosen.add(m);
    } else outside.push(name);
  }
  if (outside.length > 0) {
    return `"hosts" names ${
      outside.map((n) => JSON.stringify(n)).join(", ")
    }, outside this task's hosts (${hosts.map((h) => h.name).join(", ")})`;
  }
  return hosts.filter((h) => chosen.has(h.name));
}

// ---------------------------------------------------------------------------
// Logging: one event a line on stdout, never blocking; svlogd adds the time
// ---------------------------------------------------------------------------

/** What a line is about, for LOG_FORMAT=json (the text form has it in the line). */
export interface LogFields {
  message_id?: string;
  task?: string;
  host?: string;
  stream?: "stdout" | "stderr";
}

export interface Log {
  debug(text: string, fields?: LogFields): void;
  info(text: string, fields?: LogFields): void;
  warn(text: string, fields?: LogFields): void;
  error(text: string, fields?: LogFields): void;
}

const LOG_FIELDS = ["message_id", "task", "host", "stream"] as const;

const LEVEL_PREFIX: Record<string, string> = {
  trace: "DEBUG ",
  debug: "DEBUG ",
  info: "",
  warning: "WARN ",
  error: "ERROR ",
  fatal: "FATAL ",
};

/** The values never to show (tokens, passphrases): masked wherever they appear. */
export class Secrets {
  private readonly values: string[];
  /** The longest value's length: a cut closer than this to the end may split one. */
  readonly longest: number;

  constructor(values: (string | undefined)[]) {
    this.values = values
      .filter((v): v is string => v !== undefined && v.length >= 4)
      .sort((a, b) => b.length - a.length);
    this.longest = Math.max(0, ...this.values.map((v) => v.length));
  }

  /** These and `more`. */
  with(more: string[]): Secrets {
    return more.length === 0 ? this : new Secrets([...this.values, ...more]);
  }

  mask(text: string): string {
    for (const value of this.values) {
      text = text.replaceAll(value, "[redacted]");
    }
    return text;
  }
}

/**
 * Characters that would let remote output or a message forge or hide log
 * lines: C0 and C1 controls (a tab aside), line and paragraph separators,
 * and bidirectional overrides.
 */
const UNSAFE_CHARACTERS =
  // deno-lint-ignore no-control-regex -- matching control characters is the point
  /[\x00-\x08\x0a-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]/g;

export function escapeControls(text: string): string {
  return text.replace(UNSAFE_CHARACTERS, (c) => {
    if (c === "\n") return "\\n";
    if (c === "\r") return "\\r";
    const code = c.charCodeAt(0);
    return code < 0x100
      ? `\\x${code.toString(16).padStart(2, "0")}`
      : `\\u${code.toString(16).padStart(4, "0")}`;
  });
}

/** Formats a record as one line: secrets masked, control characters made visible. */
export function formatRecord(record: LogRecord, secrets: Secrets): string {
  return `${LEVEL_PREFIX[record.level] ?? ""}${messageOf(record, secrets)}`;
}

/** LOG_FORMAT=json: one JSON object a line, for log shippers. */
export function formatJson(record: LogRecord, secrets: Secrets): string {
  const line: Record<string, unknown> = {
    time: new Date(record.timestamp).toISOString(),
    level: record.level === "warning" ? "warn" : record.level,
    message: messageOf(record, secrets),
  };
  for (const field of LOG_FIELDS) {
    const value = record.properties[field];
    if (typeof value === "string") line[field] = escapeControls(value);
  }
  return JSON.stringify(line);
}

function messageOf(record: LogRecord, secrets: Secrets): string {
  const text = record.message.map((part) =>
    typeof part === "string" ? part : JSON.stringify(part)
  ).join("");
  return escapeControls(secrets.mask(text));
}

/**
 * Log lines to stdout that never block the worker: they queue in a bounded
 * buffer that one write at a time drains. When the reader stops reading
 * (svlogd on a full disk), lines past the bound are dropped and counted, and
 * the count is logged once writing works again. A blocking write would stop
 * everything: touches (so a running message goes to another worker) and
 * signals (so runit could not stop the worker).
 */
class StdoutLines {
  private queued: Uint8Array[] = [];
  private queuedBytes = 0;
  private dropped = 0;
  private writing?: Promise<void>;
  private readonly encoder = new TextEncoder();

  constructor(private readonly maxBytes = 1024 * 1024) {}

  readonly write = (line: string): void => {
    const bytes = this.encoder.encode(line + "\n");
    if (this.queuedBytes + bytes.length > this.maxBytes) {
      this.dropped++;
      return;
    }
    this.queued.push(bytes);
    this.queuedBytes += bytes.length;
    this.writing ??= this.drain().finally(() => this.writing = undefined);
  };

  /** Waits for the queued lines to be written, at most `timeoutMs`. */
  async flush(timeoutMs = 2_000): Promise<void> {
    const gaveUp = new AbortController();
    await Promise.race([
      this.writing,
      realClock.sleep(timeoutMs, gaveUp.signal),
    ]);
    gaveUp.abort();
  }

  private async drain(): Promise<void> {
    while (this.queued.length > 0) {
      if (this.dropped > 0) {
        const notice = this.encoder.encode(
          `WARN log: ${this.dropped} line(s) dropped: stdout was not being read\n`,
        );
        this.queued.unshift(notice);
        this.queuedBytes += notice.length;
        this.dropped = 0;
      }
      const batch = Buffer.concat(this.queued.splice(0));
      try {
        for (let written = 0; written < batch.length;) {
          written += await Deno.stdout.write(batch.subarray(written));
        }
      } catch {
        // stdout is gone (a broken pipe): nobody is left to tell.
      }
      this.queuedBytes -= batch.length;
    }
  }
}

/** Sets up LogTape to write formatted lines; returns the worker's logger. */
export async function setupLogging(
  write: (line: string) => void,
  level: LogLevelName,
  secrets: Secrets,
  format: LogFormat = "text",
): Promise<Log> {
  const formatter = format === "json" ? formatJson : formatRecord;
  await configure({
    reset: true,
    sinks: { lines: (record) => write(formatter(record, secrets)) },
    loggers: [
      { category: ["tasks"], lowestLevel: level, sinks: ["lines"] },
      {
        category: ["logtape", "meta"],
        lowestLevel: "warning",
        sinks: ["lines"],
      },
    ],
  });
  const logger = getLogger(["tasks"]);
  // The text form has no use for the fields: no per-line logger for them.
  const about = (fields?: LogFields) =>
    fields === undefined || format === "text"
      ? logger
      : logger.with({ ...fields });
  // Tagged templates keep braces in command output from being read as placeholders.
  return {
    debug: (text, fields) => about(fields).debug`${text}`,
    info: (text, fields) => about(fields).info`${text}`,
    warn: (text, fields) => about(fields).warn`${text}`,
    error: (text, fields) => about(fields).error`${text}`,
  };
}

/**
 * Splits a byte stream into lines for the log. A very long line is cut into
 * pieces, with secrets masked first, so that no cut splits one into halves
 * that each escape the mask.
 */
export class LineSplitter {
  private readonly decoder = new TextDecoder();
  private partial = "";
  private readonly maxLine: number;
  private readonly secrets?: Secrets;
  constructor(
    private readonly emit: (line: string) => void,
    options: { maxLine?: number; secrets?: Secrets } = {},
  ) {
    this.maxLine = options.maxLine ?? 16_384;
    this.secrets = options.secrets;
  }

  push(chunk: Uint8Array): void {
    this.take(this.decoder.decode(chunk, { stream: true }));
  }

  end(): void {
    this.take(this.decoder.decode());
    if (this.partial !== "") this.cut(this.partial);
    this.partial = "";
  }

  private take(text: string): void {
    const lines = (this.partial + text).split("\n");
    this.partial = lines.pop() ?? "";
    for (const line of lines) this.cut(line.replace(/\r$/, ""));
    // An unfinished line is cut only where no secret can straddle the cut.
    const hold = this.secrets?.longest ?? 0;
    while (this.partial.length > this.maxLine + hold) {
      this.partial = this.secrets?.mask(this.partial) ?? this.partial;
      if (this.partial.length <= this.maxLine + hold) break;
      this.emit(this.partial.slice(0, this.maxLine));
      this.partial = this.partial.slice(this.maxLine);
    }
  }

  private cut(line: string): void {
    const masked = this.secrets?.mask(line) ?? line;
    for (let at = 0; at === 0 || at < masked.length; at += this.maxLine) {
      this.emit(masked.slice(at, at + this.maxLine));
    }
  }
}

/** The last 64 KiB of a stream's lines, for the result and the dead-letter record. */
class Tail {
  private text = "";
  truncated = false;
  constructor(private readonly max = 64 * 1024) {}
  add(line: string): void {
    this.text += line + "\n";
    if (this.text.length > this.max) {
      this.text = this.text.slice(-this.max);
      this.truncated = true;
    }
  }
  toString(): string {
    return this.text;
  }
}

// ---------------------------------------------------------------------------
// Configuration: the environment (and iron.json) in, every problem named
// ---------------------------------------------------------------------------

type HostKeyPolicy = "yes" | "accept-new";
type LogLevelName = "debug" | "info" | "warning" | "error";
type LogFormat = "text" | "json";

interface QueueConfig {
  /** scheme://host:port of the IronMQ API, no trailing slash. */
  baseUrl: string;
  projectId: string;
  token?: string;
  queueName: string;
}

interface SshConfig {
  /** SSH_PORT and SSH_USER: for hosts written without them. */
  port: number;
  user: string;
  /** Private key file; undefined means ssh-agent (agentSocket) only. */
  keyFile?: string;
  agentSocket?: string;
  passphrase?: string;
  knownHostsFile: string;
  strictHostKeyChecking: HostKeyPolicy;
  connectTimeoutMs: number;
  channelsPerConnection: number;
  /** A connection unused this long is closed (SSH_IDLE_TIMEOUT). */
  idleTimeoutMs: number;
  /** The key file's bytes, once the configuration has read and checked them. */
  privateKey?: Uint8Array;
}

export interface TaskConfig {
  command: string;
  /** Where TASK_COMMAND, the default task and tasks without hosts: run (SSH_HOST). */
  hosts: HostSpec[];
  concurrency: number;
  /** How many of a message's hosts run at once (TASK_HOST_PARALLELISM). */
  hostParallelism: number;
  /** 0 means no limit. */
  timeoutMs: number;
  maxAttempts: number;
  retryDelaySeconds: number;
  deadLetterQueue: string;
  reservationTimeoutSeconds: number;
  pollWaitSeconds: number;
  shutdownGraceMs: number;
  /** Named tasks (TASKS_FILE); without one, every message runs `command`. */
  catalog?: Catalog;
  /** Where each message's result goes when it names no reply_to queue. */
  resultsQueue?: string;
}

export interface Config {
  queue: QueueConfig;
  /** Set when no IronMQ is configured: the worker starts its own server. */
  embedded?: QueueServerOptions;
  ssh: SshConfig;
  task: TaskConfig;
  logLevel: LogLevelName;
  /** LOG_FORMAT: Fabric-style text lines for svlogd, or JSON objects. */
  logFormat: LogFormat;
  /** Parameters a catalog declares and never uses, to say at start. */
  warnings: string[];
  /** TASK_HTTP_PORT: the monitor's listener (web.ts); off when unset. */
  http?: { hostname: string; port: number; token?: string };
}

/** An iron.json file found on disk, as read (path for error messages). */
interface IronJsonFile {
  path: string;
  text: string;
}

/** What configuration defaults depend on outside the environment. */
export interface ConfigContext {
  home: string;
  user: string;
  ironJsonFiles: IronJsonFile[];
  /** Whether a regular file exists, for the default key search. */
  exists: (path: string) => boolean;
  /** Reads a key file, so a bad key is reported with the other problems. */
  readKey?: (path: string) => Uint8Array;
  /** Whether a Unix socket exists there, for SSH_AUTH_SOCK. */
  isSocket?: (path: string) => boolean;
  /** The task catalog: TASKS_FILE, else tasks.yaml where the worker starts (text undefined: no such file). */
  catalogFile?: { path: string; text?: string; named: boolean };
}

export class ConfigError extends Error {
  constructor(readonly problems: string[]) {
    super(
      `invalid configuration:\n${problems.map((p) => `  - ${p}`).join("\n")}`,
    );
    this.name = "ConfigError";
  }
}

const IRON_KEYS = ["token", "project_id", "host", "port", "scheme"] as const;
type IronKey = typeof IRON_KEYS[number];
type IronSettings = Partial<Record<IronKey, string>>;

/** Reads iron.json settings; an "mq" or "iron_mq" sub-object overrides the top level. */
function ironJsonSettings(
  file: IronJsonFile,
  problems: string[],
): IronSettings {
  let parsed: unknown;
  try {
    parsed = JSON.parse(file.text);
  } catch (e) {
    problems.push(`${file.path}: not valid JSON (${errorText(e)})`);
    return {};
  }
  if (!isRecord(parsed)) {
    problems.push(`${file.path}: must hold a JSON object`);
    return {};
  }
  const settings: IronSettings = {};
  for (const layer of [parsed, parsed.iron_mq, parsed.mq]) {
    if (!isRecord(layer)) continue;
    for (const key of IRON_KEYS) {
      const value = layer[key];
      if (typeof value === "string" || typeof value === "number") {
        settings[key] = String(value);
      }
    }
  }
  return settings;
}

/** A setting's value and where it came from, for error messages. */
interface Sourced {
  value: string;
  from: string;
}

/** IRON_MQ_X beats IRON_X beats iron.json in the working directory, then home. */
function ironSetting(
  env: Env,
  files: { path: string; settings: IronSettings }[],
  key: IronKey,
): Sourced | undefined {
  const name = key.toUpperCase();
  for (const variable of [`IRON_MQ_${name}`, `IRON_${name}`]) {
    const value = env[variable];
    if (value !== undefined && value !== "") return { value, from: variable };
  }
  for (const { path, settings } of files) {
    const value = settings[key];
    if (value !== undefined && value !== "") {
      return { value, from: `${path} "${key}"` };
    }
  }
  return undefined;
}

/** Collects every problem instead of stopping at the first. */
class EnvReader {
  readonly problems: string[] = [];
  constructor(private readonly env: Env) {}

  text(name: string, fallback: string): string {
    return envValue(this.env, name) ?? fallback;
  }

  optional(name: string): string | undefined {
    return envValue(this.env, name);
  }

  integer(name: string, fallback: number, min: number, max: number): number {
    return this.parseNumber(name, fallback, min, max, true);
  }

  /** Seconds, fractions allowed, returned as seconds. */
  seconds(name: string, fallback: number, min: number, max: number): number {
    return this.parseNumber(name, fallback, min, max, false);
  }

  choice<T extends string>(name: string, fallback: T, choices: T[]): T {
    const value = this.text(name, fallback);
    if ((choices as string[]).includes(value)) return value as T;
    this.problems.push(
      `${name}=${JSON.stringify(value)}: must be one of ${choices.join(", ")}`,
    );
    return fallback;
  }

  private parseNumber(
    name: string,
    fallback: number,
    min: number,
    max: number,
    whole: boolean,
  ): number {
    const raw = this.optional(name);
    if (raw === undefined) return fallback;
    const value = Number(raw.trim());
    const kind = whole ? "a whole number" : "a number of seconds";
    if (
      raw.trim() === "" || !Number.isFinite(value) ||
      (whole && !Number.isInteger(value)) || value < min || value > max
    ) {
      this.problems.push(
        `${name}=${JSON.stringify(raw)}: must be ${kind} from ${min} to ${max}`,
      );
      return fallback;
    }
    return value;
  }
}

const DEFAULT_KEY_FILES = ["id_ed25519", "id_ecdsa", "id_rsa"];
/** Iron.io's default host, as its official clients use when given only a token. */
const DEFAULT_IRON_HOST = "mq-aws-us-east-1-1.iron.io";

/** The queue settings (IronMQ, or the embedded server), every problem into `read`. */
function queueSettings(
  read: EnvReader,
  env: Env,
  context: ConfigContext,
): { queue: QueueConfig; embedded?: QueueServerOptions } {
  const problems = read.problems;
  const files = context.ironJsonFiles.map((file) => ({
    path: file.path,
    settings: ironJsonSettings(file, problems),
  }));
  const iron = (key: IronKey) => ironSetting(env, files, key);
  const shown = (s: Sourced) => `${s.from}=${JSON.stringify(s.value)}`;

  const queueName = read.text("IRON_MQ_QUEUE_NAME", "my_queue");
  if (!QUEUE_NAME.test(queueName)) {
    problems.push(
      `IRON_MQ_QUEUE_NAME=${
        JSON.stringify(queueName)
      }: use 1 to 64 letters, digits, '_', '-' or '.'`,
    );
  }

  const token = iron("token")?.value;
  const host = iron("host")?.value;
  const embedded = token === undefined && host === undefined;
  for (const key of ["port", "scheme", "project_id"] as const) {
    const given = iron(key);
    if (embedded && given !== undefined) {
      problems.push(
        `${
          shown(given)
        }: set IRON_HOST too (and IRON_TOKEN for Iron.io), or unset it to use the embedded queue server`,
      );
    }
  }
  const schemeSetting = iron("scheme");
  const scheme = schemeSetting?.value ?? (embedded ? "http" : "https");
  if (schemeSetting && scheme !== "http" && scheme !== "https") {
    problems.push(`${shown(schemeSetting)}: must be http or https`);
  }
  const queueHost = host ?? DEFAULT_IRON_HOST;
  if (token !== undefined && scheme === "http" && !isLoopback(queueHost)) {
    problems.push(
      `${
        shown(schemeSetting!)
      }: would send IRON_TOKEN unencrypted to ${queueHost}; use https`,
    );
  }
  const portSetting = iron("port");
  const port = Number(portSetting?.value ?? (scheme === "http" ? 80 : 443));
  if (portSetting && !/^\d{1,5}$/.test(portSetting.value) || port > 65535) {
    problems.push(`${shown(portSetting!)}: must be a port from 1 to 65535`);
  }
  // Only Iron.io's own hosts need a real project id; any id works elsewhere.
  const projectSetting = iron("project_id");
  const projectId = projectSetting?.value ??
    (token !== undefined && host === undefined ? "" : "local");
  if (projectId === "") {
    problems.push(
      "IRON_PROJECT_ID: required with IRON_TOKEN for Iron.io (find it in the Iron.io dashboard)",
    );
  } else if (!/^[A-Za-z0-9_-]+$/.test(projectId)) {
    problems.push(`${shown(projectSetting!)}: use letters, digits, '_' or '-'`);
  }
  let embeddedOptions: QueueServerOptions | undefined;
  if (embedded) {
    try {
      embeddedOptions = queueServerOptionsFromEnv(env);
    } catch (e) {
      problems.push(errorText(e));
    }
  }
  const queue: QueueConfig = {
    baseUrl: `${scheme}://${bracketIPv6(queueHost)}:${port}`,
    projectId,
    token: token ?? embeddedOptions?.token,
    queueName,
  };
  return { queue, embedded: embeddedOptions };
}

/** Pure: environment plus context in, validated configuration (or ConfigError) out. */
export function parseConfig(env: Env, context: ConfigContext): Config {
  const read = new EnvReader(env);
  const problems = read.problems;
  const { queue, embedded: embeddedOptions } = queueSettings(
    read,
    env,
    context,
  );
  const queueName = queue.queueName;

  const keyFile = read.optional("SSH_KEY_FILE");
  const agentSocket = keyFile === undefined
    ? read.optional("SSH_AUTH_SOCK")
    : undefined;
  // Looked for only when needed: under ./start, Deno may read nothing else.
  const defaultKey = keyFile === undefined && agentSocket === undefined
    ? DEFAULT_KEY_FILES
      .map((name) => `${context.home}/.ssh/${name}`)
      .find(context.exists)
    : undefined;
  const { hosts, defaults: hostDefaults } = hostSettings(read, context);
  const ssh: SshConfig = {
    port: hostDefaults.port,
    user: hostDefaults.user,
    keyFile: keyFile ?? defaultKey,
    agentSocket,
    passphrase: read.optional("SSH_KEY_PASSPHRASE"),
    knownHostsFile: read.text(
      "SSH_KNOWN_HOSTS",
      `${context.home}/.ssh/known_hosts`,
    ),
    strictHostKeyChecking: read.choice(
      "SSH_STRICT_HOST_KEY_CHECKING",
      "yes",
      ["yes", "accept-new"],
    ),
    connectTimeoutMs: read.seconds("SSH_CONNECT_TIMEOUT", 10, 1, 300) * 1000,
    channelsPerConnection: read.integer(
      "SSH_CHANNELS_PER_CONNECTION",
      4,
      1,
      8,
    ),
    idleTimeoutMs: read.seconds("SSH_IDLE_TIMEOUT", 300, 1, 86400) * 1000,
  };
  if (ssh.keyFile !== undefined && context.readKey !== undefined) {
    let problem: string | undefined;
    try {
      const bytes = context.readKey(ssh.keyFile);
      problem = keyProblem(bytes, ssh.passphrase);
      if (problem === undefined) ssh.privateKey = bytes; // read and parsed once
    } catch (e) {
      problem = `cannot read it (${errorText(e)})`;
    }
    if (problem) problems.push(`SSH_KEY_FILE=${ssh.keyFile}: ${problem}`);
  }
  if (
    ssh.agentSocket !== undefined && context.isSocket !== undefined &&
    !context.isSocket(ssh.agentSocket)
  ) {
    problems.push(
      `SSH_AUTH_SOCK=${ssh.agentSocket}: no socket there; is ssh-agent running? (or set SSH_KEY_FILE)`,
    );
  }
  if (ssh.keyFile === undefined && ssh.agentSocket === undefined) {
    problems.push(
      `SSH_KEY_FILE: no key given and none found (${
        DEFAULT_KEY_FILES.map((n) => `~/.ssh/${n}`).join(", ")
      }) and no ssh-agent (SSH_AUTH_SOCK): create one with ssh-keygen -t ed25519, or set SSH_KEY_FILE`,
    );
  }

  const reservationTimeoutSeconds = read.integer(
    "TASK_RESERVATION_TIMEOUT",
    60,
    30,
    86400,
  );
  const task: TaskConfig = {
    command: read.text("TASK_COMMAND", "cat /etc/os-release"),
    hosts,
    concurrency: read.integer("TASK_CONCURRENCY", 8, 1, 256),
    hostParallelism: read.integer("TASK_HOST_PARALLELISM", 32, 1, 1024),
    timeoutMs: read.seconds("TASK_TIMEOUT", 0, 0, 86400) * 1000,
    maxAttempts: read.integer("TASK_MAX_ATTEMPTS", 5, 1, 1000),
    retryDelaySeconds: read.integer("TASK_RETRY_DELAY", 10, 0, 900),
    deadLetterQueue: read.text("TASK_DEAD_LETTER_QUEUE", `${queueName}_failed`),
    reservationTimeoutSeconds,
    pollWaitSeconds: read.integer("TASK_POLL_WAIT", 5, 0, 30),
    // Grace + 2 s of TERM/KILL stays under runit's 7 s `sv` timeout.
    shutdownGraceMs: read.seconds("TASK_SHUTDOWN_GRACE", 4, 0, 3600) * 1000,
  };
  if (task.command.trim() === "") {
    problems.push("TASK_COMMAND: must not be blank");
  }
  const resultsQueue = read.optional("TASK_RESULTS_QUEUE");
  if (resultsQueue !== undefined) {
    if (!QUEUE_NAME.test(resultsQueue)) {
      problems.push(
        `TASK_RESULTS_QUEUE=${
          JSON.stringify(resultsQueue)
        }: use 1 to 64 letters, digits, '_', '-' or '.'`,
      );
    }
    task.resultsQueue = resultsQueue;
  }
  const http = httpSettings(read);
  const warnings: string[] = [];
  const loaded = loadCatalog(
    context.catalogFile,
    { ...task, host: hostDefaults },
    problems,
  );
  task.catalog = loaded?.catalog;
  warnings.push(...loaded?.warnings ?? []);
  if (task.deadLetterQueue === queueName) {
    problems.push(
      "TASK_DEAD_LETTER_QUEUE: must differ from IRON_MQ_QUEUE_NAME",
    );
  }
  const logFormat = read.choice<LogFormat>("LOG_FORMAT", "text", [
    "text",
    "json",
  ]);
  const logLevel = read.choice<LogLevelName>("LOG_LEVEL", "info", [
    "debug",
    "info",
    "warning",
    "error",
  ]);

  if (problems.length > 0) throw new ConfigError(problems);
  return {
    queue,
    embedded: embeddedOptions,
    ssh,
    task,
    logLevel,
    logFormat,
    warnings,
    http,
  };
}

/** TASK_HTTP_*: the monitor's listener, off unless TASK_HTTP_PORT is set. */
function httpSettings(read: EnvReader): Config["http"] {
  if (read.optional("TASK_HTTP_PORT") === undefined) return undefined;
  const port = read.integer("TASK_HTTP_PORT", 0, 0, 65535);
  const hostname = read.text("TASK_HTTP_HOST", "127.0.0.1");
  const token = read.optional("TASK_HTTP_TOKEN");
  if (!/^(?:[A-Za-z0-9.-]+|[0-9A-Fa-f:.]+)$/.test(hostname)) {
    read.problems.push(
      `TASK_HTTP_HOST=${
        JSON.stringify(hostname)
      }: must be a host name or IP address such as 127.0.0.1`,
    );
  } else if (token === undefined && !isLoopback(hostname)) {
    read.problems.push(
      `TASK_HTTP_HOST=${hostname}: a non-loopback address needs TASK_HTTP_TOKEN (a long random string, e.g. openssl rand -hex 32), or listen on 127.0.0.1`,
    );
  }
  if (token !== undefined && !/^[\x21-\x7e]{16,}$/.test(token)) {
    read.problems.push(
      "TASK_HTTP_TOKEN: must be at least 16 printable ASCII characters without spaces (value not shown)",
    );
  }
  return { hostname, port, token };
}

/**
 * What `deno task send` needs: the worker's queue (a running worker's embedded
 * server at MQ_HOST:MQ_PORT, when no IronMQ is set) and its catalog, if any.
 */
export function senderConfig(
  env: Env,
): {
  queue: QueueConfig;
  catalog?: Catalog;
  hosts: HostSpec[];
  deadLetterQueue: string;
} {
  const context = configContext(env);
  const read = new EnvReader(env);
  const { queue, embedded } = queueSettings(read, env, context);
  if (embedded) {
    queue.baseUrl = `http://${bracketIPv6(embedded.hostname ?? "127.0.0.1")}:${
      embedded.port ?? 8080
    }`;
  }
  const { hosts, defaults: host } = hostSettings(read, context);
  const defaults = {
    timeoutMs: read.seconds("TASK_TIMEOUT", 0, 0, 86400) * 1000,
    maxAttempts: read.integer("TASK_MAX_ATTEMPTS", 5, 1, 1000),
    host,
  };
  const deadLetterQueue = read.text(
    "TASK_DEAD_LETTER_QUEUE",
    `${queue.queueName}_failed`,
  );
  const catalog = loadCatalog(context.catalogFile, defaults, read.problems)
    ?.catalog;
  if (read.problems.length > 0) throw new ConfigError(read.problems);
  return { queue, catalog, hosts, deadLetterQueue };
}

/** SSH_HOST's list, and what hosts written without user, port or jump get. */
function hostSettings(
  read: EnvReader,
  context: ConfigContext,
): { hosts: HostSpec[]; defaults: HostDefaults } {
  const bare = {
    port: read.integer("SSH_PORT", 22, 1, 65535),
    user: read.text("SSH_USER", context.user),
  };
  const jumpText = read.optional("SSH_PROXY_JUMP");
  const { jump, problems: jumpProblems } = jumpText === undefined
    ? { jump: [], problems: [] }
    : parseJump(jumpText, bare);
  for (const p of jumpProblems) read.problems.push(`SSH_PROXY_JUMP=${p}`);
  const defaults = { ...bare, jump };
  const { hosts, problems } = parseHostList(
    read.text("SSH_HOST", "127.0.0.1"),
    defaults,
  );
  for (const p of problems) read.problems.push(`SSH_HOST: ${p}`);
  return { hosts, defaults };
}

/** The catalog file parsed, its problems added to `problems`; none without a file. */
function loadCatalog(
  file: ConfigContext["catalogFile"],
  defaults: CatalogDefaults,
  problems: string[],
): { catalog: Catalog; warnings: string[] } | undefined {
  if (file?.text === undefined) {
    if (file?.named) problems.push(`TASKS_FILE=${file.path}: no such file`);
    return undefined;
  }
  try {
    return parseCatalog(file.path, file.text, defaults);
  } catch (e) {
    if (!(e instanceof ConfigError)) throw e;
    problems.push(...e.problems);
    return undefined;
  }
}

/** TASKS_FILE, else tasks.yaml in the working directory, as read. */
function catalogFile(env: Env): ConfigContext["catalogFile"] {
  const named = envValue(env, "TASKS_FILE");
  const path = named ?? `${Deno.cwd()}/tasks.yaml`;
  return { path, text: readTextIfExists(path), named: named !== undefined };
}

/** Reads iron.json (or .iron.json) from the working directory, then home. */
function readIronJsonFiles(cwd: string, home: string): IronJsonFile[] {
  const found: IronJsonFile[] = [];
  for (const path of ironJsonPaths(cwd, home)) {
    const text = readTextIfExists(path);
    if (text !== undefined) found.push({ path, text });
  }
  return found;
}

/** The iron.json files the configuration may read, found or not. */
function ironJsonPaths(cwd: string, home: string): string[] {
  const paths = [cwd, home].flatMap((dir) =>
    ["iron.json", ".iron.json"].map((name) => `${dir}/${name}`)
  );
  return [...new Set(paths)];
}

function readTextIfExists(path: string): string | undefined {
  try {
    return Deno.readTextFileSync(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return undefined;
    throw new Error(`cannot read ${path}: ${errorText(e)}`);
  }
}

/** The curl line that posts a test message; a token is shown as $MQ_TOKEN, never its value. */
function curlExample(queue: QueueConfig): string {
  const url =
    `${queue.baseUrl}/3/projects/${queue.projectId}/queues/${queue.queueName}/messages`;
  const auth = queue.token === undefined
    ? ""
    : ` -H "Authorization: OAuth $MQ_TOKEN"`;
  return `curl -sS -X POST -H 'Content-Type: application/json'${auth} -d '{"messages":[{"body":"hello world!"}]}' ${url}`;
}

/** HOME and the user name from the environment, else from the system (chpst sets neither). */
function configContext(env: Env): ConfigContext {
  let account: { username: string; homedir: string } | undefined;
  const system = () => (account ??= userInfo());
  let home: string;
  let user: string;
  try {
    home = env.HOME ?? system().homedir;
    user = env.USER ?? env.LOGNAME ?? system().username;
  } catch (e) {
    throw new ConfigError([
      `HOME/USER: not set and the system's account cannot be read (${
        errorText(e)
      }): set HOME and USER (or SSH_USER)`,
    ]);
  }
  return {
    home,
    user,
    ironJsonFiles: readIronJsonFiles(Deno.cwd(), home),
    catalogFile: catalogFile(env),
    exists: (path) => {
      try {
        return Deno.statSync(path).isFile;
      } catch {
        return false;
      }
    },
    readKey: (path) => Deno.readFileSync(path),
    isSocket: (path) => {
      try {
        return Deno.statSync(path).isSocket === true;
      } catch {
        return false;
      }
    },
  };
}

/**
 * Deno flags granting the worker only what this configuration needs: the queue
 * and SSH addresses, the key, known_hosts, iron.json and the embedded database.
 */
export function permissionFlags(
  config: Config,
  configPaths: string[],
  needsUserInfo: boolean,
): string[] {
  const net = new Set<string>();
  const read = new Set<string>(configPaths);
  const write = new Set<string>();
  if (config.embedded) {
    const host = bracketIPv6(config.embedded.hostname ?? "127.0.0.1");
    const port = config.embedded.port ?? 8080;
    net.add(port === 0 ? host : `${host}:${port}`);
    const db = config.embedded.dbPath ?? "ironmq.sqlite";
    if (db !== ":memory:") {
      for (const suffix of ["", "-wal", "-shm", "-journal"]) {
        read.add(db + suffix);
        write.add(db + suffix);
      }
    }
  } else {
    const url = new URL(config.queue.baseUrl);
    net.add(
      `${url.hostname}:${url.port || (url.protocol === "https:" ? 443 : 80)}`,
    );
  }
  // Hosts behind a jump host are reached through it, not by the worker.
  for (const host of servedHosts(config.task)) {
    const first = host.jump[0] ?? host;
    net.add(`${bracketIPv6(first.host)}:${first.port}`);
  }
  if (config.http) {
    const host = bracketIPv6(config.http.hostname);
    net.add(config.http.port === 0 ? host : `${host}:${config.http.port}`);
    read.add(new URL("./page.html", import.meta.url).pathname);
  }
  read.add(config.ssh.knownHostsFile);
  if (config.ssh.strictHostKeyChecking === "accept-new") {
    write.add(config.ssh.knownHostsFile);
  }
  if (config.ssh.keyFile !== undefined) read.add(config.ssh.keyFile);
  if (config.ssh.agentSocket !== undefined) {
    net.add(`unix:${config.ssh.agentSocket}`);
    read.add(config.ssh.agentSocket);
    write.add(config.ssh.agentSocket);
  }
  const unusable = [...net, ...read, ...write].filter((p) => /[\s,]/.test(p));
  if (unusable.length > 0) {
    throw new ConfigError(
      unusable.map((p) =>
        `${
          JSON.stringify(p)
        }: a path or host with a space or comma cannot be granted to Deno; move or rename it`
      ),
    );
  }
  const flags = [
    "--allow-env",
    `--allow-net=${[...net].join(",")}`,
    `--allow-read=${[...read].join(",")}`,
  ];
  if (write.size > 0) flags.push(`--allow-write=${[...write].join(",")}`);
  if (needsUserInfo) flags.push("--allow-sys=uid,gid,userInfo");
  return flags;
}

/** `tasks.ts --permissions`: print the flags for `deno run` (see ./start). */
function printPermissions(env: Env): number {
  try {
    const context = configContext(env);
    const config = parseConfig(env, context);
    const flags = permissionFlags(
      config,
      // Found or not: the worker looks for each of them.
      [
        ...ironJsonPaths(Deno.cwd(), context.home),
        ...context.catalogFile ? [context.catalogFile.path] : [],
      ],
      env.USER === undefined && env.LOGNAME === undefined ||
        env.HOME === undefined,
    );
    console.log(flags.join(" "));
    return 0;
  } catch (e) {
    console.error(fatalText(e, env));
    return 2;
  }
}

// ---------------------------------------------------------------------------
// IronMQ client (plain fetch)
// ---------------------------------------------------------------------------

interface QueueMessage {
  id: string;
  body: string;
  reserved_count: number;
  reservation_id: string;
}

/** A message read without reserving it (peek, get). */
type StoredMessage = Omit<QueueMessage, "reservation_id">;

export class QueueError extends Error {
  constructor(
    message: string,
    readonly status: number | undefined,
    readonly retryable: boolean,
  ) {
    super(message);
    this.name = "QueueError";
  }
}

/** A reply over its size limit: read no further (a broken or hostile server). */
export class ReplyTooLarge extends QueueError {}

/**
 * Replies are read up to a limit, so a broken or hostile server cannot take
 * the worker's memory. A reserve's reply holds up to 100 messages of up to
 * 256 KiB each, escaped; after one too large the fetcher asks for one at a time.
 */
const MAX_RESERVE_REPLY_BYTES = 16 * 1024 * 1024;
const MAX_REPLY_BYTES = 1024 * 1024;

interface DeleteItem {
  id: string;
  reservation_id: string;
}

/** The IronMQ v3 calls the worker makes. Errors are QueueErrors that say whether a retry may help. */
export class IronMqClient {
  constructor(
    private readonly config: QueueConfig,
    /** Told of each request and its status (the worker's own client). */
    private readonly monitor?: Monitor,
  ) {}

  /** Creates the queue if it does not exist yet, so the first reserve finds it; true if it did. */
  async ensureQueue(signal?: AbortSignal): Promise<boolean> {
    try {
      await this.call("GET", `/queues/${this.queue()}`, undefined, { signal });
      return false;
    } catch (e) {
      if (!(e instanceof QueueError) || e.status !== 404) throw e;
      await this.call("PUT", `/queues/${this.queue()}`, { queue: {} }, {
        signal,
      });
      return true;
    }
  }

  reserve(
    n: number,
    timeoutSeconds: number,
    waitSeconds: number,
    signal?: AbortSignal,
  ): Promise<QueueMessage[]> {
    return this.call<{ messages?: unknown }>(
      "POST",
      `/queues/${this.queue()}/reservations`,
      { n, timeout: timeoutSeconds, wait: waitSeconds },
      { waitSeconds, signal, maxReplyBytes: MAX_RESERVE_REPLY_BYTES },
    ).then((reply) => parseReserved(reply.messages));
  }

  async delete(id: string, reservationId: string): Promise<void> {
    await this.call("DELETE", `/queues/${this.queue()}/messages/${id}`, {
      reservation_id: reservationId,
    });
  }

  async deleteBatch(items: DeleteItem[]): Promise<void> {
    await this.call("DELETE", `/queues/${this.queue()}/messages`, {
      ids: items,
    });
  }

  async release(
    id: string,
    reservationId: string,
    delaySeconds: number,
  ): Promise<void> {
    await this.call(
      "POST",
      `/queues/${this.queue()}/messages/${id}/release`,
      { reservation_id: reservationId, delay: delaySeconds },
    );
  }

  async touch(
    id: string,
    reservationId: string,
    timeoutSeconds: number,
  ): Promise<string> {
    const reply = await this.call<{ reservation_id?: unknown }>(
      "POST",
      `/queues/${this.queue()}/messages/${id}/touch`,
      { reservation_id: reservationId, timeout: timeoutSeconds },
    );
    if (typeof reply.reservation_id !== "string") {
      throw new QueueError("touch reply has no reservation_id", 200, true);
    }
    return reply.reservation_id;
  }

  async post(
    queue: string,
    bodies: string[],
    delaySeconds = 0,
  ): Promise<string[]> {
    const reply = await this.call<{ ids?: unknown }>(
      "POST",
      `/queues/${encodeURIComponent(queue)}/messages`,
      {
        messages: bodies.map((body) =>
          delaySeconds > 0 ? { body, delay: delaySeconds } : { body }
        ),
      },
    );
    return Array.isArray(reply.ids) ? reply.ids.map(String) : [];
  }

  /** Deletes this client's queue with its messages (a reply queue, once read). */
  async deleteQueue(): Promise<void> {
    await this.call("DELETE", `/queues/${this.queue()}`, {});
  }

  /** Posts one message whose body is `body` byte for byte (IronMQ's webhook: no JSON escaping). */
  async postVerbatim(queue: string, body: string): Promise<string[]> {
    const reply = await this.call<{ ids?: unknown }>(
      "POST",
      `/queues/${encodeURIComponent(queue)}/webhook`,
      body,
    );
    return Array.isArray(reply.ids) ? reply.ids.map(String) : [];
  }

  /**
   * Up to `n` (1 to 100) of `queue`'s messages that are ready, oldest first,
   * without reserving them: reserved and delayed ones are not shown.
   */
  peek(queue: string, n: number): Promise<StoredMessage[]> {
    return this.call<{ messages?: unknown }>(
      "GET",
      `/queues/${encodeURIComponent(queue)}/messages?n=${n}`,
      undefined,
      { maxReplyBytes: MAX_RESERVE_REPLY_BYTES },
    ).then((reply) => {
      if (!Array.isArray(reply.messages)) {
        throw new QueueError("peek reply has no messages array", 200, true);
      }
      return reply.messages.map(parseStored);
    });
  }

  /** One message of `queue`, reserved or not; a QueueError with status 404 if there is none. */
  async getMessage(queue: string, id: string): Promise<StoredMessage> {
    // One message of up to 256 KiB, escaped, can be over the usual limit.
    const reply = await this.call<{ message?: unknown }>(
      "GET",
      `/queues/${encodeURIComponent(queue)}/messages/${encodeURIComponent(id)}`,
      undefined,
      { maxReplyBytes: MAX_RESERVE_REPLY_BYTES },
    );
    return parseStored(reply.message);
  }

  /** Deletes a message nobody holds (a reserved one is refused: 403). */
  async deleteMessage(queue: string, id: string): Promise<void> {
    await this.call(
      "DELETE",
      `/queues/${encodeURIComponent(queue)}/messages/${encodeURIComponent(id)}`,
      {},
    );
  }

  /** Deletes every message of `queue`, reserved ones too; the queue stays. */
  async clearQueue(queue: string): Promise<void> {
    await this.call(
      "DELETE",
      `/queues/${encodeURIComponent(queue)}/messages`,
      {},
    );
  }

  /** How many messages `queue` holds, reserved and delayed ones included. */
  async queueSize(queue: string): Promise<number> {
    const reply = await this.call<{ queue?: unknown }>(
      "GET",
      `/queues/${encodeURIComponent(queue)}`,
      undefined,
    );
    const size = isRecord(reply.queue) ? reply.queue.size : undefined;
    if (typeof size !== "number") {
      throw new QueueError("queue reply has no size", 200, true);
    }
    return size;
  }

  private queue(): string {
    return encodeURIComponent(this.config.queueName);
  }

  /** One request; a string body is sent as it is, anything else as JSON. */
  private async call<T>(
    method: string,
    path: string,
    body: unknown,
    { waitSeconds = 0, signal, maxReplyBytes = MAX_REPLY_BYTES }: {
      waitSeconds?: number;
      signal?: AbortSignal;
      maxReplyBytes?: number;
    } = {},
  ): Promise<T> {
    const url =
      `${this.config.baseUrl}/3/projects/${this.config.projectId}${path}`;
    const where = `${method} ${this.config.baseUrl}/3/projects/.../${
      path.replace(/^\//, "")
    }`;
    const headers: Record<string, string> = {
      "Content-Type": typeof body === "string"
        ? "text/plain; charset=utf-8"
        : "application/json",
      "Accept": "application/json",
    };
    if (this.config.token !== undefined) {
      headers.Authorization = `OAuth ${this.config.token}`;
    }
    // A timer cleared once the reply is read: AbortSignal.timeout() would keep
    // every request's signal alive for its full 30 s, thousands at a time.
    const timeout = new AbortController();
    const timer = setTimeout(
      () => timeout.abort(new Error("no reply within the time limit")),
      (waitSeconds + 30) * 1000,
    );
    const onStop = () => timeout.abort(signal?.reason);
    if (signal?.aborted) onStop();
    signal?.addEventListener("abort", onStop, { once: true });
    let response: Response;
    let text: string;
    try {
      response = await fetch(url, {
        method,
        headers,
        body: body === undefined || typeof body === "string"
          ? body
          : JSON.stringify(body),
        signal: timeout.signal,
      });
      const bytes = await readAtMost(response.body, maxReplyBytes);
      if (bytes === undefined) {
        throw new ReplyTooLarge(
          `${where}: HTTP ${response.status} with a reply over ${maxReplyBytes} bytes: not read (is IRON_HOST an IronMQ server?)`,
          response.status,
          true,
        );
      }
      text = new TextDecoder().decode(bytes);
    } catch (e) {
      if (!signal?.aborted) {
        this.monitor?.queueRequest(opOf(method, path, body), "error");
      }
      if (signal?.aborted || e instanceof ReplyTooLarge) throw e;
      throw new QueueError(`${where}: ${errorText(e)}`, undefined, true);
    } finally {
      clearTimeout(timer);
      signal?.removeEventListener("abort", onStop);
    }
    this.monitor?.queueRequest(opOf(method, path, body), response.status);
    if (!response.ok) {
      const status = response.status;
      const retryable = status >= 500 || status === 408 || status === 429;
      const hint = status === 401
        ? ": check IRON_TOKEN (for a `deno task mq` server: its MQ_TOKEN)"
        : "";
      throw new QueueError(
        `${where}: HTTP ${status}${serverMessage(text)}${hint}`,
        status,
        retryable,
      );
    }
    try {
      const parsed: unknown = JSON.parse(text);
      if (isRecord(parsed)) return parsed as T;
    } catch {
      // fall through
    }
    throw new QueueError(
      `${where}: HTTP ${response.status} with a reply that is not a JSON object`,
      response.status,
      true,
    );
  }
}

/** A request's kind, for the metrics: reserve, delete, post, touch... */
function opOf(method: string, path: string, body: unknown): string {
  const rest = path.replace(/\?.*$/, "").replace(/^\/queues\/[^/]+/, "");
  if (rest === "") {
    return { GET: "queue_info", PUT: "create_queue" }[method] ?? "delete_queue";
  }
  if (rest === "/messages") {
    if (method === "POST") return "post";
    if (method === "GET") return "peek";
    return isRecord(body) && "ids" in body ? "delete_batch" : "clear";
  }
  const last = rest.split("/").pop()!;
  if (["reservations", "webhook", "touch", "release"].includes(last)) {
    return { reservations: "reserve", webhook: "post_verbatim" }[last] ?? last;
  }
  return method === "GET" ? "get_message" : "delete";
}

function serverMessage(text: string): string {
  try {
    const parsed: unknown = JSON.parse(text);
    if (isRecord(parsed) && typeof parsed.msg === "string") {
      return ` (${parsed.msg})`;
    }
  } catch {
    // not JSON
  }
  return text === "" ? "" : ` (${text.slice(0, 200)})`;
}

/** A message as peek and get show it: no reservation. */
function parseStored(m: unknown): StoredMessage {
  if (!isRecord(m) || typeof m.id !== "string" || typeof m.body !== "string") {
    throw new QueueError("the reply has a malformed message", 200, true);
  }
  return {
    id: m.id,
    body: m.body,
    reserved_count: typeof m.reserved_count === "number" ? m.reserved_count : 0,
  };
}

function parseReserved(value: unknown): QueueMessage[] {
  if (!Array.isArray(value)) {
    throw new QueueError("reserve reply has no messages array", 200, true);
  }
  return value.map((m): QueueMessage => {
    if (
      !isRecord(m) || typeof m.id !== "string" ||
      typeof m.reservation_id !== "string" || typeof m.body !== "string"
    ) {
      throw new QueueError("reserve reply has a malformed message", 200, true);
    }
    return {
      id: m.id,
      body: m.body,
      reservation_id: m.reservation_id,
      reserved_count: typeof m.reserved_count === "number"
        ? m.reserved_count
        : 1,
    };
  });
}

/** The IronMQ calls the worker makes. */
type QueueApi = Pick<
  IronMqClient,
  | "ensureQueue"
  | "reserve"
  | "delete"
  | "deleteBatch"
  | "release"
  | "touch"
  | "post"
  | "postVerbatim"
>;

// Dead letters: the records the worker writes to TASK_DEAD_LETTER_QUEUE, read,
// requeued and removed (`deno task dlq`, the monitor's page)

export interface DeadLetter {
  /** The record's message id in the dead-letter queue. */
  id: string;
  /**
   * The record as parsed; undefined when the message is not a record (a
   * verbatim body message, or something else someone posted there).
   */
  record?: Record<string, unknown>;
  /** The raw message body of the record message. */
  raw: string;
}

/** A message id as IronMQ gives them; anything else names no message (and no other path). */
const MESSAGE_ID = /^[A-Za-z0-9_-]{1,100}$/;

/** The dead-letter queue's records: read without reserving, requeued, discarded, purged. */
export class DeadLetters {
  constructor(
    private readonly client: IronMqClient,
    readonly deadLetterQueue: string,
  ) {}

  /** Records without reserving them (IronMQ's peek), oldest first, at most n (<= 100). */
  async list(n = 100): Promise<DeadLetter[]> {
    let count = Math.max(1, Math.min(100, Math.floor(n)));
    for (;;) {
      try {
        const messages = await this.client.peek(this.deadLetterQueue, count);
        return messages.map(deadLetterOf);
      } catch (e) {
        if (isQueueMissing(e)) return [];
        // Many large bodies at once: fewer of them, oldest first still.
        if (!(e instanceof ReplyTooLarge) || count === 1) throw e;
        count = Math.ceil(count / 2);
      }
    }
  }

  async get(id: string): Promise<DeadLetter | undefined> {
    if (!MESSAGE_ID.test(id)) return undefined;
    try {
      return deadLetterOf(
        await this.client.getMessage(this.deadLetterQueue, id),
      );
    } catch (e) {
      if (e instanceof QueueError && e.status === 404) return undefined;
      throw e;
    }
  }

  /**
   * Posts the original body back to the record's queue, verbatim, then
   * deletes the record (and its body message); resolves to the new message
   * id. Posted first: a failure between the two leaves the record, so the
   * message may be requeued twice, never lost.
   */
  async requeue(id: string): Promise<string> {
    const { record } = await this.record(id);
    const queue = record.queue;
    if (typeof queue !== "string" || !QUEUE_NAME.test(queue)) {
      throw new Error(
        `record ${id} in ${this.deadLetterQueue} names no queue to requeue to (queue: ${
          JSON.stringify(queue) ?? "missing"
        }): post its body yourself, then discard it`,
      );
    }
    const body = await this.bodyOf(id, record);
    // The webhook takes the body as raw bytes (no escaping, so a body that
    // fitted the queue fits again); a body it cannot carry byte for byte (a
    // lone surrogate, a leading byte order mark) goes as JSON.
    const [newId] = body.isWellFormed() && !body.startsWith("\uFEFF")
      ? await this.client.postVerbatim(queue, body)
      : await this.client.post(queue, [body]);
    if (newId === undefined) {
      throw new QueueError(
        `posting record ${id}'s body to ${queue} gave no message id: look in ${queue} before trying again`,
        200,
        false,
      );
    }
    try {
      await this.remove(id, record);
    } catch (e) {
      throw new Error(
        `record ${id} was requeued to ${queue} as message ${newId}, but could not be removed from ${this.deadLetterQueue} (${
          errorText(e)
        }): discard it, or it may be requeued twice`,
      );
    }
    return newId;
  }

  /** Deletes the record (and its body message); any other message there, on its own. */
  async discard(id: string): Promise<void> {
    const letter = await this.get(id);
    if (letter === undefined) throw this.noSuch(id);
    await this.remove(id, letter.record);
  }

  /** Deletes every message in the dead-letter queue; resolves to how many were there. */
  async purge(): Promise<number> {
    let size: number;
    try {
      size = await this.client.queueSize(this.deadLetterQueue);
    } catch (e) {
      if (isQueueMissing(e)) return 0;
      throw e;
    }
    await this.client.clearQueue(this.deadLetterQueue);
    return size;
  }

  private async record(
    id: string,
  ): Promise<DeadLetter & { record: Record<string, unknown> }> {
    const letter = await this.get(id);
    if (letter === undefined) throw this.noSuch(id);
    const { record } = letter;
    if (record === undefined) {
      throw new Error(
        `message ${id} in ${this.deadLetterQueue} is not a dead-letter record (the body of a record too large for one message, or something posted there by hand): requeue the record that names it, or discard it`,
      );
    }
    return { ...letter, record };
  }

  /** The body to run again: in the record, or in the message it names. */
  private async bodyOf(
    id: string,
    record: Record<string, unknown>,
  ): Promise<string> {
    if (typeof record.body === "string") return record.body;
    const bodyId = record.body_message_id;
    if (typeof bodyId !== "string") {
      throw new Error(
        `record ${id} in ${this.deadLetterQueue} has neither a body nor a body_message_id: nothing to requeue; discard it`,
      );
    }
    const message = MESSAGE_ID.test(bodyId)
      ? await this.client.getMessage(this.deadLetterQueue, bodyId).catch(
        (e) => {
          if (e instanceof QueueError && e.status === 404) return undefined;
          throw e;
        },
      )
      : undefined;
    if (message === undefined) {
      throw new Error(
        `record ${id}'s body, message ${bodyId} in ${this.deadLetterQueue}, is gone: nothing requeued; discard the record`,
      );
    }
    return message.body;
  }

  /** The record first, then its body message: a failure between leaves a stray body, not a record without one. */
  private async remove(
    id: string,
    record: Record<string, unknown> | undefined,
  ): Promise<void> {
    await this.deleteIfThere(id);
    const bodyId = record?.body_message_id;
    if (typeof bodyId === "string" && MESSAGE_ID.test(bodyId)) {
      await this.deleteIfThere(bodyId);
    }
  }

  private async deleteIfThere(id: string): Promise<void> {
    try {
      await this.client.deleteMessage(this.deadLetterQueue, id);
    } catch (e) {
      // Gone already (another discard, a purge): the outcome asked for.
      if (!(e instanceof QueueError && e.status === 404)) throw e;
    }
  }

  private noSuch(id: string): Error {
    return new Error(
      `no message ${
        JSON.stringify(id)
      } in ${this.deadLetterQueue}: list the records to see their ids`,
    );
  }
}

function isQueueMissing(e: unknown): boolean {
  return e instanceof QueueError && e.status === 404;
}

/** A dead-letter message, its record parsed when it is one (it names its queue, id and time). */
function deadLetterOf(message: StoredMessage): DeadLetter {
  let parsed: unknown;
  try {
    parsed = JSON.parse(message.body);
  } catch {
    // a body message, or text someone posted
  }
  const isDeadLetterRecord = isRecord(parsed) &&
    typeof parsed.queue === "string" && typeof parsed.id === "string" &&
    typeof parsed.failed_at === "string";
  return {
    id: message.id,
    record: isDeadLetterRecord ? parsed as Record<string, unknown> : undefined,
    raw: message.body,
  };
}

/**
 * A body with its secret parameters masked: those of the task it names (the
 * default task for plain `{"args": [...]}`), found as planMessage finds them,
 * plus the worker's own secrets. A body that names no known task has every
 * value a secret parameter of any task could take masked; one that starts like
 * JSON but does not parse as an object is not shown at all when the catalog
 * has secret parameters: which part is secret cannot be told.
 */
export function maskedBody(
  body: string,
  catalog: Catalog | undefined,
  secrets: Secrets,
): string {
  const parsed = parseJsonBody(body);
  const tasks = [...catalog?.tasks.values() ?? []];
  if (
    parsed === undefined || !tasks.some((t) => t.params.some((p) => p.secret))
  ) {
    return secrets.mask(body);
  }
  if ("reason" in parsed) {
    return "[not shown: the body does not parse as a JSON object, and the catalog has secret parameters]";
  }
  const message = { ...parsed.object };
  const named = typeof message.task === "string"
    ? catalog?.tasks.get(message.task)
    : message.task === undefined && catalog?.defaultTask !== undefined
    ? catalog.tasks.get(catalog.defaultTask)
    : undefined;
  const candidates = named === undefined ? tasks : [named];
  const secretAt = (i: number) =>
    candidates.some((t) => t.params[i]?.secret === true);
  const secretNamed = (name: string) =>
    candidates.some((t) => t.params.some((p) => p.name === name && p.secret));
  const found: string[] = [];
  let redacted = 0;
  const redact = (value: unknown) => {
    redacted++;
    if (typeof value === "string") found.push(value);
    return "[redacted]";
  };
  const anySecret = candidates.some((t) => t.params.some((p) => p.secret));
  if (Array.isArray(message.args)) {
    message.args = message.args.map((v, i) => secretAt(i) ? redact(v) : v);
  } else if (message.args !== undefined && anySecret) {
    message.args = redact(message.args);
  }
  if (isRecord(message.kwargs)) {
    message.kwargs = Object.fromEntries(
      Object.entries(message.kwargs).map((
        [k, v],
      ) => [k, secretNamed(k) ? redact(v) : v]),
    );
  } else if (message.kwargs !== undefined && anySecret) {
    message.kwargs = redact(message.kwargs);
  }
  // Shown as parsed, not as sent: a secret escaped in the JSON text (or given
  // twice under one name) cannot slip past a search for its value.
  const shown = redacted === 0 ? body : JSON.stringify(message);
  return secrets.with(found).mask(shown);
}

// ---------------------------------------------------------------------------
// known_hosts (OpenSSH format, hashed entries too)
// ---------------------------------------------------------------------------

interface KnownHost {
  marker?: "@revoked" | "@cert-authority";
  hosts: string;
  keyType: string;
  key: Uint8Array;
}

type HostKeyVerdict = "match" | "mismatch" | "unknown" | "revoked";

export function parseKnownHosts(text: string): KnownHost[] {
  const entries: KnownHost[] = [];
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (line === "" || line.startsWith("#")) continue;
    const fields = line.split(/\s+/);
    let marker: KnownHost["marker"];
    if (fields[0] === "@revoked" || fields[0] === "@cert-authority") {
      marker = fields.shift() as KnownHost["marker"];
    }
    const [hosts, keyType, keyBase64] = fields;
    if (!hosts || !keyType || !keyBase64) continue;
    entries.push({
      marker,
      hosts,
      keyType,
      key: Buffer.from(keyBase64, "base64"),
    });
  }
  return entries;
}

/** The name OpenSSH looks up: `host`, or `[host]:port` off port 22. */
function knownHostsName(host: string, port: number): string {
  return port === 22 ? host : `[${host}]:${port}`;
}

function globMatch(pattern: string, text: string): boolean {
  const regex = pattern.replace(/[.+^${}()|[\]\\]/g, "\\$&")
    .replaceAll("*", ".*").replaceAll("?", ".");
  return new RegExp(`^${regex}$`, "i").test(text);
}

/** Does a known_hosts host field (hashed, or patterns with `!` negation) name `name`? */
export function hostFieldMatches(field: string, name: string): boolean {
  if (field.startsWith("|1|")) {
    const [, , salt, hash] = field.split("|");
    if (!salt || !hash) return false;
    const expected = Buffer.from(hash, "base64");
    const actual = createHmac("sha1", Buffer.from(salt, "base64"))
      .update(name).digest();
    return expected.length === actual.length &&
      timingSafeEqual(expected, actual);
  }
  let matched = false;
  for (const pattern of field.split(",")) {
    if (pattern.startsWith("!")) {
      if (globMatch(pattern.slice(1), name)) return false;
    } else if (globMatch(pattern, name)) {
      matched = true;
    }
  }
  return matched;
}

/** The key type named inside an SSH public key blob (a length-prefixed string). */
export function keyTypeOfBlob(blob: Uint8Array): string {
  if (blob.length < 4) return "";
  const length = new DataView(blob.buffer, blob.byteOffset, blob.byteLength)
    .getUint32(0);
  return new TextDecoder().decode(blob.subarray(4, 4 + length));
}

/** A host with entries but none for this key is a mismatch, whatever the key type. */
export function checkHostKey(
  entries: KnownHost[],
  host: string,
  port: number,
  key: Uint8Array,
): HostKeyVerdict {
  const name = knownHostsName(host, port);
  const same = (entry: KnownHost) => Buffer.from(entry.key).equals(key);
  const forHost = entries.filter((e) => hostFieldMatches(e.hosts, name));
  if (forHost.some((e) => e.marker === "@revoked" && same(e))) return "revoked";
  const plain = forHost.filter((e) => e.marker === undefined);
  if (plain.some(same)) return "match";
  return plain.length > 0 ? "mismatch" : "unknown";
}

/** Host key algorithms ssh2 should offer so the server shows a key we know. */
export function knownKeyAlgorithms(
  entries: KnownHost[],
  host: string,
  port: number,
): string[] {
  const name = knownHostsName(host, port);
  const algorithms = new Set<string>();
  for (const entry of entries) {
    if (entry.marker !== undefined) continue;
    if (!hostFieldMatches(entry.hosts, name)) continue;
    if (entry.keyType === "ssh-rsa") {
      ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"].forEach((a) =>
        algorithms.add(a)
      );
    } else algorithms.add(entry.keyType);
  }
  return [...algorithms];
}

// ---------------------------------------------------------------------------
// SSH runner: a small pool of ssh2 connections, several channels on each
// ---------------------------------------------------------------------------

export type RunResult =
  | { kind: "exit"; code: number }
  | { kind: "signal"; signal: string }
  | { kind: "timeout" }
  | { kind: "aborted" }
  /** The command never started there: no connection, or no session would open. */
  | { kind: "unreachable"; error: string }
  /** The command started, then SSH failed under it: it may have run. */
  | { kind: "ssh-error"; error: string };

/** An exec whose session never opened: the command did not start, so it may be tried again. */
interface Unopened {
  kind: "unopened";
  error: string;
}

/** Connections a command is tried on when a session will not open (within SSH_CONNECT_TIMEOUT). */
const SESSION_TRIES = 3;

export interface RunIo {
  onStdout(chunk: Uint8Array): void;
  onStderr(chunk: Uint8Array): void;
  timeoutMs: number;
  signal: AbortSignal;
}

/** What the worker needs from SSH; tests may supply their own. */
export interface CommandRunner {
  /** Resolves once some host can be reached (backing off while none can); rejects when `signal` aborts. */
  ready(signal: AbortSignal): Promise<void>;
  /** Whether some host may be reached (not all of them failed their last connection attempt). */
  reachable(): boolean;
  run(host: HostSpec, command: string, io: RunIo): Promise<RunResult>;
  close(): void;
}

interface SshCredentials {
  privateKey?: Uint8Array;
  passphrase?: string;
  agent?: string;
}

/** The key as the configuration read and checked it, or read and checked now: a bad key stops the worker before it reserves anything. */
export function loadSshCredentials(ssh: SshConfig): SshCredentials {
  if (ssh.keyFile === undefined) return { agent: ssh.agentSocket };
  if (ssh.privateKey !== undefined) {
    const { privateKey, passphrase, agentSocket: agent } = ssh;
    return { privateKey, passphrase, agent };
  }
  let privateKey: Uint8Array;
  try {
    privateKey = Deno.readFileSync(ssh.keyFile);
  } catch (e) {
    throw new ConfigError([
      `SSH_KEY_FILE=${ssh.keyFile}: cannot read it (${errorText(e)})`,
    ]);
  }
  const problem = keyProblem(privateKey, ssh.passphrase);
  if (problem) {
    throw new ConfigError([`SSH_KEY_FILE=${ssh.keyFile}: ${problem}`]);
  }
  return { privateKey, passphrase: ssh.passphrase, agent: ssh.agentSocket };
}

/** Why a key file's bytes cannot log in, or undefined when they can. */
function keyProblem(
  bytes: Uint8Array,
  passphrase: string | undefined,
): string | undefined {
  const parsed = sshUtils.parseKey(Buffer.from(bytes), passphrase);
  if (parsed instanceof Error) {
    const hint = /passphrase|encrypted/i.test(parsed.message)
      ? "set SSH_KEY_PASSPHRASE, or check it"
      : "is it an OpenSSH private key?";
    return `cannot use this key: ${parsed.message} (${hint})`;
  }
  if (!parsed.isPrivateKey()) {
    return "this is a public key: name the private key file (without .pub)";
  }
  return undefined;
}

interface Connection {
  client: Client;
  active: number;
  closed: boolean;
  /** Closes the connection once it has been unused for SSH_IDLE_TIMEOUT. */
  idleTimer?: ReturnType<typeof setTimeout>;
}

/**
 * Every host's connections: a pool for each host, opened when a command
 * first needs it, and one connection to each jump host, carrying the
 * connections to the hosts behind it. A host that cannot be reached fails
 * its own commands; only when none of the hosts can be reached does `ready`
 * hold the worker back.
 */
export class SshHosts implements CommandRunner {
  private readonly pools = new Map<string, HostPool>();
  /** The hosts whose last connection attempt failed (by hostKey), and why. */
  private readonly down = new Map<string, string>();
  /** The hosts whose last connection attempt worked. */
  private readonly up = new Set<string>();
  private reconnecting?: Promise<void>;
  private readonly outage: OutageLog;
  private closed = false;

  constructor(
    private readonly ssh: SshConfig,
    private readonly credentials: SshCredentials,
    /** Every host this worker may run commands on. */
    private readonly hosts: HostSpec[],
    private readonly concurrency: number,
    private readonly log: Log,
    private readonly monitor?: Monitor,
  ) {
    this.outage = new OutageLog(
      hosts.length === 1
        ? `ssh ${hostKey(hosts[0])}: cannot connect`
        : `ssh: none of the ${hosts.length} hosts can be reached`,
      log,
      "error",
    );
  }

  reachable(): boolean {
    return this.hosts.some((h) => !this.down.has(hostKey(h)));
  }

  /**
   * Resolves once a host has been reached: at once when one was at its last
   * try; else it tries the first host, then all the others at once, with
   * backoff, until one connects (at start, one connection, not one a host).
   */
  ready(signal: AbortSignal): Promise<void> {
    if (this.up.size > 0) return Promise.resolve();
    this.reconnecting ??= retry(() => this.probe(), {
      minDelayMs: 500,
      maxDelayMs: 30_000,
      maxAttempts: Infinity,
      retryable: () => !this.closed,
      onRetry: (e, _, delayMs) => this.outage.failed(e, delayMs),
      signal,
    }).then(() => this.outage.recovered()).finally(() => {
      this.reconnecting = undefined;
    });
    return this.reconnecting;
  }

  run(host: HostSpec, command: string, io: RunIo): Promise<RunResult> {
    return this.pool(host, false).run(command, io);
  }

  close(): void {
    this.closed = true;
    for (const pool of this.pools.values()) pool.close();
    this.pools.clear();
  }

  /** The pool for a host (`jump`: its role as a jump host, one connection for all). */
  pool(host: HostSpec, jump: boolean): HostPool {
    const key = `${jump ? "jump " : ""}${hostKey(host)}`;
    let pool = this.pools.get(key);
    if (pool === undefined) {
      if (this.closed) throw new Error("SSH is closed: stopping");
      pool = new HostPool(host, this, {
        ssh: this.ssh,
        credentials: this.credentials,
        log: this.log,
        monitor: this.monitor,
        jump,
        maxConnections: jump
          ? 1
          : Math.ceil(this.concurrency / this.ssh.channelsPerConnection),
        channelsPerConnection: jump ? Infinity : this.ssh.channelsPerConnection,
      });
      this.pools.set(key, pool);
    }
    return pool;
  }

  /**
   * Told by a served host's pool whether its last connection attempt worked,
   * or (`dropped`) that an open connection ended unasked: then it is known
   * neither up nor down, and `ready` tries it again before the next reserve.
   */
  connected(host: HostSpec, error?: string, dropped = false): void {
    const key = hostKey(host);
    if (dropped) {
      this.up.delete(key);
      return;
    }
    if (error === undefined) {
      this.down.delete(key);
      this.up.add(key);
    } else {
      this.down.set(key, error);
      this.up.delete(key);
    }
  }

  /** The first host, else one connection attempt to each other host at once. */
  private async probe(): Promise<void> {
    const [first, ...others] = this.hosts;
    try {
      return await this.pool(first, false).probe();
    } catch (e) {
      if (others.length === 0) throw e;
    }
    try {
      await Promise.any(others.map((h) => this.pool(h, false).probe()));
    } catch (e) {
      const errors = e instanceof AggregateError ? e.errors : [e];
      throw new Error(
        this.hosts.length === 1
          ? errorText(errors[0])
          : [...new Set(errors.map(errorText))].slice(0, 3).join("; "),
      );
    }
  }
}

/** What every pool shares. */
interface PoolSettings {
  ssh: SshConfig;
  credentials: SshCredentials;
  log: Log;
  monitor?: Monitor;
  /** A jump host's pool: its state is not a served host's. */
  jump: boolean;
  maxConnections: number;
  /** Exec channels (or forwarded connections, for a jump host) on one connection at once. */
  channelsPerConnection: number;
}

/** One host's connections, several channels on each. */
class HostPool {
  private readonly connections: Connection[] = [];
  private connecting?: Promise<Connection>;
  private readonly slotWaiters: (() => void)[] = [];
  /** After another connection failed to open, carry on with those open until then. */
  private noMoreUntil = 0;
  private closed = false;
  /** user@host:port, through its jump hosts: for log lines and errors. */
  private readonly where: string;

  constructor(
    private readonly host: HostSpec,
    private readonly hosts: SshHosts,
    private readonly settings: PoolSettings,
  ) {
    this.where = hostKey(host);
  }

  /**
   * Runs a command on a pooled connection. A session that never opens there
   * (sshd's session processes gone while the connection still answers
   * keepalives, a refused channel, a close before the exec was accepted) has
   * run nothing: the connections are retired and the command goes on at once
   * on a fresh one, a few times within SSH_CONNECT_TIMEOUT; after that the
   * host is unreachable, as if it had refused the connection.
   */
  async run(command: string, io: RunIo): Promise<RunResult> {
    const deadline = Date.now() + this.settings.ssh.connectTimeoutMs;
    for (let tries = 1;; tries++) {
      let connection: Connection;
      try {
        connection = await this.acquire();
      } catch (e) {
        if (io.signal.aborted) return { kind: "aborted" };
        return { kind: "unreachable", error: errorText(e) };
      }
      let result: RunResult | Unopened;
      try {
        result = await this.exec(connection, command, io);
      } finally {
        this.release(connection);
      }
      if (result.kind !== "unopened") return result;
      this.settings.monitor?.sshError(this.host.name, "exec");
      this.retireAll();
      if (io.signal.aborted) return { kind: "aborted" };
      if (tries >= SESSION_TRIES || Date.now() >= deadline) {
        const error =
          `cannot open a session (${result.error}; tried ${tries} connection(s)): nothing ran`;
        if (!this.settings.jump) {
          this.hosts.connected(this.host, error);
          this.settings.monitor?.hostState(
            this.host.name,
            "unreachable",
            error,
          );
        }
        return { kind: "unreachable", error };
      }
      this.settings.log.warn(
        `ssh ${this.where}: a session would not open (${result.error}); the command did not start: trying it on a new connection`,
      );
    }
  }

  /** Connects (once) unless a connection is open; for `ready` while every host is down. */
  async probe(): Promise<void> {
    if (!this.connections.some((c) => !c.closed)) await this.connect();
  }

  close(): void {
    this.closed = true;
    for (const c of this.connections) {
      clearTimeout(c.idleTimer);
      c.client.end();
    }
    this.connections.length = 0;
    for (const wake of this.slotWaiters.splice(0)) wake();
  }

  /**
   * Takes a channel slot on the least busy open connection, opening another
   * when all are full (or the first, when none is open). The slot is
   * taken synchronously, so callers running at once never crowd one
   * connection past its channel limit.
   */
  acquire = async (): Promise<Connection> => {
    const { channelsPerConnection, maxConnections, log } = this.settings;
    for (;;) {
      if (this.closed) throw new Error("SSH is closed: stopping");
      const open = this.connections.filter((c) => !c.closed);
      const free = open
        .filter((c) => c.active < channelsPerConnection)
        .sort((a, b) => a.active - b.active)[0];
      if (free !== undefined) {
        free.active++;
        clearTimeout(free.idleTimer);
        return free;
      }
      if (open.length === 0) {
        // One try, not a wait: the host's command fails now (the message is
        // retried later), rather than holding its other hosts back.
        await this.connect();
        continue;
      }
      if (open.length < maxConnections && Date.now() >= this.noMoreUntil) {
        try {
          await this.connect();
        } catch (e) {
          this.noMoreUntil = Date.now() + 30_000;
          log.warn(
            `ssh ${this.where}: cannot open another connection (${
              errorText(e)
            }); carrying on with ${open.length} for 30 s`,
          );
        }
        continue;
      }
      await new Promise<void>((wake) => this.slotWaiters.push(wake));
    }
  };

  /** Gives a slot back; a connection left unused closes after SSH_IDLE_TIMEOUT. */
  release = (connection: Connection): void => {
    connection.active--;
    this.slotWaiters.shift()?.();
    // Retired while this command ran on it: it ends with its last command.
    if (connection.closed && connection.active === 0) connection.client.end();
    this.closeWhenIdle(connection);
  };

  /**
   * Takes every connection out of the pool: a session failed to open on one,
   * and the others were opened to the same sshd, so they may be as broken
   * (a connection whose session processes died still answers keepalives).
   * Idle ones end now; busy ones once their running commands have ended.
   * The next command opens a new connection.
   */
  private retireAll(): void {
    if (this.connections.length === 0) return;
    this.settings.log.info(
      `ssh ${this.where}: retiring ${this.connections.length} connection(s) after a session would not open`,
    );
    for (const connection of this.connections.splice(0)) {
      connection.closed = true; // no command takes it again
      clearTimeout(connection.idleTimer);
      if (connection.active === 0) connection.client.end();
    }
    this.counted();
  }

  /** Unused from now on (a slot taken in time clears it): closed after SSH_IDLE_TIMEOUT. */
  private closeWhenIdle(connection: Connection): void {
    if (connection.active > 0 || connection.closed) return;
    clearTimeout(connection.idleTimer);
    const { idleTimeoutMs } = this.settings.ssh;
    connection.idleTimer = setTimeout(() => {
      if (connection.active > 0 || connection.closed) return;
      // Closed from now on: no command may take it while it ends.
      connection.closed = true;
      this.connections.splice(this.connections.indexOf(connection), 1);
      this.counted();
      this.settings.log.debug(
        `ssh ${this.where}: closing a connection unused for ${
          idleTimeoutMs / 1000
        } s (SSH_IDLE_TIMEOUT)`,
      );
      connection.client.end();
    }, idleTimeoutMs);
  }

  private connect(): Promise<Connection> {
    const served = !this.settings.jump;
    this.connecting ??= this.openConnection().then(
      (c) => {
        if (served) this.hosts.connected(this.host);
        return c;
      },
      (e) => {
        const error = errorText(e);
        this.settings.monitor?.sshError(this.host.name, sshErrorKind(error));
        if (served) {
          this.hosts.connected(this.host, error);
          this.settings.monitor?.hostState(
            this.host.name,
            "unreachable",
            error,
          );
        }
        throw e;
      },
    ).finally(() => {
      this.connecting = undefined;
    });
    return this.connecting;
  }

  /** A new connection: directly, or through a channel of its last jump host's connection. */
  private async openConnection(): Promise<Connection> {
    if (this.closed) throw new Error("SSH is closed: stopping");
    const { jump } = this.host;
    if (jump.length === 0) return await this.handshake(undefined);
    const last = jump[jump.length - 1];
    const via = this.hosts.pool({ ...last, jump: jump.slice(0, -1) }, true);
    let carrier: Connection;
    try {
      carrier = await via.acquire();
    } catch (e) {
      const error = errorText(e);
      throw new Error(
        error.startsWith("jump host ")
          ? error
          : `jump host ${via.where}: ${error}`,
      );
    }
    let stream: ClientChannel;
    try {
      stream = await this.forward(carrier, via.where);
    } catch (e) {
      via.release(carrier);
      throw e;
    }
    try {
      const connection = await this.handshake(stream);
      connection.client.once("close", () => via.release(carrier));
      return connection;
    } catch (e) {
      via.release(carrier);
      throw e;
    }
  }

  /** A TCP channel from the jump host to this host (the jump host's sshd opens it). */
  private forward(
    carrier: Connection,
    jumpWhere: string,
  ): Promise<ClientChannel> {
    const { host, port } = this.host;
    const limitMs = this.settings.ssh.connectTimeoutMs;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(
        () =>
          reject(
            new Error(
              `jump host ${jumpWhere} did not reach ${host}:${port} within ${
                limitMs / 1000
              } s`,
            ),
          ),
        limitMs,
      );
      try {
        carrier.client.forwardOut("127.0.0.1", 0, host, port, (err, ch) => {
          clearTimeout(timer);
          if (err) {
            reject(
              new Error(
                `jump host ${jumpWhere} cannot reach ${host}:${port} (${err.message}; does its sshd allow TCP forwarding?)`,
              ),
            );
          } else resolve(ch);
        });
      } catch (e) {
        clearTimeout(timer);
        reject(new Error(`jump host ${jumpWhere}: ${errorText(e)}`));
      }
    });
  }

  private handshake(sock: ClientChannel | undefined): Promise<Connection> {
    const { ssh, credentials, log } = this.settings;
    const { host, port, user } = this.host;
    let entries: KnownHost[];
    try {
      entries = parseKnownHosts(readTextIfExists(ssh.knownHostsFile) ?? "");
    } catch (e) {
      return Promise.reject(new Error(errorText(e)));
    }
    const algorithms = knownKeyAlgorithms(entries, host, port);
    let hostKeyFailure: string | undefined;
    const verify = (key: Buffer): boolean => {
      const verdict = checkHostKey(entries, host, port, key);
      if (verdict === "match") return true;
      if (verdict === "unknown" && ssh.strictHostKeyChecking === "accept-new") {
        this.rememberHostKey(key);
        return true;
      }
      hostKeyFailure = hostKeyMessage(verdict, this.host, ssh, key);
      return false;
    };
    return new Promise((resolve, reject) => {
      const client = new Client();
      const connection: Connection = { client, active: 0, closed: false };
      let settled = false;
      client.on("ready", () => {
        settled = true;
        client.setNoDelay(true); // Nagle + delayed ACK costs ~40 ms per exec.
        this.connections.push(connection);
        this.counted();
        // Opened for `ready`, it may never carry a command.
        this.closeWhenIdle(connection);
        log.info(`ssh ${this.where}: connected`);
        resolve(connection);
      });
      client.on("error", (e: Error) => {
        if (settled) return;
        settled = true;
        reject(new Error(hostKeyFailure ?? describeSshError(e)));
      });
      client.on("close", () => {
        connection.closed = true;
        clearTimeout(connection.idleTimer);
        const i = this.connections.indexOf(connection);
        if (i >= 0) {
          // Open, not closed by us (idle, or a stop): it dropped.
          this.connections.splice(i, 1);
          this.counted();
          if (!this.settings.jump && !this.closed) {
            this.hosts.connected(this.host, undefined, true);
          }
        }
        for (const wake of this.slotWaiters.splice(0)) wake();
        if (!settled) {
          settled = true;
          reject(
            new Error(
              hostKeyFailure ?? "connection closed during the handshake",
            ),
          );
        }
      });
      client.connect({
        host,
        port,
        sock,
        username: user,
        privateKey: credentials.privateKey
          ? Buffer.from(credentials.privateKey)
          : undefined,
        passphrase: credentials.passphrase,
        agent: credentials.agent,
        hostVerifier: verify,
        readyTimeout: ssh.connectTimeoutMs,
        // A connection that silently stops forwarding is dropped after
        // three unanswered keepalives: within about 15 s.
        keepaliveInterval: 5_000,
        keepaliveCountMax: 2,
        algorithms: algorithms.length > 0
          ? {
            serverHostKey: algorithms as NonNullable<
              NonNullable<Parameters<Client["connect"]>[0]["algorithms"]>[
                "serverHostKey"
              ]
            >,
          }
          : undefined,
      });
    });
  }

  /** The open connections, for the metrics and the page (a served host's state). */
  private counted(): void {
    const open = this.connections.length;
    this.settings.monitor?.sshConnections(this.host.name, open);
    if (this.settings.jump) return;
    this.settings.monitor?.hostState(
      this.host.name,
      open > 0 ? "connected" : "idle",
    );
  }

  private rememberHostKey(key: Buffer): void {
    const { ssh, log } = this.settings;
    const line = `${knownHostsName(this.host.host, this.host.port)} ${
      keyTypeOfBlob(key)
    } ${key.toString("base64")}\n`;
    try {
      Deno.writeTextFileSync(ssh.knownHostsFile, line, {
        append: true,
        create: true,
        mode: 0o600,
      });
      log.warn(
        `ssh ${this.where}: new host key ${keyTypeOfBlob(key)} ${
          fingerprint(key)
        } added to ${ssh.knownHostsFile} (SSH_STRICT_HOST_KEY_CHECKING=accept-new)`,
      );
    } catch (e) {
      log.error(
        `ssh ${this.where}: accepted a new host key but cannot record it in ${ssh.knownHostsFile}: ${
          errorText(e)
        }`,
      );
    }
  }

  /**
   * Runs one command on `connection`. Until sshd has accepted the exec, a
   * failure means nothing started there (`unopened`); after that, a lost
   * connection is an `ssh-error`: the command may have run.
   */
  private exec(
    connection: Connection,
    command: string,
    io: RunIo,
  ): Promise<RunResult | Unopened> {
    return new Promise((resolve) => {
      let channel: ClientChannel | undefined;
      let outcome: RunResult | undefined;
      let stopping: "timeout" | "aborted" | undefined;
      let killTimer: ReturnType<typeof setTimeout> | undefined;
      let timeoutTimer: ReturnType<typeof setTimeout> | undefined;

      const finish = (result: RunResult | Unopened) => {
        clearTimeout(timeoutTimer);
        clearTimeout(killTimer);
        io.signal.removeEventListener("abort", onAbort);
        connection.client.removeListener("close", onDrop);
        resolve(result);
      };
      // TERM, then KILL and close; give up waiting for the server after that.
      const stop = (why: "timeout" | "aborted") => {
        if (stopping || channel === undefined) return;
        const ch = channel;
        stopping = why;
        sendSignal(ch, "TERM");
        killTimer = setTimeout(() => {
          sendSignal(ch, "KILL");
          ch.close();
          killTimer = setTimeout(() => {
            this.settings.log.warn(
              `${this.where}: the stopped command did not end; it may still be running there`,
            );
            finish({ kind: why });
          }, 1000);
        }, 1000);
      };
      const onAbort = () => stop("aborted");
      const onDrop = () => {
        if (channel === undefined) {
          return finish({
            kind: "unopened",
            error: "the connection closed before the command started",
          });
        }
        this.settings.monitor?.sshError(this.host.name, "dropped");
        finish({
          kind: "ssh-error",
          error:
            `connection to ${this.where} dropped while the command was running`,
        });
      };

      connection.client.once("close", onDrop);
      io.signal.addEventListener("abort", onAbort, { once: true });
      // ssh2 throws "Not connected" at once when the socket has ended but
      // its close event has not come yet: nothing started, not a crash.
      try {
        connection.client.exec(command, (err, ch) => {
          // Channel open refused, exec refused, or the connection closed
          // first ("No response from server"): nothing started.
          if (err) return finish({ kind: "unopened", error: err.message });
          channel = ch;
          ch.on("data", (chunk: Uint8Array) => io.onStdout(chunk));
          ch.stderr.on("data", (chunk: Uint8Array) => io.onStderr(chunk));
          ch.on(
            "exit",
            (code: number | null, signal?: string) => {
              outcome = code !== null && code !== undefined
                ? { kind: "exit", code }
                : { kind: "signal", signal: signal ?? "unknown" };
            },
          );
          ch.on("close", () => {
            if (stopping) return finish({ kind: stopping });
            finish(
              outcome ?? {
                kind: "ssh-error",
                error:
                  `${this.where}: the channel closed without an exit status`,
              },
            );
          });
          ch.end(); // No stdin for the remote command.
          if (io.signal.aborted) stop("aborted");
          if (io.timeoutMs > 0) {
            timeoutTimer = setTimeout(() => stop("timeout"), io.timeoutMs);
          }
        });
      } catch (e) {
        finish({ kind: "unopened", error: errorText(e) });
      }
    });
  }
}

/** The internals of ssh2 that `sendSignal` reaches for. */
interface ChannelInternals {
  outgoing?: { id?: number; state?: string };
  _client?: { _protocol?: { signal?(id: number, name: string): void } };
}

/**
 * ssh2's `signal()` is silently skipped once stdin has ended (which we do at
 * start, so commands never wait for input); send the request through its
 * protocol object then, as `signal()` itself would.
 */
function sendSignal(channel: ClientChannel, name: string): void {
  if (channel.writable) return channel.signal(name);
  const internals = channel as unknown as ChannelInternals;
  const id = internals.outgoing?.id;
  if (internals.outgoing?.state === "closed" || id === undefined) return;
  internals._client?._protocol?.signal?.(id, name);
}

function hostKeyMessage(
  verdict: HostKeyVerdict,
  host: HostSpec,
  ssh: SshConfig,
  key: Buffer,
): string {
  const shown = `${keyTypeOfBlob(key)} ${fingerprint(key)}`;
  const name = knownHostsName(host.host, host.port);
  if (verdict === "mismatch") {
    return `HOST KEY MISMATCH for ${name}: the server shows ${shown}, which differs from ${ssh.knownHostsFile}; someone may be intercepting the connection, or the host was reinstalled. Nothing will run until the entry is fixed (ssh-keygen -R '${name}' -f ${ssh.knownHostsFile})`;
  }
  if (verdict === "revoked") {
    return `host key ${shown} of ${name} is marked @revoked in ${ssh.knownHostsFile}; refusing to connect`;
  }
  return `host key of ${name} is unknown (${shown}, not in ${ssh.knownHostsFile}): on that host, check that \`ssh-keygen -lf /etc/ssh/ssh_host_${
    keyTypeOfBlob(key).replace(/^ssh-/, "").replace(/-.*$/, "")
  }_key.pub\` shows the same fingerprint, then add it (ssh-keyscan -p ${host.port} ${host.host} >> ${ssh.knownHostsFile}), or set SSH_STRICT_HOST_KEY_CHECKING=accept-new`;
}

/** The fingerprint `ssh-keygen -l` prints: SHA256 of the key blob, unpadded base64. */
export function fingerprint(key: Uint8Array): string {
  return `SHA256:${
    createHash("sha256").update(key).digest("base64").replace(/=+$/, "")
  }`;
}

/** An SSH failure's kind, for tasks_ssh_errors_total. */
function sshErrorKind(error: string): string {
  if (/host key/i.test(error)) return "host_key";
  if (/authentication/i.test(error)) return "auth";
  if (/timed out|did not reach/i.test(error)) return "timeout";
  return "connect";
}

function describeSshError(
  e: Error & { level?: string; code?: string },
): string {
  if (e.code === "ECONNREFUSED") return "connection refused (is sshd running?)";
  if (e.code === "ETIMEDOUT" || /Timed out/i.test(e.message)) {
    return `timed out (${e.message})`;
  }
  if (e.level === "client-authentication") {
    return "authentication failed: the server refused the key (check SSH_USER, SSH_KEY_FILE and the server's authorized_keys)";
  }
  return e.message;
}

if (import.meta.main) {
  Deno.exit(
    Deno.args.includes("--permissions")
      ? printPermissions(Deno.env.toObject())
      : await main(),
  );
}
