/**
 * Tests of the embedded IronMQ v3-compatible server, over real HTTP on 127.0.0.1.
 * Timeouts, delays and expiration run on an injected clock; long-polls on real time.
 */
import assert from "node:assert/strict";
import {
  type QueueServer,
  type QueueServerOptions,
  queueServerOptionsFromEnv,
  startQueueServer,
} from "./server.ts";
import { checkMetrics, needs, PROMTOOL, toolMissing } from "../../test/sshd.ts";
import { mountTmpfs, statusMb } from "../../test/support.ts";

// ---------------------------------------------------------------------------
// Helpers

interface Message {
  id: string;
  body: string;
  reserved_count: number;
  reservation_id?: string;
}

interface QueueInfo {
  project_id: string;
  name: string;
  size?: number;
  total_messages?: number;
  message_timeout: number;
  message_expiration: number;
  type: string;
  dead_letter?: { queue_name: string; max_reservations: number };
}

/** Every field any endpoint answers with. */
interface Reply {
  msg?: string;
  ids?: string[];
  messages?: Message[];
  message?: Message;
  queue?: QueueInfo;
  queues?: { name: string }[];
  reservation_id?: string;
}

interface Answer {
  status: number;
  headers: Headers;
  json: Reply;
}

class FakeClock {
  ms = Date.UTC(2030, 0, 1);
  readonly now = () => this.ms;
  advance(seconds: number): void {
    this.ms += seconds * 1000;
  }
}

/** A client for one project of one server; paths are relative to the project. */
class Api {
  constructor(
    readonly baseUrl: string,
    readonly project = "proj",
    readonly token?: string,
  ) {}

  async call(
    method: string,
    path: string,
    body?: unknown,
    headers: Record<string, string> = {},
  ): Promise<Answer> {
    const auth: Record<string, string> = this.token
      ? { authorization: `OAuth ${this.token}` }
      : {};
    const response = await fetch(
      `${this.baseUrl}/3/projects/${this.project}${path}`,
      {
        method,
        headers: { "content-type": "application/json", ...auth, ...headers },
        body: body === undefined
          ? undefined
          : typeof body === "string"
          ? body
          : JSON.stringify(body),
      },
    );
    return await answerOf(response);
  }

  async ok(method: string, path: string, body?: unknown): Promise<Reply> {
    const answer = await this.call(method, path, body);
    assert.ok(
      answer.status === 200 || answer.status === 201,
      `${method} ${path} answered ${answer.status}: ${answer.json.msg}`,
    );
    return answer.json;
  }

  async post(queue: string, ...bodies: string[]): Promise<string[]> {
    const messages = bodies.map((body) => ({ body }));
    return (await this.ok("POST", `/queues/${queue}/messages`, { messages }))
      .ids!;
  }

  async reserve(queue: string, request: object = {}): Promise<Message[]> {
    return (await this.ok("POST", `/queues/${queue}/reservations`, request))
      .messages!;
  }

  async info(queue: string): Promise<QueueInfo> {
    return (await this.ok("GET", `/queues/${queue}`)).queue!;
  }

  async peek(queue: string, n = 100): Promise<Message[]> {
    return (await this.ok("GET", `/queues/${queue}/messages?n=${n}`))
      .messages!;
  }
}

/** Status, headers and JSON body; every answer must be JSON. */
async function answerOf(response: Response): Promise<Answer> {
  const text = await response.text();
  assert.match(
    response.headers.get("content-type") ?? "",
    /application\/json/,
    `${response.url} answered ${response.status} without JSON: ${text}`,
  );
  return {
    status: response.status,
    headers: response.headers,
    json: JSON.parse(text),
  };
}

async function withServer(
  test: (api: Api, server: QueueServer) => Promise<void>,
  options: QueueServerOptions = {},
): Promise<void> {
  const server = await startQueueServer({
    port: 0,
    dbPath: ":memory:",
    ...options,
  });
  try {
    await test(new Api(server.url, "proj", options.token), server);
  } finally {
    await server.close();
  }
}

function expectError(answer: Answer, status: number, msg: RegExp): void {
  assert.equal(answer.status, status, JSON.stringify(answer.json));
  assert.equal(typeof answer.json.msg, "string");
  assert.match(answer.json.msg!, msg);
}

const delay = (ms: number) => new Promise((done) => setTimeout(done, ms));

// ---------------------------------------------------------------------------
// Queues

Deno.test("queues: create with defaults, info, update, delete", async () => {
  await withServer(async (api) => {
    const created = await api.ok("PUT", "/queues/jobs", {});
    assert.deepEqual(created.queue, {
      project_id: "proj",
      name: "jobs",
      message_timeout: 60,
      message_expiration: 604800,
      type: "pull",
    });
    await api.post("jobs", "a", "b");
    assert.deepEqual(await api.info("jobs"), {
      project_id: "proj",
      name: "jobs",
      size: 2,
      total_messages: 2,
      message_timeout: 60,
      message_expiration: 604800,
      type: "pull",
    });

    const patched = await api.ok("PATCH", "/queues/jobs", {
      queue: { message_timeout: 120, message_expiration: 3600 },
    });
    assert.equal(patched.queue?.message_timeout, 120);
    assert.equal(patched.queue?.message_expiration, 3600);
    assert.equal(patched.queue?.size, 2);
    // PUT on an existing queue updates it and keeps its messages.
    await api.ok("PUT", "/queues/jobs", { queue: { message_timeout: 90 } });
    const info = await api.info("jobs");
    assert.equal(info.message_timeout, 90);
    assert.equal(info.message_expiration, 3600);
    assert.equal(info.size, 2);

    assert.deepEqual(await api.ok("DELETE", "/queues/jobs", {}), {
      msg: "Deleted",
    });
    expectError(
      await api.call("GET", "/queues/jobs"),
      404,
      /^Queue not found$/,
    );
    expectError(
      await api.call("PATCH", "/queues/jobs", {}),
      404,
      /^Queue not found$/,
    );
    expectError(
      await api.call("DELETE", "/queues/jobs"),
      404,
      /^Queue not found$/,
    );
    await api.ok("PUT", "/queues/jobs");
    assert.equal(
      (await api.info("jobs")).size,
      0,
      "deleted messages stay gone",
    );
  });
});

Deno.test("queues: list is alphabetical with per_page, previous, prefix", async () => {
  await withServer(async (api) => {
    for (const name of ["gamma", "beta", "alphabet", "cat", "alpha"]) {
      await api.ok("PUT", `/queues/${name}`, {});
    }
    const names = async (query: string) =>
      (await api.ok("GET", `/queues${query}`)).queues!.map((q) => q.name);
    assert.deepEqual(await names(""), [
      "alpha",
      "alphabet",
      "beta",
      "cat",
      "gamma",
    ]);
    assert.deepEqual(await names("?per_page=2"), ["alpha", "alphabet"]);
    assert.deepEqual(await names("?per_page=2&previous=alphabet"), [
      "beta",
      "cat",
    ]);
    assert.deepEqual(await names("?previous=b"), ["beta", "cat", "gamma"]);
    assert.deepEqual(await names("?prefix=al"), ["alpha", "alphabet"]);
    assert.deepEqual(await names("?prefix=al&previous=alpha"), ["alphabet"]);
    for (let i = 0; i < 30; i++) await api.ok("PUT", `/queues/q${i}`, {});
    assert.equal((await names("")).length, 30, "per_page defaults to 30");
    assert.equal((await names("?per_page=100")).length, 35);
    expectError(await api.call("GET", "/queues?per_page=101"), 400, /per_page/);
    expectError(await api.call("GET", "/queues?per_page=0"), 400, /per_page/);
  });
});

Deno.test("queues: dead_letter is validated, auto-creates its queue, and can be removed", async () => {
  await withServer(async (api) => {
    const created = await api.ok("PUT", "/queues/jobs", {
      queue: { dead_letter: { queue_name: "jobs-dead" } },
    });
    assert.deepEqual(created.queue?.dead_letter, {
      queue_name: "jobs-dead",
      max_reservations: 10,
    });
    assert.equal((await api.info("jobs-dead")).size, 0, "target auto-created");
    for (
      const dead_letter of [
        { queue_name: "x", max_reservations: 0 },
        { queue_name: "x", max_reservations: 1001 },
        { queue_name: 7 },
        { queue_name: "jobs" },
      ]
    ) {
      expectError(
        await api.call("PATCH", "/queues/jobs", { queue: { dead_letter } }),
        400,
        /dead_letter/,
      );
    }
    await api.ok("PATCH", "/queues/jobs", {
      queue: { dead_letter: { queue_name: "" } },
    });
    assert.equal((await api.info("jobs")).dead_letter, undefined);
    expectError(
      await api.call("PATCH", "/queues/jobs", {
        queue: { dead_letter: { queue_name: "" } },
      }),
      400,
      /dead_letter.queue_name/,
    );
  });
});

// ---------------------------------------------------------------------------
// Messages

Deno.test("messages: post, reserve, get, peek, delete", async () => {
  await withServer(async (api) => {
    const ids = await api.post("jobs", "one", "two", "three");
    assert.equal(ids.length, 3);
    for (const id of ids) assert.match(id, /^\d+$/);
    assert.ok(
      ids.map(Number).every((id, i, all) => i === 0 || id > all[i - 1]),
      "ids come back in the order sent",
    );
    const more = await api.post("jobs", "four");
    assert.ok(Number(more[0]) > Number(ids[2]));

    assert.deepEqual(
      (await api.peek("jobs", 2)).map((m) => m.body),
      ["one", "two"],
    );
    assert.equal((await api.peek("jobs", 1)).length, 1);

    const reserved = await api.reserve("jobs", { n: 2 });
    assert.deepEqual(reserved.map((m) => [m.id, m.body, m.reserved_count]), [
      [ids[0], "one", 1],
      [ids[1], "two", 1],
    ]);
    for (const m of reserved) assert.match(m.reservation_id!, /^[0-9a-f]{32}$/);
    assert.notEqual(reserved[0].reservation_id, reserved[1].reservation_id);
    assert.deepEqual(
      (await api.peek("jobs")).map((m) => m.body),
      ["three", "four"],
      "peek skips reserved messages",
    );

    assert.deepEqual(
      (await api.ok("GET", `/queues/jobs/messages/${ids[0]}`)).message,
      { id: ids[0], body: "one", reserved_count: 1 },
    );
    assert.deepEqual(
      await api.ok("DELETE", `/queues/jobs/messages/${ids[0]}`, {
        reservation_id: reserved[0].reservation_id,
      }),
      { msg: "Deleted" },
    );
    expectError(
      await api.call("GET", `/queues/jobs/messages/${ids[0]}`),
      404,
      /^Message not found$/,
    );
    // An unreserved message may be deleted without a reservation id.
    await api.ok("DELETE", `/queues/jobs/messages/${ids[2]}`);
    const info = await api.info("jobs");
    assert.equal(info.size, 2);
    assert.equal(info.total_messages, 4);

    const removed = await api.reserve("jobs", { n: 10, delete: true });
    assert.deepEqual(removed.map((m) => m.body), ["four"]);
    assert.equal((await api.info("jobs")).size, 1, "delete:true removes");
    assert.deepEqual(await api.reserve("jobs"), [], "empty array when none");
  });
});

Deno.test("messages: webhook body becomes one message, byte for byte (a byte order mark too)", async () => {
  await withServer(async (api) => {
    const raw = '\uFEFF{"not": "parsed"} \u00e9';
    const answer = await api.call("POST", "/queues/hooks/webhook", raw, {
      "content-type": "text/plain",
    });
    assert.equal(answer.status, 201);
    assert.equal(answer.json.ids?.length, 1);
    const [message] = await api.reserve("hooks");
    assert.equal(message.body, raw);
    assert.equal(message.id, answer.json.ids?.[0]);
    expectError(await api.call("POST", "/queues/hooks/webhook"), 400, /empty/);
  });
});

Deno.test("messages: batch delete and clear", async () => {
  await withServer(async (api) => {
    const ids = await api.post("jobs", "a", "b", "c", "d");
    const [a, b] = await api.reserve("jobs", { n: 2 });
    const wrong = await api.call("DELETE", "/queues/jobs/messages", {
      ids: [
        { id: a.id, reservation_id: a.reservation_id },
        { id: b.id, reservation_id: "not-it" },
      ],
    });
    expectError(wrong, 403, /reservation/i);
    assert.equal(
      (await api.info("jobs")).size,
      4,
      "a failed batch deletes none",
    );

    await api.ok("DELETE", "/queues/jobs/messages", {
      ids: [
        { id: a.id, reservation_id: a.reservation_id },
        { id: Number(b.id), reservation_id: b.reservation_id },
        { id: ids[2] },
      ],
    });
    assert.deepEqual((await api.peek("jobs")).map((m) => m.body), ["d"]);
    expectError(
      await api.call("DELETE", "/queues/jobs/messages", {
        ids: Array.from({ length: 101 }, () => ({ id: ids[3] })),
      }),
      400,
      /1 to 100/,
    );
    assert.deepEqual(await api.ok("DELETE", "/queues/jobs/messages", {}), {
      msg: "Cleared",
    });
    assert.equal((await api.info("jobs")).size, 0);
  });
});

// ---------------------------------------------------------------------------
// Semantics on an injected clock

Deno.test("reservations time out: re-delivery with reserved_count 2, old id refused", async () => {
  const clock = new FakeClock();
  await withServer(async (api) => {
    const [id] = await api.post("jobs", "work");
    const [first] = await api.reserve("jobs", { timeout: 30 });
    assert.equal(first.reserved_count, 1);
    assert.deepEqual(await api.reserve("jobs"), [], "invisible while reserved");
    clock.advance(29);
    assert.deepEqual(await api.reserve("jobs"), []);
    clock.advance(2);
    expectError(
      await api.call("DELETE", `/queues/jobs/messages/${id}`, {
        reservation_id: first.reservation_id,
      }),
      403,
      /^Reservation timed out$/,
    );
    const [second] = await api.reserve("jobs", { timeout: 30 });
    assert.equal(second.id, id);
    assert.equal(second.reserved_count, 2);
    assert.notEqual(second.reservation_id, first.reservation_id);
    expectError(
      await api.call("DELETE", `/queues/jobs/messages/${id}`, {
        reservation_id: first.reservation_id,
      }),
      403,
      /reservation_id/,
    );
    expectError(
      await api.call("DELETE", `/queues/jobs/messages/${id}`),
      403,
      /reserved/,
    );
    await api.ok("DELETE", `/queues/jobs/messages/${id}`, {
      reservation_id: second.reservation_id,
    });

    // Without a timeout the queue's message_timeout applies.
    await api.ok("PUT", "/queues/jobs", { queue: { message_timeout: 45 } });
    await api.post("jobs", "again");
    await api.reserve("jobs");
    clock.advance(44);
    assert.deepEqual(await api.reserve("jobs"), []);
    clock.advance(2);
    assert.equal((await api.reserve("jobs"))[0]?.body, "again");
  }, { now: clock.now });
});

Deno.test("timed-out and released messages go back to the front", async () => {
  const clock = new FakeClock();
  await withServer(async (api) => {
    await api.ok("POST", "/queues/jobs/messages", {
      messages: [{ body: "early-but-delayed", delay: 10 }, { body: "late" }],
    });
    const [late] = await api.reserve("jobs", { timeout: 30 });
    assert.equal(late.body, "late");
    clock.advance(11);
    await api.ok("POST", `/queues/jobs/messages/${late.id}/release`, {
      reservation_id: late.reservation_id,
    });
    assert.deepEqual(
      (await api.reserve("jobs", { n: 2, timeout: 30 })).map((m) => m.body),
      ["late", "early-but-delayed"],
    );
    clock.advance(31);
    await api.post("jobs", "fresh");
    assert.deepEqual(
      (await api.reserve("jobs", { n: 3 })).map((m) => m.body),
      ["early-but-delayed", "late", "fresh"],
      "timed-out messages come before a newer one, oldest first",
    );
  }, { now: clock.now });
});

Deno.test("touch replaces the reservation, extends it and counts; release puts back", async () => {
  const clock = new FakeClock();
  await withServer(async (api) => {
    const [id] = await api.post("jobs", "long job");
    const [reserved] = await api.reserve("jobs", { timeout: 30 });
    const path = `/queues/jobs/messages/${id}`;
    clock.advance(20);
    const touched = await api.ok("POST", `${path}/touch`, {
      reservation_id: reserved.reservation_id,
      timeout: 60,
    });
    assert.equal(touched.msg, "Touched");
    assert.match(touched.reservation_id!, /^[0-9a-f]{32}$/);
    assert.notEqual(touched.reservation_id, reserved.reservation_id);
    expectError(
      await api.call("POST", `${path}/touch`, {
        reservation_id: reserved.reservation_id,
      }),
      403,
      /reservation_id/,
    );
    clock.advance(40);
    assert.deepEqual(await api.reserve("jobs"), [], "touch extended it");
    assert.equal(
      (await api.ok("GET", path)).message?.reserved_count,
      2,
      "touch counts as a reservation",
    );
    // Touch without a timeout uses the queue's message_timeout (60 s).
    const again = await api.ok("POST", `${path}/touch`, {
      reservation_id: touched.reservation_id,
    });
    clock.advance(59);
    assert.deepEqual(await api.reserve("jobs"), []);
    clock.advance(2);
    expectError(
      await api.call("POST", `${path}/release`, {
        reservation_id: again.reservation_id,
      }),
      403,
      /^Reservation timed out$/,
    );

    const [redelivered] = await api.reserve("jobs", { timeout: 30 });
    assert.equal(redelivered.reserved_count, 4);
    expectError(await api.call("POST", `${path}/release`, {}), 400, /required/);
    assert.deepEqual(
      await api.ok("POST", `${path}/release`, {
        reservation_id: redelivered.reservation_id,
        delay: 10,
      }),
      { msg: "Released" },
    );
    expectError(
      await api.call("POST", `${path}/release`, {
        reservation_id: redelivered.reservation_id,
      }),
      403,
      /reservation_id/,
    );
    assert.deepEqual(await api.reserve("jobs"), [], "release delay holds it");
    clock.advance(11);
    const [released] = await api.reserve("jobs");
    assert.equal(released.id, id);
    assert.equal(released.reserved_count, 5);
  }, { now: clock.now });
});

Deno.test("dead letter: a message past max_reservations moves on reserve", async () => {
  const clock = new FakeClock();
  await withServer(async (api) => {
    await api.ok("PUT", "/queues/jobs", {
      queue: { dead_letter: { queue_name: "jobs-dead", max_reservations: 2 } },
    });
    const [poison] = await api.post("jobs", "poison");
    for (const count of [1, 2]) {
      const [message] = await api.reserve("jobs", { timeout: 30 });
      assert.equal(message.reserved_count, count);
      clock.advance(31);
    }
    await api.post("jobs", "fine");
    const served = await api.reserve("jobs", { n: 5 });
    assert.deepEqual(served.map((m) => m.body), ["fine"]);
    await api.ok("DELETE", `/queues/jobs/messages/${served[0].id}`, {
      reservation_id: served[0].reservation_id,
    });
    assert.deepEqual(await api.peek("jobs-dead"), [
      { id: poison, body: "poison", reserved_count: 2 },
    ]);
    const dead = await api.info("jobs-dead");
    assert.equal(dead.total_messages, 1);
    assert.equal((await api.info("jobs")).size, 0);
    // The target queue is re-created if it was deleted meanwhile.
    await api.ok("DELETE", "/queues/jobs-dead");
    const [again] = await api.post("jobs", "poison again");
    for (let i = 0; i < 2; i++) {
      await api.reserve("jobs", { timeout: 30 });
      clock.advance(31);
    }
    assert.deepEqual(await api.reserve("jobs"), []);
    assert.equal((await api.peek("jobs-dead"))[0]?.id, again);
  }, { now: clock.now });
});

Deno.test("delay holds a message back until it is due", async () => {
  const clock = new FakeClock();
  await withServer(async (api) => {
    const { ids } = await api.ok("POST", "/queues/jobs/messages", {
      messages: [{ body: "later", delay: 5 }],
    });
    assert.deepEqual(await api.reserve("jobs"), []);
    assert.deepEqual(await api.peek("jobs"), []);
    assert.equal((await api.info("jobs")).size, 1);
    assert.equal(
      (await api.ok("GET", `/queues/jobs/messages/${ids![0]}`)).message?.body,
      "later",
    );
    clock.advance(4);
    assert.deepEqual(await api.reserve("jobs"), []);
    clock.advance(1);
    assert.equal((await api.reserve("jobs"))[0]?.id, ids![0]);
  }, { now: clock.now });
});

Deno.test("message_expiration: expired messages vanish", async () => {
  const clock = new FakeClock();
  await withServer(async (api) => {
    await api.ok("PUT", "/queues/jobs", { queue: { message_expiration: 60 } });
    const [old] = await api.post("jobs", "old");
    clock.advance(30);
    const [young] = await api.post("jobs", "young");
    clock.advance(31);
    assert.deepEqual((await api.peek("jobs")).map((m) => m.id), [young]);
    expectError(
      await api.call("GET", `/queues/jobs/messages/${old}`),
      404,
      /^Message not found$/,
    );
    assert.equal((await api.info("jobs")).size, 1);
    assert.equal((await api.info("jobs")).total_messages, 2);
    clock.advance(30);
    assert.deepEqual(await api.reserve("jobs"), []);
    assert.equal((await api.info("jobs")).size, 0);
  }, { now: clock.now });
});

// ---------------------------------------------------------------------------
// Long-polls and concurrency, on real time

Deno.test("long-poll: a post during wait answers the waiting reserve at once", async () => {
  await withServer(async (api) => {
    await api.ok("PUT", "/queues/jobs", {});
    const waiting = api.reserve("jobs", { wait: 10 });
    await delay(100);
    const posted = performance.now();
    const [id] = await api.post("jobs", "wake up");
    const messages = await waiting;
    const latency = performance.now() - posted;
    assert.equal(messages[0]?.id, id);
    assert.equal(messages[0]?.body, "wake up");
    assert.ok(
      latency < 500,
      `answered ${latency.toFixed(1)} ms after the post`,
    );
  });
});

Deno.test("long-poll: wait ends empty; release and delays wake waiters on time", async () => {
  await withServer(async (api) => {
    await api.ok("PUT", "/queues/jobs", {});
    let started = performance.now();
    assert.deepEqual(await api.reserve("jobs", { wait: 1 }), []);
    const waited = performance.now() - started;
    assert.ok(waited >= 950 && waited < 3000, `waited ${waited} ms`);

    await api.post("jobs", "retry me");
    const [reserved] = await api.reserve("jobs");
    const waiting = api.reserve("jobs", { wait: 10 });
    await delay(50);
    await api.ok("POST", `/queues/jobs/messages/${reserved.id}/release`, {
      reservation_id: reserved.reservation_id,
    });
    const [released] = await waiting;
    assert.equal(released.id, reserved.id);
    assert.equal(released.reserved_count, 2);

    // A release with delay wakes the waiter by timer, not at the post.
    started = performance.now();
    const later = api.reserve("jobs", { wait: 10 });
    await delay(50);
    await api.ok("POST", `/queues/jobs/messages/${released.id}/release`, {
      reservation_id: released.reservation_id,
      delay: 1,
    });
    const [delayed] = await later;
    const elapsed = performance.now() - started;
    assert.equal(delayed.id, released.id);
    assert.ok(elapsed >= 950 && elapsed < 2500, `woken after ${elapsed} ms`);
  });
});

Deno.test("long-poll: deleting the queue answers 404, close ends waits", async () => {
  const server = await startQueueServer({ port: 0, dbPath: ":memory:" });
  const api = new Api(server.url);
  try {
    await api.ok("PUT", "/queues/doomed", {});
    const doomed = api.call("POST", "/queues/doomed/reservations", {
      wait: 10,
    });
    await delay(50);
    await api.ok("DELETE", "/queues/doomed");
    expectError(await doomed, 404, /^Queue not found$/);

    await api.ok("PUT", "/queues/jobs", {});
    const pending = api.reserve("jobs", { wait: 30 });
    await delay(50);
    const started = performance.now();
    await server.close();
    assert.deepEqual(await pending, [], "a pending wait answers empty");
    assert.ok(performance.now() - started < 2000, "close did not wait 30 s");
  } finally {
    await server.close(); // closing twice is harmless
  }
});

Deno.test("long-poll: a client that hangs up takes no message with it", async () => {
  await withServer(async (api, server) => {
    await api.ok("PUT", "/queues/jobs", {});
    const hangUp = new AbortController();
    const abandoned = fetch(
      `${server.url}/3/projects/proj/queues/jobs/reservations`,
      { method: "POST", body: '{"wait": 10}', signal: hangUp.signal },
    );
    await delay(50);
    hangUp.abort();
    await assert.rejects(abandoned);
    await delay(50);
    const [id] = await api.post("jobs", "for a live reserver");
    await delay(20);
    const [message] = await api.reserve("jobs");
    assert.equal(
      message?.id,
      id,
      "the message was not reserved by the gone client",
    );
    assert.equal(message.reserved_count, 1);
  });
});

Deno.test("twenty concurrent reservers never share a reserved message", async () => {
  await withServer(async (api) => {
    const bodies = Array.from({ length: 300 }, (_, i) => `m${i}`);
    const posted = await api.post("jobs", ...bodies);
    const seen: string[] = [];
    const reserver = async () => {
      for (;;) {
        const got = await api.reserve("jobs", { n: 7, timeout: 60 });
        if (got.length === 0) return;
        seen.push(...got.map((m) => m.id));
      }
    };
    await Promise.all(Array.from({ length: 20 }, reserver));
    assert.equal(seen.length, 300, "each message reserved exactly once");
    assert.deepEqual([...seen].sort(), [...posted].sort());

    // Twenty long-polls on an empty queue, then one post of twenty messages.
    await api.ok("PUT", "/queues/empty", {});
    const waits = Array.from(
      { length: 20 },
      () => api.reserve("empty", { wait: 10 }),
    );
    await delay(100);
    const ids = await api.post("empty", ...bodies.slice(0, 20));
    const answers = await Promise.all(waits);
    const got = answers.flatMap((messages) => messages.map((m) => m.id));
    assert.deepEqual(got.sort(), [...ids].sort());
    assert.ok(answers.every((messages) => messages.length === 1));
  });
});

// ---------------------------------------------------------------------------
// Slow and broken clients, a full disk

const encoder = new TextEncoder();

/** Polls `cond` every 20 ms until it holds; throws after `ms`. */
async function waitFor(
  what: string,
  cond: () => boolean,
  ms = 10_000,
): Promise<void> {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting: ${what}`);
    await delay(20);
  }
}

/**
 * Opens a raw HTTP/1.1 request and sends its head; the body is the caller's.
 * Without a `contentLength` the body is chunked.
 */
async function openRawRequest(
  server: { port: number },
  path: string,
  contentLength: number | undefined,
  headers: Record<string, string> = {},
): Promise<Deno.TcpConn> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port: server.port });
  // Each write leaves at once as its own packet, as from a slow client.
  conn.setNoDelay(true);
  const length = contentLength === undefined
    ? "Transfer-Encoding: chunked"
    : `Content-Length: ${contentLength}`;
  const extra = Object.entries(headers).map(([k, v]) => `${k}: ${v}\r\n`);
  const head = `POST /3/projects/proj${path} HTTP/1.1\r\n` +
    "Host: 127.0.0.1\r\nContent-Type: application/json\r\n" +
    `${extra.join("")}${length}\r\nConnection: close\r\n\r\n`;
  await writeAll(conn, encoder.encode(head));
  return conn;
}

async function writeAll(conn: Deno.Conn, bytes: Uint8Array): Promise<void> {
  for (let sent = 0; sent < bytes.length;) {
    sent += await conn.write(bytes.subarray(sent));
  }
}

/** Reads a `Connection: close` answer to its end: status and JSON body. */
async function readRawAnswer(
  conn: Deno.Conn,
): Promise<{ status: number; json: Reply }> {
  const decoder = new TextDecoder();
  const buffer = new Uint8Array(16 * 1024);
  let text = "";
  for (
    let n = await conn.read(buffer);
    n !== null;
    n = await conn.read(buffer)
  ) {
    text += decoder.decode(buffer.subarray(0, n), { stream: true });
  }
  const [head, body] = text.split("\r\n\r\n", 2);
  const status = Number(/^HTTP\/1\.1 (\d{3})/.exec(head)?.[1]);
  return { status, json: JSON.parse(body) };
}

/**
 * Writes `bytes` one per packet, as the slowest client would. The turns of the
 * event loop between writes let the server read each byte on its own.
 */
async function trickle(conn: Deno.Conn, bytes: Uint8Array): Promise<void> {
  for (const byte of bytes) {
    await writeAll(conn, Uint8Array.of(byte));
    for (let turn = 0; turn < 16; turn++) {
      await new Promise((done) => setImmediate(done));
    }
  }
}

Deno.test("a chunked body sent a byte a chunk is posted whole, its characters split across chunks", async () => {
  await withServer(async (api, server) => {
    const text = "chunked: é ✓ 𝄞 ".repeat(20);
    const body = encoder.encode(JSON.stringify({ messages: [{ body: text }] }));
    const conn = await openRawRequest(
      server,
      "/queues/chunked/messages",
      undefined,
    );
    try {
      // Each chunk: its size line "1\r\n", its one byte, "\r\n".
      for (const byte of body) {
        await writeAll(conn, Uint8Array.of(0x31, 13, 10, byte, 13, 10));
      }
      await writeAll(conn, encoder.encode("0\r\n\r\n"));
      const answer = await readRawAnswer(conn);
      assert.equal(answer.status, 201, answer.json.msg);
    } finally {
      conn.close();
    }
    assert.deepEqual((await api.peek("chunked")).map((m) => m.body), [text]);
  });
});

Deno.test("a client that hangs up mid-body is not logged as a server failure", async () => {
  const lines: string[] = [];
  await withServer(async (api, server) => {
    const conn = await openRawRequest(server, "/queues/jobs/messages", 1000);
    await writeAll(conn, encoder.encode('{"messages'));
    conn.close();
    await waitFor(
      "the server noticed the hang-up",
      () => lines.some((line) => line.includes("/queues/jobs/messages")),
    );
    const [line] = lines.filter((l) => l.includes("/queues/jobs/messages"));
    assert.doesNotMatch(line, /failed|error/i);
    assert.match(line, /client closed the connection/);
    assert.deepEqual(await api.post("jobs", "next"), ["1"]);
  }, { log: (line) => lines.push(line) });
});

Deno.test("a full disk answers 507 with SQLite's own error, in the reply and the log", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const cannotMount = await mountTmpfs(dir, "1m");
    if (cannotMount !== undefined) {
      const why = `a 1 MiB tmpfs cannot be mounted here (${cannotMount})`;
      if (Deno.env.get("CI") === "true") throw new Error(why);
      console.log(`SKIP full-disk test: ${why}; run it as root`);
      return;
    }
    const lines: string[] = [];
    try {
      await withServer(async (api) => {
        const body = "x".repeat(60_000);
        let answer: Answer | undefined;
        // 40 posts of 60 KB are more than the 1 MiB the disk holds.
        for (let i = 0; i < 40; i++) {
          answer = await api.call("POST", "/queues/jobs/messages", {
            messages: [{ body }],
          });
          if (answer.status !== 201) break;
        }
        expectError(answer!, 507, /database or disk is full.*free disk space/);
        // The failed transaction ended: the store still answers.
        assert.equal((await api.info("jobs")).name, "jobs");
        assert.ok(
          lines.some((line) => /failed: database or disk is full/.test(line)),
          lines.join("\n"),
        );
      }, { dbPath: `${dir}/queue.sqlite`, log: (line) => lines.push(line) });
    } finally {
      await new Deno.Command("umount", { args: ["--lazy", dir] }).output();
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

// ---------------------------------------------------------------------------
// Bad input, auth, configuration

Deno.test("bad input answers JSON errors with the right status and loses nothing", async () => {
  await withServer(async (api, server) => {
    const [kept] = await api.post("jobs", "precious");
    await api.ok("PUT", "/queues/held", {});
    const [heldId] = await api.post("held", "reserved one");
    const [held] = await api.reserve("held", { timeout: 60 });
    const messages = "/queues/jobs/messages";
    const cases: [string, string, unknown, number, RegExp][] = [
      ["POST", messages, "{bad json", 400, /Malformed JSON/],
      ["POST", messages, "[]", 400, /JSON object/],
      ["POST", messages, "", 400, /empty/],
      ["POST", messages, { messages: "x" }, 400, /messages/],
      ["POST", messages, { messages: [] }, 400, /messages/],
      ["POST", messages, { messages: [{}] }, 400, /body is required/],
      ["POST", messages, { messages: [{ body: 5 }] }, 400, /body/],
      ["POST", messages, { messages: [{ body: "" }] }, 400, /body/],
      ["POST", messages, { messages: ["text"] }, 400, /messages\[0\]/],
      [
        "POST",
        messages,
        { messages: [{ body: "x", delay: -1 }] },
        400,
        /delay/,
      ],
      [
        "POST",
        messages,
        { messages: [{ body: "x", delay: 604801 }] },
        400,
        /delay/,
      ],
      [
        "POST",
        messages,
        { messages: [{ body: "x" }, { body: "y", delay: "5" }] },
        400,
        /messages\[1\]\.delay/,
      ],
      ["POST", "/queues/jobs/reservations", { n: 0 }, 400, /n must/],
      ["POST", "/queues/jobs/reservations", { n: 101 }, 400, /n must/],
      ["POST", "/queues/jobs/reservations", { n: 1.5 }, 400, /n must/],
      ["POST", "/queues/jobs/reservations", { n: "2" }, 400, /n must/],
      ["POST", "/queues/jobs/reservations", { timeout: 29 }, 400, /timeout/],
      [
        "POST",
        "/queues/jobs/reservations",
        { timeout: 86401 },
        400,
        /timeout/,
      ],
      ["POST", "/queues/jobs/reservations", { wait: 31 }, 400, /wait/],
      ["POST", "/queues/jobs/reservations", { wait: -1 }, 400, /wait/],
      ["POST", "/queues/jobs/reservations", { delete: "yes" }, 400, /delete/],
      ["POST", "/queues/jobs/reservations", "{", 400, /Malformed JSON/],
      ["GET", `${messages}?n=0`, undefined, 400, /n must/],
      ["GET", `${messages}?n=abc`, undefined, 400, /n must/],
      ["PUT", "/queues/jobs", { queue: [] }, 400, /queue must/],
      [
        "PUT",
        "/queues/jobs",
        { queue: { message_timeout: 5 } },
        400,
        /message_timeout/,
      ],
      ["PUT", "/queues/jobs", { queue: { type: "unicast" } }, 400, /Push/],
      ["PUT", "/queues/jobs", { queue: { type: "weird" } }, 400, /type/],
      ["DELETE", messages, "", 400, /empty/],
      ["DELETE", messages, { idz: [1] }, 400, /ids/],
      ["DELETE", messages, { ids: [] }, 400, /ids/],
      ["DELETE", messages, { ids: [{ id: {} }] }, 400, /ids\[0\]\.id/],
      ["POST", "/queues/nope/reservations", {}, 404, /^Queue not found$/],
      ["GET", "/queues/nope", undefined, 404, /^Queue not found$/],
      ["GET", "/queues/nope/messages", undefined, 404, /^Queue not found$/],
      ["GET", "/queues/nope/messages/1", undefined, 404, /^Queue not found$/],
      ["DELETE", "/queues/nope/messages", {}, 404, /^Queue not found$/],
      ["GET", `${messages}/99999`, undefined, 404, /^Message not found$/],
      ["GET", `${messages}/abc`, undefined, 404, /^Message not found$/],
      ["DELETE", `${messages}/99999`, {}, 404, /^Message not found$/],
      [
        "POST",
        `${messages}/99999/touch`,
        { reservation_id: "x" },
        404,
        /^Message not found$/,
      ],
      [
        "POST",
        `/queues/held/messages/${heldId}/touch`,
        { reservation_id: held.reservation_id, timeout: 10 },
        400,
        /timeout/,
      ],
      [
        "POST",
        `/queues/held/messages/${heldId}/touch`,
        { reservation_id: 5 },
        400,
        /reservation_id/,
      ],
      [
        "POST",
        `/queues/held/messages/${heldId}/release`,
        { reservation_id: held.reservation_id, delay: 604801 },
        400,
        /delay/,
      ],
      [
        "DELETE",
        `/queues/held/messages/${heldId}`,
        { reservation_id: "guess" },
        403,
        /reservation_id/,
      ],
      [
        "POST",
        `/queues/held/messages/${heldId}/touch`,
        { reservation_id: "guess" },
        403,
        /reservation_id/,
      ],
      [
        "POST",
        `/queues/jobs/messages/${kept}/release`,
        { reservation_id: "guess" },
        403,
        /reservation_id/,
      ],
      ["DELETE", `/queues/held/messages/${heldId}`, {}, 403, /reserved/],
      ["PATCH", messages, {}, 405, /PATCH not allowed/],
      ["GET", "/queues/jobs/reservations", undefined, 405, /use POST/],
      ["POST", "/queues", {}, 405, /use GET/],
      ["GET", "/queues/jobs/nothing", undefined, 404, /Not found/],
      ["GET", "/queues/%zz", undefined, 400, /percent-encoding/],
      ["GET", "/queues/a%2Fb", undefined, 400, /'\/'/],
    ];
    for (const [method, path, body, status, msg] of cases) {
      const answer = await api.call(method, path, body);
      assert.equal(
        answer.status,
        status,
        `${method} ${path} ${JSON.stringify(body)}: ${answer.json.msg}`,
      );
      assert.match(answer.json.msg ?? "", msg, `${method} ${path}`);
    }
    const notAllowed = await api.call("PATCH", messages, {});
    assert.equal(notAllowed.headers.get("allow"), "POST, GET, DELETE");

    for (
      const path of ["/", "/3", "/3/projects/proj", "/2/projects/p/queues"]
    ) {
      const response = await fetch(`${server.url}${path}`);
      expectError(await answerOf(response), 404, /Not found/);
    }

    const huge = JSON.stringify({
      messages: [{ body: "x".repeat(256 * 1024) }],
    });
    expectError(await api.call("POST", messages, huge), 413, /256 KiB/);
    // Chunked, without Content-Length: counted as it streams in.
    const chunked = await fetch(`${server.url}/3/projects/proj${messages}`, {
      method: "POST",
      body: ReadableStream.from([huge.slice(0, 200_000), huge.slice(200_000)])
        .pipeThrough(new TextEncoderStream()),
    });
    expectError(await answerOf(chunked), 413, /too large/);
    const fits = JSON.stringify({
      messages: [{ body: "y".repeat(256 * 1024 - 100) }],
    });
    assert.equal(
      (await api.call("POST", "/queues/big/messages", fits)).status,
      201,
    );

    assert.deepEqual(await api.peek("jobs"), [
      { id: kept, body: "precious", reserved_count: 0 },
    ]);
    await api.ok("DELETE", `/queues/held/messages/${heldId}`, {
      reservation_id: held.reservation_id,
    });
  });
});

Deno.test("auth: OAuth token required when set; projects are kept apart", async () => {
  await withServer(async (api, server) => {
    const url = `${server.url}/3/projects/proj/queues`;
    for (
      const headers of [
        {} as Record<string, string>,
        { authorization: "OAuth wrong" },
        { authorization: "s3cret-token" },
        { authorization: "OAuth " },
      ]
    ) {
      const response = await fetch(url, { headers });
      const body = await response.text();
      assert.equal(response.status, 401, JSON.stringify(headers));
      assert.match(JSON.parse(body).msg, /Unauthorized/);
      assert.ok(!body.includes("s3cret-token"), "the token is never echoed");
    }
    assert.equal((await api.call("GET", "/queues")).status, 200);
    const viaQuery = await fetch(`${url}?oauth=s3cret-token`);
    assert.equal(viaQuery.status, 200);
    await viaQuery.body?.cancel();

    const other = new Api(server.url, "other-project", "s3cret-token");
    const [id] = await api.post("shared", "for proj only");
    expectError(await other.call("GET", "/queues/shared"), 404, /Queue not/);
    expectError(
      await other.call("POST", "/queues/shared/reservations", {}),
      404,
      /Queue not found/,
    );
    assert.deepEqual((await other.ok("GET", "/queues")).queues, []);
    await other.post("shared", "for other only");
    expectError(
      await other.call("GET", `/queues/shared/messages/${id}`),
      404,
      /^Message not found$/,
    );
    assert.deepEqual((await other.reserve("shared")).map((m) => m.body), [
      "for other only",
    ]);
    assert.deepEqual((await api.reserve("shared")).map((m) => m.body), [
      "for proj only",
    ]);
  }, { token: "s3cret-token" });
});

Deno.test("startQueueServer refuses unsafe or impossible settings", async () => {
  await assert.rejects(
    startQueueServer({ hostname: "0.0.0.0", port: 0, dbPath: ":memory:" }),
    /Refusing to listen on 0\.0\.0\.0 without a token/,
  );
  await assert.rejects(
    startQueueServer({ port: 70000, dbPath: ":memory:" }),
    /Invalid port 70000/,
  );
  await assert.rejects(
    startQueueServer({ port: 0, dbPath: ":memory:", token: "" }),
    /token is empty/,
  );
  const dir = await Deno.makeTempDir();
  const first = await startQueueServer({ port: 0, dbPath: `${dir}/q.sqlite` });
  try {
    await assert.rejects(
      startQueueServer({ port: first.port, dbPath: ":memory:" }),
      /Cannot listen on 127\.0\.0\.1/,
    );
    await assert.rejects(
      startQueueServer({ port: 0, dbPath: `${dir}/q.sqlite` }),
      /Cannot open the queue database .*no other mq_server/,
    );
  } finally {
    await first.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("queueServerOptionsFromEnv: defaults, values, and every bad variable named", () => {
  assert.deepEqual(queueServerOptionsFromEnv({}), {
    hostname: "127.0.0.1",
    port: 8080,
    dbPath: "ironmq.sqlite",
    token: undefined,
  });
  assert.deepEqual(
    queueServerOptionsFromEnv({
      MQ_HOST: "::1",
      MQ_PORT: "0",
      MQ_DB: ":memory:",
      MQ_TOKEN: "abc",
    }),
    { hostname: "::1", port: 0, dbPath: ":memory:", token: "abc" },
  );
  assert.equal(queueServerOptionsFromEnv({ MQ_PORT: "" }).port, 8080);
  assert.throws(
    () =>
      queueServerOptionsFromEnv({
        MQ_HOST: "no good",
        MQ_PORT: "80a",
        MQ_TOKEN: "has space",
      }),
    (error: Error) => {
      assert.match(error.message, /MQ_HOST/);
      assert.match(error.message, /MQ_PORT must be an integer from 0 to 65535/);
      assert.match(error.message, /MQ_TOKEN/);
      assert.ok(!error.message.includes("has space"), "token not echoed");
      return true;
    },
  );
  assert.throws(
    () => queueServerOptionsFromEnv({ MQ_PORT: "65536" }),
    /MQ_PORT/,
  );
});

// ---------------------------------------------------------------------------
// Metrics

async function scrape(
  url: string,
  headers: Record<string, string> = {},
): Promise<string> {
  const response = await fetch(`${url}/metrics`, { headers });
  const text = await response.text();
  assert.equal(response.status, 200, text);
  assert.match(
    response.headers.get("content-type") ?? "",
    /^text\/plain; version=0\.0\.4/,
  );
  return text;
}

/** A scrape's samples whose names start with `prefix`: series as printed → value. */
function samples(text: string, prefix: string): Record<string, number> {
  const found: Record<string, number> = {};
  for (const line of text.split("\n")) {
    if (!line.startsWith(prefix)) continue;
    const space = line.lastIndexOf(" ");
    found[line.slice(0, space)] = Number(line.slice(space + 1));
  }
  return found;
}

function messageSeries(
  queue: string,
  counts: { ready: number; reserved: number; delayed: number },
  project = "proj",
): Record<string, number> {
  return Object.fromEntries(
    Object.entries(counts).map(([state, value]) => [
      `ironmq_queue_messages{project="${project}",queue="${queue}",state="${state}"}`,
      value,
    ]),
  );
}

function requestSeries(
  counts: [method: string, route: string, status: number, count: number][],
): Record<string, number> {
  return Object.fromEntries(
    counts.map(([method, route, status, count]) => [
      `ironmq_http_requests_total{method="${method}",route="${route}",status="${status}"}`,
      count,
    ]),
  );
}

const QUEUE_ROUTE = "/3/projects/:project/queues/:queue";

Deno.test("metrics: messages per queue by state, and requests per route and status, exactly", async () => {
  const clock = new FakeClock();
  await withServer(async (api, server) => {
    await api.ok("PUT", "/queues/short", {
      queue: { message_expiration: 60 },
    });
    await api.post("short", "expires in a minute");
    await api.ok("PUT", "/queues/empty", {});
    const ids = await api.post("jobs", "a", "b", "c", "d", "e");
    await api.ok("POST", "/queues/later/messages", {
      messages: [{ body: "due in a minute", delay: 60 }],
    });
    const [released, deleted, held] = await api.reserve("jobs", { n: 3 });
    await api.ok("POST", `/queues/jobs/messages/${released.id}/release`, {
      reservation_id: released.reservation_id,
      delay: 30,
    });
    await api.ok("DELETE", `/queues/jobs/messages/${deleted.id}`, {
      reservation_id: deleted.reservation_id,
    });
    expectError(await api.call("GET", "/queues/missing"), 404, /not found/);
    // Unknown paths and methods count under fixed labels, not as sent.
    const stray = await fetch(`${server.url}/nowhere/${ids[0]}`);
    assert.equal(stray.status, 404);
    await stray.body?.cancel();
    const brew = await fetch(`${server.url}/metrics`, { method: "BREW" });
    assert.equal(brew.status, 405);
    await brew.body?.cancel();

    const requests: [string, string, number, number][] = [
      ["PUT", QUEUE_ROUTE, 200, 2],
      ["POST", `${QUEUE_ROUTE}/messages`, 201, 3],
      ["POST", `${QUEUE_ROUTE}/reservations`, 200, 1],
      ["POST", `${QUEUE_ROUTE}/messages/:id/release`, 200, 1],
      ["DELETE", `${QUEUE_ROUTE}/messages/:id`, 200, 1],
      ["GET", QUEUE_ROUTE, 404, 1],
      ["GET", "unmatched", 404, 1],
      ["other", "/metrics", 405, 1],
    ];
    assert.deepEqual(samples(await scrape(server.url), "ironmq_"), {
      ...messageSeries("empty", { ready: 0, reserved: 0, delayed: 0 }),
      ...messageSeries("jobs", { ready: 2, reserved: 1, delayed: 1 }),
      ...messageSeries("later", { ready: 0, reserved: 0, delayed: 1 }),
      ...messageSeries("short", { ready: 1, reserved: 0, delayed: 0 }),
      ...requestSeries(requests),
    }, "a scrape counts the requests before it, not itself");

    clock.advance(30); // the release delay is over
    requests.push(["GET", "/metrics", 200, 1]);
    assert.deepEqual(samples(await scrape(server.url), "ironmq_"), {
      ...messageSeries("empty", { ready: 0, reserved: 0, delayed: 0 }),
      ...messageSeries("jobs", { ready: 3, reserved: 1, delayed: 0 }),
      ...messageSeries("later", { ready: 0, reserved: 0, delayed: 1 }),
      ...messageSeries("short", { ready: 1, reserved: 0, delayed: 0 }),
      ...requestSeries(requests),
    });

    // The reservation times out (60 s), the delay ends, "short" expires.
    clock.advance(31);
    await api.ok("DELETE", "/queues/empty");
    assert.deepEqual(samples(await scrape(server.url), "ironmq_"), {
      ...messageSeries("jobs", { ready: 4, reserved: 0, delayed: 0 }),
      ...messageSeries("later", { ready: 1, reserved: 0, delayed: 0 }),
      ...messageSeries("short", { ready: 0, reserved: 0, delayed: 0 }),
      ...requestSeries(requests),
      ...requestSeries([
        ["GET", "/metrics", 200, 2],
        ["DELETE", QUEUE_ROUTE, 200, 1],
      ]),
    }, "a deleted queue's series are gone");
    assert.equal(held.reserved_count, 1);
    assert.equal((await api.info("jobs")).size, 4, "the API agrees");
  }, { now: clock.now });
});

Deno.test({
  name:
    "metrics: promtool check metrics accepts a scrape, odd queue names included",
  ...needs(toolMissing(PROMTOOL, "prometheus"), "promtool check metrics"),
  fn: async () => {
    await withServer(async (api, server) => {
      const odd = 'say "hi" \\ ünïcode';
      await api.post(encodeURIComponent(odd), "one");
      await new Api(server.url, "other project").post("jobs", "two");
      await api.reserve(encodeURIComponent(odd));
      await scrape(server.url); // so the next one counts a scrape too
      const text = await scrape(server.url);
      await checkMetrics(text);
      const queues = samples(text, "ironmq_queue_messages");
      assert.equal(
        queues[
          String
            .raw`ironmq_queue_messages{project="proj",queue="say \"hi\" \\ ünïcode",state="reserved"}`
        ],
        1,
        text,
      );
      assert.equal(
        queues[
          'ironmq_queue_messages{project="other project",queue="jobs",state="ready"}'
        ],
        1,
        text,
      );
      const process = samples(text, "process_");
      assert.ok(process.process_resident_memory_bytes > 0, text);
      assert.ok(process.process_cpu_seconds_total >= 0, text);
      assert.match(text, /^nodejs_heap_size_used_bytes \d+/m);
    });
  },
});

Deno.test("metrics: with a token, /metrics refuses requests without it and takes Bearer", async () => {
  const token = "s3cret-token";
  await withServer(async (api, server) => {
    for (
      const headers of [
        {} as Record<string, string>,
        { authorization: "Bearer wrong" },
        { authorization: token },
      ]
    ) {
      const response = await fetch(`${server.url}/metrics`, { headers });
      const body = await response.text();
      assert.equal(response.status, 401, JSON.stringify(headers));
      assert.match(JSON.parse(body).msg, /Unauthorized.*Bearer <token>/);
      assert.ok(!body.includes(token), "the token is never echoed");
    }
    const text = await scrape(server.url, { authorization: `Bearer ${token}` });
    assert.deepEqual(samples(text, "ironmq_http_requests_total"), {
      ...requestSeries([["GET", "/metrics", 401, 3]]),
    });
    await scrape(server.url, { authorization: `OAuth ${token}` });
    // Bearer is for the scraper; the queue API keeps IronMQ's OAuth.
    expectError(
      await api.call("GET", "/queues", undefined, {
        authorization: `Bearer ${token}`,
      }),
      401,
      /OAuth <token>/,
    );
  }, { token });
});

// ---------------------------------------------------------------------------
// The standalone process

const SERVER_PATH = new URL("./server.ts", import.meta.url).pathname;
const REPO_CONFIG = new URL("../../deno.json", import.meta.url).pathname;
const TASK_PERMISSIONS = [
  "--allow-net",
  "--allow-read",
  "--allow-write",
  "--allow-env",
];

/**
 * `deno task mq` with the given environment, as a child process started from a
 * shell with the common umask 022 (files it creates default to world-readable).
 */
class ServerProcess {
  private constructor(
    readonly child: Deno.ChildProcess,
    readonly url: string,
    readonly stdout: Promise<string>,
    readonly stderr: Promise<string>,
  ) {}

  /** `permissions`: deno run's flags; by default those of `deno task mq`. */
  static spawn(env: Record<string, string>, permissions = TASK_PERMISSIONS) {
    const child = new Deno.Command("sh", {
      args: [
        "-c",
        'umask 022 && exec "$0" "$@"',
        Deno.execPath(),
        "run",
        // The project's imports (prom-client) and its lock file, as `deno task mq`.
        `--config=${REPO_CONFIG}`,
        ...permissions,
        SERVER_PATH,
      ],
      env,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    const listening = Promise.withResolvers<string>();
    const stdout = collectText(child.stdout, (text) => {
      const match = /listening on (http:\/\/\S+)/.exec(text);
      if (match) listening.resolve(match[1]);
    });
    const stderr = collectText(child.stderr, () => {});
    return { child, listening: listening.promise, stdout, stderr };
  }

  static async start(
    env: Record<string, string>,
    permissions = TASK_PERMISSIONS,
  ): Promise<ServerProcess> {
    const { child, listening, stdout, stderr } = ServerProcess.spawn(
      env,
      permissions,
    );
    const exited = child.status.then(async (status) => {
      throw new Error(`mq_server exited ${status.code}: ${await stderr}`);
    });
    const timer = Promise.withResolvers<never>();
    const timeout = setTimeout(
      () => timer.reject(new Error("mq_server did not start in 15 s")),
      15_000,
    );
    try {
      const url = await Promise.race([listening, exited, timer.promise]);
      return new ServerProcess(child, url, stdout, stderr);
    } finally {
      clearTimeout(timeout);
      exited.catch(() => {});
    }
  }

  async stop(signal: Deno.Signal) {
    this.child.kill(signal);
    const status = await this.child.status;
    return { status, stdout: await this.stdout, stderr: await this.stderr };
  }
}

async function collectText(
  stream: ReadableStream<Uint8Array>,
  onText: (all: string) => void,
): Promise<string> {
  let all = "";
  for await (const chunk of stream.pipeThrough(new TextDecoderStream())) {
    all += chunk;
    onText(all);
  }
  return all;
}

async function runToExit(env: Record<string, string>) {
  const { child, stdout, stderr } = ServerProcess.spawn(env);
  const status = await child.status;
  return { status, stdout: await stdout, stderr: await stderr };
}

Deno.test("standalone: messages and reservations survive kill -9; SIGTERM stops cleanly", async () => {
  const dir = await Deno.makeTempDir();
  const env = {
    MQ_PORT: "0",
    MQ_DB: `${dir}/queue.sqlite`,
    MQ_TOKEN: "process-secret-1",
  };
  try {
    const first = await ServerProcess.start(env);
    const api = new Api(first.url, "proj", env.MQ_TOKEN);
    const ids = await api.post("jobs", "a", "b", "c");
    const [held] = await api.reserve("jobs", { timeout: 600 });
    const [last] = await api.post("jobs", "posted just before the kill");
    const killed = await first.stop("SIGKILL");
    assert.equal(killed.status.signal, "SIGKILL");

    const second = await ServerProcess.start(env);
    const again = new Api(second.url, "proj", env.MQ_TOKEN);
    const served = await again.reserve("jobs", { n: 10 });
    assert.deepEqual(served.map((m) => m.id), [ids[1], ids[2], last]);
    assert.equal(held.id, ids[0]);
    await again.ok("DELETE", `/queues/jobs/messages/${held.id}`, {
      reservation_id: held.reservation_id,
    });
    const [next] = await again.post("jobs", "after restart");
    assert.ok(Number(next) > Number(last), "ids keep increasing");
    assert.equal((await again.info("jobs")).total_messages, 5);
    const stopped = await second.stop("SIGTERM");
    assert.equal(stopped.status.code, 0, stopped.stderr);
    assert.match(stopped.stdout, /listening on http:\/\/127\.0\.0\.1:\d+/);
    assert.match(stopped.stdout, /SIGTERM received, stopping/);
    for (const output of [killed.stdout, stopped.stdout, stopped.stderr]) {
      assert.ok(!output.includes(env.MQ_TOKEN), "the token is never logged");
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("standalone: the database files are private (0600) under umask 022", async () => {
  const dir = await Deno.makeTempDir();
  const env = { MQ_PORT: "0", MQ_DB: `${dir}/queue.sqlite` };
  try {
    const server = await ServerProcess.start(env);
    try {
      await new Api(server.url).post("jobs", "a private message");
      const modes: Record<string, string> = {};
      for await (const entry of Deno.readDir(dir)) {
        const mode = (await Deno.stat(`${dir}/${entry.name}`)).mode! & 0o777;
        modes[entry.name] = mode.toString(8);
      }
      assert.ok("queue.sqlite-wal" in modes, JSON.stringify(modes));
      for (const [name, mode] of Object.entries(modes)) {
        assert.equal(mode, "600", `${name}: ${JSON.stringify(modes)}`);
      }
    } finally {
      await server.stop("SIGTERM");
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("standalone: refuses non-loopback without a token or a bad database (1), bad env (2)", async () => {
  const open = await runToExit({ MQ_HOST: "0.0.0.0", MQ_DB: ":memory:" });
  assert.equal(open.status.code, 1);
  assert.match(open.stderr, /Refusing to listen on 0\.0\.0\.0 without a token/);

  const unopenable = await runToExit({
    MQ_PORT: "0",
    MQ_DB: "/nonexistent-dir/queue.sqlite",
  });
  assert.equal(unopenable.status.code, 1);
  assert.match(unopenable.stderr, /Cannot open the queue database/);

  const bad = await runToExit({
    MQ_PORT: "http",
    MQ_HOST: "bad host",
    MQ_TOKEN: "two words",
  });
  assert.equal(bad.status.code, 2);
  assert.match(bad.stderr, /MQ_PORT.*MQ_HOST|MQ_HOST.*MQ_PORT/);
  assert.match(bad.stderr, /MQ_TOKEN/);
  assert.ok(!bad.stderr.includes("two words"));
  assert.equal(bad.stdout, "");
});

Deno.test("standalone: /metrics has the process metrics its permissions allow, no zeros", async () => {
  const env = { MQ_PORT: "0", MQ_DB: ":memory:" };
  const task = await ServerProcess.start(env);
  try {
    await new Api(task.url).post("jobs", "a");
    const text = await scrape(task.url);
    const process = samples(text, "process_");
    assert.ok(process.process_cpu_seconds_total > 0, text);
    assert.ok(samples(text, "nodejs_").nodejs_heap_size_used_bytes > 0, text);
    // Deno lets only --allow-all read /proc/self, which `deno task mq` lacks.
    assert.equal(process.process_resident_memory_bytes, undefined, text);
    assert.deepEqual(
      samples(text, "ironmq_queue_messages"),
      messageSeries("jobs", { ready: 1, reserved: 0, delayed: 0 }),
    );
  } finally {
    await task.stop("SIGTERM");
  }
  // Like a worker's ./start: only the reads its settings need. No permission
  // prompt, no process metrics.
  const narrow = await ServerProcess.start(env, [
    "--allow-net=127.0.0.1",
    "--allow-env",
    "--no-prompt",
  ]);
  try {
    await new Api(narrow.url).post("jobs", "a");
    const text = await scrape(narrow.url);
    assert.deepEqual(samples(text, "process_"), {}, text);
    assert.deepEqual(samples(text, "nodejs_"), {}, text);
    assert.deepEqual(
      samples(text, "ironmq_queue_messages"),
      messageSeries("jobs", { ready: 1, reserved: 0, delayed: 0 }),
    );
  } finally {
    const stopped = await narrow.stop("SIGTERM");
    assert.equal(stopped.status.code, 0, stopped.stderr);
  }
});

/** A process's peak resident memory so far (VmHWM), in KiB. */
function peakRssKiB(pid: number): number {
  return statusMb(pid, "VmHWM") * 1024;
}

/**
 * How much a fresh server's peak RSS grows, in KiB, while `texts` are posted
 * at once, each as a body trickled one byte a packet; checks each is stored.
 */
async function trickledGrowthKiB(texts: string[]): Promise<number> {
  const env = { MQ_PORT: "0", MQ_DB: ":memory:", MQ_TOKEN: "trickle-secret" };
  const auth = { Authorization: `OAuth ${env.MQ_TOKEN}` };
  const server = await ServerProcess.start(env);
  try {
    const api = new Api(server.url, "proj", env.MQ_TOKEN);
    const port = Number(new URL(server.url).port);
    const send = async (text: string) => {
      const body = encoder.encode(
        JSON.stringify({ messages: [{ body: text }] }),
      );
      const path = "/queues/slow/messages";
      const conn = await openRawRequest({ port }, path, body.length, auth);
      try {
        await trickle(conn, body);
        const answer = await readRawAnswer(conn);
        assert.equal(answer.status, 201, answer.json.msg);
      } finally {
        conn.close();
      }
    };
    // The queue, its statements and the code paths exist before the baseline.
    await api.post("slow", "warm");
    await api.ok("DELETE", "/queues/slow/messages", {});
    const before = peakRssKiB(server.child.pid);
    await Promise.all(texts.map(send));
    const grown = peakRssKiB(server.child.pid) - before;
    const stored = (await api.peek("slow")).map((m) => m.body);
    assert.deepEqual(stored.sort(), [...texts].sort());
    return grown;
  } finally {
    await server.stop("SIGTERM");
  }
}

Deno.test("standalone: a body trickled one byte a packet, alone or four at once, is stored whole without the server growing per byte", async () => {
  // Characters of 1 to 4 bytes, each split across packets; over 6,000 bytes.
  const texts = Array.from(
    { length: 4 },
    (_, i) => `body ${i}: ` + "a é ✓ 𝄞 ".repeat(430),
  );
  assert.ok(encoder.encode(texts[0]).length > 6000);
  // The bound: reading a byte at a time once made 64 KiB of garbage per byte,
  // which grew the server by 40 to 80 MB here, alone or four at once; now it
  // grows by about 2 MB at most. 8 MB is far from both, above the noise.
  const boundKiB = 8 * 1024;
  const alone = await trickledGrowthKiB(texts.slice(0, 1));
  const together = await trickledGrowthKiB(texts);
  const grown = `the server's peak RSS grew ${alone} KiB for one trickled ` +
    `body, ${together} KiB for four at once`;
  assert.ok(alone < boundKiB && together < boundKiB, grown);
});

// ---------------------------------------------------------------------------
// Wire compatibility

Deno.test("v1: the seed's curl line enqueues a message", async () => {
  await withServer(async (api, server) => {
    const url = `${server.url}/1/projects/proj/queues/seed/messages`;
    const payload = '{"messages":[{"body":"hello world!"}]}';
    let status: number;
    try {
      const { stdout } = await new Deno.Command("curl", {
        args: [
          "-s",
          "-H",
          "Content-Type: application/json",
          "-H",
          "Authorization: OAuth seed-token",
          "-d",
          payload,
          "-w",
          "\n%{http_code}",
          url,
        ],
      }).output();
      const lines = new TextDecoder().decode(stdout).split("\n");
      status = Number(lines.at(-1));
      assert.deepEqual(JSON.parse(lines[0]).msg, "Messages put on queue.");
    } catch (error) {
      if (!(error instanceof Deno.errors.NotFound)) throw error;
      const response = await fetch(url, {
        method: "POST",
        headers: {
          "content-type": "application/json",
          authorization: "OAuth seed-token",
        },
        body: payload,
      });
      status = response.status;
      await response.body?.cancel();
    }
    assert.equal(status, 201);
    const [message] = await api.reserve("seed");
    assert.equal(message.body, "hello world!");
  }, { token: "seed-token" });
});

const COMPAT_DIR = new URL("../../compat/", import.meta.url).pathname;

Deno.test("wire: Iron.io's official Node client iron_mq works unchanged", async () => {
  await withServer(async (_api, server) => {
    // The client is test-only, so it has its own config and lockfile there.
    const run = await new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "--config",
        `${COMPAT_DIR}deno.json`,
        "--allow-env",
        "--allow-read",
        `--allow-net=127.0.0.1:${server.port}`,
        `${COMPAT_DIR}iron_mq_client.ts`,
        server.url,
        "iron-token",
      ],
      env: { NO_COLOR: "1" },
      stdin: "null",
    }).output();
    const output = new TextDecoder().decode(run.stdout) +
      new TextDecoder().decode(run.stderr);
    assert.equal(run.code, 0, output);
    assert.match(output, /every call answered as Iron\.io's client expects/);
    // The client ends by deleting the queue; it reports the 404 vaguely.
    expectError(
      await new Api(server.url, "5f0c6c0a1d2e3f4a5b6c7d8e", "iron-token").call(
        "GET",
        "/queues/jobs",
      ),
      404,
      /^Queue not found$/,
    );
  }, { token: "iron-token" });
});
