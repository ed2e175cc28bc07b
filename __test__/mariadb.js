'use strict';
// A private MariaDB per test file, started with scripts/mariadb.sh (own data directory, socket
// and loopback port, binlog on unless asked otherwise). Fails loudly when it cannot start.
const fs = require('node:fs');
const net = require('node:net');
const path = require('node:path');
const { execFileSync } = require('node:child_process');
const mysql = require('mysql2/promise');
const { tmpDir } = require('./helpers');

const SCRIPT = path.join(__dirname, '..', 'scripts', 'mariadb.sh');
const PASSWORD = 'usp-test-pw';

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

function run(args) {
  return execFileSync('bash', [SCRIPT, ...args], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: 120_000 });
}

/**
 * Starts a server. Returns { port, dir, uri, config(extraOptions), sql(query, params),
 * kill(), restart(), stop() }. `sql` runs through a mysql2 connection (an external writer).
 */
async function startMariaDb({ binlog = true, tls = false } = {}) {
  const dir = tmpDir('usp-mariadb-');
  const port = await freePort();
  const mode = tls ? 'tls' : binlog ? 'binlog' : 'nobinlog';
  try {
    run(['start', dir, String(port), mode]);
  } catch (e) {
    throw new Error(`cannot start the MariaDB test server: ${e.stderr || e.message}`);
  }
  let pool = null;
  const server = {
    port,
    dir,
    uri: `mysql://usp:${PASSWORD}@127.0.0.1:${port}/usp_test`,
    /** Nested config for a streamer on this server. */
    config(options = {}) {
      return { database: 'mysql', connection: { uri: this.uri }, options };
    },
    async sql(query, params = []) {
      if (!pool) {
        pool = mysql.createPool({ host: '127.0.0.1', port, user: 'usp', password: PASSWORD, database: 'usp_test', connectionLimit: 8 });
      }
      const [rows] = await pool.query(query, params);
      return rows;
    },
    /** Runs SQL as the server's root user (through its socket), e.g. PURGE BINARY LOGS. */
    rootSql(query) {
      return execFileSync('mariadb', ['--no-defaults', `--socket=${path.join(dir, 'mysqld.sock')}`, '-uroot', '-N', '-e', query], {
        encoding: 'utf8',
        timeout: 30_000,
      });
    },
    async closePool() {
      if (pool) await pool.end().catch(() => {});
      pool = null;
    },
    async kill() {
      await this.closePool();
      run(['kill', dir]);
    },
    async restart() {
      run(['start', dir, String(port), mode]);
    },
    /** Stops the server and removes its data directory. */
    async stop() {
      await this.closePool();
      run(['stop', dir]);
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
  return server;
}

module.exports = { startMariaDb, PASSWORD, freePort };
