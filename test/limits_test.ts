/**
 * Limits across workers (issue 19): worker processes (`deno run tasks.ts`)
 * against the embedded queue server over HTTP and real sshd hosts on
 * loopback; the commands record their start and end on the remote side.
 */
import assert from "node:assert/strict";
import {
  freePort,
  type LoopbackHosts,
  needs,
  sshdMissing,
  startLoopbackHosts,
} from "./sshd.ts";
import {
  baseEnv,
  type Collected,
  mulberry32,
  readEvents,
  recorder,
  REPO,
  type RunEvent,
  sample,
  script,
  sleep,
  spawnCollecting,
  startTestQueue,
  type TestQueue,
  until,
} from "./support.ts";

const sshdTest = needs(sshdMissing(), "limits tests with a real sshd");
const PROJECT = "lim";
const QUEUE = "jobs";

interface Setup {
  queue: TestQueue;
  hosts: LoopbackHosts;
  /** Where record.sh writes its events. */
  dir: string;
  /** The worker's environment, with `extra`. */
  env(extra?: Record<string, string>): Record<string, string>;
  /** Starts a worker process; stopped (TERM) at the end if still running. */
  worker(extra?: Record<string, string>): Collected;
  /** Lock queues of this queue and their sizes (ready + reserved). */
  locks(): Promise<Map<string, number>>;
}

/** Three loopback hosts, a queue server, a catalog `catalog(record.sh)`; `fn` with them. */
async function withLimits(
  catalog: (record: string) => string,
  fn: (s: Setup) => Promise<void>,
): Promise<void> {
  const hosts = await startLoopbackHosts(3);
  const queue = await startTestQueue({}, PROJECT, QUEUE);
  const dir = await Deno.makeTempDir({ prefix: "tasks-limits-" });
  const workers: Collected[] = [];
  try {
    const record = await recorder(dir);
    await Deno.writeTextFile(`${dir}/tasks.yaml`, catalog(record));
    const { hostname, port } = new URL(queue.server.url);
    const env = (extra: Record<string, string> = {}) => ({
      ...baseEnv(dir),
      IRON_HOST: hostname,
      IRON_PORT: port,
      IRON_SCHEME: "http",
      IRON_PROJECT_ID: PROJECT,
      IRON_MQ_QUEUE_NAME: QUEUE,
      SSH_HOST: hosts.hosts[0],
      SSH_PORT: String(hosts.port),
      SSH_USER: hosts.user,
      SSH_KEY_FILE: hosts.clientKeyFile,
      SSH_KNOWN_HOSTS: hosts.knownHostsFile,
      SSH_CONNECT_TIMEOUT: "5",
      TASKS_FILE: `${dir}/tasks.yaml`,
      TASK_CONCURRENCY: "8",
      TASK_POLL_WAIT: "1",
      TASK_RETRY_DELAY: "0",
      TASK_RESERVATION_TIMEOUT: "30",
      ...extra,
    });
    const locks = async () => {
      const listed = await queue.api(
        "GET",
        `/queues?per_page=100&prefix=${QUEUE}.limit.`,
      );
      const names = (listed.queues as { name: string }[]).map((q) => q.name);
      const sizes = new Map<string, number>();
      for (const name of names) sizes.set(name, await queue.size(name));
      return sizes;
    };
    await fn({
      queue,
      hosts,
      dir,
      env,
      worker(extra) {
        const w = spawnCollecting(
          "deno",
          ["run", "--allow-all", "tasks.ts"],
          env(extra),
          REPO,
        );
        workers.push(w);
        return w;
      },
      locks,
    });
  } finally {
    await Promise.all(workers.map((w) => w.exited() ? undefined : w.stop()));
    await queue.close();
    await hosts.stop();
    await Deno.remove(dir, { recursive: true });
  }
}

/** The most runs at once among `events` (a start and an end at the same ms do not overlap). */
function mostAtOnce(events: RunEvent[]): number {
  const marks = events
    .map((e) => ({ at: e.at, step: e.kind === "start" ? 1 : -1 }))
    .sort((a, b) => a.at - b.at || a.step - b.step);
  let now = 0;
  let most = 0;
  for (const mark of marks) most = Math.max(most, now += mark.step);
  return most;
}

function starts(events: RunEvent[], id: string): number {
  return events.filter((e) => e.kind === "start" && e.id === id).length;
}

async function doneCount(dir: string): Promise<number> {
  return (await readEvents(dir)).filter((e) => e.kind === "done").length;
}

/** The page's first event: the snapshot it draws from. */
async function snapshot(url: string): Promise<Record<string, never>> {
  const response = await fetch(`${url}/events`);
  const reader = response.body!.pipeThrough(new TextDecoderStream())
    .getReader();
  let text = "";
  while (!text.includes("\n\n")) text += (await reader.read()).value ?? "";
  await reader.cancel();
  return JSON.parse(/^data: (.*)$/m.exec(text)![1]);
}

const ready = (w: Collected) => w.line(/worker: queue jobs/, 60_000);

Deno.test({
  name:
    "limits: concurrency 1 over two workers of TASK_CONCURRENCY=8 runs 8 messages one at a time, each once, none dead-lettered",
  ...sshdTest,
  fn: () =>
    withLimits(
      (record) => `
tasks:
  deploy:
    command: ${record} deploy 1 {{id}}
    params: {id: {pattern: '[a-z0-9]+'}}
    concurrency: 1
    max_attempts: 1
`,
      async ({ queue, dir, worker, locks }) => {
        const ports = [freePort(), freePort()];
        const a = worker({ TASK_HTTP_PORT: String(ports[0]) });
        const b = worker({ TASK_HTTP_PORT: String(ports[1]) });
        await Promise.all([ready(a), ready(b)]);
        const ids = Array.from({ length: 8 }, (_, i) => `m${i}`);
        await queue.post(
          ids.map((id) => JSON.stringify({ task: "deploy", args: [id] })),
        );
        // The waits are on /metrics and on the page's snapshot.
        let shown: { waiting?: Record<string, number> } = {};
        await until("a wait on /metrics and the page", async () => {
          for (const port of ports) {
            const url = `http://127.0.0.1:${port}`;
            const metrics = await (await fetch(`${url}/metrics`)).text();
            const gauge = sample(metrics, 'tasks_runs_waiting{task="deploy"}');
            if (gauge === undefined || gauge < 1) continue;
            shown = await snapshot(url);
            if ((shown.waiting?.deploy ?? 0) >= 1) return true;
          }
          return false;
        });
        await until(
          "8 runs done",
          async () => await doneCount(dir) === 8 && await queue.size() === 0,
          60_000,
        );
        const events = await readEvents(dir);
        assert.equal(mostAtOnce(events), 1, JSON.stringify(events));
        for (const id of ids) assert.equal(starts(events, id), 1, id);
        assert.equal(await queue.size(`${QUEUE}_failed`), 0);
        // Both waited, and said so; the page's gauge was there while they did.
        const lines = [...a.lines, ...b.lines].join("\n");
        assert.match(
          lines,
          /message \d+: waiting for deploy \(at most 1 at once\)/,
        );
        assert.deepEqual([...(await locks()).values()], [1]);
      },
    ),
});

Deno.test({
  name:
    'limits: concurrency_key "{{service}}" lets different services overlap and never the same one',
  ...sshdTest,
  fn: () =>
    withLimits(
      (record) => `
tasks:
  restart:
    command: ${record} {{service}} 1 {{id}}
    params:
      service: {enum: [web, db, cache]}
      id: {pattern: '[a-z0-9]+'}
    concurrency: 1
    concurrency_key: "{{service}}"
`,
      async ({ queue, dir, worker, locks }) => {
        const a = worker();
        const b = worker();
        await Promise.all([ready(a), ready(b)]);
        const bodies = [];
        for (const service of ["web", "db", "cache"]) {
          for (let i = 0; i < 3; i++) {
            bodies.push(JSON.stringify({
              task: "restart",
              kwargs: { service, id: `${service}${i}` },
            }));
          }
        }
        await queue.post(bodies);
        await until(
          "9 runs done",
          async () => await doneCount(dir) === 9 && await queue.size() === 0,
          60_000,
        );
        const events = await readEvents(dir);
        for (const service of ["web", "db", "cache"]) {
          const own = events.filter((e) => e.run === service);
          assert.equal(
            mostAtOnce(own),
            1,
            `${service}: ${JSON.stringify(own)}`,
          );
        }
        assert.ok(mostAtOnce(events) >= 2, "different services overlapped");
        assert.deepEqual([...(await locks()).values()], [1, 1, 1]);
      },
    ),
});

Deno.test({
  name:
    'limits: "{{host}}" on a 3-host fan-out runs one at a time on each host, the hosts at once; max_parallel caps a group\'s host whatever the task',
  ...sshdTest,
  fn: () =>
    withLimits(
      (record) => `
hosts:
  fleet: [127.0.0.2, 127.0.0.3, 127.0.0.4]
  small: {hosts: [127.0.0.3], max_parallel: 2}
tasks:
  upgrade:
    command: ${record} upgrade 1 {{id}}
    params: {id: {pattern: '[a-z0-9]+'}}
    hosts: [fleet]
    concurrency: 1
    concurrency_key: "{{host}}"
  other:
    command: ${record} other 1 {{id}}
    params: {id: {pattern: '[a-z0-9]+'}}
    hosts: [fleet]
`,
      async ({ queue, dir, worker }) => {
        const a = worker();
        const b = worker();
        await Promise.all([ready(a), ready(b)]);
        // u1 and u2 on one host each: they overlap each other; u0, on all
        // three, never runs with one of them on the same host.
        await queue.post([
          JSON.stringify({
            task: "upgrade",
            args: ["u1"],
            hosts: ["127.0.0.2"],
          }),
          JSON.stringify({
            task: "upgrade",
            args: ["u2"],
            hosts: ["127.0.0.4"],
          }),
        ]);
        await until(
          "u1 and u2 started",
          async () => (await readEvents(dir)).length >= 2,
        );
        await queue.post([
          JSON.stringify({ task: "upgrade", args: ["u0"] }),
          ...["o0", "o1", "o2", "o3"].map((id) =>
            JSON.stringify({ task: "other", args: [id], hosts: ["127.0.0.3"] })
          ),
        ]);
        await until(
          "3 + 1 + 1 + 4 runs done",
          async () => await doneCount(dir) === 9 && await queue.size() === 0,
          60_000,
        );
        const events = await readEvents(dir);
        const upgrades = events.filter((e) => e.run === "upgrade");
        for (const host of ["127.0.0.2", "127.0.0.3", "127.0.0.4"]) {
          const on = upgrades.filter((e) => e.host === host);
          assert.equal(mostAtOnce(on), 1, `${host}: ${JSON.stringify(on)}`);
        }
        const u1 = upgrades.filter((e) => e.id === "u1");
        const u2 = upgrades.filter((e) => e.id === "u2");
        assert.equal(mostAtOnce([...u1, ...u2]), 2, "other hosts at once");
        // 127.0.0.3 (small, max_parallel 2): u0 and four of other.
        const small = events.filter((e) => e.host === "127.0.0.3");
        assert.equal(mostAtOnce(small), 2, JSON.stringify(small));
      },
    ),
});

/** A catalog of one task with concurrency N per key {{n}}. */
const keyed = (n: number, seconds: number) => (record: string) => `
tasks:
  job:
    command: ${record} {{n}} ${seconds} {{id}}
    params:
      n: {pattern: '[a-z0-9]+'}
      id: {pattern: '[a-z0-9]+'}
    concurrency: ${n}
    concurrency_key: "k{{n}}"
`;

const job = (n: string, id: string) =>
  JSON.stringify({ task: "job", kwargs: { n, id } });

/**
 * A catalog of one task, concurrency 1, whose run records its start, waits
 * for the file `go` in the records' folder (at most a minute), and records
 * its end (record.sh's lines, without a host).
 */
const gated = (record: string) => `
tasks:
  job:
    command: ${record.replace(/record\.sh$/, "gated.sh")} {{id}}
    params: {id: {pattern: '[a-z0-9]+'}}
    concurrency: 1
`;

/** gated.sh, for the catalog `gated`; the returned function lets its runs end. */
async function gatedScript(dir: string): Promise<() => Promise<void>> {
  await script(
    dir,
    "gated.sh",
    `log="${dir}/events"
echo "start job $1 $(date +%s%3N)" >> "$log"
i=0
while [ ! -e "${dir}/go" ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i + 1)); done
echo "done job $1 $(date +%s%3N)" >> "$log"
`,
  );
  return () => Deno.writeTextFile(`${dir}/go`, "");
}

const gatedJob = (id: string, extra: Record<string, unknown> = {}) =>
  JSON.stringify({ id, task: "job", kwargs: { id }, ...extra });

/** The reply queue's results, read without taking them. */
async function replies(
  queue: TestQueue,
): Promise<{ task_id: string; status: string; reason: string | null }[]> {
  return (await queue.peek("replies")).map((m) => JSON.parse(m.body));
}

Deno.test({
  name:
    "limits: a waiting run that expires leaves its line at its expiry while the run holding the lease goes on: revoked, never run, nothing freed, the next run passes after",
  ...sshdTest,
  fn: () =>
    withLimits(gated, async ({ queue, dir, worker, locks }) => {
      const go = await gatedScript(dir);
      const w = worker();
      await ready(w);
      await queue.post([gatedJob("first")]);
      await until(
        "first started",
        async () => (await readEvents(dir)).some((e) => e.id === "first"),
      );
      const expires = new Date(Date.now() + 2_000).toISOString();
      await queue.post([gatedJob("late", { expires, reply_to: "replies" })]);
      await w.line(/waiting for job \(at most 1 at once\)/);
      await until(
        () => `late revoked:\n${w.lines.join("\n")}`,
        async () => (await replies(queue)).some((r) => r.task_id === "late"),
      );
      const [late] = await replies(queue);
      assert.equal(late.status, "REVOKED");
      assert.equal(late.reason, `expired at ${expires} before it ran`);
      assert.match(w.lines.join("\n"), /revoked: expired at .* waiting/);
      let events = await readEvents(dir);
      assert.ok(
        !events.some((e) => e.kind === "done"),
        `revoked while first still ran: ${JSON.stringify(events)}`,
      );
      await queue.post([gatedJob("next")]);
      await until(
        () => `next waiting:\n${w.lines.join("\n")}`,
        () =>
          w.lines.filter((l) => /waiting for job \(at most 1/.test(l))
            .length === 2,
      );
      await go();
      await until(
        "next done",
        async () =>
          (await readEvents(dir)).some((e) =>
            e.kind === "done" && e.id === "next"
          ) && await queue.size() === 0,
      );
      events = await readEvents(dir);
      assert.equal(starts(events, "late"), 0, "the expired one never ran");
      assert.equal(mostAtOnce(events), 1);
      const [[name, size]] = [...await locks()];
      assert.equal(size, 1);
      await until(
        "its one token ready",
        async () => (await queue.peek(name)).length === 1,
      );
    }),
});

Deno.test({
  name:
    "limits: runs cancel of a waiting run takes it out of its line at once: REVOKED with who, never run, while the run holding the lease goes on; the run behind it passes next and the lock keeps its one token",
  ...sshdTest,
  fn: () =>
    withLimits(gated, async ({ queue, dir, env, worker, locks }) => {
      const go = await gatedScript(dir);
      const port = freePort();
      const url = `http://127.0.0.1:${port}`;
      const w = worker({ TASK_HTTP_PORT: String(port) });
      await ready(w);
      const waitingNow = async () => {
        const metrics = await (await fetch(`${url}/metrics`)).text();
        const page = (await snapshot(url)) as {
          waiting?: Record<string, number>;
        };
        return {
          gauge: sample(metrics, 'tasks_runs_waiting{task="job"}'),
          page: page.waiting?.job,
        };
      };
      await queue.post([gatedJob("first")]);
      await until(
        "first started",
        async () => (await readEvents(dir)).some((e) => e.id === "first"),
      );
      await queue.post([gatedJob("second", { reply_to: "replies" })]);
      await w.line(/waiting for job \(at most 1 at once\)/);
      await queue.post([gatedJob("third")]);
      await until(
        () => `two waiting:\n${w.lines.join("\n")}`,
        async () => {
          const { gauge, page } = await waitingNow();
          return gauge === 2 && page === 2;
        },
      );

      const cancel = spawnCollecting(
        "deno",
        ["task", "-q", "runs", "cancel", "second"],
        env(),
      );
      await cancel.child.status;
      assert.equal((await cancel.stop()).code, 0, cancel.lines.join("\n"));
      const cancelledAt = Date.now();
      await until(
        () => `second revoked:\n${w.lines.join("\n")}`,
        async () => (await replies(queue)).some((r) => r.task_id === "second"),
      );
      const tookMs = Date.now() - cancelledAt;
      const [second] = await replies(queue);
      assert.equal(second.status, "REVOKED");
      assert.match(second.reason ?? "", /^cancelled by \S+@\S+ at \d{4}-/);
      assert.match(
        w.lines.join("\n"),
        /message \d+: not run: cancelled by \S+ at .* \(it was waiting/,
      );
      let events = await readEvents(dir);
      assert.deepEqual(
        events.map((e) => `${e.kind} ${e.id}`),
        ["start first"],
        "first still runs; second never started, third not yet",
      );
      // The history says so (written within a second; runs show reads it
      // from the listener), and the wait is over on /metrics and the page:
      // only third waits.
      await until("second's record REVOKED", async () => {
        const response = await fetch(`${url}/runs/second`);
        if (!response.ok) {
          await response.body?.cancel();
          return false;
        }
        return (await response.json()).status === "REVOKED";
      });
      const show = spawnCollecting(
        "deno",
        ["task", "-q", "runs", "show", "second"],
        env({ TASK_HTTP_PORT: String(port) }),
      );
      await show.child.status;
      assert.equal((await show.stop()).code, 0, show.lines.join("\n"));
      assert.ok(show.lines.includes("status: REVOKED"), show.lines.join("\n"));
      assert.ok(
        show.lines.some((l) => /^reason: cancelled by \S+@\S+ at /.test(l)),
        show.lines.join("\n"),
      );
      assert.deepEqual(await waitingNow(), { gauge: 1, page: 1 });
      console.log(
        `a waiting run revoked ${tookMs} ms after runs cancel returned`,
      );

      await go();
      await until(
        "third done",
        async () =>
          (await readEvents(dir)).some((e) =>
            e.kind === "done" && e.id === "third"
          ) && await queue.size() === 0,
      );
      events = await readEvents(dir);
      assert.deepEqual(
        events.map((e) => `${e.kind} ${e.id}`),
        ["start first", "done first", "start third", "done third"],
      );
      assert.equal((await replies(queue)).length, 1, "second's result only");
      assert.equal(await queue.size(`${QUEUE}_failed`), 0);
      assert.deepEqual(await waitingNow(), { gauge: 0, page: undefined });
      const [[name, size]] = [...await locks()];
      assert.equal(size, 1);
      await until(
        "its one token ready",
        async () => (await queue.peek(name)).length === 1,
      );
    }),
});

Deno.test({
  name:
    "limits: a worker that stops hands back its waiting messages, unreserved, and its lock's token",
  ...sshdTest,
  fn: () =>
    withLimits(keyed(1, 2), async ({ queue, dir, worker, locks }) => {
      const w = worker({ TASK_SHUTDOWN_GRACE: "10" });
      await ready(w);
      await queue.post([job("x", "first")]);
      await until(
        "first started",
        async () => (await readEvents(dir)).some((e) => e.id === "first"),
      );
      await queue.post([job("x", "a"), job("x", "b")]);
      await until(
        () => `both waiting:\n${w.lines.join("\n")}`,
        () => w.lines.filter((l) => /waiting for job kx/.test(l)).length === 2,
      );
      const status = await w.stop("SIGTERM");
      assert.equal(status.code, 0);
      // The running one finished within the grace period; the waiting ones
      // are back in the queue, ready, and were never run.
      assert.equal((await queue.peek()).length, 2);
      const events = await readEvents(dir);
      assert.deepEqual(events.map((e) => e.id), ["first", "first"]);
      const [[name, size]] = [...await locks()];
      assert.equal(size, 1);
      assert.equal((await queue.peek(name)).length, 1, "its token is ready");
    }),
});

Deno.test({
  name:
    "limits: a worker SIGKILLed while holding a lease: the other takes over within the reservation timeout plus a poll, and the count is right",
  ...sshdTest,
  fn: () =>
    withLimits(keyed(1, 5), async ({ queue, dir, worker, locks }) => {
      const a = worker();
      const b = worker();
      await Promise.all([ready(a), ready(b)]);
      await queue.post([job("x", "first")]);
      await until(
        "first started",
        async () => (await readEvents(dir)).some((e) => e.id === "first"),
      );
      const runs = (w: Collected) =>
        w.lines.some((l) => /run: .*first/.test(l));
      const [holder, other] = runs(a) ? [a, b] : [b, a];
      const killedAt = Date.now();
      await holder.stop("SIGKILL");
      assert.deepEqual([...(await locks()).values()], [1], "held, still one");
      await queue.post([job("x", "second")]);
      await other.line(/waiting for job kx \(at most 1 at once\)/);
      await until(
        "second started on the other worker",
        async () => (await readEvents(dir)).some((e) => e.id === "second"),
        45_000,
      );
      const events = await readEvents(dir);
      const second = events.find((e) => e.id === "second")!;
      const first = events.find((e) => e.id === "first")!;
      // The lease was reserved when "first" started, for 30 s, never touched.
      const took = second.at - first.at;
      assert.ok(took >= 29_000, `not before the lease lapsed: ${took} ms`);
      assert.ok(took <= 30_000 + 1_000 + 3_000, `took ${took} ms`);
      console.log(
        `takeover ${took} ms after the lease was taken (30 s reservation, 1 s poll)`,
      );
      assert.ok(second.at > killedAt);
      // "first" runs again on b (its message lapsed too), after "second".
      await until(
        "all settled",
        async () =>
          await queue.size() === 0 &&
          (await readEvents(dir)).filter((e) => e.kind === "done").length >= 3,
        60_000,
      );
      assert.equal(mostAtOnce(await readEvents(dir)), 1);
      assert.deepEqual([...(await locks()).values()], [1]);
      const [name] = (await locks()).keys();
      assert.equal((await queue.peek(name)).length, 1, "its token is ready");
      await other.stop();
    }),
});

Deno.test({
  name:
    "limits: 20 kills at random points of a lease's life leave every key with N tokens, and never more than N runs at once",
  ...sshdTest,
  fn: () =>
    withLimits(keyed(2, 0.2), async ({ queue, dir, worker, locks }) => {
      const random = mulberry32(Number(Deno.env.get("LIMITS_SEED") ?? 19));
      const keys = Array.from({ length: 20 }, (_, i) => `s${i}`);
      const seeded: number[] = [];
      for (const [i, key] of keys.entries()) {
        const victim = worker({ TASK_CONCURRENCY: "2" });
        await ready(victim);
        await queue.post([0, 1, 2].map((i) => job(key, `${key}m${i}`)));
        // Half while the key's tokens are counted and posted, half once they
        // are there: reserved, counted, run on, released, reserved again.
        if (i % 2 === 1) await victim.line(/token\(s\) posted/);
        await sleep(random() * (i % 2 === 1 ? 700 : 1_200));
        await victim.stop("SIGKILL");
        const sizes = [...(await locks()).values()];
        seeded.push(sizes.filter((s) => s === 2).length);
        assert.ok(
          sizes.every((s) => s === 0 || s === 2),
          `right after a kill, a key has its 2 tokens or none yet: ${sizes}`,
        );
      }
      // A healthy worker runs what the victims left (their messages lapse
      // after 30 s), and one more message a key: each key's count is N.
      const healthy = worker();
      await ready(healthy);
      await queue.post(keys.map((key) => job(key, `${key}last`)));
      await until(
        "every key's last message ran",
        async () => {
          const events = await readEvents(dir);
          return keys.every((k) =>
            events.some((e) => e.kind === "done" && e.id === `${k}last`)
          ) && await queue.size() === 0;
        },
        90_000,
      );
      const events = await readEvents(dir);
      for (const key of keys) {
        const own = events.filter((e) => e.run === key);
        assert.ok(mostAtOnce(own) <= 2, `${key}: ${JSON.stringify(own)}`);
      }
      const sizes = await locks();
      console.log(
        `20 kills: ${
          seeded.at(-1)
        } with the key's tokens posted (count then 2, else 0); every key has 2 tokens, both ready, at the end`,
      );
      assert.equal(sizes.size, 20);
      for (const [name, size] of sizes) {
        assert.equal(size, 2, name);
        // Counted, both are there; ready once the healthy worker's release has
        // landed and a killed victim's lease has lapsed (its reservation
        // timeout, 30 s from the kill: the last key's can still be held).
        await until(
          `${name}: both ready`,
          async () => (await queue.peek(name)).length === 2,
          45_000,
        );
      }
      await healthy.stop();
    }),
});
