//! Pure conversions of the MongoDB backend: JSON values to BSON documents (refusing what MongoDB
//! refuses), BSON back to JSON text, and change-stream event documents to `Change`s.

use mongodb::bson::{doc, Bson, DateTime, Document};
use serde_json::Value;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::event::{Change, ChangeKind, Position, RowMeta};
use crate::source::Operations;

/// Largest document MongoDB stores.
pub const MAX_BSON_BYTES: usize = 16 * 1024 * 1024;

/// Converts a JSON value to BSON. Integers that fit 32 bits become Int32 (what other MongoDB
/// clients write for small numbers), other integers Int64, the rest Double. A field name that
/// MongoDB refuses (`$` first, or a NUL anywhere) is an error naming where it is.
pub fn to_bson(v: &Value, path: &mut String) -> Result<Bson> {
    Ok(match v {
        Value::Null => Bson::Null,
        Value::Bool(b) => Bson::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) if i32::try_from(i).is_ok() => Bson::Int32(i as i32),
            Some(i) => Bson::Int64(i),
            // u64 above i64::MAX and fractions: as a double, like JavaScript reads them.
            None => Bson::Double(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => Bson::String(s.clone()),
        Value::Array(a) => {
            let mut out = Vec::with_capacity(a.len());
            for (i, x) in a.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                out.push(to_bson(x, path)?);
                path.truncate(len);
            }
            Bson::Array(out)
        }
        Value::Object(o) => {
            let mut d = Document::new();
            for (k, x) in o {
                if k.starts_with('$') || k.contains('\0') {
                    return Err(Error::InvalidValue(format!(
                        "field name {k:?} at {path} is refused by MongoDB (names must not start with '$' or contain NUL); rename the field"
                    )));
                }
                let len = path.len();
                path.push('.');
                path.push_str(k);
                d.insert(k.clone(), to_bson(x, path)?);
                path.truncate(len);
            }
            Bson::Document(d)
        }
    })
}

/// JSON text of a BSON value, in relaxed extended JSON: numbers, strings, arrays and documents
/// as themselves; ObjectId as `{"$oid":…}`, dates as `{"$date":…}` and so on.
pub fn to_json(b: Bson) -> String {
    b.into_relaxed_extjson().to_string()
}

/// The key-value document of one value at one version. `data` is `None` for a tombstone.
pub fn kv_document(key: &str, data: Option<Bson>, version: u64, now: DateTime) -> Document {
    match data {
        Some(d) => doc! { "_id": key, "data": d, "version": version as i64, "updatedAt": now },
        None => doc! {
            "_id": key, "data": Bson::Null, "version": version as i64, "updatedAt": now, "deleted": true,
        },
    }
}

/// Bytes of a document as BSON (its size limit is 16 MB).
pub fn bson_len(d: &Document) -> usize {
    let mut buf = Vec::new();
    match d.to_writer(&mut buf) {
        Ok(()) => buf.len(),
        Err(_) => usize::MAX,
    }
}

fn int(b: Option<&Bson>) -> Option<i64> {
    match b? {
        Bson::Int32(i) => Some(*i as i64),
        Bson::Int64(i) => Some(*i),
        Bson::Double(f) if f.fract() == 0.0 => Some(*f as i64),
        _ => None,
    }
}

/// What a key-value document says: (key, version, deleted, data JSON, updatedAt µs).
pub struct KvDoc {
    pub key: Arc<str>,
    pub version: u64,
    pub deleted: bool,
    pub data: Option<Arc<str>>,
    pub updated_us: Option<i64>,
}

/// Reads a key-value document; `None` when its `_id` is not a string (not one of ours).
pub fn read_kv(mut d: Document) -> Option<KvDoc> {
    let key: Arc<str> = match d.get("_id") {
        Some(Bson::String(s)) => s.as_str().into(),
        _ => return None,
    };
    let version = int(d.get("version")).unwrap_or(0).max(0) as u64;
    let deleted = matches!(d.get("deleted"), Some(Bson::Boolean(true)));
    let updated_us = match d.get("updatedAt") {
        Some(Bson::DateTime(t)) => Some(t.timestamp_millis() * 1000),
        _ => None,
    };
    let data = if deleted {
        None
    } else {
        Some(to_json(d.remove("data").unwrap_or(Bson::Null)).into())
    };
    Some(KvDoc {
        key,
        version,
        deleted,
        data,
        updated_us,
    })
}

/// The kind of a key-value change from its version (polling and replacements carry no
/// before-image): version 1 is a first write.
pub fn kv_kind(k: &KvDoc) -> ChangeKind {
    if k.deleted {
        ChangeKind::Delete
    } else if k.version <= 1 {
        ChangeKind::Insert
    } else {
        ChangeKind::Update
    }
}

/// The `_data` of a resume token (a hex string on MongoDB), else the token as JSON.
pub fn token_id(token: &Bson) -> String {
    match token {
        Bson::Document(d) => match d.get("_data") {
            Some(Bson::String(s)) => s.clone(),
            _ => to_json(token.clone()),
        },
        other => to_json(other.clone()),
    }
}

/// What one change-stream event means to the engine.
#[derive(Debug)]
pub enum Decoded {
    Change(Box<Change>),
    /// A collection or the database went away (or was renamed): surfaced, never swallowed.
    Invalidate {
        table: Option<String>,
        operation: String,
    },
    /// Not something listeners receive (index builds, a tombstone rewritten, another
    /// collection's event that slipped through).
    Skip,
}

fn commit_us(ev: &Document, fallback: Option<i64>) -> i64 {
    if let Some(us) = fallback {
        return us;
    }
    if let Ok(t) = ev.get_datetime("wallTime") {
        return t.timestamp_millis() * 1000;
    }
    if let Ok(ts) = ev.get_timestamp("clusterTime") {
        return ts.time as i64 * 1_000_000;
    }
    crate::event::now_us()
}

/// Converts one change-stream event of collection `coll` (the key-value collection when `kv`,
/// else a watched one delivering `allowed` operations); `n` is the event's local position.
///
/// Written for MongoDB's event format, and tolerant of servers that leave things out (the
/// test server sends no `ns` and reports a replacement as an `update` whose `documentKey` is the
/// new document).
pub fn decode(mut ev: Document, coll: &str, kv: bool, allowed: Operations, n: u64) -> Decoded {
    let op = ev.get_str("operationType").unwrap_or("").to_string();
    let ns_coll = ev
        .get_document("ns")
        .ok()
        .and_then(|ns| ns.get_str("coll").ok())
        .map(str::to_string);
    match op.as_str() {
        "insert" | "update" | "replace" | "delete" => {}
        "drop" | "rename" | "dropDatabase" | "invalidate" => {
            return Decoded::Invalidate {
                table: ns_coll,
                operation: op,
            }
        }
        _ => return Decoded::Skip,
    }
    if ns_coll.as_deref().is_some_and(|c| c != coll) {
        return Decoded::Skip;
    }
    let full = match ev.remove("fullDocument") {
        Some(Bson::Document(d)) if !d.is_empty() => Some(d),
        _ => None,
    };
    // The document a replacement wrote, when a server reports it as the event's key.
    let replaced = match ev.get_document("documentKey") {
        Ok(k) if k.len() > 1 && k.contains_key("_id") && !k.keys().any(|f| f.starts_with('$')) => {
            Some(k.clone())
        }
        _ => None,
    };
    if kv {
        return decode_kv(&op, &ev, replaced.or(full), n);
    }
    let kind = match op.as_str() {
        "insert" => ChangeKind::Insert,
        "update" => ChangeKind::Update,
        "replace" => ChangeKind::Replace,
        _ => ChangeKind::Delete,
    };
    if !allowed.allows(kind) {
        return Decoded::Skip;
    }
    let id = |d: &Document| d.get("_id").cloned();
    let key_id = ev
        .get_document("documentKey")
        .ok()
        .and_then(id)
        .or_else(|| full.as_ref().and_then(id));
    let key = match key_id {
        Some(i) => to_json(Bson::Document(doc! { "_id": i })),
        None => "null".to_string(),
    };
    let full = match (kind, replaced) {
        (ChangeKind::Update | ChangeKind::Replace, Some(r)) => Some(r),
        (_, _) => full,
    };
    let before = match ev.remove("fullDocumentBeforeChange") {
        Some(b @ Bson::Document(_)) => Some(to_json(b).into()),
        _ => None,
    };
    let update = match ev.remove("updateDescription") {
        Some(u @ Bson::Document(_)) => Some(to_json(u)),
        _ => None,
    };
    let id = token_id(ev.get("_id").unwrap_or(&Bson::Null));
    Decoded::Change(Box::new(Change {
        kind,
        key: key.into(),
        data: if kind == ChangeKind::Delete {
            None
        } else {
            // An update whose document is gone by the time of the lookup has none.
            Some(
                full.map_or_else(|| "null".to_string(), |d| to_json(Bson::Document(d)))
                    .into(),
            )
        },
        version: 0,
        versioned: false,
        seq: 0,
        position: Position::Stream(n),
        source: "mongodb",
        commit_ts_us: commit_us(&ev, None),
        table: Some(coll.into()),
        before,
        meta: Some(Arc::new(RowMeta { id, update })),
    }))
}

/// An event of the key-value collection. The engine writes whole documents (replacements), so
/// inserts and replacements carry the exact document of their version. Updates by other
/// programs come with the looked-up document, which may already be newer: its version is
/// used, so a listener never sees one version with another's value.
fn decode_kv(op: &str, ev: &Document, doc: Option<Document>, n: u64) -> Decoded {
    let position = Position::Stream(n);
    if op == "delete" {
        // Removed by another program (the engine writes tombstones): the key's versions restart.
        let key: Arc<str> = match ev.get_document("documentKey").map(|k| k.get("_id")) {
            Ok(Some(Bson::String(s))) => s.as_str().into(),
            _ => return Decoded::Skip,
        };
        return Decoded::Change(Box::new(Change {
            kind: ChangeKind::Delete,
            key,
            data: None,
            version: 0,
            versioned: false,
            seq: 0,
            position,
            source: "mongodb",
            commit_ts_us: commit_us(ev, None),
            table: None,
            before: None,
            meta: None,
        }));
    }
    let Some(doc) = doc.and_then(read_kv) else {
        tracing::debug!("key-value event without a readable document skipped");
        return Decoded::Skip;
    };
    // Did the writer set a new version? The engine always does; another program may not.
    let versioned = match ev.get_document("updateDescription") {
        Ok(u) if op == "update" => u
            .get_document("updatedFields")
            .map(|f| f.contains_key("version"))
            .unwrap_or(false),
        _ => true,
    };
    Decoded::Change(Box::new(Change {
        kind: kv_kind(&doc),
        commit_ts_us: commit_us(ev, doc.updated_us),
        key: doc.key,
        data: doc.data,
        version: doc.version,
        versioned,
        seq: 0,
        position,
        source: "mongodb",
        table: None,
        before: None,
        meta: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::Timestamp;
    use serde_json::json;

    const ALL: Operations = Operations {
        insert: true,
        update: true,
        delete: true,
    };

    fn bson(v: Value) -> Result<Bson> {
        to_bson(&v, &mut "data".to_string())
    }

    #[test]
    fn json_round_trips_through_bson() {
        let v = json!({"a": 1, "big": 9_007_199_254_740_993i64, "f": 1.5, "s": "x", "n": null,
                       "arr": [true, {"b": [1, 2]}], "neg": -3});
        let b = bson(v.clone()).unwrap();
        let back: Value = serde_json::from_str(&to_json(b)).unwrap();
        assert_eq!(back, v);
        assert!(matches!(bson(json!(7)).unwrap(), Bson::Int32(7)));
        assert!(matches!(bson(json!(1i64 << 40)).unwrap(), Bson::Int64(_)));
    }

    #[test]
    fn refused_field_names_are_named() {
        let e = bson(json!({"ok": {"$set": 1}})).unwrap_err();
        assert_eq!(e.code(), "USP_INVALID_VALUE");
        assert!(e.to_string().contains("data.ok"), "{e}");
        let e = bson(json!([{"a\u{0}b": 1}])).unwrap_err();
        assert!(e.to_string().contains("data[0]"), "{e}");
        // '$' inside a name, or a '$' value, is fine.
        assert!(bson(json!({"a$": "$b"})).is_ok());
    }

    #[test]
    fn kv_documents_and_sizes() {
        let now = DateTime::from_millis(1_700_000_000_123);
        let d = kv_document("k", Some(Bson::Int32(1)), 3, now);
        let k = read_kv(d.clone()).unwrap();
        assert_eq!((&*k.key, k.version, k.deleted), ("k", 3, false));
        assert_eq!(k.data.as_deref(), Some("1"));
        assert_eq!(k.updated_us, Some(1_700_000_000_123_000));
        assert_eq!(kv_kind(&k), ChangeKind::Update);
        let t = read_kv(kv_document("k", None, 4, now)).unwrap();
        assert!(t.deleted && t.data.is_none());
        assert_eq!(kv_kind(&t), ChangeKind::Delete);
        assert!(bson_len(&d) > 20 && bson_len(&d) < 100);
        assert!(read_kv(doc! {"_id": 5, "version": 1}).is_none());
    }

    fn event(op: &str, coll: &str, full: Option<Document>) -> Document {
        let mut e = doc! {
            "_id": {"_data": "8265AB"},
            "operationType": op,
            "ns": {"db": "d", "coll": coll},
            "documentKey": {"_id": "k1"},
            "clusterTime": Timestamp { time: 1_700_000_000, increment: 1 },
        };
        if let Some(f) = full {
            e.insert("fullDocument", f);
        }
        e
    }

    #[test]
    fn key_value_events() {
        let now = DateTime::from_millis(1_700_000_000_500);
        let full = kv_document("k1", Some(Bson::String("v".into())), 2, now);
        let Decoded::Change(c) = decode(
            event("replace", "kv", Some(full.clone())),
            "kv",
            true,
            ALL,
            7,
        ) else {
            panic!("change")
        };
        assert_eq!(
            (c.kind, c.version, c.versioned),
            (ChangeKind::Update, 2, true)
        );
        assert_eq!(c.data.as_deref(), Some("\"v\""));
        assert_eq!(c.commit_ts_us, 1_700_000_000_500_000);
        assert_eq!(c.position, Position::Stream(7));
        // An update by another program that left `version` alone.
        let mut ev = event("update", "kv", Some(full));
        ev.insert(
            "updateDescription",
            doc! {"updatedFields": {"data": "v"}, "removedFields": []},
        );
        let Decoded::Change(c) = decode(ev, "kv", true, ALL, 8) else {
            panic!("change")
        };
        assert!(!c.versioned);
        // Deleted by another program.
        let Decoded::Change(c) = decode(event("delete", "kv", None), "kv", true, ALL, 9) else {
            panic!("change")
        };
        assert_eq!(
            (c.kind, c.versioned, &*c.key),
            (ChangeKind::Delete, false, "k1")
        );
        assert_eq!(c.commit_ts_us, 1_700_000_000_000_000);
        // A tombstone.
        let t = kv_document("k1", None, 3, now);
        let Decoded::Change(c) = decode(event("replace", "kv", Some(t)), "kv", true, ALL, 10)
        else {
            panic!("change")
        };
        assert_eq!(c.kind, ChangeKind::Delete);
    }

    #[test]
    fn replacements_reported_in_the_document_key() {
        // The test server: an `update` whose documentKey is the replacement, fullDocument empty.
        let now = DateTime::from_millis(1_700_000_000_500);
        let mut ev = event("update", "kv", Some(Document::new()));
        ev.remove("ns");
        ev.insert(
            "documentKey",
            kv_document("k1", Some(Bson::Int32(5)), 4, now),
        );
        let Decoded::Change(c) = decode(ev, "kv", true, ALL, 1) else {
            panic!("change")
        };
        assert_eq!((&*c.key, c.version, c.versioned), ("k1", 4, true));
        assert_eq!(c.data.as_deref(), Some("5"));
        let mut ev = event("update", "orders", None);
        ev.insert("documentKey", doc! {"_id": 7, "n": 1});
        let Decoded::Change(c) = decode(ev, "orders", false, ALL, 2) else {
            panic!("change")
        };
        assert_eq!(&*c.key, r#"{"_id":7}"#);
        assert_eq!(c.data.as_deref(), Some(r#"{"_id":7,"n":1}"#));
    }

    #[test]
    fn watched_collection_events() {
        let mut ev = event("update", "orders", Some(doc! {"_id": "k1", "n": 2}));
        ev.insert(
            "updateDescription",
            doc! {"updatedFields": {"n": 2}, "removedFields": ["old"]},
        );
        let Decoded::Change(c) = decode(ev, "orders", false, ALL, 1) else {
            panic!("change")
        };
        assert_eq!(c.kind, ChangeKind::Update);
        assert_eq!(c.table.as_deref(), Some("orders"));
        assert_eq!(&*c.key, r#"{"_id":"k1"}"#);
        assert_eq!(c.data.as_deref(), Some(r#"{"_id":"k1","n":2}"#));
        let m = c.meta.as_ref().unwrap();
        assert_eq!(m.id, "8265AB");
        assert!(m.update.as_deref().unwrap().contains("removedFields"));
        let Decoded::Change(c) = decode(event("delete", "orders", None), "orders", false, ALL, 2)
        else {
            panic!("change")
        };
        assert!(c.data.is_none());
        // An event of another collection (a server that streams more than asked).
        assert!(matches!(
            decode(event("insert", "other", None), "orders", false, ALL, 3),
            Decoded::Skip
        ));
        let inserts_only = Operations {
            insert: true,
            update: false,
            delete: false,
        };
        assert!(matches!(
            decode(
                event("replace", "orders", None),
                "orders",
                false,
                inserts_only,
                4
            ),
            Decoded::Skip
        ));
        match decode(event("drop", "orders", None), "orders", false, ALL, 5) {
            Decoded::Invalidate { table, operation } => {
                assert_eq!(table.as_deref(), Some("orders"));
                assert_eq!(operation, "drop");
            }
            other => panic!("{other:?}"),
        }
    }
}
