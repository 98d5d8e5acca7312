// The JS driver of the engine: `Replica` wraps the wasm `Core` (which holds every document in
// memory and decides what to store and send) and does the IO: it persists the Core's journal,
// publishes change events, and moves frames between the Core and WebSockets.
//
// The rule that everything follows: **acknowledge after commit**. After each call into the
// Core, `#pump()` takes everything the Core produced (journal records, change events, frames,
// session events) into the current batch. One batch is written in one storage transaction;
// only when that transaction has completed are its frames sent, its session events reported,
// its write promises resolved and its change events published — in that order, batch after
// batch. Calls made while a transaction is in flight gather in the next batch (group commit).

import { checkUrl, newConnection } from "./connection.js";
import { Emitter } from "./emitter.js";
import { asWeftError, weftError } from "./errors.js";
import { IndexedDbStorage, MemoryStorage, deleteIndexedDb } from "./storage.js";
import { Tabs, tabsSupported } from "./tabs.js";

/** How often open sessions ask the engine whether it wants a tick. */
const TICK_POLL_MS = 10;

/**
 * Builds the `Replica` class for one platform (browser or Node), given:
 * - `loadCore()`: resolves to the wasm module's exports (`Core`, `version`) once initialized;
 * - `indexedDB()`: the IndexedDB factory, or undefined;
 * - `WebSocket()`: resolves to a WebSocket constructor (the browser's, or `ws` in Node);
 * - `locks()`: the Web Locks API (`navigator.locks`), or undefined;
 * - `BroadcastChannel()`: the BroadcastChannel constructor, or undefined (with `locks`, the
 *   tabs of an origin share one replica: see tabs.js).
 */
export function makeReplicaClass(platform) {
  /** The wasm module; a failure to load it is a WeftError. */
  const loadCore = () =>
    platform.loadCore().catch((e) => {
      throw asWeftError(e, "Internal");
    });

  class Replica {
    #core;
    #storage;
    #name;
    #releaseLock;
    #batch = null;
    #flushing = false;
    #idle = null; // resolves when no flush is running or pending
    #failed = null; // the storage error that made this replica unusable
    #closed = false;
    #subscribers = new Emitter();
    #peers = new Map(); // peer number -> its connection's handle
    #connections = new Map(); // Connection -> its handle (see connection.js)
    #ticker = null;
    #tabs = null; // the tabs sharing this replica (tab mode), see tabs.js
    #wasm = null;
    #now = null;
    #forkSeq = 0; // a following tab's engine: the change feed position it was copied at
    #forkOf = null; // ... and the id of the replica it was copied from

    /** Use `Replica.open()`. */
    constructor(token, core, storage, name, releaseLock) {
      if (token !== OPEN) throw weftError("InvalidArgument", "use `await Replica.open(options)`");
      this.#core = core;
      this.#storage = storage;
      this.#name = name;
      this.#releaseLock = releaseLock;
    }

    /**
     * Opens (or creates) a replica. `storage: "indexeddb"` (the default where IndexedDB
     * exists) keeps it in the IndexedDB database "weft:NAME"; `"memory"` keeps nothing.
     */
    static async open(options = {}) {
      const { name = "weft", seed, now } = options;
      const storageKind =
        options.storage ?? (platform.indexedDB() ? "indexeddb" : "memory");
      if (typeof name !== "string" || name === "") {
        throw weftError("InvalidArgument", "`name` must be a non-empty string");
      }
      if (storageKind !== "indexeddb" && storageKind !== "memory") {
        throw weftError(
          "InvalidArgument",
          `unknown storage ${JSON.stringify(storageKind)} (use "indexeddb" or "memory")`,
        );
      }
      const wasm = await loadCore();
      if (storageKind === "indexeddb" && options.tabs !== false && tabsSupported(platform)) {
        return Replica.#openShared(wasm, options, name);
      }
      let storage;
      let releaseLock = () => {};
      if (storageKind === "indexeddb") {
        releaseLock = await lockReplica(platform.locks(), name, options.lockTimeout ?? 5000);
        try {
          storage = await IndexedDbStorage.open(platform.indexedDB(), name);
        } catch (e) {
          releaseLock();
          throw e;
        }
      } else {
        storage = new MemoryStorage();
      }
      let core;
      try {
        const records = await storage.load();
        const coreOptions = { records, now: now ?? (() => Date.now()) };
        if (seed !== undefined) coreOptions.seed = seed;
        core = wasm.Core.open(coreOptions);
      } catch (e) {
        storage.close();
        releaseLock();
        throw asWeftError(e, "Storage");
      }
      const replica = new Replica(OPEN, core, storage, name, releaseLock);
      // A new replica's first journal holds its id: make it durable before handing it out.
      await replica.#pump(true);
      return replica;
    }

    /**
     * Tab mode: the first tab to open `name` leads (IndexedDB, relay connections); the others
     * follow with an in-memory engine synced with the leader's (see tabs.js).
     */
    static async #openShared(wasm, options, name) {
      const { seed, now } = options;
      const timeout = options.lockTimeout ?? 5000;
      const tabs = await Tabs.join(platform, name);
      let storage;
      let core;
      let forkedFrom = null;
      try {
        let records;
        if (tabs.leading) {
          storage = await IndexedDbStorage.open(platform.indexedDB(), name);
          records = await storage.load();
        } else {
          // A follower starts from what the leader committed (a read-only snapshot, far
          // faster than syncing every document over the channel) as a replica of its own;
          // the session with the leader then brings only what changed since.
          const snapshot = await IndexedDbStorage.open(platform.indexedDB(), name);
          try {
            const stored = await snapshot.load();
            forkedFrom = replicaIdOf(stored);
            records = forkRecords(stored);
          } finally {
            snapshot.close();
          }
          storage = new MemoryStorage();
        }
        const coreOptions = { records, now: now ?? (() => Date.now()) };
        // Only one engine of a shared replica may use the seed: two engines drawing the same
        // Automerge actor ids would write changes that collide.
        if (seed !== undefined && tabs.leading) coreOptions.seed = seed;
        core = wasm.Core.open(coreOptions);
      } catch (e) {
        storage?.close();
        tabs.close();
        throw asWeftError(e, "Storage");
      }
      const replica = new Replica(OPEN, core, storage, name, () => tabs.close());
      replica.#tabs = tabs;
      replica.#forkSeq = tabs.leading ? 0 : core.lastSeq();
      replica.#forkOf = tabs.leading ? null : forkedFrom;
      replica.#wasm = wasm;
      replica.#now = now;
      try {
        await replica.#pump(true);
        await tabs.attach(replica.#tabDriver(), timeout);
      } catch (e) {
        await replica.close().catch(() => {});
        throw asWeftError(e, "Storage");
      }
      return replica;
    }

    /** Deletes the IndexedDB database of replica `name` (close it first). */
    static async deleteStorage(name) {
      await deleteIndexedDb(platform.indexedDB(), name);
    }

    /** The version of the weft engine inside. */
    static async version() {
      return (await loadCore()).version();
    }

    /** This replica's id (in a following tab: the id of the replica the tabs share). */
    get id() {
      const core = this.#use();
      return this.#tabs?.sharedId ?? core.replicaId();
    }

    /**
     * "leader" (this tab holds the replica's storage and relay connections), "follower" (it
     * reaches them through the leading tab), or "single" (not shared: memory storage, or no
     * Web Locks / BroadcastChannel here, or `tabs: false`).
     */
    get role() {
      return this.#tabs?.role ?? "single";
    }

    get name() {
      return this.#name;
    }

    /** "indexeddb" or "memory". */
    get storage() {
      return this.#tabs ? "indexeddb" : this.#storage.kind;
    }

    // ----- documents -------------------------------------------------------------------

    /** Creates a document in `collection`; resolves to its id once it is durable. */
    async create(collection, body) {
      const id = this.#call((core) => core.create(collection, body));
      // Its heads now, before anything else can change it.
      const heads = this.#tabs?.leading === false ? this.#call((core) => core.get(id)).heads : [];
      await this.#pump(true);
      await this.#durable(id, heads);
      return id;
    }

    /** The document `{id, collection, heads, body}`; throws NotFound / Deleted. */
    get(id) {
      return this.#call((core) => core.get(id));
    }

    /** Applies an RFC 7386 merge patch; resolves to the new heads once durable. */
    async update(id, patch) {
      const heads = this.#call((core) => core.update(id, patch));
      await this.#pump(true);
      await this.#durable(id, heads);
      return heads;
    }

    /** Sets the value at a JSON pointer ("/a/b"); resolves to the new heads once durable. */
    async set(id, path, value) {
      const heads = this.#call((core) => core.set(id, path, value));
      await this.#pump(true);
      await this.#durable(id, heads);
      return heads;
    }

    /**
     * Makes the string at `path` collaborative text (merged character by character; plain
     * strings are last-writer-wins scalars) with this content; resolves to the new heads.
     */
    async setText(id, path, text) {
      const heads = this.#call((core) => core.setText(id, path, text));
      await this.#pump(true);
      await this.#durable(id, heads);
      return heads;
    }

    /** Splices collaborative text at `path` (code point indexes); resolves to the new heads. */
    async splice(id, path, index, del, text) {
      const heads = this.#call((core) => core.splice(id, path, index, del, text));
      await this.#pump(true);
      await this.#durable(id, heads);
      return heads;
    }

    /** Deletes a document (a tombstone that wins over concurrent edits). */
    async delete(id) {
      this.#call((core) => core.delete(id));
      await this.#pump(true);
      await this.#durable(id, [], true);
    }

    /**
     * The live documents of `collection` (all collections when null/undefined) matching
     * `filter` (the CLI's --where syntax, e.g. "done = false"); `options.limit` caps them.
     */
    list(collection, filter, options = {}) {
      return this.#call((core) =>
        core.list(collection ?? null, filter ?? null, options.limit ?? null),
      );
    }

    // ----- change feed -----------------------------------------------------------------

    /**
     * Calls `callback(event)` for every committed change from now on, local or remote, in
     * feed order, after it is durable. Returns a function that unsubscribes; so does
     * aborting `options.signal`. An event is `{seq, id, collection, kind, heads, origin, at}`.
     */
    subscribe(callback, options) {
      this.#use();
      return this.#subscribers.on("change", callback, options);
    }

    /**
     * Listens to `type`: "ephemeral" (`{id, data, bytes, sender, connection, error?}`: ephemeral data
     * another session broadcast about document `id`, see `broadcast`), "change" (like
     * `subscribe`) or "role" (`{role}`: this tab took over the shared replica, see `role`).
     * Returns a function that removes the listener; so does aborting `options.signal`.
     */
    on(type, listener, options) {
      this.#use();
      if (type !== "ephemeral" && type !== "change" && type !== "role") {
        throw weftError(
          "InvalidArgument",
          `unknown event ${JSON.stringify(type)} (use "ephemeral", "change" or "role")`,
        );
      }
      return this.#subscribers.on(type, listener, options);
    }

    off(type, listener) {
      this.#subscribers.off(type, listener);
    }

    // ----- ephemeral messages ------------------------------------------------------------

    /**
     * Sends ephemeral data about document `id` (presence, cursors: anything not worth
     * storing) to every other session that may read it, through the connected relays. `data`
     * is any JSON-compatible value or a Uint8Array, CBOR-encoded on the wire as automerge-repo's
     * `handle.broadcast` does it (with cbor-x; see README), at most 64 KiB encoded
     * (else code "TooLarge"). Nothing is stored, nothing is queued: with no connection up it
     * goes nowhere. Returns how many sessions it was sent to (after pending writes commit).
     * Throws "NotFound"/"Deleted" for a document this replica does not hold.
     */
    broadcast(id, data) {
      return this.#call((core) => core.broadcast(id, data));
    }

    /** The durable change feed after `since` (exclusive), oldest first. */
    changes(since = 0, options = {}) {
      return this.#call((core) => core.changes(since, options.limit ?? null));
    }

    /** The sequence number of the newest change in the feed (0 when empty). */
    lastSeq() {
      return this.#call((core) => core.lastSeq());
    }

    // ----- bundles -----------------------------------------------------------------------

    /** Every document and tombstone as a bundle (the same format as `weft export-bundle`). */
    exportBundle() {
      return this.#call((core) => core.exportBundle());
    }

    /** Merges a bundle; resolves to the engine's report once the result is durable. */
    async importBundle(bytes) {
      if (bytes instanceof ArrayBuffer) bytes = new Uint8Array(bytes);
      const report = this.#call((core) => core.importBundle(bytes));
      await this.#pump(true);
      // A following tab has it in memory; the leading tab imports it too (merging is
      // idempotent) and answers once it is stored.
      if (this.#tabs && !this.#tabs.leading) await this.#tabs.request({ op: "import", bytes });
      return report;
    }

    // ----- sync --------------------------------------------------------------------------

    /**
     * Keeps this replica in sync with the relay at `url` (ws:// or wss://) until
     * `disconnect()`: reconnects with backoff, reports its status as events.
     */
    connect(url, options = {}) {
      this.#use();
      if (this.#tabs) return this.#tabs.connect(checkUrl(url), options);
      const { connection, handle } = newConnection(this.#driverFor(), url, options);
      this.#connections.set(connection, handle);
      handle.start();
      return connection;
    }

    /** Waits until every write made so far is durable (or throws the storage error). */
    async flushed() {
      await this.#pump(true);
      await this.#tabs?.settledWrites();
    }

    /** Disconnects, waits for pending writes, and releases the storage. */
    async close() {
      if (this.#closed) return;
      for (const connection of [...this.#connections.keys()]) connection.disconnect();
      try {
        if (!this.#failed) await this.#pump(true);
        // A following tab's writes the leader has not stored yet: wait for them (bounded).
        if (this.#tabs && !this.#failed) await this.#tabs.settledWrites(5000);
      } finally {
        this.#closed = true;
        this.#stopTicker();
        this.#storage.close();
        this.#releaseLock();
        this.#core.free?.();
        this.#core = null;
      }
    }

    // ----- the driver ------------------------------------------------------------------

    #use() {
      if (this.#failed) throw this.#failed;
      if (this.#closed) throw weftError("Closed", "the replica is closed");
      return this.#core;
    }

    /** Runs one engine call and turns what it throws into a coded Error. */
    #call(fn) {
      const core = this.#use();
      try {
        return fn(core);
      } catch (e) {
        throw asWeftError(e);
      } finally {
        // A failed command changes nothing, but pump anyway: nothing may stay behind.
        this.#pump(false);
      }
    }

    /**
     * Takes everything the Core produced into the current batch and makes sure a flush is
     * scheduled. With `wait`, returns a promise that settles when that batch was committed.
     */
    #pump(wait) {
      if (this.#failed) return wait ? Promise.reject(this.#failed) : undefined;
      if (!this.#core) return wait ? Promise.resolve() : undefined;
      const core = this.#core;
      const journal = core.takeJournal();
      const events = core.takeEvents();
      const frames = core.takeFrames();
      const sessionEvents = core.takeSessionEvents();
      if (!wait && !journal.length && !events.length && !frames.length && !sessionEvents.length) {
        return undefined;
      }
      const batch = (this.#batch ??= {
        ops: [],
        events: [],
        frames: [],
        sessionEvents: [],
        waiters: [],
      });
      for (const op of journal) batch.ops.push(op);
      for (const event of events) batch.events.push(event);
      for (const frame of frames) batch.frames.push(frame);
      for (const event of sessionEvents) batch.sessionEvents.push(event);
      let done;
      if (wait) {
        done = new Promise((resolve, reject) => batch.waiters.push({ resolve, reject }));
      }
      if (!this.#flushing) {
        this.#flushing = true;
        // A microtask later: writes made in the same turn share one transaction.
        queueMicrotask(() =>
          this.#flush().catch((e) => {
            this.#flushing = false;
            console.error("weft: flushing failed", e);
          }),
        );
      }
      return done;
    }

    async #flush() {
      while (this.#batch) {
        const batch = this.#batch;
        this.#batch = null;
        try {
          if (batch.ops.length) await this.#storage.commit(batch.ops);
        } catch (e) {
          this.#fail(asWeftError(e, "Storage"), batch);
          break;
        }
        this.#release(batch);
      }
      this.#flushing = false;
    }

    /** A committed batch: send, report, acknowledge, publish. */
    #release(batch) {
      const syncSent = new Set();
      for (const [peer, frame] of batch.frames) {
        const handle = this.#peers.get(peer);
        if (handle && handle.send(frame)) syncSent.add(peer);
      }
      for (const event of batch.sessionEvents) {
        this.#peers.get(event.peer)?.sessionEvent(event, syncSent.has(event.peer));
      }
      for (const waiter of batch.waiters) waiter.resolve();
      for (const event of batch.events) this.#subscribers.emit("change", event);
      // Requests of following tabs waiting for these documents to be stored here.
      if (this.#tabs?.leading) for (const event of batch.events) this.#tabs.changed(event.id);
    }

    /** In a following tab: resolves once the leading tab stored this write. */
    async #durable(id, heads, deleted = false) {
      if (this.#tabs && !this.#tabs.leading) await this.#tabs.durable(id, heads, deleted);
    }

    /**
     * A storage transaction failed: memory is now ahead of storage, so this replica stops
     * (every pending and later call fails with the error, every connection ends with status
     * "failed" and the error); reopening restores the last committed state.
     */
    #fail(error, batch) {
      this.#failed = error;
      const pending = [batch, this.#batch].filter(Boolean);
      this.#batch = null;
      for (const b of pending) for (const waiter of b.waiters) waiter.reject(error);
      // A leading tab stops leading (another takes over from what IndexedDB holds).
      this.#tabs?.failed(error);
      for (const handle of [...this.#connections.values()]) handle.fail(error);
      this.#stopTicker();
      console.error("weft: storage failed; reopen the replica", error);
    }

    #startTicker() {
      if (this.#ticker) return;
      this.#ticker = setInterval(() => {
        if (!this.#core || this.#failed) return;
        try {
          if (this.#core.tickWanted()) {
            this.#core.tick();
            this.#pump(false);
          }
        } catch (e) {
          console.error("weft: tick failed", e);
        }
      }, TICK_POLL_MS);
      // Node: the sockets keep the process alive, not this timer.
      this.#ticker.unref?.();
    }

    #stopTicker() {
      if (this.#ticker) clearInterval(this.#ticker);
      this.#ticker = null;
    }

    /** What the tabs sharing this replica (tabs.js) may do with it. */
    #tabDriver() {
      const replica = this;
      const session = (open) => (remote, handle) => {
        const peer = open(replica.#use(), remote);
        replica.#peers.set(peer, handle);
        replica.#startTicker();
        replica.#pump(false);
        return peer;
      };
      const driver = this.#driverFor();
      return {
        core: () => replica.#use(),
        receive: driver.receive,
        closeSession: driver.closeSession,
        flushed: () => replica.#pump(true),
        openSession: session((core, remote) => core.openSession(remote, null)),
        acceptSession: session((core, remote) => core.acceptSession(remote)),
        importBundle: (bytes) => replica.#call((core) => core.importBundle(bytes)),
        connect: (url, options) => {
          const { connection, handle } = newConnection(replica.#driverFor(), url, options);
          replica.#connections.set(connection, handle);
          handle.start();
          return connection;
        },
        ephemeral: (event) => {
          const detail = { id: event.doc, data: event.data, bytes: event.bytes, sender: event.sender, connection: null };
          if (event.error !== undefined) detail.error = asWeftError(event.error, "BadCbor");
          replica.#subscribers.emit("ephemeral", detail);
        },
        becomeLeader: () => replica.#becomeLeader(),
        roleChanged: (role) => replica.#subscribers.emit("role", { role }),
      };
    }

    /**
     * The hand-over: this following tab takes over the replica after the leading tab closed.
     * It opens the durable engine from IndexedDB, merges both ways with its in-memory one
     * (what this tab wrote that the old leader had not stored yet goes into storage; what the
     * old leader stored that had not reached this tab is published here as changes), and
     * swaps engines. Writes waiting for the old leader are answered by the caller (tabs.js).
     */
    async #becomeLeader() {
      const storage = await IndexedDbStorage.open(platform.indexedDB(), this.#name);
      let durable;
      let storedId;
      try {
        const records = await storage.load();
        storedId = replicaIdOf(records);
        durable = this.#wasm.Core.open({ records, now: this.#now ?? (() => Date.now()) });
        // This tab's pending (memory) commits first.
        await this.#pump(true);
        if (this.#closed || this.#failed) throw weftError("Closed", "the replica is closed");
      } catch (e) {
        durable?.free?.();
        storage.close();
        throw asWeftError(e, "Storage");
      }
      // From here to the swap, synchronous: no other call reaches either engine.
      const memory = this.#core;
      this.#pump(false);
      if (this.#batch) {
        // A memory engine's records and frames mean nothing to the durable one.
        this.#batch.ops = [];
        this.#batch.frames = [];
        this.#batch.sessionEvents = [];
      }
      try {
        // Both engines were one at the fork (this tab's open): what either changed since then
        // is all the other can lack — if IndexedDB still holds the replica this tab was
        // copied from, not behind the copy (deleted, recreated, restored from an older
        // state); otherwise everything goes both ways.
        const forked =
          this.#forkOf != null && storedId === this.#forkOf && durable.lastSeq() >= this.#forkSeq;
        const since = forked ? this.#forkSeq : undefined;
        durable.importBundle(memory.exportBundle(since));
        memory.importBundle(durable.exportBundle(since));
      } catch (e) {
        durable.free?.();
        storage.close();
        throw asWeftError(e, "Storage");
      }
      memory.takeJournal();
      memory.takeFrames();
      memory.takeSessionEvents();
      const unseen = memory.takeEvents(); // what this tab had not seen yet
      durable.takeEvents();
      durable.takeFrames();
      durable.takeSessionEvents();
      this.#core = durable;
      this.#storage = storage;
      memory.free?.();
      const stored = this.#pump(true);
      for (const event of unseen) this.#batch.events.push(event);
      await stored;
    }

    /** What a Connection may do with this replica: the session half of the Core. */
    #driverFor() {
      const replica = this;
      return {
        WebSocket: () => platform.WebSocket(),
        onlineEvents: platform.onlineEvents,
        helloFrame: (token, collections) => replica.#use().helloFrame(token, collections),
        handshake: (frame) => replica.#use().handshake(frame),
        pingFrame: (nonce) => replica.#use().pingFrame(nonce),
        flushed: () => replica.#pump(true),
        openSession: (connection, relay, collections) => {
          const handle = replica.#connections.get(connection);
          if (!handle) throw weftError("Closed", "the connection was closed");
          const peer = replica.#use().openSession(relay, collections);
          replica.#peers.set(peer, handle);
          replica.#startTicker();
          replica.#pump(false);
          return peer;
        },
        receive: (peer, frame) => {
          try {
            replica.#use().receive(peer, frame);
          } finally {
            replica.#pump(false);
          }
        },
        closeSession: (peer) => {
          replica.#peers.delete(peer);
          if (replica.#peers.size === 0) replica.#stopTicker();
          if (!replica.#core || replica.#failed) return;
          replica.#core.closeSession(peer);
          replica.#pump(false);
        },
        forget: (connection) => replica.#connections.delete(connection),
        ephemeral: (event) => replica.#subscribers.emit("ephemeral", event),
      };
    }
  }
  return Replica;
}

const OPEN = Symbol("Replica.open");

/** The replica id in stored records (the "replica" meta record), as hex; null if none. */
function replicaIdOf(records) {
  const meta = records.find(([table, key]) => table === "meta" && key === "replica");
  if (!(meta?.[2] instanceof Uint8Array)) return null;
  return Array.from(meta[2], (b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * The stored records of a replica as the start of another, in-memory one: the same documents
 * and change feed under a new replica id, without the original's sync states (they are about
 * its own peers).
 */
function forkRecords(records) {
  const id = new Uint8Array(16);
  globalThis.crypto.getRandomValues(id);
  return records
    .filter(([table]) => table !== "sync_states")
    .map(([table, key, value]) => (table === "meta" && key === "replica" ? [table, key, id] : [table, key, value]));
}

/**
 * One tab at a time per replica: two engines writing the same IndexedDB database would each
 * overwrite the other's records. Waits up to `timeout` ms for another holder to let go.
 */
async function lockReplica(locks, name, timeout) {
  if (!locks) return () => {};
  let release;
  const held = new Promise((resolve) => (release = resolve));
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), timeout);
  await new Promise((resolve, reject) => {
    locks
      .request(`weft:${name}`, { signal: controller.signal }, () => {
        clearTimeout(timer);
        resolve();
        return held;
      })
      .catch((e) => {
        clearTimeout(timer);
        reject(
          e?.name === "AbortError"
            ? weftError(
                "Locked",
                `replica "${name}" is open in another tab or window (one engine per IndexedDB database)`,
              )
            : asWeftError(e),
        );
      });
  });
  return () => release();
}
