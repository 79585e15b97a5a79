/**
 * cli/runs_live.ts: `runs follow <id>` and `runs cancel <id>`, the live half
 * of `deno task runs` (cli/runs.ts has list and show, and calls these).
 *
 * follow reads a run under way from the worker's listener (GET
 * /runs/<id>/events, with TASK_HTTP_PORT, TASK_HTTP_HOST and TASK_HTTP_TOKEN as
 * the worker has them) and prints its output as the worker logs it, then its
 * result, exiting as `send --wait` does. cancel posts a revocation to
 * `<queue>_revoked` (the worker's queue settings), which every worker sees.
 * Neither changes anything but that one revocation message.
 */

import { listenerConfig, senderConfig } from "../lib/config.ts";
import { IronMqClient } from "../lib/ironmq.ts";
import { LineSplitter, Secrets } from "../lib/log.ts";
import { postRevocation, revokedQueueOf } from "../lib/revoke.ts";
import { followedLines } from "../lib/stream.ts";
import { type Env, errorText, isRecord } from "../lib/util.ts";
import { printResult } from "./send.ts";

/** The one argument, a run id; or a problem. */
function runIdArg(args: string[], verb: string): string | undefined {
  if (args.length !== 1 || args[0].startsWith("-") || args[0] === "") {
    console.error(`runs ${verb}: give one run id (runs list shows them)`);
    return undefined;
  }
  return args[0];
}

/** `runs follow <id>`: a run under way, from the listener; the exit status as send --wait's. */
export async function follow(args: string[], env: Env): Promise<number> {
  const id = runIdArg(args, "follow");
  if (id === undefined) return 2;
  let listener: { url: string; token?: string };
  try {
    listener = listenerConfig(env);
  } catch (e) {
    console.error(`FATAL ${errorText(e).replaceAll("\n", "\n  ")}`);
    return 2;
  }
  const secrets = new Secrets([listener.token]);
  const stop = new AbortController();
  const onSignal = () => stop.abort();
  Deno.addSignalListener("SIGINT", onSignal);
  try {
    let response: Response;
    try {
      response = await fetch(
        `${listener.url}/runs/${encodeURIComponent(id)}/events`,
        {
          headers: listener.token === undefined
            ? {}
            : { Authorization: `Bearer ${listener.token}` },
          signal: stop.signal,
        },
      );
    } catch (e) {
      console.error(
        `runs follow: no worker listener at ${listener.url} (${
          errorText(e)
        }): is the worker running with TASK_HTTP_PORT set as here?`,
      );
      return 1;
    }
    if (!response.ok || response.body === null) {
      const text = (await response.text()).trim();
      console.error(`runs follow: ${text} (HTTP ${response.status})`);
      return 1;
    }
    let result: Record<string, unknown> | undefined;
    const splitter = new LineSplitter((line) => {
      if (!line.startsWith("data: ")) return;
      let data: unknown;
      try {
        data = JSON.parse(line.slice(6));
      } catch {
        return;
      }
      const shown = followedLines(data);
      if (shown !== undefined) {
        for (const out of shown.out) console.log(secrets.mask(out));
        for (const note of shown.notes) console.error(secrets.mask(note));
      } else if (isRecord(data) && data.event === "RESULT") {
        result = data;
      }
    }, { maxLine: 1024 * 1024 });
    try {
      for await (const chunk of response.body) splitter.push(chunk);
      splitter.end();
    } catch {
      if (stop.signal.aborted) {
        console.error(`stopped following: run ${id} goes on`);
        return 130;
      }
    }
    if (result === undefined) {
      console.error(
        `runs follow: the worker ended the stream of run ${id} before its end (did it stop?); runs show ${id} tells how it ended`,
      );
      return 1;
    }
    const code = printResult(result, secrets, true);
    if (result.status === "RETRY" || result.status === "NOT_RUN") {
      console.error(
        `run ${id} goes on: it runs again later, perhaps on another worker (runs show ${id}; runs follow ${id} once it runs)`,
      );
    }
    return code;
  } finally {
    Deno.removeSignalListener("SIGINT", onSignal);
  }
}

/** `runs cancel <id>`: posts its revocation, from user@hostname; 0 once posted. */
export async function cancel(args: string[], env: Env): Promise<number> {
  const id = runIdArg(args, "cancel");
  if (id === undefined) return 2;
  let config: ReturnType<typeof senderConfig>;
  try {
    config = senderConfig(env);
  } catch (e) {
    console.error(`FATAL ${errorText(e).replaceAll("\n", "\n  ")}`);
    return 2;
  }
  const who = `${config.user}@${Deno.hostname()}`;
  const queue = config.queue.queueName;
  const now = Date.now();
  try {
    const posted = await postRevocation(
      new IronMqClient(config.queue),
      queue,
      id,
      who,
      now,
      config.revokeTtlSeconds,
    );
    console.log(posted);
  } catch (e) {
    console.error(
      `runs cancel: cannot post to ${revokedQueueOf(queue)}: ${
        errorText(e)
      }; is the queue reachable (the worker's IRON_* or MQ_* settings)?`,
    );
    return 1;
  }
  console.error(
    `run ${id}: cancel posted to ${revokedQueueOf(queue)}, holding until ${
      new Date(now + config.revokeTtlSeconds * 1000).toISOString()
    }: a worker running it stops it within about a second; one that reserves it later deletes it unrun (its result: REVOKED, cancelled by ${who}). An unknown or finished run is left as it is.`,
  );
  return 0;
}
