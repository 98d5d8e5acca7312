#!/usr/bin/env node
// How big can a browser replica get? In Chromium (Debian's, via playwright-core): a replica of
// N small documents (default 10,000 and 50,000) is written in a page (group commits of 1,000),
// then opened again in a fresh page: the time `Replica.open` takes (IndexedDB read + engine
// restore), the first read, the JS heap (after a forced GC) and the wasm memory. Then a second
// tab opens the same replica as a follower (its documents come from the leading tab over the
// BroadcastChannel): its open time and memory too. Not part of CI.
//
//   node bench/size.mjs             # 10000 and 50000
//   WEFT_BENCH_SIZES=2000 node bench/size.mjs

import { launchBrowser, openPage, startPageServer } from "../test/support/browser.mjs";
import { requireBuild } from "../test/support/common.mjs";

const SIZES = (process.env.WEFT_BENCH_SIZES ?? "10000,50000").split(",").map(Number);
const MB = (bytes) => `${(bytes / 1048576).toFixed(1)} MB`;
const fmt = (ms) => (ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${ms.toFixed(0)} ms`);

requireBuild();
const [server, browser] = await Promise.all([startPageServer(), launchBrowser()]);

async function measure(page) {
  const cdp = await page.context().newCDPSession(page);
  await cdp.send("HeapProfiler.collectGarbage");
  const { usedSize } = await cdp.send("Runtime.getHeapUsage");
  const wasm = await page.evaluate(async () => (await import("weft")).wasmMemoryBytes());
  await cdp.detach();
  return { heap: usedSize, wasm };
}

/** Opens replica `name` in a fresh page of `context`: timings and memory. */
async function open(context, name, options = {}) {
  const page = await openPage(context, `${server.url}/test/blank.html`);
  const timings = await page.evaluate(
    async ({ name, options }) => {
      const { Replica } = await import("weft");
      await Replica.version();
      const t0 = performance.now();
      const replica = await Replica.open({ name, lockTimeout: 600_000, ...options });
      const openMs = performance.now() - t0;
      const t1 = performance.now();
      const first = replica.list("notes", null, { limit: 20 });
      replica.get(first[0].id);
      const readMs = performance.now() - t1;
      const t2 = performance.now();
      const count = replica.list("notes").length;
      const listMs = performance.now() - t2;
      window.replica = replica;
      return { openMs, readMs, listMs, count, role: replica.role };
    },
    { name, options },
  );
  return { page, ...timings, ...(await measure(page)) };
}

const rows = [];
try {
  for (const n of SIZES) {
    const context = await browser.newContext();
    const name = `size-${n}`;
    const writer = await openPage(context, `${server.url}/test/blank.html`);
    const writeMs = await writer.evaluate(
      async ({ name, n }) => {
        const { Replica } = await import("weft");
        const replica = await Replica.open({ name, tabs: false });
        const t0 = performance.now();
        for (let i = 0; i < n; i += 1000) {
          const batch = [];
          for (let j = i; j < Math.min(n, i + 1000); j++) {
            batch.push(replica.create("notes", { title: `note ${j}`, done: j % 2 === 0, n: j }));
          }
          await Promise.all(batch);
        }
        const ms = performance.now() - t0;
        await replica.close();
        return ms;
      },
      { name, n },
    );
    await writer.close();
    const leader = await open(context, name);
    const follower = await open(context, name);
    if (leader.count !== n || follower.count !== n) {
      throw new Error(`expected ${n} documents, leader has ${leader.count}, follower ${follower.count}`);
    }
    // Hand-over: the leading tab closes; the follower opens the replica from IndexedDB and
    // merges its memory into it.
    const roleAt = follower.page.evaluate(
      () => new Promise((resolve) => window.replica.on("role", () => resolve(Date.now()))),
    );
    const closedAt = Date.now();
    await leader.page.close();
    const handoverMs = (await roleAt) - closedAt;
    follower.handoverMs = handoverMs;
    rows.push({ n, writeMs, leader, follower });
    console.log(
      `${n} docs: write ${fmt(writeMs)}; open ${fmt(leader.openMs)} (${leader.role}), first read ${fmt(leader.readMs)}, ` +
        `list all ${fmt(leader.listMs)}, JS heap ${MB(leader.heap)}, wasm ${MB(leader.wasm)}; ` +
        `second tab open ${fmt(follower.openMs)} (${follower.role}), JS heap ${MB(follower.heap)}, wasm ${MB(follower.wasm)}; ` +
        `hand-over when the first tab closes ${fmt(follower.handoverMs)}`,
    );
    await context.close();
  }
} finally {
  await browser.close();
  await server.close();
}
