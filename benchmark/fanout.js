'use strict';
// Fan-out: deliveries per second of small change frames from one server process to many
// subscribed WebSocket clients in another process, and the server's CPU time per delivery;
// ultimate-streaming's hub against `ws`, socket.io and uWebSockets.js doing the same broadcast.
//
// Per run (one mode, one round):
//   1. A fresh server process (a child Node process forked from this script, nothing else in it)
//      starts the server on 127.0.0.1 and a free port.
//   2. The load generator (benchmark/loadgen, a small Rust program built by this script on first
//      use; building and driving it: benchmark/loadgen.js) starts as another process and opens
//      CLIENTS WebSocket connections (64 at a time), each brought to the point where it receives
//      the broadcast: `usp` subscribes to `kv:*` and waits for `subscribed`; socket.io joins the
//      default namespace; `ws` and uWS need the handshake only. It prints `ready`; then the server
//      is asked how many clients it has (must be CLIENTS).
//   3. The server sends EVENTS change events, each about EVENT_BYTES bytes of JSON, as fast as it
//      takes them, to every client:
//        usp        ultimate-streaming: a streamer on `connection: { path: ':memory:' }` with
//                   `listen({ port: 0, slowConsumer: { policy: 'disconnect', maxQueueBytes: 64 MiB } })`
//                   (a client that fell that far behind would be disconnected, so a drop shows);
//                   the events are produced by `await streamer.push(key, value)` calls issued
//                   CHUNK at a time (Promise.all per chunk), distinct keys; the engine commits them
//                   and its hub (native, in the same process) sends them to the clients, batching
//                   the events that are ready at the same time into one frame
//                   (`{"type":"events","events":[…]}`);
//        ws         npm `ws` WebSocketServer (no compression); per event one JSON text, built once
//                   into a Buffer, `for (const c of wss.clients) c.send(buf, { binary: false })`;
//        socket.io  `io.emit('change', event)` per event (websocket transport only, no compression);
//        uWS        uWebSockets.js (@trufflesuite/uws-js-unofficial, its native binary; the script
//                   refuses its JS fallback): every client subscribes to topic `changes` on open,
//                   `app.publish('changes', json)` per event, maxBackpressure 64 MiB with
//                   closeOnBackpressureLimit (a drop would close the client).
//      The peers send one WebSocket message per event; the event JSON has the same fields and size
//      as ours (type, key, data, version, seq, source, timestamp, latency). Flow control of the
//      peers: every 8 events the loop yields once (setImmediate) so the sockets get written, and
//      when any client has more than 256 KiB pending (ws: bufferedAmount; socket.io: its write
//      buffer plus bufferedAmount; uWS: getBufferedAmount()) it waits until all are below 64 KiB.
//      Ours has its own bounded per-client queues (above); the JS side only awaits push().
//   4. The load generator counts deliveries per client (usp: events in the frames; the peers: one
//      per message) and stops when every client has all EVENTS or after --timeout seconds.
// Measured per run:
//   deliveries/s          total deliveries / (last delivery - first delivery), both taken by the
//                         load generator (over all clients);
//   start -> last         total deliveries / (last delivery - broadcast start), wall clocks of the
//                         server and load generator processes;
//   server CPU/delivery   CPU time (user + system, all threads) of the server process from the
//                         broadcast start until the load generator finished, / deliveries
//                         (process.cpuUsage() inside it; for ours this includes the pushes, the
//                         SQLite commits and the change capture, which the peers do not do);
//   load generator CPU    the same for the load generator process, from `ready` to its end;
//   frames/s              messages received / (last - first) (ours: events per frame vary);
//   bytes/delivery        payload bytes per delivery (ours: the hub's byte counter / deliveries).
// Complete = every client got every event exactly once by count (deliveries = CLIENTS x EVENTS,
// every client EVENTS); anything else (missing, extra, gaps, disconnects, push errors) is listed
// as PROBLEMS and the exit code is 1. Server, load generator and this script share one machine
// (on 2 cores: they compete, which is why CPU per delivery is reported next to the rate).
// The modes alternate their order round by round; medians over the rounds are reported and
// ratios are computed from the medians of this run. Every wait is bounded by --timeout; after
// round 1 a run that would pass --budget seconds (judged by the longest earlier run of that mode)
// is skipped and listed. All traffic goes to 127.0.0.1. Child processes are stopped at the end,
// on failure and on SIGINT/SIGTERM.
//
//   node benchmark/fanout.js [--rounds=3] [--clients=1000] [--events=1500] [--event-bytes=150]
//     [--chunk=500] [--timeout=60] [--budget=300] [--loadgen-threads=2] [--modes=usp,ws,socket.io,uWS]

const path = require('node:path');
const { fork } = require('node:child_process');
const {
  ROOT,
  wallMs,
  sleep,
  withTimeout,
  median,
  fmt,
  printTable,
  runMain,
  printProblems,
  writeResult,
  machineFacts,
  loadStreamer,
  commandFor,
  numberArg,
  stringArg,
  budgetedRuns,
  roundOrder,
} = require('./common');
const { track, killChildren, stopAllOnExit } = require('./processes');
const { BUILD_COMMAND, ensureLoadgen, startLoadgen, loadgenProblems } = require('./loadgen.js');

const ROUNDS = Math.floor(numberArg('rounds', 3));
const CLIENTS = Math.floor(numberArg('clients', 1000));
const EVENTS = Math.floor(numberArg('events', 1500));
const EVENT_BYTES = Math.floor(numberArg('event-bytes', 150));
const CHUNK = Math.floor(numberArg('chunk', 500));
const TIMEOUT_MS = numberArg('timeout', 60) * 1000; // bound of every wait of one run
const BUDGET_MS = numberArg('budget', 300) * 1000;
const LOADGEN_THREADS = Math.floor(numberArg('loadgen-threads', 2));
const HOST = '127.0.0.1';
const HIGH_WATER = 256 * 1024; // a peer's broadcast pauses when a client has more pending than this
const LOW_WATER = 64 * 1024; // ... and resumes when every client is below this
const YIELD_EVERY = 8; // events between two yields (and pending checks) of a peer's send loop
const SLOW_QUEUE_BYTES = 64 << 20;

const ALL_MODES = [
  { name: 'usp', label: 'ultimate-streaming hub (events batched per frame)', loadgen: 'usp' },
  { name: 'ws', label: 'ws, one message per event', loadgen: 'raw' },
  { name: 'socket.io', label: "socket.io io.emit('change'), one message per event", loadgen: 'socketio' },
  { name: 'uWS', label: "uWebSockets.js app.publish(), one message per event", loadgen: 'raw' },
];

// ---------------------------------------------------------------------------------------------
// The event: the same JSON object for every mode (ours is encoded by the engine)

const KEY = (i) => `fan:${String(i).padStart(6, '0')}`;

/** The `p` string that makes an event of `eventBytes` bytes (our encoding, a mid-run seq). */
function padFor(eventBytes, events) {
  const probe = eventObject(Math.floor(events / 2), '', Date.now());
  const base = JSON.stringify(probe).length;
  return 'x'.repeat(Math.max(1, eventBytes - base));
}

// The shape of ours: { type, key, data, version, seq, source, timestamp, latency }.
function eventObject(i, pad, ts) {
  return { type: 'insert', key: KEY(i), data: { i, p: pad }, version: 1, seq: i + 1, source: 'sqlite', timestamp: ts + 0.5, latency: 0 };
}

// ---------------------------------------------------------------------------------------------
// The server process (this file run with --serve): one server, driven over IPC

function serve() {
  let impl = null;
  const reply = (m) => process.send && process.send(m);
  process.on('disconnect', () => process.exit(0)); // the driver is gone
  process.on('message', (msg) => {
    handle(msg).catch((e) => reply({ type: 'error', message: e && e.stack ? e.stack : String(e) }));
  });
  async function handle(msg) {
    if (msg.cmd === 'start') {
      impl = await SERVERS[msg.mode](msg);
      reply({ type: 'listening', port: impl.port, url: impl.url });
    } else if (msg.cmd === 'count') {
      reply({ type: 'count', n: impl.count() });
    } else if (msg.cmd === 'broadcast') {
      const cpuStart = process.cpuUsage();
      const startedAtMs = wallMs();
      const t0 = performance.now();
      const extra = await impl.broadcast();
      reply({ type: 'sent', cpuStart, startedAtMs, sendMs: performance.now() - t0, ...extra });
    } else if (msg.cmd === 'stats') {
      reply({ type: 'stats', cpu: process.cpuUsage(), rssMiB: process.memoryUsage().rss / 2 ** 20, ...(impl.stats ? impl.stats() : {}) });
    } else if (msg.cmd === 'stop') {
      if (impl) await impl.close();
      reply({ type: 'stopped' });
      setImmediate(() => process.exit(0));
    }
  }
}

/** Runs a peer's send loop: `sendOne(i)` per event, yields and pauses on `maxPending()`. */
async function peerLoop(events, sendOne, maxPending) {
  let pauses = 0;
  let pausedMs = 0;
  const bound = performance.now() + TIMEOUT_MS;
  for (let i = 0; i < events; i++) {
    sendOne(i);
    if (i % YIELD_EVERY === YIELD_EVERY - 1 || i === events - 1) {
      await new Promise((r) => setImmediate(r));
      if (maxPending() > HIGH_WATER) {
        pauses += 1;
        const p0 = performance.now();
        while (maxPending() > LOW_WATER) {
          if (performance.now() > bound) throw new Error(`clients did not drain within ${TIMEOUT_MS / 1000} s`);
          await sleep(1);
        }
        pausedMs += performance.now() - p0;
      }
    }
  }
  return { pauses, pausedMs };
}

const SERVERS = {
  async usp(o) {
    const U = await loadStreamer();
    const s = new U({ connection: { path: ':memory:' } });
    await s.init();
    const { port, url } = await s.listen({ port: 0, host: HOST, slowConsumer: { policy: 'disconnect', maxQueueBytes: SLOW_QUEUE_BYTES } });
    return {
      port,
      url,
      count: () => s.getStatus().hub.connections,
      async broadcast() {
        let pushErrors = 0;
        let firstPushError = null;
        for (let i = 0; i < o.events; i += o.chunk) {
          const ps = [];
          for (let j = i; j < Math.min(o.events, i + o.chunk); j++) ps.push(s.push(KEY(j), { i: j, p: o.pad }));
          for (const r of await Promise.allSettled(ps)) {
            if (r.status === 'rejected') {
              pushErrors += 1;
              firstPushError = firstPushError || String(r.reason && r.reason.message);
            }
          }
        }
        return { pushErrors, firstPushError };
      },
      stats() {
        const st = s.getStatus();
        return { hub: st.hub, engineEvents: st.events };
      },
      close: () => s.close(),
    };
  },

  async ws(o) {
    const { WebSocketServer } = require('ws');
    const wss = new WebSocketServer({ host: HOST, port: 0, perMessageDeflate: false, clientTracking: true, path: '/' });
    await new Promise((resolve, reject) => {
      wss.once('listening', resolve);
      wss.once('error', reject);
    });
    const { port } = wss.address();
    let closedEarly = 0;
    wss.on('connection', (c) => c.on('close', () => (closedEarly += 1)));
    let bytes = 0;
    return {
      port,
      url: `ws://${HOST}:${port}/`,
      count: () => wss.clients.size,
      broadcast() {
        return peerLoop(
          o.events,
          (i) => {
            const buf = Buffer.from(JSON.stringify(eventObject(i, o.pad, Date.now())));
            bytes = buf.length;
            for (const c of wss.clients) c.send(buf, { binary: false });
          },
          () => {
            let m = 0;
            for (const c of wss.clients) if (c.bufferedAmount > m) m = c.bufferedAmount;
            return m;
          },
        );
      },
      stats: () => ({ frameBytes: bytes, clientsClosed: closedEarly }),
      async close() {
        for (const c of wss.clients) c.terminate();
        await new Promise((r) => wss.close(r));
      },
    };
  },

  async 'socket.io'(o) {
    const http = require('node:http');
    const { Server } = require('socket.io');
    const httpServer = http.createServer();
    const io = new Server(httpServer, { transports: ['websocket'], perMessageDeflate: false, serveClient: false });
    await new Promise((resolve, reject) => {
      httpServer.once('error', reject);
      httpServer.listen(0, HOST, resolve);
    });
    const { port } = httpServer.address();
    let closedEarly = 0;
    io.on('connection', (sock) => sock.on('disconnect', () => (closedEarly += 1)));
    let bytes = 0;
    return {
      port,
      url: `ws://${HOST}:${port}/socket.io/?EIO=4&transport=websocket`,
      count: () => io.of('/').sockets.size,
      broadcast() {
        return peerLoop(
          o.events,
          (i) => {
            const e = eventObject(i, o.pad, Date.now());
            if (i === 0) bytes = `42${JSON.stringify(['change', e])}`.length;
            io.emit('change', e);
          },
          () => {
            let m = 0;
            for (const sock of io.of('/').sockets.values()) {
              const conn = sock.conn;
              const wsock = conn.transport && conn.transport.socket;
              const p = conn.writeBuffer.length * bytes + (wsock ? wsock.bufferedAmount : 0);
              if (p > m) m = p;
            }
            return m;
          },
        );
      },
      stats: () => ({ frameBytes: bytes, clientsClosed: closedEarly }),
      async close() {
        await new Promise((r) => io.close(() => r()));
      },
    };
  },

  async uWS(o) {
    // The native binary only: the package's JS fallback (on `ws`) would be a different server.
    const pkgDir = path.dirname(require.resolve('@trufflesuite/uws-js-unofficial/package.json'));
    const bin = path.join(pkgDir, 'binaries', `uws_${process.platform}_${process.arch}_${process.versions.modules}.node`);
    const uWS = require(bin);
    const sockets = new Set();
    let closedEarly = 0;
    const app = uWS.App();
    app.ws('/*', {
      compression: uWS.DISABLED,
      maxPayloadLength: 16 * 1024,
      maxBackpressure: SLOW_QUEUE_BYTES,
      closeOnBackpressureLimit: true,
      idleTimeout: 120,
      open: (ws) => {
        ws.subscribe('changes');
        sockets.add(ws);
      },
      close: (ws) => {
        sockets.delete(ws);
        closedEarly += 1;
      },
    });
    const token = await new Promise((resolve, reject) => {
      app.listen(HOST, 0, (t) => (t ? resolve(t) : reject(new Error('uWS: listen failed'))));
    });
    const port = uWS.us_socket_local_port(token);
    let bytes = 0;
    return {
      port,
      url: `ws://${HOST}:${port}/`,
      count: () => app.numSubscribers('changes'),
      broadcast() {
        return peerLoop(
          o.events,
          (i) => {
            const json = JSON.stringify(eventObject(i, o.pad, Date.now()));
            bytes = json.length;
            app.publish('changes', json, false, false);
          },
          () => {
            let m = 0;
            for (const ws of sockets) {
              const b = ws.getBufferedAmount();
              if (b > m) m = b;
            }
            return m;
          },
        );
      },
      stats: () => ({ frameBytes: bytes, clientsClosed: closedEarly }),
      async close() {
        for (const ws of [...sockets]) ws.end(1001);
        uWS.us_listen_socket_close(token);
      },
    };
  },
};

// ---------------------------------------------------------------------------------------------
// The driver: the server process (children and the load generator: processes.js, loadgen.js)

/** A child's message of `type` (or its `error` message, exit, or the time bound). */
function nextMessage(child, type, timeoutMs) {
  return new Promise((resolve, reject) => {
    const done = (fn, v) => {
      clearTimeout(timer);
      child.off('message', onMsg);
      child.off('exit', onExit);
      fn(v);
    };
    const onMsg = (m) => {
      if (m && m.type === type) done(resolve, m);
      else if (m && m.type === 'error') done(reject, new Error(`server: ${m.message}`));
    };
    const onExit = (code, sig) => done(reject, new Error(`server process exited (${sig || code}) while waiting for ${type}`));
    const timer = setTimeout(() => done(reject, new Error(`no ${type} from the server within ${timeoutMs / 1000} s`)), timeoutMs);
    child.on('message', onMsg);
    child.on('exit', onExit);
  });
}

function request(child, msg, type, timeoutMs) {
  const p = nextMessage(child, type, timeoutMs);
  child.send(msg);
  return p;
}

async function runOnce(mode, pad) {
  const server = track(fork(__filename, ['--serve'], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'], execArgv: [] }));
  let lg = null;
  try {
    const listening = await request(server, { cmd: 'start', mode: mode.name, events: EVENTS, pad, chunk: CHUNK }, 'listening', 60_000);
    lg = startLoadgen({ url: listening.url, clients: CLIENTS, mode: mode.loadgen, expect: EVENTS, timeoutMs: TIMEOUT_MS, threads: LOADGEN_THREADS });
    await withTimeout(lg.ready, TIMEOUT_MS + 10_000, `load generator ready: no answer within ${(TIMEOUT_MS + 10_000) / 1000} s`);
    // The server must see every client before the first event.
    let serverClients = 0;
    const until = Date.now() + 10_000;
    while (Date.now() < until) {
      serverClients = (await request(server, { cmd: 'count' }, 'count', 10_000)).n;
      if (serverClients >= CLIENTS) break;
      await sleep(10);
    }
    if (serverClients !== CLIENTS) throw new Error(`the server sees ${serverClients} clients, expected ${CLIENTS}`);
    const sentP = request(server, { cmd: 'broadcast' }, 'sent', TIMEOUT_MS + 10_000);
    sentP.catch(() => {}); // awaited below; the load generator's outcome comes first
    const res = await lg.resultWithin(TIMEOUT_MS + 15_000);
    const sent = await sentP;
    const stats = await request(server, { cmd: 'stats' }, 'stats', 10_000);
    const cpuUs = stats.cpu.user - sent.cpuStart.user + (stats.cpu.system - sent.cpuStart.system);
    // Payload bytes per delivery (WebSocket headers not counted); ours: the hub's byte counter
    // (event frames, plus the welcome/subscribed frames, a negligible part) over its deliveries.
    const bytesPerDelivery = stats.hub ? stats.hub.bytes / Math.max(1, stats.hub.deliveries) : stats.frameBytes;
    return {
      mode: mode.name,
      clients: CLIENTS,
      events: EVENTS,
      expected: CLIENTS * EVENTS,
      deliveries: res.deliveries,
      messages: res.messages,
      completed: res.allReady && !res.timedOut && res.deliveries === CLIENTS * EVENTS && res.completeClients === CLIENTS,
      deliveriesPerSec: res.deliveriesPerSec,
      startToLastPerSec: res.lastDeliveryMs ? res.deliveries / ((res.lastDeliveryMs - sent.startedAtMs) / 1000) : NaN,
      framesPerSec: res.durationMs ? res.messages / (res.durationMs / 1000) : NaN,
      eventsPerFrame: res.messages ? res.deliveries / res.messages : NaN,
      bytesPerDelivery,
      firstDeliveryAfterStartMs: res.firstDeliveryMs - sent.startedAtMs,
      lastDeliveryAfterStartMs: res.lastDeliveryMs - sent.startedAtMs,
      durationMs: res.durationMs,
      serverSendMs: sent.sendMs,
      serverCpuMs: cpuUs / 1000,
      serverCpuUsPerDelivery: res.deliveries ? cpuUs / res.deliveries : NaN,
      serverCores: res.lastDeliveryMs ? cpuUs / 1000 / (res.lastDeliveryMs - sent.startedAtMs) : NaN,
      serverRssMiB: stats.rssMiB,
      loadgenCpuMs: res.cpuUserMs + res.cpuSystemMs,
      loadgenCpuUsPerDelivery: res.deliveries ? ((res.cpuUserMs + res.cpuSystemMs) * 1000) / res.deliveries : NaN,
      loadgenConnectMs: res.connectMs,
      flow: { pauses: sent.pauses, pausedMs: sent.pausedMs },
      pushErrors: sent.pushErrors || 0,
      firstPushError: sent.firstPushError || null,
      hub: stats.hub || null,
      engineEvents: stats.engineEvents || null,
      clientsClosedByServer: stats.clientsClosed,
      loadgen: res,
    };
  } finally {
    if (lg) lg.kill();
    if (server.exitCode === null && server.signalCode === null) {
      try {
        await request(server, { cmd: 'stop' }, 'stopped', 15_000);
      } catch {
        // it is killed below
      }
      await Promise.race([new Promise((r) => server.once('exit', r)), sleep(5_000)]);
      if (server.exitCode === null && server.signalCode === null) server.kill('SIGKILL');
    }
  }
}

function runProblems(tag, res) {
  const after = res.deliveries !== res.expected ? [`${tag}: ${res.deliveries} deliveries, expected ${res.expected} (${CLIENTS} x ${EVENTS})`] : [];
  const p = loadgenProblems(tag, res.loadgen, { clients: CLIENTS, expect: EVENTS, timeoutMs: TIMEOUT_MS, after });
  if (res.pushErrors) p.push(`${tag}: ${res.pushErrors} push() calls failed (${res.firstPushError})`);
  if (res.hub && (res.hub.slowDisconnects || res.hub.dropped || res.hub.gaps || res.hub.coalesced)) {
    p.push(`${tag}: hub slowDisconnects ${res.hub.slowDisconnects}, dropped ${res.hub.dropped}, gaps ${res.hub.gaps}, coalesced ${res.hub.coalesced}`);
  }
  return p;
}

// ---------------------------------------------------------------------------------------------

async function main() {
  const command = commandFor(__filename, process.argv.slice(2));
  const startedAt = new Date();
  const machine = machineFacts();
  const wanted = stringArg('modes', ALL_MODES.map((m) => m.name).join(',')).split(',');
  const MODES = ALL_MODES.filter((m) => wanted.includes(m.name));
  if (MODES.length === 0) throw new Error(`--modes: none of ${wanted.join(',')} is one of ${ALL_MODES.map((m) => m.name).join(',')}`);
  if (MODES.some((m) => m.name === 'usp')) await loadStreamer(); // fail early when the native binary is missing
  stopAllOnExit();
  const build = await ensureLoadgen(
    'cargo not found: benchmark/fanout.js needs Rust to build its load generator (benchmark/loadgen) on first use. ' +
      `Install Rust (https://rustup.rs) and run again, or build it yourself: ${BUILD_COMMAND}`,
  );
  if (build.built) console.log(`load generator built in ${build.seconds.toFixed(1)} s (not part of any measurement)`);
  const pad = padFor(EVENT_BYTES, EVENTS);
  const sample = JSON.stringify(eventObject(Math.floor(EVENTS / 2), pad, Date.now()));
  console.log(
    `fanout: ${ROUNDS} rounds; ${CLIENTS} clients (load generator: a separate Rust process, ${LOADGEN_THREADS} threads); ` +
      `${EVENTS} events of ~${sample.length} bytes each -> ${fmt(CLIENTS * EVENTS, 0)} deliveries per run; modes ${MODES.map((m) => m.name).join(', ')}`,
  );

  const runs = [];
  const problems = [];
  const skipped = [];
  const { timed, broken } = budgetedRuns({ budgetMs: BUDGET_MS, pad: 9, problems, skipped });
  for (let r = 1; r <= ROUNDS; r++) {
    for (const mode of roundOrder(MODES, r)) {
      const tag = `round ${r} ${mode.name}`;
      const start = Date.now();
      const res = await timed(mode.name, r, () => runOnce(mode, pad));
      if (!res) continue;
      res.round = r;
      res.runSeconds = (Date.now() - start) / 1000;
      runs.push(res);
      const ps = runProblems(tag, res);
      problems.push(...ps);
      if (!res.completed) broken.add(mode.name);
      console.log(
        `  ${tag.padEnd(17)} ${res.completed ? `${fmt(res.deliveriesPerSec, 0)} deliveries/s` : 'INCOMPLETE'}` +
          `  (${fmt(res.deliveries, 0)} in ${fmt(res.durationMs, 0)} ms; ${fmt(res.framesPerSec, 0)} frames/s, ${fmt(res.eventsPerFrame, 1)} events/frame;` +
          ` server CPU ${fmt(res.serverCpuUsPerDelivery, 3)} us/delivery, ${fmt(res.serverCores)} cores; loadgen CPU ${fmt(res.loadgenCpuUsPerDelivery, 3)} us/delivery;` +
          ` last delivery ${fmt(res.lastDeliveryAfterStartMs, 0)} ms after start; run ${fmt(res.runSeconds, 1)} s)`,
      );
    }
  }
  killChildren();

  // ---- medians
  const byMode = {};
  for (const m of MODES) {
    const rs = runs.filter((x) => x.mode === m.name);
    const ok = rs.filter((x) => x.completed);
    const all = rs.length > 0 && ok.length === rs.length;
    const med = (f) => median(rs.map(f));
    byMode[m.name] = {
      label: m.label,
      rounds: rs.length,
      completedRounds: ok.length,
      deliveriesPerSec: all ? med((x) => x.deliveriesPerSec) : NaN,
      startToLastPerSec: all ? med((x) => x.startToLastPerSec) : NaN,
      serverCpuUsPerDelivery: all ? med((x) => x.serverCpuUsPerDelivery) : NaN,
      serverCores: med((x) => x.serverCores),
      loadgenCpuUsPerDelivery: med((x) => x.loadgenCpuUsPerDelivery),
      framesPerSec: med((x) => x.framesPerSec),
      eventsPerFrame: med((x) => x.eventsPerFrame),
      bytesPerDelivery: med((x) => x.bytesPerDelivery),
      lastDeliveryAfterStartMs: med((x) => x.lastDeliveryAfterStartMs),
      serverSendMs: med((x) => x.serverSendMs),
      serverRssMiB: med((x) => x.serverRssMiB),
    };
  }
  const ours = byMode.usp;
  const ratios = {};
  for (const m of MODES) {
    if (m.name === 'usp' || !ours) continue;
    const x = byMode[m.name];
    ratios[m.name] = {
      deliveriesPerSecOursOverPeer: ours.deliveriesPerSec / x.deliveriesPerSec,
      serverCpuPerDeliveryPeerOverOurs: x.serverCpuUsPerDelivery / ours.serverCpuUsPerDelivery,
    };
  }

  if (skipped.length) console.log(`\nnote: ${skipped.length} run(s) skipped for time (${skipped.join(', ')}); medians use the rounds that ran`);
  printTable(
    `fan-out to ${CLIENTS} clients (another process), ${EVENTS} events of ~${sample.length} bytes, median of rounds`,
    ['server', 'rounds', 'deliveries/s', 'start->last /s', 'server CPU us/delivery', 'server cores', 'loadgen CPU us/delivery', 'frames/s', 'events/frame', 'bytes/delivery'],
    MODES.map((m) => {
      const x = byMode[m.name];
      return [
        m.label,
        `${x.completedRounds}/${x.rounds}`,
        fmt(x.deliveriesPerSec, 0),
        fmt(x.startToLastPerSec, 0),
        fmt(x.serverCpuUsPerDelivery, 3),
        x.serverCores,
        fmt(x.loadgenCpuUsPerDelivery, 3),
        fmt(x.framesPerSec, 0),
        fmt(x.eventsPerFrame, 1),
        fmt(x.bytesPerDelivery, 0),
      ];
    }),
  );
  if (ours && Object.keys(ratios).length) {
    printTable(
      'ratios (from the medians; > 1 means ultimate-streaming is ahead)',
      ['peer', 'deliveries/s ours / peer', 'server CPU per delivery peer / ours'],
      Object.entries(ratios).map(([k, v]) => [k, `${fmt(v.deliveriesPerSecOursOverPeer)}x`, `${fmt(v.serverCpuPerDeliveryPeerOverOurs)}x`]),
    );
  }
  console.log(
    'deliveries/s = deliveries / (last - first delivery) at the clients; server CPU = user + system of the server process (all threads) ' +
      'from the broadcast start until the load generator finished, per delivery (ours includes push(), the SQLite commits and capture). ' +
      'Ours batches the events that are ready together into one frame; the peers send one message per event.',
  );

  const summary = [];
  for (const m of MODES) {
    const x = byMode[m.name];
    summary.push({ metric: `fan-out deliveries/s to ${CLIENTS} clients, ${m.label}`, value: x.deliveriesPerSec, unit: 'deliveries/s' });
    summary.push({ metric: `fan-out server CPU per delivery, ${m.label}`, value: x.serverCpuUsPerDelivery, unit: 'µs' });
  }
  for (const [k, v] of Object.entries(ratios)) {
    summary.push({ metric: `fan-out deliveries/s ratio ultimate-streaming / ${k}`, value: v.deliveriesPerSecOursOverPeer, unit: 'x' });
    summary.push({ metric: `fan-out server CPU per delivery ratio ${k} / ultimate-streaming`, value: v.serverCpuPerDeliveryPeerOverOurs, unit: 'x' });
  }

  printProblems(problems);
  const file = writeResult('fanout', {
    benchmark: 'fanout',
    date: startedAt.toISOString(),
    command,
    machine,
    config: {
      rounds: ROUNDS,
      clients: CLIENTS,
      events: EVENTS,
      eventBytes: sample.length,
      chunk: CHUNK,
      timeoutSeconds: TIMEOUT_MS / 1000,
      budgetSeconds: BUDGET_MS / 1000,
      loadgenThreads: LOADGEN_THREADS,
      peerFlowControl: { highWaterBytes: HIGH_WATER, lowWaterBytes: LOW_WATER, yieldEveryEvents: YIELD_EVERY },
      uspListen: { slowConsumer: { policy: 'disconnect', maxQueueBytes: SLOW_QUEUE_BYTES } },
      modes: MODES.map((m) => ({ name: m.name, label: m.label })),
      sampleEvent: sample,
      loadgenBuild: build,
    },
    ok: problems.length === 0,
    problems,
    skippedForTime: skipped,
    rounds: runs,
    medians: byMode,
    ratios,
    summary,
  });
  console.log(`\nwrote ${path.relative(ROOT, file)}`);
  if (problems.length) process.exitCode = 1;
}

if (process.argv.includes('--serve')) serve();
else runMain(main);
