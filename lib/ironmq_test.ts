/** Tests of lib/ironmq.ts: the queue client against a server that misbehaves. */
import { IronMqClient, ReplyTooLarge } from "./ironmq.ts";
import assert from "node:assert/strict";

Deno.test("queue client: a reply larger than its limit is not read whole", async () => {
  let sent = 0;
  const chunk = new Uint8Array(1024 * 1024).fill(0x20);
  const server = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: () => {} },
    () =>
      new Response(
        new ReadableStream({
          pull(controller) {
            // 400 MB of white space, made only as fast as it is read.
            if (sent >= 400 * chunk.length) return controller.close();
            sent += chunk.length;
            controller.enqueue(chunk);
          },
        }),
        { headers: { "content-type": "application/json" } },
      ),
  );
  try {
    const client = new IronMqClient({
      baseUrl: `http://127.0.0.1:${server.addr.port}`,
      projectId: "p",
      queueName: "q",
    });
    await assert.rejects(
      client.reserve(100, 60, 0),
      (e) => e instanceof ReplyTooLarge && /over \d+ bytes/.test(e.message),
    );
    assert.ok(sent < 64 * chunk.length, `the server sent ${sent} bytes`);
  } finally {
    await server.shutdown();
  }
});
