// ultimate-streaming/client: the browser client of the WebSocket hub (protocol 1). No
// dependencies; runs in browsers and in Node ≥ 22 (or Node with the `ws` package passed as
// `WebSocket`). It reconnects by itself with exponential backoff plus jitter and resumes from the
// last `seq` it saw, so a listener gets every event once, or a `gap` event saying which seqs it
// cannot get.
//
//   import { connect } from 'ultimate-streaming/client';
//   const stream = connect('ws://localhost:8080/stream', { channels: ['kv:price:*'] });
//   stream.on('change', (e) => render(e.key, e.data));
//   stream.on('gap', (g) => reloadEverything());
//
// With several instances serving one stream (options.redis), give their URLs as an array: each
// reconnect tries the next one and resumes there (the instances share the seq numbering).

const PROTOCOL = 1;

/** A connection to the hub that survives disconnects. */
export class StreamClient {
  #urls;
  #urlIndex = 0;
  #options;
  #ws = null;
  #channels = new Set();
  #listeners = new Map();
  #lastSeq = 0;
  #attempt = 0;
  #timer = null;
  #closed = false;
  #state = 'connecting';
  #nextId = 1;

  constructor(url, options = {}) {
    const urls = Array.isArray(url) ? url : [url];
    if (urls.length === 0 || urls.some((u) => typeof u !== 'string' || !/^wss?:\/\//.test(u))) {
      throw new TypeError(`connect(url): url must start with ws:// or wss:// (or be an array of such URLs), got ${String(url)}`);
    }
    this.#urls = urls;
    this.#options = {
      minDelay: 250,
      maxDelay: 10_000,
      token: undefined,
      WebSocket: globalThis.WebSocket,
      ...options,
    };
    if (typeof this.#options.WebSocket !== 'function') {
      throw new TypeError('no WebSocket implementation: pass options.WebSocket (e.g. the `ws` package in Node)');
    }
    for (const c of options.channels || []) this.#channels.add(c);
    this.#lastSeq = Number(options.since) || 0;
    this.#connect();
  }

  /** The last event seq received (what a reconnect resumes after). */
  get lastSeq() {
    return this.#lastSeq;
  }

  /** 'connecting', 'open', 'reconnecting' or 'closed'. */
  get state() {
    return this.#state;
  }

  /**
   * Listens to 'change' (every change event, rows included), 'gap' ({ from, to, reason }),
   * 'open', 'close' ({ code, reason }), 'error' ({ code, message }) and 'state' (the new state).
   */
  on(event, listener) {
    if (!this.#listeners.has(event)) this.#listeners.set(event, new Set());
    this.#listeners.get(event).add(listener);
    return this;
  }

  off(event, listener) {
    this.#listeners.get(event)?.delete(listener);
    return this;
  }

  /** Adds channels (`kv:<key>`, `kv:<prefix>*`, `table:<name>`); they survive reconnects. */
  subscribe(channels) {
    const fresh = [].concat(channels).filter((c) => !this.#channels.has(c));
    for (const c of fresh) this.#channels.add(c);
    // New channels start live: nothing to replay for them.
    if (fresh.length && this.#state === 'open') this.#send({ type: 'subscribe', channels: fresh, id: this.#nextId++ });
    return this;
  }

  unsubscribe(channels) {
    const gone = [].concat(channels).filter((c) => this.#channels.delete(c));
    if (gone.length && this.#state === 'open') this.#send({ type: 'unsubscribe', channels: gone, id: this.#nextId++ });
    return this;
  }

  /** Sends a new token on the open connection (before the old one expires). */
  async refreshToken(token) {
    const t = token === undefined ? await this.#token() : token;
    if (t && this.#state === 'open') this.#send({ type: 'auth', token: t, id: this.#nextId++ });
  }

  /** Closes for good (no reconnect). */
  close() {
    this.#closed = true;
    clearTimeout(this.#timer);
    this.#setState('closed');
    if (this.#ws) this.#ws.close(1000, 'client closed');
  }

  #emit(event, arg) {
    for (const l of this.#listeners.get(event) || []) {
      try {
        l(arg);
      } catch (err) {
        // A throwing listener must not stop the stream.
        setTimeout(() => {
          throw err;
        });
      }
    }
  }

  #setState(s) {
    if (this.#state !== s) {
      this.#state = s;
      this.#emit('state', s);
    }
  }

  async #token() {
    const t = this.#options.token;
    return typeof t === 'function' ? t() : t;
  }

  #send(msg) {
    if (this.#ws && this.#ws.readyState === 1) this.#ws.send(JSON.stringify(msg));
  }

  async #connect() {
    if (this.#closed) return;
    let url = this.#urls[this.#urlIndex % this.#urls.length];
    try {
      const token = await this.#token();
      if (token) url += (url.includes('?') ? '&' : '?') + 'token=' + encodeURIComponent(token);
    } catch (err) {
      this.#emit('error', { code: 'TOKEN', message: `getting a token failed: ${err && err.message}` });
      return this.#retry();
    }
    if (this.#closed) return;
    const ws = new this.#options.WebSocket(url);
    this.#ws = ws;
    ws.onmessage = (m) => this.#onFrame(typeof m.data === 'string' ? m.data : String(m.data));
    ws.onclose = (e) => {
      if (this.#ws !== ws) return;
      this.#ws = null;
      this.#emit('close', { code: e.code, reason: e.reason });
      if (!this.#closed) this.#retry();
    };
    ws.onerror = () => {};
  }

  #retry() {
    this.#setState('reconnecting');
    this.#urlIndex += 1;
    const { minDelay, maxDelay } = this.#options;
    const cap = Math.min(maxDelay, minDelay * 2 ** Math.min(this.#attempt, 20));
    this.#attempt += 1;
    const delay = cap * (0.5 + Math.random() * 0.5);
    clearTimeout(this.#timer);
    this.#timer = setTimeout(() => this.#connect(), delay);
  }

  #onFrame(text) {
    let f;
    try {
      f = JSON.parse(text);
    } catch {
      return;
    }
    switch (f.type) {
      case 'welcome':
        if (f.protocol !== PROTOCOL) {
          this.#emit('error', { code: 'PROTOCOL', message: `the hub speaks protocol ${f.protocol}, this client ${PROTOCOL}` });
        }
        this.#attempt = 0;
        this.#setState('open');
        if (this.#channels.size) {
          const msg = { type: 'subscribe', channels: [...this.#channels], id: this.#nextId++ };
          if (this.#lastSeq > 0) msg.since = this.#lastSeq;
          this.#send(msg);
        }
        this.#emit('open', { seq: f.seq });
        break;
      case 'events':
        for (const e of f.events) {
          // Replays and live events never repeat a seq; this guards against a server that would.
          if (e.seq <= this.#lastSeq) continue;
          this.#lastSeq = e.seq;
          this.#emit('change', e);
        }
        break;
      case 'gap':
        this.#lastSeq = Math.max(this.#lastSeq, f.to);
        this.#emit('gap', f);
        break;
      case 'error':
        this.#emit('error', { code: f.code, message: f.message });
        break;
      default:
        this.#emit(f.type, f);
    }
  }
}

/** Opens a client on `url` (or an array of instance URLs, tried in turn); see `StreamClient`. */
export function connect(url, options) {
  return new StreamClient(url, options);
}

export default connect;
