/**
 * Helpers shared by the test files: waiting, seeded randomness, a fast server
 * clock, an in-memory log, child processes whose output lines are kept, and the
 * embedded queue server with ways to look inside.
 */

import { IronMqClient, LineSplitter, type Log } from "./tasks.ts";
import {
  type QueueServer,
  type QueueServerOptions,
  startQueueServer,
} from "./mq_server.ts";

export const REPO = new URL(".", import.meta.url).pathname;

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
  /** Every stdout and stderr line so far. */
  lines: string[];
  /** Waits for a line matching `pattern` and returns it. */
  line(pattern: RegExp, ms?: number): Promise<string>;
  /** Whether the process has ended (by itself or by a signal we sent). */
  exited(): boolean;
  /** Sends `signal` and waits for the end and the last output. */
  stop(signal?: Deno.Signal): Promise<Deno.CommandStatus>;
}

/** Spawns a process with exactly `env`, keeping its output lines as they come. */
export function spawnCollecting(
  cmd: string,
  args: string[],
  env: Record<string, string>,
  cwd = REPO,
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
    const splitter = new LineSplitter((l) => lines.push(l));
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
