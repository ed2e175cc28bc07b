'use strict';
// Runs the benchmarks one after the other, each in its own Node process, then collects
// benchmark/results/<name>.json into one markdown table (benchmark/results/summary.md).
//
//   node benchmark/run-all.js

const fs = require('node:fs');
const path = require('node:path');
const { spawnSync } = require('node:child_process');
const { ROOT, RESULTS_DIR, fmt, machineFacts, commandFor } = require('./common');

const BENCHMARKS = [
  { name: 'latency', file: path.join(__dirname, 'latency.js') },
  { name: 'delivery', file: path.join(__dirname, 'delivery.js') },
  { name: 'push-throughput', file: path.join(__dirname, 'push-throughput.js') },
  // Starts its own MariaDB and runs about 3 minutes (--budget=170 s), so it gets a longer bound;
  // stopped with SIGTERM, on which it stops its server before exiting (SIGKILL would leave it running).
  { name: 'mysql', file: path.join(__dirname, 'mysql.js'), timeoutMs: 240_000, killSignal: 'SIGTERM' },
  // Starts a new mongo-java-server (a JVM) per run and runs about 1.5 minutes (--budget=150 s);
  // SIGTERM for the same reason: it stops its servers and its writer process before exiting.
  { name: 'mongodb', file: path.join(__dirname, 'mongodb.js'), timeoutMs: 240_000, killSignal: 'SIGTERM' },
  // A server process and the Rust load generator per run, about 3 minutes (--budget=300 s), plus
  // building the load generator on first use (about 30 s); SIGTERM so it stops its children.
  { name: 'fanout', file: path.join(__dirname, 'fanout.js'), timeoutMs: 420_000, killSignal: 'SIGTERM' },
  // Starts its own MariaDB and Redis and up to 3 instance processes plus 3 load generators per
  // run (--budget=400 s, plus building the load generator if fanout.js has not); SIGTERM so it
  // stops its children and servers.
  { name: 'redis', file: path.join(__dirname, 'redis.js'), timeoutMs: 540_000, killSignal: 'SIGTERM' },
];
const CHILD_TIMEOUT_MS = 150_000; // a child that runs longer than this (or its own timeoutMs) is stopped and reported

function cell(v, unit) {
  if (typeof v === 'string') return v;
  if (typeof v !== 'number' || Number.isNaN(v)) return 'n/a';
  if (unit === 'x') return `${v.toFixed(2)}x`;
  if (Math.abs(v) >= 1000) return Math.round(v).toLocaleString('en-US');
  return v.toFixed(2);
}

function escapeMd(s) {
  return String(s).replace(/\|/g, '\\|');
}

function main() {
  const started = new Date();
  const loadAtStart = machineFacts().loadAverage1m;
  const runs = [];
  for (const b of BENCHMARKS) {
    const command = commandFor(b.file);
    console.log(`\n=== ${command} ===`);
    const t0 = Date.now();
    const r = spawnSync(process.execPath, [b.file], {
      cwd: ROOT,
      stdio: 'inherit',
      timeout: b.timeoutMs || CHILD_TIMEOUT_MS,
      killSignal: b.killSignal || 'SIGKILL',
    });
    const seconds = (Date.now() - t0) / 1000;
    const file = path.join(RESULTS_DIR, `${b.name}.json`);
    let result = null;
    try {
      result = JSON.parse(fs.readFileSync(file, 'utf8'));
      // Only a result written by this run counts.
      if (!result.date || new Date(result.date).getTime() < started.getTime() - 1000) result = null;
    } catch {
      result = null;
    }
    let status;
    if (r.error && r.error.code === 'ETIMEDOUT') status = `stopped after ${(b.timeoutMs || CHILD_TIMEOUT_MS) / 1000} s`;
    else if (r.error) status = `could not run: ${r.error.message}`;
    else if (r.signal) status = `killed by ${r.signal}`;
    else if (r.status !== 0) status = `exit code ${r.status}`;
    else status = 'ok';
    if (!result && status === 'ok') status = 'no result file written';
    runs.push({ ...b, command, seconds, status, result });
    console.log(`=== ${b.name}: ${status} (${seconds.toFixed(1)} s) ===`);
  }

  const m = machineFacts();
  m.loadAverage1m = loadAtStart;
  const lines = [];
  lines.push('# ultimate-streaming benchmark results');
  lines.push('');
  lines.push(`- Date: ${started.toISOString()}`);
  lines.push(`- Machine: ${m.cpuCount} × ${m.cpuModel}, ${m.totalMemoryGiB} GiB RAM, ${m.platform}`);
  lines.push(`- Node: ${m.node}`);
  lines.push(
    `- 1-minute load average (other work on the machine skews the numbers) before the suite: ${m.loadAverage1m}; at the start of each script: ` +
      runs.map((r) => `${r.name} ${r.result && r.result.machine ? r.result.machine.loadAverage1m : 'n/a'}`).join(', '),
  );
  lines.push(`- Produced by: \`${commandFor(__filename)}\` (each row's own command is in the last column)`);
  lines.push('- Every number is the median over the rounds of its script (3 by default); ratios compare modes measured in the same run.');
  lines.push('');
  lines.push('| Benchmark | Metric | Median | Unit | Command |');
  lines.push('|---|---|---:|---|---|');
  for (const run of runs) {
    if (!run.result || !Array.isArray(run.result.summary)) {
      lines.push(`| ${run.name} | (no result: ${escapeMd(run.status)}) | | | \`${run.command}\` |`);
      continue;
    }
    for (const row of run.result.summary) {
      lines.push(`| ${run.name} | ${escapeMd(row.metric)} | ${cell(row.value, row.unit)} | ${row.unit} | \`${run.result.command || run.command}\` |`);
    }
  }
  lines.push('');
  lines.push('| Benchmark | Status | Wall time (s) | Rounds skipped for time |');
  lines.push('|---|---|---:|---|');
  for (const run of runs) {
    const skipped = run.result && run.result.skippedForTime && run.result.skippedForTime.length ? run.result.skippedForTime.join(', ') : '-';
    lines.push(`| ${run.name} | ${escapeMd(run.status)} | ${fmt(run.seconds, 1)} | ${escapeMd(skipped)} |`);
  }
  const problems = runs.flatMap((run) => (run.result && run.result.problems ? run.result.problems.map((p) => `${run.name}: ${p}`) : []));
  if (problems.length) {
    lines.push('');
    lines.push('## Problems reported by the scripts');
    lines.push('');
    for (const p of problems) lines.push(`- ${escapeMd(p)}`);
  }
  lines.push('');
  lines.push('Per-round numbers and engine counters are in `benchmark/results/<name>.json`.');
  lines.push('');

  const md = lines.join('\n');
  fs.mkdirSync(RESULTS_DIR, { recursive: true });
  const out = path.join(RESULTS_DIR, 'summary.md');
  fs.writeFileSync(out, md);
  console.log(`\n${md}`);
  console.log(`wrote ${path.relative(ROOT, out)}`);
  if (runs.some((r) => r.status !== 'ok') || problems.length) process.exitCode = 1;
}

main();
