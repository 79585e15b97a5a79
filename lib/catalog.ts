/**
 * lib/catalog.ts: the named-task catalog (TASKS_FILE): tasks with typed
 * parameters, their hosts and host groups, parsed with every problem named
 * by file, task and field; and binding a message's parameters to a task.
 *
 * Pure: it reads the text it is given; a parameter value never reaches a
 * command unchecked or unquoted.
 */

import { parse as parseYaml } from "yaml";
import { errorText, isRecord } from "./util.ts";
import {
  type HostDefaults,
  hostKey,
  type HostSpec,
  parseHost,
  parseHostList,
  parseJump,
} from "./hosts.ts";
import { MAX_COMMAND_BYTES, shellQuote } from "./quote.ts";
import { ConfigError } from "./util.ts";
import { type HookSpec, parseHooks } from "./hook_spec.ts";

type ParamType = "string" | "integer" | "number" | "boolean";

type ParamValue = string | number | boolean;

export interface ParamSpec {
  name: string;
  type: ParamType;
  required: boolean;
  default?: ParamValue;
  /** Masked in every log line and result, as the token is. */
  secret: boolean;
  enum?: string[];
  /** Matched against the whole value. */
  pattern?: RegExp;
  maxLength?: number;
  min?: number;
  max?: number;
  /** A string starting with "-" is refused unless allowed: quoting stops the shell, not a command reading it as an option. */
  allowDash: boolean;
  description?: string;
}

export interface TaskSpec {
  name: string;
  command: string;
  params: ParamSpec[];
  /** 0 means no limit. */
  timeoutMs: number;
  maxAttempts: number;
  description?: string;
  /** Where it runs (its hosts: groups and hosts); undefined: SSH_HOST. */
  hosts?: HostSpec[];
  /** `concurrency:` and `concurrency_key:`: runs at once across workers (lib/limits.ts). */
  limit?: { concurrency: number; key?: string };
}

export interface Catalog {
  path: string;
  tasks: Map<string, TaskSpec>;
  /** What a plain-text body runs. */
  defaultTask?: string;
  /** The host groups (hosts:), for tasks and for a message's "hosts". */
  groups: Map<string, HostSpec[]>;
  /** Webhooks (hooks:, lib/hook_spec.ts): requests that post a task's message. */
  hooks: Map<string, HookSpec>;
  /** A group's `max_parallel:`, by hostKey: commands at once on each of its hosts. */
  maxParallel: Map<string, number>;
}

/** What a catalog's tasks get when they do not say. */
export interface CatalogDefaults {
  timeoutMs: number;
  maxAttempts: number;
  /** SSH_USER, SSH_PORT and SSH_PROXY_JUMP, for the hosts it names. */
  host: HostDefaults;
}

export const PLACEHOLDER = /\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}/g;

const PARAM_TYPES: ParamType[] = ["string", "integer", "number", "boolean"];

/**
 * Pure: a catalog's YAML (1.2, so JSON too) in, the catalog and its warnings
 * out; or a ConfigError naming every problem by file, task and field.
 */
export function parseCatalog(
  path: string,
  text: string,
  defaults: CatalogDefaults,
): { catalog: Catalog; warnings: string[] } {
  const problems: string[] = [];
  const warnings: string[] = [];
  const at = (where: string, what: string) => `${path}: ${where}: ${what}`;
  let root: unknown;
  try {
    root = parseYaml(text, { version: "1.2" });
  } catch (e) {
    throw new ConfigError([`${path}: not valid YAML: ${errorText(e)}`]);
  }
  if (!isRecord(root)) {
    throw new ConfigError([
      `${path}: must be a mapping with "tasks:" (see tasks.example.yaml)`,
    ]);
  }
  for (const key of Object.keys(root)) {
    if (!["tasks", "default", "hosts", "hooks"].includes(key)) {
      problems.push(
        at(
          key,
          `unknown key (expected "tasks", "default", "hosts" or "hooks")`,
        ),
      );
    }
  }
  const maxParallel = new Map<string, number>();
  const groups = parseGroups(
    root.hosts,
    defaults.host,
    (where, what) => problems.push(at(`hosts${where}`, what)),
    maxParallel,
  );
  const tasks = new Map<string, TaskSpec>();
  if (!isRecord(root.tasks) || Object.keys(root.tasks).length === 0) {
    problems.push(at("tasks", "must map task names to their commands"));
  } else {
    for (const [name, value] of Object.entries(root.tasks)) {
      const task = parseTask(
        name,
        value,
        defaults,
        groups,
        (where, what) => problems.push(at(`tasks.${name}${where}`, what)),
      );
      if (task === undefined) continue;
      tasks.set(name, task);
      const used = new Set(
        [...task.command.matchAll(PLACEHOLDER)].map((m) => m[1]),
      );
      for (const param of task.params) {
        if (!used.has(param.name)) {
          warnings.push(
            at(
              `tasks.${name}.params.${param.name}`,
              `declared but never used in the command`,
            ),
          );
        }
      }
    }
  }
  let defaultTask: string | undefined;
  if (root.default !== undefined) {
    if (typeof root.default !== "string" || !tasks.has(root.default)) {
      if (tasks.size > 0 || typeof root.default !== "string") {
        problems.push(at("default", `must name one of the tasks`));
      }
    } else if (tasks.get(root.default)!.params.some((p) => p.required)) {
      problems.push(
        at(
          "default",
          `task ${root.default} has required parameters, which a plain-text body cannot give`,
        ),
      );
    } else {
      defaultTask = root.default;
    }
  }
  // Every declared task, those with problems as undefined: one problem, not two.
  const declared = isRecord(root.tasks) ? Object.keys(root.tasks) : [];
  const hooks = parseHooks(
    root.hooks,
    new Map(declared.map((name) => [name, tasks.get(name)])),
    (where, what) => problems.push(at(`hooks${where}`, what)),
  );
  if (problems.length > 0) throw new ConfigError(problems);
  return {
    catalog: { path, tasks, defaultTask, groups, hooks, maxParallel },
    warnings,
  };
}

type Complain = (where: string, what: string) => void;

/** `hosts:` of a catalog: group names to lists of hosts, or to {hosts, jump}. */
function parseGroups(
  value: unknown,
  defaults: HostDefaults,
  complain: Complain,
  maxParallel: Map<string, number>,
): Map<string, HostSpec[]> {
  const groups = new Map<string, HostSpec[]>();
  if (value === undefined || value === null) return groups;
  if (!isRecord(value)) {
    complain("", "must map group names to lists of hosts");
    return groups;
  }
  for (const [name, group] of Object.entries(value)) {
    const where = `.${name}`;
    if (!/^[A-Za-z0-9_.-]{1,64}$/.test(name)) {
      complain(
        where,
        "a group name is 1 to 64 letters, digits, '_', '-' or '.'",
      );
    }
    let list: unknown = group;
    let jump = defaults.jump;
    let parallel: number | undefined;
    if (isRecord(group)) {
      for (const key of Object.keys(group)) {
        if (!["hosts", "jump", "max_parallel"].includes(key)) {
          complain(
            `${where}.${key}`,
            `unknown field (known: hosts, jump, max_parallel)`,
          );
        }
      }
      parallel = limitNumber(
        group.max_parallel,
        `${where}.max_parallel`,
        complain,
      );
      list = group.hosts;
      if (group.jump !== undefined) {
        if (typeof group.jump !== "string") {
          complain(
            `${where}.jump`,
            "must be [user@]host[:port], a chain of them, or none",
          );
        } else {
          const parsed = parseJump(group.jump, defaults);
          parsed.problems.forEach((p) => complain(`${where}.jump`, p));
          jump = parsed.jump;
        }
      }
    }
    if (
      !Array.isArray(list) || list.length === 0 ||
      !list.every((h) => typeof h === "string")
    ) {
      complain(where, "must be a list of hosts ([user@]host[:port])");
      continue;
    }
    const parsed = parseHostList(list.join(","), { ...defaults, jump });
    parsed.problems.forEach((p) => complain(where, p));
    groups.set(name, parsed.hosts);
    // A host in two groups takes the smaller of their limits.
    if (parallel !== undefined) {
      for (const host of parsed.hosts) {
        const key = hostKey(host);
        maxParallel.set(
          key,
          Math.min(parallel, maxParallel.get(key) ?? parallel),
        );
      }
    }
  }
  return groups;
}

/** A task's `hosts:`, groups and single hosts, each host once. */
function parseTaskHosts(
  value: unknown,
  defaults: HostDefaults,
  groups: Map<string, HostSpec[]>,
  complain: Complain,
): HostSpec[] | undefined {
  if (value === undefined || value === null) return undefined;
  if (
    !Array.isArray(value) || value.length === 0 ||
    !value.every((h) => typeof h === "string")
  ) {
    complain(".hosts", "must be a list of group names or hosts");
    return undefined;
  }
  const hosts: HostSpec[] = [];
  for (const entry of value as string[]) {
    let found = groups.get(entry);
    // A bare word that is not a group is a typo more often than a host.
    if (found === undefined && !/[.:@]/.test(entry) && entry !== "localhost") {
      complain(
        ".hosts",
        `${JSON.stringify(entry)} is not a group in hosts: (${
          [...groups.keys()].join(", ") || "none"
        }); a single host needs a dot, a colon or user@ (its address)`,
      );
      continue;
    }
    if (found === undefined) {
      const host = parseHost(entry, defaults);
      if (typeof host === "string") {
        complain(".hosts", host);
        continue;
      }
      found = [host];
    }
    for (const host of found) {
      if (!hosts.some((h) => h.name === host.name)) hosts.push(host);
    }
  }
  return hosts;
}

function parseTask(
  name: string,
  value: unknown,
  defaults: CatalogDefaults,
  groups: Map<string, HostSpec[]>,
  complain: Complain,
): TaskSpec | undefined {
  if (!/^[A-Za-z0-9_.-]{1,64}$/.test(name)) {
    complain("", "a task name is 1 to 64 letters, digits, '_', '-' or '.'");
  }
  if (!isRecord(value)) {
    complain("", `must be a mapping with "command:"`);
    return undefined;
  }
  const known = [
    "command",
    "params",
    "timeout",
    "max_attempts",
    "description",
    "hosts",
    "concurrency",
    "concurrency_key",
  ];
  for (const key of Object.keys(value)) {
    if (!known.includes(key)) {
      complain(`.${key}`, `unknown field (known: ${known.join(", ")})`);
    }
  }
  const command = value.command;
  if (typeof command !== "string" || command.trim() === "") {
    complain(".command", "must be the command line to run (a string)");
  }
  const params: ParamSpec[] = [];
  if (value.params !== undefined && value.params !== null) {
    if (!isRecord(value.params)) {
      complain(".params", "must map parameter names to their rules");
    } else {
      for (const [pname, rules] of Object.entries(value.params)) {
        const param = parseParam(
          pname,
          rules,
          (where, what) => complain(`.params.${pname}${where}`, what),
        );
        if (param) params.push(param);
      }
    }
  }
  if (typeof command === "string") {
    for (const problem of placeholderProblems(command)) {
      complain(".command", problem);
    }
    // Declared, even where its rules are wrong: one problem, not two.
    const declared = new Set(
      isRecord(value.params) ? Object.keys(value.params) : [],
    );
    for (const [, used] of command.matchAll(PLACEHOLDER)) {
      if (!declared.has(used)) {
        complain(
          ".command",
          `{{${used}}} has no parameter: declare it under params`,
        );
      }
    }
  }
  const timeout = value.timeout;
  if (
    timeout !== undefined &&
    !(typeof timeout === "number" && timeout >= 0 && timeout <= 86400)
  ) {
    complain(".timeout", "must be seconds from 0 (no limit) to 86400");
  }
  const maxAttempts = value.max_attempts;
  if (
    maxAttempts !== undefined &&
    !(Number.isInteger(maxAttempts) && (maxAttempts as number) >= 1 &&
      (maxAttempts as number) <= 1000)
  ) {
    complain(".max_attempts", "must be a whole number from 1 to 1000");
  }
  const hosts = parseTaskHosts(value.hosts, defaults.host, groups, complain);
  const limit = parseTaskLimit(value, params, complain);
  if (typeof command !== "string") return undefined;
  return {
    name,
    command,
    params,
    timeoutMs: typeof timeout === "number"
      ? timeout * 1000
      : defaults.timeoutMs,
    maxAttempts: typeof maxAttempts === "number"
      ? maxAttempts
      : defaults.maxAttempts,
    description: typeof value.description === "string"
      ? value.description
      : undefined,
    hosts,
    limit,
  };
}

/** `max_parallel:` or `concurrency:`: a whole number from 1, or undefined when absent. */
function limitNumber(
  value: unknown,
  where: string,
  complain: Complain,
): number | undefined {
  if (value === undefined) return undefined;
  if (
    Number.isInteger(value) && (value as number) >= 1 &&
    (value as number) <= 1000
  ) {
    return value as number;
  }
  complain(where, "must be a whole number from 1 to 1000 (runs at once)");
  return undefined;
}

/**
 * A task's `concurrency:` and `concurrency_key:` (lib/limits.ts holds them):
 * the key's placeholders are the task's parameters, not secret ones (a key
 * names a queue), and `{{host}}`, each host of a fan-out.
 */
function parseTaskLimit(
  value: Record<string, unknown>,
  params: ParamSpec[],
  complain: Complain,
): TaskSpec["limit"] {
  const concurrency = limitNumber(value.concurrency, ".concurrency", complain);
  const key = value.concurrency_key;
  if (key === undefined) {
    return concurrency === undefined ? undefined : { concurrency };
  }
  if (typeof key !== "string" || key.trim() === "" || key.length > 200) {
    complain(
      ".concurrency_key",
      `must be a template of up to 200 characters, such as "{{service}}" or "{{host}}"`,
    );
    return undefined;
  }
  if (value.concurrency === undefined) {
    complain(".concurrency_key", "needs concurrency: N (runs at once per key)");
  }
  for (const [, used] of key.matchAll(PLACEHOLDER)) {
    const param = params.find((p) => p.name === used);
    if (used === "host" && param !== undefined) {
      complain(
        ".concurrency_key",
        "{{host}} is the host of the fan-out, yet a parameter is also named host: rename it",
      );
    } else if (used === "host") continue;
    else if (param === undefined) {
      complain(
        ".concurrency_key",
        `{{${used}}} is neither a parameter of this task nor {{host}}`,
      );
    } else if (param.secret) {
      complain(
        ".concurrency_key",
        `{{${used}}} is a secret parameter: a key names a lock queue, so it cannot hold one`,
      );
    }
  }
  if (/\{\{|\}\}/.test(key.replace(PLACEHOLDER, ""))) {
    complain(
      ".concurrency_key",
      "has a {{ or }} that is not a {{name}} placeholder",
    );
  }
  return concurrency === undefined ? undefined : { concurrency, key };
}

/**
 * Why a command's placeholders would not each stand as one plain shell word.
 * A value is quoted as one word; inside quotes, after a backslash, in a
 * comment, a here-document, backticks or `$'...'`, or glued to other text,
 * that quoting would end a quote or be read again, and the value would run
 * as shell code.
 */
function placeholderProblems(command: string): string[] {
  const uses = [...command.matchAll(PLACEHOLDER)];
  if (uses.length === 0) return [];
  type Context = "plain" | "single" | "double" | "comment" | "escaped";
  const context: Context[] = [];
  const problems = new Set<string>();
  let state: "plain" | "single" | "double" | "comment" = "plain";
  for (let i = 0; i < command.length; i++) {
    const c = command[i];
    context[i] = state;
    if (state === "comment") {
      if (c === "\n") state = "plain";
    } else if (state === "single") {
      if (c === "'") state = "plain";
    } else if (c === "\\") {
      context[++i] = "escaped";
    } else if (state === "double") {
      if (c === '"') state = "plain";
      if (c === "`") problems.add("backticks run their text again: use $(...)");
    } else if (c === "'" || c === '"') {
      state = c === "'" ? "single" : "double";
      if (c === "'" && command[i - 1] === "$") {
        problems.add("$'...' reads escapes in its text: use '...'");
      }
    } else if (c === "#" && (i === 0 || /\s/.test(command[i - 1]))) {
      state = "comment";
      context[i] = "comment";
    } else if (c === "`") {
      problems.add("backticks run their text again: use $(...)");
    } else if (c === "<" && command[i + 1] === "<") {
      problems.add(
        "a here-document (<<) reads its text again: pass values as arguments",
      );
    }
  }
  if (state === "single" || state === "double") {
    problems.add(`a ${state} quote is never closed`);
  }
  for (const use of uses) {
    const at = use.index!;
    const end = at + use[0].length;
    const where = context[at];
    const before = at === 0 ? " " : command[at - 1];
    const after = end === command.length ? " " : command[end];
    const name = `{{${use[1]}}}`;
    if (where === "single" || where === "double") {
      problems.add(
        `${name} is inside quotes: write it bare, its value is quoted for you`,
      );
    } else if (where === "comment") {
      problems.add(
        `${name} is in a comment (after #), where a newline ends it`,
      );
    } else if (
      where !== "plain" || !/[\s=(;|&]/.test(before) ||
      !/[\s;)|&<>]/.test(after)
    ) {
      problems.add(
        `${name} must stand as a whole word (spaces around it, or --option={{x}}): its value is quoted as one`,
      );
    }
  }
  return [...problems];
}

function parseParam(
  name: string,
  rules: unknown,
  complain: Complain,
): ParamSpec | undefined {
  if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(name)) {
    complain(
      "",
      "a parameter name is a letter or '_', then letters, digits or '_'",
    );
    return undefined;
  }
  if (rules === null || rules === undefined) rules = {};
  if (!isRecord(rules)) {
    complain("", "must be a mapping of rules ({} for a plain string)");
    return undefined;
  }
  const known = [
    "type",
    "enum",
    "pattern",
    "max_length",
    "min",
    "max",
    "required",
    "default",
    "secret",
    "allow_dash",
    "description",
  ];
  for (const key of Object.keys(rules)) {
    if (!known.includes(key)) {
      complain(`.${key}`, `unknown rule (known: ${known.join(", ")})`);
    }
  }
  const type = rules.type ?? "string";
  if (!PARAM_TYPES.includes(type as ParamType)) {
    complain(".type", `must be one of ${PARAM_TYPES.join(", ")}`);
    return undefined;
  }
  const param: ParamSpec = {
    name,
    type: type as ParamType,
    required: true,
    secret: false,
    allowDash: false,
  };
  const flag = (key: "required" | "secret" | "allow_dash") => {
    const v = rules[key];
    if (v !== undefined && typeof v !== "boolean") {
      complain(`.${key}`, "must be true or false");
    }
    return v === true ? true : v === false ? false : undefined;
  };
  param.secret = flag("secret") ?? false;
  param.allowDash = flag("allow_dash") ?? false;
  const stringOnly = (key: string) => {
    if (rules[key] !== undefined && param.type !== "string") {
      complain(`.${key}`, `applies to strings only (this is ${param.type})`);
      return false;
    }
    return rules[key] !== undefined;
  };
  if (stringOnly("enum")) {
    const values = rules.enum;
    if (
      !Array.isArray(values) || values.length === 0 ||
      !values.every((v) => typeof v === "string")
    ) {
      complain(".enum", "must be a list of strings");
    } else param.enum = values as string[];
  }
  if (stringOnly("pattern")) {
    try {
      param.pattern = new RegExp(`^(?:${rules.pattern})$`, "u");
      if (typeof rules.pattern !== "string") throw new Error("not a string");
    } catch (e) {
      complain(".pattern", `must be a regular expression (${errorText(e)})`);
    }
  }
  if (stringOnly("max_length")) {
    const v = rules.max_length;
    if (!(Number.isInteger(v) && (v as number) >= 1)) {
      complain(".max_length", "must be a whole number from 1 up");
    } else param.maxLength = v as number;
  }
  for (const key of ["min", "max"] as const) {
    if (rules[key] === undefined) continue;
    if (param.type !== "integer" && param.type !== "number") {
      complain(`.${key}`, `applies to integer and number only`);
    } else if (typeof rules[key] !== "number") {
      complain(`.${key}`, "must be a number");
    } else param[key] = rules[key] as number;
  }
  if (
    param.min !== undefined && param.max !== undefined && param.min > param.max
  ) {
    complain(".min", `is over max (${param.max})`);
  }
  const required = flag("required");
  if (rules.default !== undefined) {
    if (required === true) {
      complain(".required", "a parameter with a default is not required");
    }
    const problem = valueProblem(param, rules.default);
    if (problem) complain(".default", problem);
    else param.default = rules.default as ParamValue;
    param.required = false;
  } else {
    param.required = required ?? true;
  }
  if (typeof rules.description === "string") {
    param.description = rules.description;
  }
  return param;
}

/** Why `value` does not fit the parameter, or undefined when it does. */
function valueProblem(param: ParamSpec, value: unknown): string | undefined {
  switch (param.type) {
    case "string": {
      if (typeof value !== "string") {
        return `must be a string, not ${kindOf(value)}`;
      }
      if (value.includes("\0")) {
        return "contains a NUL byte, which no shell can pass";
      }
      if (!value.isWellFormed()) {
        return "is not well-formed Unicode (lone surrogate)";
      }
      if (param.enum) {
        // The list is the allowlist: what it names passes, dash or not.
        return param.enum.includes(value)
          ? undefined
          : `must be one of ${param.enum.join(", ")}`;
      }
      if (value.startsWith("-") && !param.allowDash) {
        return `starts with "-", which the command could read as an option (the catalog may set allow_dash: true)`;
      }
      if (param.pattern && !param.pattern.test(value)) {
        return `must match ${param.pattern.source.slice(4, -2)}`;
      }
      if (
        param.maxLength !== undefined && [...value].length > param.maxLength
      ) {
        return `is longer than ${param.maxLength} characters`;
      }
      return undefined;
    }
    case "integer":
    case "number": {
      if (typeof value !== "number" || !Number.isFinite(value)) {
        return `must be a${
          param.type === "integer" ? "n integer" : " number"
        }, not ${kindOf(value)}`;
      }
      if (param.type === "integer" && !Number.isInteger(value)) {
        return "must be a whole number";
      }
      if (param.min !== undefined && value < param.min) {
        return `must be at least ${param.min}`;
      }
      if (param.max !== undefined && value > param.max) {
        return `must be at most ${param.max}`;
      }
      return undefined;
    }
    case "boolean":
      return typeof value === "boolean"
        ? undefined
        : `must be true or false, not ${kindOf(value)}`;
  }
}

function kindOf(value: unknown): string {
  if (value === null) return "null";
  if (Array.isArray(value)) return "a list";
  return typeof value === "object"
    ? "an object"
    : `${typeof value} ${JSON.stringify(value)}`;
}

export type Binding =
  | {
    ok: true;
    command: string;
    /** The command with each secret parameter shown as [redacted], for the log. */
    display: string;
    values: Record<string, ParamValue>;
    /** The values of secret parameters, to mask. */
    secrets: string[];
  }
  | { ok: false; reason: string };

/**
 * Fills a task's parameters, `args` in declaration order and `kwargs` by
 * name, checks every value, and puts each into the command shell-quoted.
 */
export function bindParams(
  task: TaskSpec,
  args: unknown[],
  kwargs: Record<string, unknown>,
): Binding {
  const fail = (reason: string): Binding => ({
    ok: false,
    reason: `task ${task.name}: ${reason}`,
  });
  if (args.length > task.params.length) {
    return fail(
      `${args.length} args for ${task.params.length} parameter(s) (${
        task.params.map((p) => p.name).join(", ") || "none"
      })`,
    );
  }
  const given = new Map<string, unknown>();
  args.forEach((value, i) => given.set(task.params[i].name, value));
  for (const [name, value] of Object.entries(kwargs)) {
    if (!task.params.some((p) => p.name === name)) {
      return fail(`unknown parameter ${JSON.stringify(name)}`);
    }
    if (given.has(name)) {
      return fail(`parameter ${name} given both in args and in kwargs`);
    }
    given.set(name, value);
  }
  const values: Record<string, ParamValue> = {};
  const secrets: string[] = [];
  for (const param of task.params) {
    let value = given.get(param.name);
    if (value === undefined) {
      if (param.required) return fail(`parameter ${param.name} is required`);
      if (param.default === undefined) continue;
      value = param.default;
    }
    const problem = valueProblem(param, value);
    if (problem) {
      // A secret's value is never shown, not even in the reason.
      return fail(
        param.secret
          ? `parameter ${param.name} (secret, value not shown) ${
            problem.replace(/,? not .*$/, "")
          }`
          : `parameter ${param.name}: ${JSON.stringify(value)} ${problem}`,
      );
    }
    values[param.name] = value as ParamValue;
    if (param.secret) {
      // As given, and as quoted into the command line.
      secrets.push(String(value), shellQuote(String(value)));
    }
  }
  const secret = new Set(
    task.params.filter((p) => p.secret).map((p) => p.name),
  );
  const fill = (shown: boolean) =>
    task.command.replace(PLACEHOLDER, (_, name: string) => {
      if (!Object.hasOwn(values, name)) return "''";
      return shown && secret.has(name)
        ? "[redacted]"
        : shellQuote(String(values[name]));
    });
  const command = fill(false);
  const bytes = new TextEncoder().encode(command).length;
  if (bytes > MAX_COMMAND_BYTES) {
    return fail(
      `the command with its parameters is ${bytes} bytes, over the ${MAX_COMMAND_BYTES}-byte limit`,
    );
  }
  return { ok: true, command, display: fill(true), values, secrets };
}
