// automerge-repo 2.x client side of scripts/bench-amrepo.sh (W1: cold find() of N documents that
// already exist on the server). Two commands, each bounded by --timeout seconds, printing one
// JSON line on stdout:
//
//   node driver.mjs seed URL N IDS_FILE [--timeout S]
//     A Repo without storage creates N small documents ({title, done, n}; `repo.create`, which
//     announces each to the server with `sync`) and waits until the server has every one: its
//     sync state says the server's heads equal the document's heads. Writes the N automerge: URLs
//     to IDS_FILE, one a line.
//   node driver.mjs find URL IDS_FILE [--timeout S] [--concurrency K]
//     A fresh Repo without storage (isEphemeral) calls `repo.find(url)` for every URL at once
//     (default, K = 0: Promise.all over the list, as an app that opens a list of documents does),
//     or with at most K find()s in flight, and waits until each is ready or unavailable. Wall
//     time from the Repo's construction (socket connect and join included) to the last settled
//     find() (and to the last ready one: lastReadyS); checks the content; reports how many were
//     unavailable, and the client's CPU.
import { readFileSync, writeFileSync } from "node:fs";

import { next as A } from "@automerge/automerge";
import { Repo } from "@automerge/automerge-repo";
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket";

const args = process.argv.slice(2);
const timeoutAt = args.indexOf("--timeout");
const timeoutS = timeoutAt >= 0 ? Number(args.splice(timeoutAt, 2)[1]) : 600;
const concurrencyAt = args.indexOf("--concurrency");
const concurrency = concurrencyAt >= 0 ? Number(args.splice(concurrencyAt, 2)[1]) : 0;
const [command, url, ...rest] = args;
const timer = setTimeout(() => {
  console.error(`driver ${command}: timed out after ${timeoutS} s`);
  process.exit(2);
}, timeoutS * 1000);
const sleep = ms => new Promise(resolve => setTimeout(resolve, ms));
const done = result => {
  clearTimeout(timer);
  console.log(JSON.stringify(result));
  process.exit(0);
};

if (command === "seed") {
  const [nText, idsFile] = rest;
  const n = Number(nText);
  const t0 = performance.now();
  const repo = new Repo({ network: [new WebSocketClientAdapter(url)], peerId: "bench-seed" });
  // The server's heads per document, as the sync protocol reports them.
  const theirHeads = new Map();
  repo.synchronizer.on("sync-state", ({ documentId, syncState }) => {
    if (syncState.theirHeads) theirHeads.set(documentId, [...syncState.theirHeads].sort().join());
  });
  await repo.networkSubsystem.whenReady();
  const handles = [];
  for (let i = 0; i < n; i++) {
    handles.push(repo.create({ title: `todo ${i}`, done: i % 3 === 0, n: i }));
    if (i % 500 === 499) await sleep(0); // let the socket drain while creating
  }
  const created = performance.now();
  let pending = handles;
  while (pending.length > 0) {
    await sleep(100);
    pending = pending.filter(
      h => theirHeads.get(h.documentId) !== [...A.getHeads(h.doc())].sort().join(),
    );
  }
  writeFileSync(idsFile, handles.map(h => h.url).join("\n") + "\n");
  done({
    command,
    n,
    createS: (created - t0) / 1000,
    seedS: (performance.now() - t0) / 1000,
  });
} else if (command === "find") {
  const [idsFile] = rest;
  const urls = readFileSync(idsFile, "utf8").split("\n").filter(Boolean);
  const t0 = performance.now();
  const repo = new Repo({ network: [new WebSocketClientAdapter(url)], peerId: "bench-find" });
  // All at once (concurrency 0), or at most `concurrency` find()s in flight. A handle that is not
  // ready 60 s after its find() began is marked unavailable by automerge-repo (DocHandle's
  // timeoutDelay), so all-at-once fails for documents that arrive later than that.
  const results = [];
  let lastReady = t0;
  const findOne = u =>
    repo.find(u).then(
      h => {
        lastReady = performance.now();
        results.push(h);
      },
      () => results.push(null),
    );
  if (concurrency > 0) {
    let next = 0;
    await Promise.all(
      Array.from({ length: Math.min(concurrency, urls.length) }, async () => {
        while (next < urls.length) await findOne(urls[next++]);
      }),
    );
  } else {
    await Promise.all(urls.map(findOne));
  }
  const wallS = (performance.now() - t0) / 1000;
  const unavailable = results.filter(h => h === null).length;
  let bad = 0;
  for (const h of results) {
    if (h === null) continue;
    const d = h.doc();
    if (typeof d?.title !== "string" || typeof d?.done !== "boolean" || typeof d?.n !== "number")
      bad++;
  }
  if (bad > 0) {
    console.error(`driver find: ${bad} documents without the seeded content`);
    process.exit(1);
  }
  const { userCPUTime, systemCPUTime, maxRSS } = process.resourceUsage();
  done({
    command,
    n: urls.length,
    concurrency,
    wallS,
    lastReadyS: (lastReady - t0) / 1000,
    unavailable,
    clientCpuS: (userCPUTime + systemCPUTime) / 1e6,
    clientPeakRssMB: maxRSS / 1024,
  });
} else {
  console.error("usage: node driver.mjs seed URL N IDS_FILE | find URL IDS_FILE [--concurrency K] [--timeout S]");
  process.exit(2);
}
