/**
 * Tests of the worker (tasks.ts): the loop, the processing step and how each
 * message is settled, with a scripted runner or a real sshd, against the
 * embedded queue server over real HTTP; and `deno task start` end to end.
 */
import { type TaskConfig } from "./lib/config.ts";
import { type WorkerDeps } from "./lib/held.ts";
import { type HostSpec } from "./lib/hosts.ts";
import { IronMqClient, QueueError } from "./lib/ironmq.ts";
import { type Log, Secrets } from "./lib/log.ts";
import { realClock } from "./lib/retry.ts";
import { type CommandRunner, type RunIo, type RunResult } from "./lib/ssh.ts";
import { Worker } from "./tasks.ts";
import { type QueueServerOptions, startQueueServer } from "./lib/mq/server.ts";
import {
  childPids,
  freePort,
  needs,
  run,
  type Sshd,
  sshdMissing,
  sshEnv,
  withSshd,
} from "./test/sshd.ts";
import {
  baseEnv,
  fastClock,
  jumpingClock,
  memoryLog,
  spawnCollecting,
  startTestQueue,
  type StoredMessage,
  type TestQueue,
  until,
} from "./test/support.ts";
import assert from "node:assert/strict";
import {
  catalog,
  exit,
  poolFor,
  recorded,
  taskConfig,
} from "./test/fixtures.ts";

/** Tests that need OpenSSH (sshd, ssh-keygen): skipped with a reason, or failing under CI. */
const sshdTest = needs(sshdMissing(), "tests with a real sshd");

type Script = (
  command: string,
  io: RunIo,
) => Promise<RunResult>;

/** A CommandRunner that records commands and answers from a script. */
class FakeRunner implements CommandRunner {
  readonly commands: string[] = [];
  constructor(
    private readonly script: Script,
    /** Whether some host can be reached (false: the worker's only host is down). */
    private readonly anyReachable = true,
  ) {}
  ready(): Promise<void> {
    return Promise.resolve();
  }
  reachable(): boolean {
    return this.anyReachable;
  }
  run(_: HostSpec, command: string, io: RunIo): Promise<RunResult> {
    this.commands.push(command);
    return this.script(command, io);
  }
  close(): void {}
}

/** A command that runs until it is stopped. */
const untilAborted = (io: RunIo): Promise<RunResult> =>
  new Promise((resolve) =>
    io.signal.addEventListener("abort", () => resolve({ kind: "aborted" }))
  );

/** A queue server for one test, and a log for its worker. */
type Harness = TestQueue & { log: Log & { lines: string[] } };

async function harness(
  serverOptions: QueueServerOptions = {},
): Promise<Harness> {
  return { ...await startTestQueue(serverOptions), log: memoryLog() };
}

/** Waits until `count` results are in the "replies" queue. */
function untilResults(h: Harness, count: number): Promise<void> {
  return until(
    `${count} results in replies`,
    async () => (await h.peek("replies")).length === count,
  );
}

/** Waits until the one message is in jobs_failed and gone from jobs. */
async function untilDeadLettered(h: Harness): Promise<void> {
  await until(
    "dead-lettered",
    async () => (await h.peek("jobs_failed")).length === 1,
  );
  await until("source empty", async () => (await h.info()).size === 0);
}

/** Starts a worker; `stop()` signals it and waits for a clean end. */
function startWorker(
  h: Harness,
  runner: CommandRunner,
  task: Partial<TaskConfig> = {},
  deps: Partial<WorkerDeps> = {},
) {
  const worker = new Worker(
    taskConfig(task),
    { queue: h.client, runner, log: h.log, clock: realClock, ...deps },
    "jobs",
  );
  const controller = new AbortController();
  const done = worker.run(controller.signal);
  return {
    worker,
    stop: async () => {
      controller.abort();
      await done;
    },
  };
}

Deno.test("worker: runs each message, logs like Fabric, then deletes it", async () => {
  const h = await harness();
  const runner = new FakeRunner((_, io) => {
    io.onStdout(new TextEncoder().encode("CentOS release 6.4\n"));
    io.onStderr(new TextEncoder().encode("warning: x\n"));
    return exit(0);
  });
  const w = startWorker(h, runner);
  try {
    await h.post(["hello world!", JSON.stringify({ args: ["a", "b c"] })]);
    await until("queue drained", async () => (await h.info()).size === 0);
    await until("both ran", () => runner.commands.length === 2);
  } finally {
    await w.stop();
    await h.close();
  }
  assert.deepEqual(runner.commands.sort(), ["run-it", "run-it a 'b c'"]);
  const log = h.log.lines.join("\n");
  assert.match(log, /^\[203\.0\.113\.9\] run: run-it$/m);
  assert.match(log, /^\[203\.0\.113\.9\] out: CentOS release 6\.4$/m);
  assert.match(log, /^\[203\.0\.113\.9\] err: warning: x$/m);
  assert.match(log, /^\[203\.0\.113\.9\] exit: 0 /m);
});

Deno.test("worker: a failing command is released and retried, then dead-lettered with its record", async () => {
  const h = await harness();
  const runner = new FakeRunner((_, io) => {
    io.onStderr(new TextEncoder().encode("disk full\n"));
    return exit(3);
  });
  const w = startWorker(h, runner, { maxAttempts: 3 });
  let id: string;
  try {
    [id] = await h.post(["hello world!"]);
    await untilDeadLettered(h);
  } finally {
    await w.stop();
  }
  try {
    assert.equal(runner.commands.length, 3, "ran once per attempt");
    const [dead] = await h.peek("jobs_failed");
    const record = JSON.parse(dead.body);
    assert.equal(record.id, id);
    assert.equal(record.body, "hello world!");
    assert.equal(record.attempts, 3);
    assert.equal(record.exit_status, 3);
    assert.equal(record.stderr_tail, "disk full\n");
    assert.equal(record.queue, "jobs");
    assert.match(
      h.log.lines.join("\n"),
      /released for a retry in 0 s \(exit status 3, attempt 1 of 3\)/,
    );
  } finally {
    await h.close();
  }
});

Deno.test("worker: a body whose args are invalid runs nothing and goes to the dead-letter queue at once", async () => {
  const h = await harness();
  const runner = new FakeRunner(() => exit(0));
  const w = startWorker(h, runner);
  try {
    await h.post([JSON.stringify({ args: ["ok", 5] })]);
    await untilDeadLettered(h);
  } finally {
    await w.stop();
  }
  try {
    assert.equal(runner.commands.length, 0);
    const record = JSON.parse((await h.peek("jobs_failed"))[0].body);
    assert.match(record.reason, /"args"\[1\] is number/);
    assert.equal(record.attempts, 1);
  } finally {
    await h.close();
  }
});

Deno.test("worker: SSH failures while no host can be reached release the message and never dead-letter it", async () => {
  const h = await harness();
  const runner = new FakeRunner(
    () => Promise.resolve({ kind: "unreachable", error: "connection refused" }),
    false,
  );
  const w = startWorker(h, runner, { maxAttempts: 1 });
  try {
    await h.post(["x"]);
    await until("tried twice", () => runner.commands.length >= 2);
  } finally {
    await w.stop();
  }
  try {
    assert.equal((await h.peek("jobs_failed")).length, 0);
    assert.equal((await h.info()).size, 1, "still in the queue");
  } finally {
    await h.close();
  }
});

Deno.test("worker: a command whose connection was lost after it started is an attempt, even while no host can be reached", async () => {
  const h = await harness();
  // It may have run (a reboot takes its own connection down): never silently again.
  const runner = new FakeRunner(
    () =>
      Promise.resolve({
        kind: "ssh-error",
        error: "connection to x dropped while the command was running",
      }),
    false,
  );
  const w = startWorker(h, runner, { maxAttempts: 1 });
  let dead: StoredMessage[] = [];
  try {
    await h.post(["x"]);
    await until(
      "dead-lettered after its one attempt",
      async () => (dead = await h.peek("jobs_failed")).length === 1,
    );
  } finally {
    await w.stop();
  }
  try {
    assert.equal(runner.commands.length, 1);
    assert.match(JSON.parse(dead[0].body).reason, /dropped while the command/);
  } finally {
    await h.close();
  }
});

Deno.test("worker: on stop, a command that outlives the grace period is stopped and its message released", async () => {
  const h = await harness();
  let started = 0;
  const runner = new FakeRunner((command, io) => {
    started++;
    if (command.endsWith("quick")) {
      return new Promise((resolve) =>
        setTimeout(() => resolve({ kind: "exit", code: 0 }), 300)
      );
    }
    return untilAborted(io);
  });
  const w = startWorker(h, runner, { shutdownGraceMs: 800 });
  await h.post([
    JSON.stringify({ args: ["slow"] }),
    JSON.stringify({ args: ["quick"] }),
  ]);
  await until("both started", () => started === 2);
  const stopping = Date.now();
  await w.stop();
  const took = Date.now() - stopping;
  try {
    assert.ok(took >= 700 && took < 3_000, `stop took ${took} ms`);
    const left = await h.peek("jobs");
    assert.equal(
      left.length,
      1,
      "the quick one was deleted, the slow one kept",
    );
    assert.deepEqual(JSON.parse(left[0].body), { args: ["slow"] });
    // Released, not left reserved: it can be reserved again right away.
    const again = await h.client.reserve(1, 30, 0);
    assert.equal(again.length, 1);
    assert.match(
      h.log.lines.join("\n"),
      /released for a retry in 0 s \(stopped by shutdown\)/,
    );
  } finally {
    await h.close();
  }
});

Deno.test("worker: a command longer than its reservation keeps it by touching", async () => {
  // The server's clock runs 20 times faster: its 30 s reservation lasts 1.5 s here.
  const h = await harness({ now: fastClock(20) });
  let release: () => void = () => {};
  const runner = new FakeRunner(() =>
    new Promise((resolve) => {
      release = () => resolve({ kind: "exit", code: 0 });
    })
  );
  const w = startWorker(h, runner, {}, { touchIntervalMs: 400 });
  try {
    await h.post(["long"]);
    await until("started", () => runner.commands.length === 1);
    await new Promise((r) => setTimeout(r, 4_000)); // 80 s of server time
    const other = await h.client.reserve(1, 30, 0);
    assert.equal(other.length, 0, "no other reserver got it while it ran");
    release();
    await until("deleted", async () => (await h.info()).size === 0);
  } finally {
    await w.stop();
    await h.close();
  }
  assert.equal(runner.commands.length, 1, "ran once");
});

/** A remote command that records its argv (NUL-separated) in a new file in `dir`. */
async function recorder(dir: string): Promise<string> {
  const path = `${dir}/record.sh`;
  await Deno.writeTextFile(
    path,
    `#!/bin/sh\nf=$(mktemp "${dir}/argv.XXXXXX")\nfor a in "$@"; do printf '%s\\0' "$a"; done > "$f"\necho "ran with $# args"\n`,
  );
  await Deno.chmod(path, 0o755);
  await Deno.chmod(dir, 0o777);
  return path;
}

function workerEnv(sshd: Sshd, extra: Record<string, string>) {
  return {
    ...baseEnv(sshd.dir),
    ...sshEnv(sshd),
    MQ_DB: ":memory:",
    MQ_PORT: String(freePort()),
    ...extra,
  };
}

Deno.test({
  name:
    "end to end: deno task start, the curl line it logs, hostile args, delete, SIGTERM",
  ...sshdTest,
  fn: () =>
    withSshd(async (sshd) => {
      const command = await recorder(sshd.dir);
      const worker = spawnCollecting(
        "deno",
        ["task", "start"],
        workerEnv(sshd, { TASK_COMMAND: command }),
      );
      let status: Deno.CommandStatus | undefined;
      try {
        const curlLine = (await worker.line(/post a test message: curl /))
          .replace(/^.*post a test message: /, "");
        const posted = await run("sh", ["-c", curlLine]);
        assert.match(posted, /"ids":\["\d+"\]/);
        await until("the first run", async () =>
          (await recorded(sshd.dir)).length === 1);
        assert.deepEqual(await recorded(sshd.dir), [[]]);
        await worker.line(/^\[127\.0\.0\.1\] out: ran with 0 args$/);

        const hostile = [
          "it's",
          "$(touch /tmp/pwned)",
          "`id`",
          "; rm -rf /",
          "a\nb",
          "",
          '"q"',
          "\\",
        ];
        const bodyFile = `${sshd.dir}/body.json`;
        await Deno.writeTextFile(
          bodyFile,
          JSON.stringify({
            messages: [{ body: JSON.stringify({ args: hostile }) }],
          }),
        );
        await run("sh", [
          "-c",
          curlLine.replace(/-d '[^']*'/, `-d @${bodyFile}`),
        ]);
        await until("the second run", async () =>
          (await recorded(sshd.dir)).length === 2);
        const runs = await recorded(sshd.dir);
        assert.ok(
          runs.some((argv) =>
            JSON.stringify(argv) === JSON.stringify(hostile)
          ),
          JSON.stringify(runs),
        );
        await worker.line(/^\[127\.0\.0\.1\] out: ran with 8 args$/);
        const url = curlLine.split(" ").at(-1)!.replace(/\/messages$/, "");
        await until("both deleted", async () => {
          const info = await (await fetch(url)).json();
          return info.queue.size === 0 && info.queue.total_messages === 2;
        });
        await assert.rejects(Deno.stat("/tmp/pwned"), Deno.errors.NotFound);
      } finally {
        status = await worker.stop();
      }
      const log = worker.lines.join("\n");
      assert.equal(status.code, 0, log);
      assert.match(
        log,
        new RegExp(`^\\[127\\.0\\.0\\.1\\] run: ${command}$`, "m"),
      );
      assert.match(log, /^stopped$/m);
    }),
});

Deno.test({
  name:
    "worker with a real sshd: a failing command is released and retried; a wrong host key runs nothing",
  ...sshdTest,
  fn: () =>
    withSshd(async (sshd) => {
      const h = await harness();
      const marker = `${sshd.dir}/attempts`;
      await Deno.chmod(sshd.dir, 0o777);
      const pool = poolFor(sshd, h.log);
      const w = startWorker(h, pool, {
        command: `echo attempt >> ${marker}; echo boom >&2; exit 3`,
        maxAttempts: 1000,
      });
      try {
        await h.post(["hello world!"]);
        await until("two attempts", async () =>
          (await Deno.readTextFile(marker).catch(() =>
            ""
          )).split("\n")
            .length > 2);
      } finally {
        await w.stop();
        pool.close();
      }
      const [kept] = await h.peek("jobs");
      assert.ok(kept, "the message is still in the queue");
      assert.ok(kept.reserved_count >= 2, `reserved ${kept.reserved_count}`);
      const log = h.log.lines.join("\n");
      assert.match(log, /^\[203\.0\.113\.9\] err: boom$/m);
      assert.match(log, /^WARN \[203\.0\.113\.9\] exit: 3 /m);

      // The same message, a worker whose known_hosts names another key.
      await Deno.writeTextFile(
        sshd.knownHostsFile,
        sshd.knownHostsLine.replace(
          / \S+$/,
          " AAAAC3NzaC1lZDI1NTE5AAAAIB5g1ogk9WDyC8E6Y3hHYTdLaNUHm2dQzDgY8wUoW6uk",
        ),
      );
      await Deno.remove(marker);
      const refusing = poolFor(sshd, h.log);
      const w2 = startWorker(h, refusing, { command: `touch ${marker}` });
      try {
        await until(
          "the mismatch reported",
          () => h.log.lines.some((l) => /HOST KEY MISMATCH/.test(l)),
        );
        await new Promise((r) => setTimeout(r, 1_500));
      } finally {
        await w2.stop();
        refusing.close();
      }
      await assert.rejects(Deno.stat(marker), Deno.errors.NotFound);
      assert.equal((await h.info()).size, 1, "not deleted");
      await h.close();
    }),
});

Deno.test("worker: on stop, reserved messages that have not started go back at once", async () => {
  const h = await harness();
  const runner = new FakeRunner((_, io) => untilAborted(io));
  const w = startWorker(h, runner, { concurrency: 1, shutdownGraceMs: 100 });
  try {
    await h.post(["first", "second", "third"]);
    // One runs; one more waits reserved in the worker's backlog.
    await until(
      "one running, one waiting",
      async () => runner.commands.length === 1 && (await h.peek()).length === 1,
    );
  } finally {
    await w.stop();
  }
  try {
    assert.equal(runner.commands.length, 1, "the waiting one never ran");
    assert.equal((await h.peek()).length, 3, "all three are available again");
    assert.match(
      h.log.lines.join("\n"),
      /released for a retry in 0 s \(shutting down before it started\)/,
    );
  } finally {
    await h.close();
  }
});

Deno.test({
  name:
    "end to end: ssh-agent through deno task start; a double Ctrl-C still stops gracefully",
  ...sshdTest,
  fn: () =>
    withSshd(async (sshd) => {
      const socket = `${sshd.dir}/agent.sock`;
      const agent = new Deno.Command("ssh-agent", {
        args: ["-D", "-a", socket],
        stdout: "null",
        stderr: "null",
      }).spawn();
      try {
        await until("the agent socket", () =>
          Deno.stat(socket).then(() => true, () => false));
        await new Deno.Command("ssh-add", {
          args: [sshd.clientKeyFile],
          env: { SSH_AUTH_SOCK: socket },
          stdout: "null",
          stderr: "null",
        }).output();
        const env: Record<string, string> = {
          ...workerEnv(sshd, {
            TASK_COMMAND: "sleep 1.5; echo slept",
            SSH_AUTH_SOCK: socket,
          }),
        };
        delete env.SSH_KEY_FILE;
        const worker = spawnCollecting("deno", ["task", "start"], env);
        let status: Deno.CommandStatus | undefined;
        try {
          const curlLine = (await worker.line(/post a test message: curl /))
            .replace(/^.*post a test message: /, "");
          await run("sh", ["-c", curlLine]);
          await worker.line(/^\[127\.0\.0\.1\] run: sleep 1\.5/);
          // A terminal's Ctrl-C reaches `deno task` and the worker at once.
          const [inner] = childPids(worker.child.pid);
          assert.ok(inner, "the worker process under deno task");
          Deno.kill(worker.child.pid, "SIGINT");
          Deno.kill(inner, "SIGINT");
          await worker.line(/^\[127\.0\.0\.1\] out: slept$/);
          await worker.line(/^stopped$/, 15_000);
          // It exits by itself: stop() below would TERM it if it had not yet.
          await until("the worker to exit", () =>
            worker.exited(), 15_000);
        } finally {
          status = await worker.stop();
        }
        const log = worker.lines.join("\n");
        assert.equal(status.code, 0, log);
        assert.doesNotMatch(log, /second stop signal/);
        assert.match(log, /exit: 0 \(message 1,/);
      } finally {
        agent.kill("SIGTERM");
        await agent.status;
      }
    }),
});

Deno.test("worker: a delete refused because the reservation expired is logged as 'may run twice'", async () => {
  // 20 times faster: the 30 s reservation is over after 1.5 s of a 2 s command.
  const h = await harness({ now: fastClock(20) });
  let runs = 0;
  const runner = new FakeRunner(async () => {
    runs++;
    if (runs === 1) await new Promise((r) => setTimeout(r, 2_000));
    return { kind: "exit", code: 0 };
  });
  const w = startWorker(h, runner, { concurrency: 1 }, {
    touchIntervalMs: 1e9, // no touching: let the reservation lapse
  });
  try {
    await h.post(["slow"]);
    await until(
      "the refused delete",
      () => h.log.lines.some((l) => /MAY RUN TWICE/.test(l)),
      10_000,
    );
  } finally {
    await w.stop();
    await h.close();
  }
  assert.match(
    h.log.lines.join("\n"),
    /WARN message 1: the command succeeded but the delete did not: its reservation had expired/,
  );
});

/**
 * The crash-safety test's lapse, step by step: a message this worker ran whose
 * reservation lapsed before its delete (the server's clock jumps past it while
 * the command runs), then handed back by this worker's own next reserve: after
 * the delete was refused, or while that delete was still in flight. The
 * worker's reserves and deletes go to the real server, each held at a gate
 * until the test opens it, so the order is the test's.
 */
async function lapsedThenReservedAgain(
  order: "after the refusal" | "while the delete is in flight",
): Promise<void> {
  const clock = jumpingClock();
  const h = await harness({ now: clock.now });
  const gates = {
    reserves: Promise.withResolvers<void>(),
    deletes: Promise.withResolvers<void>(),
  };
  let reserves = 0;
  let handedBack = false;
  let deleteAsked = false;
  const queue = Object.assign(Object.create(h.client) as IronMqClient, {
    reserve: async (...args: Parameters<IronMqClient["reserve"]>) => {
      if (++reserves > 1) await gates.reserves.promise; // the first one passes
      const messages = await h.client.reserve(...args);
      if (messages.some((m) => m.reserved_count === 2)) handedBack = true;
      return messages;
    },
    deleteBatch: async (items: Parameters<IronMqClient["deleteBatch"]>[0]) => {
      if (!deleteAsked) {
        deleteAsked = true;
        if (order === "while the delete is in flight") {
          await gates.deletes.promise;
        }
      }
      return await h.client.deleteBatch(items);
    },
  });
  let finish = () => {};
  let runs = 0;
  const runner = new FakeRunner(() =>
    ++runs > 1 ? exit(0) : new Promise((resolve) => {
      finish = () => resolve({ kind: "exit", code: 0 });
    })
  );
  const w = startWorker(h, runner, { concurrency: 1 }, {
    queue,
    touchIntervalMs: 1e9, // no touch comes before the lapse
  });
  try {
    await h.post(["once"]);
    await until("it runs", () => runner.commands.length === 1);
    clock.jump(31_000); // past its 30 s reservation
    finish();
    await until("its delete is asked for", () => deleteAsked);
    if (order === "after the refusal") {
      await until(
        "the refused delete",
        () => h.log.lines.some((l) => /MAY RUN TWICE/.test(l)),
      );
    }
    gates.reserves.resolve();
    await until("its own reserve hands it back", () => handedBack);
    gates.deletes.resolve();
    await until("deleted", async () => (await h.info()).size === 0);
  } finally {
    gates.reserves.resolve();
    gates.deletes.resolve();
    await w.stop();
    await h.close();
  }
  assert.deepEqual(runner.commands, ["run-it"], "it ran once");
  assert.match(
    h.log.lines.join("\n"),
    /message 1: reserved here again after its delete was refused; its SUCCESS outcome stands, so it is deleted under the new reservation, not run again/,
  );
}

Deno.test("worker: a message it ran whose delete was refused (its reservation lapsed) is deleted, not run again, when its own reserve hands it back", () =>
  lapsedThenReservedAgain("after the refusal"));

Deno.test("worker: a message it ran whose reservation lapsed is deleted, not run again, when its own reserve hands it back while that delete is in flight", () =>
  lapsedThenReservedAgain("while the delete is in flight"));

Deno.test("worker: starting, it reserves no more than its concurrency ahead while no processor has come back for more", async () => {
  const h = await harness();
  // Each reading at least 1 ms after the last, as on a busy machine where the
  // processors' first takes land on different milliseconds.
  let last = 0;
  const clock = {
    ...realClock,
    now: () => last = Math.max(Date.now(), last + 1),
  };
  const asked: number[] = [];
  const queue = Object.assign(Object.create(h.client) as IronMqClient, {
    reserve: (...args: Parameters<IronMqClient["reserve"]>) => {
      asked.push(args[0]);
      return h.client.reserve(...args);
    },
  });
  const runner = new FakeRunner((_, io) => untilAborted(io));
  const w = startWorker(h, runner, { concurrency: 4, shutdownGraceMs: 0 }, {
    queue,
    clock,
  });
  let held = 0;
  try {
    await h.post(Array.from({ length: 100 }, (_, i) => `m${i}`));
    await until("all four run", () => runner.commands.length === 4);
    // Its next reserve fills the processors' waiting line; none comes after
    // it while the four run.
    await until("it reserved again", () => asked.length >= 2);
    await until("that reserve answered", async () => {
      held = 100 - (await h.peek()).length;
      return held >= 4 + asked[1];
    });
  } finally {
    await w.stop();
    await h.close();
  }
  assert.ok(
    held <= 8,
    `held ${held} messages (reserves asked for ${
      asked.join(", ")
    }): four running, at most four waiting`,
  );
});

Deno.test("worker: a body that starts like JSON but does not parse runs nothing and is dead-lettered with the reason", async () => {
  const h = await harness();
  const runner = new FakeRunner(() => exit(0));
  const w = startWorker(h, runner);
  const bodies = ['{"args":["--dry-run"],}', "{'args': ['--dry-run']}"];
  try {
    await h.post(bodies);
    await until(
      "both dead-lettered",
      async () => (await h.peek("jobs_failed")).length === 2,
    );
  } finally {
    await w.stop();
  }
  try {
    assert.deepEqual(runner.commands, [], "nothing ran without its --dry-run");
    const records = (await h.peek("jobs_failed")).map((m) =>
      JSON.parse(m.body)
    );
    assert.deepEqual(records.map((r) => r.body).sort(), [...bodies].sort());
    for (const record of records) {
      assert.match(record.reason, /starts like JSON but is not valid JSON/);
    }
  } finally {
    await h.close();
  }
});

Deno.test("worker: a message too large for its dead-letter record is dead-lettered whole: its body verbatim, then the record naming it", async () => {
  const h = await harness();
  const runner = new FakeRunner(() => exit(1));
  const w = startWorker(h, runner, { maxAttempts: 1 });
  // 240 KB of quotes fits one webhook post (the raw body), but escaped twice
  // inside a record it is ~960 KB: over the queue's 256 KiB per request.
  const body = '"'.repeat(240_000);
  try {
    const posted = await fetch(
      `${h.server.url}/3/projects/test/queues/jobs/webhook`,
      { method: "POST", body },
    );
    assert.equal(posted.status, 201);
    await posted.body?.cancel();
    await until(
      "the body and its record in jobs_failed",
      async () => (await h.peek("jobs_failed")).length === 2,
    );
    await until("gone from jobs", async () => (await h.info()).size === 0);
  } finally {
    await w.stop();
  }
  try {
    assert.equal(runner.commands.length, 1, "ran once, never again");
    const [verbatim, recordMessage] = await h.peek("jobs_failed");
    assert.equal(verbatim.body, body);
    const record = JSON.parse(recordMessage.body);
    assert.equal(record.body_message_id, verbatim.id);
    assert.equal(record.body, undefined);
    assert.equal(record.reason, "exit status 1");
    assert.equal(record.attempts, 1);
    assert.match(h.log.lines.join("\n"), /its body verbatim as message/);
  } finally {
    await h.close();
  }
});

Deno.test("worker: a message whose dead-letter record cannot be written stays queued, counts its attempts and never runs again", async () => {
  const h = await harness();
  const refuse = () =>
    Promise.reject(new QueueError("HTTP 413 (Request too large)", 413, false));
  // The real client, but the dead-letter queue refuses every record.
  const queue = Object.assign(Object.create(h.client) as IronMqClient, {
    post: refuse,
    postVerbatim: refuse,
  });
  const runner = new FakeRunner(() => exit(1));
  const w = startWorker(h, runner, { maxAttempts: 2 }, { queue });
  try {
    await h.post(["fails every time"]);
    await until(
      "reserved three more times after its last attempt, without running",
      () =>
        h.log.lines.filter((l) =>
          /not run again: its FAILURE dead-letter record is still to be posted/
            .test(l)
        )
          .length >= 3,
    );
  } finally {
    await w.stop();
  }
  try {
    assert.equal(runner.commands.length, 2, "ran its 2 attempts, no more");
    assert.equal((await h.info()).size, 1, "kept in the queue, not lost");
    assert.match(
      h.log.lines.join("\n"),
      /cannot record it in jobs_failed .*where it will not run again/,
    );
  } finally {
    await h.close();
  }
});

Deno.test({
  name:
    "end to end: a busy port and a locked database name the settings that get past them",
  ...sshdTest,
  fn: () =>
    withSshd(async (sshd) => {
      const taken = Deno.listen({ hostname: "127.0.0.1", port: 0 });
      const port = (taken.addr as Deno.NetAddr).port;
      const dir = await Deno.makeTempDir();
      const db = `${dir}/queue.sqlite`;
      const holder = await startQueueServer({ port: 0, dbPath: db });
      try {
        const busy = spawnCollecting(
          "deno",
          ["run", "--allow-all", "tasks.ts"],
          {
            ...workerEnv(sshd, { MQ_PORT: String(port) }),
          },
        );
        assert.equal((await busy.child.status).code, 1);
        await busy.stop();
        const said = busy.lines.join("\n");
        assert.match(said, new RegExp(`MQ_PORT=${port + 1}`));
        assert.match(
          said,
          new RegExp(
            `IRON_HOST=127\\.0\\.0\\.1 IRON_PORT=${port} IRON_SCHEME=http`,
          ),
        );
        const locked = spawnCollecting(
          "deno",
          ["run", "--allow-all", "tasks.ts"],
          { ...workerEnv(sshd, { MQ_DB: db }) },
        );
        assert.equal((await locked.child.status).code, 1);
        await locked.stop();
        assert.match(
          locked.lines.join("\n"),
          /Another queue server holds .*queue\.sqlite.*MQ_DB=/,
        );
      } finally {
        taken.close();
        await holder.close();
        await Deno.remove(dir, { recursive: true });
      }
    }),
});

Deno.test({
  name:
    "named tasks: against a real sshd, results carry every field; invalid values run nothing and are dead-lettered; secrets never show",
  ...sshdTest,
  fn: () =>
    withSshd(async (sshd) => {
      const h = await harness();
      const pool = poolFor(sshd, h.log);
      const secret = "s3cr3t-t0ken value";
      const w = startWorker(h, pool, { catalog: catalog() }, {
        secrets: new Secrets([]),
      });
      const celery = (fields: Record<string, unknown>) =>
        JSON.stringify({ retries: 0, eta: null, expires: null, ...fields });
      try {
        await h.post([
          celery({
            id: "ok-1",
            task: "deploy",
            args: ["v1.2.3"],
            kwargs: { dry_run: true, count: 10, token: secret },
            reply_to: "replies",
          }),
          celery({
            id: "bad-1",
            task: "restart",
            kwargs: { service: "apache" },
            reply_to: "replies",
          }),
          celery({
            id: "fail-1",
            task: "fail",
            args: [`because ${secret}`],
            reply_to: "replies",
          }),
        ]);
        await untilResults(h, 3);
      } finally {
        await w.stop();
        pool.close();
      }
      try {
        const results = new Map(
          (await h.peek("replies")).map((m) => {
            const r = JSON.parse(m.body);
            return [r.task_id, r];
          }),
        );
        const ok = results.get("ok-1");
        assert.equal(ok.status, "SUCCESS");
        assert.equal(ok.task, "deploy");
        assert.equal(typeof ok.message_id, "string");
        assert.equal(ok.attempts, 1);
        assert.equal(ok.reason, null);
        assert.ok(Date.parse(ok.started_at) <= Date.parse(ok.finished_at));
        const host = ok.hosts["203.0.113.9"];
        assert.deepEqual(
          { ...host, duration_ms: typeof host.duration_ms },
          {
            exit_status: 0,
            signal: null,
            duration_ms: "number",
            stdout: "v1.2.3|true|10|0.5|[redacted]|\n",
            stderr: "",
            truncated: { stdout: false, stderr: false },
            error: null,
          },
        );
        const bad = results.get("bad-1");
        assert.equal(bad.status, "REJECTED");
        assert.deepEqual(bad.hosts, {});
        assert.equal(bad.started_at, null);
        assert.match(bad.reason, /service: "apache" must be one of nginx, app/);
        const fail = results.get("fail-1");
        assert.equal(fail.status, "FAILURE");
        assert.equal(fail.hosts["203.0.113.9"].exit_status, 3);
        assert.equal(fail.hosts["203.0.113.9"].stderr, "[redacted]\n");
        const dead = (await h.peek("jobs_failed")).map((m) =>
          JSON.parse(m.body)
        );
        assert.deepEqual(dead.map((r) => r.task_id).sort(), [
          "bad-1",
          "fail-1",
        ]);
        const all = [
          ...h.log.lines,
          ...(await h.peek("replies")).map((m) => m.body),
        ].join("\n");
        assert.ok(!all.includes(secret), "the secret parameter never shows");
        assert.ok(!all.includes("s3cr3t-t0ken"), "nor a piece of it");
      } finally {
        await h.close();
      }
    }),
});

Deno.test("named tasks: an eta holds a message back without running it; an expired one is revoked, never run", async () => {
  const h = await harness();
  const runner = new FakeRunner(() => exit(0));
  const w = startWorker(h, runner, { catalog: catalog() });
  const eta = Date.now() + 2_000;
  try {
    await h.post([
      JSON.stringify({
        id: "later",
        task: "restart",
        args: ["app"],
        eta: new Date(eta).toISOString(),
        reply_to: "replies",
      }),
      JSON.stringify({
        id: "stale",
        task: "restart",
        args: ["app"],
        expires: new Date(Date.now() - 1_000).toISOString(),
        reply_to: "replies",
      }),
    ]);
    await untilResults(h, 2);
  } finally {
    await w.stop();
  }
  try {
    assert.equal(runner.commands.length, 1, "only the held one ran, once");
    const results = (await h.peek("replies")).map((m) => JSON.parse(m.body));
    const later = results.find((r) => r.task_id === "later");
    const stale = results.find((r) => r.task_id === "stale");
    assert.equal(later.status, "SUCCESS");
    assert.equal(later.attempts, 1, "holding back is no attempt");
    assert.ok(
      Date.parse(later.started_at) >= eta - 1_000,
      `ran at ${later.started_at}, eta ${new Date(eta).toISOString()}`,
    );
    assert.equal(stale.status, "REVOKED");
    assert.match(stale.reason, /expired at .* before it ran/);
    assert.equal((await h.info()).size, 0, "both gone from the queue");
    assert.match(h.log.lines.join("\n"), /held back until its eta/);
  } finally {
    await h.close();
  }
});

Deno.test({
  name:
    "named tasks: a bad catalog stops the worker at start, every problem named",
  ...sshdTest,
  fn: () =>
    withSshd(async (sshd) => {
      const dir = await Deno.makeTempDir();
      const file = `${dir}/tasks.yaml`;
      await Deno.writeTextFile(
        file,
        "tasks:\n  a:\n    command: run {{x}}\n  b:\n    command: go\n    params:\n      n: {type: integer, default: nope}\n",
      );
      try {
        const worker = spawnCollecting(
          "deno",
          ["run", "--allow-all", "tasks.ts"],
          workerEnv(sshd, { TASKS_FILE: file, TASK_CONCURRENCY: "zero" }),
        );
        assert.equal((await worker.child.status).code, 2);
        await worker.stop();
        const said = worker.lines.join("\n");
        assert.match(said, /^FATAL invalid configuration:/m);
        assert.match(said, /TASK_CONCURRENCY="zero"/);
        assert.match(
          said,
          /tasks\.yaml: tasks\.a\.command: \{\{x\}\} has no parameter/,
        );
        assert.match(
          said,
          /tasks\.yaml: tasks\.b\.params\.n\.default: must be an integer, not string "nope"/,
        );
      } finally {
        await Deno.remove(dir, { recursive: true });
      }
    }),
});

Deno.test("worker: after a stop, no waiting message starts, even when a processor frees up", async () => {
  const h = await harness();
  const runner = new FakeRunner((_, io) => untilAborted(io));
  const w = startWorker(h, runner, { concurrency: 2, shutdownGraceMs: 100 });
  try {
    await h.post(["1", "2", "3", "4", "5", "6"]);
    await until(
      "two running, more held",
      async () => runner.commands.length === 2 && (await h.peek()).length < 4,
    );
  } finally {
    await w.stop();
  }
  try {
    assert.equal(runner.commands.length, 2, "nothing started after the stop");
    assert.equal((await h.peek()).length, 6, "all six are available again");
  } finally {
    await h.close();
  }
});

Deno.test("worker: a message whose reservation lapsed while it ran, and that the worker reserved again, runs once", async () => {
  // 20 times faster: the 30 s reservation lapses after 1.5 s of a 2.5 s command.
  const h = await harness({ now: fastClock(20) });
  const runner = new FakeRunner(async () => {
    await new Promise((r) => setTimeout(r, 2_500));
    return { kind: "exit", code: 0 };
  });
  const w = startWorker(h, runner, { concurrency: 2 }, {
    touchIntervalMs: 1e9, // no touching: let the reservation lapse
  });
  try {
    await h.post(["once"]);
    await until(
      "reserved again",
      () =>
        h.log.lines.some((l) =>
          /reserved again while this worker held it/.test(l)
        ),
      10_000,
    );
    await until("deleted", async () => (await h.info()).size === 0, 10_000);
  } finally {
    await w.stop();
  }
  try {
    assert.equal(runner.commands.length, 1, "one message, one run");
  } finally {
    await h.close();
  }
});

Deno.test("worker: an unexpected error in the processing step releases the message instead of holding it", async () => {
  const h = await harness();
  let calls = 0;
  const runner = new FakeRunner(() => {
    calls++;
    if (calls === 1) throw new Error("boom");
    return exit(0);
  });
  const w = startWorker(h, runner, { concurrency: 1 });
  try {
    await h.post(["x"]);
    await until("ran after the error", () => calls === 2);
    await until("deleted", async () => (await h.info()).size === 0);
  } finally {
    await w.stop();
  }
  try {
    assert.match(h.log.lines.join("\n"), /unexpected error: boom/);
    assert.match(
      h.log.lines.join("\n"),
      /released for a retry in 0 s \(unexpected error\)/,
    );
  } finally {
    await h.close();
  }
});
