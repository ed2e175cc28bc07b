//! Sources turn database changes into `Change`s with their positions and feed the core. They
//! never talk to JavaScript. The embedded SQLite source also serves the store operations
//! (push/get/delete) on the same thread, so a write and its capture share one connection.
//! Server sources (MySQL/MariaDB, MongoDB) serve the store operations on one thread and capture
//! on another, feeding the core through a `Pipeline`.

pub mod mongo;
pub mod mysql;
pub mod sqlite;
mod sqlite_tail;
mod wal_watch;

use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::core::batcher::BatchOptions;
use crate::core::Core;
use crate::sink::BatchSink;
use crate::store::{Completion, CompletionSink, Op};

/// Which changes of a watched table are delivered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Operations {
    pub insert: bool,
    pub update: bool,
    pub delete: bool,
}

impl Operations {
    /// Whether changes of `kind` are delivered.
    pub fn allows(&self, kind: crate::event::ChangeKind) -> bool {
        use crate::event::ChangeKind::*;
        match kind {
            Insert => self.insert,
            // A MongoDB replacement is an update of the whole document.
            Update | Replace => self.update,
            Delete => self.delete,
        }
    }
}

impl Default for Operations {
    fn default() -> Self {
        Operations {
            insert: true,
            update: true,
            delete: true,
        }
    }
}

/// What every store thread gets from the engine, whatever the backend.
pub struct StoreContext {
    pub core: Arc<Core>,
    /// Settles the JavaScript promises.
    pub completions: Arc<dyn CompletionSink>,
    /// push/get/delete/close, in call order.
    pub rx: Receiver<Op>,
    /// The pending `init()` call, settled with `Ready` or `Failed`.
    pub init_id: u32,
    pub ready: Arc<AtomicBool>,
    pub connected: Arc<AtomicBool>,
    /// Where captured events go, and how they are batched.
    pub sink: Arc<dyn BatchSink>,
    pub batch: BatchOptions,
    /// Most operations committed in one transaction.
    pub write_batch_size: usize,
}

/// The calls waiting after `first`, up to `max` in all, without the wake-ups; the write queue's
/// depth gauge is lowered by what was taken.
pub fn take_batch(
    first: Op,
    rx: &Receiver<Op>,
    max: usize,
    metrics: &crate::metrics::Metrics,
) -> Vec<Op> {
    let mut ops = vec![first];
    while ops.len() < max {
        match rx.try_recv() {
            Ok(op) => ops.push(op),
            Err(_) => break,
        }
    }
    ops.retain(|o| !matches!(o, Op::Wake));
    metrics.write_queue_depth.fetch_sub(ops.len(), Relaxed);
    ops
}

/// Settles the pending `init()` with `e` (the store could not start); later calls fail at once.
pub fn fail_init(
    backend: &str,
    e: crate::error::Error,
    rx: Receiver<Op>,
    init_id: u32,
    core: &Core,
    completions: &dyn CompletionSink,
) {
    tracing::debug!(code = e.code(), "{backend} store failed to start: {e}");
    drop(rx);
    core.metrics.record_error(&e);
    completions.complete(vec![Completion::Failed {
        id: init_id,
        error: e,
    }]);
}

/// Refuses what is still queued after a close: every call is settled, never left hanging.
pub fn refuse_queued(rx: Receiver<Op>, metrics: &crate::metrics::Metrics) -> Vec<Completion> {
    let mut refused = Vec::new();
    while let Ok(op) = rx.try_recv() {
        if let Some(id) = op.id() {
            metrics.write_queue_depth.fetch_sub(1, Relaxed);
            refused.push(Completion::Failed {
                id,
                error: crate::error::Error::Closed("an operation queued"),
            });
        }
    }
    refused
}

/// What a server source reports in `getStatus()`: its mode, its connection state and what it
/// found on the server. Written by the source threads, read by `getStatus()`.
#[derive(Debug, Default)]
pub struct SourceStatus {
    // Short-held locks: a string or a JSON value is replaced, never held across I/O.
    mode: Mutex<&'static str>,
    /// Capture is disconnected and trying again.
    pub reconnecting: AtomicBool,
    /// Reconnect attempts since the last successful connect.
    pub attempts: AtomicU64,
    /// Reconnects since start.
    pub reconnects: AtomicU64,
    server: Mutex<Value>,
    position: Mutex<String>,
    /// How the binlog stream is read (MySQL): "buffered" or "mysql_cdc".
    binlog_reader: Mutex<Option<&'static str>>,
}

impl SourceStatus {
    pub fn set_mode(&self, mode: &'static str) {
        *self.mode.lock().unwrap_or_else(|p| p.into_inner()) = mode;
    }

    pub fn mode(&self) -> &'static str {
        *self.mode.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_server(&self, v: Value) {
        *self.server.lock().unwrap_or_else(|p| p.into_inner()) = v;
    }

    pub fn set_position(&self, p: String) {
        *self.position.lock().unwrap_or_else(|p| p.into_inner()) = p;
    }

    pub fn set_binlog_reader(&self, r: &'static str) {
        *self.binlog_reader.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
    }

    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "mode": self.mode(),
            "reconnecting": self.reconnecting.load(Relaxed),
            "attempts": self.attempts.load(Relaxed),
            "reconnects": self.reconnects.load(Relaxed),
            "server": self.server.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            "position": self.position.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        });
        if let Some(r) = *self.binlog_reader.lock().unwrap_or_else(|p| p.into_inner()) {
            v["binlogReader"] = json!(r);
        }
        v
    }
}

/// The delay before reconnect attempt `attempt` (1-based): exponential from `min`, capped at
/// `max`, with jitter (between half and the full delay) so many clients do not retry in step.
pub fn backoff_delay(min: Duration, max: Duration, attempt: u32) -> Duration {
    let exp = min.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    let cap = exp.min(max);
    let jitter = (rand_u32() % 1000) as f64 / 1000.0;
    cap.mul_f64(0.5 + 0.5 * jitter)
}

/// A pseudo-random number (jitter, default ids; no cryptographic need).
pub fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let (min, max) = (Duration::from_millis(100), Duration::from_millis(5000));
        for attempt in 1..=30 {
            let d = backoff_delay(min, max, attempt);
            let cap = (min * 2u32.pow(attempt.min(20) - 1)).min(max);
            assert!(
                d >= cap / 2 && d <= cap,
                "attempt {attempt}: {d:?} vs cap {cap:?}"
            );
        }
    }
}
