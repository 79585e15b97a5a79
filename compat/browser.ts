/**
 * A headless Chromium for web_test.ts, driven through playwright-core and the
 * system's browser (Debian's /usr/bin/chromium; playwright downloads none).
 * It lives here, with its own deno.json and deno.lock, because it is for tests
 * only: the worker's first start installs every package of the main lockfile.
 *
 * It reads one JSON request a line on stdin and answers each with one JSON
 * line on stdout: {"id", "ok": true, "value"} or {"id", "ok": false, "error"}.
 * It closes the browser and exits at the end of stdin.
 *
 *   deno run --config compat/deno.json --allow-all compat/browser.ts [CHROMIUM]
 *
 * Requests (`page` is the number `open` answered):
 *   {"op": "open", "width", "height", "mobile"?}      → page number
 *   {"op": "goto", "page", "url"}
 *   {"op": "waitFor", "page", "expression", "timeoutMs"?}  until it is truthy
 *   {"op": "evaluate", "page", "expression"}           → its JSON value
 *   {"op": "click", "page", "selector"}
 *   {"op": "fill", "page", "selector", "value"}
 *   {"op": "screenshot", "page", "path", "fullPage"?}
 *   {"op": "errors", "page"}   → the page's uncaught errors and console errors
 *   {"op": "close", "page"}
 */
import { type Browser, chromium, type Page } from "playwright-core";

interface Request {
  id: number;
  op: string;
  page?: number;
  width?: number;
  height?: number;
  mobile?: boolean;
  url?: string;
  expression?: string;
  timeoutMs?: number;
  selector?: string;
  value?: string;
  path?: string;
  fullPage?: boolean;
}

const executablePath = Deno.args[0] ?? "/usr/bin/chromium";
const browser: Browser = await chromium.launch({ executablePath });
const pages = new Map<number, Page>();
const consoleErrors = new Map<number, string[]>();
let nextPage = 1;

function pageOf(request: Request): Page {
  const page = pages.get(request.page ?? 0);
  if (page === undefined) throw new Error(`no page ${request.page}`);
  return page;
}

async function answer(request: Request): Promise<unknown> {
  switch (request.op) {
    case "open": {
      const context = await browser.newContext({
        viewport: {
          width: request.width ?? 1280,
          height: request.height ?? 800,
        },
        isMobile: request.mobile ?? false,
        hasTouch: request.mobile ?? false,
        deviceScaleFactor: 1,
      });
      const page = await context.newPage();
      const number = nextPage++;
      pages.set(number, page);
      // A page error (an exception, a CSP refusal) fails the test that reads it.
      const errors: string[] = [];
      consoleErrors.set(number, errors);
      page.on("pageerror", (e) => errors.push(String(e)));
      page.on("console", (m) => {
        if (m.type() === "error") errors.push(m.text());
      });
      return number;
    }
    case "goto":
      await pageOf(request).goto(request.url!);
      return null;
    case "waitFor": {
      // Polled from here: waitForFunction evaluates its string with eval()
      // inside the page, which the page's Content-Security-Policy refuses.
      const page = pageOf(request);
      const deadline = Date.now() + (request.timeoutMs ?? 30_000);
      while (!(await page.evaluate(request.expression!))) {
        if (Date.now() > deadline) {
          throw new Error(`timed out waiting for ${request.expression}`);
        }
        await new Promise((resolve) => setTimeout(resolve, 25));
      }
      return null;
    }
    case "evaluate":
      return await pageOf(request).evaluate(request.expression!);
    case "click":
      await pageOf(request).click(request.selector!);
      return null;
    case "fill":
      await pageOf(request).fill(request.selector!, request.value!);
      return null;
    case "screenshot":
      await pageOf(request).screenshot({
        path: request.path!,
        fullPage: request.fullPage ?? false,
      });
      return null;
    case "errors":
      return consoleErrors.get(request.page ?? 0) ?? [];
    case "close":
      await pageOf(request).context().close();
      pages.delete(request.page!);
      return null;
  }
  throw new Error(`unknown op ${request.op}`);
}

const encoder = new TextEncoder();
const reply = (line: unknown) =>
  Deno.stdout.write(encoder.encode(JSON.stringify(line) + "\n"));

let buffered = "";
const decoder = new TextDecoder();
try {
  for await (const chunk of Deno.stdin.readable) {
    buffered += decoder.decode(chunk, { stream: true });
    let end: number;
    while ((end = buffered.indexOf("\n")) >= 0) {
      const request: Request = JSON.parse(buffered.slice(0, end));
      buffered = buffered.slice(end + 1);
      try {
        await reply({ id: request.id, ok: true, value: await answer(request) });
      } catch (e) {
        await reply({
          id: request.id,
          ok: false,
          error: e instanceof Error ? e.message : String(e),
        });
      }
    }
  }
} finally {
  await browser.close();
}
