// The seeded convergence scenario of examples/scenario.rs, driven from JS against the wasm
// build: the same hub and three replicas in memory, the same random edits and deliveries
// (mulberry32, drawn in the same order), the same manual clock. For each seed the final
// documents and heads must equal the native run's: it is the same engine.
//
// Keep in lockstep with examples/scenario.rs.

import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { existsSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

import { init } from "../../js/node.js";

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, "../../..");
const nativeBin =
  process.env.WEFT_SCENARIO_BIN ??
  path.join(
    path.resolve(root, process.env.CARGO_TARGET_DIR ?? "target"),
    "debug/examples/scenario",
  );

const CLIENTS = 3;
const START_MS = 1_700_000_000_000;

function mulberry32(seed) {
  let a = seed >>> 0;
  const next = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), 1 | t) >>> 0;
    t = ((t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t) >>> 0;
    return (t ^ (t >>> 14)) >>> 0;
  };
  return { below: (n) => next() % n };
}

function runScenario(Core, seed, steps) {
  let now = START_MS;
  const nodes = [];
  for (let i = 0; i <= CLIENTS; i++) {
    const core = Core.open({ seed: seed * 100 + i, now });
    nodes.push({ core, peers: new Map() });
  }
  const setNow = (ms) => {
    now = ms;
    for (const n of nodes) n.core.setNow(ms);
  };
  for (let client = 1; client <= CLIENTS; client++) {
    const hubPeer = nodes[0].core.acceptSession(nodes[client].core.replicaId());
    nodes[0].peers.set(hubPeer, client);
    const clientPeer = nodes[client].core.openSession(nodes[0].core.replicaId(), null);
    nodes[client].peers.set(clientPeer, 0);
  }
  // (from, to) -> FIFO of frames; keys compared in (from, to) order like Rust's BTreeMap.
  const links = new Map();
  const linkKey = (from, to) => `${from},${to}`;
  const sortedLinks = () =>
    [...links.keys()]
      .map((k) => k.split(",").map(Number))
      .sort((a, b) => a[0] - b[0] || a[1] - b[1]);
  const drain = () => {
    nodes.forEach((node, from) => {
      for (const [peer, frame] of node.core.takeFrames()) {
        const to = node.peers.get(peer);
        if (to === undefined) continue;
        const key = linkKey(from, to);
        if (!links.has(key)) links.set(key, []);
        links.get(key).push(frame);
      }
      node.core.takeJournal();
      node.core.takeEvents();
      node.core.takeSessionEvents();
    });
  };
  const deliver = (from, to, frame) => {
    for (const [peer, n] of nodes[to].peers) {
      if (n === from) {
        nodes[to].core.receive(peer, frame);
        return;
      }
    }
  };
  const ignore = (f) => {
    try {
      f();
    } catch (e) {
      if (e.code !== "NotFound" && e.code !== "Deleted") throw e;
    }
  };
  drain();

  const rng = mulberry32(seed);
  const known = [];
  for (let s = 0; s < steps; s++) {
    const roll = rng.below(100);
    if (roll < 40) {
      const node = rng.below(CLIENTS + 1);
      const core = nodes[node].core;
      const op = rng.below(10);
      if (op < 3 || known.length === 0) {
        const collection = ["todos", "notes"][rng.below(2)];
        const n = rng.below(1000);
        known.push(core.create(collection, { n, by: node }));
      } else if (op < 9) {
        const id = known[rng.below(known.length)];
        const key = `k${rng.below(4)}`;
        const value = rng.below(1000);
        ignore(() => core.update(id, { [key]: value }));
      } else {
        const id = known[rng.below(known.length)];
        ignore(() => core.delete(id));
      }
    } else if (roll < 80) {
      const busy = sortedLinks().filter(([f, t]) => links.get(linkKey(f, t)).length > 0);
      if (busy.length > 0) {
        const [from, to] = busy[rng.below(busy.length)];
        deliver(from, to, links.get(linkKey(from, to)).shift());
      }
    } else {
      setNow(now + rng.below(50) + 1);
      for (const n of nodes) n.core.tick();
    }
    drain();
  }
  const pending = () => [...links.values()].some((q) => q.length > 0);
  for (let round = 0; round < 1000; round++) {
    while (pending()) {
      for (const [from, to] of sortedLinks()) {
        const queue = links.get(linkKey(from, to));
        if (queue.length > 0) {
          deliver(from, to, queue.shift());
          drain();
        }
      }
    }
    setNow(now + 25);
    for (const n of nodes) n.core.tick();
    drain();
    if (!pending()) break;
  }
  return nodes.map((n) => n.core.allHeads());
}

test("the seeded scenario gives the native run's documents and heads", async (t) => {
  if (!existsSync(nativeBin)) {
    assert.fail(`${nativeBin} is missing: run \`cargo build --example scenario\` first`);
  }
  const { Core } = await init();
  const seeds = process.env.WEFT_SEED ? [Number(process.env.WEFT_SEED)] : [1, 2, 3, 4, 5, 6, 7, 8];
  for (const seed of seeds) {
    const native = JSON.parse(execFileSync(nativeBin, [String(seed)], { encoding: "utf8" }));
    const wasm = runScenario(Core, seed, 300);
    t.diagnostic(`seed ${seed}: ${wasm[0].length} documents`);
    assert.ok(wasm[0].length > 0, `seed ${seed}: the scenario created no documents`);
    for (const node of wasm) {
      assert.deepEqual(node, wasm[0], `seed ${seed}: the replicas did not converge`);
    }
    assert.deepEqual(wasm, native, `seed ${seed}: wasm and native differ (replay: WEFT_SEED=${seed})`);
  }
});
