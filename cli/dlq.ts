/**
 * cli/dlq.ts: `deno task dlq`, the command line for the dead-letter queue: the
 * messages the worker (tasks.ts) gave up on, each as a JSON record.
 *
 * It reads the worker's own settings (senderConfig), so it finds the same
 * queue server, dead-letter queue and catalog; the catalog says which
 * parameters are secret, and those are masked in what it shows. Requeueing
 * posts the original body back to the queue it came from, byte for byte.
 */

import { senderConfig } from "../lib/config.ts";
import { DeadLetters, maskedBody } from "../lib/dead_letters.ts";
import { IronMqClient, QueueError } from "../lib/ironmq.ts";
import { escapeControls, Secrets } from "../lib/log.ts";
import { QUEUE_NAME } from "../lib/message.ts";
import { type Env, envValue, errorText, isRecord } from "../lib/util.ts";

const USAGE = `Usage: deno task dlq <command>

Reads and empties the dead-letter queue: the messages the worker gave up on,
after their last attempt or because they could never run.

Commands:
  list              one line per record, oldest first (at most 100): its id,
                    when it failed, the task, the attempts made, and why
  show ID           the whole record, with the body as sent (secret
                    parameters masked)
  requeue ID ...    post each record's body back to the queue it came from,
                    as it was sent, then delete the record; prints the new
                    message ids
  requeue --all     the same for every record
  discard ID ...    delete records (and their body messages) without running
                    them again
  purge --yes       delete every message in the dead-letter queue (without
                    --yes it only says how many there are)
  -h, --help        this help

Settings are the worker's: IRON_* or iron.json for IronMQ; else a running
worker's embedded server at MQ_HOST:MQ_PORT (127.0.0.1:8080) with MQ_TOKEN;
the queue TASK_DEAD_LETTER_QUEUE (default: IRON_MQ_QUEUE_NAME + "_failed");
the catalog from TASKS_FILE, else ./tasks.yaml, for its secret parameters.

Exit status: 0 done; 1 an operation failed (no such record, the queue
unreachable); 2 usage or settings (and purge without --yes).`;

/** What the command line asks for. */
type Request =
  | { command: "help" }
  | { command: "list" }
  | { command: "show"; id: string }
  | { command: "requeue" | "discard"; ids: string[] }
  | { command: "requeue-all" }
  | { command: "purge"; yes: boolean };

/** The command line read, or what is wrong with it. */
function readCommandLine(
  argv: string[],
): { ok: true; request: Request } | { ok: false; problem: string } {
  if (argv.some((a) => a === "-h" || a === "--help")) {
    return { ok: true, request: { command: "help" } };
  }
  const [command, ...rest] = argv;
  const options = rest.filter((a) => a.startsWith("-"));
  const ids = rest.filter((a) => !a.startsWith("-"));
  const allowed: Record<string, string[]> = {
    requeue: ["--all"],
    purge: ["--yes"],
  };
  const unknown = options.find((o) => !(allowed[command] ?? []).includes(o));
  if (command === undefined) return { ok: false, problem: "name a command" };
  if (!["list", "show", "requeue", "discard", "purge"].includes(command)) {
    return {
      ok: false,
      problem: `unknown command ${JSON.stringify(command)}`,
    };
  }
  if (unknown !== undefined) {
    return {
      ok: false,
      problem: `${command}: unknown option ${JSON.stringify(unknown)}`,
    };
  }
  switch (command) {
    case "list":
    case "purge":
      if (ids.length > 0) {
        return { ok: false, problem: `${command} takes no ids` };
      }
      return {
        ok: true,
        request: command === "list"
          ? { command }
          : { command, yes: options.includes("--yes") },
      };
    case "show":
      if (ids.length !== 1) {
        return { ok: false, problem: "show takes one record id" };
      }
      return { ok: true, request: { command, id: ids[0] } };
    default: {
      const all = options.includes("--all");
      if (all && ids.length > 0) {
        return { ok: false, problem: "give ids or --all, not both" };
      }
      if (all) return { ok: true, request: { command: "requeue-all" } };
      if (ids.length === 0) {
        return {
          ok: false,
          problem: `${command} takes one or more record ids${
            command === "requeue" ? ", or --all" : ""
          }`,
        };
      }
      return {
        ok: true,
        request: { command: command as "requeue" | "discard", ids },
      };
    }
  }
}

/** What the commands share: the queue, and how to show what it holds. */
interface Context {
  letters: DeadLetters;
  queue: string;
  secrets: Secrets;
  mask(body: string): string;
}

// ---------------------------------------------------------------------------
// The commands; each resolves to its exit status
// ---------------------------------------------------------------------------

async function list(c: Context): Promise<number> {
  const letters = await c.letters.list(100);
  if (letters.length === 0) {
    console.log(`no dead letters in ${c.queue}`);
    return 0;
  }
  // A body too large for its record's message is listed with the record.
  const bodies = new Set(
    letters.map((l) => l.record?.body_message_id).filter((id) =>
      typeof id === "string"
    ),
  );
  const rows = [["ID", "FAILED AT", "TASK", "ATTEMPTS", "REASON"]];
  for (const letter of letters) {
    if (bodies.has(letter.id)) continue;
    const r = letter.record;
    rows.push(
      r === undefined
        ? [letter.id, "-", "-", "-", "(not a dead-letter record)"]
        : [
          letter.id,
          text(r.failed_at),
          text(r.task),
          text(r.attempts),
          text(r.reason),
        ].map((cell) => shown(c.secrets.mask(cell))),
    );
  }
  const widths = rows[0].map((_, i) =>
    Math.max(...rows.map((row) => row[i].length))
  );
  for (const row of rows) {
    console.log(
      row.map((cell, i) => i === row.length - 1 ? cell : cell.padEnd(widths[i]))
        .join("  "),
    );
  }
  if (letters.length === 100) {
    console.error(
      `the oldest 100 messages of ${c.queue} shown: requeue or discard some to see the rest`,
    );
  }
  return 0;
}

async function show(c: Context, id: string): Promise<number> {
  const letter = await c.letters.get(id);
  if (letter === undefined) return noSuch(c, id);
  const record = letter.record;
  if (record === undefined) {
    console.error(
      `dlq: message ${
        shown(id)
      } in ${c.queue} is not a dead-letter record (the body of a record too large for one message, or something posted there by hand); its body, masked:`,
    );
    console.log(shown(c.mask(letter.raw)));
    return 1;
  }
  const view: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(record)) {
    view[key] = key === "body" ? value : maskStrings(value, c.secrets);
  }
  let body = typeof record.body === "string" ? record.body : undefined;
  const bodyId = record.body_message_id;
  if (body === undefined && typeof bodyId === "string") {
    const message = await c.letters.get(bodyId);
    if (message === undefined) {
      console.error(
        `dlq: its body, message ${
          shown(bodyId)
        }, is gone from ${c.queue}: it cannot be requeued; discard it`,
      );
    }
    body = message?.raw;
  }
  view.body = body === undefined ? null : c.mask(body);
  console.log(jsonForTerminal(view));
  return 0;
}

async function requeue(c: Context, ids: string[]): Promise<number> {
  let failed = 0;
  for (const id of ids) {
    try {
      // Read first to say where it goes (requeue reads it again).
      const letter = await c.letters.get(id);
      if (letter === undefined) {
        failed += noSuch(c, id);
        continue;
      }
      const queue = letter.record?.queue;
      const newId = await c.letters.requeue(id);
      console.log(
        `requeued ${shown(id)} to ${shown(text(queue))}: new message ${newId}`,
      );
    } catch (e) {
      console.error(`dlq: ${shown(c.secrets.mask(errorText(e)))}`);
      failed++;
    }
  }
  return failed === 0 ? 0 : 1;
}

/**
 * Every record there when it starts, in rounds of up to 100 (IronMQ's peek
 * shows no more at once). A record that fails again while the worker runs
 * comes back with a new id and a later failed_at: it is not requeued again.
 */
async function requeueAll(c: Context): Promise<number> {
  const startedAt = new Date().toISOString();
  const tried = new Set<string>();
  let status = 0;
  for (;;) {
    const letters = (await c.letters.list(100)).filter((l) =>
      l.record !== undefined && !tried.has(l.id) &&
      String(l.record.failed_at) < startedAt
    );
    if (letters.length === 0) break;
    for (const letter of letters) tried.add(letter.id);
    status = Math.max(status, await requeue(c, letters.map((l) => l.id)));
  }
  if (tried.size === 0) console.log(`no dead letters to requeue in ${c.queue}`);
  return status;
}

async function discard(c: Context, ids: string[]): Promise<number> {
  let failed = 0;
  for (const id of ids) {
    try {
      if (await c.letters.get(id) === undefined) {
        failed += noSuch(c, id);
        continue;
      }
      await c.letters.discard(id);
      console.log(`discarded ${shown(id)}`);
    } catch (e) {
      console.error(`dlq: ${shown(c.secrets.mask(errorText(e)))}`);
      failed++;
    }
  }
  return failed === 0 ? 0 : 1;
}

async function purge(
  c: Context,
  client: IronMqClient,
  yes: boolean,
): Promise<number> {
  if (!yes) {
    const size = await client.queueSize(c.queue).catch((e) => {
      if (e instanceof QueueError && e.status === 404) return 0;
      throw e;
    });
    console.error(
      `${c.queue} holds ${size} message(s); nothing deleted: run deno task dlq purge --yes to delete them all`,
    );
    return 2;
  }
  const count = await c.letters.purge();
  console.log(`purged ${count} message(s) from ${c.queue}`);
  return 0;
}

// ---------------------------------------------------------------------------
// Showing what the queue holds: secrets masked, control characters escaped
// ---------------------------------------------------------------------------

function text(value: unknown): string {
  if (value === undefined || value === null) return "-";
  return typeof value === "string" ? value : JSON.stringify(value);
}

/** One line for the terminal: control characters and bidi overrides escaped. */
function shown(value: string): string {
  return escapeControls(value);
}

function maskStrings(value: unknown, secrets: Secrets): unknown {
  if (typeof value === "string") return secrets.mask(value);
  if (Array.isArray(value)) return value.map((v) => maskStrings(v, secrets));
  if (isRecord(value)) {
    return Object.fromEntries(
      Object.entries(value).map(([k, v]) => [k, maskStrings(v, secrets)]),
    );
  }
  return value;
}

/**
 * JSON, indented, still valid JSON: what JSON.stringify leaves raw and a
 * terminal would act on (DEL, C1 controls, line separators, bidi overrides)
 * as \u escapes.
 */
function jsonForTerminal(value: unknown): string {
  return JSON.stringify(value, null, 2).replace(
    /[\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]/g,
    (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`,
  );
}

function noSuch(c: Context, id: string): number {
  console.error(
    `dlq: no message ${
      JSON.stringify(shown(id))
    } in ${c.queue}: deno task dlq list shows the records and their ids`,
  );
  return 1;
}

// ---------------------------------------------------------------------------
// Entry point
// ---------------------------------------------------------------------------

async function main(argv: string[], env: Env): Promise<number> {
  const read = readCommandLine(argv);
  if (!read.ok) {
    console.error(`dlq: ${read.problem}\n\n${USAGE}`);
    return 2;
  }
  const request = read.request;
  if (request.command === "help") {
    console.log(USAGE);
    return 0;
  }
  let config: ReturnType<typeof senderConfig>;
  try {
    config = senderConfig(env);
  } catch (e) {
    // Every problem at once, as the worker's FATAL line names them.
    console.error(`FATAL ${errorText(e).replaceAll("\n", "\n  ")}`);
    return 2;
  }
  const queue = config.deadLetterQueue;
  if (!QUEUE_NAME.test(queue)) {
    console.error(
      `FATAL TASK_DEAD_LETTER_QUEUE=${
        JSON.stringify(queue)
      }: use 1 to 64 letters, digits, '_', '-' or '.'`,
    );
    return 2;
  }
  const secrets = new Secrets([
    config.queue.token,
    envValue(env, "SSH_KEY_PASSPHRASE"),
  ]);
  const client = new IronMqClient(config.queue);
  const c: Context = {
    letters: new DeadLetters(client, queue),
    queue,
    secrets,
    mask: (body) => maskedBody(body, config.catalog, secrets),
  };
  try {
    switch (request.command) {
      case "list":
        return await list(c);
      case "show":
        return await show(c, request.id);
      case "requeue":
        return await requeue(c, request.ids);
      case "requeue-all":
        return await requeueAll(c);
      case "discard":
        return await discard(c, request.ids);
      case "purge":
        return await purge(c, client, request.yes);
    }
  } catch (e) {
    console.error(`dlq: ${shown(secrets.mask(queueFailure(e, config.queue)))}`);
    return 1;
  }
}

/** Why a queue call failed; for a refused connection, where dlq looked. */
function queueFailure(e: unknown, queue: { baseUrl: string }): string {
  const text = errorText(e);
  return /refused/i.test(text)
    ? `${text}. No queue server at ${queue.baseUrl}: without IronMQ settings, dlq reads a running worker's embedded server at MQ_HOST:MQ_PORT (default 127.0.0.1:8080); start the worker (deno task start) or set MQ_PORT, or IRON_HOST (and IRON_TOKEN) for another queue`
    : text;
}

if (import.meta.main) {
  Deno.exit(await main(Deno.args, Deno.env.toObject()));
}
