/**
 * tools/check_imports.ts: fails `deno task check` when the project's imports
 * stop pointing one way: an import cycle anywhere, or a module of lib/ that
 * imports the worker's entry point (tasks.ts), cli/, bench/ or test/.
 *
 * It reads the module graph as Deno resolves it (`deno info --json`, type
 * imports included) and never runs the code it checks.
 */

const root = new URL("..", import.meta.url);
const rootPath = decodeURIComponent(root.pathname);

/** Every TypeScript file of the project, as file URLs (compat/ has its own deno.json). */
function projectFiles(dir = rootPath): string[] {
  const files: string[] = [];
  for (const entry of Deno.readDirSync(dir)) {
    if (entry.name.startsWith(".") || entry.name === "node_modules") continue;
    const path = `${dir}${entry.name}`;
    if (entry.isDirectory && entry.name !== "compat") {
      files.push(...projectFiles(`${path}/`));
    } else if (entry.isFile && entry.name.endsWith(".ts")) {
      files.push(new URL(path, "file:///").href);
    }
  }
  return files;
}

interface InfoModule {
  specifier: string;
  dependencies?: {
    code?: { specifier: string };
    type?: { specifier: string };
  }[];
}

/** The project's own modules and what each imports of them, from one `deno info`. */
async function graph(files: string[]): Promise<Map<string, string[]>> {
  const all = await Deno.makeTempFile({ suffix: ".ts" });
  try {
    await Deno.writeTextFile(
      all,
      files.map((f) => `import ${JSON.stringify(f)};\n`).join(""),
    );
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["info", "--json", "--config", `${rootPath}deno.json`, all],
      stdout: "piped",
      stderr: "piped",
    }).output();
    if (!out.success) {
      throw new Error(
        `deno info failed: ${new TextDecoder().decode(out.stderr)}`,
      );
    }
    const info = JSON.parse(new TextDecoder().decode(out.stdout)) as {
      modules: InfoModule[];
    };
    const own = new Set(files);
    const edges = new Map<string, string[]>();
    for (const m of info.modules) {
      if (!own.has(m.specifier)) continue;
      const deps = (m.dependencies ?? []).flatMap((d) =>
        [d.code?.specifier, d.type?.specifier].filter((s): s is string =>
          s !== undefined && own.has(s)
        )
      );
      edges.set(m.specifier, [...new Set(deps)]);
    }
    return edges;
  } finally {
    await Deno.remove(all);
  }
}

/** Each import cycle once, as the files around it. */
function cycles(edges: Map<string, string[]>): string[][] {
  const found: string[][] = [];
  const state = new Map<string, "open" | "done">();
  const path: string[] = [];
  const visit = (node: string) => {
    state.set(node, "open");
    path.push(node);
    for (const next of edges.get(node) ?? []) {
      if (state.get(next) === "open") {
        found.push([...path.slice(path.indexOf(next)), next]);
      } else if (!state.has(next)) visit(next);
    }
    path.pop();
    state.set(node, "done");
  };
  for (const node of [...edges.keys()].sort()) {
    if (!state.has(node)) visit(node);
  }
  return found;
}

const name = (specifier: string) =>
  decodeURIComponent(new URL(specifier).pathname).slice(rootPath.length);

/** lib/ is the worker's parts: it never reaches back to what uses it. */
function wrongWay(edges: Map<string, string[]>): string[] {
  const problems: string[] = [];
  for (const [from, deps] of edges) {
    const source = name(from);
    if (!source.startsWith("lib/") || source.endsWith("_test.ts")) continue;
    for (const dep of deps.map(name)) {
      if (dep === "tasks.ts" || /^(cli|bench|test)\//.test(dep)) {
        problems.push(`${source} imports ${dep}: lib/ must not depend on it`);
      }
    }
  }
  return problems;
}

if (import.meta.main) {
  const edges = await graph(projectFiles());
  const problems = [
    ...cycles(edges).map((c) => `import cycle: ${c.map(name).join(" -> ")}`),
    ...wrongWay(edges),
  ];
  for (const p of problems) console.error(p);
  if (problems.length > 0) {
    console.error(
      "imports: the dependencies must point one way (tasks.ts -> lib/); move the shared part to the module that owns it",
    );
    Deno.exit(1);
  }
  console.log(`imports: ${edges.size} modules, no cycle, lib/ points one way`);
}
