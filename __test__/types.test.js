'use strict';
// index.d.ts describes the API a TypeScript user writes against: a typical program type-checks
// in strict mode, and misuse is rejected.
const { execFileSync } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');
const { tmpDir } = require('./helpers');

const TSC = require.resolve('typescript/bin/tsc');
const FLAGS = ['--noEmit', '--strict', '--esModuleInterop', '--moduleResolution', 'node', '--types', 'node'];

function tsc(file) {
  try {
    execFileSync(process.execPath, [TSC, ...FLAGS, file], { encoding: 'utf8', stdio: 'pipe' });
    return '';
  } catch (e) {
    return e.stdout + e.stderr;
  }
}

test('a typical program type-checks against index.d.ts', () => {
  expect(tsc(path.join(__dirname, 'fixtures', 'types-usage.ts'))).toBe('');
}, 60_000);

test('misuse is a type error', () => {
  const dir = tmpDir('usp-types-');
  const file = path.join(dir, 'bad.ts');
  fs.writeFileSync(
    file,
    `import UltimateStreamer from ${JSON.stringify(path.join(__dirname, '..', 'index'))};
     const s = new UltimateStreamer({ options: { batchSize: 'big' } });
     s.push('k', () => 1);`,
  );
  const out = tsc(file);
  // Both lines are refused: a string batchSize, and a function as a value.
  expect(out).toMatch(/bad\.ts\(2,\d+\): error TS2322/);
  expect(out).toMatch(/bad\.ts\(3,\d+\): error TS2345/);
}, 60_000);
