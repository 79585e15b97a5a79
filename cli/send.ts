/**
 * cli/send.ts: `deno task send`, the command line that posts a message for the
 * worker (tasks.ts) and, with --wait, shows its result.
 *
 * It reads the worker's own settings (senderConfig): the same queue, and the
 * same catalog, so a value the worker would refuse is refused here, with the
 * worker's words, before anything is posted. A task message is posted in
 * Celery's format; with --wait it names a reply queue of its own, which the
 * worker posts the result to, and which is removed at the end in every case.
 */

import { type Catalog, type ParamSpec, type TaskSpec } from "../lib/catalog.ts";
import { senderConfig } from "../lib/config.ts";
import { IronMqClient, QueueError } from "../lib/ironmq.ts";
import { escapeControls, Secrets } from "../lib/log.ts";
import { planMessage, QUEUE_NAME } from "../lib/message.ts";
import { retry } from "../lib/retry.ts";
import { followedLines } from "../lib/stream.ts";
import { type Env, errorText, isRecord } from "../lib/util.ts";

const USAGE =
  `Usage: deno task send [options] <task> [value ...] [name=value ...]
       deno task send [options] --text '<body>'

Posts a message for the worker (tasks.ts) and prints its id. Values fill the
task's parameters in order (Celery's "args"); name=value sets one by name
("kwargs"). Both are checked against the catalog first, when it is readable.

Options:
  --wait[=SECONDS]  wait for the result (without SECONDS, until it comes), print
                    the output as the worker logs it, exit with the remote exit
                    status (1 for a signal, a timeout, a rejection or a revoke)
  --follow          as --wait, printing the output as it comes (the worker
                    streams it to the reply queue), then the result
  --eta TIME        run no earlier than TIME (ISO 8601: 2026-11-27T15:00:00Z)
  --delay SECONDS   run no earlier than SECONDS from now (sets the eta)
  --hosts A,B       run on these of the task's hosts only (groups or hosts)
  --queue NAME      post to NAME, not to IRON_MQ_QUEUE_NAME (my_queue)
  --text BODY       post BODY as it is: the catalog's default task runs (or
                    TASK_COMMAND, without a catalog)
  --                what follows is a value, even when it starts with "-"
  -h, --help        this help, with the catalog's tasks and parameters

Settings are the worker's: IRON_* or iron.json for IronMQ; else a running
worker's embedded server at MQ_HOST:MQ_PORT (127.0.0.1:8080) with MQ_TOKEN;
the catalog from TASKS_FILE, else ./tasks.yaml.

Exit status: 0 posted (with --wait: the remote exit status); 1 the task failed
without an exit status, was rejected or revoked, or its result could not be
read; 2 nothing to post (usage, settings, a value the catalog refuses) or the
post failed; 124 no result within SECONDS; 130 stopped by Ctrl-C.`;

/** What the command line asks for. */
interface Request {
  task?: string;
  /** Values without a name, in order: Celery's args. */
  values: string[];
  /** name=value pairs, in order: Celery's kwargs. */
  named: [string, string][];
  text?: string;
  /** Seconds to wait for the result; Infinity for a bare --wait. */
  waitSeconds?: number;
  /** --follow: the output as it comes, then the result. */
  follow: boolean;
  eta?: string;
  delaySeconds?: number;
  queue?: string;
  /** Some of the task's hosts (its "hosts"). */
  hosts?: string[];
  help: boolean;
}

const VALUE_OPTIONS = ["--eta", "--delay", "--queue", "--text", "--hosts"];

/** The command line read, or what is wrong with it. */
function readCommandLine(
  argv: string[],
): { ok: true; request: Request } | { ok: false; problem: string } {
  const request: Request = {
    values: [],
    named: [],
    help: false,
    follow: false,
  };
  const positional: string[] = [];
  const options = new Map<string, string>();
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === "--") {
      positional.push(...argv.slice(i + 1));
      break;
    }
    if (arg === "-h" || arg === "--help") {
      request.help = true;
      continue;
    }
    if (!arg.startsWith("-") || arg === "-") {
      positional.push(arg);
      continue;
    }
    const eq = arg.indexOf("=");
    const name = eq < 0 ? arg : arg.slice(0, eq);
    if (arg === "--follow") {
      request.follow = true;
      continue;
    }
    if (name === "--wait") {
      if (eq < 0) {
        request.waitSeconds = Infinity;
        continue;
      }
      const seconds = Number(arg.slice(eq + 1));
      if (!(Number.isFinite(seconds) && seconds > 0)) {
        return {
          ok: false,
          problem:
            `${arg}: SECONDS must be a number above 0 (or --wait alone: until the result comes)`,
        };
      }
      request.waitSeconds = seconds;
      continue;
    }
    if (!VALUE_OPTIONS.includes(name)) {
      return {
        ok: false,
        problem:
          `unknown option ${arg} (a value starting with "-" goes after --, or as name=value)`,
      };
    }
    const value = eq < 0 ? argv[++i] : arg.slice(eq + 1);
    if (value === undefined) {
      return { ok: false, problem: `${name} needs a value` };
    }
    if (options.has(name)) {
      return { ok: false, problem: `${name} is given twice` };
    }
    options.set(name, value);
  }
  if (request.help) return { ok: true, request };

  request.text = options.get("--text");
  request.queue = options.get("--queue");
  request.hosts = options.get("--hosts")?.split(",").map((h) => h.trim());
  if (request.queue !== undefined && !QUEUE_NAME.test(request.queue)) {
    return {
      ok: false,
      problem: `--queue ${
        JSON.stringify(request.queue)
      }: a queue name is 1 to 64 letters, digits, '_', '-' or '.'`,
    };
  }
  const eta = options.get("--eta");
  const delay = options.get("--delay");
  if (eta !== undefined && delay !== undefined) {
    return { ok: false, problem: "give --eta or --delay, not both" };
  }
  if (eta !== undefined) {
    const ms = /^\d{4}-\d{2}-\d{2}/.test(eta) ? Date.parse(eta) : NaN;
    if (Number.isNaN(ms)) {
      return {
        ok: false,
        problem: `--eta ${
          JSON.stringify(eta)
        }: must be an ISO 8601 time, such as 2026-11-27T15:00:00Z`,
      };
    }
    // A time without a zone is read as local time, and sent in UTC.
    request.eta = new Date(ms).toISOString();
  }
  if (delay !== undefined) {
    const seconds = Number(delay);
    if (delay.trim() === "" || !(Number.isFinite(seconds) && seconds >= 0)) {
      return {
        ok: false,
        problem: `--delay ${JSON.stringify(delay)}: must be seconds from 0 up`,
      };
    }
    request.delaySeconds = seconds;
  }

  if (request.text !== undefined) {
    if (positional.length > 0) {
      return {
        ok: false,
        problem:
          `--text is the whole message: give no task or values with it (got ${
            JSON.stringify(positional[0])
          })`,
      };
    }
    // A plain body has no field to carry them: only a task message does.
    for (
      const [given, what] of [
        [request.waitSeconds, "--wait"],
        [request.follow || undefined, "--follow"],
        [eta, "--eta"],
        [delay, "--delay"],
        [request.hosts, "--hosts"],
      ] as const
    ) {
      if (given !== undefined) {
        return {
          ok: false,
          problem:
            `${what} needs a task message: a --text body cannot carry it (name the task instead)`,
        };
      }
    }
    return { ok: true, request };
  }
  // --follow waits as --wait does (until the result, unless --wait=SECONDS).
  if (request.follow) request.waitSeconds ??= Infinity;
  const [task, ...rest] = positional;
  if (task === undefined) {
    return { ok: false, problem: "name a task, or give --text '<body>'" };
  }
  request.task = task;
  for (const value of rest) {
    const pair = /^([A-Za-z_][A-Za-z0-9_]*)=(.*)$/s.exec(value);
    if (pair === null) {
      request.values.push(value);
    } else if (request.named.some(([n]) => n === pair[1])) {
      return { ok: false, problem: `${pair[1]}= is given twice` };
    } else {
      request.named.push([pair[1], pair[2]]);
    }
  }
  return { ok: true, request };
}

/**
 * A command-line string as the parameter's type wants it. One that does not
 * convert stays a string, so the check names it as the worker would.
 */
function typedValue(param: ParamSpec | undefined, raw: string): unknown {
  switch (param?.type) {
    case "integer":
    case "number":
      return /^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/.test(raw)
        ? Number(raw)
        : raw;
    case "boolean":
      return raw === "true" ? true : raw === "false" ? false : raw;
    default:
      return raw;
  }
}

/** The Celery message for a task, its values typed by the catalog's task (if known). */
function taskMessage(
  request: Request & { task: string },
  spec: TaskSpec | undefined,
  id: string,
  eta: string | undefined,
  replyTo: string | undefined,
  sender: string,
): string {
  const param = (name: string) => spec?.params.find((p) => p.name === name);
  return JSON.stringify({
    id,
    task: request.task,
    args: request.values.map((v, i) => typedValue(spec?.params[i], v)),
    // fromEntries: a name such as __proto__ stays a plain field.
    kwargs: Object.fromEntries(
      request.named.map(([name, v]) => [name, typedValue(param(name), v)]),
    ),
    retries: 0,
    eta: eta ?? null,
    expires: null,
    reply_to: replyTo ?? null,
    sender,
    ...request.follow ? { stream: true } : {},
    ...request.hosts === undefined ? {} : { hosts: request.hosts },
  });
}

/** A line as the worker's log shows it: control characters escaped, secrets masked. */
function logLine(text: string, secrets: Secrets): string {
  return escapeControls(secrets.mask(text));
}

// ---------------------------------------------------------------------------
// --help: the catalog's tasks and their parameters
// ---------------------------------------------------------------------------

function catalogHelp(catalog: Catalog | undefined): string {
  if (catalog === undefined) {
    return "No catalog here (TASKS_FILE is not set and there is no ./tasks.yaml):\n" +
      "values are sent as strings, unchecked; the worker checks them against its own.";
  }
  const plain = catalog.defaultTask === undefined
    ? "a plain --text body runs nothing (no default: task)"
    : `a plain --text body runs ${catalog.defaultTask}`;
  const lines = [`Tasks in ${catalog.path} (${plain}):`];
  for (const task of catalog.tasks.values()) {
    const call = [
      task.name,
      ...task.params.map((p) => p.required ? `<${p.name}>` : `[${p.name}]`),
    ].join(" ");
    lines.push(
      "",
      `  ${call}${task.description ? ` - ${task.description}` : ""}`,
    );
    const limits = [
      task.timeoutMs > 0 ? `timeout ${task.timeoutMs / 1000} s` : "",
      task.maxAttempts === 1
        ? "1 attempt"
        : `up to ${task.maxAttempts} attempts`,
    ].filter((s) => s !== "").join(", ");
    lines.push(`      runs: ${task.command} (${limits})`);
    for (const param of task.params) lines.push(`      ${paramHelp(param)}`);
  }
  return lines.join("\n");
}

function paramHelp(param: ParamSpec): string {
  const rules: string[] = [];
  if (param.enum) rules.push(`one of ${param.enum.join(", ")}`);
  else if (param.type === "boolean") rules.push("true or false");
  else rules.push(param.type);
  // The pattern is kept anchored as ^(?:...)$: show what the catalog wrote.
  if (param.pattern) {
    rules.push(`matching ${param.pattern.source.slice(4, -2)}`);
  }
  if (param.maxLength !== undefined) {
    rules.push(`at most ${param.maxLength} characters`);
  }
  if (param.min !== undefined && param.max !== undefined) {
    rules.push(`from ${param.min} to ${param.max}`);
  } else if (param.min !== undefined) rules.push(`at least ${param.min}`);
  else if (param.max !== undefined) rules.push(`at most ${param.max}`);
  if (param.allowDash) rules.push(`may start with "-"`);
  if (param.default !== undefined) {
    rules.push(
      `default ${param.secret ? "(not shown)" : JSON.stringify(param.default)}`,
    );
  } else if (!param.required) rules.push("optional");
  if (param.secret) rules.push("secret: never shown");
  const about = param.description ? ` - ${param.description}` : "";
  return `${param.name}: ${rules.join(", ")}${about}`;
}

// ---------------------------------------------------------------------------
// --wait: the reply queue, long-polled until the result comes
// ---------------------------------------------------------------------------

type Waited =
  | { kind: "result"; result: Record<string, unknown> }
  | { kind: "timeout" }
  | { kind: "interrupted" }
  | { kind: "error"; error: string };

/** Long-polls `reply` for the result naming `taskId`, until it comes, the limit passes or `interrupt` aborts. */
async function waitForResult(
  reply: IronMqClient,
  replyQueue: string,
  taskId: string,
  limitMs: number,
  interrupt: AbortSignal,
  secrets: Secrets,
  follow = false,
): Promise<Waited> {
  const deadline = Date.now() + limitMs;
  const limit = new AbortController();
  const timer = Number.isFinite(limitMs)
    ? setTimeout(() => limit.abort(), limitMs)
    : undefined;
  const stop = AbortSignal.any([interrupt, limit.signal]);
  try {
    for (;;) {
      if (interrupt.aborted) return { kind: "interrupted" };
      if (limit.signal.aborted) return { kind: "timeout" };
      const waitSeconds = Math.max(
        1,
        Math.min(30, Math.ceil((deadline - Date.now()) / 1000)),
      );
      let messages;
      try {
        // The queue may be down for a while (a worker restarting its embedded
        // server): keep trying while the wait lasts.
        messages = await retry(
          () => reply.reserve(follow ? 100 : 1, 30, waitSeconds, stop),
          {
            minDelayMs: 200,
            maxDelayMs: 5_000,
            maxAttempts: Infinity,
            retryable: (e) => e instanceof QueueError && e.retryable,
            onRetry: (e, attempt) => {
              if (attempt === 1) {
                console.error(
                  `reading ${replyQueue} failed (${
                    errorText(e)
                  }); trying again while the wait lasts`,
                );
              }
            },
            signal: stop,
          },
        );
      } catch (e) {
        if (stop.aborted) continue;
        return { kind: "error", error: errorText(e) };
      }
      // Read, they go: a reservation that lapsed would show them again.
      if (follow && messages.length > 0) {
        reply.deleteBatch(
          messages.map((m) => ({ id: m.id, reservation_id: m.reservation_id })),
        ).catch(() => {});
      }
      for (const message of messages) {
        let result: unknown;
        try {
          result = JSON.parse(message.body);
        } catch {
          // not a result: reported below
        }
        const followed = follow && isRecord(result) &&
            result.task_id === taskId
          ? followedLines(result)
          : undefined;
        if (followed !== undefined) {
          for (const line of followed.out) console.log(logLine(line, secrets));
          for (const note of followed.notes) {
            console.error(logLine(note, secrets));
          }
          continue;
        }
        if (isRecord(result) && result.task_id === taskId) {
          return { kind: "result", result };
        }
        console.error(
          `${replyQueue}: ignored message ${message.id}, which is not this message's result`,
        );
      }
    }
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Prints a result as the worker logs its run (`followed`: its output was
 * shown as it came, so only each host's end); returns the exit status to pass on.
 */
export function printResult(
  result: Record<string, unknown>,
  secrets: Secrets,
  followed = false,
): number {
  const show = (text: string) => logLine(text, secrets);
  const status = String(result.status);
  const hosts = isRecord(result.hosts) ? result.hosts : {};
  let exitStatus: number | undefined;
  for (const [host, run] of Object.entries(hosts)) {
    if (!isRecord(run)) continue;
    const prefix = `[${host}]`;
    for (const stream of followed ? [] : ["stdout", "stderr"] as const) {
      const text = typeof run[stream] === "string" ? run[stream] : "";
      const truncated = isRecord(run.truncated) && run.truncated[stream];
      if (truncated) {
        console.error(
          `${prefix} ${stream}: the result keeps only its last 64 KiB (the worker's log has all of it)`,
        );
      }
      const lines = text.split("\n");
      if (lines.at(-1) === "") lines.pop();
      const tag = stream === "stdout" ? "out" : "err";
      for (const line of lines) console.log(show(`${prefix} ${tag}: ${line}`));
    }
    const took = `(message ${result.message_id}, ${run.duration_ms} ms)`;
    if (typeof run.exit_status === "number") {
      exitStatus = run.exit_status;
      console.log(show(`${prefix} exit: ${run.exit_status} ${took}`));
    } else if (typeof run.signal === "string") {
      console.log(show(`${prefix} killed by signal ${run.signal} ${took}`));
    } else {
      console.log(show(`${prefix} no exit status ${took}`));
    }
  }
  if (status === "SUCCESS") return 0;
  if (status === "RETRY") {
    const reason = typeof result.reason === "string"
      ? ` (${result.reason})`
      : "";
    console.error(show(`RETRY: the failed hosts run again${reason}`));
    return 1;
  }
  const attempts = typeof result.attempts === "number" && status === "FAILURE"
    ? ` after ${result.attempts} attempt(s)`
    : "";
  const reason = typeof result.reason === "string" ? `: ${result.reason}` : "";
  console.error(show(`${status}${attempts}${reason}`));
  // A failure passes on the remote exit status; a signal or a timeout has none.
  return status === "FAILURE" && exitStatus !== undefined &&
      Number.isInteger(exitStatus) && exitStatus >= 1 && exitStatus <= 255
    ? exitStatus
    : 1;
}

// ---------------------------------------------------------------------------
// Entry point
// ---------------------------------------------------------------------------

async function main(argv: string[], env: Env): Promise<number> {
  const read = readCommandLine(argv);
  if (!read.ok) {
    console.error(`send: ${read.problem}\n(deno task send --help shows how)`);
    return 2;
  }
  const request = read.request;
  let config: ReturnType<typeof senderConfig>;
  try {
    config = senderConfig(env);
  } catch (e) {
    if (request.help) console.log(USAGE);
    // Every problem at once, as the worker's FATAL line names them.
    console.error(`FATAL ${errorText(e).replaceAll("\n", "\n  ")}`);
    return 2;
  }
  if (request.help) {
    console.log(`${USAGE}\n\n${catalogHelp(config.catalog)}`);
    return 0;
  }

  const { catalog } = config;
  const queue = request.queue ?? config.queue.queueName;
  const taskId = crypto.randomUUID();
  const replyQueue = request.waitSeconds === undefined
    ? undefined
    : `reply_${taskId.replaceAll("-", "").slice(0, 12)}`;
  const now = Date.now();
  // --delay is Celery's countdown: an eta that many seconds from now.
  const eta = request.delaySeconds === undefined
    ? request.eta
    : new Date(now + request.delaySeconds * 1000).toISOString();
  const body = request.task === undefined ? request.text! : taskMessage(
    { ...request, task: request.task },
    catalog?.tasks.get(request.task),
    taskId,
    eta,
    replyQueue,
    // Who sent it, as the run's record shows it.
    `${config.user}@${Deno.hostname()}`,
  );

  let secrets = new Secrets([config.queue.token]);
  if (catalog === undefined) {
    if (request.task !== undefined) {
      console.error(
        `values not checked: no catalog here (set TASKS_FILE, or run where tasks.yaml is); they go as strings, which an integer, number or boolean parameter refuses`,
      );
    }
  } else {
    // Checked as the worker will check it once its eta has come.
    const checkAt = Math.max(now, eta === undefined ? now : Date.parse(eta));
    const plan = planMessage(body, catalog, "", checkAt, config.hosts);
    if (plan.kind === "reject") {
      console.error(`send: not posted: ${plan.reason}`);
      return 2;
    }
    if (plan.kind === "run") secrets = secrets.with(plan.secrets);
  }

  const client = new IronMqClient(config.queue);
  if (replyQueue === undefined) {
    try {
      const [id] = await client.post(queue, [body]);
      console.log(id);
      if (eta !== undefined) console.error(`it runs from ${eta}`);
      return 0;
    } catch (e) {
      console.error(`send: ${postFailure(e)}`);
      return 2;
    }
  }

  const reply = new IronMqClient({ ...config.queue, queueName: replyQueue });
  const interrupt = new AbortController();
  const onSignal = () => interrupt.abort();
  Deno.addSignalListener("SIGINT", onSignal);
  Deno.addSignalListener("SIGTERM", onSignal);
  let id: string | undefined;
  let made = false;
  try {
    try {
      // Before the post, so a quick result finds it and the first reserve does too.
      await reply.ensureQueue();
      made = true;
      [id] = await client.post(queue, [body]);
    } catch (e) {
      console.error(`send: ${postFailure(e)}`);
      return 2;
    }
    const limit = request.waitSeconds!;
    console.error(
      `message ${id} posted to ${queue}; waiting ${
        Number.isFinite(limit) ? `up to ${limit} s ` : ""
      }for its result on ${replyQueue}${
        eta === undefined ? "" : ` (it runs from ${eta})`
      }`,
    );
    const deadline = Date.now() + limit * 1000;
    let waited = await waitForResult(
      reply,
      replyQueue,
      taskId,
      limit * 1000,
      interrupt.signal,
      secrets,
      request.follow,
    );
    // Some hosts failed and run again: their outcome comes in a later result.
    while (waited.kind === "result" && waited.result.status === "RETRY") {
      printResult(waited.result, secrets, request.follow);
      waited = await waitForResult(
        reply,
        replyQueue,
        taskId,
        deadline - Date.now(),
        interrupt.signal,
        secrets,
        request.follow,
      );
    }
    const lost =
      `Reply queue ${replyQueue} removed: a result that comes later makes it again, and nothing reads it.`;
    switch (waited.kind) {
      case "result":
        return printResult(waited.result, secrets, request.follow);
      case "timeout":
        console.error(
          `no result for message ${id} within ${limit} s: it may still run, or wait in ${queue}. ${lost}`,
        );
        return 124;
      case "interrupted":
        console.error(
          `stopped waiting: message ${id} may still run, or wait in ${queue}. ${lost}`,
        );
        return 130;
    }
    console.error(
      `cannot read the result of message ${id} from ${replyQueue}: ${waited.error}. It may still run.`,
    );
    return 1;
  } finally {
    Deno.removeSignalListener("SIGINT", onSignal);
    Deno.removeSignalListener("SIGTERM", onSignal);
    try {
      if (made) await reply.deleteQueue();
    } catch (e) {
      if (!(e instanceof QueueError && e.status === 404)) {
        console.error(
          `could not remove reply queue ${replyQueue} (${
            errorText(e)
          }): remove it with DELETE /3/projects/${config.queue.projectId}/queues/${replyQueue}`,
        );
      }
    }
  }
}

/** Why a post failed; for a refused connection, where send looked for the queue. */
function postFailure(e: unknown): string {
  const text = `cannot post: ${errorText(e)}`;
  return /refused/i.test(text)
    ? `${text}. Is the worker running (deno task start)? Without IronMQ settings, send uses its embedded server at MQ_HOST:MQ_PORT (default 127.0.0.1:8080); for another queue, set IRON_HOST (and IRON_TOKEN)`
    : text;
}

if (import.meta.main) {
  Deno.exit(await main(Deno.args, Deno.env.toObject()));
}
