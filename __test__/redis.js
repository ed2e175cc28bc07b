'use strict';
// A private Redis per test file, started with scripts/redis.sh (own directory and loopback port,
// append-only persistence). Fails loudly when it cannot start.
const fs = require('node:fs');
const path = require('node:path');
const { execFileSync } = require('node:child_process');
const { tmpDir } = require('./helpers');
const { freePort } = require('./mariadb');

const SCRIPT = path.join(__dirname, '..', 'scripts', 'redis.sh');

function run(args) {
  return execFileSync('bash', [SCRIPT, ...args], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: 120_000 });
}

/** Starts a server. Returns { port, url, dir, cli(...args), kill(), restart(), stop() }. */
async function startRedis() {
  const dir = tmpDir('usp-redis-');
  const port = await freePort();
  try {
    run(['start', dir, String(port)]);
  } catch (e) {
    throw new Error(`cannot start the Redis test server: ${e.stderr || e.message}`);
  }
  return {
    port,
    dir,
    url: `redis://127.0.0.1:${port}`,
    /** Runs a command with redis-cli and returns its output, trimmed. */
    cli(...args) {
      return execFileSync('redis-cli', ['-p', String(port), ...args], { encoding: 'utf8', timeout: 30_000 }).trim();
    },
    kill() {
      run(['kill', dir]);
    },
    restart() {
      run(['start', dir, String(port)]);
    },
    stop() {
      run(['stop', dir]);
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

module.exports = { startRedis };
