'use strict';
// Child processes and private servers of the benchmark scripts: a registry of the children to
// stop (also on exit, failure and SIGINT/SIGTERM), private servers started with the repository's
// scripts (scripts/mariadb.sh, scripts/redis.sh) on a free port of 127.0.0.1, and the CPU time of
// another process from /proc. Nothing here measures anything by itself.

const fs = require('node:fs');
const os = require('node:os');
const net = require('node:net');
const path = require('node:path');
const { execFileSync } = require('node:child_process');

const HOST = '127.0.0.1';

// ---------------------------------------------------------------------------------------------
// Child processes

const CHILDREN = new Set(); // running child processes, stopped by killChildren()

/** Registers a child process to be stopped by killChildren(); it leaves the registry when it exits. */
function track(child) {
  CHILDREN.add(child);
  child.on('exit', () => CHILDREN.delete(child));
  return child;
}

function untrack(child) {
  CHILDREN.delete(child);
}

/** SIGKILLs every registered child (a child with `killGroup` set: its whole process group). */
function killChildren() {
  for (const c of CHILDREN) {
    try {
      if (c.killGroup) process.kill(-c.pid, 'SIGKILL');
      else c.kill('SIGKILL');
    } catch {
      // already gone
    }
  }
  CHILDREN.clear();
}

// ---------------------------------------------------------------------------------------------
// Private servers

const SERVERS = []; // private servers, stopped by stopServers()

/** Stops every private server, the last started first. */
function stopServers() {
  for (const srv of SERVERS.splice(0).reverse()) srv.stop();
}

/**
 * From now on, the exit of this process and SIGINT/SIGTERM stop every registered child and
 * private server, then run `also()`; on a signal the process then exits with 130 (SIGINT) or 143.
 */
function stopAllOnExit(also = () => {}) {
  const cleanup = () => {
    killChildren();
    stopServers();
    also();
  };
  process.on('exit', cleanup);
  const onSignal = (sig) => {
    cleanup();
    process.exit(sig === 'SIGINT' ? 130 : 143);
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
}

/** A free TCP port on 127.0.0.1 (the OS picks it; the probe socket is closed before it resolves). */
function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, HOST, () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

function sh(script, args) {
  return execFileSync('bash', [script, ...args], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: 120_000 });
}

/**
 * Starts a private server with `bash script start DIR PORT ...extra` (DIR a fresh temp dir
 * `usp-bench-<name>-*`, PORT a free port on 127.0.0.1) and registers it for stopServers(). Returns
 * { name, dir, port, stop(), pid() }: stop() runs `script stop DIR` (once) and removes DIR; pid()
 * reads `pidFile` in DIR (null when unreadable). A server that failed to start is stopped at once.
 * Messages name it `label`.
 */
async function startPrivateServer({ name, label = name, script, extra = [], pidFile = null }) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `usp-bench-${name}-`));
  const port = await freePort();
  const server = { name, dir, port, running: true }; // a half-started server is stopped too
  server.stop = () => {
    if (server.running) {
      server.running = false;
      try {
        sh(script, ['stop', dir]);
      } catch (e) {
        console.error(`[bench] stopping ${label} failed: ${e.stderr || e.message}`);
      }
    }
    try {
      fs.rmSync(dir, { recursive: true, force: true });
    } catch {
      // leave it
    }
  };
  server.pid = () => {
    if (!pidFile) return null;
    try {
      return Number(fs.readFileSync(path.join(dir, pidFile), 'utf8').trim());
    } catch {
      return null;
    }
  };
  SERVERS.push(server);
  try {
    sh(script, ['start', dir, String(port), ...extra]);
  } catch (e) {
    server.stop();
    throw new Error(`cannot start the private ${label}: ${e.stderr || e.message}`);
  }
  return server;
}

// ---------------------------------------------------------------------------------------------
// CPU time of other processes

// Read once at load, so that no measured window pays for running getconf.
const CLK_TCK = (() => {
  try {
    return Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
  } catch {
    return 100;
  }
})();

/** CPU time (user + system, all threads) of process `pid` in ms, from /proc/<pid>/stat; NaN when unknown. */
function processCpuMs(pid) {
  if (!pid) return NaN;
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return ((Number(f[11]) + Number(f[12])) * 1000) / CLK_TCK; // utime, stime (fields 14, 15)
  } catch {
    return NaN;
  }
}

module.exports = {
  track,
  untrack,
  killChildren,
  stopServers,
  stopAllOnExit,
  freePort,
  startPrivateServer,
  processCpuMs,
};
