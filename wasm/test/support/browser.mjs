// Browser test helpers: Debian's Chromium driven by playwright-core (never a downloaded
// browser), and the example's static server with the test pages mounted at /test/.

import { existsSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";
import { startServer } from "../../../examples/browser-todo/serve.mjs";
import { wasmDir } from "./weft.mjs";

export const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";

/** Launches Chromium; `newContext()` gives isolated storage (its own IndexedDB) per replica. */
export async function launchBrowser() {
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
    timeout: 60_000,
  });
  return browser;
}

/** The static server: the example at /, the package at /weft/, test pages at /test/. */
export function startPageServer() {
  return startServer({ port: 0, mounts: { "/test/": join(wasmDir, "test", "browser", "pages") } });
}

/**
 * Opens a page and records what must not happen there: uncaught errors, unhandled
 * rejections (reported by the page itself), console errors.
 */
export async function openPage(context, url) {
  const page = await context.newPage();
  const problems = [];
  page.on("pageerror", (e) => problems.push(`pageerror: ${e.message}`));
  page.on("console", (m) => {
    // Chromium itself logs every failed WebSocket dial; offline phases cause those on purpose.
    if (m.type() === "error" && !/WebSocket connection to .* failed/.test(m.text())) {
      problems.push(`console.error: ${m.text()}`);
    }
  });
  page.problems = problems;
  await page.goto(url);
  return page;
}
