'use strict';
// Diagnostics go through tracing to stderr, at the level of `logLevel` or USP_LOG, and never
// contain values.
const { runNode, ROOT, tmpDb } = require('./helpers');

const script = (options) => `const U = require(${JSON.stringify(ROOT)}); (async () => {
  const s = new U({ connection: { path: ${JSON.stringify(tmpDb())} }, options: ${JSON.stringify(options)} });
  await s.init();
  await s.push('k', { secret: 'VALUE-SHOULD-NOT-BE-LOGGED' });
  await s.get('k'); await s.delete('k');
  await s.close();
})()`;

test('logLevel debug logs the engine lifecycle without values', async () => {
  const r = await runNode(['-e', script({ logLevel: 'debug' })]);
  expect(r.code).toBe(0);
  expect(r.stderr).toMatch(/sqlite store ready/);
  expect(r.stderr).toMatch(/sqlite store stopped/);
  expect(r.stderr).not.toMatch(/VALUE-SHOULD-NOT-BE-LOGGED/);
});

test('USP_LOG sets the level when the option is absent', async () => {
  const r = await runNode(['-e', script({})], { env: { ...process.env, USP_LOG: 'info' } });
  expect(r.code).toBe(0);
  expect(r.stderr).toMatch(/sqlite store ready/);
});

test('the default level (warn) and logLevel off are quiet on a healthy run', async () => {
  for (const options of [{}, { logLevel: 'off' }]) {
    const env = { ...process.env };
    delete env.USP_LOG;
    const r = await runNode(['-e', script(options)], { env: { ...env, USP_LOG: options.logLevel ? 'trace' : '' } });
    expect(r.code).toBe(0);
    expect(r.stderr).toBe('');
  }
});
