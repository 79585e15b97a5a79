/**
 * Iron.io's official Node client (iron_mq 0.9.3), unchanged, through every call
 * the worker's users make, against a running queue server. mq_server_test.ts
 * starts the server and runs this; it exits non-zero on the first mismatch.
 *
 * The client lives here, with its own deno.json and deno.lock, because it is
 * for tests only: the worker's config would otherwise make every first start
 * download it and its old `request` tree.
 *
 *   deno run --config compat/deno.json --allow-env --allow-read \
 *     --allow-net=127.0.0.1 compat/iron_mq_client.ts http://127.0.0.1:PORT TOKEN
 */
import assert from "node:assert/strict";
import ironMq from "iron_mq";

interface Message {
  id: string;
  body: string;
  reserved_count: number;
  reservation_id?: string;
}

interface QueueInfo {
  size?: number;
  message_timeout: number;
}

/** The parts of the client used here. */
type Callback<T> = (error: Error | null, result: T) => void;
interface IronQueue {
  post(messages: string | string[], cb: Callback<string | string[]>): void;
  info(cb: Callback<QueueInfo>): void;
  reserve<T extends Message | Message[]>(
    options: object,
    cb: Callback<T>,
  ): void;
  peek<T extends Message | Message[]>(options: object, cb: Callback<T>): void;
  msg_get(id: string, cb: Callback<Message>): void;
  msg_touch(
    id: string,
    reservationId: string,
    options: object,
    cb: Callback<{ reservation_id: string }>,
  ): void;
  msg_release(
    id: string,
    reservationId: string,
    options: object,
    cb: Callback<unknown>,
  ): void;
  del(id: string, options: object, cb: Callback<unknown>): void;
  del_multiple(options: object, cb: Callback<unknown>): void;
  clear(cb: Callback<unknown>): void;
  del_queue(cb: Callback<unknown>): void;
  queues(options: object, cb: Callback<{ name: string }[]>): void;
  create_queue(name: string, options: object, cb: Callback<unknown>): void;
  queue(name: string): IronQueue;
}
const IronClient = (ironMq as unknown as {
  Client: new (options: Record<string, string | number>) => IronQueue;
}).Client;

/** The client calls some callbacks twice (`cb(cb(...))`): the first one wins. */
function iron<T>(call: (cb: Callback<T>) => void): Promise<T> {
  return new Promise((resolve, reject) =>
    call((error, result) => error ? reject(error) : resolve(result))
  );
}

const [serverUrl, token] = Deno.args;
if (serverUrl === undefined || token === undefined) {
  console.error("usage: iron_mq_client.ts http://127.0.0.1:PORT TOKEN");
  Deno.exit(2);
}
const url = new URL(serverUrl);
const options = {
  scheme: url.protocol.replace(":", ""),
  host: url.hostname,
  port: Number(url.port),
  token,
  project_id: "5f0c6c0a1d2e3f4a5b6c7d8e",
};

const client = new IronClient({ ...options, queue_name: "jobs" });
const queue = client.queue("jobs");
await iron((cb) => client.create_queue("jobs", { message_timeout: 120 }, cb));
const id = await iron((cb) => queue.post("first", cb));
assert.match(String(id), /^\d+$/);
const ids = await iron((cb) => queue.post(["second", "third"], cb));
assert.equal((ids as string[]).length, 2);
const info = await iron<QueueInfo>((cb) => queue.info(cb));
assert.equal(info.size, 3);
assert.equal(info.message_timeout, 120);
assert.deepEqual(await iron((cb) => client.queues({}, cb)), [{ name: "jobs" }]);

const one = await iron<Message>((cb) => queue.reserve({ n: 1 }, cb));
assert.equal(one.body, "first");
const touched = await iron<{ reservation_id: string }>((cb) =>
  queue.msg_touch(one.id, one.reservation_id!, { timeout: 60 }, cb)
);
assert.notEqual(touched.reservation_id, one.reservation_id);
await iron((cb) => queue.msg_release(one.id, touched.reservation_id, {}, cb));
assert.equal(
  (await iron<Message>((cb) => queue.msg_get(one.id, cb))).body,
  "first",
);
const peeked = await iron<Message[]>((cb) => queue.peek({ n: 3 }, cb));
assert.deepEqual(peeked.map((m) => m.body), ["first", "second", "third"]);

const two = await iron<Message[]>((cb) => queue.reserve({ n: 2 }, cb));
// "first": reserved, touched (counts, as Iron.io documents), reserved again.
assert.deepEqual(two.map((m) => [m.body, m.reserved_count]), [
  ["first", 3],
  ["second", 1],
]);
await assert.rejects(
  iron((cb) => queue.del(two[0].id, { reservation_id: "wrong" }, cb)),
  /reservation_id/,
);
await iron((cb) =>
  queue.del(two[0].id, { reservation_id: two[0].reservation_id }, cb)
);
await iron((cb) =>
  queue.del_multiple({
    reservation_ids: [{ id: two[1].id, reservation_id: two[1].reservation_id }],
  }, cb)
);
assert.equal((await iron<QueueInfo>((cb) => queue.info(cb))).size, 1);
await iron((cb) => queue.clear(cb));
assert.equal((await iron<QueueInfo>((cb) => queue.info(cb))).size, 0);
await iron((cb) => queue.del_queue(cb));
// The client reports a 404 from info as "Unknown error"; the caller checks
// the server's own answer.
await assert.rejects(iron<QueueInfo>((cb) => queue.info(cb)));

const intruder = new IronClient({ ...options, token: "wrong" });
await assert.rejects(
  iron((cb) => intruder.queue("jobs").post("x", cb)),
  /Unauthorized/,
);
console.log("iron_mq: every call answered as Iron.io's client expects");
