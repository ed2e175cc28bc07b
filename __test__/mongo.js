'use strict';
// A private MongoDB per test file: mongo-java-server (in memory, MongoDB 5.0 wire protocol) run by
// scripts/mongo.sh on a free loopback port, the oplog on unless asked otherwise (change streams).
// It can be restarted, or taken down and up, on the same port with its data and oplog kept.
// With MONGODB_URI set, startMongo({ oplog: true }) hands out that server instead (a real replica
// set), and restart/down/up reject. Fails loudly when the server cannot start.
// scripts/mongo-server/PROBE.md lists what the fake does differently from a real server.
const path = require('node:path');
const { execFileSync, spawn } = require('node:child_process');

const SCRIPT = path.join(__dirname, '..', 'scripts', 'mongo.sh');
const START_TIMEOUT_MS = 60_000;
const COMMAND_TIMEOUT_MS = 30_000;

let built = false;

/** Compiles the launcher once per process (fast when target/mongo-server is up to date). */
function build() {
  if (built) return;
  try {
    execFileSync('bash', [SCRIPT, 'build'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: 600_000 });
  } catch (e) {
    throw new Error(`cannot build the MongoDB test server (scripts/mongo.sh build): ${e.stderr || e.message}`);
  }
  built = true;
}

function external(uri) {
  const unsupported = (what) => () =>
    Promise.reject(new Error(`${what}() is not supported against an external server (MONGODB_URI is set)`));
  return {
    port: null,
    uri,
    external: true,
    restart: unsupported('restart'),
    down: unsupported('down'),
    up: unsupported('up'),
    async stop() {},
  };
}

/**
 * Starts a server (on `port`, or a free one). Returns { port, uri, restart(), down(), up(), stop() }: restart closes the
 * listening socket and every client connection, then listens again on the same port with the
 * same data and oplog; down/up do the two halves; stop ends the process (safe to call twice).
 */
async function startMongo({ oplog = true, port: askedPort = 0 } = {}) {
  if (oplog && process.env.MONGODB_URI) return external(process.env.MONGODB_URI);
  build();
  const child = spawn('bash', [SCRIPT, 'run', String(askedPort), oplog ? 'oplog' : 'standalone'], {
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  let stderr = '';
  let exited = null; // { code, signal } once the process has ended
  const lines = []; // stdout lines not yet taken
  const waiters = []; // { resolve, reject } in order, one per expected line
  let buffer = '';

  const failAll = (err) => {
    while (waiters.length) waiters.shift().reject(err);
  };
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (d) => {
    stderr += d;
    if (stderr.length > 64_000) stderr = stderr.slice(-32_000);
  });
  child.stdout.setEncoding('utf8');
  child.stdout.on('data', (d) => {
    buffer += d;
    let nl;
    while ((nl = buffer.indexOf('\n')) >= 0) {
      const line = buffer.slice(0, nl).trim();
      buffer = buffer.slice(nl + 1);
      if (waiters.length) waiters.shift().resolve(line);
      else lines.push(line);
    }
  });
  child.stdin.on('error', () => {}); // EPIPE after the process died: reported through 'exit'
  child.on('error', (e) => failAll(new Error(`cannot run the MongoDB test server: ${e.message}`)));
  child.on('exit', (code, signal) => {
    exited = { code, signal };
    failAll(new Error(`the MongoDB test server exited (code ${code}, signal ${signal})\nstderr: ${stderr}`));
  });

  function nextLine(what, timeoutMs) {
    if (lines.length) return Promise.resolve(lines.shift());
    if (exited) {
      return Promise.reject(new Error(`the MongoDB test server exited (code ${exited.code}, signal ${exited.signal})\nstderr: ${stderr}`));
    }
    return new Promise((resolve, reject) => {
      const waiter = {
        resolve: (line) => {
          clearTimeout(timer);
          resolve(line);
        },
        reject: (err) => {
          clearTimeout(timer);
          reject(err);
        },
      };
      const timer = setTimeout(() => {
        const i = waiters.indexOf(waiter);
        if (i >= 0) waiters.splice(i, 1);
        reject(new Error(`the MongoDB test server did not answer ${what} within ${timeoutMs} ms\nstderr: ${stderr}`));
      }, timeoutMs);
      waiters.push(waiter);
    });
  }

  let stopped = false;
  function kill() {
    stopped = true;
    if (!exited) child.kill('SIGKILL');
  }

  let port;
  try {
    const ready = await nextLine('READY', START_TIMEOUT_MS);
    const m = /^READY (\d+)$/.exec(ready);
    if (!m) throw new Error(`unexpected first line from the MongoDB test server: ${ready}\nstderr: ${stderr}`);
    port = Number(m[1]);
  } catch (e) {
    kill();
    throw new Error(`cannot start the MongoDB test server: ${e.message}`);
  }
  // Not kept alive by the server: a test process may end with it still running; the launcher
  // then sees the end of its stdin and exits.
  child.unref();
  child.stdout.unref?.();
  child.stderr.unref?.();
  child.stdin.unref?.();

  // One command at a time, in order.
  let queue = Promise.resolve();
  function command(cmd) {
    const run = async () => {
      if (stopped || exited) throw new Error(`the MongoDB test server is stopped; cannot ${cmd}`);
      child.stdin.write(`${cmd}\n`);
      const answer = await nextLine(cmd, COMMAND_TIMEOUT_MS);
      if (answer !== 'OK') throw new Error(`the MongoDB test server failed to ${cmd}: ${answer}\nstderr: ${stderr}`);
    };
    const p = queue.then(run, run);
    queue = p.catch(() => {});
    return p;
  }

  return {
    port,
    uri: `mongodb://127.0.0.1:${port}`,
    external: false,
    /** Closes the listener and all connections, then listens again; data and oplog survive. */
    restart: () => command('restart'),
    /** Closes the listener and all connections (clients get connection errors until up()). */
    down: () => command('down'),
    /** Listens again on the same port with the same data and oplog. */
    up: () => command('up'),
    /** Ends the process; safe to call twice. */
    async stop() {
      if (stopped) return;
      stopped = true;
      if (exited) return;
      const done = new Promise((resolve) => child.once('exit', resolve));
      child.stdin.end(); // the launcher shuts down at the end of its stdin
      const timer = setTimeout(() => child.kill('SIGKILL'), 5_000);
      await done;
      clearTimeout(timer);
    },
  };
}

module.exports = { startMongo };
