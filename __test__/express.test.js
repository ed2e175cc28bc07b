'use strict';
// examples/express: the REST endpoints over push/get/delete, and its page updating live in a
// real browser (headless Chromium) through the hub and the browser client.
const fs = require('node:fs');
const path = require('node:path');
const { chromium } = require('playwright-core');
const { tmpDir } = require('./helpers');
const { start } = require('../examples/express/server');

jest.setTimeout(60_000);

const CHROMIUM = ['/usr/bin/chromium', '/usr/bin/chromium-browser'].find((p) => fs.existsSync(p));

test('REST endpoints, and the page shows changes live', async () => {
  if (!CHROMIUM) throw new Error('Chromium is not installed: run `bash scripts/setup.sh --test` (installs Debian chromium)');
  const app = await start({ port: 0, db: path.join(tmpDir('usp-express-'), 'items.db') });
  const base = `http://127.0.0.1:${app.port}`;
  const call = async (method, p, body) => {
    const r = await fetch(base + p, { method, headers: { 'content-type': 'application/json' }, body: body === undefined ? undefined : JSON.stringify(body) });
    return { status: r.status, body: await r.json() };
  };
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'] });
  try {
    expect(await call('PUT', '/api/items/apple', { qty: 1 })).toEqual({ status: 200, body: { key: 'item:apple', version: 1 } });
    expect(await call('GET', '/api/items/apple')).toEqual({ status: 200, body: { qty: 1 } });
    expect((await call('GET', '/api/items/nope')).status).toBe(404);
    const bad = await call('PUT', `/api/items/${'x'.repeat(300)}`, 1);
    expect(bad.status).toBe(400);
    expect(bad.body.code).toBe('USP_INVALID_KEY');

    const page = await browser.newPage();
    await page.goto(base + '/');
    await page.waitForSelector('body[data-live="true"]', { timeout: 15_000 });
    // The item written before the page loaded is there; new ones appear, deleted ones go.
    await page.locator('li[data-key="apple"]').waitFor({ timeout: 10_000 });
    await call('PUT', '/api/items/pear', { qty: 7 });
    await page.locator('li[data-key="pear"]').waitFor({ timeout: 10_000 });
    expect(await page.locator('li[data-key="pear"]').textContent()).toContain('"qty":7');
    expect(await call('DELETE', '/api/items/apple')).toEqual({ status: 200, body: { deleted: true } });
    await page.locator('li[data-key="apple"]').waitFor({ state: 'detached', timeout: 10_000 });
  } finally {
    await browser.close();
    await app.close();
  }
});
