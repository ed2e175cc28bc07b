'use strict';
// Scale-out through Redis (options.redis), against a real MariaDB (binlog on) and a real
// redis-server, both started privately for this file. Instances run in this process and in
// child processes (__test__/fixtures/bus-instance.js) and share one stream.
const path = require('node:path');
const { fork } = require('node:child_process');
const UltimateStreamer = require('..');
const WebSocket = require('ws');
const { waitFor, rejectsWithCode, startHubClient, streamerPool } = require('./helpers');
const { startMariaDb } = require('./mariadb');
const { startRedis } = require('./redis');

jest.setTimeout(180_000);

const FIXTURE = path.join(__dirname, 'fixtures', 'bus-instance.js');

let db;
let redis;
beforeAll(async () => {
  db = await startMariaDb();
  redis = await startRedis();
});
afterAll(async () => {
  for (const c of children.splice(0)) c.kill();
  if (db) await db.stop();
  if (redis) redis.stop();
});

const make = streamerPool();
const children = [];
afterEach(async () => {
  await Promise.all(children.splice(0).map((c) => c.close()));
});

let streamNo = 0;
/** A fresh stream: its own key-value table and Redis key prefix. */
function freshStream() {
  streamNo += 1;
  return { table: `bus_${streamNo}_${process.pid}`, prefix: `test${streamNo}:${process.pid}:` };
}

function config(st, redisOptions = {}, options = {}) {
  return db.config({
    table: st.table,
    redis: { url: redis.url, keyPrefix: st.prefix, leaseTtl: 1500, ...redisOptions },
    ...options,
  });
}

/** Collects change events as [type, key, version, seq]. */
function collect(s) {
  const changes = [];
  const notices = [];
  s.on('change', (e) => changes.push([e.type, e.key, e.version, e.seq]));
  s.on('resync', (e) => notices.push({ type: 'resync', reason: e.reason }));
  return { changes, notices };
}

/** Starts instances of one stream in turn (the first captures); each with its collector. */
async function startInstances(cfg, n = 2) {
  const out = [];
  for (let i = 0; i < n; i++) {
    const s = make(cfg);
    const seen = collect(s);
    await s.init();
    out.push({ s, seen });
  }
  return out;
}

/** A streamer in a child process, driven over IPC. */
class Instance {
  static start(cfg) {
    const inst = new Instance(cfg);
    children.push(inst);
    return inst.ready;
  }

  constructor(cfg) {
    this.pending = new Map();
    this.nextId = 1;
    this.exited = false;
    this.child = fork(FIXTURE, [JSON.stringify(cfg)], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
    this.ready = new Promise((resolve, reject) => {
      this.child.on('message', (m) => {
        if (m.ready) resolve(this);
        else if (m.initError) reject(Object.assign(new Error(m.initError.message), { code: m.initError.code }));
        else if (this.pending.has(m.id)) {
          const { resolve: ok, reject: fail } = this.pending.get(m.id);
          this.pending.delete(m.id);
          if (m.error) fail(Object.assign(new Error(m.error.message), { code: m.error.code }));
          else ok(m);
        }
      });
      this.child.on('exit', (code, signal) => {
        this.exited = true;
        const err = new Error(`instance exited (${code ?? signal})`);
        reject(err);
        for (const { reject: fail } of this.pending.values()) fail(err);
        this.pending.clear();
      });
    });
  }

  call(cmd, extra = {}) {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.child.send({ id, cmd, ...extra });
    });
  }

  async status() {
    return (await this.call('status')).status;
  }

  async events() {
    return this.call('events');
  }

  kill() {
    if (!this.exited) this.child.kill('SIGKILL');
  }

  async close() {
    if (this.exited) return;
    await this.call('close').catch(() => {});
    await waitFor(() => this.exited, 'the instance to exit', 15_000).catch(() => this.kill());
  }
}

/** Upserts like push() does, from outside (an external SQL writer). */
function sqlUpsert(table, key, value) {
  return db.sql(
    `INSERT INTO \`${table}\` (k, v, version, deleted) VALUES (?, ?, 1, 0) ON DUPLICATE KEY UPDATE v = VALUES(v), version = version + 1, deleted = 0`,
    [key, JSON.stringify(value)],
  );
}

/** Checks that `changes` hold versions 1..perKey of each key once, in order, with growing seqs. */
function expectExactlyOnce(changes, keys, perKey) {
  const byKey = new Map(keys.map((k) => [k, []]));
  for (const [, key, version] of changes) {
    if (byKey.has(key)) byKey.get(key).push(version);
  }
  const want = Array.from({ length: perKey }, (_, i) => i + 1);
  for (const [key, versions] of byKey) {
    if (versions.length !== perKey || versions.some((v, i) => v !== want[i])) {
      throw new Error(`key ${key}: versions ${JSON.stringify(versions)} instead of 1..${perKey} once each`);
    }
  }
  for (let i = 1; i < changes.length; i++) {
    if (!(changes[i][3] > changes[i - 1][3])) throw new Error(`seq did not grow at ${i}: ${changes[i - 1][3]} then ${changes[i][3]}`);
  }
}

describe('configuration', () => {
  test('options.redis is validated and needs the mysql backend', async () => {
    const bad = [
      [{ options: { redis: { url: redis.url } } }, /mysql backend/],
      [db.config({ redis: {} }), /options\.redis\.url/],
      [db.config({ redis: { url: 'http://x' } }), /redis:\/\//],
      [db.config({ redis: { url: redis.url, nope: 1 } }), /options\.redis\.nope/],
      [db.config({ redis: { url: redis.url, leaseTtl: 5 } }), /leaseTtl/],
      [db.config({ redis: { url: redis.url, keyPrefix: '' } }), /keyPrefix/],
    ];
    for (const [cfg, msg] of bad) {
      let err;
      try {
        new UltimateStreamer(cfg);
      } catch (e) {
        err = e;
      }
      expect(err && err.code).toBe('USP_INVALID_CONFIG');
      expect(err.message).toMatch(msg);
    }
  });

  test('an unreachable Redis fails init() fast; a refused password is never shown', async () => {
    const st = freshStream();
    const dead = make(config(st, { url: 'redis://127.0.0.1:1' }));
    const t0 = Date.now();
    await rejectsWithCode(dead.init(), 'USP_DB_UNAVAILABLE');
    expect(Date.now() - t0).toBeLessThan(10_000);
    // This Redis has no password: AUTH is refused.
    const secret = 'hunter2-redis-secret';
    const refused = make(config(st, { url: `redis://someone:${secret}@127.0.0.1:${redis.port}` }));
    const err = await rejectsWithCode(refused.init(), 'USP_DB_ERROR');
    expect(err.message).not.toContain(secret);
    expect(JSON.stringify(refused.getStatus())).not.toContain(secret);
  });
});

describe('one stream, several instances', () => {
  test('every instance delivers every change with the same seq; a closed capturer hands over at once', async () => {
    const st = freshStream();
    const [{ s: a, seen: seenA }, { s: b, seen: seenB }] = await startInstances(config(st));
    expect(a.getStatus().bus.role).toBe('leader');
    expect(b.getStatus().bus.role).toBe('follower');
    expect(b.getStatus().mode).toBe('follower');
    expect(a.getStatus().mode).toBe('binlog');

    // Writes through either instance, and from outside.
    expect(await b.push('k', 1)).toEqual({ key: 'k', version: 1 });
    expect(await a.push('k', 2)).toEqual({ key: 'k', version: 2 });
    await sqlUpsert(st.table, 'k', 3);
    expect(await b.delete('k')).toBe(true);
    await waitFor(() => seenA.changes.length >= 4 && seenB.changes.length >= 4, '4 changes in both instances');
    expect(seenA.changes.map((c) => c.slice(0, 3))).toEqual([
      ['insert', 'k', 1],
      ['update', 'k', 2],
      ['update', 'k', 3],
      ['delete', 'k', 4],
    ]);
    expect(seenB.changes).toEqual(seenA.changes);
    expect(b.getStatus().bus.lastSeq).toBe(seenB.changes[3][3]);

    // The capturer closes: its lease is given back and the other instance captures at once.
    const t0 = Date.now();
    await a.close();
    await waitFor(() => b.getStatus().bus.role === 'leader', 'the follower to take over', 5_000);
    expect(Date.now() - t0).toBeLessThan(5_000);
    expect(await b.push('k', 5)).toEqual({ key: 'k', version: 5 });
    await waitFor(() => seenB.changes.length >= 5, 'the change after the takeover');
    expect(seenB.changes[4].slice(0, 3)).toEqual(['insert', 'k', 5]);
    expect(seenB.changes[4][3]).toBeGreaterThan(seenB.changes[3][3]);
    expect(b.getStatus().bus.takeovers).toBe(1);
  });

  test('rows of watched tables reach every instance; watch() at run time is refused with a clear code', async () => {
    const st = freshStream();
    const tbl = `orders_${st.table}`;
    await db.sql(`CREATE TABLE \`${tbl}\` (id VARCHAR(40) PRIMARY KEY, n INT, note JSON)`);
    const cfg = config(st, {}, { mysql: { watch: [tbl] } });
    const rows = [[], []];
    const [a, b] = [make(cfg), make(cfg)];
    a.on('row', (e) => rows[0].push([e.type, e.key.id, e.row && e.row.n, e.row && e.row.note, e.seq]));
    b.on('row', (e) => rows[1].push([e.type, e.key.id, e.row && e.row.n, e.row && e.row.note, e.seq]));
    await a.init();
    await b.init();
    // Keys and values with quotes, backslashes and non-ASCII travel through the stream intact.
    const note = { a: 'é\\"' };
    await db.sql(`INSERT INTO \`${tbl}\` VALUES (?, 1, ?), (?, 2, NULL)`, ['o"1', JSON.stringify(note), 'o\\2']);
    await db.sql(`UPDATE \`${tbl}\` SET n = 3 WHERE id = ?`, ['o"1']);
    await db.sql(`DELETE FROM \`${tbl}\` WHERE n = 2`);
    await waitFor(() => rows[0].length >= 4 && rows[1].length >= 4, '4 rows in both instances');
    expect(rows[0].map((r) => r.slice(0, 4))).toEqual([
      ['insert', 'o"1', 1, note],
      ['insert', 'o\\2', 2, null],
      ['update', 'o"1', 3, note],
      ['delete', 'o\\2', null, null],
    ]);
    expect(rows[1]).toEqual(rows[0]);
    await rejectsWithCode(b.watch('anything'), 'USP_UNSUPPORTED_BACKEND');
  });

  test('a capturer killed with kill -9 mid-stream: another takes over, and 3 processes each see all 2,400 writes once, in order per key', async () => {
    const st = freshStream();
    const cfg = config(st);
    const first = await Instance.start(cfg);
    expect((await first.status()).bus.role).toBe('leader');
    const others = [await Instance.start(cfg), await Instance.start(cfg)];
    for (const o of others) expect((await o.status()).bus.role).toBe('follower');

    const KEYS = Array.from({ length: 40 }, (_, i) => `key${i}`);
    const PER_KEY = 60; // 2,400 writes
    let written = 0;
    const writer = async (slice) => {
      for (let v = 1; v <= PER_KEY; v++) {
        for (const key of slice) {
          await sqlUpsert(st.table, key, { v });
          written += 1;
        }
      }
    };
    const writing = Promise.all([0, 1, 2, 3].map((w) => writer(KEYS.filter((_, i) => i % 4 === w))));
    await waitFor(() => written >= 800, '800 writes');
    first.kill();
    const killedAt = written;
    await writing;
    expect(killedAt).toBeLessThan(KEYS.length * PER_KEY);

    let leader;
    await waitFor(async () => {
      const roles = await Promise.all(others.map((o) => o.status().then((s) => s.bus.role)));
      leader = others[roles.indexOf('leader')];
      return roles.filter((r) => r === 'leader').length === 1;
    }, 'one surviving instance to capture', 10_000);
    expect((await leader.status()).bus.takeovers).toBe(1);

    const total = KEYS.length * PER_KEY;
    for (const o of others) {
      await waitFor(async () => (await o.events()).changes.length >= total, `all ${total} changes in a survivor`, 60_000);
    }
    const [x, y] = await Promise.all(others.map((o) => o.events()));
    expect(x.changes.length).toBe(total);
    expectExactlyOnce(x.changes, KEYS, PER_KEY);
    // Same changes, same seqs, in every instance.
    expect(y.changes).toEqual(x.changes);
    expect(x.notices.filter((n) => n.type === 'resync')).toEqual([]);
  });

  test('Redis restart: instances report the outage, reconnect, and lose or double nothing', async () => {
    const st = freshStream();
    const [{ s: a, seen: seenA }, { s: b, seen: seenB }] = await startInstances(config(st));

    const KEYS = ['r0', 'r1', 'r2', 'r3'];
    const PER_KEY = 150;
    let written = 0;
    const writing = (async () => {
      for (let v = 1; v <= PER_KEY; v++) {
        for (const key of KEYS) {
          await sqlUpsert(st.table, key, v);
          written += 1;
        }
        await new Promise((r) => setTimeout(r, 5));
      }
    })();
    await waitFor(() => written >= 100, '100 writes');
    redis.kill();
    await waitFor(
      () => a.getStatus().bus.state === 'reconnecting' && b.getStatus().bus.state === 'reconnecting',
      'both instances to report the outage',
      10_000,
    );
    await new Promise((r) => setTimeout(r, 1000));
    redis.restart();
    await writing;
    const total = KEYS.length * PER_KEY;
    await waitFor(() => seenA.changes.length >= total && seenB.changes.length >= total, `all ${total} changes in both`, 60_000);
    await new Promise((r) => setTimeout(r, 300));
    expect(seenA.changes.length).toBe(total);
    expectExactlyOnce(seenA.changes, KEYS, PER_KEY);
    expect(seenB.changes).toEqual(seenA.changes);
    await waitFor(() => a.getStatus().bus.state === 'connected' && b.getStatus().bus.state === 'connected', 'both reconnected');
    expect(seenA.notices).toEqual([]);
    // The lease may have lapsed during the outage: one instance captures again soon after.
    const roles = () => [a, b].map((s) => s.getStatus().bus.role).sort();
    await waitFor(() => roles().join() === 'follower,leader', 'one leader and one follower', 10_000);
  });
});

describe('resume anywhere', () => {
  test('a browser client whose instance goes away resumes on another one from its last seq', async () => {
    const st = freshStream();
    const a = make(config(st));
    await a.init();
    const hubA = await a.listen({ port: 0 });
    const b = make(config(st));
    await b.init();
    const hubB = await b.listen({ port: 0 });
    const c = startHubClient([hubA.url, hubB.url].join(','), ['kv:*']);
    try {
      await waitFor(() => c.count('subscribed') === 1, `the client to subscribe on A (${c.stderr()})`);
      for (let i = 1; i <= 30; i++) await b.push(`k${i % 5}`, i);
      await waitFor(() => c.events().length === 30, '30 events through A');
      // A goes away: its clients are closed, and the client tries the next URL.
      await a.close();
      for (let i = 31; i <= 60; i++) await b.push(`k${i % 5}`, i);
      await waitFor(() => c.count('open') === 2, 'the client to reconnect to B');
      await waitFor(() => c.events().length >= 60, 'all 60 events', 20_000);
      await new Promise((r) => setTimeout(r, 200));
      const seqs = c.events();
      expect(seqs.length).toBe(60);
      for (let i = 1; i < seqs.length; i++) expect(seqs[i]).toBeGreaterThan(seqs[i - 1]);
      expect(c.count('gap')).toBe(0);
    } finally {
      await c.stop();
    }
  });

  test('an instance that joined later answers a resume from before it with a gap, then replays what it holds', async () => {
    const st = freshStream();
    const a = make(config(st));
    const seen = collect(a);
    await a.init();
    for (let i = 1; i <= 10; i++) await a.push(`k${i}`, i);
    await waitFor(() => seen.changes.length === 10, '10 changes');
    const firstSeq = seen.changes[0][3];
    const late = make(config(st));
    await late.init();
    const hub = await late.listen({ port: 0 });
    for (let i = 11; i <= 15; i++) await a.push(`k${i}`, i);
    await waitFor(() => late.getStatus().history.size === 5, 'the late instance to hold 5 events');
    const ws = new WebSocket(hub.url);
    const frames = [];
    ws.on('message', (d) => frames.push(JSON.parse(d.toString())));
    await new Promise((r, j) => ws.once('open', r).once('error', j));
    try {
      ws.send(JSON.stringify({ type: 'subscribe', channels: ['kv:*'], since: firstSeq + 2 }));
      await waitFor(() => frames.filter((f) => f.type === 'events').flatMap((f) => f.events).length === 5, 'the replay of 5 events');
      const gap = frames.find((f) => f.type === 'gap');
      expect(gap).toMatchObject({ from: firstSeq + 3, to: firstSeq + 9 });
      const replayed = frames.filter((f) => f.type === 'events').flatMap((f) => f.events);
      expect(replayed.map((e) => e.seq)).toEqual(seen.changes.slice(10).map((c) => c[3]));
    } finally {
      ws.terminate();
    }
  });
});

describe('L2 cache', () => {
  test('get() in another instance is answered from Redis; a change invalidates the entry for every instance', async () => {
    const st = freshStream();
    const entry = () => redis.cli('GET', `${st.prefix}kv:x`);
    const a = make(config(st));
    await a.init();
    const b = make(config(st));
    const seenB = collect(b);
    await b.init();
    await a.push('x', { v: 1 });
    // A read from the database is offered to L2; the other instance's get() is answered there.
    expect(await a.get('x')).toEqual({ v: 1 });
    await waitFor(() => entry() === '1|v|{"v":1}', 'the L2 entry of version 1');
    expect(await b.get('x')).toEqual({ v: 1 });
    expect(b.getStatus().cache.l2).toMatchObject({ enabled: true, hits: 1, misses: 0, hitRatio: 1 });
    // B's own L1 now holds it: no second trip to Redis.
    expect(await b.get('x')).toEqual({ v: 1 });
    expect(b.getStatus().cache.l2.hits).toBe(1);

    // A change replaces the entry with a marker of its version, in the same script that appends it.
    await a.push('x', { v: 2 });
    await waitFor(() => seenB.changes.length >= 1 && entry() === '2|m|', 'the marker of version 2');
    expect(await b.get('x')).toEqual({ v: 2 }); // B's L1 was refreshed by the change itself
    const c = make(config(st));
    await c.init();
    expect(await c.get('x')).toEqual({ v: 2 }); // marker: a miss, then the database
    expect(c.getStatus().cache.l2).toMatchObject({ hits: 0, misses: 1 });
    await waitFor(() => entry() === '2|v|{"v":2}', 'the L2 entry of version 2');

    // Deletes are cached as such.
    expect(await a.delete('x')).toBe(true);
    await waitFor(() => entry() === '3|m|', 'the marker of the delete');
    const d = make(config(st));
    await d.init();
    expect(await d.get('x')).toBeNull();
    await waitFor(() => entry() === '3|d|', 'the L2 entry of the delete');
    const e = make(config(st));
    await e.init();
    expect(await e.get('x')).toBeNull();
    expect(e.getStatus().cache.l2).toMatchObject({ hits: 1, misses: 0 });

    // /metrics has hits per level.
    const hub = await b.listen({ port: 0 });
    const text = await (await fetch(`http://127.0.0.1:${hub.port}/metrics`)).text();
    expect(text).toMatch(/usp_cache_hits_total\{level="l1"\} 2\n/); // the second get of v1, and v2
    expect(text).toMatch(/usp_cache_hits_total\{level="l2"\} 1\n/);
  });

  test('under concurrent writes and reads in three instances, every cache ends equal to the store', async () => {
    const st = freshStream();
    const cfg = config(st, {}, { cacheMaxBytes: 4096 }); // a tiny L1: most reads reach L2
    const started = await startInstances(cfg, 3);
    const inst = started.map((x) => x.s);
    const seen = started.map((x) => x.seen);
    const KEYS = Array.from({ length: 20 }, (_, i) => `c${i}`);
    const ROUNDS = 15;
    const deadline = Date.now() + 60_000;
    const writes = [];
    const reads = [];
    for (let r = 1; r <= ROUNDS && Date.now() < deadline; r++) {
      for (const k of KEYS) {
        writes.push(inst[r % 2].push(k, { r, pad: 'x'.repeat(200) }));
        reads.push(inst[2].get(k), inst[(r + 1) % 2].get(k));
      }
      await Promise.all(writes.splice(0));
    }
    await Promise.all(reads);
    const total = KEYS.length * ROUNDS;
    await waitFor(() => seen.every((x) => x.changes.length >= total), 'every change in every instance', 30_000);
    const stored = new Map((await db.sql(`SELECT k, v FROM \`${st.table}\``)).map((row) => [row.k, JSON.parse(row.v)]));
    for (const s of inst) {
      for (const k of KEYS) expect(await s.get(k)).toEqual(stored.get(k));
    }
    const l2 = inst[2].getStatus().cache.l2;
    expect(l2.hits + l2.misses).toBeGreaterThan(0);
  });

  test('with Redis down, get() is answered by the database', async () => {
    const st = freshStream();
    const a = make(config(st));
    await a.init();
    await a.push('k', 'v1');
    const b = make(config(st));
    await b.init();
    redis.kill();
    try {
      const t0 = Date.now();
      expect(await b.get('k')).toBe('v1');
      expect(Date.now() - t0).toBeLessThan(8_000);
      expect(await b.get('nope')).toBeNull();
    } finally {
      redis.restart();
    }
    await waitFor(() => a.getStatus().bus.state === 'connected' && b.getStatus().bus.state === 'connected', 'both reconnected', 15_000);
  });
});

describe('bounded stream', () => {
  test('an instance that falls behind the trim point gets a resync, then goes on', async () => {
    const st = freshStream();
    const leader = make(config(st, { streamMaxLen: 10 }));
    const seen = collect(leader);
    await leader.init();
    expect(leader.getStatus().bus.role).toBe('leader');
    const slow = await Instance.start(config(st, { streamMaxLen: 10 }));
    await leader.push('before', 1);
    await waitFor(async () => (await slow.events()).changes.length === 1, 'the first change in the slow instance');

    process.kill(slow.child.pid, 'SIGSTOP');
    try {
      for (let i = 0; i < 60; i++) {
        await sqlUpsert(st.table, `t${i}`, i);
        await new Promise((r) => setTimeout(r, 3));
      }
      await waitFor(() => seen.changes.length >= 61, 'the leader to deliver 61 changes');
      expect(Number(redis.cli('XLEN', `${st.prefix}stream`))).toBeLessThanOrEqual(10);
    } finally {
      process.kill(slow.child.pid, 'SIGCONT');
    }
    await waitFor(async () => (await slow.events()).notices.some((n) => n.type === 'resync'), 'a resync in the slow instance');
    const { notices, changes } = await slow.events();
    const resync = notices.find((n) => n.type === 'resync');
    expect(resync.reason).toMatch(/trim point/);
    expect((await slow.status()).bus.resyncs).toBe(1);
    // What was still in the stream was delivered, and what comes next is too.
    expect(changes.length).toBeLessThan(61);
    await leader.push('after', 2);
    await waitFor(async () => (await slow.events()).changes.some((c) => c[1] === 'after'), 'the next change in the slow instance');
    expect(seen.notices).toEqual([]);
  });

  test('entries older than streamMaxAge are trimmed', async () => {
    const st = freshStream();
    const s = make(config(st, { streamMaxAge: 1000 }));
    const seen = collect(s);
    await s.init();
    await s.push('a', 1);
    await s.push('a', 2);
    await waitFor(() => seen.changes.length === 2, '2 changes');
    await new Promise((r) => setTimeout(r, 1200));
    await s.push('a', 3);
    await waitFor(() => seen.changes.length === 3, 'the third change');
    expect(Number(redis.cli('XLEN', `${st.prefix}stream`))).toBe(1);
  });
});
