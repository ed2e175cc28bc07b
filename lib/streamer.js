'use strict';
// UltimateStreamer: a Node EventEmitter over the native engine. This file only converts values
// (JSON in and out), keeps the promises of in-flight calls, and runs listeners so that one
// throwing listener cannot stop the others. Ordering, dedupe, caching and batching are native.

const { EventEmitter } = require('node:events');
const { NativeStreamer } = require('../native/index.js');
const { UspError, fromNative, describe } = require('./errors');

const MAX_ID = 0x7fffffff;
const KINDS = { i: 'insert', u: 'update', r: 'replace', d: 'delete' };

/**
 * Turns the engine's columnar batch (see `encode_js_batch` in src/event.rs) into event objects,
 * all of one shape, with `latency` measured at hand-off.
 */
function decodeBatch(b, dispatchedAt) {
  const { t, d, v, s, tb, ts, src, x } = b;
  // One string of keys joined by DEL, or an array when a key holds a DEL.
  const k = typeof b.k === 'string' ? b.k.split('\x7f') : b.k;
  const oneSource = typeof src === 'string';
  const events = new Array(t.length);
  let j = 0;
  let o = 0;
  for (let i = 0; i < t.length; i++) {
    const c = t[i];
    if (c === 'x') {
      const e = x[o++];
      if (e.table !== undefined) e.latency = dispatchedAt - e.timestamp;
      events[i] = e;
      continue;
    }
    // Whole microseconds (exact in a double), then one division: the nearest double to the
    // time in milliseconds.
    const timestamp = (tb + ts[j]) / 1000;
    events[i] = {
      type: KINDS[c],
      key: k[j],
      data: d[j],
      version: v[j],
      seq: s[j],
      source: oneSource ? src : src[j],
      timestamp,
      latency: dispatchedAt - timestamp,
    };
    j++;
  }
  return events;
}

function checkKey(key) {
  if (typeof key !== 'string') {
    throw new UspError('USP_INVALID_KEY', `the key must be a string, got ${describe(key)}`);
  }
}

/**
 * The first function or symbol that `JSON.stringify` would silently leave out of `v`, as
 * `[type, property]`, or null. Called after a successful stringify (so `v` has no cycles):
 * walking here costs less than a replacer, which V8 calls through C++ for every property.
 */
function nonJson(v, key) {
  const t = typeof v;
  if (t === 'function' || t === 'symbol') return [t, key];
  if (t !== 'object' || v === null) return null;
  if (typeof v.toJSON === 'function') return nonJson(v.toJSON(key), key);
  if (Array.isArray(v)) {
    for (let i = 0; i < v.length; i++) {
      const found = nonJson(v[i], String(i));
      if (found) return found;
    }
    return null;
  }
  for (const k in v) {
    if (Object.prototype.hasOwnProperty.call(v, k)) {
      const found = nonJson(v[k], k);
      if (found) return found;
    }
  }
  return null;
}

function toJson(data) {
  if (data === undefined) {
    throw new UspError('USP_INVALID_VALUE', 'the value is undefined; store null, or call delete(key) to remove the key');
  }
  let json;
  try {
    json = JSON.stringify(data);
  } catch (e) {
    const why = /circular/i.test(e.message)
      ? 'it contains a circular reference'
      : /BigInt/i.test(e.message)
        ? 'it contains a BigInt (convert it to a string or number first)'
        : e.message;
    throw new UspError('USP_INVALID_VALUE', `the value cannot be stored as JSON: ${why}`, { cause: e });
  }
  const found = nonJson(data, '');
  if (found) {
    const [t, k] = found;
    throw new UspError(
      'USP_INVALID_VALUE',
      `the value contains a ${t}${k ? ` at property '${k}'` : ''}; only JSON data (objects, arrays, strings, numbers, booleans, null) can be stored`,
    );
  }
  if (json === undefined) {
    throw new UspError('USP_INVALID_VALUE', `the value (${describe(data)}) has no JSON form`);
  }
  return json;
}

function configJson(config) {
  if (config === undefined || config === null) return null;
  if (typeof config !== 'object' || Array.isArray(config)) {
    throw new UspError('USP_INVALID_CONFIG', `the config must be an object, got ${describe(config)}`);
  }
  try {
    return JSON.stringify(config, (k, v) => {
      const t = typeof v;
      if (t === 'function' || t === 'symbol' || t === 'bigint') {
        throw new UspError('USP_INVALID_CONFIG', `option \`${k}\` must be plain data, got a ${t}`);
      }
      return v;
    });
  } catch (e) {
    if (e instanceof UspError) throw e;
    throw new UspError('USP_INVALID_CONFIG', `the config cannot be read: ${e.message}`);
  }
}

function filterOptions(options) {
  if (options === null || typeof options !== 'object' || Array.isArray(options)) {
    throw new UspError('USP_INVALID_ARGUMENT', `listener options must be an object like { prefix: 'price:' }, got ${describe(options)}`);
  }
  for (const k of Object.keys(options)) {
    if (k !== 'prefix') throw new UspError('USP_INVALID_ARGUMENT', `unknown listener option \`${k}\`; allowed: prefix`);
  }
  if (typeof options.prefix !== 'string') {
    throw new UspError('USP_INVALID_ARGUMENT', `listener option \`prefix\` must be a string, got ${describe(options.prefix)}`);
  }
  return options.prefix;
}

class UltimateStreamer extends EventEmitter {
  #native;
  #configured;
  #pending = new Map();
  #nextId = 1;
  #initPromise = null;
  #closePromise = null;

  /**
   * @param {object} [config] nested ({ database, connection, options }) or flat ({ dbType, host, ... }) shape;
   *   omitted = embedded SQLite file `ultimate-streaming.db`.
   */
  constructor(config) {
    super();
    try {
      this.#native = new NativeStreamer(configJson(config));
    } catch (e) {
      throw fromNative(e);
    }
    this.#configured = config !== undefined && config !== null;
  }

  #id() {
    const id = this.#nextId;
    this.#nextId = id >= MAX_ID ? 1 : id + 1;
    return id;
  }

  #wait(id, key) {
    return new Promise((resolve, reject) => this.#pending.set(id, { resolve, reject, key }));
  }

  /**
   * Opens the store and starts capture. Resolves when changes are being captured.
   * @param {object} [config] the config, if none was given to the constructor
   */
  init(config) {
    if (this.#closePromise) {
      return Promise.reject(new UspError('USP_CLOSED', 'the streamer is closed: create a new UltimateStreamer to continue (init() after close())'));
    }
    if (this.#initPromise) {
      if (config !== undefined) {
        return Promise.reject(new UspError('USP_ALREADY_INITIALIZED', 'init(config) was already called; create a new UltimateStreamer for another config'));
      }
      return this.#initPromise;
    }
    try {
      if (config !== undefined && config !== null) {
        if (this.#configured) {
          throw new UspError('USP_INVALID_ARGUMENT', 'a config was given to both the constructor and init(); give it once');
        }
        this.#native = new NativeStreamer(configJson(config));
        this.#configured = true;
      }
      const id = this.#id();
      this.#native.init(
        id,
        (json, at) => this.#onEvents(json, at),
        (json) => this.#onComplete(json),
      );
      this.#initPromise = this.#wait(id).then(() => {
        this.emit('ready');
      });
    } catch (e) {
      return Promise.reject(fromNative(e));
    }
    return this.#initPromise;
  }

  /**
   * Upserts `data` (any JSON value) under `key`. Resolves with `{ key, version }` once committed.
   */
  push(key, data) {
    try {
      checkKey(key);
      const json = toJson(data);
      const id = this.#id();
      this.#native.push(id, key, json);
      return this.#wait(id, key);
    } catch (e) {
      return Promise.reject(fromNative(e));
    }
  }

  /** The current value of `key` (cache first, then the store), or null when absent. */
  get(key) {
    try {
      checkKey(key);
      const id = this.#id();
      const hit = this.#native.get(id, key);
      if (typeof hit === 'string') return Promise.resolve(JSON.parse(hit));
      return this.#wait(id, key);
    } catch (e) {
      return Promise.reject(fromNative(e));
    }
  }

  /** Deletes `key`. Resolves true when it existed, false otherwise. */
  delete(key) {
    try {
      checkKey(key);
      const id = this.#id();
      this.#native.delete(id, key);
      return this.#wait(id, key);
    } catch (e) {
      return Promise.reject(fromNative(e));
    }
  }

  /**
   * Delivers every row change of `table` (MySQL: any table; MongoDB: any collection) as 'row'
   * events. Resolves once the watch is active. `options.operations` picks among 'insert',
   * 'update' and 'delete' (default: all); `listener`, if given, is added as a 'row' listener
   * for this table only.
   */
  watch(table, options, listener) {
    if (typeof options === 'function') [options, listener] = [undefined, options];
    try {
      if (typeof table !== 'string' || table === '') {
        throw new UspError('USP_INVALID_ARGUMENT', 'watch(table): `table` must be a non-empty string (a table name)');
      }
      if (options !== undefined && (options === null || typeof options !== 'object' || Array.isArray(options))) {
        throw new UspError('USP_INVALID_ARGUMENT', 'watch(table, options): `options` must be an object like { operations: ["insert", "update"] }');
      }
      const allowed = ['insert', 'update', 'delete'];
      for (const k of Object.keys(options || {})) {
        if (k !== 'operations') throw new UspError('USP_INVALID_ARGUMENT', `watch(): unknown option \`${k}\`; allowed: operations`);
      }
      let ops = allowed;
      if (options && options.operations !== undefined) {
        ops = options.operations;
        if (!Array.isArray(ops) || ops.some((o) => !allowed.includes(o))) {
          throw new UspError('USP_INVALID_ARGUMENT', "watch(): `operations` must be an array of 'insert', 'update', 'delete'");
        }
      }
      if (listener !== undefined && typeof listener !== 'function') {
        throw new UspError('USP_INVALID_ARGUMENT', 'watch(table, options, listener): `listener` must be a function');
      }
      const id = this.#id();
      this.#native.watch(id, table, ops.includes('insert'), ops.includes('update'), ops.includes('delete'));
      const done = this.#wait(id);
      if (listener) {
        const filtered = (e) => {
          if (e.table === table) listener.call(this, e);
        };
        filtered.listener = listener;
        this.on('row', filtered);
      }
      return done.then(() => undefined);
    } catch (e) {
      return Promise.reject(fromNative(e));
    }
  }

  /** A snapshot of mode, throughput, latency, cache, queues and errors. Never contains secrets. */
  getStatus() {
    try {
      return JSON.parse(this.#native.status());
    } catch (e) {
      throw fromNative(e);
    }
  }

  /**
   * Starts the native WebSocket hub (after init()); resolves with { port, url }. `close()` stops
   * it. Options: port (0 = a free one), host, path, maxConnections, maxPayload, heartbeat,
   * rateLimit { messages, interval }, history, slowConsumer { policy, maxQueueBytes }.
   */
  listen(options = {}) {
    try {
      if (options === null || typeof options !== 'object' || Array.isArray(options)) {
        throw new UspError('USP_INVALID_ARGUMENT', `listen(options): options must be an object like { port: 8080 }, got ${describe(options)}`);
      }
      return Promise.resolve(JSON.parse(this.#native.listen(JSON.stringify(options))));
    } catch (e) {
      return Promise.reject(fromNative(e));
    }
  }

  /** Stops capture and delivery after queued work is done; resolves when everything stopped. */
  close() {
    if (this.#closePromise) return this.#closePromise;
    let p;
    try {
      const id = this.#id();
      p = this.#native.close(id) ? Promise.resolve() : this.#wait(id);
    } catch (e) {
      p = Promise.reject(fromNative(e));
    }
    this.#closePromise = p.then(() => {
      for (const [, w] of this.#pending) w.reject(new UspError('USP_CLOSED', 'the streamer was closed before this call completed'));
      this.#pending.clear();
      this.emit('close');
    });
    return this.#closePromise;
  }

  /**
   * Adds a listener; `on(event, { prefix }, listener)` only receives changes whose key starts
   * with `prefix`.
   */
  on(event, optionsOrListener, maybeListener) {
    if (maybeListener === undefined) return super.on(event, optionsOrListener);
    return super.on(event, this.#filtered(optionsOrListener, maybeListener, false, event));
  }

  addListener(event, optionsOrListener, maybeListener) {
    return this.on(event, optionsOrListener, maybeListener);
  }

  once(event, optionsOrListener, maybeListener) {
    if (maybeListener === undefined) return super.once(event, optionsOrListener);
    return super.on(event, this.#filtered(optionsOrListener, maybeListener, true, event));
  }

  #filtered(options, listener, once, event) {
    const prefix = filterOptions(options);
    if (typeof listener !== 'function') {
      throw new UspError('USP_INVALID_ARGUMENT', `the listener must be a function, got ${describe(listener)}`);
    }
    const self = this;
    let fired = false;
    function filtered(e) {
      if (e === null || typeof e !== 'object' || typeof e.key !== 'string' || !e.key.startsWith(prefix)) return undefined;
      if (once) {
        // A batch dispatches from a snapshot of the listeners, so removal alone would not stop a
        // second matching event of the same batch.
        if (fired) return undefined;
        fired = true;
        self.removeListener(event, filtered);
      }
      return listener.call(this, e);
    }
    // EventEmitter's removeListener(event, listener) matches `.listener`, so off() works.
    filtered.listener = listener;
    return filtered;
  }

  #onEvents(json, dispatchedAt) {
    const names = ['change', 'insert', 'update', 'delete', 'batch', 'resync', 'mode', 'row', 'schema', 'invalidate'];
    // Nobody listens: skip decoding, unless the batch may hold a resync (never silent).
    if (names.every((n) => this.listenerCount(n) === 0) && !json.includes('"type":"resync"')) return;
    let events;
    try {
      events = decodeBatch(JSON.parse(json), dispatchedAt);
    } catch (e) {
      this.#listenerError(new UspError('USP_INTERNAL', `an event batch could not be decoded: ${e.message}`), 'batch');
      return;
    }
    const change = this.rawListeners('change');
    const typed = {
      insert: this.rawListeners('insert'),
      update: this.rawListeners('update'),
      delete: this.rawListeners('delete'),
    };
    const perEvent = change.length + typed.insert.length + typed.update.length + typed.delete.length > 0;
    for (const e of events) {
      if (e.type === 'resync') {
        const ls = this.rawListeners('resync');
        if (ls.length) this.#emitSafe(ls, 'resync', e);
        else process.emitWarning(`ultimate-streaming resync: ${e.reason}`, { code: 'USP_RESYNC' });
        continue;
      }
      if (e.type === 'mode' || e.type === 'schema' || e.type === 'invalidate') {
        const ls = this.rawListeners(e.type);
        if (ls.length) this.#emitSafe(ls, e.type, e);
        continue;
      }
      if (e.table !== undefined) {
        // A row of a watched table (watch()), not a key-value change.
        const ls = this.rawListeners('row');
        if (ls.length) this.#emitSafe(ls, 'row', e);
        continue;
      }
      if (!perEvent) continue;
      if (change.length) this.#emitSafe(change, 'change', e);
      const ls = typed[e.type];
      if (ls && ls.length) this.#emitSafe(ls, e.type, e);
    }
    const batch = this.rawListeners('batch');
    if (batch.length) this.#emitSafe(batch, 'batch', events);
  }

  #emitSafe(listeners, name, arg) {
    for (let i = 0; i < listeners.length; i++) {
      try {
        listeners[i].call(this, arg);
      } catch (err) {
        this.#listenerError(err, name);
      }
    }
  }

  #listenerError(err, name) {
    const msg = err && err.message ? err.message : String(err);
    try {
      this.#native.reportListenerError(`'${name}' listener: ${msg}`);
    } catch {
      // The engine may be closed; counting is best effort.
    }
    const wrapped = new UspError('USP_LISTENER_ERROR', `a '${name}' listener threw: ${msg}`, { cause: err });
    if (name !== 'error' && this.listenerCount('error') > 0) {
      this.#emitSafe(this.rawListeners('error'), 'error', wrapped);
    } else {
      process.emitWarning(wrapped.message, { code: 'USP_LISTENER_ERROR' });
    }
  }

  #onComplete(json) {
    let done;
    try {
      done = JSON.parse(json);
    } catch (e) {
      this.#listenerError(new UspError('USP_INTERNAL', `a completion batch could not be decoded: ${e.message}`), 'complete');
      return;
    }
    for (const c of done) {
      if (c[1] === 'x') {
        // The engine died (a bug): nothing pending will complete; fail it all, loudly.
        const err = new UspError(c[2], c[3]);
        for (const [, w] of this.#pending) w.reject(err);
        this.#pending.clear();
        if (this.listenerCount('error') > 0) this.#emitSafe(this.rawListeners('error'), 'error', err);
        else process.emitWarning(err.message, { code: err.code });
        continue;
      }
      const w = this.#pending.get(c[0]);
      if (!w) continue;
      this.#pending.delete(c[0]);
      switch (c[1]) {
        case 'p':
          w.resolve({ key: w.key, version: c[2] });
          break;
        case 'e':
          w.reject(new UspError(c[2], c[3]));
          break;
        default: // 'r' ready, 'd' deleted, 'g' got, 'c' closed
          w.resolve(c[2] === undefined ? undefined : c[2]);
      }
    }
  }
}

module.exports = { UltimateStreamer };
