//! Change-stream capture of one collection: the key-value collection, or one watched with
//! `watch()`. Each collection has its own stream (the namespace filter runs on the server; so
//! does a `$match` on the operation types), its own thread and its own resume token. Changes
//! go to the pipeline in server order, each batch with the token of its last event: resuming
//! there neither skips nor repeats a change. The stream reopens after the last token when the
//! connection drops (exponential backoff plus jitter) and after an `invalidate`. A token the
//! server refuses gives a `resync`, then a fresh start: never a retry loop.
//!
//! The stream is read with plain `aggregate` / `getMore` commands (see `Cursor`): the events of
//! a batch are handed on before the next request, which the server may hold open for
//! `heartbeatInterval`, so no event waits for it.

use mongodb::bson::{doc, Bson, Document};
use mongodb::Database;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::convert::{decode, Decoded};
use super::Resume;
use crate::core::pipeline::SourceMsg;
use crate::event::{Change, Event};
use crate::source::{Operations, SourceStatus};

/// Most changes handed to the pipeline in one message.
pub const CHUNK: usize = 1000;
/// How long a stream that never opened keeps trying before `init()` / `watch()` fails.
const OPEN_DEADLINE: Duration = Duration::from_secs(10);
/// Events asked for per request.
const BATCH: i32 = 1000;
/// Pause after an empty answer from a server that does not hold requests open (test servers
/// answer at once): grows while idle, so an idle stream costs little.
const IDLE_MIN: Duration = Duration::from_micros(200);
const IDLE_MAX: Duration = Duration::from_millis(2);

/// Why a stream did not open for `init()` or `watch()`.
pub enum LiveError {
    /// The server has no change streams (standalone, error 40573, unknown `$changeStream`).
    Unsupported(String),
    Failed(String),
}

pub struct StreamCapture {
    pub db: Database,
    pub coll: String,
    /// True for the key-value collection; else a watched collection and its operations.
    pub kv: bool,
    pub operations: Operations,
    pub max_await: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Resume after this token; `None`: from now.
    pub start: Option<Document>,
    pub tx: SyncSender<SourceMsg<Resume>>,
    /// Close, or this collection's stream is replaced.
    pub stop: Arc<AtomicBool>,
    /// Set when the server refuses the stream after it ran (it left its replica set).
    pub unavailable: Arc<AtomicBool>,
    pub status: Arc<SourceStatus>,
    /// Told once whether the stream opened (with the token it starts from).
    pub live: Option<SyncSender<Result<Option<Document>, LiveError>>>,
}

/// How the server answered, as far as resuming is concerned.
#[derive(Debug, PartialEq)]
enum Failure {
    /// The network, a failover, a restart: reconnect with backoff.
    Transient(String),
    /// The server answered with an error that asking again will not change: with a token, the
    /// token is refused (history lost, unknown token); without one, no change streams.
    Refused(String),
}

/// Server error codes after which a change stream resumes (the drivers' resumable list).
const RESUMABLE: &[i32] = &[
    6, 7, 43, 63, 89, 91, 133, 134, 150, 189, 234, 262, 9001, 10107, 11600, 11602, 13388, 13435,
    13436,
];

fn classify(e: &mongodb::error::Error) -> Failure {
    use mongodb::error::ErrorKind;
    match &*e.kind {
        ErrorKind::Command(c) => classify_command(c.code, super::server_message(e)),
        // A reply without the fields of an error document (test servers answer so).
        ErrorKind::InvalidResponse { .. } => Failure::Refused(super::server_message(e)),
        _ => Failure::Transient(e.to_string()),
    }
}

fn classify_command(code: i32, msg: String) -> Failure {
    if RESUMABLE.contains(&code) {
        Failure::Transient(msg)
    } else {
        Failure::Refused(msg)
    }
}

/// How a stream ended.
enum End {
    Stop,
    /// The server invalidated the stream: reopen with `startAfter`.
    Invalidated,
    Failed(Failure),
}

/// The `$match` of a stream: the operations delivered, and what ends a stream.
fn match_stage(kv: bool, ops: Operations) -> Document {
    let mut types = vec!["drop", "rename", "dropDatabase", "invalidate"];
    if kv || ops.insert {
        types.push("insert");
    }
    if kv || ops.update {
        types.push("update");
        types.push("replace");
    }
    if kv || ops.delete {
        types.push("delete");
    }
    doc! { "$match": { "operationType": { "$in": types } } }
}

impl StreamCapture {
    fn name(&self) -> &str {
        &self.coll
    }

    pub async fn run(mut self) {
        let mut token = self.start.take();
        let mut attempt = 0u32;
        let mut n = 0u64;
        let mut start_after = false;
        let began = Instant::now();
        while !self.stop.load(Relaxed) {
            // A server that does not answer is noticed within `no_answer`, not after the
            // driver's server selection timeout.
            let opened = match tokio::time::timeout(
                no_answer(self.max_await),
                self.open(token.as_ref(), start_after),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => Err(mongodb::error::Error::custom(
                    "the server did not answer the change stream request".to_string(),
                )),
            };
            let failure = match opened {
                Ok(cursor) => {
                    start_after = false;
                    if attempt > 0 {
                        tracing::info!(
                            collection = self.name(),
                            attempt,
                            "change stream reconnected"
                        );
                    }
                    attempt = 0;
                    self.status.reconnecting.store(false, Relaxed);
                    self.status.attempts.store(0, Relaxed);
                    if token.is_none() {
                        // A fresh start: its position is a checkpoint before any change.
                        token = cursor.post_batch.clone();
                        self.checkpoint(&token);
                    }
                    if let Some(live) = self.live.take() {
                        let _ = live.send(Ok(token.clone()));
                    }
                    match self.consume(cursor, &mut token, &mut n).await {
                        End::Stop => break,
                        End::Invalidated => {
                            start_after = true;
                            continue;
                        }
                        End::Failed(f) => f,
                    }
                }
                Err(e) => classify(&e),
            };
            match failure {
                Failure::Refused(why) if token.is_some() => {
                    tracing::warn!(
                        collection = self.name(),
                        "change stream cannot resume ({why}): resync"
                    );
                    let _ = self.tx.send(SourceMsg::Resync {
                        reason: format!(
                            "the change stream of `{}` cannot resume from this streamer's checkpoint ({why}); changes since then cannot be replayed. Continuing from the current state",
                            self.name()
                        ),
                        checkpoint: None,
                    });
                    token = None;
                    start_after = false;
                }
                Failure::Refused(why) => {
                    match self.live.take() {
                        Some(live) => {
                            let _ = live.send(Err(LiveError::Unsupported(why)));
                        }
                        None => {
                            tracing::warn!(
                                collection = self.name(),
                                "change stream refused ({why})"
                            );
                            if self.kv {
                                self.unavailable.store(true, Relaxed);
                            }
                        }
                    }
                    return;
                }
                Failure::Transient(why) => {
                    attempt += 1;
                    if self.live.is_some() && began.elapsed() > OPEN_DEADLINE {
                        if let Some(live) = self.live.take() {
                            let _ = live.send(Err(LiveError::Failed(why)));
                        }
                        return;
                    }
                    self.status.reconnecting.store(true, Relaxed);
                    self.status.attempts.store(attempt as u64, Relaxed);
                    if attempt == 1 {
                        self.status.reconnects.fetch_add(1, Relaxed);
                    }
                    tracing::warn!(
                        collection = self.name(),
                        attempt,
                        "change stream lost: {why}; reconnecting"
                    );
                    self.backoff(attempt).await;
                }
            }
        }
        tracing::debug!(collection = self.name(), "change stream capture stopped");
    }

    async fn open(
        &self,
        token: Option<&Document>,
        start_after: bool,
    ) -> mongodb::error::Result<Cursor> {
        let mut spec = doc! { "fullDocument": "updateLookup" };
        if let Some(t) = token {
            spec.insert(
                if start_after {
                    "startAfter"
                } else {
                    "resumeAfter"
                },
                t.clone(),
            );
        }
        let reply = self
            .db
            .run_command(doc! {
                "aggregate": self.name(),
                "pipeline": [{ "$changeStream": spec }, match_stage(self.kv, self.operations)],
                "cursor": { "batchSize": BATCH },
            })
            .await?;
        Cursor::from_reply(&reply, "firstBatch")
    }

    /// Reads events until the stream ends, hands them on in chunks, and keeps `token` at the
    /// last event handed on.
    async fn consume(&self, mut cursor: Cursor, token: &mut Option<Document>, n: &mut u64) -> End {
        let mut batch: Vec<Change> = Vec::new();
        let coll = self.name().to_string();
        let mut idle = IDLE_MIN;
        // The key-value collection is created at start (with its index).
        let mut known = self.kv;
        let end = loop {
            while let Some(ev) = cursor.buffer.pop_front() {
                let this = match ev.get("_id") {
                    Some(Bson::Document(d)) => Some(d.clone()),
                    _ => None,
                };
                *n += 1;
                match decode(ev, &coll, self.kv, self.operations, *n) {
                    Decoded::Change(c) => {
                        known = true;
                        batch.push(*c);
                    }
                    Decoded::Skip => {}
                    Decoded::Invalidate { table, operation } => {
                        // Changes before it are delivered first, in order.
                        if !self.flush(&mut batch, token) {
                            break;
                        }
                        if let Some(e) = self.invalidation(table, &operation, known).await {
                            known = false;
                            let _ = self.tx.send(SourceMsg::Notice(e));
                        }
                        if operation == "invalidate" {
                            *token = this;
                            self.checkpoint(token);
                            cursor.kill(&self.db, self.name()).await;
                            return End::Invalidated;
                        }
                    }
                }
                if this.is_some() {
                    *token = this;
                }
                if batch.len() >= CHUNK && !self.flush(&mut batch, token) {
                    break;
                }
            }
            // Nothing buffered: hand on what was collected before asking the server again.
            if !self.flush(&mut batch, token) || self.stop.load(Relaxed) {
                break End::Stop;
            }
            // The server's post-batch token moves past events it filtered out; saving it keeps
            // a resume from rescanning them.
            if cursor.post_batch.is_some() && *token != cursor.post_batch {
                *token = cursor.post_batch.clone();
                self.checkpoint(token);
            }
            if cursor.id == 0 {
                break End::Failed(Failure::Transient(
                    "the server closed the change stream".into(),
                ));
            }
            let t0 = Instant::now();
            let more = tokio::select! {
                r = tokio::time::timeout(no_answer(self.max_await), cursor.get_more(&self.db, self.name(), self.max_await)) => r,
                _ = stopped(&self.stop) => break End::Stop,
            };
            match more {
                Ok(Ok(())) => {}
                Ok(Err(e)) => break End::Failed(classify(&e)),
                Err(_) => {
                    break End::Failed(Failure::Transient(
                        "the server did not answer within the heartbeat interval".into(),
                    ))
                }
            }
            if !cursor.buffer.is_empty() {
                idle = IDLE_MIN;
            } else if t0.elapsed() < self.max_await / 4 {
                // A server that does not hold the request open: pause before asking again.
                tokio::select! {
                    _ = tokio::time::sleep(idle) => {}
                    _ = stopped(&self.stop) => break End::Stop,
                }
                idle = (idle * 2).min(IDLE_MAX);
            }
        };
        cursor.kill(&self.db, self.name()).await;
        end
    }

    /// The event for listeners when a collection went away, if it concerns this stream.
    /// `known`: this collection has existed while the stream ran.
    async fn invalidation(
        &self,
        table: Option<String>,
        operation: &str,
        known: bool,
    ) -> Option<Event> {
        let table = match table {
            Some(t) => t,
            // A server that names no collection (and tells a collection stream about drops of
            // its neighbours): the drop was this collection's if it existed and is gone.
            None if operation == "drop" => {
                if !known {
                    return None;
                }
                match self.db.list_collection_names().await {
                    Ok(n) if !n.iter().any(|c| c == self.name()) => self.name().to_string(),
                    _ => return None,
                }
            }
            None => self.name().to_string(),
        };
        if table != self.name() && operation != "dropDatabase" {
            return None;
        }
        let what = format!("collection `{table}`");
        let reason = match operation {
            "drop" => format!("{what} was dropped; its documents are gone without delete events. Its changes are captured again if it is created again"),
            "rename" => format!("{what} was renamed; changes under its old name end here"),
            "dropDatabase" => "the database was dropped; its documents are gone without delete events".to_string(),
            _ => format!("the change stream of {what} was invalidated by the server; it continues after the invalidation"),
        };
        tracing::warn!("{reason}");
        Some(Event::Invalidate {
            source: "mongodb",
            table: Some(table.as_str().into()),
            operation: operation.to_string(),
            reason,
        })
    }

    fn checkpoint(&self, token: &Option<Document>) {
        if let Some(t) = token {
            let _ = self.tx.send(SourceMsg::Changes {
                changes: Vec::new(),
                checkpoint: Some(self.resume(t)),
            });
        }
    }

    fn resume(&self, t: &Document) -> Resume {
        Resume::Streams(BTreeMap::from([(self.name().to_string(), t.clone())]))
    }

    /// Hands `batch` to the pipeline with the token of its last change. False when the
    /// pipeline is gone (closing).
    fn flush(&self, batch: &mut Vec<Change>, token: &Option<Document>) -> bool {
        if batch.is_empty() {
            return true;
        }
        self.tx
            .send(SourceMsg::Changes {
                changes: std::mem::take(batch),
                checkpoint: token.as_ref().map(|t| self.resume(t)),
            })
            .is_ok()
    }

    async fn backoff(&self, attempt: u32) {
        let delay = crate::source::backoff_delay(self.reconnect_min, self.reconnect_max, attempt);
        let until = Instant::now() + delay;
        while !self.stop.load(Relaxed) && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10).min(delay)).await;
        }
    }
}

/// How long a request may go unanswered before the connection is treated as dead: the time the
/// server may hold it open, plus a margin.
fn no_answer(max_await: Duration) -> Duration {
    max_await + Duration::from_secs(2)
}

/// Resolves once `stop` is set.
async fn stopped(stop: &AtomicBool) {
    while !stop.load(Relaxed) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A change-stream cursor driven with plain `aggregate` / `getMore` commands, so that resuming
/// is this module's, after its own token: a driver that resumes by itself after an empty batch
/// can be left without a token by servers that send no post-batch token, and start from "now".
struct Cursor {
    id: i64,
    buffer: VecDeque<Document>,
    post_batch: Option<Document>,
}

impl Cursor {
    fn from_reply(reply: &Document, field: &str) -> mongodb::error::Result<Cursor> {
        let bad = |what: &str| {
            mongodb::error::Error::custom(format!("change stream reply without {what}"))
        };
        let c = reply.get_document("cursor").map_err(|_| bad("a cursor"))?;
        let id = match c.get("id") {
            Some(Bson::Int64(i)) => *i,
            Some(Bson::Int32(i)) => *i as i64,
            _ => return Err(bad("a cursor id")),
        };
        let buffer = c
            .get_array(field)
            .map_err(|_| bad(field))?
            .iter()
            .filter_map(|d| d.as_document().cloned())
            .collect();
        Ok(Cursor {
            id,
            buffer,
            post_batch: c.get_document("postBatchResumeToken").ok().cloned(),
        })
    }

    async fn get_more(
        &mut self,
        db: &Database,
        coll: &str,
        max_await: Duration,
    ) -> mongodb::error::Result<()> {
        let reply = db
            .run_command(doc! {
                "getMore": self.id,
                "collection": coll,
                "batchSize": BATCH,
                "maxTimeMS": max_await.as_millis() as i64,
            })
            .await?;
        let next = Cursor::from_reply(&reply, "nextBatch")?;
        self.id = next.id;
        self.buffer = next.buffer;
        if next.post_batch.is_some() {
            self.post_batch = next.post_batch;
        }
        Ok(())
    }

    /// Frees the server's cursor (best effort: a restarted server has forgotten it anyway).
    async fn kill(&mut self, db: &Database, coll: &str) {
        if self.id != 0 {
            let cmd = doc! { "killCursors": coll, "cursors": [self.id] };
            let _ = tokio::time::timeout(Duration::from_secs(1), db.run_command(cmd)).await;
            self.id = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_answers_are_classified() {
        let c = |code| classify_command(code, String::new());
        // History lost, fatal, replica sets only, unknown stage, unauthorized: asking again
        // will not help.
        for code in [286, 280, 40573, 40324, 13, 0] {
            assert_eq!(c(code), Failure::Refused(String::new()), "{code}");
        }
        // Failover, shutdown, cursor lost in a restart: resume.
        for code in [43, 91, 189, 10107, 11600, 13436] {
            assert_eq!(c(code), Failure::Transient(String::new()), "{code}");
        }
    }

    #[test]
    fn match_stage_selects_operations() {
        let ops = Operations {
            insert: true,
            update: false,
            delete: true,
        };
        let m = Bson::Document(match_stage(false, ops)).into_relaxed_extjson();
        let types = &m["$match"]["operationType"]["$in"];
        assert!(types.as_array().unwrap().contains(&"insert".into()));
        assert!(!types.as_array().unwrap().contains(&"replace".into()));
        assert!(types.as_array().unwrap().contains(&"drop".into()));
        let kv = Bson::Document(match_stage(true, ops)).into_relaxed_extjson();
        assert!(kv["$match"]["operationType"]["$in"]
            .as_array()
            .unwrap()
            .contains(&"replace".into()));
    }
}
