// The package in real Chromium (Debian's, driven by playwright-core): IndexedDB persistence,
// live sync through a `weft serve` process, offline edits that survive a reload, and the
// example page's synced indicator — checked in the DOM and in a screenshot's pixels.
// Pages are served from 127.0.0.1 by the example's server; every browser context has its own
// IndexedDB, so each context is one replica.

import assert from "node:assert/strict";
import { mkdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { launchBrowser, openPage, startPageServer } from "../support/browser.mjs";
import { requireBuild } from "../support/common.mjs";
import {
  CANONICAL,
  TIMEOUT,
  assertNoProblems,
  canonical,
  cliSnapshot,
  harness,
  waitForDocs,
  waitStatus,
  whenSynced,
} from "../support/pages.mjs";
import { decodePng } from "../support/png.mjs";
import { CliReplica, startRelay, tempDir } from "../support/weft.mjs";

describe("in Chromium", { timeout: 300_000 }, () => {
  let relay;
  let server;
  let browser;
  let tmp;

  before(async () => {
    requireBuild();
    tmp = tempDir();
    [relay, server, browser] = await Promise.all([startRelay(), startPageServer(), launchBrowser()]);
  });
  after(async () => {
    await browser?.close();
    await server?.close();
    await relay?.stop();
    tmp?.cleanup();
  });

  it("keeps documents and the change feed in IndexedDB across a reload", async () => {
    const context = await browser.newContext();
    try {
      const page = await harness(context, server, "durable");
      const before = await page.evaluate(async () => {
        const r = h.replica;
        const a = await r.create("notes", { text: "kept", n: 1 });
        const b = await r.create("notes", { text: "deleted" });
        await r.update(a, { n: 2, tags: ["x"] });
        await r.delete(b);
        return { id: r.id, a, b, docs: canonical(r.list(null)), feed: r.changes(0), last: r.lastSeq() };
      });
      await page.reload();
      await page.evaluate(() => window.ready);
      await page.evaluate(CANONICAL);
      const after = await page.evaluate(({ b }) => {
        const r = h.replica;
        let deleted;
        try {
          r.get(b);
        } catch (e) {
          deleted = e.code;
        }
        return { id: r.id, docs: canonical(r.list(null)), feed: r.changes(0), last: r.lastSeq(), deleted };
      }, before);
      assert.equal(after.id, before.id, "same replica id");
      assert.equal(after.docs, before.docs, "same documents and heads");
      assert.deepEqual(after.feed, before.feed, "same change feed");
      assert.equal(after.last, 4);
      assert.equal(after.deleted, "Deleted");
      // The feed continues after the restored position.
      const next = await page.evaluate(async ({ a }) => {
        await h.replica.update(a, { n: 3 });
        return h.replica.lastSeq();
      }, before);
      assert.equal(next, 5);
      // A second tab shares the replica (tabs.test.mjs); opted out of sharing, it is refused
      // (one engine per database).
      const second = await openPage(context, `${server.url}/test/harness.html?name=other`);
      const locked = await second.evaluate(async () => {
        const { Replica } = await import("weft");
        return Replica.open({ name: "durable", lockTimeout: 200, tabs: false }).then(
          () => "opened",
          (e) => e.code,
        );
      });
      assert.equal(locked, "Locked");
      assertNoProblems(page, second);
    } finally {
      await context.close();
    }
  });

  it("a failed IndexedDB transaction rejects the write with code Storage, stops the replica and fails its connections", async () => {
    // A relay of its own: the documents written here must not reach the other tests' pages.
    const own = await startRelay();
    const context = await browser.newContext();
    try {
      const page = await harness(context, server, "failing", own.url);
      await whenSynced(page);
      const result = await page.evaluate(async ({ url, timeout }) => {
        const { WeftError } = await import("weft");
        const r = h.replica;
        // A second connection: every connection of the replica must fail, not just one.
        const second = r.connect(url);
        const secondStatuses = [];
        second.on("status", (e) => secondStatuses.push(e.status));
        await second.whenSynced({ timeout });
        const failedEvents = [];
        for (const c of [h.connection, second]) c.on("failed", (e) => failedEvents.push(e));
        const id = await r.create("notes", { v: 1 });
        await Promise.all([h.connection.whenSynced({ timeout }), second.whenSynced({ timeout })]);
        const mark = h.statuses.length;
        const secondMark = secondStatuses.length;
        // Another party deletes the database: ours is closed, the next transaction fails.
        await new Promise((resolve, reject) => {
          const req = indexedDB.deleteDatabase("weft:failing");
          req.onsuccess = resolve;
          req.onerror = () => reject(req.error);
        });
        const outcome = (promise) =>
          promise.then(
            () => ({ ok: true }),
            (e) => ({ error: e }),
          );
        // A write, and whenSynced called before it committed: both must reject with the
        // storage error (whenSynced neither resolves, as the status was "synced", nor hangs).
        const write = outcome(r.update(id, { v: 2 }));
        const synced = outcome(h.connection.whenSynced({ timeout }));
        const [w, s] = await Promise.all([write, synced]);
        const describe = (e) =>
          e && {
            weft: e instanceof WeftError,
            code: e.code,
            message: e.message,
            cause: e.cause?.name,
          };
        const codeOf = async (fn) => {
          try {
            await fn();
            return "ok";
          } catch (e) {
            return e instanceof WeftError && e.code;
          }
        };
        // Some time for anything that would still report "synced" (a late frame, the ticker).
        await new Promise((resolve) => setTimeout(resolve, 500));
        return {
          write: describe(w.error),
          whenSynced: describe(s.error),
          sameError: w.error === s.error && w.error === h.connection.error && w.error === second.error,
          status: [h.connection.status, second.status],
          error: describe(h.connection.error),
          events: failedEvents.map((e) => ({ status: e.status, same: e.error === w.error })),
          after: [h.statuses.slice(mark), secondStatuses.slice(secondMark)],
          // Later calls: whenSynced on either connection, disconnect (no-op), reads, writes.
          laterSynced: [await codeOf(() => h.connection.whenSynced()), await codeOf(() => second.whenSynced())],
          afterDisconnect: (second.disconnect(), second.status),
          read: await codeOf(() => r.get(id)),
          next: await codeOf(() => r.create("notes", {})),
          connect: await codeOf(() => r.connect(url)),
          rejections: h.rejections,
        };
      }, { url: own.url, timeout: TIMEOUT });
      const storage = {
        weft: true,
        code: "Storage",
        message: result.write.message,
        cause: result.write.cause,
      };
      assert.match(result.write.message, /^writing IndexedDB: .+/, "names IndexedDB and its error");
      assert.equal(result.write.cause, "InvalidStateError", "the IndexedDB error is the cause");
      assert.deepEqual(result.write, storage);
      assert.deepEqual(result.whenSynced, storage, "whenSynced rejects with the storage error");
      assert.ok(result.sameError, "one error: the write's, whenSynced's, both connections'");
      assert.deepEqual(result.status, ["failed", "failed"]);
      assert.deepEqual(result.error, storage);
      assert.deepEqual(result.events, [
        { status: "failed", same: true },
        { status: "failed", same: true },
      ]);
      assert.deepEqual(result.after, [["failed"], ["failed"]], "no status after the failure but failed");
      assert.deepEqual(result.laterSynced, ["Storage", "Storage"]);
      assert.equal(result.afterDisconnect, "failed");
      assert.deepEqual(
        { read: result.read, next: result.next, connect: result.connect },
        { read: "Storage", next: "Storage", connect: "Storage" },
      );
      assert.deepEqual(result.rejections, []);
      assert.equal(page.problems.length, 1, page.problems.join("\n"));
      assert.match(page.problems[0], /storage failed; reopen the replica/);
    } finally {
      await context.close();
      await own.stop();
    }
  });

  it("two pages and a CLI replica edit concurrently and converge through the relay", async () => {
    const [ctxA, ctxB] = await Promise.all([browser.newContext(), browser.newContext()]);
    try {
      const [a, b] = await Promise.all([
        harness(ctxA, server, "converge", relay.url),
        harness(ctxB, server, "converge", relay.url),
      ]);
      await Promise.all([whenSynced(a), whenSynced(b)]);
      const cli = new CliReplica(tmp.dir, "converge");
      const create = (page, who) =>
        page.evaluate(async (who) => {
          const ids = [];
          for (let i = 0; i < 3; i++) ids.push(await h.replica.create("todos", { title: `${who} ${i}`, done: false }));
          return ids;
        }, who);
      const idsA = await create(a, "a");
      const idsB = await create(b, "b");
      const idsC = [];
      for (let i = 0; i < 3; i++) idsC.push(await cli.create("todos", { title: `cli ${i}` }));
      await cli.sync(relay.url);
      const all = [...idsA, ...idsB, ...idsC];
      // Everyone sees all nine before editing them.
      await Promise.all([a, b].map((p) =>
        p.evaluate(
          ({ n, timeout }) =>
            new Promise((resolve, reject) => {
              const ok = () => h.replica.list("todos").length === n;
              if (ok()) return resolve();
              const timer = setTimeout(() => reject(new Error(`have ${h.replica.list("todos").length}`)), timeout);
              const off = h.replica.subscribe(() => ok() && (clearTimeout(timer), off(), resolve()));
            }),
          { n: 9, timeout: TIMEOUT },
        ),
      ));
      // Concurrent edits of every document on all three, and deletes.
      const edit = (page, field) =>
        page.evaluate(
          async ({ ids, field }) => {
            for (const [i, id] of ids.entries()) await h.replica.update(id, { [field]: i, same: field });
          },
          { ids: all, field },
        );
      await Promise.all([edit(a, "a"), edit(b, "b")]);
      for (const [i, id] of all.entries()) await cli.update(id, { c: i, same: "c" });
      await a.evaluate((id) => h.replica.delete(id), idsB[0]);
      await cli.delete(idsA[0]);
      await Promise.all([whenSynced(a), whenSynced(b)]);
      await cli.sync(relay.url);
      const expected = await cliSnapshot(cli, all);
      await Promise.all([
        waitForDocs(a, expected, "page A converges with the CLI"),
        waitForDocs(b, expected, "page B converges with the CLI"),
      ]);
      const docs = JSON.parse(expected);
      assert.equal(Object.keys(docs).length, 7, "nine documents, two deleted");
      for (const { body } of Object.values(docs)) {
        assert.ok("a" in body && "b" in body && "c" in body, `every edit merged: ${JSON.stringify(body)}`);
      }
      // The pages' feeds saw the remote changes.
      const origins = await b.evaluate(() => [...new Set(h.events.map((e) => e.origin))]);
      assert.ok(origins.includes("local") && origins.length > 1, `local and remote events: ${origins}`);
      assertNoProblems(a, b);
    } finally {
      await Promise.all([ctxA.close(), ctxB.close()]);
    }
  });

  it("a page offline edits, reloads from IndexedDB, reconnects, and nothing is lost", async () => {
    let own = await startRelay();
    const { host } = new URL(own.url);
    const dataDir = own.dataDir;
    const [ctxA, ctxB] = await Promise.all([browser.newContext(), browser.newContext()]);
    try {
      let [a, b] = await Promise.all([
        harness(ctxA, server, "offline", own.url),
        harness(ctxB, server, "offline", own.url),
      ]);
      const cli = new CliReplica(tmp.dir, "offline");
      const x = await a.evaluate(() => h.replica.create("todos", { title: "x" }));
      const y = await b.evaluate(() => h.replica.create("todos", { title: "y" }));
      await Promise.all([whenSynced(a), whenSynced(b)]);
      await cli.sync(own.url);

      // The relay goes away: both pages notice.
      await own.stop({ keepData: true });
      await Promise.all([waitStatus(a, "offline"), waitStatus(b, "offline")]);
      const offlineError = await a.evaluate(() => h.connection.error?.message);
      assert.match(offlineError, /closed|cannot connect/);

      // Offline edits everywhere.
      const z = await a.evaluate(async ({ x, y }) => {
        await h.replica.update(x, { byA: "offline" });
        await h.replica.delete(y);
        return h.replica.create("todos", { title: "z, created offline" });
      }, { x, y });
      await b.evaluate(({ x }) => h.replica.update(x, { byB: "offline" }), { x });
      await cli.update(x, { byCli: "offline" });
      const beforeReload = await a.evaluate(() => ({ docs: canonical(h.replica.list(null)), last: h.replica.lastSeq() }));

      // Page A reloads while offline: everything comes back from IndexedDB.
      await a.reload();
      await a.evaluate(() => window.ready);
      await a.evaluate(CANONICAL);
      const afterReload = await a.evaluate(() => ({ docs: canonical(h.replica.list(null)), last: h.replica.lastSeq() }));
      assert.deepEqual(afterReload, beforeReload, "the reloaded page has its offline edits");
      const zBody = await a.evaluate((z) => h.replica.get(z).body, z);
      assert.deepEqual(zBody, { title: "z, created offline" });
      await waitStatus(a, "offline");

      // The relay comes back on the same address with its data: both reconnect by themselves.
      own = await startRelay({ listen: host, data: dataDir });
      await Promise.all([whenSynced(a), whenSynced(b)]);
      await cli.sync(own.url);
      const expected = await cliSnapshot(cli, [x, y, z]);
      await Promise.all([
        waitForDocs(a, expected, "page A converges after reconnecting"),
        waitForDocs(b, expected, "page B converges after reconnecting"),
      ]);
      const docs = JSON.parse(expected);
      assert.deepEqual(Object.keys(docs).sort(), [x, z].sort(), "y deleted, z created");
      assert.deepEqual(docs[x].body, { title: "x", byA: "offline", byB: "offline", byCli: "offline" });
      const statuses = await b.evaluate(() => h.statuses);
      assert.ok(statuses.includes("offline") && statuses.at(-1) === "synced", statuses.join(" "));
      assertNoProblems(a, b);
    } finally {
      await Promise.all([ctxA.close(), ctxB.close()]);
      await own.stop();
      rmSync(dataDir, { recursive: true, force: true });
    }
  });

  it("the example page shows synced (indicator color and screenshot pixels), offline when the relay stops", async () => {
    const SYNCED = [24, 128, 56]; // #188038, style.css
    const OFFLINE = [197, 34, 31]; // #c5221f
    let own = await startRelay();
    const { host } = new URL(own.url);
    const dataDir = own.dataDir;
    const context = await browser.newContext({ viewport: { width: 800, height: 600 } });
    try {
      const page = await openPage(context, `${server.url}/?${new URLSearchParams({ relay: own.url, name: "example" })}`);
      const status = page.locator("#status");
      await page.waitForSelector('#status[data-status="synced"]', { timeout: TIMEOUT });

      // Add a todo through the UI; it shows up and reaches a CLI replica through the relay.
      await page.fill("#title", "buy milk");
      await page.press("#title", "Enter");
      await page.waitForSelector('#todos li:has-text("buy milk")', { timeout: TIMEOUT });
      await page.evaluate((timeout) => window.todo.connection.whenSynced({ timeout }), TIMEOUT);
      const cli = new CliReplica(tmp.dir, "example");
      await cli.sync(own.url);
      const listed = await cli.list("todos");
      assert.deepEqual(listed.map((d) => d.body.title), ["buy milk"]);
      // An edit from the CLI arrives live and is rendered.
      await cli.update(listed[0].id, { done: true });
      await cli.sync(own.url);
      await page.waitForSelector("#todos li.done", { timeout: TIMEOUT });
      await page.waitForSelector('#status[data-status="synced"]', { timeout: TIMEOUT });

      // The indicator: text and computed color...
      assert.equal(await status.textContent(), "synced");
      const color = await status.evaluate((el) => getComputedStyle(el).backgroundColor);
      assert.equal(color, `rgb(${SYNCED.join(", ")})`);
      // ...and what a person sees: the screenshot has the synced green where the badge is.
      const shot = await page.screenshot();
      const dir = process.env.WEFT_SCREENSHOT_DIR ?? join(tmpdir(), "weft-screenshots");
      mkdirSync(dir, { recursive: true });
      writeFileSync(join(dir, "example-synced.png"), shot);
      const png = decodePng(shot);
      const box = await status.boundingBox();
      const inBadge = png.rgb(Math.round(box.x + 4), Math.round(box.y + box.height / 2));
      assert.deepEqual(inBadge, SYNCED, "the badge's pixels are the synced color");
      const green = png.count(SYNCED);
      assert.ok(green > box.width * box.height * 0.5, `${green} synced-green pixels for a ${box.width}x${box.height} badge`);
      // (The delete buttons' ✕ shares the red: a few pixels, nothing like a badge.)
      assert.ok(png.count(OFFLINE) < box.width * box.height * 0.05, "no offline-red badge");

      // The relay stops: the indicator turns red; it comes back: green again.
      await own.stop({ keepData: true });
      await page.waitForSelector('#status[data-status="offline"]', { timeout: TIMEOUT });
      const offline = decodePng(await page.screenshot());
      assert.deepEqual(offline.rgb(Math.round(box.x + 4), Math.round(box.y + box.height / 2)), OFFLINE);
      assert.ok(offline.count(SYNCED) < box.width * box.height * 0.05, "no synced-green badge while offline");
      assert.ok(offline.count(OFFLINE) > box.width * box.height * 0.5, "an offline-red badge");
      writeFileSync(join(dir, "example-offline.png"), await page.screenshot());
      own = await startRelay({ listen: host, data: dataDir });
      // The page's backoff is the default (200 ms doubling): it is back within a few seconds.
      await page.waitForSelector('#status[data-status="synced"]', { timeout: TIMEOUT });
      assertNoProblems(page);
    } finally {
      await context.close();
      await own.stop();
      rmSync(dataDir, { recursive: true, force: true });
    }
  });

  it("two example pages see each other online (presence through ephemeral messages)", async () => {
    const own = await startRelay();
    const contexts = [await browser.newContext(), await browser.newContext()];
    try {
      const [ann, bob] = await Promise.all(
        ["ann", "bob"].map((user, i) =>
          openPage(contexts[i], `${server.url}/?${new URLSearchParams({ relay: own.url, name: `presence-${user}`, user })}`),
        ),
      );
      await ann.waitForSelector('#presence:has-text("also here: bob")', { timeout: TIMEOUT });
      await bob.waitForSelector('#presence:has-text("also here: ann")', { timeout: TIMEOUT });
      assert.match(await ann.locator("#presence").textContent(), /^you are ann/);
      // Both settled on the same list document; presence stored nothing in it.
      const lists = await Promise.all(
        [ann, bob].map((p) => p.evaluate(() => window.todo.replica.list("lists").map((d) => d.id).sort()[0])),
      );
      assert.equal(lists[0], lists[1]);
      assertNoProblems(ann, bob);
    } finally {
      await Promise.all(contexts.map((c) => c.close()));
      await own.stop();
    }
  });
});
