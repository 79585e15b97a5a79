/**
 * tasks.ts: a worker that turns IronMQ messages into commands on a remote server.
 *
 * The loop of the original tasks.py, `while True: get a message; run it over SSH;
 * delete it`, kept recognizable: for each message it reserves, it runs the
 * configured command over SSH, logs the output the way Fabric did
 * (`[host] out: ...`), and deletes the message only after the command succeeded.
 * A failed command is released for a retry; a message that keeps failing, or can
 * never run, goes to a dead-letter queue. With no IronMQ token or host configured
 * it starts the embedded queue server (lib/mq/server.ts) in-process.
 *
 * The loop, as Sidekiq's processor (`process_one until @done`):
 *
 *   TASK_CONCURRENCY processors, each: until stopped, take a held message
 *   from the Fetcher (lib/fetch.ts, which reserves ahead), then processOne:
 *   read the body (lib/message.ts), run it on its hosts (lib/ssh.ts), then
 *   delete it, post a continuation for the failed hosts, release it for a
 *   retry, or dead-letter it; the Settler (lib/settle.ts) makes those calls.
 *
 * The file reads top down: the entry point, the loop, the processing step
 * and its settling decisions. Its parts are the modules of lib/, one concern
 * each (README, Layout).
 */

import { Monitor } from "./lib/monitor.ts";
import {
  type QueueServer,
  type QueueServerOptions,
  startQueueServer,
} from "./lib/mq/server.ts";
import { type Env, envValue, errorText } from "./lib/util.ts";
import {
  type Config,
  configContext,
  curlExample,
  ironJsonPaths,
  loadSshCredentials,
  parseConfig,
  permissionFlags,
  servedHosts,
  type SshCredentials,
  type TaskConfig,
} from "./lib/config.ts";
import { DeadLetters, maskedBody } from "./lib/dead_letters.ts";
import { Fetcher } from "./lib/fetch.ts";
import { HookReceiver } from "./lib/hooks.ts";
import {
  type Failure,
  fieldsOf,
  type Held,
  runIdOf,
  type RunRecord,
  taskLabel,
  type WorkerDeps,
} from "./lib/held.ts";
import { hostKey, type HostSpec } from "./lib/hosts.ts";
import { IronMqClient } from "./lib/ironmq.ts";
import {
  escapeControls,
  LineSplitter,
  type Log,
  type LogFields,
  Secrets,
  setupLogging,
  StdoutLines,
  Tail,
} from "./lib/log.ts";
import { Limits } from "./lib/limits.ts";
import { planMessage } from "./lib/message.ts";
import { realClock, settledOrAborted } from "./lib/retry.ts";
import {
  cancelFromListener,
  Revocations,
  revokedReason,
} from "./lib/revoke.ts";
import { AttemptCounter, Settler } from "./lib/settle.ts";
import { RunStore } from "./lib/runs.ts";
import { type RunResult, SshHosts } from "./lib/ssh.ts";
import { LiveRuns, RunStream } from "./lib/stream.ts";

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
    ...config.hookSecrets?.values() ?? [],
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

  // What the worker does, counted and shown: lib/monitor.ts. With TASK_HTTP_PORT its
  // listener serves the page, the metrics, the dead-letter actions and the
  // run history; without one, nothing is counted.
  const monitor = config.http ? new Monitor() : undefined;
  // Cancels (lib/revoke.ts): seen by peeking <queue>_revoked; and the runs
  // under way, for whoever follows one on the listener (lib/stream.ts).
  const revocationQueue = new IronMqClient(config.queue);
  const revocations = new Revocations(
    revocationQueue,
    config.queue.queueName,
    realClock,
    log,
  );
  const live = config.http ? new LiveRuns() : undefined;
  const history = openHistory(config, log, monitor);
  let web: { close(): Promise<void> } | undefined;
  if (monitor && live && config.http) {
    // The catalog's hooks (lib/hooks.ts) post their tasks' messages to the queue.
    const catalog = config.task.catalog;
    const hooks = catalog && config.hookSecrets && new HookReceiver({
      catalog,
      secrets: config.hookSecrets,
      hosts: config.task.hosts,
      queue: new IronMqClient(config.queue),
      queueName: config.queue.queueName,
      log: (line) => log.info(line),
      now: () => Date.now(),
    });
    try {
      web = await monitor.serve({
        hooks: hooks &&
          ((name, request, remote) => hooks.receive(name, request, remote)),
        ...config.http,
        deadLetters: new DeadLetters(
          new IronMqClient(config.queue),
          config.task.deadLetterQueue,
        ),
        maskBody: (body) => maskedBody(body, config.task.catalog, secrets),
        log: (line) => log.info(line),
        live: {
          follow: (id) => live.follow(id),
          cancel: (id, who) =>
            cancelFromListener(
              revocationQueue,
              config.queue.queueName,
              live.runIdOf(id) ?? id,
              who,
              config.task.revokeTtlSeconds,
              log,
            ),
        },
        runs: history,
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
      revocations,
      live,
      runs: history,
      locks: (queueName) =>
        new IronMqClient({ ...config.queue, queueName }, monitor),
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
  const watching = revocations.run(stop.signal);
  try {
    await worker.run(stop.signal);
    await watching;
  } finally {
    Deno.removeSignalListener("SIGTERM", onSignal);
    Deno.removeSignalListener("SIGINT", onSignal);
    runner.close();
    await web?.close();
    history?.close();
    await server?.close();
  }
  log.info("stopped");
  await output.flush();
  return 0;
}

/** The run history (TASK_RUNS_DB), or none: a store that cannot open is said, not fatal. */
function openHistory(
  config: Config,
  log: Log,
  monitor: Monitor | undefined,
): RunStore | undefined {
  if (config.runs === undefined) return undefined;
  const store = RunStore.open(
    config.runs,
    (line) => log.error(line),
    realClock,
    monitor,
  );
  if (!(store instanceof RunStore)) {
    log.error(`${store.problem}; the worker goes on without a run history`);
    return undefined;
  }
  return store;
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

export class Worker {
  private readonly fetcher: Fetcher;
  private readonly settler: Settler;
  /** How to stop each running command (grace period over, or a second signal). */
  private readonly running = new Set<AbortController>();
  private readonly hardStop = new AbortController();
  /** Aborted by a stop signal: no host starts after it, not even in a fan-out. */
  private stopping?: AbortSignal;
  private readonly attempts: AttemptCounter;
  /** The catalog's concurrency and max_parallel, across workers (lib/limits.ts). */
  private readonly limits: Limits;

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
    this.limits = new Limits(
      task,
      queueName,
      {
        ...deps,
        locks: deps.locks ?? (() => {
          throw new Error("a catalog with limits needs WorkerDeps.locks");
        }),
      },
      (held) => this.fetcher.resume(held),
      (held, reason) =>
        // Cancelled or expired while it waited for a limit: never run.
        this.settler.revoke(held, reason),
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
    // Waiting for a limit at a stop: handed back as unstarted ones are.
    const waiting = this.limits.run(stop).then((held) =>
      held.forEach((h) =>
        this.settler.notRun(
          h,
          0,
          "shutting down before it started",
          this.fetcher.pollsEnded,
        )
      )
    );
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
        }).finally(() => this.limits.leave(held));
      }
    };
    const processing = Promise.all(
      Array.from({ length: this.task.concurrency }, processor),
    );
    await settledOrAborted(processing, stop);
    await this.gracePeriod(processing);
    await fetching; // its last long-poll, and what it held, released
    await waiting;
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
    // Cancelled (runs cancel, the page's Stop) before it started: never run.
    const revoked = this.deps.revocations?.of([runIdOf(held), id]);
    if (revoked !== undefined) {
      const reason = revokedReason(revoked);
      log.warn(`message ${id}${named}: not run: ${reason}`, about);
      return this.settler.revoke(held, reason);
    }
    const succeeded = this.deps.runs?.succeededAt(held);
    if (succeeded !== undefined) {
      log.info(
        `message ${id}: task id ${plan.meta.taskId} already succeeded at ${
          new Date(succeeded).toISOString()
        }; not run again`,
        about,
      );
      return this.settler.duplicate(held);
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
    // Over a limit of its task or its hosts (lib/limits.ts), it waits there,
    // without a processor, and comes back here once it holds its leases.
    if (!await this.limits.enter(held, plan)) return;
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
    this.deps.runs?.startedRun(held, plan);
    const timeoutMs = plan.task?.timeoutMs ?? this.task.timeoutMs;
    const limit = `${timeoutMs / 1000} s`;
    const limitSource = plan.task ? "its timeout" : "TASK_TIMEOUT";
    // Cancelled while it runs: stopped as a timeout is (TERM, then KILL).
    const cancel = new AbortController();
    let cancelled: string | undefined;
    const unwatch = this.deps.revocations?.watch([runIdOf(held), id], (r) => {
      cancelled = revokedReason(r);
      log.warn(`message ${id}${named}: ${cancelled}: stopping it`, about);
      cancel.abort();
    });
    const stream = this.streamOf(held, hosts.map((h) => h.name));
    const runs = await this.fanOut(hosts, async (host) => {
      log.info(`[${host.name}] run: ${display}`, { ...about, host: host.name });
      const run = await this.execute(
        host,
        plan.command,
        display,
        timeoutMs,
        held,
        cancel.signal,
        stream,
      );
      logEnd(log, run, id, limit, { ...about, host: host.name }, cancelled);
      this.limits.hostDone(held, host);
      return run;
    });
    held.runs = runs;
    unwatch?.();
    await stream?.end(); // its last lines go before its result
    if (
      cancelled !== undefined && runs.some((r) => r.result.kind === "aborted")
    ) {
      return this.settler.revoke(held, cancelled);
    }

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

  /**
   * Its output as it comes: to its reply queue when it asks ("stream": true),
   * and to its followers on the listener; undefined when neither is there.
   */
  private streamOf(held: Held, hosts: string[]): RunStream | undefined {
    const replyTo = held.meta?.stream ? held.meta.replyTo : undefined;
    const post = replyTo === undefined
      ? undefined
      : (body: string) => this.deps.queue.post(replyTo, [body]);
    const feed = this.deps.live?.open(runIdOf(held), held.message.id);
    if (post === undefined && feed === undefined) return undefined;
    const stream = new RunStream(
      { taskId: runIdOf(held), messageId: held.message.id },
      { post, feed },
      this.deps.clock,
      this.deps.log,
      `message ${held.message.id}`,
    );
    stream.started(hosts, held.attempt);
    return stream;
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
    cancelled: AbortSignal,
    stream: RunStream | undefined,
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
        if (monitor === undefined && stream === undefined) return;
        const shown = escapeControls(secrets.mask(line));
        monitor?.commandOutput(runId, "out", shown);
        stream?.line(host.name, "out", shown);
      },
      { secrets },
    );
    const err = new LineSplitter(
      (line) => {
        stderr.add(line);
        log.info(`${prefix} err: ${line}`, { ...about, stream: "stderr" });
        if (monitor === undefined && stream === undefined) return;
        const shown = escapeControls(secrets.mask(line));
        monitor?.commandOutput(runId, "err", shown);
        stream?.line(host.name, "err", shown);
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
    if (
      this.stopping?.aborted || this.hardStop.signal.aborted ||
      cancelled.aborted
    ) {
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
        signal: AbortSignal.any([controller.signal, cancelled]),
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

/** A host's end, in the log: Fabric's `[host] exit: 0`, or what went wrong. */
function logEnd(
  log: Log,
  run: RunRecord,
  id: string,
  limit: string,
  about: LogFields,
  cancelled?: string,
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
        `${prefix} stopped by ${
          cancelled === undefined ? "shutdown" : "a cancel"
        } (message ${id}, ${took})`,
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

if (import.meta.main) {
  Deno.exit(
    Deno.args.includes("--permissions")
      ? printPermissions(Deno.env.toObject())
      : await main(),
  );
}
