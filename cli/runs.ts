/**
 * cli/runs.ts: `deno task runs`, the command line for a worker's run history
 * (lib/runs.ts): a table of its runs, or one run's whole record with each
 * host's output as the worker logs it (`[host] out: ...`).
 *
 * It reads the worker's listener (GET /runs, GET /runs/<id>) with the
 * worker's own settings (TASK_HTTP_PORT, TASK_HTTP_HOST, TASK_HTTP_TOKEN), so
 * it sees what the page sees; it never opens the database itself.
 */

import { listenerConfig } from "../lib/config.ts";
import { cancel, follow } from "./runs_live.ts";
import { escapeControls } from "../lib/log.ts";
import { type Env, errorText, isRecord } from "../lib/util.ts";

/** The listener of a running worker, as this command reaches it. */
interface Listener {
  url: string;
  /** GET `path`: the JSON answer and its status, or a problem saying what to do. */
  get(path: string): Promise<{ status: number; body: unknown }>;
}

/** One subcommand: its usage lines and what it does. */
interface Command {
  usage: string;
  run(args: string[], listener: Listener): Promise<number>;
}

/**
 * The subcommands, in the order the help shows them. Another one is a row
 * here: its usage and a function of (args, listener) to an exit status.
 */
const COMMANDS: Record<string, Command> = {
  list: {
    usage:
      `  list [--task T] [--host H] [--status S] [--since 2h] [--limit N] [--q TEXT]
                    the runs, newest first (100 unless --limit): id, task,
                    status, hosts, attempts, started, duration; --q: those
                    whose output holds TEXT`,
    run: list,
  },
  show: {
    usage:
      `  show ID           one run's whole record (ID: the run's, or a message id
                    such as send prints): parameters, status changes, and each
                    attempt on each host with its output`,
    run: show,
  },
};

/** The subcommands about a run under way, each reading its own settings (cli/runs_live.ts). */
const LIVE: Record<string, { usage: string; run: typeof follow }> = {
  follow: {
    usage:
      `  follow ID         a run under way on the worker: its output as it comes,
                    then its result; exits as send --wait does`,
    run: follow,
  },
  cancel: {
    usage:
      `  cancel ID         stops the run wherever it runs (TERM, then KILL), or
                    deletes its message when it comes up: REVOKED, naming you;
                    holds for TASK_REVOKE_TTL seconds (a day)`,
    run: cancel,
  },
};

const USAGE = `Usage: deno task runs <command>

Reads a running worker's run history from its listener; follows or cancels a run.

Commands:
${
  [...Object.values(COMMANDS), ...Object.values(LIVE)].map((c) => c.usage).join(
    "\n",
  )
}
  -h, --help        this help

Settings are the worker's: TASK_HTTP_PORT, TASK_HTTP_HOST (127.0.0.1) and
TASK_HTTP_TOKEN, as it was started with; cancel posts to its queue (IRON_* or
MQ_*), which every worker of the queue sees.

Exit status: 0 done; 1 no such run, or the listener failed; 2 usage or settings.`;

class UsageError extends Error {}

/** `--name value` options (each at most once) and the other words, in order. */
function options(
  args: string[],
  names: string[],
): { values: Map<string, string>; rest: string[] } {
  const values = new Map<string, string>();
  const rest: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const arg = args[i];
    if (!arg.startsWith("--")) {
      rest.push(arg);
      continue;
    }
    const [name, inline] = arg.slice(2).split(/=(.*)/s);
    if (!names.includes(name)) {
      throw new UsageError(
        `unknown option ${arg} (options: ${
          names.map((n) => `--${n}`).join(", ")
        })`,
      );
    }
    const value = inline ?? args[++i];
    if (value === undefined) throw new UsageError(`${arg} needs a value`);
    if (values.has(name)) throw new UsageError(`--${name} given twice`);
    values.set(name, value);
  }
  return { values, rest };
}

async function list(args: string[], listener: Listener): Promise<number> {
  const { values, rest } = options(args, [
    "task",
    "host",
    "status",
    "since",
    "limit",
    "q",
  ]);
  if (rest.length > 0) throw new UsageError(`unexpected ${rest.join(" ")}`);
  const query = new URLSearchParams([...values]);
  const { status, body } = await listener.get(`/runs?${query}`);
  if (status !== 200 || !isRecord(body) || !Array.isArray(body.runs)) {
    return failed(status, body);
  }
  const runs = body.runs.filter(isRecord);
  if (runs.length === 0) {
    console.log("no runs in this worker's history match");
    return 0;
  }
  const rows = runs.map((r) =>
    [
      String(r.id),
      String(r.task),
      String(r.status),
      Array.isArray(r.hosts) ? hostsText(r.hosts.map(String)) : "",
      String(r.attempts),
      typeof r.started_at === "string"
        ? r.started_at.replace(/\.\d+Z$/, "Z")
        : "",
      typeof r.duration_ms === "number" ? duration(r.duration_ms) : "running",
    ].map(escapeControls)
  );
  console.log(
    table(
      ["ID", "TASK", "STATUS", "HOSTS", "ATTEMPTS", "STARTED", "DURATION"],
      rows,
    ),
  );
  return 0;
}

async function show(args: string[], listener: Listener): Promise<number> {
  if (args.length !== 1) throw new UsageError("show takes one run id");
  const id = args[0];
  const { status, body } = await listener.get(
    `/runs/${encodeURIComponent(id)}`,
  );
  if (status === 404) {
    console.error(
      `runs: no run ${
        JSON.stringify(id)
      } in this worker's history (deno task runs list shows them)`,
    );
    return 1;
  }
  if (status !== 200 || !isRecord(body)) return failed(status, body);
  const field = (name: string, value: unknown) =>
    console.log(
      `${name}: ${
        escapeControls(
          typeof value === "string" ? value : JSON.stringify(value),
        )
      }`,
    );
  field("run", body.id);
  field("task", body.task);
  field("status", body.status);
  if (body.reason !== null) field("reason", body.reason);
  if (body.sender !== null) field("sender", body.sender);
  if (body.parameters !== null) field("parameters", body.parameters);
  if (body.command !== null) field("command", body.command);
  field("hosts", Array.isArray(body.hosts) ? body.hosts.join(", ") : "");
  field(
    "messages",
    Array.isArray(body.message_ids) ? body.message_ids.join(", ") : "",
  );
  field("attempts", body.attempts);
  field("started", body.started_at);
  if (body.finished_at !== null) {
    field(
      "finished",
      `${body.finished_at} (${duration(Number(body.duration_ms))})`,
    );
  }
  console.log("statuses:");
  for (const s of Array.isArray(body.statuses) ? body.statuses : []) {
    if (!isRecord(s)) continue;
    console.log(
      escapeControls(
        `  ${s.at} ${s.status}${
          typeof s.reason === "string" ? `: ${s.reason}` : ""
        }`,
      ),
    );
  }
  for (const run of Array.isArray(body.host_runs) ? body.host_runs : []) {
    if (!isRecord(run)) continue;
    const prefix = `[${escapeControls(String(run.host))}]`;
    console.log(
      `\nattempt ${run.attempt} (message ${run.message_id}) on ${run.host}, ${run.started_at}`,
    );
    for (const [stream, text] of [["out", run.stdout], ["err", run.stderr]]) {
      for (const line of lines(String(text))) {
        console.log(`${prefix} ${stream}: ${escapeControls(line)}`);
      }
    }
    console.log(
      `${prefix} ${ending(run)} (${duration(Number(run.duration_ms))})`,
    );
  }
  return 0;
}

/** A host's end as the worker logs it: `exit: 0`, a signal, or the error. */
function ending(run: Record<string, unknown>): string {
  if (typeof run.exit_status === "number") return `exit: ${run.exit_status}`;
  if (typeof run.signal === "string") return `killed by signal ${run.signal}`;
  return escapeControls(String(run.error ?? "no exit status"));
}

function lines(text: string): string[] {
  if (text === "") return [];
  const all = text.split("\n");
  if (all.at(-1) === "") all.pop();
  return all;
}

function hostsText(hosts: string[]): string {
  return hosts.length <= 3
    ? hosts.join(",")
    : `${hosts.slice(0, 2).join(",")},+${hosts.length - 2}`;
}

function duration(ms: number): string {
  if (!Number.isFinite(ms)) return "";
  if (ms < 1000) return `${ms} ms`;
  if (ms < 60_000) return `${(ms / 1000).toFixed(1)} s`;
  const s = Math.round(ms / 1000);
  return s < 3600
    ? `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`
    : `${Math.floor(s / 3600)}h${
      String(Math.floor(s / 60) % 60).padStart(2, "0")
    }m`;
}

function table(head: string[], rows: string[][]): string {
  const widths = head.map((h, i) =>
    Math.max(h.length, ...rows.map((r) => r[i].length))
  );
  return [head, ...rows].map((r) =>
    r.map((cell, i) => cell.padEnd(widths[i])).join("  ").trimEnd()
  ).join("\n");
}

/** An answer that is not what was asked: its error, said, and exit 1. */
function failed(status: number, body: unknown): number {
  const error = isRecord(body) && typeof body.error === "string"
    ? body.error
    : typeof body === "string"
    ? body.trim()
    : JSON.stringify(body);
  console.error(
    `runs: the listener answered HTTP ${status}: ${escapeControls(error)}`,
  );
  return status === 400 ? 2 : 1;
}

/** The worker's listener over HTTP, its refusals said as what to do. */
function httpListener(url: string, token: string | undefined): Listener {
  return {
    url,
    async get(path) {
      let response: Response;
      try {
        response = await fetch(`${url}${path}`, {
          headers: token === undefined
            ? {}
            : { Authorization: `Bearer ${token}` },
        });
      } catch (e) {
        throw new ListenerError(
          `no worker listener at ${url} (${
            errorText(e)
          }): is the worker running with TASK_HTTP_PORT=${
            new URL(url).port
          }? Start it (deno task start), or set TASK_HTTP_PORT and TASK_HTTP_HOST as it has them`,
        );
      }
      const text = await response.text();
      if (response.status === 401) {
        throw new ListenerError(
          `the listener at ${url} refused the token: set TASK_HTTP_TOKEN to the worker's (${
            token === undefined
              ? "none is set here"
              : "the one set here differs"
          })`,
        );
      }
      let body: unknown = text;
      try {
        body = JSON.parse(text);
      } catch {
        // not JSON: said as text
      }
      return { status: response.status, body };
    },
  };
}

class ListenerError extends Error {}

async function main(argv: string[], env: Env): Promise<number> {
  const [name, ...args] = argv;
  if (name === undefined || name === "-h" || name === "--help") {
    console.log(USAGE);
    return name === undefined ? 2 : 0;
  }
  const live = Object.hasOwn(LIVE, name) ? LIVE[name] : undefined;
  if (live !== undefined) return await live.run(args, env);
  const command = Object.hasOwn(COMMANDS, name) ? COMMANDS[name] : undefined;
  if (command === undefined) {
    console.error(`runs: unknown command ${JSON.stringify(name)}\n\n${USAGE}`);
    return 2;
  }
  let listener: Listener;
  try {
    const config = listenerConfig(env);
    listener = httpListener(config.url, config.token);
  } catch (e) {
    console.error(`FATAL ${errorText(e).replaceAll("\n", "\n  ")}`);
    return 2;
  }
  try {
    return await command.run(args, listener);
  } catch (e) {
    if (e instanceof UsageError) {
      console.error(`runs ${name}: ${e.message}\n\n${USAGE}`);
      return 2;
    }
    if (e instanceof ListenerError) {
      console.error(`runs: ${e.message}`);
      return 1;
    }
    throw e;
  }
}

if (import.meta.main) {
  Deno.exit(await main(Deno.args, Deno.env.toObject()));
}
