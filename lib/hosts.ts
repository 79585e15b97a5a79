/**
 * lib/hosts.ts: where a message's command runs: hosts as written
 * (`[user@]host[:port]`, jump chains), and the hosts a message narrows to.
 *
 * Pure: parsing and naming only; no connections.
 */

import { bracketIPv6 } from "./util.ts";

/** One SSH destination. */
export interface HostSpec {
  /** As written (SSH_HOST, the catalog): its name in log lines, results and a message's "hosts". */
  name: string;
  host: string;
  port: number;
  user: string;
  /** The jump hosts to go through, first to last (SSH_PROXY_JUMP, or its group's jump:). */
  jump: HostSpec[];
}

/** What a host written without a user, a port or a jump gets. */
export interface HostDefaults {
  user: string;
  port: number;
  jump: HostSpec[];
}

const HOST_NAME = /^[A-Za-z0-9_]([A-Za-z0-9_.-]{0,252})$/;

const USER_NAME = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}$/;

/** `[user@]host[:port]` (an IPv6 address in brackets when a port follows), or why not. */
export function parseHost(
  text: string,
  defaults: HostDefaults,
): HostSpec | string {
  const written = text.trim();
  const form = `${JSON.stringify(text)}: write [user@]host[:port]`;
  let rest = written;
  let user = defaults.user;
  const at = rest.lastIndexOf("@");
  if (at >= 0) {
    user = rest.slice(0, at);
    rest = rest.slice(at + 1);
    if (!USER_NAME.test(user)) return `${form} (bad user name)`;
  }
  let host = rest;
  let port = String(defaults.port);
  const bracketed = /^\[([0-9A-Fa-f:.]+)\](?::(.*))?$/.exec(rest);
  if (bracketed) {
    host = bracketed[1];
    port = bracketed[2] ?? port;
  } else if ((rest.match(/:/g) ?? []).length === 1) {
    [host, port] = rest.split(":");
  }
  const ipv6 = host.includes(":");
  if (ipv6 ? !/^[0-9A-Fa-f:.]+$/.test(host) : !HOST_NAME.test(host)) {
    return `${form} (bad host name)`;
  }
  const portNumber = Number(port);
  if (!/^\d{1,5}$/.test(port) || portNumber < 1 || portNumber > 65535) {
    return `${form} (the port must be 1 to 65535)`;
  }
  return { name: written, host, port: portNumber, user, jump: defaults.jump };
}

/**
 * A comma-separated list of hosts (SSH_HOST), or an OpenSSH ProxyJump chain
 * (SSH_PROXY_JUMP, `jump:`): hosts, or the problems, each naming its entry.
 */
export function parseHostList(
  text: string,
  defaults: HostDefaults,
): { hosts: HostSpec[]; problems: string[] } {
  const hosts: HostSpec[] = [];
  const problems: string[] = [];
  const entries = text.split(",").map((s) => s.trim());
  for (const entry of entries) {
    if (entry === "") {
      problems.push(`an empty entry: separate hosts with single commas`);
      continue;
    }
    const host = parseHost(entry, defaults);
    if (typeof host === "string") problems.push(host);
    else if (hosts.some((h) => h.name === host.name)) {
      problems.push(`${JSON.stringify(entry)} is listed twice`);
    } else hosts.push(host);
  }
  return { hosts, problems };
}

/** A jump chain as written: none, or hosts each reached through the ones before it. */
export function parseJump(
  text: string,
  defaults: Omit<HostDefaults, "jump">,
): { jump: HostSpec[]; problems: string[] } {
  if (text.trim() === "none") return { jump: [], problems: [] };
  const { hosts, problems } = parseHostList(text, { ...defaults, jump: [] });
  return { jump: hosts, problems };
}

/** Which connection a host needs: through its jump hosts, as that user, to that address. */
export function hostKey(host: HostSpec): string {
  return [...host.jump, { ...host, jump: [] }]
    .map((h) => `${h.user}@${bracketIPv6(h.host)}:${h.port}`)
    .join(" > ");
}

/** A message's `"hosts"`: groups or host names inside the task's set, or why not. */
export function narrowHosts(
  wanted: unknown,
  hosts: HostSpec[],
  groups: Map<string, HostSpec[]>,
): HostSpec[] | string {
  if (
    !Array.isArray(wanted) || wanted.length === 0 ||
    !wanted.every((w) => typeof w === "string")
  ) {
    return `"hosts" must be a list of host or group names`;
  }
  const chosen = new Set<string>();
  const outside: string[] = [];
  for (const name of wanted as string[]) {
    const group = groups.get(name);
    const members = group?.map((h) => h.name) ?? [name];
    if (members.every((m) => hosts.some((h) => h.name === m))) {
      for (const m of members) chosen.add(m);
    } else outside.push(name);
  }
  if (outside.length > 0) {
    return `"hosts" names ${
      outside.map((n) => JSON.stringify(n)).join(", ")
    }, outside this task's hosts (${hosts.map((h) => h.name).join(", ")})`;
  }
  return hosts.filter((h) => chosen.has(h.name));
}
