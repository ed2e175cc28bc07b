//! MongoDB backend, on the official `mongodb` driver. Store operations (push/get/delete) run on
//! one thread; changes are captured from a change stream (replica sets and sharded clusters) by
//! `stream`, or by polling the key-value collection on a standalone server (`poll`), and
//! delivered through a `Pipeline`. A write's own change reaches listeners the same way as
//! anyone else's: through the change stream, once.
//!
//! The driver's tasks run on a small multi-threaded tokio runtime owned by the backend; the
//! store, capture and polling threads drive their own futures with `block_on` on it.
//!
//! Key-value documents are `{ _id: key, data, version, updatedAt }` (and `deleted: true` on a
//! tombstone). A write is a compare-and-set on `version`: `replaceOne({_id, version: v},
//! {…, version: v + 1}, {upsert: true})`, batched into one `update` command per batch of calls.
//! A concurrent writer makes the upsert collide on `_id` (E11000); that call is re-read and
//! retried. Whole-document writes make each change event carry the exact document of its
//! version, which an `$inc` update (whose event needs a later lookup) would not.

pub mod convert;
pub mod poll;
pub mod stream;

use mongodb::bson::{doc, Bson, DateTime, Document};
use mongodb::options::{ClientOptions, Credential, ServerAddress};
use mongodb::{Client, Collection, Database};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::ServerConfig;
use crate::core::cache::CacheEntry;
use crate::core::pipeline::{Checkpoint, Pipeline, SourceMsg};
use crate::core::Core;
use crate::error::{Error, Result};
use crate::event::Event;
use crate::source::{Operations, SourceStatus, StoreContext};
use crate::store::{Completion, Op};
use convert::{bson_len, kv_document, read_kv, to_bson, MAX_BSON_BYTES};

/// How long `init()` waits for the server before failing with `USP_DB_UNAVAILABLE`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a changed capture checkpoint is written to the database.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);
/// Messages (each up to `stream::CHUNK` changes) waiting between capture and delivery.
const PIPELINE_CAPACITY: usize = 64;
/// Statements of one `update` command, and their bytes (well under the 48 MB message limit).
const MAX_STATEMENTS: usize = 1000;
const MAX_COMMAND_BYTES: usize = 8 << 20;
/// Compare-and-set attempts of one key lost in a row to other writers before giving up.
const CAS_RETRIES: u32 = 100;
/// Shortest look-back of each poll (see `poll`).
const POLL_OVERLAP_MIN: Duration = Duration::from_secs(1);

/// Where a streamer resumes, as delivered by the pipeline and saved in `<collection>_checkpoint`.
#[derive(Debug, Clone, PartialEq)]
pub enum Resume {
    /// After these change-stream resume tokens, one per collection.
    Streams(BTreeMap<String, Document>),
    /// Polled documents were delivered up to this `updatedAt` (ms since the epoch).
    Poll { ts_ms: i64 },
}

impl Checkpoint for Resume {
    /// Each stream reports its own token: they are merged.
    fn advance(&mut self, newer: Resume) {
        match (self, newer) {
            (Resume::Streams(all), Resume::Streams(one)) => all.extend(one),
            (this, newer) => *this = newer,
        }
    }
}

impl Resume {
    /// For status: `<collection>@<end of its token>` per stream, or `poll@<ms>`.
    fn describe(&self) -> String {
        match self {
            Resume::Streams(t) => t
                .iter()
                .map(|(coll, tok)| {
                    let data = tok.get_str("_data").unwrap_or("");
                    let skip = data.chars().count().saturating_sub(16);
                    let tail: String = data.chars().skip(skip).collect();
                    format!("{coll}@{tail}")
                })
                .collect::<Vec<_>>()
                .join(","),
            Resume::Poll { ts_ms } => format!("poll@{ts_ms}"),
        }
    }

    fn token(&self, coll: &str) -> Option<Document> {
        match self {
            Resume::Streams(t) => t.get(coll).cloned(),
            Resume::Poll { .. } => None,
        }
    }
}

/// The server's own words for an error, when it answered: `errmsg` of its reply (also of
/// replies without the fields drivers expect), else the driver's description.
pub fn server_message(e: &mongodb::error::Error) -> String {
    use mongodb::error::ErrorKind;
    match &*e.kind {
        ErrorKind::Command(c) => format!("error {} {}: {}", c.code, c.code_name, c.message),
        _ => e
            .server_response()
            .and_then(|r| {
                r.get_str("errmsg")
                    .ok()
                    .map(|m| format!("server error: {m}"))
            })
            .unwrap_or_else(|| e.to_string()),
    }
}

/// Maps a driver error to ours. Driver errors never contain the password.
pub fn mongo_error(e: mongodb::error::Error, what: &str) -> Error {
    use mongodb::error::ErrorKind;
    match &*e.kind {
        ErrorKind::Authentication { message, .. } => Error::Db(format!(
            "{what}: authentication failed ({message}); check user, password and authSource"
        )),
        ErrorKind::InvalidArgument { message, .. } => Error::Db(format!("{what}: {message}")),
        ErrorKind::Command(c) => command_error(c.code, &c.code_name, &c.message, what),
        ErrorKind::ServerSelection { .. }
        | ErrorKind::Io(_)
        | ErrorKind::ConnectionPoolCleared { .. }
        | ErrorKind::DnsResolve { .. } => Error::DbUnavailable(format!(
            "{what}: the MongoDB server is not reachable ({e}); the connection is retried on the next call"
        )),
        _ => Error::Db(format!("{what}: {}", server_message(&e))),
    }
}

fn command_error(code: i32, name: &str, message: &str, what: &str) -> Error {
    match code {
        18 => Error::Db(format!(
            "{what}: authentication failed ({message}); check user, password and authSource"
        )),
        13 => Error::Db(format!(
            "{what}: not authorized ({message}); grant the user readWrite on the database (and changeStream)"
        )),
        112 | 11000 | 11001 => Error::DbBusy(format!(
            "{what}: {message} (a concurrent write); retry the call"
        )),
        _ => Error::Db(format!("{what}: server error {code} {name}: {message}")),
    }
}

/// What `init()` found on the server.
#[derive(Debug, Clone, Default)]
pub struct ServerFacts {
    pub version: String,
    pub set_name: Option<String>,
    pub mongos: bool,
    pub max_wire_version: i32,
}

impl ServerFacts {
    /// Why change streams should not be possible, from the handshake: they need a replica set
    /// or a sharded cluster.
    pub fn stream_problem(&self) -> Option<String> {
        if self.set_name.is_none() && !self.mongos {
            return Some(
                "the server is a standalone mongod (no replica set): change streams need a replica set or a sharded cluster"
                    .into(),
            );
        }
        None
    }

    fn to_json(&self) -> serde_json::Value {
        json!({
            "version": self.version,
            "topology": if self.mongos { "sharded" } else if self.set_name.is_some() { "replicaSet" } else { "standalone" },
            "setName": self.set_name,
            "maxWireVersion": self.max_wire_version,
            "replicaSetOrSharded": self.stream_problem().is_none(),
        })
    }
}

async fn server_facts(client: &Client) -> Result<ServerFacts> {
    let admin = client.database("admin");
    let hello = match admin.run_command(doc! { "hello": 1 }).await {
        Ok(h) => h,
        // Servers before 4.4.2 know only the legacy name.
        Err(e) if matches!(&*e.kind, mongodb::error::ErrorKind::Command(_)) => admin
            .run_command(doc! { "isMaster": 1 })
            .await
            .map_err(|e| mongo_error(e, "reading the server's topology"))?,
        Err(e) => return Err(mongo_error(e, "connecting to MongoDB")),
    };
    let version = admin
        .run_command(doc! { "buildInfo": 1 })
        .await
        .ok()
        .and_then(|b| b.get_str("version").ok().map(str::to_string))
        .unwrap_or_default();
    Ok(ServerFacts {
        version,
        set_name: hello.get_str("setName").ok().map(str::to_string),
        mongos: hello.get_str("msg").ok() == Some("isdbgrid"),
        max_wire_version: hello.get_i32("maxWireVersion").unwrap_or(0),
    })
}

/// A driver client from the config: the URI as given (the driver reads its options, seeds,
/// SRV records), or the separate fields.
async fn client(s: &ServerConfig) -> Result<Client> {
    let mut opts = match &s.uri {
        Some(uri) => ClientOptions::parse(uri).await.map_err(|e| {
            Error::InvalidConfig(format!(
                "`connection.uri` is not a usable MongoDB URI: {}",
                mongo_error(e, "reading the URI")
            ))
        })?,
        None => {
            let mut o = ClientOptions::default();
            o.hosts = vec![ServerAddress::Tcp {
                host: s.host.clone().unwrap_or_else(|| "127.0.0.1".into()),
                port: Some(s.port.unwrap_or(27017)),
            }];
            o
        }
    };
    if let Some(user) = &s.user {
        if opts.credential.is_none() {
            let mut c = Credential::default();
            c.username = Some(user.clone());
            c.password = Some(s.password.0.clone());
            opts.credential = Some(c);
        }
    }
    opts.app_name = Some("ultimate-streaming".into());
    // The URI's own timeouts win.
    opts.server_selection_timeout = opts.server_selection_timeout.or(Some(CONNECT_TIMEOUT));
    opts.connect_timeout = opts.connect_timeout.or(Some(CONNECT_TIMEOUT));
    Client::with_options(opts).map_err(|e| {
        Error::InvalidConfig(format!(
            "the MongoDB connection settings are not usable: {}",
            mongo_error(e, "creating the client")
        ))
    })
}

/// Everything the MongoDB store thread needs.
pub struct MongoStoreThread {
    pub server: ServerConfig,
    pub ctx: StoreContext,
    pub status: Arc<SourceStatus>,
}

struct Store {
    kv: Collection<Document>,
    checkpoints: Collection<Document>,
    core: Arc<Core>,
    checkpoint_name: String,
    saved: Option<Resume>,
    /// Shows the saved checkpoint (`getStatus().source.position`).
    status: Arc<SourceStatus>,
}

/// A validated write of one call: a value (`Some`) or a delete (`None`).
struct Prepared {
    id: u32,
    key: Arc<str>,
    data: Option<(Bson, Arc<str>)>,
}

/// What the compare-and-set of a key expects to find.
#[derive(Debug, Clone, Copy)]
struct KeyState {
    /// `None`: no document, or one without a numeric `version`.
    version: Option<u64>,
    live: bool,
}

impl MongoStoreThread {
    pub fn run(self) {
        let MongoStoreThread {
            server,
            ctx,
            status,
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
            crate::source::fail_init("mongodb", e, rx, init_id, &core, &*completions)
        };
        // The driver monitors the server and keeps its pool in background tasks: they need a
        // runtime that runs while the store thread waits for calls.
        let rt = match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("usp-mongodb-io")
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => return fail(Error::Internal(format!("tokio runtime: {e}")), rx),
        };
        let client = match rt.block_on(client(&server)) {
            Ok(c) => c,
            Err(e) => return fail(e, rx),
        };
        let db_name = server.database.clone().unwrap_or_default();
        let db = client.database(&db_name);
        let mut store = Store {
            kv: db.collection(&server.table),
            checkpoints: db.collection(&format!("{}_checkpoint", server.table)),
            core: core.clone(),
            checkpoint_name: server.capture.checkpoint_name.clone(),
            saved: None,
            status: status.clone(),
        };
        let facts = match rt.block_on(server_facts(&client)) {
            Ok(f) => f,
            Err(e) => return fail(e, rx),
        };
        status.set_server(facts.to_json());
        let saved = match rt.block_on(store.start()) {
            Ok(s) => s,
            Err(e) => return fail(e, rx),
        };
        connected.store(true, Relaxed);
        let pipeline = match Pipeline::start(
            "usp-mongodb-delivery",
            "mongodb",
            core.clone(),
            sink,
            batch,
            PIPELINE_CAPACITY,
            saved.as_ref().map(|(r, _)| r.clone()),
        ) {
            Ok(p) => p,
            Err(e) => return fail(Error::Internal(format!("delivery thread: {e}")), rx),
        };
        let ctx = CaptureContext {
            rt: rt.handle().clone(),
            db: db.clone(),
            server: server.clone(),
            pipeline: &pipeline,
            status: status.clone(),
            metrics: core.metrics.clone(),
            stop: Arc::new(AtomicBool::new(false)),
            unavailable: Arc::new(AtomicBool::new(false)),
            streams: Mutex::new(HashMap::new()),
            saved: saved.as_ref().map(|(r, _)| r.clone()),
        };
        // The handshake's topology is a hint only (some servers stream changes without
        // naming a replica set): the stream itself is tried, and a refusal means polling.
        let fast_path = if server.use_change_streams {
            Ok(())
        } else {
            Err("option useChangeStreams is false".to_string())
        };
        let mut poller: Option<Polling> = None;
        let started = match fast_path {
            Ok(()) => {
                match ctx.start_streams() {
                    Ok(first) => {
                        rt.block_on(store.save_checkpoint(&first));
                        // The previous streamer polled, or its stream never got a token (a
                        // server without post-batch tokens, and no change yet): one catch-up
                        // poll of the key-value collection covers the gap.
                        let catch_up = match &saved {
                            Some((Resume::Poll { ts_ms }, _)) => Some(*ts_ms),
                            Some((Resume::Streams(t), at)) if !t.contains_key(&server.table) => {
                                Some(*at)
                            }
                            _ => None,
                        };
                        if let Some(from) = catch_up {
                            match ctx.start_poller(Some(from), true) {
                                Ok(p) => p.finish_and_join(),
                                Err(e) => tracing::warn!("catch-up poll not started: {e}"),
                            }
                        }
                        status.set_mode("changeStream");
                        Ok(())
                    }
                    Err(StartError::Unsupported(why)) => Err(match facts.stream_problem() {
                        Some(topology) => format!("{topology} (the server answered: {why})"),
                        None => format!("the server refused the change stream: {why}"),
                    }),
                    Err(StartError::Failed(e)) => {
                        ctx.stop.store(true, Relaxed);
                        pipeline.stop();
                        return fail(e, rx);
                    }
                }
            }
            Err(why) => Err(why),
        };
        if let Err(why) = started {
            let from = match &saved {
                Some((Resume::Poll { ts_ms }, _)) => Some(*ts_ms),
                // Resuming a change stream in polling mode: from when its checkpoint was saved
                // (the overlap window covers the rest).
                Some((Resume::Streams(_), at)) => Some(*at),
                None => None,
            };
            match ctx.start_poller(from, false) {
                Ok(p) => poller = Some(p),
                Err(e) => {
                    pipeline.stop();
                    return fail(e, rx);
                }
            }
            ctx.announce_polling(&why);
        }
        tracing::info!(collection = %server.table, version = %facts.version, mode = status.mode(), "mongodb store ready");
        ready.store(true, Relaxed);
        completions.complete(vec![Completion::Ready { id: init_id }]);

        let mut shutdown = None;
        let mut last_save = Instant::now();
        let mut last_retry = Instant::now();
        let retry_every = Duration::from_millis(server.capture.fast_path_retry_ms);
        while shutdown.is_none() {
            match rx.recv_timeout(CHECKPOINT_EVERY.min(retry_every)) {
                Ok(op) => {
                    let ops = crate::source::take_batch(op, &rx, write_batch_size, &core.metrics);
                    let (watch_ops, ops): (Vec<Op>, Vec<Op>) =
                        ops.into_iter().partition(|o| matches!(o, Op::Watch { .. }));
                    let mut done = Vec::new();
                    for w in watch_ops {
                        if let Op::Watch {
                            id,
                            table,
                            insert,
                            update,
                            delete,
                        } = w
                        {
                            let ops = Operations {
                                insert,
                                update,
                                delete,
                            };
                            done.push(match ctx.watch(&table, ops, poller.is_some()) {
                                Ok(()) => Completion::Ready { id },
                                Err(error) => Completion::Failed { id, error },
                            });
                        }
                    }
                    let (more, stop_id) = rt.block_on(store.execute(ops));
                    done.extend(more);
                    shutdown = stop_id;
                    if !done.is_empty() {
                        completions.complete(done);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if last_save.elapsed() >= CHECKPOINT_EVERY {
                last_save = Instant::now();
                if let Some(cp) = pipeline.delivered() {
                    rt.block_on(store.save_checkpoint(&cp));
                }
            }
            if poller.is_none() && ctx.unavailable.swap(false, Relaxed) {
                // The server stopped offering change streams (it left its replica set).
                let from = crate::event::now_us() / 1000;
                match ctx.start_poller(Some(from), false) {
                    Ok(p) => poller = Some(p),
                    Err(e) => tracing::error!("polling not started: {e}"),
                }
                ctx.announce_polling("the server refused the change stream");
                last_retry = Instant::now();
            }
            if poller.is_some() && server.use_change_streams && last_retry.elapsed() >= retry_every
            {
                last_retry = Instant::now();
                if ctx.try_fast_path(&client, &rt) {
                    // The stream is live from a point before the poller's last poll: the
                    // overlap is deduplicated by version.
                    if let Some(p) = poller.take() {
                        p.finish_and_join();
                    }
                    status.set_mode("changeStream");
                    tracing::info!("change streams available: polling stopped");
                    let _ = pipeline.sender().send(SourceMsg::Notice(Event::Mode {
                        source: "mongodb",
                        mode: "changeStream",
                        reason: "change streams are available: polling stopped".into(),
                    }));
                }
            }
        }
        // Capture stops sending; what it already sent is delivered; the final checkpoint is
        // where the next streamer resumes.
        ctx.stop.store(true, Relaxed);
        if let Some(p) = poller.take() {
            p.join();
        }
        ctx.stop_streams();
        let last = pipeline.stop();
        if let Some(cp) = last {
            rt.block_on(store.save_checkpoint(&cp));
        }
        let mut refused = crate::source::refuse_queued(rx, &core.metrics);
        rt.block_on(async { client.shutdown().await });
        rt.shutdown_timeout(Duration::from_secs(2));
        connected.store(false, Relaxed);
        status.set_mode("closed");
        tracing::info!("mongodb store stopped");
        if let Some(id) = shutdown {
            refused.push(Completion::Closed { id });
        }
        if !refused.is_empty() {
            completions.complete(refused);
        }
    }
}

/// Why the change stream did not start.
enum StartError {
    /// The server has no change streams: poll instead.
    Unsupported(String),
    Failed(Error),
}

/// What starting a capture thread needs, shared by the stream and polling paths.
struct CaptureContext<'a> {
    rt: tokio::runtime::Handle,
    db: Database,
    server: ServerConfig,
    pipeline: &'a Pipeline<Resume>,
    status: Arc<SourceStatus>,
    metrics: Arc<crate::metrics::Metrics>,
    /// Set at close: every capture thread stops.
    stop: Arc<AtomicBool>,
    /// Set by the key-value stream when the server refuses change streams after all.
    unavailable: Arc<AtomicBool>,
    /// The running streams, by collection.
    streams: Mutex<HashMap<String, Running>>,
    /// The checkpoint this streamer started from (tokens of collections watched later).
    saved: Option<Resume>,
}

/// A running stream thread.
struct Running {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<()>,
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

impl CaptureContext<'_> {
    /// Starts the streams of the key-value collection and of the collections watched from the
    /// start, each after its saved token; returns the checkpoint they start from.
    fn start_streams(&self) -> std::result::Result<Resume, StartError> {
        let mut first = BTreeMap::new();
        let kv = self.server.table.clone();
        let mut all = vec![(kv.clone(), true, Operations::default())];
        for c in &self.server.capture.watch {
            all.push((c.clone(), false, Operations::default()));
        }
        for (coll, is_kv, ops) in all {
            match self.start_stream(&coll, is_kv, ops) {
                Ok(Some(t)) => {
                    first.insert(coll, t);
                }
                Ok(None) => {}
                Err(e) => {
                    self.stop_streams();
                    return Err(e);
                }
            }
        }
        Ok(Resume::Streams(first))
    }

    /// Starts the stream of `coll` after its last token (or from now) and waits until it is
    /// open. Returns the token it starts from.
    fn start_stream(
        &self,
        coll: &str,
        kv: bool,
        operations: Operations,
    ) -> std::result::Result<Option<Document>, StartError> {
        let token = match self.pipeline.delivered() {
            Some(r @ Resume::Streams(_)) => r.token(coll),
            _ => self.saved.as_ref().and_then(|s| s.token(coll)),
        };
        let (live_tx, live_rx) = std::sync::mpsc::sync_channel(1);
        let c = &self.server.capture;
        let stop = Arc::new(AtomicBool::new(false));
        let capture = stream::StreamCapture {
            db: self.db.clone(),
            coll: coll.to_string(),
            kv,
            operations,
            max_await: Duration::from_millis(c.heartbeat_ms),
            reconnect_min: Duration::from_millis(c.reconnect_min_ms),
            reconnect_max: Duration::from_millis(c.reconnect_max_ms),
            start: token,
            tx: self.pipeline.sender(),
            stop: stop.clone(),
            unavailable: self.unavailable.clone(),
            status: self.status.clone(),
            live: Some(live_tx),
        };
        let rt = self.rt.clone();
        let (guard_status, guard_metrics) = (self.status.clone(), self.metrics.clone());
        let handle = std::thread::Builder::new()
            .name("usp-mongodb-stream".into())
            .spawn(move || {
                // A panic in capture stops it; it must be loud, never silent.
                if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    rt.block_on(capture.run())
                })) {
                    let e = Error::Internal(format!(
                        "change stream capture stopped: {}; changes after the saved checkpoint are delivered by the next streamer",
                        crate::error::panic_message(&*p)
                    ));
                    tracing::error!("{e}");
                    guard_metrics.record_error(&e);
                    guard_status.set_mode("failed");
                }
            })
            .map_err(|e| StartError::Failed(Error::Internal(format!("stream thread: {e}"))))?;
        let r = live_rx
            .recv_timeout(CONNECT_TIMEOUT + Duration::from_secs(2))
            .unwrap_or_else(|_| {
                Err(stream::LiveError::Failed(
                    "the change stream did not open in time".into(),
                ))
            });
        match r {
            Ok(first) => {
                let old = self
                    .streams
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(coll.to_string(), Running { stop, handle });
                if let Some(old) = old {
                    old.stop.store(true, Relaxed);
                    let _ = old.handle.join();
                }
                Ok(first)
            }
            Err(e) => {
                stop.store(true, Relaxed);
                let _ = handle.join();
                Err(match e {
                    stream::LiveError::Unsupported(why) => StartError::Unsupported(why),
                    stream::LiveError::Failed(why) => StartError::Failed(Error::DbUnavailable(
                        format!("the change stream of `{coll}` could not start: {why}"),
                    )),
                })
            }
        }
    }

    fn stop_streams(&self) {
        let all: Vec<Running> = self
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, r)| r)
            .collect();
        for r in &all {
            r.stop.store(true, Relaxed);
        }
        for r in all {
            let _ = r.handle.join();
        }
    }

    /// Starts the poller from `from` (ms of `updatedAt`; `None`: now). With `finish`, it polls
    /// once and stops.
    fn start_poller(&self, from: Option<i64>, finish: bool) -> Result<Polling> {
        let finish_flag = Arc::new(AtomicBool::new(finish));
        let interval = Duration::from_millis(self.server.polling_interval_ms);
        let poller = poll::Poller {
            kv: self.db.collection(&self.server.table),
            interval,
            overlap: (interval * 2).max(POLL_OVERLAP_MIN),
            start: from,
            tx: self.pipeline.sender(),
            finish: finish_flag.clone(),
            stop: self.stop.clone(),
            metrics: self.metrics.clone(),
        };
        let rt = self.rt.clone();
        let handle = std::thread::Builder::new()
            .name("usp-mongodb-poll".into())
            .spawn(move || rt.block_on(poller.run()))
            .map_err(|e| Error::Internal(format!("polling thread: {e}")))?;
        Ok(Polling {
            finish: finish_flag,
            handle,
        })
    }

    fn announce_polling(&self, why: &str) {
        let every = self.server.polling_interval_ms;
        tracing::warn!("change streams not possible ({why}): polling every {every} ms");
        self.status.set_mode("polling");
        let _ = self.pipeline.sender().send(SourceMsg::Notice(Event::Mode {
            source: "mongodb",
            mode: "polling",
            reason: format!(
                "change streams are not possible: {why}; polling every {every} ms (intermediate versions between polls are not delivered; watched collections are not delivered while polling)"
            ),
        }));
    }

    /// In polling mode: checks whether change streams have become possible and, if so, starts
    /// one from now. True when it is live.
    fn try_fast_path(&self, client: &Client, rt: &tokio::runtime::Runtime) -> bool {
        let facts = match rt.block_on(server_facts(client)) {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!("fast path check failed: {e}");
                return false;
            }
        };
        self.status.set_server(facts.to_json());
        match self.start_streams() {
            Ok(_) => true,
            Err(StartError::Unsupported(why))
            | Err(StartError::Failed(Error::DbUnavailable(why))) => {
                tracing::debug!("change stream still not possible: {why}");
                false
            }
            Err(StartError::Failed(e)) => {
                tracing::warn!("change stream still not possible: {e}");
                false
            }
        }
    }

    /// Starts (or restarts, with new operations) the stream of a watched collection; returns
    /// once it is open. A collection watched by an earlier streamer with the same checkpoint
    /// name resumes after its saved token.
    fn watch(&self, coll: &str, ops: Operations, polling: bool) -> Result<()> {
        if polling {
            return Err(Error::UnsupportedBackend(format!(
                "watch('{coll}') needs change streams, and this streamer is polling (see getStatus().source.server): run MongoDB as a replica set"
            )));
        }
        if coll == self.server.table {
            return Err(Error::InvalidArgument(format!(
                "watch('{coll}'): this is the key-value collection, already delivered as 'change' events"
            )));
        }
        match self.start_stream(coll, false, ops) {
            Ok(_) => {
                tracing::info!(collection = coll, "watching collection");
                Ok(())
            }
            Err(StartError::Unsupported(why)) => Err(Error::Db(format!(
                "watch('{coll}'): the server refused the change stream: {why}"
            ))),
            Err(StartError::Failed(e)) => Err(e),
        }
    }
}

impl Store {
    /// Reads the saved checkpoint and makes sure the polling index exists.
    async fn start(&mut self) -> Result<Option<(Resume, i64)>> {
        let index = mongodb::IndexModel::builder()
            .keys(doc! { "updatedAt": 1, "_id": 1 })
            .build();
        if let Err(e) = self.kv.create_index(index).await {
            let e = mongo_error(e, "creating the updatedAt index");
            if matches!(e, Error::DbUnavailable(_)) {
                return Err(e);
            }
            tracing::warn!("polling index not created (polling scans the collection): {e}");
        }
        let saved = self
            .checkpoints
            .find_one(doc! { "_id": &self.checkpoint_name })
            .await
            .map_err(|e| mongo_error(e, "reading the capture checkpoint"))?;
        Ok(saved.and_then(|d| {
            let at = d
                .get_datetime("updatedAt")
                .map(|t| t.timestamp_millis())
                .unwrap_or(0);
            let r = match (d.get_document("tokens"), d.get("pollMs")) {
                (Ok(t), _) => Resume::Streams(
                    t.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_document()?.clone())))
                        .collect(),
                ),
                (_, Some(Bson::Int64(ms))) => Resume::Poll { ts_ms: *ms },
                _ => return None,
            };
            Some((r, at))
        }))
    }

    async fn save_checkpoint(&mut self, cp: &Resume) {
        if self.saved.as_ref() == Some(cp) {
            return;
        }
        let mut d = doc! { "_id": &self.checkpoint_name, "updatedAt": DateTime::now() };
        match cp {
            Resume::Streams(t) => d.insert(
                "tokens",
                t.iter()
                    .map(|(k, v)| (k.clone(), Bson::Document(v.clone())))
                    .collect::<Document>(),
            ),
            Resume::Poll { ts_ms } => d.insert("pollMs", *ts_ms),
        };
        let r = self
            .checkpoints
            .replace_one(doc! { "_id": &self.checkpoint_name }, d)
            .upsert(true)
            .await;
        match r {
            Ok(_) => {
                self.status.set_position(cp.describe());
                self.saved = Some(cp.clone());
            }
            Err(e) => {
                let e = mongo_error(e, "saving the checkpoint");
                tracing::warn!(code = e.code(), "capture checkpoint not saved: {e}");
            }
        }
    }

    /// Runs a batch of operations: the writes (as few commands as fit), then the reads.
    async fn execute(&mut self, ops: Vec<Op>) -> (Vec<Completion>, Option<u32>) {
        let mut writes = Vec::new();
        let mut reads = Vec::new();
        let mut shutdown = None;
        let mut done = Vec::with_capacity(ops.len());
        let now = DateTime::now();
        for op in ops {
            match op {
                Op::Put { id, key, json } => match prepare(&key, &json, now) {
                    Ok(data) => writes.push(Prepared {
                        id,
                        key,
                        data: Some((data, json.into())),
                    }),
                    Err(error) => done.push(Completion::Failed { id, error }),
                },
                Op::Delete { id, key } => writes.push(Prepared {
                    id,
                    key,
                    data: None,
                }),
                Op::Get { id, key } => reads.push((id, key)),
                Op::Shutdown { id } => shutdown = Some(id),
                Op::Watch { .. } | Op::Wake => {}
            }
        }
        if !writes.is_empty() {
            done.extend(self.write(writes, now).await);
        }
        if !reads.is_empty() {
            match self.read(&reads).await {
                Ok(c) => done.extend(c),
                Err(e) => {
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

    /// Current versions of `keys`.
    async fn states(&self, keys: &[&str]) -> Result<HashMap<String, KeyState>> {
        let mut keys = keys.to_vec();
        keys.sort_unstable();
        keys.dedup();
        let mut cursor = self
            .kv
            .find(doc! { "_id": { "$in": keys } })
            .projection(doc! { "version": 1, "deleted": 1 })
            .await
            .map_err(|e| mongo_error(e, "writing"))?;
        let mut out = HashMap::new();
        while cursor
            .advance()
            .await
            .map_err(|e| mongo_error(e, "writing"))?
        {
            let d: Document = cursor
                .deserialize_current()
                .map_err(|e| mongo_error(e, "writing"))?;
            if let Ok(k) = d.get_str("_id") {
                let version = match d.get("version") {
                    Some(Bson::Int64(v)) if *v > 0 => Some(*v as u64),
                    Some(Bson::Int32(v)) if *v > 0 => Some(*v as u64),
                    _ => None,
                };
                let live = !matches!(d.get("deleted"), Some(Bson::Boolean(true)));
                out.insert(k.to_string(), KeyState { version, live });
            }
        }
        Ok(out)
    }

    /// Writes as compare-and-set replacements: each statement expects the version last seen
    /// and stores the next. Statements go in rounds with one statement per key (a key's calls in
    /// call order, one per round), so every statement succeeds or fails on its own, whatever
    /// the server does after a failed statement. A statement that lost to another writer fails
    /// with E11000 (its upsert collides with the existing `_id`): that key is read again and its
    /// calls go in the next round.
    async fn write(&mut self, writes: Vec<Prepared>, now: DateTime) -> Vec<Completion> {
        let mut done = Vec::with_capacity(writes.len());
        let mut learned: Vec<(Arc<str>, u64, Option<Arc<str>>)> = Vec::new();
        // Each key's calls, in call order.
        let mut queues: Vec<(Arc<str>, std::collections::VecDeque<Prepared>)> = Vec::new();
        let mut index: HashMap<Arc<str>, usize> = HashMap::new();
        for w in writes {
            let i = *index.entry(w.key.clone()).or_insert_with(|| {
                queues.push((w.key.clone(), Default::default()));
                queues.len() - 1
            });
            queues[i].1.push_back(w);
        }
        let mut state: HashMap<Arc<str>, KeyState> = HashMap::new();
        let mut stale: Vec<Arc<str>> = queues.iter().map(|(k, _)| k.clone()).collect();
        // Lost compare-and-sets in a row, per key.
        let mut conflicts: HashMap<Arc<str>, u32> = HashMap::new();
        while queues.iter().any(|(_, q)| !q.is_empty()) {
            if !stale.is_empty() {
                let keys: Vec<&str> = stale.iter().map(|k| &**k).collect();
                match self.states(&keys).await {
                    Ok(found) => {
                        for k in stale.drain(..) {
                            let s = found.get(&*k).copied().unwrap_or(KeyState {
                                version: None,
                                live: false,
                            });
                            state.insert(k, s);
                        }
                    }
                    Err(e) => {
                        for (_, q) in &mut queues {
                            fail_from(q.drain(..), &e, &mut done, &self.core);
                        }
                        break;
                    }
                }
            }
            // One round: the next call of each key.
            let mut statements = Vec::new();
            let mut round: Vec<(usize, KeyState)> = Vec::new();
            let mut bytes = 0;
            for (qi, (key, q)) in queues.iter_mut().enumerate() {
                let Some(w) = q.front() else { continue };
                if statements.len() >= MAX_STATEMENTS {
                    break;
                }
                let s = state.get(key).copied().unwrap_or(KeyState {
                    version: None,
                    live: false,
                });
                let next = s.version.unwrap_or(0) + 1;
                let doc = match &w.data {
                    Some((bson, _)) => kv_document(key, Some(bson.clone()), next, now),
                    None if s.live && s.version.is_some() => kv_document(key, None, next, now),
                    None => {
                        // Nothing to delete: settled without a write.
                        done.push(Completion::Deleted {
                            id: w.id,
                            existed: false,
                        });
                        q.pop_front();
                        continue;
                    }
                };
                let size = bson_len(&doc);
                if !statements.is_empty() && bytes + size > MAX_COMMAND_BYTES {
                    break;
                }
                bytes += size;
                let expect = match s.version {
                    Some(v) => Bson::Int64(v as i64),
                    None => Bson::Document(doc! { "$exists": false }),
                };
                statements.push(doc! {
                    "q": { "_id": &**key, "version": expect },
                    "u": doc,
                    "upsert": true,
                });
                round.push((
                    qi,
                    KeyState {
                        version: Some(next),
                        live: w.data.is_some(),
                    },
                ));
            }
            if statements.is_empty() {
                continue;
            }
            let errors = match self.run_update(statements).await {
                Ok(e) => e,
                Err(e) => {
                    // The outcome of an interrupted command is unknown: the calls fail and say
                    // so; the keys are read again before anything else is written.
                    for (qi, _) in round {
                        let (key, q) = &mut queues[qi];
                        if let Some(w) = q.pop_front() {
                            fail_from(std::iter::once(w), &e, &mut done, &self.core);
                        }
                        stale.push(key.clone());
                    }
                    continue;
                }
            };
            self.core.metrics.transactions.fetch_add(1, Relaxed);
            for (i, (qi, after)) in round.into_iter().enumerate() {
                let (key, q) = &mut queues[qi];
                match errors.get(&i) {
                    None => {
                        let Some(w) = q.pop_front() else { continue };
                        conflicts.remove(key);
                        state.insert(key.clone(), after);
                        let version = after.version.unwrap_or(0);
                        match w.data {
                            Some((_, json)) => {
                                learned.push((key.clone(), version, Some(json)));
                                done.push(Completion::Pushed { id: w.id, version });
                            }
                            None => {
                                learned.push((key.clone(), version, None));
                                done.push(Completion::Deleted {
                                    id: w.id,
                                    existed: true,
                                });
                            }
                        }
                    }
                    Some((11000 | 11001, _)) => {
                        let lost = conflicts.entry(key.clone()).or_insert(0);
                        *lost += 1;
                        stale.push(key.clone());
                        if *lost > CAS_RETRIES {
                            let e = Error::DbBusy(format!(
                                "writing: key {key:?} kept changing under concurrent writers ({CAS_RETRIES} attempts); retry the call"
                            ));
                            fail_from(q.drain(..), &e, &mut done, &self.core);
                        }
                    }
                    Some((code, message)) => {
                        let e = command_error(*code, "", message, "writing");
                        if let Some(w) = q.pop_front() {
                            fail_from(std::iter::once(w), &e, &mut done, &self.core);
                        }
                        stale.push(key.clone());
                    }
                }
            }
        }
        if let Some(cache) = &self.core.cache {
            for (key, version, value) in learned {
                cache.refresh(&key, CacheEntry { version, value });
            }
        }
        let writes_done = done
            .iter()
            .filter(|c| matches!(c, Completion::Pushed { .. } | Completion::Deleted { .. }))
            .count();
        self.core
            .metrics
            .writes
            .fetch_add(writes_done as u64, Relaxed);
        done
    }

    /// One unordered `update` command (its statements touch distinct keys). Returns the
    /// statements that failed, by index, with the server's code and message.
    async fn run_update(&self, updates: Vec<Document>) -> Result<HashMap<usize, (i32, String)>> {
        let reply = self
            .kv
            .client()
            .database(self.kv.namespace().db.as_str())
            .run_command(doc! {
                "update": self.kv.name(),
                "updates": updates,
                "ordered": false,
            })
            .await
            .map_err(|e| mongo_error(e, "writing"))?;
        if let Ok(wc) = reply.get_document("writeConcernError") {
            return Err(Error::Db(format!(
                "writing: write concern not satisfied: {}",
                wc.get_str("errmsg").unwrap_or("")
            )));
        }
        let mut failed = HashMap::new();
        if let Ok(errors) = reply.get_array("writeErrors") {
            for e in errors {
                let Bson::Document(e) = e else { continue };
                let index = match e.get("index") {
                    Some(Bson::Int32(i)) => *i as usize,
                    Some(Bson::Int64(i)) => *i as usize,
                    _ => continue,
                };
                let code = e.get_i32("code").unwrap_or(0);
                let message = e.get_str("errmsg").unwrap_or("").to_string();
                failed.insert(index, (code, message));
            }
        }
        Ok(failed)
    }

    async fn read(&mut self, reads: &[(u32, Arc<str>)]) -> Result<Vec<Completion>> {
        let mut keys: Vec<&str> = reads.iter().map(|(_, k)| &**k).collect();
        keys.sort_unstable();
        keys.dedup();
        let mut cursor = self
            .kv
            .find(doc! { "_id": { "$in": keys } })
            .await
            .map_err(|e| mongo_error(e, "reading"))?;
        let mut found: HashMap<Arc<str>, CacheEntry> = HashMap::new();
        while cursor
            .advance()
            .await
            .map_err(|e| mongo_error(e, "reading"))?
        {
            let d: Document = cursor
                .deserialize_current()
                .map_err(|e| mongo_error(e, "reading"))?;
            if let Some(k) = read_kv(d) {
                found.insert(
                    k.key,
                    CacheEntry {
                        version: k.version,
                        value: k.data,
                    },
                );
            }
        }
        Ok(reads
            .iter()
            .map(|(id, key)| {
                let e = found.get(key);
                if let Some(e) = e {
                    self.core.fill_cache(key.clone(), e.clone());
                }
                Completion::Got {
                    id: *id,
                    value: e.and_then(|e| e.value.clone()),
                }
            })
            .collect())
    }
}

/// Checks a value before anything is written: field names MongoDB refuses, and the 16 MB
/// document limit.
fn prepare(key: &str, json: &str, now: DateTime) -> Result<Bson> {
    let v: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| Error::InvalidValue(format!("the value is not JSON: {e}")))?;
    let data = to_bson(&v, &mut "data".to_string())?;
    let mut d = kv_document(key, Some(data), u64::MAX >> 1, now);
    let size = bson_len(&d);
    if size > MAX_BSON_BYTES {
        return Err(Error::ValueTooLarge(format!(
            "the value makes a {size}-byte BSON document; MongoDB stores at most {MAX_BSON_BYTES} bytes per document"
        )));
    }
    Ok(d.remove("data").unwrap_or(Bson::Null))
}

fn fail_from(
    writes: impl IntoIterator<Item = Prepared>,
    e: &Error,
    done: &mut Vec<Completion>,
    core: &Core,
) {
    core.metrics.record_error(e);
    for w in writes {
        done.push(Completion::Failed {
            id: w.id,
            error: e.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_get_codes_that_say_what_to_do() {
        let e = command_error(18, "AuthenticationFailed", "bad auth", "connecting");
        assert_eq!(e.code(), "USP_DB_ERROR");
        assert!(e.to_string().contains("check user, password"));
        assert_eq!(command_error(13, "", "no", "watch").code(), "USP_DB_ERROR");
        assert_eq!(
            command_error(112, "", "conflict", "writing").code(),
            "USP_DB_BUSY"
        );
        let e = command_error(2, "BadValue", "nope", "writing");
        assert_eq!(e.code(), "USP_DB_ERROR");
        assert!(e.to_string().contains("2 BadValue: nope"));
    }

    #[test]
    fn stream_checkpoints_merge_and_polling_replaces_them() {
        let t = |s: &str| doc! { "_data": s };
        let mut cp = Resume::Streams(BTreeMap::from([("kv".to_string(), t("1"))]));
        cp.advance(Resume::Streams(BTreeMap::from([(
            "orders".to_string(),
            t("2"),
        )])));
        cp.advance(Resume::Streams(BTreeMap::from([(
            "kv".to_string(),
            t("3"),
        )])));
        assert_eq!(cp.token("kv"), Some(t("3")));
        assert_eq!(cp.token("orders"), Some(t("2")));
        cp.advance(Resume::Poll { ts_ms: 5 });
        assert_eq!(cp, Resume::Poll { ts_ms: 5 });
        assert_eq!(cp.token("kv"), None);
    }

    #[test]
    fn values_are_checked_before_writing() {
        let now = DateTime::from_millis(0);
        assert!(matches!(
            prepare("k", r#"{"a":1}"#, now),
            Ok(Bson::Document(_))
        ));
        assert_eq!(
            prepare("k", r#"{"$a":1}"#, now).unwrap_err().code(),
            "USP_INVALID_VALUE"
        );
        let big = format!("\"{}\"", "x".repeat(MAX_BSON_BYTES));
        assert_eq!(
            prepare("k", &big, now).unwrap_err().code(),
            "USP_VALUE_TOO_LARGE"
        );
    }
}
