// Probes how an automerge-repo 2.x client (Repo + WebSocketClientAdapter) reacts to what a relay
// might send it, against a scripted fake server on 127.0.0.1 that speaks protocol "1" and runs
// the Automerge sync protocol for the documents it holds. Run by hand, in the same directory as
// capture-amrepo-frames.mjs (same npm packages; see its header). Prints four findings:
//   1. a server-initiated `sync` for a document the client never asked for;
//   2. `doc-unavailable` for a document the client already has (ready);
//   3. `doc-unavailable` answering the client's `request`, then a later `sync` with content;
//   4. `error` after `join`, then the server closes: when the client joins again.
// The results are written up in tests/fixtures/amrepo/README.md.
import { Repo, cbor } from "@automerge/automerge-repo";
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket";
import { next as A } from "@automerge/automerge";
import { WebSocketServer } from "ws";
const sleep = ms => new Promise(r => setTimeout(r, ms));
const wss = new WebSocketServer({ host: "127.0.0.1", port: 0 });
await new Promise(r => wss.on("listening", r));
const url = `ws://127.0.0.1:${wss.address().port}`;
let joins = 0; const docs = {}; const log = [];
let mode = "normal";
const sockets = [];
wss.on("connection", s => {
  sockets.push(s);
  s.on("message", b => {
    const m = cbor.decode(new Uint8Array(b));
    log.push([Date.now(), "c->s", m.type, m.documentId ?? ""]);
    if (m.type === "join") {
      joins++;
      if (mode === "error") { s.send(cbor.encode({ type: "error", senderId: "fake", message: "nope", targetId: m.senderId })); mode = "normal"; setTimeout(() => s.close(), 50); return; }
      s.send(cbor.encode({ type: "peer", senderId: "fake", peerMetadata: { isEphemeral: true }, selectedProtocolVersion: "1", targetId: m.senderId }));
    } else if ((m.type === "sync" || m.type === "request") && docs[m.documentId]) {
      const e = docs[m.documentId];
      [e.doc, e.state] = A.receiveSyncMessage(e.doc, e.state, m.data);
      const [st, out] = A.generateSyncMessage(e.doc, e.state); e.state = st;
      if (out) s.send(cbor.encode({ type: "sync", senderId: "fake", targetId: m.senderId, documentId: m.documentId, data: out }));
    }
  });
});
const send = m => sockets.at(-1).send(cbor.encode(m));
const adapter = new WebSocketClientAdapter(url, 500);
const repo = new Repo({ network: [adapter], peerId: "probe" });
await adapter.whenReady(); await sleep(100);

// 1. server-initiated sync for a doc the client never asked for
const docId = "4NMNnkMhL8jXrdJ9jamS58PAVdXu";
docs[docId] = { doc: A.from({ hello: "world" }), state: A.initSyncState() };
let msg; [docs[docId].state, msg] = A.generateSyncMessage(docs[docId].doc, docs[docId].state);
send({ type: "sync", senderId: "fake", targetId: "probe", documentId: docId, data: msg });
await sleep(500);
const h = repo.handles[docId];
console.log("1. unsolicited sync: handle?", !!h, "state", h?.state, "doc", JSON.stringify(h?.isReady() ? h.doc() : null));
console.log("   client replied:", log.filter(l => l[3] === docId).map(l => l[2]));

// 2. doc-unavailable for a ready doc
send({ type: "doc-unavailable", senderId: "fake", targetId: "probe", documentId: docId });
await sleep(200);
console.log("2. doc-unavailable for a ready doc: state", repo.handles[docId].state);

// 3. find() of another doc: request; answer doc-unavailable; then later a sync with content
const id2 = "2LhTeBeuCa9jTe2RgAjXwrCX4P5T";
const p = repo.find("automerge:" + id2).then(() => "resolved", e => "rejected: " + e.message);
await sleep(300);
console.log("3. find sent:", log.filter(l => l[3] === id2).map(l => l[2]));
send({ type: "doc-unavailable", senderId: "fake", targetId: "probe", documentId: id2 });
console.log("   find ->", await p, "state", repo.handles[id2].state);
docs[id2] = { doc: A.from({ late: true }), state: A.initSyncState() };
let m2; [docs[id2].state, m2] = A.generateSyncMessage(docs[id2].doc, docs[id2].state);
send({ type: "sync", senderId: "fake", targetId: "probe", documentId: id2, data: m2 });
await sleep(500);
console.log("   after a later sync with content: state", repo.handles[id2].state);

// 4. error -> what does the client do (reconnect interval 500 ms here)
mode = "error";
const t0 = Date.now(); const j0 = joins;
sockets.at(-1).close(); // force a reconnect so the next join gets an error
await sleep(2500);
console.log("4. joins after error/close within 2.5 s:", joins - j0, log.filter(l => l[0] >= t0 && l[2] === "join").map(l => l[0] - t0));
repo.networkSubsystem.disconnect(); wss.close(); process.exit(0);
