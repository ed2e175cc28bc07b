'use strict';
// Users get the package with `npm install`: the packed tarball must install into a fresh app and
// work there without the source tree.
const { execFileSync } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');
const { ROOT, tmpDir, runNode } = require('./helpers');

const NPM = process.platform === 'win32' ? 'npm.cmd' : 'npm';

test('npm pack produces a tarball that installs into a fresh app and works there', async () => {
  const out = tmpDir('usp-pack-');
  const packed = JSON.parse(execFileSync(NPM, ['pack', '--json', '--pack-destination', out], { cwd: ROOT, encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }));
  const files = packed[0].files.map((f) => f.path);
  for (const f of ['index.js', 'index.mjs', 'index.d.ts', 'lib/streamer.js', 'lib/errors.js', 'client/index.mjs', 'client/index.d.ts', 'native/index.js', 'package.json', 'README.md']) {
    expect(files).toContain(f);
  }
  expect(files.some((f) => /^native\/.*\.node$/.test(f))).toBe(true);
  expect(files.some((f) => f.startsWith('src/') || f.startsWith('__test__/') || f.startsWith('target/'))).toBe(false);
  const tgz = path.join(out, packed[0].filename);

  const app = tmpDir('usp-app-');
  fs.writeFileSync(path.join(app, 'package.json'), JSON.stringify({ name: 'usp-smoke-app', version: '1.0.0', private: true }));
  execFileSync(NPM, ['install', '--no-audit', '--no-fund', tgz], { cwd: app, stdio: ['ignore', 'ignore', 'pipe'] });
  expect(fs.existsSync(path.join(app, 'node_modules', 'ultimate-streaming', 'src'))).toBe(false);

  fs.writeFileSync(
    path.join(app, 'app.js'),
    `const UltimateStreamer = require('ultimate-streaming');
     (async () => {
       const s = new UltimateStreamer({ connection: { path: 'app.db' } });
       const seen = [];
       s.on('change', (e) => seen.push(e.type + ':' + e.key + '@' + e.version));
       await s.init();
       await s.push('order:1', { total: 12.5 });
       const v = await s.get('order:1');
       await s.delete('order:1');
       while (seen.length < 2) await new Promise((r) => setTimeout(r, 5));
       let code = null;
       try { await s.push('', 1); } catch (e) { code = e.code; }
       await s.close();
       console.log(JSON.stringify({ v, seen, code }));
     })();`,
  );
  const cjs = await runNode(['app.js'], { cwd: app });
  expect(cjs.stderr).toBe('');
  expect(cjs.code).toBe(0);
  expect(JSON.parse(cjs.stdout)).toEqual({ v: { total: 12.5 }, seen: ['insert:order:1@1', 'delete:order:1@2'], code: 'USP_INVALID_KEY' });

  fs.writeFileSync(
    path.join(app, 'app.mjs'),
    `import UltimateStreamer, { UltimateStreamer as Named, ERROR_CODES } from 'ultimate-streaming';
     import { connect } from 'ultimate-streaming/client';
     const s = new Named({ connection: { path: ':memory:' } });
     await s.init();
     const r = await s.push('k', 1);
     await s.close();
     console.log(JSON.stringify({ same: UltimateStreamer === Named, r, codes: Object.keys(ERROR_CODES).length, client: typeof connect }));`,
  );
  const esm = await runNode(['app.mjs'], { cwd: app });
  expect(esm.code).toBe(0);
  const parsed = JSON.parse(esm.stdout);
  expect(parsed.same).toBe(true);
  expect(parsed.r).toEqual({ key: 'k', version: 1 });
  expect(parsed.codes).toBeGreaterThan(10);
  // The browser client ships in the package under its own entry point.
  expect(parsed.client).toBe('function');
}, 180_000);
