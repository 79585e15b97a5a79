/**
 * Helpers shared by the test files: waiting, seeded randomness, a fast or a
 * jumping server clock, an in-memory log, child processes whose output lines
 * are kept, the embedded queue server with ways to look inside, and an HTTP
 * proxy that puts latency or faults between a worker and that server (the
 * reliability test and the bench's far-away queue rows).
 */

import { IronMqClient } from "../lib/ironmq.ts";
import { LineSplitter, type Log } from "../lib/log.ts";
import { errorText } from "../lib/util.ts";
import {
  type QueueServer,
  type QueueServerOptions,
  startQueueServer,
} from "../lib/mq/server.ts";

/** The repository root (this file is in test/), ending in a slash. */
export const REPO = new URL("..", import.meta.url).pathname;

export const sleep = (ms: number) =>
  new Promise<void>((resolve) => setTimeout(resolve, ms));

/** Polls `cond` until it holds; false (not a throw) when `ms` passed first. */
export async function eventually(
  cond: () => boolean | Promise<boolean>,
  ms: number,
): Promise<boolean> {
  const deadline = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > deadline) return false;
    await sleep(20);
  }
  return true;
}

/** Like eventually, but throws; `what` may be a function, for the state at the end. */
export async function until(
  what: string | (() => string),
  cond: () => boolean | Promise<boolean>,
  ms = 30_000,
): Promise<void> {
  if (!(await eventually(cond, ms))) {
    const text = typeof what === "string" ? what : what();
    throw new Error(`timed out waiting: ${text}`);
  }
}

/** A process's memory from /proc/<pid>/status, in MB: now (VmRSS) or at its peak (VmHWM). */
export function statusMb(pid: number, field: "VmRSS" | "VmHWM"): number {
  const status = Deno.readTextFileSync(`/proc/${pid}/status`);
  const match = new RegExp(`^${field}:\\s+(\\d+) kB`, "m").exec(status);
  if (!match) throw new Error(`no ${field} in /proc/${pid}/status`);
  return Number(match[1]) / 1024;
}

/** A small seeded generator, so a failing run can be replayed. */
export function mulberry32(seed: number): () => number {
  return () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** A server clock running `factor` times faster, so reservations expire in seconds. */
export function fastClock(factor: number): () => number {
  const t0 = Date.now();
  return () => t0 + (Date.now() - t0) * factor;
}

/** One sample's value from Prometheus text, or undefined when absent. */
export function sample(metrics: string, name: string): number | undefined {
  const line = metrics.split("\n").find((l) => l.startsWith(`${name} `));
  return line === undefined ? undefined : Number(line.split(" ").pop());
}

/**
 * A server clock at real speed, as the worker's own is, that the test moves
 * forward at once with `jump`: reservations lapse only when the test says
 * (a killed worker's), never while a worker that touches them is alive.
 */
export function jumpingClock(): {
  now: () => number;
  jump: (ms: number) => void;
} {
  let offset = 0;
  return {
    now: () => Date.now() + offset,
    jump: (ms) => {
      offset += ms;
    },
  };
}

/** A log that keeps its lines for assertions. */
export function memoryLog(): Log & { lines: string[] } {
  const lines: string[] = [];
  return {
    lines,
    debug: (t) => lines.push(`DEBUG ${t}`),
    info: (t) => lines.push(t),
    warn: (t) => lines.push(`WARN ${t}`),
    error: (t) => lines.push(`ERROR ${t}`),
  };
}

export interface Collected {
  child: Deno.ChildProcess;
  /** Every stdout and stderr line so far (that `keep` kept). */
  lines: string[];
  /** Waits for a line matching `pattern` and returns it. */
  line(pattern: RegExp, ms?: number): Promise<string>;
  /** Whether the process has ended (by itself or by a signal we sent). */
  exited(): boolean;
  /** Sends `signal` and waits for the end and the last output. */
  stop(signal?: Deno.Signal): Promise<Deno.CommandStatus>;
}

/**
 * Spawns a process with exactly `env`, keeping its output lines as they come:
 * those `keep` returns true for (it sees every line; for a flood of output,
 * it can count lines instead of keeping them).
 */
export function spawnCollecting(
  cmd: string,
  args: string[],
  env: Record<string, string>,
  cwd = REPO,
  keep: (line: string) => boolean = () => true,
): Collected {
  const child = new Deno.Command(cmd, {
    args,
    env,
    cwd,
    clearEnv: true,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const lines: string[] = [];
  const collect = async (stream: ReadableStream<Uint8Array>) => {
    const splitter = new LineSplitter((l) => {
      if (keep(l)) lines.push(l);
    });
    for await (const chunk of stream) splitter.push(chunk);
    splitter.end();
  };
  const drained = Promise.all([collect(child.stdout), collect(child.stderr)]);
  let ended = false;
  child.status.then(() => ended = true);
  return {
    child,
    lines,
    async line(pattern, ms = 30_000) {
      let found: string | undefined;
      await until(
        () => `a line matching ${pattern} in:\n${lines.join("\n")}`,
        () => (found = lines.find((l) => pattern.test(l))) !== undefined,
        ms,
      );
      return found!;
    },
    exited: () => ended,
    async stop(signal = "SIGTERM") {
      try {
        child.kill(signal);
      } catch {
        // already ended
      }
      const status = await child.status;
      await drained;
      return status;
    },
  };
}

export interface StoredMessage {
  id: string;
  body: string;
  reserved_count: number;
}

type Json = Record<string, unknown>;

/** The embedded queue server, in memory on a free port, and ways to look inside. */
export interface TestQueue {
  server: QueueServer;
  /** The worker's own client, for `queue` in `project`. */
  client: IronMqClient;
  /** A v3 call below /3/projects/<project>; throws on errors other than 404. */
  api(method: string, path: string, body?: unknown): Promise<Json>;
  post(bodies: string[]): Promise<string[]>;
  info(queue?: string): Promise<{ size: number; total_messages: number }>;
  size(queue?: string): Promise<number>;
  /** Available messages, without reserving them. */
  peek(queue?: string): Promise<StoredMessage[]>;
  reserve(n?: number): Promise<StoredMessage[]>;
  close(): Promise<void>;
}

export async function startTestQueue(
  options: QueueServerOptions = {},
  project = "test",
  queue = "jobs",
): Promise<TestQueue> {
  const server = await startQueueServer({
    port: 0,
    dbPath: ":memory:",
    ...options,
  });
  const client = new IronMqClient({
    baseUrl: server.url,
    projectId: project,
    queueName: queue,
    token: options.token,
  });
  const api = async (method: string, path: string, body?: unknown) => {
    const headers: Record<string, string> = {
      "Content-Type": "application/json",
    };
    if (options.token) headers.Authorization = `OAuth ${options.token}`;
    const response = await fetch(`${server.url}/3/projects/${project}${path}`, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const reply: Json = await response.json();
    if (!response.ok && response.status !== 404) {
      throw new Error(`${method} ${path}: ${JSON.stringify(reply)}`);
    }
    return reply;
  };
  const messages = (reply: Json) => (reply.messages ?? []) as StoredMessage[];
  const info = async (name = queue) =>
    ((await api("GET", `/queues/${name}`)).queue ??
      { size: 0, total_messages: 0 }) as {
        size: number;
        total_messages: number;
      };
  return {
    server,
    client,
    api,
    post: async (bodies) => {
      const ids: string[] = [];
      for (let i = 0; i < bodies.length; i += 100) {
        ids.push(...await client.post(queue, bodies.slice(i, i + 100)));
      }
      return ids;
    },
    info,
    size: async (name) => (await info(name)).size,
    peek: async (name = queue) =>
      messages(await api("GET", `/queues/${name}/messages?n=100`)),
    reserve: async (n = 10) =>
      messages(
        await api("POST", `/queues/${queue}/reservations`, { n, wait: 0 }),
      ),
    close: () => server.close(),
  };
}

// ---------------------------------------------------------------------------
// A proxy between a worker and the queue server (raw TCP, HTTP/1.1 with
// Content-Length bodies): a fixed latency, injected faults, or both
// ---------------------------------------------------------------------------

export const FAULTS = [
  "500",
  "503",
  "408",
  "429",
  "reset",
  "cut",
  "delay",
  "corrupt",
] as const;
export type Fault = typeof FAULTS[number];

export interface QueueProxyOptions {
  /**
   * Milliseconds added to every request's round trip: half before it is
   * forwarded, half before its reply is sent back, as a far-away queue would.
   */
  latencyMs?: number;
  /**
   * A `rate` share of requests gets one fault: an error status without
   * forwarding, a delay of up to 2 s before forwarding, or, after the server
   * acted, a closed connection (reset), a reply cut mid-body (cut) or a reply
   * that is not JSON (corrupt). Which requests is random; the kinds take turns.
   */
  faults?: { random: () => number; rate: number };
}

export interface QueueProxy {
  port: number;
  requests: number;
  faults: Record<Fault, number>;
  /** Message ids of DELETEs forwarded to the server, with the time they were sent. */
  deletes: { id: string; at: number }[];
  close(): Promise<void>;
}

interface RawRequest {
  method: string;
  target: string;
  headers: Headers;
  body: Uint8Array<ArrayBuffer>;
}

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** Reads requests off a connection, keep-alive included. */
class RequestReader {
  #buffer: Uint8Array<ArrayBuffer> = new Uint8Array(0);
  constructor(private readonly conn: Deno.Conn) {}

  async next(): Promise<RawRequest | undefined> {
    let end: number;
    while ((end = headEnd(this.#buffer)) < 0) {
      if (!(await this.#fill())) return undefined;
    }
    const [requestLine, ...fields] = decoder.decode(
      this.#buffer.subarray(0, end),
    ).split("\r\n");
    const [method, target] = requestLine.split(" ");
    const headers = new Headers();
    for (const field of fields) {
      const colon = field.indexOf(":");
      headers.append(field.slice(0, colon).trim(), field.slice(colon + 1));
    }
    if (headers.has("transfer-encoding")) {
      throw new Error("the proxy only reads Content-Length bodies");
    }
    const total = end + 4 + Number(headers.get("content-length") ?? 0);
    while (this.#buffer.length < total) {
      if (!(await this.#fill())) return undefined;
    }
    const body = this.#buffer.slice(end + 4, total);
    this.#buffer = this.#buffer.slice(total);
    return { method, target, headers, body };
  }

  async #fill(): Promise<boolean> {
    const chunk = new Uint8Array(64 * 1024);
    const n = await this.conn.read(chunk).catch(() => null);
    if (n === null) return false;
    const joined = new Uint8Array(this.#buffer.length + n);
    joined.set(this.#buffer);
    joined.set(chunk.subarray(0, n), this.#buffer.length);
    this.#buffer = joined;
    return true;
  }
}

function headEnd(bytes: Uint8Array): number {
  for (let i = 0; i + 3 < bytes.length; i++) {
    if (
      bytes[i] === 13 && bytes[i + 1] === 10 && bytes[i + 2] === 13 &&
      bytes[i + 3] === 10
    ) {
      return i;
    }
  }
  return -1;
}

function httpResponse(status: number, body: string): Uint8Array {
  const bytes = encoder.encode(body);
  const head =
    `HTTP/1.1 ${status} Proxied\r\nContent-Type: application/json\r\n` +
    `Content-Length: ${bytes.length}\r\n\r\n`;
  const out = new Uint8Array(head.length + bytes.length);
  out.set(encoder.encode(head));
  out.set(bytes, head.length);
  return out;
}

async function writeAll(conn: Deno.Conn, bytes: Uint8Array): Promise<void> {
  for (let at = 0; at < bytes.length;) {
    at += await conn.write(bytes.subarray(at));
  }
}

/** The message ids a DELETE names: one in the path, or a batch in the body. */
function deletedIds(request: RawRequest): string[] {
  if (request.method !== "DELETE") return [];
  const one = /\/messages\/(\d+)$/.exec(request.target);
  if (one) return [one[1]];
  if (!/\/messages$/.test(request.target)) return [];
  const parsed: { ids?: { id: string }[] } = JSON.parse(
    decoder.decode(request.body),
  );
  return (parsed.ids ?? []).map((item) => item.id);
}

/** A reply that is not JSON any more: cut short or with a stray byte. */
function corrupt(body: string, random: () => number): string {
  return random() < 0.5
    ? body.slice(0, Math.floor(body.length * random()))
    : `<${body.slice(1)}`;
}

/**
 * Listens on 127.0.0.1 and forwards to `upstream`, with the latency and
 * faults of `options`. Each connection carries one request at a time (HTTP/1.1 without
 * pipelining) and connections are served side by side, so one request's
 * latency, or a long-poll, never holds up another's.
 */
export function startQueueProxy(
  upstream: string,
  options: QueueProxyOptions = {},
): QueueProxy {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const closing = new AbortController();
  const conns = new Set<Deno.Conn>();
  const serving = new Set<Promise<void>>();
  const halfLatencyMs = (options.latencyMs ?? 0) / 2;
  const proxy: QueueProxy = {
    port: (listener.addr as Deno.NetAddr).port,
    requests: 0,
    faults: Object.fromEntries(FAULTS.map((f) => [f, 0])) as Record<
      Fault,
      number
    >,
    deletes: [],
    async close() {
      closing.abort();
      listener.close();
      for (const conn of conns) conn.close();
      await accepting;
      await Promise.allSettled([...serving]);
    },
  };

  // Without faults the rate is 0: no request gets one.
  const { random, rate } = options.faults ?? { random: Math.random, rate: 0 };
  let injected = 0;
  const pickFault = (): Fault | undefined =>
    random() < rate ? FAULTS[injected++ % FAULTS.length] : undefined;

  const forward = async (request: RawRequest) => {
    const headers = new Headers();
    for (const name of ["content-type", "accept", "authorization"]) {
      const value = request.headers.get(name);
      if (value !== null) headers.set(name, value.trim());
    }
    const at = Date.now();
    for (const id of deletedIds(request)) proxy.deletes.push({ id, at });
    const response = await fetch(`${upstream}${request.target}`, {
      method: request.method,
      headers,
      body: request.body.length > 0 ? request.body : undefined,
      signal: closing.signal,
    });
    return { status: response.status, body: await response.text() };
  };

  /** The bytes to send back and whether to close after them; undefined: close now. */
  const answer = async (request: RawRequest) => {
    proxy.requests++;
    const fault = pickFault();
    if (fault !== undefined) proxy.faults[fault]++;
    if (fault !== undefined && /^\d+$/.test(fault)) {
      const msg = JSON.stringify({ msg: `injected ${fault}` });
      return { bytes: httpResponse(Number(fault), msg), close: false };
    }
    if (fault === "delay") await sleep(random() * 2_000);
    if (halfLatencyMs > 0) await sleep(halfLatencyMs);
    const reply = await forward(request);
    if (halfLatencyMs > 0) await sleep(halfLatencyMs);
    if (fault === "reset") return undefined;
    if (fault === "cut") {
      const full = httpResponse(reply.status, reply.body);
      const bodyStart = full.length - encoder.encode(reply.body).length;
      const keep = bodyStart + Math.floor((full.length - bodyStart) / 2);
      return { bytes: full.subarray(0, keep), close: true };
    }
    const body = fault === "corrupt" ? corrupt(reply.body, random) : reply.body;
    return { bytes: httpResponse(reply.status, body), close: false };
  };

  const serve = async (conn: Deno.Conn) => {
    const reader = new RequestReader(conn);
    try {
      for (;;) {
        const request = await reader.next();
        if (request === undefined) return;
        const reply = await answer(request);
        if (reply === undefined) return;
        await writeAll(conn, reply.bytes);
        if (reply.close) return;
      }
    } catch {
      // the worker went away, or the proxy is closing
    } finally {
      conns.delete(conn);
      try {
        conn.close();
      } catch {
        // closed by close()
      }
    }
  };

  const accepting = (async () => {
    try {
      for await (const conn of listener) {
        conns.add(conn);
        const done = serve(conn).finally(() => serving.delete(done));
        serving.add(done);
      }
    } catch {
      // listener closed
    }
  })();
  return proxy;
}

/**
 * A command's environment: a home of its own (so no iron.json of the
 * machine's is read, and a worker's run history is kept there, not in the
 * repository it starts from), Deno's cache.
 */
export function baseEnv(home: string): Record<string, string> {
  return {
    PATH: Deno.env.get("PATH") ?? "/usr/bin:/bin",
    HOME: home,
    TASK_RUNS_DB: `${home}/runs.sqlite`,
    DENO_DIR: Deno.env.get("DENO_DIR") ??
      `${Deno.env.get("HOME")}/.cache/deno`,
    NO_COLOR: "1",
  };
}

/**
 * A temporary folder with `catalog` as its tasks.yaml, a queue server for
 * my_queue, and the environment that points `deno task send` or `dlq` at both.
 */
export async function withCatalogQueue(
  catalog: string,
  fn: (q: TestQueue, env: Record<string, string>, dir: string) => Promise<void>,
): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "tasks-test-" });
  const q = await startTestQueue({}, "local", "my_queue");
  try {
    await Deno.writeTextFile(`${dir}/tasks.yaml`, catalog);
    const env = {
      ...baseEnv(dir),
      MQ_PORT: new URL(q.server.url).port,
      TASKS_FILE: `${dir}/tasks.yaml`,
    };
    await fn(q, env, dir);
  } finally {
    await q.close();
    await Deno.remove(dir, { recursive: true });
  }
}

/** Mounts a tmpfs of `size` on `dir`; the reason when that is not possible here. */
export async function mountTmpfs(
  dir: string,
  size: string,
): Promise<string | undefined> {
  try {
    const mount = await new Deno.Command("mount", {
      args: ["-t", "tmpfs", "-o", `size=${size},mode=0700`, "tmpfs", dir],
      stdout: "null",
      stderr: "piped",
    }).output();
    if (mount.success) return undefined;
    return new TextDecoder().decode(mount.stderr).trim();
  } catch (error) {
    return `cannot run mount: ${errorText(error)}`;
  }
}

// ---------------------------------------------------------------------------
// Remote commands that leave records
// ---------------------------------------------------------------------------

export async function script(dir: string, name: string, body: string) {
  const path = `${dir}/${name}`;
  await Deno.writeTextFile(path, `#!/bin/sh\n${body}`);
  await Deno.chmod(path, 0o755);
  await Deno.chmod(dir, 0o777); // the remote user writes its records here
  return path;
}

/**
 * `record.sh RUN SECONDS ID`: appends "start RUN ID ms HOST", works SECONDS,
 * then appends "done RUN ID ms HOST" (one short O_APPEND write each, so lines
 * never mix); HOST is the address the command reached ($SSH_CONNECTION).
 */
export function recorder(dir: string): Promise<string> {
  return script(
    dir,
    "record.sh",
    `log="${dir}/events"
host=$(echo "$SSH_CONNECTION" | cut -d" " -f3)
echo "start $1 $3 $(date +%s%3N) $host" >> "$log"
sleep "$2"
echo "done $1 $3 $(date +%s%3N) $host" >> "$log"
`,
  );
}

export interface RunEvent {
  kind: "start" | "done";
  run: string;
  id: string;
  at: number;
  /** The address the command reached. */
  host: string;
}

export async function readEvents(dir: string): Promise<RunEvent[]> {
  const text = await fileText(`${dir}/events`);
  return text.split("\n").filter((l) => l !== "").map((line) => {
    const [kind, run, id, at, host] = line.split(" ");
    if (kind !== "start" && kind !== "done") throw new Error(line);
    return { kind, run, id, at: Number(at), host: host ?? "" };
  });
}

/** A file's text, or "" while it does not exist. */
export function fileText(path: string): Promise<string> {
  return Deno.readTextFile(path).catch(() => "");
}
