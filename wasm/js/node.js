// weft for Node (>= 20): the same engine and API; the .wasm is read from this package's files.
// Storage "memory" (or "indexeddb" where a global `indexedDB` exists, e.g. fake-indexeddb);
// WebSockets from the global `WebSocket` when present (Node >= 22), else the `ws` package.

import { readFile } from "node:fs/promises";
import init, * as wasm from "../pkg/weft_wasm.js";
import { asWeftError } from "./errors.js";
import { makeReplicaClass } from "./replica.js";

let loading;
let instance;

/** Bytes of WebAssembly memory the engine holds (0 before it loaded). */
export function wasmMemoryBytes() {
  return instance?.memory?.buffer?.byteLength ?? 0;
}

/** Loads and instantiates the WebAssembly module (once; `Replica.open` calls it). */
function load(options) {
  loading ??= (async () => {
    const bytes =
      options?.module_or_path ??
      (await readFile(new URL("../pkg/weft_wasm_bg.wasm", import.meta.url)));
    instance = await init({ module_or_path: bytes });
    return wasm;
  })().catch((e) => {
    loading = undefined; // the next call tries again
    throw asWeftError(e, "Internal");
  });
  return loading;
}

let webSocket;
async function WebSocketImpl() {
  webSocket ??= globalThis.WebSocket ?? (await import("ws")).WebSocket;
  return webSocket;
}

export const Replica = makeReplicaClass({
  loadCore: () => load(),
  indexedDB: () => globalThis.indexedDB,
  WebSocket: WebSocketImpl,
  locks: () => globalThis.navigator?.locks,
  onlineEvents: undefined,
});

export { load as init };
export { Connection } from "./connection.js";
export { WeftError } from "./errors.js";
