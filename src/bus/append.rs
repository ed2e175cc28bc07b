//! The capturer's side of the bus: what capture produces is appended to the Redis Stream, one
//! entry per batch, with the capture checkpoint it reached stored in the same script. A
//! successor resumes from that checkpoint, so a change is appended once.
//!
//! Redis down: the entry is retried with backoff and capture waits behind the bounded channel
//! (it pauses; its checkpoint stays where the stream is). A reply lost with the connection is
//! settled by the seq check: the retry finds its entry already appended.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::{codec, BusCheckpoint, BusStatus, Keys};
use crate::core::pipeline::SourceMsg;

/// KEYS: lease, seq, stream, checkpoint.
/// ARGV: lease value, expected last seq, n, kind, payload, checkpoint|'', maxlen, minid|'',
/// L2 ttl|'', then (L2 key, version) pairs of the key-value changes: each gets a marker (see
/// `l2`), so no instance serves the value from before the change.
/// Returns {0, last seq} when appended, {-1, 0} when the lease is not ours, {-2, seq} when the
/// stream's last seq is not the one expected.
const APPEND: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {-1, 0} end
local cur = tonumber(redis.call('GET', KEYS[2]) or '0')
if cur ~= tonumber(ARGV[2]) then return {-2, cur} end
local n = tonumber(ARGV[3])
local last = cur + n
if n > 0 then redis.call('SET', KEYS[2], last) end
redis.call('XADD', KEYS[3], 'MAXLEN', ARGV[7], '*', 'k', ARGV[4], 's', cur + 1, 'n', n, 'd', ARGV[5])
if ARGV[6] ~= '' then redis.call('SET', KEYS[4], ARGV[6]) end
if ARGV[8] ~= '' then redis.call('XTRIM', KEYS[3], 'MINID', ARGV[8]) end
if ARGV[9] ~= '' then
  for i = 10, #ARGV, 2 do
    redis.call('SET', ARGV[i], ARGV[i + 1] .. '|m|', 'PX', ARGV[9])
  end
end
return {0, last}";

/// Most changes in one stream entry.
const ENTRY_MAX_CHANGES: usize = 2048;
/// Most bytes of encoded changes in one entry (values can be large).
const ENTRY_MAX_BYTES: usize = 4 << 20;

/// Attempts of an append after close was asked for (about two seconds of backoff).
const STOP_ATTEMPTS: u32 = 6;

/// AppendOptionsming of the stream, and the L2 cache the appends invalidate.
#[derive(Debug, Clone, Copy)]
pub struct AppendOptions {
    pub max_len: u64,
    pub max_age_ms: u64,
    /// TTL of L2 markers; 0 when the L2 cache is off.
    pub cache_ttl_ms: u64,
}

/// One entry to append.
struct Entry<C> {
    kind: &'static str,
    n: u64,
    payload: String,
    checkpoint: Option<C>,
    /// Key-value changes: (key, version), for the L2 markers.
    kv: Vec<(std::sync::Arc<str>, u64)>,
}

/// How an append ended.
enum Outcome {
    Appended,
    /// The lease is gone: another instance captures now.
    Fenced,
    Stopped,
}

/// The appender of one lease term.
pub struct Appender<C> {
    tx: SyncSender<SourceMsg<C>>,
    handle: Option<JoinHandle<()>>,
    delivered: Arc<Mutex<Option<C>>>,
    fenced: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl<C: BusCheckpoint> Appender<C> {
    /// Starts the thread for the term whose lease value is `lease`; `capacity` bounds the
    /// messages waiting between capture and Redis.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        client: redis::Client,
        keys: Keys,
        lease: String,
        opts: AppendOptions,
        status: Arc<BusStatus>,
        capacity: usize,
        start: Option<C>,
    ) -> std::io::Result<Appender<C>> {
        let (tx, rx) = sync_channel(capacity.max(1));
        let delivered = Arc::new(Mutex::new(start));
        let fenced = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let run = Run {
            client,
            keys,
            lease,
            opts,
            status,
            delivered: delivered.clone(),
            fenced: fenced.clone(),
            stop: stop.clone(),
            conn: None,
            last_seq: None,
            script: redis::Script::new(APPEND),
        };
        let handle = std::thread::Builder::new()
            .name("usp-redis-append".into())
            .spawn(move || run.run(rx))?;
        Ok(Appender {
            tx,
            handle: Some(handle),
            delivered,
            fenced,
            stop,
        })
    }

    /// The sender capture feeds.
    pub fn sender(&self) -> SyncSender<SourceMsg<C>> {
        self.tx.clone()
    }

    /// The checkpoint of the last entry appended.
    pub fn delivered(&self) -> Option<C> {
        self.delivered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// True once Redis refused an append because the lease is no longer ours.
    pub fn fenced(&self) -> bool {
        self.fenced.load(Relaxed)
    }

    /// Appends what capture already sent (while Redis answers), then stops.
    pub fn stop(mut self) -> Option<C> {
        // With Redis unreachable, the thread gives up after a few more attempts; the channel
        // then closes and this send returns.
        self.stop.store(true, Relaxed);
        let _ = self.tx.send(SourceMsg::Stop);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.delivered()
    }
}

struct Run<C> {
    client: redis::Client,
    keys: Keys,
    lease: String,
    opts: AppendOptions,
    status: Arc<BusStatus>,
    delivered: Arc<Mutex<Option<C>>>,
    fenced: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    conn: Option<redis::Connection>,
    /// The stream's last seq, as this term knows it (read once connected).
    last_seq: Option<u64>,
    script: redis::Script,
}

impl<C: BusCheckpoint> Run<C> {
    fn run(mut self, rx: Receiver<SourceMsg<C>>) {
        let mut stopping = false;
        while !stopping {
            let Ok(first) = rx.recv() else { break };
            let mut msgs = vec![first];
            while msgs.len() < 256 {
                match rx.try_recv() {
                    Ok(m) => msgs.push(m),
                    Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => break,
                }
            }
            let mut entries: Vec<Entry<C>> = Vec::new();
            let mut changes = Vec::new();
            let mut checkpoint: Option<C> = None;
            let mut bytes = 0;
            let flush =
                |changes: &mut Vec<_>, checkpoint: &mut Option<C>, entries: &mut Vec<Entry<C>>| {
                    if !changes.is_empty() || checkpoint.is_some() {
                        let list: Vec<crate::event::Change> = std::mem::take(changes);
                        entries.push(Entry {
                            kind: "c",
                            n: list.len() as u64,
                            payload: codec::encode_changes(&list),
                            checkpoint: checkpoint.take(),
                            kv: list
                                .iter()
                                .filter(|c| c.table.is_none())
                                .map(|c| (c.key.clone(), c.version))
                                .collect(),
                        });
                    }
                };
            for m in msgs {
                match m {
                    SourceMsg::Changes {
                        changes: list,
                        checkpoint: cp,
                    } => {
                        for c in list {
                            bytes += c.key.len()
                                + c.data.as_ref().map_or(0, |d| d.len())
                                + c.before.as_ref().map_or(0, |d| d.len());
                            changes.push(c);
                        }
                        if let Some(cp) = cp {
                            match checkpoint.as_mut() {
                                Some(old) => old.advance(cp),
                                None => checkpoint = Some(cp),
                            }
                        }
                        if changes.len() >= ENTRY_MAX_CHANGES || bytes >= ENTRY_MAX_BYTES {
                            flush(&mut changes, &mut checkpoint, &mut entries);
                            bytes = 0;
                        }
                    }
                    SourceMsg::Resync {
                        reason,
                        checkpoint: cp,
                    } => {
                        flush(&mut changes, &mut checkpoint, &mut entries);
                        bytes = 0;
                        entries.push(Entry {
                            kind: "r",
                            n: 0,
                            payload: reason,
                            checkpoint: cp,
                            kv: Vec::new(),
                        });
                    }
                    SourceMsg::Notice(e) => {
                        flush(&mut changes, &mut checkpoint, &mut entries);
                        bytes = 0;
                        if let Some(payload) = codec::encode_notice(&e) {
                            entries.push(Entry {
                                kind: "m",
                                n: 0,
                                payload,
                                checkpoint: None,
                                kv: Vec::new(),
                            });
                        }
                    }
                    SourceMsg::Stop => stopping = true,
                    // Only a pipeline sends it to itself.
                    SourceMsg::Wake => {}
                }
            }
            flush(&mut changes, &mut checkpoint, &mut entries);
            for e in entries {
                match self.append(e) {
                    Outcome::Appended => {}
                    Outcome::Fenced => {
                        self.fenced.store(true, Relaxed);
                        return;
                    }
                    Outcome::Stopped => return,
                }
            }
        }
    }

    /// Appends one entry, retrying while Redis is unreachable.
    fn append(&mut self, e: Entry<C>) -> Outcome {
        let cp = e
            .checkpoint
            .as_ref()
            .map(|c| c.to_bus())
            .unwrap_or_default();
        let mut attempt = 0u32;
        loop {
            if attempt > 0 {
                if self.stop.load(Relaxed) && attempt >= STOP_ATTEMPTS {
                    tracing::warn!("appender stopped while Redis was unreachable: the next capturer resumes from the stream's checkpoint");
                    return Outcome::Stopped;
                }
                self.status.capture_paused.store(true, Relaxed);
                std::thread::sleep(crate::source::backoff_delay(
                    super::RECONNECT_MIN,
                    super::RECONNECT_MAX,
                    attempt,
                ));
            }
            attempt += 1;
            match self.try_append(&e, &cp) {
                Ok(Some(outcome)) => {
                    self.status.capture_paused.store(false, Relaxed);
                    if matches!(outcome, Outcome::Appended) {
                        self.status.appended.fetch_add(1, Relaxed);
                        if let Some(c) = e.checkpoint {
                            let mut d = self.delivered.lock().unwrap_or_else(|p| p.into_inner());
                            match d.as_mut() {
                                Some(old) => old.advance(c),
                                None => *d = Some(c),
                            }
                        }
                    }
                    return outcome;
                }
                Ok(None) => {}
                Err(err) => {
                    self.conn = None;
                    self.status
                        .set_error(Some(format!("append: {}", super::describe(&err))));
                    tracing::debug!("append to Redis failed: {}", super::describe(&err));
                }
            }
        }
    }

    /// One attempt: `Ok(None)` to retry.
    fn try_append(&mut self, e: &Entry<C>, cp: &str) -> redis::RedisResult<Option<Outcome>> {
        if self.conn.is_none() {
            self.conn = Some(super::connect(&self.client)?);
        }
        let conn = self.conn.as_mut().expect("set above");
        let expected = match self.last_seq {
            Some(s) => s,
            None => {
                let s: Option<u64> = redis::cmd("GET").arg(&self.keys.seq).query(conn)?;
                *self.last_seq.insert(s.unwrap_or(0))
            }
        };
        let minid = if self.opts.max_age_ms > 0 {
            let now_ms = (crate::event::now_us() / 1000) as u64;
            format!("{}-0", now_ms.saturating_sub(self.opts.max_age_ms))
        } else {
            String::new()
        };
        let mut inv = self.script.prepare_invoke();
        inv.key(&self.keys.lease)
            .key(&self.keys.seq)
            .key(&self.keys.stream)
            .key(&self.keys.checkpoint)
            .arg(&self.lease)
            .arg(expected)
            .arg(e.n)
            .arg(e.kind)
            .arg(&e.payload)
            .arg(cp)
            .arg(self.opts.max_len)
            .arg(minid);
        if self.opts.cache_ttl_ms > 0 && !e.kv.is_empty() {
            inv.arg(self.opts.cache_ttl_ms);
            for (key, version) in &e.kv {
                inv.arg(format!("{}{key}", self.keys.kv)).arg(*version);
            }
        } else {
            inv.arg("");
        }
        let r: (i64, u64) = inv.invoke(conn)?;
        Ok(Some(match r {
            (0, last) => {
                self.last_seq = Some(last);
                Outcome::Appended
            }
            (-2, cur) if e.n > 0 && cur == expected + e.n => {
                // Our entry landed; its reply was lost with the connection.
                self.last_seq = Some(cur);
                Outcome::Appended
            }
            (-1, _) => {
                tracing::warn!("append refused: the capture lease is no longer this instance's");
                Outcome::Fenced
            }
            (_, cur) => {
                tracing::warn!(
                    expected,
                    cur,
                    "append refused: another instance appended to the stream"
                );
                Outcome::Fenced
            }
        }))
    }
}
