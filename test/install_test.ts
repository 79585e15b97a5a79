/**
 * The production install: what `deno task start` downloads into an empty Deno
 * cache (DENO_DIR), from the npm registry. Test-only packages (Iron.io's client
 * and its old `request` tree, kept in compat/) must not come along, and the
 * first start must print no warning a user would have to interpret.
 */
import assert from "node:assert/strict";

const CONFIG = new URL("../deno.json", import.meta.url).pathname;

/** Package names in a Deno npm cache: "ssh2", "@logtape/logtape", ... */
function cachedPackages(denoDir: string): string[] {
  const registry = `${denoDir}/npm/registry.npmjs.org`;
  const names: string[] = [];
  for (const entry of Deno.readDirSync(registry)) {
    if (!entry.isDirectory) continue;
    if (!entry.name.startsWith("@")) {
      names.push(entry.name);
      continue;
    }
    for (const scoped of Deno.readDirSync(`${registry}/${entry.name}`)) {
      if (scoped.isDirectory) names.push(`${entry.name}/${scoped.name}`);
    }
  }
  return names.sort();
}

Deno.test("install: a first start on an empty cache fetches no test-only package and prints no warning", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const denoDir = `${dir}/deno`;
    // The SSH_PORT the worker refuses stops it right after the install, once
    // all its modules are loaded; the rest of the environment is kept for
    // whatever reaching the npm registry needs here (proxy, certificates).
    const env = {
      DENO_DIR: denoDir,
      INIT_CWD: dir,
      NO_COLOR: "1",
      SSH_PORT: "0",
    };
    const start = await new Deno.Command(Deno.execPath(), {
      args: ["task", "--config", CONFIG, "start"],
      cwd: dir,
      env,
      stdin: "null",
    }).output();
    const output = new TextDecoder().decode(start.stdout) +
      new TextDecoder().decode(start.stderr);
    assert.equal(start.code, 2, output);
    assert.match(output, /FATAL invalid configuration[\s\S]*SSH_PORT/);

    const cached = cachedPackages(denoDir);
    for (const needed of ["ssh2", "@logtape/logtape"]) {
      assert.ok(cached.includes(needed), `${needed} not in ${cached}`);
    }
    for (const testOnly of ["iron_mq", "iron_core", "request"]) {
      assert.ok(!cached.includes(testOnly), `${testOnly} in ${cached}`);
    }
    assert.doesNotMatch(output, /build script|lifecycle script|warning/i);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
