//! Embedded SQLite: the KV table, a change log maintained by triggers (so writes of any process
//! or SQL console are captured), and one thread that owns the connection. That thread commits
//! queued operations in shared transactions, then tails the change log by `seq` and feeds the
//! core. Other processes' commits are noticed through `PRAGMA data_version`.

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering::Relaxed};
use std::sync::mpsc::{RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::config::{validate_identifier, SqliteConfig, Synchronous};
use crate::core::batcher::Batcher;
use crate::core::cache::CacheEntry;
use crate::core::Core;
use crate::error::{Error, Result};
use crate::event::{json_or_string, now_us, Change, ChangeKind, ChangeLogSeq, Event, Position};
use crate::source::sqlite_tail::TailQuery;
use crate::source::wal_watch::WalWatch;
use crate::source::StoreContext;
use crate::store::{Completion, CompletionSink, Op};

/// Rows read from the change log per query at most. About one delivered batch: the changes
/// read are ingested and encoded while they are still in the CPU cache (4,096 rows cost the
/// store thread about 10% more CPU per row in `delivery.js`).
const TAIL_CHUNK: usize = 1024;
/// How often old change-log rows are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(5);
/// SQLite's current time in µs since the epoch (millisecond precision), for writes made by SQL.
const NOW_US: &str = "CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER)";

/// The schema: KV table with tombstones, change log, and the triggers that fill it. Versions
/// are assigned by the database: every logged change carries a version higher than the key's
/// previous one, also for writes made by plain SQL.
pub fn schema_sql(t: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {t} (
            k TEXT PRIMARY KEY NOT NULL,
            v TEXT,
            version INTEGER NOT NULL DEFAULT 1,
            deleted INTEGER NOT NULL DEFAULT 0,
            updated_at INTEGER
        );
        CREATE TABLE IF NOT EXISTS {t}_changes (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            k TEXT NOT NULL,
            v TEXT,
            version INTEGER NOT NULL,
            op TEXT NOT NULL,
            ts INTEGER NOT NULL
        );
        CREATE TRIGGER IF NOT EXISTS {t}_log_insert AFTER INSERT ON {t} BEGIN
            INSERT INTO {t}_changes (k, v, version, op, ts) VALUES (
                NEW.k, CASE WHEN NEW.deleted THEN NULL ELSE NEW.v END, NEW.version,
                CASE WHEN NEW.deleted THEN 'delete' ELSE 'insert' END,
                coalesce(NEW.updated_at, {NOW_US}));
        END;
        CREATE TRIGGER IF NOT EXISTS {t}_log_update AFTER UPDATE ON {t} WHEN NEW.version > OLD.version BEGIN
            INSERT INTO {t}_changes (k, v, version, op, ts) VALUES (
                NEW.k, CASE WHEN NEW.deleted THEN NULL ELSE NEW.v END, NEW.version,
                CASE WHEN NEW.deleted THEN 'delete' WHEN OLD.deleted THEN 'insert' ELSE 'update' END,
                CASE WHEN NEW.updated_at IS NOT NULL AND NEW.updated_at IS NOT OLD.updated_at
                     THEN NEW.updated_at ELSE {NOW_US} END);
        END;
        CREATE TRIGGER IF NOT EXISTS {t}_bump_version AFTER UPDATE ON {t} WHEN NEW.version <= OLD.version BEGIN
            UPDATE {t} SET version = OLD.version + 1, updated_at = {NOW_US} WHERE k = NEW.k;
        END;
        CREATE TRIGGER IF NOT EXISTS {t}_tombstone AFTER DELETE ON {t} WHEN OLD.deleted = 0 BEGIN
            INSERT INTO {t} (k, v, version, deleted, updated_at) VALUES (OLD.k, NULL, OLD.version + 1, 1, {NOW_US});
        END;"
    )
}

/// Opens the database, applies pragmas and the schema.
pub fn open(cfg: &SqliteConfig) -> Result<Connection> {
    validate_identifier(&cfg.table, "table")?;
    let conn = if cfg.path == ":memory:" {
        Connection::open_in_memory()
    } else {
        Connection::open_with_flags(
            &cfg.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
    }
    .map_err(|e| {
        Error::DbUnavailable(format!(
            "cannot open the SQLite database at {:?} ({e}); check that the directory exists and is writable",
            cfg.path
        ))
    })?;
    conn.busy_timeout(Duration::from_millis(cfg.busy_timeout_ms))?;
    // Without the planner stability guarantee, SQLite marks a statement expired whenever a
    // parameter it may plan on (such as `LIMIT ?2` of the tail) is bound again, and compiles
    // it anew on every step: a profile showed about 8% of the store thread in that.
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    // Only takes effect while the file is still empty (before WAL mode writes its header): an
    // existing database keeps its page size. Smaller pages mean fewer bytes per commit of small
    // upserts to scattered keys, where each dirty page is written to the WAL whole.
    conn.execute_batch(&format!("PRAGMA page_size={};", cfg.page_size))?;
    if cfg.path != ":memory:" {
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::DbUnavailable(format!(
                "the SQLite database at {:?} could not switch to WAL mode (got {mode}); is it on a network file system?",
                cfg.path
            )));
        }
    }
    let sync = match cfg.synchronous {
        Synchronous::Normal => "NORMAL",
        Synchronous::Full => "FULL",
    };
    conn.execute_batch(&format!("PRAGMA synchronous={sync};"))?;
    if cfg.path != ":memory:" {
        // Most checkpointing (and its fsync) runs on the `Checkpointer`'s connection; this
        // connection only checkpoints when the WAL outgrows 10,000 pages, which bounds the WAL
        // under continuous writes (a checkpoint racing new commits never lets it restart).
        conn.execute_batch("PRAGMA wal_autocheckpoint=10000; PRAGMA journal_size_limit=67108864;")?;
    }
    conn.set_prepared_statement_cache_capacity(32);
    // Two processes may create the schema at the same time: one IMMEDIATE transaction each.
    conn.execute_batch(&format!(
        "BEGIN IMMEDIATE; {} COMMIT;",
        schema_sql(&cfg.table)
    ))
    .map_err(|e| {
        let _ = conn.execute_batch("ROLLBACK");
        Error::from(e)
    })?;
    Ok(conn)
}

/// The statements of the hot path, built once per store from the validated table name.
struct Sql {
    table: String,
    upsert: String,
    delete: String,
    get: String,
    prune: String,
    log_end: String,
    /// Our rows, to match against our writes.
    own: String,
}

impl Sql {
    fn new(t: &str) -> Sql {
        Sql {
            upsert: format!(
                "INSERT INTO {t} (k, v, version, deleted, updated_at) VALUES (?1, ?2, 1, 0, ?3)
                 ON CONFLICT(k) DO UPDATE SET v = excluded.v, version = {t}.version + 1,
                     deleted = 0, updated_at = excluded.updated_at"
            ),
            delete: format!(
                "UPDATE {t} SET v = NULL, version = version + 1, deleted = 1, updated_at = ?2
                 WHERE k = ?1 AND deleted = 0"
            ),
            get: format!("SELECT v, version, deleted FROM {t} WHERE k = ?1"),
            prune: format!("DELETE FROM {t}_changes WHERE seq <= ?1"),
            log_end: format!("SELECT seq FROM sqlite_sequence WHERE name = '{t}_changes'"),
            own: format!("SELECT seq, k, op, version, ts, v FROM {t}_changes WHERE seq > ?1 ORDER BY seq LIMIT ?2"),
            table: t.to_string(),
        }
    }
}

/// The change-log rows after `?1`, at most `?2`, in order: the columns `TailQuery` reads.
pub(super) fn tail_sql(t: &str) -> String {
    format!(
        "SELECT seq, k, v, version, op, ts FROM {t}_changes WHERE seq > ?1 ORDER BY seq LIMIT ?2"
    )
}

/// The change of one change-log row.
pub(super) fn log_change(
    seq: i64,
    key: Arc<str>,
    data: Option<Arc<str>>,
    version: i64,
    kind: ChangeKind,
    commit_ts_us: i64,
) -> Change {
    Change {
        kind,
        key,
        data,
        version: version as u64,
        versioned: true,
        seq: 0,
        position: Position::ChangeLog(ChangeLogSeq(seq as u64)),
        source: "sqlite",
        commit_ts_us,
        table: None,
        before: None,
        meta: None,
    }
}

/// The change-log seq of a change read from the log.
fn log_seq(c: &Change) -> u64 {
    match c.position {
        Position::ChangeLog(ChangeLogSeq(s)) => s,
        _ => 0,
    }
}

/// The kind of change of a change-log row's `op`.
pub(super) fn log_kind(op: &[u8]) -> ChangeKind {
    match op {
        b"insert" => ChangeKind::Insert,
        b"delete" => ChangeKind::Delete,
        _ => ChangeKind::Update,
    }
}

/// A write of the current transaction that changed a row: its index among the completions,
/// its key, and its value (`None` for a delete).
type Written = (usize, Arc<str>, Option<Arc<str>>);

/// Everything the store thread needs.
pub struct StoreThread {
    pub cfg: SqliteConfig,
    pub ctx: StoreContext,
    /// A sender to this thread's own queue, for the delivery waker.
    pub wake: SyncSender<Op>,
}

struct Store {
    /// Declared before `conn`: fields drop in order, and the statement must be finalized
    /// before its connection closes.
    tail_query: TailQuery,
    conn: Connection,
    /// When this thread last committed (µs since the epoch): the file watch ignores the WAL
    /// writes of our own commits instead of waking this thread for them.
    own_commit_us: Arc<AtomicI64>,
    sql: Sql,
    core: Arc<Core>,
    completions: Arc<dyn CompletionSink>,
    last_seq: u64,
    data_version: i64,
    /// Our own commits, or a short read: the log has rows we have not read yet.
    dirty: bool,
    /// The delivery queue was full at the last tail.
    blocked: bool,
    batcher: Batcher,
    /// When a lingering batch is due.
    linger: Option<Duration>,
    retention: u64,
    last_prune: Instant,
}

impl StoreThread {
    /// Runs the store: open, settle `init`, then serve operations and tail the change log until
    /// `Op::Shutdown` or until every sender is gone.
    pub fn run(self) {
        let StoreThread { cfg, ctx, wake } = self;
        let StoreContext {
            core,
            completions,
            rx,
            init_id,
            ready,
            connected,
            sink,
            batch,
            write_batch_size,
        } = ctx;
        let file_wake = wake.clone();
        let waker: crate::sink::Waker = Box::new(move || {
            // A full queue already holds work that will wake the thread.
            let _ = wake.try_send(Op::Wake);
        });
        let batcher = Batcher::new(sink, batch, core.metrics.clone(), Some(waker));
        let opened = open(&cfg)
            .and_then(|conn| Store::new(conn, &cfg, core.clone(), completions.clone(), batcher));
        let mut store = match opened {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(code = e.code(), "sqlite store failed to start: {e}");
                // Stop taking operations (and close requests) before settling init, so a
                // close() that follows the failed init() finds a stopped engine.
                drop(rx);
                core.metrics.record_error(&e);
                completions.complete(vec![Completion::Failed {
                    id: init_id,
                    error: e,
                }]);
                return;
            }
        };
        tracing::info!(path = %cfg.path, table = %cfg.table, position = store.last_seq, "sqlite store ready");
        ready.store(true, Relaxed);
        connected.store(true, Relaxed);
        completions.complete(vec![Completion::Ready { id: init_id }]);
        // Commits of other processes write the WAL file: a file watch wakes this thread at once.
        // The `tailInterval` poll stays as the safety net if the watch is unavailable or late.
        let wal_changed = Arc::new(AtomicBool::new(false));
        let checkpointer = Checkpointer::start(&cfg);
        let mut watch = watch_wal(
            &cfg,
            wal_changed.clone(),
            store.own_commit_us.clone(),
            file_wake,
        );

        let tail_interval = Duration::from_millis(cfg.tail_interval_ms);
        let mut shutdown: Option<u32> = None;
        // Until when to look at the log every millisecond after a WAL event (see below).
        let mut recheck_until: Option<Instant> = None;
        while shutdown.is_none() {
            let mut wait = if store.dirty && !store.blocked {
                Duration::ZERO
            } else if store.blocked {
                Duration::from_millis(1)
            } else {
                tail_interval
            };
            if let Some(l) = store.linger {
                wait = wait.min(l);
            }
            // While the watch is paused, look at the log at least every couple of ms.
            if let Some(w) = watch.as_mut().and_then(WalWatch::idle) {
                wait = wait.min(w);
            }
            if let Some(until) = recheck_until {
                match until.checked_duration_since(Instant::now()) {
                    Some(_) => wait = wait.min(WAL_RECHECK_EVERY),
                    None => recheck_until = None,
                }
            }
            let first = if wait.is_zero() {
                match rx.try_recv() {
                    Ok(op) => Some(op),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => break,
                }
            } else {
                match rx.recv_timeout(wait) {
                    Ok(op) => Some(op),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            };
            if let Some(op) = first {
                let ops = crate::source::take_batch(op, &rx, write_batch_size, &core.metrics);
                let writes = ops
                    .iter()
                    .any(|o| matches!(o, Op::Put { .. } | Op::Delete { .. }));
                if !ops.is_empty() {
                    shutdown = store.execute(ops);
                }
                if let (true, Some(w)) = (writes, watch.as_mut()) {
                    w.wrote();
                }
            }
            // Cleared and armed again before reading, so a commit during the read wakes us.
            if wal_changed.swap(false, Relaxed) {
                if let Some(w) = watch.as_mut() {
                    w.arm();
                }
                // The WAL was written, but a commit becomes visible only when its writer then
                // updates the WAL index (shared memory, which raises no file event): look again
                // for a few ms, or a commit read a moment too early waits for `tailInterval`.
                recheck_until = Some(Instant::now() + WAL_RECHECK_FOR);
            }
            store.capture();
            store.maybe_prune();
        }
        // Deliver everything committed before the close, within reason.
        let t0 = Instant::now();
        store.dirty = true;
        while (store.dirty || store.blocked) && t0.elapsed() < Duration::from_secs(5) {
            store.tail();
            if store.blocked {
                store.batcher.drain(Duration::from_secs(1));
            }
        }
        store.batcher.drain(Duration::from_secs(5));
        // Anything queued after the close is refused, never left hanging; the queue is dropped
        // here, so later calls fail at once with USP_CLOSED.
        let mut refused = crate::source::refuse_queued(rx, &core.metrics);
        // Stop every helper and close every connection before settling close(): the caller may
        // delete or reopen the file as soon as it resolves.
        drop(watch);
        drop(checkpointer);
        drop(store);
        connected.store(false, Relaxed);
        tracing::info!("sqlite store stopped");
        if let Some(id) = shutdown {
            refused.push(Completion::Closed { id });
        }
        if !refused.is_empty() {
            completions.complete(refused);
        }
    }
}

/// How often the WAL is checkpointed into the database file in the background.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// Checkpoints the WAL from its own connection and thread, so the copying and fsync of a
/// checkpoint mostly stays off the store thread. Dropping it stops and joins the thread.
struct Checkpointer {
    stop: Arc<(Mutex<bool>, Condvar)>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    fn start(cfg: &SqliteConfig) -> Option<Checkpointer> {
        if cfg.path == ":memory:" {
            return None;
        }
        let conn = Connection::open_with_flags(
            &cfg.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| tracing::warn!("no background checkpoints: {e}"))
        .ok()?;
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let stop2 = stop.clone();
        let handle = std::thread::Builder::new()
            .name("usp-checkpoint".into())
            .spawn(move || {
                let (lock, cv) = &*stop2;
                let mut stopped = lock.lock().unwrap_or_else(|p| p.into_inner());
                while !*stopped {
                    stopped = cv
                        .wait_timeout(stopped, CHECKPOINT_EVERY)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                    // PASSIVE: copies what it can without waiting for readers or writers.
                    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                    {
                        tracing::debug!("checkpoint skipped: {e}");
                    }
                }
            })
            .map_err(|e| tracing::warn!("no background checkpoints: {e}"))
            .ok()?;
        Some(Checkpointer {
            stop,
            handle: Some(handle),
        })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        let (lock, cv) = &*self.stop;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_all();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Watches `<path>-wal` (see `WalWatch`), or None for `:memory:`, with `watch: false`, or
/// when unavailable.
fn watch_wal(
    cfg: &SqliteConfig,
    flag: Arc<AtomicBool>,
    own_commit_us: Arc<AtomicI64>,
    wake: SyncSender<Op>,
) -> Option<WalWatch> {
    if cfg.path == ":memory:" || !cfg.watch {
        return None;
    }
    let wal = std::path::PathBuf::from(format!("{}-wal", cfg.path));
    WalWatch::start(wal, flag, own_commit_us, wake)
}

/// After a WAL event, the log is read every `WAL_RECHECK_EVERY` for `WAL_RECHECK_FOR`.
const WAL_RECHECK_EVERY: Duration = Duration::from_millis(1);
const WAL_RECHECK_FOR: Duration = Duration::from_millis(5);

impl Store {
    fn new(
        conn: Connection,
        cfg: &SqliteConfig,
        core: Arc<Core>,
        completions: Arc<dyn CompletionSink>,
        batcher: Batcher,
    ) -> Result<Store> {
        let t = cfg.table.clone();
        // Start at the newest change: a streamer delivers what is committed after `init()`.
        let last_seq: i64 = conn
            .query_row(
                "SELECT seq FROM sqlite_sequence WHERE name = ?1",
                [format!("{t}_changes")],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(0);
        let data_version: i64 = conn.query_row("PRAGMA data_version", [], |r| r.get(0))?;
        core.metrics.source_position.store(last_seq, Relaxed);
        Ok(Store {
            tail_query: TailQuery::prepare(&conn, &tail_sql(&t))?,
            conn,
            own_commit_us: Arc::new(AtomicI64::new(0)),
            sql: Sql::new(&t),
            core,
            completions,
            last_seq: last_seq as u64,
            data_version,
            dirty: false,
            blocked: false,
            batcher,
            linger: None,
            retention: cfg.change_log_retention,
            last_prune: Instant::now(),
        })
    }

    /// Executes a batch of operations; writes share one transaction. Returns the id of a
    /// shutdown request found in the batch.
    ///
    /// The versions of our writes come from the change-log rows the triggers wrote, read once
    /// inside the transaction (a `RETURNING` clause costs SQLite a temporary table per
    /// statement); after the commit those same rows are delivered without reading them again,
    /// unless the transaction logged other rows too (a user's trigger).
    fn execute(&mut self, ops: Vec<Op>) -> Option<u32> {
        let has_writes = ops
            .iter()
            .any(|o| matches!(o, Op::Put { .. } | Op::Delete { .. }));
        let mut done: Vec<Completion> = Vec::with_capacity(ops.len());
        // Our writes in order: index into `done`, key, value (None for a delete).
        let mut written: Vec<Written> = Vec::new();
        let mut reads: Vec<(Arc<str>, CacheEntry)> = Vec::new();
        let mut shutdown = None;

        // The log's last seq before our writes: every row after it is this transaction's.
        let mut base = 0u64;
        // The first write that failed: the transaction is then rolled back whole. A failed
        // statement does not always undo itself: a trigger's `RAISE(FAIL)` keeps its work.
        let mut broken: Option<Error> = None;
        if has_writes {
            let begun = self
                .conn
                .execute_batch("BEGIN IMMEDIATE")
                .map_err(Error::from);
            match begun.and_then(|()| self.log_end()) {
                Ok(seq) => base = seq,
                Err(e) => {
                    let _ = self.conn.execute_batch("ROLLBACK");
                    self.core.metrics.record_error(&e);
                    tracing::warn!(code = e.code(), "write transaction could not start: {e}");
                    for op in ops {
                        if let Op::Shutdown { id } = op {
                            shutdown = Some(id);
                        } else if let Some(id) = op.id() {
                            done.push(Completion::Failed {
                                id,
                                error: e.clone(),
                            });
                        }
                    }
                    self.completions.complete(done);
                    return shutdown;
                }
            }
        }
        let ts = now_us();
        for op in ops {
            match op {
                Op::Put { id, key, json } => {
                    let json: Arc<str> = json.into();
                    let r = self
                        .conn
                        .prepare_cached(&self.sql.upsert)
                        .and_then(|mut s| s.execute(params![&*key, &*json, ts]));
                    match r {
                        Ok(_) => {
                            written.push((done.len(), key, Some(json)));
                            done.push(Completion::Pushed { id, version: 0 });
                        }
                        Err(e) => {
                            let e = Error::from(e);
                            broken.get_or_insert_with(|| e.clone());
                            done.push(Completion::Failed { id, error: e });
                        }
                    }
                }
                Op::Delete { id, key } => {
                    let r = self
                        .conn
                        .prepare_cached(&self.sql.delete)
                        .and_then(|mut s| s.execute(params![&*key, ts]));
                    match r {
                        Ok(0) => done.push(Completion::Deleted { id, existed: false }),
                        Ok(_) => {
                            written.push((done.len(), key, None));
                            done.push(Completion::Deleted { id, existed: true });
                        }
                        Err(e) => {
                            let e = Error::from(e);
                            broken.get_or_insert_with(|| e.clone());
                            done.push(Completion::Failed { id, error: e });
                        }
                    }
                }
                Op::Get { id, key } => match self.read(&key) {
                    Ok(Some(entry)) => {
                        done.push(Completion::Got {
                            id,
                            value: entry.value.clone(),
                        });
                        reads.push((key, entry));
                    }
                    Ok(None) => done.push(Completion::Got { id, value: None }),
                    Err(e) => done.push(Completion::Failed { id, error: e }),
                },
                Op::Watch { id, table, .. } => done.push(Completion::Failed {
                    id,
                    error: Error::UnsupportedBackend(format!(
                        "watch('{table}') streams the rows of a MySQL/MariaDB table; the embedded store has only its key-value table (use on('change'))"
                    )),
                }),
                Op::Shutdown { id } => shutdown = Some(id),
                Op::Wake => {}
            }
        }
        let mut ours: Vec<Change> = Vec::new();
        // Whether `ours` are all the rows the transaction logged.
        let mut only_ours = true;
        if has_writes {
            let committed = match broken {
                Some(e) => Err(Error::Db(format!(
                    "rolled back with its transaction, in which another write failed ({e}); nothing of it was written: retry"
                ))),
                None => Ok(()),
            }
            .and_then(|()| self.own_rows(base, &written))
            .and_then(|(rows, only)| {
                (ours, only_ours) = (rows, only);
                self.conn.execute_batch("COMMIT").map_err(Error::from)
            });
            if let Err(e) = committed {
                let _ = self.conn.execute_batch("ROLLBACK");
                self.core.metrics.record_error(&e);
                tracing::warn!(code = e.code(), "write transaction failed to commit: {e}");
                written.clear();
                ours.clear();
                for c in done.iter_mut() {
                    if let Completion::Pushed { id, .. } | Completion::Deleted { id, .. } = *c {
                        *c = Completion::Failed {
                            id,
                            error: e.clone(),
                        };
                    }
                }
            } else {
                self.own_commit_us.store(now_us(), Relaxed);
                self.core.metrics.transactions.fetch_add(1, Relaxed);
                self.core
                    .metrics
                    .writes
                    .fetch_add(written.len() as u64, Relaxed);
            }
        }
        for ((i, _, _), change) in written.iter().zip(&ours) {
            if let Completion::Pushed { version, .. } = &mut done[*i] {
                *version = change.version;
            }
        }
        // Read-your-writes: cached keys learn our own commits before their change is tailed.
        if let Some(cache) = &self.core.cache {
            for c in &ours {
                if cache.peek_version(&c.key).is_some_and(|v| v < c.version) {
                    cache.refresh(
                        &c.key,
                        CacheEntry {
                            version: c.version,
                            value: c.data.clone(),
                        },
                    );
                }
            }
        }
        for (k, e) in reads {
            self.core.fill_cache(k, e);
        }
        let mut fed = false;
        if !ours.is_empty() {
            // Nothing unread before our rows, nothing else logged, and room for them: deliver
            // them as they are. Otherwise the tail reads them again, in order with the others.
            if only_ours
                && base == self.last_seq
                && !self.blocked
                && self.core.free_capacity() >= ours.len()
            {
                self.feed(ours);
                fed = true;
            } else {
                self.dirty = true;
            }
        }
        if !done.is_empty() {
            // Capture first, then settle: the change reaches listeners one hop sooner.
            if self.dirty {
                self.capture();
            } else if fed {
                self.linger = self.batcher.flush(Instant::now());
            }
            self.completions.complete(done);
        }
        shutdown
    }

    /// The change log's last seq (0 when it never had a row).
    fn log_end(&mut self) -> Result<u64> {
        let seq: Option<i64> = self
            .conn
            .prepare_cached(&self.sql.log_end)?
            .query_row([], |r| r.get(0))
            .optional()?;
        Ok(seq.unwrap_or(0) as u64)
    }

    /// The change-log rows of this transaction's writes, in order, and whether they are all
    /// the rows after `base`. Rows are matched to `written` (the writes that changed a row) by
    /// key, kind and value: a user's trigger may write more rows (which the tail then reads),
    /// but a write without its row fails the transaction. The values are ours already, so they
    /// are compared, not copied.
    fn own_rows(&mut self, base: u64, written: &[Written]) -> Result<(Vec<Change>, bool)> {
        if written.is_empty() {
            return Ok((Vec::new(), true));
        }
        let mut out: Vec<Change> = Vec::with_capacity(written.len());
        let mut extra = 0usize;
        let mut stmt = self.conn.prepare_cached(&self.sql.own)?;
        // Every row after `base` is this transaction's: we hold the write lock.
        let mut rows = stmt.query(params![base as i64, i64::MAX])?;
        while let Some(r) = rows.next()? {
            let Some((_, key, value)) = written.get(out.len()) else {
                extra += 1;
                continue;
            };
            let kind = log_kind(r.get_ref(2)?.as_bytes().unwrap_or_default());
            let v = r.get_ref(5)?;
            let same_value = match value {
                Some(json) => v.as_str().ok() == Some(&**json),
                None => kind == ChangeKind::Delete,
            };
            if r.get_ref(1)?.as_str().ok() != Some(&**key) || !same_value {
                extra += 1;
                continue;
            }
            out.push(log_change(
                r.get(0)?,
                key.clone(),
                value.clone(),
                r.get(3)?,
                kind,
                r.get(4)?,
            ));
        }
        if out.len() != written.len() {
            // The triggers were changed or dropped by someone: never guess a version.
            return Err(Error::Db(format!(
                "the change log of table {:?} did not get a row for every write, so nothing was written; its triggers were changed or dropped: reopen the database with this library to recreate them",
                self.sql.table
            )));
        }
        Ok((out, extra == 0))
    }

    fn read(&mut self, key: &str) -> Result<Option<CacheEntry>> {
        let row = self
            .conn
            .prepare_cached(&self.sql.get)?
            .query_row([key], |r| {
                Ok((
                    r.get::<_, Option<String>>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })
            .optional()?;
        Ok(row.map(|(v, version, deleted)| CacheEntry {
            version: version as u64,
            value: if deleted != 0 {
                None
            } else {
                v.map(|s| json_or_string(&s, key))
            },
        }))
    }

    /// Reads new change-log rows (as many as the delivery queue can take) and feeds the core.
    fn tail(&mut self) {
        if !self.dirty && !self.blocked {
            match self
                .conn
                .prepare_cached("PRAGMA data_version")
                .and_then(|mut s| s.query_row([], |r| r.get::<_, i64>(0)))
            {
                Ok(dv) if dv == self.data_version => return,
                Ok(dv) => self.data_version = dv,
                Err(e) => {
                    self.core.metrics.record_error(&e.into());
                    return;
                }
            }
        }
        let room = self.core.free_capacity();
        if room == 0 {
            self.blocked = true;
            return;
        }
        self.blocked = false;
        let limit = room.min(TAIL_CHUNK);
        let rows = match self.read_log(self.last_seq, limit) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(code = e.code(), "change log read failed: {e}");
                self.core.metrics.record_error(&e);
                return;
            }
        };
        self.dirty = rows.len() == limit;
        self.feed(rows);
    }

    /// Up to `limit` change-log rows after `after`, in order, as changes.
    fn read_log(&mut self, after: u64, limit: usize) -> Result<Vec<Change>> {
        // Sized once: collecting from a row iterator (no size hint) grew the vector by
        // reallocating and copying the changes read so far.
        let mut out = Vec::with_capacity(limit);
        self.tail_query.read(after, limit, &mut out)?;
        Ok(out)
    }

    /// Hands changes read from the log after `last_seq` to the core (a resync first when the
    /// log was pruned past our position).
    fn feed(&mut self, changes: Vec<Change>) {
        let (Some(first), Some(last)) = (changes.first(), changes.last()) else {
            return;
        };
        let (first, last) = (log_seq(first), log_seq(last));
        if first > self.last_seq + 1 {
            let (from, to) = (self.last_seq + 1, first - 1);
            tracing::warn!(
                from,
                to,
                "change log was pruned past this reader's position: resync"
            );
            self.core.metrics.resyncs.fetch_add(1, Relaxed);
            self.batcher.push(
                vec![Event::Resync {
                source: "sqlite",
                reason: format!(
                    "change-log entries {from}..={to} were pruned before this streamer read them (raise sqlite.changeLogRetention); continuing from the current state"
                ),
                from,
                to,
            }],
                Instant::now(),
            );
        }
        self.last_seq = last;
        self.core
            .metrics
            .source_position
            .store(self.last_seq as i64, Relaxed);
        let events = self.core.ingest(changes);
        self.batcher.push(events, Instant::now());
    }

    /// Reads new changes and hands what may go to the sink.
    fn capture(&mut self) {
        self.tail();
        self.linger = self.batcher.flush(Instant::now());
    }

    /// Keeps the change log at `retention` rows (never past our own read position).
    fn maybe_prune(&mut self) {
        if self.last_prune.elapsed() < PRUNE_EVERY {
            return;
        }
        self.last_prune = Instant::now();
        let bound = (self.last_seq as i64).saturating_sub(self.retention as i64);
        if bound <= 0 {
            return;
        }
        match self.conn.execute(&self.sql.prune, [bound]) {
            Ok(n) if n > 0 => tracing::debug!(rows = n, "change log pruned"),
            Ok(_) => {}
            Err(e) => tracing::debug!("change log prune skipped: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> Connection {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(&schema_sql("kv")).unwrap();
        c
    }

    fn log(c: &Connection) -> Vec<(String, Option<String>, i64, String)> {
        let mut s = c
            .prepare("SELECT k, v, version, op FROM kv_changes ORDER BY seq")
            .unwrap();
        s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    }

    #[test]
    fn sql_console_writes_are_logged_with_increasing_versions() {
        let c = mem();
        c.execute_batch(
            "INSERT INTO kv (k, v) VALUES ('a', '1');
             UPDATE kv SET v = '2' WHERE k = 'a';
             DELETE FROM kv WHERE k = 'a';
             INSERT INTO kv (k, v, version) VALUES ('b', '5', 1)
                ON CONFLICT(k) DO UPDATE SET v = excluded.v, version = kv.version + 1;",
        )
        .unwrap();
        let l = log(&c);
        assert_eq!(
            l,
            vec![
                ("a".into(), Some("1".into()), 1, "insert".into()),
                ("a".into(), Some("2".into()), 2, "update".into()),
                ("a".into(), None, 3, "delete".into()),
                ("b".into(), Some("5".into()), 1, "insert".into()),
            ]
        );
        // The delete left a tombstone so the next write continues the version sequence.
        c.execute("UPDATE kv SET v = '9', deleted = 0 WHERE k = 'a'", [])
            .unwrap();
        let last = log(&c).pop().unwrap();
        assert_eq!(last, ("a".into(), Some("9".into()), 4, "update".into()));
    }

    #[test]
    fn writes_log_database_assigned_versions() {
        let c = mem();
        let sql = Sql::new("kv");
        c.execute(&sql.upsert, params!["k", "1", 10]).unwrap();
        c.execute(&sql.upsert, params!["k", "2", 11]).unwrap();
        assert_eq!(c.execute(&sql.delete, params!["k", 12]).unwrap(), 1);
        assert_eq!(
            c.execute(&sql.delete, params!["k", 13]).unwrap(),
            0,
            "already deleted"
        );
        let end: i64 = c.query_row(&sql.log_end, [], |r| r.get(0)).unwrap();
        assert_eq!(end, 3);
        let rows: Vec<(i64, i64, String)> = c
            .prepare("SELECT version, ts, op FROM kv_changes ORDER BY seq")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(
            rows,
            vec![
                (1, 10, "insert".into()),
                (2, 11, "update".into()),
                (3, 12, "delete".into())
            ]
        );
    }

    #[test]
    fn non_json_values_become_json_strings() {
        assert_eq!(&*json_or_string("{\"a\":1}", "k"), "{\"a\":1}");
        assert_eq!(&*json_or_string("hello", "k"), "\"hello\"");
    }
}
