'use strict';
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { spawn } = require('node:child_process');

const ROOT = path.join(__dirname, '..');

/** A fresh directory for one test's database files. */
function tmpDir(prefix = 'usp-test-') {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

function tmpDb() {
  return path.join(tmpDir(), 'test.db');
}

/** Resolves once `cond()` is truthy; rejects after `timeoutMs` with `what`. */
async function waitFor(cond, what, timeoutMs = 10_000) {
  const start = Date.now();
  for (;;) {
    if (await cond()) return;
    if (Date.now() - start > timeoutMs) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** Runs a Node script as a child process; resolves with { code, stdout, stderr, ms }. */
function runNode(args, { timeoutMs = 60_000, cwd = ROOT, env = process.env } = {}) {
  return new Promise((resolve, reject) => {
    const start = Date.now();
    const child = spawn(process.execPath, args, { cwd, env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`child ${args.join(' ')} did not exit within ${timeoutMs} ms\nstdout: ${stdout}\nstderr: ${stderr}`));
    }, timeoutMs);
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr, ms: Date.now() - start });
    });
  });
}

/** Asserts that a promise rejects with a UspError of `code`, and returns the error. */
async function rejectsWithCode(promise, code) {
  let err;
  try {
    await promise;
  } catch (e) {
    err = e;
  }
  expect(err).toBeInstanceOf(Error);
  expect(err.code).toBe(code);
  expect(typeof err.message).toBe('string');
  expect(err.message.length).toBeGreaterThan(10);
  return err;
}

function throwsWithCode(fn, code) {
  let err;
  try {
    fn();
  } catch (e) {
    err = e;
  }
  expect(err).toBeInstanceOf(Error);
  expect(err.code).toBe(code);
  return err;
}

/**
 * Runs SQL on a database file from ANOTHER process (better-sqlite3 in a child). Two SQLite
 * libraries in one process must never open the same file: their POSIX locks do not see each
 * other. Returns the rows of the last statement when `query` is true.
 */
function sqliteExternal(file, sql, { query = false, params = [] } = {}) {
  const { spawnSync } = require('node:child_process');
  const script = `
    const D = require(${JSON.stringify(path.join(ROOT, 'node_modules', 'better-sqlite3'))});
    const db = new D(process.argv[1]); db.pragma('busy_timeout = 5000');
    const [sql, query, params] = JSON.parse(process.argv[2]);
    let out = null;
    if (query) out = db.prepare(sql).all(...params); else if (params.length) db.prepare(sql).run(...params); else db.exec(sql);
    db.close();
    process.stdout.write(JSON.stringify(out));`;
  const r = spawnSync(process.execPath, ['-e', script, file, JSON.stringify([sql, query, params])], { encoding: 'utf8', timeout: 30_000 });
  if (r.status !== 0) throw new Error(`external sqlite failed: ${r.stderr}`);
  return JSON.parse(r.stdout);
}

/**
 * Holds the write lock of `file` from another process for `ms`. Resolves once it is held, with
 * `{ released }`, a promise of the lock's end (wrapped: a promise resolved with a promise would wait).
 */
function holdWriteLock(file, ms) {
  return new Promise((resolve, reject) => {
    const script = `
      const D = require(${JSON.stringify(path.join(ROOT, 'node_modules', 'better-sqlite3'))});
      const db = new D(process.argv[1]); db.exec('BEGIN IMMEDIATE'); console.log('locked');
      setTimeout(() => { db.exec('ROLLBACK'); db.close(); }, Number(process.argv[2]));`;
    const child = spawn(process.execPath, ['-e', script, file, String(ms)], { stdio: ['ignore', 'pipe', 'inherit'] });
    const released = new Promise((done) => child.on('exit', done));
    child.stdout.once('data', () => resolve({ released }));
    child.on('error', reject);
  });
}

/**
 * Runs the browser client (fixtures/hub-client.mjs, the `ws` package as WebSocket) in a child
 * process on `url` (several instance URLs joined by commas); `lines` fills with what it prints.
 */
function startHubClient(url, channels) {
  const child = spawn(process.execPath, [path.join(__dirname, 'fixtures', 'hub-client.mjs'), url, channels.join(',')], {
    cwd: ROOT,
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  const lines = [];
  let buf = '';
  let stderr = '';
  child.stdout.on('data', (d) => {
    buf += d;
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      lines.push(buf.slice(0, i));
      buf = buf.slice(i + 1);
    }
  });
  child.stderr.on('data', (d) => (stderr += d));
  return {
    lines,
    stderr: () => stderr,
    events: () => lines.filter((l) => l.startsWith('event ')).map((l) => Number(l.split(' ')[1])),
    count: (prefix) => lines.filter((l) => l.startsWith(prefix)).length,
    stop() {
      child.stdin.end();
      return new Promise((r) => {
        const t = setTimeout(() => {
          child.kill('SIGKILL');
          r();
        }, 3000);
        child.on('exit', () => {
          clearTimeout(t);
          r();
        });
      });
    },
  };
}

/**
 * The streamers of a test file, each closed after its test: returns `make(config)`. Call once
 * per file, at the top (it registers the `afterEach`).
 */
function streamerPool() {
  const UltimateStreamer = require('..');
  const streamers = [];
  afterEach(async () => {
    await Promise.all(streamers.splice(0).map((s) => s.close()));
  });
  return (config) => {
    const s = new UltimateStreamer(config);
    streamers.push(s);
    return s;
  };
}

/** Collects 'change' and 'mode' events; `versions(key)` lists a key's versions in arrival order. */
function collectChanges(s) {
  const events = [];
  const modes = [];
  s.on('change', (e) => events.push(e));
  s.on('mode', (e) => modes.push(e));
  return {
    events,
    modes,
    count: () => events.length,
    versions: (key) => events.filter((e) => e.key === key).map((e) => e.version),
  };
}

/**
 * The store contract every backend keeps, on a fresh key space: versions assigned by the
 * database, concurrent calls (the same key several times) settled in call order, get after
 * push and delete, delete of a missing key. Leaves 6 changes: a 1, a 2, b 1, b 2, a deleted (3),
 * a 4 ('again').
 */
async function expectStoreContract(s) {
  expect(await s.push('a', { x: 1 })).toEqual({ key: 'a', version: 1 });
  expect(await s.push('a', { x: 2 })).toEqual({ key: 'a', version: 2 });
  const r = await Promise.all([s.push('b', 1), s.push('b', 2), s.delete('a'), s.delete('a'), s.push('a', 'again')]);
  expect(r).toEqual([{ key: 'b', version: 1 }, { key: 'b', version: 2 }, true, false, { key: 'a', version: 4 }]);
  expect(await s.get('a')).toBe('again');
  expect(await s.get('b')).toBe(2);
  expect(await s.get('nope')).toBeNull();
  expect(await s.delete('nope')).toBe(false);
}

let nameNo = 0;
/** A name no other test of this run uses: `<prefix>_<n>_<pid>`. */
function freshName(prefix) {
  nameNo += 1;
  return `${prefix}_${nameNo}_${process.pid}`;
}

module.exports = {
  expectStoreContract,
  sqliteExternal,
  holdWriteLock,
  ROOT,
  tmpDir,
  tmpDb,
  waitFor,
  runNode,
  rejectsWithCode,
  throwsWithCode,
  startHubClient,
  streamerPool,
  collectChanges,
  freshName,
};
