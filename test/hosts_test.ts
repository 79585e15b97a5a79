/**
 * Many hosts (issue 11): one message fanned out to several real sshd
 * addresses on loopback, per-host results, only the failed hosts retried,
 * narrowing, jump hosts and idle connections.
 */
import assert from "node:assert/strict";
import {
  type Config,
  loadSshCredentials,
  parseConfig,
  permissionFlags,
  servedHosts,
} from "../lib/config.ts";
import { hostKey, parseHostList, parseJump } from "../lib/hosts.ts";
import { QueueError } from "../lib/ironmq.ts";
import { planMessage } from "../lib/message.ts";
import { realClock } from "../lib/retry.ts";
import { SshHosts } from "../lib/ssh.ts";
import { Worker } from "../tasks.ts";
import { type Env } from "../lib/util.ts";
import { freePort, needs, type Sshd, sshdMissing, startSshd } from "./sshd.ts";
import {
  baseEnv,
  memoryLog,
  startTestQueue,
  type TestQueue,
  until,
} from "./support.ts";

const sshdTest = needs(sshdMissing(), "sshd tests");

/** The worker's configuration for these sshd servers and this catalog. */
function configFor(
  sshd: Sshd,
  knownHostsFile: string,
  catalog: string | undefined,
  env: Env = {},
): Config {
  return parseConfig(
    {
      SSH_HOST: sshd.host,
      SSH_PORT: String(sshd.port),
      SSH_USER: sshd.user,
      SSH_KEY_FILE: sshd.clientKeyFile,
      SSH_KNOWN_HOSTS: knownHostsFile,
      SSH_CONNECT_TIMEOUT: "5",
      TASK_RETRY_DELAY: "0",
      IRON_MQ_QUEUE_NAME: "jobs",
      TASK_POLL_WAIT: "1",
      ...env,
    },
    {
      home: sshd.dir,
      user: sshd.user,
      ironJsonFiles: [],
      exists: () => false,
      catalogFile: catalog === undefined
        ? undefined
        : { path: `${sshd.dir}/tasks.yaml`, text: catalog, named: true },
    },
  );
}

/**
 * A configuration for tests that connect nowhere (a fake runner, or parsing
 * only): SSH_HOST 10.9.9.9 unless `env` says, an agent instead of a key.
 */
function offlineConfig(env: Env = {}, catalog?: string): Config {
  const sshd = {
    host: "10.9.9.9",
    port: 22,
    user: "op",
    dir: "/nonexistent",
    clientKeyFile: "/nonexistent/key",
  } as Sshd;
  return configFor(sshd, "/dev/null", catalog, {
    SSH_KEY_FILE: "",
    SSH_AUTH_SOCK: "/tmp/agent",
    ...env,
  });
}

/** Stops each sshd and removes its folder. */
async function removeSshd(...servers: Sshd[]): Promise<void> {
  for (const server of servers) {
    await server.stop();
    await Deno.remove(server.dir, { recursive: true });
  }
}

/** What a command's run needs when its output does not matter. */
function quietIo() {
  return {
    onStdout: () => {},
    onStderr: () => {},
    timeoutMs: 0,
    signal: new AbortController().signal,
  };
}

/** A worker in this process on the test queue, with real SSH; stop() ends both. */
function startWorker(config: Config, queue: TestQueue) {
  const log = memoryLog();
  const runner = new SshHosts(
    config.ssh,
    loadSshCredentials(config.ssh),
    servedHosts(config.task),
    config.task.concurrency,
    log,
  );
  const worker = new Worker(
    config.task,
    { queue: queue.client, runner, log, clock: realClock },
    "jobs",
  );
  const controller = new AbortController();
  const done = worker.run(controller.signal);
  return {
    log,
    stop: async () => {
      controller.abort();
      await done;
      runner.close();
    },
  };
}

/** A remote command that says which address it was reached on, and counts its runs there. */
function whereCommand(dir: string, failOn = "none"): string {
  return `ip=$(echo "$SSH_CONNECTION" | cut -d' ' -f3); echo "on $ip"; echo run >> ${dir}/ran.$ip; [ "$ip" != ${failOn} ]`;
}

async function runsOn(dir: string, ip: string): Promise<number> {
  try {
    return (await Deno.readTextFile(`${dir}/ran.${ip}`)).split("\n").length -
      1;
  } catch {
    return 0;
  }
}

type Result = {
  status: string;
  hosts: Record<string, {
    exit_status: number | null;
    stdout: string;
    error: string | null;
  }>;
  attempts: number;
};

async function results(queue: TestQueue): Promise<Result[]> {
  return (await queue.peek("replies")).map((m) => JSON.parse(m.body));
}

Deno.test("hosts: SSH_HOST lists, jump chains and their mistakes are read with defaults", () => {
  const defaults = { user: "op", port: 22, jump: [] };
  const { hosts, problems } = parseHostList(
    "10.1.1.73, deploy@10.1.1.74:2222,[::1]:2200,::1,web-1.example.com",
    defaults,
  );
  assert.deepEqual(problems, []);
  assert.deepEqual(hosts.map(hostKey), [
    "op@10.1.1.73:22",
    "deploy@10.1.1.74:2222",
    "op@[::1]:2200",
    "op@[::1]:22",
    "op@web-1.example.com:22",
  ]);
  assert.deepEqual(hosts.map((h) => h.name), [
    "10.1.1.73",
    "deploy@10.1.1.74:2222",
    "[::1]:2200",
    "::1",
    "web-1.example.com",
  ]);
  const bad = parseHostList("a b,,x:99999,ok,ok,bad@user@h,h;rm", defaults);
  assert.equal(bad.problems.length, 6, bad.problems.join("\n"));
  assert.match(bad.problems.join("\n"), /"ok" is listed twice/);
  const { jump } = parseJump("bastion:2022,admin@inner", defaults);
  assert.deepEqual(jump.map(hostKey), ["op@bastion:2022", "admin@inner:22"]);
  assert.deepEqual(parseJump("none", defaults).jump, []);
  const behind = parseHostList("10.0.0.5", { ...defaults, jump });
  assert.equal(
    hostKey(behind.hosts[0]),
    "op@bastion:2022 > admin@inner:22 > op@10.0.0.5:22",
  );
});

Deno.test("hosts: catalog groups, per-task hosts and a message's narrowing", () => {
  const catalog = `
hosts:
  web: [10.1.1.73, "deploy@10.1.1.74:2222"]
  db: {hosts: [10.1.2.10], jump: "bastion.example:2022"}
tasks:
  uptime: {command: uptime, hosts: [web, db]}
  web_only: {command: uptime, hosts: [web]}
  anywhere: {command: uptime}
`;
  const config = offlineConfig({}, catalog);
  const tasks = config.task.catalog!.tasks;
  assert.deepEqual(tasks.get("uptime")!.hosts!.map(hostKey), [
    "op@10.1.1.73:22",
    "deploy@10.1.1.74:2222",
    "op@bastion.example:2022 > op@10.1.2.10:22",
  ]);
  assert.equal(tasks.get("anywhere")!.hosts, undefined);
  // The worker serves every host its tasks name, and SSH_HOST's.
  assert.deepEqual(servedHosts(config.task).map((h) => h.name), [
    "10.9.9.9",
    "10.1.1.73",
    "deploy@10.1.1.74:2222",
    "10.1.2.10",
  ]);
  const plan = (body: unknown) =>
    planMessage(
      JSON.stringify(body),
      config.task.catalog,
      "",
      Date.now(),
      config.task.hosts,
    );
  const on = (body: unknown) => {
    const p = plan(body);
    return p.kind === "run" ? p.hosts.map((h) => h.name) : p;
  };
  assert.deepEqual(on({ task: "uptime" }), [
    "10.1.1.73",
    "deploy@10.1.1.74:2222",
    "10.1.2.10",
  ]);
  assert.deepEqual(on({ task: "uptime", hosts: ["db"] }), ["10.1.2.10"]);
  assert.deepEqual(on({ task: "uptime", hosts: ["10.1.1.73", "db"] }), [
    "10.1.1.73",
    "10.1.2.10",
  ]);
  assert.deepEqual(on({ task: "anywhere" }), ["10.9.9.9"]);
  for (
    const [body, reason] of [
      [{ task: "web_only", hosts: ["db"] }, /"db", outside this task's hosts/],
      [{ task: "uptime", hosts: ["10.6.6.6"] }, /outside this task's hosts/],
      [{ task: "uptime", hosts: [] }, /list of host or group names/],
      [{ task: "uptime", hosts: "web" }, /list of host or group names/],
    ] as const
  ) {
    const p = plan(body);
    assert.equal(p.kind, "reject", JSON.stringify(body));
    assert.match(p.kind === "reject" ? p.reason : "", reason);
  }
  // A continuation's retries carry the attempts its hosts have had.
  const again = plan({ task: "uptime", hosts: ["db"], retries: 2 });
  assert.equal(again.meta.priorRetries, 2);

  const mistakes = `
hosts:
  web: [10.1.1.73, "a b"]
  empty: []
  odd: {hosts: [h.example], jump: 7, port: 22}
tasks:
  t1: {command: uptime, hosts: [wbe]}
  t2: {command: uptime, hosts: web}
`;
  assert.throws(
    () => offlineConfig({}, mistakes),
    (e: Error) => {
      for (
        const expected of [
          /hosts\.web: "a b": write \[user@\]host\[:port\]/,
          /hosts\.empty: must be a list of hosts/,
          /hosts\.odd\.port: unknown field/,
          /hosts\.odd\.jump: must be/,
          /tasks\.t1\.hosts: "wbe" is not a group in hosts: \(web, empty, odd\)|tasks\.t1\.hosts: "wbe" is not a group/,
          /tasks\.t2\.hosts: must be a list/,
        ]
      ) assert.match(e.message, expected);
      return true;
    },
  );
});

Deno.test({
  name:
    "hosts: a group fan-out runs on each host once, with each host's own output in the log and the result",
  ...sshdTest,
  async fn() {
    const sshd = await startSshd({
      addresses: ["127.0.0.2", "127.0.0.3", "127.0.0.4"],
    });
    const queue = await startTestQueue();
    await Deno.chmod(sshd.dir, 0o777);
    const catalog = `
hosts:
  web: [127.0.0.2, 127.0.0.3]
  db: [127.0.0.4]
tasks:
  where: {command: ${JSON.stringify(whereCommand(sshd.dir))}, hosts: [web, db]}
`;
    const worker = startWorker(
      configFor(sshd, sshd.knownHostsFile, catalog),
      queue,
    );
    try {
      const [id] = await queue.post([
        JSON.stringify({ task: "where", reply_to: "replies" }),
      ]);
      await until(
        "one result",
        async () => (await results(queue)).length === 1,
      );
      const [result] = await results(queue);
      assert.equal(result.status, "SUCCESS");
      assert.deepEqual(
        Object.fromEntries(
          Object.entries(result.hosts).map(([h, r]) => [h, r.stdout]),
        ),
        {
          "127.0.0.2": "on 127.0.0.2\n",
          "127.0.0.3": "on 127.0.0.3\n",
          "127.0.0.4": "on 127.0.0.4\n",
        },
      );
      const log = worker.log.lines;
      assert.ok(
        log.includes(`message ${id}: where on 3 hosts`),
        log.join("\n"),
      );
      for (const ip of ["127.0.0.2", "127.0.0.3", "127.0.0.4"]) {
        assert.ok(log.includes(`[${ip}] out: on ${ip}`), log.join("\n"));
        assert.equal(await runsOn(sshd.dir, ip), 1);
      }
      assert.ok(log.includes(`message ${id}: 3 of 3 hosts succeeded`));

      // Narrowed to one group: only its host runs.
      await queue.post([
        JSON.stringify({ task: "where", hosts: ["db"], reply_to: "replies" }),
      ]);
      await until(
        "two results",
        async () => (await results(queue)).length === 2,
      );
      assert.deepEqual(Object.keys((await results(queue))[1].hosts), [
        "127.0.0.4",
      ]);
      assert.equal(await runsOn(sshd.dir, "127.0.0.4"), 2);
      assert.equal(await runsOn(sshd.dir, "127.0.0.2"), 1);

      // Narrowed to a host outside the task's set: nothing runs anywhere.
      await queue.post([
        JSON.stringify({
          task: "where",
          hosts: ["127.0.0.9"],
          reply_to: "replies",
        }),
      ]);
      await until(
        "three results",
        async () => (await results(queue)).length === 3,
      );
      const rejected = (await results(queue))[2];
      assert.equal(rejected.status, "REJECTED");
      assert.deepEqual(rejected.hosts, {});
      for (const ip of ["127.0.0.2", "127.0.0.3"]) {
        assert.equal(await runsOn(sshd.dir, ip), 1);
      }
      assert.equal(await runsOn(sshd.dir, "127.0.0.4"), 2);
    } finally {
      await worker.stop();
      await queue.close();
      await removeSshd(sshd);
    }
  },
});

Deno.test({
  name:
    "hosts: with one host down, one with a wrong host key and one failing, the others run once and only the failed ones are retried, then dead-lettered with each host's outcome",
  ...sshdTest,
  async fn() {
    const sshd = await startSshd({
      addresses: ["127.0.0.2", "127.0.0.3", "127.0.0.4"],
    });
    const impostor = await startSshd({ addresses: ["127.0.0.5"] });
    const queue = await startTestQueue();
    await Deno.chmod(sshd.dir, 0o777);
    // 127.0.0.5 shows the impostor's key where known_hosts has the other's.
    const knownHosts = `${sshd.dir}/known_hosts_all`;
    const key = sshd.knownHostsLine.split(" ").slice(1).join(" ");
    await Deno.writeTextFile(
      knownHosts,
      (await Deno.readTextFile(sshd.knownHostsFile)) +
        `[127.0.0.5]:${impostor.port} ${key}\n`,
    );
    const down = `127.0.0.9:${freePort()}`;
    const wrongKey = `127.0.0.5:${impostor.port}`;
    const catalog = `
hosts:
  web: [127.0.0.2, 127.0.0.3, 127.0.0.4]
tasks:
  mixed:
    command: ${JSON.stringify(whereCommand(sshd.dir, "127.0.0.4"))}
    hosts: [web, "${down}", "${wrongKey}"]
    max_attempts: 2
`;
    const worker = startWorker(
      configFor(sshd, knownHosts, catalog),
      queue,
    );
    try {
      const [id] = await queue.post([
        JSON.stringify({ id: "celery-1", task: "mixed", reply_to: "replies" }),
      ]);
      await until(
        "dead-lettered",
        async () => (await queue.peek("jobs_failed")).length === 1,
      );
      await until(
        "two results",
        async () => (await results(queue)).length === 2,
      );
      // The result is posted before the delete: the queue empties just after.
      await until(
        "the message deleted",
        async () => await queue.size("jobs") === 0,
      );
      // The hosts that succeeded ran once; the failing one once an attempt.
      assert.equal(await runsOn(sshd.dir, "127.0.0.2"), 1);
      assert.equal(await runsOn(sshd.dir, "127.0.0.3"), 1);
      assert.equal(await runsOn(sshd.dir, "127.0.0.4"), 2);

      const [retry, failure] = await results(queue);
      assert.equal(retry.status, "RETRY");
      assert.equal(retry.attempts, 1);
      const outcome = (r: Result) =>
        Object.fromEntries(
          Object.entries(r.hosts).map((
            [h, o],
          ) => [h, o.exit_status ?? o.error?.slice(0, 17)]),
        );
      assert.deepEqual(outcome(retry), {
        "127.0.0.2": 0,
        "127.0.0.3": 0,
        "127.0.0.4": 1,
        [down]: "connection refuse",
        [wrongKey]: "HOST KEY MISMATCH",
      });
      assert.equal(failure.status, "FAILURE");
      assert.equal(failure.attempts, 2);
      assert.deepEqual(outcome(failure), {
        "127.0.0.4": 1,
        [down]: "connection refuse",
        [wrongKey]: "HOST KEY MISMATCH",
      });

      const [dead] = await queue.peek("jobs_failed");
      const record = JSON.parse(dead.body);
      assert.equal(record.attempts, 2);
      assert.match(
        record.reason,
        /^3 of 3 hosts failed: 127\.0\.0\.4 \(exit 1\)/,
      );
      assert.deepEqual(Object.keys(record.hosts), [
        "127.0.0.4",
        down,
        wrongKey,
      ]);
      // Run again from the dead letters, it runs on the failed hosts only, afresh.
      assert.deepEqual(JSON.parse(record.body), {
        id: "celery-1",
        task: "mixed",
        reply_to: "replies",
        hosts: ["127.0.0.4", down, wrongKey],
      });
      const log = worker.log.lines.join("\n");
      assert.match(
        log,
        new RegExp(
          `message ${id}: 2 of 5 hosts succeeded; failed: 127\\.0\\.0\\.4 \\(exit 1\\), ${down} \\(ssh: connection refused`,
        ),
      );
      assert.match(log, /the failed hosts run again as message \d+ in 0 s/);
    } catch (e) {
      console.log(worker.log.lines.join("\n"));
      throw e;
    } finally {
      await worker.stop();
      await queue.close();
      await removeSshd(sshd, impostor);
    }
  },
});

Deno.test({
  name:
    "hosts: through a jump host, one connection to it carries the commands to two hosts behind it, both keys checked",
  ...sshdTest,
  async fn() {
    const target = await startSshd({ addresses: ["127.0.0.6", "127.0.0.7"] });
    const jumpLog = `${target.dir}/jump.log`;
    const jump = await startSshd({
      config: ["AllowTcpForwarding yes", "LogLevel DEBUG1"],
      logFile: jumpLog,
    });
    // One client key for both.
    await Deno.copyFile(
      `${target.dir}/authorized_keys`,
      `${jump.dir}/authorized_keys`,
    );
    const queue = await startTestQueue();
    await Deno.chmod(target.dir, 0o777);
    const knownHosts = `${target.dir}/known_hosts_all`;
    await Deno.writeTextFile(
      knownHosts,
      (await Deno.readTextFile(target.knownHostsFile)) + jump.knownHostsLine +
        "\n",
    );
    const env = {
      SSH_HOST: "127.0.0.6,127.0.0.7",
      SSH_PROXY_JUMP: `127.0.0.1:${jump.port}`,
      TASK_COMMAND: whereCommand(target.dir),
      TASK_RESULTS_QUEUE: "replies",
    };
    const config = configFor(target, knownHosts, undefined, env);
    // The worker itself is granted only the jump host.
    assert.ok(
      servedHosts(config.task).every((h) =>
        h.jump.length === 1 && h.jump[0].port === jump.port
      ),
    );
    const worker = startWorker(config, queue);
    try {
      await queue.post(["hello"]);
      await until(
        "one result",
        async () => (await results(queue)).length === 1,
      );
      const [result] = await results(queue);
      assert.equal(result.status, "SUCCESS");
      assert.equal(result.hosts["127.0.0.6"].stdout, "on 127.0.0.6\n");
      assert.equal(result.hosts["127.0.0.7"].stdout, "on 127.0.0.7\n");
      const sshdLog = await Deno.readTextFile(jumpLog);
      assert.equal(
        sshdLog.match(/Accepted publickey/g)?.length,
        1,
        "one connection to the jump host",
      );
      for (const ip of ["127.0.0.6", "127.0.0.7"]) {
        assert.ok(
          sshdLog.includes(
            `server_request_direct_tcpip: originator 127.0.0.1 port 0, target ${ip} port ${target.port}`,
          ),
          sshdLog,
        );
      }
    } finally {
      await worker.stop();
    }

    // A wrong key for the jump host, then for a host behind it: nothing runs.
    const wrong = (line: string) =>
      line.replace(
        / \S+$/,
        " AAAAC3NzaC1lZDI1NTE5AAAAIMzc3+YQkfQm9TD5aWIr6OWXh8kjmr8/7cBn4m/qG0Bh",
      );
    for (const bad of ["jump", "target"] as const) {
      const lines = (await Deno.readTextFile(knownHosts)).trim().split("\n")
        .map((l) =>
          (bad === "jump"
              ? l.startsWith("[127.0.0.1]")
              : l.startsWith("[127.0.0.6]"))
            ? wrong(l)
            : l
        );
      const badFile = `${target.dir}/known_hosts_${bad}`;
      await Deno.writeTextFile(badFile, lines.join("\n") + "\n");
      const badConfig = configFor(target, badFile, undefined, {
        ...env,
        SSH_HOST: "127.0.0.6",
      });
      const log = memoryLog();
      const hosts = new SshHosts(
        badConfig.ssh,
        loadSshCredentials(badConfig.ssh),
        badConfig.task.hosts,
        1,
        log,
      );
      try {
        const result = await hosts.run(
          badConfig.task.hosts[0],
          "true",
          quietIo(),
        );
        assert.equal(result.kind, "unreachable");
        assert.match(
          result.kind === "unreachable" ? result.error : "",
          bad === "jump"
            ? /HOST KEY MISMATCH for \[127\.0\.0\.1\]/
            : /HOST KEY MISMATCH for \[127\.0\.0\.6\]/,
        );
      } finally {
        hosts.close();
      }
    }
    await queue.close();
    await removeSshd(target, jump);
  },
});

Deno.test({
  name:
    "hosts: a connection unused for SSH_IDLE_TIMEOUT is closed, and reopened when needed",
  ...sshdTest,
  async fn() {
    const sshd = await startSshd();
    const config = configFor(sshd, sshd.knownHostsFile, undefined, {
      SSH_IDLE_TIMEOUT: "1",
    });
    const log = memoryLog();
    const hosts = new SshHosts(
      config.ssh,
      loadSshCredentials(config.ssh),
      config.task.hosts,
      1,
      log,
    );
    const io = quietIo();
    const connected = () =>
      log.lines.filter((l) => / connected$/.test(l)).length;
    const closed = () =>
      log.lines.filter((l) =>
        /closing a connection unused for 1 s \(SSH_IDLE_TIMEOUT\)/.test(l)
      ).length;
    try {
      // The connection `ready` opens, unused by any command, closes too.
      await hosts.ready(AbortSignal.timeout(10_000));
      assert.equal(connected(), 1);
      await until("the connection ready opened closed", () => closed() === 1);
      log.lines.length = 0;
      assert.deepEqual(await hosts.run(config.task.hosts[0], "true", io), {
        kind: "exit",
        code: 0,
      });
      assert.equal(connected(), 1);
      await until("the idle connection closed", () => closed() === 1);
      assert.deepEqual(await hosts.run(config.task.hosts[0], "true", io), {
        kind: "exit",
        code: 0,
      });
      assert.equal(connected(), 2);
    } finally {
      hosts.close();
      await removeSshd(sshd);
    }
  },
});

Deno.test({
  name:
    "hosts: the worker holds back only while every host is unreachable; one host up is enough",
  ...sshdTest,
  async fn() {
    const sshd = await startSshd();
    const down = `127.0.0.9:${freePort()}`;
    const log = memoryLog();
    const runnerFor = (list: string) => {
      const config = configFor(sshd, sshd.knownHostsFile, undefined, {
        SSH_HOST: list,
      });
      return {
        config,
        hosts: new SshHosts(
          config.ssh,
          loadSshCredentials(config.ssh),
          config.task.hosts,
          1,
          log,
        ),
      };
    };
    const io = quietIo();
    const allDown = runnerFor(`${down},127.0.0.10:${freePort()}`);
    const oneUp = runnerFor(`${down},127.0.0.1`);
    try {
      await assert.rejects(allDown.hosts.ready(AbortSignal.timeout(1_500)));
      assert.equal(allDown.hosts.reachable(), false);
      assert.match(
        log.lines.join("\n"),
        /ssh: none of the 2 hosts can be reached: connection refused/,
      );

      // The first host is down: the others are tried at once.
      await oneUp.hosts.ready(AbortSignal.timeout(10_000));
      const [first] = oneUp.config.task.hosts;
      const result = await oneUp.hosts.run(first, "true", io);
      assert.equal(result.kind, "unreachable");
      assert.equal(oneUp.hosts.reachable(), true);
    } finally {
      allDown.hosts.close();
      oneUp.hosts.close();
      await removeSshd(sshd);
    }
  },
});

Deno.test("hosts: a message's hosts run at most TASK_HOST_PARALLELISM at once, and ./start grants only the first hop", async () => {
  const queue = await startTestQueue();
  const config = offlineConfig({
    SSH_HOST: "10.0.0.1,10.0.0.2,10.0.0.3,10.0.0.4,10.0.0.5",
    SSH_PROXY_JUMP: "bastion.example:2022",
    TASK_HOST_PARALLELISM: "2",
    TASK_RESULTS_QUEUE: "replies",
  });
  let running = 0;
  let most = 0;
  const ran: string[] = [];
  const runner = {
    ready: () => Promise.resolve(),
    reachable: () => true,
    run: async (host: { name: string }) => {
      running++;
      most = Math.max(most, running);
      ran.push(host.name);
      await new Promise((r) => setTimeout(r, 20));
      running--;
      return { kind: "exit" as const, code: 0 };
    },
    close: () => {},
  };
  const log = memoryLog();
  const worker = new Worker(
    config.task,
    { queue: queue.client, runner, log, clock: realClock },
    "jobs",
  );
  const controller = new AbortController();
  const done = worker.run(controller.signal);
  try {
    await queue.post(["go"]);
    await until(
      "the result",
      async () => (await queue.peek("replies")).length === 1,
    );
    assert.equal(most, 2);
    assert.deepEqual(ran.sort(), [
      "10.0.0.1",
      "10.0.0.2",
      "10.0.0.3",
      "10.0.0.4",
      "10.0.0.5",
    ]);
  } finally {
    controller.abort();
    await done;
    await queue.close();
  }
  const net = permissionFlags(config, [], false).find((f) =>
    f.startsWith("--allow-net=")
  );
  assert.equal(
    net,
    "--allow-net=127.0.0.1:8080,bastion.example:2022,unix:/tmp/agent",
  );
});

Deno.test({
  name:
    "hosts: deno task send --hosts narrows, and --wait shows the RETRY, then the last result and its exit status",
  ...sshdTest,
  async fn() {
    const sshd = await startSshd({ addresses: ["127.0.0.2", "127.0.0.3"] });
    await Deno.chmod(sshd.dir, 0o777);
    // 127.0.0.3 fails its first run only.
    const flaky =
      `ip=$(echo "$SSH_CONNECTION" | cut -d' ' -f3); echo "on $ip"; echo run >> ${sshd.dir}/ran.$ip; [ "$ip" != 127.0.0.3 ] || [ -e ${sshd.dir}/seen ] || { touch ${sshd.dir}/seen; exit 4; }`;
    const catalog = `
hosts:
  web: [127.0.0.2, 127.0.0.3]
tasks:
  flaky: {command: ${JSON.stringify(flaky)}, hosts: [web]}
`;
    await Deno.writeTextFile(`${sshd.dir}/tasks.yaml`, catalog);
    const queue = await startTestQueue({}, "local", "jobs");
    const worker = startWorker(
      configFor(sshd, sshd.knownHostsFile, catalog),
      queue,
    );
    const send = async (args: string[]) => {
      const out = await new Deno.Command("deno", {
        args: ["task", "-q", "send", ...args],
        env: {
          ...baseEnv(sshd.dir),
          MQ_PORT: new URL(queue.server.url).port,
          IRON_MQ_QUEUE_NAME: "jobs",
          TASKS_FILE: `${sshd.dir}/tasks.yaml`,
        },
        clearEnv: true,
        stdin: "null",
      }).output();
      const text = new TextDecoder().decode(out.stdout) +
        new TextDecoder().decode(out.stderr);
      return { code: out.code, text };
    };
    try {
      const outside = await send(["flaky", "--hosts", "db"]);
      assert.equal(outside.code, 2, outside.text);
      assert.match(outside.text, /"db", outside this task's hosts/);

      const waited = await send(["flaky", "--wait=60"]);
      assert.equal(waited.code, 0, waited.text);
      assert.match(waited.text, /\[127\.0\.0\.3\] exit: 4/);
      assert.match(
        waited.text,
        /RETRY: the failed hosts run again \(1 of 2 hosts failed: 127\.0\.0\.3 \(exit 4\)\)/,
      );
      // The last result: only the host that ran again, exit 0.
      assert.match(waited.text, /\[127\.0\.0\.3\] exit: 0 \(message 2,/);
      assert.equal(await runsOn(sshd.dir, "127.0.0.2"), 1);
      assert.equal(await runsOn(sshd.dir, "127.0.0.3"), 2);

      const narrowed = await send([
        "flaky",
        "--hosts",
        "127.0.0.2",
        "--wait=60",
      ]);
      assert.equal(narrowed.code, 0, narrowed.text);
      assert.doesNotMatch(narrowed.text, /127\.0\.0\.3/);
      assert.equal(await runsOn(sshd.dir, "127.0.0.2"), 2);
    } finally {
      await worker.stop();
      await queue.close();
      await removeSshd(sshd);
    }
  },
});

Deno.test("hosts: a stop during a fan-out starts no more hosts; those not run go on in a continuation, not counted as an attempt", async () => {
  const queue = await startTestQueue();
  const config = offlineConfig({
    SSH_HOST: "10.0.0.1,10.0.0.2,10.0.0.3,10.0.0.4",
    TASK_HOST_PARALLELISM: "1",
    TASK_SHUTDOWN_GRACE: "1",
    TASK_MAX_ATTEMPTS: "1",
  });
  const started: string[] = [];
  let running = () => {};
  const runner = {
    ready: () => Promise.resolve(),
    reachable: () => true,
    run: (host: { name: string }, _: string, io: { signal: AbortSignal }) => {
      started.push(host.name);
      if (host.name === "10.0.0.1") {
        return Promise.resolve({ kind: "exit" as const, code: 0 });
      }
      running();
      return new Promise<{ kind: "aborted" }>((resolve) =>
        io.signal.addEventListener("abort", () => resolve({ kind: "aborted" }))
      );
    },
    close: () => {},
  };
  const log = memoryLog();
  const worker = new Worker(
    config.task,
    { queue: queue.client, runner, log, clock: realClock },
    "jobs",
  );
  const controller = new AbortController();
  const done = worker.run(controller.signal);
  try {
    const second = new Promise<void>((resolve) => running = resolve);
    await queue.post(["go"]);
    await second;
    controller.abort();
    await done;
    assert.deepEqual(started, ["10.0.0.1", "10.0.0.2"]);
    assert.equal((await queue.peek("jobs_failed")).length, 0);
    const [next] = await queue.peek("jobs");
    assert.deepEqual(JSON.parse(next.body), {
      args: [],
      hosts: ["10.0.0.2", "10.0.0.3", "10.0.0.4"],
      retries: 0,
    });
  } finally {
    controller.abort();
    await done;
    await queue.close();
  }
});

Deno.test("hosts: a body that is not valid JSON is refused without quoting it (it may hold a secret)", () => {
  const plan = planMessage(
    '{"task":"deploy","kwargs":{"token": s3cr3t-hunter2-value}}',
    undefined,
    "true",
    Date.now(),
    [],
  );
  assert.equal(plan.kind, "reject");
  const reason = plan.kind === "reject" ? plan.reason : "";
  assert.match(reason, /not valid JSON/);
  assert.doesNotMatch(reason, /s3cr3t|hunter/);
});

Deno.test({
  name: "hosts: a jump host that cannot be reached is named as the jump host",
  ...sshdTest,
  async fn() {
    const sshd = await startSshd();
    const config = configFor(sshd, sshd.knownHostsFile, undefined, {
      SSH_PROXY_JUMP: `127.0.0.1:${freePort()}`,
    });
    const hosts = new SshHosts(
      config.ssh,
      loadSshCredentials(config.ssh),
      config.task.hosts,
      1,
      memoryLog(),
    );
    try {
      const result = await hosts.run(config.task.hosts[0], "true", quietIo());
      assert.equal(result.kind, "unreachable");
      assert.match(
        result.kind === "unreachable" ? result.error : "",
        /^jump host \S+@127\.0\.0\.1:\d+: connection refused/,
      );
    } finally {
      hosts.close();
      await removeSshd(sshd);
    }
  },
});

Deno.test("hosts: with SSH_KEY_FILE set, the default keys are not looked for (./start grants no read of them)", () => {
  const config = parseConfig(
    { SSH_KEY_FILE: "/keys/deploy", SSH_HOST: "10.0.0.1,10.0.0.2" },
    {
      home: "/home/op",
      user: "op",
      ironJsonFiles: [],
      exists: (path) => {
        throw new Error(`looked for ${path}`);
      },
    },
  );
  assert.equal(config.ssh.keyFile, "/keys/deploy");
});

Deno.test("hosts: while the queue refuses a continuation, the message stays reserved: the hosts that succeeded never run again", async () => {
  const queue = await startTestQueue();
  const config = offlineConfig({
    SSH_HOST: "10.0.0.1,10.0.0.2",
    TASK_MAX_ATTEMPTS: "2",
  });
  const ran: string[] = [];
  const runner = {
    ready: () => Promise.resolve(),
    reachable: () => true,
    run: (host: { name: string }) => {
      ran.push(host.name);
      return Promise.resolve({
        kind: "exit" as const,
        code: host.name === "10.0.0.1" ? 0 : 1,
      });
    },
    close: () => {},
  };
  // The queue answers 503 to the first 9 posts to "jobs" (more than one
  // request's own quick tries): the continuation waits for it.
  let refused = 0;
  const client = queue.client;
  const flaky = {
    ensureQueue: client.ensureQueue.bind(client),
    reserve: client.reserve.bind(client),
    delete: client.delete.bind(client),
    deleteBatch: client.deleteBatch.bind(client),
    release: client.release.bind(client),
    touch: client.touch.bind(client),
    postVerbatim: client.postVerbatim.bind(client),
    post: (name: string, bodies: string[], delay?: number) => {
      if (name === "jobs" && refused < 9) {
        refused++;
        return Promise.reject(new QueueError("HTTP 503", 503, true));
      }
      return client.post(name, bodies, delay);
    },
  };
  const log = memoryLog();
  const worker = new Worker(
    config.task,
    { queue: flaky, runner, log, clock: realClock },
    "jobs",
  );
  const controller = new AbortController();
  const done = worker.run(controller.signal);
  try {
    await queue.post(["go"]);
    await until(
      "dead-lettered after the second attempt",
      async () => (await queue.peek("jobs_failed")).length === 1,
      60_000,
    );
    assert.equal(refused, 9);
    assert.deepEqual(ran, ["10.0.0.1", "10.0.0.2", "10.0.0.2"]);
    const lines = log.lines.join("\n");
    assert.match(
      lines,
      /keeping it reserved while its continuation cannot be posted/,
    );
    assert.doesNotMatch(lines, /released for a retry/);
  } finally {
    controller.abort();
    await done;
    await queue.close();
  }
});
