/** Tests of lib/limits.ts: the catalog's limit keys, lock names, and leases over a real queue server. */
import assert from "node:assert/strict";
import { parseCatalog } from "./catalog.ts";
import { type TaskConfig } from "./config.ts";
import { type Held } from "./held.ts";
import { IronMqClient } from "./ironmq.ts";
import { type LimitEvents, Limits, locksFor, type RunShape } from "./limits.ts";
import { realClock } from "./retry.ts";
import { postRevocation, Revocations } from "./revoke.ts";
import {
  configError,
  HOST_DEFAULTS,
  hostNamed,
  taskConfig,
} from "../test/fixtures.ts";
import { memoryLog, sleep, startTestQueue, until } from "../test/support.ts";

const LIMITED = `
hosts:
  web: {hosts: [web1, web2], max_parallel: 2}
  small: {hosts: [op@web2:22], max_parallel: 1}
tasks:
  deploy:
    command: deploy {{version}}
    params: {version: {}}
    concurrency: 1
  restart:
    command: restart {{service}}
    params: {service: {}}
    hosts: [web]
    concurrency: 2
    concurrency_key: "svc-{{ service }}"
  upgrade:
    command: upgrade
    hosts: [web]
    concurrency: 1
    concurrency_key: "{{host}}"
`;

const parse = (text: string) =>
  parseCatalog("tasks.yaml", text, {
    timeoutMs: 0,
    maxAttempts: 5,
    host: HOST_DEFAULTS,
  }).catalog;

Deno.test("limits: concurrency, concurrency_key and max_parallel are read from the catalog", () => {
  const c = parse(LIMITED);
  assert.deepEqual(c.tasks.get("deploy")!.limit, { concurrency: 1 });
  assert.deepEqual(c.tasks.get("restart")!.limit, {
    concurrency: 2,
    key: "svc-{{ service }}",
  });
  // web2 is in both groups, as op@web2:22 too: the smaller limit holds.
  assert.deepEqual([...c.maxParallel], [
    ["op@web1:22", 2],
    ["op@web2:22", 1],
  ]);
});

Deno.test("limits: every mistake in the limit keys is named at start, by task and field", () => {
  const problems = configError(() => {
    parse(`
hosts:
  g: {hosts: [a.example], max_parallel: 0}
tasks:
  a:
    command: a {{s}}
    params: {s: {}, t: {secret: true}}
    concurrency: -1
  b:
    command: b {{s}}
    params: {s: {}, t: {secret: true}, host: {}}
    concurrency: 2
    concurrency_key: "{{nope}}-{{t}}-{{host}}"
  c:
    command: c
    concurrency_key: "x"
  d:
    command: d
    concurrency: 1
    concurrency_key: "{{ x"
`);
    throw new Error("parsed");
  });
  assert.deepEqual(problems, [
    "tasks.yaml: hosts.g.max_parallel: must be a whole number from 1 to 1000 (runs at once)",
    "tasks.yaml: tasks.a.concurrency: must be a whole number from 1 to 1000 (runs at once)",
    "tasks.yaml: tasks.b.concurrency_key: {{nope}} is neither a parameter of this task nor {{host}}",
    "tasks.yaml: tasks.b.concurrency_key: {{t}} is a secret parameter: a key names a lock queue, so it cannot hold one",
    "tasks.yaml: tasks.b.concurrency_key: {{host}} is the host of the fan-out, yet a parameter is also named host: rename it",
    "tasks.yaml: tasks.c.concurrency_key: needs concurrency: N (runs at once per key)",
    "tasks.yaml: tasks.d.concurrency_key: has a {{ or }} that is not a {{name}} placeholder",
  ]);
});

Deno.test("limits: a run's locks are named validly whatever its values, per host for {{host}} and max_parallel, in one order", () => {
  const c = parse(LIMITED);
  const run = (task: string, values = {}, hosts = ["web1", "web2"]) =>
    locksFor(
      {
        task: c.tasks.get(task)!,
        values,
        hosts: hosts.map(hostNamed),
      },
      c,
      "jobs",
    );
  const deploy = run("deploy", { version: "v1" }, ["other.example"]);
  assert.equal(deploy.length, 1);
  assert.match(deploy[0].queue, /^jobs\.limit\.deploy\.1\.[0-9a-f]{16}$/);
  assert.equal(deploy[0].label, "deploy");
  // Without a key, one lock for every value; with one, a lock per value.
  assert.deepEqual(run("deploy", { version: "v2" }, ["other.example"]), deploy);
  const odd = run("restart", { service: "a/b c\n{{x}}" });
  const other = run("restart", { service: "nginx" });
  const byTask = (locks: typeof odd) => locks.filter((l) => !l.host);
  assert.notEqual(byTask(odd)[0].queue, byTask(other)[0].queue);
  assert.match(byTask(odd)[0].queue, /^jobs\.limit\.restart\.2\.[0-9a-f]{16}$/);
  assert.equal(byTask(other)[0].label, "restart svc-nginx");
  // upgrade: one lock per host, and each host's max_parallel.
  const upgrade = run("upgrade");
  assert.deepEqual(upgrade.map((l) => [l.label, l.limit]).sort(), [
    ["host web1", 2],
    ["host web2", 1],
    ["upgrade web1", 1],
    ["upgrade web2", 1],
  ]);
  const names = upgrade.map((l) => l.queue);
  assert.deepEqual(names, [...names].sort(), "one order everywhere");
  // Plain commands (no task) are under max_parallel only.
  assert.deepEqual(
    locksFor({ hosts: [hostNamed("web2")] }, c, "jobs").map((l) => l.label),
    ["host web2"],
  );
});

function limitsTask(catalogText: string): TaskConfig {
  return taskConfig({
    command: "true",
    hosts: [hostNamed("web1")],
    concurrency: 8,
    hostParallelism: 4,
    maxAttempts: 5,
    shutdownGraceMs: 1000,
    catalog: parse(catalogText),
  });
}

let lastId = 0;
function held(): Held {
  const id = String(++lastId);
  return {
    message: { id, body: "", reserved_count: 1, reservation_id: "r" },
    reservationId: "r",
    attempt: 1,
    meta: { task: "job", priorRetries: 0 },
  };
}

/** A worker's limits, doing "runs" of `ms` each: how many at once, at most. */
function worker(
  task: TaskConfig,
  url: string,
  seen: { now: number; most: number; done: number },
  ms: number,
  random: () => number,
  monitor?: LimitEvents,
) {
  const log = memoryLog();
  const run: RunShape = {
    task: task.catalog!.tasks.get("job")!,
    hosts: [hostNamed("web1")],
  };
  const ended = new Map<Held, () => void>();
  const work = async (h: Held) => {
    seen.most = Math.max(seen.most, ++seen.now);
    await sleep(ms);
    seen.now--;
    seen.done++;
    limits.leave(h);
    ended.get(h)?.();
  };
  const limits: Limits = new Limits(task, "jobs", {
    locks: (queueName) =>
      new IronMqClient({ baseUrl: url, projectId: "p", queueName }),
    log,
    clock: realClock,
    random,
    monitor,
  }, (h) => {
    limits.enter(h, run).then((ok) => ok ? work(h) : undefined);
  }, (h, reason) => {
    throw new Error(
      `message ${h.message.id} dropped (${reason}): none is here`,
    );
  });
  return {
    limits,
    log,
    async start(h: Held) {
      if (await limits.enter(h, run)) await work(h);
    },
    /** Resolves once `h` has run, at once or after waiting. */
    runs(h: Held): Promise<void> {
      const done = Promise.withResolvers<void>();
      ended.set(h, done.resolve);
      void this.start(h);
      return done.promise;
    },
  };
}

Deno.test("limits: two workers' runs never pass N at once; a count cleared by hand is repaired, a surplus deleted", async () => {
  const q = await startTestQueue({}, "p", "jobs");
  const task = limitsTask(`
tasks:
  job: {command: "true", concurrency: 2}
`);
  const [lock] = locksFor(
    { task: task.catalog!.tasks.get("job")!, hosts: [] },
    task.catalog,
    "jobs",
  );
  const seen = { now: 0, most: 0, done: 0 };
  const a = worker(task, q.server.url, seen, 40, () => 0);
  const b = worker(task, q.server.url, seen, 40, () => 0.9);
  const stop = new AbortController();
  const stopped = [a.limits.run(stop.signal), b.limits.run(stop.signal)];
  const burst = async (of: ReturnType<typeof worker>[], n: number) => {
    const before = seen.done;
    for (let i = 0; i < n; i++) void of[i % of.length].start(held());
    await until(
      () => `${n} runs: ${a.log.lines.join("\n")}`,
      () => seen.done === before + n,
      30_000,
    );
  };
  try {
    await burst([a, b], 12);
    assert.equal(seen.most, 2, "two at once, never three");
    assert.equal(await q.size(lock.queue), 2);
    assert.match(
      a.log.lines.join("\n"),
      /waiting for job \(at most 2 at once\)/,
    );
    // Someone clears the lock queue: the next runs find it short and repair.
    await q.client.clearQueue(lock.queue);
    await burst([a, b], 6);
    assert.equal(await q.size(lock.queue), 2);
    // Three tokens too many: each run that reserves one deletes it.
    await q.client.post(
      lock.queue,
      [1, 2, 3].map((i) =>
        JSON.stringify({ token: i, of: 2, posted: Date.now() })
      ),
    );
    seen.most = 0;
    await burst([a], 8);
    assert.equal(seen.most, 2, "the surplus let no third run pass");
    assert.equal(await q.size(lock.queue), 2);
    assert.match(a.log.lines.join("\n"), /5 tokens for 2: one deleted/);
    // Stopping with runs waiting: they are handed back, their place freed.
    const running = [held(), held()];
    const waiting = [held(), held(), held()];
    const told: [string, number][] = [];
    const slow = worker(task, q.server.url, seen, 60_000, () => 0, {
      runsWaiting: (task, count) => told.push([task, count]),
    });
    const slowStop = new AbortController();
    const handedBack = slow.limits.run(slowStop.signal);
    for (const h of running) void slow.start(h);
    for (const h of waiting) void slow.start(h);
    await until("2 running", () => seen.now === 2);
    assert.deepEqual(told.at(-1), ["job", 3], "the page and gauge are told");
    slowStop.abort();
    assert.deepEqual(
      (await handedBack).map((h) => h.message.id),
      waiting.map((h) => h.message.id),
    );
    for (const h of running) slow.limits.leave(h);
    await until(
      "both tokens back",
      async () => (await q.peek(lock.queue)).length === 2,
    );
  } finally {
    stop.abort();
    await Promise.all(stopped);
    await q.close();
  }
});

Deno.test("limits: runs of one key, each entering as another ends, all run, one at a time, without a stall", async () => {
  const q = await startTestQueue({}, "p", "jobs");
  const task = limitsTask(`
tasks:
  job: {command: "true", concurrency: 1}
`);
  const seen = { now: 0, most: 0, done: 0 };
  const w = worker(task, q.server.url, seen, 0, () => 0);
  const stop = new AbortController();
  const stopped = w.limits.run(stop.signal);
  try {
    // Two processors, each taking its next message when its run ends.
    const processor = async () => {
      for (let i = 0; i < 40; i++) await w.runs(held());
    };
    await Promise.race([
      Promise.all([processor(), processor()]),
      sleep(20_000).then(() => {
        throw new Error(`stalled after ${seen.done} runs of 80`);
      }),
    ]);
    assert.equal(seen.done, 80);
    assert.equal(seen.most, 1);
  } finally {
    stop.abort();
    await stopped;
    await q.close();
  }
});

Deno.test("limits: a run cancelled while it waits for its second lock leaves its line at once: the lease it held goes back, the run behind it keeps its place, nothing else is freed", async () => {
  const q = await startTestQueue({}, "p", "jobs");
  const task = limitsTask(`
hosts:
  small: {hosts: [web1], max_parallel: 2}
tasks:
  job: {command: "true", concurrency: 1}
`);
  const log = memoryLog();
  const revocations = new Revocations(q.client, "jobs", realClock, log);
  const told: [string, number][] = [];
  const resumed: Held[] = [];
  const dropped: [Held, string][] = [];
  const limits = new Limits(
    task,
    "jobs",
    {
      locks: (queueName) =>
        new IronMqClient({ baseUrl: q.server.url, projectId: "p", queueName }),
      log,
      clock: realClock,
      random: () => 0,
      revocations,
      monitor: { runsWaiting: (task, count) => told.push([task, count]) },
    },
    (h) => resumed.push(h),
    (h, reason) => dropped.push([h, reason]),
  );
  const stop = new AbortController();
  const running = [limits.run(stop.signal), revocations.run(stop.signal)];
  const job = task.catalog!.tasks.get("job")!;
  const on = (host: string): RunShape => ({
    task: job,
    hosts: [hostNamed(host)],
  });
  // In their order: web1's max_parallel, then the task's concurrency.
  const [hostLock, jobLock] = locksFor(on("web1"), task.catalog, "jobs");
  assert.deepEqual([hostLock.label, jobLock.label], ["host web1", "job"]);
  const [a, b, c] = [held(), held(), held()];
  try {
    assert.equal(await limits.enter(a, on("web2")), true, "a: job's token");
    // b and c each take a token of web1's two, and wait for job's.
    assert.equal(await limits.enter(b, on("web1")), false);
    assert.equal(await limits.enter(c, on("web1")), false);
    assert.deepEqual(told.at(-1), ["job", 2]);
    await postRevocation(q.client, "jobs", b.message.id, "ann", Date.now(), 60);
    await until("b dropped", () => dropped.length === 1);
    assert.equal(dropped[0][0], b);
    assert.match(dropped[0][1], /^cancelled by ann at \d{4}-/);
    assert.deepEqual(told.at(-1), ["job", 1]);
    assert.match(
      log.lines.join("\n"),
      /message \d+: not run: cancelled by ann at .* \(it was waiting for job\)/,
    );
    // b's web1 token is back, c keeps its own, a keeps job's.
    await until(
      "b's web1 token ready",
      async () => (await q.peek(hostLock.queue)).length === 1,
    );
    assert.equal(await q.size(hostLock.queue), 2);
    assert.equal(await q.size(jobLock.queue), 1);
    assert.equal((await q.peek(jobLock.queue)).length, 0, "a still holds it");
    assert.deepEqual(resumed, []);
    limits.leave(a);
    await until("c resumed", () => resumed.length === 1);
    assert.equal(resumed[0], c);
    assert.equal(await limits.enter(c, on("web1")), true);
    assert.deepEqual(told.at(-1), ["job", 0]);
    limits.leave(c);
    await until(
      "every token ready",
      async () =>
        (await q.peek(hostLock.queue)).length === 2 &&
        (await q.peek(jobLock.queue)).length === 1,
    );
    assert.equal(dropped.length, 1);
  } finally {
    stop.abort();
    await Promise.all(running);
    await q.close();
  }
});
