// weft for browsers: the engine (WebAssembly, fetched next to this module on first use),
// IndexedDB persistence, the browser's WebSocket.

import init, * as wasm from "../pkg/weft_wasm.js";
import { asWeftError } from "./errors.js";
import { makeReplicaClass } from "./replica.js";
// replica.js's own imports, named here too so that a browser without a bundler fetches the
// whole module graph in one round trip instead of two.
import "./connection.js";
import "./emitter.js";
import "./storage.js";

let loading;
let instance;

/**
 * The bytes of WebAssembly memory the engine holds in this page (0 before it loaded). Wasm
 * memory only grows: this is the high-water mark of every replica opened here.
 */
export function wasmMemoryBytes() {
  return instance?.memory?.buffer?.byteLength ?? 0;
}

/**
 * Loads and instantiates the WebAssembly module (once; `Replica.open` calls it). Pass
 * `{ module_or_path }` (a URL, Response, bytes or WebAssembly.Module) to load it from
 * elsewhere than next to this package's files.
 */
function init_(options) {
  loading ??= init(
    options ?? { module_or_path: new URL("../pkg/weft_wasm_bg.wasm", import.meta.url) },
  ).then(
    (exports) => {
      instance = exports;
      return wasm;
    },
    (e) => {
      loading = undefined; // the next call tries again
      throw asWeftError(e, "Internal");
    },
  );
  return loading;
}

function onlineEvents(listener) {
  if (typeof globalThis.addEventListener !== "function") return () => {};
  globalThis.addEventListener("online", listener);
  return () => globalThis.removeEventListener("online", listener);
}

export const Replica = makeReplicaClass({
  loadCore: () => init_(),
  indexedDB: () => globalThis.indexedDB,
  WebSocket: async () => globalThis.WebSocket,
  locks: () => globalThis.navigator?.locks,
  BroadcastChannel: () => globalThis.BroadcastChannel,
  onlineEvents,
});

export { init_ as init };
export { Connection } from "./connection.js";
export { WeftError } from "./errors.js";
