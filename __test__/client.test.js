'use strict';
// The browser client (ultimate-streaming/client), run in a child Node process with the `ws`
// package, against the hub through a TCP proxy that this test cuts: the client reconnects by
// itself and resumes from its last seq, so every event arrives once and in order; past the
// history ring it reports a gap.
const net = require('node:net');
const UltimateStreamer = require('..');
const { waitFor, startHubClient } = require('./helpers');

jest.setTimeout(60_000);

const cleanup = [];
afterEach(async () => {
  for (const f of cleanup.splice(0).reverse()) await f();
});

/** A loopback TCP proxy to `port` whose connections can be cut, and which can refuse for a while. */
async function proxy(port) {
  const sockets = new Set();
  let refusing = false;
  const server = net.createServer((c) => {
    if (refusing) return c.destroy();
    const up = net.connect(port, '127.0.0.1');
    sockets.add(c).add(up);
    c.pipe(up).pipe(c);
    const drop = () => {
      c.destroy();
      up.destroy();
      sockets.delete(c);
      sockets.delete(up);
    };
    c.on('error', drop).on('close', drop);
    up.on('error', drop).on('close', drop);
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  cleanup.push(() => new Promise((r) => server.close(r)));
  return {
    port: server.address().port,
    cut() {
      for (const s of sockets) s.destroy();
      sockets.clear();
    },
    refuse(on) {
      refusing = on;
    },
  };
}

/** Starts the client script (stopped after the test). */
function runClient(url, channels) {
  const c = startHubClient(url, channels);
  cleanup.push(() => c.stop());
  return c;
}

async function streamer(options = {}) {
  const s = new UltimateStreamer({ connection: { path: ':memory:' }, options });
  cleanup.push(() => s.close());
  await s.init();
  const hub = await s.listen();
  return { s, hub };
}

test('reconnects after the network is cut and resumes from its last seq: every event once, in order', async () => {
  const { s, hub } = await streamer();
  const p = await proxy(hub.port);
  const c = runClient(`ws://127.0.0.1:${p.port}/stream`, ['kv:t:*']);
  await waitFor(() => c.count('subscribed') === 1, `the client to subscribe (${c.stderr()})`);
  await s.push('t:warm', 0);
  await waitFor(() => c.events().length === 1, 'the first event');
  for (let i = 1; i <= 100; i++) await s.push(`t:${i % 7}`, i);
  await waitFor(() => c.events().length >= 50, 'some events before the cut');
  p.refuse(true);
  p.cut();
  // Written while the client is away.
  for (let i = 101; i <= 200; i++) await s.push(i % 2 ? `t:${i % 7}` : `other:${i}`, i);
  await waitFor(() => c.lines.includes('state reconnecting'), 'the client to notice the cut');
  p.refuse(false);
  await waitFor(() => c.count('open') === 2, 'the client to reconnect');
  for (let i = 201; i <= 250; i++) await s.push(`t:${i % 7}`, i);
  const expected = 1 + 100 + 50 + 50;
  await waitFor(() => c.events().length >= expected, `${expected} events`, 20_000);
  await new Promise((r) => setTimeout(r, 200));
  const seqs = c.events();
  expect(seqs.length).toBe(expected);
  for (let i = 1; i < seqs.length; i++) expect(seqs[i]).toBeGreaterThan(seqs[i - 1]);
  expect(c.count('gap')).toBe(0);
});

test('beyond the history ring the client reports a gap, then goes on', async () => {
  const { s, hub } = await streamer({ historySize: 20 });
  const p = await proxy(hub.port);
  const c = runClient(`ws://127.0.0.1:${p.port}/stream`, ['kv:*']);
  await waitFor(() => c.count('subscribed') === 1, `the client to subscribe (${c.stderr()})`);
  await s.push('a', 1);
  await waitFor(() => c.events().length === 1, 'the first event');
  p.refuse(true);
  p.cut();
  await waitFor(() => c.lines.includes('state reconnecting'), 'the client to notice the cut');
  for (let i = 0; i < 100; i++) await s.push(`k${i}`, i);
  p.refuse(false);
  await waitFor(() => c.count('gap') === 1 && c.events().length >= 21, 'a gap and the held events');
  const gap = c.lines.find((l) => l.startsWith('gap ')).split(' ').map(Number);
  expect(gap[1]).toBe(2);
  expect(gap[2]).toBe(81);
  expect(c.events().slice(1)).toEqual(Array.from({ length: 20 }, (_, i) => 82 + i));
});
