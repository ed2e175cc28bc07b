//! Binlog capture: a blocking replication client (`mysql_cdc`) on its own thread. It reads raw
//! packets, decodes rows only for the tables it watches (other tables' rows are skipped
//! undecoded), turns them into `Change`s and sends them to the delivery pipeline, with a
//! checkpoint at each transaction end. It reconnects with exponential backoff plus jitter and
//! resumes from the last transaction end it sent: rows of a transaction cut by a disconnect are
//! read again, and the core drops the ones already delivered by their binlog position.

use mysql_cdc::binlog_client::BinlogClient;
use mysql_cdc::binlog_options::BinlogOptions;
use mysql_cdc::events::binlog_event::BinlogEvent;
use mysql_cdc::events::event_header::EventHeader;
use mysql_cdc::events::row_events::mysql_value::MySqlValue;
use mysql_cdc::events::row_events::row_data::RowData;
use mysql_cdc::replica_options::ReplicaOptions;
use mysql_cdc::ssl_mode::SslMode;
use std::borrow::Cow;
use std::collections::HashMap;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::rows::{is_stale, read_spec, Layout, WatchSpec, Watches};
use super::{Conninfo, Resume};
use crate::core::pipeline::SourceMsg;
use crate::error::Error;
use crate::event::{json_or_string, now_us, BinlogPosition, Change, ChangeKind, Event, Position};
use crate::metrics::Metrics;
use crate::source::SourceStatus;

/// Changes sent to the pipeline in one message at most; a large transaction streams in chunks.
pub const CHUNK_ROWS: usize = 1000;

/// Where capture resumes: a transaction boundary in the binary log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub file: String,
    pub pos: u32,
    /// Set when the saved checkpoint was gone and capture starts afresh from here.
    pub resync: Option<String>,
}

impl Checkpoint {
    pub fn resume(&self) -> Resume {
        Resume::Binlog {
            file: self.file.clone(),
            pos: self.pos,
        }
    }

    pub fn describe(&self) -> String {
        format!("{}:{}", self.file, self.pos)
    }
}

/// The digits at the end of a binlog file name (`binlog.000042` -> 42).
pub fn file_index(file: &str) -> u32 {
    file.rsplit('.')
        .next()
        .and_then(|d| d.parse().ok())
        .unwrap_or(0)
}

/// Column positions of the key-value table.
#[derive(Debug, Clone, Copy)]
struct KvColumns {
    k: usize,
    v: usize,
    version: usize,
    deleted: usize,
    updated_at: Option<usize>,
}

impl KvColumns {
    fn from_names(names: &[String]) -> Option<KvColumns> {
        let at = |n: &str| names.iter().position(|c| c == n);
        Some(KvColumns {
            k: at("k")?,
            v: at("v")?,
            version: at("version")?,
            deleted: at("deleted")?,
            updated_at: at("updated_at"),
        })
    }
}

pub struct BinlogCapture {
    pub info: Conninfo,
    pub server_id: u32,
    pub heartbeat: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub table: String,
    /// The key-value table's columns in order (from information_schema at start).
    pub columns: Vec<String>,
    pub start: Checkpoint,
    pub tx: SyncSender<SourceMsg<Resume>>,
    pub stop: Arc<AtomicBool>,
    pub status: Arc<SourceStatus>,
    pub metrics: Arc<Metrics>,
    /// Told once: `Ok` when the first stream is live, or why the first attempt failed.
    pub live: Option<SyncSender<Result<(), String>>>,
    /// Tables watched with `watch()`.
    pub watches: Watches,
}

/// What a table id of the current stream refers to.
enum Table {
    Kv,
    Watched(Arc<str>, Arc<Layout>),
    Other,
}

/// The last table map decoded for a table id. Servers log one before every rows event; an
/// identical one (same bytes, and the table's watch unchanged) is not decoded again: with
/// `binlog_row_metadata=FULL` decoding it cost more than a small transaction's rows.
struct SeenMap {
    body: Vec<u8>,
    table: String,
    spec: Option<Arc<WatchSpec>>,
}

/// Table maps remembered at most (table ids change with DDL); beyond, all are forgotten.
const SEEN_MAPS_MAX: usize = 4096;

/// Binlog event type of a table map.
const TABLE_MAP_EVENT: u8 = 19;
/// Binlog event type of the commit of a transaction (its XID).
const XID_EVENT: u8 = 16;

/// Event types the capture has no use for beyond their header: GTIDs and GTID lists (MariaDB,
/// MySQL), heartbeats, binlog checkpoints, row annotations. They are skipped undecoded (a
/// single-row transaction is four events, a GTID and its commit two of them).
fn is_skipped_event(t: u8) -> bool {
    matches!(t, 27 | 33 | 34 | 35 | 160..=163)
}

/// Why a replication session ended.
enum End {
    Stopped,
    /// Network or server trouble: reconnect.
    Retry(String),
    /// The position is gone from the server: resync from the current end.
    Purged(String),
}

const ER_MASTER_FATAL_ERROR_READING_BINLOG: u16 = 1236;

impl BinlogCapture {
    pub fn run(mut self) {
        let mut cp = self.start.clone();
        if let Some(reason) = cp.resync.take() {
            let _ = self.tx.send(SourceMsg::Resync {
                reason,
                checkpoint: Some(cp.resume()),
            });
        }
        let mut attempt: u32 = 0;
        let mut from_end = false;
        while !self.stop.load(Relaxed) {
            let end = self.session(&mut cp, &mut attempt, from_end);
            from_end = false;
            if let (Some(live), End::Retry(why)) = (self.live.take(), &end) {
                // The first connection failed: `init()` reports it instead of retrying.
                let _ = live.send(Err(why.clone()));
                break;
            }
            match end {
                End::Stopped => break,
                End::Purged(why) => {
                    tracing::warn!("binlog position {} is gone: {why}; resync", cp.describe());
                    self.metrics.record_error(&Error::Db(why.clone()));
                    from_end = true;
                    let reason = format!(
                        "the binary log at {} is no longer on the server ({why}); changes since then cannot be replayed. Continuing from the current state",
                        cp.describe()
                    );
                    let _ = self.tx.send(SourceMsg::Resync {
                        reason,
                        checkpoint: None,
                    });
                }
                End::Retry(why) => {
                    attempt += 1;
                    self.status.reconnecting.store(true, Relaxed);
                    self.status.attempts.store(attempt as u64, Relaxed);
                    let e = Error::DbUnavailable(format!("binlog stream: {why}"));
                    self.metrics.record_error(&e);
                    tracing::warn!(attempt, "binlog stream lost: {why}; reconnecting");
                    self.backoff(attempt);
                }
            }
        }
        tracing::debug!("binlog capture stopped");
    }

    /// Sleeps before reconnect attempt `attempt` (1-based): exponential, capped, with jitter
    /// (between half and the full delay), in steps so a stop is noticed quickly.
    fn backoff(&self, attempt: u32) {
        let delay = crate::source::backoff_delay(self.reconnect_min, self.reconnect_max, attempt);
        let until = std::time::Instant::now() + delay;
        while !self.stop.load(Relaxed) && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10).min(delay));
        }
    }

    /// The current watch of `table`, if any.
    fn watched(&self, table: &str) -> Option<Arc<WatchSpec>> {
        self.watches
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(table)
            .cloned()
    }

    /// Re-reads a watched table's columns after DDL (only needed when the binlog carries no
    /// column names), on a connection of this thread's own, and keeps the result for `watch()`.
    fn refresh(&mut self, spec: &WatchSpec) -> Option<Arc<WatchSpec>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        let (db, table) = (self.info.database.clone(), spec.table.clone());
        let fresh = rt.block_on(async {
            let mut conn = mysql_async::Conn::new(self.info.opts())
                .await
                .map_err(|e| super::sql_error(e, "refreshing a watched table's columns"))?;
            let r = read_spec(&mut conn, &db, &table, spec.operations).await;
            let _ = conn.disconnect().await;
            r
        });
        match fresh {
            Ok(s) => {
                let s = Arc::new(s);
                tracing::info!(table = %s.table, "watched table changed: columns re-read");
                self.watches
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(s.table.clone(), s.clone());
                Some(s)
            }
            Err(e) => {
                tracing::warn!("columns of `{table}` not re-read: {e}");
                self.metrics.record_error(&e);
                None
            }
        }
    }

    fn session(&mut self, cp: &mut Checkpoint, attempt: &mut u32, from_end: bool) -> End {
        // mysql_cdc's connect has no timeout: probe the address first with one.
        let addr = format!("{}:{}", self.info.host, self.info.port);
        let reachable = addr
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .map(|a| TcpStream::connect_timeout(&a, Duration::from_secs(3)));
        match reachable {
            Some(Ok(_)) => {}
            Some(Err(e)) => return End::Retry(format!("cannot connect to {addr}: {e}")),
            None => return End::Retry(format!("cannot resolve {addr}")),
        }
        let binlog = if from_end {
            BinlogOptions::from_end()
        } else {
            BinlogOptions::from_position(cp.file.clone(), cp.pos)
        };
        let options = ReplicaOptions {
            hostname: self.info.host.clone(),
            port: self.info.port,
            username: self.info.user.clone(),
            password: self.info.password.clone(),
            database: Some(self.info.database.clone()),
            server_id: self.server_id,
            blocking: true,
            heartbeat_interval: self.heartbeat,
            ssl_mode: SslMode::Disabled,
            binlog,
        };
        let mut client = BinlogClient::new(options);
        let sockets_before = super::socket::open_sockets();
        let mut events = match super::socket::with_nodelay(self.info.port, || client.replicate()) {
            Ok(ev) => ev,
            Err(e) => {
                let msg = format!("{e:?}");
                if msg.contains(&ER_MASTER_FATAL_ERROR_READING_BINLOG.to_string()) {
                    return End::Purged(msg);
                }
                return End::Retry(msg);
            }
        };
        if from_end {
            cp.file = client.options.binlog.filename.clone();
            cp.pos = client.options.binlog.position;
            let _ = self.tx.send(SourceMsg::Changes {
                changes: Vec::new(),
                checkpoint: Some(cp.resume()),
            });
        }
        if *attempt > 0 {
            self.status.reconnects.fetch_add(1, Relaxed);
            tracing::info!(attempt = *attempt, "binlog stream reconnected");
        }
        // Read the stream through a buffer where the socket can be adopted (see socket.rs).
        let mut reader = super::socket::adopt(&sockets_before, self.info.port);
        self.status.set_binlog_reader(if reader.is_some() {
            "buffered"
        } else {
            "mysql_cdc"
        });
        let mut file = cp.file.clone();
        // The number of `file`, for the position of every row read from it.
        let mut file_idx = file_index(&file);
        let mut tables: HashMap<u64, Table> = HashMap::new();
        // Column names last seen per watched table, to notice DDL.
        let mut schemas: HashMap<String, Vec<String>> = HashMap::new();
        let mut refreshed: std::collections::HashSet<(String, usize)> = Default::default();
        let mut kv_columns: Option<KvColumns> = KvColumns::from_names(&self.columns);
        let mut pending: Vec<Change> = Vec::new();
        let mut outbox = Outbox::default();
        let mut seen_maps: HashMap<u64, SeenMap> = HashMap::new();
        // The body of the table map being decoded, kept if it decodes.
        let mut map_body: Option<Vec<u8>> = None;
        let mut saw_rows = false;
        let mut first = true;
        loop {
            if self.stop.load(Relaxed) {
                return End::Stopped;
            }
            // Hand over the committed transactions before a read that may wait; while the
            // stream runs ahead (catching up), they go together.
            let more_now = reader.as_ref().is_some_and(|r| r.packet_ready());
            if outbox.due(more_now) && !self.flush(&mut outbox) {
                return End::Stopped;
            }
            let read = match reader.as_mut() {
                Some(r) => r.read_packet(),
                None => events.channel.read_packet().map(|(p, _)| p),
            };
            let packet = match read {
                Ok(p) => p,
                Err(e) => return End::Retry(e.to_string()),
            };
            match packet.first() {
                Some(0x00) => {}
                Some(0xFF) => {
                    let code = packet
                        .get(1..3)
                        .map(|b| u16::from_le_bytes([b[0], b[1]]))
                        .unwrap_or(0);
                    let msg = String::from_utf8_lossy(packet.get(3..).unwrap_or(&[])).to_string();
                    if code == ER_MASTER_FATAL_ERROR_READING_BINLOG {
                        return End::Purged(format!("server error {code}: {msg}"));
                    }
                    return End::Retry(format!("server error {code}: {msg}"));
                }
                Some(0xFE) => return End::Retry("the server ended the stream".into()),
                _ => return End::Retry("unexpected packet".into()),
            }
            if first {
                first = false;
                if let Some(live) = self.live.take() {
                    let _ = live.send(Ok(()));
                }
                *attempt = 0;
                self.status.reconnecting.store(false, Relaxed);
                self.status.attempts.store(0, Relaxed);
            }
            let Some(header) = packet.get(1..).and_then(|p| EventHeader::parse(p).ok()) else {
                return End::Retry("malformed event header".into());
            };
            // Rows events of tables we do not watch are skipped without decoding.
            if is_rows_event(header.event_type) {
                let id = packet.get(20..26).map(table_id);
                if !id.is_some_and(|id| {
                    matches!(tables.get(&id), Some(Table::Kv | Table::Watched(..)))
                }) {
                    continue;
                }
            }
            if is_skipped_event(header.event_type) {
                continue;
            }
            if header.event_type == XID_EVENT {
                // The commit: its only field, the XID, is of no use here.
                self.commit(
                    cp,
                    &file,
                    header.next_event_position,
                    &mut pending,
                    &mut saw_rows,
                    &mut outbox,
                );
                continue;
            }
            if header.event_type == TABLE_MAP_EVENT {
                // The parser's checksum type (not nameable outside mysql_cdc): 1 is CRC32, whose
                // 4 bytes cover the header too, so they differ between equal table maps.
                let crc = events.parser.checksum_type as u8 == 1;
                let body = packet
                    .get(20..packet.len().saturating_sub(if crc { 4 } else { 0 }))
                    .unwrap_or(&[]);
                let id = body.get(0..6).map(table_id);
                let unchanged = id.and_then(|id| seen_maps.get(&id)).is_some_and(|m| {
                    m.body == body && same_spec(&m.spec, self.watched(&m.table).as_ref())
                });
                if unchanged && id.is_some_and(|id| tables.contains_key(&id)) {
                    continue;
                }
                map_body = Some(body.to_vec());
            }
            let (header, event) = match events.read_event(&packet) {
                Ok(x) => x,
                Err(e) => {
                    map_body = None;
                    // A row this client cannot decode: skip the event, loudly; never stop.
                    let e = Error::Db(format!("binlog event not decoded: {e:?}"));
                    tracing::warn!("{e}");
                    self.metrics.record_error(&e);
                    continue;
                }
            };
            let event_pos = header
                .next_event_position
                .saturating_sub(header.event_length);
            // Each row as (before, after): no before for inserts, no after for deletes.
            type Pair<'r> = (Option<&'r RowData>, Option<&'r RowData>);
            let rows: Option<(u64, ChangeKind, Vec<Pair>)> = match &event {
                BinlogEvent::WriteRowsEvent(w) => Some((
                    w.table_id,
                    ChangeKind::Insert,
                    w.rows.iter().map(|r| (None, Some(r))).collect(),
                )),
                BinlogEvent::UpdateRowsEvent(u) => Some((
                    u.table_id,
                    ChangeKind::Update,
                    u.rows
                        .iter()
                        .map(|r| (Some(&r.before_update), Some(&r.after_update)))
                        .collect(),
                )),
                BinlogEvent::DeleteRowsEvent(d) => Some((
                    d.table_id,
                    ChangeKind::Delete,
                    d.rows.iter().map(|r| (Some(r), None)).collect(),
                )),
                _ => None,
            };
            if let Some((table_id, kind, rows)) = rows {
                saw_rows = true;
                let (f, e, ts) = (file_idx, event_pos, header.timestamp);
                for (r, (before, after)) in rows.into_iter().enumerate() {
                    let change = match tables.get(&table_id) {
                        Some(Table::Kv) => kv_columns.and_then(|cols| match after {
                            Some(after) => kv_change(cols, before, after, f, e, r, ts),
                            None => before.and_then(|b| kv_delete(cols, b, f, e, r, ts)),
                        }),
                        Some(Table::Watched(name, l)) if l.operations.allows(kind) => {
                            Some(row_change(name, l, kind, before, after, f, e, r, ts))
                        }
                        _ => None,
                    };
                    pending.extend(change);
                }
            }
            match event {
                BinlogEvent::RotateEvent(r) => {
                    file = r.binlog_filename.clone();
                    file_idx = file_index(&file);
                    if header.timestamp != 0 || cp.file != file {
                        // A real rotation: the new file starts a transaction boundary.
                        cp.file = file.clone();
                        cp.pos = r.binlog_position as u32;
                    }
                }
                BinlogEvent::TableMapEvent(t) => {
                    let kind = if t.database_name != self.info.database {
                        Table::Other
                    } else if t.table_name == self.table {
                        if let Some(names) = t
                            .table_metadata
                            .as_ref()
                            .and_then(|m| m.column_names.as_ref())
                        {
                            if let Some(c) = KvColumns::from_names(names) {
                                kv_columns = Some(c);
                            }
                        }
                        Table::Kv
                    } else {
                        let spec = self.watched(&t.table_name);
                        match spec {
                            Some(spec) => {
                                // One re-read per (table, column count): rows logged before the
                                // DDL still have the old count, and must not re-read each time.
                                let attempt = (t.table_name.clone(), t.column_types.len());
                                let spec = if is_stale(&t, &spec) && refreshed.insert(attempt) {
                                    self.refresh(&spec).unwrap_or(spec)
                                } else {
                                    spec
                                };
                                let layout = Layout::new(&t, &spec);
                                let seen =
                                    schemas.insert(t.table_name.clone(), layout.names.clone());
                                if seen.is_some_and(|old| old != layout.names) {
                                    // The table's columns changed (DDL): say so, then go on.
                                    self.flush(&mut outbox);
                                    let _ = self.tx.send(SourceMsg::Notice(Event::Schema {
                                        source: "mysql",
                                        table: t.table_name.as_str().into(),
                                        columns: serde_json::Value::from(layout.names.clone())
                                            .to_string(),
                                    }));
                                }
                                Table::Watched(t.table_name.as_str().into(), Arc::new(layout))
                            }
                            None => Table::Other,
                        }
                    };
                    tables.insert(t.table_id, kind);
                    if let Some(body) = map_body.take() {
                        if seen_maps.len() >= SEEN_MAPS_MAX {
                            seen_maps.clear();
                        }
                        let spec = self.watched(&t.table_name);
                        let table = t.table_name.clone();
                        seen_maps.insert(t.table_id, SeenMap { body, table, spec });
                    }
                }
                // (An XID, the commit of a transaction, ended it above, undecoded.)
                // COMMIT of a non-transactional table, or DDL: a transaction boundary.
                BinlogEvent::QueryEvent(q) if q.sql_statement != "BEGIN" => {
                    self.commit(
                        cp,
                        &file,
                        header.next_event_position,
                        &mut pending,
                        &mut saw_rows,
                        &mut outbox,
                    );
                }
                _ => {}
            }
            if pending.len() >= CHUNK_ROWS {
                // A large transaction goes out in chunks, under the checkpoint before it.
                outbox.changes.append(&mut pending);
                if !self.flush(&mut outbox) {
                    return End::Stopped;
                }
            }
        }
    }

    /// Ends a transaction: its changes go out with the checkpoint after it. A transaction that
    /// touched no watched table moves no checkpoint (so our own checkpoint writes do not cause
    /// more checkpoint writes).
    fn commit(
        &self,
        cp: &mut Checkpoint,
        file: &str,
        next: u32,
        pending: &mut Vec<Change>,
        saw_rows: &mut bool,
        outbox: &mut Outbox,
    ) {
        let had = !pending.is_empty() || *saw_rows;
        *saw_rows = false;
        if !had {
            return;
        }
        if cp.file != file {
            cp.file = file.to_string();
        }
        cp.pos = next;
        outbox.changes.append(pending);
        outbox.checkpoint = Some(cp.resume());
        outbox.since.get_or_insert_with(Instant::now);
    }

    /// Sends what the outbox holds; false when the pipeline is gone.
    fn flush(&self, outbox: &mut Outbox) -> bool {
        if outbox.changes.is_empty() && outbox.checkpoint.is_none() {
            return true;
        }
        outbox.since = None;
        // The position in status moves once per message, not per transaction (formatting it
        // cost about 5% of the thread when catching up).
        if let Some(Resume::Binlog { file, pos }) = &outbox.checkpoint {
            self.status.set_position(format!("{file}:{pos}"));
        }
        self.tx
            .send(SourceMsg::Changes {
                changes: std::mem::take(&mut outbox.changes),
                checkpoint: outbox.checkpoint.take(),
            })
            .is_ok()
    }
}

/// Committed transactions not yet handed to the pipeline, with the checkpoint after the last.
#[derive(Default)]
struct Outbox {
    changes: Vec<Change>,
    checkpoint: Option<Resume>,
    /// When the oldest of them was committed here.
    since: Option<Instant>,
    /// Calls of `due` while the stream runs ahead: the clock is read on every 16th only (a
    /// clock read costs more than decoding a small event here).
    polls: u32,
}

impl Outbox {
    /// Whether to send now: the next read may wait (`more_now` false), or enough has gathered
    /// (CHUNK_ROWS changes, or 1 ms: a stream busy with tables nobody watches never holds
    /// changes back longer).
    fn due(&mut self, more_now: bool) -> bool {
        let Some(t) = self.since else { return false };
        if !more_now || self.changes.len() >= CHUNK_ROWS {
            return true;
        }
        self.polls = self.polls.wrapping_add(1);
        self.polls.is_multiple_of(16) && t.elapsed() >= OUTBOX_WAIT
    }
}

/// The longest a committed transaction waits in the outbox for others to join it.
const OUTBOX_WAIT: Duration = Duration::from_millis(1);

/// A table id: the first 6 bytes (little-endian) of a table map or rows event body.
fn table_id(b: &[u8]) -> u64 {
    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], 0, 0])
}

/// Whether a table's watch is still the one a table map was decoded under.
fn same_spec(a: &Option<Arc<WatchSpec>>, b: Option<&Arc<WatchSpec>>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        _ => false,
    }
}

fn is_rows_event(t: u8) -> bool {
    matches!(t, 23..=25 | 30..=32)
}

fn text(v: Option<&Option<MySqlValue>>) -> Option<Cow<'_, str>> {
    match v? {
        Some(MySqlValue::String(s)) => Some(Cow::Borrowed(s)),
        Some(MySqlValue::Blob(b)) => Some(String::from_utf8_lossy(b)),
        _ => None,
    }
}

fn uint(v: Option<&Option<MySqlValue>>) -> Option<u64> {
    match v? {
        Some(MySqlValue::BigInt(n)) => Some(*n),
        Some(MySqlValue::Int(n)) => Some(*n as u64),
        Some(MySqlValue::MediumInt(n)) => Some(*n as u64),
        Some(MySqlValue::SmallInt(n)) => Some(*n as u64),
        Some(MySqlValue::TinyInt(n)) => Some(*n as u64),
        _ => None,
    }
}

fn commit_us(cols: KvColumns, row: &RowData, header_ts: u32) -> i64 {
    match cols.updated_at.and_then(|i| row.cells.get(i)) {
        Some(Some(MySqlValue::Timestamp(ms))) => *ms as i64 * 1000,
        _ if header_ts > 0 => header_ts as i64 * 1_000_000,
        _ => now_us(),
    }
}

/// `file` is the binlog file's number (`file_index`).
fn position(file: u32, event_pos: u32, row: usize) -> Position {
    Position::Binlog(BinlogPosition {
        file_index: file,
        event_pos,
        row: row as u32,
    })
}

/// An insert or update of a key-value row. A tombstone write is a delete.
fn kv_change(
    cols: KvColumns,
    before: Option<&RowData>,
    after: &RowData,
    file: u32,
    event_pos: u32,
    row: usize,
    header_ts: u32,
) -> Option<Change> {
    let key: Arc<str> = Arc::from(&*text(after.cells.get(cols.k))?);
    let version = uint(after.cells.get(cols.version)).unwrap_or(0);
    let deleted = uint(after.cells.get(cols.deleted)).unwrap_or(0) != 0;
    let was_live = before.map(|b| uint(b.cells.get(cols.deleted)).unwrap_or(0) == 0);
    let kind = match (deleted, was_live) {
        (true, Some(false)) => return None, // a tombstone rewritten: nothing a listener saw
        (true, _) => ChangeKind::Delete,
        (false, None) | (false, Some(false)) => ChangeKind::Insert,
        (false, Some(true)) => ChangeKind::Update,
    };
    let data = if deleted {
        None
    } else {
        text(after.cells.get(cols.v)).map(|s| json_or_string(&s, &key))
    };
    // Did the writer bump `version`? The engine always does; a SQL client may not.
    let versioned = match before {
        None => true,
        Some(b) => version > uint(b.cells.get(cols.version)).unwrap_or(0),
    };
    Some(Change {
        kind,
        key,
        data,
        version,
        versioned,
        seq: 0,
        position: position(file, event_pos, row),
        source: "mysql",
        commit_ts_us: commit_us(cols, after, header_ts),
        table: None,
        before: None,
        meta: None,
    })
}

/// A row of a watched table. Delivered by binlog position (no version involved).
#[allow(clippy::too_many_arguments)]
fn row_change(
    table: &Arc<str>,
    layout: &Layout,
    kind: ChangeKind,
    before: Option<&RowData>,
    after: Option<&RowData>,
    file: u32,
    event_pos: u32,
    row: usize,
    header_ts: u32,
) -> Change {
    let after = after.map(|r| layout.to_json(r));
    let before = before.map(|r| layout.to_json(r));
    let key = after
        .as_ref()
        .or(before.as_ref())
        .map(|(_, k)| k.clone())
        .unwrap_or_else(|| "null".into());
    Change {
        kind,
        key: key.into(),
        data: after.map(|(r, _)| r.into()),
        version: 0,
        versioned: false,
        seq: 0,
        position: position(file, event_pos, row),
        source: "mysql",
        commit_ts_us: if header_ts > 0 {
            header_ts as i64 * 1_000_000
        } else {
            now_us()
        },
        table: Some(table.clone()),
        meta: None,
        before: before.map(|(r, _)| r.into()),
    }
}

/// A row removed with SQL DELETE (our own deletes keep a tombstone instead).
fn kv_delete(
    cols: KvColumns,
    before: &RowData,
    file: u32,
    event_pos: u32,
    row: usize,
    header_ts: u32,
) -> Option<Change> {
    if uint(before.cells.get(cols.deleted)).unwrap_or(0) != 0 {
        return None; // removing a tombstone: the key was already deleted
    }
    Some(Change {
        kind: ChangeKind::Delete,
        key: text(before.cells.get(cols.k))?.into(),
        data: None,
        version: uint(before.cells.get(cols.version)).unwrap_or(0) + 1,
        versioned: false,
        seq: 0,
        position: position(file, event_pos, row),
        source: "mysql",
        commit_ts_us: if header_ts > 0 {
            header_ts as i64 * 1_000_000
        } else {
            now_us()
        },
        meta: None,
        table: None,
        before: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_events_without_use_are_skipped_undecoded() {
        // Query, rotate, format description (sets the checksum type), XID (handled apart),
        // table map, and the rows events of both versions: never skipped.
        for t in [2, 4, 15, XID_EVENT, TABLE_MAP_EVENT, 23, 24, 25, 30, 31, 32] {
            assert!(!is_skipped_event(t), "event type {t}");
        }
        // Heartbeat, MySQL GTID / anonymous GTID / previous GTIDs, MariaDB annotate rows /
        // binlog checkpoint / GTID / GTID list.
        for t in [27, 33, 34, 35, 160, 161, 162, 163] {
            assert!(is_skipped_event(t), "event type {t}");
        }
    }

    fn row(cells: Vec<Option<MySqlValue>>) -> RowData {
        RowData::new(cells)
    }

    fn cols() -> KvColumns {
        KvColumns::from_names(&["k", "v", "version", "deleted", "updated_at"].map(String::from))
            .unwrap()
    }

    fn kv(k: &str, v: Option<&str>, version: u64, deleted: u8) -> RowData {
        row(vec![
            Some(MySqlValue::String(k.into())),
            v.map(|v| MySqlValue::Blob(v.as_bytes().to_vec())),
            Some(MySqlValue::BigInt(version)),
            Some(MySqlValue::TinyInt(deleted)),
            Some(MySqlValue::Timestamp(1_700_000_000_123)),
        ])
    }

    #[test]
    fn file_index_is_the_numeric_suffix() {
        assert_eq!(file_index("binlog.000042"), 42);
        assert_eq!(file_index("mysql-bin.1"), 1);
        assert_eq!(file_index("weird"), 0);
    }

    #[test]
    fn rows_become_changes_of_the_right_kind() {
        let c = cols();
        let ins = kv_change(c, None, &kv("a", Some("{\"x\":1}"), 1, 0), 1, 100, 0, 0).unwrap();
        assert_eq!(ins.kind, ChangeKind::Insert);
        assert_eq!(ins.data.as_deref(), Some("{\"x\":1}"));
        assert_eq!(ins.commit_ts_us, 1_700_000_000_123_000);
        let upd = kv_change(
            c,
            Some(&kv("a", Some("1"), 1, 0)),
            &kv("a", Some("2"), 2, 0),
            1,
            200,
            0,
            0,
        )
        .unwrap();
        assert_eq!((upd.kind, upd.version), (ChangeKind::Update, 2));
        let tomb = kv_change(
            c,
            Some(&kv("a", Some("2"), 2, 0)),
            &kv("a", None, 3, 1),
            1,
            300,
            0,
            0,
        )
        .unwrap();
        assert_eq!((tomb.kind, tomb.data.is_none()), (ChangeKind::Delete, true));
        // Re-created after a tombstone: an insert.
        let again = kv_change(
            c,
            Some(&kv("a", None, 3, 1)),
            &kv("a", Some("\"hi\""), 4, 0),
            1,
            400,
            0,
            0,
        )
        .unwrap();
        assert_eq!(again.kind, ChangeKind::Insert);
        // Non-JSON text written by SQL arrives as a JSON string.
        let raw = kv_change(c, None, &kv("b", Some("plain"), 1, 0), 1, 500, 0, 0).unwrap();
        assert_eq!(raw.data.as_deref(), Some("\"plain\""));
        // SQL DELETE of a live row; of a tombstone: nothing.
        let del = kv_delete(c, &kv("a", Some("1"), 4, 0), 1, 600, 0, 5).unwrap();
        assert_eq!((del.kind, del.version), (ChangeKind::Delete, 5));
        assert!(kv_delete(c, &kv("a", None, 4, 1), 1, 700, 0, 5).is_none());
    }

    #[test]
    fn positions_order_rows_within_and_across_files() {
        let p = |f: &str, e: u32, r: usize| position(file_index(f), e, r).ordinal();
        assert!(p("b.000001", 100, 0) < p("b.000001", 100, 1));
        assert!(p("b.000001", 100, 999) < p("b.000001", 101, 0));
        assert!(p("b.000001", u32::MAX, 0) < p("b.000002", 4, 0));
    }
}
