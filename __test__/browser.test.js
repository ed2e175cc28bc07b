'use strict';
// The dashboard in a real browser: headless Chromium (Debian `chromium`, driven by
// playwright-core) loads the page the hub serves, a change pushed after the page is live appears
// in its feed, and a screenshot is saved as a test artifact (__test__/artifacts/dashboard.png).
const fs = require('node:fs');
const path = require('node:path');
const { chromium } = require('playwright-core');
const UltimateStreamer = require('..');

jest.setTimeout(60_000);

const CHROMIUM = ['/usr/bin/chromium', '/usr/bin/chromium-browser'].find((p) => fs.existsSync(p));
const ARTIFACTS = path.join(__dirname, 'artifacts');

test('the dashboard shows a change pushed after it loaded, with mode and rates', async () => {
  if (!CHROMIUM) throw new Error('Chromium is not installed: run `bash scripts/setup.sh --test` (installs Debian chromium)');
  const s = new UltimateStreamer({ connection: { path: ':memory:' } });
  await s.init();
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'],
  });
  try {
    const { port } = await s.listen({ dashboard: true });
    const page = await browser.newPage({ viewport: { width: 1100, height: 700 } });
    const errors = [];
    page.on('pageerror', (e) => errors.push(e.message));
    await page.goto(`http://127.0.0.1:${port}/`);
    await page.waitForSelector('body[data-live="true"]', { timeout: 15_000 });
    await s.push('price:BTC', { bid: 64000.5 });
    await s.push('order:7', { total: 12 });
    const row = page.locator('#events li[data-key="price:BTC"]');
    await row.waitFor({ timeout: 10_000 });
    expect(await row.textContent()).toContain('64000.5');
    await page.locator('#events li[data-key="order:7"]').waitFor({ timeout: 10_000 });
    // The status line comes from /status, polled every second.
    await page.locator('#mode', { hasText: 'changelog' }).waitFor({ timeout: 10_000 });
    await page.locator('#clients', { hasText: /^1$/ }).waitFor({ timeout: 10_000 });
    fs.mkdirSync(ARTIFACTS, { recursive: true });
    await page.screenshot({ path: path.join(ARTIFACTS, 'dashboard.png') });
    expect(fs.statSync(path.join(ARTIFACTS, 'dashboard.png')).size).toBeGreaterThan(5000);
    expect(errors).toEqual([]);
  } finally {
    await browser.close();
    await s.close();
  }
});
