/**
 * lib/hook_spec.ts: the catalog's `hooks:` section: each hook names a task,
 * how its requests are trusted (`verify`), which of them run it (`when`),
 * where its parameters are in the JSON body (`params`) and which header
 * names a delivery (`dedupe_header`); and the secrets each hook's `verify`
 * names, looked up in the environment.
 *
 * Pure: it reads the values it is given. The catalog file names the
 * variables that hold secrets, never a secret; a problem never shows one.
 * (Apart from lib/hooks.ts, which receives the requests, so that the catalog
 * can parse this section without importing what receives them.)
 */

import { type Env, envValue, isRecord } from "./util.ts";

type HmacAlgorithm = "sha256" | "sha512";

/** How a hook's requests are trusted. */
type HookVerify =
  /** X-Hub-Signature-256: `sha256=` and the hex HMAC-SHA256 of the body. */
  | { kind: "github"; secretEnv: string }
  /** X-Gitlab-Token: the token itself. */
  | { kind: "gitlab"; secretEnv: string }
  /** `header`: `prefix` and the hex HMAC of the body. */
  | {
    kind: "hmac";
    secretEnv: string;
    header: string;
    algorithm: HmacAlgorithm;
    prefix: string;
  };

/** A JSON value a `when: body:` entry must equal. */
type Scalar = string | number | boolean | null;

export interface HookSpec {
  name: string;
  task: string;
  verify: HookVerify;
  /** Header name (lower case) and the value it must have. */
  whenHeaders: [string, string][];
  /** A dotted path into the body, and the value it must have there. */
  whenBody: { path: string; value: Scalar }[];
  /** Task parameter and the dotted path of its value in the body. */
  params: { param: string; path: string }[];
  /** Lower case. */
  dedupeHeader?: string;
}

/** What a hook needs to know of the catalog's tasks. */
interface TaskShape {
  params: { name: string; required: boolean }[];
}

type Complain = (where: string, what: string) => void;

const HOOK_NAME = /^[A-Za-z0-9_.-]{1,64}$/;
const ENV_NAME = /^[A-Za-z_][A-Za-z0-9_]*$/;
/** An HTTP header name (RFC 9110 token). */
const HEADER_NAME = /^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,100}$/;
/** Dotted path segments: JSON keys (or list indexes) without dots. */
const PATH = /^[^.\s]+(?:\.[^.\s]+)*$/;
const ALGORITHMS: HmacAlgorithm[] = ["sha256", "sha512"];

/**
 * `hooks:` of a catalog, every problem told to `complain` with its place
 * (`.<hook>.<field>`); hooks with problems are left out. `tasks` holds every
 * task the catalog declares: undefined for one with problems of its own.
 */
export function parseHooks(
  value: unknown,
  tasks: Map<string, TaskShape | undefined>,
  complain: Complain,
): Map<string, HookSpec> {
  const hooks = new Map<string, HookSpec>();
  if (value === undefined || value === null) return hooks;
  if (!isRecord(value)) {
    complain("", "must map hook names to their task, verify and params");
    return hooks;
  }
  for (const [name, raw] of Object.entries(value)) {
    let problems = 0;
    const hook = parseHook(name, raw, tasks, (where, what) => {
      problems++;
      complain(`.${name}${where}`, what);
    });
    if (hook !== undefined && problems === 0) hooks.set(name, hook);
  }
  return hooks;
}

const HOOK_FIELDS = ["task", "verify", "when", "params", "dedupe_header"];

function parseHook(
  name: string,
  raw: unknown,
  tasks: Map<string, TaskShape | undefined>,
  complain: Complain,
): HookSpec | undefined {
  if (!HOOK_NAME.test(name)) {
    complain("", "a hook name is 1 to 64 letters, digits, '_', '-' or '.'");
  }
  if (!isRecord(raw)) {
    complain("", `must be a mapping with "task:" and "verify:"`);
    return undefined;
  }
  for (const key of Object.keys(raw)) {
    if (!HOOK_FIELDS.includes(key)) {
      complain(`.${key}`, `unknown field (known: ${HOOK_FIELDS.join(", ")})`);
    }
  }
  const task = typeof raw.task === "string" ? tasks.get(raw.task) : undefined;
  // A task with problems of its own: those say what to fix.
  const broken = typeof raw.task === "string" && tasks.has(raw.task) &&
    task === undefined;
  if (task === undefined && !broken) {
    complain(
      ".task",
      `must name one of the tasks (${[...tasks.keys()].join(", ") || "none"})`,
    );
  }
  const verify = parseVerify(raw.verify, complain);
  const whenHeaders: [string, string][] = [];
  const whenBody: HookSpec["whenBody"] = [];
  if (raw.when !== undefined && raw.when !== null) {
    if (!isRecord(raw.when)) {
      complain(".when", "must be a mapping with header: and/or body:");
    } else {
      for (const key of Object.keys(raw.when)) {
        if (key !== "header" && key !== "body") {
          complain(`.when.${key}`, "unknown field (known: header, body)");
        }
      }
      const headers = raw.when.header;
      if (headers !== undefined && headers !== null) {
        if (!isRecord(headers)) {
          complain(".when.header", "must map header names to their values");
        } else {
          for (const [header, value] of Object.entries(headers)) {
            if (!HEADER_NAME.test(header)) {
              complain(`.when.header.${header}`, "is not a header name");
            } else if (typeof value !== "string") {
              complain(`.when.header.${header}`, "must be a string");
            } else whenHeaders.push([header.toLowerCase(), value]);
          }
        }
      }
      const body = raw.when.body;
      if (body !== undefined && body !== null) {
        if (!isRecord(body)) {
          complain(".when.body", "must map dotted paths to their values");
        } else {
          for (const [path, value] of Object.entries(body)) {
            if (!PATH.test(path)) {
              complain(`.when.body.${path}`, "is not a dotted path (a.b.c)");
            } else if (
              value !== null && !["string", "number", "boolean"].includes(
                typeof value,
              )
            ) {
              complain(
                `.when.body.${path}`,
                "must be one value (a string, number, true, false or null)",
              );
            } else whenBody.push({ path, value: value as Scalar });
          }
        }
      }
    }
  }
  const params: HookSpec["params"] = [];
  if (raw.params !== undefined && raw.params !== null) {
    if (!isRecord(raw.params)) {
      complain(".params", "must map the task's parameters to dotted paths");
    } else {
      for (const [param, path] of Object.entries(raw.params)) {
        if (task !== undefined && !task.params.some((p) => p.name === param)) {
          complain(
            `.params.${param}`,
            `task ${raw.task} has no such parameter (it has: ${
              task.params.map((p) => p.name).join(", ") || "none"
            })`,
          );
        } else if (typeof path !== "string" || !PATH.test(path)) {
          complain(`.params.${param}`, "must be a dotted path (a.b.c)");
        } else params.push({ param, path });
      }
    }
  }
  // Named, even where its path is wrong: one problem, not two.
  const mapped = isRecord(raw.params) ? Object.keys(raw.params) : [];
  for (const p of task?.params ?? []) {
    if (p.required && !mapped.includes(p.name)) {
      complain(
        ".params",
        `task ${raw.task}'s required parameter ${p.name} is not given: map it to a path in the body`,
      );
    }
  }
  let dedupeHeader: string | undefined;
  if (raw.dedupe_header !== undefined && raw.dedupe_header !== null) {
    if (
      typeof raw.dedupe_header !== "string" ||
      !HEADER_NAME.test(raw.dedupe_header)
    ) {
      complain(".dedupe_header", "must be a header name");
    } else dedupeHeader = raw.dedupe_header.toLowerCase();
  }
  if (task === undefined || verify === undefined) return undefined;
  return {
    name,
    task: raw.task as string,
    verify,
    whenHeaders,
    whenBody,
    params,
    dedupeHeader,
  };
}

function parseVerify(
  raw: unknown,
  complain: Complain,
): HookVerify | undefined {
  const kinds = ["github", "gitlab", "hmac"];
  if (!isRecord(raw) || Object.keys(raw).length !== 1) {
    complain(
      ".verify",
      "is required: one of { github: { secret_env } }, { gitlab: { token_env } } or { hmac: { secret_env, header, algorithm, prefix } }",
    );
    return undefined;
  }
  const [kind, rules] = Object.entries(raw)[0];
  const where = `.verify.${kind}`;
  if (!kinds.includes(kind)) {
    complain(where, `unknown scheme (known: ${kinds.join(", ")})`);
    return undefined;
  }
  if (!isRecord(rules)) {
    complain(where, "must be a mapping");
    return undefined;
  }
  const known = kind === "hmac"
    ? ["secret_env", "header", "algorithm", "prefix"]
    : [kind === "gitlab" ? "token_env" : "secret_env"];
  for (const key of Object.keys(rules)) {
    if (!known.includes(key)) {
      complain(`${where}.${key}`, `unknown field (known: ${known.join(", ")})`);
    }
  }
  const envKey = known[0];
  const secretEnv = rules[envKey];
  let ok = true;
  if (typeof secretEnv !== "string" || !ENV_NAME.test(secretEnv)) {
    complain(
      `${where}.${envKey}`,
      "must name the environment variable that holds the secret (the secret itself never goes in this file)",
    );
    ok = false;
  }
  if (kind === "github") {
    return ok ? { kind, secretEnv: secretEnv as string } : undefined;
  }
  if (kind === "gitlab") {
    return ok ? { kind, secretEnv: secretEnv as string } : undefined;
  }
  const header = rules.header;
  if (typeof header !== "string" || !HEADER_NAME.test(header)) {
    complain(`${where}.header`, "must name the header holding the signature");
    ok = false;
  }
  const algorithm = rules.algorithm ?? "sha256";
  if (!ALGORITHMS.includes(algorithm as HmacAlgorithm)) {
    complain(
      `${where}.algorithm`,
      `must be ${ALGORITHMS.join(" or ")} (SHA-1 and MD5 are too weak)`,
    );
    ok = false;
  }
  const prefix = rules.prefix ?? "";
  if (typeof prefix !== "string") {
    complain(`${where}.prefix`, `must be a string, such as "sha256="`);
    ok = false;
  }
  if (!ok) return undefined;
  return {
    kind: "hmac",
    secretEnv: secretEnv as string,
    header: (header as string).toLowerCase(),
    algorithm: algorithm as HmacAlgorithm,
    prefix: prefix as string,
  };
}

/**
 * Each hook's secret from the environment (a runit env/ file is one too),
 * or a problem naming the variable, never its value.
 */
export function hookSecrets(
  catalogPath: string,
  hooks: Map<string, HookSpec>,
  env: Env,
): { secrets: Map<string, string>; problems: string[] } {
  const secrets = new Map<string, string>();
  const problems: string[] = [];
  for (const hook of hooks.values()) {
    const name = hook.verify.secretEnv;
    const value = envValue(env, name);
    const field = hook.verify.kind === "gitlab" ? "token_env" : "secret_env";
    if (value === undefined) {
      problems.push(
        `${catalogPath}: hooks.${hook.name}.verify.${hook.verify.kind}.${field}: ${name} is not set: set it to the hook's secret in the worker's environment (under runit: a file env/${name}), as the sender has it`,
      );
    } else secrets.set(hook.name, value);
  }
  return { secrets, problems };
}
