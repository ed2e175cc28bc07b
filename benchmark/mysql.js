'use strict';
// MySQL/MariaDB: ultimate-streaming against its peers on one private MariaDB (binlog on), same run.
//
// The script starts its own MariaDB with scripts/mariadb.sh (a temp data dir, a free port on
// 127.0.0.1, binlog_format=ROW, binlog_row_metadata=FULL) and stops it at the end, also on failure
// (benchmark/processes.js).
// Every run uses a fresh table with the engine's schema (the tables of the peers are created
// `LIKE` a table the engine created). Peers:
//   usp            ultimate-streaming, binlog capture (`database: 'mysql'`, default options)
//   zongji         @vlasky/zongji, the maintained Node binlog listener (row events decoded in JS;
//                  its listener reads `k`/`version` of the rows and does not JSON.parse `v`,
//                  while ours delivers parsed `data`)
//   usp poll N ms  ultimate-streaming with `useChangeStreams: false, pollingInterval: N`
//   mysql2         plain single-row upserts through a mysql2 pool (push throughput only)
// Sections, each measured in every round; within a section the modes alternate their order round
// by round; medians over the rounds are reported, ratios are computed from the medians of this run:
// 1. Latency: one mysql2 connection writes LATENCY_WRITES rows one at a time (distinct keys,
//    `INSERT ... ON DUPLICATE KEY UPDATE`, prepared); after each write it waits for the listener to
//    see that row before the next one. Latency = listener time - time the write was sent (same
//    process, process.hrtime). A few warm-up writes are not measured. The polling modes wait a
//    random 0..interval ms before each write, so writes land at a random phase of the poll timer
//    (otherwise every write would follow a poll and wait a whole interval); so each of their writes
//    costs one interval on average, and they write fewer rows: 60 per round at 100 ms and 6 per
//    round at 2,000 ms by default (18 over 3 rounds; their p99 is the max of 6).
// 2. Events/s delivered to JS:
//    live     a child process (mysql2 pool of WRITERS connections) upserts LIVE_ROWS rows with
//             distinct keys, one row per statement, WRITERS at a time, while the listener runs.
//             events/s = rows / (last row seen - writers started) (wall clock in both processes);
//             the writers' own rows/s is reported next to it, so it shows whether capture keeps up
//             (events/s cannot exceed it), and so is the CPU time of this process (all threads:
//             JS, the engine's native threads) per 1,000 rows, from the writers' start to the last row.
//    catch-up a streamer opens a fresh table, sees one row, and is closed (its checkpoint is
//             saved); the binlog position (SHOW MASTER STATUS) is taken; the child process writes
//             CATCHUP_ROWS rows the same way while nothing listens. Then both read the same rows,
//             one after the other: a new streamer with the same table and checkpointName, and
//             zongji started at the saved filename/position. events/s = rows / (last row seen -
//             listener start (before new + init(), or before start())); the rate from the first to
//             the last row and the CPU per 1,000 rows are shown too.
//    catch-up, multi-row transactions: the same with BULK_ROWS rows written by multi-row upserts
//             of BULK_PER_TX rows each (one transaction each), as a batch job or an import writes:
//             a single-row transaction costs four binlog events (GTID, table map, rows, XID),
//             a 1,000-row one about one per row, so this shows the decoding of rows themselves.
// 3. Push throughput: PUSHERS async loops share a counter of PUSHES operations over PUSH_KEYS
//    keys (round robin), each awaiting its operation before taking the next: `await s.push(k, v)`
//    (no listener) vs `await pool.execute(upsert)` on a mysql2 pool of POOL connections.
//    After each run SUM(version) of the table is checked against the number of upserts.
// Every row is checked off by key (and version): missing, duplicated or unknown rows, failed
// writes and runs cut short by a time bound are listed as PROBLEMS and the exit code is 1.
// The polling streamers print one WARN line on stderr (binlog capture not used, as asked).
// Traffic goes only to 127.0.0.1. Every loop is bounded in count and time; after round 1 a run
// that would pass --budget seconds (judged by the longest earlier run of that mode) is skipped.
//
//   node benchmark/mysql.js [--rounds=3] [--latency-writes=2000] [--poll100-writes=60]
//     [--poll2000-writes=6] [--live-rows=20000] [--writers=8] [--catchup-rows=20000]
//     [--bulk-rows=100000] [--bulk-per-tx=1000]
//     [--pushes=20000] [--pushers=64] [--push-keys=200] [--pool=8] [--timeout=60] [--budget=170]

const fs = require('node:fs');
const path = require('node:path');
const { spawn, execFileSync } = require('node:child_process');
const {
  ROOT,
  nowMs,
  wallMs,
  sleep,
  waitFor,
  summarize,
  median,
  fmt,
  ratioCell,
  printTable,
  runMain,
  printProblems,
  secondsSince,
  writeResult,
  machineFacts,
  loadStreamer,
  commandFor,
  numberArg,
  budgetedRuns,
  roundOrder,
  drive,
  errorLine,
  sequentialWriter,
  samples,
  openStreamer,
  keyTracker,
  deliveryProblems,
  latencyRunProblems,
  latencyMedians,
  cpuSpan,
} = require('./common');
const { stopServers, stopAllOnExit, startPrivateServer } = require('./processes');

const ROUNDS = Math.floor(numberArg('rounds', 3));
const LATENCY_WRITES = Math.floor(numberArg('latency-writes', 2000));
const POLL100_WRITES = Math.floor(numberArg('poll100-writes', 60));
const POLL2000_WRITES = Math.floor(numberArg('poll2000-writes', 6));
const LIVE_ROWS = Math.floor(numberArg('live-rows', 20_000));
const WRITERS = Math.floor(numberArg('writers', 8));
const CATCHUP_ROWS = Math.floor(numberArg('catchup-rows', 20_000));
// 2c: the same catch-up over rows written in multi-row transactions (a batch job, an import).
const BULK_ROWS = Math.floor(numberArg('bulk-rows', 100_000));
const BULK_PER_TX = Math.floor(numberArg('bulk-per-tx', 1000));
const CATCHUP_VARIANTS = [
  { name: 'catchup', rows: CATCHUP_ROWS, perTx: 1 },
  { name: 'catchupBulk', rows: BULK_ROWS, perTx: BULK_PER_TX },
];
const PUSHES = Math.floor(numberArg('pushes', 20_000));
const PUSHERS = Math.floor(numberArg('pushers', 64));
const PUSH_KEYS = Math.floor(numberArg('push-keys', 200));
const POOL = Math.floor(numberArg('pool', 8));
const TIMEOUT_MS = numberArg('timeout', 60) * 1000; // bound of one run's writes, and of its wait for rows
const BUDGET_MS = numberArg('budget', 170) * 1000;
const PUSH_WARMUP = Math.min(500, PUSHES);

const SCRIPT = path.join(ROOT, 'scripts', 'mariadb.sh');
const USER = 'usp';
const PASSWORD = 'usp-test-pw';
const DATABASE = 'usp_test';
const HOST = '127.0.0.1';
const VALUE_PAD = 'abcdefghijklmnopqrstuvwxyz0123456789';

const LATENCY_MODES = [
  { name: 'usp', label: 'ultimate-streaming (binlog)', kind: 'usp', writes: LATENCY_WRITES, warmup: 20, thinkMs: 0, cycleMs: 5 },
  { name: 'zongji', label: '@vlasky/zongji (binlog)', kind: 'zongji', writes: LATENCY_WRITES, warmup: 20, thinkMs: 0, cycleMs: 5 },
  {
    name: 'usp-poll-100',
    label: 'ultimate-streaming, polling 100 ms',
    kind: 'usp',
    options: { useChangeStreams: false, pollingInterval: 100 },
    writes: POLL100_WRITES,
    warmup: 1,
    thinkMs: 100,
    cycleMs: 100,
  },
  {
    name: 'usp-poll-2000',
    label: 'ultimate-streaming, polling 2,000 ms',
    kind: 'usp',
    options: { useChangeStreams: false, pollingInterval: 2000 },
    writes: POLL2000_WRITES,
    warmup: 1,
    thinkMs: 2000,
    cycleMs: 2000,
  },
];
const PAIR_MODES = [
  { name: 'usp', label: 'ultimate-streaming (binlog)', kind: 'usp' },
  { name: 'zongji', label: '@vlasky/zongji', kind: 'zongji' },
];
const PUSH_MODES = [
  { name: 'usp', label: `ultimate-streaming push(), ${PUSHERS} pushers`, kind: 'usp' },
  { name: 'mysql2', label: `mysql2 pool of ${POOL}, ${PUSHERS} concurrent upserts`, kind: 'mysql2' },
];

function upsertSql(table) {
  return `INSERT INTO \`${table}\` (k, v, version) VALUES (?, ?, 1) ON DUPLICATE KEY UPDATE v = VALUES(v), version = version + 1`;
}

function valueJson(i) {
  return `{"i":${i},"p":"${VALUE_PAD}"}`;
}

let tableNo = 0;
function freshTable() {
  tableNo += 1;
  return `bench_kv_${tableNo}`;
}

let serverIdNo = 1000;
function nextServerId() {
  serverIdNo += 1;
  return serverIdNo;
}

// ---------------------------------------------------------------------------------------------
// Listeners: the same small interface for ours and for zongji

function streamerConfig(table, options = {}) {
  return {
    database: 'mysql',
    connection: { uri: `mysql://${USER}:${PASSWORD}@${HOST}:${SERVER.port}/${DATABASE}` },
    options: { table, ...options, mysql: { serverId: nextServerId(), ...(options.mysql || {}) } },
  };
}

/**
 * Opens ultimate-streaming on `table`; `onRow(key, version)` is called per change event.
 * Resolves { close, status, errors, mode, initMs } once init() resolved.
 */
function openUsp(U, table, options, onRow) {
  return openStreamer(U, streamerConfig(table, options), (e) => {
    if (e.type === 'insert' || e.type === 'update' || e.type === 'delete') onRow(e.key, e.version, e.type);
  });
}

let ZongJi = null;

/**
 * Starts zongji on `table` (from the end of the binlog, or from `from` = { filename, position });
 * `onRow(key, version, type)` per row. Resolves once zongji emitted 'ready'.
 */
async function openZongji(table, from, onRow) {
  const errors = [];
  const z = new ZongJi({ host: HOST, port: SERVER.port, user: USER, password: PASSWORD });
  z.on('error', (e) => errors.push(e && e.message ? e.message : String(e)));
  z.on('binlog', (evt) => {
    const name = evt.getEventName();
    if (name === 'writerows') {
      for (const r of evt.rows) onRow(r.k, r.version, 'insert');
    } else if (name === 'updaterows') {
      for (const r of evt.rows) onRow(r.after.k, r.after.version, 'update');
    } else if (name === 'deleterows') {
      for (const r of evt.rows) onRow(r.k, r.version, 'delete');
    }
  });
  const ready = new Promise((resolve) => z.once('ready', () => resolve(true)));
  const t0 = nowMs();
  z.start({
    includeEvents: ['tablemap', 'writerows', 'updaterows', 'deleterows'],
    serverId: nextServerId(),
    includeSchema: { [DATABASE]: [table] },
    ...(from ? { filename: from.filename, position: from.position } : { startAtEnd: true }),
  });
  const ok = await Promise.race([ready, sleep(15_000).then(() => false)]);
  const close = async () => {
    const stopped = new Promise((resolve) => z.once('stopped', resolve));
    z.stop();
    await Promise.race([stopped, sleep(2000)]);
  };
  if (!ok) {
    await close();
    throw new Error(`zongji did not become ready within 15 s (${errors.join('; ') || 'no error reported'})`);
  }
  return { errors, initMs: nowMs() - t0, mode: 'binlog', status: () => null, close };
}

/** Ours with mode.options (+ uspOptions), or zongji from the end of the binlog or from `from`. */
async function openListener(U, mode, table, from, onRow, uspOptions = {}) {
  if (mode.kind === 'usp') return openUsp(U, table, { ...(mode.options || {}), ...uspOptions }, onRow);
  return openZongji(table, from, onRow);
}

// ---------------------------------------------------------------------------------------------
// SQL helpers

let admin = null; // mysql2/promise pool for DDL and checks

function mysql2() {
  return require('mysql2/promise');
}

async function createTableLike(table) {
  await admin.query(`CREATE TABLE \`${table}\` LIKE bench_template`);
}

async function masterStatus() {
  const [rows] = await admin.query('SHOW MASTER STATUS');
  if (!rows.length) throw new Error('SHOW MASTER STATUS returned nothing: is the binlog on?');
  return { filename: rows[0].File, position: Number(rows[0].Position) };
}

async function versionSum(table, prefix) {
  const [rows] = await admin.query(`SELECT COUNT(*) AS n, COALESCE(SUM(version), 0) AS s FROM \`${table}\` WHERE k LIKE ?`, [`${prefix}%`]);
  return { keys: Number(rows[0].n), versionSum: Number(rows[0].s) };
}

/**
 * Upserts rows `${prefix}0..n-1` from a child process with a mysql2 pool of `conc` connections,
 * `conc` statements in flight, one row per statement. Resolves { startAt, endAt, done, errors,
 * firstError } (wall clock ms; the pool is connected and the statement prepared before startAt).
 */
function writeInChild(table, prefix, n, conc, perStatement = 1) {
  const script = `
    const mysql = require(${JSON.stringify(require.resolve('mysql2/promise'))});
    const [host, port, user, password, database, sql, prefix, n, conc, maxMs, pad, per, head, tail] = process.argv.slice(1);
    const N = Number(n), C = Number(conc), P = Number(per);
    const wall = () => performance.timeOrigin + performance.now();
    (async () => {
      const pool = mysql.createPool({ host, port: Number(port), user, password, database, connectionLimit: C });
      const conns = [];
      for (let c = 0; c < C; c++) conns.push(await pool.getConnection());
      for (const c of conns) { await c.prepare(sql); c.release(); }
      let next = 0, done = 0, errors = 0, firstError = null;
      const deadline = performance.now() + Number(maxMs);
      const startAt = wall();
      const loop = async () => {
        while (next < N && performance.now() < deadline) {
          if (P > 1) {
            // One multi-row statement (one transaction) of up to P rows.
            const from = next, to = Math.min(N, from + P);
            next = to;
            const params = [];
            for (let i = from; i < to; i++) params.push(prefix + i, '{"i":' + i + ',"p":"' + pad + '"}');
            try { await pool.query(head + Array(to - from).fill('(?, ?, 1)').join(', ') + tail, params); done += to - from; }
            catch (e) { errors++; if (!firstError) firstError = e.message; if (errors > 100) return; }
            continue;
          }
          const i = next++;
          try { await pool.execute(sql, [prefix + i, '{"i":' + i + ',"p":"' + pad + '"}']); done++; }
          catch (e) { errors++; if (!firstError) firstError = e.message; if (errors > 100) return; }
        }
      };
      await Promise.all(Array.from({ length: C }, loop));
      const endAt = wall();
      await pool.end();
      process.stdout.write(JSON.stringify({ startAt, endAt, done, errors, firstError }));
    })().catch((e) => { console.error(e); process.exit(1); });`;
  const [head, tail] = upsertSql(table).split('(?, ?, 1)');
  const args = [HOST, String(SERVER.port), USER, PASSWORD, DATABASE, upsertSql(table), prefix, String(n), String(conc), String(TIMEOUT_MS), VALUE_PAD, String(perStatement), head, tail];
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['-e', script, ...args], { stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    child.stdout.on('data', (d) => (out += d));
    const timer = setTimeout(() => child.kill('SIGKILL'), TIMEOUT_MS + 20_000);
    child.on('error', reject);
    child.on('exit', (code) => {
      clearTimeout(timer);
      if (code !== 0) return reject(new Error(`writer process exited with ${code}`));
      try {
        resolve(JSON.parse(out));
      } catch (e) {
        reject(e);
      }
    });
  });
}

// ---------------------------------------------------------------------------------------------
// 1. Latency

async function latencyRun(U, mode) {
  const table = freshTable();
  if (mode.kind === 'zongji') await createTableLike(table);
  const total = mode.warmup + mode.writes;
  const sent = new Float64Array(total).fill(NaN);
  const seenAt = new Float64Array(total).fill(NaN);
  const writer = sequentialWriter();
  const tr = keyTracker('lat:', total, {
    onSeen: (i, t) => {
      seenAt[i] = t;
      writer.arrived(i);
    },
  });

  const conn = await mysql2().createConnection({ host: HOST, port: SERVER.port, user: USER, password: PASSWORD, database: DATABASE });
  let listener = null;
  let w = null; // the write loop's outcome
  let status = null;
  const waitMs = mode.options && mode.options.pollingInterval ? mode.options.pollingInterval * 3 + 3000 : 5000;
  const boundMs = Math.min(TIMEOUT_MS * 2, total * mode.cycleMs * 2 + 5000);
  try {
    listener = await openListener(U, mode, table, null, (k, v) => tr.onChange(k, v));
    const sql = upsertSql(table);
    await conn.prepare(sql);
    w = await writer.run({
      total,
      boundMs,
      thinkMs: mode.thinkMs,
      waitMs,
      onSend: (i, t0) => (sent[i] = t0),
      write: (i) => conn.execute(sql, [`lat:${i}`, valueJson(i)]),
      seen: (i) => !Number.isNaN(seenAt[i]),
    });
    // Rows that timed out may still come; then look for strays.
    await waitFor(() => tr.distinct >= w.issued - w.writeErrors, w.timeouts ? waitMs : 0, 5);
    await sleep(mode.options && mode.options.pollingInterval ? Math.min(mode.options.pollingInterval + 200, 2500) : 50);
    status = listener.status();
  } finally {
    if (listener) await listener.close();
    await conn.end().catch(() => {});
  }

  const { issued, timeouts, writeErrors, firstWriteError, ack } = w;
  const lat = samples(mode.warmup, issued, (i) => seenAt[i] - sent[i]);
  const acks = samples(mode.warmup, issued, (i) => ack[i]);
  return {
    mode: mode.name,
    table,
    listenerMode: listener ? listener.mode : null,
    listenerInitMs: listener ? listener.initMs : NaN,
    planned: total,
    issued,
    measured: lat.length,
    received: tr.distinct,
    duplicates: tr.duplicates,
    unexpected: tr.unexpected,
    wrongVersion: tr.wrongVersion,
    timeouts,
    writeErrors,
    firstWriteError,
    listenerErrors: listener ? listener.errors.slice(0, 5) : [],
    writeToListener: summarize(lat),
    writeAck: summarize(acks),
    engineLatency: status ? status.latency : null,
  };
}

// ---------------------------------------------------------------------------------------------
// 2a. Live events/s with concurrent writers

async function liveRun(U, mode) {
  const table = freshTable();
  if (mode.kind === 'zongji') await createTableLike(table);
  const tr = keyTracker('live:', LIVE_ROWS);
  let listener = null;
  let w = null;
  let completed = false;
  let status = null;
  let cpu = null;
  try {
    listener = await openListener(U, mode, table, null, (k, v) => tr.onChange(k, v));
    const cpu0 = process.cpuUsage();
    const wall0 = wallMs();
    w = await writeInChild(table, 'live:', LIVE_ROWS, WRITERS);
    completed = await tr.reached(w.done, TIMEOUT_MS);
    cpu = cpuSpan(process.cpuUsage(cpu0), wallMs() - wall0);
    await sleep(100); // strays and duplicates after the last row
    status = listener.status();
  } finally {
    if (listener) await listener.close();
  }
  const lastMs = completed && w.done === LIVE_ROWS ? tr.tLastWall - w.startAt : NaN;
  return {
    mode: mode.name,
    table,
    listenerMode: listener ? listener.mode : null,
    rows: LIVE_ROWS,
    written: w ? w.done : 0,
    writeErrors: w ? w.errors : 0,
    firstWriteError: w ? w.firstError : null,
    completed: completed && w.done === LIVE_ROWS,
    received: tr.distinct,
    duplicates: tr.duplicates,
    unexpected: tr.unexpected,
    wrongVersion: tr.wrongVersion,
    listenerErrors: listener ? listener.errors.slice(0, 5) : [],
    writeMs: w ? w.endAt - w.startAt : NaN,
    writerRowsPerSec: w ? (w.done / (w.endAt - w.startAt)) * 1000 : NaN,
    lastRowMs: lastMs,
    lagAfterWritersMs: completed && w ? tr.tLastWall - w.endAt : NaN,
    eventsPerSec: (LIVE_ROWS / lastMs) * 1000,
    listenerCpu: cpu,
    cpuMsPer1kRows: cpu ? cpu.totalMs / (LIVE_ROWS / 1000) : NaN,
    engineEvents: status ? status.events : null,
  };
}

// ---------------------------------------------------------------------------------------------
// 2b. Catch-up: rows written while no listener ran, read by both from the same binlog

async function catchupRound(U, round, { rows = CATCHUP_ROWS, perTx = 1, name = 'catchup' } = {}) {
  const table = freshTable();
  const checkpointName = `${name}_${round}`;
  // A first streamer makes the table, sees one row and saves its checkpoint at close().
  let firstSeen = false;
  const a = await openUsp(U, table, { mysql: { checkpointName } }, (k) => {
    if (k === 'before') firstSeen = true;
  });
  try {
    await admin.query(upsertSql(table), ['before', '{}']);
    if (!(await waitFor(() => firstSeen, 10_000, 2))) throw new Error('catch-up: the first streamer did not see its row');
  } finally {
    await a.close();
  }
  const from = await masterStatus();
  const w = await writeInChild(table, 'cu:', rows, WRITERS, perTx);

  const results = [];
  for (const mode of roundOrder(PAIR_MODES, round)) {
    const tr = keyTracker('cu:', rows);
    let strays = 0;
    let listener = null;
    let completed = false;
    let status = null;
    let cpu = null;
    const cpu0 = process.cpuUsage();
    const t0 = wallMs();
    try {
      listener = await openListener(
        U,
        mode,
        table,
        from,
        (k, v) => {
          if (k === 'before') strays++;
          else tr.onChange(k, v);
        },
        { mysql: { checkpointName } },
      );
      completed = await tr.reached(w.done, TIMEOUT_MS);
      cpu = cpuSpan(process.cpuUsage(cpu0), wallMs() - t0);
      await sleep(100);
      status = listener.status();
    } finally {
      if (listener) await listener.close();
    }
    const ok = completed && w.done === rows;
    const lastMs = ok ? tr.tLastWall - t0 : NaN;
    results.push({
      mode: mode.name,
      table,
      checkpointName: mode.kind === 'usp' ? checkpointName : null,
      from: mode.kind === 'zongji' ? from : null,
      listenerMode: listener ? listener.mode : null,
      rows,
      rowsPerTransaction: perTx,
      written: w.done,
      writeErrors: w.errors,
      firstWriteError: w.firstError,
      completed: ok,
      received: tr.distinct,
      duplicates: tr.duplicates,
      unexpected: tr.unexpected + strays,
      wrongVersion: tr.wrongVersion,
      listenerErrors: listener ? listener.errors.slice(0, 5) : [],
      listenerInitMs: listener ? listener.initMs : NaN,
      firstRowMs: tr.tFirstWall - t0,
      lastRowMs: lastMs,
      eventsPerSec: (rows / lastMs) * 1000,
      firstToLastEventsPerSec: ok ? ((rows - 1) / (tr.tLastWall - tr.tFirstWall)) * 1000 : NaN,
      listenerCpu: cpu,
      cpuMsPer1kRows: cpu ? cpu.totalMs / (rows / 1000) : NaN,
      writerRowsPerSec: (w.done / (w.endAt - w.startAt)) * 1000,
      engineEvents: status ? status.events : null,
    });
  }
  return results;
}

// ---------------------------------------------------------------------------------------------
// 3. Push throughput

// Clock ticks per second of the CPU times in /proc/PID/stat (USER_HZ).
const CLOCK_TICKS = (() => {
  try {
    return Number(execFileSync('getconf', ['CLK_TCK']).toString().trim()) || 100;
  } catch {
    return 100;
  }
})();

/** CPU time (ms, user + system) the private server's process has used so far, or NaN. */
function serverCpuMs() {
  const pid = SERVER && SERVER.pid();
  if (!pid) return NaN;
  try {
    // Fields 14 and 15 of /proc/PID/stat (after the command name in parentheses), in clock ticks.
    const f = fs.readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
    return ((Number(f[11]) + Number(f[12])) * 1000) / CLOCK_TICKS;
  } catch {
    return NaN;
  }
}

/** The CPU of the timed part of a push run, per upsert: the server's and this process's (µs). */
async function cpuPerUpsert(run) {
  const server0 = serverCpuMs();
  const own0 = process.cpuUsage();
  const timed = await run();
  const own = process.cpuUsage(own0);
  const per = (ms) => (timed.done > 0 ? (ms * 1000) / timed.done : NaN);
  return { timed, serverCpuUs: per(serverCpuMs() - server0), clientCpuUs: per((own.user + own.system) / 1000) };
}

function pushValue(i, pusher) {
  return { i, by: pusher, p: VALUE_PAD };
}

async function pushRun(U, mode) {
  const table = freshTable();
  let warm;
  let timed;
  let deadlockRetries = 0;
  let extra = {};
  let cpu = { serverCpuUs: NaN, clientCpuUs: NaN };
  if (mode.kind === 'usp') {
    const s = new U(streamerConfig(table));
    s.on('error', () => {});
    try {
      await s.init();
      warm = await drive((i, p) => s.push(`w:${i % PUSH_KEYS}`, pushValue(i, p)), 0, PUSH_WARMUP, PUSHERS, TIMEOUT_MS);
      ({ timed, ...cpu } = await cpuPerUpsert(() => drive((i, p) => s.push(`p:${i % PUSH_KEYS}`, pushValue(i, p)), 0, PUSHES, PUSHERS, TIMEOUT_MS)));
      const st = s.getStatus();
      extra = { engineMode: st.mode, engineStore: st.store };
    } finally {
      await s.close();
    }
  } else {
    await createTableLike(table);
    const pool = mysql2().createPool({ host: HOST, port: SERVER.port, user: USER, password: PASSWORD, database: DATABASE, connectionLimit: POOL });
    const sql = upsertSql(table);
    try {
      const conns = [];
      for (let c = 0; c < POOL; c++) conns.push(await pool.getConnection());
      for (const c of conns) {
        await c.prepare(sql);
        c.release();
      }
      const upsert = async (key, value) => {
        for (let attempt = 0; ; attempt++) {
          try {
            await pool.execute(sql, [key, JSON.stringify(value)]);
            return;
          } catch (e) {
            // Concurrent upserts of one key can deadlock in InnoDB; a user would retry.
            if (e.errno === 1213 && attempt < 5) {
              deadlockRetries++;
              continue;
            }
            throw e;
          }
        }
      };
      warm = await drive((i, p) => upsert(`w:${i % PUSH_KEYS}`, pushValue(i, p)), 0, PUSH_WARMUP, PUSHERS, TIMEOUT_MS);
      ({ timed, ...cpu } = await cpuPerUpsert(() => drive((i, p) => upsert(`p:${i % PUSH_KEYS}`, pushValue(i, p)), 0, PUSHES, PUSHERS, TIMEOUT_MS)));
    } finally {
      await pool.end().catch(() => {});
    }
  }
  const check = await versionSum(table, 'p:');
  return {
    mode: mode.name,
    table,
    pushes: PUSHES,
    done: timed.done,
    errors: timed.errors + warm.errors,
    firstError: timed.firstError || warm.firstError ? errorLine(timed.firstError || warm.firstError) : null,
    completed: timed.done === PUSHES,
    ms: timed.ms,
    pushesPerSec: (timed.done / timed.ms) * 1000,
    deadlockRetries,
    // CPU per upsert of the timed part: the MariaDB server process, and this process (all its
    // threads: JavaScript, the engine's native threads, mysql2).
    serverCpuUs: cpu.serverCpuUs,
    clientCpuUs: cpu.clientCpuUs,
    check,
    expectedKeys: Math.min(PUSH_KEYS, timed.done),
    ...extra,
  };
}

// ---------------------------------------------------------------------------------------------

let SERVER = null;

async function main() {
  const U = await loadStreamer();
  ({ default: ZongJi } = await import('@vlasky/zongji'));
  const command = commandFor(__filename, process.argv.slice(2));
  const startedAt = new Date();
  const machine = machineFacts(); // taken before the load of this script
  console.log(
    `mysql: ${ROUNDS} rounds; latency ${LATENCY_WRITES} writes (polling 100 ms: ${POLL100_WRITES}, 2,000 ms: ${POLL2000_WRITES}); ` +
      `live ${LIVE_ROWS} rows by ${WRITERS} writers; catch-up ${CATCHUP_ROWS} rows (and ${BULK_ROWS}, ${BULK_PER_TX} per transaction); ${PUSHES} pushes by ${PUSHERS} pushers over ${PUSH_KEYS} keys`,
  );

  const t0server = Date.now();
  // Whatever happens from here on (an exception, Ctrl-C), the server goes down with us.
  stopAllOnExit();
  SERVER = await startPrivateServer({ name: 'mariadb', label: 'MariaDB', script: SCRIPT, extra: ['binlog'], pidFile: 'mysqld.pid' });
  console.log(`private MariaDB on ${HOST}:${SERVER.port} (${((Date.now() - t0server) / 1000).toFixed(1)} s to start), data in ${SERVER.dir}`);
  let serverInfo = null;
  const rounds = { latency: [], live: [], catchup: [], catchupBulk: [], push: [] };
  const problems = [];
  const skipped = [];
  try {
    admin = mysql2().createPool({ host: HOST, port: SERVER.port, user: USER, password: PASSWORD, database: DATABASE, connectionLimit: 2 });
    const [[v]] = await admin.query('SELECT VERSION() AS version, @@binlog_format AS binlogFormat, @@binlog_row_image AS rowImage, @@binlog_row_metadata AS rowMetadata');
    serverInfo = v;
    // The template of the peers' tables: exactly the table the engine creates.
    const tmpl = await openUsp(U, 'bench_template', {}, () => {});
    await tmpl.close();

    // Runs fn unless the mode is broken or (after round 1) the budget would be passed.
    const { timed, broken } = budgetedRuns({ budgetMs: BUDGET_MS, pad: 22, problems, skipped });

    for (let r = 1; r <= ROUNDS; r++) {
      // 1. latency
      for (const mode of roundOrder(LATENCY_MODES, r)) {
        const res = await timed(`latency/${mode.name}`, r, () => latencyRun(U, mode));
        if (!res) continue;
        res.round = r;
        rounds.latency.push(res);
        const p = res.writeToListener;
        console.log(
          `  round ${r} latency/${mode.name.padEnd(14)} write->listener p50 ${fmt(p.p50)} p99 ${fmt(p.p99)} max ${fmt(p.max)} ms` +
            `  (write ack p50 ${fmt(res.writeAck.p50)} ms; seen ${res.received}/${res.issued}, ${res.measured} measured; mode ${res.listenerMode})`,
        );
        problems.push(...latencyRunProblems(`round ${r} latency/${mode.name}`, res, mode, { writes: 'writes', capture: 'binlog' }));
        if (res.received < res.issued - res.writeErrors) broken.add(`latency/${mode.name}`);
      }

      // 2a. live events/s
      for (const mode of roundOrder(PAIR_MODES, r)) {
        const res = await timed(`live/${mode.name}`, r, () => liveRun(U, mode));
        if (!res) continue;
        res.round = r;
        rounds.live.push(res);
        console.log(
          `  round ${r} live/${mode.name.padEnd(17)} ${res.completed ? `${fmt(res.eventsPerSec, 0)} events/s` : 'INCOMPLETE'}` +
            `  (writers ${fmt(res.writerRowsPerSec, 0)} rows/s over ${fmt(res.writeMs, 0)} ms; last row ${fmt(res.lagAfterWritersMs)} ms after the writers finished;` +
            ` listener process CPU ${fmt(res.cpuMsPer1kRows)} ms per 1,000 rows)`,
        );
        const tag = `round ${r} live/${mode.name}`;
        problems.push(...deliveryProblems(tag, { ...res, distinct: res.received }, res.rows));
        if (res.writeErrors) problems.push(`${tag}: ${res.writeErrors} writes failed (${res.firstWriteError})`);
        if (res.listenerErrors.length) problems.push(`${tag}: listener errors: ${res.listenerErrors.join('; ')}`);
        if (res.listenerMode !== 'binlog') problems.push(`${tag}: capture mode ${res.listenerMode}, expected binlog`);
        if (!res.completed) broken.add(`live/${mode.name}`);
      }

      // 2b. catch-up (single-row transactions), 2c. the same over multi-row transactions
      for (const v of CATCHUP_VARIANTS) {
        const cu = await timed(v.name, r, () => catchupRound(U, r, v));
        if (!cu) continue;
        for (const res of cu) {
          res.round = r;
          rounds[v.name].push(res);
          console.log(
            `  round ${r} ${v.name}/${res.mode.padEnd(14)} ${res.completed ? `${fmt(res.eventsPerSec, 0)} events/s` : 'INCOMPLETE'}` +
              `  (${res.rows} rows, ${res.rowsPerTransaction} per transaction; first row ${fmt(res.firstRowMs)} ms, last ${fmt(res.lastRowMs)} ms after start; listener start ${fmt(res.listenerInitMs)} ms;` +
              ` ${fmt(res.firstToLastEventsPerSec, 0)} events/s from first to last row; CPU ${fmt(res.cpuMsPer1kRows)} ms per 1,000 rows)`,
          );
          const tag = `round ${r} ${v.name}/${res.mode}`;
          problems.push(...deliveryProblems(tag, { ...res, distinct: res.received }, res.rows));
          if (res.writeErrors) problems.push(`${tag}: ${res.writeErrors} writes failed (${res.firstWriteError})`);
          if (res.listenerErrors.length) problems.push(`${tag}: listener errors: ${res.listenerErrors.join('; ')}`);
          if (!res.completed) broken.add(v.name);
        }
      }

      // 3. push throughput
      for (const mode of roundOrder(PUSH_MODES, r)) {
        const res = await timed(`push/${mode.name}`, r, () => pushRun(U, mode));
        if (!res) continue;
        res.round = r;
        rounds.push.push(res);
        console.log(
          `  round ${r} push/${mode.name.padEnd(17)} ${fmt(res.pushesPerSec, 0)} upserts/s` +
            `  (${res.done}/${res.pushes} in ${fmt(res.ms, 0)} ms; SUM(version) ${res.check.versionSum} over ${res.check.keys} keys` +
            `; CPU per upsert: server ${fmt(res.serverCpuUs, 1)} µs, this process ${fmt(res.clientCpuUs, 1)} µs` +
            `${res.deadlockRetries ? `; ${res.deadlockRetries} deadlock retries` : ''}` +
            `${res.engineStore ? `; engine: ${fmt(res.engineStore.writes / res.engineStore.transactions, 1)} writes per transaction` : ''})`,
        );
        const tag = `round ${r} push/${mode.name}`;
        if (!res.completed) problems.push(`${tag}: only ${res.done} of ${res.pushes} upserts done within ${TIMEOUT_MS / 1000} s`);
        if (res.errors) problems.push(`${tag}: ${res.errors} upserts failed (${res.firstError})`);
        if (res.check.versionSum !== res.done || res.check.keys !== res.expectedKeys) {
          problems.push(`${tag}: table holds SUM(version) ${res.check.versionSum} over ${res.check.keys} keys, expected ${res.done} over ${res.expectedKeys}`);
        }
        if (mode.kind === 'usp' && res.engineMode !== 'binlog') problems.push(`${tag}: capture mode ${res.engineMode}, expected binlog`);
      }
    }
  } finally {
    if (admin) await admin.end().catch(() => {});
    stopServers();
  }

  // ---- medians
  const med = (rs, f) => median(rs.map(f));
  const latency = {};
  for (const m of LATENCY_MODES) {
    latency[m.name] = latencyMedians(rounds.latency.filter((x) => x.mode === m.name), m.writes);
  }
  const live = {};
  const catchup = {};
  const catchupBulk = {};
  for (const m of PAIR_MODES) {
    const rl = rounds.live.filter((x) => x.mode === m.name);
    const allL = rl.length > 0 && rl.every((x) => x.completed);
    live[m.name] = {
      rounds: rl.length,
      completedRounds: rl.filter((x) => x.completed).length,
      eventsPerSec: allL ? med(rl, (x) => x.eventsPerSec) : NaN,
      writerRowsPerSec: med(rl, (x) => x.writerRowsPerSec),
      lagAfterWritersMs: allL ? med(rl, (x) => x.lagAfterWritersMs) : NaN,
      cpuMsPer1kRows: med(rl, (x) => x.cpuMsPer1kRows),
      cpuCores: med(rl, (x) => (x.listenerCpu ? x.listenerCpu.cores : NaN)),
    };
    for (const v of CATCHUP_VARIANTS) {
      const rc = rounds[v.name].filter((x) => x.mode === m.name);
      const allC = rc.length > 0 && rc.every((x) => x.completed);
      (v.name === 'catchup' ? catchup : catchupBulk)[m.name] = {
        rounds: rc.length,
        completedRounds: rc.filter((x) => x.completed).length,
        eventsPerSec: allC ? med(rc, (x) => x.eventsPerSec) : NaN,
        firstRowMs: med(rc, (x) => x.firstRowMs),
        lastRowMs: allC ? med(rc, (x) => x.lastRowMs) : NaN,
        listenerInitMs: med(rc, (x) => x.listenerInitMs),
        firstToLastEventsPerSec: allC ? med(rc, (x) => x.firstToLastEventsPerSec) : NaN,
        cpuMsPer1kRows: med(rc, (x) => x.cpuMsPer1kRows),
      };
    }
  }
  const push = {};
  for (const m of PUSH_MODES) {
    const rs = rounds.push.filter((x) => x.mode === m.name);
    const all = rs.length > 0 && rs.every((x) => x.completed && !x.errors);
    push[m.name] = {
      rounds: rs.length,
      pushesPerSec: all ? med(rs, (x) => x.pushesPerSec) : NaN,
      ms: med(rs, (x) => x.ms),
      serverCpuUs: med(rs, (x) => x.serverCpuUs),
      clientCpuUs: med(rs, (x) => x.clientCpuUs),
    };
  }
  const ratios = {
    latencyP50ZongjiOverUsp: latency.zongji.p50 / latency.usp.p50,
    latencyP99ZongjiOverUsp: latency.zongji.p99 / latency.usp.p99,
    liveUspOverZongji: live.usp.eventsPerSec / live.zongji.eventsPerSec,
    catchupUspOverZongji: catchup.usp.eventsPerSec / catchup.zongji.eventsPerSec,
    catchupBulkUspOverZongji: catchupBulk.usp.eventsPerSec / catchupBulk.zongji.eventsPerSec,
    pushUspOverMysql2: push.usp.pushesPerSec / push.mysql2.pushesPerSec,
  };

  if (skipped.length) console.log(`\nnote: ${skipped.length} run(s) skipped for time (${skipped.join(', ')}); medians use the rounds that ran`);
  printTable(
    `1. latency, external write sent -> JS listener, ms (median of rounds; sequential writes by one mysql2 connection)`,
    ['mode', 'rounds', 'writes/round', 'p50', 'p90', 'p99', 'max', 'write ack p50'],
    LATENCY_MODES.map((m) => {
      const x = latency[m.name];
      return [m.label, String(x.rounds), fmt(x.writesPerRound, 0), x.p50, x.p90, x.p99, x.max, x.ackP50];
    }),
  );
  console.log(
    `ratio zongji / ultimate-streaming (binlog): p50 ${fmt(ratios.latencyP50ZongjiOverUsp)}x, p99 ${fmt(ratios.latencyP99ZongjiOverUsp)}x` +
      ` (polling modes wait a random 0..interval before each write; p99 of ${POLL2000_WRITES} writes is their max)`,
  );
  printTable(
    `2a. events/s to JS, ${LIVE_ROWS} single-row upserts by ${WRITERS} concurrent writers (another process) while listening (median of rounds)`,
    ['listener', 'rounds', 'events/s', "writers' rows/s", 'last row after writers, ms', 'CPU ms / 1k rows', 'CPU cores', 'vs zongji'],
    PAIR_MODES.map((m) => {
      const x = live[m.name];
      return [
        m.label,
        `${x.completedRounds}/${x.rounds}`,
        fmt(x.eventsPerSec, 0),
        fmt(x.writerRowsPerSec, 0),
        x.lagAfterWritersMs,
        x.cpuMsPer1kRows,
        x.cpuCores,
        ratioCell(x.eventsPerSec / live.zongji.eventsPerSec),
      ];
    }),
  );
  console.log(
    "(events/s cannot exceed the writers' rate: when the last row arrives ~0 ms after the writers finished, capture kept up and the" +
      ' writers were the limit; CPU = user+system time of this process, all threads, per 1,000 rows, from the writers\' start to the last row)',
  );
  const catchupTable = (title, x0) =>
    printTable(
      title,
      ['listener', 'rounds', 'events/s', 'start -> first row ms', 'start -> last row ms', 'first -> last events/s', 'CPU ms / 1k rows', 'vs zongji'],
      PAIR_MODES.map((m) => {
        const x = x0[m.name];
        return [
          m.label,
          `${x.completedRounds}/${x.rounds}`,
          fmt(x.eventsPerSec, 0),
          x.firstRowMs,
          x.lastRowMs,
          fmt(x.firstToLastEventsPerSec, 0),
          x.cpuMsPer1kRows,
          ratioCell(x.eventsPerSec / x0.zongji.eventsPerSec),
        ];
      }),
    );
  catchupTable(`2b. catch-up events/s, ${CATCHUP_ROWS} rows in the binlog written while no listener ran, one row per transaction (median of rounds)`, catchup);
  catchupTable(`2c. the same, ${BULK_ROWS} rows written ${BULK_PER_TX} per transaction (multi-row upserts) (median of rounds)`, catchupBulk);
  printTable(
    `3. push throughput, ${PUSHES} upserts over ${PUSH_KEYS} keys by ${PUSHERS} concurrent async loops (median of rounds)`,
    ['mode', 'rounds', 'upserts/s', 'ms', 'server CPU µs/upsert', 'client CPU µs/upsert', 'vs mysql2'],
    PUSH_MODES.map((m) => {
      const x = push[m.name];
      return [m.label, String(x.rounds), fmt(x.pushesPerSec, 0), fmt(x.ms, 0), fmt(x.serverCpuUs, 1), fmt(x.clientCpuUs, 1), ratioCell(x.pushesPerSec / push.mysql2.pushesPerSec)];
    }),
  );
  // What the CPU per upsert allows on this machine: both processes share its cores.
  const cores = machine.cpuCount;
  const ceiling = 1e6 / ((push.usp.serverCpuUs + push.usp.clientCpuUs) / cores);
  console.log(
    `push(): server ${fmt(push.usp.serverCpuUs, 1)} + this process ${fmt(push.usp.clientCpuUs, 1)} µs of CPU per upsert; ` +
      `with all ${cores} cores busy that allows at most ${fmt(ceiling, 0)} upserts/s`,
  );

  const summary = [];
  for (const m of LATENCY_MODES) {
    summary.push({ metric: `MySQL write → listener p50, ${m.label} (${m.writes} writes/round)`, value: latency[m.name].p50, unit: 'ms' });
    summary.push({ metric: `MySQL write → listener p99, ${m.label} (${m.writes} writes/round)`, value: latency[m.name].p99, unit: 'ms' });
  }
  summary.push({ metric: 'MySQL latency ratio zongji / ultimate-streaming, p50', value: ratios.latencyP50ZongjiOverUsp, unit: 'x' });
  summary.push({ metric: 'MySQL latency ratio zongji / ultimate-streaming, p99', value: ratios.latencyP99ZongjiOverUsp, unit: 'x' });
  for (const m of PAIR_MODES) {
    summary.push({ metric: `MySQL live events/s, ${m.label} (${LIVE_ROWS} rows, ${WRITERS} writers)`, value: live[m.name].eventsPerSec, unit: 'events/s' });
    summary.push({ metric: `MySQL live: writers' own rows/s during the ${m.name} run`, value: live[m.name].writerRowsPerSec, unit: 'rows/s' });
    summary.push({ metric: `MySQL live: listener process CPU per 1,000 rows, ${m.label}`, value: live[m.name].cpuMsPer1kRows, unit: 'ms' });
  }
  summary.push({ metric: 'MySQL live events/s ratio ultimate-streaming / zongji', value: ratios.liveUspOverZongji, unit: 'x' });
  for (const m of PAIR_MODES) {
    summary.push({ metric: `MySQL catch-up events/s, ${m.label} (${CATCHUP_ROWS} rows)`, value: catchup[m.name].eventsPerSec, unit: 'events/s' });
    summary.push({ metric: `MySQL catch-up listener start → first row, ${m.label}`, value: catchup[m.name].firstRowMs, unit: 'ms' });
  }
  summary.push({ metric: 'MySQL catch-up events/s ratio ultimate-streaming / zongji', value: ratios.catchupUspOverZongji, unit: 'x' });
  for (const m of PAIR_MODES) {
    summary.push({ metric: `MySQL catch-up events/s, ${m.label} (${BULK_ROWS} rows, ${BULK_PER_TX} per transaction)`, value: catchupBulk[m.name].eventsPerSec, unit: 'events/s' });
  }
  summary.push({ metric: 'MySQL catch-up (multi-row transactions) events/s ratio ultimate-streaming / zongji', value: ratios.catchupBulkUspOverZongji, unit: 'x' });
  for (const m of PUSH_MODES) {
    summary.push({ metric: `MySQL upserts/s, ${m.label} (${PUSHES} over ${PUSH_KEYS} keys)`, value: push[m.name].pushesPerSec, unit: 'ops/s' });
    summary.push({ metric: `MySQL server CPU per upsert, ${m.label}`, value: push[m.name].serverCpuUs, unit: 'µs' });
    summary.push({ metric: `MySQL client process CPU per upsert, ${m.label}`, value: push[m.name].clientCpuUs, unit: 'µs' });
  }
  summary.push({ metric: 'MySQL push throughput ratio ultimate-streaming / mysql2', value: ratios.pushUspOverMysql2, unit: 'x' });

  printProblems(problems);

  const file = writeResult('mysql', {
    name: 'mysql',
    command,
    date: startedAt.toISOString(),
    durationSec: secondsSince(startedAt),
    machine,
    server: serverInfo,
    config: {
      rounds: ROUNDS,
      latencyModes: LATENCY_MODES,
      liveRows: LIVE_ROWS,
      writers: WRITERS,
      catchupRows: CATCHUP_ROWS,
      bulkRows: BULK_ROWS,
      bulkRowsPerTransaction: BULK_PER_TX,
      pushes: PUSHES,
      pushWarmup: PUSH_WARMUP,
      pushers: PUSHERS,
      pushKeys: PUSH_KEYS,
      mysql2Pool: POOL,
      timeoutSec: TIMEOUT_MS / 1000,
      budgetSec: BUDGET_MS / 1000,
      zongjiVersion: zongjiVersion(),
    },
    ok: problems.length === 0,
    problems,
    skippedForTime: skipped,
    median: { latency, live, catchup, catchupBulk, push },
    ratios,
    rounds,
    summary,
  });
  console.log(`\nwrote ${file}`);
  if (problems.length) process.exitCode = 1;
}

function zongjiVersion() {
  try {
    return JSON.parse(fs.readFileSync(path.join(ROOT, 'node_modules', '@vlasky', 'zongji', 'package.json'), 'utf8')).version;
  } catch {
    return null;
  }
}

runMain(main);
