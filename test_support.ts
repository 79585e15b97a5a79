/**
 * Helpers shared by the test files: waiting, seeded randomness, a fast server
 * clock, an in-memory log, and child processes whose output lines are kept.
 */

import { LineSplitter, type Log } from "./tasks.ts";

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
