//! What flows through the engine: changes captured from a store, control events, and the
//! positions (checkpoints) that say where in a source's log a change came from.

use std::fmt::Write as _;
use std::sync::Arc;

/// Position in the embedded SQLite change log (its `seq` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChangeLogSeq(pub u64);

/// Where a row change sits in a MySQL/MariaDB binary log: the log file's number (the digits of
/// `binlog.000042`), the position of the rows event in that file, and the row's index within the
/// event (one event carries many rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BinlogPosition {
    pub file_index: u32,
    pub event_pos: u32,
    pub row: u32,
}

/// Where a polled row was found: its `updated_at`, microseconds since the epoch. Polls overlap,
/// so these positions repeat; polled changes are deduplicated by per-key version instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PollPosition(pub i64);

/// Where a change came from in its source's log. Typed per source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    ChangeLog(ChangeLogSeq),
    Binlog(BinlogPosition),
    Poll(PollPosition),
    /// The n-th event of a MongoDB change stream in this process. Resume tokens are opaque and
    /// a resumed stream starts exactly after its token, so these changes are deduplicated by
    /// per-key version only; the token itself travels in `Change::meta`.
    Stream(u64),
}

impl Position {
    /// True for positions of a log read in order (change log, binlog): a position at or before
    /// the last admitted one is a replay.
    pub fn is_ordered_log(&self) -> bool {
        matches!(self, Position::ChangeLog(_) | Position::Binlog(_))
    }
}

impl Position {
    /// A totally ordered number for dedupe by source position within one source.
    pub fn ordinal(&self) -> u128 {
        match self {
            Position::ChangeLog(s) => s.0 as u128,
            Position::Binlog(b) => {
                ((b.file_index as u128) << 64) | ((b.event_pos as u128) << 32) | b.row as u128
            }
            Position::Poll(p) => p.0.max(0) as u128,
            Position::Stream(n) => *n as u128,
        }
    }
}

/// Kind of a data change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Insert,
    Update,
    /// A whole document replaced (MongoDB `replaceOne`), for watched collections.
    Replace,
    Delete,
}

impl ChangeKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            ChangeKind::Insert => "insert",
            ChangeKind::Update => "update",
            ChangeKind::Replace => "replace",
            ChangeKind::Delete => "delete",
        }
    }
}

/// One committed change of one key.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub kind: ChangeKind,
    pub key: Arc<str>,
    /// The value as JSON text; `None` for deletes.
    pub data: Option<Arc<str>>,
    /// Per-key version assigned by the database in the write itself.
    pub version: u64,
    /// The writer bumped `version` (true for every change the engine writes): the change is
    /// also deduplicated by version. False for a SQL write that left `version` as it was, or a
    /// row removed with SQL DELETE (whose key then starts its versions again).
    pub versioned: bool,
    /// Global sequence number assigned by the core on admission (0 before).
    pub seq: u64,
    pub position: Position,
    /// Source name shown to users ("sqlite").
    pub source: &'static str,
    /// Commit time, microseconds since the Unix epoch.
    pub commit_ts_us: i64,
    /// A row of a watched table (`watch()`): the table name. `key` then holds the primary key
    /// as a JSON object, `data` the row after the change (null for deletes).
    pub table: Option<Arc<str>>,
    /// A watched row before an update or delete, as a JSON object.
    pub before: Option<Arc<str>>,
    /// What a source knows of a watched row beyond the row itself (MongoDB: the resume token
    /// and the update description).
    pub meta: Option<Arc<RowMeta>>,
}

/// Source-specific details of a watched row change.
#[derive(Debug, Clone, PartialEq)]
pub struct RowMeta {
    /// The stable event id (MongoDB: the resume token's `_data`).
    pub id: String,
    /// MongoDB `updateDescription` of an update, as JSON.
    pub update: Option<String>,
}

/// What the delivery sinks receive.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Change(Arc<Change>),
    /// The source could not resume from its checkpoint and continues from `to`; changes in
    /// between were not delivered. Never silent.
    Resync {
        source: &'static str,
        reason: String,
        from: u64,
        to: u64,
    },
    /// The columns of a watched table changed (DDL); `columns` is a JSON array of names.
    Schema {
        source: &'static str,
        table: Arc<str>,
        columns: String,
    },
    /// The source changed how it captures (e.g. `binlog` → `polling`), and why.
    Mode {
        source: &'static str,
        mode: &'static str,
        reason: String,
    },
    /// A watched collection (or the database) was dropped or renamed: its stream of changes
    /// ended there. `operation` is the server's word for it (`drop`, `rename`, `dropDatabase`,
    /// `invalidate`).
    Invalidate {
        source: &'static str,
        table: Option<Arc<str>>,
        operation: String,
        reason: String,
    },
}

impl Event {
    /// Commit time of a data change, if it is one.
    /// Commit time of a key-value change, for the latency histogram. Rows of watched tables
    /// are left out: their binlog timestamp has one-second precision.
    pub fn commit_ts_us(&self) -> Option<i64> {
        match self {
            Event::Change(c) if c.table.is_some() => None,
            Event::Change(c) => Some(c.commit_ts_us),
            Event::Resync { .. }
            | Event::Mode { .. }
            | Event::Schema { .. }
            | Event::Invalidate { .. } => None,
        }
    }
}

/// Values written by other programs may not be JSON: they are delivered as a JSON string
/// rather than breaking the batch they travel in.
pub fn json_or_string(s: &str, key: &str) -> Arc<str> {
    if is_valid_json(s) {
        s.into()
    } else {
        tracing::warn!(key, "value is not JSON; delivered as a string");
        serde_json::to_string(s)
            .unwrap_or_else(|_| "null".into())
            .into()
    }
}

/// Microseconds since the Unix epoch, now.
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// A row of a watched table: `{"type","table","key","row","before","id","seq","source",
/// "timestamp","latency"}`. `id` names the row's binlog position (file number, event position,
/// row index), so the same row change always has the same id.
fn push_row(out: &mut String, c: &Change) {
    out.push_str("{\"type\":\"");
    out.push_str(c.kind.as_str());
    out.push_str("\",\"table\":");
    push_json_string(out, c.table.as_deref().unwrap_or(""));
    out.push_str(",\"key\":");
    out.push_str(&c.key);
    out.push_str(",\"row\":");
    out.push_str(c.data.as_deref().unwrap_or("null"));
    out.push_str(",\"before\":");
    out.push_str(c.before.as_deref().unwrap_or("null"));
    if let Some(u) = c.meta.as_ref().and_then(|m| m.update.as_deref()) {
        out.push_str(",\"update\":");
        out.push_str(u);
    }
    out.push_str(",\"id\":");
    match (&c.meta, c.position) {
        (Some(m), _) => push_json_string(out, &m.id),
        (None, Position::Binlog(b)) => {
            let _ = write!(out, "\"{}:{}:{}\"", b.file_index, b.event_pos, b.row);
        }
        (None, other) => {
            let _ = write!(out, "\"{}\"", other.ordinal());
        }
    }
    let _ = write!(
        out,
        ",\"seq\":{},\"source\":\"{}\",\"timestamp\":{}.{:03},\"latency\":0}}",
        c.seq,
        c.source,
        c.commit_ts_us.div_euclid(1000),
        c.commit_ts_us.rem_euclid(1000)
    );
}

/// Encodes a batch as one JSON array of event objects: the payload of the WebSocket hub's change
/// frames. Values are embedded as the JSON text they were stored as, never re-parsed.
pub fn encode_batch(events: &[Event]) -> String {
    let mut out = String::with_capacity(encoded_size(events) + 2);
    out.push('[');
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_event(&mut out, e);
    }
    out.push(']');
    out
}

fn encoded_size(events: &[Event]) -> usize {
    events
        .iter()
        .map(|e| match e {
            Event::Change(c) => 128 + c.key.len() + c.data.as_ref().map_or(4, |d| d.len()),
            Event::Resync { reason, .. }
            | Event::Mode { reason, .. }
            | Event::Invalidate { reason, .. } => 96 + reason.len(),
            Event::Schema { columns, .. } => 96 + columns.len(),
        })
        .sum()
}

/// Appends one event as a JSON object.
fn push_event(out: &mut String, e: &Event) {
    match e {
        Event::Change(c) if c.table.is_some() => push_row(out, c),
        Event::Change(c) => {
            out.push_str("{\"type\":\"");
            out.push_str(c.kind.as_str());
            out.push_str("\",\"key\":");
            push_json_string(out, &c.key);
            out.push_str(",\"data\":");
            out.push_str(c.data.as_deref().unwrap_or("null"));
            // Milliseconds with three decimals, written as integers (cheaper than f64 display).
            // `latency` is filled in by JavaScript at hand-off; declaring it here keeps every
            // event object the same shape.
            let _ = write!(
                out,
                ",\"version\":{},\"seq\":{},\"source\":\"{}\",\"timestamp\":{}.{:03},\"latency\":0}}",
                c.version,
                c.seq,
                c.source,
                c.commit_ts_us.div_euclid(1000),
                c.commit_ts_us.rem_euclid(1000)
            );
        }
        Event::Resync {
            source,
            reason,
            from,
            to,
        } => {
            out.push_str("{\"type\":\"resync\",\"source\":\"");
            out.push_str(source);
            out.push_str("\",\"reason\":");
            push_json_string(out, reason);
            let _ = write!(out, ",\"from\":{from},\"to\":{to}}}");
        }
        Event::Schema {
            source,
            table,
            columns,
        } => {
            let _ = write!(
                out,
                "{{\"type\":\"schema\",\"source\":\"{source}\",\"table\":"
            );
            push_json_string(out, table);
            out.push_str(",\"columns\":");
            out.push_str(columns);
            out.push('}');
        }
        Event::Mode {
            source,
            mode,
            reason,
        } => {
            let _ = write!(
                out,
                "{{\"type\":\"mode\",\"source\":\"{source}\",\"mode\":\"{mode}\",\"reason\":"
            );
            push_json_string(out, reason);
            out.push('}');
        }
        Event::Invalidate {
            source,
            table,
            operation,
            reason,
        } => {
            let _ = write!(
                out,
                "{{\"type\":\"invalidate\",\"source\":\"{source}\",\"table\":"
            );
            match table {
                Some(t) => push_json_string(out, t),
                None => out.push_str("null"),
            }
            out.push_str(",\"operation\":");
            push_json_string(out, operation);
            out.push_str(",\"reason\":");
            push_json_string(out, reason);
            out.push('}');
        }
    }
}

/// Encodes a batch for the JavaScript dispatcher, column by column: one JSON object holding
/// `t`, a string with one letter per event (`i`nsert, `u`pdate, `r`eplace, `d`elete, or `x` for
/// any other event), and for the key-value changes, in order: `k`, the keys joined by
/// `KEY_SEPARATOR` in one string (an array of keys when a key holds that character), the arrays
/// `d` (values), `v` (versions) and `s` (seqs), the commit times as `tb` (µs since the epoch) and
/// `ts` (µs after `tb`, one per change), plus `src` (the source, or an array of sources when they
/// differ). Other events (rows of watched tables, resync, mode, schema, invalidate) travel whole,
/// in order, in `x`. `JSON.parse` of arrays is about twice as fast as of the same events as
/// objects, whose property names it must read and intern one by one; one string of keys, split
/// in JavaScript, and small integers for the times cost it less again.
pub fn encode_js_batch(events: &[Event]) -> String {
    let split_keys = !events.iter().any(
        |e| matches!(e, Event::Change(c) if c.table.is_none() && c.key.contains(KEY_SEPARATOR)),
    );
    let base_us = events
        .iter()
        .find_map(|e| match e {
            Event::Change(c) if c.table.is_none() => Some(c.commit_ts_us),
            _ => None,
        })
        .unwrap_or(0);
    let mut kinds = String::with_capacity(events.len());
    let mut keys = String::with_capacity(events.len() * 16);
    let mut data = String::with_capacity(encoded_size(events));
    let mut nums = String::with_capacity(events.len() * 40);
    let mut seqs = String::with_capacity(events.len() * 8);
    let mut times = String::with_capacity(events.len() * 4);
    let mut others = String::new();
    let mut sources: Vec<&'static str> = Vec::new();
    let mut mixed = false;
    for e in events {
        match e {
            Event::Change(c) if c.table.is_none() => {
                kinds.push(match c.kind {
                    ChangeKind::Insert => 'i',
                    ChangeKind::Update => 'u',
                    ChangeKind::Replace => 'r',
                    ChangeKind::Delete => 'd',
                });
                let sep = if sources.is_empty() { "" } else { "," };
                if split_keys {
                    if !sources.is_empty() {
                        keys.push(KEY_SEPARATOR);
                    }
                    push_json_string_body(&mut keys, &c.key);
                } else {
                    keys.push_str(sep);
                    push_json_string(&mut keys, &c.key);
                }
                data.push_str(sep);
                data.push_str(c.data.as_deref().unwrap_or("null"));
                // itoa: `write!` goes through the formatting machinery for every number.
                let mut n = itoa::Buffer::new();
                nums.push_str(sep);
                nums.push_str(n.format(c.version));
                seqs.push_str(sep);
                seqs.push_str(n.format(c.seq));
                times.push_str(sep);
                times.push_str(n.format(c.commit_ts_us.wrapping_sub(base_us)));
                mixed |= sources.first().is_some_and(|s| *s != c.source);
                sources.push(c.source);
            }
            other => {
                kinds.push('x');
                if !others.is_empty() {
                    others.push(',');
                }
                push_event(&mut others, other);
            }
        }
    }
    let mut out = String::with_capacity(
        kinds.len()
            + keys.len()
            + data.len()
            + nums.len()
            + seqs.len()
            + times.len()
            + others.len()
            + 96,
    );
    let (open, close) = if split_keys { ("\"", "\"") } else { ("[", "]") };
    let _ = write!(
        out,
        "{{\"t\":\"{kinds}\",\"k\":{open}{keys}{close},\"d\":[{data}],\"v\":[{nums}],\"s\":[{seqs}],\"tb\":{base_us},\"ts\":[{times}],\"src\":"
    );
    if mixed {
        out.push('[');
        for (i, s) in sources.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            push_json_string(&mut out, s);
        }
        out.push(']');
    } else {
        push_json_string(&mut out, sources.first().copied().unwrap_or(""));
    }
    let _ = write!(out, ",\"x\":[{others}]}}");
    out
}

/// Joins the keys of a JavaScript batch (`encode_js_batch`): DEL, which JSON needs no escape for
/// and keys seldom hold.
pub const KEY_SEPARATOR: char = '\u{7f}';

/// Appends `s` as a JSON string literal.
pub fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    push_json_string_body(out, s);
    out.push('"');
}

/// Appends `s` escaped for the inside of a JSON string literal.
fn push_json_string_body(out: &mut String, s: &str) {
    if !s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        // Nothing to escape (the common case for keys): copy as is.
        out.push_str(s);
        return;
    }
    // serde_json's escaping is correct for every code point; writing into a String cannot fail.
    let quoted = serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_string());
    out.push_str(&quoted[1..quoted.len() - 1]);
}

/// True when `s` is one complete JSON value.
pub fn is_valid_json(s: &str) -> bool {
    serde_json::from_str::<&serde_json::value::RawValue>(s).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(key: &str, data: Option<&str>, kind: ChangeKind) -> Event {
        Event::Change(Arc::new(Change {
            kind,
            key: key.into(),
            data: data.map(Into::into),
            version: 3,
            versioned: true,
            seq: 9,
            position: Position::ChangeLog(ChangeLogSeq(4)),
            source: "sqlite",
            commit_ts_us: 1_700_000_000_123_456,
            table: None,
            before: None,
            meta: None,
        }))
    }

    #[test]
    fn batch_encodes_to_valid_json_with_raw_values() {
        let s = encode_batch(&[
            change("a\"b\n", Some(r#"{"x":[1,2]}"#), ChangeKind::Update),
            change("k", None, ChangeKind::Delete),
            Event::Resync {
                source: "sqlite",
                reason: "pruned".into(),
                from: 1,
                to: 5,
            },
        ]);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v[0]["key"], "a\"b\n");
        assert_eq!(v[0]["data"]["x"][1], 2);
        assert_eq!(v[0]["type"], "update");
        assert_eq!(v[0]["timestamp"].as_f64().unwrap(), 1_700_000_000_123.456);
        assert_eq!(v[0]["latency"], 0);
        assert_eq!(v[1]["data"], serde_json::Value::Null);
        assert_eq!(v[1]["type"], "delete");
        assert_eq!(v[2]["type"], "resync");
        assert_eq!(v[2]["to"], 5);
        assert_eq!(encode_batch(&[]), "[]");
    }

    #[test]
    fn js_batch_is_columnar_with_other_events_in_order() {
        let mut from_mysql = change("m", Some("2"), ChangeKind::Insert);
        if let Event::Change(c) = &mut from_mysql {
            Arc::make_mut(c).source = "mysql";
        }
        let events = [
            change("a\"b\n", Some(r#"{"x":[1,2]}"#), ChangeKind::Update),
            Event::Resync {
                source: "sqlite",
                reason: "pruned".into(),
                from: 1,
                to: 5,
            },
            change("k", None, ChangeKind::Delete),
        ];
        let v: serde_json::Value = serde_json::from_str(&encode_js_batch(&events)).unwrap();
        assert_eq!(v["t"], "uxd");
        assert_eq!(v["k"], "a\"b\n\u{7f}k");
        assert_eq!(v["d"], serde_json::json!([{ "x": [1, 2] }, null]));
        assert_eq!(v["v"], serde_json::json!([3, 3]));
        assert_eq!(v["s"], serde_json::json!([9, 9]));
        assert_eq!(v["tb"], 1_700_000_000_123_456i64);
        assert_eq!(v["ts"], serde_json::json!([0, 0]));
        assert_eq!(v["src"], "sqlite");
        assert_eq!(v["x"][0]["type"], "resync");
        assert_eq!(v["x"][0]["to"], 5);

        let v: serde_json::Value =
            serde_json::from_str(&encode_js_batch(&[events[2].clone(), from_mysql])).unwrap();
        assert_eq!(v["t"], "di");
        assert_eq!(v["src"], serde_json::json!(["sqlite", "mysql"]));
        assert_eq!(v["x"], serde_json::json!([]));

        let v: serde_json::Value = serde_json::from_str(&encode_js_batch(&[])).unwrap();
        assert_eq!(v["t"], "");
    }

    #[test]
    fn js_batch_sends_keys_as_an_array_when_one_holds_the_separator_and_times_as_offsets() {
        let mut later = change("x\u{7f}y", Some("1"), ChangeKind::Insert);
        let mut earlier = change("z", Some("2"), ChangeKind::Insert);
        if let (Event::Change(a), Event::Change(b)) = (&mut later, &mut earlier) {
            Arc::make_mut(a).commit_ts_us = 1_700_000_000_000_250;
            Arc::make_mut(b).commit_ts_us = 1_700_000_000_000_000;
        }
        let v: serde_json::Value =
            serde_json::from_str(&encode_js_batch(&[later, earlier])).unwrap();
        assert_eq!(v["k"], serde_json::json!(["x\u{7f}y", "z"]));
        assert_eq!(v["tb"], 1_700_000_000_000_250i64);
        assert_eq!(v["ts"], serde_json::json!([0, -250]));
    }

    #[test]
    fn json_strings_are_escaped_only_when_needed() {
        for k in [
            "plain:key",
            "é😀",
            "quote\"",
            "back\\slash",
            "nl\n",
            "\u{1}",
            "",
        ] {
            let mut out = String::new();
            push_json_string(&mut out, k);
            assert_eq!(serde_json::from_str::<String>(&out).unwrap(), k);
        }
    }

    #[test]
    fn json_validation() {
        assert!(is_valid_json("{\"a\":1}"));
        assert!(is_valid_json("null"));
        assert!(!is_valid_json("{a:1}"));
        assert!(!is_valid_json("1 2"));
        assert!(!is_valid_json(""));
    }
}
