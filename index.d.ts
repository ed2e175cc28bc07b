// Public types of ultimate-streaming. The native binding's generated types are in
// native/index.d.ts; this file describes the JavaScript API users call.

import { EventEmitter } from 'node:events';

/**
 * Stable error codes. Every error the package throws or rejects with is a `UspError` whose
 * `code` is one of these:
 *
 * - `USP_INVALID_CONFIG` — the configuration is invalid; the message names the option.
 * - `USP_UNSUPPORTED_BACKEND` — the backend cannot do this (watch() on the embedded store, while polling, or at run time with options.redis).
 * - `USP_INVALID_KEY` — the key is not a non-empty string of at most `maxKeyLength` characters without NUL.
 * - `USP_INVALID_VALUE` — the value cannot be stored as JSON (undefined, function, symbol, BigInt, circular).
 * - `USP_VALUE_TOO_LARGE` — the value is larger than `maxValueSize` bytes as JSON (default 16 MiB).
 * - `USP_INVALID_ARGUMENT` — another argument is wrong (listener options, a config given twice).
 * - `USP_NOT_INITIALIZED` — a data method was called before `init()` resolved.
 * - `USP_CLOSED` — the streamer is closed.
 * - `USP_ALREADY_INITIALIZED` — `init(config)` was called again with a new config.
 * - `USP_DB_UNAVAILABLE` — the database cannot be opened or reached.
 * - `USP_DB_ERROR` — the database refused the statement or the connection (wrong password, unknown database, binlog not usable); nothing was written.
 * - `USP_DB_BUSY` — the database stayed locked by another process past the busy timeout; retry.
 * - `USP_OVERLOADED` — more operations are waiting than `writeQueueSize`; await earlier calls.
 * - `USP_LISTENER_ERROR` — a listener threw (reported on `'error'`); delivery to others continued.
 * - `USP_INTERNAL` — an engine invariant failed; please report it.
 */
export type UspErrorCode =
  | 'USP_INVALID_CONFIG'
  | 'USP_UNSUPPORTED_BACKEND'
  | 'USP_INVALID_KEY'
  | 'USP_INVALID_VALUE'
  | 'USP_VALUE_TOO_LARGE'
  | 'USP_INVALID_ARGUMENT'
  | 'USP_NOT_INITIALIZED'
  | 'USP_CLOSED'
  | 'USP_ALREADY_INITIALIZED'
  | 'USP_DB_UNAVAILABLE'
  | 'USP_DB_ERROR'
  | 'USP_DB_BUSY'
  | 'USP_OVERLOADED'
  | 'USP_LISTENER_ERROR'
  | 'USP_INTERNAL';

/** An error with a stable `code`. */
export declare class UspError extends Error {
  constructor(code: UspErrorCode, message: string, options?: { cause?: unknown });
  readonly code: UspErrorCode;
}

/** Every error code with a one-line meaning. */
export declare const ERROR_CODES: Readonly<Record<UspErrorCode, string>>;

/** Any value that survives JSON. */
export type JsonValue = null | boolean | number | string | JsonValue[] | { [key: string]: JsonValue };

/** Engine options; every bound has a default. Given under `options` (nested shape) or at the top level (flat shape). */
export interface StreamerOptions {
  /** Use the database's change stream when it has one. Default true. */
  useChangeStreams?: boolean;
  /** Polling interval of the polling fallback, in ms (10..3600000). Default 2000. */
  pollingInterval?: number;
  /** Keep an in-process cache in front of the store. Default true. */
  enableCache?: boolean;
  /** Maximum WebSocket connections (used by the hub). Default 10000. */
  maxConnections?: number;
  /** Cache bound in bytes of keys + values. Default 64 MiB. */
  cacheMaxBytes?: number;
  /** Cache entry time-to-live in ms; 0 = until evicted. Default 0. */
  cacheTTL?: number;
  /** Maximum events per JavaScript call. Default 1000. `1` = one call per event. */
  batchSize?: number;
  /** Under sustained load, how long a batch may wait to fill up, in ms. Default 1. */
  batchTimeout?: number;
  /** Bound of the queue between capture and delivery, in events. Default 65536. */
  queueSize?: number;
  /** Batches handed to JavaScript and not yet processed. Default 2. */
  maxInFlightBatches?: number;
  /** Bound of the queue of pending push/get/delete calls. Default 65536. */
  writeQueueSize?: number;
  /** Maximum operations committed in one transaction. Default 1024. */
  writeBatchSize?: number;
  /** Maximum JSON size of one value, in bytes. Default 16 MiB. */
  maxValueSize?: number;
  /** Maximum key length in characters (1..191). Default 191. */
  maxKeyLength?: number;
  /** Events kept for replay to reconnecting WebSocket clients, while the hub runs (`listen()`). Default 10000. */
  historySize?: number;
  /** Bytes of keys and values the replay history may hold. Default 64 MiB. */
  historyMaxBytes?: number;
  /** At most this many keys have their last delivered version remembered for dedupe (every key changed within the last `dedupeCapacity / 2` new keys is). Default 1000000. */
  dedupeCapacity?: number;
  /** Log level (to stderr): off, error, warn, info, debug, trace. Default: `USP_LOG` or warn. */
  logLevel?: 'off' | 'error' | 'warn' | 'info' | 'debug' | 'trace';
  /** KV table (MongoDB: collection) name (letters, digits, underscore). Default 'usp_kv'. SQLite: the change log is `<table>_changes`; MySQL and MongoDB: the capture checkpoint is in `<table>_checkpoint`. */
  table?: string;
  /** MySQL/MariaDB binlog capture settings. */
  mysql?: {
    /** Replication server_id of the binlog connection; unique among the server's replicas. Default: random. */
    serverId?: number;
    /** Heartbeat of an idle binlog stream, in ms (100..3600000). Default 1000. */
    heartbeatInterval?: number;
    /** First reconnect delay in ms; doubles per attempt, with jitter. Default 100. */
    reconnectMinDelay?: number;
    /** Largest reconnect delay in ms. Default 5000. */
    reconnectMaxDelay?: number;
    /** Tables watched from init() on, as if watch() was called first: their rows written while no streamer ran arrive on resume. */
    watch?: string[];
    /** In polling mode, how often binlog capture is tried again, in ms (100..86400000). Default 30000. */
    fastPathRetry?: number;
    /** Name of this streamer's capture checkpoint (1..64 characters); streamers that resume independently use different names. Default 'default'. */
    checkpointName?: string;
  };
  /** MongoDB change-stream settings. */
  mongodb?: {
    /** How long the server may hold an idle change-stream request open, in ms (100..3600000); a request unanswered for this plus 2 s counts as a lost connection. Default 1000. */
    heartbeatInterval?: number;
    /** First reconnect delay in ms; doubles per attempt, with jitter. Default 100. */
    reconnectMinDelay?: number;
    /** Largest reconnect delay in ms. Default 5000. */
    reconnectMaxDelay?: number;
    /** Collections watched from init() on, as if watch() was called first: their changes made while no streamer ran arrive on resume. */
    watch?: string[];
    /** In polling mode, how often change streams are tried again, in ms (100..86400000). Default 30000. */
    fastPathRetry?: number;
    /** Name of this streamer's checkpoint (resume tokens) in `<table>_checkpoint` (1..64 characters). Default 'default'. */
    checkpointName?: string;
  };
  /** Scale-out through Redis (MySQL/MariaDB backend): instances with the same `url` and `keyPrefix` serve one stream. One instance captures at a time (a lease with fencing), appends changes to a Redis Stream, and every instance delivers them with the same `seq`. Give every instance the same options. */
  redis?: RedisOptions;
  /** Embedded SQLite settings. */
  sqlite?: {
    /** 'normal' (default: survives a process crash) or 'full' (fsync per commit: survives power loss). */
    synchronous?: 'normal' | 'full';
    /** How long a write waits for another process's lock, in ms. Default 5000. */
    busyTimeout?: number;
    /** How often other processes' commits are looked for, in ms. Default 2. */
    tailInterval?: number;
    /** Change-log rows kept for readers that are behind. Default 100000. */
    changeLogRetention?: number;
    /** Watch the WAL file (Linux, inotify) so other processes' commits are seen at once (else, and on other systems, polled every tailInterval). Default true. */
    watch?: boolean;
    /** Page size in bytes of a database file the streamer creates: a power of two from 512 to 65536. An existing file keeps the page size it was created with. Default 1024. */
    pageSize?: number;
  };
}

/** Connection settings. For the embedded default only `path` (or `uri: 'sqlite:<path>'`) applies. */
export interface ConnectionConfig {
  /** SQLite file path, or ':memory:'. Default 'ultimate-streaming.db' in the working directory. */
  path?: string;
  /** 'sqlite:<path>', 'mysql://user:password@host:port/database' (fields given separately win), or a MongoDB connection string 'mongodb://…' / 'mongodb+srv://…' (read by the official driver; `database` given separately wins over its path). */
  uri?: string;
  host?: string;
  port?: number;
  user?: string;
  password?: string;
  database?: string;
}

/** The nested configuration shape. */
export interface NestedConfig {
  /** 'sqlite' (default), 'mysql' (MySQL/MariaDB) or 'mongodb'. */
  database?: 'sqlite' | 'mysql' | 'mongodb';
  connection?: ConnectionConfig;
  options?: StreamerOptions;
}

/** The flat configuration shape; `database` is the database name (the file path for sqlite). */
export interface FlatConfig extends StreamerOptions {
  dbType: 'sqlite' | 'mysql' | 'mongodb';
  host?: string;
  port?: number;
  user?: string;
  password?: string;
  database?: string;
  path?: string;
  uri?: string;
}

export type StreamerConfig = NestedConfig | FlatConfig;

/** One committed change. */
export interface ChangeEvent<T = JsonValue> {
  type: 'insert' | 'update' | 'delete';
  key: string;
  /** The value after the change; null for deletes. */
  data: T | null;
  /** Per-key version assigned by the database in the write itself; increases by one per change. */
  version: number;
  /** Global sequence number of this streamer's deliveries. */
  seq: number;
  /** Where the change was captured: 'sqlite' or 'mysql'. */
  source: string;
  /** Commit time, ms since the Unix epoch (fractional). */
  timestamp: number;
  /** Milliseconds from commit to hand-off to JavaScript. */
  latency: number;
}

/** The capture could not resume from its position: changes `from..=to` were not delivered. */
export interface ResyncEvent {
  type: 'resync';
  source: string;
  reason: string;
  from: number;
  to: number;
}

/** Options of `watch()`. */
export interface WatchOptions {
  /** Which changes to deliver. Default: all three. */
  operations?: Array<'insert' | 'update' | 'delete'>;
}

/**
 * A row change of a watched table. Values keep their types: integers as numbers (as strings
 * beyond ±2^53), DECIMAL as strings, DATE as 'YYYY-MM-DD', DATETIME as 'YYYY-MM-DDTHH:MM:SS.mmm'
 * (no zone), TIMESTAMP as ISO UTC with 'Z', JSON columns parsed, binary columns as base64,
 * ENUM as its label. Fractional seconds are delivered to the millisecond.
 */
export interface RowEvent<Row = Record<string, JsonValue>> {
  /** MongoDB also reports 'replace' (a whole document replaced). */
  type: 'insert' | 'update' | 'replace' | 'delete';
  /** The table (MongoDB: collection). */
  table: string;
  /** MySQL: the primary key columns (all columns when the table has none). MongoDB: `{ _id }`. */
  key: Record<string, JsonValue>;
  /**
   * The row after the change; null for deletes. MongoDB: the document in relaxed Extended JSON
   * (ObjectId as `{ $oid }`, dates as `{ $date }`); for an update, the document as it is when the
   * event is read (it may already include later changes).
   */
  row: Row | null;
  /** MySQL: the row before an update or delete; null for inserts (and for MongoDB). */
  before: Row | null;
  /** MongoDB updates: `{ updatedFields, removedFields, truncatedArrays }` as the server reports it. */
  update?: { updatedFields: Record<string, JsonValue>; removedFields: string[]; truncatedArrays?: JsonValue[] };
  /** Stable id. MySQL: '<file number>:<event position>:<row index>' of the binlog; MongoDB: the resume token's `_data`. */
  id: string;
  seq: number;
  source: 'mysql' | 'mongodb';
  /** When the change was made, ms since the epoch (one-second precision here). */
  timestamp: number;
  latency: number;
}

/** A watched collection (or the database) was dropped or renamed; the stream goes on. */
export interface InvalidateEvent {
  type: 'invalidate';
  source: 'mongodb';
  table: string | null;
  /** The server's word for it: 'drop', 'rename', 'dropDatabase' or 'invalidate'. */
  operation: string;
  reason: string;
}

/** A watched table's columns changed. */
export interface SchemaEvent {
  type: 'schema';
  source: string;
  table: string;
  columns: string[];
}

/** The source changed how it captures changes, and why. */
export interface ModeEvent {
  type: 'mode';
  source: string;
  mode: 'binlog' | 'changeStream' | 'polling';
  reason: string;
}

/** A latency summary in milliseconds, from commit to hand-off to JavaScript. */
export interface LatencyStatus {
  count: number;
  p50: number;
  p95: number;
  p99: number;
  max: number;
  mean: number;
}

/** The capture state of a server backend. */
export interface SourceStatus {
  mode: string;
  /** The stream is down and being reconnected (exponential backoff with jitter). */
  reconnecting: boolean;
  /** Reconnect attempts since the stream was last live. */
  attempts: number;
  /** Successful reconnects since init. */
  reconnects: number;
  /** What init() found. MySQL: version, flavor, logBin, binlogFormat, binlogRowImage, binlogRowMetadata, replicationGrants. MongoDB: version, topology, setName, maxWireVersion, replicaSetOrSharded. */
  server: Record<string, unknown>;
  /** MySQL: the last transaction boundary captured, e.g. 'binlog.000003:1234'. MongoDB: the saved checkpoint, '<collection>@<end of its resume token>' per change stream (comma-separated), or 'poll@<ms>' when polling. '' until known. */
  position: string;
  /** MySQL: how the binlog stream is read. 'buffered': the engine reads the replication socket through a 64 KiB buffer after mysql_cdc's handshake (Linux); 'mysql_cdc': packet by packet by mysql_cdc (other systems, or when the socket could not be told apart from another new connection to the server). */
  binlogReader?: 'buffered' | 'mysql_cdc';
}

/** `options.redis`. */
export interface RedisOptions {
  /** 'redis://[user:password@]host[:port][/db]' (TLS is not supported in this version). Never shown in status or errors. */
  url: string;
  /** Prefix of every Redis key of this stream (1..200 characters). Default 'usp:<database>:<table>:'. */
  keyPrefix?: string;
  /** Entries (one per batch of changes) the Redis Stream keeps at most (10..1e9). Default 100000. */
  streamMaxLen?: number;
  /** Entries older than this many ms are trimmed; 0 = by length only. Default 3600000. */
  streamMaxAge?: number;
  /** How long the capture lease lasts without renewal, in ms (300..600000): a dead capturer is replaced after about this long. Default 3000. */
  leaseTtl?: number;
  /** A cache shared by the instances in Redis (L2), behind the in-process one. Default: `enableCache`. */
  cache?: boolean;
  /** Time-to-live of an L2 entry, in ms (1000..2592000000). Default 300000. */
  cacheTTL?: number;
}

/** `getStatus().bus`: this instance's part in a Redis-backed stream. */
export interface BusStatus {
  /** The Redis URL without credentials. */
  url: string;
  keyPrefix: string;
  /** 'leader': this instance captures and appends; 'follower': it reads what the leader appends. */
  role: 'starting' | 'leader' | 'follower';
  /** Fencing term of the lease while leader, else 0. */
  term: number;
  /** 'reconnecting' while a link to Redis is down (capture paused or reading stopped). */
  state: 'connected' | 'reconnecting';
  reconnecting: boolean;
  capturePaused: boolean;
  attempts: number;
  /** The last seq read from the stream. */
  lastSeq: number;
  /** Stream entries read and appended by this instance. */
  consumed: number;
  appended: number;
  /** Times this instance fell behind the stream's trim point (each announced by a 'resync'). */
  resyncs: number;
  /** Times this instance took the capture lease. */
  takeovers: number;
  lastError: string | null;
}

/** What `getStatus()` returns. */
export interface StreamerStatus {
  /** 'idle' before init, 'starting', 'changelog' (capturing the SQLite change log), 'binlog' (capturing the MySQL binary log), 'changeStream' (MongoDB change streams), 'polling' (MySQL without binlog access, MongoDB without change streams), 'follower' (with `options.redis`: another instance captures, this one reads the Redis stream), 'failed' (capture stopped on an internal error, see `errors.last`), 'closed'. */
  mode: 'idle' | 'starting' | 'changelog' | 'binlog' | 'changeStream' | 'polling' | 'follower' | 'failed' | 'closed';
  connected: boolean;
  initialized: boolean;
  closed: boolean;
  /** The backend, without credentials. */
  backend: { type: string; path?: string; table?: string; synchronous?: string; host?: string; port?: number; database?: string; user?: string; uri?: string };
  /** Server backends: the capture's state and what init() found on the server; null for the embedded store. */
  source: SourceStatus | null;
  /** With `options.redis`: role and Redis links; else null. */
  bus: BusStatus | null;
  events: { captured: number; emitted: number; deduplicated: number; perSecond: number; batches: number; maxBatch: number; resyncs: number };
  latency: LatencyStatus;
  /** The in-process cache (L1); `l2`: the cache shared in Redis (`options.redis.cache`), counted by this instance's get() calls that missed L1. */
  cache: {
    enabled: boolean; hits: number; misses: number; hitRatio: number; size: number; bytes: number; maxBytes: number; ttlMs: number;
    l2: { enabled: boolean; hits: number; misses: number; hitRatio: number; ttlMs: number };
  };
  queues: {
    writes: { depth: number; capacity: number };
    delivery: { depth: number; capacity: number };
    inFlightBatches: { depth: number; capacity: number };
  };
  store: { transactions: number; writes: number; position: number };
  history: { size: number; capacity: number; bytes: number; maxBytes: number; lastSeq: number };
  errors: { recoverable: number; fatal: number; listener: number; last: { code: string; message: string; at: number } | null };
  uptimeMs: number;
  /** The WebSocket hub's counters once `listen()` was called, else null. */
  hub: HubStatus | null;
}

/** Options of `listen()`: the native WebSocket hub. */
export interface ListenOptions {
  /** TCP port; 0 (default) picks a free one. */
  port?: number;
  /** Address to bind. Default '127.0.0.1'. */
  host?: string;
  /** Path of the WebSocket endpoint. Default '/stream'. */
  path?: string;
  /** Open connections at most; the next one is closed with 1013. Default: the streamer's `maxConnections`. */
  maxConnections?: number;
  /** Largest client frame in bytes; a larger one closes the connection with 1009. Default 65536. */
  maxPayload?: number;
  /** Ping interval in ms; a peer silent for two intervals is closed with 4000. Default 15000. */
  heartbeat?: number;
  /** Client messages allowed per interval; more close the connection with 4429. Default { messages: 100, interval: 1000 }. */
  rateLimit?: { messages?: number; interval?: number };
  /** Replay missed events to clients that subscribe with `since`. Default true. */
  history?: boolean;
  /** Serve the live dashboard at `/` (feed, events/s, latency p50/p99, clients, mode). Default false. */
  dashboard?: boolean;
  /** A client that falls `maxQueueBytes` behind (default 1 MiB): 'coalesce' (default: keep the latest event per key), 'drop' (drop and send a gap frame) or 'disconnect' (close with 4408). */
  slowConsumer?: { policy?: 'coalesce' | 'drop' | 'disconnect'; maxQueueBytes?: number };
  /**
   * JWT authentication: clients connect with `?token=<JWT>` or send `{ type: 'auth', token }`
   * first (and again to refresh). `exp` is required and enforced while connected (close 4401);
   * the `channelsClaim` claim (default 'channels') lists the channel patterns a client may
   * subscribe to (others: close 4403).
   */
  auth?: {
    /** HS256 shared secret, at least 32 characters. */
    secret?: string;
    /** RS256 public key (PEM). */
    publicKey?: string;
    issuer?: string;
    audience?: string;
    channelsClaim?: string;
    /** Clock leeway for `exp`, seconds (0..300). Default 0. */
    leeway?: number;
  };
  /** Allowed `Origin` headers (e.g. ['https://app.example.com']); other origins get HTTP 403. Default: any. */
  origins?: string[];
}

/** The hub's counters in `getStatus().hub`. */
export interface HubStatus {
  url: string;
  /** JWT authentication is on. */
  auth: boolean;
  connections: number;
  connectionsTotal: number;
  refused: number;
  frames: number;
  deliveries: number;
  bytes: number;
  coalesced: number;
  dropped: number;
  gaps: number;
  slowDisconnects: number;
  rateLimited: number;
  badMessages: number;
  queuedBytes: number;
}

/** Only changes whose key starts with `prefix` reach the listener. */
export interface ListenerFilter {
  prefix: string;
}

type ChangeEventName = 'change' | 'insert' | 'update' | 'delete';

/**
 * Streams every change committed to the store to its listeners, from this process or any other.
 *
 * ```js
 * const UltimateStreamer = require('ultimate-streaming');
 * const streamer = new UltimateStreamer();           // embedded SQLite file
 * streamer.on('change', (e) => console.log(e.type, e.key, e.data));
 * await streamer.init();
 * await streamer.push('price:BTC', { bid: 64000.5 }); // { key, version }
 * await streamer.get('price:BTC');
 * await streamer.delete('price:BTC');
 * streamer.getStatus();
 * await streamer.close();
 * ```
 */
export declare class UltimateStreamer extends EventEmitter {
  /** @throws {UspError} USP_INVALID_CONFIG, USP_UNSUPPORTED_BACKEND */
  constructor(config?: StreamerConfig);
  /** Opens the store and starts capture. `config` may be given here instead of to the constructor. */
  init(config?: StreamerConfig): Promise<void>;
  /** Durable upsert; resolves once committed, with the new version. */
  push<T extends JsonValue>(key: string, data: T): Promise<{ key: string; version: number }>;
  /** The current value (cache first, then the store), or null when absent. */
  get<T extends JsonValue = JsonValue>(key: string): Promise<T | null>;
  /** Deletes a key; resolves true when it existed. */
  delete(key: string): Promise<boolean>;
  /**
   * Delivers every change of `table` as 'row' events. MySQL/MariaDB: any table of the connected
   * database, from the next transaction the binlog reader reads. MongoDB: any collection of the
   * database, through its own change stream (resuming after its saved token when an earlier
   * streamer with the same checkpoint name watched it); 'update' in `operations` includes
   * replacements. Resolves once active. Rejects with USP_INVALID_ARGUMENT (no such table, bad
   * name or options) or USP_UNSUPPORTED_BACKEND (the embedded store, or a streamer in polling
   * mode).
   */
  watch(table: string, listener?: (e: RowEvent) => void): Promise<void>;
  watch(table: string, options: WatchOptions, listener?: (e: RowEvent) => void): Promise<void>;
  /** Mode, throughput, latency percentiles, cache, queues and errors. Never contains secrets. */
  getStatus(): StreamerStatus;
  /**
   * Starts the native WebSocket hub (after `init()`): `/stream` (WebSocket, protocol 1 in the
   * README), `/health`, `/metrics` (Prometheus text), `/status` (JSON for the dashboard) and,
   * with `dashboard: true`, the dashboard at `/`. Resolves with its port and URL.
   * @throws {UspError} USP_NOT_INITIALIZED, USP_INVALID_ARGUMENT (bad option, port in use, called twice)
   */
  listen(options?: ListenOptions): Promise<{ port: number; url: string }>;
  /** Finishes queued work, delivers what was committed, stops every thread; Node can then exit. */
  close(): Promise<void>;

  on(event: ChangeEventName, listener: (e: ChangeEvent) => void): this;
  on(event: ChangeEventName, filter: ListenerFilter, listener: (e: ChangeEvent) => void): this;
  /** Every delivered batch at once (after the per-event listeners). */
  on(event: 'batch', listener: (events: Array<ChangeEvent | RowEvent | ResyncEvent | ModeEvent | SchemaEvent | InvalidateEvent>) => void): this;
  on(event: 'resync', listener: (e: ResyncEvent) => void): this;
  /** The capture mode changed ('polling' when the binlog or change streams cannot be used, 'binlog' / 'changeStream' when they can again). */
  on(event: 'mode', listener: (e: ModeEvent) => void): this;
  /** MongoDB: a watched collection, the key-value collection or the database was dropped or renamed. */
  on(event: 'invalidate', listener: (e: InvalidateEvent) => void): this;
  /** A row change of a table watched with `watch()`. */
  on(event: 'row', listener: (e: RowEvent) => void): this;
  /** The columns of a watched table changed (ALTER TABLE); the stream goes on. */
  on(event: 'schema', listener: (e: SchemaEvent) => void): this;
  on(event: 'error', listener: (err: UspError) => void): this;
  on(event: 'ready' | 'close', listener: () => void): this;
  on(event: string | symbol, listener: (...args: any[]) => void): this;

  addListener(event: ChangeEventName, listener: (e: ChangeEvent) => void): this;
  addListener(event: ChangeEventName, filter: ListenerFilter, listener: (e: ChangeEvent) => void): this;
  addListener(event: string | symbol, listener: (...args: any[]) => void): this;

  once(event: ChangeEventName, listener: (e: ChangeEvent) => void): this;
  once(event: ChangeEventName, filter: ListenerFilter, listener: (e: ChangeEvent) => void): this;
  once(event: string | symbol, listener: (...args: any[]) => void): this;
}

export default UltimateStreamer;
