'use strict';
// The main job of the README: the live demo runs, serves the dashboard and delivers changes.
const path = require('node:path');
const { runNode, tmpDir } = require('./helpers');

test('examples/demo.js runs, prints the dashboard URL and status lines, and exits 0', async () => {
  const db = path.join(tmpDir('usp-demo-'), 'demo.db');
  const r = await runNode([path.join(__dirname, '..', 'examples', 'demo.js'), '--seconds', '2', '--rate', '200', '--port', '0', '--db', db], { timeoutMs: 30_000 });
  expect(r.code).toBe(0);
  expect(r.stdout).toMatch(/dashboard: http:\/\/127\.0\.0\.1:\d+\//);
  expect(r.stdout).toMatch(/\[status\] mode=changelog events\/s=\d+/);
  expect(r.stdout).toMatch(/changes delivered/);
}, 40_000);
