// Interop with the real automerge-repo client (@automerge/automerge-repo 2.x and its WebSocket
// network adapter, protocol "1"), against two kinds of relay:
//
// - "reference": automerge-repo's own sync server, in process on 127.0.0.1:0 (a `Repo` with a
//   `WebSocketServerAdapter` over a `ws` WebSocketServer, as @automerge/automerge-repo-sync-server
//   does; that package still depends on automerge-repo 1.x, so it is rebuilt here). It proves the
//   tests themselves right.
// - "weft": `weft serve`, clients at ws://ADDR/automerge (`?token=...` with --auth-secret-file).
//   A relay that answers /automerge with HTTP 404 fails them (they were written, and proved
//   against the reference relay, before the endpoint existed).
//
// Every wait is bounded; conditions are awaited (events, or a condition polled every 10 ms),
// never a fixed sleep.

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { once } from "node:events";
import { after, afterEach, before, describe, it } from "node:test";
import { Repo, decodeHeads, generateAutomergeUrl } from "@automerge/automerge-repo";
import { encode as cborEncode, decode as cborDecode } from "@automerge/automerge-repo/helpers/cbor.js";
import {
  WebSocketClientAdapter,
  WebSocketServerAdapter,
} from "@automerge/automerge-repo-network-websocket";
import { WebSocket, WebSocketServer } from "ws";
import { Replica } from "../../js/node.js";
import { requireBuild } from "../support/common.mjs";
import { CliReplica, startRelay, tempDir } from "../support/weft.mjs";

const WAIT = 5_000;

/** Resolves once `check()` returns something other than undefined (polled every 10 ms). */
async function waitFor(check, what, timeout = WAIT) {
  const deadline = Date.now() + timeout;
  for (;;) {
    let value;
    try {
      value = await check();
    } catch {
      value = undefined;
    }
    if (value !== undefined && value !== false) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeout} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

/** `promise`, or a rejection after `ms`. */
function within(ms, promise, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: not settled within ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

const heads = (handle) => decodeHeads(handle.heads()).sort();
const plain = (doc) => JSON.parse(JSON.stringify(doc));

// ----- relays ----------------------------------------------------------------------------

/**
 * Starts a relay of `kind` ("reference" or "weft"). Resolves to
 * `{kind, url(token?), holds(documentId, heads), stop(), missing?}`: `url` is what an
 * automerge-repo client dials; `holds` whether the relay has the document at (at least) those
 * heads; `missing` says why the weft endpoint cannot be tested (HTTP 404 on /automerge).
 * Options (weft only): `secret` (--auth-secret-file), `data` (a data directory to reuse).
 */
async function startAutomergeRelay(kind, options = {}) {
  if (kind === "reference") {
    const wss = new WebSocketServer({ host: "127.0.0.1", port: 0 });
    await once(wss, "listening");
    const repo = new Repo({
      network: [new WebSocketServerAdapter(wss)],
      peerId: `reference-relay-${randomBytes(4).toString("hex")}`,
      // A relay announces nothing by itself; it answers requests.
      sharePolicy: async () => false,
    });
    return {
      kind,
      url: () => `ws://127.0.0.1:${wss.address().port}`,
      holds: (documentId, want) => {
        const handle = repo.handles[documentId];
        if (!handle?.isReady()) return false;
        const have = new Set(heads(handle));
        return want.every((h) => have.has(h));
      },
      async stop() {
        for (const socket of wss.clients) socket.terminate();
        await repo.shutdown();
        await new Promise((resolve) => wss.close(() => resolve()));
      },
    };
  }
  const relay = await startRelay({ secret: options.secret, data: options.data });
  const base = relay.url.replace(/\/$/, "");
  // The endpoint exists: a relay without it (HTTP 404) fails these tests, it does not skip them.
  const missing = await probeAutomergePath(base);
  if (missing) {
    await relay.stop?.();
    throw new Error(`weft serve has no /automerge endpoint: ${missing}`);
  }
  // An observer on the weft side of the relay: what the relay holds in collection "automerge".
  let observer = null;
  let observerConnection = null;
  if (!missing) {
    observer = await Replica.open({ storage: "memory" });
    const token = options.secret ? await relay.token({ sub: "observer", read: "*", write: "" }) : undefined;
    observerConnection = observer.connect(relay.url, { token, collections: ["automerge"] });
    await observerConnection.whenSynced({ timeout: WAIT });
  }
  return {
    kind,
    relay,
    missing,
    observer,
    url: (token) => `${base}/automerge${token ? `?token=${encodeURIComponent(token)}` : ""}`,
    holds: (documentId, want) => {
      let doc;
      try {
        doc = observer.get(documentId);
      } catch {
        return false;
      }
      const have = new Set(doc.heads);
      return want.every((h) => have.has(h));
    },
    token: (access) => relay.token(access),
    async stop({ keepData = false } = {}) {
      observerConnection?.disconnect();
      await observer?.close();
      await relay.stop({ keepData });
    },
  };
}

/** Why the weft relay's /automerge endpoint cannot be tested (it answers HTTP 404), or null. */
function probeAutomergePath(base) {
  return new Promise((resolve) => {
    const ws = new WebSocket(`${base}/automerge`);
    ws.on("unexpected-response", (request, response) => {
      resolve(
        response.statusCode === 404
          ? "weft serve answers /automerge with HTTP 404: the automerge-repo endpoint is not on this branch yet"
          : null,
      );
      request.destroy();
    });
    ws.on("open", () => {
      ws.close();
      resolve(null);
    });
    ws.on("error", () => resolve(null));
  });
}

// ----- automerge-repo clients ------------------------------------------------------------

const clients = new Set();

/** An automerge-repo Repo (no storage) connected to `url`; resolves once the relay answered. */
async function client(url) {
  const repo = new Repo({ network: [new WebSocketClientAdapter(url)] });
  clients.add(repo);
  await waitFor(() => repo.peers.length > 0, `a connection to ${url}`);
  return repo;
}

async function shutdown(repo) {
  clients.delete(repo);
  // automerge-repo's client adapter schedules a reconnect (5 s later) whenever the relay closes
  // its socket, and shutdown() does not cancel that timer: it would dial again, fail, and
  // schedule another, keeping this test process alive forever. A late reconnect finds nothing
  // to do.
  for (const adapter of repo.networkSubsystem.adapters) adapter.connect = () => {};
  await repo.shutdown();
}

/** The next "change" of `handle` after which `check(doc)` holds (or now, if it already does). */
function changed(handle, check, what) {
  return within(
    WAIT,
    new Promise((resolve) => {
      const test = () => {
        const doc = handle.doc();
        if (doc && check(doc)) {
          handle.off("change", test);
          resolve(doc);
        }
      };
      handle.on("change", test);
      test();
    }),
    what,
  );
}

/** The next ephemeral message of `handle` whose message `match`es. */
function ephemeral(handle, match, what) {
  return within(
    WAIT,
    new Promise((resolve) => {
      const listener = (event) => {
        if (match(event.message)) {
          handle.off("ephemeral-message", listener);
          resolve(event);
        }
      };
      handle.on("ephemeral-message", listener);
    }),
    what,
  );
}

/** Creates a document on `repo` and waits until the relay holds it. */
async function createHeld(relay, repo, value) {
  const handle = repo.create(value);
  const want = heads(handle);
  await waitFor(() => relay.holds(handle.documentId, want), "the relay to hold the new document");
  return handle;
}

// ----- the tests -------------------------------------------------------------------------

afterEach(async () => {
  for (const repo of [...clients]) await shutdown(repo);
});

for (const kind of ["reference", "weft"]) {
  describe(`automerge-repo clients through the ${kind} relay`, { timeout: 30_000 }, () => {
    let relay;
    const skip = (t) => {
      if (relay.missing) t.skip(relay.missing);
      return Boolean(relay.missing);
    };

    before(async () => {
      if (kind === "weft") requireBuild();
      relay = await startAutomergeRelay(kind);
    });
    after(async () => {
      await relay?.stop();
    });

    it("(a) two repos converge: create, find, edits on both, concurrent edits", async (t) => {
      if (skip(t)) return;
      const a = await client(relay.url());
      const b = await client(relay.url());
      const atA = await createHeld(relay, a, { title: "shared", items: ["one"] });
      const atB = await within(WAIT, b.find(atA.url), "find on B");
      assert.deepEqual(plain(atB.doc()), { title: "shared", items: ["one"] });

      atA.change((d) => d.items.push("from a"));
      await changed(atB, (d) => d.items.includes("from a"), "A's edit at B");
      atB.change((d) => {
        d.done = true;
      });
      await changed(atA, (d) => d.done === true, "B's edit at A");

      // Concurrent: both edit before either hears of the other.
      atA.change((d) => {
        d.a = 1;
        d.title = "title from a";
      });
      atB.change((d) => {
        d.b = 2;
        d.title = "title from b";
      });
      await changed(atA, (d) => d.b === 2, "B's concurrent edit at A");
      await changed(atB, (d) => d.a === 1, "A's concurrent edit at B");
      await waitFor(() => heads(atA).join() === heads(atB).join(), "equal heads");
      assert.deepEqual(plain(atA.doc()), plain(atB.doc()));
      assert.ok(["title from a", "title from b"].includes(atA.doc().title));
      assert.equal(heads(atA).length, 2, "two concurrent heads, merged");
    });

    it("(b) find() of an id nobody has rejects as unavailable within 1 s", async (t) => {
      if (skip(t)) return;
      const b = await client(relay.url());
      const url = generateAutomergeUrl();
      const started = Date.now();
      await assert.rejects(within(1_000, b.find(url), "find of an unknown id"), /unavailable/);
      assert.ok(Date.now() - started <= 1_000);
    });

    it("(c) ephemeral messages: handle.broadcast reaches the other repo's ephemeral-message", async (t) => {
      if (skip(t)) return;
      const a = await client(relay.url());
      const b = await client(relay.url());
      const atA = await createHeld(relay, a, { title: "presence" });
      const atB = await within(WAIT, b.find(atA.url), "find on B");
      const message = { name: "alice", cursor: { index: 3 }, bytes: new Uint8Array([1, 2, 3]) };
      const arriving = ephemeral(atB, (m) => m?.name === "alice", "A's message at B");
      atA.broadcast(message);
      const got = await arriving;
      assert.equal(got.message.name, "alice");
      assert.deepEqual(got.message.cursor, { index: 3 });
      assert.deepEqual([...got.message.bytes], [1, 2, 3]);
      assert.equal(typeof got.senderId, "string");
      // And back; a second message from the same sender arrives too (automerge-repo drops
      // ephemeral messages whose `count` does not grow per sender session).
      const back = ephemeral(atA, (m) => m?.name === "bob", "B's message at A");
      atB.broadcast({ name: "bob", n: 1 });
      assert.equal((await back).message.n, 1);
      const again = ephemeral(atA, (m) => m?.n === 2, "B's second message at A");
      atB.broadcast({ name: "bob", n: 2 });
      await again;
    });

    if (kind !== "weft") return;

    it("(c) ephemeral messages between an automerge-repo repo and a weft JS replica, both ways", async (t) => {
      if (skip(t)) return;
      const a = await client(relay.url());
      const atA = await createHeld(relay, a, { title: "presence with weft" });
      const weftReplica = relay.observer;
      const id = atA.documentId;
      weftReplica.get(id); // it holds the document (createHeld waited for that)

      // automerge-repo -> weft: the same value, decoded from the same CBOR.
      const atWeft = new Promise((resolve) => {
        const off = weftReplica.on("ephemeral", (event) => {
          if (event.id === id && event.data?.from === "automerge-repo") {
            off();
            resolve(event);
          }
        });
      });
      const sent = { from: "automerge-repo", at: 1_700_000_000_000, pos: [1, 2], b: new Uint8Array([7]) };
      atA.broadcast(sent);
      const got = await within(WAIT, atWeft, "A's message at the weft replica");
      assert.equal(got.error, undefined);
      assert.deepEqual({ ...got.data, b: [...got.data.b] }, { ...sent, b: [7] });
      assert.deepEqual(cborDecode(got.bytes).from, "automerge-repo", "the bytes are the CBOR A sent");

      // weft -> automerge-repo, twice (the relay must give each message a growing count).
      for (const n of [1, 2]) {
        const arriving = ephemeral(atA, (m) => m?.n === n, `weft's message ${n} at A`);
        assert.equal(weftReplica.broadcast(id, { from: "weft", n }), 1);
        const event = await arriving;
        assert.deepEqual(event.message, { from: "weft", n });
      }
    });

    it("(d) the weft CLI reads a document made by automerge-repo, edits reach it, deletes make it unavailable", async (t) => {
      if (skip(t)) return;
      const tmp = tempDir();
      try {
        const a = await client(relay.url());
        const atA = await createHeld(relay, a, { title: "made by automerge-repo", count: 1 });
        const id = atA.documentId;
        const cli = new CliReplica(tmp.dir);
        const weftUrl = relay.relay.url;
        await cli.sync(weftUrl);
        const doc = await cli.get(id);
        assert.equal(doc.collection, "automerge");
        assert.deepEqual(doc.body, { title: "made by automerge-repo", count: 1 });
        assert.deepEqual(doc.heads, heads(atA));

        await cli.update(id, { count: 2, byCli: true });
        await cli.sync(weftUrl);
        const seen = await changed(atA, (d) => d.byCli === true, "the CLI's edit at A");
        assert.equal(seen.count, 2);
        assert.equal(seen.title, "made by automerge-repo");

        await cli.delete(id);
        await cli.sync(weftUrl);
        await shutdown(a); // A still holds the document and would offer it again
        await waitFor(() => {
          try {
            relay.observer.get(id);
            return false;
          } catch (e) {
            return e.code === "Deleted" || e.code === "NotFound";
          }
        }, "the delete at the relay");
        const fresh = await client(relay.url());
        await assert.rejects(within(WAIT, fresh.find(atA.url), "find of a deleted document"), /unavailable/);
      } finally {
        tmp.cleanup();
      }
    });
  });
}

describe("automerge-repo clients through a weft relay with tokens and restarts", { timeout: 30_000 }, () => {
  it("(e) a read-only token finds documents but its changes go nowhere; no token is refused", async (t) => {
    requireBuild();
    const relay = await startAutomergeRelay("weft", { secret: randomBytes(48).toString("base64") });
    try {
      if (relay.missing) {
        t.skip(relay.missing);
        return;
      }
      const rw = await relay.token({ sub: "writer", read: "automerge", write: "automerge" });
      const ro = await relay.token({ sub: "reader", read: "automerge", write: "" });
      const a = await client(relay.url(rw));
      const atA = await createHeld(relay, a, { title: "read me" });
      const r = await client(relay.url(ro));
      const atR = await within(WAIT, r.find(atA.url), "find with a read-only token");
      assert.deepEqual(plain(atR.doc()), { title: "read me" });

      // The reader changes the document, then sends an ephemeral message on the same socket:
      // once A has the message, the relay has handled the change before it.
      atR.change((d) => {
        d.byReader = true;
      });
      const marker = ephemeral(atA, (m) => m?.after === "reader change", "the reader's marker at A");
      atR.broadcast({ after: "reader change" });
      await marker;
      // The writer's own change goes through (the pipe works) ...
      atA.change((d) => {
        d.byWriter = 2;
      });
      const b = await client(relay.url(rw));
      const atB = await within(WAIT, b.find(atA.url), "find on a second writer");
      const atBDoc = await changed(atB, (d) => d.byWriter === 2, "the writer's change at B");
      // ... the reader's does not: not at B, not at the relay, not at A.
      assert.equal(atBDoc.byReader, undefined);
      await waitFor(() => relay.holds(atA.documentId, heads(atA)), "the writer's change at the relay");
      assert.equal(relay.observer.get(atA.documentId).body.byReader, undefined);
      assert.equal(atA.doc().byReader, undefined);

      // No token, or a bad one: refused (an HTTP error, or an error message and a close).
      for (const url of [relay.url(), relay.url("not-a-token")]) {
        const outcome = await rawJoin(url);
        assert.ok(outcome.refused, `${url}: ${outcome.detail}`);
      }
    } finally {
      await relay.stop();
    }
  });

  it("(f) after a kill -9 and a restart on the same data, a fresh repo finds what another repo saw", async (t) => {
    requireBuild();
    const first = await startAutomergeRelay("weft");
    let second;
    try {
      if (first.missing) {
        t.skip(first.missing);
        return;
      }
      const a = await client(first.url());
      const b = await client(first.url());
      const handle = await createHeld(first, a, { title: "survives", v: 1 });
      const atB = await within(WAIT, b.find(handle.url), "find on B");
      handle.change((d) => {
        d.v = 2;
      });
      await changed(atB, (d) => d.v === 2, "A's change at B");
      // B saw it: the relay passed it on. Now kill the relay without warning, and drop both
      // repos (they would offer the document again to the new relay).
      process.kill(first.relay.pid, "SIGKILL");
      await shutdown(a);
      await shutdown(b);
      await first.stop({ keepData: true });
      second = await startAutomergeRelay("weft", { data: first.relay.dataDir });
      const c = await client(second.url());
      const atC = await within(WAIT, c.find(handle.url), "find on a fresh repo after the restart");
      assert.equal(atC.doc().v, 2);
      assert.equal(atC.doc().title, "survives");
    } finally {
      await second?.stop({ keepData: true });
      await first.stop(); // (again, after the kill: removes the data directory)
    }
  });
});

/**
 * Dials `url` with a bare WebSocket and sends automerge-repo's "join" message: `{refused}` if
 * the relay answers with an HTTP error, an "error" message or a close without a "peer"
 * message; `{refused: false}` if it answers "peer".
 */
function rawJoin(url) {
  return within(
    WAIT,
    new Promise((resolve) => {
      const ws = new WebSocket(url);
      ws.binaryType = "arraybuffer";
      ws.on("unexpected-response", (request, response) => {
        resolve({ refused: response.statusCode >= 400, detail: `HTTP ${response.statusCode}` });
        request.destroy();
      });
      ws.on("error", (e) => resolve({ refused: true, detail: e.message }));
      ws.on("open", () =>
        ws.send(
          cborEncode({
            type: "join",
            senderId: `raw-${randomBytes(4).toString("hex")}`,
            peerMetadata: {},
            supportedProtocolVersions: ["1"],
          }),
        ),
      );
      ws.on("message", (data) => {
        const message = cborDecode(new Uint8Array(data));
        if (message.type === "peer") resolve({ refused: false, detail: "answered peer" });
        if (message.type === "error") resolve({ refused: true, detail: `error: ${message.message}` });
        ws.close();
      });
      ws.on("close", (code) => resolve({ refused: true, detail: `closed (${code})` }));
    }),
    `joining ${url}`,
  );
}
