//! The capture lease: one key in Redis naming the instance that captures, with a TTL it renews.
//! Each lease taken gets the next fencing term from a counter; the appender writes only while
//! the lease still holds its `<instance>:<term>` value, so a capturer that lost the lease (a
//! long pause, a partition) can never append after its successor started.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{BusStatus, Keys};

/// KEYS: lease, term. ARGV: instance, ttl ms. Returns the new term, or 0 when held.
const ACQUIRE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local t = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. t, 'PX', ARGV[2])
return t";

/// KEYS: lease. ARGV: lease value, ttl ms. Returns 1 when still ours.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0";

/// KEYS: lease. ARGV: lease value. Deletes the lease when it is ours.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0";

/// The lease this instance holds: the value written in Redis and its term.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub value: String,
    pub term: u64,
}

struct Shared {
    held: Mutex<Option<Held>>,
    stop: AtomicBool,
}

/// Takes and renews the lease on a thread of its own, so a slow database call never lets it
/// lapse. The store thread asks `held()` and starts or stops capture accordingly.
pub struct Lease {
    shared: Arc<Shared>,
    handle: Option<JoinHandle<()>>,
}

impl Lease {
    pub fn start(
        client: redis::Client,
        keys: Keys,
        instance: String,
        ttl: Duration,
        status: Arc<BusStatus>,
    ) -> std::io::Result<Lease> {
        let shared = Arc::new(Shared {
            held: Mutex::new(None),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let (first_tx, first_rx) = std::sync::mpsc::sync_channel(1);
        let handle = std::thread::Builder::new()
            .name("usp-redis-lease".into())
            .spawn(move || run(client, keys, instance, ttl, status, s, first_tx))?;
        // The first request is answered before `init()` resolves: the first instance of a
        // stream captures from its start.
        let _ = first_rx.recv_timeout(super::CONNECT_TIMEOUT + super::COMMAND_TIMEOUT);
        Ok(Lease {
            shared,
            handle: Some(handle),
        })
    }

    /// The lease while this instance holds it.
    pub fn held(&self) -> Option<Held> {
        self.shared
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Gives the lease back (so another instance takes over at once) and stops the thread.
    pub fn stop(mut self) {
        self.shared.stop.store(true, Relaxed);
        if let Some(h) = self.handle.take() {
            h.thread().unpark();
            let _ = h.join();
        }
    }
}

fn set(shared: &Shared, h: Option<Held>) {
    *shared.held.lock().unwrap_or_else(|p| p.into_inner()) = h;
}

fn run(
    client: redis::Client,
    keys: Keys,
    instance: String,
    ttl: Duration,
    status: Arc<BusStatus>,
    shared: Arc<Shared>,
    first: std::sync::mpsc::SyncSender<()>,
) {
    let acquire = redis::Script::new(ACQUIRE);
    let renew = redis::Script::new(RENEW);
    let every = ttl / 3;
    let ttl_ms = ttl.as_millis() as u64;
    let mut conn: Option<redis::Connection> = None;
    let mut renewed = Instant::now();
    while !shared.stop.load(Relaxed) {
        let held = shared
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if conn.is_none() {
            conn = super::connect(&client).ok();
        }
        let outcome = match conn.as_mut() {
            None => Err(()),
            Some(c) => match &held {
                Some(h) => match renew
                    .key(&keys.lease)
                    .arg(&h.value)
                    .arg(ttl_ms)
                    .invoke::<i64>(c)
                {
                    Ok(1) => {
                        renewed = Instant::now();
                        Ok(())
                    }
                    Ok(_) => {
                        tracing::warn!(term = h.term, "capture lease lost to another instance");
                        set(&shared, None);
                        Ok(())
                    }
                    Err(e) => {
                        tracing::debug!("lease renewal failed: {}", super::describe(&e));
                        Err(())
                    }
                },
                None => match acquire
                    .key(&keys.lease)
                    .key(&keys.term)
                    .arg(&instance)
                    .arg(ttl_ms)
                    .invoke::<u64>(c)
                {
                    Ok(0) => Ok(()),
                    Ok(term) => {
                        renewed = Instant::now();
                        tracing::info!(term, "capture lease taken");
                        status.takeovers.fetch_add(1, Relaxed);
                        set(
                            &shared,
                            Some(Held {
                                value: format!("{instance}:{term}"),
                                term,
                            }),
                        );
                        Ok(())
                    }
                    Err(e) => {
                        tracing::debug!("lease request failed: {}", super::describe(&e));
                        Err(())
                    }
                },
            },
        };
        if outcome.is_err() {
            conn = None;
            // Unrenewed for a whole TTL: the lease has lapsed in Redis (or soon will); stop
            // acting as the capturer. The appender is fenced anyway.
            if held.is_some() && renewed.elapsed() >= ttl {
                tracing::warn!("capture lease not renewed within its TTL: stepping down");
                set(&shared, None);
            }
        }
        let _ = first.try_send(());
        std::thread::park_timeout(every);
    }
    if let Some(h) = shared.held.lock().unwrap_or_else(|p| p.into_inner()).take() {
        if let Some(c) = conn.as_mut() {
            let _ = redis::Script::new(RELEASE)
                .key(&keys.lease)
                .arg(&h.value)
                .invoke::<i64>(c);
        }
    }
}
