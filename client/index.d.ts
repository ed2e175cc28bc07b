// Types of ultimate-streaming/client, the browser client of the WebSocket hub (protocol 1).

/** A change event as the hub sends it (the same object a JavaScript listener gets). */
export interface StreamEvent {
  type: 'insert' | 'update' | 'replace' | 'delete';
  key: string | Record<string, unknown>;
  data?: unknown;
  row?: unknown;
  table?: string;
  version?: number;
  seq: number;
  source: string;
  timestamp: number;
}

/** Events `from..to` will never arrive (history exceeded, or dropped for a slow client): reload. */
export interface GapEvent {
  type: 'gap';
  from: number;
  to: number;
  reason: string;
}

export interface ClientOptions {
  /** Channels to subscribe to: 'kv:<key>', 'kv:<prefix>*', 'table:<name>'. */
  channels?: string[];
  /** A JWT, or a function returning one (called at every connect). */
  token?: string | (() => string | Promise<string>);
  /** Resume after this seq on the first connect too. */
  since?: number;
  /** First reconnect delay in ms (doubles per attempt, with jitter). Default 250. */
  minDelay?: number;
  /** Largest reconnect delay in ms. Default 10000. */
  maxDelay?: number;
  /** A WebSocket constructor; default `globalThis.WebSocket` (pass the `ws` package in older Node). */
  WebSocket?: unknown;
}

export type ClientState = 'connecting' | 'open' | 'reconnecting' | 'closed';

export declare class StreamClient {
  /** `url`: the hub's ws:// or wss:// URL, or the URLs of several instances of one Redis-backed stream (each reconnect tries the next). */
  constructor(url: string | string[], options?: ClientOptions);
  /** The last event seq received; a reconnect resumes after it. */
  readonly lastSeq: number;
  readonly state: ClientState;
  on(event: 'change', listener: (e: StreamEvent) => void): this;
  on(event: 'gap', listener: (g: GapEvent) => void): this;
  on(event: 'open', listener: (info: { seq: number }) => void): this;
  on(event: 'close', listener: (info: { code: number; reason: string }) => void): this;
  on(event: 'error', listener: (e: { code: string; message: string }) => void): this;
  on(event: 'state', listener: (state: ClientState) => void): this;
  on(event: string, listener: (arg: any) => void): this;
  off(event: string, listener: (arg: any) => void): this;
  subscribe(channels: string | string[]): this;
  unsubscribe(channels: string | string[]): this;
  /** Sends a new token on the open connection (the `token` option's function is called when none is given). */
  refreshToken(token?: string): Promise<void>;
  /** Closes for good. */
  close(): void;
}

/** Opens a client on `url`, or on the first of several instance URLs (each reconnect tries the next, resuming from the last seq). */
export declare function connect(url: string | string[], options?: ClientOptions): StreamClient;
export default connect;
