//! Configuration: both documented shapes (the nested one of the install guide and the flat one of
//! the API reference) are parsed into one validated `Config`. Every bound of the engine is a
//! named field here with its default; unknown options are refused by name.

use serde_json::{Map, Value};
use std::fmt;

use crate::error::{Error, Result};

/// Default SQLite file when no path is given.
pub const DEFAULT_SQLITE_PATH: &str = "ultimate-streaming.db";

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
    /// Watch the WAL file so other processes' commits are seen at once (else only polled).
    pub watch: bool,
}

/// Server connection settings (MySQL / MongoDB), kept for the backends still to come.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServerConfig {
    pub uri: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub user: Option<String>,
    pub password: Secret,
    pub database: Option<String>,
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
    /// Events kept in the in-memory history ring (for replay to reconnecting clients). Default 10000.
    pub history_size: usize,
    /// Bytes of keys and values the history ring may hold. Default 64 MiB.
    pub history_max_bytes: usize,
    /// Keys whose last delivered version is remembered for dedupe. Default 1000000.
    pub dedupe_capacity: usize,
    /// Log level: error, warn, info, debug, trace, off. `USP_LOG` overrides when unset.
    pub log_level: Option<String>,
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
                }
                Backend::Sqlite(s)
            }
            "mysql" | "mongodb" => {
                if opts.contains_key("sqlite") {
                    return Err(invalid(format!(
                        "`{opt_path}sqlite` only applies to the sqlite backend"
                    )));
                }
                let server = ServerConfig {
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
                };
                if backend_name == "mysql" {
                    Backend::Mysql(server)
                } else {
                    Backend::Mongodb(server)
                }
            }
            other => {
                return Err(invalid(format!(
                    "`{db_option}` must be 'sqlite', 'mysql' or 'mongodb', got {other:?}"
                )))
            }
        };
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
                "uri": s.uri.as_deref().map(redact_uri),
            }),
        }
    }
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
            "synchronous": "full", "busyTimeout": 100, "tailInterval": 5, "changeLogRetention": 500, "watch": false
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
            }
            other => panic!("{other:?}"),
        }
        assert!(
            err(json!({"options": {"sqlite": {"watch": "no"}}})).contains("`options.sqlite.watch`")
        );
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
