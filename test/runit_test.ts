/**
 * The repository's run and log/run under a real runsv and svlogd: the worker is
 * the supervised process, its lines get svlogd's timestamps, `sv term` stops it
 * cleanly, and a bad setting waits for a fix instead of restarting every second.
 */
import assert from "node:assert/strict";
import { errorText } from "../lib/util.ts";
import {
  freePort,
  needs,
  run,
  type Sshd,
  sshdMissing,
  sshEnv,
  withSshd,
} from "./sshd.ts";
import { REPO, until } from "./support.ts";

function runitMissing(): string | undefined {
  for (
    const tool of [
      "/usr/bin/runsv",
      "/usr/bin/sv",
      "/usr/bin/svlogd",
      "/usr/bin/chpst",
    ]
  ) {
    try {
      Deno.statSync(tool);
    } catch {
      return `${tool} not found (apt-get install runit)`;
    }
  }
  if (Deno.uid() !== 0) return "the runit tests need root (run uses chpst -u)";
  return sshdMissing();
}

const runitTest = needs(runitMissing(), "the runit tests");

/** A copy of the repository's service directory, run by its own runsv. */
interface Service {
  dir: string;
  /** Writes env/<name>, as an administrator would. */
  setting(name: string, value: string): Promise<void>;
  /** The lines svlogd has written so far, each `<timestamp> <line>`. */
  lines(): Promise<string[]>;
  /** Waits for the `nth` line matching `pattern` (1 is the first) and returns it. */
  line(pattern: RegExp, nth?: number, ms?: number): Promise<string>;
  count(pattern: RegExp): Promise<number>;
}

/**
 * Runs `fn` with the service running under runsv as `sshd.user`, configured by
 * `settings` (files in env/); then takes it down and removes it and its log.
 */
async function withService(
  sshd: Sshd,
  settings: Record<string, string>,
  fn: (service: Service) => Promise<void>,
): Promise<void> {
  const base = await Deno.makeTempDir({ prefix: "tasks-runit-" });
  const name = `tasks-test-${crypto.randomUUID().slice(0, 8)}`;
  const dir = `${base}/${name}`;
  const logDir = `/var/log/${name}`;
  await Deno.chmod(base, 0o755);
  await Deno.mkdir(`${dir}/log`, { recursive: true });
  for (
    const file of [
      "run",
      "log/run",
      "start",
      "check",
      "tasks.ts",
      "deno.json",
      "deno.lock",
    ]
  ) {
    await Deno.copyFile(`${REPO}/${file}`, `${dir}/${file}`);
  }
  // The worker's parts, as a service directory holds them.
  await run("cp", ["-r", `${REPO}/lib`, `${dir}/lib`]);
  await Deno.chmod(sshd.clientKeyFile, 0o644); // the worker runs as sshd.user
  await Deno.mkdir(`${dir}/env`, { mode: 0o700 });
  const setting = (key: string, value: string) =>
    Deno.writeTextFile(`${dir}/env/${key}`, value + "\n");
  for (
    const [key, value] of Object.entries({
      TASKS_USER: sshd.user,
      ...sshEnv(sshd),
      MQ_PORT: String(freePort()),
      MQ_DB: ":memory:",
      ...settings,
    })
  ) {
    await setting(key, value);
  }
  const runsv = new Deno.Command("runsv", {
    args: [dir],
    env: { PATH: Deno.env.get("PATH") ?? "/usr/bin:/bin" },
    clearEnv: true,
    stdout: "null",
    stderr: "null",
  }).spawn();
  const current = () => Deno.readTextFile(`${logDir}/current`).catch(() => "");
  const lines = async () => (await current()).split("\n").filter((l) => l);
  const matching = async (pattern: RegExp) =>
    (await lines()).filter((l) => pattern.test(l));
  try {
    await fn({
      dir,
      setting,
      lines,
      async line(pattern, nth = 1, ms = 30_000) {
        let found: string | undefined;
        try {
          await until(
            `line ${nth} matching ${pattern} in ${logDir}/current`,
            async () =>
              (found = (await matching(pattern))[nth - 1]) !== undefined,
            ms,
          );
        } catch (e) {
          throw new Error(`${errorText(e)}; it holds:\n${await current()}`);
        }
        return found!;
      },
      count: async (pattern) => (await matching(pattern)).length,
    });
  } finally {
    await new Deno.Command("sv", { args: ["-w", "15", "down", dir] }).output();
    await new Deno.Command("sv", { args: ["exit", dir, `${dir}/log`] })
      .output();
    const ended = await Promise.race([
      runsv.status.then(() => true),
      new Promise((r) => setTimeout(() => r(false), 15_000)),
    ]);
    if (!ended) {
      runsv.kill("SIGKILL");
      await runsv.status;
    }
    await Deno.remove(base, { recursive: true });
    await Deno.remove(logDir, { recursive: true }).catch(() => {});
  }
}

/** svlogd's -tt timestamp at the start of a log line, in ms since the epoch. */
function loggedAt(line: string): number {
  const m = /^(\d{4}-\d\d-\d\d)_(\d\d:\d\d:\d\d\.\d{3})\d* /.exec(line);
  assert.ok(m, `no svlogd timestamp: ${line}`);
  return Date.parse(`${m[1]}T${m[2]}Z`);
}

/** The pid `sv status` names for a running service. */
async function supervisedPid(dir: string): Promise<number> {
  const status = await run("sv", ["status", dir]);
  assert.match(status, /^run: /);
  return Number(/\(pid (\d+)\)/.exec(status)?.[1]);
}

async function cmdline(pid: number): Promise<string[]> {
  return (await Deno.readTextFile(`/proc/${pid}/cmdline`)).split("\0");
}

const gone = async (pid: number) =>
  !(await Deno.stat(`/proc/${pid}`).then(() => true, () => false));

Deno.test({
  name:
    "runit: runsv runs the worker, svlogd timestamps its lines, sv term stops it cleanly",
  ...runitTest,
  fn: () =>
    withSshd((sshd) =>
      withService(
        sshd,
        { TASK_COMMAND: "echo ran under runit" },
        async (service) => {
          // The first start may download the npm packages into the user's cache.
          const curlLine = (await service.line(
            /post a test message: curl /,
            1,
            90_000,
          )).replace(/^.*post a test message: /, "");
          await run("sh", ["-c", curlLine]);
          const out = await service.line(
            / \[127\.0\.0\.1\] out: ran under runit$/,
          );
          assert.match(
            out,
            /^\d{4}-\d\d-\d\d_\d\d:\d\d:\d\d\.\d{5} \[127\.0\.0\.1\] out: /,
          );
          const pid = await supervisedPid(service.dir);
          // The supervised process is the worker itself: deno running tasks.ts as the user.
          const argv = await cmdline(pid);
          assert.ok(
            argv[0].endsWith("deno") &&
              argv.some((a) => a.endsWith("/tasks.ts")),
            argv.join(" "),
          );
          assert.equal(
            (await Deno.stat(`/proc/${pid}`)).uid,
            Number((await run("id", ["-u", sshd.user])).trim()),
          );

          await run("sv", ["term", service.dir]);
          await service.line(/ stopped$/);
          await until("the old worker gone", () => gone(pid));
        },
      )
    ),
});

Deno.test({
  name:
    "runit: a bad setting is logged once, then waits TASKS_RESTART_PAUSE for a fix; sv down ends the wait",
  ...runitTest,
  fn: () =>
    withSshd((sshd) =>
      withService(
        sshd,
        { TASK_CONCURRENCY: "abc", TASKS_RESTART_PAUSE: "60" },
        async (service) => {
          const fatal = / FATAL /;
          const notice = (seconds: number) =>
            new RegExp(
              ` run: the worker did not start: fix what the lines above name .*; next try in ${seconds} s \\(env/TASKS_RESTART_PAUSE\\)`,
            );
          await service.line(notice(60), 1, 90_000);
          assert.equal(await service.count(fatal), 1);
          const log = (await service.lines()).join("\n");
          assert.match(log, /TASK_CONCURRENCY="abc": must be a whole number/);

          // The wait is the supervised process (exec'd, so no stray sleep);
          // sv down ends it well inside the 60 s pause.
          const pid = await supervisedPid(service.dir);
          assert.deepEqual(await cmdline(pid), ["sleep", "60", ""]);
          assert.match(
            await run("sv", ["-w", "10", "down", service.dir]),
            /^ok: down: /,
          );
          assert.ok(await gone(pid), `pid ${pid} (sleep) outlived sv down`);
          assert.equal(await service.count(fatal), 1);

          // Up again, still bad, with a short pause: fixed during the pause,
          // it starts at the next try, which comes no sooner than the pause.
          await service.setting("TASKS_RESTART_PAUSE", "3");
          await run("sv", ["up", service.dir]);
          const waiting = await service.line(notice(3));
          await service.setting("TASK_CONCURRENCY", "2");
          const started = await service.line(/ worker: queue my_queue at /);
          assert.equal(await service.count(fatal), 2);
          const waited = loggedAt(started) - loggedAt(waiting);
          assert.ok(waited >= 3_000, `started again after ${waited} ms`);
        },
      )
    ),
});

/** The service's ./check as runit's sv runs it: in the service directory, as root. */
async function checkExit(dir: string): Promise<number> {
  return (await new Deno.Command(`${dir}/check`, { cwd: dir }).output()).code;
}

Deno.test({
  name:
    "runit: ./check (sv check) passes once the worker runs, and with TASK_HTTP_PORT once its /readyz says ready",
  ...runitTest,
  fn: () =>
    withSshd((sshd) =>
      withService(
        sshd,
        { TASK_CONCURRENCY: "abc", TASKS_RESTART_PAUSE: "60" },
        async (service) => {
          // A bad setting: ./run waits (sleep), and the check says not up.
          await service.line(/ run: the worker did not start: /, 1, 90_000);
          assert.equal(await checkExit(service.dir), 1);

          // sv waits on ./check (up to -w seconds) before it says ok.
          await service.setting("TASK_CONCURRENCY", "2");
          assert.match(
            await run("sv", ["-w", "90", "restart", service.dir]),
            /^ok: run: /,
          );
          assert.ok(
            (await cmdline(await supervisedPid(service.dir))).some((a) =>
              a.endsWith("/tasks.ts")
            ),
          );

          // With the listener, ready means /readyz answers 200.
          const port = freePort();
          await service.setting("TASK_HTTP_PORT", String(port));
          assert.match(
            await run("sv", ["-w", "90", "restart", service.dir]),
            /^ok: run: /,
          );
          await service.line(
            new RegExp(` web: listening on http://127\\.0\\.0\\.1:${port}$`),
          );
          const ready = await fetch(`http://127.0.0.1:${port}/readyz`);
          assert.equal(`${ready.status} ${await ready.text()}`, "200 ready\n");
          assert.equal(await checkExit(service.dir), 0);

          await run("sv", ["-w", "15", "down", service.dir]);
          assert.equal(await checkExit(service.dir), 1);
        },
      )
    ),
});
