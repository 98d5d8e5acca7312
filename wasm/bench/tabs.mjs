#!/usr/bin/env node
// Browser replicas: how big, and shared by how many tabs. In Chromium (Debian's, via
// playwright-core), for a replica of N small documents (default 10,000 and 50,000), written in
// a page (group commits of 1,000):
//   - open in a fresh tab (it leads): `Replica.open` (IndexedDB read + engine restore), first
//     read, list of all, JS heap (after a forced GC) and wasm memory;
//   - open in a second and a third tab (they follow): open time and memory;
//   - latency, no relay: an edit in one following tab until the other following tab's change
//     event, and from the leading tab to a following one (WEFT_BENCH_EDITS samples, default
//     100, one at a time, after 5 not counted): median and p99;
//   - hand-over: the leading tab closes; the time until a following tab leads.
// Not part of CI (`npm run bench:tabs`).
//
//   node bench/tabs.mjs                  # 10000 and 50000
//   WEFT_BENCH_SIZES=2000 node bench/tabs.mjs

import { launchBrowser, openPage, startPageServer } from "../test/support/browser.mjs";
import { requireBuild } from "../test/support/common.mjs";

const SIZES = (process.env.WEFT_BENCH_SIZES ?? "10000,50000").split(",").map(Number);
const EDITS = Number(process.env.WEFT_BENCH_EDITS ?? 100);
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

const quantile = (xs, q) => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor(q * s.length))];
};

/** Edits in `from`, one at a time, each until `to` had its change event: ms per edit. */
async function latency(from, to) {
  const doc = await from.evaluate(() => window.replica.create("latency", { n: 0 }));
  await to.waitForFunction((doc) => {
    try {
      return window.replica.get(doc).body.n === 0;
    } catch {
      return false;
    }
  }, doc);
  const samples = [];
  const WARMUP = 5; // the first edits of a fresh document also pay for first-time work
  for (let i = 1; i <= EDITS + WARMUP; i++) {
    const seen = to.evaluate(
      ({ doc, i }) =>
        new Promise((resolve) => {
          const off = window.replica.subscribe((e) => {
            if (e.id === doc && window.replica.get(doc).body.n === i) {
              off();
              resolve(performance.timeOrigin + performance.now());
            }
          });
        }),
      { doc, i },
    );
    // The listener is installed before the edit starts.
    await to.evaluate(() => 0);
    const sent = await from.evaluate(
      ({ doc, i }) => {
        const t = performance.timeOrigin + performance.now();
        window.replica.set(doc, "/n", i);
        return t;
      },
      { doc, i },
    );
    const ms = (await seen) - sent;
    if (i > WARMUP) samples.push(ms);
  }
  if (process.env.WEFT_BENCH_SAMPLES) console.log(samples.map((x) => x.toFixed(0)).join(" "));
  return { median: quantile(samples, 0.5), p99: quantile(samples, 0.99) };
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
    const third = await open(context, name);
    const followerToFollower = await latency(follower.page, third.page);
    const leaderToFollower = await latency(leader.page, follower.page);
    await third.page.close();
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
        `hand-over when the first tab closes ${fmt(follower.handoverMs)}; ` +
        `edit latency follower -> follower median ${followerToFollower.median.toFixed(1)} ms, p99 ${followerToFollower.p99.toFixed(1)} ms, ` +
        `leader -> follower median ${leaderToFollower.median.toFixed(1)} ms, p99 ${leaderToFollower.p99.toFixed(1)} ms`,
    );
    await context.close();
  }
} finally {
  await browser.close();
  await server.close();
}
