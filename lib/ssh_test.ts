/** Tests of lib/ssh.ts: the SSH runner against a real sshd on loopback. */
import { Buffer } from "node:buffer";
import { planCommand } from "./message.ts";
import { fingerprint } from "./ssh.ts";
import {
  childPids,
  crashSessions,
  endOrphans,
  freePort,
  keygen,
  killChildren,
  needs,
  sshdMissing,
  startSshd,
  withSshd,
} from "../test/sshd.ts";
import { memoryLog, mulberry32, until } from "../test/support.ts";
import assert from "node:assert/strict";
import { poolFor, randomArgs, runCollect } from "../test/fixtures.ts";

/** Tests that need OpenSSH (sshd, ssh-keygen): skipped with a reason, or failing under CI. */
const sshdTest = needs(sshdMissing(), "tests with a real sshd");

Deno.test({
  name: "fingerprint: the same as ssh-keygen -l",
  ...sshdTest,
  fn: async () => {
    const dir = await Deno.makeTempDir();
    try {
      await keygen(`${dir}/k`);
      const pub = (await Deno.readTextFile(`${dir}/k.pub`)).split(" ");
      const listed = await new Deno.Command("ssh-keygen", {
        args: ["-l", "-f", `${dir}/k.pub`],
        stdout: "piped",
      }).output();
      const expected = new TextDecoder().decode(listed.stdout).split(" ")[1];
      assert.equal(fingerprint(Buffer.from(pub[1], "base64")), expected);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "ssh: output, exit status and stderr come back from a real sshd",
  ...sshdTest,
  fn: () =>
    withSshd(async (sshd) => {
      const log = memoryLog();
      const pool = poolFor(sshd, log);
      try {
        await pool.ready(AbortSignal.timeout(10_000));
        const ok = await runCollect(pool, "echo hello; echo oops >&2");
        assert.deepEqual(ok.result, { kind: "exit", code: 0 });
        assert.equal(ok.stdout, "hello\n");
        assert.equal(ok.stderr, "oops\n");
        const bad = await runCollect(pool, "exit 7");
        assert.deepEqual(bad.result, { kind: "exit", code: 7 });
        const killed = await runCollect(pool, "kill -9 $$");
        assert.deepEqual(killed.result, { kind: "signal", signal: "SIGKILL" });
      } finally {
        pool.close();
      }
    }),
});

Deno.test({
  name:
    "ssh: property: 10,000 random argument lists arrive as the remote argv exactly",
  ...sshdTest,
  fn: () =>
    withSshd(async (sshd) => {
      const runs = Number(Deno.env.get("PROPERTY_RUNS") ?? 10_000);
      const seed = Number(Deno.env.get("PROPERTY_SEED") ?? Date.now() % 1e9);
      const random = mulberry32(seed);
      const log = memoryLog();
      const pool = poolFor(sshd, log, {}, 8);
      let checked = 0;
      try {
        await pool.ready(AbortSignal.timeout(10_000));
        const lists = Array.from({ length: runs }, () => randomArgs(random));
        let next = 0;
        await Promise.all(Array.from({ length: 8 }, async () => {
          while (next < lists.length) {
            const args = lists[next++];
            const plan = planCommand(
              "printf '%s\\0'",
              JSON.stringify({ args }),
            );
            assert.ok(plan.ok, `seed ${seed}: ${JSON.stringify(args)}`);
            const { result, stdout } = await runCollect(
              pool,
              `${plan.command}; printf 'END'`,
            );
            assert.deepEqual(result, { kind: "exit", code: 0 });
            const argv = stdout.slice(0, -"END".length).split("\0");
            argv.pop();
            // printf with no arguments still prints the format once.
            const expected = args.length === 0 ? [""] : args;
            assert.deepEqual(
              argv,
              expected,
              `seed ${seed}: ${JSON.stringify(args)}`,
            );
            checked++;
          }
        }));
      } finally {
        pool.close();
      }
      assert.equal(checked, runs);
      console.log(`property: ${checked} argument lists matched (seed ${seed})`);
    }),
});

async function processGone(pid: number, withinMs: number): Promise<boolean> {
  const deadline = Date.now() + withinMs;
  while (Date.now() < deadline) {
    try {
      await Deno.stat(`/proc/${pid}`);
    } catch {
      return true;
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  return false;
}

Deno.test({
  name: "ssh: a command past its timeout is stopped on the remote side",
  ...sshdTest,
  fn: () =>
    withSshd(async (sshd) => {
      const pool = poolFor(sshd, memoryLog());
      try {
        await pool.ready(AbortSignal.timeout(10_000));
        const started = Date.now();
        const pidFile = `${sshd.dir}/pid`;
        await Deno.chmod(sshd.dir, 0o777);
        const { result } = await runCollect(
          pool,
          `echo $$ > ${pidFile}; exec sleep 30`,
          { timeoutMs: 300 },
        );
        assert.deepEqual(result, { kind: "timeout" });
        assert.ok(Date.now() - started < 5_000, "stopped promptly");
        const pid = Number(await Deno.readTextFile(pidFile));
        assert.ok(
          await processGone(pid, 3_000),
          `remote pid ${pid} still runs`,
        );
      } finally {
        pool.close();
      }
    }),
});

Deno.test({
  name: "ssh: a host key that does not match runs nothing and says why",
  ...sshdTest,
  fn: () =>
    withSshd(async (sshd) => {
      const other = `${sshd.dir}/other`;
      await keygen(other);
      const otherKey = (await Deno.readTextFile(`${other}.pub`)).split(" ");
      await Deno.writeTextFile(
        sshd.knownHostsFile,
        `[127.0.0.1]:${sshd.port} ${otherKey[0]} ${otherKey[1]}\n`,
      );
      const marker = `${sshd.dir}/ran`;
      const log = memoryLog();
      const pool = poolFor(sshd, log, {
        SSH_STRICT_HOST_KEY_CHECKING: "accept-new",
      });
      try {
        await assert.rejects(pool.ready(AbortSignal.timeout(1_500)));
        const { result } = await runCollect(pool, `touch ${marker}`);
        assert.equal(result.kind, "unreachable");
        await assert.rejects(Deno.stat(marker), Deno.errors.NotFound);
        assert.match(
          log.lines.join("\n"),
          /HOST KEY MISMATCH for \[127\.0\.0\.1\]/,
        );
      } finally {
        pool.close();
      }
    }),
});

Deno.test({
  name: "ssh: unknown host key refused by default, remembered with accept-new",
  ...sshdTest,
  fn: () =>
    withSshd(async (sshd) => {
      await Deno.writeTextFile(sshd.knownHostsFile, "");
      const strictLog = memoryLog();
      const strict = poolFor(sshd, strictLog);
      try {
        await assert.rejects(strict.ready(AbortSignal.timeout(1_000)));
        assert.match(strictLog.lines.join("\n"), /host key of .* is unknown/);
      } finally {
        strict.close();
      }
      const log = memoryLog();
      const tofu = poolFor(sshd, log, {
        SSH_STRICT_HOST_KEY_CHECKING: "accept-new",
      });
      try {
        await tofu.ready(AbortSignal.timeout(10_000));
        const recorded = await Deno.readTextFile(sshd.knownHostsFile);
        assert.equal(recorded.trim(), sshd.knownHostsLine);
        assert.match(log.lines.join("\n"), /new host key ssh-ed25519 SHA256:/);
      } finally {
        tofu.close();
      }
    }),
});

Deno.test({
  name:
    "ssh: refused, wrong key and dropped connections name host, port, user and cause",
  ...sshdTest,
  fn: () =>
    withSshd(async (sshd) => {
      const log = memoryLog();
      const refused = poolFor(sshd, log, { SSH_PORT: String(freePort()) }, 1);
      await assert.rejects(refused.ready(AbortSignal.timeout(500)));
      refused.close();
      assert.match(
        log.lines.join("\n"),
        new RegExp(
          `${sshd.user}@127\\.0\\.0\\.1:\\d+: cannot connect: connection refused`,
        ),
      );

      const stranger = `${sshd.dir}/stranger`;
      await keygen(stranger);
      const authLog = memoryLog();
      const wrongKey = poolFor(sshd, authLog, { SSH_KEY_FILE: stranger });
      await assert.rejects(wrongKey.ready(AbortSignal.timeout(1_500)));
      wrongKey.close();
      assert.match(authLog.lines.join("\n"), /authentication failed/);

      const pool = poolFor(sshd, memoryLog());
      try {
        await pool.ready(AbortSignal.timeout(10_000));
        const running = runCollect(pool, "sleep 20");
        await new Promise((r) => setTimeout(r, 300));
        killChildren(sshd.pid);
        const { result } = await running;
        assert.equal(result.kind, "ssh-error");
        if (result.kind === "ssh-error") assert.match(result.error, /dropped/);
      } finally {
        pool.close();
      }
    }),
});

Deno.test({
  name:
    "ssh: a session that will not open (sshd's session processes gone, the connections alive) starts nothing there; the command runs once on a fresh connection",
  ...sshdTest,
  async fn() {
    let sshd = await startSshd();
    const log = memoryLog();
    // Eight at once: two connections of four channels.
    const pool = poolFor(sshd, log, {}, 8);
    let orphans: number[] = [];
    const shared = await Deno.makeTempDir();
    await Deno.chmod(shared, 0o777); // the remote user writes the markers
    try {
      const warm = await Promise.all(
        Array.from({ length: 8 }, () => runCollect(pool, "sleep 0.2")),
      );
      assert.deepEqual(warm.map((r) => r.result.kind), Array(8).fill("exit"));
      assert.equal(log.lines.filter((l) => /: connected$/.test(l)).length, 2);
      ({ sshd, orphans } = await crashSessions(sshd));
      assert.ok(
        orphans.length === 2 && orphans.every((p) => childPids(1).includes(p)),
        `both connections' network halves live on: ${orphans}`,
      );

      // The first command meets a dead connection: it retires the other too.
      const first = await runCollect(
        pool,
        `echo 0 >> ${shared}/ran; echo ran 0`,
      );
      const warned = () =>
        log.lines.filter((l) => /the command did not start/.test(l)).length;
      assert.deepEqual([first.result, first.stdout], [
        { kind: "exit", code: 0 },
        "ran 0\n",
      ]);
      assert.equal(warned(), 1, log.lines.join("\n"));
      // Refused on a live connection, it retires the others; when sshd had
      // closed the connections first, they left the pool as they closed and
      // there is none to retire (what follows checks none is used again).
      if (
        !/connection closed before the command started/.test(
          log.lines.join("\n"),
        )
      ) {
        assert.match(
          log.lines.join("\n"),
          /retiring \d connection\(s\) after a session would not open/,
        );
      }
      // The rest never meet an old connection.
      const runs = await Promise.all(
        Array.from(
          { length: 5 },
          (_, i) =>
            runCollect(
              pool,
              `echo ${i + 1} >> ${shared}/ran; echo ran ${i + 1}`,
            ),
        ),
      );
      assert.deepEqual(
        runs.map((r) => [r.result, r.stdout]),
        Array.from({ length: 5 }, (_, i) => [
          { kind: "exit", code: 0 },
          `ran ${i + 1}\n`,
        ]),
      );
      assert.equal(warned(), 1, log.lines.join("\n"));
      const ran = (await Deno.readTextFile(`${shared}/ran`)).split("\n")
        .filter((l) => l !== "").sort();
      assert.deepEqual(ran, ["0", "1", "2", "3", "4", "5"], "each ran once");
      const text = log.lines.join("\n");
      assert.match(text, /the command did not start: trying it on a new/);
      assert.doesNotMatch(text, /dropped while the command was running/);
      assert.equal(pool.reachable(), true);
    } finally {
      pool.close();
      await sshd.stop();
      endOrphans(orphans);
      await Deno.remove(sshd.dir, { recursive: true });
      await Deno.remove(shared, { recursive: true });
    }
  },
});

Deno.test({
  name:
    "ssh: a host that accepts connections but opens no session is unreachable after a few fresh connections, and nothing ran",
  ...sshdTest,
  fn: () =>
    withSshd(async (sshd) => {
      const log = memoryLog();
      const pool = poolFor(sshd, log);
      const marker = `${sshd.dir}/ran`;
      try {
        await pool.ready(AbortSignal.timeout(10_000));
        const { result } = await runCollect(pool, `touch ${marker}`);
        assert.equal(result.kind, "unreachable");
        assert.match(
          result.kind === "unreachable" ? result.error : "",
          /^cannot open a session \(.*open failed.*; tried 3 connection\(s\)\): nothing ran$/,
        );
        await assert.rejects(Deno.stat(marker), Deno.errors.NotFound);
        assert.equal(log.lines.filter((l) => /: connected$/.test(l)).length, 3);
        // Unreachable, as a refused connection is: the worker holds back
        // (a connection alone would pass), then tries a command again.
        assert.equal(pool.reachable(), false);
        await assert.rejects(pool.ready(AbortSignal.timeout(500)));
        assert.equal(pool.reachable(), false);
        await pool.ready(AbortSignal.timeout(10_000));
      } finally {
        pool.close();
      }
    }, { config: ["MaxSessions 0"] }),
});

/**
 * A TCP relay to sshd that can turn into a black hole: after `freeze()`, the
 * connections open then stay open but carry nothing (a dead route, a NAT that
 * forgot them); new connections still go through.
 */
function startRelay(targetPort: number) {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const conns: Deno.Conn[] = [];
  const frozen = new Set<Deno.Conn>();
  const pipe = async (from: Deno.Conn, to: Deno.Conn) => {
    const buffer = new Uint8Array(64 * 1024);
    try {
      for (;;) {
        const n = await from.read(buffer);
        if (n === null) break;
        if (!frozen.has(from)) await to.write(buffer.subarray(0, n));
      }
    } catch {
      // closed
    }
  };
  const accepting = (async () => {
    for await (const client of listener) {
      const server = await Deno.connect({
        hostname: "127.0.0.1",
        port: targetPort,
      });
      conns.push(client, server);
      pipe(client, server);
      pipe(server, client);
    }
  })().catch(() => {});
  return {
    port: (listener.addr as Deno.NetAddr).port,
    freeze: () => conns.forEach((c) => frozen.add(c)),
    async close() {
      listener.close();
      for (const c of conns) {
        try {
          c.close();
        } catch {
          // already closed
        }
      }
      await accepting;
    },
  };
}

Deno.test({
  name:
    "ssh: a connection that silently stops forwarding is noticed within about 15 s, and the next command runs",
  ...sshdTest,
  fn: () =>
    withSshd(async (sshd) => {
      const relay = startRelay(sshd.port);
      await Deno.writeTextFile(
        sshd.knownHostsFile,
        sshd.knownHostsLine.replace(`]:${sshd.port} `, `]:${relay.port} `) +
          "\n",
        { append: true },
      );
      const log = memoryLog();
      const pool = poolFor(sshd, log, { SSH_PORT: String(relay.port) });
      const shared = await Deno.makeTempDir();
      await Deno.chmod(shared, 0o777); // the remote user writes the marker
      const marker = `${shared}/started`;
      try {
        await pool.ready(AbortSignal.timeout(10_000));
        const running = runCollect(pool, `touch ${marker}; sleep 60`);
        await until("the command started", async () => {
          try {
            await Deno.stat(marker);
            return true;
          } catch {
            return false;
          }
        });
        relay.freeze();
        const frozenAt = Date.now();
        const { result } = await running;
        const noticedAfter = Date.now() - frozenAt;
        assert.equal(result.kind, "ssh-error");
        assert.ok(
          noticedAfter < 20_000,
          `noticed after ${noticedAfter} ms (keepalive: about 15 s at most)`,
        );
        const next = await runCollect(pool, "echo back");
        assert.deepEqual(next.result, { kind: "exit", code: 0 });
        assert.equal(next.stdout, "back\n");
      } finally {
        pool.close();
        await relay.close();
        await Deno.remove(shared, { recursive: true });
      }
    }),
});
