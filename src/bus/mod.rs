//! Scale-out through Redis (`options.redis`): several instances serve one stream.
//!
//! - `lease`: exactly one instance captures from the database at a time. It holds a lease key
//!   with a fencing term; a dead capturer's lease expires and another instance takes over.
//! - `append`: the capturer appends changes to a Redis Stream, each entry with the global `seq`
//!   of its first change and, atomically, the capture checkpoint it reached. A new capturer
//!   resumes from that checkpoint: nothing appended twice, nothing skipped.
//! - `consume`: every instance (the capturer too) reads the stream and feeds its own core, so
//!   every instance delivers the same changes with the same `seq` to its listeners and clients.
//! - `l2`: a cache shared by the instances, behind each one's in-process cache.

pub mod append;
pub mod codec;
pub mod consume;
pub mod l2;
pub mod lease;

use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use crate::config::{redact_uri, RedisConfig};
use crate::error::{Error, Result};

/// How long a Redis command may take before the connection is treated as broken.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// How long connecting may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Reconnect delays (exponential with jitter, see `source::backoff_delay`).
pub const RECONNECT_MIN: Duration = Duration::from_millis(50);
pub const RECONNECT_MAX: Duration = Duration::from_secs(2);

/// The Redis keys of one stream. Every key starts with the configured prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    /// The capture lease: `<instance>:<term>`, with a TTL.
    pub lease: String,
    /// The fencing term counter: each lease taken gets the next term.
    pub term: String,
    /// The Redis Stream of changes.
    pub stream: String,
    /// The last global seq appended.
    pub seq: String,
    /// The capture checkpoint of the last appended transaction end.
    pub checkpoint: String,
    /// Prefix of the L2 cache entries (`<prefix>kv:<key>`).
    pub kv: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            lease: format!("{prefix}lease"),
            term: format!("{prefix}term"),
            stream: format!("{prefix}stream"),
            seq: format!("{prefix}seq"),
            checkpoint: format!("{prefix}checkpoint"),
            kv: format!("{prefix}kv:"),
        }
    }
}

/// Opens a client (nothing is connected yet). The URL was validated by `config`.
pub fn client(cfg: &RedisConfig) -> Result<redis::Client> {
    redis::Client::open(cfg.url.0.as_str()).map_err(|e| {
        Error::InvalidConfig(format!(
            "`options.redis.url` is not usable ({:?}): {}",
            e.kind(),
            redact_uri(&cfg.url.0)
        ))
    })
}

/// Connects with the bounded timeouts every bus thread uses.
pub fn connect(client: &redis::Client) -> redis::RedisResult<redis::Connection> {
    let c = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
    c.set_read_timeout(Some(COMMAND_TIMEOUT))?;
    c.set_write_timeout(Some(COMMAND_TIMEOUT))?;
    Ok(c)
}

/// A Redis error as text safe to show: the client never prints the URL's password, and the
/// server's messages do not carry it.
pub fn describe(e: &redis::RedisError) -> String {
    e.to_string()
}

/// Maps a Redis error at `init()`.
pub fn init_error(e: &redis::RedisError, cfg: &RedisConfig) -> Error {
    let url = redact_uri(&cfg.url.0);
    if e.is_io_error() || e.is_timeout() || e.is_connection_refusal() {
        Error::DbUnavailable(format!(
            "Redis at {url} is not reachable ({}); start it or fix options.redis.url",
            describe(e)
        ))
    } else {
        Error::Db(format!(
            "Redis at {url} refused the streamer ({}); check the URL's user and password",
            describe(e)
        ))
    }
}

const ROLE_STARTING: u8 = 0;
const ROLE_FOLLOWER: u8 = 1;
const ROLE_LEADER: u8 = 2;

/// What `getStatus().bus` shows: this instance's role and the state of its Redis links.
#[derive(Debug)]
pub struct BusStatus {
    url: String,
    prefix: String,
    role: AtomicU8,
    /// The fencing term of the lease while this instance captures.
    pub term: AtomicU64,
    /// The consumer is cut off from Redis and retrying.
    pub reconnecting: AtomicBool,
    /// Reconnect attempts since the last success (consumer or appender).
    pub attempts: AtomicU64,
    /// The appender cannot reach Redis: capture is paused.
    pub capture_paused: AtomicBool,
    /// Last seq read from the stream.
    pub last_seq: AtomicU64,
    /// Entries read and appended by this instance.
    pub consumed: AtomicU64,
    pub appended: AtomicU64,
    /// Times this instance found itself behind the stream's trim point.
    pub resyncs: AtomicU64,
    /// Times this instance took the lease.
    pub takeovers: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl BusStatus {
    pub fn new(cfg: &RedisConfig) -> BusStatus {
        BusStatus {
            url: redact_uri(&cfg.url.0),
            prefix: cfg.key_prefix.clone(),
            role: AtomicU8::new(ROLE_STARTING),
            term: AtomicU64::new(0),
            reconnecting: AtomicBool::new(false),
            attempts: AtomicU64::new(0),
            capture_paused: AtomicBool::new(false),
            last_seq: AtomicU64::new(0),
            consumed: AtomicU64::new(0),
            appended: AtomicU64::new(0),
            resyncs: AtomicU64::new(0),
            takeovers: AtomicU64::new(0),
            last_error: Mutex::new(None),
        }
    }

    pub fn set_leader(&self, leader: bool) {
        self.role
            .store(if leader { ROLE_LEADER } else { ROLE_FOLLOWER }, Relaxed);
    }

    pub fn is_leader(&self) -> bool {
        self.role.load(Relaxed) == ROLE_LEADER
    }

    pub fn set_error(&self, e: Option<String>) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = e;
    }

    /// True while any link to Redis is down.
    pub fn degraded(&self) -> bool {
        self.reconnecting.load(Relaxed) || self.capture_paused.load(Relaxed)
    }

    pub fn to_json(&self) -> Value {
        json!({
            "url": self.url,
            "keyPrefix": self.prefix,
            "role": match self.role.load(Relaxed) {
                ROLE_LEADER => "leader",
                ROLE_FOLLOWER => "follower",
                _ => "starting",
            },
            "term": self.term.load(Relaxed),
            "state": if self.degraded() { "reconnecting" } else { "connected" },
            "reconnecting": self.reconnecting.load(Relaxed),
            "capturePaused": self.capture_paused.load(Relaxed),
            "attempts": self.attempts.load(Relaxed),
            "lastSeq": self.last_seq.load(Relaxed),
            "consumed": self.consumed.load(Relaxed),
            "appended": self.appended.load(Relaxed),
            "resyncs": self.resyncs.load(Relaxed),
            "takeovers": self.takeovers.load(Relaxed),
            "lastError": self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        })
    }
}

/// A checkpoint that can be stored in Redis next to the stream.
pub trait BusCheckpoint: crate::core::pipeline::Checkpoint {
    /// The checkpoint as text, with the time it is written.
    fn to_bus(&self) -> String;
    /// The checkpoint and when it was written (µs since the epoch).
    fn from_bus(s: &str) -> Option<(Self, i64)>;
}

/// Reads the capture checkpoint stored with the stream.
pub fn read_checkpoint<C: BusCheckpoint>(
    client: &redis::Client,
    keys: &Keys,
) -> redis::RedisResult<Option<(C, i64)>> {
    let mut c = connect(client)?;
    let s: Option<String> = redis::cmd("GET").arg(&keys.checkpoint).query(&mut c)?;
    Ok(s.and_then(|s| {
        let r = C::from_bus(&s);
        if r.is_none() {
            tracing::warn!("the checkpoint stored in Redis is unreadable: ignored");
        }
        r
    }))
}

/// An id unique to this streamer instance, written in the lease it holds.
pub fn instance_id() -> String {
    format!(
        "{}-{:08x}",
        std::process::id(),
        crate::source::rand_u32() ^ (crate::event::now_us() as u32)
    )
}
