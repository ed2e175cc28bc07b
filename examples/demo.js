'use strict';
// The live demo on the embedded default: a simulated market-data writer in ANOTHER process
// pushes price ticks into a SQLite file; this process listens, prints a sample of the changes
// and, every second, a status line with throughput and commit→listener latency.
//
// The same changes go to browsers through the native WebSocket hub: open the dashboard URL it
// prints to watch them live.
//
//   node examples/demo.js [--seconds 20] [--rate 500] [--db ./demo.db] [--port 8080]
const { fork } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');
const UltimateStreamer = require('..');

function arg(name, def) {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? process.argv[i + 1] : def;
}
const SYMBOLS = ['BTC', 'ETH', 'SOL', 'ADA', 'DOT', 'XRP', 'DOGE', 'AVAX'];

if (process.argv[2] === '--writer') {
  // The simulated writer: a separate process with its own streamer on the same file.
  (async () => {
    const [file, rate, seconds] = [process.argv[3], Number(process.argv[4]), Number(process.argv[5])];
    const w = new UltimateStreamer({ connection: { path: file } });
    await w.init();
    const prices = Object.fromEntries(SYMBOLS.map((s, i) => [s, 100 * (i + 1)]));
    const end = Date.now() + seconds * 1000;
    const interval = 1000 / rate;
    let next = Date.now();
    let n = 0;
    while (Date.now() < end) {
      const sym = SYMBOLS[n++ % SYMBOLS.length];
      prices[sym] = Math.max(0.01, prices[sym] * (1 + (Math.random() - 0.5) / 500));
      const bid = Number(prices[sym].toFixed(4));
      await w.push(`price:${sym}`, { bid, ask: Number((bid * 1.0005).toFixed(4)), tick: n });
      if (n % 997 === 0) await w.delete(`order:${n}`); // an occasional delete of a missing key: false
      if (n % 50 === 0) await w.push(`order:${n}`, { sym, qty: 1 + (n % 7) });
      next += interval;
      const wait = next - Date.now();
      if (wait > 0) await new Promise((r) => setTimeout(r, wait));
    }
    await w.close();
  })().catch((e) => {
    console.error('writer failed:', e.code || '', e.message);
    process.exit(1);
  });
  return;
}

(async () => {
  const seconds = Number(arg('seconds', 20));
  const rate = Number(arg('rate', 500));
  const file = path.resolve(arg('db', path.join(process.cwd(), 'ultimate-streaming-demo.db')));
  for (const f of [file, `${file}-wal`, `${file}-shm`]) fs.rmSync(f, { force: true });

  const streamer = new UltimateStreamer({ connection: { path: file } });
  let shown = 0;
  let lastShown = 0;
  streamer.on('change', { prefix: 'price:' }, (e) => {
    // Print about five changes a second; the rest are counted in the status line.
    if (Date.now() - lastShown < 200) return;
    lastShown = Date.now();
    shown++;
    console.log(`  ${e.type.padEnd(6)} ${e.key.padEnd(11)} v${String(e.version).padEnd(6)} bid=${e.data.bid}  (${e.latency.toFixed(3)} ms after commit)`);
  });
  streamer.on('change', { prefix: 'order:' }, (e) => {
    console.log(`  ${e.type.padEnd(6)} ${e.key.padEnd(11)} v${e.version} ${JSON.stringify(e.data)}`);
  });
  streamer.on('error', (err) => console.error('listener error:', err.message));
  await streamer.init();
  // Port 8080 unless it is taken: then any free one.
  const hub = await streamer
    .listen({ port: Number(arg('port', 8080)), dashboard: true })
    .catch(() => streamer.listen({ port: 0, dashboard: true }));
  console.log(`ultimate-streaming demo: embedded SQLite at ${file}`);
  console.log(`dashboard: http://127.0.0.1:${hub.port}/   (WebSocket stream: ${hub.url})`);
  console.log(`a writer process pushes ~${rate} changes/s for ${seconds} s; this process listens.\n`);

  const writer = fork(__filename, ['--writer', file, String(rate), String(seconds)], { stdio: 'inherit' });
  const statusTimer = setInterval(() => {
    const st = streamer.getStatus();
    console.log(
      `[status] mode=${st.mode} events/s=${st.events.perSecond} total=${st.events.emitted} hub clients=${st.hub.connections} ` +
        `latency p50=${st.latency.p50.toFixed(3)}ms p99=${st.latency.p99.toFixed(3)}ms max=${st.latency.max.toFixed(3)}ms ` +
        `batches=${st.events.batches} cache hit=${(st.cache.hitRatio * 100).toFixed(0)}% errors=${st.errors.fatal + st.errors.recoverable}`,
    );
  }, 1000);

  const code = await new Promise((resolve) => writer.on('exit', resolve));
  // Let the last changes arrive, then read one value back through the cache.
  await new Promise((r) => setTimeout(r, 200));
  clearInterval(statusTimer);
  const btc = await streamer.get('price:BTC');
  const st = streamer.getStatus();
  await streamer.close();
  console.log(`\nwriter exited (${code}); ${st.events.emitted} changes delivered, ${shown} printed; price:BTC = ${JSON.stringify(btc)}`);
  console.log(`latency commit→listener: p50 ${st.latency.p50} ms, p99 ${st.latency.p99} ms over ${st.latency.count} changes`);
  for (const f of [file, `${file}-wal`, `${file}-shm`]) fs.rmSync(f, { force: true });
  process.exitCode = code === 0 && st.events.emitted > 0 ? 0 : 1;
})().catch((e) => {
  console.error('demo failed:', e.code || '', e.message);
  process.exit(1);
});
