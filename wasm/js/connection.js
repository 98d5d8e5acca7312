// A live connection to a relay: one WebSocket at a time, reconnecting with exponential backoff
// and jitter (200 ms doubling to 30 s, like the Rust client) until `disconnect()`, or until the
// relay rejects the session.
//
// Status: "connecting" (dialing, or waiting for Welcome) -> "connected" (session up, changes in
// flight) <-> "synced" (the replica and the relay hold the same documents) -> "offline" (the
// socket is gone; `error` says why; a new attempt follows) | "rejected" (the relay refused the
// session: bad token, forbidden collection, protocol version; no further attempt) | "failed"
// (the replica's storage failed: `error` has code "Storage"; no further attempt) | "closed"
// (after `disconnect()`).
//
// The replica drives a connection through a handle made with it (`newConnection`): `start`,
// `send`, `sessionEvent`, `fail`. Those are closures over private methods, so user code sees
// only the documented members.

import { Emitter } from "./emitter.js";
import { abortError, asWeftError, checkSignal, weftError } from "./errors.js";

/** The postcard variant index of `Message::Sync` in a frame (after the 3-byte header). */
const SYNC_TAG = 5;
const HANDSHAKE_TIMEOUT_MS = 10_000;
/** Only `newConnection` may construct a Connection. */
const CREATE = Symbol("Connection");

/**
 * Makes a connection for a replica: `{connection, handle}`, where `handle` is what only the
 * replica may call (set by Connection's static block below).
 */
export let newConnection;

export class Connection {
  #driver;
  #url;
  #token;
  #collections;
  #reconnect;
  #initialBackoff;
  #maxBackoff;
  #backoff;
  #events = new Emitter();
  #status = "connecting";
  #error = null;
  #reason = null;
  #granted = null;
  #refused = new Map();
  #ws = null;
  #peer = null;
  #timer = null;
  #stopped = false;
  #unwatchOnline = null;
  #keepalive;

  static {
    newConnection = (driver, url, options) => {
      const connection = new Connection(CREATE, driver, url, options);
      const handle = {
        start: () => connection.#start(),
        send: (frame) => connection.#send(frame),
        sessionEvent: (event, sentSync) => connection.#sessionEvent(event, sentSync),
        fail: (error) => connection.#fail(error),
      };
      return { connection, handle };
    };
  }

  /** Use `replica.connect(url, options)`. */
  constructor(token, driver, url, options = {}) {
    if (token !== CREATE) {
      throw weftError("InvalidArgument", "use `replica.connect(url, options)` to make a Connection");
    }
    this.#driver = driver;
    this.#url = checkUrl(url);
    this.#token = options.token ?? null;
    this.#collections = options.collections ?? null;
    this.#reconnect = options.reconnect ?? true;
    this.#initialBackoff = options.initialBackoff ?? 200;
    this.#maxBackoff = options.maxBackoff ?? 30_000;
    this.#keepalive = options.keepalive ?? 30_000;
    this.#backoff = this.#initialBackoff;
  }

  /** The relay's URL. */
  get url() {
    return this.#url;
  }

  /** "connecting" | "connected" | "synced" | "offline" | "rejected" | "failed" | "closed". */
  get status() {
    return this.#status;
  }

  /** Why the connection is offline or failed (a WeftError), or null. */
  get error() {
    return this.#error;
  }

  /** Why the relay rejected the session, or null. */
  get reason() {
    return this.#reason;
  }

  /** The collections the relay granted in the latest session (null: all), or undefined. */
  get granted() {
    return this.#granted ?? undefined;
  }

  /** Documents the relay refused to take from this replica: `{doc, code, message}`. */
  get refused() {
    return [...this.#refused.values()];
  }

  /**
   * Listens to `type`: "status" (every change, `{status, error?, reason?, code?}`), or one
   * status by name ("connecting", "connected", "synced", "offline", "rejected", "failed",
   * "closed"), or "error" (`{code, message, doc}`: an error the relay reported, e.g. code
   * "Forbidden" for a document this replica may not write; such documents are also listed in
   * `refused`), or "ephemeral" (`{id, data, bytes, sender, connection, error?}`, see
   * `replica.on("ephemeral")`). Returns a function that removes the listener; so does aborting
   * `options.signal`.
   */
  on(type, listener, options) {
    return this.#events.on(type, listener, options);
  }

  off(type, listener) {
    this.#events.off(type, listener);
  }

  /**
   * Resolves when the replica is in sync with the relay: every write made before the call is
   * committed and the relay holds it (if it already is: once the pending writes committed).
   * Rejects when the relay rejects the session (code "Rejected"), the replica's storage fails
   * (that error, code "Storage"), on `disconnect()` ("Closed"), when the connection is lost
   * without reconnect ("Offline"), after `options.timeout` ms ("Timeout", with the last
   * error), or when `options.signal` aborts ("Aborted", the signal's reason as `cause`).
   * Without a timeout it waits through any number of reconnects.
   */
  whenSynced(options = {}) {
    const { timeout } = options;
    let signal;
    try {
      signal = checkSignal(options.signal);
    } catch (e) {
      return Promise.reject(e);
    }
    if (signal?.aborted) return Promise.reject(abortError(signal, "whenSynced"));
    const terminal = this.#terminalError();
    if (terminal) return Promise.reject(terminal);
    return new Promise((resolve, reject) => {
      let settled = false;
      let timer;
      let off = () => {};
      const settle = (error) => {
        if (settled) return;
        settled = true;
        off();
        clearTimeout(timer);
        signal?.removeEventListener("abort", onAbort);
        if (error) reject(error);
        else resolve();
      };
      const onAbort = () => settle(abortError(signal, "whenSynced"));
      const check = () => {
        if (this.#status === "synced") settle();
        else {
          const error = this.#terminalError();
          if (error) settle(error);
        }
      };
      signal?.addEventListener("abort", onAbort, { once: true });
      if (timeout != null) {
        timer = setTimeout(() => {
          const last = this.#error ? `; last error: ${this.#error.message}` : "";
          settle(
            weftError(
              "Timeout",
              `not in sync with ${this.#url} after ${timeout} ms (status ${this.#status}${last})`,
              { status: this.#status, cause: this.#error ?? undefined },
            ),
          );
        }, timeout);
      }
      // "synced" is about committed writes: first let the writes made so far commit (their
      // frames go out then, and the status moves), or fail (then so does this).
      this.#driver.flushed().then(
        () => {
          if (settled) return;
          off = this.#events.on("status", check);
          check();
        },
        (error) => settle(error),
      );
    });
  }

  /**
   * Closes the socket and stops reconnecting; status becomes "closed" (unless the connection
   * already ended: "rejected", "failed", or "offline" without reconnect).
   */
  disconnect() {
    if (this.#stopped) return;
    this.#stopped = true;
    clearTimeout(this.#timer);
    this.#unwatchOnline?.();
    this.#endSession();
    this.#closeSocket(1000, "client disconnect");
    this.#driver.forget(this);
    this.#setStatus("closed");
  }

  // ----- internals -------------------------------------------------------------------------

  #start() {
    this.#unwatchOnline = this.#driver.onlineEvents?.(() => this.#retryNow());
    this.#redial();
  }

  #terminalError() {
    switch (this.#status) {
      case "rejected":
        return weftError("Rejected", `the relay rejected the session: ${this.#reason}`, {
          reason: this.#reason,
          rejectCode: this.#rejectCode,
        });
      case "failed":
        return this.#failure;
      case "closed":
        return weftError("Closed", "the connection was closed");
      case "offline":
        return this.#reconnect ? null : this.#error;
      default:
        return null;
    }
  }

  #rejectCode = null;
  #failure = null; // the replica's storage error that ended this connection

  #setStatus(status, detail = {}) {
    if (status === this.#status && status !== "offline") return;
    this.#status = status;
    const event = { status, ...detail };
    this.#events.emit("status", event);
    this.#events.emit(status, event);
  }

  async #dial() {
    if (this.#stopped) return;
    this.#setStatus("connecting");
    let WebSocketImpl;
    let ws;
    try {
      WebSocketImpl = await this.#driver.WebSocket();
      if (this.#stopped) return;
      ws = new WebSocketImpl(this.#url);
    } catch (e) {
      this.#lost(weftError("Offline", `cannot open a WebSocket to ${this.#url}: ${e?.message ?? e}`));
      return;
    }
    this.#ws = ws;
    ws.binaryType = "arraybuffer";
    let handshaking = false;
    let socketError = null;
    let handshakeTimer = null;
    const mine = () => this.#ws === ws && !this.#stopped;
    // Keepalive: a relay silent for `keepalive` ms gets a protocol Ping; silent for twice as
    // long, the connection counts as lost and is redialed. Without it a half-open socket (a
    // laptop that slept, a mobile network that dropped the route) is noticed only by TCP,
    // minutes later.
    let lastHeard = Date.now();
    let lastPing = 0;
    let nonce = 0;
    const keepaliveTimer = setInterval(() => {
      if (!mine()) {
        clearInterval(keepaliveTimer);
        return;
      }
      if (this.#peer == null) return;
      const now = Date.now();
      const silent = now - lastHeard;
      if (silent >= 2 * this.#keepalive) {
        clearInterval(keepaliveTimer);
        this.#drop(ws, weftError("Offline", `the relay was silent for ${Math.round(silent / 1000)} s`));
      } else if (silent >= this.#keepalive && now - lastPing >= this.#keepalive) {
        lastPing = now;
        try {
          ws.send(this.#driver.pingFrame(++nonce));
        } catch {}
      }
    }, Math.max(10, this.#keepalive / 4));

    ws.onopen = () => {
      if (!mine()) return;
      try {
        ws.send(this.#driver.helloFrame(this.#token, this.#collections));
      } catch (e) {
        this.#drop(ws, weftError("Offline", `sending Hello: ${e?.message ?? e}`));
        return;
      }
      handshaking = true;
      handshakeTimer = setTimeout(() => {
        if (mine()) {
          this.#drop(ws, weftError("Offline", `no Welcome from ${this.#url} within 10 s`));
        }
      }, HANDSHAKE_TIMEOUT_MS);
    };

    ws.onmessage = (event) => {
      if (!mine()) return;
      lastHeard = Date.now();
      if (!(event.data instanceof ArrayBuffer)) {
        this.#drop(ws, weftError("Offline", "the relay sent a text frame; expected binary"), 1003);
        return;
      }
      const frame = new Uint8Array(event.data);
      if (handshaking) {
        handshaking = false;
        clearTimeout(handshakeTimer);
        this.#onHandshake(ws, frame);
        return;
      }
      if (this.#peer == null) return;
      if (frame[3] === SYNC_TAG && this.#status === "synced") this.#setStatus("connected");
      try {
        this.#driver.receive(this.#peer, frame);
      } catch (e) {
        this.#drop(ws, weftError("Offline", `bad frame from the relay: ${e?.message ?? e}`), 1002);
      }
    };

    ws.onerror = (event) => {
      // Browsers say nothing about why; `ws` in Node passes the underlying error.
      socketError = event?.error?.message ?? event?.message ?? null;
    };

    ws.onclose = (event) => {
      clearTimeout(handshakeTimer);
      clearInterval(keepaliveTimer);
      if (!mine()) return;
      const code = event?.code;
      const reason = event?.reason ? `: ${event.reason}` : "";
      if (handshaking && code === 1008) {
        // The relay closed during the handshake for a policy reason: a refusal.
        this.#endSession();
        this.#ws = null;
        this.#rejected("Closed", event.reason || "closed by the relay during the handshake");
        return;
      }
      const wasOpen = this.#peer != null;
      let message;
      if (wasOpen) message = `connection to ${this.#url} closed (code ${code}${reason})`;
      else if (socketError) message = `cannot connect to ${this.#url}: ${socketError}`;
      else message = `cannot connect to ${this.#url} (code ${code}${reason})`;
      this.#endSession();
      this.#ws = null;
      this.#lost(weftError("Offline", message, { closeCode: code }));
    };
  }

  #onHandshake(ws, frame) {
    let answer;
    try {
      answer = this.#driver.handshake(frame);
    } catch (e) {
      this.#drop(ws, weftError("Offline", `bad handshake frame from the relay: ${e?.message ?? e}`), 1002);
      return;
    }
    if (answer.kind === "reject") {
      if (answer.code === "Busy") {
        this.#drop(ws, weftError("Offline", `the relay is busy: ${answer.reason}`));
        return;
      }
      this.#ws = null;
      try {
        ws.close(1000, "rejected");
      } catch {}
      this.#rejected(answer.code, answer.reason);
      return;
    }
    this.#granted = answer.collections ?? null;
    try {
      this.#peer = this.#driver.openSession(this, answer.relay, answer.collections ?? null);
    } catch (e) {
      this.#drop(ws, weftError("Offline", `starting the session: ${e?.message ?? e}`));
      return;
    }
    this.#backoff = this.#initialBackoff;
    this.#error = null;
    // The session's own frames (its first Summary) are already queued behind any pending
    // writes; status goes to "synced" when the engine says so.
    if (this.#status !== "synced") this.#setStatus("connected");
  }

  #rejected(code, reason) {
    this.#stopped = true;
    clearTimeout(this.#timer);
    this.#unwatchOnline?.();
    this.#driver.forget(this);
    this.#reason = `${code}: ${reason}`;
    this.#rejectCode = code;
    this.#setStatus("rejected", {
      reason: this.#reason,
      code,
      error: weftError("Rejected", `the relay rejected the session: ${this.#reason}`, {
        reason: this.#reason,
        rejectCode: code,
      }),
    });
  }

  /** Gives up on this socket: close it, end the session, report offline, maybe retry. */
  #drop(ws, error, code = 1000) {
    if (this.#ws === ws) this.#ws = null;
    try {
      ws.close(code === 1000 || (code >= 3000 && code < 5000) ? code : 1000);
    } catch {}
    this.#endSession();
    this.#lost(error);
  }

  #lost(error) {
    if (this.#stopped) return;
    this.#error = error;
    this.#setStatus("offline", { error });
    if (!this.#reconnect) {
      this.#stopped = true;
      this.#unwatchOnline?.();
      this.#driver.forget(this);
      return;
    }
    // Exponential backoff with up to 50% jitter, so many clients spread their reconnects.
    const delay = this.#backoff * (1 + Math.random() / 2);
    this.#backoff = Math.min(this.#backoff * 2, this.#maxBackoff);
    clearTimeout(this.#timer);
    this.#timer = setTimeout(() => this.#redial(), delay);
  }

  /** The browser says the network is back: try now instead of waiting out the backoff. */
  #retryNow() {
    if (this.#stopped || this.#status !== "offline") return;
    clearTimeout(this.#timer);
    this.#backoff = this.#initialBackoff;
    this.#redial();
  }

  #redial() {
    this.#dial().catch((e) => this.#lost(weftError("Offline", `connecting: ${e?.message ?? e}`)));
  }

  #endSession() {
    if (this.#peer == null) return;
    const peer = this.#peer;
    this.#peer = null;
    this.#driver.closeSession(peer);
  }

  #closeSocket(code, reason) {
    const ws = this.#ws;
    this.#ws = null;
    try {
      ws?.close(code, reason);
    } catch {}
  }

  // ----- called by the replica (through the handle) after a commit ---------------------

  /** Sends a frame; returns whether it carried changes (a Sync message). */
  #send(frame) {
    const ws = this.#ws;
    if (!ws || this.#peer == null) return false;
    try {
      ws.send(frame);
    } catch (e) {
      this.#drop(ws, weftError("Offline", `sending: ${e?.message ?? e}`));
      return false;
    }
    if (frame[3] === SYNC_TAG) {
      // Changes on their way out: not in sync until the relay confirms again.
      if (this.#status === "synced") this.#setStatus("connected");
      return true;
    }
    return false;
  }

  #sessionEvent(event, sentSync) {
    switch (event.kind) {
      case "insync":
        if (!sentSync && (this.#status === "connected" || this.#status === "synced")) {
          this.#setStatus("synced");
        }
        break;
      case "error": {
        const refusal = { doc: event.doc ?? null, code: event.code, message: event.message };
        if (refusal.doc && (refusal.code === "Forbidden" || refusal.code === "RateLimited")) {
          this.#refused.set(refusal.doc, refusal);
        }
        this.#events.emit("error", refusal);
        break;
      }
      case "ephemeral": {
        // Presence or cursors from another session: the data decoded from CBOR, the bytes as
        // they came; bytes that are not CBOR give `data: undefined` and the `error`.
        const detail = {
          id: event.doc,
          data: event.data,
          bytes: event.bytes,
          sender: event.sender,
          connection: this,
        };
        if (event.error !== undefined) detail.error = asWeftError(event.error, "BadCbor");
        this.#events.emit("ephemeral", detail);
        this.#driver.ephemeral?.(detail);
        break;
      }
      case "closed":
        // The relay broke the protocol: the engine ended the session (its Error frame went
        // out first); drop the connection and dial again with backoff.
        if (this.#ws) this.#drop(this.#ws, weftError("Offline", `the session ended: ${event.reason}`));
        break;
      case "persisted":
        // The relay stored a later version of these: no longer refused.
        for (const doc of event.docs ?? []) this.#refused.delete(doc);
        break;
      default:
        break;
    }
  }

  /**
   * The replica's storage failed (its memory is ahead of what is committed): stop for good,
   * with status "failed" and that error. Nothing is sent or reported after this.
   */
  #fail(error) {
    if (this.#stopped) return;
    this.#stopped = true;
    clearTimeout(this.#timer);
    this.#unwatchOnline?.();
    this.#endSession();
    this.#closeSocket(1000, "replica storage failed");
    this.#driver.forget(this);
    this.#error = error;
    this.#failure = error;
    this.#setStatus("failed", { error });
  }
}

export function checkUrl(url) {
  let parsed;
  try {
    parsed = new URL(String(url));
  } catch {
    throw weftError("BadUrl", `not a URL: ${JSON.stringify(String(url))} (expected ws://HOST:PORT)`);
  }
  if (parsed.protocol !== "ws:" && parsed.protocol !== "wss:") {
    throw weftError(
      "BadUrl",
      `a relay URL starts with ws:// or wss://, not ${parsed.protocol}// (${url})`,
    );
  }
  return parsed.href;
}
