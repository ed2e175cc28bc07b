//! The change-log tail query, stepped and read through SQLite's C API. Through rusqlite a text
//! value read costs four library calls (column count, type, text, length) and an integer three,
//! and the tail reads six values per change; here a text costs two calls and an integer one.
//! Everything unsafe is in this file.

use rusqlite::{ffi, Connection};
use std::ffi::{CStr, CString};
use std::ptr::NonNull;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::event::{json_or_string, Change, ChangeKind};
use crate::source::sqlite::{log_change, log_kind};

/// A prepared `SELECT seq, k, v, version, op, ts FROM <log> WHERE seq > ?1 ORDER BY seq
/// LIMIT ?2`. It must be dropped (finalized) before the connection it was prepared on closes:
/// its owner declares it before the connection, so it is dropped first.
pub struct TailQuery {
    stmt: NonNull<ffi::sqlite3_stmt>,
    db: NonNull<ffi::sqlite3>,
}

// SAFETY: the statement and its connection are used by one thread at a time: the store thread
// that owns both (a `Connection` is `Send` too).
unsafe impl Send for TailQuery {}

impl TailQuery {
    /// Prepares `sql` (the six columns above, two parameters) on `conn`.
    pub fn prepare(conn: &Connection, sql: &str) -> Result<TailQuery> {
        let text = CString::new(sql).map_err(|_| Error::Internal("tail query has a NUL".into()))?;
        // SAFETY: `handle` is the live connection `conn` owns; SQLite does not keep `text`.
        let db = unsafe { conn.handle() };
        let db = NonNull::new(db).ok_or_else(|| Error::Internal("closed connection".into()))?;
        let mut stmt = std::ptr::null_mut();
        // SAFETY: valid connection, NUL-terminated SQL, out-pointer to a local.
        let rc = unsafe {
            ffi::sqlite3_prepare_v3(
                db.as_ptr(),
                text.as_ptr(),
                -1,
                ffi::SQLITE_PREPARE_PERSISTENT,
                &mut stmt,
                std::ptr::null_mut(),
            )
        };
        match NonNull::new(stmt) {
            Some(stmt) if rc == ffi::SQLITE_OK => Ok(TailQuery { stmt, db }),
            _ => Err(failure(db, rc)),
        }
    }

    /// Appends the changes of up to `limit` log rows after `after` to `out`, in order. On an
    /// error, `out` keeps the rows read before it; the statement is reset either way.
    pub fn read(&mut self, after: u64, limit: usize, out: &mut Vec<Change>) -> Result<()> {
        let s = self.stmt.as_ptr();
        // SAFETY: `s` is a live prepared statement with two parameters; it is reset below before
        // every return, so a later read binds again on a fresh run.
        let result = unsafe {
            ffi::sqlite3_bind_int64(s, 1, after as i64);
            ffi::sqlite3_bind_int64(s, 2, limit.min(i64::MAX as usize) as i64);
            loop {
                match ffi::sqlite3_step(s) {
                    ffi::SQLITE_ROW => out.push(row(s)),
                    ffi::SQLITE_DONE => break Ok(()),
                    rc => break Err(failure(self.db, rc)),
                }
            }
        };
        // SAFETY: as above.
        unsafe { ffi::sqlite3_reset(s) };
        result
    }
}

impl Drop for TailQuery {
    fn drop(&mut self) {
        // SAFETY: prepared by `prepare`, finalized once, before its connection closes.
        unsafe { ffi::sqlite3_finalize(self.stmt.as_ptr()) };
    }
}

/// The change of the row `s` points at.
///
/// # Safety
/// `s` is a statement of the tail query whose last step returned `SQLITE_ROW`.
unsafe fn row(s: *mut ffi::sqlite3_stmt) -> Change {
    // Text that is not UTF-8 (written by another program) is delivered with replacement
    // characters rather than stopping the tail at its row; valid text is borrowed, not copied.
    // The log's key column is NOT NULL.
    let key: Arc<str> = Arc::from(String::from_utf8_lossy(text(s, 1).unwrap_or_default()));
    let kind = log_kind(text(s, 4).unwrap_or_default());
    let data = match (kind, text(s, 2)) {
        (ChangeKind::Delete, _) | (_, None) => None,
        (_, Some(v)) => Some(json_or_string(&String::from_utf8_lossy(v), &key)),
    };
    log_change(
        ffi::sqlite3_column_int64(s, 0),
        key,
        data,
        ffi::sqlite3_column_int64(s, 3),
        kind,
        ffi::sqlite3_column_int64(s, 5),
    )
}

/// Column `i` of the current row as bytes, `None` when NULL. Valid until the next step.
///
/// # Safety
/// `s` is on a row (its last step returned `SQLITE_ROW`) and has a column `i`.
unsafe fn text<'a>(s: *mut ffi::sqlite3_stmt, i: i32) -> Option<&'a [u8]> {
    // Text first, then its length: the documented order (the length is of that text).
    let p = ffi::sqlite3_column_text(s, i);
    if p.is_null() {
        return None;
    }
    let n = ffi::sqlite3_column_bytes(s, i);
    Some(std::slice::from_raw_parts(p, n.max(0) as usize))
}

/// The error of a failed call on `db`, mapped like every other SQLite error.
fn failure(db: NonNull<ffi::sqlite3>, rc: i32) -> Error {
    // SAFETY: `db` is a live connection; the message is copied before any other call on it.
    let msg = unsafe {
        let m = ffi::sqlite3_errmsg(db.as_ptr());
        (!m.is_null()).then(|| CStr::from_ptr(m).to_string_lossy().into_owned())
    };
    rusqlite::Error::SqliteFailure(ffi::Error::new(rc), msg).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{ChangeLogSeq, Position};
    use crate::source::sqlite::{schema_sql, tail_sql};

    fn db() -> Connection {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(&schema_sql("kv")).unwrap();
        c
    }

    fn read(q: &mut TailQuery, after: u64, limit: usize) -> Vec<Change> {
        let mut out = Vec::new();
        q.read(after, limit, &mut out).unwrap();
        out
    }

    #[test]
    fn reads_every_column_of_the_log_in_order_and_in_chunks() {
        let c = db();
        c.execute_batch(
            "INSERT INTO kv (k, v, version, updated_at) VALUES ('a', '{\"x\":1}', 1, 111);
             UPDATE kv SET v = '[2]', version = 2, updated_at = 222 WHERE k = 'a';
             DELETE FROM kv WHERE k = 'a';",
        )
        .unwrap();
        let mut q = TailQuery::prepare(&c, &tail_sql("kv")).unwrap();
        let all = read(&mut q, 0, 100);
        let got: Vec<_> = all
            .iter()
            .map(|c| (c.kind, &*c.key, c.data.as_deref(), c.version, c.position))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    ChangeKind::Insert,
                    "a",
                    Some("{\"x\":1}"),
                    1,
                    Position::ChangeLog(ChangeLogSeq(1))
                ),
                (
                    ChangeKind::Update,
                    "a",
                    Some("[2]"),
                    2,
                    Position::ChangeLog(ChangeLogSeq(2))
                ),
                (
                    ChangeKind::Delete,
                    "a",
                    None,
                    3,
                    Position::ChangeLog(ChangeLogSeq(3))
                ),
            ]
        );
        assert_eq!((all[0].commit_ts_us, all[1].commit_ts_us), (111, 222));
        assert!(all
            .iter()
            .all(|c| c.versioned && c.seq == 0 && c.source == "sqlite"));
        // `after` and `limit` bound the read; the statement runs again after each one.
        let seqs = |v: Vec<Change>| v.iter().map(|c| c.position.ordinal()).collect::<Vec<_>>();
        assert_eq!(seqs(read(&mut q, 0, 2)), vec![1, 2]);
        assert_eq!(seqs(read(&mut q, 2, 2)), vec![3]);
        assert_eq!(seqs(read(&mut q, 3, 2)), Vec::<u128>::new());
    }

    #[test]
    fn values_written_by_other_programs_never_stop_the_tail() {
        let c = db();
        // Not JSON, a blob, and a key that is not UTF-8: each is delivered, none is an error.
        c.execute_batch(
            "INSERT INTO kv (k, v) VALUES ('plain', 'hello');
             INSERT INTO kv (k, v) VALUES ('blob', x'5b315d');
             INSERT INTO kv (k, v) VALUES (CAST(x'6bff' AS TEXT), '1');",
        )
        .unwrap();
        let mut q = TailQuery::prepare(&c, &tail_sql("kv")).unwrap();
        let all = read(&mut q, 0, 10);
        let got: Vec<_> = all.iter().map(|c| (&*c.key, c.data.as_deref())).collect();
        assert_eq!(
            got,
            vec![
                ("plain", Some("\"hello\"")),
                ("blob", Some("[1]")),
                ("k\u{fffd}", Some("1")),
            ]
        );
    }

    #[test]
    fn a_failed_read_is_an_error_and_the_next_read_works_again() {
        let c = db();
        c.execute_batch("INSERT INTO kv (k, v) VALUES ('a', '1');")
            .unwrap();
        let mut q = TailQuery::prepare(&c, &tail_sql("kv")).unwrap();
        c.execute_batch("ALTER TABLE kv_changes RENAME TO kv_moved;")
            .unwrap();
        let mut out = Vec::new();
        let e = q.read(0, 10, &mut out).unwrap_err();
        assert_eq!(e.code(), "USP_DB_ERROR", "{e}");
        assert!(e.to_string().contains("kv_changes"), "{e}");
        assert!(out.is_empty());
        c.execute_batch("ALTER TABLE kv_moved RENAME TO kv_changes;")
            .unwrap();
        assert_eq!(read(&mut q, 0, 10).len(), 1);
        assert!(TailQuery::prepare(&c, "SELECT nonsense FROM nowhere").is_err());
    }
}
