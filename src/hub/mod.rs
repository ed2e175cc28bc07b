//! The WebSocket hub: a native server (axum on a tokio runtime of its own) that fans the
//! engine's changes out to browsers. Every admitted change is offered to every connection whose
//! channels match (`Publisher`, called by the core under its history lock); each connection has
//! an outbox bounded in bytes with a slow-consumer policy, drained by its own task into batched
//! `events` frames. A client that reconnects with the last `seq` it saw is replayed what it
//! missed from the history ring, or told exactly what cannot be (`gap`). See `protocol` for the
//! messages and close codes.

pub mod auth;
pub mod outbox;
pub mod protocol;
mod server;

use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::core::{Core, Publisher};
use crate::error::{Error, Result};
use crate::event::{Change, Event};
use outbox::{Item, Outbox, Policy};
use protocol::Subscriptions;

/// `listen()` options, validated.
#[derive(Debug, Clone)]
pub struct HubConfig {
    pub host: String,
    pub port: u16,
    pub path: String,
    pub max_connections: usize,
    /// Largest client frame, bytes.
    pub max_payload: usize,
    /// Ping interval; a peer silent for two intervals is dropped.
    pub heartbeat: Duration,
    /// Client messages allowed per `rate_interval`.
    pub rate_messages: u32,
    pub rate_interval: Duration,
    /// Replay missed events on `subscribe { since }`.
    pub history: bool,
    pub dashboard: bool,
    pub policy: Policy,
    pub max_queue_bytes: usize,
    /// JWT checks; `None`: no authentication.
    pub auth: Option<auth::Auth>,
    /// Allowed `Origin` headers; `None`: any (and requests without one).
    pub origins: Option<Vec<String>>,
}

const LISTEN_KEYS: &[&str] = &[
    "port",
    "host",
    "path",
    "maxConnections",
    "maxPayload",
    "heartbeat",
    "rateLimit",
    "history",
    "dashboard",
    "slowConsumer",
    "auth",
    "origins",
];

fn invalid(msg: String) -> Error {
    Error::InvalidArgument(format!("listen(): {msg}"))
}

fn int(o: &Map<String, Value>, k: &str, min: u64, max: u64) -> Result<Option<u64>> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
            _ => Err(invalid(format!(
                "`{k}` must be an integer from {min} to {max}, got {v}"
            ))),
        },
    }
}

fn boolean(o: &Map<String, Value>, k: &str) -> Result<Option<bool>> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(invalid(format!("`{k}` must be true or false, got {v}"))),
    }
}

impl HubConfig {
    /// Reads `listen()` options; `max_connections` defaults to the streamer's option.
    pub fn from_json(v: &Value, max_connections: usize) -> Result<HubConfig> {
        let empty = Map::new();
        let o = match v {
            Value::Null => &empty,
            Value::Object(o) => o,
            other => {
                return Err(invalid(format!(
                    "options must be an object like {{ port: 8080 }}, got {other}"
                )))
            }
        };
        for k in o.keys() {
            if !LISTEN_KEYS.contains(&k.as_str()) {
                return Err(invalid(format!(
                    "unknown option `{k}`; allowed: {}",
                    LISTEN_KEYS.join(", ")
                )));
            }
        }
        let str_opt = |k: &str| -> Result<Option<String>> {
            match o.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(v) => Err(invalid(format!("`{k}` must be a string, got {v}"))),
            }
        };
        let path = str_opt("path")?.unwrap_or_else(|| "/stream".into());
        if !path.starts_with('/')
            || path.len() > 200
            || !path
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "/-_.".contains(c))
            || matches!(path.as_str(), "/" | "/health" | "/metrics" | "/status")
        {
            return Err(invalid(format!(
                "`path` must start with '/', hold only letters, digits and / - _ . and not be '/', '/health', '/metrics' or '/status', got {path:?}"
            )));
        }
        let (rate_messages, rate_interval) = match o.get("rateLimit") {
            None | Some(Value::Null) => (100, Duration::from_secs(1)),
            Some(Value::Object(r)) => {
                for k in r.keys() {
                    if k != "messages" && k != "interval" {
                        return Err(invalid(format!(
                            "unknown option `rateLimit.{k}`; allowed: messages, interval"
                        )));
                    }
                }
                (
                    int(r, "messages", 1, 1_000_000)?.unwrap_or(100) as u32,
                    Duration::from_millis(int(r, "interval", 1, 3_600_000)?.unwrap_or(1000)),
                )
            }
            Some(v) => {
                return Err(invalid(format!(
                "`rateLimit` must be an object like {{ messages: 100, interval: 1000 }}, got {v}"
            )))
            }
        };
        let (policy, max_queue_bytes) = match o.get("slowConsumer") {
            None | Some(Value::Null) => (Policy::Coalesce, 1 << 20),
            Some(Value::Object(r)) => {
                for k in r.keys() {
                    if k != "policy" && k != "maxQueueBytes" {
                        return Err(invalid(format!(
                            "unknown option `slowConsumer.{k}`; allowed: policy, maxQueueBytes"
                        )));
                    }
                }
                let policy = match r.get("policy") {
                    None => Policy::Coalesce,
                    Some(p) => p.as_str().and_then(Policy::parse).ok_or_else(|| {
                        invalid(format!(
                            "`slowConsumer.policy` must be 'coalesce', 'drop' or 'disconnect', got {p}"
                        ))
                    })?,
                };
                (
                    policy,
                    int(r, "maxQueueBytes", 1024, 1 << 32)?.unwrap_or(1 << 20) as usize,
                )
            }
            Some(v) => {
                return Err(invalid(format!(
                    "`slowConsumer` must be an object like {{ policy: 'drop' }}, got {v}"
                )))
            }
        };
        let auth = match o.get("auth") {
            None | Some(Value::Null) => None,
            Some(a) => Some(auth::Auth::from_json(a)?),
        };
        let origins = match o.get("origins") {
            None | Some(Value::Null) => None,
            Some(Value::Array(a)) if a.iter().all(Value::is_string) && !a.is_empty() => Some(
                a.iter()
                    .filter_map(|x| x.as_str().map(|s| s.trim_end_matches('/').to_string()))
                    .collect(),
            ),
            Some(_) => return Err(invalid(
                "`origins` must be a non-empty array of origins like ['https://app.example.com']"
                    .into(),
            )),
        };
        Ok(HubConfig {
            auth,
            origins,
            host: str_opt("host")?.unwrap_or_else(|| "127.0.0.1".into()),
            port: int(o, "port", 0, 65_535)?.unwrap_or(0) as u16,
            path,
            max_connections: int(o, "maxConnections", 1, 10_000_000)?
                .map_or(max_connections, |n| n as usize),
            max_payload: int(o, "maxPayload", 64, 64 << 20)?.unwrap_or(64 * 1024) as usize,
            heartbeat: Duration::from_millis(
                int(o, "heartbeat", 100, 3_600_000)?.unwrap_or(15_000),
            ),
            rate_messages,
            rate_interval,
            history: boolean(o, "history")?.unwrap_or(true),
            dashboard: boolean(o, "dashboard")?.unwrap_or(false),
            policy,
            max_queue_bytes,
        })
    }
}

/// Counters of the hub, for `/metrics` and `getStatus()`.
#[derive(Debug, Default)]
pub struct HubMetrics {
    pub connections: AtomicUsize,
    pub connections_total: AtomicU64,
    pub refused: AtomicU64,
    pub frames: AtomicU64,
    pub deliveries: AtomicU64,
    pub bytes: AtomicU64,
    pub coalesced: AtomicU64,
    pub dropped: AtomicU64,
    pub gaps: AtomicU64,
    pub slow_disconnects: AtomicU64,
    pub rate_limited: AtomicU64,
    pub bad_messages: AtomicU64,
    pub queued_bytes: AtomicUsize,
}

/// One WebSocket connection, as the publisher sees it.
pub struct Conn {
    id: u64,
    subs: Mutex<Subscriptions>,
    outbox: Mutex<Outbox>,
    notify: tokio::sync::Notify,
    /// A close code the connection task must apply (slow consumer), 0: none.
    kill: AtomicU16,
}

/// The engine's state for `/status` and the dashboard (mode, rates, latency).
pub type StatusFn = Box<dyn Fn() -> Value + Send + Sync>;

/// State shared by the server tasks and the publisher.
pub struct Shared {
    config: HubConfig,
    status: StatusFn,
    core: Arc<Core>,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
    pub metrics: HubMetrics,
    shutdown: tokio::sync::Notify,
    closing: AtomicBool,
}

impl Shared {
    fn register(&self) -> Arc<Conn> {
        let id = self.next_id.fetch_add(1, Relaxed);
        let c = Arc::new(Conn {
            id,
            subs: Mutex::new(Subscriptions::default()),
            outbox: Mutex::new(Outbox::new(self.config.max_queue_bytes, self.config.policy)),
            notify: tokio::sync::Notify::new(),
            kill: AtomicU16::new(0),
        });
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, c.clone());
        c
    }

    fn unregister(&self, c: &Conn) {
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&c.id);
        let left = c.outbox.lock().unwrap_or_else(|p| p.into_inner()).bytes();
        self.metrics
            .queued_bytes
            .fetch_sub(left.min(self.metrics.queued_bytes.load(Relaxed)), Relaxed);
    }
}

fn coalesce_key(c: &Change) -> Arc<str> {
    match &c.table {
        Some(t) => format!("{t}\u{0}{}", c.key).into(),
        None => c.key.clone(),
    }
}

impl Publisher for Shared {
    fn publish(&self, changes: &[Arc<Change>]) {
        let conns: Vec<Arc<Conn>> = self
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        if conns.is_empty() {
            return;
        }
        // Each event is encoded once, for the first connection that wants it.
        let mut encoded: Vec<Option<(Arc<str>, Arc<str>)>> = vec![None; changes.len()];
        for conn in conns {
            if conn.kill.load(Relaxed) != 0 {
                continue;
            }
            let subs = conn.subs.lock().unwrap_or_else(|p| p.into_inner());
            let mut queued = false;
            let mut ob = conn.outbox.lock().unwrap_or_else(|p| p.into_inner());
            let before = ob.bytes();
            for (i, c) in changes.iter().enumerate() {
                if !subs.matches(c) {
                    continue;
                }
                let (json, key) = encoded[i]
                    .get_or_insert_with(|| {
                        (
                            protocol::encode_event(&Event::Change(c.clone())).into(),
                            coalesce_key(c),
                        )
                    })
                    .clone();
                let o = ob.push(Item {
                    seq: c.seq,
                    coalesce_key: key,
                    json,
                });
                queued = true;
                self.metrics.coalesced.fetch_add(o.coalesced, Relaxed);
                self.metrics.dropped.fetch_add(o.dropped, Relaxed);
                if o.disconnect {
                    conn.kill.store(protocol::close::SLOW_CONSUMER, Relaxed);
                    self.metrics.slow_disconnects.fetch_add(1, Relaxed);
                    break;
                }
            }
            let after = ob.bytes();
            drop(ob);
            drop(subs);
            if after >= before {
                self.metrics.queued_bytes.fetch_add(after - before, Relaxed);
            } else {
                self.metrics.queued_bytes.fetch_sub(before - after, Relaxed);
            }
            if queued {
                conn.notify.notify_one();
            }
        }
    }
}

/// A running hub.
pub struct Hub {
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
    pub port: u16,
    pub url: String,
}

impl Hub {
    /// Binds the address and starts serving; the core's changes are published from now on.
    pub fn start(config: HubConfig, core: Arc<Core>, status: StatusFn) -> Result<Hub> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("usp-hub")
            .enable_all()
            .build()
            .map_err(|e| Error::Internal(format!("hub runtime: {e}")))?;
        let addr = format!("{}:{}", config.host, config.port);
        let listener = std::net::TcpListener::bind(&addr).map_err(|e| {
            Error::InvalidArgument(format!(
                "listen(): cannot listen on {addr}: {e}; choose another port (0 picks a free one) or host"
            ))
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::Internal(format!("hub socket: {e}")))?;
        let port = listener
            .local_addr()
            .map_err(|e| Error::Internal(format!("hub socket: {e}")))?
            .port();
        let url = format!("ws://{}:{port}{}", config.host, config.path);
        let shared = Arc::new(Shared {
            config,
            status,
            core: core.clone(),
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            metrics: HubMetrics::default(),
            shutdown: tokio::sync::Notify::new(),
            closing: AtomicBool::new(false),
        });
        let listener = {
            let _guard = runtime.enter();
            tokio::net::TcpListener::from_std(listener)
                .map_err(|e| Error::Internal(format!("hub socket: {e}")))?
        };
        // Publishing starts before the first connection can be accepted, so a subscriber never
        // registers at a seq whose successors are not published to it.
        core.set_publisher(Some(shared.clone()));
        runtime.spawn(server::serve(listener, shared.clone()));
        tracing::info!(%url, "hub listening");
        Ok(Hub {
            shared,
            runtime: Some(runtime),
            port,
            url,
        })
    }

    /// Stops accepting, closes every connection (1001) and stops the runtime.
    pub fn stop(mut self) {
        self.shared.core.set_publisher(None);
        self.shared.closing.store(true, Relaxed);
        self.shared.shutdown.notify_waiters();
        if let Some(rt) = self.runtime.take() {
            // Connection tasks send their close frames; then everything stops.
            std::thread::sleep(Duration::from_millis(20));
            rt.shutdown_timeout(Duration::from_secs(2));
        }
        tracing::info!("hub stopped");
    }

    /// Hub counters for `getStatus()`.
    pub fn status(&self) -> Value {
        let m = &self.shared.metrics;
        serde_json::json!({
            "url": self.url,
            "auth": self.shared.config.auth.is_some(),
            "connections": m.connections.load(Relaxed),
            "connectionsTotal": m.connections_total.load(Relaxed),
            "refused": m.refused.load(Relaxed),
            "frames": m.frames.load(Relaxed),
            "deliveries": m.deliveries.load(Relaxed),
            "bytes": m.bytes.load(Relaxed),
            "coalesced": m.coalesced.load(Relaxed),
            "dropped": m.dropped.load(Relaxed),
            "gaps": m.gaps.load(Relaxed),
            "slowDisconnects": m.slow_disconnects.load(Relaxed),
            "rateLimited": m.rate_limited.load(Relaxed),
            "badMessages": m.bad_messages.load(Relaxed),
            "queuedBytes": m.queued_bytes.load(Relaxed),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn listen_options_are_validated() {
        let c = HubConfig::from_json(&Value::Null, 10).unwrap();
        assert_eq!(
            (c.port, c.path.as_str(), c.max_connections),
            (0, "/stream", 10)
        );
        assert_eq!(c.policy, Policy::Coalesce);
        let c = HubConfig::from_json(
            &json!({"port": 8080, "slowConsumer": {"policy": "drop", "maxQueueBytes": 4096},
                    "rateLimit": {"messages": 5, "interval": 100}, "dashboard": false}),
            10,
        )
        .unwrap();
        assert_eq!(
            (c.port, c.policy, c.max_queue_bytes),
            (8080, Policy::Drop, 4096)
        );
        assert_eq!(
            (c.rate_messages, c.rate_interval),
            (5, Duration::from_millis(100))
        );
        for bad in [
            json!({"port": 70000}),
            json!({"path": "stream"}),
            json!({"path": "/metrics"}),
            json!({"nope": 1}),
            json!({"slowConsumer": {"policy": "wait"}}),
            json!({"rateLimit": {"messages": 0}}),
            json!({"history": "yes"}),
            json!(5),
        ] {
            let e = HubConfig::from_json(&bad, 10).unwrap_err();
            assert_eq!(e.code(), "USP_INVALID_ARGUMENT", "{bad}");
        }
        assert_eq!(
            HubConfig::from_json(&json!({"auth": {}}), 10)
                .unwrap_err()
                .code(),
            "USP_INVALID_ARGUMENT"
        );
        assert_eq!(
            HubConfig::from_json(&json!({"origins": []}), 10)
                .unwrap_err()
                .code(),
            "USP_INVALID_ARGUMENT"
        );
        let c = HubConfig::from_json(&json!({"origins": ["https://a.example/"]}), 10).unwrap();
        assert_eq!(c.origins, Some(vec!["https://a.example".to_string()]));
    }
}
