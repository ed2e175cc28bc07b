//! Every instance's side of the bus: reads the Redis Stream and feeds its own pipeline, with
//! each change's global `seq` taken from the stream. A hole in the seqs means this instance
//! fell behind the stream's trim point: it says so with a `resync`, never silently.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{codec, BusStatus, Keys};
use crate::core::pipeline::{Checkpoint, SourceMsg};

/// KEYS: stream, seq. Returns {id of the last entry or '0-0', last seq}, read together.
const SNAPSHOT: &str = r"
local s = redis.call('GET', KEYS[2]) or '0'
local e = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local id = '0-0'
if #e > 0 then id = e[1][1] end
return {id, s}";

/// How long one XREAD waits for entries; also how soon a stop is noticed.
const BLOCK_MS: u64 = 250;
/// Entries read per XREAD.
const READ_COUNT: usize = 256;

/// Where the stream is now: the last entry id and the last seq. Reading starts after it.
pub fn snapshot(conn: &mut redis::Connection, keys: &Keys) -> redis::RedisResult<(String, u64)> {
    let (id, seq): (String, u64) = redis::Script::new(SNAPSHOT)
        .key(&keys.stream)
        .key(&keys.seq)
        .invoke(conn)?;
    Ok((id, seq))
}

/// A running consumer.
pub struct Consumer {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Consumer {
    /// Reads entries after `from` (an entry id and the seq it ended at) into `tx`.
    pub fn start<C: Checkpoint>(
        client: redis::Client,
        keys: Keys,
        from: (String, u64),
        tx: SyncSender<SourceMsg<C>>,
        status: Arc<BusStatus>,
    ) -> std::io::Result<Consumer> {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        status.last_seq.store(from.1, Relaxed);
        let run = Run {
            client,
            keys,
            last_id: from.0,
            last_bus_seq: from.1,
            offset: 0,
            tx,
            status,
            stop: s,
        };
        let handle = std::thread::Builder::new()
            .name("usp-redis-consume".into())
            .spawn(move || run.run())?;
        Ok(Consumer {
            stop,
            handle: Some(handle),
        })
    }

    /// Reads what the stream holds now (for at most a second), then stops.
    pub fn stop(mut self) {
        self.stop.store(true, Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

struct Run<C> {
    client: redis::Client,
    keys: Keys,
    last_id: String,
    /// Last seq read, in the stream's numbering.
    last_bus_seq: u64,
    /// Added to stream seqs: non-zero only after Redis lost the stream and numbering restarted,
    /// so this instance's seqs still only grow.
    offset: u64,
    tx: SyncSender<SourceMsg<C>>,
    status: Arc<BusStatus>,
    stop: Arc<AtomicBool>,
}

impl<C: Checkpoint> Run<C> {
    fn run(mut self) {
        let mut conn: Option<redis::Connection> = None;
        let mut attempt = 0u32;
        let mut drain_until: Option<Instant> = None;
        loop {
            if self.stop.load(Relaxed) && drain_until.is_none() {
                drain_until = Some(Instant::now() + Duration::from_secs(1));
            }
            if matches!(drain_until, Some(t) if Instant::now() > t) {
                break;
            }
            if conn.is_none() {
                match super::connect(&self.client) {
                    Ok(c) => {
                        if attempt > 0 {
                            tracing::info!(
                                attempt,
                                "reconnected to Redis: reading the stream again"
                            );
                        }
                        conn = Some(c);
                        attempt = 0;
                        self.status.attempts.store(0, Relaxed);
                        self.status.reconnecting.store(false, Relaxed);
                    }
                    Err(e) => {
                        if drain_until.is_some() {
                            break;
                        }
                        attempt += 1;
                        self.status.reconnecting.store(true, Relaxed);
                        self.status.attempts.store(attempt as u64, Relaxed);
                        self.status
                            .set_error(Some(format!("read: {}", super::describe(&e))));
                        std::thread::sleep(crate::source::backoff_delay(
                            super::RECONNECT_MIN,
                            super::RECONNECT_MAX,
                            attempt,
                        ));
                        continue;
                    }
                }
            }
            let c = conn.as_mut().expect("set above");
            let mut cmd = redis::cmd("XREAD");
            cmd.arg("COUNT").arg(READ_COUNT);
            if drain_until.is_none() {
                cmd.arg("BLOCK").arg(BLOCK_MS);
            }
            cmd.arg("STREAMS").arg(&self.keys.stream).arg(&self.last_id);
            let reply: redis::RedisResult<Option<redis::streams::StreamReadReply>> = cmd.query(c);
            match reply {
                Ok(None) => {
                    if drain_until.is_some() {
                        break;
                    }
                }
                Ok(Some(r)) => {
                    let mut any = false;
                    for k in r.keys {
                        for e in k.ids {
                            any = true;
                            self.last_id = e.id.clone();
                            if !self.entry(e) {
                                return;
                            }
                        }
                    }
                    if !any && drain_until.is_some() {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!("reading the Redis stream failed: {}", super::describe(&e));
                    conn = None;
                    attempt = attempt.max(1);
                    self.status.reconnecting.store(true, Relaxed);
                }
            }
        }
    }

    /// Hands one entry to the pipeline; false when the pipeline is gone.
    fn entry(&mut self, e: redis::streams::StreamId) -> bool {
        let kind: String = e.get("k").unwrap_or_default();
        let s: u64 = e.get("s").unwrap_or(0);
        let n: u64 = e.get("n").unwrap_or(0);
        let d: String = e.get("d").unwrap_or_default();
        self.status.consumed.fetch_add(1, Relaxed);
        let mut msgs = Vec::new();
        if n > 0 {
            if s > self.last_bus_seq + 1 {
                self.status.resyncs.fetch_add(1, Relaxed);
                msgs.push(SourceMsg::Resync {
                    reason: format!(
                        "this instance fell behind the Redis stream's trim point: changes {} to {} were trimmed before it read them (options.redis.streamMaxLen, streamMaxAge); it continues from the stream",
                        self.last_bus_seq + 1 + self.offset,
                        s - 1 + self.offset
                    ),
                    checkpoint: None,
                });
            } else if s <= self.last_bus_seq {
                // The stream's numbering went back: Redis lost its data (restarted without
                // persistence, flushed). What was in flight there is gone.
                self.offset = self.last_bus_seq + self.offset + 1 - s;
                self.status.resyncs.fetch_add(1, Relaxed);
                msgs.push(SourceMsg::Resync {
                    reason: "the Redis stream restarted from the beginning (Redis lost its data: run it with persistence, appendonly yes); changes in flight may be missing".into(),
                    checkpoint: None,
                });
            }
            self.last_bus_seq = s + n - 1;
        }
        // The local pipeline needs no checkpoint: where this instance reads is not kept.
        let checkpoint = None;
        match kind.as_str() {
            "c" => match codec::decode_changes(&d, s + self.offset) {
                Ok(changes) => msgs.push(SourceMsg::Changes {
                    changes,
                    checkpoint,
                }),
                Err(why) => {
                    tracing::error!("unreadable stream entry: {why}");
                    msgs.push(SourceMsg::Resync {
                        reason: format!("a Redis stream entry could not be read ({why}); its {n} changes are skipped"),
                        checkpoint,
                    });
                }
            },
            "r" => msgs.push(SourceMsg::Resync {
                reason: d,
                checkpoint,
            }),
            "m" => match codec::decode_notice(&d) {
                Ok(ev) => msgs.push(SourceMsg::Notice(ev)),
                Err(why) => tracing::warn!("unreadable notice on the stream: {why}"),
            },
            other => tracing::warn!(kind = other, "unknown stream entry kind: skipped"),
        }
        self.status
            .last_seq
            .store(self.last_bus_seq + self.offset, Relaxed);
        for m in msgs {
            if self.tx.send(m).is_err() {
                return false;
            }
        }
        true
    }
}
