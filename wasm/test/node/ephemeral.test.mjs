// Ephemeral messages (presence, cursors) between Node replicas through a real `weft serve`:
// `replica.broadcast(id, data)` reaches every other session that may read the document as a
// `replica.on("ephemeral")` event, CBOR on the wire (the bytes cbor-x's `encode` writes);
// a reader-only token receives and sends them, a token that cannot read the collection gets
// none; bad input is a WeftError with a code; bytes from a peer that are not CBOR are
// delivered with `data: undefined` and an `error`, never thrown.

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { after, afterEach, before, beforeEach, describe, it } from "node:test";
import { WebSocket } from "ws";
import { Replica, init } from "../../js/node.js";
import { requireBuild, trackUnhandledRejections, until } from "../support/common.mjs";
import { startRelay } from "../support/weft.mjs";

const TIMEOUT = 10_000;

/** The ephemeral events a replica receives, and a bounded wait for one that `match`es. */
function inbox(replica) {
  const seen = [];
  const listeners = new Set();
  replica.on("ephemeral", (event) => {
    seen.push(event);
    for (const l of [...listeners]) l();
  });
  return {
    seen,
    next(match, what = "an ephemeral message") {
      return until(
        (test) => {
          listeners.add(test);
          return () => listeners.delete(test);
        },
        () => seen.find(match),
        { timeout: TIMEOUT, what },
      );
    },
  };
}

/** Waits until `replica` holds document `id`. */
function holds(replica, id) {
  return until(
    (test) => replica.subscribe(test),
    () => {
      try {
        return replica.get(id);
      } catch (e) {
        if (e.code === "NotFound") return undefined;
        throw e;
      }
    },
    { timeout: TIMEOUT, what: `document ${id}` },
  );
}

describe("ephemeral messages (Node, through weft serve)", { timeout: 60_000 }, () => {
  let relay;
  let rejections;
  const open = [];

  async function replicaWith(token) {
    const replica = await Replica.open({ storage: "memory" });
    const connection = replica.connect(relay.url, { token });
    await connection.whenSynced({ timeout: TIMEOUT });
    open.push(replica);
    return { replica, connection };
  }

  before(async () => {
    requireBuild();
    relay = await startRelay({ secret: randomBytes(48).toString("base64") });
  });
  after(async () => {
    await relay?.stop();
  });
  beforeEach(() => {
    rejections = trackUnhandledRejections();
  });
  afterEach(async () => {
    for (const r of open.splice(0)) await r.close();
    assert.deepEqual(rejections.stop(), [], "no unhandled promise rejections");
  });

  it("reach readers both ways (a reader-only token too), never a session that cannot read", async () => {
    const a = await replicaWith(await relay.token({ sub: "a" }));
    const b = await replicaWith(await relay.token({ sub: "b", read: "todos", write: "" }));
    const c = await replicaWith(await relay.token({ sub: "c", read: "notes", write: "" }));
    const atA = inbox(a.replica);
    const atB = inbox(b.replica);
    const atC = inbox(c.replica);
    const todo = await a.replica.create("todos", { title: "shared" });
    const note = await a.replica.create("notes", { text: "for c" });
    await holds(b.replica, todo);
    await holds(c.replica, note);

    // A -> B: the value as sent, the bytes are plain CBOR, the connection is named.
    const presence = { name: "alice", at: 1_700_000_000_000, cursor: [1, 2.5], ok: true, none: null };
    assert.equal(a.replica.broadcast(todo, presence), 1, "sent on A's one relay session");
    const got = await atB.next((e) => e.id === todo, "A's presence at B");
    assert.deepEqual(got.data, presence);
    assert.equal(got.connection, b.connection);
    assert.equal(got.error, undefined);
    assert.ok(got.bytes instanceof Uint8Array);
    assert.equal(got.bytes[0], 0xa5, "a CBOR map of 5 entries");

    // B (reader-only) -> A, with bytes inside; the connection's own event fires as well.
    const onConnection = new Promise((resolve) => a.connection.on("ephemeral", resolve));
    const bytes = new Uint8Array([0, 1, 2, 254, 255]);
    assert.equal(b.replica.broadcast(todo, { name: "bob", bytes }), 1);
    const back = await atA.next((e) => e.id === todo, "B's presence at A");
    assert.equal(back.data.name, "bob");
    assert.ok(back.data.bytes instanceof Uint8Array);
    assert.deepEqual([...back.data.bytes], [...bytes]);
    assert.equal((await onConnection).id, todo);

    // C may not read todos: it got nothing about them. A message about a note it may read,
    // sent after the todo messages on the same path, proves its channel works.
    a.replica.broadcast(note, "note presence");
    const forC = await atC.next((e) => e.id === note, "A's note presence at C");
    assert.equal(forC.data, "note presence");
    assert.deepEqual(
      atC.seen.map((e) => e.id),
      [note],
      "C received nothing about a collection it cannot read",
    );
    // The sender does not hear itself; nothing was stored.
    assert.equal(atA.seen.filter((e) => e.data?.name === "alice").length, 0);
    assert.equal(a.replica.changes().filter((e) => e.id === todo).length, 1, "only the create");
  });

  it("refuses bad input with coded WeftErrors, and sends nothing when offline", async () => {
    const replica = await Replica.open({ storage: "memory" });
    open.push(replica);
    const id = await replica.create("todos", { title: "t" });
    assert.equal(replica.broadcast(id, { hello: "nobody" }), 0, "no connection: sent nowhere");
    assert.throws(() => replica.broadcast(id, "x".repeat(70_000)), (e) => {
      assert.equal(e.name, "WeftError");
      assert.equal(e.code, "TooLarge");
      assert.match(e.message, /65536/);
      return true;
    });
    // Just under the limit is fine (a 3-byte CBOR header + 65533 bytes).
    assert.equal(replica.broadcast(id, new Uint8Array(65_533)), 0);
    assert.throws(() => replica.broadcast(id, new Uint8Array(65_534)), { code: "TooLarge" });
    assert.throws(() => replica.broadcast(id, { f: () => 1 }), { code: "InvalidArgument" });
    assert.throws(() => replica.broadcast(id, 10n), { code: "InvalidArgument" });
    assert.throws(() => replica.broadcast(id, new Map()), { code: "InvalidArgument" });
    let deep = 1;
    for (let i = 0; i < 200; i++) deep = [deep];
    assert.throws(() => replica.broadcast(id, deep), { code: "Limit" });
    assert.throws(() => replica.broadcast("not-an-id", 1), { code: "InvalidId" });
    const other = await Replica.open({ storage: "memory" });
    open.push(other);
    assert.throws(() => other.broadcast(id, 1), { code: "NotFound" });
    assert.throws(() => replica.on("nope", () => {}), { code: "InvalidArgument" });
  });

  it("encodes like cbor-x's encode (automerge-repo's handle.broadcast) and decodes its output", async () => {
    const { encodeCbor, decodeCbor } = await init();
    // What DocHandle.broadcast encodes with, and what DocSynchronizer decodes with.
    const { encode, decode } = await import("@automerge/automerge-repo/helpers/cbor.js");
    const values = [
      { name: "alice", at: 1_700_000_000_000, cursor: { index: 3, length: 0 } },
      [1, -1, 0, 255, 65_536, -4_294_967_296, 2 ** 53 - 1, 0.5, 1.1, -2.75e300],
      "text ✓",
      null,
      true,
      { nested: { deeper: [{}, [], ""] } },
    ];
    for (const value of values) {
      assert.deepEqual(decodeCbor(encodeCbor(value)), value, "round trip");
      assert.deepEqual(decode(encodeCbor(value)), value, "cbor-x reads weft's bytes");
      assert.deepEqual(decodeCbor(encode(value)), value, "weft reads cbor-x's bytes");
    }
    const bytes = new Uint8Array([9, 8, 7]);
    assert.deepEqual([...decode(encodeCbor({ bytes })).bytes], [9, 8, 7]);
    assert.deepEqual([...decodeCbor(encode({ bytes })).bytes], [9, 8, 7]);
    // cbor-x's plain `encode` tags a Uint8Array (tag 64): the tag is dropped, the bytes stay.
    assert.deepEqual([...decodeCbor(new Uint8Array([0xd8, 0x40, 0x43, 1, 2, 3]))], [1, 2, 3]);
    // Integers beyond 32 bits go out as floats, as cbor-x sends them: cbor-x reads numbers.
    assert.equal(typeof decode(encodeCbor(2 ** 40)), "number");
    assert.equal(typeof decode(encodeCbor(-(2 ** 40))), "number");
    // Property order is kept, and "__proto__" stays a plain key.
    assert.deepEqual(Object.keys(decodeCbor(encode({ b: 1, a: 2 }))), ["b", "a"]);
    const proto = decodeCbor(encode(JSON.parse('{"__proto__": {"x": 1}}')));
    assert.equal(Object.getPrototypeOf(proto), Object.prototype);
    assert.deepEqual(Object.keys(proto), ["__proto__"]);
    assert.throws(() => decodeCbor(new Uint8Array([0xff])), { code: "BadCbor" });
    assert.throws(() => decodeCbor(new Uint8Array([0x01, 0x02])), { code: "BadCbor" });
  });

  it("bytes from a peer that are not CBOR arrive as data undefined with an error, and later ones still arrive", async () => {
    const token = await relay.token({ sub: "reader" });
    const b = await replicaWith(token);
    const atB = inbox(b.replica);
    const id = await b.replica.create("todos", { title: "cursor here" });
    await b.connection.whenSynced({ timeout: TIMEOUT });
    const raw = await rawPeer(relay.url, token);
    try {
      await raw.holds(id);
      // A frame as Core.broadcast makes it, its CBOR (0x44 and the 4 bytes, followed in the
      // frame by the sender's name) replaced with bytes that are not CBOR.
      const frame = raw.broadcastFrame(id, new Uint8Array([1, 2, 3, 4]));
      const cbor = [0x44, 1, 2, 3, 4];
      const at = frame.findIndex((_, i) => cbor.every((b, k) => frame[i + k] === b));
      assert.ok(at > 0, "the CBOR is in the frame");
      frame.set([0xff, 0xff, 0xff, 0xff, 0xff], at);
      raw.ws.send(frame);
      const bad = await atB.next((e) => e.id === id, "the undecodable message");
      assert.equal(bad.data, undefined);
      assert.equal(bad.error?.code, "BadCbor");
      assert.deepEqual([...bad.bytes], [0xff, 0xff, 0xff, 0xff, 0xff]);
      raw.ws.send(raw.broadcastFrame(id, { after: "bad" }));
      const good = await atB.next((e) => e.data?.after === "bad", "the next message");
      assert.equal(good.error, undefined);
      assert.equal(b.connection.status === "synced" || b.connection.status === "connected", true);
    } finally {
      raw.close();
    }
  });
});

/**
 * A bare engine (the wasm Core) in a session with the relay over its own WebSocket: what a
 * replica does, without the JS driver, so a test can send frames of its own.
 */
async function rawPeer(url, token) {
  const { Core } = await init();
  const core = Core.open({});
  const ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  let peer = null;
  const waiters = new Set();
  const pump = () => {
    for (const [, frame] of core.takeFrames()) ws.send(frame);
    core.takeJournal();
    core.takeEvents();
    core.takeSessionEvents();
    for (const w of [...waiters]) w();
  };
  const ticker = setInterval(() => {
    if (peer != null && core.tickWanted()) {
      core.tick();
      pump();
    }
  }, 10);
  const welcome = new Promise((resolve, reject) => {
    ws.once("error", reject);
    ws.on("message", (data) => {
      const frame = new Uint8Array(data);
      if (peer == null) {
        const answer = core.handshake(frame);
        if (answer.kind !== "welcome") return reject(new Error(`rejected: ${answer.reason}`));
        peer = core.openSession(answer.relay, answer.collections ?? null);
        pump();
        resolve();
      } else {
        core.receive(peer, frame);
        pump();
      }
    });
  });
  await new Promise((resolve, reject) => {
    ws.once("open", resolve);
    ws.once("error", reject);
  });
  ws.send(core.helloFrame(token, null));
  await welcome;
  return {
    ws,
    holds: (id) =>
      until(
        (test) => {
          waiters.add(test);
          return () => waiters.delete(test);
        },
        () => {
          try {
            return core.get(id);
          } catch {
            return undefined;
          }
        },
        { timeout: TIMEOUT, what: `the raw peer to hold ${id}` },
      ),
    broadcastFrame(id, data) {
      core.broadcast(id, data);
      const frames = core.takeFrames();
      assert.equal(frames.length, 1);
      return frames[0][1];
    },
    close() {
      clearInterval(ticker);
      ws.close();
      core.free();
    },
  };
}
