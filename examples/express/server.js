'use strict';
// An Express app on ultimate-streaming: REST endpoints that push/get/delete items, and a page
// that shows every item live through the WebSocket hub and the browser client.
//
//   node examples/express/server.js [--port 3000] [--db ./items.db]
//
// Open http://127.0.0.1:3000/, then in another terminal:
//   curl -X PUT -H 'content-type: application/json' -d '{"qty":3}' http://127.0.0.1:3000/api/items/apple
//   curl -X DELETE http://127.0.0.1:3000/api/items/apple
const path = require('node:path');
const express = require('express');
// In your app: require('ultimate-streaming') and require.resolve('ultimate-streaming/client').
const UltimateStreamer = require('../..');

const CLIENT = path.join(__dirname, '..', '..', 'client', 'index.mjs');

/** UspError codes that are the caller's fault. */
const BAD_REQUEST = new Set(['USP_INVALID_KEY', 'USP_INVALID_VALUE', 'USP_VALUE_TOO_LARGE', 'USP_INVALID_ARGUMENT']);

function page(hubPort) {
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Items, live</title>
<style>body{font:15px system-ui,sans-serif;margin:2rem}li{margin:.2rem 0}code{background:#eee;padding:0 .3rem}</style>
</head><body>
<h1>Items <small id="state">connecting</small></h1>
<ul id="items"></ul>
<script type="module">
  import { connect } from '/client.mjs';
  const items = new Map();
  const list = document.getElementById('items');
  function render() {
    list.replaceChildren(...[...items].sort().map(([k, v]) => {
      const li = document.createElement('li');
      li.dataset.key = k;
      li.innerHTML = '<code></code> <span></span>';
      li.children[0].textContent = k;
      li.children[1].textContent = JSON.stringify(v);
      return li;
    }));
  }
  // Current state first, then every change live (resuming by itself after a disconnect).
  const initial = await (await fetch('/api/items')).json();
  for (const [k, v] of Object.entries(initial)) items.set(k, v);
  render();
  const stream = connect('ws://' + location.hostname + ':${hubPort}/stream', { channels: ['kv:item:*'] });
  stream.on('state', (s) => (document.getElementById('state').textContent = s));
  stream.on('subscribed', () => (document.body.dataset.live = 'true'));
  stream.on('change', (e) => {
    const k = e.key.slice('item:'.length);
    if (e.type === 'delete') items.delete(k); else items.set(k, e.data);
    render();
  });
  stream.on('gap', async () => location.reload());
</script></body></html>`;
}

/** Starts the app; resolves with { port, hubPort, close() }. */
async function start({ port = 3000, db = path.join(process.cwd(), 'items.db'), hubPort = 0 } = {}) {
  const streamer = new UltimateStreamer({ connection: { path: db } });
  await streamer.init();
  const hub = await streamer.listen({ port: hubPort });
  const known = new Set(); // keys this app has written (a real app keeps an index)
  streamer.on('change', { prefix: 'item:' }, (e) => {
    if (e.type === 'delete') known.delete(e.key);
    else known.add(e.key);
  });

  const app = express();
  app.use(express.json({ limit: '1mb', strict: false })); // any JSON value, not only objects
  const handle = (fn) => async (req, res) => {
    try {
      await fn(req, res);
    } catch (e) {
      res.status(BAD_REQUEST.has(e.code) ? 400 : 503).json({ code: e.code, message: e.message });
    }
  };
  app.get('/api/items', handle(async (req, res) => {
    const out = {};
    for (const k of known) {
      const v = await streamer.get(k);
      if (v !== null) out[k.slice('item:'.length)] = v;
    }
    res.json(out);
  }));
  app.get('/api/items/:name', handle(async (req, res) => {
    const v = await streamer.get(`item:${req.params.name}`);
    if (v === null) return res.status(404).json({ code: 'NOT_FOUND', message: 'no such item' });
    res.json(v);
  }));
  app.put('/api/items/:name', handle(async (req, res) => {
    const r = await streamer.push(`item:${req.params.name}`, req.body);
    known.add(r.key);
    res.json(r);
  }));
  app.delete('/api/items/:name', handle(async (req, res) => {
    res.json({ deleted: await streamer.delete(`item:${req.params.name}`) });
  }));
  app.get('/client.mjs', (req, res) => res.type('text/javascript').sendFile(CLIENT));
  app.get('/', (req, res) => res.type('html').send(page(hub.port)));

  const server = await new Promise((resolve) => {
    const s = app.listen(port, '127.0.0.1', () => resolve(s));
  });
  return {
    port: server.address().port,
    hubPort: hub.port,
    async close() {
      await new Promise((r) => server.close(r));
      await streamer.close();
    },
  };
}

module.exports = { start };

if (require.main === module) {
  const arg = (n, d) => (process.argv.includes(`--${n}`) ? process.argv[process.argv.indexOf(`--${n}`) + 1] : d);
  start({ port: Number(arg('port', 3000)), db: arg('db', path.join(process.cwd(), 'items.db')) }).then(
    (a) => console.log(`items app: http://127.0.0.1:${a.port}/  (hub on port ${a.hubPort})`),
    (e) => {
      console.error('failed to start:', e.code || '', e.message);
      process.exit(1);
    },
  );
}
