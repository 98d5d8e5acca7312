// The JS surface: every error is a `WeftError` (engine errors included), `Connection` and
// `Replica` show only their documented members (the driver's handle is not reachable), and
// `whenSynced` and listeners take an AbortSignal.

import assert from "node:assert/strict";
import { getEventListeners } from "node:events";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { after, afterEach, before, beforeEach, describe, it } from "node:test";
import * as browserEntry from "../../js/browser.js";
import { asWeftError } from "../../js/errors.js";
import { Connection, Replica, WeftError } from "../../js/node.js";
import {
  closedPort,
  nextEvent,
  requireBuild,
  trackUnhandledRejections,
  until,
} from "../support/common.mjs";
import { CliReplica, startRelay, tempDir, wasmDir } from "../support/weft.mjs";

const SYNC_TIMEOUT = 20_000;

/** What `fn` threw or rejected with. */
async function thrown(fn) {
  try {
    await fn();
  } catch (e) {
    return e;
  }
  assert.fail("expected an error");
}

const abortListeners = (signal) => getEventListeners(signal, "abort").length;

describe("the JS surface", { timeout: 120_000 }, () => {
  let relay;
  let rejections;

  before(async () => {
    requireBuild();
    relay = await startRelay();
  });
  after(async () => {
    await relay?.stop();
  });
  beforeEach(() => {
    rejections = trackUnhandledRejections();
  });
  afterEach(() => {
    assert.deepEqual(rejections.stop(), [], "no unhandled promise rejections");
  });

  describe("WeftError", () => {
    it("is one class, exported by both entries, an Error with a code and extra fields", () => {
      assert.equal(browserEntry.WeftError, WeftError, "browser and Node entries export the same class");
      const cause = new Error("underneath");
      const e = new WeftError("Offline", "gone", { cause, closeCode: 1006 });
      assert.ok(e instanceof WeftError && e instanceof Error);
      assert.equal(e.name, "WeftError");
      assert.equal(e.code, "Offline");
      assert.equal(e.message, "gone");
      assert.equal(e.cause, cause);
      assert.equal(e.closeCode, 1006);
      assert.match(e.stack, /^WeftError: gone/);
      assert.match(String(e), /^WeftError: gone$/);
      assert.deepEqual(Object.keys(e).sort(), ["closeCode", "code"]);
    });

    it("asWeftError keeps a coded Error's code, message and fields, wraps anything else", () => {
      const engine = Object.assign(new Error("document x not found"), { code: "NotFound", doc: "x" });
      const e = asWeftError(engine);
      assert.ok(e instanceof WeftError);
      assert.equal(e.code, "NotFound");
      assert.equal(e.message, "document x not found");
      assert.equal(e.doc, "x");
      assert.equal(asWeftError(e), e, "a WeftError is kept as is");
      const plain = new TypeError("boom");
      const wrapped = asWeftError(plain, "Storage");
      assert.ok(wrapped instanceof WeftError);
      assert.equal(wrapped.code, "Storage");
      assert.equal(wrapped.message, "boom");
      assert.equal(wrapped.cause, plain);
      assert.equal(asWeftError("a string").code, "Internal");
    });

    it("is what the engine's errors become, and what the JS layer throws", async () => {
      const replica = await Replica.open({ storage: "memory" });
      const id = await replica.create("todos", { title: "a" });
      const gone = await replica.create("todos", { title: "b" });
      await replica.delete(gone);
      const cases = {
        NotFound: () => replica.get("2Su5kmW8S2vmqj7w3goFMcpsZ4pA"),
        Deleted: () => replica.get(gone),
        InvalidId: () => replica.get("not an id"),
        InvalidJson: () => replica.create("todos", [1, 2]),
        BadPath: () => replica.set(id, "no-slash", 1),
        NotText: () => replica.splice(id, "/title", 0, 1, "x"),
        BadFilter: () => replica.list("todos", "done ~ 1"),
        BadBundle: () => replica.importBundle(new Uint8Array([1, 2, 3])),
        Unsupported: () => Replica.open({ storage: "indexeddb" }),
        BadUrl: () => replica.connect("http://127.0.0.1:7420"),
      };
      for (const [code, fn] of Object.entries(cases)) {
        const e = await thrown(fn);
        assert.ok(e instanceof WeftError, `${code}: a WeftError, not ${e?.constructor?.name}`);
        assert.equal(e.code, code);
        assert.equal(e.name, "WeftError");
        assert.ok(e.message.length > 0);
      }
      for (const fn of [
        () => Replica.open({ storage: "disk" }),
        () => new Connection(),
        () => replica.subscribe("not a function"),
        () => replica.subscribe(() => {}, { signal: {} }),
      ]) {
        const e = await thrown(fn);
        assert.ok(e instanceof WeftError);
        assert.equal(e.code, "InvalidArgument", e.message);
      }
      await replica.close();
      const closed = await thrown(() => replica.get(id));
      assert.ok(closed instanceof WeftError);
      assert.equal(closed.code, "Closed");
    });

    it("is what status events and whenSynced carry", async () => {
      const replica = await Replica.open({ storage: "memory" });
      const port = await closedPort();
      const connection = replica.connect(`ws://127.0.0.1:${port}`, { initialBackoff: 50 });
      const offline = await nextEvent(connection, "offline");
      assert.ok(offline.error instanceof WeftError);
      assert.equal(offline.error.code, "Offline");
      assert.ok(connection.error instanceof WeftError);
      const timeout = await thrown(() => connection.whenSynced({ timeout: 50 }));
      assert.ok(timeout instanceof WeftError);
      assert.equal(timeout.code, "Timeout");
      assert.ok(timeout.cause instanceof WeftError);
      const pending = connection.whenSynced();
      connection.disconnect();
      const closed = await thrown(() => pending);
      assert.ok(closed instanceof WeftError);
      assert.equal(closed.code, "Closed");
      await replica.close();
    });
  });

  describe("members", () => {
    /** The members `index.d.ts` declares for class `name`: `{instance, statics}` (sorted). */
    function declared(name) {
      const dts = readFileSync(join(wasmDir, "js", "index.d.ts"), "utf8");
      const start = dts.indexOf(`export declare class ${name} {`);
      assert.ok(start >= 0, `index.d.ts declares class ${name}`);
      const body = dts.slice(start, dts.indexOf("\n}", start));
      const instance = new Set();
      const statics = new Set();
      for (const m of body.matchAll(/^ {2}(static )?(?:readonly )?(\w+)(?=[(<:?])/gm)) {
        (m[1] ? statics : instance).add(m[2]);
      }
      return { instance: [...instance].sort(), statics: [...statics].sort() };
    }

    /** What user code can see of a class and an instance of it. */
    function visible(cls, object) {
      const own = (o) => Reflect.ownKeys(o);
      assert.deepEqual(own(object), [], "an instance has no own properties (state is #private)");
      assert.deepEqual(Object.keys(object), []);
      return {
        instance: own(cls.prototype).filter((k) => k !== "constructor").map(String).sort(),
        statics: own(cls).filter((k) => !["length", "name", "prototype"].includes(k)).map(String).sort(),
      };
    }

    it("a Connection has exactly the documented members; the driver's handle is unreachable", async () => {
      const replica = await Replica.open({ storage: "memory" });
      const connection = replica.connect(`ws://127.0.0.1:${await closedPort()}`);
      try {
        assert.ok(connection instanceof Connection);
        const seen = visible(Connection, connection);
        assert.deepEqual(seen, declared("Connection"));
        assert.deepEqual(seen.instance, [
          "disconnect", "error", "granted", "off", "on", "reason", "refused", "status", "url", "whenSynced",
        ]);
        for (const internal of ["start", "_send", "_sessionEvent", "_fail", "send", "fail", "sessionEvent", "handle"]) {
          assert.equal(connection[internal], undefined, `connection.${internal}`);
        }
      } finally {
        connection.disconnect();
        await replica.close();
      }
    });

    it("a Replica has exactly the documented members", async () => {
      const replica = await Replica.open({ storage: "memory" });
      try {
        assert.deepEqual(visible(Replica, replica), declared("Replica"));
      } finally {
        await replica.close();
      }
    });
  });

  describe("AbortSignal", () => {
    it("whenSynced rejects with code Aborted when its signal aborts, and lets go of it", async () => {
      const replica = await Replica.open({ storage: "memory" });
      const connection = replica.connect(`ws://127.0.0.1:${await closedPort()}`, { initialBackoff: 50 });
      try {
        // Already aborted: rejects at once with the reason as cause, adds no listener.
        const reason = new Error("the user left");
        const aborted = AbortSignal.abort(reason);
        const early = await thrown(() => connection.whenSynced({ signal: aborted }));
        assert.ok(early instanceof WeftError);
        assert.equal(early.code, "Aborted");
        assert.equal(early.cause, reason);
        assert.equal(abortListeners(aborted), 0);

        // Aborted while waiting (the relay is unreachable: it would wait forever).
        const controller = new AbortController();
        const pending = connection.whenSynced({ signal: controller.signal });
        await nextEvent(connection, "offline");
        assert.equal(abortListeners(controller.signal), 1);
        controller.abort();
        const e = await thrown(() => pending);
        assert.ok(e instanceof WeftError);
        assert.equal(e.code, "Aborted");
        assert.equal(e.cause, controller.signal.reason);
        assert.equal(e.cause.name, "AbortError");
        assert.equal(abortListeners(controller.signal), 0);

        // Settled another way (a timeout, the connection closing): the listener goes too.
        const long = new AbortController();
        assert.equal((await thrown(() => connection.whenSynced({ timeout: 20, signal: long.signal }))).code, "Timeout");
        assert.equal(abortListeners(long.signal), 0);
        const closing = connection.whenSynced({ signal: long.signal });
        connection.disconnect();
        assert.equal((await thrown(() => closing)).code, "Closed");
        assert.equal(abortListeners(long.signal), 0);
        long.abort(); // nothing left to reject: no unhandled rejection

        assert.equal((await thrown(() => connection.whenSynced({ signal: "no" }))).code, "InvalidArgument");
      } finally {
        connection.disconnect();
        await replica.close();
      }
    });

    it("whenSynced with a signal resolves when synced and removes its listener", async () => {
      const replica = await Replica.open({ storage: "memory" });
      const connection = replica.connect(relay.url);
      try {
        const controller = new AbortController();
        await connection.whenSynced({ timeout: SYNC_TIMEOUT, signal: controller.signal });
        assert.equal(connection.status, "synced");
        assert.equal(abortListeners(controller.signal), 0);
        controller.abort();
      } finally {
        connection.disconnect();
        await replica.close();
      }
    });

    it("connection.on(type, listener, {signal}) stops on abort", async () => {
      const replica = await Replica.open({ storage: "memory" });
      const connection = replica.connect(`ws://127.0.0.1:${await closedPort()}`, { initialBackoff: 20, maxBackoff: 50 });
      try {
        const controller = new AbortController();
        let withSignal = 0;
        let all = 0;
        connection.on("offline", () => withSignal++, { signal: controller.signal });
        const countAll = () => all++;
        connection.on("offline", countAll);
        assert.equal(abortListeners(controller.signal), 1);
        await until((t) => connection.on("offline", t), () => (all >= 2 ? true : undefined), { what: "two offline events" });
        assert.equal(withSignal, all);
        controller.abort();
        assert.equal(abortListeners(controller.signal), 0);
        const atAbort = withSignal;
        const target = all + 2;
        await until((t) => connection.on("offline", t), () => (all >= target ? true : undefined), { what: "two more" });
        assert.equal(withSignal, atAbort, "no calls after the abort");

        // Already aborted: never added. Removed by hand: the signal is let go.
        let never = 0;
        connection.on("offline", () => never++, { signal: AbortSignal.abort() });
        const later = new AbortController();
        const off = connection.on("status", () => {}, { signal: later.signal });
        assert.equal(abortListeners(later.signal), 1);
        off();
        assert.equal(abortListeners(later.signal), 0);
        await nextEvent(connection, "offline");
        assert.equal(never, 0);
        connection.off("offline", countAll);
      } finally {
        connection.disconnect();
        await replica.close();
      }
    });

    it("replica.subscribe(callback, {signal}) stops on abort", async () => {
      const replica = await Replica.open({ storage: "memory" });
      try {
        const controller = new AbortController();
        const seen = [];
        replica.subscribe((e) => seen.push(e.id), { signal: controller.signal });
        const a = await replica.create("todos", { n: 1 });
        assert.deepEqual(seen, [a]);
        controller.abort();
        assert.equal(abortListeners(controller.signal), 0);
        await replica.create("todos", { n: 2 });
        assert.deepEqual(seen, [a]);

        let never = 0;
        replica.subscribe(() => never++, { signal: AbortSignal.abort() });
        await replica.create("todos", { n: 3 });
        assert.equal(never, 0);
      } finally {
        await replica.close();
      }
    });
  });

  it("whenSynced waits for writes made before it, not yet committed", async () => {
    const tmp = tempDir();
    const replica = await Replica.open({ storage: "memory" });
    const connection = replica.connect(relay.url, { collections: ["pending"] });
    try {
      await connection.whenSynced({ timeout: SYNC_TIMEOUT });
      assert.equal(connection.status, "synced");
      // Not awaited: the write is not committed when whenSynced is called.
      let committed = false;
      const created = replica.create("pending", { title: "in flight" });
      created.then(() => (committed = true));
      await connection.whenSynced({ timeout: SYNC_TIMEOUT });
      assert.ok(committed, "whenSynced resolved before the write was committed");
      const id = await created;
      const cli = new CliReplica(tmp.dir);
      await cli.sync(relay.url);
      assert.deepEqual((await cli.get(id))?.body, { title: "in flight" }, "the relay had it");
    } finally {
      connection.disconnect();
      await replica.close();
      tmp.cleanup();
    }
  });
});
