/**
 * Test fixtures the unit tests share: an offline configuration context, SSH
 * pools on a test sshd, catalogs, and hosts as SSH_HOST names them.
 */
import { parseCatalog } from "../lib/catalog.ts";
import {
  type Config,
  type ConfigContext,
  loadSshCredentials,
  parseConfig,
  type TaskConfig,
} from "../lib/config.ts";
import { type HostSpec, parseHost } from "../lib/hosts.ts";
import { type Log } from "../lib/log.ts";
import {
  type CommandRunner,
  type RunIo,
  type RunResult,
  SshHosts,
} from "../lib/ssh.ts";
import { ConfigError, type Env } from "../lib/util.ts";
import { type Sshd, sshEnv } from "./sshd.ts";

export function context(overrides: Partial<ConfigContext> = {}): ConfigContext {
  return {
    home: "/home/op",
    user: "op",
    ironJsonFiles: [],
    exists: (path) => path === "/home/op/.ssh/id_ed25519",
    ...overrides,
  };
}

export function configError(fn: () => Config): string[] {
  try {
    fn();
  } catch (e) {
    if (e instanceof ConfigError) return e.problems;
    throw e;
  }
  throw new Error("expected a ConfigError");
}

export function sshConfigFor(sshd: Sshd, env: Env = {}): Config {
  return parseConfig(
    {
      ...sshEnv(sshd),
      ...env,
    },
    context(),
  );
}

/**
 * The SSH runner for one test sshd (SSH_HOST is its address): whatever host
 * a test worker names (203.0.113.9 in its results), commands run there.
 */
export class TestPool implements CommandRunner {
  readonly host: HostSpec;
  private readonly hosts: SshHosts;
  constructor(config: Config, concurrency: number, log: Log) {
    this.host = config.task.hosts[0];
    this.hosts = new SshHosts(
      config.ssh,
      loadSshCredentials(config.ssh),
      config.task.hosts,
      concurrency,
      log,
    );
  }
  ready(signal: AbortSignal): Promise<void> {
    return this.hosts.ready(signal);
  }
  reachable(): boolean {
    return this.hosts.reachable();
  }
  run(_: HostSpec, command: string, io: RunIo): Promise<RunResult> {
    return this.hosts.run(this.host, command, io);
  }
  close(): void {
    this.hosts.close();
  }
}

export function poolFor(sshd: Sshd, log: Log, env: Env = {}, concurrency = 4) {
  return new TestPool(sshConfigFor(sshd, env), concurrency, log);
}

/** Runs a command and collects its output. */
export async function runCollect(
  pool: TestPool,
  command: string,
  options: { timeoutMs?: number; signal?: AbortSignal } = {},
) {
  const stdout: Uint8Array[] = [];
  let stderr = "";
  const result = await pool.run(pool.host, command, {
    onStdout: (c) => stdout.push(c.slice()),
    onStderr: (c) => stderr += new TextDecoder().decode(c),
    timeoutMs: options.timeoutMs ?? 0,
    signal: options.signal ?? new AbortController().signal,
  });
  const bytes = new Uint8Array(stdout.reduce((n, c) => n + c.length, 0));
  let at = 0;
  for (const c of stdout) {
    bytes.set(c, at);
    at += c.length;
  }
  return { result, stdout: new TextDecoder().decode(bytes), stderr };
}

/** Random argument lists with the characters a shell treats specially. */
export function randomArgs(random: () => number): string[] {
  const pieces = [
    "'",
    '"',
    "\\",
    "$(id)",
    "`id`",
    "${HOME}",
    "$",
    ";",
    "&",
    "|",
    "\n",
    "\t",
    " ",
    "*",
    "?",
    "[a]",
    "~",
    "#",
    "!",
    "-",
    "--",
    "<",
    ">",
    "(",
    ")",
    "{",
    "}",
    "%s",
    "é",
    "ü",
    "✓",
    "😀",
    "\u00a0",
    "\r",
    "\x1b",
    "a",
    "Z",
    "0",
    "",
  ];
  const count = Math.floor(random() * 6);
  return Array.from({ length: count }, () => {
    const length = Math.floor(random() * 6);
    let arg = "";
    for (let i = 0; i < length; i++) {
      arg += random() < 0.1
        ? String.fromCodePoint(1 + Math.floor(random() * 0x2fff))
        : pieces[Math.floor(random() * pieces.length)];
    }
    return arg;
  });
}

export const exit = (code: number): Promise<RunResult> =>
  Promise.resolve({ kind: "exit", code });

export const HOST_DEFAULTS = { user: "op", port: 22, jump: [] };

/** A host as SSH_HOST names it, with the usual user and port. */
export function hostNamed(name: string): HostSpec {
  const host = parseHost(name, HOST_DEFAULTS);
  if (typeof host === "string") throw new Error(host);
  return host;
}

/** A worker's task settings for in-process tests: one host, no waits; `overrides` win. */
export function taskConfig(overrides: Partial<TaskConfig> = {}): TaskConfig {
  return {
    command: "run-it",
    hosts: [hostNamed("203.0.113.9")],
    concurrency: 4,
    hostParallelism: 32,
    timeoutMs: 0,
    maxAttempts: 3,
    retryDelaySeconds: 0,
    deadLetterQueue: "jobs_failed",
    reservationTimeoutSeconds: 30,
    pollWaitSeconds: 1,
    shutdownGraceMs: 2_000,
    revokeTtlSeconds: 86_400,
    ...overrides,
  };
}

export async function recorded(dir: string): Promise<string[][]> {
  const runs: string[][] = [];
  for await (const entry of Deno.readDir(dir)) {
    if (!entry.name.startsWith("argv.")) continue;
    const parts = (await Deno.readTextFile(`${dir}/${entry.name}`)).split("\0");
    parts.pop();
    runs.push(parts);
  }
  return runs;
}

export const CATALOG = `
tasks:
  os_release:
    command: cat /etc/os-release
  restart:
    command: echo restarting {{service}}
    params:
      service: {enum: [nginx, app]}
    timeout: 60
    max_attempts: 3
  deploy:
    command: printf '%s|' {{version}} {{dry_run}} {{count}} {{ratio}} {{token}}
    params:
      version: {pattern: '^v[0-9]+\\.[0-9]+\\.[0-9]+$', max_length: 12}
      dry_run: {type: boolean, default: false}
      count: {type: integer, min: 1, max: 10, default: 1}
      ratio: {type: number, min: 0, max: 1, default: 0.5}
      token: {secret: true, required: false}
  fail:
    command: echo {{why}} >&2; exit 3
    params:
      why: {secret: true}
    max_attempts: 1
default: os_release
`;

export function catalog(text = CATALOG) {
  return parseCatalog("tasks.yaml", text, {
    timeoutMs: 0,
    maxAttempts: 5,
    host: HOST_DEFAULTS,
  })
    .catalog;
}
