'use strict';
// Every error code: each bad input gets an Error with a stable code, and nothing is written.
const { spawnSync } = require('node:child_process');
const path = require('node:path');
const UltimateStreamer = require('..');
const { ERROR_CODES } = require('..');
const native = require('../native/index.js');
const { tmpDb, tmpDir, rejectsWithCode, throwsWithCode, waitFor, sqliteExternal, holdWriteLock } = require('./helpers');

const streamers = [];
async function started(config = { connection: { path: ':memory:' } }) {
  const s = new UltimateStreamer(config);
  streamers.push(s);
  await s.init();
  return s;
}
afterEach(async () => {
  await Promise.all(streamers.splice(0).map((s) => s.close()));
});

function changeLogCount(file) {
  return sqliteExternal(file, 'SELECT count(*) AS n FROM usp_kv_changes', { query: true })[0].n;
}

test('the JavaScript list of codes equals the engine list, and the README and index.d.ts list them all', () => {
  expect(Object.keys(ERROR_CODES).sort()).toEqual(native.errorCodes().slice().sort());
  const fs = require('node:fs');
  const readme = fs.readFileSync(path.join(__dirname, '..', 'README.md'), 'utf8');
  const dts = fs.readFileSync(path.join(__dirname, '..', 'index.d.ts'), 'utf8');
  for (const code of native.errorCodes()) {
    expect(readme).toContain(code);
    expect(dts).toContain(code);
  }
});

describe('USP_INVALID_CONFIG', () => {
  test.each([
    [{ bogus: 1 }, '`bogus`'],
    [{ options: { batchSize: 0 } }, '`options.batchSize`'],
    [{ options: { pollingInterval: 'fast' } }, '`options.pollingInterval`'],
    [{ options: { enableCache: 'yes' } }, '`options.enableCache`'],
    [{ options: { table: 'kv; DROP TABLE x' } }, '`options.table`'],
    [{ connection: { path: ':memory:', nope: true } }, '`connection.nope`'],
    [{ database: 'oracle' }, '`database`'],
    [{ dbType: 'sqlite', pollingInterval: -5 }, '`pollingInterval`'],
    [{ options: { logLevel: 'loud' } }, '`options.logLevel`'],
    [{ options: { maxValueSize: 1.5 } }, '`options.maxValueSize`'],
    [{ options: { onChange: () => {} } }, '`onChange`'],
    [{ options: { big: 10n } }, '`big`'],
  ])('%j is refused naming the option', (config, name) => {
    const err = throwsWithCode(() => new UltimateStreamer(config), 'USP_INVALID_CONFIG');
    expect(err.message).toContain(name);
  });

  test('a non-object config is refused', () => {
    throwsWithCode(() => new UltimateStreamer('sqlite'), 'USP_INVALID_CONFIG');
    throwsWithCode(() => new UltimateStreamer([1]), 'USP_INVALID_CONFIG');
  });
});

describe('MongoDB configs', () => {
  test.each([
    [{ database: 'mongodb', connection: { uri: 'mongodb://app:pw@localhost:27017/mydb' }, options: { useChangeStreams: true } }],
    [{ dbType: 'mongodb', host: '127.0.0.1', port: 27017, user: 'app', password: 'pw', database: 'shop' }],
  ])('%j is accepted, and the status never shows the password', (config) => {
    const s = new UltimateStreamer(config);
    const st = JSON.stringify(s.getStatus());
    expect(st).toContain('"type":"mongodb"');
    expect(st).not.toContain('pw');
  });

  test('a MongoDB config without a database is refused with the option named', () => {
    const err = throwsWithCode(() => new UltimateStreamer({ database: 'mongodb', connection: { uri: 'mongodb://localhost:27017' } }), 'USP_INVALID_CONFIG');
    expect(err.message).toMatch(/database/);
  });
});

describe('USP_INVALID_KEY', () => {
  test.each([
    ['', 'empty'],
    [42, 'number'],
    [null, 'null'],
    [undefined, 'undefined'],
    [{ k: 1 }, 'object'],
    ['x'.repeat(192), 'over 191 characters'],
    ['a\u0000b', 'NUL'],
  ])('key %p (%s) is refused by push, get and delete, and nothing is written', async (key) => {
    const file = tmpDb();
    const s = await started({ connection: { path: file } });
    const before = changeLogCount(file);
    await rejectsWithCode(s.push(key, 1), 'USP_INVALID_KEY');
    await rejectsWithCode(s.get(key), 'USP_INVALID_KEY');
    await rejectsWithCode(s.delete(key), 'USP_INVALID_KEY');
    expect(changeLogCount(file)).toBe(before);
  });

  test('191 characters (not bytes) are accepted', async () => {
    const s = await started();
    const key = 'é'.repeat(191);
    await expect(s.push(key, 1)).resolves.toEqual({ key, version: 1 });
  });
});

describe('USP_INVALID_VALUE', () => {
  const circular = { a: 1 };
  circular.self = circular;
  test.each([
    [undefined, 'undefined'],
    [() => 1, 'function'],
    [Symbol('s'), 'symbol'],
    [10n, 'BigInt'],
    [circular, 'circular'],
    [{ nested: { fn() {} } }, 'function'],
    [{ s: Symbol('x') }, 'symbol'],
    [[1, 2n], 'BigInt'],
    [{ list: [1, () => 2] }, "function at property '1'"],
  ])('value %p is refused (%s) and nothing is written', async (value, why) => {
    const file = tmpDb();
    const s = await started({ connection: { path: file } });
    const before = changeLogCount(file);
    const err = await rejectsWithCode(s.push('k', value), 'USP_INVALID_VALUE');
    expect(err.message.toLowerCase()).toContain(why.toLowerCase());
    expect(await s.get('k')).toBeNull();
    expect(changeLogCount(file)).toBe(before);
  });
});

test('values are stored as JSON.stringify writes them: toJSON is applied, dates become strings', async () => {
  const s = await started();
  const value = { at: new Date(0), custom: { toJSON: () => ({ fn: 'gone' }) }, skip: undefined };
  await s.push('k', value);
  expect(await s.get('k')).toEqual({ at: '1970-01-01T00:00:00.000Z', custom: { fn: 'gone' } });
});

describe('USP_VALUE_TOO_LARGE', () => {
  test('a value over maxValueSize is refused and nothing is written', async () => {
    const file = tmpDb();
    const s = await started({ connection: { path: file }, options: { maxValueSize: 1024 } });
    const err = await rejectsWithCode(s.push('k', 'x'.repeat(2000)), 'USP_VALUE_TOO_LARGE');
    expect(err.message).toContain('maxValueSize');
    await expect(s.push('k', 'x'.repeat(1000))).resolves.toEqual({ key: 'k', version: 1 });
    expect(changeLogCount(file)).toBe(1);
  });

  test('the default limit is 16 MiB', async () => {
    const s = await started();
    const big = 'y'.repeat(16 * 1024 * 1024); // 16 MiB + 2 quote bytes as JSON
    await rejectsWithCode(s.push('big', big), 'USP_VALUE_TOO_LARGE');
    const ok = 'y'.repeat(16 * 1024 * 1024 - 2);
    await expect(s.push('big', ok)).resolves.toEqual({ key: 'big', version: 1 });
    expect((await s.get('big')).length).toBe(ok.length);
  });
});

describe('USP_INVALID_ARGUMENT', () => {
  test('bad listener options and a config given twice', async () => {
    const s = new UltimateStreamer({ connection: { path: ':memory:' } });
    streamers.push(s);
    throwsWithCode(() => s.on('change', { prefix: 5 }, () => {}), 'USP_INVALID_ARGUMENT');
    throwsWithCode(() => s.on('change', { prefx: 'a' }, () => {}), 'USP_INVALID_ARGUMENT');
    throwsWithCode(() => s.on('change', { prefix: 'a' }, 'notfn'), 'USP_INVALID_ARGUMENT');
    await rejectsWithCode(s.init({ connection: { path: ':memory:' } }), 'USP_INVALID_ARGUMENT');
  });
});

describe('lifecycle codes', () => {
  test('USP_NOT_INITIALIZED before init()', async () => {
    const s = new UltimateStreamer({ connection: { path: ':memory:' } });
    streamers.push(s);
    const err = await rejectsWithCode(s.push('k', 1), 'USP_NOT_INITIALIZED');
    expect(err.message).toContain('init()');
    await rejectsWithCode(s.get('k'), 'USP_NOT_INITIALIZED');
    await rejectsWithCode(s.delete('k'), 'USP_NOT_INITIALIZED');
  });

  test('USP_CLOSED after close()', async () => {
    const s = await started();
    await s.close();
    await rejectsWithCode(s.push('k', 1), 'USP_CLOSED');
    await rejectsWithCode(s.get('k'), 'USP_CLOSED');
    await rejectsWithCode(s.delete('k'), 'USP_CLOSED');
    await rejectsWithCode(s.init(), 'USP_CLOSED');
  });

  test('USP_ALREADY_INITIALIZED for a second init with a new config; plain init() is idempotent', async () => {
    const s = await started();
    await expect(s.init()).resolves.toBeUndefined();
    await rejectsWithCode(s.init({ connection: { path: ':memory:' } }), 'USP_ALREADY_INITIALIZED');
  });
});

describe('database codes', () => {
  test('USP_DB_UNAVAILABLE when the file cannot be created', async () => {
    const s = new UltimateStreamer({ connection: { path: path.join(tmpDir(), 'no', 'such', 'dir', 'x.db') } });
    streamers.push(s);
    const err = await rejectsWithCode(s.init(), 'USP_DB_UNAVAILABLE');
    expect(err.message).toMatch(/directory/);
    await rejectsWithCode(s.push('k', 1), 'USP_NOT_INITIALIZED');
    expect(s.getStatus().errors.fatal + s.getStatus().errors.recoverable).toBeGreaterThan(0);
  });

  test('USP_DB_ERROR when the table has an incompatible schema; nothing is written', async () => {
    const file = tmpDb();
    sqliteExternal(file, 'CREATE TABLE usp_kv (k TEXT PRIMARY KEY, v TEXT)');
    const s = new UltimateStreamer({ connection: { path: file } });
    streamers.push(s);
    let err;
    try {
      await s.init();
      await s.push('k', 1);
    } catch (e) {
      err = e;
    }
    expect(err && err.code).toBe('USP_DB_ERROR');
    await s.close();
    expect(sqliteExternal(file, 'SELECT count(*) AS n FROM usp_kv', { query: true })[0].n).toBe(0);
  });

  test('USP_DB_BUSY when another process holds the write lock past busyTimeout', async () => {
    const file = tmpDb();
    const s = await started({ connection: { path: file }, options: { sqlite: { busyTimeout: 100 } } });
    const { released } = await holdWriteLock(file, 1500);
    const err = await rejectsWithCode(s.push('k', 1), 'USP_DB_BUSY');
    expect(err.message).toMatch(/retry/);
    await released;
    // It heals: the same push succeeds once the lock is gone.
    await expect(s.push('k', 1)).resolves.toEqual({ key: 'k', version: 1 });
    expect(s.getStatus().errors.recoverable).toBeGreaterThan(0);
  });
});

test('USP_OVERLOADED when more operations are queued than writeQueueSize', async () => {
  const file = tmpDb();
  const s = await started({ connection: { path: file }, options: { writeQueueSize: 16 } });
  const results = await Promise.allSettled(Array.from({ length: 2000 }, (_, i) => s.push(`k${i}`, i)));
  const ok = results.filter((r) => r.status === 'fulfilled').length;
  const refused = results.filter((r) => r.status === 'rejected');
  expect(refused.length).toBeGreaterThan(0);
  expect(ok).toBeGreaterThanOrEqual(16);
  for (const r of refused) expect(r.reason.code).toBe('USP_OVERLOADED');
  // Exactly the accepted pushes were written.
  await waitFor(() => s.getStatus().store.writes === ok, 'accepted writes');
  expect(changeLogCount(file)).toBe(ok);
});

test('USP_LISTENER_ERROR reaches error listeners', async () => {
  const s = await started();
  const errs = [];
  s.on('error', (e) => errs.push(e));
  s.on('change', () => {
    throw new TypeError('oops');
  });
  await s.push('k', 1);
  await waitFor(() => errs.length === 1, 'the listener error');
  expect(errs[0].code).toBe('USP_LISTENER_ERROR');
});

test('bad input never crashes the process (fuzzed arguments in a child process)', () => {
  const script = `
    const U = require(${JSON.stringify(path.join(__dirname, '..'))});
    const weird = [undefined, null, 0, -1, NaN, '', 'k', 'x'.repeat(5000), {}, [], () => 1, Symbol('s'), 10n,
      new Proxy({}, {}), Object.create(null), new Date(0), Buffer.from('ab'), new Map([[1, 2]])];
    (async () => {
      const s = new U({ connection: { path: ':memory:' } });
      await s.init();
      let settled = 0;
      for (const k of weird) for (const v of weird) {
        for (const p of [s.push(k, v), s.get(k), s.delete(k)]) { await p.catch((e) => { if (!e.code) throw e; }); settled++; }
      }
      for (const c of weird) { try { new U(c); } catch (e) { if (!e.code) throw e; } }
      await s.close();
      console.log('settled', settled);
    })().catch((e) => { console.error('uncoded', e); process.exit(2); });`;
  const r = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8', timeout: 60_000 });
  expect(r.stderr).toBe('');
  expect(r.status).toBe(0);
  expect(r.stdout.trim()).toBe(`settled ${18 * 18 * 3}`);
});
