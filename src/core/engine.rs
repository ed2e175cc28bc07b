//! The engine: wires a store/source, the core and the batcher for one streamer, and is the
//! whole API the binding calls. Each call validates, then hands off to a thread; nothing here
//! blocks on the database.

use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::batcher::BatchOptions;
use super::cache::Cache;
use super::Core;
use crate::config::{Backend, Config};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::sink::BatchSink;
use crate::source::mongo::MongoStoreThread;
use crate::source::mysql::MysqlStoreThread;
use crate::source::sqlite::StoreThread;
use crate::source::{SourceStatus, StoreContext};
use crate::store::{Completion, CompletionSink, Op};

enum State {
    Created,
    Running(Running),
    Closed,
}

struct Running {
    core: Arc<Core>,
    ops: SyncSender<Op>,
    ready: Arc<AtomicBool>,
    connected: Arc<AtomicBool>,
    /// Mode and connection state of a server source (none for the embedded store).
    source: Option<Arc<SourceStatus>>,
    /// Role and Redis links in bus mode (`options.redis`).
    bus: Option<Arc<crate::bus::BusStatus>>,
    /// The cache shared in Redis (`options.redis.cache`).
    l2: Option<Arc<crate::bus::l2::L2>>,
}

/// One streamer's engine.
pub struct Engine {
    config: Config,
    metrics: Arc<Metrics>,
    // Held for a check and a channel send per call; never across database work.
    state: Mutex<State>,
    /// The WebSocket hub, once `listen()` was called.
    hub: Mutex<Option<crate::hub::Hub>>,
}

/// Result of a `get`: settled now from the cache, or pending (a completion will follow).
#[derive(Debug, PartialEq)]
pub enum Lookup {
    /// JSON text of the value, or `None` when the key is absent or deleted.
    Hit(Option<Arc<str>>),
    Pending,
}

/// Checks a key: non-empty, at most `max_chars` characters, no NUL.
pub fn validate_key(key: &str, max_chars: usize) -> Result<()> {
    if key.is_empty() {
        return Err(Error::InvalidKey(
            "the key is an empty string; use a non-empty string such as 'price:BTC'".into(),
        ));
    }
    let n = key.chars().count();
    if n > max_chars {
        return Err(Error::InvalidKey(format!(
            "the key is {n} characters long; the limit is {max_chars} (option maxKeyLength)"
        )));
    }
    if key.contains('\0') {
        return Err(Error::InvalidKey(
            "the key contains a NUL character, which databases refuse".into(),
        ));
    }
    Ok(())
}

impl Engine {
    /// Validates the backend choice and sets up logging. Nothing is opened yet.
    pub fn new(config: Config) -> Result<Engine> {
        crate::logging::init(config.log_level.as_deref());
        Ok(Engine {
            config,
            metrics: Arc::new(Metrics::new()),
            state: Mutex::new(State::Created),
            hub: Mutex::new(None),
        })
    }

    /// Starts the WebSocket hub (`listen()`); returns its port and URL. Needs `init()` first.
    pub fn listen(&self, options: &Value) -> Result<(u16, String)> {
        let (core, source) = {
            let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            match &*st {
                State::Created => return Err(Error::NotInitialized("listen()")),
                State::Closed => return Err(Error::Closed("listen()")),
                State::Running(r) => (r.core.clone(), r.source.clone()),
            }
        };
        let mut hub = self.hub.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = &*hub {
            return Err(Error::InvalidArgument(format!(
                "listen(): the hub already listens on {}; call it once per streamer",
                h.url
            )));
        }
        let cfg = crate::hub::HubConfig::from_json(options, self.config.max_connections as usize)?;
        let metrics = self.metrics.clone();
        let backend = self.config.backend.name();
        let status: crate::hub::StatusFn = Box::new(move || {
            let l = metrics.latency();
            serde_json::json!({
                "backend": backend,
                "mode": source.as_ref().map_or("changelog", |s| s.mode()),
                "perSecond": metrics.emit_rate.per_second(),
                "captured": metrics.events_captured.load(Relaxed),
                "latency": { "p50": l.p50, "p99": l.p99 },
            })
        });
        let h = crate::hub::Hub::start(cfg, core, status)?;
        let out = (h.port, h.url.clone());
        *hub = Some(h);
        Ok(out)
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Starts the threads. `id` is settled with `Ready` or `Failed` through `completions`.
    pub fn init(
        &self,
        id: u32,
        events: Arc<dyn BatchSink>,
        completions: Arc<dyn CompletionSink>,
    ) -> Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match *st {
            State::Created => {}
            State::Running(_) => return Err(Error::AlreadyInitialized),
            State::Closed => return Err(Error::Closed("init()")),
        }
        let cfg = &self.config;
        let cache = cfg
            .enable_cache
            .then(|| Cache::new(cfg.cache_max_bytes, cfg.cache_ttl_ms));
        let core = Arc::new(Core::new(
            cache,
            cfg.history_size,
            cfg.history_max_bytes,
            cfg.dedupe_capacity,
            self.metrics.clone(),
            cfg.queue_size,
        ));
        let (ops_tx, ops_rx) = sync_channel(cfg.write_queue_size);
        let ready = Arc::new(AtomicBool::new(false));
        let connected = Arc::new(AtomicBool::new(false));
        let on_panic = completions.clone();
        let l2 = match cfg.redis.as_ref().filter(|r| r.cache) {
            Some(r) => {
                let l2 = crate::bus::l2::L2::start(crate::bus::l2::L2Context {
                    client: crate::bus::client(r)?,
                    keys: crate::bus::Keys::new(&r.key_prefix),
                    ttl_ms: r.cache_ttl_ms,
                    core: core.clone(),
                    completions: completions.clone(),
                    ops: ops_tx.clone(),
                })
                .map_err(|e| Error::Internal(format!("cannot start the L2 cache thread: {e}")))?;
                let l2 = Arc::new(l2);
                core.set_l2(Some(l2.clone()));
                Some(l2)
            }
            None => None,
        };
        let batch = BatchOptions {
            batch_size: cfg.batch_size,
            batch_timeout: Duration::from_millis(cfg.batch_timeout_ms),
            max_in_flight: cfg.max_in_flight_batches,
        };
        let store_ctx = StoreContext {
            core: core.clone(),
            completions,
            rx: ops_rx,
            init_id: id,
            ready: ready.clone(),
            connected: connected.clone(),
            sink: events,
            batch,
            write_batch_size: cfg.write_batch_size,
        };
        let mut source = None;
        let mut bus = None;
        let (name, body): (&str, Box<dyn FnOnce() + Send>) = match &cfg.backend {
            Backend::Sqlite(sqlite) => {
                let store = StoreThread {
                    cfg: sqlite.clone(),
                    ctx: store_ctx,
                    wake: ops_tx.clone(),
                };
                ("usp-sqlite", Box::new(move || store.run()))
            }
            Backend::Mysql(server) => {
                let status = Arc::new(SourceStatus::default());
                status.set_mode("starting");
                source = Some(status.clone());
                let bus_status = cfg
                    .redis
                    .as_ref()
                    .map(|r| Arc::new(crate::bus::BusStatus::new(r)));
                bus = bus_status.clone();
                let store = MysqlStoreThread {
                    server: server.clone(),
                    ctx: store_ctx,
                    status,
                    redis: cfg.redis.clone(),
                    bus_status,
                };
                ("usp-mysql-store", Box::new(move || store.run()))
            }
            Backend::Mongodb(server) => {
                let status = Arc::new(SourceStatus::default());
                status.set_mode("starting");
                source = Some(status.clone());
                let store = MongoStoreThread {
                    server: server.clone(),
                    ctx: store_ctx,
                    status,
                };
                ("usp-mongodb-store", Box::new(move || store.run()))
            }
        };
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                // A panic would leave promises unsettled; it is a bug, but never a crash.
                if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
                    let msg = crate::error::panic_message(&*p);
                    tracing::error!("store thread panicked: {msg}");
                    on_panic.complete(vec![Completion::Fatal {
                        error: Error::Internal(format!("the store thread stopped: {msg}")),
                    }]);
                }
            })
            .map_err(|e| Error::Internal(format!("cannot start the store thread: {e}")))?;
        *st = State::Running(Running {
            core,
            ops: ops_tx,
            ready,
            connected,
            source,
            bus,
            l2,
        });
        Ok(())
    }

    fn submit(&self, what: &'static str, op: Op) -> Result<()> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let r = match &*st {
            State::Created => return Err(Error::NotInitialized(what)),
            State::Closed => return Err(Error::Closed(what)),
            State::Running(r) => r,
        };
        if !r.ready.load(Relaxed) {
            return Err(Error::NotInitialized(what));
        }
        self.metrics.write_queue_depth.fetch_add(1, Relaxed);
        match r.ops.try_send(op) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.metrics.write_queue_depth.fetch_sub(1, Relaxed);
                match e {
                    TrySendError::Full(_) => Err(Error::Overloaded(format!(
                        "{what} refused: {} operations are already waiting for the store (option writeQueueSize); await earlier calls before sending more",
                        self.config.write_queue_size
                    ))),
                    TrySendError::Disconnected(_) => Err(Error::Closed(what)),
                }
            }
        }
    }

    /// Queues an upsert of `json` (a JSON text) under `key`.
    pub fn push(&self, id: u32, key: &str, json: String) -> Result<()> {
        validate_key(key, self.config.max_key_length)?;
        if json.len() > self.config.max_value_size {
            return Err(Error::ValueTooLarge(format!(
                "the value is {} bytes as JSON; the limit is {} bytes (option maxValueSize)",
                json.len(),
                self.config.max_value_size
            )));
        }
        self.submit(
            "push()",
            Op::Put {
                id,
                key: key.into(),
                json,
            },
        )
    }

    /// Queues a delete of `key`.
    pub fn delete(&self, id: u32, key: &str) -> Result<()> {
        validate_key(key, self.config.max_key_length)?;
        self.submit(
            "delete()",
            Op::Delete {
                id,
                key: key.into(),
            },
        )
    }

    /// Starts delivering row changes of `table` (MySQL/MariaDB); `id` is settled once active.
    pub fn watch(
        &self,
        id: u32,
        table: &str,
        insert: bool,
        update: bool,
        delete: bool,
    ) -> Result<()> {
        crate::config::validate_identifier(table, "watch(table)")
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        if !(insert || update || delete) {
            return Err(Error::InvalidArgument(
                "watch(): `operations` selects nothing; give some of 'insert', 'update', 'delete'"
                    .into(),
            ));
        }
        self.submit(
            "watch()",
            Op::Watch {
                id,
                table: table.to_string(),
                insert,
                update,
                delete,
            },
        )
    }

    /// Answers from the cache, or queues a store read.
    pub fn get(&self, id: u32, key: &str) -> Result<Lookup> {
        validate_key(key, self.config.max_key_length)?;
        {
            let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            match &*st {
                State::Created => return Err(Error::NotInitialized("get()")),
                State::Closed => return Err(Error::Closed("get()")),
                State::Running(r) => {
                    if !r.ready.load(Relaxed) {
                        return Err(Error::NotInitialized("get()"));
                    }
                    if let Some(hit) = r.core.cache.as_ref().and_then(|c| c.get(key)) {
                        return Ok(Lookup::Hit(hit.value));
                    }
                    if let Some(l2) = &r.l2 {
                        if l2.lookup(id, key.into()) {
                            return Ok(Lookup::Pending);
                        }
                    }
                }
            }
        }
        self.submit(
            "get()",
            Op::Get {
                id,
                key: key.into(),
            },
        )
        .map(|_| Lookup::Pending)
    }

    /// Stops everything. Returns true when nothing was running (settled now); otherwise `id` is
    /// settled with `Closed` once queued work is done and delivery has drained.
    pub fn close(&self, id: u32) -> Result<bool> {
        if let Some(h) = self.hub.lock().unwrap_or_else(|p| p.into_inner()).take() {
            // Clients get their close frames while JavaScript goes on.
            let _ = std::thread::Builder::new()
                .name("usp-hub-stop".into())
                .spawn(move || h.stop());
        }
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match std::mem::replace(&mut *st, State::Closed) {
            State::Created | State::Closed => Ok(true),
            State::Running(r) => {
                if let Some(l2) = r.l2.clone() {
                    // Its queued lookups go to the store before the shutdown below, or are
                    // refused there after it; Redis may be slow to answer, so not on this thread.
                    r.core.set_l2(None);
                    let _ = std::thread::Builder::new()
                        .name("usp-l2-stop".into())
                        .spawn(move || l2.stop());
                }
                // Blocking send: the store thread never waits on JavaScript, so room frees up.
                self.metrics.write_queue_depth.fetch_add(1, Relaxed);
                if r.ops.send(Op::Shutdown { id }).is_err() {
                    // The store thread is gone (failed init): delivery is stopped already.
                    self.metrics.write_queue_depth.fetch_sub(1, Relaxed);
                    return Ok(true);
                }
                Ok(false)
            }
        }
    }

    /// Counts an exception thrown by a JavaScript listener.
    pub fn record_listener_error(&self, message: &str) {
        self.metrics.listener_errors.fetch_add(1, Relaxed);
        self.metrics.errors_recoverable.fetch_add(1, Relaxed);
        self.metrics.set_last_error("USP_LISTENER_ERROR", message);
    }

    /// A snapshot of the engine for `getStatus()`. Contains no secret.
    pub fn status(&self) -> Value {
        let m = &self.metrics;
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut source = Value::Null;
        let mut bus = Value::Null;
        let (mode, initialized, closed, connected, core) = match &*st {
            State::Created => ("idle", false, false, false, None),
            State::Closed => ("closed", false, true, false, None),
            State::Running(r) => {
                if let Some(b) = &r.bus {
                    bus = b.to_json();
                }
                let ready = r.ready.load(Relaxed);
                let mode = match (&r.source, ready) {
                    (_, false) => "starting",
                    (Some(s), true) => {
                        source = s.to_json();
                        s.mode()
                    }
                    (None, true) => "changelog",
                };
                (
                    mode,
                    ready,
                    false,
                    r.connected.load(Relaxed),
                    Some(r.core.clone()),
                )
            }
        };
        drop(st);
        let c = &self.config;
        let l2_json = {
            // `redis.cache` is already false when `enableCache` is.
            let enabled = c.redis.as_ref().is_some_and(|r| r.cache);
            let (hits, misses) = (m.l2_hits.load(Relaxed), m.l2_misses.load(Relaxed));
            let ratio = if hits + misses > 0 {
                hits as f64 / (hits + misses) as f64
            } else {
                0.0
            };
            json!({ "enabled": enabled, "hits": hits, "misses": misses, "hitRatio": ratio,
                    "ttlMs": c.redis.as_ref().map_or(0, |r| r.cache_ttl_ms) })
        };
        let cache = match core.as_ref().and_then(|c| c.cache.as_ref()) {
            Some(cache) => {
                let s = cache.stats();
                json!({ "enabled": true, "hits": s.hits, "misses": s.misses, "hitRatio": s.hit_ratio,
                        "size": s.size, "bytes": s.bytes, "maxBytes": s.max_bytes, "ttlMs": c.cache_ttl_ms,
                        "l2": l2_json })
            }
            None => {
                json!({ "enabled": c.enable_cache, "hits": 0, "misses": 0, "hitRatio": 0.0, "size": 0,
                             "bytes": 0, "maxBytes": c.cache_max_bytes, "ttlMs": c.cache_ttl_ms, "l2": l2_json })
            }
        };
        let lat = m.latency();
        let history = core.as_ref().map_or((0, 0), |c| c.history_len());
        let last = m
            .last_error()
            .map(|(code, message, at)| json!({ "code": code, "message": message, "at": at }));
        json!({
            "mode": mode,
            "connected": connected,
            "initialized": initialized,
            "closed": closed,
            "backend": c.backend_summary(),
            "source": source,
            "bus": bus,
            "events": {
                "captured": m.events_captured.load(Relaxed),
                "emitted": m.events_emitted.load(Relaxed),
                "deduplicated": m.events_deduplicated.load(Relaxed),
                "perSecond": m.emit_rate.per_second(),
                "batches": m.batches_emitted.load(Relaxed),
                "maxBatch": m.batch_max.load(Relaxed),
                "resyncs": m.resyncs.load(Relaxed),
            },
            "latency": { "count": lat.count, "p50": lat.p50, "p95": lat.p95, "p99": lat.p99, "max": lat.max, "mean": lat.mean },
            "cache": cache,
            "queues": {
                "writes": { "depth": m.write_queue_depth.load(Relaxed), "capacity": c.write_queue_size },
                "delivery": { "depth": m.dispatch_queue_depth.load(Relaxed), "capacity": c.queue_size },
                "inFlightBatches": { "depth": m.in_flight_batches.load(Relaxed), "capacity": c.max_in_flight_batches },
            },
            "store": {
                "transactions": m.transactions.load(Relaxed),
                "writes": m.writes.load(Relaxed),
                "position": m.source_position.load(Relaxed),
            },
            "history": {
                "size": history.0,
                "capacity": c.history_size,
                "bytes": history.1,
                "maxBytes": c.history_max_bytes,
                "lastSeq": core.as_ref().map_or(0, |c| c.last_seq()),
            },
            "errors": {
                "recoverable": m.errors_recoverable.load(Relaxed),
                "fatal": m.errors_fatal.load(Relaxed),
                "listener": m.listener_errors.load(Relaxed),
                "last": last,
            },
            "uptimeMs": m.started.elapsed().as_millis() as u64,
            "hub": self.hub.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|h| h.status()),
        })
    }
}
