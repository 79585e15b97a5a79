/**
 * bench/bench.ts: how fast the worker drains a queue, how soon it picks up a message
 * and how much memory it holds, next to a seed-style loop and the raw SSH floor.
 *
 * One run measures everything side by side (this 2-core machine is shared and
 * noisy) against a real sshd on loopback and the embedded queue server with a
 * file database in a temporary directory, then prints one table with the
 * targets of issue 5. The drain and pickup measures run the worker in-process
 * (IronMqClient + SshHosts + Worker, logging at info into a sink that drops the
 * formatted lines); the memory measure runs the worker as a process through
 * ./start, as `deno task start` and runit do (its permissions, its V8 flags).
 * The far-away queue rows drain the same way through test/support.ts's proxy,
 * which adds a fixed latency to every queue request (hosted IronMQ from another
 * region is 40 to 180 ms away), next to the loopback drain of the same run.
 * The many-hosts rows (issue 11) run `true` on 50 loopback hosts by the raw
 * ssh2 floor, the worker process (SSH_HOST a comma list), Fabric, pssh and
 * Ansible, against the same hosts, each tool skipped with the reason if missing.
 * Beside the drains: the run history on against off (issue 18, alternated), a
 * catalog task without limits and one of `concurrency: 1` (issue 19, rows
 * 1b), and a followed run's stream posts (issue 18, rows 7).
 *
 * Sizes come from flags or BENCH_* variables (see SIZE_SETTINGS); 0 skips a
 * measure, `--smoke` starts from tiny sizes.
 * Run: deno task bench [--drain=500] [--smoke]
 */

import { Buffer } from "node:buffer";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
// @ts-types="@types/ssh2"
import { Client, type ConnectConfig } from "ssh2";
import { loadSshCredentials, parseConfig } from "../lib/config.ts";
import { type HostSpec } from "../lib/hosts.ts";
import { IronMqClient } from "../lib/ironmq.ts";
import { checkHostKey, parseKnownHosts } from "../lib/known_hosts.ts";
import { type Log, Secrets, setupLogging } from "../lib/log.ts";
import { planCommand } from "../lib/message.ts";
import { realClock } from "../lib/retry.ts";
import { MAX_STREAM_POSTS } from "../lib/stream.ts";
import { RunStore } from "../lib/runs.ts";
import {
  type CommandRunner,
  type RunIo,
  type RunResult,
  SshHosts,
} from "../lib/ssh.ts";
import { Worker } from "../tasks.ts";
import { type QueueServer, startQueueServer } from "../lib/mq/server.ts";
import { type Env, errorText, isRecord } from "../lib/util.ts";
import {
  type LoopbackHosts,
  run,
  type Sshd,
  startLoopbackHosts,
  startSshd,
} from "../test/sshd.ts";
import {
  type Collected,
  sleep,
  spawnCollecting,
  startQueueProxy,
  statusMb,
} from "../test/support.ts";

// ---------------------------------------------------------------------------
// Options: flags beat BENCH_* variables beat the defaults
// ---------------------------------------------------------------------------

export interface Sizes {
  /** Messages drained at the default concurrency and at concurrency 1. */
  drain: number;
  /** Messages drained with 40 ms added to every queue request. */
  wan40: number;
  /** Messages drained with 150 ms added to every queue request. */
  wan150: number;
  /** Messages posted one at a time to an idle worker. */
  pickups: number;
  /** Messages the worker process drains, twice, while its memory is sampled. */
  rss: number;
  /** Messages the seed-style loop drains. */
  baseline: number;
  /** Messages posted one at a time to the idle seed-style loop. */
  baselinePickups: number;
  /** The seed-style loop's sleep on an empty queue, in seconds. */
  baselineSleep: number;
  /** `true` execs for each raw floor figure. */
  floor: number;
  /** Messages reserved and deleted in batches of 100 by the queue micro-measure. */
  mq: number;
  /** Long-poll wake-ups timed by the queue micro-measure. */
  wakes: number;
  /** Seconds the worker process is left idle before its memory is read. */
  settle: number;
  /** Loopback hosts for the many-hosts measures (at most 254; 0 skips them all). */
  hosts: number;
  /** Cold runs (at least one) of each contender on those hosts; one worker start each. */
  hostCold: number;
  /** Warm fan-outs of the floor and the worker. */
  hostWarm: number;
  /** Ansible runs (about half a minute each). */
  ansible: number;
  /** Connections per host for the worker's RSS measure (TASK_CONCURRENCY). */
  hostConnections: number;
  /** Lines a followed run prints at once (send --follow's stream posts counted). */
  follow: number;
}

export const FULL_SIZES: Sizes = {
  drain: 2000,
  // A few seconds each at the target rates; the worker before queue-latency
  // prefetch took 11 s and 23 s (about 184 and 52 msg/s).
  wan40: 2000,
  wan150: 1200,
  pickups: 200,
  rss: 10_000,
  baseline: 100,
  baselinePickups: 5,
  baselineSleep: 10,
  floor: 1000,
  mq: 5000,
  wakes: 200,
  settle: 5,
  hosts: 50,
  hostCold: 3,
  hostWarm: 10,
  ansible: 1,
  hostConnections: 4,
  follow: 100_000,
};

export const SMOKE_SIZES: Sizes = {
  drain: 20,
  wan40: 20,
  wan150: 10,
  pickups: 5,
  rss: 100,
  baseline: 3,
  baselinePickups: 2,
  baselineSleep: 0.2,
  floor: 20,
  mq: 200,
  wakes: 5,
  settle: 0.2,
  hosts: 4,
  hostCold: 1,
  hostWarm: 2,
  ansible: 0,
  hostConnections: 2,
  follow: 200,
};

/** Each size's flag (`--baseline-sleep=2`) and variable (`BENCH_BASELINE_SLEEP=2`). */
const SIZE_SETTINGS = Object.fromEntries(
  (Object.keys(FULL_SIZES) as (keyof Sizes)[]).map((key) => {
    const words = key.split(/(?=[A-Z])/).map((w) => w.toLowerCase());
    return [key, {
      flag: words.join("-"),
      variable: `BENCH_${words.join("_").toUpperCase()}`,
      whole: key !== "baselineSleep" && key !== "settle",
    }];
  }),
) as Record<keyof Sizes, { flag: string; variable: string; whole: boolean }>;

export interface BenchOptions {
  sizes: Sizes;
}

export function readOptions(args: string[], env: Env): BenchOptions {
  const settings = Object.entries(SIZE_SETTINGS);
  const options: Record<string, { type: "string" | "boolean" }> = {
    smoke: { type: "boolean" },
  };
  for (const [, { flag }] of settings) options[flag] = { type: "string" };
  const { values } = parseArgs({ args, options });
  const given = (flag: string, variable: string) => {
    const flagged = values[flag];
    return typeof flagged === "string" ? flagged : env[variable];
  };
  const sizes = { ...(values.smoke === true ? SMOKE_SIZES : FULL_SIZES) };
  for (const [key, { flag, variable, whole }] of settings) {
    const text = given(flag, variable);
    if (text === undefined || text === "") continue;
    const value = Number(text);
    if (!(value >= 0) || (whole && !Number.isInteger(value))) {
      const kind = whole ? "a whole number" : "a number of seconds";
      throw new Error(
        `--${flag} (${variable}) must be ${kind} ≥ 0, got ${text}`,
      );
    }
    sizes[key as keyof Sizes] = value;
  }
  return { sizes };
}

// ---------------------------------------------------------------------------
// Small measuring helpers
// ---------------------------------------------------------------------------

/** Wall-clock milliseconds with sub-millisecond resolution, comparable with `date +%s%N`. */
const wallMs = () => performance.timeOrigin + performance.now();

/** Nearest-rank percentile. */
export function percentile(samples: number[], p: number): number {
  if (samples.length === 0) return NaN;
  const sorted = [...samples].sort((a, b) => a - b);
  const rank = Math.ceil((p / 100) * sorted.length);
  return sorted[Math.min(sorted.length, Math.max(1, rank)) - 1];
}

/** Polls `done` until true; throws after `timeoutMs`, or once `signal` aborts. */
async function waitFor(
  what: string,
  done: () => boolean | Promise<boolean>,
  timeoutMs: number,
  pollMs = 5,
  signal?: AbortSignal,
): Promise<void> {
  const deadline = performance.now() + timeoutMs;
  while (!(await done())) {
    signal?.throwIfAborted();
    if (performance.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    }
    await sleep(pollMs);
  }
}

/** Rate and cost of pushing `count` messages through something. */
export interface Throughput {
  count: number;
  seconds: number;
  perSecond: number;
  msEach: number;
}

function throughput(count: number, startedAt: number): Throughput {
  const seconds = (performance.now() - startedAt) / 1000;
  return {
    count,
    seconds,
    perSecond: count / seconds,
    msEach: seconds * 1000 / count,
  };
}

// ---------------------------------------------------------------------------
// The rig: sshd, the queue server and a temporary directory
// ---------------------------------------------------------------------------

const PROJECT = "bench";

interface Rig {
  dir: string;
  sshd: Sshd;
  server: QueueServer;
  /** The worker's log: LogTape at info, every line formatted, then dropped. */
  log: Log;
  client(queueName: string): IronMqClient;
  stop(): Promise<void>;
}

async function startRig(): Promise<Rig> {
  const dir = await Deno.makeTempDir({ prefix: "tasks-bench-" });
  // The remote user (tasks-ssh when root) writes its timestamps in here.
  await Deno.chmod(dir, 0o755);
  const stops: (() => Promise<void>)[] = [
    () => Deno.remove(dir, { recursive: true }),
  ];
  const stop = async () => {
    for (const step of stops.reverse()) await step().catch(() => {});
  };
  try {
    const sshd = await startSshd();
    stops.push(async () => {
      await sshd.stop();
      await Deno.remove(sshd.dir, { recursive: true });
    });
    const server = await startQueueServer({
      port: 0,
      dbPath: `${dir}/bench.sqlite`,
    });
    stops.push(() => server.close());
    const log = await setupLogging(() => {}, "info", new Secrets([]));
    const client = (queueName: string) =>
      new IronMqClient({ baseUrl: server.url, projectId: PROJECT, queueName });
    return { dir, sshd, server, log, client, stop };
  } catch (e) {
    await stop();
    throw e;
  }
}

/** The worker's settings for a bench queue, as the environment would give them. */
function workerEnv(rig: Rig, queueName: string, extra: Env = {}): Env {
  return {
    IRON_HOST: "127.0.0.1",
    IRON_PORT: String(rig.server.port),
    IRON_SCHEME: "http",
    IRON_PROJECT_ID: PROJECT,
    IRON_MQ_QUEUE_NAME: queueName,
    SSH_HOST: rig.sshd.host,
    SSH_PORT: String(rig.sshd.port),
    SSH_USER: rig.sshd.user,
    SSH_KEY_FILE: rig.sshd.clientKeyFile,
    SSH_KNOWN_HOSTS: rig.sshd.knownHostsFile,
    TASK_COMMAND: "true",
    // The worker processes keep their run history (on by default) in the rig.
    TASK_RUNS_DB: `${rig.dir}/runs.sqlite`,
    ...extra,
  };
}

async function postMany(
  rig: Rig,
  queueName: string,
  bodies: string[],
): Promise<void> {
  const client = rig.client(queueName);
  for (let i = 0; i < bodies.length; i += 100) {
    await client.post(queueName, bodies.slice(i, i + 100));
  }
}

const noOps = (count: number) => Array.from({ length: count }, () => "no-op");

/** Messages in the queue, reserved ones included: 0 once all are deleted. */
async function queueSize(rig: Rig, queueName: string): Promise<number> {
  const response = await fetch(
    `${rig.server.url}/3/projects/${PROJECT}/queues/${queueName}`,
  );
  const reply = await response.json() as { queue?: { size?: number } };
  if (typeof reply.queue?.size !== "number") {
    throw new Error(`no size for queue ${queueName}: ${JSON.stringify(reply)}`);
  }
  return reply.queue.size;
}

// ---------------------------------------------------------------------------
// Remote start times: the command appends "<index> <date +%s%N>" to a file
// ---------------------------------------------------------------------------

async function newStampFile(rig: Rig, name: string): Promise<string> {
  const path = `${rig.dir}/${name}.stamps`;
  await Deno.writeTextFile(path, "");
  await Deno.chmod(path, 0o666);
  return path;
}

/** The base command; a message `{"args":["7"]}` makes it `stamp 7`. */
function stampCommand(file: string): string {
  return `stamp() { echo "$1 $(date +%s%N)" >> ${file}; }; stamp`;
}

const stampBody = (index: number) => JSON.stringify({ args: [String(index)] });

/** Remote start (wall ms) by message index. */
async function readStamps(file: string): Promise<Map<number, number>> {
  const stamps = new Map<number, number>();
  for (const line of (await Deno.readTextFile(file)).split("\n")) {
    const [index, ns] = line.split(" ");
    if (ns === undefined) continue;
    stamps.set(Number(index), Number(BigInt(ns) / 1000n) / 1000);
  }
  return stamps;
}

async function latencies(file: string, postedAt: number[]): Promise<number[]> {
  const stamps = await readStamps(file);
  return postedAt.map((posted, i) => {
    const started = stamps.get(i);
    if (started === undefined) throw new Error(`message ${i} left no stamp`);
    return started - posted;
  });
}

// ---------------------------------------------------------------------------
// The worker in-process: tasks.ts's own parts, configured as main() does
// ---------------------------------------------------------------------------

const quietIo = (): RunIo => ({
  onStdout: () => {},
  onStderr: () => {},
  timeoutMs: 0,
  signal: new AbortController().signal,
});

/** Passes commands on and counts the ones that ended, so waiting needs no polling. */
class CountingRunner implements CommandRunner {
  ended = 0;
  readonly failures: string[] = [];
  private waiters: { count: number; wake(): void }[] = [];

  constructor(private readonly inner: CommandRunner) {}

  ready(signal: AbortSignal): Promise<void> {
    return this.inner.ready(signal);
  }

  reachable(): boolean {
    return this.inner.reachable();
  }

  async run(host: HostSpec, command: string, io: RunIo): Promise<RunResult> {
    const result = await this.inner.run(host, command, io);
    if (result.kind !== "exit" || result.code !== 0) {
      this.failures.push(`${command}: ${JSON.stringify(result)}`);
    }
    this.ended++;
    this.waiters = this.waiters.filter((w) => {
      if (this.ended < w.count) return true;
      w.wake();
      return false;
    });
    return result;
  }

  close(): void {
    this.inner.close();
  }

  /** Resolves once `count` commands have ended in all. */
  until(count: number, timeoutMs: number): Promise<void> {
    if (this.ended >= count) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        reject(
          new Error(
            `only ${this.ended} of ${count} commands ended within ${timeoutMs} ms`,
          ),
        );
      }, timeoutMs);
      this.waiters.push({
        count,
        wake: () => {
          clearTimeout(timer);
          resolve();
        },
      });
    });
  }
}

interface InProcessWorker {
  runner: CountingRunner;
  concurrency: number;
  stop(): Promise<void>;
}

/** Starts a worker whose SSH connections are already open (warm). */
async function startWorker(
  rig: Rig,
  queueName: string,
  extra: Env = {},
  historyDb?: string,
  catalog?: string,
): Promise<InProcessWorker> {
  const config = parseConfig(workerEnv(rig, queueName, extra), {
    home: rig.dir,
    user: rig.sshd.user,
    ironJsonFiles: [],
    exists: () => false,
    catalogFile: catalog === undefined
      ? undefined
      : { path: "bench.yaml", text: catalog, named: true },
  });
  const { task, ssh } = config;
  const pool = new SshHosts(
    ssh,
    loadSshCredentials(ssh),
    task.hosts,
    task.concurrency,
    rig.log,
  );
  // As many commands at once as the worker runs opens every connection it will use.
  const warm = await Promise.all(
    Array.from(
      { length: task.concurrency },
      () => pool.run(task.hosts[0], "true", quietIo()),
    ),
  );
  if (warm.some((r) => r.kind !== "exit" || r.code !== 0)) {
    pool.close();
    throw new Error(`warm-up failed: ${JSON.stringify(warm)}`);
  }
  const runner = new CountingRunner(pool);
  const history = historyDb === undefined ? undefined : RunStore.open(
    { path: historyDb, keepDays: 30, max: 100_000 },
    (line) => rig.log.error(line),
    realClock,
  );
  if (history !== undefined && !(history instanceof RunStore)) {
    pool.close();
    throw new Error(history.problem);
  }
  const worker = new Worker(
    task,
    {
      queue: new IronMqClient(config.queue),
      runner,
      log: rig.log,
      clock: realClock,
      runs: history,
      locks: (name) => rig.client(name),
    },
    queueName,
  );
  const controller = new AbortController();
  const done = worker.run(controller.signal);
  return {
    runner,
    concurrency: task.concurrency,
    // Called once its messages are done: the second stop cuts the idle long-poll.
    stop: async () => {
      controller.abort();
      worker.abortRunning();
      await done;
      pool.close();
      history?.close();
      if (runner.failures.length > 0) {
        throw new Error(`commands failed: ${runner.failures.slice(0, 3)}`);
      }
    },
  };
}

// ---------------------------------------------------------------------------
// 1. Drain throughput
// ---------------------------------------------------------------------------

export interface Drain extends Throughput {
  concurrency: number;
}

/** A drain from a far-away queue, and its target share of the loopback drain's rate. */
export interface WanDrain extends Drain {
  latencyMs: number;
  targetShare: number;
}

/** The far-away queues: ms added to every queue request, the size giving the count, the target share. */
const WAN_DRAINS = [
  { latencyMs: 40, size: "wan40", targetShare: 0.8 },
  { latencyMs: 150, size: "wan150", targetShare: 0.6 },
] as const;

/**
 * The worker drains `count` no-ops: over loopback, or with `latencyMs` added
 * to every queue request's round trip by a proxy. The messages are posted and
 * the queue watched directly; only the worker's own requests are delayed.
 */
async function measureDrain(
  rig: Rig,
  count: number,
  how: {
    concurrency?: number;
    latencyMs?: number;
    /** A run history (lib/runs.ts) in this file. */
    historyDb?: string;
    /** A round of measures alike, on a queue of its own. */
    round?: number;
    /** A queue of its own (one drained before may have a cut long-poll). */
    queue?: string;
    /** A catalog whose default task the no-ops run. */
    catalog?: string;
  } = {},
): Promise<Drain> {
  const { concurrency, latencyMs, historyDb, round } = how;
  // A stopped worker's last long-poll may still reserve what the next posts
  // to its queue (until the reservation lapses): each drain has its own.
  const queueName = how.queue ??
    (round !== undefined
      ? `drain_round_${round}`
      : latencyMs === undefined
      ? `drain_${concurrency ?? "default"}`
      : `drain_plus_${latencyMs}_ms`);
  await postMany(rig, queueName, noOps(count));
  const proxy = latencyMs === undefined
    ? undefined
    : startQueueProxy(rig.server.url, { latencyMs });
  const extra: Env = {};
  if (concurrency !== undefined) extra.TASK_CONCURRENCY = String(concurrency);
  if (proxy !== undefined) extra.IRON_PORT = String(proxy.port);
  const worker = await startWorker(
    rig,
    queueName,
    extra,
    historyDb,
    how.catalog,
  ).catch(async (e) => {
    await proxy?.close();
    throw e;
  });
  let result: Throughput;
  try {
    const startedAt = performance.now();
    await worker.runner.until(count, 30_000 + count * 50);
    await waitFor(
      "the last deletes",
      async () => await queueSize(rig, queueName) === 0,
      30_000,
      1,
    );
    result = throughput(count, startedAt);
  } finally {
    // The worker first: its stop cuts its long-poll, which the proxy forwards.
    await worker.stop().finally(() => proxy?.close());
  }
  return { ...result, concurrency: worker.concurrency };
}

/** The drain with the run history (lib/runs.ts) on, against it off, side by side. */
export interface HistoryDrain {
  count: number;
  rounds: number;
  off: Throughput;
  on: Throughput;
  /** Throughput with the history ÷ without: the target is ≥ 0.9. */
  ratio: number;
}

/**
 * The same drain without and with a run history (a fresh file each time),
 * alternated (off, on, on, off, ...) so that a drift of the machine's load
 * weighs on both alike; the ratio is of their total times.
 */
async function measureHistoryDrain(
  rig: Rig,
  count: number,
  rounds = 3,
): Promise<HistoryDrain> {
  const seconds = { off: 0, on: 0 };
  for (let i = 0; i < rounds * 2; i++) {
    const on = (i % 4 === 1) || (i % 4 === 2);
    const drain = await measureDrain(rig, count, {
      historyDb: on ? `${rig.dir}/runs-${i}.sqlite` : undefined,
      round: i,
    });
    seconds[on ? "on" : "off"] += drain.seconds;
  }
  const total = count * rounds;
  const of = (s: number): Throughput => ({
    count: total,
    seconds: s,
    perSecond: total / s,
    msEach: s * 1000 / total,
  });
  return {
    count,
    rounds,
    off: of(seconds.off),
    on: of(seconds.on),
    ratio: seconds.off / seconds.on,
  };
}

// ---------------------------------------------------------------------------
// 1b. Limits (issue 19): catalog tasks with and without a concurrency limit
// ---------------------------------------------------------------------------

/** The same no-ops: TASK_COMMAND, a task without limits, one of `concurrency: 1`. */
export interface LimitsDrains {
  plain: Drain;
  free: Drain;
  /** At TASK_CONCURRENCY=1: the serial floor the limited task is compared with. */
  freeSerial: Drain;
  limited: Drain;
}

const limitCatalog = (limit: string) => `
default: job
tasks:
  job: {command: "true"${limit}}
`;

/**
 * Side by side on the same load: a task without limits drains as TASK_COMMAND
 * does; a task of `concurrency: 1` runs one at a time, and its cost per run
 * over a serial drain is what its lease (reserve, count, release) adds.
 */
async function measureLimits(rig: Rig, count: number): Promise<LimitsDrains> {
  const catalog = (queue: string, limit = "") => ({
    queue,
    catalog: limitCatalog(limit),
  });
  return {
    plain: await measureDrain(rig, count, { queue: "limits_plain" }),
    free: await measureDrain(rig, count, catalog("limits_free")),
    freeSerial: await measureDrain(rig, count, {
      concurrency: 1,
      ...catalog("limits_free_serial"),
    }),
    limited: await measureDrain(
      rig,
      count,
      catalog("limits_one", ", concurrency: 1"),
    ),
  };
}

// ---------------------------------------------------------------------------
// 2. Pickup latency: post, wait until it ran, pause, post the next
// ---------------------------------------------------------------------------

/** Lets the delete finish and the worker settle back into its long-poll. */
const IDLE_GAP_MS = 20;

async function measurePickup(rig: Rig, count: number): Promise<number[]> {
  const queueName = "pickup";
  const file = await newStampFile(rig, queueName);
  const worker = await startWorker(rig, queueName, {
    TASK_COMMAND: stampCommand(file),
  });
  const client = rig.client(queueName);
  const postedAt: number[] = [];
  try {
    await sleep(100); // its first reserve is waiting now
    for (let i = 0; i < count; i++) {
      postedAt.push(wallMs());
      await client.post(queueName, [stampBody(i)]);
      await worker.runner.until(i + 1, 10_000);
      await sleep(IDLE_GAP_MS);
    }
  } finally {
    await worker.stop();
  }
  return await latencies(file, postedAt);
}

// ---------------------------------------------------------------------------
// 3. Memory: the worker as its own process, /proc/<pid>/status sampled
// ---------------------------------------------------------------------------

export interface Memory {
  /** Messages in each drain. */
  messages: number;
  /** MB, idle after a warm-up. */
  startMb: number;
  /** MB, the highest VmRSS sampled while draining. */
  sampledPeakMb: number;
  /** MB, the kernel's high-water mark (VmHWM) at the end. */
  peakMb: number;
  /** MB, idle after each drain and the settle time. */
  afterMb: number[];
  /** The first drain. */
  drain: Throughput;
}

/**
 * Drains in the memory measure. Growth is judged from the first to the last:
 * V8's one-time heap growth is in the first already, while garbage that
 * outlives the young generation, or a leak, keeps adding after it.
 */
const MEMORY_DRAINS = 3;

/** Samples VmRSS every `everyMs` until stopped (or the process is gone); resolves to the highest seen. */
function sampleRss(pid: number, everyMs: number) {
  let stopped = false;
  let peak = 0;
  const sampling = (async () => {
    while (!stopped) {
      try {
        peak = Math.max(peak, statusMb(pid, "VmRSS"));
      } catch {
        return;
      }
      await sleep(everyMs);
    }
  })();
  return {
    stop: async () => {
      stopped = true;
      await sampling;
      return peak;
    },
  };
}

/** The bench's settings for the worker process (and what Deno needs to find its cache). */
function workerProcessEnv(
  rig: Rig,
  queueName: string,
  extra: Env,
): Record<string, string> {
  const own = Deno.env.toObject();
  const settings: Env = {
    PATH: own.PATH,
    HOME: own.HOME,
    DENO_DIR: own.DENO_DIR,
    NO_COLOR: "1",
    ...workerEnv(rig, queueName, extra),
  };
  const env: Record<string, string> = {};
  for (const [name, value] of Object.entries(settings)) {
    if (value !== undefined) env[name] = value;
  }
  return env;
}

const repo = fileURLToPath(new URL("..", import.meta.url));

/** The worker through ./start with only the bench's settings. */
function spawnWorkerProcess(rig: Rig, queueName: string) {
  const env = workerProcessEnv(rig, queueName, { LOG_LEVEL: "warning" });
  return new Deno.Command(`${repo}/start`, {
    cwd: repo,
    clearEnv: true,
    env,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
}

/**
 * SIGTERM, and a second one (stop now, which cuts the idle long-poll) a moment
 * later; SIGKILL if it hangs. Returns what the worker printed.
 */
async function stopProcess(
  child: Deno.ChildProcess,
  output: Promise<Deno.CommandOutput>,
): Promise<string> {
  const signal = (name: Deno.Signal) => {
    try {
      child.kill(name);
    } catch {
      // already gone
    }
  };
  signal("SIGTERM");
  const timers = [
    setTimeout(() => signal("SIGTERM"), 200),
    setTimeout(() => signal("SIGKILL"), 15_000),
  ];
  const out = await output;
  timers.forEach(clearTimeout);
  const text = new TextDecoder().decode(out.stdout) +
    new TextDecoder().decode(out.stderr);
  return text.trim();
}

/** Drains of `count` with idle time after each, RSS read after each. */
async function measureMemory(
  rig: Rig,
  count: number,
  settleSeconds: number,
): Promise<Memory> {
  const queueName = "memory";
  const child = spawnWorkerProcess(rig, queueName);
  const output = child.output();
  let exited = false;
  child.status.then(() => exited = true);
  let sampler: ReturnType<typeof sampleRss> | undefined;
  const drain = async (bodies: string[]) => {
    const startedAt = performance.now();
    await postMany(rig, queueName, bodies);
    await waitFor(
      "a drain by the worker process",
      async () => {
        if (exited) throw new Error("the worker process exited");
        return await queueSize(rig, queueName) === 0;
      },
      60_000 + bodies.length * 50,
      20,
    );
    const result = throughput(bodies.length, startedAt);
    await sleep(settleSeconds * 1000);
    return result;
  };
  try {
    // More messages than channels: the warm-up opens every SSH connection.
    await drain(noOps(16));
    const startMb = statusMb(child.pid, "VmRSS");
    sampler = sampleRss(child.pid, 50);
    const drains: Throughput[] = [];
    const afterMb: number[] = [];
    for (let i = 0; i < MEMORY_DRAINS; i++) {
      drains.push(await drain(noOps(count)));
      afterMb.push(statusMb(child.pid, "VmRSS"));
    }
    return {
      messages: count,
      startMb,
      sampledPeakMb: await sampler.stop(),
      peakMb: statusMb(child.pid, "VmHWM"),
      afterMb,
      drain: drains[0],
    };
  } catch (e) {
    const said = await stopProcess(child, output);
    throw new Error(`${e instanceof Error ? e.message : e}; worker: ${said}`);
  } finally {
    await sampler?.stop();
    await stopProcess(child, output);
  }
}

// ---------------------------------------------------------------------------
// 4. The seed-style loop and the raw SSH floor, with ssh2 directly
// ---------------------------------------------------------------------------

function hostKeyOf(sshd: Sshd): Buffer {
  return Buffer.from(sshd.knownHostsLine.split(" ")[2], "base64");
}

function connectSsh(sshd: Sshd, noDelay: boolean): Promise<Client> {
  const expected = hostKeyOf(sshd);
  return connectTo({
    host: sshd.host,
    port: sshd.port,
    username: sshd.user,
    privateKey: Buffer.from(Deno.readFileSync(sshd.clientKeyFile)),
    hostVerifier: (key: Buffer) => key.equals(expected),
  }, noDelay);
}

function connectTo(
  target: Pick<
    ConnectConfig,
    "host" | "port" | "username" | "privateKey" | "hostVerifier"
  >,
  noDelay: boolean,
): Promise<Client> {
  return new Promise((resolve, reject) => {
    const client = new Client();
    let ready = false;
    client.on("ready", () => {
      ready = true;
      if (noDelay) client.setNoDelay(true);
      resolve(client);
    });
    client.on("error", (e: Error) => {
      if (!ready) reject(e);
    });
    client.connect({ ...target, readyTimeout: 15_000 });
  });
}

/** Ends the connection and waits until its socket closed. */
function endSsh(client: Client): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, 5_000);
    client.once("close", () => {
      clearTimeout(timer);
      resolve();
    });
    client.end();
  });
}

/** Runs one command on an open connection; resolves to its exit status. */
function execOnce(client: Client, command: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(
      () => reject(new Error(`${command}: no end within 30 s`)),
      30_000,
    );
    client.exec(command, (err, channel) => {
      if (err) {
        clearTimeout(timer);
        return reject(err);
      }
      let code = -1;
      channel.on("exit", (status: number | null) => code = status ?? -1);
      channel.on("close", () => {
        clearTimeout(timer);
        resolve(code);
      });
      channel.resume();
      channel.stderr.resume();
      channel.end();
    });
  });
}

interface SeedHooks {
  onSleep?(): void;
  onRan?(): void;
}

/**
 * The seed's loop: reserve one message; none, sleep; else open a new SSH
 * connection (key exchange and all), run the command, close, delete. Nagle's
 * algorithm stays on, as paramiko (under the seed's Fabric) leaves it; on a
 * fresh connection Linux still ACKs at once, so it costs nothing here.
 */
async function seedStyleLoop(
  rig: Rig,
  queueName: string,
  command: string,
  sleepMs: number,
  stop: AbortSignal,
  hooks: SeedHooks = {},
): Promise<void> {
  const client = rig.client(queueName);
  while (!stop.aborted) {
    let message;
    try {
      [message] = await client.reserve(1, 60, 0, stop);
    } catch (e) {
      if (stop.aborted) return;
      throw e;
    }
    if (message === undefined) {
      hooks.onSleep?.();
      await realClock.sleep(sleepMs, stop);
      continue;
    }
    const plan = planCommand(command, message.body);
    if (!plan.ok) throw new Error(plan.reason);
    const ssh = await connectSsh(rig.sshd, false);
    const status = await execOnce(ssh, plan.command).finally(() => endSsh(ssh));
    if (status !== 0) throw new Error(`${plan.command}: exit ${status}`);
    await client.delete(message.id, message.reservation_id);
    hooks.onRan?.();
  }
}

async function measureSeedThroughput(
  rig: Rig,
  count: number,
  sleepSeconds: number,
): Promise<Throughput> {
  const queueName = "seed_drain";
  await postMany(rig, queueName, noOps(count));
  const stop = new AbortController();
  let ran = 0;
  const startedAt = performance.now();
  const loop = seedStyleLoop(
    rig,
    queueName,
    "true",
    sleepSeconds * 1000,
    stop.signal,
    { onRan: () => ran++ },
  );
  try {
    await Promise.race([
      loop,
      waitFor(
        "the seed-style drain",
        () => ran >= count,
        60_000 + count * 5_000,
        10,
        stop.signal,
      ),
    ]);
    return throughput(count, startedAt);
  } finally {
    stop.abort();
    await loop;
  }
}

/**
 * Posts each message a chosen time after the loop fell asleep, spread evenly
 * over its sleep, so a few samples still show the average wait.
 */
async function measureSeedPickup(
  rig: Rig,
  count: number,
  sleepSeconds: number,
): Promise<number[]> {
  const queueName = "seed_pickup";
  const file = await newStampFile(rig, queueName);
  const client = rig.client(queueName);
  await client.ensureQueue();
  const sleepMs = sleepSeconds * 1000;
  const stop = new AbortController();
  let sleeps = 0;
  let asleepSince = 0;
  let ran = 0;
  const loop = seedStyleLoop(
    rig,
    queueName,
    stampCommand(file),
    sleepMs,
    stop.signal,
    {
      onSleep: () => {
        sleeps++;
        asleepSince = performance.now();
      },
      onRan: () => ran++,
    },
  );
  const postedAt: number[] = [];
  const sample = async (i: number) => {
    const limit = sleepMs + 30_000;
    await waitFor("the loop to sleep", () => sleeps > i, limit, 5, stop.signal);
    const phase = sleepMs * (i + 0.5) / count;
    await sleep(asleepSince + phase - performance.now());
    postedAt.push(wallMs());
    await client.post(queueName, [stampBody(i)]);
    await waitFor("the seed-style run", () => ran > i, limit, 5, stop.signal);
  };
  try {
    for (let i = 0; i < count; i++) await Promise.race([loop, sample(i)]);
  } finally {
    stop.abort();
    await loop;
  }
  return await latencies(file, postedAt);
}

export interface Floor {
  /** ms per `true`, one at a time on one open connection. */
  sequentialMs: number;
  /** exec call to remote start of the stamp command, one at a time. */
  pickups: number[];
  /** ms per `true` with 8 in flight over 2 connections (4 channels each). */
  parallelMs: number;
  parallelPerSecond: number;
}

/** `total` execs of `true` shared by lanes, each lane on its own connection slot. */
async function execLanes(
  connections: Client[],
  lanes: number,
  total: number,
): Promise<number> {
  let left = total;
  const lane = async (client: Client) => {
    while (left > 0) {
      left--;
      const status = await execOnce(client, "true");
      if (status !== 0) throw new Error(`true: exit ${status}`);
    }
  };
  const startedAt = performance.now();
  await Promise.all(
    Array.from(
      { length: lanes },
      (_, i) => lane(connections[i % connections.length]),
    ),
  );
  return (performance.now() - startedAt) / total;
}

/** The SSH and fork share of the pickup latency: exec call to remote start. */
async function execPickups(
  rig: Rig,
  client: Client,
  count: number,
): Promise<number[]> {
  const file = await newStampFile(rig, "floor");
  const command = stampCommand(file);
  const calledAt: number[] = [];
  for (let i = 0; i < count; i++) {
    calledAt.push(wallMs());
    await execOnce(client, `${command} ${i}`);
    await sleep(IDLE_GAP_MS);
  }
  return await latencies(file, calledAt);
}

async function measureFloor(
  rig: Rig,
  count: number,
  pickups: number,
): Promise<Floor> {
  const connections = await Promise.all([
    connectSsh(rig.sshd, true),
    connectSsh(rig.sshd, true),
  ]);
  try {
    await execLanes(connections, 8, 16); // warm-up
    const parallelMs = await execLanes(connections, 8, count);
    const pickupMs = await execPickups(rig, connections[0], pickups);
    // Last, so that the drain at concurrency 1, compared with it, comes next.
    const sequentialMs = await execLanes(connections.slice(0, 1), 1, count);
    return {
      sequentialMs,
      pickups: pickupMs,
      parallelMs,
      parallelPerSecond: 1000 / parallelMs,
    };
  } finally {
    await Promise.all(connections.map(endSsh));
  }
}

// ---------------------------------------------------------------------------
// 5. The queue server's own micro-measure
// ---------------------------------------------------------------------------

async function measureQueueBatches(
  rig: Rig,
  count: number,
): Promise<Throughput> {
  const queueName = "mq_batches";
  const client = rig.client(queueName);
  await postMany(rig, queueName, noOps(count));
  const startedAt = performance.now();
  for (let done = 0; done < count;) {
    const messages = await client.reserve(100, 60, 0);
    if (messages.length === 0) throw new Error(`queue empty after ${done}`);
    await client.deleteBatch(
      messages.map((m) => ({ id: m.id, reservation_id: m.reservation_id })),
    );
    done += messages.length;
  }
  return throughput(count, startedAt);
}

/** Post-to-reply time of a reserve already waiting on an empty queue. */
async function measureWakeUps(rig: Rig, count: number): Promise<number[]> {
  const queueName = "mq_wake";
  const client = rig.client(queueName);
  await client.ensureQueue();
  const samples: number[] = [];
  for (let i = 0; i < count; i++) {
    const waiting = client.reserve(1, 60, 5);
    await sleep(20); // the reserve is parked in the server's long-poll by now
    const postedAt = performance.now();
    const posting = client.post(queueName, ["wake"]);
    const [message] = await waiting;
    samples.push(performance.now() - postedAt);
    await posting;
    if (message === undefined) throw new Error("the long-poll woke empty");
    await client.delete(message.id, message.reservation_id);
  }
  return samples;
}

// ---------------------------------------------------------------------------
// 6. Many hosts: `true` on every one of N loopback hosts at once, by the raw
//    ssh2 floor, the worker process, Fabric, pssh and Ansible, side by side
// ---------------------------------------------------------------------------

/** Samples in ms, or why they are missing (a tool not installed, a failure). */
type Samples = number[] | { skipped: string };

export interface HostsFanOut {
  hosts: number;
  /** Connect to every host at once and exec `true` on each (ms, one per cold run). */
  floorCold: number[];
  /** `true` on every host at once over the open connections (ms). */
  floorWarm: number[];
  /** The worker process: post → result of its first message after a start (ms, one per start). */
  workerCold: Samples;
  /** Later messages, one at a time (ms). */
  workerWarm: Samples;
  /** SSH connections to the hosts open when each cold message was posted. */
  openBeforeCold: number[];
  /** Wall time of the whole tool run, its start included (ms). */
  fabric: Samples;
  pssh: Samples;
  ansible: Samples;
  rss?: HostsRss | { skipped: string };
}

interface HostsRss {
  /** Connections per host the worker is configured for. */
  perHost: number;
  /** The most SSH connections to the hosts seen open at once. */
  openSeen: number;
  /** MB, the kernel's high-water mark (VmHWM) at the end. */
  peakMb: number;
  sampledPeakMb: number;
}

/** After its start line, the worker checks its settings and parks its first long-poll. */
const WORKER_SETTLE_MS = 1_000;

/** Waiting for one fan-out's result (or several at once). */
const RESULT_TIMEOUT_MS = 60_000;

/** Where an executable named `name` is on PATH, or undefined. */
function onPath(name: string): string | undefined {
  for (const dir of (Deno.env.get("PATH") ?? "").split(":")) {
    if (dir === "") continue;
    try {
      const stat = Deno.statSync(`${dir}/${name}`);
      if (stat.isFile && ((stat.mode ?? 0) & 0o111) !== 0) {
        return `${dir}/${name}`;
      }
    } catch {
      // not here
    }
  }
  return undefined;
}

/** Open TCP connections whose local port is `port`: sshd's side of each SSH connection. */
function openConnections(port: number): number {
  const hex = port.toString(16).toUpperCase().padStart(4, "0");
  return Deno.readTextFileSync("/proc/net/tcp").split("\n").filter((line) => {
    const fields = line.trim().split(/\s+/);
    return fields[1]?.endsWith(`:${hex}`) && fields[3] === "01";
  }).length;
}

// The raw floor: ssh2 in-process, every host at once

async function connectAll(h: LoopbackHosts): Promise<Client[]> {
  const privateKey = Buffer.from(await Deno.readFile(h.clientKeyFile));
  const known = parseKnownHosts(await Deno.readTextFile(h.knownHostsFile));
  const settled = await Promise.allSettled(h.hosts.map((host) =>
    connectTo({
      host,
      port: h.port,
      username: h.user,
      privateKey,
      hostVerifier: (key: Buffer) =>
        checkHostKey(known, host, h.port, key) === "match",
    }, true)
  ));
  const clients = settled.flatMap((s) =>
    s.status === "fulfilled" ? [s.value] : []
  );
  const failed = settled.find((s) => s.status === "rejected");
  if (failed) {
    await Promise.all(clients.map(endSsh));
    throw new Error(`floor: connecting failed: ${errorText(failed.reason)}`);
  }
  return clients;
}

/** `true` on every connection at once; resolves to the ms until the last ended. */
async function execAll(clients: Client[]): Promise<number> {
  const startedAt = performance.now();
  const codes = await Promise.all(clients.map((c) => execOnce(c, "true")));
  if (codes.some((code) => code !== 0)) {
    throw new Error(`floor: true exited ${codes.join(",")}`);
  }
  return performance.now() - startedAt;
}

async function floorCold(h: LoopbackHosts): Promise<number> {
  const startedAt = performance.now();
  const clients = await connectAll(h);
  try {
    await execAll(clients);
    return performance.now() - startedAt;
  } finally {
    await Promise.all(clients.map(endSsh));
  }
}

async function floorWarm(h: LoopbackHosts, rounds: number): Promise<number[]> {
  const clients = await connectAll(h);
  try {
    await execAll(clients); // the first channel on a connection costs more
    const samples: number[] = [];
    for (let i = 0; i < rounds; i++) {
      samples.push(await execAll(clients));
      await sleep(IDLE_GAP_MS);
    }
    return samples;
  } finally {
    await Promise.all(clients.map(endSsh));
  }
}

// The worker as a process through ./start, SSH_HOST a comma list

interface HostsWorker {
  process: Collected;
  /** Posts `bodies` at once; resolves to the ms from the post to the last result. */
  fanOut(bodies: string[]): Promise<number>;
  stop(): Promise<void>;
}

/** Checks a result: SUCCESS, and a host entry for every host. */
function checkFanOutResult(body: string, hosts: string[]): void {
  let result: unknown;
  try {
    result = JSON.parse(body);
  } catch {
    // reported below
  }
  const ran = isRecord(result) && isRecord(result.hosts)
    ? Object.keys(result.hosts)
    : [];
  const ok = isRecord(result) && result.status === "SUCCESS" &&
    hosts.every((host) => ran.includes(host));
  if (!ok) {
    throw new Error(
      `the result is not SUCCESS on all ${hosts.length} hosts: ${
        body.slice(0, 600)
      }`,
    );
  }
}

async function startHostsWorker(
  rig: Rig,
  h: LoopbackHosts,
  queueName: string,
  extra: Env,
): Promise<HostsWorker> {
  const resultsQueue = `${queueName}_results`;
  const results = rig.client(resultsQueue);
  await results.ensureQueue();
  await rig.client(queueName).ensureQueue();
  const env = workerProcessEnv(rig, queueName, {
    SSH_HOST: h.hosts.join(","),
    SSH_PORT: String(h.port),
    SSH_USER: h.user,
    SSH_KEY_FILE: h.clientKeyFile,
    SSH_KNOWN_HOSTS: h.knownHostsFile,
    TASK_HOST_PARALLELISM: String(h.hosts.length),
    TASK_RESULTS_QUEUE: resultsQueue,
    ...extra,
  });
  const process = spawnCollecting(`${repo}/start`, [], env, repo);
  const said = () => process.lines.slice(-15).join("\n  ");
  const exited = process.child.status.then((status) => {
    throw new Error(`the worker exited (${status.code}):\n  ${said()}`);
  });
  exited.catch(() => {}); // raced below; an exit after the stop is expected
  const stop = async () => {
    // The second signal, a second later, cuts the idle long-poll.
    const timers = [
      setTimeout(() => signal(process.child, "SIGTERM"), 1_100),
      setTimeout(() => signal(process.child, "SIGKILL"), 15_000),
    ];
    await process.stop("SIGTERM");
    timers.forEach(clearTimeout);
  };
  const fanOut = async (bodies: string[]) => {
    const collected = (async () => {
      const deadline = performance.now() + RESULT_TIMEOUT_MS;
      let lastAt = 0;
      const got: Awaited<ReturnType<IronMqClient["reserve"]>> = [];
      while (got.length < bodies.length) {
        const wait = Math.ceil((deadline - performance.now()) / 1000);
        if (wait <= 0) {
          throw new Error(
            `${got.length} of ${bodies.length} results within ${RESULT_TIMEOUT_MS} ms`,
          );
        }
        const messages = await results.reserve(
          bodies.length - got.length,
          60,
          Math.min(wait, 30),
        );
        lastAt = performance.now();
        got.push(...messages);
      }
      for (const m of got) checkFanOutResult(m.body, h.hosts);
      await results.deleteBatch(
        got.map((m) => ({ id: m.id, reservation_id: m.reservation_id })),
      );
      return lastAt;
    })();
    await sleep(20); // the results long-poll is parked in the server by now
    const postedAt = performance.now();
    await rig.client(queueName).post(queueName, bodies);
    const lastAt = await Promise.race([collected, exited]);
    return lastAt - postedAt;
  };
  try {
    await Promise.race([process.line(/worker: queue /, 60_000), exited]);
    await Promise.race([sleep(WORKER_SETTLE_MS), exited]);
  } catch (e) {
    await stop();
    throw e;
  }
  return {
    process,
    fanOut: async (bodies) => {
      try {
        return await fanOut(bodies);
      } catch (e) {
        throw new Error(`${errorText(e)}\n  worker said:\n  ${said()}`);
      }
    },
    stop,
  };
}

function signal(child: Deno.ChildProcess, name: Deno.Signal) {
  try {
    child.kill(name);
  } catch {
    // already gone
  }
}

/** One worker start: its first message (cold), then `warm` more one at a time. */
async function workerRun(
  rig: Rig,
  h: LoopbackHosts,
  warm: number,
): Promise<{ cold: number; openBefore: number; warm: number[] }> {
  const worker = await startHostsWorker(rig, h, "hosts", {
    TASK_COMMAND: "true",
  });
  try {
    const openBefore = openConnections(h.port);
    const cold = await worker.fanOut(["fan-out"]);
    const warmMs: number[] = [];
    for (let i = 0; i < warm; i++) {
      await sleep(IDLE_GAP_MS);
      warmMs.push(await worker.fanOut(["fan-out"]));
    }
    return { cold, openBefore, warm: warmMs };
  } finally {
    await worker.stop();
  }
}

/**
 * `perHost` messages of `sleep 1` at once, twice (the second time over the
 * connections the first opened), with TASK_CONCURRENCY=perHost and one
 * channel per connection: perHost connections to every host.
 */
async function measureHostsRss(
  rig: Rig,
  h: LoopbackHosts,
  perHost: number,
): Promise<HostsRss> {
  const worker = await startHostsWorker(rig, h, "hosts_rss", {
    TASK_COMMAND: "sleep 1",
    TASK_CONCURRENCY: String(perHost),
    SSH_CHANNELS_PER_CONNECTION: "1",
  });
  const pid = worker.process.child.pid;
  const sampler = sampleRss(pid, 50);
  let openSeen = 0;
  let counting = true;
  const count = (async () => {
    while (counting) {
      openSeen = Math.max(openSeen, openConnections(h.port));
      await sleep(100);
    }
  })();
  try {
    const bodies = Array.from({ length: perHost }, () => "sleep");
    for (let round = 0; round < 2; round++) await worker.fanOut(bodies);
    return {
      perHost,
      openSeen,
      peakMb: statusMb(pid, "VmHWM"),
      sampledPeakMb: await sampler.stop(),
    };
  } finally {
    counting = false;
    await count;
    await sampler.stop();
    await worker.stop();
  }
}

// Fabric, pssh and Ansible, each a process timed from its start to its end

async function timed(
  what: string,
  command: string,
  args: string[],
  options: { env?: Record<string, string>; check?: (stdout: string) => void } =
    {},
): Promise<number> {
  const startedAt = performance.now();
  const out = await new Deno.Command(command, {
    args,
    env: options.env,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  const ms = performance.now() - startedAt;
  const stdout = new TextDecoder().decode(out.stdout);
  if (!out.success) {
    const stderr = new TextDecoder().decode(out.stderr);
    throw new Error(
      `${what} exited ${out.code}: ${(stderr + stdout).trim().slice(-600)}`,
    );
  }
  options.check?.(stdout);
  return ms;
}

/** Fabric 2's ThreadingGroup, host keys from the hosts' known_hosts file only. */
const FABRIC_SCRIPT = `
import sys, fabric, paramiko
hosts, port, user, key, known = sys.argv[1].split(","), int(sys.argv[2]), *sys.argv[3:6]
group = fabric.ThreadingGroup(*hosts, user=user, port=port, connect_kwargs={
    "key_filename": key, "look_for_keys": False, "allow_agent": False})
for c in group:
    c.client.load_host_keys(known)
    c.client.set_missing_host_key_policy(paramiko.RejectPolicy())
results = group.run("true", hide=True)
print(sum(1 for r in results.values() if r.ok))
`;

/** The first python3 that imports fabric (PATH's may be another Python than Debian's). */
async function fabricPython(): Promise<string | { skipped: string }> {
  for (const python of ["python3", "/usr/bin/python3"]) {
    const probe = await new Deno.Command(python, {
      args: ["-c", "import fabric"],
      stdout: "null",
      stderr: "null",
    }).output().catch(() => undefined);
    if (probe?.success) return python;
  }
  return {
    skipped: "no python3 imports fabric (apt-get install python3-fabric)",
  };
}

const countIs = (what: string, expected: number) => (stdout: string) => {
  const got = Number(stdout.trim().split("\n").pop());
  if (got !== expected) {
    throw new Error(`${what}: ${got} of ${expected} hosts ok:\n${stdout}`);
  }
};

async function fabricRun(python: string, h: LoopbackHosts): Promise<number> {
  return await timed("fabric", python, [
    "-c",
    FABRIC_SCRIPT,
    h.hosts.join(","),
    String(h.port),
    h.user,
    h.clientKeyFile,
    h.knownHostsFile,
  ], { check: countIs("fabric", h.hosts.length) });
}

/** OpenSSH client options shared by pssh and Ansible: this key and these host keys only. */
function sshOptions(h: LoopbackHosts): string[] {
  return [
    `UserKnownHostsFile=${h.knownHostsFile}`,
    "StrictHostKeyChecking=yes",
    "BatchMode=yes",
    `IdentityFile=${h.clientKeyFile}`,
    "IdentitiesOnly=yes",
  ];
}

async function psshRun(
  tool: string,
  h: LoopbackHosts,
  dir: string,
): Promise<number> {
  const hostsFile = `${dir}/pssh_hosts`;
  await Deno.writeTextFile(hostsFile, h.hosts.join("\n") + "\n");
  // Exit 0 only when every host's command exited 0.
  return await timed("parallel-ssh", tool, [
    "-p",
    String(h.hosts.length),
    "-h",
    hostsFile,
    "-l",
    h.user,
    "-t",
    "60",
    "-X",
    "-p",
    "-X",
    String(h.port),
    ...sshOptions(h).flatMap((o) => ["-O", o]),
    "true",
  ]);
}

/**
 * Ansible's ad-hoc command module, with its own empty config, its own
 * folders, and Debian's Python named (no interpreter discovery). Its SSH
 * control masters (ControlPersist, as by default) are told to exit after.
 */
async function ansibleRun(
  tool: string,
  h: LoopbackHosts,
  dir: string,
): Promise<number> {
  const home = await Deno.makeTempDir({ dir, prefix: "ansible-" });
  const controls = `${home}/cp`;
  const inventory = `${home}/inventory`;
  const sshArgs = sshOptions(h).map((o) => `-o ${o}`).join(" ");
  await Deno.writeTextFile(`${home}/ansible.cfg`, "");
  await Deno.writeTextFile(
    inventory,
    [
      "[all:vars]",
      `ansible_port=${h.port}`,
      `ansible_user=${h.user}`,
      "ansible_python_interpreter=/usr/bin/python3",
      `ansible_ssh_common_args='${sshArgs}'`,
      "[all]",
      ...h.hosts,
    ].join("\n") + "\n",
  );
  try {
    return await timed(
      "ansible",
      tool,
      ["all", "-i", inventory, "-f", String(h.hosts.length), "-m", "command"]
        .concat(["-a", "true"]),
      {
        env: {
          ANSIBLE_CONFIG: `${home}/ansible.cfg`,
          ANSIBLE_HOME: home,
          ANSIBLE_LOCAL_TEMP: `${home}/tmp`,
          ANSIBLE_SSH_CONTROL_PATH_DIR: controls,
          ANSIBLE_NOCOLOR: "1",
        },
        check: (stdout) =>
          countIs("ansible", h.hosts.length)(
            String(
              stdout.split("\n").filter((l) => / \| CHANGED /.test(l)).length,
            ),
          ),
      },
    );
  } finally {
    const masters: string[] = [];
    try {
      for await (const entry of Deno.readDir(controls)) {
        masters.push(`${controls}/${entry.name}`);
      }
    } catch {
      // none started
    }
    for (const master of masters) {
      await new Deno.Command("ssh", {
        args: ["-o", `ControlPath=${master}`, "-O", "exit", "x"],
        stdout: "null",
        stderr: "null",
      }).output();
    }
  }
}

/** `samples` with one more, or why not: a failure is kept as the reason. */
async function addSample(
  samples: Samples,
  measure: () => Promise<number>,
): Promise<Samples> {
  if (!Array.isArray(samples)) return samples;
  try {
    return [...samples, await measure()];
  } catch (e) {
    return { skipped: `failed: ${errorText(e)}` };
  }
}

async function measureHosts(rig: Rig, sizes: Sizes): Promise<HostsFanOut> {
  const h = await startLoopbackHosts(sizes.hosts);
  try {
    const python = await fabricPython();
    const pssh = onPath("parallel-ssh") ?? onPath("pssh");
    const ansible = onPath("ansible");
    const r: HostsFanOut = {
      hosts: h.hosts.length,
      floorCold: [],
      floorWarm: await floorWarm(h, sizes.hostWarm),
      workerCold: [],
      workerWarm: [],
      openBeforeCold: [],
      fabric: typeof python === "string" ? [] : python,
      pssh: pssh === undefined
        ? { skipped: "parallel-ssh not found (apt-get install pssh)" }
        : [],
      // Not asked for comes first: whether it is installed does not matter then.
      ansible: sizes.ansible === 0
        ? { skipped: "not run (--ansible=0)" }
        : ansible === undefined
        ? { skipped: "ansible not found (apt-get install ansible-core)" }
        : [],
    };
    // Cold runs in rounds, each contender once a round, so drift hits all alike.
    for (let round = 0; round < Math.max(1, sizes.hostCold); round++) {
      r.floorCold.push(await floorCold(h));
      if (Array.isArray(r.workerCold) && Array.isArray(r.workerWarm)) {
        try {
          const run = await workerRun(rig, h, round === 0 ? sizes.hostWarm : 0);
          r.workerCold.push(run.cold);
          r.workerWarm.push(...run.warm);
          r.openBeforeCold.push(run.openBefore);
        } catch (e) {
          r.workerCold = r.workerWarm = { skipped: `failed: ${errorText(e)}` };
        }
      }
      if (typeof python === "string") {
        r.fabric = await addSample(r.fabric, () => fabricRun(python, h));
      }
      if (pssh !== undefined) {
        r.pssh = await addSample(r.pssh, () => psshRun(pssh, h, rig.dir));
      }
    }
    // Last of the cold ones: it takes half a minute.
    for (let i = 0; ansible !== undefined && i < sizes.ansible; i++) {
      r.ansible = await addSample(
        r.ansible,
        () => ansibleRun(ansible, h, rig.dir),
      );
    }
    if (sizes.hostConnections > 0) {
      try {
        r.rss = await measureHostsRss(rig, h, sizes.hostConnections);
      } catch (e) {
        r.rss = { skipped: `failed: ${errorText(e)}` };
      }
    }
    return r;
  } finally {
    await h.stop();
  }
}

// ---------------------------------------------------------------------------
// All measures, in one run
// ---------------------------------------------------------------------------

export interface Results {
  date: Date;
  nproc: string;
  loadBefore: number[];
  loadAfter: number[];
  options: BenchOptions;
  queueBatches?: Throughput;
  wakeUps?: number[];
  floor?: Floor;
  drain?: Drain;
  drainSerial?: Drain;
  historyDrain?: HistoryDrain;
  limits?: LimitsDrains;
  /** The far-away drains measured, nearest first. */
  wanDrains: WanDrain[];
  pickups?: number[];
  memory?: Memory;
  seed?: Throughput;
  seedPickups?: number[];
  hosts?: HostsFanOut;
  follow?: FollowPosts;
}

export async function runBench(
  options: BenchOptions,
  progress: (line: string) => void = () => {},
): Promise<Results> {
  const { sizes } = options;
  const results: Results = {
    date: new Date(),
    nproc: (await run("nproc", [])).trim(),
    loadBefore: Deno.loadavg(),
    loadAfter: [],
    options,
    wanDrains: [],
  };
  const rig = await startRig();
  const step = async <T>(
    what: string,
    size: number,
    measure: () => Promise<T>,
  ) => {
    if (size === 0) return undefined;
    const startedAt = performance.now();
    progress(`${what}…`);
    const result = await measure();
    progress(`${what}: ${n((performance.now() - startedAt) / 1000, 1)} s`);
    return result;
  };
  try {
    results.queueBatches = await step(
      "queue: reserve+delete in batches",
      sizes.mq,
      () => measureQueueBatches(rig, sizes.mq),
    );
    results.wakeUps = await step(
      "queue: long-poll wake-ups",
      sizes.wakes,
      () => measureWakeUps(rig, sizes.wakes),
    );
    results.floor = await step(
      "raw ssh2 floor",
      sizes.floor,
      () => measureFloor(rig, sizes.floor, sizes.pickups),
    );
    results.drainSerial = await step(
      "drain at concurrency 1",
      sizes.drain,
      () => measureDrain(rig, sizes.drain, { concurrency: 1 }),
    );
    results.drain = await step(
      "drain at the default concurrency",
      sizes.drain,
      () => measureDrain(rig, sizes.drain),
    );
    results.limits = await step(
      "drain: TASK_COMMAND, a task without limits, one of concurrency: 1",
      sizes.drain,
      () => measureLimits(rig, Math.ceil(sizes.drain / 4)),
    );
    // Right after the loopback drain they are compared with, on the same load.
    for (const { latencyMs, size, targetShare } of WAN_DRAINS) {
      const drain = await step(
        `drain with +${latencyMs} ms queue latency`,
        sizes[size],
        () => measureDrain(rig, sizes[size], { latencyMs }),
      );
      if (drain) results.wanDrains.push({ ...drain, latencyMs, targetShare });
    }
    results.historyDrain = await step(
      "drain with the run history, and without",
      sizes.drain,
      () => measureHistoryDrain(rig, sizes.drain),
    );
    results.pickups = await step(
      "pickup latency",
      sizes.pickups,
      () => measurePickup(rig, sizes.pickups),
    );
    results.memory = await step(
      "worker process memory",
      sizes.rss,
      () => measureMemory(rig, sizes.rss, sizes.settle),
    );
    results.seed = await step(
      "seed-style drain",
      sizes.baseline,
      () => measureSeedThroughput(rig, sizes.baseline, sizes.baselineSleep),
    );
    results.seedPickups = await step(
      "seed-style pickup",
      sizes.baselinePickups,
      () => measureSeedPickup(rig, sizes.baselinePickups, sizes.baselineSleep),
    );
    results.hosts = await step(
      `${sizes.hosts} hosts: floor, worker, Fabric, pssh, Ansible`,
      sizes.hosts,
      () => measureHosts(rig, sizes),
    );
    results.follow = await step(
      "followed runs' stream posts",
      sizes.follow,
      () => measureFollowPosts(rig, sizes.follow),
    );
  } finally {
    await rig.stop();
  }
  results.loadAfter = Deno.loadavg();
  return results;
}

// ---------------------------------------------------------------------------
// 7. Followed runs (send --follow): the reply queue posts the stream adds
// ---------------------------------------------------------------------------

export interface FollowPosts {
  /** Lines of the flood, and the stream posts (STARTED and OUTPUT) it made. */
  floodLines: number;
  floodPosts: number;
  floodMs: number;
  /** Of the flood's lines: those the posts carried, and those they said were dropped. */
  floodStreamed: number;
  floodDropped: number;
  /** A paced run: a line every 10 ms for 2 s. */
  pacedLines: number;
  pacedPosts: number;
  pacedMs: number;
  /** The same paced run, not followed (run first, while the worker starts): its posts besides the result. */
  unfollowedPosts: number;
}

/**
 * The worker process (./start, with a catalog) runs three messages with a
 * reply queue each: a flood of `lines` printed at once and a paced run, both
 * with "stream": true, and the paced run without. Each reply queue's size,
 * once the message is deleted (the result is posted before the delete), less
 * the result, is what the stream posted.
 */
async function measureFollowPosts(
  rig: Rig,
  lines: number,
): Promise<FollowPosts> {
  const queueName = "follow";
  const catalog = `${rig.dir}/follow.yaml`;
  await Deno.writeTextFile(
    catalog,
    `tasks:
  flood:
    command: "seq 1 ${lines} | sed 's/^/line /'"
  paced:
    command: "i=0; while [ $i -lt 200 ]; do echo paced $i; sleep 0.01; i=$((i+1)); done"
`,
  );
  const env = workerProcessEnv(rig, queueName, {
    LOG_LEVEL: "warning",
    TASKS_FILE: catalog,
  });
  const worker = spawnCollecting(`${repo}/start`, [], env, repo);
  const client = rig.client(queueName);
  try {
    await client.ensureQueue();
    const postsOf = async (task: string, stream: boolean) => {
      const reply = `follow_${task}_${stream}`;
      const startedAt = performance.now();
      await client.post(queueName, [JSON.stringify({
        id: crypto.randomUUID(),
        task,
        reply_to: reply,
        stream,
      })]);
      await waitFor(
        `the ${task} run settled`,
        async () => await queueSize(rig, queueName) === 0,
        120_000,
        5,
      );
      const ms = performance.now() - startedAt;
      let streamed = 0;
      let dropped = 0;
      for (const m of await client.peek(reply, 100)) {
        const event = JSON.parse(m.body);
        streamed += event.lines?.length ?? 0;
        dropped += event.dropped ?? 0;
      }
      return { posts: await queueSize(rig, reply) - 1, ms, streamed, dropped };
    };
    // The unfollowed one first: it waits for the worker's start.
    const unfollowed = await postsOf("paced", false);
    const flood = await postsOf("flood", true);
    const paced = await postsOf("paced", true);
    return {
      floodLines: lines,
      floodPosts: flood.posts,
      floodMs: flood.ms,
      floodStreamed: flood.streamed,
      floodDropped: flood.dropped,
      pacedLines: 200,
      pacedPosts: paced.posts,
      pacedMs: paced.ms,
      unfollowedPosts: unfollowed.posts,
    };
  } finally {
    await worker.stop();
  }
}

// ---------------------------------------------------------------------------
// The table
// ---------------------------------------------------------------------------

export interface Row {
  measure: string;
  figure: string;
  target: string;
  verdict: "pass" | "MISS" | "";
}

/** RSS after the last drain may be this much above that after the first and count as no growth. */
const GROWTH_ALLOWANCE_MB = 5;

const n = (value: number, digits = 0) =>
  value.toLocaleString("en-US", {
    minimumFractionDigits: digits,
    maximumFractionDigits: digits,
  });

const check = (ok: boolean): Row["verdict"] => ok ? "pass" : "MISS";

const info = (measure: string, figure: string): Row => ({
  measure,
  figure,
  target: "",
  verdict: "",
});

export function tableRows(r: Results): Row[] {
  const s = r.options.sizes;
  const rows: Row[] = [];
  if (r.drain) {
    rows.push(info(
      `1. drain ${n(s.drain)} no-ops, concurrency ${r.drain.concurrency}`,
      `${n(r.drain.perSecond)} msg/s`,
    ));
  }
  if (r.drainSerial) {
    rows.push(info(
      `1. drain ${n(s.drain)} no-ops, concurrency 1`,
      `${n(r.drainSerial.perSecond)} msg/s (${
        n(r.drainSerial.msEach, 2)
      } ms each)`,
    ));
  }
  if (r.limits) {
    const { plain, free, freeSerial, limited } = r.limits;
    const share = free.perSecond / plain.perSecond;
    rows.push({
      measure: `1b. drain ${n(free.count)} no-ops, a task without limits`,
      figure: `${n(free.perSecond)} msg/s (${n(share, 2)}× TASK_COMMAND's ${
        n(plain.perSecond)
      })`,
      target: "≈ 1× (within noise)",
      verdict: check(share >= 0.8),
    });
    rows.push(info(
      `1b. drain ${n(limited.count)} no-ops, a task of concurrency: 1`,
      `${n(limited.perSecond)} msg/s (${n(limited.msEach, 2)} ms each; ${
        n(limited.msEach - freeSerial.msEach, 2)
      } ms a run over a serial drain's ${n(freeSerial.msEach, 2)})`,
    ));
  }
  for (const wan of r.wanDrains) {
    const measure = `1. drain ${
      n(wan.count)
    } no-ops, concurrency ${wan.concurrency}, +${wan.latencyMs} ms queue latency`;
    const rate = `${n(wan.perSecond)} msg/s`;
    if (!r.drain) {
      rows.push(info(measure, rate));
      continue;
    }
    const share = wan.perSecond / r.drain.perSecond;
    rows.push({
      measure,
      figure: `${rate} (${n(share, 2)}× loopback)`,
      target: `≥ ${wan.targetShare}× loopback`,
      verdict: check(share >= wan.targetShare),
    });
  }
  if (r.historyDrain) {
    const h = r.historyDrain;
    rows.push({
      measure: `1. drain ${
        n(h.count)
      } no-ops with the run history ÷ without (${h.rounds} each, alternated)`,
      figure: `${n(h.ratio, 2)}× (${n(h.on.perSecond)} vs ${
        n(h.off.perSecond)
      } msg/s)`,
      target: "≥ 0.9×",
      verdict: check(h.ratio >= 0.9),
    });
  }
  if (r.pickups) {
    const p50 = percentile(r.pickups, 50);
    const p99 = percentile(r.pickups, 99);
    rows.push({
      measure: `2. pickup post→remote start, p50 (${r.pickups.length} msgs)`,
      figure: `${n(p50, 2)} ms`,
      target: "≤ 5 ms",
      verdict: check(p50 <= 5),
    }, {
      measure: "2. pickup p99",
      figure: `${n(p99, 2)} ms (max ${n(Math.max(...r.pickups), 2)})`,
      target: "≤ 25 ms",
      verdict: check(p99 <= 25),
    });
    // The stamp itself (sshd's session, sh, a fork of date) is in both figures.
    if (r.floor && r.floor.pickups.length > 0) {
      rows.push(info(
        "2. pickup p50 less the floor's exec→stamp p50 (worker + queue)",
        `${n(p50 - percentile(r.floor.pickups, 50), 2)} ms`,
      ));
    }
  }
  if (r.memory) {
    const m = r.memory;
    const growth = m.afterMb[m.afterMb.length - 1] - m.afterMb[0];
    rows.push(
      info(
        `3. worker process (./start): RSS idle after warm-up`,
        `${n(m.startMb, 1)} MB`,
      ),
      {
        measure: `3. peak RSS, ${m.afterMb.length} drains of ${
          n(m.messages)
        } (VmHWM)`,
        figure: `${n(m.peakMb, 1)} MB (sampled ${n(m.sampledPeakMb, 1)})`,
        target: "≤ 120 MB",
        verdict: check(m.peakMb <= 120),
      },
      {
        measure: `3. RSS ${s.settle} s after each drain; last less first`,
        figure: `${m.afterMb.map((mb) => n(mb, 1)).join(" → ")} MB (${
          growth >= 0 ? "+" : ""
        }${n(growth, 1)})`,
        target: `no growth (≤ +${GROWTH_ALLOWANCE_MB} MB)`,
        verdict: check(growth <= GROWTH_ALLOWANCE_MB),
      },
      info(
        "3. that process's 1st drain (LOG_LEVEL=warning)",
        `${n(m.drain.perSecond)} msg/s`,
      ),
    );
  }
  if (r.seed) {
    rows.push(info(
      `4. seed-style loop: drain ${n(s.baseline)}`,
      `${n(r.seed.perSecond, 1)} msg/s (${n(r.seed.msEach)} ms each)`,
    ));
  }

  if (r.seedPickups) {
    rows.push(info(
      `4. seed-style pickup p50 (${r.seedPickups.length} msgs, ${s.baselineSleep} s sleep)`,
      `${n(percentile(r.seedPickups, 50))} ms (max ${
        n(Math.max(...r.seedPickups))
      })`,
    ));
  }
  if (r.floor) {
    rows.push(
      info(
        "4. raw floor: ssh2 exec `true`, 1 connection, sequential",
        `${n(r.floor.sequentialMs, 2)} ms each`,
      ),
      ...(r.floor.pickups.length === 0 ? [] : [info(
        "4. raw floor: exec call→remote start of the stamp, p50",
        `${n(percentile(r.floor.pickups, 50), 2)} ms (p99 ${
          n(percentile(r.floor.pickups, 99), 2)
        })`,
      )]),
      info(
        "4. raw floor: 8 in flight over 2 connections",
        `${n(r.floor.parallelPerSecond)} exec/s (${
          n(r.floor.parallelMs, 2)
        } ms each)`,
      ),
    );
  }
  if (r.queueBatches) {
    rows.push({
      measure: "5. queue: reserve+delete, batches of 100",
      figure: `${n(r.queueBatches.perSecond)} msg/s`,
      target: "≥ 5,000 msg/s",
      verdict: check(r.queueBatches.perSecond >= 5000),
    });
  }
  if (r.wakeUps) {
    const p50 = percentile(r.wakeUps, 50);
    rows.push({
      measure: `5. queue: long-poll wake-up p50 (${r.wakeUps.length})`,
      figure: `${n(p50, 2)} ms (p99 ${n(percentile(r.wakeUps, 99), 2)})`,
      target: "< 2 ms",
      verdict: check(p50 < 2),
    });
  }
  if (r.drain && r.seed) {
    const ratio = r.drain.perSecond / r.seed.perSecond;
    rows.push({
      measure: "ratio: worker throughput ÷ seed-style",
      figure: `${n(ratio)}×`,
      target: "≥ 100×",
      verdict: check(ratio >= 100),
    });
  }

  if (r.drainSerial && r.floor) {
    const ratio = r.drainSerial.msEach / r.floor.sequentialMs;
    rows.push({
      measure: "ratio: worker ms/msg at concurrency 1 ÷ floor ms/exec",
      figure: `${n(ratio, 2)}×`,
      target: "≤ 1.5×",
      verdict: check(ratio <= 1.5),
    });
  }
  if (r.drain && r.floor) {
    rows.push(info(
      "ratio: worker throughput ÷ floor with 8 in flight",
      `${n(r.drain.perSecond / r.floor.parallelPerSecond, 2)}×`,
    ));
  }
  if (r.hosts) rows.push(...hostsRows(r.hosts));
  if (r.follow) {
    const f = r.follow;
    rows.push(
      {
        measure: `7. followed run, ${
          n(f.floodLines)
        } lines at once: stream posts`,
        figure: `${n(f.floodPosts)} (+1 result; ${n(f.floodMs)} ms; ${
          n(f.floodStreamed)
        } lines carried, ${n(f.floodDropped)} said dropped)`,
        target: `≤ ${MAX_STREAM_POSTS} a run`,
        verdict: check(f.floodPosts <= MAX_STREAM_POSTS),
      },
      info(
        `7. followed run, ${f.pacedLines} lines over 2 s: stream posts`,
        `${n(f.pacedPosts)} (+1 result; ${n(f.pacedMs)} ms; unfollowed: ${
          n(f.unfollowedPosts)
        } besides the result)`,
      ),
    );
  }
  return rows;
}

/** The many-hosts targets: ratios to the floor and the other tools, measured in the same run. */
const HOSTS_TARGETS = {
  warmToFloor: 2,
  coldToFabric: 1.25,
  coldToPssh: 0.25,
  rssMb: 200,
};

/** A reason fit for a table cell: one line, at most 400 characters. */
function oneLine(text: string): string {
  const line = text.replace(/\s*\n\s*/g, " / ");
  return line.length > 400 ? `${line.slice(0, 399)}…` : line;
}

/** p50 and the spread of several runs, or why there is no figure. */
function msOf(samples: Samples): string {
  if (!Array.isArray(samples)) return `skipped: ${oneLine(samples.skipped)}`;
  const p50 = `${n(percentile(samples, 50))} ms`;
  if (samples.length === 1) return p50;
  return `${p50} (p50 of ${samples.length}, ${n(Math.min(...samples))} to ${
    n(Math.max(...samples))
  })`;
}

function hostsRows(h: HostsFanOut): Row[] {
  const count = h.hosts;
  const rows: Row[] = [
    info(
      `6. floor: bare ssh2, connect + \`true\` on ${count} hosts, cold`,
      msOf(h.floorCold),
    ),
    info(
      `6. floor: \`true\` on ${count} open connections, warm`,
      msOf(h.floorWarm),
    ),
  ];
  /** The worker's cold p50 over another's, against a target unless `target` is undefined. */
  const ratio = (of: string, other: Samples, target?: number) => {
    if (!Array.isArray(h.workerCold) || !Array.isArray(other)) return;
    const value = percentile(h.workerCold, 50) / percentile(other, 50);
    const measure = `6. ratio: worker cold ÷ ${of} cold`;
    const figure = `${n(value, 2)}×`;
    rows.push(
      target === undefined ? info(measure, figure) : {
        measure,
        figure,
        target: `≤ ${target}× ${of}`,
        verdict: check(value <= target),
      },
    );
  };
  const warm = h.workerWarm;
  if (Array.isArray(warm)) {
    const toFloor = percentile(warm, 50) / percentile(h.floorWarm, 50);
    rows.push({
      measure:
        `6. worker (./start): warm fan-out to ${count} hosts, post→result`,
      figure: `${msOf(warm)}, ${n(toFloor, 2)}× floor warm`,
      target: `≤ ${HOSTS_TARGETS.warmToFloor}× floor warm`,
      verdict: check(toFloor <= HOSTS_TARGETS.warmToFloor),
    });
  } else {rows.push(
      info(`6. worker (./start): fan-out to ${count} hosts`, msOf(warm)),
    );}
  if (Array.isArray(h.workerCold)) {
    rows.push(info(
      `6. worker: cold, 1st message after start, post→result (open before: ${
        h.openBeforeCold.join(", ")
      })`,
      msOf(h.workerCold),
    ));
  }
  rows.push(
    info(
      "6. Fabric 2 ThreadingGroup, `python3 -c`, cold, wall",
      msOf(h.fabric),
    ),
    info(`6. parallel-ssh -p ${count}, cold, wall`, msOf(h.pssh)),
    info(`6. ansible -f ${count} -m command, cold, wall`, msOf(h.ansible)),
  );
  ratio("Fabric", h.fabric, HOSTS_TARGETS.coldToFabric);
  ratio("pssh", h.pssh, HOSTS_TARGETS.coldToPssh);
  ratio("Ansible", h.ansible);
  if (h.rss !== undefined && "skipped" in h.rss) {
    rows.push(
      info(
        "6. worker RSS with warm connections to every host",
        `skipped: ${oneLine(h.rss.skipped)}`,
      ),
    );
  } else if (h.rss !== undefined) {
    const rss = h.rss;
    rows.push({
      measure:
        `6. worker peak RSS, ${count} hosts × ${rss.perHost} connections (VmHWM)`,
      figure: `${n(rss.peakMb, 1)} MB (sampled ${
        n(rss.sampledPeakMb, 1)
      }; ${rss.openSeen} connections seen)`,
      target: `≤ ${HOSTS_TARGETS.rssMb} MB`,
      verdict: check(rss.peakMb <= HOSTS_TARGETS.rssMb),
    });
  }
  return rows;
}

function markdownTable(rows: Row[]): string {
  const cells = [
    ["Measure", "Figure", "Target", "Result"],
    ...rows.map((r) => [r.measure, r.figure, r.target, r.verdict]),
  ];
  const widths = cells[0].map((_, c) =>
    Math.max(...cells.map((row) => row[c].length))
  );
  const line = (row: string[]) =>
    `| ${row.map((cell, c) => cell.padEnd(widths[c])).join(" | ")} |`;
  const rule = `|${widths.map((w) => "-".repeat(w + 2)).join("|")}|`;
  return [line(cells[0]), rule, ...cells.slice(1).map(line)].join("\n");
}

export function formatReport(r: Results): string {
  const load = (l: number[]) => l.map((x) => x.toFixed(2)).join(" ");
  const sizes = Object.entries(r.options.sizes)
    .map(([key, value]) => `${SIZE_SETTINGS[key as keyof Sizes].flag}=${value}`)
    .join(" ");
  return [
    `tasks bench, ${r.date.toISOString()}: nproc ${r.nproc}, Deno ${Deno.version.deno}, ` +
    `load average ${load(r.loadBefore)} before, ${load(r.loadAfter)} after`,
    `sizes: ${sizes}`,
    "1 and 2: worker in-process with the queue server (as the embedded default), " +
    "LogTape at info into a sink that drops the lines; 3: the worker through ./start as a process.",
    "+N ms queue latency: the worker's queue requests pass an in-process proxy that " +
    "holds each for N/2 ms before forwarding and N/2 ms before replying.",
    "6: loopback hosts 127.0.0.2 up (four sshd on one port for 50), `true` on every host; " +
    "the worker through ./start (TASK_HOST_PARALLELISM = hosts), timed post→result; " +
    "the tools timed as processes, start to end.",
    "",
    markdownTable(tableRows(r)),
  ].join("\n");
}

async function main(): Promise<number> {
  let options: BenchOptions;
  try {
    options = readOptions(Deno.args, Deno.env.toObject());
  } catch (e) {
    console.error(`bench: ${e instanceof Error ? e.message : e}`);
    return 2;
  }
  const started = performance.now();
  const results = await runBench(
    options,
    (line) => console.error(`bench: ${line}`),
  );
  console.log(formatReport(results));
  console.error(
    `bench: done in ${n((performance.now() - started) / 1000, 1)} s`,
  );
  return 0;
}

if (import.meta.main) Deno.exit(await main());
