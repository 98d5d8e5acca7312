// Records the WebSocket frames of real automerge-repo 2.x clients and of automerge-repo's own
// sync server, for weft's wire codec tests (tests/amrepo_wire.rs, tests/fixtures/amrepo/).
// Run by hand, not in CI (it needs the npm packages, which the repository does not install):
//
//   mkdir /tmp/amcap && cd /tmp/amcap && npm init -y >/dev/null
//   npm install @automerge/automerge-repo@2 @automerge/automerge-repo-network-websocket@2 ws@8
//   cp /path/to/weft/scripts/capture-amrepo-frames.mjs . && node capture-amrepo-frames.mjs /path/to/weft/tests/fixtures/amrepo
//
// The server is automerge-repo's reference sync server: a Repo (remote heads gossiping on) with
// WebSocketServerAdapter over a `ws` WebSocketServer on 127.0.0.1; every binary frame it
// receives or sends is recorded, in order, as NN-<from>-<to>-<type>.cbor (a, b, c = clients,
// x, y = raw sockets, s = the server). Three clients with WebSocketClientAdapter:
//   A: a Repo with storage (so it has a storageId, isEphemeral false) and remote heads gossiping;
//   B: a Repo without storage (storageId undefined, isEphemeral true);
//   C: a Repo with storage.
// The scenario: A joins, creates a document and changes it (sync); B joins and finds it
// (request, then sync); B finds a document nobody has (request -> doc-unavailable); A and B
// broadcast ephemeral messages (the server relays them); A subscribes to C's storage's remote
// heads (remote-subscription-change), C joins, finds the document and changes it (the server
// tells A: remote-heads-changed); a raw socket (x) joins without peerMetadata and sends the
// `leave` message of automerge-repo 1.x clients (a 2.x server ignores it), then a raw socket (y)
// joins with an unsupported protocol version (-> error, then the server closes the socket).
// Writes frames.json beside them: each frame decoded by automerge-repo's own CBOR decoder (bytes
// as hex) and in CBOR diagnostic notation (RFC 8949 section 8, with encoding indicators: `_1`,
// `_2`, `_3` after a number = 2-, 4-, 8-byte argument or half/single/double float; `{_2 ...}` =
// a map whose length is written in 2 bytes), plus the close codes the raw sockets saw.
import { mkdirSync, readFileSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";

import { Repo, cbor } from "@automerge/automerge-repo";
import {
  WebSocketClientAdapter,
  WebSocketServerAdapter,
} from "@automerge/automerge-repo-network-websocket";
import WebSocket, { WebSocketServer } from "ws";

const outDir = process.argv[2];
if (!outDir) {
  console.error("usage: node capture-amrepo-frames.mjs OUT_DIR");
  process.exit(2);
}

// The installed versions (packages' "exports" hide package.json from require; read the files).
const versionOf = name =>
  JSON.parse(readFileSync(join(process.cwd(), "node_modules", name, "package.json"), "utf8"))
    .version;
const versions = Object.fromEntries(
  [
    "@automerge/automerge-repo",
    "@automerge/automerge-repo-network-websocket",
    "@automerge/automerge",
    "cbor-x",
    "ws",
  ].map(name => [name, versionOf(name)]),
);

const sleep = ms => new Promise(resolve => setTimeout(resolve, ms));

class MemoryStorage {
  #data = new Map();
  async load(key) {
    return this.#data.get(key.join("/"));
  }
  async save(key, data) {
    this.#data.set(key.join("/"), data);
  }
  async remove(key) {
    this.#data.delete(key.join("/"));
  }
  async loadRange(prefix) {
    const p = prefix.join("/");
    return [...this.#data]
      .filter(([k]) => k === p || k.startsWith(p + "/"))
      .map(([k, data]) => ({ key: k.split("/"), data }));
  }
  async removeRange(prefix) {
    for (const { key } of await this.loadRange(prefix)) this.#data.delete(key.join("/"));
  }
}

// CBOR diagnostic notation of one data item, with encoding indicators, so that the fixtures say
// exactly how cbor-x wrote each value (int or float, how wide, undefined, tags, key order).
function diag(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let pos = 0;
  const widthMark = ai => (ai === 24 ? "_0" : ai === 25 ? "_1" : ai === 26 ? "_2" : ai === 27 ? "_3" : "");
  function arg(ai) {
    if (ai < 24) return ai;
    if (ai === 24) return view.getUint8(pos++);
    if (ai === 25) return (pos += 2), view.getUint16(pos - 2);
    if (ai === 26) return (pos += 4), view.getUint32(pos - 4);
    if (ai === 27) return (pos += 8), view.getBigUint64(pos - 8);
    if (ai === 31) return null; // indefinite
    throw new Error(`reserved additional info ${ai}`);
  }
  function item() {
    const ib = view.getUint8(pos++);
    const major = ib >> 5;
    const ai = ib & 31;
    if (major === 7) {
      if (ai === 20) return "false";
      if (ai === 21) return "true";
      if (ai === 22) return "null";
      if (ai === 23) return "undefined";
      if (ai === 25) return (pos += 2), `${halfToFloat(view.getUint16(pos - 2))}_1`;
      if (ai === 26) return (pos += 4), `${view.getFloat32(pos - 4)}_2`;
      if (ai === 27) return (pos += 8), `${view.getFloat64(pos - 8)}_3`;
      if (ai === 31) return "BREAK";
      return `simple(${arg(ai)})`;
    }
    const n = arg(ai);
    const w = widthMark(ai);
    const many = fn => {
      const parts = [];
      if (n === null) {
        while (view.getUint8(pos) !== 0xff) parts.push(fn());
        pos++;
      } else for (let i = 0; i < Number(n); i++) parts.push(fn());
      return parts.join(", ");
    };
    switch (major) {
      case 0:
        return `${n}${w}`;
      case 1:
        return `${-1n - BigInt(n)}${w}`;
      case 2: {
        const b = bytes.subarray(pos, pos + Number(n));
        pos += Number(n);
        return `h'${Buffer.from(b).toString("hex")}'`;
      }
      case 3: {
        const t = Buffer.from(bytes.subarray(pos, pos + Number(n))).toString("utf8");
        pos += Number(n);
        return JSON.stringify(t);
      }
      case 4:
        return `[${n === null ? "_ " : w ? w + " " : ""}${many(item)}]`;
      case 5:
        return `{${n === null ? "_ " : w ? w + " " : ""}${many(() => `${item()}: ${item()}`)}}`;
      case 6:
        return `${n}(${item()})`;
    }
  }
  const out = item();
  if (pos !== bytes.length) throw new Error(`${bytes.length - pos} trailing bytes`);
  return out;
}
function halfToFloat(h) {
  const e = (h >> 10) & 31, f = h & 1023, s = h >> 15 ? -1 : 1;
  if (e === 0) return s * 2 ** -14 * (f / 1024);
  if (e === 31) return f ? NaN : s * Infinity;
  return s * 2 ** (e - 15) * (1 + f / 1024);
}

// ----- the recording server ------------------------------------------------------------------
const frames = [];
let label = "x"; // who the next connection is
function record(from, to, bytes) {
  const data = new Uint8Array(bytes);
  let decoded;
  try {
    decoded = cbor.decode(data);
  } catch (e) {
    decoded = { undecodable: String(e) };
  }
  let notation;
  try {
    notation = diag(data);
  } catch (e) {
    notation = `(not one CBOR item: ${e.message})`;
  }
  frames.push({ from, to, type: decoded?.type ?? "?", data, decoded, diag: notation });
}

const wss = new WebSocketServer({ host: "127.0.0.1", port: 0 });
await new Promise(resolve => wss.on("listening", resolve));
const url = `ws://127.0.0.1:${wss.address().port}`;
// Registered before the adapter's own listener, so frames are recorded in arrival order.
wss.on("connection", socket => {
  const who = label;
  socket.on("message", (bytes, isBinary) => {
    if (isBinary) record(who, "s", bytes);
  });
  const send = socket.send.bind(socket);
  socket.send = (bytes, ...rest) => {
    record("s", who, bytes instanceof ArrayBuffer ? bytes : bytes.buffer ?? bytes);
    return send(bytes, ...rest);
  };
});

const server = new Repo({
  network: [new WebSocketServerAdapter(wss)],
  storage: new MemoryStorage(),
  peerId: "sync-server",
  sharePolicy: async () => false, // as the reference sync server: answer, never announce
  enableRemoteHeadsGossiping: true,
});

async function connect(name, options) {
  label = name;
  const adapter = new WebSocketClientAdapter(url, 60_000);
  const repo = new Repo({ network: [adapter], ...options });
  await adapter.whenReady();
  await sleep(200);
  return repo;
}

// ----- the scenario ---------------------------------------------------------------------------
const a = await connect("a", {
  peerId: "client-a",
  storage: new MemoryStorage(),
  enableRemoteHeadsGossiping: true,
});
const handleA = a.create({ title: "milk", done: false });
await sleep(300);
handleA.change(doc => {
  doc.done = true;
  doc.tags = ["errand"];
});
await sleep(400);

const b = await connect("b", { peerId: "client-b" });
const handleB = await b.find(handleA.url);
await sleep(400);
console.log("B found:", JSON.stringify(handleB.doc()));

try {
  await b.find("automerge:4NMNnkMhL8jXrdJ9jamS58PAVdXu", { signal: AbortSignal.timeout(3000) });
  console.log("unexpected: the unknown document was found");
} catch (e) {
  console.log("B, unknown document:", e.message);
}
await sleep(200);

handleA.broadcast({ cursor: 7, user: "alice" });
await sleep(300);
handleB.broadcast({ cursor: 3, user: "bob" });
await sleep(300);

// Remote heads: A asks the server to tell it when C's storage's heads change; C (with storage)
// joins, finds the document and changes it.
const storageC = new MemoryStorage();
const c0 = new Repo({ storage: storageC, peerId: "client-c" }); // only to learn C's storageId
const storageIdC = await c0.storageId();
await c0.shutdown();
a.subscribeToRemotes([storageIdC]);
await sleep(300);
const c = await connect("c", { peerId: "client-c", storage: storageC });
const handleC = await c.find(handleA.url);
await sleep(300);
handleC.change(doc => {
  doc.title = "oat milk";
});
await sleep(800);

// Raw sockets. x: joins without peerMetadata (protocol version "1"), then says `leave` as
// automerge-repo 1.x clients did on disconnect ({type, senderId}); a 2.x server drops it (the
// NetworkSubsystem's isRepoMessage is false for it) and keeps the socket open, so x closes it.
const closes = {};
label = "x";
const legacy = new WebSocket(url);
await new Promise(resolve => legacy.on("open", resolve));
legacy.send(cbor.encode({ type: "join", senderId: "raw-legacy", supportedProtocolVersions: ["1"] }));
await sleep(200);
legacy.send(cbor.encode({ type: "leave", senderId: "raw-legacy" }));
await sleep(300);
closes.x = { openAfterLeave: legacy.readyState === WebSocket.OPEN };
legacy.close(1000);
await new Promise(resolve => legacy.on("close", resolve));

// y: speaks only an unknown protocol version; the server answers `error` and closes the socket.
label = "y";
const raw = new WebSocket(url);
await new Promise(resolve => raw.on("open", resolve));
raw.send(
  cbor.encode({ type: "join", senderId: "raw-peer", supportedProtocolVersions: ["2"] }),
);
closes.y = await new Promise(resolve =>
  raw.on("close", (code, reason) => resolve({ code, reason: reason.toString() })),
);

a.networkSubsystem.disconnect();
b.networkSubsystem.disconnect();
c.networkSubsystem.disconnect();
await sleep(200);
wss.close();

// ----- output ---------------------------------------------------------------------------------
mkdirSync(outDir, { recursive: true });
for (const f of readdirSync(outDir)) if (f.endsWith(".cbor")) rmSync(join(outDir, f));
const hex = bytes => Buffer.from(bytes).toString("hex");
const list = frames.map((f, i) => {
  const name = `${String(i + 1).padStart(2, "0")}-${f.from}-${f.to}-${f.type}.cbor`;
  writeFileSync(join(outDir, name), f.data);
  return {
    file: name,
    from: f.from,
    to: f.to,
    bytes: f.data.length,
    message: f.decoded,
    diag: f.diag,
  };
});
writeFileSync(
  join(outDir, "frames.json"),
  JSON.stringify(
    { versions, node: process.version, rawSocketCloses: closes, frames: list },
    (key, value) =>
      value instanceof Uint8Array
        ? { hex: hex(value) }
        : typeof value === "bigint"
          ? value.toString()
          : value === undefined
            ? "(undefined)"
            : value,
    2,
  ) + "\n",
);
console.log(`${frames.length} frames in ${outDir}`, versions);
process.exit(0);
