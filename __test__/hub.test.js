'use strict';
// The native WebSocket hub (listen()) with the `ws` client: protocol, filtering, order across many
// clients, resume with the last seq, gaps, bad frames, limits, slow consumers. Embedded store in
// memory; traffic on 127.0.0.1 only.
const http = require('node:http');
const WebSocket = require('ws');
const UltimateStreamer = require('..');
const { waitFor, rejectsWithCode } = require('./helpers');

jest.setTimeout(60_000);

const streamers = [];
const sockets = [];
async function start(options = {}, listenOptions = {}) {
  const s = new UltimateStreamer({ connection: { path: ':memory:' }, options });
  streamers.push(s);
  await s.init();
  const hub = await s.listen(listenOptions);
  return { s, hub };
}
afterEach(async () => {
  for (const ws of sockets.splice(0)) ws.terminate();
  await Promise.all(streamers.splice(0).map((s) => s.close()));
});

/** A client that records every frame; `next(type)` waits for the next frame of that type. */
function client(url) {
  const ws = new WebSocket(url);
  sockets.push(ws);
  const frames = [];
  const c = {
    ws,
    frames,
    closed: null,
    events: () => frames.filter((f) => f.type === 'events').flatMap((f) => f.events),
    send: (m) => ws.send(typeof m === 'string' ? m : JSON.stringify(m)),
    opened: new Promise((resolve, reject) => {
      ws.once('open', resolve);
      ws.once('error', reject);
    }),
    /** The first frame of `type`, already received or not. */
    async first(type, timeoutMs = 10_000) {
      await waitFor(() => frames.some((f) => f.type === type) || c.closed, `a '${type}' frame`, timeoutMs);
      return frames.find((f) => f.type === type);
    },
    async next(type, timeoutMs = 10_000) {
      const seen = frames.filter((f) => f.type === type).length;
      await waitFor(() => frames.filter((f) => f.type === type).length > seen || c.closed, `a '${type}' frame`, timeoutMs);
      return frames.filter((f) => f.type === type)[seen];
    },
    whenClosed: null,
  };
  c.whenClosed = new Promise((resolve) => {
    ws.on('close', (code, reason) => {
      c.closed = { code, reason: reason.toString() };
      resolve(c.closed);
    });
  });
  ws.on('message', (data) => frames.push(JSON.parse(data.toString())));
  ws.on('error', () => {});
  return c;
}

function get(url) {
  return new Promise((resolve, reject) => {
    http
      .get(url, (res) => {
        let body = '';
        res.on('data', (d) => (body += d));
        res.on('end', () => resolve({ status: res.statusCode, type: res.headers['content-type'], body }));
      })
      .on('error', reject);
  });
}

test('listen() needs init(), resolves with the port and URL; /health and /metrics answer', async () => {
  const early = new UltimateStreamer({ connection: { path: ':memory:' } });
  streamers.push(early);
  await rejectsWithCode(early.listen(), 'USP_NOT_INITIALIZED');
  await rejectsWithCode(early.listen(5), 'USP_INVALID_ARGUMENT');

  const { s, hub } = await start();
  expect(hub.port).toBeGreaterThan(0);
  expect(hub.url).toBe(`ws://127.0.0.1:${hub.port}/stream`);
  await rejectsWithCode(s.listen(), 'USP_INVALID_ARGUMENT'); // once per streamer
  await rejectsWithCode(s.listen({ nope: 1 }), 'USP_INVALID_ARGUMENT');

  await s.push('a', 1);
  const health = await get(`http://127.0.0.1:${hub.port}/health`);
  expect(health.status).toBe(200);
  expect(JSON.parse(health.body)).toMatchObject({ status: 'ok', connections: 0, lastSeq: 1 });
  const c = client(hub.url);
  await c.opened;
  const welcome = await c.first('welcome');
  expect(welcome).toMatchObject({ type: 'welcome', protocol: 1, seq: 1 });
  const metrics = await get(`http://127.0.0.1:${hub.port}/metrics`);
  expect(metrics.type).toMatch(/^text\/plain/);
  expect(metrics.body).toMatch(/^usp_hub_connections 1$/m);
  expect(metrics.body).toMatch(/^usp_events_captured_total 1$/m);
  expect(metrics.body).toMatch(/# TYPE usp_latency_ms summary/);
  expect(metrics.body).toMatch(/# TYPE usp_delivery_latency_seconds histogram/);
  expect(metrics.body).toMatch(/^usp_delivery_latency_seconds_bucket\{le="0\.001"\} \d+$/m);
  expect(metrics.body).toMatch(/^usp_delivery_latency_seconds_bucket\{le="\+Inf"\} \d+$/m);
  expect(s.getStatus().hub).toMatchObject({ url: hub.url, connections: 1 });
});

test('subscriptions filter by key, prefix and table; confirmed with the seq live delivery starts after', async () => {
  const { s, hub } = await start();
  const prices = client(hub.url);
  const user = client(hub.url);
  await Promise.all([prices.opened, user.opened]);
  await s.push('before', 0);
  prices.send({ type: 'subscribe', channels: ['kv:price:*'], id: 1 });
  user.send({ type: 'subscribe', channels: ['kv:user:1', 'table:orders'], id: 'u' });
  const [a, b] = await Promise.all([prices.next('subscribed'), user.next('subscribed')]);
  expect(a).toEqual({ type: 'subscribed', id: 1, channels: ['kv:price:*'], seq: 1 });
  expect(b).toEqual({ type: 'subscribed', id: 'u', channels: ['kv:user:1', 'table:orders'], seq: 1 });
  await s.push('price:BTC', { bid: 1 });
  await s.push('user:1', { name: 'a' });
  await s.push('user:2', { name: 'b' });
  await s.push('price:ETH', { bid: 2 });
  await s.delete('price:BTC');
  await waitFor(() => prices.events().length >= 3 && user.events().length >= 1, 'filtered events');
  await new Promise((r) => setTimeout(r, 100));
  expect(prices.events().map((e) => [e.type, e.key, e.data, e.seq])).toEqual([
    ['insert', 'price:BTC', { bid: 1 }, 2],
    ['insert', 'price:ETH', { bid: 2 }, 5],
    ['delete', 'price:BTC', null, 6],
  ]);
  expect(user.events().map((e) => e.key)).toEqual(['user:1']);
  prices.send({ type: 'unsubscribe', channels: ['kv:price:*'], id: 2 });
  expect(await prices.next('unsubscribed')).toEqual({ type: 'unsubscribed', id: 2, channels: ['kv:price:*'] });
  await s.push('price:SOL', 3);
  prices.send({ type: 'ping', id: 3 });
  expect(await prices.next('pong')).toEqual({ type: 'pong', id: 3 });
  expect(prices.events().length).toBe(3);
});

test('1,000 clients each get every event once and in seq order', async () => {
  const { s, hub } = await start();
  const N = 1000;
  const clients = [];
  for (let i = 0; i < N; i++) clients.push(client(hub.url));
  await Promise.all(clients.map((c) => c.opened));
  for (const c of clients) c.send({ type: 'subscribe', channels: ['kv:*'] });
  await waitFor(() => clients.every((c) => c.frames.some((f) => f.type === 'subscribed')), 'all subscribed', 30_000);
  const E = 200;
  const pushes = [];
  for (let i = 0; i < E; i++) pushes.push(s.push(`k${i % 20}`, i));
  await Promise.all(pushes);
  await waitFor(() => clients.every((c) => c.events().length >= E), `${E} events in each of ${N} clients`, 40_000);
  for (const c of clients) {
    const seqs = c.events().map((e) => e.seq);
    expect(seqs.length).toBe(E);
    for (let i = 1; i < seqs.length; i++) expect(seqs[i]).toBe(seqs[i - 1] + 1);
  }
  expect(s.getStatus().hub.deliveries).toBeGreaterThanOrEqual(N * E);
});

test('a client that reconnects with its last seq gets exactly what it missed', async () => {
  const { s, hub } = await start();
  const first = client(hub.url);
  await first.opened;
  first.send({ type: 'subscribe', channels: ['kv:doc:*'] });
  await first.next('subscribed');
  for (let i = 0; i < 10; i++) await s.push(`doc:${i % 3}`, i);
  await waitFor(() => first.events().length >= 10, 'first 10 events');
  const lastSeq = first.events().at(-1).seq;
  first.ws.close();
  await first.whenClosed;
  // Missed while away, mixed with keys the client does not want.
  for (let i = 10; i < 25; i++) await s.push(i % 2 ? `doc:${i % 3}` : `other:${i}`, i);
  const again = client(hub.url);
  await again.opened;
  again.send({ type: 'subscribe', channels: ['kv:doc:*'], since: lastSeq });
  const sub = await again.next('subscribed');
  expect(sub.seq).toBe(lastSeq + 15);
  await s.push('doc:9', 'live');
  await waitFor(() => again.events().some((e) => e.data === 'live'), 'live event after the replay');
  const got = again.events();
  expect(got.map((e) => e.data)).toEqual([11, 13, 15, 17, 19, 21, 23, 'live']);
  const seqs = got.map((e) => e.seq);
  expect(seqs).toEqual([...seqs].sort((x, y) => x - y));
  expect(seqs[0]).toBeGreaterThan(lastSeq);
  expect(again.frames.some((f) => f.type === 'gap')).toBe(false);
});

test('beyond the history ring: a gap frame says exactly what cannot be replayed', async () => {
  const { s, hub } = await start({ historySize: 10 });
  for (let i = 1; i <= 30; i++) await s.push(`k${i}`, i);
  const c = client(hub.url);
  await c.opened;
  c.send({ type: 'subscribe', channels: ['kv:*'], since: 5 });
  const gap = await c.next('gap');
  expect(gap).toMatchObject({ type: 'gap', from: 6, to: 20 });
  await waitFor(() => c.events().length >= 10, 'the events still held');
  expect(c.events().map((e) => e.seq)).toEqual([21, 22, 23, 24, 25, 26, 27, 28, 29, 30]);
  // Subscribed before the gap and the replay, in that order.
  const order = c.frames.map((f) => f.type).filter((t) => t !== 'welcome');
  expect(order.slice(0, 3)).toEqual(['subscribed', 'gap', 'events']);
});

test('with history: false, a resume gets a gap instead of a replay', async () => {
  const { s, hub } = await start({}, { history: false });
  for (let i = 1; i <= 5; i++) await s.push(`k${i}`, i);
  const c = client(hub.url);
  await c.opened;
  c.send({ type: 'subscribe', channels: ['kv:*'], since: 2 });
  const gap = await c.next('gap');
  expect(gap).toMatchObject({ from: 3, to: 5 });
  expect(gap.reason).toMatch(/history: false/);
  await s.push('live', 6);
  await waitFor(() => c.events().length === 1, 'the live event');
  expect(c.events()[0].seq).toBe(6);
});

describe('bad frames and limits close the connection with the documented code; the hub stays up', () => {
  test('malformed, unknown and binary messages: 4400', async () => {
    const { hub } = await start();
    for (const bad of ['not json', '{"type":"dance"}', '{"type":"subscribe","channels":["nope"]}', Buffer.from([1, 2, 3])]) {
      const c = client(hub.url);
      await c.opened;
      c.ws.send(bad);
      const closed = await c.whenClosed;
      expect(closed.code).toBe(4400);
      expect(c.frames.find((f) => f.type === 'error')).toMatchObject({ code: 'BAD_MESSAGE' });
    }
    const ok = client(hub.url);
    await ok.opened;
    ok.send({ type: 'ping' });
    expect(await ok.next('pong')).toMatchObject({ type: 'pong' });
  });

  test('a frame over maxPayload: 1009', async () => {
    const { hub } = await start({}, { maxPayload: 1024 });
    const c = client(hub.url);
    await c.opened;
    c.send({ type: 'subscribe', channels: ['kv:' + 'x'.repeat(4000)] });
    expect((await c.whenClosed).code).toBe(1009);
  });

  test('more messages than rateLimit: 4429', async () => {
    const { s, hub } = await start({}, { rateLimit: { messages: 5, interval: 10_000 } });
    const c = client(hub.url);
    await c.opened;
    for (let i = 0; i < 10; i++) c.send({ type: 'ping', id: i });
    expect((await c.whenClosed).code).toBe(4429);
    expect(c.frames.filter((f) => f.type === 'pong').length).toBe(5);
    expect(s.getStatus().hub.rateLimited).toBe(1);
  });

  test('maxConnections: the next client is closed with 1013', async () => {
    const { hub } = await start({}, { maxConnections: 2 });
    const a = client(hub.url);
    const b = client(hub.url);
    await Promise.all([a.opened, b.opened]);
    await Promise.all([a.first('welcome'), b.first('welcome')]);
    const c = client(hub.url);
    expect((await c.whenClosed).code).toBe(1013);
    a.ws.close();
    await a.whenClosed;
    await waitFor(async () => JSON.parse((await get(`http://127.0.0.1:${hub.port}/health`)).body).connections === 1, 'a slot to free up');
    const d = client(hub.url);
    await d.opened;
    expect((await d.first('welcome')).type).toBe('welcome');
  });
});

describe('slow consumers never grow memory without bound', () => {
  /** A client that stops reading; the server's queue for it fills once the socket buffers do. */
  async function stalled(hub) {
    const c = client(hub.url);
    await c.opened;
    c.send({ type: 'subscribe', channels: ['kv:*'] });
    await c.next('subscribed');
    c.ws._socket.pause();
    return c;
  }
  const big = 'x'.repeat(16 * 1024);

  test('disconnect: closed with 4408', async () => {
    // The bound leaves a reading client (in this busy test process) room for 64 events.
    const { s, hub } = await start({}, { slowConsumer: { policy: 'disconnect', maxQueueBytes: 1024 * 1024 } });
    const c = await stalled(hub);
    const fast = client(hub.url);
    await fast.opened;
    fast.send({ type: 'subscribe', channels: ['kv:*'] });
    await fast.next('subscribed');
    for (let i = 0; i < 3000 && s.getStatus().hub.slowDisconnects === 0; i++) await s.push(`k${i % 50}`, big);
    expect(s.getStatus().hub.slowDisconnects).toBe(1);
    c.ws._socket.resume();
    expect((await c.whenClosed).code).toBe(4408);
    // The other client was not slowed down or cut off.
    await s.push('after', 1);
    await waitFor(() => fast.events().some((e) => e.key === 'after'), 'the fast client goes on');
    expect(fast.closed).toBeNull();
  });

  test('drop: a gap frame names the dropped seqs, and the queue stays within its bound', async () => {
    const { s, hub } = await start({}, { slowConsumer: { policy: 'drop', maxQueueBytes: 64 * 1024 } });
    const c = await stalled(hub);
    let maxQueued = 0;
    for (let i = 0; i < 1500 && s.getStatus().hub.dropped === 0; i++) {
      await s.push(`k${i}`, big);
      maxQueued = Math.max(maxQueued, s.getStatus().hub.queuedBytes);
    }
    expect(s.getStatus().hub.dropped).toBeGreaterThan(0);
    expect(maxQueued).toBeLessThanOrEqual(64 * 1024 + 32 * 1024);
    c.ws._socket.resume();
    const gap = await c.next('gap', 20_000);
    expect(gap.to).toBeGreaterThanOrEqual(gap.from);
    await s.push('after', 1);
    await waitFor(() => c.events().some((e) => e.key === 'after'), 'events after the gap');
    const seqs = c.events().map((e) => e.seq);
    expect(seqs.some((q) => q >= gap.from && q <= gap.to)).toBe(false);
  });
});

test('a peer that stops answering pings is dropped with 4000', async () => {
  const { s, hub } = await start({}, { heartbeat: 200 });
  const c = client(hub.url);
  await c.opened;
  await c.first('welcome');
  c.ws._socket.pause(); // reads nothing, so answers no ping
  await waitFor(() => s.getStatus().hub.connections === 0, 'the server to drop the silent peer', 10_000);
  c.ws._socket.resume();
  expect((await c.whenClosed).code).toBe(4000);
});

test('close() closes every client with 1001', async () => {
  const { s, hub } = await start();
  const c = client(hub.url);
  await c.opened;
  await c.first('welcome');
  await s.close();
  expect((await c.whenClosed).code).toBe(1001);
});

describe('JWT auth and origins', () => {
  const crypto = require('node:crypto');
  const SECRET = 'a-test-secret-of-at-least-32-chars!!';
  const b64 = (x) => Buffer.from(typeof x === 'string' ? x : JSON.stringify(x)).toString('base64url');
  const now = () => Math.floor(Date.now() / 1000);
  function hs256(claims, secret = SECRET) {
    const head = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`;
    return `${head}.${crypto.createHmac('sha256', secret).update(head).digest('base64url')}`;
  }
  function rs256(claims, privateKey) {
    const head = `${b64({ alg: 'RS256', typ: 'JWT' })}.${b64(claims)}`;
    return `${head}.${crypto.sign('sha256', Buffer.from(head), privateKey).toString('base64url')}`;
  }

  test('HS256: no token, a bad one or an expired one is refused with 4401; channels outside the claim with 4403', async () => {
    const { s, hub } = await start({}, { auth: { secret: SECRET } });
    expect(s.getStatus().hub.auth).toBe(true);
    expect(JSON.stringify(s.getStatus())).not.toContain(SECRET);
    const anonymous = client(hub.url);
    await anonymous.opened;
    anonymous.send({ type: 'subscribe', channels: ['kv:*'] });
    expect((await anonymous.whenClosed).code).toBe(4401);
    for (const bad of [hs256({ exp: now() + 60, channels: ['kv:*'] }, 'another-secret-another-secret-xxxxx'), hs256({ exp: now() - 5, channels: ['kv:*'] }), 'garbage']) {
      const c = client(`${hub.url}?token=${encodeURIComponent(bad)}`);
      const closed = await c.whenClosed;
      expect(closed.code).toBe(4401);
      expect(c.frames[0]).toMatchObject({ type: 'error', code: 'UNAUTHENTICATED' });
    }
    const ok = client(`${hub.url}?token=${hs256({ exp: now() + 60, channels: ['kv:price:*'] })}`);
    await ok.opened;
    ok.send({ type: 'subscribe', channels: ['kv:price:BTC'] });
    await ok.next('subscribed');
    await s.push('price:BTC', 1);
    await waitFor(() => ok.events().length === 1, 'an event on a granted channel');
    ok.send({ type: 'subscribe', channels: ['kv:user:1'] });
    const closed = await ok.whenClosed;
    expect(closed.code).toBe(4403);
    expect(ok.frames.find((f) => f.type === 'error').message).toContain('kv:user:1');
  });

  test('exp is enforced on open connections; a refreshed token keeps the connection', async () => {
    const { hub } = await start({}, { auth: { secret: SECRET } });
    const short = client(hub.url);
    await short.opened;
    short.send({ type: 'auth', token: hs256({ exp: now() + 2, channels: ['kv:*'] }), id: 1 });
    expect(await short.next('authenticated')).toMatchObject({ id: 1 });
    const refreshed = client(`${hub.url}?token=${hs256({ exp: now() + 2, channels: ['kv:*'] })}`);
    await refreshed.opened;
    await refreshed.first('welcome');
    refreshed.send({ type: 'auth', token: hs256({ exp: now() + 60, channels: ['kv:*'] }), id: 2 });
    await refreshed.next('authenticated');
    const closed = await short.whenClosed;
    expect(closed.code).toBe(4401);
    expect(refreshed.closed).toBeNull();
    refreshed.send({ type: 'ping' });
    expect(await refreshed.next('pong')).toBeTruthy();
  });

  test('RS256 tokens with a public key', async () => {
    const { publicKey, privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
    const pem = publicKey.export({ type: 'spki', format: 'pem' });
    const { s, hub } = await start({}, { auth: { publicKey: pem } });
    const c = client(`${hub.url}?token=${rs256({ exp: now() + 60, channels: ['table:*', 'kv:a'] }, privateKey)}`);
    await c.opened;
    c.send({ type: 'subscribe', channels: ['kv:a'] });
    await c.next('subscribed');
    await s.push('a', 'x');
    await waitFor(() => c.events().length === 1, 'event');
    // An HS256 token is not accepted by an RS256-only hub.
    const hs = client(`${hub.url}?token=${hs256({ exp: now() + 60, channels: ['kv:a'] })}`);
    expect((await hs.whenClosed).code).toBe(4401);
  });

  test('origins: another Origin gets HTTP 403 before any upgrade', async () => {
    const { hub } = await start({}, { origins: ['http://app.example'] });
    const evil = new WebSocket(hub.url, { origin: 'http://evil.example' });
    sockets.push(evil);
    const status = await new Promise((resolve) => {
      evil.on('unexpected-response', (req, res) => resolve(res.statusCode));
      evil.on('error', () => {});
    });
    expect(status).toBe(403);
    const good = new WebSocket(hub.url, { origin: 'http://app.example' });
    sockets.push(good);
    await new Promise((resolve, reject) => {
      good.once('open', resolve);
      good.once('error', reject);
    });
  });
});
