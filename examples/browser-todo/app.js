// A todo list on the `weft` package: documents in IndexedDB, live sync through a relay
// (`weft serve`), and an indicator that says whether this page is synced, online or offline.
//
// Query parameters: ?relay=ws://HOST:PORT (default ws://127.0.0.1:7420), &token=JWT for a
// relay with --auth-secret-file, &name=REPLICA (the IndexedDB database, default "browser-todo"),
// &user=NAME (who this tab is in the "online" line; default a random guest name).
//
// Presence: every tab broadcasts `{ name, at }` about the list document every few seconds
// (ephemeral messages: passed on by the relay, never stored) and shows the names it heard
// from in the last 10 s.

import { Replica } from "weft";

const params = new URLSearchParams(location.search);
const relayUrl = params.get("relay") ?? "ws://127.0.0.1:7420";
const token = params.get("token") ?? undefined;
const name = params.get("name") ?? "browser-todo";
const user = params.get("user") ?? `guest-${Math.random().toString(36).slice(2, 6)}`;
const PRESENCE_EVERY_MS = 3_000;
const PRESENCE_TTL_MS = 10_000;

const $ = (id) => document.getElementById(id);
const LABELS = {
  connecting: "connecting…",
  connected: "online",
  synced: "synced",
  offline: "offline",
  rejected: "rejected",
  failed: "storage failed",
  closed: "disconnected",
};

function showStatus({ status, error, reason }) {
  const badge = $("status");
  badge.dataset.status = status;
  badge.textContent = LABELS[status] ?? status;
  $("status-detail").textContent =
    status === "offline"
      ? `${error?.message ?? ""} — retrying`
      : status === "rejected"
        ? reason
        : status === "failed"
          ? `${error?.message ?? ""} — reload the page`
          : "";
}

function render(replica) {
  const todos = replica
    .list("todos")
    .sort((a, b) => (a.body.created ?? 0) - (b.body.created ?? 0) || a.id.localeCompare(b.id));
  const list = $("todos");
  list.replaceChildren(
    ...todos.map(({ id, body }) => {
      const item = document.createElement("li");
      item.dataset.id = id;
      item.classList.toggle("done", !!body.done);
      const check = document.createElement("input");
      check.type = "checkbox";
      check.checked = !!body.done;
      check.addEventListener("change", () => replica.update(id, { done: check.checked }).catch(report));
      const title = document.createElement("span");
      title.className = "title";
      title.textContent = String(body.title ?? "");
      const remove = document.createElement("button");
      remove.title = "delete";
      remove.textContent = "✕";
      remove.addEventListener("click", () => replica.delete(id).catch(report));
      item.append(check, title, remove);
      return item;
    }),
  );
  $("empty").hidden = todos.length > 0;
}

/**
 * The list document presence is about: the "lists" document with the smallest id. Two tabs
 * that each created one while offline agree on the same one once they have synced.
 */
function listDocument(replica) {
  return replica.list("lists").map((d) => d.id).sort()[0];
}

/** Broadcasts this tab's presence and shows who else was heard from in the last 10 s. */
function startPresence(replica, connection) {
  const seen = new Map(); // name -> when last heard (local clock)
  const announce = () => {
    const id = listDocument(replica);
    if (id) replica.broadcast(id, { name: user, at: Date.now() });
  };
  const renderPresence = () => {
    const now = Date.now();
    for (const [who, at] of seen) if (now - at > PRESENCE_TTL_MS) seen.delete(who);
    const others = [...seen.keys()].sort();
    $("presence").textContent = `you are ${user}` + (others.length ? ` · also here: ${others.join(", ")}` : " · nobody else here");
  };
  replica.on("ephemeral", ({ id, data }) => {
    if (id !== listDocument(replica) || typeof data?.name !== "string" || data.name === user) return;
    const isNew = !seen.has(data.name);
    seen.set(data.name, Date.now());
    renderPresence();
    if (isNew) announce(); // a newcomer hears of us at once, not after up to 3 s
  });
  connection.on("synced", announce);
  setInterval(() => {
    announce();
    renderPresence();
  }, PRESENCE_EVERY_MS);
  renderPresence();
}

function report(error) {
  console.error(error);
  $("status-detail").textContent = `${error.code ?? "Error"}: ${error.message}`;
}

const ROLES = {
  leader: "this tab holds the replica for every tab",
  follower: "this tab shares the replica of another tab",
  single: "this tab has the replica to itself",
};

// The form never submits as a plain HTML form (that would reload the page and lose the
// typed todo): it is handled here from the start, and enabled once the replica is open.
let addTodo = null;
$("add").addEventListener("submit", (event) => {
  event.preventDefault();
  addTodo?.();
});

async function main() {
  // Every tab of this origin opens the same replica: one tab holds IndexedDB and the relay
  // connection, the others share it (and take over when it closes).
  const replica = await Replica.open({ name, storage: "indexeddb" });
  $("replica-id").textContent = replica.id;
  $("relay-url").textContent = relayUrl;
  const showRole = () => ($("role").textContent = ROLES[replica.role] ?? replica.role);
  showRole();
  replica.on("role", showRole);

  // Re-render after every committed change, local or from the relay (once per frame).
  let scheduled = false;
  replica.subscribe(() => {
    if (scheduled) return;
    scheduled = true;
    requestAnimationFrame(() => {
      scheduled = false;
      render(replica);
    });
  });
  render(replica);

  addTodo = () => {
    const input = $("title");
    const title = input.value.trim();
    if (!title) return;
    input.value = "";
    replica.create("todos", { title, done: false, created: Date.now() }).catch(report);
  };
  $("add-fields").disabled = false;

  const connection = replica.connect(relayUrl, { token });
  showStatus({ status: connection.status });
  connection.on("status", showStatus);
  connection.on("error", (e) => report(Object.assign(new Error(e.message), { code: e.code })));
  window.todo = { replica, connection, user };

  // The list document for presence: once the first sync had its chance to bring one, make
  // one if there is none.
  if (!listDocument(replica)) {
    await connection.whenSynced({ timeout: 5_000 }).catch(() => {});
    if (!listDocument(replica)) await replica.create("lists", { title: "todos" });
  }
  startPresence(replica, connection);
}

main().catch((error) => {
  report(error);
  $("status").dataset.status = "offline";
  $("status").textContent = "error";
});
