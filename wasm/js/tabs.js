// One replica shared by every tab of an origin. The tab that holds the Web Lock "weft:NAME"
// leads: it holds the durable engine (IndexedDB) and the relay connections. Every other tab
// follows: it keeps the documents in an in-memory engine that syncs with the leader's over a
// BroadcastChannel, with the same replication sessions a relay uses (the leader answers as a
// relay does). Reads in a follower are therefore synchronous and local; a write is applied
// in the follower's memory at once and its promise resolves when the leader holds it in
// IndexedDB ("durable" requests below).
//
// Liveness comes from locks, not heartbeats: each tab holds "weft:NAME:tab:ID" while it is open,
// and the leader and its followers each wait on the other's tab lock, which the browser hands
// over the moment that tab closes or crashes. Followers also queue for "weft:NAME": the first
// in line becomes the next leader (see `Replica#becomeLeader`, the hand-over).
//
// Messages (all on the channel "weft:tabs:NAME", directed ones carry `to`):
//   who {}                       a follower asks which tab leads
//   leader {}                    the leader announces itself (on taking over, and to `who`)
//   open {sid, replica}          a follower starts a session (its engine's replica id)
//   welcome {sid, replica}       the leader accepted it (the durable replica's id)
//   frame {sid, bytes}           a session frame, either way
//   request {req, op, ...}       follower -> leader: durable | import | whenSynced
//   reply {req, ok, value|error} leader -> follower
//   connect {cid, url, options}  a follower's connection, held by the leader
//   disconnect {cid}
//   status {cid, state}          leader -> follower: the held connection's state
//   reset {sid}                  leader -> follower: no such session here, open a new one
//   close {}                     a follower leaves

import { Emitter } from "./emitter.js";
import { asWeftError, checkSignal, abortError, weftError } from "./errors.js";

/** The postcard variant index of `Message::Sync` in a frame (after the 3-byte header). */
const SYNC_TAG = 5;

/** Whether this environment can share a replica between tabs. */
export function tabsSupported(platform) {
  return !!platform.locks() && typeof platform.BroadcastChannel?.() === "function";
}

function randomId() {
  const bytes = new Uint8Array(8);
  globalThis.crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Holds lock `name` until the returned function is called; null if it is taken (ifAvailable). */
async function holdLock(locks, name, options = {}) {
  let release;
  const held = new Promise((resolve) => (release = resolve));
  const got = await new Promise((resolve, reject) => {
    locks
      .request(name, { ifAvailable: true, ...options }, (lock) => {
        resolve(!!lock);
        return lock ? held : undefined;
      })
      .catch(reject);
  });
  return got ? () => release() : null;
}

/**
 * Calls `gone()` once the tab holding `weft:NAME:tab:ID` has closed (its lock is free).
 * Returns a function that stops watching.
 */
function watchTab(locks, name, tab, gone) {
  const controller = new AbortController();
  locks
    .request(`weft:${name}:tab:${tab}`, { signal: controller.signal }, () => {
      if (!controller.signal.aborted) gone();
    })
    .catch(() => {}); // aborted: no longer watching
  return () => controller.abort();
}

/**
 * A tab's membership in the shared replica. `Tabs.join` decides the role; the replica then
 * `attach`es its driver (see `Replica#tabDriver`).
 */
export class Tabs {
  #locks;
  #name;
  #channel;
  #tab; // this tab's id
  #releaseTab;
  #releaseMain = null;
  #queueAbort = null;
  #driver = null;
  #closed = false;
  #leading;
  #handingOver = false;

  // Follower state.
  #leader = null; // the leading tab's id
  #unwatchLeader = null;
  #sid = 0; // this follower's session number; frames of older sessions are dropped
  #peer = null; // this follower's engine peer for the leader session
  #sharedId = null; // the durable replica's id
  #ready = null; // {promise, resolve, reject}: in sync with a leader for the first time
  #nextReq = 1;
  #requests = new Map(); // req -> {message, promise, resolve, reject}
  #views = new Map(); // cid -> SharedConnection (this tab's connections, either role)

  // Leader state.
  #followers = new Map(); // tab -> {sid, peer, unwatch, cids: Set}
  #waiting = new Map(); // doc -> [{check, done, fail}]: durable requests not yet held
  // Relay connections: (url, token, collections) key -> {key, connection, users: Map(user ->
  // stop listening)}, and each user ("tab/cid") -> the same entry.
  #held = new Map();

  constructor(locks, name, tab, channel, releaseTab, releaseMain) {
    this.#locks = locks;
    this.#tab = tab;
    this.#name = name;
    this.#channel = channel;
    this.#releaseTab = releaseTab;
    this.#releaseMain = releaseMain;
    this.#leading = !!releaseMain;
  }

  /**
   * Joins the tabs of replica `name`: takes this tab's own lock, then the leader's if it is
   * free. `leading` says which.
   */
  static async join(platform, name) {
    const locks = platform.locks();
    const BroadcastChannelImpl = platform.BroadcastChannel();
    const tab = randomId();
    const releaseTab = await holdLock(locks, `weft:${name}:tab:${tab}`);
    if (!releaseTab) throw weftError("Internal", "a fresh tab lock was taken");
    let releaseMain;
    try {
      releaseMain = await holdLock(locks, `weft:${name}`);
    } catch (e) {
      releaseTab();
      throw asWeftError(e, "Internal");
    }
    const channel = new BroadcastChannelImpl(`weft:tabs:${name}`);
    return new Tabs(locks, name, tab, channel, releaseTab, releaseMain);
  }

  get leading() {
    return this.#leading;
  }

  get role() {
    return this.#leading ? "leader" : "follower";
  }

  /** The durable replica's id, as the leader reported it (followers). */
  get sharedId() {
    return this.#sharedId;
  }

  /**
   * Starts taking part: a leader announces itself; a follower queues to lead next, finds the
   * leader and starts a session. Resolves when this tab can serve reads: at once for a
   * leader, after the first sync with the leader for a follower (or when it became leader
   * meanwhile); rejects with "Timeout" after `timeout` ms without either.
   */
  attach(driver, timeout) {
    this.#driver = driver;
    this.#channel.onmessage = (event) => this.#onMessage(event.data);
    if (this.#leading) {
      this.#announce();
      return Promise.resolve();
    }
    this.#queueForLead();
    let resolve;
    let reject;
    const promise = new Promise((res, rej) => ((resolve = res), (reject = rej)));
    this.#ready = { promise, resolve, reject };
    const timer = setTimeout(
      () =>
        reject(
          weftError(
            "Timeout",
            `replica "${this.#name}" is open in another tab, which did not answer within ${timeout} ms`,
          ),
        ),
      timeout,
    );
    promise.then(
      () => clearTimeout(timer),
      () => clearTimeout(timer),
    );
    this.#post({ type: "who" });
    return promise;
  }

  #post(message) {
    if (this.#closed) return;
    try {
      this.#channel.postMessage({ ...message, from: this.#tab });
    } catch (e) {
      console.error("weft: posting to other tabs failed", e);
    }
  }

  #onMessage(message) {
    if (this.#closed || !message || typeof message !== "object") return;
    if (message.to !== undefined && message.to !== this.#tab) return;
    try {
      if (this.#leading) this.#onLeaderMessage(message);
      else this.#onFollowerMessage(message);
    } catch (e) {
      console.error("weft: a message from another tab failed", message?.type, e);
    }
  }

  // ----- follower ------------------------------------------------------------------------

  /** Waits in line for the leader's lock; getting it means taking over. */
  #queueForLead() {
    const controller = new AbortController();
    this.#queueAbort = () => controller.abort();
    let release;
    const held = new Promise((resolve) => (release = resolve));
    this.#locks
      .request(`weft:${this.#name}`, { signal: controller.signal }, () => {
        if (this.#closed) return undefined;
        this.#releaseMain = () => release();
        this.#takeOver();
        return held;
      })
      .catch(() => {}); // aborted at close
  }

  #onFollowerMessage(message) {
    switch (message.type) {
      case "leader":
        if (message.from !== this.#leader) this.#follow(message.from);
        break;
      case "welcome":
        if (message.from === this.#leader && message.sid === this.#sid) this.#welcomed(message);
        break;
      case "frame":
        if (message.from === this.#leader && message.sid === this.#sid && this.#peer != null) {
          try {
            this.#driver.receive(this.#peer, message.bytes);
          } catch (e) {
            console.error("weft: a bad frame from the leading tab; starting over", e);
            this.#openSession();
          }
        }
        break;
      case "reply": {
        const request = this.#requests.get(message.req);
        if (!request || message.from !== this.#leader) break;
        this.#requests.delete(message.req);
        if (message.ok) request.resolve(message.value);
        else request.reject(weftError(message.error.code, message.error.message));
        break;
      }
      case "status":
        if (message.from === this.#leader) this.#views.get(message.cid)?._state(message.state);
        break;
      case "reset":
        // The leader holds no session of ours under this number: start again.
        if (message.from === this.#leader && message.sid === this.#sid) this.#openSession();
        break;
      default:
        break;
    }
  }

  /** Follows the tab `leader`: watch it, start a session with it. */
  #follow(leader) {
    this.#dropLeader();
    this.#leader = leader;
    this.#unwatchLeader = watchTab(this.#locks, this.#name, leader, () => {
      if (this.#leader !== leader || this.#leading) return;
      this.#dropLeader();
      for (const view of this.#views.values()) view._leaderLost();
      // The next leader announces itself; ask too, in case it did before we noticed.
      this.#post({ type: "who" });
    });
    this.#openSession();
  }

  #dropLeader() {
    this.#unwatchLeader?.();
    this.#unwatchLeader = null;
    this.#leader = null;
    this.#endSession();
  }

  #openSession() {
    this.#endSession();
    this.#sid += 1;
    this.#post({
      type: "open",
      to: this.#leader,
      sid: this.#sid,
      replica: this.#driver.core().replicaId(),
    });
  }

  #endSession() {
    if (this.#peer == null) return;
    const peer = this.#peer;
    this.#peer = null;
    this.#driver.closeSession(peer);
  }

  #welcomed(message) {
    this.#sharedId = message.replica;
    const sid = this.#sid;
    const leader = this.#leader;
    this.#peer = this.#driver.openSession(message.replica, {
      send: (bytes) => {
        if (this.#sid !== sid || this.#leader !== leader) return false;
        this.#post({ type: "frame", to: leader, sid, bytes });
        return bytes[3] === SYNC_TAG;
      },
      sessionEvent: (event, sentSync) => {
        if (this.#sid !== sid) return;
        if (event.kind === "insync" && !sentSync) this.#ready?.resolve();
        else if (event.kind === "closed") this.#openSession();
        else if (event.kind === "ephemeral") this.#driver.ephemeral(event);
      },
    });
    // What this tab still waits for goes to the new leader.
    for (const [req, { message: m }] of this.#requests) this.#post({ ...m, to: leader, req });
    for (const view of this.#views.values()) this.#post(view._connectMessage(leader));
  }

  /** Sends a request to the leader (again to each new one) until it answers. */
  request(message) {
    if (this.#leading) return this.#serve(message, null);
    const req = this.#nextReq++;
    const entry = { message: { type: "request", ...message } };
    entry.promise = new Promise((resolve, reject) => {
      entry.resolve = resolve;
      entry.reject = reject;
    });
    this.#requests.set(req, entry);
    if (this.#peer != null) this.#post({ ...entry.message, to: this.#leader, req });
    return entry.promise;
  }

  /** Resolves when the write that left document `id` at `heads` (or deleted it) is durable. */
  durable(id, heads, deleted = false) {
    if (this.#leading) return Promise.resolve();
    return this.request({ op: "durable", doc: id, heads: heads ?? [], deleted });
  }

  /** Requests still waiting for an answer. */
  get pendingRequests() {
    return this.#requests.size;
  }

  // ----- hand-over -------------------------------------------------------------------------

  async #takeOver() {
    this.#handingOver = true;
    this.#dropLeader();
    for (const view of this.#views.values()) view._leaderLost();
    try {
      await this.#driver.becomeLeader();
    } catch (e) {
      // This tab cannot open the durable replica: let the next one in line try.
      console.error("weft: taking over the replica failed", e);
      this.#handingOver = false;
      const release = this.#releaseMain;
      this.#releaseMain = null;
      release?.();
      this.#ready?.reject(asWeftError(e, "Storage"));
      if (!this.#closed) this.#queueForLead();
      return;
    }
    this.#handingOver = false;
    if (this.#closed) return;
    this.#leading = true;
    this.#sharedId = null;
    this.#ready?.resolve();
    // What this tab asked the old leader, it now answers itself.
    const requests = [...this.#requests.values()];
    this.#requests.clear();
    for (const r of requests) this.#serve(r.message, null).then(r.resolve, r.reject);
    for (const view of this.#views.values()) this.#hold(null, view._cid, view.url, view._options);
    this.#announce();
    this.#driver.roleChanged("leader");
  }

  // ----- leader ----------------------------------------------------------------------------

  #announce() {
    this.#post({ type: "leader" });
  }

  #onLeaderMessage(message) {
    const from = message.from;
    switch (message.type) {
      case "who":
        this.#announce();
        break;
      case "open":
        this.#accept(from, message.sid, message.replica);
        break;
      case "frame": {
        const follower = this.#followers.get(from);
        if (!follower || follower.sid !== message.sid) {
          // A session this tab does not hold (ended here, or begun with an earlier leader):
          // the follower starts a new one (frames of its older sessions are ignored there).
          this.#post({ type: "reset", to: from, sid: message.sid });
          break;
        }
        try {
          this.#driver.receive(follower.peer, message.bytes);
        } catch (e) {
          console.error("weft: a bad frame from a following tab; ending its session", e);
          this.#release(from);
          this.#post({ type: "reset", to: from, sid: message.sid });
        }
        break;
      }
      case "request":
        this.#serve(message, from).then(
          (value) => this.#post({ type: "reply", to: from, req: message.req, ok: true, value }),
          (e) => {
            const error = asWeftError(e);
            this.#post({
              type: "reply",
              to: from,
              req: message.req,
              ok: false,
              error: { code: error.code, message: error.message },
            });
          },
        );
        break;
      case "connect":
        if (this.#followers.has(from)) {
          this.#followers.get(from).cids.add(message.cid);
          this.#hold(from, message.cid, message.url, message.options);
        }
        break;
      case "disconnect":
        this.#followers.get(from)?.cids.delete(message.cid);
        this.#unhold(from, message.cid);
        break;
      case "close":
        this.#release(from);
        break;
      default:
        break;
    }
  }

  /** A follower's session: the leader answers as a relay does. */
  #accept(tab, sid, replica) {
    const old = this.#followers.get(tab);
    if (old) this.#release(tab, { keepWatch: true });
    let peer;
    try {
      peer = this.#driver.acceptSession(replica, {
        send: (bytes) => {
          const f = this.#followers.get(tab);
          if (!f || f.sid !== sid) return false;
          this.#post({ type: "frame", to: tab, sid, bytes });
          return bytes[3] === SYNC_TAG;
        },
        sessionEvent: (event) => {
          if (event.kind === "ephemeral") this.#driver.ephemeral(event);
        },
      });
    } catch (e) {
      console.error("weft: accepting a tab's session failed", e);
      return;
    }
    const unwatch = old?.unwatch ?? watchTab(this.#locks, this.#name, tab, () => this.#release(tab));
    this.#followers.set(tab, { sid, peer, unwatch, cids: old?.cids ?? new Set() });
    // Before any frame of the session (frames leave after the next commit).
    this.#post({ type: "welcome", to: tab, sid, replica: this.#driver.core().replicaId() });
  }

  /** A follower left (closed, crashed, or broke the protocol): end its session and connections. */
  #release(tab, { keepWatch = false } = {}) {
    const follower = this.#followers.get(tab);
    if (!follower) return;
    this.#followers.delete(tab);
    this.#driver.closeSession(follower.peer);
    if (!keepWatch) {
      follower.unwatch();
      for (const cid of follower.cids) this.#unhold(tab, cid);
    }
  }

  /** Answers a request (from follower `tab`, or this tab's own after a take-over). */
  async #serve(message, tab) {
    switch (message.op) {
      case "durable":
        return this.#whenHeld(message.doc, message.heads, message.deleted);
      case "import": {
        const report = this.#driver.importBundle(message.bytes);
        await this.#driver.flushed();
        return report;
      }
      case "whenSynced": {
        const held = this.#held.get(this.#holdKey(tab, message.cid));
        if (!held) throw weftError("Closed", "the connection was closed");
        await this.#driver.flushed();
        await held.connection.whenSynced({ timeout: message.timeout ?? undefined });
        return null;
      }
      default:
        throw weftError("InvalidArgument", `unknown request ${JSON.stringify(message.op)}`);
    }
  }

  /** Resolves once this (the durable) replica holds the write and it is committed. */
  async #whenHeld(doc, heads, deleted) {
    const holds = () => this.#driver.core().holds(doc, heads, deleted);
    if (!holds()) {
      // Change events are published after their commit: check again on each for `doc`.
      await new Promise((resolve, reject) => {
        const list = this.#waiting.get(doc) ?? [];
        list.push({ check: holds, done: resolve, fail: reject });
        this.#waiting.set(doc, list);
      });
      return null;
    }
    await this.#driver.flushed();
    return null;
  }

  /** The leader's replica committed a change of `doc`: answer the requests it settles. */
  changed(doc) {
    const list = this.#waiting.get(doc);
    if (!list) return;
    const still = [];
    for (const w of list) {
      let held;
      try {
        held = w.check();
      } catch (e) {
        w.fail(e);
        continue;
      }
      if (held) w.done();
      else still.push(w);
    }
    if (still.length) this.#waiting.set(doc, still);
    else this.#waiting.delete(doc);
  }

  // ----- relay connections (held by the leader, shared by every tab) ----------------------

  #holdKey(tab, cid) {
    return `${tab ?? this.#tab}/${cid}`;
  }

  /** Opens (or joins) the relay connection a tab's `connect()` asked for. */
  #hold(tab, cid, url, options) {
    const key = JSON.stringify([url, options?.token ?? null, options?.collections ?? null]);
    let shared = this.#held.get(key);
    if (!shared) {
      shared = { key, connection: this.#driver.connect(url, options), users: new Map() };
      this.#held.set(key, shared);
    }
    const user = this.#holdKey(tab, cid);
    if (this.#held.has(user)) {
      // Asked again (a follower's new session): it is held already; say how it is.
      const state = connectionState(this.#held.get(user).connection);
      if (tab != null) this.#post({ type: "status", to: tab, cid, state });
      return;
    }
    const report = () => {
      const state = connectionState(shared.connection);
      // This tab's own views get the connection's very error objects.
      if (tab == null) this.#views.get(cid)?._state(state, shared.connection.error);
      else this.#post({ type: "status", to: tab, cid, state });
    };
    const offs = [shared.connection.on("status", report), shared.connection.on("error", report)];
    shared.users.set(user, () => offs.forEach((off) => off()));
    this.#held.set(user, shared);
    report();
  }

  #unhold(tab, cid) {
    const user = this.#holdKey(tab, cid);
    const shared = this.#held.get(user);
    if (!shared) return;
    this.#held.delete(user);
    shared.users.get(user)?.();
    shared.users.delete(user);
    if (shared.users.size === 0) {
      this.#held.delete(shared.key);
      shared.connection.disconnect();
    }
  }

  // ----- this tab's connections --------------------------------------------------------------

  /** `replica.connect` in tab mode: a view of a connection the leader holds. */
  connect(url, options) {
    const view = newView(this, url, options);
    this.#views.set(view._cid, view);
    if (this.#leading) this.#hold(null, view._cid, view.url, view._options);
    else if (this.#peer != null) this.#post(view._connectMessage(this.#leader));
    else view._leaderLost();
    return view;
  }

  _disconnect(view) {
    this.#views.delete(view._cid);
    if (this.#leading) this.#unhold(null, view._cid);
    else if (this.#leader) this.#post({ type: "disconnect", to: this.#leader, cid: view._cid });
  }

  async _whenSynced(view, timeout) {
    await this.#driver.flushed();
    await this.settledWrites();
    return this.request({ op: "whenSynced", cid: view._cid, timeout: timeout ?? null });
  }

  /**
   * Resolves when every write this tab made so far is stored by the leader (or failed), or
   * after `timeout` ms.
   */
  settledWrites(timeout) {
    const all = [...this.#requests.values()].filter((r) => r.message.op !== "whenSynced");
    const settled = Promise.allSettled(all.map((r) => r.promise));
    if (timeout == null || all.length === 0) return settled;
    let timer;
    return Promise.race([
      settled,
      new Promise((resolve) => (timer = setTimeout(resolve, timeout))),
    ]).finally(() => clearTimeout(timer));
  }

  // ----- leaving ---------------------------------------------------------------------------

  /**
   * This tab's storage failed (its engine is ahead of IndexedDB): its own connections end
   * with status "failed" and that error, and it stops leading, so that another tab takes over
   * from what IndexedDB committed. The writes other tabs wait for are not answered here: they
   * go again to the next leader.
   */
  failed(error) {
    if (this.#closed) return;
    for (const view of this.#views.values()) view._fail(error);
    this.close({ answer: false });
  }

  /** Leaves: ends every session and held connection, lets go of the locks. */
  close({ answer = true } = {}) {
    if (this.#closed) return;
    for (const view of [...this.#views.values()]) view.disconnect();
    if (this.#leading) {
      for (const tab of [...this.#followers.keys()]) this.#release(tab);
      for (const shared of new Set(this.#held.values())) shared.connection.disconnect();
      this.#held.clear();
    } else {
      if (this.#leader) this.#post({ type: "close", to: this.#leader });
      this.#dropLeader();
    }
    // Unanswered, a follower asks the next leader; answered "Closed", it would give up.
    if (answer) {
      for (const list of this.#waiting.values()) {
        for (const w of list) w.fail(weftError("Closed", "the replica is closed"));
      }
    }
    this.#waiting.clear();
    for (const r of this.#requests.values()) {
      r.reject(weftError("Closed", "the replica closed before the tab holding it answered"));
    }
    this.#requests.clear();
    this.#closed = true;
    this.#channel.onmessage = null;
    this.#channel.close();
    this.#queueAbort?.();
    this.#releaseMain?.();
    this.#releaseTab();
  }
}

/** What a follower needs to mirror a connection. */
function connectionState(connection) {
  const error = connection.error;
  return {
    status: connection.status,
    error: error ? { code: error.code, message: error.message } : null,
    reason: connection.reason,
    granted: connection.granted ?? null,
    refused: connection.refused,
  };
}

let newView;

/**
 * A tab's connection to a relay when the replica is shared by tabs: the leading tab holds
 * the one WebSocket per relay (and token and collections); every tab's `connect()` returns
 * one of these, with the same members as `Connection`, mirroring that socket's status.
 */
export class SharedConnection {
  static #next = 1;
  #tabs;
  #url;
  #options;
  #cid = SharedConnection.#next++;
  #events = new Emitter();
  #state = { status: "connecting", error: null, reason: null, granted: null, refused: [] };
  #error = null; // the WeftError of #state.error
  #closed = false;

  static {
    newView = (tabs, url, options) => new SharedConnection(CREATE, tabs, url, options);
  }

  constructor(token, tabs, url, options = {}) {
    if (token !== CREATE) {
      throw weftError("InvalidArgument", "use `replica.connect(url, options)` to make a Connection");
    }
    this.#tabs = tabs;
    this.#url = url;
    // Only what can cross to another tab.
    const { token: t, collections, reconnect, initialBackoff, maxBackoff, keepalive } = options;
    this.#options = { token: t, collections, reconnect, initialBackoff, maxBackoff, keepalive };
  }

  get url() {
    return this.#url;
  }
  get status() {
    return this.#state.status;
  }
  get error() {
    return this.#error;
  }
  get reason() {
    return this.#state.reason;
  }
  get granted() {
    return this.#state.granted ?? undefined;
  }
  get refused() {
    return [...this.#state.refused];
  }

  on(type, listener, options) {
    return this.#events.on(type, listener, options);
  }
  off(type, listener) {
    this.#events.off(type, listener);
  }

  /** Like `Connection.whenSynced`: this tab's writes durable, then the leader's socket in sync. */
  whenSynced(options = {}) {
    let signal;
    try {
      signal = checkSignal(options.signal);
    } catch (e) {
      return Promise.reject(e);
    }
    if (this.#state.status === "failed") return Promise.reject(this.#error);
    if (this.#closed || this.#state.status === "closed") {
      return Promise.reject(weftError("Closed", "the connection was closed"));
    }
    if (signal?.aborted) return Promise.reject(abortError(signal, "whenSynced"));
    const synced = this.#tabs._whenSynced(this, options.timeout);
    if (!signal) return synced;
    return new Promise((resolve, reject) => {
      const onAbort = () => reject(abortError(signal, "whenSynced"));
      signal.addEventListener("abort", onAbort, { once: true });
      synced.then(resolve, reject).finally(() => signal.removeEventListener("abort", onAbort));
    });
  }

  /** Like `Connection.disconnect`: "closed", unless it already ended ("rejected", "failed"). */
  disconnect() {
    if (this.#closed) return;
    this.#tabs._disconnect(this);
    if (this.#state.status !== "rejected" && this.#state.status !== "failed") {
      this.#set({ ...this.#state, status: "closed", error: null });
    }
    this.#closed = true;
  }

  get _cid() {
    return this.#cid;
  }
  get _options() {
    return this.#options;
  }
  _connectMessage(leader) {
    return { type: "connect", to: leader, cid: this.#cid, url: this.#url, options: this.#options };
  }

  /** The leader's socket changed state (`error`: its error object, in the leading tab). */
  _state(state, error) {
    if (this.#closed) return;
    this.#set(state, error);
  }

  /** This (leading) tab's storage failed: the connection ends, "failed" with that error. */
  _fail(error) {
    if (this.#closed) return;
    this.#set({ ...this.#state, status: "failed", error: { code: error.code, message: error.message } }, error);
  }

  /** The leading tab is gone; until the next one reconnects, this tab is offline. */
  _leaderLost() {
    if (this.#closed) return;
    this.#set({
      ...this.#state,
      status: "offline",
      error: {
        code: "Offline",
        message: "the tab that held the relay connection closed; another tab takes over",
      },
    });
  }

  #set(state, error) {
    const before = this.#state;
    this.#state = state;
    const e = state.error;
    if (error !== undefined) this.#error = error;
    else if (!e) this.#error = null;
    else if (!this.#error || this.#error.code !== e.code || this.#error.message !== e.message) {
      this.#error = weftError(e.code, e.message);
    }
    const refusedBefore = new Set(before.refused.map((r) => r.doc));
    for (const refusal of state.refused) {
      if (!refusedBefore.has(refusal.doc)) this.#events.emit("error", refusal);
    }
    if (state.status === before.status && state.status !== "offline") return;
    const event = { status: state.status };
    if (this.#error) event.error = this.#error;
    if (state.reason) event.reason = state.reason;
    this.#events.emit("status", event);
    this.#events.emit(state.status, event);
  }
}

const CREATE = Symbol("SharedConnection");
