//! MySQL/MariaDB backend. Store operations (push/get/delete) run on one thread with an async
//! client (`mysql_async` on a single-threaded tokio runtime); changes are captured from the
//! binary log by `binlog` on another thread and delivered through a `Pipeline`. A write's own
//! change reaches listeners the same way as anyone else's: through the binlog, once.
//!
//! Server prerequisites for binlog capture: `log_bin=ON`, `binlog_format=ROW`,
//! `binlog_row_image=FULL`, and a user with REPLICATION SLAVE and REPLICATION CLIENT (MariaDB:
//! BINLOG MONITOR). TLS is not supported by the capture client: a server that requires TLS is
//! refused at `init()` with a clear error.

pub mod binlog;
mod bus;
pub mod poll;
pub mod rows;
mod socket;

use mysql_async::prelude::*;
use mysql_async::{Conn, Opts, OptsBuilder, TxOpts, Value as SqlValue};
use serde_json::json;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::ServerConfig;
use crate::core::cache::CacheEntry;
use crate::core::pipeline::Pipeline;
use crate::core::pipeline::SourceMsg;
use crate::core::Core;
use crate::error::{Error, Result};
use crate::event::{json_or_string, Event};
use crate::source::{SourceStatus, StoreContext};
use crate::store::{Completion, Op};
use binlog::{BinlogCapture, Checkpoint};
use bus::{take_over, BusLink};
use poll::Poller;
use rows::{Operations, WatchSpec, Watches};

/// How long `init()` waits for the server before failing with `USP_DB_UNAVAILABLE`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a changed capture checkpoint is written to the database.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);
/// Largest multi-row statement we build, in bytes of values (well under `max_allowed_packet`).
const MAX_STATEMENT_BYTES: usize = 4 << 20;
/// Largest write transaction, in bytes of keys and values, sent as one text query (see
/// `Store::write`); escaping can double it, well under the smallest default
/// `max_allowed_packet` (4 MiB in MySQL 5.7).
const INLINE_MAX_BYTES: usize = 1 << 20;
/// Shortest look-back of each poll (see `poll`).
const POLL_OVERLAP_MIN: Duration = Duration::from_secs(1);
/// Messages (each up to `CHUNK_ROWS` changes) waiting between capture and delivery.
const PIPELINE_CAPACITY: usize = 64;

/// Connection settings with the URI already merged (see `config`).
#[derive(Clone)]
pub struct Conninfo {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub database: String,
}

impl Conninfo {
    pub fn from_config(s: &ServerConfig) -> Conninfo {
        Conninfo {
            host: s.host.clone().unwrap_or_else(|| "127.0.0.1".into()),
            port: s.port.unwrap_or(3306),
            user: s.user.clone().unwrap_or_else(|| "root".into()),
            password: s.password.0.clone(),
            database: s.database.clone().unwrap_or_default(),
        }
    }

    pub fn opts(&self) -> Opts {
        OptsBuilder::default()
            .ip_or_hostname(self.host.clone())
            .tcp_port(self.port)
            .user(Some(self.user.clone()))
            .pass(Some(self.password.clone()))
            .db_name(Some(self.database.clone()))
            .prefer_socket(false)
            // A shared write transaction's statements have one placeholder group per call:
            // with 64 concurrent pushers that is over a hundred texts, and a smaller cache
            // prepared and closed statements on most transactions.
            .stmt_cache_size(256)
            .into()
    }
}

/// Maps a client error to ours. Never includes the password (the driver never prints it).
pub fn sql_error(e: mysql_async::Error, what: &str) -> Error {
    match &e {
        mysql_async::Error::Server(s) => match s.code {
            // Access denied, unknown database: retrying cannot help.
            // MariaDB answers 1045 also to a client without TLS when it requires TLS.
            1045 => Error::Db(format!(
                "{what}: the server refused the connection ({} {}); check user and password. This version connects without TLS: a server with require_secure_transport=ON refuses it the same way",
                s.code, s.message
            )),
            1044 | 1049 | 1698 => Error::Db(format!(
                "{what}: the server refused the connection ({} {}); check user, password and database",
                s.code, s.message
            )),
            1205 | 1213 => Error::DbBusy(format!(
                "{what}: {} (lock wait or deadlock); retry the call",
                s.message
            )),
            3159 => Error::Db(format!(
                "{what}: the server requires TLS, which this version does not support ({})",
                s.message
            )),
            _ => Error::Db(format!("{what}: server error {}: {}", s.code, s.message)),
        },
        mysql_async::Error::Io(_) => Error::DbUnavailable(format!(
            "{what}: the MySQL server is not reachable ({e}); the connection is retried on the next call"
        )),
        _ => Error::Db(format!("{what}: {e}")),
    }
}

/// The statements of the key-value table, built once from the validated table name.
struct Sql {
    table: String,
    get_prefix: String,
    lock_prefix: String,
    upsert_prefix: String,
    upsert_suffix: &'static str,
    delete_prefix: String,
    save_checkpoint: String,
}

impl Sql {
    fn new(t: &str) -> Sql {
        Sql {
            table: t.into(),
            get_prefix: format!("SELECT k, v, version, deleted FROM `{t}` WHERE k IN ("),
            lock_prefix: format!("SELECT k, version, deleted FROM `{t}` WHERE k IN ("),
            upsert_prefix: format!("INSERT INTO `{t}` (k, v, version, deleted) VALUES "),
            upsert_suffix: " ON DUPLICATE KEY UPDATE v = VALUES(v), version = version + 1, deleted = 0, updated_at = CURRENT_TIMESTAMP(6)",
            delete_prefix: format!(
                "UPDATE `{t}` SET v = NULL, version = version + 1, deleted = 1, updated_at = CURRENT_TIMESTAMP(6) WHERE deleted = 0 AND k IN ("
            ),
            save_checkpoint: format!(
                "INSERT INTO `{t}_checkpoint` (name, file, pos) VALUES (?, ?, ?) ON DUPLICATE KEY UPDATE file = VALUES(file), pos = VALUES(pos)"
            ),
        }
    }

    /// The statements of a write transaction, in call order: a multi-row upsert per run of
    /// puts (split at `MAX_STATEMENT_BYTES`), a multi-row delete per run of deletes. With
    /// `inline` (whether the session has NO_BACKSLASH_ESCAPES) the values are escaped literals
    /// in the text; without it, placeholders with their parameters.
    fn writes(&self, writes: &[Op], inline: Option<bool>) -> Vec<(String, Vec<SqlValue>)> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < writes.len() {
            let mut text = String::new();
            let mut params = Vec::new();
            match &writes[i] {
                Op::Put { .. } => {
                    text.push_str(&self.upsert_prefix);
                    let mut bytes = 0;
                    let mut n = 0;
                    while let Some(Op::Put { key, json, .. }) = writes.get(i) {
                        if n > 0 && bytes + json.len() > MAX_STATEMENT_BYTES {
                            break;
                        }
                        bytes += json.len() + key.len();
                        text.push_str(if n == 0 { "(" } else { ",(" });
                        push_arg(&mut text, &mut params, key, inline);
                        text.push(',');
                        push_arg(&mut text, &mut params, json, inline);
                        text.push_str(",1,0)");
                        n += 1;
                        i += 1;
                    }
                    text.push_str(self.upsert_suffix);
                }
                Op::Delete { .. } => {
                    text.push_str(&self.delete_prefix);
                    let mut n = 0;
                    while let Some(Op::Delete { key, .. }) = writes.get(i) {
                        if n > 0 {
                            text.push(',');
                        }
                        push_arg(&mut text, &mut params, key, inline);
                        n += 1;
                        i += 1;
                    }
                    text.push(')');
                }
                _ => {
                    i += 1;
                    continue;
                }
            }
            out.push((text, params));
        }
        out
    }

    /// The lock read of a write transaction: the current version of each key, `FOR UPDATE`.
    /// `inline` as for [`Sql::writes`].
    fn lock(&self, keys: &[&str], inline: Option<bool>) -> (String, Vec<SqlValue>) {
        let mut text = self.lock_prefix.clone();
        let mut params = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            if i > 0 {
                text.push(',');
            }
            push_arg(&mut text, &mut params, k, inline);
        }
        text.push_str(") FOR UPDATE");
        (text, params)
    }

    fn schema(&self, mariadb: bool) -> Vec<String> {
        let t = &self.table;
        // Keys compare byte for byte and without trailing-space padding: 'a' and 'a ' and 'A'
        // are three keys.
        let key_collation = if mariadb {
            "utf8mb4_nopad_bin"
        } else {
            "utf8mb4_0900_bin"
        };
        vec![
            format!(
                "CREATE TABLE IF NOT EXISTS `{t}` (
                   k VARCHAR(191) CHARACTER SET utf8mb4 COLLATE {key_collation} NOT NULL PRIMARY KEY,
                   v LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
                   version BIGINT UNSIGNED NOT NULL DEFAULT 1,
                   deleted TINYINT NOT NULL DEFAULT 0,
                   updated_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
                   KEY `{t}_updated` (updated_at, k)
                 ) ENGINE=InnoDB"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS `{t}_checkpoint` (
                   name VARCHAR(64) NOT NULL PRIMARY KEY,
                   file VARCHAR(255) NOT NULL,
                   pos BIGINT UNSIGNED NOT NULL,
                   updated_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6)
                 ) ENGINE=InnoDB"
            ),
        ]
    }
}

/// Appends `v` to a statement: an escaped literal when `inline` is set (its value: whether the
/// session has NO_BACKSLASH_ESCAPES), else a placeholder with its parameter.
fn push_arg(text: &mut String, params: &mut Vec<SqlValue>, v: &str, inline: Option<bool>) {
    match inline {
        Some(nbs) => text.push_str(&SqlValue::from(v).as_sql(nbs)),
        None => {
            text.push('?');
            params.push(SqlValue::from(v));
        }
    }
}

fn placeholders(n: usize) -> String {
    let mut s = String::with_capacity(n * 2);
    for i in 0..n {
        if i > 0 {
            s.push(',');
        }
        s.push('?');
    }
    s
}

/// What `init()` found on the server.
#[derive(Debug, Clone)]
pub struct ServerFacts {
    pub version: String,
    pub mariadb: bool,
    pub log_bin: bool,
    pub binlog_format: String,
    pub binlog_row_image: String,
    pub binlog_row_metadata: Option<String>,
    pub replication_grants: bool,
}

impl ServerFacts {
    /// Why binlog capture cannot run, if it cannot.
    pub fn binlog_problem(&self) -> Option<String> {
        if !self.log_bin {
            return Some("binary logging is off (start the server with log_bin)".into());
        }
        if !self.binlog_format.eq_ignore_ascii_case("ROW") {
            return Some(format!(
                "binlog_format is {}; ROW is needed",
                self.binlog_format
            ));
        }
        if !self.binlog_row_image.eq_ignore_ascii_case("FULL") {
            return Some(format!(
                "binlog_row_image is {}; FULL is needed",
                self.binlog_row_image
            ));
        }
        if !self.replication_grants {
            return Some(
                "the user lacks REPLICATION SLAVE and REPLICATION CLIENT (BINLOG MONITOR) privileges"
                    .into(),
            );
        }
        None
    }

    fn to_json(&self) -> serde_json::Value {
        json!({
            "version": self.version,
            "flavor": if self.mariadb { "mariadb" } else { "mysql" },
            "logBin": self.log_bin,
            "binlogFormat": self.binlog_format,
            "binlogRowImage": self.binlog_row_image,
            "binlogRowMetadata": self.binlog_row_metadata,
            "replicationGrants": self.replication_grants,
        })
    }
}

async fn server_facts(conn: &mut Conn) -> Result<ServerFacts> {
    let e = |e| sql_error(e, "reading server settings");
    type Settings = (String, Option<String>, Option<String>, Option<String>);
    let row: Option<Settings> = conn
        .query_first("SELECT @@version, @@log_bin, @@binlog_format, @@binlog_row_image")
        .await
        .map_err(e)?;
    let (version, log_bin, format, image) = row.unwrap_or_default();
    // Older servers have no binlog_row_metadata.
    let metadata: Option<String> = conn
        .query_first::<Option<String>, _>("SELECT @@binlog_row_metadata")
        .await
        .ok()
        .flatten()
        .flatten();
    let grants: Vec<String> = conn.query("SHOW GRANTS").await.map_err(e)?;
    let has = |p: &str| {
        grants.iter().any(|g| {
            let g = g.to_ascii_uppercase();
            g.contains(" ON *.*") && (g.contains(p) || g.contains("ALL PRIVILEGES"))
        })
    };
    let replication_grants =
        has("REPLICATION SLAVE") && (has("REPLICATION CLIENT") || has("BINLOG MONITOR"));
    Ok(ServerFacts {
        mariadb: version.to_ascii_lowercase().contains("mariadb"),
        version,
        log_bin: matches!(log_bin.as_deref(), Some("1") | Some("ON")),
        binlog_format: format.unwrap_or_default(),
        binlog_row_image: image.unwrap_or_default(),
        binlog_row_metadata: metadata,
        replication_grants,
    })
}

/// Everything the MySQL store thread needs.
pub struct MysqlStoreThread {
    pub server: ServerConfig,
    pub ctx: StoreContext,
    pub status: Arc<SourceStatus>,
    /// `options.redis`: capture only while holding the lease; deliver from the Redis stream.
    pub redis: Option<crate::config::RedisConfig>,
    pub bus_status: Option<Arc<crate::bus::BusStatus>>,
}

struct Store {
    info: Conninfo,
    conn: Option<Conn>,
    sql: Sql,
    core: Arc<Core>,
    checkpoint_name: String,
    saved: Option<Resume>,
    /// The session's `sql_mode` has NO_BACKSLASH_ESCAPES: string literals escape quotes only.
    no_backslash_escapes: bool,
}

/// What `Store::start` found.
struct Started {
    facts: ServerFacts,
    columns: Vec<String>,
    /// The saved checkpoint, and when it was saved (µs since the epoch).
    saved: Option<(Resume, i64)>,
}

/// Where a streamer resumes, as delivered by the pipeline and saved in `<table>_checkpoint`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// A transaction end in the binary log.
    Binlog { file: String, pos: u32 },
    /// Polled rows were delivered up to this `updated_at` (µs since the epoch).
    Poll { ts_us: i64 },
}

impl crate::core::pipeline::Checkpoint for Resume {}

/// `file` value of a polling checkpoint row (no binlog file has this name).
const POLL_MARK: &str = "@poll";
/// `updated_at` in µs since the epoch; the engine's sessions run in UTC.
const EPOCH_US: &str = "TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', updated_at)";

/// Capture while this instance captures: its context, the poller if polling, and in bus mode
/// the appender of its lease term.
struct Capturing {
    ctx: CaptureContext,
    poller: Option<Polling>,
    appender: Option<crate::bus::append::Appender<Resume>>,
    term: u64,
}

impl Capturing {
    /// Stops capture; in bus mode returns the checkpoint of the last entry appended.
    fn stop(self) -> Option<Resume> {
        self.ctx.stop.store(true, Relaxed);
        if let Some(p) = self.poller {
            p.join();
        }
        self.appender.and_then(|a| a.stop())
    }
}

impl MysqlStoreThread {
    pub fn run(self) {
        let MysqlStoreThread {
            server,
            ctx,
            status,
            redis,
            bus_status,
        } = self;
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
        let fail = |e: Error, rx: Receiver<Op>| {
            crate::source::fail_init("mysql", e, rx, init_id, &core, &*completions)
        };
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => return fail(Error::Internal(format!("tokio runtime: {e}")), rx),
        };
        let info = Conninfo::from_config(&server);
        let mut store = Store {
            info: info.clone(),
            conn: None,
            sql: Sql::new(&server.table),
            core: core.clone(),
            checkpoint_name: server.capture.checkpoint_name.clone(),
            saved: None,
            no_backslash_escapes: false,
        };
        let started = match rt.block_on(store.start(&status)) {
            Ok(s) => s,
            Err(e) => return fail(e, rx),
        };
        connected.store(true, Relaxed);
        let pipeline = match Pipeline::start(
            "usp-mysql-delivery",
            "mysql",
            core.clone(),
            sink,
            batch,
            PIPELINE_CAPACITY,
            started.saved.as_ref().map(|(r, _)| r.clone()),
        ) {
            Ok(p) => p,
            Err(e) => return fail(Error::Internal(format!("delivery thread: {e}")), rx),
        };
        let watches = Watches::default();
        let fast_path = match (server.use_change_streams, started.facts.binlog_problem()) {
            (false, _) => Err("option useChangeStreams is false".to_string()),
            (true, Some(why)) => Err(why),
            (true, None) => Ok(()),
        };
        // Tables watched from the start: registered before capture reads anything.
        for table in &server.capture.watch {
            match rt.block_on(store.watch_spec(table, Operations::default())) {
                Ok(spec) => {
                    watches
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(spec.table.clone(), Arc::new(spec));
                }
                Err(e) => {
                    pipeline.stop();
                    return fail(
                        Error::InvalidConfig(format!("options.capture.watch: {e}")),
                        rx,
                    );
                }
            }
        }
        let new_ctx = |tx| CaptureContext {
            info: info.clone(),
            server: server.clone(),
            columns: started.columns.clone(),
            tx,
            status: status.clone(),
            metrics: core.metrics.clone(),
            stop: Arc::new(AtomicBool::new(false)),
            watches: watches.clone(),
        };
        let mut capturing: Option<Capturing> = None;
        let mut bus: Option<BusLink> = None;
        match (&redis, &bus_status) {
            (Some(cfg), Some(bs)) => {
                match BusLink::open(cfg, bs.clone(), pipeline.sender(), &core) {
                    Ok(b) => bus = Some(b),
                    Err(e) => {
                        pipeline.stop();
                        return fail(e, rx);
                    }
                }
                status.set_mode("follower");
                bs.set_leader(false);
            }
            _ => {
                let ctx = new_ctx(pipeline.sender());
                match start_capture(&rt, &mut store, &ctx, started.saved.clone(), &fast_path) {
                    Ok((poller, _)) => {
                        capturing = Some(Capturing {
                            ctx,
                            poller,
                            appender: None,
                            term: 0,
                        })
                    }
                    Err(e) => {
                        ctx.stop.store(true, Relaxed);
                        pipeline.stop();
                        return fail(e, rx);
                    }
                }
            }
        }
        // Bus mode: capture while this instance holds the lease, stop when it lost it.
        let follow_lease = |store: &mut Store, capturing: &mut Option<Capturing>| {
            if let Some(b) = &bus {
                take_over(&rt, store, b, capturing, &new_ctx, &fast_path, &status);
            }
        };
        // The first instance of a stream captures before `init()` resolves.
        follow_lease(&mut store, &mut capturing);
        tracing::info!(table = %server.table, version = %started.facts.version, mode = status.mode(), "mysql store ready");
        ready.store(true, Relaxed);
        completions.complete(vec![Completion::Ready { id: init_id }]);

        let mut shutdown = None;
        let mut last_save = Instant::now();
        let mut last_retry = Instant::now();
        let retry_every = Duration::from_millis(server.capture.fast_path_retry_ms);
        let tick = match &redis {
            Some(r) => Duration::from_millis(r.lease_ms / 6).min(CHECKPOINT_EVERY),
            None => CHECKPOINT_EVERY,
        };
        while shutdown.is_none() {
            match rx.recv_timeout(tick.min(retry_every)) {
                Ok(op) => {
                    let ops = crate::source::take_batch(op, &rx, write_batch_size, &core.metrics);
                    let (watch_ops, ops): (Vec<Op>, Vec<Op>) =
                        ops.into_iter().partition(|o| matches!(o, Op::Watch { .. }));
                    let mut done = Vec::new();
                    for w in watch_ops {
                        let Op::Watch {
                            id,
                            table,
                            insert,
                            update,
                            delete,
                        } = w
                        else {
                            continue;
                        };
                        let polling = capturing.as_ref().is_some_and(|c| c.poller.is_some());
                        let r = if bus.is_some() {
                            Err(Error::UnsupportedBackend(format!(
                                "watch('{table}') at run time is not available with options.redis: list the table in options.mysql.watch of every instance"
                            )))
                        } else if polling {
                            Err(Error::UnsupportedBackend(format!(
                                "watch('{table}') needs binlog capture, and this streamer is polling (see getStatus().source.server); give the user REPLICATION SLAVE and REPLICATION CLIENT and turn on the binary log"
                            )))
                        } else {
                            rt.block_on(store.watch_spec(
                                &table,
                                Operations {
                                    insert,
                                    update,
                                    delete,
                                },
                            ))
                        };
                        done.push(match r {
                            Ok(spec) => {
                                tracing::info!(table = %spec.table, "watching table");
                                watches
                                    .write()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .insert(spec.table.clone(), Arc::new(spec));
                                Completion::Ready { id }
                            }
                            Err(error) => Completion::Failed { id, error },
                        });
                    }
                    let (more, stop_id) = rt.block_on(store.execute(ops));
                    done.extend(more);
                    shutdown = stop_id;
                    connected.store(store.conn.is_some(), Relaxed);
                    if !done.is_empty() {
                        completions.complete(done);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if shutdown.is_some() {
                break;
            }
            follow_lease(&mut store, &mut capturing);
            if last_save.elapsed() >= CHECKPOINT_EVERY {
                last_save = Instant::now();
                let cp = match &capturing {
                    Some(Capturing {
                        appender: Some(a), ..
                    }) => a.delivered(),
                    Some(_) => pipeline.delivered(),
                    None => None,
                };
                if let Some(cp) = cp {
                    rt.block_on(store.save_checkpoint(&cp));
                }
            }
            let polling = capturing.as_ref().is_some_and(|c| c.poller.is_some());
            if polling && server.use_change_streams && last_retry.elapsed() >= retry_every {
                last_retry = Instant::now();
                let cap = capturing.as_mut().expect("polling implies capturing");
                if rt.block_on(store.try_fast_path(&cap.ctx)) {
                    // Binlog capture is live from a position before the poller's last poll:
                    // the overlap is deduplicated by version.
                    if let Some(p) = cap.poller.take() {
                        p.finish_and_join();
                    }
                    status.set_mode("binlog");
                    tracing::info!("binlog capture available again: polling stopped");
                    let _ = cap.ctx.tx.send(SourceMsg::Notice(Event::Mode {
                        source: "mysql",
                        mode: "binlog",
                        reason: "binlog capture is available: polling stopped".into(),
                    }));
                }
            }
        }
        // Capture stops sending; what it already sent is delivered (in bus mode: appended, and
        // read back from the stream); the final checkpoint is where the next streamer resumes.
        let appended = capturing.take().and_then(|c| c.stop());
        if let Some(b) = bus.take() {
            b.lease.stop();
            b.consumer.stop();
        }
        let delivered = pipeline.stop();
        let last = if redis.is_some() { appended } else { delivered };
        if let Some(cp) = last {
            rt.block_on(store.save_checkpoint(&cp));
        }
        // Anything queued after the close is refused; the queue is dropped here, so later calls
        // fail at once with USP_CLOSED.
        let mut refused = crate::source::refuse_queued(rx, &core.metrics);
        if let Some(c) = store.conn.take() {
            let _ = rt.block_on(c.disconnect());
        }
        connected.store(false, Relaxed);
        status.set_mode("closed");
        tracing::info!("mysql store stopped");
        if let Some(id) = shutdown {
            refused.push(Completion::Closed { id });
        }
        if !refused.is_empty() {
            completions.complete(refused);
        }
    }
}

/// Starts capture from `saved`: binlog when possible, else polling (announced). Returns the
/// poller when polling, and the binlog position capture starts at.
fn start_capture(
    rt: &tokio::runtime::Runtime,
    store: &mut Store,
    ctx: &CaptureContext,
    saved: Option<(Resume, i64)>,
    fast_path: &std::result::Result<(), String>,
) -> Result<(Option<Polling>, Option<Resume>)> {
    let server = &ctx.server;
    if fast_path.is_ok() {
        let start = rt.block_on(store.binlog_start(saved.as_ref().map(|(r, _)| r)))?;
        let first = start.resume();
        ctx.start_binlog(start)?;
        // The starting point is saved at once: a streamer closed before any change still
        // resumes here.
        rt.block_on(store.save_checkpoint(&first));
        if let Some((Resume::Poll { ts_us }, _)) = saved {
            // The previous streamer polled: one catch-up poll covers the gap.
            match ctx.start_poller(Some(ts_us), true) {
                Ok(p) => p.finish_and_join(),
                Err(e) => tracing::warn!("catch-up poll not started: {e}"),
            }
        }
        ctx.status.set_mode("binlog");
        return Ok((None, Some(first)));
    }
    let why = fast_path.clone().err().unwrap_or_default();
    let from = match &saved {
        Some((Resume::Poll { ts_us }, _)) => Some(*ts_us),
        // Resuming from the binlog in polling mode: from when its checkpoint was saved (the
        // overlap window covers the rest).
        Some((Resume::Binlog { .. }, at)) => Some(*at),
        None => None,
    };
    let poller = ctx.start_poller(from, false)?;
    tracing::warn!(
        "binlog capture not possible ({why}): polling every {} ms",
        server.polling_interval_ms
    );
    ctx.status.set_mode("polling");
    let unwatched = if server.capture.watch.is_empty() {
        String::new()
    } else {
        format!(
            "; rows of the watched tables ({}) are NOT delivered while polling",
            server.capture.watch.join(", ")
        )
    };
    let _ = ctx.tx.send(SourceMsg::Notice(Event::Mode {
        source: "mysql",
        mode: "polling",
        reason: format!(
            "binlog capture is not possible: {why}; polling every {} ms (intermediate versions between polls are not delivered){unwatched}",
            server.polling_interval_ms
        ),
    }));
    Ok((Some(poller), None))
}

/// What starting a capture thread needs, shared by the binlog and polling paths.
struct CaptureContext {
    info: Conninfo,
    server: ServerConfig,
    columns: Vec<String>,
    /// Where capture sends: the delivery pipeline, or in bus mode the Redis appender.
    tx: std::sync::mpsc::SyncSender<SourceMsg<Resume>>,
    status: Arc<SourceStatus>,
    metrics: Arc<crate::metrics::Metrics>,
    /// Set at close: every capture thread stops.
    stop: Arc<AtomicBool>,
    watches: Watches,
}

/// A running poller.
struct Polling {
    finish: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<()>,
}

impl Polling {
    /// One more complete poll, then stop.
    fn finish_and_join(self) {
        self.finish.store(true, Relaxed);
        let _ = self.handle.join();
    }

    fn join(self) {
        let _ = self.handle.join();
    }
}

impl CaptureContext {
    /// Starts binlog capture from `start` and waits until the stream is live.
    fn start_binlog(&self, start: Checkpoint) -> Result<()> {
        let (live_tx, live_rx) = std::sync::mpsc::sync_channel(1);
        let m = &self.server.capture;
        let capture = BinlogCapture {
            info: self.info.clone(),
            server_id: m
                .server_id
                .unwrap_or_else(|| 100_000 + crate::source::rand_u32() % 2_000_000_000),
            heartbeat: Duration::from_millis(m.heartbeat_ms),
            reconnect_min: Duration::from_millis(m.reconnect_min_ms),
            reconnect_max: Duration::from_millis(m.reconnect_max_ms),
            table: self.server.table.clone(),
            columns: self.columns.clone(),
            start,
            tx: self.tx.clone(),
            stop: self.stop.clone(),
            status: self.status.clone(),
            metrics: self.metrics.clone(),
            live: Some(live_tx),
            watches: self.watches.clone(),
        };
        let (guard_status, guard_metrics) = (self.status.clone(), self.metrics.clone());
        std::thread::Builder::new()
            .name("usp-mysql-binlog".into())
            .spawn(move || {
                // A panic in the binlog decoder stops capture; it must be loud, never silent.
                if let Err(p) =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| capture.run()))
                {
                    let e = Error::Internal(format!(
                        "binlog capture stopped: {}; changes after the saved checkpoint are delivered by the next streamer",
                        crate::error::panic_message(&*p)
                    ));
                    tracing::error!("{e}");
                    guard_metrics.record_error(&e);
                    guard_status.set_mode("failed");
                }
            })
            .map_err(|e| Error::Internal(format!("binlog thread: {e}")))?;
        // Live before returning, so no change after `init()` (or after a switch) is late.
        live_rx
            .recv_timeout(CONNECT_TIMEOUT)
            .unwrap_or_else(|_| Err("the binlog stream did not start in time".into()))
            .map_err(|why| {
                Error::Db(format!(
                    "binlog capture could not start: {why}. Check that the user has REPLICATION SLAVE and that serverId is unique"
                ))
            })
    }

    /// Starts the poller from `from` (µs of `updated_at`; `None`: now). With `finish`, it polls
    /// once and stops.
    fn start_poller(&self, from: Option<i64>, finish: bool) -> Result<Polling> {
        let finish_flag = Arc::new(AtomicBool::new(finish));
        let interval = Duration::from_millis(self.server.polling_interval_ms);
        let poller = Poller {
            info: self.info.clone(),
            table: self.server.table.clone(),
            interval,
            overlap: (interval * 2).max(POLL_OVERLAP_MIN),
            start: from,
            tx: self.tx.clone(),
            finish: finish_flag.clone(),
            stop: self.stop.clone(),
            metrics: self.metrics.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("usp-mysql-poll".into())
            .spawn(move || poller.run())
            .map_err(|e| Error::Internal(format!("polling thread: {e}")))?;
        Ok(Polling {
            finish: finish_flag,
            handle,
        })
    }
}

impl Store {
    async fn conn(&mut self) -> Result<&mut Conn> {
        if self.conn.is_none() {
            let c = tokio::time::timeout(CONNECT_TIMEOUT, Conn::new(self.info.opts()))
                .await
                .map_err(|_| {
                    Error::DbUnavailable(format!(
                        "connecting to MySQL at {}:{} timed out after {}s",
                        self.info.host,
                        self.info.port,
                        CONNECT_TIMEOUT.as_secs()
                    ))
                })?
                .map_err(|e| sql_error(e, "connecting to MySQL"))?;
            let mut c = c;
            c.query_drop("SET time_zone = '+00:00'")
                .await
                .map_err(|e| sql_error(e, "setting the session time zone"))?;
            // Write transactions carry their values as escaped literals (see `write`), and
            // how to escape depends on this mode.
            let nbs: Option<bool> = c
                .query_first("SELECT INSTR(@@SESSION.sql_mode, 'NO_BACKSLASH_ESCAPES') > 0")
                .await
                .map_err(|e| sql_error(e, "reading the session sql_mode"))?;
            self.no_backslash_escapes = nbs.unwrap_or(false);
            self.conn = Some(c);
        }
        Ok(self.conn.as_mut().expect("set above"))
    }

    /// Checks the server, creates the tables, and reads the saved checkpoint.
    async fn start(&mut self, status: &SourceStatus) -> Result<Started> {
        let facts = server_facts(self.conn().await?).await?;
        status.set_server(facts.to_json());
        let statements = self.sql.schema(facts.mariadb);
        for s in statements {
            self.conn()
                .await?
                .query_drop(s)
                .await
                .map_err(|e| sql_error(e, "creating the key-value table"))?;
        }
        let table = self.sql.table.clone();
        let db = self.info.database.clone();
        let conn = self.conn().await?;
        let columns: Vec<String> = conn
            .exec(
                "SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
                (db, table.clone()),
            )
            .await
            .map_err(|e| sql_error(e, "reading the table's columns"))?;
        for needed in ["k", "v", "version", "deleted", "updated_at"] {
            if !columns.iter().any(|c| c == needed) {
                return Err(Error::Db(format!(
                    "table `{table}` exists without column `{needed}`; point option `table` at a new table name"
                )));
            }
        }
        Ok(Started {
            facts,
            columns,
            saved: self.read_saved().await?,
        })
    }

    /// The capture checkpoint saved in `<table>_checkpoint`, and when it was saved.
    async fn read_saved(&mut self) -> Result<Option<(Resume, i64)>> {
        let table = self.sql.table.clone();
        let name = self.checkpoint_name.clone();
        let saved: Option<(String, u64, i64)> = self
            .conn()
            .await?
            .exec_first(
                format!("SELECT file, pos, {EPOCH_US} FROM `{table}_checkpoint` WHERE name = ?"),
                (name,),
            )
            .await
            .map_err(|e| sql_error(e, "reading the capture checkpoint"))?;
        Ok(saved.map(|(file, pos, at)| {
            let resume = if file == POLL_MARK {
                Resume::Poll { ts_us: pos as i64 }
            } else {
                Resume::Binlog {
                    file,
                    pos: pos as u32,
                }
            };
            (resume, at)
        }))
    }

    /// Where binlog capture starts: the saved position if its file is still on the server, else
    /// the current end (with a resync reason when a saved position was lost).
    async fn binlog_start(&mut self, saved: Option<&Resume>) -> Result<Checkpoint> {
        let logs: Vec<(String, u64)> = self
            .conn()
            .await?
            .query("SHOW BINARY LOGS")
            .await
            .map_err(|e| sql_error(e, "listing binary logs"))?;
        let (cf, cpos) = logs.last().cloned().unwrap_or_default();
        let current = Checkpoint {
            file: cf,
            pos: cpos as u32,
            resync: None,
        };
        Ok(match saved {
            Some(Resume::Binlog { file, pos }) if logs.iter().any(|(f, _)| f == file) => {
                Checkpoint {
                    file: file.clone(),
                    pos: *pos,
                    resync: None,
                }
            }
            Some(Resume::Binlog { file, pos }) => {
                tracing::warn!(
                    file,
                    pos,
                    "capture checkpoint was purged from the binary logs: resync"
                );
                Checkpoint {
                    resync: Some(format!(
                        "the binary log {file} holding this streamer's checkpoint ({file}:{pos}) was purged; changes since then cannot be replayed. Continuing from the current state"
                    )),
                    ..current
                }
            }
            _ => current,
        })
    }

    async fn save_checkpoint(&mut self, cp: &Resume) {
        if self.saved.as_ref() == Some(cp) {
            return;
        }
        let stmt = self.sql.save_checkpoint.clone();
        let (file, pos) = match cp {
            Resume::Binlog { file, pos } => (file.clone(), *pos as u64),
            Resume::Poll { ts_us } => (POLL_MARK.to_string(), (*ts_us).max(0) as u64),
        };
        let params = (self.checkpoint_name.clone(), file, pos);
        let r = match self.conn().await {
            Ok(c) => c
                .exec_drop(stmt, params)
                .await
                .map_err(|e| sql_error(e, "saving the checkpoint")),
            Err(e) => Err(e),
        };
        match r {
            Ok(()) => self.saved = Some(cp.clone()),
            Err(e) => {
                self.drop_conn_on_io(&e);
                tracing::warn!(code = e.code(), "capture checkpoint not saved: {e}");
            }
        }
    }

    /// In polling mode: checks whether binlog capture has become possible and, if so, starts
    /// it from the current end of the binlog. True when binlog capture is live.
    async fn try_fast_path(&mut self, ctx: &CaptureContext) -> bool {
        // A session keeps the global privileges it had at connect: look with a new one.
        if let Some(c) = self.conn.take() {
            let _ = c.disconnect().await;
        }
        let facts = match self.conn().await {
            Ok(c) => server_facts(c).await,
            Err(e) => Err(e),
        };
        let facts = match facts {
            Ok(f) => f,
            Err(e) => {
                self.drop_conn_on_io(&e);
                return false;
            }
        };
        ctx.status.set_server(facts.to_json());
        if facts.binlog_problem().is_some() {
            return false;
        }
        let start = match self.binlog_start(None).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("binlog position unavailable: {e}");
                return false;
            }
        };
        match ctx.start_binlog(start) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("binlog capture still not possible: {e}");
                false
            }
        }
    }

    /// Reads what decoding `table`'s rows needs from information_schema.
    /// The name was validated by `Engine::watch` or the config.
    async fn watch_spec(&mut self, table: &str, operations: Operations) -> Result<WatchSpec> {
        let db = self.info.database.clone();
        rows::read_spec(self.conn().await?, &db, table, operations).await
    }

    fn drop_conn_on_io(&mut self, e: &Error) {
        if matches!(e, Error::DbUnavailable(_)) {
            self.conn = None;
        }
    }

    /// Runs a batch of operations: all writes in one transaction, then the reads.
    async fn execute(&mut self, ops: Vec<Op>) -> (Vec<Completion>, Option<u32>) {
        let mut writes = Vec::new();
        let mut reads = Vec::new();
        let mut shutdown = None;
        for op in ops {
            match op {
                Op::Put { .. } | Op::Delete { .. } => writes.push(op),
                Op::Get { id, key } => reads.push((id, key)),
                Op::Shutdown { id } => shutdown = Some(id),
                Op::Watch { .. } | Op::Wake => {}
            }
        }
        let mut done = Vec::with_capacity(writes.len() + reads.len());
        if !writes.is_empty() {
            let mut attempt = 0;
            loop {
                attempt += 1;
                match self.write(&writes).await {
                    Ok(c) => {
                        done.extend(c);
                        break;
                    }
                    Err(e) if matches!(e, Error::DbBusy(_)) && attempt < 3 => continue,
                    Err(e) => {
                        self.drop_conn_on_io(&e);
                        self.core.metrics.record_error(&e);
                        for op in &writes {
                            if let Some(id) = op.id() {
                                done.push(Completion::Failed {
                                    id,
                                    error: e.clone(),
                                });
                            }
                        }
                        break;
                    }
                }
            }
        }
        if !reads.is_empty() {
            match self.read(&reads).await {
                Ok(c) => done.extend(c),
                Err(e) => {
                    self.drop_conn_on_io(&e);
                    self.core.metrics.record_error(&e);
                    for (id, _) in &reads {
                        done.push(Completion::Failed {
                            id: *id,
                            error: e.clone(),
                        });
                    }
                }
            }
        }
        (done, shutdown)
    }

    /// One transaction: lock the rows, apply puts and deletes as multi-row statements in call
    /// order, and compute each call's version from the locked rows (exact, since nobody else can
    /// change them until commit).
    ///
    /// A round trip to the server costs more than the statements of a typical shared
    /// transaction, so the whole transaction goes as one multi-statement text query with its
    /// values as escaped literals: the statements do not depend on what the lock read returns,
    /// only the versions do. A transaction with more than `INLINE_MAX_BYTES` of keys and values
    /// uses prepared statements instead (one round trip each), which pass large values as
    /// parameters, never as text near `max_allowed_packet`.
    async fn write(&mut self, writes: &[Op]) -> Result<Vec<Completion>> {
        let mut keys: Vec<&str> = Vec::with_capacity(writes.len());
        let mut bytes = 0;
        for op in writes {
            match op {
                Op::Put { key, json, .. } => {
                    keys.push(key);
                    bytes += key.len() + json.len();
                }
                Op::Delete { key, .. } => {
                    keys.push(key);
                    bytes += key.len();
                }
                _ => {}
            }
        }
        keys.sort_unstable();
        keys.dedup();
        let locked = if bytes <= INLINE_MAX_BYTES {
            self.write_inline(&keys, writes).await?
        } else {
            self.write_prepared(&keys, writes).await?
        };
        // key -> (version, deleted), as the statements leave it.
        let mut state: HashMap<String, (u64, bool)> = locked
            .into_iter()
            .map(|(k, v, d)| (k, (v, d != 0)))
            .collect();
        let mut done = Vec::with_capacity(writes.len());
        // What the cache learns at commit, for read-your-writes before
        // the binlog brings the same change.
        let caching = self.core.cache.is_some();
        let mut learned: Vec<(&Arc<str>, CacheEntry)> = Vec::new();
        for op in writes {
            match op {
                Op::Put { id, key, json } => {
                    let entry = state.entry(key.to_string()).or_insert((0, false));
                    entry.0 += 1;
                    entry.1 = false;
                    done.push(Completion::Pushed {
                        id: *id,
                        version: entry.0,
                    });
                    if caching {
                        learned.push((
                            key,
                            CacheEntry {
                                version: entry.0,
                                value: Some(json.as_str().into()),
                            },
                        ));
                    }
                }
                Op::Delete { id, key } => {
                    let existed = match state.get_mut(&**key) {
                        Some(s) if !s.1 => {
                            s.0 += 1;
                            s.1 = true;
                            if caching {
                                learned.push((
                                    key,
                                    CacheEntry {
                                        version: s.0,
                                        value: None,
                                    },
                                ));
                            }
                            true
                        }
                        _ => false,
                    };
                    done.push(Completion::Deleted { id: *id, existed });
                }
                _ => {}
            }
        }
        if let Some(cache) = &self.core.cache {
            for (key, entry) in learned {
                cache.refresh(key, entry);
            }
        }
        let m = &self.core.metrics;
        m.transactions.fetch_add(1, Relaxed);
        m.writes.fetch_add(done.len() as u64, Relaxed);
        Ok(done)
    }

    /// Runs the transaction as one text query; returns the locked rows as they were before it.
    async fn write_inline(
        &mut self,
        keys: &[&str],
        writes: &[Op],
    ) -> Result<Vec<(String, u64, i8)>> {
        let nbs = self.no_backslash_escapes;
        let mut text = String::from("START TRANSACTION;");
        text.push_str(&self.sql.lock(keys, Some(nbs)).0);
        for (stmt, _) in self.sql.writes(writes, Some(nbs)) {
            text.push(';');
            text.push_str(&stmt);
        }
        text.push_str(";COMMIT");
        let conn = self.conn().await?;
        let e = |e| sql_error(e, "writing");
        let run = async {
            let mut r = conn.query_iter(text).await?;
            // START TRANSACTION, then the lock read; the rest ends with COMMIT.
            r.collect::<mysql_async::Row>().await?;
            let rows = r.try_collect::<(String, u64, i8)>().await?;
            r.drop_result().await?;
            Ok::<_, mysql_async::Error>(rows)
        };
        match run.await {
            Ok(rows) => rows
                .into_iter()
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| {
                    Error::Internal(format!(
                        "the writes were committed, but their versions are unknown: a row of the key-value table did not read as (key, version, deleted) ({e}); check the table's columns"
                    ))
                }),
            Err(err) => {
                // A failed statement ends the query there, with its transaction still open.
                if let Some(c) = self.conn.as_mut() {
                    let _ = c.query_drop("ROLLBACK").await;
                }
                Err(e(err))
            }
        }
    }

    /// Runs the transaction statement by statement, with the values as parameters.
    async fn write_prepared(
        &mut self,
        keys: &[&str],
        writes: &[Op],
    ) -> Result<Vec<(String, u64, i8)>> {
        let (lock, params) = self.sql.lock(keys, None);
        let statements = self.sql.writes(writes, None);
        let conn = self.conn().await?;
        let e = |e| sql_error(e, "writing");
        let mut tx = conn.start_transaction(TxOpts::default()).await.map_err(e)?;
        let rows: Vec<(String, u64, i8)> = tx.exec(lock, params).await.map_err(e)?;
        for (stmt, params) in statements {
            tx.exec_drop(stmt, params).await.map_err(e)?;
        }
        tx.commit().await.map_err(e)?;
        Ok(rows)
    }

    async fn read(&mut self, reads: &[(u32, Arc<str>)]) -> Result<Vec<Completion>> {
        let mut keys: Vec<&str> = reads.iter().map(|(_, k)| &**k).collect();
        keys.sort_unstable();
        keys.dedup();
        let stmt = format!("{}{})", self.sql.get_prefix, placeholders(keys.len()));
        let conn = self.conn().await?;
        let rows: Vec<(String, Option<String>, u64, i8)> = conn
            .exec(
                stmt,
                keys.iter().map(|k| SqlValue::from(*k)).collect::<Vec<_>>(),
            )
            .await
            .map_err(|e| sql_error(e, "reading"))?;
        let found: HashMap<String, CacheEntry> = rows
            .into_iter()
            .map(|(k, v, version, deleted)| {
                let value = if deleted != 0 {
                    None
                } else {
                    v.map(|s| json_or_string(&s, &k))
                };
                (k, CacheEntry { version, value })
            })
            .collect();
        Ok(reads
            .iter()
            .map(|(id, key)| {
                let value = found.get(&**key).and_then(|e| e.value.clone());
                if let Some(e) = found.get(&**key) {
                    self.core.fill_cache(key.clone(), e.clone());
                }
                Completion::Got { id: *id, value }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusCheckpoint;

    #[test]
    fn checkpoints_round_trip_through_redis_text() {
        for r in [
            Resume::Binlog {
                file: "binlog|odd.000042".into(),
                pos: 4_000_000_000,
            },
            Resume::Poll {
                ts_us: 1_700_000_000_123_456,
            },
        ] {
            let (back, at) = Resume::from_bus(&r.to_bus()).unwrap();
            assert_eq!(back, r);
            assert!(at > 0);
        }
        for bad in [
            "",
            "x|b|1|f",
            "1|b|x|f",
            "1|b|1|",
            "1|p|x",
            "1|q|1",
            "1|p|1|extra",
        ] {
            assert!(Resume::from_bus(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn lock_reads_escape_keys_inline_and_bind_them_otherwise() {
        let sql = Sql::new("kv");
        let keys = ["a'b", "c\\d"];
        let (text, params) = sql.lock(&keys, Some(false));
        assert!(params.is_empty());
        assert!(text.ends_with("IN ('a\\'b','c\\\\d') FOR UPDATE"), "{text}");
        // With NO_BACKSLASH_ESCAPES a backslash is an ordinary character; quotes are doubled.
        let (text, _) = sql.lock(&keys, Some(true));
        assert!(text.ends_with("IN ('a''b','c\\d') FOR UPDATE"), "{text}");
        let (text, params) = sql.lock(&keys, None);
        assert!(text.ends_with("IN (?,?) FOR UPDATE"), "{text}");
        assert_eq!(params, vec![SqlValue::from("a'b"), SqlValue::from("c\\d")]);
    }
}
