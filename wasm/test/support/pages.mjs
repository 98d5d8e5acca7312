// Helpers for tests that drive the harness page (test/browser/pages/harness.html) in
// Chromium: open it as a replica, compare documents across pages, wait for statuses.

import assert from "node:assert/strict";
import { openPage } from "./browser.mjs";

export const TIMEOUT = 20_000;

/** The page's documents as `{id: {heads, body}}` with sorted keys, as a string. */
export function pageSnapshot(page) {
  return page.evaluate(() => canonical(h.replica.list(null)));
}

/** JSON with sorted keys and sorted heads: equal strings mean equal documents. */
export const CANONICAL = `
  window.canonical = (docs) => {
    const sortKeys = (v) => Array.isArray(v) ? v.map(sortKeys)
      : v && typeof v === "object" ? Object.fromEntries(Object.keys(v).sort().map((k) => [k, sortKeys(v[k])])) : v;
    const out = {};
    for (const d of [...docs].sort((a, b) => a.id < b.id ? -1 : 1)) out[d.id] = { heads: [...d.heads].sort(), body: sortKeys(d.body) };
    return JSON.stringify(out);
  };`;

export function canonical(docs) {
  const sortKeys = (v) =>
    Array.isArray(v)
      ? v.map(sortKeys)
      : v && typeof v === "object"
        ? Object.fromEntries(Object.keys(v).sort().map((k) => [k, sortKeys(v[k])]))
        : v;
  const out = {};
  for (const d of [...docs].sort((a, b) => (a.id < b.id ? -1 : 1))) {
    out[d.id] = { heads: [...d.heads].sort(), body: sortKeys(d.body) };
  }
  return JSON.stringify(out);
}

/** Opens the harness page as replica `name` (connected to `relay` when given) and waits for it. */
export async function harness(context, server, name, relay) {
  const query = new URLSearchParams({ name, ...(relay ? { relay } : {}) });
  const page = await openPage(context, `${server.url}/test/harness.html?${query}`);
  await page.evaluate(() => window.ready);
  await page.evaluate(CANONICAL);
  return page;
}

/** Resolves when the page's documents equal `expected` (a canonical string), or times out. */
export function waitForDocs(page, expected, what) {
  return page
    .evaluate(
      ({ expected, timeout }) =>
        new Promise((resolve, reject) => {
          const check = () => canonical(h.replica.list(null)) === expected;
          if (check()) return resolve();
          const timer = setTimeout(() => {
            off();
            reject(new Error(`documents differ after ${timeout} ms: ${canonical(h.replica.list(null))}`));
          }, timeout);
          const off = h.replica.subscribe(() => {
            if (check()) {
              clearTimeout(timer);
              off();
              resolve();
            }
          });
        }),
      { expected, timeout: TIMEOUT },
    )
    .catch((e) => {
      throw new Error(`${what}: ${e.message}`);
    });
}

export function whenSynced(page) {
  return page.evaluate((timeout) => h.connection.whenSynced({ timeout }), TIMEOUT);
}

export function waitStatus(page, status) {
  return page.evaluate(
    ({ status, timeout }) =>
      new Promise((resolve, reject) => {
        if (h.connection.status === status) return resolve();
        const timer = setTimeout(() => reject(new Error(`status ${h.connection.status}, not ${status}`)), timeout);
        const off = h.connection.on(status, () => {
          clearTimeout(timer);
          off();
          resolve();
        });
      }),
    { status, timeout: TIMEOUT },
  );
}

/** What the CLI replica holds for these ids (deleted ones left out), canonical. */
export async function cliSnapshot(cli, ids) {
  const docs = (await Promise.all(ids.map((id) => cli.get(id)))).filter(Boolean);
  return canonical(docs);
}

export function assertNoProblems(...pages) {
  for (const page of pages) {
    assert.deepEqual(page.problems, [], "no errors in the page");
  }
}
