// Collaborative text through the JS API: setText makes a field text, splice edits it; a
// splice on a plain string is a typed error, and the document is unchanged.

import { test } from "node:test";
import assert from "node:assert/strict";

import { Replica } from "../../js/node.js";

test("setText then splice edits collaborative text; plain strings refuse splices", async () => {
  const r = await Replica.open({ name: "text", storage: "memory" });
  const id = await r.create("notes", { title: "plain", body: "" });
  await r.setText(id, "/body", "hello world");
  await r.splice(id, "/body", 0, 1, "H");
  await r.splice(id, "/body", 11, 0, "!");
  assert.equal(r.get(id).body.body, "Hello world!");
  const before = r.get(id).heads;
  await assert.rejects(r.splice(id, "/title", 0, 1, "P"), (e) => {
    assert.equal(e.code, "NotText", e.message);
    assert.match(e.message, /not text/);
    return true;
  });
  await assert.rejects(r.splice(id, "/missing", 0, 0, "x"), (e) => e.code === "BadPath");
  assert.deepEqual(r.get(id).heads, before);
  assert.equal(r.get(id).body.title, "plain");
  await r.close();
});
