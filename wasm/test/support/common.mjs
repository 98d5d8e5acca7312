// Shared test utilities: bounded waits on events, unhandled-rejection tracking, free ports.

import { existsSync } from "node:fs";
import { createServer } from "node:net";
import { join } from "node:path";
import { wasmDir } from "./weft.mjs";

/** Fails early with a clear message when the package was not built. */
export function requireBuild() {
  const wasm = join(wasmDir, "pkg", "weft_wasm_bg.wasm");
  if (!existsSync(wasm)) throw new Error(`${wasm} missing: run \`npm run build\` in wasm/ first`);
}

/** Resolves with the first value `check()` returns that is not undefined, re-checking on every event. */
export function until(subscribe, check, { timeout = 20_000, what = "condition" } = {}) {
  return new Promise((resolve, reject) => {
    let off = () => {};
    const timer = setTimeout(() => {
      off();
      reject(new Error(`timed out after ${timeout} ms waiting for ${what}`));
    }, timeout);
    const test = () => {
      let value;
      try {
        value = check();
      } catch (e) {
        clearTimeout(timer);
        off();
        reject(e);
        return;
      }
      if (value !== undefined) {
        clearTimeout(timer);
        off();
        resolve(value);
      }
    };
    off = subscribe(test);
    test();
  });
}

/** The next `type` event of a connection (bounded). */
export function nextEvent(connection, type, timeout = 20_000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`no "${type}" event within ${timeout} ms (status ${connection.status})`));
    }, timeout);
    const off = connection.on(type, (event) => {
      clearTimeout(timer);
      off();
      resolve(event);
    });
  });
}

/** A port on 127.0.0.1 that nothing listens on (bound, then released). */
export function closedPort() {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** Collects unhandled promise rejections from now on; `stop()` returns them. */
export function trackUnhandledRejections() {
  const seen = [];
  const listener = (reason) => seen.push(reason);
  process.on("unhandledRejection", listener);
  return {
    seen,
    stop() {
      process.off("unhandledRejection", listener);
      return seen;
    },
  };
}

/** Documents as comparable `{id: {heads (sorted), body}}`. */
export function snapshot(docs) {
  const out = {};
  for (const d of docs) out[d.id] = { heads: [...d.heads].sort(), body: d.body };
  return out;
}
