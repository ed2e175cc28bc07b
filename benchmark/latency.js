'use strict';
// push() -> 'change' listener latency in one process, at a fixed offered rate (default 1,000 pushes/s).
//
// For each store (a SQLite file, then ':memory:') and each round, a fresh streamer is created and
// WARMUP + COUNT pushes are issued on an absolute-time schedule (push i is due at start + i / RATE;
// pushes that fall behind are issued as soon as the loop runs again, so the average rate stays at
// RATE). Pushes are not awaited one by one: the offered rate does not depend on the store.
// Per event, latency = (time the 'change' listener runs) - (time push() was called), both from
// process.hrtime. The first WARMUP events are left out. Reported: p50/p90/p99/max per round, and
// the median of each over the rounds. The engine's own getStatus().latency (commit -> hand-off to
// JS, over every event of the run, warm-up included) is printed next to it. For reference, each
// round also sends the same schedule of messages to a Node worker thread that echoes them back:
// what one hop to another thread and back into this event loop costs here, without the engine.
//
//   node benchmark/latency.js [--rate=1000] [--count=5000] [--rounds=3] [--warmup=250]

const { Worker } = require('node:worker_threads');
const {
  nowMs,
  summarize,
  medianOf,
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
  commandFor,
  numberArg,
  waitFor,
} = require('./common');

const RATE = numberArg('rate', 1000);
const COUNT = Math.floor(numberArg('count', 5000));
const ROUNDS = Math.floor(numberArg('rounds', 3));
const WARMUP = Math.floor(numberArg('warmup', 250));
const DRAIN_TIMEOUT_MS = 10_000; // after the last push, how long we wait for missing events
const TARGETS = [
  { name: 'file', label: 'SQLite file' },
  { name: 'memory', label: "':memory:'" },
];
const KEY_PREFIX = 'lat:';
const STAT_FIELDS = ['p50', 'p90', 'p99', 'max', 'mean'];
const ENGINE_FIELDS = ['count', 'p50', 'p95', 'p99', 'max', 'mean'];

async function runOnce(UltimateStreamer, target) {
  const total = WARMUP + COUNT;
  const dbPath = target.name === 'file' ? tempDbPath('latency') : ':memory:';
  const pacedBudgetMs = pacedBudget(total);

  const sent = new Float64Array(total).fill(NaN); // nowMs() when push(i) was called
  const seen = new Float64Array(total).fill(NaN); // listener time - sent
  const handoff = new Float64Array(total).fill(NaN); // e.latency (engine commit -> JS), per event
  const acked = new Float64Array(total).fill(NaN); // push() promise settled - sent
  const lag = new Float64Array(total).fill(NaN); // actual call time - scheduled time
  let received = 0;
  let duplicates = 0;
  let unexpected = 0;
  let pushErrors = 0;
  let firstPushError = null;

  const s = new UltimateStreamer({ connection: { path: dbPath }, options: { batchSize: 1000 } });
  s.on('change', (e) => {
    const t = nowMs();
    const i = typeof e.key === 'string' && e.key.startsWith(KEY_PREFIX) ? Number(e.key.slice(KEY_PREFIX.length)) : -1;
    if (!(i >= 0 && i < total) || Number.isNaN(sent[i])) {
      unexpected++;
      return;
    }
    if (!Number.isNaN(seen[i])) {
      duplicates++;
      return;
    }
    seen[i] = t - sent[i];
    handoff[i] = e.latency;
    received++;
  });
  s.on('error', () => {});

  let status;
  let issued = 0;
  let pacedMs = 0;
  try {
    await s.init();

    // Paced phase: absolute-time schedule, bounded by count and by time.
    ({ issued, pacedMs } = await pace(total, pacedBudgetMs, (i, t) => {
      lag[i] = t.lag;
      sent[i] = t.at;
      s.push(`${KEY_PREFIX}${i}`, { i, at: Date.now() }).then(
        () => {
          acked[i] = nowMs() - sent[i];
        },
        (err) => {
          pushErrors++;
          if (!firstPushError) firstPushError = err;
        },
      );
    }));

    await waitFor(() => received + pushErrors >= issued, DRAIN_TIMEOUT_MS, 5);
    // Let the last push promises settle (they may arrive after the events).
    await waitFor(() => {
      for (let i = issued - 1; i >= Math.max(0, issued - 50); i--) if (Number.isNaN(acked[i])) return false;
      return true;
    }, 2000, 5);
    status = s.getStatus();
  } finally {
    await s.close();
    removeDb(dbPath);
  }

  const measured = [];
  const measuredHandoff = [];
  const measuredAck = [];
  const measuredLag = [];
  for (let i = WARMUP; i < issued; i++) {
    if (!Number.isNaN(seen[i])) {
      measured.push(seen[i]);
      measuredHandoff.push(handoff[i]);
    }
    if (!Number.isNaN(acked[i])) measuredAck.push(acked[i]);
    measuredLag.push(lag[i]);
  }
  return {
    target: target.name,
    issued,
    received,
    missing: issued - received,
    duplicates,
    unexpected,
    pushErrors,
    firstPushError: firstPushError ? `${firstPushError.code || ''} ${firstPushError.message}`.trim() : null,
    achievedRate: issued > 0 && pacedMs > 0 ? (issued / pacedMs) * 1000 : NaN,
    pushToListener: summarize(measured),
    commitToJsPerEvent: summarize(measuredHandoff),
    pushToAck: summarize(measuredAck),
    scheduleLag: summarize(measuredLag),
    engineStatusLatency: status ? status.latency : null,
    engineEvents: status ? status.events : null,
    engineStore: status ? status.store : null,
  };
}

/** Maximum wall time of a paced phase of `total` calls: the schedule plus 50 % slack. */
function pacedBudget(total) {
  return total * (1000 / RATE) * 1.5 + 2000;
}

/**
 * Calls `issue(i, { at, lag })` for i = 0 .. total-1 on an absolute-time schedule (call i is due
 * at start + i / RATE; calls that fall behind are made as soon as the loop runs again, so the
 * average rate stays at RATE), driven by setTimeout, bounded by `budgetMs`.
 */
function pace(total, budgetMs, issue) {
  const interval = 1000 / RATE;
  let issued = 0;
  return new Promise((resolve) => {
    const start = nowMs() + 5;
    const deadline = start + budgetMs;
    const tick = () => {
      const now = nowMs();
      while (issued < total && start + issued * interval <= now) {
        const i = issued++;
        const at = nowMs();
        issue(i, { at, lag: at - (start + i * interval) });
      }
      if (issued >= total || now >= deadline) {
        resolve({ issued, pacedMs: now - start });
        return;
      }
      const delay = start + issued * interval - nowMs();
      setTimeout(tick, Math.max(1, Math.floor(delay)));
    };
    setTimeout(tick, 5);
  });
}

/**
 * The reference: the same schedule, each message sent to a Node worker thread that sends it
 * straight back (worker_threads postMessage). No database and no engine: the cost of one hop to
 * another thread and back into this event loop on this machine.
 */
async function runWorkerOnce() {
  const total = WARMUP + COUNT;
  const sent = new Float64Array(total).fill(NaN);
  const seen = new Float64Array(total).fill(NaN);
  let received = 0;
  const echo = "const { parentPort } = require('node:worker_threads'); parentPort.on('message', (m) => parentPort.postMessage(m));";
  const w = new Worker(echo, { eval: true });
  w.on('message', (i) => {
    seen[i] = nowMs() - sent[i];
    received++;
  });
  try {
    await new Promise((resolve, reject) => {
      w.once('online', resolve);
      w.once('error', reject);
    });
    const { issued } = await pace(total, pacedBudget(total), (i, t) => {
      sent[i] = t.at;
      w.postMessage(i);
    });
    await waitFor(() => received >= issued, DRAIN_TIMEOUT_MS, 5);
    const measured = [];
    for (let i = WARMUP; i < issued; i++) if (!Number.isNaN(seen[i])) measured.push(seen[i]);
    return { issued, received, missing: issued - received, roundTrip: summarize(measured) };
  } finally {
    await w.terminate();
  }
}

async function main() {
  const UltimateStreamer = await loadStreamer();
  const command = commandFor(__filename, process.argv.slice(2));
  const startedAt = new Date();
  const machine = machineFacts(); // taken before the load of this script
  console.log(`latency: ${COUNT} measured pushes (+${WARMUP} warm-up) at ${RATE}/s, ${ROUNDS} rounds, stores: file, :memory:`);

  const rounds = [];
  const workerRounds = [];
  const problems = [];
  for (let r = 1; r <= ROUNDS; r++) {
    for (const target of TARGETS) {
      const res = await runOnce(UltimateStreamer, target);
      res.round = r;
      rounds.push(res);
      const p = res.pushToListener;
      console.log(
        `  round ${r} ${target.name.padEnd(6)} rate ${fmt(res.achievedRate, 0)}/s  push->listener p50 ${fmt(p.p50)} p90 ${fmt(p.p90)} p99 ${fmt(p.p99)} max ${fmt(p.max)} ms` +
          `  (received ${res.received}/${res.issued})`,
      );
      if (res.missing > 0) problems.push(`round ${r} ${target.name}: ${res.missing} of ${res.issued} events never reached the listener`);
      if (res.duplicates > 0) problems.push(`round ${r} ${target.name}: ${res.duplicates} events delivered twice`);
      if (res.unexpected > 0) problems.push(`round ${r} ${target.name}: ${res.unexpected} events with unknown keys`);
      if (res.pushErrors > 0) problems.push(`round ${r} ${target.name}: ${res.pushErrors} push() calls rejected (${res.firstPushError})`);
      if (res.issued < WARMUP + COUNT) problems.push(`round ${r} ${target.name}: only ${res.issued} of ${WARMUP + COUNT} pushes issued within the time bound`);
    }
    const ref = await runWorkerOnce();
    ref.round = r;
    workerRounds.push(ref);
    const q = ref.roundTrip;
    console.log(`  round ${r} worker round trip (reference)  p50 ${fmt(q.p50)} p90 ${fmt(q.p90)} p99 ${fmt(q.p99)} max ${fmt(q.max)} ms  (received ${ref.received}/${ref.issued})`);
    if (ref.missing > 0) problems.push(`round ${r} worker: ${ref.missing} of ${ref.issued} messages never came back`);
  }
  const workerMedian = medianOf(workerRounds.map((x) => x.roundTrip), STAT_FIELDS);

  const medians = {};
  for (const target of TARGETS) {
    const rs = rounds.filter((x) => x.target === target.name);
    medians[target.name] = {
      achievedRate: medianOf(rs, ['achievedRate']).achievedRate,
      pushToListener: medianOf(rs.map((x) => x.pushToListener), STAT_FIELDS),
      commitToJsPerEvent: medianOf(rs.map((x) => x.commitToJsPerEvent), STAT_FIELDS),
      pushToAck: medianOf(rs.map((x) => x.pushToAck), STAT_FIELDS),
      scheduleLag: medianOf(rs.map((x) => x.scheduleLag), STAT_FIELDS),
      engineStatusLatency: medianOf(rs.map((x) => x.engineStatusLatency), ENGINE_FIELDS),
    };
  }

  printTable(
    `push() -> 'change' listener latency, ms (median of ${ROUNDS} rounds; ${COUNT} events per round at ${RATE}/s)`,
    ['store', 'rate/s', 'p50', 'p90', 'p99', 'max', 'mean'],
    TARGETS.map((t) => {
      const m = medians[t.name];
      return [t.label, fmt(m.achievedRate, 0), m.pushToListener.p50, m.pushToListener.p90, m.pushToListener.p99, m.pushToListener.max, m.pushToListener.mean];
    }),
  );
  printTable(
    `reference, ms (median of ${ROUNDS} rounds): a message to a Node worker thread and back (worker_threads postMessage), same schedule, no engine`,
    ['path', 'rate/s', 'p50', 'p90', 'p99', 'max', 'mean'],
    [['worker round trip', fmt(RATE, 0), workerMedian.p50, workerMedian.p90, workerMedian.p99, workerMedian.max, workerMedian.mean]],
  );
  printTable(
    'for comparison, ms (median of rounds): push() -> its promise resolved; commit -> JS per event (e.latency); push() call behind schedule',
    ['store', 'ack p50', 'ack p99', 'commit->JS p50', 'commit->JS p90', 'commit->JS p99', 'commit->JS max', 'sched. lag p50', 'sched. lag p99'],
    TARGETS.map((t) => {
      const m = medians[t.name];
      return [
        t.label,
        m.pushToAck.p50,
        m.pushToAck.p99,
        m.commitToJsPerEvent.p50,
        m.commitToJsPerEvent.p90,
        m.commitToJsPerEvent.p99,
        m.commitToJsPerEvent.max,
        m.scheduleLag.p50,
        m.scheduleLag.p99,
      ];
    }),
  );
  printTable(
    "engine's own getStatus().latency, ms (commit -> JS hand-off, every event of the run incl. warm-up; median of rounds)",
    ['store', 'count', 'p50', 'p95', 'p99', 'max', 'mean'],
    TARGETS.map((t) => {
      const m = medians[t.name].engineStatusLatency;
      return [t.label, fmt(m.count, 0), m.p50, m.p95, m.p99, m.max, m.mean];
    }),
  );

  const summary = [];
  for (const t of TARGETS) {
    const m = medians[t.name];
    summary.push({ metric: `push → 'change' listener p50 (${t.label}, ${RATE}/s)`, value: m.pushToListener.p50, unit: 'ms' });
    summary.push({ metric: `push → 'change' listener p90 (${t.label}, ${RATE}/s)`, value: m.pushToListener.p90, unit: 'ms' });
    summary.push({ metric: `push → 'change' listener p99 (${t.label}, ${RATE}/s)`, value: m.pushToListener.p99, unit: 'ms' });
    summary.push({ metric: `push → 'change' listener max (${t.label}, ${RATE}/s)`, value: m.pushToListener.max, unit: 'ms' });
    summary.push({ metric: `engine getStatus().latency p50 / p99 (${t.label})`, value: `${fmt(m.engineStatusLatency.p50)} / ${fmt(m.engineStatusLatency.p99)}`, unit: 'ms' });
  }

  summary.push({ metric: `reference: worker_threads round trip p50 / p99 (${RATE}/s)`, value: `${fmt(workerMedian.p50)} / ${fmt(workerMedian.p99)}`, unit: 'ms' });

  printProblems(problems);

  const file = writeResult('latency', {
    name: 'latency',
    command,
    date: startedAt.toISOString(),
    durationSec: secondsSince(startedAt),
    machine,
    config: { rate: RATE, count: COUNT, warmup: WARMUP, rounds: ROUNDS, batchSize: 1000, pacing: 'absolute schedule, setTimeout' },
    ok: problems.length === 0,
    problems,
    median: medians,
    workerRoundTrip: { median: workerMedian, rounds: workerRounds },
    rounds,
    summary,
  });
  console.log(`\nwrote ${file}`);
  if (problems.length) process.exitCode = 1;
}

runMain(main);
