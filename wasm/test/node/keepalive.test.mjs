// A relay that stops answering (here: its process frozen with SIGSTOP, so the TCP connection
// stays open — a half-open socket, as after a laptop sleeps) is noticed by the keepalive:
// pinged after `keepalive` ms of silence, given up after twice that, then redialed; once the
// relay answers again the replica is back in sync.

import assert from "node:assert/strict";
import { test } from "node:test";
import { Replica } from "../../js/node.js";
import { nextEvent, requireBuild, trackUnhandledRejections } from "../support/common.mjs";
import { startRelay } from "../support/weft.mjs";

test("a silent relay is detected by the keepalive and the session comes back", { timeout: 60_000 }, async () => {
  requireBuild();
  const unhandled = trackUnhandledRejections();
  const relay = await startRelay();
  const replica = await Replica.open({ name: "keepalive", storage: "memory" });
  let connection;
  let frozen = false;
  try {
    connection = replica.connect(relay.url, { keepalive: 200, initialBackoff: 50 });
    await connection.whenSynced({ timeout: 20_000 });
    // A live relay answers the pings: the session stays up through several keepalive periods.
    const drops = [];
    const off = connection.on("offline", (e) => drops.push(e));
    await replica.create("todos", { title: "while live" });
    await connection.whenSynced({ timeout: 20_000 });
    await new Promise((resolve) => setTimeout(resolve, 1000)); // five periods of idleness
    off();
    assert.deepEqual(drops, [], "the keepalive dropped a live relay");

    process.kill(relay.pid, "SIGSTOP");
    frozen = true;
    const started = Date.now();
    const offline = await nextEvent(connection, "offline", 10_000);
    assert.match(offline.error.message, /silent/);
    // Silence counts from the last frame heard (a pong up to one period before the freeze),
    // so the cut comes one to two periods after it, not a fixed time.
    assert.ok(Date.now() - started < 2_000, `took ${Date.now() - started} ms to notice`);

    process.kill(relay.pid, "SIGCONT");
    frozen = false;
    const id = await replica.create("todos", { title: "after the freeze" });
    await connection.whenSynced({ timeout: 20_000 });
    assert.equal(replica.get(id).body.title, "after the freeze");
  } finally {
    if (frozen) process.kill(relay.pid, "SIGCONT");
    connection?.disconnect();
    await replica.close();
    await relay.stop();
  }
  assert.deepEqual(unhandled.stop(), []);
});
