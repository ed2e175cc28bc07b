'use strict';
// push() throughput with 64 concurrent pushers on the embedded store, against the same workload
// written with better-sqlite3 (what a user could write instead), same run, same kind of file.
//
// Workload: TOTAL upserts (default 100,000, or at most MAX_SEC seconds) by 64 async "pushers";
// each pusher takes the next operation number, upserts a JSON value under one of KEYS keys (a fixed
// pseudo-random sequence, the same for every mode), waits for it, and goes on. A warm-up of
// WARMUP upserts runs first and is not timed. Modes:
//   ultimate-streaming              `await s.push(key, value)` on a SQLite file, no listener
//   ultimate-streaming + listener   the same with a 'change' listener counting the events
//   better-sqlite3                  a plain table with the same columns on a SQLite file (WAL,
//                                   synchronous=NORMAL, as the engine's default), each pusher runs
//                                   `INSERT ... ON CONFLICT(k) DO UPDATE SET v=excluded.v,
//                                   version=version+1 ... RETURNING version` synchronously in
//                                   autocommit mode, then yields (`await`)
//   better-sqlite3, 1 KiB pages     the same with `PRAGMA page_size = 1024` (the engine creates its
//                                   files with 1 KiB pages, better-sqlite3 with SQLite's 4 KiB)
//   better-sqlite3, batched         the floor of what push() does, by hand, in this thread: the
//                                   engine's own schema (a streamer creates it, then is closed),
//                                   so each upsert also fires the change-log triggers; the calls
//                                   waiting at a tick are written in one transaction (BEGIN
//                                   IMMEDIATE, the upserts, their versions read from the change
//                                   log as the engine does, COMMIT), then resolved. No engine, no
//                                   second thread, no delivery: what SQLite allows for these writes.
// Modes are interleaved round by round; medians over the rounds and ratios against better-sqlite3
// (from the medians of this run) are reported. After every run the file is reopened and
// SUM(version) is checked against the number of upserts.
//
//   node benchmark/push-throughput.js [--total=100000] [--pushers=64] [--keys=10000] [--rounds=3]
//                                     [--max-sec=10] [--budget=60]

const {
  median,
  fmt,
  printTable,
  tempDbPath,
  removeDb,
  runMain,
  printProblems,
  secondsSince,
  writeResult,
  machineFacts,
  loadStreamer,
  loadBetterSqlite3,
  commandFor,
  numberArg,
  waitFor,
  runBudget,
  drive,
} = require('./common');

const TOTAL = Math.floor(numberArg('total', 100_000));
const PUSHERS = Math.floor(numberArg('pushers', 64));
const KEYS = Math.floor(numberArg('keys', 10_000));
const ROUNDS = Math.floor(numberArg('rounds', 3));
const MAX_MS = numberArg('max-sec', 10) * 1000;
const BUDGET_MS = numberArg('budget', 60) * 1000;
const WARMUP = Math.min(2_000, TOTAL);
const PAD = 'x'.repeat(48);

const MODES = [
  { name: 'usp', label: 'ultimate-streaming push()', kind: 'usp', listener: false },
  { name: 'usp+listener', label: "ultimate-streaming push() + 'change' listener", kind: 'usp', listener: true },
  { name: 'better-sqlite3', label: 'better-sqlite3 upsert, autocommit', kind: 'bsq' },
  { name: 'bsq-1k', label: 'better-sqlite3 upsert, autocommit, 1 KiB pages', kind: 'bsq', pageSize: 1024 },
  { name: 'bsq-batched', label: "better-sqlite3, engine's schema, shared transactions (floor)", kind: 'bsq-batched' },
];

// A fixed pseudo-random key sequence (xorshift32), identical for every mode and round.
const KEY_SEQ = (() => {
  const n = WARMUP + TOTAL;
  const a = new Int32Array(n);
  let x = 0x2545f491;
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    a[i] = (x >>> 0) % KEYS;
  }
  return a;
})();

function valueFor(i, pusher) {
  return { n: i, by: pusher, pad: PAD };
}

function checkVersions(Database, dbPath, table) {
  const db = new Database(dbPath, { readonly: true });
  try {
    const row = db.prepare(`SELECT COUNT(*) AS keys, COALESCE(SUM(version), 0) AS versions FROM ${table}`).get();
    return { keys: row.keys, versionSum: row.versions };
  } finally {
    db.close();
  }
}

async function runUsp(UltimateStreamer, Database, mode) {
  const dbPath = tempDbPath('push-usp');
  let events = 0;
  let status;
  let warm;
  let timed;
  const s = new UltimateStreamer({ connection: { path: dbPath }, options: { batchSize: 1000 } });
  if (mode.listener) s.on('change', () => {
    events++;
  });
  s.on('error', () => {});
  try {
    await s.init();
    const op = (i, p) => s.push(`key:${KEY_SEQ[i]}`, valueFor(i, p));
    warm = await drive(op, 0, WARMUP, PUSHERS, MAX_MS);
    timed = await drive(op, WARMUP, TOTAL, PUSHERS, MAX_MS);
    if (mode.listener) await waitFor(() => events >= warm.done + timed.done, 10_000, 5);
    status = s.getStatus();
  } finally {
    await s.close();
  }
  let check;
  try {
    // Safe only after close(): it resolves once the engine's connections are closed.
    check = checkVersions(Database, dbPath, 'usp_kv');
  } finally {
    removeDb(dbPath);
  }
  return {
    warm,
    timed,
    check,
    events: mode.listener ? events : null,
    engine: status ? { store: status.store, events: status.events, errors: status.errors, latency: status.latency } : null,
  };
}

/** Runs the warm-up and the timed pushes with `op`, closes `db`, then checks the file. */
async function driveAndCheck(Database, db, dbPath, table, op) {
  let warm;
  let timed;
  try {
    warm = await drive(op, 0, WARMUP, PUSHERS, MAX_MS);
    timed = await drive(op, WARMUP, TOTAL, PUSHERS, MAX_MS);
  } finally {
    db.close();
  }
  try {
    return { warm, timed, check: checkVersions(Database, dbPath, table) };
  } finally {
    removeDb(dbPath);
  }
}

async function runBsq(Database, mode) {
  const dbPath = tempDbPath('push-bsq');
  const db = new Database(dbPath);
  let op;
  try {
    if (mode.pageSize) db.pragma(`page_size = ${mode.pageSize}`); // before the file has pages
    db.pragma('journal_mode = WAL');
    db.pragma('synchronous = NORMAL');
    db.pragma('busy_timeout = 5000');
    db.exec(
      'CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v TEXT, version INTEGER NOT NULL DEFAULT 1,' +
        ' deleted INTEGER NOT NULL DEFAULT 0, updated_at INTEGER)',
    );
    const upsert = db.prepare(
      'INSERT INTO kv (k, v, version, deleted, updated_at) VALUES (?, ?, 1, 0, ?)' +
        ' ON CONFLICT(k) DO UPDATE SET v = excluded.v, version = version + 1, deleted = 0, updated_at = excluded.updated_at' +
        ' RETURNING version',
    );
    // An async pusher around a synchronous call: run it, then yield like an awaited call would.
    op = async (i, p) => {
      const key = `key:${KEY_SEQ[i]}`;
      const row = upsert.get(key, JSON.stringify(valueFor(i, p)), Date.now() * 1000);
      return { key, version: row.version };
    };
  } catch (e) {
    db.close();
    removeDb(dbPath);
    throw e;
  }
  return { ...(await driveAndCheck(Database, db, dbPath, 'kv', op)), events: null, engine: null };
}

async function runBsqBatched(UltimateStreamer, Database) {
  const dbPath = tempDbPath('push-floor');
  // The engine's exact schema (tables, triggers), made by the engine; closed before better-sqlite3
  // opens the file (two SQLite libraries in one process must not share a file).
  const s = new UltimateStreamer({ connection: { path: dbPath } });
  await s.init();
  await s.close();
  let transactions = 0;
  let writes = 0;
  const db = new Database(dbPath);
  let op;
  try {
    db.pragma('journal_mode = WAL');
    db.pragma('synchronous = NORMAL');
    db.pragma('busy_timeout = 5000');
    const upsert = db.prepare(
      'INSERT INTO usp_kv (k, v, version, deleted, updated_at) VALUES (?, ?, 1, 0, ?)' +
        ' ON CONFLICT(k) DO UPDATE SET v = excluded.v, version = usp_kv.version + 1, deleted = 0, updated_at = excluded.updated_at',
    );
    const logEnd = db.prepare("SELECT seq FROM sqlite_sequence WHERE name = 'usp_kv_changes'").pluck();
    const logged = db.prepare('SELECT version FROM usp_kv_changes WHERE seq > ? ORDER BY seq').pluck();
    let pending = [];
    const flush = () => {
      const batch = pending;
      pending = [];
      const ts = Date.now() * 1000;
      let versions;
      try {
        db.exec('BEGIN IMMEDIATE');
        const base = logEnd.get() || 0;
        for (const w of batch) upsert.run(w.key, w.json, ts);
        versions = logged.all(base);
        db.exec('COMMIT');
      } catch (e) {
        if (db.inTransaction) db.exec('ROLLBACK');
        for (const w of batch) w.reject(e);
        return;
      }
      transactions++;
      writes += batch.length;
      batch.forEach((w, j) => w.resolve({ key: w.key, version: versions[j] }));
    };
    op = (i, p) =>
      new Promise((resolve, reject) => {
        if (pending.length === 0) setImmediate(flush);
        pending.push({ key: `key:${KEY_SEQ[i]}`, json: JSON.stringify(valueFor(i, p)), resolve, reject });
      });
  } catch (e) {
    db.close();
    removeDb(dbPath);
    throw e;
  }
  const res = await driveAndCheck(Database, db, dbPath, 'usp_kv', op);
  return { ...res, events: null, engine: { store: { transactions, writes } } };
}

/** The page size of a file the engine creates with its defaults (read from the file itself). */
async function enginePageSize(UltimateStreamer, Database) {
  const dbPath = tempDbPath('push-pagesize');
  try {
    const s = new UltimateStreamer({ connection: { path: dbPath } });
    await s.init();
    await s.close();
    const db = new Database(dbPath, { readonly: true });
    try {
      return db.pragma('page_size', { simple: true });
    } finally {
      db.close();
    }
  } finally {
    removeDb(dbPath);
  }
}

async function main() {
  const UltimateStreamer = await loadStreamer();
  const Database = loadBetterSqlite3();
  // The bsq-1k mode stands for "better-sqlite3 on the engine's page size": it must follow it.
  const pageSize = await enginePageSize(UltimateStreamer, Database);
  const bsq1k = MODES.find((m) => m.name === 'bsq-1k');
  if (pageSize !== bsq1k.pageSize) {
    throw new Error(`the engine now creates files with ${pageSize}-byte pages, the bsq-1k mode uses ${bsq1k.pageSize}: update that mode (name, label, pageSize)`);
  }
  const command = commandFor(__filename, process.argv.slice(2));
  const startedAt = new Date();
  const machine = machineFacts(); // taken before the load of this script
  console.log(
    `push-throughput: ${TOTAL} upserts (or ${MAX_MS / 1000} s) by ${PUSHERS} concurrent pushers over ${KEYS} keys,` +
      ` +${WARMUP} warm-up, ${ROUNDS} rounds, SQLite files (WAL, synchronous=NORMAL)`,
  );

  const rounds = [];
  const problems = [];
  const skipped = [];
  const budget = runBudget(BUDGET_MS, skipped, 14);
  for (let r = 1; r <= ROUNDS; r++) {
    for (const mode of MODES) {
      if (budget.skip(mode.name, r)) continue;
      const runStart = Date.now();
      const res =
        mode.kind === 'usp'
          ? await runUsp(UltimateStreamer, Database, mode)
          : mode.kind === 'bsq'
            ? await runBsq(Database, mode)
            : await runBsqBatched(UltimateStreamer, Database);
      budget.record(mode.name, runStart);
      const pushesPerSec = (res.timed.done / res.timed.ms) * 1000;
      const out = {
        round: r,
        mode: mode.name,
        pushes: res.timed.done,
        ms: res.timed.ms,
        pushesPerSec,
        complete: res.timed.done === TOTAL,
        errors: res.warm.errors + res.timed.errors,
        firstError: res.timed.firstError || res.warm.firstError ? String((res.timed.firstError || res.warm.firstError).message) : null,
        expectedVersionSum: res.warm.done + res.timed.done,
        check: res.check,
        events: res.events,
        engine: res.engine,
      };
      rounds.push(out);
      const tx = res.engine && res.engine.store ? res.engine.store : null;
      console.log(
        `  round ${r} ${mode.name.padEnd(14)} ${fmt(pushesPerSec, 0)} pushes/s  (${res.timed.done} in ${fmt(res.timed.ms)} ms` +
          (tx ? `, ${tx.writes} writes in ${tx.transactions} transactions` : '') +
          (res.events !== null ? `, ${res.events} events` : '') +
          ')',
      );
      if (!out.complete) problems.push(`round ${r} ${mode.name}: only ${res.timed.done} of ${TOTAL} pushes within ${MAX_MS / 1000} s`);
      if (out.errors) problems.push(`round ${r} ${mode.name}: ${out.errors} pushes failed (${out.firstError})`);
      if (res.check.versionSum !== out.expectedVersionSum) {
        problems.push(`round ${r} ${mode.name}: SUM(version) in the file is ${res.check.versionSum}, expected ${out.expectedVersionSum}`);
      }
      if (res.events !== null && res.events !== out.expectedVersionSum) {
        problems.push(`round ${r} ${mode.name}: the 'change' listener saw ${res.events} events for ${out.expectedVersionSum} pushes`);
      }
    }
  }
  if (skipped.length) console.log(`\nnote: ${skipped.length} run(s) skipped for time (${skipped.join(', ')}); medians use the rounds that ran`);

  const medians = {};
  for (const mode of MODES) {
    const rs = rounds.filter((x) => x.mode === mode.name);
    medians[mode.name] = {
      rounds: rs.length,
      pushesPerSec: median(rs.map((x) => x.pushesPerSec)),
      ms: median(rs.map((x) => x.ms)),
      writesPerTransaction: median(
        rs.map((x) => (x.engine && x.engine.store && x.engine.store.transactions ? x.engine.store.writes / x.engine.store.transactions : NaN)),
      ),
    };
  }
  const base = medians['better-sqlite3'].pushesPerSec;
  printTable(
    `push throughput, ${PUSHERS} concurrent pushers, ${TOTAL} upserts over ${KEYS} keys (median of ${ROUNDS} rounds)`,
    ['mode', 'rounds', 'pushes/s', 'time ms', 'writes/tx', 'vs better-sqlite3'],
    MODES.map((m) => {
      const x = medians[m.name];
      return [m.label, String(x.rounds), fmt(x.pushesPerSec, 0), x.ms, Number.isNaN(x.writesPerTransaction) ? '1 (autocommit)' : fmt(x.writesPerTransaction, 1), `${fmt(x.pushesPerSec / base)}x`];
    }),
  );
  const ratio = medians.usp.pushesPerSec / base;
  const ratioListener = medians['usp+listener'].pushesPerSec / base;
  const ofFloor = medians.usp.pushesPerSec / medians['bsq-batched'].pushesPerSec;
  console.log(`\nratio ultimate-streaming / better-sqlite3: ${fmt(ratio)}x (with a 'change' listener: ${fmt(ratioListener)}x)`);
  const ratio1k = medians.usp.pushesPerSec / medians['bsq-1k'].pushesPerSec;
  console.log(`ratio ultimate-streaming / better-sqlite3 with 1 KiB pages: ${fmt(ratio1k)}x`);
  console.log(`push() / the batched floor: ${fmt(ofFloor)}x`);

  const summary = [
    { metric: `push() pushes/s, ${PUSHERS} pushers, ${KEYS} keys, no listener`, value: medians.usp.pushesPerSec, unit: 'pushes/s' },
    { metric: `push() pushes/s, ${PUSHERS} pushers, ${KEYS} keys, with a 'change' listener`, value: medians['usp+listener'].pushesPerSec, unit: 'pushes/s' },
    { metric: `better-sqlite3 autocommit upserts/s, ${PUSHERS} pushers, ${KEYS} keys`, value: base, unit: 'upserts/s' },
    { metric: `better-sqlite3 autocommit upserts/s with 1 KiB pages, ${PUSHERS} pushers, ${KEYS} keys`, value: medians['bsq-1k'].pushesPerSec, unit: 'upserts/s' },
    { metric: `better-sqlite3 batched upserts/s with the engine's schema (floor), ${PUSHERS} pushers, ${KEYS} keys`, value: medians['bsq-batched'].pushesPerSec, unit: 'upserts/s' },
    { metric: 'ratio push() / better-sqlite3 (no listener)', value: ratio, unit: 'x' },
    { metric: 'ratio push() / better-sqlite3 with 1 KiB pages (no listener)', value: ratio1k, unit: 'x' },
    { metric: 'ratio push() / batched floor (no listener)', value: ofFloor, unit: 'x' },
    { metric: "ratio push() / better-sqlite3 (with 'change' listener)", value: ratioListener, unit: 'x' },
  ];

  printProblems(problems);
  const file = writeResult('push-throughput', {
    name: 'push-throughput',
    command,
    date: startedAt.toISOString(),
    durationSec: secondsSince(startedAt),
    machine,
    config: { total: TOTAL, pushers: PUSHERS, keys: KEYS, warmup: WARMUP, rounds: ROUNDS, maxSec: MAX_MS / 1000, budgetSec: BUDGET_MS / 1000, modes: MODES },
    ok: problems.length === 0,
    problems,
    skippedForTime: skipped,
    median: medians,
    ratios: { uspOverBetterSqlite3: ratio, uspListenerOverBetterSqlite3: ratioListener, uspOverBetterSqlite3With1KiBPages: ratio1k, uspOverBatchedFloor: ofFloor },
    rounds,
    summary,
  });
  console.log(`\nwrote ${file}`);
  if (problems.length) process.exitCode = 1;
}

runMain(main);
