'use strict';
// Adaptive batching and bounded queues, observed from JavaScript.
const UltimateStreamer = require('..');
const { tmpDb, waitFor } = require('./helpers');

const streamers = [];
afterEach(async () => {
  await Promise.all(streamers.splice(0).map((s) => s.close()));
});
async function started(options, file = tmpDb()) {
  const s = new UltimateStreamer({ connection: { path: file }, options });
  streamers.push(s);
  await s.init();
  return s;
}

test('an idle pipe delivers each event at once, alone', async () => {
  const s = await started();
  const batches = [];
  s.on('batch', (b) => batches.push(b.length));
  for (let i = 0; i < 20; i++) {
    await s.push('k', i);
    await waitFor(() => batches.length === i + 1, `event ${i}`);
  }
  expect(batches).toEqual(Array(20).fill(1));
  expect(s.getStatus().events.batches).toBe(20);
  // Once the listeners have run, nothing is in flight any more.
  await waitFor(() => s.getStatus().queues.inFlightBatches.depth === 0, 'an idle in-flight gauge');
  expect(s.getStatus().queues.delivery.depth).toBe(0);
});

test('the WAL file stays bounded under sustained writes', async () => {
  const fs = require('node:fs');
  const file = tmpDb();
  const s = await started({}, file);
  let maxWal = 0;
  const sample = setInterval(() => {
    try {
      maxWal = Math.max(maxWal, fs.statSync(`${file}-wal`).size);
    } catch {
      // not created yet
    }
  }, 10);
  let next = 0;
  const N = 60_000;
  await Promise.all(
    Array.from({ length: 64 }, async () => {
      while (next < N) {
        const i = next++;
        await s.push(`key:${(i * 7919) % 10_000}`, { n: i, pad: 'x'.repeat(48) });
      }
    }),
  );
  clearInterval(sample);
  expect(s.getStatus().store.writes).toBe(N);
  expect(maxWal).toBeGreaterThan(0);
  expect(maxWal).toBeLessThan(64 * 1024 * 1024);
});

test('under load events are coalesced: one JavaScript call per batch, never above batchSize, in order', async () => {
  const s = await started({ batchSize: 100 });
  const sizes = [];
  const versions = [];
  s.on('batch', (b) => sizes.push(b.length));
  s.on('change', (e) => versions.push(e.version));
  // A listener slower than the writer makes events pile up.
  s.on('change', () => {
    const until = process.hrtime.bigint() + 20_000n;
    while (process.hrtime.bigint() < until);
  });
  const N = 3000;
  await Promise.all(Array.from({ length: N }, (_, i) => s.push('hot', i)));
  await waitFor(() => versions.length === N, 'all events', 30_000);
  expect(versions).toEqual(Array.from({ length: N }, (_, i) => i + 1));
  expect(Math.max(...sizes)).toBeLessThanOrEqual(100);
  expect(sizes.length).toBeLessThan(N / 5);
  const st = s.getStatus();
  expect(st.events.batches).toBe(sizes.length);
  expect(st.events.maxBatch).toBe(Math.max(...sizes));
});

test('batchSize 1 makes one call per event', async () => {
  const s = await started({ batchSize: 1 });
  const sizes = [];
  s.on('batch', (b) => sizes.push(b.length));
  await Promise.all(Array.from({ length: 500 }, (_, i) => s.push(`k${i}`, i)));
  await waitFor(() => sizes.length === 500, '500 calls');
  expect(new Set(sizes)).toEqual(new Set([1]));
});

test('concurrent pushes share a transaction, bounded by writeBatchSize', async () => {
  const s = await started({ writeBatchSize: 50 });
  const N = 1000;
  const res = await Promise.all(Array.from({ length: N }, (_, i) => s.push(`k${i % 10}`, i)));
  const st = s.getStatus();
  expect(st.store.writes).toBe(N);
  expect(st.store.transactions).toBeLessThan(N / 2);
  expect(st.store.transactions).toBeGreaterThanOrEqual(N / 50);
  // Versions per key are 1..100, each exactly once.
  for (let k = 0; k < 10; k++) {
    const vs = res.filter((r) => r.key === `k${k}`).map((r) => r.version).sort((a, b) => a - b);
    expect(vs).toEqual(Array.from({ length: 100 }, (_, i) => i + 1));
  }
});

test('a slow listener is handled by backpressure: the delivery queue stays within queueSize and nothing is lost', async () => {
  const file = tmpDb();
  const s = await started({ queueSize: 64, batchSize: 16, maxInFlightBatches: 1 }, file);
  let seen = 0;
  let maxDepth = 0;
  let lastVersion = 0;
  let ordered = true;
  s.on('change', (e) => {
    if (e.version !== lastVersion + 1) ordered = false;
    lastVersion = e.version;
    seen++;
    const until = process.hrtime.bigint() + 50_000n; // 50 µs per event
    while (process.hrtime.bigint() < until);
  });
  const sample = setInterval(() => {
    maxDepth = Math.max(maxDepth, s.getStatus().queues.delivery.depth);
  }, 2);
  const N = 5000;
  await Promise.all(Array.from({ length: N }, (_, i) => s.push('slow', i)));
  // The writes are all committed although the listener is far behind.
  expect(s.getStatus().store.writes).toBe(N);
  await waitFor(() => seen === N, 'the slow listener to catch up', 60_000);
  clearInterval(sample);
  expect(ordered).toBe(true);
  expect(maxDepth).toBeLessThanOrEqual(64);
  const st = s.getStatus();
  expect(st.queues.inFlightBatches.depth).toBeLessThanOrEqual(1);
  expect(st.events.maxBatch).toBeLessThanOrEqual(16);
});

test('the cache is bounded in bytes', async () => {
  const s = await started({ cacheMaxBytes: 64 * 1024 });
  const big = 'x'.repeat(1000);
  for (let i = 0; i < 300; i++) await s.push(`big${i}`, big);
  const c = s.getStatus().cache;
  expect(c.bytes).toBeLessThanOrEqual(64 * 1024);
  expect(c.size).toBeLessThan(300);
  // Evicted keys are still read from the store.
  expect(await s.get('big0')).toBe(big);
});

test('cache TTL expires entries; the store still answers', async () => {
  const s = await started({ cacheTTL: 50 });
  await s.push('t', 1);
  await s.get('t');
  const hits = s.getStatus().cache.hits;
  await new Promise((r) => setTimeout(r, 120));
  expect(await s.get('t')).toBe(1);
  expect(s.getStatus().cache.hits).toBe(hits); // a miss, answered by the store
});
