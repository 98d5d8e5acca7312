// The built package as a user gets it: `npm install <path to wasm/>` in a fresh Node project,
// then `import { Replica } from "weft"`; and the API on memory storage.

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { pathToFileURL } from "node:url";
import { promisify } from "node:util";
import { requireBuild } from "../support/common.mjs";
import { tempDir, wasmDir } from "../support/weft.mjs";

const run = promisify(execFile);
const npm = process.platform === "win32" ? "npm.cmd" : "npm";

describe("the npm package", { timeout: 120_000 }, () => {
  let project;
  let weft;

  before(async () => {
    requireBuild();
    project = tempDir("weft-consumer-");
    writeFileSync(
      join(project.dir, "package.json"),
      JSON.stringify({ name: "consumer", private: true, type: "module" }),
    );
    await run(npm, ["install", wasmDir, "--no-audit", "--no-fund", "--loglevel=error"], {
      cwd: project.dir,
      timeout: 90_000,
    });
    // A module inside the consumer project, so "weft" resolves from there.
    writeFileSync(join(project.dir, "entry.mjs"), 'export * from "weft";\n');
    weft = await import(pathToFileURL(join(project.dir, "entry.mjs")).href);
  });

  after(() => project?.cleanup());

  it("imports { Replica } from \"weft\" and works in a plain Node script", async () => {
    writeFileSync(
      join(project.dir, "app.mjs"),
      `import { Replica } from "weft";
       const replica = await Replica.open({ storage: "memory" });
       const id = await replica.create("todos", { title: "buy milk", done: false });
       await replica.update(id, { done: true });
       console.log(JSON.stringify(replica.get(id).body));
       await replica.close();`,
    );
    const { stdout } = await run(process.execPath, ["app.mjs"], { cwd: project.dir, timeout: 30_000 });
    assert.deepEqual(JSON.parse(stdout), { title: "buy milk", done: true });
  });

  it("exports pick the Node build for Node and the ESM browser build for browsers", async () => {
    const resolve = async (conditions) => {
      const args = [...conditions, "--input-type=module", "-e", "console.log(import.meta.resolve('weft'))"];
      return (await run(process.execPath, args, { cwd: project.dir })).stdout.trim();
    };
    assert.match(await resolve([]), /\/js\/node\.js$/);
    assert.match(await resolve(["--conditions=browser"]), /\/js\/browser\.js$/);
    const pkg = JSON.parse(readFileSync(join(wasmDir, "package.json"), "utf8"));
    assert.equal(pkg.name, "weft");
    assert.equal(pkg.exports["."].types, "./js/index.d.ts");
  });

  it("declares a TypeScript type for every export", () => {
    const dts = readFileSync(join(wasmDir, "js", "index.d.ts"), "utf8");
    const declared = new Set(
      [...dts.matchAll(/^export (?:declare )?(?:class|function|const|interface|type) (\w+)/gm)].map((m) => m[1]),
    );
    for (const name of Object.keys(weft)) {
      assert.ok(declared.has(name), `index.d.ts declares no export named ${name}`);
    }
    for (const method of ["create", "get", "update", "set", "splice", "delete", "list", "subscribe", "changes", "exportBundle", "importBundle", "connect", "close"]) {
      assert.match(dts, new RegExp(`\\n  ${method}\\(`), `index.d.ts declares Replica.${method}`);
    }
  });

  it("type-checks a TypeScript program using the whole API (tsc --strict, nodenext)", async () => {
    writeFileSync(
      join(project.dir, "check.ts"),
      `import { Replica, Connection, WeftError, init, wasmMemoryBytes, type ChangeEvent, type Role, type Status, type WeftErrorCode } from "weft";
       export async function main(): Promise<void> {
         await init();
         const r: Replica = await Replica.open({ name: "x", storage: "memory", seed: 1, now: () => Date.now() });
         const id: string = await r.create("todos", { title: "a", n: 1, tags: ["x"], nested: { ok: true } });
         const heads: string[] = await r.update(id, { done: true });
         await r.set(id, "/a", [1, null]);
         await r.setText(id, "/t", "hello");
         await r.splice(id, "/t", 0, 1, "H");
         await r.delete(id);
         const title: unknown = r.get(id).body.title;
         const docs = r.list("todos", "done = false", { limit: 5 });
         const controller = new AbortController();
         const off = r.subscribe((e: ChangeEvent) => void (e.kind === "created" && e.seq), { signal: controller.signal });
         off();
         const feed: ChangeEvent[] = r.changes(0, { limit: 10 });
         const role: Role = r.role;
         r.on("role", (e) => console.log(e.role === "leader", role, wasmMemoryBytes() > 0));
         const c: Connection = r.connect("ws://127.0.0.1:1", { token: "t", collections: ["todos"], initialBackoff: 100 });
         const status: Status = c.status;
         c.on("offline", (e) => e.error?.code);
         c.on("rejected", (e) => e.reason);
         c.on("failed", (e) => e.error?.cause, { signal: controller.signal });
         c.on("error", (e) => e.doc);
         await c.whenSynced({ timeout: 10, signal: controller.signal }).catch((e: unknown) => {
           if (e instanceof WeftError) {
             const code: WeftErrorCode = e.code;
             const closeCode: number | undefined = e.closeCode;
             const why: unknown = e.cause;
             console.log(code === "Aborted" || code === "Timeout", closeCode, why, e.rejectCode, e.status);
           }
         });
         switch (status) {
           case "failed":
           case "rejected":
           case "closed":
             console.log(c.error?.code);
             break;
           default:
             break;
         }
         const mine: WeftError = new WeftError("Custom", "made by the app", { cause: new Error("x"), extra: 1 });
         console.log(mine instanceof Error, mine.code);
         c.disconnect();
         const report = await r.importBundle(r.exportBundle());
         await r.flushed();
         await r.close();
         console.log(heads, title, docs, feed, status, report.created, r.id, r.lastSeq(), await Replica.version());
       }`,
    );
    const tsc = join(wasmDir, "node_modules", "typescript", "bin", "tsc");
    const args = [tsc, "--noEmit", "--strict", "--module", "nodenext", "--moduleResolution", "nodenext", "--target", "es2022", "--lib", "es2022,dom", "check.ts"];
    await run(process.execPath, args, { cwd: project.dir, timeout: 60_000 }).catch((e) => {
      assert.fail(`tsc: ${e.stdout}${e.stderr}`);
    });
  });

  it("does CRUD, list with filters, and throws WeftErrors with codes", async () => {
    const replica = await weft.Replica.open({ storage: "memory" });
    assert.equal(replica.storage, "memory");
    assert.match(replica.id, /^[1-9A-HJ-NP-Za-km-z]+$/);
    const a = await replica.create("todos", { title: "a", done: false, n: 1, ratio: 1.5, tags: ["x"] });
    const b = await replica.create("todos", { title: "b", done: true });
    await replica.create("notes", { text: "hello" });
    const doc = replica.get(a);
    assert.deepEqual(doc.body, { title: "a", done: false, n: 1, ratio: 1.5, tags: ["x"] });
    assert.equal(doc.collection, "todos");
    assert.equal(doc.heads.length, 1);

    const heads = await replica.update(a, { done: true, n: null });
    assert.deepEqual(replica.get(a).heads, heads);
    assert.deepEqual(replica.get(a).body, { title: "a", done: true, ratio: 1.5, tags: ["x"] });
    await replica.set(a, "/tags/1", "y");
    assert.deepEqual(replica.get(a).body.tags, ["x", "y"]);

    assert.deepEqual(replica.list("todos").map((d) => d.id).sort(), [a, b].sort());
    assert.equal(replica.list(null).length, 3);
    assert.equal(replica.list("todos", "title = \"b\"").length, 1);
    assert.equal(replica.list("todos", null, { limit: 1 }).length, 1);

    await replica.delete(b);
    assert.deepEqual(replica.list("todos").map((d) => d.id), [a]);

    const code = async (fn) => {
      try {
        await fn();
      } catch (e) {
        assert.ok(e instanceof weft.WeftError, `a WeftError: ${e}`);
        assert.ok(e instanceof Error, "an Error");
        assert.equal(typeof e.message, "string");
        return e.code;
      }
      assert.fail("expected an error");
    };
    assert.equal(await code(() => replica.get(b)), "Deleted");
    assert.equal(await code(() => replica.get("2Su5kmW8S2vmqj7w3goFMcpsZ4pA")), "NotFound");
    assert.equal(await code(() => replica.get("not an id")), "InvalidId");
    assert.equal(await code(() => replica.create("todos", [1, 2])), "InvalidJson");
    // Nested too deep (or cyclic): refused before the value is converted (which recurses per
    // level on the 1 MiB wasm stack), and the replica keeps working.
    let deep = {};
    for (let i = 0; i < 100_000; i++) deep = { a: deep };
    assert.equal(await code(() => replica.create("todos", deep)), "Limit");
    assert.equal(await code(() => replica.update(a, deep)), "Limit");
    assert.equal(await code(() => replica.set(a, "/x", [deep])), "Limit");
    const cyclic = { name: "loop" };
    cyclic.self = cyclic;
    assert.equal(await code(() => replica.create("todos", cyclic)), "Limit");
    let atLimit = {};
    for (let i = 1; i < 100; i++) atLimit = { a: atLimit };
    const nested = await replica.create("todos", atLimit);
    assert.deepEqual(replica.get(nested).body, atLimit);
    // The code that recurses (merge patch, set, conversion back to JS) does so 100 levels deep
    // on the wasm stack.
    await replica.update(nested, atLimit);
    await replica.set(nested, "/a", atLimit.a);
    assert.deepEqual(replica.get(nested).body, atLimit);
    assert.equal(await code(() => replica.create("todos", { a: atLimit })), "Limit");
    await replica.delete(nested);
    assert.equal(await code(() => replica.update(b, { x: 1 })), "Deleted");
    assert.equal(await code(() => replica.set(a, "no-slash", 1)), "BadPath");
    assert.equal(await code(() => replica.list("todos", "done ~ 1")), "BadFilter");
    assert.equal(await code(() => replica.importBundle(new Uint8Array([1, 2, 3]))), "BadBundle");
    assert.equal(await code(() => weft.Replica.open({ storage: "indexeddb" })), "Unsupported");
    assert.equal(await code(() => weft.Replica.open({ storage: "disk" })), "InvalidArgument");
    assert.equal(await code(() => replica.connect("localhost:7420")), "BadUrl");
    assert.equal(await code(() => replica.connect("http://127.0.0.1:7420")), "BadUrl");
    // A failed write changes nothing.
    assert.deepEqual(replica.get(a).heads, replica.get(a).heads);
    await replica.close();
    assert.equal(await code(() => replica.get(a)), "Closed");
    assert.equal(await code(() => replica.create("todos", {})), "Closed");
  });

  it("publishes every committed change once, in feed order, and serves the feed", async () => {
    const replica = await weft.Replica.open({ storage: "memory" });
    const seen = [];
    const unsubscribe = replica.subscribe((e) => seen.push(e));
    // Writes made in one turn share one flush; their events still come one by one, in order.
    const [x, y] = await Promise.all([replica.create("c", { v: 1 }), replica.create("c", { v: 2 })]);
    await replica.update(x, { v: 3 });
    await replica.update(x, { v: 3 }); // no change: no event
    await replica.delete(y);
    assert.deepEqual(
      seen.map((e) => [e.seq, e.kind, e.id]),
      [
        [1, "created", x],
        [2, "created", y],
        [3, "updated", x],
        [4, "deleted", y],
      ],
    );
    assert.equal(seen[0].origin, "local");
    assert.equal(typeof seen[0].at, "number");
    assert.deepEqual(replica.changes(0), seen);
    assert.deepEqual(replica.changes(2).map((e) => e.seq), [3, 4]);
    assert.deepEqual(replica.changes(0, { limit: 1 }).map((e) => e.seq), [1]);
    assert.equal(replica.lastSeq(), 4);
    unsubscribe();
    await replica.create("c", {});
    assert.equal(seen.length, 4);
    await replica.close();
  });

  it("exports and imports bundles (merging, idempotent, with deletions)", async () => {
    const one = await weft.Replica.open({ storage: "memory" });
    const two = await weft.Replica.open({ storage: "memory" });
    const kept = await one.create("todos", { title: "kept" });
    const gone = await one.create("todos", { title: "gone" });
    await one.delete(gone);
    const report = await two.importBundle(one.exportBundle());
    assert.equal(report.created + report.deleted, 2);
    assert.deepEqual(two.get(kept), one.get(kept));
    assert.throws(() => two.get(gone), { code: "Deleted" });
    // Concurrent edits merge both ways.
    await one.update(kept, { a: 1 });
    await two.update(kept, { b: 2 });
    await two.importBundle(one.exportBundle().buffer);
    await one.importBundle(two.exportBundle());
    assert.deepEqual(one.get(kept), two.get(kept));
    assert.deepEqual(one.get(kept).body, { title: "kept", a: 1, b: 2 });
    const again = await one.importBundle(two.exportBundle());
    assert.equal(again.created + again.updated + again.deleted, 0);
    await one.close();
    await two.close();
  });
});
