// Type declarations of the `weft` package (the same API in browsers and Node).

/** A JSON value as documents hold it. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };
/** A document body: a JSON object. */
export type JsonObject = { [key: string]: Json };

/**
 * What went wrong. From the engine: "NotFound", "Deleted", "InvalidId", "InvalidCollection",
 * "InvalidJson", "BadPath", "NotText", "BadFilter", "BadBundle", "UnknownHeads", "Corrupt",
 * "Protocol", "Limit" (a document or value nested deeper than 100 levels, or beyond the other
 * structure limits; the message names the limit), "TooLarge" (ephemeral data over 64 KiB),
 * "BadCbor" (ephemeral data from a peer that is not CBOR), ...; from the JS layer: "InvalidArgument", "Storage" (IndexedDB failed: reopen
 * the replica), "Unsupported", "Locked", "Closed", "BadUrl", "Offline", "Rejected", "Timeout",
 * "Aborted", "Internal". Codes are stable; new ones may be added.
 */
export type WeftErrorCode =
  | "NotFound"
  | "Deleted"
  | "InvalidId"
  | "InvalidCollection"
  | "InvalidJson"
  | "BadPath"
  | "NotText"
  | "BadFilter"
  | "BadBundle"
  | "UnknownHeads"
  | "Corrupt"
  | "Protocol"
  | "Limit"
  | "TooLarge"
  | "BadCbor"
  | "InvalidArgument"
  | "Storage"
  | "Unsupported"
  | "Locked"
  | "Closed"
  | "BadUrl"
  | "Offline"
  | "Rejected"
  | "Timeout"
  | "Aborted"
  | "Internal"
  | (string & {});

/**
 * Every error the API throws or rejects with (errors of the engine included): an `Error` with
 * a string `code`. `error instanceof WeftError` holds for all of them.
 */
export declare class WeftError extends Error {
  /** `options.cause` becomes `cause`; any other field of `options` is copied onto the error. */
  constructor(code: WeftErrorCode, message: string, options?: { cause?: unknown; [field: string]: unknown });
  /** What went wrong (see `WeftErrorCode`). */
  code: WeftErrorCode;
  /** "Offline" errors of a closed socket: the WebSocket close code. */
  closeCode?: number;
  /** "Rejected": the relay's code and reason, e.g. "Unauthorized: token expired". */
  reason?: string;
  /** "Rejected": the relay's code alone, e.g. "Unauthorized". */
  rejectCode?: string;
  /** "Timeout" from `whenSynced`: the connection's status then (its last error is `cause`). */
  status?: Status;
  /** What caused it: for "Storage", the IndexedDB error; for "Aborted", the signal's reason. */
  cause?: unknown;
}

/** Options of a listener: aborting `signal` removes it. */
export interface ListenerOptions {
  signal?: AbortSignal;
}

export interface WhenSyncedOptions {
  /** Reject with code "Timeout" after this many ms. */
  timeout?: number;
  /** Reject with code "Aborted" (the signal's reason as `cause`) when this aborts. */
  signal?: AbortSignal;
}

export interface Document {
  id: string;
  collection: string;
  /** The document's current heads (hex change hashes). */
  heads: string[];
  body: JsonObject;
}

export interface ChangeEvent {
  /** Position in this replica's change feed (strictly increasing). */
  seq: number;
  id: string;
  collection: string;
  kind: "created" | "updated" | "deleted";
  heads: string[];
  /** Where the change came from ("local", or the peer's replica id). */
  origin: string;
  /** Milliseconds since the epoch, when this replica committed it. */
  at: number;
}

export interface ImportReport {
  created: number;
  updated: number;
  deleted: number;
  unchanged: number;
}

export interface OpenOptions {
  /** The replica's name: its IndexedDB database is "weft:NAME". Default "weft". */
  name?: string;
  /** Where the documents live. Default "indexeddb" where IndexedDB exists, else "memory". */
  storage?: "indexeddb" | "memory";
  /**
   * Fixes the engine's random choices (ids, actors): for tests and replays. In a replica shared
   * by tabs only the first (leading) tab's engine uses it.
   */
  seed?: number;
  /** The clock, in ms since the epoch. Default `Date.now`. */
  now?: () => number;
  /**
   * Share the replica with the other tabs of this origin (default true where Web Locks and
   * BroadcastChannel exist, with storage "indexeddb"): the first tab leads (IndexedDB, relay
   * connections), the others follow through it; see `Replica.role`. With `false`, a second
   * tab waits up to `lockTimeout` and then fails with code "Locked".
   */
  tabs?: boolean;
  /**
   * How long (ms) a following tab waits for the leading tab's first sync (then code
   * "Timeout"), or, with `tabs: false`, for another tab to close the replica (then code
   * "Locked"). Default 5000.
   */
  lockTimeout?: number;
}

/** Which part this tab plays in a replica shared by tabs (see `OpenOptions.tabs`). */
export type Role = "leader" | "follower" | "single";

export interface RoleEvent {
  /** The new role: "leader" when this tab took over after the leading tab closed. */
  role: Role;
}

export interface ListOptions {
  limit?: number;
}

export interface ChangesOptions {
  limit?: number;
}

export interface ConnectOptions {
  /** A token (JWT) for relays started with --auth-secret-file. */
  token?: string;
  /** The collections to sync (default: all the token may read). */
  collections?: string[];
  /** Reconnect after the connection drops (default true). */
  reconnect?: boolean;
  /** First reconnect delay in ms (default 200); doubles, with jitter, up to `maxBackoff`. */
  initialBackoff?: number;
  /** Longest reconnect delay in ms (default 30000). */
  maxBackoff?: number;
  /**
   * A relay silent for this many ms gets a ping; silent for twice as long, the connection
   * counts as lost and is redialed (default 30000).
   */
  keepalive?: number;
}

/**
 * "connecting" -> "connected" (changes in flight) <-> "synced"; "offline" (reconnects with
 * backoff); terminal: "rejected" (by the relay), "failed" (the replica's storage failed; error
 * code "Storage"), "closed" (after `disconnect()`).
 */
export type Status = "connecting" | "connected" | "synced" | "offline" | "rejected" | "failed" | "closed";

export interface StatusEvent {
  status: Status;
  /**
   * For "offline": why (code "Offline"); for "rejected": code "Rejected"; for "failed": the
   * storage error (code "Storage").
   */
  error?: WeftError;
  /** For "rejected": the relay's code and reason, e.g. "Unauthorized: token expired". */
  reason?: string;
  code?: string;
}

export interface RelayError {
  /** e.g. "Forbidden" (the token may not write this document's collection), "RateLimited". */
  code: string;
  message: string;
  doc: string | null;
}

/**
 * Ephemeral data: any JSON-compatible value, or bytes. CBOR on the wire, as automerge-repo's
 * `handle.broadcast` writes it (cbor-x, `useRecords: false`, `tagUint8Array: false`): integers
 * that fit 32 bits as CBOR integers, other numbers as floats, a Uint8Array as a byte string,
 * objects as maps with text keys (`undefined` properties left out). Received maps become plain
 * objects, byte strings Uint8Arrays, tags their content.
 */
export type EphemeralData = Json | Uint8Array | EphemeralData[] | { [key: string]: EphemeralData | undefined };

/** Ephemeral data (presence, cursors) another session broadcast about a document. */
export interface EphemeralEvent {
  /** The document it is about. */
  id: string;
  /** The data, decoded from CBOR; undefined when the bytes were not CBOR (see `error`). */
  data: EphemeralData | undefined;
  /** The bytes as they came (CBOR). */
  bytes: Uint8Array;
  /**
   * Who sent it, as the relay names its sessions: a weft replica's id, an automerge-repo
   * client's peer id. The relay fills it in; nobody can send in another session's name.
   */
  sender: string;
  /** The connection it came through; null when it came through another tab (tab mode). */
  connection: Connection | null;
  /** Why `data` is undefined: code "BadCbor". Never thrown: the event is still delivered. */
  error?: WeftError;
}

export interface ReplicaEvents {
  ephemeral: EphemeralEvent;
  change: ChangeEvent;
  role: RoleEvent;
}

export interface ConnectionEvents {
  status: StatusEvent;
  connecting: StatusEvent;
  connected: StatusEvent;
  synced: StatusEvent;
  offline: StatusEvent;
  rejected: StatusEvent;
  failed: StatusEvent;
  closed: StatusEvent;
  error: RelayError;
  ephemeral: EphemeralEvent;
}

/**
 * A live connection to a relay, from `replica.connect(url)`. In a replica shared by tabs the
 * leading tab holds one WebSocket per relay (and token and collections) for every tab, and
 * each tab's Connection mirrors its status; while no tab leads (between a leader closing and
 * the next taking over) the status is "offline". There, ephemeral messages arrive through
 * `replica.on("ephemeral")` only, not as the connection's "ephemeral" events.
 */
export declare class Connection {
  private constructor();
  readonly url: string;
  readonly status: Status;
  /** Why the connection is offline or failed, or null. */
  readonly error: WeftError | null;
  /** Why the relay rejected the session, or null. */
  readonly reason: string | null;
  /** The collections the relay granted in the latest session (null: all); undefined before. */
  readonly granted: string[] | null | undefined;
  /** Documents the relay refused to take from this replica. */
  readonly refused: RelayError[];
  /** Adds a listener; returns a function that removes it (so does aborting `options.signal`). */
  on<K extends keyof ConnectionEvents>(
    type: K,
    listener: (event: ConnectionEvents[K]) => void,
    options?: ListenerOptions,
  ): () => void;
  off<K extends keyof ConnectionEvents>(type: K, listener: (event: ConnectionEvents[K]) => void): void;
  /**
   * Resolves when the replica is in sync with the relay, every write made before the call
   * included; rejects on "rejected" (code "Rejected"), a storage failure ("Storage"),
   * disconnect ("Closed"), a lost connection without reconnect ("Offline"), after `timeout` ms
   * ("Timeout"), or when `signal` aborts ("Aborted").
   */
  whenSynced(options?: WhenSyncedOptions): Promise<void>;
  /** Closes the socket and stops reconnecting (status "closed", unless it already ended). */
  disconnect(): void;
}

/**
 * A replica: documents in memory (the weft engine, WebAssembly), persisted to IndexedDB.
 * Writes resolve once durable; reads are synchronous.
 *
 * Shared by tabs (the default for IndexedDB in browsers): every tab of the origin that opens
 * the same name gets the same replica. Reads stay synchronous in every tab: a following tab
 * keeps its own in-memory copy, which receives other tabs' committed writes within
 * milliseconds (its "change" events fire then); a write in a following tab is visible in
 * that tab at once and resolves when the leading tab has stored it in IndexedDB (retried
 * through the next leader if the leading tab closes first). `changes()`/`lastSeq()` and the
 * `seq` of change events count this tab's copy: sequence numbers differ between tabs and the
 * durable, resumable feed is the leading tab's.
 */
export declare class Replica {
  private constructor();
  /** Opens (or creates) a replica. */
  static open(options?: OpenOptions): Promise<Replica>;
  /** Deletes the IndexedDB database of a (closed) replica. */
  static deleteStorage(name: string): Promise<void>;
  /** The weft engine's version. */
  static version(): Promise<string>;

  readonly id: string;
  readonly name: string;
  readonly storage: "indexeddb" | "memory";
  /**
   * "leader": this tab holds the shared replica's storage and relay connections; "follower":
   * it reaches them through the leading tab; "single": not shared. A "role" event says when a
   * following tab took over.
   */
  readonly role: Role;

  /** Creates a document; resolves to its id once durable. */
  create(collection: string, body: JsonObject): Promise<string>;
  /** Reads a document; throws code "NotFound" or "Deleted". */
  get(id: string): Document;
  /** RFC 7386 merge patch; resolves to the new heads once durable. */
  update(id: string, patch: JsonObject): Promise<string[]>;
  /** Sets the value at a JSON pointer ("/a/b"); resolves to the new heads. */
  set(id: string, path: string, value: Json): Promise<string[]>;
  /**
   * Makes the string at a JSON pointer collaborative text with this content (strings are
   * last-writer-wins scalars until then); resolves to the new heads.
   */
  setText(id: string, path: string, text: string): Promise<string[]>;
  /** Splices collaborative text at a JSON pointer (see `setText`); indexes count code points. */
  splice(id: string, path: string, index: number, del: number, text: string): Promise<string[]>;
  /** Deletes a document (a tombstone that wins over concurrent edits). */
  delete(id: string): Promise<void>;
  /** Live documents of a collection (null: all) matching a filter like "done = false". */
  list(collection?: string | null, filter?: string | null, options?: ListOptions): Document[];

  /**
   * Calls back for every committed change (local and remote) once durable; returns unsubscribe
   * (so does aborting `options.signal`).
   */
  subscribe(callback: (event: ChangeEvent) => void, options?: ListenerOptions): () => void;
  /**
   * Listens to "ephemeral" (data other sessions broadcast about documents this replica holds),
   * "change" (like `subscribe`) or "role" (this tab took over the shared replica); returns a function that removes the listener (so does
   * aborting `options.signal`).
   */
  on<K extends keyof ReplicaEvents>(
    type: K,
    listener: (event: ReplicaEvents[K]) => void,
    options?: ListenerOptions,
  ): () => void;
  off<K extends keyof ReplicaEvents>(type: K, listener: (event: ReplicaEvents[K]) => void): void;
  /**
   * Sends ephemeral data (presence, cursors; never stored) about a document this replica holds
   * to every other session that may read it, through the connected relays; CBOR-encoded (see
   * `EphemeralData`), at most 64 KiB encoded (else code "TooLarge"). Returns how many
   * sessions it went to (0 when offline: nothing is queued); in a following tab, 1: the
   * leading tab, which passes it on to the relays and the other tabs.
   */
  broadcast(id: string, data: EphemeralData): number;

  /** The durable change feed after `since`. */
  changes(since?: number, options?: ChangesOptions): ChangeEvent[];
  /** The newest change's sequence number (0 when none). */
  lastSeq(): number;

  /** Every document and tombstone as a bundle (weft's bundle file format). */
  exportBundle(): Uint8Array;
  /** Merges a bundle; resolves once durable. */
  importBundle(bytes: Uint8Array | ArrayBuffer): Promise<ImportReport>;

  /** Syncs live with the relay at `url` (ws:// or wss://) until `disconnect()`. */
  connect(url: string, options?: ConnectOptions): Connection;
  /** Resolves once every write made so far is durable. */
  flushed(): Promise<void>;
  /** Disconnects, waits for pending writes, releases the storage (and the tab lock). */
  close(): Promise<void>;
}

/**
 * Bytes of WebAssembly memory the engine holds in this page (it only grows: the high-water
 * mark of every replica opened here); 0 before it loaded. Browser build only.
 */
export declare function wasmMemoryBytes(): number;

/**
 * Loads the WebAssembly module (`Replica.open` does it on first use). Browsers fetch it next
 * to this package's files unless given `module_or_path`.
 */
export declare function init(options?: {
  module_or_path?: string | URL | Request | Response | BufferSource | WebAssembly.Module;
}): Promise<unknown>;
