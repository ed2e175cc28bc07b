'use strict';
// Shared helpers of the benchmark scripts: timing, statistics, temp files, result files, tables,
// the time budget of a script's runs, and the loops and checks that several scripts share
// (concurrent operations, sequential writes that wait for their change, checking changes off by
// key). Nothing here measures anything by itself. Child processes and private servers are in
// processes.js, the fan-out load generator in loadgen.js.

const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');

const ROOT = path.resolve(__dirname, '..');
const RESULTS_DIR = path.join(__dirname, 'results');

// ---------------------------------------------------------------------------------------------
// Time

const HR_BASE = process.hrtime.bigint();

/** Monotonic time in ms (fractional) since this module was loaded. */
function nowMs() {
  return Number(process.hrtime.bigint() - HR_BASE) / 1e6;
}

/** Wall clock in ms (fractional): `performance.timeOrigin + performance.now()`. */
function wallMs() {
  return performance.timeOrigin + performance.now();
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/**
 * Polls `predicate` every `stepMs` until it returns true or `timeoutMs` passed.
 * Resolves true when the predicate became true, false on timeout.
 */
async function waitFor(predicate, timeoutMs, stepMs = 2) {
  const end = nowMs() + timeoutMs;
  for (;;) {
    if (predicate()) return true;
    if (nowMs() >= end) return false;
    await sleep(stepMs);
  }
}

/**
 * Settles as `promise` does, or rejects with `new Error(message)` after `ms` (its timer cleared,
 * so it never keeps the process alive).
 */
function withTimeout(promise, ms, message) {
  let timer;
  const bound = new Promise((_, reject) => (timer = setTimeout(() => reject(new Error(message)), ms)));
  return Promise.race([promise, bound]).finally(() => clearTimeout(timer));
}

// ---------------------------------------------------------------------------------------------
// Statistics

/** Nearest-rank percentile of an ascending-sorted array-like; q in [0, 100]. */
function percentileSorted(sorted, q) {
  const n = sorted.length;
  if (n === 0) return NaN;
  if (q <= 0) return sorted[0];
  if (q >= 100) return sorted[n - 1];
  const rank = Math.ceil((q / 100) * n);
  return sorted[Math.min(n, Math.max(1, rank)) - 1];
}

/** { count, p50, p90, p99, max, mean } of a list of numbers (copied, then sorted). */
function summarize(values) {
  const a = Float64Array.from(values);
  a.sort();
  let sum = 0;
  for (let i = 0; i < a.length; i++) sum += a[i];
  return {
    count: a.length,
    p50: percentileSorted(a, 50),
    p90: percentileSorted(a, 90),
    p99: percentileSorted(a, 99),
    max: a.length ? a[a.length - 1] : NaN,
    mean: a.length ? sum / a.length : NaN,
  };
}

function median(values) {
  const a = values.filter((v) => typeof v === 'number' && !Number.isNaN(v)).sort((x, y) => x - y);
  if (a.length === 0) return NaN;
  const m = a.length >> 1;
  return a.length % 2 ? a[m] : (a[m - 1] + a[m]) / 2;
}

/** Field-wise median of a list of objects with numeric fields (non-numeric fields are skipped). */
function medianOf(objects, fields) {
  const out = {};
  for (const f of fields) out[f] = median(objects.map((o) => (o ? o[f] : NaN)));
  return out;
}

// ---------------------------------------------------------------------------------------------
// Formatting

function fmt(v, digits = 2) {
  if (v === null || v === undefined) return '-';
  if (typeof v !== 'number') return String(v);
  if (Number.isNaN(v)) return 'n/a';
  if (Math.abs(v) >= 1000 || digits === 0) return Math.round(v).toLocaleString('en-US');
  return v.toFixed(digits);
}

/** A ratio as a table cell: `1.23x`, or `n/a`. */
function ratioCell(v) {
  return Number.isNaN(v) ? 'n/a' : `${fmt(v)}x`;
}

/** Prints a plain-text table: `rows` are arrays of cells (already strings or numbers). */
function printTable(title, header, rows) {
  const cells = [header, ...rows].map((r) => r.map((c) => (typeof c === 'number' ? fmt(c) : String(c))));
  const widths = header.map((_, i) => Math.max(...cells.map((r) => (r[i] || '').length)));
  const line = (r) => r.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join('  ');
  const out = [];
  if (title) out.push('', title);
  out.push(line(cells[0]));
  out.push(widths.map((w) => '-'.repeat(w)).join('  '));
  for (const r of cells.slice(1)) out.push(line(r));
  console.log(out.join('\n'));
}

// ---------------------------------------------------------------------------------------------
// Files

const TEMP_DIR = path.join(os.tmpdir(), 'usp-bench');

/** A fresh path for a SQLite file under the OS temp dir; nothing is created. */
function tempDbPath(tag) {
  const dir = TEMP_DIR;
  fs.mkdirSync(dir, { recursive: true });
  return path.join(dir, `${tag}-${process.pid}-${Date.now()}-${Math.random().toString(36).slice(2, 8)}.db`);
}

/** Removes a SQLite file and its WAL/SHM/journal companions. Never throws. */
function removeDb(p) {
  if (!p || p === ':memory:') return;
  for (const f of [p, `${p}-wal`, `${p}-shm`, `${p}-journal`]) {
    try {
      fs.unlinkSync(f);
    } catch {
      // absent already
    }
  }
}

/** Removes the temp dir of the benchmarks when it is empty (another run may still use it). */
function removeTempDir() {
  try {
    fs.rmdirSync(TEMP_DIR);
  } catch {
    // not empty, or already gone
  }
}

/** Runs a script's async `main`: a failure is printed and sets exit code 1; temp files go. */
function runMain(main) {
  main()
    .catch((e) => {
      console.error(e && e.stack ? e.stack : e);
      process.exitCode = 1;
    })
    .finally(removeTempDir);
}

/** Prints the PROBLEMS of a run, if there are any. */
function printProblems(problems) {
  if (problems.length) {
    console.log('\nPROBLEMS:');
    for (const p of problems) console.log(`  - ${p}`);
  }
}

/** Seconds since `startedAt` (a Date), to a tenth. */
function secondsSince(startedAt) {
  return Math.round((Date.now() - startedAt.getTime()) / 100) / 10;
}

/** Writes results/<name>.json and returns its path. */
function writeResult(name, result) {
  fs.mkdirSync(RESULTS_DIR, { recursive: true });
  const file = path.join(RESULTS_DIR, `${name}.json`);
  fs.writeFileSync(file, `${JSON.stringify(result, null, 2)}\n`);
  return file;
}

function machineFacts() {
  const cpus = os.cpus();
  return {
    cpuModel: cpus.length ? cpus[0].model.trim() : 'unknown',
    cpuCount: cpus.length,
    totalMemoryGiB: Math.round((os.totalmem() / 2 ** 30) * 10) / 10,
    platform: `${os.type()} ${os.release()} ${os.arch()}`,
    node: process.version,
    // Other work on the machine skews every number; the 1-minute load average shows it.
    loadAverage1m: Math.round(os.loadavg()[0] * 100) / 100,
  };
}

// ---------------------------------------------------------------------------------------------
// Loading the package (it may be rebuilt by someone else while we run)

/**
 * Requires the package from the repository root. If loading fails (for example because the native
 * binary is being rebuilt), waits 30 s and tries again, at most `attempts` times in all.
 */
async function loadStreamer(attempts = 3) {
  let lastErr;
  for (let i = 0; i < attempts; i++) {
    try {
      return require(ROOT);
    } catch (e) {
      lastErr = e;
      // A failed require leaves nothing usable in the cache; drop partial entries and retry.
      for (const k of Object.keys(require.cache)) {
        if (k.startsWith(ROOT) && !k.includes(`${path.sep}node_modules${path.sep}`) && !k.startsWith(__dirname)) {
          delete require.cache[k];
        }
      }
      if (i + 1 < attempts) {
        console.error(`[bench] require('${ROOT}') failed (${e.message.split('\n')[0]}); retrying in 30 s`);
        await sleep(30_000);
      }
    }
  }
  throw lastErr;
}

function loadBetterSqlite3() {
  return require(path.join(ROOT, 'node_modules', 'better-sqlite3'));
}

/** `node benchmark/<file>` as the user would type it from the repository root. */
function commandFor(file, args = []) {
  return ['node', path.relative(ROOT, file), ...args].join(' ');
}

/** Reads `--name=value` style flags (numbers only) with defaults. */
function numberArg(name, dflt) {
  const prefix = `--${name}=`;
  const a = process.argv.find((x) => x.startsWith(prefix));
  if (!a) return dflt;
  const v = Number(a.slice(prefix.length));
  if (!Number.isFinite(v) || v <= 0) throw new Error(`--${name} must be a positive number, got ${a.slice(prefix.length)}`);
  return v;
}

/** Reads `--name=value` style flags (strings) with defaults. */
function stringArg(name, dflt) {
  const prefix = `--${name}=`;
  const a = process.argv.find((x) => x.startsWith(prefix));
  return a ? a.slice(prefix.length) : dflt;
}

// ---------------------------------------------------------------------------------------------
// The time budget of a script's runs

/**
 * The --budget of a script: after round 1, a run of mode `key` is skipped when the time since this
 * was made plus the longest earlier run of `key` would pass `budgetMs`. `skip(key, r)` says so (the
 * run is listed in `skipped` and printed, `key` padded to `pad` characters); `record(key, start)`
 * notes how long a run that began at `start` (Date.now()) took.
 */
function runBudget(budgetMs, skipped, pad) {
  const t0 = Date.now();
  const longest = {};
  return {
    skip(key, r) {
      if (r > 1 && Date.now() - t0 + (longest[key] || 0) > budgetMs) {
        skipped.push(`round ${r} ${key}`);
        console.log(`  round ${r} ${key.padEnd(pad)} skipped: the time budget of ${budgetMs / 1000} s would be exceeded`);
        return true;
      }
      return false;
    },
    record(key, start) {
      longest[key] = Math.max(longest[key] || 0, Date.now() - start);
    },
  };
}

/**
 * `timed(key, r, fn)` runs `fn` (round `r` of mode `key`) unless `key` is in `broken` or the budget
 * (runBudget) skips it, and resolves its result, or null when it did not run or failed. A failure
 * is printed as ERROR, listed in `problems` and puts `key` in `broken`, so it is not run again;
 * callers add keys to `broken` too.
 */
function budgetedRuns({ budgetMs, pad, problems, skipped }) {
  const budget = runBudget(budgetMs, skipped, pad);
  const broken = new Set();
  const timed = async (key, r, fn) => {
    if (broken.has(key)) return null;
    if (budget.skip(key, r)) return null;
    const start = Date.now();
    try {
      return await fn();
    } catch (e) {
      broken.add(key);
      const msg = `round ${r} ${key}: failed: ${e.message}`;
      console.error(`ERROR: ${msg}`);
      problems.push(msg);
      return null;
    } finally {
      budget.record(key, start);
    }
  };
  return { timed, broken };
}

/** The modes of round `r`: as listed in odd rounds, reversed in even ones (so no mode always runs first). */
function roundOrder(modes, r) {
  return r % 2 === 1 ? modes : [...modes].reverse();
}

// ---------------------------------------------------------------------------------------------
// Loops

/**
 * Runs operations [from, from + count) in `workers` concurrent async loops, each awaiting
 * `op(i, worker)` before it takes the next number; bounded by count and by `maxMs`. More than 100
 * failures end a loop. Resolves { done, ms, errors, firstError } (firstError: the first error thrown).
 */
async function drive(op, from, count, workers, maxMs) {
  let next = from;
  const end = from + count;
  let done = 0;
  let errors = 0;
  let firstError = null;
  const t0 = nowMs();
  const deadline = t0 + maxMs;
  const loop = async (worker) => {
    while (next < end && nowMs() < deadline) {
      const i = next++;
      try {
        await op(i, worker);
        done++;
      } catch (e) {
        errors++;
        if (!firstError) firstError = e;
        if (errors > 100) return; // something is broken; do not spin on it
      }
    }
  };
  await Promise.all(Array.from({ length: workers }, (_, w) => loop(w)));
  return { done, ms: nowMs() - t0, errors, firstError };
}

/** An error as one line: `<code> <message>`. */
function errorLine(e) {
  return `${e.code || ''} ${e.message}`.trim();
}

/**
 * The write loop of the latency sections: writes 0..total-1 one at a time and after each waits
 * for its change to arrive. `arrived(i)` is to be called when the change of write i arrived (by
 * the listener); `run()` writes: per write, a random pause of 0..thinkMs first (when thinkMs > 0),
 * then `t0 = nowMs()`, `onSend(i, t0)`, `await write(i)`; when it resolved and `seen(i)` is not yet
 * true, it waits for `arrived(i)`, at most `waitMs`. It stops after `boundMs`, after more than 5
 * failed writes or more than 5 waits that timed out. Resolves { issued, timeouts, writeErrors,
 * firstWriteError, ack } (ack[i]: ms from t0 until write(i) resolved; NaN when it did not).
 */
function sequentialWriter() {
  let waiter = null; // { i, resolve } of the write we wait for
  return {
    arrived(i) {
      if (waiter && waiter.i === i) waiter.resolve(true);
    },
    async run({ total, boundMs, thinkMs = 0, waitMs, onSend, write, seen }) {
      const ack = new Float64Array(total).fill(NaN);
      let issued = 0;
      let timeouts = 0;
      let writeErrors = 0;
      let firstWriteError = null;
      const deadline = nowMs() + boundMs;
      for (let i = 0; i < total && nowMs() < deadline; i++) {
        if (thinkMs) await sleep(Math.random() * thinkMs);
        const seenPromise = new Promise((resolve) => {
          waiter = { i, resolve };
        });
        const t0 = nowMs();
        onSend(i, t0);
        issued++;
        try {
          await write(i);
          ack[i] = nowMs() - t0;
        } catch (e) {
          writeErrors++;
          if (!firstWriteError) firstWriteError = e.message;
          waiter = null;
          if (writeErrors > 5) break;
          continue;
        }
        if (!seen(i)) {
          let timer;
          const ok = await Promise.race([seenPromise, new Promise((resolve) => (timer = setTimeout(() => resolve(false), waitMs)))]);
          clearTimeout(timer);
          if (!ok) {
            timeouts++;
            if (timeouts > 5) break; // the listener is not delivering; do not spend the time bound on it
          }
        }
        waiter = null;
      }
      return { issued, timeouts, writeErrors, firstWriteError, ack };
    },
  };
}

/** `f(i)` for i in [from, to), without the NaN values. */
function samples(from, to, f) {
  const out = [];
  for (let i = from; i < to; i++) {
    const v = f(i);
    if (!Number.isNaN(v)) out.push(v);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Listeners: opening a streamer, checking changes off by key

/**
 * Opens a streamer (`new U(config)`) with `onChange` as its 'change' listener; resyncs and errors
 * are collected in `errors`. Resolves { errors, initMs, mode, status(), close() } once init()
 * resolved (a failed init() closes it and rejects).
 */
async function openStreamer(U, config, onChange) {
  const errors = [];
  const s = new U(config);
  s.on('change', onChange);
  s.on('resync', (e) => errors.push(`resync: ${e.reason} (${e.from}..${e.to})`));
  s.on('error', (e) => errors.push(e && e.message ? e.message : String(e)));
  const t0 = nowMs();
  try {
    await s.init();
  } catch (e) {
    await s.close().catch(() => {});
    throw e;
  }
  return {
    errors,
    initMs: nowMs() - t0,
    mode: s.getStatus().mode,
    status: () => s.getStatus(),
    close: () => s.close(),
  };
}

/**
 * Tracks changes of keys `${prefix}0 .. ${prefix}${n-1}`: `onChange(key, version, dataI)` checks
 * each off; each must arrive once, with version `expectVersion` (and, with `checkData`, data.i =
 * i). Keys starting with `sentinelPrefix` are only collected in `readySeen`. `onSeen(i, t)` is
 * called for the first arrival of key i (t = nowMs()).
 */
function keyTracker(prefix, n, { expectVersion = 1, checkData = false, sentinelPrefix = null, onSeen = null } = {}) {
  const seen = new Uint8Array(n);
  const t = {
    distinct: 0,
    duplicates: 0,
    unexpected: 0,
    wrongVersion: 0,
    wrongData: 0,
    tLastWall: NaN,
    tFirstWall: NaN,
    readySeen: new Set(),
    waiting: null, // { count, resolve } of reached()
    /** Resolves true once `count` distinct keys arrived, false after timeoutMs (event driven, no polling). */
    reached(count, timeoutMs) {
      if (t.distinct >= count) return Promise.resolve(true);
      return new Promise((resolve) => {
        const timer = setTimeout(() => {
          t.waiting = null;
          resolve(false);
        }, timeoutMs);
        t.waiting = {
          count,
          resolve: () => {
            clearTimeout(timer);
            t.waiting = null;
            resolve(true);
          },
        };
      });
    },
    onChange(key, version, dataI) {
      if (sentinelPrefix && typeof key === 'string' && key.startsWith(sentinelPrefix)) {
        t.readySeen.add(key);
        return;
      }
      const i = typeof key === 'string' && key.startsWith(prefix) ? Number(key.slice(prefix.length)) : -1;
      if (!(Number.isInteger(i) && i >= 0 && i < n)) {
        t.unexpected++;
        return;
      }
      if (seen[i]) {
        t.duplicates++;
        return;
      }
      seen[i] = 1;
      if (Number(version) !== expectVersion) t.wrongVersion++;
      if (checkData && Number(dataI) !== i) t.wrongData++;
      t.distinct++;
      if (t.distinct === 1) t.tFirstWall = wallMs();
      if (t.distinct === n) t.tLastWall = wallMs();
      if (onSeen) onSeen(i, nowMs());
      if (t.waiting && t.distinct >= t.waiting.count) t.waiting.resolve();
    },
  };
  return t;
}

/**
 * The PROBLEMS of a keyTracker that should have seen `expected` keys; `noun` names what arrived
 * (rows, documents), `wrongVersion` how a wrong version is described.
 */
function deliveryProblems(tag, tr, expected, { noun = 'rows', wrongVersion = 'an unexpected version' } = {}) {
  const out = [];
  if (tr.distinct < expected) out.push(`${tag}: ${expected - tr.distinct} of ${expected} ${noun} never reached the listener`);
  if (tr.duplicates) out.push(`${tag}: ${tr.duplicates} ${noun} delivered twice`);
  if (tr.unexpected) out.push(`${tag}: ${tr.unexpected} ${noun} with unknown keys`);
  if (tr.wrongVersion) out.push(`${tag}: ${tr.wrongVersion} ${noun} with ${wrongVersion}`);
  if (tr.wrongData) out.push(`${tag}: ${tr.wrongData} ${noun} with wrong data`);
  return out;
}

/**
 * The PROBLEMS of one run of a latency section (a result of `issued` of `planned` writes, checked
 * off by a keyTracker, with the listener's `listenerErrors` and capture `listenerMode`): the
 * deliveryProblems (`what`), writes not issued or failed (`writes` names them), listener errors,
 * and a capture mode other than 'polling' when mode.options.useChangeStreams is false, else `capture`.
 */
function latencyRunProblems(tag, res, mode, { writes, capture, what = {} }) {
  const out = deliveryProblems(tag, res, res.issued - res.writeErrors, what);
  if (res.issued < res.planned) out.push(`${tag}: only ${res.issued} of ${res.planned} ${writes} issued within the time bound`);
  if (res.writeErrors) out.push(`${tag}: ${res.writeErrors} ${writes} failed (${res.firstWriteError})`);
  if (res.listenerErrors.length) out.push(`${tag}: listener errors: ${res.listenerErrors.join('; ')}`);
  const want = mode.options && mode.options.useChangeStreams === false ? 'polling' : capture;
  if (res.listenerMode !== want) out.push(`${tag}: capture mode ${res.listenerMode}, expected ${want}`);
  return out;
}

/** Medians over the rounds `rs` of a latency section's results (writeToListener, writeAck), `writesPerRound` writes each. */
function latencyMedians(rs, writesPerRound) {
  const med = (f) => median(rs.map(f));
  return {
    rounds: rs.length,
    writesPerRound,
    p50: med((x) => x.writeToListener.p50),
    p90: med((x) => x.writeToListener.p90),
    p99: med((x) => x.writeToListener.p99),
    max: med((x) => x.writeToListener.max),
    mean: med((x) => x.writeToListener.mean),
    ackP50: med((x) => x.writeAck.p50),
    ackP99: med((x) => x.writeAck.p99),
  };
}

/** CPU time of this process (a process.cpuUsage() delta: all threads) over a wall time, in ms and cores. */
function cpuSpan(usage, wallMsSpan) {
  const totalMs = (usage.user + usage.system) / 1000;
  return { userMs: usage.user / 1000, systemMs: usage.system / 1000, totalMs, wallMs: wallMsSpan, cores: totalMs / wallMsSpan };
}

module.exports = {
  ROOT,
  RESULTS_DIR,
  nowMs,
  wallMs,
  sleep,
  waitFor,
  withTimeout,
  percentileSorted,
  summarize,
  median,
  medianOf,
  fmt,
  ratioCell,
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
  stringArg,
  runBudget,
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
};
