//! Sources turn database changes into `Change`s with their positions and feed the core. They
//! never talk to JavaScript. The embedded SQLite source also serves the store operations
//! (push/get/delete) on the same thread, so a write and its capture share one connection.
//! Server sources (MySQL/MariaDB) serve the store operations on one thread and capture on
//! another, feeding the core through a `Pipeline`.

pub mod mysql;
pub mod sqlite;

use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

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

    pub fn to_json(&self) -> Value {
        json!({
            "mode": self.mode(),
            "reconnecting": self.reconnecting.load(Relaxed),
            "attempts": self.attempts.load(Relaxed),
            "reconnects": self.reconnects.load(Relaxed),
            "server": self.server.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            "position": self.position.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        })
    }
}
