// A Node replica (the built package) and native CLI replicas sync through a real
// `weft serve` process on 127.0.0.1: concurrent edits converge (same heads and bodies),
// deletes propagate, and a wrong URL or a rejected token gives a clear status event — never
// an unhandled rejection.

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { rmSync } from "node:fs";
import { after, afterEach, before, beforeEach, describe, it } from "node:test";
import { Replica } from "../../js/node.js";
import {
  closedPort,
  nextEvent,
  requireBuild,
  snapshot,
  trackUnhandledRejections,
  until,
} from "../support/common.mjs";
import { CliReplica, startRelay, tempDir } from "../support/weft.mjs";

const SYNC_TIMEOUT = 20_000;

/** Waits until `replica` has `id` in a state `check(doc)` accepts (null doc: deleted/missing). */
function docState(replica, id, check, what) {
  return until(
    (test) => replica.subscribe(test),
    () => {
      let doc = null;
      try {
        doc = replica.get(id);
      } catch (e) {
        if (e.code !== "NotFound" && e.code !== "Deleted") throw e;
      }
      return check(doc) ? doc : undefined;
    },
    { what },
  );
}

describe("sync with a relay (Node)", { timeout: 180_000 }, () => {
  let relay;
  let tmp;
  let rejections;

  before(async () => {
    requireBuild();
    relay = await startRelay();
  });
  after(async () => {
    await relay?.stop();
  });
  beforeEach(() => {
    tmp = tempDir();
    rejections = trackUnhandledRejections();
  });
  afterEach(() => {
    tmp.cleanup();
    assert.deepEqual(rejections.stop(), [], "no unhandled promise rejections");
  });

  it("a Node replica and a CLI replica edit the same documents concurrently and converge", async () => {
    const cli = new CliReplica(tmp.dir);
    const node = await Replica.open({ storage: "memory" });
    const statuses = [];
    const connection = node.connect(relay.url);
    connection.on("status", (e) => statuses.push(e.status));
    await connection.whenSynced({ timeout: SYNC_TIMEOUT });

    // Both sides create documents.
    const fromNode = [];
    for (let i = 0; i < 5; i++) fromNode.push(await node.create("todos", { title: `node ${i}`, done: false }));
    const fromCli = [];
    for (let i = 0; i < 5; i++) fromCli.push(await cli.create("todos", { title: `cli ${i}`, done: false }));
    await connection.whenSynced({ timeout: SYNC_TIMEOUT });
    await cli.sync(relay.url);
    const all = [...fromNode, ...fromCli];
    // The CLI's documents arrive live at the Node replica.
    await until((t) => node.subscribe(t), () => (node.list("todos").length === 10 ? true : undefined), {
      what: "the CLI's documents in the Node replica",
    });

    // Concurrent edits of the same documents on both sides, while the Node replica is live:
    // different fields merge, the same field converges to one value.
    for (const [i, id] of all.entries()) {
      await node.update(id, { done: true, byNode: i, same: `node ${i}` });
      await cli.update(id, { byCli: i, same: `cli ${i}` });
    }
    await cli.sync(relay.url);
    await connection.whenSynced({ timeout: SYNC_TIMEOUT });
    await cli.sync(relay.url);

    // Same heads and bodies everywhere.
    const cliDocs = await Promise.all(all.map((id) => cli.get(id)));
    await until(
      (t) => node.subscribe(t),
      () => {
        const a = snapshot(node.list("todos"));
        const b = snapshot(cliDocs);
        try {
          assert.deepEqual(a, b);
          return true;
        } catch {
          return undefined;
        }
      },
      { what: "the Node replica to match the CLI replica" },
    );
    for (const [i, id] of all.entries()) {
      const body = node.get(id).body;
      assert.equal(body.done, true);
      assert.equal(body.byNode, i);
      assert.equal(body.byCli, i);
      assert.ok([`node ${i}`, `cli ${i}`].includes(body.same));
    }
    assert.ok(statuses.includes("synced"));
    connection.disconnect();
    assert.equal(connection.status, "closed");
    await node.close();
  });

  it("deletes propagate both ways, and win over concurrent edits", async () => {
    const cli = new CliReplica(tmp.dir);
    const node = await Replica.open({ storage: "memory" });
    const connection = node.connect(relay.url, { collections: ["deletes"] });
    await connection.whenSynced({ timeout: SYNC_TIMEOUT });
    const a = await node.create("deletes", { name: "deleted by the CLI" });
    const b = await node.create("deletes", { name: "deleted by Node" });
    await connection.whenSynced({ timeout: SYNC_TIMEOUT });
    await cli.sync(relay.url);
    assert.equal((await cli.list("deletes")).length, 2);

    const events = [];
    node.subscribe((e) => events.push(e));
    await cli.delete(a);
    await node.update(a, { edited: "concurrently" });
    await node.delete(b);
    await connection.whenSynced({ timeout: SYNC_TIMEOUT });
    await cli.sync(relay.url);

    await docState(node, a, (doc) => doc === null, "the CLI's delete at the Node replica");
    assert.throws(() => node.get(a), { code: "Deleted" });
    assert.ok(events.some((e) => e.id === a && e.kind === "deleted" && e.origin !== "local"));
    assert.equal(await cli.get(b), null);
    assert.equal(await cli.get(a), null);
    assert.deepEqual(await cli.list("deletes"), []);
    assert.deepEqual(node.list("deletes"), []);
    connection.disconnect();
    await node.close();
  });

  it("a wrong URL gives offline events with the error, retries with backoff, and no rejection", async () => {
    const node = await Replica.open({ storage: "memory" });
    const port = await closedPort();
    const connection = node.connect(`ws://127.0.0.1:${port}`, { initialBackoff: 50 });
    const offline = [];
    connection.on("offline", (e) => offline.push(e));
    const first = await nextEvent(connection, "offline");
    assert.equal(first.status, "offline");
    assert.ok(first.error instanceof Error);
    assert.equal(first.error.code, "Offline");
    assert.match(first.error.message, new RegExp(`cannot connect to ws://127.0.0.1:${port}`));
    assert.match(first.error.message, /ECONNREFUSED/);
    assert.equal(connection.error, first.error);
    // It keeps trying.
    await nextEvent(connection, "connecting");
    await nextEvent(connection, "offline");
    // whenSynced with a timeout says why it is not in sync.
    await assert.rejects(connection.whenSynced({ timeout: 100 }), (e) => {
      assert.equal(e.code, "Timeout");
      assert.match(e.message, /ECONNREFUSED/);
      return true;
    });
    // Without reconnect the first failure ends it and whenSynced rejects.
    const once = node.connect(`ws://127.0.0.1:${port}`, { reconnect: false });
    await assert.rejects(once.whenSynced(), { code: "Offline" });
    const pending = connection.whenSynced();
    connection.disconnect();
    await assert.rejects(pending, { code: "Closed" });
    await node.close();
  });

  describe("with tokens", () => {
    let secured;
    before(async () => {
      secured = await startRelay({ secret: randomBytes(48).toString("base64") });
    });
    after(async () => {
      await secured?.stop();
    });

    it("a rejected token gives a rejected event with the reason and stops; a valid one syncs", async () => {
      const node = await Replica.open({ storage: "memory" });
      const bad = node.connect(secured.url, { token: "not-a-token" });
      const event = await nextEvent(bad, "rejected");
      assert.equal(event.status, "rejected");
      assert.match(event.reason, /Unauthorized|token/i);
      assert.ok(event.error instanceof Error);
      assert.equal(event.error.code, "Rejected");
      await assert.rejects(bad.whenSynced(), { code: "Rejected" });
      assert.equal(bad.status, "rejected");

      const none = node.connect(secured.url);
      assert.match((await nextEvent(none, "rejected")).reason, /token/i);

      const token = await secured.token({ sub: "node", read: "*", write: "*" });
      const good = node.connect(secured.url, { token });
      await good.whenSynced({ timeout: SYNC_TIMEOUT });
      const id = await node.create("todos", { title: "with a token" });
      await good.whenSynced({ timeout: SYNC_TIMEOUT });
      const cli = new CliReplica(tmp.dir);
      await cli.sync(secured.url, { token });
      assert.deepEqual((await cli.get(id)).body, { title: "with a token" });
      good.disconnect();
      await node.close();
    });

    it("a document the token may not write is reported as refused; the rest syncs", async () => {
      const node = await Replica.open({ storage: "memory" });
      const token = await secured.token({ sub: "reader", read: "*", write: "notes" });
      const connection = node.connect(secured.url, { token });
      await connection.whenSynced({ timeout: SYNC_TIMEOUT });
      const errors = [];
      connection.on("error", (e) => errors.push(e));
      const todo = await node.create("todos", { title: "not allowed" });
      const note = await node.create("notes", { text: "allowed" });
      await until((t) => connection.on("error", t), () => (errors.length ? true : undefined), {
        what: "the relay's refusal",
      });
      assert.equal(errors[0].code, "Forbidden");
      assert.equal(errors[0].doc, todo);
      assert.deepEqual(connection.refused.map((r) => r.doc), [todo]);
      await connection.whenSynced({ timeout: SYNC_TIMEOUT });
      const cli = new CliReplica(tmp.dir);
      await cli.sync(secured.url, { token: await secured.token({ sub: "cli" }) });
      assert.equal(await cli.get(todo), null);
      assert.deepEqual((await cli.get(note)).body, { text: "allowed" });
      connection.disconnect();
      await node.close();
    });
  });

  it("reconnects by itself when the relay comes back, and sends what was written offline", async () => {
    const own = await startRelay();
    const node = await Replica.open({ storage: "memory" });
    const connection = node.connect(own.url, { initialBackoff: 50, maxBackoff: 200 });
    await connection.whenSynced({ timeout: SYNC_TIMEOUT });
    await own.stop({ keepData: true });
    await until((t) => connection.on("status", t), () => (connection.status === "offline" ? true : undefined), {
      what: "offline after the relay stopped",
    });
    const id = await node.create("todos", { title: "written offline" });
    const back = await startRelay({ listen: new URL(own.url).host, data: own.dataDir });
    try {
      await connection.whenSynced({ timeout: SYNC_TIMEOUT });
      const cli = new CliReplica(tmp.dir);
      await cli.sync(back.url);
      assert.deepEqual((await cli.get(id)).body, { title: "written offline" });
    } finally {
      connection.disconnect();
      await node.close();
      await back.stop();
      rmSync(own.dataDir, { recursive: true, force: true });
    }
  });
});
