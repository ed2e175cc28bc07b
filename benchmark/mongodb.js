'use strict';
// MongoDB: ultimate-streaming against the Node `mongodb` driver's own change streams, same run.
//
// READ THIS FIRST: the server is mongo-java-server (scripts/mongo.sh, via __test__/mongo.js), an
// in-memory Java FAKE of MongoDB 5.0 with change streams, not a real mongod. Its change-stream
// reads (getMore) never wait for data: an empty batch comes back at once, so the Node driver's
// watch() loop BUSY-LOOPS (back-to-back getMores: CPU in this process and in the server) and
// ours sleeps 0.2..2 ms between empty answers. And every getMore scans and sorts the whole oplog,
// which the fake never truncates. So these numbers describe the two clients against this fake on
// this machine, not what either does against a real replica set; the ratios are the part to read.
// See scripts/mongo-server/PROBE.md. (With MONGODB_URI set, startMongo() hands out that server
// instead: then every run uses the same server, a fresh database per run, and the oplog is shared.)
//
// Every run (each mode of each section of each round) starts a NEW server (startMongo, a free
// port on 127.0.0.1, about 0.5 s, a cold JVM each time) and stops it at the end, so every mode
// reads an oplog of the same size; every server is stopped on exit, also on failure and on SIGINT/SIGTERM. Peers:
//   usp             ultimate-streaming, change streams (`database: 'mongodb'`, default options)
//   watch()         the Node driver v6: client.db(db).collection('usp_kv').watch() with a 'change'
//                   listener on the ChangeStream (it reads fullDocument._id/.version/.data.i)
//   usp poll 2000   ultimate-streaming with `useChangeStreams: false, pollingInterval: 2000`
// Documents are written by the Node driver straight into the key-value collection, as
// `{ _id: key, data, version: 1, updatedAt: new Date() }` with distinct keys: our streamer
// delivers them as anyone else's changes. Before measuring, each change-stream listener must see
// one sentinel document (`ready:<n>`, not measured, not counted), so no write races the opening
// of the stream. Sections, each measured in every round; within a section the modes alternate
// their order round by round; medians over the rounds are reported, ratios are computed from the
// medians of this run:
// 1. Latency: one MongoClient in this process inserts LATENCY_WRITES documents one at a time
//    (insertOne, `{ _id: 'lat:<i>', data: { i }, version: 1, updatedAt }`); after each insert it
//    waits for the listener to see that document before the next one. Latency = listener time -
//    time the insert was sent (same process, process.hrtime). 20 warm-up inserts are not measured.
//    The polling mode waits a random 0..2000 ms before each insert, so inserts land at a random
//    phase of the poll timer (else every insert would follow a poll and wait a whole interval):
//    each costs one interval on average, so it writes only POLL2000_WRITES (6) per round (its p99
//    is the max of 6). Also shown: the insert's own round trip, and the CPU time of this process
//    and of the server during the run, in cores (the busy loop of watch() shows there).
//    Ratios: mode / watch() of p50 and p99 (below 1: faster than watch()).
// 2. Events/s delivered to JS: a CHILD PROCESS (its own MongoClient, so its CPU and its event loop
//    are not this process's) inserts EVENTS_DOCS documents `{ _id: 'ev:<i>', data: { i, p: <36
//    chars> }, version: 1, updatedAt }` (about 100 B) with insertMany in ordered batches of
//    INSERT_BATCH, one batch at a time, while the listener runs. The child connects first, says
//    READY and starts on our "go"; the clocks start there. events/s = documents / (last document
//    seen - writes started) (wall clock of both processes); the writers' own docs/s is reported
//    next to it (events/s cannot exceed it), and so is the CPU time of this process (all threads:
//    JS, the engine's native threads, the driver) and of the server per 1,000 events, from "go"
//    to the last event. Modes: usp vs watch() with `{ batchSize: 1000 }` (the engine asks for
//    1,000 per getMore too), each on its own fresh server.
// Every document is checked off by key (and version, and data.i): missing, duplicated or unknown
// documents, listener errors, failed inserts, a capture mode other than the one asked for and runs
// cut short by a time bound are listed as PROBLEMS and the exit code is 1. The polling streamer
// prints one WARN line on stderr (change streams not used, as asked). Traffic goes only to
// 127.0.0.1. Every loop is bounded in count and time; after round 1 a run that would pass
// --budget seconds (judged by the longest earlier run of that mode) is skipped and listed.
//
//   node benchmark/mongodb.js [--rounds=3] [--latency-writes=500] [--poll2000-writes=6]
//     [--events-docs=20000] [--insert-batch=1000] [--timeout=60] [--budget=150]

const fs = require('node:fs');
const path = require('node:path');
const { spawn } = require('node:child_process');
const {
  ROOT,
  nowMs,
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
  sequentialWriter,
  samples,
  openStreamer,
  keyTracker,
  deliveryProblems,
  latencyRunProblems,
  latencyMedians,
  cpuSpan,
} = require('./common');
const { track, stopAllOnExit, processCpuMs } = require('./processes');

const ROUNDS = Math.floor(numberArg('rounds', 3));
const LATENCY_WRITES = Math.floor(numberArg('latency-writes', 500));
const POLL2000_WRITES = Math.floor(numberArg('poll2000-writes', 6));
const EVENTS_DOCS = Math.floor(numberArg('events-docs', 20_000));
const INSERT_BATCH = Math.floor(numberArg('insert-batch', 1000));
const TIMEOUT_MS = numberArg('timeout', 60) * 1000; // bound of one run's writes, and of its wait for events
const BUDGET_MS = numberArg('budget', 150) * 1000;

const DATABASE = 'usp_bench';
const COLLECTION = 'usp_kv';
const VALUE_PAD = 'abcdefghijklmnopqrstuvwxyz0123456789';
const READY_PREFIX = 'ready:';

const LATENCY_MODES = [
  { name: 'usp', label: 'ultimate-streaming (change streams)', kind: 'usp', writes: LATENCY_WRITES, warmup: 20, thinkMs: 0, cycleMs: 15 },
  { name: 'watch', label: 'mongodb driver collection.watch()', kind: 'watch', writes: LATENCY_WRITES, warmup: 20, thinkMs: 0, cycleMs: 15 },
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
  { name: 'usp', label: 'ultimate-streaming (change streams)', kind: 'usp' },
  { name: 'watch', label: 'mongodb driver watch({ batchSize: 1000 })', kind: 'watch', watchOptions: { batchSize: 1000 } },
];

function mongodb() {
  return require('mongodb');
}

function clientOptions() {
  return { serverSelectionTimeoutMS: 10_000, connectTimeoutMS: 10_000 };
}

/** Waits for `promise` at most `ms` (its timer cleared, so it never keeps the process alive). */
async function within(promise, ms) {
  let timer;
  try {
    return await Promise.race([promise, new Promise((resolve) => (timer = setTimeout(resolve, ms)))]);
  } finally {
    clearTimeout(timer);
  }
}

// ---------------------------------------------------------------------------------------------
// Servers (one per run) and child processes (registered in processes.js): all stopped on exit,
// failure and signals

const { startMongo } = require(path.join(ROOT, '__test__', 'mongo'));
const SERVERS = new Set(); // running servers: { srv, pid }

/** Linux: { pid: comm } of this process's direct children (empty elsewhere). */
function childProcesses() {
  const out = new Map();
  let entries;
  try {
    entries = fs.readdirSync('/proc');
  } catch {
    return out;
  }
  for (const e of entries) {
    if (!/^\d+$/.test(e)) continue;
    try {
      const stat = fs.readFileSync(`/proc/${e}/stat`, 'utf8');
      const close = stat.lastIndexOf(')');
      const rest = stat.slice(close + 2).split(' ');
      if (Number(rest[1]) === process.pid) out.set(Number(e), stat.slice(stat.indexOf('(') + 1, close));
    } catch {
      // gone meanwhile
    }
  }
  return out;
}

let serverNo = 0;
/** A new mongo-java-server with an oplog; `pid` is its Java process (Linux), for its CPU time. */
async function freshServer() {
  const before = childProcesses();
  const srv = await startMongo({ oplog: true });
  const entry = { srv, pid: null, external: !!srv.external };
  if (!srv.external) {
    for (const [pid, comm] of childProcesses()) if (!before.has(pid) && comm === 'java') entry.pid = pid;
  }
  SERVERS.add(entry);
  serverNo += 1;
  // A real server (MONGODB_URI) is shared by all runs: a fresh database each time.
  entry.db = srv.external ? `${DATABASE}_${process.pid}_${serverNo}` : DATABASE;
  return entry;
}

async function stopServer(entry) {
  if (!entry || !SERVERS.has(entry)) return;
  if (entry.external) {
    const c = new (mongodb().MongoClient)(entry.srv.uri, clientOptions());
    try {
      await c.db(entry.db).dropDatabase();
    } catch {
      // leave it
    } finally {
      await c.close().catch(() => {});
    }
  }
  try {
    await within(entry.srv.stop(), 8000);
  } finally {
    SERVERS.delete(entry);
    killPid(entry.pid); // no-op when it has exited
  }
}

function killPid(pid) {
  if (!pid) return;
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    // already gone
  }
}

/** Synchronous last resort (after the writer processes, see stopAllOnExit): the servers still
 *  running go down with us (they would also see the end of their stdin when this process dies). */
function killServers() {
  for (const entry of SERVERS) {
    try {
      entry.srv.stop().catch(() => {});
    } catch {
      // ignore
    }
    killPid(entry.pid);
  }
  SERVERS.clear();
}

// ---------------------------------------------------------------------------------------------
// Listeners: the same small interface for ours and for the driver's watch()

/** `onDoc(key, version, dataI)` per delivered change. Resolves once init() resolved. */
function openUsp(U, entry, options, onDoc) {
  const config = { database: 'mongodb', connection: { uri: entry.srv.uri, database: entry.db }, options: { ...options } };
  return openStreamer(U, config, (e) => {
    if (e.type === 'insert' || e.type === 'update' || e.type === 'replace') onDoc(e.key, e.version, e.data && e.data.i);
  });
}

/** The Node driver: a ChangeStream on the collection with a 'change' listener; resolves once the
 *  stream's aggregate answered (its cursor's 'init'). */
async function openWatch(entry, watchOptions, onDoc) {
  const errors = [];
  const client = new (mongodb().MongoClient)(entry.srv.uri, clientOptions());
  const t0 = nowMs();
  let cs = null;
  const close = async () => {
    if (cs) await within(cs.close().catch(() => {}), 5000);
    await within(client.close().catch(() => {}), 5000);
  };
  try {
    await client.connect();
    cs = client.db(entry.db).collection(COLLECTION).watch([], { ...(watchOptions || {}) });
    // The ChangeStream does not re-emit its cursor's 'init' (the aggregate's answer); without
    // it, the sentinel document (awaitSentinel) still proves the stream is open.
    const cursor = cs.cursor;
    const init = cursor && typeof cursor.once === 'function' ? new Promise((resolve) => cursor.once('init', () => resolve(true))) : Promise.resolve(true);
    cs.on('error', (e) => errors.push(e && e.message ? e.message : String(e)));
    cs.on('change', (ch) => {
      const d = ch.fullDocument;
      if (d && (ch.operationType === 'insert' || ch.operationType === 'update' || ch.operationType === 'replace')) {
        onDoc(d._id, d.version, d.data && d.data.i);
      }
    });
    let timer;
    const ok = await Promise.race([init, new Promise((resolve) => (timer = setTimeout(() => resolve(false), 15_000)))]);
    clearTimeout(timer);
    if (!ok) throw new Error(`watch(): the change stream did not open within 15 s (${errors.join('; ') || 'no error reported'})`);
  } catch (e) {
    await close();
    throw e;
  }
  return { errors, initMs: nowMs() - t0, mode: 'changeStream', status: () => null, close };
}

async function openListener(U, mode, entry, onDoc) {
  if (mode.kind === 'usp') return openUsp(U, entry, mode.options || {}, onDoc);
  return openWatch(entry, mode.watchOptions, onDoc);
}

/**
 * Tracks documents `${prefix}0 .. ${prefix}${n-1}` (keyTracker): each must arrive once, with
 * version 1 and data.i = i. Sentinels (`ready:`) are collected in `readySeen`. `onSeen(i, t)` on
 * the first arrival.
 */
function docTracker(prefix, n, onSeen = null) {
  return keyTracker(prefix, n, { checkData: true, sentinelPrefix: READY_PREFIX, onSeen });
}

const DOCUMENTS = { noun: 'documents', wrongVersion: 'a version other than 1' };

let readyNo = 0;
/** Inserts sentinel documents until the listener saw one (a change stream that opened late would
 *  miss the first); at most 5 tries of 3 s. */
async function awaitSentinel(coll, tr) {
  for (let attempt = 0; attempt < 5; attempt++) {
    readyNo += 1;
    const key = `${READY_PREFIX}${readyNo}`;
    await coll.insertOne({ _id: key, data: { i: -1 }, version: 1, updatedAt: new Date() });
    if (await waitFor(() => tr.readySeen.has(key), 3000, 1)) return;
  }
  throw new Error('the listener did not see a sentinel document within 15 s');
}

/** CPU of this process (process.cpuUsage delta) and of the server over a wall time. */
function cpuWithServer(usage, serverCpuMs, wallMsSpan) {
  return { ...cpuSpan(usage, wallMsSpan), serverMs: serverCpuMs, serverCores: serverCpuMs / wallMsSpan };
}

// ---------------------------------------------------------------------------------------------
// 1. Latency

async function latencyRun(U, mode) {
  const entry = await freshServer();
  const total = mode.warmup + mode.writes;
  const sent = new Float64Array(total).fill(NaN);
  const seenAt = new Float64Array(total).fill(NaN);
  const inserter = sequentialWriter();
  const tr = docTracker('lat:', total, (i, t) => {
    seenAt[i] = t;
    inserter.arrived(i);
  });

  let writer = null;
  let listener = null;
  let w = null; // the insert loop's outcome
  let status = null;
  let cpu = null;
  let serverVersion = null;
  const polling = !!(mode.options && mode.options.pollingInterval);
  const waitMs = polling ? mode.options.pollingInterval * 3 + 3000 : 5000;
  const boundMs = Math.min(TIMEOUT_MS, total * mode.cycleMs * 2 + 5000);
  try {
    writer = new (mongodb().MongoClient)(entry.srv.uri, clientOptions());
    await writer.connect();
    const coll = writer.db(entry.db).collection(COLLECTION);
    try {
      serverVersion = (await writer.db('admin').command({ buildInfo: 1 })).version;
    } catch {
      serverVersion = null;
    }
    listener = await openListener(U, mode, entry, (k, v, d) => tr.onChange(k, v, d));
    if (!polling) await awaitSentinel(coll, tr);
    const cpu0 = process.cpuUsage();
    const srv0 = processCpuMs(entry.pid);
    const t0 = nowMs();
    w = await inserter.run({
      total,
      boundMs,
      thinkMs: mode.thinkMs,
      waitMs,
      onSend: (i, ts) => (sent[i] = ts),
      write: (i) => coll.insertOne({ _id: `lat:${i}`, data: { i }, version: 1, updatedAt: new Date() }),
      seen: (i) => !Number.isNaN(seenAt[i]),
    });
    cpu = cpuWithServer(process.cpuUsage(cpu0), processCpuMs(entry.pid) - srv0, nowMs() - t0);
    // Documents that timed out may still come; then look for strays.
    await waitFor(() => tr.distinct >= w.issued - w.writeErrors, w.timeouts ? waitMs : 0, 5);
    await sleep(polling ? Math.min(mode.options.pollingInterval + 200, 2500) : 50);
    status = listener.status();
  } finally {
    if (listener) await listener.close().catch(() => {});
    if (writer) await writer.close().catch(() => {});
    await stopServer(entry);
  }

  const { issued, timeouts, writeErrors, firstWriteError, ack } = w;
  const lat = samples(mode.warmup, issued, (i) => seenAt[i] - sent[i]);
  const acks = samples(mode.warmup, issued, (i) => ack[i]);
  return {
    mode: mode.name,
    serverVersion,
    listenerMode: listener ? listener.mode : null,
    listenerInitMs: listener ? listener.initMs : NaN,
    planned: total,
    issued,
    measured: lat.length,
    received: tr.distinct,
    duplicates: tr.duplicates,
    unexpected: tr.unexpected,
    wrongVersion: tr.wrongVersion,
    wrongData: tr.wrongData,
    timeouts,
    writeErrors,
    firstWriteError,
    listenerErrors: listener ? listener.errors.slice(0, 5) : [],
    writeToListener: summarize(lat),
    writeAck: summarize(acks),
    cpu,
    engineLatency: status ? status.latency : null,
  };
}

// ---------------------------------------------------------------------------------------------
// 2. Events/s with a writer process

/**
 * Inserts documents `${prefix}0..n-1` from a child process (its own MongoClient), insertMany in
 * ordered batches of `batch`, one at a time. The child connects, prints READY and waits; then
 * `onReady()` runs here and the child is told to go. Resolves { startAt, endAt, done, errors,
 * firstError } (wall clock ms).
 */
function writeInChild(uri, db, prefix, n, batch, onReady) {
  const script = `
    const { MongoClient } = require(${JSON.stringify(require.resolve('mongodb'))});
    const [uri, db, coll, prefix, n, batch, maxMs, pad] = process.argv.slice(1);
    const N = Number(n), B = Number(batch);
    const wall = () => performance.timeOrigin + performance.now();
    process.stdin.on('end', () => process.exit(2)); // the parent is gone
    (async () => {
      const client = new MongoClient(uri, { serverSelectionTimeoutMS: 10000, connectTimeoutMS: 10000 });
      await client.connect();
      const c = client.db(db).collection(coll);
      await c.findOne({ _id: '-' });
      process.stdout.write('READY\\n');
      await new Promise((resolve) => process.stdin.once('data', resolve));
      let done = 0, errors = 0, firstError = null;
      const deadline = performance.now() + Number(maxMs);
      const startAt = wall();
      for (let from = 0; from < N && performance.now() < deadline; from += B) {
        const docs = [];
        for (let i = from; i < Math.min(N, from + B); i++) docs.push({ _id: prefix + i, data: { i, p: pad }, version: 1, updatedAt: new Date() });
        try { done += (await c.insertMany(docs, { ordered: true })).insertedCount; }
        catch (e) {
          errors++;
          if (!firstError) firstError = e.message;
          if (e.result && typeof e.result.insertedCount === 'number') done += e.result.insertedCount;
          if (errors > 5) break;
        }
      }
      const endAt = wall();
      await client.close();
      process.stdout.write('RESULT ' + JSON.stringify({ startAt, endAt, done, errors, firstError }) + '\\n');
      process.exit(0);
    })().catch((e) => { console.error(e); process.exit(1); });`;
  const args = [uri, db, COLLECTION, prefix, String(n), String(batch), String(TIMEOUT_MS), VALUE_PAD];
  return new Promise((resolve, reject) => {
    const child = track(spawn(process.execPath, ['-e', script, ...args], { stdio: ['pipe', 'pipe', 'inherit'] }));
    let buf = '';
    let result = null;
    child.stdin.on('error', () => {});
    child.stdout.setEncoding('utf8');
    child.stdout.on('data', (d) => {
      buf += d;
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl).trim();
        buf = buf.slice(nl + 1);
        if (line === 'READY') {
          onReady();
          child.stdin.write('go\n');
        } else if (line.startsWith('RESULT ')) {
          try {
            result = JSON.parse(line.slice(7));
          } catch (e) {
            reject(e);
          }
        }
      }
    });
    const timer = setTimeout(() => child.kill('SIGKILL'), TIMEOUT_MS + 30_000);
    child.on('error', reject);
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      if (code !== 0 || !result) return reject(new Error(`writer process exited with ${code ?? signal}`));
      resolve(result);
    });
  });
}

async function eventsRun(U, mode) {
  const entry = await freshServer();
  const tr = docTracker('ev:', EVENTS_DOCS);
  let writer = null;
  let listener = null;
  let w = null;
  let completed = false;
  let status = null;
  let cpu = null;
  try {
    writer = new (mongodb().MongoClient)(entry.srv.uri, clientOptions());
    await writer.connect();
    listener = await openListener(U, mode, entry, (k, v, d) => tr.onChange(k, v, d));
    await awaitSentinel(writer.db(entry.db).collection(COLLECTION), tr);
    let cpu0 = null;
    let srv0 = NaN;
    let t0 = NaN;
    w = await writeInChild(entry.srv.uri, entry.db, 'ev:', EVENTS_DOCS, INSERT_BATCH, () => {
      cpu0 = process.cpuUsage();
      srv0 = processCpuMs(entry.pid);
      t0 = nowMs();
    });
    completed = await tr.reached(w.done, TIMEOUT_MS);
    cpu = cpuWithServer(process.cpuUsage(cpu0), processCpuMs(entry.pid) - srv0, nowMs() - t0);
    await sleep(100); // strays and duplicates after the last document
    status = listener.status();
  } finally {
    if (listener) await listener.close().catch(() => {});
    if (writer) await writer.close().catch(() => {});
    await stopServer(entry);
  }
  const ok = completed && w.done === EVENTS_DOCS;
  const lastMs = ok ? tr.tLastWall - w.startAt : NaN;
  return {
    mode: mode.name,
    listenerMode: listener ? listener.mode : null,
    docs: EVENTS_DOCS,
    written: w ? w.done : 0,
    writeErrors: w ? w.errors : 0,
    firstWriteError: w ? w.firstError : null,
    completed: ok,
    received: tr.distinct,
    duplicates: tr.duplicates,
    unexpected: tr.unexpected,
    wrongVersion: tr.wrongVersion,
    wrongData: tr.wrongData,
    listenerErrors: listener ? listener.errors.slice(0, 5) : [],
    writeMs: w ? w.endAt - w.startAt : NaN,
    writerDocsPerSec: w ? (w.done / (w.endAt - w.startAt)) * 1000 : NaN,
    firstDocMs: tr.tFirstWall - (w ? w.startAt : NaN),
    lastDocMs: lastMs,
    lagAfterWritersMs: ok ? tr.tLastWall - w.endAt : NaN,
    eventsPerSec: (EVENTS_DOCS / lastMs) * 1000,
    listenerCpu: cpu,
    cpuMsPer1kEvents: cpu ? cpu.totalMs / (EVENTS_DOCS / 1000) : NaN,
    serverCpuMsPer1kEvents: cpu ? cpu.serverMs / (EVENTS_DOCS / 1000) : NaN,
    engineEvents: status ? status.events : null,
  };
}

// ---------------------------------------------------------------------------------------------

async function main() {
  stopAllOnExit(killServers);
  const U = await loadStreamer();
  const command = commandFor(__filename, process.argv.slice(2));
  const startedAt = new Date();
  const machine = machineFacts(); // taken before the load of this script
  const external = !!process.env.MONGODB_URI;
  const serverLabel = external ? 'MongoDB (MONGODB_URI)' : 'MongoDB (mongo-java-server fake)';
  console.log(
    `mongodb: ${ROUNDS} rounds; latency ${LATENCY_WRITES} inserts (polling 2,000 ms: ${POLL2000_WRITES}); ` +
      `events/s ${EVENTS_DOCS} documents in insertMany batches of ${INSERT_BATCH} by another process`,
  );
  console.log(
    external
      ? 'server: MONGODB_URI (one server for all runs, a fresh database per run)'
      : 'server: mongo-java-server, an in-memory Java FAKE of MongoDB, a new one per run: its getMore never waits (the driver\'s watch() busy-loops) ' +
          'and scans the whole oplog; these are not numbers of a real mongod',
  );

  const rounds = { latency: [], events: [] };
  const problems = [];
  const skipped = [];
  let serverVersion = null;
  // Runs fn unless the mode is broken or (after round 1) the budget would be passed.
  const { timed, broken } = budgetedRuns({ budgetMs: BUDGET_MS, pad: 22, problems, skipped });

  try {
    for (let r = 1; r <= ROUNDS; r++) {
      // 1. latency
      for (const mode of roundOrder(LATENCY_MODES, r)) {
        const res = await timed(`latency/${mode.name}`, r, () => latencyRun(U, mode));
        if (!res) continue;
        res.round = r;
        rounds.latency.push(res);
        if (!serverVersion && res.serverVersion) serverVersion = res.serverVersion;
        const p = res.writeToListener;
        console.log(
          `  round ${r} latency/${mode.name.padEnd(14)} insert->listener p50 ${fmt(p.p50)} p99 ${fmt(p.p99)} max ${fmt(p.max)} ms` +
            `  (insert ack p50 ${fmt(res.writeAck.p50)} ms; seen ${res.received}/${res.issued}, ${res.measured} measured;` +
            ` CPU ${fmt(res.cpu ? res.cpu.cores : NaN)} cores here, ${fmt(res.cpu ? res.cpu.serverCores : NaN)} in the server; mode ${res.listenerMode})`,
        );
        problems.push(...latencyRunProblems(`round ${r} latency/${mode.name}`, res, mode, { writes: 'inserts', capture: 'changeStream', what: DOCUMENTS }));
        if (res.received < res.issued - res.writeErrors) broken.add(`latency/${mode.name}`);
      }

      // 2. events/s
      for (const mode of roundOrder(PAIR_MODES, r)) {
        const res = await timed(`events/${mode.name}`, r, () => eventsRun(U, mode));
        if (!res) continue;
        res.round = r;
        rounds.events.push(res);
        console.log(
          `  round ${r} events/${mode.name.padEnd(15)} ${res.completed ? `${fmt(res.eventsPerSec, 0)} events/s` : 'INCOMPLETE'}` +
            `  (writer ${fmt(res.writerDocsPerSec, 0)} docs/s over ${fmt(res.writeMs, 0)} ms; last event ${fmt(res.lagAfterWritersMs)} ms after the writer finished;` +
            ` CPU per 1,000 events: ${fmt(res.cpuMsPer1kEvents)} ms here, ${fmt(res.serverCpuMsPer1kEvents)} ms in the server)`,
        );
        const tag = `round ${r} events/${mode.name}`;
        problems.push(...deliveryProblems(tag, { ...res, distinct: res.received }, res.docs, DOCUMENTS));
        if (res.writeErrors) problems.push(`${tag}: ${res.writeErrors} insertMany calls failed (${res.firstWriteError})`);
        if (res.listenerErrors.length) problems.push(`${tag}: listener errors: ${res.listenerErrors.join('; ')}`);
        if (res.listenerMode !== 'changeStream') problems.push(`${tag}: capture mode ${res.listenerMode}, expected changeStream`);
        if (!res.completed) broken.add(`events/${mode.name}`);
      }
    }
  } finally {
    for (const entry of [...SERVERS]) await stopServer(entry).catch(() => {});
  }

  // ---- medians
  const med = (rs, f) => median(rs.map(f));
  const latency = {};
  for (const m of LATENCY_MODES) {
    const rs = rounds.latency.filter((x) => x.mode === m.name);
    latency[m.name] = {
      ...latencyMedians(rs, m.writes),
      cpuCores: med(rs, (x) => (x.cpu ? x.cpu.cores : NaN)),
      serverCpuCores: med(rs, (x) => (x.cpu ? x.cpu.serverCores : NaN)),
    };
  }
  const events = {};
  for (const m of PAIR_MODES) {
    const rs = rounds.events.filter((x) => x.mode === m.name);
    const all = rs.length > 0 && rs.every((x) => x.completed);
    events[m.name] = {
      rounds: rs.length,
      completedRounds: rs.filter((x) => x.completed).length,
      eventsPerSec: all ? med(rs, (x) => x.eventsPerSec) : NaN,
      writerDocsPerSec: med(rs, (x) => x.writerDocsPerSec),
      lagAfterWritersMs: all ? med(rs, (x) => x.lagAfterWritersMs) : NaN,
      firstDocMs: med(rs, (x) => x.firstDocMs),
      cpuMsPer1kEvents: med(rs, (x) => x.cpuMsPer1kEvents),
      cpuCores: med(rs, (x) => (x.listenerCpu ? x.listenerCpu.cores : NaN)),
      serverCpuMsPer1kEvents: med(rs, (x) => x.serverCpuMsPer1kEvents),
    };
  }
  const ratios = {
    latencyP50UspOverWatch: latency.usp.p50 / latency.watch.p50,
    latencyP99UspOverWatch: latency.usp.p99 / latency.watch.p99,
    latencyP50Poll2000OverWatch: latency['usp-poll-2000'].p50 / latency.watch.p50,
    latencyP99Poll2000OverWatch: latency['usp-poll-2000'].p99 / latency.watch.p99,
    eventsUspOverWatch: events.usp.eventsPerSec / events.watch.eventsPerSec,
    cpuPer1kUspOverWatch: events.usp.cpuMsPer1kEvents / events.watch.cpuMsPer1kEvents,
  };

  if (skipped.length) console.log(`\nnote: ${skipped.length} run(s) skipped for time (${skipped.join(', ')}); medians use the rounds that ran`);
  printTable(
    `1. latency, external insert sent -> JS listener, ms (median of rounds; sequential insertOne by one MongoClient; a new mongo-java-server per run)`,
    ['mode', 'rounds', 'inserts/round', 'p50', 'p90', 'p99', 'max', 'insert ack p50', 'CPU cores here', 'server CPU cores', 'p50 vs watch()', 'p99 vs watch()'],
    LATENCY_MODES.map((m) => {
      const x = latency[m.name];
      return [
        m.label,
        String(x.rounds),
        fmt(x.writesPerRound, 0),
        x.p50,
        x.p90,
        x.p99,
        x.max,
        x.ackP50,
        x.cpuCores,
        x.serverCpuCores,
        ratioCell(x.p50 / latency.watch.p50),
        ratioCell(x.p99 / latency.watch.p99),
      ];
    }),
  );
  console.log(
    `(ratios: mode / watch(), below 1 = lower latency than watch(); the polling mode waits a random 0..2,000 ms before each insert,` +
      ` its p99 is the max of ${POLL2000_WRITES}; CPU = user+system time of this process / of the server's JVM, in cores, over the measured inserts:` +
      ` watch() busy-loops on this server because its getMore never waits)`,
  );
  printTable(
    `2. events/s to JS, ${EVENTS_DOCS} documents inserted by another process (insertMany, batches of ${INSERT_BATCH}) while listening (median of rounds; a new server per run)`,
    ['listener', 'rounds', 'events/s', "writer's docs/s", 'last event after writer, ms', 'CPU ms / 1k events', 'CPU cores', 'server CPU ms / 1k', 'vs watch()'],
    PAIR_MODES.map((m) => {
      const x = events[m.name];
      return [
        m.label,
        `${x.completedRounds}/${x.rounds}`,
        fmt(x.eventsPerSec, 0),
        fmt(x.writerDocsPerSec, 0),
        x.lagAfterWritersMs,
        x.cpuMsPer1kEvents,
        x.cpuCores,
        x.serverCpuMsPer1kEvents,
        ratioCell(x.eventsPerSec / events.watch.eventsPerSec),
      ];
    }),
  );
  console.log(
    "(events/s cannot exceed the writer's rate: when the last event arrives ~0 ms after the writer finished, capture kept up and the" +
      " writer was the limit; CPU = user+system time of this process (all threads) / of the server's JVM, from the writer's start to the last event)",
  );

  const summary = [];
  for (const m of LATENCY_MODES) {
    summary.push({ metric: `${serverLabel} insert → listener p50, ${m.label} (${m.writes} inserts/round)`, value: latency[m.name].p50, unit: 'ms' });
    summary.push({ metric: `${serverLabel} insert → listener p99, ${m.label} (${m.writes} inserts/round)`, value: latency[m.name].p99, unit: 'ms' });
  }
  summary.push({ metric: `${serverLabel} latency ratio ultimate-streaming / watch(), p50`, value: ratios.latencyP50UspOverWatch, unit: 'x' });
  summary.push({ metric: `${serverLabel} latency ratio ultimate-streaming / watch(), p99`, value: ratios.latencyP99UspOverWatch, unit: 'x' });
  summary.push({ metric: `${serverLabel} latency ratio polling 2,000 ms / watch(), p50`, value: ratios.latencyP50Poll2000OverWatch, unit: 'x' });
  summary.push({ metric: `${serverLabel} latency ratio polling 2,000 ms / watch(), p99`, value: ratios.latencyP99Poll2000OverWatch, unit: 'x' });
  for (const m of PAIR_MODES) {
    summary.push({ metric: `${serverLabel} events/s, ${m.label} (${EVENTS_DOCS} docs, insertMany ${INSERT_BATCH})`, value: events[m.name].eventsPerSec, unit: 'events/s' });
    summary.push({ metric: `${serverLabel} events: writer's own docs/s during the ${m.name} run`, value: events[m.name].writerDocsPerSec, unit: 'docs/s' });
    summary.push({ metric: `${serverLabel} events: listener process CPU per 1,000 events, ${m.label}`, value: events[m.name].cpuMsPer1kEvents, unit: 'ms' });
  }
  summary.push({ metric: `${serverLabel} events/s ratio ultimate-streaming / watch()`, value: ratios.eventsUspOverWatch, unit: 'x' });

  printProblems(problems);

  const file = writeResult('mongodb', {
    name: 'mongodb',
    command,
    date: startedAt.toISOString(),
    durationSec: secondsSince(startedAt),
    machine,
    server: {
      kind: external ? 'MONGODB_URI' : 'mongo-java-server (in-memory fake; getMore never waits, scans the whole oplog)',
      version: serverVersion,
      freshServerPerRun: !external,
    },
    config: {
      rounds: ROUNDS,
      latencyModes: LATENCY_MODES,
      pairModes: PAIR_MODES,
      eventsDocs: EVENTS_DOCS,
      insertBatch: INSERT_BATCH,
      timeoutSec: TIMEOUT_MS / 1000,
      budgetSec: BUDGET_MS / 1000,
      mongodbDriverVersion: driverVersion(),
    },
    ok: problems.length === 0,
    problems,
    skippedForTime: skipped,
    median: { latency, events },
    ratios,
    rounds,
    summary,
  });
  console.log(`\nwrote ${file}`);
  if (problems.length) process.exitCode = 1;
}

function driverVersion() {
  try {
    return JSON.parse(fs.readFileSync(path.join(ROOT, 'node_modules', 'mongodb', 'package.json'), 'utf8')).version;
  } catch {
    return null;
  }
}

runMain(main);
