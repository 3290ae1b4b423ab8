// Headless Chromium (Debian's `chromium`, driven by playwright-core) opens the web demo served
// by `coinfer serve` at GET /, sends a prompt in two chats at once, waits for streamed text in
// both, checks the header shows the server's batch size, and saves a screenshot.
//   node tests/server/test_browser.mjs COINFER_EXE [NODE_DIR] [SCREENSHOT_PATH]
// SCREENSHOT_PATH defaults to $COINFER_TEST_ARTIFACTS/web.png, else build/test-artifacts/web.png.
// Exits 77 (skip) when chromium, playwright-core or the model is missing.
import { existsSync, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";

import { Runner, SKIP, check, model_path, parse_args, require_package, start_server } from "./serve_util.mjs";

const { exe, node_dir } = parse_args();
const screenshot = resolve(process.argv[4] ||
  join(process.env.COINFER_TEST_ARTIFACTS || join("build", "test-artifacts"), "web.png"));
const chromium_path = process.env.CHROMIUM || "/usr/bin/chromium";
if (!existsSync(chromium_path)) {
  console.log(`SKIP: ${chromium_path} not found (apt-get install chromium, or set CHROMIUM)`);
  process.exit(SKIP);
}
const { chromium } = require_package(node_dir, "playwright-core");
const model = model_path("stories260K.gguf");

const PROMPTS = ["Once upon a time, there was a little dog named Max.", "Lily went to the park with her mom."];

async function main() {
  const t = new Runner();
  let server = null, context = null;
  const profile = mkdtempSync(join(tmpdir(), "coinfer-chromium-"));
  try {
    server = await start_server(exe, model);
    // A persistent context is how Playwright takes a --user-data-dir: a fresh one per run.
    context = await chromium.launchPersistentContext(profile, {
      executablePath: chromium_path,
      headless: true,
      viewport: { width: 1400, height: 800 },
      args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync"],
    });
    const page = context.pages()[0] || await context.newPage();
    const page_errors = [];
    page.on("pageerror", (e) => page_errors.push(String(e)));
    page.on("console", (m) => { if (m.type() === "error") page_errors.push(m.text()); });

    await t.run("GET / serves the demo page with three chats", async () => {
      const res = await page.goto(server.url + "/", { waitUntil: "load", timeout: 30000 });
      check(res && res.ok(), `GET / status ${res && res.status()}`);
      check((res.headers()["content-type"] || "").includes("text/html"), "content-type text/html");
      await page.waitForFunction(() => document.querySelectorAll(".chat").length === 3, null, { timeout: 10000 });
    });

    await t.run("the + button adds a chat", async () => {
      await page.click("#add-chat");
      await page.waitForFunction(() => document.querySelectorAll(".chat").length === 4, null, { timeout: 5000 });
    });

    await t.run("two chats stream at once and both show text and tokens/s", async () => {
      await page.fill("#max-tokens", "96");
      await page.fill("#temperature", "0.8");
      const chats = page.locator(".chat");
      for (let i = 0; i < 2; i++) await chats.nth(i).locator(".prompt").fill(PROMPTS[i]);
      // Both sends go out before either answer is back.
      await page.evaluate(() => {
        const els = document.querySelectorAll(".chat");
        els[0].querySelector(".send").click();
        els[1].querySelector(".send").click();
      });
      await page.waitForFunction(() => {
        const els = [...document.querySelectorAll(".chat")].slice(0, 2);
        return els.every((el) => {
          const out = el.querySelector(".msg.assistant");
          return out && out.textContent.length > 0 && !out.classList.contains("streaming");
        });
      }, null, { timeout: 60000 });
      for (let i = 0; i < 2; i++) {
        const chat = chats.nth(i);
        const text = await chat.locator(".msg.assistant").first().textContent();
        const n_tokens = Number(await chat.locator(".n-tokens").textContent());
        const state = await chat.locator(".state").textContent();
        console.log(`     chat ${i + 1}: ${n_tokens} tokens, ${state}, tok/s ${await chat.locator(".tps").textContent()}: ` +
                    JSON.stringify(text.slice(0, 80)));
        check(text.length > 0, `chat ${i + 1} shows streamed text`);
        check(n_tokens > 0, `chat ${i + 1} counts tokens`);
        check(state.startsWith("done"), `chat ${i + 1} finished (state "${state}")`);
        check(await chat.locator(".msg.error").count() === 0, `chat ${i + 1} shows no error`);
      }
    });

    await t.run("the header shows the server's batch size from /metrics", async () => {
      // The page polls /metrics every 500 ms: wait for a poll that saw the two requests.
      await page.waitForFunction(() => document.querySelector("#metrics-status").textContent === "metrics: live" &&
                                       Number(document.querySelector("#batch-peak").textContent) >= 1,
                                 null, { timeout: 10000 }).catch(() => {});
      const batch = await page.locator("#batch-size").textContent();
      const peak = await page.locator("#batch-peak").textContent();
      const kv = await page.locator("#kv-blocks").textContent();
      console.log(`     batch size ${batch}, peak ${peak}, KV ${kv}`);
      check(/^\d+$/.test(batch), `batch size is a number, got "${batch}"`);
      check(/^\d+$/.test(peak) && Number(peak) >= 1, `peak batch size is a number >= 1, got "${peak}"`);
      check(/^\d+ \/ \d+$/.test(kv), `KV blocks "used / total", got "${kv}"`);
      if (Number(peak) < 2) console.log("     note: the two chats did not share an engine step");
    });

    await t.run("screenshot saved", async () => {
      mkdirSync(dirname(screenshot), { recursive: true });
      await page.screenshot({ path: screenshot, fullPage: true });
      check(existsSync(screenshot), `screenshot at ${screenshot}`);
      console.log(`     screenshot: ${screenshot}`);
    });

    await t.run("no script errors on the page", async () => {
      check(page_errors.length === 0, `page errors: ${page_errors.join("; ")}`);
    });
  } catch (e) {
    await t.run("setup", async () => { throw e; });
  } finally {
    if (context) await context.close().catch(() => {});
    if (server) await server.stop();
    rmSync(profile, { recursive: true, force: true });
  }
  return t.finish();
}

main().then((rc) => process.exit(rc), (e) => {
  console.log(`FAIL ${e && e.stack ? e.stack : e}`);
  console.log("0 passed, 1 failed");
  process.exit(1);
});
