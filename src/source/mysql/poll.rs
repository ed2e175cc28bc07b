//! Polling fallback: when the binary log cannot be read (binlog off, no REPLICATION grants, or
//! `useChangeStreams: false`), the key-value table is read every `pollingInterval` with a keyset
//! cursor on `(updated_at, k)`. Deletes are seen through tombstones. Each poll starts a little
//! before the cursor (`overlap`) so a transaction that committed late with an older `updated_at`
//! is still found; rows seen twice are dropped by their per-key version. Polling sees the latest
//! version of a row only: versions written between two polls are not delivered one by one.

use mysql_async::prelude::*;
use mysql_async::{Conn, Value as SqlValue};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{sql_error, Conninfo, Resume};
use crate::core::pipeline::SourceMsg;
use crate::error::Result;
use crate::event::{json_or_string, Change, ChangeKind, PollPosition, Position};
use crate::metrics::Metrics;

/// Rows read per query.
const PAGE: usize = 1000;

pub struct Poller {
    pub info: Conninfo,
    pub table: String,
    pub interval: Duration,
    /// How far before the cursor each poll starts again.
    pub overlap: Duration,
    /// Cursor to start from (µs of `updated_at`); `None`: the server's current time.
    pub start: Option<i64>,
    pub tx: SyncSender<SourceMsg<Resume>>,
    /// Stop after one more complete poll (the binlog took over).
    pub finish: Arc<AtomicBool>,
    /// Stop now (close).
    pub stop: Arc<AtomicBool>,
    pub metrics: Arc<Metrics>,
}

type Row = (String, Option<String>, u64, i8, i64);

impl Poller {
    pub fn run(self) {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!("polling runtime: {e}");
                return;
            }
        };
        let mut conn: Option<Conn> = None;
        let mut cursor = self.start;
        // Rows at or before a resumed cursor were delivered by the previous streamer, whose
        // versions this one does not know: the overlap never reaches back past it.
        let floor = self.start.map(|f| f + 1);
        let mut failures = 0u32;
        loop {
            if self.stop.load(Relaxed) {
                return;
            }
            let last_round = self.finish.load(Relaxed);
            let t0 = Instant::now();
            match rt.block_on(self.poll_once(&mut conn, &mut cursor, floor)) {
                Ok(()) => failures = 0,
                Err(e) => {
                    conn = None;
                    failures += 1;
                    self.metrics.record_error(&e);
                    tracing::warn!(failures, code = e.code(), "poll failed: {e}");
                }
            }
            if last_round {
                return;
            }
            // Sleep the rest of the interval in short steps, so stop and finish are seen.
            let until = t0 + self.interval;
            while Instant::now() < until {
                if self.stop.load(Relaxed) || self.finish.load(Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5).min(self.interval));
            }
        }
    }

    async fn poll_once(
        &self,
        conn: &mut Option<Conn>,
        cursor: &mut Option<i64>,
        floor: Option<i64>,
    ) -> Result<()> {
        if conn.is_none() {
            let mut c = Conn::new(self.info.opts())
                .await
                .map_err(|e| sql_error(e, "polling: connecting"))?;
            c.query_drop("SET time_zone = '+00:00'")
                .await
                .map_err(|e| sql_error(e, "polling: session time zone"))?;
            *conn = Some(c);
        }
        let c = conn.as_mut().expect("set above");
        let now_us: i64 = c
            .query_first("SELECT TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', NOW(6))")
            .await
            .map_err(|e| sql_error(e, "polling"))?
            .unwrap_or(0);
        let Some(from) = *cursor else {
            // First poll of a fresh start: changes from now on.
            *cursor = Some(now_us);
            let _ = self.tx.send(SourceMsg::Changes {
                changes: Vec::new(),
                checkpoint: Some(Resume::Poll { ts_us: now_us }),
            });
            return Ok(());
        };
        let t = &self.table;
        let ts = "TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', updated_at)";
        let at = "TIMESTAMPADD(MICROSECOND, ?, '1970-01-01 00:00:00')";
        let first = format!("SELECT k, v, version, deleted, {ts} FROM `{t}` WHERE updated_at >= {at} ORDER BY updated_at, k LIMIT {PAGE}");
        let next = format!(
            "SELECT k, v, version, deleted, {ts} FROM `{t}` WHERE updated_at > {at} OR (updated_at = {at} AND k > ?) ORDER BY updated_at, k LIMIT {PAGE}"
        );
        let back = from - self.overlap.as_micros() as i64;
        let start = floor.map_or(back, |f| back.max(f));
        let mut rows: Vec<Row> = c
            .exec(first.as_str(), (start,))
            .await
            .map_err(|e| sql_error(e, "polling"))?;
        let mut max_ts = from;
        loop {
            let n = rows.len();
            let last = rows.last().map(|r| (r.4, r.0.clone()));
            let changes: Vec<Change> = rows
                .into_iter()
                .map(|(k, v, version, deleted, ts_us)| {
                    max_ts = max_ts.max(ts_us);
                    let key: Arc<str> = k.into();
                    let kind = if deleted != 0 {
                        ChangeKind::Delete
                    } else if version <= 1 {
                        ChangeKind::Insert
                    } else {
                        ChangeKind::Update
                    };
                    let data = match (deleted, v) {
                        (0, Some(s)) => Some(json_or_string(&s, &key)),
                        _ => None,
                    };
                    Change {
                        kind,
                        key,
                        data,
                        version,
                        versioned: true,
                        seq: 0,
                        position: Position::Poll(PollPosition(ts_us)),
                        source: "mysql",
                        commit_ts_us: ts_us,
                        table: None,
                        before: None,
                        meta: None,
                    }
                })
                .collect();
            if !changes.is_empty()
                && self
                    .tx
                    .send(SourceMsg::Changes {
                        changes,
                        checkpoint: None,
                    })
                    .is_err()
            {
                return Ok(());
            }
            match last {
                Some((lts, lk)) if n == PAGE => {
                    rows = c
                        .exec(
                            next.as_str(),
                            vec![SqlValue::from(lts), SqlValue::from(lts), SqlValue::from(lk)],
                        )
                        .await
                        .map_err(|e| sql_error(e, "polling"))?;
                }
                _ => break,
            }
        }
        *cursor = Some(max_ts);
        let _ = self.tx.send(SourceMsg::Changes {
            changes: Vec::new(),
            checkpoint: Some(Resume::Poll { ts_us: max_ts }),
        });
        Ok(())
    }
}
