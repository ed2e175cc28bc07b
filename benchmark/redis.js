'use strict';
// Scale-out through Redis (`options.redis`): several streamer instances, each in its own process,
// serve one stream of changes of one MariaDB table. One instance (the first to init(), the
// "leader") captures the binlog and appends the changes to a Redis Stream; every instance, the
// leader too, reads that stream and delivers to its own listeners and WebSocket hub.
//
// The script starts a private MariaDB (scripts/mariadb.sh: a temp data dir, a free port on
// 127.0.0.1, binlog on) and a private Redis (scripts/redis.sh: a temp dir, a free port on
// 127.0.0.1, appendonly yes with appendfsync always, i.e. an fsync per write; --appendfsync=everysec
// for Redis's default policy, an fsync per second) and stops both at the end, also on failure and
// on SIGINT/SIGTERM (benchmark/processes.js). Every instance is a child process (this file run
// with --instance, forked; nothing else runs in it), driven over IPC. Every run uses a fresh table
// and a fresh Redis keyPrefix, so every run is a stream of its own. Instances of one run get the
// same options (table, redis) and distinct mysql.serverId values; the leader is started first and
// its role checked (getStatus().bus.role 'leader', the others 'follower').
//
// 1. Latency, external write sent -> 'change' listener. Modes (same run, order alternating by
//    round):
//      redis   instance A (leader, captures) and instance B (follower), both with options.redis;
//      plain   one instance without options.redis (binlog capture, delivered in process): the
//              baseline.
//    One mysql2 connection in this (the driver) process upserts rows one at a time (distinct keys
//    `lat:<i>`, prepared `INSERT ... (k, v, version, deleted) VALUES (?, ?, 1, 0) ON DUPLICATE KEY
//    UPDATE v = VALUES(v), version = version + 1, deleted = 0`), and waits until every instance
//    of the mode reported that row before writing the next. Each instance's 'change' listener
//    takes the time on arrival and then reports it over IPC (the IPC hop is not in the number).
//    Latency = listener time in the instance - time the write was sent in the driver, both read
//    with process.hrtime.bigint() in their own process: its absolute value is the system-wide
//    monotonic clock (CLOCK_MONOTONIC on Linux), the same clock in every process of the machine,
//    so the two need no offset correction (the wall clock `performance.timeOrigin +
//    performance.now()` is not used here: each process fixes its own origin, and two processes
//    were seen to disagree by tens of microseconds). The event's own `latency` field (engine:
//    commit time, i.e. the row's updated_at in ms, -> hand-off to JS) is recorded too, in the JSON.
//    LATENCY_WRITES writes per round after 20 unmeasured warm-up writes. Reported: p50/p90/p99/max
//    per instance (median over rounds), the per-write difference follower - leader, the write's
//    own round trip. Note: the leader also delivers from the Redis stream (it does not short-cut
//    its own captures), so leader - plain is the cost of the Redis hop (an XADD, fsynced, and the
//    XREAD that wakes on it; the baseline also has one process fewer on the cores), and follower -
//    leader is what reading the stream in a process that does not capture adds.
// 2. Fan-out, deliveries/s to WebSocket clients. Every instance calls
//    `listen({ port: 0, host: '127.0.0.1', slowConsumer: { policy: 'disconnect', maxQueueBytes:
//    64 MiB } })`. The clients come from the Rust load generator of benchmark/fanout.js
//    (benchmark/loadgen, built on first use, driven through benchmark/loadgen.js), always
//    INSTANCES processes of CLIENTS clients each (each subscribed to `kv:*`), with
//    --loadgen-threads threads each, so the client side is the same in every mode; only where
//    they connect differs:
//      1x plain   one instance without options.redis, all INSTANCES x CLIENTS clients on it;
//      1x redis   one instance with options.redis (leader, reads its own stream), all clients;
//      Nx redis   INSTANCES instances with options.redis (one leader, the others followers),
//                 CLIENTS clients on each.
//    When every client is subscribed (and every hub counts its clients), the leader (the only
//    instance in the 1x modes) runs `await streamer.push(key, value)` for EVENTS events of about
//    EVENT_BYTES bytes of JSON each (distinct keys `fan:<i>`), CHUNK calls at a time
//    (Promise.all per chunk); they are committed to MariaDB, captured from the binlog and (redis
//    modes) passed through the Redis stream to every instance's hub. Each load generator counts
//    the events in the frames per client and stops when every client has all EVENTS (or after
//    --timeout). Measured per run: deliveries/s = all deliveries / (last delivery - first
//    delivery) over all load generators (their wall clocks); start -> last = deliveries / (last
//    delivery - push start); instances' CPU = user + system time (all threads, process.cpuUsage()
//    in each instance) summed over the instances from just before the pushes until every load
//    generator finished, per delivery; the same window's CPU of redis-server and mariadbd (from
//    /proc/<pid>/stat) and of the load generators. THE MACHINE HAS FEW CORES (2 where the numbers
//    in the README were taken): the instances, the load generators, MariaDB, Redis and this
//    driver all share them, so N instances cannot use N times the CPU; the Nx mode measures what
//    spreading clients over processes gives on the same cores, not what it gives on N machines.
//    Complete = every client got every event exactly once by count; missing or extra deliveries,
//    gap frames, closed clients, failed pushes, hub drops/slow disconnects are PROBLEMS.
// 3. Cache: get() with a working set larger than the in-process cache (L1). Modes (same run):
//      l2      options.redis.cache true (default): L1, then the cache shared in Redis (L2), then
//              MariaDB;
//      no-l2   options.redis.cache false: L1, then MariaDB.
//    Three instances, all with options.redis: A (leader, default cacheMaxBytes) upserts
//    CACHE_KEYS keys `c:<i>` with values of about VALUE_BYTES bytes of JSON by push(), 64 in
//    flight; B and C (followers, cacheMaxBytes = L1_BYTES, so L1 holds a fraction of the working
//    set) wait until they have delivered every one of those changes (deliveries do not pull keys
//    into L1, they only keep cached keys current, and a change leaves only a version marker in
//    L2, so L1 and L2 start empty of values), then, in their own processes, get() keys drawn
//    uniformly at random from the working set (one seeded sequence, the same in both modes):
//      B sequential    GETS gets one at a time;
//      B concurrent    the next GETS keys of the sequence, GET_CONCURRENCY in flight;
//      C other instance  the first OTHER_GETS keys B read, one at a time, in C (whose L1 is
//                      empty): what a second instance gets from the values B's misses left in L2.
//    Per get: the time from the call to its resolution (process.hrtime in the reading process);
//    the value is checked (data.i). Reported per phase: get p50/p90/p99, gets/s, the L1 hit ratio
//    and the L2 hits/misses/hit ratio (over the gets that missed L1) from the differences of
//    getStatus().cache and getStatus().cache.l2 over the phase.
// Every section runs in every round (3 by default); medians over the rounds are reported and the
// ratios are computed from the medians of this run. Missing, duplicated or unknown rows, resyncs,
// listener/instance errors, failed writes or gets, wrong roles and runs cut short by a time bound
// are PROBLEMS (exit code 1); a mode that failed is not run again. Traffic goes only to 127.0.0.1.
// Every loop is bounded in count and time; after round 1 a run that would pass --budget seconds
// (judged by the longest earlier run of that mode) is skipped and listed.
//
//   node benchmark/redis.js [--rounds=3] [--latency-writes=2000] [--instances=3] [--clients=1000]
//     [--events=1500] [--event-bytes=150] [--chunk=500] [--loadgen-threads=1] [--cache-keys=20000]
//     [--value-bytes=1000] [--l1-bytes=2097152] [--gets=20000] [--get-concurrency=64]
//     [--other-gets=5000] [--timeout=60] [--budget=400] [--parts=latency,fanout,cache]
//     [--appendfsync=always|everysec]
// A quick check that everything works: node benchmark/redis.js --rounds=1 --latency-writes=200
//   --clients=100 --events=200 --cache-keys=2000 --gets=2000 --other-gets=1000 --l1-bytes=262144

const path = require('node:path');
const { fork, execFileSync } = require('node:child_process');
const {
  ROOT,
  nowMs,
  wallMs,
  sleep,
  withTimeout,
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
  stringArg,
  budgetedRuns,
  roundOrder,
  drive,
  errorLine,
  sequentialWriter,
  samples,
  deliveryProblems,
} = require('./common');
const { track, killChildren, stopServers, stopAllOnExit, startPrivateServer, processCpuMs } = require('./processes');
const { BUILD_COMMAND, ensureLoadgen, startLoadgen, loadgenProblems } = require('./loadgen.js');

const ROUNDS = Math.floor(numberArg('rounds', 3));
const APPENDFSYNC = stringArg('appendfsync', 'always');
const LATENCY_WRITES = Math.floor(numberArg('latency-writes', 2000));
const LATENCY_WARMUP = 20;
const INSTANCES = Math.floor(numberArg('instances', 3));
const CLIENTS = Math.floor(numberArg('clients', 1000)); // per load generator (= per instance in the Nx mode)
const EVENTS = Math.floor(numberArg('events', 1500));
const EVENT_BYTES = Math.floor(numberArg('event-bytes', 150));
const CHUNK = Math.floor(numberArg('chunk', 500));
const LOADGEN_THREADS = Math.floor(numberArg('loadgen-threads', 1));
const CACHE_KEYS = Math.floor(numberArg('cache-keys', 20_000));
const VALUE_BYTES = Math.floor(numberArg('value-bytes', 1000));
const L1_BYTES = Math.floor(numberArg('l1-bytes', 2 << 20));
const GETS = Math.floor(numberArg('gets', 20_000));
const GET_CONCURRENCY = Math.floor(numberArg('get-concurrency', 64));
const OTHER_GETS = Math.floor(numberArg('other-gets', 5000));
const FILL_CONCURRENCY = 64;
const TIMEOUT_MS = numberArg('timeout', 60) * 1000; // bound of every wait of one run
const BUDGET_MS = numberArg('budget', 400) * 1000;
const SLOW_QUEUE_BYTES = 64 << 20;

const HOST = '127.0.0.1';
const USER = 'usp';
const PASSWORD = 'usp-test-pw';
const DATABASE = 'usp_test';
const MARIADB_SH = path.join(ROOT, 'scripts', 'mariadb.sh');
const REDIS_SH = path.join(ROOT, 'scripts', 'redis.sh');
const VALUE_PAD = 'abcdefghijklmnopqrstuvwxyz0123456789';

const ALL_PARTS = ['latency', 'fanout', 'cache'];

const LATENCY_MODES = [
  { name: 'redis', label: 'options.redis: leader A + follower B', redis: true, instances: 2 },
  { name: 'plain', label: 'no options.redis: one instance (baseline)', redis: false, instances: 1 },
];
const FANOUT_MODES = [
  { name: '1x-plain', label: `1 instance x ${INSTANCES * CLIENTS} clients, no Redis`, redis: false, instances: 1 },
  { name: '1x-redis', label: `1 instance x ${INSTANCES * CLIENTS} clients, options.redis`, redis: true, instances: 1 },
  { name: `${INSTANCES}x-redis`, label: `${INSTANCES} instances x ${CLIENTS} clients, options.redis`, redis: true, instances: INSTANCES },
];
// The get() phases of the cache section, in this order: B's two use one seeded key sequence (the
// concurrent phase continues it); C, whose L1 is empty, then reads the first keys B read.
const CACHE_PHASES = [
  { name: 'sequential', instance: 'B', concurrency: 1, skip: 0, count: GETS },
  { name: 'concurrent', instance: 'B', concurrency: GET_CONCURRENCY, skip: GETS, count: GETS },
  { name: 'other instance', instance: 'C', concurrency: 1, skip: 0, count: Math.min(OTHER_GETS, GETS) },
];
const CACHE_MODES = [
  { name: 'l2', label: 'L1 + L2 (Redis) + MariaDB, redis.cache true', cache: true },
  { name: 'no-l2', label: 'L1 + MariaDB, redis.cache false', cache: false },
];

/** The system-wide monotonic clock in ms (fractional): comparable between processes. */
function monoMs() {
  return Number(process.hrtime.bigint()) / 1e6;
}

function upsertSql(table) {
  return `INSERT INTO \`${table}\` (k, v, version, deleted) VALUES (?, ?, 1, 0) ON DUPLICATE KEY UPDATE v = VALUES(v), version = version + 1, deleted = 0`;
}

/** A small seeded PRNG (mulberry32): the same key sequence for every mode of the cache section. */
function prng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** The `p` string that makes `JSON.stringify({ i, p })` about `bytes` long. */
function padTo(bytes) {
  return 'x'.repeat(Math.max(1, bytes - JSON.stringify({ i: 12345, p: '' }).length));
}

/** The `p` string that makes one fan-out event, as the engine encodes it, about `bytes` long. */
function fanoutPad(bytes) {
  const i = Math.floor(EVENTS / 2);
  const probe = { type: 'insert', key: `fan:${String(i).padStart(6, '0')}`, data: { i, p: '' }, version: 1, seq: i + 1, source: 'mysql', timestamp: Date.now() + 0.5, latency: 0.123 };
  return 'x'.repeat(Math.max(1, bytes - JSON.stringify(probe).length));
}

// ---------------------------------------------------------------------------------------------
// The instance process (this file run with --instance): one streamer, driven over IPC

function instanceMain() {
  let s = null;
  let track = null; // { prefix, n, report, seen: Uint8Array, distinct, duplicates, unexpected }
  const notices = { resyncs: [], errors: [] };
  const reply = (id, body) => process.send && process.send({ id, ...body });
  process.on('disconnect', () => process.exit(0)); // the driver is gone
  process.on('message', (m) => {
    handle(m).then(
      (body) => reply(m.id, body),
      (e) => reply(m.id, { error: e && e.stack ? e.stack : String(e) }),
    );
  });

  async function handle(m) {
    switch (m.cmd) {
      case 'start':
        return start(m);
      case 'status':
        return { status: s.getStatus() };
      case 'tracker':
        return {
          distinct: track ? track.distinct : 0,
          duplicates: track ? track.duplicates : 0,
          unexpected: track ? track.unexpected : 0,
          notices,
        };
      case 'mark':
        return { cpu: process.cpuUsage(), wall: wallMs() };
      case 'stats':
        return { cpu: process.cpuUsage(), wall: wallMs(), rssMiB: process.memoryUsage().rss / 2 ** 20, status: s.getStatus() };
      case 'pushBurst':
        return pushBurst(m);
      case 'fill':
        return fill(m);
      case 'gets':
        return gets(m);
      case 'close':
        if (s) await s.close();
        setImmediate(() => process.exit(0));
        return { closed: true };
      default:
        throw new Error(`unknown command ${m.cmd}`);
    }
  }

  async function start(m) {
    const U = await loadStreamer();
    s = new U(m.config);
    s.on('resync', (e) => notices.resyncs.length < 5 && notices.resyncs.push(`${e.reason} (${e.from}..${e.to})`));
    s.on('error', (e) => notices.errors.length < 5 && notices.errors.push(`${e && e.code} ${e && e.message}`));
    if (m.track) {
      track = { ...m.track, seen: new Uint8Array(m.track.n), distinct: 0, duplicates: 0, unexpected: 0 };
      const { prefix, n, report } = track;
      s.on('change', (e) => {
        const t = monoMs();
        const i = typeof e.key === 'string' && e.key.startsWith(prefix) ? Number(e.key.slice(prefix.length)) : -1;
        if (!(Number.isInteger(i) && i >= 0 && i < n)) {
          track.unexpected++;
          return;
        }
        if (track.seen[i]) {
          track.duplicates++;
          return;
        }
        track.seen[i] = 1;
        track.distinct++;
        if (report) process.send({ type: 'seen', i, t, lat: e.latency, v: e.version });
      });
    }
    const t0 = nowMs();
    await s.init();
    const initMs = nowMs() - t0;
    let hub = null;
    if (m.listen) hub = await s.listen({ port: 0, host: HOST, slowConsumer: { policy: 'disconnect', maxQueueBytes: SLOW_QUEUE_BYTES } });
    const st = s.getStatus();
    return { initMs, mode: st.mode, role: st.bus ? st.bus.role : null, url: hub ? hub.url : null, port: hub ? hub.port : null };
  }

  async function pushBurst(m) {
    const cpuStart = process.cpuUsage();
    const startedAtMs = wallMs();
    const t0 = nowMs();
    let pushErrors = 0;
    let firstPushError = null;
    const deadline = t0 + m.timeoutMs;
    for (let i = 0; i < m.events && nowMs() < deadline; i += m.chunk) {
      const ps = [];
      for (let j = i; j < Math.min(m.events, i + m.chunk); j++) ps.push(s.push(`fan:${String(j).padStart(6, '0')}`, { i: j, p: m.pad }));
      for (const r of await Promise.allSettled(ps)) {
        if (r.status === 'rejected') {
          pushErrors += 1;
          firstPushError = firstPushError || String(r.reason && r.reason.message);
        }
      }
    }
    return { cpuStart, startedAtMs, sendMs: nowMs() - t0, pushErrors, firstPushError };
  }

  async function fill(m) {
    const r = await drive((i) => s.push(`${m.prefix}${i}`, { i, p: m.pad }), 0, m.n, m.concurrency, m.timeoutMs);
    return { done: r.done, errors: r.errors, firstError: r.firstError ? errorLine(r.firstError) : null, ms: r.ms };
  }

  /** `count` get() calls on keys `prefix<k>`, k from the seeded sequence, `concurrency` in flight. */
  async function gets(m) {
    const rnd = prng(m.seed);
    for (let i = 0; i < m.skip; i++) rnd(); // the concurrent phase continues the sequence
    const keys = Array.from({ length: m.count }, () => Math.floor(rnd() * m.n));
    const lat = new Float64Array(m.count).fill(NaN);
    let next = 0;
    let wrong = 0;
    let nulls = 0;
    let errors = 0;
    let firstError = null;
    const before = s.getStatus().cache;
    const t0 = nowMs();
    const deadline = t0 + m.timeoutMs;
    const loop = async () => {
      while (next < m.count && nowMs() < deadline) {
        const j = next++;
        const k = keys[j];
        const a = nowMs();
        try {
          const v = await s.get(`${m.prefix}${k}`);
          lat[j] = nowMs() - a;
          if (v === null) nulls++;
          else if (!v || v.i !== k) wrong++;
        } catch (e) {
          errors++;
          if (!firstError) firstError = `${e.code || ''} ${e.message}`.trim();
          if (errors > 100) return;
        }
      }
    };
    await Promise.all(Array.from({ length: m.concurrency }, loop));
    const ms = nowMs() - t0;
    const after = s.getStatus().cache;
    const done = lat.filter((x) => !Number.isNaN(x));
    return { count: m.count, done: done.length, ms, latency: summarize(done), wrong, nulls, errors, firstError, before, after };
  }
}

// ---------------------------------------------------------------------------------------------
// The driver's side: instances (child processes and private servers: processes.js)

let MARIADB = null;
let REDIS = null;
let admin = null; // mysql2/promise pool for checks

function mysql2() {
  return require('mysql2/promise');
}

let streamNo = 0;
function freshStream(tag) {
  streamNo += 1;
  return { table: `bench_${tag}_${streamNo}`, prefix: `bench${streamNo}:${tag}:` };
}

let serverIdNo = 2000;
function nextServerId() {
  serverIdNo += 1;
  return serverIdNo;
}

/** The config of one instance on stream `st`; `redis` false: no options.redis. */
function instanceConfig(st, { redis = true, redisExtra = {}, options = {} } = {}) {
  return {
    database: 'mysql',
    connection: { uri: `mysql://${USER}:${PASSWORD}@${HOST}:${MARIADB.port}/${DATABASE}` },
    options: {
      table: st.table,
      ...options,
      mysql: { serverId: nextServerId() },
      ...(redis ? { redis: { url: `redis://${HOST}:${REDIS.port}`, keyPrefix: st.prefix, ...redisExtra } } : {}),
    },
  };
}

/** One instance process; `call(cmd)` resolves with its reply; 'seen' reports go to `onSeen`. */
class Instance {
  constructor(tag) {
    this.tag = tag;
    this.pending = new Map();
    this.nextId = 1;
    this.exited = false;
    this.onSeen = null;
    this.child = track(fork(__filename, ['--instance'], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'], execArgv: [] }));
    this.child.on('message', (m) => {
      if (m && m.type === 'seen') {
        if (this.onSeen) this.onSeen(m);
      } else if (m && this.pending.has(m.id)) {
        const p = this.pending.get(m.id);
        this.pending.delete(m.id);
        clearTimeout(p.timer);
        if (m.error) p.reject(new Error(`instance ${this.tag}: ${m.error}`));
        else p.resolve(m);
      }
    });
    this.child.on('exit', (code, signal) => {
      this.exited = true;
      const err = new Error(`instance ${this.tag} exited (${signal || code})`);
      for (const p of this.pending.values()) {
        clearTimeout(p.timer);
        p.reject(err);
      }
      this.pending.clear();
    });
  }

  call(cmd, extra = {}, timeoutMs = 15_000) {
    if (this.exited) return Promise.reject(new Error(`instance ${this.tag} is not running`));
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new Error(`instance ${this.tag}: no answer to ${cmd} within ${timeoutMs / 1000} s`));
      }, timeoutMs);
      this.pending.set(id, { resolve, reject, timer });
      this.child.send({ id, cmd, ...extra });
    });
  }

  async close() {
    if (this.exited) return;
    await this.call('close', {}, 15_000).catch(() => {});
    const until = nowMs() + 5000;
    while (!this.exited && nowMs() < until) await sleep(10);
    if (!this.exited) this.child.kill('SIGKILL');
  }
}

/** Starts instances one after the other (the first becomes the leader); checks their roles. */
async function startInstances(configs, { listen = false, track = null } = {}) {
  const list = [];
  try {
    for (let k = 0; k < configs.length; k++) {
      const inst = new Instance(String.fromCharCode(65 + k));
      list.push(inst);
      inst.info = await inst.call('start', { config: configs[k], listen, track }, 60_000);
    }
  } catch (e) {
    await closeAll(list);
    throw e;
  }
  const redis = !!configs[0].options.redis;
  const roles = list.map((x) => x.info.role);
  const want = redis ? list.map((_, k) => (k === 0 ? 'leader' : 'follower')) : list.map(() => null);
  const modes = list.map((x) => x.info.mode);
  const wantModes = list.map((_, k) => (k === 0 ? 'binlog' : 'follower'));
  if (roles.join() !== want.join() || modes.join() !== wantModes.join()) {
    await closeAll(list);
    throw new Error(`instances have roles ${roles.join(',')} and modes ${modes.join(',')}, expected ${want.join(',')} / ${wantModes.join(',')}`);
  }
  return list;
}

async function closeAll(list) {
  await Promise.all(list.map((x) => x.close()));
}

// ---------------------------------------------------------------------------------------------
// 1. Latency

async function latencyRun(mode) {
  const st = freshStream('lat');
  const total = LATENCY_WARMUP + LATENCY_WRITES;
  const n = mode.instances;
  const seenAt = Array.from({ length: n }, () => new Float64Array(total).fill(NaN));
  const engineLat = Array.from({ length: n }, () => new Float64Array(total).fill(NaN));
  const sent = new Float64Array(total).fill(NaN);
  const writer = sequentialWriter();
  const complete = (i) => seenAt.every((a) => !Number.isNaN(a[i]));
  const configs = Array.from({ length: n }, () => instanceConfig(st, { redis: mode.redis }));
  const list = await startInstances(configs, { track: { prefix: 'lat:', n: total, report: true } });
  list.forEach((inst, k) => {
    inst.onSeen = (m) => {
      seenAt[k][m.i] = m.t;
      engineLat[k][m.i] = m.lat;
      if (complete(m.i)) writer.arrived(m.i);
    };
  });
  let conn = null;
  let w = null; // the write loop's outcome
  let trackers = [];
  let statuses = [];
  try {
    conn = await mysql2().createConnection({ host: HOST, port: MARIADB.port, user: USER, password: PASSWORD, database: DATABASE });
    const sql = upsertSql(st.table);
    await conn.prepare(sql);
    // An instance that is not delivering ends the loop after 5 waits of 5 s.
    w = await writer.run({
      total,
      boundMs: TIMEOUT_MS,
      waitMs: 5000,
      onSend: (i) => (sent[i] = monoMs()),
      write: (i) => conn.execute(sql, [`lat:${i}`, `{"i":${i},"p":"${VALUE_PAD}"}`]),
      seen: complete,
    });
    // Late rows, then strays and duplicates.
    const until = nowMs() + (w.timeouts ? 5000 : 0);
    while (nowMs() < until && !Array.from({ length: w.issued }, (_, i) => i).every(complete)) await sleep(5);
    await sleep(100);
    trackers = await Promise.all(list.map((x) => x.call('tracker')));
    statuses = (await Promise.all(list.map((x) => x.call('status')))).map((r) => r.status);
  } finally {
    if (conn) await conn.end().catch(() => {});
    await closeAll(list);
  }

  const { issued, timeouts, writeErrors, firstWriteError, ack } = w;
  const perInstance = [];
  for (let k = 0; k < n; k++) {
    const lat = samples(LATENCY_WARMUP, issued, (i) => seenAt[k][i] - sent[i]);
    const eng = samples(LATENCY_WARMUP, issued, (i) => engineLat[k][i]);
    perInstance.push({
      instance: list[k].tag,
      role: list[k].info.role,
      mode: list[k].info.mode,
      initMs: list[k].info.initMs,
      received: trackers[k] ? trackers[k].distinct : 0,
      duplicates: trackers[k] ? trackers[k].duplicates : 0,
      unexpected: trackers[k] ? trackers[k].unexpected : 0,
      notices: trackers[k] ? trackers[k].notices : null,
      writeToListener: summarize(lat),
      eventLatencyField: summarize(eng),
      engineLatency: statuses[k] ? statuses[k].latency : null,
      bus: statuses[k] ? statuses[k].bus : null,
    });
  }
  const diff = n > 1 ? samples(LATENCY_WARMUP, issued, (i) => seenAt[1][i] - seenAt[0][i]) : [];
  const acks = samples(LATENCY_WARMUP, issued, (i) => ack[i]);
  return {
    mode: mode.name,
    table: st.table,
    keyPrefix: mode.redis ? st.prefix : null,
    planned: total,
    issued,
    measured: Math.max(0, issued - LATENCY_WARMUP),
    timeouts,
    writeErrors,
    firstWriteError,
    instances: perInstance,
    followerMinusLeader: n > 1 ? summarize(diff) : null,
    writeAck: summarize(acks),
  };
}

function latencyProblems(tag, res) {
  const p = [];
  const expected = res.issued - res.writeErrors;
  if (res.issued < res.planned) p.push(`${tag}: only ${res.issued} of ${res.planned} writes issued within ${TIMEOUT_MS / 1000} s`);
  if (res.writeErrors) p.push(`${tag}: ${res.writeErrors} writes failed (${res.firstWriteError})`);
  for (const x of res.instances) {
    const t = `${tag} instance ${x.instance} (${x.role || x.mode})`;
    p.push(...deliveryProblems(t, { distinct: x.received, duplicates: x.duplicates, unexpected: x.unexpected }, expected));
    if (x.notices && x.notices.resyncs.length) p.push(`${t}: resync: ${x.notices.resyncs.join('; ')}`);
    if (x.notices && x.notices.errors.length) p.push(`${t}: errors: ${x.notices.errors.join('; ')}`);
  }
  return p;
}

// ---------------------------------------------------------------------------------------------
// 2. Fan-out

async function fanoutRun(mode, pad) {
  const st = freshStream('fan');
  const configs = Array.from({ length: mode.instances }, () => instanceConfig(st, { redis: mode.redis }));
  const list = await startInstances(configs, { listen: true });
  const lgs = [];
  try {
    // INSTANCES load generators of CLIENTS clients in every mode; spread over the instances.
    const perInstance = list.map(() => 0);
    for (let g = 0; g < INSTANCES; g++) {
      const k = g % list.length;
      perInstance[k] += CLIENTS;
      lgs.push(startLoadgen({ url: list[k].info.url, clients: CLIENTS, mode: 'usp', expect: EVENTS, timeoutMs: TIMEOUT_MS, threads: LOADGEN_THREADS }));
    }
    const readyMs = TIMEOUT_MS + 10_000;
    await withTimeout(Promise.all(lgs.map((l) => l.ready)), readyMs, `load generators ready: not within ${readyMs / 1000} s`);
    // Every hub must count its clients before the first event.
    const until = nowMs() + 10_000;
    let counts = [];
    while (nowMs() < until) {
      counts = (await Promise.all(list.map((x) => x.call('status')))).map((r) => (r.status.hub ? r.status.hub.connections : 0));
      if (counts.every((c, k) => c >= perInstance[k])) break;
      await sleep(10);
    }
    if (!counts.every((c, k) => c === perInstance[k])) throw new Error(`the hubs count ${counts.join(', ')} clients, expected ${perInstance.join(', ')}`);

    const marks = await Promise.all(list.map((x) => x.call('mark')));
    const redisCpu0 = processCpuMs(REDIS.pid());
    const mariaCpu0 = processCpuMs(MARIADB.pid());
    const sentP = list[0].call('pushBurst', { events: EVENTS, chunk: CHUNK, pad, timeoutMs: TIMEOUT_MS }, TIMEOUT_MS + 10_000);
    sentP.catch(() => {}); // awaited below; the load generators' outcome comes first
    const results = await Promise.all(lgs.map((l) => l.resultWithin(TIMEOUT_MS + 15_000)));
    const redisCpuMs = processCpuMs(REDIS.pid()) - redisCpu0;
    const mariaCpuMs = processCpuMs(MARIADB.pid()) - mariaCpu0;
    const sent = await sentP;
    const stats = await Promise.all(list.map((x) => x.call('stats')));
    const trackers = await Promise.all(list.map((x) => x.call('tracker')));

    const deliveries = results.reduce((a, r) => a + r.deliveries, 0);
    const messages = results.reduce((a, r) => a + r.messages, 0);
    const firsts = results.map((r) => r.firstDeliveryMs).filter((x) => typeof x === 'number');
    const lasts = results.map((r) => r.lastDeliveryMs).filter((x) => typeof x === 'number');
    const first = firsts.length ? Math.min(...firsts) : NaN;
    const last = lasts.length === results.length ? Math.max(...lasts) : NaN;
    let instCpuUs = 0;
    const instances = list.map((x, k) => {
      const cpuUs = stats[k].cpu.user - marks[k].cpu.user + (stats[k].cpu.system - marks[k].cpu.system);
      instCpuUs += cpuUs;
      return {
        instance: x.tag,
        role: x.info.role,
        mode: x.info.mode,
        clients: perInstance[k],
        cpuMs: cpuUs / 1000,
        rssMiB: stats[k].rssMiB,
        hub: stats[k].status.hub,
        bus: stats[k].status.bus,
        events: stats[k].status.events,
        notices: trackers[k].notices,
      };
    });
    const lgCpuMs = results.reduce((a, r) => a + r.cpuUserMs + r.cpuSystemMs, 0);
    const windowMs = last - sent.startedAtMs;
    const expected = INSTANCES * CLIENTS * EVENTS;
    return {
      mode: mode.name,
      table: st.table,
      keyPrefix: mode.redis ? st.prefix : null,
      instanceCount: list.length,
      clients: INSTANCES * CLIENTS,
      events: EVENTS,
      expected,
      deliveries,
      messages,
      completed: results.every((r) => r.allReady && !r.timedOut && r.completeClients === CLIENTS) && deliveries === expected,
      deliveriesPerSec: deliveries / ((last - first) / 1000),
      startToLastPerSec: deliveries / (windowMs / 1000),
      firstDeliveryAfterStartMs: first - sent.startedAtMs,
      lastDeliveryAfterStartMs: windowMs,
      lastSpreadMs: lasts.length ? Math.max(...lasts) - Math.min(...lasts) : NaN,
      eventsPerFrame: messages ? deliveries / messages : NaN,
      pushMs: sent.sendMs,
      pushErrors: sent.pushErrors,
      firstPushError: sent.firstPushError,
      instancesCpuMs: instCpuUs / 1000,
      instancesCpuUsPerDelivery: deliveries ? instCpuUs / deliveries : NaN,
      instancesCores: instCpuUs / 1000 / windowMs,
      redisCpuMs,
      redisCores: redisCpuMs / windowMs,
      mariadbCpuMs: mariaCpuMs,
      mariadbCores: mariaCpuMs / windowMs,
      loadgenCpuMs: lgCpuMs,
      loadgenCpuUsPerDelivery: deliveries ? (lgCpuMs * 1000) / deliveries : NaN,
      rssMiB: instances.reduce((a, x) => a + x.rssMiB, 0),
      instances,
      loadgens: results,
    };
  } finally {
    for (const l of lgs) l.kill();
    await closeAll(list);
  }
}

function fanoutProblems(tag, res) {
  const p = [];
  for (const [g, lg] of res.loadgens.entries()) {
    p.push(...loadgenProblems(`${tag} load generator ${g + 1}`, lg, { clients: CLIENTS, expect: EVENTS, timeoutMs: TIMEOUT_MS }));
  }
  if (res.deliveries !== res.expected) p.push(`${tag}: ${res.deliveries} deliveries, expected ${res.expected}`);
  if (res.pushErrors) p.push(`${tag}: ${res.pushErrors} push() calls failed (${res.firstPushError})`);
  for (const x of res.instances) {
    const t = `${tag} instance ${x.instance}`;
    const h = x.hub;
    if (h && (h.slowDisconnects || h.dropped || h.gaps || h.coalesced)) {
      p.push(`${t}: hub slowDisconnects ${h.slowDisconnects}, dropped ${h.dropped}, gaps ${h.gaps}, coalesced ${h.coalesced}`);
    }
    if (x.notices.resyncs.length) p.push(`${t}: resync: ${x.notices.resyncs.join('; ')}`);
    if (x.notices.errors.length) p.push(`${t}: errors: ${x.notices.errors.join('; ')}`);
  }
  return p;
}

// ---------------------------------------------------------------------------------------------
// 3. Cache

/** L1 and L2 hits/misses over a phase, from getStatus().cache before and after it. */
function cacheDelta(before, after) {
  const d = (a, b, f) => (a && b ? b[f] - a[f] : NaN);
  const l1Hits = d(before, after, 'hits');
  const l1Misses = d(before, after, 'misses');
  const l2 = after && after.l2 ? after.l2 : null;
  const l2b = before && before.l2 ? before.l2 : null;
  const l2Hits = d(l2b, l2, 'hits');
  const l2Misses = d(l2b, l2, 'misses');
  return {
    l1Hits,
    l1Misses,
    l1HitRatio: l1Hits / (l1Hits + l1Misses),
    l2Present: !!l2,
    l2Enabled: l2 ? l2.enabled : null,
    l2Hits,
    l2Misses,
    l2HitRatio: l2Hits / (l2Hits + l2Misses),
  };
}

async function cacheRun(mode, round) {
  const st = freshStream('cache');
  const redisExtra = { cache: mode.cache };
  const configs = [
    instanceConfig(st, { redisExtra }),
    instanceConfig(st, { redisExtra, options: { cacheMaxBytes: L1_BYTES } }),
    instanceConfig(st, { redisExtra, options: { cacheMaxBytes: L1_BYTES } }),
  ];
  const list = await startInstances(configs, { track: { prefix: 'c:', n: CACHE_KEYS, report: false } });
  const [a, b, c] = list;
  try {
    const pad = padTo(VALUE_BYTES);
    const fill = await a.call('fill', { n: CACHE_KEYS, prefix: 'c:', pad, concurrency: FILL_CONCURRENCY, timeoutMs: TIMEOUT_MS }, TIMEOUT_MS + 10_000);
    // B and C must have delivered every change before the gets start.
    const until = nowMs() + TIMEOUT_MS;
    let seen = [];
    for (;;) {
      seen = (await Promise.all([b, c].map((x) => x.call('tracker')))).map((t) => t.distinct);
      if (seen.every((n) => n >= fill.done) || nowMs() >= until) break;
      await sleep(20);
    }
    const seenAll = seen.every((n) => n >= fill.done);
    const seed = 0x5eed + round;
    const phases = [];
    if (seenAll) {
      for (const ph of CACHE_PHASES) {
        const inst = ph.instance === 'B' ? b : c;
        const r = await inst.call(
          'gets',
          { prefix: 'c:', n: CACHE_KEYS, count: ph.count, concurrency: ph.concurrency, seed, skip: ph.skip, timeoutMs: TIMEOUT_MS },
          TIMEOUT_MS + 10_000,
        );
        phases.push({ phase: ph.name, instance: ph.instance, concurrency: ph.concurrency, ...r, getsPerSec: (r.done / r.ms) * 1000, delta: cacheDelta(r.before, r.after) });
      }
    }
    const trackers = await Promise.all(list.map((x) => x.call('tracker')));
    const statuses = (await Promise.all(list.map((x) => x.call('status')))).map((r) => r.status);
    return {
      mode: mode.name,
      table: st.table,
      keyPrefix: st.prefix,
      keys: CACHE_KEYS,
      valueBytes: JSON.stringify({ i: 12345, p: pad }).length,
      fill,
      seenAll,
      seenByFollowers: seen,
      phases,
      instances: list.map((x, k) => ({
        instance: x.tag,
        role: x.info.role,
        mode: x.info.mode,
        notices: trackers[k].notices,
        duplicates: trackers[k].duplicates,
        unexpected: trackers[k].unexpected,
        cache: statuses[k].cache,
        bus: statuses[k].bus,
      })),
    };
  } finally {
    await closeAll(list);
  }
}

function cacheProblems(tag, res, mode) {
  const p = [];
  if (res.fill.done !== CACHE_KEYS) p.push(`${tag}: only ${res.fill.done} of ${CACHE_KEYS} keys written (${res.fill.errors} failed: ${res.fill.firstError})`);
  if (!res.seenAll) p.push(`${tag}: instances B, C delivered ${res.seenByFollowers.join(', ')} of ${res.fill.done} changes within ${TIMEOUT_MS / 1000} s; no gets run`);
  for (const ph of res.phases) {
    const t = `${tag} ${ph.phase}`;
    if (ph.done !== ph.count) p.push(`${t}: only ${ph.done} of ${ph.count} gets done within the time bound`);
    if (ph.errors) p.push(`${t}: ${ph.errors} gets failed (${ph.firstError})`);
    if (ph.nulls || ph.wrong) p.push(`${t}: ${ph.nulls} gets returned null, ${ph.wrong} a wrong value`);
    if (!ph.delta.l2Present) p.push(`${t}: getStatus().cache.l2 is missing`);
    else if (ph.delta.l2Enabled !== mode.cache) p.push(`${t}: getStatus().cache.l2.enabled is ${ph.delta.l2Enabled}, expected ${mode.cache}`);
  }
  for (const x of res.instances) {
    const t = `${tag} instance ${x.instance}`;
    if (x.duplicates || x.unexpected) p.push(`${t}: ${x.duplicates} duplicated and ${x.unexpected} unknown changes`);
    if (x.notices.resyncs.length) p.push(`${t}: resync: ${x.notices.resyncs.join('; ')}`);
    if (x.notices.errors.length) p.push(`${t}: errors: ${x.notices.errors.join('; ')}`);
  }
  return p;
}

// ---------------------------------------------------------------------------------------------

async function main() {
  const command = commandFor(__filename, process.argv.slice(2));
  const startedAt = new Date();
  const machine = machineFacts(); // taken before the load of this script
  const parts = stringArg('parts', ALL_PARTS.join(',')).split(',');
  const unknown = parts.filter((x) => !ALL_PARTS.includes(x));
  if (unknown.length) throw new Error(`--parts: ${unknown.join(',')} is not one of ${ALL_PARTS.join(',')}`);
  const want = (x) => parts.includes(x);
  await loadStreamer(); // fail early when the native binary is missing
  stopAllOnExit();
  const cargoMissing = `cargo not found: the fan-out section needs Rust to build its load generator (benchmark/loadgen) on first use; build it with: ${BUILD_COMMAND}`;
  const build = want('fanout') ? await ensureLoadgen(cargoMissing) : { built: false, seconds: 0 };
  if (build.built) console.log(`load generator built in ${build.seconds.toFixed(1)} s (not part of any measurement)`);
  const fanPad = fanoutPad(EVENT_BYTES);
  console.log(
    `redis: ${ROUNDS} rounds; parts ${parts.join(', ')}; latency ${LATENCY_WRITES} writes; fan-out ${INSTANCES} x ${CLIENTS} clients, ` +
      `${EVENTS} events of ~${EVENT_BYTES} bytes; cache ${CACHE_KEYS} keys of ~${VALUE_BYTES} bytes, L1 ${fmt(L1_BYTES / 2 ** 20)} MiB, ` +
      `${GETS} gets sequential + ${GETS} with ${GET_CONCURRENCY} in flight + ${Math.min(OTHER_GETS, GETS)} by another instance`,
  );

  const t0server = Date.now();
  MARIADB = await startPrivateServer({ name: 'mariadb', script: MARIADB_SH, extra: ['binlog'], pidFile: 'mysqld.pid' });
  REDIS = await startPrivateServer({ name: 'redis', script: REDIS_SH, extra: [APPENDFSYNC], pidFile: 'redis.pid' });
  console.log(
    `private MariaDB on ${HOST}:${MARIADB.port}, Redis on ${HOST}:${REDIS.port} (${((Date.now() - t0server) / 1000).toFixed(1)} s to start)`,
  );
  let serverInfo = null;
  const rounds = { latency: [], fanout: [], cache: [] };
  const problems = [];
  const skipped = [];
  try {
    admin = mysql2().createPool({ host: HOST, port: MARIADB.port, user: USER, password: PASSWORD, database: DATABASE, connectionLimit: 1 });
    const [[v]] = await admin.query('SELECT VERSION() AS version, @@binlog_format AS binlogFormat');
    const redisVersion = execFileSync('redis-server', ['--version'], { encoding: 'utf8', timeout: 10_000 }).trim();
    serverInfo = { mariadb: v, redis: redisVersion };

    // Runs fn unless the mode is broken or (after round 1) the budget would be passed.
    const { timed, broken } = budgetedRuns({ budgetMs: BUDGET_MS, pad: 20, problems, skipped });

    for (let r = 1; r <= ROUNDS; r++) {
      if (want('latency')) {
        for (const mode of roundOrder(LATENCY_MODES, r)) {
          const key = `latency/${mode.name}`;
          const res = await timed(key, r, () => latencyRun(mode));
          if (!res) continue;
          res.round = r;
          rounds.latency.push(res);
          const ps = latencyProblems(`round ${r} ${key}`, res);
          problems.push(...ps);
          if (ps.length) broken.add(key);
          const cells = res.instances.map(
            (x) => `${x.instance} ${x.role || x.mode}: p50 ${fmt(x.writeToListener.p50)} p99 ${fmt(x.writeToListener.p99)} ms`,
          );
          console.log(`  round ${r} ${key.padEnd(20)} ${cells.join('; ')}  (write ack p50 ${fmt(res.writeAck.p50)} ms; ${res.measured} measured)`);
        }
      }
      if (want('fanout')) {
        for (const mode of roundOrder(FANOUT_MODES, r)) {
          const key = `fanout/${mode.name}`;
          const start = Date.now();
          const res = await timed(key, r, () => fanoutRun(mode, fanPad));
          if (!res) continue;
          res.round = r;
          res.runSeconds = (Date.now() - start) / 1000;
          rounds.fanout.push(res);
          const ps = fanoutProblems(`round ${r} ${key}`, res);
          problems.push(...ps);
          if (ps.length || !res.completed) broken.add(key);
          console.log(
            `  round ${r} ${key.padEnd(20)} ${res.completed ? `${fmt(res.deliveriesPerSec, 0)} deliveries/s` : 'INCOMPLETE'}` +
              `  (${fmt(res.deliveries, 0)}; last ${fmt(res.lastDeliveryAfterStartMs, 0)} ms after the first push; ${fmt(res.eventsPerFrame, 1)} events/frame;` +
              ` instances CPU ${fmt(res.instancesCpuUsPerDelivery, 3)} us/delivery, ${fmt(res.instancesCores)} cores; Redis ${fmt(res.redisCores)}, MariaDB ${fmt(res.mariadbCores)} cores;` +
              ` run ${fmt(res.runSeconds, 1)} s)`,
          );
        }
      }
      if (want('cache')) {
        for (const mode of roundOrder(CACHE_MODES, r)) {
          const key = `cache/${mode.name}`;
          const res = await timed(key, r, () => cacheRun(mode, r));
          if (!res) continue;
          res.round = r;
          rounds.cache.push(res);
          const ps = cacheProblems(`round ${r} ${key}`, res, mode);
          problems.push(...ps);
          if (ps.length) broken.add(key);
          const cells = res.phases.map(
            (ph) =>
              `${ph.instance} ${ph.phase}: get p50 ${fmt(ph.latency.p50, 3)} p99 ${fmt(ph.latency.p99, 3)} ms, ${fmt(ph.getsPerSec, 0)}/s, L1 ${fmt(ph.delta.l1HitRatio * 100, 1)} %,` +
              ` L2 ${ph.delta.l2Present ? `${fmt(ph.delta.l2HitRatio * 100, 1)} % (${ph.delta.l2Hits} hits of ${ph.delta.l2Hits + ph.delta.l2Misses})` : 'absent'}`,
          );
          console.log(`  round ${r} ${key.padEnd(20)} fill ${fmt((res.fill.done / res.fill.ms) * 1000, 0)} pushes/s; ${cells.join('; ')}`);
        }
      }
    }
  } finally {
    if (admin) await admin.end().catch(() => {});
    killChildren();
    stopServers();
  }

  // ---- medians
  const med = (rs, f) => median(rs.map(f));
  const latency = {};
  for (const m of want('latency') ? LATENCY_MODES : []) {
    const rs = rounds.latency.filter((x) => x.mode === m.name);
    const per = [];
    for (let k = 0; k < m.instances; k++) {
      const f = (g) => med(rs, (x) => g(x.instances[k]));
      per.push({
        instance: String.fromCharCode(65 + k),
        role: m.redis ? (k === 0 ? 'leader' : 'follower') : 'no Redis',
        p50: f((x) => x.writeToListener.p50),
        p90: f((x) => x.writeToListener.p90),
        p99: f((x) => x.writeToListener.p99),
        max: f((x) => x.writeToListener.max),
        eventLatencyFieldP50: f((x) => x.eventLatencyField.p50),
      });
    }
    latency[m.name] = {
      rounds: rs.length,
      instances: per,
      followerMinusLeaderP50: m.instances > 1 ? med(rs, (x) => x.followerMinusLeader.p50) : NaN,
      followerMinusLeaderP99: m.instances > 1 ? med(rs, (x) => x.followerMinusLeader.p99) : NaN,
      ackP50: med(rs, (x) => x.writeAck.p50),
    };
  }
  const fanout = {};
  for (const m of want('fanout') ? FANOUT_MODES : []) {
    const rs = rounds.fanout.filter((x) => x.mode === m.name);
    const all = rs.length > 0 && rs.every((x) => x.completed);
    const f = (g) => med(rs, g);
    fanout[m.name] = {
      label: m.label,
      rounds: rs.length,
      completedRounds: rs.filter((x) => x.completed).length,
      deliveriesPerSec: all ? f((x) => x.deliveriesPerSec) : NaN,
      startToLastPerSec: all ? f((x) => x.startToLastPerSec) : NaN,
      instancesCpuUsPerDelivery: all ? f((x) => x.instancesCpuUsPerDelivery) : NaN,
      instancesCores: f((x) => x.instancesCores),
      redisCores: f((x) => x.redisCores),
      mariadbCores: f((x) => x.mariadbCores),
      loadgenCpuUsPerDelivery: f((x) => x.loadgenCpuUsPerDelivery),
      eventsPerFrame: f((x) => x.eventsPerFrame),
      lastDeliveryAfterStartMs: f((x) => x.lastDeliveryAfterStartMs),
      rssMiB: f((x) => x.rssMiB),
    };
  }
  const cache = {};
  for (const m of want('cache') ? CACHE_MODES : []) {
    const rs = rounds.cache.filter((x) => x.mode === m.name);
    const byPhase = {};
    for (const { name: phase } of CACHE_PHASES) {
      const f = (g) => med(rs, (x) => {
        const ph = x.phases.find((p) => p.phase === phase);
        return ph ? g(ph) : NaN;
      });
      byPhase[phase] = {
        p50: f((p) => p.latency.p50),
        p90: f((p) => p.latency.p90),
        p99: f((p) => p.latency.p99),
        getsPerSec: f((p) => p.getsPerSec),
        l1HitRatio: f((p) => p.delta.l1HitRatio),
        l2Hits: f((p) => p.delta.l2Hits),
        l2Misses: f((p) => p.delta.l2Misses),
        l2HitRatio: f((p) => p.delta.l2HitRatio),
      };
    }
    cache[m.name] = { label: m.label, rounds: rs.length, fillPushesPerSec: med(rs, (x) => (x.fill.done / x.fill.ms) * 1000), ...byPhase };
  }

  const ratios = {};
  if (latency.redis && latency.plain) {
    ratios.latencyP50LeaderOverPlain = latency.redis.instances[0].p50 / latency.plain.instances[0].p50;
    ratios.latencyP99LeaderOverPlain = latency.redis.instances[0].p99 / latency.plain.instances[0].p99;
    ratios.latencyP50FollowerOverPlain = latency.redis.instances[1].p50 / latency.plain.instances[0].p50;
    ratios.latencyP99FollowerOverPlain = latency.redis.instances[1].p99 / latency.plain.instances[0].p99;
  }
  const scaledName = `${INSTANCES}x-redis`;
  if (fanout[scaledName]) {
    ratios.fanoutScaledOver1xRedis = fanout[scaledName].deliveriesPerSec / fanout['1x-redis'].deliveriesPerSec;
    ratios.fanoutScaledOver1xPlain = fanout[scaledName].deliveriesPerSec / fanout['1x-plain'].deliveriesPerSec;
  }
  if (cache.l2 && cache['no-l2']) {
    ratios.getP50SequentialL2OverNoL2 = cache.l2.sequential.p50 / cache['no-l2'].sequential.p50;
    ratios.getP99SequentialL2OverNoL2 = cache.l2.sequential.p99 / cache['no-l2'].sequential.p99;
    ratios.getsPerSecConcurrentL2OverNoL2 = cache.l2.concurrent.getsPerSec / cache['no-l2'].concurrent.getsPerSec;
    ratios.getP50OtherInstanceL2OverNoL2 = cache.l2['other instance'].p50 / cache['no-l2']['other instance'].p50;
    ratios.getP99OtherInstanceL2OverNoL2 = cache.l2['other instance'].p99 / cache['no-l2']['other instance'].p99;
  }

  if (skipped.length) console.log(`\nnote: ${skipped.length} run(s) skipped for time (${skipped.join(', ')}); medians use the rounds that ran`);
  if (want('latency')) {
    const rows = [];
    for (const m of LATENCY_MODES) {
      const x = latency[m.name];
      for (const i of x.instances) {
        rows.push([`${m.name}: ${i.instance} (${i.role})`, String(x.rounds), i.p50, i.p90, i.p99, i.max, x.ackP50, i.eventLatencyFieldP50]);
      }
    }
    printTable(
      `1. latency, external write sent (driver) -> 'change' listener (instance process), ms; ${LATENCY_WRITES} sequential upserts by one mysql2 connection (median of rounds)`,
      ['mode: instance', 'rounds', 'p50', 'p90', 'p99', 'max', 'write ack p50', "event's latency field p50"],
      rows,
    );
    console.log(
      "(the event's latency field: the engine's commit time, the row's updated_at as the binlog carries it, to the millisecond, -> hand-off to JS in that instance)",
    );
    if (latency.redis) {
      console.log(
        `follower B - leader A, per write: p50 ${fmt(latency.redis.followerMinusLeaderP50, 3)} ms, p99 ${fmt(latency.redis.followerMinusLeaderP99, 3)} ms; ` +
          `ratios to the baseline (no Redis): leader p50 ${ratioCell(ratios.latencyP50LeaderOverPlain)}, p99 ${ratioCell(ratios.latencyP99LeaderOverPlain)}; ` +
          `follower p50 ${ratioCell(ratios.latencyP50FollowerOverPlain)}, p99 ${ratioCell(ratios.latencyP99FollowerOverPlain)}`,
      );
    }
  }
  if (want('fanout')) {
    printTable(
      `2. fan-out, ${EVENTS} events of ~${EVENT_BYTES} bytes by push() to ${INSTANCES * CLIENTS} clients (${INSTANCES} load generator processes x ${CLIENTS}), median of rounds`,
      ['mode', 'rounds', 'deliveries/s', 'start->last /s', 'instances CPU us/delivery', 'instances cores', 'Redis cores', 'MariaDB cores', 'loadgen CPU us/delivery', 'events/frame', 'RSS MiB'],
      FANOUT_MODES.map((m) => {
        const x = fanout[m.name];
        return [
          m.label,
          `${x.completedRounds}/${x.rounds}`,
          fmt(x.deliveriesPerSec, 0),
          fmt(x.startToLastPerSec, 0),
          fmt(x.instancesCpuUsPerDelivery, 3),
          x.instancesCores,
          x.redisCores,
          x.mariadbCores,
          fmt(x.loadgenCpuUsPerDelivery, 3),
          fmt(x.eventsPerFrame, 1),
          fmt(x.rssMiB, 0),
        ];
      }),
    );
    console.log(
      `ratio ${scaledName} / 1x-redis deliveries/s: ${ratioCell(ratios.fanoutScaledOver1xRedis)}; / 1x-plain: ${ratioCell(ratios.fanoutScaledOver1xPlain)} ` +
        `(all processes share the machine's ${machine.cpuCount} cores; CPU = user + system over the window from the first push to the last delivery)`,
    );
  }
  if (want('cache')) {
    const rows = [];
    for (const m of CACHE_MODES) {
      const x = cache[m.name];
      for (const ph of CACHE_PHASES) {
        const p = x[ph.name];
        rows.push([
          `${m.name}: ${ph.instance}, ${ph.name}${ph.concurrency > 1 ? ` (${ph.concurrency} in flight)` : ''}`,
          String(x.rounds),
          fmt(p.p50, 3),
          fmt(p.p90, 3),
          fmt(p.p99, 3),
          fmt(p.getsPerSec, 0),
          `${fmt(p.l1HitRatio * 100, 1)} %`,
          Number.isNaN(p.l2HitRatio) ? 'n/a' : `${fmt(p.l2HitRatio * 100, 1)} %`,
          `${fmt(p.l2Hits, 0)} / ${fmt(p.l2Misses, 0)}`,
        ]);
      }
    }
    printTable(
      `3. get() in followers B and C, ${CACHE_KEYS} keys of ~${VALUE_BYTES} bytes, L1 (cacheMaxBytes) ${fmt(L1_BYTES / 2 ** 20)} MiB, ${GETS} uniform random gets per phase (median of rounds)`,
      ['mode, phase', 'rounds', 'get p50 ms', 'p90 ms', 'p99 ms', 'gets/s', 'L1 hit ratio', 'L2 hit ratio', 'L2 hits / misses'],
      rows,
    );
    console.log(
      `ratios l2 / no-l2: sequential get p50 ${ratioCell(ratios.getP50SequentialL2OverNoL2)}, p99 ${ratioCell(ratios.getP99SequentialL2OverNoL2)}; ` +
        `concurrent gets/s ${ratioCell(ratios.getsPerSecConcurrentL2OverNoL2)}; other instance get p50 ${ratioCell(ratios.getP50OtherInstanceL2OverNoL2)}, ` +
        `p99 ${ratioCell(ratios.getP99OtherInstanceL2OverNoL2)} (below 1: L2 is faster)`,
    );
  }

  const summary = [];
  for (const m of want('latency') ? LATENCY_MODES : []) {
    for (const i of latency[m.name].instances) {
      summary.push({ metric: `Redis bus: write → listener p50, ${m.name} ${i.instance} (${i.role})`, value: i.p50, unit: 'ms' });
      summary.push({ metric: `Redis bus: write → listener p99, ${m.name} ${i.instance} (${i.role})`, value: i.p99, unit: 'ms' });
    }
  }
  for (const [k, v] of Object.entries(ratios)) {
    if (k.startsWith('latency')) summary.push({ metric: `Redis bus: latency ratio ${k.replace('latency', '')}`, value: v, unit: 'x' });
  }
  for (const m of want('fanout') ? FANOUT_MODES : []) {
    summary.push({ metric: `Redis bus: fan-out deliveries/s, ${m.label}`, value: fanout[m.name].deliveriesPerSec, unit: 'deliveries/s' });
    summary.push({ metric: `Redis bus: fan-out instances' CPU per delivery, ${m.label}`, value: fanout[m.name].instancesCpuUsPerDelivery, unit: 'µs' });
  }
  if (ratios.fanoutScaledOver1xRedis !== undefined) {
    summary.push({ metric: `Redis bus: fan-out deliveries/s ratio ${scaledName} / 1x-redis`, value: ratios.fanoutScaledOver1xRedis, unit: 'x' });
  }
  for (const m of want('cache') ? CACHE_MODES : []) {
    for (const { name: phase } of CACHE_PHASES) {
      const p = cache[m.name][phase];
      summary.push({ metric: `Redis bus: get() p50, ${m.name}, ${phase}`, value: p.p50, unit: 'ms' });
      summary.push({ metric: `Redis bus: get() p99, ${m.name}, ${phase}`, value: p.p99, unit: 'ms' });
      summary.push({ metric: `Redis bus: L1 hit ratio, ${m.name}, ${phase}`, value: p.l1HitRatio, unit: 'ratio' });
      summary.push({ metric: `Redis bus: L2 hit ratio, ${m.name}, ${phase}`, value: p.l2HitRatio, unit: 'ratio' });
    }
    summary.push({ metric: `Redis bus: gets/s with ${GET_CONCURRENCY} in flight, ${m.name}`, value: cache[m.name].concurrent.getsPerSec, unit: 'gets/s' });
  }

  printProblems(problems);
  const durationSec = secondsSince(startedAt);
  const file = writeResult('redis', {
    name: 'redis',
    command,
    date: startedAt.toISOString(),
    durationSec,
    machine,
    server: serverInfo,
    config: {
      rounds: ROUNDS,
      parts,
      latencyWrites: LATENCY_WRITES,
      latencyWarmup: LATENCY_WARMUP,
      instances: INSTANCES,
      clientsPerLoadgen: CLIENTS,
      loadgenThreads: LOADGEN_THREADS,
      events: EVENTS,
      eventBytes: EVENT_BYTES,
      chunk: CHUNK,
      cacheKeys: CACHE_KEYS,
      valueBytes: VALUE_BYTES,
      l1Bytes: L1_BYTES,
      gets: GETS,
      getConcurrency: GET_CONCURRENCY,
      fillConcurrency: FILL_CONCURRENCY,
      timeoutSec: TIMEOUT_MS / 1000,
      budgetSec: BUDGET_MS / 1000,
      listen: { slowConsumer: { policy: 'disconnect', maxQueueBytes: SLOW_QUEUE_BYTES } },
      redisServer: `scripts/redis.sh: appendonly yes, appendfsync ${APPENDFSYNC}`,
      loadgenBuild: build,
    },
    ok: problems.length === 0,
    problems,
    skippedForTime: skipped,
    median: { latency, fanout, cache },
    ratios,
    rounds,
    summary,
  });
  console.log(`\nwrote ${path.relative(ROOT, file)} (${durationSec} s)`);
  if (problems.length) process.exitCode = 1;
}

if (process.argv.includes('--instance')) instanceMain();
else runMain(main);
