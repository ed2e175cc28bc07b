'use strict';
// Events per second delivered to a JavaScript listener: batched delivery vs one threadsafe call per
// event, same run, same workload.
//
// Per run: a fresh streamer on a fresh SQLite file is initialised; then ANOTHER PROCESS
// (better-sqlite3 on the same file, WAL) inserts N rows with distinct keys in ONE transaction.
// (Another process, never this one: two SQLite libraries in one process must not open the same
// file, their POSIX locks do not see each other.) The clock starts when that transaction's COMMIT
// is issued (wall clock, performance.timeOrigin + performance.now() in both processes) and stops
// when the listener has seen the N-th distinct event. events/s = N / (last event - commit); the
// pipeline's own rate once rows flow, (N - 1) / (last event - first event), is shown next to it,
// and so is the writer's COMMIT time (issued -> returned, when the rows became visible; the
// writer runs the checkpoint SQLite would run inside COMMIT right after it): no event can come
// before it.
// The per-event mode allows 1024 calls in flight, as a naive one-call-per-event design would.
// Modes:
//   batched      batchSize 1000, a 'change' listener (called once per event, JS side loop)
//   per-event    batchSize 1,    a 'change' listener (one native -> JS call per event)
//   batch-only   batchSize 1000, only a 'batch' listener (one call per delivered array)
// The modes are interleaved round by round; medians over the rounds are reported, with the ratio
// batched / per-event computed from the medians of this run.
//
//   node benchmark/delivery.js [--rows=200000] [--rounds=3] [--timeout=60] [--budget=60]

const { spawn } = require('node:child_process');
const {
  wallMs,
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
  sleep,
  runBudget,
} = require('./common');

const N = Math.floor(numberArg('rows', 200_000));
const ROUNDS = Math.floor(numberArg('rounds', 3));
const TIMEOUT_MS = numberArg('timeout', 60) * 1000; // bound of the wait for the N events of one run
// Bound of the whole script: a run (after round 1) is skipped when the time spent so far plus the
// longest earlier run of the same mode would pass it; skipped runs are reported.
const BUDGET_MS = numberArg('budget', 60) * 1000;
const KEY_PREFIX = 'd:';

const MODES = [
  { name: 'batched', label: "batched (batchSize 1000), 'change' listener", batchSize: 1000, listener: 'change' },
  { name: 'per-event', label: "per-event (batchSize 1), 'change' listener", batchSize: 1, listener: 'change', maxInFlightBatches: 1024 },
  { name: 'batch-only', label: "batched (batchSize 1000), 'batch' listener only", batchSize: 1000, listener: 'batch' },
];

/** Inserts the N rows from a child process; resolves with its commit time (wall clock, ms). */
function insertInChild(dbPath) {
  const script = `
    const Database = require(${JSON.stringify(require.resolve('better-sqlite3'))});
    const db = new Database(process.argv[1]);
    db.pragma('journal_mode = WAL'); db.pragma('synchronous = NORMAL'); db.pragma('busy_timeout = 10000');
    // The checkpoint SQLite would run inside COMMIT is run right after it instead (the same
    // PASSIVE checkpoint), so that the COMMIT's own time (until the rows are visible) is known.
    db.pragma('wal_autocheckpoint = 0');
    const stmt = db.prepare('INSERT INTO usp_kv (k, v, version, deleted, updated_at) VALUES (?, ?, 1, 0, ?)');
    const N = Number(process.argv[2]); const P = ${JSON.stringify(KEY_PREFIX)};
    const t0 = performance.now();
    db.exec('BEGIN');
    const us = Date.now() * 1000;
    for (let i = 0; i < N; i++) stmt.run(P + i, '{"i":' + i + ',"p":"abcdefgh"}', us);
    // Stamped when COMMIT is issued: no reader can see a row before the COMMIT has written its
    // last WAL pages, and that is part of what a listener waits for.
    const issued = performance.now();
    const commitAt = performance.timeOrigin + issued;
    db.exec('COMMIT');
    const commitMs = performance.now() - issued;
    db.pragma('wal_checkpoint(PASSIVE)');
    db.close();
    process.stdout.write(JSON.stringify({ commitAt, commitMs, insertMs: performance.now() - t0 }));`;
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['-e', script, dbPath, String(N)], { stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    child.stdout.on('data', (d) => (out += d));
    const timer = setTimeout(() => child.kill('SIGKILL'), TIMEOUT_MS);
    child.on('exit', (code) => {
      clearTimeout(timer);
      if (code !== 0) return reject(new Error(`writer process exited with ${code}`));
      resolve(JSON.parse(out));
    });
  });
}

async function runOnce(UltimateStreamer, mode) {
  const dbPath = tempDbPath(`delivery-${mode.name}`);
  const seen = new Uint8Array(N);
  let distinct = 0;
  let duplicates = 0;
  let unexpected = 0;
  let resyncs = 0;
  let calls = 0;
  let tFirst = NaN;
  let tLast = NaN;

  const mark = (e) => {
    if (e.type === 'resync') {
      resyncs++;
      return;
    }
    const i = typeof e.key === 'string' && e.key.startsWith(KEY_PREFIX) ? Number(e.key.slice(KEY_PREFIX.length)) : -1;
    if (!(i >= 0 && i < N)) {
      unexpected++;
      return;
    }
    if (seen[i]) {
      duplicates++;
      return;
    }
    seen[i] = 1;
    distinct++;
    if (distinct === 1) tFirst = wallMs();
    if (distinct === N) tLast = wallMs();
  };

  const s = new UltimateStreamer({ connection: { path: dbPath }, options: { batchSize: mode.batchSize, ...(mode.maxInFlightBatches ? { maxInFlightBatches: mode.maxInFlightBatches } : {}) } });
  if (mode.listener === 'change') {
    s.on('change', (e) => {
      calls++;
      mark(e);
    });
  } else {
    s.on('batch', (events) => {
      calls++;
      for (let k = 0; k < events.length; k++) mark(events[k]);
    });
  }
  s.on('error', () => {});

  let status;
  let tCommit = NaN;
  let insertMs = NaN;
  let commitMs = NaN;
  let completed = false;
  try {
    await s.init();
    const w = await insertInChild(dbPath);
    tCommit = w.commitAt;
    insertMs = w.insertMs;
    commitMs = w.commitMs;

    completed = await waitFor(() => distinct >= N, TIMEOUT_MS, 1);
    // A short grace period to catch duplicates or strays delivered after the last expected event.
    await sleep(50);
    status = s.getStatus();
  } finally {
    await s.close();
    removeDb(dbPath);
  }

  const deliveryMs = completed ? tLast - tCommit : NaN;
  return {
    mode: mode.name,
    rows: N,
    completed,
    received: distinct,
    missing: N - distinct,
    duplicates,
    unexpected,
    resyncs,
    listenerCalls: calls,
    insertMs,
    commitMs,
    firstEventMs: tFirst - tCommit,
    deliveryMs,
    eventsPerSec: completed ? (N / deliveryMs) * 1000 : NaN,
    // The pipeline's own rate once rows flow, without the writer's COMMIT in the window.
    flowPerSec: completed && N > 1 ? ((N - 1) / (tLast - tFirst)) * 1000 : NaN,
    engineEvents: status ? status.events : null,
    engineErrors: status ? status.errors : null,
    engineLatency: status ? status.latency : null,
  };
}

async function main() {
  const UltimateStreamer = await loadStreamer();
  loadBetterSqlite3(); // fails early, with a clear message, when the devDependency is missing
  const command = commandFor(__filename, process.argv.slice(2));
  const startedAt = new Date();
  const machine = machineFacts(); // taken before the load of this script
  console.log(`delivery: ${N} rows inserted by another connection in one transaction, ${ROUNDS} rounds, modes: ${MODES.map((m) => m.name).join(', ')}`);

  const rounds = [];
  const problems = [];
  const broken = new Set();
  const skipped = [];
  const budget = runBudget(BUDGET_MS, skipped, 10);
  for (let r = 1; r <= ROUNDS; r++) {
    for (const mode of MODES) {
      if (broken.has(mode.name)) continue;
      if (budget.skip(mode.name, r)) continue;
      const runStart = Date.now();
      const res = await runOnce(UltimateStreamer, mode);
      budget.record(mode.name, runStart);
      res.round = r;
      rounds.push(res);
      console.log(
        `  round ${r} ${mode.name.padEnd(10)} ${res.completed ? `${fmt(res.eventsPerSec, 0)} events/s` : 'INCOMPLETE'}` +
          `  (first -> last event ${fmt(res.flowPerSec, 0)} events/s; commit -> last event ${fmt(res.deliveryMs)} ms, first event ${fmt(res.firstEventMs)} ms (writer's COMMIT ${fmt(res.commitMs)} ms), insert tx ${fmt(res.insertMs)} ms,` +
          ` ${res.engineEvents ? res.engineEvents.batches : '?'} native batches, ${res.listenerCalls} listener calls)`,
      );
      if (!res.completed) {
        const msg = `round ${r} ${mode.name}: only ${res.received} of ${N} events reached the listener within ${TIMEOUT_MS / 1000} s` +
          ` (engine: ${JSON.stringify(res.engineEvents)}, errors: ${JSON.stringify(res.engineErrors)})`;
        console.error(`ERROR: ${msg}`);
        problems.push(msg);
        broken.add(mode.name); // do not spend another timeout on a mode that lost events
      }
      if (res.duplicates) problems.push(`round ${r} ${mode.name}: ${res.duplicates} events delivered twice`);
      if (res.unexpected) problems.push(`round ${r} ${mode.name}: ${res.unexpected} events with unknown keys`);
      if (res.resyncs) problems.push(`round ${r} ${mode.name}: ${res.resyncs} resync events`);
    }
  }

  const medians = {};
  for (const mode of MODES) {
    const rs = rounds.filter((x) => x.mode === mode.name);
    const ok = rs.filter((x) => x.completed);
    medians[mode.name] = {
      rounds: rs.length,
      completedRounds: ok.length,
      eventsPerSec: ok.length === rs.length ? median(ok.map((x) => x.eventsPerSec)) : NaN,
      flowPerSec: ok.length === rs.length ? median(ok.map((x) => x.flowPerSec)) : NaN,
      deliveryMs: ok.length === rs.length ? median(ok.map((x) => x.deliveryMs)) : NaN,
      firstEventMs: median(rs.map((x) => x.firstEventMs)),
      insertMs: median(rs.map((x) => x.insertMs)),
      commitMs: median(rs.map((x) => x.commitMs)),
      nativeBatches: median(rs.map((x) => (x.engineEvents ? x.engineEvents.batches : NaN))),
      maxBatch: median(rs.map((x) => (x.engineEvents ? x.engineEvents.maxBatch : NaN))),
    };
  }
  if (skipped.length) console.log(`\nnote: ${skipped.length} run(s) skipped for time (${skipped.join(', ')}); medians use the rounds that ran`);
  const ratioBatched = medians.batched.eventsPerSec / medians['per-event'].eventsPerSec;
  const ratioBatchOnly = medians['batch-only'].eventsPerSec / medians['per-event'].eventsPerSec;

  printTable(
    `events/s delivered to JS, ${N} rows committed at once by another connection (median of ${ROUNDS} rounds)`,
    ['mode', 'rounds', 'events/s', 'first->last events/s', 'commit->last ms', 'commit->first ms', "writer's COMMIT ms", 'native batches', 'max batch', 'vs per-event'],
    MODES.map((m) => {
      const x = medians[m.name];
      const ratio = x.eventsPerSec / medians['per-event'].eventsPerSec;
      return [m.label, String(x.completedRounds), fmt(x.eventsPerSec, 0), fmt(x.flowPerSec, 0), x.deliveryMs, x.firstEventMs, x.commitMs, fmt(x.nativeBatches, 0), fmt(x.maxBatch, 0), `${fmt(ratio)}x`];
    }),
  );
  console.log(`\nratio batched / per-event ('change' listener): ${fmt(ratioBatched)}x; 'batch' listener only / per-event: ${fmt(ratioBatchOnly)}x`);
  console.log(`(insert transaction of the writer, not part of the measurement: median ${fmt(medians.batched.insertMs)} ms)`);

  const summary = [
    { metric: `events/s to a 'change' listener, batched (batchSize 1000), ${N} rows`, value: medians.batched.eventsPerSec, unit: 'events/s' },
    { metric: `events/s to a 'change' listener, batched, first -> last event, ${N} rows`, value: medians.batched.flowPerSec, unit: 'events/s' },
    { metric: `events/s to a 'batch' listener only, first -> last event, ${N} rows`, value: medians['batch-only'].flowPerSec, unit: 'events/s' },
    { metric: `events/s to a 'change' listener, per-event (batchSize 1), ${N} rows`, value: medians['per-event'].eventsPerSec, unit: 'events/s' },
    { metric: `events/s to a 'batch' listener only (batchSize 1000), ${N} rows`, value: medians['batch-only'].eventsPerSec, unit: 'events/s' },
    { metric: 'ratio batched / per-event (change listener)', value: ratioBatched, unit: 'x' },
    { metric: "ratio 'batch' listener only / per-event", value: ratioBatchOnly, unit: 'x' },
  ];

  printProblems(problems);

  const file = writeResult('delivery', {
    name: 'delivery',
    command,
    date: startedAt.toISOString(),
    durationSec: secondsSince(startedAt),
    machine,
    config: { rows: N, rounds: ROUNDS, timeoutSec: TIMEOUT_MS / 1000, budgetSec: BUDGET_MS / 1000, modes: MODES },
    ok: problems.length === 0,
    problems,
    skippedForTime: skipped,
    median: medians,
    ratios: { batchedOverPerEvent: ratioBatched, batchOnlyOverPerEvent: ratioBatchOnly },
    rounds,
    summary,
  });
  console.log(`\nwrote ${file}`);
  if (problems.length) process.exitCode = 1;
}

runMain(main);
