/**
 * lib/ssh.ts: the SSH runner: a pool of ssh2 connections per host, several
 * channels on each, jump hosts, host keys checked against known_hosts, and
 * one command run with its output, timeout and stop.
 *
 * It never throws into the loop: every outcome is a RunResult. A command
 * that never started is told apart from one that started and was lost.
 */

import { Buffer } from "node:buffer";
import { createHash } from "node:crypto";
// @ts-types="@types/ssh2"
import { Client, type ClientChannel } from "ssh2";
import { errorText } from "./util.ts";
import {
  readTextIfExists,
  type SshConfig,
  type SshCredentials,
} from "./config.ts";
import { hostKey, type HostSpec } from "./hosts.ts";
import {
  checkHostKey,
  type HostKeyVerdict,
  keyTypeOfBlob,
  type KnownHost,
  knownHostsName,
  knownKeyAlgorithms,
  parseKnownHosts,
} from "./known_hosts.ts";
import { type Log, OutageLog } from "./log.ts";
import { retry } from "./retry.ts";

export type RunResult =
  | { kind: "exit"; code: number }
  | { kind: "signal"; signal: string }
  | { kind: "timeout" }
  | { kind: "aborted" }
  /** The command never started there: no connection, or no session would open. */
  | { kind: "unreachable"; error: string }
  /** The command started, then SSH failed under it: it may have run. */
  | { kind: "ssh-error"; error: string };

/** An exec whose session never opened: the command did not start, so it may be tried again. */
interface Unopened {
  kind: "unopened";
  error: string;
}

/** Connections a command is tried on when a session will not open (within SSH_CONNECT_TIMEOUT). */
const SESSION_TRIES = 3;

export interface RunIo {
  onStdout(chunk: Uint8Array): void;
  onStderr(chunk: Uint8Array): void;
  timeoutMs: number;
  signal: AbortSignal;
}

/** A served host's state, for the page and /readyz. */
export type HostState = "connected" | "idle" | "unreachable";

/** What the SSH runner tells (the Monitor, lib/monitor.ts, listens). */
export interface SshEvents {
  sshConnections(host: string, open: number): void;
  /** kind: connect, timeout, auth, host_key, dropped, exec. */
  sshError(host: string, kind: string): void;
  hostState(host: string, state: HostState, detail?: string): void;
}

/** What the worker needs from SSH; tests may supply their own. */
export interface CommandRunner {
  /** Resolves once some host can be reached (backing off while none can); rejects when `signal` aborts. */
  ready(signal: AbortSignal): Promise<void>;
  /** Whether some host may be reached (not all of them failed their last connection attempt). */
  reachable(): boolean;
  run(host: HostSpec, command: string, io: RunIo): Promise<RunResult>;
  close(): void;
}

interface Connection {
  client: Client;
  active: number;
  closed: boolean;
  /** Its pool's generation when it opened: retiring the pool starts a new one. */
  generation: number;
  /** Closes the connection once it has been unused for SSH_IDLE_TIMEOUT. */
  idleTimer?: ReturnType<typeof setTimeout>;
}

/**
 * Every host's connections: a pool for each host, opened when a command
 * first needs it, and one connection to each jump host, carrying the
 * connections to the hosts behind it. A host that cannot be reached fails
 * its own commands; only when none of the hosts can be reached does `ready`
 * hold the worker back.
 */
export class SshHosts implements CommandRunner {
  private readonly pools = new Map<string, HostPool>();
  /** The hosts whose last connection attempt failed (by hostKey), and why. */
  private readonly down = new Map<string, string>();
  /** The hosts whose last connection attempt worked. */
  private readonly up = new Set<string>();
  private reconnecting?: Promise<void>;
  private readonly outage: OutageLog;
  private closed = false;

  constructor(
    private readonly ssh: SshConfig,
    private readonly credentials: SshCredentials,
    /** Every host this worker may run commands on. */
    private readonly hosts: HostSpec[],
    private readonly concurrency: number,
    private readonly log: Log,
    private readonly monitor?: SshEvents,
  ) {
    this.outage = new OutageLog(
      hosts.length === 1
        ? `ssh ${hostKey(hosts[0])}: cannot connect`
        : `ssh: none of the ${hosts.length} hosts can be reached`,
      log,
      "error",
    );
  }

  reachable(): boolean {
    return this.hosts.some((h) => !this.down.has(hostKey(h)));
  }

  /**
   * Resolves once a host has been reached: at once when one was at its last
   * try; else it tries the first host, then all the others at once, with
   * backoff, until one connects (at start, one connection, not one a host).
   */
  ready(signal: AbortSignal): Promise<void> {
    if (this.up.size > 0) return Promise.resolve();
    this.reconnecting ??= retry(() => this.probe(), {
      minDelayMs: 500,
      maxDelayMs: 30_000,
      maxAttempts: Infinity,
      retryable: () => !this.closed,
      onRetry: (e, _, delayMs) => this.outage.failed(e, delayMs),
      signal,
    }).then(() => this.outage.recovered()).finally(() => {
      this.reconnecting = undefined;
    });
    return this.reconnecting;
  }

  run(host: HostSpec, command: string, io: RunIo): Promise<RunResult> {
    return this.pool(host, false).run(command, io);
  }

  close(): void {
    this.closed = true;
    for (const pool of this.pools.values()) pool.close();
    this.pools.clear();
  }

  /** The pool for a host (`jump`: its role as a jump host, one connection for all). */
  pool(host: HostSpec, jump: boolean): HostPool {
    const key = `${jump ? "jump " : ""}${hostKey(host)}`;
    let pool = this.pools.get(key);
    if (pool === undefined) {
      if (this.closed) throw new Error("SSH is closed: stopping");
      pool = new HostPool(host, this, {
        ssh: this.ssh,
        credentials: this.credentials,
        log: this.log,
        monitor: this.monitor,
        jump,
        maxConnections: jump
          ? 1
          : Math.ceil(this.concurrency / this.ssh.channelsPerConnection),
        channelsPerConnection: jump ? Infinity : this.ssh.channelsPerConnection,
      });
      this.pools.set(key, pool);
    }
    return pool;
  }

  /**
   * Told by a served host's pool whether its last connection attempt worked,
   * or (`dropped`) that an open connection ended unasked: then it is known
   * neither up nor down, and `ready` tries it again before the next reserve.
   */
  connected(host: HostSpec, error?: string, dropped = false): void {
    const key = hostKey(host);
    if (dropped) {
      this.up.delete(key);
      return;
    }
    if (error === undefined) {
      this.down.delete(key);
      this.up.add(key);
    } else {
      this.down.set(key, error);
      this.up.delete(key);
    }
  }

  /** The first host, else one connection attempt to each other host at once. */
  private async probe(): Promise<void> {
    const [first, ...others] = this.hosts;
    try {
      return await this.pool(first, false).probe();
    } catch (e) {
      if (others.length === 0) throw e;
    }
    try {
      await Promise.any(others.map((h) => this.pool(h, false).probe()));
    } catch (e) {
      const errors = e instanceof AggregateError ? e.errors : [e];
      throw new Error(
        this.hosts.length === 1
          ? errorText(errors[0])
          : [...new Set(errors.map(errorText))].slice(0, 3).join("; "),
      );
    }
  }
}

/** What every pool shares. */
interface PoolSettings {
  ssh: SshConfig;
  credentials: SshCredentials;
  log: Log;
  monitor?: SshEvents;
  /** A jump host's pool: its state is not a served host's. */
  jump: boolean;
  maxConnections: number;
  /** Exec channels (or forwarded connections, for a jump host) on one connection at once. */
  channelsPerConnection: number;
}

/** One host's connections, several channels on each. */
class HostPool {
  private readonly connections: Connection[] = [];
  private connecting?: Promise<Connection>;
  private readonly slotWaiters: (() => void)[] = [];
  /** After another connection failed to open, carry on with those open until then. */
  private noMoreUntil = 0;
  /** Retiring the connections starts a new generation. */
  private generation = 0;
  /** Sessions would not open on fresh connections: why, and until when `probe` says so. */
  private sessionsFailed?: { error: string; backoffMs: number; until: number };
  private closed = false;
  /** user@host:port, through its jump hosts: for log lines and errors. */
  private readonly where: string;

  constructor(
    private readonly host: HostSpec,
    private readonly hosts: SshHosts,
    private readonly settings: PoolSettings,
  ) {
    this.where = hostKey(host);
  }

  /**
   * Runs a command on a pooled connection. A session that never opens there
   * (sshd's session processes gone while the connection still answers
   * keepalives, a refused channel, a close before the exec was accepted) has
   * run nothing: the connections are retired and the command goes on at once
   * on a fresh one, a few times within SSH_CONNECT_TIMEOUT; after that the
   * host is unreachable, as if it had refused the connection.
   */
  async run(command: string, io: RunIo): Promise<RunResult> {
    let deadline: number | undefined;
    for (let tries = 1;; tries++) {
      let connection: Connection;
      try {
        connection = await this.acquire();
      } catch (e) {
        if (io.signal.aborted) return { kind: "aborted" };
        return { kind: "unreachable", error: errorText(e) };
      }
      let result: RunResult | Unopened;
      try {
        result = await this.exec(connection, command, io);
      } finally {
        this.release(connection);
      }
      if (result.kind !== "unopened") {
        this.sessionsFailed = undefined;
        return result;
      }
      this.settings.monitor?.sshError(this.host.name, "exec");
      // A failure on a connection of an older generation (retired already,
      // by a command that failed on it first) says nothing of the new ones.
      if (connection.generation === this.generation) this.retireAll();
      if (io.signal.aborted) return { kind: "aborted" };
      deadline ??= Date.now() + this.settings.ssh.connectTimeoutMs;
      if (tries >= SESSION_TRIES || Date.now() >= deadline) {
        const error =
          `cannot open a session (${result.error}; tried ${tries} connection(s)): nothing ran`;
        // Connecting works, so `ready` would pass at once: hold it back
        // instead, 1 s then doubling to 30 s, before a command tries again.
        const backoffMs = Math.min(
          30_000,
          2 * (this.sessionsFailed?.backoffMs ?? 500),
        );
        this.sessionsFailed = {
          error,
          backoffMs,
          until: Date.now() + backoffMs,
        };
        if (!this.settings.jump) {
          this.hosts.connected(this.host, error);
          this.settings.monitor?.hostState(
            this.host.name,
            "unreachable",
            error,
          );
        }
        return { kind: "unreachable", error };
      }
      this.settings.log.warn(
        `ssh ${this.where}: a session would not open (${result.error}); the command did not start: trying it on a new connection`,
      );
    }
  }

  /**
   * Connects (once) unless a connection is open; for `ready` while every host
   * is down. A host whose sessions would not open fails it until its backoff
   * has passed: a connection alone does not show that a command can start.
   */
  async probe(): Promise<void> {
    const failed = this.sessionsFailed;
    if (failed !== undefined && Date.now() < failed.until) {
      throw new Error(failed.error);
    }
    if (!this.connections.some((c) => !c.closed)) await this.connect();
  }

  close(): void {
    this.closed = true;
    for (const c of this.connections) {
      clearTimeout(c.idleTimer);
      c.client.end();
    }
    this.connections.length = 0;
    for (const wake of this.slotWaiters.splice(0)) wake();
  }

  /**
   * Takes a channel slot on the least busy open connection, opening another
   * when all are full (or the first, when none is open). The slot is
   * taken synchronously, so callers running at once never crowd one
   * connection past its channel limit.
   */
  acquire = async (): Promise<Connection> => {
    const { channelsPerConnection, maxConnections, log } = this.settings;
    for (;;) {
      if (this.closed) throw new Error("SSH is closed: stopping");
      const open = this.connections.filter((c) => !c.closed);
      const free = open
        .filter((c) => c.active < channelsPerConnection)
        .sort((a, b) => a.active - b.active)[0];
      if (free !== undefined) {
        free.active++;
        clearTimeout(free.idleTimer);
        return free;
      }
      if (open.length === 0) {
        // One try, not a wait: the host's command fails now (the message is
        // retried later), rather than holding its other hosts back.
        await this.connect();
        continue;
      }
      if (open.length < maxConnections && Date.now() >= this.noMoreUntil) {
        try {
          await this.connect();
        } catch (e) {
          this.noMoreUntil = Date.now() + 30_000;
          log.warn(
            `ssh ${this.where}: cannot open another connection (${
              errorText(e)
            }); carrying on with ${open.length} for 30 s`,
          );
        }
        continue;
      }
      await new Promise<void>((wake) => this.slotWaiters.push(wake));
    }
  };

  /** Gives a slot back; a connection left unused closes after SSH_IDLE_TIMEOUT. */
  release = (connection: Connection): void => {
    connection.active--;
    this.slotWaiters.shift()?.();
    // Retired while this command ran on it: it ends with its last command.
    if (connection.closed && connection.active === 0) connection.client.end();
    this.closeWhenIdle(connection);
  };

  /**
   * Takes every connection out of the pool: a session failed to open on one,
   * and the others were opened to the same sshd, so they may be as broken
   * (a connection whose session processes died still answers keepalives).
   * Idle ones end now; busy ones once their running commands have ended.
   * The next command opens a new connection.
   */
  private retireAll(): void {
    this.generation++;
    if (this.connections.length === 0) return;
    this.settings.log.info(
      `ssh ${this.where}: retiring ${this.connections.length} connection(s) after a session would not open`,
    );
    for (const connection of this.connections.splice(0)) {
      connection.closed = true; // no command takes it again
      clearTimeout(connection.idleTimer);
      if (connection.active === 0) connection.client.end();
    }
    this.counted();
  }

  /** Unused from now on (a slot taken in time clears it): closed after SSH_IDLE_TIMEOUT. */
  private closeWhenIdle(connection: Connection): void {
    if (connection.active > 0 || connection.closed) return;
    clearTimeout(connection.idleTimer);
    const { idleTimeoutMs } = this.settings.ssh;
    connection.idleTimer = setTimeout(() => {
      if (connection.active > 0 || connection.closed) return;
      // Closed from now on: no command may take it while it ends.
      connection.closed = true;
      this.connections.splice(this.connections.indexOf(connection), 1);
      this.counted();
      this.settings.log.debug(
        `ssh ${this.where}: closing a connection unused for ${
          idleTimeoutMs / 1000
        } s (SSH_IDLE_TIMEOUT)`,
      );
      connection.client.end();
    }, idleTimeoutMs);
  }

  private connect(): Promise<Connection> {
    const served = !this.settings.jump;
    this.connecting ??= this.openConnection().then(
      (c) => {
        if (served) this.hosts.connected(this.host);
        return c;
      },
      (e) => {
        const error = errorText(e);
        this.settings.monitor?.sshError(this.host.name, sshErrorKind(error));
        if (served) {
          this.hosts.connected(this.host, error);
          this.settings.monitor?.hostState(
            this.host.name,
            "unreachable",
            error,
          );
        }
        throw e;
      },
    ).finally(() => {
      this.connecting = undefined;
    });
    return this.connecting;
  }

  /** A new connection: directly, or through a channel of its last jump host's connection. */
  private async openConnection(): Promise<Connection> {
    if (this.closed) throw new Error("SSH is closed: stopping");
    const { jump } = this.host;
    if (jump.length === 0) return await this.handshake(undefined);
    const last = jump[jump.length - 1];
    const via = this.hosts.pool({ ...last, jump: jump.slice(0, -1) }, true);
    let carrier: Connection;
    try {
      carrier = await via.acquire();
    } catch (e) {
      const error = errorText(e);
      throw new Error(
        error.startsWith("jump host ")
          ? error
          : `jump host ${via.where}: ${error}`,
      );
    }
    let stream: ClientChannel;
    try {
      stream = await this.forward(carrier, via.where);
    } catch (e) {
      via.release(carrier);
      throw e;
    }
    try {
      const connection = await this.handshake(stream);
      connection.client.once("close", () => via.release(carrier));
      return connection;
    } catch (e) {
      via.release(carrier);
      throw e;
    }
  }

  /** A TCP channel from the jump host to this host (the jump host's sshd opens it). */
  private forward(
    carrier: Connection,
    jumpWhere: string,
  ): Promise<ClientChannel> {
    const { host, port } = this.host;
    const limitMs = this.settings.ssh.connectTimeoutMs;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(
        () =>
          reject(
            new Error(
              `jump host ${jumpWhere} did not reach ${host}:${port} within ${
                limitMs / 1000
              } s`,
            ),
          ),
        limitMs,
      );
      try {
        carrier.client.forwardOut("127.0.0.1", 0, host, port, (err, ch) => {
          clearTimeout(timer);
          if (err) {
            reject(
              new Error(
                `jump host ${jumpWhere} cannot reach ${host}:${port} (${err.message}; does its sshd allow TCP forwarding?)`,
              ),
            );
          } else resolve(ch);
        });
      } catch (e) {
        clearTimeout(timer);
        reject(new Error(`jump host ${jumpWhere}: ${errorText(e)}`));
      }
    });
  }

  private handshake(sock: ClientChannel | undefined): Promise<Connection> {
    const { ssh, credentials, log } = this.settings;
    const { host, port, user } = this.host;
    let entries: KnownHost[];
    try {
      entries = parseKnownHosts(readTextIfExists(ssh.knownHostsFile) ?? "");
    } catch (e) {
      return Promise.reject(new Error(errorText(e)));
    }
    const algorithms = knownKeyAlgorithms(entries, host, port);
    let hostKeyFailure: string | undefined;
    const verify = (key: Buffer): boolean => {
      const verdict = checkHostKey(entries, host, port, key);
      if (verdict === "match") return true;
      if (verdict === "unknown" && ssh.strictHostKeyChecking === "accept-new") {
        this.rememberHostKey(key);
        return true;
      }
      hostKeyFailure = hostKeyMessage(verdict, this.host, ssh, key);
      return false;
    };
    return new Promise((resolve, reject) => {
      const client = new Client();
      const connection: Connection = {
        client,
        active: 0,
        closed: false,
        generation: this.generation,
      };
      let settled = false;
      client.on("ready", () => {
        settled = true;
        client.setNoDelay(true); // Nagle + delayed ACK costs ~40 ms per exec.
        this.connections.push(connection);
        this.counted();
        // Opened for `ready`, it may never carry a command.
        this.closeWhenIdle(connection);
        log.info(`ssh ${this.where}: connected`);
        resolve(connection);
      });
      client.on("error", (e: Error) => {
        if (settled) return;
        settled = true;
        reject(new Error(hostKeyFailure ?? describeSshError(e)));
      });
      client.on("close", () => {
        connection.closed = true;
        clearTimeout(connection.idleTimer);
        const i = this.connections.indexOf(connection);
        if (i >= 0) {
          // Open, not closed by us (idle, or a stop): it dropped.
          this.connections.splice(i, 1);
          this.counted();
          if (!this.settings.jump && !this.closed) {
            this.hosts.connected(this.host, undefined, true);
          }
        }
        for (const wake of this.slotWaiters.splice(0)) wake();
        if (!settled) {
          settled = true;
          reject(
            new Error(
              hostKeyFailure ?? "connection closed during the handshake",
            ),
          );
        }
      });
      client.connect({
        host,
        port,
        sock,
        username: user,
        privateKey: credentials.privateKey
          ? Buffer.from(credentials.privateKey)
          : undefined,
        passphrase: credentials.passphrase,
        agent: credentials.agent,
        hostVerifier: verify,
        readyTimeout: ssh.connectTimeoutMs,
        // A connection that silently stops forwarding is dropped after
        // three unanswered keepalives: within about 15 s.
        keepaliveInterval: 5_000,
        keepaliveCountMax: 2,
        algorithms: algorithms.length > 0
          ? {
            serverHostKey: algorithms as NonNullable<
              NonNullable<Parameters<Client["connect"]>[0]["algorithms"]>[
                "serverHostKey"
              ]
            >,
          }
          : undefined,
      });
    });
  }

  /** The open connections, for the metrics and the page (a served host's state). */
  private counted(): void {
    const open = this.connections.length;
    this.settings.monitor?.sshConnections(this.host.name, open);
    if (this.settings.jump) return;
    this.settings.monitor?.hostState(
      this.host.name,
      open > 0 ? "connected" : "idle",
    );
  }

  private rememberHostKey(key: Buffer): void {
    const { ssh, log } = this.settings;
    const line = `${knownHostsName(this.host.host, this.host.port)} ${
      keyTypeOfBlob(key)
    } ${key.toString("base64")}\n`;
    try {
      Deno.writeTextFileSync(ssh.knownHostsFile, line, {
        append: true,
        create: true,
        mode: 0o600,
      });
      log.warn(
        `ssh ${this.where}: new host key ${keyTypeOfBlob(key)} ${
          fingerprint(key)
        } added to ${ssh.knownHostsFile} (SSH_STRICT_HOST_KEY_CHECKING=accept-new)`,
      );
    } catch (e) {
      log.error(
        `ssh ${this.where}: accepted a new host key but cannot record it in ${ssh.knownHostsFile}: ${
          errorText(e)
        }`,
      );
    }
  }

  /**
   * Runs one command on `connection`. Until sshd has accepted the exec, a
   * failure means nothing started there (`unopened`); after that, a lost
   * connection is an `ssh-error`: the command may have run.
   */
  private exec(
    connection: Connection,
    command: string,
    io: RunIo,
  ): Promise<RunResult | Unopened> {
    return new Promise((resolve) => {
      let channel: ClientChannel | undefined;
      let outcome: RunResult | undefined;
      let stopping: "timeout" | "aborted" | undefined;
      let killTimer: ReturnType<typeof setTimeout> | undefined;
      let timeoutTimer: ReturnType<typeof setTimeout> | undefined;

      const finish = (result: RunResult | Unopened) => {
        clearTimeout(timeoutTimer);
        clearTimeout(killTimer);
        io.signal.removeEventListener("abort", onAbort);
        connection.client.removeListener("close", onDrop);
        resolve(result);
      };
      // TERM, then KILL and close; give up waiting for the server after that.
      const stop = (why: "timeout" | "aborted") => {
        if (stopping || channel === undefined) return;
        const ch = channel;
        stopping = why;
        sendSignal(ch, "TERM");
        killTimer = setTimeout(() => {
          sendSignal(ch, "KILL");
          ch.close();
          killTimer = setTimeout(() => {
            this.settings.log.warn(
              `${this.where}: the stopped command did not end; it may still be running there`,
            );
            finish({ kind: why });
          }, 1000);
        }, 1000);
      };
      const onAbort = () => stop("aborted");
      const onDrop = () => {
        if (channel === undefined) {
          return finish({
            kind: "unopened",
            error: "the connection closed before the command started",
          });
        }
        this.settings.monitor?.sshError(this.host.name, "dropped");
        finish({
          kind: "ssh-error",
          error:
            `connection to ${this.where} dropped while the command was running`,
        });
      };

      connection.client.once("close", onDrop);
      io.signal.addEventListener("abort", onAbort, { once: true });
      // ssh2 throws "Not connected" at once when the socket has ended but
      // its close event has not come yet: nothing started, not a crash.
      try {
        connection.client.exec(command, (err, ch) => {
          // Channel open refused, exec refused, or the connection closed
          // first ("No response from server"): nothing started.
          if (err) return finish({ kind: "unopened", error: err.message });
          channel = ch;
          ch.on("data", (chunk: Uint8Array) => io.onStdout(chunk));
          ch.stderr.on("data", (chunk: Uint8Array) => io.onStderr(chunk));
          ch.on(
            "exit",
            (code: number | null, signal?: string) => {
              outcome = code !== null && code !== undefined
                ? { kind: "exit", code }
                : { kind: "signal", signal: signal ?? "unknown" };
            },
          );
          ch.on("close", () => {
            if (stopping) return finish({ kind: stopping });
            finish(
              outcome ?? {
                kind: "ssh-error",
                error:
                  `${this.where}: the channel closed without an exit status`,
              },
            );
          });
          ch.end(); // No stdin for the remote command.
          if (io.signal.aborted) stop("aborted");
          if (io.timeoutMs > 0) {
            timeoutTimer = setTimeout(() => stop("timeout"), io.timeoutMs);
          }
        });
      } catch (e) {
        finish({ kind: "unopened", error: errorText(e) });
      }
    });
  }
}

/** The internals of ssh2 that `sendSignal` reaches for. */
interface ChannelInternals {
  outgoing?: { id?: number; state?: string };
  _client?: { _protocol?: { signal?(id: number, name: string): void } };
}

/**
 * ssh2's `signal()` is silently skipped once stdin has ended (which we do at
 * start, so commands never wait for input); send the request through its
 * protocol object then, as `signal()` itself would.
 */
function sendSignal(channel: ClientChannel, name: string): void {
  if (channel.writable) return channel.signal(name);
  const internals = channel as unknown as ChannelInternals;
  const id = internals.outgoing?.id;
  if (internals.outgoing?.state === "closed" || id === undefined) return;
  internals._client?._protocol?.signal?.(id, name);
}

function hostKeyMessage(
  verdict: HostKeyVerdict,
  host: HostSpec,
  ssh: SshConfig,
  key: Buffer,
): string {
  const shown = `${keyTypeOfBlob(key)} ${fingerprint(key)}`;
  const name = knownHostsName(host.host, host.port);
  if (verdict === "mismatch") {
    return `HOST KEY MISMATCH for ${name}: the server shows ${shown}, which differs from ${ssh.knownHostsFile}; someone may be intercepting the connection, or the host was reinstalled. Nothing will run until the entry is fixed (ssh-keygen -R '${name}' -f ${ssh.knownHostsFile})`;
  }
  if (verdict === "revoked") {
    return `host key ${shown} of ${name} is marked @revoked in ${ssh.knownHostsFile}; refusing to connect`;
  }
  return `host key of ${name} is unknown (${shown}, not in ${ssh.knownHostsFile}): on that host, check that \`ssh-keygen -lf /etc/ssh/ssh_host_${
    keyTypeOfBlob(key).replace(/^ssh-/, "").replace(/-.*$/, "")
  }_key.pub\` shows the same fingerprint, then add it (ssh-keyscan -p ${host.port} ${host.host} >> ${ssh.knownHostsFile}), or set SSH_STRICT_HOST_KEY_CHECKING=accept-new`;
}

/** The fingerprint `ssh-keygen -l` prints: SHA256 of the key blob, unpadded base64. */
export function fingerprint(key: Uint8Array): string {
  return `SHA256:${
    createHash("sha256").update(key).digest("base64").replace(/=+$/, "")
  }`;
}

/** An SSH failure's kind, for tasks_ssh_errors_total. */
function sshErrorKind(error: string): string {
  if (/host key/i.test(error)) return "host_key";
  if (/authentication/i.test(error)) return "auth";
  if (/timed out|did not reach/i.test(error)) return "timeout";
  return "connect";
}

function describeSshError(
  e: Error & { level?: string; code?: string },
): string {
  if (e.code === "ECONNREFUSED") return "connection refused (is sshd running?)";
  if (e.code === "ETIMEDOUT" || /Timed out/i.test(e.message)) {
    return `timed out (${e.message})`;
  }
  if (e.level === "client-authentication") {
    return "authentication failed: the server refused the key (check SSH_USER, SSH_KEY_FILE and the server's authorized_keys)";
  }
  return e.message;
}
