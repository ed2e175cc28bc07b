//! Every metric of the engine, in one place, with its kind and unit. `getStatus()` (and later
//! `/metrics`) read from here.

use hdrhistogram::Histogram;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::error::Error;

/// Events per second over the last complete second (8 one-second buckets, lock-free).
#[derive(Debug)]
pub struct RateMeter {
    start: Instant,
    buckets: [AtomicU64; 8],
    stamps: [AtomicU64; 8],
}

impl RateMeter {
    pub fn new() -> Self {
        RateMeter {
            start: Instant::now(),
            buckets: Default::default(),
            stamps: Default::default(),
        }
    }

    fn second(&self) -> u64 {
        self.start.elapsed().as_secs()
    }

    /// Counts `n` events now.
    pub fn add(&self, n: u64) {
        let s = self.second();
        let i = (s % 8) as usize;
        if self.stamps[i].load(Relaxed) != s {
            // First writer of a new second resets the bucket; a lost race costs a few counts.
            self.stamps[i].store(s, Relaxed);
            self.buckets[i].store(0, Relaxed);
        }
        self.buckets[i].fetch_add(n, Relaxed);
    }

    /// Events counted during the previous full second.
    pub fn per_second(&self) -> u64 {
        let s = self.second();
        if s == 0 {
            return 0;
        }
        let i = ((s - 1) % 8) as usize;
        if self.stamps[i].load(Relaxed) == s - 1 {
            self.buckets[i].load(Relaxed)
        } else {
            0
        }
    }
}

impl Default for RateMeter {
    fn default() -> Self {
        Self::new()
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

/// Engine metrics. Counters are monotonic unless named `*_depth` (gauges).
#[derive(Debug)]
pub struct Metrics {
    pub started: Instant,
    /// counter, events: changes read from the source and admitted by the core.
    pub events_captured: AtomicU64,
    /// counter, events: changes dropped as already delivered (same position or older version).
    pub events_deduplicated: AtomicU64,
    /// counter, events: changes handed to JavaScript listeners.
    pub events_emitted: AtomicU64,
    /// counter, calls: batches handed to JavaScript (one threadsafe call each).
    pub batches_emitted: AtomicU64,
    /// gauge, events: largest batch so far.
    pub batch_max: AtomicU64,
    /// rate, events/s: emitted to JavaScript.
    pub emit_rate: RateMeter,
    /// histogram, microseconds: commit → hand-off to the JavaScript thread.
    latency_us: Mutex<Histogram<u64>>,
    /// gauge, operations: pushes/gets/deletes queued for the store.
    pub write_queue_depth: AtomicUsize,
    /// gauge, events: events queued between capture and delivery.
    pub dispatch_queue_depth: AtomicUsize,
    /// gauge, batches: batches handed to JavaScript and not yet processed (kept by the gate).
    pub in_flight_batches: Arc<AtomicUsize>,
    /// counter, transactions: store transactions committed.
    pub transactions: AtomicU64,
    /// counter, operations: store writes committed.
    pub writes: AtomicU64,
    /// counter, errors that may heal (busy database, listener errors).
    pub errors_recoverable: AtomicU64,
    /// counter, errors that will not heal by retrying.
    pub errors_fatal: AtomicU64,
    /// counter, exceptions thrown by JavaScript listeners.
    pub listener_errors: AtomicU64,
    /// `get()` answered by the L2 cache (Redis), count.
    pub l2_hits: AtomicU64,
    /// `get()` that missed L2 and went to the database, count.
    pub l2_misses: AtomicU64,
    /// counter, resyncs (a checkpoint was lost and the source restarted from the current state).
    pub resyncs: AtomicU64,
    /// last error seen: (code, message, unix ms).
    last_error: Mutex<Option<(String, String, i64)>>,
    /// gauge, change-log seq the source has read up to.
    pub source_position: AtomicI64,
}

impl Metrics {
    pub fn new() -> Self {
        Metrics {
            started: Instant::now(),
            events_captured: AtomicU64::new(0),
            events_deduplicated: AtomicU64::new(0),
            events_emitted: AtomicU64::new(0),
            batches_emitted: AtomicU64::new(0),
            batch_max: AtomicU64::new(0),
            emit_rate: RateMeter::new(),
            // 1 µs .. 1 hour, 3 significant digits.
            latency_us: Mutex::new(
                Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds"),
            ),
            write_queue_depth: AtomicUsize::new(0),
            dispatch_queue_depth: AtomicUsize::new(0),
            in_flight_batches: Arc::new(AtomicUsize::new(0)),
            transactions: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            errors_recoverable: AtomicU64::new(0),
            errors_fatal: AtomicU64::new(0),
            listener_errors: AtomicU64::new(0),
            l2_hits: AtomicU64::new(0),
            l2_misses: AtomicU64::new(0),
            resyncs: AtomicU64::new(0),
            last_error: Mutex::new(None),
            source_position: AtomicI64::new(0),
        }
    }

    /// Records commit→delivery latencies of one batch (called on the delivery thread).
    pub fn record_latencies(&self, commit_ts_us: &[i64], now_us: i64) {
        // Short critical section: one lock per batch, not per event.
        if let Ok(mut h) = self.latency_us.lock() {
            for &ts in commit_ts_us {
                h.saturating_record((now_us - ts).max(1) as u64);
            }
        }
    }

    /// Counts a delivered batch.
    pub fn record_batch(&self, events: u64) {
        self.events_emitted.fetch_add(events, Relaxed);
        self.batches_emitted.fetch_add(1, Relaxed);
        self.batch_max.fetch_max(events, Relaxed);
        self.emit_rate.add(events);
    }

    /// Counts an error and remembers it as the last one. Messages never contain secrets.
    pub fn record_error(&self, e: &Error) {
        if e.is_retryable() {
            self.errors_recoverable.fetch_add(1, Relaxed);
        } else {
            self.errors_fatal.fetch_add(1, Relaxed);
        }
        self.set_last_error(e.code(), &e.to_string());
    }

    pub fn set_last_error(&self, code: &str, message: &str) {
        if let Ok(mut l) = self.last_error.lock() {
            *l = Some((
                code.to_string(),
                message.to_string(),
                crate::event::now_us() / 1000,
            ));
        }
    }

    pub fn last_error(&self) -> Option<(String, String, i64)> {
        self.last_error.lock().ok().and_then(|l| l.clone())
    }

    /// Latency percentiles so far, in ms.
    pub fn latency(&self) -> LatencySummary {
        let h = match self.latency_us.lock() {
            Ok(h) => h,
            Err(_) => return LatencySummary::default(),
        };
        if h.is_empty() {
            return LatencySummary::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        LatencySummary {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p95: ms(h.value_at_quantile(0.95)),
            p99: ms(h.value_at_quantile(0.99)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
        }
    }

    /// Latencies as a cumulative histogram: for each bound (µs), how many were at or below it;
    /// then the count and the sum (µs).
    pub fn latency_buckets(&self, bounds_us: &[u64]) -> (Vec<u64>, u64, f64) {
        let h = match self.latency_us.lock() {
            Ok(h) => h,
            Err(_) => return (vec![0; bounds_us.len()], 0, 0.0),
        };
        let counts = bounds_us
            .iter()
            .map(|&b| {
                if h.is_empty() {
                    0
                } else {
                    h.count_between(0, b)
                }
            })
            .collect();
        (counts, h.len(), h.mean() * h.len() as f64)
    }

    /// Forgets recorded latencies (benchmarks reset between phases).
    pub fn reset_latency(&self) {
        if let Ok(mut h) = self.latency_us.lock() {
            h.reset();
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn latency_histogram_is_cumulative() {
        let m = Metrics::new();
        m.record_latencies(&[0, 0, 0], 0);
        m.record_latencies(
            &[1_000_000 - 100, 1_000_000 - 1_000, 1_000_000 - 5_000],
            1_000_000,
        );
        let (b, count, sum) = m.latency_buckets(&[500, 2_000, 10_000]);
        assert_eq!(count, 6);
        assert_eq!(b, vec![4, 5, 6]);
        assert!(sum > 6_000.0 && sum < 6_200.0, "{sum}");
    }
    use super::*;

    #[test]
    fn latency_percentiles() {
        let m = Metrics::new();
        let now = 1_000_000;
        let ts: Vec<i64> = (1..=100).map(|i| now - i * 1000).collect(); // 1..100 ms
        m.record_latencies(&ts, now);
        let l = m.latency();
        assert_eq!(l.count, 100);
        assert!((l.p50 - 50.0).abs() < 0.1, "{l:?}");
        assert!((l.p99 - 99.0).abs() < 0.1, "{l:?}");
        assert!((l.max - 100.0).abs() < 0.1, "{l:?}");
        m.reset_latency();
        assert_eq!(m.latency().count, 0);
    }

    #[test]
    fn errors_are_split_by_retryability() {
        let m = Metrics::new();
        m.record_error(&Error::DbBusy("locked".into()));
        m.record_error(&Error::Db("bad".into()));
        m.record_error(&Error::Db("bad".into()));
        assert_eq!(m.errors_recoverable.load(Relaxed), 1);
        assert_eq!(m.errors_fatal.load(Relaxed), 2);
        assert_eq!(m.last_error().unwrap().0, "USP_DB_ERROR");
    }

    #[test]
    fn rate_meter_counts_current_second_only_after_it_ends() {
        let r = RateMeter::new();
        r.add(5);
        assert_eq!(r.per_second(), 0);
    }
}
