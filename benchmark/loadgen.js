'use strict';
// Driving the fan-out load generator (benchmark/loadgen, a small Rust program) from fanout.js and
// redis.js: building it on first use (cargo, into target/loadgen) and running it as a child process
// (registered in processes.js, so it is stopped on exit, failure and signals) whose `ready` line
// and JSON result line are read from its stdout, and checking that result. Nothing here measures
// anything by itself.

const fs = require('node:fs');
const path = require('node:path');
const { spawn, spawnSync } = require('node:child_process');
const { ROOT } = require('./common');
const { track, untrack } = require('./processes');

const LOADGEN_DIR = path.join(__dirname, 'loadgen');
const LOADGEN_TARGET = path.join(ROOT, 'target', 'loadgen');
const LOADGEN_BIN = path.join(LOADGEN_TARGET, 'release', 'usp-fanout-loadgen');
/** How to build it by hand, from the repository root. */
const BUILD_COMMAND = 'cargo build --release --manifest-path benchmark/loadgen/Cargo.toml --target-dir target/loadgen';

/**
 * Builds the load generator when its binary is missing or older than its sources. Resolves
 * { built, seconds }. Without cargo it throws `cargoMissing` (a message naming BUILD_COMMAND).
 */
async function ensureLoadgen(cargoMissing) {
  const sources = [path.join(LOADGEN_DIR, 'Cargo.toml'), path.join(LOADGEN_DIR, 'Cargo.lock'), path.join(LOADGEN_DIR, 'src', 'main.rs')];
  const newest = Math.max(...sources.map((f) => fs.statSync(f).mtimeMs));
  if (fs.existsSync(LOADGEN_BIN) && fs.statSync(LOADGEN_BIN).mtimeMs >= newest) return { built: false, seconds: 0 };
  const probe = spawnSync('cargo', ['--version'], { encoding: 'utf8' });
  if (probe.error || probe.status !== 0) throw new Error(cargoMissing);
  const args = ['build', '--release', '--locked', '--manifest-path', path.join(LOADGEN_DIR, 'Cargo.toml'), '--target-dir', LOADGEN_TARGET];
  console.log(`building the load generator: cargo ${args.map((a) => path.relative(ROOT, a) || a).join(' ')}`);
  const t0 = Date.now();
  // Not spawnSync: a SIGTERM during the build must stop cargo too (see killChildren).
  // Its own process group, so that killChildren stops the compilers it started as well.
  const cargo = spawn('cargo', args, { cwd: ROOT, stdio: ['ignore', 'inherit', 'inherit'], detached: true });
  cargo.killGroup = true;
  track(cargo);
  const timer = setTimeout(() => cargo.kill('SIGKILL'), 900_000);
  const status = await new Promise((resolve) => {
    cargo.on('error', (e) => resolve(e.message));
    cargo.on('exit', (code, sig) => resolve(code === 0 ? 0 : sig || `exit code ${code}`));
  });
  clearTimeout(timer);
  untrack(cargo);
  if (status !== 0) throw new Error(`building the load generator failed (${status})`);
  return { built: true, seconds: (Date.now() - t0) / 1000 };
}

/**
 * Starts one load generator process: `clients` clients on `url` in `mode` (usp, raw, socketio),
 * each expecting `expect` events, bounded by `timeoutMs`, on `threads` threads; it exits when its
 * stdin closes. Returns { child, ready, resultWithin(ms), kill() }: `ready` resolves on its `ready`
 * line (and rejects when it exits first); `resultWithin(ms)` resolves its JSON result line (with
 * exitCode and stderr) once it exited, and kills it and rejects when that takes longer than ms.
 */
function startLoadgen({ url, clients, mode, expect, timeoutMs, threads }) {
  const args = ['--url', url, '--clients', String(clients), '--mode', mode, '--expect', String(expect)];
  args.push('--timeout', String(Math.ceil(timeoutMs / 1000)), '--threads', String(threads), '--exit-on-stdin-eof');
  const child = spawn(LOADGEN_BIN, args, { stdio: ['pipe', 'pipe', 'pipe'] });
  track(child);
  let out = '';
  let err = '';
  let result = null;
  let onReady;
  let onFail;
  const ready = new Promise((resolve, reject) => {
    onReady = resolve;
    onFail = reject;
  });
  ready.catch(() => {}); // awaited by the caller; an early exit must not be an unhandled rejection
  child.stdout.setEncoding('utf8');
  child.stdout.on('data', (d) => {
    out += d;
    let nl;
    while ((nl = out.indexOf('\n')) >= 0) {
      const line = out.slice(0, nl).trim();
      out = out.slice(nl + 1);
      if (line === 'ready') onReady();
      else if (line.startsWith('{')) {
        try {
          result = JSON.parse(line);
        } catch {
          err += `unparsable line: ${line.slice(0, 200)}\n`;
        }
      }
    }
  });
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (d) => {
    if (err.length < 4000) err += d;
  });
  const exited = new Promise((resolve) => {
    child.on('exit', (code, signal) => {
      onFail(new Error(`load generator exited (${signal || code}) before it was ready: ${err.trim().slice(0, 500) || 'no message'}`));
      resolve({ code, signal });
    });
    child.on('error', (e) => {
      onFail(e);
      resolve({ code: null, signal: null, error: e.message });
    });
  });
  const resultWithin = async (ms) => {
    let timer;
    const bound = new Promise((resolve) => (timer = setTimeout(() => resolve(null), ms)));
    const ex = await Promise.race([exited, bound]);
    clearTimeout(timer);
    if (!ex) {
      child.kill('SIGKILL');
      throw new Error(`load generator did not finish within ${ms / 1000} s`);
    }
    if (!result) throw new Error(`load generator gave no result (exit ${ex.signal || ex.code}): ${err.trim().slice(0, 500)}`);
    return { ...result, exitCode: ex.code, stderr: err.trim() };
  };
  return { child, ready, resultWithin, kill: () => child.kill('SIGKILL') };
}

/**
 * The PROBLEMS of one load generator's result `lg` (startLoadgen with `clients`, `expect` and
 * `timeoutMs`): clients not ready, the time bound hit (then `after`, the caller's lines), clients
 * without exactly `expect` events, gap frames, client errors, clients closed by the server.
 */
function loadgenProblems(tag, lg, { clients, expect, timeoutMs, after = [] }) {
  const p = [];
  if (!lg.allReady) p.push(`${tag}: only ${lg.ready} of ${clients} clients ready`);
  if (lg.timedOut) p.push(`${tag}: not every client had every event after ${timeoutMs / 1000} s`);
  p.push(...after);
  if (lg.completeClients !== clients || lg.minPerClient !== expect || lg.maxPerClient !== expect) {
    p.push(`${tag}: ${lg.completeClients} of ${clients} clients got exactly ${expect} events (per client min ${lg.minPerClient}, max ${lg.maxPerClient})`);
  }
  if (lg.gaps) p.push(`${tag}: ${lg.gaps} gap frames`);
  if (lg.errors) p.push(`${tag}: ${lg.errors} client errors (${lg.firstErrors.join('; ')})`);
  const codes = Object.entries(lg.closeCodes || {});
  if (codes.length) p.push(`${tag}: clients closed by the server: ${codes.map(([c, n]) => `${n} x ${c}`).join(', ')}`);
  return p;
}

module.exports = { LOADGEN_BIN, BUILD_COMMAND, ensureLoadgen, startLoadgen, loadgenProblems };
