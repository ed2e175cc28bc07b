'use strict';
// MongoDB backend against a private mongo-java-server with an oplog (change streams) started for
// this file, and a second one without (standalone: polling). External writes come from the Node
// `mongodb` driver. With MONGODB_URI set (a real replica set) the change-stream tests run against
// it unchanged; tests that restart or replace the server need the private one and say so.
const { MongoClient } = require('mongodb');
const UltimateStreamer = require('..');
const { waitFor, rejectsWithCode, throwsWithCode, streamerPool, collectChanges, freshName, expectStoreContract } = require('./helpers');
const { startMongo } = require('./mongo');

jest.setTimeout(120_000);

// Tests that restart, stop or replace the server need the private one: against MONGODB_URI they
// are reported as skipped (never as passed).
const privateServerTest = process.env.MONGODB_URI ? test.skip : test;

let rs; // change streams
let client; // the external writer
beforeAll(async () => {
  rs = await startMongo({ oplog: true });
  client = new MongoClient(rs.uri, { serverSelectionTimeoutMS: 10_000 });
  await client.connect();
});
afterAll(async () => {
  if (client) await client.close();
  if (rs) await rs.stop();
});

/** A database name of its own per test, so tests never see each other's documents. */
const freshDb = () => freshName('usp');
const pool = streamerPool();
const make = (server, dbName, options = {}) => pool({ database: 'mongodb', connection: { uri: server.uri, database: dbName }, options });
const collect = collectChanges;

/** Pushes until each call is committed, retrying while the server is away. */
async function pushRetrying(s, key, value, deadline) {
  for (;;) {
    try {
      return await s.push(key, value);
    } catch (e) {
      if (e.code !== 'USP_DB_UNAVAILABLE' || Date.now() > deadline) throw e;
      await new Promise((r) => setTimeout(r, 20));
    }
  }
}

describe('store contract and change streams', () => {
  test('push/get/delete with versions set by the write, every change once from the stream', async () => {
    const dbName = freshDb();
    const s = make(rs, dbName);
    const seen = collect(s);
    await s.init();
    const st = s.getStatus();
    expect(st.mode).toBe('changeStream');
    expect(st.connected).toBe(true);
    expect(st.source.server.version).toMatch(/^\d+\.\d+/);

    await expectStoreContract(s);

    await waitFor(() => seen.count() >= 6, '6 change events');
    // The saved checkpoint shows in status: the KV collection's stream and the end of its token.
    await waitFor(() => s.getStatus().source.position !== '', 'a saved checkpoint in status', 5_000);
    expect(s.getStatus().source.position).toMatch(/^usp_kv@\w+/);
    // In order per key (different keys of one batch may interleave differently).
    const perKey = (k) => seen.events.filter((e) => e.key === k).map((e) => [e.type, e.version, e.data]);
    expect(perKey('a')).toEqual([
      ['insert', 1, { x: 1 }],
      ['update', 2, { x: 2 }],
      ['delete', 3, null],
      ['update', 4, 'again'],
    ]);
    expect(perKey('b')).toEqual([
      ['insert', 1, 1],
      ['update', 2, 2],
    ]);
    for (const e of seen.events) {
      expect(e.source).toBe('mongodb');
      expect(e.timestamp).toBeGreaterThan(Date.now() - 60_000);
    }
    // The documents have the documented shape.
    const doc = await client.db(dbName).collection('usp_kv').findOne({ _id: 'b' });
    expect(doc).toMatchObject({ _id: 'b', data: 2, version: 2 });
    expect(doc.updatedAt).toBeInstanceOf(Date);
    await new Promise((r) => setTimeout(r, 200));
    expect(seen.count()).toBe(6);
  });

  privateServerTest('the flat config shape of the API reference connects too', async () => {
    const dbName = freshDb();
    const s = pool({ dbType: 'mongodb', host: '127.0.0.1', port: rs.port, database: dbName, pollingInterval: 500 });
    const seen = collect(s);
    await s.init();
    expect(s.getStatus().mode).toBe('changeStream');
    expect(await s.push('flat', [1])).toEqual({ key: 'flat', version: 1 });
    await waitFor(() => seen.count() >= 1, 'change event');
    expect(seen.events[0]).toMatchObject({ key: 'flat', data: [1], source: 'mongodb' });
  });

  test('writes by another program reach listeners; its version is respected', async () => {
    const dbName = freshDb();
    const s = make(rs, dbName);
    const seen = collect(s);
    await s.init();
    const kv = client.db(dbName).collection('usp_kv');
    await kv.insertOne({ _id: 'ext', data: { from: 'outside' }, version: 1, updatedAt: new Date() });
    await kv.replaceOne({ _id: 'ext' }, { data: { from: 'outside', n: 2 }, version: 2, updatedAt: new Date() });
    await waitFor(() => seen.count() >= 2, 'external changes');
    expect(seen.events.map((e) => [e.key, e.version, e.data])).toEqual([
      ['ext', 1, { from: 'outside' }],
      ['ext', 2, { from: 'outside', n: 2 }],
    ]);
    // The engine continues the external version sequence.
    expect(await s.push('ext', 'mine')).toEqual({ key: 'ext', version: 3 });
    await kv.deleteOne({ _id: 'ext' });
    await waitFor(() => seen.count() >= 4, 'push and external delete');
    expect(seen.events.slice(2).map((e) => [e.type, e.key, e.data])).toEqual([
      ['update', 'ext', 'mine'],
      ['delete', 'ext', null],
    ]);
    expect(await s.get('ext')).toBeNull();
  });

  test('two streamers pushing to the same keys: every version once and in order in both', async () => {
    const dbName = freshDb();
    const a = make(rs, dbName, { mongodb: { checkpointName: 'a' } });
    const b = make(rs, dbName, { mongodb: { checkpointName: 'b' } });
    const sa = collect(a);
    const sb = collect(b);
    await a.init();
    await b.init();
    const keys = ['k0', 'k1', 'k2', 'k3'];
    const N = 150;
    const results = await Promise.all(
      [a, b].map(async (s, w) => {
        const out = [];
        for (let i = 0; i < N; i++) out.push(s.push(keys[i % keys.length], { w, i }));
        return Promise.all(out);
      }),
    );
    const total = 2 * N;
    // Each version of a key was handed out once.
    for (const k of keys) {
      const v = results.flat().filter((r) => r.key === k).map((r) => r.version).sort((x, y) => x - y);
      expect(v).toEqual(Array.from({ length: v.length }, (_, i) => i + 1));
    }
    await waitFor(() => sa.count() >= total && sb.count() >= total, `${total} events in both`, 30_000);
    for (const seen of [sa, sb]) {
      expect(seen.count()).toBe(total);
      for (const k of keys) {
        const v = seen.versions(k);
        expect(v).toEqual(Array.from({ length: v.length }, (_, i) => i + 1));
      }
    }
    for (const k of keys) expect(await a.get(k)).toEqual(await b.get(k));
  });

  test('refused values: $-prefixed or NUL field names, documents over 16 MB, NUL keys; nothing written', async () => {
    const dbName = freshDb();
    const s = make(rs, dbName, { maxValueSize: 64 * 1024 * 1024 });
    await s.init();
    await s.push('k', { ok: 1 });
    const e1 = await rejectsWithCode(s.push('k', { a: { $where: 'x' } }), 'USP_INVALID_VALUE');
    expect(e1.message).toContain('data.a');
    await rejectsWithCode(s.push('k', [{ 'a\u0000b': 1 }]), 'USP_INVALID_VALUE');
    const e2 = await rejectsWithCode(s.push('k', 'x'.repeat(16 * 1024 * 1024)), 'USP_VALUE_TOO_LARGE');
    expect(e2.message).toMatch(/16777216|16 MB/);
    await rejectsWithCode(s.push('a\u0000b', 1), 'USP_INVALID_KEY');
    // A batch with a refused call still commits the others.
    const r = await Promise.allSettled([s.push('k', { good: 2 }), s.push('k', { $bad: 1 }), s.push('k2', 3)]);
    expect(r.map((x) => x.status)).toEqual(['fulfilled', 'rejected', 'fulfilled']);
    expect(r[0].value).toEqual({ key: 'k', version: 2 });
    expect(await s.get('k')).toEqual({ good: 2 });
    const docs = await client.db(dbName).collection('usp_kv').find({}).toArray();
    expect(docs.map((d) => [d._id, d.version, d.data])).toEqual([
      ['k', 2, { good: 2 }],
      ['k2', 1, 3],
    ]);
  });
});

describe('resume', () => {
  test('after close(): 2,000 writes made meanwhile are delivered exactly once', async () => {
    const dbName = freshDb();
    const first = make(rs, dbName);
    const seen1 = collect(first);
    await first.init();
    await first.push('before', 1);
    await waitFor(() => seen1.count() >= 1, 'first event');
    await first.close();

    const writer = make(rs, dbName, { mongodb: { checkpointName: 'writer' } });
    await writer.init();
    const N = 2000;
    const pushes = [];
    for (let i = 0; i < N; i++) pushes.push(writer.push(`r${i % 50}`, i));
    await Promise.all(pushes);

    const second = make(rs, dbName);
    const seen2 = collect(second);
    await second.init();
    await waitFor(() => seen2.count() >= N, `${N} resumed events`, 60_000);
    await new Promise((r) => setTimeout(r, 300));
    expect(seen2.count()).toBe(N);
    expect(seen2.events.some((e) => e.key === 'before')).toBe(false);
    for (let k = 0; k < 50; k++) {
      const v = seen2.versions(`r${k}`);
      expect(v).toEqual(Array.from({ length: N / 50 }, (_, i) => i + 1));
    }
  });

  privateServerTest('across server restarts mid-stream: 2,000 writes, each delivered exactly once', async () => {
    const dbName = freshDb();
    const s = make(rs, dbName, { mongodb: { reconnectMinDelay: 20, reconnectMaxDelay: 200 } });
    const seen = collect(s);
    await s.init();
    const writer = make(rs, dbName, { mongodb: { checkpointName: 'writer' } });
    await writer.init();
    const N = 2000;
    const deadline = Date.now() + 60_000;
    const committed = [];
    const restarts = (async () => {
      for (let i = 0; i < 3; i++) {
        await waitFor(() => committed.length >= (i + 1) * 400, 'progress before restart', 30_000);
        await rs.restart();
      }
    })();
    for (let i = 0; i < N; i += 20) {
      const batch = [];
      for (let j = i; j < i + 20; j++) batch.push(pushRetrying(writer, `x${j % 40}`, j, deadline));
      committed.push(...(await Promise.all(batch)));
    }
    await restarts;
    await waitFor(() => seen.count() >= N, `${N} events across restarts`, 60_000);
    await new Promise((r) => setTimeout(r, 300));
    expect(seen.count()).toBe(N);
    const delivered = new Set(seen.events.map((e) => `${e.key}@${e.version}`));
    expect(delivered.size).toBe(N);
    for (const c of committed) expect(delivered.has(`${c.key}@${c.version}`)).toBe(true);
  });

  privateServerTest('a server that goes away: status shows reconnecting with attempts, then capture continues', async () => {
    const dbName = freshDb();
    const s = make(rs, dbName, { mongodb: { reconnectMinDelay: 20, reconnectMaxDelay: 100 } });
    const seen = collect(s);
    await s.init();
    await rs.down();
    try {
      await waitFor(() => s.getStatus().source.reconnecting && s.getStatus().source.attempts >= 2, 'reconnecting status', 20_000);
    } finally {
      await rs.up();
    }
    await waitFor(() => !s.getStatus().source.reconnecting, 'reconnected', 20_000);
    await pushRetrying(s, 'after', 1, Date.now() + 20_000);
    await waitFor(() => seen.count() >= 1, 'event after reconnect');
    expect(seen.events[0]).toMatchObject({ key: 'after', version: 1 });
  });

  test('a checkpoint the server refuses: a resync event, then a fresh start', async () => {
    const dbName = freshDb();
    await client
      .db(dbName)
      .collection('usp_kv_checkpoint')
      .insertOne({ _id: 'default', tokens: { usp_kv: { _data: 'zz-not-a-token' } }, updatedAt: new Date() });
    const s = make(rs, dbName);
    const resyncs = [];
    s.on('resync', (e) => resyncs.push(e));
    const seen = collect(s);
    await s.init();
    await waitFor(() => resyncs.length >= 1, 'resync event');
    expect(resyncs[0].source).toBe('mongodb');
    expect(resyncs[0].reason).toMatch(/cannot resume/);
    expect(s.getStatus().mode).toBe('changeStream');
    await s.push('fresh', 1);
    await waitFor(() => seen.count() >= 1, 'event after resync');
    await new Promise((r) => setTimeout(r, 300));
    expect(resyncs.length).toBe(1);
  });
});

describe('watch(collection)', () => {
  test('inserts, updates, replaces and deletes of any collection, with ids and operations filter', async () => {
    const dbName = freshDb();
    const s = make(rs, dbName);
    await s.init();
    const rows = [];
    await s.watch('orders', (e) => rows.push(e));
    const inserts = [];
    await s.watch('audit', { operations: ['insert'] }, (e) => inserts.push(e));
    const orders = client.db(dbName).collection('orders');
    // One write at a time: an update carries the document looked up when the event is read.
    const writes = [
      () => orders.insertOne({ _id: 1, item: 'tea', qty: 2 }),
      () => orders.updateOne({ _id: 1 }, { $set: { qty: 3 } }),
      () => orders.replaceOne({ _id: 1 }, { item: 'coffee', qty: 1 }),
      () => orders.deleteOne({ _id: 1 }),
    ];
    for (const [i, w] of writes.entries()) {
      await w();
      await waitFor(() => rows.length > i, `row event ${i}`);
    }
    const audit = client.db(dbName).collection('audit');
    await audit.insertOne({ _id: 'a1', what: 'login' });
    await audit.deleteOne({ _id: 'a1' });
    await waitFor(() => rows.length >= 4 && inserts.length >= 1, 'row events');
    expect(rows.map((e) => e.table)).toEqual(['orders', 'orders', 'orders', 'orders']);
    expect(rows.map((e) => e.key)).toEqual([{ _id: 1 }, { _id: 1 }, { _id: 1 }, { _id: 1 }]);
    expect(rows[0]).toMatchObject({ type: 'insert', row: { _id: 1, item: 'tea', qty: 2 } });
    expect(rows[1]).toMatchObject({ type: 'update', row: { _id: 1, item: 'tea', qty: 3 } });
    if (rows[1].update) expect(rows[1].update.updatedFields).toEqual({ qty: 3 });
    // MongoDB says 'replace'; the test server reports a replacement as an update.
    expect(['replace', 'update']).toContain(rows[2].type);
    expect(rows[2].row).toEqual({ _id: 1, item: 'coffee', qty: 1 });
    expect(rows[3]).toMatchObject({ type: 'delete', row: null });
    // Stable, distinct event ids (resume tokens).
    const ids = rows.map((e) => e.id);
    expect(new Set(ids).size).toBe(4);
    for (const id of ids) expect(typeof id).toBe('string');
    await new Promise((r) => setTimeout(r, 300));
    expect(inserts.map((e) => e.type)).toEqual(['insert']);
    expect(inserts[0].row).toEqual({ _id: 'a1', what: 'login' });
    // The key-value collection is not a watch target.
    await rejectsWithCode(s.watch('usp_kv'), 'USP_INVALID_ARGUMENT');
  });

  test('a watched collection dropped: an invalidate event, and capture goes on', async () => {
    const dbName = freshDb();
    const s = make(rs, dbName);
    await s.init();
    const rows = [];
    const invalidations = [];
    s.on('invalidate', (e) => invalidations.push(e));
    await s.watch('temp', (e) => rows.push(e));
    const temp = client.db(dbName).collection('temp');
    await temp.insertOne({ _id: 1 });
    await temp.drop();
    await waitFor(() => invalidations.length >= 1, 'invalidate event');
    expect(invalidations[0]).toMatchObject({ type: 'invalidate', source: 'mongodb', table: 'temp', operation: 'drop' });
    expect(invalidations[0].reason).toMatch(/dropped/);
    await temp.insertOne({ _id: 2 });
    await waitFor(() => rows.length >= 2, 'row after re-creation');
    expect(rows.map((e) => e.row._id)).toEqual([1, 2]);
  });

  test('rows written while no streamer ran are delivered on resume (options.mongodb.watch)', async () => {
    const dbName = freshDb();
    const first = make(rs, dbName, { mongodb: { watch: ['events'] } });
    const early = [];
    first.on('row', (e) => early.push(e));
    await first.init();
    // One row seen first: a real server has a resume point from the start, the test server only
    // from the first event on.
    await client.db(dbName).collection('events').insertOne({ _id: 0 });
    await waitFor(() => early.length >= 1, 'first row');
    await first.close();
    await client.db(dbName).collection('events').insertMany([{ _id: 1 }, { _id: 2 }, { _id: 3 }]);
    const second = make(rs, dbName, { mongodb: { watch: ['events'] } });
    const rows = [];
    second.on('row', (e) => rows.push(e));
    await second.init();
    await waitFor(() => rows.length >= 3, 'rows written while closed');
    expect(rows.map((e) => e.row._id)).toEqual([1, 2, 3]);
  });
});

describe('standalone server: polling fallback', () => {
  let sa;
  beforeAll(async () => {
    sa = await startMongo({ oplog: false });
  });
  afterAll(async () => {
    if (sa) await sa.stop();
  });

  test('polls, announced by an event and in status; deletes through tombstones; watch() refused', async () => {
    const dbName = freshDb();
    const s = make(sa, dbName, { pollingInterval: 50 });
    const modes = [];
    s.on('mode', (e) => modes.push(e));
    const seen = collect(s);
    await s.init();
    expect(s.getStatus().mode).toBe('polling');
    expect(s.getStatus().source.server.topology).toBe('standalone');
    await waitFor(() => modes.length >= 1, 'mode event');
    expect(modes[0]).toMatchObject({ type: 'mode', source: 'mongodb', mode: 'polling' });
    expect(modes[0].reason).toMatch(/replica set/);
    await s.push('p', 1);
    await s.push('p', 2);
    await s.delete('p');
    // Another program's write through the engine's document shape.
    await new Promise((r) => setTimeout(r, 20));
    const other = new MongoClient(sa.uri);
    await other.connect();
    try {
      await other.db(dbName).collection('usp_kv').insertOne({ _id: 'ext', data: 'x', version: 1, updatedAt: new Date() });
    } finally {
      await other.close();
    }
    await waitFor(() => seen.events.some((e) => e.key === 'p' && e.type === 'delete') && seen.events.some((e) => e.key === 'ext'), 'polled changes');
    const p = seen.versions('p');
    expect(p).toEqual([...p].sort((x, y) => x - y));
    expect(new Set(p).size).toBe(p.length);
    expect(p[p.length - 1]).toBe(3);
    await rejectsWithCode(s.watch('orders'), 'USP_UNSUPPORTED_BACKEND');
  });

  test('useChangeStreams: false polls even where change streams exist', async () => {
    const s = make(rs, freshDb(), { useChangeStreams: false, pollingInterval: 50 });
    await s.init();
    expect(s.getStatus().mode).toBe('polling');
  });

  privateServerTest('returns to change streams when the server gains them', async () => {
    const alone = await startMongo({ oplog: false });
    const dbName = freshDb();
    const s = make(alone, dbName, { pollingInterval: 50, mongodb: { fastPathRetry: 200 } });
    const modes = [];
    s.on('mode', (e) => modes.push(e.mode));
    const seen = collect(s);
    await s.init();
    expect(s.getStatus().mode).toBe('polling');
    await s.push('before', 1);
    await waitFor(() => seen.count() >= 1, 'polled change');
    // The same address now serves a server with change streams.
    await alone.stop();
    const upgraded = await startMongo({ oplog: true, port: alone.port });
    try {
      await waitFor(() => modes.includes('changeStream'), 'mode event back to changeStream', 30_000);
      expect(s.getStatus().mode).toBe('changeStream');
      await pushRetrying(s, 'after', 1, Date.now() + 10_000);
      await waitFor(() => seen.events.some((e) => e.key === 'after'), 'streamed change');
    } finally {
      await s.close();
      await upgraded.stop();
    }
  });
});

describe('configuration and connection errors', () => {
  test('bad URIs are refused by the constructor, an unreachable server fails init()', async () => {
    throwsWithCode(() => new UltimateStreamer({ database: 'mongodb', connection: { uri: 'mysql://x/db' } }), 'USP_INVALID_CONFIG');
    throwsWithCode(() => new UltimateStreamer({ database: 'mongodb', connection: { uri: 'mongodb://h:notaport/db' } }), 'USP_INVALID_CONFIG');
    throwsWithCode(() => new UltimateStreamer({ database: 'mongodb', connection: { uri: 'mongodb://127.0.0.1:1' } }), 'USP_INVALID_CONFIG');
    throwsWithCode(() => new UltimateStreamer({ database: 'mongodb', options: { mongodb: { serverId: 1 } } , connection: { database: 'd' } }), 'USP_INVALID_CONFIG');
    const s = pool({ database: 'mongodb', connection: { uri: 'mongodb://127.0.0.1:1/db?serverSelectionTimeoutMS=500' } });
    const e = await rejectsWithCode(s.init(), 'USP_DB_UNAVAILABLE');
    expect(e.message).toMatch(/not reachable/);
  });

  privateServerTest('a refused login fails init() at once with USP_DB_ERROR, without the password', async () => {
    // The test server knows no users: every login is refused, as a wrong password would be.
    const secret = 'S3cr3t-pw-value';
    const s = pool({
      database: 'mongodb',
      connection: { uri: `mongodb://app:${secret}@127.0.0.1:${rs.port}/x` },
    });
    const t0 = Date.now();
    const err = await rejectsWithCode(s.init(), 'USP_DB_ERROR');
    expect(Date.now() - t0).toBeLessThan(5_000);
    expect(err.message).toMatch(/authentication failed/);
    expect(err.message).not.toContain(secret);
    expect(JSON.stringify(s.getStatus())).not.toContain(secret);
  });
});
