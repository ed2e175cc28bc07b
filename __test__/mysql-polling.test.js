'use strict';
// MySQL/MariaDB polling fallback against real MariaDB servers started for this file: one with the
// binary log off, and one with the binlog on where the user lacks REPLICATION grants until the
// test grants them (the streamer must then switch back to binlog capture by itself).
const { waitFor, streamerPool, collectChanges } = require('./helpers');
const { startMariaDb, PASSWORD } = require('./mariadb');

jest.setTimeout(120_000);

let nobinlog;
let binlog;
beforeAll(async () => {
  nobinlog = await startMariaDb({ binlog: false });
  binlog = await startMariaDb({ binlog: true });
});
afterAll(async () => {
  await Promise.all([nobinlog, binlog].filter(Boolean).map((db) => db.stop()));
});

const make = streamerPool();
const collect = collectChanges;

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

describe('binary log off', () => {
  test('runs in polling mode, announced by an event and in status; every change once', async () => {
    const table = 'kv_poll_1';
    const s = make(nobinlog.config({ table, pollingInterval: 50 }));
    const seen = collect(s);
    await s.init();
    const st = s.getStatus();
    expect(st.mode).toBe('polling');
    expect(st.source.server.logBin).toBe(false);
    await waitFor(() => seen.modes.length >= 1, 'a mode event');
    expect(seen.modes[0]).toMatchObject({ type: 'mode', mode: 'polling', source: 'mysql' });
    expect(seen.modes[0].reason).toMatch(/binary logging is off/);

    expect(await s.push('a', { n: 1 })).toEqual({ key: 'a', version: 1 });
    expect(await s.get('a')).toEqual({ n: 1 });
    await waitFor(() => seen.count() >= 1, 'the push, polled');
    await nobinlog.sql(`INSERT INTO ${table} (k, v, version) VALUES ('ext', '"x"', 1)`);
    await waitFor(() => seen.count() >= 2, 'the external insert, polled');
    await nobinlog.sql(`UPDATE ${table} SET v = '"y"', version = version + 1 WHERE k = 'ext'`);
    await waitFor(() => seen.count() >= 3, 'the external update, polled');
    expect(await s.delete('a')).toBe(true);
    await waitFor(() => seen.count() >= 4, 'the delete (tombstone), polled');
    // Overlapping polls re-read recent rows: nothing is delivered twice.
    await sleep(500);
    expect(seen.events.map((e) => [e.type, e.key, e.version, e.data])).toEqual([
      ['insert', 'a', 1, { n: 1 }],
      ['insert', 'ext', 1, 'x'],
      ['update', 'ext', 2, 'y'],
      ['delete', 'a', 2, null],
    ]);
    for (const e of seen.events) expect(e.source).toBe('mysql');
    expect(JSON.stringify(s.getStatus())).not.toContain(PASSWORD);
  });

  test('resume in polling mode: rows written while no streamer ran arrive exactly once', async () => {
    const table = 'kv_poll_2';
    const cfg = nobinlog.config({ table, pollingInterval: 50, mysql: { checkpointName: 'p2' } });
    const a = make(cfg);
    const seenA = collect(a);
    await a.init();
    await a.push('first', 1);
    await waitFor(() => seenA.count() >= 1, 'first event');
    await sleep(200); // a poll after the push moves the saved cursor past it
    await a.close();
    const N = 500;
    const values = Array.from({ length: N }, (_, i) => `('r${i}', '${i}', 1)`).join(',');
    await nobinlog.sql(`INSERT INTO ${table} (k, v, version) VALUES ${values}`);
    const b = make(cfg);
    const seenB = collect(b);
    await b.init();
    await waitFor(() => seenB.count() >= N, `${N} rows after resume`, 30_000);
    await sleep(400);
    expect(seenB.events.filter((e) => !/^r\d+$/.test(e.key)).map((e) => [e.key, e.version, e.timestamp])).toEqual([]);
    expect(seenB.count()).toBe(N);
    expect(new Set(seenB.events.map((e) => e.key)).size).toBe(N);
    expect(seenB.events.some((e) => e.key === 'first')).toBe(false);
  });

  test('useChangeStreams: false polls even where the binlog is readable', async () => {
    const s = make(binlog.config({ table: 'kv_poll_3', useChangeStreams: false, pollingInterval: 50 }));
    const seen = collect(s);
    await s.init();
    expect(s.getStatus().mode).toBe('polling');
    await waitFor(() => seen.modes.length >= 1, 'a mode event');
    expect(seen.modes[0].reason).toMatch(/useChangeStreams/);
    await s.push('k', 1);
    await waitFor(() => seen.count() >= 1, 'the push, polled');
  });
});

describe('missing REPLICATION grants', () => {
  test('polls, then switches to the binlog once granted, delivering every row once across the switch', async () => {
    const table = 'kv_poll_4';
    const uri = binlog.uri.replace('usp:', 'usp_norepl:');
    const s = make({ database: 'mysql', connection: { uri }, options: { table, pollingInterval: 50, mysql: { fastPathRetry: 300 } } });
    const seen = collect(s);
    await s.init();
    expect(s.getStatus().mode).toBe('polling');
    expect(s.getStatus().source.server.replicationGrants).toBe(false);
    await waitFor(() => seen.modes.length >= 1, 'the polling mode event');
    expect(seen.modes[0].reason).toMatch(/REPLICATION/);

    // A writer runs across the switch.
    let written = 0;
    let stop = false;
    const writer = (async () => {
      while (!stop && written < 3000) {
        const values = Array.from({ length: 10 }, (_, i) => `('w${written + i}', '${written + i}', 1)`).join(',');
        await binlog.sql(`INSERT INTO ${table} (k, v, version) VALUES ${values}`);
        written += 10;
        await sleep(5);
      }
    })();
    await sleep(300);
    binlog.rootSql("GRANT REPLICATION SLAVE, BINLOG MONITOR ON *.* TO 'usp_norepl'@'127.0.0.1'");
    await waitFor(() => s.getStatus().mode === 'binlog', 'the switch to binlog capture', 20_000);
    await sleep(300);
    stop = true;
    await writer;
    await waitFor(() => seen.count() >= written, `${written} rows`, 30_000);
    await sleep(500);
    expect(seen.modes.map((m) => m.mode)).toEqual(['polling', 'binlog']);
    expect(seen.count()).toBe(written);
    expect(new Set(seen.events.map((e) => e.key)).size).toBe(written);
    // After the switch, changes come from the binlog at once (no polling delay needed).
    await s.push('after', 1);
    await waitFor(() => seen.events.some((e) => e.key === 'after'), 'a change after the switch');
  });
});
