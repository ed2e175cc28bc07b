'use strict';
// The JavaScript contract of UltimateStreamer on the embedded default.
const path = require('node:path');
const fs = require('node:fs');
const UltimateStreamer = require('..');
const { tmpDb, tmpDir, waitFor, runNode, ROOT, expectStoreContract } = require('./helpers');

const streamers = [];
function make(config) {
  const s = new UltimateStreamer(config);
  streamers.push(s);
  return s;
}
afterEach(async () => {
  await Promise.all(streamers.splice(0).map((s) => s.close()));
});

describe('module shapes', () => {
  test('default export, named export and ESM import are the same class', async () => {
    const { UltimateStreamer: Named, ERROR_CODES, UspError } = require('..');
    expect(Named).toBe(UltimateStreamer);
    expect(typeof ERROR_CODES.USP_INVALID_KEY).toBe('string');
    expect(new UspError('USP_CLOSED', 'x')).toBeInstanceOf(Error);
    const r = await runNode([
      '--input-type=module',
      '-e',
      `import U, { UltimateStreamer } from ${JSON.stringify(path.join(ROOT, 'index.mjs'))};
       if (U !== UltimateStreamer || typeof U !== 'function') process.exit(3);
       const s = new U({ connection: { path: ':memory:' } });
       await s.init(); const r = await s.push('a', 1); await s.close();
       console.log(JSON.stringify(r));`,
    ]);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    expect(JSON.parse(r.stdout)).toEqual({ key: 'a', version: 1 });
  });

  test('is an EventEmitter', () => {
    const s = make({ connection: { path: ':memory:' } });
    expect(s).toBeInstanceOf(require('node:events').EventEmitter);
  });
});

describe('default configuration', () => {
  test('no config opens ultimate-streaming.db in the working directory', async () => {
    const dir = tmpDir();
    const r = await runNode(
      ['-e', `const U = require(${JSON.stringify(ROOT)}); (async () => { const s = new U(); await s.init();
        await s.push('k', { a: 1 }); console.log(JSON.stringify(s.getStatus().backend)); await s.close(); })()`],
      { cwd: dir },
    );
    expect(r.code).toBe(0);
    expect(JSON.parse(r.stdout)).toMatchObject({ type: 'sqlite', path: 'ultimate-streaming.db', table: 'usp_kv' });
    expect(fs.existsSync(path.join(dir, 'ultimate-streaming.db'))).toBe(true);
  });

  test('the seed config shapes are accepted', async () => {
    const file = tmpDb();
    const nested = make({ database: 'sqlite', connection: { path: file }, options: { useChangeStreams: true, pollingInterval: 2000, enableCache: true } });
    await nested.init();
    expect(nested.getStatus().backend.path).toBe(file);
    const flat = make({ dbType: 'sqlite', database: tmpDb(), useChangeStreams: true, pollingInterval: 500, enableCache: false, maxConnections: 100 });
    await flat.init();
    expect(flat.getStatus().cache.enabled).toBe(false);
  });

  test('sqlite.pageSize sets the page size of a new file; an existing file keeps its own', async () => {
    // The page size is bytes 16-17 of the file header, big-endian (1 stands for 65536).
    const pageSizeOf = (file) => {
      const fd = fs.openSync(file, 'r');
      try {
        const b = Buffer.alloc(2);
        fs.readSync(fd, b, 0, 2, 16);
        const n = b.readUInt16BE(0);
        return n === 1 ? 65536 : n;
      } finally {
        fs.closeSync(fd);
      }
    };
    const byDefault = tmpDb();
    const d = make({ connection: { path: byDefault } });
    await d.init();
    await d.push('k', { a: 1 });
    await d.close();
    expect(pageSizeOf(byDefault)).toBe(1024);

    const file = tmpDb();
    const a = make({ connection: { path: file }, options: { sqlite: { pageSize: 8192 } } });
    await a.init();
    await a.push('k', { a: 1 });
    await a.close();
    expect(pageSizeOf(file)).toBe(8192);

    const b = make({ connection: { path: file }, options: { sqlite: { pageSize: 512 }, enableCache: false } });
    await b.init();
    expect(await b.get('k')).toEqual({ a: 1 });
    expect((await b.push('k', { a: 2 })).version).toBe(2);
    await b.close();
    expect(pageSizeOf(file)).toBe(8192);
  });

  test('init(config) is accepted when the constructor had none', async () => {
    const s = make();
    await s.init({ connection: { path: ':memory:' } });
    expect(s.getStatus().backend.path).toBe(':memory:');
  });
});

describe('push / get / delete', () => {
  test('push resolves with increasing versions; get reads back; delete reports existence', async () => {
    const s = make({ connection: { path: tmpDb() } });
    await s.init();
    expect(await s.push('price:BTC', { bid: 64000.5 })).toEqual({ key: 'price:BTC', version: 1 });
    expect(await s.push('price:BTC', { bid: 64001 })).toEqual({ key: 'price:BTC', version: 2 });
    expect(await s.get('price:BTC')).toEqual({ bid: 64001 });
    expect(await s.get('missing')).toBeNull();
    expect(await s.delete('price:BTC')).toBe(true);
    expect(await s.delete('price:BTC')).toBe(false);
    expect(await s.get('price:BTC')).toBeNull();
    // A push after a delete continues the version sequence.
    expect(await s.push('price:BTC', [1, 'two', null, true])).toEqual({ key: 'price:BTC', version: 4 });
    expect(await s.get('price:BTC')).toEqual([1, 'two', null, true]);
  });

  test('the store contract the server backends keep too', async () => {
    const s = make({ connection: { path: ':memory:' } });
    await s.init();
    await expectStoreContract(s);
  });

  test('all JSON value kinds round-trip, unicode keys included', async () => {
    const s = make({ connection: { path: ':memory:' } });
    await s.init();
    const values = [0, -1.5, 'text', '', true, false, null, [], {}, { nested: { deep: [1, { x: 'é😀' }] } }];
    for (const [i, v] of values.entries()) {
      await s.push(`k😀${i}`, v);
    }
    for (const [i, v] of values.entries()) {
      expect(await s.get(`k😀${i}`)).toEqual(v);
    }
  });

  test('get falls back to the store when the cache misses (cache disabled)', async () => {
    const file = tmpDb();
    const a = make({ connection: { path: file } });
    await a.init();
    await a.push('x', { v: 1 });
    const b = make({ connection: { path: file }, options: { enableCache: false } });
    await b.init();
    expect(await b.get('x')).toEqual({ v: 1 });
    const st = b.getStatus();
    expect(st.cache.enabled).toBe(false);
    expect(st.cache.hits).toBe(0);
  });

  test('the cache answers repeated gets', async () => {
    const s = make({ connection: { path: tmpDb() } });
    await s.init();
    await s.push('hot', 42);
    // The first get reads the store and fills the cache; the rest are hits.
    for (let i = 0; i < 10; i++) expect(await s.get('hot')).toBe(42);
    let c = s.getStatus().cache;
    expect(c.misses).toBe(1);
    expect(c.hits).toBe(9);
    // A later change of a cached key refreshes it in place: still a hit, with the new value.
    await s.push('hot', 43);
    expect(await s.get('hot')).toBe(43);
    c = s.getStatus().cache;
    expect(c.hits).toBe(10);
    expect(c.hitRatio).toBeGreaterThan(0.5);
  });
});

describe('change events', () => {
  test('events carry type, key, data, version, seq, source, timestamp and latency, in order', async () => {
    const s = make({ connection: { path: tmpDb() } });
    const seen = [];
    const typed = [];
    s.on('change', (e) => seen.push(e));
    for (const t of ['insert', 'update', 'delete']) s.on(t, (e) => typed.push([t, e.version]));
    await s.init();
    const before = Date.now();
    await s.push('a', { n: 1 });
    await s.push('a', { n: 2 });
    await s.delete('a');
    await waitFor(() => seen.length === 3, '3 change events');
    expect(seen.map((e) => [e.type, e.key, e.version])).toEqual([
      ['insert', 'a', 1],
      ['update', 'a', 2],
      ['delete', 'a', 3],
    ]);
    expect(seen[0].data).toEqual({ n: 1 });
    expect(seen[2].data).toBeNull();
    expect(typed).toEqual([
      ['insert', 1],
      ['update', 2],
      ['delete', 3],
    ]);
    for (const e of seen) {
      expect(e.source).toBe('sqlite');
      expect(e.timestamp).toBeGreaterThanOrEqual(before - 1);
      expect(e.timestamp).toBeLessThanOrEqual(Date.now() + 1);
      expect(e.latency).toBeGreaterThanOrEqual(0);
      expect(e.latency).toBeLessThan(5000);
    }
    expect(seen.map((e) => e.seq)).toEqual([seen[0].seq, seen[0].seq + 1, seen[0].seq + 2]);
  });

  test('keys reach listeners exactly, whatever characters they hold, alone or in one batch', async () => {
    const keys = ['plain', 'quote"back\\slash', 'new\nline\ttab', 'é😀', 'del\x7fin', '\x7f', 'x\x01y'];
    for (const group of [keys.filter((k) => !k.includes('\x7f')), keys]) {
      const s = make({ connection: { path: ':memory:' } });
      const seen = [];
      s.on('change', (e) => seen.push(e.key));
      await s.init();
      // Concurrent pushes share a transaction, so their events share a batch.
      await Promise.all(group.map((k, i) => s.push(k, i)));
      await waitFor(() => seen.length === group.length, `${group.length} change events`);
      expect([...seen].sort()).toEqual([...group].sort());
      await s.close();
    }
  });

  test('event data arrives exactly, ASCII-only batches and batches with other characters alike', async () => {
    const s = make({ connection: { path: ':memory:' } });
    const seen = [];
    s.on('change', (e) => seen.push([e.key, e.data]));
    await s.init();
    // One push at a time: each batch is all ASCII (copied as is) or not (decoded from UTF-8).
    const values = [{ s: 'plain' }, { s: 'é' }, { s: 'ÿ€😀', n: [1, 'x\u0001'] }, { s: 'plain again' }, { s: '\u00ff' }];
    for (const [i, v] of values.entries()) {
      await s.push(`d${i}`, v);
      await waitFor(() => seen.length === i + 1, `change event ${i + 1}`);
    }
    expect(seen).toEqual(values.map((v, i) => [`d${i}`, v]));
    await s.close();
  });

  test('prefix filters, once and off', async () => {
    const s = make({ connection: { path: ':memory:' } });
    const prices = [];
    const onceSeen = [];
    const removed = [];
    const rm = (e) => removed.push(e.key);
    s.on('change', { prefix: 'price:' }, (e) => prices.push(e.key));
    s.once('change', { prefix: 'user:' }, (e) => onceSeen.push(e.key));
    s.on('change', { prefix: 'x' }, rm);
    s.off('change', rm);
    const all = [];
    s.on('change', (e) => all.push(e.key));
    await s.init();
    for (const k of ['news:1', 'price:BTC', 'user:1', 'price:ETH', 'user:2', 'x1']) await s.push(k, 1);
    await waitFor(() => all.length === 6, '6 events');
    expect(prices).toEqual(['price:BTC', 'price:ETH']);
    expect(onceSeen).toEqual(['user:1']);
    expect(removed).toEqual([]);
    expect(s.listenerCount('change')).toBe(2);
  });

  test('a filtered once listener fires once even when two matches arrive in one batch', async () => {
    // Concurrent pushes share one transaction, so their events come in one batch, unless the
    // store thread took the first push before the others were sent: then try again (bounded).
    let widest = 0;
    for (let attempt = 0; attempt < 10 && widest < 2; attempt++) {
      const s = make({ connection: { path: ':memory:' } });
      const onceSeen = [];
      const plainOnce = [];
      widest = 0;
      s.once('change', { prefix: 'user:' }, (e) => onceSeen.push(e.key));
      s.once('change', (e) => plainOnce.push(e.key));
      s.on('batch', (b) => (widest = Math.max(widest, b.filter((e) => e.key.startsWith('user:')).length)));
      await s.init();
      await Promise.all(['user:1', 'user:2', 'user:3', 'user:4'].map((k) => s.push(k, 1)));
      await waitFor(() => widest > 0, 'a batch');
      expect(onceSeen).toHaveLength(1);
      expect(plainOnce).toHaveLength(1);
      expect(s.listenerCount('change')).toBe(0);
      await s.close();
    }
    expect(widest).toBeGreaterThan(1);
  });

  test('a throwing listener does not stop delivery to the others; the error is reported', async () => {
    const s = make({ connection: { path: ':memory:' } });
    const good = [];
    const errors = [];
    s.on('change', () => {
      throw new Error('listener bug');
    });
    s.on('change', (e) => good.push(e.version));
    s.on('error', (err) => errors.push(err));
    await s.init();
    for (let i = 0; i < 5; i++) await s.push('k', i);
    await waitFor(() => good.length === 5, 'events to the good listener');
    expect(good).toEqual([1, 2, 3, 4, 5]);
    expect(errors).toHaveLength(5);
    expect(errors[0].code).toBe('USP_LISTENER_ERROR');
    expect(errors[0].message).toContain('listener bug');
    expect(errors[0].cause.message).toBe('listener bug');
    const st = s.getStatus();
    expect(st.errors.listener).toBe(5);
    expect(st.errors.last.code).toBe('USP_LISTENER_ERROR');
  });

  test('a throwing listener without an error listener does not crash the process', async () => {
    const r = await runNode([
      '-e',
      `const U = require(${JSON.stringify(ROOT)}); (async () => { const s = new U({ connection: { path: ':memory:' } });
       let n = 0; s.on('change', () => { throw new Error('boom'); }); s.on('change', () => n++);
       await s.init(); for (let i = 0; i < 3; i++) await s.push('k', i);
       while (n < 3) await new Promise((r) => setTimeout(r, 5));
       console.log(n, s.getStatus().errors.listener); await s.close(); })()`,
    ]);
    expect(r.code).toBe(0);
    expect(r.stdout.trim()).toBe('3 3');
    expect(r.stderr).toContain('USP_LISTENER_ERROR');
  });

  test("'ready' and 'close' are emitted", async () => {
    const s = new UltimateStreamer({ connection: { path: ':memory:' } });
    const got = [];
    s.on('ready', () => got.push('ready'));
    s.on('close', () => got.push('close'));
    await s.init();
    await s.close();
    expect(got).toEqual(['ready', 'close']);
  });
});

describe('status', () => {
  test('getStatus reports mode, backend, events, latency percentiles, cache, queues, errors, uptime', async () => {
    const s = make({ connection: { path: tmpDb() } });
    expect(s.getStatus().mode).toBe('idle');
    let n = 0;
    s.on('change', () => n++);
    await s.init();
    for (let i = 0; i < 20; i++) await s.push(`k${i % 5}`, { i });
    await s.get('k1');
    await waitFor(() => n === 20, '20 events');
    const st = s.getStatus();
    expect(st.mode).toBe('changelog');
    expect(st.connected).toBe(true);
    expect(st.backend.type).toBe('sqlite');
    expect(st.events.captured).toBe(20);
    expect(st.events.emitted).toBe(20);
    expect(st.latency.count).toBe(20);
    for (const p of ['p50', 'p95', 'p99', 'max']) expect(st.latency[p]).toBeGreaterThan(0);
    expect(st.latency.p50).toBeLessThanOrEqual(st.latency.p99);
    expect(st.latency.p99).toBeLessThanOrEqual(st.latency.max);
    expect(st.cache.hits + st.cache.misses).toBeGreaterThan(0);
    expect(st.queues.writes.capacity).toBe(65536);
    expect(st.queues.delivery.capacity).toBe(65536);
    expect(st.errors).toMatchObject({ recoverable: 0, fatal: 0 });
    expect(st.uptimeMs).toBeGreaterThanOrEqual(0);
    expect(st.store.writes).toBe(20);
    await s.close();
    expect(s.getStatus().mode).toBe('closed');
  });

  test('no secret reaches getStatus or config errors', () => {
    const s = new UltimateStreamer({ dbType: 'mysql', host: '127.0.0.1', user: 'app', password: 'hunter2-secret', database: 'shop' });
    const st = JSON.stringify(s.getStatus());
    expect(st).toContain('shop');
    expect(st).not.toContain('hunter2');
    const u = new UltimateStreamer({ database: 'mysql', connection: { uri: 'mysql://app:hunter2-secret@127.0.0.1/shop' } });
    expect(JSON.stringify(u.getStatus())).not.toContain('hunter2');
    let err;
    try {
      new UltimateStreamer({ database: 'mysql', connection: { uri: 'mysql://app:hunter2-secret@127.0.0.1:port/shop' } });
    } catch (e) {
      err = e;
    }
    expect(err.code).toBe('USP_INVALID_CONFIG');
    expect(err.message).not.toContain('hunter2');
  });
});

describe('close', () => {
  test('close delivers what was committed, then Node exits by itself', async () => {
    const r = await runNode([
      '-e',
      `const U = require(${JSON.stringify(ROOT)}); (async () => {
        const s = new U({ connection: { path: ${JSON.stringify(tmpDb())} } });
        let n = 0; s.on('change', () => n++);
        await s.init();
        const ps = []; for (let i = 0; i < 500; i++) ps.push(s.push('k' + (i % 7), i));
        await Promise.all(ps); await s.close(); console.log(n);
      })()`,
    ]);
    expect(r.code).toBe(0);
    expect(r.stdout.trim()).toBe('500');
    expect(r.ms).toBeLessThan(20_000);
  });

  test('close is idempotent and safe before init', async () => {
    const s = new UltimateStreamer({ connection: { path: ':memory:' } });
    await s.close();
    await s.close();
    expect(s.getStatus().closed).toBe(true);
  });
});
