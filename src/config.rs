//! Configuration: both documented shapes (the nested one of the install guide and the flat one of
//! the API reference) are parsed into one validated `Config`. Every bound of the engine is a
//! named field here with its default; unknown options are refused by name.

use serde_json::{Map, Value};
use std::fmt;

use crate::error::{Error, Result};

/// Default SQLite file when no path is given.
pub const DEFAULT_SQLITE_PATH: &str = "ultimate-streaming.db";
/// Page size of new SQLite files, in bytes. Smaller than SQLite's 4096 because a commit of
/// small upserts to scattered keys writes every page it touched to the WAL whole: 1024 wrote
/// fewer bytes per push and measured faster in `benchmark/push-throughput.js`.
pub const DEFAULT_PAGE_SIZE: u32 = 1024;

/// A secret (password) that never prints.
#[derive(Clone, Default, PartialEq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"***\"" })
    }
}

/// How SQLite syncs commits to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synchronous {
    /// WAL + NORMAL: a committed write survives a crash of the process; the last commits may be
    /// rolled back by a power loss. The default.
    Normal,
    /// WAL + FULL: every commit is fsynced; survives power loss, costs an fsync per transaction.
    Full,
}

/// Embedded SQLite backend settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SqliteConfig {
    /// File path, or `:memory:` for a private in-memory database.
    pub path: String,
    /// KV table name (the change log is `<table>_changes`).
    pub table: String,
    /// Disk sync policy.
    pub synchronous: Synchronous,
    /// How long a write waits for another process's lock, in ms.
    pub busy_timeout_ms: u64,
    /// How often the change log is checked for commits of other processes, in ms.
    pub tail_interval_ms: u64,
    /// Change-log rows kept for readers that are behind (other processes, restarts).
    pub change_log_retention: u64,
    /// Watch the WAL file (Linux, inotify) so other processes' commits are seen at once (else,
    /// and on other systems, only polled).
    pub watch: bool,
    /// Page size in bytes of a database file this streamer creates (a power of two in
    /// 512..=65536); an existing file keeps the page size it was created with.
    pub page_size: u32,
}

/// Server connection settings (MySQL / MongoDB).
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub uri: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub user: Option<String>,
    pub password: Secret,
    pub database: Option<String>,
    /// The key-value table (collection) of push/get/delete. Default `usp_kv`.
    pub table: String,
    /// Capture settings (`options.mysql` or `options.mongodb`).
    pub capture: CaptureOptions,
    /// Copies of the top-level options the server sources need.
    pub use_change_streams: bool,
    pub polling_interval_ms: u64,
}

/// `options.mysql` / `options.mongodb`: change capture settings of a server backend.
#[derive(Debug, Clone, PartialEq)]
pub struct CaptureOptions {
    /// Replication `server_id` of the binlog connection; must be unique among the server's
    /// replicas (a duplicate disconnects the other one). Default: random in 100000..2^31.
    pub server_id: Option<u32>,
    /// MySQL: heartbeat the server sends on an idle binlog stream, in ms; a stream silent for
    /// longer than this (plus a margin) is treated as dead and reconnected. MongoDB: how long the
    /// server holds an idle change-stream request open. Default 1000.
    pub heartbeat_ms: u64,
    /// First reconnect delay, in ms; it doubles per attempt (with jitter). Default 100.
    pub reconnect_min_ms: u64,
    /// Largest reconnect delay, in ms. Default 5000.
    pub reconnect_max_ms: u64,
    /// Name under which the capture checkpoint is stored (table `<table>_checkpoint`); two
    /// streamers that must resume independently use different names. Default `default`.
    pub checkpoint_name: String,
    /// In polling mode, how often the fast path (binlog, change stream) is tried again, in ms.
    /// Default 30000.
    pub fast_path_retry_ms: u64,
    /// Tables (collections) watched from `init()` on (as if `watch()` was called before capture
    /// started), so their rows written while no streamer ran are delivered on resume.
    pub watch: Vec<String>,
}

impl Default for CaptureOptions {
    fn default() -> Self {
        CaptureOptions {
            server_id: None,
            heartbeat_ms: 1000,
            reconnect_min_ms: 100,
            reconnect_max_ms: 5000,
            checkpoint_name: "default".into(),
            fast_path_retry_ms: 30_000,
            watch: Vec::new(),
        }
    }
}

/// `options.redis`: several instances share one stream through Redis (MySQL/MariaDB backend).
#[derive(Debug, Clone, PartialEq)]
pub struct RedisConfig {
    /// `redis://[user:password@]host[:port][/db]`. Secret: it may hold a password.
    pub url: Secret,
    /// Prefix of every Redis key of this stream. Instances of the same stream use the same
    /// prefix; different streams sharing a Redis use different ones. Default
    /// `usp:<database>:<table>:`.
    pub key_prefix: String,
    /// Entries (each a batch of changes) the change stream keeps at most. Default 100000.
    pub stream_max_len: u64,
    /// Entries older than this many ms are trimmed; 0 trims by length only. Default 3600000.
    pub stream_max_age_ms: u64,
    /// How long the capture lease lasts without renewal, in ms: a dead capturer is replaced
    /// after at most about this long. Default 3000.
    pub lease_ms: u64,
    /// Keep a cache shared by the instances in Redis (L2, behind the in-process one). Default
    /// true when `enableCache` is.
    pub cache: bool,
    /// Time-to-live of an L2 cache entry, in ms. Default 300000.
    pub cache_ttl_ms: u64,
}

/// Which database the streamer runs on.
#[derive(Debug, Clone, PartialEq)]
pub enum Backend {
    Sqlite(SqliteConfig),
    Mysql(ServerConfig),
    Mongodb(ServerConfig),
}

impl Backend {
    /// The backend name as users write it.
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Sqlite(_) => "sqlite",
            Backend::Mysql(_) => "mysql",
            Backend::Mongodb(_) => "mongodb",
        }
    }
}

/// The validated configuration of one streamer.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub backend: Backend,
    /// Use the database's change stream when it has one (binlog, change streams). Default true.
    pub use_change_streams: bool,
    /// Polling interval for the polling fallback, in ms. Default 2000.
    pub polling_interval_ms: u64,
    /// Keep an in-process cache in front of the store. Default true.
    pub enable_cache: bool,
    /// Maximum concurrent WebSocket connections (used by the hub). Default 10000.
    pub max_connections: u32,
    /// Maximum bytes of cached values. Default 64 MiB.
    pub cache_max_bytes: u64,
    /// Cache entry time-to-live in ms; 0 keeps entries until evicted. Default 0.
    pub cache_ttl_ms: u64,
    /// Maximum events handed to JavaScript in one call. Default 1000.
    pub batch_size: usize,
    /// Under sustained load, how long a batch may wait to fill up, in ms. Default 1.
    pub batch_timeout_ms: u64,
    /// Bound of the queue between capture and delivery, in events. Default 65536.
    pub queue_size: usize,
    /// Batches handed to JavaScript and not yet processed. Default 2.
    pub max_in_flight_batches: usize,
    /// Bound of the queue of pending writes/reads. Default 65536.
    pub write_queue_size: usize,
    /// Maximum operations committed in one transaction. Default 1024.
    pub write_batch_size: usize,
    /// Maximum JSON size of one value, in bytes. Default 16 MiB.
    pub max_value_size: usize,
    /// Maximum key length, in characters. Default 191.
    pub max_key_length: usize,
    /// Events kept in the in-memory history ring for replay to reconnecting WebSocket clients,
    /// while the hub runs. Default 10000.
    pub history_size: usize,
    /// Bytes of keys and values the history ring may hold. Default 64 MiB.
    pub history_max_bytes: usize,
    /// At most this many keys have their last delivered version remembered for dedupe (every
    /// key changed within the last `dedupe_capacity / 2` new keys is). Default 1000000.
    pub dedupe_capacity: usize,
    /// Log level: error, warn, info, debug, trace, off. `USP_LOG` overrides when unset.
    pub log_level: Option<String>,
    /// Scale-out through Redis (`options.redis`); `None`: one process, no Redis.
    pub redis: Option<RedisConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            backend: Backend::Sqlite(SqliteConfig {
                path: DEFAULT_SQLITE_PATH.to_string(),
                table: "usp_kv".to_string(),
                synchronous: Synchronous::Normal,
                busy_timeout_ms: 5000,
                tail_interval_ms: 2,
                change_log_retention: 100_000,
                watch: true,
                page_size: DEFAULT_PAGE_SIZE,
            }),
            use_change_streams: true,
            polling_interval_ms: 2000,
            enable_cache: true,
            max_connections: 10_000,
            cache_max_bytes: 64 * 1024 * 1024,
            cache_ttl_ms: 0,
            batch_size: 1000,
            batch_timeout_ms: 1,
            queue_size: 65_536,
            max_in_flight_batches: 2,
            write_queue_size: 65_536,
            write_batch_size: 1024,
            max_value_size: 16 * 1024 * 1024,
            max_key_length: 191,
            history_size: 10_000,
            history_max_bytes: 64 * 1024 * 1024,
            dedupe_capacity: 1_000_000,
            log_level: None,
            redis: None,
        }
    }
}

const OPTION_KEYS: &[&str] = &[
    "useChangeStreams",
    "pollingInterval",
    "enableCache",
    "maxConnections",
    "cacheMaxBytes",
    "cacheTTL",
    "batchSize",
    "batchTimeout",
    "queueSize",
    "maxInFlightBatches",
    "writeQueueSize",
    "writeBatchSize",
    "maxValueSize",
    "maxKeyLength",
    "historySize",
    "historyMaxBytes",
    "dedupeCapacity",
    "logLevel",
    "table",
    "sqlite",
    "mysql",
    "mongodb",
    "redis",
];
const REDIS_KEYS: &[&str] = &[
    "url",
    "keyPrefix",
    "streamMaxLen",
    "streamMaxAge",
    "leaseTtl",
    "cache",
    "cacheTTL",
];
const MONGODB_KEYS: &[&str] = &[
    "heartbeatInterval",
    "reconnectMinDelay",
    "reconnectMaxDelay",
    "checkpointName",
    "fastPathRetry",
    "watch",
];
const MYSQL_KEYS: &[&str] = &[
    "serverId",
    "heartbeatInterval",
    "reconnectMinDelay",
    "reconnectMaxDelay",
    "checkpointName",
    "fastPathRetry",
    "watch",
];
const CONNECTION_KEYS: &[&str] = &[
    "uri", "host", "port", "user", "password", "database", "path",
];
const SQLITE_KEYS: &[&str] = &[
    "synchronous",
    "busyTimeout",
    "tailInterval",
    "changeLogRetention",
    "watch",
    "pageSize",
];
const LOG_LEVELS: &[&str] = &["off", "error", "warn", "info", "debug", "trace"];

fn invalid(msg: String) -> Error {
    Error::InvalidConfig(msg)
}

fn expect_object<'a>(v: &'a Value, name: &str) -> Result<&'a Map<String, Value>> {
    v.as_object()
        .ok_or_else(|| invalid(format!("`{name}` must be an object, got {}", kind(v))))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn check_keys(obj: &Map<String, Value>, allowed: &[&str], where_: &str) -> Result<()> {
    for k in obj.keys() {
        if !allowed.contains(&k.as_str()) {
            return Err(invalid(format!(
                "unknown option `{where_}{k}`; allowed here: {}",
                allowed.join(", ")
            )));
        }
    }
    Ok(())
}

fn get_bool(obj: &Map<String, Value>, key: &str, path: &str) -> Result<Option<bool>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(invalid(format!(
            "`{path}{key}` must be true or false, got {}",
            kind(v)
        ))),
    }
}

fn get_int(
    obj: &Map<String, Value>,
    key: &str,
    path: &str,
    min: u64,
    max: u64,
) -> Result<Option<u64>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            let n = v
                .as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0)
                .map(|f| f as u64);
            match n {
                Some(n) if n >= min && n <= max => Ok(Some(n)),
                _ => Err(invalid(format!(
                    "`{path}{key}` must be an integer from {min} to {max}, got {}",
                    short(v)
                ))),
            }
        }
    }
}

fn get_str<'a>(obj: &'a Map<String, Value>, key: &str, path: &str) -> Result<Option<&'a str>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(v) => Err(invalid(format!(
            "`{path}{key}` must be a string, got {}",
            kind(v)
        ))),
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 40 {
        format!(
            "{}…",
            &s[..s.char_indices().nth(40).map(|(i, _)| i).unwrap_or(s.len())]
        )
    } else {
        s
    }
}

/// Validates a SQL identifier (table name): it is interpolated into SQL, so only
/// `[A-Za-z_][A-Za-z0-9_]{0,63}` is accepted.
pub fn validate_identifier(name: &str, option: &str) -> Result<()> {
    let mut chars = name.chars();
    let ok = matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 64;
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "`{option}` must be a plain identifier (letters, digits, underscore; 1-64 chars, not starting with a digit), got {name:?}"
        )))
    }
}

impl Config {
    /// Parses and validates a user configuration (`null`/absent means all defaults).
    pub fn from_json(v: &Value) -> Result<Config> {
        let mut cfg = Config::default();
        let root = match v {
            Value::Null => return Ok(cfg),
            v => expect_object(v, "config")?,
        };
        let flat = root.contains_key("dbType");
        let (backend_name, conn, opts, opt_path): (
            String,
            Map<String, Value>,
            Map<String, Value>,
            &str,
        ) = if flat {
            // Flat shape: everything at the top level.
            let mut allowed: Vec<&str> = vec![
                "dbType", "uri", "host", "port", "user", "password", "database", "path",
            ];
            allowed.extend_from_slice(OPTION_KEYS);
            check_keys(root, &allowed, "")?;
            let db = get_str(root, "dbType", "")?.unwrap_or("sqlite").to_string();
            let mut conn = Map::new();
            let mut opts = Map::new();
            for (k, v) in root {
                if CONNECTION_KEYS.contains(&k.as_str()) {
                    conn.insert(k.clone(), v.clone());
                } else if OPTION_KEYS.contains(&k.as_str()) {
                    opts.insert(k.clone(), v.clone());
                }
            }
            (db, conn, opts, "")
        } else {
            check_keys(root, &["database", "connection", "options"], "")?;
            let db = match root.get("database") {
                None | Some(Value::Null) => "sqlite".to_string(),
                Some(Value::String(s)) => s.clone(),
                Some(v) => {
                    return Err(invalid(format!(
                        "`database` must be 'sqlite', 'mysql' or 'mongodb', got {}",
                        kind(v)
                    )))
                }
            };
            let conn = match root.get("connection") {
                None | Some(Value::Null) => Map::new(),
                Some(v) => expect_object(v, "connection")?.clone(),
            };
            check_keys(&conn, CONNECTION_KEYS, "connection.")?;
            let opts = match root.get("options") {
                None | Some(Value::Null) => Map::new(),
                Some(v) => expect_object(v, "options")?.clone(),
            };
            check_keys(&opts, OPTION_KEYS, "options.")?;
            (db, conn, opts, "options.")
        };
        let conn_path = if flat { "" } else { "connection." };
        let db_option = if flat { "dbType" } else { "database" };

        cfg.apply_options(&opts, opt_path)?;

        cfg.backend = match backend_name.as_str() {
            "sqlite" => {
                let mut s = match cfg.backend {
                    Backend::Sqlite(s) => s,
                    _ => unreachable!("default backend is sqlite"),
                };
                for k in ["host", "port", "user", "password"] {
                    if conn.contains_key(k) {
                        return Err(invalid(format!(
                            "`{conn_path}{k}` does not apply to the embedded sqlite backend; use `{conn_path}path`"
                        )));
                    }
                }
                let path = match (
                    get_str(&conn, "path", conn_path)?,
                    get_str(&conn, "uri", conn_path)?,
                ) {
                    (Some(_), Some(_)) => {
                        return Err(invalid(format!(
                            "give either `{conn_path}path` or `{conn_path}uri`, not both"
                        )))
                    }
                    (Some(p), None) => p.to_string(),
                    (None, Some(u)) => u
                        .strip_prefix("sqlite://")
                        .or_else(|| u.strip_prefix("sqlite:"))
                        .ok_or_else(|| {
                            invalid(format!(
                                "`{conn_path}uri` for sqlite must start with 'sqlite:', got {u:?}"
                            ))
                        })?
                        .to_string(),
                    (None, None) => match get_str(&conn, "database", conn_path)? {
                        // Flat shape: `database` names the file for sqlite.
                        Some(d) if flat => d.to_string(),
                        _ => s.path.clone(),
                    },
                };
                if path.is_empty() || path.contains('\0') {
                    return Err(invalid(format!(
                        "`{conn_path}path` must be a file path or ':memory:'"
                    )));
                }
                s.path = path;
                if let Some(t) = get_str(&opts, "table", opt_path)? {
                    validate_identifier(t, &format!("{opt_path}table"))?;
                    s.table = t.to_string();
                }
                if let Some(v) = opts.get("sqlite") {
                    let so = expect_object(v, &format!("{opt_path}sqlite"))?;
                    let p = format!("{opt_path}sqlite.");
                    check_keys(so, SQLITE_KEYS, &p)?;
                    if let Some(sync) = get_str(so, "synchronous", &p)? {
                        s.synchronous = match sync {
                            "normal" => Synchronous::Normal,
                            "full" => Synchronous::Full,
                            other => {
                                return Err(invalid(format!(
                                    "`{p}synchronous` must be 'normal' or 'full', got {other:?}"
                                )))
                            }
                        };
                    }
                    if let Some(n) = get_int(so, "busyTimeout", &p, 0, 600_000)? {
                        s.busy_timeout_ms = n;
                    }
                    if let Some(n) = get_int(so, "tailInterval", &p, 1, 60_000)? {
                        s.tail_interval_ms = n;
                    }
                    if let Some(n) = get_int(so, "changeLogRetention", &p, 100, 1_000_000_000)? {
                        s.change_log_retention = n;
                    }
                    if let Some(b) = get_bool(so, "watch", &p)? {
                        s.watch = b;
                    }
                    if let Some(n) = get_int(so, "pageSize", &p, 512, 65_536)? {
                        if !n.is_power_of_two() {
                            return Err(invalid(format!(
                                "`{p}pageSize` must be a power of two (512, 1024, ... 65536), got {n}"
                            )));
                        }
                        s.page_size = n as u32;
                    }
                }
                Backend::Sqlite(s)
            }
            "mysql" | "mongodb" => {
                if opts.contains_key("sqlite") {
                    return Err(invalid(format!(
                        "`{opt_path}sqlite` only applies to the sqlite backend"
                    )));
                }
                for other in ["mysql", "mongodb"] {
                    if backend_name != other && opts.contains_key(other) {
                        return Err(invalid(format!(
                            "`{opt_path}{other}` only applies to the {other} backend"
                        )));
                    }
                }
                let mut server = ServerConfig {
                    uri: get_str(&conn, "uri", conn_path)?.map(str::to_string),
                    host: get_str(&conn, "host", conn_path)?.map(str::to_string),
                    port: get_int(&conn, "port", conn_path, 1, 65_535)?.map(|p| p as u16),
                    user: get_str(&conn, "user", conn_path)?.map(str::to_string),
                    password: Secret(
                        get_str(&conn, "password", conn_path)?
                            .unwrap_or_default()
                            .to_string(),
                    ),
                    database: get_str(&conn, "database", conn_path)?.map(str::to_string),
                    table: "usp_kv".into(),
                    capture: CaptureOptions::default(),
                    use_change_streams: cfg.use_change_streams,
                    polling_interval_ms: cfg.polling_interval_ms,
                };
                if let Some(t) = get_str(&opts, "table", opt_path)? {
                    validate_identifier(t, &format!("{opt_path}table"))?;
                    server.table = t.to_string();
                }
                if backend_name == "mysql" {
                    parse_mysql(&mut server, &opts, opt_path, conn_path)?;
                    Backend::Mysql(server)
                } else {
                    parse_mongodb(&mut server, &opts, opt_path, conn_path)?;
                    Backend::Mongodb(server)
                }
            }
            other => {
                return Err(invalid(format!(
                    "`{db_option}` must be 'sqlite', 'mysql' or 'mongodb', got {other:?}"
                )))
            }
        };
        if let Some(v) = opts.get("redis") {
            let Backend::Mysql(server) = &cfg.backend else {
                return Err(invalid(format!(
                    "`{opt_path}redis` works with the mysql backend in this version; remove it, or use database: 'mysql'"
                )));
            };
            cfg.redis = Some(parse_redis(v, server, cfg.enable_cache, opt_path)?);
        }
        Ok(cfg)
    }

    fn apply_options(&mut self, o: &Map<String, Value>, p: &str) -> Result<()> {
        if let Some(b) = get_bool(o, "useChangeStreams", p)? {
            self.use_change_streams = b;
        }
        if let Some(n) = get_int(o, "pollingInterval", p, 10, 3_600_000)? {
            self.polling_interval_ms = n;
        }
        if let Some(b) = get_bool(o, "enableCache", p)? {
            self.enable_cache = b;
        }
        if let Some(n) = get_int(o, "maxConnections", p, 1, 10_000_000)? {
            self.max_connections = n as u32;
        }
        if let Some(n) = get_int(o, "cacheMaxBytes", p, 1024, 1 << 40)? {
            self.cache_max_bytes = n;
        }
        if let Some(n) = get_int(o, "cacheTTL", p, 0, 365 * 24 * 3_600_000)? {
            self.cache_ttl_ms = n;
        }
        if let Some(n) = get_int(o, "batchSize", p, 1, 1_000_000)? {
            self.batch_size = n as usize;
        }
        if let Some(n) = get_int(o, "batchTimeout", p, 0, 60_000)? {
            self.batch_timeout_ms = n;
        }
        if let Some(n) = get_int(o, "queueSize", p, 16, 100_000_000)? {
            self.queue_size = n as usize;
        }
        if let Some(n) = get_int(o, "maxInFlightBatches", p, 1, 1024)? {
            self.max_in_flight_batches = n as usize;
        }
        if let Some(n) = get_int(o, "writeQueueSize", p, 16, 100_000_000)? {
            self.write_queue_size = n as usize;
        }
        if let Some(n) = get_int(o, "writeBatchSize", p, 1, 100_000)? {
            self.write_batch_size = n as usize;
        }
        if let Some(n) = get_int(o, "maxValueSize", p, 16, 1 << 30)? {
            self.max_value_size = n as usize;
        }
        if let Some(n) = get_int(o, "maxKeyLength", p, 1, 191)? {
            self.max_key_length = n as usize;
        }
        if let Some(n) = get_int(o, "historySize", p, 0, 100_000_000)? {
            self.history_size = n as usize;
        }
        if let Some(n) = get_int(o, "historyMaxBytes", p, 0, 1 << 40)? {
            self.history_max_bytes = n as usize;
        }
        if let Some(n) = get_int(o, "dedupeCapacity", p, 1, 1_000_000_000)? {
            self.dedupe_capacity = n as usize;
        }
        if let Some(l) = get_str(o, "logLevel", p)? {
            if !LOG_LEVELS.contains(&l) {
                return Err(invalid(format!(
                    "`{p}logLevel` must be one of {}, got {l:?}",
                    LOG_LEVELS.join(", ")
                )));
            }
            self.log_level = Some(l.to_string());
        }
        Ok(())
    }

    /// A description of the backend safe to show anywhere (no password, no credentials in URIs).
    pub fn backend_summary(&self) -> Value {
        match &self.backend {
            Backend::Sqlite(s) => serde_json::json!({
                "type": "sqlite", "path": s.path, "table": s.table,
                "synchronous": match s.synchronous { Synchronous::Normal => "normal", Synchronous::Full => "full" },
            }),
            Backend::Mysql(s) | Backend::Mongodb(s) => serde_json::json!({
                "type": self.backend.name(), "host": s.host, "port": s.port, "database": s.database,
                "user": s.user, "table": s.table, "uri": s.uri.as_deref().map(redact_uri),
            }),
        }
    }
}

/// Fills the MySQL connection from `uri` (merged with the separate fields) and `options.mysql`.
fn parse_mysql(
    s: &mut ServerConfig,
    opts: &Map<String, Value>,
    opt_path: &str,
    conn_path: &str,
) -> Result<()> {
    if let Some(uri) = s.uri.clone() {
        let u = parse_mysql_uri(&uri).map_err(|why| {
            invalid(format!(
                "`{conn_path}uri` is not a MySQL URI ({why}); expected mysql://user:password@host:port/database, got {}",
                redact_uri(&uri)
            ))
        })?;
        s.host = s.host.take().or(u.host);
        s.port = s.port.or(u.port);
        s.user = s.user.take().or(u.user);
        if s.password.0.is_empty() {
            s.password = Secret(u.password.unwrap_or_default());
        }
        s.database = s.database.take().or(u.database);
    }
    require_database(s, "mysql", conn_path)?;
    parse_capture(&mut s.capture, opts, "mysql", MYSQL_KEYS, opt_path)
}

/// Fills the MongoDB connection from `uri` (kept whole for the driver; the separate fields
/// build one when it is absent) and `options.mongodb`.
fn parse_mongodb(
    s: &mut ServerConfig,
    opts: &Map<String, Value>,
    opt_path: &str,
    conn_path: &str,
) -> Result<()> {
    match &s.uri {
        Some(uri) => {
            let u = parse_mongodb_uri(uri).map_err(|why| {
                invalid(format!(
                    "`{conn_path}uri` is not a MongoDB URI ({why}); expected mongodb://user:password@host:port/database, got {}",
                    redact_uri(uri)
                ))
            })?;
            if s.database.is_none() {
                s.database = u.database;
            }
            if s.host.is_none() {
                s.host = u.host;
            }
            s.port = s.port.or(u.port);
        }
        None => {
            if s.host.is_none() {
                s.host = Some("127.0.0.1".into());
            }
        }
    }
    require_database(s, "mongodb", conn_path)?;
    parse_capture(&mut s.capture, opts, "mongodb", MONGODB_KEYS, opt_path)
}

/// `options.redis`.
fn parse_redis(
    v: &Value,
    server: &ServerConfig,
    enable_cache: bool,
    opt_path: &str,
) -> Result<RedisConfig> {
    let p = format!("{opt_path}redis.");
    let o = expect_object(v, &format!("{opt_path}redis"))?;
    check_keys(o, REDIS_KEYS, &p)?;
    let url = get_str(o, "url", &p)?.ok_or_else(|| {
        invalid(format!(
            "`{p}url` is required, e.g. 'redis://127.0.0.1:6379'"
        ))
    })?;
    if !url.starts_with("redis://") || url.len() <= "redis://".len() {
        return Err(invalid(format!(
            "`{p}url` must start with 'redis://' (TLS 'rediss://' is not supported in this version), got {}",
            redact_uri(url)
        )));
    }
    let key_prefix = match get_str(o, "keyPrefix", &p)? {
        Some(k) if k.is_empty() || k.len() > 200 => {
            return Err(invalid(format!(
                "`{p}keyPrefix` must be 1 to 200 characters"
            )))
        }
        Some(k) => k.to_string(),
        None => format!(
            "usp:{}:{}:",
            server.database.as_deref().unwrap_or(""),
            server.table
        ),
    };
    let mut r = RedisConfig {
        url: Secret(url.to_string()),
        key_prefix,
        stream_max_len: 100_000,
        stream_max_age_ms: 3_600_000,
        lease_ms: 3000,
        cache: enable_cache,
        cache_ttl_ms: 300_000,
    };
    if let Some(n) = get_int(o, "streamMaxLen", &p, 10, 1_000_000_000)? {
        r.stream_max_len = n;
    }
    if let Some(n) = get_int(o, "streamMaxAge", &p, 0, 365 * 86_400_000)? {
        r.stream_max_age_ms = n;
    }
    if let Some(n) = get_int(o, "leaseTtl", &p, 300, 600_000)? {
        r.lease_ms = n;
    }
    if let Some(b) = get_bool(o, "cache", &p)? {
        r.cache = b && enable_cache;
    }
    if let Some(n) = get_int(o, "cacheTTL", &p, 1000, 30 * 86_400_000)? {
        r.cache_ttl_ms = n;
    }
    Ok(r)
}

/// A server backend's database name: present and a plain identifier.
fn require_database(s: &ServerConfig, backend: &str, conn_path: &str) -> Result<()> {
    match &s.database {
        None => Err(invalid(format!(
            "the {backend} backend needs a database: set `{conn_path}database` or put it in the URI path"
        ))),
        Some(d) => validate_identifier(d, &format!("{conn_path}database")),
    }
}

/// `options.<backend>`: the capture settings.
fn parse_capture(
    c: &mut CaptureOptions,
    opts: &Map<String, Value>,
    backend: &str,
    allowed: &[&str],
    opt_path: &str,
) -> Result<()> {
    let Some(v) = opts.get(backend) else {
        return Ok(());
    };
    let mo = expect_object(v, &format!("{opt_path}{backend}"))?;
    let p = format!("{opt_path}{backend}.");
    check_keys(mo, allowed, &p)?;
    if let Some(n) = get_int(mo, "serverId", &p, 1, u32::MAX as u64)? {
        c.server_id = Some(n as u32);
    }
    if let Some(n) = get_int(mo, "heartbeatInterval", &p, 100, 3_600_000)? {
        c.heartbeat_ms = n;
    }
    if let Some(n) = get_int(mo, "reconnectMinDelay", &p, 1, 600_000)? {
        c.reconnect_min_ms = n;
    }
    if let Some(n) = get_int(mo, "reconnectMaxDelay", &p, 1, 3_600_000)? {
        c.reconnect_max_ms = n;
    }
    if c.reconnect_max_ms < c.reconnect_min_ms {
        return Err(invalid(format!(
            "`{p}reconnectMaxDelay` must be at least `{p}reconnectMinDelay`"
        )));
    }
    if let Some(v) = mo.get("watch") {
        let tables = v.as_array().ok_or_else(|| {
            invalid(format!(
                "`{p}watch` must be an array of table names, got {}",
                kind(v)
            ))
        })?;
        for t in tables {
            let name = t.as_str().ok_or_else(|| {
                invalid(format!(
                    "`{p}watch` must hold table names (strings), got {}",
                    kind(t)
                ))
            })?;
            validate_identifier(name, &format!("{p}watch"))?;
            c.watch.push(name.to_string());
        }
    }
    if let Some(n) = get_int(mo, "fastPathRetry", &p, 100, 86_400_000)? {
        c.fast_path_retry_ms = n;
    }
    if let Some(n) = get_str(mo, "checkpointName", &p)? {
        if n.is_empty() || n.len() > 64 {
            return Err(invalid(format!(
                "`{p}checkpointName` must be 1 to 64 characters"
            )));
        }
        c.checkpoint_name = n.to_string();
    }
    Ok(())
}

/// What `init()` can learn from a MongoDB URI without the driver: the host of the first seed,
/// its port and the default database. The driver parses the whole URI (options, replica set
/// seeds, SRV) at `init()`.
fn parse_mongodb_uri(uri: &str) -> std::result::Result<UriParts, &'static str> {
    let rest = uri
        .strip_prefix("mongodb://")
        .or_else(|| uri.strip_prefix("mongodb+srv://"))
        .ok_or("the scheme must be mongodb:// or mongodb+srv://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest.split('?').next().unwrap_or(rest), ""),
    };
    let hosts = match authority.rfind('@') {
        Some(at) => &authority[at + 1..],
        None => authority,
    };
    let first = hosts.split(',').next().unwrap_or("");
    if first.is_empty() {
        return Err("no host");
    }
    // `host`, `host:port`, `[v6]` or `[v6]:port`.
    let (host, port) = match first.strip_prefix('[') {
        Some(v6) => {
            let (h, tail) = v6.split_once(']').ok_or("an IPv6 host lacks its ']'")?;
            (h, tail.strip_prefix(':'))
        }
        None => match first.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (first, None),
        },
    };
    let port = match port {
        Some(p) => Some(p.parse::<u16>().map_err(|_| "the port is not a number")?),
        None => None,
    };
    let db = path.split('?').next().unwrap_or("");
    Ok(UriParts {
        host: Some(host.to_string()),
        port,
        user: None,
        password: None,
        database: if db.is_empty() {
            None
        } else {
            Some(percent_decode(db)?)
        },
    })
}

/// The parts of `mysql://user:password@host:port/database` (percent-decoded user and password).
#[derive(Debug, Default, PartialEq)]
struct UriParts {
    user: Option<String>,
    password: Option<String>,
    host: Option<String>,
    port: Option<u16>,
    database: Option<String>,
}

fn parse_mysql_uri(uri: &str) -> std::result::Result<UriParts, &'static str> {
    let rest = uri
        .strip_prefix("mysql://")
        .or_else(|| uri.strip_prefix("mariadb://"))
        .ok_or("the scheme must be mysql:// or mariadb://")?;
    let rest = rest.split(['?', '#']).next().unwrap_or("");
    let (auth, hostpart) = match rest.rfind('@') {
        Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
        None => (None, rest),
    };
    let (hostport, db) = match hostpart.find('/') {
        Some(i) => (&hostpart[..i], Some(&hostpart[i + 1..])),
        None => (hostpart, None),
    };
    let mut p = UriParts::default();
    if let Some(a) = auth {
        let (u, pw) = match a.find(':') {
            Some(i) => (&a[..i], Some(&a[i + 1..])),
            None => (a, None),
        };
        p.user = Some(percent_decode(u)?).filter(|s| !s.is_empty());
        p.password = pw.map(percent_decode).transpose()?;
    }
    let (h, port) = match hostport.rfind(':') {
        Some(i) if !hostport.ends_with(']') => (&hostport[..i], Some(&hostport[i + 1..])),
        _ => (hostport, None),
    };
    if !h.is_empty() {
        p.host = Some(h.trim_start_matches('[').trim_end_matches(']').to_string());
    }
    if let Some(port) = port {
        p.port = Some(port.parse().map_err(|_| "the port is not a number")?);
    }
    p.database = db
        .filter(|d| !d.is_empty())
        .map(percent_decode)
        .transpose()?;
    Ok(p)
}

/// Decodes `%XX` escapes (URIs: user names, passwords, database names, query values).
pub(crate) fn percent_decode(s: &str) -> std::result::Result<String, &'static str> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or("a % escape is cut short")?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| "a % escape is not hex")?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "a % escape is not UTF-8")
}

/// Removes `user:password@` from a URI.
pub fn redact_uri(uri: &str) -> String {
    match (uri.find("://"), uri.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &uri[..s], &uri[at + 1..]),
        _ => uri.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(v: Value) -> String {
        match Config::from_json(&v) {
            Err(e) => {
                assert_eq!(e.code(), "USP_INVALID_CONFIG", "{e}");
                e.to_string()
            }
            Ok(c) => panic!("expected an error, got {c:?}"),
        }
    }

    #[test]
    fn empty_config_is_embedded_sqlite_with_defaults() {
        let c = Config::from_json(&Value::Null).unwrap();
        assert_eq!(c, Config::default());
        match c.backend {
            Backend::Sqlite(s) => assert_eq!(s.path, DEFAULT_SQLITE_PATH),
            _ => panic!(),
        }
        assert_eq!(Config::from_json(&json!({})).unwrap(), Config::default());
    }

    #[test]
    fn nested_shape_of_the_install_guide() {
        let c = Config::from_json(&json!({
            "database": "mongodb",
            "connection": { "uri": "mongodb://u:secret@localhost:27017/mydb" },
            "options": { "useChangeStreams": false, "pollingInterval": 500, "enableCache": false }
        }))
        .unwrap();
        assert!(!c.use_change_streams);
        assert_eq!(c.polling_interval_ms, 500);
        assert!(!c.enable_cache);
        assert_eq!(c.backend.name(), "mongodb");
        let summary = c.backend_summary().to_string();
        assert!(!summary.contains("secret"), "{summary}");
    }

    #[test]
    fn flat_shape_of_the_api_reference() {
        let c = Config::from_json(&json!({
            "dbType": "mysql", "host": "127.0.0.1", "port": 3306, "user": "app", "password": "pw",
            "database": "shop", "useChangeStreams": true, "pollingInterval": 2000, "enableCache": true,
            "maxConnections": 500
        }))
        .unwrap();
        assert_eq!(c.max_connections, 500);
        match &c.backend {
            Backend::Mysql(s) => {
                assert_eq!(s.port, Some(3306));
                assert_eq!(s.database.as_deref(), Some("shop"));
                assert_eq!(format!("{:?}", s.password), "\"***\"");
            }
            other => panic!("{other:?}"),
        }
        assert!(!format!("{c:?}").contains("\"pw\""));
    }

    #[test]
    fn sqlite_path_memory_and_uri() {
        let c = Config::from_json(&json!({"connection": {"path": ":memory:"}})).unwrap();
        assert!(matches!(c.backend, Backend::Sqlite(ref s) if s.path == ":memory:"));
        let c = Config::from_json(
            &json!({"database": "sqlite", "connection": {"uri": "sqlite:/tmp/x.db"}}),
        )
        .unwrap();
        assert!(matches!(c.backend, Backend::Sqlite(ref s) if s.path == "/tmp/x.db"));
        let c = Config::from_json(
            &json!({"dbType": "sqlite", "database": "/tmp/y.db", "batchSize": 10}),
        )
        .unwrap();
        assert!(matches!(c.backend, Backend::Sqlite(ref s) if s.path == "/tmp/y.db"));
        assert_eq!(c.batch_size, 10);
    }

    #[test]
    fn unknown_and_invalid_options_are_named() {
        assert!(err(json!({"database": "sqlite", "bogus": 1})).contains("`bogus`"));
        assert!(
            err(json!({"options": {"pollingIntervall": 1}})).contains("`options.pollingIntervall`")
        );
        assert!(err(json!({"options": {"batchSize": 0}})).contains("`options.batchSize`"));
        assert!(err(json!({"options": {"batchSize": 1.5}})).contains("`options.batchSize`"));
        assert!(err(json!({"options": {"enableCache": "yes"}})).contains("`options.enableCache`"));
        assert!(err(json!({"database": "oracle"})).contains("`database`"));
        assert!(err(json!({"dbType": "oracle"})).contains("`dbType`"));
        assert!(err(json!({"connection": {"host": "x"}})).contains("`connection.host`"));
        assert!(err(json!({"options": {"table": "kv; DROP TABLE x"}})).contains("`options.table`"));
        assert!(err(json!({"options": {"logLevel": "loud"}})).contains("`options.logLevel`"));
        assert!(err(json!({"options": {"sqlite": {"synchronous": "off"}}})).contains("synchronous"));
        assert!(err(json!(42)).contains("`config`"));
        assert!(err(json!({"dbType": "mysql", "port": 70000})).contains("`port`"));
    }

    #[test]
    fn sqlite_options() {
        let c = Config::from_json(&json!({"options": {"sqlite": {
            "synchronous": "full", "busyTimeout": 100, "tailInterval": 5, "changeLogRetention": 500, "watch": false,
            "pageSize": 8192
        }}}))
        .unwrap();
        match c.backend {
            Backend::Sqlite(s) => {
                assert_eq!(s.synchronous, Synchronous::Full);
                assert_eq!(
                    (
                        s.busy_timeout_ms,
                        s.tail_interval_ms,
                        s.change_log_retention
                    ),
                    (100, 5, 500)
                );
                assert!(!s.watch);
                assert_eq!(s.page_size, 8192);
            }
            other => panic!("{other:?}"),
        }
        assert!(
            err(json!({"options": {"sqlite": {"watch": "no"}}})).contains("`options.sqlite.watch`")
        );
        for bad in [
            json!(1000),
            json!(256),
            json!(131072),
            json!("4096"),
            json!(1024.5),
        ] {
            assert!(
                err(json!({"options": {"sqlite": {"pageSize": bad}}}))
                    .contains("`options.sqlite.pageSize`"),
                "{bad}"
            );
        }
    }

    #[test]
    fn identifiers() {
        assert!(validate_identifier("usp_kv", "t").is_ok());
        assert!(validate_identifier("_a1", "t").is_ok());
        for bad in ["", "1a", "a-b", "a b", "a\"b", &"x".repeat(65)] {
            assert!(validate_identifier(bad, "t").is_err(), "{bad}");
        }
    }

    #[test]
    fn mongodb_uris_and_options() {
        let parts = |u: &str| parse_mongodb_uri(u).map(|p| (p.host, p.port, p.database));
        assert_eq!(
            parts("mongodb://u:p%40w@h1:27018,h2:27019/shop?replicaSet=rs0").unwrap(),
            (Some("h1".into()), Some(27018), Some("shop".into()))
        );
        assert_eq!(
            parts("mongodb+srv://cluster0.example.net/app").unwrap(),
            (
                Some("cluster0.example.net".into()),
                None,
                Some("app".into())
            )
        );
        assert_eq!(
            parts("mongodb://[::1]:27017/?directConnection=true").unwrap(),
            (Some("::1".into()), Some(27017), None)
        );
        assert!(parse_mongodb_uri("mysql://h/db").is_err());
        assert!(parse_mongodb_uri("mongodb://h:port/db").is_err());
        assert!(parse_mongodb_uri("mongodb:///db").is_err());
        let c = Config::from_json(&json!({"database": "mongodb",
            "connection": {"uri": "mongodb://127.0.0.1:27017/?replicaSet=rs0", "database": "shop"},
            "options": {"table": "kv", "mongodb": {"watch": ["orders"], "checkpointName": "a"}}}))
        .unwrap();
        let Backend::Mongodb(s) = &c.backend else {
            panic!("mongodb")
        };
        assert_eq!(s.database.as_deref(), Some("shop"));
        assert_eq!(s.capture.watch, vec!["orders".to_string()]);
        assert_eq!(s.capture.checkpoint_name, "a");
        assert!(
            err(json!({"database": "mongodb", "connection": {"uri": "mongodb://h/"}}))
                .contains("needs a database")
        );
        assert!(err(
            json!({"database": "mongodb", "connection": {"database": "d"},
            "options": {"mongodb": {"serverId": 3}}})
        )
        .contains("serverId"));
        assert!(err(
            json!({"database": "mongodb", "connection": {"database": "d"},
            "options": {"mysql": {}}})
        )
        .contains("only applies to the mysql backend"));
    }

    #[test]
    fn mysql_uri_and_options() {
        let c = Config::from_json(&json!({"database": "mysql",
            "connection": {"uri": "mysql://app:p%40ss@db.local:3307/shop"},
            "options": {"table": "kv2", "mysql": {"serverId": 77, "heartbeatInterval": 500}}}))
        .unwrap();
        let Backend::Mysql(s) = &c.backend else {
            panic!("mysql")
        };
        assert_eq!(s.user.as_deref(), Some("app"));
        assert_eq!(s.password.0, "p@ss");
        assert_eq!(s.host.as_deref(), Some("db.local"));
        assert_eq!(s.port, Some(3307));
        assert_eq!(s.database.as_deref(), Some("shop"));
        assert_eq!(s.table, "kv2");
        assert_eq!(s.capture.server_id, Some(77));
        assert_eq!(s.capture.heartbeat_ms, 500);
        assert!(!c.backend_summary().to_string().contains("p@ss"));
        // Flat shape, no URI.
        let c = Config::from_json(
            &json!({"dbType": "mysql", "host": "127.0.0.1", "port": 3306,
            "user": "u", "password": "pw", "database": "d"}),
        )
        .unwrap();
        assert!(matches!(c.backend, Backend::Mysql(_)));
        assert!(
            err(json!({"database": "mysql", "connection": {"host": "h"}}))
                .contains("needs a database")
        );
        assert!(
            err(json!({"database": "mysql", "connection": {"uri": "postgres://x/y"}}))
                .contains("scheme")
        );
        assert!(err(
            json!({"database": "mysql", "connection": {"uri": "mysql://u:secret@h:xx/d"}})
        )
        .contains("port"));
        assert!(!err(
            json!({"database": "mysql", "connection": {"uri": "mysql://u:secret@h:xx/d"}})
        )
        .contains("secret"));
        assert!(
            err(json!({"database": "mysql", "connection": {"database": "a;drop"}}))
                .contains("database")
        );
        assert!(
            err(json!({"database": "mysql", "connection": {"database": "d"},
            "options": {"mysql": {"serverId": 0}}}))
            .contains("serverId")
        );
        assert!(err(
            json!({"database": "mongodb", "connection": {"database": "d"},
            "options": {"mysql": {}}})
        )
        .contains("only applies"));
        let c = Config::from_json(
            &json!({"database": "mysql", "connection": {"database": "d"},
            "options": {"mysql": {"watch": ["orders", "items"], "fastPathRetry": 500}}}),
        )
        .unwrap();
        let Backend::Mysql(s) = &c.backend else {
            panic!("mysql")
        };
        assert_eq!(s.capture.watch, vec!["orders", "items"]);
        assert_eq!(s.capture.fast_path_retry_ms, 500);
        assert!(
            err(json!({"database": "mysql", "connection": {"database": "d"},
            "options": {"mysql": {"watch": "orders"}}}))
            .contains("array")
        );
        assert!(
            err(json!({"database": "mysql", "connection": {"database": "d"},
            "options": {"mysql": {"watch": ["a;b"]}}}))
            .contains("watch")
        );
    }

    #[test]
    fn redis_options() {
        let base = |redis: Value| {
            Config::from_json(&json!({"database": "mysql",
                "connection": {"uri": "mysql://u:p@h/shop"}, "options": {"table": "kv", "redis": redis}}))
        };
        let c = base(json!({"url": "redis://:pw@127.0.0.1:6379"})).unwrap();
        let r = c.redis.unwrap();
        assert_eq!(r.key_prefix, "usp:shop:kv:");
        assert_eq!(
            (r.stream_max_len, r.lease_ms, r.cache),
            (100_000, 3000, true)
        );
        let r = base(
            json!({"url": "redis://x", "keyPrefix": "a:", "streamMaxLen": 10,
            "streamMaxAge": 0, "leaseTtl": 300, "cache": false, "cacheTTL": 1000}),
        )
        .unwrap()
        .redis
        .unwrap();
        assert_eq!(
            (
                r.key_prefix.as_str(),
                r.stream_max_len,
                r.stream_max_age_ms,
                r.lease_ms,
                r.cache,
                r.cache_ttl_ms
            ),
            ("a:", 10, 0, 300, false, 1000)
        );
        for (bad, msg) in [
            (json!({}), "options.redis.url"),
            (json!({"url": "rediss://x"}), "redis://"),
            (json!({"url": "redis://x", "leaseTtl": 10}), "leaseTtl"),
            (
                json!({"url": "redis://x", "other": 1}),
                "options.redis.other",
            ),
            (json!("redis://x"), "options.redis"),
        ] {
            let e = base(bad).unwrap_err().to_string();
            assert!(e.contains(msg), "{e}");
        }
        let e = err(json!({"options": {"redis": {"url": "redis://x"}}}));
        assert!(e.contains("mysql backend"), "{e}");
        // The password never shows.
        let e = base(json!({"url": "http://:secret@x"}))
            .unwrap_err()
            .to_string();
        assert!(!e.contains("secret"), "{e}");
    }

    #[test]
    fn uri_redaction() {
        assert_eq!(
            redact_uri("mysql://app:pw@127.0.0.1/shop"),
            "mysql://***@127.0.0.1/shop"
        );
        assert_eq!(
            redact_uri("mysql://127.0.0.1/shop"),
            "mysql://127.0.0.1/shop"
        );
    }
}
