//! How changes travel through the Redis stream: one stream entry per batch, its changes as a
//! JSON array. Values stay raw JSON text end to end (no re-parse of user data).

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::sync::Arc;

use crate::event::{
    BinlogPosition, Change, ChangeKind, ChangeLogSeq, Event, PollPosition, Position, RowMeta,
};

#[derive(Serialize, Deserialize)]
struct Wire<'a> {
    /// i, u, r, d
    k: char,
    // Cow: a string with escapes cannot be borrowed from the JSON text.
    #[serde(borrow)]
    key: Cow<'a, str>,
    #[serde(borrow, skip_serializing_if = "Option::is_none", default)]
    d: Option<&'a RawValue>,
    v: u64,
    /// versioned
    #[serde(default)]
    vd: bool,
    /// position: [tag, a, b, c]
    p: [i64; 4],
    #[serde(borrow)]
    s: Cow<'a, str>,
    t: i64,
    #[serde(borrow, skip_serializing_if = "Option::is_none", default)]
    tb: Option<Cow<'a, str>>,
    #[serde(borrow, skip_serializing_if = "Option::is_none", default)]
    b: Option<&'a RawValue>,
    #[serde(borrow, skip_serializing_if = "Option::is_none", default)]
    mi: Option<Cow<'a, str>>,
    #[serde(borrow, skip_serializing_if = "Option::is_none", default)]
    mu: Option<Cow<'a, str>>,
}

/// Source names are `&'static str` in events; the bus carries them as text.
fn source_name(s: &str) -> &'static str {
    match s {
        "mysql" => "mysql",
        "mongodb" => "mongodb",
        "sqlite" => "sqlite",
        _ => "redis",
    }
}

fn raw(s: &str) -> Option<&RawValue> {
    serde_json::from_str::<&RawValue>(s).ok()
}

/// Encodes changes as one JSON array.
pub fn encode_changes(changes: &[Change]) -> String {
    let mut out = String::with_capacity(changes.len() * 96 + 2);
    out.push('[');
    for (i, c) in changes.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let p = match c.position {
            Position::ChangeLog(s) => [0, s.0 as i64, 0, 0],
            Position::Binlog(b) => [1, b.file_index as i64, b.event_pos as i64, b.row as i64],
            Position::Poll(t) => [2, t.0, 0, 0],
            Position::Stream(n) => [3, n as i64, 0, 0],
        };
        let w = Wire {
            k: match c.kind {
                ChangeKind::Insert => 'i',
                ChangeKind::Update => 'u',
                ChangeKind::Replace => 'r',
                ChangeKind::Delete => 'd',
            },
            key: Cow::Borrowed(&c.key),
            d: c.data.as_deref().and_then(raw),
            v: c.version,
            vd: c.versioned,
            p,
            s: Cow::Borrowed(c.source),
            t: c.commit_ts_us,
            tb: c.table.as_deref().map(Cow::Borrowed),
            b: c.before.as_deref().and_then(raw),
            mi: c.meta.as_ref().map(|m| Cow::Borrowed(m.id.as_str())),
            mu: c
                .meta
                .as_ref()
                .and_then(|m| m.update.as_deref())
                .map(Cow::Borrowed),
        };
        // A Wire of strings and raw JSON always serializes.
        out.push_str(&serde_json::to_string(&w).unwrap_or_else(|_| "null".into()));
    }
    out.push(']');
    out
}

/// Decodes an array written by `encode_changes`; `seq` of the n-th change is `first_seq + n`.
pub fn decode_changes(json: &str, first_seq: u64) -> Result<Vec<Change>, String> {
    let wires: Vec<Wire> = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(wires.len());
    for (i, w) in wires.into_iter().enumerate() {
        let kind = match w.k {
            'i' => ChangeKind::Insert,
            'u' => ChangeKind::Update,
            'r' => ChangeKind::Replace,
            'd' => ChangeKind::Delete,
            other => return Err(format!("unknown change kind {other:?}")),
        };
        let [tag, a, b, c] = w.p;
        let position = match tag {
            0 => Position::ChangeLog(ChangeLogSeq(a as u64)),
            1 => Position::Binlog(BinlogPosition {
                file_index: a as u32,
                event_pos: b as u32,
                row: c as u32,
            }),
            2 => Position::Poll(PollPosition(a)),
            3 => Position::Stream(a as u64),
            other => return Err(format!("unknown position tag {other}")),
        };
        out.push(Change {
            kind,
            key: Arc::from(w.key.as_ref()),
            data: w.d.map(|r| Arc::from(r.get())),
            version: w.v,
            versioned: w.vd,
            seq: first_seq + i as u64,
            position,
            source: source_name(&w.s),
            commit_ts_us: w.t,
            table: w.tb.as_deref().map(Arc::from),
            before: w.b.map(|r| Arc::from(r.get())),
            meta: w.mi.map(|id| {
                Arc::new(RowMeta {
                    id: id.into_owned(),
                    update: w.mu.map(Cow::into_owned),
                })
            }),
        });
    }
    Ok(out)
}

/// A notice for every instance's listeners (capture mode, schema change).
#[derive(Serialize, Deserialize)]
struct NoticeWire {
    /// "mode" | "schema" | "invalidate"
    e: String,
    s: String,
    #[serde(default)]
    mode: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    table: Option<String>,
    #[serde(default)]
    columns: String,
    #[serde(default)]
    operation: String,
}

/// Modes a source announces; the bus carries them as text.
fn mode_name(m: &str) -> &'static str {
    match m {
        "binlog" => "binlog",
        "polling" => "polling",
        "changeStream" => "changeStream",
        "changelog" => "changelog",
        _ => "unknown",
    }
}

/// Encodes a notice event; `None` for events that are not notices.
pub fn encode_notice(e: &Event) -> Option<String> {
    let w = match e {
        Event::Mode {
            source,
            mode,
            reason,
        } => NoticeWire {
            e: "mode".into(),
            s: source.to_string(),
            mode: mode.to_string(),
            reason: reason.clone(),
            table: None,
            columns: String::new(),
            operation: String::new(),
        },
        Event::Schema {
            source,
            table,
            columns,
        } => NoticeWire {
            e: "schema".into(),
            s: source.to_string(),
            mode: String::new(),
            reason: String::new(),
            table: Some(table.to_string()),
            columns: columns.clone(),
            operation: String::new(),
        },
        Event::Invalidate {
            source,
            table,
            operation,
            reason,
        } => NoticeWire {
            e: "invalidate".into(),
            s: source.to_string(),
            mode: String::new(),
            reason: reason.clone(),
            table: table.as_deref().map(str::to_string),
            columns: String::new(),
            operation: operation.clone(),
        },
        Event::Change(_) | Event::Resync { .. } => return None,
    };
    serde_json::to_string(&w).ok()
}

/// Decodes a notice written by `encode_notice`.
pub fn decode_notice(json: &str) -> Result<Event, String> {
    let w: NoticeWire = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let source = source_name(&w.s);
    Ok(match w.e.as_str() {
        "mode" => Event::Mode {
            source,
            mode: mode_name(&w.mode),
            reason: w.reason,
        },
        "schema" => Event::Schema {
            source,
            table: w.table.unwrap_or_default().into(),
            columns: w.columns,
        },
        "invalidate" => Event::Invalidate {
            source,
            table: w.table.map(Arc::from),
            operation: w.operation,
            reason: w.reason,
        },
        other => return Err(format!("unknown notice {other:?}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(key: &str, data: Option<&str>, position: Position) -> Change {
        Change {
            kind: ChangeKind::Update,
            key: key.into(),
            data: data.map(Arc::from),
            version: 7,
            versioned: true,
            seq: 0,
            position,
            source: "mysql",
            commit_ts_us: 1_700_000_000_000_001,
            table: None,
            before: None,
            meta: None,
        }
    }

    #[test]
    fn changes_round_trip_with_seq() {
        let mut row = change(
            r#"{"id":1}"#,
            Some(r#"{"id":1,"name":"é\"x"}"#),
            Position::Binlog(BinlogPosition {
                file_index: 3,
                event_pos: 4567,
                row: 2,
            }),
        );
        row.table = Some("orders".into());
        row.before = Some(r#"{"id":1,"name":"a"}"#.into());
        row.kind = ChangeKind::Delete;
        row.versioned = false;
        row.meta = Some(Arc::new(RowMeta {
            id: "tok".into(),
            update: Some(r#"{"a":1}"#.into()),
        }));
        let kv = change(
            "price:BTC",
            Some("[1,2.5,null]"),
            Position::Poll(PollPosition(-5)),
        );
        let del = change("gone", None, Position::ChangeLog(ChangeLogSeq(9)));
        let stream = change("s", Some("\"x\""), Position::Stream(u64::MAX >> 2));
        let all = vec![row, kv, del, stream];
        let text = encode_changes(&all);
        let back = decode_changes(&text, 100).unwrap();
        assert_eq!(back.len(), 4);
        for (i, (a, b)) in all.iter().zip(&back).enumerate() {
            let mut a = a.clone();
            a.seq = 100 + i as u64;
            assert_eq!(&a, b);
        }
    }

    #[test]
    fn bad_entries_are_errors_not_panics() {
        assert!(decode_changes("not json", 1).is_err());
        assert!(decode_changes(
            r#"[{"k":"z","key":"a","v":1,"p":[0,0,0,0],"s":"x","t":0}]"#,
            1
        )
        .is_err());
        assert!(decode_changes(
            r#"[{"k":"i","key":"a","v":1,"p":[9,0,0,0],"s":"x","t":0}]"#,
            1
        )
        .is_err());
        assert_eq!(decode_changes("[]", 1).unwrap().len(), 0);
        assert!(decode_notice("{}").is_err());
    }

    #[test]
    fn notices_round_trip() {
        for e in [
            Event::Mode {
                source: "mysql",
                mode: "polling",
                reason: "why".into(),
            },
            Event::Schema {
                source: "mysql",
                table: "t".into(),
                columns: r#"["a","b"]"#.into(),
            },
            Event::Invalidate {
                source: "mysql",
                table: Some("t".into()),
                operation: "drop".into(),
                reason: "dropped".into(),
            },
        ] {
            let text = encode_notice(&e).unwrap();
            assert_eq!(decode_notice(&text).unwrap(), e);
        }
        assert!(encode_notice(&Event::Resync {
            source: "mysql",
            reason: String::new(),
            from: 0,
            to: 0
        })
        .is_none());
    }
}
