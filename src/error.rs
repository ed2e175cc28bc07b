//! The one error type of the engine. Every error that reaches JavaScript comes from here and
//! carries a stable `code` (see `Error::code`) plus a message that says what to do.

/// Result alias used across the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Engine errors. The variant decides the stable code; the message explains the fix.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The configuration object is not valid; the message names the option.
    #[error("{0}")]
    InvalidConfig(String),
    /// The backend exists in the documented API but is not built yet.
    #[error("{0}")]
    UnsupportedBackend(String),
    /// A key is empty, not a string, too long or contains a NUL character.
    #[error("{0}")]
    InvalidKey(String),
    /// A value cannot be stored as JSON (undefined, function, symbol, BigInt, circular).
    #[error("{0}")]
    InvalidValue(String),
    /// A value is larger than `maxValueSize`.
    #[error("{0}")]
    ValueTooLarge(String),
    /// An argument other than key/value is wrong (listener not a function, bad filter...).
    #[error("{0}")]
    InvalidArgument(String),
    /// A data method was called before `init()` resolved.
    #[error("the streamer is not initialized: call `await streamer.init()` before {0}")]
    NotInitialized(&'static str),
    /// A method was called after `close()`.
    #[error(
        "the streamer is closed: create a new UltimateStreamer to continue ({0} after close())"
    )]
    Closed(&'static str),
    /// `init()` was called twice.
    #[error("init() was already called on this streamer")]
    AlreadyInitialized,
    /// The database cannot be opened or reached.
    #[error("{0}")]
    DbUnavailable(String),
    /// The database refused or failed a statement; the operation was not applied.
    #[error("{0}")]
    Db(String),
    /// The database is busy (locked by another process) beyond the busy timeout.
    #[error("{0}")]
    DbBusy(String),
    /// Too many operations are waiting for the store.
    #[error("{0}")]
    Overloaded(String),
    /// A bug: an invariant did not hold. Reported, never a crash.
    #[error("internal error: {0} (please report it)")]
    Internal(String),
}

impl Error {
    /// The stable, documented code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidConfig(_) => "USP_INVALID_CONFIG",
            Error::UnsupportedBackend(_) => "USP_UNSUPPORTED_BACKEND",
            Error::InvalidKey(_) => "USP_INVALID_KEY",
            Error::InvalidValue(_) => "USP_INVALID_VALUE",
            Error::ValueTooLarge(_) => "USP_VALUE_TOO_LARGE",
            Error::InvalidArgument(_) => "USP_INVALID_ARGUMENT",
            Error::NotInitialized(_) => "USP_NOT_INITIALIZED",
            Error::Closed(_) => "USP_CLOSED",
            Error::AlreadyInitialized => "USP_ALREADY_INITIALIZED",
            Error::DbUnavailable(_) => "USP_DB_UNAVAILABLE",
            Error::Db(_) => "USP_DB_ERROR",
            Error::DbBusy(_) => "USP_DB_BUSY",
            Error::Overloaded(_) => "USP_OVERLOADED",
            Error::Internal(_) => "USP_INTERNAL",
        }
    }

    /// True when retrying the same operation later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::DbUnavailable(_) | Error::DbBusy(_) | Error::Overloaded(_)
        )
    }
}

/// The text of a caught panic payload.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

/// Every code the engine can produce, for docs and tests.
pub const ALL_CODES: &[&str] = &[
    "USP_INVALID_CONFIG",
    "USP_UNSUPPORTED_BACKEND",
    "USP_INVALID_KEY",
    "USP_INVALID_VALUE",
    "USP_VALUE_TOO_LARGE",
    "USP_INVALID_ARGUMENT",
    "USP_NOT_INITIALIZED",
    "USP_CLOSED",
    "USP_ALREADY_INITIALIZED",
    "USP_DB_UNAVAILABLE",
    "USP_DB_ERROR",
    "USP_DB_BUSY",
    "USP_OVERLOADED",
    "USP_LISTENER_ERROR",
    "USP_INTERNAL",
];

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode;
        match e.sqlite_error_code() {
            Some(ErrorCode::DatabaseBusy) | Some(ErrorCode::DatabaseLocked) => Error::DbBusy(format!(
                "the SQLite database stayed locked by another connection past the busy timeout ({e}); retry, or raise `sqlite.busyTimeout`"
            )),
            Some(ErrorCode::CannotOpen)
            | Some(ErrorCode::PermissionDenied)
            | Some(ErrorCode::ReadOnly)
            | Some(ErrorCode::NotADatabase)
            | Some(ErrorCode::DiskFull)
            | Some(ErrorCode::SystemIoFailure) => Error::DbUnavailable(format!(
                "the SQLite database cannot be used ({e}); check the path, its permissions and free disk space"
            )),
            _ => Error::Db(format!("SQLite statement failed: {e}")),
        }
    }
}
