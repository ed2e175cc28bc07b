//! Rows of watched tables (`watch()`): which tables, their column layout, and the conversion of
//! binlog cell values to JSON with faithful types — integers with their signedness (the binlog
//! client reads every integer as unsigned), decimals as strings, dates and times as ISO strings,
//! JSON columns parsed, binary columns as base64.

pub use crate::source::Operations;
use base64::Engine as _;
use mysql_async::prelude::*;
use mysql_cdc::events::row_events::mysql_value::MySqlValue;
use mysql_cdc::events::row_events::row_data::RowData;
use mysql_cdc::events::table_map_event::TableMapEvent;
use serde_json::{Map, Number, Value};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use super::sql_error;
use crate::error::{Error, Result};

/// One column as information_schema describes it (read when `watch()` is called).
#[derive(Debug, Clone, PartialEq)]
pub struct ColumnInfo {
    pub name: String,
    pub unsigned: bool,
    /// A JSON column (MySQL `JSON`, or MariaDB's LONGTEXT with a `json_valid` check).
    pub json: bool,
    /// BINARY, VARBINARY or a BLOB type: delivered as base64.
    pub binary: bool,
    pub primary: bool,
}

/// A table watched with `watch()`.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchSpec {
    pub table: String,
    pub columns: Vec<ColumnInfo>,
    pub operations: Operations,
}

/// The watched tables, by name: written by `watch()`, read by the binlog thread at each
/// table-map event (so a new watch applies from the next transaction it reads).
pub type Watches = Arc<RwLock<HashMap<String, Arc<WatchSpec>>>>;

/// Reads a table's columns from information_schema (names, JSON, binary, unsigned, primary key).
pub async fn read_spec(
    conn: &mut mysql_async::Conn,
    db: &str,
    table: &str,
    operations: Operations,
) -> Result<WatchSpec> {
    let e = |e| sql_error(e, "watch(): reading the table's columns");
    type Col = (String, String, String, String);
    let cols: Vec<Col> = conn
        .exec(
            "SELECT COLUMN_NAME, DATA_TYPE, COLUMN_TYPE, COLUMN_KEY FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
            (db, table),
        )
        .await
        .map_err(e)?;
    if cols.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "watch('{table}'): there is no table `{table}` in database `{db}`"
        )));
    }
    // MariaDB's JSON is LONGTEXT with a json_valid() check named after the column.
    let checks: Vec<String> = conn
        .exec(
            "SELECT CHECK_CLAUSE FROM information_schema.CHECK_CONSTRAINTS WHERE CONSTRAINT_SCHEMA = ? AND TABLE_NAME = ?",
            (db, table),
        )
        .await
        .unwrap_or_default();
    let columns = cols
        .into_iter()
        .map(|(name, data_type, column_type, key)| {
            let dt = data_type.to_ascii_lowercase();
            ColumnInfo {
                json: dt == "json"
                    || checks
                        .iter()
                        .any(|c| c.replace(' ', "") == format!("json_valid(`{name}`)")),
                binary: matches!(
                    dt.as_str(),
                    "binary" | "varbinary" | "blob" | "tinyblob" | "mediumblob" | "longblob"
                ),
                unsigned: column_type.to_ascii_lowercase().contains("unsigned"),
                primary: key == "PRI",
                name,
            }
        })
        .collect();
    Ok(WatchSpec {
        table: table.to_string(),
        columns,
        operations,
    })
}

/// True when the table map cannot be decoded with `spec` as read: no column names in the binlog
/// (`binlog_row_metadata` below FULL) and a different column count (the table changed since).
pub fn is_stale(map: &TableMapEvent, spec: &WatchSpec) -> bool {
    let named = map
        .table_metadata
        .as_ref()
        .is_some_and(|m| m.column_names.is_some());
    !named && spec.columns.len() != map.column_types.len()
}

/// How to decode one table's rows, from the binlog's table map and the watch's column info.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    pub names: Vec<String>,
    unsigned: Vec<bool>,
    json: Vec<bool>,
    binary: Vec<bool>,
    enums: Vec<Option<Vec<String>>>,
    primary: Vec<usize>,
    pub operations: Operations,
}

/// Column types whose signedness the table map's metadata lists, in column order.
fn is_numeric(t: u8) -> bool {
    matches!(t, 1 | 2 | 3 | 4 | 5 | 8 | 9 | 246)
}

impl Layout {
    /// The binlog's own metadata wins where it has it (`binlog_row_metadata=FULL`: names,
    /// signedness, primary key), so a column added or dropped since `watch()` is still named
    /// right; JSON and binary come from information_schema, by column name.
    pub fn new(map: &TableMapEvent, spec: &WatchSpec) -> Layout {
        let n = map.column_types.len();
        let meta = map.table_metadata.as_ref();
        let names: Vec<String> = match meta.and_then(|m| m.column_names.clone()) {
            Some(names) if names.len() == n => names,
            _ if spec.columns.len() == n => spec.columns.iter().map(|c| c.name.clone()).collect(),
            _ => (0..n).map(|i| format!("col{i}")).collect(),
        };
        let by_name = |name: &str| spec.columns.iter().find(|c| c.name == name);
        let unsigned = match meta.and_then(|m| m.signedness.as_ref()) {
            Some(bits) => {
                let mut k = 0;
                map.column_types
                    .iter()
                    .map(|&t| {
                        if is_numeric(t) {
                            k += 1;
                            bits.get(k - 1).copied().unwrap_or(false)
                        } else {
                            false
                        }
                    })
                    .collect()
            }
            None => names
                .iter()
                .map(|c| by_name(c).is_some_and(|c| c.unsigned))
                .collect(),
        };
        let mut enums: Vec<Option<Vec<String>>> = vec![None; n];
        if let Some(values) = meta.and_then(|m| m.enum_string_values.as_ref()) {
            let mut k = 0;
            for (i, &t) in map.column_types.iter().enumerate() {
                // ENUM columns are logged as STRING (254) with the real type in the metadata.
                let real = (map.column_metadata.get(i).copied().unwrap_or(0) >> 8) as u8;
                if t == 247 || (t == 254 && real == 247) {
                    enums[i] = values.get(k).cloned();
                    k += 1;
                }
            }
        }
        let primary = match meta.and_then(|m| m.simple_primary_keys.as_ref()) {
            Some(pk) => pk.iter().map(|&i| i as usize).filter(|&i| i < n).collect(),
            None => names
                .iter()
                .enumerate()
                .filter(|(_, c)| by_name(c).is_some_and(|c| c.primary))
                .map(|(i, _)| i)
                .collect(),
        };
        Layout {
            json: names
                .iter()
                .map(|c| by_name(c).is_some_and(|c| c.json))
                .collect(),
            binary: names
                .iter()
                .map(|c| by_name(c).is_some_and(|c| c.binary))
                .collect(),
            names,
            unsigned,
            enums,
            primary,
            operations: spec.operations,
        }
    }

    /// The row as a JSON object, and its primary key as a JSON object (all columns when the
    /// table has no primary key).
    pub fn to_json(&self, row: &RowData) -> (String, String) {
        let mut obj = Map::with_capacity(self.names.len());
        for (i, name) in self.names.iter().enumerate() {
            let v = row.cells.get(i).and_then(|c| c.as_ref());
            obj.insert(name.clone(), self.cell(i, v));
        }
        let key = if self.primary.is_empty() {
            Value::Object(obj.clone())
        } else {
            let mut k = Map::with_capacity(self.primary.len());
            for &i in &self.primary {
                let name = &self.names[i];
                k.insert(name.clone(), obj.get(name).cloned().unwrap_or(Value::Null));
            }
            Value::Object(k)
        };
        (Value::Object(obj).to_string(), key.to_string())
    }

    fn cell(&self, i: usize, v: Option<&MySqlValue>) -> Value {
        let unsigned = self.unsigned.get(i).copied().unwrap_or(false);
        let json = self.json.get(i).copied().unwrap_or(false);
        let binary = self.binary.get(i).copied().unwrap_or(false);
        let Some(v) = v else { return Value::Null };
        match v {
            MySqlValue::TinyInt(n) => int(if unsigned {
                *n as i128
            } else {
                *n as i8 as i128
            }),
            MySqlValue::SmallInt(n) => int(if unsigned {
                *n as i128
            } else {
                *n as i16 as i128
            }),
            MySqlValue::MediumInt(n) => int(if unsigned {
                *n as i128
            } else {
                (((*n << 8) as i32) >> 8) as i128
            }),
            MySqlValue::Int(n) => int(if unsigned {
                *n as i128
            } else {
                *n as i32 as i128
            }),
            MySqlValue::BigInt(n) => int(if unsigned {
                *n as i128
            } else {
                *n as i64 as i128
            }),
            MySqlValue::Float(f) => float(*f as f64),
            MySqlValue::Double(f) => float(*f),
            MySqlValue::Decimal(s) => Value::String(s.clone()),
            MySqlValue::String(s) if json => parse_json(s),
            MySqlValue::String(s) => Value::String(s.clone()),
            MySqlValue::Blob(b) if binary => {
                Value::String(base64::engine::general_purpose::STANDARD.encode(b))
            }
            MySqlValue::Blob(b) => {
                let s = String::from_utf8_lossy(b);
                if json {
                    parse_json(&s)
                } else {
                    Value::String(s.into_owned())
                }
            }
            MySqlValue::Bit(bits) => {
                let mut n: u64 = 0;
                for (k, b) in bits.iter().enumerate().take(64) {
                    if *b {
                        n |= 1 << k;
                    }
                }
                int(n as i128)
            }
            MySqlValue::Enum(n) => match self.enums.get(i).and_then(|e| e.as_ref()) {
                Some(names) if *n >= 1 => names
                    .get(*n as usize - 1)
                    .map(|s| Value::String(s.clone()))
                    .unwrap_or(Value::Null),
                _ => int(*n as i128),
            },
            MySqlValue::Set(n) => int(*n as i128),
            MySqlValue::Year(y) => int(*y as i128),
            MySqlValue::Date(d) => {
                Value::String(format!("{:04}-{:02}-{:02}", d.year, d.month, d.day))
            }
            MySqlValue::Time(t) => Value::String(format!(
                "{:02}:{:02}:{:02}.{:03}",
                t.hour, t.minute, t.second, t.millis
            )),
            MySqlValue::DateTime(d) => Value::String(format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}",
                d.year, d.month, d.day, d.hour, d.minute, d.second, d.millis
            )),
            MySqlValue::Timestamp(ms) => Value::String(iso_utc(*ms as i64)),
        }
    }
}

/// Integers beyond ±(2^53 - 1) lose precision as JavaScript numbers: those are strings.
fn int(n: i128) -> Value {
    const SAFE: i128 = (1 << 53) - 1;
    if (-SAFE..=SAFE).contains(&n) {
        Value::Number(Number::from(n as i64))
    } else {
        Value::String(n.to_string())
    }
}

fn float(f: f64) -> Value {
    Number::from_f64(f).map_or(Value::Null, Value::Number)
}

fn parse_json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.to_string()))
}

/// `2024-01-31T12:34:56.789Z` from milliseconds since the epoch.
pub fn iso_utc(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    let rem = ms.rem_euclid(86_400_000);
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(name: &str) -> ColumnInfo {
        ColumnInfo {
            name: name.into(),
            unsigned: false,
            json: false,
            binary: false,
            primary: false,
        }
    }

    fn layout(types: Vec<u8>, spec: Vec<ColumnInfo>) -> Layout {
        let map = TableMapEvent {
            table_id: 1,
            database_name: "d".into(),
            table_name: "t".into(),
            column_metadata: vec![0; types.len()],
            null_bitmap: vec![true; types.len()],
            column_types: types,
            table_metadata: None,
        };
        Layout::new(
            &map,
            &WatchSpec {
                table: "t".into(),
                columns: spec,
                operations: Operations::default(),
            },
        )
    }

    #[test]
    fn iso_dates() {
        assert_eq!(iso_utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso_utc(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(iso_utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn cells_keep_their_types() {
        let l = layout(
            vec![3, 3, 8, 8, 246, 252, 252, 252, 15],
            vec![
                ColumnInfo {
                    primary: true,
                    ..col("id")
                },
                ColumnInfo {
                    unsigned: true,
                    ..col("u")
                },
                col("big"),
                ColumnInfo {
                    unsigned: true,
                    ..col("ubig")
                },
                col("price"),
                ColumnInfo {
                    json: true,
                    ..col("doc")
                },
                ColumnInfo {
                    binary: true,
                    ..col("bin")
                },
                col("txt"),
                col("name"),
            ],
        );
        let row = RowData::new(vec![
            Some(MySqlValue::Int((-5i32) as u32)),
            Some(MySqlValue::Int(4_000_000_000)),
            Some(MySqlValue::BigInt((-9_007_199_254_740_993i64) as u64)),
            Some(MySqlValue::BigInt(u64::MAX)),
            Some(MySqlValue::Decimal("12.50".into())),
            Some(MySqlValue::Blob(br#"{"a":[1,2]}"#.to_vec())),
            Some(MySqlValue::Blob(vec![0, 255, 1])),
            Some(MySqlValue::Blob(b"{not json".to_vec())),
            None,
        ]);
        let (row, key) = l.to_json(&row);
        let v: Value = serde_json::from_str(&row).unwrap();
        assert_eq!(v["id"], -5);
        assert_eq!(v["u"], 4_000_000_000u64);
        assert_eq!(v["big"], "-9007199254740993");
        assert_eq!(v["ubig"], "18446744073709551615");
        assert_eq!(v["price"], "12.50");
        assert_eq!(v["doc"]["a"][1], 2);
        assert_eq!(v["bin"], "AP8B");
        assert_eq!(v["txt"], "{not json");
        assert!(v["name"].is_null());
        assert_eq!(key, r#"{"id":-5}"#);
    }

    #[test]
    fn small_signed_integers_and_dates() {
        let l = layout(vec![1, 2, 9, 13, 10], vec![]);
        let row = RowData::new(vec![
            Some(MySqlValue::TinyInt(0xFF)),
            Some(MySqlValue::SmallInt(0xFFFE)),
            Some(MySqlValue::MediumInt(0xFF_FFFD)),
            Some(MySqlValue::Year(2024)),
            Some(MySqlValue::Date(
                mysql_cdc::events::row_events::mysql_value::Date {
                    year: 2024,
                    month: 2,
                    day: 29,
                },
            )),
        ]);
        let (row, key) = l.to_json(&row);
        let v: Value = serde_json::from_str(&row).unwrap();
        assert_eq!(
            (v["col0"].as_i64(), v["col1"].as_i64(), v["col2"].as_i64()),
            (Some(-1), Some(-2), Some(-3))
        );
        assert_eq!(v["col3"], 2024);
        assert_eq!(v["col4"], "2024-02-29");
        // No primary key: the whole row identifies it.
        assert_eq!(key, row);
    }
}
