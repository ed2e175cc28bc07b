//! The L2 cache: values read from the database, shared by the instances of a stream in Redis,
//! behind each instance's in-process cache (L1). `get()` misses L1 → one MGET for what is
//! waiting → a hit settles the call (and fills L1); a miss goes on to the database, whose
//! answer is offered back to L2 (on a second thread and connection).
//!
//! Entries are `<version>|<flag>|<json>`: flag `v` a value, `d` deleted, `m` a marker. Every
//! change appended to the bus overwrites its key with a marker of its version (see `append`),
//! and an offer is taken only if it is not older than what is there: a read that raced with
//! a change can never put the older value back.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::Keys;
use crate::core::cache::CacheEntry;
use crate::core::Core;
use crate::error::Error;
use crate::store::{Completion, CompletionSink, Op};

/// KEYS: none. ARGV: ttl ms, then (key, version, flag|json) triples. Sets each entry unless a
/// newer one (or a value of the same version) is there.
const OFFER: &str = r"
local ttl = ARGV[1]
local n = 0
for i = 2, #ARGV, 3 do
  local k, v, body = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  local cur = redis.call('GET', k)
  local take = true
  if cur then
    local cv, cf = string.match(cur, '^(%d+)|(%a)|')
    cv = tonumber(cv)
    if cv and (cv > v or (cv == v and cf ~= 'm')) then take = false end
  end
  if take then
    redis.call('SET', k, v .. '|' .. body, 'PX', ttl)
    n = n + 1
  end
end
return n";

/// Requests waiting for the L2 thread.
const QUEUE: usize = 65_536;
/// Most requests handled per round trip.
const ROUND: usize = 512;
/// After a failure, Redis is left alone this long: reads go straight to the database.
const BACKOFF: Duration = Duration::from_secs(1);

enum Req {
    Lookup { id: u32, key: Arc<str> },
    Offer { key: Arc<str>, entry: CacheEntry },
}

/// Encodes an entry for L2.
pub fn encode(e: &CacheEntry) -> String {
    match &e.value {
        Some(v) => format!("v|{v}"),
        None => "d|".to_string(),
    }
}

/// Decodes an L2 entry; `None` for a marker or something unreadable (a miss).
pub fn decode(s: &str) -> Option<CacheEntry> {
    let (version, rest) = s.split_once('|')?;
    let version: u64 = version.parse().ok()?;
    let (flag, json) = rest.split_once('|')?;
    match flag {
        "v" => Some(CacheEntry {
            version,
            value: Some(json.into()),
        }),
        "d" => Some(CacheEntry {
            version,
            value: None,
        }),
        _ => None,
    }
}

/// The L2 cache of one streamer: a thread, and the channel to it.
/// Two threads, each with its own connection: lookups never wait behind offers (whose writes
/// Redis may fsync before answering).
pub struct L2 {
    lookups: SyncSender<Req>,
    offers: SyncSender<Req>,
    stop: Arc<AtomicBool>,
    handles: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

/// What the L2 threads need.
#[derive(Clone)]
pub struct L2Context {
    pub client: redis::Client,
    pub keys: Keys,
    pub ttl_ms: u64,
    pub core: Arc<Core>,
    pub completions: Arc<dyn CompletionSink>,
    /// The store thread's queue: misses go on there.
    pub ops: SyncSender<Op>,
}

impl L2 {
    pub fn start(ctx: L2Context) -> std::io::Result<L2> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        let mut spawn = |name: &str| -> std::io::Result<SyncSender<Req>> {
            let (tx, rx) = sync_channel(QUEUE);
            let (c, s) = (ctx.clone(), stop.clone());
            handles.push(
                std::thread::Builder::new()
                    .name(name.into())
                    .spawn(move || run(c, rx, s))?,
            );
            Ok(tx)
        };
        let lookups = spawn("usp-redis-l2-get")?;
        let offers = spawn("usp-redis-l2-put")?;
        Ok(L2 {
            lookups,
            offers,
            stop,
            handles: std::sync::Mutex::new(handles),
        })
    }

    /// Looks `key` up; settles `id` from L2 or hands it to the store. False when the L2 queue
    /// is full (the caller asks the store itself).
    pub fn lookup(&self, id: u32, key: Arc<str>) -> bool {
        self.lookups.try_send(Req::Lookup { id, key }).is_ok()
    }

    /// Offers a value read from the database (dropped when the queue is full).
    pub fn offer(&self, key: Arc<str>, entry: CacheEntry) {
        let _ = self.offers.try_send(Req::Offer { key, entry });
    }

    /// Stops the threads; lookups still queued go to the store.
    pub fn stop(&self) {
        self.stop.store(true, Relaxed);
        let handles = std::mem::take(&mut *self.handles.lock().unwrap_or_else(|p| p.into_inner()));
        for h in handles {
            let _ = h.join();
        }
    }
}

impl crate::core::L2Sink for L2 {
    fn offer(&self, key: Arc<str>, entry: CacheEntry) {
        L2::offer(self, key, entry)
    }
}

fn run(ctx: L2Context, rx: Receiver<Req>, stop: Arc<AtomicBool>) {
    let offer = redis::Script::new(OFFER);
    let mut conn: Option<redis::Connection> = None;
    let mut failed_at: Option<Instant> = None;
    loop {
        let first = match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => {
                if stop.load(Relaxed) {
                    break;
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let mut lookups: Vec<(u32, Arc<str>)> = Vec::new();
        let mut offers: Vec<(Arc<str>, CacheEntry)> = Vec::new();
        let mut next = Some(first);
        while let Some(r) = next.take() {
            match r {
                Req::Lookup { id, key } => lookups.push((id, key)),
                Req::Offer { key, entry } => offers.push((key, entry)),
            }
            if lookups.len() + offers.len() < ROUND {
                next = rx.try_recv().ok();
            }
        }
        let usable = failed_at.is_none_or(|t| t.elapsed() >= BACKOFF);
        if usable && conn.is_none() {
            match super::connect(&ctx.client) {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    tracing::debug!("L2 cache unreachable: {}", super::describe(&e));
                    failed_at = Some(Instant::now());
                }
            }
        }
        let mut to_store = Vec::new();
        let mut done = Vec::new();
        match conn.as_mut().filter(|_| usable) {
            None => to_store = lookups,
            Some(c) => {
                let mut ok = true;
                if !lookups.is_empty() {
                    let mut cmd = redis::cmd("MGET");
                    for (_, key) in &lookups {
                        cmd.arg(format!("{}{key}", ctx.keys.kv));
                    }
                    match cmd.query::<Vec<Option<String>>>(c) {
                        Ok(values) => {
                            for ((id, key), v) in lookups.into_iter().zip(values) {
                                match v.as_deref().and_then(decode) {
                                    Some(entry) => {
                                        ctx.core.metrics.l2_hits.fetch_add(1, Relaxed);
                                        done.push(Completion::Got {
                                            id,
                                            value: entry.value.clone(),
                                        });
                                        ctx.core.fill_l1(key, entry);
                                    }
                                    None => {
                                        ctx.core.metrics.l2_misses.fetch_add(1, Relaxed);
                                        to_store.push((id, key));
                                    }
                                }
                            }
                        }
                        Err(e) => {
                            tracing::debug!("L2 lookup failed: {}", super::describe(&e));
                            ok = false;
                            to_store = lookups;
                        }
                    }
                }
                if ok && !offers.is_empty() {
                    let mut inv = offer.prepare_invoke();
                    inv.arg(ctx.ttl_ms);
                    for (key, entry) in &offers {
                        inv.arg(format!("{}{key}", ctx.keys.kv))
                            .arg(entry.version)
                            .arg(encode(entry));
                    }
                    if let Err(e) = inv.invoke::<i64>(c) {
                        tracing::debug!("L2 offer failed: {}", super::describe(&e));
                        ok = false;
                    }
                }
                if !ok {
                    conn = None;
                    failed_at = Some(Instant::now());
                }
            }
        }
        for (id, key) in to_store {
            ctx.core.metrics.write_queue_depth.fetch_add(1, Relaxed);
            if let Err(e) = ctx.ops.try_send(Op::Get { id, key }) {
                ctx.core.metrics.write_queue_depth.fetch_sub(1, Relaxed);
                let error = match e {
                    TrySendError::Full(_) => Error::Overloaded(
                        "get() refused: the store's queue is full (option writeQueueSize); await earlier calls before sending more".into(),
                    ),
                    TrySendError::Disconnected(_) => Error::Closed("get()"),
                };
                done.push(Completion::Failed { id, error });
            }
        }
        if !done.is_empty() {
            ctx.completions.complete(done);
        }
    }
    // Lookups still queued are answered by the store (or refused there once it closed).
    while let Ok(r) = rx.try_recv() {
        if let Req::Lookup { id, key } = r {
            ctx.core.metrics.write_queue_depth.fetch_add(1, Relaxed);
            if ctx.ops.try_send(Op::Get { id, key }).is_err() {
                ctx.core.metrics.write_queue_depth.fetch_sub(1, Relaxed);
                ctx.completions.complete(vec![Completion::Failed {
                    id,
                    error: Error::Closed("get()"),
                }]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_markers_miss() {
        let v = CacheEntry {
            version: 12,
            value: Some(r#"{"a":"x|y"}"#.into()),
        };
        assert_eq!(decode(&format!("12|{}", encode(&v))), Some(v));
        let d = CacheEntry {
            version: 3,
            value: None,
        };
        assert_eq!(decode(&format!("3|{}", encode(&d))), Some(d));
        for miss in ["7|m|", "", "x|v|1", "7", "7|v", "7|q|1"] {
            assert_eq!(decode(miss), None, "{miss}");
        }
    }
}
