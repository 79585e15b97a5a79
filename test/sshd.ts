/**
 * Test fixture: a real OpenSSH sshd on a loopback port, with its own host key,
 * one authorized client key and a known_hosts file naming it. Used by the tests
 * and the bench; every sshd started here is stopped by its `stop()`.
 */

const SSHD = "/usr/sbin/sshd";

export interface Sshd {
  host: string;
  port: number;
  user: string;
  dir: string;
  clientKeyFile: string;
  knownHostsFile: string;
  /** The known_hosts line for this server, for tests that write their own. */
  knownHostsLine: string;
  pid: number;
  stop(): Promise<void>;
}

/** Why sshd tests cannot run here, or undefined when they can. */
export function sshdMissing(): string | undefined {
  for (const tool of [SSHD, "/usr/bin/ssh-keygen"]) {
    try {
      Deno.statSync(tool);
    } catch {
      return `${tool} not found (apt-get install openssh-server)`;
    }
  }
  return undefined;
}

/**
 * Test options for something that needs a tool: skipped with a printed reason
 * when the tool is missing, but run (and so failing) under CI=true.
 */
export function needs(missing: string | undefined, what: string) {
  const skip = missing !== undefined && Deno.env.get("CI") !== "true";
  if (skip) console.log(`SKIP ${what}: ${missing}`);
  return { ignore: skip };
}

/** Why a tool is not here (`apt-get install pkg`), or undefined when it is. */
export function toolMissing(path: string, pkg: string): string | undefined {
  try {
    Deno.statSync(path);
    return undefined;
  } catch {
    return `${path} not found (apt-get install ${pkg})`;
  }
}

export const PROMTOOL = "/usr/bin/promtool";

/** Throws, with promtool's words, unless `promtool check metrics` finds the text clean. */
export function checkMetrics(text: string): Promise<string> {
  return run(PROMTOOL, ["check", "metrics"], { stdin: text });
}

export async function run(
  cmd: string,
  args: string[],
  options: { stdin?: string } = {},
): Promise<string> {
  const child = new Deno.Command(cmd, {
    args,
    stdin: options.stdin === undefined ? "null" : "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  if (options.stdin !== undefined) {
    const writer = child.stdin.getWriter();
    await writer.write(new TextEncoder().encode(options.stdin));
    await writer.close();
  }
  const out = await child.output();
  const text = new TextDecoder().decode(out.stdout);
  if (!out.success) {
    throw new Error(
      `${cmd} ${args.join(" ")} failed (${out.code}): ${
        new TextDecoder().decode(out.stderr)
      }`,
    );
  }
  return text;
}

export function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  return port;
}

/** The dedicated account for tests and the bench when running as root. */
export const TEST_USER = "tasks-ssh";

/**
 * The account remote commands run as: as root, a dedicated user whose shell is
 * /bin/sh (root's rc files here cost ~100 ms a command); otherwise the current user.
 */
export async function sshUser(): Promise<string> {
  if (Deno.uid() !== 0) return currentUser();
  const known = await new Deno.Command("id", { args: [TEST_USER] }).output();
  if (!known.success) {
    await run("useradd", ["--create-home", "--shell", "/bin/sh", TEST_USER]);
  }
  // A locked account ("!") cannot log in when sshd runs without PAM.
  await run("usermod", ["--password", "*", TEST_USER]);
  return TEST_USER;
}

export function currentUser(): string {
  return Deno.env.get("USER") ?? Deno.env.get("LOGNAME") ??
    new TextDecoder().decode(
      new Deno.Command("id", { args: ["-un"] }).outputSync().stdout,
    ).trim();
}

/** Every process's parent, from /proc. */
function parentsByPid(): Map<number, number> {
  const parents = new Map<number, number>();
  for (const entry of Deno.readDirSync("/proc")) {
    if (!/^\d+$/.test(entry.name)) continue;
    try {
      const stat = Deno.readTextFileSync(`/proc/${entry.name}/stat`);
      const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
      parents.set(Number(entry.name), ppid);
    } catch {
      // gone meanwhile
    }
  }
  return parents;
}

/** The direct children of `pid`. */
export function childPids(pid: number): number[] {
  return [...parentsByPid()].filter(([, ppid]) => ppid === pid).map(([p]) => p);
}

/** Ends sshd's per-connection processes (and theirs), which outlive the listener. */
export function killChildren(pid: number, signal: Deno.Signal = "SIGKILL") {
  const parents = parentsByPid();
  const isDescendant = (p: number): boolean => {
    for (let up = parents.get(p); up !== undefined; up = parents.get(up)) {
      if (up === pid) return true;
    }
    return false;
  };
  for (const p of parents.keys()) {
    if (!isDescendant(p)) continue;
    try {
      Deno.kill(p, signal);
    } catch {
      // gone meanwhile
    }
  }
}

/**
 * sshd's session side crashed while its listener came back at once: every
 * per-connection monitor process (`sshd: user [priv]`) is killed and the
 * listener restarted on the same port. The connections' network halves live
 * on, reparented, still answering keepalives, but no session opens on them
 * any more. Returns the new sshd and `orphans` (those halves), which
 * `endOrphans` ends.
 */
export async function crashSessions(
  sshd: Sshd,
): Promise<{ sshd: Sshd; orphans: number[] }> {
  Deno.kill(sshd.pid, "SIGSTOP"); // no new connection in between
  const monitors = childPids(sshd.pid);
  const orphans = monitors.flatMap(childPids);
  for (const pid of monitors) Deno.kill(pid, "SIGKILL");
  Deno.kill(sshd.pid, "SIGKILL");
  await sshd.stop();
  const restarted = await startSshd({
    dir: sshd.dir,
    port: sshd.port,
    user: sshd.user,
  });
  return { sshd: restarted, orphans };
}

/** Ends what `crashSessions` left behind. */
export function endOrphans(orphans: number[]): void {
  for (const pid of orphans) {
    try {
      Deno.kill(pid, "SIGKILL");
    } catch {
      // gone already
    }
  }
}

/** A new ed25519 key pair at `path` (and `path`.pub); returns the public key line. */
export async function keygen(path: string, passphrase = ""): Promise<string> {
  await run("ssh-keygen", [
    "-q",
    "-t",
    "ed25519",
    "-N",
    passphrase,
    "-C",
    "test",
    "-f",
    path,
  ]);
  return (await Deno.readTextFile(`${path}.pub`)).trim();
}

async function waitForBanner(
  port: number,
  sshd: Deno.ChildProcess,
  hostname: string,
) {
  const deadline = Date.now() + 10_000;
  while (Date.now() < deadline) {
    try {
      const conn = await Deno.connect({ hostname, port });
      const buf = new Uint8Array(64);
      const n = await conn.read(buf);
      conn.close();
      if (
        n && new TextDecoder().decode(buf.subarray(0, n)).startsWith("SSH-")
      ) {
        return;
      }
    } catch {
      // not listening yet
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  sshd.kill("SIGKILL");
  await sshd.status;
  throw new Error(`sshd did not answer on ${hostname}:${port} within 10 s`);
}

export interface SshdOptions {
  /** The account commands run as; default sshUser(). */
  user?: string;
  /** Extra sshd_config lines, read before the defaults (sshd keeps the first value). */
  config?: string[];
  /** Reuse a directory (host key, client key) from an earlier start. */
  dir?: string;
  port?: number;
  /** Loopback addresses to listen on (at most 16); default 127.0.0.1. */
  addresses?: string[];
  /** Where sshd writes its log (LogLevel in `config`); default nowhere. */
  logFile?: string;
}

/** Starts sshd on 127.0.0.1 with a fresh host key and client key. */
export async function startSshd(options: SshdOptions = {}): Promise<Sshd> {
  const missing = sshdMissing();
  if (missing) throw new Error(missing);
  const user = options.user ?? await sshUser();
  const dir = options.dir ?? await Deno.makeTempDir({ prefix: "tasks-sshd-" });
  // sshd reads authorized_keys as the target user: the folder must be searchable.
  await Deno.chmod(dir, 0o755);
  const hostKey = `${dir}/host_ed25519`;
  const clientKey = `${dir}/client_ed25519`;
  let hostPub: string;
  try {
    hostPub = (await Deno.readTextFile(`${hostKey}.pub`)).trim();
  } catch {
    hostPub = await keygen(hostKey);
    await Deno.writeTextFile(`${dir}/authorized_keys`, await keygen(clientKey));
    await Deno.chmod(`${dir}/authorized_keys`, 0o644);
  }
  if (Deno.uid() === 0) await Deno.mkdir("/run/sshd", { recursive: true });
  const port = options.port ?? freePort();
  const addresses = options.addresses ?? ["127.0.0.1"];
  const [keyType, keyBase64] = hostPub.split(" ");
  const knownHostsLine = `[${addresses[0]}]:${port} ${keyType} ${keyBase64}`;
  const knownHostsFile = `${dir}/known_hosts`;
  await Deno.writeTextFile(
    knownHostsFile,
    addresses.map((a) => `[${a}]:${port} ${keyType} ${keyBase64}\n`).join(""),
  );
  // sshd takes the first value it reads: the caller's lines come first.
  const config = [
    ...(options.config ?? []),
    ...addresses.map((a) => `ListenAddress ${a}:${port}`),
    `HostKey ${hostKey}`,
    `AuthorizedKeysFile ${dir}/authorized_keys`,
    `PidFile ${dir}/sshd.pid`,
    `AllowUsers ${user}`,
    "PasswordAuthentication no",
    "KbdInteractiveAuthentication no",
    "UsePAM no",
    "StrictModes no",
    "PermitRootLogin prohibit-password",
    "MaxStartups 100:30:200",
    "LogLevel ERROR",
  ];
  await Deno.writeTextFile(`${dir}/sshd_config`, config.join("\n") + "\n");
  const child = new Deno.Command(SSHD, {
    args: [
      "-D",
      ...options.logFile ? ["-E", options.logFile] : ["-e"],
      "-f",
      `${dir}/sshd_config`,
    ],
    stdin: "null",
    stdout: "null",
    stderr: "null",
  }).spawn();
  for (const address of addresses) await waitForBanner(port, child, address);
  let stopped = false;
  return {
    pid: child.pid,
    host: addresses[0],
    port,
    user,
    dir,
    clientKeyFile: clientKey,
    knownHostsFile,
    knownHostsLine,
    async stop() {
      if (stopped) return;
      stopped = true;
      killChildren(child.pid);
      try {
        child.kill("SIGTERM");
      } catch {
        // already gone
      }
      await child.status;
    },
  };
}

/**
 * Loopback "hosts" 127.0.0.2, 127.0.0.3, ... on one port, each answering with
 * its own host key; one client key is authorized on all of them.
 */
export interface LoopbackHosts {
  hosts: string[];
  port: number;
  user: string;
  clientKeyFile: string;
  /** One known_hosts file naming every host. */
  knownHostsFile: string;
  stop(): Promise<void>;
}

/** OpenSSH's MAX_LISTEN_SOCKS: one sshd listens on at most this many addresses. */
const LISTEN_LIMIT = 16;

/**
 * Starts `count` loopback hosts from 127.0.0.2 (at most 254): one sshd for
 * every 16 addresses, all on the same port. `stop()` stops them all and
 * removes their folders.
 */
export async function startLoopbackHosts(
  count: number,
): Promise<LoopbackHosts> {
  if (!(count >= 1 && count <= 254)) {
    throw new Error(`startLoopbackHosts: 1 to 254 hosts, not ${count}`);
  }
  const hosts = Array.from({ length: count }, (_, i) => `127.0.0.${i + 2}`);
  const sshds: Sshd[] = [];
  const stop = async () => {
    // Emptied as it goes: a second stop() has nothing left to do.
    for (const sshd of sshds.splice(0)) {
      await sshd.stop();
      await Deno.remove(sshd.dir, { recursive: true });
    }
  };
  try {
    const port = freePort();
    for (let i = 0; i < count; i += LISTEN_LIMIT) {
      const addresses = hosts.slice(i, i + LISTEN_LIMIT);
      const first = sshds[0];
      if (first === undefined) {
        sshds.push(await startSshd({ addresses, port }));
        continue;
      }
      // The first one's client key, authorized here; a host key of its own.
      const dir = await Deno.makeTempDir({ prefix: "tasks-sshd-" });
      try {
        await keygen(`${dir}/host_ed25519`);
        await Deno.copyFile(
          `${first.dir}/authorized_keys`,
          `${dir}/authorized_keys`,
        );
        sshds.push(
          await startSshd({ addresses, port, dir, user: first.user }),
        );
      } catch (e) {
        await Deno.remove(dir, { recursive: true });
        throw e;
      }
    }
    const first = sshds[0];
    const knownHostsFile = `${first.dir}/known_hosts_all`;
    const lines = await Promise.all(
      sshds.map((s) => Deno.readTextFile(s.knownHostsFile)),
    );
    await Deno.writeTextFile(knownHostsFile, lines.join(""));
    return {
      hosts,
      port,
      user: first.user,
      clientKeyFile: first.clientKeyFile,
      knownHostsFile,
      stop,
    };
  } catch (e) {
    await stop();
    throw e;
  }
}

/** The worker's SSH_* settings for this server. */
export function sshEnv(sshd: Sshd): Record<string, string> {
  return {
    SSH_HOST: sshd.host,
    SSH_PORT: String(sshd.port),
    SSH_USER: sshd.user,
    SSH_KEY_FILE: sshd.clientKeyFile,
    SSH_KNOWN_HOSTS: sshd.knownHostsFile,
    SSH_CONNECT_TIMEOUT: "5",
  };
}

/** Runs `fn` with a fresh sshd, then stops it and removes its folder. */
export async function withSshd(
  fn: (sshd: Sshd) => Promise<void>,
  options: SshdOptions = {},
): Promise<void> {
  const sshd = await startSshd(options);
  try {
    await fn(sshd);
  } finally {
    await sshd.stop();
    await Deno.remove(sshd.dir, { recursive: true });
  }
}
