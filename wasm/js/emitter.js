// A minimal event emitter that works the same in browsers and Node. A listener that throws
// is reported on the console and does not stop the others.

import { checkSignal, weftError } from "./errors.js";

export class Emitter {
  /** type -> Map(listener -> detach its AbortSignal, or null) */
  #listeners = new Map();

  /**
   * Calls `listener(detail)` for every `type` event until the returned function is called,
   * `off(type, listener)`, or `options.signal` aborts. Adding a listener that is already
   * there changes nothing (like `addEventListener`).
   */
  on(type, listener, options) {
    if (typeof listener !== "function") {
      throw weftError("InvalidArgument", "a listener must be a function");
    }
    const signal = checkSignal(options?.signal);
    const off = () => this.off(type, listener);
    if (signal?.aborted) return () => {};
    let listeners = this.#listeners.get(type);
    if (!listeners) this.#listeners.set(type, (listeners = new Map()));
    if (listeners.has(listener)) return off;
    let detach = null;
    if (signal) {
      signal.addEventListener("abort", off, { once: true });
      detach = () => signal.removeEventListener("abort", off);
    }
    listeners.set(listener, detach);
    return off;
  }

  off(type, listener) {
    const listeners = this.#listeners.get(type);
    if (!listeners?.has(listener)) return;
    const detach = listeners.get(listener);
    listeners.delete(listener);
    if (listeners.size === 0) this.#listeners.delete(type);
    detach?.();
  }

  /** How many listeners `type` has. */
  listenerCount(type) {
    return this.#listeners.get(type)?.size ?? 0;
  }

  emit(type, detail) {
    const listeners = this.#listeners.get(type);
    if (!listeners) return;
    for (const listener of [...listeners.keys()]) {
      // One removed by an earlier listener of this event is not called any more.
      if (!listeners.has(listener)) continue;
      try {
        listener(detail);
      } catch (error) {
        console.error(`weft: a "${type}" listener threw`, error);
      }
    }
  }
}
