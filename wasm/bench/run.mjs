#!/usr/bin/env node
// Benchmarks of the JS package in Chromium (Debian's, via playwright-core), on 127.0.0.1 only.
// Not part of CI. Build the package first (`npm run build`); a release `weft` is used for the
// relay and the seeding CLI when present (`cargo build --release`), else the debug one; set
// WEFT_BIN to choose.
//
//   load     package load in a fresh page: wasm fetch + compile + instantiate; and until
//            `Replica.open` (IndexedDB) resolved, from navigation start
//   writes   create / update throughput on IndexedDB: one at a time (each awaited: one
//            transaction each) and 1,000 issued at once (group commit); memory for contrast
//   W1       cold sync of N documents (default 1,000; seeded with `weft import` +
//            `weft sync --once`) into a fresh browser replica; then the reload of that
//            replica from IndexedDB; and the same cold sync into a Node replica (memory)
//
// Knobs: WEFT_BENCH_RUNS (5 load / 3 W1 runs), WEFT_BENCH_DOCS (1000).

import { existsSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { Replica } from "../js/node.js";
import { launchBrowser, openPage, startPageServer } from "../test/support/browser.mjs";
import { requireBuild } from "../test/support/common.mjs";
import { CliReplica, repoRoot, startRelay, tempDir } from "../test/support/weft.mjs";

const RUNS = Number(process.env.WEFT_BENCH_RUNS ?? 5);
const DOCS = Number(process.env.WEFT_BENCH_DOCS ?? 1000);

if (!process.env.WEFT_BIN) {
  const target = resolve(repoRoot, process.env.CARGO_TARGET_DIR ?? "target");
  const release = join(target, "release", "weft");
  if (existsSync(release)) process.env.WEFT_BIN = release;
  else console.error(`note: ${release} missing, using the debug weft (slower relay)`);
}

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};
const fmt = (ms) => (ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${ms.toFixed(1)} ms`);
const results = [];
const record = (name, value, detail = "") => {
  results.push({ name, value, detail });
  console.error(`  ${name}: ${value}${detail ? ` (${detail})` : ""}`);
};

requireBuild();
const tmp = tempDir("weft-bench-");
const [relay, server, browser] = await Promise.all([startRelay(), startPageServer(), launchBrowser()]);
try {
  // ----- load --------------------------------------------------------------------------
  console.error(`load (${RUNS} fresh pages)`);
  const loads = [];
  for (let i = 0; i < RUNS; i++) {
    const context = await browser.newContext();
    const page = await openPage(context, `${server.url}/test/harness.html?name=load${i}`);
    await page.evaluate(() => window.ready);
    loads.push(await page.evaluate(() => ({ wasm: h.loadMs, open: performance.now() })));
    await context.close();
  }
  record("load: wasm fetch + compile + instantiate (median)", fmt(median(loads.map((l) => l.wasm))), loads.map((l) => l.wasm.toFixed(0)).join(", "));
  record("load: navigation start -> Replica.open resolved (median)", fmt(median(loads.map((l) => l.open))), loads.map((l) => l.open.toFixed(0)).join(", "));

  // ----- writes ------------------------------------------------------------------------
  console.error("writes");
  {
    const context = await browser.newContext();
    const page = await openPage(context, `${server.url}/test/harness.html?name=writes`);
    await page.evaluate(() => window.ready);
    const w = await page.evaluate(async () => {
      const r = h.replica;
      const out = {};
      const time = async (fn) => {
        const t0 = performance.now();
        await fn();
        return performance.now() - t0;
      };
      const ids = [];
      out.createOne = 300 / ((await time(async () => {
        for (let i = 0; i < 300; i++) ids.push(await r.create("bench", { title: `todo ${i}`, n: i, done: false }));
      })) / 1000);
      out.createBatch = 1000 / ((await time(() =>
        Promise.all(Array.from({ length: 1000 }, (_, i) => r.create("bench", { title: `batch ${i}`, n: i, done: false }))),
      )) / 1000);
      out.updateOne = 300 / ((await time(async () => {
        for (let i = 0; i < 300; i++) await r.update(ids[i], { done: true, n: i + 1 });
      })) / 1000);
      out.updateBatch = 1000 / ((await time(() =>
        Promise.all(Array.from({ length: 1000 }, (_, i) => r.update(ids[i % 300], { n: i + 1000 }))),
      )) / 1000);
      const m = await h.Replica.open({ name: "mem", storage: "memory" });
      out.memCreateBatch = 1000 / ((await time(() =>
        Promise.all(Array.from({ length: 1000 }, (_, i) => m.create("bench", { title: `m ${i}`, n: i }))),
      )) / 1000);
      out.memCreateOne = 300 / ((await time(async () => {
        for (let i = 0; i < 300; i++) await m.create("bench", { title: `m ${i}`, n: i });
      })) / 1000);
      return out;
    });
    const ops = (x) => `${Math.round(x).toLocaleString("en")} ops/s`;
    record("create, one at a time (awaited), IndexedDB", ops(w.createOne));
    record("create, 1,000 at once, IndexedDB", ops(w.createBatch));
    record("update, one at a time (awaited), IndexedDB", ops(w.updateOne));
    record("update, 1,000 at once, IndexedDB", ops(w.updateBatch));
    record("create, one at a time, memory", ops(w.memCreateOne));
    record("create, 1,000 at once, memory", ops(w.memCreateBatch));
    await context.close();
  }

  // ----- W1 ----------------------------------------------------------------------------
  console.error(`W1: ${DOCS} documents`);
  const ndjson = join(tmp.dir, "docs.ndjson");
  writeFileSync(
    ndjson,
    Array.from({ length: DOCS }, (_, i) =>
      JSON.stringify({ title: `todo ${i}`, n: i, f: i * 0.5, done: i % 2 === 0, tags: ["a", "b"] }),
    ).join("\n") + "\n",
  );
  const seed = new CliReplica(tmp.dir, "seed");
  await seed.run(["import", ndjson, "-c", "todos"]);
  let t0 = performance.now();
  await seed.sync(relay.url);
  record(`W1 seed: weft sync --once pushes ${DOCS} documents to the relay`, fmt(performance.now() - t0));

  const w1 = [];
  const reloads = [];
  for (let i = 0; i < Math.min(RUNS, 3); i++) {
    const context = await browser.newContext();
    const page = await openPage(context, `${server.url}/test/harness.html?name=w1`);
    await page.evaluate(() => window.ready);
    const run = await page.evaluate(
      async ({ url, docs }) => {
        const t0 = performance.now();
        const connection = h.replica.connect(url);
        await connection.whenSynced({ timeout: 120_000 });
        const ms = performance.now() - t0;
        const count = h.replica.list("todos").length;
        connection.disconnect();
        await h.replica.flushed();
        if (count !== docs) throw new Error(`synced ${count} of ${docs}`);
        return ms;
      },
      { url: relay.url, docs: DOCS },
    );
    w1.push(run);
    await page.reload();
    await page.evaluate(() => window.ready);
    reloads.push(await page.evaluate(() => {
      if (h.replica.list("todos").length < 1) throw new Error("nothing restored");
      return performance.now();
    }));
    await context.close();
  }
  record(`W1 cold sync of ${DOCS} documents into Chromium (IndexedDB), median`, fmt(median(w1)), w1.map((x) => x.toFixed(0)).join(", "));
  record(`reload of that replica: navigation -> ${DOCS} documents open, median`, fmt(median(reloads)), reloads.map((x) => x.toFixed(0)).join(", "));

  const node = [];
  for (let i = 0; i < Math.min(RUNS, 3); i++) {
    const replica = await Replica.open({ storage: "memory" });
    t0 = performance.now();
    const connection = replica.connect(relay.url);
    await connection.whenSynced({ timeout: 120_000 });
    node.push(performance.now() - t0);
    connection.disconnect();
    await replica.close();
  }
  record(`W1 cold sync of ${DOCS} documents into Node (memory), median`, fmt(median(node)), node.map((x) => x.toFixed(0)).join(", "));
} finally {
  await browser.close();
  await server.close();
  await relay.stop();
  tmp.cleanup();
}

console.log(`\n| benchmark (${new Date().toISOString().slice(0, 10)}, weft ${await Replica.version()}) | result | runs |`);
console.log("|---|---|---|");
for (const r of results) console.log(`| ${r.name} | ${r.value} | ${r.detail} |`);
