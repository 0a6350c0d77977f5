// End-to-end check of the page in headless Chromium (playwright-core, the system's browser; no downloads):
//   node web/test/e2e.mjs --url http://127.0.0.1:PORT/ [--prompt TEXT] [--tokens N] [--ep wasm|webgpu|auto]
//                         [--chromium /usr/bin/chromium] [--timeout-ms 60000] [--webgpu]
// --webgpu: launch Chromium with WebGPU on (Vulkan, e.g. Mesa's lavapipe) instead of --disable-gpu.
// Types the prompt, clicks Generate, waits for the page to finish and prints one JSON object on stdout:
// {promptIds, ids, finish, text, status, stats, crossOriginIsolated, errors}. Exit 1 when the page fails.
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { parseArgs } from "node:util";
import { chromium } from "playwright-core";

const { values: a } = parseArgs({
  options: {
    url: { type: "string" },
    prompt: { type: "string", default: "And God said" },
    tokens: { type: "string", default: "16" },
    ep: { type: "string", default: "wasm" },
    chromium: { type: "string", default: process.env.CHROMIUM || "/usr/bin/chromium" },
    "timeout-ms": { type: "string", default: "60000" },
    webgpu: { type: "boolean", default: false },
  },
});
if (!a.url) {
  console.error("e2e.mjs: --url is required");
  process.exit(2);
}
const timeout = Number(a["timeout-ms"]);
const profile = fs.mkdtempSync(path.join(os.tmpdir(), "edgeloop-chromium-"));
const errors = [];
let context;
try {
  context = await chromium.launchPersistentContext(profile, {
    executablePath: a.chromium,
    headless: true,
    timeout,
    args: ["--headless", "--no-sandbox", "--disable-quic", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync",
      ...(a.webgpu ? ["--enable-unsafe-webgpu", "--enable-features=Vulkan", "--use-angle=vulkan", "--ignore-gpu-blocklist"]
        : ["--disable-gpu"])],
  });
  const page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(timeout);
  page.on("pageerror", (e) => errors.push(`pageerror: ${e.message}`));
  page.on("console", (m) => { if (m.type() === "error") errors.push(`console: ${m.text()}`); });
  const url = new URL(a.url);
  url.searchParams.set("ep", a.ep);
  await page.goto(url.href);
  await page.waitForFunction(() => ["ready", "error"].includes(document.getElementById("status").dataset.state));
  const ready = await page.locator("#status").getAttribute("data-state");
  if (ready === "ready") {
    await page.fill("#prompt", a.prompt);
    await page.fill("#max-tokens", a.tokens);
    await page.click("#generate");
    await page.waitForFunction(() => ["done", "error"].includes(document.getElementById("status").dataset.state));
  }
  const result = await page.evaluate(() => {
    const out = document.getElementById("output");
    const rows = [...document.querySelectorAll("#stats tr")].map((r) => [r.cells[0].textContent, r.cells[1].textContent]);
    const last = window.edgeloopDemo?.last;
    return {
      state: document.getElementById("status").dataset.state,
      status: document.getElementById("status").textContent,
      promptIds: JSON.parse(out.dataset.promptIds || "[]"),
      ids: JSON.parse(out.dataset.ids || "[]"),
      finish: out.dataset.finish ?? null,
      text: out.textContent,
      stats: Object.fromEntries(rows),
      decodeTokensPerS: last?.decodeTokensPerS ?? null,
      prefillMs: last?.prefillMs ?? null,
      crossOriginIsolated: self.crossOriginIsolated,
    };
  });
  result.errors = errors;
  process.stdout.write(JSON.stringify(result) + "\n");
  process.exitCode = result.state === "done" ? 0 : 1;
} catch (e) {
  process.stdout.write(JSON.stringify({ state: "error", status: String(e?.message ?? e).split("\n")[0], errors }) + "\n");
  process.exitCode = 1;
} finally {
  await context?.close().catch(() => {});
  fs.rmSync(profile, { recursive: true, force: true });
}
