'use strict';
// Shared helpers of the benchmark scripts: timing, statistics, temp files, result files, tables.
// Nothing here measures anything by itself.

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

module.exports = {
  ROOT,
  RESULTS_DIR,
  nowMs,
  sleep,
  waitFor,
  percentileSorted,
  summarize,
  median,
  medianOf,
  fmt,
  printTable,
  tempDbPath,
  removeDb,
  runMain,
  writeResult,
  machineFacts,
  loadStreamer,
  loadBetterSqlite3,
  commandFor,
  numberArg,
};
