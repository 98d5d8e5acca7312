// automerge-repo's reference sync server, for scripts/bench-amrepo.sh: the few lines of
// @automerge/automerge-repo-sync-server's src/server.js (whose last npm release, 0.2.8, still
// depends on automerge-repo 1.x), on the 2.x packages of package.json: a Repo with
// NodeFSStorageAdapter(DATA_DIR) and WebSocketServerAdapter over a `ws` server, peerId
// `storage-server-<hostname>`, `sharePolicy: async () => false`. Without express (it only served
// a static page and "/"); the WebSocket upgrade is taken on any path of a node:http server.
// Environment: DATA_DIR (default .amrg), PORT (default 3030; 0 = a free port), HOST
// (default 127.0.0.1). Prints `listening on ws://HOST:PORT` once it accepts connections.
// SIGTERM/SIGINT: writes every loaded document to storage (Repo.flush), then exits.
import fs from "node:fs";
import http from "node:http";
import os from "node:os";

import { Repo } from "@automerge/automerge-repo";
import { WebSocketServerAdapter } from "@automerge/automerge-repo-network-websocket";
import { NodeFSStorageAdapter } from "@automerge/automerge-repo-storage-nodefs";
import { WebSocketServer } from "ws";

const dir = process.env.DATA_DIR ?? ".amrg";
fs.mkdirSync(dir, { recursive: true });
const port = process.env.PORT !== undefined ? parseInt(process.env.PORT, 10) : 3030;
const host = process.env.HOST ?? "127.0.0.1";

const wss = new WebSocketServer({ noServer: true });
const repo = new Repo({
  network: [new WebSocketServerAdapter(wss)],
  storage: new NodeFSStorageAdapter(dir),
  peerId: `storage-server-${os.hostname()}`,
  // Since this is a server, we don't share generously: we only sync documents they already know
  // about and can ask for by ID.
  sharePolicy: async () => false,
});

const server = http.createServer((req, res) => {
  res.end("automerge-repo reference sync server is running\n");
});
server.on("upgrade", (request, socket, head) => {
  wss.handleUpgrade(request, socket, head, ws => wss.emit("connection", ws, request));
});
server.listen(port, host, () => {
  console.log(`listening on ws://${host}:${server.address().port}`);
});

let stopping = false;
const stop = async () => {
  if (stopping) return;
  stopping = true;
  const timer = setTimeout(() => process.exit(3), 60_000);
  try {
    await repo.flush();
  } finally {
    clearTimeout(timer);
    process.exit(0);
  }
};
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
