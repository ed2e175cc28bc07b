'use strict';
// MySQL/MariaDB backend against a real MariaDB (binlog on) started privately for this file:
// the store contract, capture of other writers through the binlog, resume after close and after
// a server crash, bad credentials, and SQL injection attempts.
const UltimateStreamer = require('..');
const { waitFor, rejectsWithCode, throwsWithCode, streamerPool, collectChanges, freshName, expectStoreContract } = require('./helpers');
const mysql = require('mysql2/promise');
const { startMariaDb, PASSWORD } = require('./mariadb');

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
const collect = collectChanges;
const freshTable = () => freshName('kv');

describe('store contract', () => {
  test('push/get/delete with database-assigned versions, and every change once from the binlog', async () => {
    const s = make({ table: freshTable() });
    const seen = collect(s);
    await s.init();
    const st = s.getStatus();
    expect(st.mode).toBe('binlog');
    expect(st.connected).toBe(true);
    expect(st.source.server.flavor).toBe('mariadb');
    expect(st.source.server.binlogFormat).toBe('ROW');
    // The replication socket is read through the engine's buffer, not packet by packet.
    expect(st.source.binlogReader).toBe('buffered');
    expect(JSON.stringify(st)).not.toContain(PASSWORD);

    await expectStoreContract(s);

    await waitFor(() => seen.count() >= 6, '6 change events');
    expect(seen.events.map((e) => [e.type, e.key, e.version, e.data])).toEqual([
      ['insert', 'a', 1, { x: 1 }],
      ['update', 'a', 2, { x: 2 }],
      ['insert', 'b', 1, 1],
      ['update', 'b', 2, 2],
      ['delete', 'a', 3, null],
      ['insert', 'a', 4, 'again'],
    ]);
    for (const e of seen.events) {
      expect(e.source).toBe('mysql');
      expect(typeof e.seq).toBe('number');
      expect(e.timestamp).toBeGreaterThan(Date.now() - 60_000);
    }
    await new Promise((r) => setTimeout(r, 100));
    expect(seen.count()).toBe(6);
  });

  test('concurrent pushes share transactions and each version arrives once, in order', async () => {
    const s = make({ table: freshTable() });
    const seen = collect(s);
    await s.init();
    const N = 400;
    const results = await Promise.all(Array.from({ length: N }, (_, i) => s.push(`k${i % 20}`, { i })));
    // 20 keys x 20 versions each.
    for (let k = 0; k < 20; k++) {
      const vs = results.filter((r) => r.key === `k${k}`).map((r) => r.version);
      expect(vs).toEqual(Array.from({ length: 20 }, (_, i) => i + 1));
    }
    expect(s.getStatus().store.transactions).toBeLessThan(N);
    await waitFor(() => seen.count() >= N, `${N} events`);
    for (let k = 0; k < 20; k++) {
      expect(seen.versions(`k${k}`)).toEqual(Array.from({ length: 20 }, (_, i) => i + 1));
    }
  });

  test('keys and values that look like SQL are stored as data; bad table names are refused', async () => {
    const table = freshTable();
    const s = make({ table });
    await s.init();
    const keys = ["a'b", 'x`; DROP TABLE usp_kv; --', "'); DELETE FROM t; --", 'back\\slash', 'ünï 🚀', 'a ', 'A'];
    for (const [i, k] of keys.entries()) {
      expect(await s.push(k, { v: `"); DROP TABLE ${table}; --`, i })).toEqual({ key: k, version: 1 });
    }
    for (const [i, k] of keys.entries()) {
      expect(await s.get(k)).toEqual({ v: `"); DROP TABLE ${table}; --`, i });
    }
    // Keys differ by case and by trailing space: distinct keys.
    const rows = await db.sql(`SELECT k FROM \`${table}\` ORDER BY k`);
    expect(rows.length).toBe(keys.length);
    expect(await s.delete("a'b")).toBe(true);
    expect(await s.get("a'b")).toBeNull();
    for (const bad of ['kv; DROP TABLE x', 'a`b', 'a b', '']) {
      throwsWithCode(() => new UltimateStreamer(db.config({ table: bad })), 'USP_INVALID_CONFIG');
    }
  });
});

describe('write transactions', () => {
  // Keys and values with every character that SQL string escaping must handle.
  const EVIL = ["a'b", 'x`; DROP TABLE usp_kv; --', "'); DELETE FROM t; --", 'back\\slash', "\\'", 'ctrl-z\u001a', 'cr\rlf\n', '"dq"', 'ünï 🚀', '%_'];

  async function roundTrip(s, table) {
    const seen = collect(s);
    await s.init();
    // Concurrent calls: one shared transaction, one text query.
    const before = s.getStatus().store.transactions;
    const pushed = await Promise.all(EVIL.map((k, i) => s.push(k, { k, i, text: `${k}\\'"` })));
    expect(pushed).toEqual(EVIL.map((key) => ({ key, version: 1 })));
    expect(s.getStatus().store.transactions - before).toBeLessThan(EVIL.length);
    const rows = await db.sql(`SELECT k, v, version FROM \`${table}\``);
    expect(rows.map((r) => r.k).sort()).toEqual([...EVIL].sort());
    for (const r of rows) {
      const i = EVIL.indexOf(r.k);
      expect(JSON.parse(r.v)).toEqual({ k: EVIL[i], i, text: `${EVIL[i]}\\'"` });
      expect(r.version).toBe(1);
    }
    const deleted = await Promise.all(EVIL.map((k) => s.delete(k)));
    expect(deleted).toEqual(EVIL.map(() => true));
    for (const k of EVIL) expect(await s.get(k)).toBeNull();
    await waitFor(() => seen.count() >= 2 * EVIL.length, 'every insert and delete');
    for (const k of EVIL) expect(seen.versions(k)).toEqual([1, 2]);
  }

  test('keys and values with quotes, backslashes and control characters, written in one shared transaction', async () => {
    const table = freshTable();
    await roundTrip(make({ table }), table);
  });

  test('the same under sql_mode NO_BACKSLASH_ESCAPES', async () => {
    const old = db.rootSql('SELECT @@GLOBAL.sql_mode').trim();
    db.rootSql("SET GLOBAL sql_mode = CONCAT(@@GLOBAL.sql_mode, ',NO_BACKSLASH_ESCAPES')");
    try {
      const table = freshTable();
      await roundTrip(make({ table }), table);
    } finally {
      db.rootSql(`SET GLOBAL sql_mode = '${old}'`);
    }
  });

  test('a transaction over 1 MiB goes statement by statement, with the same results', async () => {
    const table = freshTable();
    const s = make({ table });
    const seen = collect(s);
    await s.init();
    const big = (i) => ({ i, pad: `${"'\\".repeat(10)}${'x'.repeat(300_000)}` });
    const pushed = await Promise.all([0, 1, 2, 3, 4].map((i) => s.push(`big${i % 2}`, big(i))));
    expect(pushed.map((r) => [r.key, r.version])).toEqual([
      ['big0', 1],
      ['big1', 1],
      ['big0', 2],
      ['big1', 2],
      ['big0', 3],
    ]);
    expect(await s.get('big0')).toEqual(big(4));
    expect(await s.get('big1')).toEqual(big(3));
    await waitFor(() => seen.count() >= 5, '5 events');
    expect(seen.versions('big0')).toEqual([1, 2, 3]);
  });

  test('a statement that fails mid-transaction rolls the whole transaction back, and the next one works', async () => {
    const table = freshTable();
    const s = make({ table });
    await s.init();
    // A trigger, created by a user without SUPER while the binlog is on, needs this.
    db.rootSql('SET GLOBAL log_bin_trust_function_creators = 1');
    await db.sql(
      `CREATE TRIGGER \`${table}_refuse\` BEFORE UPDATE ON \`${table}\` FOR EACH ROW BEGIN IF NEW.deleted = 1 AND OLD.k LIKE 'bad%' THEN SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'bad key'; END IF; END`,
    );
    await s.push('bad1', 0);
    await s.push('blocker', 0);
    // One transaction: the upsert of good1 succeeds, the delete of bad1 fails. To be sure the
    // three calls share it, the store is kept busy meanwhile: its transaction for `blocker`
    // waits for a row lock held by another connection, and the three calls queue behind it.
    const holder = await mysql.createConnection({ host: '127.0.0.1', port: db.port, user: 'usp', password: PASSWORD, database: 'usp_test' });
    let results;
    try {
      await holder.query('START TRANSACTION');
      await holder.query(`SELECT k FROM \`${table}\` WHERE k = 'blocker' FOR UPDATE`);
      const blocked = s.push('blocker', 1);
      await waitFor(
        () => Number(db.rootSql("SELECT COUNT(*) FROM information_schema.INNODB_TRX WHERE trx_state = 'LOCK WAIT'").trim()) > 0,
        'the store to wait for the row lock',
      );
      const settled = Promise.allSettled([s.push('good1', 1), s.delete('bad1'), s.push('good2', 3)]);
      await holder.query('COMMIT');
      expect(await blocked).toEqual({ key: 'blocker', version: 2 });
      results = await settled;
    } finally {
      await holder.end();
    }
    expect(results.map((r) => r.status)).toEqual(['rejected', 'rejected', 'rejected']);
    expect(results[0].reason.code).toBe('USP_DB_ERROR');
    expect(String(results[1].reason.message)).toContain('bad key');
    const rows = await db.sql(`SELECT k, deleted FROM \`${table}\` WHERE k <> 'blocker' ORDER BY k`);
    expect(rows.map((r) => [r.k, r.deleted])).toEqual([['bad1', 0]]);
    // Nothing of it was left open to be committed by the next transaction.
    expect(await s.push('good1', 'after')).toEqual({ key: 'good1', version: 1 });
    expect(await s.get('good1')).toBe('after');
  });
});

describe('capture of other writers', () => {
  test('SQL writes to the key-value table reach listeners; other tables do not', async () => {
    const table = freshTable();
    const s = make({ table });
    const seen = collect(s);
    await s.init();
    await db.sql('CREATE TABLE IF NOT EXISTS other_t (id INT PRIMARY KEY, v TEXT)');
    await db.sql(`INSERT INTO \`${table}\` (k, v, version) VALUES ('ext', '{"n":1}', 1)`);
    await db.sql('INSERT INTO other_t VALUES (1, ?) ON DUPLICATE KEY UPDATE v = VALUES(v)', ['ignored']);
    await db.sql(`UPDATE \`${table}\` SET v = '{"n":2}', version = version + 1 WHERE k = 'ext'`);
    // A SQL client that does not bump the version is still a change, not a duplicate.
    await db.sql(`UPDATE \`${table}\` SET v = 'not json' WHERE k = 'ext'`);
    await db.sql(`DELETE FROM \`${table}\` WHERE k = 'ext'`);
    // Re-created after a SQL DELETE: versions restart, and the change is delivered.
    await db.sql(`INSERT INTO \`${table}\` (k, v, version) VALUES ('ext', '3', 1)`);
    await waitFor(() => seen.count() >= 5, '5 events');
    expect(seen.events.map((e) => [e.type, e.key, e.data])).toEqual([
      ['insert', 'ext', { n: 1 }],
      ['update', 'ext', { n: 2 }],
      ['update', 'ext', 'not json'],
      ['delete', 'ext', null],
      ['insert', 'ext', 3],
    ]);
    // The cache follows: get() sees the re-created value, not a stale one.
    expect(await s.get('ext')).toBe(3);
    await new Promise((r) => setTimeout(r, 100));
    expect(seen.count()).toBe(5);
  });

  test('resume after close: every row written while no streamer ran arrives exactly once', async () => {
    const table = freshTable();
    const a = make({ table });
    const seenA = collect(a);
    await a.init();
    await a.push('before', 1);
    await waitFor(() => seenA.count() >= 1, 'first event');
    await a.close();

    const N = 2000;
    for (let start = 0; start < N; start += 100) {
      const values = Array.from({ length: 100 }, (_, i) => `('r${start + i}', '${start + i}', 1)`).join(',');
      await db.sql(`INSERT INTO \`${table}\` (k, v, version) VALUES ${values}`);
    }
    const b = make({ table });
    const seenB = collect(b);
    await b.init();
    await waitFor(() => seenB.count() >= N, `${N} events after resume`, 30_000);
    await new Promise((r) => setTimeout(r, 200));
    expect(seenB.count()).toBe(N);
    expect(new Set(seenB.events.map((e) => e.key)).size).toBe(N);
    expect(seenB.events.some((e) => e.key === 'before')).toBe(false);
    expect(seenB.events[0].key).toBe('r0');
    expect(seenB.events[N - 1].key).toBe(`r${N - 1}`);
  });

  test('server killed (kill -9) and restarted mid-stream: every committed row exactly once', async () => {
    const table = freshTable();
    const s = make({ table, mysql: { reconnectMinDelay: 50, reconnectMaxDelay: 500 } });
    const seen = collect(s);
    let reconnectingSeen = false;
    await s.init();
    const N = 2400;
    const BATCH = 10;
    let killed = false;
    for (let start = 0; start < N; start += BATCH) {
      if (!killed && start >= N / 3) {
        killed = true;
        await db.kill();
        await waitFor(() => s.getStatus().source.reconnecting, 'status reconnecting', 15_000);
        reconnectingSeen = true;
        await db.restart();
      }
      const values = Array.from({ length: BATCH }, (_, i) => `('c${start + i}', '${start + i}', 1)`).join(',');
      // INSERT IGNORE: a batch retried after an unclear failure is not written twice.
      for (let attempt = 0; ; attempt++) {
        try {
          await db.sql(`INSERT IGNORE INTO \`${table}\` (k, v, version) VALUES ${values}`);
          break;
        } catch (e) {
          if (attempt > 50) throw e;
          await db.closePool();
          await new Promise((r) => setTimeout(r, 100));
        }
      }
    }
    const rows = await db.sql(`SELECT COUNT(*) AS n FROM \`${table}\``);
    expect(Number(rows[0].n)).toBe(N);
    await waitFor(() => seen.count() >= N, `${N} events across the crash`, 60_000);
    await new Promise((r) => setTimeout(r, 300));
    expect(reconnectingSeen).toBe(true);
    expect(seen.count()).toBe(N);
    expect(new Set(seen.events.map((e) => e.key)).size).toBe(N);
    const st = s.getStatus();
    expect(st.source.reconnects).toBeGreaterThanOrEqual(1);
    expect(st.source.reconnecting).toBe(false);
    expect(st.errors.recoverable).toBeGreaterThanOrEqual(1);
    // The store side reconnects too.
    expect(await s.push('after-crash', 1)).toEqual({ key: 'after-crash', version: 1 });
  });
});

describe('large transactions and lost checkpoints', () => {
  test('a 20,000-row transaction streams through in chunks, every row once', async () => {
    const table = freshTable();
    const s = make({ table, queueSize: 4096 });
    const seen = collect(s);
    await s.init();
    const N = 20_000;
    const values = Array.from({ length: N }, (_, i) => `('t${i}', '${i}', 1)`).join(',');
    await db.sql(`INSERT INTO \`${table}\` (k, v, version) VALUES ${values}`);
    await waitFor(() => seen.count() >= N, `${N} events`, 60_000);
    await new Promise((r) => setTimeout(r, 200));
    expect(seen.count()).toBe(N);
    expect(seen.events[N - 1].key).toBe(`t${N - 1}`);
    expect(s.getStatus().events.maxBatch).toBeLessThanOrEqual(1000);
  });

  test('a checkpoint whose binlog was purged gives a resync event, then capture goes on', async () => {
    const table = freshTable();
    const a = make({ table, mysql: { checkpointName: 'purge-test' } });
    await a.init();
    await a.push('x', 1);
    await a.close();
    // Changes the next streamer can no longer read: their binlog file is purged.
    await db.sql(`INSERT INTO \`${table}\` (k, v, version) VALUES ('lost', '1', 1)`);
    db.rootSql('FLUSH BINARY LOGS');
    const files = () => db.rootSql('SHOW BINARY LOGS').trim().split('\n').map((l) => l.split('\t')[0]);
    const last = files().pop();
    // The closed streamer's replication connection ends at its next heartbeat; until then the
    // server keeps the file it reads.
    await waitFor(() => {
      db.rootSql(`PURGE BINARY LOGS TO '${last}'`);
      return files().length === 1;
    }, 'the purge of older binary logs');
    const b = make({ table, mysql: { checkpointName: 'purge-test' } });
    const seen = collect(b);
    const resyncs = [];
    b.on('resync', (e) => resyncs.push(e));
    await b.init();
    await waitFor(() => resyncs.length >= 1, 'a resync event');
    expect(resyncs[0].reason).toMatch(/purged/);
    expect(b.getStatus().events.resyncs).toBe(1);
    await b.push('after', 2);
    await waitFor(() => seen.count() >= 1, 'the change after the resync');
    expect(seen.events.map((e) => e.key)).toEqual(['after']);
  });
});

describe('connection errors', () => {
  test('a wrong password fails init() fast with USP_DB_ERROR and no secret in the message', async () => {
    const s = new UltimateStreamer({
      database: 'mysql',
      connection: { host: '127.0.0.1', port: db.port, user: 'usp', password: 'wrong-secret-pw', database: 'usp_test' },
    });
    const t0 = Date.now();
    const err = await rejectsWithCode(s.init(), 'USP_DB_ERROR');
    expect(Date.now() - t0).toBeLessThan(5000);
    expect(err.message).toMatch(/refused|denied/i);
    expect(err.message).not.toContain('wrong-secret-pw');
    await s.close();
  });

  test('a server that requires TLS is refused with a clear error, never a crash', async () => {
    const tlsDb = await startMariaDb({ tls: true });
    try {
      const s = new UltimateStreamer(tlsDb.config());
      const err = await rejectsWithCode(s.init(), 'USP_DB_ERROR');
      expect(err.message).toMatch(/TLS/);
      expect(err.message).not.toContain(PASSWORD);
      await s.close();
    } finally {
      await tlsDb.stop();
    }
  });

  test('an unknown database fails init() with USP_DB_ERROR', async () => {
    const s = new UltimateStreamer({ database: 'mysql', connection: { uri: db.uri.replace('/usp_test', '/no_such_db') } });
    await rejectsWithCode(s.init(), 'USP_DB_ERROR');
    await s.close();
  });

  test('nothing listening fails init() with USP_DB_UNAVAILABLE', async () => {
    const s = new UltimateStreamer({ database: 'mysql', connection: { uri: 'mysql://usp:x@127.0.0.1:9/usp_test' } });
    await rejectsWithCode(s.init(), 'USP_DB_UNAVAILABLE');
    await s.close();
  });
});
