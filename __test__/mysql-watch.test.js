'use strict';
// watch(table): row changes of any table of a real MariaDB (binlog on), with column names,
// faithful types, before images, stable ids, operation filters and DDL.
const { waitFor, rejectsWithCode, tmpDb, streamerPool } = require('./helpers');
const { startMariaDb } = require('./mariadb');

jest.setTimeout(120_000);

let db;
beforeAll(async () => {
  db = await startMariaDb();
});
afterAll(async () => {
  if (db) await db.stop();
});

const pool = streamerPool();
const make = (options = {}) => pool(db.config(options));

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

test('rows of a watched table arrive with names, types, before images and stable ids', async () => {
  await db.sql(`CREATE TABLE orders (
    id INT PRIMARY KEY, qty SMALLINT, delta INT, big BIGINT UNSIGNED, neg BIGINT, price DECIMAL(10,2),
    note VARCHAR(50), doc JSON, bin BLOB, created DATE, at DATETIME(3), ts TIMESTAMP(3) NULL,
    status ENUM('new','paid'), flag TINYINT, ratio DOUBLE, nothing INT NULL)`);
  await db.sql('CREATE TABLE other_rows (id INT PRIMARY KEY)');
  const s = make({ table: 'kv_watch_1' });
  const rows = [];
  const changes = [];
  s.on('row', (e) => rows.push(e));
  s.on('change', (e) => changes.push(e));
  await s.init();
  await s.watch('orders');

  await db.sql(`INSERT INTO orders VALUES (1, -2, -5, 18446744073709551615, -9007199254740993, 12.50, 'x',
    '{"a":[1,2]}', X'00FF01', '2024-02-29', '2024-01-31 12:34:56.789', '2024-01-31 12:34:56.789', 'paid', -1, 0.5, NULL)`);
  await db.sql('INSERT INTO other_rows VALUES (7)');
  await db.sql("UPDATE orders SET qty = 3, note = 'y' WHERE id = 1");
  await db.sql('DELETE FROM orders WHERE id = 1');
  await s.push('kv-key', 1);
  await waitFor(() => rows.length >= 3 && changes.length >= 1, '3 rows and 1 change');
  await sleep(200);
  expect(rows.map((r) => r.type)).toEqual(['insert', 'update', 'delete']);
  expect(changes.map((c) => c.key)).toEqual(['kv-key']);
  const [ins, upd, del] = rows;
  expect(ins.table).toBe('orders');
  expect(ins.source).toBe('mysql');
  expect(ins.key).toEqual({ id: 1 });
  expect(ins.before).toBeNull();
  expect(ins.row).toEqual({
    id: 1,
    qty: -2,
    delta: -5,
    big: '18446744073709551615',
    neg: '-9007199254740993',
    price: '12.50',
    note: 'x',
    doc: { a: [1, 2] },
    bin: 'AP8B',
    created: '2024-02-29',
    at: '2024-01-31T12:34:56.789',
    ts: '2024-01-31T12:34:56.789Z',
    status: 'paid',
    flag: -1,
    ratio: 0.5,
    nothing: null,
  });
  // Columns in table order.
  expect(Object.keys(ins.row)).toEqual(['id', 'qty', 'delta', 'big', 'neg', 'price', 'note', 'doc', 'bin', 'created', 'at', 'ts', 'status', 'flag', 'ratio', 'nothing']);
  expect(upd.before).toMatchObject({ qty: -2, note: 'x' });
  expect(upd.row).toMatchObject({ qty: 3, note: 'y', big: '18446744073709551615' });
  expect(del.row).toBeNull();
  expect(del.before).toMatchObject({ id: 1, qty: 3 });
  expect(del.key).toEqual({ id: 1 });
  // Ids name the binlog position: distinct, and ordered like the seq numbers.
  for (const r of rows) expect(r.id).toMatch(/^\d+:\d+:\d+$/);
  expect(new Set(rows.map((r) => r.id)).size).toBe(3);
  expect(rows[0].seq).toBeLessThan(rows[1].seq);
});

test('operations filter, a per-table listener, and DDL gives a schema event without stopping the stream', async () => {
  await db.sql('CREATE TABLE items (sku VARCHAR(20) PRIMARY KEY, n INT)');
  const s = make({ table: 'kv_watch_2' });
  const schema = [];
  s.on('schema', (e) => schema.push(e));
  await s.init();
  const seen = [];
  await s.watch('items', (e) => seen.push(e));
  const deletes = [];
  await db.sql('CREATE TABLE audit (id INT PRIMARY KEY)');
  await s.watch('audit', { operations: ['delete'] }, (e) => deletes.push(e));
  await db.sql("INSERT INTO items VALUES ('a', 1)");
  await db.sql('INSERT INTO audit VALUES (1), (2)');
  await db.sql('DELETE FROM audit WHERE id = 1');
  await waitFor(() => seen.length >= 1 && deletes.length >= 1, 'items insert and audit delete');
  await db.sql('ALTER TABLE items ADD COLUMN color VARCHAR(10) NULL');
  await db.sql("INSERT INTO items VALUES ('b', 2, 'red')");
  await waitFor(() => seen.length >= 2, 'the row after the DDL');
  await sleep(200);
  expect(seen.map((r) => r.row)).toEqual([{ sku: 'a', n: 1 }, { sku: 'b', n: 2, color: 'red' }]);
  expect(deletes.map((r) => [r.type, r.before])).toEqual([['delete', { id: 1 }]]);
  expect(schema).toEqual([expect.objectContaining({ type: 'schema', table: 'items', columns: ['sku', 'n', 'color'] })]);
});

test('a table written before watch() is called: its rows after the call arrive (an unchanged table map is not decoded twice, but a new watch is seen)', async () => {
  await db.sql('CREATE TABLE later (id INT PRIMARY KEY, n INT)');
  const s = make({ table: 'kv_watch_later' });
  await s.init();
  const kv = [];
  s.on('change', (e) => kv.push(e.key));
  // Rows of the table while nobody watches it, and a key-value write after them, so the
  // capture has read (and remembered) the table's map before the watch starts.
  await db.sql('INSERT INTO later VALUES (1, 1), (2, 2)');
  await s.push('after-unwatched', 1);
  await waitFor(() => kv.includes('after-unwatched'), 'the push after the unwatched rows');
  const seen = [];
  await s.watch('later', (e) => seen.push(e));
  await db.sql('INSERT INTO later VALUES (3, 3)');
  await db.sql('UPDATE later SET n = 30 WHERE id = 3');
  await waitFor(() => seen.length >= 2, 'rows after watch()');
  await sleep(200);
  expect(seen.map((e) => [e.type, e.row])).toEqual([
    ['insert', { id: 3, n: 3 }],
    ['update', { id: 3, n: 30 }],
  ]);
});

test('without column names in the binlog (binlog_row_metadata=MINIMAL), names come from information_schema, re-read after DDL', async () => {
  db.rootSql("SET GLOBAL binlog_row_metadata = 'MINIMAL'");
  try {
    expect(db.rootSql('SELECT @@global.binlog_row_metadata').trim()).toBe('MINIMAL');
    await db.sql('CREATE TABLE minimal_meta (id INT PRIMARY KEY, a INT UNSIGNED)');
    const s = make({ table: 'kv_watch_8' });
    const rows = [];
    const schema = [];
    s.on('schema', (e) => schema.push(e));
    await s.init();
    await s.watch('minimal_meta', (e) => rows.push(e));
    await db.sql('INSERT INTO minimal_meta VALUES (1, 4000000000)');
    await waitFor(() => rows.length >= 1, 'the first row');
    await db.sql("ALTER TABLE minimal_meta ADD COLUMN label VARCHAR(10) NULL");
    await db.sql("INSERT INTO minimal_meta VALUES (2, 5, 'two')");
    await waitFor(() => rows.length >= 2, 'the row after the DDL');
    expect(rows.map((r) => r.row)).toEqual([{ id: 1, a: 4000000000 }, { id: 2, a: 5, label: 'two' }]);
    expect(rows[1].key).toEqual({ id: 2 });
    expect(schema.map((e) => e.columns)).toEqual([['id', 'a', 'label']]);
  } finally {
    db.rootSql("SET GLOBAL binlog_row_metadata = 'FULL'");
  }
});

test('a row the binlog client cannot decode (non-UTF-8 bytes in VARBINARY) is reported loudly, and the stream goes on', async () => {
  await db.sql('CREATE TABLE raw_bytes (id INT PRIMARY KEY, b VARBINARY(8))');
  const s = make({ table: 'kv_watch_5', logLevel: 'off' });
  const rows = [];
  s.on('row', (e) => rows.push(e));
  await s.init();
  await s.watch('raw_bytes');
  await db.sql("INSERT INTO raw_bytes VALUES (1, X'00FF01')");
  await db.sql("INSERT INTO raw_bytes VALUES (2, 'ok')");
  await waitFor(() => rows.length >= 1, 'the decodable row');
  expect(rows.map((r) => r.row)).toEqual([{ id: 2, b: 'ok' }]);
  const st = s.getStatus();
  expect(st.errors.last.code).toBe('USP_DB_ERROR');
  expect(st.errors.last.message).toMatch(/not decoded/);
});

test('tables in options.mysql.watch are watched from init(): rows written while closed arrive once on resume', async () => {
  await db.sql('CREATE TABLE resumed (id INT PRIMARY KEY, v VARCHAR(10))');
  const cfg = { table: 'kv_watch_6', mysql: { watch: ['resumed'], checkpointName: 'w6' } };
  const a = make(cfg);
  const seenA = [];
  a.on('row', (e) => seenA.push(e));
  await a.init();
  await db.sql("INSERT INTO resumed VALUES (0, 'first')");
  await waitFor(() => seenA.length >= 1, 'the first row');
  await a.close();
  const N = 500;
  for (let i = 1; i <= N; i += 100) {
    const values = Array.from({ length: 100 }, (_, k) => `(${i + k}, 'r')`).join(',');
    await db.sql(`INSERT INTO resumed VALUES ${values}`);
  }
  const b = make(cfg);
  const seenB = [];
  b.on('row', (e) => seenB.push(e));
  await b.init();
  await waitFor(() => seenB.length >= N, `${N} rows on resume`);
  await sleep(300);
  expect(seenB.length).toBe(N);
  expect(new Set(seenB.map((e) => e.key.id)).size).toBe(N);
  expect(seenB.some((e) => e.key.id === 0)).toBe(false);
  const bad = make({ table: 'kv_watch_7', mysql: { watch: ['no_such_table'] } });
  await rejectsWithCode(bad.init(), 'USP_INVALID_CONFIG');
});

test('a 100,000-row transaction streams through bounded queues', async () => {
  const table = 'kv_watch_big';
  const s = make({ table, queueSize: 2048 });
  let n = 0;
  s.on('change', () => {
    n += 1;
  });
  await s.init();
  const rss0 = process.memoryUsage().rss;
  let maxDepth = 0;
  let maxRss = rss0;
  const sampler = setInterval(() => {
    maxDepth = Math.max(maxDepth, s.getStatus().queues.delivery.depth);
    maxRss = Math.max(maxRss, process.memoryUsage().rss);
  }, 5);
  const N = 100_000;
  await db.sql(`INSERT INTO ${table} (k, v, version) SELECT CONCAT('m', seq), CONCAT('{"n":', seq, ',"pad":"0123456789abcdef"}'), 1 FROM seq_1_to_${N}`);
  await waitFor(() => n >= N, `${N} events`, 90_000);
  clearInterval(sampler);
  await sleep(200);
  expect(n).toBe(N);
  expect(maxDepth).toBeLessThanOrEqual(2048 + 1000);
  // The rows are ~6 MB of values; buffering the whole transaction several times over would show.
  expect(maxRss - rss0).toBeLessThan(256 * 1024 * 1024);
});

test('watch() refuses bad tables and backends with coded errors', async () => {
  const s = make({ table: 'kv_watch_3' });
  await s.init();
  await rejectsWithCode(s.watch('no_such_table'), 'USP_INVALID_ARGUMENT');
  await rejectsWithCode(s.watch('bad name; DROP TABLE x'), 'USP_INVALID_ARGUMENT');
  await rejectsWithCode(s.watch(''), 'USP_INVALID_ARGUMENT');
  await rejectsWithCode(s.watch('orders', { operations: ['upsert'] }), 'USP_INVALID_ARGUMENT');
  await rejectsWithCode(s.watch('orders', { operations: [] }), 'USP_INVALID_ARGUMENT');
  await rejectsWithCode(s.watch('orders', { nope: 1 }), 'USP_INVALID_ARGUMENT');
  const lite = pool({ connection: { path: tmpDb() } });
  await rejectsWithCode(lite.watch('orders'), 'USP_NOT_INITIALIZED');
  await lite.init();
  await rejectsWithCode(lite.watch('orders'), 'USP_UNSUPPORTED_BACKEND');
  const polling = make({ table: 'kv_watch_4', useChangeStreams: false });
  await polling.init();
  await rejectsWithCode(polling.watch('orders'), 'USP_UNSUPPORTED_BACKEND');
});
