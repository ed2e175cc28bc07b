//! Polling fallback: when change streams are not possible (a standalone server, or
//! `useChangeStreams: false`), the key-value collection is read every `pollingInterval` with a
//! keyset cursor on `(updatedAt, _id)`. Deletes are seen through tombstones. Each poll starts a
//! little before the cursor (`overlap`) so a write that committed late with an older `updatedAt`
//! is still found; documents seen twice are dropped by their per-key version. Polling sees the
//! latest version of a document only. `updatedAt` is written by the writers' clocks: writers
//! whose clocks differ by more than the overlap can be missed.

use futures_util::TryStreamExt;
use mongodb::bson::{doc, DateTime, Document};
use mongodb::Collection;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::convert::{kv_kind, read_kv};
use super::{mongo_error, Resume};
use crate::core::pipeline::SourceMsg;
use crate::error::Result;
use crate::event::{Change, PollPosition, Position};
use crate::metrics::Metrics;

/// Documents read per query.
const PAGE: i64 = 1000;

pub struct Poller {
    pub kv: Collection<Document>,
    pub interval: Duration,
    /// How far before the cursor each poll starts again.
    pub overlap: Duration,
    /// Cursor to start from (ms of `updatedAt`); `None`: now.
    pub start: Option<i64>,
    pub tx: SyncSender<SourceMsg<Resume>>,
    /// Stop after one more complete poll (the change stream took over).
    pub finish: Arc<AtomicBool>,
    /// Stop now (close).
    pub stop: Arc<AtomicBool>,
    pub metrics: Arc<Metrics>,
}

impl Poller {
    pub async fn run(self) {
        let mut cursor = self.start;
        // Documents at or before a resumed cursor were delivered by the previous streamer,
        // whose versions this one does not know: the overlap never reaches back past it.
        let floor = self.start.map(|f| f + 1);
        let mut failures = 0u32;
        loop {
            if self.stop.load(Relaxed) {
                return;
            }
            let last_round = self.finish.load(Relaxed);
            let t0 = Instant::now();
            match self.poll_once(&mut cursor, floor).await {
                Ok(()) => failures = 0,
                Err(e) => {
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
                tokio::time::sleep(Duration::from_millis(5).min(self.interval)).await;
            }
        }
    }

    async fn poll_once(&self, cursor: &mut Option<i64>, floor: Option<i64>) -> Result<()> {
        let Some(from) = *cursor else {
            // First poll of a fresh start: changes from now on.
            let now = DateTime::now().timestamp_millis();
            *cursor = Some(now);
            let _ = self.tx.send(SourceMsg::Changes {
                changes: Vec::new(),
                checkpoint: Some(Resume::Poll { ts_ms: now }),
            });
            return Ok(());
        };
        let back = from - self.overlap.as_millis() as i64;
        let start = floor.map_or(back, |f| back.max(f));
        let mut filter = doc! { "updatedAt": { "$gte": DateTime::from_millis(start) } };
        let mut max_ts = from;
        loop {
            let docs: Vec<Document> = self
                .kv
                .find(filter)
                .sort(doc! { "updatedAt": 1, "_id": 1 })
                .limit(PAGE)
                .await
                .map_err(|e| mongo_error(e, "polling"))?
                .try_collect()
                .await
                .map_err(|e| mongo_error(e, "polling"))?;
            let n = docs.len() as i64;
            let mut last = None;
            let mut changes = Vec::with_capacity(docs.len());
            for d in docs {
                let Some(k) = read_kv(d) else { continue };
                let ms = k.updated_us.unwrap_or(0) / 1000;
                max_ts = max_ts.max(ms);
                last = Some((ms, k.key.clone()));
                changes.push(Change {
                    kind: kv_kind(&k),
                    key: k.key,
                    data: k.data,
                    version: k.version,
                    versioned: true,
                    seq: 0,
                    position: Position::Poll(PollPosition(ms * 1000)),
                    source: "mongodb",
                    commit_ts_us: ms * 1000,
                    table: None,
                    before: None,
                    meta: None,
                });
            }
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
                Some((ms, key)) if n == PAGE => {
                    let t = DateTime::from_millis(ms);
                    filter = doc! { "$or": [
                        { "updatedAt": { "$gt": t } },
                        { "updatedAt": t, "_id": { "$gt": &*key } },
                    ] };
                }
                _ => break,
            }
        }
        *cursor = Some(max_ts);
        // A last poll before the change stream takes over leaves the stream's tokens as the
        // checkpoint.
        if !self.finish.load(Relaxed) {
            let _ = self.tx.send(SourceMsg::Changes {
                changes: Vec::new(),
                checkpoint: Some(Resume::Poll { ts_ms: max_ts }),
            });
        }
        Ok(())
    }
}
