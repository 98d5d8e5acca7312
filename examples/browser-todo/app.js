// A todo list on the `weft` package: documents in IndexedDB, live sync through a relay
// (`weft serve`), and an indicator that says whether this page is synced, online or offline.
//
// Query parameters: ?relay=ws://HOST:PORT (default ws://127.0.0.1:7420), &token=JWT for a
// relay with --auth-secret-file, &name=REPLICA (the IndexedDB database, default "browser-todo").

import { Replica } from "weft";

const params = new URLSearchParams(location.search);
const relayUrl = params.get("relay") ?? "ws://127.0.0.1:7420";
const token = params.get("token") ?? undefined;
const name = params.get("name") ?? "browser-todo";

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

function report(error) {
  console.error(error);
  $("status-detail").textContent = `${error.code ?? "Error"}: ${error.message}`;
}

async function main() {
  const replica = await Replica.open({ name, storage: "indexeddb" });
  $("replica-id").textContent = replica.id;
  $("relay-url").textContent = relayUrl;

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

  $("add").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = $("title");
    const title = input.value.trim();
    if (!title) return;
    input.value = "";
    replica.create("todos", { title, done: false, created: Date.now() }).catch(report);
  });

  const connection = replica.connect(relayUrl, { token });
  showStatus({ status: connection.status });
  connection.on("status", showStatus);
  connection.on("error", (e) => report(Object.assign(new Error(e.message), { code: e.code })));
  window.todo = { replica, connection };
}

main().catch((error) => {
  report(error);
  $("status").dataset.status = "offline";
  $("status").textContent = "error";
});
