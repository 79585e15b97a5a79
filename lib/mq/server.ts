/**
 * lib/mq/server.ts: starting and stopping the embedded queue server, which
 * speaks IronMQ's v3 REST API, so the worker can run and be tested without an
 * Iron.io account. Messages live in SQLite (store.ts); the API is http.ts.
 * It never listens beyond loopback without a token (MQ_TOKEN).
 *
 * Embedded: `startQueueServer({ port: 0, dbPath: ":memory:" })`, then `close()`.
 * Standalone: `deno task mq`, configured by MQ_HOST, MQ_PORT, MQ_DB and MQ_TOKEN.
 * Both serve Prometheus metrics at `GET /metrics`.
 */
import {
  bracketIPv6,
  type Env,
  envValue,
  errorText,
  isLoopback,
} from "../util.ts";
import {
  buildRoutes,
  createRequestHandler,
  METRICS_PATH,
  route,
  ServerMetrics,
} from "./http.ts";
import { LongPolls, queueKey, QueueStore } from "./store.ts";

export interface QueueServerOptions {
  /** Address to listen on; default "127.0.0.1". Non-loopback needs a token. */
  hostname?: string;
  /** Port to listen on; default 8080; 0 picks a free port. */
  port?: number;
  /** SQLite file; ":memory:" keeps everything in memory. Default "ironmq.sqlite". */
  dbPath?: string;
  /**
   * When set, every request needs `Authorization: OAuth <token>`; /metrics also
   * takes `Authorization: Bearer <token>`, which is what Prometheus sends.
   */
  token?: string;
  /** Sink for one-line events (listening, internal errors); default: none. */
  log?: (line: string) => void;
  /** Clock in milliseconds since the epoch; tests inject one to move time. */
  now?: () => number;
}

export interface QueueServer {
  readonly hostname: string;
  readonly port: number;
  readonly url: string;
  /** Stops listening, ends pending long-polls, closes the database. */
  close(): Promise<void>;
}

const DEFAULT_HOSTNAME = "127.0.0.1";

const DEFAULT_PORT = 8080;

const DEFAULT_DB_PATH = "ironmq.sqlite";

function formatUrl(hostname: string, port: number): string {
  return `http://${bracketIPv6(hostname)}:${port}`;
}

type ResolvedOptions = Required<Omit<QueueServerOptions, "token">> & {
  token?: string;
};

/** Defaults filled in; throws on settings that are invalid or unsafe. */
function resolveOptions(options: QueueServerOptions): ResolvedOptions {
  const resolved: ResolvedOptions = {
    hostname: options.hostname ?? DEFAULT_HOSTNAME,
    port: options.port ?? DEFAULT_PORT,
    dbPath: options.dbPath ?? DEFAULT_DB_PATH,
    token: options.token,
    log: options.log ?? (() => {}),
    now: options.now ?? Date.now,
  };
  const { hostname, port, token } = resolved;
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    throw new Error(`Invalid port ${port}: use an integer from 0 to 65535`);
  }
  if (token === "") {
    throw new Error("The token is empty: set a non-empty token or none");
  }
  if (token === undefined && !isLoopback(hostname)) {
    throw new Error(
      `Refusing to listen on ${hostname} without a token: anyone who reaches it ` +
        "could read and delete messages. Set MQ_TOKEN (option token), " +
        "or listen on 127.0.0.1",
    );
  }
  return resolved;
}

function listen(options: ResolvedOptions): QueueServer {
  const { hostname, dbPath, token, log, now } = options;
  const polls = new LongPolls(now);
  const store = new QueueStore(dbPath, now, (ref) => polls.poke(queueKey(ref)));
  const metrics = new ServerMetrics(store);
  const routes = [
    ...buildRoutes(store, polls),
    route(METRICS_PATH, { GET: () => metrics.scrape() }),
  ];
  const handler = createRequestHandler(routes, token, log, metrics);
  let server: Deno.HttpServer<Deno.NetAddr>;
  try {
    server = Deno.serve(
      { hostname, port: options.port, onListen: () => {} },
      handler,
    );
  } catch (error) {
    store.close();
    throw new Error(
      `Cannot listen on ${hostname}:${options.port}: ${
        errorText(error)
      }. Choose another port or stop what uses it.`,
    );
  }

  const url = formatUrl(hostname, server.addr.port);
  const auth = token === undefined ? "no auth" : "token required";
  log(`mq_server: listening on ${url} (database ${dbPath}, ${auth})`);
  let closing: Promise<void> | undefined;
  const close = async () => {
    polls.close();
    await server.shutdown();
    store.close();
  };
  return {
    hostname,
    port: server.addr.port,
    url,
    close: () => closing ??= close(),
  };
}

/** Starts the server; resolves once it is listening. */
export function startQueueServer(
  options: QueueServerOptions = {},
): Promise<QueueServer> {
  try {
    return Promise.resolve(listen(resolveOptions(options)));
  } catch (error) {
    return Promise.reject(error);
  }
}

/**
 * Options from MQ_HOST, MQ_PORT, MQ_DB and MQ_TOKEN (empty means unset). Throws
 * one Error naming every bad variable; the token's value is never echoed.
 */
export function queueServerOptionsFromEnv(
  env: Env,
): QueueServerOptions {
  const value = (name: string) => envValue(env, name);
  const problems: string[] = [];
  const hostname = value("MQ_HOST") ?? DEFAULT_HOSTNAME;
  if (!/^(?:[A-Za-z0-9.-]+|[0-9A-Fa-f:.]+)$/.test(hostname)) {
    problems.push(
      `MQ_HOST must be a host name or IP address such as 127.0.0.1 (got ${
        JSON.stringify(hostname)
      })`,
    );
  }
  const rawPort = value("MQ_PORT") ?? String(DEFAULT_PORT);
  const port = /^\d{1,5}$/.test(rawPort) ? Number(rawPort) : NaN;
  if (!(port <= 65535)) {
    problems.push(
      `MQ_PORT must be an integer from 0 to 65535 (got ${
        JSON.stringify(rawPort)
      })`,
    );
  }
  const token = value("MQ_TOKEN");
  if (token !== undefined && !/^[\x21-\x7e]+$/.test(token)) {
    problems.push(
      "MQ_TOKEN must be printable ASCII without spaces (value not shown)",
    );
  }
  if (problems.length > 0) {
    throw new Error(
      `Invalid environment for mq_server: ${problems.join("; ")}. ` +
        "Fix these variables and start again.",
    );
  }
  return {
    hostname,
    port,
    dbPath: value("MQ_DB") ?? DEFAULT_DB_PATH,
    token,
  };
}

async function main(): Promise<void> {
  let options: QueueServerOptions;
  try {
    options = queueServerOptionsFromEnv(Deno.env.toObject());
  } catch (error) {
    console.error(`mq_server: ${errorText(error)}`);
    Deno.exit(2);
  }
  let server: QueueServer;
  try {
    server = await startQueueServer({
      ...options,
      log: (line) => console.log(line),
    });
  } catch (error) {
    console.error(`mq_server: ${errorText(error)}`);
    Deno.exit(1);
  }
  const stop = async (signal: Deno.Signal) => {
    console.log(`mq_server: ${signal} received, stopping`);
    await server.close();
    Deno.exit(0);
  };
  for (const signal of ["SIGINT", "SIGTERM"] as const) {
    Deno.addSignalListener(signal, () => void stop(signal));
  }
}

if (import.meta.main) await main();
