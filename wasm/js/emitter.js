// A minimal event emitter that works the same in browsers and Node. A listener that throws
// is reported on the console and does not stop the others.

export class Emitter {
  #listeners = new Map();

  /** Calls `listener(detail)` for every `type` event; returns a function that removes it. */
  on(type, listener) {
    if (typeof listener !== "function") throw new TypeError("listener must be a function");
    let set = this.#listeners.get(type);
    if (!set) this.#listeners.set(type, (set = new Set()));
    set.add(listener);
    return () => this.off(type, listener);
  }

  /** Like `on`, for the next event only. */
  once(type, listener) {
    const off = this.on(type, (detail) => {
      off();
      listener(detail);
    });
    return off;
  }

  off(type, listener) {
    this.#listeners.get(type)?.delete(listener);
  }

  emit(type, detail) {
    const set = this.#listeners.get(type);
    if (!set) return;
    for (const listener of [...set]) {
      try {
        listener(detail);
      } catch (error) {
        console.error(`weft: a "${type}" listener threw`, error);
      }
    }
  }
}
