'use strict';
// Changes committed by other processes reach this process's listeners, and with several
// processes pushing to the same keys every listener sees every (key, version) exactly once, in order.
const { spawn } = require('node:child_process');
const path = require('node:path');
const UltimateStreamer = require('..');
const { tmpDb, waitFor, sqliteExternal, rejectsWithCode, ROOT } = require('./helpers');

const streamers = [];
afterEach(async () => {
  await Promise.all(streamers.splice(0).map((s) => s.close()));
});

async function started(file, options) {
  const s = new UltimateStreamer({ connection: { path: file }, options });
  streamers.push(s);
  await s.init();
  return s;
}

test('writes made with plain SQL by another process are captured with database-assigned versions', async () => {
  const file = tmpDb();
  const s = await started(file);
  const seen = [];
  s.on('change', (e) => seen.push([e.type, e.key, e.version, e.data]));
  sqliteExternal(file, `INSERT INTO usp_kv (k, v) VALUES ('ext', '{"a":1}')`);
  sqliteExternal(file, `UPDATE usp_kv SET v = '{"a":2}' WHERE k = 'ext'`);
  sqliteExternal(file, `DELETE FROM usp_kv WHERE k = 'ext'`);
  sqliteExternal(file, `UPDATE usp_kv SET v = 'not json', deleted = 0 WHERE k = 'ext'`);
  await waitFor(() => seen.length === 4, '4 external changes');
  expect(seen).toEqual([
    ['insert', 'ext', 1, { a: 1 }],
    ['update', 'ext', 2, { a: 2 }],
    ['delete', 'ext', 3, null],
    ['update', 'ext', 4, 'not json'],
  ]);
  // The cache followed the external writes.
  expect(await s.get('ext')).toBe('not json');
});

test('a push whose change-log row is missing (a trigger dropped by another process) fails and writes nothing', async () => {
  const file = tmpDb();
  const s = await started(file);
  expect(await s.push('a', { n: 1 })).toEqual({ key: 'a', version: 1 });
  sqliteExternal(file, 'DROP TRIGGER usp_kv_log_update');
  const err = await rejectsWithCode(s.push('a', { n: 2 }), 'USP_DB_ERROR');
  expect(err.message).toMatch(/triggers/);
  expect(sqliteExternal(file, "SELECT v, version FROM usp_kv WHERE k = 'a'", { query: true })).toEqual([
    { v: '{"n":1}', version: 1 },
  ]);
  // Writes that still get their log row go on working.
  expect(await s.push('b', { n: 1 })).toEqual({ key: 'b', version: 1 });
});

test("a user's trigger that writes more keys: pushes get their own versions, listeners see every row once", async () => {
  const file = tmpDb();
  const s = await started(file);
  sqliteExternal(
    file,
    "CREATE TRIGGER audit_orders AFTER INSERT ON usp_kv WHEN NEW.k LIKE 'order:%' BEGIN INSERT INTO usp_kv (k, v) VALUES ('audit:' || NEW.k, '\"seen\"'); END;",
  );
  const seen = [];
  s.on('change', (e) => seen.push(`${e.key}@${e.version}`));
  const first = await Promise.all([s.push('order:1', { n: 1 }), s.push('order:2', { n: 2 }), s.push('plain', 1)]);
  expect(first).toEqual([
    { key: 'order:1', version: 1 },
    { key: 'order:2', version: 1 },
    { key: 'plain', version: 1 },
  ]);
  expect(await s.push('order:1', { n: 3 })).toEqual({ key: 'order:1', version: 2 });
  const expected = ['order:1@1', 'order:2@1', 'plain@1', 'audit:order:1@1', 'audit:order:2@1', 'order:1@2'];
  await waitFor(() => seen.length >= expected.length, 'every logged row');
  await new Promise((r) => setTimeout(r, 100));
  expect([...seen].sort()).toEqual([...expected].sort());
  expect(await s.get('audit:order:2')).toBe('seen');
});

test('a write that fails inside a transaction rolls the transaction back whole: nothing half-written', async () => {
  const file = tmpDb();
  const s = await started(file);
  await s.push('warm', 1);
  // A user's trigger that fails after the row was written (so the failed statement left work).
  sqliteExternal(
    file,
    "CREATE TRIGGER refuse_bad AFTER INSERT ON usp_kv WHEN NEW.k LIKE 'bad%' BEGIN SELECT RAISE(FAIL, 'bad key'); END;",
  );
  const keys = Array.from({ length: 40 }, (_, i) => (i % 10 === 5 ? `bad${i}` : `good${i}`));
  const results = await Promise.allSettled(keys.map((k) => s.push(k, { k })));
  const stored = new Set(sqliteExternal(file, 'SELECT k FROM usp_kv', { query: true }).map((r) => r.k));
  const logged = new Set(sqliteExternal(file, 'SELECT k FROM usp_kv_changes', { query: true }).map((r) => r.k));
  keys.forEach((k, i) => {
    const ok = results[i].status === 'fulfilled';
    if (k.startsWith('bad')) expect(ok).toBe(false);
    if (!ok) expect(results[i].reason.code).toBe('USP_DB_ERROR');
    if (!ok && !k.startsWith('bad')) expect(results[i].reason.message).toMatch(/another write failed/);
    expect([k, stored.has(k), logged.has(k)]).toEqual([k, ok, ok]);
  });
  expect(results.filter((r) => r.status === 'rejected').length).toBeGreaterThanOrEqual(4);
});

test.each([
  ['with the WAL file watch', true],
  ['polling only (sqlite.watch: false)', false],
])('pushes from another UltimateStreamer process reach this process, %s', async (_name, watch) => {
  const file = tmpDb();
  const s = await started(file, { sqlite: { watch } });
  const seen = [];
  s.on('change', (e) => seen.push([e.key, e.version, e.data]));
  const script = `const U = require(${JSON.stringify(ROOT)}); (async () => {
    const o = new U({ connection: { path: ${JSON.stringify(file)} } }); await o.init();
    for (let i = 0; i < 50; i++) await o.push('remote', { i });
    await o.delete('remote'); await o.close(); })()`;
  await new Promise((resolve, reject) => {
    const c = spawn(process.execPath, ['-e', script], { stdio: 'inherit' });
    c.on('exit', (code) => (code === 0 ? resolve() : reject(new Error(`child exited ${code}`))));
  });
  await waitFor(() => seen.length === 51, '51 remote changes');
  expect(seen.slice(0, 50).map((x) => x[1])).toEqual(Array.from({ length: 50 }, (_, i) => i + 1));
  expect(seen[49][2]).toEqual({ i: 49 });
  expect(seen[50]).toEqual(['remote', 51, null]);
  expect(await s.get('remote')).toBeNull();
});

/** Inserts `key` from another process (better-sqlite3), without blocking this event loop. */
function insertElsewhere(file, key) {
  const script = `
    const D = require(${JSON.stringify(path.join(ROOT, 'node_modules', 'better-sqlite3'))});
    const db = new D(process.argv[1]); db.pragma('busy_timeout = 5000');
    db.prepare("INSERT INTO usp_kv (k, v) VALUES (?, '1')").run(process.argv[2]); db.close();`;
  return new Promise((resolve, reject) => {
    const c = spawn(process.execPath, ['-e', script, file, key], { stdio: 'inherit' });
    c.on('exit', (code) => (code === 0 ? resolve(Date.now()) : reject(new Error(`writer exited ${code}`))));
  });
}

test("other processes' commits arrive at once while this process writes back to back (file watch stopped), and after", async () => {
  const file = tmpDb();
  // A 30 s poll: with the file watch stopped, only the store's own reads between its writes
  // can find the other process's commit quickly.
  const s = await started(file, { sqlite: { tailInterval: 30_000 } });
  const seen = new Map();
  s.on('change', (e) => {
    if (e.key.startsWith('ext')) seen.set(e.key, Date.now());
  });
  let writing = true;
  let own = 0;
  const loop = (async () => {
    while (writing) await Promise.all(Array.from({ length: 16 }, () => s.push(`own:${own++ % 100}`, own)));
  })();
  try {
    const committed = await insertElsewhere(file, 'ext:during');
    await waitFor(() => seen.has('ext:during'), 'the commit made during our writes', 3_000);
    expect(writing).toBe(true);
    // Well under the 30 s poll (the child process reports its exit a little after its commit).
    expect(seen.get('ext:during') - committed).toBeLessThan(1_000);
  } finally {
    writing = false;
    await loop;
  }
  expect(own).toBeGreaterThan(100);
  // Our writes stopped: the watch is back, and a commit wakes the engine (its WAL write comes
  // a moment before the commit is visible, so one look is not enough).
  await new Promise((r) => setTimeout(r, 50));
  const later = await insertElsewhere(file, 'ext:after');
  await waitFor(() => seen.has('ext:after'), 'the commit made after our writes', 3_000);
  expect(seen.get('ext:after') - later).toBeLessThan(1_000);
  // The watch fires once per arming: each commit after the first wakes the engine too.
  for (let i = 0; i < 3; i++) {
    const at = await insertElsewhere(file, `ext:next${i}`);
    await waitFor(() => seen.has(`ext:next${i}`), `commit ${i + 2} made after our writes`, 3_000);
    expect(seen.get(`ext:next${i}`) - at).toBeLessThan(1_000);
  }
});

function startPusher(file, writer, count, keys, total) {
  const child = spawn(process.execPath, [path.join(__dirname, 'fixtures', 'pusher.js'), file, String(writer), String(count), String(keys), String(total)], {
    stdio: ['pipe', 'pipe', 'inherit'],
  });
  let out = '';
  const ready = new Promise((resolve) => {
    child.stdout.on('data', (d) => {
      out += d;
      if (out.startsWith('ready\n')) resolve();
    });
  });
  const done = new Promise((resolve, reject) => {
    const timer = setTimeout(() => child.kill('SIGKILL'), 120_000);
    child.on('exit', (code) => {
      clearTimeout(timer);
      if (code !== 0) return reject(new Error(`pusher ${writer} exited with ${code}`));
      resolve(JSON.parse(out.slice('ready\n'.length)));
    });
  });
  return { child, ready, done };
}

test('two processes pushing to the same keys: every listener in both sees every version once, in order; caches equal the store', async () => {
  const file = tmpDb();
  // Create the schema before the pushers start, so both begin from the same position.
  const s = await started(file);
  const here = [];
  s.on('change', (e) => here.push([e.key, e.version]));
  const N = 2000;
  const K = 20;
  const a = startPusher(file, 1, N, K, 2 * N);
  const b = startPusher(file, 2, N, K, 2 * N);
  await Promise.all([a.ready, b.ready]);
  a.child.stdin.write('go\n');
  b.child.stdin.write('go\n');
  const [ra, rb] = await Promise.all([a.done, b.done]);

  const store = sqliteExternal(file, 'SELECT k, v, version FROM usp_kv ORDER BY k', { query: true });
  const log = sqliteExternal(file, 'SELECT k, v, version FROM usp_kv_changes ORDER BY seq', { query: true });
  expect(store).toHaveLength(K);
  expect(store.reduce((n, r) => n + r.version, 0)).toBe(2 * N);
  expect(log).toHaveLength(2 * N);
  const finalVersion = Object.fromEntries(store.map((r) => [r.k, r.version]));
  const dataAt = new Map(log.map((r) => [`${r.k}@${r.version}`, JSON.parse(r.v)]));

  await waitFor(() => here.length >= 2 * N, 'all changes in the test process', 30_000);

  const check = (events, who) => {
    expect({ who, n: events.length }).toEqual({ who, n: 2 * N });
    const perKey = new Map();
    for (const [k, v] of events) {
      if (!perKey.has(k)) perKey.set(k, []);
      perKey.get(k).push(v);
    }
    for (const [k, versions] of perKey) {
      // Exactly 1..final, in order: no loss, no duplicate, no reordering.
      expect({ who, k, versions }).toEqual({ who, k, versions: Array.from({ length: finalVersion[k] }, (_, i) => i + 1) });
    }
  };
  for (const [r, who] of [
    [ra, 'A'],
    [rb, 'B'],
  ]) {
    check(r.seenAll, `${who} all`);
    check(r.seenFiltered, `${who} filtered`);
    for (const [k, v, type, w, i] of r.seenAll) {
      expect(type).toBe(v === 1 ? 'insert' : 'update');
      expect({ w, i }).toEqual(dataAt.get(`${k}@${v}`));
    }
    for (const row of store) expect(r.cache[row.k]).toEqual(JSON.parse(row.v));
    expect(r.status.events.captured).toBe(2 * N);
    expect(r.status.errors.fatal).toBe(0);
    // Concurrent pushes shared transactions.
    expect(r.status.store.transactions).toBeLessThan(r.status.store.writes);
  }
  check(here, 'test process');
  for (const row of store) expect(await s.get(row.k)).toEqual(JSON.parse(row.v));
});
