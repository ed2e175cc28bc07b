'use strict';
// A reader that falls behind the pruned part of the change log is told so (a 'resync' event
// naming the lost range), then continues: never a silent gap.
const { spawn } = require('node:child_process');
const UltimateStreamer = require('..');
const { tmpDb, waitFor, ROOT, runNode } = require('./helpers');

test('falling behind the change-log retention gives a resync event with the lost range', async () => {
  const file = tmpDb();
  const s = new UltimateStreamer({ connection: { path: file }, options: { queueSize: 16, batchSize: 4, maxInFlightBatches: 1 } });
  const versions = [];
  const resyncs = [];
  let blocked = false;
  s.on('change', (e) => {
    versions.push(e.version);
    if (!blocked) {
      // The first event keeps this process busy while the other one writes and prunes.
      blocked = true;
      const until = Date.now() + 7_000;
      while (Date.now() < until);
    }
  });
  s.on('resync', (e) => resyncs.push(e));
  await s.init();
  // The writer prunes its change log to 100 rows every 5 s; it stays open for 6 s.
  const writer = runNode([
    '-e',
    `const U = require(${JSON.stringify(ROOT)}); (async () => {
      const w = new U({ connection: { path: ${JSON.stringify(file)} }, options: { sqlite: { changeLogRetention: 100 } } });
      await w.init();
      for (let i = 0; i < 1000; i++) await w.push('k', i);
      await new Promise((r) => setTimeout(r, 6000));
      await w.close();
    })()`,
  ]);
  const r = await writer;
  expect(r.code).toBe(0);
  await waitFor(() => versions.includes(1000), 'the last version', 20_000);
  expect(resyncs).toHaveLength(1);
  const { from, to, reason, source } = resyncs[0];
  expect(source).toBe('sqlite');
  expect(reason).toMatch(/changeLogRetention/);
  expect(to).toBeGreaterThanOrEqual(from);
  // Exactly the announced range is missing; everything else arrived once, in order.
  const missing = [];
  for (let v = 1; v <= 1000; v++) if (!versions.includes(v)) missing.push(v);
  expect(missing).toEqual(Array.from({ length: to - from + 1 }, (_, i) => from + i));
  expect(versions).toEqual([...versions].sort((a, b) => a - b));
  expect(new Set(versions).size).toBe(versions.length);
  expect(s.getStatus().events.resyncs).toBe(1);
  await s.close();
}, 60_000);

test('a resync without a listener is printed as a process warning', async () => {
  const file = tmpDb();
  const reader = spawn(
    process.execPath,
    [
      '-e',
      `const U = require(${JSON.stringify(ROOT)}); (async () => {
        const s = new U({ connection: { path: ${JSON.stringify(file)} }, options: { queueSize: 16, batchSize: 4, maxInFlightBatches: 1 } });
        let last = 0, n = 0;
        s.on('change', (e) => { last = e.version; if (n++ === 0) { const t = Date.now() + 7000; while (Date.now() < t); } });
        await s.init();
        console.log('ready');
        const deadline = Date.now() + 30000;
        while (last < 500 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
        await s.close();
      })()`,
    ],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let stderr = '';
  reader.stderr.on('data', (d) => (stderr += d));
  const exited = new Promise((resolve) => reader.on('exit', resolve));
  await new Promise((resolve) => reader.stdout.once('data', resolve));
  const w = await runNode([
    '-e',
    `const U = require(${JSON.stringify(ROOT)}); (async () => {
      const w = new U({ connection: { path: ${JSON.stringify(file)} }, options: { sqlite: { changeLogRetention: 100 } } });
      await w.init();
      for (let i = 0; i < 500; i++) await w.push('k', i);
      await new Promise((r) => setTimeout(r, 6000));
      await w.close();
    })()`,
  ]);
  expect(w.code).toBe(0);
  expect(await exited).toBe(0);
  expect(stderr).toMatch(/USP_RESYNC/);
  expect(stderr).toMatch(/changeLogRetention/);
}, 60_000);
